"""Every method on two architecture families: inject, forward, backward, save, reload (same
logits), peft loading our files, the training loss on padded batches, and generation that
follows the training forward for the methods that add virtual tokens."""

import copy
import functools
import json
import re

import pytest
import torch

from tuneforge.config import MethodConfig
from tuneforge.data.batching import collate_padded
from tuneforge.data.render import Sample
from tuneforge.infer.generate import generate_tokens
from tuneforge.methods import (
    adapter_kind,
    apply_method,
    load_adapter,
    trainable_parameters,
)
from tuneforge.models import load_model
from tuneforge.train.sft import SFTObjective

FAMILIES = ["tiny-llama", "tiny-qwen2"]
METHOD_CONFIGS = {
    "dora": dict(name="dora", r=4, lora_alpha=8, lora_dropout=0.0),
    "rslora": dict(name="lora", r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True),
    "ia3": dict(name="ia3", target_modules=["k_proj", "v_proj"]),
    "adapter": dict(name="adapter", bottleneck_size=8),
    "prefix": dict(name="prefix", num_virtual_tokens=3, prefix_projection=True),
    "prompt": dict(name="prompt", num_virtual_tokens=3, prompt_init_text="Convert the date"),
}
PEFT_BACKED = ["dora", "rslora", "ia3", "prefix", "prompt"]


@functools.cache
def _loaded(family):
    model, tok, _ = load_model(family)
    return model.eval(), tok


def fresh(family):
    """A new copy of the tiny model (loaded once per family; injection changes the copy)."""
    model, tok = _loaded(family)
    torch.manual_seed(0)
    return copy.deepcopy(model), tok


def samples():
    """Three samples of different lengths: a padded batch, labels on the second half."""
    g = torch.Generator().manual_seed(1)
    out = []
    for T in (7, 12, 9):
        ids = torch.randint(10, 2000, (T,), generator=g).tolist()
        out.append(Sample(ids, [-100] * (T // 2) + ids[T // 2 :]))
    return out


def batch():
    return collate_padded(samples(), pad_id=2)


def logits_of(model, b):
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def train_one_step(model, lr=0.05):
    """A real SFT loss, backward, and a plain gradient step, so the adapter differs from its init."""
    model.train()
    loss = SFTObjective().loss_sum(model, batch())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= lr * p.grad.sign()
                p.grad = None
    return model.eval(), loss, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_inject_forward_backward_save_reload(tmp_path, family, method):
    base, tok = fresh(family)
    base_logits = logits_of(base, batch())
    cfg = MethodConfig(**METHOD_CONFIGS[method])
    model = apply_method(base, cfg, tok)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 10  # a parameter-efficient method: the base stays frozen
    model, loss, grads = train_one_step(model)
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    trained = logits_of(model, batch())
    assert (trained[:, -batch()["input_ids"].shape[1] :] - base_logits).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").glob("adapter_*"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter_kind(tmp_path / "adapter") == {"rslora": "lora"}.get(method, method)
    reloaded = load_adapter(fresh(family)[0], tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, batch()), trained, rtol=0, atol=1e-6)
    if method in PEFT_BACKED:  # the reference reader of the format: peft itself
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(fresh(family)[0], str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(logits_of(theirs, batch()), trained, rtol=0, atol=1e-6)
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config.get("use_dora", False) == (method == "dora")
        assert config.get("use_rslora", False) == (method == "rslora")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_padded_batch_loss_equals_per_sample_losses(family, method):
    """Padding must not leak into the virtual tokens' attention or positions: the summed loss of a
    right-padded batch equals the sum over each sample alone. Cross-checked against peft's own
    labelled forward (mean over supervised tokens) for the whole batch."""
    base, tok = fresh(family)
    model, _, _ = train_one_step(apply_method(base, MethodConfig(**METHOD_CONFIGS[method]), tok))
    objective = SFTObjective()
    with torch.no_grad():
        padded = objective.loss_sum(model, batch())
        alone = sum(objective.loss_sum(model, collate_padded([s], 2)) for s in samples())
        b = batch()
        peft_mean = model(**b).loss  # peft prepends -100 labels for the virtual tokens
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded / objective.units(b), peft_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "dora"])
def test_selective_fast_path_gives_the_plain_path_numbers(method):
    base, tok = fresh("tiny-llama")
    model, _, _ = train_one_step(apply_method(base, MethodConfig(**METHOD_CONFIGS[method]), tok))
    model.train()
    losses, grads = [], []
    for selective in (True, False):
        loss = SFTObjective(selective=selective).loss_sum(model, batch())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_follows_the_training_forward(family, method):
    """Each greedy token generated for a left-padded batch is the argmax of the training-time
    forward over that row alone (unpadded), so generation sees what training saw."""
    base, tok = fresh(family)
    model, _, _ = train_one_step(apply_method(base, MethodConfig(**METHOD_CONFIGS[method]), tok))
    prompts = [[1, 520, 33, 4000, 17], [1, 77, 880, 9, 31, 604, 12, 5]]
    T = max(map(len, prompts))
    ids = torch.full((2, T), 2)
    mask = torch.zeros((2, T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = torch.tensor(p)
        mask[row, T - len(p) :] = 1
    out = generate_tokens(model, ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert out.shape == (2, T + 6)
    for row, p in enumerate(prompts):
        seq = torch.cat([torch.tensor(p), out[row, T:]])[None]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, -seq.shape[1] :]  # drop virtual positions
        for i in range(len(p), seq.shape[1]):
            step = logits[i - 1]
            assert step[seq[0, i]] >= step.max() - 1e-4, (row, i)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method.name=qlorax"],
            "'method.name' is 'qlorax'; choose one of full, lora, qlora, dora, ia3",
        ),
        (["method.name=ia3", "method.use_rslora=true"], "applies to lora and dora only"),
        (["method.name=adapter", "method.reduction_factor=0"], "must be at least 1, got 0"),
        (["method.name=prompt", "method.num_virtual_tokens=0"], "must be at least 1, got 0"),
        (["method.non_linearity=swish"], "choose one of relu, gelu, silu, tanh"),
    ],
)
def test_method_config_mistakes_are_one_line(overrides, message):
    from tuneforge.config import load_config
    from tuneforge.errors import TuneforgeError

    base = ["model=tiny-llama", "output_dir=x", "data.train=t.jsonl"]
    with pytest.raises(TuneforgeError, match=re.escape(message)) as e:
        load_config(None, base + overrides)
    assert "\n" not in str(e.value)


def test_ia3_feedforward_module_the_model_lacks():
    from tuneforge.errors import TuneforgeError

    cfg = MethodConfig(name="ia3", target_modules=["k_proj"], feedforward_modules=["fc2"])
    with pytest.raises(TuneforgeError, match="'method.feedforward_modules' \\['fc2'\\] names a"):
        apply_method(fresh("tiny-llama")[0], cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_starts_as_the_init_text_context(family):
    """Initialised from text, the prefix is that text's keys/values in every layer: the model with
    the prefix gives the base model's logits for text + input, at the input's positions."""
    base, tok = fresh(family)
    text = "Convert the date"
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    cfg = MethodConfig(name="prefix", num_virtual_tokens=len(text_ids), prompt_init_text=text)
    expected_base = copy.deepcopy(base)
    model = apply_method(base, cfg, tok).eval()
    ids = torch.tensor([[1, 520, 33, 4000, 17, 9]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        full = expected_base(input_ids=torch.cat([torch.tensor([text_ids]), ids], 1)).logits
    torch.testing.assert_close(got, full[:, len(text_ids) :], rtol=1e-4, atol=1e-4)

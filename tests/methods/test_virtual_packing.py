"""Prefix and prompt tuning on packed rows: each sample in a row sees its own virtual tokens (or
the shared prefix) and itself only, with the positions it has alone; packed == padded loss and
gradients; train() with data.packing end to end, and generation that follows the packed forward."""

import warnings

import pytest
import torch

from tuneforge.config import MethodConfig
from tuneforge.data.batching import collate_packed, collate_padded, pack_rows
from tuneforge.data.render import Sample, render_prompt
from tuneforge.infer.generate import generate, generate_tokens
from tuneforge.infer.runs import load_for_inference
from tuneforge.methods import apply_method
from tuneforge.methods.virtual_packing import packed_forward
from tuneforge.train.sft import SFTObjective

from ..conftest import train_and_read_metrics, write_jsonl
from .test_methods import FAMILIES, METHOD_CONFIGS, fresh, train_one_step

METHODS = ["prefix", "prompt"]


def samples():
    """Five samples of different lengths, labels on the second half of each."""
    g = torch.Generator().manual_seed(5)
    out = []
    for T in (7, 12, 5, 9, 10):
        ids = torch.randint(10, 2000, (T,), generator=g).tolist()
        out.append(Sample(ids, [-100] * (T // 2) + ids[T // 2 :]))
    return out


ROWS = [[0, 1, 2], [3, 4]]  # two rows; the second is shorter, so it ends in padding


def packed_batch():
    s = samples()
    return collate_packed([[s[i] for i in row] for row in ROWS], pad_id=2)


def trained(family, method):
    """The method on a fresh tiny model after one real step (so the virtual tokens are not
    their initial values)."""
    base, tok = fresh(family)
    model, _, _ = train_one_step(apply_method(base, MethodConfig(**METHOD_CONFIGS[method]), tok))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_each_sample_in_a_packed_row_gives_its_logits_and_loss_alone(family, method):
    model = trained(family, method)
    s = samples()
    b = packed_batch()
    objective = SFTObjective()
    with torch.no_grad():
        packed = packed_forward(model, b)  # (B, T, vocab) in the packed layout
        assert packed.shape[:2] == b["input_ids"].shape
        for r, row in enumerate(ROWS):
            start = 0
            for i in row:
                n = len(s[i])
                alone = model(input_ids=torch.tensor([s[i].input_ids])).logits[0, -n:]
                torch.testing.assert_close(
                    packed[r, start : start + n], alone, rtol=1e-5, atol=1e-5
                )
                start += n
        # The summed loss of the packed batch is the sum over every sample alone (unpacked).
        packed_loss = objective.loss_sum(model, b)
        alone_loss = sum(objective.loss_sum(model, collate_padded([x], 2)) for x in s)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("selective", [True, False])
def test_packed_and_padded_give_the_same_loss_and_gradients(method, selective):
    """The selective head (decoder + chunked loss) and the plain path, packed vs padded."""
    model = trained("tiny-llama", method)
    model.train()
    objective = SFTObjective(selective=selective)
    results = []
    for batch in (collate_padded(samples(), 2), packed_batch()):
        model.zero_grad()
        loss = objective.loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), objective.units(batch), grads))
    (l1, u1, g1), (l2, u2, g2) = results
    assert u1 == u2 == sum(x.supervised_token_count for x in samples())
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert g1 and all(g.abs().sum() > 0 for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_peft_forward_on_a_packed_row_would_mix_samples(method):
    """Why the packed path is ours: peft's forward on the same row (it knows 2D masks only, so
    it gets the position ids alone) gives the second sample other logits than it has alone."""
    model = trained("tiny-llama", method)
    b = packed_batch()
    n0 = len(samples()[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: position ids ignored for prompt tuning
        good = packed_forward(model, b)
        naive = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    naive = naive[:, -b["input_ids"].shape[1] :]  # prompt tuning: drop the row's one prompt
    assert (good[0, n0:] - naive[0, n0:]).abs().max() > 1e-2


def test_pack_rows_counts_each_samples_soft_prompt():
    s = samples() * 4
    rows = pack_rows(s, 40, seed=0, epoch=0, per_sample=6)
    assert sorted(i for r in rows for i in r) == list(range(len(s)))
    assert all(sum(len(s[i]) + 6 for i in r) <= 40 for r in rows)
    assert max(sum(len(s[i]) for i in r) for r in pack_rows(s, 40, seed=0, epoch=0)) > 34


@pytest.mark.parametrize("method", METHODS)
def test_train_with_packing_end_to_end(tmp_path, dates_rows, method):
    """Through train(): the first step's loss with packing equals the padded run's on the same
    samples (one packed row = the whole window), the adapter is saved and reloads, and greedy
    generation follows the packed training forward."""
    data = write_jsonl(tmp_path / "t.jsonl", dates_rows[:8])
    method_keys = {
        "prefix": {"method.prefix_projection": True, "method.encoder_hidden_size": 32},
        "prompt": {"method.prompt_init_text": "Convert the date", "training.learning_rate": 3e-2},
    }[method]
    first = {}
    for packing in (False, True):
        summary, lines = train_and_read_metrics(
            tmp_path,
            data,
            f"run-{packing}",
            **{
                "method.name": method,
                "method.num_virtual_tokens": 4,
                **method_keys,
                "data.packing": packing,
                "data.max_length": 1024,
                "training.batch_size": 8 if not packing else 1,
                "training.max_steps": 1 if not packing else 3,
            },
        )
        first[packing] = (lines[0]["loss"], lines[0]["tokens"])
        assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    assert summary["steps"] == 3 and summary["method"] == method
    assert first[True][1] == first[False][1]
    assert first[True][0] == pytest.approx(first[False][0], rel=1e-5)

    run = tmp_path / "run-True"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    model, tok = load_for_inference(str(run))
    convs = [[{"role": "user", "content": r["input"]}] for r in dates_rows[:2]]
    together = generate(model, tok, convs, max_new_tokens=5)  # one left-padded batch
    assert together == [generate(model, tok, [c], max_new_tokens=5)[0] for c in convs]

    prompts = [render_prompt(tok, c) for c in convs]  # what generate() feeds the model
    seqs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = generate_tokens(
            model, ids, torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=2
        )
        seqs.append(out[0].tolist())
    # Both generated sequences packed into one row: each greedy token is the argmax of the
    # packed training forward at the position before it.
    b = collate_packed([[Sample(x, x) for x in seqs]], pad_id=2)
    with torch.no_grad():
        logits = packed_forward(model, b)[0]
    start = 0
    for p, x in zip(prompts, seqs, strict=True):
        for i in range(len(p), len(x)):
            step = logits[start + i - 1]
            assert step[x[i]] >= step.max() - 1e-4, i
        start += len(x)


def test_row_cost_and_the_flash_refusal_for_prefix():
    """Prompt tuning counts its soft prompt per sample; prefix tuning costs no row space but is
    refused (one line, before training) with flash-attention's packed path, which has no mask."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.methods.virtual_packing import packed_row_cost

    base, tok = fresh("tiny-llama")
    prompt = apply_method(base, MethodConfig(**METHOD_CONFIGS["prompt"]), tok)
    assert packed_row_cost(prompt) == packed_row_cost(prompt, flash_varlen=True) == 3
    prefix = apply_method(fresh("tiny-llama")[0], MethodConfig(**METHOD_CONFIGS["prefix"]), tok)
    assert packed_row_cost(prefix) == 0
    with pytest.raises(TuneforgeError, match="needs training.attn_implementation: sdpa") as e:
        packed_row_cost(prefix, flash_varlen=True)
    assert "\n" not in str(e.value)
    lora = apply_method(fresh("tiny-llama")[0], MethodConfig(name="lora", r=4), tok)
    assert packed_row_cost(lora, flash_varlen=True) == 0

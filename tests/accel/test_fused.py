"""Fused RMSNorm, rotary and LoRA autograd functions (tuneforge/accel/fused.py) give the plain numbers."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from tuneforge.accel import fused
from tuneforge.accel.fused import fused_ops, rms_norm, rotary
from tuneforge.config import MethodConfig, TrainingConfig
from tuneforge.methods import apply_method
from tuneforge.models import load_model
from tuneforge.train.loop import Trainer
from tuneforge.train.sft import SFTObjective

from ..data.test_batching import make_samples

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])


def _grads(fn, *inputs, upstream):
    """fn's output and the gradients of (output * upstream).sum() w.r.t. inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    (out * upstream).sum().backward()
    return out.detach(), [x.grad for x in inputs]


def test_rms_norm_equals_llama_rmsnorm_values_and_gradients(kernel_path):
    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(96, eps=1e-5)
    x = torch.randn(3, 17, 96) * 3
    w = torch.randn(96)
    up = torch.randn(3, 17, 96)

    ref, (rdx, rdw) = _grads(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, True) + 1e-5)),
                             x, w, upstream=up)  # fmt: skip
    out, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-5), x, w, upstream=up)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)
    # and transformers' own module gives the reference numbers
    norm.weight = torch.nn.Parameter(w)
    torch.testing.assert_close(norm(x).detach(), ref)


def test_rotary_equals_apply_rotary_pos_emb_values_and_gradients():
    torch.manual_seed(1)
    B, T, H, Hkv, D = 2, 11, 6, 2, 16
    # q, k as the attention layer makes them: (B, T, H, D) projections viewed as (B, H, T, D)
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D).transpose(1, 2)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]] * B)  # packed: positions restart
    angles = pos[..., None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos(), emb.sin()
    uq, uk = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)

    def plain(q, k):
        a, b = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        return torch.cat([(a * uq).flatten(), (b * uk).flatten()])

    def fast(q, k):
        a, b = rotary(q, cos[:, None], sin[:, None]), rotary(k, cos[:, None], sin[:, None])
        return torch.cat([(a * uq).flatten(), (b * uk).flatten()])

    ref, (rq, rk) = _grads(plain, q, k, upstream=1)
    out, (dq, dk) = _grads(fast, q, k, upstream=1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(dk, rk)


def test_swiglu_equals_silu_times_up_values_and_gradients(kernel_path):
    torch.manual_seed(2)
    gate, up = torch.randn(3, 7, 40) * 3, torch.randn(3, 7, 40)
    upstream = torch.randn(3, 7, 40)
    ref, (rg, ru) = _grads(lambda g, u: F.silu(g) * u, gate, up, upstream=upstream)
    out, (dg, du) = _grads(fused.swiglu, gate, up, upstream=upstream)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dg, rg)
    torch.testing.assert_close(du, ru)


def _lora_model(name="lora", **method):
    torch.manual_seed(0)
    model, tok, _ = load_model("tiny-llama")
    model = apply_method(model, MethodConfig(name=name, **{**LORA, **method}))
    for n, p in model.named_parameters():  # B starts at zero: give it values to test
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model, tok


def _step(model, batch, fused_on: bool, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks
    with fused_ops(model, fused_on) as on:
        assert on == fused_on
        loss = SFTObjective().loss_sum(model, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dropout,trainable_base", [(0.0, False), (0.1, False), (0.1, True)])
def test_lora_model_step_equals_the_plain_step(dropout, trainable_base, monkeypatch, kernel_path):
    """The one-node LoRA layer (frozen base) and the composed one (a base weight that trains)."""
    from tuneforge.data.batching import collate_padded

    model, tok = _lora_model(lora_dropout=dropout)
    if trainable_base:
        model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.requires_grad_()
    model.train()
    batch = collate_padded(make_samples(4, seed=5), tok.pad_token_id)
    ref_loss, ref = _step(model, batch, False)
    with fused_ops(model):  # the behaviour checks run once per process, before the count
        pass
    nodes = []
    apply = fused._LoraLinear.apply
    monkeypatch.setattr(fused._LoraLinear, "apply", lambda *a: nodes.append(1) or apply(*a))
    loss, grads = _step(model, batch, True)
    assert len(nodes) == 2 * 5 - trainable_base  # every LoRA layer but the trainable base's
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # A and B, 5 modules, 2 layers (and the trained base weight)
    assert ref.keys() == grads.keys() and len(ref) == 2 * 5 * 2 + trainable_base
    for n in ref:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


def test_plain_code_comes_back_and_other_cases_keep_their_own_path():
    from peft.tuners.lora.layer import Linear as LoraLinear

    def current():
        return (
            modeling_llama.LlamaRMSNorm.forward,
            modeling_llama.LlamaMLP.forward,
            modeling_llama.apply_rotary_pos_emb,
            LoraLinear.forward,
        )

    before = current()
    model, tok = _lora_model("dora")
    ids = torch.tensor([make_samples(1, seed=7)[0].input_ids])
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            ref_off = model(input_ids=ids).logits
        with fused_ops(model) as on:
            assert on
            assert all(a is not b for a, b in zip(current(), before, strict=True))
            # DoRA layers keep peft's forward; the fused norm, MLP and rotary change rounding only
            out = model(input_ids=ids).logits
            with model.disable_adapter():
                out_off = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_off, ref_off, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, ref_off, rtol=1e-4, atol=1e-5)  # the adapter counts
    assert current() == before
    with fused_ops(model, enabled=False) as on:
        assert not on and current() == before


def test_autocast_keeps_working():
    model, tok = _lora_model()
    ids = torch.tensor([make_samples(1, seed=8)[0].input_ids])
    exact = model(input_ids=ids).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
        with fused_ops(model):
            out = model(input_ids=ids).logits
    out.float().sum().backward()  # LoRA layers under autocast take peft's path: no dtype clash
    # bf16 rounding either way: the fused run is as far from float32 as the plain one
    err, plain_err = (out.float() - exact).abs().mean(), (plain.float() - exact).abs().mean()
    assert 0 < err < 1.5 * plain_err


def test_unknown_families_are_left_alone():
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with fused_ops(Other()) as on:
        assert not on
    assert fused.family_module(load_model("tiny-qwen2")[0]) is not None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_trainer_runs_the_fused_path_with_the_plain_losses(
    tmp_path, name, monkeypatch, kernel_path
):
    calls = {"rms": 0, "rotary": 0, "swiglu": 0}
    real_rms, real_rotary = fused.rms_norm, fused.rotary

    def count(key, fn):
        def wrapped(*a):
            calls[key] += 1
            return fn(*a)

        return wrapped

    monkeypatch.setattr(fused, "rms_norm", count("rms", real_rms))
    monkeypatch.setattr(fused, "rotary", count("rotary", real_rotary))
    monkeypatch.setattr(fused, "swiglu", count("swiglu", fused.swiglu))
    samples = make_samples(12, seed=4)
    losses = {}
    for on in (False, True):
        torch.manual_seed(0)
        model, tok, _ = load_model(name)
        model = apply_method(model, MethodConfig(name="lora", lora_dropout=0.1, **{
            k: v for k, v in LORA.items()}))  # fmt: skip
        (tmp_path / str(on)).mkdir()
        t = TrainingConfig(max_steps=3, batch_size=2, progress=False, fused_ops=on)
        trainer = Trainer(
            model, SFTObjective(), samples, [], t, tmp_path / str(on), tok.pad_token_id,
            torch.device("cpu"), packing=True, max_length=96,
        )  # fmt: skip
        trainer.run()
        rows = [json.loads(r) for r in (tmp_path / str(on) / "metrics.jsonl").open()]
        losses[on] = [r["loss"] for r in rows if "loss" in r]
        assert all((n > 0) == on for n in calls.values()), calls
    assert len(losses[True]) == 3
    for a, b in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_builtin_model_packed_lora_step_equals_the_plain_step():
    """With the fused CPU kernels where they are built (the tiny-model tests cover both paths)."""
    from tuneforge.accel.attention import cu_seq_lens, register
    from tuneforge.data.batching import collate_packed
    from tuneforge.data.dataset import load_conversations
    from tuneforge.data.render import render_dataset

    from ..conftest import ROOT

    torch.manual_seed(0)
    model, tok, _ = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    model = apply_method(model, MethodConfig(name="lora", r=16, lora_alpha=32, lora_dropout=0.05,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))  # fmt: skip
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    convs, sources = load_conversations(str(ROOT / "examples/instruct/train.jsonl"))
    samples, _ = render_dataset(tok, convs[:4], sources[:4], 512)
    batch = collate_packed([samples], tok.pad_token_id, varlen=True)
    batch["cu_seq_lens_q"] = cu_seq_lens(batch["position_ids"])
    model.config._attn_implementation = register()
    model.train()
    try:
        ref_loss, ref = _step(model, batch, False)
        loss, grads = _step(model, batch, True)
    finally:
        model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert len(ref) == 30 * 4 * 2
    for n in ref:  # float rounding through 30 layers: compare each gradient as a whole
        assert ref[n].abs().sum() > 0, n
        assert (grads[n] - ref[n]).norm() <= 1e-4 * ref[n].norm(), n


def test_every_family_passes_the_behaviour_check():
    """The fused functions stand in for Llama's RMSNorm, MLP, rotary and peft's LoRA code; every
    family in FAMILIES must give the same numbers with the installed transformers and peft. A
    failure here (``make test-latest`` after an upgrade) means a family now runs its own code."""
    import importlib

    from transformers import AutoConfig

    for model_type, (module_name, *_) in fused.FAMILIES.items():
        module = importlib.import_module(module_name)
        config = AutoConfig.for_model(model_type)
        checks = {piece: ok for piece, *_, ok in fused.replacements(module, model_type, config)}
        assert checks == dict.fromkeys(checks, True) and len(checks) == 4, (model_type, checks)


def _interleaved_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J's rotary layout (pairs of neighbours, not halves): what a changed upstream function
    could compute. Llama's cos/sin repeat over halves, so this is a different function."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def test_kernelized_rotary_function_is_checked_by_behaviour(monkeypatch, capsys):
    """transformers 5.25 with ``kernels`` installed wraps apply_rotary_pos_emb in a kernelized
    ``Func`` (no source to compare). The same numbers: the fused rotary runs. A kernelized
    function that computes something else: the model's own code runs, with one warning line,
    and the logits are the plain ones (the fused rotary would have changed them)."""
    pytest.importorskip("kernels")
    from transformers.integrations import use_kernel_forward_from_hub

    calls = []
    real_rotary = fused.rotary
    monkeypatch.setattr(fused, "rotary", lambda *a: calls.append(1) or real_rotary(*a))
    monkeypatch.setattr(fused, "_warned", set())
    model, tok = _lora_model()
    model.eval()
    ids = torch.tensor([make_samples(1, seed=9)[0].input_ids])

    def logits(fused_on: bool) -> torch.Tensor:
        with torch.no_grad(), fused_ops(model, fused_on) as on:
            assert on == fused_on
            return model(input_ids=ids).logits

    # the installed code (a kernelized Func in transformers 5.25): it passes, the fused rotary runs
    torch.testing.assert_close(logits(True), logits(False), rtol=1e-4, atol=1e-5)
    assert calls and "warning" not in capsys.readouterr().err

    # a kernelized function that changed: fallback, one warning line, the model's own numbers
    changed = use_kernel_forward_from_hub("rotary_pos_emb")(_interleaved_rotary)
    assert type(changed).__name__ == "Func" and isinstance(changed, torch.nn.Module)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", changed)
    plain = logits(False)
    out = logits(True)  # the check runs here (and calls the fused rotary on its own inputs)
    calls.clear()
    again = logits(True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama's rotary embedding code" in err[0], err
    assert not calls  # the model did not run the fused rotary
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, plain, rtol=1e-4, atol=1e-5)
    assert modeling_llama.apply_rotary_pos_emb is changed  # restored after the blocks

    # what the check prevents: the fused rotary in place of the changed code
    monkeypatch.setattr(fused, "matches", lambda *a: True)
    wrong = logits(True)
    assert calls and not torch.allclose(wrong, plain, rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing_recomputes_the_same_fused_step():
    """Non-reentrant checkpointing replays each layer's forward in backward: SparseDropout's
    dropped positions must come out the same (torch restores the RNG state), so the gradients
    are those of the step without checkpointing."""
    from tuneforge.data.batching import collate_padded

    batch = None
    results = []
    for ckpt in (False, True):
        model, tok = _lora_model(lora_dropout=0.1)
        if ckpt:
            model.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        batch = batch or collate_padded(make_samples(4, seed=6), tok.pad_token_id)
        results.append(_step(model, batch, True))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)

"""The training loop: token-normalised accumulation, optimizer groups, schedule, early stopping."""

import json

import pytest
import torch

from tuneforge.config import TrainingConfig
from tuneforge.data.render import Sample
from tuneforge.methods import apply_method
from tuneforge.models import load_model
from tuneforge.train.loop import Trainer, build_optimizer, lr_lambda
from tuneforge.train.sft import SFTObjective

from ..conftest import tiny_config, write_jsonl


def variable_length_samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 5 + 3 * i  # lengths 5..26: very different supervised-token counts per sample
        ids = torch.randint(10, 1000, (T,), generator=g).tolist()
        prompt = T // 2
        out.append(Sample(ids, [-100] * prompt + ids[prompt:]))
    return out


def lora_tiny(method_cfg):
    torch.manual_seed(0)
    model, tok, _ = load_model("tiny-llama")
    return apply_method(model, method_cfg), tok


@pytest.mark.parametrize("selective", [True, False])
def test_accumulation_8x1_equals_1x8(tmp_path, selective):
    cfg = tiny_config(tmp_path, tmp_path / "unused.jsonl")
    samples = variable_length_samples()
    grads = []
    for bs, acc in ((8, 1), (1, 8)):
        model, tok = lora_tiny(cfg.method)
        t = TrainingConfig(batch_size=bs, gradient_accumulation=acc, max_steps=1, progress=False)
        trainer = Trainer(
            model,
            SFTObjective(selective=selective),
            samples,
            [],
            t,
            tmp_path,
            tok.pad_token_id,
            torch.device("cpu"),
        )
        assert sorted(sum(trainer.window(0), [])) == list(range(8))
        trainer.accumulate_gradients(0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_naive_per_batch_mean_would_differ(tmp_path):
    """Guard that the test above can fail: averaging per micro-batch means differs on this data."""
    samples = variable_length_samples()
    counts = [s.supervised_token_count for s in samples]
    assert len(set(counts)) > 1  # unequal token counts is what makes naive averaging wrong


def test_no_weight_decay_on_biases_and_norms():
    model, _, _ = load_model("tiny-llama")
    opt = build_optimizer(model, TrainingConfig(weight_decay=0.1))
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any("norm" in n for n in plain) and not any("norm" in n for n in decayed)
    assert any("q_proj.weight" in n for n in decayed)


def test_schedules():
    f = lr_lambda("cosine", 2, 10)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    g = lr_lambda("linear", 0, 10)
    assert g(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_early_stopping_keeps_best_weights(tmp_path, dates_rows):
    """A learning rate far too high makes eval loss rise after the first eval: training stops
    after `patience` bad evals and the saved adapter is the best one, not the last."""
    from safetensors.torch import load_file

    from tuneforge.train import train

    train_f = write_jsonl(tmp_path / "train.jsonl", dates_rows[:32])
    eval_f = write_jsonl(tmp_path / "eval.jsonl", dates_rows[32:40])
    cfg = tiny_config(
        tmp_path,
        train_f,
        eval_f,
        **{
            "training.max_steps": 40,
            "training.eval_steps": 2,
            "training.early_stopping_patience": 2,
            "training.learning_rate": 0.5,
            "training.max_grad_norm": 0,
            "training.lr_scheduler": "constant",
        },
    )
    summary = train(cfg)
    hist = summary["eval_history"]
    best_step, best_loss = min(hist, key=lambda x: x[1])
    assert summary["stopped_early"] and summary["steps"] < 40
    assert summary["best_step"] == best_step and summary["best_eval_loss"] == best_loss
    assert hist[-1][1] > best_loss  # it really got worse
    run = tmp_path / "run"
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    best = load_file(str(ckpt / "best.safetensors"))
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(best)
    for name, tensor in best.items():
        key = name.replace(".default", "")
        torch.testing.assert_close(saved[key], tensor)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, summary["steps"] + 1))


def test_gradient_checkpointing_gives_the_same_nonzero_lora_gradients(tmp_path):
    from tuneforge.train import prepare_for_speed

    cfg = tiny_config(tmp_path, tmp_path / "unused.jsonl")
    samples = variable_length_samples()
    grads = []
    for ckpt in (False, True):
        model, tok = lora_tiny(cfg.method)
        t = TrainingConfig(batch_size=8, max_steps=1, progress=False, gradient_checkpointing=ckpt)
        prepare_for_speed(model, t)
        assert model.get_base_model().is_gradient_checkpointing == ckpt
        trainer = Trainer(
            model, SFTObjective(), samples, [], t, tmp_path, tok.pad_token_id, torch.device("cpu")
        )
        trainer.accumulate_gradients(0)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    # every trainable parameter gets a gradient; lora_B starts at zero, so lora_A's grad is zero
    # at step 0 by construction; lora_B's must be non-zero.
    assert all(g is not None for g in grads[1].values())
    assert all(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_compile_gives_the_eager_losses_with_packing_and_fused_ops(tmp_path):
    """training.compile (torch.compile per decoder layer) traces through the fused autograd
    functions and the per-sample attention of packed rows: the same losses as eager. Compiling
    takes most of this test's time (about a minute on 2 cores)."""
    from tuneforge.train import prepare_for_speed

    cfg = tiny_config(tmp_path, tmp_path / "unused.jsonl")
    samples = variable_length_samples(6)
    losses = []
    for compile in (False, True):
        model, tok = lora_tiny(cfg.method)
        t = TrainingConfig(max_steps=2, batch_size=2, progress=False, compile=compile)
        prepare_for_speed(model, t)
        layers = model.get_base_model().get_decoder().layers
        assert all((layer._compiled_call_impl is not None) == compile for layer in layers)
        run_dir = tmp_path / f"compile-{compile}"
        run_dir.mkdir()
        trainer = Trainer(
            model, SFTObjective(), samples, [], t, run_dir, tok.pad_token_id,
            torch.device("cpu"), packing=True, max_length=64,
        )  # fmt: skip
        trainer.run()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)

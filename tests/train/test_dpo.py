"""DPO: per-pair accumulation, the reference model (adapter disabled / precomputed), metrics,
and crash + resume equal to an uninterrupted run."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import MethodConfig, TrainingConfig
from tuneforge.data.preference import collate_pairs, load_preferences, render_pairs
from tuneforge.methods import apply_method
from tuneforge.models import load_model
from tuneforge.train import train
from tuneforge.train.dpo import DPOObjective, precompute_reference_logps, sequence_logps
from tuneforge.train.loop import Trainer

from ..conftest import ROOT, tiny_config, write_jsonl

PREFS = ROOT / "examples" / "prefs"


def lora_tiny(seed=0):
    torch.manual_seed(seed)
    model, tok, _ = load_model("tiny-llama")
    cfg = MethodConfig(name="lora", r=4, lora_alpha=8, lora_dropout=0.0)
    model = apply_method(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so policy != reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, tok


def pairs(tok, n=8):
    prefs = load_preferences(str(PREFS / "train.jsonl"))[:n]
    return render_pairs(tok, prefs, 96)[0]


def test_accumulation_is_normalised_per_pair(tmp_path):
    """4 pairs x 1 micro-batch and 1 pair x 4 give the same gradient (pairs differ in length)."""
    grads = []
    start, tok = lora_tiny()
    for bs, acc in ((4, 1), (1, 4)):
        model = copy.deepcopy(start)
        data = pairs(tok, 4)
        t = TrainingConfig(batch_size=bs, gradient_accumulation=acc, max_steps=1, progress=False)
        trainer = Trainer(
            model, DPOObjective(0.1), data, [], t, tmp_path, tok.pad_token_id,
            torch.device("cpu"), collate=lambda p: collate_pairs(p, tok.pad_token_id),
        )  # fmt: skip
        out = trainer.accumulate_gradients(0)
        assert out["tokens"] == 4 and 0 <= out["metrics"]["rewards_accuracy"] <= 1
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_reference_is_the_adapter_disabled_model_and_precomputing_gives_the_same_numbers():
    model, tok = lora_tiny()
    data = pairs(tok, 4)
    batch = collate_pairs(data, tok.pad_token_id)
    objective = DPOObjective(0.1)
    on_the_fly = objective.reference_logps(model, batch)
    base, _, _ = load_model("tiny-llama")  # the same weights without any adapter
    with torch.no_grad():
        torch.testing.assert_close(on_the_fly, sequence_logps(base, batch))
        assert not torch.allclose(on_the_fly, sequence_logps(model, batch))  # adapter matters
    precompute_reference_logps(model, data, tok.pad_token_id, 3, torch.device("cpu"), True)
    batch = collate_pairs(data, tok.pad_token_id)
    torch.testing.assert_close(batch["reference_logps"], on_the_fly)
    loss_a, metrics_a = objective.loss_sum(model, batch)
    loss_b, metrics_b = objective.loss_sum(
        model, {k: v for k, v in batch.items() if k != "reference_logps"}
    )
    torch.testing.assert_close(loss_a, loss_b)
    assert metrics_a.keys() == {
        "logps_chosen",
        "logps_rejected",
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margin",
        "rewards_accuracy",
    }
    with torch.no_grad():  # the summed response log-probs, for the displacement warning
        chosen, rejected = sequence_logps(model, batch).chunk(2)
    torch.testing.assert_close(metrics_a["logps_chosen"], chosen.sum())
    torch.testing.assert_close(metrics_a["logps_rejected"], rejected.sum())


class Crash(Exception):
    pass


def test_crash_then_resume_equals_uninterrupted_full_fine_tuning(tmp_path, monkeypatch):
    """Crash inside step 3 (checkpoint at 2), resume: same weights bitwise, same log. With full
    fine-tuning the reference log-probs are precomputed, and must come from the starting
    weights, not the checkpoint's (LoRA resume is the SFT resume test's ground)."""
    rows = [json.loads(x) for x in (PREFS / "train.jsonl").read_text().splitlines()]
    train_f = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    eval_f = write_jsonl(tmp_path / "eval.jsonl", rows[8:10])

    def config(name):
        return tiny_config(
            tmp_path, train_f, eval_f,
            **{"output_dir": str(tmp_path / name), "training.objective": "dpo",
               "method.name": "full", "training.max_steps": 4,
               "training.save_steps": 2, "training.eval_steps": 2, "training.batch_size": 2,
               "training.warmup_ratio": 0.2},
        )  # fmt: skip

    train(config("clean"))
    original = Trainer.train_step

    def crashing(self, step):
        if step == 2:  # inside the third optimizer step
            raise Crash
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(Crash):
        train(config("killed"))
    monkeypatch.setattr(Trainer, "train_step", original)
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step-2"]
    summary = train(config("killed"), resume=True)
    assert summary["steps"] == 4 and "rewards_accuracy" in summary["best_eval_metrics"]
    weights = "model/model.safetensors"
    a = load_file(str(tmp_path / "clean" / weights))
    b = load_file(str(tmp_path / "killed" / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k

    def log(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]

    assert log("clean") == log("killed")
    assert {"rewards_margin", "rewards_accuracy"} <= log("clean")[0].keys()
    assert "eval_rewards_accuracy" in log("clean")[2]


def test_likelihood_displacement_warning_by_hand():
    """It needs a fall at each of the last 3 evals and more than 1 nat since the first."""
    from tuneforge.train.loop import displacement_warning

    assert displacement_warning([-10.0, -10.5, -11.0, -11.5]).startswith(
        "warning: the held-out chosen responses' log-prob fell at 3 evaluations in a row "
        "(-10.00 -> -11.50 per response)"
    )
    assert displacement_warning([-10.0, -10.5, -11.0]) is None  # too few evaluations
    assert displacement_warning([-10.0, -10.2, -10.4, -10.6]) is None  # 0.6 nats only
    assert displacement_warning([-10.0, -11.0, -12.0, -11.9, -13.0]) is None  # rose once

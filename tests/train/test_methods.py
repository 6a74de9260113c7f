"""Every method through the one training path: train -> checkpoints -> run folder -> generate ->
merge (or a one-line refusal); exact resume for methods other than LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.errors import TuneforgeError
from tuneforge.infer.export import merge
from tuneforge.infer.generate import generate
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import loop, train

from ..conftest import tiny_config, write_jsonl
from ..methods.test_methods import batch, fresh, logits_of

METHODS = {
    "dora": {"method.name": "dora"},
    "ia3": {"method.name": "ia3", "training.learning_rate": 3e-2},
    "prompt": {
        "method.name": "prompt",
        "method.num_virtual_tokens": 4,
        "method.prompt_init_text": "Convert the date",
        "training.learning_rate": 3e-2,
    },
    "adapter": {"method.name": "adapter", "method.bottleneck_size": 8},
    "prefix": {
        "method.name": "prefix",
        "method.num_virtual_tokens": 4,
        "method.prefix_projection": True,
        "method.encoder_hidden_size": 32,
    },
}


def config(tmp_path, dates_rows, method, name="run", **extra):
    train_file = write_jsonl(tmp_path / "train.jsonl", dates_rows[:24])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", dates_rows[24:30])
    return tiny_config(
        tmp_path,
        train_file,
        eval_file,
        **{"output_dir": str(tmp_path / name), **METHODS[method], **extra},
    )


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt"])
def test_train_generate_and_merge(tmp_path, dates_rows, method, capsys):
    cfg = config(tmp_path, dates_rows, method, **{"training.max_steps": 3})
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 3 and summary["method"] == method
    assert (run / "checkpoints" / "step-3" / "trainable.safetensors").is_file()
    model, tok = load_for_inference(str(run))
    T = batch()["input_ids"].shape[1]  # prompt tuning adds logits for its virtual tokens first
    base = logits_of(fresh("tiny-llama")[0], batch())
    assert (logits_of(model, batch())[:, -T:] - base).abs().max() > 1e-4
    convs = [[{"role": "user", "content": r["input"]}] for r in dates_rows[:3]]
    together = generate(model, tok, convs, max_new_tokens=5)  # one left-padded batch
    alone = [generate(model, tok, [c], max_new_tokens=5)[0] for c in convs]
    assert together == alone
    if method == "prompt":
        with pytest.raises(TuneforgeError, match="a prompt adapter cannot be merged"):
            merge(run, tmp_path / "merged")
        capsys.readouterr()
        assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: a prompt adapter cannot be merged")
        assert not (tmp_path / "merged").exists()
        return
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merge(run, tmp_path / "merged"))
    torch.testing.assert_close(
        logits_of(merged, batch()), logits_of(model, batch()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_interrupted_then_resumed_run_is_bitwise_equal(tmp_path, dates_rows, method, monkeypatch):
    """The process state is lost at the interruption; only the checkpoint carries on."""
    extra = {
        "training.max_steps": 4,
        "training.eval_steps": 2,
        "training.save_steps": 2,
        "training.warmup_ratio": 0.2,
        "training.seed": 7,
    }
    clean = config(tmp_path, dates_rows, method, "clean", **extra)
    train(clean)

    real_step = loop.Trainer.train_step

    def crash_at_step_3(self, step):
        if step == 2:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(self, step)

    cut = config(tmp_path, dates_rows, method, "cut", **extra)
    monkeypatch.setattr(loop.Trainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    assert not (tmp_path / "cut" / "adapter").exists()
    train(cut, resume=True)

    a = load_file(str(tmp_path / "clean" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].equal(b[k]), k

    def metrics(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]

    assert metrics("clean") == metrics("cut") and len(metrics("clean")) == 6  # 4 steps + 2 evals

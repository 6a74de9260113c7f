"""Every method with every objective through the one run skeleton (train/run.py), on tiny-llama,
2 steps each, ``training.report_to: tensorboard``: each cell trains, saves, reloads and writes
TensorBoard curves, or is refused before anything is written with one line naming the
combination. ``MATRIX`` is the table docs/methods.md shows (scripts/update_readme.py)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from tuneforge.errors import TuneforgeError

from ..conftest import ROOT, tiny_config, write_jsonl

METHODS = ("full", "lora", "qlora", "dora", "ia3", "adapter", "prefix", "prompt")
OBJECTIVES = ("sft", "reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo")
# (method, objective) -> the start of its one-line refusal; every other cell trains
REFUSED: dict[tuple[str, str], str] = {}
MATRIX = {(m, o): REFUSED.get((m, o), "trains") for m in METHODS for o in OBJECTIVES}

PREFS = [json.loads(x) for x in (ROOT / "examples/prefs/train.jsonl").read_text().splitlines()]


def _config(tmp_path, method: str, objective: str):
    if objective == "sft":
        rows = [{"instruction": p["prompt"], "output": p["chosen"]} for p in PREFS[:16]]
    elif objective == "kto":  # one labelled completion per record, half of them undesirable
        rows = [
            {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": i % 2 == 1}
            for i, p in enumerate(PREFS[:16])
        ]  # fmt: skip
    elif objective == "grpo":  # prompts with a field the reward reads
        rows = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in PREFS[:16]]
    else:
        rows = PREFS[:16]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:12])
    held = write_jsonl(tmp_path / "eval.jsonl", rows[12:16] if objective != "sft" else rows[:4])
    overrides = {
        "data.eval": str(held),
        "data.max_length": 64,
        "method.name": method,
        "training.objective": objective,
        "training.max_steps": 2,
        "training.batch_size": 2,
        "training.report_to": "tensorboard",
    }
    if method in ("prefix", "prompt"):
        overrides["method.num_virtual_tokens"] = 4
    if objective == "ppo":  # a reward that varies, so the policy gradient is not zero
        reward = tmp_path / "reward.py"
        reward.write_text(
            "def score(prompts, responses):\n    return [len(r) / 8 for r in responses]\n"
        )
        overrides.update(
            {
                "training.reward_function": f"{reward}:score",
                "training.rollout_batch_size": 2,
                "training.response_length": 4,
                "training.gradient_accumulation": 1,
            }
        )
    if objective == "grpo":
        reward = tmp_path / "reward.py"
        reward.write_text(
            "def score(prompts, completions, answer):\n"
            "    return [len(c) / 8 for c in completions]\n"
        )
        overrides.update(
            {
                "training.reward_functions": f"[exact_match,'{reward}:score']",
                "training.rollout_batch_size": 1,
                "training.num_generations": 2,
                "training.response_length": 4,
                "training.beta": 0.04,
            }
        )
    return tiny_config(tmp_path, train, **overrides)


PROBE = "What is 2 plus 3?"


@functools.cache
def _base_logits() -> torch.Tensor:
    """tiny-llama's logits on PROBE (its weights are fixed by its seed), once per process."""
    from tuneforge.models import load_model

    base, tok, _ = load_model("tiny-llama")
    with torch.no_grad():
        return base(input_ids=torch.tensor([tok(PROBE)["input_ids"]])).logits


def _scalars(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_every_objective(tmp_path, method, objective):
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train import train

    cfg = _config(tmp_path, method, objective)
    run_dir = tmp_path / "run"
    if MATRIX[method, objective] != "trains":
        with pytest.raises(TuneforgeError) as e:
            train(cfg)
        assert str(e.value).startswith(REFUSED[method, objective]) and "\n" not in str(e.value)
        assert not run_dir.exists()
        return
    summary = train(cfg)
    assert (summary["objective"], summary["method"], summary["steps"]) == (objective, method, 2)
    saved = run_dir / ("model" if method == "full" else "adapter")
    assert saved.is_dir() and (run_dir / "summary.json").is_file()
    tags = _scalars(run_dir)  # report_to: tensorboard honoured
    curve = {"ppo": "train/reward", "grpo": "train/reward"}.get(objective, "train/loss")
    assert curve in tags and "train/learning_rate" in tags, tags
    evals = {"ppo": "eval/reward", "grpo": "eval/reward"}
    assert evals.get(objective, "eval/loss") in tags, tags

    # reload what was saved: the model differs from the base it started from
    model, tok = load_for_inference(str(run_dir))
    ids = torch.tensor([tok(PROBE)["input_ids"]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert torch.isfinite(trained).all()
    assert not torch.equal(trained, _base_logits()), "the saved weights are the base's"
    if objective == "reward":
        assert (run_dir / "reward_head.safetensors").is_file()
    if objective == "ppo":
        assert (run_dir / "value_head.safetensors").is_file()


@pytest.mark.parametrize(
    "objective,key,value",
    [
        ("dpo", "data.augment", 2),
        ("reward", "data.packing", "true"),
        ("ppo", "data.clean", "true"),
        ("kto", "data.clean", "true"),
        ("grpo", "data.packing", "true"),
    ],
)
def test_settings_that_cannot_apply_are_refused_in_one_line(tmp_path, objective, key, value):
    from tuneforge.config import DATA_STEPS

    train = write_jsonl(tmp_path / "train.jsonl", PREFS[:4])
    with pytest.raises(TuneforgeError) as e:
        tiny_config(tmp_path, train, **{"training.objective": objective, key: value})
    objectives = " and ".join(DATA_STEPS[key.split(".")[1]][0])
    assert f"'{key}' applies to objective {objectives} only" in str(e.value)
    assert f"for {objective}" in str(e.value) and "\n" not in str(e.value)


def test_preference_pairs_go_through_clean_dedup_and_mix(tmp_path, tokenizer):
    """The data steps SFT has apply to pairs: dedup drops the repeats, clean normalises and
    drops the unusable, mix adds another preference file's pairs."""
    from tuneforge.config import DataConfig
    from tuneforge.data.preference import prepare_preference_data
    from tuneforge.datatools.mix import parse_mix_config

    messy = dict(PREFS[1], chosen="  " + PREFS[1]["chosen"] + "\u200b  ")
    rows = PREFS[:10] + PREFS[:3] + [messy]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    other = write_jsonl(tmp_path / "other.jsonl", PREFS[20:40])
    plain = prepare_preference_data(DataConfig(train=str(train), max_length=96), tokenizer, 0)
    assert len(plain.train) == 14
    broken = write_jsonl(tmp_path / "broken.jsonl", rows + [dict(PREFS[2], chosen="")])
    with pytest.raises(TuneforgeError, match="'chosen' is empty"):
        prepare_preference_data(DataConfig(train=str(broken), max_length=96), tokenizer, 0)
    steps = DataConfig(train=str(broken), max_length=96, clean=True, dedup=True)
    steps.mix = parse_mix_config([{"path": str(other), "ratio": 0.5}])
    cleaned = prepare_preference_data(steps, tokenizer, 0)
    sources = [p.source for p in cleaned.train]
    # the 3 repeats, the messy copy (identical once cleaned) and the empty answer are gone
    assert sum(s.startswith(str(broken)) for s in sources) == 10
    assert sum(s.startswith(str(other)) for s in sources) == 10  # mixed in: half of the pairs

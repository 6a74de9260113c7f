"""The guards at each evaluation of a preference run (train/guards.py): what they log, that they
measure what ``tuneforge eval`` measures, that they leave training alone, their warnings, and
``training.max_kl``."""

import json

import pytest
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train import train

from ..conftest import ROOT, assert_same_lora_update, tiny_config, write_jsonl

PREFS = [json.loads(x) for x in (ROOT / "examples/prefs/train.jsonl").read_text().splitlines()]
ADAPTER = "adapter/adapter_model.safetensors"


def dpo_config(tmp_path, name, **overrides):
    train_f = write_jsonl(tmp_path / "train.jsonl", PREFS[:8])
    eval_f = write_jsonl(tmp_path / "eval.jsonl", PREFS[8:14])
    return tiny_config(
        tmp_path, train_f, eval_f,
        **{"output_dir": str(tmp_path / name), "training.objective": "dpo",
           "training.batch_size": 2, "training.max_steps": 4, "training.eval_steps": 2,
           "training.guard_max_new_tokens": 12, "training.learning_rate": 5e-3, **overrides},
    )  # fmt: skip


def eval_records(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def test_guard_measures_go_into_each_eval_record_and_leave_training_alone(tmp_path):
    """Each eval record has the guard's KL and degeneration measures; a run with the guards off
    ends with the same adapter bitwise (the guard's generation uses no random numbers and puts
    the model back in training mode)."""
    train(dpo_config(tmp_path, "on"))
    train(dpo_config(tmp_path, "off", **{"training.guard_prompts": 0}))
    on, off = eval_records(tmp_path / "on"), eval_records(tmp_path / "off")
    assert [r["step"] for r in on] == [2, 4]
    for r in on:
        assert {"eval_guard_kl", "eval_guard_repetitive", "eval_guard_off_script",
                "eval_guard_unfinished", "eval_guard_mean_tokens"} <= r.keys()  # fmt: skip
        assert r["eval_guard_kl"] > 1e-3  # the adapter moved the model
    assert not any(k.startswith("eval_guard") for r in off for k in r)
    a, b = (load_file(str(tmp_path / n / ADAPTER)) for n in ("on", "off"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_guard_measures_equal_tuneforge_eval_on_the_saved_model(tmp_path, tokenizer):
    """The last eval's guard measures, taken inside the training loop (its fused ops and
    attention on), equal the same measures of the saved run computed afterwards as
    ``tuneforge eval`` computes them: the answers of the fine-tuned model, their degeneration
    and the KL to the model with the adapter off on answers sampled with the same seed."""
    from tuneforge.eval.degeneration import degeneration, kl_to_start
    from tuneforge.infer.generate import generate
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.train.guards import guard_prompts

    cfg = dpo_config(tmp_path, "run", **{"training.eval_steps": 0, "training.num_epochs": 1,
                                         "training.max_steps": 0})  # fmt: skip
    train(cfg)
    last = eval_records(tmp_path / "run")[-1]
    from tuneforge.data.preference import prepare_preference_data

    data = prepare_preference_data(cfg.data, tokenizer, cfg.training.seed)
    prompts = guard_prompts(data.eval, cfg.training.guard_prompts)
    assert len(prompts) == 6
    tuned, tok = load_for_inference(str(tmp_path / "run"), adapter=True)
    base, _ = load_for_inference(str(tmp_path / "run"), adapter=False)
    answers = generate(tuned, tok, prompts, max_new_tokens=12)
    d = degeneration(prompts, answers, tok, 12)
    for key in ("repetitive", "off_script", "unfinished", "mean_tokens"):
        assert last[f"eval_guard_{key}"] == pytest.approx(getattr(d, key), abs=1e-6), key
    kl = kl_to_start(tuned, base, tok, prompts, 12, seed=cfg.training.seed)
    assert kl > 1e-3
    assert last["eval_guard_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)


def test_max_kl_stops_and_keeps_the_last_weights_within_it(tmp_path, capfd):
    """A limit the first evaluation passes: the run stops there and keeps the starting weights
    (lora_B zero), saying so in one line. A limit no evaluation reaches: the run goes to the end,
    and its adapter equals the run's without the limit."""
    summary = train(dpo_config(tmp_path, "tight", **{"training.max_kl": 1e-6}))
    out = "".join(capfd.readouterr())
    line = next(x for x in out.splitlines() if x.startswith("stopping:"))
    assert "passed training.max_kl (1e-06) at step 2; keeping the weights of the start" in line
    assert summary["steps"] == 2 and summary["stopped_early"] and summary["best_step"] is None
    tight = load_file(str(tmp_path / "tight" / ADAPTER))
    assert all(float(v.abs().max()) == 0 for k, v in tight.items() if "lora_B" in k)

    loose = train(dpo_config(tmp_path, "loose", **{"training.max_kl": 1e6}))
    assert loose["steps"] == 4 and not loose["stopped_early"]
    train(dpo_config(tmp_path, "none"))
    assert_same_lora_update(
        load_file(str(tmp_path / "loose" / ADAPTER)), load_file(str(tmp_path / "none" / ADAPTER))
    )


def test_max_kl_after_a_good_evaluation_keeps_that_evaluation_s_weights(tmp_path, capfd):
    """The limit is set between the first and second evaluation's KL (measured by a run without
    it): the run stops at the second and keeps the first's weights, those of a run cut there."""
    train(dpo_config(tmp_path, "free", **{"training.max_steps": 6}))
    kls = [r["eval_guard_kl"] for r in eval_records(tmp_path / "free")]
    assert kls[0] < kls[1], kls  # the KL grows as training goes on
    limit = (kls[0] + kls[1]) / 2
    summary = train(
        dpo_config(tmp_path, "cut", **{"training.max_kl": limit, "training.max_steps": 6})
    )
    assert "keeping the weights of step 2" in "".join(capfd.readouterr())
    assert summary["steps"] == 4 and summary["best_step"] == 2
    # the eval at step 4 was not eligible, whatever its loss
    assert [r["best_step"] for r in eval_records(tmp_path / "cut")] == [2, 2]


def test_guard_warns_once_when_a_measure_crosses_its_limit(tmp_path, tokenizer):
    """Readings over the start by more than LIMITS give one line per measure, once a run; a rise
    within the limit gives none."""
    from tuneforge.eval.degeneration import LIMITS
    from tuneforge.methods import apply_method
    from tuneforge.models import load_model
    from tuneforge.train.guards import GenerationGuard

    cfg = dpo_config(tmp_path, "run")
    lm, tok, _ = load_model("tiny-llama")
    model = apply_method(lm, cfg.method, tok)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in PREFS[:4]]
    guard = GenerationGuard(model, tok, prompts, 8, None, True, "lower training.learning_rate")
    readings = guard.measure()
    assert readings["guard_kl"] == 0.0  # a fresh LoRA adapter is the starting model
    assert guard.warnings(1, readings) == []
    start = guard.start["repetitive"]
    within = {**readings, "guard_repetitive": start + LIMITS["repetitive"] - 0.01}
    assert guard.warnings(2, within) == []
    over = {**readings, "guard_repetitive": start + LIMITS["repetitive"] + 0.15}
    (line,) = guard.warnings(3, over)
    assert (
        line.startswith("warning: at step 3,") and "of 4 held-out answers repeat themselves" in line
    )
    assert "lower training.learning_rate" in line and "\n" not in line
    assert guard.warnings(4, over) == []  # once


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.max_kl=0"], "'training.max_kl' must be positive"),
        (["training.max_kl=5", "training.guard_prompts=0"], "set training.guard_prompts above 0"),
        (["training.max_kl=5", "method.name=full"], "needs an adapter method"),
        (["training.max_kl=5", "data.eval=null"], "needs eval data"),
        (["training.guard_prompts=-1"], "must be >= 0"),
        (["training.objective=sft", "training.guard_prompts=4"], "'training.guard_prompts' applies to objective dpo, orpo, simpo, kto only"),
        (["training.objective=grpo", "training.max_kl=5", "training.reward_functions=[json_valid]"], "'training.max_kl' applies to objective"),
    ],
)  # fmt: skip
def test_bad_guard_settings_are_one_line(overrides, message):
    base = ["model=tiny-llama", "output_dir=o", "data.train=t.jsonl", "data.eval=e.jsonl"]
    with pytest.raises(TuneforgeError) as e:
        load_config(None, [*base, "training.objective=dpo", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)

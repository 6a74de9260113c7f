"""ORPO, SimPO and KTO through the run: gradient accumulation, KTO's records and mismatched
pairs, the settings each objective reads (and refuses for the others)."""

import json

import pytest
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.train import train

from ..conftest import ROOT, assert_same_lora_update, run_cli, tiny_config, write_jsonl

PREFS = [json.loads(x) for x in (ROOT / "examples/prefs/train.jsonl").read_text().splitlines()]


def kto_rows(n: int) -> list[dict]:
    return [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": i % 2 == 1}
        for i, p in enumerate(PREFS[:n])
    ]  # fmt: skip


@pytest.mark.parametrize("objective", ["orpo", "simpo", "dpo"])
def test_gradient_accumulation_4x1_equals_1x4(tmp_path, objective):
    """The pair term is a mean over the step's pairs and the NLL term (ORPO; SimPO with
    cpo_alpha; DPO with rpo_alpha) a mean over the step's chosen tokens: 4 pairs in one
    micro-batch or in four give the same update, although the pairs' lengths differ."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PREFS[:4])
    runs = {}
    for name, bs, acc in (("one", 4, 1), ("four", 1, 4)):
        extra = {"simpo": {"training.cpo_alpha": 0.5}, "dpo": {"training.rpo_alpha": 0.5}}
        cfg = tiny_config(
            tmp_path,
            data,
            **{
                "output_dir": str(tmp_path / name),
                "training.objective": objective,
                "training.batch_size": bs,
                "training.gradient_accumulation": acc,
                "training.max_steps": 1,
                "data.max_length": 96,
                **extra.get(objective, {}),
            },
        )
        train(cfg)
        runs[name] = load_file(str(tmp_path / name / "adapter/adapter_model.safetensors"))
    assert_same_lora_update(runs["one"], runs["four"])


def test_kto_pairs_each_prompt_with_the_previous_completion(tokenizer):
    """TRL's KTO reference point: prompt i with the completion of example i - 1 (the first with
    the last), labels on that completion only."""
    from tuneforge.data.io import Record
    from tuneforge.data.labelled import collate_labelled, render_labelled, to_labelled

    items = [to_labelled(Record(r, f"f:{i}")) for i, r in enumerate(kto_rows(3))]
    samples, stats = render_labelled(tokenizer, items, 512)
    assert stats.rendered == 3
    batch = collate_labelled(samples, tokenizer.pad_token_id, 512)
    assert batch["input_ids"].shape[0] == 6
    assert batch["desirable"].tolist() == [False, True, False]
    for i in range(3):
        x, other = samples[i], samples[i - 1]
        row = batch["input_ids"][3 + i][batch["attention_mask"][3 + i].bool()].tolist()
        assert (
            row
            == x.sample.input_ids[: x.prompt_length] + other.sample.input_ids[other.prompt_length :]
        )
        labels = batch["labels"][3 + i]
        assert (labels[: x.prompt_length] == -100).all()
        completion = other.sample.labels[other.prompt_length :]
        assert labels[x.prompt_length : x.prompt_length + len(completion)].tolist() == completion


def test_kto_with_full_fine_tuning_keeps_the_starting_weights_as_reference(tmp_path):
    """Full fine-tuning has no adapter to disable: the reference is a frozen copy of the start,
    so KL and the implicit rewards start at 0 and move once the policy has."""
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(8))
    cfg = tiny_config(
        tmp_path,
        data,
        **{"training.objective": "kto", "method.name": "full", "training.max_steps": 3,
           "training.batch_size": 4, "training.learning_rate": 1e-3, "data.max_length": 96},
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards"] == 0.0 and rows[0]["loss"] == pytest.approx(0.5)
    assert rows[-1]["rewards"] != 0.0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "completion": "a", "label": "yes"}, "'label' must be true"),
        ({"prompt": "q", "completion": "a"}, "'label' must be true (a desirable completion) or false (an undesirable one), got missing"),
        ({"prompt": "q", "label": True}, "'completion' is missing"),
        ({"completion": "a", "label": False}, "'prompt' is missing"),
    ],
)  # fmt: skip
def test_bad_kto_records_are_one_line_with_exit_2(tmp_path, row, message):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(3) + [row])
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"model: tiny-llama\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: {data}\n"
        "training:\n  objective: kto\n"
    )
    r = run_cli("train", str(config))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}:4: ") and message in last, last
    assert not (tmp_path / "run").exists()


def _load(*overrides):
    base = ["model=tiny-llama", "output_dir=o", "data.train=t.jsonl", *overrides]
    return load_config(None, base)


def test_unset_beta_and_loss_type_take_each_objective_default():
    expected = {
        "dpo": (0.1, "sigmoid"),
        "orpo": (0.1, None),
        "simpo": (2.0, None),
        "kto": (0.1, None),
        "grpo": (0.0, "dapo"),
        "sft": (None, None),
    }
    for objective, (beta, loss_type) in expected.items():
        extra = ["training.reward_functions=[json_valid]"] if objective == "grpo" else []
        t = _load(f"training.objective={objective}", *extra).training
        assert (t.beta, t.loss_type) == (beta, loss_type), objective


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.objective=dpo", "training.simpo_gamma=1.0"], "'training.simpo_gamma' applies to objective simpo only"),
        (["training.objective=sft", "training.beta=0.2"], "'training.beta' applies to objective dpo"),
        (["training.objective=orpo", "training.loss_type=ipo"], "'training.loss_type' applies to objective dpo, grpo only"),
        (["training.objective=dpo", "training.loss_type=dapo"], "choose one of sigmoid, ipo, hinge"),
        (["training.objective=kto", "training.batch_size=1"], "must be at least 2 for kto"),
        (["training.objective=kto", "training.desirable_weight=0"], "must be positive"),
        (["training.objective=simpo", "training.beta=0"], "'training.beta' must be positive"),
        (["training.objective=grpo", "training.num_generations=1", "training.reward_functions=[json_valid]"], "must be at least 2 (a group)"),
    ],
)  # fmt: skip
def test_settings_an_objective_does_not_read_are_refused(overrides, message):
    with pytest.raises(TuneforgeError) as e:
        _load(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_kto_reads_a_preference_pair_as_two_examples(tmp_path, tokenizer):
    from tuneforge.config import DataConfig
    from tuneforge.data.labelled import prepare_labelled_data

    data = write_jsonl(tmp_path / "mixed.jsonl", PREFS[:3] + kto_rows(2))
    prepared = prepare_labelled_data(DataConfig(train=str(data), max_length=128), tokenizer, 0)
    assert [x.desirable for x in prepared.train] == [True, False] * 3 + [False, True]
    chosen = tokenizer.decode(prepared.train[0].sample.input_ids[prepared.train[0].prompt_length :])
    assert PREFS[0]["chosen"] in chosen

"""GRPO: reward functions (built-ins, the user's, their fields and failures), gradient
accumulation, SIGKILL + resume, and the records and settings it refuses in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.errors import TuneforgeError
from tuneforge.train import train
from tuneforge.train.reward_functions import combine, load_rewards, score_all

from ..conftest import ROOT, assert_same_lora_update, run_cli, tiny_config, write_jsonl

DATES = [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]
# a reward that varies on tiny-llama's random text (the exact-match one never fires there), and
# checks what it is given: the prompts as the records gave them, the 'answer' field aligned
RULE = """
def score(prompts, completions, answer, **fields):
    assert len(prompts) == len(completions) == len(answer), (len(prompts), len(answer))
    assert all(isinstance(p, str) and a.count("-") == 2 for p, a in zip(prompts, answer))
    return [len(c) % 7 / 7 for c in completions]
"""


def prompt_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"{d['instruction']}\n{d['input']}", "answer": d["output"]} for d in DATES[:n]
    ]


def grpo_config(tmp_path, name="run", **overrides):
    rule = tmp_path / "rule.py"
    rule.write_text(RULE)
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    base = {
        "output_dir": str(tmp_path / name),
        "training.objective": "grpo",
        "training.reward_functions": f"[exact_match,'{rule}:score']",
        "training.reward_weights": "[1.0,0.5]",
        "training.rollout_batch_size": 2,
        "training.num_generations": 4,
        "training.batch_size": 4,
        "training.response_length": 6,
        "training.max_steps": 2,
        "data.max_length": 96,
    }
    return tiny_config(tmp_path, data, **{**base, **overrides})


# -- reward functions ------------------------------------------------------------------------------
def test_builtin_rewards_by_hand():
    rewards = load_rewards(
        ["exact_match", "exact_match:label", "regex:\\d{4}-\\d\\d-\\d\\d", "json_valid", "length"],
        response_length=10,
    )
    completions = [" 2029-01-29 ", "2029-1-29", '{"a": 1}']
    fields = {"answer": ["2029-01-29", "x", '{"A": 1}'], "label": ["no", "2029-1-29", "{}"]}
    got = score_all(rewards, ["p"] * 3, completions, fields, completion_tokens=[4, 10, 20])
    expected = torch.tensor(
        [
            # exact_match is eval's: whitespace trimmed and collapsed, case kept ('a' != 'A')
            [1.0, 0.0, 1.0, 0.0, -0.4],
            [0.0, 1.0, 0.0, 0.0, -1.0],  # regex must match the whole completion
            [0.0, 0.0, 0.0, 1.0, -1.0],  # length: minus the share of response_length, capped
        ]
    )
    torch.testing.assert_close(got, expected)


def test_none_counts_as_zero_and_a_completion_nothing_scores_is_nan():
    per_function = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.5, 2.0]])
    total = combine(per_function, [1.0, 0.5])
    assert total[0] == 1.0 and total[1].isnan() and total[2] == 1.5


def test_a_reward_function_that_fails_is_named_in_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def text(prompts, completions, **kw):\n    return ['high'] * len(completions)\n"
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
    )
    cases = {
        "short": "returned 1 values for 2 completions",
        "text": "must return a list of numbers",
        "boom": "raised KeyError: 'answer'",
    }
    for name, message in cases.items():
        rewards = load_rewards([f"{bad}:{name}"], 8)
        with pytest.raises(TuneforgeError) as e:
            score_all(rewards, ["p", "q"], ["a", "b"], {}, [1, 1])
        assert str(e.value).startswith(f"reward function {bad}:{name} ") and message in str(e.value)
    with pytest.raises(TuneforgeError, match="have no 'answer' field"):
        score_all(load_rewards(["exact_match"], 8), ["p"], ["a"], {"gold": ["a"]}, [1])


def test_a_reward_function_failing_mid_run_exits_2_and_keeps_the_checkpoint(tmp_path):
    """The function fails on its third call (the rollout of step 3): one line naming it, exit
    status 2, the checkpoints of steps 1 and 2 kept, no final adapter."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "calls = []\n"
        "def score(prompts, completions, **fields):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        raise ValueError('the checker is down')\n"
        "    return [len(c) % 5 for c in completions]\n"
    )
    cfg = grpo_config(tmp_path, **{"training.max_steps": 4, "training.save_steps": 1})
    import yaml

    from tuneforge.config import to_dict

    doc = to_dict(cfg)
    doc["training"].update(reward_functions=[f"{flaky}:score"], reward_weights=[])
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = run_cli("train", str(path))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: reward function {flaky}:score raised ValueError: the checker is down"
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (run / "adapter").exists()


# -- the run ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_4x1_equals_1x4(tmp_path, loss_type):
    """Same rollout (it does not depend on the micro-batching), same mini-batch of 4 completions:
    one micro-batch of 4 and four of 1 give the same update."""
    runs = {}
    for name, bs, acc in (("one", 4, 1), ("four", 1, 4)):
        cfg = grpo_config(
            tmp_path,
            name,
            **{
                "training.batch_size": bs,
                "training.gradient_accumulation": acc,
                "training.max_steps": 1,
                "training.loss_type": loss_type,
                "training.beta": 0.04,
                "training.num_iterations": 2,
            },
        )
        train(cfg)
        runs[name] = load_file(str(tmp_path / name / "adapter/adapter_model.safetensors"))
    assert_same_lora_update(runs["one"], runs["four"])


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    """Killed after step 2 of 3 (SIGKILL), resumed from the step-2 checkpoint: the adapter and
    every metrics line equal those of the uninterrupted run (sampling, dropout, KL, two passes
    over each rollout)."""
    import yaml

    from tuneforge.config import to_dict

    paths = {}
    for name in ("clean", "killed"):
        cfg = grpo_config(
            tmp_path,
            name,
            **{
                "training.max_steps": 3,
                "training.save_steps": 1,
                "training.batch_size": 2,
                "training.beta": 0.04,
                "training.num_iterations": 2,
                "method.lora_dropout": 0.1,
            },
        )
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(to_dict(cfg)))
    assert run_cli("train", str(paths["clean"])).returncode == 0
    r = run_cli("train", str(paths["killed"]), env={"TUNEFORGE_FAULT_KILL_AT_STEP": "3"})
    assert r.returncode == -9, r.stderr
    assert sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir()) == [
        "step-1",
        "step-2",
    ]
    r = run_cli("train", str(paths["killed"]), "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "clean/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    def log(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    clean = log("clean")
    assert clean == log("killed") and [x["step"] for x in clean] == [1, 2, 3]
    keys = {"reward", "reward_std", "frac_reward_zero_std", "completion_length", "clip_fraction"}
    assert keys | {"kl", f"rewards/{tmp_path / 'rule.py'}:score/mean"} <= clean[0].keys()


# -- what is refused -------------------------------------------------------------------------------
def test_a_record_without_a_prompt_is_one_line(tmp_path):
    rows = prompt_rows(3)
    rows[1] = {"question": "no prompt here", "answer": "x"}
    cfg = grpo_config(tmp_path)
    import yaml

    from tuneforge.config import to_dict

    doc = to_dict(cfg)
    doc["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = run_cli("train", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'bad.jsonl'}:2: 'prompt' is missing (grpo records need 'prompt' "
        "(text or messages) or 'messages' ending in a user turn; keys here: answer, question)"
    )
    assert not (tmp_path / "run").exists()


def test_messages_records_and_their_fields(tmp_path, tokenizer):
    from tuneforge.config import DataConfig
    from tuneforge.data.preference import prepare_prompt_records

    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
        {"prompt": "3+3?", "answer": "6"},
    ]
    train_rows, _ = prepare_prompt_records(
        DataConfig(train=str(write_jsonl(tmp_path / "a.jsonl", rows))), 0
    )
    assert [r.messages[-1]["content"] for r in train_rows] == ["2+2?", "3+3?"]
    assert [r.fields for r in train_rows] == [{"answer": "4"}, {"answer": "6"}]
    ends_with_assistant = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]  # fmt: skip
    with pytest.raises(TuneforgeError, match="'messages' must end with a user message"):
        prepare_prompt_records(
            DataConfig(train=str(write_jsonl(tmp_path / "b.jsonl", ends_with_assistant))), 0
        )
    uneven = rows + [{"prompt": "q"}]
    with pytest.raises(TuneforgeError, match="every grpo record needs the same fields"):
        prepare_prompt_records(DataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", uneven))), 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "'training.reward_functions' must name at least one reward"),
        (["training.reward_functions=[nope]"], "neither a built-in reward"),
        (["training.reward_functions=['regex:(']"], "does not compile"),
        (
            ["training.reward_functions=[exact_match]", "training.reward_weights=[1,2]"],
            "has 2 weights for 1 reward functions",
        ),
        (
            [
                "training.reward_functions=[exact_match]",
                "training.num_generations=3",
                "training.rollout_batch_size=2",
            ],
            "= 6 responses per rollout must be a multiple of batch_size",
        ),
        (
            ["training.reward_functions=[json_valid]", "training.loss_type=ipo"],
            "for objective grpo",
        ),
        (
            ["training.reward_functions=[json_valid]", "training.reward_function=f.py:g"],
            "grpo takes training.reward_functions",
        ),
    ],
)
def test_grpo_config_errors_name_the_key(overrides, message):
    from tuneforge.config import load_config

    base = ["model=tiny-llama", "output_dir=o", "data.train=t.jsonl", "training.objective=grpo"]
    with pytest.raises(TuneforgeError, match=message) as e:
        load_config(None, base + ["training.batch_size=4"] + overrides)
    assert "\n" not in str(e.value)

"""Reward model: score read at the last real token, Bradley-Terry training with held-out
pairwise accuracy, saved and reloaded for scoring (``tuneforge reward``)."""

import json

import torch

from tuneforge.cli import main
from tuneforge.data.preference import collate_pairs, load_preferences, render_pairs
from tuneforge.models import load_model
from tuneforge.train import train
from tuneforge.train.reward import (
    RewardModel,
    RewardObjective,
    last_real_index,
    load_reward_model,
    score,
)

from ..conftest import ROOT, tiny_config, write_jsonl

PREFS = ROOT / "examples" / "prefs"


def test_last_real_index_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_real_index(mask).tolist() == [2, 4, 4]


def test_score_does_not_depend_on_padding_or_batch_neighbours():
    torch.manual_seed(0)
    lm, tok, _ = load_model("tiny-llama")
    model = RewardModel(lm).eval()
    prompts = [[{"role": "user", "content": "Capital of Peru?"}]] * 2
    responses = ["Lima", "The capital of Peru is Lima, a city by the Pacific coast."]
    together = score(model, tok, prompts, responses)
    alone = [score(model, tok, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone))
    assert together[0] != together[1]


def test_objective_is_bradley_terry_per_pair_with_accuracy():
    lm, tok, _ = load_model("tiny-llama")
    model = RewardModel(lm)
    pairs = render_pairs(tok, load_preferences(str(PREFS / "eval.jsonl"))[:3], 96)[0]
    batch = collate_pairs(pairs, tok.pad_token_id)
    loss, metrics = RewardObjective().loss_sum(model, batch)
    scores = model(batch["input_ids"], batch["attention_mask"])
    c, r = scores.chunk(2)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(r - c).sum())
    assert RewardObjective().units(batch) == 3
    assert float(metrics["accuracy"]) == float((c > r).sum())


def test_train_report_accuracy_save_and_score_from_the_cli(tmp_path, capsys):
    rows = [json.loads(x) for x in (PREFS / "train.jsonl").read_text().splitlines()]
    train_f = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    eval_f = write_jsonl(tmp_path / "eval.jsonl", rows[16:24])
    cfg = tiny_config(
        tmp_path,
        train_f,
        eval_f,
        **{"training.objective": "reward", "training.max_steps": 4, "training.eval_steps": 2},
    )
    summary = train(cfg)
    run = tmp_path / "run"
    accuracy = summary["best_eval_metrics"]["accuracy"]
    assert 0 <= accuracy <= 1 and summary["best_step"] in (2, 4)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in logged if "eval_loss" in x]
    assert [x["step"] for x in evals] == [2, 4] and all("eval_accuracy" in x for x in evals)
    best = next(x for x in evals if x["step"] == summary["best_step"])
    assert best["eval_accuracy"] == round(accuracy, 6)
    assert (run / "reward_head.safetensors").is_file() and (run / "adapter").is_dir()

    model, tok = load_reward_model(run)
    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    expected = score(model, tok, [prompt], ["Answer: 4"])[0]
    capsys.readouterr()
    assert (
        main(["reward", str(run), "--prompt", "What is 2 plus 2?", "--response", "Answer: 4"]) == 0
    )
    assert capsys.readouterr().out.strip() == f"{expected:.4f}"
    # a run without a reward head gets one line and exit 2
    (run / "reward_head.safetensors").unlink()
    assert main(["reward", str(run), "--prompt", "x", "--response", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a reward-model run" in err[0]

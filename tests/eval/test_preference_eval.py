"""``tuneforge eval`` on preference runs: the objective and the guards of "intact as a language
model" (degeneration measures against the starting model, general-text perplexity)."""

import json

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.eval.degeneration import degeneration, off_script_share, repetition, scripts

from ..conftest import ROOT, tiny_config, write_jsonl

PREFS = [json.loads(x) for x in (ROOT / "examples/prefs/train.jsonl").read_text().splitlines()]


def test_degeneration_measures_by_hand(tokenizer):
    """'Hope this helps!' x3: 9 words, 7 word 3-grams of which 3 are distinct, so 4/7 repeat an
    earlier one; a sentence without repeats has none; under 4 3-grams counts as none."""
    assert repetition("Hope this helps! Hope this helps! Hope this helps!") == pytest.approx(4 / 7)
    assert repetition("Lima is the capital of Peru and its largest city.") == 0.0
    assert repetition("a a a a a") == 0.0  # 3 trigrams only
    assert scripts("Tell me a fact about rivers.") == {"LATIN"}
    assert scripts("水韵 Catch") == {"CJK", "LATIN"}
    # 8 letters, 6 of them CJK: 0.75 outside a Latin prompt's script
    assert off_script_share("水韵著症落火 ab", {"LATIN"}) == pytest.approx(0.75)
    prompts = [[{"role": "user", "content": "Tell me one short fact about rivers."}]] * 3
    answers = [
        "水韵著症",
        "Rivers flow. Hope this helps! Hope this helps! Hope this helps!",
        "Fine.",
    ]
    tokens = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert tokens[0] < tokens[1] and tokens[2] < tokens[1]
    d = degeneration(prompts, answers, tokenizer, max_new_tokens=tokens[1])
    assert (d.repetitive, d.off_script) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert d.unfinished == pytest.approx(1 / 3)  # the repetitive one reached the cap
    assert d.mean_tokens == pytest.approx(sum(tokens) / 3)


def test_an_over_optimised_dpo_run_is_flagged_and_a_sane_one_is_not(tmp_path, capfd):
    """Both runs reach held-out pairwise accuracy 100%: the metric the user watches says nothing.
    The one trained at a learning rate 5000x higher answers in repetitions that never end: the
    guards warn during its training, and the report says it is not intact; the other's answers
    are the start's, and nothing warns."""
    from tuneforge.eval.evaluate import evaluate_run
    from tuneforge.train import train

    train_file = write_jsonl(tmp_path / "train.jsonl", PREFS[:32])
    held = write_jsonl(tmp_path / "held.jsonl", PREFS[32:44])
    results, printed = {}, {}
    for name, lr, steps in (("sane", 1e-5, 2), ("over", 0.05, 16)):
        cfg = tiny_config(
            tmp_path,
            train_file,
            held,
            **{"output_dir": str(tmp_path / name), "training.objective": "dpo",
               "training.learning_rate": lr, "training.max_steps": steps, "data.max_length": 96,
               "method.r": 8, "method.lora_alpha": 16},
        )  # fmt: skip
        train(cfg)
        printed[name] = "".join(capfd.readouterr())
        results[name] = evaluate_run(str(tmp_path / name), overrides=["eval.max_new_tokens=24"])
    sane, over = results["sane"], results["over"]
    assert sane["pairwise"]["accuracy"] == over["pairwise"]["accuracy"] == 1.0
    assert sane["intact"] and not over["intact"]
    assert not any(g["crossed"] for g in sane["guards"].values())
    assert over["guards"]["repetitive"]["crossed"]
    assert over["kl_to_start"] > 0.1 and abs(sane["kl_to_start"]) < 1e-3
    assert sane["answers"]["fine-tuned"] == sane["answers"]["start"]
    assert over["verdict"][-1].startswith("NOT intact as a language model: answers that repeat")
    saved = json.loads((tmp_path / "over" / "eval.json").read_text())
    assert saved["intact"] is False and "NOT intact" in (tmp_path / "over/report.md").read_text()
    # rejected responses lost far more log-prob than the chosen ones gained
    assert over["pairwise"]["rejected_logprob_change"] < -1.0
    assert "warning:" not in printed["sane"]
    warnings = [x for x in printed["over"].splitlines() if x.startswith("warning: at step")]
    assert any("held-out answers repeat themselves" in x for x in warnings), printed["over"]


def test_a_blind_review_sheet_of_a_dpo_run_against_its_start(tmp_path):
    """``--review-sheet`` on a DPO run: the fine-tuned and the starting model's answers to the
    held-out prompts, sides shuffled; scored, the win rate goes into the run's report.md."""
    import csv

    from tuneforge.eval.evaluate import evaluate_run, score_sheet
    from tuneforge.train import train

    train_file = write_jsonl(tmp_path / "train.jsonl", PREFS[:8])
    held = write_jsonl(tmp_path / "held.jsonl", PREFS[8:14])
    cfg = tiny_config(
        tmp_path, train_file, held,
        **{"training.objective": "dpo", "training.max_steps": 2, "data.max_length": 96},
    )  # fmt: skip
    train(cfg)
    run = str(tmp_path / "run")
    with pytest.raises(TuneforgeError, match="--gguf applies to sft runs"):
        evaluate_run(run, gguf="x.gguf")
    with pytest.raises(TuneforgeError, match="folder for --review-sheet does not exist"):
        evaluate_run(run, review_sheet=str(tmp_path / "no" / "sheet.csv"))
    assert not (tmp_path / "run" / "eval.json").exists()  # refused before any work
    r = evaluate_run(
        run, review_sheet=str(tmp_path / "sheet.csv"), overrides=["eval.max_new_tokens=8"]
    )
    rows = list(csv.DictReader((tmp_path / "sheet.csv").open()))
    key = list(csv.DictReader((tmp_path / "sheet.key.csv").open()))
    assert [row["prompt"] for row in rows] == r["prompts"] and len(rows) == 6
    for row, k in zip(rows, key, strict=True):
        side = k["fine_tuned_side"]
        tuned = r["answers"]["fine-tuned"][int(row["id"]) - 1]
        assert row["answer_a" if side == "A" else "answer_b"] == tuned and k["baseline"] == "start"
        row["rating"] = side  # the reviewer prefers the fine-tuned answer every time
    with (tmp_path / "sheet.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    scored = score_sheet(str(tmp_path / "sheet.csv"), run=run)
    assert scored["wins"] == 6 and scored["losses"] == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Reviewers preferred the fine-tuned model over start in 6 of 6" in report
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["review"]["wins"] == 6


def test_a_ppo_run_is_scored_by_its_own_reward_on_held_out_prompts(tmp_path):
    from tuneforge.eval.evaluate import evaluate_run
    from tuneforge.train import train

    rule = tmp_path / "rule.py"
    rule.write_text("def score(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    train_file = write_jsonl(tmp_path / "train.jsonl", PREFS[:8])
    held = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PREFS[40:46]])
    cfg = tiny_config(
        tmp_path,
        train_file,
        **{"training.objective": "ppo", "training.reward_function": f"{rule}:score",
           "training.rollout_batch_size": 4, "training.batch_size": 2, "training.max_steps": 2,
           "training.response_length": 6, "data.max_length": 96},
    )  # fmt: skip
    train(cfg)
    r = evaluate_run(
        str(tmp_path / "run"), str(held), ["eval.max_new_tokens=12", "eval.property=\\w"]
    )
    assert "pairwise" not in r and r["examples"] == 6
    lengths = {k: sum(len(a) / 10 for a in v) / 6 for k, v in r["answers"].items()}
    assert r["reward"]["start"] == pytest.approx(lengths["start"])
    assert r["reward"]["fine-tuned"] == pytest.approx(lengths["fine-tuned"])
    assert set(r["guards"]) == {"perplexity_change", "repetitive", "off_script", "unfinished"}
    assert r["verdict"][0].startswith("The run's reward on held-out prompts")
    assert r["property"]["pattern"] == "\\w" and 0 <= r["property"]["fine-tuned"] <= 1


def test_a_grpo_run_is_scored_by_its_reward_functions_with_the_records_fields(tmp_path):
    from tuneforge.eval.evaluate import evaluate_run
    from tuneforge.train import train

    rows = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in PREFS[:12]]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held = write_jsonl(tmp_path / "held.jsonl", rows[8:])
    rule = tmp_path / "rule.py"
    rule.write_text(  # needs the field: the held-out records' answers reach it
        "def score(prompts, completions, answer):\n"
        "    return [float(len(c) > len(a)) for c, a in zip(completions, answer)]\n"
    )
    cfg = tiny_config(
        tmp_path,
        train_file,
        **{"training.objective": "grpo", "training.reward_functions": f"['{rule}:score']",
           "training.rollout_batch_size": 2, "training.num_generations": 2,
           "training.batch_size": 4, "training.max_steps": 1, "training.response_length": 4,
           "data.max_length": 96},
    )  # fmt: skip
    train(cfg)
    r = evaluate_run(str(tmp_path / "run"), str(held), ["eval.max_new_tokens=6"])
    answers = r["answers"]
    refs = [x["answer"] for x in rows[8:]]
    for name in ("start", "fine-tuned"):
        expected = sum(len(c) > len(a) for c, a in zip(answers[name], refs, strict=True)) / 4
        assert r["reward"][name] == pytest.approx(expected)

"""`tuneforge eval` end to end on tiny-llama: baselines, verdict, loss, forgetting, overfitting,
report, review sheet; the fast generation paths give the plain path's outputs; user mistakes."""

import json
import math

import pytest
import torch

from tuneforge.cli import main
from tuneforge.errors import TuneforgeError
from tuneforge.eval.baselines import BASE_FEW, BASE_ZERO, TUNED, TUNED_FEW
from tuneforge.eval.evaluate import evaluate_run
from tuneforge.infer.generate import common_prefix_length, generate
from tuneforge.infer.runs import load_for_inference
from tuneforge.train import train

from ..conftest import tiny_config, write_jsonl

ANSWER = "Noted."
TRAIN = [
    {"instruction": f"Please note item {i}: {w}", "output": ANSWER}
    for i, w in enumerate(["apples", "pears", "plums", "figs", "kiwis", "limes", "dates", "grapes"])
]
EVAL = [
    {"instruction": f"Please note item {i}: {w}", "output": ANSWER}
    for i, w in enumerate(["bread", "milk", "tea", "rice", "salt"], 20)
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny full fine-tune that learns to answer every request with the same word."""
    tmp = tmp_path_factory.mktemp("evalrun")
    train_file = write_jsonl(tmp / "train.jsonl", TRAIN)
    eval_file = write_jsonl(tmp / "eval.jsonl", EVAL)
    cfg = tiny_config(
        tmp,
        train_file,
        eval_file,
        **{
            "method.name": "full",
            "training.max_steps": 24,
            "training.learning_rate": 1e-2,
            "training.lr_scheduler": "constant",
            "training.batch_size": 8,
            "training.eval_steps": 8,
            "data.max_length": 64,
        },
    )
    train(cfg)
    return tmp / "run", eval_file


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory):
    run, eval_file = tiny_run
    sheet = tmp_path_factory.mktemp("review") / "review.csv"
    overrides = [
        "eval.metrics=[exact_match,token_f1,eval_loss]",
        "eval.few_shot_k=2",
        "eval.max_new_tokens=6",
        "eval.progress=false",
    ]
    return evaluate_run(run, str(eval_file), overrides, review_sheet=str(sheet)), sheet


def test_fine_tuned_beats_prompting_and_says_so(results):
    r, _ = results
    assert list(r["scores"]) == [BASE_ZERO, BASE_FEW, TUNED, TUNED_FEW]
    assert r["scores"][TUNED]["exact_match"] == 100.0
    assert r["predictions"][TUNED] == [ANSWER] * len(EVAL)
    assert r["scores"][BASE_ZERO]["exact_match"] == 0.0  # a random model says nothing useful
    for system, preds in r["predictions"].items():  # the table is the metric of what was said
        hits = sum(p.strip() == ANSWER for p in preds)
        assert r["scores"][system]["exact_match"] == pytest.approx(100 * hits / len(EVAL))
    v = r["verdict"]
    assert v["won"] and v["metric"] == "exact_match" and v["baseline"] in (BASE_ZERO, BASE_FEW)
    assert v["difference"] == pytest.approx(100.0 - r["scores"][v["baseline"]]["exact_match"])
    assert v["text"].startswith("Fine-tuning beat prompting on exact_match: fine-tuned 100.00")
    # Loss on the reference answers: training lowered it.
    assert r["scores"][TUNED]["eval_loss"] < r["scores"][BASE_ZERO]["eval_loss"]


def test_few_shot_examples_come_from_train_and_never_from_eval(results):
    r, _ = results
    shots = r["few_shot_examples"]
    assert len(shots) == 2
    train_q = {x["instruction"] for x in TRAIN}
    eval_q = {x["instruction"] for x in EVAL}
    assert all(q in train_q and q not in eval_q for q, _ in shots)


def test_forgetting_is_perplexity_on_general_text_checked_against_hf_loss(results, tiny_run):
    """The base perplexity equals exp(mean token loss) as transformers computes it."""
    r, _ = results
    f = r["forgetting"]
    assert f["path"].endswith("examples/general/general_text.jsonl")
    assert f["relative_change"] == pytest.approx(
        f["fine_tuned_perplexity"] / f["base_perplexity"] - 1
    )
    model, tok = load_for_inference(str(tiny_run[0]), adapter=False)
    from tuneforge.eval.perplexity import read_texts

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in read_texts(f["path"]):
            ids = tok(text)["input_ids"]
            for start in range(0, len(ids), 64):  # windows of data.max_length tokens
                window = torch.tensor([ids[start : start + 64]])
                n = window.shape[1] - 1
                if n > 0:
                    nll += float(model(input_ids=window, labels=window).loss) * n
                    count += n
    assert count == f["tokens"]
    assert f["base_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_overfitting_view_reads_the_run_metrics(results, tiny_run):
    r, _ = results
    o = r["overfitting"]
    evals = [json.loads(x) for x in (tiny_run[0] / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["step"], x["eval_loss"]) for x in evals if "eval_loss" in x]
    assert [tuple(x) for x in o["curves"]["eval"]] == evals and o["evaluations"] == 3
    assert o["best_step"] == min(evals, key=lambda x: x[1])[0]
    assert len(o["curves"]["train"]) == 24 and f"at step {o['best_step']} of 24" in o["text"]


def test_eval_advice_follows_from_the_run_curves_and_forgetting(results, tiny_run):
    """eval.json's advice is eval/advice.py's on the run's own metrics and the measured
    perplexity change; the printed summary and report.md carry the same lines."""
    from tuneforge.eval.advice import advice
    from tuneforge.eval.evaluate import summary_lines
    from tuneforge.eval.overfitting import read_curves

    r, _ = results
    run = tiny_run[0]
    change = r["forgetting"]["relative_change"]
    assert r["advice"] == advice(read_curves(run), 0, change)
    assert any(x.startswith("Forgetting") for x in r["advice"]) == (change > 0.10)
    lines = summary_lines(r)
    assert all(x in lines for x in r["advice"])
    md = (run / "report.md").read_text()
    assert all(x in md for x in r["advice"]) and ("## Advice" in md) == bool(r["advice"])


def test_eval_writes_report_and_review_sheet(results, tiny_run):
    r, sheet = results
    run = tiny_run[0]
    for name in ("eval.json", "report.md", "report.html", "eval_metrics.png"):
        assert (run / name).is_file()
    assert json.loads((run / "eval.json").read_text())["verdict"] == r["verdict"]
    md = (run / "report.md").read_text()
    assert "| fine-tuned | 100.00 |" in md and "Fine-tuning beat prompting" in md
    assert sheet.is_file() and sheet.with_name("review.key.csv").is_file()
    assert r["review_sheet"]["baseline"] == r["verdict"]["baseline"]  # best prompting baseline


def test_score_sheet_from_the_cli_adds_the_review_to_the_report(results, tiny_run, capsys):
    import csv

    _, sheet = results
    with open(sheet, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(sheet.with_name("review.key.csv"), newline="") as f:
        keys = list(csv.DictReader(f))
    for row, k in zip(rows, keys, strict=True):
        row["rating"] = k["fine_tuned_side"]  # the reviewer always prefers the fine-tuned answer
    with open(sheet, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["eval", str(tiny_run[0]), "--score-sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"in {len(EVAL)} of {len(EVAL)} decisive comparisons: win rate 100.0%" in out
    assert "Human review" in (tiny_run[0] / "report.md").read_text()


def test_fast_generation_paths_give_the_plain_outputs(tiny_run, tmp_path):
    """Shared-prefix KV reuse == plain left-padded batches; a merged LoRA == the adapter on."""
    run, _ = tiny_run
    model, tok = load_for_inference(str(run), adapter=False)
    shots = [{"role": "user", "content": x["instruction"]} for x in TRAIN[:2]]
    prompts = [
        [shots[0], {"role": "assistant", "content": ANSWER}, {"role": "user", "content": q}]
        for q in ("Say a number.", "What is the capital of Spain, please?", "Hi", "2+2?")
    ]
    from tuneforge.data.render import render_prompt

    assert common_prefix_length([render_prompt(tok, p) for p in prompts]) >= 8
    plain = generate(model, tok, prompts, max_new_tokens=8, share_prefix=False, batch_size=3)
    shared = generate(model, tok, prompts, max_new_tokens=8, share_prefix=True, batch_size=3)
    assert shared == plain and any(plain)
    # LoRA: a few steps at a high learning rate so the adapter is far from zero.
    data = write_jsonl(tmp_path / "t.jsonl", TRAIN)
    cfg = tiny_config(tmp_path, data, **{"training.max_steps": 3, "training.learning_rate": 5e-2})
    train(cfg)
    lora, tok = load_for_inference(cfg.output_dir)
    unmerged = generate(lora, tok, prompts, max_new_tokens=8, share_prefix=False)
    merged_model = load_for_inference(cfg.output_dir)[0].merge_and_unload()
    merged = generate(merged_model, tok, prompts, max_new_tokens=8)
    base_out = generate(model, tok, prompts, max_new_tokens=8)
    assert merged == unmerged and unmerged != base_out  # the adapter changes what is said


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_user_mistakes_are_one_line_errors_with_status_2(tiny_run, tmp_path, capsys):
    run, eval_file = tiny_run
    before = sorted(p.name for p in run.iterdir())
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in _one_line(capsys)
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a tuneforge run (no config.yaml)" in _one_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EVAL[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    assert main(["eval", str(run), "--data", str(bad)]) == 2
    assert f"{bad}:2: 'output' is missing" in _one_line(capsys)
    bad.write_text(json.dumps(EVAL[0]) + "\n{not json\n")
    assert main(["eval", str(run), "--data", str(bad)]) == 2
    assert f"{bad}:2: invalid JSON" in _one_line(capsys)
    assert main(["eval", str(run), "eval.metrics=[blue]"]) == 2
    assert "unknown metric 'blue'" in _one_line(capsys)
    assert main(["eval", str(run), "eval.few_shot_k=50"]) == 2
    assert "only 8 single-turn training examples for eval.few_shot_k=50" in _one_line(capsys)
    assert main(["eval", str(run), "eval.general_text=missing.jsonl"]) == 2
    assert "missing.jsonl: eval.general_text file not found" in _one_line(capsys)
    assert main(["eval", str(run), "--review-sheet", str(tmp_path / "no" / "r.csv")]) == 2
    assert "folder for --review-sheet does not exist" in _one_line(capsys)
    assert main(["eval", "--score-sheet", str(tmp_path / "none.csv")]) == 2
    assert "review key file not found" in _one_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written or changed


def test_load_eval_set_needs_a_reference_answer(tmp_path):
    from tuneforge.eval.baselines import load_eval_set

    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"},
                ]
            }
        ],
    )
    with pytest.raises(TuneforgeError, match=r"chat\.jsonl:1: the last message must be"):
        load_eval_set(str(data))


def test_eval_help_and_conflicting_options(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "usage: tuneforge eval" in capsys.readouterr().out
    sheet = str(tmp_path / "r.csv")
    assert main(["eval", "--score-sheet", sheet, "--review-sheet", sheet]) == 2
    assert "--score-sheet only reads ratings" in _one_line(capsys)
    assert main(["eval"]) == 2
    assert "give a RUN folder" in _one_line(capsys)

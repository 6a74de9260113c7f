"""``tuneforge eval RUN``: is the fine-tuned model better, better than what, and at what cost.

Everything that depends on the user's input (the run folder, its config, the eval data, the
training split for few-shot examples, the general text, the review-sheet path) is read and checked
before a model is loaded; results are written only at the end (``eval.json``, ``report.md``,
``report.html``, PNGs), each through a temporary file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tuneforge.config import Config, load_config
from tuneforge.errors import TuneforgeError
from tuneforge.eval.advice import advice
from tuneforge.eval.baselines import (
    BASE_FEW,
    BASE_ZERO,
    GGUF,
    TUNED,
    TUNED_FEW,
    best_prompting,
    few_shot_examples,
    load_eval_set,
    verdict,
    with_few_shot,
)
from tuneforge.eval.metrics import task_metrics
from tuneforge.eval.overfitting import read_curves
from tuneforge.eval.perplexity import (
    answer_samples,
    read_texts,
    resolve_general_text,
    samples_nll,
    text_samples,
)
from tuneforge.eval.report import write_report
from tuneforge.eval.review import score_review_sheet, write_review_sheet
from tuneforge.files import write_atomic
from tuneforge.infer.generate import generate
from tuneforge.infer.runs import is_run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_run(run: str | Path) -> Path:
    """The run folder, or a one-line error saying why it is not one."""
    path = Path(run)
    if not path.exists():
        raise TuneforgeError(f"'{run}': no such run folder")
    if not path.is_dir():
        raise TuneforgeError(f"'{run}': is a file, not a run folder")
    if not (path / "config.yaml").is_file():
        raise TuneforgeError(
            f"'{run}': not a tuneforge run (no config.yaml); give the output_dir of a training run"
        )
    if not is_run(path):
        raise TuneforgeError(
            f"'{run}': run folder without a trained adapter/ or model/ (did training finish?)"
        )
    return path


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The run's resolved config with eval-time overrides (e.g. ``eval.few_shot_k=5``)."""
    return load_config(run_dir / "config.yaml", overrides)


def _timed(timing: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    timing[name] = round(time.perf_counter() - start, 2)
    return out


def _forgetting(base_nll, tuned_nll, path: Path) -> dict:
    change = tuned_nll.perplexity / base_nll.perplexity - 1
    if change > 0.05:
        judgement = "the fine-tuned model has lost some general language modelling"
    elif change > 0.01:
        judgement = "slight forgetting"
    elif change < -0.01:
        judgement = "the fine-tuned model models this text better than the base"
    else:
        judgement = "no measurable forgetting"
    return {
        "path": str(path),
        "tokens": base_nll.tokens,
        "base_perplexity": base_nll.perplexity,
        "fine_tuned_perplexity": tuned_nll.perplexity,
        "relative_change": change,
        "text": (
            f"Perplexity on general text ({base_nll.tokens} tokens of `{path.name}`): base "
            f"{base_nll.perplexity:.3f}, fine-tuned {tuned_nll.perplexity:.3f} "
            f"({100 * change:+.1f}%): {judgement}."
        ),
    }


def evaluate_run(
    run: str | Path,
    data: str | None = None,
    overrides: list[str] | None = None,
    review_sheet: str | None = None,
    review_key: str | None = None,
    gguf: str | None = None,
) -> dict:
    """Evaluate a run against prompting baselines; write eval.json and the report into it.

    Args:
        run: the training run folder.
        data: held-out data (else ``eval.data``, else the run's ``data.eval``).
        overrides: ``eval.*`` (or other) ``key=value`` overrides of the run's config.
        review_sheet: also write a blind A/B review sheet here (key file beside it).
        review_key: where to write the key file (default ``<sheet>.key.csv``).
        gguf: also answer with this GGUF file (``tuneforge export``) through llama.cpp, with the
            chat template stored in the file, and report it beside the fine-tuned model.

    Returns:
        The results (also saved as ``<run>/eval.json``).

    Raises:
        TuneforgeError: not a run, bad config override, bad or missing eval data, too few
            few-shot examples, bad general text, review sheet folder missing.
    """
    run_dir = check_run(run)
    cfg = load_run_config(run_dir, overrides)
    e = cfg.eval
    data_path = data or e.data or cfg.data.eval
    if not data_path:
        raise TuneforgeError(
            f"'{run}': no eval data; pass --data FILE (the run has no data.eval and no eval.data)"
        )
    if cfg.training.objective != "sft":  # preference and RL runs: eval/preference.py
        from tuneforge.eval.preference import evaluate_preference_run

        return evaluate_preference_run(run_dir, cfg, data_path, review_sheet, review_key, gguf)
    evalset = load_eval_set(data_path, cfg.data.format, cfg.data.system_prompt, e.max_examples)
    shots = few_shot_examples(
        cfg.data.train, e.few_shot_k, e.seed, evalset, cfg.data.format, cfg.data.system_prompt
    )
    general = resolve_general_text(e.general_text)
    texts = read_texts(general) if general else None
    curves = read_curves(run_dir)
    if review_sheet:
        parent = Path(review_sheet).resolve().parent
        if not parent.is_dir():
            raise TuneforgeError(f"{parent}: folder for --review-sheet does not exist")
        if e.review_baseline == "few_shot" and not shots:
            raise TuneforgeError("eval.review_baseline is few_shot but eval.few_shot_k is 0")
    if gguf:
        from tuneforge.infer.gguf_export import llama_cpp_module

        if not Path(gguf).is_file():
            raise TuneforgeError(f"--gguf {gguf}: no such file; make one with tuneforge export")
        if e.temperature > 0:
            raise TuneforgeError(
                "--gguf compares greedy answers; set eval.temperature=0 (the default) to use it"
            )
        llama_cpp_module()

    from tuneforge.infer.runs import load_for_inference

    timing: dict[str, float] = {}
    start = time.perf_counter()
    base, base_tok = _timed(
        timing, "load base model", lambda: load_for_inference(str(run_dir), adapter=False)
    )
    tuned, tuned_tok = _timed(
        timing, "load fine-tuned model", lambda: load_for_inference(str(run_dir), adapter=True)
    )
    if e.merge_adapter and hasattr(tuned, "merge_and_unload"):
        tuned = tuned.merge_and_unload()  # its own copy of the base; fp32 merge, faster decoding

    systems = {
        BASE_ZERO: (base, base_tok, evalset.prompts),
        TUNED: (tuned, tuned_tok, evalset.prompts),
    }
    if shots:
        few = [with_few_shot(p, shots) for p in evalset.prompts]
        systems = {
            BASE_ZERO: systems[BASE_ZERO],
            BASE_FEW: (base, base_tok, few),
            TUNED: systems[TUNED],
            TUNED_FEW: (tuned, tuned_tok, few),
        }
    predictions: dict[str, list[str]] = {}
    scores: dict[str, dict[str, float]] = {}
    want_loss = any(m in ("eval_loss", "perplexity") for m in e.metrics)
    for name, (model, tok, prompts) in systems.items():
        predictions[name] = _timed(
            timing,
            f"generate: {name}",
            lambda model=model, tok=tok, prompts=prompts, name=name: generate(
                model,
                tok,
                prompts,
                max_new_tokens=e.max_new_tokens,
                temperature=e.temperature,
                top_p=e.top_p,
                seed=e.seed,
                batch_size=e.batch_size,
                progress=e.progress,
                desc=name,
            ),
        )
        scores[name] = task_metrics(e.metrics, predictions[name], evalset.references, e.labels)
        if want_loss:
            convs = [
                [*p, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, evalset.references, strict=True)
            ]
            nll = samples_nll(
                model, answer_samples(tok, convs, 10**9), tok.pad_token_id, e.batch_size
            )
            scores[name]["eval_loss"] = nll.loss
            scores[name]["perplexity"] = nll.perplexity
            scores[name] = {m: scores[name][m] for m in e.metrics}

    gguf_result = None
    if gguf:
        gguf_result = _timed(
            timing,
            f"generate: {GGUF}",
            lambda: _gguf_system(gguf, evalset, e, scores, predictions),
        )

    forgetting = None
    if texts:
        samples = text_samples(base_tok, texts, cfg.data.max_length)
        base_nll = _timed(
            timing,
            "general text: base",
            lambda: samples_nll(base, samples, base_tok.pad_token_id, e.batch_size),
        )
        tuned_nll = _timed(
            timing,
            "general text: fine-tuned",
            lambda: samples_nll(tuned, samples, base_tok.pad_token_id, e.batch_size),
        )
        forgetting = _forgetting(base_nll, tuned_nll, general)
    timing["total"] = round(time.perf_counter() - start, 2)

    primary = e.metrics[0]
    overfit = curves.summary()
    overfit["curves"] = {"train": curves.train, "eval": curves.eval, "best_step": curves.best_step}
    overfit["gaps"] = curves.gaps()
    results = {
        "run": str(run_dir),
        "model": cfg.model,
        "method": cfg.method.name,
        "data": str(data_path),
        "examples": len(evalset.references),
        "metrics": list(e.metrics),
        "primary_metric": primary,
        "few_shot_k": len(shots),
        "few_shot_examples": [list(s) for s in shots],
        "decoding": {
            "max_new_tokens": e.max_new_tokens,
            "temperature": e.temperature,
            "top_p": e.top_p,
            "seed": e.seed,
        },
        "scores": scores,
        "verdict": verdict(
            scores, primary, predictions, evalset.references, e.labels or None, e.seed
        ),
        "forgetting": forgetting,
        "gguf": gguf_result,
        "overfitting": overfit,
        "advice": advice(
            curves,
            cfg.training.early_stopping_patience,
            forgetting["relative_change"] if forgetting else None,
        ),
        "prompts": [p[-1]["content"] for p in evalset.prompts],
        "references": evalset.references,
        "sources": evalset.sources,
        "predictions": predictions,
        "report_examples": e.report_examples,
        "timing": timing,
    }
    if review_sheet:
        which = {"zero_shot": BASE_ZERO, "few_shot": BASE_FEW}.get(
            e.review_baseline, best_prompting(scores, primary)
        )
        sheet, key = write_review_sheet(
            review_sheet,
            results["prompts"],
            predictions[TUNED],
            predictions[which],
            which,
            e.seed,
            review_key,
        )
        results["review_sheet"] = {"sheet": str(sheet), "key": str(key), "baseline": which}
    save_results(run_dir, results)
    return results


def _gguf_system(path: str, evalset, e, scores: dict, predictions: dict) -> dict:
    """The exported file answers the held-out prompts through llama.cpp (its own chat template,
    the same decoding); adds its scores and predictions, returns the deployment summary."""
    from tuneforge.infer.gguf_export import gguf_replies

    replies = gguf_replies(path, evalset.prompts, max_new_tokens=e.max_new_tokens)
    predictions[GGUF] = [r.text for r in replies]
    scores[GGUF] = task_metrics(
        [m for m in e.metrics if m not in ("eval_loss", "perplexity")],
        predictions[GGUF],
        evalset.references,
        e.labels,
    )
    not_stopped = sum(not r.stopped for r in replies)
    primary = next(m for m in e.metrics if m in scores[GGUF]) if scores[GGUF] else None
    same = sum(a == b for a, b in zip(predictions[GGUF], predictions[TUNED], strict=True))
    text = f"`{Path(path).name}` through llama.cpp: "
    if primary:
        text += (
            f"{primary} {scores[GGUF][primary]:.2f} against the fine-tuned model's "
            f"{scores[TUNED][primary]:.2f}; "
        )
    text += (
        f"{same} of {len(replies)} answers identical to the fine-tuned model's; "
        f"{not_stopped} did not stop at end of turn within {e.max_new_tokens} tokens."
    )
    return {"file": str(path), "identical": same, "not_stopped": not_stopped, "text": text}


def save_results(run_dir: Path, results: dict) -> dict[str, Path]:
    """eval.json + report files, each through a temporary file."""
    write_atomic(run_dir / "eval.json", json.dumps(results, indent=1))
    return write_report(run_dir, results)


def score_sheet(sheet: str, key: str | None = None, run: str | None = None) -> dict:
    """Score a filled-in review sheet; with a run folder that has eval.json, add the result to
    its report."""
    result = score_review_sheet(sheet, key)
    if run:
        run_dir = check_run(run)
        path = run_dir / "eval.json"
        if not path.is_file():
            raise TuneforgeError(f"'{run}': has no eval.json yet; run `tuneforge eval {run}` first")
        results = json.loads(path.read_text())
        results["review"] = result
        if results.get("objective", "sft") != "sft":
            from tuneforge.eval.preference import save_preference_results

            save_preference_results(run_dir, results)
        else:
            save_results(run_dir, results)
    return result


def summary_lines(r: dict) -> list[str]:
    """What ``tuneforge eval`` prints: the score table and the plain statements."""
    if r.get("objective", "sft") != "sft":
        rs = r.get("review_sheet")
        return [
            f"{r['examples']} held-out examples from {r['data']} ({r['objective']} run)",
            *r["verdict"],
            *r.get("advice", ()),
            *(
                [f"review sheet: {rs['sheet']} (fine-tuned vs start; key: {rs['key']})"]
                if rs
                else []
            ),
            f"report: {Path(r['run']) / 'report.md'} (and eval.json)",
        ]
    systems = list(r["scores"])
    lines = [
        f"{r['examples']} examples from {r['data']}",
        "| system | " + " | ".join(r["metrics"]) + " |",
        "| --- |" + " --- |" * len(r["metrics"]),
    ]
    for s in systems:
        cells = [f"{r['scores'][s].get(m, float('nan')):.2f}" for m in r["metrics"]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(r["verdict"]["text"])
    if r.get("gguf"):
        lines.append(r["gguf"]["text"].replace("`", ""))
    if r["forgetting"]:
        lines.append(r["forgetting"]["text"].replace("`", ""))
    lines.append(r["overfitting"]["text"])
    lines.extend(r.get("advice", ()))  # eval.json files written before the advice have none
    if r.get("review_sheet"):
        rs = r["review_sheet"]
        lines.append(
            f"review sheet: {rs['sheet']} (fine-tuned vs {rs['baseline']}; key: {rs['key']})"
        )
    lines.append(f"report: {Path(r['run']) / 'report.html'} (and report.md)")
    return lines

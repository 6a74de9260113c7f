"""`tuneforge eval`: baselines, forgetting, overfitting, review sheets, report."""

from __future__ import annotations

import argparse

from tuneforge.errors import TuneforgeError


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.eval.evaluate import evaluate_run, score_sheet, summary_lines

    if args.score_sheet:
        if args.review_sheet or args.data or args.overrides:
            raise TuneforgeError("--score-sheet only reads ratings; run it without other options")
        result = score_sheet(args.score_sheet, args.key, args.run)
        print(result["text"])
        return 0
    if not args.run:
        raise TuneforgeError("give a RUN folder to evaluate (or --score-sheet SHEET)")
    results = evaluate_run(
        args.run, args.data, args.overrides, args.review_sheet, args.key, gguf=args.gguf
    )
    print("\n".join(summary_lines(results)))
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="fine-tuned vs prompting baselines, forgetting, overfitting, review sheets, report",
        description="Evaluate a run on held-out data: task metrics for the base model zero-shot "
        "and few-shot, the fine-tuned model and fine-tuned + few-shot; forgetting (perplexity on "
        "general text); loss curves. Writes eval.json, report.md and report.html into the run. "
        "Override eval settings with key=value, e.g. eval.few_shot_k=5 eval.metrics=[bleu,chrf].",
    )
    e.add_argument("run", metavar="RUN", nargs="?", help="training run folder (output_dir)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    e.add_argument("--data", default=None, help="held-out data (default: the run's data.eval)")
    e.add_argument(
        "--review-sheet",
        default=None,
        metavar="CSV",
        help="also write a blind A/B sheet (fine-tuned vs a prompting baseline, or vs the "
        "starting model for preference and RL runs; sides random)",
    )
    e.add_argument(
        "--score-sheet",
        default=None,
        metavar="CSV",
        help="read a filled-in review sheet (rating: A, B or tie) and report the win rate",
    )
    e.add_argument(
        "--key", default=None, metavar="CSV", help="review key file (default: SHEET.key.csv)"
    )
    e.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="also answer with this exported GGUF file through llama.cpp (tuneforge export) and "
        "report it beside the fine-tuned model",
    )
    e.set_defaults(func=cmd_eval)

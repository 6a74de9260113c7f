"""``tuneforge data COMMAND``: parsing and printing for the data tools (the logic is in data/)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tuneforge.errors import TuneforgeError

SHOW = 10  # examples listed per kind in a report; --report FILE.json has them all


def _write_report(path: str | None, obj: dict) -> None:
    if not path:
        return
    from tuneforge.files import atomic_path

    if Path(path).suffix.lower() != ".json":
        raise TuneforgeError(f"{path}: the report is JSON; give the file a .json name")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)  # written as encoded: see _Streamed
        f.write("\n")


class _Streamed(list):
    """A list for ``json.dump`` whose items are made while it is written, so a report of any
    size is never whole in memory. (``json.dump`` with ``indent`` encodes in Python: it asks a
    list if it is empty, then iterates it once.)"""

    def __init__(self, items: Iterable, n: int):
        super().__init__()
        self._items, self._n = items, n

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return self._n


def _check_report_name(path: str | None) -> None:
    # before any work, so a bad name never costs a long run
    if path and Path(path).suffix.lower() != ".json":
        raise TuneforgeError(f"{path}: the report is JSON; give the file a .json name")


def cmd_validate(args: argparse.Namespace) -> int:
    from tuneforge.datatools.validate import KINDS, ValidationReport, iter_problems

    report = ValidationReport(args.file)
    for problem in iter_problems(args.file, report):
        print(problem)
    print(f"{args.file}: {report.records} records, format: {report.format or 'unknown'}")
    if report.counts:
        print("problems by kind:")
        for kind, n in sorted(report.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {kind:<18} {n:>7}  {'unusable' if KINDS[kind] else 'warning'}")
    else:
        print("no problems found")
    if report.unusable_records:
        raise TuneforgeError(
            f"{args.file}: {report.unusable_records} of {report.records} records are unusable "
            "(listed above)"
        )
    print(f"all {report.records} records are usable")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from tuneforge.datatools.stats import compute_stats, load_stats_tokenizer, plot_lengths

    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise TuneforgeError(f"{args.plot}: the plot is a PNG; give the file a .png name")
    tokenizer = None if args.no_tokens else load_stats_tokenizer(args.model)
    st = compute_stats(args.file, tokenizer, args.max_length, args.threshold, args.ngram)
    if args.plot:
        plot_lengths(st, args.plot)
    if args.json:
        print(json.dumps(st.to_dict(), indent=2))
        return 0
    usable = st.records - st.unusable
    print(f"{st.path}: {st.records} {st.format} records ({st.unusable} unusable, left out)")
    if st.tokens:
        t = st.tokens
        print(
            f"tokens ({args.model}, chat template): min {t['min']}  median {t['median']:g}  "
            f"p95 {t['p95']:g}  max {t['max']}  mean {t['mean']:g}"
        )
        print(f"longer than max_length {st.max_length}: {st.over_max_length} of {usable}")
    tr = st.turns
    print(f"assistant turns per record: min {tr['min']}  median {tr['median']:g}  max {tr['max']}")
    print(f"exact duplicates: {st.exact_duplicates} ({st.duplicate_rate:.1%})")
    print(
        f"diversity of prompts: distinct-1 {st.distinct_1:.3f}  distinct-2 {st.distinct_2:.3f}; "
        f"{st.near_duplicate_share:.1%} of records in {st.clusters} duplicate clusters "
        f"(Jaccard >= {args.threshold:g})"
    )
    if args.plot:
        print(f"histogram written to {args.plot}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from tuneforge.datatools.quality import CleanOptions, clean_file

    _check_report_name(args.report)
    count = None
    if args.max_tokens:
        from tuneforge.datatools.stats import load_stats_tokenizer, record_tokens

        tokenizer = load_stats_tokenizer(args.model)

        def count(data: dict, fmt: str) -> int:
            return record_tokens(tokenizer, data, fmt)

    opts = CleanOptions(args.min_output_chars, args.max_chars, args.max_tokens, count)
    rep = clean_file(args.file, args.out, opts)
    print(
        f"{args.file}: kept {rep.kept} of {rep.records} records ({rep.changed} changed by "
        f"normalisation), dropped {rep.records - rep.kept}"
    )
    for reason, n in rep.dropped.most_common():
        print(f"  {reason}: {n}")
        for source, _, detail in [d for d in rep.drops if d[1] == reason][:SHOW]:
            print(f"    {source}: {detail}")
    _write_report(
        args.report,
        {
            "records": rep.records,
            "kept": rep.kept,
            "changed": rep.changed,
            "dropped": dict(rep.dropped),
            "drops": [{"source": s, "reason": r, "detail": d} for s, r, d in rep.drops],
        },
    )
    print(f"wrote {args.out}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from itertools import islice

    from tuneforge.datatools.quality import dedup_file

    _check_report_name(args.report)
    with dedup_file(args.file, args.out, args.threshold, args.ngram, not args.exact_only) as rep:
        print(
            f"{args.file}: kept {rep.kept} of {rep.records} records; removed {rep.exact} exact "
            f"and {rep.near} near duplicates (Jaccard >= {args.threshold:g} on word "
            f"{args.ngram}-grams) in {rep.n_clusters} clusters"
        )
        for cluster in islice(rep.clusters(), SHOW):
            removed = ", ".join(
                d.source if d.kind == "exact" else f"{d.source} (~{d.similarity:.2f})"
                for d in islice(cluster.removed(), SHOW)
            )
            more = f" and {cluster.size - SHOW} more" if cluster.size > SHOW else ""
            print(f"  kept {cluster.kept}; removed {removed}{more}")
        if rep.n_clusters > SHOW:
            print(
                f"  ... {rep.n_clusters - SHOW} more clusters"
                + ("" if args.report else " (--report FILE.json lists all)")
            )
        clusters = (
            {
                "kept": c.kept,
                "removed": _Streamed(
                    (
                        {
                            "source": d.source,
                            "kept": d.kept,
                            "kind": d.kind,
                            "similarity": d.similarity,
                        }
                        for d in c.removed()
                    ),
                    c.size,
                ),
            }
            for c in rep.clusters()
        )
        _write_report(
            args.report,
            {
                "records": rep.records,
                "kept": rep.kept,
                "exact": rep.exact,
                "near": rep.near,
                "clusters": _Streamed(clusters, rep.n_clusters),
            },
        )
    print(f"wrote {args.out}")
    return 0


def cmd_contamination(args: argparse.Namespace) -> int:
    from tuneforge.data.fields import prompt_text
    from tuneforge.data.records import detect_format
    from tuneforge.datatools.quality import find_contamination
    from tuneforge.datatools.stream import read_stream

    _check_report_name(args.report)

    def prompts(path: str):
        for rec in read_stream(path):
            yield rec.source, prompt_text(rec.data, detect_format(rec.data) or "text")

    n_eval, found = find_contamination(
        prompts(args.train), prompts(args.eval), args.threshold, args.ngram, not args.exact_only
    )
    exact = sum(c.kind == "exact" for c in found)
    print(
        f"{args.eval}: {len(found)} of {n_eval} eval records ({len(found) / n_eval:.1%}) appear in "
        f"{args.train}: {exact} exact, {len(found) - exact} near (Jaccard >= {args.threshold:g})"
    )
    for c in found if args.all else found[:SHOW]:
        sign = "=" if c.kind == "exact" else f"~{c.similarity:.2f}"
        print(f"  {c.eval_source} {sign} {c.train_source}")
    if len(found) > SHOW and not args.all:
        print(f"  ... {len(found) - SHOW} more (--all lists them)")
    _write_report(
        args.report,
        {"eval_records": n_eval, "contaminated": [vars(c) for c in found]},
    )
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from tuneforge.datatools.mix import mix_files, parse_mix_arg

    sources = [parse_mix_arg(s) for s in args.sources]
    rep = mix_files(sources, args.out, args.total, args.seed)
    print(
        f"wrote {rep.total} records to {args.out}"
        + (" (as chat records)" if rep.converted_to_chat else "")
    )
    for s in rep.sources:
        note = (
            f", each used {s['used'] / s['records']:.2g} times" if s["used"] > s["records"] else ""
        )
        print(
            f"  {s['path']}: {s['used']} records ({s['used'] / rep.total:.1%}, asked "
            f"{s['ratio']:.1%}) from {s['records']}{note}"
        )
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from tuneforge.data.split import split_file

    rep, train_out, eval_out = split_file(
        args.file, args.eval, args.seed, args.stratify, args.train_out, args.eval_out
    )
    print(f"{args.file}: {rep.train} train records -> {train_out}, {rep.eval} eval -> {eval_out}")
    if rep.dropped_augmented:
        print(f"  dropped {rep.dropped_augmented} augmented records whose original is in eval")
    for value, (n, k) in sorted(rep.strata.items()):
        print(f"  {args.stratify}={value}: {k} of {n} in eval")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from tuneforge.datatools.augment import AugmentOptions, Paraphraser, augment_file

    opts = AugmentOptions(args.factor, args.mode, args.noise, args.seed)
    if opts.factor < 2:
        raise TuneforgeError(f"--factor must be at least 2, got {opts.factor}")
    if not 0 < opts.noise < 1:
        raise TuneforgeError(f"--noise must be in (0, 1), got {opts.noise}")
    paraphraser = None
    if args.mode != "noise":
        paraphraser = Paraphraser.load(args.model, seed=args.seed, temperature=args.temperature)
    rep = augment_file(args.file, args.out, opts, paraphraser)
    added = sum(rep.variants.values())
    kinds = ", ".join(f"{n} {k}" for k, n in rep.variants.most_common()) or "none"
    print(f"{args.file}: {rep.records} records + {added} variants ({kinds}) -> {args.out}")
    for why, n in rep.rejected.most_common():
        print(f"  paraphrase rejected ({why}), noise used instead: {n}")
    for why, n in rep.skipped.most_common():
        print(f"  skipped ({why}): {n}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tuneforge.datatools.convert import convert_file

    rep = convert_file(args.file, args.out, args.to, args.layout)
    layouts = ", ".join(f"{k}" for k in rep.layouts)
    print(f"{args.file}: converted {rep.records} {layouts} records to {args.to} -> {args.out}")
    return 0


def _dedup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threshold",
        type=float,
        default=0.85,
        help="Jaccard similarity from which records are near duplicates (default 0.85)",
    )
    p.add_argument("--ngram", type=int, default=2, help="words per shingle (default 2)")


def add_parsers(sub) -> None:
    """The ``data`` command group (called from ``cli.build_parser``)."""
    from tuneforge.datatools.augment import MODES
    from tuneforge.datatools.convert import LAYOUTS

    d = sub.add_parser(
        "data",
        help="see and fix data before training: validate, stats, clean, dedup, ...",
        description="Data preparation and quality. Outputs are JSONL, written only on success.",
    )
    ds = d.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = ds.add_parser(
        "validate", help="list every problem (file:line, field), then counts per kind"
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = ds.add_parser("stats", help="counts, token lengths, turns, duplicates, diversity")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer counts tokens")
    p.add_argument("--max-length", type=int, default=512, help="count records longer than this")
    p.add_argument("--plot", metavar="PNG", help="write a histogram of token lengths")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--no-tokens", action="store_true", help="skip token lengths (no tokenizer)")
    _dedup_options(p)
    p.set_defaults(func=cmd_stats)

    p = ds.add_parser("clean", help="normalise text; drop empty, short, over-long, broken records")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .jsonl")
    p.add_argument("--min-output-chars", type=int, default=1, help="drop shorter outputs (1)")
    p.add_argument("--max-chars", type=int, default=0, help="drop longer records (0: no limit)")
    p.add_argument(
        "--max-tokens", type=int, default=0, help="drop records longer in tokens (0: no limit)"
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer for --max-tokens")
    p.add_argument("--report", metavar="JSON", help="write every drop and its reason")
    p.set_defaults(func=cmd_clean)

    p = ds.add_parser("dedup", help="remove exact and near duplicates (MinHash LSH)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .jsonl")
    _dedup_options(p)
    p.add_argument("--exact-only", action="store_true", help="skip near-duplicate search")
    p.add_argument("--report", metavar="JSON", help="write every cluster removed")
    p.set_defaults(func=cmd_dedup)

    p = ds.add_parser("contamination", help="eval records found in the training data")
    p.add_argument("train", metavar="TRAIN")
    p.add_argument("eval", metavar="EVAL")
    _dedup_options(p)
    p.add_argument("--exact-only", action="store_true", help="skip near-duplicate search")
    p.add_argument("--all", action="store_true", help="list every contaminated record")
    p.add_argument("--report", metavar="JSON", help="write every match")
    p.set_defaults(func=cmd_contamination)

    p = ds.add_parser("mix", help="mix datasets by ratio: A.jsonl:0.8 B.jsonl:0.2 -o OUT")
    p.add_argument("sources", nargs="+", metavar="PATH:RATIO")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .jsonl")
    p.add_argument(
        "--total",
        type=int,
        default=None,
        help="records to write (default: as many as the sources hold without repeating any)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_mix)

    p = ds.add_parser("split", help="deterministic train/eval split, optionally stratified")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--eval", type=float, required=True, metavar="FRACTION", help="e.g. 0.1")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stratify", metavar="FIELD", help="keep each value's share (dotted path)")
    p.add_argument("--train-out", help="default: FILE's name + .train.jsonl")
    p.add_argument("--eval-out", help="default: FILE's name + .eval.jsonl")
    p.set_defaults(func=cmd_split)

    p = ds.add_parser("augment", help="paraphrases and light noise of the inputs, tagged")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .jsonl")
    p.add_argument("--factor", type=int, required=True, metavar="K", help="K x the records")
    p.add_argument("--mode", choices=MODES, default="both", help="variant kinds (default both)")
    p.add_argument("--noise", type=float, default=0.1, help="word dropout / swap probability")
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="paraphrasing model (or a run folder)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="paraphrase sampling")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_augment)

    p = ds.add_parser("convert", help="alpaca / ShareGPT / OpenAI layouts -> ours")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--to", required=True, choices=("chat", "instruction"))
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .jsonl")
    p.add_argument(
        "--from", dest="layout", default="auto", choices=("auto", *LAYOUTS), help="input layout"
    )
    p.set_defaults(func=cmd_convert)

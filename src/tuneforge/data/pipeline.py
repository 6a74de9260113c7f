"""The data steps ``train`` applies before rendering, as the config asks, for every objective.

Instruction / chat records (sft), preference pairs (reward, dpo) and prompts (ppo) take the same
path; only the last step, turning a record into what the objective trains on, differs
(``prepare_records``'s ``convert``). ``data.augment`` rewrites instructions and answers, so it is
for sft only (config validation refuses it elsewhere).

Order: read ``data.train`` -> ``data.clean`` -> ``data.dedup`` -> hold out eval (``data.eval`` or
``data.eval_split``; augmented records never go to eval) -> check every record -> warn if eval
prompts appear in train -> ``data.augment`` (train only) -> ``data.mix`` (other sources, each
cleaned and deduplicated the same way, added to train only). Every step that drops or adds
records says so in one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.config import DataConfig
from tuneforge.data.fields import prompt_text
from tuneforge.data.io import Record, read_records
from tuneforge.data.records import Messages, to_messages
from tuneforge.data.split import split_records
from tuneforge.datatools.augment import AugmentOptions, AugmentReport, augment_records, is_augmented
from tuneforge.datatools.mix import mix_records
from tuneforge.datatools.quality import (
    CleanOptions,
    CleanReport,
    DedupReport,
    clean_records,
    dedup_records,
    find_contamination,
)
from tuneforge.errors import TuneforgeError


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Train and eval items after the data steps (messages, pairs or prompts), with sources."""

    train: list = field(default_factory=list)
    train_sources: list[str] = field(default_factory=list)
    eval: list = field(default_factory=list)
    eval_sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what each step did (also logged)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _load(path: str, cfg: DataConfig, dedup: bool, log: Callable[[str], None]) -> list[Record]:
    records = read_records(path)
    if cfg.clean:
        rep = CleanReport()
        records = list(clean_records(records, CleanOptions(), rep))
        if rep.dropped or rep.changed:
            first = f"; e.g. {rep.drops[0][0]}: {rep.drops[0][2]}" if rep.drops else ""
            reasons = ", ".join(f"{n} {r}" for r, n in rep.dropped.most_common())
            log(
                f"data.clean: {path}: kept {rep.kept} of {rep.records} records "
                f"({rep.changed} normalised)" + (f", dropped {reasons}{first}" if reasons else "")
            )
        if not records:
            raise TuneforgeError(
                f"{path}: data.clean dropped every record; see `tuneforge data clean`"
            )
    if dedup:
        rep = DedupReport(log_duplicates=False)  # counts and the first one are printed
        records = list(dedup_records(records, rep, cfg.dedup_threshold))
        if rep.first is not None:
            d = rep.first
            log(
                f"data.dedup: {path}: dropped {rep.exact} exact and {rep.near} near duplicates "
                f"of {rep.records} records; e.g. {d.source} repeats {d.kept}"
            )
    return records


def contamination_warning(
    train: list[Messages],
    train_sources: list[str],
    evals: list[Messages],
    eval_sources: list[str],
    threshold: float,
    hint: str,
) -> str | None:
    """One line if eval prompts also appear in the training data, else None."""
    if not evals:
        return None
    n_eval, found = find_contamination(
        (
            (s, prompt_text({"messages": m}, "chat"))
            for m, s in zip(train, train_sources, strict=True)
        ),
        (
            (s, prompt_text({"messages": m}, "chat"))
            for m, s in zip(evals, eval_sources, strict=True)
        ),
        threshold,
    )
    if not found:
        return None
    exact = sum(c.kind == "exact" for c in found)
    e = found[0]
    sign = "=" if e.kind == "exact" else "~"
    return (
        f"warning: {len(found)} of {n_eval} eval records also appear in the training data "
        f"({exact} exact, {len(found) - exact} near duplicates), e.g. {e.eval_source} {sign} "
        f"{e.train_source}; the eval loss will look better than it is ({hint})"
    )


def prepare_conversations(
    cfg: DataConfig,
    seed: int,
    model=None,
    tokenizer=None,
    log: Callable[[str], None] = _stderr,
) -> Prepared:
    """Train and eval conversations (sft) after the configured data steps; see
    ``prepare_records``. ``model``, ``tokenizer``: for ``data.augment`` paraphrases."""
    return prepare_records(
        cfg,
        seed,
        record_converter(cfg, "sft"),
        lambda m: m,
        model=model,
        tokenizer=tokenizer,
        log=log,
    )


def record_converter(cfg: DataConfig, objective: str) -> Callable[[Record], Any]:
    """How one record becomes what ``objective`` trains on; a bad record raises its one-line
    error. The objectives' data preparation and the web UI's launch check both use it."""
    if objective == "sft":
        return lambda r: to_messages(r, cfg.format, cfg.system_prompt)
    if objective in ("reward", "dpo", "orpo", "simpo"):
        from tuneforge.data.preference import to_preference

        return lambda r: to_preference(r, cfg.system_prompt)
    if objective == "kto":
        from tuneforge.data.labelled import to_examples

        return lambda r: to_examples(r, cfg.system_prompt)
    if objective == "grpo":
        from tuneforge.data.preference import to_prompt_record

        return lambda r: to_prompt_record(r, cfg.system_prompt)
    if objective == "ppo":
        from tuneforge.data.preference import PROMPTS_NEED, prompt_messages

        return lambda r: prompt_messages(r, cfg.system_prompt, PROMPTS_NEED)
    raise ValueError(f"unknown objective {objective}")  # config validation prevents this


def prepare_records(
    cfg: DataConfig,
    seed: int,
    convert: Callable[[Record], object],
    prompt_of: Callable[[object], Messages],
    model=None,
    tokenizer=None,
    log: Callable[[str], None] = _stderr,
) -> Prepared:
    """Train and eval items after the configured data steps.

    Args:
        cfg: the data section of the config.
        seed: the training seed (eval split, augmentation and mixing depend on it).
        convert: a record -> the objective's item; raises the record's one-line error.
        prompt_of: an item -> its prompt messages (for the contamination check).
        model, tokenizer: the base model, for ``data.augment`` paraphrases.
        log: where the one-line notes go (stderr).

    Raises:
        TuneforgeError: a bad record (file:line: field), or a step that left nothing.
    """
    out = Prepared()

    def note(msg: str) -> None:
        out.notes.append(msg)
        log(msg)

    train = _load(cfg.train, cfg, cfg.dedup, note)
    if cfg.eval:
        evals = _load(cfg.eval, cfg, False, note)
        kept = [r for r in evals if not is_augmented(r.data)]
        if len(kept) < len(evals):
            note(f"data.eval: left out {_plural(len(evals) - len(kept), 'augmented record')}")
        evals = kept
        hint = f"see `tuneforge data contamination {cfg.train} {cfg.eval}`"
    elif cfg.eval_split > 0:
        train, evals, dropped = split_records(train, cfg.eval_split, seed)
        if dropped:
            note(
                f"data.eval_split: dropped {_plural(dropped, 'augmented record')} whose "
                "original is held out for eval"
            )
        hint = f"remove duplicates with `tuneforge data dedup {cfg.train}`"
    else:
        evals, hint = [], ""

    out.train = [convert(r) for r in train]
    out.train_sources = [r.source for r in train]
    out.eval = [convert(r) for r in evals]
    out.eval_sources = [r.source for r in evals]
    warning = contamination_warning(
        [prompt_of(x) for x in out.train],
        out.train_sources,
        [prompt_of(x) for x in out.eval],
        out.eval_sources,
        cfg.dedup_threshold,
        hint,
    )
    if warning:
        note(warning)

    if cfg.augment >= 2:
        paraphraser = None
        if cfg.augment_mode != "noise":
            if model is None or tokenizer is None:
                raise TuneforgeError("data.augment with paraphrases needs the model (pass model=)")
            from tuneforge.datatools.augment import Paraphraser

            paraphraser = Paraphraser(model, tokenizer, seed=seed)
        opts = AugmentOptions(cfg.augment, cfg.augment_mode, cfg.augment_noise, seed)
        rep = AugmentReport()
        originals = {id(r.data) for r in train}
        variants = [
            Record(d, f"{d['augmented_from']} ({d['augmentation']})")
            for d in augment_records(train, opts, paraphraser, rep)
            if id(d) not in originals
        ]
        out.train += [convert(r) for r in variants]
        out.train_sources += [r.source for r in variants]
        kinds = ", ".join(f"{n} {k}" for k, n in rep.variants.most_common()) or "none"
        rejected = sum(rep.rejected.values())
        note(
            f"data.augment: added {len(variants)} variants of {rep.records} records ({kinds})"
            + (f"; {rejected} paraphrases rejected and replaced by noise" if rejected else "")
        )

    if cfg.mix:
        others = [(e["path"], _load(e["path"], cfg, cfg.dedup, note), e["ratio"]) for e in cfg.mix]
        base = [Record({}, s) for s in out.train_sources]  # stand-ins: mix_records keeps them all
        mixed, notes = mix_records(base, others, seed)
        extra = mixed[len(base) :]
        out.train += [convert(r) for r in extra]
        out.train_sources += [r.source for r in extra]
        shares = ", ".join(f"{n['used']} from {n['path']} ({n['ratio']:.0%})" for n in notes)
        note(f"data.mix: {len(out.train)} training records: {len(base)} from {cfg.train}, {shares}")
    return out

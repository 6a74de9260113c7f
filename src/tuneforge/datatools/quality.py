"""Data quality: cleaning, exact and near-duplicate removal, train/eval contamination.

Exact duplicates share the hash of their normalised text (NFKC, case-folded, whitespace
collapsed). Near duplicates are found with MinHash LSH from the ``datasketch`` library over word
n-gram shingles: LSH proposes candidates, and a candidate counts only if the MinHash estimate of
the Jaccard similarity of the two shingle sets reaches the threshold (default 0.85). Records are
streamed; the first of a cluster is kept. The indexes live in unnamed temporary files (about
0.7 KB of disk per distinct record, see lsh_index.py and spill.py), and so does the list of
removed duplicates (``DuplicateLog``): memory stays flat however many records there are.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.fields import map_texts, record_text, response_texts
from tuneforge.data.io import Record
from tuneforge.data.records import detect_format
from tuneforge.datatools.lsh_index import KeySet, NearDuplicateIndex, SourceList
from tuneforge.datatools.spill import IntFile, Rows, Strings
from tuneforge.datatools.stream import atomic_output, dumps, read_stream
from tuneforge.datatools.validate import check_record
from tuneforge.errors import TuneforgeError

DEFAULT_THRESHOLD = 0.85
DEFAULT_NGRAM = 2
NUM_PERM = 128

# ---------------------------------------------------------------------------------------------
# Normalisation and cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # keeps \t and \n
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad]")  # zero-width space, word joiner, BOM, SHY
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def clean_text(text: str) -> str:
    """Unicode NFC, newlines as ``\\n``, control and invisible characters removed, odd spaces as
    plain spaces, no trailing spaces on a line, at most one blank line in a row, trimmed."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _INVISIBLE.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def normalize_for_match(text: str) -> str:
    """The form two texts are compared in: NFKC, case-folded, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str, normalized: bool = False) -> int:
    """64-bit hash of the normalised text (``normalized``: ``text`` already is)."""
    norm = text if normalized else normalize_for_match(text)
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, ngram: int = DEFAULT_NGRAM, normalized: bool = False) -> set[bytes]:
    """Word n-grams of the normalised text (the whole word sequence if it is shorter)."""
    norm = text if normalized else normalize_for_match(text)
    words = _WORD.findall(norm)
    if not words:
        return {norm.encode("utf-8")}
    if len(words) <= ngram:
        return {" ".join(words).encode("utf-8")}
    grams = zip(*(words[k:] for k in range(ngram)), strict=False)
    return {" ".join(g).encode("utf-8") for g in grams}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets."""
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class CleanOptions:
    min_output_chars: int = 1  # outputs shorter than this (after cleaning) are dropped
    max_chars: int = 0  # records longer than this in characters are dropped (0: no limit)
    max_tokens: int = 0  # ... in tokens, with ``count_tokens`` (0: no limit)
    count_tokens: Callable[[dict, str], int] | None = None


@dataclass
class CleanReport:
    records: int = 0
    kept: int = 0
    changed: int = 0  # kept records whose text cleaning changed
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    drops: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)


def clean_record(data: dict, fmt: str | None, opts: CleanOptions) -> tuple[dict | None, str, str]:
    """The cleaned record, or None with the reason and a detail saying why it was dropped.

    Reasons: ``unusable`` (train would refuse it), ``empty-output``, ``short-output``,
    ``too-long``.
    """
    if fmt is None:
        return None, "unusable", check_record(data, fmt)[0][2]
    warnings = ("identical-replies", "empty-user-turn")
    before = [p for p in check_record(data, fmt) if p[1] not in (*warnings, "empty")]
    if before:
        return None, "unusable", _detail(before[0])
    cleaned = map_texts(data, fmt, clean_text)
    for f, text in response_texts(cleaned, fmt):
        if not text:
            return None, "empty-output", f"{f} is empty after cleaning"
        if len(text) < opts.min_output_chars:
            return (
                None,
                "short-output",
                f"{f} has {len(text)} characters (< {opts.min_output_chars})",
            )
    after = [p for p in check_record(cleaned, fmt) if p[1] not in warnings]
    if after:
        return None, "unusable", _detail(after[0])
    if opts.max_chars:
        n = len(record_text(cleaned, fmt))
        if n > opts.max_chars:
            return None, "too-long", f"{n} characters (> {opts.max_chars})"
    if opts.max_tokens and opts.count_tokens is not None:
        n = opts.count_tokens(cleaned, fmt)
        if n > opts.max_tokens:
            return None, "too-long", f"{n} tokens (> {opts.max_tokens})"
    return cleaned, "", ""


def _detail(problem: tuple[str, str, str]) -> str:
    f, _, message = problem
    return f"{f}: {message}" if f else message


def clean_records(
    records: Iterable[Record], opts: CleanOptions, report: CleanReport
) -> Iterator[Record]:
    """Cleaned records in order; drops are counted (and listed) in ``report``."""
    for rec in records:
        report.records += 1
        fmt = detect_format(rec.data)
        cleaned, reason, detail = clean_record(rec.data, fmt, opts)
        if cleaned is None:
            report.dropped[reason] += 1
            report.drops.append((rec.source, reason, detail))
            continue
        report.kept += 1
        report.changed += cleaned != rec.data
        yield Record(cleaned, rec.source)


def clean_file(path: str | Path, out: str | Path, opts: CleanOptions) -> CleanReport:
    """Stream ``path`` through ``clean_records`` into ``out`` (written only on success).

    Raises:
        TuneforgeError: an unreadable line, mixed formats, an empty file, or nothing left.
    """
    report = CleanReport()
    with atomic_output(out, inputs=(path,)) as f:
        for rec in clean_records(read_stream(path), opts, report):
            f.write(dumps(rec.data))
        if report.kept == 0:
            raise TuneforgeError(f"{path}: every record was dropped ({_reasons(report.dropped)})")
    return report


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


# ---------------------------------------------------------------------------------------------
# Near duplicates: MinHash LSH (datasketch's MinHash; the disk-backed index is in lsh_index.py)


@dataclass
class Duplicate:
    source: str  # the record removed
    kept: str  # the first record of its cluster (kept)
    kind: str  # exact | near
    similarity: float
    cluster: int = field(default=-1, compare=False)  # 0, 1, ... in order of first duplicate


_DUP = struct.Struct("<qqqdb")  # source (string number), next of its cluster, cluster, sim, kind
_CLUSTER = struct.Struct("<qqqq")  # kept (string number), first and last duplicate, size
_KINDS = ("exact", "near")


@dataclass
class Cluster:
    """A kept record and the duplicates removed in its favour (read back from disk)."""

    kept: str
    size: int  # duplicates removed
    _log: DuplicateLog = field(repr=False)
    _first: int = field(repr=False)

    def removed(self) -> Iterator[Duplicate]:
        """The duplicates, in file order."""
        d = self._first
        while d >= 0:
            dup, d = self._log.duplicate(d, self.kept)
            yield dup


class DuplicateLog:
    """Every duplicate of a dedup pass in temporary files, chained per cluster, so a report
    holds counts only however many records are removed."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._strings = Strings(folder)
        self._dups = Rows(_DUP.size, folder)
        self._clusters = Rows(_CLUSTER.size, folder)

    def __len__(self) -> int:
        return len(self._dups)

    @property
    def n_clusters(self) -> int:
        return len(self._clusters)

    def add(self, dup: Duplicate) -> None:
        """Record ``dup``; its cluster is a known one or the next (``Deduper`` numbers them)."""
        d = len(self._dups)
        source = self._strings.append(dup.source)
        self._dups.add(_DUP.pack(source, -1, dup.cluster, dup.similarity, _KINDS.index(dup.kind)))
        c = dup.cluster
        if c == len(self._clusters):
            self._clusters.add(_CLUSTER.pack(self._strings.append(dup.kept), d, d, 1))
        elif 0 <= c < len(self._clusters):
            kept, first, last, size = _CLUSTER.unpack(self._clusters.row(c))
            self._dups.write(last * _DUP.size + 8, d.to_bytes(8, "little"))  # last's next
            self._clusters.write(c * _CLUSTER.size, _CLUSTER.pack(kept, first, d, size + 1))
        else:
            raise ValueError(f"cluster {c} after {len(self._clusters)} (one report per pass)")

    def duplicate(self, d: int, kept: str | None = None) -> tuple[Duplicate, int]:
        """Duplicate number ``d`` and the next of its cluster (-1: none)."""
        source, nxt, c, sim, kind = _DUP.unpack(self._dups.row(d))
        if kept is None:
            kept = self._strings[_CLUSTER.unpack(self._clusters.row(c))[0]]
        return Duplicate(self._strings[source], kept, _KINDS[kind], sim, c), nxt

    def clusters(self) -> Iterator[Cluster]:
        """The clusters in order of their first duplicate."""
        for c in range(len(self._clusters)):
            kept, first, _, size = _CLUSTER.unpack(self._clusters.row(c))
            yield Cluster(self._strings[kept], size, self, first)

    def close(self) -> None:
        """Delete the files."""
        self._strings.close()
        self._dups.close()
        self._clusters.close()


@dataclass
class DedupReport:
    """Counts of a dedup pass and the first duplicate; with ``log_duplicates`` every duplicate
    goes to temporary files in ``folder`` as it is found (read back by ``clusters()``) instead of
    memory. ``close()`` (or ``with``) deletes them. One report per pass."""

    records: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0
    first: Duplicate | None = None  # the first duplicate removed
    log_duplicates: bool = True
    folder: str | Path | None = None  # where the log's files live (None: the system temp folder)
    _log: DuplicateLog | None = field(default=None, repr=False, compare=False)

    def add(self, dup: Duplicate) -> None:
        """Count (and log) a removed duplicate."""
        if dup.kind == "exact":
            self.exact += 1
        else:
            self.near += 1
        if self.first is None:
            self.first = dup
        if self.log_duplicates:
            if self._log is None:
                self._log = DuplicateLog(self.folder)
            self._log.add(dup)

    @property
    def n_clusters(self) -> int:
        """Kept records with at least one duplicate (0 without ``log_duplicates``)."""
        return self._log.n_clusters if self._log is not None else 0

    def clusters(self) -> Iterator[Cluster]:
        """Each kept record with the duplicates removed in its favour, in order of first
        duplicate (none without ``log_duplicates``)."""
        return self._log.clusters() if self._log is not None else iter(())

    @property
    def duplicates(self) -> list[Duplicate]:
        """Every duplicate in the order found, read back into memory (for small passes)."""
        log = self._log
        return [log.duplicate(d)[0] for d in range(len(log))] if log is not None else []

    def close(self) -> None:
        """Delete the log's files."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DedupReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Deduper:
    """Decides, record by record, whether a text repeats one seen before (first one wins).

    Its indexes live in temporary files in ``folder`` (None: the system temp folder), so memory
    stays flat: ``close()`` (or ``with``) deletes them.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        ngram: int = DEFAULT_NGRAM,
        near: bool = True,
        folder: str | Path | None = None,
    ):
        # key = kept index
        self.index = NearDuplicateIndex(threshold, ngram, folder=folder) if near else None
        self._exact = KeySet(folder=folder)  # exact key -> kept index
        self._kept = SourceList(folder)  # kept index -> source
        self._cluster_of = IntFile(folder)  # kept index -> its cluster + 1 (0: none yet)
        self.n_clusters = 0  # kept records with a duplicate so far

    def check(self, text: str, source: str) -> Duplicate | None:
        """None if ``text`` is new (it is remembered), else what it duplicates."""
        norm = normalize_for_match(text)
        key = exact_key(norm, normalized=True)
        first = self._exact.find(key)
        if first >= 0:
            return self._duplicate(source, first, "exact", 1.0)
        signature = None
        if self.index is not None:
            signature = self.index.signature(norm, normalized=True)
            found = self.index.matches(signature)
            if found:
                first, sim = found[0]
                return self._duplicate(source, first, "near", sim)
        self._kept.append(source)
        self._exact.add(key)
        if signature is not None:
            self.index.add(signature)
        return None

    def _duplicate(self, source: str, first: int, kind: str, sim: float) -> Duplicate:
        cluster = self._cluster_of.get(first) - 1
        if cluster < 0:
            cluster, self.n_clusters = self.n_clusters, self.n_clusters + 1
            self._cluster_of.set(first, cluster + 1)
        return Duplicate(source, self._kept[first], kind, sim, cluster)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the indexes (write buffers; the rest is on disk)."""
        near = self.index.nbytes if self.index is not None else 0
        return self._exact.nbytes + self._kept.nbytes + near

    def close(self) -> None:
        """Delete the temporary files."""
        if self.index is not None:
            self.index.close()
        self._exact.close()
        self._kept.close()
        self._cluster_of.close()

    def __enter__(self) -> Deduper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dedup_records(
    records: Iterable[Record],
    report: DedupReport,
    threshold: float = DEFAULT_THRESHOLD,
    ngram: int = DEFAULT_NGRAM,
    near: bool = True,
    folder: str | Path | None = None,
) -> Iterator[Record]:
    """Records that repeat no earlier one (exactly, or nearly when ``near``), in order.

    Args:
        records: the records, streamed.
        report: a fresh report, filled in as records go.
        threshold: Jaccard similarity for near duplicates.
        ngram: words per shingle.
        near: also remove near duplicates (else exact ones only).
        folder: where the index's temporary files live (None: the system temp folder).
    """
    with Deduper(threshold, ngram, near, folder) as deduper:
        for rec in records:
            report.records += 1
            dup = deduper.check(record_text(rec.data, detect_format(rec.data)), rec.source)
            if dup is None:
                report.kept += 1
                yield rec
            else:
                report.add(dup)


def dedup_file(
    path: str | Path,
    out: str | Path,
    threshold: float = DEFAULT_THRESHOLD,
    ngram: int = DEFAULT_NGRAM,
    near: bool = True,
) -> DedupReport:
    """Stream ``path`` through ``dedup_records`` into ``out`` (written only on success).

    The index's and the report's temporary files go to ``out``'s folder; close the report (or
    use it in ``with``) when done with its clusters.
    """
    folder = Path(out).parent
    report = DedupReport(folder=folder)
    try:
        with atomic_output(out, inputs=(path,)) as f:
            kept = dedup_records(read_stream(path), report, threshold, ngram, near, folder)
            with contextlib.closing(kept):
                for rec in kept:
                    f.write(dumps(rec.data))
    except BaseException:
        report.close()
        raise
    return report


# ---------------------------------------------------------------------------------------------
# Contamination: eval prompts found in the training data


@dataclass
class Contaminated:
    eval_source: str
    train_source: str
    kind: str  # exact | near
    similarity: float


def find_contamination(
    train: Iterable[tuple[str, str]],
    evals: Iterable[tuple[str, str]],
    threshold: float = DEFAULT_THRESHOLD,
    ngram: int = DEFAULT_NGRAM,
    near: bool = True,
) -> tuple[int, list[Contaminated]]:
    """Eval prompts that also appear in the training data, exactly or nearly.

    The eval side (usually the small one) is indexed; the training side is streamed past it.

    Args:
        train: (source, prompt text) of each training record.
        evals: (source, prompt text) of each eval record.

    Returns:
        (number of eval records, the contaminated ones in eval order).
    """
    sources: list[str] = []
    exact: dict[int, list[int]] = {}
    index = NearDuplicateIndex(threshold, ngram) if near else None
    with contextlib.nullcontext() if index is None else index:
        for source, text in evals:
            i = len(sources)
            sources.append(source)
            if not text.strip():
                continue  # nothing to compare (a record without a prompt)
            exact.setdefault(exact_key(text), []).append(i)
            if index is not None:
                index.add(index.signature(text))
        found: dict[int, Contaminated] = {}
        for source, text in train:
            if not text.strip():
                continue
            for i in exact.get(exact_key(text), ()):
                if i not in found or found[i].kind == "near":
                    found[i] = Contaminated(sources[i], source, "exact", 1.0)
            if index is not None and len(found) < len(sources):
                for i, sim in index.matches(index.signature(text)):
                    if i not in found:
                        found[i] = Contaminated(sources[i], source, "near", sim)
    return len(sources), [found[i] for i in sorted(found)]

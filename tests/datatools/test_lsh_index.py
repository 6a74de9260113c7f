"""data.lsh_index: the disk-backed MinHash LSH index, key set and source list against in-memory
references (datasketch's MinHashLSH, a dict, a list), alone and as ``dedup`` uses them."""

import hashlib
import json
import os
import random

import numpy as np
import pytest
from datasketch import MinHashLSH

from tuneforge.cli import main
from tuneforge.data.fields import record_text
from tuneforge.datatools import lsh_index, spill
from tuneforge.datatools.lsh_index import KeySet, NearDuplicateIndex, SourceList
from tuneforge.datatools.quality import (
    Deduper,
    DedupReport,
    Duplicate,
    dedup_file,
    dedup_records,
    exact_key,
    normalize_for_match,
)
from tuneforge.datatools.stream import dumps, read_stream
from tuneforge.errors import TuneforgeError

from ..conftest import write_jsonl


class ReferenceIndex:
    """The index as it was before lsh_index.py: datasketch's in-memory MinHashLSH (bucket keys
    compressed to 8 bytes of blake2b) plus the signatures, candidates verified the same way."""

    def __init__(self, threshold: float, num_perm: int = 128):
        self.threshold = threshold
        self.lsh = MinHashLSH(
            threshold=threshold,
            num_perm=num_perm,
            weights=(0.1, 0.9),
            hashfunc=lambda b: hashlib.blake2b(b, digest_size=8).digest(),
        )
        self.signatures: list[np.ndarray] = []

    def matches(self, signature) -> list[tuple[int, float]]:
        candidates = self.lsh.query(signature)
        if not candidates:
            return []
        keys = np.array(candidates)
        sims = (np.array(self.signatures)[keys] == signature.hashvalues).mean(axis=1)
        found = [(int(k), float(s)) for k, s in zip(keys, sims, strict=True) if s >= self.threshold]
        return sorted(found, key=lambda x: (-x[1], x[0]))

    def add(self, signature) -> int:
        key = len(self.signatures)
        self.signatures.append(signature.hashvalues.copy())
        self.lsh.insert(key, signature, check_duplication=False)
        return key


def planted_texts(n: int, seed: int) -> list[str]:
    """Random 30-80 word texts; about 8% exact copies (case/space changed) and 25% copies of an
    earlier text with 1-8 words replaced: word-bigram Jaccard from ~0.95 down to ~0.5, so the
    index sees clear matches, near misses, and candidates that fail the threshold."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    texts: list[str] = []
    for _ in range(n):
        r = rng.random()
        if texts and r < 0.08:
            texts.append("  " + rng.choice(texts).upper())
        elif texts and r < 0.33:
            words = rng.choice(texts).split()
            for _ in range(rng.randint(1, 8)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(30, 80))))
    return texts


@pytest.mark.parametrize("threshold, n", [(0.85, 3000), (0.7, 600)])
def test_near_index_gives_datasketch_candidates_and_matches(threshold, n):
    """Every record is queried and then added (exact copies too, so buckets hold several
    records); starting from 64 slots per band, 3000 records cross five rehashes."""
    index, ref = NearDuplicateIndex(threshold, first_slots=64), ReferenceIndex(threshold)
    assert (index.bands, index.rows) == (ref.lsh.b, ref.lsh.r)
    queries_matched = queries_rejected = 0
    for text in planted_texts(n, seed=int(threshold * 100)):
        sig = index.signature(text)
        candidates, matches = index.candidates(sig), index.matches(sig)
        assert candidates == set(ref.lsh.query(sig))
        assert matches == ref.matches(sig)
        queries_matched += bool(matches)
        queries_rejected += len(candidates) > len(matches)
        assert index.add(sig) == ref.add(sig)
    assert index.size == n
    # the test covered what it claims: many matches, and candidates below the threshold
    assert queries_matched > n // 10 and queries_rejected > n // 50
    # on disk: signatures and chains (~600 bytes a record); in memory only the write buffers
    assert index.disk_bytes > 512 * n and index.nbytes <= (512 + 11 * 64) * 1024
    index.close()


def test_deduper_keeps_and_reports_as_the_reference():
    """Deduper (KeySet + SourceList + NearDuplicateIndex) against the plain version: a dict of
    exact keys, a list of sources, the datasketch index."""
    texts = planted_texts(1500, seed=3)
    deduper = Deduper()
    exact: dict[int, int] = {}
    kept: list[str] = []
    ref = ReferenceIndex(0.85)
    got, want = [], []
    for line, text in enumerate(texts, 1):
        source = f"data/train.jsonl:{line}"
        got.append(deduper.check(text, source))
        norm = normalize_for_match(text)
        key = exact_key(norm, normalized=True)
        sig = deduper.index.signature(norm, normalized=True)
        if key in exact:
            want.append(Duplicate(source, kept[exact[key]], "exact", 1.0))
        elif found := ref.matches(sig):
            want.append(Duplicate(source, kept[found[0][0]], "near", found[0][1]))
        else:
            exact[key] = len(kept)
            kept.append(source)
            ref.add(sig)
            want.append(None)
    assert got == want
    kinds = [d.kind for d in got if d is not None]
    assert kinds.count("exact") > 50 and kinds.count("near") > 50


def test_key_set_numbers_keys_across_rehashes_and_long_chains():
    rng = random.Random(0)
    keys = list(dict.fromkeys(rng.getrandbits(64) for _ in range(5000)))  # 64 -> 4096 slots
    keys += [(i + 1) << 40 for i in range(300)]  # all in one slot: a chain of 300
    ks = KeySet(first_slots=64)
    for i, key in enumerate(keys):
        assert ks.find(key) == -1
        assert ks.add(key) == i
    assert len(ks) == len(keys)
    assert [ks.find(k) for k in keys] == list(range(len(keys)))
    assert all(ks.find(k) == -1 for k in (rng.getrandbits(64) for _ in range(200)) if k not in keys)
    assert ks.find(301 << 40) == -1


def test_source_list_keeps_any_source():
    sources = SourceList()
    names = [f"a/b:c.jsonl:{line}" for line in range(1, 5001)] + ["x.jsonl:007", "no-line", "ü:1"]
    for name in names:
        sources.append(name)
    assert len(sources) == len(names) and [sources[i] for i in range(len(names))] == names
    with pytest.raises(IndexError):
        sources[len(names)]
    sources.close()


def reference_dedup(path, threshold: float = 0.85) -> tuple[str, dict]:
    """Dedup as it was with everything in memory: a dict of exact keys, a list of kept sources,
    datasketch's MinHashLSH (``ReferenceIndex``); the output file's text and the --report."""
    exact: dict[int, int] = {}
    kept: list[str] = []
    ref, signer = ReferenceIndex(threshold), NearDuplicateIndex(threshold)
    out, clusters = [], {}
    counts = {"records": 0, "kept": 0, "exact": 0, "near": 0}
    for rec in read_stream(path):
        counts["records"] += 1
        norm = normalize_for_match(record_text(rec.data, "instruction"))
        key = exact_key(norm, normalized=True)
        sig = signer.signature(norm, normalized=True)
        if key in exact:
            dup = {"source": rec.source, "kept": kept[exact[key]], "kind": "exact"}
            dup["similarity"] = 1.0
        elif found := ref.matches(sig):
            dup = {"source": rec.source, "kept": kept[found[0][0]], "kind": "near"}
            dup["similarity"] = found[0][1]
        else:
            exact[key] = len(kept)
            kept.append(rec.source)
            ref.add(sig)
            out.append(dumps(rec.data))
            counts["kept"] += 1
            continue
        counts[dup["kind"]] += 1
        clusters.setdefault(dup["kept"], []).append(dup)
    signer.close()
    clusters = [{"kept": k, "removed": dups} for k, dups in clusters.items()]
    return "".join(out), {**counts, "clusters": clusters}


def test_dedup_on_disk_gives_the_in_memory_output_and_report(tmp_path, monkeypatch, capsys):
    """`tuneforge data dedup` against ``reference_dedup`` on 4000 records, from 16 slots per
    band (8 rehashes, the last in 256 passes of 16 slots per band), with 64-byte write buffers:
    the same output bytes and the same --report (clusters in order, every removed record)."""
    monkeypatch.setattr(lsh_index, "_FIRST_SLOTS", 16)
    monkeypatch.setattr(lsh_index, "_SIGNATURE_BUFFER", 1024)
    monkeypatch.setattr(spill, "_BUFFER_BYTES", 64)
    monkeypatch.setattr(spill, "_BLOCK_BYTES", 256)
    monkeypatch.setattr(spill, "_REHASH_HEAD_BYTES", 64)
    rows = [{"instruction": "Say it.", "output": t} for t in planted_texts(4000, seed=5)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    want_text, want_report = reference_dedup(src)
    assert want_report["exact"] > 200 and want_report["near"] > 200, (
        want_report
    )  # many of both kinds
    rc = main(
        ["data", "dedup", str(src), "-o", str(tmp_path / "o.jsonl")]
        + ["--report", str(tmp_path / "r.json")]
    )
    assert rc == 0
    assert (tmp_path / "o.jsonl").read_text() == want_text
    assert (tmp_path / "r.json").read_text() == json.dumps(want_report, indent=2) + "\n"
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.endswith(f"in {len(want_report['clusters'])} clusters")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o.jsonl", "r.json"]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dedup_deletes_its_temporary_files_on_success_error_and_interrupt(tmp_path):
    rows = [{"text": t} for t in planted_texts(300, seed=7)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    before = open_files()
    with dedup_file(src, tmp_path / "o.jsonl") as rep:
        assert rep.exact > 0 and rep.near > 0 and open_files() > before  # the log is open
    assert open_files() == before
    with open(src, "a") as f:
        f.write('{"text": "cut off\n')
    with pytest.raises(TuneforgeError, match="in.jsonl:301: invalid JSON"):
        dedup_file(src, tmp_path / "o2.jsonl")
    assert open_files() == before

    def interrupted():
        yield from list(read_stream(tmp_path / "o.jsonl"))[:100]
        raise KeyboardInterrupt

    report = DedupReport(folder=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        list(dedup_records(interrupted(), report, folder=tmp_path))
    report.close()
    assert open_files() == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o.jsonl"]

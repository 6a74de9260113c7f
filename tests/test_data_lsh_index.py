"""data.lsh_index: the compact MinHash LSH index, key set and source list against references
(datasketch's MinHashLSH, a dict, a list)."""

import hashlib
import random

import numpy as np
import pytest
from datasketch import MinHashLSH

from tuneforge.data.lsh_index import KeySet, NearDuplicateIndex, SourceList
from tuneforge.data.quality import Deduper, Duplicate, exact_key, normalize_for_match


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
    if n > 2048:  # compact: well under datasketch's ~4 KB per record (signature: 512 bytes)
        assert index.nbytes < 1024 * n


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


def test_source_list_is_compact_for_one_file_and_falls_back_otherwise():
    one = SourceList()
    for line in range(1, 5001):
        one.append(f"a/b:c.jsonl:{line}")
    assert len(one) == 5000 and one._strings is None
    assert [one[i] for i in (0, 4096, 4999)] == [
        "a/b:c.jsonl:1",
        "a/b:c.jsonl:4097",
        "a/b:c.jsonl:5000",
    ]
    with pytest.raises(IndexError):
        one[5000]
    sources = ["x.jsonl:1", "x.jsonl:2", "x.jsonl:007", "y.jsonl:3", "x.jsonl:4", "no-line"]
    for cut in range(1, len(sources) + 1):  # the fallback keeps what came before, exactly
        mixed = SourceList()
        for s in sources[:cut]:
            mixed.append(s)
        assert [mixed[i] for i in range(len(mixed))] == sources[:cut]

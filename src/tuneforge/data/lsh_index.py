"""Compact in-memory indexes for deduplication: a MinHash LSH index, a set of 64-bit keys, and
the sources of kept records, held in flat arrays instead of Python objects.

``datasketch.MinHashLSH`` keeps, per band, a dict of bucket key -> Python set of record keys,
plus a list of band keys per record: about 4 KB per indexed record. Here a record costs its
signature (``num_perm`` uint32 values, 512 bytes at 128 permutations) and, per band, one int32
link in a bucket chain plus its share of the bucket heads (4 bytes per slot, between 0.5 and 1
slot per record): 580-600 bytes at 11 bands. The answers are the same as ``MinHashLSH.query``'s
(the records sharing a whole band with the query), verified and ranked as before.

Buckets are chained: ``heads[band, slot]`` is the newest record whose band hashes to ``slot``
and ``links[record, band]`` the next older one in that slot. A slot may hold several different
band values, so a chain member is a candidate only if its band values equal the query's.

Per-record arrays are lists of fixed-size ``array.array`` blocks, filled in order and never
resized: growing one flat array by ``realloc`` left the heap fragmented (RSS 2.4x the arrays'
bytes on the bench), and a numpy array doubled by copying holds both copies at once. Single
items of an ``array.array`` also read faster than numpy scalars.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterator

import numpy as np

from tuneforge.errors import TuneforgeError

_FIRST_SLOTS = 1 << 10  # bucket slots (per band) at the start
_MAX_LOAD = 2  # records per slot before the slots are doubled (a query walks ~1.5 per band)
_HASH_SEED = 20240607


def _check_slots(first_slots: int) -> int:
    if first_slots < 1 or first_slots & (first_slots - 1):
        raise ValueError(f"first_slots must be a power of 2, got {first_slots}")
    return first_slots


class _Rows:
    """Append-only rows of ``width`` items of one type, in blocks of 2**shift rows."""

    def __init__(self, typecode: str, width: int, shift: int = 12):
        self.typecode, self.width, self.shift = typecode, width, shift
        self.blocks: list[array] = []
        self.n = 0

    def append(self, row: array) -> int:
        """Store ``row`` (``width`` items, same typecode); returns its number."""
        k = self.n
        i = (k & ((1 << self.shift) - 1)) * self.width
        if i == 0:
            self.blocks.append(array(self.typecode, [0]) * (self.width << self.shift))
        self.blocks[-1][i : i + self.width] = row
        self.n += 1
        return k

    def views(self) -> Iterator[np.ndarray]:
        """The rows as numpy views (rows, width), one per block; writable."""
        for b, block in enumerate(self.blocks):
            rows = min(1 << self.shift, self.n - (b << self.shift))
            yield np.frombuffer(block, dtype=block.typecode).reshape(-1, self.width)[:rows]

    def set_column(self, j: int, values: np.ndarray) -> None:
        """Overwrite column ``j`` of every row with ``values`` (one per row)."""
        for b, view in enumerate(self.views()):
            view[:, j] = values[b << self.shift : (b << self.shift) + len(view)]

    @property
    def nbytes(self) -> int:
        return sum(block.itemsize * len(block) for block in self.blocks)


def _chains(slots: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(heads, links) of bucket chains for records 0..n-1 hashed to ``slots``: ``heads[s]`` is
    the newest record in slot s (-1: none), ``links[k]`` the next older record in k's slot."""
    order = np.argsort(slots, kind="stable")  # records of a slot together, oldest first
    ordered = slots[order]
    same = ordered[1:] == ordered[:-1]
    links = np.full(len(slots), -1, dtype=np.int32)
    links[order[1:][same]] = order[:-1][same]
    heads = np.full(n_slots, -1, dtype=np.int32)
    last = np.append(~same, True)  # the newest record of each slot
    heads[ordered[last]] = order[last]
    return heads, links


class KeySet:
    """A set of 64-bit keys (uniformly distributed, e.g. a blake2b digest), numbered in order of
    addition: 12 bytes per key plus 2-4 bytes of bucket heads, instead of a dict's ~100.

    Args:
        first_slots: buckets to start with (a power of 2); doubled as keys come.
    """

    def __init__(self, first_slots: int = _FIRST_SLOTS) -> None:
        self._keys = _Rows("Q", 1)
        self._links = _Rows("i", 1)
        self._n_slots = _check_slots(first_slots)
        self._heads = array("i", [-1]) * self._n_slots

    def __len__(self) -> int:
        return self._keys.n

    def find(self, key: int) -> int:
        """The number of ``key`` (0, 1, ... in order of addition), or -1 if it was never added."""
        s, m = self._keys.shift, (1 << self._keys.shift) - 1
        keys, links = self._keys.blocks, self._links.blocks
        k = self._heads[key & (self._n_slots - 1)]
        while k >= 0:
            if keys[k >> s][k & m] == key:
                return k
            k = links[k >> s][k & m]
        return -1

    def add(self, key: int) -> int:
        """Add ``key`` (not in the set yet: see ``find``); returns its number."""
        slot = key & (self._n_slots - 1)
        k = self._keys.append(array("Q", [key]))
        self._links.append(array("i", [self._heads[slot]]))
        self._heads[slot] = k
        if k + 1 > _MAX_LOAD * self._n_slots:
            self._rehash(2 * self._n_slots)
        return k

    def _rehash(self, n_slots: int) -> None:
        keys = np.concatenate([v[:, 0] for v in self._keys.views()])
        heads, links = _chains((keys & np.uint64(n_slots - 1)).astype(np.int32), n_slots)
        self._links.set_column(0, links)
        self._heads, self._n_slots = array("i", heads.tobytes()), n_slots

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (allocated blocks included)."""
        return self._keys.nbytes + self._links.nbytes + 4 * len(self._heads)


class SourceList:
    """Sources ("file:line") of kept records: one int32 per record and the file name once while
    every source is a line of the same file; a plain list of strings otherwise."""

    def __init__(self) -> None:
        self._file: str | None = None
        self._lines = _Rows("i", 1)
        self._strings: list[str] | None = None

    def __len__(self) -> int:
        return len(self._strings) if self._strings is not None else self._lines.n

    def __getitem__(self, i: int) -> str:
        if self._strings is not None:
            return self._strings[i]
        if not 0 <= i < self._lines.n:
            raise IndexError(i)
        s = self._lines.shift
        return f"{self._file}:{self._lines.blocks[i >> s][i & ((1 << s) - 1)]}"

    def append(self, source: str) -> None:
        """Remember ``source`` as the next record's."""
        if self._strings is None:
            file, _, line = source.rpartition(":")
            if (
                (self._file is None or file == self._file)
                and line.isascii()
                and line.isdigit()
                and str(int(line)) == line
                and int(line) < 2**31
            ):
                self._file = file
                self._lines.append(array("i", [int(line)]))
                return
            self._strings = [self[i] for i in range(self._lines.n)]
            self._lines = _Rows("i", 1)
        self._strings.append(source)


class NearDuplicateIndex:
    """MinHash signatures (``datasketch.MinHash``) under LSH banding; ``matches`` returns the
    indexed records whose estimated Jaccard similarity reaches the threshold.

    Candidates are the records that share at least one whole band with the query, as in
    ``datasketch.MinHashLSH`` (same band and row counts); the estimate is the share of equal
    signature values.

    Args:
        threshold: the estimated Jaccard similarity from which an indexed record matches.
        ngram: words per shingle.
        num_perm: MinHash permutations (signature length).
        first_slots: buckets per band to start with (a power of 2); doubled as records come.
    """

    def __init__(
        self,
        threshold: float = 0.85,
        ngram: int = 2,
        num_perm: int = 128,
        first_slots: int = _FIRST_SLOTS,
    ):
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold <= 1:
            raise TuneforgeError(f"the similarity threshold must be in (0, 1], got {threshold}")
        if ngram < 1:
            raise TuneforgeError(f"the shingle size must be at least 1 word, got {ngram}")
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        # Weights favour recall over precision: candidates are verified against the signatures,
        # so a false candidate costs a comparison while a missed one is a duplicate kept. At 0.85
        # this gives 11 bands of 11 rows: a pair with Jaccard 0.9 is a candidate with
        # probability 0.98, one with 0.5 with probability 0.005. (Only datasketch's parameter
        # choice is used from MinHashLSH; the index itself is below.)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.bands, self.rows = lsh.b, lsh.r
        # crc32 as the shingle hash: a C call, several times faster than datasketch's default
        # sha1 from Python; the affine32 scheme mixes it (murmur3 finalizer) before permuting.
        self._empty = MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)
        if self._empty.hashvalues.dtype != np.uint32:
            raise RuntimeError("expected datasketch's 32-bit MinHash values (affine32 scheme)")
        # Band values -> slot: a multilinear hash mod 2**64 with random odd multipliers, top bits.
        rng = np.random.default_rng(_HASH_SEED)
        self._mult = rng.integers(0, 2**63, size=(self.bands, self.rows), dtype=np.uint64) * 2 + 1
        self._signatures = _Rows("I", num_perm, shift=11)  # 1 MB blocks at 128 permutations
        self._links = _Rows("i", self.bands)  # record k's link in band b: row k, column b
        self._n_slots = _check_slots(first_slots)
        self._heads = array("i", [-1]) * (self.bands * self._n_slots)  # band b's slots at b * n
        self._last: tuple[bytes, list[int]] | None = None  # the last query's slots

    @property
    def size(self) -> int:
        """The number of indexed records."""
        return self._signatures.n

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (allocated blocks included)."""
        return self._signatures.nbytes + self._links.nbytes + 4 * len(self._heads)

    def signature(self, text: str, normalized: bool = False):
        """The ``datasketch.MinHash`` of ``text``'s shingles."""
        from tuneforge.data.quality import shingles

        m = self._empty.copy()
        m.update_batch(shingles(text, self.ngram, normalized))
        return m

    def _band_slots(self, values: np.ndarray, n_slots: int) -> np.ndarray:
        """(records, bands) slots of signatures ``values`` (records, num_perm)."""
        bands = values[:, : self.bands * self.rows].reshape(-1, self.bands, self.rows)
        mixed = (bands.astype(np.uint64) * self._mult).sum(axis=2, dtype=np.uint64)
        return ((mixed >> np.uint64(32)) & np.uint64(n_slots - 1)).astype(np.int32)

    def _slots(self, values: np.ndarray, raw: bytes) -> list[int]:
        # matches() then add() of the same signature hash its bands once
        if self._last is not None and self._last[0] == raw:
            return self._last[1]
        slots = self._band_slots(values[None], self._n_slots)[0].tolist()
        self._last = (raw, slots)
        return slots

    def candidates(self, signature) -> set[int]:
        """Indexed records that share a whole band with ``signature`` (``MinHashLSH.query``)."""
        values = signature.hashvalues
        raw = values.tobytes()
        query = array("I", raw)
        found = set()
        n, p, r, b = self._n_slots, self.num_perm, self.rows, self.bands
        sigs, s_sig = self._signatures.blocks, self._signatures.shift
        links, s_link = self._links.blocks, self._links.shift
        m_sig, m_link = (1 << s_sig) - 1, (1 << s_link) - 1
        for band, slot in enumerate(self._slots(values, raw)):
            k = self._heads[band * n + slot]
            lo = band * r
            want = query[lo : lo + r]
            while k >= 0:
                start = (k & m_sig) * p + lo
                if sigs[k >> s_sig][start : start + r] == want:
                    found.add(k)
                k = links[k >> s_link][(k & m_link) * b + band]
        return found

    def matches(self, signature) -> list[tuple[int, float]]:
        """(key, estimated Jaccard) of indexed records at or above the threshold, best first."""
        found = self.candidates(signature)
        if not found:
            return []
        keys = sorted(found)
        s, m, p = self._signatures.shift, (1 << self._signatures.shift) - 1, self.num_perm
        blocks = self._signatures.blocks
        rows = b"".join(blocks[k >> s][(k & m) * p : ((k & m) + 1) * p].tobytes() for k in keys)
        stored = np.frombuffer(rows, dtype=np.uint32).reshape(len(keys), p)
        sims = (stored == signature.hashvalues).mean(axis=1)
        found = [(k, float(x)) for k, x in zip(keys, sims, strict=True) if x >= self.threshold]
        return sorted(found, key=lambda x: (-x[1], x[0]))

    def add(self, signature) -> int:
        """Index a signature; returns its key (0, 1, 2, ... in order of addition)."""
        values = signature.hashvalues
        if values.dtype != np.uint32 or len(values) != self.num_perm:
            raise ValueError(f"expected {self.num_perm} uint32 MinHash values")
        raw = values.tobytes()
        key = self._signatures.n
        n = self._n_slots
        links = array("i")
        for band, slot in enumerate(self._slots(values, raw)):
            i = band * n + slot
            links.append(self._heads[i])
            self._heads[i] = key
        self._links.append(links)
        self._signatures.append(array("I", raw))
        self._last = None
        if key + 1 > _MAX_LOAD * n:
            self._rehash(2 * n)
        return key

    def _rehash(self, n_slots: int) -> None:
        # the uint64 temporaries of the hash stay at one block (2048 records)
        slots = np.concatenate([self._band_slots(v, n_slots) for v in self._signatures.views()])
        self._heads = array("i")  # rebuilt from scratch, in place (no second copy)
        self._heads = array("i", [-1]) * (self.bands * n_slots)
        heads = np.frombuffer(self._heads, dtype=np.int32).reshape(self.bands, n_slots)
        for band in range(self.bands):
            heads[band], links = _chains(slots[:, band], n_slots)
            self._links.set_column(band, links)
        del heads  # releases the buffer
        self._n_slots = n_slots

"""Indexes for deduplication that live in temporary files, so memory stays flat however many
records are indexed: a MinHash LSH index, a set of 64-bit keys, and the sources of kept records.

``datasketch.MinHashLSH`` keeps, per band, a dict of bucket key -> Python set of record keys,
plus a list of band keys per record: about 4 KB of memory per indexed record. Here a record
costs no memory: its signature (``num_perm`` uint32 values, 512 bytes at 128 permutations) and,
per band, a 32-bit hash of the band's values and an int32 link in a bucket chain (8 bytes) go
to temporary files (``datatools/spill.py``), with the bucket heads (4 bytes per slot and band, 1 to 2
slots per record): 640-690 bytes of disk per record at 11 bands, read back with ``pread``
(served from the kernel's page cache, which is not the process's memory). The answers are the
same as ``MinHashLSH.query``'s (the records sharing a whole band with the query), verified and
ranked as before.

A query reads one bucket head per band and walks its chain (0.5 to 1 record per band), one
``pread`` per step; a record whose band hash equals the query's is a candidate once its stored
signature shows the whole band equal (a 32-bit hash may collide). Adding a record writes one
head per band; its signature and chain entries are appended through small write buffers.
Against the same index in memory this costs about 30 syscalls per distinct record (~1 µs each):
15-20% more CPU time for ``dedup`` on the bench (docs/data.md).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from tuneforge.datatools.spill import ChainTable, Rows, Strings
from tuneforge.errors import TuneforgeError

_FIRST_SLOTS = 1 << 10  # bucket slots (per band) at the start
_HASH_SEED = 20240607
_SIGNATURE_BUFFER = 1 << 19  # signature bytes held before they are written out


class KeySet:
    """A set of 64-bit keys (uniformly distributed, e.g. a blake2b digest), numbered in order of
    addition, in temporary files (12 bytes per key, 4-8 of bucket heads).

    Args:
        first_slots: buckets to start with (a power of 2; None: 1024); doubled as keys come.
        folder: where the files live (None: the system temp folder).
    """

    def __init__(self, first_slots: int | None = None, folder: str | Path | None = None) -> None:
        self._chains = ChainTable(
            1, first_slots or _FIRST_SLOTS, folder
        )  # hash: the key's low 32 bits
        self._keys = Rows(8, folder)
        self._last: tuple[int, list[int]] | None = None  # find() then add() of a key

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, key: int) -> int:
        """The number of ``key`` (0, 1, ... in order of addition), or -1 if it was never added."""
        low = [key & 0xFFFFFFFF]
        heads = self._chains.heads(low)
        self._last = (key, heads)
        for k, _ in self._chains.matches(low, heads):
            if int.from_bytes(self._keys.row(k), "little") == key:
                return k
        return -1

    def add(self, key: int) -> int:
        """Add ``key`` (not in the set yet: see ``find``); returns its number."""
        low = [key & 0xFFFFFFFF]
        heads = self._last[1] if self._last is not None and self._last[0] == key else None
        self._last = None
        self._keys.add(key.to_bytes(8, "little"))
        return self._chains.add(low, heads)

    def close(self) -> None:
        """Delete the files."""
        self._chains.close()
        self._keys.close()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (write buffers)."""
        return self._chains.nbytes + self._keys.nbytes


class SourceList(Strings):
    """Sources ("file:line") of kept records, in order, in temporary files."""


class NearDuplicateIndex:
    """MinHash signatures (``datasketch.MinHash``) under LSH banding; ``matches`` returns the
    indexed records whose estimated Jaccard similarity reaches the threshold.

    Candidates are the records that share at least one whole band with the query, as in
    ``datasketch.MinHashLSH`` (same band and row counts); the estimate is the share of equal
    signature values. Signatures and buckets live in temporary files: ``close`` (or ``with``)
    deletes them.

    Args:
        threshold: the estimated Jaccard similarity from which an indexed record matches.
        ngram: words per shingle.
        num_perm: MinHash permutations (signature length).
        first_slots: buckets per band to start with (a power of 2; None: 1024); doubled as
            records come.
        folder: where the files live (None: the system temp folder).
    """

    def __init__(
        self,
        threshold: float = 0.85,
        ngram: int = 2,
        num_perm: int = 128,
        first_slots: int | None = None,
        folder: str | Path | None = None,
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
        # Band values -> 32-bit hash: a multilinear hash mod 2**64 with random odd multipliers,
        # top bits (its low bits pick the bucket slot).
        rng = np.random.default_rng(_HASH_SEED)
        self._mult = rng.integers(0, 2**63, size=(self.bands, self.rows), dtype=np.uint64) * 2 + 1
        self._signatures = Rows(4 * num_perm, folder, _SIGNATURE_BUFFER)
        self._chains = ChainTable(self.bands, first_slots or _FIRST_SLOTS, folder)
        self._last: tuple[bytes, list[int], list[int]] | None = None  # a query's hashes, heads

    @property
    def size(self) -> int:
        """The number of indexed records."""
        return len(self._signatures)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (write buffers); the index itself is on disk."""
        return self._signatures.nbytes + self._chains.nbytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the temporary files."""
        return self._signatures.size + self._chains.disk_bytes

    def signature(self, text: str, normalized: bool = False):
        """The ``datasketch.MinHash`` of ``text``'s shingles."""
        from tuneforge.datatools.quality import shingles

        m = self._empty.copy()
        m.update_batch(shingles(text, self.ngram, normalized))
        return m

    def _lookup(self, values: np.ndarray, raw: bytes) -> tuple[list[int], list[int]]:
        # matches() then add() of the same signature hash its bands and read the heads once
        if self._last is not None and self._last[0] == raw:
            return self._last[1], self._last[2]
        bands = values[: self.bands * self.rows].reshape(self.bands, self.rows)
        mixed = (bands.astype(np.uint64) * self._mult).sum(axis=1, dtype=np.uint64)
        hashes = (mixed >> np.uint64(32)).tolist()
        heads = self._chains.heads(hashes)
        self._last = (raw, hashes, heads)
        return hashes, heads

    def _candidates(self, signature) -> dict[int, bytes]:
        """Candidate record -> its stored signature."""
        values = signature.hashvalues
        raw = values.tobytes()
        hashes, heads = self._lookup(values, raw)
        found: dict[int, bytes] = {}
        width = 4 * self.rows
        for k, band in self._chains.matches(hashes, heads):
            if k in found:
                continue
            stored = self._signatures.row(k)
            lo = band * width
            if stored[lo : lo + width] == raw[lo : lo + width]:  # the whole band, not its hash
                found[k] = stored
        return found

    def candidates(self, signature) -> set[int]:
        """Indexed records that share a whole band with ``signature`` (``MinHashLSH.query``)."""
        return set(self._candidates(signature))

    def matches(self, signature) -> list[tuple[int, float]]:
        """(key, estimated Jaccard) of indexed records at or above the threshold, best first."""
        found = self._candidates(signature)
        if not found:
            return []
        keys = sorted(found)
        rows = b"".join(found[k] for k in keys)
        stored = np.frombuffer(rows, dtype=np.uint32).reshape(len(keys), self.num_perm)
        sims = (stored == signature.hashvalues).mean(axis=1)
        found = [(k, float(x)) for k, x in zip(keys, sims, strict=True) if x >= self.threshold]
        return sorted(found, key=lambda x: (-x[1], x[0]))

    def add(self, signature) -> int:
        """Index a signature; returns its key (0, 1, 2, ... in order of addition)."""
        values = signature.hashvalues
        if values.dtype != np.uint32 or len(values) != self.num_perm:
            raise ValueError(f"expected {self.num_perm} uint32 MinHash values")
        raw = values.tobytes()
        hashes, heads = self._lookup(values, raw)
        self._last = None
        self._signatures.add(raw)
        return self._chains.add(hashes, heads)

    def close(self) -> None:
        """Delete the temporary files."""
        self._signatures.close()
        self._chains.close()

    def __enter__(self) -> NearDuplicateIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""data.spill: tables in temporary files (bytes, rows, strings, sparse ints, hash chains) against
plain in-memory references, with buffers and rebuild ranges shrunk so every path is taken."""

import errno
import os
import random

import pytest

from tuneforge.datatools import spill
from tuneforge.datatools.spill import ChainTable, IntFile, Rows, SpillFile, Strings
from tuneforge.errors import TuneforgeError


@pytest.fixture
def tiny_buffers(monkeypatch):
    """Write buffers of 64 bytes, rebuild blocks of 96 bytes (12 chain entries) and rebuilt heads
    of 64 bytes (16 slots): reads cross the buffer's edge, rehashes take many passes."""
    monkeypatch.setattr(spill, "_BUFFER_BYTES", 64)
    monkeypatch.setattr(spill, "_BLOCK_BYTES", 96)
    monkeypatch.setattr(spill, "_REHASH_HEAD_BYTES", 64)


def test_spill_file_reads_and_overwrites_across_the_buffer_edge(tmp_path, tiny_buffers):
    f, ref = SpillFile(tmp_path), bytearray()
    rng = random.Random(0)
    for i in range(200):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
        assert f.append(data) == len(ref)
        ref += data
        if i % 7 == 0:  # overwrite a range that may straddle the written part and the buffer
            at = rng.randrange(len(ref))
            new = bytes(rng.getrandbits(8) for _ in range(min(30, len(ref) - at)))
            f.write(at, new)
            ref[at : at + len(new)] = new
        at = rng.randrange(len(ref))
        size = rng.randint(0, len(ref) - at)
        assert f.read(at, size) == ref[at : at + size]
    assert 0 < f.flushed < f.size == len(ref) and f.nbytes < 64 + 40
    assert f.read(0, len(ref)) == ref
    assert os.listdir(tmp_path) == []  # unnamed: nothing to clean up, ever
    f.close()


def test_rows_strings_and_sparse_ints_round_trip(tmp_path, tiny_buffers):
    rows = Rows(12, tmp_path)
    data = [i.to_bytes(12, "little") for i in range(100)]
    assert [rows.add(d) for d in data] == list(range(100))
    assert [rows.row(k) for k in range(100)] == data and len(rows) == 100
    assert b"".join(b for _, b in rows.blocks()) == b"".join(data)  # 8 rows a block
    strings = Strings(tmp_path)
    texts = [
        "",
        "data/a:b.jsonl:1",
        "zürich/日本.jsonl:22",
        "x" * 300,
        "line\nbreak",
        "bad\udcff.jsonl:3",
    ]
    assert [strings.append(t) for t in texts * 3] == list(range(18))
    assert [strings[i] for i in range(18)] == texts * 3
    with pytest.raises(IndexError):
        strings[18]
    ints = IntFile(tmp_path)
    assert ints.get(10**6) == 0  # never written (past the end of the file)
    ints.set(10**6, -7)
    ints.set(3, 2**31 - 1)
    assert (ints.get(10**6), ints.get(3), ints.get(4)) == (-7, 2**31 - 1, 0)
    for t in (rows, strings, ints):
        t.close()


@pytest.mark.parametrize("bands", [1, 3])
def test_chain_table_finds_every_equal_hash_across_multi_pass_rehashes(
    tmp_path, tiny_buffers, bands
):
    """3000 records from 4 slots per band: 10 rehashes, the later ones in up to 256 passes of 16
    slots; hashes drawn from a small pool so slots hold several records and several hashes."""
    rng = random.Random(bands)
    pool = [rng.getrandbits(32) for _ in range(700)]
    table = ChainTable(bands, first_slots=4, folder=tmp_path)
    ref: list[dict[int, list[int]]] = [{} for _ in range(bands)]  # band -> hash -> records
    for k in range(3000):
        hashes = [rng.choice(pool) for _ in range(bands)]
        want = sorted((r, b) for b, h in enumerate(hashes) for r in ref[b].get(h, []))
        assert sorted(table.matches(hashes, table.heads(hashes))) == want
        assert table.add(hashes) == k
        for b, h in enumerate(hashes):
            ref[b].setdefault(h, []).append(k)
    assert table.n_slots == 4096 and len(table) == 3000
    for h in pool[:50]:  # newest first along a chain
        found = [r for r, b in table.matches([h] * bands, table.heads([h] * bands)) if b == 0]
        assert found == sorted(ref[0].get(h, []), reverse=True)
    table.close()


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    """A full disk cannot be arranged in a test: os.pwrite is replaced by one that fails as the
    kernel does (ENOSPC)."""
    f = SpillFile(tmp_path, buffer_bytes=8)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill.os, "pwrite", full)
    with pytest.raises(TuneforgeError, match=f"^{tmp_path}: no space left for the dedup index"):
        f.append(b"0123456789")

"""Tables kept in temporary files instead of memory, so an index over a large file leaves the
process's memory flat: bytes appended to an unnamed temporary file and read back with
``os.pread`` (the newest bytes wait in a small write buffer), and hash chains on top of them.

Files are read and written with ``pread`` / ``pwrite``, never mapped: mapped pages count in the
process's resident memory, while the kernel's page cache that serves ``pread`` does not (and is
given back under memory pressure). The files are created unnamed (``tempfile.TemporaryFile``:
``O_TMPFILE`` on Linux, else unlinked at once), so nothing is left behind, whether the process
ends normally, by an exception or ``KeyboardInterrupt``, or is killed; ``close`` frees the space
at once. ``folder`` None means the system temp folder (``TMPDIR``).
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tuneforge.errors import TuneforgeError

_BUFFER_BYTES = 1 << 17  # appended bytes held before they are written out
_BLOCK_BYTES = 1 << 19  # rows read at a time when chains are rebuilt
_REHASH_HEAD_BYTES = 1 << 21  # bucket heads rebuilt at a time (slot ranges past this: passes)
_MAX_LOAD = 1  # records per slot before the slots are doubled (a query walks ~0.75 per band)
_ENTRY = struct.Struct("<Ii")  # one band of a chain row: the record's hash, the next older record
_INT = struct.Struct("<i")


def _temp_file(folder: str | Path | None):
    try:
        return tempfile.TemporaryFile(dir=folder)
    except OSError as e:
        where = folder if folder is not None else tempfile.gettempdir()
        raise TuneforgeError(
            f"{where}: cannot create a temporary file for the dedup index ({e.strerror})"
        ) from None


def _pwrite(fd: int, data, offset: int, folder: str | Path | None) -> None:
    try:
        n = os.pwrite(fd, data, offset)
        if n < len(data):  # a short write: go on with the rest
            view = memoryview(data)[n:]
            while view:
                n = os.pwrite(fd, view, offset + len(data) - len(view))
                view = view[n:]
    except OSError as e:
        _disk_error(e, folder)


def _disk_error(e: OSError, folder: str | Path | None) -> None:
    """Raise ``e`` again, or a one-line ``TuneforgeError`` if the disk is full."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise e
    where = folder if folder is not None else tempfile.gettempdir()
    raise TuneforgeError(
        f"{where}: no space left for the dedup index's temporary files (about 0.7 KB per "
        "distinct record); free some space, or point TMPDIR / the output elsewhere"
    ) from None


class SpillFile:
    """Bytes appended to an unnamed temporary file; any range can be read or overwritten.

    Args:
        folder: where the file lives (None: the system temp folder).
        buffer_bytes: appended bytes held in memory before they are written out (None: 128 KiB).
    """

    def __init__(self, folder: str | Path | None = None, buffer_bytes: int | None = None):
        self.folder = folder
        self._file = _temp_file(folder)
        self.fd = self._file.fileno()
        self.buffer_bytes = _BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        self.tail = bytearray()  # bytes from ``flushed`` on, not written yet
        self.flushed = 0
        self.size = 0  # bytes appended in all

    def append(self, data: bytes) -> int:
        """Add ``data`` at the end; returns its offset."""
        offset = self.size
        self.tail += data
        self.size += len(data)
        if len(self.tail) >= self.buffer_bytes:
            self.flush()
        return offset

    def flush(self) -> None:
        """Write the buffered bytes out."""
        if self.tail:
            _pwrite(self.fd, self.tail, self.flushed, self.folder)
            self.flushed = self.size
            self.tail = bytearray()

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (which must have been appended)."""
        flushed = self.flushed
        if offset >= flushed:
            i = offset - flushed
            return bytes(self.tail[i : i + size])
        if offset + size <= flushed:
            return os.pread(self.fd, size, offset)
        head = os.pread(self.fd, flushed - offset, offset)
        return head + bytes(self.tail[: size - len(head)])

    def write(self, offset: int, data: bytes) -> None:
        """Overwrite appended bytes from ``offset`` with ``data`` (within the appended size)."""
        flushed = self.flushed
        if offset >= flushed:
            i = offset - flushed
            self.tail[i : i + len(data)] = data
        elif offset + len(data) <= flushed:
            _pwrite(self.fd, data, offset, self.folder)
        else:
            _pwrite(self.fd, data[: flushed - offset], offset, self.folder)
            self.tail[: offset + len(data) - flushed] = data[flushed - offset :]

    def close(self) -> None:
        """Delete the file (its space is freed; reads fail from now on)."""
        self._file.close()
        self.tail = bytearray()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the write buffer)."""
        return len(self.tail)


class Rows(SpillFile):
    """Fixed-size rows appended to a temporary file, numbered 0, 1, ... in order."""

    def __init__(
        self,
        row_bytes: int,
        folder: str | Path | None = None,
        buffer_bytes: int | None = None,
    ):
        super().__init__(folder, buffer_bytes)
        self.row_bytes = row_bytes

    def __len__(self) -> int:
        return self.size // self.row_bytes

    def add(self, row: bytes) -> int:
        """Append ``row`` (``row_bytes`` long); returns its number."""
        return self.append(row) // self.row_bytes

    def row(self, k: int) -> bytes:
        """Row ``k``'s bytes."""
        return self.read(k * self.row_bytes, self.row_bytes)

    def blocks(self) -> Iterator[tuple[int, bytearray]]:
        """(first row, a writable copy of the rows) for consecutive blocks of rows."""
        self.flush()
        rows = max(1, _BLOCK_BYTES // self.row_bytes)
        for start in range(0, len(self), rows):
            size = min(rows, len(self) - start) * self.row_bytes
            yield start, bytearray(os.pread(self.fd, size, start * self.row_bytes))


class IntFile:
    """int32 values at any index of a sparse temporary file; 0 where none was written."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = folder
        self._file = _temp_file(folder)
        self.fd = self._file.fileno()

    def get(self, i: int) -> int:
        """The value at ``i`` (0 if never set)."""
        return int.from_bytes(os.pread(self.fd, 4, 4 * i), "little", signed=True)  # b"": 0

    def set(self, i: int, value: int) -> None:
        """Store ``value`` at ``i``."""
        _pwrite(self.fd, _INT.pack(value), 4 * i, self.folder)

    def set_range(self, i: int, values: np.ndarray) -> None:
        """Store ``values`` (int32) from ``i`` on."""
        _pwrite(self.fd, values.astype("<i4").tobytes(), 4 * i, self.folder)

    def close(self) -> None:
        """Delete the file."""
        self._file.close()


class Strings:
    """Strings appended to a temporary file, numbered 0, 1, ... in order (UTF-8 with the end
    offset of each: 8 bytes per string besides its text)."""

    def __init__(self, folder: str | Path | None = None):
        self._text = SpillFile(folder)
        self._ends = Rows(8, folder)

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, s: str) -> int:
        """Store ``s``; returns its number."""
        self._text.append(s.encode("utf-8", "surrogateescape"))  # any path name
        return self._ends.add(self._text.size.to_bytes(8, "little"))

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self._ends):
            raise IndexError(i)
        if i == 0:
            start, end = 0, int.from_bytes(self._ends.read(0, 8), "little")
        else:
            bounds = self._ends.read(8 * (i - 1), 16)
            start, end = int.from_bytes(bounds[:8], "little"), int.from_bytes(bounds[8:], "little")
        return self._text.read(start, end - start).decode("utf-8", "surrogateescape")

    def close(self) -> None:
        """Delete the files."""
        self._text.close()
        self._ends.close()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (write buffers)."""
        return self._text.nbytes + self._ends.nbytes


class ChainTable:
    """Hash buckets on disk for records that carry ``bands`` 32-bit hashes each (one per band):
    ``matches`` finds the records whose hash in some band equals the query's.

    Buckets are chains: per band, the newest record of each slot (``h mod slots``) is in a file
    of heads, and a file per band holds, per record, its hash and the next older record of its
    slot. A slot may hold several hashes, so a walk keeps the records whose hash equals the
    query's. When records outnumber slots ``max_load`` times, the slots are doubled and each
    band's chains rebuilt from its file, a block at a time, holding the heads of up to
    ``_REHASH_HEAD_BYTES / 4`` slots (more slots than that take several passes over the file).

    Args:
        bands: hashes per record.
        first_slots: slots per band to start with (a power of 2).
        folder: where the files live (None: the system temp folder).
        max_load: records per slot before the slots are doubled.
    """

    def __init__(
        self,
        bands: int,
        first_slots: int,
        folder: str | Path | None = None,
        max_load: int = _MAX_LOAD,
    ):
        if first_slots < 1 or first_slots & (first_slots - 1):
            raise ValueError(f"first_slots must be a power of 2, got {first_slots}")
        self.bands, self.n_slots, self.max_load, self.folder = bands, first_slots, max_load, folder
        self.n = 0  # records
        # band b's file: per record (hash uint32, next older record of its slot int32, -1: none)
        self._bands = [Rows(8, folder, _BUFFER_BYTES // 2) for _ in range(bands)]
        self._heads = IntFile(folder)  # band b, slot s at b * n_slots + s: newest record + 1

    def __len__(self) -> int:
        return self.n

    def heads(self, hashes: list[int]) -> list[int]:
        """The newest record in each band's slot for ``hashes`` (-1: the slot is empty)."""
        pread, fd, n, mask = os.pread, self._heads.fd, self.n_slots, self.n_slots - 1
        return [
            int.from_bytes(pread(fd, 4, 4 * (band * n + (h & mask))), "little", signed=True) - 1
            for band, h in enumerate(hashes)
        ]

    def matches(self, hashes: list[int], heads: list[int]) -> list[tuple[int, int]]:
        """(record, band) for each record whose hash in a band equals ``hashes[band]``;
        ``heads`` from ``heads(hashes)``."""
        pread, unpack, unpack_from = os.pread, _ENTRY.unpack, _ENTRY.unpack_from
        found = []
        for band, (h, k) in enumerate(zip(hashes, heads, strict=True)):
            rows = self._bands[band]  # Rows.read inlined: the hot loop of a query
            fd, tail, flushed = rows.fd, rows.tail, rows.flushed // 8
            while k >= 0:
                if k < flushed:
                    stored, link = unpack(pread(fd, 8, 8 * k))
                else:
                    stored, link = unpack_from(tail, 8 * (k - flushed))
                if stored == h:
                    found.append((k, band))
                k = link
        return found

    def add(self, hashes: list[int], heads: list[int] | None = None) -> int:
        """Add a record with ``hashes`` (``heads``: from ``heads(hashes)``, if just read);
        returns its number (0, 1, ... in order)."""
        if heads is None:
            heads = self.heads(hashes)
        k = self.n
        self.n += 1
        new = (k + 1).to_bytes(4, "little")
        pwrite, pack, fd = os.pwrite, _ENTRY.pack, self._heads.fd
        n, mask = self.n_slots, self.n_slots - 1
        try:
            for band, rows in enumerate(self._bands):  # SpillFile.append inlined
                h = hashes[band]
                rows.tail += pack(h, heads[band])
                rows.size += 8
                pwrite(fd, new, 4 * (band * n + (h & mask)))  # 4 bytes: never a short write
        except OSError as e:
            _disk_error(e, self.folder)
        if len(self._bands[0].tail) >= self._bands[0].buffer_bytes:  # the files grow alike
            for rows in self._bands:
                rows.flush()
        if k + 1 > self.max_load * n:
            self._rehash(2 * n)
        return k

    def _rehash(self, n_slots: int) -> None:
        """Rebuild the chains for ``n_slots`` slots per band, a band and a range of slots at a
        time: the band's file is read a block at a time and its links rewritten."""
        heads_file = IntFile(self.folder)
        span = min(n_slots, _REHASH_HEAD_BYTES // 4)  # both powers of 2
        for band, rows in enumerate(self._bands):
            for lo in range(0, n_slots, span):
                heads = np.zeros(span, dtype=np.int32)  # newest record + 1 per slot
                for start, block in rows.blocks():
                    entries = np.frombuffer(block, dtype="<u4").reshape(-1, 2)
                    slots = (entries[:, 0] & np.uint32(n_slots - 1)).astype(np.int64) - lo
                    _link_chains(slots, span, start, heads, entries.view("<i4")[:, 1])
                    rows.write(8 * start, block)  # the links were written into ``block``
                heads_file.set_range(band * n_slots + lo, heads)
        self._heads.close()
        self._heads, self.n_slots = heads_file, n_slots

    def close(self) -> None:
        """Delete the files."""
        for rows in self._bands:
            rows.close()
        self._heads.close()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (write buffers)."""
        return sum(rows.nbytes for rows in self._bands)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the chain files and the heads on disk (sparse heads counted whole)."""
        return 8 * self.bands * self.n + 4 * self.bands * self.n_slots


def _link_chains(
    slots: np.ndarray, span: int, start: int, heads: np.ndarray, links: np.ndarray
) -> None:
    """Chain records ``start``, ``start + 1``, ... in order into ``heads`` (newest record + 1 per
    slot of the range, 0: none): the records whose slot (``slots``, relative to the range) is in
    0..span-1 get as link the previous record of their slot."""
    inside = np.flatnonzero((slots >= 0) & (slots < span))
    if not len(inside):
        return
    order = np.argsort(slots[inside], kind="stable")  # records of a slot together, oldest first
    rows = inside[order]
    ordered = slots[rows]
    first = np.ones(len(rows), dtype=bool)  # the oldest record of its slot in this block
    first[1:] = ordered[1:] != ordered[:-1]
    chained = np.empty(len(rows), dtype=np.int32)
    chained[first] = heads[ordered[first]] - 1
    chained[~first] = start + rows[:-1][~first[1:]]
    links[rows] = chained
    last = np.ones(len(rows), dtype=bool)  # the newest
    last[:-1] = first[1:]
    heads[ordered[last]] = start + rows[last] + 1

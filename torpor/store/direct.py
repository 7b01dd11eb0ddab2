"""Writes that bypass the page cache (``O_DIRECT``), for the store's local packs.

Role: :class:`DirectFile` is a file written once, at known offsets, by several
threads, and read back rarely and later — a local pack (:mod:`torpor.store.packs`).

Why: on these machines memory the kernel touches for the first time is expensive
(~1-2 ms per MiB: the host backs a page of guest RAM on first touch and takes free
pages back), and a buffered write allocates a fresh page-cache page for every 4 KiB
it writes: the ~56 MB of packs of a first snapshot cost ~140 ms of CPU that way.
With ``O_DIRECT`` the device reads the writer's buffer (a staging buffer this module
reuses): ~3 ms of CPU, and ~45 ms of device time spent on a sync thread.  A later
reader of the pack pays the page cache instead — a restore, if any, usually much
later, when those pages would have been reclaimed anyway.

Invariants:

- The file's bytes are exactly what was written at each offset: the caller writes
  every byte of ``[0, size)`` once, in ranges that do not overlap, from any thread and
  in any order, then calls :meth:`DirectFile.finish` (the file is cut to ``size``)
  before its ``fdatasync``.  ``O_DIRECT`` needs block-aligned offsets and lengths, so
  the block-aligned interior of a range is written at once and the partial blocks at
  its two ends — shared with the neighbouring ranges — are kept in memory and written
  whole by ``finish``.
- Durability is unchanged: ``O_DIRECT`` is not a flush; the caller's ``fdatasync``
  is (it flushes the device's cache and the file's metadata).
- Where ``O_DIRECT`` is refused (tmpfs, some filesystems: ``EINVAL`` at open, or at
  the first write) the file is written through the page cache, as before
  (``TORPOR_STORE_DIRECT=0`` forces that).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence

BLOCK = 4096  # O_DIRECT alignment: offsets, lengths and buffer addresses
_IOV_MAX = 1024
_STAGE_STEP = 1 << 20  # staging buffers are kept in multiples of this
_MAX_STAGING = 4  # staging buffers kept for reuse (a few MiB each)

_staging: list[mmap.mmap] = []
_staging_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("TORPOR_STORE_DIRECT", "1") != "0"


def _take(n: int) -> mmap.mmap:
    """A page-aligned buffer of at least ``n`` bytes (reused: fresh memory is slow)."""
    with _staging_lock:
        for i, m in enumerate(_staging):
            if len(m) >= n:
                return _staging.pop(i)
    return mmap.mmap(-1, -(-n // _STAGE_STEP) * _STAGE_STEP)


def _give(m: mmap.mmap) -> None:
    """Back to the pool after a write that succeeded (a failed write's buffer is
    dropped instead: its exception's traceback may still hold a view of it)."""
    with _staging_lock:
        if len(_staging) < _MAX_STAGING:
            _staging.append(m)
            return
        smallest = min(range(len(_staging)), key=lambda i: len(_staging[i]))
        if len(_staging[smallest]) < len(m):
            m, _staging[smallest] = _staging[smallest], m
    m.close()


def _pwrite_all(fd: int, data: memoryview, off: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, off)
        data, off = data[n:], off + n


def pwritev_all(fd: int, bufs: Sequence[bytes | memoryview], off: int) -> None:
    """``pwritev`` of all of ``bufs`` at ``off``, however short the kernel's writes."""
    views = [memoryview(b) for b in bufs if len(b)]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i : i + _IOV_MAX], off)
        off += n
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


class DirectFile:
    """A new file written with ``O_DIRECT`` where the filesystem allows it (see the
    module doc); ``fd`` is its descriptor (the caller syncs and closes it)."""

    def __init__(self, path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> None:
        self.direct = False
        if enabled() and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, mode)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self.fd = os.open(path, flags, mode)
        # block index -> (file offset, bytes) pieces of it kept for finish
        self._edges: dict[int, list[tuple[int, bytes]]] = {}
        self._lock = threading.Lock()

    def pwritev(self, bufs: Sequence[bytes | memoryview], off: int) -> None:
        """Write ``bufs`` back to back at ``off`` (a range no other call writes)."""
        if not self.direct:
            pwritev_all(self.fd, bufs, off)
            return
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        end = off + sum(len(v) for v in views)
        a = min(-(-off // BLOCK) * BLOCK, end)
        b = max(end // BLOCK * BLOCK, a)
        if a < b:
            m = _take(b - a)
            with memoryview(m) as stage:
                pos = off
                for v in views:
                    lo, hi = max(pos, a), min(pos + len(v), b)
                    if lo < hi:
                        stage[lo - a : hi - a] = v[lo - pos : hi - pos]
                    pos += len(v)
                try:
                    _pwrite_all(self.fd, stage[: b - a], a)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise  # m is not given back (see _give)
                    self._fall_back()  # the filesystem took the open, not the write
                    pwritev_all(self.fd, [stage[: b - a]], a)
            _give(m)
        self._keep(views, off, off, a)
        self._keep(views, off, b, end)

    def _keep(self, views: list[memoryview], off: int, lo: int, hi: int) -> None:
        """Remember bytes ``[lo, hi)`` of the range written at ``off`` (partial blocks)."""
        if lo >= hi:
            return
        with self._lock:
            pos = off
            for v in views:
                s, e = max(pos, lo), min(pos + len(v), hi)
                while s < e:
                    k = s // BLOCK
                    t = min(e, (k + 1) * BLOCK)
                    self._edges.setdefault(k, []).append((s, bytes(v[s - pos : t - pos])))
                    s = t
                pos += len(v)

    def _fall_back(self) -> None:
        """Buffered writes from now on (O_DIRECT cleared on the open file); the partial
        blocks kept so far are written exactly where they belong."""
        import fcntl

        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        with self._lock:
            self.direct = False
            edges, self._edges = self._edges, {}
        for pieces in edges.values():
            for at, data in pieces:
                pwritev_all(self.fd, [data], at)

    def finish(self, size: int) -> None:
        """Write the partial blocks kept so far and cut the file to ``size`` bytes
        (every byte below it written).  Before the caller's ``fdatasync``."""
        with self._lock:
            edges, self._edges = self._edges, {}
        if edges:
            if not self.direct:  # (only a fallback's: it wrote them already)
                for pieces in edges.values():
                    for at, data in pieces:
                        pwritev_all(self.fd, [data], at)
            else:
                m = _take(BLOCK)
                with memoryview(m) as stage:
                    for k in sorted(edges):  # every byte of a block below size is kept
                        stage[:BLOCK] = bytes(BLOCK)
                        for at, data in edges[k]:
                            stage[at - k * BLOCK : at - k * BLOCK + len(data)] = data
                        _pwrite_all(self.fd, stage[:BLOCK], k * BLOCK)
                _give(m)  # (not after a failed write: see _give)
        os.ftruncate(self.fd, size)

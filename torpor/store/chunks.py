"""Fixed-size chunking, hashing and per-chunk compression.

Role: turn a file (guest RAM, a disk image, a device-state blob) into a sequence of
offset-aligned chunks, each identified by the BLAKE3 hex digest of its
uncompressed bytes, and compress / decompress a single chunk.

Invariants:

- Chunk ``i`` of a file covers bytes ``[i * chunk_size, min((i+1) * chunk_size, size))``;
  only the last chunk may be short.  Fixed, aligned chunks (rather than
  content-defined ones) fit block devices and guest RAM, whose content changes in
  place: a changed page changes exactly one chunk, nothing shifts.
- ``chunk_size`` is a power of two, at least 4 KiB (a page, a disk block).
- An all-zero chunk is never stored; it is ``None``.  Zero detection is by hash:
  BLAKE3 runs at several GB/s, a byte-wise compare in Python does not.
- Each stored chunk is one zstd frame (content size in the header), so any byte
  range of an artifact is readable by decompressing only the chunks that cover it.
  A frame is either *plain* (self-contained) or a *delta*: ``DELTA_MAGIC``, the
  32-byte hash of a plain *base* chunk, then a zstd frame compressed with the base's
  bytes as its dictionary.  A base is always plain (chains are one link long), so a
  chunk costs at most two frames to read.  Guest RAM changes a few pages per 64 KiB
  chunk between two snapshots; against the previous version the rest compresses to
  nearly nothing (measured on a 30-turn session: 640 KB -> 78 KB stored per turn).
- Sparse regions are found with ``SEEK_DATA`` / ``SEEK_HOLE`` and never read: an
  8 GiB sparse disk with a few MiB of data costs a few MiB of reads.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import blake3
import zstandard

from torpor.errors import UsageError
from torpor.store.errors import StoreError

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_LEVEL = 1  # on guest memory: as small as level 3 here, 2.4x faster (see benchmarks)
HASH_HEX_LEN = 64

# BLAKE3's own multithreading only pays off on large inputs; on 256 KiB chunks its
# thread start-up costs more than it saves (measured: 2x slower), so chunks
# smaller than this are hashed single-threaded.
MT_HASH_THRESHOLD = 4 * 1024 * 1024

# How much of a file one pread fetches: large enough to amortise syscalls,
# small enough to keep memory flat.
READ_BATCH_BYTES = 16 * 1024 * 1024


def validate_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` or raise :class:`UsageError` if it is not a power of two in range."""
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise UsageError(
            f"chunk size must be a power of two between {MIN_CHUNK_SIZE} and "
            f"{MAX_CHUNK_SIZE} bytes, got {chunk_size!r}"
        )
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``index`` in a file of ``size`` bytes."""
    off = index * chunk_size
    return off, min(chunk_size, size - off)


def hash_bytes(data: bytes | memoryview | bytearray) -> str:
    """BLAKE3 hex digest (64 lowercase hex characters)."""
    if len(data) >= MT_HASH_THRESHOLD:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


@lru_cache(maxsize=64)
def zero_hash(length: int) -> str:
    """Hash of ``length`` zero bytes: a chunk hashing to this is all zeros."""
    return hash_bytes(bytes(length))


_HASH_RE = re.compile(r"[0-9a-f]{64}")


def is_chunk_hash(value: object) -> bool:
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe; one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def compress_chunk(data: bytes | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """One self-contained zstd frame holding ``data``."""
    return _compressor(level).compress(data)


def compress_many(
    chunks: list[bytes | memoryview], level: int = DEFAULT_LEVEL, threads: int = 1
) -> list[memoryview]:
    """:func:`compress_chunk` of each of ``chunks`` (the same frames), compressed on
    ``threads`` of zstd's own C threads in one call: no GIL hand-off per chunk."""
    out = _compressor(level).multi_compress_to_buffer(chunks, threads=max(1, threads))
    return [memoryview(out[i]) for i in range(len(out))]  # each keeps ``out`` alive


DELTA_MAGIC = b"TDL1"
DELTA_HEADER_LEN = len(DELTA_MAGIC) + 32


def delta_base(frame: bytes) -> str | None:
    """The hash of the base a delta frame needs, or None for a plain frame."""
    if not frame.startswith(DELTA_MAGIC):
        return None
    if len(frame) < DELTA_HEADER_LEN:
        raise StoreError("truncated delta frame header", step="decompress chunk")
    return frame[len(DELTA_MAGIC) : DELTA_HEADER_LEN].hex()


def _raw_dict(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def compress_delta(
    data: bytes | memoryview, base_hash: str, base: bytes, level: int = DEFAULT_LEVEL
) -> bytes:
    """A delta frame: ``data`` compressed against ``base`` (the chunk ``base_hash``)."""
    c = zstandard.ZstdCompressor(level=level, dict_data=_raw_dict(base), write_content_size=True)
    return DELTA_MAGIC + bytes.fromhex(base_hash) + c.compress(data)


def decompress_chunk(frame: bytes, expected_len: int | None, base: bytes | None = None) -> bytes:
    """Inverse of :func:`compress_chunk` / :func:`compress_delta` (which needs the
    ``base`` bytes); raises :class:`StoreError` on a bad frame.

    The frame header's content size must equal ``expected_len`` (or, when unknown,
    be at most :data:`MAX_CHUNK_SIZE`), so a damaged header cannot make us allocate
    gigabytes.
    """
    dctx = _decompressor()
    if delta_base(frame) is not None:
        if base is None:
            raise StoreError("a delta frame needs its base chunk", step="decompress chunk")
        frame = frame[DELTA_HEADER_LEN:]
        dctx = zstandard.ZstdDecompressor(dict_data=_raw_dict(base))
    try:
        declared = zstandard.frame_content_size(frame)
        limit = MAX_CHUNK_SIZE if expected_len is None else expected_len
        if (
            declared < 0
            or declared > limit
            or (expected_len is not None and declared != expected_len)
        ):
            raise StoreError(
                f"chunk frame declares {declared} bytes, expected "
                f"{'at most ' + str(limit) if expected_len is None else expected_len}",
                step="decompress chunk",
            )
        out = dctx.decompress(frame, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise StoreError(f"bad zstd frame: {e}", step="decompress chunk") from e
    if len(out) != declared:
        raise StoreError("chunk frame decompressed to the wrong size", step="decompress chunk")
    return out


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``fd`` that may hold data, found with SEEK_DATA/SEEK_HOLE.

    Where the filesystem cannot tell (no SEEK_DATA support) the whole file is one
    extent, which is always correct, just slower.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return extents


def chunks_with_data(extents: Iterable[tuple[int, int]], chunk_size: int) -> set[int]:
    """Indexes of chunks overlapping any extent."""
    out: set[int] = set()
    for start, end in extents:
        out.update(range(start // chunk_size, (end - 1) // chunk_size + 1))
    return out


class Filling:
    """A file another thread is writing front to back (a first snapshot's RAM
    pre-copy): which ranges will hold data, fixed up front, and how far it is written.

    The writer calls :meth:`advance` (every byte below the offset that will be written
    is), then :meth:`finish` or :meth:`fail`; a reader (``put_file(filling=...)``)
    reads a range only once :meth:`wait` returns for its end, so it never sees a
    byte the writer has not written yet."""

    def __init__(self, extents: list[tuple[int, int]]) -> None:
        self.extents = extents
        self._done = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, offset: int) -> None:
        with self._cond:
            self._done = max(self._done, offset)
            self._cond.notify_all()

    def finish(self) -> None:
        self.advance(1 << 62)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait(self, offset: int) -> None:
        """Until the file is written below ``offset``; raises StoreError if the writer
        failed first."""
        with self._cond:
            while self._done < offset and self._error is None:
                self._cond.wait()
            if self._done < offset:
                raise StoreError(
                    f"the file's writer failed before offset {offset}: {self._error}",
                    step="read chunks",
                )


@dataclass(frozen=True)
class ChunkRead:
    """One chunk read from a file; ``data`` is valid until the next batch is read."""

    index: int
    data: memoryview


_buffers: list[bytearray] = []  # read buffers of finished read_chunks, reused
_buffers_lock = threading.Lock()
MAX_SPARE_BUFFERS = 2


def read_chunks(
    fd: int,
    size: int,
    chunk_size: int,
    indexes: Iterable[int],
    ready: Callable[[int], None] | None = None,
) -> Iterator[list[ChunkRead]]:
    """Read the chunks ``indexes`` (ascending) in batches via ``preadv``.

    Adjacent chunks are read with one call; scattered ones (an incremental
    snapshot's dirty chunks) still share a batch, so per-batch work (hashing on the
    pool, claiming, writing) is not paid per chunk.  Yields lists of
    :class:`ChunkRead` whose memoryviews share one reusable buffer: consume each
    batch before asking for the next.  ``ready(end)`` is called before a range
    ending at ``end`` is read (:meth:`Filling.wait`).

    The buffer is kept for the next call once this one is exhausted or closed (up to
    :data:`MAX_SPARE_BUFFERS`): memory a process touches for the first time costs
    ~1-2 ms per MiB on these machines (the host backs it on first touch), more than
    reading into it.
    """
    per_batch = max(1, READ_BATCH_BYTES // chunk_size)
    want_len = per_batch * chunk_size
    with _buffers_lock:
        buf = next((b for b in _buffers if len(b) == want_len), None)
        if buf is not None:
            _buffers.remove(buf)
    if buf is None:
        buf = bytearray(want_len)
    try:
        yield from _read_batches(fd, size, chunk_size, indexes, ready, buf, per_batch)
    finally:
        with _buffers_lock:
            if len(_buffers) < MAX_SPARE_BUFFERS:
                _buffers.append(buf)


def _read_batches(
    fd: int,
    size: int,
    chunk_size: int,
    indexes: Iterable[int],
    ready: Callable[[int], None] | None,
    buf: bytearray,
    per_batch: int,
) -> Iterator[list[ChunkRead]]:
    view = memoryview(buf)
    out: list[ChunkRead] = []
    run: list[int] = []

    def read_run() -> None:
        """Read ``run`` (adjacent chunks) into the buffer after what ``out`` holds."""
        base = len(out) * chunk_size
        off = run[0] * chunk_size
        want = min(len(run) * chunk_size, size - off)
        if ready is not None:
            ready(off + want)
        got = 0
        while got < want:
            n = os.preadv(fd, [view[base + got : base + want]], off + got)
            if n == 0:
                raise StoreError(
                    f"file shrank while being read (wanted {want} bytes at {off})",
                    step="read chunks",
                )
            got += n
        for k, idx in enumerate(run):
            lo = base + k * chunk_size
            out.append(ChunkRead(idx, view[lo : min(lo + chunk_size, base + want)]))

    for idx in indexes:
        if run and idx != run[-1] + 1:
            read_run()
            run = []
        if len(out) + len(run) == per_batch:
            if run:
                read_run()
                run = []
            yield out
            out = []
        run.append(idx)
    if run:
        read_run()
    if out:
        yield out

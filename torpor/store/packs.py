"""Local packs: the new chunks of one big put in one file, with an index.

Role: a first snapshot writes ~1,700 new chunks; as loose files that is ~1,700
creates, writes, ``fdatasync``s and renames (most of the put's system time).  A put
whose batch has many new chunks writes them into a *pack* instead: one temp file,
one ``fdatasync``, one rename, one directory fsync (see :mod:`torpor.store.store`,
whose module doc has the crash ordering with packs).

Layout of ``packs/<32 hex>.pack`` (the name is random: packs are never rewritten)::

    MAGIC                         b"torpor-localpack 1\\n"
    frames, back to back          each exactly a loose chunk file's bytes (plain or delta)
    index                         N entries: BLAKE3 (32) | offset u64 | length u32 |
                                  base (32 bytes; all zero = a plain frame)
    trailer                       index offset u64 | N u64 |
                                  HMAC-SHA256(store key, name, index offset, N, index) |
                                  TRAILER_MAGIC

Invariants:

- The index is written by the host, but the pack lies on a disk whose content is
  guest-influenced (its frames are guest RAM) and may be damaged: :func:`read_index`
  trusts nothing — the MAC (a truncated or damaged index, a pack renamed or copied
  from another store) and then every entry's bounds: inside the frame area, no two
  overlapping, no duplicate hash.  A pack failing any check is *bad* as a whole
  (reported by ``verify``, kept by ``gc``); a chunk it might hold reads as corrupt.
- A frame read from a pack is checked like a loose chunk (decompressed and BLAKE3'd
  against its name by the store): an index that lies about a hash yields a corrupt
  chunk, never wrong bytes.  A pack shorter than its index says (truncated after it
  was loaded) is a short read: corrupt, never an out-of-range read.
- Packs are immutable once named; a :class:`PackMap` (one per store folder and
  process) caches their indexes and is refreshed by listing ``packs/`` when a chunk
  is not found or a pack has vanished (gc).  The listing is the truth: a pack is
  used only while it is listed.
- ``packs/index``, the *combined index* (layout below :class:`CombinedIndex`), is a
  cache so that a process's first lookup does not read every pack's index (191
  packs: ~100 ms -> ~1 ms): every listed pack's entries sorted by hash, with a
  table of the packs it covers and their trailers.  Nothing in it is used before it
  checks: the MAC (store key) over its head, pack table, hash prefixes and block
  digests at open; a block's digest (and its hashes against the prefixes) when a
  lookup first reads it; each entry's bounds against its pack's recorded trailer; and,
  before a covered pack's first entry is used, that pack's trailer on disk equals the
  recorded one (the trailer holds the pack's own MAC over its name and index: a pack
  copied from another store or replaced differs, and is read on its own).  A pack it
  does not cover (named after the last rewrite, an older writer) has its own index
  read; a missing, truncated, damaged or foreign index is refused whole; one that
  lies is dropped for the process and the packs read one by one
  (:meth:`PackMap.uncover`: a chunk it leads to reads as corrupt), or refused at
  open (its entries do not add up to its packs' counts: one left out): it costs
  time, never an answer.  gc and ``verify`` read every pack's own index
  (``verify`` reports a damaged or lying combined index).  It is rewritten (temp in
  ``tmp/``, rename; not fsynced — a torn one does not verify) by gc, and in the
  background by a writer that names a pack while ``REBUILD_AFTER`` listed packs are
  not covered (readers never write it).
  Concurrent rewrites and gc can only make it cover fewer packs (never name a pack's
  entries wrongly): the last rename wins and the listing decides what is used.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import hashlib
import hmac
import itertools
import os
import re
import secrets
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import blake3

from torpor import failpoints, fsutil
from torpor.store import chunks as ck
from torpor.store import direct
from torpor.store.errors import StoreError

MAGIC = b"torpor-localpack 1\n"
TRAILER_MAGIC = b"TPACKEND"
_ENTRY = struct.Struct("<32sQI32s")
_TRAILER_HEAD = struct.Struct("<QQ")
TRAILER_LEN = _TRAILER_HEAD.size + 32 + len(TRAILER_MAGIC)
_ZERO32 = bytes(32)
MAX_FRAME = 2 * ck.MAX_CHUNK_SIZE
NAME_RE = re.compile(r"^([0-9a-f]{32})\.pack$")


class Entry(NamedTuple):
    """Where a chunk's frame is inside a pack."""

    offset: int
    length: int
    base: str | None  # the chunk a delta frame needs (None: plain)


def new_name() -> str:
    return secrets.token_hex(16)


def _mac(key: bytes, name: str, index_off: int, n: int, index: bytes) -> bytes:
    msg = b"torpor-localpack " + name.encode() + _TRAILER_HEAD.pack(index_off, n) + index
    return hmac.new(key, msg, hashlib.sha256).digest()


def encode_tail(
    key: bytes, name: str, index_off: int, entries: Sequence[tuple[str, Entry]]
) -> bytes:
    """The index and trailer of pack ``name`` whose frames end at ``index_off``."""
    index = b"".join(
        _ENTRY.pack(
            bytes.fromhex(h), e.offset, e.length, bytes.fromhex(e.base) if e.base else _ZERO32
        )
        for h, e in entries
    )
    mac = _mac(key, name, index_off, len(entries), index)
    return index + _TRAILER_HEAD.pack(index_off, len(entries)) + mac + TRAILER_MAGIC


def read_index(key: bytes, name: str, fd: int) -> dict[str, Entry]:
    """The checked index of the pack open as ``fd`` (see module doc); StoreError
    saying what is wrong otherwise."""
    return read_index_trailer(key, name, fd)[0]


def read_index_trailer(key: bytes, name: str, fd: int) -> tuple[dict[str, Entry], bytes]:
    """:func:`read_index` and the pack's trailer (what the combined index records)."""
    size = os.fstat(fd).st_size
    if size < len(MAGIC) + TRAILER_LEN:
        raise StoreError(f"pack {name} is truncated ({size} bytes)", step="read pack")
    if os.pread(fd, len(MAGIC), 0) != MAGIC:
        raise StoreError(f"pack {name} is not a torpor pack", step="read pack")
    trailer = os.pread(fd, TRAILER_LEN, size - TRAILER_LEN)
    if len(trailer) != TRAILER_LEN or not trailer.endswith(TRAILER_MAGIC):
        raise StoreError(f"pack {name} has no trailer (truncated?)", step="read pack")
    index_off, n = _TRAILER_HEAD.unpack_from(trailer)
    mac = trailer[_TRAILER_HEAD.size : _TRAILER_HEAD.size + 32]
    if index_off < len(MAGIC) or index_off + n * _ENTRY.size != size - TRAILER_LEN:
        raise StoreError(f"pack {name}: index bounds do not fit its size", step="read pack")
    index = _pread_all(fd, n * _ENTRY.size, index_off)
    if index is None:
        raise StoreError(f"pack {name}: short index read", step="read pack")
    if not hmac.compare_digest(mac, _mac(key, name, index_off, n, index)):
        raise StoreError(
            f"pack {name}: index does not verify (damaged, or not this store's)", step="read pack"
        )
    out: dict[str, Entry] = {}
    spans: list[tuple[int, int]] = []
    for raw, off, ln, base in _ENTRY.iter_unpack(index):
        h = raw.hex()
        if h in out:
            raise StoreError(f"pack {name}: chunk {h} listed twice", step="read pack")
        if not (len(MAGIC) <= off and 0 < ln <= MAX_FRAME and off + ln <= index_off):
            raise StoreError(f"pack {name}: entry for {h} is out of bounds", step="read pack")
        out[h] = Entry(off, ln, None if base == _ZERO32 else base.hex())
        spans.append((off, off + ln))
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise StoreError(f"pack {name}: entries overlap at {start}", step="read pack")
    return out, trailer


def _pread_all(fd: int, n: int, off: int) -> bytes | None:
    """``n`` bytes at ``off`` (None: the file is shorter)."""
    got = b""
    while len(got) < n:
        part = os.pread(fd, n - len(got), off + len(got))
        if not part:
            return None
        got += part
    return got


class PackWriter:
    """A pack being written by one put: frames are placed at offsets reserved in order
    (:meth:`reserve`, the put's thread) and written by any thread (:meth:`write`, the
    sync threads, while the put reads on); :meth:`seal` adds the index and trailer,
    ``fdatasync``s once, renames into ``packs_dir`` and fsyncs it.  Until then the file
    is ``tmp/<name>.pack.tmp`` (gc removes it if we die); :meth:`abort` removes it."""

    def __init__(self, key: bytes, tmp_dir: Path, packs_dir: Path) -> None:
        self.key, self.packs_dir = key, packs_dir
        self.name = new_name()
        self.tmp = tmp_dir / f"{self.name}.pack.tmp"
        # O_DIRECT where the filesystem takes it: no page-cache page allocated per 4 KiB
        # written (torpor.store.direct); sync and rename as before
        self.out = direct.DirectFile(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        self.fd = self.out.fd
        self.end = len(MAGIC)
        self.entries: list[tuple[str, Entry]] = []

    @property
    def frame_bytes(self) -> int:
        return self.end - len(MAGIC)

    def reserve(
        self, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> tuple[int, list[bytes | memoryview]]:
        """Place ``items`` (hash, frame) next; returns (offset, frames) for :meth:`write`."""
        off = self.end
        for h, frame in items:
            base = ck.delta_base(bytes(frame[: ck.DELTA_HEADER_LEN]))
            self.entries.append((h, Entry(self.end, len(frame), base)))
            self.end += len(frame)
        return off, [f for _, f in items]

    def write(self, placed: tuple[int, list[bytes | memoryview]]) -> int:
        """Write frames placed by :meth:`reserve` (one failpoint hit per frame, as for
        loose chunks) and start their writeback; returns 0 (bytes are counted at seal)."""
        off, frames = placed
        for _ in frames:
            failpoints.hit("store.chunk_write")
        self.out.pwritev(frames, off)
        if not self.out.direct:
            _start_writeback(self.fd, off, sum(len(f) for f in frames))
        return 0

    def seal(self) -> tuple[str, dict[str, Entry]]:
        """Index, trailer, ``fdatasync``, rename, fsync of ``packs_dir``: the pack is
        durable under its name.  Every :meth:`write` must have returned."""
        tail = encode_tail(self.key, self.name, self.end, self.entries)
        self.out.pwritev([MAGIC], 0)
        self.out.pwritev([tail], self.end)
        self.out.finish(self.end + len(tail))
        os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.packs_dir / f"{self.name}.pack")
        fsutil.fsync_dir(self.packs_dir)
        return self.name, dict(self.entries)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_pack(
    key: bytes, tmp_dir: Path, packs_dir: Path, items: Sequence[tuple[str, bytes | memoryview]]
) -> tuple[str, dict[str, Entry]]:
    """Write ``items`` (hash, frame) as a new pack durably; return (name, its index).
    On failure the temp file is removed and nothing is named."""
    w = PackWriter(key, tmp_dir, packs_dir)
    try:
        w.write(w.reserve(items))
        return w.seal()
    except BaseException:
        w.abort()
        raise


_SYNC_FILE_RANGE_WRITE = 2
try:
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)
    _sfr = _libc.sync_file_range
    _sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sfr.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: the final fdatasync does it all
    _sfr = None


def _start_writeback(fd: int, off: int, n: int) -> None:
    """Start writing ``[off, off+n)`` to disk now (no wait): the seal's ``fdatasync``
    then waits only for the tail, not for the whole pack.  Not a durability step."""
    if _sfr is not None and n:
        _sfr(fd, off, n, _SYNC_FILE_RANGE_WRITE)


# -- the combined index (packs/index) ---------------------------------------------------
#
# Layout (all integers little-endian)::
#
#     INDEX_MAGIC                  b"torpor-packindex 1\n"
#     head                         packs P u32 | entries N u64 | block B u32
#     pack table                   P x (name 16 raw bytes | the pack's trailer, 56 bytes)
#     prefixes                     N x the first 4 bytes of each entry's hash, in order
#     digests                      ceil(N/B) x BLAKE3 of each block's bytes
#     mac                          HMAC-SHA256(store key, "torpor-packindex " + all above)
#     entries                      N x (BLAKE3 32 | pack u32 | offset u64 | length u32 |
#                                  base 32), sorted by hash, in blocks of B entries
#
# Opening checks the MAC over everything but the entries (4 bytes per entry, 32 per
# block).  A lookup binary-searches the prefixes (an absent chunk usually ends there:
# no block read); a block is read and checked against its digest, and its keys against
# the prefixes, when a lookup first needs it.

INDEX_NAME = "index"
INDEX_MAGIC = b"torpor-packindex 1\n"
_IHEAD = struct.Struct("<IQI")
_IREC = struct.Struct("<32sIQI32s")
_PACKREC = 16 + TRAILER_LEN
INDEX_BLOCK = 64  # entries per checked block (5 KiB): a lookup hashes one block
# packs the combined index does not cover before a writer rewrites it: each costs a
# lookup ~0.5 ms (its own index read); a rewrite costs ~30-70 ms of a background thread
# at 200 packs (docs/benchmarks.md), i.e. one rewrite per two first snapshots
REBUILD_AFTER = 8
_MAX_INDEX_BLOCK = 1 << 16
_MAX_INDEX_META = 256 << 20  # read before its MAC checks (bounded): ~200,000 packs' worth
_U32 = next(c for c in "IL" if array.array(c).itemsize == 4)


def _prefixes(blob: bytes | memoryview) -> bytes:
    """The first 4 bytes of each ``_IREC`` record of ``blob``, back to back (no
    per-record Python: a strided view of 32-bit words)."""
    return memoryview(blob).cast("B").cast(_U32)[:: _IREC.size // 4].tobytes()


def sort_records(records: list[bytes]) -> bytes:
    """``_IREC`` records as :func:`encode_combined` takes them."""
    return b"".join(sorted(records))


def encode_combined(key: bytes, packs: Sequence[tuple[str, bytes]], blob: bytes) -> bytes:
    """The combined index of ``packs`` ((name, trailer), in pack-number order) whose
    entries are ``blob`` (``_IREC`` records back to back, sorted at least by their
    first 4 bytes: entries sharing a prefix may come in any order)."""
    step = INDEX_BLOCK * _IREC.size
    blocks = [blob[i : i + step] for i in range(0, len(blob), step)]
    body = b"".join(
        [
            INDEX_MAGIC,
            _IHEAD.pack(len(packs), len(blob) // _IREC.size, INDEX_BLOCK),
            *(bytes.fromhex(n) + tr for n, tr in packs),
            _prefixes(blob) if blob else b"",
            *(blake3.blake3(b).digest() for b in blocks),
        ]
    )
    mac = hmac.new(key, b"torpor-packindex " + body, hashlib.sha256).digest()
    return body + mac + blob


class CombinedIndex:
    """One open ``packs/index``, MAC-checked at open (StoreError if it does not verify
    or does not fit its size); its blocks are checked as they are first used."""

    def __init__(self, key: bytes, fd: int) -> None:
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        head = os.pread(fd, len(INDEX_MAGIC) + _IHEAD.size, 0)
        if len(head) != len(INDEX_MAGIC) + _IHEAD.size or not head.startswith(INDEX_MAGIC):
            raise StoreError("pack index is not a torpor pack index", step="read pack index")
        n_packs, n, block = _IHEAD.unpack_from(head, len(INDEX_MAGIC))
        if not 0 < block <= _MAX_INDEX_BLOCK:
            raise StoreError("pack index: bad block size", step="read pack index")
        nblocks = -(-n // block)
        meta_len = len(head) + n_packs * _PACKREC + n * 4 + nblocks * 32 + 32
        if meta_len > _MAX_INDEX_META or meta_len + n * _IREC.size != st.st_size:
            raise StoreError(
                "pack index does not fit its size (truncated?)", step="read pack index"
            )
        meta = _pread_all(fd, meta_len, 0)
        if meta is None:
            raise StoreError("pack index: short read", step="read pack index")
        mac = hmac.new(key, b"torpor-packindex " + meta[:-32], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, meta[-32:]):
            raise StoreError(
                "pack index does not verify (damaged, or not this store's)",
                step="read pack index",
            )
        self.fd = os.dup(fd)
        # closed when the last user lets go (a lookup on another thread may still hold
        # an index the map has replaced: its fd must not be closed, or reused, under it)
        self.close = weakref.finalize(self, os.close, self.fd)
        self.n, self.block, self.nblocks = n, block, nblocks
        self.names: list[str] = []
        self.trailers: list[bytes] = []
        self.index_offs: list[int] = []
        pos = len(head)
        total = 0
        for _ in range(n_packs):
            rec = meta[pos : pos + _PACKREC]
            pos += _PACKREC
            tr = rec[16:]
            index_off, count = _TRAILER_HEAD.unpack_from(tr)
            total += count
            if not tr.endswith(TRAILER_MAGIC) or index_off < len(MAGIC):
                raise StoreError("pack index: bad pack record", step="read pack index")
            self.names.append(rec[:16].hex())
            self.trailers.append(tr)
            self.index_offs.append(index_off)
        self.number = {name: i for i, name in enumerate(self.names)}
        if len(self.number) != n_packs:
            raise StoreError("pack index: a pack listed twice", step="read pack index")
        if total != n:  # each pack's entries are all in (an index that omits one lies)
            raise StoreError("pack index: entries do not add up", step="read pack index")
        self.prefix_raw = meta[pos : pos + 4 * n]
        self.prefixes = array.array(_U32)
        self.prefixes.frombytes(self.prefix_raw)
        if sys.byteorder == "little":
            self.prefixes.byteswap()  # stored big-endian: numeric order = hash order
        pos += 4 * n
        self.digests = meta[pos : pos + 32 * nblocks]  # sliced per block when used
        self.entries_off = meta_len
        self._blocks: dict[int, bytes] = {}

    def _block(self, b: int) -> bytes:
        """Block ``b``'s bytes, checked against its digest and its entries' hashes
        against the prefixes the search used (StoreError if not)."""
        got = self._blocks.get(b)
        if got is None:
            first = b * self.block
            count = min(self.block, self.n - first)
            data = _pread_all(self.fd, count * _IREC.size, self.entries_off + first * _IREC.size)
            if data is None or blake3.blake3(data).digest() != self.digests[32 * b : 32 * b + 32]:
                raise StoreError(f"pack index: block {b} is damaged", step="read pack index")
            if _prefixes(data) != self.prefix_raw[4 * first : 4 * (first + count)]:
                raise StoreError(f"pack index: block {b} is out of order", step="read pack index")
            got = self._blocks[b] = data
        return got

    def lookup(self, h: str) -> list[tuple[str, Entry]]:
        """Every (pack, entry) the index lists for chunk ``h``, each bound-checked."""
        hb = bytes.fromhex(h)
        p = int.from_bytes(hb[:4])
        i = bisect.bisect_left(self.prefixes, p)
        out: list[tuple[str, Entry]] = []
        while i < self.n and self.prefixes[i] == p:
            data = self._block(i // self.block)
            j = i % self.block
            if data[j * _IREC.size : j * _IREC.size + 32] == hb:
                out.append(self._entry(data, j))
            i += 1
        return out

    def _entry(self, data: bytes, i: int) -> tuple[str, Entry]:
        _h, p, off, ln, base = _IREC.unpack_from(data, i * _IREC.size)
        if not (
            p < len(self.names)
            and len(MAGIC) <= off
            and 0 < ln <= MAX_FRAME
            and off + ln <= self.index_offs[p]
        ):
            raise StoreError("pack index: an entry is out of bounds", step="read pack index")
        return self.names[p], Entry(off, ln, None if base == _ZERO32 else base.hex())

    def all_records(self) -> list[tuple[str, str, Entry]]:
        """Every (pack, chunk, entry), every block checked (StoreError if one is not)."""
        out = []
        for b in range(self.nblocks):
            data = self._block(b)
            for i in range(len(data) // _IREC.size):
                name, e = self._entry(data, i)
                out.append((name, data[i * _IREC.size : i * _IREC.size + 32].hex(), e))
        return out


def _records(number: int, entries: dict[str, Entry]) -> list[bytes]:
    return [
        _IREC.pack(
            bytes.fromhex(h),
            number,
            e.offset,
            e.length,
            bytes.fromhex(e.base) if e.base else _ZERO32,
        )
        for h, e in entries.items()
    ]


class PackMap:
    """Where chunks are in one store folder's packs (see module doc), thread-safe.

    The listing of ``packs/`` is the truth: a pack is used only while it is listed.
    Packs the combined index covers are looked up there (the index is MAC-checked
    at open, each block against its digest when first used, each entry bound-checked,
    and a pack's trailer on disk must equal the one the index recorded before any of
    its entries is used); every other listed pack's own index is read
    (:func:`read_index_trailer`), so a missing, stale, damaged or lying combined
    index costs time, never a wrong answer."""

    def __init__(
        self, packs_dir: Path, key: bytes, *, rebuild_after: int | None = REBUILD_AFTER
    ) -> None:
        self.dir = packs_dir
        self.key = key
        self.rebuild_after = rebuild_after
        self.lock = threading.RLock()
        self.members: dict[str, dict[str, Entry]] = {}  # packs read one by one -> index
        self.trailers: dict[str, bytes] = {}  # of members
        self.bad: dict[str, str] = {}  # pack name -> why it is refused
        self.locs: dict[str, tuple[str, Entry]] = {}  # chunk -> (pack, entry), of members
        self.combined: CombinedIndex | None = None
        self.combined_error: str | None = None  # why packs/index was refused
        self.covered: set[str] = set()  # listed packs looked up in the combined index
        self.checked: set[str] = set()  # covered packs whose trailer on disk matched
        self.listed: set[str] = set()
        self.loaded = False
        self._rebuilding = False
        #: bumped (under the lock) whenever what :meth:`get` answers may have changed:
        #: a caller that missed compares it across its :meth:`refresh`, so a listing
        #: another thread did meanwhile counts as a change (see :meth:`refresh`)
        self.generation = 0

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}.pack"

    def get(self, h: str) -> tuple[str, Entry] | None:
        if not self.loaded:
            self.refresh()
        hit = self.locs.get(h)
        if hit is not None:
            return hit
        ci = self.combined
        if ci is None or not self.covered:
            return None
        try:
            found = ci.lookup(h)
        except (StoreError, OSError) as e:
            self._drop_combined(ci, str(e))
            return self.get(h)  # without it (or with the index that replaced it)
        for name, entry in found:
            if name in self.covered and self._check(ci, name):
                return name, entry
        return self.locs.get(h) if found else None

    def _check(self, ci: CombinedIndex, name: str) -> bool:
        """Whether covered pack ``name`` on disk is the one ``ci`` recorded (its trailer
        binds its key, name and index); a pack that is not is read on its own."""
        if name in self.checked:
            return True
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # gone: the caller sees it vanish, as with any pack
        try:
            size = os.fstat(fd).st_size
            same = (
                size >= TRAILER_LEN
                and os.pread(fd, TRAILER_LEN, size - TRAILER_LEN) == (ci.trailers[ci.number[name]])
            )
            with self.lock:
                if same:
                    self.checked.add(name)
                    return True
                self.covered.discard(name)
                self._load(name, fd)
            return False
        except OSError:
            return False
        finally:
            os.close(fd)

    def _load(self, name: str, fd: int) -> None:
        """Read pack ``name``'s own index (lock held)."""
        try:
            entries, trailer = read_index_trailer(self.key, name, fd)
        except StoreError as e:
            self.bad[name] = str(e)
            return
        except OSError as e:
            self.bad[name] = f"pack {name} cannot be read: {e.strerror or e}"
            return
        self.members[name] = entries
        self.trailers[name] = trailer
        for h, e in entries.items():
            self.locs.setdefault(h, (name, e))
        self.generation += 1

    def indexed(self, h: str) -> bool:
        """Whether a lookup of ``h`` now goes to the combined index (not to a pack read
        on its own): if its frame then reads as corrupt, :meth:`uncover` and look again."""
        if not self.loaded:
            self.refresh()
        return self.combined is not None and bool(self.covered) and h not in self.locs

    def uncover(self) -> None:
        """Stop trusting the combined index in this process (its packs are read one by
        one from now on): a chunk it led to read as corrupt (it may lie).  A chunk it
        leaves out is not a reason (a miss is normal for a bucket's cache): its entries
        must add up to its packs' counts, and ``verify`` checks each."""
        ci = self.combined
        if ci is not None:
            self._drop_combined(ci, None)

    def _drop_combined(self, ci: CombinedIndex, why: str | None) -> None:
        """``ci`` failed a check (or is distrusted): read its packs one by one instead."""
        with self.lock:
            if self.combined is not ci:
                return
            for name in sorted(self.covered):  # first: a lookup meanwhile finds them
                self._open_load(name)
            self.combined, self.combined_error = None, why
            self.covered = set()
            self.generation += 1

    def _open_load(self, name: str) -> None:
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.listed.discard(name)
            return
        try:
            self._load(name, fd)
        finally:
            os.close(fd)

    def add(self, name: str, entries: dict[str, Entry]) -> None:
        """A pack this process just named (no need to read it back; our writer's
        frames are back to back, so its trailer is recomputed, not read)."""
        end = max((e.offset + e.length for e in entries.values()), default=len(MAGIC))
        trailer = encode_tail(self.key, name, end, list(entries.items()))[-TRAILER_LEN:]
        with self.lock:
            self.members[name] = entries
            self.trailers[name] = trailer
            self.listed.add(name)
            for h, e in entries.items():
                self.locs.setdefault(h, (name, e))
            self.generation += 1
            ci = self.combined
            uncovered = len(self.listed - (ci.number.keys() if ci is not None else set()))
            start = (
                self.rebuild_after is not None
                and uncovered >= self.rebuild_after
                and not self._rebuilding
            )
            self._rebuilding |= start
        if start:
            # a writer rewrites it, in the background while its put goes on (a reader
            # never does: it writes nothing, and a lazy restore's server wants no thread)
            threading.Thread(target=self._rebuild_quietly, daemon=True).start()

    def _open_combined(self) -> None:
        """(Re)open ``packs/index`` if it changed since we opened it (lock held)."""
        path = f"{self.dir}/{INDEX_NAME}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.combined, self.combined_error = None, None
            return
        ci = self.combined
        if ci is not None and ci.ident == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            return
        new: CombinedIndex | None = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                new = CombinedIndex(self.key, fd)
            finally:
                os.close(fd)
            self.combined_error = None
        except StoreError as e:
            self.combined_error = str(e)
        except OSError as e:
            self.combined_error = f"pack index cannot be read: {e.strerror or e}"
        self.combined = new
        self.checked = set()

    def refresh(self, since: int | None = None) -> bool:
        """List ``packs/``: reopen the combined index if it changed, read the own index
        of each new pack it does not cover, forget vanished packs; True if anything
        changed — with ``since`` (a :attr:`generation` read before a lookup that
        missed), if anything changed since then, by this listing or another thread's:
        a lookup racing one that added the pack must look again, not give up."""
        try:
            names = {m.group(1) for n in os.listdir(self.dir) if (m := NAME_RE.match(n))}
        except FileNotFoundError:
            names = set()
        with self.lock:
            before = self.combined
            self._open_combined()
            ci = self.combined
            changed = ci is not before or names != self.listed
            gone = (self.members.keys() | self.bad.keys()) - names
            self.checked &= names  # a name listed again is checked again
            for name in gone:
                self.members.pop(name, None)
                self.trailers.pop(name, None)
                self.bad.pop(name, None)
            if gone:  # swapped whole: a lookup (no lock) never sees it half rebuilt
                locs: dict[str, tuple[str, Entry]] = {}
                for name, entries in self.members.items():
                    for h, e in entries.items():
                        locs.setdefault(h, (name, e))
                self.locs = locs
            own = self.members.keys() | self.bad.keys()
            self.covered = (names & ci.number.keys()) - own if ci is not None else set()
            for name in sorted(names - own - self.covered):
                self._open_load(name)
            self.listed = names
            self.loaded = True
            if changed:
                self.generation += 1
            return changed if since is None else self.generation != since

    def _rebuild_quietly(self) -> None:
        try:
            with contextlib.suppress(OSError):  # yield the CPU to the work that asked
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            self.rebuild()
        except (OSError, StoreError):
            pass  # a cache: the next process tries again
        finally:
            self._rebuilding = False

    def rebuild(self) -> None:
        """Rewrite ``packs/index`` to cover every listed pack this map can vouch for:
        entries from the (checked) combined index and from packs read one by one.
        Atomic (temp in ``tmp/``, rename) but not fsynced: it is a cache that a crash
        may lose or tear, and a torn one does not verify.  Racing writers and gc only
        make it cover less (the listing stays the truth), never lie."""
        with self.lock:
            ci, covered = self.combined, set(self.covered)
            own = {n: (self.members[n], self.trailers[n]) for n in self.members if n in self.listed}
        packs: list[tuple[str, bytes]] = []
        records: list[bytes] = []  # new entries, per entry (packs read one by one)
        base = memoryview(b"")  # ci's entries kept as they are
        gone = set(ci.names) - covered if ci is not None else set()
        if ci is not None and own.keys().isdisjoint(ci.number) and len(gone) * 4 <= len(ci.names):
            # the usual case (packs were only added): ci's table and entries as they are,
            # no per-entry work (the few vanished packs' entries stay, unused, until gc)
            packs += zip(ci.names, ci.trailers, strict=True)
            base = memoryview(b"".join(ci._block(b) for b in range(ci.nblocks)))
        elif ci is not None and covered:
            keep: dict[int, int] = {}
            for name in sorted(covered - own.keys()):
                keep[ci.number[name]] = len(packs)
                packs.append((name, ci.trailers[ci.number[name]]))
            for b in range(ci.nblocks):
                for rec in _IREC.iter_unpack(ci._block(b)):
                    p = keep.get(rec[1])
                    if p is not None:
                        records.append(_IREC.pack(rec[0], p, *rec[2:]))
        for name in sorted(own):
            entries, trailer = own[name]
            records += _records(len(packs), entries)
            packs.append((name, trailer))
        records.sort()
        if base and ci is not None:  # merge the new entries in by prefix (all that order needs)
            parts: list[bytes | memoryview] = []
            last = 0
            for r in records:
                at = bisect.bisect_right(ci.prefixes, int.from_bytes(r[:4]))
                parts += [base[last * _IREC.size : at * _IREC.size], r]
                last = at
            parts.append(base[last * _IREC.size :])
            blob = b"".join(parts)
        else:
            blob = b"".join(records)
        data = encode_combined(self.key, packs, blob)
        tmp_dir = self.dir.parent / "tmp"
        fd, tmp = tempfile.mkstemp(prefix="packindex.", suffix=".tmp", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.dir / INDEX_NAME)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def forget(self, name: str) -> None:
        """Drop pack ``name`` (deleted)."""
        with self.lock:
            self.members.pop(name, None)
            self.trailers.pop(name, None)
            self.bad.pop(name, None)
            self.covered.discard(name)
            self.listed.discard(name)
            locs = {h: v for h, v in self.locs.items() if v[0] != name}
            for other, entries in self.members.items():
                for h, e in entries.items():
                    locs.setdefault(h, (other, e))
            self.locs = locs  # whole: a lookup (no lock) never sees it half rebuilt
            self.generation += 1

    def snapshot(self) -> tuple[dict[str, dict[str, Entry]], dict[str, str]]:
        """Every listed pack's own index, read and checked one by one (gc and verify
        do not rely on the combined index), and the refused packs."""
        with self.lock:
            if not self.loaded:
                self.refresh()
            covered, self.covered = self.covered, set()
            for name in sorted(covered):
                self._open_load(name)
            return dict(self.members), dict(self.bad)

    def check_combined(self, members: dict[str, dict[str, Entry]]) -> str | None:
        """Why ``packs/index`` is damaged (None: absent, or every block checks and
        every entry of a listed pack equals that pack's own index)."""
        path = f"{self.dir}/{INDEX_NAME}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"pack index cannot be read: {e.strerror or e}"
        try:
            ci = CombinedIndex(self.key, fd)
            try:
                counts = dict.fromkeys(ci.names, 0)
                listed: set[tuple[str, str]] = set()
                for name, h, e in ci.all_records():
                    counts[name] += 1
                    listed.add((name, h))
                    own = members.get(name)
                    if own is not None and own.get(h) != e:
                        return f"pack index: its entry for {h} in pack {name} is wrong"
                for name, count in counts.items():
                    if count != _TRAILER_HEAD.unpack_from(ci.trailers[ci.number[name]])[1]:
                        return f"pack index: it lists {count} entries of pack {name}"
                for name, entries in members.items():
                    if name in ci.number and (
                        h := next((h for h in entries if (name, h) not in listed), None)
                    ):
                        return f"pack index: it leaves out chunk {h} of pack {name}"
                for name in members:
                    p = ci.number.get(name)
                    if p is not None and ci.trailers[p] != self.trailers.get(name, ci.trailers[p]):
                        return f"pack index: its trailer of pack {name} is wrong"
            finally:
                ci.close()
        except StoreError as e:
            return str(e)
        finally:
            os.close(fd)
        return None


def read_frame(path: str, e: Entry) -> bytes | str | None:
    """The frame at ``e`` in the pack at ``path``: bytes, ``"corrupt"`` (short: the pack
    was truncated), or None (the pack is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        got = os.pread(fd, e.length, e.offset)
        while len(got) < e.length:
            more = os.pread(fd, e.length - len(got), e.offset + len(got))
            if not more:
                return "corrupt"
            got += more
        return got
    finally:
        os.close(fd)


_maps: dict[tuple[str, bytes], PackMap] = {}
_maps_lock = threading.Lock()


def pack_map(packs_dir: Path, key: bytes) -> PackMap:
    """The process-wide :class:`PackMap` of ``packs_dir`` (a store opened per turn
    does not re-read every index)."""
    k = (os.path.realpath(packs_dir), key)
    with _maps_lock:
        m = _maps.get(k)
        if m is None:
            m = _maps[k] = PackMap(packs_dir, key)
        return m


def names(hs: Iterable[str], m: PackMap) -> list[str]:
    """The packs holding any of ``hs`` (for error messages)."""
    out = set()
    for h in hs:
        hit = m.get(h)
        if hit is not None:
            out.add(hit[0])
    return sorted(out)

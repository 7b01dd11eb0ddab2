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
  is not found or a pack has vanished (gc).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import os
import re
import secrets
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from torpor import failpoints, fsutil
from torpor.store import chunks as ck
from torpor.store.errors import StoreError

MAGIC = b"torpor-localpack 1\n"
TRAILER_MAGIC = b"TPACKEND"
_ENTRY = struct.Struct("<32sQI32s")
_TRAILER_HEAD = struct.Struct("<QQ")
TRAILER_LEN = _TRAILER_HEAD.size + 32 + len(TRAILER_MAGIC)
_ZERO32 = bytes(32)
MAX_FRAME = 2 * ck.MAX_CHUNK_SIZE
NAME_RE = re.compile(r"^([0-9a-f]{32})\.pack$")
_IOV_MAX = 512  # frames per pwritev call (Linux allows 1024)


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
    index = b""
    while len(index) < n * _ENTRY.size:
        part = os.pread(fd, n * _ENTRY.size - len(index), index_off + len(index))
        if not part:
            raise StoreError(f"pack {name}: short index read", step="read pack")
        index += part
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
    return out


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
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
        _pwritev_all(self.fd, frames, off)
        _start_writeback(self.fd, off, sum(len(f) for f in frames))
        return 0

    def seal(self) -> tuple[str, dict[str, Entry]]:
        """Index, trailer, ``fdatasync``, rename, fsync of ``packs_dir``: the pack is
        durable under its name.  Every :meth:`write` must have returned."""
        tail = encode_tail(self.key, self.name, self.end, self.entries)
        _pwritev_all(self.fd, [MAGIC], 0)
        _pwritev_all(self.fd, [tail], self.end)
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


def _pwritev_all(fd: int, bufs: Sequence[bytes | memoryview], off: int) -> None:
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


class PackMap:
    """The indexes of one store folder's packs (see module doc), thread-safe."""

    def __init__(self, packs_dir: Path, key: bytes) -> None:
        self.dir = packs_dir
        self.key = key
        self.lock = threading.Lock()
        self.members: dict[str, dict[str, Entry]] = {}  # pack name -> its index
        self.bad: dict[str, str] = {}  # pack name -> why it is refused
        self.locs: dict[str, tuple[str, Entry]] = {}  # chunk -> (pack, entry)
        self.loaded = False

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}.pack"

    def get(self, h: str) -> tuple[str, Entry] | None:
        if not self.loaded:
            self.refresh()
        return self.locs.get(h)

    def add(self, name: str, entries: dict[str, Entry]) -> None:
        """A pack this process just named (no need to read it back)."""
        with self.lock:
            self.members[name] = entries
            for h, e in entries.items():
                self.locs.setdefault(h, (name, e))

    def refresh(self) -> bool:
        """List ``packs/``: load new packs' indexes, forget vanished ones; True if
        anything changed."""
        try:
            names = {m.group(1) for n in os.listdir(self.dir) if (m := NAME_RE.match(n))}
        except FileNotFoundError:
            names = set()
        with self.lock:
            known = self.members.keys() | self.bad.keys()
            gone = known - names
            new = names - known
            for name in gone:
                self.members.pop(name, None)
                self.bad.pop(name, None)
            for name in sorted(new):
                try:
                    fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    self.members[name] = read_index(self.key, name, fd)
                except StoreError as e:
                    self.bad[name] = str(e)
                except OSError as e:
                    self.bad[name] = f"pack {name} cannot be read: {e.strerror or e}"
                finally:
                    os.close(fd)
            if gone:
                self.locs = {}
                for name, entries in self.members.items():
                    for h, e in entries.items():
                        self.locs.setdefault(h, (name, e))
            else:
                for name in new:
                    for h, e in self.members.get(name, {}).items():
                        self.locs.setdefault(h, (name, e))
            self.loaded = True
            return bool(gone or new)

    def forget(self, name: str) -> None:
        """Drop pack ``name`` (deleted)."""
        with self.lock:
            self.members.pop(name, None)
            self.bad.pop(name, None)
            self.locs = {h: v for h, v in self.locs.items() if v[0] != name}
            for other, entries in self.members.items():
                for h, e in entries.items():
                    self.locs.setdefault(h, (other, e))

    def snapshot(self) -> tuple[dict[str, dict[str, Entry]], dict[str, str]]:
        with self.lock:
            return dict(self.members), dict(self.bad)


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
        hit = m.locs.get(h)
        if hit is not None:
            out.add(hit[0])
    return sorted(out)

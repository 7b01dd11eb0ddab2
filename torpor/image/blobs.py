"""The content-addressed blob store and the byte-stream helpers around it.

Role: every manifest, config and layer torpor keeps lives at
``Paths.blobs/<hex>`` where ``<hex>`` is the sha256 of the file's bytes.
Pulls write there directly; imports stage blobs in a private directory laid
out the same way and move them in once the whole image is known to be good.

Invariants:

* A file named ``<hex>`` always hashes to ``<hex>``: blobs are written to a
  temp file in the same directory while being hashed, verified (digest and,
  when known, size), fsynced and only then renamed into place.  A present
  blob is never rewritten.
* Temp files are named ``.partial-<pid>-<random>`` and are ``flock``-ed by
  their writer; :meth:`BlobStore.clean_stale` removes those whose writer died.
* Digests are validated (``sha256:`` + 64 lower-case hex) before they are
  turned into paths, so no digest can name a file outside the store.

Compression is detected from magic bytes, never from names or media types:
gzip, zstd, xz, bzip2, or an uncompressed stream.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import io
import lzma
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from torpor.errors import DigestMismatchError, ImageError
from torpor.fsutil import fsync_dir

CHUNK = 1 << 20
PARTIAL_PREFIX = ".partial-"
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")

ProgressFn = Callable[[str, int, int], None]
"""``progress(event, done, total)``: ``event`` is a stable label for one task
(e.g. ``"Downloading 3f4a…"``), ``done``/``total`` are bytes (``total`` 0 = unknown)."""


def check_digest(digest: object, *, what: str = "digest") -> str:
    """Return the hex part of a ``sha256:<hex>`` digest; ImageError if malformed/unsupported."""
    if isinstance(digest, str):
        m = _DIGEST_RE.fullmatch(digest)
        if m:
            return m.group(1)
    raise ImageError(f"unsupported or malformed {what} {digest!r} (need sha256:<64 hex>)")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# ---------------------------------------------------------------------------
# compression

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
_MAGIC = {"gzip": GZIP_MAGIC, "zstd": ZSTD_MAGIC, "xz": XZ_MAGIC, "bzip2": BZIP2_MAGIC}


def detect_compression(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"``, ``"xz"``, ``"bzip2"`` or ``None`` (uncompressed) from magic bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(BZIP2_MAGIC) and len(head) >= 4 and head[3:4] in b"123456789":
        return "bzip2"
    return None


class _PeekReader(io.RawIOBase):
    """Gives back bytes already read for magic detection before reading on."""

    def __init__(self, head: bytes, raw: Reader):
        super().__init__()
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._raw.read(n)

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Decompressing(io.RawIOBase):
    """Incremental, memory-bounded decompression of a raw stream; errors become ImageError.

    Multi-member gzip (``cat a.gz b.gz``) and concatenated zstd frames are read
    to the end, as ``gzip -d`` and ``zstd -d`` do; zero padding after the last
    member is ignored; a stream that stops before its end marker is reported
    as truncated (``zstandard.stream_reader`` would silently stop, hence this).
    """

    _OUT_MAX = 1 << 20
    _ZSTD_PIECE = 16 << 10  # zstd has no max_length: bound the output by feeding less

    def __init__(self, raw: Reader, kind: str, what: str):
        super().__init__()
        self._raw = raw
        self._kind = kind
        self._what = what
        self._buf = bytearray()
        self._pos = 0
        self._in = b""
        self._done = False
        self._d = self._new()

    def _new(self):  # type: ignore[no-untyped-def]
        if self._kind == "gzip":
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        if self._kind == "zstd":
            return zstandard.ZstdDecompressor().decompressobj()
        if self._kind == "xz":
            return lzma.LZMADecompressor()
        return bz2.BZ2Decompressor()

    def readable(self) -> bool:
        return True

    def _fail(self, why: str) -> ImageError:
        return ImageError(f"{self._what}: corrupt {self._kind} data: {why}")

    def _step(self) -> bytes:
        """Produce some output; b"" once the whole stream has ended cleanly."""
        d = self._d
        while True:
            if self._kind in ("xz", "bzip2") and not d.eof and not d.needs_input:
                return self._call(b"")
            if not self._in:
                self._in = self._raw.read(CHUNK)
                if not self._in:
                    if not d.eof:
                        raise self._fail("unexpected end of stream (truncated?)")
                    return b""
            if d.eof:
                if not self._in.startswith(_MAGIC[self._kind][: len(self._in)]):
                    return b""  # trailing padding after the last member
                d = self._d = self._new()
            if self._kind == "zstd":
                piece, self._in = self._in[: self._ZSTD_PIECE], self._in[self._ZSTD_PIECE :]
            else:
                piece, self._in = self._in, b""
            out = self._call(piece)
            if out:
                return out

    def _call(self, piece: bytes) -> bytes:
        d = self._d
        try:
            if self._kind == "zstd":
                out = d.decompress(piece)
            else:
                out = d.decompress(piece, self._OUT_MAX)
        except (zlib.error, zstandard.ZstdError, lzma.LZMAError, OSError, EOFError) as e:
            raise self._fail(str(e)) from e
        if self._kind == "gzip" and d.unconsumed_tail:
            self._in = d.unconsumed_tail + self._in
        if d.eof and d.unused_data:
            self._in = bytes(d.unused_data) + self._in
        return out

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        while len(self._buf) - self._pos < n and not self._done:
            out = self._step()
            if out:
                self._buf += out
            else:
                self._done = True
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += len(data)
        if self._pos >= CHUNK:
            del self._buf[: self._pos]
            self._pos = 0
        return data

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_decompressed(raw: Reader, *, what: str) -> tuple[BinaryIO, str | None]:
    """Detect compression from ``raw``'s first bytes; return a reader of the plain bytes."""
    head = b""
    while len(head) < 6:
        chunk = raw.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    kind = detect_compression(head)
    peek = _PeekReader(head, raw)
    if kind is None:
        return peek, None  # type: ignore[return-value]
    return _Decompressing(peek, kind, what), kind  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# the store

STALE_AFTER = 60.0


def owner_alive(pid_and_rest: str, mtime: float) -> bool:
    """For a temp name ``<pid>-<random>`` whose flock is free: might its owner still be
    about to take the lock?  Only if that pid lives and the entry is under a minute old
    (an old entry with a live pid is a recycled pid)."""
    pid_text = pid_and_rest.split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return time.time() - mtime < STALE_AFTER


class BlobStore:
    """Content-addressed files under one directory (``Paths.blobs`` or a staging dir)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or size < 0 or st.st_size == size

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as e:
            raise ImageError(f"blob {digest} is missing from {self.root}") from e

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        return self.ingest(io.BytesIO(data), expected=expected, size=len(data), what="blob")

    def ingest(
        self,
        stream: Reader,
        *,
        expected: str | None = None,
        size: int | None = None,
        what: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> str:
        """Copy ``stream`` into the store while hashing; verify; return its digest.

        Raises DigestMismatchError if the bytes do not hash to ``expected`` or the
        byte count differs from ``size``.  If the blob is already present the
        stream is still read and verified but nothing is rewritten.
        """
        if expected is not None:
            check_digest(expected, what=f"digest of {what}")
        with self.writer(what=what) as w:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                w.write(chunk)
                if on_progress:
                    on_progress(w.count)
            return w.commit(expected=expected, size=size)

    @contextlib.contextmanager
    def writer(self, *, what: str) -> Iterator[BlobWriter]:
        """A temp file in the store; ``commit()`` verifies and renames it into place.

        Whatever happens (errors, KeyboardInterrupt), an uncommitted temp file is removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        w = BlobWriter(self, what)
        try:
            yield w
        finally:
            w.abort()

    def move_from(self, other: BlobStore, digest: str) -> None:
        """Rename ``digest`` from ``other`` (same filesystem) into this store if absent."""
        src = other.path(digest)
        dst = self.path(digest)
        if dst.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        fsync_dir(self.root)

    def clean_stale(self) -> None:
        """Remove temp files whose writer is gone (killed mid-download)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            if not name.startswith(PARTIAL_PREFIX):
                continue
            p = self.root / name
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if owner_alive(name[len(PARTIAL_PREFIX) :], os.fstat(fd).st_mtime):
                    continue  # created an instant ago, its flock not taken yet
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            except BlockingIOError:
                continue  # a live writer holds it
            finally:
                os.close(fd)


class BlobWriter:
    """One blob being written: ``write()`` chunks, then ``commit()``."""

    def __init__(self, store: BlobStore, what: str):
        self._store = store
        self._what = what
        self._hash = hashlib.sha256()
        self.count = 0
        self._tmp = store.root / f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self._fd: int | None = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        # Held until commit/abort so clean_stale() can tell a live writer from a dead one.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._f = os.fdopen(self._fd, "wb", closefd=False)

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.count += len(data)
        self._f.write(data)

    def commit(self, *, expected: str | None = None, size: int | None = None) -> str:
        digest = "sha256:" + self._hash.hexdigest()
        if expected is not None and digest != expected:
            raise DigestMismatchError(
                f"{self._what}: content hashes to {digest}, expected {expected}"
            )
        if size is not None and size >= 0 and self.count != size:
            raise DigestMismatchError(
                f"{self._what}: got {self.count} bytes, expected {size} ({expected or digest})"
            )
        dst = self._store.path(digest)
        if not dst.exists():
            self._f.flush()
            os.fsync(self._fd)  # type: ignore[arg-type]
            os.chmod(self._tmp, 0o400)
            os.replace(self._tmp, dst)
            fsync_dir(self._store.root)
        return digest

    def abort(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        os.close(self._fd)
        self._fd = None

"""Encoding and decoding of the host <-> guest agent protocol (docs/protocol.md).

Pure functions and value types only: no sockets, no threads, no clocks. The C
agent (``torpor/guest/agent.c``) implements the same format; both are tested
against the golden frames in ``tests/fixtures/protocol/``.

Invariants:

- Every integer is little-endian; every ``str`` is a ``u32`` length plus bytes.
- Text is UTF-8 with ``errors="surrogateescape"`` in both directions, so any
  byte string the guest holds (a Latin-1 file name, say) survives a round trip.
- ``decode`` never guesses: short input, bytes left over, a NUL inside a path,
  argv or env string, or an out-of-range value raise :class:`ProtocolError`.
- The host side is strict: :class:`FrameDecoder` raises on the first bad header
  instead of resynchronising (only the guest resynchronises).
"""

from __future__ import annotations

import enum
import re
import stat as _stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Self

from torpor.errors import ProtocolError

MAGIC = 0x7054
HEADER = struct.Struct("<HBBII")
MAX_PAYLOAD = 1 << 20
_MAGIC_BYTES = struct.pack("<H", MAGIC)
PROTOCOL_VERSION = 1
#: WRITE_FILE uid/gid value meaning "the agent's own".
UNCHANGED = 0xFFFFFFFF
#: EXEC flag bit 0: stdin is piped (otherwise the process gets /dev/null).
EXEC_STDIN = 1
#: EXEC flag bit 1: run on a new pseudo-terminal; ``u32 cols, u32 rows`` follow ``env``.
EXEC_TTY = 2
#: Bounds of a terminal's columns and rows (EXEC with a TTY, RESIZE), both sides.
TTY_MIN, TTY_MAX = 1, 4096
#: SET_IDENTITY: a hostname is what the host allows as a VM name, up to the kernel's
#: 64 bytes; an interface name fits IFNAMSIZ; a MAC is 6 bytes, unicast, not zero.
HOSTNAME_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
IFNAME_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
#: Largest SET_IDENTITY answer (``str hostname``, ``str mac``): anything longer is refused
#: before it is decoded.
IDENTITY_REPLY_MAX = 4 + 64 + 4 + 6


class T(enum.IntEnum):
    """Frame types."""

    HELLO = 0x01
    EXEC = 0x02
    STDIN = 0x03
    SIGNAL = 0x04
    READ_FILE = 0x05
    WRITE_FILE = 0x06
    STAT = 0x07
    LIST_DIR = 0x08
    MKDIR = 0x09
    SYMLINK = 0x0A
    SET_TIME = 0x0B
    SYNC = 0x0C
    SHUTDOWN = 0x0D
    ADD_ENTROPY = 0x0E
    RESIZE = 0x0F
    SET_IDENTITY = 0x10
    ATTACH = 0x20
    STOP = 0x21
    REATTACH = 0x24  # shim-only; 0x22/0x23 are the shim's CAPTURE/CAPTURE_END
    HELLO_OK = 0x80
    STARTED = 0x81
    STDOUT = 0x82
    STDERR = 0x83
    EXIT = 0x84
    DATA = 0x85
    FILEINFO = 0x86
    DIRENT = 0x87
    OK = 0x8E
    ERROR = 0x8F


def type_name(frame_type: int) -> str:
    """``T`` member name, or hex for a type this side does not know."""
    try:
        return T(frame_type).name
    except ValueError:
        return f"0x{frame_type:02x}"


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    id: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(
                f"{type_name(self.type)} payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}"
            )
        try:
            return HEADER.pack(MAGIC, self.type, 0, self.id, len(self.payload)) + self.payload
        except struct.error as e:
            raise ProtocolError(f"cannot encode frame {self}: {e}") from e

    def __str__(self) -> str:
        head = self.payload[:32]
        more = "…" if len(self.payload) > len(head) else ""
        return f"{type_name(self.type)} id={self.id} len={len(self.payload)} {head!r}{more}"


class FrameDecoder:
    """Incremental frame splitter for a byte stream.

    With ``resync`` a bad header does not end the stream: bytes are skipped up to the
    next magic, as the agent does (docs/protocol.md), and counted in ``skipped``.  The
    shim reads the guest's channel so: a restored VM's virtio-serial port may deliver
    the tail of a frame whose head went to the shim that was connected when the
    snapshot was taken, and one cut frame must not cost the channel.
    """

    def __init__(self, resync: bool = False) -> None:
        self._buf = bytearray()
        self.resync = resync
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by ``data``. Raises ProtocolError on a bad header
        (unless ``resync``)."""
        self._buf += data
        frames = []
        offset = 0
        while len(self._buf) - offset >= HEADER.size:
            magic, ftype, flags, fid, length = HEADER.unpack_from(self._buf, offset)
            bad = ""
            if magic != MAGIC or flags != 0:
                bad = f"bad frame header {bytes(self._buf[offset : offset + HEADER.size]).hex()}"
            elif length > MAX_PAYLOAD:
                bad = f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}"
            if bad:
                if not self.resync:
                    raise ProtocolError(bad)
                nxt = self._buf.find(_MAGIC_BYTES, offset + 1)
                if nxt < 0:  # keep a last byte that may begin the next magic
                    nxt = len(self._buf) - (len(_MAGIC_BYTES) - 1)
                self.skipped += nxt - offset
                offset = nxt
                continue
            end = offset + HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(ftype, fid, bytes(self._buf[offset + HEADER.size : end])))
            offset = end
        del self._buf[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


# ---- primitives -------------------------------------------------------------

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


def _text(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _untext(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def _pack(self, fmt: struct.Struct, value: int, what: str) -> _Writer:
        try:
            self._parts.append(fmt.pack(value))
        except struct.error as e:
            raise ProtocolError(f"{what} {value!r} out of range") from e
        return self

    def u32(self, v: int, what: str = "u32") -> _Writer:
        return self._pack(_U32, v, what)

    def i32(self, v: int, what: str = "i32") -> _Writer:
        return self._pack(_I32, v, what)

    def u64(self, v: int, what: str = "u64") -> _Writer:
        return self._pack(_U64, v, what)

    def i64(self, v: int, what: str = "i64") -> _Writer:
        return self._pack(_I64, v, what)

    def str(self, v: str | bytes, what: str = "string", *, nul_ok: bool = True) -> _Writer:
        raw = _text(v)
        if not nul_ok and b"\0" in raw:
            raise ProtocolError(f"{what} {v!r} contains a NUL byte")
        self.u32(len(raw), what)
        self._parts.append(raw)
        return self

    def strlist(self, items: Iterable[str | bytes], what: str) -> _Writer:
        items = list(items)
        self.u32(len(items), what)
        for item in items:
            self.str(item, what, nul_ok=False)
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class _Reader:
    def __init__(self, payload: bytes, what: str) -> None:
        self._data = memoryview(payload)
        self._off = 0
        self._what = what

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._what} payload: {why}")

    def _take(self, n: int) -> memoryview:
        if len(self._data) - self._off < n:
            raise self._fail(f"needs {n} more bytes at offset {self._off}")
        view = self._data[self._off : self._off + n]
        self._off += n
        return view

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def i32(self) -> int:
        return _I32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def i64(self) -> int:
        return _I64.unpack(self._take(8))[0]

    def raw_str(self, *, nul_ok: bool = True) -> bytes:
        raw = bytes(self._take(self.u32()))
        if not nul_ok and b"\0" in raw:
            raise self._fail("NUL byte inside a string")
        return raw

    def str(self, *, nul_ok: bool = True) -> str:
        return _untext(self.raw_str(nul_ok=nul_ok))

    def strlist(self) -> tuple[str, ...]:
        count = self.u32()
        if count > (len(self._data) - self._off) // 4:
            raise self._fail(f"list of {count} strings cannot fit")
        return tuple(self.str(nul_ok=False) for _ in range(count))

    def done(self) -> None:
        if self._off != len(self._data):
            raise self._fail(f"{len(self._data) - self._off} bytes left over")


# ---- typed payloads ---------------------------------------------------------


def _check_size(cols: int, rows: int, what: str) -> None:
    for name, v in (("cols", cols), ("rows", rows)):
        if not TTY_MIN <= v <= TTY_MAX:
            raise ProtocolError(f"{what}: {name} {v} not in {TTY_MIN}..{TTY_MAX}")


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """EXEC: run ``argv`` in the guest. ``user`` "" is root, ``cwd`` "" is /.

    ``tty``: the process gets a new pseudo-terminal of ``cols`` x ``rows`` as its
    stdin, stdout and stderr (one stream: STDOUT frames; ``stdin`` is then implied).
    """

    argv: tuple[str | bytes, ...]
    env: tuple[str, ...] = ()
    cwd: str = ""
    user: str = ""
    stdin: bool = False
    tty: bool = False
    cols: int = 80
    rows: int = 24

    def encode(self) -> bytes:
        if not self.argv:
            raise ProtocolError("EXEC needs a non-empty argv")
        flags = (EXEC_STDIN if self.stdin else 0) | (EXEC_TTY if self.tty else 0)
        w = _Writer().u32(flags)
        w.str(self.user, "user", nul_ok=False).str(self.cwd, "cwd", nul_ok=False)
        w.strlist(self.argv, "argv").strlist(self.env, "env")
        if self.tty:
            _check_size(self.cols, self.rows, "EXEC")
            w.u32(self.cols, "cols").u32(self.rows, "rows")
        return w.bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "EXEC")
        flags = r.u32()
        if flags & ~(EXEC_STDIN | EXEC_TTY):
            raise ProtocolError(f"malformed EXEC payload: unknown flags 0x{flags:x}")
        user, cwd = r.str(nul_ok=False), r.str(nul_ok=False)
        argv, env = r.strlist(), r.strlist()
        tty = bool(flags & EXEC_TTY)
        cols, rows = (r.u32(), r.u32()) if tty else (80, 24)
        r.done()
        if not argv:
            raise ProtocolError("malformed EXEC payload: empty argv")
        if tty:
            _check_size(cols, rows, "malformed EXEC payload")
        return cls(argv, env, cwd, user, bool(flags & EXEC_STDIN), tty, cols, rows)


def identity_problem(hostname: str | bytes, ifname: str | bytes, mac: bytes) -> str:
    """Why a SET_IDENTITY request is not acceptable ("" if it is); both sides check the
    same rules (the agent in C)."""
    host, ifn = _text(hostname), _text(ifname)
    if not HOSTNAME_RE.fullmatch(host):
        return f"hostname {host!r} is not 1-64 of [A-Za-z0-9_.-] starting with a letter or digit"
    if bool(ifn) != bool(mac):
        return "an interface name and a MAC go together"
    if ifn and not IFNAME_RE.fullmatch(ifn):
        return f"interface name {ifn!r} is not 1-15 of [A-Za-z0-9_.-]"
    if mac and (len(mac) != 6 or mac[0] & 1 or mac == bytes(6)):
        return f"MAC {mac.hex(':')} is not a 6-byte unicast address"
    return ""


def parse_mac(text: str) -> bytes:
    """``"52:54:00:aa:bb:cc"`` as 6 bytes (ProtocolError if it is not one)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{2}", p) for p in parts):
        raise ProtocolError(f"{text!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


@dataclass(frozen=True, slots=True)
class IdentityRequest:
    """SET_IDENTITY: the guest's hostname, and the MAC of interface ``ifname`` (both
    empty: no MAC).  The agent sets them itself (sethostname, SIOCSIFHWADDR): no
    process is started in the guest."""

    hostname: str
    ifname: str = ""
    mac: bytes = b""

    def encode(self) -> bytes:
        if why := identity_problem(self.hostname, self.ifname, self.mac):
            raise ProtocolError(f"SET_IDENTITY: {why}")
        w = _Writer().str(self.hostname, "hostname").str(self.ifname, "ifname")
        return w.str(self.mac, "mac").bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "SET_IDENTITY")
        req = cls(r.str(), r.str(), r.raw_str())
        r.done()
        if why := identity_problem(req.hostname, req.ifname, req.mac):
            raise ProtocolError(f"malformed SET_IDENTITY payload: {why}")
        return req


@dataclass(frozen=True, slots=True)
class IdentityReply:
    """The OK that answers SET_IDENTITY: the hostname and MAC the guest has now, as
    read back by the agent (``mac`` empty if none was asked for)."""

    hostname: str
    mac: bytes = b""

    def encode(self) -> bytes:
        return _Writer().str(self.hostname, "hostname").str(self.mac, "mac").bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        if len(payload) > IDENTITY_REPLY_MAX:
            raise ProtocolError(
                f"malformed SET_IDENTITY answer: {len(payload)} bytes "
                f"(at most {IDENTITY_REPLY_MAX})"
            )
        r = _Reader(payload, "SET_IDENTITY answer")
        reply = cls(r.str(), r.raw_str())
        r.done()
        return reply


@dataclass(frozen=True, slots=True)
class ResizeRequest:
    """RESIZE: the new size of an EXEC's terminal (sent with that EXEC's id)."""

    cols: int
    rows: int

    def encode(self) -> bytes:
        _check_size(self.cols, self.rows, "RESIZE")
        return _Writer().u32(self.cols, "cols").u32(self.rows, "rows").bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "RESIZE")
        req = cls(r.u32(), r.u32())
        r.done()
        _check_size(req.cols, req.rows, "malformed RESIZE payload")
        return req


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """EXIT: ``code`` as a shell reports it (128+N when killed by signal N)."""

    code: int
    signal: int = 0

    def encode(self) -> bytes:
        return _Writer().i32(self.code, "exit code").u32(self.signal, "signal").bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "EXIT")
        status = cls(r.i32(), r.u32())
        r.done()
        return status


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """HELLO_OK."""

    version: int
    agent_version: str
    uptime_ns: int

    def encode(self) -> bytes:
        w = _Writer().u32(self.version, "version").str(self.agent_version)
        return w.u64(self.uptime_ns, "uptime").bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "HELLO_OK")
        info = cls(r.u32(), r.str(), r.u64())
        r.done()
        return info


@dataclass(frozen=True, slots=True)
class FileInfo:
    """FILEINFO: ``mode`` is st_mode with type bits; ``mtime`` in seconds."""

    mode: int
    size: int
    uid: int
    gid: int
    mtime: int
    link_target: str = ""

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return _stat.S_ISREG(self.mode)

    def encode(self) -> bytes:
        w = _Writer().u32(self.mode, "mode").u64(self.size, "size")
        w.u32(self.uid, "uid").u32(self.gid, "gid").i64(self.mtime, "mtime")
        return w.str(self.link_target).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "FILEINFO")
        info = cls(r.u32(), r.u64(), r.u32(), r.u32(), r.i64(), r.str())
        r.done()
        return info


@dataclass(frozen=True, slots=True)
class DirEntry:
    """DIRENT: one entry of a LIST_DIR (not following symlinks)."""

    mode: int
    size: int
    name: str
    link_target: str = ""

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return _stat.S_ISREG(self.mode)

    def encode(self) -> bytes:
        w = _Writer().u32(self.mode, "mode").u64(self.size, "size")
        return w.str(self.name).str(self.link_target).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "DIRENT")
        entry = cls(r.u32(), r.u64(), r.str(), r.str())
        r.done()
        return entry


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """ERROR: the request failed and is finished."""

    errno: int
    message: str

    def encode(self) -> bytes:
        return _Writer().i32(self.errno, "errno").str(self.message).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "ERROR")
        reply = cls(r.i32(), r.str())
        r.done()
        return reply


@dataclass(frozen=True, slots=True)
class WriteFileRequest:
    """WRITE_FILE; the content follows as STDIN frames, ended by an empty one."""

    path: str
    mode: int = 0o644
    uid: int = UNCHANGED
    gid: int = UNCHANGED

    def encode(self) -> bytes:
        w = _Writer().u32(self.mode, "mode").u32(self.uid, "uid").u32(self.gid, "gid")
        return w.str(self.path, "path", nul_ok=False).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "WRITE_FILE")
        mode, uid, gid = r.u32(), r.u32(), r.u32()
        req = cls(r.str(nul_ok=False), mode, uid, gid)
        r.done()
        return req


@dataclass(frozen=True, slots=True)
class PathRequest:
    """The payload of READ_FILE, STAT and LIST_DIR."""

    path: str

    def encode(self) -> bytes:
        return _Writer().str(self.path, "path", nul_ok=False).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "path")
        req = cls(r.str(nul_ok=False))
        r.done()
        return req


@dataclass(frozen=True, slots=True)
class MkdirRequest:
    path: str
    mode: int = 0o755

    def encode(self) -> bytes:
        return _Writer().u32(self.mode, "mode").str(self.path, "path", nul_ok=False).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "MKDIR")
        mode = r.u32()
        req = cls(r.str(nul_ok=False), mode)
        r.done()
        return req


@dataclass(frozen=True, slots=True)
class SymlinkRequest:
    target: str
    path: str

    def encode(self) -> bytes:
        w = _Writer().str(self.target, "target", nul_ok=False)
        return w.str(self.path, "path", nul_ok=False).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "SYMLINK")
        req = cls(r.str(nul_ok=False), r.str(nul_ok=False))
        r.done()
        return req


@dataclass(frozen=True, slots=True)
class SetTimeRequest:
    seconds: int
    nanoseconds: int = 0

    @classmethod
    def from_float(cls, t: float) -> Self:
        seconds = int(t // 1)
        return cls(seconds, min(int((t - seconds) * 1e9), 999_999_999))

    def encode(self) -> bytes:
        if not 0 <= self.nanoseconds < 1_000_000_000:
            raise ProtocolError(f"nanoseconds {self.nanoseconds} out of range")
        return _Writer().i64(self.seconds, "seconds").u32(self.nanoseconds).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, "SET_TIME")
        req = cls(r.i64(), r.u32())
        r.done()
        if req.nanoseconds >= 1_000_000_000:  # what encode() refuses, decode refuses too
            raise ProtocolError(f"malformed SET_TIME payload: nanoseconds {req.nanoseconds}")
        return req


class _OneU32:
    """Mixin for payloads that are a single ``u32`` field."""

    __slots__ = ()

    def encode(self) -> bytes:
        (field,) = fields(self)  # type: ignore[arg-type]
        return _Writer().u32(getattr(self, field.name), field.name).bytes()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        r = _Reader(payload, cls.__name__)
        value = r.u32()
        r.done()
        return cls(value)  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class SignalRequest(_OneU32):
    signo: int


@dataclass(frozen=True, slots=True)
class ShutdownRequest(_OneU32):
    """SHUTDOWN ``how``: 0 power off, 1 reboot."""

    how: int = 0


@dataclass(frozen=True, slots=True)
class StopRequest(_OneU32):
    """STOP (shim only): SIGTERM, SIGKILL after ``timeout_seconds``, power off."""

    timeout_seconds: int


@dataclass(frozen=True, slots=True)
class Started(_OneU32):
    """STARTED: the guest pid of an EXEC's main process."""

    pid: int

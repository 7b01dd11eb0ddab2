"""The pure wire codec against hand-assembled golden frames (tests/fixtures/protocol)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from torpor.agent.protocol import (
    HEADER,
    MAX_PAYLOAD,
    UNCHANGED,
    DirEntry,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    Frame,
    FrameDecoder,
    HelloInfo,
    IdentityReply,
    IdentityRequest,
    MkdirRequest,
    PathRequest,
    ResizeRequest,
    SetTimeRequest,
    ShutdownRequest,
    SignalRequest,
    Started,
    StopRequest,
    SymlinkRequest,
    T,
    WriteFileRequest,
)
from torpor.errors import ProtocolError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "protocol"

# file -> (type, id, typed payload or None for an empty payload)
GOLDEN = {
    "hello_id1.bin": (T.HELLO, 1, None),
    "hello_ok_id1.bin": (T.HELLO_OK, 1, HelloInfo(1, "0.1.0", 1_000_000_000)),
    "exec_echo_hi.bin": (T.EXEC, 2, ExecRequest(("echo", "hi"))),
    "started_id2.bin": (T.STARTED, 2, Started(42)),
    "stdout_hi.bin": (T.STDOUT, 2, b"hi\n"),
    "exit_0.bin": (T.EXIT, 2, ExitStatus(0, 0)),
    "exit_sigkill.bin": (T.EXIT, 5, ExitStatus(137, 9)),
    "stat_etc.bin": (T.STAT, 4, PathRequest("/etc")),
    "fileinfo_dir.bin": (T.FILEINFO, 4, FileInfo(0o40755, 4096, 0, 0, 1_700_000_000, "")),
    "write_file.bin": (T.WRITE_FILE, 6, WriteFileRequest("/tmp/x")),
    "error_enoent.bin": (T.ERROR, 3, ErrorReply(2, "no such file")),
    "exec_tty_sh.bin": (T.EXEC, 7, ExecRequest(("sh",), tty=True, cols=120, rows=40)),
    "resize_id7.bin": (T.RESIZE, 7, ResizeRequest(100, 30)),
    "set_identity_id8.bin": (
        T.SET_IDENTITY,
        8,
        IdentityRequest("fork-1", "eth0", bytes.fromhex("525400aabbcc")),
    ),
    "identity_ok_id8.bin": (T.OK, 8, IdentityReply("fork-1", bytes.fromhex("525400aabbcc"))),
}


def golden(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def payload_of(typed: object) -> bytes:
    if typed is None:
        return b""
    if isinstance(typed, bytes):
        return typed
    return typed.encode()  # type: ignore[attr-defined]


def test_every_fixture_is_covered():
    assert {p.name for p in FIXTURES.glob("*.bin")} == set(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_encode_matches_golden(name):
    ftype, fid, typed = GOLDEN[name]
    assert Frame(ftype, fid, payload_of(typed)).encode() == golden(name)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_decode_golden_round_trips(name):
    ftype, fid, typed = GOLDEN[name]
    (frame,) = FrameDecoder().feed(golden(name))
    assert (frame.type, frame.id) == (ftype, fid)
    if typed is None or isinstance(typed, bytes):
        assert frame.payload == payload_of(typed)
    else:
        assert type(typed).decode(frame.payload) == typed
    assert frame.encode() == golden(name)


def test_decoder_handles_every_split_point():
    stream = b"".join(golden(name) for name in sorted(GOLDEN))
    expected = FrameDecoder().feed(stream)
    assert len(expected) == len(GOLDEN)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert frames == expected, cut
        assert decoder.pending == 0


def test_decoder_byte_by_byte():
    stream = golden("exec_echo_hi.bin") + golden("exit_0.bin")
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert [f.type for f in frames] == [T.EXEC, T.EXIT]


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(0x7055, T.HELLO, 0, 1, 0),  # bad magic
        HEADER.pack(0x7054, T.HELLO, 1, 1, 0),  # reserved flags set
        HEADER.pack(0x7054, T.DATA, 0, 1, MAX_PAYLOAD + 1),  # oversized
    ],
)
def test_decoder_is_strict(header):
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(header)


def test_resync_decoder_starts_mid_frame():
    """A restored VM's port may first deliver the tail of a frame whose head went to
    the shim connected at snapshot time: the shim's decoder skips to the next frame
    (the strict one raised, the reader died, and HELLO was never answered)."""
    first = Frame(T.STDOUT, 3, b"tick 41\n" * 40).encode()
    rest = [Frame(T.STDOUT, 3, b"tick 42\n"), Frame(T.HELLO_OK, 1, b"")]
    stream = first + b"".join(f.encode() for f in rest)
    for cut in range(1, len(first)):
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(stream[cut:])
        decoder = FrameDecoder(resync=True)
        frames = decoder.feed(stream[cut : cut + 5]) + decoder.feed(stream[cut + 5 :])
        assert frames == rest, cut
        assert decoder.skipped == len(first) - cut and decoder.pending == 0


@pytest.mark.parametrize(
    "garbage", [b"\xff" * 100, b"Tp\x01" * 50, HEADER.pack(0x7054, T.DATA, 0, 1, MAX_PAYLOAD + 1)]
)
def test_resync_decoder_survives_garbage(garbage: bytes) -> None:
    ok = Frame(T.HELLO_OK, 1, b"")
    decoder = FrameDecoder(resync=True)
    assert decoder.feed(garbage) + decoder.feed(ok.encode()) == [ok]
    assert decoder.skipped == len(garbage)


def test_max_payload_is_allowed_and_one_more_is_not():
    frame = Frame(T.DATA, 7, bytes(MAX_PAYLOAD))
    assert FrameDecoder().feed(frame.encode()) == [frame]
    with pytest.raises(ProtocolError):
        Frame(T.DATA, 7, bytes(MAX_PAYLOAD + 1)).encode()


def test_all_payload_types_round_trip():
    values = [
        ExecRequest((b"/bin/\xff", "x"), ("PATH=/bin", "A=\xe9"), "/tmp", "1000:1000", True),
        ExitStatus(-1, 0),
        HelloInfo(1, "v", 2**64 - 1),
        FileInfo(0o120777, 3, 1, 2, -5, "target"),
        DirEntry(0o100644, 10, "caf\udce9", ""),
        ErrorReply(-3, "negative errno is still an i32"),
        WriteFileRequest("/a b", 0o4755, 0, UNCHANGED),
        PathRequest("/"),
        MkdirRequest("/a/b/c", 0o700),
        SymlinkRequest("../x", "/y"),
        SetTimeRequest(-(2**40), 999_999_999),
        SignalRequest(15),
        ShutdownRequest(1),
        StopRequest(30),
        Started(2**32 - 1),
        ExecRequest(("sh",), ("TERM=xterm",), stdin=True, tty=True, cols=1, rows=4096),
        ResizeRequest(4096, 1),
    ]
    for value in values:
        decoded = type(value).decode(value.encode())
        if isinstance(value, ExecRequest):  # bytes argv come back as (surrogate-escaped) str
            assert decoded.encode() == value.encode()
        else:
            assert decoded == value


def test_strings_survive_non_utf8_bytes():
    info = DirEntry.decode(DirEntry(0, 0, "x", "").encode().replace(b"x", b"\xff"))
    assert info.name == "\udcff"
    assert info.name.encode("utf-8", "surrogateescape") == b"\xff"


def test_file_type_properties():
    assert FileInfo(0o40755, 0, 0, 0, 0).is_dir
    assert FileInfo(0o100644, 0, 0, 0, 0).is_file
    assert FileInfo(0o120777, 0, 0, 0, 0, "t").is_symlink
    assert not DirEntry(0o100644, 0, "f").is_dir


def test_set_time_from_float():
    assert SetTimeRequest.from_float(1.5) == SetTimeRequest(1, 500_000_000)
    assert SetTimeRequest.from_float(-0.25) == SetTimeRequest(-1, 750_000_000)


MALFORMED = [
    (ExecRequest, b""),
    (ExecRequest, golden("exec_echo_hi.bin")[HEADER.size : -1]),  # truncated
    (ExecRequest, golden("exec_echo_hi.bin")[HEADER.size :] + b"\0"),  # left over
    (ExecRequest, struct.pack("<I", 4) + bytes(8) + struct.pack("<I", 0) * 2),  # bad flags
    (ExecRequest, golden("exec_tty_sh.bin")[HEADER.size : -4]),  # TTY without rows
    (ExecRequest, golden("exec_tty_sh.bin")[HEADER.size : -8] + bytes(8)),  # TTY 0x0
    (ExecRequest, golden("exec_tty_sh.bin")[HEADER.size : -4] + struct.pack("<I", 4097)),
    (ResizeRequest, bytes(4)),
    (ResizeRequest, struct.pack("<III", 80, 24, 0)),
    (ResizeRequest, struct.pack("<II", 0, 24)),
    (ResizeRequest, struct.pack("<II", 80, 2**32 - 1)),
    (ExecRequest, bytes(12) + struct.pack("<II", 0, 0)),  # empty argv
    (ExecRequest, bytes(12) + struct.pack("<II", 1, 3) + b"a\0b" + bytes(4)),  # NUL in argv
    (ExecRequest, bytes(12) + struct.pack("<I", 0xFFFFFFFF)),  # absurd count
    (ExitStatus, bytes(7)),
    (ExitStatus, bytes(9)),
    (HelloInfo, struct.pack("<II", 1, 100) + b"short"),
    (FileInfo, bytes(31)),
    (DirEntry, bytes(12) + struct.pack("<I", 5) + b"ab"),
    (ErrorReply, struct.pack("<i", 2)),
    (WriteFileRequest, bytes(12) + struct.pack("<I", 3) + b"a\0b"),
    (PathRequest, struct.pack("<I", 4) + b"/etc" + b"x"),
    (MkdirRequest, bytes(3)),
    (SymlinkRequest, struct.pack("<I", 1) + b"a"),
    (SetTimeRequest, bytes(11)),
    (SignalRequest, bytes(5)),
    (ShutdownRequest, b""),
    (StopRequest, bytes(3)),
    (Started, bytes(8)),
]


@pytest.mark.parametrize(("cls", "payload"), MALFORMED, ids=lambda v: getattr(v, "__name__", ""))
def test_malformed_payloads_raise(cls, payload):
    with pytest.raises(ProtocolError):
        cls.decode(payload)


@pytest.mark.parametrize(
    "value",
    [
        ExecRequest(()),
        ExecRequest(("a\0b",)),
        PathRequest("/a\0"),
        SignalRequest(-1),
        Started(2**32),
        ResizeRequest(0, 24),
        ResizeRequest(80, 4097),
        ExecRequest(("sh",), tty=True, cols=0),
        SetTimeRequest(0, 1_000_000_000),
        Frame(T.HELLO, 2**32),
    ],
)
def test_unencodable_values_raise(value):
    with pytest.raises(ProtocolError):
        value.encode()

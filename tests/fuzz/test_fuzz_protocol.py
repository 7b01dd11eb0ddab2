"""Fuzz the host side of the agent protocol and of ``torpor cp`` (issue 9).

Everything here is what a hostile guest controls: the byte stream, the frames a
request gets back, and the names, types, links and bytes of a copy out of the VM.
The properties: only typed errors (ProtocolError / AgentError / TorporError),
never a hang, and a copy never writes outside its destination.

Examples per test: ``TORPOR_FUZZ_EXAMPLES`` (see tests/fuzz/fuzzing.py).
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import socket
import stat
import tarfile
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.agent.test_files_hostile import HostileGuest
from tests.fuzz.fuzzing import fuzz
from torpor.agent import AgentClient
from torpor.agent.files import CopyLimits, copy_from_vm, copy_from_vm_tar
from torpor.agent.protocol import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    DirEntry,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    Frame,
    FrameDecoder,
    HelloInfo,
    MkdirRequest,
    PathRequest,
    ResizeRequest,
    SetTimeRequest,
    Started,
    SymlinkRequest,
    T,
    WriteFileRequest,
)
from torpor.errors import AgentError, ProtocolError, TorporError

DECODERS = [
    DirEntry,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    HelloInfo,
    MkdirRequest,
    PathRequest,
    ResizeRequest,
    SetTimeRequest,
    Started,
    SymlinkRequest,
    WriteFileRequest,
]

frame_types = st.one_of(st.sampled_from(list(T)), st.integers(0, 255))
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda i: FileInfo(*i).encode(),
        st.tuples(
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(-(2**63), 2**63 - 1),
            st.text(max_size=8),
        ),
    ),
    st.builds(
        lambda m, n, link: DirEntry(m, 1, n, link).encode(),
        st.integers(0, 2**32 - 1),
        st.text(max_size=8),
        st.text(max_size=8),
    ),
    st.builds(
        lambda e, m: ErrorReply(e, m).encode(),
        st.integers(-(2**31), 2**31 - 1),
        st.text(max_size=8),
    ),
    st.builds(
        lambda v, s, f: HelloInfo(v, s, f).encode(),
        st.integers(0, 2**32 - 1),
        st.text(max_size=8),
        st.integers(0, 2**64 - 1),
    ),
)


def _frame(t: int, fid: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, t, 0, fid, len(payload)) + payload


@fuzz
@given(st.lists(st.binary(max_size=40), max_size=12), st.booleans())
def test_frame_decoder_on_any_bytes(pieces: list[bytes], valid_prefix: bool) -> None:
    """Any byte stream, split anywhere: frames or ProtocolError, and what was decoded
    re-encodes to exactly the bytes consumed."""
    if valid_prefix:
        pieces = [_frame(T.DATA, 7, b"abc"), *pieces]
    dec = FrameDecoder()
    got: list[Frame] = []
    fed = b""
    try:
        for p in pieces:
            fed += p
            got += dec.feed(p)
    except ProtocolError:
        return
    consumed = b"".join(f.encode() for f in got)
    assert fed.startswith(consumed)
    assert dec.pending == len(fed) - len(consumed)
    assert dec.pending < HEADER.size + MAX_PAYLOAD


@fuzz
@given(st.sampled_from(DECODERS), st.binary(max_size=96))
def test_payload_decoders_on_any_bytes(cls: type, payload: bytes) -> None:
    """decode() raises ProtocolError or returns a value that encodes back to the input."""
    try:
        value = cls.decode(payload)
    except ProtocolError:
        return
    assert value.encode() == payload


def _serve_frames(sock: socket.socket, reply: list[tuple[int, bool, bytes]]) -> None:
    """Read the first request, send ``reply`` frames (to its id, or to a random one),
    then hang up: the client must finish with a typed error or a value, never hang."""
    dec = FrameDecoder()
    try:
        frames: list[Frame] = []
        while not frames:
            data = sock.recv(1 << 16)
            if not data:
                return
            frames = dec.feed(data)
        rid = frames[0].id
        for t, to_request, payload in reply:
            sock.sendall(_frame(t, rid if to_request else rid ^ 0x5A5A, payload))
    except OSError:
        pass
    finally:
        sock.shutdown(socket.SHUT_RDWR)


@fuzz
@given(
    st.sampled_from(["stat", "list_dir", "read_file", "hello", "exec", "write_file", "mkdir"]),
    st.lists(st.tuples(frame_types, st.booleans(), payloads), max_size=8),
    st.booleans(),
)
def test_client_on_any_reply(
    method: str, reply: list[tuple[int, bool, bytes]], garbage_after: bool
) -> None:
    """Whatever frames a request gets back, the client returns or raises AgentError."""
    ours, theirs = socket.socketpair()
    if garbage_after:
        reply = [*reply, (0x41, True, b"")]
    server = threading.Thread(target=_serve_frames, args=(theirs, reply), daemon=True)
    server.start()
    client = AgentClient(ours)
    try:
        if method == "stat":
            assert isinstance(client.stat("/x", timeout=20), FileInfo)
        elif method == "list_dir":
            assert all(isinstance(e, DirEntry) for e in client.list_dir("/x", timeout=20))
        elif method == "read_file":
            assert isinstance(client.read_file("/x", timeout=20), bytes)
        elif method == "hello":
            client.hello(timeout=20)
        elif method == "exec":
            client.exec(["true"], timeout=20)
        elif method == "write_file":
            client.write_file("/x", b"data", timeout=20)
        else:
            client.mkdir("/x", timeout=20)
    except AgentError:
        pass
    finally:
        client.close()
        server.join(timeout=20)
        theirs.close()
    assert not server.is_alive()


# ---- torpor cp out of a hostile guest ---------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        [
            "f",
            "d",
            "l",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "",
            ".torpor-cp-0",
            ".f.torpor-cp",
            "x\0y",
            "n" * 256,
            "keep",
            "-",
        ]
    ),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=6),
    st.binary(min_size=1, max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
KINDS = st.sampled_from(["file", "dir", "link", "chr", "fifo", "sock", "suid"])
_MODES = {
    "file": stat.S_IFREG | 0o644,
    "dir": stat.S_IFDIR | 0o755,
    "link": stat.S_IFLNK | 0o777,
    "chr": stat.S_IFCHR | 0o600,
    "fifo": stat.S_IFIFO | 0o644,
    "sock": stat.S_IFSOCK | 0o644,
    "suid": stat.S_IFREG | 0o6755,
}


@st.composite
def hostile_trees(draw: st.DrawFn, outside: str) -> tuple[dict, dict]:
    targets = st.sampled_from(
        [outside, f"{outside}/keep", "..", "../..", "/", "/etc/passwd", "f", "a\0b", ""]
    )
    tree: dict[str, tuple[int, object]] = {}
    opened: dict[str, int] = {}

    def folder(path: str, depth: int) -> None:
        entries = []
        for _ in range(draw(st.integers(0, 4 if depth < 3 else 0))):
            name, kind = draw(NAMES), draw(KINDS)
            child = posixpath.join(path, name)
            link = draw(targets) if kind == "link" else ""
            entries.append((name, _MODES[kind], link))
            if kind == "dir":
                folder(child, depth + 1)
            elif kind == "link":
                tree[child] = (_MODES[kind], link)
            else:
                tree[child] = (_MODES[kind], draw(st.binary(max_size=32)))
                if draw(st.booleans()):
                    opened[child] = _MODES[draw(KINDS)]  # its type changes when opened
        tree[path] = (_MODES["dir"], entries)

    folder("/s", 0)
    return tree, opened


def _snapshot(top: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = Path(root) / n
            st_ = os.lstat(p)
            body: bytes | str | None = None
            if stat.S_ISREG(st_.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(top))] = (st_.st_mode, body)
    return out


@fuzz
@given(st.data(), st.booleans(), st.booleans())
def test_copy_out_of_a_hostile_guest(data: st.DataObject, twice: bool, into: bool) -> None:
    """Random hostile trees, copied once or twice: typed errors only; outside the
    destination nothing changes; inside only files, folders and links, no setuid."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        outside = base / "outside"
        outside.mkdir()
        (outside / "keep").write_bytes(b"keep\n")
        os.symlink(outside, base / "to-outside")
        dest = base / "dest"
        dest.mkdir()
        before = _snapshot(outside)
        tree, opened = data.draw(hostile_trees(str(outside)))
        guest = HostileGuest(tree, opened=opened)
        try:
            for _ in range(2 if twice else 1):
                with suppress(TorporError):
                    copy_from_vm(
                        guest.client,
                        "/s",
                        dest if into else dest / "s",
                        CopyLimits(max_bytes=4096, max_entries=200, max_depth=8),
                    )
        finally:
            guest.close()
        assert _snapshot(outside) == before
        assert sorted(os.listdir(base)) == ["dest", "outside", "to-outside"]
        for rel, (mode, _) in _snapshot(dest).items():
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), rel
            assert not mode & (stat.S_ISUID | stat.S_ISGID), rel
            assert not re.fullmatch(r"\.torpor-cp-[0-9a-f]{16}", Path(rel).name), rel  # temp left


@fuzz
@given(st.data())
def test_copy_to_a_tar_stream(data: st.DataObject) -> None:
    """``cp VM:path -``: the archive holds only safe relative names."""
    tree, opened = data.draw(hostile_trees("/outside"))
    guest = HostileGuest(tree, opened=opened)
    buf = io.BytesIO()
    try:
        copy_from_vm_tar(guest.client, "/s", buf, CopyLimits(max_bytes=4096, max_entries=200))
    except TorporError:
        return
    finally:
        guest.close()
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            assert parts[0] == "s" and ".." not in parts and "" not in parts, m.name
            assert m.isreg() or m.isdir() or m.issym(), m.name
            assert not m.mode & 0o7000

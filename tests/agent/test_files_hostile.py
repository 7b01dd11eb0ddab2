"""The host side of ``torpor cp`` against a hostile guest agent (issue 9, defect 1).

:class:`HostileGuest` is a guest that speaks the real wire protocol (through
torpor's own encoders) over a socketpair and lies as a compromised VM would:
names with ``/`` or ``..``, the same name twice as a link and then a folder,
files that turn into devices when opened, endless data, endless listings,
endless depth, setuid modes, NUL bytes in link targets.  The last test runs the
real C agent in host mode over a folder that a thread keeps swapping.
"""

from __future__ import annotations

import errno
import io
import os
import re
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from tests.agent.conftest import spawn_agent, stop_agent
from torpor.agent import AgentClient
from torpor.agent.files import CopyLimits, copy_from_vm, copy_from_vm_tar
from torpor.agent.protocol import (
    DirEntry,
    ErrorReply,
    FileInfo,
    Frame,
    FrameDecoder,
    PathRequest,
    T,
)
from torpor.errors import ConflictError, TorporError, UnsafeCopyError

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LNK = stat.S_IFLNK | 0o777
CHR = stat.S_IFCHR | 0o600

#: A node: (mode, content or link target or child entries).
Node = tuple[int, object]


class HostileGuest:
    """A scripted guest: ``tree`` maps a guest path to how the agent answers it.

    A value is ``(mode, bytes)`` for a file, ``(mode, str)`` for a link, or
    ``(mode, [(name, mode, link), ...])`` for a folder listing (names verbatim,
    duplicates allowed).  ``opened`` overrides the FILEINFO a READ_FILE answers;
    ``endless`` paths stream DATA (or DIRENTs for folders) until the host hangs up.
    """

    def __init__(self, tree: dict[str, Node], *, opened: dict[str, int] | None = None):
        self.tree = tree
        self.opened = opened or {}
        self.endless: set[str] = set()
        self.deep = False
        ours, theirs = socket.socketpair()
        self.client = AgentClient(ours)
        self._sock = theirs
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.client.close()
        self._thread.join(timeout=10)
        self._sock.close()

    def _send(self, t: T, fid: int, payload: bytes = b"") -> None:
        self._sock.sendall(Frame(t, fid, payload).encode())

    def _node(self, path: str) -> Node | None:
        if self.deep and path.startswith("/deep"):
            return (DIR, [("d", DIR, "")])
        return self.tree.get(path)

    def _serve(self) -> None:
        dec = FrameDecoder()
        try:
            while data := self._sock.recv(1 << 16):
                for f in dec.feed(data):
                    self._answer(f)
        except OSError:
            pass
        finally:  # a broken script must not leave the host waiting for replies
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _error(self, fid: int, code: int) -> None:
        self._send(T.ERROR, fid, ErrorReply(code, os.strerror(code)).encode())

    def _answer(self, f: Frame) -> None:
        if f.type not in (T.STAT, T.LIST_DIR, T.READ_FILE):
            return
        path = PathRequest.decode(f.payload).path
        node = self._node(path)
        if node is None:
            self._error(f.id, errno.ENOENT)
            return
        mode, body = node
        if f.type == T.STAT:
            link = body if isinstance(body, str) else ""
            size = len(body) if isinstance(body, bytes) else 0
            self._send(T.FILEINFO, f.id, FileInfo(mode, size, 0, 0, 0, link).encode())
        elif f.type == T.LIST_DIR:
            if path in self.endless:
                i = 0
                while True:
                    self._send(T.DIRENT, f.id, DirEntry(REG, 1, f"f{i}").encode())
                    i += 1
            if not isinstance(body, list):
                self._error(f.id, errno.ENOTDIR)
                return
            for name, cmode, link in body:
                self._send(T.DIRENT, f.id, DirEntry(cmode, 1, name, link).encode())
            self._send(T.OK, f.id)
        else:
            if not isinstance(body, bytes):
                self._error(f.id, errno.EISDIR if isinstance(body, list) else errno.ELOOP)
                return
            shown = self.opened.get(path, mode)
            self._send(T.FILEINFO, f.id, FileInfo(shown, 0, 0, 0, 0).encode())
            if path in self.endless:
                while True:
                    self._send(T.DATA, f.id, b"\0" * 65536)
            self._send(T.DATA, f.id, body)
            self._send(T.OK, f.id)


@pytest.fixture
def guest_factory() -> Iterator[Callable[..., HostileGuest]]:
    made: list[HostileGuest] = []

    def make(tree: dict[str, Node], **kw: object) -> HostileGuest:
        g = HostileGuest(tree, **kw)  # type: ignore[arg-type]
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


@pytest.fixture
def land(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): ``outside`` holds one file and must never change."""
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep\n")
    return dest, outside


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_bytes() == b"keep\n"


def _no_temp_files(dest: Path) -> None:
    for _root, dirs, files in os.walk(dest):
        assert not [n for n in dirs + files if re.fullmatch(r"\.torpor-cp-[0-9a-f]{16}", n)]


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "/abs", "", "x\0y", "n" * 256, "..\0", "sub/../../x"]
)
def test_unsafe_names_are_refused(guest_factory, land, name: str) -> None:
    dest, outside = land
    g = guest_factory({"/s": (DIR, [(name, REG, "")]), f"/s/{name}": (REG, b"evil")})
    with pytest.raises(UnsafeCopyError, match=r"unsafe file name|longer than"):
        copy_from_vm(g.client, "/s", dest)
    _untouched(outside)
    assert [p.name for p in dest.iterdir()] == ["s"]
    assert list((dest / "s").iterdir()) == []


def test_dot_entries_are_skipped(guest_factory, land) -> None:
    dest, outside = land
    g = guest_factory(
        {"/s": (DIR, [(".", DIR, ""), ("..", DIR, ""), ("f", REG, "")]), "/s/f": (REG, b"F")}
    )
    copy_from_vm(g.client, "/s", dest)
    assert (dest / "s" / "f").read_bytes() == b"F"
    _untouched(outside)


def test_link_then_folder_of_the_same_name(guest_factory, land) -> None:
    """A listing with ``d`` twice: first a link to the host, then a folder with a file."""
    dest, outside = land
    g = guest_factory(
        {
            "/s": (DIR, [("d", LNK, str(outside)), ("d", DIR, "")]),
            "/s/d": (DIR, [("keep", REG, "")]),
            "/s/d/keep": (REG, b"guest bytes"),
        }
    )
    with pytest.raises(ConflictError, match="not a folder"):
        copy_from_vm(g.client, "/s", dest)
    _untouched(outside)
    assert os.readlink(dest / "s" / "d") == str(outside)


def test_link_then_file_of_the_same_name(guest_factory, land) -> None:
    """A file after a link of the same name replaces the link; never writes through it."""
    dest, outside = land
    g = guest_factory(
        {"/s": (DIR, [("f", LNK, str(outside / "keep")), ("f", REG, "")]), "/s/f": (REG, b"new")}
    )
    copy_from_vm(g.client, "/s", dest)
    _untouched(outside)
    assert (dest / "s" / "f").read_bytes() == b"new"
    assert not (dest / "s" / "f").is_symlink()
    _no_temp_files(dest)


def test_planted_temp_names_are_harmless(guest_factory, land) -> None:
    """Whatever names the guest plants, temp files are fresh and O_EXCL."""
    dest, outside = land
    names = [
        (".f.torpor-cp", LNK, str(outside / "keep")),
        (".torpor-cp-0", LNK, str(outside)),
        ("f", REG, ""),
    ]
    g = guest_factory({"/s": (DIR, names), "/s/f": (REG, b"F")})
    copy_from_vm(g.client, "/s", dest)
    copy_from_vm(g.client, "/s", dest)  # again, over the planted links
    _untouched(outside)
    assert (dest / "s" / "f").read_bytes() == b"F"


def test_file_that_opens_as_a_device(guest_factory, land) -> None:
    dest, _ = land
    g = guest_factory({"/s": (DIR, [("f", REG, "")]), "/s/f": (REG, b"x")}, opened={"/s/f": CHR})
    with pytest.raises(UnsafeCopyError, match="no longer a regular file"):
        copy_from_vm(g.client, "/s", dest)
    assert list((dest / "s").iterdir()) == []


def test_devices_and_setuid_bits(guest_factory, land) -> None:
    dest, _ = land
    g = guest_factory(
        {
            "/s": (DIR, [("dev", CHR, ""), ("fifo", stat.S_IFIFO | 0o644, ""), ("su", REG, "")]),
            "/s/su": (REG, b"x"),
        },
        opened={"/s/su": stat.S_IFREG | 0o6755},
    )
    skipped = copy_from_vm(g.client, "/s", dest)
    assert sorted(skipped) == ["s/dev", "s/fifo"]
    assert [p.name for p in (dest / "s").iterdir()] == ["su"]
    assert stat.S_IMODE(os.lstat(dest / "s" / "su").st_mode) == 0o755


def test_endless_file_hits_the_byte_cap(guest_factory, land) -> None:
    dest, _ = land
    g = guest_factory({"/s": (DIR, [("f", REG, "")]), "/s/f": (REG, b"")})
    g.endless.add("/s/f")
    with pytest.raises(UnsafeCopyError, match="TORPOR_CP_MAX_BYTES"):
        copy_from_vm(g.client, "/s", dest, CopyLimits(max_bytes=5 << 20))
    assert list((dest / "s").iterdir()) == []


def test_endless_listing_hits_the_entry_cap(guest_factory, land) -> None:
    dest, _ = land
    tree: dict[str, Node] = {"/s": (DIR, [])}
    tree.update({f"/s/f{i}": (REG, b"") for i in range(200)})
    g = guest_factory(tree)
    g.endless.add("/s")
    with pytest.raises(UnsafeCopyError, match="TORPOR_CP_MAX_ENTRIES"):
        copy_from_vm(g.client, "/s", dest, CopyLimits(max_entries=100))


def test_endless_depth_hits_the_depth_cap(guest_factory, land) -> None:
    dest, _ = land
    g = guest_factory({})
    g.deep = True
    with pytest.raises(UnsafeCopyError, match="deeper than 20"):
        copy_from_vm(g.client, "/deep", dest, CopyLimits(max_depth=20))


def test_link_target_with_nul(guest_factory, land) -> None:
    dest, _ = land
    g = guest_factory({"/s": (DIR, [("l", LNK, "a\0b")])})
    with pytest.raises(UnsafeCopyError, match="symlink target"):
        copy_from_vm(g.client, "/s", dest)


def test_guest_root_lands_under_dest(guest_factory, land) -> None:
    """``cp VM:/ dest/`` copies the root's contents into dest, never to the host's /."""
    dest, _ = land
    g = guest_factory(
        {
            "/": (DIR, [("etc", DIR, "")]),
            "/etc": (DIR, [("marker", REG, "")]),
            "/etc/marker": (REG, b"m"),
        }
    )
    copy_from_vm(g.client, "/", dest)
    assert (dest / "etc" / "marker").read_bytes() == b"m"
    assert not Path("/etc/marker").exists()
    copy_from_vm(g.client, "/", dest / "new")
    assert (dest / "new" / "etc" / "marker").read_bytes() == b"m"


def test_final_link_in_dest_is_replaced_not_followed(guest_factory, land) -> None:
    dest, outside = land
    os.symlink(outside, dest / "d")
    g = guest_factory({"/f": (REG, b"F")})
    copy_from_vm(g.client, "/f", dest / "d")
    _untouched(outside)
    assert (dest / "d").read_bytes() == b"F" and not (dest / "d").is_symlink()


def test_tar_stream_names_are_checked(guest_factory) -> None:
    g = guest_factory({"/s": (DIR, [("../up", REG, "")])})
    with pytest.raises(UnsafeCopyError):
        copy_from_vm_tar(g.client, "/s", io.BytesIO())
    g2 = guest_factory(
        {
            "/s": (DIR, [("a", REG, ""), ("l", LNK, "/etc/passwd"), ("dev", CHR, "")]),
            "/s/a": (REG, b"A"),
        },
        opened={"/s/a": stat.S_IFREG | 0o4755},
    )
    buf = io.BytesIO()
    assert copy_from_vm_tar(g2.client, "/s", buf) == ["s/dev"]
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert set(members) == {"s", "s/a", "s/l"}
    assert members["s/a"].mode == 0o755 and members["s/a"].size == 1


def test_real_agent_swapping_types_during_copies(agent_binary: Path, tmp_path: Path) -> None:
    """The real C agent serves a folder a thread keeps swapping between a folder,
    a link to the host's ``outside`` and a file, while the host copies it out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep\n")
    guest = tmp_path / "guest"
    (guest / "w" / "a").mkdir(parents=True)
    stop = threading.Event()

    def swap() -> None:
        a = guest / "w" / "a"
        while not stop.is_set():
            for make in (
                lambda: os.symlink(outside, a),
                lambda: (a.mkdir(), (a / "keep").write_bytes(b"guest\n")),
                lambda: a.write_bytes(b"file\n"),
                lambda: os.symlink(outside / "keep", a),
                lambda: (a.mkdir(), os.symlink(outside / "keep", a / "f")),
            ):
                try:
                    if a.is_symlink() or a.is_file():
                        a.unlink()
                    elif a.is_dir():
                        for p in a.iterdir():
                            p.unlink()
                        a.rmdir()
                    make()
                except OSError:
                    pass
                time.sleep(0.0005)

    sock, proc = spawn_agent(agent_binary)
    client = AgentClient(sock)
    t = threading.Thread(target=swap, daemon=True)
    t.start()
    errors = 0
    try:
        for i in range(40):
            dest = tmp_path / f"d{i}"
            dest.mkdir()
            for _ in range(2):  # the second copy goes over what the first left
                try:
                    copy_from_vm(client, str(guest / "w"), dest)
                except TorporError:
                    errors += 1
            _untouched(outside)
            _no_temp_files(dest)
    finally:
        stop.set()
        t.join()
        assert stop_agent(client, proc) == 0
    assert errors < 80  # some copies succeed; refusals are typed errors, never tracebacks


def test_session_list_dir_tool_on_an_endless_listing(guest_factory) -> None:
    """The session's list_dir tool stops at its cap instead of collecting forever."""
    from torpor.session.tools import LIST_LIMIT, run_tool

    g = guest_factory({"/s": (DIR, [])})
    g.endless.add("/s")
    result = run_tool(g.client, "t1", "list_dir", {"path": "/s"})
    lines = result.content.splitlines()
    assert len(lines) == LIST_LIMIT + 1
    assert lines[-1] == f"[listing cut at {LIST_LIMIT} entries]"

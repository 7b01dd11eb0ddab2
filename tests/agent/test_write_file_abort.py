"""A ``write_file`` whose data source raises part-way leaves nothing behind in the
guest: no upload slot held (the agent has 32), no temporary file, the target
untouched; the source's own error reaches the caller.  On the shared VM, and on the
agent in host mode for a source that fails after part of it was sent."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from torpor.agent.client import STDIN_CHUNK

pytestmark = pytest.mark.vm


class Broken:
    """A file-like source that gives two chunks, then fails (a dropped upload)."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 2:
            raise OSError("the source went away")
        return b"p" * STDIN_CHUNK


def test_a_source_that_raises_leaks_no_upload(shared_vms, box) -> None:
    c = shared_vms.mgr.client(box)
    try:
        c.mkdir("/tmp/wfa")
        c.write_file("/tmp/wfa/target", b"old\n")
        for _ in range(40):  # more than the agent's 32 concurrent uploads
            with pytest.raises(OSError, match="the source went away"):
                c.write_file("/tmp/wfa/target", Broken())  # type: ignore[arg-type]
        c.write_file("/tmp/wfa/other", b"new\n")  # a slot is free
        names = sorted(e.name for e in c.list_dir("/tmp/wfa"))
        assert names == ["other", "target"], names  # no .torpor-tmp-* left
        assert c.read_file("/tmp/wfa/target") == b"old\n"
    finally:
        c.close()


class FailingFile(io.FileIO):
    """A regular file (so it is streamed as it is read, not spooled first) whose read
    fails part-way, as a disk's EIO or a Ctrl-C in the middle of an upload would."""

    def __init__(self, path: Path, fail_after: int) -> None:
        super().__init__(path, "rb")
        self.left = fail_after

    def read(self, n: int = -1) -> bytes:
        if self.left == 0:
            raise OSError(errno.EIO, "Input/output error (injected)")
        self.left -= 1
        return super().read(n)


def test_an_upload_cut_part_way_is_cancelled_in_the_guest(agent, tmp_path) -> None:
    """Some STDIN frames are sent when the source fails: the host cancels the upload
    (SIGNAL to its id), so the guest frees its slot and removes the temporary file at
    once, not when the connection closes; the target keeps its old content."""
    c = agent.client
    src = tmp_path / "src"
    src.write_bytes(b"q" * (STDIN_CHUNK * 3))
    d = tmp_path / "guest"
    d.mkdir()
    c.write_file(d / "target", b"old\n")
    for _ in range(40):  # more than the agent's 32 concurrent uploads
        with FailingFile(src, fail_after=2) as f, pytest.raises(OSError, match="injected"):
            c.write_file(d / "target", f)
    c.write_file(d / "other", b"new\n")  # a slot is free
    assert sorted(p.name for p in d.iterdir()) == ["other", "target"]  # no .torpor-tmp-*
    assert (d / "target").read_bytes() == b"old\n"

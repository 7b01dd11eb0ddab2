"""A ``write_file`` whose data source raises part-way leaves nothing behind in the
guest: no upload slot held (the agent has 32), no temporary file, the target
untouched; the source's own error reaches the caller.  On the shared VM."""

from __future__ import annotations

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

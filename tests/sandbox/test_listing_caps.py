"""``sb.files.list`` and ``sb.ps()`` never hold a guest listing of any length: a
folder past the cap is a clear GuestError, and ``ps`` reads /proc only as far as
the processes it reports (``MAX_PS``).  The caps are lowered here so the guest
needs only a few hundred entries; observed through the DIRENT entries decoded."""

from __future__ import annotations

import pytest

import torpor.sandbox.core as core
import torpor.sandbox.files as files
from torpor.agent.protocol import DirEntry
from torpor.errors import GuestError

pytestmark = pytest.mark.vm


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    names: list[str] = []
    real = DirEntry.decode

    def spy(payload: bytes) -> DirEntry:
        e = real(payload)
        names.append(e.name)
        return e

    monkeypatch.setattr(DirEntry, "decode", staticmethod(spy))
    return names


def test_a_folder_past_the_cap_is_a_clear_error(sb, monkeypatch, decoded) -> None:
    monkeypatch.setattr(files, "MAX_LIST_ENTRIES", 50, raising=False)
    r = sb.exec("mkdir -p /tmp/many /tmp/fifty && cd /tmp/many && touch $(seq 300) "
                "&& cd /tmp/fifty && touch $(seq 50)")
    assert r.exit_code == 0, r.stderr
    assert len(sb.files.list("/tmp/fifty")) == 50  # at the cap: all of it
    decoded.clear()
    with pytest.raises(GuestError, match="more than 50 entries"):
        sb.files.list("/tmp/many")
    assert len(decoded) <= 51


def test_ps_reads_proc_only_as_far_as_it_reports(sb, monkeypatch, decoded) -> None:
    r = sb.exec("for i in $(seq 300); do sleep 1000 & echo $!; done", timeout=120)
    assert r.exit_code == 0, r.stderr
    try:
        monkeypatch.setattr(core, "MAX_PS", 5)
        decoded.clear()
        assert len(sb.ps()) <= 5
        assert len(decoded) <= 5 + core.PROC_OTHER_ENTRIES + 1
    finally:
        sb.exec(["kill", *r.stdout.split()])

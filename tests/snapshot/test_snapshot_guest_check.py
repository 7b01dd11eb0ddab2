"""A snapshot names the guest agent protocol it was taken with; a restore checks it
before anything is made (no VM boots here: the check comes first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor.agent.protocol import PROTOCOL_VERSION
from torpor.errors import GuestError
from torpor.paths import Paths
from torpor.snapshot import restore
from torpor.snapshot.core import ARTIFACTS
from torpor.store import ChunkStore
from torpor.vmm.manager import VMManager
from torpor.vmm.state import VMConfig


def test_an_agent_protocol_this_host_cannot_speak_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    home = Paths(tmp_path / "home").ensure()
    mgr = VMManager(home)
    cfg = VMConfig(id="0" * 64, name="old", image_id="1" * 64, image_ref="tools", command=("true",))
    with ChunkStore(home.store) as store:
        arts = {}
        for name in ARTIFACTS:
            f = tmp_path / name
            f.write_bytes(name.encode() * 1000)
            arts[name] = store.put_file(f)[0]
        other = str(PROTOCOL_VERSION + 1)
        m = store.commit(arts, meta={"vm": json.dumps(cfg.to_json()), "agent_protocol": other})
    with pytest.raises(GuestError, match=f"agent protocol '{other}'"):
        restore(mgr, m.id, name="never")
    assert mgr.list() == []


def test_a_stored_base_disk_is_removed_only_with_force(tmp_path: Path, monkeypatch) -> None:
    from torpor.errors import ConflictError
    from torpor.snapshot import base as bases
    from torpor.snapshot.core import remove_snapshot

    monkeypatch.delenv("TORPOR_STORE", raising=False)
    home = Paths(tmp_path / "home").ensure()
    mgr = VMManager(home)
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"ext4" * 4096)
    with ChunkStore(home.store) as store:
        art = store.put_file(disk)[0]
        digest = bases.artifact_digest(art)
        m = store.commit(
            {"disk": art}, kind=bases.KIND_IMAGE_BASE, meta={"digest": digest, "image_id": ""}
        )
    with pytest.raises(ConflictError, match="stored base disk"):
        remove_snapshot(mgr, m.id)
    assert remove_snapshot(mgr, m.id, force=True) == m.id

"""kill -9 of ``torpor restore`` inside the restore's record writes (real VMs).

The restore writes ``vm.json`` once (with the snapshot's image ref and base digest)
and its ``snapshot.ref`` / ``state.json`` / ``restore.json`` with fewer fsyncs
(torpor/vmm/state.py).  Whatever point it dies at, a listed VM is a complete record
(its config names the snapshot's base), reads as ``created`` and can be removed; killed
once its files are placed, it starts as the snapshot.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import torpor_cli
from torpor.snapshot import snapshot
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


def _ps_one(name: str) -> dict | None:
    r = torpor_cli("ps", "-a", "--format", "json")
    assert r.returncode == 0, r.stderr
    return next((v for v in json.loads(r.stdout) if v["Name"] == name), None)


def test_kill9_restore_after_create_and_after_place(vms, tools_image, paths) -> None:
    mgr = VMManager(paths)
    src = vms.run(tools_image, "sleep", "1000", name="rc-src", memory_mib=256)
    snap = snapshot(mgr, src.id).manifest
    base_digest = json.loads(snap.meta["vm"])["base_digest"]
    assert base_digest
    for phase in ("restore-created", "restore-placed"):
        name = f"rc-{phase}"
        r = torpor_cli(
            "restore",
            snap.id,
            "--name",
            name,
            env={"TORPOR_TEST_CRASH": phase, "TORPOR_POOL": "0"},
        )
        assert r.returncode == -9, (phase, r.stderr[-2000:])
        try:
            v = _ps_one(name)
            assert v is not None, phase  # vm.json is written before the restore's files
            assert v["State"]["status"] == "created", (phase, v["State"])
            vm = mgr.get(name)
            # the one vm.json write already names the snapshot's base (a listed record
            # is complete: no second write left to do)
            assert vm.config.base_digest == base_digest, phase
            assert vm.config.image_ref == src.config.image_ref, phase
            if phase == "restore-placed":
                # its files are all there: it starts as the snapshot
                started = mgr.start(name)
                vms.ids.append(started.id)
                with mgr.client(started) as c:
                    assert c.exec(["true"]).code == 0
        finally:
            assert torpor_cli("rm", "-f", name).returncode == 0
        assert _ps_one(name) is None
        assert not any(
            d.name != "names" and not (d / "vm.json").exists()
            for d in (paths.root / "vms").iterdir()
        ), "no half-made VM folder left"
    assert os.path.exists(paths.vm(src.id) / "vm.json")

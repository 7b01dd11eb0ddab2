"""Minimal operation sequences the property tests found, kept as plain regression tests.

Each test is the shrunk sequence hypothesis printed, written out step by step with
the same model checks (tests/property/model.py), and names the run and the defect.
"""

from __future__ import annotations

import pytest

from tests.conftest import torpor_cli
from tests.property.model import VMModel, check_all, read_gens, write_gen
from torpor.vmm.manager import RunRequest

pytestmark = pytest.mark.vm


def test_hibernate_start_stop_start_keeps_disk_writes(vms, tools_image: str) -> None:
    """Issue 9 defect 2 (stale ``hibernate`` marker) as a lifecycle-machine sequence:
    run, write, snapshot --stop, start, write, stop, start.  Checked against the tree
    just before the fix (1fd0e6b~1): fails at the stop ("ps says hibernated, model
    says stopped"; the next start restored the old snapshot, losing the write made
    after the wake); passes from 1fd0e6b on."""
    mgr = vms.mgr
    name = "found-hib-wake-stop"
    vm = mgr.run(
        RunRequest(image=tools_image, command=("sleep", "infinity"), name=name, memory_mib=256)
    )
    vms.ids.append(vm.id)
    model = {name: VMModel(name)}
    seen: dict = {}
    write_gen(mgr, name, 1)
    model[name].disk = model[name].mem = 1
    r = torpor_cli("snapshot", name, "--stop")
    assert r.returncode == 0, r.stderr.decode()
    model[name].state = "hibernated"
    check_all(mgr, model, seen, set())
    mgr.start(name)
    model[name].state = "running"
    check_all(mgr, model, seen, set())
    write_gen(mgr, name, 2)
    model[name].disk = model[name].mem = 2
    mgr.stop(name)
    model[name].state = "stopped"
    check_all(mgr, model, seen, set())
    mgr.start(name)
    model[name].state, model[name].mem = "running", None  # a cold boot
    assert read_gens(mgr, name) == (2, None)
    check_all(mgr, model, seen, set())

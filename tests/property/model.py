"""The model the lifecycle property test checks torpor against, and its probes.

Per VM the model knows its state (running / stopped / hibernated; a removed VM is
dropped from the model but its processes and RAM file are remembered), the
generation last written to a file on its disk (``/root/gen``) and the one written
to a file in its memory (``/dev/shm/gen``, a tmpfs in guest RAM: it survives
snapshot, hibernate and restore, but not stop + start, which reboots the guest).
Per snapshot it knows which two generations a restore must bring back and its
parent (a snapshot that is some other snapshot's parent cannot be removed without
force).

The probes read the real system only through torpor's public surfaces (the
library's VMManager and ChunkStore, the agent protocol) and the host's /proc.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings

from torpor.store import ChunkStore
from torpor.vmm.manager import VMManager
from torpor.vmm.state import Status, alive

DISK_FILE = "/root/gen"
MEM_FILE = "/dev/shm/gen"
NONE = "none"  # what the probe prints for a file that is not there

# Hypothesis profiles (``TORPOR_PROPERTY_PROFILE``): ``ci`` (default: 5 examples of up
# to 8 steps, a few minutes of TCG VMs) and ``long`` for runs by hand, e.g.
# ``TORPOR_PROPERTY_PROFILE=long .venv/bin/python -m pytest tests/property -x`` (60
# examples of up to 25 steps; ``TORPOR_PROPERTY_EXAMPLES=N`` overrides the count).
_PROFILES = {
    "ci": {"max_examples": 5, "stateful_step_count": 8},
    "long": {"max_examples": 60, "stateful_step_count": 25},
}
_profile = dict(_PROFILES[os.environ.get("TORPOR_PROPERTY_PROFILE", "ci")])
if os.environ.get("TORPOR_PROPERTY_EXAMPLES"):
    _profile["max_examples"] = int(os.environ["TORPOR_PROPERTY_EXAMPLES"])
# the whole state-machine run is one pytest test: its timeout (0 = none for long runs)
TIMEOUT = 1800 if os.environ.get("TORPOR_PROPERTY_PROFILE", "ci") == "ci" else 0
SETTINGS = settings(
    deadline=None,
    database=None,  # no .hypothesis folder in the tree; failures print their sequence
    suppress_health_check=list(HealthCheck),
    **_profile,
)


# model state -> the status `ps` must show
STATUS = {"running": Status.RUNNING, "stopped": Status.EXITED, "hibernated": Status.HIBERNATED}


@dataclass
class VMModel:
    name: str
    state: str = "running"
    disk: int | None = None  # generation in DISK_FILE (None: no file)
    mem: int | None = None  # generation in MEM_FILE
    last_snap: str | None = None  # the parent of its next snapshot


@dataclass(frozen=True)
class SnapModel:
    id: str
    disk: int | None
    mem: int | None
    parent: str | None


@dataclass
class Seen:
    """Host resources once seen for a VM: after rm (or stop) none may outlive it."""

    procs: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time)
    ram: set[Path] = field(default_factory=set)


def write_gen(mgr: VMManager, name: str, gen: int) -> None:
    with mgr.client(name) as c:
        r = c.exec(["sh", "-c", f"echo {gen} > {DISK_FILE} && echo {gen} > {MEM_FILE}"])
        assert r.code == 0, r.stderr


def read_gens(mgr: VMManager, name: str) -> tuple[int | None, int | None]:
    with mgr.client(name) as c:
        script = (
            f"cat {DISK_FILE} 2>/dev/null || echo {NONE}; cat {MEM_FILE} 2>/dev/null || echo {NONE}"
        )
        r = c.exec(["sh", "-c", script])
    lines = r.stdout.decode().split()
    assert len(lines) == 2, r.stdout
    return tuple(None if x == NONE else int(x) for x in lines)  # type: ignore[return-value]


def remember(mgr: VMManager, name: str, seen: dict[str, Seen]) -> None:
    """Note the processes and RAM file of a running VM."""
    vm = mgr.get(name)
    s = seen.setdefault(vm.id, Seen())
    st = vm.state
    for pid, start in ((st.shim_pid, st.shim_start), (st.qemu_pid, st.qemu_start)):
        if pid and start:
            s.procs.add((pid, start))
    s.ram.add(vm.files.ram)


def leftovers(seen: Seen, wait: float = 15.0) -> list[str]:
    """Processes and RAM files of an ended VM still there after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = [f"pid {p}" for p, s in seen.procs if alive(p, s)]
        left += [str(p) for p in seen.ram if p.exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def check_all(
    mgr: VMManager, vms: dict[str, VMModel], seen: dict[str, Seen], removed: set[str]
) -> None:
    """Every invariant: ps matches the model, live files match, store verifies, no leftovers."""
    listed = {vm.name: vm for vm in mgr.list()}
    mine = {n: v for n, v in listed.items() if n in vms or v.id in removed}
    assert set(mine) == set(vms), f"ps shows {sorted(mine)}, model has {sorted(vms)}"
    for name, m in vms.items():
        got = mine[name].state.status
        assert got == STATUS[m.state], f"{name}: ps says {got}, model says {m.state}"
        if m.state == "running":
            remember(mgr, name, seen)
            assert read_gens(mgr, name) == (m.disk, m.mem), f"{name}: files differ from the model"
    report = ChunkStore(mgr.paths.store).verify()
    assert report.ok, f"store verify: {report}"
    ids = {v.id: n for n, v in listed.items()}
    for vm_id, s in seen.items():
        name = ids.get(vm_id)
        if vm_id in removed or (name in vms and vms[name].state != "running"):
            left = leftovers(s)
            assert not left, f"VM {name or vm_id[:12]} ended but left {left}"

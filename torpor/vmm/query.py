"""Questions about VMs that the CLI asks: ``ps --filter``, ``stats``, ``system df``.

Library code, so the CLI stays a thin face.  Filters follow ``docker ps --filter``:
``label=k``, ``label=k=v``, ``status=running|exited|…``, ``name=substring``,
``id=prefix``; the same key given twice matches either value, different keys must
all match.  Stats are read from ``/proc`` of each VM's QEMU — checked alive by pid
*and* start time (torpor.vmm.state.alive), so a recycled pid is never reported.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torpor.errors import UsageError
from torpor.vmm.state import Status, alive

FILTER_KEYS = ("label", "status", "name", "id")


def parse_filters(items: Iterable[str]) -> dict[str, list[str]]:
    """``["label=a=b", "status=running"]`` to ``{"label": ["a=b"], "status": ["running"]}``."""
    out: dict[str, list[str]] = {}
    statuses = {s.value for s in Status}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise UsageError(
                f"invalid filter {item!r} (use {', '.join(k + '=…' for k in FILTER_KEYS)})"
            )
        if key == "status" and value not in statuses:
            raise UsageError(f"invalid status {value!r} (one of {', '.join(sorted(statuses))})")
        out.setdefault(key, []).append(value)
    return out


def _match_one(vm: Any, key: str, value: str) -> bool:
    if key == "label":
        k, sep, v = value.partition("=")
        return k in vm.config.labels and (not sep or vm.config.labels[k] == v)
    if key == "status":
        return vm.state.status.value == value
    if key == "name":
        return value in vm.name
    return vm.id.startswith(value)  # id


def matches(vm: Any, filters: dict[str, list[str]]) -> bool:
    # labels must all match (docker); other keys match any of their values
    for key, values in filters.items():
        if key == "label":
            if not all(_match_one(vm, key, v) for v in values):
                return False
        elif not any(_match_one(vm, key, v) for v in values):
            return False
    return True


@dataclass(frozen=True)
class ProcStats:
    """CPU and memory of one VM's QEMU process."""

    cpu_percent: float  # of one core, over the sampling interval
    rss_bytes: int
    memory_limit_bytes: int  # guest RAM (what the VM was given)
    pids: int


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        # comm may hold spaces and ')': fields start after the last ')'
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_and_threads(pid: int) -> tuple[int, int]:
    rss = threads = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def stats(vms: Iterable[Any], interval: float = 0.5) -> dict[str, ProcStats | None]:
    """``{vm_id: ProcStats}`` for each VM (None when its QEMU is not running)."""
    vms = list(vms)
    hz = os.sysconf("SC_CLK_TCK")
    first: dict[str, int] = {}
    for vm in vms:
        st = vm.state
        if alive(st.qemu_pid, st.qemu_start):
            with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
                first[vm.id] = _cpu_ticks(st.qemu_pid)
    t0 = time.monotonic()
    if first:
        time.sleep(interval)
    dt = max(time.monotonic() - t0, 1e-6)
    out: dict[str, ProcStats | None] = {}
    for vm in vms:
        st = vm.state
        out[vm.id] = None
        if vm.id not in first or not alive(st.qemu_pid, st.qemu_start):
            continue
        try:
            ticks = _cpu_ticks(st.qemu_pid)
            rss, threads = _rss_and_threads(st.qemu_pid)
        except (OSError, ValueError, IndexError):  # it exited between the reads
            continue
        out[vm.id] = ProcStats(
            cpu_percent=100.0 * (ticks - first[vm.id]) / hz / dt,
            rss_bytes=rss,
            memory_limit_bytes=vm.config.memory_mib * 1024 * 1024,
            pids=threads,
        )
    return out


def du(path: Path) -> int:
    """Bytes allocated under ``path`` (sparse files count what they use), no symlinks followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total

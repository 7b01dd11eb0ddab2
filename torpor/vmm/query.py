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
from collections.abc import Iterable, Iterator
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


# -- logs --tail / --since ------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a Unix time, an RFC 3339 time (``2026-12-05T01:00:00Z``) or a
    duration back from now (``10s``, ``5m``, ``2h``, ``1d``) to a Unix time."""
    import re
    from datetime import UTC, datetime

    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text.strip())
    if m:
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"invalid --since {text!r} (examples: 10m, 2h, 1733360000, 2026-12-05T01:00:00Z)"
        ) from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def tail_lines(
    records: Iterable[tuple[float, str, bytes]], n: int | None, since: float | None = None
) -> Iterator[tuple[float, str, bytes]]:
    """Log records cut to lines, those at or after ``since``, only the last ``n`` lines
    (memory: ``n`` lines, never the whole log)."""
    from collections import deque

    def lines() -> Iterator[tuple[float, str, bytes]]:
        partial: dict[str, bytes] = {}
        for t, stream, data in records:
            if since is not None and t < since:
                continue
            data = partial.pop(stream, b"") + data
            *full, rest = data.split(b"\n")
            for line in full:
                yield t, stream, line + b"\n"
            if rest:
                partial[stream] = rest
                if len(rest) > 1 << 20:  # a line with no end: emit it rather than grow
                    yield t, stream, partial.pop(stream)
        for stream, rest in partial.items():
            yield time.time(), stream, rest

    if n is None:
        yield from lines()
    elif n > 0:
        yield from deque(lines(), maxlen=n)


# -- system df / prune --------------------------------------------------------------


@dataclass(frozen=True)
class DiskUse:
    kind: str  # Images | VMs | Snapshots | Caches
    total: int
    active: int
    size: int
    reclaimable: int


def _prunable(vm: Any) -> bool:
    """A stopped VM ``system prune`` may remove: never a running or hibernated one (a
    hibernated VM is a sleeping sandbox or session), nor one a session owns (its
    ``torpor.session`` label: the session may still recover it).  A stopped sandbox's
    own labels (``torpor.sandbox.timeout``...) do not protect it."""
    return (
        not vm.state.status.active
        and vm.state.status != Status.HIBERNATED
        and not any(k.startswith("torpor.session") for k in vm.config.labels)
    )


def disk_usage(mgr: Any) -> list[DiskUse]:
    """``docker system df``: what each kind of state holds under TORPOR_HOME."""
    paths = mgr.paths
    vms = mgr.list(all=True)
    images = mgr.images.list()
    used_images = {vm.config.image_id for vm in vms}
    vm_size = {vm.id: du(vm.dir) for vm in vms}
    image_size = du(paths.images) + du(paths.blobs)
    unused = sum(im.size for im in images if im.id not in used_images)
    snapshots = 0
    with contextlib.suppress(OSError):
        snapshots = sum(1 for _ in (paths.store / "snapshots").iterdir())
    return [
        DiskUse(
            "Images",
            len(images),
            len(used_images & {i.id for i in images}),
            image_size,
            min(unused, image_size),
        ),
        DiskUse(
            "VMs",
            len(vms),
            sum(1 for vm in vms if vm.state.status.active),
            sum(vm_size.values()),
            sum(vm_size[vm.id] for vm in vms if _prunable(vm)),
        ),
        DiskUse("Snapshots", snapshots, snapshots, du(paths.store), 0),
        DiskUse("Caches", 0, 0, du(paths.snapshot_cache) + du(paths.cache), 0),
    ]


@dataclass(frozen=True)
class PruneReport:
    vms_removed: list[str]
    bytes_freed: int
    chunks_deleted: int


def prune(mgr: Any, grace_seconds: float) -> PruneReport:
    """``docker system prune``: remove stopped VMs (see :func:`_prunable`), then the
    chunks no snapshot references any more (the store's own gc, with its grace)."""
    from torpor.errors import TorporError
    from torpor.snapshot.core import gc

    removed: list[str] = []
    freed = 0
    for vm in mgr.list(all=True):
        if not _prunable(vm):
            continue
        size = du(vm.dir)
        try:
            mgr.remove(vm.id)
        except TorporError:  # it started meanwhile: remove() refused, keep it
            continue
        removed.append(vm.id)
        freed += size
    r = gc(mgr, grace_seconds)
    return PruneReport(removed, freed + r.bytes_freed, r.chunks_deleted)


def log_records(
    mgr: Any, ref: str, *, follow: bool, tail: int | None, since: float | None
) -> Iterator[tuple[float, str, bytes]]:
    """``logs --tail N --since T [--follow]``: the selected lines of what is kept now,
    then (with ``follow``) every record written after them."""
    if tail is None and since is None:
        yield from mgr.logs(ref, follow=follow)
        return
    seen = 0

    def counted() -> Iterator[tuple[float, str, bytes]]:
        nonlocal seen
        for rec in mgr.logs(ref, follow=False):
            seen += 1
            yield rec

    yield from tail_lines(counted(), tail, since)
    if follow:  # the follower starts from the oldest kept record: skip those shown above
        for i, rec in enumerate(mgr.logs(ref, follow=True)):
            if i >= seen:
                yield rec


def parse_signal(text: str) -> int:
    """``KILL``, ``SIGTERM``, ``15`` to a signal number (1..64), else UsageError."""
    import signal

    t = text.strip().upper()
    if t.isdigit():
        n = int(t)
    else:
        name = t if t.startswith("SIG") else "SIG" + t
        n = getattr(signal.Signals, name, None) or 0
        n = int(n) if isinstance(n, signal.Signals) else 0
    if not 1 <= n <= 64:
        raise UsageError(f"invalid signal {text!r} (examples: KILL, TERM, HUP, 15)")
    return n

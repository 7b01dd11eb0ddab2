"""``torpor bench fork``: N forks of one snapshot, RAM copied per fork vs one shared base.

A source VM (default 256 MiB guest) writes ``--live`` MB of random data into a guest
tmpfs (its only copy is guest RAM) and is snapshotted while running.  Then, in one
run and side by side, each mode forks it ``--count`` times (default 16) with
:func:`torpor.snapshot.fork` and the forks are removed again:

- ``copy``: ``TORPOR_RAM_BASE=0`` — each fork's shim copies the snapshot's RAM into
  the fork's own RAM file (``share=on``), as torpor did before issue 13 §3;
- ``shared (fill)``: ``TORPOR_RAM_BASE=1`` with no base yet — the first fork fills
  and checks the sealed base (:mod:`torpor.vmm.basemem`), all forks map it
  ``share=off``;
- ``shared (held)``: the same with the base already held (a second batch);
- ``held, identity exec``: the same, each fork's identity set through a guest shell
  (``fork(identity_by_exec=True)``) as for snapshots of agents before SET_IDENTITY.

Wall time: from the ``fork`` call to its return (every fork restored, its agent
answered, and its identity set: by the agent's SET_IDENTITY, no guest process; the
exec row runs a shell, and a first exec after a restore is slow under TCG); and, as a
second batch of the same mode, the same N restores alone on ``parallel`` threads
(every agent answered HELLO).

Where a fork's time goes (per fork, p50 over the forks): the shim's own log lines
(QEMU spawn → guest running = QEMU start + incoming device state; → agent HELLO), the
CPU time QEMU and the shim have used once the fork is ready (``/proc/<pid>/stat``),
and the CPU the whole machine was busy during ``fork`` (on 2 cores the wall is at
least that / 2; the rest of it is other work on the box).

Added host memory, measured once the forks are up and again after a settle time
(a copy-mode fork copies RAM a second time into its shadow in the background): Σ over
forks of QEMU's anonymous
PSS (its heap, TCG buffers, the guest pages it wrote copy-on-write) + the shim's PSS
+ the allocated size of the fork's own tmpfs files (RAM file, shadow), plus each
sealed base once (its allocated size: the holder's memfd is fully allocated).  PSS
alone would hide the files' pages not mapped by anyone; RSS would count the shared
base in every fork.  Every fork's copy of the live data is checked (md5) after the
timing.  Numbers are noisy on a shared 2-core TCG host: compare rows of one run.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torpor.bench.cli import _loadavg
from torpor.bench.stats import busy_cpu_s, machine, print_wide, proc_cpu_ms, set_env
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.vmm.pool import smaps_rollup

TARGETS = {"wall_s": 1.5, "added_memory_bytes": 1 << 30}


def _alloc(p: Any) -> int:
    try:
        return int(os.stat(p).st_blocks) * 512
    except OSError:
        return 0


def _memory(mgr: Any, vms: list[Any], paths: Paths, snap_id: str) -> dict[str, int]:
    from torpor.vmm import basemem

    qemu = shim = files = 0
    for v in vms:
        st = mgr.get(v.id).state
        qemu += smaps_rollup(st.qemu_pid).get("Pss_Anon", 0) if st.qemu_pid else 0
        shim += smaps_rollup(st.shim_pid).get("Pss", 0) if st.shim_pid else 0
        files += _alloc(v.files.ram) + _alloc(v.files.shadow)
    # this snapshot's base only (other bases of the home are not these forks' memory)
    bases = sum(int(h.get("size", 0)) for h in basemem.holders(paths) if h["snapshot"] == snap_id)
    return {
        "qemu_anon": qemu,
        "shims": shim,
        "files": files,
        "bases": bases,
        "total": qemu + shim + files + bases,
    }


_SHIM_TIMES = {
    "qemu_to_running_ms": re.compile(r"QEMU spawn to running guest (\d+) ms"),
    "qemu_to_hello_ms": re.compile(r"HELLO (\d+) ms after QEMU spawn"),
}


def _phases(mgr: Any, vms: list[Any]) -> dict[str, float]:
    """p50 over the forks of the shim's logged timings and of QEMU's and the shim's CPU."""
    got: dict[str, list[float]] = {k: [] for k in (*_SHIM_TIMES, "qemu_cpu_ms", "shim_cpu_ms")}
    for v in vms:
        st = mgr.get(v.id).state
        got["qemu_cpu_ms"].append(proc_cpu_ms(st.qemu_pid) or 0.0)
        got["shim_cpu_ms"].append(proc_cpu_ms(st.shim_pid) or 0.0)
        try:
            text = v.files.shim_log.read_text(errors="replace")
        except OSError:
            continue
        for key, pat in _SHIM_TIMES.items():
            if m := pat.search(text):
                got[key].append(float(m.group(1)))
    return {k: statistics.median(xs) for k, xs in got.items() if xs}


def _md5s(mgr: Any, vms: list[Any]) -> list[str]:
    out = []
    for v in vms:
        with mgr.client(v) as c:
            out.append(c.exec(["md5sum", "/m/live"]).stdout.split()[:1][0].decode())
    return out


def run_fork_bench(
    paths: Paths,
    image: str,
    count: int = 16,
    memory_mib: int = 256,
    live_mb: int = 50,
    parallel: int = 4,
    settle: float = 5.0,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.snapshot import fork, restore, snapshot
    from torpor.vmm import basemem
    from torpor.vmm.manager import RunRequest, VMManager

    mgr = VMManager(paths)
    src = mgr.run(
        RunRequest(
            image=image,
            command=("sleep", "infinity"),
            memory_mib=memory_mib,
            network=False,
            name=f"bench-fork-{os.getpid()}",
        )
    )
    rows: list[dict[str, Any]] = []
    saved = {k: os.environ.get(k) for k in ("TORPOR_RAM_BASE",)}
    try:
        with mgr.client(src) as c:
            r = c.exec(
                [
                    "sh", "-c",
                    f"mkdir -p /m && mount -t tmpfs -o size={live_mb + 8}m m /m && "
                    f"dd if=/dev/urandom of=/m/live bs=1M count={live_mb} 2>/dev/null && "
                    "md5sum /m/live",
                ],
                timeout=300,
            )  # fmt: skip
            if r.status.code != 0:
                raise RuntimeError(f"writing live data failed: {r.stderr[-300:]!r}")
            want = r.stdout.split()[0].decode()
        snap = snapshot(mgr, src.id).manifest
        basemem.retire(paths, snap.id)
        for label, env in (
            ("copy", "0"),
            ("shared (fill)", "1"),
            ("shared (held)", "1"),
            ("held, identity exec", "1"),
        ):
            os.environ["TORPOR_RAM_BASE"] = env
            progress(f"{label}: {count} forks")
            held = None
            if label.startswith(("shared (held)", "held")):
                held = basemem.acquire(paths, _store(paths), snap)
            t = time.perf_counter()
            busy = busy_cpu_s()
            vms = fork(mgr, snap.id, count, name_prefix=f"bf{os.getpid()}-{len(rows)}",
                       parallel=parallel, identity_by_exec="exec" in label)  # fmt: skip
            wall = time.perf_counter() - t
            busy = busy_cpu_s() - busy
            try:
                phases = _phases(mgr, vms)
                at_ready = _memory(mgr, vms, paths, snap.id)
                time.sleep(settle)
                settled = _memory(mgr, vms, paths, snap.id)
                md5 = _md5s(mgr, vms)
            finally:
                for v in vms:
                    with contextlib.suppress(TorporError):
                        mgr.remove(v.id, force=True)
            # the same restores without fork's identity step; like fork, they ask for no
            # pool spares (one prepared behind them would run during the next row)
            t = time.perf_counter()
            with ThreadPoolExecutor(parallel) as ex:
                futs = [ex.submit(restore, mgr, snap.id, keep_pool=False) for _ in range(count)]
                only = []
                for f in futs:
                    with contextlib.suppress(TorporError):
                        only.append(f.result())
            restore_wall = time.perf_counter() - t
            for v in only:
                with contextlib.suppress(TorporError):
                    mgr.remove(v.id, force=True)
            if held is not None:
                held.close()
            rows.append(
                {
                    "mode": label,
                    "wall_s": wall,
                    "restore_only_wall_s": restore_wall,
                    "restore_only_ok": len(only),
                    "memory_at_ready": at_ready,
                    "memory_settled": settled,
                    "md5_ok": sum(m == want for m in md5),
                    "phases_p50": phases,
                    "busy_cpu_s": busy,
                    "identity": "exec" if "exec" in label else "agent",
                    "load_avg": _loadavg(),
                }
            )
            progress(
                f"{label}: {wall:.2f} s, {settled['total'] / 2**20:.0f} MiB added, "
                f"md5 ok {rows[-1]['md5_ok']}/{count}"
            )
            if label.startswith("held"):
                basemem.retire(paths, snap.id)
    finally:
        set_env(saved)
        with contextlib.suppress(TorporError):
            mgr.remove(src.id, force=True)
    return {
        "benchmark": "fork",
        "accel": src.state.accel,
        "machine": machine(),
        "load_avg": _loadavg(),
        "image": image,
        "guest_mib": memory_mib,
        "live_mb": live_mb,
        "count": count,
        "parallel": parallel,
        "settle_s": settle,
        "memory_measure": "sum of QEMU Pss_Anon + shim Pss + the forks' tmpfs files "
        "(RAM file, shadow) allocated + each sealed base once",
        "rows": rows,
        "targets": dict(TARGETS),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _store(paths: Paths) -> Any:
    from torpor.store.home import home_store

    return home_store(paths)


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    load = " ".join(f"{x:.1f}" for x in r.get("load_avg", []))
    t = Table(
        title=f"torpor bench fork — {r['count']} forks of a {r['guest_mib']} MiB guest with "
        f"{r['live_mb']} MB live data, accelerator {r['accel']}, load {load}",
        header_style="bold",
    )
    for col in (
        "mode", "fork: wall", "restores: wall", "busy CPU", "QEMU→run / →HELLO",
        "CPU QEMU / shim", "added memory (settled)", "of which QEMU anon",
        "files (RAM, shadows)", "bases", "at ready", "md5 ok",
    ):  # fmt: skip
        t.add_column(col, justify="left" if col == "mode" else "right")
    mib = 2**20
    for row in r["rows"]:
        m, a = row["memory_settled"], row["memory_at_ready"]
        ph = row.get("phases_p50", {})
        t.add_row(
            row["mode"],
            f"{row['wall_s']:.2f} s",
            f"{row.get('restore_only_wall_s', 0):.2f} s",
            f"{row.get('busy_cpu_s', 0):.1f} s",
            f"{ph.get('qemu_to_running_ms', 0):.0f} / {ph.get('qemu_to_hello_ms', 0):.0f} ms",
            f"{ph.get('qemu_cpu_ms', 0):.0f} / {ph.get('shim_cpu_ms', 0):.0f} ms",
            f"{m['total'] / mib:.0f} MiB",
            f"{m['qemu_anon'] / mib:.0f} MiB",
            f"{m['files'] / mib:.0f} MiB",
            f"{m['bases'] / mib:.0f} MiB",
            f"{a['total'] / mib:.0f} MiB",
            f"{row['md5_ok']}/{r['count']}",
        )
    w = f"≤ {r['targets']['wall_s']} s"
    t.add_row("target", w, w, "", "", "", "≤ 1024 MiB", "", "", "", "", "")
    print_wide(console, t)


def main_command() -> Any:
    from pathlib import Path

    import click

    from torpor.cli.main import CONTEXT, _json_out

    @click.command(name="fork", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--count", "-n", default=16, show_default=True, help="Forks per mode.")
    @click.option("--memory", "memory_mib", default=256, show_default=True, help="Guest MiB.")
    @click.option("--live", "live_mb", default=50, show_default=True, help="MB of guest data.")
    @click.option("--parallel", default=4, show_default=True, help="Restores at once.")
    @click.option("--settle", default=5.0, show_default=True, help="Seconds before memory.")
    @_json_out("fork")
    def fork_cmd(
        image: str, count: int, memory_mib: int, live_mb: int, parallel: int, settle: float,
        json_out: Path,
    ) -> None:  # fmt: skip
        """N forks of one snapshot: RAM copied per fork vs one shared sealed base."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import UsageError

        try:
            if count < 1 or parallel < 1 or live_mb < 1 or live_mb > memory_mib // 2:
                raise UsageError("--count, --parallel >= 1; --live between 1 and half the guest")
            result = run_fork_bench(
                Paths.default().ensure(), image, count=count, memory_mib=memory_mib,
                live_mb=live_mb, parallel=parallel, settle=settle,
                progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return fork_cmd


fork_cmd = main_command()

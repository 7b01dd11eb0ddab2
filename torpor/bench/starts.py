"""``torpor bench starts``: VM starts per minute per core, from one snapshot.

``N`` workers (threads of this process, each driving its own VMs through the
library) loop for ``duration`` seconds: restore the snapshot → ``exec true`` answers
→ remove the VM (QEMU killed, folder gone).  A *start* counts when its VM answered
the exec (``--probe request``: a run where the agent answers a request that starts no
guest process — a ``stat`` — instead, which is the issue's "agent answers" read
literally; the exec costs QEMU ~95 ms of TCG translation per fresh VM); the rate is
completed cycles over the measured time, per minute and per core
(``os.cpu_count()``), next to the cycle time's p50/p95 (issue 13 §4: target ≥ 300
starts per minute per core, Firecracker's design figure).

CPU per start: the machine's busy CPU time over the run (``/proc/stat``: every
process, other load included — compare rows of one run) divided by the starts, and
per VM the CPU time its QEMU and its shim had used when the exec answered (their
``/proc/<pid>/stat``, read right before the remove; QEMU's exit and the removal are
in the machine figure only).  300 starts per minute per core = 200 ms of CPU per start.

Host memory per running fork is sampled once a second over the VMs alive at that
moment: QEMU's anonymous PSS (its heap, TCG buffers and the guest pages it wrote
copy-on-write) + QEMU's shared-memory PSS or the allocated size of its own RAM file,
whichever is larger (a RAM file copied per VM is memory even where the guest did not
touch it yet) + the shim's PSS.  A base shared by all forks is counted once, apart
(``shared_bytes``: sealed bases and pooled files this home holds).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.cli import _loadavg
from torpor.bench.stats import (
    busy_cpu_s,
    machine,
    print_wide,
    proc_cpu_ms,
    set_env,
    summary,
)
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.vmm.pool import vm_memory as fork_memory


def _measure(
    mgr: Any,
    snap: str,
    workers: int,
    duration: float,
    progress: Callable[[str], None],
    probe: str = "exec",
) -> dict[str, Any]:
    """One sustained run of ``workers`` loops (restore → exec or request → remove)."""
    from torpor.snapshot import restore
    from torpor.vmm import pool

    cycles: list[float] = []
    errors: list[str] = []
    running: dict[str, Any] = {}
    lock = threading.Lock()
    stop = threading.Event()
    mem_samples: list[float] = []
    spare_samples: list[float] = []
    qemu_cpu: list[float] = []
    shim_cpu: list[float] = []

    def worker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            vm = None
            try:
                vm = restore(mgr, snap)
                with lock:
                    running[vm.id] = vm
                with mgr.client(vm) as c:
                    if probe == "request":
                        c.stat("/")  # answered by the agent itself: no guest process
                    elif c.exec(["true"]).status.code != 0:
                        raise RuntimeError("exec true failed")
                q, sh = proc_cpu_ms(vm.state.qemu_pid), proc_cpu_ms(vm.state.shim_pid)
                with lock:
                    if q is not None and sh is not None:
                        qemu_cpu.append(q)
                        shim_cpu.append(sh)
            except (TorporError, RuntimeError, OSError) as e:
                errors.append(str(e)[:300])
                if len(errors) > 20:
                    stop.set()
            else:
                with lock:
                    if not stop.is_set():
                        cycles.append((time.perf_counter() - t) * 1000)
            finally:
                if vm is not None:
                    with lock:
                        running.pop(vm.id, None)
                    with contextlib.suppress(TorporError):
                        mgr.remove(vm.id, force=True)

    # one warm-up cycle: the zygote and the pool start, bytecode, caches
    with contextlib.suppress(TorporError):
        mgr.remove(restore(mgr, snap).id, force=True)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    t0 = time.perf_counter()
    busy0 = busy_cpu_s()
    for th in threads:
        th.start()
    next_report = t0 + 10
    try:
        while time.perf_counter() - t0 < duration and not stop.is_set():
            time.sleep(1.0)
            with lock:
                vms = list(running.values())
            for vm in vms:
                st = vm.state
                if st.qemu_pid and st.shim_pid:
                    m = fork_memory(st.qemu_pid, st.shim_pid, vm.files.ram)
                    if m:
                        mem_samples.append(m)
            spare_samples.append(sum(x.get("memory", 0) for x in pool.spares(mgr.paths)))
            if time.perf_counter() >= next_report:
                next_report += 10
                el = time.perf_counter() - t0
                progress(f"{el:.0f} s: {len(cycles)} starts ({len(cycles) / el * 60:.0f}/min)")
        with lock:
            stop.set()
            elapsed = time.perf_counter() - t0
            done = len(cycles)
            busy = busy_cpu_s() - busy0
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=120)
    cores = os.cpu_count() or 1
    per_min = done / elapsed * 60 if elapsed else 0.0
    return {
        "duration_s": round(elapsed, 1),
        "load_avg": _loadavg(),
        "starts": done,
        "starts_per_min": per_min,
        "starts_per_min_per_core": per_min / cores,
        "cycle_ms": summary(cycles),
        "machine_cpu_ms_per_start": busy * 1000 / done if done else 0.0,
        "qemu_cpu_ms": summary(qemu_cpu),
        "shim_cpu_ms": summary(shim_cpu),
        "fork_memory_bytes": summary(mem_samples),
        "spares_memory_bytes": summary(spare_samples),
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def run_starts_bench(
    paths: Paths,
    image: str,
    workers: int = 2,
    duration: float = 60.0,
    memory_mib: int = 256,
    pool_size: int = 0,
    warm: bool = False,
    progress: Callable[[str], None] = lambda m: None,
    probe: str = "exec",
) -> dict[str, Any]:
    """Without the pool, then (``pool_size`` > 0) with it, then (``warm``) with spares
    warmed by one exec (``TORPOR_POOL_WARM=exec``): side by side in one run.  Each
    with ``probe`` ``exec`` or ``request``; ``both``: every run with the exec, then the
    same runs with the request."""
    from torpor.snapshot import snapshot
    from torpor.vmm import pool
    from torpor.vmm.manager import RunRequest, VMManager

    mgr = VMManager(paths)
    src = mgr.run(
        RunRequest(
            image=image,
            command=("sleep", "infinity"),
            memory_mib=memory_mib,
            network=False,
            name=f"bench-starts-{os.getpid()}",
        )
    )
    accel = src.state.accel
    saved = os.environ.get("TORPOR_POOL")
    modes: dict[str, dict[str, Any]] = {}
    try:
        snap = snapshot(mgr, src.id).manifest.id
        runs = [(0, "")]
        if pool_size:
            runs += [(pool_size, "")] + ([(pool_size, "exec")] if warm else [])
        probes = ["exec", "request"] if probe == "both" else [probe]
        for how, (size, warm_how) in [(p, r) for p in probes for r in runs]:
            name = f"pool {size}" if size else "no pool"
            name += ", exec warm-up" if warm_how else ""
            name += ", agent request" if how == "request" else ""
            os.environ["TORPOR_POOL"] = str(size)
            os.environ["TORPOR_POOL_WARM"] = warm_how
            progress(f"{name}: {workers} workers for {duration:.0f} s")
            modes[name] = _measure(mgr, snap, workers, duration, progress, how)
            pool.drain(paths)
    finally:
        set_env({"TORPOR_POOL": saved, "TORPOR_POOL_WARM": None})
        pool.drain(paths)
        with contextlib.suppress(TorporError):
            mgr.remove(src.id, force=True)
    return {
        "benchmark": "starts",
        "accel": accel,
        "machine": machine(),
        "image": image,
        "guest_mib": memory_mib,
        "workers": workers,
        "probe": probe,
        "modes": modes,
        "targets": {"starts_per_min_per_core": 300},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    modes = r["modes"]
    t = Table(
        title=f"torpor bench starts — {r['guest_mib']} MiB guest, accelerator {r['accel']}, "
        f"{r['workers']} workers (restore → exec true answered, or a request answered "
        "by the agent → removed)",
        header_style="bold",
    )
    t.add_column("metric")
    for name in modes:
        t.add_column(name, justify="right")
    t.add_column("target", justify="right")

    def row(label: str, fn: Any, target: str = "") -> None:
        t.add_row(label, *(fn(m) for m in modes.values()), target)

    def mib(s: dict[str, float]) -> str:
        return f"{s['p50'] / 2**20:.0f} / {s['p95'] / 2**20:.0f} MiB" if s["n"] else "-"

    row("seconds sustained", lambda m: f"{m['duration_s']:.0f}")
    row("load average at the end", lambda m: " ".join(f"{x:.1f}" for x in m["load_avg"]))
    row("starts", lambda m: str(m["starts"]))
    row("starts per minute", lambda m: f"{m['starts_per_min']:.0f}")
    row(
        "starts per minute per core",
        lambda m: f"{m['starts_per_min_per_core']:.0f}",
        f"≥ {r['targets']['starts_per_min_per_core']}",
    )
    row(
        "cycle p50 / p95",
        lambda m: (
            f"{m['cycle_ms']['p50']:.0f} / {m['cycle_ms']['p95']:.0f} ms"
            if m["cycle_ms"]["n"]
            else "-"
        ),
    )
    row(
        "machine CPU per start (all processes)",
        lambda m: f"{m.get('machine_cpu_ms_per_start', 0):.0f} ms",
        "≤ 200 ms",
    )

    def ms(key: str) -> Any:
        return lambda m: f"{m[key]['p50']:.0f} ms" if m.get(key, {}).get("n") else "-"

    row("QEMU CPU per start p50 (at the answer)", ms("qemu_cpu_ms"))
    row("shim CPU per start p50", ms("shim_cpu_ms"))
    row("host memory per running fork p50 / p95", lambda m: mib(m["fork_memory_bytes"]))
    row("memory of idle spares p50 / p95", lambda m: mib(m["spares_memory_bytes"]))
    row("failed cycles", lambda m: str(m["errors"]), "0")
    print_wide(console, t)


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT, _json_out

    @click.command(name="starts", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--workers", "-n", default=2, show_default=True, help="Parallel loops.")
    @click.option("--duration", default=60.0, show_default=True, help="Seconds to sustain.")
    @click.option("--memory", "memory_mib", default=256, show_default=True, help="Guest MiB.")
    @click.option(
        "--pool", "pool_size", default=2, show_default=True,
        help="Spares per snapshot for the second run (0: only the run without the pool).",
    )  # fmt: skip
    @click.option("--warm", is_flag=True, help="A third run: spares warmed by one exec.")
    @click.option(
        "--probe", type=click.Choice(["exec", "request", "both"]), default="exec",
        show_default=True,
        help="What answers a start: `exec true` in the guest, a request the agent answers "
        "itself (stat /, no guest process), or both (each run twice).",
    )  # fmt: skip
    @_json_out("starts")
    def starts_cmd(
        image: str, workers: int, duration: float, memory_mib: int, pool_size: int,
        warm: bool, probe: str, json_out: Path,
    ) -> None:  # fmt: skip
        """Starts per minute per core: N loops of restore → exec answered → remove."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import UsageError

        try:
            if workers < 1 or duration <= 0:
                raise UsageError("--workers must be >= 1 and --duration > 0")
            result = run_starts_bench(
                Paths.default().ensure(), image, workers=workers, duration=duration,
                memory_mib=memory_mib, pool_size=pool_size, warm=warm, probe=probe,
                progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return starts_cmd


starts_cmd = main_command()

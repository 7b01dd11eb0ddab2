"""``torpor bench lazy``: cold restore from the compressed store, full fetch vs lazy.

Issue 13 §5.  One 256 MiB guest with ``--data`` MiB of random data written into a
guest tmpfs (live data only in guest RAM), snapshotted once (it keeps running).  Each
run restores that snapshot **cold** (from the store only: no hot cache, no shadow)
three ways, side by side in the same minute:

- ``full``: today's cold path (``TORPOR_LAZY_RESTORE=0``): every memory chunk read,
  decompressed and hash-checked into a file before QEMU starts;
- ``lazy``: memory served by FUSE on demand (:mod:`torpor.vmm.lazymem`), no working
  set (this run records one);
- ``lazy+ws``: lazy, prefetching the working set the ``lazy`` run just recorded.

For each: time to agent-ready (``restore()`` returns: the agent answered HELLO, clock
and entropy set), time to the first ``exec true`` done after it, and the memory
fetched from the store by then as a fraction of guest RAM (``full``: every stored
chunk; lazy: the server's count, read 0.1 s after the exec — the background stream of
the rest is held back for the benchmark, ``TORPOR_LAZY_STREAM_DELAY_S=30``).  The
``full`` row is whatever a cold restore does without lazy restore on this torpor
(today: a shared base filled from the store, :mod:`torpor.vmm.basemem`, retired after
each run so that the next one is cold again).  The VM is removed after each, untimed.
Every number is noisy on a shared 2-core host: the load average is recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.cli import _loadavg
from torpor.bench.stats import machine, print_wide, set_env, summary
from torpor.errors import TorporError
from torpor.paths import Paths

TARGETS = {"cold_ready_ms": 300.0}
MODES = ("full", "lazy", "lazy_ws")


def run_lazy_bench(
    paths: Paths,
    image: str,
    runs: int = 5,
    memory_mib: int = 256,
    data_mib: int = 50,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.snapshot import restore, snapshot
    from torpor.vmm import lazymem
    from torpor.vmm.manager import RunRequest, VMManager

    why = lazymem.available()
    if why is not None:
        raise TorporError(f"lazy restore is unavailable here: {why}")
    mgr = VMManager(paths)
    src = mgr.run(
        RunRequest(
            image=image,
            command=("sleep", "infinity"),
            memory_mib=memory_mib,
            network=False,
            name=f"bench-lazy-{os.getpid()}",
        )
    )
    res: dict[str, dict[str, list[float]]] = {
        m: {"ready": [], "exec": [], "fetched_frac": []} for m in MODES
    }
    old_env = {k: os.environ.get(k) for k in ("TORPOR_LAZY_RESTORE", "TORPOR_LAZY_STREAM_DELAY_S")}
    # the background stream (the rest of the memory) starts after the measurement: a
    # slow first exec must not count bytes the stream fetched
    os.environ["TORPOR_LAZY_STREAM_DELAY_S"] = "30"
    try:
        with mgr.client(src) as c:
            r = c.exec(
                ["sh", "-c", "mkdir -p /run/d && mount -t tmpfs d /run/d && "
                 f"head -c {data_mib << 20} /dev/urandom > /run/d/f"],
                timeout=300,
            )  # fmt: skip
            if r.status.code != 0:
                raise TorporError(f"writing the live data failed: {r.stderr!r}")
        snap = snapshot(mgr, src.id).manifest
        art = snap.artifacts["memory"]
        stored = sum(art.span(i)[1] for i, h in enumerate(art.chunks) if h is not None)
        ws_file = paths.root / "cache" / lazymem.WS_DIR / snap.id
        progress(f"snapshot {snap.id[:12]}: {stored / 2**20:.0f} MiB of non-zero memory")
        for n in range(runs):
            for mode in MODES:
                if mode == "lazy":
                    lazymem.remove_working_set(paths.root, snap.id)
                os.environ["TORPOR_LAZY_RESTORE"] = "0" if mode == "full" else "1"
                t0 = time.perf_counter()
                vm = restore(mgr, snap.id, cold=True)
                t1 = time.perf_counter()
                try:
                    with mgr.client(vm) as c:
                        if c.exec(["true"], timeout=120).status.code != 0:
                            raise TorporError("exec true failed")
                    t2 = time.perf_counter()
                    if mode == "full":
                        frac = stored / art.size
                    else:
                        time.sleep(0.1)  # the server writes its counts every 50 ms
                        st = json.loads((vm.dir / lazymem.STATS_FILE).read_text())
                        frac = st["fetched_bytes"] / art.size
                finally:
                    with contextlib.suppress(TorporError):
                        mgr.remove(vm.id, force=True)
                    if mode == "full":  # its shared base must not serve the next run hot
                        _retire_base(paths, snap.id)
                if mode == "lazy":  # saved when the server ends (or its window closes)
                    deadline = time.monotonic() + 10
                    while not ws_file.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                res[mode]["ready"].append((t1 - t0) * 1000)
                res[mode]["exec"].append((t2 - t0) * 1000)
                res[mode]["fetched_frac"].append(frac)
                progress(
                    f"run {n + 1}/{runs} {mode}: ready {(t1 - t0) * 1000:.0f} ms, first exec "
                    f"{(t2 - t0) * 1000:.0f} ms, fetched {frac:.1%} of RAM"
                )
    finally:
        set_env(old_env)
        with contextlib.suppress(TorporError):
            mgr.remove(src.id, force=True)
    return {
        "bench": "lazy",
        "machine": machine(),
        "accel": src.state.accel,
        "guest_mib": memory_mib,
        "data_mib": data_mib,
        "stored_mib": round(stored / 2**20, 1),
        "runs": runs,
        "load_avg": _loadavg(),
        "results": {m: {k: summary(v) for k, v in d.items()} for m, d in res.items()},
        "raw": res,
        "targets": TARGETS,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _retire_base(paths: Paths, snap_id: str) -> None:
    try:
        from torpor.vmm import basemem
    except ImportError:
        return
    with contextlib.suppress(Exception):
        basemem.retire(paths, snap_id)


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    res = r["results"]
    load = " ".join(f"{x:.1f}" for x in r.get("load_avg", []))
    t = Table(
        title=f"torpor bench lazy — cold restore of a {r['guest_mib']} MiB guest with "
        f"{r['data_mib']} MiB live data ({r['stored_mib']} MiB non-zero), accelerator "
        f"{r['accel']}, {r['runs']} runs, load {load}",
        header_style="bold",
    )
    for col in ("mode", "ready p50", "ready p95", "first exec p50", "first exec p95",
                "fetched by first exec (of RAM)", "target"):  # fmt: skip
        t.add_column(col, justify="left" if col == "mode" else "right")
    names = {"full": "full fetch (today)", "lazy": "lazy", "lazy_ws": "lazy + working set"}
    for m in MODES:
        s = res[m]
        t.add_row(
            names[m],
            f"{s['ready']['p50']:.0f} ms",
            f"{s['ready']['p95']:.0f} ms",
            f"{s['exec']['p50']:.0f} ms",
            f"{s['exec']['p95']:.0f} ms",
            f"{s['fetched_frac']['p50']:.1%}",
            f"ready ≤ {r['targets']['cold_ready_ms']:g} ms",
        )
    print_wide(console, t)


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT, _json_out

    @click.command(name="lazy", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--runs", default=5, show_default=True, help="Runs of each mode.")
    @click.option("--memory", "memory_mib", default=256, show_default=True, help="Guest MiB.")
    @click.option("--data", "data_mib", default=50, show_default=True, help="Live data MiB.")
    @_json_out("lazy")
    def lazy_cmd(image: str, runs: int, memory_mib: int, data_mib: int, json_out: Path) -> None:
        """Cold restore from the store: full fetch vs lazy vs lazy + working set."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import UsageError

        try:
            if runs < 1:
                raise UsageError("--runs must be at least 1")
            result = run_lazy_bench(
                Paths.default().ensure(), image, runs=runs, memory_mib=memory_mib,
                data_mib=data_mib, progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return lazy_cmd


lazy_cmd = main_command()

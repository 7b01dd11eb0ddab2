"""``torpor bench restore``: restore next to boot, through the CLI and the library.

Rows (issue 13 §2), all of one image and one 256 MiB guest, measured in one run:

- ``cli run``: a fresh ``torpor run -d`` process, wall time until it exits (the agent
  answered and the main command started); the VM is removed afterwards, untimed.
- ``cli restore``: a fresh ``torpor restore SNAP`` process, wall time until it exits
  (the restored agent answered); removed afterwards, untimed.
- ``library restore → ready``: :func:`torpor.snapshot.restore` in this warm process,
  returning once the restored guest's agent answered HELLO (clock and entropy set).
- ``library restore → first exec``: the same plus one ``exec true``.  Under TCG the
  first exec after a restore pays for translating the code it runs afresh (the new
  QEMU starts with an empty translation cache), so this row is the honest "usable".
- ``library restore, cold``: from the compressed store only (no cache, no shadow, no
  shared base: ``TORPOR_RAM_BASE=0`` for that restore, else the base the hot rows
  hold would be mapped, already filled).

The restore rows run three ways side by side: the pool off (``TORPOR_POOL=0``), from
the pool (a ready spare waited for before each restore: restores spaced out, the
pool's steady state), and from the pool with ``TORPOR_POOL_WARM=exec`` spares.

The snapshot is taken of a running VM that keeps running, so a hot restore reads that
VM's RAM shadow (or, with a pool or shared base, whatever the restore path uses now).
CLI processes run with Python's bytecode cache on, in a private
``PYTHONPYCACHEPREFIX``, as an installed package would (see :mod:`torpor.bench.cli`).
Every number is noisy on a shared 2-core host: the load average is recorded.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.cli import _loadavg, _torpor
from torpor.bench.stats import machine, print_wide, set_env, summary
from torpor.errors import TorporError
from torpor.paths import Paths

TARGETS = {"cli_ratio": 10.0, "lib_ready_ms": 50.0, "cold_ms": 300.0}


def _cli(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    ms = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-500:]!r}")
    return ms, r.stdout.strip().splitlines()[-1].split()[-1]


def _wait_spare(paths: Paths, snap: str, timeout: float = 60.0) -> None:
    """Until the pool holds a ready spare of ``snap`` (a restore spaced from the last)."""
    from torpor.vmm import pool

    pool.want(paths, snap)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s.get("snapshot") == snap for s in pool.spares(paths)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no spare of {snap[:12]} within {timeout:.0f} s")


def run_restore_bench(
    paths: Paths,
    image: str,
    runs: int = 10,
    memory_mib: int = 256,
    cold: bool = True,
    use_pool: bool = True,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.snapshot import restore, snapshot
    from torpor.vmm.manager import RunRequest, VMManager

    mgr = VMManager(paths)
    cli = _torpor()
    from torpor.vmm import pool

    saved = os.environ.get("TORPOR_POOL")
    pool_size = max(1, pool.size()) if use_pool else 0
    keys = ("cli_restore", "lib_ready", "lib_exec", "lib_first_exec")
    res: dict[str, list[float]] = {
        k: []
        for k in ("cli_run", "cold", *keys, *(k + x for k in keys for x in ("_pool", "_warm")))
    }
    made: list[str] = []

    def rm(ref: str) -> None:
        with contextlib.suppress(TorporError):
            mgr.remove(ref, force=True)

    src = mgr.run(
        RunRequest(
            image=image,
            command=("sleep", "infinity"),
            memory_mib=memory_mib,
            network=False,
            name=f"bench-restore-{os.getpid()}",
        )
    )
    made.append(src.id)
    accel = src.state.accel
    try:
        snap = snapshot(mgr, src.id).manifest.id
        with tempfile.TemporaryDirectory(prefix="torpor-bench-pyc-") as pyc:
            env = dict(os.environ)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = pyc
            run_argv = [
                *cli,
                "run",
                "-d",
                "--network",
                "none",
                "-m",
                f"{memory_mib}m",
                image,
                "sleep",
                "infinity",
            ]
            modes = ["plain", "pool", "warm"] if pool_size else ["plain"]
            for i in range(runs + 1):  # the first of each: warm-up (bytecode, caches)
                ms, vm_id = _cli(run_argv, env)
                rm(vm_id)
                if i:
                    res["cli_run"].append(ms)
                for mode in modes:  # side by side: the pool off, on, on with exec warm-up
                    sfx = "" if mode == "plain" else "_" + mode
                    os.environ["TORPOR_POOL"] = env["TORPOR_POOL"] = (
                        "0" if mode == "plain" else str(pool_size)
                    )
                    warm = "exec" if mode == "warm" else ""
                    if os.environ.get("TORPOR_POOL_WARM", "") != warm:
                        pool.drain(paths)  # spares of the other kind are never claimed
                    os.environ["TORPOR_POOL_WARM"] = env["TORPOR_POOL_WARM"] = warm
                    if mode != "plain":
                        _wait_spare(paths, snap)
                    ms, vm_id = _cli([*cli, "restore", snap], env)
                    rm(vm_id)
                    if i:
                        res["cli_restore" + sfx].append(ms)
                    if mode != "plain":
                        _wait_spare(paths, snap)
                    t = time.perf_counter()
                    vm = restore(mgr, snap)
                    ready = (time.perf_counter() - t) * 1000
                    with mgr.client(vm) as c:
                        if c.exec(["true"]).status.code != 0:
                            raise RuntimeError("exec true failed in a restored VM")
                    exec_total = (time.perf_counter() - t) * 1000
                    rm(vm.id)
                    if i:
                        res["lib_ready" + sfx].append(ready)
                        res["lib_exec" + sfx].append(exec_total)
                        res["lib_first_exec" + sfx].append(exec_total - ready)
                        progress(
                            f"{i}/{runs} {mode}: cli run {res['cli_run'][-1]:.0f} ms, cli "
                            f"restore {res['cli_restore' + sfx][-1]:.0f} ms, library ready "
                            f"{ready:.0f} ms, first exec {exec_total - ready:.0f} ms"
                        )
                os.environ["TORPOR_POOL"] = env["TORPOR_POOL"] = "0"
                if cold and i:
                    # cold = the RAM from the store's chunks: no shared base either (one
                    # held by this run's hot rows would be mapped, already filled)
                    saved_base = os.environ.get("TORPOR_RAM_BASE")
                    os.environ["TORPOR_RAM_BASE"] = "0"
                    try:
                        t = time.perf_counter()
                        vm = restore(mgr, snap, cold=True)
                        res["cold"].append((time.perf_counter() - t) * 1000)
                    finally:
                        set_env({"TORPOR_RAM_BASE": saved_base})
                    rm(vm.id)
    finally:
        set_env({"TORPOR_POOL": saved, "TORPOR_POOL_WARM": None})

        pool.drain(paths)
        for v in made:
            rm(v)
    out = {k: summary(v) for k, v in res.items() if v}
    for sfx in ("", "_pool", "_warm"):
        if "cli_run" in out and "cli_restore" + sfx in out:
            ratio = out["cli_run"]["p50"] / out["cli_restore" + sfx]["p50"]
            out["cli_ratio" + sfx] = {"p50": ratio}
    return {
        "benchmark": "restore",
        "accel": accel,
        "machine": machine(),
        "load_avg": _loadavg(),
        "image": image,
        "guest_mib": memory_mib,
        "runs": runs,
        "pool": pool_size,
        "results": out,
        "targets": TARGETS,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    res = r["results"]
    load = " ".join(f"{x:.1f}" for x in r.get("load_avg", []))
    t = Table(
        title=f"torpor bench restore — {r['guest_mib']} MiB guest, accelerator {r['accel']}, "
        f"{r['runs']} runs, load {load}",
        header_style="bold",
    )
    for col in ("row", "p50", "p95", "min", "n", "target"):
        t.add_column(col, justify="left" if col == "row" else "right")
    tg = r["targets"]
    rows = [("CLI: torpor run -d (to agent ready)", "cli_run", "")]
    for sfx, what in (
        ("", "pool off"),
        ("_pool", "from the pool"),
        ("_warm", "pool, exec warm-up"),
    ):
        rows += [
            (f"CLI: torpor restore, {what}", "cli_restore" + sfx, f"≤ run / {tg['cli_ratio']:g}"),
            (f"library: hot restore → agent ready, {what}", "lib_ready" + sfx,
             f"≤ {tg['lib_ready_ms']:g} ms"),
            (f"library: first exec after it, {what}", "lib_first_exec" + sfx, ""),
            (f"library: hot restore → first exec done, {what}", "lib_exec" + sfx, ""),
        ]  # fmt: skip
    rows.append(("library: cold restore → agent ready", "cold", f"≤ {tg['cold_ms']:g} ms"))
    for label, key, target in rows:
        if key not in res:
            continue
        s = res[key]
        t.add_row(
            label,
            f"{s['p50']:.0f} ms",
            f"{s['p95']:.0f} ms",
            f"{s['min']:.0f} ms",
            str(s["n"]),
            target,
        )
    for sfx, what in (
        ("", "pool off"),
        ("_pool", "from the pool"),
        ("_warm", "pool, exec warm-up"),
    ):
        if "cli_ratio" + sfx in res:
            t.add_row(
                f"run / restore (CLI p50), {what}",
                f"{res['cli_ratio' + sfx]['p50']:.1f}x",
                "",
                "",
                "",
                f"≥ {tg['cli_ratio']:g}x",
            )
    print_wide(console, t)


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT, _json_out

    @click.command(name="restore", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--runs", default=10, show_default=True, help="Timed runs of each row.")
    @click.option("--memory", "memory_mib", default=256, show_default=True, help="Guest MiB.")
    @click.option("--no-cold", is_flag=True, help="Skip the cold-restore row.")
    @click.option("--no-pool", is_flag=True, help="Only the rows without the pool.")
    @_json_out("restore")
    def restore_cmd(
        image: str, runs: int, memory_mib: int, no_cold: bool, no_pool: bool, json_out: Path
    ) -> None:
        """CLI run vs CLI restore, library hot restore to ready and to first exec, cold."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import UsageError

        try:
            if runs < 1:
                raise UsageError("--runs must be at least 1")
            result = run_restore_bench(
                Paths.default().ensure(), image, runs=runs, memory_mib=memory_mib,
                cold=not no_cold, use_pool=not no_pool,
                progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return restore_cmd


restore_cmd = main_command()

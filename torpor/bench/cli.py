"""``torpor bench cli``: what the command line costs over the library doing the same work.

Each row times the real CLI as a user runs it (a fresh process of the installed
``torpor`` script: interpreter start, imports, argument parsing, the work, exit) next
to the library call doing that work in a warm process.  The difference is the CLI's
own cost; the ``python -c pass`` row is the floor no Python CLI can go under.
``exec VM true`` runs against one VM booted for the benchmark (removed afterwards);
its library call opens a new agent connection each time, as the CLI does.

The CLI processes run with Python's bytecode cache on, as in any installed package
(``PYTHONDONTWRITEBYTECODE`` dropped, the cache in a private temporary
``PYTHONPYCACHEPREFIX`` so the source tree is not touched); ``--no-bytecode-cache``
measures the other case, where every start compiles torpor's sources again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.stats import machine, print_wide, summary
from torpor.paths import Paths

TARGETS = {"version_ms": 60.0, "exec_ratio": 4.0}


def _torpor() -> list[str]:
    script = Path(sys.executable).parent / "torpor"
    if script.exists():
        return [str(script)]
    found = shutil.which("torpor")
    return [found] if found else [sys.executable, "-m", "torpor.cli.main"]


def _time(fn: Callable[[], Any], runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _proc(argv: list[str], env: dict[str, str]) -> Callable[[], None]:
    def run() -> None:
        r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr[-500:]!r}")

    return run


def run_cli_bench(
    paths: Paths,
    image: str,
    runs: int,
    progress: Callable[[str], None] = lambda m: None,
    bytecode_cache: bool = True,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="torpor-bench-pyc-") as pyc:
        env = dict(os.environ)
        if bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = pyc
        else:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        result = _run(paths, image, runs, progress, env)
    result["bytecode_cache"] = bytecode_cache
    return result


def _run(
    paths: Paths,
    image: str,
    runs: int,
    progress: Callable[[str], None],
    env: dict[str, str],
) -> dict[str, Any]:
    from torpor import __version__
    from torpor.image.store import ImageStore
    from torpor.vmm.manager import RunRequest, VMManager

    cli = _torpor()
    mgr = VMManager(paths)
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, cli_argv: list[str] | None, lib: Callable[[], Any] | None) -> None:
        r: dict[str, Any] = {}
        if cli_argv is not None:
            r["cli_ms"] = summary(_time(_proc(cli_argv, env), runs))
        if lib is not None:
            r["library_ms"] = summary(_time(lib, runs))
        rows[name] = r
        progress(f"{name}: " + ", ".join(f"{k} p50 {v['p50']:.1f}" for k, v in r.items()))

    # one running VM for the whole run: `ps` lists it, `exec` runs in it
    vm = mgr.run(
        RunRequest(image=image, command=("sleep", "infinity"), network=False, memory_mib=256)
    )
    try:
        row("python -c pass (floor)", [sys.executable, "-c", "pass"], None)
        row("--version", [*cli, "--version"], lambda: __version__)
        row("ps -a", [*cli, "ps", "-a"], lambda: mgr.list(all=True))
        row("images", [*cli, "images"], lambda: ImageStore(paths).list())

        def lib_exec() -> None:
            with mgr.client(vm) as c:
                if c.exec(["true"]).status.code != 0:
                    raise RuntimeError("exec true failed")

        row("exec VM true", [*cli, "exec", vm.id, "true"], lib_exec)
    finally:
        mgr.remove(vm.id, force=True)
    for r in rows.values():
        # --version has no library work to compare with (reading a constant)
        if "cli_ms" in r and "library_ms" in r and r["library_ms"]["p50"] > 0.01:
            r["ratio_p50"] = r["cli_ms"]["p50"] / max(r["library_ms"]["p50"], 1e-6)
    return {
        "benchmark": "cli",
        "machine": machine(),
        "load_avg": _loadavg(),
        "image": image,
        "runs": runs,
        "command": cli,
        "rows": rows,
        "targets": TARGETS,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return []


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    load = " ".join(f"{x:.1f}" for x in r.get("load_avg", []))
    pyc = "bytecode cached" if r.get("bytecode_cache", True) else "no bytecode cache"
    t = Table(
        title=f"torpor bench cli — {r['runs']} runs each, {pyc}, load {load}",
        header_style="bold",
    )
    for col in ("command", "CLI p50", "CLI p95", "library p50", "library p95", "CLI/lib", "target"):
        t.add_column(col, justify="left" if col == "command" else "right")

    def ms(s: dict[str, float] | None, k: str) -> str:
        return f"{s[k]:.1f} ms" if s else "-"

    for name, row in r["rows"].items():
        target = ""
        if name == "--version":
            target = f"≤ {r['targets']['version_ms']:.0f} ms"
        elif name == "exec VM true":
            target = f"≤ {r['targets']['exec_ratio']:.0f}x"
        t.add_row(
            name,
            ms(row.get("cli_ms"), "p50"),
            ms(row.get("cli_ms"), "p95"),
            ms(row.get("library_ms"), "p50"),
            ms(row.get("library_ms"), "p95"),
            f"{row['ratio_p50']:.1f}x" if "ratio_p50" in row else "-",
            target,
        )
    print_wide(console, t)

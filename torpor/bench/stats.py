"""Small statistics helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from typing import Any


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "min": min(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def machine() -> dict[str, str]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        qemu = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        qemu = "?"
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "qemu": qemu,
    }


def print_wide(console: Any, table: Any) -> None:
    """Print a bench's table; into a file or pipe at 200 columns, never wrapping a row."""
    if not console.is_terminal:
        from rich.console import Console

        console = Console(width=200, highlight=False)
    console.print(table)


def set_env(values: dict[str, str | None]) -> None:
    """Set this process's environment variables ``values`` (None: unset) — also how a
    bench puts back what it saved with ``{k: os.environ.get(k) for k in keys}``."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def busy_cpu_s() -> float:
    """Core-seconds all CPUs have been busy since boot (/proc/stat: not idle, not
    iowait): the difference over a run is the machine's CPU for it, other load included."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def proc_cpu_ms(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far, in ms; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None

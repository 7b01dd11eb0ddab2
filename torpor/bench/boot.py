"""``torpor bench boot``: cold boot to agent-ready, exec round trip, stdout throughput.

Cold boot is timed twice: wall time of ``VMManager.start`` as a user feels it
(shim start-up included) and the shim's own figure from QEMU spawn to the agent's
HELLO reply.  ``exec true`` is a full round trip CLI-library -> shim -> guest ->
fork/exec/wait -> back.  Throughput streams 1 MiB of stdout through the same path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torpor.bench.stats import machine, summary
from torpor.paths import Paths
from torpor.vmm.manager import RunRequest, VMManager

TARGETS = {
    "tcg": {"ready_ms": 1500, "exec_ms": 20},
    "kvm": {"ready_ms": 300, "exec_ms": 3},
}


def run_boot_bench(
    paths: Paths,
    image: str,
    runs: int,
    execs: int,
    accel: str = "auto",
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    mgr = VMManager(paths)
    wall: list[float] = []
    guest: list[float] = []
    exec_ms: list[float] = []
    mib_s: list[float] = []
    used_accel = ""
    for i in range(runs):
        t0 = time.perf_counter()
        vm = mgr.run(
            RunRequest(
                image=image,
                command=("sleep", "infinity"),
                accel=accel,
                network=False,
                memory_mib=256,
            )
        )
        wall.append((time.perf_counter() - t0) * 1000)
        guest.append(vm.state.boot_ms)
        used_accel = vm.state.accel
        progress(f"boot {i + 1}/{runs}: {wall[-1]:.0f} ms wall, {guest[-1]:.0f} ms QEMU->agent")
        try:
            if i == 0:
                with mgr.client(vm) as c:
                    for _ in range(min(10, execs)):  # warm-up, not counted
                        c.exec(["true"])
                    for _ in range(execs):
                        t = time.perf_counter()
                        r = c.exec(["true"])
                        exec_ms.append((time.perf_counter() - t) * 1000)
                        assert r.status.code == 0
                    progress(f"exec true: {len(exec_ms)} round trips")
                    for _ in range(5):
                        t = time.perf_counter()
                        r = c.exec(["head", "-c", "1048576", "/dev/zero"])
                        dt = time.perf_counter() - t
                        if len(r.stdout) != 1 << 20:
                            raise RuntimeError(f"expected 1 MiB of stdout, got {len(r.stdout)}")
                        mib_s.append(1 / dt)
        finally:
            mgr.remove(vm.id, force=True)
    return {
        "benchmark": "boot",
        "accel": used_accel,
        "machine": machine(),
        "image": image,
        "ready_wall_ms": summary(wall),
        "ready_qemu_to_agent_ms": summary(guest),
        "exec_true_ms": summary(exec_ms),
        "stdout_1mib_mib_per_s": summary(mib_s),
        "targets": TARGETS.get(used_accel, {}),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    tgt = r.get("targets", {})
    t = Table(title=f"torpor bench boot — accelerator {r['accel']}", header_style="bold")
    for col in ("metric", "p50", "p95", "n", "target"):
        t.add_column(col, justify="right" if col != "metric" else "left")

    def row(name: str, s: dict[str, float], unit: str, target: str = "") -> None:
        t.add_row(name, f"{s['p50']:.1f} {unit}", f"{s['p95']:.1f} {unit}", str(s["n"]), target)

    row(
        "cold boot to agent-ready (wall)",
        r["ready_wall_ms"],
        "ms",
        f"≤ {tgt['ready_ms']} ms" if tgt else "",
    )
    row("  of which QEMU spawn -> agent HELLO", r["ready_qemu_to_agent_ms"], "ms")
    row(
        "exec true round trip", r["exec_true_ms"], "ms", f"≤ {tgt['exec_ms']} ms p50" if tgt else ""
    )
    row("1 MiB stdout throughput", r["stdout_1mib_mib_per_s"], "MiB/s")
    console.print(t)

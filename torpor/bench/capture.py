"""``torpor bench capture``: the capture of a VM with shared RAM vs one with private RAM.

Issue 13 §3 (capture half).  One 256 MiB guest is booted (guest RAM a ``share=on``
file: the shadow capture, :mod:`torpor.vmm.capture`) and snapshotted; that snapshot
is restored with its RAM mapped private over a shared base (``share=off``: the
RAM-less capture, :mod:`torpor.vmm.ramless`).  Both VMs then take turns, in the same
minute: write ``--write`` MiB of random data into a guest tmpfs file (a new file each
round), snapshot.  Per mode: the pause (what the guest feels), the time until the
snapshot is durable, and the private capture's steps (device state, pagemap scan,
page read, overlay update after the resume).  The first capture of the booted VM (a
whole-RAM copy) is not counted: both rows are incremental captures.
Every number is noisy on a shared 2-core host: the load average is recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.cli import _loadavg
from torpor.bench.stats import machine, print_wide, summary
from torpor.errors import TorporError
from torpor.paths import Paths

TARGETS = {"pause_ms": 50.0, "durable_ms": 300.0}
MODES = ("shared", "private")
STEPS = ("devstate_ms", "pagemap_ms", "read_ms", "copy_ms", "apply_ms")


def run_capture_bench(
    paths: Paths,
    image: str,
    rounds: int = 5,
    memory_mib: int = 256,
    write_mib: int = 4,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.snapshot import restore, snapshot
    from torpor.vmm import basemem
    from torpor.vmm.manager import RunRequest, VMManager

    ok, why = basemem.wanted()
    if not ok:
        raise TorporError(f"restores do not map RAM private here: {why}")
    mgr = VMManager(paths)
    made = []
    shared = mgr.run(
        RunRequest(
            image=image,
            command=("sleep", "infinity"),
            memory_mib=memory_mib,
            network=False,
            name=f"bench-cap-shared-{os.getpid()}",
        )
    )
    made.append(shared.id)
    accel = shared.state.accel
    res: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in ("pause_ms", "durable_ms", "pages", *STEPS)} for m in MODES
    }
    try:
        first = snapshot(mgr, shared.id)
        private = restore(mgr, first.manifest.id, name=f"bench-cap-private-{os.getpid()}")
        made.append(private.id)
        if "share=off" not in (private.dir / "qemu.argv").read_text():
            raise TorporError("the restored VM's RAM is not mapped private")
        for i in range(rounds):
            for mode, vm in (("shared", shared), ("private", private)):
                with mgr.client(vm) as c:
                    r = c.exec(
                        ["sh", "-c", f"head -c {write_mib << 20} /dev/urandom > /dev/shm/w{i}"]
                    )
                    if r.status.code != 0:
                        raise TorporError(f"guest write failed: {r.stderr[-200:]!r}")
                s = snapshot(mgr, vm.id)
                row = res[mode]
                row["pause_ms"].append(s.pause_ms)
                row["durable_ms"].append(s.durable_ms)
                row["pages"].append(float(s.timings.get("memory_pages_private", 0)))
                for k in STEPS:
                    if k in s.timings:
                        row[k].append(float(s.timings[k]))
                progress(f"round {i + 1}/{rounds} {mode}: pause {s.pause_ms:.1f} ms")
    finally:
        for vm_id in made:
            try:
                mgr.remove(vm_id, force=True)
            except TorporError as e:
                progress(f"cleanup of {vm_id[:12]} failed: {e}")
    return {
        "bench": "capture",
        "machine": machine(),
        "accel": accel,
        "load_avg": _loadavg(),
        "guest_mib": memory_mib,
        "write_mib": write_mib,
        "rounds": rounds,
        "targets": TARGETS,
        "results": {m: {k: summary(v) for k, v in res[m].items() if v} for m in MODES},
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    res = r["results"]
    load = " ".join(f"{x:.1f}" for x in r.get("load_avg", []))
    t = Table(
        title=f"torpor bench capture — {r['guest_mib']} MiB guest, {r['write_mib']} MiB "
        f"written per round, accelerator {r['accel']}, {r['rounds']} rounds, load {load}",
        header_style="bold",
    )
    cols = ("RAM", "pause p50", "pause p95", "durable p50", "device state", "pagemap",
            "read pages", "disk copy", "overlay (after)", "pages read")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "RAM" else "right")

    def ms(s: dict[str, Any], k: str) -> str:
        return f"{s[k]['p50']:.1f} ms" if k in s else "—"

    for m in MODES:
        s = res[m]
        t.add_row(
            "shared (shadow)" if m == "shared" else "private (RAM-less)",
            ms(s, "pause_ms"),
            f"{s['pause_ms']['p95']:.1f} ms",
            f"{s['durable_ms']['p50']:.0f} ms",
            ms(s, "devstate_ms"),
            ms(s, "pagemap_ms"),
            ms(s, "read_ms"),
            ms(s, "copy_ms"),
            ms(s, "apply_ms"),
            f"{s['pages']['p50']:.0f}" if m == "private" else "—",
        )
    print_wide(console, t)


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT, _json_out

    @click.command(name="capture", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--rounds", default=5, show_default=True, help="Snapshots of each VM.")
    @click.option("--memory", "memory_mib", default=256, show_default=True, help="Guest MiB.")
    @click.option("--write", "write_mib", default=4, show_default=True, help="MiB per round.")
    @_json_out("capture")
    def capture_cmd(
        image: str, rounds: int, memory_mib: int, write_mib: int, json_out: Path
    ) -> None:
        """Capture pause and durable time: shared RAM (shadow) vs private RAM (RAM-less)."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import UsageError

        try:
            if rounds < 1:
                raise UsageError("--rounds must be at least 1")
            result = run_capture_bench(
                Paths.default().ensure(), image, rounds=rounds, memory_mib=memory_mib,
                write_mib=write_mib, progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return capture_cmd


capture_cmd = main_command()

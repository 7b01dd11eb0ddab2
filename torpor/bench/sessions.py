"""``torpor bench sessions``: what durability costs per turn, and what waking costs.

For each session length N: a session on the ``scripted:bench`` model (every turn
runs one real shell call in the VM that appends to a file and writes 4 KiB of
fresh data, so each checkpoint has new disk and memory to capture) runs N turns.
Measured: the per-turn checkpoint (pause, durable, bytes stored), total bytes
(log + snapshot chunks), the time to resume after hibernation, and the time to
recover after a crash at the last turn.

The crash is made the way a real one looks to the next process: the last turn's
user message is acknowledged (appended), then the VM is killed -9 before the turn
ran; ``recover`` restores the last checkpoint and replays the turn.  (Killing the
torpor process itself mid-turn is covered by the test suite; it leaves the same
state plus superseded partial entries.)  The claim under test: resume and
recovery do not grow with N.

"Added per turn" is what the checkpoint adds to a turn: from the answer's
``model_response`` entry (its ``created_at``) to ``send()`` returning.  With
``TORPOR_JOURNAL=0`` checkpoints take the synchronous path (the before-rows).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from torpor.bench.stats import machine, summary
from torpor.context import Kind
from torpor.paths import Paths
from torpor.session import Session
from torpor.snapshot import journal
from torpor.vmm.manager import VMManager


def run_one(
    paths: Paths, image: str, turns: int, say: Callable[[str], None], memory_mib: int = 256
) -> dict[str, Any]:
    s = Session.create(image, "scripted:bench", memory_mib=memory_mib, paths=paths)
    try:
        turn_ms: list[float] = []
        added_ms: list[float] = []  # the answer logged -> send() returned: the checkpoint
        t_all = time.perf_counter()
        for i in range(turns):
            t0 = time.perf_counter()
            s.send(f"turn {i + 1}")
            done = time.time()
            turn_ms.append((time.perf_counter() - t0) * 1000)
            answer = [
                e for e in s.log(after=s.checkpoints[-1].seq - 3) if e.kind == Kind.MODEL_RESPONSE
            ]
            if answer:
                added_ms.append((done - answer[-1].created_at) * 1000)
            if (i + 1) % max(1, turns // 10) == 0:
                say(f"  N={turns}: {i + 1} turns ({time.perf_counter() - t_all:.0f} s)")
        cks = [c for c in s.checkpoints if c.reason == "turn"]
        journal.wait_all()  # a journaled checkpoint's stored bytes: what its commit stored
        behind = {c.seq: journal.commits.get(c.snapshot, {}).get("stored_bytes") for c in cks}
        cks = [
            dataclasses.replace(c, stored_bytes=int(behind[c.seq]))
            if behind[c.seq] is not None
            else c
            for c in cks
        ]
        vm = s.vm()
        accel = vm.state.accel if vm else ""
        stats = s.stats()
        # resume after hibernation
        s.hibernate()
        t0 = time.perf_counter()
        s.wake()
        resume_ms = (time.perf_counter() - t0) * 1000
        woke = [e for e in s.log() if e.kind == Kind.RESUME]
        resume_vm_ms = float(woke[-1].payload.get("ms", 0.0)) if woke else 0.0
        # crash at the last turn: message acknowledged, VM killed before the turn ran
        st = s.state()
        s._log.append(s.id, Kind.USER, {"content": f"turn {turns + 1}"}, turn=st.turns + 1)
        vm = s.vm()
        assert vm is not None
        VMManager(paths).kill(vm.id)
        t0 = time.perf_counter()
        s.recover()
        recover_ms = (time.perf_counter() - t0) * 1000
        tail = s.log(after=st.last_seq)
        restored = [e for e in tail if e.kind == Kind.VM and e.payload.get("reason") == "recover"]
        recover_vm_ms = float(restored[-1].payload.get("ms", 0.0)) if restored else 0.0
        replay_ms = sum(
            float(e.payload.get("durable_ms", 0.0)) for e in tail if e.kind == Kind.CHECKPOINT
        )
        return {
            "turns": turns,
            "accel": accel,
            "turn_ms": summary(turn_ms),
            "added_per_turn_ms": summary(added_ms),
            "journal": os.environ.get("TORPOR_JOURNAL") != "0",
            "checkpoint_pause_ms": summary([c.pause_ms for c in cks]),
            "checkpoint_durable_ms": summary([c.durable_ms for c in cks]),
            "checkpoint_stored_bytes": summary([float(c.stored_bytes) for c in cks]),
            "first_checkpoint_bytes": s.checkpoints[0].stored_bytes,
            "snapshot_bytes_total": stats["snapshot_bytes"],
            "log_bytes": stats["log_bytes"],
            "log_entries": stats["entries"],
            "resume_ms": resume_ms,
            "resume_vm_ms": resume_vm_ms,  # of which: starting the hibernated VM
            "recover_ms": recover_ms,
            "recover_vm_ms": recover_vm_ms,  # of which: restoring the VM from the checkpoint
            "recover_checkpoint_ms": replay_ms,  # of which: the replayed turn's checkpoint
        }
    finally:
        s.remove()
        s.close()


def run_sessions_bench(
    paths: Paths, image: str, lengths: list[int], say: Callable[[str], None]
) -> dict[str, Any]:
    results = []
    for n in lengths:
        say(f"session of {n} turns…")
        results.append(run_one(paths, image, n, say))
    return {
        "bench": "sessions",
        "machine": machine(),
        "accel": results[0]["accel"] if results else "",
        "model": "scripted:bench",
        "results": results,
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"torpor bench sessions — accelerator {r['accel']}", header_style="bold")
    cols = (
        "turns",
        "turn p50",
        "added/turn p50/p95",
        "checkpoint durable p50/p95",
        "pause p50",
        "stored/turn p50",
        "snapshots total",
        "log",
        "resume (VM)",
        "recover (VM restore)",
    )
    for c in cols:
        t.add_column(c, justify="right")
    for x in r["results"]:
        t.add_row(
            str(x["turns"]),
            f"{x['turn_ms']['p50']:.0f} ms",
            f"{x['added_per_turn_ms']['p50']:.0f}/{x['added_per_turn_ms']['p95']:.0f} ms",
            f"{x['checkpoint_durable_ms']['p50']:.0f}/{x['checkpoint_durable_ms']['p95']:.0f} ms",
            f"{x['checkpoint_pause_ms']['p50']:.0f} ms",
            f"{x['checkpoint_stored_bytes']['p50'] / 1e3:.0f} KB",
            f"{x['snapshot_bytes_total'] / 1e6:.1f} MB",
            f"{x['log_bytes'] / 1e3:.0f} KB",
            f"{x['resume_ms']:.0f} ms ({x['resume_vm_ms']:.0f})",
            f"{x['recover_ms']:.0f} ms ({x['recover_vm_ms']:.0f})",
        )
    console.print(t)

"""``torpor bench turn``: what a turn's checkpoint adds to the turn, phase by phase,
with the checkpoint journal and without it, side by side.

Two sessions on the ``scripted:bench`` model (every turn: one shell call that
appends to a file and writes 4 KiB of fresh data, then the answer) in one home; their
turns alternate (which one goes first alternates too), so both see the same load.
One takes every checkpoint synchronously (``TORPOR_JOURNAL=0``: the store commit on
the turn's path), the other through the journal (:mod:`torpor.snapshot.journal`).

Per turn:

- *added per turn*: from the answer's ``model_response`` entry (its ``created_at``)
  to ``send()`` returning — everything the checkpoint adds;
- the checkpoint's phases (``Session.last_checkpoint_timings``): the lease claim,
  the guest agent's sync, the pause window (of which device state, and the shadow
  sync + disk overlay copy), after the pause: store hashing/compression/writes/
  fsyncs + manifest commit (synchronous) or hashing + the journal write and its
  fsync (journal), the checkpoint entry's append (its fsync), the state record;
- with the journal, the background commit (start to stored) and what it stored;
- the turn itself: with ``--think-ms 0`` (default) the next turn starts at once, so
  the background commit competes with it for the cores (the worst case).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from torpor.bench.stats import machine, summary
from torpor.context import Kind
from torpor.paths import Paths
from torpor.session import Session
from torpor.snapshot import journal

MODES = ("synchronous", "journal")

#: (column, timing keys summed) — per mode, in the order of the path
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("claim", ("claim_ms",)),
    ("guest sync", ("guest_sync_ms",)),
    ("capture request", ("capture_ms",)),
    ("  pause", ("pause_ms",)),
    ("    devstate", ("devstate_ms",)),
    ("    shadow+disk copy", ("copy_ms",)),
    ("store (sync)", ("store_ms",)),
    ("  manifest commit", ("commit_ms",)),
    ("hash (journal)", ("hash_ms",)),
    ("journal write+fsync", ("journal_ms",)),
    ("checkpoint entry", ("entry_ms",)),
    ("state record", ("record_ms",)),
    ("checkpoint total", ("checkpoint_ms",)),
)


def _loadavg() -> float:
    return os.getloadavg()[0]


def run_turn_bench(
    paths: Paths,
    image: str,
    turns: int,
    say: Callable[[str], None],
    think_ms: float = 0.0,
    memory_mib: int = 256,
) -> dict[str, Any]:
    saved = os.environ.get(journal.ENV)
    sessions: dict[str, Session] = {}
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    load = [_loadavg()]
    try:
        for m in MODES:
            sessions[m] = Session.create(
                image, "scripted:bench", memory_mib=memory_mib, paths=paths
            )
        for i in range(turns):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for m in order:
                os.environ[journal.ENV] = "0" if m == "synchronous" else "1"
                s = sessions[m]
                t0 = time.perf_counter()
                s.send(f"turn {i + 1}")
                done = time.time()
                turn_ms = (time.perf_counter() - t0) * 1000
                ck = s.checkpoints[-1]
                answer = [
                    e for e in s.log(after=max(0, ck.seq - 4)) if e.kind == Kind.MODEL_RESPONSE
                ]
                row = dict(s.last_checkpoint_timings)
                if row.get("journal"):
                    row.pop("commit_ms", None)  # there: the journal write (commit_local_ms)
                row["turn_ms"] = turn_ms
                row["added_ms"] = (done - answer[-1].created_at) * 1000 if answer else float("nan")
                row["snapshot"] = ck.snapshot  # type: ignore[assignment]
                rows[m].append(row)
                if think_ms:
                    time.sleep(think_ms / 1000)
            if (i + 1) % max(1, turns // 5) == 0:
                say(f"  {i + 1}/{turns} turns (load {_loadavg():.1f})")
        journal.wait_all()
        for row in rows["journal"]:
            c = journal.commits.get(str(row.pop("snapshot")), {})
            row["commit_behind_ms"] = c.get("commit_ms", float("nan"))
            row["stored_bytes"] = c.get("stored_bytes", float("nan"))
        load.append(_loadavg())
    finally:
        if saved is None:
            os.environ.pop(journal.ENV, None)
        else:
            os.environ[journal.ENV] = saved
        for s in sessions.values():
            s.remove()
            s.close()
    out: dict[str, Any] = {}
    for m in MODES:
        rs = rows[m][1:]  # the first turn after create is not a steady state
        keys = sorted({k for r in rs for k, v in r.items() if isinstance(v, float | int)})
        out[m] = {k: summary([float(r[k]) for r in rs if k in r and r[k] == r[k]]) for k in keys}
        out[m]["journaled_turns"] = sum(1 for r in rs if r.get("journal"))
    return {
        "bench": "turn",
        "machine": machine(),
        "turns": turns,
        "think_ms": think_ms,
        "load_avg_1m": load,
        "model": "scripted:bench",
        "results": out,
    }


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    lo, hi = r["load_avg_1m"][0], r["load_avg_1m"][-1]
    t = Table(
        title=f"torpor bench turn — {r['turns']} turns each, load {lo:.1f}→{hi:.1f}",
        header_style="bold",
    )
    t.add_column("p50 (p95) ms")
    for m in MODES:
        t.add_column(m, justify="right")

    def cell(m: str, key: str) -> str:
        s = r["results"][m].get(key)
        if not s or not s.get("n"):
            return "—"
        return f"{s['p50']:.1f} ({s['p95']:.0f})"

    t.add_row("[bold]added per turn[/bold]", *(cell(m, "added_ms") for m in MODES))
    t.add_row("turn", *(cell(m, "turn_ms") for m in MODES))
    t.add_row("durable", *(cell(m, "durable_ms") for m in MODES))
    for label, keys in PHASES:
        t.add_row(label, *(cell(m, keys[0]) for m in MODES))
    t.add_row("commit behind (journal)", "—", cell("journal", "commit_behind_ms"))
    st = r["results"]["journal"].get("stored_bytes")
    t.add_row(
        "stored per turn (journal, KB)", "—", f"{st['p50'] / 1e3:.0f}" if st and st["n"] else "—"
    )
    t.add_row("journaled turns", *(str(r["results"][m].get("journaled_turns", 0)) for m in MODES))
    console.print(t)

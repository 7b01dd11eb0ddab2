"""Run one system through the workload, kill -9 it at turn N-1, recover, check.

One run (:func:`run_one`)::

    prepare -> worker #1 (own process group) -> ... "crash" event at turn N-1
            -> kill -9 the group (+ system.kill_extra) -> t_kill
            -> worker #2 (recovering) -> "restored", "rerun", "next" ... "done"
            -> inspect (workspace, journal, background process) -> storage -> drop

Recovery is ``next - t_kill``: until the step after the crashed one runs.  It is
split on a monotone timeline (each marker clamped to be no earlier than the one
before, so the phases add up to the total)::

    restart  kill -> worker imported (process start + interpreter + engine imports)
    engine   -> engine ready (database connected, migrations checked, server dialled)
    detect   -> engine starts rebuilding this session (timeouts, queues, lookups)
    replay   -> state rebuilt (stored outputs replayed / checkpoint deserialised /
                VM restored)
    resume   -> the next step runs

``bytes_read`` is the recovery worker's ``rchar`` between ``enter`` and ``restored``
(file and socket reads; for torpor the restored checkpoint's stored bytes).  The
background process is re-created by the first tick after a crash; that time is
``env_restore_ms``.  The harness is the supervisor, so it notices the death at once:
real deployments add their own detection delay on top.

Failures (an ``error`` event, a worker exiting early, a timeout) are results, not
exceptions: they are how the sweep finds the N at which a system breaks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.bench.stats import summary
from torpor.bench.thesis.env import CRASH_ARMED, bg_alive
from torpor.bench.thesis.peers.base import RunSpec, System
from torpor.bench.thesis.workload import Workload

PHASES = ("restart", "engine", "detect", "replay", "resume")
MARKERS = ("imported", "ready", "enter", "restored", "next")


class EventTail:
    """Reads ``events.jsonl`` incrementally (the worker appends whole lines)."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.events += new
        return new


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path


def worker_env(root: Path) -> dict[str, str]:
    """The environment of every worker (every system alike): Python's bytecode cache on,
    as in any installed package — ``PYTHONDONTWRITEBYTECODE`` dropped, the cache in a
    private ``PYTHONPYCACHEPREFIX`` under the sweep's folder (the source tree is not
    touched), filled once by :func:`warm_bytecode`.  Without it a recovering worker
    compiled ≈ 70 of torpor's modules again on every start (≈ 150 ms at load 2),
    which no installed torpor pays (the peers' libraries in site-packages had their
    bytecode all along)."""
    pyc = root / ".pycache"
    pyc.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(pyc)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_bytecode(root: Path) -> None:
    """Compile torpor's sources into the workers' bytecode cache before the first run
    (``pip install`` does the same for an installed package)."""
    import torpor

    pkg = Path(torpor.__file__).parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(pkg)],
        env=worker_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,  # a module that does not compile fails in the worker, with its error
    )


def _start_worker(spec: RunSpec, tag: str) -> Worker:
    path = spec.dir / f"spec-{tag}.json"
    path.write_text(json.dumps(spec.to_dict()))
    log = spec.dir / f"worker-{tag}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torpor.bench.thesis.worker", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=worker_env(Path(spec.run_dir).parent),
        )
    return Worker(proc, log)


def _rss_mib(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (None if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _kill_group(w: Worker) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(w.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        w.proc.wait(timeout=10)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class _Wait:
    event: dict[str, Any] | None = None  # the awaited event, or an error event
    failure: str | None = None


def _wait_for(tail: EventTail, w: Worker, names: set[str], deadline: float) -> _Wait:
    while True:
        for e in tail.poll():
            if e["ev"] == "error":
                return _Wait(e, f"{e['type']}: {e['msg']}")
            if e["ev"] in names:
                return _Wait(e)
        if w.proc.poll() is not None:
            tail.poll()
            for e in tail.events:
                if e["ev"] in names and e["pid"] == w.proc.pid:
                    return _Wait(e)
            return _Wait(None, f"worker exited with {w.proc.returncode}: {_tail(w.log)}")
        if time.monotonic() > deadline:
            last = [e for e in tail.events if e["ev"] in ("turn", "first_step")]
            where = f" (last turn finished: {last[-1].get('turn')})" if last else ""
            return _Wait(None, f"timeout{where}")
        time.sleep(0.005)


def run_one(
    system: System,
    conn: dict[str, Any],
    w: Workload,
    root: Path,
    crash: bool = True,
    timeout: float = 600.0,
    keep: bool = False,
) -> dict[str, Any]:
    """One session of ``w.turns`` turns, crashed at turn N-1 when ``crash``."""
    sid = f"{system.name}-{uuid.uuid4().hex[:10]}"
    run_dir = root / sid
    run_dir.mkdir(parents=True)
    crash = crash and system.crashes and w.turns >= 2
    spec = RunSpec(
        system=system.name,
        workload=w.to_dict(),
        run_dir=str(run_dir),
        session_id=sid,
        crash_turn=w.turns - 1 if crash else -1,
        conn=conn,
    )
    res: dict[str, Any] = {
        "system": system.name,
        "workload": w.to_dict(),
        "ok": False,
        "failure": None,
        "crashed": False,
    }
    workers: list[Worker] = []
    t_start = time.monotonic()
    deadline = t_start + timeout
    try:
        system.prepare(spec)
        if crash:
            (run_dir / CRASH_ARMED).touch()
        tail = EventTail(run_dir / "events.jsonl")
        workers.append(_start_worker(spec, "1"))
        got = _wait_for(tail, workers[0], {"crash", "done"}, deadline)
        if got.failure:
            res["failure"] = got.failure
            return res
        done = got.event
        if crash:
            assert done is not None and done["ev"] == "crash", done
            rss = _rss_mib(workers[0].proc.pid)  # a bigger process takes longer to die
            t_kill = time.monotonic()
            _kill_group(workers[0])
            system.kill_extra(spec)
            res["kill_ms"] = (time.monotonic() - t_kill) * 1000
            res["killed_rss_mib"] = rss
            res["crashed"] = True
            (run_dir / CRASH_ARMED).unlink()
            spec.recovering = True
            workers.append(_start_worker(spec, "2"))
            got = _wait_for(tail, workers[1], {"done"}, deadline)
            if got.failure:
                res["failure"] = "after recovery: " + got.failure
                res["recovery"] = _phases(tail.events, workers[1].proc.pid, t_kill)
                return res
            done = got.event
            res["recovery"] = _phases(tail.events, workers[1].proc.pid, t_kill)
            if system.socket_io():
                res["recovery"]["bytes_read"] = None  # read over a socket: not counted
        assert done is not None
        first_pid = workers[0].proc.pid
        tev = [e for e in tail.events if e["ev"] == "turn" and e["pid"] == first_pid]
        res["turn_ms"] = summary([e["ms"] for e in tev]) if tev else None
        # turn end to turn end: also what the engine does between two turns
        wall = [(b["t"] - a["t"]) * 1000 for a, b in itertools.pairwise(tev)]
        res["turn_wall_ms"] = summary(wall) if wall else None
        if len(wall) >= 20:  # does a turn get slower as the session grows?
            k = max(len(wall) // 10, 1)
            res["turn_wall_first_ms"] = summary(wall[:k])["p50"]
            res["turn_wall_last_ms"] = summary(wall[-k:])["p50"]
        res["run_s"] = time.monotonic() - t_start
        res["checks"] = _checks(system, spec, w, done["hash"], tail.events, crash)
        res["storage"] = system.storage(spec)
        if res["storage"].get("bytes") is not None:
            res["storage"]["per_turn"] = res["storage"]["bytes"] / max(w.turns, 1)
        res["ok"] = all(v for k, v in res["checks"].items() if k.endswith("_ok"))
        return res
    except Exception as e:  # a broken system must not stop the sweep
        res["failure"] = f"harness: {type(e).__name__}: {e}"
        return res
    finally:
        for wk in workers:
            if wk.proc.poll() is None:
                _kill_group(wk)
        with contextlib.suppress(Exception):
            system.kill_extra(spec)
        pid = bg_alive(run_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            system.drop(spec)
        if res["failure"]:
            res["worker_log"] = "".join(_tail(wk.log, 800) for wk in workers)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _phases(events: list[dict[str, Any]], pid: int, t_kill: float) -> dict[str, Any]:
    mine = {}
    for e in events:
        if e["pid"] == pid and e["ev"] not in mine:
            mine[e["ev"]] = e
    out: dict[str, Any] = {}
    prev = t_kill
    for phase, marker in zip(PHASES, MARKERS, strict=True):
        t = mine.get(marker, {}).get("t")
        if t is None:
            out[f"{phase}_ms"] = None
            continue
        t = max(t, prev)
        out[f"{phase}_ms"] = (t - prev) * 1000
        prev = t
    nxt = mine.get("next", {}).get("t")
    out["total_ms"] = (nxt - t_kill) * 1000 if nxt is not None else None
    enter, restored = mine.get("enter", {}), mine.get("restored", {})
    if "bytes_read" in restored:
        out["bytes_read"] = restored["bytes_read"]
    elif "rchar" in enter and "rchar" in restored:
        out["bytes_read"] = restored["rchar"] - enter["rchar"]
    bg = mine.get("bg_restarted")
    out["env_restore_ms"] = bg["ms"] if bg else (mine.get("restored", {}).get("env_ms"))
    out["rerun_seen"] = "rerun" in mine
    # a system's own breakdown of its recovery (events named x_*), kept as sent
    for name, e in mine.items():
        if name.startswith("x_"):
            out[name[2:]] = {k: v for k, v in e.items() if k not in ("ev", "pid", "t")}
    return out


def _checks(
    system: System,
    spec: RunSpec,
    w: Workload,
    got_hash: str,
    events: list[dict[str, Any]],
    crashed: bool,
) -> dict[str, Any]:
    seen = system.inspect(spec)
    want_files = w.expected_workspace()
    journal = seen["journal"]
    dup = len(journal) - len(set(journal))
    c: dict[str, Any] = {
        "messages_ok": got_hash == w.expected_hash(),
        "workspace_ok": seen["files"] == want_files,
        "workspace_files_bad": sorted(
            k
            for k in set(want_files) | set(seen["files"])
            if want_files.get(k) != seen["files"].get(k)
        ),
        "side_effects_twice": dup,
        "twice_turns": sorted({t for t in journal if journal.count(t) > 1}, key=int),
        "journal_ok": journal == [str(t) for t in range(w.turns)],
        "bg_alive": seen["bg_alive"],
        "bg_counter": seen["counter"],
        "bg_counter_expected": w.turns,
        "bg_lost": any(e["ev"] == "bg_lost" for e in events),
    }
    # a finding, not a harness failure: peers lose the process in a crash
    c["bg_kept"] = seen["bg_alive"] and seen["counter"] == w.turns
    if crashed:
        c["recovered_ok"] = any(e["ev"] == "next" for e in events)
    return c


# -- the sweep ------------------------------------------------------------------------


@dataclass
class Plan:
    turns: list[int]
    sizes: list[tuple[int, int]]  # (model_bytes, tool_bytes)
    trials: int = 1
    tools: int = 2
    every: list[int] = field(default_factory=lambda: [0])
    styles: list[str] = field(default_factory=lambda: ["delta", "full"])
    timeout: float = 600.0
    #: stop growing N for a system once one run took longer than this
    budget_s: float = 900.0


def sweep(
    systems: Iterable[System],
    plan: Plan,
    root: Path,
    progress: Callable[[str], None] = lambda m: None,
    keep: bool = False,
    checkpoint: Callable[[dict[str, Any]], None] = lambda r: None,
) -> dict[str, Any]:
    """Every system in turn (one at a time); ``checkpoint(result)`` after each point,
    so an interrupted sweep keeps what it measured."""
    out: dict[str, Any] = {"systems": {}, "points": []}
    warm_bytecode(root)
    for system in systems:
        status = system.missing()
        info = {"family": system.family, "notes": system.notes, "status": status or "ok"}
        out["systems"][system.name] = info
        if status:
            progress(f"{system.name}: {status}")
            continue
        try:
            conn = system.setup(root)
        except Exception as e:
            info["status"] = f"setup failed: {type(e).__name__}: {e}"
            progress(f"{system.name}: {info['status']}")
            with contextlib.suppress(Exception):
                system.teardown()
            continue
        try:
            _sweep_system(
                system, conn, plan, root, out["points"], progress, keep, lambda: checkpoint(out)
            )
        finally:
            system.teardown()
    return out


def _sweep_system(
    system: System,
    conn: dict[str, Any],
    plan: Plan,
    root: Path,
    points: list[dict[str, Any]],
    progress: Callable[[str], None],
    keep: bool,
    saved: Callable[[], None],
) -> None:
    styles = [s for s in plan.styles if s in system.styles] or [system.styles[0]]
    everys = [e for e in plan.every if e == 0 or system.every]
    for style in styles:
        for every in everys:
            for m, t in plan.sizes:
                broken: str | None = None
                for n in sorted(plan.turns):
                    if every and every >= n:
                        continue
                    w = Workload(
                        turns=n,
                        model_bytes=m,
                        tool_bytes=t,
                        tools=plan.tools,
                        style=style,
                        every=every,
                    )
                    point = {"system": system.name, **w.to_dict(), "runs": []}
                    points.append(point)
                    if broken:
                        point["skipped"] = broken
                        continue
                    for trial in range(plan.trials):
                        progress(
                            f"{system.name} {style} every={every} M={m} T={t} "
                            f"N={n} trial {trial + 1}/{plan.trials}"
                        )
                        r = run_one(system, conn, w, root, timeout=plan.timeout, keep=keep)
                        point["runs"].append(r)
                        if r["failure"]:
                            broken = f"failed at N={n}"
                            progress(f"  failed: {r['failure'][:300]}")
                            break
                        if r.get("run_s", 0) > plan.budget_s:
                            broken = f"over the time budget at N={n} ({r['run_s']:.0f} s)"
                    _aggregate(point)
                    saved()


def _aggregate(point: dict[str, Any]) -> None:
    runs = [r for r in point["runs"] if not r["failure"]]
    fails = [r for r in point["runs"] if r["failure"]]
    if fails:
        point["failure"] = fails[0]["failure"]
    if not runs:
        return
    agg: dict[str, Any] = {"trials": len(runs), "ok": all(r["ok"] for r in runs)}
    rec = [r["recovery"] for r in runs if r.get("recovery")]
    for key in ("total_ms", *(f"{p}_ms" for p in PHASES), "bytes_read", "env_restore_ms"):
        vals = [x[key] for x in rec if x.get(key) is not None]
        if vals:
            agg[f"recovery_{key}" if key != "total_ms" else "recovery_ms"] = summary(vals)
    turn = [r["turn_ms"]["p50"] for r in runs if r.get("turn_ms")]
    if turn:
        agg["turn_ms"] = summary(turn)
    for key in ("turn_wall_ms",):
        vals = [r[key]["p50"] for r in runs if r.get(key)]
        if vals:
            agg[key] = summary(vals)
    for key in ("turn_wall_first_ms", "turn_wall_last_ms"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            agg[key] = summary(vals)
    sto = [r["storage"]["bytes"] for r in runs if r.get("storage", {}).get("bytes") is not None]
    if sto:
        agg["storage_bytes"] = summary(sto)
    first = runs[0]["checks"]
    agg["checks"] = {k: v for k, v in first.items() if k != "workspace_files_bad"}
    agg["checks"]["all_trials_ok"] = agg["ok"]
    # the worst trial speaks for the point: a duplicate in any trial is a duplicate
    agg["checks"]["side_effects_twice"] = max(r["checks"]["side_effects_twice"] for r in runs)
    agg["checks"]["workspace_ok"] = all(r["checks"]["workspace_ok"] for r in runs)
    agg["checks"]["messages_ok"] = all(r["checks"]["messages_ok"] for r in runs)
    agg["failed_trials"] = sum(not r["ok"] for r in runs)
    point["agg"] = agg

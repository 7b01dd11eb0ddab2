"""``GET /metrics``: Prometheus text format (version 0.0.4), per namespace.

Two kinds of numbers:

- **events** this server process saw, kept in memory since it started: turn latency
  (a histogram, observed around ``Session.send``), checkpoint pause and durable ms,
  restore ms (``vm`` entries: create/recover/fork/vm lost) and resume ms.  They are
  fed by :func:`observer`, the ``on_event`` hook of every Session the routes open,
  so they count what the server did, not what another process did to the same home;
  a restart starts them at zero (counters, as Prometheus expects).
- **state**, read from the homes at scrape time: sessions by status, VMs running,
  stored bytes of the sessions' own checkpoints.  Reading every session's log is not
  free, so one scrape's answer is kept for :data:`STATE_TTL` seconds — or until this process
changes a session of that namespace (:func:`invalidate`).

Who sees what: without tokens (one local user) everything; with tokens a request
needs one, and a token of namespace ``default`` (the server's own home: the
operator) sees every namespace while any other token sees only its own — a tenant
never learns another tenant's name or load.

``prometheus_client`` is not a dependency of torpor: the text format is a few lines
(``# HELP``/``# TYPE`` headers, ``name{labels} value``; histograms as cumulative
``_bucket{le=...}`` plus ``_sum`` and ``_count``).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from torpor.server.deps import TenantDep
from torpor.server.tenancy import DEFAULT, namespace_paths, namespaces

router = APIRouter()

#: Seconds one scrape's view of sessions and VMs is reused.
STATE_TTL = 5.0
#: Histogram buckets, seconds (turns) and milliseconds (pauses, restores).
TURN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: +Inf only
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1


class Registry:
    """The in-memory event metrics of this process: (metric, namespace) → histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hist: dict[tuple[str, str], Histogram] = {}
        self.turn_errors: dict[str, int] = defaultdict(int)

    def observe(self, metric: str, ns: str, value: float) -> None:
        buckets = TURN_BUCKETS if metric == "turn_seconds" else MS_BUCKETS
        with self._lock:
            h = self.hist.get((metric, ns))
            if h is None:
                h = self.hist[(metric, ns)] = Histogram(buckets)
            h.observe(value)

    def turn_failed(self, ns: str) -> None:
        with self._lock:
            self.turn_errors[ns] += 1


REGISTRY = Registry()

HELP = {
    "turn_seconds": "Latency of a session turn (Session.send through the API), seconds.",
    "checkpoint_pause_ms": "VM pause of a checkpoint, milliseconds.",
    "checkpoint_durable_ms": "Time until a checkpoint was durable, milliseconds.",
    "restore_ms": "Restoring a session's VM from a checkpoint (create/recover/fork), ms.",
    "resume_ms": "Waking a hibernated session's VM, milliseconds.",
}


def observer(ns: str) -> Callable[[Any], None]:
    """An ``on_event`` hook feeding :data:`REGISTRY` from the entries a session appends."""

    def on_event(e: Any) -> None:
        kind = getattr(e.kind, "value", e.kind)
        p = e.payload
        if kind in CHANGES_STATE:
            invalidate(ns)
        try:
            if kind == "checkpoint":
                REGISTRY.observe("checkpoint_pause_ms", ns, float(p.get("pause_ms", 0)))
                REGISTRY.observe("checkpoint_durable_ms", ns, float(p.get("durable_ms", 0)))
            elif kind == "vm" and p.get("reason") != "create" and "ms" in p:
                REGISTRY.observe("restore_ms", ns, float(p["ms"]))
            elif kind == "resume" and "ms" in p:
                REGISTRY.observe("resume_ms", ns, float(p["ms"]))
        except (TypeError, ValueError):
            pass  # a number the log did not have: no sample, never a failed turn

    return on_event


# -- state, read at scrape time ------------------------------------------------------------

_state_lock = threading.Lock()
_state: dict[str, tuple[float, dict[str, Any]]] = {}
#: Entry kinds after which a namespace's cached state is stale (a VM came or went).
CHANGES_STATE = frozenset({"vm", "checkpoint", "hibernate", "resume", "removed"})


def invalidate(ns: str) -> None:
    """Forget ``ns``'s cached state: this process just changed a session or VM there."""
    with _state_lock:
        _state.pop(ns, None)


def _read_state(paths: Any) -> dict[str, Any]:
    from torpor.session import Session
    from torpor.vmm.manager import VMManager
    from torpor.vmm.state import Status

    by_status: dict[str, int] = defaultdict(int)
    stored = 0
    sessions = Session.list(paths=paths)
    try:
        for s in sessions:
            try:
                by_status[s.status()] += 1
                stored += int(s.stats()["snapshot_bytes"])
            except Exception:  # an edited log: counted, never a failed scrape
                by_status["broken"] += 1
    finally:
        for s in sessions:
            s.close()
    running = sum(1 for vm in VMManager(paths).list() if vm.state.status == Status.RUNNING)
    return {"sessions": dict(by_status), "stored_bytes": stored, "vms_running": running}


def state_of(ns: str, paths: Any) -> dict[str, Any]:
    now = time.monotonic()
    with _state_lock:
        hit = _state.get(ns)
        if hit is not None and now - hit[0] < STATE_TTL:
            return hit[1]
    st = _read_state(paths)
    with _state_lock:
        _state[ns] = (time.monotonic(), st)
    return st


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(visible: list[str], states: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    p = "torpor_"
    with REGISTRY._lock:
        hists = {k: (h.buckets, list(h.counts), h.sum, h.n) for k, h in REGISTRY.hist.items()}
        errors = dict(REGISTRY.turn_errors)
    for metric, text in HELP.items():
        out += [f"# HELP {p}{metric} {text}", f"# TYPE {p}{metric} histogram"]
        for ns in visible:
            got = hists.get((metric, ns))
            if got is None:
                continue
            buckets, counts, total, n = got
            lab = f'namespace="{_esc(ns)}"'
            acc = 0
            for le, c in zip(buckets, counts, strict=False):
                acc += c
                out.append(f'{p}{metric}_bucket{{{lab},le="{le:g}"}} {acc}')
            out.append(f'{p}{metric}_bucket{{{lab},le="+Inf"}} {n}')
            out.append(f"{p}{metric}_sum{{{lab}}} {total:.6g}")
            out.append(f"{p}{metric}_count{{{lab}}} {n}")
    out += [
        f"# HELP {p}turn_errors_total Turns through the API that ended in an error.",
        f"# TYPE {p}turn_errors_total counter",
    ]
    out += [f'{p}turn_errors_total{{namespace="{_esc(ns)}"}} {errors.get(ns, 0)}' for ns in visible]
    out += [
        f"# HELP {p}sessions Sessions by status (active = running).",
        f"# TYPE {p}sessions gauge",
    ]
    for ns in visible:
        by, lab = states[ns]["sessions"], f'namespace="{_esc(ns)}"'
        for status in sorted({"running", "hibernated", "interrupted", *by}):
            out.append(f'{p}sessions{{{lab},status="{status}"}} {by.get(status, 0)}')
    out += [
        f"# HELP {p}stored_bytes Bytes the sessions' own checkpoints added to the store.",
        f"# TYPE {p}stored_bytes gauge",
    ]
    for ns in visible:
        out.append(f'{p}stored_bytes{{namespace="{_esc(ns)}"}} {states[ns]["stored_bytes"]}')
    out += [f"# HELP {p}vms_running VMs running.", f"# TYPE {p}vms_running gauge"]
    for ns in visible:
        out.append(f'{p}vms_running{{namespace="{_esc(ns)}"}} {states[ns]["vms_running"]}')
    return "\n".join(out) + "\n"


@router.get(
    "/metrics",
    tags=["system"],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(request: Request, t: TenantDep) -> PlainTextResponse:
    home = request.app.state.config.home
    visible = namespaces(home) if t.namespace == DEFAULT else [t.namespace]
    states = {ns: state_of(ns, namespace_paths(home, ns)) for ns in visible}
    return PlainTextResponse(
        render(visible, states), media_type="text/plain; version=0.0.4; charset=utf-8"
    )

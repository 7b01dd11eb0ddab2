"""What the dashboard shows, as plain dicts for the templates: read-only library calls.

Every function takes the tenant's :class:`~torpor.paths.Paths` and reads only that
home, so a page can never show another namespace's resource.  Nothing here writes.

Invariants:

- Everything a guest, a model or a user wrote (names, messages, tool output, console
  bytes, labels, tags) reaches the templates as plain ``str`` and is escaped there
  (Jinja2 autoescape); no value built here is marked safe.
- One bad record never hides the others: an unreadable session, a damaged snapshot
  manifest or a log entry of an unexpected shape becomes a row or item that says so.
- Guest text is bounded before it is rendered (:data:`MAX_TEXT`, :data:`CONSOLE_TAIL`),
  so a hostile tool result cannot make a page megabytes long.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torpor.context import ChainError, Entry, Kind, superseded
from torpor.errors import TorporError
from torpor.fsutil import locked
from torpor.paths import Paths

#: Longest text of one transcript field shown inline (the raw toggle has the rest).
MAX_TEXT = 20_000
#: Bytes of the console log shown on a sandbox page (its tail).
CONSOLE_TAIL = 32 * 1024
#: Transcript blocks a session page shows by default (the newest; "show all" has the rest).
MAX_BLOCKS = 300
#: Sessions shown in one list (search narrows it).
MAX_ROWS = 500
STATUSES = ("running", "working", "hibernated", "interrupted", "stopped", "failed", "broken")


def host() -> str:
    return socket.gethostname()


def clip(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters; see raw)"


def _s(v: Any) -> str:
    """Any payload value as display text (a hostile payload may put anything anywhere)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(v)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def busy(paths: Paths, session_id: str) -> bool:
    """Whether some process is running a turn (or another change) of this session now.

    Probes the session lock the library holds for every state-changing call (see
    ``Session._locked``); the probe holds it for microseconds only.  It is asked only
    about sessions whose log shows an open turn: if that turn's actor is alive the probe
    fails without taking the lock; if it crashed, a ``send(wait=False)`` that races the
    probe's microseconds gets a 409 and can retry.
    """
    try:
        with locked(paths.locks / f"session-{session_id}.lock", wait=False):
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


# -- sessions ---------------------------------------------------------------------------


def session_row(s: Any) -> dict[str, Any]:
    """One row of the sessions table (what ``torpor session ls`` shows, and more)."""
    rec = s.record
    row: dict[str, Any] = {
        "id": s.id,
        "name": s.name,
        "model": _s(rec.meta.get("model")),
        "image": _s(rec.meta.get("image")),
        "parent": rec.parent_id,
        "parent_seq": rec.parent_seq,
        "created": rec.created_at,
        "host": host(),
        "turns": 0,
        "entries": 0,
        "checkpoints": 0,
        "stored": 0,
        "last_active": rec.created_at,
        "vm": "",
        "vm_id": "",
    }
    try:
        st = s.state()
        stats = s.stats()
        vm = s.vm()
        status = s.status()
        if status == "interrupted" and busy(s.paths, s.id):
            status = "working"  # a user entry without its checkpoint yet: a turn in progress
        row.update(
            status=status,
            turns=st.turns,
            entries=st.last_seq,
            checkpoints=len(st.checkpoints),
            stored=stats["snapshot_bytes"],
            last_active=s.last_active(),
            vm=vm.name if vm else "",
            vm_id=vm.id if vm else "",
        )
    except ChainError:
        row["status"] = "broken"  # an edited log: `torpor session verify` names the entries
    return row


def list_sessions(paths: Paths, q: str = "", status: str = "") -> tuple[list[dict[str, Any]], int]:
    """Rows matching ``q`` (name, id, model or image substring) and ``status``, most
    recently active first; and how many sessions there are in all."""
    from torpor.session import Session

    sessions = Session.list(paths=paths)
    try:
        rows = [session_row(s) for s in sessions]
    finally:
        for s in sessions:
            s.close()
    total = len(rows)
    needle = q.strip().lower()
    if needle:
        rows = [
            r
            for r in rows
            if any(needle in str(r[k]).lower() for k in ("name", "id", "model", "image"))
        ]
    if status:
        rows = [r for r in rows if r["status"] == status]
    rows.sort(key=lambda r: -float(r["last_active"]))
    return rows[:MAX_ROWS], total


def children_of(paths: Paths, session_id: str) -> list[dict[str, Any]]:
    """Sessions forked from this one: name, id, fork point."""
    from torpor.context import open_log

    with open_log(None, paths=paths) as log:
        return [
            {"id": r.id, "name": r.name, "at": r.parent_seq, "created": r.created_at}
            for r in log.list_sessions()
            if r.parent_id == session_id
        ]


@dataclass
class Item:
    """One transcript block."""

    seq: int
    turn: int
    kind: str  # user, answer, tool_call, tool_result, error, checkpoint, event, other
    time: float
    superseded: bool
    raw: str
    data: dict[str, Any]


def _raw(e: Entry) -> str:
    body = {"seq": e.seq, "turn": e.turn, "kind": e.kind.value, "payload": e.payload}
    return clip(json.dumps(body, indent=2, ensure_ascii=False))


def _args(v: Any) -> list[tuple[str, str]]:
    if not isinstance(v, dict):
        return [("", clip(_s(v)))]
    return [(_s(k), clip(_s(val))) for k, val in v.items()]


def _item_data(e: Entry) -> tuple[str, dict[str, Any]] | None:
    p = e.payload
    k = e.kind
    if k is Kind.USER:
        return "user", {"text": clip(_s(p.get("content")))}
    if k is Kind.MODEL_REQUEST:
        return None  # its response carries the latency; the raw view of that shows both
    if k is Kind.MODEL_RESPONSE:
        usage = p.get("usage") if isinstance(p.get("usage"), dict) else {}
        calls = p.get("tool_calls") if isinstance(p.get("tool_calls"), list) else []
        return "answer", {
            "text": clip(_s(p.get("text"))),
            "calls": [_s(c.get("name")) for c in calls if isinstance(c, dict)],
            "ms": _num(p.get("latency_ms")),
            "tokens_in": _num(usage.get("input_tokens")),
            "tokens_out": _num(usage.get("output_tokens")),
            "model": _s(p.get("model")),
        }
    if k is Kind.TOOL_CALL:
        return "tool_call", {"name": _s(p.get("name")), "args": _args(p.get("arguments"))}
    if k is Kind.TOOL_RESULT:
        return "tool_result", {
            "name": _s(p.get("name")),
            "text": clip(_s(p.get("content"))),
            "error": bool(p.get("is_error")),
            "exit_code": _num(p.get("exit_code")),
            "ms": _num(p.get("ms")),
            "truncated": bool(p.get("truncated")),
        }
    if k is Kind.ERROR:
        return "error", {"stage": _s(p.get("stage")), "text": clip(_s(p.get("error")))}
    if k is Kind.CHECKPOINT:
        return "checkpoint", {
            "snapshot": _s(p.get("snapshot")),
            "reason": _s(p.get("reason")),
            "stored": _num(p.get("stored_bytes")) or 0,
            "pause_ms": _num(p.get("pause_ms")),
            "durable_ms": _num(p.get("durable_ms")),
            "durability": _s(p.get("durability")),  # bucket / local, upload pending / local
        }
    if k is Kind.CUSTOM:
        return "other", {"title": _s(p.get("type")) or "custom", "text": clip(_s(p.get("data")))}
    from torpor.session.text import describe

    try:
        text = describe(e)
    except (KeyError, TypeError, ValueError, AttributeError):
        text = e.kind.value
    return "event", {"title": e.kind.value, "text": clip(text)}


def transcript(entries: Iterable[Entry], gone: set[int]) -> list[Item]:
    """The log as readable blocks; ``gone``: superseded seqs (shown struck through)."""
    out: list[Item] = []
    for e in entries:
        try:
            got = _item_data(e)
        except (KeyError, TypeError, ValueError, AttributeError):
            got = "other", {"title": e.kind.value, "text": "(an entry of an unexpected shape)"}
        if got is None:
            continue
        kind, data = got
        out.append(Item(e.seq, e.turn, kind, e.created_at, e.seq in gone, _raw(e), data))
    return out


def session_detail(s: Any, show_all: bool = False) -> dict[str, Any]:
    """Everything the session page shows: the last :data:`MAX_BLOCKS` transcript blocks
    (all of them with ``show_all``)."""
    entries = s.log()
    row = session_row(s)
    st = s.state()
    parent_seq = s.record.parent_seq or 0
    blocks = transcript(entries, superseded(entries))
    hidden = 0 if show_all else max(0, len(blocks) - MAX_BLOCKS)
    return {
        "row": row,
        "meta": {k: _s(v) for k, v in s.record.meta.items() if k != "system"},
        "system": clip(_s(s.record.meta.get("system"))),
        "blocks": blocks[hidden:],
        "hidden": hidden,
        "last_seq": entries[-1].seq if entries else 0,
        "checkpoints": [
            {
                "seq": c.seq,
                "turn": c.turn,
                "reason": c.reason,
                "snapshot": c.snapshot,
                "stored": c.stored_bytes,
                "pause_ms": c.pause_ms,
                "durable_ms": c.durable_ms,
                "time": c.created_at,
                "inherited": c.seq <= parent_seq,
            }
            for c in st.checkpoints
        ],
        "children": children_of(s.paths, s.id),
    }


# -- sandboxes --------------------------------------------------------------------------


def _jail_line(vm: Any) -> str:
    from torpor.vmm.jail import describe, summary

    try:
        return summary(describe(vm.dir))
    except (OSError, ValueError, TypeError, AttributeError):
        return "unknown"


def vm_row(vm: Any) -> dict[str, Any]:
    from torpor.session.core import LABEL
    from torpor.vmm.qemu import ISOLATION

    st = vm.state
    c = vm.config
    return {
        "id": vm.id,
        "name": vm.name,
        "image": c.image_ref,
        "status": st.status.value,
        "accel": st.accel or "",
        "isolation": ISOLATION.get(st.accel, "") if st.accel else "",
        "jail": _jail_line(vm),
        "memory_mib": c.memory_mib,
        "cpus": c.cpus,
        "created": c.created,
        "started": st.started_at,
        "exit_code": st.exit_code,
        "error": st.error,
        "io_error": st.io_error,
        "command": " ".join(c.command),
        "labels": sorted((k, v) for k, v in c.labels.items() if k != LABEL),
        "session": c.labels.get(LABEL, ""),
        "ports": [str(p) for p in c.ports],
    }


def vm_sessions(paths: Paths) -> dict[str, tuple[str, str]]:
    """VM id -> (session id, name) of the session the log says runs in it (a fork's VM
    carries no session label: restores do not copy torpor's own labels)."""
    from torpor.session import Session

    out: dict[str, tuple[str, str]] = {}
    sessions = Session.list(paths=paths)
    try:
        for s in sessions:
            with contextlib.suppress(ChainError):
                vm_id = s.state().vm_id
                if vm_id:
                    out[vm_id] = (s.id, s.name)
    finally:
        for s in sessions:
            s.close()
    return out


def _with_session(row: dict[str, Any], owners: dict[str, tuple[str, str]]) -> dict[str, Any]:
    sid, name = owners.get(row["id"], (row["session"], ""))
    row.update(session=sid, session_name=name)
    return row


def list_vms(paths: Paths) -> list[dict[str, Any]]:
    from torpor.vmm.manager import VMManager

    owners = vm_sessions(paths)
    rows = [_with_session(vm_row(vm), owners) for vm in VMManager(paths).list(all=True)]
    rows.sort(key=lambda r: -float(r["created"]))
    return rows


def vm_detail(paths: Paths, ref: str) -> dict[str, Any]:
    """One VM and the tail of its console (NotFoundError if this home has none)."""
    from torpor.vmm.manager import VMManager

    mgr = VMManager(paths)
    vm = mgr.get(ref)
    console = b""
    with contextlib.suppress(OSError, TorporError):
        console = mgr.console(vm.id)[-CONSOLE_TAIL:]
    out: list[bytes] = []
    with contextlib.suppress(OSError, TorporError):
        from torpor.vmm.query import log_records

        out = [d for _, _, d in log_records(mgr, vm.id, follow=False, tail=200, since=None)]
    output = b"".join(out)[-CONSOLE_TAIL:]
    return {
        "vm": _with_session(vm_row(vm), vm_sessions(paths)),
        "console": console.decode("utf-8", errors="replace"),
        "output": output.decode("utf-8", errors="replace"),
    }


# -- snapshots --------------------------------------------------------------------------


def _checkpoint_index(
    paths: Paths,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """snapshot id -> the session checkpoints naming it (session name, seq, stored),
    and snapshot id -> the sessions forked from it."""
    from torpor.context import open_log

    out: dict[str, list[dict[str, Any]]] = {}
    forks: dict[str, list[dict[str, Any]]] = {}
    with open_log(None, paths=paths) as log:
        for r in log.list_sessions():
            for e in log.own_entries(r.id, Kind.FORK):
                snap = e.payload.get("snapshot")
                if isinstance(snap, str):
                    forks.setdefault(snap, []).append({"session": r.id, "name": r.name})
            for e in log.own_entries(r.id, Kind.CHECKPOINT):
                snap = e.payload.get("snapshot")
                if isinstance(snap, str):
                    out.setdefault(snap, []).append(
                        {
                            "session": r.id,
                            "name": r.name,
                            "seq": e.seq,
                            "stored": _num(e.payload.get("stored_bytes")),
                        }
                    )
    return out, forks


def lineage(paths: Paths) -> dict[str, Any]:
    """The snapshot tree (parents, children, forks, sizes) and the session fork tree."""
    from torpor.store.home import home_store

    store = home_store(paths)  # with a bucket: the bucket's snapshots, not the cache's
    good, bad = store.scan()
    used, forked = _checkpoint_index(paths)
    nodes: dict[str, dict[str, Any]] = {}
    for m in good:
        try:
            vm = json.loads(m.meta.get("vm", "{}"))
        except (TypeError, ValueError):
            vm = {}
        vm = vm if isinstance(vm, dict) else {}
        sizes = {k: a.size for k, a in m.artifacts.items()}
        refs = used.get(m.id, [])
        nodes[m.id] = {
            "id": m.id,
            "parent": m.parent,
            "created": str(m.created)[:19].replace("T", " "),
            "tag": _s(m.meta.get("tag")),
            "vm": _s(vm.get("name")),
            "image": _s(vm.get("image_ref")),
            "memory": sizes.get("memory", 0),
            "disk": sizes.get("disk", 0),
            "stored": next((r["stored"] for r in refs if r["stored"] is not None), None),
            "sessions": refs,
            "forks": forked.get(m.id, []),
            "children": [],
        }
    roots: list[dict[str, Any]] = []
    for n in nodes.values():
        parent = nodes.get(n["parent"] or "")
        (parent["children"] if parent else roots).append(n)
    for n in nodes.values():
        # a fork point: a session was forked from it, or its children were taken from
        # more than one VM restored from it
        n["fork"] = bool(n["forks"]) or len({c["vm"] for c in n["children"]}) > 1
    sessions = _session_tree(paths)
    return {
        "chains": chains(roots, flatten=True),
        "count": len(nodes),
        "damaged": [(i, e.message) for i, e in bad],
        "sessions": sessions,
    }


def _session_tree(paths: Paths) -> list[list[dict[str, Any]]]:
    from torpor.context import open_log

    with open_log(None, paths=paths) as log:
        recs = log.list_sessions()
    nodes = {
        r.id: {
            "id": r.id,
            "name": r.name,
            "at": r.parent_seq,
            "parent": r.parent_id,
            "created": r.created_at,
            "children": [],
        }
        for r in recs
    }
    roots: list[dict[str, Any]] = []
    for r in recs:
        parent = nodes.get(r.parent_id or "")
        (parent["children"] if parent else roots).append(nodes[r.id])
    return chains(roots, flatten=False)


#: Deepest nesting of branches on the lineage page (deeper ones start at the top level).
MAX_DEPTH = 24


def chains(roots: list[dict[str, Any]], *, flatten: bool) -> list[list[dict[str, Any]]]:
    """Trees (nodes with ``children``) as chains for the page.  With ``flatten`` a node
    with one child continues its chain (a session's checkpoints form one long line, each
    the parent of the next); otherwise, and at every node with several children, each
    child starts a nested chain in the node's ``branches``.  Nesting stops at
    :data:`MAX_DEPTH`: deeper chains are listed at the top level, marked ``detached``
    (they name their parent), so neither this nor the template recurses with the length
    of a history."""
    top: list[list[dict[str, Any]]] = []
    seen: set[int] = set()
    todo: list[dict[str, Any]] = list(roots)

    def build(first: dict[str, Any], depth: int) -> list[dict[str, Any]]:
        chain: list[dict[str, Any]] = []
        n: dict[str, Any] | None = first
        while n is not None and id(n) not in seen:
            seen.add(id(n))
            chain.append(n)
            n["branches"] = []
            kids = n["children"]
            if flatten and len(kids) == 1:
                n = kids[0]
                continue
            for k in kids:
                if depth + 1 >= MAX_DEPTH:
                    k["detached"] = True
                    todo.append(k)
                else:
                    n["branches"].append(build(k, depth + 1))
            n = None
        return chain

    while todo:
        first = todo.pop(0)
        if id(first) not in seen:
            top.append(build(first, 0))
    return top


# -- storage ----------------------------------------------------------------------------


def storage(paths: Paths) -> dict[str, Any]:
    """``torpor system df`` rows, and the bytes each session's checkpoints stored."""
    from torpor.vmm.manager import VMManager
    from torpor.vmm.query import disk_usage

    rows = [
        {
            "kind": d.kind,
            "total": d.total,
            "active": d.active,
            "size": d.size,
            "reclaimable": d.reclaimable,
        }
        for d in disk_usage(VMManager(paths))
    ]
    sessions, _ = list_sessions(paths)
    by_session = sorted(
        ({"id": r["id"], "name": r["name"], "stored": r["stored"]} for r in sessions),
        key=lambda r: -int(r["stored"]),
    )
    return {
        "rows": rows,
        "total": sum(int(r["size"]) for r in rows),
        "sessions": by_session[:50],
        "at": time.time(),
    }

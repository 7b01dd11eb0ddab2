"""Failover: the sessions of a host that stopped heartbeating, brought back on this one.

Several hosts share one PostgreSQL context log and one bucket.  A running session is
held by one host through a lease in the log's database (``ContextLog.claim``); the
holder's heartbeats keep it alive.  When a holder dies (kill -9, power, partition)
its leases expire after the TTL and :func:`failover_once` on any other host:

1. heartbeats for this host (so it is listed alive: ``torpor hosts``);
2. for each expired lease (or each session named), decides from the log alone:

   - removed, hibernated, never started: nothing to run (a hibernated session belongs
     to no host; it wakes wherever its next message arrives) — ``skipped``;
   - custom tools: their code is not in the log, so this process cannot run the
     session's turns — ``skipped`` with that reason (recover it in a process that
     has the tools: ``Session.open(..., tools=...).recover()``);
3. claims the lease.  Exactly one host wins a race (the claim is one transaction;
   the loser gets LeaseHeldError and reports ``held``);
4. brings the session back exactly as a local recovery does —
   :meth:`Session.recover`: an interrupted turn is recovered (the VM restored from
   the last checkpoint, from the bucket, the partial work superseded, the user's
   message replayed: no side effect twice); with no open turn the VM is restored
   from the last checkpoint, so its background processes run on (``restored``).

The loop (:class:`Failover`, run by ``torpor serve``) adds a head start: once a host
misses a heartbeat, the one host that rendezvous hashing prefers for each of its
sessions (:func:`preferred`, computed alike everywhere) warms its cache with the
session's last snapshot (:func:`prefetch`, reads only) while the lease runs out,
passes again right at the expiry and claims first; the other hosts skip the session
for a grace period.  Skipped and failed sessions are looked at again after 2, 4, 8...
passes.

Invariants:

- The database decides who runs a session; this module never writes an entry
  itself — every entry comes from :class:`Session`, fenced with the lease's epoch,
  so a host that was only paused can never write after the takeover.
- One failing session never stops a pass: its outcome says ``failed: ...`` and the
  next passes (here, backing off, or elsewhere) try again.  The head start only
  orders the claims; it never decides them: if the preferred host is gone too, the
  others claim after the grace period.
- A host that comes back stops its local VMs of sessions it no longer holds
  (:func:`reap_stale`): those sessions run elsewhere from a checkpoint, and anything
  such a VM did after that checkpoint is not part of the session any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torpor import __version__
from torpor.cluster.host import Heartbeat, host_id, lease_ttl
from torpor.context import ContextLog, Kind, open_log
from torpor.errors import ConflictError, LeaseHeldError, NotFoundError
from torpor.paths import Paths

log = logging.getLogger("torpor.cluster")

#: outcomes of one session in a pass
RECOVERED = "recovered"  # an interrupted turn replayed here
RESTORED = "restored"  # no open turn: the VM restored here from the last checkpoint
RECLAIMED = "reclaimed"  # this host's own expired lease, its VM still running here
SKIPPED = "skipped"  # nothing to run here (reason in detail)
HELD = "held"  # another live host holds it (it won the race, or it never died)
FAILED = "failed"


#: suffix of the row a failover loop heartbeats beside its host's own (``<host>:failover``):
#: only hosts running the loop are preferred takers, and ``torpor hosts`` shows which
FAILOVER_MARK = ":failover"


def this_host(paths: Paths) -> str:
    """The host id sessions of ``paths`` claim their leases with."""
    return host_id(paths)


def host_info() -> dict[str, Any]:
    """What a heartbeat says about this host (shown by ``torpor hosts``)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "version": __version__}


@dataclass(frozen=True)
class Outcome:
    """What one pass did with one session."""

    session_id: str
    name: str
    outcome: str  # RECOVERED / RESTORED / RECLAIMED / SKIPPED / HELD / FAILED
    detail: str = ""
    from_host: str | None = None  # the lease's holder before (None: free or unknown)
    seconds: float = 0.0  # from opening the session to running here

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def failover_once(
    paths: Paths,
    ctx_log: ContextLog,
    *,
    dsn: str | None = None,
    sessions: Sequence[str] | None = None,
    exclude: Collection[str] = (),
    host: str | None = None,
    ttl: float | None = None,
    heartbeat: bool = True,
    on_event: Callable[[Any], None] | None = None,
) -> list[Outcome]:
    """One pass here, now: take over every session whose lease expired (or, with
    ``sessions``, those named: by name, id or id prefix) and bring each back.

    ``ctx_log`` is this home's context log (``dsn`` opens the sessions' own
    connections to the same database).  Returns one :class:`Outcome` per session
    looked at; never raises for one session's failure (NotFoundError/UsageError for
    a bad name in ``sessions`` are raised before anything is done)."""
    host = host or this_host(paths)
    ttl = lease_ttl() if ttl is None else ttl
    if heartbeat:
        ctx_log.heartbeat(host, host_info(), ttl)
    if sessions is None:
        targets = [
            (ls.session_id, ls.host)
            for ls in ctx_log.expired_leases()
            if ls.session_id not in exclude
        ]
    else:
        targets = []
        for ref in sessions:
            rec = ctx_log.get_session(ref)  # NotFoundError / UsageError: the caller's typo
            lease = ctx_log.lease(rec.id)
            targets.append((rec.id, lease.host if lease is not None else None))
    out = []
    renew = heartbeat and bool(targets)  # (no thread for the many passes with nothing to do)
    with _heartbeating(paths, dsn, host, ttl) if renew else contextlib.nullcontext():
        for sid, holder in targets:
            out.append(
                _logged(
                    _take_over(
                        paths, ctx_log, sid, holder, host=host, ttl=ttl, dsn=dsn, on_event=on_event
                    )
                )
            )
    return out


def _logged(res: Outcome) -> Outcome:
    level = logging.INFO if res.outcome in (SKIPPED, HELD) else logging.WARNING
    log.log(
        level,
        "failover: session %s (%s) from host %s: %s%s",
        res.name,
        res.session_id,
        res.from_host or "-",
        res.outcome,
        f" ({res.detail})" if res.detail else "",
    )
    return res


@contextlib.contextmanager
def _heartbeating(paths: Paths, dsn: str | None, host: str, ttl: float) -> Iterator[None]:
    """This host's leases renewed every ttl/3 while a pass runs (the process's one
    heartbeat thread, shared with its Sessions): a restore and a replayed turn can take
    longer than the TTL, and a lease claimed meanwhile must stay this host's."""
    token = object()
    beat = Heartbeat.hold(
        token,
        where=f"{dsn or ''}|{paths.root}",
        host=host,
        ttl=ttl,
        opener=lambda: open_log(dsn, paths=paths),
    )
    try:
        yield
    finally:
        beat.drop(token)


def _take_over(
    paths: Paths,
    ctx_log: ContextLog,
    sid: str,
    holder: str | None,
    *,
    host: str,
    ttl: float,
    dsn: str | None,
    on_event: Callable[[Any], None] | None,
) -> Outcome:
    from torpor.session import Session

    try:
        rec = ctx_log.get_session(sid)
    except NotFoundError:
        return Outcome(sid, sid[:12], SKIPPED, "removed", holder)
    name = rec.name
    lease = ctx_log.lease(sid)
    if lease is not None and lease.host not in (None, host) and lease.expires_at > ctx_log.now():
        left = lease.expires_at - ctx_log.now()
        return Outcome(sid, name, HELD, f"held by {lease.host} (live, {left:.0f} s left)", holder)
    tools = [t.get("name") for t in rec.meta.get("tools") or () if isinstance(t, dict)]
    if tools:
        return Outcome(
            sid,
            name,
            SKIPPED,
            f"needs custom tool(s) {', '.join(map(str, tools))}, whose code is not in the "
            "log: recover it in a process that supplies them",
            holder,
        )
    t0 = time.perf_counter()
    try:
        with Session.open(sid, paths=paths, dsn=dsn, on_event=on_event) as s:
            st = s.state()
            if not st.checkpoints:
                return Outcome(sid, name, SKIPPED, "never finished starting", holder)
            if st.hibernated and st.pending is None:
                _clear(ctx_log, sid, host, ttl)
                return Outcome(sid, name, SKIPPED, "hibernated: wakes on its next message", holder)
            try:
                ctx_log.claim(sid, host, ttl)  # exactly one host wins
            except LeaseHeldError as e:
                return Outcome(sid, name, HELD, f"held by {e.holder}", holder)
            answer = s.recover(wait=False, why=f"failover from {holder}" if holder else "failover")
            moved = s.state().vm_id != st.vm_id
    except LeaseHeldError as e:  # claimed by another host between our claim and the VM
        return Outcome(sid, name, HELD, f"held by {e.holder}", holder)
    except ConflictError as e:  # busy here (a turn running on this host) or fenced
        return Outcome(sid, name, HELD, str(e), holder)
    except Exception as e:  # one session's failure never stops a pass
        log.debug("failover of %s failed", sid, exc_info=True)
        return Outcome(sid, name, FAILED, f"{type(e).__name__}: {e}", holder)
    secs = round(time.perf_counter() - t0, 3)
    if answer is None and not moved:
        return Outcome(sid, name, RECLAIMED, "its VM still runs here", holder, secs)
    if answer is None:
        return Outcome(sid, name, RESTORED, "VM restored from the last checkpoint", holder, secs)
    return Outcome(sid, name, RECOVERED, "interrupted turn replayed", holder, secs)


def _clear(ctx_log: ContextLog, sid: str, host: str, ttl: float) -> None:
    """Release an expired lease of a session that needs no host (hibernated: its
    holder died between the hibernation and the release), so passes stop seeing it."""
    with contextlib.suppress(ConflictError, NotFoundError):
        lease = ctx_log.claim(sid, host, ttl)
        ctx_log.release(sid, host, lease.epoch)


def reap_stale(paths: Paths, ctx_log: ContextLog, *, host: str | None = None) -> list[str]:
    """Remove this home's VMs of sessions that moved on without it; returns their ids.

    A local VM is stale when a session's log names it (a ``vm`` entry) but a *later*
    ``vm`` entry names another VM, and this host does not hold the session's lease:
    another host restored the session from a checkpoint (failover), so this VM's
    machine is no longer the session's.  The VMs of removed sessions go too.  A VM
    whose ``vm`` entry is the last one is never touched (a local create or restore
    logs its VM only once it runs, so a VM not yet logged is not in any entry)."""
    from torpor.vmm.manager import VMManager

    host = host or this_host(paths)
    mgr = VMManager(paths)
    local = {vm.id for vm in mgr.list()}
    if not local:
        return []
    removed: list[str] = []
    for rec in ctx_log.list_sessions(include_removed=True):
        vms = [str(e.payload.get("vm")) for e in ctx_log.own_entries(rec.id, Kind.VM)]
        mine = local.intersection(vms)
        if not mine:
            continue
        if rec.removed:
            stale = mine
        else:
            lease = ctx_log.lease(rec.id)
            if lease is not None and lease.host == host:
                continue  # ours: a local recovery replaces its VMs itself
            stale = mine - {vms[-1]} if vms else set()
        for vm_id in sorted(stale):
            try:
                mgr.remove(vm_id, force=True)
            except NotFoundError:
                continue
            removed.append(vm_id)
            log.warning(
                "failover: removed VM %s of session %s (%s): the session runs elsewhere now",
                vm_id,
                rec.name,
                rec.id,
            )
    return removed


class Failover(threading.Thread):
    """The loop ``torpor serve`` runs on a PostgreSQL log: heartbeat this host, take
    over sessions of dead hosts, every ``interval`` seconds, for each home in
    ``homes()`` (the server's namespaces: each is a schema of its own).

    At start it removes the stale VMs this host left behind (:func:`reap_stale`), and
    again every ``reap_every`` seconds (a host that was paused, not killed, finds its
    sessions taken over when it resumes).  A daemon thread: stop it with
    :meth:`stop`; a pass cut by the process's exit is just an unfinished failover,
    which the next pass (here or on another host) does again."""

    def __init__(
        self,
        homes: Callable[[], Iterable[Paths]],
        *,
        dsn: str | None = None,
        ttl: float | None = None,
        interval: float | None = None,
        reap_every: float = 30.0,
        on_result: Callable[[Paths, Outcome], None] | None = None,
        on_event: Callable[[Paths], Callable[[Any], None] | None] | None = None,
    ) -> None:
        super().__init__(name="torpor-failover", daemon=True)
        self.homes = homes
        self.dsn = dsn
        self.ttl = lease_ttl() if ttl is None else ttl
        # at least three heartbeats per TTL, and expired leases seen within a second
        self.interval = interval if interval is not None else min(1.0, self.ttl / 4)
        self.reap_every = reap_every
        self.on_result = on_result
        self.on_event = on_event  # per home: the hook of the sessions it brings back
        self.results: list[tuple[str, Outcome]] = []  # (home root, outcome), newest last
        self._halt = threading.Event()
        self._logs: dict[str, ContextLog] = {}
        # a session skipped or failed is looked at again only after a growing number of
        # passes (2, 4, 8, ... up to ~5 min): not a restore attempt and a log line each
        self._backoff: dict[tuple[str, str], tuple[int, int]] = {}
        self.passes = 0  # loop iterations done
        # "<session id>@<lease epoch>" -> bytes warmed (-1: running)
        self.prefetched: dict[str, int] = {}
        self._warmer: Any = None  # one background prefetch at a time
        self._wake_in = float("inf")  # seconds until a late host's lease runs out

    def stop(self, timeout: float | None = 10) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

    def _log(self, paths: Paths) -> ContextLog:
        key = str(paths.root)
        if key not in self._logs:
            self._logs[key] = open_log(self.dsn, paths=paths)
        return self._logs[key]

    def run(self) -> None:
        last_reap = float("-inf")
        try:
            while not self._halt.is_set():
                reap = time.monotonic() - last_reap >= self.reap_every
                for paths in list(self.homes()):
                    if self._halt.is_set():
                        break
                    self._pass(paths, reap)
                if reap:
                    last_reap = time.monotonic()
                self.passes += 1
                wake, self._wake_in = self._wake_in, float("inf")
                self._halt.wait(max(0.0, min(self.interval, wake)))
        finally:
            for lg in self._logs.values():
                with contextlib.suppress(Exception):
                    lg.close()

    def _head_start(self, paths: Paths, ctx_log: ContextLog) -> set[str]:
        """Sessions of late hosts: the one host rendezvous hashing prefers for each
        warms its cache with the session's last snapshot while the lease runs out, and
        claims it first; the others leave it for a grace period (returned: skip now).
        A host is late once it missed a heartbeat (they come every TTL/3; none for half
        the TTL): a false alarm costs one download, a real one saves most of a cold
        restore's wait."""
        now, me = ctx_log.now(), this_host(paths)
        if len(me) + len(FAILOVER_MARK) <= 128:  # (a host id may be 128 long: then unmarked)
            ctx_log.heartbeat(me + FAILOVER_MARK, {"role": "failover loop"}, self.ttl)
        late_after = self.ttl / 2
        rows = ctx_log.hosts()
        on_time = [
            h.id.removesuffix(FAILOVER_MARK)
            for h in rows
            if h.id.endswith(FAILOVER_MARK) and now - h.heartbeat_at <= late_after
        ] + [me]  # hosts whose loop runs: a host without one would never claim
        late = {
            h.id
            for h in rows
            if not h.id.endswith(FAILOVER_MARK)
            and late_after < now - h.heartbeat_at <= 3 * self.ttl
        } - {me}
        grace = max(1.0, 2 * self.interval)
        skip = {
            ls.session_id
            for ls in ctx_log.expired_leases()
            if now - ls.expires_at < grace and preferred(ls.session_id, on_time) != me
        }
        if not late:
            return skip
        for rec in ctx_log.list_sessions():
            lease = ctx_log.lease(rec.id)
            if lease is None or lease.host not in late or lease.expires_at <= now:
                continue
            # look again right when it runs out, not up to a pass later
            self._wake_in = min(self._wake_in, lease.expires_at - now + 0.05)
            if self._warmer is not None and self._warmer.is_alive():
                continue
            tenure = f"{rec.id}@{lease.epoch}"  # a later failover needs a newer snapshot
            if preferred(rec.id, on_time) == me and tenure not in self.prefetched:
                self._warm(paths, rec.id, tenure)  # one at a time; the next pass looks again
        return skip

    def _warm(self, paths: Paths, sid: str, tenure: str) -> None:
        def run() -> None:
            try:
                with open_log(self.dsn, paths=paths) as lg:
                    self.prefetched[tenure] = prefetch(paths, lg, sid)
                log.info("failover: prefetched session %s's last snapshot", sid)
            except Exception as e:  # best effort: the restore fetches what is missing
                self.prefetched[tenure] = 0
                log.info("failover: prefetch of session %s failed: %s", sid, e)

        self.prefetched[tenure] = -1  # (in progress)
        while len(self.prefetched) > 1000:  # oldest first (dicts keep insertion order)
            del self.prefetched[next(iter(self.prefetched))]
        self._warmer = threading.Thread(target=run, name="torpor-prefetch", daemon=True)
        self._warmer.start()

    def _pass(self, paths: Paths, reap: bool) -> None:
        try:
            ctx_log = self._log(paths)
            if reap:
                reap_stale(paths, ctx_log)
            hook = self.on_event(paths) if self.on_event is not None else None
            root = str(paths.root)
            waiting = {
                sid for (r, sid), (_, at) in self._backoff.items() if r == root and at > self.passes
            }
            waiting |= self._head_start(paths, ctx_log)
            for res in failover_once(
                paths, ctx_log, dsn=self.dsn, ttl=self.ttl, on_event=hook, exclude=waiting
            ):
                key = (root, res.session_id)
                if res.outcome in (SKIPPED, FAILED):
                    n = self._backoff.get(key, (0, 0))[0] + 1
                    cap = max(1, int(300 / max(self.interval, 0.01)))
                    self._backoff[key] = (n, self.passes + min(2**n, cap))
                else:
                    self._backoff.pop(key, None)
                self.results.append((root, res))
                del self.results[:-1000]
                if self.on_result is not None:
                    self.on_result(paths, res)
        except Exception:
            # the database away for a moment: log, drop the connection, try next pass
            log.exception("failover pass on %s failed", paths.root)
            bad = self._logs.pop(str(paths.root), None)
            if bad is not None:
                with contextlib.suppress(Exception):
                    bad.close()


def preferred(session_id: str, hosts: Iterable[str]) -> str | None:
    """The host that takes ``session_id`` over first among ``hosts`` (rendezvous
    hashing: every host computes the same answer, and the sessions of a dead host
    spread evenly over the others).  The others wait a grace period before claiming,
    so the one that prefetched the session's snapshot is the one that restores it."""
    import hashlib

    def score(h: str) -> bytes:
        return hashlib.blake2b(f"{h}\0{session_id}".encode(), digest_size=8).digest()

    return max(hosts, key=score, default=None)


def prefetch(paths: Paths, ctx_log: ContextLog, session_id: str) -> int:
    """Warm this home's cache with the chunks of ``session_id``'s last checkpoint (its
    snapshot in the bucket); returns the bytes of the artifacts read, 0 when there is
    nothing to fetch (no bucket, no checkpoint).  Best effort, reads only: the restore
    that may follow checks everything again, and a failure here changes nothing."""
    import tempfile

    from torpor.store.home import home_store
    from torpor.store.tiered import TieredStore

    cks = ctx_log.own_entries(session_id, Kind.CHECKPOINT)
    if not cks:
        return 0
    snap = str(cks[-1].payload.get("snapshot") or "")
    paths.tmp.mkdir(parents=True, exist_ok=True)
    st = home_store(paths)
    try:
        if not snap or not isinstance(st, TieredStore):
            return 0
        m = st.get(snap)
        n = 0
        with tempfile.TemporaryDirectory(dir=paths.tmp) as tmp:
            for name, art in m.artifacts.items():
                dest = Path(tmp) / "a"
                st.materialize(art, dest, name=name, durable=False)  # fetches into the cache
                dest.unlink()
                n += art.size
        return n
    finally:
        st.close()


def host_rows(ctx_log: ContextLog) -> list[dict[str, Any]]:
    """``torpor hosts``: every host with its heartbeat age and the sessions it holds."""
    now = ctx_log.now()
    held: dict[str, list[str]] = {}
    for rec in ctx_log.list_sessions():
        lease = ctx_log.lease(rec.id)
        if lease is not None and lease.host is not None:
            held.setdefault(lease.host, []).append(rec.name)
    every = ctx_log.hosts()
    loops = {
        h.id.removesuffix(FAILOVER_MARK) for h in every if h.id.endswith(FAILOVER_MARK) and h.alive
    }
    rows = []
    for h in every:
        if h.id.endswith(FAILOVER_MARK):
            continue  # (shown as the failover column of its host)
        rows.append(
            {
                "id": h.id,
                "alive": h.alive,
                "failover": h.id in loops,  # runs the failover loop (torpor serve)
                "heartbeat_age": round(max(0.0, now - h.heartbeat_at), 1),
                "started_at": h.started_at,
                "sessions": sorted(held.get(h.id, [])),
                "info": h.info,
            }
        )
    return rows

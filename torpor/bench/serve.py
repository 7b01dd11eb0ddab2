"""``torpor bench serve``: the HTTP API under load, against the in-process library.

One run:

1. starts ``torpor --allow-tcg serve`` as its own process on a free loopback port over
   the current home (or uses ``--url``), and reads its RSS from ``/proc``;
2. **overhead**: one session through the API and one through the library
   (``Session.send`` in this process), the same ``scripted:bench`` turns one after
   another, nothing else running: turn p50 of each and the difference (what HTTP,
   JSON and SSE add to a turn);
3. **load**: N sessions x M turns from C concurrent clients, every turn a streamed
   send (``Accept: text/event-stream``).  Per turn: latency to the ``done`` event and
   to the first ``entry`` event (SSE first-event latency).  Every stream is checked:
   entry ids contiguous from the seq before the send, user first, checkpoint last,
   ``done`` present and naming the last seq.  Afterwards every session's whole log is
   read back: seqs 1..last without a gap or a repeat, exactly M user entries with
   the texts sent, each stream's entries equal to the log's (nothing lost, nothing
   duplicated);
4. hibernates the load's sessions, lists them, and reads the server's RSS again;
5. removes every session it made (``--keep`` leaves them) and stops the server.

The scripted model keeps the model out of the numbers: a turn is one shell call in
the VM plus a checkpoint.  Each running session is a VM: on a small TCG host keep N
small; the issue's 100 x 10 from 20 clients is ``--sessions 100 --turns 10
--clients 20``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from torpor.bench.stats import machine, summary
from torpor.paths import Paths

SSE = {"Accept": "text/event-stream"}
MODEL = "scripted:bench"
LABEL = {"torpor-bench": "serve"}


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` (not its children: VMs live in their shims);
    ``field`` RssAnon / RssFile for the parts."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes] | None
    log: Path | None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(home: Path, log: Path) -> Server:
    port = _free_port()
    env = {**os.environ, "TORPOR_HOME": str(home)}
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    argv = [sys.executable, "-m", "torpor.cli.main", "--allow-tcg", "serve"]
    argv += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    # a load test must not be throttled by the per-token rate limit
    argv += ["--rate", "100000", "--burst", "100000"]
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"torpor serve did not come up; see {log}")
        time.sleep(0.1)


@dataclass
class StreamResult:
    sid: str
    text: str
    before: int
    total_ms: float
    first_event_ms: float
    entries: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)


def streamed_send(c: httpx.Client, sid: str, text: str, before: int) -> StreamResult:
    """One turn as SSE; checks the stream is complete and in order."""
    t0 = time.perf_counter()
    first = float("nan")
    events: list[tuple[str, str | None, Any]] = []
    with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": text}, headers=SSE) as r:
        if r.status_code != 200:
            r.read()
            return StreamResult(sid, text, before, 0, 0, [], [f"HTTP {r.status_code}: {r.text}"])
        ev: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                if ev:
                    if not events:
                        first = (time.perf_counter() - t0) * 1000
                    events.append(
                        (ev.get("event", "message"), ev.get("id"), json.loads(ev["data"]))
                    )
                    ev = {}
                continue
            if line.startswith(":"):
                continue
            k, _, v = line.partition(": ")
            ev[k] = v
    total = (time.perf_counter() - t0) * 1000
    res = StreamResult(sid, text, before, total, first, [d for e, _, d in events if e == "entry"])
    ids = [int(i) for e, i, _ in events if e == "entry" and i is not None]
    if ids != list(range(before + 1, before + 1 + len(ids))):
        res.problems.append(f"{sid}: stream ids not contiguous after {before}: {ids}")
    if [d["seq"] for d in res.entries] != ids:
        res.problems.append(f"{sid}: event ids differ from entry seqs")
    if (
        not res.entries
        or res.entries[0]["kind"] != "user"
        or res.entries[-1]["kind"] != "checkpoint"
    ):
        res.problems.append(f"{sid}: stream does not run user .. checkpoint")
    if not events or events[-1][0] != "done":
        res.problems.append(f"{sid}: stream did not end with done: {events[-1:] or 'nothing'}")
    elif ids and events[-1][2].get("last_seq") != ids[-1]:
        res.problems.append(f"{sid}: done names {events[-1][2].get('last_seq')}, not {ids[-1]}")
    return res


def _client(url: str, token: str | None) -> httpx.Client:
    h = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=h, timeout=httpx.Timeout(600, connect=30))


def _create(c: httpx.Client, image: str, name: str) -> dict[str, Any]:
    r = c.post("/v1/sessions", json={"image": image, "model": MODEL, "name": name, "labels": LABEL})
    if r.status_code != 201:
        raise RuntimeError(f"create {name}: HTTP {r.status_code}: {r.text}")
    return dict(r.json())


def overhead(
    c: httpx.Client, paths: Paths, image: str, turns: int, tag: str, made: list[str]
) -> dict[str, Any]:
    """Sequential turns through the API and through the library, nothing else of ours
    running.  The two alternate turn by turn (API, library, API, ...) so that load from
    elsewhere on the host hits both alike; the added cost is the median of the paired
    differences, next to the difference of the medians."""
    from torpor.session import Session

    api_ms: list[float] = []
    first_ms: list[float] = []
    lib_ms: list[float] = []
    s = _create(c, image, f"bench-api-{tag}")
    made.append(s["id"])
    before = s["entries"]
    lib = Session.create(image, MODEL, name=f"bench-lib-{tag}", paths=paths, labels=LABEL)
    made.append(lib.id)
    with lib:
        for i in range(turns):
            r = streamed_send(c, s["id"], f"api turn {i}", before)
            if r.problems:
                raise RuntimeError("; ".join(r.problems))
            api_ms.append(r.total_ms)
            first_ms.append(r.first_event_ms)
            before = r.entries[-1]["seq"]
            t0 = time.perf_counter()
            lib.send(f"lib turn {i}")
            lib_ms.append((time.perf_counter() - t0) * 1000)
    a, b = summary(api_ms), summary(lib_ms)
    paired = summary([x - y for x, y in zip(api_ms, lib_ms, strict=True)])
    return {
        "turns": turns,
        "api_turn_ms": a,
        "api_sse_first_event_ms": summary(first_ms),
        "library_turn_ms": b,
        "added_ms_paired": paired,
        "added_ms_p50": paired["p50"],
        "added_pct_p50": 100 * paired["p50"] / b["p50"] if b["p50"] else float("nan"),
    }


def load(
    url: str,
    token: str | None,
    image: str,
    sessions: int,
    turns: int,
    clients: int,
    tag: str,
    made: list[str],
    say: Callable[[str], None],
    sample_rss: Callable[[], None],
) -> dict[str, Any]:
    ids: list[str] = []
    starts: dict[str, int] = {}
    lock = threading.Lock()
    create_ms: list[float] = []
    work: queue.Queue[int] = queue.Queue()
    for i in range(sessions):
        work.put(i)

    def creator() -> None:
        with _client(url, token) as c:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                s = _create(c, image, f"bench-{tag}-{i}")
                with lock:
                    create_ms.append((time.perf_counter() - t0) * 1000)
                    ids.append(s["id"])
                    made.append(s["id"])
                    starts[s["id"]] = s["entries"]
                sample_rss()

    # More sessions than clients (the 100 x 10 from 20): each client creates
    # a session when it gets to it and hibernates it after its turns, so at most C VMs
    # run at once (100 VMs at once do not fit a small host); else all are created first.
    rolling = sessions > clients
    if not rolling:
        _run_threads(creator, clients)
        say(f"  created {len(ids)} sessions")
    results: list[StreamResult] = []
    todo: queue.Queue[str | int] = queue.Queue()
    for item in range(sessions) if rolling else ids:
        todo.put(item)
    t_load = time.perf_counter()

    def worker() -> None:
        # one client runs one session's turns in order (a session takes one turn at a
        # time), then picks the next session: C sessions are mid-turn at once
        with _client(url, token) as c:
            while True:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                if isinstance(item, int):
                    t0 = time.perf_counter()
                    s = _create(c, image, f"bench-{tag}-{item}")
                    with lock:
                        create_ms.append((time.perf_counter() - t0) * 1000)
                        ids.append(s["id"])
                        made.append(s["id"])
                        starts[s["id"]] = s["entries"]
                    sid = s["id"]
                else:
                    sid = item
                before = starts[sid]
                for j in range(turns):
                    r = streamed_send(c, sid, f"{sid[:8]} turn {j}", before)
                    with lock:
                        results.append(r)
                    if r.problems or not r.entries:
                        break
                    before = r.entries[-1]["seq"]
                    sample_rss()
                if rolling:
                    h = c.post(f"/v1/sessions/{sid}/hibernate")
                    if h.status_code != 200:
                        with lock:
                            hibernate_problems.append(f"{sid}: hibernate: {h.text}")

    hibernate_problems: list[str] = []
    _run_threads(worker, clients)
    wall = time.perf_counter() - t_load
    problems = [p for r in results for p in r.problems] + hibernate_problems
    # the logs, read back whole: nothing lost, nothing duplicated
    with _client(url, token) as c:
        for sid in ids:
            entries: list[dict[str, Any]] = []
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                page = c.get(f"/v1/sessions/{sid}/log", params=params).json()
                entries += page["entries"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            seqs = [e["seq"] for e in entries]
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"{sid}: log seqs have a gap or a repeat")
            users = [e["payload"]["content"] for e in entries if e["kind"] == "user"]
            if users != [f"{sid[:8]} turn {j}" for j in range(turns)]:
                problems.append(f"{sid}: user entries {users} are not the {turns} sent")
            by_seq = {e["seq"]: e for e in entries}
            for r in results:
                if r.sid == sid and any(by_seq.get(e["seq"]) != e for e in r.entries):
                    problems.append(f"{sid}: a streamed entry differs from the log's")
    ok = [r for r in results if not r.problems]
    return {
        "sessions": sessions,
        "turns": turns,
        "clients": clients,
        "turns_done": len(ok),
        "create_ms": summary(create_ms),
        "turn_ms": summary([r.total_ms for r in ok]),
        "sse_first_event_ms": summary([r.first_event_ms for r in ok]),
        "wall_s": wall,
        "turns_per_s": len(ok) / wall if wall else float("nan"),
        "problems": problems,
        "session_ids": ids,
    }


def hibernated_rss(
    c: httpx.Client, paths: Paths, pid: int | None, count: int, tag: str
) -> dict[str, Any]:
    """Server RSS per 1,000 hibernated sessions, without booting ``count`` VMs.

    A hibernated session is only its log to the server (its VM has ended; the server
    keeps nothing per session), so ``count`` sessions are written straight into the
    context log in the state a hibernation leaves (vm, checkpoint, hibernate) and the
    server lists them all and serves /metrics; RSS is read before and after.  They are
    tombstoned afterwards (they name no real VM or snapshot)."""
    from torpor.context import Kind, open_log

    log = open_log(paths=paths)
    ids: list[str] = []
    try:
        for i in range(count):
            rec = log.create_session(f"bench-hib-{tag}-{i}", {**LABEL, "model": MODEL})
            ids.append(rec.id)
            log.append(rec.id, Kind.VM, {"vm": f"gone-{i}", "reason": "create"}, turn=0)
            log.append(
                rec.id,
                Kind.CHECKPOINT,
                {"snapshot": f"synthetic-{i}", "reason": "hibernate", "stored_bytes": 0},
                turn=0,
            )
            log.append(rec.id, Kind.HIBERNATE, {"vm": f"gone-{i}"}, turn=0)
        before = rss_mib(pid) if pid else float("nan")
        t0 = time.perf_counter()
        n, cursor = 0, None
        while True:
            params: dict[str, Any] = {"limit": 1000, "status": "hibernated"}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/v1/sessions", params=params)
            page.raise_for_status()
            n += len(page.json()["items"])
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        list_s = time.perf_counter() - t0
        c.get("/metrics").raise_for_status()
        after = rss_mib(pid) if pid else float("nan")
    finally:
        for sid in ids:
            log.remove_session(sid, "bench serve")
        log.close()
    return {
        "sessions": count,
        "listed_hibernated": n,
        "list_all_s": list_s,
        "rss_before_mib": before,
        "rss_after_mib": after,
        "rss_per_1000_mib": (after - before) * 1000 / count if count else float("nan"),
    }


def _run_threads(fn: Callable[[], None], n: int) -> None:
    errors: list[BaseException] = []

    def wrap() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_serve_bench(
    paths: Paths,
    *,
    image: str = "tools:latest",
    sessions: int = 4,
    turns: int = 3,
    clients: int = 4,
    overhead_turns: int = 5,
    hibernated: int = 0,
    url: str | None = None,
    token: str | None = None,
    keep: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.server.tokens import TokenStore
    from torpor.session import Session

    if min(sessions, turns, clients) < 1 or overhead_turns < 0:
        from torpor.errors import UsageError

        raise UsageError("--sessions, --turns and --clients must be >= 1, --overhead-turns >= 0")
    paths.ensure()
    tag = f"{int(time.time())}-{os.getpid()}"
    store = TokenStore(paths)
    temp_token = None
    if token is None and store.configured():  # a tokened home: a short-lived token of our own
        temp_token, token = store.create("default", name="bench-serve", ttl=6 * 3600)
    server = (
        Server(url, None, None)
        if url
        else start_server(paths.root, paths.tmp / f"bench-serve-{tag}.log")
    )
    pid = server.pid
    rss: dict[str, float] = {"start": rss_mib(pid) if pid else float("nan"), "peak": 0.0}
    rss["peak_anon"] = 0.0

    def sample() -> None:
        if pid:
            rss["peak"] = max(rss["peak"], rss_mib(pid))
            rss["peak_anon"] = max(rss["peak_anon"], rss_mib(pid, "RssAnon"))

    made: list[str] = []
    result: dict[str, Any] = {"machine": machine(), "image": image, "model": MODEL}
    try:
        with _client(server.url, token) as c:
            if overhead_turns:
                say(f"overhead: {overhead_turns} sequential turns via the API and the library")
                result["overhead"] = overhead(c, paths, image, overhead_turns, tag, made)
            say(f"load: {sessions} sessions x {turns} turns from {clients} clients")
            result["load"] = load(
                server.url, token, image, sessions, turns, clients, tag, made, say, sample
            )
            sample()
            for sid in result["load"]["session_ids"]:
                if c.get(f"/v1/sessions/{sid}").json().get("status") == "hibernated":
                    continue  # a rolling load hibernated it already
                r = c.post(f"/v1/sessions/{sid}/hibernate")
                if r.status_code != 200:
                    result["load"]["problems"].append(f"{sid}: hibernate: {r.text}")
            listed = c.get("/v1/sessions", params={"limit": 1000, "label": "torpor-bench=serve"})
            listed.raise_for_status()
            c.get("/metrics").raise_for_status()
            rss["after_hibernating_and_listing"] = rss_mib(pid) if pid else float("nan")
            rss["after_anon"] = rss_mib(pid, "RssAnon") if pid else float("nan")
            result["hibernated_listed"] = sum(
                1 for s in listed.json()["items"] if s["status"] == "hibernated"
            )
            if hibernated:
                say(f"RSS with {hibernated} hibernated sessions listed")
                result["hibernated_rss"] = hibernated_rss(c, paths, pid, hibernated, tag)
    finally:
        if not keep:
            for sid in made:
                try:
                    s = Session.open(sid, paths=paths)
                except Exception:
                    continue
                with s:
                    try:
                        s.remove(reason="bench serve")
                    except Exception as e:
                        say(f"  could not remove {sid}: {e}")
        server.stop()
        if temp_token is not None:
            store.revoke(temp_token.id)
    result["server_rss_mib"] = rss
    return result


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="torpor bench serve")
    t.add_column("metric")
    t.add_column("value", justify="right")
    ov = result.get("overhead")
    if ov:
        t.add_row("turn p50, library (ms)", f"{ov['library_turn_ms']['p50']:.1f}")
        t.add_row("turn p50, API + SSE (ms)", f"{ov['api_turn_ms']['p50']:.1f}")
        t.add_row("SSE first event p50, alone (ms)", f"{ov['api_sse_first_event_ms']['p50']:.1f}")
        t.add_row(
            "API overhead per turn (paired p50)",
            f"{ov['added_ms_p50']:.1f} ms ({ov['added_pct_p50']:.1f} %)",
        )
    ld = result["load"]
    t.add_row("load", f"{ld['sessions']} sessions x {ld['turns']} turns, {ld['clients']} clients")
    t.add_row("turns done", str(ld["turns_done"]))
    t.add_row("turn p50 / p95 (ms)", f"{ld['turn_ms']['p50']:.0f} / {ld['turn_ms']['p95']:.0f}")
    t.add_row(
        "SSE first event p50 / p95 (ms)",
        f"{ld['sse_first_event_ms']['p50']:.1f} / {ld['sse_first_event_ms']['p95']:.1f}",
    )
    t.add_row("create p50 (ms)", f"{ld['create_ms']['p50']:.0f}")
    t.add_row("throughput (turns/s)", f"{ld['turns_per_s']:.2f}")
    rss = result["server_rss_mib"]
    after = rss.get("after_hibernating_and_listing", float("nan"))
    t.add_row(
        "server RSS start / peak / after (MiB)",
        f"{rss['start']:.0f} / {rss['peak']:.0f} / {after:.0f}",
    )
    t.add_row(
        "server RSS anon: peak / after (MiB)",
        f"{rss['peak_anon']:.0f} / {rss.get('after_anon', float('nan')):.0f}",
    )
    hib = result.get("hibernated_rss")
    if hib:
        t.add_row(
            f"RSS per 1,000 hibernated ({hib['sessions']} listed in {hib['list_all_s']:.1f} s)",
            f"{hib['rss_per_1000_mib']:.1f} MiB",
        )
    t.add_row("problems (lost/duplicated/incomplete)", str(len(ld["problems"])))
    console.print(t)
    for p in ld["problems"][:20]:
        console.print(f"  {p}")


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT

    @click.command(name="serve", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option("--sessions", "-n", default=4, show_default=True, help="Sessions (each a VM).")
    @click.option("--turns", "-m", default=3, show_default=True, help="Turns per session.")
    @click.option("--clients", "-c", default=4, show_default=True, help="Concurrent clients.")
    @click.option(
        "--overhead-turns",
        default=5,
        show_default=True,
        help="Sequential turns via API and library for the overhead (0: skip).",
    )
    @click.option(
        "--hibernated",
        default=0,
        show_default=True,
        help="Also measure server RSS with this many hibernated sessions (log only, no VMs).",
    )
    @click.option("--url", help="Use this running server instead of starting one.")
    @click.option("--token", envvar="TORPOR_TOKEN", help="Its token (with --url).")
    @click.option("--keep", is_flag=True, help="Leave the sessions (default: removed).")
    @click.option(
        "--json",
        "json_out",
        type=click.Path(path_type=Path),
        default=Path("bench-results/serve.json"),
        show_default=True,
    )
    def serve(
        image: str,
        sessions: int,
        turns: int,
        clients: int,
        overhead_turns: int,
        hibernated: int,
        url: str | None,
        token: str | None,
        keep: bool,
        json_out: Path,
    ) -> None:
        """The HTTP API under load: N sessions x M turns from C clients over SSE; checks
        nothing is lost or duplicated; turn p50/p95, API overhead vs the library, SSE
        first-event latency, throughput, server RSS."""
        from torpor.cli.main import _bench_output, _fail, _paths, err_console
        from torpor.errors import TorporError

        try:
            result = run_serve_bench(
                _paths(),
                image=image,
                sessions=sessions,
                turns=turns,
                clients=clients,
                overhead_turns=overhead_turns,
                hibernated=hibernated,
                url=url,
                token=token,
                keep=keep,
                say=lambda m: err_console.print(m),
            )
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)
        if result["load"]["problems"]:
            sys.exit(1)

    return serve


serve = main_command()

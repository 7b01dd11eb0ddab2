"""/v1/sessions over HTTP on real VMs: every route, its errors as problem details, SSE
streams (complete, resumable with Last-Event-ID), idempotent retries, namespaces."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import LiveServer, Tokens

pytestmark = pytest.mark.vm

SLOW_SCRIPT = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "sleep 8; echo slept"}}]},
                {"text": "slow turn {turn} done"},
            ]
        }
    ],
}
ECHO_SCRIPT = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "echo {user_sh}"}}]},
                {"text": "you said: {last_result}"},
            ]
        }
    ],
}


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events of an SSE body: {"id", "event", "data"} (comments skipped)."""
    out = []
    for block in text.split("\n\n"):
        ev: dict[str, Any] = {"id": None, "event": "message", "data": ""}
        seen = False
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            ev[field] = value
            seen = True
        if seen:
            ev["data"] = json.loads(ev["data"])
            out.append(ev)
    return out


def assert_problem(r: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and "detail" in body
    if error is not None:
        assert body["error"] == error, body
    return body


@pytest.fixture
def created(api: TestClient) -> Iterator[list[str]]:
    """Ids of sessions a test made; removed afterwards."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        with contextlib.suppress(Exception):
            api.delete(f"/v1/sessions/{sid}")


def create(api: TestClient, created: list[str], **body: Any) -> dict[str, Any]:
    r = api.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    created.append(r.json()["id"])
    return r.json()


def test_create_get_list_delete(api: TestClient, tools_image: str, created: list[str]) -> None:
    a = create(api, created, name="api-a", labels={"team": "x", "tier": "1"}, script=ECHO_SCRIPT)
    b = create(api, created, name="api-b", labels={"team": "y"})
    assert a["status"] == "running" and a["turns"] == 0 and a["labels"]["team"] == "x"
    assert a["image"] == "tools:latest" and a["vm"]["status"] == "running" and a["host"]
    assert a["last_checkpoint"]["reason"] == "create" and a["stored_bytes"] > 0
    assert b["model"] == "scripted:demo"
    for ref in (a["id"], "api-a", a["id"][:12]):
        assert api.get(f"/v1/sessions/{ref}").json()["id"] == a["id"]
    ids = [s["id"] for s in api.get("/v1/sessions", params={"label": "team=x"}).json()["items"]]
    assert ids == [a["id"]]
    both = {"label": ["team=x", "tier=1"]}
    assert [s["id"] for s in api.get("/v1/sessions", params=both).json()["items"]] == [a["id"]]
    assert [s["id"] for s in api.get("/v1/sessions", params={"q": "api-b"}).json()["items"]] == [
        b["id"]
    ]
    running = api.get("/v1/sessions", params={"status": "running"}).json()["items"]
    assert {a["id"], b["id"]} <= {s["id"] for s in running}
    assert api.get("/v1/sessions", params={"status": "hibernated", "q": "api-"}).json() == {
        "items": [],
        "next_cursor": None,
    }
    # pagination: one at a time, in creation order, every session once
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1, "q": "api-"}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/sessions", params=params).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [a["id"], b["id"]]
    r = api.delete(f"/v1/sessions/{b['id']}")
    assert r.status_code == 200 and r.json()["id"] == b["id"] and r.json()["removed"]
    assert_problem(api.get(f"/v1/sessions/{b['id']}"), 404, "NotFoundError")
    assert b["id"] not in [s["id"] for s in api.get("/v1/sessions").json()["items"]]


def test_send_json_then_sse_stream_complete_and_idempotent(
    api: TestClient, tools_image: str, created: list[str]
) -> None:
    s = create(api, created, script=ECHO_SCRIPT)
    url = f"/v1/sessions/{s['id']}/messages"
    r = api.post(url, json={"text": "hello"}, headers={"Idempotency-Key": "m1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer"] == "you said: hello"
    kinds = [e["kind"] for e in out["entries"]]
    assert kinds[0] == "user" and kinds[-1] == "checkpoint" and "tool_result" in kinds
    first_seq = out["entries"][0]["seq"]
    # a retry with the same key: the first answer, no second turn
    again = api.post(url, json={"text": "hello"}, headers={"Idempotency-Key": "m1"})
    assert again.json() == {"answer": "you said: hello", "entries": []}
    last = api.get(f"/v1/sessions/{s['id']}").json()
    assert last["turns"] == 1 and last["entries"] == out["entries"][-1]["seq"]

    r = api.post(url, json={"text": "streamed"}, headers={"Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    entries = [e for e in events if e["event"] == "entry"]
    assert [e["event"] for e in events[-1:]] == ["done"]
    assert events[-1]["data"]["answer"] == "you said: streamed"
    seqs = [int(e["id"]) for e in entries]
    assert seqs == list(range(last["entries"] + 1, last["entries"] + 1 + len(seqs)))
    assert [e["data"]["seq"] for e in entries] == seqs
    assert entries[0]["data"]["kind"] == "user" and entries[-1]["data"]["kind"] == "checkpoint"
    assert events[-1]["data"]["last_seq"] == seqs[-1]
    # the log agrees with the stream, entry for entry
    page = api.get(f"/v1/sessions/{s['id']}/log", params={"after": seqs[0] - 1}).json()
    assert page["entries"] == [e["data"] for e in entries]
    assert first_seq < seqs[0]


def test_log_pages_and_sse_resume(api: TestClient, tools_image: str, created: list[str]) -> None:
    s = create(api, created, script=ECHO_SCRIPT)
    sid = s["id"]
    api.post(f"/v1/sessions/{sid}/messages", json={"text": "one"}).raise_for_status()
    full = api.get(f"/v1/sessions/{sid}/log", params={"limit": 1000}).json()
    assert full["next_cursor"] is None and full["last_seq"] == full["entries"][-1]["seq"]
    seqs = [e["seq"] for e in full["entries"]]
    assert seqs == list(range(1, len(seqs) + 1))
    got: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get(f"/v1/sessions/{sid}/log", params=params).json()
        got += [e["seq"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == seqs
    # SSE: with until=turn the stream ends once no turn is open; Last-Event-ID resumes
    sse = {"Accept": "text/event-stream"}
    r = api.get(f"/v1/sessions/{sid}/log", params={"until": "turn"}, headers=sse)
    events = parse_sse(r.text)
    assert [int(e["id"]) for e in events if e["event"] == "entry"] == seqs
    assert events[-1]["event"] == "done" and events[-1]["data"]["last_seq"] == seqs[-1]
    mid = seqs[len(seqs) // 2]
    r = api.get(
        f"/v1/sessions/{sid}/log",
        params={"until": "turn"},
        headers={**sse, "Last-Event-ID": str(mid)},
    )
    resumed = [int(e["id"]) for e in parse_sse(r.text) if e["event"] == "entry"]
    assert resumed == [q for q in seqs if q > mid]


def test_follow_ends_when_the_session_is_removed(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    h = {"Authorization": f"Bearer {tokens.default}"}
    with httpx.Client(base_url=live_server.url, headers=h, timeout=120) as c:
        r = c.post("/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        events: list[dict[str, Any]] = []
        sse = {"Accept": "text/event-stream"}
        with c.stream("GET", f"/v1/sessions/{sid}/log", headers=sse) as stream:
            buf = ""
            for chunk in stream.iter_text():
                buf += chunk
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    for ev in parse_sse(block + "\n\n"):
                        events.append(ev)
                        if len(events) == 1:  # following: now remove the session under it
                            assert c.delete(f"/v1/sessions/{sid}").status_code == 200
        assert events[-2]["data"]["kind"] == "removed"
        assert events[-1]["event"] == "done" and events[-1]["data"]["removed"] is True


def test_send_mid_turn_is_409_and_the_turn_is_not_disturbed(
    api: TestClient, tools_image: str, created: list[str]
) -> None:
    s = create(api, created, script=SLOW_SCRIPT)
    sid = s["id"]
    result: dict[str, Any] = {}

    def slow() -> None:
        result["r"] = api.post(f"/v1/sessions/{sid}/messages", json={"text": "first"})

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 120
    while True:
        kinds = [e["kind"] for e in api.get(f"/v1/sessions/{sid}/log").json()["entries"]]
        if "tool_call" in kinds:
            break
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.2)
    mid = api.get(f"/v1/sessions/{sid}").json()
    assert mid["status"] == "interrupted" and mid["busy"] is True  # open, and being run
    for headers in ({}, {"Accept": "text/event-stream"}):
        r = api.post(f"/v1/sessions/{sid}/messages", json={"text": "second"}, headers=headers)
        body = assert_problem(r, 409, "ConflictError")
        assert "busy" in body["detail"]
    assert_problem(api.post(f"/v1/sessions/{sid}/recover"), 409, "ConflictError")
    t.join(180)
    assert result["r"].status_code == 200 and result["r"].json()["answer"] == "slow turn 0 done"
    users = [e for e in api.get(f"/v1/sessions/{sid}/log").json()["entries"] if e["kind"] == "user"]
    assert [u["payload"]["content"] for u in users] == ["first"]


def test_append_checkpoint_hibernate_wake_recover_fork(
    api: TestClient, tools_image: str, created: list[str]
) -> None:
    s = create(api, created, script=ECHO_SCRIPT)
    sid = s["id"]
    r = api.post(f"/v1/sessions/{sid}/entries", json={"kind": "app.note", "payload": {"n": 1}})
    assert r.status_code == 201
    note = r.json()
    assert note["kind"] == "custom" and note["payload"] == {"type": "app.note", "data": {"n": 1}}
    again = api.post(
        f"/v1/sessions/{sid}/entries", json={"kind": "app.note", "payload": {"n": 1}, "key": "k"}
    )
    same = api.post(
        f"/v1/sessions/{sid}/entries", json={"kind": "app.note", "payload": {"n": 2}, "key": "k"}
    )
    assert again.json()["seq"] == same.json()["seq"]
    assert_problem(
        api.post(f"/v1/sessions/{sid}/entries", json={"kind": "checkpoint", "payload": {}}),
        400,
        "UsageError",
    )
    r = api.post(f"/v1/sessions/{sid}/checkpoint", json={"reason": "mine"})
    assert r.status_code == 201 and r.json()["reason"] == "mine"
    ck = r.json()
    cks = api.get(f"/v1/sessions/{sid}/checkpoints").json()
    assert [c["reason"] for c in cks] == ["create", "mine"] and cks[-1] == ck
    r = api.post(f"/v1/sessions/{sid}/hibernate")
    assert r.status_code == 200 and r.json()["status"] == "hibernated"
    r = api.post(f"/v1/sessions/{sid}/wake")
    assert r.status_code == 200 and r.json()["status"] == "running"
    r = api.post(f"/v1/sessions/{sid}/recover")
    assert r.status_code == 200 and r.json()["answer"] is None
    # fork at a checkpoint, retried with the same key: one fork
    hdr = {"Idempotency-Key": f"fork-{sid}"}
    f1 = api.post(f"/v1/sessions/{sid}/fork", json={"at": ck["seq"]}, headers=hdr)
    assert f1.status_code == 201, f1.text
    created.append(f1.json()["id"])
    f2 = api.post(f"/v1/sessions/{sid}/fork", json={"at": ck["seq"]}, headers=hdr)
    assert f2.json()["id"] == f1.json()["id"]
    child = f1.json()
    assert child["parent"] == sid and child["parent_seq"] == ck["seq"]
    assert child["status"] == "running"
    forks = [x for x in api.get("/v1/sessions").json()["items"] if x["parent"] == sid]
    assert [x["id"] for x in forks] == [child["id"]]
    assert_problem(api.post(f"/v1/sessions/{sid}/fork", json={"at": 1}), 400, "UsageError")


def test_idempotent_create_makes_one_session(
    api: TestClient, tools_image: str, created: list[str]
) -> None:
    hdr = {"Idempotency-Key": "create-once-1"}
    r1 = api.post("/v1/sessions", json={"name": "once"}, headers=hdr)
    assert r1.status_code == 201
    created.append(r1.json()["id"])
    r2 = api.post("/v1/sessions", json={"name": "once"}, headers=hdr)
    assert r2.status_code == 201 and r2.json()["id"] == r1.json()["id"]
    named = [s for s in api.get("/v1/sessions", params={"q": "once"}).json()["items"]]
    assert len(named) == 1
    # the same key for another kind of request is a conflict, not a replay
    assert_problem(api.post(f"/v1/sessions/{r1.json()['id']}/fork", json={}, headers=hdr), 409)


def test_bad_input_is_a_problem(api: TestClient, tools_image: str, created: list[str]) -> None:
    raw = {"Content-Type": "application/json"}
    body = assert_problem(api.post("/v1/sessions", content=b"{not json", headers=raw), 422)
    assert body["errors"]
    assert_problem(api.post("/v1/sessions", json={"imagee": "x"}), 422)  # unknown field
    assert_problem(api.post("/v1/sessions", json={"memory_mib": 1}), 422)
    assert_problem(api.post("/v1/sessions", json={"image": "nope:none"}), 404, "NotFoundError")
    assert_problem(api.post("/v1/sessions", json={"model": "bogus:x"}), 400, "UsageError")
    # a client cannot make the server read its own files as a script
    body = assert_problem(
        api.post("/v1/sessions", json={"model": "scripted:/etc/passwd"}), 400, "UsageError"
    )
    assert "root:" not in body["detail"]
    assert_problem(
        api.post("/v1/sessions", json={"script": {"version": 99, "turns": []}}), 400, "UsageError"
    )
    assert_problem(api.post("/v1/sessions", json={"labels": {"torpor.x": "1"}}), 400)
    assert_problem(api.get("/v1/sessions", params={"cursor": "!!"}), 400, "UsageError")
    assert_problem(api.get("/v1/sessions", params={"label": "novalue"}), 400, "UsageError")
    assert_problem(api.get("/v1/sessions", params={"limit": 0}), 422)
    s = create(api, created, script=ECHO_SCRIPT)
    sid = s["id"]
    assert_problem(api.post(f"/v1/sessions/{sid}/messages", json={"text": ""}), 422)
    assert_problem(api.post(f"/v1/sessions/{sid}/messages", json={}), 422)
    assert_problem(api.post(f"/v1/sessions/{sid}/messages", content=b"[", headers=raw), 422)
    bad_id = {"Last-Event-ID": "x", "Accept": "text/event-stream"}
    assert_problem(api.get(f"/v1/sessions/{sid}/log", headers=bad_id), 400, "UsageError")
    assert_problem(api.get(f"/v1/sessions/{sid}/log", params={"until": "ever"}), 422)
    assert_problem(api.post(f"/v1/sessions/{sid}/checkpoint", json={"reason": ""}), 422)
    # unknown sessions: 404 on every route
    for method, path, body_ in ROUTES:
        r = api.request(method, path.format(ref="no-such-session"), json=body_)
        assert_problem(r, 404, "NotFoundError")


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/sessions/{ref}", None),
    ("DELETE", "/v1/sessions/{ref}", None),
    ("POST", "/v1/sessions/{ref}/messages", {"text": "hi"}),
    ("GET", "/v1/sessions/{ref}/log", None),
    ("POST", "/v1/sessions/{ref}/entries", {"kind": "app.note", "payload": {}}),
    ("GET", "/v1/sessions/{ref}/checkpoints", None),
    ("POST", "/v1/sessions/{ref}/checkpoint", {"reason": "x"}),
    ("POST", "/v1/sessions/{ref}/hibernate", None),
    ("POST", "/v1/sessions/{ref}/wake", None),
    ("POST", "/v1/sessions/{ref}/recover", None),
    ("POST", "/v1/sessions/{ref}/fork", {}),
]


def test_other_namespace_sees_404_and_no_token_401(
    app, api: TestClient, other_api: TestClient, tools_image: str, created: list[str]
) -> None:
    s = create(api, created)
    for ref in (s["id"], s["name"]):
        for method, path, body in ROUTES:
            r = other_api.request(method, path.format(ref=ref), json=body)
            assert_problem(r, 404, "NotFoundError")
    assert s["id"] not in [x["id"] for x in other_api.get("/v1/sessions").json()["items"]]
    sse = {"Accept": "text/event-stream"}
    assert_problem(other_api.get(f"/v1/sessions/{s['id']}/log", headers=sse), 404)
    with TestClient(app) as anon:
        for method, path, body in [("GET", "/v1/sessions", None), ("POST", "/v1/sessions", {})]:
            assert_problem(anon.request(method, path, json=body), 401)
        for method, path, body in ROUTES:
            assert_problem(anon.request(method, path.format(ref=s["id"]), json=body), 401)
    # still there, untouched, for its own namespace
    assert api.get(f"/v1/sessions/{s['id']}").json()["status"] == "running"


def test_streamed_oversized_create_is_413(live_server: LiveServer, tokens: Tokens) -> None:
    """The body cap also holds for a body without Content-Length (chunked)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big", "system": "'
        for _ in range(2048):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(
        f"{live_server.url}/v1/sessions",
        content=chunks(),
        headers={"Authorization": f"Bearer {tokens.default}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert_problem(r, 413)
    r = httpx.get(
        f"{live_server.url}/v1/sessions",
        params={"q": "big"},
        headers={"Authorization": f"Bearer {tokens.default}"},
    )
    assert r.json()["items"] == []


def test_live_sse_follow_sees_a_turn_as_it_runs(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    """Over a real socket: a follower receives the turn's entries while it runs (the
    tool_call arrives while the session still has the turn open), then `done`."""
    h = {"Authorization": f"Bearer {tokens.default}"}
    with httpx.Client(base_url=live_server.url, headers=h, timeout=180) as c:
        r = c.post("/v1/sessions", json={"script": SLOW_SCRIPT})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            start = r.json()["entries"]
            sender = threading.Thread(
                target=lambda: c.post(f"/v1/sessions/{sid}/messages", json={"text": "go"})
            )
            sender.start()
            while not [
                e for e in c.get(f"/v1/sessions/{sid}/log").json()["entries"] if e["kind"] == "user"
            ]:
                time.sleep(0.1)
            got: list[dict[str, Any]] = []
            open_at_call: list[str] = []
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(start)}
            with c.stream(
                "GET", f"/v1/sessions/{sid}/log", params={"until": "turn"}, headers=headers
            ) as stream:
                buf = ""
                for chunk in stream.iter_text():
                    buf += chunk
                    while "\n\n" in buf:
                        block, buf = buf.split("\n\n", 1)
                        for ev in parse_sse(block + "\n\n"):
                            got.append(ev)
                            if ev["data"].get("kind") == "tool_call":
                                st = c.get(f"/v1/sessions/{sid}").json()["status"]
                                open_at_call.append(st)
            sender.join(180)
            kinds = [ev["data"].get("kind") for ev in got if ev["event"] == "entry"]
            assert kinds[0] == "user" and kinds[-1] == "checkpoint"
            assert got[-1]["event"] == "done"
            seqs = [int(ev["id"]) for ev in got if ev["event"] == "entry"]
            assert seqs == list(range(start + 1, start + 1 + len(seqs)))
            # streamed live: when the tool call arrived, the turn was still open
            assert open_at_call == ["interrupted"]
        finally:
            c.delete(f"/v1/sessions/{sid}")


LIVE_SESSION = re.compile(
    r"^/v1/sessions/\{ref\}(|/log|/entries|/checkpoints|/checkpoint|/messages|/recover"
    r"|/hibernate|/wake)$"
)
#: Valid examples per operation (each send is a real turn, each hibernate a real one).
FUZZ_EXAMPLES = {"/messages": 6, "/hibernate": 3, "/wake": 3, "/checkpoint": 6}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_a_live_session_answers_without_5xx(
    app, api: TestClient, tokens: Tokens, tools_image: str, created: list[str]
) -> None:
    """Every sessions route but delete and fork, fuzzed from /openapi.json against one
    real session (the whole-API fuzz in test_fuzz_api.py only reaches unknown ones)."""
    from tests.server.test_fuzz_api import CALL_TIMEOUT, check, fuzz, operations

    s = create(api, created, script=ECHO_SCRIPT)
    ops = operations(
        app, lambda op: bool(LIVE_SESSION.match(op.path)) and op.method in ("get", "post")
    )
    assert len(ops) == 9
    headers = {"Authorization": f"Bearer {tokens.default}"}
    answered: dict[str, set[int]] = {}

    def call(case: Any) -> None:
        case.path_parameters = {**(case.path_parameters or {}), "ref": s["id"]}
        r = case.call(headers=headers, timeout=CALL_TIMEOUT)
        answered.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)
        check(case, r)

    for op in ops:
        suffix = op.path.removeprefix("/v1/sessions/{ref}")
        fuzz(op, FUZZ_EXAMPLES.get(suffix, 25), call)
    # the fuzzer reached the session, not only the validation in front of it
    assert 200 in answered["POST /v1/sessions/{ref}/messages"], answered
    assert 400 in answered["POST /v1/sessions/{ref}/entries"], answered  # the library's check
    # and the session still works, its log whole
    r = api.post(f"/v1/sessions/{s['id']}/messages", json={"text": "still here"})
    assert r.status_code == 200 and r.json()["answer"] == "you said: still here"
    seqs = [e["seq"] for e in api.get(f"/v1/sessions/{s['id']}/log?limit=1000").json()["entries"]]
    assert seqs == list(range(1, len(seqs) + 1))


def _fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_gone_clients_leave_no_reader_behind(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    """Streams whose clients went away release what they held (each holds a log
    connection: its files): log follows at once, a streamed send once its turn, which a
    disconnect does not stop, has ended."""
    h = {"Authorization": f"Bearer {tokens.default}"}
    pid = live_server.proc.pid
    sse = {"Accept": "text/event-stream"}
    with httpx.Client(base_url=live_server.url, headers=h, timeout=120) as c:
        r = c.post("/v1/sessions", json={"script": SLOW_SCRIPT})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            c.get(f"/v1/sessions/{sid}").raise_for_status()
            base = _fds(pid)
            for _ in range(5):  # followers that read one event and hang up
                with c.stream("GET", f"/v1/sessions/{sid}/log", headers=sse) as s:
                    next(s.iter_lines())
            # a streamed send whose client hangs up after the first event
            with c.stream(
                "POST", f"/v1/sessions/{sid}/messages", json={"text": "bye"}, headers=sse
            ) as s:
                next(s.iter_lines())
            deadline = time.monotonic() + 180
            while True:
                done = c.get(f"/v1/sessions/{sid}").json()
                if done["status"] == "running" and done["turns"] == 1 and _fds(pid) <= base:
                    break
                assert time.monotonic() < deadline, (done["status"], _fds(pid), base)
                time.sleep(0.5)
            # the turn ran to its end although nobody was listening
            kinds = [e["kind"] for e in c.get(f"/v1/sessions/{sid}/log").json()["entries"]]
            assert kinds[-1] == "checkpoint" and kinds.count("user") == 1
        finally:
            c.delete(f"/v1/sessions/{sid}")

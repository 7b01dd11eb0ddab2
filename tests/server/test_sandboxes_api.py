"""/v1/sandboxes on real VMs: lifecycle, exec (JSON, SSE, timeouts, floods, disconnects),
processes, files, logs, snapshots/forks, and bad input on every route.

One sandbox (``sbx``) is booted for the module and shared; the tests that change its
state (hibernate, stop) run last, in file order.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from tests.server.conftest import LiveServer, Tokens
from torpor.paths import Paths
from torpor.sandbox import Sandbox
from torpor.server.app import create_app
from torpor.server.deps import Config
from torpor.server.sandbox_schemas import page

pytestmark = pytest.mark.vm

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def client(app, tokens: Tokens) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        yield c


@pytest.fixture(scope="module")
def sbx(client: TestClient, tools_image: str) -> Iterator[dict[str, Any]]:
    r = client.post(
        "/v1/sandboxes",
        json={
            "image": tools_image,
            "memory": "256M",
            "network": False,
            "labels": {"suite": "server-sbx"},
            "env": {"GREETING": "hello"},
        },
    )
    assert r.status_code == 201, r.text
    sb = r.json()
    yield sb
    client.delete(f"/v1/sandboxes/{sb['id']}")


def problem(r: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["detail"]
    if error is not None:
        assert body["error"] == error, body
    return body


def sse_events(text: str) -> list[tuple[str, str, Any]]:
    """(id, event, data) of every event in an SSE body (comments skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            k, _, v = line.partition(": ")
            fields[k] = v
        if "event" in fields:
            out.append((fields.get("id", ""), fields["event"], json.loads(fields["data"])))
    return out


# -- lifecycle -----------------------------------------------------------------------------


def test_create_answers_the_sandbox_with_its_accelerator(sbx: dict[str, Any]) -> None:
    assert sbx["status"] == "running"
    assert sbx["image"] == "tools:latest" and sbx["memory_mib"] == 256
    assert sbx["labels"] == {"suite": "server-sbx"}
    assert sbx["accel"] in ("kvm", "tcg") and sbx["isolation"]


def test_get_by_id_prefix_and_name(client: TestClient, sbx: dict[str, Any]) -> None:
    for ref in (sbx["id"], sbx["id"][:12], sbx["name"]):
        r = client.get(f"/v1/sandboxes/{ref}")
        assert r.status_code == 200 and r.json()["id"] == sbx["id"]


def test_list_filters_by_label_and_status(client: TestClient, sbx: dict[str, Any]) -> None:
    ids = [s["id"] for s in client.get("/v1/sandboxes").json()["items"]]
    assert sbx["id"] in ids
    for q in ("label=suite=server-sbx", "label=suite", "status=running"):
        items = client.get(f"/v1/sandboxes?{q}").json()["items"]
        assert sbx["id"] in [s["id"] for s in items], q
    for q in ("label=suite=other", "label=nope", "status=exited"):
        items = client.get(f"/v1/sandboxes?{q}").json()["items"]
        assert sbx["id"] not in [s["id"] for s in items], q
    problem(client.get("/v1/sandboxes?label==x"), 400, "UsageError")
    problem(client.get("/v1/sandboxes?limit=0"), 422)
    problem(client.get("/v1/sandboxes?cursor=%%%"), 400, "UsageError")
    # ["a","b"]: a key of the wrong kind
    problem(client.get("/v1/sandboxes?cursor=WyJhIiwiYiJd"), 400, "UsageError")


def test_pages_follow_keys_not_offsets() -> None:
    items = [(i, f"id{i}") for i in range(5)]
    key = lambda x: [x[0], x[1]]  # noqa: E731
    got, cur = page(items, key, 2, None)
    assert got == items[:2] and cur
    got, cur = page(items, key, 2, cur)
    assert got == items[2:4]
    # the item a cursor names was removed meanwhile: the next page still starts after it
    got, cur2 = page([x for x in items if x[0] != 3], key, 2, cur)
    assert got == [items[4]] and cur2 is None


def test_create_with_idempotency_key_makes_one_vm_and_delete(
    client: TestClient, tools_image: str, paths: Paths
) -> None:
    body = {"image": tools_image, "memory": "128M", "network": False}
    key = {"Idempotency-Key": f"create-{os.getpid()}-{time.time()}"}
    a = client.post("/v1/sandboxes", json=body, headers=key)
    assert a.status_code == 201, a.text
    try:
        b = client.post("/v1/sandboxes", json=body, headers=key)
        assert b.status_code == 201 and b.json()["id"] == a.json()["id"]
        named = [s for s in Sandbox.list(all=True, paths=paths) if s.id == a.json()["id"]]
        assert len(named) == 1
    finally:
        r = client.delete(f"/v1/sandboxes/{a.json()['id']}")
    assert r.status_code == 204
    problem(client.get(f"/v1/sandboxes/{a.json()['id']}"), 404, "NotFoundError")
    problem(client.delete(f"/v1/sandboxes/{a.json()['id']}"), 404, "NotFoundError")


def test_the_library_bounds_memory_in_mib_too(paths: Paths, tools_image: str) -> None:
    """``Sandbox.create(memory=<int MiB>)`` skipped parse_memory's bounds (a 1 MiB VM
    failed at boot as a VMError); refused up front like "1M" is."""
    from torpor.errors import UsageError

    for mib in (0, 1, 63, (1 << 20) + 1):
        with pytest.raises(UsageError, match="memory"):
            Sandbox.create(tools_image, memory=mib, network=False, paths=paths)


def test_create_bad_input(client: TestClient, tools_image: str) -> None:
    problem(
        client.post(
            "/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
    )
    problem(client.post("/v1/sandboxes", json={"image": tools_image, "bogus": 1}), 422)
    problem(client.post("/v1/sandboxes", json={"cpus": 0}), 422)
    problem(client.post("/v1/sandboxes", json={"memory": "lots"}), 400, "UsageError")
    # MiB as a number has the same bounds as "64M".."1T" (it skipped them: a 1 MiB VM)
    problem(client.post("/v1/sandboxes", json={"memory": 1}), 422)
    problem(client.post("/v1/sandboxes", json={"memory": 1 << 30}), 422)
    problem(client.post("/v1/sandboxes", json={"image": "no-such-image:1"}), 404)
    problem(client.post("/v1/sandboxes", json={"env": {"A": "x\u0000y"}}), 400, "UsageError")
    problem(client.post("/v1/sandboxes", json={"env": {"A=B": "x"}}), 400, "UsageError")
    problem(client.post("/v1/sandboxes", json={"name": "../../etc"}), 400, "UsageError")
    problem(client.post("/v1/sandboxes", json=[1, 2]), 422)
    big = {"image": tools_image, "labels": {"x": "y" * (2 << 20)}}
    problem(client.post("/v1/sandboxes", json=big), 413)


def test_multi_tenant_tcg_is_refused_before_any_vm_starts(
    paths: Paths, tokens: Tokens, sbx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two namespaces have tokens: without --allow-tcg, nothing may boot under TCG."""
    from torpor.vmm.boot import resolve_accel

    monkeypatch.delenv("TORPOR_ALLOW_TCG", raising=False)
    strict = create_app(Config(paths, allow_tcg=False))
    before = {s.id for s in Sandbox.list(all=True, paths=paths)}
    with TestClient(strict, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        r = c.post("/v1/sandboxes", json={"memory": 128, "network": False})
        if resolve_accel(paths, "auto") != "tcg":  # a KVM host: allowed
            assert r.status_code == 201, r.text
            c.delete(f"/v1/sandboxes/{r.json()['id']}")
            return
        problem(r, 403, "TCGRefusedError")
        problem(c.post(f"/v1/sandboxes/{sbx['id']}/fork", json={"n": 1}), 403, "TCGRefusedError")
        assert c.get(f"/v1/sandboxes/{sbx['id']}").status_code == 200  # reading is fine
    assert {s.id for s in Sandbox.list(all=True, paths=paths)} == before


# -- exec ----------------------------------------------------------------------------------


def exec_(client: TestClient, sb: dict[str, Any], **body: Any) -> httpx.Response:
    return client.post(f"/v1/sandboxes/{sb['id']}/exec", json=body)


def test_exec_json_result(client: TestClient, sbx: dict[str, Any]) -> None:
    r = exec_(client, sbx, cmd="echo out; echo err >&2; exit 3")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "exit_code": 3,
        "stdout": "out\n",
        "stderr": "err\n",
        "signal": None,
        "stdout_dropped": 0,
        "stderr_dropped": 0,
        "encoding": "utf-8",
    }
    r = exec_(client, sbx, cmd=["sh", "-c", 'echo "$GREETING $X"; pwd'], env={"X": "1"}, cwd="/tmp")
    assert r.json()["stdout"] == "hello 1\n/tmp\n"
    r = exec_(client, sbx, cmd="cat", stdin="fed\n")
    assert r.json()["stdout"] == "fed\n"
    r = exec_(client, sbx, cmd="kill -TERM $$")
    assert (r.json()["exit_code"], r.json()["signal"]) == (143, 15)


def test_exec_bytes_utf8_replaced_or_base64(client: TestClient, sbx: dict[str, Any]) -> None:
    cmd = "printf 'a\\377b\\303\\251'"
    assert exec_(client, sbx, cmd=cmd).json()["stdout"] == "a\ufffdbé"
    r = client.post(f"/v1/sandboxes/{sbx['id']}/exec?encoding=base64", json={"cmd": cmd})
    assert r.json()["encoding"] == "base64"
    assert base64.b64decode(r.json()["stdout"]) == b"a\xffb\xc3\xa9"
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/exec?encoding=latin1", json={"cmd": cmd}), 422)


def test_exec_sse_streams_stdout_stderr_and_exit(client: TestClient, sbx: dict[str, Any]) -> None:
    r = client.post(
        f"/v1/sandboxes/{sbx['id']}/exec",
        json={"cmd": "echo one; echo two >&2; printf '\\303'; printf '\\251'; exit 4"},
        headers={"Accept": "text/event-stream"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    assert ev[-1][1] == "exit" and ev[-1][2]["exit_code"] == 4
    out = "".join(d for _, e, d in ev if e == "stdout")
    err = "".join(d for _, e, d in ev if e == "stderr")
    assert (out, err) == ("one\né", "two\n")  # a character split across chunks stays whole
    ids = [int(i) for i, _, _ in ev]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_silent_sse_exec_sends_keepalives(
    client: TestClient, sbx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor.server.routes import sandboxes

    monkeypatch.setattr(sandboxes, "KEEPALIVE", 0.2)
    r = client.post(
        f"/v1/sandboxes/{sbx['id']}/exec",
        json={"cmd": "sleep 2; echo done"},
        headers={"Accept": "text/event-stream"},
    )
    assert ": keepalive" in r.text
    assert [e for _, e, _ in sse_events(r.text)] == ["stdout", "exit"]


def test_exec_timeout_is_504_or_an_exit_event(client: TestClient, sbx: dict[str, Any]) -> None:
    body = problem(exec_(client, sbx, cmd="echo hi; sleep 1000", timeout=2), 504)
    assert body["error"] == "ExecTimeoutError" and "killed" in body["detail"]
    r = client.post(
        f"/v1/sandboxes/{sbx['id']}/exec",
        json={"cmd": "sleep 1000", "timeout": 2},
        headers={"Accept": "text/event-stream"},
    )
    last = sse_events(r.text)[-1]
    assert last[1] == "exit" and last[2]["timed_out"] is True and last[2]["status"] == 504
    ps = client.get(f"/v1/sandboxes/{sbx['id']}/processes").json()
    assert not [p for p in ps if p["cmdline"][:2] == ["sleep", "1000"]]


def test_exec_flood_is_capped_in_json_and_streamed_in_sse(
    client: TestClient, sbx: dict[str, Any]
) -> None:
    n = 24 << 20
    flood = f"head -c {n} /dev/zero | tr '\\0' a"
    r = exec_(client, sbx, cmd=flood, max_output=1 << 20, timeout=300)
    j = r.json()
    assert j["exit_code"] == 0
    assert len(j["stdout"]) == 1 << 20 and len(j["stdout"]) + j["stdout_dropped"] == n
    got = 0
    with client.stream(
        "POST",
        f"/v1/sandboxes/{sbx['id']}/exec",
        json={"cmd": flood, "timeout": 300},
        headers={"Accept": "text/event-stream"},
    ) as s:
        tail = ""
        for text in s.iter_text():
            tail += text
            blocks = tail.split("\n\n")
            tail = blocks.pop()
            for _, e, d in sse_events("\n\n".join(blocks) + "\n\n"):
                if e == "stdout":
                    got += len(d)
                elif e == "exit":
                    assert d["exit_code"] == 0
                    assert got + d["stdout_dropped"] == n  # nothing lost unaccounted
    assert got > 0


def test_exec_bad_input(client: TestClient, sbx: dict[str, Any]) -> None:
    problem(exec_(client, sbx, cmd=[]), 400, "UsageError")
    problem(exec_(client, sbx, cmd="true", timeout=0), 422)
    problem(exec_(client, sbx, cmd="true", max_output=-1), 422)
    problem(exec_(client, sbx, cmd="echo a\u0000b"), 400, "UsageError")
    problem(exec_(client, sbx), 422)
    problem(exec_(client, sbx, cmd="true", env={"": "x"}), 400, "UsageError")
    r = exec_(client, sbx, cmd=["/no/such/program"])
    assert r.status_code == 200 and r.json()["exit_code"] == 127


def test_background_exec_processes_and_kill(client: TestClient, sbx: dict[str, Any]) -> None:
    r = exec_(client, sbx, cmd=["sleep", "4321"], background=True)
    assert r.status_code == 200, r.text
    pid = r.json()["pid"]
    ps = client.get(f"/v1/sandboxes/{sbx['id']}/processes").json()
    assert {"pid": pid, "cmdline": ["sleep", "4321"]} in ps
    r = client.post(f"/v1/sandboxes/{sbx['id']}/processes/{pid}/kill")
    assert r.status_code == 200 and r.json() == {"pid": pid, "killed": True}
    for _ in range(100):
        ps = client.get(f"/v1/sandboxes/{sbx['id']}/processes").json()
        if pid not in [p["pid"] for p in ps]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} survived its kill")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/processes/{pid}/kill"), 404, "NotFoundError")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/processes/1/kill"), 400, "UsageError")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/processes/x/kill"), 422)
    # stdin of a background command is delivered before the request ends
    r = exec_(client, sbx, cmd="cat > /tmp/bg-in", stdin="payload", background=True)
    assert r.status_code == 200
    for _ in range(100):
        got = client.get(f"/v1/sandboxes/{sbx['id']}/files?path=/tmp/bg-in")
        if got.status_code == 200 and got.content == b"payload":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a background command's stdin was lost")


# -- files ---------------------------------------------------------------------------------


def files(sb: dict[str, Any], path: str) -> str:
    return f"/v1/sandboxes/{sb['id']}/files?path={path}"


def test_files_upload_download_list_delete(client: TestClient, sbx: dict[str, Any]) -> None:
    data = os.urandom(3 << 20)
    r = client.put(files(sbx, "/data/sub/blob.bin") + "&mode=384", content=data)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(data) and r.json()["type"] == "file"
    assert r.json()["mode"] & 0o777 == 0o600
    r = client.get(files(sbx, "/data/sub/blob.bin"))
    assert r.status_code == 200 and r.content == data
    # a streamed (chunked) upload
    chunks = [b"x" * 100_000] * 7
    r = client.put(files(sbx, "/data/sub/streamed"), content=iter(chunks))
    assert r.status_code == 200 and r.json()["size"] == 700_000
    listing = client.get(f"/v1/sandboxes/{sbx['id']}/files/list?path=/data/sub").json()
    assert [(e["name"], e["type"]) for e in listing] == [("blob.bin", "file"), ("streamed", "file")]
    assert client.delete(files(sbx, "/data")).status_code == 204
    problem(client.get(files(sbx, "/data/sub/blob.bin")), 404, "NotFoundError")
    problem(client.get(f"/v1/sandboxes/{sbx['id']}/files/list?path=/data"), 404)
    problem(client.delete(files(sbx, "/data")), 404, "NotFoundError")


def test_file_paths_are_guest_paths_and_checked(client: TestClient, sbx: dict[str, Any]) -> None:
    problem(client.get(files(sbx, "etc/hostname")), 400, "UsageError")
    problem(client.put(files(sbx, "relative"), content=b"x"), 400, "UsageError")
    problem(client.get(files(sbx, "/etc/host%00name")), 400, "UsageError")
    problem(client.get(f"/v1/sandboxes/{sbx['id']}/files"), 422)
    problem(client.get(files(sbx, "/" + "a" * 5000)), 422)
    problem(client.get(files(sbx, "/etc")), 400, "UsageError")  # a folder
    problem(client.delete(files(sbx, "/")), 400, "UsageError")
    # ".." cannot leave the guest: this is the guest's /etc/hostname, not the host's
    r = client.get(files(sbx, "/../../../../etc/hostname"))
    assert r.status_code == 200
    with open("/etc/hostname", "rb") as f:
        host = f.read()
    assert r.content == exec_(client, sbx, cmd="cat /etc/hostname").json()["stdout"].encode()
    assert r.content != host or not host


def test_guest_refusals_are_client_errors(client: TestClient, sbx: dict[str, Any]) -> None:
    """What the guest refuses because of the path asked for is the client's error (4xx
    naming the path), not a 502 from the agent."""
    exec_(client, sbx, cmd="mkdir -p /tmp/g/dir && ln -sfn /tmp/g/dir /tmp/g/link")
    problem(client.get(files(sbx, "/tmp/g/link")), 400, "UsageError")  # a folder, via a link
    problem(client.put(files(sbx, "/tmp/g/dir"), content=b"x"), 400, "UsageError")
    # a file stands where a parent folder would be made
    problem(client.put(files(sbx, "/etc/hostname/x"), content=b"x"), 409, "ConflictError")
    problem(client.get(files(sbx, "/etc/hostname/x")), 404, "NotFoundError")
    problem(client.get(f"/v1/sandboxes/{sbx['id']}/files/list?path=/etc/hostname"), 400)
    problem(client.get(files(sbx, "/" + "x" * 300)), 400, "UsageError")  # a name too long


def test_upload_over_the_cap_is_413_and_leaves_no_file(
    paths: Paths, tokens: Tokens, sbx: dict[str, Any]
) -> None:
    app = create_app(Config(paths, allow_tcg=True, max_upload=64 << 10))
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        problem(c.put(files(sbx, "/tmp/big"), content=b"x" * (65 << 10)), 413)
        problem(c.put(files(sbx, "/tmp/big"), content=iter([b"x" * (16 << 10)] * 8)), 413)
        problem(c.get(files(sbx, "/tmp/big")), 404, "NotFoundError")
        r = c.put(files(sbx, "/tmp/small"), content=b"x" * (60 << 10))
        assert r.status_code == 200 and r.json()["size"] == 60 << 10


def test_cut_uploads_leave_nothing_behind_in_the_guest(
    paths: Paths, tokens: Tokens, sbx: dict[str, Any]
) -> None:
    """An upload cut short (413 mid-stream) leaves neither the file nor a temporary one;
    more cut uploads than the guest agent has upload slots (32) do not wear it out."""
    app = create_app(Config(paths, allow_tcg=True, max_upload=64 << 10))
    exec_c = lambda c, cmd: c.post(  # noqa: E731
        f"/v1/sandboxes/{sbx['id']}/exec", json={"cmd": cmd}
    ).json()
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        exec_c(c, "rm -rf /tmp/cut && mkdir /tmp/cut")
        for _ in range(40):
            r = c.put(files(sbx, "/tmp/cut/f"), content=iter([b"x" * (16 << 10)] * 8))
            problem(r, 413)
        r = c.put(files(sbx, "/tmp/cut/f"), content=b"whole")
        assert r.status_code == 200, r.text
        assert exec_c(c, "ls -A /tmp/cut")["stdout"] == "f\n"
        assert c.get(files(sbx, "/tmp/cut/f")).content == b"whole"


def test_console_logs(client: TestClient, sbx: dict[str, Any]) -> None:
    r = client.get(f"/v1/sandboxes/{sbx['id']}/logs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert client.get(f"/v1/sandboxes/{sbx['id']}/logs?tail=0").text == ""
    problem(client.get(f"/v1/sandboxes/{sbx['id']}/logs?tail=-1"), 422)


# -- disconnects (a real server: the TestClient cannot drop a connection) ------------------


def _running(sb: Sandbox, argv: list[str], want: bool = True) -> bool:
    """Whether ``argv`` runs in the guest (``want``), waiting up to 15 s for it."""
    for _ in range(150):
        if bool([p for p in sb.ps() if list(p.cmdline) == argv]) == want:
            return True
        time.sleep(0.1)
    return False


def _gone(sb: Sandbox, argv: list[str]) -> bool:
    return _running(sb, argv, want=False)


def test_client_that_leaves_mid_exec_ends_the_command(
    live_server: LiveServer, tokens: Tokens, sbx: dict[str, Any], paths: Paths
) -> None:
    h = {"Authorization": f"Bearer {tokens.default}"}
    url = f"{live_server.url}/v1/sandboxes/{sbx['id']}/exec"
    sb = Sandbox.connect(sbx["id"], paths=paths)
    try:
        with httpx.Client(timeout=60) as c:
            argv = ["sleep", "4401"]
            with c.stream(
                "POST",
                url,
                json={"cmd": "echo ready; exec sleep 4401", "timeout": None},
                headers={**h, "Accept": "text/event-stream"},
            ) as s:
                lines = s.iter_lines()  # kept: a dropped iterator closes the response
                for line in lines:
                    if "ready" in line:
                        break
                assert _running(sb, argv)
            # the response was closed before the exit: the command is killed
            assert _gone(sb, argv), "the SSE client left but its command runs on"
            # the same for a JSON exec whose client gives up
            argv = ["sleep", "4402"]
            with pytest.raises(httpx.ReadTimeout):
                c.post(url, json={"cmd": argv, "timeout": None}, headers=h, timeout=5)
            assert _gone(sb, argv), "the JSON client left but its command runs on"
    finally:
        sb.close()


@pytest.fixture
def inproc_url(app) -> Iterator[str]:
    """The app under uvicorn in this process (its threads and module settings visible)."""
    import threading

    import uvicorn

    from tests.server.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(30)


def test_no_host_thread_outlives_a_client_that_left(
    inproc_url: str, tokens: Tokens, sbx: dict[str, Any], paths: Paths
) -> None:
    """After an SSE client leaves mid-command, the thread reading its output ends too."""
    import threading

    h = {"Authorization": f"Bearer {tokens.default}", "Accept": "text/event-stream"}
    url = f"{inproc_url}/v1/sandboxes/{sbx['id']}/exec"
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", url, json={"cmd": "yes", "timeout": None}, headers=h) as s,
    ):
        chunks = s.iter_bytes()
        assert next(chunks)
        assert [x for x in threading.enumerate() if x.name == "torpor-server-exec"]
    for _ in range(150):
        if not [x for x in threading.enumerate() if x.name == "torpor-server-exec"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the exec reader thread runs on after its client left")
    sb = Sandbox.connect(sbx["id"], paths=paths)
    try:
        assert _gone(sb, ["yes"])
    finally:
        sb.close()


def test_a_slow_client_loses_output_not_server_memory(
    inproc_url: str,
    tokens: Tokens,
    sbx: dict[str, Any],
    paths: Paths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server holds at most STREAM_BUFFER bytes for a client that does not read;
    what it could not hold is counted in the exit event, so nothing goes missing silently."""
    from torpor.server.routes import sandboxes

    monkeypatch.setattr(sandboxes, "STREAM_BUFFER", 256 << 10)
    n = 16 << 20
    h = {"Authorization": f"Bearer {tokens.default}", "Accept": "text/event-stream"}
    url = f"{inproc_url}/v1/sandboxes/{sbx['id']}/exec"
    body = {"cmd": f"head -c {n} /dev/zero | tr '\\0' a", "timeout": 300}
    with httpx.Client(timeout=120) as c, c.stream("POST", url, json=body, headers=h) as s:
        raw = s.iter_raw()
        first = next(raw)
        # not reading until the command has written everything: the socket buffers
        # (a few MiB) fill, then the server's buffer, then output is dropped
        sb = Sandbox.connect(sbx["id"], paths=paths)
        try:
            for _ in range(1200):
                # the command's shell runs from its start (before the answer) to its end
                if not [p for p in sb.ps() if list(p.cmdline) == ["/bin/sh", "-c", body["cmd"]]]:
                    break
                time.sleep(0.1)
        finally:
            sb.close()
        text = (first + b"".join(raw)).decode()
    ev = sse_events(text)
    got = sum(len(d) for _, e, d in ev if e == "stdout")
    end = ev[-1]
    assert end[1] == "exit" and end[2]["exit_code"] == 0, end
    assert end[2]["stdout_dropped"] > 0 and got + end[2]["stdout_dropped"] == n


def test_an_uploader_that_leaves_leaves_nothing(
    inproc_url: str, tokens: Tokens, sbx: dict[str, Any], client: TestClient
) -> None:
    import socket
    import urllib.parse

    exec_(client, sbx, cmd="rm -rf /tmp/gone && mkdir /tmp/gone")
    u = urllib.parse.urlsplit(inproc_url)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(
            (
                f"PUT /v1/sandboxes/{sbx['id']}/files?path=/tmp/gone/f HTTP/1.1\r\n"
                f"Host: {u.netloc}\r\nAuthorization: Bearer {tokens.default}\r\n"
                "Content-Length: 10000000\r\n\r\n"
            ).encode()
            + b"x" * 300_000
        )
        time.sleep(1)
    for _ in range(100):  # the server notices, lets the guest finish, removes the rest
        if exec_(client, sbx, cmd="ls -A /tmp/gone").json()["stdout"] == "":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(exec_(client, sbx, cmd="ls -lA /tmp/gone").json()["stdout"])
    r = client.put(files(sbx, "/tmp/gone/f"), content=b"ok")
    assert r.status_code == 200 and client.get(files(sbx, "/tmp/gone/f")).content == b"ok"


# -- other namespaces, auth ------------------------------------------------------------------


def sandbox_routes(ref: str) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"/v1/sandboxes/{ref}"
    return [
        ("GET", base, {}),
        ("DELETE", base, {}),
        ("POST", f"{base}/exec", {"json": {"cmd": "true"}}),
        ("POST", f"{base}/exec", {"json": {"cmd": "true", "background": True}}),
        ("GET", f"{base}/processes", {}),
        ("POST", f"{base}/processes/5/kill", {}),
        ("GET", f"{base}/files?path=/etc/hostname", {}),
        ("PUT", f"{base}/files?path=/tmp/x", {"content": b"x"}),
        ("DELETE", f"{base}/files?path=/tmp/x", {}),
        ("GET", f"{base}/files/list?path=/", {}),
        ("GET", f"{base}/logs", {}),
        ("POST", f"{base}/snapshot", {"json": {}}),
        ("POST", f"{base}/fork", {"json": {"n": 1}}),
        ("POST", f"{base}/hibernate", {}),
        ("POST", f"{base}/wake", {}),
        ("POST", f"{base}/stop", {}),
    ]


def test_another_namespace_sees_404_on_every_route(
    other_api: TestClient, client: TestClient, sbx: dict[str, Any]
) -> None:
    for ref in (sbx["id"], sbx["id"][:12], sbx["name"]):
        for method, url, kw in sandbox_routes(ref):
            problem(other_api.request(method, url, **kw), 404, "NotFoundError")
    assert sbx["id"] not in [s["id"] for s in other_api.get("/v1/sandboxes").json()["items"]]
    # and nothing happened to it
    assert client.get(f"/v1/sandboxes/{sbx['id']}").json()["status"] == "running"


def test_unknown_sandbox_is_404_and_no_token_401(app, client: TestClient) -> None:
    for method, url, kw in sandbox_routes("no-such-sandbox"):
        problem(client.request(method, url, **kw), 404, "NotFoundError")
    for method, url, kw in sandbox_routes("..%2F..%2Fetc"):
        assert client.request(method, url, **kw).status_code in (404, 400), url
    with TestClient(app) as anon:
        for method, url, kw in sandbox_routes("x"):
            problem(anon.request(method, url, **kw), 401)
        problem(anon.get("/v1/sandboxes"), 401)
        problem(anon.post("/v1/sandboxes", json={}), 401)


# -- snapshots, forks, hibernation, stop (they change sbx: last) ------------------------------


def test_snapshot_and_fork(client: TestClient, sbx: dict[str, Any]) -> None:
    exec_(client, sbx, cmd="echo before > /tmp/mark")
    r = client.post(f"/v1/sandboxes/{sbx['id']}/snapshot", json={"tag": f"api-{os.getpid()}"})
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["tag"] == f"api-{os.getpid()}" and len(snap["id"]) == 64
    key = {"Idempotency-Key": f"fork-{time.time()}"}
    r = client.post(f"/v1/sandboxes/{sbx['id']}/fork", json={"n": 1}, headers=key)
    assert r.status_code == 201, r.text
    kids = r.json()
    try:
        assert len(kids) == 1 and kids[0]["id"] != sbx["id"] and kids[0]["status"] == "running"
        assert (
            client.post(f"/v1/sandboxes/{sbx['id']}/fork", json={"n": 1}, headers=key).json()
            == kids
        )
        r = exec_(client, kids[0], cmd="cat /tmp/mark; hostname")
        assert r.json()["stdout"] == f"before\n{kids[0]['name']}\n"
    finally:
        for k in kids:
            client.delete(f"/v1/sandboxes/{k['id']}")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/fork", json={"n": 0}), 422)
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/fork", json={"n": 1000}), 422)
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/snapshot", json={"tag": ""}), 422)


def test_hibernate_wake_and_use_wakes(
    client: TestClient,
    sbx: dict[str, Any],
    paths: Paths,
    tokens: Tokens,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torpor.vmm.boot import resolve_accel

    exec_(client, sbx, cmd="echo kept > /tmp/kept")
    r = client.post(f"/v1/sandboxes/{sbx['id']}/hibernate")
    assert r.status_code == 200, r.text
    snap = r.json()["id"]
    assert client.get(f"/v1/sandboxes/{sbx['id']}").json()["status"] == "hibernated"
    assert client.post(f"/v1/sandboxes/{sbx['id']}/hibernate").json()["id"] == snap
    r = client.post(f"/v1/sandboxes/{sbx['id']}/wake")
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert client.post(f"/v1/sandboxes/{sbx['id']}/wake").json()["status"] == "running"
    client.post(f"/v1/sandboxes/{sbx['id']}/hibernate")
    if resolve_accel(paths, "auto") == "tcg":  # waking starts a VM: isolation first
        monkeypatch.delenv("TORPOR_ALLOW_TCG", raising=False)
        strict = create_app(Config(paths, allow_tcg=False))
        with TestClient(strict, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
            for method, url, kw in (
                ("POST", f"/v1/sandboxes/{sbx['id']}/exec", {"json": {"cmd": "true"}}),
                ("POST", f"/v1/sandboxes/{sbx['id']}/wake", {}),
                ("GET", files(sbx, "/tmp/kept"), {}),
                ("GET", f"/v1/sandboxes/{sbx['id']}/processes", {}),
            ):
                problem(c.request(method, url, **kw), 403, "TCGRefusedError")
            with (
                pytest.raises(WebSocketDenialResponse) as ei,
                c.websocket_connect(f"/v1/sandboxes/{sbx['id']}/pty"),
            ):
                pass
            assert ei.value.status_code == 403
        assert client.get(f"/v1/sandboxes/{sbx['id']}").json()["status"] == "hibernated"
    r = exec_(client, sbx, cmd="cat /tmp/kept")  # a use wakes it, as in the library
    assert r.json()["stdout"] == "kept\n"


def test_stop(client: TestClient, sbx: dict[str, Any]) -> None:
    r = client.post(f"/v1/sandboxes/{sbx['id']}/stop", json={"timeout": 1})
    assert r.status_code == 200 and r.json()["status"] in ("exited", "stopped", "dead"), r.text
    problem(exec_(client, sbx, cmd="true"), 409, "ConflictError")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/snapshot", json={}), 409, "ConflictError")
    problem(client.post(f"/v1/sandboxes/{sbx['id']}/stop", json={"timeout": -1}), 422)
    assert sbx["id"] in [
        s["id"] for s in client.get(f"/v1/sandboxes?status={r.json()['status']}").json()["items"]
    ]

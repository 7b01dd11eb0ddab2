"""torpor.Client against a real ``torpor serve`` process: the same scenario run with the
local library and through the server gives the same results and the same errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

import torpor
from tests.server.conftest import LiveServer, Tokens
from torpor.client import Client
from torpor.errors import (
    ExecTimeoutError,
    NotFoundError,
    NotSupportedError,
    TorporError,
    UsageError,
)
from torpor.sandbox import CommandResult, EntryInfo, SandboxInfo, Snapshot

pytestmark = pytest.mark.vm


@pytest.fixture
def client(live_server: LiveServer, tokens: Tokens, tools_image: str) -> Iterator[Client]:
    with torpor.Client(live_server.url, tokens.default) as c:
        yield c


def sandbox_scenario(Sandbox: Any) -> dict[str, Any]:
    """Everything a user does with one sandbox; the answers, minus ids and times."""
    out: dict[str, Any] = {}
    with Sandbox.create("tools:latest", memory="256M", network=False, labels={"t": "client"}) as sb:
        info = sb.info()
        assert isinstance(info, SandboxInfo)
        out["info"] = (info.image, info.status, info.labels.get("t"), info.memory_mib, info.cpus)
        r = sb.exec("echo out; echo err >&2; exit 3")
        assert isinstance(r, CommandResult)
        out["exec"] = r
        out["exec_argv"] = sb.exec(["sh", "-c", 'echo "$1"', "-", "a b; rm -rf /"]).stdout
        out["env"] = sb.exec('pwd; echo "$CI"', cwd="/tmp", env={"CI": "1"}).stdout
        out["stdin"] = sb.exec("cat", stdin="fed\n").stdout
        chunks: list[str] = []
        errs: list[str] = []
        r = sb.exec(
            "for i in 1 2 3; do echo $i; done; echo e >&2",
            on_stdout=chunks.append,
            on_stderr=errs.append,
        )
        out["streamed"] = ("".join(chunks), "".join(errs), r.stdout, r.exit_code)
        e = sb.files.write("/root/dir/f.txt", "hello\n")
        assert isinstance(e, EntryInfo)
        out["write"] = (e.name, e.path, e.type, e.size, e.mode & 0o777)
        out["read"] = sb.files.read("/root/dir/f.txt")
        out["read_bytes"] = sb.files.read("/root/dir/f.txt", format="bytes")
        out["list"] = [(x.name, x.type, x.size) for x in sb.files.list("/root/dir")]
        sb.files.write("/root/bin.dat", bytes(range(256)))
        out["binary"] = sb.files.read("/root/bin.dat", format="bytes") == bytes(range(256))
        sb.files.remove("/root/dir")
        out["removed"] = sb.files.exists("/root/dir/f.txt")
        sb.exec("echo before-snapshot > /root/state")
        snap = sb.snapshot(tag="client-test")
        assert isinstance(snap, Snapshot)
        out["snap_tag"] = snap.tag
        sb.exec("echo after > /root/state")
        with Sandbox.restore(snap) as sb2:
            out["restored"] = sb2.exec("cat /root/state").stdout
            out["restored_status"] = sb2.info().status
        out["listed"] = sb.id in [i.id for i in Sandbox.list(labels={"t": "client"})]
    return out


def test_sandbox_scenario_is_the_same_locally_and_remotely(client: Client) -> None:
    local = sandbox_scenario(torpor.Sandbox)
    remote = sandbox_scenario(client.Sandbox)
    assert remote == local
    assert local["exec"] == CommandResult(3, "out\n", "err\n")
    assert local["restored"] == "before-snapshot\n"
    assert local["streamed"] == ("1\n2\n3\n", "e\n", "1\n2\n3\n", 0)


def errors_scenario(Sandbox: Any, sb: Any) -> list[tuple[type, str]]:
    """The error class (and a stable part of the message) of each misuse."""
    got: list[tuple[type, str]] = []

    def expect(fn: Any, *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except TorporError as e:
            got.append((type(e), str(e)[:40]))
        else:
            got.append((type(None), "no error"))

    expect(Sandbox.connect, "no-such-sandbox")
    expect(Sandbox.get_info, "no-such-sandbox")
    expect(sb.files.read, "/no/such/file")
    expect(sb.files.read, "relative/path")
    expect(sb.exec, "sleep 30", timeout=2)
    expect(sb.exec, [])
    return got


def test_errors_map_back_to_the_same_classes(client: Client) -> None:
    local_sb = torpor.Sandbox.create("tools:latest", memory="256M", network=False)
    try:
        local = errors_scenario(torpor.Sandbox, local_sb)
        remote_sb = client.Sandbox.connect(local_sb.id)  # the same VM, through the server
        remote = errors_scenario(client.Sandbox, remote_sb)
        classes = [c for c, _ in local]
        assert [c for c, _ in remote] == classes
        assert classes == [
            NotFoundError,
            NotFoundError,
            NotFoundError,
            UsageError,
            ExecTimeoutError,
            UsageError,
        ]
        # the server's message is the library's own
        assert [m for _, m in remote][:3] == [m for _, m in local][:3]
        with pytest.raises(ExecTimeoutError) as ei:
            remote_sb.exec("echo started; sleep 30", timeout=2)
        assert ei.value.stdout == "started\n" and ei.value.status == 504  # type: ignore[attr-defined]
    finally:
        with contextlib.suppress(TorporError):
            local_sb.kill()


def test_what_the_api_cannot_do_says_so(client: Client) -> None:
    with pytest.raises(UsageError):
        client.Sandbox.create(paths=object())  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        client.Sandbox.get_info("nope")
    sbs = client.Sandbox.list()
    assert all(isinstance(i, SandboxInfo) for i in sbs)
    with pytest.raises(NotSupportedError):
        client.Sandbox(SandboxInfo("x" * 12, "x", "tools:latest", "running")).exec(
            "true", stdin=True
        )


def test_a_token_of_another_namespace_sees_nothing(
    live_server: LiveServer, tokens: Tokens, client: Client
) -> None:
    sb = client.Sandbox.create("tools:latest", memory="256M", network=False)
    try:
        with torpor.Client(live_server.url, tokens.other) as other:
            with pytest.raises(NotFoundError):
                other.Sandbox.connect(sb.id)
            assert sb.id not in [i.id for i in other.Sandbox.list()]
        with torpor.Client(live_server.url, "tpr_bad_token") as bad:
            with pytest.raises(TorporError) as ei:
                bad.Sandbox.list()
            assert ei.value.status == 401  # type: ignore[attr-defined]
    finally:
        sb.kill()


#: A deterministic model: each turn appends the message to a journal in the VM and
#: answers with the journal, so forks and restores show in the answers.
JOURNAL = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {
                    "text": "noting it",
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {"cmd": "echo {user_sh} >> /root/j; cat /root/j"},
                        }
                    ],
                },
                {"text": "journal: {last_result}"},
            ]
        }
    ],
    "after_end": "repeat-last",
}


def session_scenario(Session: Any, model: Any) -> dict[str, Any]:
    """Everything a user does with one session; the answers, minus ids and times."""
    out: dict[str, Any] = {}
    seen: list[Any] = []
    s = Session.create("tools:latest", model, memory_mib=256, on_event=seen.append)
    try:
        out["created"] = (s.status(), [(c.turn, c.reason) for c in s.checkpoints])
        seen.clear()
        out["a1"] = s.send("alpha")
        out["events1"] = [(e.seq, e.kind.value, e.turn) for e in seen]
        out["log1"] = [(e.seq, e.kind.value, e.turn) for e in s.log()]
        assert out["events1"] == [x for x in out["log1"] if x[0] > out["events1"][0][0] - 1]
        out["entries_after"] = [e.seq for e in s.entries(after=3)]
        cks = s.checkpoints
        out["checkpoints"] = [(c.seq, c.turn, c.reason) for c in cks]
        ck = s.hibernate()
        out["hibernate"] = (ck.turn, ck.reason, s.status())
        s.wake()
        out["woken"] = s.status()
        seen.clear()
        out["a2"] = s.send("beta")
        out["events2"] = [e.kind.value for e in seen]
        e = s.append("app.note", {"x": 1}, key="k1")
        again = s.append("app.note", {"x": 1}, key="k1")
        out["append"] = (e.kind.value, e.payload, again.seq == e.seq)
        mine = s.checkpoint("mine")
        out["checkpoint"] = (mine.turn, mine.reason, mine.seq == s.checkpoints[-1].seq)
        f = s.fork(at=cks[-1].seq, name=None)
        try:
            out["fork"] = (f.record.parent_id == s.id, f.record.parent_seq == cks[-1].seq)
            out["fork_a"] = f.send("gamma")
        finally:
            out["fork_removed"] = type(f.remove())
        out["a3"] = s.send("delta")
    finally:
        out["removed"] = type(s.remove())
        s.close()
    return out


def test_session_scenario_is_the_same_locally_and_remotely(client: Client, tmp_path) -> None:
    import json

    script = tmp_path / "journal.json"
    script.write_text(json.dumps(JOURNAL))
    local = session_scenario(torpor.Session, f"scripted:{script}")
    remote = session_scenario(client.Session, JOURNAL)
    assert remote == local
    assert local["a1"] == "journal: alpha"
    assert local["a2"] == "journal: alpha\nbeta"
    assert local["fork_a"] == "journal: alpha\ngamma"  # the fork's VM is the turn-1 machine
    assert local["a3"] == "journal: alpha\nbeta\ndelta"
    assert local["hibernate"][1:] == ("hibernate", "hibernated")


class CuttingProxy:
    """A TCP proxy in front of the server that drops the connection of the first
    answer containing ``marker``, forwarding only what came before it (a dropped
    connection, not a fake server)."""

    def __init__(self, upstream: str, marker: bytes = b"event: entry"):
        import socket
        import threading
        from urllib.parse import urlsplit

        u = urlsplit(upstream)
        self.up = (u.hostname, u.port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.cut = 0
        self.marker = marker
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.up)
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def _pipe(self, src: Any, dst: Any, from_server: bool) -> None:
        seen = b""
        try:
            while data := src.recv(65536):
                if from_server:
                    seen += data
                    with self._lock:
                        cut = not self.cut and self.marker in seen
                        self.cut += cut
                    if cut:  # forward up to the first entry, then drop the connection
                        end = seen.index(self.marker)
                        dst.sendall(data[: max(0, len(data) - (len(seen) - end))])
                        break
                    seen = seen[-64:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            import socket

            for s in (src, dst):  # shutdown first: it wakes the other pipe's recv()
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.vm
def test_a_send_whose_stream_is_cut_runs_the_turn_once(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    """The connection drops after the turn's first entry: the client follows the log
    to the turn's end and resends with the same key; every entry reaches on_event
    once, in order, and the log holds one turn."""
    proxy = CuttingProxy(live_server.url)
    seen: list[Any] = []
    try:
        with torpor.Client(proxy.url, tokens.default) as c:
            s = c.Session.create("tools:latest", JOURNAL, memory_mib=256, on_event=seen.append)
            try:
                before = s.log()[-1].seq
                answer = s.send("once")
                assert proxy.cut == 1  # the stream was really cut
                assert answer == "journal: once"
                log = s.log(after=before)
                assert [e.seq for e in seen] == [e.seq for e in log]  # each once, in order
                assert [e.kind.value for e in log].count("user") == 1
                assert s.send("again") == "journal: once\nagain"  # the machine ran it once
            finally:
                s.remove()
    finally:
        proxy.close()


@pytest.mark.vm
def test_a_create_whose_answer_is_lost_makes_one_sandbox(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    """The server creates the sandbox, the connection drops before its answer: the
    client sends the create again with the same Idempotency-Key and gets the same
    sandbox, and no second VM exists."""
    proxy = CuttingProxy(live_server.url, marker=b"HTTP/1.1 201")
    try:
        with torpor.Client(proxy.url, tokens.default) as c:
            sb = c.Sandbox.create(
                "tools:latest", memory="256M", network=False, labels={"t": "idem"}
            )
            try:
                assert proxy.cut == 1  # the first answer was really lost
                assert [i.id for i in c.Sandbox.list(labels={"t": "idem"})] == [sb.id]
                assert sb.exec("echo up").stdout == "up\n"
            finally:
                sb.kill()
    finally:
        proxy.close()


def pty_scenario(sb: Any) -> tuple[bool, bool, int]:
    with sb.pty("sh", 80, 24) as p:
        p.write("echo $((6*7))\n")
        shown = b"42\r\n" in p.read_until("42\r\n", timeout=60)
        p.resize(100, 30)
        p.write("stty size\n")
        resized = b"30 100" in p.read_until("30 100", timeout=60)
        p.write("exit 3\n")
        return shown, resized, p.wait(60)


@pytest.mark.vm
def test_pty_and_background_commands(client: Client) -> None:
    local = torpor.Sandbox.create("tools:latest", memory="256M", network=False)
    try:
        remote_sb = client.Sandbox.connect(local.id)
        assert pty_scenario(remote_sb) == pty_scenario(local) == (True, True, 3)
        # a background command: its pid, listed by ps, ended by kill()
        p = remote_sb.exec("sleep 1000", background=True)
        assert p.pid > 0 and p.pid in [x.pid for x in remote_sb.ps()]
        with pytest.raises(NotSupportedError):
            p.wait()
        p.kill()
        gone = remote_sb.exec(
            f"for i in $(seq 30); do kill -0 {p.pid} 2>/dev/null || exit 0; sleep 1; done; exit 1"
        )
        assert gone.exit_code == 0, f"background command {p.pid} still runs after kill()"
        with pytest.raises(NotFoundError):
            client.Sandbox(SandboxInfo("no-such-vm", "x", "tools:latest", "running")).pty()
    finally:
        local.kill()


def test_a_server_not_yet_listening_is_retried(tmp_path) -> None:
    """Connection refused is retried (the request never reached a server): a client
    started before the server answers once it listens; with one attempt it fails
    naming the server, with no status."""
    import os
    import subprocess
    import sys

    from tests.server.conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with torpor.Client(url, retries=1) as c, pytest.raises(TorporError) as ei:
        c.info()
    assert ei.value.status is None and url in str(ei.value)  # type: ignore[attr-defined]
    env = {**os.environ, "TORPOR_HOME": str(tmp_path / "h")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "serve", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with torpor.Client(url, retries=10) as c:  # up to ~40 s of backoff
            assert c.info()["namespace"] == "default"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.vm
def test_follow_streams_new_entries_as_they_are_appended(client: Client) -> None:
    import threading

    s = client.Session.create("tools:latest", JOURNAL, memory_mib=256)
    try:
        last = s.log()[-1].seq
        got: list[Any] = []
        done = threading.Event()

        def follow() -> None:
            for e in s.follow(after=last, stop=done.is_set):
                got.append(e)
                if e.kind.value == "checkpoint":
                    done.set()

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        assert s.send("followed") == "journal: followed"
        t.join(120)
        assert done.is_set() and not t.is_alive()
        assert [e.seq for e in got] == [e.seq for e in s.log(after=last)]
        assert got[0].kind.value == "user" and got[0].payload == {"content": "followed"}
    finally:
        s.remove()


def test_defaults_come_from_torpor_host_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_HOST", "127.0.0.1:7878")
    monkeypatch.setenv("TORPOR_TOKEN", "tpr_a_b")
    with torpor.Client() as c:
        assert c.url == "http://127.0.0.1:7878"
        assert c._t.http.headers["Authorization"] == "Bearer tpr_a_b"
    monkeypatch.delenv("TORPOR_HOST")
    with pytest.raises(UsageError, match="TORPOR_HOST"):
        torpor.Client()
    with pytest.raises(UsageError):
        torpor.Client("ftp://host")


def test_sse_parser_and_error_mapping() -> None:
    from torpor.client import _wire as W
    from torpor.errors import ChunkMissingError, ConflictError

    p = W.SSEParser()
    lines = [": keep-alive", "", "id: 7", "event: entry", 'data: {"a":', "data: 1}", ""]
    evs = [e for e in map(p.feed, lines) if e is not None]
    assert evs == [W.Event("entry", '{"a":\n1}', "7")] and p.last_id == "7"
    # the class named by the problem, never one outside torpor's errors
    e = W.error_from(409, {"detail": "busy", "error": "ConflictError", "step": "send"})
    assert type(e) is ConflictError and str(e) == "send: busy" and e.status == 409  # type: ignore[attr-defined]
    e = W.error_from(507, {"detail": "gone", "error": "ChunkMissingError"})
    assert type(e) is ChunkMissingError and e.missing == ()
    for name in ("SystemExit", "os.system", "Exception", "__class__"):
        assert type(W.error_from(500, {"detail": "x", "error": name})) is TorporError
    assert type(W.error_from(404, "not json")) is NotFoundError

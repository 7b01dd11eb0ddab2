"""The Sandbox API on real VMs: exec, background commands, files, errors, async."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from torpor import aio
from torpor.errors import (
    ConflictError,
    ExecTimeoutError,
    NotFoundError,
    UsageError,
)
from torpor.paths import Paths
from torpor.sandbox import CommandHandle, Sandbox

pytestmark = pytest.mark.vm


def test_exec_result_cwd_env_user(sb: Sandbox) -> None:
    r = sb.exec("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = sb.exec('pwd; echo "$CI"; id -u', cwd="/tmp", env={"CI": "1"}, user="nobody")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:2] == ["/tmp", "1"] and lines[2] != "0"
    assert sb.exec(["sh", "-c", 'echo "$1"', "-", "a b; rm -rf /"]).stdout == "a b; rm -rf /\n"


def test_exec_streams_to_callbacks_and_caps_what_it_keeps(sb: Sandbox) -> None:
    got: list[str] = []
    errs: list[str] = []
    n = 3_000_000
    r = sb.exec(
        f"head -c {n} /dev/zero | tr '\\0' a; echo done >&2",
        on_stdout=got.append,
        on_stderr=errs.append,
        max_output=1 << 20,
    )
    assert r.exit_code == 0
    assert sum(len(c) for c in got) == n and set("".join(got)) == {"a"}
    assert "".join(errs) == "done\n" == r.stderr
    assert len(r.stdout) <= 1 << 20 and len(r.stdout) + r.stdout_dropped == n


def test_exec_keeps_the_first_bytes_of_a_chunk_that_does_not_fit(sb: Sandbox) -> None:
    # one write larger than the cap used to be dropped whole: stdout came back empty
    r = sb.exec("head -c 4000 /dev/zero | tr '\\0' b", max_output=1000)
    assert r.exit_code == 0
    assert r.stdout == "b" * 1000 and r.stdout_dropped == 3000


def test_exec_timeout_kills_the_process_group_and_says_so(sb: Sandbox) -> None:
    with pytest.raises(ExecTimeoutError, match="process group was killed") as ei:
        sb.exec("sleep 1000 & echo $! > /tmp/tchild; echo started; wait", timeout=3)
    assert ei.value.stdout == "started\n"
    child = sb.files.read("/tmp/tchild").strip()
    # the background child was in the command's group: SIGKILL reached it too
    r = sb.exec(f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 {child} || exit 0; sleep 1; done")
    assert r.exit_code == 0, f"child {child} of the timed-out command is still alive"


def test_background_command_pid_kill_wait_processes(sb: Sandbox) -> None:
    p = sb.exec("echo up; sleep 1000", background=True)
    assert isinstance(p, CommandHandle) and p.pid > 0
    assert p in sb.processes()
    assert sb.exec(f"kill -0 {p.pid}").exit_code == 0
    p.kill()
    r = p.wait(timeout=60)
    assert r.exit_code == 128 + signal.SIGKILL and r.stdout == "up\n"
    assert p not in sb.processes()
    q = sb.exec(["cat"], background=True, stdin=True)
    q.send_stdin(b"hello")
    q.close_stdin()
    assert q.wait(timeout=60).stdout == "hello"
    assert sb.exec("cat", stdin="fed").stdout == "fed"
    assert sb.exec("cat").stdout == ""  # no stdin: EOF at once, no hang


def test_files_roundtrip(sb: Sandbox) -> None:
    f = sb.files
    info = f.write("/app/sub/a.py", b"print(1)\n")
    assert (info.type, info.size) == ("file", 9)
    assert f.read("/app/sub/a.py") == "print(1)\n"
    assert f.read("/app/sub/a.py", format="bytes") == b"print(1)\n"
    assert b"".join(f.read_stream("/app/sub/a.py")) == b"print(1)\n"
    assert [(e.name, e.type) for e in f.list("/app")] == [("sub", "dir")]
    assert f.exists("/app/sub/a.py") and not f.exists("/app/nope")
    assert f.make_dir("/app/d/e") is True and f.make_dir("/app/d/e") is False
    assert f.rename("/app/sub/a.py", "/app/d/b.py").path == "/app/d/b.py"
    assert not f.exists("/app/sub/a.py")
    f.remove("/app/d")
    assert not f.exists("/app/d/b.py") and not f.exists("/app/d")
    with pytest.raises(NotFoundError):
        f.read("/app/nope")
    with pytest.raises(NotFoundError):
        f.remove("/app/nope")
    with pytest.raises(NotFoundError):
        f.list("/app/nope")
    with pytest.raises(UsageError):
        f.read("relative/path")
    for root in ("/", "//", "/.", "/tmp/..", "/./"):
        with pytest.raises(UsageError):
            f.remove(root)
    name = "/tmp/x; touch /tmp/pwned"
    f.write(name, "1")
    f.remove(name)  # a path is one argv entry, never shell text
    assert not f.exists("/tmp/pwned") and not f.exists(name)


def test_bad_or_unsupported_parameters_are_typed_errors(sb: Sandbox, paths: Paths) -> None:
    before = {i.id for i in Sandbox.list(all=True, paths=paths)}
    with pytest.raises(UsageError, match="idle"):
        Sandbox.create("tools:latest", idle=0, paths=paths)
    with pytest.raises(UsageError, match="timeout"):
        Sandbox.create("tools:latest", timeout=-1, paths=paths)
    assert {i.id for i in Sandbox.list(all=True, paths=paths)} == before  # nothing made
    with pytest.raises(UsageError, match="cols"):
        sb.pty("sh", cols=0, rows=40)
    with pytest.raises(UsageError):
        sb.exec("true", timeout=0)
    with pytest.raises(UsageError):
        sb.exec("true", env={"A=B": "x"})


def test_list_info_connect(sb: Sandbox, paths: Paths) -> None:
    listed = Sandbox.list(labels={"suite": "sandbox"}, paths=paths)
    assert [i.id for i in listed] == [sb.id]
    assert Sandbox.list(labels={"suite": "other"}, paths=paths) == []
    info = Sandbox.get_info(sb.id, paths=paths)
    assert (info.status, info.memory_mib, info.labels) == ("running", 256, {"suite": "sandbox"})
    assert sb.is_running()
    other = Sandbox.connect(sb.id[:12], paths=paths)
    try:
        assert other.id == sb.id and other.exec("echo hi").stdout == "hi\n"
    finally:
        other.close()
    with pytest.raises(NotFoundError):
        Sandbox.connect("no-such-sandbox", paths=paths)


def test_exec_from_threads_share_one_connection(sb: Sandbox) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda i: sb.exec(f"echo {i}").stdout, range(16)))
    assert outs == [f"{i}\n" for i in range(16)]


def test_aio_sandbox_same_methods(sb: Sandbox) -> None:
    async def main() -> None:
        a = aio.Sandbox(sb)
        r = await a.exec("echo async")
        assert r.stdout == "async\n"
        await a.files.write("/tmp/aio.txt", "x")
        assert await a.files.read("/tmp/aio.txt") == "x"
        p = await a.exec("sleep 1000", background=True)
        rs = await asyncio.gather(*(a.exec(f"echo {i}") for i in range(4)))
        assert [x.stdout for x in rs] == [f"{i}\n" for i in range(4)]
        await p.kill()
        assert (await p.wait(timeout=60)).exit_code == 137
        q = await a.commands.run("read x; echo got $x", background=True, stdin=True)
        h = await a.commands.connect(q.pid)
        await h.send_stdin("z\n")
        assert [c async for c in h.output(timeout=60)] == [("stdout", b"got z\n")]
        assert await a.is_running()

    asyncio.run(main())


def test_commands_namespace_e2b_names(sb: Sandbox) -> None:
    assert sb.commands.run("echo $X", envs={"X": "e2b"}).stdout == "e2b\n"
    p = sb.commands.run("sleep 1000", background=True)
    assert sb.commands.connect(p.pid) is p and p in sb.commands.list()
    assert sb.commands.kill(p.pid) is True
    assert p.wait(timeout=60).exit_code == 137
    # a process this object did not start: killed through the guest's kill
    other = sb.exec("sleep 1000 > /dev/null 2>&1 & echo $!").stdout.strip()
    assert sb.commands.kill(int(other)) is True
    assert sb.exec(f"sleep 1; kill -0 {other}").exit_code != 0
    assert sb.commands.kill(999999) is False
    with pytest.raises(NotFoundError):
        sb.commands.connect(999999)
    with pytest.raises(UsageError):
        sb.commands.connect(0)


def test_ps_lists_processes_started_through_any_connection(sb: Sandbox, paths: Paths) -> None:
    other = Sandbox.connect(sb.id, paths=paths)
    try:
        p = other.exec(["sleep", "4242"], background=True)
        found = [x for x in sb.ps() if x.cmdline == ("sleep", "4242")]
        assert [x.pid for x in found] == [p.pid]
        assert p in sb.processes()  # any object of this process reconnects to it
        sb.commands.kill(p.pid)
        assert p.wait(timeout=60).exit_code == 137
    finally:
        other.close()


RECONNECT_FROM_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from torpor.paths import Paths
from torpor.sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1], paths=Paths(Path(sys.argv[2])))
waits = sb.exec("read x; echo got $x; echo err >&2; exit 5", background=True, stdin=True)
ends = sb.exec("sleep 1; echo gone; exit 9", background=True)
print(waits.pid, ends.pid)
"""


def test_another_sandbox_object_reconnects_to_a_background_command(
    sb: Sandbox, paths: Paths
) -> None:
    other = Sandbox.connect(sb.id, paths=paths)
    try:
        p = other.exec("read x; echo got $x; echo err >&2; exit 3", background=True, stdin=True)
        h = sb.commands.connect(p.pid)  # a second object: its further output, its exit code
        assert h is p and p in sb.processes()
        h.send_stdin("hi\n")
        r = h.wait(timeout=60)
        assert (r.exit_code, r.stdout, r.stderr) == (3, "got hi\n", "err\n")
        assert p not in sb.processes() and p not in other.processes()
        # its starter closes: the command is reattached through the shim
        q = other.exec("read x; echo late $x", background=True, stdin=True)
        other.close()
        hq = sb.commands.connect(q.pid)
        assert hq is not q and hq in sb.processes()
        hq.send_stdin("q\n")
        assert (hq.wait(timeout=60).exit_code, hq.exit_code) == (0, 0)
    finally:
        other.close()


def test_a_command_started_by_another_process_is_reconnected_to(
    sb: Sandbox, paths: Paths
) -> None:
    r = subprocess.run(
        [sys.executable, "-c", RECONNECT_FROM_ANOTHER_PROCESS, sb.id, str(paths.root)],
        capture_output=True,
        timeout=300,
        check=True,
    )
    waits, ends = (int(x) for x in r.stdout.split())
    # still running: stdin, its further output (stdout and stderr) and its exit code
    h = sb.commands.connect(waits)
    assert h.pid == waits
    h.send_stdin("there\n")
    res = h.wait(timeout=60)
    assert (res.exit_code, res.stdout, res.stderr) == (5, "got there\n", "err\n")
    # ended while nobody followed it: its exit code is still there (its output is not)
    deadline = time.monotonic() + 120  # a bound for a loaded machine, not a timing check
    while any(x.pid == ends for x in sb.ps()):
        assert time.monotonic() < deadline, "sleep 1 never ended"
        time.sleep(0.2)
    assert sb.commands.connect(ends).wait(timeout=60).exit_code == 9
    with pytest.raises(NotFoundError):  # given once
        sb.commands.connect(ends)


def test_reconnecting_to_a_command_another_connection_follows_is_refused(
    sb: Sandbox, paths: Paths
) -> None:
    from torpor.vmm.manager import VMManager

    with VMManager(paths).client(sb.id) as c:
        h = c.start_exec(["sleep", "1000"])
        with pytest.raises(ConflictError, match="still followed"):
            sb.commands.connect(h.pid)
        h.signal(signal.SIGKILL)
        assert h.wait().code == 137

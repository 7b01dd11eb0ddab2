"""The real C agent in host mode, driven through AgentClient and raw bytes.

Host mode (``torpor-agent --fd N``) runs everything but the PID 1 boot steps, so
this covers the whole protocol surface of docs/protocol.md without a VM.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from torpor.agent import AgentClient, AgentRequestError
from torpor.agent.protocol import (
    HEADER,
    MAX_PAYLOAD,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    Frame,
    HelloInfo,
    SetTimeRequest,
    Started,
    T,
)
from torpor.errors import AgentError, ProtocolError

from .conftest import RawAgent, spawn_agent, stop_agent

pytestmark = pytest.mark.timeout(120)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "protocol"
AGENT_C = Path(__file__).parents[2] / "torpor" / "guest" / "agent.c"
PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    """True once ``pid`` no longer exists (a zombie still exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.01)
    return False


def zombie_children(ppid: int) -> list[int]:
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == ppid:
            zombies.append(int(entry))
    return zombies


# ---- basics -----------------------------------------------------------------


def test_version(agent_binary):
    out = subprocess.run([agent_binary, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("torpor-agent 0.1.0")


def test_bad_arguments_exit_2(agent_binary):
    assert subprocess.run([agent_binary, "--bogus"], capture_output=True).returncode == 2


def test_hello(agent):
    info = agent.client.hello()
    assert info.version == 1
    assert info.agent_version == "0.1.0"
    assert info.uptime_ns > 0


@pytest.mark.parametrize("cc", ["gcc", "musl-gcc"])
def test_agent_compiles_warning_free(cc, tmp_path):
    if not shutil.which(cc):
        pytest.skip(f"{cc} not installed")
    opt = "-Os" if cc == "musl-gcc" else "-O2"
    proc = subprocess.run(
        [cc, "-static", opt, "-Wall", "-Wextra", "-Werror", "-o", tmp_path / "a", AGENT_C],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# ---- EXEC ---------------------------------------------------------------------


def test_stdout_and_stderr_are_separate(agent):
    r = agent.client.exec(["sh", "-c", "echo out; echo err >&2"])
    assert (r.status, r.stdout, r.stderr) == (ExitStatus(0, 0), b"out\n", b"err\n")


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes(agent, code):
    assert agent.client.exec(["sh", "-c", f"exit {code}"]).status == ExitStatus(code, 0)


def test_missing_command_is_127(agent):
    r = agent.client.exec(["no-such-command-xyz"], env=[PATH_ENV])
    assert r.status == ExitStatus(127, 0)
    assert r.stderr == b'torpor: exec "no-such-command-xyz": No such file or directory\n'


def test_non_executable_file_is_126(agent, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = agent.client.exec([str(script)])
    assert r.status == ExitStatus(126, 0)
    assert r.stderr == f'torpor: exec "{script}": Permission denied\n'.encode()


def test_missing_cwd_is_reported(agent, tmp_path):
    r = agent.client.exec(["true"], cwd=str(tmp_path / "nope"))
    assert r.status.code == 126
    assert b'chdir "' in r.stderr and b"No such file or directory" in r.stderr


def test_unknown_user_is_reported(agent):
    r = agent.client.exec(["true"], user="no-such-user-xyz")
    assert r.status.code == 126
    assert b"no such user" in r.stderr


@needs_root
@pytest.mark.parametrize(
    ("user", "expected"),
    [("nobody", "65534 65534"), ("1234:2345", "1234 2345"), ("4321", "4321 0"), ("", "0 0")],
)
def test_user_is_applied(agent, user, expected):
    r = agent.client.exec(["sh", "-c", "id -u; id -g"], env=[PATH_ENV], user=user)
    assert r.stdout.decode().split() == expected.split(), r.stderr


def test_path_lookup_uses_request_env(agent, tmp_path):
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho found $0\n")
    tool.chmod(0o755)
    r = agent.client.exec(["mytool"], env=[f"PATH=/nonexistent:{tmp_path}", PATH_ENV])
    assert r.stdout == f"found {tool}\n".encode()


def test_cwd_and_env_are_honoured(agent, tmp_path):
    r = agent.client.exec(
        ["sh", "-c", "pwd; echo $FOO"], env=[PATH_ENV, "FOO=bar"], cwd=str(tmp_path)
    )
    assert r.stdout == f"{tmp_path}\nbar\n".encode()


def test_env_is_exactly_the_request_env(agent):
    env = ["A=1", "B=two words", "PATH=/usr/bin:/bin"]
    r = agent.client.exec(["env"], env=env)
    assert r.stdout.decode().splitlines() == env


def test_signal_kills_with_128_plus_signo(agent):
    handle = agent.client.start_exec(["sleep", "100"])
    assert handle.pid > 0
    handle.signal(signal.SIGKILL)
    assert handle.wait(timeout=30) == ExitStatus(137, 9)


def test_signal_reaches_the_process_group(agent):
    handle = agent.client.start_exec(["sh", "-c", "sleep 100 & echo $!; wait"])
    kind, chunk = next(handle.events(timeout=30))
    assert kind == T.STDOUT
    background = int(chunk)
    handle.signal(signal.SIGTERM)
    assert handle.wait(timeout=30) == ExitStatus(128 + 15, 15)
    assert wait_gone(background)


def test_stdin_is_dev_null_unless_piped(agent):
    r = agent.client.exec(["cat"])
    assert (r.status.code, r.stdout) == (0, b"")


def test_stdin_is_piped(agent):
    assert agent.client.exec(["cat"], input=b"hello\n").stdout == b"hello\n"
    assert agent.client.exec(["wc", "-c"], input=b"").stdout.strip() == b"0"


def test_four_mib_both_ways(agent):
    data = random.Random(1).randbytes(4 << 20)
    r = agent.client.exec(["cat"], input=data, timeout=60)
    assert r.status.code == 0
    assert len(r.stdout) == len(data)
    assert r.stdout == data


def test_stdin_is_buffered_not_blocking(agent, tmp_path):
    """A child that does not read yet must not stall the agent's loop."""
    go = tmp_path / "go"
    handle = agent.client.start_exec(
        ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; wc -c"], stdin=True
    )
    handle.write_stdin(bytes(3 << 20))  # far more than a pipe holds
    assert agent.client.hello().version == 1
    assert agent.client.exec(["true"]).status.code == 0
    go.touch()
    handle.close_stdin()
    out = b"".join(chunk for kind, chunk in handle.events(timeout=60) if kind == T.STDOUT)
    assert out.strip() == str(3 << 20).encode()
    assert handle.status == ExitStatus(0, 0)


def test_many_concurrent_execs(agent):
    n = 70  # the agent must handle at least 64 at once
    handles = [
        agent.client.start_exec(["sh", "-c", f"read x; echo {i} $x"], stdin=True) for i in range(n)
    ]
    for h in handles:
        h.write_stdin(b"go\n")
    results = {}
    for i, h in enumerate(handles):
        out = b"".join(chunk for _, chunk in h.events(timeout=60))
        results[i] = (out, h.status)
    assert results == {i: (f"{i} go\n".encode(), ExitStatus(0, 0)) for i in range(n)}


def test_concurrent_execs_from_threads(agent):
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = agent.client.exec(["sh", "-c", f"echo {i}"], timeout=60).stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n".encode() for i in range(20)}


def test_background_child_does_not_delay_exit(agent):
    r = agent.client.exec(["sh", "-c", "sleep 100 & echo $!; echo started"], timeout=60)
    try:
        assert r.status == ExitStatus(0, 0)
        assert r.stdout.endswith(b"started\n")
    finally:
        os.kill(int(r.stdout.split()[0]), signal.SIGKILL)


def test_orphans_are_reaped(agent):
    r = agent.client.exec(["sh", "-c", "sleep 0.2 & echo $!"])
    orphan = int(r.stdout)
    # re-parented to the agent (PID 1 in a VM, a subreaper here); a zombie stays in /proc
    assert wait_gone(orphan)


def test_no_zombies_after_execs(agent):
    for i in range(10):
        agent.client.exec(["sh", "-c", f"exit {i}"])
    assert zombie_children(agent.proc.pid) == []


def test_eof_leaves_children_running(agent_binary):
    sock, proc = spawn_agent(agent_binary)
    client = AgentClient(sock)
    pid = client.start_exec(["sleep", "100"]).pid
    try:
        assert stop_agent(client, proc) == 0
        assert os.path.exists(f"/proc/{pid}")
    finally:
        os.kill(pid, signal.SIGKILL)


# ---- output coalescing ------------------------------------------------------------
# The agent holds output for up to FLUSH_DELAY_MS so that many small writes
# travel in few frames (docs/protocol.md); none of it may be lost, reordered
# within its stream, held back behind a pause, or sent after EXIT.


def lines(prefix: str, n: int) -> bytes:
    return b"".join(f"{prefix}{i}\n".encode() for i in range(n))


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_small_writes_are_coalesced(agent):
    n = 2000
    script = f"i=0; while [ $i -lt {n} ]; do echo line$i; i=$((i+1)); done"
    handle = agent.client.start_exec(["sh", "-c", script])
    chunks = [chunk for kind, chunk in handle.events(timeout=60) if kind == T.STDOUT]
    assert handle.status == ExitStatus(0, 0)
    assert b"".join(chunks) == lines("line", n)
    assert len(chunks) < n / 4, f"{n} writes took {len(chunks)} STDOUT frames"


def test_frames_stay_within_64_kib(agent):
    size = 1 << 20
    handle = agent.client.start_exec(  # 4 KiB writes, like busybox head
        ["dd", "if=/dev/zero", "bs=4096", f"count={size // 4096}", "status=none"]
    )
    chunks = [chunk for kind, chunk in handle.events(timeout=60) if kind == T.STDOUT]
    assert handle.status == ExitStatus(0, 0)
    assert sum(map(len, chunks)) == size
    assert max(map(len, chunks)) <= 64 * 1024
    assert len(chunks) < size // 4096 / 4


def test_interleaved_streams_each_keep_their_order(agent):
    n = 1000
    script = f"i=0; while [ $i -lt {n} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    r = agent.client.exec(["sh", "-c", script], timeout=60)
    assert r.status == ExitStatus(0, 0)
    assert r.stdout == lines("out", n)
    assert r.stderr == lines("err", n)


def test_output_before_a_pause_is_not_held_back(agent):
    handle = agent.client.start_exec(["sh", "-c", "echo first; sleep 2; echo second"])
    events = handle.events(timeout=60)
    seen = b""
    while b"first\n" not in seen:
        kind, chunk = next(events)
        assert kind == T.STDOUT
        seen += chunk
    # "first" came while the process was still sleeping, not along with "second"
    assert seen == b"first\n"
    assert handle.status is None
    assert is_running(handle.pid)
    seen += b"".join(chunk for _, chunk in events)
    assert seen == b"first\nsecond\n"
    assert handle.status == ExitStatus(0, 0)


@pytest.mark.parametrize(
    "script",
    [
        "printf x; exit 3",  # one byte, still waiting for its flush deadline
        "echo out; echo err >&2; printf tail",
        "head -c 300000 /dev/zero; echo err >&2; exit 3",  # more than a pipe holds
        "head -c 100000 /dev/zero >&2 & head -c 100000 /dev/zero; wait; exit 3",
    ],
)
def test_all_output_precedes_exit(raw_agent, script):
    raw_agent.send(frame(T.EXEC, 60, ExecRequest(("sh", "-c", script)).encode()))
    got = raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert got[0].type == T.STARTED
    assert {f.type for f in got[1:-1]} <= {T.STDOUT, T.STDERR}
    assert all(len(f.payload) <= 64 * 1024 for f in got)
    out = b"".join(f.payload for f in got if f.type == T.STDOUT)
    err = b"".join(f.payload for f in got if f.type == T.STDERR)
    expected = subprocess.run(["sh", "-c", script], capture_output=True)
    assert (out, err) == (expected.stdout, expected.stderr)
    assert ExitStatus.decode(got[-1].payload) == ExitStatus(expected.returncode, 0)
    assert assert_alive(raw_agent) == []  # nothing for id 60 after its EXIT


# ---- files ----------------------------------------------------------------------


def test_write_then_read_file(agent, tmp_path):
    data = random.Random(2).randbytes(3 << 20)
    path = tmp_path / "blob"
    agent.client.write_file(path, data, mode=0o640)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o7777 == 0o640
    assert agent.client.read_file(path) == data


def test_write_file_from_a_stream(agent, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 700_000)
    with src.open("rb") as f:
        agent.client.write_file(tmp_path / "dst", f)
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()


def test_write_file_replaces_and_is_atomic(agent, tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old")
    client = agent.client
    seen = {}

    src = tmp_path.parent / f"{tmp_path.name}-src"
    src.write_bytes(b"hello world")

    class Source(io.FileIO):
        """Checks the target between chunks: the agent has had the first one.  A
        regular file, so it is streamed (any other source is spooled first)."""

        calls = 0

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 2:
                client.hello()  # a round trip: the first chunk has been processed
                seen["content"] = path.read_bytes()
                seen["names"] = sorted(p.name for p in tmp_path.iterdir())
            return super().read(n)

    with Source(src) as f:
        client.write_file(path, f)  # type: ignore[arg-type]
    assert seen["content"] == b"old"
    assert len(seen["names"]) == 2  # "file" and the temporary sibling
    assert path.read_bytes() == b"hello world"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@needs_root
def test_write_file_owner(agent, tmp_path):
    agent.client.write_file(tmp_path / "f", b"x", mode=0o600, uid=1234, gid=2345)
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 2345, 0o600)


def test_write_file_into_missing_directory(agent, tmp_path):
    with pytest.raises(AgentRequestError) as e:
        agent.client.write_file(tmp_path / "missing" / "f", b"data")
    assert e.value.errno == errno.ENOENT
    assert agent.client.hello().version == 1


def test_read_file_stream(agent, tmp_path):
    (tmp_path / "f").write_bytes(b"a" * 200_000)
    info, chunks = agent.client.read_file_stream(tmp_path / "f")
    assert info.is_file and info.size == 200_000
    parts = list(chunks)
    assert len(parts) > 1 and all(len(p) <= 64 * 1024 for p in parts)
    assert b"".join(parts) == b"a" * 200_000


def test_read_file_errors(agent, tmp_path):
    with pytest.raises(AgentRequestError) as e:
        agent.client.read_file(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT
    assert "missing" in str(e.value)
    with pytest.raises(AgentRequestError) as e:
        agent.client.read_file(tmp_path)
    assert e.value.errno == errno.EISDIR


def test_stat(agent, tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    os.utime(tmp_path / "f", (1_600_000_000, 1_600_000_000))
    os.symlink("f", tmp_path / "link")
    info = agent.client.stat(tmp_path / "f")
    st = (tmp_path / "f").stat()
    assert info == FileInfo(st.st_mode, 5, st.st_uid, st.st_gid, 1_600_000_000, "")
    link = agent.client.stat(tmp_path / "link")
    assert link.is_symlink and link.link_target == "f"
    assert agent.client.stat(tmp_path).is_dir
    with pytest.raises(AgentRequestError) as e:
        agent.client.stat(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT


def test_list_dir(agent, tmp_path):
    (tmp_path / "file").write_bytes(b"abc")
    (tmp_path / "dir").mkdir()
    os.symlink("file", tmp_path / "link")
    entries = {e.name: e for e in agent.client.list_dir(tmp_path)}
    assert set(entries) == {"file", "dir", "link"}
    assert entries["file"].is_file and entries["file"].size == 3
    assert entries["dir"].is_dir
    assert entries["link"].is_symlink and entries["link"].link_target == "file"
    assert agent.client.list_dir(tmp_path / "dir") == []
    with pytest.raises(AgentRequestError) as e:
        agent.client.list_dir(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT


def test_mkdir_creates_parents(agent, tmp_path):
    target = tmp_path / "a" / "b" / "c"
    agent.client.mkdir(target, mode=0o700)
    assert target.is_dir()
    assert target.stat().st_mode & 0o7777 == 0o700
    agent.client.mkdir(target)  # already there: fine, like mkdir -p
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(AgentRequestError) as e:
        agent.client.mkdir(tmp_path / "file" / "sub")
    assert e.value.errno == errno.ENOTDIR


def test_symlink_creates_and_replaces(agent, tmp_path):
    link = tmp_path / "link"
    agent.client.symlink("first", link)
    assert os.readlink(link) == "first"
    agent.client.symlink("second", link)
    assert os.readlink(link) == "second"
    (tmp_path / "file").write_bytes(b"")
    agent.client.symlink("third", tmp_path / "file")
    assert os.readlink(tmp_path / "file") == "third"
    (tmp_path / "dir").mkdir()
    with pytest.raises(AgentRequestError):
        agent.client.symlink("x", tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "link"]


# ---- system requests ----------------------------------------------------------


def _cachestat(fd: int) -> tuple[int, int]:
    """(pages cached, pages dirty) of a whole file: Linux 6.5's cachestat(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole_file = ctypes.create_string_buffer(struct.pack("QQ", 0, 0))
    out = ctypes.create_string_buffer(5 * 8)
    if libc.syscall(451, fd, whole_file, out, 0) != 0:  # 451: cachestat on x86_64
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    cached, dirty, _writeback, _evicted, _recent = struct.unpack("5Q", out.raw)
    return cached, dirty


def test_sync(agent):
    # The page cache's dirty count of a file on disk is what sync(2) changes: /var/tmp,
    # not /tmp, which may be a tmpfs (its pages stay "dirty" whatever sync does).
    with tempfile.TemporaryFile(dir="/var/tmp") as f:
        for _ in range(5):  # the flusher may write it back first (rare): dirty it again
            f.seek(0)
            f.write(os.urandom(1 << 20))
            f.flush()
            if _cachestat(f.fileno())[1] > 0:
                break
        assert _cachestat(f.fileno())[1] > 0, "could not get dirty pages to sync"
        agent.client.sync()
        assert _cachestat(f.fileno()) == (256, 0)


def test_set_time_rejects_bad_nanoseconds(agent):
    # never set the clock for real here: in host mode that would be the host's clock
    payload = struct.pack("<qI", 0, 1_000_000_000)
    with pytest.raises(AgentRequestError) as e:
        agent.client.request(T.SET_TIME, payload)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError, match="nanoseconds"):  # the host refuses it too
        SetTimeRequest.decode(payload)


def _spawn_agent_via(prefix: list[str], binary: Path) -> tuple[AgentClient, subprocess.Popen]:
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(
            [*prefix, str(binary), "--fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),)
        )
    return AgentClient(ours), proc


def test_add_entropy_without_cap_sys_admin_is_eperm(agent_binary):
    # As root, the agent runs without CAP_SYS_ADMIN (dropped from its bounding set), so
    # the refusal path is tested where CI runs too.
    prefix = ["setpriv", "--bounding-set=-sys_admin"] if os.geteuid() == 0 else []
    client, proc = _spawn_agent_via(prefix, agent_binary)
    with pytest.raises(AgentRequestError) as e:
        client.add_entropy(os.urandom(32))
    assert e.value.errno == errno.EPERM
    assert stop_agent(client, proc) == 0


@needs_root
def test_add_entropy_reaches_the_kernel(agent_binary, tmp_path):
    # In host mode this credits the host's RNG: harmless, and the only place to see it.
    # strace shows what the kernel got, and what it answered.
    trace = tmp_path / "strace.log"
    client, proc = _spawn_agent_via(
        ["strace", "-qq", "-o", str(trace), "-e", "trace=ioctl"], agent_binary
    )
    data = os.urandom(16).hex()  # 32 printable bytes: strace shows them as they are
    client.add_entropy(data.encode())
    assert stop_agent(client, proc) == 0
    calls = " ".join(trace.read_text().split())
    assert f"RNDADDENTROPY, {{entropy_count=256, buf_size=32, buf=\"{data}\"}}) = 0" in calls
    assert "RNDRESEEDCRNG) = 0" in calls, calls


def test_shutdown_ends_host_mode(agent_binary):
    sock, proc = spawn_agent(agent_binary)
    client = AgentClient(sock)
    client.shutdown()
    assert proc.wait(timeout=10) == 0
    with pytest.raises(AgentError):
        client.hello(timeout=10)
    client.close()


# ---- raw bytes: golden frames and hostile input --------------------------------


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def frame(ftype: int, fid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(0x7054, ftype, 0, fid, len(payload)) + payload


def is_hello_ok(f: Frame) -> bool:
    return f.type == T.HELLO_OK


def errors(frames: list[Frame]) -> list[tuple[int, int]]:
    return [(f.id, ErrorReply.decode(f.payload).errno) for f in frames if f.type == T.ERROR]


def assert_alive(raw: RawAgent, fid: int = 99) -> list[Frame]:
    """HELLO still works; returns the frames that came before HELLO_OK."""
    raw.send(frame(T.HELLO, fid))
    got = raw.read_until(is_hello_ok)
    assert got[-1].id == fid
    HelloInfo.decode(got[-1].payload)
    return got[:-1]


def test_golden_hello(raw_agent):
    raw_agent.send(fixture("hello_id1.bin"))
    (reply,) = raw_agent.read_until(is_hello_ok)
    assert reply.id == 1
    assert HelloInfo.decode(reply.payload).version == 1


def test_golden_exec(raw_agent):
    raw_agent.send(fixture("exec_echo_hi.bin"))
    frames = raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert [f.type for f in frames] == [T.STARTED, T.STDOUT, T.EXIT]
    assert Started.decode(frames[0].payload).pid > 0
    assert frames[1].encode() == fixture("stdout_hi.bin")
    assert frames[2].encode() == fixture("exit_0.bin")


def test_golden_stat(raw_agent):
    raw_agent.send(fixture("stat_etc.bin"))
    (reply,) = raw_agent.read_until(lambda f: f.type == T.FILEINFO)
    assert reply.id == 4 and FileInfo.decode(reply.payload).is_dir


def test_bad_magic_resyncs_with_one_error(raw_agent):
    raw_agent.send(b"\x00\x01garbage\x54\x54\x71" + fixture("hello_id1.bin"))
    (reply,) = raw_agent.read_until(lambda f: f.type == T.ERROR)
    assert (reply.id, ErrorReply.decode(reply.payload).errno) == (0, errno.EPROTO)
    assert raw_agent.read_until(is_hello_ok)[0].id == 1
    assert assert_alive(raw_agent) == []


def test_nonzero_flags_count_as_a_bad_header(raw_agent):
    raw_agent.send(HEADER.pack(0x7054, T.HELLO, 1, 5, 0))
    assert errors(assert_alive(raw_agent)) == [(0, errno.EPROTO)]


def test_oversized_length_while_resyncing_is_garbage(raw_agent):
    huge = HEADER.pack(0x7054, T.HELLO, 0, 5, 0xFFFFFF00)  # found right after garbage
    raw_agent.send(b"junk" + huge + fixture("hello_id1.bin"))
    got = raw_agent.read_until(is_hello_ok)
    assert errors(got) == [(0, errno.EPROTO)]
    assert got[-1].id == 1


def test_random_garbage(raw_agent):
    garbage = random.Random(1234).randbytes(64 * 1024)
    raw_agent.send(garbage)
    # Zeros complete any frame the garbage happened to start, then resync cleanly.
    raw_agent.send(bytes(HEADER.size + MAX_PAYLOAD))
    got = assert_alive(raw_agent)
    assert (0, errno.EPROTO) in errors(got)
    assert raw_agent.proc.poll() is None


def test_oversized_frame_is_discarded(raw_agent):
    raw_agent.send(HEADER.pack(0x7054, T.STDIN, 0, 7, MAX_PAYLOAD + 1))
    # the payload may contain anything, even what looks like frames
    raw_agent.send(fixture("hello_id1.bin") * ((MAX_PAYLOAD + 1) // 12) + b"x" * 5)
    assert (MAX_PAYLOAD + 1) == ((MAX_PAYLOAD + 1) // 12) * 12 + 5
    assert errors(assert_alive(raw_agent)) == [(7, errno.EMSGSIZE)]


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (frame(0x7F, 11), (11, errno.ENOSYS)),
        (frame(T.HELLO_OK, 12), (12, errno.ENOSYS)),  # a reply type is not a request
        (frame(T.ATTACH, 13), (13, errno.ENOSYS)),  # shim-only
        (frame(T.EXEC, 14, ExecRequest(("true",)).encode()[:-3]), (14, errno.EINVAL)),
        (frame(T.EXEC, 15, ExecRequest(("true",)).encode() + b"\0"), (15, errno.EINVAL)),
        (
            frame(T.EXEC, 16, bytes(12) + struct.pack("<II", 1, 3) + b"a\0b" + bytes(4)),
            (16, errno.EINVAL),
        ),
        (frame(T.EXEC, 17, bytes(12) + struct.pack("<II", 0, 0)), (17, errno.EINVAL)),
        (frame(T.HELLO, 18, b"x"), (18, errno.EINVAL)),
        (frame(T.STAT, 19, struct.pack("<I", 100) + b"/etc"), (19, errno.EINVAL)),
        (frame(T.STDIN, 20, b"data"), (20, errno.ESRCH)),
        (frame(T.STDIN, 21), (21, errno.ESRCH)),
        (frame(T.SIGNAL, 22, struct.pack("<I", 9)), (22, errno.ESRCH)),
        (frame(T.SIGNAL, 23, b"\x09"), (23, errno.EINVAL)),
        (frame(T.SHUTDOWN, 24, struct.pack("<I", 7)), (24, errno.EINVAL)),
        (frame(T.HELLO, 0), (0, errno.EINVAL)),
    ],
    ids=lambda v: "" if isinstance(v, bytes) else errno.errorcode[v[1]],
)
def test_bad_requests_get_an_error_and_nothing_else(raw_agent, request_bytes, expected):
    raw_agent.send(request_bytes)
    got = assert_alive(raw_agent)
    assert [(f.id, f.type) for f in got] == [(expected[0], T.ERROR)]
    assert errors(got) == [expected]


def test_invalid_signal_number(raw_agent):
    raw_agent.send(frame(T.EXEC, 30, ExecRequest(("sleep", "100")).encode()))
    raw_agent.read_until(lambda f: f.type == T.STARTED)
    raw_agent.send(frame(T.SIGNAL, 30, struct.pack("<I", 65)))
    assert errors(raw_agent.read_until(lambda f: f.type == T.ERROR)) == [(30, errno.EINVAL)]
    raw_agent.send(frame(T.SIGNAL, 30, struct.pack("<I", 9)))
    (exit_frame,) = raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert ExitStatus.decode(exit_frame.payload) == ExitStatus(137, 9)


def test_busy_id_is_refused(raw_agent):
    raw_agent.send(frame(T.EXEC, 40, ExecRequest(("sleep", "100")).encode()))
    raw_agent.read_until(lambda f: f.type == T.STARTED)
    raw_agent.send(frame(T.EXEC, 40, ExecRequest(("true",)).encode()))
    assert errors(raw_agent.read_until(lambda f: f.type == T.ERROR)) == [(40, errno.EBUSY)]
    raw_agent.send(frame(T.HELLO, 40))  # any new request, not just EXEC
    assert errors(raw_agent.read_until(lambda f: f.type == T.ERROR)) == [(40, errno.EBUSY)]
    raw_agent.send(frame(T.SIGNAL, 40, struct.pack("<I", 9)))
    raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert assert_alive(raw_agent) == []


def test_garbage_does_not_disturb_running_exec(raw_agent):
    raw_agent.send(frame(T.EXEC, 50, ExecRequest(("cat",), stdin=True).encode()))
    raw_agent.read_until(lambda f: f.type == T.STARTED)
    raw_agent.send(b"\xde\xad\xbe\xef" * 10)
    raw_agent.send(frame(T.STDIN, 50, b"still here\n") + frame(T.STDIN, 50))
    got = raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert b"".join(f.payload for f in got if f.type == T.STDOUT) == b"still here\n"
    assert errors(got) == [(0, errno.EPROTO)]

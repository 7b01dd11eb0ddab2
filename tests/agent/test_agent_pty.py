"""EXEC with a pseudo-terminal, against the real C agent in host mode."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from torpor.agent import AgentClient
from torpor.agent.client import AgentRequestError, ExecHandle
from torpor.agent.protocol import ErrorReply, ExitStatus, Frame, T

from .conftest import spawn_agent


def read_until(handle: ExecHandle, want: bytes, timeout: float = 20.0) -> bytes:
    """Output up to and including ``want`` (the handle keeps running)."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        frame = handle._call.next(deadline)
        assert frame.type == T.STDOUT, frame
        got += frame.payload
    return got


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_alive(int(entry)):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().split(") ")[-1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


def test_tty_exec_is_a_terminal_of_the_given_size(agent):
    r = agent.client.start_exec(["sh", "-c", "tty; stty size; echo err >&2"], tty=(120, 40))
    out = b"".join(chunk for kind, chunk in r.events(20) if kind == T.STDOUT)
    assert r.status is not None and r.status.code == 0
    lines = out.decode().split("\r\n")
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "40 120"
    assert lines[2] == "err"  # stderr is the same terminal: one stream


def test_tty_echo_resize_ctrl_c_and_exit_code(agent):
    h = agent.client.start_exec(["sh"], tty=(80, 24), env=["PS1=$ ", "PATH=/usr/bin:/bin"])
    h.write_stdin(b"echo hel''lo\n")
    assert b"hello\r\n" in read_until(h, b"hello\r\n")
    h.resize(100, 30)
    h.write_stdin(b"stty size\n")
    read_until(h, b"30 100\r\n")
    h.write_stdin(b"sleep 1000\n")
    time.sleep(0.5)
    h.write_stdin(b"\x03")  # ^C: SIGINT to the foreground job, the shell survives
    h.write_stdin(b"echo after-$?\n")
    read_until(h, b"after-130")
    h.write_stdin(b"exit 3\n")
    assert h.wait(20).code == 3


def test_ctrl_d_ends_cat(agent):
    h = agent.client.start_exec(["cat"], tty=(80, 24))
    h.write_stdin(b"abc\n")
    read_until(h, b"abc\r\nabc\r\n")  # the terminal echo, then cat's copy
    h.write_stdin(b"\x04")
    assert h.wait(20).code == 0


@pytest.mark.parametrize("size", [(0, 24), (80, 0), (4097, 24), (80, 4097)])
def test_bad_sizes_are_refused(agent, size):
    raw = agent.client
    call = raw._open(T.EXEC)
    payload = (
        (b"\x02\x00\x00\x00" + b"\x00" * 8 + b"\x01\x00\x00\x00\x02\x00\x00\x00sh" + b"\x00" * 4)
        + size[0].to_bytes(4, "little")
        + size[1].to_bytes(4, "little")
    )
    raw._send(Frame(T.EXEC, call.id, payload))
    with pytest.raises(AgentRequestError, match="terminal size"):
        call.next(time.monotonic() + 20)
    assert raw.hello().version == 1


def test_resize_of_a_pipe_exec_is_refused(agent):
    h = agent.client.start_exec(["sleep", "1000"])
    h.resize(10, 10)
    with pytest.raises(AgentRequestError, match="no terminal"):
        h.wait(20)
    os.kill(h.pid, signal.SIGKILL)


def test_vanished_host_hangs_up_the_terminal(agent_binary):
    sock, proc = spawn_agent(agent_binary)
    client = AgentClient(sock)
    h = client.start_exec(["sh"], tty=(80, 24), env=["PS1=$ ", "PATH=/usr/bin:/bin"])
    h.write_stdin(b"sleep 1000 & echo B''G=$!; sleep 999\n")
    out = read_until(h, b"BG=")
    while not re.search(rb"BG=\d+\r\n", out):
        out += read_until(h, b"\n")
    bg = int(re.search(rb"BG=(\d+)", out).group(1))  # type: ignore[union-attr]
    shell = h.pid
    fg = children(shell)
    while len(fg) < 2:  # the background sleep and the foreground one
        time.sleep(0.05)
        fg = children(shell)
    (fg,) = set(fg) - {bg}
    client.close()
    assert proc.wait(timeout=10) == 0
    deadline = time.monotonic() + 10
    while pid_alive(shell) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(shell)
    while pid_alive(fg) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(fg)  # the foreground job is hung up too, in its own process group
    os.kill(bg, signal.SIGKILL)  # a background job is the shell's business, as on a terminal


FIXTURES = Path(__file__).parent.parent / "fixtures" / "protocol"


def test_golden_tty_exec_and_resize(raw_agent):
    """The shared golden frames, sent raw: EXEC with a 120x40 TTY, then RESIZE 100x30."""
    raw_agent.send((FIXTURES / "exec_tty_sh.bin").read_bytes())
    (started,) = raw_agent.read_until(lambda f: f.type == T.STARTED)
    assert started.id == 7

    def output_has(text: bytes) -> Callable[[Frame], bool]:
        seen = bytearray()

        def done(f: Frame) -> bool:
            assert f.type == T.STDOUT and f.id == 7, f
            seen.extend(f.payload)
            return text in seen

        return done

    raw_agent.send(Frame(T.STDIN, 7, b"stty size\n").encode())
    raw_agent.read_until(output_has(b"40 120\r\n"))
    raw_agent.send((FIXTURES / "resize_id7.bin").read_bytes())
    raw_agent.send(Frame(T.STDIN, 7, b"stty size; exit 5\n").encode())
    raw_agent.read_until(output_has(b"30 100\r\n"))
    (*_, end) = raw_agent.read_until(lambda f: f.type == T.EXIT)
    assert ExitStatus.decode(end.payload) == ExitStatus(5, 0)


def test_hostile_tty_frames_get_errors_and_the_agent_lives(raw_agent):
    def errno_of(data: bytes) -> int:
        raw_agent.send(data)
        (err,) = raw_agent.read_until(lambda f: f.type == T.ERROR)
        return ErrorReply.decode(err.payload).errno

    golden = (FIXTURES / "exec_tty_sh.bin").read_bytes()
    body = golden[12:]
    assert errno_of(Frame(T.EXEC, 3, body[:-4]).encode()) == errno.EINVAL  # no rows
    assert errno_of(Frame(T.EXEC, 3, body + b"x").encode()) == errno.EINVAL  # left over
    huge = body[:-8] + (2**32 - 1).to_bytes(4, "little") * 2
    assert errno_of(Frame(T.EXEC, 3, huge).encode()) == errno.EINVAL
    assert errno_of(Frame(T.RESIZE, 4, b"\x01\x00\x00").encode()) == errno.EINVAL
    assert errno_of(Frame(T.RESIZE, 4, bytes(12)).encode()) == errno.EINVAL
    assert errno_of(Frame(T.RESIZE, 4, (80).to_bytes(4, "little") * 2).encode()) == errno.ESRCH
    raw_agent.send(Frame(T.HELLO, 9).encode())
    (hello,) = raw_agent.read_until(lambda f: f.type == T.HELLO_OK)
    assert hello.id == 9

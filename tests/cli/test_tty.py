"""``torpor exec -it`` driven through a real pseudo-terminal on the host (os.forkpty):
raw mode, the window size and its changes, ^C, the exit code."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import sys
import termios
import time
from typing import Any

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


class Terminal:
    """The torpor CLI running on a host pseudo-terminal of ``cols`` x ``rows``."""

    def __init__(self, *args: str, cols: int = 80, rows: int = 24):
        env = dict(os.environ, TERM="xterm")
        env.pop("TORPOR_DEBUG", None)
        pid, fd = os.forkpty()
        if pid == 0:  # the child: its stdin/stdout/stderr are the slave, its controlling tty
            try:
                os.execve(sys.executable, [sys.executable, "-m", "torpor.cli.main", *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.set_size(cols, rows)
        self.seen = b""

    def set_size(self, cols: int, rows: int) -> None:
        # the kernel sends SIGWINCH to the CLI (the terminal's foreground process group)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, want: bytes, timeout: float = 120) -> bytes:
        deadline = time.monotonic() + timeout
        while want not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {want!r} on the terminal; saw {self.seen[-400:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the CLI exited and closed the terminal
                    chunk = b""
                assert chunk, f"terminal closed before {want!r}; saw {self.seen[-400:]!r}"
                self.seen += chunk
        return self.seen

    def exit_code(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):  # EIO once the CLI closed it
                    self.seen += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"the CLI did not exit; saw {self.seen[-400:]!r}")

    def mode(self) -> list[Any]:
        return termios.tcgetattr(self.fd)


def test_exec_it_sh_size_ctrl_c_and_exit_code(box) -> None:
    t = Terminal("exec", "-it", box.name, "sh", cols=132, rows=43)
    t.expect(b"# ")  # busybox sh's root prompt, on the guest terminal
    assert not t.mode()[3] & termios.ECHO  # the host terminal is raw: the guest echoes
    t.type(b"stty size; echo $TERM\r")
    t.expect(b"43 132\r\nxterm\r\n")
    t.set_size(90, 20)
    time.sleep(0.5)  # SIGWINCH -> RESIZE reaches the guest
    t.type(b"stty size\r")
    t.expect(b"20 90\r\n")
    t.type(b"sleep 1000\r")
    time.sleep(1)
    t.type(b"\x03")  # ^C is a byte for the guest's terminal: SIGINT to its foreground job
    t.type(b"echo rc=$?\r")
    t.expect(b"rc=130")
    t.type(b"stty size; exit 3\r")
    assert t.exit_code() == 3
    assert not any(
        p for p in torpor_cli("exec", box.name, "ps").stdout.splitlines() if b"sleep 1000" in p
    )


def test_exec_t_without_i_is_a_terminal_without_input(box) -> None:
    t = Terminal("exec", "-t", box.name, "sh", "-c", "tty; stty size; exit 4", cols=70, rows=11)
    t.expect(b"/dev/pts/")
    t.expect(b"11 70\r\n")
    assert t.exit_code() == 4


def test_exec_it_refuses_input_that_is_not_a_terminal(box) -> None:
    r = torpor_cli("exec", "-it", box.name, "sh")
    assert r.returncode == 125 and b"not a TTY" in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr


def test_session_shell(tools_image: str) -> None:
    r = torpor_cli("session", "create", "--image", tools_image, "--name", "tty-sess", "-q")
    assert r.returncode == 0, r.stderr
    try:
        t = Terminal("session", "shell", "tty-sess", cols=100, rows=30)
        t.type(b"echo $((6*7)); stty size; exit 5\r")
        t.expect(b"42\r\n30 100\r\n")
        assert t.exit_code() == 5
        r = torpor_cli("session", "shell", "tty-sess")  # input is not a terminal
        assert r.returncode != 0 and b"not a TTY" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr
    finally:
        torpor_cli("session", "rm", "tty-sess")


def test_run_it_main_command_on_a_terminal(tools_image: str) -> None:
    t = Terminal("run", "-it", "--rm", "--network", "none", tools_image, "sh", cols=100, rows=33)
    t.type(b"stty size\r")
    t.expect(b"33 100\r\n", timeout=180)
    t.set_size(61, 17)  # SIGWINCH -> RESIZE through the shim's ATTACH route
    time.sleep(0.5)
    t.type(b"stty size; exit 6\r")
    t.expect(b"17 61\r\n")
    assert t.exit_code() == 6

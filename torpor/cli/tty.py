"""``-t``: run a guest program on a terminal, with this terminal as its keyboard and screen.

Used by ``torpor exec -it``, ``torpor run -it`` (the shim starts the main command on a
terminal; we ATTACH) and ``torpor session shell``. The guest side is an EXEC with
the TTY flag (docs/protocol.md): the guest's line discipline does echo, ^C and ^D, so
the host terminal is put in raw mode and passes every byte through untouched.

Invariants:

- The host terminal's mode is restored on every way out (exit, exception, SIGTERM,
  SIGHUP), and only if this module changed it.
- Window size: the guest terminal starts at this terminal's size and follows it
  (SIGWINCH -> RESIZE); without a terminal it is 80x24.
- With ``-i`` the input must be a terminal (like Docker: "the input device is not a
  TTY"); without ``-i`` nothing is read from stdin and the guest program's input is
  a terminal nobody types on.
- The exit code is the guest program's; if this process dies, its connection closes
  and the shim hangs the guest terminal up (nothing is left running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torpor.errors import TorporError, UsageError

#: What the guest program's TERM is when neither -e TERM nor this environment say.
DEFAULT_TERM = "xterm-256color"


def terminal_size(fds: Sequence[int] = (1, 0, 2)) -> tuple[int, int]:
    """(cols, rows) of the first of ``fds`` that is a terminal, else 80x24."""
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.columns > 0 and size.lines > 0:
                return min(size.columns, 4096), min(size.lines, 4096)
    return 80, 24


def with_term(env: Sequence[str]) -> list[str]:
    """``env`` plus ``TERM`` from this environment unless ``env`` sets one."""
    if any(e.split("=", 1)[0] == "TERM" for e in env):
        return list(env)
    return [*env, f"TERM={os.environ.get('TERM') or DEFAULT_TERM}"]


def check_input(interactive: bool) -> None:
    if interactive and not os.isatty(0):
        raise UsageError("the input device is not a TTY (drop -t, or run from a terminal)")


@contextlib.contextmanager
def raw_mode(fd: int, output_only: bool = False) -> Iterator[None]:
    """``fd``'s terminal in raw mode for the block (nothing happens if it is not one).
    ``output_only``: just no output processing (the guest terminal already made its
    ``\r\n``), keeping this terminal's ^C for us."""
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield
        return
    if output_only:
        mode = list(saved)
        mode[1] &= ~termios.OPOST
        termios.tcsetattr(fd, termios.TCSANOW, mode)
    else:
        tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signals(on_winch: Callable[[], None]) -> Iterator[None]:
    """SIGWINCH resizes; SIGTERM/SIGHUP end us cleanly (so raw mode is undone)."""

    def winch(signo: int, frame: Any) -> None:
        with contextlib.suppress(TorporError, OSError):
            on_winch()

    def leave(signo: int, frame: Any) -> None:
        raise SystemExit(128 + signo)

    old = {
        signal.SIGWINCH: signal.signal(signal.SIGWINCH, winch),
        signal.SIGTERM: signal.signal(signal.SIGTERM, leave),
        signal.SIGHUP: signal.signal(signal.SIGHUP, leave),
    }
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pump(handle: Any, fd: int) -> None:
    """Keystrokes to the guest until our input ends (a terminal's ^D is a byte like
    any other here: the guest's line discipline makes it end-of-file)."""
    try:
        while data := os.read(fd, 65536):
            handle.write_stdin(data)
    except (OSError, TorporError):
        pass


def interact(handle: Any, interactive: bool) -> int:
    """Drive a TTY EXEC: raw mode, keystrokes in, screen bytes out, size changes.
    Returns the guest program's exit code."""
    out = sys.stdout.fileno()
    sys.stdout.flush()

    def resize() -> None:
        handle.resize(*terminal_size())

    with _signals(resize), raw_mode(0 if interactive else out, output_only=not interactive):
        if interactive:
            threading.Thread(target=_pump, args=(handle, 0), daemon=True, name="tty-in").start()
        for _kind, data in handle.events():
            view = memoryview(data)
            while view:
                n = os.write(out, view)
                view = view[n:]
        status = handle.wait()
    return status.code


def run_exec(
    client: Any,
    argv: Sequence[str],
    *,
    env: Sequence[str],
    cwd: str,
    user: str,
    interactive: bool,
) -> int:
    """``torpor exec -t``: start ``argv`` on a guest terminal and interact with it."""
    check_input(interactive)
    handle = client.start_exec(
        list(argv), env=with_term(env), cwd=cwd, user=user, tty=terminal_size()
    )
    return interact(handle, interactive)


def login_shell() -> list[str]:
    """The guest command of ``session shell``: bash if the image has it, else sh."""
    script = "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi"
    return ["/bin/sh", "-c", script]


def attach_main(mgr: Any, vm: Any, interactive: bool) -> int | None:
    """``torpor run -t``: follow the VM's main command, which the shim started on a
    terminal (VMConfig.tty). None if the VM is already gone (the caller reports its
    recorded output and exit code)."""
    try:
        client = mgr.client(vm)
    except TorporError:
        return None
    with client:
        return interact(client.attach(), interactive)


def shell_in_vm(mgr: Any, vm_id: str) -> int:
    """``torpor session shell``: an interactive login shell in VM ``vm_id``, run as the
    VM's user in its working directory with its environment."""
    from torpor.vmm.manager import exec_settings

    check_input(True)
    vm = mgr.get(vm_id)
    env, cwd, user = exec_settings(vm.config)
    with mgr.client(vm) as client:
        return run_exec(client, login_shell(), env=env, cwd=cwd, user=user, interactive=True)


__all__ = [
    "interact",
    "login_shell",
    "raw_mode",
    "run_exec",
    "shell_in_vm",
    "terminal_size",
    "with_term",
]

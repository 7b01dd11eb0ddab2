"""QMP operations torpor needs, on QEMU's official ``qemu.qmp`` library.

Device state is saved and loaded with ``x-ignore-shared``: guest RAM lives in a
shared ``memory-backend-file`` and is captured as a file, so the migration stream
holds only device state (tens of KB).  The stream travels over a file descriptor
handed to QEMU with ``getfd`` (SCM_RIGHTS on the QMP socket): ``exec:`` URIs are
impossible under ``-sandbox spawn=deny``.  A migration's end is waited for on QEMU's
MIGRATION event (the ``events`` capability), with ``query-migrate`` deciding and
guarding against a missed event; it used to be polled (0.5 ms doubling to 10 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from torpor.errors import VMError

# every QMP wait is bounded: a hung monitor must fail the operation, naming the step,
# not hang the shim (a capture waiting forever kept its VM "capturing" for good)
HANDSHAKE_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def session(
    qmp_socket: Path, name: str = "torpor", wait_until: float = 0.0
) -> AsyncIterator[QMPClient]:
    """A QMP connection; ``wait_until`` (a monotonic deadline) retries a socket that
    QEMU has bound but is not yet listening on (a fresh QEMU, right at start-up)."""
    from torpor.vmm.sockets import connect_unix

    while True:
        try:
            sock = connect_unix(qmp_socket, timeout=5)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            if time.monotonic() >= wait_until:
                raise VMError(f"cannot connect to QMP: {e}", step="QMP", path=qmp_socket) from e
            await asyncio.sleep(0.002)
        except OSError as e:
            raise VMError(f"cannot connect to QMP: {e}", step="QMP", path=qmp_socket) from e
    sock.setblocking(False)
    client = QMPClient(name)
    try:
        # QEMU serves one client per monitor: while another holds it, the greeting
        # never comes — bounded, so that is an error instead of a hang
        await asyncio.wait_for(client.connect(sock), HANDSHAKE_TIMEOUT)
    except TimeoutError as e:
        sock.close()
        raise VMError(
            f"QMP handshake timed out after {HANDSHAKE_TIMEOUT:.0f} s "
            "(is another client holding the monitor, or is QEMU hung?)",
            step="QMP",
            path=qmp_socket,
        ) from e
    except (QMPError, OSError) as e:
        sock.close()
        raise VMError(f"QMP handshake failed: {e}", step="QMP", path=qmp_socket) from e
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        # whatever disconnect() did: our end is closed, so QEMU frees the monitor for the
        # next client (a connection left open would make every later handshake wait)
        sock.close()


async def execute(
    q: QMPClient, cmd: str, args: dict[str, Any] | None = None, timeout: float = COMMAND_TIMEOUT
) -> Any:
    try:
        return await asyncio.wait_for(q.execute(cmd, args), timeout)
    except TimeoutError as e:
        raise VMError(
            f"QMP {cmd}: no answer from QEMU in {timeout:.0f} s", step=f"QMP {cmd}"
        ) from e
    except QMPError as e:
        raise VMError(f"QMP {cmd} failed: {e}", step=f"QMP {cmd}") from e


# query-migrate's cadence (0.5 ms doubling to this): the poll, and with the ``events``
# capability on the guard behind QEMU's MIGRATION event — a missed event (measured:
# 2 loads in 30 took 66-79 ms with a 50 ms guard) costs no more than the poll did
POLL_MAX = 0.01


async def _wait_migration(
    q: QMPClient, what: str, timeout: float = 60, events: EventListener | None = None
) -> None:
    """Until the migration QEMU runs is completed (VMError if it failed, was cancelled
    or took ``timeout``).  With ``events`` (a MIGRATION listener registered before the
    migration began) it wakes on QEMU's event; ``query-migrate`` is asked first, after
    each event and on the poll's cadence without one, and is what decides."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        st = await execute(q, "query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"{what}: migration {status}: {st.get('error-desc', '')}", step=what)
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMError(f"{what}: migration did not complete in {timeout:.0f} s", step=what)
        if events is None:  # no listener: poll, backing off to 10 ms
            await asyncio.sleep(delay)
        else:  # the event wakes us at once; the poll's cadence stays as the guard
            with contextlib.suppress(TimeoutError):
                while True:  # statuses other than the end ones (setup, active) pass
                    ev = await asyncio.wait_for(events.get(), min(delay, left))
                    if ev.get("data", {}).get("status") in ("completed", "failed", "cancelled"):
                        break
        delay = min(delay * 2, POLL_MAX)


async def _migrate(q: QMPClient, cmd: str, fdname: str, what: str, timeout: float = 60) -> None:
    """``cmd`` (migrate / migrate-incoming) to ``fd:fdname``, waited for by event."""
    listener = EventListener(names=("MIGRATION",))
    with q.listen(listener):
        await execute(q, cmd, {"uri": f"fd:{fdname}"})
        await _wait_migration(q, what, timeout, events=listener)


async def _hand_fd(q: QMPClient, fd: int, fdname: str) -> None:
    q.send_fd_scm(fd)
    await execute(q, "getfd", {"fdname": fdname})


async def set_ignore_shared(q: QMPClient, on: bool = True) -> None:
    """``x-ignore-shared`` (RAM not in the stream), and ``events``: QEMU then sends a
    MIGRATION event on each status change, which the waits below wake on."""
    await execute(
        q,
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "x-ignore-shared", "state": on},
                {"capability": "events", "state": True},
            ]
        },
    )


async def save_devstate(
    q: QMPClient, dest: Path, set_caps: bool = True, timeout: float = 60
) -> None:
    """Write device state of a *paused* VM to ``dest`` (not RAM: ``x-ignore-shared``,
    set here unless ``set_caps`` is false; the bench's baseline turns it off)."""
    if set_caps:
        await set_ignore_shared(q, True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await _hand_fd(q, fd, "torpor-save")
    finally:
        os.close(fd)
    await _migrate(q, "migrate", "torpor-save", "save device state", timeout)
    await _until_finalized(q, "save device state")


async def _until_finalized(q: QMPClient, what: str, timeout: float = COMMAND_TIMEOUT) -> None:
    """Until QEMU has moved the VM out of ``finish-migrate``.  QEMU's migration thread
    sets an outgoing migration ``completed`` (query-migrate, the MIGRATION event) and
    only then, once it holds the big lock again, the VM's run state; a ``cont`` in
    between fails ("Migration is not finalized yet": 7 saves in 3,000 back to back
    here).  Usually one ``query-status`` that says so at once."""
    deadline = time.monotonic() + timeout
    while (await execute(q, "query-status"))["status"] == "finish-migrate":
        if time.monotonic() > deadline:
            raise VMError(f"{what}: the VM stayed in finish-migrate for {timeout:.0f} s", step=what)
        await asyncio.sleep(0.0005)


async def load_devstate(q: QMPClient, src: Path, set_caps: bool = True) -> None:
    """Load device state into a QEMU started with ``-incoming defer`` (RAM mapped already)."""
    if set_caps:
        await set_ignore_shared(q, True)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await _hand_fd(q, fd, "torpor-load")
    finally:
        os.close(fd)
    await _migrate(q, "migrate-incoming", "torpor-load", "load device state")

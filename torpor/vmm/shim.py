"""The per-VM supervisor: one process per running VM, like containerd's shim.

Why it exists: QEMU's control-port socket accepts a single connection, VMs must
outlive the CLI that started them, and somebody must be QEMU's parent to learn
how it ended.  The shim

1. boots QEMU (as its child, killed with it via PR_SET_PDEATHSIG), connects the
   guest agent's control port, says HELLO, sets the guest clock and seeds its RNG;
2. starts the VM's main command and appends its output to ``main.log``;
3. serves any number of clients on ``agent.sock`` (0600) with the same frames as
   the guest, remapping request ids so clients never collide;
4. records every transition in ``state.json``; when the main command exits, or on
   STOP / SIGTERM, powers the guest off (SHUTDOWN, then SIGTERM, then SIGKILL) and
   records the exit code.

Phases: launch -> connect -> hello -> serve -> shutdown -> reap; cleanup (sockets,
RAM file) always runs.  Startup success or failure is reported once, as a JSON
line, on the pipe given with ``--ready-fd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor import failpoints
from torpor.agent.protocol import (
    EXEC_TTY,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    Started,
    T,
)
from torpor.errors import TorporError, VMError
from torpor.paths import Paths
from torpor.vmm import layout
from torpor.vmm.capture import CAPTURE, CAPTURE_END, ShadowSync
from torpor.vmm.launch import Prelaunch
from torpor.vmm.state import (
    Status,
    VMConfig,
    alive,
    load_config,
    load_state,
    overwrite_state,
    proc_start_time,
    save_state,
    write_quick,
)

log = logging.getLogger("torpor.shim")

if os.environ.get("TORPOR_LAZY_RESTORE") != "0" and os.geteuid() == 0:
    # imported once in the zygote, where this module is: a lazy restore's memory
    # server is forked from the shim (torpor.vmm.lazymem) and then starts ~0.1 s sooner
    # (lazy by default for a session's recovery; it needs root)
    from torpor.vmm.lazymem import preload

    preload()
# how long a capture waits for a restore's background shadow copy (512 MiB: ~1 s)
SHADOW_INIT_WAIT = 60.0

TERMINAL = {
    T.HELLO: {T.HELLO_OK},
    T.EXEC: {T.EXIT},
    T.STAT: {T.FILEINFO},
}
PR_SET_PDEATHSIG = 1
MAX_DETACHED_EXITS = 1024  # exit statuses kept for REATTACH (a few dozen bytes each)
# free bytes on the disk's filesystem before a guest paused on ENOSPC is resumed
RESUME_FREE = int(os.environ.get("TORPOR_RESUME_FREE_MIB", "16")) << 20
# in a shim forked by the zygote (torpor.vmm.zygote): the modules loaded at the fork
FORK_MODULES: frozenset[str] | None = None


def imported_since_fork() -> list[str]:
    """Modules a zygote-forked shim imported itself: each one is loaded (without
    bytecode caches: compiled) again by every start, so the zygote should have it."""
    if FORK_MODULES is None:
        return []
    return sorted(set(sys.modules) - FORK_MODULES)


def _terminal(req_type: int, reply_type: int) -> bool:
    if reply_type == T.ERROR:
        return True
    return reply_type in TERMINAL.get(req_type, {T.OK})


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.umask(0o077)


@dataclass
class Route:
    client: Client | None
    client_id: int
    req_type: int
    tty: bool = False  # an EXEC on a terminal: hung up (SIGHUP) when its client leaves
    pid: int = 0  # an EXEC's guest pid, from its STARTED: what REATTACH names


#: Guest output a client may have queued in the shim (beyond what the shim queued for
#: it itself, such as an attach's replay of the log) before it is dropped: Client.send
MAX_BEHIND = 16 << 20


@dataclass(eq=False)
class Client:
    writer: asyncio.StreamWriter
    ids: dict[int, int] = field(default_factory=dict)  # client id -> guest id
    attached: set[int] = field(default_factory=set)  # client ids attached to main

    grace: int = 0  # bytes the shim itself queued for it since it was last caught up

    def send(self, frame: Frame, own: bool = False) -> None:
        """Queue ``frame`` for the client.  ``own``: data of the shim's own, bounded by
        its configuration (an attach's replay of the log), not the guest's.  A client
        whose queue holds more than :data:`MAX_BEHIND` of guest output (it stopped
        reading: a stalled pipe, or on purpose) is dropped — its connection closed,
        its requests detached as if it had left — instead of the shim holding whatever
        the guest prints for it.  The VM and other clients go on."""
        if self.writer.is_closing():
            return
        data = frame.encode()
        queued = self.writer.transport.get_write_buffer_size()
        if own:
            self.grace += len(data)
        elif queued <= MAX_BEHIND:
            self.grace = 0
        elif queued > MAX_BEHIND + self.grace:
            log.warning("a client fell %d MiB behind the guest's output: dropped", queued >> 20)
            self.writer.transport.abort()
            return
        self.writer.write(data)


class AdoptedProcess:
    """QEMU spawned before asyncio was imported (see torpor.vmm.launch), awaited
    through a pidfd; the subset of asyncio.subprocess.Process the shim uses."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._p = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._p.poll()

    def send_signal(self, sig: int) -> None:
        if self._p.poll() is None:
            self._p.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already reaped by poll()
            return self._p.wait()
        loop = asyncio.get_running_loop()
        try:
            done = loop.create_future()
            loop.add_reader(fd, lambda: done.done() or done.set_result(None))
            try:
                await done
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self._p.wait()


class Shim:
    def __init__(
        self,
        paths: Paths,
        vm_id: str,
        ready_fd: int | None,
        pre: Prelaunch | None = None,
        cfg: VMConfig | None = None,
        pool: Any = None,
    ):
        self.pre = pre
        self.paths = paths
        self.vm_dir = paths.vm(vm_id)
        # a pool's spare (torpor.vmm.pool.Slot) has no vm.json until it is claimed
        self.cfg: VMConfig = cfg if cfg is not None else load_config(self.vm_dir)
        self.pool = pool
        self.claimed_at = 0.0  # monotonic time of a spare's claim
        self.files = layout.VMFiles(self.vm_dir)
        self.ready_fd = ready_fd
        self.state = load_state(self.vm_dir)
        self.proc: AdoptedProcess | None = None
        self.guest_w: asyncio.StreamWriter | None = None
        self.routes: dict[int, Route] = {}
        # EXIT payloads of EXECs that ended while no client had them, by pid (REATTACH)
        self.detached_exits: dict[int, bytes] = {}
        self.next_gid = 1
        self.main_gid = 0
        self.main_exit: ExitStatus | None = None
        self.main_log: Any = None
        self.waiters: dict[int, asyncio.Future[Frame]] = {}
        self.stopping = False
        self.stop_waiters: list[tuple[Client, int]] = []
        self.qemu_exited = asyncio.Event()
        self.clients: set[Client] = set()
        self.ever_attached = False
        self.capturing = False
        self.paused_for: Client | None = None  # the client holding the guest paused
        self.shadow_init: asyncio.Future[None] | None = None
        self.restored_info: dict[str, Any] | None = None
        # guest RAM mapped share=off (set at launch from Prelaunch, for QEMU's whole
        # life): its RAM file never shows the guest's writes — never captured from it
        self.ram_private = False
        self.private_ram: Any = None  # its captures' state (torpor.vmm.ramless.PrivateRAM)
        self.shadow_sync = ShadowSync(self.files.ram, self.files.shadow)
        self.io_error = ""  # why QEMU holds the guest paused (a full disk), or ""
        from torpor.vmm.logfile import LogLimits

        self.log_limits = LogLimits(self.cfg.log_max_size, self.cfg.log_max_files)
        self.console_task: asyncio.Task[None] | None = None
        self.events_task: asyncio.Task[None] | None = None

    # -- state -----------------------------------------------------------------------
    def set_state(self, durable: bool = True, **kw: Any) -> None:
        """Record a transition in ``state.json`` (atomic).  ``durable=False`` skips the
        fsyncs, for the start-up's records only (STARTING twice, RUNNING): a host crash
        ends the VM's processes, so whichever of them survives it reads as DEAD, as the
        one before it would (a state naming processes a crash ended is read as dead; a
        rename over the existing file is not torn on ext4, auto_da_alloc; a missing or
        empty one reads CREATED).  No new state can appear; the fsyncs cost a restore
        ~7 ms of wall time each under load.  Every later record (EXITED, hibernated,
        an I/O error) is fsync'd."""
        self.state = self.state.replace(**kw)
        try:
            if durable:
                save_state(self.vm_dir, self.state)
            else:
                write_quick(self.vm_dir / "state.json", self.state.to_json())
        except OSError as e:
            # a full (or read-only) VM folder must not kill the supervisor of a running
            # guest: the state stays in memory and is written with the next change
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                with contextlib.suppress(OSError):
                    overwrite_state(self.vm_dir, self.state)
                    return
            log.warning("cannot record state %s: %s", self.state.status, e)

    def report_ready(self, ok: bool, **info: Any) -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (json.dumps({"ok": ok, **info}) + "\n").encode())
            os.close(self.ready_fd)
        self.ready_fd = None

    # -- guest link --------------------------------------------------------------------
    def alloc_gid(self) -> int:
        while True:
            gid = self.next_gid
            self.next_gid = self.next_gid % 0xFFFFFFF0 + 1
            if gid not in self.routes and gid not in self.waiters and gid != self.main_gid:
                return gid

    def to_guest(self, frame: Frame) -> None:
        if self.guest_w is None or self.guest_w.is_closing():
            raise VMError("guest control channel is closed")
        log.debug("-> guest %s", frame)
        self.guest_w.write(frame.encode())

    async def request(self, type_: int, payload: bytes = b"", timeout: float = 10.0) -> Frame:
        gid = self.alloc_gid()
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.waiters[gid] = fut
        try:
            self.to_guest(Frame(type_, gid, payload))
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.pop(gid, None)
        if reply.type == T.ERROR:
            err = ErrorReply.decode(reply.payload)
            raise VMError(
                f"guest agent: {T(type_).name} failed: {err.message} "
                f"({errno.errorcode.get(err.errno, err.errno)})"
            )
        return reply

    async def guest_reader(self, reader: asyncio.StreamReader) -> None:
        # resync: a restored port can start mid-frame (see FrameDecoder); a hostile
        # guest's garbage costs only the bytes skipped
        dec = FrameDecoder(resync=True)
        why = "guest control channel closed"
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                skipped = dec.skipped
                frames = dec.feed(data)
                if dec.skipped != skipped:
                    log.warning("skipped %d bytes of the guest channel", dec.skipped - skipped)
                for frame in frames:
                    try:
                        self.from_guest(frame)
                    except Exception:  # a malformed (hostile) frame must not end the channel
                        log.exception("dropped a guest frame %s", frame)
        except Exception as e:  # never silently: every later request would wait it out
            log.exception("guest channel reader failed")
            why = f"guest channel reader failed: {e}"
        log.info(why)
        # requests waiting on the guest fail now, not at their timeout
        for fut in list(self.waiters.values()):
            if not fut.done():
                fut.set_exception(VMError(why))

    def from_guest(self, frame: Frame) -> None:
        log.debug("<- guest %s", frame)
        if frame.id in self.waiters:
            fut = self.waiters[frame.id]
            if not fut.done() and frame.type not in (T.STARTED,):
                fut.set_result(frame)
            return
        if frame.id == self.main_gid and self.main_gid:
            self.main_frame(frame)
            return
        route = self.routes.get(frame.id)
        if route is None:
            return
        if frame.type == T.STARTED and route.req_type == T.EXEC:
            with contextlib.suppress(TorporError):  # the guest's bytes: never trusted
                route.pid = Started.decode(frame.payload).pid
        if route.client is not None:
            route.client.send(Frame(frame.type, route.client_id, frame.payload))
        if _terminal(route.req_type, frame.type):
            del self.routes[frame.id]
            if route.client is not None:
                route.client.ids.pop(route.client_id, None)
            elif frame.type == T.EXIT and route.pid:  # nobody had it: kept for REATTACH
                self.detached_exits[route.pid] = frame.payload
                while len(self.detached_exits) > MAX_DETACHED_EXITS:
                    del self.detached_exits[next(iter(self.detached_exits))]

    # -- main process ---------------------------------------------------------------------
    def open_main_log(self) -> Any:
        from torpor.vmm.logfile import RotatingLog

        if self.main_log is None:
            self.main_log = RotatingLog(self.files.main_log, self.log_limits)
        return self.main_log

    def main_frame(self, frame: Frame) -> None:
        # a restored main command prints from `cont` on, before start_main ran: the log
        # is opened on first use (a None here killed the guest reader, and every request)
        self.open_main_log()
        if frame.type in (T.STDOUT, T.STDERR):
            stream = "stdout" if frame.type == T.STDOUT else "stderr"
            rec = {
                "t": time.time(),
                "s": stream,
                "d": frame.payload.decode("utf-8", "surrogateescape"),
            }
            self.main_log.write((json.dumps(rec) + "\n").encode())
        elif frame.type in (T.EXIT, T.ERROR):
            if frame.type == T.EXIT:
                self.main_exit = ExitStatus.decode(frame.payload)
            else:
                err = ErrorReply.decode(frame.payload)
                msg = f"torpor: cannot start main command: {err.message}\n"
                rec = {"t": time.time(), "s": "stderr", "d": msg}
                self.main_log.write((json.dumps(rec) + "\n").encode())
                self.main_exit = ExitStatus(125, 0)
            asyncio.get_running_loop().create_task(self.shutdown("main process exited"))
        elif frame.type == T.STARTED:
            return
        for client in list(self.clients):
            for cid in list(client.attached):
                if frame.type in (T.STDOUT, T.STDERR):
                    client.send(Frame(frame.type, cid, frame.payload))
        if self.main_exit is not None:
            self.notify_main_exit()

    def notify_main_exit(self) -> None:
        assert self.main_exit is not None
        for client in list(self.clients):
            for cid in list(client.attached):
                client.send(Frame(T.EXIT, cid, self.main_exit.encode()))
            client.attached.clear()

    def replay_main(self, client: Client, cid: int) -> None:
        """ATTACH: what is kept of the main command's output, oldest rotated file first."""
        from torpor.vmm.logfile import log_files

        for p in log_files(self.files.main_log, self.cfg.log_max_files):
            with contextlib.suppress(OSError), open(p, encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                        rec = json.loads(line)
                        t = T.STDOUT if rec["s"] == "stdout" else T.STDERR
                        data = rec["d"].encode("utf-8", "surrogateescape")
                        for i in range(0, len(data), 1 << 16):
                            client.send(Frame(t, cid, data[i : i + (1 << 16)]), own=True)

    # -- clients ----------------------------------------------------------------------------
    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = Client(writer)
        self.clients.add(client)
        dec = FrameDecoder()
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                try:
                    frames = dec.feed(data)
                except TorporError as e:
                    client.send(Frame(T.ERROR, 0, ErrorReply(errno.EPROTO, str(e)).encode()))
                    break
                for frame in frames:
                    self.from_client(client, frame)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client left, or the shim is shutting down
        finally:
            if self.paused_for is client:  # it asked to keep the guest paused, then left
                self.paused_for = None
                log.warning("capturing client left with the guest paused: resuming")
                asyncio.get_running_loop().create_task(self.resume_guest())
            self.clients.discard(client)
            for gid in client.ids.values():
                if gid in self.routes:
                    self.routes[gid].client = None
                    if self.routes[gid].tty:  # like closing a terminal window
                        with contextlib.suppress(VMError):
                            self.to_guest(Frame(T.SIGNAL, gid, struct.pack("<I", signal.SIGHUP)))
            with contextlib.suppress(Exception):
                writer.close()

    def from_client(self, client: Client, frame: Frame) -> None:
        cid = frame.id

        def error(code: int, msg: str) -> None:
            client.send(Frame(T.ERROR, cid, ErrorReply(code, msg).encode()))

        if frame.type == T.ATTACH:
            client.attached.add(cid)
            self.ever_attached = True
            self.replay_main(client, cid)
            if self.main_exit is not None or not self.main_gid:
                client.attached.discard(cid)
                status = self.main_exit or ExitStatus(0, 0)
                client.send(Frame(T.EXIT, cid, status.encode()))
            return
        if frame.type == CAPTURE:
            asyncio.get_running_loop().create_task(self.capture(client, cid, frame.payload))
            return
        if frame.type == CAPTURE_END:
            asyncio.get_running_loop().create_task(self.capture_end(client, cid, frame.payload))
            return
        if frame.type == T.REATTACH:
            self.reattach(client, cid, frame.payload)
            return
        if frame.type == T.STOP:
            (timeout,) = struct.unpack("<I", frame.payload[:4] or b"\x0a\x00\x00\x00")
            self.stop_waiters.append((client, cid))
            asyncio.get_running_loop().create_task(self.stop(timeout))
            return
        if frame.type in (T.STDIN, T.SIGNAL, T.RESIZE):
            gid = self.main_gid if cid in client.attached else client.ids.get(cid, 0)
            if not gid:
                error(errno.ESRCH, f"no request {cid}")
                return
            self.safe_to_guest(Frame(frame.type, gid, frame.payload), client, cid)
            return
        if cid in client.ids:
            error(errno.EBUSY, f"request id {cid} is in use")
            return
        if self.io_error:  # the guest is paused: it would not answer until space is back
            error(errno.ENOSPC, f"VM {self.cfg.name} is paused: {self.io_error}")
            return
        if self.stopping:
            error(errno.ESHUTDOWN, "VM is stopping")
            return
        gid = self.alloc_gid()
        client.ids[cid] = gid
        tty = frame.type == T.EXEC and bool(frame.payload[:1] and frame.payload[0] & EXEC_TTY)
        self.routes[gid] = Route(client, cid, frame.type, tty)
        self.safe_to_guest(Frame(frame.type, gid, frame.payload), client, cid)

    def reattach(self, client: Client, cid: int, payload: bytes) -> None:
        """REATTACH ``u32 pid`` (shim-only): the EXEC whose process is ``pid``, started
        by a client that has gone, streams to this one from now on — its further
        output (what it wrote while no client had it is not kept), STDIN, SIGNAL,
        RESIZE and its EXIT.  STARTED answers first.  An EXEC whose client is still
        connected stays with it (EBUSY); one that ended while detached answers with
        STARTED and its EXIT at once (the last MAX_DETACHED_EXITS are kept)."""

        def error(code: int, msg: str) -> None:
            client.send(Frame(T.ERROR, cid, ErrorReply(code, msg).encode()))

        if len(payload) != 4:
            error(errno.EINVAL, "bad REATTACH request (u32 pid)")
            return
        if cid in client.ids or cid in client.attached:
            error(errno.EBUSY, f"request id {cid} is in use")
            return
        (pid,) = struct.unpack("<I", payload)
        started = Frame(T.STARTED, cid, Started(pid).encode())
        for gid, route in self.routes.items():
            if pid and route.req_type == T.EXEC and route.pid == pid:
                if route.client is not None:
                    error(errno.EBUSY, f"process {pid} streams to another connection")
                    return
                route.client, route.client_id = client, cid
                client.ids[cid] = gid
                client.send(started)
                return
        status = self.detached_exits.pop(pid, None)
        if status is None:
            error(errno.ESRCH, f"no command with pid {pid} to reattach to")
            return
        client.send(started)
        client.send(Frame(T.EXIT, cid, status))

    def safe_to_guest(self, frame: Frame, client: Client, cid: int) -> None:
        try:
            self.to_guest(frame)
        except VMError as e:
            client.send(Frame(T.ERROR, cid, ErrorReply(errno.EPIPE, str(e)).encode()))

    # -- snapshots (see torpor.vmm.capture) ----------------------------------------------------
    async def capture(self, client: Client, cid: int, payload: bytes) -> None:
        from torpor.vmm.capture import pause_and_copy

        def error(code: int, msg: str) -> None:
            client.send(Frame(T.ERROR, cid, ErrorReply(code, msg).encode()))

        try:
            req = json.loads(payload)
            stage = Path(req["stage"])
        except (ValueError, KeyError, TypeError):
            error(errno.EINVAL, "bad CAPTURE request")
            return
        if self.capturing or self.paused_for is not None:
            error(errno.EBUSY, "a snapshot of this VM is already being taken")
            return
        if self.io_error:  # EIO, not ENOSPC: that would read as "no room for the staging copy"
            error(errno.EIO, f"VM {self.cfg.name} is paused: {self.io_error}")
            return
        if self.stopping or self.qemu_exited.is_set() or self.state.status != Status.RUNNING:
            error(errno.ESHUTDOWN, f"VM is {self.state.status}")
            return
        if self.ram_private and self.private_ram is None:
            # its RAM file is the unchanged base: a capture from it would be stale
            error(
                errno.EOPNOTSUPP,
                f"VM {self.cfg.name}'s guest RAM is mapped private (share=off) and its "
                "restore left nothing to capture it with",
            )
            return
        keep = bool(req.get("keep_paused"))
        self.capturing = True
        log.info("capture: requested (keep_paused=%s)", keep)
        try:
            # a private VM's shadow_init is only ever a lazy restore's stream
            # (lazymem.fill_shadow): its capture reads the base from the lazy RAM file
            # itself (ramless.open_base, every chunk hash-checked), so it does not wait
            # for the whole memory to stream in first
            if self.shadow_init is not None and not self.ram_private:
                try:  # bounded: a stuck copy must fail this capture, not hang it
                    await asyncio.wait_for(asyncio.shield(self.shadow_init), SHADOW_INIT_WAIT)
                except TimeoutError:
                    error(
                        errno.EAGAIN,
                        f"the VM's RAM shadow is still being prepared after its restore "
                        f"({SHADOW_INIT_WAIT:.0f} s); try again",
                    )
                    return
                except Exception as e:  # a failed init: a full capture follows
                    log.warning("shadow init failed: %s", e)
                self.shadow_init = None
            if self.ram_private:  # never from the RAM file (stale): from QEMU itself
                from torpor.vmm.ramless import capture_private

                t = await capture_private(
                    self.files.qmp_sock,
                    self.files.disk,
                    stage,
                    self.private_ram,
                    keep_paused=keep,
                    qemu_pid=self.proc.pid if self.proc else 0,
                    parent_ref=self.vm_dir / "snapshot.ref",
                    fault=str(req.get("fault", "")),
                )
            else:
                t = await pause_and_copy(
                    self.files.qmp_sock,
                    self.files.ram,
                    self.files.disk,
                    stage,
                    self.files.shadow,
                    self.shadow_sync,
                    keep_paused=keep,
                    fault=str(req.get("fault", "")),
                    qemu_pid=self.proc.pid if self.proc else 0,
                )
        except (TorporError, OSError) as e:
            log.warning("capture failed: %s", e)
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            error(code, f"capture failed: {e}")
            return
        finally:
            self.capturing = False
        log.info("capture: done (pause %.0f ms)", float(t.get("pause_ms", 0)))
        if keep:
            if client.writer.is_closing():  # left during the window: do not stay paused
                await self.resume_guest()
            else:
                self.paused_for = client
        client.send(Frame(T.OK, cid, json.dumps(t).encode()))

    async def capture_end(self, client: Client, cid: int, payload: bytes) -> None:
        try:
            action = json.loads(payload).get("action")
        except (ValueError, AttributeError):
            action = None
        if self.paused_for is not client or action not in ("resume", "end"):
            client.send(Frame(T.ERROR, cid, ErrorReply(errno.EINVAL, "nothing to end").encode()))
            return
        self.paused_for = None
        if action == "resume":
            await self.resume_guest()
        else:  # hibernate: QEMU ends here; run() records HIBERNATED and cleans up
            (self.vm_dir / "hibernate").write_text("")
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        client.send(Frame(T.OK, cid))

    async def resume_guest(self) -> None:
        from torpor.vmm.capture import resume

        if self.qemu_exited.is_set():
            return
        try:
            await resume(self.files.qmp_sock)
        except TorporError as e:
            log.error("could not resume the guest after a capture: %s", e)

    # -- lifecycle ----------------------------------------------------------------------------
    async def launch(self) -> None:
        from torpor.vmm.launch import prelaunch

        if self.pre is None:  # started as `python -m torpor.vmm.shim`: spawn QEMU here
            self.pre = prelaunch(self.paths, self.cfg, self.files)
        pre = self.pre
        self.ram_private = bool(pre.ram_private)
        log.info(
            "QEMU spawned %.0f ms into the start (machine spec %.0f ms)%s",
            pre.prep_ms,
            pre.spec_ms,
            "; guest RAM private (share=off)" if self.ram_private else "",
        )
        self.proc = AdoptedProcess(pre.popen)
        accel, t0 = pre.accel, pre.t0
        restore = self.files.dir / "restore.json"
        restoring = pre.restore is not None
        ram_copy = asyncio.wrap_future(pre.ram_copy) if pre.ram_copy is not None else None
        self.set_state(
            durable=False,
            status=Status.STARTING,
            qemu_pid=self.proc.pid,
            qemu_start=proc_start_time(self.proc.pid),
            accel=accel,
            started_at=time.time(),
            exit_code=None,
            error="",
            finished_at=0.0,
        )
        asyncio.get_running_loop().create_task(self.watch_qemu())
        self.console_task = asyncio.get_running_loop().create_task(self.pump_console())
        deadline = t0 + boot_timeout(accel)
        if restoring:
            # Connect the control port before the guest runs: the restored virtio-serial
            # port then never sees its host go away, and the agent answers at once.
            reader = await self.connect_ctl(deadline)
            await self.load_snapshot(restore, deadline, ram_copy)
            log.info(
                "restored: QEMU spawn to running guest %.0f ms", (time.monotonic() - t0) * 1000
            )
        else:
            reader = await self.connect_ctl(deadline)
        asyncio.get_running_loop().create_task(self.guest_reader(reader))
        hello = asyncio.get_running_loop().create_task(
            self.request(T.HELLO, timeout=max(1.0, deadline - time.monotonic()))
        )
        exited = asyncio.get_running_loop().create_task(self.qemu_exited.wait())
        done, _ = await asyncio.wait({hello, exited}, return_when=asyncio.FIRST_COMPLETED)
        if hello not in done:
            hello.cancel()
            raise VMError(
                f"QEMU exited during boot with code {self.proc.returncode}", step="boot guest"
            )
        exited.cancel()
        try:
            hello.result()
        except TimeoutError as e:
            raise VMError(
                f"guest agent did not answer within {boot_timeout(accel):.0f} s "
                f"(accelerator {accel})",
                step="boot guest",
            ) from e
        boot_ms = (time.monotonic() - t0) * 1000
        log.info("guest agent answered HELLO %.0f ms after QEMU spawn", boot_ms)
        more = {}
        if self.pool is not None:  # a spare: paused here until a restore claims it
            await self.park()
            more = {"started_at": time.time()}
        now = time.time_ns()
        # both at once: the first answer after a claim proves the agent is there
        clock = self.request(T.SET_TIME, struct.pack("<qI", now // 10**9, now % 10**9))
        entropy = self.request(T.ADD_ENTROPY, os.urandom(64))
        done = await asyncio.gather(clock, entropy, return_exceptions=True)
        for r in done:  # ADD_ENTROPY may fail: host-mode agents without CAP_SYS_ADMIN
            if isinstance(r, BaseException) and (r is done[0] or not isinstance(r, VMError)):
                raise r
        if self.claimed_at:
            boot_ms = (time.monotonic() - self.claimed_at) * 1000
            log.info("claimed spare: agent answered %.0f ms after the claim", boot_ms)
        # not fsync'd: after a host crash RUNNING and STARTING both read as DEAD
        self.set_state(durable=False, status=Status.RUNNING, boot_ms=round(boot_ms, 1), **more)
        self.start_main()

    async def pump_console(self) -> None:
        """Copy QEMU's serial console stream into the size-capped, rotated console.log.

        The guest decides how much it prints; QEMU writing a file itself grew it without
        bound.  Output before this connects (QEMU's first milliseconds) is dropped by
        QEMU (``wait=off``); the kernel prints nothing that early.
        """
        from torpor.vmm.logfile import RotatingLog

        out = RotatingLog(self.files.console_log, self.log_limits)
        try:
            while True:  # bound by QEMU (or by the jail just before it)
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.files.console_sock.name
                    )
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if self.qemu_exited.is_set():
                        return
                    await asyncio.sleep(0.005)
            while data := await reader.read(1 << 16):
                out.write(data)
            writer.close()
        except OSError as e:
            log.warning("console stream lost: %s", e)
        finally:
            out.close()

    async def connect_ctl(self, deadline: float) -> asyncio.StreamReader:
        assert self.proc is not None
        while not self.files.ctl_sock.exists():
            if self.qemu_exited.is_set():
                raise VMError(
                    f"QEMU exited during start-up with code {self.proc.returncode}",
                    step="start QEMU",
                )
            if time.monotonic() > deadline:
                raise VMError("QEMU did not create its control socket", step="start QEMU")
            await asyncio.sleep(0.002)
        while True:  # the socket file appears between QEMU's bind() and listen()
            try:
                reader, self.guest_w = await asyncio.open_unix_connection(self.files.ctl_sock.name)
                return reader
            except ConnectionRefusedError:
                if time.monotonic() > deadline or self.qemu_exited.is_set():
                    raise
                await asyncio.sleep(0.002)

    def start_shadow_init(self, info: dict[str, Any]) -> None:
        """After a restore: this VM's shadow becomes a copy of the snapshot's memory
        (from the same immutable or locked source, never from the now running RAM),
        so the VM's first capture is already incremental.  Runs in the background."""
        from torpor.vmm.capture import copy_shadow_of, sparse_copy, write_meta

        if info.get("lazy"):  # read through the lazy RAM file: the rest streams in
            from torpor.vmm.lazymem import fill_shadow

            job_args = (self.files.ram, self.files.shadow, self.files.shadow_meta)
            self.shadow_init = asyncio.ensure_future(
                asyncio.to_thread(fill_shadow, *job_args, str(info["snapshot"]))
            )
            return
        src = info.get("ram_from")
        if not src or info.get("shadow_ready"):
            return
        src_path = self.files.dir / src
        if self.ram_private:
            # no full copy per VM: a private VM's captures read what it wrote from
            # QEMU itself (the point of mapping RAM private is not to copy it)
            if not info.get("ram_snapshot") or src_path.parent == self.files.dir:
                from torpor.vmm.capture import remove_shadow

                remove_shadow(src_path)  # a one-shot source of this VM (ram.src)
            return
        snap = info["snapshot"]
        locked_snap = info.get("ram_snapshot")
        shadow, meta = self.files.shadow, self.files.shadow_meta

        def job() -> None:
            try:
                write_meta(meta, {"snapshot": None, "capture": None})
                if locked_snap:
                    copy_shadow_of(src_path, shadow, locked_snap)
                else:
                    sparse_copy(src_path, shadow)
                write_meta(meta, {"snapshot": snap, "capture": None})
            finally:
                if not locked_snap:
                    src_path.unlink(missing_ok=True)

        self.shadow_init = asyncio.ensure_future(asyncio.to_thread(job))

    async def load_snapshot(
        self, restore: Path, deadline: float, ram_copy: asyncio.Future[int] | None = None
    ) -> None:
        """Restore mode: load device state over the already-mapped RAM file, resume."""
        from torpor.vmm import qmp

        info = json.loads(restore.read_text())
        t0 = time.monotonic()
        while not self.files.qmp_sock.exists():
            if self.qemu_exited.is_set() or time.monotonic() > deadline:
                raise VMError("QEMU did not create its QMP socket", step="restore")
            await asyncio.sleep(0.002)
        t_sock = _ms_since(t0)
        async with qmp.session(self.files.qmp_sock, wait_until=deadline) as q:
            await qmp.set_ignore_shared(q, True)
            t_qmp = _ms_since(t0)
            if ram_copy is not None:
                await ram_copy
                self.restored_info = info  # its shadow is filled once the VM is ready
            elif info.get("lazy"):
                self.restored_info = info  # the shadow streams in through the lazy file
            t_ram = _ms_since(t0)
            if info.get("fault") == "kill-qemu-in-restore" and self.proc is not None:
                self.proc.kill()
            await qmp.load_devstate(q, self.files.dir / info["devstate"], set_caps=False)
            t_load = _ms_since(t0)
            await qmp.execute(q, "cont")
        log.info(
            "restore: QMP socket %.0f ms, QMP ready %.0f, RAM copied %.0f, device state "
            "loaded %.0f, running %.0f",
            t_sock,
            t_qmp,
            t_ram,
            t_load,
            _ms_since(t0),
        )
        self.main_gid = int(info.get("main_id", 0))
        if self.main_gid:
            self.next_gid = self.main_gid + 1
        if self.ram_private:
            self.private_ram = self.prepare_private(info)
        (self.files.dir / info["devstate"]).unlink(missing_ok=True)
        restore.unlink()

    def prepare_private(self, info: dict[str, Any]) -> Any:
        """A private VM's capture state (torpor.vmm.ramless): an empty overlay (the VM
        equals the restored snapshot) and the head of the stream just loaded."""
        from torpor.vmm.ramless import PrivateRAM, overlay_of

        ram = PrivateRAM(
            overlay_of(self.files.shadow), self.cfg.memory_mib << 20, str(info["snapshot"])
        )
        try:
            ram.set_prefix(
                (self.files.dir / info["devstate"]).read_bytes(), str(info.get("devstate_qemu", ""))
            )
            ram.start()
        except OSError as e:  # then every capture of it is refused, never stale
            log.warning("private RAM: no capture will be possible: %s", e)
            return None
        return ram

    async def park(self) -> None:
        """A pool's spare (torpor.vmm.pool), restored and its agent answered once (so
        TCG has translated the guest's wake-up path): pause the guest, fill the shadow
        (nothing waits for it yet), wait until a restore claims this VM — it wrote
        vm.json (name) and handed over its ready pipe — then resume it.  Seen from the
        guest this is a pause right after its restore, like a capture's."""
        from torpor.vmm import qmp
        from torpor.vmm.logfile import LogLimits

        if os.environ.get("TORPOR_POOL_WARM", "") == "exec":
            # opt-in: one `true` run before the pause also translates the guest's
            # fork/exec path (a restore's first exec pays it otherwise, ~100 ms under
            # TCG); the guest then differs from the snapshot by that process (a pid)
            with contextlib.suppress(VMError, TimeoutError):
                await self.request(T.EXEC, ExecRequest(argv=("true",)).encode(), timeout=30)
        async with qmp.session(self.files.qmp_sock, wait_until=time.monotonic() + 10) as q:
            await qmp.execute(q, "stop")
            if self.restored_info is not None:
                self.start_shadow_init(self.restored_info)
                self.restored_info = None
                if self.shadow_init is not None:
                    await self.shadow_init
                    self.shadow_init = None
            log.info("spare of snapshot %s parked: waiting for a claim", self.pool.snapshot[:12])
            self.ready_fd = await self.pool.wait(self.vm_dir, self.qemu_exited)
            self.claimed_at = time.monotonic()
            if self.proc is not None:  # a spare ran SCHED_IDLE: normal before the guest runs
                from torpor.vmm.pool import set_sched

                set_sched((os.getpid(), self.proc.pid), idle=False)
            await qmp.execute(q, "cont")
        self.cfg = load_config(self.vm_dir)
        self.log_limits = LogLimits(self.cfg.log_max_size, self.cfg.log_max_files)
        log.info("claimed as VM %s", self.cfg.name)

    def start_main(self) -> None:
        self.open_main_log()
        if self.main_gid:  # restored: the main command is still running in the guest
            return
        if not self.cfg.command:
            return
        self.main_gid = self.alloc_gid()
        self.set_state(main_id=self.main_gid)
        req = ExecRequest(
            argv=tuple(self.cfg.command),
            env=tuple(self.cfg.env),
            cwd=self.cfg.workdir,
            user=self.cfg.user,
            stdin=self.cfg.stdin_open,
            tty=self.cfg.tty is not None,
            cols=self.cfg.tty[0] if self.cfg.tty else 80,
            rows=self.cfg.tty[1] if self.cfg.tty else 24,
        )
        self.to_guest(Frame(T.EXEC, self.main_gid, req.encode()))

    async def watch_qemu(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        log.info("QEMU exited with %s", code)
        self.qemu_exited.set()

    async def stop(self, timeout: float) -> None:
        if self.main_gid and self.main_exit is None and not self.stopping and not self.io_error:
            with contextlib.suppress(VMError):
                self.to_guest(Frame(T.SIGNAL, self.main_gid, struct.pack("<I", signal.SIGTERM)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._main_done(), timeout)
            if self.main_exit is None:
                with contextlib.suppress(VMError):
                    self.to_guest(Frame(T.SIGNAL, self.main_gid, struct.pack("<I", signal.SIGKILL)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._main_done(), 2)
        await self.shutdown("stop requested")

    async def watch_folder(self) -> None:
        """End the VM when its folder is gone (``rm -rf`` of the VM or of its home).

        Nothing can reach or stop such a VM any more, and its disk went with the
        folder: there is nothing to stop gracefully, so QEMU is killed.
        """
        while not self.qemu_exited.is_set():
            await asyncio.sleep(2)
            if not os.path.isdir(self.vm_dir):
                log.warning("VM folder %s is gone: ending the VM", self.vm_dir)
                if self.proc is not None and self.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                return

    # -- host I/O errors (a full disk) ------------------------------------------------------
    async def watch_events(self) -> None:
        """Hear QEMU's BLOCK_IO_ERROR / RESUME on the shim's own monitor.

        With ``werror=enospc`` (see torpor.vmm.qemu) QEMU stops the guest when the
        disk's host filesystem is full.  Without this the VM looked "Up" while frozen
        and every exec or snapshot hung until its timeout.
        """
        from torpor.vmm import qmp

        try:
            async with qmp.session(
                self.files.events_sock, "torpor-events", wait_until=time.monotonic() + 10
            ) as q:
                with q.listener(("BLOCK_IO_ERROR", "RESUME")) as events:
                    # stopped before this monitor was connected (an event we missed)?
                    status = await qmp.execute(q, "query-status")
                    if status.get("status") == "io-error":
                        self.on_io_error({"nospace": self._disk_free() < RESUME_FREE}, q)
                    async for ev in events:
                        data = ev.get("data", {})
                        if ev["event"] == "BLOCK_IO_ERROR" and data.get("action") == "stop":
                            self.on_io_error(data, q)
                        elif ev["event"] == "RESUME" and self.io_error:
                            self.set_io_error("")
        except TorporError as e:
            log.warning("no QEMU event monitor: host I/O errors go unreported: %s", e)

    def _disk_free(self) -> int:
        try:
            st = os.statvfs(self.files.disk.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def set_io_error(self, why: str) -> None:
        self.io_error = why
        marker = self.files.io_error
        try:
            if why:
                marker.write_text(why)
            else:
                marker.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot record the I/O error marker: %s", e)
        self.set_state(io_error=why)
        log.warning("guest %s", f"paused: {why}" if why else "resumed")

    def on_io_error(self, data: dict[str, Any], q: Any) -> None:
        if self.io_error:
            return
        folder = self.files.disk.parent
        if data.get("nospace"):
            why = (
                f"the filesystem holding its disk is full ({folder}); QEMU paused the guest, "
                f"which resumes by itself once {RESUME_FREE >> 20} MiB there are free"
            )
        else:
            why = f"host I/O error on its disk ({self.files.disk}): {data.get('reason', '?')}"
        self.set_io_error(why)
        asyncio.get_running_loop().create_task(self.resume_when_room(q))

    async def resume_when_room(self, q: Any) -> None:
        """``cont`` once the disk's filesystem has room; a guest that fills it again is
        stopped again by QEMU (another BLOCK_IO_ERROR)."""
        from torpor.vmm import qmp

        while self.io_error and not self.qemu_exited.is_set() and not self.stopping:
            await asyncio.sleep(1.0)
            if self._disk_free() < RESUME_FREE:
                continue
            try:
                status = await qmp.execute(q, "query-status")
                if status.get("status") in ("io-error", "paused"):
                    await qmp.execute(q, "cont")
                if status.get("running"):
                    self.set_io_error("")
            except TorporError as e:
                log.warning("cannot resume the guest: %s", e)

    async def _main_done(self) -> None:
        while self.main_exit is None and not self.qemu_exited.is_set():
            await asyncio.sleep(0.02)

    async def shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: %s", why)
        if not self.qemu_exited.is_set():
            self.set_state(status=Status.STOPPING)
        if not self.qemu_exited.is_set() and not self.io_error:  # a paused guest cannot answer
            with contextlib.suppress(VMError, TimeoutError):
                await self.request(T.SYNC, timeout=10)
            with contextlib.suppress(VMError, TimeoutError):
                await self.request(T.SHUTDOWN, struct.pack("<I", 0), timeout=2)
        if not self.qemu_exited.is_set():
            first = 0.0 if self.io_error else 5.0
            for sig, wait in ((None, first), (signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                if sig is not None and self.proc is not None and self.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.qemu_exited.wait(), wait)
                if self.qemu_exited.is_set():
                    break

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.stop(10)))
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        try:
            await self.launch()
        except (TorporError, OSError) as e:
            tail = console_tail(self.files)
            self.report_ready(False, error=str(e), console=tail)
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            self.set_state(
                status=Status.EXITED, exit_code=125, error=str(e), finished_at=time.time()
            )
            self.cleanup()
            return 1
        with contextlib.suppress(FileNotFoundError):
            self.files.agent_sock.unlink()
        server = await asyncio.start_unix_server(self.serve_client, self.files.agent_sock.name)
        os.chmod(self.files.agent_sock, 0o600)
        if FORK_MODULES is not None:
            late = imported_since_fork()
            log.info(
                "ready: %d modules imported after the zygote's fork%s",
                len(late),
                f" ({', '.join(late)})" if late else "",
            )
        self.report_ready(True, accel=self.state.accel, boot_ms=self.state.boot_ms)
        self.events_task = asyncio.get_running_loop().create_task(self.watch_events())
        folder_task = asyncio.get_running_loop().create_task(self.watch_folder())
        if self.restored_info is not None:
            # after "ready": copying another 100s of MB must not compete with the
            # guest's first steps and the caller's wake-up on two cores
            self.start_shadow_init(self.restored_info)
        await self.qemu_exited.wait()
        server.close()
        failpoints.hit("shim.exiting")  # no agent, the exit not recorded yet
        folder_task.cancel()
        if self.events_task is not None:
            self.events_task.cancel()
        if self.console_task is not None:  # QEMU's last words
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.console_task, 2)
        if self.io_error:
            self.set_io_error("")
        assert self.proc is not None
        hibernated = (self.vm_dir / "hibernate").exists()
        if hibernated:
            (self.vm_dir / "hibernate").unlink()
            self.set_state(
                status=Status.HIBERNATED,
                exit_code=None,
                error="",
                finished_at=time.time(),
                qemu_pid=0,
                qemu_start=0,
            )
            for client in list(self.clients):
                with contextlib.suppress(Exception):
                    client.writer.close()
            self.cleanup()
            return 0
        from torpor.vmm.capture import remove_shadow

        remove_shadow(self.files.shadow)  # ended for good: its last capture is not needed
        if self.main_exit is not None:
            code, err = self.main_exit.code, ""
        elif self.stopping:
            code, err = 137, ""
        else:
            code = 128 + 9 if self.proc.returncode and self.proc.returncode < 0 else 255
            err = f"QEMU exited unexpectedly (status {self.proc.returncode})"
        if self.main_exit is None and self.main_gid:
            self.main_exit = ExitStatus(code, 0)
            self.notify_main_exit()
        self.set_state(
            status=Status.EXITED,
            exit_code=code,
            error=err,
            finished_at=time.time(),
            qemu_pid=0,
            qemu_start=0,
        )
        for client, cid in self.stop_waiters:
            client.send(Frame(T.OK, cid))
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                await client.writer.drain()
                client.writer.close()
        self.cleanup()
        if self.cfg.auto_remove and not self.ever_attached and not self.cfg.client_removes:
            # `run -d --rm`: nobody is attached to remove it, so the shim does
            from torpor.vmm.manager import VMManager

            with contextlib.suppress(TorporError, OSError):
                VMManager(self.paths).remove(self.cfg.id, force=True)
        return 0

    def cleanup(self) -> None:
        lazy = getattr(self.pre, "lazy", None)
        if lazy is not None:  # a lazy restore's FUSE server: unmount the RAM file first
            lazy.stop()
        for p in (
            self.files.ctl_sock,
            self.files.qmp_sock,
            self.files.events_sock,
            self.files.console_sock,
            self.files.agent_sock,
            self.files.ram,
            self.files.io_error,
        ):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        from torpor.vmm.jail import remove_cgroups

        remove_cgroups(self.files.dir)  # QEMU's cgroup (a no-op while QEMU still lives)
        if self.main_log is not None:
            self.main_log.close()


def _ms_since_process_start() -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return (up - proc_start_time(os.getpid()) / ticks) * 1000


def _ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1000


def boot_timeout(accel: str) -> float:
    env = os.environ.get("TORPOR_BOOT_TIMEOUT")
    if env:
        return float(env)
    return 20.0 if accel == "kvm" else 90.0


def console_tail(files: layout.VMFiles, lines: int = 20) -> str:
    out = []
    for p in (files.console_log, files.qemu_log):
        with contextlib.suppress(OSError):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"--- {p.name} ---\n" + "\n".join(text))
    return "\n".join(out)


def main(
    args: Any = None,
    pre: Prelaunch | BaseException | None = None,
    cfg: VMConfig | None = None,
    pool: Any = None,
) -> int:
    """Run the shim; ``args``/``pre`` come from :mod:`torpor.vmm.launch` (QEMU already
    spawned, or why it could not be)."""
    if args is None:
        import argparse

        ap = argparse.ArgumentParser(prog="torpor-shim")
        ap.add_argument("--root", required=True)
        ap.add_argument("--vm", required=True)
        ap.add_argument("--ready-fd", type=int)
        args = ap.parse_args()
        os.chdir(Paths(Path(args.root)).vm(args.vm))  # sockets are bound by relative name
    paths = Paths(Path(args.root))
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("TORPOR_DEBUG") else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log.info("shim up %.0f ms after its process started", _ms_since_process_start())
    shim = Shim(
        paths, args.vm, args.ready_fd, pre if isinstance(pre, Prelaunch) else None, cfg, pool
    )
    st = shim.state
    already = isinstance(pre, RuntimeError) and str(pre) == "VM is already running"
    if already or (
        st.status.active and alive(st.shim_pid, st.shim_start) and st.shim_pid != os.getpid()
    ):
        shim.report_ready(False, error="VM is already running")
        return 1
    if isinstance(pre, BaseException):
        tail = console_tail(shim.files)
        shim.report_ready(False, error=f"cannot start QEMU: {pre}", console=tail)
        shim.set_state(status=Status.EXITED, exit_code=125, error=str(pre), finished_at=time.time())
        return 1
    shim.set_state(
        durable=False,
        status=Status.STARTING,
        shim_pid=os.getpid(),
        shim_start=proc_start_time(os.getpid()),
    )
    return asyncio.run(shim.run())


if __name__ == "__main__":
    sys.exit(main())

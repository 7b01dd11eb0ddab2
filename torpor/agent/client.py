"""Synchronous, thread-safe client for the guest agent protocol.

:class:`AgentClient` speaks docs/protocol.md over one connected stream socket:
the guest's virtio-serial port as exposed by QEMU (used by the shim) or the
shim's own socket (used by the CLI and SDK, which also get ATTACH and STOP).

Design and invariants:

- One reader thread owns the receive side. It routes every frame by request id
  to that request's queue; frames for ids nobody waits for (a request that has
  finished or timed out) are logged and dropped.
- Sends are serialised by a lock, so any number of threads may issue requests
  and feed stdin at once; each request gets a fresh id, never 0, never one in use
  (ids start at a random value, see ``__init__``).
- Every failure is an :class:`~torpor.errors.AgentError`: an ERROR reply raises
  :class:`AgentRequestError` (with ``errno``), a timeout names the request type,
  and losing the connection fails every waiting request.
- Every frame is logged at DEBUG level on the ``torpor.agent`` logger.
- A WRITE_FILE is finished by an empty STDIN, which renames what was sent over the
  target, so a source that fails part-way must never end with one.  A data source
  that could (anything but bytes or a regular file) is read whole into a host spool
  first; a regular file that still fails part-way (EIO, Ctrl-C) has its upload
  cancelled by a SIGNAL to its id: the guest drops the temporary file and frees the
  upload slot (it has 32) at once, not when the connection closes.
"""

from __future__ import annotations

import errno as _errno
import io
import logging
import os
import queue
import random
import signal
import socket
import stat as _stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torpor.agent.protocol import (
    PROTOCOL_VERSION,
    UNCHANGED,
    DirEntry,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    Frame,
    FrameDecoder,
    HelloInfo,
    IdentityReply,
    IdentityRequest,
    MkdirRequest,
    PathRequest,
    ResizeRequest,
    SetTimeRequest,
    ShutdownRequest,
    SignalRequest,
    Started,
    StopRequest,
    SymlinkRequest,
    T,
    WriteFileRequest,
    identity_problem,
    type_name,
)
from torpor.errors import AgentError, ProtocolError, UsageError

log = logging.getLogger("torpor.agent")

#: Seconds to wait for the reply to a one-shot request (or the next frame of a stream).
DEFAULT_TIMEOUT = 60.0
#: Largest STDIN payload we send; well below MAX_PAYLOAD so other requests interleave.
STDIN_CHUNK = 256 * 1024
_MAX_SIGNAL = 64
#: How long a cancelled upload's ERROR is waited for (it comes at once).
CANCEL_TIMEOUT = 5.0

GuestPath = str | os.PathLike[str]


class AgentRequestError(AgentError):
    """The agent answered ERROR: ``errno`` and the agent's ``remote_message``."""

    def __init__(self, request_type: int, reply: ErrorReply, *, path: object = None):
        code = _errno.errorcode.get(reply.errno, str(reply.errno))
        super().__init__(
            f"{reply.message} ({code})", step=f"agent {type_name(request_type)}", path=path
        )
        self.errno = reply.errno
        self.remote_message = reply.message
        self.request_type = request_type


@dataclass(frozen=True, slots=True)
class CompletedExec:
    status: ExitStatus
    stdout: bytes
    stderr: bytes

    @property
    def code(self) -> int:
        return self.status.code


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class _Call:
    """The receive side of one request: frames routed to its id."""

    def __init__(self, client: AgentClient, request_type: int, call_id: int, path: object):
        self.client = client
        self.type = request_type
        self.id = call_id
        self.path = path
        self.frames: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()

    def next(self, deadline: float | None) -> Frame:
        """The next frame; ERROR, a timeout or a lost connection raise AgentError."""
        try:
            if deadline is None:
                frame = self.frames.get()
            else:
                frame = self.frames.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.close()
            raise AgentError(
                f"timed out waiting for the reply to {type_name(self.type)} (id {self.id})",
                step="agent",
                path=self.path,
            ) from None
        return self.accept(frame)

    def accept(self, frame: Frame | None) -> Frame:
        """``frame`` as taken from the queue: None (connection lost) and ERROR raise."""
        if frame is None:
            self.close()
            raise self.client._lost()
        if frame.type == T.ERROR:
            self.close()
            raise AgentRequestError(self.type, ErrorReply.decode(frame.payload), path=self.path)
        return frame

    def expect(self, wanted: T, deadline: float | None) -> Frame:
        frame = self.next(deadline)
        if frame.type != wanted:
            self.close()
            raise ProtocolError(f"expected {wanted.name} for {type_name(self.type)}, got {frame}")
        return frame

    def has_reply(self) -> bool:
        return not self.frames.empty()

    def close(self) -> None:
        self.client._forget(self.id)


class ExecHandle:
    """A running EXEC (or ATTACH): its output events, stdin and exit status."""

    def __init__(self, call: _Call, pid: int | None):
        self._call = call
        self.id = call.id
        #: Guest pid of the main process; None for ATTACH.
        self.pid = pid
        self.status: ExitStatus | None = None
        self._stdin_closed = False

    def write_stdin(self, data: bytes) -> None:
        """Send bytes to the process's stdin (EXEC with ``stdin=True``, or ATTACH)."""
        view = memoryview(data)
        for start in range(0, len(view), STDIN_CHUNK):
            self._call.client._send(
                Frame(T.STDIN, self.id, bytes(view[start : start + STDIN_CHUNK]))
            )

    def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            self._call.client._send(Frame(T.STDIN, self.id, b""))

    def signal(self, signo: int) -> None:
        """Send ``signo`` to the process group (the EXEC runs in its own session)."""
        if not 1 <= signo <= _MAX_SIGNAL:
            raise ValueError(f"invalid signal number {signo}")
        self._call.client._send(Frame(T.SIGNAL, self.id, SignalRequest(signo).encode()))

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size of an EXEC started with ``tty=...`` (the guest
        program gets SIGWINCH). Sizes outside 1..4096 raise ProtocolError."""
        self._call.client._send(Frame(T.RESIZE, self.id, ResizeRequest(cols, rows).encode()))

    def events(self, timeout: float | None = None) -> Iterator[tuple[T, bytes]]:
        """Yield ``(T.STDOUT | T.STDERR, chunk)`` until EXIT; then ``status`` is set.

        ``timeout`` bounds the whole iteration. An ERROR reply raises
        AgentRequestError; the request is finished then.
        """
        deadline = _deadline(timeout)
        while self.status is None:
            frame = self._call.next(deadline)
            if frame.type in (T.STDOUT, T.STDERR):
                yield T(frame.type), frame.payload
            elif frame.type == T.EXIT:
                self.status = ExitStatus.decode(frame.payload)
                self._call.close()
            else:
                log.warning("unexpected frame for %s: %s", type_name(self._call.type), frame)

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next output chunk (either stream); ``b""`` once EXIT arrived (then
        ``status`` is set); None if nothing came within ``timeout`` — unlike
        :meth:`events`, a timeout leaves the request open."""
        while self.status is None:
            try:
                frame = self._call.frames.get(timeout=timeout)
            except queue.Empty:
                return None
            frame = self._call.accept(frame)
            if frame.type in (T.STDOUT, T.STDERR):
                return frame.payload
            if frame.type == T.EXIT:
                self.status = ExitStatus.decode(frame.payload)
                self._call.close()
            else:
                log.warning("unexpected frame for %s: %s", type_name(self._call.type), frame)
        return b""

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for EXIT; output not consumed through :meth:`events` is discarded."""
        for _ in self.events(timeout):
            pass
        assert self.status is not None
        return self.status


class AgentClient:
    """A connection to the guest agent (or to a shim speaking for it).

    Every method raises :class:`AgentRequestError` when the agent answers ERROR
    (``.errno`` says why; callers map ENOENT to NotFoundError), and
    :class:`~torpor.errors.AgentError` on a timeout, a lost connection or a
    reply that breaks the protocol.
    """

    def __init__(self, sock: socket.socket):
        sock.settimeout(None)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards everything below
        self._calls: dict[int, _Call] = {}
        # EXECs started over an earlier connection may still run in the guest
        # (their ids are busy there): a random start makes a clash unlikely.
        self._next_id = random.randrange(1, 1 << 31)
        self._error: AgentError | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read_loop, name="torpor-agent", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: str | Path, timeout: float = 10.0) -> AgentClient:
        """Connect to a unix socket, retrying while it does not accept yet."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(os.fspath(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise AgentError(f"cannot connect: {e}", step="agent", path=path) from e
                time.sleep(0.05)
            except OSError as e:
                sock.close()
                raise AgentError(f"cannot connect: {e}", step="agent", path=path) from e

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; waiting requests fail with AgentError."""
        with self._lock:
            self._closing = True
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    # ---- plumbing ----------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        error = AgentError("the agent closed the connection", step="agent")
        try:
            while data := self._sock.recv(1 << 18):
                for frame in decoder.feed(data):
                    self._route(frame)
        except ProtocolError as e:
            error = e
        except OSError as e:
            error = AgentError(f"connection to the agent failed: {e}", step="agent")
            error.__cause__ = e
        with self._lock:
            if self._closing:
                error = AgentError("the agent client was closed", step="agent")
            self._error = error
            calls = list(self._calls.values())
        if not self._closing:
            log.debug("reader stopped: %s", error)
        for call in calls:
            call.frames.put(None)

    def _route(self, frame: Frame) -> None:
        log.debug("recv %s", frame)
        with self._lock:
            call = self._calls.get(frame.id)
        if call is not None:
            call.frames.put(frame)
        elif frame.type == T.ERROR and frame.id == 0:
            log.warning("agent reported a stream error: %s", ErrorReply.decode(frame.payload))
        else:
            log.debug("dropped %s: no request waits for id %d", frame, frame.id)

    def _lost(self) -> AgentError:
        with self._lock:
            error = self._error
        return error or AgentError("the agent connection is closed", step="agent")

    def _open(self, request_type: int, path: object = None) -> _Call:
        with self._lock:
            if self._error is not None or self._closing:
                raise self._error or AgentError("the agent client was closed", step="agent")
            while self._next_id in self._calls:
                self._next_id = self._next_id % 0xFFFFFFFF + 1
            call = _Call(self, request_type, self._next_id, path)
            self._next_id = self._next_id % 0xFFFFFFFF + 1  # 1..2**32-1, never 0
            self._calls[call.id] = call
        return call

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    @contextmanager
    def _call(self, request_type: int, payload: bytes, path: object = None) -> Iterator[_Call]:
        """Register a request, send it, and unregister it when the block ends."""
        call = self._open(request_type, path)
        try:
            self._send(Frame(request_type, call.id, payload))
            yield call
        finally:
            call.close()

    def _send(self, frame: Frame) -> None:
        data = frame.encode()
        with self._send_lock:
            log.debug("send %s", frame)
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise AgentError(
                    f"sending {type_name(frame.type)} failed: {e}", step="agent"
                ) from e

    # ---- generic -----------------------------------------------------------

    _FINAL = {
        T.HELLO: T.HELLO_OK,
        T.STAT: T.FILEINFO,
        T.EXEC: T.EXIT,
        T.ATTACH: T.EXIT,
    }

    def request(
        self, request_type: int, payload: bytes = b"", timeout: float | None = DEFAULT_TIMEOUT
    ) -> Frame:
        """Send one request and return its final reply (OK, FILEINFO for STAT, ...).

        Intermediate frames (DATA, DIRENT, output) are discarded.
        """
        final = self._FINAL.get(request_type, T.OK)
        deadline = _deadline(timeout)
        with self._call(request_type, payload) as call:
            while True:
                frame = call.next(deadline)
                if frame.type == final:
                    return frame

    def hello(self, timeout: float | None = 10.0) -> HelloInfo:
        """Check the agent is alive and speaks our protocol version."""
        info = HelloInfo.decode(self.request(T.HELLO, b"", timeout).payload)
        if info.version != PROTOCOL_VERSION:
            raise AgentError(
                f"agent {info.agent_version} speaks protocol {info.version}, "
                f"this torpor speaks {PROTOCOL_VERSION}",
                step="agent HELLO",
            )
        return info

    # ---- processes ---------------------------------------------------------

    def start_exec(
        self,
        argv: Iterable[str | bytes],
        env: Iterable[str] = (),
        cwd: str = "",
        user: str = "",
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        tty: tuple[int, int] | None = None,
    ) -> ExecHandle:
        """Start a process and wait for STARTED (a missing command still starts:
        its EXIT is 127, like a shell's). ``tty=(cols, rows)`` runs it on a new
        pseudo-terminal: output is one STDOUT stream, stdin always open."""
        cols, rows = tty or (80, 24)
        payload = ExecRequest(
            tuple(argv), tuple(env), cwd, user, stdin, tty is not None, cols, rows
        ).encode()
        call = self._open(T.EXEC)
        try:
            self._send(Frame(T.EXEC, call.id, payload))
            started = Started.decode(call.expect(T.STARTED, _deadline(timeout)).payload)
        except BaseException:
            call.close()
            raise
        return ExecHandle(call, started.pid)

    def exec(
        self,
        argv: Iterable[str | bytes],
        env: Iterable[str] = (),
        cwd: str = "",
        user: str = "",
        input: bytes | None = None,
        timeout: float | None = None,
    ) -> CompletedExec:
        """Run a process to completion and collect its output.

        ``input`` is fed from a helper thread so a process that writes before it
        has read everything cannot deadlock us. ``timeout`` bounds the whole run.
        """
        handle = self.start_exec(argv, env, cwd, user, stdin=input is not None, timeout=timeout)
        if input is not None:
            threading.Thread(
                target=self._feed, args=(handle, input), name="torpor-agent-stdin", daemon=True
            ).start()
        out: list[bytes] = []
        err: list[bytes] = []
        for kind, chunk in handle.events(timeout):
            (out if kind == T.STDOUT else err).append(chunk)
        assert handle.status is not None
        return CompletedExec(handle.status, b"".join(out), b"".join(err))

    @staticmethod
    def _feed(handle: ExecHandle, data: bytes) -> None:
        try:
            handle.write_stdin(data)
            handle.close_stdin()
        except AgentError as e:  # the reading side reports the failure
            log.debug("feeding stdin of exec %d stopped: %s", handle.id, e)

    def reattach(self, pid: int, timeout: float | None = DEFAULT_TIMEOUT) -> ExecHandle:
        """Follow EXEC ``pid`` started by a connection that has gone (shim only, see
        docs/protocol.md): its further output, STDIN/SIGNAL, its EXIT.  AgentRequestError
        ESRCH if there is none, EBUSY if its own connection still has it."""
        if not isinstance(pid, int) or not 0 < pid <= 0xFFFFFFFF:
            raise UsageError(f"invalid pid {pid!r}")
        call = self._open(T.REATTACH)
        try:
            self._send(Frame(T.REATTACH, call.id, Started(pid).encode()))
            started = Started.decode(call.expect(T.STARTED, _deadline(timeout)).payload)
        except BaseException:
            call.close()
            raise
        return ExecHandle(call, started.pid)

    def attach(self) -> ExecHandle:
        """Follow the VM's main process (shim only): its output from the start, then EXIT."""
        call = self._open(T.ATTACH)
        try:
            self._send(Frame(T.ATTACH, call.id))
        except BaseException:
            call.close()
            raise
        return ExecHandle(call, None)

    # ---- files -------------------------------------------------------------

    def read_file(self, path: GuestPath, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        _, chunks = self.read_file_stream(path, timeout)
        return b"".join(chunks)

    def read_file_stream(
        self, path: GuestPath, timeout: float | None = DEFAULT_TIMEOUT
    ) -> tuple[FileInfo, Iterator[bytes]]:
        """FILEINFO of the opened file and an iterator over its content.

        ``timeout`` applies to each frame. Abandoning the iterator early is fine:
        the rest of the reply is dropped.
        """
        p = os.fspath(path)
        call = self._open(T.READ_FILE, p)
        try:
            self._send(Frame(T.READ_FILE, call.id, PathRequest(p).encode()))
            info = FileInfo.decode(call.expect(T.FILEINFO, _deadline(timeout)).payload)
        except BaseException:
            call.close()
            raise

        def chunks() -> Iterator[bytes]:
            try:
                while (frame := call.next(_deadline(timeout))).type != T.OK:
                    if frame.type == T.DATA:
                        yield frame.payload
            finally:
                call.close()

        return info, chunks()

    def write_file(
        self,
        path: GuestPath,
        data: bytes | BinaryIO,
        mode: int = 0o644,
        uid: int = UNCHANGED,
        gid: int = UNCHANGED,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Write a whole file atomically (the guest renames a temporary file over it).

        ``timeout`` is how long to wait for the reply once everything is sent.  A
        file-like ``data`` other than a regular file is read whole (into a spool,
        on disk past 8 MiB) before anything is sent, so if it raises, its error
        reaches the caller and the guest never saw the upload (see module doc).
        """
        p = os.fspath(path)
        payload = WriteFileRequest(p, mode, uid, gid).encode()
        with _replayable(data) as source, self._call(T.WRITE_FILE, payload, p) as call:
            try:
                for chunk in _chunks(source):
                    if call.has_reply():  # refused up front: stop streaming
                        break
                    self._send(Frame(T.STDIN, call.id, chunk))
                else:
                    self._send(Frame(T.STDIN, call.id, b""))
            except BaseException:
                self._cancel_upload(call)
                raise
            call.expect(T.OK, _deadline(timeout))

    def _cancel_upload(self, call: _Call) -> None:
        """The source failed part-way (EIO, Ctrl-C): a SIGNAL to the upload's id makes
        the guest drop it (its temporary file, its slot) now rather than when this
        connection closes; its ERROR is waited for briefly.  Best effort: the caller
        raises the source's error, whatever happens here."""
        with suppress(AgentError):  # the reply is an ERROR (ESRCH from an older agent)
            self._send(Frame(T.SIGNAL, call.id, SignalRequest(signal.SIGTERM).encode()))
            call.next(_deadline(CANCEL_TIMEOUT))

    def stat(self, path: GuestPath, timeout: float | None = DEFAULT_TIMEOUT) -> FileInfo:
        """lstat() in the guest: a final symlink is not followed."""
        p = os.fspath(path)
        with self._call(T.STAT, PathRequest(p).encode(), p) as call:
            return FileInfo.decode(call.expect(T.FILEINFO, _deadline(timeout)).payload)

    def list_dir(self, path: GuestPath, timeout: float | None = DEFAULT_TIMEOUT) -> list[DirEntry]:
        """Entries of a directory, without "." and "..", in the guest's order."""
        p = os.fspath(path)
        entries = []
        with self._call(T.LIST_DIR, PathRequest(p).encode(), p) as call:
            while (frame := call.next(_deadline(timeout))).type != T.OK:
                if frame.type == T.DIRENT:
                    entries.append(DirEntry.decode(frame.payload))
        return entries

    def mkdir(
        self, path: GuestPath, mode: int = 0o755, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``mkdir -p``; ``mode`` applies to the last component if it is created."""
        p = os.fspath(path)
        self._expect_ok(T.MKDIR, MkdirRequest(p, mode).encode(), timeout, p)

    def symlink(
        self, target: str, path: GuestPath, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Create (or atomically replace) the symlink ``path`` -> ``target``."""
        p = os.fspath(path)
        self._expect_ok(T.SYMLINK, SymlinkRequest(target, p).encode(), timeout, p)

    # ---- system ------------------------------------------------------------

    def set_time(self, t: float | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Set the guest's CLOCK_REALTIME (default: the host's current time)."""
        req = SetTimeRequest.from_float(time.time() if t is None else t)
        self._expect_ok(T.SET_TIME, req.encode(), timeout)

    def sync(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._expect_ok(T.SYNC, b"", timeout)

    def set_identity(
        self,
        hostname: str,
        ifname: str = "",
        mac: bytes = b"",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> IdentityReply:
        """SET_IDENTITY: the guest's hostname, and the MAC of ``ifname`` when given —
        set by the agent itself, no process started in the guest.

        A name or MAC the rules refuse raises UsageError before anything is sent.  The
        agent's answer is checked: it must be an OK of at most IDENTITY_REPLY_MAX bytes
        saying the guest now has exactly what was asked (else ProtocolError).  An agent
        older than the request answers ERROR ENOSYS (AgentRequestError): the caller
        falls back to a shell.
        """
        if why := identity_problem(hostname, ifname, mac):
            raise UsageError(f"cannot set the guest's identity: {why}")
        req = IdentityRequest(hostname, ifname, bytes(mac))
        with self._call(T.SET_IDENTITY, req.encode()) as call:
            frame = call.expect(T.OK, _deadline(timeout))
        reply = IdentityReply.decode(frame.payload)
        if reply != IdentityReply(req.hostname, req.mac):
            raise ProtocolError(
                f"SET_IDENTITY answered hostname {reply.hostname!r} mac {reply.mac.hex(':')!r}, "
                f"asked for {req.hostname!r} mac {req.mac.hex(':')!r}"
            )
        return reply

    def shutdown(self, how: int = 0, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Power off (0) or reboot (1) the guest once it has replied OK."""
        self._expect_ok(T.SHUTDOWN, ShutdownRequest(how).encode(), timeout)

    def add_entropy(self, data: bytes, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Credit ``data`` to the guest kernel's RNG and reseed its CRNG."""
        self._expect_ok(T.ADD_ENTROPY, bytes(data), timeout)

    def stop(self, timeout_seconds: int, timeout: float | None = None) -> None:
        """STOP (shim only): SIGTERM, SIGKILL after ``timeout_seconds``, power off."""
        if timeout is None:
            timeout = timeout_seconds + DEFAULT_TIMEOUT
        self._expect_ok(T.STOP, StopRequest(timeout_seconds).encode(), timeout)

    def _expect_ok(
        self, request_type: T, payload: bytes, timeout: float | None, path: object = None
    ) -> None:
        with self._call(request_type, payload, path) as call:
            call.expect(T.OK, _deadline(timeout))


#: How much of a spooled WRITE_FILE source stays in memory (the rest goes to disk).
SPOOL_IN_MEMORY = 8 << 20


@contextmanager
def _replayable(data: bytes | BinaryIO) -> Iterator[bytes | BinaryIO]:
    """``data`` as a source that cannot fail part-way: bytes and regular files as
    they are, anything else read whole into a spool (closed when the block ends)."""
    if isinstance(data, bytes | bytearray | memoryview):
        yield data
        return
    # a plain open() of a regular file only: a wrapper with a file's fileno() (gzip,
    # a tar member) can still fail part-way
    raw = data.raw if isinstance(data, io.BufferedReader) else data
    try:
        regular = isinstance(raw, io.FileIO) and _stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
    except (OSError, ValueError):  # closed, or no fd (io.UnsupportedOperation)
        regular = False
    if regular:
        yield data
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        while chunk := data.read(STDIN_CHUNK):
            spool.write(chunk)
        spool.seek(0)
        yield spool  # type: ignore[misc]


def _chunks(data: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), STDIN_CHUNK):
            yield bytes(view[start : start + STDIN_CHUNK])
        return
    while chunk := data.read(STDIN_CHUNK):
        yield chunk

"""Lazy restore: a snapshot's guest memory served by FUSE straight from the store.

A cold restore used to materialize all of a snapshot's memory from the store (every
chunk read, decompressed, hash-checked) before QEMU could run.  With lazy restore the
VM's RAM file is instead a **read-only FUSE file** whose reads are answered chunk by
chunk from the store; QEMU maps it ``share=off`` (``MAP_PRIVATE``: the guest's writes
are its own anonymous pages, the file never changes), so the guest runs as soon as
its device state is loaded and pulls in only the memory it touches.

Who runs what:

- :func:`start` (in the shim, from :func:`torpor.vmm.launch.prelaunch`, before QEMU
  is spawned) mounts a FUSE filesystem **on the VM's RAM file path** itself (a FUSE
  mount on a regular file: the filesystem's root is the memory; ``open("/dev/fuse")``
  + ``mount(2)``, root only), hands the connection to the server — forked from the
  shim when it is single-threaded (the zygote's shims: imports already paid), else
  ``python -m torpor.vmm.lazymem`` — and returns at once.  QEMU is started right
  away: its open of the file waits in the kernel until the server has answered FUSE's
  INIT, or fails (ENOTCONN) if the server died — QEMU never gets a missing or plain
  ``mem-path`` (QEMU 7.2 would map an empty file: zero RAM).  QEMU's argv and the
  jail's bind of the RAM file are unchanged.  The jail chowns the file to QEMU's uid
  (:meth:`MemoryFile.chown` records the owner) and QEMU opens it ``O_RDWR`` (QEMU 7.2
  does so even for ``share=off``): writes are refused (EROFS).
- Every chunk is hash-checked (:meth:`torpor.store.ChunkStore.read_range`) before
  its bytes are served.  A chunk that is missing or corrupt is an I/O error to QEMU
  (the guest page fault becomes SIGBUS: QEMU, and so the VM, ends) and an error in
  the shim's log (this process's stderr) — never wrong bytes.
- The kernel keeps what was read in the page cache (``kernel_cache``): a page is
  fetched from the store once per mount.
- Once the shim has streamed the whole memory into the VM's shadow
  (:func:`fill_shadow`, its meta naming this snapshot), the server reads chunks from
  the shadow instead (hash-checked too): from then on the VM does not need the store,
  so a snapshot removed and gc'd under a running lazy VM costs it nothing.  Until then
  it does (``snapshot rm`` + ``gc`` in the first seconds would make its next fault an
  I/O error).

Lifetime (the shim owns the server): it lives as long as the VM's QEMU maps the file.
It gets ``PR_SET_PDEATHSIG`` = SIGTERM, blocked in all its threads and taken by a
watcher thread: when the shim dies (even ``kill -9``; the signal may come several
times) the watcher unmounts (lazily, ``MNT_DETACH``) and the server exits.
On a normal VM exit the shim unmounts (:func:`unmount`) and the server's loop ends
when the kernel closes the connection.  Anything else that cleans up a VM's RAM file
(``rm``, a DEAD VM's cleanup, the reaper of orphaned RAM files) calls
:func:`unmount` first, so a server killed with ``kill -9`` leaves no stale mount past
the VM's removal.

Privacy: the mount point is the VM's own RAM file in the home's private RAM folder
(0700).  Without the jail (QEMU runs as root, like this server) FUSE's default
applies: only the mounting uid may use the mount.  With the jail, QEMU runs as its own
uid, so the mount is ``allow_other`` with ``default_permissions``: the kernel checks
the file's mode (0600) and owner (QEMU's uid, set by the jail) like any file's.

Working set (REAP-style, :class:`WorkingSet`): the first lazy restore of a snapshot
records the order in which QEMU first read chunks during the first seconds from its
first read (``TORPOR_LAZY_RECORD_S``, default 3 s; the shim's own background stream, told apart
by the reading thread's process, is not recorded) and saves it next to the hot cache
(``cache/workingsets/<snapshot>``), MAC'd with the store's key and capped at the
artifact's chunk count.  Later lazy restores of that snapshot (and of its descendants
until they have their own; failing both, of any snapshot of the same *family* —
image, kernel, memory size: :func:`family_working_set`, so a checkpoint restored for
the first time, as a recovery's is, still has a hint) fetch those chunks first, two
at a time, and push them into the file's page cache (FUSE ``notify_store``): QEMU's
page faults on them never reach this process.  A working set is only a hint: a bad,
foreign or stale one is ignored (it can cost time, never correctness — every chunk is
still hash-checked).  Where the kernel refuses the push, fetched-ahead chunks wait here
until QEMU reads them.  What a restore that prefetched a hint it did not record itself
(its parent's, its family's) saves for the next one when its window closes: the hinted
chunks QEMU has mapped (its page tables, ``/proc/<pid>/pagemap``: the guest's reads of
pushed chunks never reach this server) in the hint's order, then what it read itself —
so a family's working set follows what its restores use instead of growing with every
one.  A VM gone before its window closed saves the hint whole plus what it read.

QEMU's ``madvise(MADV_HUGEPAGE)`` on guest RAM is made to fail for lazy VMs
(:func:`no_hugepage_preexec`): on a file mapping it makes every fault read 4 MiB.

Statistics (bytes fetched from the store, chunks served, prefetched) are written to
``<vm dir>/lazymem.json`` (atomically, at most every 50 ms while they change) for
``torpor bench lazy`` and ``inspect``.

If FUSE is unusable (:func:`available`: no ``/dev/fuse``, no libfuse3, no
``mfusepy``), restores fall back to materializing the whole memory, saying so in the
log (torpor.snapshot.core.place_snapshot).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torpor.errors import VMError
from torpor.vmm.layout import VMFiles

log = logging.getLogger("torpor.lazymem")

FUSE_SUPER_MAGIC = 0x65735546
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
RECENT_CHUNKS = 128  # chunks kept after serving (partial-chunk reads come back)
PREFETCH_MAX_BYTES = 512 << 20  # fetched-ahead chunks not yet served, at most
PARTIAL_SAVE_S = 1.0  # the working set recorded so far is written at most this often
WS_DIR = "workingsets"
WS_VERSION = 1
STATS_FILE = "lazymem.json"
FETCH_THREADS = 4  # chunk fetches side by side (2 cores here; a bucket's latency)
PREFETCH_THREADS = 2


def enabled(oneoff: bool = False) -> bool:
    """Whether a restore whose memory would come from the store is lazy instead.

    ``TORPOR_LAZY_RESTORE``: ``1`` every such restore, ``0`` none; unset: only a
    one-off restore's (``oneoff``: a session's recovery, which restores its checkpoint
    once and then runs a turn and captures it).  For those lazy wins end to end
    (restore → first exec → checkpoint captured, docs/thesis.md "Session 9"): the
    capture of a lazy VM reads the pages it needs from the lazy file itself and does
    not wait for the rest of the memory to stream in.  Other restores stay full: a
    hot restore has a copy at hand, and a fork's shared base serves many VMs."""
    raw = os.environ.get("TORPOR_LAZY_RESTORE", "")
    return raw == "1" or (oneoff and raw != "0")


def available() -> str | None:
    """None if lazy restore can work on this host, else why not."""
    if os.geteuid() != 0:
        return "not root (the shim mounts the FUSE file itself)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/fuse cannot be opened ({e.strerror})"
    os.close(fd)
    if not ctypes.util.find_library("fuse3"):
        return "libfuse3 is not installed"
    if importlib.util.find_spec("mfusepy") is None:
        return "the Python package mfusepy is not installed"
    return None


# -- mounts ------------------------------------------------------------------------------


def _mountpoints() -> set[str]:
    out = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                parts = line.split(b" ")
                if len(parts) > 4:
                    # octal escapes (\040 for a space) as the kernel writes them
                    out.add(parts[4].decode("unicode_escape", errors="replace"))
    except OSError:
        pass
    return out


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace."""
    return str(path) in _mountpoints()


def is_fuse(path: Path) -> bool:
    """Whether ``path`` is (the root of) a FUSE filesystem."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == FUSE_SUPER_MAGIC


def unmount(path: Path) -> bool:
    """Detach a lazy-memory mount at ``path`` if there is one; True if one was.

    ``MNT_DETACH``: a QEMU still mapping it keeps its pages until it exits, and the
    path is free at once (the RAM file can then be unlinked)."""
    path = Path(path)
    if not is_mounted(path):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(8):  # stacked mounts (should not happen): take them all off
        if libc.umount2(str(path).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: not a mount point (any more)
                log.warning("could not unmount lazy memory at %s: %s", path, os.strerror(err))
            break
        if not is_mounted(path):
            break
    return True


# -- working set ------------------------------------------------------------------------


class WorkingSet:
    """The chunks a restored VM read first, in order: a prefetch hint per snapshot.

    Stored as ``cache/workingsets/<snapshot id>`` (JSON, 0600) with an HMAC-SHA256
    over the snapshot id, chunk size, chunk count and the list, keyed by the store's
    secret: a file written by anyone else (or for another snapshot) is ignored.  The
    list comes from the guest's behaviour, so it is capped: indexes are distinct,
    within the artifact, at most one per chunk."""

    def __init__(self, root: Path, key: bytes, snap_id: str, chunk_size: int, n_chunks: int):
        self.path = Path(root) / "cache" / WS_DIR / snap_id
        self.key, self.snap_id = key, snap_id
        self.chunk_size, self.n_chunks = chunk_size, n_chunks

    def _mac(self, chunks: list[int]) -> str:
        msg = json.dumps(
            [WS_VERSION, self.snap_id, self.chunk_size, self.n_chunks, chunks],
            separators=(",", ":"),
        ).encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def load(self) -> list[int] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(16 * self.n_chunks + 4096)  # capped: ~8 bytes per index
            d = json.loads(raw)
            chunks = d["chunks"]
            if (
                not isinstance(chunks, list)
                or len(chunks) > self.n_chunks
                or not all(isinstance(i, int) and 0 <= i < self.n_chunks for i in chunks)
                or len(set(chunks)) != len(chunks)
                or not hmac.compare_digest(str(d["mac"]), self._mac(chunks))
            ):
                log.warning("working set %s ignored: not valid for this snapshot", self.path)
                return None
            return chunks
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("working set %s ignored: %s", self.path, e)
            return None

    def save(self, chunks: list[int]) -> None:
        from torpor.fsutil import atomic_write_bytes

        chunks = list(dict.fromkeys(i for i in chunks if 0 <= i < self.n_chunks))
        body = {"snapshot": self.snap_id, "chunks": chunks, "mac": self._mac(chunks)}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(body).encode(), mode=0o600)


def family_working_set(root: Path, key: bytes, manifest: Any) -> WorkingSet | None:
    """The working set shared by every snapshot of one guest family — the same disk
    image, kernel and memory layout — where a snapshot and its parent have none of
    their own: a checkpoint restored for the first time (a recovery) prefetches what
    the last lazy restore of a sibling read first.  The kernel, the agent and what the
    image's base put in memory sit at the same guest addresses in all of them; what
    differs costs only the fetch of a chunk not needed (a hint, like any working set).
    None when the snapshot does not say what it was made from."""
    art = manifest.artifacts["memory"]
    disk, kernel = manifest.meta.get("base_digest"), manifest.meta.get("kernel_digest")
    if not disk or not kernel:
        return None
    ident = f"{disk}|{kernel}|{art.size}|{art.chunk_size}".encode()
    name = "family-" + hashlib.sha256(ident).hexdigest()[:32]
    return WorkingSet(root, key, name, art.chunk_size, len(art.chunks))


def remove_working_set(root: Path, snap_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(root) / "cache" / WS_DIR / snap_id).unlink()


# -- the server -------------------------------------------------------------------------


class MemoryFile:
    """mfusepy operations of a filesystem whose root is one read-only file: the memory
    artifact of one snapshot, read from the store."""

    use_ns = True

    def __init__(
        self,
        store: Any,
        artifact: Any,
        *,
        uid: int,
        gid: int,
        prefetch: list[int] | None,
        record: WorkingSet | None,
        record_s: float,
        record_family: WorkingSet | None = None,
        stats_path: Path | None,
        ready_fd: int = -1,
    ) -> None:
        self.store, self.art = store, artifact
        # a snapshot still journaled: its chunks the store does not have yet (each
        # checked against its hash when the journal was read; serve)
        self.extra: dict[str, bytes] | None = None
        self.size, self.cs = artifact.size, artifact.chunk_size
        self.uid, self.gid = uid, gid
        self._mu = threading.Lock()
        self.inflight: dict[int, Future[bytes]] = {}
        self.ahead: dict[int, bytes] = {}  # fetched ahead, not served yet
        self.ahead_bytes = 0
        self.recent: OrderedDict[int, bytes] = OrderedDict()
        self.prefetch = prefetch or []
        self.record = record
        self.record_family = record_family  # saved with it (family_working_set)
        # the window opens at QEMU's first read (under load that came >1 s after start)
        self.record_s = record_s
        self.record_until: float | None = None
        self.saved_n, self.saved_at = 0, 0.0  # what the last partial save wrote, when
        self.order: list[int] = []  # chunks QEMU read through here in the window, in order
        self.touched: set[int] = set()
        # a working set this restore did not record (its parent's, its family's): pushed
        # into the page cache, so the guest's reads of it never come here; kept in what
        # this restore saves only where QEMU has it mapped (see _guest_mapped)
        self.hint: list[int] = []
        self.vm_dir: Path | None = stats_path.parent if stats_path is not None else None
        self.mount: Path | None = None  # the file QEMU maps (set by main)
        self.tgids: dict[int, int] = {}  # reader thread id -> its process
        self.shim = os.getppid()  # its reads (the background stream) are not recorded
        self.ready_fd = ready_fd
        self.stats_path = stats_path
        self.stats: dict[str, Any] = {
            "size": self.size,
            "chunk_size": self.cs,
            "fetched_bytes": 0,  # uncompressed bytes of non-zero chunks read from the store
            "fetched_chunks": 0,
            "served_bytes": 0,
            "reads": 0,  # FUSE read requests
            "prefetch_chunks": len(self.prefetch),
            "prefetched_chunks": 0,
            "pushed_chunks": 0,  # of which put into the page cache by notify_store
            "from_shadow_chunks": 0,
            "source": "store",
            "prefetch_hits": 0,
            "first_read_s": None,
            "errors": 0,
            "working_set": "used" if self.prefetch else ("recording" if record else "none"),
            "pid": os.getpid(),
        }
        self.t0 = time.monotonic()
        self.dirty = threading.Event()
        self.closing = threading.Event()
        self.now_ns = time.time_ns()
        self.fuse: Any = None  # libfuse's struct fuse *, known once init() runs
        self.shadow: Path | None = None  # the VM's shadow, once streamed: served from
        self.shadow_fd: int | None = None
        self.snap_id = ""
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="fetch")
        self.started = False  # init() ran: the mount served

    # -- fetching
    def _fetch(self, i: int) -> bytes:
        """Chunk ``i``'s verified bytes (one fetch per chunk at a time)."""
        h = self.art.chunks[i]
        off, ln = self.art.span(i)
        if h is None:
            return bytes(ln)
        with self._mu:
            data = self.ahead.pop(i, None)
            if data is not None:
                self.ahead_bytes -= len(data)
                self.stats["prefetch_hits"] += 1
                return data
            data = self.recent.get(i)
            if data is not None:
                self.recent.move_to_end(i)
                return data
            fut = self.inflight.get(i)
            owner = fut is None
            if owner:
                fut = self.inflight[i] = Future()
        assert fut is not None
        if not owner:
            return fut.result()
        try:
            data = self._from_shadow(i, off, ln)
            if data is None:
                # (a tiered store takes no extra: a journal is only ever local)
                kw = {} if self.extra is None else {"extra": self.extra}
                data = self.store.read_range(self.art, off, ln, name="memory", **kw)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._mu:
                self.inflight.pop(i, None)
        with self._mu:
            self.stats["fetched_bytes"] += ln
            self.stats["fetched_chunks"] += 1
        fut.set_result(data)
        self.dirty.set()
        return data

    def _from_shadow(self, i: int, off: int, ln: int) -> bytes | None:
        """Chunk ``i`` from the VM's shadow once the shim has streamed all of the memory
        into it (then the VM no longer needs the store: a snapshot removed and gc'd
        under it costs nothing), checked against the chunk's hash like the store's."""
        fd = self.shadow_fd
        if fd is None:
            return None
        import blake3

        try:
            data = os.pread(fd, ln, off)
        except OSError:
            return None
        if len(data) != ln or blake3.blake3(data).hexdigest() != self.art.chunks[i]:
            log.warning("lazy memory: chunk %d of the shadow does not match; from the store", i)
            return None
        with self._mu:
            self.stats["from_shadow_chunks"] += 1
        return data

    def _watch_shadow(self) -> None:
        """Switch to the shadow once its meta says it is this snapshot's memory."""
        if self.shadow_fd is not None or self.shadow is None:
            return
        from torpor.vmm.capture import read_meta

        meta = self.shadow.with_name(self.shadow.name + ".json")
        if read_meta(meta).get("snapshot") != self.snap_id:
            return
        with contextlib.suppress(OSError):
            fd = os.open(self.shadow, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_size == self.size:
                self.shadow_fd = fd
                self.stats["source"] = "shadow"
                self.dirty.set()
                log.info("lazy memory: the whole memory is in the VM's shadow; served from it")
            else:
                os.close(fd)

    def _try_fetch(self, i: int) -> bytes | BaseException:
        try:
            return self._fetch(i)
        except Exception as e:  # raised by the reader, in order
            return e

    def _keep_recent(self, i: int, data: bytes) -> None:
        with self._mu:
            self.recent[i] = data
            self.recent.move_to_end(i)
            while len(self.recent) > RECENT_CHUNKS:
                self.recent.popitem(last=False)

    def prefetch_loop(self) -> None:
        """Fetch the recorded working set ahead of QEMU, in its order, straight into
        the kernel's page cache of the file (FUSE ``notify_store``: QEMU's faults on
        those pages then never reach this process); where the kernel refuses, kept
        here until QEMU reads it."""
        store = _NotifyStore(self.fuse) if self.fuse else None
        todo = [i for i in self.prefetch if self.art.chunks[i] is not None]
        # fetched PREFETCH_THREADS at a time (their own pool: QEMU's reads never queue
        # behind them), pushed in the recorded order
        ahead = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
        try:
            for i, data in zip(todo, ahead.map(self._try_fetch, todo), strict=True):
                if self.closing.is_set():
                    return
                if isinstance(data, BaseException):  # QEMU's own read of it reports it
                    log.error("lazy memory: prefetch of chunk %d failed: %s", i, data)
                    return
                while self.ahead_bytes > PREFETCH_MAX_BYTES and not self.closing.is_set():
                    time.sleep(0.005)
                if store is not None and store.push(i * self.cs, data):
                    with self._mu:
                        self.stats["pushed_chunks"] += 1
                        self.stats["prefetched_chunks"] += 1
                    continue
                store = None  # refused once: keep the rest here
                with self._mu:
                    if i not in self.touched:
                        self.ahead[i] = data
                        self.ahead_bytes += len(data)
                    self.stats["prefetched_chunks"] += 1
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)
        self.stats["prefetch_done_s"] = round(time.monotonic() - self.t0, 4)
        self.dirty.set()

    def stats_loop(self) -> None:
        while not self.closing.is_set():
            self.dirty.wait(1.0)
            self._watch_shadow()
            until, now = self.record_until, time.monotonic()
            if self.record and until is not None:
                if now >= until:
                    self.save_working_set()
                elif now - self.saved_at >= PARTIAL_SAVE_S and len(self.order) > self.saved_n:
                    self.save_working_set(final=False)
            if self.dirty.is_set():
                self.dirty.clear()
                self.write_stats()
                time.sleep(0.05)

    def write_stats(self) -> None:
        if self.stats_path is None:
            return
        from torpor.fsutil import atomic_write_bytes

        with self._mu:
            body = json.dumps(self.stats).encode()
        with contextlib.suppress(OSError):
            atomic_write_bytes(self.stats_path, body, mode=0o600)

    def save_working_set(self, final: bool = True) -> None:
        """Write the working set recorded so far; ``final``: the window closes (no
        more is recorded).  Partial saves while it is open mean a VM removed early (no
        ``destroy``: its server killed) still leaves what its guest read first."""
        with self._mu:
            rec = self.record
            if final:
                self.record = None
            order = list(self.order)
        if rec is None:
            return
        self.saved_n, self.saved_at = len(order), time.monotonic()
        if self.hint:
            order = self._with_hint(order, final)
        if not order:
            return
        try:
            rec.save(order)
            if self.record_family is not None:
                self.record_family.save(order)
            if final:
                self.stats["working_set"] = f"recorded {len(order)} chunks"
                log.info("lazy memory: working set of %d chunks recorded", len(order))
        except OSError as e:
            log.warning("lazy memory: working set not saved: %s", e)
        self.dirty.set()

    def _with_hint(self, order: list[int], final: bool) -> list[int]:
        """What to save of a hinted restore: the hint, then the rest of ``order``
        (what the server read itself).  Only when the window closes with QEMU still
        running, so that its page tables tell what the guest touched in the whole
        window, are the hinted chunks it did not use dropped.  A save before that (a
        partial one, or a VM gone before its window closed) cannot tell a chunk not
        used from one not reached yet, and keeps the hint whole (a hint, never a loss)."""
        mapped = self._guest_mapped() if final else None
        seen = set(order)
        kept = [i for i in self.hint if mapped is None or i in mapped or i in seen]
        known = set(kept)
        return kept + [i for i in order if i not in known]

    def _guest_mapped(self) -> set[int] | None:
        """The chunks of this file QEMU has pages of mapped (its page tables,
        :func:`torpor.vmm.ramless.touched_runs`: a page is mapped once the guest
        touched it, whether its data came through this server or was pushed into the
        page cache); None when that cannot be read (no QEMU yet or any more, no such
        mapping)."""
        from torpor.errors import VMError
        from torpor.vmm.ramless import PAGE, maps, touched_runs
        from torpor.vmm.state import alive, load_state

        if self.vm_dir is None or self.mount is None:
            return None
        try:
            st = load_state(self.vm_dir)
            pid = st.qemu_pid
            if not alive(pid, st.qemu_start):
                return None
            spans = [v for v in maps(pid) if Path(v[5]).name == self.mount.name]
            if not spans:
                return None
            # QEMU is the guest's neighbour, not trusted: at most the file's size read,
            # whatever mappings it claims
            budget, got = self.size, set()
            for start, end, off, *_ in spans:
                size = min(end - start, budget)
                budget -= size
                if size <= 0:
                    break
                for first, count in touched_runs(pid, start, size):
                    lo = off + first * PAGE  # file offsets: the page at ``start`` is ``off``
                    hi = lo + count * PAGE - 1
                    got.update(range(lo // self.cs, hi // self.cs + 1))
            if not alive(pid, st.qemu_start):
                return None  # a recycled pid read meanwhile: not ours
            return {i for i in got if i < len(self.art.chunks)}
        except (OSError, ValueError, VMError) as e:
            log.debug("lazy memory: QEMU's mapped pages not read: %s", e)
            return None

    # -- FUSE operations (paths: only "/" exists)
    def init(self, path: str) -> None:
        self.started = True
        self.stats.setdefault("start_ms", {})["mount"] = round(
            (time.monotonic() - self.t0) * 1000, 1
        )
        with contextlib.suppress(Exception):  # (a callback: the context names the fuse)
            from mfusepy import _libfuse

            self.fuse = _libfuse.fuse_get_context().contents.fuse
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"ok\n")
                os.close(self.ready_fd)
            self.ready_fd = -1
        threading.Thread(target=self.stats_loop, name="stats", daemon=True).start()
        if self.prefetch:
            threading.Thread(target=self.prefetch_loop, name="prefetch", daemon=True).start()

    def destroy(self, path: str) -> None:
        self.save_working_set()
        self.closing.set()
        self.write_stats()

    def _check(self, path: str) -> None:
        from mfusepy import FuseOSError

        if path != "/":
            raise FuseOSError(errno.ENOENT)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        self._check(path)
        return {
            "st_mode": stat.S_IFREG | 0o600,
            "st_nlink": 1,
            "st_size": self.size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": self.now_ns,
            "st_mtime": self.now_ns,
            "st_ctime": self.now_ns,
            "st_blocks": (self.size + 511) // 512,
        }

    def open(self, path: str, flags: int) -> int:
        self._check(path)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
        from mfusepy import FuseOSError

        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        first, last = offset // self.cs, (end - 1) // self.cs
        now = time.monotonic()
        recording = False
        if self.record is not None and self._guest_read():
            if self.record_until is None:
                self.record_until = now + self.record_s
            recording = now < self.record_until
        with self._mu:
            if self.stats["first_read_s"] is None:
                self.stats["first_read_s"] = round(now - self.t0, 4)
            for i in range(first, last + 1):
                if i not in self.touched:
                    self.touched.add(i)
                    if recording and self.art.chunks[i] is not None:
                        self.order.append(i)
        parts = []
        idx = range(first, last + 1)
        # several chunks: fetched side by side (zstd and BLAKE3 release the GIL; a
        # bucket store's downloads overlap); results in order
        fetched = self.pool.map(self._try_fetch, idx) if len(idx) > 1 else map(self._try_fetch, idx)
        for i, data in zip(idx, fetched, strict=True):
            try:
                if isinstance(data, BaseException):
                    raise data
            except Exception as e:
                with self._mu:
                    self.stats["errors"] += 1
                self.dirty.set()
                log.error(
                    "lazy memory: chunk %d (offset %d) could not be served: %s; "
                    "QEMU gets an I/O error",
                    i,
                    i * self.cs,
                    e,
                )
                raise FuseOSError(errno.EIO) from e
            if self.art.chunks[i] is not None:
                self._keep_recent(i, data)
            lo = max(offset, i * self.cs) - i * self.cs
            hi = min(end, (i + 1) * self.cs) - i * self.cs
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        out = b"".join(parts)
        with self._mu:
            self.stats["served_bytes"] += len(out)
            self.stats["reads"] += 1
            self.stats["last_read_s"] = round(time.monotonic() - self.t0, 4)
        self.dirty.set()
        return out

    def _guest_read(self) -> bool:
        """Whether this read comes from QEMU (the guest), not from the shim's stream."""
        from mfusepy import fuse_get_context

        tid = fuse_get_context()[2]  # the thread that caused the read
        tgid = self.tgids.get(tid)
        if tgid is None:
            tgid = -1
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        tgid = int(line.split()[1])
                        break
            self.tgids[tid] = tgid
        return tgid != self.shim

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        from mfusepy import FuseOSError

        raise FuseOSError(errno.EROFS)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        from mfusepy import FuseOSError

        self._check(path)
        if length != self.size:
            raise FuseOSError(errno.EROFS)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        # only root passes the kernel's check (default_permissions / the mounter alone):
        # the jail giving the file to QEMU's uid
        self._check(path)
        if uid != -1 and uid != 0xFFFFFFFF:
            self.uid = uid
        if gid != -1 and gid != 0xFFFFFFFF:
            self.gid = gid
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._check(path)  # always 0600
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        self._check(path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": self.size // 4096, "f_namemax": 255}


class _FuseBuf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _FuseBufvec(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _FuseBuf * 1),
    ]


class _NotifyStore:
    """``fuse_lowlevel_notify_store`` on the root inode (the file): data into the
    kernel's page cache of the file, as if the kernel had read it (libfuse 3)."""

    ROOT_INO = 1

    def __init__(self, fuse: Any) -> None:
        from mfusepy import _libfuse

        get = _libfuse.fuse_get_session
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        self.se = get(fuse)
        self.fn = _libfuse.fuse_lowlevel_notify_store
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                            ctypes.POINTER(_FuseBufvec), ctypes.c_int]  # fmt: skip

    def push(self, offset: int, data: bytes) -> bool:
        if not self.se:
            return False
        buf = ctypes.create_string_buffer(data, len(data))
        vec = _FuseBufvec(1, 0, 0)
        vec.buf[0] = _FuseBuf(len(data), 0, ctypes.cast(buf, ctypes.c_void_p), -1, 0)
        rc = self.fn(self.se, self.ROOT_INO, offset, ctypes.byref(vec), 0)
        if rc != 0:
            log.info("lazy memory: the kernel refused notify_store (%s)", os.strerror(-rc))
        return rc == 0


def serve(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torpor-lazymem")
    ap.add_argument("--root", required=True)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--mount", required=True)
    ap.add_argument("--uid", type=int, default=0)
    ap.add_argument("--gid", type=int, default=0)
    ap.add_argument("--allow-other", action="store_true")
    ap.add_argument("--stats")
    ap.add_argument("--ready-fd", type=int, default=-1)
    ap.add_argument("--fuse-fd", type=int, default=-1)  # mounted already (by the shim)
    ap.add_argument("--size", type=int, default=-1)  # what the shim told QEMU
    ap.add_argument("--shadow")  # the VM's shadow: served from once streamed in
    args = ap.parse_args(argv)
    _block_term()  # (already, when started by the shim: see _child_setup)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s lazymem[%(process)d] %(levelname)s %(message)s"
    )
    ready = args.ready_fd

    def fail(msg: str) -> int:
        log.error("%s", msg)
        if ready >= 0:
            with contextlib.suppress(OSError):
                os.write(ready, f"error: {msg}\n".encode()[:4000])
        return 1

    t0 = time.monotonic()
    try:
        from mfusepy import FUSE

        from torpor.store.home import home_store

        t_import = time.monotonic()
        root = Path(args.root)
        store = home_store(root)
        t_store = time.monotonic()
        manifest, extra = _manifest_of(root, store, args.snapshot)
        t_manifest = time.monotonic()
        art = manifest.artifacts["memory"]
        if args.size >= 0 and art.size != args.size:
            raise ValueError(f"the snapshot's memory is {art.size} bytes, not {args.size}")
        ws = WorkingSet(root, store._key, manifest.id, art.chunk_size, len(art.chunks))
        prefetch = ws.load()
        inherited = None
        if prefetch is None and manifest.parent:
            # a descendant without its own: its parent's (same layout) as the hint,
            # while this restore records its own (the parent's list, then what it read)
            pws = WorkingSet(root, store._key, manifest.parent, art.chunk_size, len(art.chunks))
            inherited = pws.load()
        family = family_working_set(root, store._key, manifest)
        whose = "parent's"
        if prefetch is None and inherited is None and family is not None:
            inherited, whose = family.load(), "family's"
        record_s = float(os.environ.get("TORPOR_LAZY_RECORD_S") or 3.0)
        ops = MemoryFile(
            store,
            art,
            uid=args.uid,
            gid=args.gid,
            prefetch=prefetch if prefetch is not None else inherited,
            record=None if prefetch is not None else ws,
            record_s=record_s,
            record_family=family,
            stats_path=Path(args.stats) if args.stats else None,
            ready_fd=ready,
        )
        ops.extra = extra
        if args.shadow:
            ops.shadow, ops.snap_id = Path(args.shadow), manifest.id
        ops.stats["start_ms"] = {
            "import": round((t_import - t0) * 1000, 1),
            "store": round((t_store - t_import) * 1000, 1),
            "manifest": round((t_manifest - t_store) * 1000, 1),
        }
        if inherited is not None:
            ops.hint = [i for i in inherited if art.chunks[i] is not None]
            ops.stats["working_set"] = f"{whose} used, recording"
        ops.mount = Path(args.mount)
    except Exception as e:
        return fail(f"lazy memory server could not start: {e}")
    opts: dict[str, Any] = {
        "foreground": True,
        "fsname": "torpor-lazymem",
        "subtype": "torpor",
        "kernel_cache": True,
        "default_permissions": True,
    }
    if args.allow_other:
        opts["allow_other"] = True
    import warnings

    _watch_parent(Path(args.mount))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            FUSE(ops, f"/dev/fd/{args.fuse_fd}" if args.fuse_fd >= 0 else args.mount, **opts)
    except Exception as e:
        if not ops.started:
            return fail(f"lazy memory mount at {args.mount} failed: {e}")
        # after serving: libfuse's own unmount failing (the shim detached it) is normal
        log.debug("lazy memory server ended: %s", e)
    finally:
        unmount(Path(args.mount))  # libfuse unmounts too; this covers its failures
        with contextlib.suppress(Exception):
            store.close()
    return 0


def _manifest_of(root: Path, store: Any, snap_id: str) -> tuple[Any, dict[str, bytes] | None]:
    """``snap_id``'s manifest (MAC-checked) and, for a checkpoint whose journal is not
    committed yet (a recovery restores it without waiting: torpor.snapshot.journal),
    the journal's chunks — read here once, before QEMU's first read is answered, so
    before the restore (which waits for the agent) commits it behind.  The journal is
    checked like the store (its chunks' hashes, the rebuilt manifest's id)."""
    from torpor.errors import NotFoundError

    for _ in range(2):
        try:
            return store.get(snap_id), None
        except NotFoundError:
            from torpor.paths import Paths  # only then: a server starts faster without
            from torpor.snapshot import journal

            if not journal.pending(Paths(root), snap_id):
                raise
        held = journal.read_pending(Paths(root), snap_id, store)
        if held is not None:
            return held.manifest, held.chunks
    return store.get(snap_id), None  # committed meanwhile


def _watch_parent(mount: Path) -> None:
    """Unmount and exit on SIGTERM (the death signal, or the shim's stop) or once the
    shim (our parent) is gone, whatever libfuse does.

    SIGTERM is blocked in every thread of the server (:func:`_block_term`) and taken
    here, so libfuse's handler never runs.  It did before, and: (1) the signal is
    process-directed, so when one of this server's Python threads took it, libfuse
    marked the session exited but its main loop, asleep, was not woken, and the mount
    stayed; (2) the death signal comes once per thread of the dying shim that the
    server is handed from, so a second one arrived after libfuse had ended its loop and
    put SIGTERM's default action back, and killed the server before it unmounted (CI:
    'timed out waiting for the mount to go' after kill -9 of the shim, ~1 run in 5;
    ``test_repeated_death_signals_never_leave_the_mount``)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            if signal.sigtimedwait({signal.SIGTERM}, 0.2) is not None:
                break
        unmount(mount)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# -- the shim's side ----------------------------------------------------------------------


def fill_shadow(ram: Path, shadow: Path, meta: Path, snap_id: str) -> int:
    """After a lazy restore (a shim thread, once the VM is ready): the VM's shadow
    becomes the snapshot's memory, read through the lazy RAM file — which is also what
    streams the rest of the memory in behind the guest.  Starts after
    ``TORPOR_LAZY_STREAM_DELAY_S`` (default 1 s: the guest's first steps fetch first).
    The file never changes (QEMU maps it private), so this is the snapshot's memory,
    every chunk hash-checked by the server.  Returns the bytes of data written."""
    from torpor.vmm.capture import write_meta

    write_meta(meta, {"snapshot": None, "capture": None})
    time.sleep(float(os.environ.get("TORPOR_LAZY_STREAM_DELAY_S") or 1.0))
    block = 1 << 20
    written = 0
    zero = bytes(block)
    with open(ram, "rb", buffering=0) as fi, open(shadow, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        off = 0
        while off < size:
            data = os.pread(fi.fileno(), min(block, size - off), off)
            if not data:
                raise OSError(errno.EIO, f"short read of the lazy RAM file at {off}")
            if data != zero[: len(data)]:
                os.pwrite(fo.fileno(), data, off)
                written += len(data)
            off += len(data)
    write_meta(meta, {"snapshot": snap_id, "capture": None})
    return written


class _Forked:
    """The few ``Popen`` methods used here, for a server forked (not exec'd) from the
    shim: its child, reaped here by pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class LazyMemory:
    """A running server for one VM (owned by the VM's shim)."""

    def __init__(
        self, popen: subprocess.Popen[bytes] | _Forked, mount: Path, stats: Path, ready: int
    ) -> None:
        self.popen, self.mount, self.stats, self.ready = popen, mount, stats, ready

    def error(self) -> str | None:
        """Why the server failed to start, if it did (None: serving or still starting)."""
        import select

        if self.ready < 0 or not select.select([self.ready], [], [], 0)[0]:
            return None
        msg = os.read(self.ready, 4096).decode(errors="replace").strip()
        os.close(self.ready)
        self.ready = -1
        return None if msg == "ok" else (msg or "the server exited")

    def stop(self, timeout: float = 5.0) -> None:
        """Unmount (QEMU is gone or going) and reap the server."""
        unmount(self.mount)
        if self.ready >= 0:
            os.close(self.ready)
            self.ready = -1
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        unmount(self.mount)


def _block_term() -> None:
    """SIGTERM blocked in this thread and every thread it starts (an exec keeps the
    mask): pending until the server's watcher takes it (:func:`_watch_parent`)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _child_setup() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, b"torpor-lazymem", 0, 0, 0)  # what ps shows
    # SIGTERM, not SIGKILL: blocked (before it can come), then taken by the server's
    # watcher, which unmounts before the server exits
    _block_term()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    os.umask(0o077)


def _spawn(argv: list[str], keep: tuple[int, ...]) -> subprocess.Popen[bytes] | _Forked:
    """The server process: forked from this process when it is single-threaded (the
    shim's start, forked from the zygote: interpreter and most imports are already
    paid, ~0.1-0.7 s here), else a fresh interpreter."""
    if threading.active_count() > 1 or os.environ.get("TORPOR_LAZY_EXEC") == "1":
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, pass_fds=keep, preexec_fn=_child_setup,
            close_fds=True,
        )
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:  # the child: nothing of the shim's but stdio and the ready pipe
        _child_setup()
        if os.getppid() != parent:  # the shim died before the death signal was set
            os._exit(1)
        # every inherited fd but stdio and the ready pipe now points at /dev/null:
        # the shim's pipes, sockets and locks are let go, and no Python object of the
        # shim's can later close (or write to) an fd number reused by this server
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep and fd != devnull:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd, inheritable=False)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # libfuse installs its own
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = serve(argv[3:])
    except BaseException as e:
        with contextlib.suppress(Exception):
            os.write(2, f"lazy memory server: {e!r}\n".encode())
    finally:
        os._exit(code)


def _mount(mount: Path, *, jailed: bool) -> int:
    """Mount a FUSE filesystem on ``mount`` (a file) and return its /dev/fuse fd.

    Done here, not by the server, so that QEMU can be started at once: its open of the
    file waits in the kernel until the server has answered FUSE's INIT (and fails with
    ENOTCONN if the server dies first — never an empty file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]  # fmt: skip
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode={stat.S_IFREG:o},user_id=0,group_id=0,default_permissions"
    if jailed:
        opts += ",allow_other"  # QEMU runs as its own uid; the file's mode and owner rule
    MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
    if libc.mount(
        b"torpor-lazymem", str(mount).encode(), b"fuse.torpor", MS_NOSUID | MS_NODEV | MS_NOEXEC,
        opts.encode(),
    ) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise VMError(f"lazy memory: mount on {mount}: {os.strerror(err)}", step="restore")
    return fd


def start(
    root: Path, vm_dir: Path, mount: Path, snap_id: str, size: int, *, uid: int, gid: int,
    jailed: bool,
) -> LazyMemory:
    """Mount the lazy memory on ``mount`` (the VM's RAM file path) and start its server.

    Returns at once: QEMU may be started now (its open waits for the server).  Raises
    VMError if the mount cannot be made."""
    mount = Path(mount)
    unmount(mount)  # a stale one from a killed server
    with contextlib.suppress(FileNotFoundError):
        mount.unlink()
    # the mount point: an empty private file (a FUSE mount on a file: its root is a file)
    os.close(os.open(mount, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    stats = vm_dir / STATS_FILE
    with contextlib.suppress(FileNotFoundError):
        stats.unlink()
    fuse_fd = _mount(mount, jailed=jailed)
    r, w = os.pipe2(os.O_CLOEXEC)
    argv = [
        sys.executable, "-m", "torpor.vmm.lazymem", "--root", str(root), "--snapshot", snap_id,
        "--mount", str(mount), "--uid", str(uid), "--gid", str(gid), "--stats", str(stats),
        "--ready-fd", str(w), "--fuse-fd", str(fuse_fd), "--size", str(size),
        "--shadow", str(VMFiles(vm_dir).shadow),
    ]
    try:
        popen = _spawn(argv, (w, fuse_fd))
    except BaseException:
        unmount(mount)
        os.close(r)
        raise
    finally:
        os.close(w)
        os.close(fuse_fd)  # the server's copy is the connection now
    return LazyMemory(popen, mount, stats, r)


if __name__ == "__main__":
    sys.exit(serve())


# -- QEMU's hugepage advice -----------------------------------------------------------

SECCOMP_MODE_FILTER = 2
PR_SET_SECCOMP = 22
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_MADVISE_X86_64 = 28
MADV_HUGEPAGE = 14


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def no_hugepage_preexec(inner: Any) -> Any:
    """A ``preexec_fn`` running ``inner`` (the jail's, or the plain one), then a
    seccomp filter that makes ``madvise(…, MADV_HUGEPAGE)`` fail with EINVAL.

    Why: QEMU advises hugepages on all guest RAM (no option turns it off in 7.2 or
    10), and on a file mapping that makes every page fault read a 4 MiB window around
    it (2 MiB aligned, doubled) instead of the file's read-ahead (128 KiB on FUSE): a
    lazy restore then fetched ~25 % of a 256 MiB guest before its first exec, most of
    it never touched.  QEMU ignores madvise's result.  Only on x86-64 (the syscall
    number), filters stack with QEMU's own ``-sandbox on``; the jail's ``enter`` has
    set ``no_new_privs`` already, and root may install a filter without it."""
    insns = [
        (0x20, 0, 0, 4),  # ld  seccomp_data.arch
        (0x15, 0, 5, AUDIT_ARCH_X86_64),  # jeq x86_64, else allow
        (0x20, 0, 0, 0),  # ld  seccomp_data.nr
        (0x15, 0, 3, NR_MADVISE_X86_64),  # jeq madvise, else allow
        (0x20, 0, 0, 32),  # ld  low word of args[2] (advice)
        (0x15, 0, 1, MADV_HUGEPAGE),  # jeq MADV_HUGEPAGE, else allow
        (0x06, 0, 0, SECCOMP_RET_ERRNO | errno.EINVAL),
        (0x06, 0, 0, SECCOMP_RET_ALLOW),
    ]
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                      ctypes.c_ulong]  # fmt: skip
    ref = ctypes.byref(prog)

    def run() -> None:  # between fork and exec: no imports, only these calls
        inner()
        if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ref, 0, 0) != 0:
            os.write(2, b"torpor lazymem: the madvise filter could not be installed\n")
        arr  # noqa: B018  (kept alive with the closure)

    return run


def preload() -> None:
    """Import what the server needs (in the zygote: its forks start with them).
    Nothing if mfusepy cannot load (no libfuse: OSError): restores are then full."""
    with contextlib.suppress(ImportError, OSError):
        import mfusepy  # noqa: F401

        import torpor.store.home
        import torpor.store.tiered  # noqa: F401

"""The RAM-less capture: snapshot a VM whose guest RAM is mapped private (``share=off``).

Why: a restore or fork that maps a snapshot's RAM copy-on-write (a sealed base,
:mod:`torpor.vmm.basemem`) never copies it, but then the RAM file no longer shows
what the guest wrote, and QEMU's ``migrate`` with ``x-ignore-shared`` would put all
of RAM in the stream (private RAM is not "shared").  So the shim captures such a VM
without RAM in QEMU's stream (measured plan: docs/design/fast-forks.md §2):

Pause window (:func:`capture_private`, run by the VM's shim like
:func:`torpor.vmm.capture.pause_and_copy`): QMP ``stop``; ``xen-save-devices-state``
(device sections only) into a staging file handed over as an fd (``add-fd``,
``/dev/fdset/N``); ``/proc/<qemu>/pagemap`` over guest RAM names the pages the guest
wrote since the restore (present or swapped, and not a page of the mapped file:
copied-on-write); ``process_vm_readv`` reads them; the disk overlay is copied as
today; ``cont``.  After the resume, off the pause:

- device state = the parent stream's head (the stream this QEMU was restored from,
  kept by the shim; :mod:`torpor.vmm.migstream`) + the saved device sections;
- the VM's **overlay** (``<vm>.overlay`` next to its RAM file, tmpfs): a sparse file
  of the guest's size where every allocated page holds guest memory as of the last
  capture and every hole stands for the base (unchanged since the restore).  Each
  chunk handed to the store is made whole first (its hole pages filled from the
  base), so the store reads full 64 KiB chunks; those filled pages are punched out
  again at the next capture, so between captures the overlay costs about the pages
  the guest wrote plus the last capture's changed chunks, not 64 KiB per written page;
- ``changed``: the chunks whose content differs from the overlay's previous content
  (a written page compared with what the overlay or the base held: unchanged pages
  the guest wrote long ago are not hashed again).  When the overlay's previous
  content is not a committed snapshot (a capture that was never committed), every
  overlay chunk is reported instead — a superset valid against any snapshot of this
  VM's lineage, since chunks outside the overlay equal the base in all of them.

The store then takes the memory artifact from the overlay as it takes it from a
shadow (parent's chunks for everything not listed).  Where the store needs a full
file (no usable parent, hibernation's cache), :func:`fill_holes` copies the base
into the holes first.

Invariants:

- Never stale: a private VM is never captured from its RAM file; if QEMU's memory
  cannot be read (no ptrace rights, a mapping that does not look like guest RAM)
  or the parent head is unusable, the capture is refused and the guest resumed.
- The guest and its QEMU are hostile: QEMU's answers (``gpa2hva``, its maps) are
  checked against the VM's known RAM size and the mapped file; reads are bounded by
  the guest size; page contents are data only.  The head is parsed (never searched),
  and refused if recorded from another QEMU version or another machine layout.
- Pages reverting from private to the file would make the overlay stale: QEMU only
  discards RAM for a balloon, virtio-mem or postcopy, none of which torpor's VMs
  have.
- Both the overlay's tag (which snapshot it equals) and its lock follow the shadow's
  rules (:mod:`torpor.vmm.capture`): cleared before a change, set after a commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import MigrationStreamError, VMError
from torpor.vmm import migstream
from torpor.vmm.capture import (
    CHUNK,
    SHADOW_LOCK_TIMEOUT,
    _copy_extents,
    _flock_within,
    qemu_version_of,
    read_meta,
    sparse_copy,
    write_meta,
)

log = logging.getLogger("torpor.shim")

PAGE = 4096
IOV_MAX = 1024
# device state saved by QEMU (a process the guest may control) is read into memory:
# ~12-20 KB here; anything near this is not device state
MAX_SAVED = 64 << 20
# pagemap bits (Documentation/admin-guide/mm/pagemap.rst), in an entry's top byte
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20


def overlay_of(shadow: Path) -> Path:
    """A VM's overlay file, next to its shadow (``<id>.shadow`` -> ``<id>.overlay``)."""
    name = shadow.name
    stem = name[: -len(".shadow")] if name.endswith(".shadow") else name
    return shadow.with_name(stem + ".overlay")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.process_vm_readv.restype = ctypes.c_ssize_t

# a page is the guest's own (written since the restore) unless it is the mapped file's
# page or was never touched: top-byte values for which that holds, as a translate table
_PRIVATE_TABLE = bytes(
    1 if (b & (_PRESENT | _SWAPPED)) and not (b & _FILE) else 0 for b in range(256)
)
_TOUCHED_TABLE = bytes(1 if b & (_PRESENT | _SWAPPED) else 0 for b in range(256))


@dataclass
class PrivateRAM:
    """What a private VM's shim keeps for its captures, for QEMU's whole life."""

    overlay: Path
    size: int  # guest RAM bytes
    snapshot: str  # the snapshot the VM was restored from (its base's content)
    prefix: migstream.Prefix | None = None
    prefix_error: str = ""  # why there is no usable head (then every capture is refused)
    prefix_qemu: str = ""  # the QEMU version that wrote the head ("" if not recorded)
    hva: int = 0  # host address of guest RAM in QEMU
    roms: list[tuple[str, int, int]] | None = None  # guest-mapped blocks of the head
    base_fd: int = -1  # the file QEMU maps (read-only here): what overlay holes stand for
    pages: set[int] = field(default_factory=set)  # overlay pages with content (may differ)
    filled: set[int] = field(default_factory=set)  # of which filled from the base for the store

    def start(self) -> None:
        """A fresh overlay (holes only: equal to the restored snapshot)."""
        remove_overlay(self.overlay)
        fd = os.open(self.overlay, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        write_meta(_meta(self.overlay), {"snapshot": self.snapshot, "capture": None})

    def set_prefix(self, devstate: bytes, qemu: str) -> None:
        """Keep the head of the stream this QEMU was restored from (checked here)."""
        try:
            prefix, _ = migstream.split(devstate)
            mem = prefix.block("mem")
            if prefix.machine != "microvm" or mem is None or mem.size != self.size:
                raise MigrationStreamError(
                    f"the restored device state is for machine {prefix.machine!r} with "
                    f"{mem.size if mem else 0} bytes of RAM, not microvm with {self.size}"
                )
            if "x-ignore-shared" not in prefix.capabilities:
                raise MigrationStreamError("the restored device state includes guest RAM")
        except MigrationStreamError as e:
            self.prefix_error = str(e)
            log.warning("private RAM: no capture will be possible: %s", e)
            return
        self.prefix, self.prefix_qemu = prefix, qemu

    def close(self) -> None:
        if self.base_fd >= 0:
            os.close(self.base_fd)
            self.base_fd = -1


def _meta(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def remove_overlay(overlay: Path) -> None:
    for p in (overlay, _meta(overlay), overlay.with_name(overlay.name + ".lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# -- QEMU's guest-RAM mapping -----------------------------------------------------------

_MAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$"
)


def maps(pid: int) -> list[tuple[int, int, int, int, int, str]]:
    """(start, end, file offset, dev, inode, path) of each file mapping of ``pid``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            m = _MAPS_RE.match(line.rstrip("\n"))
            if m and int(m.group(7)):
                dev = os.makedev(int(m.group(5), 16), int(m.group(6), 16))
                out.append(
                    (
                        int(m.group(1), 16),
                        int(m.group(2), 16),
                        int(m.group(4), 16),
                        dev,
                        int(m.group(7)),
                        m.group(8),
                    )
                )
    return out


def open_base(pid: int, hva: int, size: int) -> int:
    """An O_RDONLY fd of the file QEMU maps as guest RAM at ``hva``..``hva+size``.

    The range must be covered by mappings of one file at matching offsets (QEMU
    maps it from offset 0).  Opened through ``/proc/<pid>/map_files`` (root), else
    one of QEMU's own fds to the same inode.  Raises VMError.
    """
    vmas = [v for v in maps(pid) if v[1] > hva and v[0] < hva + size]
    vmas.sort()
    pos = hva
    for start, end, off, dev, ino, _ in vmas:
        if start > pos or off != start - hva or (dev, ino) != vmas[0][3:5]:
            break
        pos = end
    if not vmas or pos < hva + size:
        raise VMError(
            f"QEMU's guest RAM at {hva:#x} (+{size}) is not one file mapping",
            step="capture: find guest RAM",
        )
    start, end, _, dev, ino, path = vmas[0]
    try:
        fd = os.open(f"/proc/{pid}/map_files/{start:x}-{end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/fd/{name}")
                if (st.st_dev, st.st_ino) == (dev, ino):
                    fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY | os.O_CLOEXEC)
                    break
        if fd < 0:
            raise VMError(
                f"cannot open the file QEMU maps as guest RAM ({path})",
                step="capture: find guest RAM",
            ) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino) or st.st_size < size:
        os.close(fd)
        raise VMError("the guest RAM file changed under QEMU", step="capture: find guest RAM")
    return fd


async def gpa2hva(q: Any, gpa: int) -> tuple[str, int]:
    """(RAM block name, host address) of guest physical address ``gpa`` (HMP)."""
    from torpor.vmm import qmp

    out = await qmp.execute(q, "human-monitor-command", {"command-line": f"gpa2hva {gpa:#x}"})
    m = re.search(r"\((\S+)\) is (0x[0-9a-fA-F]+)", str(out))
    if not m or int(m.group(2), 16) % PAGE:
        raise VMError(f"unexpected gpa2hva answer: {str(out)[:200]!r}", step="capture")
    return m.group(1), int(m.group(2), 16)


async def guest_ram_hva(q: Any) -> int:
    """The host address QEMU maps guest physical address 0 (guest RAM, "mem") at."""
    name, hva = await gpa2hva(q, 0)
    if name != "mem":
        raise VMError(f"guest physical address 0 is in {name!r}, not guest RAM", step="capture")
    return hva


async def guest_roms(q: Any, prefix: migstream.Prefix) -> list[tuple[str, int, int]]:
    """(name, host address, size) of the RAM blocks besides guest RAM that the guest
    maps at their address (a microvm's BIOS region is RAM the guest can write): their
    pages are in the stream's head and must be as of the capture, not the restore."""
    out = []
    for b in prefix.blocks:
        if b.name == "mem" or b.addr is None:
            continue
        try:
            name, hva = await gpa2hva(q, b.addr)
        except VMError:
            continue  # not mapped for the guest (fw_cfg blobs): it cannot change them
        if name == b.name:
            out.append((b.name, hva, b.size))
    return out


# -- inside the pause ------------------------------------------------------------------


def private_runs(pid: int, hva: int, size: int) -> list[tuple[int, int]]:
    """(first page, count) of each run of pages the guest wrote since the restore."""
    return _page_runs(pid, hva, size, _PRIVATE_TABLE)


def touched_runs(pid: int, hva: int, size: int) -> list[tuple[int, int]]:
    """(first page, count) of each run of pages QEMU has mapped at ``hva``..``hva+size``
    (present or swapped: the guest touched them, whether read or written)."""
    return _page_runs(pid, hva, size, _TOUCHED_TABLE)


def _page_runs(pid: int, hva: int, size: int, table: bytes) -> list[tuple[int, int]]:
    n = size // PAGE
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), n * 8, hva // PAGE * 8)
    if len(raw) != n * 8:
        raise VMError("short read of QEMU's pagemap", step="capture: find written pages")
    marks = raw[7::8].translate(table)  # the top byte of each little-endian entry
    return [(m.start(), m.end() - m.start()) for m in re.finditer(b"\x01+", marks)]


def read_pages(pid: int, hva: int, runs: list[tuple[int, int]]) -> bytearray:
    """The pages of ``runs`` from QEMU's memory, back to back (``process_vm_readv``)."""
    total = sum(c for _, c in runs) * PAGE
    buf = bytearray(total)
    if not total:
        return buf
    base = ctypes.addressof((ctypes.c_char * total).from_buffer(buf))
    done = 0
    for i in range(0, len(runs), IOV_MAX):
        batch = runs[i : i + IOV_MAX]
        remote = (_Iovec * len(batch))(*[(hva + p * PAGE, c * PAGE) for p, c in batch])
        want = sum(c for _, c in batch) * PAGE
        local = _Iovec(base + done, want)
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(batch), 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise VMError(
                f"cannot read guest memory from QEMU (process_vm_readv: "
                f"{os.strerror(err)}; {max(got, 0)} of {want} bytes)",
                step="capture: read written pages",
            )
        done += want
    return buf


# -- after the pause -------------------------------------------------------------------


def _ranges(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def apply_pages(
    ram: PrivateRAM,
    runs: list[tuple[int, int]],
    buf: bytearray,
    chunk: int = CHUNK,
    *,
    whole_overlay: bool = False,
) -> tuple[list[int], list[int]]:
    """Bring the overlay up to date with the pages read; return the chunks whose bytes
    changed and the chunks to store.

    The chunks to store are those that changed (or, with ``whole_overlay``, every chunk
    holding a page of the overlay); each is left whole in the overlay (its other pages
    filled from the base) for the store to read, and those filled pages are punched out
    again at the next capture: between captures the overlay holds the guest's pages,
    not whole chunks (a write every 64 KiB would otherwise cost 16 times its size).
    """
    per = chunk // PAGE
    npages = ram.size // PAGE
    mv = memoryview(buf)
    fd = os.open(ram.overlay, os.O_RDWR | os.O_CLOEXEC)
    try:
        private = {p for first, count in runs for p in range(first, first + count)}
        punch = sorted(ram.filled - private)  # the store has read them: holes again
        for first, count in _ranges(punch):
            fallocate(fd, first * PAGE, count * PAGE)
        ram.pages.difference_update(punch)
        ram.filled = set()
        changed: set[int] = set()
        pos = 0
        for first, count in runs:
            for p in range(first, first + count):
                page = mv[pos : pos + PAGE].tobytes()  # (bytes compare: memcmp)
                pos += PAGE
                old = os.pread(fd if p in ram.pages else ram.base_fd, PAGE, p * PAGE)
                if len(old) != PAGE:
                    raise VMError(f"short read of guest RAM at page {p}", step="capture")
                if old != page:
                    os.pwrite(fd, page, p * PAGE)
                    ram.pages.add(p)
                    changed.add(p // per)
        out = {p // per for p in ram.pages} if whole_overlay else changed
        for c in sorted(out):
            lo, hi = c * per, min((c + 1) * per, npages)
            missing = [p for p in range(lo, hi) if p not in ram.pages]
            if not missing:
                continue
            base = os.pread(ram.base_fd, (hi - lo) * PAGE, lo * PAGE)
            if len(base) != (hi - lo) * PAGE:
                raise VMError(f"short read of guest RAM's base at {lo * PAGE}", step="capture")
            for first, count in _ranges(missing):
                a = (first - lo) * PAGE
                os.pwrite(fd, base[a : a + count * PAGE], first * PAGE)
            ram.pages.update(missing)
            ram.filled.update(missing)
    finally:
        os.close(fd)
    return sorted(changed), sorted(out)


_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, offset: int, length: int) -> None:
    """Punch a hole (the file keeps its size)."""
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def fill_holes(overlay: Path, base: Path) -> int:
    """Copy ``base`` into the holes of ``overlay`` (same content: holes stand for the
    base), so the overlay is a full memory file; returns bytes copied."""
    with open(base, "rb") as fb, open(overlay, "r+b") as fo:
        fi, fout = fb.fileno(), fo.fileno()
        size = os.fstat(fout).st_size
        holes: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            hole = os.lseek(fout, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fout, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole to the end
                data = size
            holes.append((hole, data))
            pos = data
        return _copy_extents(fi, fout, holes)


# -- the capture ---------------------------------------------------------------------


async def capture_private(
    qmp_sock: Path,
    disk: Path,
    stage: Path,
    ram: PrivateRAM,
    *,
    keep_paused: bool,
    qemu_pid: int,
    parent_ref: Path,
    fault: str = "",
) -> dict[str, Any]:
    """The pause window of a private VM (module docstring); answers like
    :func:`torpor.vmm.capture.pause_and_copy` (``shadow`` is the overlay) plus
    ``private``, ``base_file`` (a path that reads the base while the shim lives) and
    the timings of each step.

    Raises VMError (QMP, QEMU's memory unreadable, no usable head: the guest is
    resumed first if QEMU lives), OSError (staging I/O).
    """
    from torpor.vmm import qmp

    if ram.prefix is None:
        raise VMError(
            f"no device-state head to build on: {ram.prefix_error or 'none recorded'}",
            step="capture",
        )
    meta_path = _meta(ram.overlay)
    lock_path = ram.overlay.with_name(ram.overlay.name + ".lock")
    t: dict[str, Any] = {"private": True}
    t_start = time.perf_counter()
    saved_path = stage / "devstate.saved"
    import asyncio

    async with qmp.session(qmp_sock) as q:
        version = qemu_version_of(await qmp.execute(q, "query-version"))
        if ram.prefix_qemu and ram.prefix_qemu != version:
            raise VMError(
                f"the device state this VM was restored from was written by {ram.prefix_qemu}, "
                f"this VM runs {version}: its head cannot be reused",
                step="capture",
            )
        if not ram.hva:
            ram.hva = await guest_ram_hva(q)
        if ram.roms is None:
            ram.roms = await guest_roms(q, ram.prefix)
        if ram.base_fd < 0:
            ram.base_fd = await asyncio.to_thread(open_base, qemu_pid, ram.hva, ram.size)
        if fault == "private-no-ptrace":  # test hook: as on a host that denies ptrace
            raise VMError(
                "cannot read guest memory from QEMU (process_vm_readv: Operation not permitted)",
                step="capture: read written pages",
            )
        fd = os.open(saved_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            q.send_fd_scm(fd)
            fdset = (await qmp.execute(q, "add-fd"))["fdset-id"]
        finally:
            os.close(fd)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await _flock_within(lock_fd, lock_path, SHADOW_LOCK_TIMEOUT)
            tag = read_meta(meta_path).get("snapshot")
            capture_id = secrets.token_hex(8)
            write_meta(meta_path, {"snapshot": None, "capture": capture_id})
            t0 = time.perf_counter()
            await qmp.execute(q, "stop")
            ok = False
            try:
                if fault == "kill-qemu-in-pause":
                    os.kill(qemu_pid, 9)
                await qmp.execute(
                    q,
                    "xen-save-devices-state",
                    {"filename": f"/dev/fdset/{fdset}", "live": False},
                )
                t["devstate_ms"] = (time.perf_counter() - t0) * 1000
                t1 = time.perf_counter()
                runs = await asyncio.to_thread(private_runs, qemu_pid, ram.hva, ram.size)
                t["pagemap_ms"] = (time.perf_counter() - t1) * 1000
                t1 = time.perf_counter()
                buf = await asyncio.to_thread(read_pages, qemu_pid, ram.hva, runs)
                roms = [
                    (name, await asyncio.to_thread(read_pages, qemu_pid, hva, [(0, n // PAGE)]))
                    for name, hva, n in ram.roms
                ]
                t["read_ms"] = (time.perf_counter() - t1) * 1000
                t1 = time.perf_counter()
                t["disk_bytes_copied"] = await asyncio.to_thread(sparse_copy, disk, stage / "disk")
                t["copy_ms"] = (time.perf_counter() - t1) * 1000
                ok = True
            finally:
                if not (ok and keep_paused):
                    await qmp.execute(q, "cont")
            t["pause_ms"] = (time.perf_counter() - t0) * 1000
            with contextlib.suppress(VMError):
                await qmp.execute(q, "remove-fd", {"fdset-id": fdset})
            # off the pause: the stream, then the overlay
            t1 = time.perf_counter()
            if saved_path.stat().st_size > MAX_SAVED:
                raise VMError(
                    f"QEMU saved {saved_path.stat().st_size} bytes of device state "
                    f"(more than {MAX_SAVED})",
                    step="capture: device state",
                )
            head = ram.prefix
            for name, content in roms:
                head = migstream.refresh(head, name, bytes(content))
            stream = migstream.compose(head, saved_path.read_bytes())
            (stage / "devstate").write_bytes(stream)
            saved_path.unlink()
            t1b = time.perf_counter()
            # the overlay's last state never committed (tag None): every chunk that may
            # differ from the base, against the VM's last snapshot (module doc)
            precise, changed = await asyncio.to_thread(
                functools.partial(apply_pages, whole_overlay=tag is None), ram, runs, buf
            )
            t["stream_ms"] = (t1b - t1) * 1000
            t["apply_ms"] = (time.perf_counter() - t1b) * 1000
            t["memory_pages_private"] = sum(c for _, c in runs)
            t["memory_bytes_read"] = len(buf)
            t["memory_chunks_changed"] = len(precise)
            t["memory_overlay_chunks"] = len({p // (CHUNK // PAGE) for p in ram.pages})
            t["memory_overlay_pages"] = len(ram.pages) - len(ram.filled)
            if tag is None:
                tag = _read_ref(parent_ref)
            t["capture_total_ms"] = (time.perf_counter() - t_start) * 1000
        finally:
            os.close(lock_fd)
    t |= {
        "capture": capture_id,
        "base_snapshot": tag,
        "changed": changed,
        "chunk_size": CHUNK,
        "shadow": str(ram.overlay),
        "base_file": f"/proc/{os.getpid()}/fd/{ram.base_fd}",
        "qemu_version": version,
    }
    return t


def _read_ref(p: Path) -> str | None:
    try:
        return p.read_text().strip() or None
    except OSError:
        return None

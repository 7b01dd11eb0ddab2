"""The guest kernel and the initramfs every VM boots.

The kernel is Debian's ``linux-image-*-cloud-amd64``: fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into
``Paths.guest/kernels/<version>/`` — never installed on the host, whose boot
loader it would rewrite.  Only the vmlinuz and the handful of virtio modules a
torpor VM needs are kept.

The initramfs is a small uncompressed cpio (``newc``) archive holding the
static guest agent as ``/init`` and those modules in dependency order
(``/torpor/modules`` lists them).  Uncompressed because under TCG the guest
would spend longer decompressing it than QEMU spends copying it.  It is built
once per (kernel, agent) pair and cached by content.

Invariants: a kernel folder exists only when complete (built in ``tmp`` and
renamed); an initramfs file is named by the hash of its inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import GuestError, SetupError
from torpor.paths import Paths

#: Modules a VM needs: block root, the control port, networking, in the order they
#: can be loaded once their ``depends=`` are satisfied (computed, not trusted).
WANTED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
)
META_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def boot_image(self) -> Path:
        """The uncompressed PVH ``vmlinux`` when available, else the bzImage.

        QEMU boots an ELF kernel with a PVH entry note directly in 64-bit mode, which
        skips the real-mode setup and the decompressor (~0.15 s under TCG).
        """
        vmlinux = self.root / "vmlinux"
        return vmlinux if vmlinux.exists() else self.vmlinuz

    @property
    def modules(self) -> list[Path]:
        order = (self.root / "modules.order").read_text().split()
        return [self.root / "modules" / f"{name}.ko" for name in order]


def _kernels_dir(paths: Paths) -> Path:
    return paths.guest / "kernels"


def find_kernels_dir() -> Path | None:
    """A guest/kernels folder already set up on this host ($TORPOR_HOME, root's or this
    user's default home), for tools that make a fresh home and want to skip the fetch."""
    for home in (
        os.environ.get("TORPOR_HOME"),
        "/var/lib/torpor",
        str(Path.home() / ".local/share/torpor"),
    ):
        if home and (Path(home) / "guest" / "kernels").is_dir():
            return Path(home) / "guest" / "kernels"
    return None


def installed_kernel(paths: Paths) -> Kernel:
    """The newest unpacked kernel. Raises GuestError if none is installed."""
    kdir = _kernels_dir(paths)
    found = sorted(p for p in kdir.glob("*") if (p / "vmlinuz").exists()) if kdir.exists() else []
    if not found:
        raise GuestError(
            "no guest kernel installed; run `torpor setup` (or scripts/setup)",
            step="find guest kernel",
            path=kdir,
        )
    kernel = Kernel(found[-1].name, found[-1])
    if not (kernel.root / "vmlinux").exists() and not (kernel.root / "vmlinux.none").exists():
        extract_vmlinux(kernel)
    return kernel


LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _has_pvh_note(elf: bytes) -> bool:
    """True if an ELF64 image carries the Xen PHYS32_ENTRY note QEMU needs for PVH."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        hdr = phoff + i * phentsize
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, hdr)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(kernel: Kernel) -> Path | None:
    """Unpack the LZ4-compressed ELF inside Debian's bzImage, if it can boot as PVH.

    Best effort: without the ``lz4`` tool or a PVH note, torpor boots the bzImage and
    records that in ``vmlinux.none`` so the attempt is not repeated.
    """
    data = kernel.vmlinuz.read_bytes()
    off = data.find(LZ4_LEGACY_MAGIC)
    reason = ""
    if off < 0:
        reason = "bzImage payload is not LZ4 (legacy format)"
    elif not shutil.which("lz4"):
        reason = "the lz4 tool is missing (apt: lz4)"
    else:
        # lz4 reports trailing data after the stream as an error; the output is complete
        r = subprocess.run(["lz4", "-dc"], input=data[off:], capture_output=True)
        if not _has_pvh_note(r.stdout):
            reason = f"no PVH entry note in the decompressed kernel (lz4 exit {r.returncode})"
        else:
            from torpor.fsutil import atomic_write_bytes

            atomic_write_bytes(kernel.root / "vmlinux", r.stdout)
            return kernel.root / "vmlinux"
    with contextlib.suppress(OSError):
        (kernel.root / "vmlinux.none").write_text(reason + "\n")
    return None


def _module_info(ko: Path) -> tuple[str, list[str]]:
    """(name, depends) from a module's .modinfo strings."""
    data = ko.read_bytes()
    name = re.search(rb"\x00name=([^\x00]*)\x00", data)
    deps = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    mod = name.group(1).decode() if name else ko.stem.replace("-", "_")
    return mod, [d for d in (deps.group(1).decode().split(",") if deps else []) if d]


def _dependency_order(mods: dict[str, tuple[Path, list[str]]]) -> list[str]:
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise GuestError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in mods:
            raise GuestError(f"guest kernel lacks module {name!r}", step="resolve modules")
        for dep in mods[name][1]:
            visit(dep, (*stack, name))
        order.append(name)

    for name in WANTED_MODULES:
        visit(name, ())
    return order


def unpack_kernel_deb(deb: Path, paths: Paths) -> Kernel:
    """Unpack a linux-image .deb into ``guest/kernels/<version>``; idempotent."""
    paths.ensure()
    with tempfile.TemporaryDirectory(dir=paths.tmp, prefix="kernel-") as tmp:
        tmpd = Path(tmp)
        try:
            subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(tmpd / "x")], check=True, capture_output=True
            )
        except (OSError, subprocess.CalledProcessError) as e:
            # dpkg-deb's own words as text (a bytes repr printed a literal "\n")
            why = e.stderr.decode(errors="replace").strip() if getattr(e, "stderr", None) else e
            raise SetupError(f"cannot unpack {deb}: {why}", step="unpack kernel") from e
        vmlinuz = sorted((tmpd / "x" / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise SetupError(f"{deb} holds no /boot/vmlinuz-*", step="unpack kernel")
        version = vmlinuz[-1].name.removeprefix("vmlinuz-")
        dest = _kernels_dir(paths) / version
        if (dest / "vmlinuz").exists():
            return Kernel(version, dest)
        mods: dict[str, tuple[Path, list[str]]] = {}
        for ko in (tmpd / "x" / "lib" / "modules" / version).rglob("*.ko"):
            name, deps = _module_info(ko)
            mods[name] = (ko, deps)
        order = _dependency_order(mods)
        stage = tmpd / "out"
        (stage / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[-1], stage / "vmlinuz")
        for name in order:
            shutil.copy2(mods[name][0], stage / "modules" / f"{name}.ko")
        (stage / "modules.order").write_text("\n".join(order) + "\n")
        (stage / "package").write_text(deb.name + "\n")
        for f in [stage, *stage.rglob("*")]:  # private like everything in the home
            os.chmod(f, 0o700 if f.is_dir() else 0o600)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.rename(stage, dest)
        except OSError:
            if not (dest / "vmlinuz").exists():
                raise
    return Kernel(version, dest)


def fetch_kernel(paths: Paths, package: str | None = None) -> Kernel:
    """Download Debian's cloud kernel with ``apt-get download`` and unpack it.

    Raises SetupError when apt cannot find or fetch the package.
    """
    paths.ensure()
    if package is None:
        out = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True)
        m = re.search(r"Depends:\s*(linux-image-\S+)", out.stdout)
        if not m:
            raise SetupError(
                f"apt knows no {META_PACKAGE}; run `apt-get update` first",
                step="find guest kernel package",
            )
        package = m.group(1)
    with tempfile.TemporaryDirectory(dir=paths.tmp, prefix="kdeb-") as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write here
        r = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
        )
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise SetupError(
                f"apt-get download {package} failed: {r.stderr.strip()}",
                step="download guest kernel",
            )
        return unpack_kernel_deb(debs[0], paths)


def ensure_kernel(paths: Paths) -> Kernel:
    try:
        return installed_kernel(paths)
    except GuestError:
        return fetch_kernel(paths)


# -- initramfs ----------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    nb = name.encode() + b"\x00"
    hdr = "070701" + "".join(
        f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
    )
    out = hdr.encode() + nb
    out += b"\x00" * (-len(out) % 4)
    out += data
    out += b"\x00" * (-len(out) % 4)
    return out


def build_cpio(files: list[tuple[str, int, bytes | None]]) -> bytes:
    """A newc cpio archive; ``(name, mode, data)`` with data None for a directory."""
    parts = []
    for ino, (name, mode, data) in enumerate(files, start=1):
        if data is None:
            parts.append(_cpio_entry(name, 0o040000 | mode, ino=ino))
        else:
            parts.append(_cpio_entry(name, 0o100000 | mode, data, ino=ino))
    parts.append(_cpio_entry("TRAILER!!!", 0))
    blob = b"".join(parts)
    return blob + b"\x00" * (-len(blob) % 512)


def ensure_initramfs(paths: Paths, kernel: Kernel, agent: Path) -> Path:
    """The initramfs for ``kernel`` + ``agent``, built once and cached by content."""
    agent_bytes = agent.read_bytes()
    modules = kernel.modules
    h = hashlib.sha256(agent_bytes)
    h.update(kernel.version.encode())
    for m in modules:
        h.update(m.name.encode())
    out = paths.guest / "initramfs" / f"{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    files: list[tuple[str, int, bytes | None]] = [
        ("dev", 0o755, None),
        ("proc", 0o755, None),
        ("sys", 0o755, None),
        ("newroot", 0o755, None),
        ("torpor", 0o755, None),
        ("torpor/modules.d", 0o755, None),
        ("init", 0o755, agent_bytes),
        ("torpor/modules", 0o644, "".join(f"{m.name}\n" for m in modules).encode()),
    ]
    files += [(f"torpor/modules.d/{m.name}", 0o644, m.read_bytes()) for m in modules]
    out.parent.mkdir(parents=True, exist_ok=True)
    from torpor.fsutil import atomic_write_bytes

    atomic_write_bytes(out, build_cpio(files))
    return out

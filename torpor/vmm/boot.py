"""Everything a VM needs before QEMU starts: kernel, agent, initramfs, accelerator.

``machine_spec_for`` is the only place a :class:`VMConfig` becomes a
:class:`MachineSpec`.  Socket paths are relative (QEMU runs with the VM folder as
its working directory) because a unix socket path is limited to 107 bytes and
``TORPOR_HOME`` can be long.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from torpor.errors import AcceleratorError
from torpor.fsutil import atomic_write_json, read_json
from torpor.guest.build import ensure_agent
from torpor.guest.kernel import Kernel, ensure_initramfs, installed_kernel
from torpor.paths import Paths
from torpor.vmm import qemu
from torpor.vmm.layout import VMFiles
from torpor.vmm.state import VMConfig


def guest_boot_files(paths: Paths) -> tuple[Kernel, Path]:
    kernel = installed_kernel(paths)
    agent = ensure_agent(paths.guest / "agent")
    return kernel, ensure_initramfs(paths, kernel, agent)


def mac_for(vm_id: str) -> str:
    h = hashlib.sha256(vm_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def machine_spec_for(paths: Paths, cfg: VMConfig, files: VMFiles) -> tuple[qemu.MachineSpec, str]:
    kernel, initrd = guest_boot_files(paths)
    accel = resolve_accel(paths, cfg.accel)
    spec = qemu.MachineSpec(
        kernel=kernel.boot_image,
        initrd=initrd,
        ram_file=files.ram,
        disk=files.disk,
        disk_format="qcow2",
        qmp_socket=Path(files.qmp_sock.name),
        ctl_socket=Path(files.ctl_sock.name),
        events_socket=Path(files.events_sock.name),
        console_socket=Path(files.console_sock.name),
        console_log=files.console_log,
        memory_mib=cfg.memory_mib,
        cpus=cfg.cpus,
        accel=accel,
        hostname=cfg.name[:63],
        network=cfg.network,
        mac=mac_for(cfg.id),
        hostfwd=tuple(f"{p.proto}:{p.host_ip}:{p.host_port}-:{p.guest_port}" for p in cfg.ports),
    )
    return spec, accel


# -- accelerator ----------------------------------------------------------------------


def _accel_cache_key() -> str:
    # the binary's identity, not `qemu --version`: running QEMU cost ~20 ms per VM start
    b = qemu.qemu_binary()
    st = os.stat(b)
    return f"{platform.release()}|{b}|{st.st_size}|{st.st_mtime_ns}"


def resolve_accel(paths: Paths, requested: str) -> str:
    """The accelerator to use for ``requested`` (auto | kvm | tcg).

    Raises AcceleratorError when kvm is requested but cannot work here.
    """
    qemu.validate_accel(requested)
    if requested == "tcg":
        return "tcg"
    reason = qemu.kvm_unusable_reason()
    if requested == "kvm":
        if reason:
            raise AcceleratorError(f"--accel kvm: {reason}; use --accel tcg")
        return "kvm"
    return detect_accel(paths)["accel"]


def detect_accel(paths: Paths, refresh: bool = False) -> dict[str, str]:
    """Decide once whether KVM really runs a standard guest here; cached."""
    cache = paths.cache / "accel.json"
    key = _accel_cache_key()
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError):
            d = read_json(cache)
            if d["key"] == key:
                return d
    reason = qemu.kvm_unusable_reason()
    if reason is None:
        ok, reason = probe_kvm(paths)
        accel = "kvm" if ok else "tcg"
    else:
        accel = "tcg"
    d = {
        "key": key,
        "accel": accel,
        "reason": reason or "KVM runs a standard guest",
        "checked_at": str(time.time()),
    }
    paths.cache.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, d)
    return d


def probe_kvm(paths: Paths, deadline: float = 15.0) -> tuple[bool, str]:
    """Boot the guest kernel under KVM without a root disk and watch it reach init.

    Success is the kernel running /init (the agent says so on the console); a hang
    (PVM-only hosts) or an error is a failure.  QEMU is always killed afterwards.
    """
    kernel, initrd = guest_boot_files(paths)
    with tempfile.TemporaryDirectory(dir=paths.tmp, prefix="kvmprobe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu.qemu_binary(),
            "-M",
            "microvm,acpi=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel.boot_image),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 torpor.root=/dev/none",
            "-chardev",
            f"file,id=con,path={console}",
            "-serial",
            "chardev:con",
        ]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < deadline:
                text = console.read_text(errors="replace") if console.exists() else ""
                if "Run /init" in text or "torpor-agent" in text:
                    return True, "KVM runs a standard guest"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    return False, f"QEMU with KVM failed: {err.strip()[:200]}"
                time.sleep(0.05)
            return False, f"guest kernel did not reach init under KVM within {deadline:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def describe_accel(paths: Paths) -> str:
    d = detect_accel(paths)
    return f"{d['accel']} ({d['reason']})"


def ensure_qcow2_overlay(base: Path, overlay: Path) -> None:
    """A copy-on-write qcow2 overlay of a raw base image (which stays untouched)."""
    tmp = overlay.with_name(overlay.name + ".tmp")
    r = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(tmp)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        from torpor.errors import VMError

        raise VMError(
            f"qemu-img create failed: {r.stderr.strip()}", step="create disk", path=overlay
        )
    os.replace(tmp, overlay)

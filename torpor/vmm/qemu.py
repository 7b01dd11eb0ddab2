"""Building QEMU's command line, and choosing the accelerator.

One function turns a :class:`MachineSpec` into an argv; nothing else in torpor
knows QEMU flags.  The machine is ``microvm`` (virtio-mmio, ACPI for power-off),
every device explicit (``-nodefaults``), disk formats explicit, guest RAM a file
(``memory-backend-file``) so snapshots can map it, QMP and the control port unix
sockets inside the VM's 0700 folder, and QEMU's seccomp sandbox on.

Accelerator: KVM only where a standard guest really runs under it.  ``/dev/kvm``
can exist and still be useless (PVM-only hosts hang a normal kernel in KVM_RUN),
so ``auto`` probes once by booting the real guest under KVM with a deadline, and
caches the verdict per host kernel and QEMU binary.  TCG is emulation: it works
everywhere but is no security boundary (QEMU's own security policy says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from torpor.errors import AcceleratorError, SetupError

QEMU_BINARY = "qemu-system-x86_64"

ISOLATION = {
    "kvm": "hardware (KVM)",
    "tcg": "none (TCG emulation is not a security boundary)",
}


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if not path:
        raise SetupError(
            f"{QEMU_BINARY} not found; run scripts/setup (apt: qemu-system-x86)", step="find QEMU"
        )
    return path


@dataclass(frozen=True)
class MachineSpec:
    kernel: Path
    initrd: Path
    ram_file: Path
    disk: Path
    disk_format: str
    qmp_socket: Path
    ctl_socket: Path
    console_log: Path
    # when set, the serial console goes to this listening socket (the shim reads it
    # into a size-capped console.log) instead of straight to console_log
    console_socket: Path | None = None
    # a second QMP monitor, for the shim alone: it stays connected to hear
    # BLOCK_IO_ERROR / RESUME while captures use qmp_socket (one client per monitor)
    events_socket: Path | None = None
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "tcg"
    hostname: str = "torpor"
    network: bool = True
    mac: str = "52:54:00:12:34:56"
    hostfwd: tuple[str, ...] = ()  # "tcp:127.0.0.1:8080-:80"
    ram_shared: bool = True
    incoming: bool = False
    extra_append: tuple[str, ...] = field(default_factory=tuple)


def build_argv(spec: MachineSpec, qemu: str | None = None) -> list[str]:
    mem = f"{spec.memory_mib}M"
    append = [
        "console=ttyS0",
        os.environ.get("TORPOR_KERNEL_LOGLEVEL", "quiet"),
        "panic=-1",
        "reboot=t",
        "tsc=reliable",
        "cryptomgr.notests",  # crypto self-tests cost ~0.3 s of boot under TCG
        f"torpor.hostname={spec.hostname}",
    ]
    if spec.accel != "kvm":
        khz = host_tsc_khz()
        if khz:
            # Under TCG the guest TSC ticks at the host's rate, but calibrating it against
            # the emulated PIT fails when the host is busy; the kernel then marks the TSC
            # unstable and, with no HPET or ACPI PM timer on microvm, hangs in early boot.
            append.append(f"tsc_early_khz={khz}")
    if spec.network:
        append.append("torpor.net=1")
    append += spec.extra_append
    argv = [
        qemu or qemu_binary(),
        "-M",
        "microvm,acpi=on,rtc=on,memory-backend=mem",
        "-accel",
        "kvm" if spec.accel == "kvm" else "tcg",
        "-cpu",
        "host" if spec.accel == "kvm" else "max",
        "-m",
        mem,
        "-smp",
        str(spec.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-object",
        f"memory-backend-file,id=mem,size={mem},mem-path={spec.ram_file},"
        f"share={'on' if spec.ram_shared else 'off'}",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        " ".join(append),
        "-chardev",
        f"file,id=con,path={spec.console_log}"
        if spec.console_socket is None
        else f"socket,id=con,path={spec.console_socket},server=on,wait=off",
        "-serial",
        "chardev:con",
        "-qmp",
        f"unix:{spec.qmp_socket},server=on,wait=off",
        "-drive",
        # werror=enospc: a host filesystem that fills stops the guest (the shim reports
        # it and resumes once there is room) instead of failing its writes; any other
        # host I/O error, and every read error, is reported to the guest (rerror=report)
        f"id=root,file={spec.disk},format={spec.disk_format},if=none,"
        "cache=writeback,discard=unmap,aio=threads,werror=enospc,rerror=report",
        "-device",
        "virtio-blk-device,drive=root",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        f"socket,id=ctl,path={spec.ctl_socket},server=on,wait=off",
        "-device",
        "virtserialport,chardev=ctl,name=torpor.ctl",
    ]
    if spec.events_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=events,path={spec.events_socket},server=on,wait=off",
            "-mon",
            "chardev=events,mode=control",
        ]
    if spec.network:
        netdev = "user,id=net0"
        for fwd in spec.hostfwd:
            netdev += f",hostfwd={fwd}"
        argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
    if spec.incoming:
        # -S: the loaded guest stays paused until the shim's `cont` (a pooled restore
        # loads its state ahead of time and must not run before it is claimed)
        argv += ["-S", "-incoming", "defer"]
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return argv


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, when the host kernel knows it."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    if "constant_tsc" not in text:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return int(float(line.split(":", 1)[1]) * 1000)
            except ValueError:
                return None
    return None


def kvm_unusable_reason() -> str | None:
    """Why KVM cannot run a standard guest here, or None if it might (then probe)."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    if os.path.isdir("/sys/module/kvm_pvm") and not (
        os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd")
    ):
        return "KVM here is PVM-only (kvm_pvm): a standard guest kernel hangs under it"
    return None


def qemu_version() -> str:
    try:
        out = subprocess.run(
            [qemu_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError(f"cannot run {QEMU_BINARY} --version: {e}", step="find QEMU") from e
    return out.splitlines()[0] if out else "unknown"


def validate_accel(name: str) -> str:
    if name not in ("auto", "kvm", "tcg"):
        raise AcceleratorError(f"unknown accelerator {name!r}; use auto, kvm or tcg")
    return name

"""The files inside one VM's folder (``Paths.vm(id)``), named in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VMFiles:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "vm.json"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def ctl_sock(self) -> Path:
        return self.dir / "ctl.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_sock(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def shim_log(self) -> Path:
        return self.dir / "shim.log"

    @property
    def main_log(self) -> Path:
        return self.dir / "main.log"

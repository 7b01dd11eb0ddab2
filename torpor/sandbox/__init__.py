"""The machine as a library: :class:`Sandbox` (sync) and :mod:`torpor.sandbox.aio`.

See docs/sandbox.md.  ``Sandbox`` is a thin layer over VMManager, AgentClient and
torpor.snapshot; everything it knows is in the VM's folder.
"""

from torpor.sandbox.core import ProcessInfo, Sandbox, SandboxInfo, Snapshot
from torpor.sandbox.files import EntryInfo, Files
from torpor.sandbox.process import CommandHandle, CommandResult
from torpor.sandbox.pty import Pty

__all__ = [
    "CommandHandle",
    "CommandResult",
    "EntryInfo",
    "Files",
    "ProcessInfo",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "Snapshot",
]

"""Host side of the guest agent protocol.

``protocol`` is the pure wire format (docs/protocol.md); ``client`` is the
synchronous, thread-safe :class:`AgentClient` that speaks it over a socket.
"""

from torpor.agent.client import AgentClient, AgentRequestError, CompletedExec, ExecHandle
from torpor.agent.protocol import (
    DirEntry,
    ErrorReply,
    ExecRequest,
    ExitStatus,
    FileInfo,
    Frame,
    FrameDecoder,
    HelloInfo,
    T,
    WriteFileRequest,
)

__all__ = [
    "AgentClient",
    "AgentRequestError",
    "CompletedExec",
    "DirEntry",
    "ErrorReply",
    "ExecHandle",
    "ExecRequest",
    "ExitStatus",
    "FileInfo",
    "Frame",
    "FrameDecoder",
    "HelloInfo",
    "T",
    "WriteFileRequest",
]

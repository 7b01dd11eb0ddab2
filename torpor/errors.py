"""One error hierarchy for all of torpor.

Every failure a user can see is one of these classes; lower-layer exceptions
(OSError, httpx errors, QMP errors, subprocess failures) are chained with
``raise ... from`` so the cause stays visible under ``--debug``.

::

    TorporError                     exit 1 unless a subclass says otherwise
     ├── UsageError                 bad arguments / malformed input           (2)
     ├── NotFoundError              no such image / VM / file                  (3)
     ├── ConflictError              name taken, VM in the wrong state          (4)
     │    ├── LeaseHeldError        another live host holds the session's lease
     │    └── FencedError           a write with a stale lease epoch was refused
     ├── ImageError                 pulling, importing or unpacking an image   (5)
     │    ├── RegistryError         the registry refused or failed
     │    ├── DigestMismatchError   content does not hash to its digest
     │    └── LayerError            a layer is corrupt or unsafe (path escape)
     ├── GuestError                 guest kernel / agent missing or broken     (6)
     ├── AgentError                 the guest agent protocol failed            (7)
     │    ├── ProtocolError         malformed frame on the wire
     │    └── UnsafeCopyError       cp refused guest data (bad name, cap hit)
     ├── VMError                    QEMU failed to start, crashed, timed out   (8)
     │    ├── AcceleratorError      requested accelerator is unusable
     │    │    └── TCGRefusedError     multi-tenant use of TCG without opt-in
     │    ├── JailError             QEMU's jail cannot be set up
     │    └── MigrationStreamError  a device-state stream torpor cannot use
     ├── SetupError                 host is missing a required tool            (9)
     ├── StoreError                 the snapshot chunk store                   (10)
     │    ├── ManifestError         not a manifest, malformed, or inconsistent
     │    │    ├── ManifestAuthError      the MAC does not match the store's key
     │    │    └── ManifestVersionError   written by a newer (unknown) format major
     │    ├── ChunkError            chunks an artifact needs are unusable
     │    │    ├── ChunkMissingError      at least one chunk file is absent
     │    │    └── ChunkCorruptError      chunks are present but do not hash right
     │    └── RemoteStoreError      the object store (s3://) failed
     │         ├── RemoteUnreachableError  endpoint unreachable (after retries)
     │         ├── RemoteAccessError       credentials or request refused (403)
     │         └── NoSuchBucketError       the bucket does not exist
     ├── ContextError               the context-log database                  (11)
     ├── ModelError                 a model call failed (torpor.model.errors)  (12)
     └── SessionError               a session cannot do it: never started, nothing
                                    to recover from (torpor.session.core)      (13)

The CLI maps each class to the stable exit code shown; exec'd commands use
their own exit codes (0-255) only for ``run`` / ``exec`` when torpor itself
did not fail, following Docker (125 torpor failed, 126 not executable,
127 not found).
"""

from __future__ import annotations

from collections.abc import Iterable


class TorporError(Exception):
    """Base class. ``step`` names what torpor was doing; ``path`` what it touched."""

    exit_code = 1

    def __init__(self, message: str, *, step: str | None = None, path: object = None):
        super().__init__(message)
        self.message = message
        self.step = step
        self.path = path

    def __str__(self) -> str:
        parts = []
        if self.step:
            parts.append(f"{self.step}: ")
        parts.append(self.message)
        if self.path is not None and str(self.path) not in self.message:
            parts.append(f" ({self.path})")
        return "".join(parts)


class UsageError(TorporError):
    exit_code = 2


class NotSupportedError(UsageError):
    """A parameter or feature torpor accepts by name but does not implement yet."""


class NotFoundError(TorporError):
    exit_code = 3


class ConflictError(TorporError):
    exit_code = 4


class LeaseHeldError(ConflictError):
    """Another host holds the session's lease and it has not expired (torpor.context)."""

    def __init__(
        self, message: str, *, session_id: str, holder: str, epoch: int, seconds_left: float
    ):
        self.session_id = session_id
        self.holder = holder
        self.epoch = epoch
        self.seconds_left = seconds_left
        super().__init__(message, step="claim session lease")


class FencedError(ConflictError):
    """A write carried a stale fence: the session's lease is no longer this host's at
    that epoch (another host took it over, or it expired).  Nothing was written."""

    def __init__(
        self,
        message: str,
        *,
        session_id: str,
        host: str,
        epoch: int,
        holder: str | None,
        holder_epoch: int | None,
    ):
        self.session_id = session_id
        self.host = host
        self.epoch = epoch
        self.holder = holder
        self.holder_epoch = holder_epoch
        super().__init__(message, step="fenced write")


class ImageError(TorporError):
    exit_code = 5


class RegistryError(ImageError):
    pass


class DigestMismatchError(ImageError):
    pass


class LayerError(ImageError):
    pass


class GuestError(TorporError):
    exit_code = 6


class AgentError(TorporError):
    exit_code = 7


class ProtocolError(AgentError):
    pass


class UnsafeCopyError(AgentError):
    """``torpor cp`` refused what the guest sent: a bad name, a changed type, a cap hit."""


class ExecTimeoutError(AgentError):
    """A command ran past its timeout; its process group was killed (SIGKILL).

    ``stdout`` / ``stderr`` hold what was captured before the kill.
    """

    def __init__(
        self, message: str, *, stdout: str = "", stderr: str = "", step: str | None = None
    ):
        super().__init__(message, step=step)
        self.stdout = stdout
        self.stderr = stderr


class VMError(TorporError):
    exit_code = 8


class AcceleratorError(VMError):
    pass


class TCGRefusedError(AcceleratorError):
    """A multi-tenant use would run a guest under TCG (no security boundary)
    without the operator's opt-in (``TORPOR_ALLOW_TCG=1`` / ``--allow-tcg``)."""


class JailError(VMError):
    """QEMU's jail (unprivileged uid, namespaces, cgroup) cannot be set up."""


class MigrationStreamError(VMError):
    """A QEMU migration stream (device state) is malformed, truncated, of a kind torpor
    does not parse, or from another QEMU / machine than the one it must go with."""


class SetupError(TorporError):
    exit_code = 9


class StoreError(TorporError):
    exit_code = 10


class ManifestError(StoreError):
    pass


class ManifestAuthError(ManifestError):
    pass


class ManifestVersionError(ManifestError):
    pass


class ChunkError(StoreError):
    """Chunks of ``artifact`` are missing and/or corrupt; all are listed."""

    def __init__(
        self,
        *,
        artifact: str,
        missing: Iterable[str] = (),
        corrupt: Iterable[str] = (),
        step: str | None = None,
        path: object = None,
    ):
        self.artifact = artifact
        self.missing = tuple(sorted(set(missing)))
        self.corrupt = tuple(sorted(set(corrupt)))
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing chunk(s): {', '.join(self.missing)}")
        if self.corrupt:
            parts.append(f"{len(self.corrupt)} corrupt chunk(s): {', '.join(self.corrupt)}")
        super().__init__(f"artifact {artifact}: " + "; ".join(parts), step=step, path=path)


class ChunkMissingError(ChunkError):
    pass


class ChunkCorruptError(ChunkError):
    pass


class RemoteStoreError(StoreError):
    """The object store behind the chunk store (``TORPOR_STORE=s3://...``) failed;
    the message names the endpoint and bucket."""


class RemoteUnreachableError(RemoteStoreError):
    """The object store's endpoint cannot be reached (after retries)."""


class RemoteAccessError(RemoteStoreError):
    """The object store refused the credentials or the request (403)."""


class NoSuchBucketError(RemoteStoreError):
    """The configured bucket does not exist."""

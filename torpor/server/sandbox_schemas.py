"""Pydantic models of the sandboxes, snapshots and images routes (the HTTP edge only).

The library keeps frozen dataclasses (``SandboxInfo``, ``CommandResult``,
``EntryInfo``, ``Manifest``, ``Image``); these models are their JSON faces, with the
same field names so a remote client (torpor.client) can rebuild the same objects.
Request models forbid unknown fields: a typo is a 422, not a silently ignored option.

Invariants:

- Every number a client sends is bounded here (memory, cpus, fork count, timeouts,
  output caps), so a request cannot ask the host for more than one sandbox's worth.
- List cursors are opaque to clients; :func:`page` checks them and a bad one is a
  UsageError (400), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from torpor.errors import UsageError

#: Guest paths longer than this are refused at the edge (Linux PATH_MAX).
MAX_PATH = 4096
#: Largest ``n`` of one fork request.
MAX_FORKS = 16
#: Default and largest page of a list.
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: Output kept per stream for a JSON exec result (the library's default cap).
MAX_OUTPUT = 16 * 1024 * 1024


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- sandboxes -----------------------------------------------------------------------------


class SandboxCreate(_In):
    """``Sandbox.create``'s arguments."""

    image: str = Field("tools:latest", min_length=1, max_length=512)
    # an int is MiB and skips parse_memory's bounds, so it is bounded here the same way
    memory: Annotated[int, Field(ge=64, le=1 << 20)] | Annotated[str, Field(max_length=32)] = Field(
        "512M", description='Docker-style ("512M", "2G") or MiB (64..1048576)'
    )
    cpus: int = Field(1, ge=1, le=64)
    env: dict[str, str] = Field(default_factory=dict)
    network: bool = True
    labels: dict[str, str] = Field(default_factory=dict)
    idle: float | None = Field(None, gt=0, description="seconds unused before hibernating")
    timeout: float | None = Field(None, gt=0, description="seconds of life, then killed")
    name: str | None = Field(None, max_length=63)
    cwd: str | None = Field(None, max_length=MAX_PATH)
    user: str | None = Field(None, max_length=256)
    command: list[str] | None = Field(
        None, min_length=1, description='the main process (default: "sleep infinity")'
    )


class SandboxOut(BaseModel):
    """``SandboxInfo`` plus the accelerator its VM runs under."""

    id: str
    name: str
    image: str
    status: str
    labels: dict[str, str] = Field(default_factory=dict)
    created: float = 0.0
    memory_mib: int = 0
    cpus: int = 0
    end_at: float | None = None
    accel: str | None = None
    isolation: str | None = None


class SandboxList(BaseModel):
    items: list[SandboxOut]
    next_cursor: str | None = None


class ExecIn(_In):
    """``Sandbox.exec``'s arguments. A string runs through ``/bin/sh -c``; a list as argv."""

    cmd: str | list[str] = Field(..., description="shell string or argv")
    cwd: str | None = Field(None, max_length=MAX_PATH)
    env: dict[str, str] = Field(default_factory=dict)
    user: str | None = Field(None, max_length=256)
    timeout: float | None = Field(60.0, gt=0, description="seconds; null: no limit")
    stdin: str | None = Field(None, description="fed to the command, then closed")
    background: bool = False
    max_output: int = Field(
        MAX_OUTPUT, ge=0, le=MAX_OUTPUT, description="bytes kept per stream (JSON result)"
    )


class ExecOut(BaseModel):
    """``CommandResult``: ``stdout``/``stderr`` as UTF-8 (invalid bytes replaced) or,
    with ``?encoding=base64``, base64 of the raw bytes."""

    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    encoding: Literal["utf-8", "base64"] = "utf-8"


class BackgroundOut(BaseModel):
    pid: int


class ProcessOut(BaseModel):
    pid: int
    cmdline: list[str]


class KillOut(BaseModel):
    pid: int
    killed: bool


class EntryOut(BaseModel):
    """``EntryInfo``: ``type`` is file, dir, symlink or other."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    link_target: str = ""


class SnapshotIn(_In):
    tag: str | None = Field(None, min_length=1, max_length=256)


class SnapshotRef(BaseModel):
    id: str
    tag: str | None = None


class ForkIn(_In):
    n: int = Field(1, ge=1, le=MAX_FORKS)


class StopIn(_In):
    timeout: int = Field(10, ge=0, le=600, description="seconds after SIGTERM before SIGKILL")


# -- snapshots -----------------------------------------------------------------------------


class SnapshotOut(BaseModel):
    """One snapshot as ``torpor snapshots`` shows it; ``damaged`` names what is wrong
    with one that cannot be read (then most fields are empty)."""

    id: str
    parent: str | None = None
    created: str = ""
    kind: str = ""
    tag: str = ""
    vm: str = ""
    image: str = ""
    sizes: dict[str, int] = Field(default_factory=dict)
    chunks: dict[str, int] = Field(default_factory=dict)
    damaged: str | None = None


class SnapshotDetail(SnapshotOut):
    """Inspect: the snapshot with its lineage."""

    children: list[str] = Field(default_factory=list)
    ancestors: list[str] = Field(default_factory=list, description="parent first, root last")
    distinct_chunks: int = 0


class SnapshotList(BaseModel):
    items: list[SnapshotOut]
    next_cursor: str | None = None


class RestoreIn(_In):
    name: str | None = Field(None, max_length=63)


# -- images --------------------------------------------------------------------------------


class ImageOut(BaseModel):
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    created: str | None = None
    size: int
    layers: int = 0


class ImageList(BaseModel):
    items: list[ImageOut]
    next_cursor: str | None = None


class PullIn(_In):
    """Pull ``ref``. Credentials go to that registry only; the server's own
    (TORPOR_REGISTRY_USER/PASSWORD) are never used for an API pull."""

    ref: str = Field(..., min_length=1, max_length=1024)
    insecure: bool = Field(False, description="plain HTTP / unverified TLS")
    username: str | None = Field(None, max_length=1024)
    password: str | None = Field(None, max_length=4096)


class RemovedOut(BaseModel):
    id: str
    done: list[str] = Field(default_factory=list)


# -- pagination ----------------------------------------------------------------------------

T = TypeVar("T")


def _cursor(key: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _uncursor(cursor: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list):
        raise UsageError(f"bad cursor {cursor[:80]!r}: pass a next_cursor this API returned")
    return key


def page(
    items: Sequence[T], key: Callable[[T], list[Any]], limit: int, cursor: str | None
) -> tuple[list[T], str | None]:
    """``limit`` items of ``items`` (already sorted by ``key``) after ``cursor``, and
    the cursor of the next page (None at the end).  Keys, not offsets: an item removed
    between two pages does not shift the next one."""
    if not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"limit must be 1..{MAX_LIMIT}, not {limit}")
    start = 0
    if cursor:
        after = _uncursor(cursor)
        try:
            start = next((i for i, it in enumerate(items) if key(it) > after), len(items))
        except TypeError:  # a forged cursor whose key does not compare with ours
            raise UsageError(f"bad cursor {cursor[:80]!r}") from None
    out = list(items[start : start + limit])
    more = start + limit < len(items)
    return out, (_cursor(key(out[-1])) if more and out else None)

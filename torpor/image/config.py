"""The runtime part of an OCI image config, and Docker's rules for using it.

Role: :class:`ImageConfig` is the typed view of the image config JSON's
``config`` object (plus ``architecture``/``os``); :func:`resolve_command` and
:func:`merge_env` turn it and the user's overrides into what the guest runs.

Invariants (Docker's behaviour, which users already know):

* ``--entrypoint`` given (even empty) replaces the image ENTRYPOINT *and*
  drops the image CMD; ``[]`` or ``[""]`` means "no entrypoint".
* Without ``--entrypoint``, command arguments replace the image CMD; an empty
  argument list is the same as none.
* argv = entrypoint + cmd; an empty argv is a UsageError ("no command specified").
* Environment: image values, then overrides in order (later wins); ``K``
  alone copies ``K`` from the caller's environment, or unsets it when the caller
  has none (Docker's ``-e K``); ``PATH`` gets Docker's default when absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torpor.errors import ImageError, UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _strings(value: Any, *, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # Some builders write a bare string; Docker treats it as one argument.
        return (value,)
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return tuple(value)
    raise ImageError(f"image config: {key} must be a list of strings, got {value!r}")


@dataclass(frozen=True)
class ImageConfig:
    """What an image asks the runtime to do (OCI ``config`` + platform)."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    stop_signal: str | None = None
    architecture: str = ""
    os: str = ""

    @classmethod
    def from_json(cls, image_config: Mapping[str, Any]) -> ImageConfig:
        """Build from the whole image config JSON (the blob, not just its ``config`` key).

        Raises ImageError if a field has the wrong type.
        """
        if not isinstance(image_config, Mapping):
            raise ImageError("image config is not a JSON object")
        c = image_config.get("config") or {}
        if not isinstance(c, Mapping):
            raise ImageError("image config: 'config' is not an object")
        ports = c.get("ExposedPorts") or {}
        labels = c.get("Labels") or {}
        if not isinstance(ports, Mapping) or not isinstance(labels, Mapping):
            raise ImageError("image config: ExposedPorts and Labels must be objects")
        return cls(
            entrypoint=_strings(c.get("Entrypoint"), key="Entrypoint"),
            cmd=_strings(c.get("Cmd"), key="Cmd"),
            env=_strings(c.get("Env"), key="Env") or (),
            working_dir=str(c.get("WorkingDir") or ""),
            user=str(c.get("User") or ""),
            exposed_ports=tuple(sorted(str(p) for p in ports)),
            labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
            stop_signal=str(c["StopSignal"]) if c.get("StopSignal") else None,
            architecture=str(image_config.get("architecture") or ""),
            os=str(image_config.get("os") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        """The OCI ``config`` object (only the keys that are set)."""
        out: dict[str, Any] = {}
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.env:
            out["Env"] = list(self.env)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.user:
            out["User"] = self.user
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.labels:
            out["Labels"] = dict(self.labels)
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        return out


def resolve_command(
    config: ImageConfig,
    entrypoint_override: Sequence[str] | None = None,
    cmd_override: Sequence[str] | None = None,
) -> list[str]:
    """The argv to run, following ``docker run`` exactly (see the module docstring).

    ``entrypoint_override`` is ``None`` when the user gave no ``--entrypoint``.
    Raises UsageError("no command specified") when the result is empty.
    """
    if entrypoint_override is not None:
        entrypoint = [] if list(entrypoint_override) in ([], [""]) else list(entrypoint_override)
        cmd = list(cmd_override or [])
    else:
        entrypoint = list(config.entrypoint or [])
        cmd = list(cmd_override) if cmd_override else list(config.cmd or [])
    argv = entrypoint + cmd
    if not argv:
        raise UsageError("no command specified")
    return argv


def merge_env(
    image_env: Sequence[str],
    overrides: Sequence[str] | Mapping[str, str | None] = (),
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Image environment plus overrides, Docker style (see the module docstring).

    ``overrides`` is a list of ``K=V`` / ``K`` strings, or a mapping where a
    ``None`` value means "take it from ``environ``" (default ``os.environ``).
    Raises UsageError for an empty variable name.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, str | None] = {}
    for entry in image_env:
        key, sep, value = entry.partition("=")
        if key:
            merged[key] = value if sep else None
    items: list[tuple[str, str | None]]
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for entry in overrides:
            key, sep, value = entry.partition("=")
            items.append((key, value if sep else None))
    for key, value in items:
        if not key:
            raise UsageError(f"invalid environment variable {key}={value!r}: empty name")
        if value is None:
            value = environ.get(key)
        merged[key] = value
        if value is None:
            merged.pop(key)
    if "PATH" not in merged or merged["PATH"] is None:
        merged["PATH"] = DEFAULT_PATH
    return [f"{k}={v}" for k, v in merged.items() if v is not None]

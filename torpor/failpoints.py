"""Named failpoints: where tests and ``torpor bench faults`` inject I/O errors and crashes.

Product code marks a place with one line, ``failpoints.hit("store.chunk_write")``;
nothing else in the product reads the environment for faults.  A point does nothing
unless enabled, either in-process (:func:`enable`, for tests) or for child processes
through the environment variable ``TORPOR_FAILPOINTS`` (read once, here), e.g.::

    TORPOR_FAILPOINTS="store.chunk_write=eio@3,log.write=enospc%0.2"

Each entry is ``NAME=ACTION[@N][%P]``:

- ACTION: ``eio`` / ``enospc`` raise ``OSError`` with that errno (or the call site's
  ``exc`` type, e.g. the database driver's error, with the same message); ``kill``
  ends the process with SIGKILL, as a crash would; ``stop`` freezes it with SIGSTOP
  until someone sends SIGCONT (a host paused mid-step, e.g. past its lease).
- ``@N``: fire on the N-th hit of that point in this process (1-based) and on every
  later one (a disk that failed stays failed); without it, on every hit.
- ``%P``: fire with probability P on each eligible hit.

Points (keep this list in step with the calls):

- ``store.chunk_write``: before a chunk's frame is written (torpor/store/store.py)
- ``store.manifest_write``: before a manifest is written (the commit point)
- ``store.gc_unlink``: before gc unlinks a garbage chunk
- ``log.write``: before a context-log write transaction commits (torpor/context/sqlite.py)
- ``journal.write``, ``journal.durable``, ``journal.commit``: a checkpoint journal torn,
  durable before the log names it, its background commit (torpor/snapshot/journal.py)
- ``session.checkpoint_logged``: a turn's checkpoint entry appended, answer not returned
- ``shim.exiting``: QEMU exited, the agent socket closed, the VM's exit not yet recorded
  (torpor/vmm/shim.py)
- ``cli.attach``: ``torpor run``/``start -a``, the VM started, before attaching to it

Invariant: with no point enabled, :func:`hit` is a dict lookup and never raises.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
from dataclasses import dataclass

ENV = "TORPOR_FAILPOINTS"
ACTIONS = ("eio", "enospc", "kill", "stop")
_ERRNO = {"eio": errno.EIO, "enospc": errno.ENOSPC}


@dataclass
class _Point:
    action: str
    after: int = 1  # fire from this hit on
    probability: float = 1.0
    hits: int = 0


_points: dict[str, _Point] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, _Point]:
    """``NAME=ACTION[@N][%P],…`` → points. Raises ValueError on a malformed entry."""
    out: dict[str, _Point] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, rest = item.partition("=")
        if not sep or not name:
            raise ValueError(f"failpoint {item!r}: expected NAME=ACTION")
        prob = 1.0
        if "%" in rest:
            rest, p = rest.split("%", 1)
            prob = float(p)
        after = 1
        if "@" in rest:
            rest, n = rest.split("@", 1)
            after = int(n)
        if rest not in ACTIONS or after < 1 or not 0.0 <= prob <= 1.0:
            raise ValueError(f"failpoint {item!r}: bad action, count or probability")
        out[name] = _Point(rest, after, prob)
    return out


def enable(name: str, action: str, *, after: int = 1, probability: float = 1.0) -> None:
    """Arm point ``name`` in this process (tests)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown failpoint action {action!r}")
    with _lock:
        _points[name] = _Point(action, after, probability)


def disable(name: str | None = None) -> None:
    """Disarm ``name``, or every point."""
    with _lock:
        if name is None:
            _points.clear()
        else:
            _points.pop(name, None)


def env_value(points: dict[str, str]) -> str:
    """The ``TORPOR_FAILPOINTS`` value for child processes: {name: "eio@3"} → text."""
    return ",".join(f"{k}={v}" for k, v in points.items())


def hit(name: str, exc: type[BaseException] | None = None) -> None:
    """Fire point ``name`` if it is armed (see the module doc); otherwise nothing."""
    if not _points:
        return
    with _lock:
        p = _points.get(name)
        if p is None:
            return
        p.hits += 1
        fire = p.hits >= p.after and (p.probability >= 1.0 or random.random() < p.probability)
    if not fire:
        return
    if p.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if p.action == "stop":  # frozen until SIGCONT: a host paused mid-step (tests)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    code = _ERRNO[p.action]
    msg = f"{os.strerror(code)} (failpoint {name})"
    if exc is not None and not issubclass(exc, OSError):
        raise exc(msg)
    raise (exc or OSError)(code, msg)


def _load_env() -> None:
    spec = os.environ.get(ENV, "")
    if spec:
        _points.update(parse(spec))


_load_env()

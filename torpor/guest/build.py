"""Compile the guest agent (``agent.c``) into a static binary, once per source.

Invariants:

- The binary lives at ``<out_dir>/<first 16 hex of sha256(agent.c)>/torpor-agent``,
  so a changed source never reuses a stale binary and an unchanged one is never
  rebuilt.
- The binary appears atomically (compiled under a temporary name, then renamed),
  so concurrent builders and crashed builds never leave a truncated file behind.
- musl-gcc is preferred (a small static binary); plain gcc links glibc statically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from torpor.errors import SetupError

_WARNINGS = ["-Wall", "-Wextra", "-Werror"]


def ensure_agent(out_dir: Path) -> Path:
    """Path of the compiled agent, building it first if needed.

    Raises SetupError if no C compiler is installed or compilation fails.
    """
    source = resources.files("torpor.guest").joinpath("agent.c")
    code = source.read_bytes()
    target = Path(out_dir) / hashlib.sha256(code).hexdigest()[:16] / "torpor-agent"
    if target.is_file():
        return target
    command = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".torpor-agent.", dir=target.parent)
    os.close(fd)
    try:
        with resources.as_file(source) as src:
            argv = [*command, *_WARNINGS, "-o", tmp, str(src)]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SetupError(
                f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{proc.stderr}",
                step="building the guest agent",
            )
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compiler() -> list[str]:
    if musl := shutil.which("musl-gcc"):
        return [musl, "-static", "-Os", "-s"]
    if gcc := shutil.which("gcc"):
        return [gcc, "-static", "-O2", "-s"]
    raise SetupError(
        "no C compiler found: install musl-tools (musl-gcc) or gcc",
        step="building the guest agent",
    )

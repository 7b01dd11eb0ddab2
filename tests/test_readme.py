"""The README's "Durable agent sessions" examples run as written (real VMs).

Every ``torpor session …`` line of the section's shell block runs through bash in
order, with the placeholder ``S`` replaced by the id ``create`` printed; the Python
block runs as a script.  The only change to either: the model becomes
``scripted:demo`` (offline).  Both use a context log of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torpor.session import Session

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Durable agent sessions"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else None]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), flags=re.S)


def session_lines() -> list[str]:
    (sh,) = _blocks("sh")
    return [ln for ln in sh.splitlines() if ln.startswith("torpor session ")]


def _env(dsn: str) -> dict[str, str]:
    env = dict(os.environ, TORPOR_CONTEXT_DSN=dsn)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("TORPOR_DEBUG", None)
    return env


def _cleanup(dsn: str) -> None:
    for s in Session.list(dsn=dsn):
        try:
            s.remove()
        finally:
            s.close()


def test_the_section_has_the_examples() -> None:
    lines = session_lines()
    assert lines[0].startswith("torpor session create ")
    assert {ln.split()[2] for ln in lines} >= {"send", "log", "fork", "rm", "verify"}
    assert len(_blocks("python")) == 1


def test_readme_session_commands_run_as_written(tmp_path: Path, tools_image: str) -> None:
    dsn = str(tmp_path / "readme.db")
    env = _env(dsn)
    sid = ""
    try:
        for line in session_lines():
            line = re.sub(r"--model \S+", "--model scripted:demo", line)
            cmd = re.sub(r"\bS\b", sid, line) if sid else line
            r = subprocess.run(
                ["bash", "-c", cmd], env=env, capture_output=True, timeout=600, cwd=tmp_path
            )
            assert r.returncode == 0, f"{cmd}\n{r.stdout.decode()}\n{r.stderr.decode()}"
            if not sid:
                sid = r.stdout.decode().strip()
                assert re.fullmatch(r"[0-9a-f]{32}", sid), r.stdout
    finally:
        _cleanup(dsn)


def test_readme_python_example_runs_as_written(tmp_path: Path, tools_image: str) -> None:
    dsn = str(tmp_path / "readme-py.db")
    (code,) = _blocks("python")
    code = re.sub(r'model="[^"]*"', 'model="scripted:demo"', code)
    try:
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=_env(dsn),
            capture_output=True,
            timeout=900,
            cwd=tmp_path,
        )
        assert r.returncode == 0, f"{code}\n{r.stderr.decode()}"
        # the example removed its session; its fork is left, working
        (fork,) = Session.list(dsn=dsn)
        with fork:
            assert fork.status() == "running"
    finally:
        _cleanup(dsn)

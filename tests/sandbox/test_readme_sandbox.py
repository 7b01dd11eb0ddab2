"""The README's "Bring your own agent: the Sandbox API" example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torpor.paths import Paths

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Bring your own agent: the Sandbox API"


def test_readme_sandbox_example_runs(paths: Paths, tools_image: str) -> None:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    (code,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    env = dict(os.environ, TORPOR_HOME=str(paths.root))
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=900, cwd=REPO
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert r.stdout.startswith(b"hello from ")

"""The skip hook in tests/conftest.py: under scripts/test and CI a skip is a failure.

Runs pytest in a subprocess on a scratch test file with the suite's conftest loaded as
a plugin, once strict and once not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRATCH = '''
import pytest

def test_plain():
    pass

def test_skip_in_body():
    pytest.skip("no thing")

@pytest.mark.skipif(True, reason="marker")
def test_skip_marker():
    pass

@pytest.fixture
def needs_thing():
    pytest.skip("fixture")

def test_skip_in_fixture(needs_thing):
    pass

@pytest.mark.parametrize("p", [1, 2])
def test_allowed(p):
    pytest.skip("deliberate")
'''

ALLOW = '''
import tests.conftest as suite

suite.ALLOWED_SKIPS["test_scratch.py::test_allowed"] = "deliberate, for this test"
'''


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    (tmp_path / "conftest.py").write_text(ALLOW)
    e = {k: v for k, v in os.environ.items() if k not in ("CI", "TORPOR_STRICT_SKIPS")}
    e.update(env, PYTHONPATH=str(REPO))
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"),
            *("-c", os.devnull, "--rootdir", str(tmp_path), "-q", "-rA", str(tmp_path)),
        ],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skips_fail_when_strict_except_the_allowed(tmp_path: Path) -> None:
    r = _pytest(tmp_path, TORPOR_STRICT_SKIPS="1")  # what scripts/test sets (CI=... too)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "FAILED test_scratch.py::test_skip_in_body" in out
    assert "ERROR test_scratch.py::test_skip_marker" in out
    assert "ERROR test_scratch.py::test_skip_in_fixture" in out
    assert "1 failed, 1 passed, 2 skipped, 2 errors" in out, out
    assert "add the test to ALLOWED_SKIPS" in out


def test_skips_are_skips_by_hand(tmp_path: Path) -> None:
    r = _pytest(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 5 skipped" in r.stdout

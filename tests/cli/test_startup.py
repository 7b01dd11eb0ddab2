"""Start-up: ``--version``, ``ps`` and ``exec VM true`` import only what they use.

Behaviour, not timing (timings are in ``torpor bench cli``): the real CLI entry runs
in a fresh interpreter, which then reports the modules it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import torpor_cli

# layers a listing or an exec never needs, and heavy third-party modules
FORBIDDEN = (
    "torpor.session",
    "torpor.snapshot",
    "torpor.model",
    "torpor.bench",
    "torpor.context",
    "torpor.store",
    "torpor.sandbox",
    "rich.table",
    "rich.console",
    "httpx",
    "blake3",
)
# torpor.vmm.manager imports torpor.image.config, whose package __init__ pulls in the
# image store and with it zstandard (torpor/image/blobs.py): only `--version` is free of it
VERSION_FORBIDDEN = ("zstandard", "torpor.vmm", "torpor.image", "torpor.agent")

PROBE = """
import json, sys
from torpor.cli.main import main
sys.argv = ["torpor", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    code = e.code
sys.stdout.flush()
sys.__stderr__.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + " CODE " + json.dumps(code))
"""


def _imported(*args: str) -> tuple[set[str], object]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    tail = r.stderr.decode().rpartition("\nMODULES ")[2]
    mods, _, code = tail.partition(" CODE ")
    return set(json.loads(mods)), json.loads(code)


def _forbidden(mods: set[str], extra: tuple[str, ...] = ()) -> list[str]:
    bad = FORBIDDEN + extra
    return sorted(m for m in mods if any(m == f or m.startswith(f + ".") for f in bad))


def test_version_imports_no_layer() -> None:
    mods, code = _imported("--version")
    assert code == 0
    assert _forbidden(mods, VERSION_FORBIDDEN) == []  # not even the VM layer


@pytest.mark.vm
def test_ps_imports_no_session_snapshot_model_bench(tools_image: str) -> None:
    mods, code = _imported("ps", "-a")
    assert code == 0
    assert _forbidden(mods) == []


@pytest.mark.vm
def test_exec_true_imports_no_session_snapshot_model_bench(box) -> None:
    mods, code = _imported("exec", box.id, "true")
    assert code == 0
    assert _forbidden(mods) == []


def test_help_still_lists_lazy_commands() -> None:
    r = torpor_cli("--help")
    assert r.returncode == 0
    assert b"session" in r.stdout
    r = torpor_cli("bench", "--help")
    assert b"thesis-report" in r.stdout
    r = torpor_cli("session", "--help")
    assert r.returncode == 0, r.stderr

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
# what a VM that already runs never needs: the image store (and zstandard, through
# torpor/image/blobs.py), the boot code, the zygote, the kernel and agent builders
NO_CREATE = (
    "zstandard",
    "torpor.image.store",
    "torpor.image.blobs",
    "torpor.image.manifest",
    "torpor.vmm.boot",
    "torpor.vmm.zygote",
    "torpor.guest",
)
VERSION_FORBIDDEN = ("zstandard", "torpor.vmm", "torpor.image", "torpor.agent")

PROBE = """
import json, os, sys
from torpor.cli.main import main

def report(code):
    sys.stdout.flush()
    mods = json.dumps(sorted(sys.modules))
    sys.__stderr__.write("\\nMODULES " + mods + " CODE " + json.dumps(code))
    sys.__stderr__.flush()

real_exit = os._exit
def exit_now(code):  # `exec` ends with os._exit (no interpreter teardown): report first
    report(code)
    real_exit(code)

os._exit = exit_now
sys.argv = ["torpor", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    report(e.code)
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
    assert _forbidden(mods, (*NO_CREATE, "torpor.agent")) == []  # a listing talks to no guest


@pytest.mark.vm
def test_exec_true_imports_no_session_snapshot_model_bench(box) -> None:
    mods, code = _imported("exec", box.id, "true")
    assert code == 0
    assert _forbidden(mods, NO_CREATE) == []


@pytest.mark.vm
def test_images_imports_no_session_snapshot_model_bench(tools_image: str) -> None:
    mods, code = _imported("images")
    assert code == 0
    assert _forbidden(mods, ("torpor.agent", "torpor.vmm.boot", "torpor.guest")) == []


def test_image_config_alone_imports_no_store() -> None:
    """``torpor.image.config`` (every VM lookup needs it) leaves the package's store alone."""
    probe = "import json, sys, torpor.image.config; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, check=True)
    mods = set(json.loads(r.stdout))
    assert _forbidden(mods, NO_CREATE) == []
    from torpor.image import ImageStore  # the package's names still resolve (lazily)
    from torpor.image.store import ImageStore as Direct

    assert ImageStore is Direct


def test_aio_sandbox_imports_no_http_client() -> None:
    """``from torpor.aio import Sandbox`` (local) does not load the remote client's httpx."""
    probe = (
        "import json, sys; from torpor.aio import Sandbox; print(json.dumps(sorted(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, check=True)
    mods = set(json.loads(r.stdout))
    assert "httpx" not in mods and "torpor.client" not in mods
    import torpor.aio

    assert torpor.aio.Client.__module__ == "torpor.client.aio"  # still there, lazily


def test_help_still_lists_lazy_commands() -> None:
    r = torpor_cli("--help")
    assert r.returncode == 0
    assert b"session" in r.stdout
    r = torpor_cli("bench", "--help")
    assert b"thesis-report" in r.stdout
    r = torpor_cli("session", "--help")
    assert r.returncode == 0, r.stderr

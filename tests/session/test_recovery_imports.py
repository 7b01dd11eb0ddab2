"""What a recovering process imports: the session layer and a home's local store pull
in no CLI, server, HTTP, database-driver or bucket modules (a recovering worker pays
every import on its restart).  Checked in a fresh interpreter: ``sys.modules``, not
timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Top-level packages the recovery path has no use for (the CLI, the API server and
#: its client, the Postgres driver, the bucket clients).
NOT_ON_THE_PATH = (
    "rich", "click", "pydantic", "httpx", "psycopg", "boto3", "botocore",
    "fastapi", "starlette", "uvicorn", "torpor.cli", "torpor.server", "torpor.api",
)  # fmt: skip


def _modules(code: str, tmp_path: Path) -> set[str]:
    env = {"PATH": "/usr/bin:/bin", "TORPOR_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_session_layer_imports_no_cli_server_or_drivers(tmp_path: Path) -> None:
    mods = _modules("import torpor.session, torpor.model", tmp_path)
    assert "torpor.session.core" in mods
    pulled = {m for m in mods for bad in NOT_ON_THE_PATH if m == bad or m.startswith(bad + ".")}
    assert pulled == set()


def test_a_local_home_store_imports_no_bucket_code(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from torpor.store.home import home_store\n"
        f"home_store(Path({str(tmp_path / 'home')!r})).close()\n"
    )
    mods = _modules(code, tmp_path)
    assert "torpor.store.store" in mods
    assert "torpor.store.backend" not in mods  # the S3 backend: only for a bucket URL
    assert "torpor.store.tiered" not in mods

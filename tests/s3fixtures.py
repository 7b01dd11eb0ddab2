"""The real S3 server (SeaweedFS) fixtures, defined once for the whole suite.

Imported by tests/conftest.py only: a folder conftest that defined or imported them
again would get its own session-scoped server (pytest scopes a fixture by the
conftest that defines it), and each SeaweedFS costs seconds to start.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS for the test session, on free loopback ports, stopped by PID."""
    from tests.store.s3server import S3Server

    srv = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket per test (names: 3-63 lowercase characters)."""
    import re
    import secrets

    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.make_bucket(f"t-{stem}-{secrets.token_hex(3)}")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS configuration of the test server in this process's environment."""
    for k, v in s3_server.env("unused").items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    return s3_server

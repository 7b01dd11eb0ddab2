"""Fixtures for the chunk-store tests: a fresh store per test and file builders.

No VMs: everything here is files in ``tmp_path``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

import pytest

from torpor.store import ChunkStore

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def store(tmp_path: Path):
    with ChunkStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def write_sparse(path: Path, size: int, regions: Iterable[tuple[int, bytes]] = ()) -> Path:
    """A file of ``size`` bytes, holes except ``regions`` (offset, data)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in regions:
            f.seek(off)
            f.write(data)
    return path


def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def chunk_files(store: ChunkStore) -> set[str]:
    return {p.name for p in store.chunks_dir.glob("*/*")}


def stray_temps(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def urandom(n: int) -> bytes:
    return os.urandom(n)


# -- a real S3 server (SeaweedFS) for the tiered store's tests -----------------------


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

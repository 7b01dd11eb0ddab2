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

"""torpor.store.direct: a file written with O_DIRECT in unaligned ranges, from many
threads in any order, holds exactly the bytes written; switched off, the same bytes
arrive through the page cache."""

from __future__ import annotations

import itertools
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torpor.store import direct

_names = itertools.count()
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write(path: Path, data: bytes, cuts: list[int], threads: int, seed: int) -> bool:
    """Write ``data`` as ranges split at ``cuts`` (each as 1-3 buffers), shuffled."""
    bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    ranges = list(itertools.pairwise(bounds))
    random.Random(seed).shuffle(ranges)
    f = direct.DirectFile(path, FLAGS)
    try:

        def put(r: tuple[int, int]) -> None:
            a, b = r
            mid = (a + b) // 2
            f.pwritev([data[a:mid], memoryview(data)[mid:b]], a)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, ranges))
        f.finish(len(data))
        os.fdatasync(f.fd)
        return f.direct
    finally:
        os.close(f.fd)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 3 * direct.BLOCK * 8 + 17),
    cuts=st.lists(st.integers(0, 3 * direct.BLOCK * 8 + 17), max_size=12),
    threads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_unaligned_ranges_in_any_order_read_back_exactly(tmp_path, size, cuts, threads, seed):
    path = tmp_path / f"f{next(_names)}"
    data = random.Random(seed).randbytes(size)
    _write(path, data, cuts, threads, seed)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_store_folder_here_takes_o_direct(tmp_path):
    """On this machine's disk the packs really bypass the page cache (else the test
    above only exercised the buffered path)."""
    path = tmp_path / "f"
    data = os.urandom(5 * direct.BLOCK + 100)
    assert _write(path, data, [7, direct.BLOCK + 1, 3 * direct.BLOCK], 2, 1) is True
    assert path.read_bytes() == data


def test_buffered_when_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TORPOR_STORE_DIRECT", "0")
    path = tmp_path / "f"
    data = os.urandom(3 * direct.BLOCK + 5)
    assert _write(path, data, [1, 4097, 9000], 3, 2) is False
    assert path.read_bytes() == data


def test_a_failed_write_leaves_no_buffer_the_pool_cannot_drop(tmp_path):
    """A write that fails (a full disk, a closed file) is kept alive by its exception
    and traceback — which hold a view of the staging buffer — for as long as anyone
    keeps the error.  That buffer must not go back to the pool: a later put dropping
    it from a full pool failed with ``BufferError: cannot close exported pointers
    exist`` (a hibernation in CI), far from the write that failed."""
    import mmap

    f = direct.DirectFile(tmp_path / "f", FLAGS)
    assert f.direct, "this test needs a folder that takes O_DIRECT"
    os.close(f.fd)  # every write now fails with EBADF
    kept: list[BaseException] = []
    for _ in range(direct._MAX_STAGING):
        try:
            f.pwritev([b"x" * (2 * direct.BLOCK)], 0)
        except OSError as e:
            kept.append(e)  # the error kept, as a caller's error list or log does
    assert len(kept) == direct._MAX_STAGING
    # other puts go on: a larger buffer comes back to a full pool, the smallest goes
    for _ in range(direct._MAX_STAGING + 1):
        direct._give(mmap.mmap(-1, 8 << 20))
    g = direct.DirectFile(tmp_path / "g", FLAGS)
    try:
        data = os.urandom(3 * direct.BLOCK + 5)
        g.pwritev([data], 0)
        g.finish(len(data))
        os.fdatasync(g.fd)
    finally:
        os.close(g.fd)
    assert (tmp_path / "g").read_bytes() == data

"""The store's parallel put (hash on the pool, compress on zstd's C threads, write +
fdatasync + rename on the sync threads in the background) stores exactly what a plain
serial chunking of the file gives, and a write that fails midway (ENOSPC) leaves
nothing listed, nothing half-written under a chunk's name, no temp file, and a store
instance that can still write the snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torpor import failpoints
from torpor.errors import TorporError
from torpor.store import ChunkStore
from torpor.store import chunks as ck

CS = 4096
KINDS = ("hole", "zeros", "random", "same", "half", "pages")


def _write_sparse(path: Path, kinds: list[str], short: int, seed: int) -> bytes:
    """A sparse file of ``len(kinds)`` chunks (the last ``short`` bytes shorter); returns
    its content.  Holes fall on chunk boundaries and inside chunks."""
    import random

    rnd = random.Random(seed)
    size = len(kinds) * CS - short
    content = bytearray(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for i, kind in enumerate(kinds):
            off = i * CS
            ln = min(CS, size - off)
            if kind == "hole" or ln <= 0:
                continue
            if kind == "zeros":
                data = bytes(ln)  # data extent, zero bytes: a zero chunk all the same
            elif kind == "same":
                data = (b"dup!" * (CS // 4))[:ln]  # equal chunks: stored once
            elif kind == "half":
                data = rnd.randbytes(ln // 2)  # the rest of the chunk is a hole
            elif kind == "pages":
                data = b""  # a data page in the middle: holes on both sides
                os.pwrite(fd, b"\x01" * 512, off + ln // 2)
                content[off + ln // 2 : off + ln // 2 + 512] = b"\x01" * 512
            else:
                data = rnd.randbytes(ln)
            if data:
                os.pwrite(fd, data, off)
                content[off : off + len(data)] = data
    finally:
        os.close(fd)
    return bytes(content)


def _serial(content: bytes) -> tuple[str | None, ...]:
    """The reference chunking: one chunk after the other, BLAKE3, None for all-zero."""
    out = []
    for off in range(0, len(content), CS):
        part = content[off : off + CS]
        out.append(None if part == bytes(len(part)) else blake3.blake3(part).hexdigest())
    return tuple(out)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=40),
    short=st.integers(0, CS - 1),
    seed=st.integers(0, 2**32),
    threads=st.sampled_from([1, 2, 4]),
)
def test_parallel_put_equals_serial_chunking(tmp_path_factory, kinds, short, seed, threads):
    tmp = tmp_path_factory.mktemp("par")
    src = tmp / "file"
    content = _write_sparse(src, kinds, short, seed)
    if not content:
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "READ_BATCH_BYTES", 3 * CS)  # many batches: syncs overlap reads
        with ChunkStore(tmp / "store", threads=threads) as store:
            art, stats = store.put_file(src, chunk_size=CS)
            m = store.commit({"memory": art})
            assert art.chunks == _serial(content)
            assert stats.chunks_new == len({h for h in art.chunks if h})
            store.materialize(store.get(m.id).artifacts["memory"], tmp / "back", durable=False)
            assert (tmp / "back").read_bytes() == content
            assert store.verify().ok
            assert not list((tmp / "store" / "tmp").iterdir())


def _file(path: Path, n: int, seed: int) -> bytes:
    import random

    data = random.Random(seed).randbytes(n * CS)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("after", [1, 7, 30])
def test_enospc_in_one_write_lists_nothing_and_leaves_nothing_half_written(tmp_path, after):
    src = tmp_path / "file"
    content = _file(src, 48, after)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "READ_BATCH_BYTES", 8 * CS)
        with ChunkStore(tmp_path / "store", threads=2) as store:
            failpoints.enable("store.chunk_write", "enospc", after=after)
            try:
                with pytest.raises(TorporError) as e:
                    art, _ = store.put_file(src, chunk_size=CS)
                    store.commit({"memory": art})
                assert "No space left" in str(e.value)
            finally:
                failpoints.disable()
            assert store.list() == []  # nothing listed
            v = store.verify()  # whatever was named is whole
            assert v.ok and not v.corrupt and not v.stray
            assert not list((tmp_path / "store" / "tmp").iterdir())  # no temp file left
            # the same writer retries once the disk has room: chunks that failed are not
            # taken for written (the commit would name a chunk that is not there)
            art, _ = store.put_file(src, chunk_size=CS)
            m = store.commit({"memory": art})
            store.materialize(store.get(m.id).artifacts["memory"], tmp_path / "back")
            assert (tmp_path / "back").read_bytes() == content
            assert store.verify().ok

"""The failpoint module, and what the store and the log do when a failpoint fires.

No VMs: a store in tmp_path and an SQLite log.  The store and log cases are the
in-process versions of the campaign's ``eio-store`` / ``eio-log`` faults: an I/O
error mid-write is a typed error, and nothing written before it is lost.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor import failpoints
from torpor.context import Kind, open_log
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.store import ChunkStore


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disable()
    yield
    failpoints.disable()


def test_parse_and_env_value_round_trip() -> None:
    pts = failpoints.parse("store.chunk_write=eio@3, log.write=enospc%0.5,x=kill")
    assert (pts["store.chunk_write"].action, pts["store.chunk_write"].after) == ("eio", 3)
    assert (pts["log.write"].action, pts["log.write"].probability) == ("enospc", 0.5)
    assert pts["x"].action == "kill"
    assert failpoints.parse(failpoints.env_value({"a": "eio@2"}))["a"].after == 2
    for bad in ("nothing", "a=explode", "a=eio@0", "a=eio%2", "=eio"):
        with pytest.raises(ValueError):
            failpoints.parse(bad)


def test_hit_fires_from_the_nth_hit_with_the_callers_type() -> None:
    failpoints.hit("p")  # unarmed: nothing
    failpoints.enable("p", "eio", after=2)
    failpoints.hit("p")
    with pytest.raises(OSError) as e:
        failpoints.hit("p")
    assert e.value.errno == errno.EIO and "failpoint p" in str(e.value)
    with pytest.raises(KeyError):  # a non-OSError type gets the message only
        failpoints.hit("p", exc=KeyError)
    failpoints.disable("p")
    failpoints.hit("p")


def test_env_arms_a_child_process_and_kill_is_a_crash() -> None:
    code = "from torpor import failpoints; failpoints.hit('a'); print('after')"
    env = dict(os.environ, **{failpoints.ENV: "a=kill"})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == -9 and r.stdout == b""
    env[failpoints.ENV] = "b=kill"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == 0 and r.stdout == b"after\n"


def _file(path: Path, n: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(n * 64 * 1024))
    return path


@pytest.mark.parametrize(
    "point,after", [("store.chunk_write", 1), ("store.chunk_write", 5), ("store.manifest_write", 1)]
)
def test_store_io_error_is_typed_and_keeps_earlier_snapshots(
    tmp_path: Path, point: str, after: int
) -> None:
    with ChunkStore(tmp_path / "store") as store:
        art, _ = store.put_file(_file(tmp_path / "a", 8, 1), chunk_size=64 * 1024)
        first = store.commit({"memory": art})
        failpoints.enable(point, "eio", after=after)
        with pytest.raises(TorporError):  # a StoreError, never a bare OSError
            art2, _ = store.put_file(_file(tmp_path / "b", 8, 2), chunk_size=64 * 1024)
            store.commit({"memory": art2}, parent=first.id)
        failpoints.disable()
        assert [m.id for m in store.list()] == [first.id]
        assert store.verify().ok
        store.materialize(store.get(first.id).artifacts["memory"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == (tmp_path / "a").read_bytes()


def test_log_io_error_is_typed_and_keeps_acknowledged_entries(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "home").ensure()
    log = open_log(f"sqlite://{tmp_path / 'context.db'}", paths=paths)
    try:
        s = log.create_session("fp")
        acked = [log.append(s.id, Kind.USER, {"content": f"m{i}"}, turn=i + 1) for i in range(3)]
        failpoints.enable("log.write", "eio")
        with pytest.raises(TorporError):  # a ContextError naming the database
            log.append(s.id, Kind.USER, {"content": "lost"}, turn=4)
        failpoints.disable()
        got = log.entries(s.id)
        assert [e.payload for e in got if e.kind == Kind.USER] == [e.payload for e in acked]
        log.append(s.id, Kind.USER, {"content": "m3"}, turn=4)  # and the log still works
    finally:
        log.close()

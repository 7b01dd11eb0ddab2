"""Several processes on one log: concurrent appends, kill -9 mid-stream, follow()."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable

from tests.context.conftest import Backend, acks, spawn_writer
from torpor.context import SCHEMA_VERSION, ContextLog, Kind

WRITERS, EACH = 4, 50


def _nop() -> None:
    pass


def _go(
    backend: Backend, sid: str, tags: list[str], count: int, before_go: Callable[[], None] = _nop
) -> list[list[tuple[int, str]]]:
    """Start one burst writer per tag, release them together, return what each acked."""
    procs = [spawn_writer(backend, sid, "burst", count, tag) for tag in tags]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "READY"
        before_go()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [acks(o) for o in outs]


def test_four_processes_append_200_entries_without_gaps(backend: Backend) -> None:
    # the writers open a fresh database at once: schema creation races too
    sid = uuid.uuid4().hex

    def create() -> None:
        with backend.open() as log:
            log.create_session("shared", session_id=sid)

    acked = _go(backend, sid, [f"p{i}" for i in range(WRITERS)], EACH, before_go=create)
    with backend.open() as log:
        es = log.entries(sid)
    assert [e.seq for e in es] == list(range(1, WRITERS * EACH + 1))
    stored = {e.key: e.seq for e in es}
    for per_writer in acked:
        assert len(per_writer) == EACH
        seqs = [seq for seq, _ in per_writer]
        assert seqs == sorted(seqs)  # each writer saw its own appends in order
        assert all(stored[key] == seq for seq, key in per_writer)
    assert backend.rows() == WRITERS * EACH
    assert backend.sql("SELECT value FROM torpor_meta") == [(str(SCHEMA_VERSION),)]


def test_processes_retrying_the_same_keys_store_each_once(
    log: ContextLog, backend: Backend
) -> None:
    s = log.create_session()
    a, b = _go(backend, s.id, ["same", "same"], 40)
    assert a == b  # both got the one stored entry for every key
    assert [seq for seq, _ in a] == list(range(1, 41))
    assert backend.rows() == 40


def test_kill_9_mid_stream_loses_no_acknowledged_entry(backend: Backend) -> None:
    with backend.open() as log:
        sid = log.create_session("victim").id
    proc = spawn_writer(backend, sid, "forever", tag="k")
    assert proc.stdout is not None
    try:
        seen = []
        while len(seen) < 40:
            line = proc.stdout.readline()
            assert line, f"writer died early (rc={proc.poll()})"
            seen.append(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    acked = acks("".join(seen) + proc.stdout.read())  # lines still in the pipe were acked too
    with backend.open() as log:  # a fresh connection: SQLite recovers the WAL here
        stored = {e.seq: e.key for e in log.entries(sid)}
        assert all(stored.get(seq) == key for seq, key in acked)
        assert sorted(stored) == list(range(1, len(stored) + 1))
        # at most the one append in flight committed without being acknowledged
        assert len(acked) <= len(stored) <= len(acked) + 1
        assert log.append(sid, Kind.RESUME, {}, turn=1).seq == len(stored) + 1


def test_follow_sees_entries_appended_by_another_process(log: ContextLog, backend: Backend) -> None:
    s = log.create_session()
    proc = spawn_writer(backend, s.id, "slow", 20, "f", delay=0.01)
    got = []
    deadline = time.monotonic() + 60

    def stop() -> bool:  # once the writer is gone, follow() still drains what it wrote
        return len(got) >= 20 or proc.poll() is not None or time.monotonic() > deadline

    try:
        for e in log.follow(s.id, poll=0.02, stop=stop):
            got.append((e.seq, e.key))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got == [(i + 1, f"f-{i}") for i in range(20)]

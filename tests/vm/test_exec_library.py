"""Exec through the shim with the library client: concurrency, volume, files."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.vm


def test_concurrent_execs_through_shim(shared_vms, box) -> None:
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        with shared_vms.mgr.client(box) as c:
            r = c.exec(["sh", "-c", f"sleep 0.2; echo {i}"])
            assert r.status.code == 0
            results[i] = r.stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: f"{i}\n".encode() for i in range(12)}


def test_large_stdout_and_stdin(shared_vms, box) -> None:
    with shared_vms.mgr.client(box) as c:
        r = c.exec(["head", "-c", str(8 << 20), "/dev/zero"])
        assert len(r.stdout) == 8 << 20
        data = bytes(range(256)) * 8192
        r = c.exec(["sh", "-c", "cat > /tmp/blob; md5sum /tmp/blob"], input=data)
        import hashlib

        assert r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_guest_clock_and_identity(shared_vms, box) -> None:
    import time

    with shared_vms.mgr.client(box) as c:
        r = c.exec(["date", "+%s"])
        assert abs(int(r.stdout) - time.time()) < 60
        assert c.exec(["hostname"]).stdout == b"shared-box\n"
        assert c.exec(["cat", "/proc/1/comm"]).stdout.strip() in (b"init", b"torpor-agent")

"""Port forwards and restore / fork / start: a host port is bound by one QEMU only.

A restore or fork of a VM run with ``-p`` gets no forwards unless ``-p`` is given
again; a requested host port that is taken is a clear ConflictError (exit 4)
before QEMU starts, and a hibernated VM whose port is taken stays hibernated.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def occupied() -> Iterator[tuple[socket.socket, int]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s, int(s.getsockname()[1])
    s.close()


def _cfg_ports(ref: str) -> list[dict]:
    r = torpor_cli("inspect", ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]["Config"]["ports"]


def test_restore_and_fork_of_a_running_vm_with_ports(vms, tools_image: str) -> None:
    from torpor.vmm.manager import parse_port

    port = free_port()
    vm = vms.run(
        tools_image,
        "sleep",
        "infinity",
        name="ported",
        network=True,
        ports=(parse_port(f"{port}:80"),),
    )
    r = torpor_cli("snapshot", "create", vm.id)
    assert r.returncode == 0, r.stderr
    snap = r.stdout.decode().split()[0]

    # the source still holds the port: a plain restore gets no forwards and works
    r = torpor_cli("restore", "--name", "ported-r1", snap)
    assert r.returncode == 0, r.stderr
    vms.ids.append(r.stdout.decode().split()[-1])
    assert _cfg_ports("ported-r1") == []

    # asking for the taken port again is a clear error, and leaves no VM behind
    r = torpor_cli("restore", "--name", "ported-r2", "-p", f"{port}:80", snap)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert f"{port}".encode() in r.stderr and b"in use" in r.stderr
    assert b"QMP" not in r.stderr and b"Traceback" not in r.stderr
    assert torpor_cli("inspect", "ported-r2").returncode == 3

    # a new port works
    port2 = free_port()
    r = torpor_cli("restore", "--name", "ported-r3", "-p", f"{port2}:80", snap)
    assert r.returncode == 0, r.stderr
    vms.ids.append(r.stdout.decode().split()[-1])
    assert [p["host_port"] for p in _cfg_ports("ported-r3")] == [port2]

    # forks of it: no forwards by default
    r = torpor_cli("fork", "-n", "2", "--name-prefix", "ported-f", snap)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.decode().splitlines():
        vms.ids.append(line.split()[-1])
    assert _cfg_ports("ported-f-1") == [] and _cfg_ports("ported-f-2") == []
    # one host port cannot serve two forks
    r = torpor_cli("fork", "-n", "2", "-p", f"{free_port()}:80", snap)
    assert r.returncode == 2 and b"one host port" in r.stderr


def test_start_of_hibernated_vm_whose_port_is_taken(vms, tools_image: str) -> None:
    from torpor.vmm.manager import parse_port

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    vm = vms.run(
        tools_image,
        "sleep",
        "infinity",
        name="hib-ported",
        network=True,
        ports=(parse_port(f"{port}:80"),),
    )
    r = torpor_cli("snapshot", "create", "--stop", vm.id)
    assert r.returncode == 0, r.stderr
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", port))
        taker.listen()
        r = torpor_cli("start", vm.id)
        assert r.returncode == 4, (r.stdout, r.stderr)
        assert f"127.0.0.1:{port}".encode() in r.stderr and b"in use" in r.stderr
        assert vms.mgr.get(vm.id).state.status == "hibernated"
    r = torpor_cli("start", vm.id)
    assert r.returncode == 0, r.stderr
    assert vms.mgr.get(vm.id).state.status == "running"

"""A client that stops reading cannot make the shim hold the guest's output.

The shim relays guest frames to each client's socket; a client that stops reading
(a stalled pipe, a hostile local client) used to have every byte queued in the shim's
memory — a guest printing without end then grew the host's shim without bound.  A
client more than ``MAX_BEHIND`` behind is dropped; the guest, the other clients and
the VM go on."""

from __future__ import annotations

import socket
import time

import pytest

from torpor.agent.protocol import ExecRequest, Frame, T
from torpor.vmm import shim
from torpor.vmm.sockets import connect_unix
from torpor.vmm.state import load_state

pytestmark = pytest.mark.vm

OUT = 96 << 20  # what the guest prints: far more than a client may fall behind


def _hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_client_that_stops_reading_is_dropped_not_buffered(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "infinity", name="slow-reader")
    pid = load_state(vm.dir).shim_pid
    before = _hwm_mib(pid)
    s = connect_unix(vm.files.agent_sock)  # (the path is longer than sun_path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    cmd = f"head -c {OUT} /dev/zero; touch /tmp/printed"
    s.sendall(Frame(T.EXEC, 1, ExecRequest(("sh", "-c", cmd)).encode()).encode())
    try:
        with vms.mgr.client(vm) as c:  # another client: still served meanwhile
            deadline = time.monotonic() + 240
            while c.exec(["test", "-e", "/tmp/printed"]).status.code != 0:
                assert time.monotonic() < deadline, "the guest did not finish printing"
                time.sleep(0.5)
            assert c.exec(["echo", "ok"]).stdout == b"ok\n"
        grown = _hwm_mib(pid) - before
        assert grown < (shim.MAX_BEHIND >> 20) + 24, f"the shim grew {grown:.0f} MiB"
        got = 0  # what reached the slow client before the shim dropped it, then EOF
        s.settimeout(30)
        while chunk := s.recv(1 << 20):
            got += len(chunk)
        assert got < OUT // 2
    finally:
        s.close()

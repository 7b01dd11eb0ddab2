"""A fork's identity (hostname, and MAC when networked) set by the agent's SET_IDENTITY
request, with no process started in the guest; and the shell fallback for agents that
do not know the request (snapshots taken before it: they answer ENOSYS) — simulated on
the current agent, and with a real snapshot of an agent built without the request.

"No process started" is read from the guest's PID 1 (the agent, which reaps every
process it starts): its ``cminflt`` in /proc/1/stat grows with every reaped child
(each one faults pages in), and kernel threads are not its children.  Every read goes
through READ_FILE, which starts nothing either."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import signal
import socketserver
import threading
from collections.abc import Iterator

import pytest

from torpor.agent import AgentClient, AgentRequestError
from torpor.agent.protocol import IdentityRequest
from torpor.errors import AgentError, TorporError
from torpor.snapshot import fork, restore, snapshot
from torpor.snapshot.core import set_identity
from torpor.vmm.boot import mac_for

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def snap(shared_vms, tools_image) -> Iterator[str]:
    """A snapshot of a running networked VM (the forks get their own MAC)."""
    vm = shared_vms.run(tools_image, "sleep", "infinity", name="ident-src", network=True)
    yield snapshot(shared_vms.mgr, vm.id).manifest.id
    shared_vms.mgr.remove(vm.id, force=True)  # not kept running for the rest of the suite


def _children_faults(c: AgentClient) -> int:
    """cminflt of the guest's PID 1: minor faults of every child it has reaped."""
    stat = c.read_file("/proc/1/stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[8])


def _identity(c: AgentClient) -> tuple[str, str]:
    host = c.read_file("/proc/sys/kernel/hostname").decode().strip()
    return host, c.read_file("/sys/class/net/eth0/address").decode().strip()


def _restored(vms, snap: str, name: str):
    vm = restore(vms.mgr, snap, name=name)
    vms.ids.append(vm.id)
    return vm


def test_the_agent_sets_the_identity_without_starting_a_process(vms, snap) -> None:
    mgr = vms.mgr
    vm = _restored(vms, snap, "ident-a")
    with mgr.client(vm) as c:
        assert _identity(c)[0] == "ident-src"  # as snapshotted
        before = _children_faults(c)
        assert _children_faults(c) == before  # reading it starts nothing
    assert set_identity(mgr, vm) == "agent"
    with mgr.client(vm) as c:
        assert _children_faults(c) == before  # no process was started for it
        assert _identity(c) == ("ident-a", mac_for(vm.id))
        # the same count does move when a process runs: the check can fail
        assert c.exec(["true"]).code == 0
        assert _children_faults(c) > before
        assert c.exec(["hostname"]).stdout == b"ident-a\n"


def test_forks_get_their_own_hostname_and_mac(vms, snap) -> None:
    """...and keep their network: a fork reaches a host server through its new MAC."""
    mgr = vms.mgr
    forks = fork(mgr, snap, 2, name_prefix="ident-f")
    vms.ids.extend(f.id for f in forks)
    seen = set()
    with socketserver.TCPServer(("127.0.0.1", 0), _Hello) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://10.0.2.2:{srv.server_address[1]}/"
        try:
            for f in forks:
                with mgr.client(f) as c:
                    assert _identity(c) == (f.name, mac_for(f.id))
                    seen.add(_identity(c)[1])
                    r = c.exec(["wget", "-q", "-O", "-", url], timeout=60)
                    assert (r.code, r.stdout) == (0, b"hello fork\n"), r.stderr
        finally:
            srv.shutdown()
    assert len(seen) == 2


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b"hello fork\n")

    def log_message(self, *args: object) -> None:
        pass


def test_an_agent_without_the_request_gets_the_shell_fallback(vms, snap, monkeypatch) -> None:
    """An older agent: the real agent is sent the request under a type it does not
    know (0x7E), so it answers ENOSYS exactly as an agent before SET_IDENTITY does."""

    def old_agent(self, hostname, ifname="", mac=b"", timeout=None):
        self.request(0x7E, IdentityRequest(hostname, ifname, mac).encode(), timeout)
        raise AssertionError("the agent accepted an unknown request")

    mgr = vms.mgr
    vm = _restored(vms, snap, "ident-old")
    with mgr.client(vm) as c:
        with pytest.raises(AgentRequestError) as e:
            old_agent(c, "x", timeout=30)
        assert e.value.errno == errno.ENOSYS
        before = _children_faults(c)
    monkeypatch.setattr(AgentClient, "set_identity", old_agent)
    assert set_identity(mgr, vm) == "exec"
    with mgr.client(vm) as c:
        assert _children_faults(c) > before  # the shell ran
        host, _ = _identity(c)
        assert host == "ident-old"


def test_a_guest_that_never_answers_is_a_timeout_not_a_hang(vms, snap) -> None:
    """QEMU stopped (SIGSTOP): the agent cannot answer; set_identity gives up after its
    timeout with a clear error, and works once the guest runs again."""
    mgr = vms.mgr
    vm = _restored(vms, snap, "ident-mute")
    qemu = mgr.get(vm.id).state.qemu_pid
    assert qemu
    os.kill(qemu, signal.SIGSTOP)
    try:
        with pytest.raises(AgentError, match="timed out waiting for the reply to SET_IDENTITY"):
            set_identity(mgr, vm, timeout=2)
    finally:
        os.kill(qemu, signal.SIGCONT)
    assert set_identity(mgr, vm) == "agent"
    with mgr.client(vm) as c:
        assert _identity(c)[0] == "ident-mute"


def test_a_snapshot_of_an_agent_before_set_identity_forks_through_the_shell(
    tools_image, paths, tmp_path
) -> None:
    """A real older agent: this agent.c without its SET_IDENTITY case (it then answers
    ENOSYS, as every agent before the request does), booted in a home of its own (its
    agent cache holds that binary under the current source's key) and snapshotted."""
    import hashlib
    import shutil
    import subprocess
    from importlib import resources

    from torpor.paths import Paths
    from torpor.vmm.manager import RunRequest, VMManager

    home = Paths(tmp_path / "old-agent").ensure()
    # hard links: the kernel, the images and their (8 GiB sparse) bases are not copied;
    # the guest folder is this home's own (the old agent must not reach the session's)
    shutil.copytree(paths.guest / "kernels", home.guest / "kernels", copy_function=os.link)
    for d in ("images", "blobs"):
        shutil.copytree(paths.root / d, home.root / d, dirs_exist_ok=True, copy_function=os.link)
    code = resources.files("torpor.guest").joinpath("agent.c").read_bytes()
    case = b"\tcase T_SET_IDENTITY: handle_set_identity(id, &r); break;\n"
    assert case in code
    old = tmp_path / "old-agent.c"
    old.write_bytes(code.replace(case, b""))
    # where torpor.guest.build.ensure_agent looks for the binary of the current source
    binary = home.guest / "agent" / hashlib.sha256(code).hexdigest()[:16] / "torpor-agent"
    binary.parent.mkdir(parents=True)
    cc = shutil.which("musl-gcc") or shutil.which("gcc")
    assert cc
    subprocess.run([cc, "-static", "-O2", "-o", str(binary), str(old)], check=True)
    mgr = VMManager(home)
    made = []
    try:
        src = mgr.create(RunRequest(image=tools_image, command=("sleep", "infinity"),
                                    memory_mib=256, network=False, name="old-src"))  # fmt: skip
        made.append(src.id)
        mgr.start(src.id)
        snap = snapshot(mgr, src.id).manifest.id
        vm = restore(mgr, snap, name="old-fork")
        made.append(vm.id)
        with mgr.client(vm) as c:
            with pytest.raises(AgentRequestError) as e:  # the real old agent
                c.set_identity("old-fork", timeout=30)
            assert e.value.errno == errno.ENOSYS
            before = _children_faults(c)
        assert set_identity(mgr, vm) == "exec"
        with mgr.client(vm) as c:
            assert _children_faults(c) > before  # the shell ran
            assert c.read_file("/proc/sys/kernel/hostname") == b"old-fork\n"
    finally:
        for vm_id in made:
            with contextlib.suppress(TorporError):
                mgr.remove(vm_id, force=True)

"""The Docker-like CLI end to end, against real VMs (TCG here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from tests.waiting import wait_until
from torpor.vmm.state import alive

pytestmark = pytest.mark.vm


def _ps(all_: bool = True) -> list[dict]:
    r = torpor_cli("ps", "--format", "json", *(["-a"] if all_ else []))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _names() -> set[str]:
    return {v["Name"] for v in _ps()}


def test_run_rm_streams_and_exits_with_code(tools_image: str) -> None:
    r = torpor_cli(
        "run",
        "--rm",
        "--name",
        "rm-test",
        tools_image,
        "sh",
        "-c",
        "echo out; echo err >&2; uname -s; exit 3",
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"out\nLinux\n"
    assert b"err\n" in r.stderr
    assert "rm-test" not in _names()


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is frozen by SIGSTOP (a ``stop`` failpoint)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"T"
    except OSError:
        return False


def test_run_rm_reports_a_command_that_ended_before_it_attached(tools_image: str) -> None:
    """The command ends and its VM's shim stops listening before `torpor run` attaches,
    and the exit is recorded only a moment later (QEMU's last console words): run waits
    for the record and exits with the command's code, and removes the VM.  It failed
    with 125, "cannot reach VM" (seen once in CI), and the shim's own --rm could take
    the exit away with the record."""
    from torpor.paths import Paths
    from torpor.vmm.manager import VMManager

    name = f"attach-race-{os.getpid()}"
    env = dict(
        os.environ,
        TORPOR_NO_ZYGOTE="1",  # a shim spawned with this environment (its failpoint)
        TORPOR_FAILPOINTS="cli.attach=stop,shim.exiting=stop",
    )
    env.pop("TORPOR_DEBUG", None)
    cmd = [sys.executable, "-m", "torpor.cli.main", "run", "--rm", "--name", name]
    p = subprocess.Popen(
        [*cmd, tools_image, "sh", "-c", "exit 3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    mgr = VMManager(Paths.default())
    shim = 0
    try:
        wait_until(lambda: _stopped(p.pid), "torpor run to stop before attaching", 120)
        shim = wait_until(
            lambda: next((v.state.shim_pid for v in mgr.list() if v.name == name), 0),
            "the VM's record",
            120,
        )
        wait_until(lambda: _stopped(shim), "the shim to stop with the exit unrecorded", 120)
        assert mgr.get(name).state.status.active  # the window: no agent, no exit yet
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert p.poll() is None, p.communicate()[1]  # waiting for the exit's record
        os.kill(shim, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 3, err
    finally:
        for pid in (p.pid, shim):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert name not in _names()


def test_run_missing_command_is_127(tools_image: str) -> None:
    r = torpor_cli("run", "--rm", tools_image, "no-such-command")
    assert r.returncode == 127
    assert b"no-such-command" in r.stderr


def test_run_stdin(tools_image: str) -> None:
    r = torpor_cli(
        "run", "--rm", "-i", tools_image, "sh", "-c", "wc -c; cat >/dev/null", input=b"x" * 100_000
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"100000"


def test_detached_lifecycle(tools_image: str, tmp_path: Path) -> None:
    r = torpor_cli(
        "run",
        "-d",
        "--name",
        "box",
        "-m",
        "384M",
        "--cpus",
        "2",
        "-e",
        "K=V",
        tools_image,
        "sh",
        "-c",
        "echo started; exec sleep 1000",
    )
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.decode().strip()
    assert len(vm_id) == 64
    try:
        # the resources asked for
        r = torpor_cli("exec", "box", "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
        nproc, mem = r.stdout.decode().splitlines()
        assert nproc == "2"
        assert 300_000 < int(mem.split()[1]) <= 384 * 1024  # kB, minus kernel reservations
        # exec with a shell, env from run -e, and files on disk
        r = torpor_cli("exec", "box", "sh", "-c", "echo hi > /root/f; cat /root/f; echo $K")
        assert (r.returncode, r.stdout) == (0, b"hi\nV\n"), r.stderr
        # stdin into exec -i
        r = torpor_cli("exec", "-i", "box", "sh", "-c", "cat > /tmp/in", input=b"data\n")
        assert r.returncode == 0, r.stderr
        assert torpor_cli("exec", "box", "cat", "/tmp/in").stdout == b"data\n"
        # exit code and user
        assert torpor_cli("exec", "box", "sh", "-c", "exit 42").returncode == 42
        r = torpor_cli("exec", "-u", "app", "box", "id", "-u")
        assert r.stdout == b"1000\n", r.stderr
        r = torpor_cli("exec", "-w", "/tmp", "box", "pwd")
        assert r.stdout == b"/tmp\n"
        # cp both ways, file and folder
        local = tmp_path / "local.txt"
        local.write_bytes(b"hello from the host\n")
        assert torpor_cli("cp", str(local), "box:/root/").returncode == 0
        assert (
            torpor_cli("exec", "box", "cat", "/root/local.txt").stdout == b"hello from the host\n"
        )
        out = tmp_path / "f"
        r = torpor_cli("cp", "box:/root/f", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == b"hi\n"
        d = tmp_path / "dir"
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "a").write_text("A\n")
        os.symlink("sub/a", d / "link")
        assert torpor_cli("cp", str(d), "box:/srv/dir").returncode == 0
        r = torpor_cli("exec", "box", "sh", "-c", "cat /srv/dir/sub/a; readlink /srv/dir/link")
        assert r.stdout == b"A\nsub/a\n"
        back = tmp_path / "back"
        assert torpor_cli("cp", "box:/srv/dir", str(back)).returncode == 0
        assert (back / "sub" / "a").read_text() == "A\n"
        assert os.readlink(back / "link") == "sub/a"
        # ps / inspect / logs
        info = json.loads(torpor_cli("inspect", "box").stdout)[0]
        assert info["State"]["status"] == "running"
        # what each accelerator isolates, spelled out here rather than read from torpor
        isolation = {
            "kvm": "hardware (KVM)",
            "tcg": "none (TCG emulation is not a security boundary)",
        }
        assert info["Isolation"] == isolation[info["Accelerator"]], info
        assert torpor_cli("logs", "box").stdout == b"started\n"
        r = torpor_cli("ps")
        assert b"box" in r.stdout and b"Up" in r.stdout
        # stop keeps the disk; start boots again
        assert torpor_cli("stop", "-t", "2", "box").returncode == 0
        st = next(v for v in _ps() if v["Name"] == "box")["State"]
        assert st["status"] == "exited"
        assert torpor_cli("exec", "box", "true").returncode == 125
        assert torpor_cli("start", "box").returncode == 0
        assert torpor_cli("exec", "box", "cat", "/root/f").stdout == b"hi\n"
        # rm without -f refuses a running VM, with -f cleans every file
        r = torpor_cli("rm", "box")
        assert r.returncode == 4 and b"running" in r.stderr
        assert torpor_cli("rm", "-f", "box").returncode == 0
        assert "box" not in _names()
        assert not any(vm_id in p for p in os.listdir(Path(os.environ["TORPOR_HOME"]) / "vms"))
    finally:
        torpor_cli("rm", "-f", "box")


def test_name_conflict(vms, tools_image: str) -> None:
    vms.run(tools_image, "sleep", "1000", name="taken")
    r = torpor_cli("run", "-d", "--name", "taken", tools_image, "true")
    assert r.returncode == 125
    assert b"already in use" in r.stderr


def test_port_forward(vms, tools_image: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from torpor.vmm.manager import parse_port

    vm = vms.run(
        tools_image,
        "sh",
        "-c",
        "mkdir -p /srv/www && echo served > /srv/www/index.html && "
        "exec httpd -f -p 8080 -h /srv/www",
        network=True,
        ports=(parse_port(f"{port}:8080"),),
    )
    deadline = time.monotonic() + 60
    body = b""
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            break
        except OSError:
            time.sleep(0.2)
    assert body == b"served\n"
    assert vm.state.accel


def test_ps_tells_truth_after_supervisor_kill9(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "1000", name="victim")
    os.kill(vm.state.shim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(vm.state.qemu_pid, vm.state.qemu_start):
        time.sleep(0.05)
    v = next(v for v in _ps() if v["Name"] == "victim")
    assert v["State"]["status"] == "dead"
    # QEMU dies with its supervisor (PR_SET_PDEATHSIG): no VM runs unmanaged
    assert not alive(vm.state.qemu_pid, vm.state.qemu_start)
    # and it can be started again
    assert torpor_cli("start", "victim").returncode == 0
    assert torpor_cli("exec", "victim", "true").returncode == 0


def test_qemu_killed_is_recorded(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "1000", name="crashy")
    os.kill(vm.state.qemu_pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = next(v for v in _ps() if v["Name"] == "crashy")["State"]
        if st["status"] == "exited":
            break
        time.sleep(0.1)
    assert st["status"] == "exited"
    assert "QEMU exited unexpectedly" in st["error"]


def test_main_exit_stops_vm(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sh", "-c", "echo bye; exit 7", name="short")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = next(v for v in _ps() if v["Name"] == "short")["State"]
        if st["status"] == "exited":
            break
        time.sleep(0.1)
    assert (st["status"], st["exit_code"]) == ("exited", 7)
    assert torpor_cli("logs", "short").stdout == b"bye\n"
    assert not os.path.exists(vm.files.ram)


def test_ctrl_c_reaches_the_guest_process(tools_image: str) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "run",
            "--rm",
            "--name",
            "sigint",
            tools_image,
            "sh",
            "-c",
            "trap 'echo got-int; exit 130' INT; echo ready; while true; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert b"got-int" in out, err
        assert p.returncode == 130
    finally:
        if p.poll() is None:
            p.kill()
        torpor_cli("rm", "-f", "sigint")


def test_kill9_cli_during_boot_leaves_consistent_state(tools_image: str) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "run",
            "--name",
            "orphan",
            tools_image,
            "sleep",
            "1000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    home = Path(os.environ["TORPOR_HOME"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (home / "vms" / "names" / "orphan").is_symlink():
        time.sleep(0.01)
    p.kill()
    p.wait()
    try:
        # the VM outlives its CLI (Docker semantics), or the interrupted create is
        # invisible and cleaned up: never half-listed, and the name is not stuck
        for v in _ps():
            if v["Name"] == "orphan":
                assert v["State"]["status"] in ("created", "starting", "running", "exited", "dead")
                assert torpor_cli("rm", "-f", "orphan").returncode == 0
        assert "orphan" not in _names()
        vms_dir = home / "vms"
        assert all((d / "vm.json").exists() for d in vms_dir.iterdir() if d.name != "names")
        r = torpor_cli("run", "--rm", "--name", "orphan", tools_image, "true")
        assert r.returncode == 0, r.stderr
    finally:
        torpor_cli("rm", "-f", "orphan")


def test_exec_interrupted_and_killed(box) -> None:
    # Ctrl-C on `torpor exec` reaches the process in the VM
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "exec",
            "shared-box",
            "sh",
            "-c",
            "trap 'echo got-int; exit 130' INT; echo ready; while true; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert b"got-int" in out and p.returncode == 130
    # kill -9 of the CLI mid-exec: the VM and its other clients are unaffected
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "exec",
            "shared-box",
            "sh",
            "-c",
            "echo ready; sleep 1000",
        ],
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.kill()
    p.wait()
    r = torpor_cli("exec", "shared-box", "echo", "still-here")
    assert (r.returncode, r.stdout) == (0, b"still-here\n")


def test_vm_files_are_private(box) -> None:
    import stat

    assert stat.S_IMODE(os.stat(box.dir).st_mode) == 0o700
    for name in ("agent.sock", "ctl.sock", "qmp.sock"):
        mode = os.stat(box.dir / name).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0, name

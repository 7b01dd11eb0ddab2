"""QEMU's jail (torpor.vmm.jail), on real VMs: on by default as root, no capabilities,
an unprivileged uid, its own PID and mount namespaces with only its own files, the
cgroup limits ``inspect`` reports; snapshot, restore and fork keep working.  And the
TCG policy for multi-tenant entry points."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from tests.snapshot.counter import COUNTER, count
from torpor.errors import TCGRefusedError
from torpor.snapshot import restore, snapshot
from torpor.vmm import jail

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root"),
]


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _track(vms, vm):
    vms.ids.append(vm.id)
    return vm


def _qemu_pid(mgr, vm) -> int:
    pid = mgr.get(vm.id).state.qemu_pid
    assert pid > 0
    return pid


def test_qemu_runs_unprivileged_alone_and_limited(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    a = vms.run(tools_image, "sleep", "1000", name="jail-a")
    b = vms.run(tools_image, "sleep", "1000", name="jail-b")
    pa, pb = _qemu_pid(mgr, a), _qemu_pid(mgr, b)
    st = _status(pa)
    # no capabilities at all, and not root
    for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[k], 16) == 0, (k, st[k])
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    assert 0 not in uids and 0 not in gids and len(uids) == 1
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's own sandbox is still on
    # each VM its own uid
    assert {int(x) for x in _status(pb)["Uid"].split()} != uids
    # its own PID namespace (QEMU is PID 1 there) and mount namespace
    for ns in ("pid", "mnt"):
        assert os.readlink(f"/proc/{pa}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        assert os.readlink(f"/proc/{pa}/ns/{ns}") != os.readlink(f"/proc/{pb}/ns/{ns}")
    assert st["NSpid"].split()[-1] == "1"
    # no guest network (network=False): no host network either
    assert os.readlink(f"/proc/{pa}/ns/net") != os.readlink("/proc/self/ns/net")
    # from QEMU's view: its own disk and RAM file, nothing of the other VM, no home
    root = Path(f"/proc/{pa}/root")
    a_files, b_files = mgr.get(a.id).files, mgr.get(b.id).files
    assert (root / str(a_files.disk).lstrip("/")).exists()
    assert (root / str(a_files.ram).lstrip("/")).exists()
    assert not (root / str(b_files.dir).lstrip("/")).exists()
    assert not (root / str(b_files.ram).lstrip("/")).exists()
    assert not (root / str(b_files.disk).lstrip("/")).exists()
    assert not (root / str(paths.root / "store").lstrip("/")).exists()
    assert not (root / "etc/passwd").exists()
    # the shared read-only files stay private on the host (owner-only, root) and are
    # readable in the jail because an idmapped bind shows them owned by QEMU's uid
    qcfg = mgr.get(a.id).config
    base = mgr.images.get(qcfg.image_id).disk_path
    host = base.stat()
    assert host.st_uid == 0 and host.st_mode & 0o077 == 0
    assert (root / str(base).lstrip("/")).stat().st_uid in uids
    # the guest still works through the passed sockets and the console fd
    with mgr.client(a) as c:
        assert c.exec(["echo", "hi"]).stdout == b"hi\n"
    assert a_files.console_log.stat().st_size > 0
    # inspect says what was applied, and it is what the kernel shows
    r = torpor_cli("inspect", a.id)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)[0]["Jail"]
    assert info["applied"] is True and info["uid"] in uids
    cg = info["cgroup"]
    assert cg["version"] in ("v1", "v2", "none")
    if cg["version"] != "none":
        assert cg["limits"], cg
        # the shim moves QEMU into them on a thread right after the spawn
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            str(pa) in Path(d, "cgroup.procs").read_text().split() for d in cg["dirs"]
        ):
            time.sleep(0.05)
        own = Path(f"/proc/{pa}/cgroup").read_text()
        for d in cg["dirs"]:
            assert str(pa) in Path(d, "cgroup.procs").read_text().split()
            assert d.split("/torpor/", 1)[1] in own
        assert "join_errors" not in jail.describe(a_files.dir)["cgroup"]
        mem = int(cg["limits"]["memory"])
        assert mem == 256 * (1 << 20) + jail.MEM_OVERHEAD
        for d in cg["dirs"]:
            for f in ("memory.limit_in_bytes", "memory.max"):
                if Path(d, f).exists():
                    assert int(Path(d, f).read_text()) == mem
            if Path(d, "pids.max").exists():
                assert Path(d, "pids.max").read_text().strip() == str(jail.PIDS_MAX)
            if Path(d, "cpu.cfs_quota_us").exists():  # v1; v2: cpu.max
                assert Path(d, "cpu.cfs_quota_us").read_text().strip() == "100000"
            if Path(d, "cpu.max").exists():
                assert Path(d, "cpu.max").read_text().split() == ["100000", "100000"]
        assert cg["limits"].get("cpu") in (None, "1 CPU")


def test_cli_started_vm_is_jailed_and_works(vms, tools_image) -> None:
    """Through the real CLI (umask 077, possibly the zygote): the jail's own folders
    must still be traversable by QEMU's uid (they were not: QEMU could not open its
    disk or /dev/null)."""
    r = torpor_cli("run", "-d", "--name", "jail-cli", tools_image, "sleep", "1000")
    vm_id = r.stdout.decode().strip()
    if vm_id:
        vms.ids.append(vm_id)
    assert r.returncode == 0, r.stderr
    r = torpor_cli("exec", "jail-cli", "echo", "hi")
    assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr
    pid = _qemu_pid(vms.mgr, vms.mgr.get(vm_id))
    st = _status(pid)
    assert int(st["CapEff"], 16) == 0 and st["Uid"].split()[0] != "0"
    # with a guest network (the default), user networking needs the host's
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")


def test_snapshot_restore_and_fork_jailed(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="jail-src")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo on-disk > /root/disk.txt"])
    snap = snapshot(mgr, vm.id).manifest.id
    forks = [_track(vms, restore(mgr, snap, name=f"jail-fork-{i}")) for i in range(2)]
    pids = set()
    for i, f in enumerate(forks):
        n = count(mgr, f)
        assert n >= 0
        with mgr.client(f) as c:
            assert c.exec(["cat", "/root/disk.txt"]).stdout == b"on-disk\n"
            c.exec(["sh", "-c", f"echo {i} > /root/mine"])
        pid = _qemu_pid(mgr, f)
        st = _status(pid)
        assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
        assert st["NSpid"].split()[-1] == "1"
        pids.add(pid)
    assert len(pids) == 2
    for i, f in enumerate(forks):
        with mgr.client(f) as c:
            assert c.exec(["cat", "/root/mine"]).stdout == f"{i}\n".encode()
    # a jailed fork can itself be snapshotted and restored
    again = _track(vms, restore(mgr, snapshot(mgr, forks[0].id).manifest.id, name="jail-again"))
    with mgr.client(again) as c:
        assert c.exec(["cat", "/root/mine"]).stdout == b"0\n"


def test_opt_out_runs_qemu_unjailed_and_says_so(vms, tools_image, monkeypatch) -> None:
    monkeypatch.setenv("TORPOR_JAIL", "0")
    monkeypatch.setenv("TORPOR_NO_ZYGOTE", "1")
    vm = vms.run(tools_image, "sleep", "1000", name="no-jail")
    st = _status(_qemu_pid(vms.mgr, vm))
    assert st["Uid"].split()[0] == "0"
    d = jail.describe(vms.mgr.get(vm.id).files.dir)
    assert d["applied"] is False and "TORPOR_JAIL=0" in d["reason"]
    # the CLI flag, and what info / inspect say
    monkeypatch.delenv("TORPOR_JAIL")
    r = torpor_cli("--no-jail", "run", "-d", "--name", "no-jail-cli", tools_image, "sleep", "99")
    assert r.returncode == 0, r.stderr
    vms.ids.append(r.stdout.decode().strip())
    r = torpor_cli("inspect", "no-jail-cli")
    assert json.loads(r.stdout)[0]["Jail"]["applied"] is False
    st = _status(_qemu_pid(vms.mgr, vms.mgr.get("no-jail-cli")))
    assert st["Uid"].split()[0] == "0"
    assert "--no-jail" in torpor_cli("--help").stdout.decode()
    info = torpor_cli("info").stdout.decode()
    assert "jail           on" in info and "multi-tenant TCG refused" in info


def test_multi_tenant_entry_points_refuse_tcg_without_opt_in(monkeypatch) -> None:
    monkeypatch.delenv("TORPOR_ALLOW_TCG", raising=False)
    with pytest.raises(TCGRefusedError):
        jail.check_tcg_allowed("tcg", multi_tenant=True)
    jail.check_tcg_allowed("tcg", multi_tenant=True, allow_tcg=True)
    jail.check_tcg_allowed("tcg", multi_tenant=False)
    jail.check_tcg_allowed("kvm", multi_tenant=True)
    monkeypatch.setenv("TORPOR_ALLOW_TCG", "1")
    jail.check_tcg_allowed("tcg", multi_tenant=True)
    monkeypatch.setenv("TORPOR_ALLOW_TCG", "0")
    with pytest.raises(TCGRefusedError):
        jail.check_tcg_allowed("tcg", multi_tenant=True)


def test_without_root_no_jail_is_said_and_forcing_it_fails(tmp_path) -> None:
    """As an unprivileged user (setpriv, a real process): no jail, and every entry point
    says so; TORPOR_JAIL=1 is an error rather than a silent downgrade."""
    import subprocess
    import sys

    code = (
        "from torpor.vmm import jail; import os; print(jail.host_summary());"
        "os.environ['TORPOR_JAIL']='1'\n"
        "try: jail.wanted()\nexcept Exception as e: print(type(e).__name__)"
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "TORPOR_JAIL"},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "not applied: torpor is not running as root (QEMU runs as this user)"
    assert lines[1] == "JailError"


def test_a_backing_file_outside_the_images_is_refused(vms, tools_image, tmp_path) -> None:
    """The overlay's header is writable by (a taken-over) QEMU: a backing file it names
    must never be made readable for, or bound into, the jail."""
    import subprocess

    from torpor.errors import VMError
    from torpor.vmm.manager import RunRequest

    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    secret.chmod(0o600)
    before = secret.stat()
    vm = vms.mgr.create(
        RunRequest(image=tools_image, command=("true",), memory_mib=256, network=False)
    )
    vms.ids.append(vm.id)
    disk = vms.mgr.get(vm.id).files.disk
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(disk)],
        check=True,
    )
    with pytest.raises(VMError, match="not an image's base disk"):
        vms.mgr.start(vm.id)
    after = secret.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )

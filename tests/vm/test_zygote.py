"""VM starts through the pre-started shim (zygote), without it, and with a stale one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import torpor.vmm.zygote as zygote_mod
from torpor.vmm import zygote

pytestmark = pytest.mark.vm


def _sock(paths) -> Path:
    return paths.root / "locks" / zygote.SOCK_NAME


def _wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _echo(mgr, vm) -> bytes:
    with mgr.client(vm) as c:
        return c.exec(["echo", "hi"]).stdout


def _shim_cmdline(vm) -> bytes:
    return Path(f"/proc/{vm.state.shim_pid}/cmdline").read_bytes()


def test_starts_with_and_without_the_zygote(vms, tools_image, paths, monkeypatch) -> None:
    mgr = vms.mgr
    monkeypatch.delenv("TORPOR_NO_ZYGOTE", raising=False)
    b = vms.run(tools_image, "sleep", "1000", name="maybe-zygote")  # starts one if absent
    assert _echo(mgr, b) == b"hi\n"
    assert _wait_for(_sock(paths).exists)
    # now served by the zygote: the shim is forked from it, not exec'd
    c = vms.run(tools_image, "sleep", "1000", name="from-zygote")
    assert _echo(mgr, c) == b"hi\n"
    assert b"torpor.vmm.zygote" in _shim_cmdline(c)
    # TORPOR_NO_ZYGOTE bypasses the zygote that is there: the shim is exec'd
    monkeypatch.setenv("TORPOR_NO_ZYGOTE", "1")
    a = vms.run(tools_image, "sleep", "1000", name="no-zygote")
    assert _echo(mgr, a) == b"hi\n"
    assert _sock(paths).exists()
    shim_cmd = _shim_cmdline(a)
    assert b"torpor.vmm.launch" in shim_cmd and b"torpor.vmm.zygote" not in shim_cmd


def test_a_stale_zygote_is_never_used(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    first = vms.run(tools_image, "sleep", "1000", name="warm-up")
    assert _wait_for(_sock(paths).exists)
    # a torpor source file changes on disk: the zygote must not run its old code
    src = Path(zygote_mod.__file__)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        vm = vms.run(tools_image, "sleep", "1000", name="after-edit")
        assert _echo(mgr, vm) == b"hi\n"
        assert b"torpor.vmm.launch" in _shim_cmdline(vm)  # the fallback, not the stale zygote
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _echo(mgr, first) == b"hi\n"


def _late_imports(vm) -> list[str]:
    """The shim's own report: modules it imported after the zygote's fork."""
    lines = [
        ln for ln in vm.files.shim_log.read_text().splitlines() if "imported after the zygote" in ln
    ]
    assert lines, "the shim did not report its imports (not forked by the zygote?)"
    return lines


def test_a_forked_shim_imports_nothing_itself(vms, tools_image, paths, monkeypatch) -> None:
    """Boot and restore (guest RAM private over a shared base: the RAM-less capture, the
    jail, the stream parser) through the zygote: every module the shim needs on its way
    to "ready" was imported by the zygote — none is loaded again per start."""
    from torpor.snapshot import restore, snapshot

    mgr = vms.mgr
    monkeypatch.delenv("TORPOR_NO_ZYGOTE", raising=False)
    vms.run(tools_image, "true", name="zygote-warm-up")  # starts one if absent
    assert _wait_for(_sock(paths).exists)
    src = vms.run(tools_image, "sleep", "1000", name="imports-boot")
    assert b"torpor.vmm.zygote" in _shim_cmdline(src)
    assert _late_imports(src)[-1].endswith("ready: 0 modules imported after the zygote's fork")
    snap = snapshot(mgr, src.id).manifest.id
    vm = restore(mgr, snap, name="imports-restore")
    vms.ids.append(vm.id)
    assert b"torpor.vmm.zygote" in _shim_cmdline(vm)
    assert _echo(mgr, vm) == b"hi\n"
    assert _late_imports(vm)[-1].endswith("ready: 0 modules imported after the zygote's fork")


def test_vms_running_reads_each_vms_shim(tmp_path) -> None:
    """The zygote's "a VM of this root runs" check: a VM folder whose recorded shim is
    this process (alive, same start time) counts; a dead or reused pid, a staging
    folder, an unreadable or absent state does not."""
    import json

    from torpor.vmm.state import Status, VMState, proc_start_time

    def state(pid: int, start: int) -> str:
        st = VMState(status=Status.RUNNING, shim_pid=pid, shim_start=start)
        return json.dumps(st.to_json())

    vms = tmp_path / "vms"
    vms.mkdir()
    assert not zygote.vms_running(vms)
    me = os.getpid()
    for name, pid, start in (
        ("dead", 2**22 + 7, 1),
        ("reused", me, proc_start_time(me) + 1),
        (".new-staged", me, proc_start_time(me)),
    ):
        (vms / name).mkdir()
        (vms / name / "state.json").write_text(state(pid, start))
    (vms / "garbled").mkdir()
    (vms / "garbled" / "state.json").write_text("{")
    (vms / "no-state").mkdir()
    assert not zygote.vms_running(vms)
    (vms / "live").mkdir()
    (vms / "live" / "state.json").write_text(state(me, proc_start_time(me)))
    assert zygote.vms_running(vms)


def test_the_zygote_stays_while_a_vm_of_its_root_runs(vms, tools_image, paths) -> None:
    """Idle only counts once no VM of the root runs: a session's recovery (or any
    restore) after a long quiet turn must not pay for a cold shim — the thesis harness
    saw +40 ms per recovery after a long prefill, its zygote gone."""
    import subprocess
    import sys

    vm = vms.run(tools_image, "sleep", "1000", name="keeps-the-zygote")
    z = subprocess.Popen(
        [sys.executable, "-m", "torpor.vmm.zygote", "--root", str(paths.root)],
        env={**os.environ, "TORPOR_ZYGOTE_IDLE": "1"},
    )
    try:
        assert _wait_for(_sock(paths).exists)
        time.sleep(8)  # past its idle time and a turn of its loop (5 s)
        assert z.poll() is None, "the zygote left while a VM of its root ran"
        assert _echo(vms.mgr, vm) == b"hi\n"
    finally:
        z.terminate()
        z.wait(timeout=30)

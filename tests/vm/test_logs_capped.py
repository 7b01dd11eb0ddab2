"""A guest cannot fill the host's disk through its logs (issue 9, defect 5).

A main command that prints without end, and a guest that floods its serial
console, keep at most ``max-file`` files of about ``max-size`` each; ``logs``,
``logs --console`` and ATTACH's replay still read across the rotated files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm

MAX_SIZE = 64 * 1024
RECORD_MAX = 200 * 1024  # one JSON record: up to 64 KiB of output, escaped


def _files(vm_dir: Path, name: str) -> list[Path]:
    return sorted(p for p in vm_dir.iterdir() if p.name == name or p.name.startswith(name + "."))


def _wait(pred, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_endless_output_and_console_flood_are_capped(vms, tools_image: str) -> None:
    r = torpor_cli(
        "run", "-d", "--name", "chatty", "-m", "256M", "--network", "none",
        "--log-opt", f"max-size={MAX_SIZE // 1024}k", "--log-opt", "max-file=3",
        tools_image, "sh", "-c", "i=0; while :; do echo line $i; i=$((i+1)); done",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    vm = vms.mgr.get("chatty")
    vms.ids.append(vm.id)
    cfg = json.loads(torpor_cli("inspect", "chatty").stdout)[0]["Config"]
    assert (cfg["log_max_size"], cfg["log_max_files"]) == (MAX_SIZE, 3)

    # the console too: the guest writes to its serial port without end
    r = torpor_cli(
        "exec", "-d", "chatty", "sh", "-c", "while :; do echo console-flood-$$ > /dev/ttyS0; done"
    )
    assert r.returncode == 0, r.stderr

    # several rotations of each
    def rotated_past(name: str) -> bool:
        p = vm.dir / f"{name}.2"
        return p.exists() and p.stat().st_mtime < (vm.dir / name).stat().st_mtime

    _wait(lambda: rotated_past("main.log"), "main.log to rotate twice")
    _wait(lambda: rotated_past("console.log"), "console.log to rotate twice")
    first_oldest = (vm.dir / "main.log.2").read_bytes()[:200]
    _wait(lambda: (vm.dir / "main.log.2").read_bytes()[:200] != first_oldest, "another rotation")

    for name in ("main.log", "console.log"):
        files = _files(vm.dir, name)
        assert [p.name for p in files] == [name, f"{name}.1", f"{name}.2"], files
        total = sum(p.stat().st_size for p in files)
        assert total <= 3 * MAX_SIZE + RECORD_MAX, (name, total)

    # logs reads every kept file, oldest first, and the lines are contiguous
    r = torpor_cli("logs", "chatty")
    assert r.returncode == 0, r.stderr
    nums = [int(x.split()[1]) for x in r.stdout.decode().splitlines() if x.startswith("line ")]
    assert len(nums) > 1000
    assert nums == list(range(nums[0], nums[0] + len(nums)))
    assert nums[0] > 0  # the oldest output was dropped, not kept without bound

    r = torpor_cli("logs", "--console", "chatty")
    assert r.returncode == 0 and b"console-flood-" in r.stdout
    assert len(r.stdout) <= 3 * MAX_SIZE + RECORD_MAX


def test_attach_replays_across_rotated_files(vms, tools_image: str) -> None:
    from torpor.vmm.logfile import LogLimits

    vm = vms.run(
        tools_image, "sh", "-c", "seq 1 30000; sleep infinity", name="replayer",
        log_limits=LogLimits(16384, 4),
    )  # fmt: skip
    _wait(lambda: b'30000\\n"' in (vm.dir / "main.log").read_bytes(), "the output")  # JSON
    assert (vm.dir / "main.log.3").exists() and not (vm.dir / "main.log.4").exists()
    with vms.mgr.client(vm) as c:
        h = c.attach()
        got = b""
        for _kind, data in h.events(timeout=60):
            got += data
            if got.endswith(b"30000\n"):
                break
    # exactly what the kept files hold, oldest first (the guest's output is done)
    kept = b"".join(
        json.loads(line)["d"].encode()
        for n in (3, 2, 1, 0)
        for line in (vm.dir / ("main.log" + (f".{n}" if n else ""))).read_text().splitlines()
    )
    assert got == kept
    # the oldest kept record may start mid-number (the guest's chunks cut anywhere)
    nums = [int(x) for x in got.split()][1:]
    assert nums[-1] == 30000 and nums[0] > 1
    assert nums == list(range(nums[0], 30001))
    # and the library's logs() agrees with the replay
    logged = b"".join(d for _t, _s, d in vms.mgr.logs(vm.id))
    assert logged == got


def test_logs_follow_reads_on_across_rotations(vms, tools_image: str) -> None:
    from torpor.vmm.logfile import LogLimits

    script = "i=0; while :; do echo line $i; i=$((i+1)); usleep 2000; done"
    vm = vms.run(tools_image, "sh", "-c", script, name="follower", log_limits=LogLimits(8192, 3))
    got = b""
    for _t, _s, data in vms.mgr.logs(vm.id, follow=True, poll=0.05):
        got += data  # a record can end mid-line
        if got.count(b"\n") >= 3000:
            break
    lines = got.decode().splitlines()[:3000]
    nums = [int(x.split()[1]) for x in lines]
    assert nums == list(range(nums[0], nums[0] + len(nums)))  # nothing lost or repeated
    assert (vm.dir / "main.log.2").exists()  # and it did rotate under the follower


def test_restored_vm_whose_main_command_prints(vms, tools_image: str) -> None:
    """Output arriving between the restored guest's resume and the shim's HELLO must be
    logged, not crash the shim's guest reader (then every request hung)."""
    from torpor.snapshot import restore, snapshot

    script = "i=0; while :; do echo tick $i; i=$((i+1)); done"
    vm = vms.run(tools_image, "sh", "-c", script, name="ticker")
    snap = snapshot(vms.mgr, vm.id).manifest.id
    for _ in range(3):
        new = restore(vms.mgr, snap)
        vms.ids.append(new.id)
        with vms.mgr.client(new) as c:
            assert c.exec(["echo", "alive"], timeout=60).stdout == b"alive\n"
        assert any(d for _t, _s, d in vms.mgr.logs(new.id))

"""Killing a VM's processes by (pid, start time) — torpor.vmm.manager.kill_and_wait:
a pid whose process is no longer the one recorded (its start time differs: the pid was
reused) is neither signalled nor waited for."""

from __future__ import annotations

import subprocess
import threading

from torpor.vmm.manager import kill_and_wait
from torpor.vmm.state import proc_start_time


def test_a_reused_pid_is_neither_killed_nor_waited_for() -> None:
    ours = subprocess.Popen(["sleep", "600"])
    other = subprocess.Popen(["sleep", "600"])  # stands for a process that reused a pid
    try:
        start = proc_start_time(ours.pid)
        wrong = proc_start_time(other.pid) + 1  # what a VM's state recorded for the pid
        done = threading.Event()
        t = threading.Thread(
            target=lambda: (
                kill_and_wait([(ours.pid, start), (other.pid, wrong)], timeout=600),
                done.set(),
            ),
            daemon=True,
        )
        t.start()
        # returns once the recorded process is gone: the other one is not waited for
        assert ours.wait(timeout=60) == -9
        t.join(timeout=60)
        assert done.is_set(), "kill_and_wait waits for a process it did not kill"
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()
        ours.kill()
        ours.wait()

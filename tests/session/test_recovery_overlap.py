"""A recovery's model call does not wait for the VM (issue 13 §1).

The replayed turn's first step reads only the log, so the checkpoint's restore runs
in a thread beside it; the turn waits for the VM at its first tool call (or its
checkpoint).  The ``vm`` entry is logged then, after the model's entries, and the
restored VM carries the session's label, so a VM restored by a recovery that was
killed before it could log it is found and removed by the next one.

Checked here on one real session: the recovery's first model call comes before the
``vm`` entry; the tool then runs on the restored VM (the pre-crash guest: a file, a
running process); a recovery killed with ``kill -9`` while its model call waits,
after its restore finished, leaves a labelled VM that the next recovery removes,
which ends with exactly one VM of the session, running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.session.test_recovery_oneoff import _crash, _exec
from torpor.model import ModelResponse, ScriptedModel, ToolCall
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.core import LABEL
from torpor.vmm.manager import VMManager
from torpor.vmm.state import Status

pytestmark = pytest.mark.vm

SETUP = (
    "mkdir -p /work && echo kept > /work/f && "
    "setsid sh -c 'echo $$ > /work/bg.pid; exec sleep 100000' </dev/null >/dev/null 2>&1 & "
    "while [ ! -s /work/bg.pid ]; do sleep 0.01; done; echo ok"
)
PROBE = "cat /work/f; p=$(cat /work/bg.pid); kill -0 $p && echo alive $p"

# a child that recovers with a model whose first call blocks: killed there
CHILD = """
import sys, time
from torpor.model import ScriptedModel
from torpor.session import Session
name, dsn = sys.argv[1:3]
def step(turn, index, messages):
    print("MODEL", flush=True)
    time.sleep(600)
s = Session.open(name, dsn=dsn, model=ScriptedModel(step, name="blocked"))
s.recover()
"""


def _step(seen: list[str], calls: list[list[str]]) -> Any:
    """Step 0: a shell tool call printing PROBE; step 1: the tool's output as the answer.
    Each call records the session's events so far (``seen``)."""

    def step(turn: int, index: int, messages: Any) -> ModelResponse:
        calls.append(list(seen))
        if index == 0:
            return ModelResponse(
                text="", tool_calls=(ToolCall(f"c{turn}", "shell", {"cmd": PROBE}),)
            )
        return ModelResponse(text=str(messages[-1]["content"]), tool_calls=())

    return step


@pytest.fixture(scope="module")
def session(
    paths: Paths, tools_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Session, str, list[str], list[list[str]]]]:
    seen: list[str] = []
    calls: list[list[str]] = []
    dsn = str(tmp_path_factory.mktemp("overlap") / "ctx.db")
    model = ScriptedModel(_step(seen, calls), name="probe")
    s = Session.create(tools_image, model, name="overlap", paths=paths, dsn=dsn)
    try:
        vm = s.vm()
        assert vm is not None
        assert _exec(VMManager(paths), vm, SETUP).strip() == "ok"
        s.checkpoint(reason="turn")
        s.on_event = lambda e: seen.append(e.kind.value)
        yield s, _exec(VMManager(paths), vm, PROBE), seen, calls
    finally:
        s.remove()
        s.close()


def _session_vms(s: Session) -> list[Any]:
    return [v for v in VMManager(s.paths).list() if v.config.labels.get(LABEL) == s.id]


def test_the_model_is_called_before_the_vm_is_back(session) -> None:
    s, probe, seen, calls = session
    mgr = VMManager(s.paths)
    _crash(s, mgr, "still there?")
    seen.clear()
    calls.clear()
    assert s.recover() == probe  # the tool ran on the restored VM: the pre-crash guest
    first = calls[0]
    assert first == ["model_request"], first  # no vm entry yet
    kinds = [k for k in seen if k in ("model_response", "vm", "tool_call", "checkpoint")]
    assert kinds[:3] == ["model_response", "vm", "tool_call"], seen
    (vm,) = _session_vms(s)  # the restored VM is the session's, by label too
    assert vm.id == s.vm().id and vm.state.status == Status.RUNNING
    entry = [e for e in s.log() if e.kind.value == "vm"][-1]
    assert entry.payload["ms"] > 0  # the restore's own time, not the model's


def test_a_vm_restored_by_a_killed_recovery_is_removed_by_the_next(session) -> None:
    s, probe, _, _ = session
    mgr = VMManager(s.paths)
    _crash(s, mgr, "and now?")
    before = {v.id for v in mgr.list()}
    env = dict(os.environ, TORPOR_HOME=str(s.paths.root))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, s.name, s._dsn],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "MODEL"
        deadline = time.monotonic() + 120
        while True:  # its restore, behind the blocked model call, finishes
            made = [v for v in _session_vms(s) if v.id not in before]
            if made and made[0].state.status == Status.RUNNING:
                break
            assert time.monotonic() < deadline, "the killed recovery's VM never ran"
            time.sleep(0.05)
        orphan = made[0]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert orphan.id != s.state().vm_id  # never logged
    assert s.recover() == probe
    vms = _session_vms(s)
    assert [v.id for v in vms] == [s.vm().id], [v.id for v in vms]
    assert orphan.id not in {v.id for v in mgr.list()}

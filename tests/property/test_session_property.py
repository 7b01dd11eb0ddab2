"""Stateful property test, second machine class: durable sessions against a model.

Hypothesis draws sequences of session create, send, hibernate, fork and rm (the
offline model ``scripted:bench``: turn N (from 0) appends ``turn-N`` to /work/log in
the VM and answers ``ok N``).  The model knows per session its turns, its messages and whether it is
hibernated.  After every step: ``Session.list`` shows exactly the model's live
sessions; each one's status, turn count and logged user messages match; a running
session's /work/log holds exactly its turns (the VM and the log agree, across
hibernate, wake and fork); a hibernated session has no running VM; the store verifies.

Profiles: see ``SETTINGS`` in tests/property/model.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.property.model import SETTINGS, TIMEOUT
from torpor.context import Kind
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.session import Session
from torpor.store import ChunkStore
from torpor.vmm.state import Status

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

MAX_LIVE = 2  # sessions with a running VM at once
_names = itertools.count(1)


@dataclass
class SessModel:
    messages: list[str] = field(default_factory=list)
    hibernated: bool = False


def vm_log(s: Session) -> list[str]:
    vm = s.vm()
    assert vm is not None and vm.state.status == Status.RUNNING, f"{s.name}: no running VM"
    with s._mgr.client(vm) as c:  # the session's own VM manager: same home
        r = c.exec(["sh", "-c", "cat /work/log 2>/dev/null; true"], timeout=60)
    return r.stdout.decode().split()


class SessionLifecycle(RuleBasedStateMachine):
    def __init__(self, paths: Paths, image: str):
        super().__init__()
        self.paths = paths
        self.image = image
        self.model: dict[str, SessModel] = {}
        self.open: dict[str, Session] = {}
        self.removed: set[str] = set()

    def _live(self) -> list[str]:
        return [n for n, m in self.model.items() if not m.hibernated]  # insertion order

    def _text(self) -> str:
        return f"msg-{next(_names)}"

    @precondition(lambda self: len(self._live()) < MAX_LIVE)
    @rule()
    def create(self) -> None:
        name = f"ps{os.getpid()}-{next(_names)}"
        s = Session.create(self.image, "scripted:bench", name=name, paths=self.paths)
        self.open[name] = s
        self.model[name] = SessModel()

    @precondition(lambda self: self.model and len(self._live()) <= MAX_LIVE)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        choices = list(self.model) if len(self._live()) < MAX_LIVE else self._live()
        name = data.draw(st.sampled_from(choices), label="session")
        m = self.model[name]
        text = self._text()
        answer = self.open[name].send(text)
        m.messages.append(text)
        m.hibernated = False  # a send wakes a hibernated session
        assert answer == f"ok {len(m.messages) - 1}", answer  # the script counts from 0

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def hibernate(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._live()), label="session")
        self.open[name].hibernate()
        self.model[name].hibernated = True

    @precondition(lambda self: self.model and len(self._live()) < MAX_LIVE)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(list(self.model)), label="session")
        name = f"ps{os.getpid()}-{next(_names)}"
        child = self.open[parent].fork(name=name)
        self.open[name] = child
        self.model[name] = SessModel(list(self.model[parent].messages))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rm(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(list(self.model)), label="session")
        s = self.open.pop(name)
        s.remove()
        s.close()
        del self.model[name]
        self.removed.add(name)

    @invariant()
    def matches_model(self) -> None:
        listed = Session.list(paths=self.paths)
        try:
            names = {s.name for s in listed if s.status() != "removed"}
            mine = names & (set(self.model) | self.removed)
            assert mine == set(self.model), f"listed {sorted(mine)}, model {sorted(self.model)}"
        finally:
            for s in listed:
                s.close()
        for name, m in self.model.items():
            s = self.open[name]
            status = s.status()
            assert status == ("hibernated" if m.hibernated else "running"), (name, status)
            assert s.state().turns == len(m.messages)
            users = [e.payload["content"] for e in s.log() if e.kind == Kind.USER]
            assert users == m.messages, (name, users)
            if m.hibernated:
                vm = s.vm()
                assert vm is None or vm.state.status != Status.RUNNING
            else:
                assert vm_log(s) == [f"turn-{i}" for i in range(len(m.messages))]
        report = ChunkStore(self.paths.store).verify()
        assert report.ok, f"store verify: {report}"

    def teardown(self) -> None:
        for s in self.open.values():
            with contextlib.suppress(TorporError):
                s.remove()
            s.close()


def test_sessions_match_model(paths: Paths, tools_image: str) -> None:
    run_state_machine_as_test(lambda: SessionLifecycle(paths, tools_image), settings=SETTINGS)

"""How the agent starts an EXEC's process, on the real agent in host mode: a clean
signal state (nothing of what the agent blocks or ignores), the user's credentials
with its supplementary groups, and an agent that keeps serving after many children
that failed before their exec.  (Written for a vfork() variant of the agent, which
was measured and not kept: docs/benchmarks.md, bench fork; these hold for any.)"""

from __future__ import annotations

import os
import subprocess

import pytest

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setuid/setgroups need root")


def _status(agent, field: str) -> str:
    r = agent.client.exec(["grep", f"^{field}:", "/proc/self/status"], env=[PATH_ENV])
    assert r.status.code == 0, r.stderr
    return r.stdout.decode().split()[1]


def test_a_child_starts_with_no_signal_blocked_or_ignored(agent) -> None:
    # the agent has SIGCHLD blocked for its signalfd; a child does not inherit that
    assert int(_status(agent, "SigBlk"), 16) == 0
    assert int(_status(agent, "SigIgn"), 16) == 0


@needs_root
@pytest.mark.parametrize("user", ["nobody", "1234:2345", "4321", ""])
def test_supplementary_groups_are_those_of_the_user(agent, user) -> None:
    r = agent.client.exec(["sh", "-c", "id -u; id -G"], env=[PATH_ENV], user=user)
    assert r.status.code == 0, r.stderr
    uid, *groups = r.stdout.decode().split()
    if user == "1234:2345":  # an explicit group replaces the supplementary groups
        assert (uid, groups) == ("1234", ["2345"])
    elif user == "4321":  # unknown numeric user: gid 0 only
        assert (uid, groups) == ("4321", ["0"])
    elif user == "nobody":
        want = subprocess.run(["id", "-G", "nobody"], capture_output=True, text=True).stdout
        assert uid == "65534" and sorted(groups) == sorted(want.split())
    else:  # the agent's own
        assert uid == str(os.geteuid())


def test_the_agent_serves_on_after_many_children_that_failed_early(agent, tmp_path) -> None:
    for i in range(40):
        kind = i % 4
        if kind == 0:
            r = agent.client.exec([f"no-such-command-{i}"], env=[PATH_ENV])
            assert r.status.code == 127 and b"no-such-command" in r.stderr
        elif kind == 1:
            r = agent.client.exec(["true"], user=f"no-such-user-{i}")
            assert r.status.code == 126 and b"no such user" in r.stderr
        elif kind == 2:
            r = agent.client.exec(["true"], cwd=str(tmp_path / "missing"))
            assert r.status.code == 126 and b"chdir" in r.stderr
        else:
            r = agent.client.exec(["sh", "-c", f"echo ok-{i}"], env=[PATH_ENV], input=b"x")
            assert (r.status.code, r.stdout) == (0, f"ok-{i}\n".encode())
    assert agent.client.hello().version == 1

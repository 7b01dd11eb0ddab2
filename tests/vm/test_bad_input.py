"""Malformed input and missing resources get clear errors and stable exit codes."""

from __future__ import annotations

import pytest

from tests.conftest import torpor_cli


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["run", "--rm", "no-such-image:latest", "true"], 125, b"no-such-image"),
        (["run", "--rm", "-m", "lots", "tools:latest", "true"], 125, b"invalid memory size"),
        (["run", "--rm", "-m", "1M", "tools:latest", "true"], 125, b"too small"),
        # a bare number is bytes, as in Docker: the error says so
        (["run", "--rm", "-m", "256", "tools:latest", "true"], 125, b"did you mean 256M?"),
        (["run", "--rm", "-p", "99999:80", "tools:latest", "true"], 125, b"out of range"),
        (["run", "--rm", "-p", "nonsense", "tools:latest", "true"], 125, b"invalid port"),
        (["run", "--rm", "--name", "bad name!", "tools:latest", "true"], 125, b"invalid VM name"),
        (["run", "--rm", "--accel", "warp", "tools:latest", "true"], 2, b"warp"),
        (["exec", "no-such-vm", "true"], 125, b"no such VM"),
        (["stop", "no-such-vm"], 3, b"no such VM"),
        (["rm", "no-such-vm"], 3, b"no such VM"),
        (["logs", "no-such-vm"], 3, b"no such VM"),
        (["inspect", "no-such-vm"], 3, b"no such VM"),
        (["cp", "a", "b"], 2, b"VM:PATH"),
        (["import", "/nonexistent.tar"], 3, b"no such file"),
        (["run"], 2, b"Missing argument"),
    ],
)
def test_bad_input(tools_image: str, args: list[str], code: int, needle: bytes) -> None:
    r = torpor_cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert needle in r.stderr


def test_help_teaches() -> None:
    r = torpor_cli("--help")
    assert r.returncode == 0
    for cmd in (b"run", b"exec", b"ps", b"logs", b"cp", b"pull", b"import", b"images"):
        assert cmd in r.stdout
    r = torpor_cli("run", "--help")
    assert b"torpor run --rm tools:latest uname -a" in r.stdout


@pytest.mark.vm
def test_cp_errors(box) -> None:
    r = torpor_cli("cp", "/nonexistent-host-file", "shared-box:/root/")
    assert r.returncode == 3 and b"no such file on the host" in r.stderr
    r = torpor_cli("cp", "shared-box:/nonexistent", "/tmp/x")
    assert r.returncode == 3 and b"no such file in the VM" in r.stderr

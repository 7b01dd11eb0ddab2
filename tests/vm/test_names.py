"""Names and text that reach the terminal: validated at creation, escaped on output.

A name regex ending in ``$`` also matches before a trailing newline; control
characters in a VM's command, an image ref or an error message must never reach
the terminal raw (a hostile ``ESC ]`` sequence can retitle it or worse).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import torpor_cli


@pytest.mark.parametrize("name", ["box\n", "box\x1b[2J", "box\r"])
def test_name_with_control_characters_is_refused(tools_image: str, name: str) -> None:
    r = torpor_cli("create", "--name", name, tools_image, "true")
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"invalid VM name" in r.stderr
    assert b"\x1b" not in r.stderr and b"\r" not in r.stderr
    names = os.listdir(Path(os.environ["TORPOR_HOME"]) / "vms" / "names")
    assert not [n for n in names if any(ord(c) < 32 for c in n)]


def test_name_regexes_have_no_trailing_newline_hole() -> None:
    from torpor.vmm.manager import NAME_RE

    assert NAME_RE.match("box")
    assert not NAME_RE.match("box\n")


@pytest.mark.parametrize("cmd", ["inspect", "rm", "stop", "start", "logs", "kill"])
def test_error_messages_escape_control_characters(tools_image: str, cmd: str) -> None:
    r = torpor_cli(cmd, "\x1b]0;pwned\x07x")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert b"\x1b" not in r.stderr and b"\x07" not in r.stderr
    assert b"\\x1b]0;pwned\\x07x" in r.stderr  # still readable, escaped


def test_error_messages_are_not_markup(tools_image: str) -> None:
    r = torpor_cli("inspect", "[bold]x[/bold]")
    assert b"[bold]x[/bold]" in r.stderr


@pytest.mark.vm
def test_ps_escapes_a_hostile_command(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sh", "-c", "exit 0 #\x1b]0;pwned\x07\x1b[2J", name="hostile-cmd")
    r = torpor_cli("ps", "-a")
    assert r.returncode == 0
    line = [x for x in r.stdout.splitlines() if vm.id[:12].encode() in x]
    assert line, r.stdout
    assert b"\x1b" not in r.stdout and b"\x07" not in r.stdout
    assert b"\\x1b" in line[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
def test_read_only_home_is_a_clear_error(tmp_path: Path, tools_image: str) -> None:
    home = tmp_path / "rohome"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)], check=True)
    try:
        r = torpor_cli("run", "--rm", tools_image, "true", env={"TORPOR_HOME": str(home)})
        assert r.returncode == 125, (r.stdout, r.stderr)
        assert b"Traceback" not in r.stderr
        assert str(home).encode() in r.stderr
        assert b"read-only" in r.stderr.lower()
        r = torpor_cli("ps", env={"TORPOR_HOME": str(home)})
        assert b"Traceback" not in r.stderr and str(home).encode() in r.stderr
    finally:
        subprocess.run(["umount", str(home)], check=False)


def test_setup_error_prints_text_not_a_bytes_repr(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a.deb"
    bogus.write_text("hello\n")
    r = torpor_cli("setup", "--kernel-deb", str(bogus), env={"TORPOR_HOME": str(tmp_path / "h")})
    assert r.returncode == 9, (r.stdout, r.stderr)
    assert b"not a Debian format archive" in r.stderr
    assert b"\\n" not in r.stderr and b': b"' not in r.stderr and b": b'" not in r.stderr

"""The session tools against a real guest: limits, timeouts and errors the model sees."""

from __future__ import annotations

import pytest

from torpor.session.tools import READ_LIMIT, run_tool

pytestmark = pytest.mark.vm


@pytest.fixture
def client(box, shared_vms):
    with shared_vms.mgr.client(box) as c:
        yield c


def test_shell_output_exit_code_and_limit(client) -> None:
    r = run_tool(client, "1", "shell", {"cmd": "echo out; echo err >&2; exit 3"})
    assert r.exit_code == 3 and r.is_error and "out" in r.content and "err" in r.content
    r = run_tool(
        client, "2", "shell", {"cmd": "head -c 5000 /dev/zero | tr '\\0' x", "max_output": 100}
    )
    assert r.truncated and r.content.startswith("x" * 100)
    assert "[output truncated: 4900 more bytes]" in r.content


def test_shell_timeout_kills_the_whole_process_group(client) -> None:
    # The background child records its PID at once; after the timeout it must be gone
    # (not even a zombie: PID 1 reaps it), like the shell that started it.
    r = run_tool(
        client,
        "3",
        "shell",
        {"cmd": "sleep 1000 & echo $! > /tmp/child; echo $$ > /tmp/parent; wait", "timeout": 2},
    )
    assert r.is_error and "killed after the 2 s timeout" in r.content
    check = (
        "for p in $(cat /tmp/child) $(cat /tmp/parent); do"
        "  i=0; while [ -e /proc/$p ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done;"
        "  if [ -e /proc/$p ]; then echo alive $p: $(cat /proc/$p/cmdline | tr '\\0' ' ');"
        "  else echo gone $p; fi;"
        "done"
    )
    r = run_tool(client, "4", "shell", {"cmd": check})
    lines = r.content.split("\n")[:2]
    assert len(lines) == 2 and all(ln.startswith("gone ") for ln in lines), r.content


def test_files_and_listing(client) -> None:
    r = run_tool(client, "5", "write_file", {"path": "/srv/t/deep/a.txt", "content": "hé"})
    assert not r.is_error and "wrote 3 bytes" in r.content
    assert run_tool(client, "6", "read_file", {"path": "/srv/t/deep/a.txt"}).content == "hé"
    listing = run_tool(client, "7", "list_dir", {"path": "/srv/t"}).content
    assert listing == "deep/"
    big = run_tool(
        client, "8", "shell", {"cmd": f"head -c {READ_LIMIT + 10} /dev/zero > /srv/t/big"}
    )
    assert not big.is_error
    r = run_tool(client, "9", "read_file", {"path": "/srv/t/big"})
    assert r.truncated and f"[file cut at {READ_LIMIT} bytes]" in r.content


def test_errors_are_results_not_exceptions(client) -> None:
    r = run_tool(client, "a", "read_file", {"path": "/nope"})
    assert r.is_error and "No such file" in r.content
    r = run_tool(client, "b", "list_dir", {"path": "/etc/passwd"})
    assert r.is_error and "Not a directory" in r.content
    r = run_tool(client, "c", "shell", {"timeout": 3})
    assert r.is_error and "missing argument 'cmd'" in r.content
    r = run_tool(client, "d", "shell", {"cmd": 42})
    assert r.is_error and "must be a str" in r.content
    r = run_tool(client, "e", "format_disk", {})
    assert r.is_error and "unknown tool" in r.content

"""End to end: an image built here, pushed to a real registry, pulled and run in a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from tests.imagetools import (
    busybox_config,
    busybox_rootfs_layer,
    file_entry,
    make_layer,
    push_to_registry,
    whiteout_entry,
    write_oci_layout,
)

pytestmark = pytest.mark.vm


def test_pull_then_run_honours_image_config(registry, torpor_home: Path, tmp_path: Path) -> None:
    base = busybox_rootfs_layer()
    top = make_layer(
        [
            file_entry(
                "srv/app/hello.sh",
                b'#!/bin/sh\necho "hello $WHO from $(pwd) as $(id -u)"\n',
                mode=0o755,
            ),
            file_entry("etc/motd", b"gone\n"),
        ]
    )
    wipe = make_layer([whiteout_entry("etc/motd")])
    layers = [base, top, wipe]
    config = busybox_config(
        layers,
        entrypoint=["/srv/app/hello.sh"],
        cmd=[],
        env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "WHO=image"],
        working_dir="/srv/app",
        user="app",
    )
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, config, "latest")
    ref = registry.ref("e2e/hello:latest")
    push_to_registry(layout, ref)

    r = torpor_cli("pull", ref)
    assert r.returncode == 0, r.stderr
    assert b"hello" in torpor_cli("images").stdout

    r = torpor_cli("run", "--rm", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello image from /srv/app as 1000\n"

    r = torpor_cli("run", "--rm", "-e", "WHO=cli", "-u", "root", "-w", "/", ref)
    assert r.stdout == b"hello cli from / as 0\n", r.stderr

    r = torpor_cli("run", "--rm", "--entrypoint", "sh", ref, "-c", "ls /etc/motd")
    assert r.returncode != 0  # the whiteout in the third layer removed it

    r = torpor_cli("pull", registry.ref("e2e/missing:latest"))
    assert r.returncode == 3 and b"e2e/missing" in r.stderr

    r = torpor_cli("rmi", ref)
    assert r.returncode == 0, r.stderr
    assert b"e2e/hello" not in torpor_cli("images").stdout


def test_pull_killed_midway_then_retried(registry, torpor_home: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    layout = tmp_path / "layout"
    layers = [busybox_rootfs_layer()]
    write_oci_layout(layout, layers, busybox_config(layers), "latest")
    ref = registry.ref("e2e/killed:latest")
    push_to_registry(layout, ref)
    for delay in (0.05, 0.3, 0.8):
        p = subprocess.Popen(
            [sys.executable, "-m", "torpor.cli.main", "pull", ref],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        # whatever the kill interrupted, a retry succeeds and leaves no staging files
        r = torpor_cli("pull", ref)
        assert r.returncode == 0, r.stderr
        assert torpor_cli("run", "--rm", ref, "true").returncode == 0
        assert torpor_cli("rmi", ref).returncode == 0
    tmp = torpor_home / "tmp"
    assert not [n for n in os.listdir(tmp) if not n.startswith(".")], os.listdir(tmp)

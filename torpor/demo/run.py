"""``torpor demo``: the VM runtime end to end on real microVMs, readable in a terminal.

Until durable sessions land, the demo shows the foundation they stand on: an
image built offline and imported, a VM booted from it, commands and files going
in and out, a background service, hibernation (snapshot, then free the VM) and
resume with the service still counting, a fork that diverges, clean removal.
Every figure printed is measured in this run.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.errors import NotFoundError, TorporError
from torpor.image.store import ImageStore
from torpor.paths import Paths
from torpor.vmm.manager import RunRequest, VMManager
from torpor.vmm.qemu import ISOLATION

DEMO_IMAGE = "torpor-demo/tools:latest"


def ensure_demo_image(paths: Paths) -> str:
    from torpor.demo.image import write_busybox_rootfs

    store = ImageStore(paths)
    try:
        store.get(DEMO_IMAGE)
    except NotFoundError:
        with tempfile.TemporaryDirectory(dir=paths.ensure().tmp) as tmp:
            tar = write_busybox_rootfs(Path(tmp) / "rootfs.tar")
            store.import_archive(tar, DEMO_IMAGE)
    return DEMO_IMAGE


def run_demo(
    paths: Paths, say: Callable[[str], None], table: Callable[[list[tuple[str, str]]], None]
) -> None:
    mgr = VMManager(paths)
    timings: list[tuple[str, str]] = []

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings.append((label, f"{(time.perf_counter() - t0) * 1000:.0f} ms"))
        return out

    say("1. image: busybox-static packed as a rootfs tarball and imported (like docker import)")
    image = timed("import image", lambda: ensure_demo_image(paths))
    name = f"demo-{int(time.time())}"
    say(f"2. boot a microVM `{name}` from {image}")
    vm = timed(
        "boot to agent-ready",
        lambda: mgr.run(
            RunRequest(image=image, command=("sleep", "infinity"), name=name, memory_mib=256)
        ),
    )
    say(f"   accelerator {vm.state.accel}; isolation: {ISOLATION.get(vm.state.accel, '?')}")
    forks: list[str] = []
    try:
        with mgr.client(vm) as c:
            r = timed("exec uname -a", lambda: c.exec(["uname", "-a"]))
            say(f"3. exec: {r.stdout.decode().strip()}")
            c.exec(["sh", "-c", "mkdir -p /work && echo 'notes from the agent' > /work/notes"])
            c.exec(
                [
                    "sh",
                    "-c",
                    "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; "
                    "sleep 0.2; done) >/dev/null 2>&1 &",
                ]
            )
            time.sleep(1.0)
            count = c.exec(["cat", "/tmp/count"]).stdout.decode().strip()
            say(f"4. a background counter runs in the guest: /tmp/count = {count}")
            c.write_file("/work/from-host.txt", b"copied in by torpor\n")
            got = c.read_file("/work/notes").decode().strip()
            say(f"5. files in and out: /work/notes = {got!r}")
        from torpor.snapshot import restore, snapshot

        with mgr.client(vm) as c:
            before = int(c.exec(["cat", "/tmp/count"]).stdout)
        snap = timed("hibernate (snapshot --stop)", lambda: snapshot(mgr, vm.id, stop=True))
        say(
            f"6. hibernated at count {before}: snapshot {snap.manifest.id[:12]}, VM paused "
            f"{snap.pause_ms:.0f} ms, durable after {snap.durable_ms:.0f} ms, "
            f"{snap.stored_bytes / 1e6:.1f} MB stored; CPU and RAM freed"
        )
        vm = timed("resume (start)", lambda: mgr.start(vm.id))
        with mgr.client(vm) as c:
            after = int(c.exec(["cat", "/tmp/count"]).stdout)
            time.sleep(1.0)
            later = int(c.exec(["cat", "/tmp/count"]).stdout)
            kept = c.exec(["cat", "/work/notes", "/work/from-host.txt"]).stdout.decode()
        say(
            f"   resumed: the counter went on from {after} to {later} (frozen, not restarted); "
            f"files: {' | '.join(kept.strip().splitlines())}"
        )
        fork = timed("fork (restore)", lambda: restore(mgr, snap.manifest.id))
        forks.append(fork.id)
        with mgr.client(fork) as c:
            c.exec(["sh", "-c", "echo only in the fork > /work/branch"])
        with mgr.client(vm) as c:
            seen = c.exec(["sh", "-c", "cat /work/branch 2>/dev/null || echo absent"]).stdout
        say(
            f"   forked {fork.name} from the snapshot; a file written there is "
            f"{seen.decode().strip()} in the original"
        )
    finally:
        for v in (vm.id, *forks):
            with contextlib.suppress(TorporError):
                mgr.remove(v, force=True)
    say("7. removed the VMs and every file they owned (snapshots stay: `torpor snapshots`)")
    table(timings)

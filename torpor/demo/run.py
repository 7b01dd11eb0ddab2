"""``torpor demo``: the VM runtime end to end on real microVMs, readable in a terminal.

Until durable sessions land, the demo shows the foundation they stand on: an
image built offline and imported, a VM booted from it, commands and files going
in and out, a background service, stop / start keeping the disk, clean removal.
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
        timed("stop", lambda: mgr.stop(vm.id, timeout=2))
        say("6. stopped; starting again: the disk is kept (memory is not — snapshots will)")
        vm = timed("start again", lambda: mgr.start(vm.id))
        with mgr.client(vm) as c:
            kept = c.exec(["cat", "/work/notes", "/work/from-host.txt"]).stdout.decode()
            say("   after restart: " + " | ".join(kept.strip().splitlines()))
            running = c.exec(["sh", "-c", "test -e /tmp/count && echo yes || echo no"])
            say(
                f"   background counter survived a plain stop/start: "
                f"{running.stdout.decode().strip()} (expected no)"
            )
    finally:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
    say("7. removed the VM and every file it owned")
    table(timings)

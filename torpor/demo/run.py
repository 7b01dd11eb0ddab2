"""``torpor demo``: a durable agent session end to end, on real microVMs.

On the embedded defaults (SQLite context log, local snapshot store, the offline
``scripted:demo`` model): a session whose agent writes files and starts a
background service in its VM; hibernation (checkpoint, VM ended) and a wake-up
with the service still counting and the files intact; a fork that diverges; the
log and every checkpoint's size and time.  Every figure printed is measured in
this run.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from torpor.context import Entry
from torpor.errors import NotFoundError, TorporError
from torpor.image.store import ImageStore
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.text import describe, human_size
from torpor.vmm.manager import VMManager
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


def run_demo(paths: Paths, console: Console) -> None:
    timings: list[tuple[str, str]] = []

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        timings.append((label, f"{(time.perf_counter() - t0) * 1000:.0f} ms"))
        return out

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    def progress(e: Entry) -> None:
        console.print(f"     [dim]{e.seq:>3} {describe(e)}[/dim]", highlight=False)

    def guest(s: Session, cmd: str) -> str:
        vm = s.vm()
        assert vm is not None
        with VMManager(paths).client(vm) as c:
            return c.exec(["sh", "-c", cmd]).stdout.decode().strip()

    say("1. image: busybox-static packed as a rootfs tarball and imported (like docker import)")
    image = timed("import image", lambda: ensure_demo_image(paths))
    name = f"demo-{int(time.time())}"
    say(f"2. session {name}: a microVM booted from {image}, checkpoint 0, model scripted:demo")
    s = timed(
        "create session (boot + checkpoint 0)",
        lambda: Session.create(image, "scripted:demo", name=name, paths=paths, on_event=progress),
    )
    vm = s.vm()
    accel = vm.state.accel if vm else "?"
    say(f"   context log: {paths.root / 'context.db'} (SQLite); accelerator {accel}")
    say(f"   isolation: {ISOLATION.get(accel, '?')}")
    made = [s]
    try:
        q1 = "set up a counter service and tell me its port"
        say(f"3. user: {q1}")
        a1 = timed("turn 1 (3 model steps, 4 tool calls, checkpoint)", lambda: s.send(q1))
        say(f"   agent: {a1}")
        notes = guest(s, "head -1 /work/notes.md")
        time.sleep(1.5)
        before = int(guest(s, "cat /work/counter"))
        ck = timed("hibernate (checkpoint + end VM)", s.hibernate)
        say(
            f"4. hibernated at count {before}: checkpoint {ck.seq}, "
            f"VM paused {ck.pause_ms:.0f} ms, "
            f"durable after {ck.durable_ms:.0f} ms, {human_size(ck.stored_bytes)} stored; "
            f"the VM's CPU and RAM are freed (session status: {s.status()})"
        )
        time.sleep(2.0)
        q2 = "is the counter still running?"
        say(f"5. user, 2 s later: {q2}   (the VM wakes from the checkpoint)")
        a2 = timed("turn 2 (wake + 2 steps + checkpoint)", lambda: s.send(q2))
        say(f"   agent: {a2}")
        resumed = [e for e in s.log(after=ck.seq) if e.kind.value == "resume"]
        if resumed:
            timings.append(("  of which: resume the VM", f"{resumed[-1].payload['ms']:.0f} ms"))
        after = int(guest(s, "cat /work/counter"))
        time.sleep(1.2)
        later = int(guest(s, "cat /work/counter"))
        say(
            f"   the counter went on from {before} to {after} to {later} "
            f"(frozen while hibernated, not restarted); /work/notes.md still says {notes!r}"
        )
        fork = timed("fork at the last checkpoint", lambda: s.fork(name=f"{name}-fork"))
        made.append(fork)
        say(f"6. forked {fork.name} at entry {fork.record.parent_seq}: log shared by reference")
        s.send("the original branch")
        fork.send("the forked branch")
        say(
            f"   journal in {s.name}: {guest(s, 'cat /work/journal')!r}; "
            f"in {fork.name}: {guest(fork, 'cat /work/journal')!r} — the branches diverged"
        )
        say(f"7. the context log of {s.name}:")
        for e in s.log():
            say(f"   {e.seq:>3} t{e.turn} {describe(e)}")
        t = Table(title=f"checkpoints of {s.name}", header_style="bold")
        for col in ("entry", "turn", "reason", "stored", "paused", "durable"):
            t.add_column(col, justify="right" if col != "reason" else "left")
        for c in s.checkpoints:
            t.add_row(
                str(c.seq),
                str(c.turn),
                c.reason,
                human_size(c.stored_bytes),
                f"{c.pause_ms:.0f} ms",
                f"{c.durable_ms:.0f} ms",
            )
        console.print(t)
        st = s.stats()
        say(
            f"   {st['entries']} log entries ({human_size(st['log_bytes'])}), "
            f"{st['checkpoints']} checkpoints, {human_size(st['snapshot_bytes'])} of snapshots"
        )
    finally:
        for sess in made:
            with contextlib.suppress(TorporError):
                sess.remove()
            sess.close()
    say(
        "8. removed the demo's sessions: their logs stay, marked removed "
        "(`torpor session ls -a`); `torpor gc` reclaims their snapshots"
    )
    t = Table(title="measured in this run", header_style="bold")
    t.add_column("step")
    t.add_column("time", justify="right")
    for row in timings:
        t.add_row(*row)
    console.print(t)

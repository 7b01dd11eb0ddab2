"""``torpor bench faults``: a crash and fault campaign (not a test: it runs for an hour).

Each fault class is run ``runs`` times against real VMs in a private torpor home:

- ``kill-torpor``: ``kill -9`` of the torpor CLI at a random moment of a snapshot,
  a restore or a session send.
- ``kill-shim`` / ``kill-qemu``: ``kill -9`` of the VM's shim or QEMU at a random
  moment of a snapshot of that VM.
- ``kill-gc``: ``kill -9`` of ``torpor gc --grace 0`` at a random moment while a
  snapshot runs beside it (after a snapshot was removed, so gc has work).
- ``enospc-store``: snapshots into a store on a fresh tmpfs of random size (1-40 MiB).
- ``eio-store``: EIO from the failpoint ``store.chunk_write`` (at a random hit) or
  ``store.manifest_write`` during a snapshot (torpor/failpoints.py).
- ``enospc-log``: a session send while the context log's filesystem (a tmpfs) has
  0-64 KiB free.
- ``eio-log``: EIO from the failpoint ``log.write`` at a random hit during a send.

The random delays are uniform over 0-1.2x the operation's mean duration so far, so
most kills land inside the operation and some just after it.  After every run:

- store consistent: ``ChunkStore.verify()`` is clean (no corrupt or missing chunk, no
  bad manifest);
- nothing acknowledged lost: every snapshot id a command printed (it prints only once
  durable) is listed and verifies, and every message whose send returned an answer is
  in the session's log (and the session can be recovered and used);
- leftovers: processes of this home that belong to no running VM (nor the zygote),
  locks held by such processes, RAM/shadow files of VMs that are not running, and
  snapshot staging folders of dead processes.
Failures of a faulted command must be typed errors (no Python traceback).

Mounts (tmpfs) need root; the campaign unmounts them on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torpor import failpoints
from torpor.bench.stats import machine
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.store import ChunkStore
from torpor.vmm.layout import home_ram_dir
from torpor.vmm.manager import RunRequest, VMManager
from torpor.vmm.state import Status, alive

FAULTS = (
    "kill-torpor",
    "kill-shim",
    "kill-qemu",
    "kill-gc",
    "enospc-store",
    "eio-store",
    "enospc-log",
    "eio-log",
)
SRC = "fz-src"  # the VM the snapshots are taken of
SESSION = "fz-session"
OP_TIMEOUT = 180.0  # a faulted command that runs longer than this counts as hung
LOG_FS_MIB = 64


@dataclass
class RunResult:
    fault: str
    op: str
    outcome: str  # completed | killed | failed-typed | failed-untyped | hung
    store_ok: bool = True
    lost: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Campaign:
    def __init__(self, paths: Paths, image: str, seed: int, progress: Callable[[str], None]):
        self.paths = paths
        self.image = image
        self.rng = random.Random(seed)
        self.progress = progress
        self.mgr = VMManager(paths)
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("TORPOR_DEBUG", failpoints.ENV)
        }
        self.env["TORPOR_HOME"] = str(paths.root)
        self.logfs = paths.root / "logfs"
        self.env["TORPOR_CONTEXT_DSN"] = f"sqlite://{self.logfs / 'context.db'}"
        self.acked_snaps: set[str] = set()
        self.acked_msgs: list[str] = []
        self.mean: dict[str, list[float]] = {}
        self.mounts: list[Path] = []
        self.counter = 0
        self.last: RunResult | None = None

    # -- processes -----------------------------------------------------------------
    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "torpor.cli.main", *args]

    def spawn(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, **(extra or {})}
        return subprocess.Popen(
            self._argv(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )

    def cli(self, *args: str, extra: dict[str, str] | None = None) -> tuple[int, str, str]:
        p = self.spawn(*args, extra=extra)
        try:
            out, err = p.communicate(timeout=OP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            return -999, out.decode(errors="replace"), err.decode(errors="replace")
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def delay(self, op: str, default: float) -> float:
        seen = self.mean.get(op) or [default]
        return self.rng.uniform(0.0, 1.2 * sum(seen) / len(seen))

    def timed(self, op: str, seconds: float) -> None:
        self.mean.setdefault(op, []).append(seconds)
        del self.mean[op][:-20]

    def kill_during(
        self, op: str, default: float, args: tuple[str, ...], target: Callable[[], int] | None
    ) -> tuple[str, int, str, str]:
        """Run CLI ``args``; at a random moment kill -9 it (``target`` None) or ``target()``.

        Returns (outcome, returncode, stdout, stderr)."""
        wait = self.delay(op, default)
        t0 = time.monotonic()
        p = self.spawn(*args)
        killed = False
        try:
            p.wait(timeout=wait)
            self.timed(op, time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            pid = p.pid if target is None else target()
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed = target is None
        try:
            out, err = p.communicate(timeout=OP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            return "hung", -999, out.decode(errors="replace"), err.decode(errors="replace")
        so, se = out.decode(errors="replace"), err.decode(errors="replace")
        return self.outcome(p.returncode, se, killed), p.returncode, so, se

    @staticmethod
    def outcome(rc: int, err: str, killed: bool = False) -> str:
        if rc == 0:
            return "completed"
        if killed or rc == -signal.SIGKILL:
            return "killed"
        return "failed-untyped" if "Traceback" in err else "failed-typed"

    # -- fixtures of the campaign --------------------------------------------------
    def mount_tmpfs(self, where: Path, mib: int) -> None:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(where)],
            check=True,
        )
        self.mounts.append(where)

    def umount(self, where: Path) -> None:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        with contextlib.suppress(ValueError):
            self.mounts.remove(where)

    def src(self) -> str:
        """Make sure VM SRC runs and answers (else it is restored from the newest
        acknowledged snapshot); returns a note when a running SRC did not answer."""
        note = ""
        with contextlib.suppress(TorporError):
            vm = self.mgr.get(SRC)
            if vm.state.status == Status.RUNNING:
                try:
                    with self.mgr.client(SRC) as c:
                        c.exec(["true"], timeout=20)
                    return ""
                except TorporError as e:
                    note = f"VM unusable: {SRC} was running but did not answer ({e})"
            self.mgr.remove(SRC, force=True)
        store = ChunkStore(self.paths.store)
        try:
            newest = [m for m in store.list() if m.id in self.acked_snaps]
        except TorporError:
            newest = []
        finally:
            store.close()
        if newest:
            rc, _, err = self.cli("restore", newest[-1].id, "--name", SRC)
            if rc == 0:
                return note
            self.progress(f"restore of {SRC} failed ({err.strip()[-200:]}); booting anew")
            with contextlib.suppress(TorporError):
                self.mgr.remove(SRC, force=True)
        req = RunRequest(image=self.image, command=("sleep", "infinity"), name=SRC, memory_mib=256)
        self.mgr.run(req)
        return note

    def session(self) -> None:
        rc, _, err = self.cli("session", "show", SESSION)
        if rc != 0:
            rc, _, err = self.cli(
                "session",
                "create",
                "--name",
                SESSION,
                "--model",
                "scripted:demo",
                "--image",
                self.image,
            )
            if rc != 0:
                raise RuntimeError(f"cannot create the campaign's session: {err}")

    def setup(self) -> None:
        self.paths.ensure()
        self.mount_tmpfs(self.logfs, LOG_FS_MIB)
        self.src()
        rc, out, err = self.cli("snapshot", SRC)
        if rc != 0:
            raise RuntimeError(f"first snapshot failed: {err}")
        self.acked_snaps.add(out.split()[-1])

    def teardown(self) -> None:
        for vm in self.mgr.list():
            with contextlib.suppress(TorporError):
                self.mgr.remove(vm.id, force=True)
        for m in list(reversed(self.mounts)):
            self.umount(m)

    # -- checks --------------------------------------------------------------------
    def check(self, r: RunResult, store_root: Path | None = None) -> None:
        store = ChunkStore(store_root or self.paths.store)
        try:
            rep = store.verify()
            r.store_ok = rep.ok
            if not rep.ok:
                r.notes.append(
                    f"verify: corrupt {len(rep.corrupt)} missing {len(rep.missing)} "
                    f"bad manifests {[b[0] for b in rep.bad_manifests]}"
                )
            have = set(store.ids()) if hasattr(store, "ids") else {m.id for m in store.list()}
            for s in sorted(self.acked_snaps):
                if s not in have or s in rep.affected:
                    r.lost.append(f"snapshot {s[:12]}")
        except TorporError as e:
            r.store_ok = False
            r.notes.append(f"verify failed: {e}")
        finally:
            store.close()

    def check_session(self, r: RunResult) -> None:
        from torpor.context import Kind, open_log

        try:
            log = open_log(self.env["TORPOR_CONTEXT_DSN"], paths=self.paths)
        except TorporError as e:
            r.lost.append(f"log unreadable: {e}")
            return
        try:
            rec = log.get_session(SESSION)
            users = {
                str(e.payload.get("content")) for e in log.entries(rec.id) if e.kind == Kind.USER
            }
        except TorporError as e:
            r.lost.append(f"log unreadable: {e}")
            return
        finally:
            log.close()
        r.lost += [f"message {m}" for m in self.acked_msgs if m not in users]
        rc, _, err = self.cli("session", "recover", SESSION)
        if rc != 0:
            r.notes.append(f"recover failed: {err.strip()[-300:]}")

    def leftovers(self, r: RunResult, wait: float = 10.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            left = self._leftovers()
            # a staging folder waits for the next snapshot: no use waiting for it here
            if not any(not x.startswith("staging") for x in left) or time.monotonic() > deadline:
                r.leftovers = left
                return
            time.sleep(0.2)

    def _leftovers(self) -> list[str]:
        running = {vm.id: vm for vm in self.mgr.list() if vm.state.status == Status.RUNNING}
        expected = _ancestors()  # this process and whoever launched it (timeout, nohup…)
        for vm in running.values():
            expected |= {vm.state.shim_pid, vm.state.qemu_pid}
        home = str(self.paths.root).encode()
        mine: dict[int, str] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            pid = int(d.name)
            try:
                cmd = (d / "cmdline").read_bytes()
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if home in cmd or b"TORPOR_HOME=" + home + b"\0" in env:
                if b"torpor.vmm.zygote" in cmd:
                    expected.add(pid)
                mine[pid] = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
        out = [f"process {p}: {c}" for p, c in mine.items() if p not in expected]
        # locks held by processes that should not be there
        inodes = {}
        ram = home_ram_dir(self.paths.root)
        for root in (self.paths.locks, self.paths.store, ram):
            if root is None or not root.exists():
                continue
            for p in root.rglob("*"):
                with contextlib.suppress(OSError):
                    inodes[p.stat().st_ino] = p
        with contextlib.suppress(OSError):
            for line in Path("/proc/locks").read_text().splitlines():
                parts = line.split()
                if len(parts) < 6 or not parts[4].lstrip("-").isdigit():
                    continue
                pid, ino = int(parts[4]), int(parts[5].rsplit(":", 1)[-1])
                if ino in inodes and pid > 0 and pid not in expected and pid in mine:
                    out.append(f"lock {inodes[ino].name} held by {pid}")
        if ram is not None and ram.exists():
            for p in ram.iterdir():
                vm_id = p.name.split(".", 1)[0]
                if p.suffix in (".ram", ".shadow") and vm_id not in running:
                    out.append(f"RAM file {p.name}")
            stage = ram / "stage"
            for d in stage.glob("snap-*-*-*") if stage.exists() else ():
                with contextlib.suppress(ValueError):
                    _, pid_s, start, _ = d.name.split("-", 3)
                    if not alive(int(pid_s), int(start)):
                        out.append(f"staging {d.name}")
        return out

    def cleanup_vms(self) -> None:
        for vm in self.mgr.list():
            if vm.name.startswith("fz-r"):
                with contextlib.suppress(TorporError):
                    self.mgr.remove(vm.id, force=True)

    # -- faults --------------------------------------------------------------------
    def snapshot_op(self, r: RunResult, target: Callable[[], int] | None) -> None:
        outcome, rc, out, err = self.kill_during("snapshot", 2.0, ("snapshot", SRC), target)
        r.outcome = outcome
        if rc == 0 and out.split():
            self.acked_snaps.add(out.split()[-1])
        if outcome == "failed-untyped":
            r.notes.append(err.strip()[-300:])
        if target is None:  # a killed client never leaves its VM paused
            self.vm_alive(r)

    def hibernate_op(self, r: RunResult) -> None:
        """kill -9 of ``snapshot --stop``: the VM ends up running or hibernated, never
        stuck paused, and a hibernated one starts again."""
        outcome, rc, out, _ = self.kill_during("hibernate", 2.5, ("snapshot", SRC, "--stop"), None)
        r.outcome = outcome
        if rc == 0 and out.split():
            self.acked_snaps.add(out.split()[-1])
        # a kill after the shim was told to end the VM: it records the hibernation a
        # moment later, so ps may say running until QEMU's exit is seen
        deadline = time.monotonic() + 15
        while True:
            status = self.mgr.get(SRC).state.status
            if status != Status.RUNNING:
                break
            try:
                with self.mgr.client(SRC) as c:
                    c.exec(["true"], timeout=10)
                break
            except TorporError as e:
                if time.monotonic() > deadline:
                    r.notes.append(f"VM unusable after the fault: {e}")
                    return
                time.sleep(0.5)
        if rc == 0 and status != Status.HIBERNATED:
            r.notes.append(f"VM unusable: hibernate acknowledged but the VM is {status}")
        if status == Status.HIBERNATED:
            rc2, _, err2 = self.cli("start", SRC)
            if rc2 != 0:
                r.notes.append(f"VM unusable: start after hibernate failed: {err2[-300:]}")
        elif status != Status.RUNNING:
            r.notes.append(f"VM unusable: after a killed hibernate the VM is {status}")

    def vm_pid(self, which: str) -> int:
        with contextlib.suppress(TorporError):
            st = self.mgr.get(SRC).state
            return st.shim_pid if which == "shim" else st.qemu_pid
        return 0

    def run_fault(self, fault: str, i: int) -> RunResult:
        self.counter += 1
        n = self.counter
        r = RunResult(fault, "", "completed")
        t0 = time.monotonic()
        left = self.src()
        if left:  # the previous run's fault left SRC stuck: counted against that run
            self.results_prev_note(left)
        if fault == "kill-torpor":
            r.op = self.rng.choice(("snapshot", "hibernate", "restore", "send"))
            if r.op == "snapshot":
                self.snapshot_op(r, None)
            elif r.op == "hibernate":
                self.hibernate_op(r)
            elif r.op == "restore":
                snap = sorted(self.acked_snaps)[0]
                r.outcome, *_ = self.kill_during(
                    "restore", 1.5, ("restore", snap, "--name", f"fz-r{n}"), None
                )
            else:
                self.session()
                msg = f"m{n}"
                r.outcome, rc, out, err = self.kill_during(
                    "send", 4.0, ("session", "send", SESSION, msg, "--key", msg, "-q"), None
                )
                if rc == 0:
                    self.acked_msgs.append(msg)
        elif fault in ("kill-shim", "kill-qemu"):
            r.op = "snapshot"
            self.snapshot_op(r, lambda: self.vm_pid(fault.split("-")[1]))
        elif fault == "kill-gc":
            r.op = "gc+snapshot"
            self.gc_garbage()
            gc = self.spawn("gc", "--grace", "0")
            snap = self.spawn("snapshot", SRC)
            time.sleep(self.delay("gc", 1.0))
            if gc.poll() is None:
                os.kill(gc.pid, signal.SIGKILL)
                r.outcome = "killed"
            else:
                self.timed("gc", 1.0)
            gc.communicate()
            out, err = snap.communicate(timeout=OP_TIMEOUT)
            if snap.returncode == 0:
                self.acked_snaps.add(out.decode().split()[-1])
            elif "Traceback" in err.decode(errors="replace"):
                r.notes.append("snapshot beside gc: " + err.decode(errors="replace")[-300:])
        elif fault == "enospc-store":
            r.op = "snapshot"
            self.enospc_store(r)
        elif fault == "eio-store":
            r.op = "snapshot"
            point = self.rng.choice(("store.chunk_write", "store.manifest_write"))
            spec = f"eio@{self.rng.randint(1, 60)}" if point == "store.chunk_write" else "eio"
            rc, out, err = self.cli(
                "snapshot", SRC, extra={failpoints.ENV: failpoints.env_value({point: spec})}
            )
            r.outcome = self.outcome(rc, err)
            if rc == 0:
                self.acked_snaps.add(out.split()[-1])
            elif r.outcome == "failed-untyped":
                r.notes.append(err.strip()[-300:])
            self.vm_alive(r)
        elif fault in ("enospc-log", "eio-log"):
            r.op = "send"
            self.session()
            msg = f"m{n}"
            filler = self.logfs / "filler"
            extra: dict[str, str] = {}
            if fault == "enospc-log":
                st = os.statvfs(self.logfs)
                keep = self.rng.randint(0, 64) * 1024
                size = max(0, st.f_bavail * st.f_frsize - keep)
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    if size:
                        os.posix_fallocate(f.fileno(), 0, size)
            else:
                spec = f"eio@{self.rng.randint(1, 12)}"
                extra = {failpoints.ENV: failpoints.env_value({"log.write": spec})}
            rc, out, err = self.cli(
                "session", "send", SESSION, msg, "--key", msg, "-q", extra=extra
            )
            filler.unlink(missing_ok=True)
            r.outcome = self.outcome(rc, err)
            if rc == 0:
                self.acked_msgs.append(msg)
            elif r.outcome == "failed-untyped":
                r.notes.append(err.strip()[-300:])
        else:
            raise ValueError(f"unknown fault {fault!r}")
        self.cleanup_vms()
        if fault != "enospc-store":
            self.check(r)
        if r.op == "send":
            self.check_session(r)
        self.leftovers(r)
        r.seconds = time.monotonic() - t0
        self.last = r
        return r

    def results_prev_note(self, note: str) -> None:
        if self.last is not None:
            self.last.notes.append(note)

    def vm_alive(self, r: RunResult) -> None:
        try:
            with self.mgr.client(SRC) as c:
                c.exec(["true"], timeout=30)
        except TorporError as e:
            r.notes.append(f"VM unusable after the fault: {e}")
            with contextlib.suppress(TorporError, OSError):  # evidence, then a fresh SRC
                vm = self.mgr.get(SRC)
                keep = self.paths.root / "evidence"
                keep.mkdir(exist_ok=True)
                shutil.copy(vm.files.shim_log, keep / f"{self.counter}-{vm.id[:12]}-shim.log")
            with contextlib.suppress(TorporError):
                self.mgr.remove(SRC, force=True)

    def gc_garbage(self) -> None:
        """Give gc something to delete: snapshot, then remove an older acknowledged one."""
        rc, out, _ = self.cli("snapshot", SRC)
        if rc == 0:
            self.acked_snaps.add(out.split()[-1])
        if len(self.acked_snaps) > 3:
            victim = sorted(self.acked_snaps)[self.rng.randrange(len(self.acked_snaps))]
            rc, _, _ = self.cli("snapshot", "rm", "--force", victim)
            if rc == 0:
                self.acked_snaps.discard(victim)

    def enospc_store(self, r: RunResult) -> None:
        """Snapshots into a store on a fresh, small tmpfs until one fails."""
        mib = self.rng.randint(1, 40)
        self.mount_tmpfs(self.paths.store, mib)
        saved, self.acked_snaps = self.acked_snaps, set()
        r.notes.append(f"store tmpfs {mib} MiB")
        try:
            for _ in range(3):
                rc, out, err = self.cli("snapshot", SRC)
                r.outcome = self.outcome(rc, err)
                if rc != 0:
                    if r.outcome == "failed-untyped":
                        r.notes.append(err.strip()[-300:])
                    break
                self.acked_snaps.add(out.split()[-1])
            self.vm_alive(r)
            self.check(r)
        finally:
            self.acked_snaps = saved
            self.umount(self.paths.store)


def run_faults_bench(
    paths: Paths,
    image: str,
    faults: list[str],
    runs: int,
    *,
    seed: int | None = None,
    budget_s: float | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Run the campaign; ``budget_s`` stops it early (each fault gets an equal share)."""
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults: {sorted(unknown)} (known: {', '.join(FAULTS)})")
    seed = random.randrange(2**32) if seed is None else seed
    c = Campaign(paths, image, seed, progress)
    results: dict[str, list[RunResult]] = {f: [] for f in faults}
    t0 = time.monotonic()
    try:
        c.setup()
        for k, fault in enumerate(faults):
            until = None if budget_s is None else t0 + budget_s * (k + 1) / len(faults)
            for i in range(runs):
                if until is not None and time.monotonic() > until:
                    break
                try:
                    res = c.run_fault(fault, i)
                except Exception as e:  # the harness itself (or a setup step) broke: record it
                    res = RunResult(fault, "", "harness-error", notes=[f"{type(e).__name__}: {e}"])
                    with contextlib.suppress(Exception):
                        c.cleanup_vms()
                results[fault].append(res)
                bad = _bad(res)
                if bad or (i + 1) % 10 == 0:
                    progress(
                        f"{fault} {i + 1}/{runs}: {res.op} {res.outcome}"
                        + (
                            f" store_ok={res.store_ok} lost={res.lost} left={res.leftovers}"
                            if bad
                            else ""
                        )
                        + (f" notes={res.notes}" if res.notes and bad else "")
                    )
    finally:
        c.teardown()
    summary = {}
    for fault, rs in results.items():
        outcomes: dict[str, int] = {}
        for x in rs:
            outcomes[x.outcome] = outcomes.get(x.outcome, 0) + 1
        summary[fault] = {
            "runs": len(rs),
            "store_consistent": sum(x.store_ok for x in rs),
            "nothing_lost": sum(not x.lost for x in rs),
            "no_leftovers": sum(not _real_leftovers(x) for x in rs),
            # a killed snapshot's staging folder, reaped by the next snapshot (by design)
            "staging_until_next_snapshot": sum(
                any(s.startswith("staging") for s in x.leftovers) for x in rs
            ),
            "outcomes": outcomes,
            "mean_s": round(sum(x.seconds for x in rs) / len(rs), 2) if rs else 0,
        }
    return {
        "bench": "faults",
        "machine": machine(),
        "seed": seed,
        "runs_asked": runs,
        "seconds": round(time.monotonic() - t0, 1),
        "summary": summary,
        "failures": [asdict(x) for rs in results.values() for x in rs if _bad(x)],
        "runs": [asdict(x) for rs in results.values() for x in rs],
    }


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _real_leftovers(x: RunResult) -> list[str]:
    return [s for s in x.leftovers if not s.startswith("staging")]


def _bad(x: RunResult) -> bool:
    return (
        not x.store_ok
        or bool(x.lost)
        or bool(_real_leftovers(x))
        or x.outcome in ("hung", "failed-untyped", "harness-error")
        or any(n.startswith(("VM unusable", "recover failed")) for n in x.notes)
    )


def prepare_home(root: Path | None, image: str) -> Paths:
    """The campaign's own torpor home (a fresh one under /tmp unless ``root`` is given):
    the host's guest kernel copied in and, if ``image`` is not there, the busybox
    tools image imported under that name."""
    from torpor.demo.image import write_busybox_rootfs
    from torpor.errors import NotFoundError
    from torpor.guest.kernel import fetch_kernel, find_kernels_dir
    from torpor.image.store import ImageStore

    root = root or Path(tempfile.mkdtemp(prefix="torpor-faults-"))
    paths = Paths(root.resolve()).ensure()
    if not (paths.guest / "kernels").exists():
        src = find_kernels_dir()
        if src is not None:
            shutil.copytree(src, paths.guest / "kernels", symlinks=True)
        else:
            fetch_kernel(paths)
    images = ImageStore(paths)
    try:
        images.get(image)
    except NotFoundError:
        with tempfile.TemporaryDirectory() as d:
            images.import_archive(write_busybox_rootfs(Path(d) / "tools.tar"), image)
    return paths


def print_table(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(
        title=f"torpor bench faults — seed {r['seed']}, {r['seconds']:.0f} s",
        header_style="bold",
    )
    for col in (
        "fault",
        "runs",
        "store consistent",
        "nothing acked lost",
        "no leftovers",
        "staging left",
        "outcomes",
    ):
        t.add_column(col, justify="left" if col in ("fault", "outcomes") else "right")
    for fault, s in r["summary"].items():
        t.add_row(
            fault,
            str(s["runs"]),
            f"{s['store_consistent']}/{s['runs']}",
            f"{s['nothing_lost']}/{s['runs']}",
            f"{s['no_leftovers']}/{s['runs']}",
            str(s["staging_until_next_snapshot"]),
            ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())),
        )
    console.print(t)
    for x in r["failures"][:20]:
        console.print(json.dumps(x)[:400], markup=False, highlight=False)

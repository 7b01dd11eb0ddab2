"""``torpor``: a context log plus a VM snapshot after every turn (``torpor.session``).

The same workload, but the workspace and the background process live in the VM:
the scripted model answers each turn's first step with M bytes of text and k
``write_file`` calls plus one ``shell`` tick (the first tick starts the background
process with ``setsid``), and its second step with a short final answer.  The crash
is a ``kill -9`` of the worker *and* its VM's processes at turn N-1, after that
turn's tool calls ran in the VM — the harder case: their effects must be rolled back
with the VM.  Recovery is ``Session.open(id).recover()``: restore the last
checkpoint, supersede the partial turn, replay the user message; "the next step
runs" is the scripted model's first call in the recovering worker.

The message check maps the log's effective conversation to the workload's canonical
one: user texts and the model's M-byte texts must match byte for byte and every
turn must have exactly k + 1 successful tool results (torpor's own tool result
texts differ from the host peers', so the canonical result is hashed in their
place).  Workspace hashes, the journal and the background process's counter are
read inside the VM after the run (outside the session, so not logged).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from torpor.bench.thesis.env import HostEnv, io_read_bytes
from torpor.bench.thesis.peers.base import RunSpec, System
from torpor.bench.thesis.workload import BG_SCRIPT, EMPTY_HASH, Workload, chain
from torpor.guest.kernel import find_kernels_dir

VM_DIR = "/work"
IMAGE = "tools:latest"


def _tick_cmd(turn: int) -> str:
    bg = BG_SCRIPT.format(dir=VM_DIR).replace("'", "'\\''")
    return (
        f"mkdir -p {VM_DIR}/ws; echo {turn} >> {VM_DIR}/ws/journal; "
        f"if ! kill -0 $(cat {VM_DIR}/bg.pid 2>/dev/null) 2>/dev/null; then "
        f"rm -f {VM_DIR}/bg.pid; setsid sh -c '{bg}' thesis-bg:{VM_DIR} "
        f"</dev/null >/dev/null 2>&1 & "
        f"while [ ! -s {VM_DIR}/bg.pid ] || [ ! -s {VM_DIR}/counter ]; do sleep 0.01; done; fi; "
        f"b=$(cat {VM_DIR}/counter); kill -USR1 $(cat {VM_DIR}/bg.pid); "
        f'while [ "$(cat {VM_DIR}/counter)" = "$b" ]; do sleep 0.01; done; '
        f"echo tick {turn} ok"
    )


INSPECT_CMD = (
    f"cd {VM_DIR}/ws && sha256sum * 2>/dev/null; echo ---; cat journal; echo ---; "
    f"p=$(cat {VM_DIR}/bg.pid); kill -0 $p 2>/dev/null && echo alive || echo dead; "
    f"cat {VM_DIR}/counter"
)


class TorporPeer(System):
    name = "torpor"
    family = "snapshot"
    modules = ("torpor.session", "torpor.model")
    in_extra = False
    notes = "context log + VM snapshot per turn; the VM (files, processes) is restored"

    def missing(self) -> str | None:
        why = super().missing()
        if why:
            return "torpor.session not available yet"
        if shutil.which("qemu-system-x86_64") is None:
            return "QEMU not installed (scripts/setup)"
        if find_kernels_dir() is None:
            return "no guest kernel: run `torpor setup`"
        return None

    def setup(self, root: Path) -> dict[str, Any]:
        from torpor.demo.image import write_busybox_rootfs
        from torpor.image.store import ImageStore
        from torpor.paths import Paths

        home = root / "torpor-home"
        paths = Paths(home).ensure()
        src = find_kernels_dir()
        assert src is not None
        if not (paths.guest / "kernels").exists():
            shutil.copytree(src, paths.guest / "kernels", symlinks=True)
        tar = write_busybox_rootfs(root / "tools.tar")
        ImageStore(paths).import_archive(tar, IMAGE)
        self.home = home
        return {"home": str(home)}

    def _paths(self, spec: RunSpec) -> Any:
        from torpor.paths import Paths

        return Paths(Path(spec.conn["home"]))

    # -- worker side ---------------------------------------------------------------

    def _model(self, w: Workload, env: HostEnv) -> Any:
        from torpor.model import ModelResponse, ScriptedModel, ToolCall

        def step(turn: int, index: int, messages: Any) -> ModelResponse:
            if env.recovering:
                env.rec.once("restored")
                env.rec.once("rerun", turn=turn)
                env.rec.once("next", turn=turn)
            if index == 0:
                calls = [
                    ToolCall(
                        f"call_{turn}_{i}",
                        "write_file",
                        {
                            "path": f"{VM_DIR}/ws/{w.tool_path(turn, i)}",
                            "content": w.tool_content(turn, i),
                        },
                    )
                    for i in range(w.tools)
                ]
                calls.append(
                    ToolCall(f"call_{turn}_tick", "shell", {"cmd": _tick_cmd(turn), "timeout": 30})
                )
                return ModelResponse(text=w.model_text(turn), tool_calls=tuple(calls))
            if turn == env.crash_turn and (env.dir / "crash.armed").exists():
                env.rec("crash", turn=turn)
                import time

                while True:  # the tools of this turn ran in the VM; now we die
                    time.sleep(60)
            return ModelResponse(text=f"done {turn}", tool_calls=())

        return ScriptedModel(step, name="thesis")

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        from torpor.session import Session

        w = spec.w
        paths = self._paths(spec)
        model = self._model(w, env)
        state_file = spec.dir / "torpor-session"
        if spec.recovering:
            s = Session.open(state_file.read_text(), paths=paths, model=model)
            env.rec("ready")
            env.rec("enter", rchar=io_read_bytes())
            s.recover()
            start = s.stats()["turns"]
        else:
            s = Session.create(IMAGE, model, name=spec.session_id, memory_mib=256, paths=paths)
            state_file.write_text(s.id)
            env.rec("ready")
            start = 0
        try:
            for t in range(start, w.turns):
                env.turn_started(t)  # the whole send(): log reads and checkpoint included
                s.send(w.user_text(t))
                env.turn_done(t)
            h = self._hash(w, s)
            (spec.dir / "inspect.json").write_text(json.dumps(self._inspect_vm(s)))
            return h
        finally:
            s.close()

    @staticmethod
    def _hash(w: Workload, s: Any) -> str:
        """The canonical message hash of what the log holds (see the module doc)."""
        h = EMPTY_HASH
        turn = -1
        tools_ok = 0
        for m in s.messages():
            role = m["role"]
            if role == "user":
                if turn >= 0 and tools_ok != w.tools + 1:
                    return f"turn {turn}: {tools_ok} tool results"
                turn += 1
                tools_ok = 0
                h = chain(h, "user", m["content"])
            elif role == "assistant" and m.get("tool_calls"):
                h = chain(h, "assistant", m["content"])
            elif role == "tool" and not m.get("is_error"):
                i = tools_ok
                tools_ok += 1
                h = chain(
                    h, "tool", w.write_result(turn, i) if i < w.tools else w.tick_result(turn)
                )
        return h

    @staticmethod
    def _inspect_vm(s: Any) -> dict[str, Any]:
        from torpor.vmm.manager import VMManager

        vm = s.vm()
        with VMManager(s.paths).client(vm) as c:
            out = c.exec(["sh", "-c", INSPECT_CMD], timeout=30).stdout.decode()
        files_part, journal_part, rest = ([*out.split("---\n"), "", ""])[:3]
        files = {}
        for line in files_part.splitlines():
            digest, _, name = line.partition("  ")
            if name:
                files[name] = digest
        lines = rest.split()
        alive = bool(lines) and lines[0] == "alive"
        counter = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None
        return {
            "files": files,
            "journal": journal_part.split(),
            "bg_alive": alive,
            "counter": counter if alive else None,
        }

    # -- harness side --------------------------------------------------------------

    def kill_extra(self, spec: RunSpec) -> None:
        """kill -9 every process still running for this run's VM(s): the QEMU and its
        shim were started by the worker but may sit in their own sessions."""
        marker = spec.conn["home"].encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)

    def inspect(self, spec: RunSpec) -> dict[str, Any]:
        p = spec.dir / "inspect.json"
        if not p.exists():
            return {"files": {}, "journal": [], "bg_alive": False, "counter": None}
        return json.loads(p.read_text())

    def storage(self, spec: RunSpec) -> dict[str, int]:
        from torpor.session import Session

        sid = (spec.dir / "torpor-session").read_text()
        with Session.open(sid, paths=self._paths(spec)) as s:
            st = s.stats()
        return {
            "bytes": st["log_bytes"] + st["snapshot_bytes"],
            "log_bytes": st["log_bytes"],
            "snapshot_bytes": st["snapshot_bytes"],
        }

    def drop(self, spec: RunSpec) -> None:
        from torpor.session import Session

        with contextlib.suppress(Exception):
            sid = (spec.dir / "torpor-session").read_text()
            Session.open(sid, paths=self._paths(spec)).remove()
        self.kill_extra(spec)

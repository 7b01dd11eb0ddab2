"""``torpor``: a context log plus a VM snapshot after every turn (``torpor.session``).

The same workload, but the workspace and the background process live in the VM:
the scripted model answers each turn's first step with M bytes of text and k
``write_file`` calls plus one ``shell`` tick (the first tick starts the background
process with ``setsid``), and its second step with a short final answer.  The crash
is a ``kill -9`` of the worker *and* its VM's processes at turn N-1, after that
turn's tool calls ran in the VM — the harder case: their effects must be rolled back
with the VM.  Recovery is ``Session.open(id).recover()``: supersede the partial
turn and replay the user message, the last checkpoint restored beside the model
call (the first tool call waits for it); "the next step runs" is the scripted
model's first call in the recovering worker, and the ``vm`` entry's time in the
recovery's timeline (``x_detail``) is when the VM was back.

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


#: Environment: build all but the last K turns of a session in bulk (see _prefill).
PREFILL_ENV = "TORPOR_THESIS_PREFILL"


def prefill_turns(turns: int) -> int | None:
    """How many of ``turns`` to build in bulk: all but the last K when
    ``$TORPOR_THESIS_PREFILL`` = K is set (0 when ``turns`` <= K); None when it is not
    (the worker then creates the session and runs every turn itself)."""
    raw = os.environ.get(PREFILL_ENV, "")
    if not raw.isdigit():
        return None
    return max(turns - int(raw), 0)


def _bulk_ticks(first: int, end: int) -> str:
    """Turns first..end-1 of the journal and the background counter, in one guest shell
    loop (what each turn's tick does, without a host round trip per turn)."""
    d = VM_DIR
    return (
        f"cd {d}; p=$(cat bg.pid); t={first}; while [ $t -lt {end} ]; do "
        "echo $t >> ws/journal; read b < counter; kill -USR1 $p; "
        'while read c < counter; [ "$c" = "$b" ]; do :; done; t=$((t+1)); done; echo ok'
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

    @staticmethod
    def _first_step(w: Workload, turn: int) -> Any:
        """A turn's first model step: M bytes of text, k writes and one tick."""
        from torpor.model import ModelResponse, ToolCall

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

    def _model(self, w: Workload, env: HostEnv) -> Any:
        from torpor.model import ModelResponse, ScriptedModel

        def step(turn: int, index: int, messages: Any) -> ModelResponse:
            if env.recovering:
                env.rec.once("restored")
                env.rec.once("rerun", turn=turn)
                env.rec.once("next", turn=turn)
            if index == 0:
                return self._first_step(w, turn)
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
            import time

            marks: list[tuple[str, float]] = [("open", time.monotonic())]

            def seen(e: Any) -> None:  # when each entry of the recovery was appended
                marks.append((e.kind.value, time.monotonic()))

            s = Session.open(state_file.read_text(), paths=paths, model=model, on_event=seen)
            marks.append(("opened", time.monotonic()))
            env.rec("ready")
            env.rec("enter", rchar=io_read_bytes())
            t0 = time.monotonic()
            s.state()  # the log: its state record and the entries after it (recover() reuses it)
            log_ms = (time.monotonic() - t0) * 1000
            marks.append(("state", time.monotonic()))
            record = s._record_status  # how the log was read: "used (seq …)", "missing; …"
            s.recover()
            st = s.stats()
            start = st["turns"]
            restore = [e for e in s._read() if e.kind.value == "vm"]  # entries after the record
            marks.append(("recovered", time.monotonic()))
            env.rec(
                "x_detail",
                log_ms=round(log_ms, 1),
                record=record,
                restore_ms=restore[-1].payload.get("ms") if restore else None,
                lazy=self._lazy_stats(s),
                # the recovery's own timeline: ms since Session.open was called
                timeline=[(k, round((t - marks[0][1]) * 1000, 1)) for k, t in marks],
            )
        else:
            bulk = prefill_turns(w.turns)
            if bulk is not None:  # every N alike: made apart, the last K turns run here
                import time

                t0 = time.monotonic()
                builder = self._build_apart(spec, bulk)
                s = Session.open(state_file.read_text(), paths=paths, model=model)
                s.messages()  # held decoded, as by a worker that ran every turn itself
                env.rec("ready")
                env.rec("prefill", turns=bulk, s=round(time.monotonic() - t0, 1), builder=builder)
            else:
                s = self._create(spec, model)
                env.rec("ready")
            start = bulk or 0
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
    def _lazy_stats(s: Any) -> dict[str, Any] | None:
        """What the recovered VM's lazy memory server fetched by now (None: its RAM was
        not served lazily): where a recovery's restore time goes."""
        from torpor.vmm.lazymem import STATS_FILE

        vm = s.vm()
        try:
            got = json.loads((vm.dir / STATS_FILE).read_bytes()) if vm is not None else None
        except (OSError, ValueError):
            return None
        return got if isinstance(got, dict) else None

    def _create(self, spec: RunSpec, model: Any) -> Any:
        """The run's session, its id written where the recovering worker finds it."""
        from torpor.session import Session

        s = Session.create(
            IMAGE, model, name=spec.session_id, memory_mib=256, paths=self._paths(spec)
        )
        (spec.dir / "torpor-session").write_text(s.id)
        return s

    def _build_apart(self, spec: RunSpec, n: int) -> int:
        """Create the session and build its first ``n`` turns in bulk (:meth:`_prefill`;
        none if 0) in a child process; returns its pid.  Apart, because the bulk build
        reads the whole log back at once, which no worker running turn by turn does
        (its cache is trimmed at every checkpoint): in the worker, that read's
        transient memory stayed as a heap a few hundred MB larger at N = 10,000, which
        the kill -9 then paid for (exit ~70 ms instead of ~20).  The worker then opens
        the session and decodes its whole conversation, as one that ran every turn
        holds it.  Done for every N once the variable is set (N <= K too: the session
        is created apart), so that every row's crashed worker is the same kind of
        process: one that opened a session and ran its last turns."""
        import subprocess
        import sys

        path = spec.dir / "spec-build.json"
        path.write_text(json.dumps(spec.to_dict()))
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(path), str(n)])
        if proc.wait() != 0:
            raise RuntimeError(f"the bulk build of {n} turns failed (exit {proc.returncode})")
        return proc.pid

    def _build(self, spec: RunSpec, n: int) -> None:
        """The child's side of :meth:`_build_apart`."""
        from torpor.model import ScriptedModel

        def never(turn: int, index: int, messages: Any) -> Any:
            raise AssertionError("the bulk build calls no model")

        s = self._create(spec, ScriptedModel(never, name="thesis"))
        try:
            if n:
                self._prefill(s, spec.w, n)
        finally:
            s.close()

    def _prefill(self, s: Any, w: Workload, n: int) -> None:
        """Turns 0..n-1 built in bulk, for long sessions (N = 10,000 would take about an
        hour turn by turn under TCG): the log gets exactly the entries the built-in
        loop writes for each turn (user, model request/response, tool calls and
        results, final answer; the same payload shapes, MAC-chained by the log's own
        append, 1000 turns per transaction), the VM gets the effects of those turns
        (the workspace files as the last writes left them, turn 0's tick starting the
        background process, then one guest loop appending the journal and advancing
        the counter once per turn), and one checkpoint covers them all.  What differs
        from a session built turn by turn: one checkpoint (and snapshot) for the
        prefix instead of one per turn, so fewer checkpoints in the state and less
        stored; the log's length and content, the VM's state and every check are
        the same."""
        from torpor.context import Kind
        from torpor.context.model import encode_json
        from torpor.model import ModelResponse
        from torpor.session.tools import ToolResult, run_tool
        from torpor.vmm.manager import VMManager

        last: dict[str, str] = {}
        for t in range(n):
            for i in range(w.tools):
                last[w.tool_path(t, i)] = w.tool_content(t, i)
        with VMManager(s.paths).client(s.vm()) as c:
            for path, content in sorted(last.items()):
                r = run_tool(
                    c, "prefill", "write_file", {"path": f"{VM_DIR}/ws/{path}", "content": content}
                )
                assert not r.is_error, r.content
            # turn 0's tick starts the background process (120 s: once, under a TCG host
            # shared with other VM work, 30 s were not enough for it)
            r = run_tool(c, "prefill", "shell", {"cmd": _tick_cmd(0), "timeout": 120})
            assert not r.is_error, f"prefill tick 0: {r.content!r} (exit {r.exit_code})"
            if n > 1:
                out = c.exec(["sh", "-c", _bulk_ticks(1, n)], timeout=3600)
                assert out.stdout.decode().strip().endswith("ok"), out
        lg, sid, name = s._log, s.id, s.model.name
        msgs = 1  # the system message

        def rows(t: int) -> list[tuple[Kind, dict[str, Any]]]:
            nonlocal msgs
            first = self._first_step(w, t)
            out: list[tuple[Kind, dict[str, Any]]] = [(Kind.USER, {"content": w.user_text(t)})]
            msgs += 1
            out.append((Kind.MODEL_REQUEST, {"model": name, "step": 0, "messages": msgs}))
            out.append((Kind.MODEL_RESPONSE, first.to_json()))
            msgs += 1
            for i, call in enumerate(first.tool_calls):
                out.append(
                    (
                        Kind.TOOL_CALL,
                        {"id": call.id, "name": call.name, "arguments": call.arguments},
                    )
                )
                if i < w.tools:
                    size = len(w.tool_content(t, i).encode())
                    res = ToolResult(
                        call.id, call.name, f"wrote {size} bytes to {call.arguments['path']}"
                    )
                else:
                    res = ToolResult(call.id, call.name, f"tick {t} ok\n", exit_code=0)
                out.append((Kind.TOOL_RESULT, res.to_json()))
                msgs += 1
            out.append((Kind.MODEL_REQUEST, {"model": name, "step": 1, "messages": msgs}))
            out.append(
                (Kind.MODEL_RESPONSE, ModelResponse(text=f"done {t}", tool_calls=()).to_json())
            )
            msgs += 1
            return out

        for lo in range(0, n, 1000):
            with lg._tx("append", write=True) as tx:
                for t in range(lo, min(lo + 1000, n)):
                    for kind, payload in rows(t):
                        text, size = encode_json(payload, kind.value)
                        lg._append(tx, sid, kind, text, size, t + 1, None)
        s.checkpoint(reason="turn")

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
        """kill -9 every VM's shim and QEMU (pids from each VM's state.json; QEMU also by
        its command line): the VM dies with the worker.  The home's zygote (a pre-started
        shim fork server, :mod:`torpor.vmm.zygote`) is host infrastructure holding no
        session state, like the host's Restate or PostgreSQL server for the peers, and
        survives, as it would the crash of a worker on a host that stays up."""
        from torpor.vmm.state import alive, load_state

        home = Path(spec.conn["home"])
        vms = home / "vms"
        for d in vms.iterdir() if vms.is_dir() else ():
            with contextlib.suppress(Exception):
                st = load_state(d)
                for pid, start in ((st.shim_pid, st.shim_start), (st.qemu_pid, st.qemu_start)):
                    if pid and alive(pid, start):
                        os.kill(pid, signal.SIGKILL)
        marker = str(home).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if marker in cmd and b"qemu-system" in cmd:
                    os.kill(int(d.name), signal.SIGKILL)

    def teardown(self) -> None:
        """The zygote (left alive by kill_extra) ends with the sweep."""
        home = getattr(self, "home", None)
        if home is None:
            return
        marker = str(home).encode()
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


if __name__ == "__main__":  # the bulk build's child process (TorporPeer._build_apart)
    import sys

    TorporPeer()._build(RunSpec(**json.loads(Path(sys.argv[1]).read_text())), int(sys.argv[2]))

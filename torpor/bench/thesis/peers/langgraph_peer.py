"""``langgraph-{sqlite,postgres}[-delta]``: LangGraph with a durable checkpointer.

The graph is the agent loop, one node per step: ``model`` -> ``tool`` x k ->
``tick``; one ``invoke`` per turn on one thread.  With ``durability="sync"`` every
super-step writes a checkpoint before the next one starts.  The ``messages``
channel is either an ordinary reducer channel (the default: each checkpoint stores
the whole message list again) or, in the ``-delta`` variants, LangGraph's
``DeltaChannel`` (beta) that stores only the new writes plus a full snapshot every
``snapshot_frequency`` updates.  Recovery loads the latest checkpoint
(``get_state``) and resumes the interrupted node with ``invoke(None)``: there is no
replay of steps, but the whole state is deserialised.  Every node receives the whole
state, so the model step always sees the whole conversation.
"""

from __future__ import annotations

import operator
import sqlite3
from typing import Annotated, Any, TypedDict

from torpor.bench.thesis import pg
from torpor.bench.thesis.env import HostEnv, io_read_bytes
from torpor.bench.thesis.peers.base import DatabasePeer, RunSpec
from torpor.bench.thesis.workload import hash_messages


def concat_batches(state: list, writes: list) -> list:
    """DeltaChannel reducer: batching-invariant list append."""
    out = list(state)
    for w in writes:
        out.extend(w)
    return out


class LangGraphPeer(DatabasePeer):
    family = "checkpoint"
    db_prefix = "lg_"
    sqlite_file = "lg.sqlite"
    modules = ("langgraph", "langgraph.checkpoint.sqlite")
    styles = ("full",)

    def __init__(self, backend: str, delta: bool):
        super().__init__(backend)
        self.delta = delta
        self.name = f"langgraph-{backend}" + ("-delta" if delta else "")
        self.notes = (
            "DeltaChannel (beta): writes + snapshot every 100 updates"
            if delta
            else "a full checkpoint of the state after every step"
        )
        if backend == "postgres":
            self.modules = ("langgraph", "langgraph.checkpoint.postgres", "psycopg")

    def missing(self) -> str | None:
        why = super().missing()
        if why is None and self.delta:
            import importlib.util

            if importlib.util.find_spec("langgraph.channels.delta") is None:
                return "not offered: this LangGraph has no DeltaChannel"
        return why

    def _graph(self, spec: RunSpec, env: HostEnv, saver: Any) -> Any:
        from langgraph.graph import END, START, StateGraph

        w = spec.w
        if self.delta:
            from langgraph.channels.delta import DeltaChannel

            msgs_t = Annotated[list, DeltaChannel(concat_batches)]
        else:
            msgs_t = Annotated[list, operator.add]

        # built functionally: with postponed annotations a class body could not see
        # the local channel type
        State = TypedDict("State", {"messages": msgs_t, "turn": int, "step": int})  # noqa: UP013

        def model(s: dict) -> dict:
            t = s["turn"]
            ctx = s["messages"] if w.style == "full" else None
            return {"messages": [["assistant", env.model(t, ctx)]], "step": 0}

        def tool(s: dict) -> dict:
            i = s["step"]
            return {"messages": [["tool", env.write(s["turn"], i)]], "step": i + 1}

        def tick(s: dict) -> dict:
            return {"messages": [["tool", env.tick(s["turn"])]]}

        g = StateGraph(State)
        g.add_node("model", model)
        g.add_node("tool", tool)
        g.add_node("tick", tick)
        g.add_edge(START, "model")
        g.add_edge("model", "tool")
        g.add_conditional_edges(
            "tool", lambda s: "tool" if s["step"] < w.tools else "tick", ["tool", "tick"]
        )
        g.add_edge("tick", END)
        return g.compile(checkpointer=saver)

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        if self.backend == "sqlite":
            from langgraph.checkpoint.sqlite import SqliteSaver

            con = sqlite3.connect(spec.dir / "lg.sqlite", check_same_thread=False)
            saver = SqliteSaver(con)
            try:
                return self._run(spec, env, saver)
            finally:
                con.close()
        from langgraph.checkpoint.postgres import PostgresSaver

        dsn = f"host={spec.conn['socket_dir']} port={pg.PORT} user=postgres dbname={self._db(spec)}"
        with PostgresSaver.from_conn_string(dsn) as saver:
            saver.setup()
            return self._run(spec, env, saver)

    def _run(self, spec: RunSpec, env: HostEnv, saver: Any) -> str:
        w = spec.w
        graph = self._graph(spec, env, saver)
        cfg = {"configurable": {"thread_id": spec.session_id}, "recursion_limit": 10_000}
        # warm the lazy imports of the (de)serialiser so they do not count as replay
        graph.get_state({"configurable": {"thread_id": "warm-up"}})
        env.rec("ready")
        env.rec("enter", rchar=io_read_bytes())
        state = graph.get_state(cfg)
        env.rec.once(
            "restored", rchar=io_read_bytes(), messages=len(state.values.get("messages", []))
        )
        start = 0
        if state.values:
            start = state.values["turn"] + 1
            if state.next:  # the interrupted turn: resume its pending node
                graph.invoke(None, cfg, durability="sync")
                env.turn_done(state.values["turn"])
        for t in range(start, w.turns):
            env.turn_started(t)
            graph.invoke(
                {"messages": [["user", w.user_text(t)]], "turn": t, "step": 0},
                cfg,
                durability="sync",
            )
            env.turn_done(t)
        final = graph.get_state(cfg).values["messages"]
        return hash_messages([tuple(m) for m in final])

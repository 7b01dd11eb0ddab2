"""The systems under test.  ``get(name)`` builds one; ``ALL`` lists every name.

Imports of the engines happen inside each peer (``System.load`` / ``run``), so this
registry loads even where none of them is installed.
"""

from __future__ import annotations

from torpor.bench.thesis.peers.base import RunSpec, System

ALL = (
    "plain",
    "openai-agents",
    "dbos-sqlite",
    "dbos-postgres",
    "langgraph-sqlite",
    "langgraph-sqlite-delta",
    "langgraph-postgres",
    "langgraph-postgres-delta",
    "temporal",
    "restate",
    "torpor",
)


def get(name: str) -> System:
    if name == "plain":
        from torpor.bench.thesis.peers.plain import Plain

        return Plain()
    if name == "openai-agents":
        from torpor.bench.thesis.peers.openai_agents import OpenAIAgents

        return OpenAIAgents()
    if name.startswith("dbos-"):
        from torpor.bench.thesis.peers.dbos_peer import DBOSPeer

        return DBOSPeer(name.removeprefix("dbos-"))
    if name.startswith("langgraph-"):
        from torpor.bench.thesis.peers.langgraph_peer import LangGraphPeer

        backend, _, delta = name.removeprefix("langgraph-").partition("-")
        return LangGraphPeer(backend, delta == "delta")
    if name == "temporal":
        from torpor.bench.thesis.peers.temporal_peer import TemporalPeer

        return TemporalPeer()
    if name == "restate":
        from torpor.bench.thesis.peers.restate_peer import RestatePeer

        return RestatePeer()
    if name == "torpor":
        from torpor.bench.thesis.peers.torpor_peer import TorporPeer

        return TorporPeer()
    raise KeyError(f"unknown system {name!r}; known: {', '.join(ALL)}")


__all__ = ["ALL", "RunSpec", "System", "get"]

"""``openai-agents``: the OpenAI Agents SDK's ``SQLiteSession`` — a message store.

The floor for context-only durability: every item (user message, model output,
tool result) is appended to SQLite as it happens.  Recovery reads all items back
and continues from the first missing one.  Nothing records which side effects ran,
the workspace is whatever the host directory holds, and the background process is
gone.  Only the session store is used — the SDK's ``Runner`` needs a model provider,
and the deterministic model here is the workload's own function.
"""

from __future__ import annotations

import asyncio

from torpor.bench.thesis.env import HostEnv, io_read_bytes
from torpor.bench.thesis.peers.base import RunSpec, System, vacuumed_size
from torpor.bench.thesis.workload import hash_messages


def _to_item(role: str, content: str, call_id: str) -> dict:
    if role == "tool":
        return {"type": "function_call_output", "call_id": call_id, "output": content}
    return {"role": role, "content": content}


def _from_item(item: dict) -> tuple[str, str]:
    if item.get("type") == "function_call_output":
        return ("tool", item["output"])
    return (item["role"], item["content"])


class OpenAIAgents(System):
    name = "openai-agents"
    family = "context"
    modules = ("agents",)
    notes = "SQLiteSession: messages only; the app finds its place itself"

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        return asyncio.run(self._run(spec, env))

    async def _run(self, spec: RunSpec, env: HostEnv) -> str:
        from agents import SQLiteSession

        w = spec.w
        s = SQLiteSession(spec.session_id, str(spec.dir / "agents.db"))
        env.rec("ready")
        env.rec("enter", rchar=io_read_bytes())
        items = await s.get_items()
        messages = [_from_item(i) for i in items]
        env.rec("restored", rchar=io_read_bytes(), items=len(messages))
        pos = len(messages)
        for t in range(pos // w.per_turn, w.turns):
            env.turn_started(t)
            base = t * w.per_turn
            steps = [
                ("user", lambda t=t: w.user_text(t)),
                (
                    "assistant",
                    lambda t=t: env.model(
                        t, [list(m) for m in messages] if w.style == "full" else None
                    ),
                ),
            ]
            steps += [("tool", lambda t=t, i=i: env.write(t, i)) for i in range(w.tools)]
            steps.append(("tool", lambda t=t: env.tick(t)))
            for j, (role, fn) in enumerate(steps):
                if base + j < pos:
                    continue
                content = fn()
                messages.append((role, content))
                await s.add_items([_to_item(role, content, f"c{t}_{j}")])
            env.turn_done(t)
        s.close()
        return hash_messages(messages)

    def storage(self, spec: RunSpec) -> dict[str, int]:
        return {"bytes": vacuumed_size(spec.dir / "agents.db")}

"""``plain``: the workload with no durability at all, in memory.

The reference for "added latency per turn"; it is never crashed (it could only
start over).
"""

from __future__ import annotations

from torpor.bench.thesis.env import HostEnv
from torpor.bench.thesis.peers.base import RunSpec, System
from torpor.bench.thesis.workload import EMPTY_HASH, chain


class Plain(System):
    name = "plain"
    family = "baseline"
    crashes = False
    in_extra = False
    notes = "no durability; the latency floor"

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        w = spec.w
        env.rec("ready")
        h = EMPTY_HASH
        for t in range(w.turns):
            env.turn_started(t)
            h = chain(h, "user", w.user_text(t))
            h = chain(h, "assistant", env.model(t))
            for i in range(w.tools):
                h = chain(h, "tool", env.write(t, i))
            h = chain(h, "tool", env.tick(t))
            env.turn_done(t)
        return h

"""``torpor bench thesis``: torpor vs replay engines vs checkpointers, side by side.

Modules: ``workload`` (the deterministic session and its expected hashes), ``env``
(host workspace, background process, crash point, event recorder), ``harness``
(worker processes, kill -9, recovery timing, checks, the sweep), ``peers/`` (one
``System`` per engine), ``pg`` (a private PostgreSQL), ``report`` (tables, N*),
``plots`` (matplotlib), ``cli``.  See docs/thesis.md.
"""

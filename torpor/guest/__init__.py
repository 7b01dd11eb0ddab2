"""The program that runs inside the VM.

``agent.c`` is the guest agent: PID 1 of every torpor microVM and the server
side of docs/protocol.md. ``build.ensure_agent`` compiles it (statically, so it
needs nothing from the image) into a cache keyed by the source's hash.
"""

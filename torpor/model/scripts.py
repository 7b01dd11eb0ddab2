"""Built-in scripts for the ``scripted`` provider, as script documents (format version 1).

They are Python dicts rather than ``*.json`` package data so they ship without any
packaging configuration; each is exactly what a ``script.json`` file would hold and
is validated by :func:`torpor.model.scripted.parse_script` when it is opened.

Placeholders (see :mod:`torpor.model.scripted`): ``{turn}``, ``{user}``,
``{user_sh}`` (the user message quoted for ``sh``) and ``{last_result}``.  A step
with several tool calls relies on their results being appended in call order, so
``{last_result}`` in the next step is the result of the step's *last* call.
"""

from __future__ import annotations

from typing import Any

# written to a temporary file and renamed: a reader never sees a half-written count
_COUNTER_LOOP = (
    "i=0; while true; do i=$((i+1)); echo $i > /work/.counter && mv /work/.counter /work/counter; "
    "sleep 1; done"
)

#: The demo: start a service, come back later (maybe after a hibernate / restore)
#: and find it still counting; then keep a journal of whatever the user says.
DEMO: dict[str, Any] = {
    "version": 1,
    "description": "start a counter service, check on it later, then keep a journal",
    "turns": [
        {
            "description": "user: set up a counter service and tell me its port",
            "steps": [
                {
                    "text": "I'll make a workspace and write down the plan first.",
                    "tool_calls": [
                        {"name": "shell", "arguments": {"cmd": "mkdir -p /work"}},
                        {
                            "name": "write_file",
                            "arguments": {
                                "path": "/work/notes.md",
                                "content": (
                                    "# Notes\n\n"
                                    "Asked: {user}\n\n"
                                    "Plan: a background service that writes an increasing "
                                    "count to /work/counter every second.\n"
                                ),
                            },
                        },
                    ],
                },
                {
                    "text": "Now I'll start the counter in the background.",
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": (
                                    f"setsid sh -c '{_COUNTER_LOOP}' </dev/null >/dev/null 2>&1 & "
                                    "sleep 1; echo started"
                                ),
                            },
                        }
                    ],
                },
                {
                    "text": "Let me check that it is counting.",
                    "tool_calls": [{"name": "shell", "arguments": {"cmd": "cat /work/counter"}}],
                },
                {
                    "text": (
                        "The counter service is running in the background: it writes an "
                        "increasing count to /work/counter every second, and the count was "
                        "{last_result} when I looked. It has no port — it counts in a file "
                        "rather than listening on the network, so read /work/counter to "
                        "see it."
                    )
                },
            ],
        },
        {
            "description": "user: is the counter still running?",
            "steps": [
                {
                    "text": "Let me look.",
                    "tool_calls": [
                        {"name": "list_dir", "arguments": {"path": "/work"}},
                        {"name": "shell", "arguments": {"cmd": "cat /work/counter"}},
                    ],
                },
                {"text": "Yes — /work/counter now reads {last_result}, so it kept counting."},
            ],
        },
        {
            "description": "user: anything; it is appended to /work/journal (every later turn)",
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": "echo {user_sh} >> /work/journal && wc -l < /work/journal"
                            },
                        }
                    ]
                },
                {"text": "Noted ({last_result} notes)."},
            ],
        },
    ],
    "after_end": "repeat-last",
}

#: The benchmark: every turn appends to a file and dirties 4 KiB of fresh data, so
#: each checkpoint has a little new disk and memory to capture.
BENCH: dict[str, Any] = {
    "version": 1,
    "description": "every turn: one shell call that changes a few files, then 'ok N'",
    "turns": [
        {
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": (
                                    "mkdir -p /work && echo turn-{turn} >> /work/log && "
                                    "head -c 4096 /dev/urandom > /work/t{turn}"
                                )
                            },
                        }
                    ]
                },
                {"text": "ok {turn}"},
            ]
        }
    ],
    "after_end": "repeat-last",
}

BUILTIN_SCRIPTS: dict[str, dict[str, Any]] = {"demo": DEMO, "bench": BENCH}

__all__ = ["BENCH", "BUILTIN_SCRIPTS", "DEMO"]

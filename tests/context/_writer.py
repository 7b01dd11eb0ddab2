"""Subprocess driver for the multi-process context-log tests.

Usage: python -m tests.context._writer DSN SESSION_ID MODE COUNT TAG DELAY

MODE:
  burst    open the log, print READY, wait for a line on stdin, then append COUNT
           entries keyed TAG-0, TAG-1, ...
  forever  append entries keyed TAG-0, TAG-1, ... until killed
  slow     append COUNT entries keyed TAG-i, sleeping DELAY seconds after each

After each append *returns* (is acknowledged) it prints ``<seq> <key>`` and
flushes, so a parent that read a line knows that entry was acknowledged.
"""

from __future__ import annotations

import itertools
import sys
import time

from torpor.context import Kind, open_log


def main() -> None:
    dsn, session_id, mode, count, tag, delay = sys.argv[1:7]
    n, pause = int(count), float(delay)
    if mode not in ("burst", "forever", "slow"):
        raise SystemExit(f"unknown mode {mode}")
    with open_log(dsn) as log:
        if mode == "burst":
            print("READY", flush=True)
            sys.stdin.readline()
        indexes = itertools.count() if mode == "forever" else range(n)
        for i in indexes:
            key = f"{tag}-{i}"
            payload = {"writer": tag, "i": i, "text": "x" * 2048}
            e = log.append(session_id, Kind.TOOL_RESULT, payload, turn=1, key=key)
            print(f"{e.seq} {key}", flush=True)
            if mode == "slow":
                time.sleep(pause)


if __name__ == "__main__":
    main()

"""``python -m torpor.session.idle``: hibernate a session that stayed idle.

Started detached after every turn of a session created with ``idle > 0``.  It
sleeps, then hibernates the session only if no entry was appended since it was
armed and no one holds the session (a turn in progress arms its own watcher).
A session removed meanwhile is left alone (its VM is gone with it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from torpor.errors import NotFoundError, TorporError
from torpor.paths import Paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torpor.session.idle")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--session", required=True)
    ap.add_argument("--seq", required=True, type=int)
    ap.add_argument("--after", required=True, type=float)
    args = ap.parse_args(argv)
    time.sleep(args.after)
    from torpor.session.core import Session

    dsn = os.environ.get("TORPOR_CONTEXT_DSN") or None
    try:
        with Session.open(args.session, paths=Paths(args.root), dsn=dsn) as s:
            if s._log.last_seq(s.id) != args.seq:
                return 0  # something happened since: that activity armed a newer watcher
            try:
                with s._locked(wait=False):
                    if s._log.last_seq(s.id) == args.seq and s.status() == "running":
                        s._hibernate_locked()
            except BlockingIOError:
                return 0  # a turn is running; it re-arms when it ends
    except NotFoundError:
        return 0  # the session was removed meanwhile: nothing to hibernate
    except TorporError as e:
        print(f"torpor idle watcher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Subprocess driver for crash / gc-concurrency tests: a writer that stops where told.

Usage: python -m tests.store._writer STORE FILE MODE [PARENT_ID]

MODE:
  pause-chunks   put FILE; after 3 chunk writes print PAUSED and sleep (to be killed)
  pause-commit   put FILE, then in commit write a partial manifest temp, print PAUSED, sleep
  wait-commit    put FILE, print PUT, wait for a line on stdin, then commit; print the id
  loop           put FILE + commit, forever, changing FILE a little each round
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from torpor.store import ChunkStore
from torpor.store import store as store_mod


def pause() -> None:
    print("PAUSED", flush=True)
    while True:
        time.sleep(60)


def main() -> None:
    root, file, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    parent_id = sys.argv[4] if len(sys.argv) > 4 else None
    s = ChunkStore(root, threads=1)
    parent = s.get(parent_id).artifacts["disk"] if parent_id else None
    if mode == "pause-chunks":
        real = store_mod.ChunkStore._store_frame
        count = [0]

        def slow(self, h, frame):
            r = real(self, h, frame)
            count[0] += 1
            if count[0] == 3:
                pause()
            return r

        store_mod.ChunkStore._store_frame = slow
        s.put_file(file, chunk_size=64 * 1024, parent=parent)
    elif mode == "pause-commit":

        def partial(self, dest, data):
            fd, _ = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            pause()

        store_mod.ChunkStore._write_manifest = partial
        a, _ = s.put_file(file, chunk_size=64 * 1024, parent=parent)
        s.commit({"disk": a}, parent=parent_id)
    elif mode == "wait-commit":
        a, _ = s.put_file(file, chunk_size=64 * 1024, parent=parent)
        print("PUT", flush=True)
        sys.stdin.readline()
        m = s.commit({"disk": a}, parent=parent_id)
        print(m.id, flush=True)
    elif mode == "loop":
        n = 0
        while True:
            n += 1
            with open(file, "r+b") as f:
                f.seek((n * 7919 * 4096) % max(1, file.stat().st_size - 4096))
                f.write(os.urandom(4096))
            a, _ = s.put_file(file, chunk_size=64 * 1024, parent=parent)
            m = s.commit({"disk": a}, parent=parent_id, meta={"round": str(n)})
            parent, parent_id = a, m.id
            print(m.id, flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

"""A guest process that counts in memory, and how to read its count from the host."""

from __future__ import annotations

import time

# The count is written to a temp file and renamed over the old one, so a reader (or a
# snapshot taken at any instant) never sees a truncated, empty count file.
COUNTER = (
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/count.new; "
    "mv /dev/shm/count.new /dev/shm/count; sleep 0.05; done",
)


def count(mgr, vm) -> int:
    """The guest counter's value; waits (briefly) for its first write."""
    with mgr.client(vm) as c:
        for _ in range(100):
            out = c.exec(["cat", "/dev/shm/count"]).stdout.strip()
            if out:
                return int(out)
            time.sleep(0.05)
    raise AssertionError("the guest's counter never wrote /dev/shm/count")

"""``python -m torpor.sandbox.reaper``: kill a sandbox when its ``timeout`` is up.

Started detached (own session) by ``Sandbox.create(timeout=...)`` and
``set_timeout``, so the deadline holds after the creating process exits.  It
re-reads ``<vm dir>/sandbox.json`` every second (``set_timeout`` may move the
deadline, or clear it: then the watcher exits), and removes the VM once the
deadline has passed.  A VM removed meanwhile ends the watcher.  Several watchers
for one VM are harmless: the removal is idempotent.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from torpor.errors import NotFoundError, TorporError
from torpor.paths import Paths

POLL = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torpor.sandbox.reaper")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--vm", required=True)
    args = ap.parse_args(argv)
    from torpor.sandbox.core import _read_deadline
    from torpor.vmm.manager import VMManager

    paths = Paths(args.root)
    vm_dir = paths.vm(args.vm)
    while True:
        if not (vm_dir / "vm.json").exists():
            return 0  # removed meanwhile
        end_at = _read_deadline(vm_dir)
        if end_at is None:
            return 0  # set_timeout(None): no deadline any more
        left = end_at - time.time()
        if left <= 0:
            break
        time.sleep(min(POLL, left))
    try:
        VMManager(paths).remove(args.vm, force=True)
    except NotFoundError:
        return 0
    except TorporError as e:
        with contextlib.suppress(OSError):
            print(f"torpor sandbox reaper: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

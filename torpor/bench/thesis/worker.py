"""Worker process: ``python -m torpor.bench.thesis.worker SPEC.json``.

Runs (or, with ``recovering``, resumes) one system's session to its end and records
events in the run directory.  The harness starts it in a new process group and may
``kill -9`` that group at any time; nothing here cleans up on purpose.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.monotonic()


#: Environment: a folder; a recovering worker writes its cProfile there
#: (``recover-<session>.prof``; the harness's phases stay in events.jsonl).
PROFILE_ENV = "TORPOR_THESIS_PROFILE"


def main(argv: list[str]) -> int:
    from torpor.bench.thesis.env import HostEnv, Recorder

    spec_path = Path(argv[0])
    raw = json.loads(spec_path.read_text())
    run_dir = Path(raw["run_dir"])
    rec = Recorder(run_dir / "events.jsonl")
    rec("start", t_exec=T0, recovering=raw["recovering"])
    where = os.environ.get(PROFILE_ENV) if raw["recovering"] else None
    prof = None
    if where:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        from torpor.bench.thesis.peers import get
        from torpor.bench.thesis.peers.base import RunSpec

        spec = RunSpec(**raw)
        system = get(spec.system)
        system.load()  # the engine's own imports, timed as part of the restart
        env = HostEnv(run_dir, spec.w, spec.crash_turn, spec.recovering)
        env.rec = rec
        rec("imported")
        h = system.run(spec, env)
        if prof is not None:  # before "done": the harness may kill the worker after it
            prof.disable()
            prof.dump_stats(str(Path(str(where)) / f"recover-{spec.session_id}.prof"))
        rec("done", hash=h)
        return 0
    except BaseException as e:
        rec("error", type=type(e).__name__, msg=str(e)[:2000], tb=traceback.format_exc()[-4000:])
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

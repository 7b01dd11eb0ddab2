"""Shared settings for the fuzzers (hypothesis): bounded in CI, as long as you like by hand.

``TORPOR_FUZZ_EXAMPLES`` sets the examples per fuzz test (default 150: a few
seconds each, what CI runs).  A longer run by hand, e.g. 20,000 examples each:

    TORPOR_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/fuzz -q

No example database is written into the tree: a failure prints its minimal
example (and ``@reproduce_failure`` blob) in the report instead.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("TORPOR_FUZZ_EXAMPLES", "150"))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # TCG VMs share these cores: no per-example wall-clock limit
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

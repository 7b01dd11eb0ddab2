"""``torpor serve``: the library as an HTTP service, for one host's VMs and sessions.

Layering (the brief's "one library API, many faces"): every route is a thin
translation of one library call — :class:`torpor.Session`, :class:`torpor.Sandbox`,
the snapshot and image functions — plus the three things only a network face needs:

- **who** (``tokens``, ``tenancy``): a bearer token names one namespace; a namespace
  is a separate torpor home (``$TORPOR_HOME/namespaces/<ns>``; ``default`` is the
  home itself), so another namespace's resources do not exist for a request — 404,
  never 403 — and no library call can reach across (separate VMs, stores, logs, keys);
- **how much** (``app``): request body caps, per-token rate limits (429 +
  Retry-After), idempotency keys on creates and sends;
- **errors** (``problems``): every failure is an RFC 9457 problem-details body
  carrying the project's error class and exit code.

The server holds no state a restart needs: VMs live in their shims, sessions in
their logs; ``torpor serve`` after a kill -9 finds them all again.
"""

"""Several hosts sharing one PostgreSQL context log and one bucket.

- :mod:`torpor.cluster.host`: this host's identity (``host_id``).
- :mod:`torpor.cluster.failover`: claiming the sessions of a host whose leases
  expired and bringing each back here, as a local recovery does.

Leases and fencing themselves live in the context log (``ContextLog.claim``,
``heartbeat``, ``append(..., fence=...)``): the database is the only coordinator.
"""

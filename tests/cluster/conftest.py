"""Three "hosts" on one machine: separate homes (own caches, VMs and host ids, the same
store key), one real PostgreSQL database, one real SeaweedFS bucket, lease TTL 3 s.

Hosts A and B run as ``torpor serve`` processes (started and stopped by the tests,
by PID); C is this process and its CLI subprocesses.  One database and one bucket per
module (cheap to share: each test makes its own sessions).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pgserver import fresh_database
from torpor.bench.cluster import Host, _env, make_home
from torpor.context import ContextLog, open_log
from torpor.paths import Paths

TTL = 3.0


@dataclass
class Cluster:
    dsn: str
    env: dict[str, str]  # a host process's environment (TORPOR_HOME added per host)
    a: Host
    b: Host
    c: Paths

    def log(self) -> ContextLog:
        return open_log(self.dsn, paths=self.c)

    @contextlib.contextmanager
    def as_c(self) -> Iterator[None]:
        """This process acting as host C (its store, DSN and TTL in the environment)."""
        keys = ("TORPOR_STORE", "TORPOR_CONTEXT_DSN", "TORPOR_LEASE_TTL", "TORPOR_HOST_ID")
        aws = {k: v for k, v in self.env.items() if k.startswith("AWS_")}
        with _env({**{k: self.env.get(k) for k in keys}, **aws, "TORPOR_HOME": str(self.c.root)}):
            yield

    def c_env(self) -> dict[str, str]:
        return {**self.env, "TORPOR_HOME": str(self.c.root)}


@pytest.fixture(scope="module")
def cluster_db(pg_admin_dsn: str) -> Iterator[str]:
    with fresh_database(pg_admin_dsn, "torpor_cluster") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def cluster(
    cluster_db: str,
    s3_server: Any,
    paths: Paths,
    tools_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    import os

    bucket = s3_server.make_bucket(f"t-cluster-{secrets.token_hex(4)}")
    env = {k: v for k, v in os.environ.items() if k != "TORPOR_HOST_ID"}
    env |= s3_server.env(bucket, "torpor")
    env |= {"TORPOR_CONTEXT_DSN": cluster_db, "TORPOR_LEASE_TTL": f"{TTL:g}"}
    root: Path = tmp_path_factory.mktemp("cluster")
    hosts = [Host(n, make_home(root / n, paths), env) for n in ("a", "b")]
    c = make_home(root / "c", paths)
    try:
        yield Cluster(cluster_db, env, hosts[0], hosts[1], c)
    finally:
        import signal

        for h in hosts:
            h.stop(signal.SIGKILL)
        for h in (*hosts, Host("c", c, env)):
            h.remove_vms()

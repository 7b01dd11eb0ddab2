"""A real private PostgreSQL server for the tests (fixtures ``pg_admin_dsn``, ``pg_dsn``).

PostgreSQL is real: one private server per test session, started from Debian's
``postgresql`` package in a temp dir, listening only on a unix socket there
(no TCP port to collide with), and stopped by PID at teardown.  Postgres refuses
to run as root, so under root it runs as the ``postgres`` system user (setuid in
the child, no wrapper process, so the PID we hold is the postmaster's).  Each test
gets its own database.  ``TORPOR_TEST_PG_DSN=postgresql://...`` uses that server
instead (it needs CREATE DATABASE).  Missing binaries fail the tests: a skip would
hide a backend that was never tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_ENV = "TORPOR_TEST_PG_DSN"
PG_PORT = 5432  # only names the socket file, inside our private socket dir


def _pg_bindir() -> Path:
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/postgres):"
            " run scripts/setup (it installs the Debian `postgresql` package), or point"
            f" {PG_ENV} at a server with CREATE DATABASE rights",
            pytrace=False,
        )
    newest = max(found, key=lambda p: int(Path(p).parts[-3]))
    return Path(newest).parent


def _die_with_parent() -> None:
    """In the server's child: get SIGINT (fast shutdown) if pytest dies without teardown."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class PgServer:
    """A throwaway PostgreSQL cluster: initdb, start, wait until it answers, stop."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        # not pytest's tmp dir: that is 0700 and the postgres user could not enter it
        self.base = Path(tempfile.mkdtemp(prefix="torpor-pg-"))
        self.data, self.sock, self.log = self.base / "data", self.base / "sock", self.base / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(
                    "running as root but there is no `postgres` user to run the"
                    " test server as: run scripts/setup",
                    pytrace=False,
                )
            self.as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir()
        if self.as_user:
            os.chown(self.sock, self.as_user["user"], self.as_user["group"])
        self.dsn = f"postgresql://postgres@/postgres?host={self.sock}&port={PG_PORT}"

    def start(self) -> str:
        initdb = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        r = subprocess.run(initdb, cwd=self.base, capture_output=True, timeout=120, **self.as_user)
        if r.returncode != 0:
            pytest.fail(
                f"initdb failed ({r.returncode}): {' '.join(initdb)}\n"
                f"{r.stdout.decode()}{r.stderr.decode()}",
                pytrace=False,
            )
        server = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-k",
            str(self.sock),
            "-p",
            str(PG_PORT),
            "-c",
            "listen_addresses=",
            "-c",
            "max_connections=40",
            "-c",
            "shared_buffers=16MB",
        ]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                server,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                **self.as_user,
            )
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"postgres exited ({self.proc.returncode}) at start:"
                    f" {' '.join(server)}\n{self.log_tail()}",
                    pytrace=False,
                )
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return self.dsn
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"postgres did not accept connections in 60 s\n{self.log_tail()}",
                        pytrace=False,
                    )
                time.sleep(0.05)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: ours, or the one in ``TORPOR_TEST_PG_DSN``."""
    env = os.environ.get(PG_ENV)
    if env:
        yield env
        return
    server = PgServer()
    try:
        yield server.start()
    finally:
        server.stop()


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        pytest.fail(f"{PG_ENV} must be a postgresql:// URL", pytrace=False)
    return urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def fresh_database(admin_dsn: str, prefix: str = "torpor_test") -> Iterator[str]:
    """A new, empty database on ``admin_dsn``'s server (its DSN), dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_db(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    with fresh_database(pg_admin_dsn) as dsn:
        yield dsn

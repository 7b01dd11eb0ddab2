"""A private PostgreSQL server for the peers that run on PostgreSQL.

Debian's server binaries, a fresh cluster in a temporary directory owned by the
``postgres`` user (the server refuses to run as root), listening on a Unix socket
only — no TCP port, so parallel runs on a shared machine cannot collide.  Started
with ``Popen(user="postgres")`` so the pid we hold is the postmaster itself; stopped
by that pid: SIGINT (fast shutdown), a timed wait, then SIGKILL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from torpor.bench.thesis.env import stop_process

PORT = 5432  # only names the socket file; nothing listens on TCP


class PostgresError(RuntimeError):
    pass


def pg_bindir() -> Path | None:
    base = Path("/usr/lib/postgresql")
    if not base.is_dir():
        return None
    versions = sorted(
        (p for p in base.iterdir() if (p / "bin" / "postgres").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return versions[-1] / "bin" if versions else None


def missing() -> str | None:
    if pg_bindir() is None:
        return "not installed: PostgreSQL server (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user to run the server as"
    return None


class PrivateServer:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_dir(self) -> str:
        assert self.dir is not None
        return str(self.dir / "sock")

    def dsn(self, db: str = "postgres") -> str:
        return f"host={self.socket_dir} port={PORT} user=postgres dbname={db}"

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@/{db}?host={self.socket_dir}&port={PORT}"

    def start(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise PostgresError("PostgreSQL server binaries not found")
        pw = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="torpor-thesis-pg-"))
        (self.dir / "sock").mkdir()
        for p in (self.dir, self.dir / "sock"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        kw = {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": [],
            "cwd": str(self.dir),
            "env": {"PATH": "/usr/bin:/bin", "LANG": "C"},
        }
        r = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            text=True,
            **kw,
        )
        if r.returncode != 0:
            raise PostgresError(f"initdb failed ({r.returncode}): {r.stderr[-2000:]}")
        with open(self.dir / "server.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(PORT),
                    "-k",
                    self.socket_dir,
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=64MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **kw,
            )
        deadline = time.monotonic() + 30
        while not (Path(self.socket_dir) / f".s.PGSQL.{PORT}").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "server.log").read_text()[-2000:]
                self.stop()
                raise PostgresError(f"postgres did not start: {tail}")
            time.sleep(0.05)
        # the socket exists a little before the server accepts connections
        import psycopg

        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def execute(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as con:
            cur = con.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_db(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.execute(f'CREATE DATABASE "{name}"')

    def drop_db(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def db_size(self, name: str) -> int:
        self.execute("CHECKPOINT")
        return int(self.execute(f"SELECT pg_database_size('{name}')")[0][0])

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, timeout=20)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

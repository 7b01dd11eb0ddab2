"""The ``System`` interface every peer implements, and the per-run spec.

Lifecycle, driven by :mod:`torpor.bench.thesis.harness`::

    missing()            in the harness: None, or why the system cannot run here
    setup(root)          in the harness, once per system: start servers -> conn dict
    prepare(spec)        in the harness, per run: create the database
    run(spec, env)       in a worker process (twice when crashed): run or resume the
                         session to its end; returns the message hash of the state
                         the system rebuilt
    kill_extra(spec)     in the harness, right after kill -9 of the worker's group:
                         kill what the system runs outside that group (torpor's VM)
    inspect(spec)        in the harness, after the run: workspace hashes, counter,
                         background process (default: the host directory)
    storage(spec)        in the harness, after the run: bytes the session occupies
    drop(spec)           in the harness, per run: remove the run's database
    teardown()           in the harness, once: stop servers (always runs)

``run`` must emit, through ``env.rec``, ``ready`` (engine up), ``enter`` (engine
starts rebuilding this session) and ``restored`` (state rebuilt) in a recovery
worker; :class:`~torpor.bench.thesis.env.HostEnv` emits ``crash``, ``rerun`` and
``next`` itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torpor.bench.thesis.env import HostEnv, bg_alive
from torpor.bench.thesis.workload import Workload, sha256_text


@dataclass
class RunSpec:
    system: str
    workload: dict[str, Any]
    run_dir: str
    session_id: str
    crash_turn: int = -1
    recovering: bool = False
    conn: dict[str, Any] = field(default_factory=dict)

    @property
    def w(self) -> Workload:
        return Workload.from_dict(self.workload)

    @property
    def dir(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class System:
    name = "?"
    family = "?"  # replay | checkpoint | context | snapshot | baseline
    #: Python modules (or other requirements) the system needs
    modules: tuple[str, ...] = ()
    #: in the ``bench`` extra, so its absence is a failure in CI, not a skip
    in_extra = True
    styles: tuple[str, ...] = ("delta",)
    #: continue-as-new / fork every K turns is offered
    every: bool = False
    crashes = True
    notes = ""

    def missing(self) -> str | None:
        for m in self.modules:
            if importlib.util.find_spec(m) is None:
                return f"not installed: python module {m!r} (pip install 'torpor[bench]')"
        return None

    def load(self) -> None:
        """Import the engine (in the worker, so the import counts as restart time)."""
        for m in self.modules:
            importlib.import_module(m)

    def setup(self, root: Path) -> dict[str, Any]:
        return {}

    def prepare(self, spec: RunSpec) -> None:
        pass

    def run(self, spec: RunSpec, env: HostEnv) -> str:
        raise NotImplementedError

    def kill_extra(self, spec: RunSpec) -> None:
        pass

    def inspect(self, spec: RunSpec) -> dict[str, Any]:
        ws = spec.dir / "ws"
        files = (
            {
                p.name: sha256_text(p.read_text())
                for p in sorted(ws.iterdir())
                if p.is_file() and not p.name.endswith(".tmp")
            }
            if ws.is_dir()
            else {}
        )
        journal = (ws / "journal").read_text().split() if (ws / "journal").exists() else []
        pid = bg_alive(spec.dir)
        try:
            counter = int((spec.dir / "counter").read_text().strip())
        except (OSError, ValueError):
            counter = None
        return {
            "files": files,
            "journal": journal,
            "bg_alive": pid is not None,
            "counter": counter if pid is not None else None,
        }

    def storage(self, spec: RunSpec) -> dict[str, int]:
        return {}

    def socket_io(self) -> bool:
        """Recovery reads its state over a socket: ``rchar`` cannot count it."""
        return False

    def drop(self, spec: RunSpec) -> None:
        pass

    def teardown(self) -> None:
        pass


def vacuumed_size(db: Path) -> int:
    """Size of a SQLite file after VACUUM (WAL checkpointed first)."""
    import sqlite3

    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("VACUUM")
    finally:
        con.close()
    return db.stat().st_size


class DatabasePeer(System):
    """A peer that keeps its state in SQLite (one file per session) or in a private
    PostgreSQL server (one database per session): setup, sizes and teardown for both.

    Subclasses set ``db_prefix`` (database name prefix) and ``sqlite_file``.
    """

    db_prefix = ""
    sqlite_file = ""

    def __init__(self, backend: str):
        self.backend = backend
        self.server: Any = None  # pg.PrivateServer when backend == "postgres"
        self._empty = 0

    def missing(self) -> str | None:
        from torpor.bench.thesis import pg

        return super().missing() or (pg.missing() if self.backend == "postgres" else None)

    def setup(self, root: Path) -> dict[str, Any]:
        from torpor.bench.thesis import pg

        if self.backend != "postgres":
            return {}
        self.server = pg.PrivateServer()
        self.server.start()
        return {"socket_dir": self.server.socket_dir}

    def _db(self, spec: RunSpec) -> str:
        return self.db_prefix + spec.session_id.replace("-", "_")

    def prepare(self, spec: RunSpec) -> None:
        if self.server is not None:
            self.server.create_db(self._db(spec))
            self._empty = self.server.db_size(self._db(spec))

    def storage(self, spec: RunSpec) -> dict[str, int]:
        if self.server is not None:
            raw = self.server.db_size(self._db(spec))
            return {"bytes": raw - self._empty, "db_bytes": raw}
        return {"bytes": vacuumed_size(spec.dir / self.sqlite_file)}

    def socket_io(self) -> bool:
        return self.backend == "postgres"

    def drop(self, spec: RunSpec) -> None:
        if self.server is not None:
            self.server.drop_db(self._db(spec))

    def teardown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

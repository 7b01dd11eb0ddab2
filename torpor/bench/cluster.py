"""``torpor bench cluster``: several hosts, one PostgreSQL log, one bucket — what it costs.

Hosts are separate homes on this machine (their own cache, VMs and host id; the same
store key file), each a ``torpor serve`` process with failover on, sharing one
PostgreSQL database (``--dsn`` / ``TORPOR_CONTEXT_DSN``) and one bucket (``--store
s3://...`` with the AWS configuration, or a private SeaweedFS started here).

What one run measures:

1. **checkpoint durable time per turn, local vs bucket**: one VM per store (a home
   whose store is its folder, and one whose store is the bucket), ``--turns``
   snapshots with a few files changed between two; per snapshot the time to the
   durable point, stored bytes, and with the bucket the bytes and requests sent;
2. **cold restore from the bucket**: the last bucket snapshot restored on a fresh
   home with an empty cache: time to a running VM, and the bytes it fetched into its
   cache over the snapshot's stored bytes (its chunks' frames, bases of deltas
   included, plus its manifest); chunks fetched that are not the snapshot's (a base
   image materialized from the bucket) are reported apart;
3. **failover**: a session runs on host H (a ``torpor serve``); H is killed -9 (its
   server and its VMs: the whole host is gone) and a client sends the session's next
   message to another host T, retrying while H's lease is still live (409).  The time
   from the kill to T's answer, ``--rounds`` times, each time to a *fresh* host (cold
   cache): p50/p95 against the target lease TTL + 2 s.

The homes get the source home's images by hard link (a base disk is 8 GiB sparse),
its guest kernel folder by symlink and its store key by copy.  Everything is made in
a temporary folder and removed at the end; every process started is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.stats import machine, set_env, summary
from torpor.paths import Paths

TTL_DEFAULT = 3.0

#: the scripted model of the failover rounds: every turn appends one line to a journal
JOURNAL_SCRIPT: dict[str, Any] = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": "echo {user_sh} >> /root/journal; wc -l < /root/journal"
                            },
                        }
                    ]
                },
                {"text": "lines: {last_result}"},
            ]
        }
    ],
    "after_end": "repeat-last",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_home(root: Path, source: Paths) -> Paths:
    """A new home for one host: the source home's store key (one per deployment), its
    images by hard link, its guest kernel folder by symlink; nothing else."""
    from torpor.store.store import load_key

    load_key(source.store)  # made on first use: the source home may not have one yet
    paths = Paths(root).ensure()
    paths.store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source.store / "key", paths.store / "key")
    for d in ("images", "blobs"):
        if (source.root / d).is_dir():
            shutil.copytree(
                source.root / d, paths.root / d, dirs_exist_ok=True, copy_function=os.link
            )
    shutil.rmtree(paths.guest, ignore_errors=True)
    os.symlink(source.guest.resolve(), paths.guest)
    return paths


class Host:
    """One host: a home and the environment of its processes (``torpor serve``)."""

    def __init__(self, name: str, paths: Paths, env: dict[str, str]) -> None:
        self.name = name
        self.paths = paths
        self.env = {**env, "TORPOR_HOME": str(paths.root)}
        self.env.pop("TORPOR_HOST_ID", None)  # one id per home: each home is a host
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = paths.root / "serve.log"

    @property
    def host_id(self) -> str:
        from torpor.cluster.host import host_id

        with _env({"TORPOR_HOST_ID": None}):
            return host_id(self.paths)

    def start(self, *, failover: bool = True, timeout: float = 60) -> Host:
        """``torpor --allow-tcg serve`` on a free loopback port, until /healthz answers."""
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "torpor.cli.main", "--allow-tcg", "serve"]
        argv += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
        argv += ["--failover" if failover else "--no-failover"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"{self.name}: torpor serve did not come up: {self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (by its PID): SIGTERM, or ``sig``; SIGKILL after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill_vms(self) -> list[str]:
        """SIGKILL this home's VMs (their QEMU and shim, by the PIDs their state records):
        with :meth:`stop` (SIGKILL) the whole host is gone, as in a power cut."""
        from torpor.vmm.manager import VMManager

        killed = []
        for vm in VMManager(self.paths).list():
            for pid in (vm.state.qemu_pid, vm.state.shim_pid):
                if pid > 0:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            killed.append(vm.id)
        return killed

    def remove_vms(self) -> None:
        from torpor.errors import TorporError
        from torpor.vmm.manager import VMManager

        mgr = VMManager(self.paths)
        for vm in mgr.list():
            with contextlib.suppress(TorporError):
                mgr.remove(vm.id, force=True)


@contextlib.contextmanager
def _env(values: dict[str, str | None]):
    """This process's environment with ``values`` set (None: unset), restored after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        set_env(values)
        yield
    finally:
        set_env(old)


def _snapshot_stored_bytes(src: Paths, snap_id: str) -> tuple[int, set[str]]:
    """A snapshot's stored bytes in the home that wrote it (its chunk frames, bases of
    deltas included, plus its manifest) and the chunk set counted."""
    from torpor.store import ChunkStore

    with ChunkStore(src.store) as st:
        m = st.get(snap_id)
        need = set(m.chunks)
        frontier = sorted(need)
        while frontier:
            bases = {b for b in map(st._base_of, frontier) if b} - need
            need |= bases
            frontier = sorted(bases)
        stored = sum(st.frame_size(h) or 0 for h in need)  # loose or packed
        return stored + st.manifest_bytes(m.id), need


def _cache_chunks(paths: Paths) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (paths.store / "chunks").glob("*/*") if p.is_file()}


def _checkpoints(
    paths: Paths, image: str, turns: int, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], str]:
    """``turns`` snapshots of one VM on ``paths`` (its store as the environment says);
    per snapshot: durable time, stored bytes, bucket bytes/requests when there is one."""
    from torpor.snapshot import snapshot
    from torpor.vmm.manager import RunRequest, VMManager

    mgr = VMManager(paths)
    image_id = mgr.images.get(image).id
    vm = mgr.run(
        RunRequest(image=image_id, command=("sleep", "infinity"), memory_mib=256, network=False)
    )
    rows: list[dict[str, Any]] = []
    last = ""
    try:
        for i in range(turns):
            with mgr.client(vm) as c:
                c.exec(["sh", "-c", f"seq {i * 1000} {i * 1000 + 5000} > /root/turn-{i}; sync"])
            res = snapshot(mgr, vm.id, tag=f"bench-cluster-{i}")
            t = res.timings
            rows.append(
                {
                    "durable_ms": res.durable_ms,
                    "pause_ms": res.pause_ms,
                    "stored_bytes": res.stored_bytes,
                    "new_chunks": res.new_chunks,
                    "upload_bytes": t.get("upload_bytes"),
                    "upload_requests": t.get("upload_requests"),
                    "commit_bucket_ms": t.get("commit_bucket_ms"),
                }
            )
            last = res.manifest.id
            say(f"  checkpoint {i}: {res.durable_ms:.0f} ms durable")
    finally:
        mgr.remove(vm.id, force=True)
    return rows, last


def _failover_round(
    holder: Host, taker: Host, sid: str, text: str, timeout: float
) -> dict[str, Any]:
    """Kill -9 ``holder`` (server and VMs) and send ``text`` to ``taker`` until it
    answers; the time from the kill to the answer."""
    import httpx

    holder.stop(signal.SIGKILL)
    t0, wall0 = time.perf_counter(), time.time()
    holder.kill_vms()
    conflicts = 0
    with httpx.Client(base_url=taker.url, timeout=timeout) as c:
        while True:
            r = c.post(
                f"/v1/sessions/{sid}/messages",
                json={"text": text},
                headers={"Idempotency-Key": text},  # a retry never sends it twice
            )
            if r.status_code == 200:
                break
            if r.status_code != 409 or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{taker.name}: {r.status_code} {r.text[:500]}")
            conflicts += 1
            time.sleep(0.1)
        ms = (time.perf_counter() - t0) * 1000
        entries = c.get(f"/v1/sessions/{sid}/log", params={"limit": 1000}).json()["entries"]
    vm_entry = [e for e in entries if e["kind"] == "vm"][-1]
    vm = vm_entry["payload"]
    return {
        "ms": ms,
        # where the time went: the lease running out, then the restore, then the turn
        "vm_logged_after_ms": (vm_entry["created"] - wall0) * 1000,
        "answer": r.json().get("answer"),
        "retries_409": conflicts,
        "vm_reason": vm.get("reason"),
        "restore_ms": vm.get("ms"),
    }


def run_cluster_bench(
    *,
    source: Paths,
    image: str,
    dsn: str,
    store_url: str | None,
    turns: int,
    rounds: int,
    ttl: float,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    import httpx

    from torpor.bench.store_s3 import _Weed
    from torpor.errors import UsageError

    if not dsn.lower().startswith(("postgresql://", "postgres://")):
        raise UsageError(
            "bench cluster needs a PostgreSQL context log that every host shares: "
            "--dsn postgresql://... (or TORPOR_CONTEXT_DSN)"
        )
    work = Path(tempfile.mkdtemp(prefix="torpor-bench-cluster-"))
    weed: _Weed | None = None
    hosts: list[Host] = []
    aws = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    # a private SeaweedFS sets this process's AWS_*: they are restored after
    with _env({k: os.environ.get(k) for k in aws}):
        try:
            if not store_url:
                say("starting a private SeaweedFS on loopback")
                weed = _Weed(work / "weed").start()  # (sets the AWS_* of this process)
                store_url = "s3://torpor-bench/cluster-" + secrets.token_hex(4)
            base_env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
            base_env |= {
                "TORPOR_CONTEXT_DSN": dsn,
                "TORPOR_STORE": store_url,
                "TORPOR_LEASE_TTL": f"{ttl:g}",
                "TORPOR_ALLOW_TCG": "1",
            }
            # 1. checkpoints: local store vs bucket (one VM each, in this process)
            results: dict[str, Any] = {}
            local = make_home(work / "ck-local", source)
            with _env({"TORPOR_STORE": "local", "TORPOR_HOME": str(local.root)}):
                say(f"checkpoints, local store: {turns}")
                rows_local, _ = _checkpoints(local, image, turns, say)
            remote = make_home(work / "ck-bucket", source)
            with _env({"TORPOR_STORE": store_url, "TORPOR_HOME": str(remote.root)}):
                say(f"checkpoints, bucket: {turns}")
                rows_bucket, last = _checkpoints(remote, image, turns, say)

            def col(rows: list[dict[str, Any]], k: str) -> dict[str, float]:
                return summary([float(r[k]) for r in rows[1:] if r.get(k) is not None])

            results["checkpoints"] = {
                mode: {
                    "first_durable_ms": rows[0]["durable_ms"],
                    "turn_durable_ms": col(rows, "durable_ms"),
                    "turn_pause_ms": col(rows, "pause_ms"),
                    "turn_stored_bytes": col(rows, "stored_bytes"),
                    "turn_upload_bytes": col(rows, "upload_bytes"),
                    "turn_upload_requests": col(rows, "upload_requests"),
                }
                for mode, rows in (("local", rows_local), ("bucket", rows_bucket))
            }
            # 2. cold restore of the last bucket snapshot on a fresh home
            say("cold restore from the bucket on a fresh home")
            cold = make_home(work / "cold", source)
            stored, need = _snapshot_stored_bytes(remote, last)
            with _env({"TORPOR_STORE": store_url, "TORPOR_HOME": str(cold.root)}):
                from torpor.snapshot import restore
                from torpor.vmm.manager import VMManager

                mgr = VMManager(cold)
                t0 = time.perf_counter()
                try:
                    restore(mgr, last)
                    cold_ms = (time.perf_counter() - t0) * 1000
                finally:
                    Host("cold", cold, base_env).remove_vms()
            got = _cache_chunks(cold)
            fetched = sum(n for h, n in got.items() if h in need)
            results["cold_restore"] = {
                "ms": cold_ms,
                "bytes_fetched": fetched,
                "bytes_fetched_other": sum(n for h, n in got.items() if h not in need),
                "snapshot_stored_bytes": stored,
                "fetched_over_stored": fetched / stored if stored else float("nan"),
            }
            # 3. failover rounds: kill -9 the holder, the next message answered elsewhere
            say(f"failover: {rounds} rounds, lease TTL {ttl:g} s")

            def new_host(i: int) -> Host:
                h = Host(f"host-{i}", make_home(work / f"host-{i}", source), base_env)
                hosts.append(h)
                return h.start()

            holder = new_host(0)
            with httpx.Client(base_url=holder.url, timeout=300) as c:
                r = c.post(
                    "/v1/sessions", json={"script": JOURNAL_SCRIPT, "name": "bench-failover"}
                )
                if r.status_code != 201:
                    raise RuntimeError(f"create: {r.status_code} {r.text[:500]}")
                sid = r.json()["id"]
                r = c.post(f"/v1/sessions/{sid}/messages", json={"text": "turn 0"})
                if r.status_code != 200:
                    raise RuntimeError(f"turn 0: {r.status_code} {r.text[:500]}")
            rows = []
            for i in range(1, rounds + 1):
                taker = new_host(i)  # cold: a home that never saw the session
                row = _failover_round(holder, taker, sid, f"turn {i}", timeout=max(120, 10 * ttl))
                say(
                    f"  round {i}: {row['ms']:.0f} ms from the kill to the answer ({row['answer']})"
                )
                rows.append(row)
                holder.remove_vms()
                holder = taker
            answers = [r["answer"] for r in rows]
            results["failover"] = {
                "ms": summary([r["ms"] for r in rows]),
                "vm_logged_after_ms": summary([r["vm_logged_after_ms"] for r in rows]),
                "restore_ms": summary([float(r["restore_ms"] or 0) for r in rows]),
                "target_ms": (ttl + 2) * 1000,
                "rounds": rows,
                "journal_lines_last": answers[-1] if answers else None,
            }
            with contextlib.suppress(Exception), httpx.Client(base_url=holder.url, timeout=60) as c:
                c.delete(f"/v1/sessions/{sid}")
            return {
                "bench": "cluster",
                "machine": machine(),
                "bucket": "private SeaweedFS on loopback" if weed else store_url,
                "params": {"turns": turns, "rounds": rounds, "lease_ttl": ttl, "image": image},
                **results,
            }
        finally:
            for h in hosts:
                h.stop(signal.SIGKILL)
                h.kill_vms()
                h.remove_vms()
            if weed is not None:
                weed.stop()
            shutil.rmtree(work, ignore_errors=True)


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    ck = result["checkpoints"]
    t = Table(title=f"torpor bench cluster ({result['bucket']})")
    t.add_column("checkpoint of a VM, per turn")
    t.add_column("local store", justify="right")
    t.add_column("bucket", justify="right")

    def cell(mode: str, k: str) -> str:
        v = ck[mode].get(k)
        if not v or not v.get("n"):
            return "-"
        return f"{v['p50']:.0f} / {v['p95']:.0f}"

    t.add_row("first durable (ms)", *(f"{ck[m]['first_durable_ms']:.0f}" for m in ck))
    t.add_row("durable p50 / p95 (ms)", *(cell(m, "turn_durable_ms") for m in ck))
    t.add_row("pause p50 / p95 (ms)", *(cell(m, "turn_pause_ms") for m in ck))
    t.add_row("stored bytes p50 / p95", *(cell(m, "turn_stored_bytes") for m in ck))
    t.add_row("upload bytes p50 / p95", "-", cell("bucket", "turn_upload_bytes"))
    t.add_row("requests p50 / p95", "-", cell("bucket", "turn_upload_requests"))
    console.print(t)
    c = result["cold_restore"]
    console.print(
        f"cold restore (empty cache): {c['ms']:.0f} ms to a running VM; fetched "
        f"{c['bytes_fetched']} of {c['snapshot_stored_bytes']} stored bytes "
        f"= {c['fetched_over_stored']:.2f} (other chunks fetched: {c['bytes_fetched_other']})"
    )
    f = result["failover"]
    console.print(
        f"failover, kill -9 to the next turn answered on a cold host: p50 "
        f"{f['ms']['p50']:.0f} ms, p95 {f['ms']['p95']:.0f} ms over {f['ms']['n']} rounds "
        f"(target lease TTL + 2 s = {f['target_ms']:.0f} ms); the new VM logged after "
        f"{f['vm_logged_after_ms']['p50']:.0f} ms (p50), its restore "
        f"{f['restore_ms']['p50']:.0f} ms"
    )


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT

    @click.command(name="cluster", context_settings=CONTEXT)
    @click.option("--image", default="tools:latest", show_default=True)
    @click.option(
        "--dsn", envvar="TORPOR_CONTEXT_DSN", required=True,
        help="The PostgreSQL database the hosts share (TORPOR_CONTEXT_DSN).",
    )  # fmt: skip
    @click.option(
        "--store", "store_url",
        help="s3://bucket/prefix (default: a private SeaweedFS on loopback).",
    )  # fmt: skip
    @click.option("--turns", default=6, show_default=True, help="Checkpoints per store.")
    @click.option("--rounds", default=3, show_default=True, help="Failovers (kill -9) measured.")
    @click.option("--ttl", default=TTL_DEFAULT, show_default=True, help="Lease TTL, seconds.")
    @click.option(
        "--json", "json_out", type=click.Path(path_type=Path),
        default=Path("bench-results/cluster.json"), show_default=True,
    )  # fmt: skip
    def cluster(
        image: str, dsn: str, store_url: str | None, turns: int, rounds: int, ttl: float,
        json_out: Path,
    ) -> None:  # fmt: skip
        """Hosts sharing one PostgreSQL log and one bucket: checkpoint durable time local
        vs bucket, a cold restore from the bucket, and failover time after kill -9."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import TorporError, UsageError

        try:
            if turns < 2 or rounds < 1 or ttl <= 0:
                raise UsageError("--turns must be >= 2, --rounds >= 1 and --ttl > 0")
            result = run_cluster_bench(
                source=Paths.default().ensure(), image=image, dsn=dsn, store_url=store_url,
                turns=turns, rounds=rounds, ttl=ttl, say=lambda m: err_console.print(m),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return cluster


cluster = main_command()

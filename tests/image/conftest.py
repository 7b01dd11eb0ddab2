"""Fixtures for the image tests: real registries on loopback, a store in tmp_path.

``registry``: Debian's ``docker-registry`` (distribution v2.8) serving plain
HTTP on 127.0.0.1:<free port>, filesystem storage in a tmp dir, anonymous.

``token_registry``: the same binary with ``auth: token``.  A tiny token
server (``http.server`` in a thread, loopback) checks HTTP basic auth
against one user and returns a JWT signed ES256 by a throw-away P-256 key;
the JWT header carries the self-signed certificate in ``x5c`` and the
registry trusts that certificate through ``rootcertbundle``, which is what
distribution v2.8's ``token.VerifySigningKey`` needs (``x5c`` chain verified
against the bundle; ``kid`` would instead need a libtrust key id).  No
credentials -> an anonymous token without access; wrong ones -> 401.

``basic_registry``: the same binary with ``auth: htpasswd`` (HTTP basic auth; a
bcrypt entry made by ``htpasswd -B`` from apache2-utils, the only hash it accepts).

All are session scoped: under pytest-xdist every worker starts its own.
Nothing here talks to the internet.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from torpor.image.ext4 import GiB
from torpor.image.store import ImageStore
from torpor.paths import Paths

# tests/imagetools.py is shared by several test folders; make it importable from here.
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from imagetools import Registry  # noqa: E402

REGISTRY_BIN = "/usr/bin/docker-registry"
TOKEN_USER = "tester"
TOKEN_PASSWORD = "s3cret-pw"
TOKEN_SERVICE = "torpor-test-registry"
TOKEN_ISSUER = "torpor-test-issuer"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_registry(base: Path, extra_config: str = "") -> Registry:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.fail(f"{REGISTRY_BIN} is missing (apt-get install docker-registry)")
    data = base / "data"
    data.mkdir(parents=True)
    log = base / "registry.log"
    for _ in range(5):
        port = _free_port()
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n" + extra_config
        )
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)], stdout=logf, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"{url}/v2/", timeout=1)  # 200 or 401: it is serving
                return Registry(host=f"127.0.0.1:{port}", url=url, root=base, proc=proc, log=log)
            except httpx.HTTPError:
                time.sleep(0.05)
        _stop(proc)
    pytest.fail(f"docker-registry did not start:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = _start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        _stop(reg.proc)


# ---------------------------------------------------------------------------
# token auth


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Self-signed P-256 certificate + ES256 JWTs in the shape distribution v2.8 checks."""

    def __init__(self, directory: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "torpor test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = directory / "token-root.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def token(self, subject: str, access: list[dict[str, object]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS wants raw r || s, 32 bytes each
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _token_handler(issuer: TokenIssuer, log: list[dict[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            auth = self.headers.get("Authorization", "")
            user = None
            if auth.startswith("Basic "):
                raw = base64.b64decode(auth[6:]).decode(errors="replace")
                name, _, password = raw.partition(":")
                if (name, password) != (TOKEN_USER, TOKEN_PASSWORD):
                    log.append({"result": "denied", "user": name})
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"details": "wrong username or password"}')
                    return
                user = name
            access = []
            for scope in query.get("scope", []):
                for item in scope.split(" "):
                    kind, _, rest = item.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    if user and kind == "repository":
                        access.append({"type": kind, "name": repo, "actions": actions.split(",")})
            log.append(
                {
                    "result": "granted" if user else "anonymous",
                    "user": user or "",
                    "scope": " ".join(query.get("scope", [])),
                    "service": ",".join(query.get("service", [])),
                }
            )
            token = issuer.token(user or "", access)
            body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    base = tmp_path_factory.mktemp("token-registry")
    issuer = TokenIssuer(base)
    requests: list[dict[str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(issuer, requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    auth = (
        "auth:\n  token:\n"
        f"    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n"
        f"    rootcertbundle: {issuer.cert_path}\n"
    )
    reg = _start_registry(base, auth)
    reg.token_requests = requests
    reg.username, reg.password = TOKEN_USER, TOKEN_PASSWORD
    try:
        yield reg
    finally:
        _stop(reg.proc)
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------
# basic auth


BASIC_USER = "alice"
BASIC_PASSWORD = "pw-for-alice"


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The same binary with ``auth: htpasswd`` (bcrypt entries only, from ``htpasswd -B``)."""
    base = tmp_path_factory.mktemp("basic-registry")
    try:
        line = subprocess.run(
            ["htpasswd", "-Bbn", BASIC_USER, BASIC_PASSWORD],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"htpasswd failed (apt-get install apache2-utils): {e}")
    htpasswd = base / "htpasswd"
    htpasswd.write_text(line + "\n")
    auth = f"auth:\n  htpasswd:\n    realm: torpor-test-basic\n    path: {htpasswd}\n"
    reg = _start_registry(base, auth)
    reg.username, reg.password = BASIC_USER, BASIC_PASSWORD
    try:
        yield reg
    finally:
        _stop(reg.proc)


# ---------------------------------------------------------------------------
# stores


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "torpor").ensure()


@pytest.fixture
def store(paths: Paths) -> ImageStore:
    # Small virtual disks keep tests quick; the default (8 GiB) is exercised separately.
    return ImageStore(paths, disk_size=1 * GiB)

"""A Docker Registry HTTP API v2 / OCI distribution client (pull only), on httpx.

Role: resolve a :class:`~torpor.image.reference.Reference` to a manifest for
``linux/amd64`` and bring its config and layer blobs into the blob store.

Invariants:

* Every byte kept is verified: a manifest fetched by digest must hash to that
  digest (and one fetched by tag to the registry's ``Docker-Content-Digest``
  when sent); blobs are hashed while streamed to a temp file in the store and
  renamed into place only if digest and size match.  Blobs already present
  are not downloaded again.
* Auth follows the registry's challenge: ``Bearer`` (token from the realm,
  ``scope=repository:<repo>:pull``, HTTP basic auth to the realm when
  credentials are known) or ``Basic``; one retry after a 401, then a
  RegistryError.  Credentials come from the caller or
  ``TORPOR_REGISTRY_USER`` / ``TORPOR_REGISTRY_PASSWORD``.
* HTTPS by default; plain HTTP for loopback registries (``localhost``,
  127.0.0.0/8, ``::1`` - Docker's default insecure range) or ``insecure=True``.

Errors: unknown repository or tag -> NotFoundError naming the reference; auth
refused -> RegistryError; network failure -> RegistryError naming the
registry (cause chained); wrong content -> DigestMismatchError; no
``linux/amd64`` entry in an index -> ImageError listing the platforms.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from torpor.errors import DigestMismatchError, ImageError, NotFoundError, RegistryError
from torpor.image.blobs import CHUNK, BlobStore, ProgressFn, sha256_digest
from torpor.image.manifest import (
    ACCEPT,
    MAX_DOCUMENT,
    Descriptor,
    Index,
    Manifest,
    ResolvedImage,
    parse_config_blob,
    parse_document,
    select_platform,
)
from torpor.image.reference import DEFAULT_REGISTRY, Reference

ENV_USER = "TORPOR_REGISTRY_USER"
ENV_PASSWORD = "TORPOR_REGISTRY_PASSWORD"
DOCKER_HUB_HOST = "registry-1.docker.io"
USER_AGENT = "torpor/0.1 (+httpx)"
NOT_FOUND_CODES = ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")

_PARAM_RE = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``."""
    m = re.match(r"\s*([A-Za-z][\w-]*)\s*(.*)$", header or "", re.S)
    if not m:
        return None
    params = {}
    for key, quoted, token in _PARAM_RE.findall(m.group(2)):
        params[key.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted else token
    return Challenge(scheme=m.group(1).lower(), params=params)


def is_loopback(registry: str) -> bool:
    """True for ``localhost[:port]``, 127.0.0.0/8 and ``[::1]`` registries."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error_codes(resp: httpx.Response) -> list[tuple[str, str]]:
    try:
        body = json.loads(resp.content or b"{}")
    except (ValueError, httpx.ResponseNotRead):
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    out = []
    for e in errors if isinstance(errors, list) else []:
        if isinstance(e, dict):
            out.append((str(e.get("code", "")), str(e.get("message", ""))))
    return out


class RegistryClient:
    """Talks to one registry.  Use as a context manager (it owns an httpx client)."""

    def __init__(
        self,
        registry: str,
        *,
        username: str | None = None,
        password: str | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.registry = registry
        host = DOCKER_HUB_HOST if registry == DEFAULT_REGISTRY else registry
        scheme = "http" if insecure or is_loopback(registry) else "https"
        self.base_url = f"{scheme}://{host}"
        if username is None and password is None:
            username = os.environ.get(ENV_USER) or None
            password = os.environ.get(ENV_PASSWORD)
        self._credentials = (username, password or "") if username else None
        self._authorization: dict[str, str] = {}  # repository -> Authorization header
        self._scheme: dict[str, str] = {}  # repository -> auth scheme last used
        self._client = httpx.Client(
            follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP and auth -------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        *,
        repository: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send, authenticating once on 401.  Transport errors -> RegistryError."""
        for attempt in (1, 2):
            hdrs = dict(headers or {})
            auth = self._authorization.get(repository)
            if auth:
                hdrs["Authorization"] = auth
            try:
                request = self._client.build_request(method, url, headers=hdrs)
                resp = self._client.send(request, stream=stream)
            except httpx.HTTPError as e:
                raise RegistryError(
                    f"cannot reach registry {self.registry} ({self.base_url}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            if resp.status_code != 401 or attempt == 2:
                return resp
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            self._authenticate(challenge, repository)
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: Challenge | None, repository: str) -> None:
        if challenge is None:
            raise RegistryError(
                f"registry {self.registry} answered 401 without a WWW-Authenticate challenge"
            )
        self._scheme[repository] = challenge.scheme
        if challenge.scheme == "basic":
            if not self._credentials:
                raise RegistryError(
                    f"registry {self.registry} requires a username and password "
                    f"(set {ENV_USER} and {ENV_PASSWORD})"
                )
            raw = "{}:{}".format(*self._credentials).encode()
            self._authorization[repository] = "Basic " + base64.b64encode(raw).decode()
            return
        if challenge.scheme != "bearer":
            raise RegistryError(
                f"registry {self.registry} wants unsupported auth scheme {challenge.scheme!r}"
            )
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("http://", "https://")):
            raise RegistryError(f"registry {self.registry} sent a bearer challenge without realm")
        params = {"scope": f"repository:{repository}:pull"}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        try:
            resp = self._client.get(
                realm, params=params, auth=self._credentials if self._credentials else None
            )
        except httpx.HTTPError as e:
            raise RegistryError(
                f"cannot reach the token server {realm} of registry {self.registry}: {e}"
            ) from e
        if resp.status_code in (401, 403):
            who = f"user {self._credentials[0]!r}" if self._credentials else "anonymous access"
            raise RegistryError(
                f"authentication to registry {self.registry} failed: the token server "
                f"refused {who} (HTTP {resp.status_code})"
            )
        if resp.status_code != 200:
            raise RegistryError(
                f"token server {realm} of registry {self.registry} answered HTTP {resp.status_code}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} returned no token")
        self._authorization[repository] = f"Bearer {token}"

    def _fail(self, resp: httpx.Response, ref: Reference, what: str) -> NoReturn:
        with_codes = _error_codes(resp)
        codes = [c for c, _ in with_codes]
        detail = (
            "; ".join(f"{c}: {m}" if m else c for c, m in with_codes) or f"HTTP {resp.status_code}"
        )
        if resp.status_code == 404 or any(c in NOT_FOUND_CODES for c in codes):
            raise NotFoundError(
                f"{ref.familiar}: {what} not found in registry {self.registry} ({detail})"
            )
        if resp.status_code == 401 and self._scheme.get(ref.repository) == "basic":
            raise RegistryError(
                f"authentication to registry {self.registry} failed: it refused "
                f"user {self._credentials[0] if self._credentials else ''!r} ({detail})"
            )
        if resp.status_code == 401:
            hint = "" if self._credentials else f" (set {ENV_USER} and {ENV_PASSWORD}?)"
            raise RegistryError(
                f"pull access denied for {ref.familiar}: the repository does not exist or "
                f"requires authentication ({detail}){hint}"
            )
        if resp.status_code == 403:
            raise RegistryError(
                f"registry {self.registry} denied access to {ref.familiar} ({detail})"
            )
        if resp.status_code == 429:
            raise RegistryError(f"registry {self.registry} is rate limiting pulls ({detail})")
        raise RegistryError(
            f"registry {self.registry} failed on {what} of {ref.familiar}: "
            f"HTTP {resp.status_code} ({detail})"
        )

    # -- API -----------------------------------------------------------------

    def get_manifest(self, ref: Reference, target: str) -> tuple[bytes, str, str]:
        """GET ``/v2/<repo>/manifests/<target>`` -> (body, content type, verified digest)."""
        url = f"{self.base_url}/v2/{ref.repository}/manifests/{target}"
        resp = self._send("GET", url, repository=ref.repository, headers={"Accept": ACCEPT})
        if resp.status_code != 200:
            self._fail(resp, ref, "manifest")
        body = resp.content
        if len(body) > MAX_DOCUMENT:
            raise ImageError(f"{ref.familiar}: manifest larger than {MAX_DOCUMENT} bytes")
        digest = sha256_digest(body)
        if target.startswith("sha256:"):
            if digest != target:
                raise DigestMismatchError(
                    f"{ref.familiar}: registry {self.registry} sent a manifest hashing to "
                    f"{digest} for {target}"
                )
        else:
            sent = resp.headers.get("Docker-Content-Digest", "")
            if sent.startswith("sha256:") and sent != digest:
                raise DigestMismatchError(
                    f"{ref.familiar}: manifest hashes to {digest}, registry says {sent}"
                )
        return body, resp.headers.get("Content-Type", ""), digest

    def fetch_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        blobs: BlobStore,
        *,
        progress: ProgressFn | None = None,
        label: str | None = None,
    ) -> None:
        """Download ``desc`` into ``blobs`` unless already there; verify digest and size."""
        label = label or f"Downloading {desc.digest[7:19]}"
        total = max(desc.size, 0)
        if blobs.has(desc.digest, desc.size):
            if progress:
                progress(label, total, total)
            return
        url = f"{self.base_url}/v2/{ref.repository}/blobs/{desc.digest}"
        resp = self._send(
            "GET",
            url,
            repository=ref.repository,
            stream=True,
            headers={"Accept-Encoding": "identity"},
        )
        try:
            if resp.status_code != 200:
                resp.read()
                self._fail(resp, ref, f"blob {desc.digest}")
            total = total or int(resp.headers.get("Content-Length") or 0)
            with blobs.writer(what=f"{ref.familiar}: blob {desc.digest}") as w:
                for chunk in resp.iter_raw(CHUNK):
                    w.write(chunk)
                    if desc.size >= 0 and w.count > desc.size:
                        raise DigestMismatchError(
                            f"{ref.familiar}: blob {desc.digest} is larger than the "
                            f"{desc.size} bytes its descriptor says"
                        )
                    if progress:
                        progress(label, w.count, total)
                w.commit(expected=desc.digest, size=desc.size)
        except httpx.HTTPError as e:
            raise RegistryError(
                f"download of {desc.digest} from registry {self.registry} failed: {e}"
            ) from e
        finally:
            resp.close()

    def resolve(self, ref: Reference, blobs: BlobStore) -> tuple[Manifest, str]:
        """Fetch the manifest for ``linux/amd64``; return it and the digest the reference names.

        Manifest (and index) bytes are kept in ``blobs``.
        """
        body, ctype, digest = self.get_manifest(ref, ref.pull_target)
        blobs.put_bytes(body, expected=digest)
        doc = parse_document(body, ctype, what=ref.familiar)
        if isinstance(doc, Index):
            entry = select_platform(doc, what=ref.familiar)
            body2, ctype2, digest2 = self.get_manifest(ref, entry.digest)
            if entry.size >= 0 and entry.size != len(body2):
                raise DigestMismatchError(
                    f"{ref.familiar}: manifest {entry.digest} is {len(body2)} bytes, "
                    f"the index says {entry.size}"
                )
            blobs.put_bytes(body2, expected=digest2)
            doc = parse_document(body2, ctype2 or entry.media_type, what=ref.familiar)
            if isinstance(doc, Index):
                raise ImageError(f"{ref.familiar}: nested manifest lists are not supported")
        return doc, digest

    def pull(
        self, ref: Reference, blobs: BlobStore, progress: ProgressFn | None = None
    ) -> ResolvedImage:
        """Resolve ``ref`` and download its config and layers into ``blobs``."""
        manifest, digest = self.resolve(ref, blobs)
        self.fetch_blob(ref, manifest.config, blobs, label=f"Config {manifest.config.digest[7:19]}")
        config: dict[str, Any] = parse_config_blob(
            blobs.read(manifest.config.digest), what=ref.familiar
        )
        resolved = ResolvedImage.build(
            config_digest=manifest.config.digest,
            config=config,
            layer_digests=tuple(d.digest for d in manifest.layers),
            manifest_digest=digest,
            what=ref.familiar,
        )
        for layer in manifest.layers:
            self.fetch_blob(ref, layer, blobs, progress=progress)
        return resolved


def pull(
    ref: Reference,
    blobs: BlobStore,
    *,
    progress: ProgressFn | None = None,
    username: str | None = None,
    password: str | None = None,
    insecure: bool = False,
    client_factory: Callable[..., RegistryClient] = RegistryClient,
) -> ResolvedImage:
    """Pull ``ref``'s blobs into ``blobs`` (see :class:`RegistryClient`)."""
    with client_factory(
        ref.registry, username=username, password=password, insecure=insecure
    ) as client:
        return client.pull(ref, blobs, progress)

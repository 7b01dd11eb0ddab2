"""``torpor serve`` and ``torpor token``: the HTTP face (torpor.server) and its keys."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from typing import Any

import click

from torpor.cli.main import (
    CONTEXT,
    DURABILITY_HELP,
    STORE_HELP,
    _fail,
    _paths,
    apply_store_options,
)
from torpor.errors import TorporError, UsageError


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:7878")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(context_settings=CONTEXT)
@click.option(
    "--listen",
    default="127.0.0.1:7878",
    show_default=True,
    envvar="TORPOR_LISTEN",
    help="HOST:PORT to serve on. A non-loopback address needs API tokens (torpor token create).",
)
@click.option(
    "--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="TLS cert (PEM)."
)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS key (PEM).")
@click.option(
    "--max-body", default=1 << 20, show_default=True, help="Largest JSON request body, bytes."
)
@click.option(
    "--max-upload", default=8 << 30, show_default=True, help="Largest upload (files, images)."
)
@click.option("--store", "store_url", metavar="URL", help=STORE_HELP)
@click.option("--durability", type=click.Choice(["bucket", "local"]), help=DURABILITY_HELP)
@click.option("--rate", default=50.0, show_default=True, help="Requests/s per token, sustained.")
@click.option("--burst", default=200, show_default=True, help="Requests per token in a burst.")
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--failover/--no-failover",
    default=None,
    help="Heartbeat this host and take over the sessions of hosts that stop "
    "(default: on with a PostgreSQL context log, which hosts share; off with SQLite).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    listen: str,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    max_body: int,
    max_upload: int,
    store_url: str | None,
    durability: str | None,
    rate: float,
    burst: int,
    log_level: str,
    failover: bool | None,
) -> None:
    """Serve the HTTP API (/v1, /openapi.json) and the web dashboard (/) for this host.

    \b
    One server per host owns its VMs and sessions; it keeps no state of its own, so a
    restart (even after kill -9) finds every VM and session again.
    \b
      torpor serve                                # loopback, no tokens: one local user
      torpor token create --namespace team-a      # then every request needs a token
      torpor serve --listen 0.0.0.0:7878 --ssl-certfile cert.pem --ssl-keyfile key.pem
    """
    import uvicorn

    from torpor.server.app import create_app
    from torpor.server.deps import Config
    from torpor.server.tokens import TokenStore

    try:
        host, port = _split_listen(listen)
        apply_store_options(store_url, durability)  # every tenant's store, and its VMs'
        paths = _paths()
        from torpor.store.home import home_store

        home_store(paths).close()  # a bucket unreachable or with another key: say so now
        if not is_loopback(host) and not TokenStore(paths).configured():
            raise UsageError(
                f"refusing to serve on {host} without API tokens: anyone who can reach it "
                "would control this host's VMs; create one with `torpor token create` "
                "(or listen on 127.0.0.1)"
            )
        if bool(ssl_certfile) != bool(ssl_keyfile):
            raise UsageError("--ssl-certfile and --ssl-keyfile go together")
        allow_tcg = bool((ctx.find_root().params or {}).get("allow_tcg"))
        cfg = Config(
            paths,
            max_body=max_body,
            max_upload=max_upload,
            rate=rate,
            burst=burst,
            allow_tcg=allow_tcg,
        )
        app = create_app(cfg)
    except TorporError as e:
        _fail(e)
    scheme = "https" if ssl_certfile else "http"
    click.echo(f"torpor: serving {scheme}://{listen} (home {paths.root})", err=True)
    loop = _start_failover(paths, failover)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            timeout_graceful_shutdown=5,
        )
    finally:
        if loop is not None:
            loop.stop()


def _start_failover(paths: Any, wanted: bool | None) -> Any:
    """The failover loop (torpor.cluster.failover) over every namespace's home, on by
    default when the context log is PostgreSQL (with SQLite one host is all there is)."""
    import os

    from torpor.context.dsn import ENV_DSN

    if wanted is None:
        wanted = os.environ.get(ENV_DSN, "").lower().startswith(("postgresql://", "postgres://"))
    if not wanted:
        return None
    from torpor.cluster.failover import Failover, this_host
    from torpor.server.routes.metrics import observer
    from torpor.server.tenancy import DEFAULT, namespace_paths, namespaces

    def metrics_hook(p: Any) -> Any:  # restores and checkpoints it makes count in /metrics
        return observer(DEFAULT if p.root == paths.root else p.root.name)

    loop = Failover(
        lambda: [namespace_paths(paths, ns) for ns in namespaces(paths)], on_event=metrics_hook
    )
    loop.start()
    click.echo(f"torpor: failover on (lease TTL {loop.ttl:g}s, host {this_host(paths)})", err=True)
    return loop


@click.group(context_settings=CONTEXT)
def token() -> None:
    """API tokens for `torpor serve`: each names one namespace (stored hashed)."""


@token.command(name="create", context_settings=CONTEXT)
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--name", default="", help="A label to recognise the token by.")
@click.option("--ttl", type=float, help="Lifetime in seconds (default: until revoked).")
def token_create(namespace: str, name: str, ttl: float | None) -> None:
    """Create a token; the secret is printed once, on stdout."""
    from torpor.server.tokens import TokenStore

    try:
        rec, secret = TokenStore(_paths().ensure()).create(namespace, name=name, ttl=ttl)
    except TorporError as e:
        _fail(e)
    click.echo(f"token {rec.id} for namespace {rec.namespace} (shown once):", err=True)
    click.echo(secret)


@token.command(name="ls", context_settings=CONTEXT)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def token_ls(fmt: str) -> None:
    """List tokens (never their secrets)."""
    from torpor.server.tokens import TokenStore

    rows = [
        {
            "id": t.id,
            "namespace": t.namespace,
            "name": t.name,
            "created": t.created,
            "expires": t.expires,
            "revoked": t.revoked,
            "active": t.active(),
        }
        for t in TokenStore(_paths()).list()
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':10}{'NAMESPACE':20}{'NAME':20}{'STATE':10}CREATED")
    for r in rows:
        state = "active" if r["active"] else ("revoked" if r["revoked"] else "expired")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        click.echo(f"{r['id']:10}{r['namespace']:20}{r['name']:20}{state:10}{when}")


@token.command(name="revoke", context_settings=CONTEXT)
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke a token by id: it authenticates nothing from now on."""
    from torpor.server.tokens import TokenStore

    try:
        TokenStore(_paths()).revoke(token_id)
    except TorporError as e:
        _fail(e)
    click.echo(token_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve())

"""The server's shared parts: auth, namespaces, problem details, body cap, rate limit."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.server.conftest import Tokens
from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import Config
from torpor.server.tenancy import namespace_paths
from torpor.server.tokens import TokenStore


def test_healthz_needs_no_token(app) -> None:
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "ok"}


def test_missing_or_bad_token_is_401_problem(app, tokens: Tokens) -> None:
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer tpr_nope_nope"}, {"Authorization": "x"}):
            r = c.get("/v1/info", headers=headers)
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["status"] == 401


def test_token_names_its_namespace(api: TestClient, other_api: TestClient) -> None:
    assert api.get("/v1/info").json()["namespace"] == "default"
    assert other_api.get("/v1/info").json()["namespace"] == "other"


def test_revoked_and_expired_tokens_authenticate_nothing(app, paths: Paths) -> None:
    store = TokenStore(paths)
    rec, secret = store.create("default", name="short")
    with TestClient(app, headers={"Authorization": f"Bearer {secret}"}) as c:
        assert c.get("/v1/info").status_code == 200
        store.revoke(rec.id)
        assert c.get("/v1/info").status_code == 401
    _, expired = store.create("default", ttl=1e-6)
    with TestClient(app, headers={"Authorization": f"Bearer {expired}"}) as c:
        assert c.get("/v1/info").status_code == 401


def test_tokens_are_stored_hashed_and_private(paths: Paths, tokens: Tokens) -> None:
    f = TokenStore(paths).path
    assert tokens.default not in f.read_text()
    assert f.stat().st_mode & 0o077 == 0


def test_body_over_the_cap_is_413(tmp_path: Path, paths: Paths) -> None:
    home = Paths(tmp_path / "h")
    with TestClient(create_app(Config(home, max_body=64))) as c:
        r = c.post("/v1/info", content=b"{" + b" " * 100 + b"}")
        assert r.status_code == 413 and r.json()["status"] == 413


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    home = Paths(tmp_path / "h")
    with TestClient(create_app(Config(home, rate=0.5, burst=3))) as c:
        codes = [c.get("/v1/info").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        r = c.get("/v1/info")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_namespace_names_are_checked(paths: Paths) -> None:
    import pytest

    from torpor.errors import UsageError

    for bad in ("", "A", "../x", "a/b", "-a", "namespaces", "x" * 64):
        with pytest.raises(UsageError):
            namespace_paths(paths, bad)
    ns = namespace_paths(paths, "team-x")
    assert ns.root == paths.root / "namespaces" / "team-x"
    assert ns.guest.resolve() == paths.guest.resolve()
    assert ns.root.stat().st_mode & 0o077 == 0


def test_namespaces_sharing_one_postgres_log_see_only_their_own(paths: Paths, pg_dsn: str) -> None:
    """With TORPOR_CONTEXT_DSN naming one PostgreSQL database for the whole server, each
    namespace's sessions live in a schema of their own: another namespace's session is
    not listed and not found (it was: every namespace listed every session)."""
    import pytest

    from torpor.context import open_log
    from torpor.errors import NotFoundError

    a, b = namespace_paths(paths, "pg-a"), namespace_paths(paths, "pg-b")
    la, lb, ld = (open_log(pg_dsn, paths=p) for p in (a, b, paths))
    try:
        sa = la.create_session("same-name")
        sb = lb.create_session("same-name")  # names are per namespace too
        assert [s.id for s in la.list_sessions()] == [sa.id]
        assert [s.id for s in lb.list_sessions()] == [sb.id]
        assert ld.list_sessions() == []
        with pytest.raises(NotFoundError):
            lb.get_session(sa.id)
    finally:
        for log in (la, lb, ld):
            log.close()


def test_error_classes_map_to_statuses() -> None:
    from torpor import errors as E
    from torpor.server.problems import from_error, status_of
    from torpor.session.core import SessionError
    from torpor.store import ChunkCorruptError

    assert status_of(E.NotFoundError("x")) == 404
    assert status_of(E.ConflictError("x")) == 409
    assert status_of(E.TCGRefusedError("x")) == 403
    assert status_of(E.ExecTimeoutError("x")) == 504
    assert status_of(SessionError("x")) == 409
    from torpor.model.errors import ModelError, ModelRateLimitError, ModelTimeoutError

    assert status_of(ModelTimeoutError("x")) == 504
    assert status_of(ModelRateLimitError("x")) == 503
    assert status_of(ModelError("x")) == 502
    # a damaged snapshot is the server's fault (500), not "insufficient storage" (507)
    assert status_of(ChunkCorruptError(artifact="memory", corrupt=["ab"])) == 500
    body = from_error(E.NotFoundError("no VM x", step="lookup")).body
    assert b'"error":"NotFoundError"' in body and b'"exit_code":3' in body

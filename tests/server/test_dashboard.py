"""The web dashboard (torpor.server.dashboard) through the in-process app: login, pages,
namespaces (another namespace's resource is a 404 page), escaping of hostile text,
and the CSRF checks on every state-changing POST.

The session these tests look at is a real one (a booted VM, checkpoint 0); hostile
text reaches it the ways it does in production: the log API (user and tool entries),
a snapshot tag, a VM label and a command's output in the guest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import Tokens
from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import COOKIE, Config
from torpor.session import Session

pytestmark = pytest.mark.vm

ORIGIN = "http://testserver"
XSS = "<script>alert('pwned')</script>"
XSS_ESCAPED = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"


def browser(app, token: str | None) -> TestClient:
    """A client that behaves like the browser: cookie auth, same-origin POSTs."""
    c = TestClient(app, headers={"Origin": ORIGIN}, follow_redirects=False)
    if token:
        c.cookies.set(COOKIE, token)
    return c


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert m, "the page has no form token"
    return m.group(1)


@pytest.fixture
def web(app, tokens: Tokens) -> Iterator[TestClient]:
    with browser(app, tokens.default) as c:
        yield c


@pytest.fixture
def other_web(app, tokens: Tokens) -> Iterator[TestClient]:
    with browser(app, tokens.other) as c:
        yield c


@pytest.fixture(scope="module")
def session(paths: Paths, tools_image: str) -> Iterator[Session]:
    s = Session.create(tools_image, "scripted:demo", name="dash-hostile", paths=paths)
    try:
        s.append("user", {"content": f"hello {XSS}"})
        s.append("tool_call", {"id": "c1", "name": "shell", "arguments": {"cmd": XSS}})
        s.append(
            "tool_result",
            {"id": "c1", "name": "shell", "content": f"guest says {XSS}", "is_error": True},
        )
        s.append("app.note", {"text": XSS})
        s.checkpoint(reason="dashboard test")
        yield s
    finally:
        s.remove()
        s.close()


def test_pages_need_login_and_redirect_back(app) -> None:
    with browser(app, None) as c:
        r = c.get("/sessions?q=x")
        assert r.status_code == 303
        assert r.headers["location"] == "/login?next=%2Fsessions%3Fq%3Dx"
        page = c.get("/login?next=%2Fsessions")
        assert page.status_code == 200 and 'name="token"' in page.text


def test_login_sets_an_httponly_strict_cookie(app, tokens: Tokens) -> None:
    with browser(app, None) as c:
        r = c.post("/login", data={"token": tokens.default, "next": "/storage"})
        assert r.status_code == 303 and r.headers["location"] == "/storage"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={tokens.default};")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert c.get("/storage").status_code == 200  # the cookie authenticates
        assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would not come back
    with TestClient(
        app, base_url="https://testserver", headers={"Origin": "https://testserver"}
    ) as tls:
        r = tls.post("/login", data={"token": tokens.default}, follow_redirects=False)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]


def test_login_refuses_bad_tokens_open_redirects_and_other_sites(app, tokens: Tokens) -> None:
    with browser(app, None) as c:
        bad = c.post("/login", data={"token": "tpr_nope_nope", "next": "/sessions"})
        assert bad.status_code == 401 and "not valid" in bad.text
        assert "set-cookie" not in bad.headers
        for nxt in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            r = c.post("/login", data={"token": tokens.default, "next": nxt})
            assert r.headers["location"] == "/sessions", nxt
        cross = c.post(
            "/login",
            data={"token": tokens.default},
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403 and "set-cookie" not in cross.headers


def test_logout_clears_the_cookie(app, tokens: Tokens) -> None:
    with browser(app, tokens.default) as c:
        token = csrf_of(c.get("/storage").text)
        r = c.post("/logout", data={"csrf": token})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert f'{COOKIE}=""' in r.headers["set-cookie"]


def test_every_page_renders_with_security_headers(web: TestClient, session: Session) -> None:
    for url in ("/sessions", "/sandboxes", "/lineage", "/storage", f"/sessions/{session.id}"):
        r = web.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert "<script>" not in r.text.replace('<script src="/static/dashboard.js" defer>', "")
    assert web.get("/").headers["location"] == "/sessions"
    assert web.get("/static/dashboard.css").status_code == 200
    assert web.get("/static/..%2Fviews.py").status_code == 404


def test_sessions_list_search_and_filter(web: TestClient, session: Session) -> None:
    page = web.get("/sessions").text
    assert "dash-hostile" in page and session.id[:12] in page
    assert "dash-hostile" in web.get("/sessions?q=HOSTILE").text  # case-insensitive
    assert "dash-hostile" not in web.get("/sessions?q=no-such-thing").text
    assert "dash-hostile" in web.get("/sessions?status=running").text
    assert "dash-hostile" not in web.get("/sessions?status=hibernated").text


def test_session_page_is_a_transcript_with_checkpoints(web: TestClient, session: Session) -> None:
    page = web.get(f"/sessions/{session.name}").text
    assert "Tool call" in page and "Result" in page and "Checkpoint" in page
    ck = session.checkpoints[-1]
    assert f'name="at" value="{ck.seq}"' in page  # a fork button per checkpoint
    assert page.count('class="raw"') >= 4  # raw JSON only behind the toggle
    frag = web.get(f"/sessions/{session.id}/entries?after={ck.seq - 1}")
    assert frag.status_code == 200 and f'id="e{ck.seq}"' in frag.text
    assert f'id="e{ck.seq - 1}"' not in frag.text
    assert frag.headers["x-last-seq"] == str(session.state().last_seq)
    assert frag.headers["x-status"] == "running"
    # the live view follows the API's SSE route of the log (the cookie authenticates)
    assert f'data-stream="/v1/sessions/{session.id}/log"' in page


def test_hostile_text_is_escaped_everywhere(
    web: TestClient, session: Session, paths: Paths, vms
) -> None:
    """Messages, tool arguments and output, custom entries, snapshot tags, VM labels,
    console and exec output: all shown as text, never as markup."""
    from torpor.snapshot import snapshot

    page = web.get(f"/sessions/{session.id}").text
    assert XSS not in page
    assert page.count(XSS_ESCAPED) >= 4
    vm = session.vm()
    assert vm is not None
    snapshot(session._mgr, vm.id, tag=XSS)
    lineage = web.get("/lineage").text
    assert XSS not in lineage and XSS_ESCAPED in lineage

    box = vms.run("tools:latest", "sh", "-c", f'echo "{XSS}"; sleep infinity', labels={"team": XSS})
    listing = web.get("/sandboxes").text
    assert box.name in listing
    detail = web.get(f"/sandboxes/{box.id}")
    assert detail.status_code == 200 and XSS not in detail.text and XSS_ESCAPED in detail.text
    r = web.post(
        f"/sandboxes/{box.id}/exec",
        data={"csrf": csrf_of(detail.text), "cmd": f'echo "{XSS}"; echo oops >&2; exit 3'},
    )
    assert r.status_code == 200, r.text[:500]
    assert XSS not in r.text and XSS_ESCAPED in r.text
    assert re.search(r"exit <b class=\"bad\">3</b>", r.text)
    assert "oops" in r.text


def test_another_namespace_gets_404_pages(
    other_web: TestClient, session: Session, paths: Paths
) -> None:
    vm = session.vm()
    assert vm is not None
    ck = session.checkpoints[-1]
    assert session.id not in other_web.get("/sessions").text
    assert vm.id not in other_web.get("/sandboxes").text
    assert "dash-hostile" not in other_web.get("/lineage").text
    token = csrf_of(other_web.get("/storage").text)
    for url in (
        f"/sessions/{session.id}",
        f"/sessions/{session.name}",
        f"/sessions/{session.id}/entries",
        f"/sandboxes/{vm.id}",
    ):
        r = other_web.get(url)
        assert r.status_code == 404, url
    for url, data in (
        (f"/sessions/{session.id}/hibernate", {}),
        (f"/sessions/{session.id}/wake", {}),
        (f"/sessions/{session.id}/fork", {"at": str(ck.seq)}),
        (f"/sessions/{session.id}/send", {"message": "hi"}),
        (f"/sandboxes/{vm.id}/exec", {"cmd": "touch /tmp/other-was-here"}),
    ):
        r = other_web.post(url, data={"csrf": token, **data})
        assert r.status_code == 404, url
        assert "Not found" in r.text
    assert session.status() == "running"  # nothing of the above touched it


def test_posts_need_the_form_token_and_this_origin(
    app, web: TestClient, tokens: Tokens, session: Session
) -> None:
    url = f"/sessions/{session.id}/hibernate"
    token = csrf_of(web.get("/sessions").text)
    assert web.post(url, data={}).status_code == 403  # no form token
    assert web.post(url, data={"csrf": "0" * 64}).status_code == 403
    evil = web.post(url, data={"csrf": token}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    with TestClient(app, follow_redirects=False) as bare:  # cookie, but neither Origin nor Referer
        bare.cookies.set(COOKIE, tokens.default)
        assert bare.post(url, data={"csrf": token}).status_code == 403
        # the API's own routes get the Origin check too, when the cookie authenticates
        r = bare.post("/v1/sessions", json={}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"
    assert session.status() == "running"  # none of them hibernated it
    # a token in the Authorization header is no ambient credential: not checked
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as api:
        assert api.get("/v1/info", headers={"Origin": "https://evil.example"}).status_code == 200


def test_without_tokens_no_login_but_still_no_cross_site_posts(tmp_path: Path) -> None:
    home = Paths(tmp_path / "h")
    local = "http://127.0.0.1:7878"
    with TestClient(create_app(Config(home)), base_url=local, follow_redirects=False) as c:
        assert c.get("/login").headers["location"] == "/sessions"
        page = c.get("/sessions")
        assert page.status_code == 200 and "No sessions yet" in page.text
        token = csrf_of(page.text)
        r = c.post(
            "/sessions/nope/hibernate",
            data={"csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403
        same = c.post("/sessions/nope/hibernate", data={"csrf": token}, headers={"Origin": local})
        assert same.status_code == 404


def test_without_tokens_a_browser_must_use_a_loopback_name(tmp_path: Path) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 is
    same-origin with itself (Origin and Host both evil.example:7878); a token-less
    server must not serve a browser that names it so.  API clients are unaffected."""
    app = create_app(Config(Paths(tmp_path / "h")))
    rebound = "http://evil.example:7878"
    with TestClient(app, base_url=rebound, follow_redirects=False) as c:
        browser_get = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
        assert c.get("/v1/info", headers=browser_get).status_code == 403
        assert c.get("/sessions", headers=browser_get).status_code == 403
        r = c.post("/v1/sessions", json={}, headers={"Origin": rebound})
        assert r.status_code == 403
        assert c.get("/v1/info").status_code == 200  # no browser headers: curl, the SDK
    for name in ("http://127.0.0.1:7878", "http://localhost:7878", "http://[::1]:7878"):
        with TestClient(app, base_url=name) as c:
            r = c.get("/v1/info", headers={"Sec-Fetch-Site": "none"})
            assert r.status_code == 200, name


def test_bad_form_input_is_a_400_page(web: TestClient, session: Session) -> None:
    token = csrf_of(web.get("/sessions").text)
    r = web.post(f"/sessions/{session.id}/fork", data={"csrf": token, "at": "x; rm -rf /"})
    assert r.status_code == 400 and "entry number" in r.text
    r = web.post(
        "/sessions", data={"csrf": token, "image": "tools:latest", "model": "scripted:/etc/passwd"}
    )
    assert r.status_code == 400 and "not offered" in r.text
    r = web.post(f"/sessions/{session.id}/send", data={"csrf": token, "message": "  "})
    assert r.status_code == 400


def test_hibernate_and_wake_from_the_page(web: TestClient, paths: Paths, tools_image: str) -> None:
    s = Session.create(tools_image, "scripted:demo", name="dash-sleepy", paths=paths)
    try:
        page = web.get(f"/sessions/{s.id}").text
        token = csrf_of(page)
        r = web.post(f"/sessions/{s.id}/hibernate", data={"csrf": token})
        assert r.status_code == 303 and r.headers["location"].startswith(f"/sessions/{s.id}?note=")
        assert s.status() == "hibernated"
        page = web.get(r.headers["location"]).text
        assert 'class="pill pill-hibernated"' in page and "hibernated: the VM is stopped" in page
        assert "dash-sleepy" in web.get("/sessions?status=hibernated").text
        r = web.post(f"/sessions/{s.id}/wake", data={"csrf": token})
        assert r.status_code == 303
        assert s.status() == "running"
        assert len(s.checkpoints) == 2  # the hibernation's checkpoint
    finally:
        s.remove()
        s.close()


def test_a_websocket_from_another_site_is_refused(app, tokens: Tokens) -> None:
    """Cross-site WebSocket hijacking: a page elsewhere must not open the PTY (a shell)
    with the dashboard's cookie; browsers always send the handshake's Origin."""
    from starlette.testclient import WebSocketDenialResponse

    with TestClient(app) as c:
        c.cookies.set(COOKIE, tokens.default)
        for origin, status in (("https://evil.example", 403), (ORIGIN, 404)):
            with (
                pytest.raises(WebSocketDenialResponse) as refused,
                c.websocket_connect("/v1/sandboxes/no-such-box/pty", headers={"Origin": origin}),
            ):
                pass
            assert refused.value.status_code == status, origin


def turn_count(c: TestClient) -> int:
    text = c.get("/metrics").text
    m = re.search(r'^\w*turn_seconds_count\{namespace="default"\} (\d+)', text, re.M)
    return int(m.group(1)) if m else 0


def test_a_resubmitted_send_form_runs_one_turn(
    app, web: TestClient, paths: Paths, tools_image: str
) -> None:
    s = Session.create(tools_image, "scripted:demo", name="dash-send", paths=paths)
    try:
        page = web.get(f"/sessions/{s.id}").text
        nonce = re.search(r'name="nonce" value="([0-9a-f]+)"', page)
        assert nonce
        form = {"csrf": csrf_of(page), "nonce": nonce.group(1), "message": "count for me"}
        turns_before = turn_count(web)
        r = web.post(f"/sessions/{s.id}/send", data=form)
        assert r.status_code == 303 and r.headers["location"] == f"/sessions/{s.id}#live"
        slot = ("default", s.id)
        app.state.dashboard_turns[slot].join(240)
        assert s.status() == "running" and s.state().turns == 1
        assert turn_count(web) == turns_before + 1  # in /metrics like the API's turns
        frag = web.get(f"/sessions/{s.id}/entries?after=0").text
        assert "The counter service is running" in frag
        # the browser resubmits the same form (reload, back button): the turn is not rerun
        again = web.post(f"/sessions/{s.id}/send", data=form)
        assert again.status_code == 303
        app.state.dashboard_turns[slot].join(240)
        assert s.state().turns == 1
        assert [e.kind.value for e in s.log()].count("user") == 1
        assert not app.state.dashboard_errors.get(slot)
    finally:
        s.remove()
        s.close()


def test_lineage_of_a_long_history_renders() -> None:
    """A session with thousands of turns is a chain of thousands of snapshots, each the
    parent of the next; with forks along the way.  Nested rendering recursed once per
    snapshot (RecursionError at ~600); chains keep the page flat."""
    from torpor.server import dashboard as dash
    from torpor.server.dashboard.views import chains

    def node(i: int) -> dict:
        return {
            "id": f"{i:012x}" + "0" * 52,
            "parent": None,
            "created": "2026-12-05 00:00:00",
            "tag": f"<marquee>{i}</marquee>",
            "vm": "v",
            "image": "i",
            "memory": 1,
            "disk": 1,
            "stored": 1,
            "sessions": [],
            "forks": [],
            "fork": False,
            "children": [],
        }

    nodes = [node(i) for i in range(3000)]
    for i in range(1, 3000):
        parent = nodes[i - 1] if i % 50 else nodes[i - 2]  # a branch every 50
        nodes[i]["parent"] = parent["id"]
        parent["children"].append(nodes[i])
    d = {"chains": chains([nodes[0]], flatten=True), "count": 3000, "damaged": [], "sessions": []}
    html = dash.env.get_template("lineage.html").render(
        d=d, tenant=None, csrf="", host="h", nav="lineage"
    )
    assert all(f"snap-{i:012x}" in html for i in range(3000))
    assert "<marquee>" not in html and "&lt;marquee&gt;2999&lt;/marquee&gt;" in html


def test_a_long_log_shows_its_newest_entries(
    web: TestClient, paths: Paths, tools_image: str
) -> None:
    from torpor.server.dashboard.views import MAX_BLOCKS

    s = Session.create(tools_image, "scripted:demo", name="dash-long", paths=paths)
    try:
        for i in range(MAX_BLOCKS + 20):
            s.append("app.note", {"i": f"note-{i:04d}"})
        page = web.get(f"/sessions/{s.id}").text
        assert "note-0000" not in page and f"note-{MAX_BLOCKS + 19:04d}" in page
        assert "earlier entries are not shown" in page
        whole = web.get(f"/sessions/{s.id}?all=1").text
        assert "note-0000" in whole and "earlier entries" not in whole
    finally:
        s.remove()
        s.close()

"""The dashboard in a real headless browser (Debian's chromium driven by Playwright)
against a real ``torpor serve`` process: log in with a token, create a session with the
scripted model, send a message and watch the reply arrive live (no page load), fork
at a checkpoint, find the fork in the list, open the lineage tree.

Screenshots go to ``$TORPOR_TEST_ARTIFACTS`` (default ``build/test-artifacts/``); the
test prints where.  Playwright's own browser download is never used: the executable
is ``/usr/bin/chromium`` (scripts/setup installs it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.server.conftest import LiveServer, Tokens
from torpor.errors import NotFoundError
from torpor.paths import Paths
from torpor.session import Session

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
#: The last answer of the demo script's first turn (torpor.model.scripts.DEMO).
ANSWER = "The counter service is running in the background"
SLOW = 240_000  # ms: a VM boot or a turn under TCG on a busy 2-core machine


def artifacts() -> Path:
    d = Path(os.environ.get("TORPOR_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def page(live_server: LiveServer) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            ctx = browser.new_context(viewport={"width": 1366, "height": 768})
            p = ctx.new_page()
            errors: list[str] = []
            p.on("pageerror", lambda e: errors.append(str(e)))
            p.on(
                "console",
                lambda m: errors.append(f"{m.text} {m.location}") if m.type == "error" else None,
            )
            p.js_errors = errors  # type: ignore[attr-defined]
            yield p
        finally:
            browser.close()


@pytest.fixture
def cleanup(paths: Paths) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        try:
            with Session.open(n, paths=paths) as s:
                s.remove()
        except NotFoundError:
            pass


def test_log_in_create_send_watch_live_fork_and_lineage(
    page,
    live_server: LiveServer,
    tokens: Tokens,
    tools_image: str,
    cleanup: list[str],
    capsys,
) -> None:
    from playwright.sync_api import expect

    out = artifacts()
    shots: list[Path] = []

    def shot(name: str) -> None:
        path = out / f"dashboard-{name}.png"
        page.screenshot(path=str(path))  # what a 1366x768 laptop screen shows
        shots.append(path)

    base = live_server.url
    # log in: any page sends an anonymous browser to the login form, then back
    page.goto(f"{base}/sessions")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    shot("1-login")
    page.fill("#token", tokens.default)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/sessions")
    expect(page.locator("#namespace")).to_have_text("default")
    cookie = next(c for c in page.context.cookies() if c["name"] == "torpor_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # create a session from the page (boots a VM, checkpoint 0)
    cleanup.append("browser-a")
    page.eval_on_selector("details.create", "d => { d.open = true; }")
    page.fill("#new-name", "browser-a")
    page.select_option("#new-image", tools_image)
    page.select_option("#new-model", "scripted:demo")
    page.click("#create-form button[type=submit]")
    page.wait_for_url(re.compile(r"/sessions/[0-9a-f]{8,}"), timeout=SLOW)
    expect(page.locator("#session-name")).to_contain_text("browser-a")
    expect(page.locator("#status .pill")).to_have_text("running")
    assert page.locator("#checkpoints li").count() == 1
    session_url = page.url
    shot("2-new-session")

    # send a message; the reply arrives through the live view, without a page load
    page.fill("#message", "set up a counter service please")
    page.click("#send")
    page.wait_for_url(re.compile(r"#live$"))
    page.evaluate("window.__sameDocument = true")
    transcript = page.locator("#transcript")
    # the page loaded before the answer existed (the script's second step sleeps 1 s in
    # the guest), so the answer below can only arrive through the live view
    assert transcript.locator(".e-answer", has_text=ANSWER).count() == 0
    expect(transcript.locator(".e-user .text").last).to_contain_text(
        "set up a counter service please", timeout=SLOW
    )
    # tool calls show up while the turn still runs
    expect(transcript.locator(".e-tool_call").first).to_be_visible(timeout=SLOW)
    expect(transcript.locator(".e-answer .text").last).to_contain_text(ANSWER, timeout=SLOW)
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    expect(page.locator("#status .pill")).to_have_text("running", timeout=SLOW)
    expect(transcript.locator(".e-checkpoint")).to_have_count(2, timeout=SLOW)
    expect(page.locator("#checkpoints li")).to_have_count(2, timeout=SLOW)  # side refreshed
    results = transcript.locator(".e-tool_result pre.out")
    assert results.count() >= 3
    page.locator("#send").scroll_into_view_if_needed()
    shot("3-turn-live")

    # fork at the first turn's checkpoint (the newest on the timeline)
    page.locator("#checkpoints li").first.locator("button").click()
    page.wait_for_url(lambda u: "/sessions/" in u and u.split("?")[0] != session_url, timeout=SLOW)
    expect(page.locator(".note")).to_contain_text("forked from browser-a")
    fork_name = page.locator("#session-name").inner_text().split()[0]
    cleanup.append(fork_name)
    expect(transcript.locator(".e-answer .text").last).to_contain_text(ANSWER)
    shot("4-fork")

    # the fork is in the list (and found by search), with its parent
    page.click("nav >> text=Sessions")
    row = page.locator(f"#sessions tr:has(a:text-is('{fork_name}'))")
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(7)).not_to_be_empty()
    page.fill("#q", fork_name)
    page.press("#q", "Enter")
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    shot("5-sessions")

    # the lineage: the fork sits under its parent; the snapshot tree has both VMs
    page.click("nav >> text=Lineage")
    parent = page.locator("#session-tree li:has(> .node a:text-is('browser-a'))")
    expect(parent.locator(f".branches a:text-is('{fork_name}')")).to_have_count(1)
    # checkpoint 0 -> the turn's checkpoint (stored as changes over it), the fork's point
    fork_point = page.locator(
        "#snapshot-tree .node", has=page.locator("a.fork-chip", has_text=fork_name)
    )
    expect(fork_point).to_have_count(1)
    expect(fork_point.locator("a.chip:not(.fork-chip)", has_text="browser-a")).to_have_count(1)
    expect(fork_point.locator(".pill", has_text="fork point")).to_have_count(1)
    before = fork_point.locator("xpath=../preceding-sibling::li[1]/div")
    expect(before.locator("a.chip", has_text="browser-a")).to_have_count(1)
    shot("6-lineage")

    page.click("nav >> text=Sandboxes")
    expect(page.locator("#sandboxes tbody tr")).not_to_have_count(0)
    shot("7-sandboxes")
    # the session's VM: the counter the turn started is still counting; run a command
    page.click("#sandboxes a:text-is('ses-browser-a')")
    expect(page.locator("#console")).not_to_be_empty()
    page.fill("#cmd", "cat /work/counter; echo done >&2")
    page.click("#exec-form button[type=submit]")
    expect(page.locator("#exec-stdout")).to_have_text(re.compile(r"^\d+\s*$"), timeout=SLOW)
    expect(page.locator("#exec-stderr")).to_contain_text("done")
    shot("8-sandbox-exec")
    page.click("nav >> text=Storage")
    expect(page.locator("#df")).to_contain_text("Snapshots")
    shot("9-storage")

    assert not page.js_errors, page.js_errors
    with capsys.disabled():
        print(f"\nscreenshots: {out}/dashboard-*.png ({len(shots)} files)")

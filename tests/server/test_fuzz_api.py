"""Fuzz the whole HTTP API from its own /openapi.json (schemathesis): no 5xx, no hang,
every error a problem-details body.

Three phases, each against the real app in-process:

- **every operation** in namespace ``fuzz``, a home with no image and no snapshot: a
  fuzzed create, restore, fork or wake is refused before any VM could start (there is
  nothing to boot), so the VM-starting routes are fuzzed at no VM cost.  Their
  successful paths and their bad input are covered by the explicit tests
  (test_sandboxes_api.py, test_snapshots_api.py).  ``POST /v1/images/pull`` is left
  out: a fuzzed reference names a registry on the internet, and tests do not reach it
  (its bad input is in test_images_api.py).
- **one live sandbox**: exec, files, processes and logs fuzzed against a real VM, with
  bounds that keep the fuzzer from wrecking its own target (exec timeout ≤ 5 s, no
  background commands, files under ``/tmp/fz``); removing, stopping or forking it is
  the first phase's job.
- **create with a budget**: six valid fuzzed ``POST /v1/sandboxes`` where the image
  exists, each really booting a small sandbox that is removed at once.

``pytest-timeout`` (the suite's 300 s, raised here) turns a hang into a failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server.conftest import Tokens
from torpor.paths import Paths
from torpor.sandbox import Sandbox
from torpor.server.tokens import TokenStore

pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.timeout(1800)]

#: 5xx a route may answer by contract when the fuzzer asks for it (e.g. a 1 ms exec
#: timeout is a 504); anything else — 500 above all — is a bug.
ALLOWED_5XX: dict[str, set[int]] = {"/v1/sandboxes/{ref}/exec": {504}}
#: Seconds one call may take (schemathesis's default, 10 s, is shorter than a TCG boot on
#: a loaded machine); pytest-timeout still bounds the whole test.
CALL_TIMEOUT = 300


@pytest.fixture(scope="module")
def fuzz_token(paths: Paths, tokens: Tokens) -> str:
    _, secret = TokenStore(paths).create("fuzz", name="fuzz")
    return secret


@pytest.fixture(scope="module")
def live_sandbox(paths: Paths, tools_image: str) -> Iterator[Sandbox]:
    sb = Sandbox.create(
        tools_image, memory="256M", network=False, labels={"suite": "fuzz"}, paths=paths
    )
    yield sb
    sb.kill()


def check(case: Any, r: Any) -> None:
    status = r.status_code
    where = f"{case.method} {case.formatted_path}: {status} {r.text[:500]}"
    if status >= 500:
        assert status in ALLOWED_5XX.get(case.path, set()), where
    if status >= 400:
        assert r.headers.get("content-type") == ["application/problem+json"], where


def operations(app: Any, keep: Callable[[Any], bool]) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    return [op for op in ops if keep(op)]


def fuzz(op: Any, examples: int, call: Callable[[Any], None]) -> None:
    """``examples`` valid and as many invalid requests to ``op``, each through ``call``.

    (schemathesis's own pytest integration, ``from_fixture``, does not run under
    pytest 9: it writes ``node._nodeid``; its strategies are used directly instead.)
    """
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            strategy = op.as_strategy(generation_mode=mode)
        except Exception:  # no invalid form of this operation exists (nothing to negate)
            continue

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            call(case)

        try:
            run()
        except Unsatisfiable:
            if mode == GenerationMode.POSITIVE:
                raise
            # an operation without parameters or body has no invalid form


def test_every_operation_answers_without_5xx(app, fuzz_token: str) -> None:
    ops = operations(app, lambda op: not (op.method == "post" and op.path == "/v1/images/pull"))
    assert len(ops) >= 35  # the whole API: sessions, sandboxes, snapshots, images, system
    headers = {"Authorization": f"Bearer {fuzz_token}"}
    for op in ops:
        fuzz(op, 40, lambda case: check(case, case.call(headers=headers, timeout=CALL_TIMEOUT)))


def _bound(case: Any) -> None:
    """Keep the fuzzer's requests from ending or flooding the live sandbox."""
    body = case.body
    if case.path.endswith("/exec") and isinstance(body, dict):
        t = body.get("timeout")
        if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t <= 5:
            body["timeout"] = 5
        body["background"] = False
    q = case.query
    if case.path.endswith(("/files", "/files/list")) and isinstance(q, dict):
        p = q.get("path")
        if isinstance(p, str) and p.startswith("/"):
            q["path"] = "/tmp/fz" + p


LIVE = re.compile(r"^/v1/sandboxes/\{ref\}/(exec|files|files/list|processes|logs)$")


def test_a_live_sandbox_answers_without_5xx(app, live_sandbox: Sandbox, tokens: Tokens) -> None:
    ops = operations(app, lambda op: bool(LIVE.match(op.path)))
    assert len(ops) == 7
    headers = {"Authorization": f"Bearer {tokens.default}"}

    answered: dict[str, set[int]] = {}

    def call(case: Any) -> None:
        case.path_parameters = {**(case.path_parameters or {}), "ref": live_sandbox.id}
        _bound(case)
        r = case.call(headers=headers, timeout=CALL_TIMEOUT)
        answered.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)
        check(case, r)

    for op in ops:
        fuzz(op, 30, call)
    # the fuzzer reached the guest, not only the validation in front of it
    assert 200 in answered["POST /v1/sandboxes/{ref}/exec"], answered
    assert 200 in answered["GET /v1/sandboxes/{ref}/processes"], answered
    assert live_sandbox.exec("true").exit_code == 0  # and it still answers


def test_create_with_a_bounded_budget(app, tokens: Tokens, tools_image: str) -> None:
    """``POST /v1/sandboxes`` where the image exists: a few valid fuzzed creates really
    boot (small: ≤ 256 MiB, ≤ 2 CPUs, no network); each sandbox made is removed."""
    (op,) = operations(app, lambda op: op.method == "post" and op.path == "/v1/sandboxes")
    headers = {"Authorization": f"Bearer {tokens.default}"}
    made = []

    def call(case: Any) -> None:
        if isinstance(case.body, dict):
            case.body.update(memory=128, network=False, cpus=min(2, case.body.get("cpus") or 1))
            case.body.pop("image", None)  # the default, tools:latest: it boots
            case.body.pop("name", None)  # a random name may clash with a test's sandbox
        r = case.call(headers=headers, timeout=CALL_TIMEOUT)
        check(case, r)
        if r.status_code == 201:
            made.append(r.json()["id"])
            with TestClient(app, headers=headers) as c:  # a retried key answers a removed one
                assert c.delete(f"/v1/sandboxes/{r.json()['id']}").status_code in (204, 404)

    strategy = op.as_strategy(generation_mode=GenerationMode.POSITIVE)

    @settings(
        max_examples=6,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        call(case)

    run()
    assert made, "no fuzzed create booted a sandbox"

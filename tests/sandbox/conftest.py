"""One booted sandbox shared by the tests that only exec and touch files in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from torpor.paths import Paths
from torpor.sandbox import Sandbox


@pytest.fixture(scope="session")
def sb(paths: Paths, tools_image: str) -> Iterator[Sandbox]:
    s = Sandbox.create(
        tools_image, memory="256M", network=False, labels={"suite": "sandbox"}, paths=paths
    )
    yield s
    s.kill()

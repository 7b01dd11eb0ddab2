"""Reference parsing follows Docker's rules (distribution/reference)."""

from __future__ import annotations

import pytest

from torpor.errors import UsageError
from torpor.image.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "familiar"),
    [
        ("tools", "docker.io", "library/tools", "latest", None, "tools:latest"),
        ("tools:1.0", "docker.io", "library/tools", "1.0", None, "tools:1.0"),
        ("user/app", "docker.io", "user/app", "latest", None, "user/app:latest"),
        ("docker.io/tools", "docker.io", "library/tools", "latest", None, "tools:latest"),
        ("index.docker.io/library/tools:x", "docker.io", "library/tools", "x", None, "tools:x"),
        ("docker.io/library/a/b", "docker.io", "library/a/b", "latest", None, "library/a/b:latest"),
        (
            "localhost:5000/tools:latest",
            "localhost:5000",
            "tools",
            "latest",
            None,
            "localhost:5000/tools:latest",
        ),
        ("localhost/tools", "localhost", "tools", "latest", None, "localhost/tools:latest"),
        ("127.0.0.1:5000/a/b:v2", "127.0.0.1:5000", "a/b", "v2", None, "127.0.0.1:5000/a/b:v2"),
        ("ghcr.io/o/r:t", "ghcr.io", "o/r", "t", None, "ghcr.io/o/r:t"),
        ("[::1]:5000/tools", "[::1]:5000", "tools", "latest", None, "[::1]:5000/tools:latest"),
        ("Registry/tools", "Registry", "tools", "latest", None, "Registry/tools:latest"),
        (f"tools@{DIGEST}", "docker.io", "library/tools", None, DIGEST, f"tools@{DIGEST}"),
        (
            f"localhost:5000/tools:1@{DIGEST}",
            "localhost:5000",
            "tools",
            "1",
            DIGEST,
            f"localhost:5000/tools:1@{DIGEST}",
        ),
        ("a.b-c/e__f---g:T_1.x-y", "a.b-c", "e__f---g", "T_1.x-y", None, "a.b-c/e__f---g:T_1.x-y"),
    ],
)
def test_valid(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, familiar: str
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.familiar == familiar
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar) == ref


def test_canonical_string() -> None:
    assert str(parse_reference("tools")) == "docker.io/library/tools:latest"
    assert str(parse_reference("localhost:5000/tools")) == "localhost:5000/tools:latest"
    assert str(parse_reference(f"tools@{DIGEST}")) == f"docker.io/library/tools@{DIGEST}"
    ref = parse_reference("localhost:5000/tools:v1")
    assert ref.name == "localhost:5000/tools"
    assert ref.pull_target == "v1"
    assert ref.with_digest(DIGEST).pull_target == DIGEST
    assert ref.with_tag("v2") == Reference("localhost:5000", "tools", "v2")


@pytest.mark.parametrize(
    "text",
    [
        "",
        " tools",
        "tools ",
        "Tools",
        "user/Tools",
        "tools:",
        ":tag",
        "tools:-bad",
        "tools:" + "x" * 129,
        "tools@sha256:abc",
        "tools@sha256:" + "AB" * 32,
        "tools@md5:" + "ab" * 16,
        "tools@sha512:" + "ab" * 64,
        "-tools",
        "tools-",
        "a//b",
        "/tools",
        "tools/",
        "a..b",
        "localhost:port/tools",
        "exa mple.com/tools",
        "my_registry.io/x",
        "ab" * 32,
        "x/" * 128 + "y",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_reference(text)
    assert repr(text) in str(exc.value)


def test_hex_name_allowed_with_registry_or_namespace() -> None:
    assert parse_reference("user/" + "ab" * 32).repository == "user/" + "ab" * 32

"""ImageConfig parsing and Docker's ENTRYPOINT/CMD and environment rules."""

from __future__ import annotations

import pytest

from torpor.errors import ImageError, UsageError
from torpor.image.config import DEFAULT_PATH, ImageConfig, merge_env, resolve_command

FULL = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": ["/entry.sh"],
        "Cmd": ["serve", "--port", "80"],
        "Env": ["PATH=/bin", "A=1"],
        "WorkingDir": "/srv",
        "User": "app:app",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
        "Labels": {"org.example": "yes"},
        "StopSignal": "SIGQUIT",
    },
}


def test_from_json_full() -> None:
    c = ImageConfig.from_json(FULL)
    assert c.entrypoint == ("/entry.sh",)
    assert c.cmd == ("serve", "--port", "80")
    assert c.env == ("PATH=/bin", "A=1")
    assert c.working_dir == "/srv"
    assert c.user == "app:app"
    assert c.exposed_ports == ("53/udp", "80/tcp")
    assert dict(c.labels) == {"org.example": "yes"}
    assert c.stop_signal == "SIGQUIT"
    assert (c.architecture, c.os) == ("amd64", "linux")
    assert ImageConfig.from_json({**FULL, "config": c.to_json()}) == c
    with pytest.raises(AttributeError):
        c.cmd = ("x",)  # type: ignore[misc]


def test_from_json_empty() -> None:
    c = ImageConfig.from_json({})
    assert c == ImageConfig()
    assert c.entrypoint is None and c.cmd is None and c.env == ()
    assert ImageConfig.from_json({"config": None}) == ImageConfig()


def test_from_json_bad_types() -> None:
    with pytest.raises(ImageError):
        ImageConfig.from_json({"config": {"Cmd": [1, 2]}})
    with pytest.raises(ImageError):
        ImageConfig.from_json({"config": {"Labels": ["x"]}})
    with pytest.raises(ImageError):
        ImageConfig.from_json({"config": "nope"})


def cfg(entrypoint: list[str] | None = None, cmd: list[str] | None = None) -> ImageConfig:
    return ImageConfig(
        entrypoint=tuple(entrypoint) if entrypoint is not None else None,
        cmd=tuple(cmd) if cmd is not None else None,
    )


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "ep_override", "cmd_override", "expected"),
    [
        # image only
        (None, ["sh"], None, None, ["sh"]),
        (["/e"], None, None, None, ["/e"]),
        (["/e", "-x"], ["a", "b"], None, None, ["/e", "-x", "a", "b"]),
        # args replace CMD, entrypoint stays
        (["/e"], ["a"], None, ["b", "c"], ["/e", "b", "c"]),
        (None, ["sh"], None, ["ls", "-l"], ["ls", "-l"]),
        # empty args are "no args"
        (None, ["sh"], None, [], ["sh"]),
        # --entrypoint resets the image CMD
        (["/e"], ["a"], ["/other"], None, ["/other"]),
        (None, ["sh"], ["/other"], None, ["/other"]),
        (["/e"], ["a"], ["/other"], ["x"], ["/other", "x"]),
        # --entrypoint "" clears it: only the given args run
        (["/e"], ["a"], [""], ["ls"], ["ls"]),
        (["/e"], ["a"], [], ["ls"], ["ls"]),
    ],
)
def test_resolve_command(
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    ep_override: list[str] | None,
    cmd_override: list[str] | None,
    expected: list[str],
) -> None:
    assert resolve_command(cfg(entrypoint, cmd), ep_override, cmd_override) == expected


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "ep_override", "cmd_override"),
    [
        (None, None, None, None),
        (None, [], None, []),
        (["/e"], ["a"], [""], None),  # cleared entrypoint and reset CMD
        (None, ["sh"], [], []),
    ],
)
def test_resolve_command_empty(
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    ep_override: list[str] | None,
    cmd_override: list[str] | None,
) -> None:
    with pytest.raises(UsageError, match="no command specified"):
        resolve_command(cfg(entrypoint, cmd), ep_override, cmd_override)


def test_merge_env_rules() -> None:
    env = merge_env(
        ["PATH=/bin", "A=1", "B=2", "EMPTY="],
        ["A=10", "C=3", "FROM_HOST", "MISSING", "B", "D=x=y"],
        environ={"FROM_HOST": "h", "B": "host-b"},
    )
    assert env == ["PATH=/bin", "A=10", "B=host-b", "EMPTY=", "C=3", "FROM_HOST=h", "D=x=y"]


def test_merge_env_unset_and_path_default() -> None:
    assert merge_env([], []) == [f"PATH={DEFAULT_PATH}"]
    assert merge_env(["A=1"], ["A"], environ={}) == [f"PATH={DEFAULT_PATH}"]
    # A caller may unset PATH; it falls back to the default, as in Docker.
    assert merge_env(["PATH=/x"], ["PATH"], environ={}) == [f"PATH={DEFAULT_PATH}"]
    assert merge_env(["PATH=/x"], ["PATH=/y"]) == ["PATH=/y"]


def test_merge_env_mapping_and_order() -> None:
    env = merge_env(["A=1"], {"B": "2", "A": "3", "H": None}, environ={"H": "host"})
    assert env == ["A=3", "B=2", "H=host", f"PATH={DEFAULT_PATH}"]
    assert merge_env([], ["X=1", "X=2"], environ={})[0] == "X=2"


def test_merge_env_bad_name() -> None:
    with pytest.raises(UsageError):
        merge_env([], ["=oops"])

"""The pure parts: kinds, superseded/effective, payload encoding rules."""

from __future__ import annotations

import pytest

from torpor.context import Entry, Kind, effective, superseded
from torpor.context.model import check_name, encode_json
from torpor.errors import UsageError


def _e(seq: int, kind: Kind = Kind.USER, **payload: object) -> Entry:
    return Entry("s", seq, kind, dict(payload), None, 0.0, 0)


def test_kind_values_are_the_stored_strings() -> None:
    assert {k.value for k in Kind} == {
        "user",
        "model_request",
        "model_response",
        "tool_call",
        "tool_result",
        "checkpoint",
        "hibernate",
        "resume",
        "error",
        "supersede",
        "fork",
        "vm",
        "removed",
        "custom",  # a user's own entry kind (Session.append("app.note", ...))
    }
    assert Kind("tool_call") is Kind.TOOL_CALL and Kind.VM == "vm"


def test_superseded_and_effective() -> None:
    es = [
        _e(1),
        _e(2),
        _e(3),
        _e(4, Kind.SUPERSEDE, seqs=[2], reason="edited"),
        _e(5),
        _e(6, Kind.SUPERSEDE, seqs=[3, 5, 6, 9], reason="compacted"),  # 6, 9: not earlier
        _e(7),
    ]
    assert superseded(es) == {2, 3, 5}
    assert [e.seq for e in effective(es)] == [1, 7]
    assert effective(iter(es)) == effective(es)  # any iterable, consumed once
    assert superseded([_e(2, Kind.SUPERSEDE, seqs="junk")]) == set()
    assert effective([]) == []


def test_names() -> None:
    assert check_name("a") == "a" and check_name("A9_.-z") == "A9_.-z"
    for bad in ["", "_a", "a b", "x" * 65, "ü"]:
        with pytest.raises(UsageError):
            check_name(bad)


def test_encoding_is_compact_utf8_and_refuses_what_a_backend_cannot_store() -> None:
    assert encode_json({"a": "é"}, "p") == ('{"a":"é"}', len('{"a":"é"}'.encode()))
    for bad in ({"x": "\x00"}, {"\x00": 1}, {"x": ["ok", "\x00"]}, {"x": float("inf")}):
        with pytest.raises(UsageError):
            encode_json(bad, "p")
    with pytest.raises(UsageError, match="dict"):
        encode_json([1], "p")  # type: ignore[arg-type]

"""What a hinted lazy restore saves as the next working set (no VM: QEMU's mapped
chunks given).  When the window closes with QEMU running, the hint's chunks the guest
used are kept in the hint's order, then what the server read itself; any earlier save
(or QEMU gone) keeps the hint whole."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from torpor.vmm.lazymem import MemoryFile

HINT = [10, 11, 12, 13, 14, 15]


def _server(mapped: set[int] | None) -> MemoryFile:
    art = SimpleNamespace(size=64 << 16, chunk_size=1 << 16, chunks=["h"] * 64)
    m = MemoryFile(
        None, art, uid=0, gid=0, prefetch=HINT, record=None, record_s=3.0, stats_path=None
    )
    m.hint = list(HINT)
    m._guest_mapped = lambda: mapped  # type: ignore[method-assign]
    return m


def test_a_closed_window_keeps_only_the_used_hint_then_what_was_read() -> None:
    m = _server({12, 10})
    assert m._with_hint([40, 11, 41], final=True) == [10, 11, 12, 40, 41]


@pytest.mark.parametrize("mapped,final", [({10}, False), (None, True)])
def test_a_save_that_cannot_judge_the_hint_keeps_it_whole(
    mapped: set[int] | None, final: bool
) -> None:
    assert _server(mapped)._with_hint([40], final=final) == [*HINT, 40]

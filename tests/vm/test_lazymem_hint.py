"""What a hinted lazy restore saves as the next working set (no VM: QEMU's mapped
chunks given).  The hint's chunks the guest used are kept in the hint's order, then
what the server read itself; a window that closed with QEMU's page tables read drops
every unused hinted chunk, an earlier save only those the guest went past."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from torpor.vmm.lazymem import MemoryFile


def _server(hint: list[int], mapped: set[int] | None) -> MemoryFile:
    art = SimpleNamespace(size=64 << 16, chunk_size=1 << 16, chunks=["h"] * 64)
    m = MemoryFile(
        None, art, uid=0, gid=0, prefetch=hint, record=None, record_s=3.0, stats_path=None
    )
    m.hint = list(hint)
    m._guest_mapped = lambda: mapped  # type: ignore[method-assign]
    return m


HINT = [10, 11, 12, 13, 14, 15]


def test_a_closed_window_keeps_only_the_used_hint_then_what_was_read() -> None:
    m = _server(HINT, {12, 10})
    assert m._with_hint([40, 12, 41], final=True) == [10, 12, 40, 41]


def test_an_early_save_keeps_what_the_guest_has_not_reached_yet() -> None:
    m = _server(HINT, {10, 12})  # 11 was passed over; 13.. not reached yet
    assert m._with_hint([40], final=False) == [10, 12, 13, 14, 15, 40]


@pytest.mark.parametrize("final", [True, False])
def test_qemu_gone_uses_the_last_mapping_read(final: bool) -> None:
    m = _server(HINT, {10, 11, 12})
    m._with_hint([], final=False)  # read while QEMU ran
    m._guest_mapped = lambda: None  # type: ignore[method-assign]
    assert m._with_hint([], final=final) == [10, 11, 12, 13, 14, 15]


def test_nothing_known_keeps_the_hint() -> None:
    m = _server(HINT, None)
    assert m._with_hint([40], final=True) == [*HINT, 40]

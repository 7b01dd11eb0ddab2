"""The migration-stream parser (torpor.vmm.migstream) on real QEMU 7.2 streams: a
device state saved by ``migrate`` with ``x-ignore-shared`` (what every snapshot
stores) and the output of ``xen-save-devices-state`` from the same VM (fixtures
captured from torpor's own microvm; the live path is covered by
tests/snapshot/test_private_capture.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzzing import fuzz
from torpor.errors import MigrationStreamError
from torpor.vmm import migstream

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "migstream"
DEVSTATE = (FIX / "qemu-7.2-devstate.bin").read_bytes()
SAVED = (FIX / "qemu-7.2-xen-save.bin").read_bytes()


def test_split_join_round_trip_and_what_the_head_says() -> None:
    prefix, rest = migstream.split(DEVSTATE)
    assert migstream.join(prefix, rest) == DEVSTATE
    assert prefix.machine == "microvm" and prefix.capabilities == ("x-ignore-shared",)
    mem = prefix.block("mem")
    assert mem is not None and mem.size == 256 << 20 and mem.addr == 0
    assert prefix.pages == 8  # the non-shared ROM blocks' pages only
    assert rest[0] == migstream.SECTION_FULL
    # a composed stream splits back into the same head and the saved device sections
    composed = migstream.compose(prefix, SAVED)
    p2, rest2 = migstream.split(composed)
    assert p2 == prefix
    assert rest2.startswith(SAVED[8:])


@pytest.mark.parametrize("cut", [1, 7, 12, 60, 100, 300, 20000, 33000])
def test_truncated_head_is_refused(cut: int) -> None:
    with pytest.raises(MigrationStreamError, match=r"ends early|ram section"):
        migstream.split(DEVSTATE[:cut])


def test_unknown_section_type_and_ram_flags_are_refused() -> None:
    prefix, rest = migstream.split(DEVSTATE)
    with pytest.raises(MigrationStreamError, match="unknown section type"):
        migstream.split(prefix.data + b"\x09" + rest)
    # the first ram record after the START header: MEM_SIZE -> an XBZRLE page (0x40)
    at = DEVSTATE.index(b"\x03ram") + 4 + 8
    bad = DEVSTATE[:at] + struct.pack(">Q", 0x40) + DEVSTATE[at + 8 :]
    with pytest.raises(MigrationStreamError, match="unknown ram record flags"):
        migstream.split(bad)
    with pytest.raises(MigrationStreamError, match="subsection"):
        caps = b"configuration/capabilities"
        migstream.split(DEVSTATE.replace(caps, caps[:-1] + b"z"))


def test_oversize_lengths_are_refused() -> None:
    with pytest.raises(MigrationStreamError, match="larger than"):
        migstream.split(DEVSTATE, max_prefix=4096)
    # a ram block bigger than the total the block list announces
    mem_at = DEVSTATE.index(b"\x03mem") + 4
    bad = DEVSTATE[:mem_at] + struct.pack(">Q", 1 << 40) + DEVSTATE[mem_at + 8 :]
    with pytest.raises(MigrationStreamError, match="ram block 'mem'"):
        migstream.split(bad)
    # a machine name of 2^32-1 bytes
    with pytest.raises(MigrationStreamError, match="machine name"):
        migstream.split(DEVSTATE[:9] + b"\xff\xff\xff\xff" + DEVSTATE[13:])


def test_saved_device_state_is_checked() -> None:
    assert migstream.device_sections(SAVED) == SAVED[8:]
    prefix, _ = migstream.split(DEVSTATE)
    with pytest.raises(MigrationStreamError, match="EOF"):
        migstream.compose(prefix, SAVED[:-1])  # cut short
    with pytest.raises(MigrationStreamError, match="not a QEMU migration stream"):
        migstream.compose(prefix, b"XXXX" + SAVED[4:])
    with pytest.raises(MigrationStreamError, match="starts with section type"):
        migstream.compose(prefix, SAVED[:8] + b"\x01\x00")


@fuzz
@given(st.data())
def test_fuzzed_heads_parse_or_are_refused(data: st.DataObject) -> None:
    """Random edits of a real head: a parse (that round-trips) or MigrationStreamError —
    never another exception, and never a head larger than the cap."""
    head = bytearray(DEVSTATE[:33400])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(head) - 1))
        head[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(head)))
    stream = bytes(head[:cut])
    try:
        prefix, rest = migstream.split(stream, max_prefix=40_000)
    except MigrationStreamError:
        return
    assert len(prefix.data) <= 40_000
    assert migstream.join(prefix, rest) == stream


def _block_bytes(prefix: migstream.Prefix, name: str) -> bytearray:
    b = prefix.block(name)
    assert b is not None
    out = bytearray(b.size)
    for r in prefix.records:
        if r.block == name:
            d = prefix.data
            if r.kind == migstream.RAM_PAGE:
                out[r.addr : r.addr + 4096] = d[r.data : r.data + 4096]
            else:
                out[r.addr : r.addr + 4096] = d[r.data : r.data + 1] * 4096
    return out


def test_refresh_puts_a_blocks_current_bytes_in_the_head() -> None:
    """The BIOS region of a microvm is guest-writable RAM outside the guest's RAM file:
    a private VM's capture refreshes its pages in the reused head."""
    prefix, rest = migstream.split(DEVSTATE)
    bios = _block_bytes(prefix, "pc.bios")
    assert migstream.refresh(prefix, "pc.bios", bytes(bios)).data == prefix.data
    bios[0x10:0x14] = b"ABCD"  # a PAGE record's bytes
    bios[0x4010:0x4014] = b"WXYZ"  # a ZERO record: becomes a PAGE record
    new = migstream.refresh(prefix, "pc.bios", bytes(bios))
    assert _block_bytes(new, "pc.bios") == bios
    assert (new.pages, new.zero_pages) == (prefix.pages + 1, prefix.zero_pages - 1)
    for other in ("/rom@etc/acpi/tables", "/rom@etc/acpi/rsdp"):
        assert _block_bytes(new, other) == _block_bytes(prefix, other)
    p2, rest2 = migstream.split(migstream.join(new, rest))
    assert p2 == new and rest2 == rest
    with pytest.raises(MigrationStreamError, match="no RAM block"):
        migstream.refresh(prefix, "pc.bios", bytes(100))
    with pytest.raises(MigrationStreamError, match="no RAM block"):
        migstream.refresh(prefix, "nope", b"")

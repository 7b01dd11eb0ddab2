"""QEMU's migration stream, as far as torpor needs it: split and compose device state.

Why: a VM whose guest RAM is mapped private (``share=off``) cannot be captured with
``migrate`` + ``x-ignore-shared`` without putting all of RAM in the stream.  Its
capture (:mod:`torpor.vmm.capture`) saves device state with QMP
``xen-save-devices-state`` instead, which writes the device sections only; a restore
(``migrate-incoming``) needs the stream's head too.  So a private VM's device state
is **the parent stream's prefix** (everything before its first device section) **+
the new device sections**.  The prefix is constant for one running QEMU: it
describes the RAM blocks and carries the few pages of the non-shared ROM blocks
(BIOS, ACPI tables), which the guest cannot change.

Format (QEMU 7.2 ``migration/savevm.c`` and ``ram.c``; big-endian throughout)::

    stream   := be32 0x5145564d ("QEVM")  be32 3  configuration  section*  ...
    configuration := 0x07  be32 len  machine-name[len]  subsection*
    subsection    := 0x05  u8 len  name[len]  be32 version  body
        "configuration/capabilities": be32 count, count x (u8 len, name[len])
        "configuration/target-page-bits": be32      "configuration/uuid": 16 bytes
    START    := 0x01  be32 id  u8 len  idstr[len]  be32 instance  be32 version  body  footer
    PART/END := 0x02 / 0x03  be32 id  body  footer
    FULL     := 0x04  (as START)  body  footer      -- a device: the split point
    footer   := 0x7e  be32 id                         EOF := 0x00
    COMMAND  := 0x08  be16 cmd  be16 len  data[len]   (QEMU >= 9: SWITCHOVER_START, 11)
    VMDESC   := 0x06  be32 len  json[len]             (after EOF)

A ``ram`` section's body is a list of records ``be64 addr | flags`` (flags in the
low 12 bits) ending with ``EOS`` (0x10): ``MEM_SIZE`` (0x04; addr = total bytes,
then per block ``u8 len name be64 size`` and, with ``x-ignore-shared``, ``be64
guest address`` until the sizes add up to the total), ``PAGE`` (0x08) and ``ZERO``
(0x02), each followed by ``u8 len name`` unless ``CONTINUE`` (0x20) is set, then
4096 bytes or 1 fill byte.  Device sections (FULL) have no length: only their
vmstate description tells where they end — which is why the split is at the first
FULL section and the device part is kept as one opaque run.

Invariants: the parser refuses anything it does not know (section and record types,
flags, subsections, commands), a stream that ends early, and sizes past the caps
(:data:`MAX_PREFIX`, names ≤ 255 by format, at most :data:`MAX_BLOCKS` RAM blocks
and :data:`MAX_CAPABILITIES` capabilities); every error is a
:class:`~torpor.errors.MigrationStreamError` naming the offset.  The parsed streams
come from the store (MAC-checked manifests, hash-checked chunks) and from QEMU —
a process the guest may control — so they are treated as hostile input.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from torpor.errors import MigrationStreamError

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
HEADER = struct.pack(">II", MAGIC, VERSION)

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E

CMD_SWITCHOVER_START = 11  # QEMU >= 9.x, before the ram END section; no payload

RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
PAGE_SIZE = 4096  # x86's TARGET_PAGE_SIZE
FLAG_MASK = PAGE_SIZE - 1

MAX_PREFIX = 64 << 20  # a prefix is ~40 KB (8 ROM pages): 64 MiB is far past any real one
MAX_BLOCKS = 64
MAX_CAPABILITIES = 64
MAX_VMDESC = 16 << 20

KNOWN_SUBSECTIONS = (
    "configuration/capabilities",
    "configuration/target-page-bits",
    "configuration/uuid",
)


@dataclass(frozen=True)
class RamBlock:
    name: str
    size: int
    addr: int | None  # guest address (streams with x-ignore-shared only)


@dataclass(frozen=True)
class PageRecord:
    """Where one page of a RAM block sits in a stream's head."""

    start: int  # offset of its be64 addr|flags
    data: int  # offset of its 4096 bytes (PAGE) or its fill byte (ZERO)
    block: str
    addr: int  # offset in the block
    kind: int  # RAM_PAGE or RAM_ZERO


@dataclass(frozen=True)
class Prefix:
    """A stream's head: header, configuration and the RAM sections, as bytes and parsed."""

    data: bytes
    machine: str
    capabilities: tuple[str, ...]
    blocks: tuple[RamBlock, ...]
    pages: int  # PAGE records (non-shared RAM in the stream)
    zero_pages: int
    records: tuple[PageRecord, ...] = field(default=(), compare=False, repr=False)

    def block(self, name: str) -> RamBlock | None:
        return next((b for b in self.blocks if b.name == name), None)


class _Reader:
    def __init__(self, data: bytes | memoryview, limit: int) -> None:
        self.d = memoryview(data)
        self.pos = 0
        self.limit = limit

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.d):
            raise MigrationStreamError(
                f"device-state stream ends early: {what} at offset {self.pos} needs {n} "
                f"bytes, {len(self.d) - self.pos} left"
            )
        if self.pos + n > self.limit:
            raise MigrationStreamError(
                f"device-state stream: its head is larger than {self.limit} bytes "
                f"({what} at offset {self.pos})"
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = bytes(self.d[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.d[self.pos]
        self.pos += 1
        return v

    def peek(self, what: str) -> int:
        self.need(1, what)
        return int(self.d[self.pos])

    def be16(self, what: str) -> int:
        return int(struct.unpack(">H", self.take(2, what))[0])

    def be32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def be64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])

    def name(self, what: str) -> str:
        n = self.u8(what)
        if n == 0:
            raise MigrationStreamError(f"device-state stream: empty {what} at offset {self.pos}")
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MigrationStreamError(
                f"device-state stream: {what} at offset {self.pos - n} is not ASCII"
            ) from None


def _bad(r: _Reader, msg: str) -> MigrationStreamError:
    return MigrationStreamError(f"device-state stream: {msg} at offset {r.pos}")


def _header(r: _Reader) -> None:
    magic, version = r.be32("magic"), r.be32("version")
    if magic != MAGIC:
        raise MigrationStreamError(f"not a QEMU migration stream (magic {magic:#010x})")
    if version != VERSION:
        raise MigrationStreamError(f"QEMU migration stream version {version}, not {VERSION}")


def _configuration(r: _Reader) -> tuple[str, tuple[str, ...]]:
    if r.u8("configuration") != CONFIGURATION:
        r.pos -= 1
        raise _bad(r, "no configuration section")
    n = r.be32("machine name length")
    if not 0 < n <= 255:
        raise _bad(r, f"machine name of {n} bytes")
    try:
        machine = r.take(n, "machine name").decode("ascii")
    except UnicodeDecodeError:
        raise _bad(r, "machine name is not ASCII") from None
    caps: tuple[str, ...] = ()
    seen: set[str] = set()
    while r.peek("section type") == SUBSECTION:
        r.pos += 1
        name = r.name("subsection name")
        if name not in KNOWN_SUBSECTIONS or name in seen:
            raise _bad(r, f"unknown or repeated configuration subsection {name!r}")
        seen.add(name)
        if r.be32("subsection version") != 1:
            raise _bad(r, f"subsection {name!r} of an unknown version")
        if name == "configuration/capabilities":
            count = r.be32("capability count")
            if count > MAX_CAPABILITIES:
                raise _bad(r, f"{count} capabilities")
            caps = tuple(r.name("capability") for _ in range(count))
        elif name == "configuration/target-page-bits":
            if r.be32("target page bits") != 12:
                raise _bad(r, "target page size is not 4 KiB")
        else:
            r.skip(16, "uuid")
    return machine, caps


class _Ram:
    """The state of the ``ram`` section across START / PART / END."""

    def __init__(self, ignore_shared: bool) -> None:
        self.ignore_shared = ignore_shared
        self.blocks: list[RamBlock] = []
        self.last: str | None = None  # the block CONTINUE refers to
        self.pages = self.zero = 0
        self.records: list[PageRecord] = []

    def body(self, r: _Reader) -> None:
        while True:
            start = r.pos
            v = r.be64("ram record")
            flags, addr = v & FLAG_MASK, v & ~FLAG_MASK
            kind = flags & ~RAM_CONTINUE
            if kind == RAM_EOS and not flags & RAM_CONTINUE:
                return
            if kind == RAM_MEM_SIZE and not flags & RAM_CONTINUE:
                self.mem_size(r, addr)
            elif kind in (RAM_PAGE, RAM_ZERO):
                if flags & RAM_CONTINUE:
                    if self.last is None:
                        raise _bad(r, "a ram page continues no block")
                else:
                    self.last = r.name("ram block name")
                block = next((b for b in self.blocks if b.name == self.last), None)
                if block is None or addr + PAGE_SIZE > block.size:
                    raise _bad(r, f"a ram page outside the blocks ({self.last!r} @ {addr:#x})")
                self.records.append(PageRecord(start, r.pos, block.name, addr, kind))
                if kind == RAM_PAGE:
                    r.skip(PAGE_SIZE, "ram page")
                    self.pages += 1
                else:
                    r.skip(1, "zero page fill byte")
                    self.zero += 1
            else:
                raise _bad(r, f"unknown ram record flags {flags:#x}")

    def mem_size(self, r: _Reader, total: int) -> None:
        if self.blocks:
            raise _bad(r, "a second ram block list")
        left = total
        while left > 0:
            if len(self.blocks) >= MAX_BLOCKS:
                raise _bad(r, f"more than {MAX_BLOCKS} ram blocks")
            name = r.name("ram block name")
            size = r.be64("ram block size")
            addr = r.be64("ram block address") if self.ignore_shared else None
            if size == 0 or size > left or size & FLAG_MASK:
                raise _bad(r, f"ram block {name!r} of {size} bytes ({left} left of {total})")
            if any(b.name == name for b in self.blocks):
                raise _bad(r, f"ram block {name!r} listed twice")
            self.blocks.append(RamBlock(name, size, addr))
            left -= size


def _section_id_header(r: _Reader) -> tuple[int, str, int, int]:
    sid = r.be32("section id")
    idstr = r.name("section name")
    return sid, idstr, r.be32("instance id"), r.be32("version id")


def _footer(r: _Reader, sid: int) -> None:
    if r.u8("section footer") != FOOTER or r.be32("footer section id") != sid:
        raise _bad(r, f"section {sid} has no footer")


def split(stream: bytes | memoryview, max_prefix: int = MAX_PREFIX) -> tuple[Prefix, bytes]:
    """Parse ``stream``'s head up to its first device (FULL) section; return the head
    and the rest (FULL sections, EOF, and whatever follows: opaque).

    Raises MigrationStreamError for anything unknown, truncated or over the caps.
    """
    r = _Reader(stream, max_prefix)
    _header(r)
    machine, caps = _configuration(r)
    ram: _Ram | None = None
    ram_id = -1
    ended = False
    while True:
        kind = r.peek("section type")
        if kind in (SECTION_FULL, EOF):
            break
        r.pos += 1
        if kind == SECTION_START:
            sid, idstr, instance, version = _section_id_header(r)
            if idstr != "ram" or ram is not None or instance != 0 or version != 4:
                raise _bad(r, f"section {idstr!r} (instance {instance}, version {version})")
            ram, ram_id = _Ram("x-ignore-shared" in caps), sid
            ram.body(r)
            _footer(r, sid)
        elif kind in (SECTION_PART, SECTION_END):
            sid = r.be32("section id")
            if ram is None or sid != ram_id or ended:
                raise _bad(r, f"a section part for unknown section {sid}")
            ram.body(r)
            _footer(r, sid)
            ended = kind == SECTION_END
        elif kind == COMMAND:
            cmd, n = r.be16("command"), r.be16("command length")
            if cmd != CMD_SWITCHOVER_START or n != 0:
                raise _bad(r, f"unknown command {cmd} ({n} bytes)")
        else:
            r.pos -= 1
            raise _bad(r, f"unknown section type {kind:#x}")
    if ram is None or not ended:
        raise _bad(r, "the ram section is missing or unfinished before the devices")
    prefix = Prefix(
        data=bytes(r.d[: r.pos]),
        machine=machine,
        capabilities=caps,
        blocks=tuple(ram.blocks),
        pages=ram.pages,
        zero_pages=ram.zero,
        records=tuple(ram.records),
    )
    return prefix, bytes(r.d[r.pos :])


def refresh(prefix: Prefix, block: str, content: bytes) -> Prefix:
    """``prefix`` with the pages of RAM block ``block`` replaced by ``content`` (the
    block's bytes now).  A non-shared block the guest can write (the BIOS region of a
    microvm is RAM) must not come back as it was when the head was written.

    A PAGE record keeps its header and gets the new bytes; a ZERO record whose fill no
    longer matches becomes a PAGE record.  Raises MigrationStreamError if the head
    does not hold every page of the block exactly once, or ``content`` is not its size.
    """
    b = prefix.block(block)
    recs = [x for x in prefix.records if x.block == block]
    if b is None or len(content) != b.size:
        raise MigrationStreamError(f"no RAM block {block!r} of {len(content)} bytes in the head")
    if sorted(x.addr for x in recs) != list(range(0, b.size, PAGE_SIZE)):
        raise MigrationStreamError(f"the head does not hold every page of {block!r} once")
    out, pos = [], 0
    d = prefix.data
    for x in sorted(recs, key=lambda x: x.start):
        page = content[x.addr : x.addr + PAGE_SIZE]
        if x.kind == RAM_PAGE:
            out += [d[pos : x.data], page]
            pos = x.data + PAGE_SIZE
        elif page != bytes([d[x.data]]) * PAGE_SIZE:
            (v,) = struct.unpack(">Q", d[x.start : x.start + 8])
            out += [d[pos : x.start], struct.pack(">Q", (v & ~RAM_ZERO) | RAM_PAGE)]
            out += [d[x.start + 8 : x.data], page]
            pos = x.data + 1
    out.append(d[pos:])
    new, rest = split(b"".join(out) + bytes([EOF]))  # (a head is followed by a section)
    if rest != bytes([EOF]):
        raise MigrationStreamError("a refreshed head does not end where the devices start")
    return new


def device_sections(saved: bytes | memoryview) -> bytes:
    """The device part of ``xen-save-devices-state`` output: what follows its header.

    Checked as far as the format allows without QEMU's vmstate descriptions: the
    header, a first section that is a device (FULL) or EOF, and the closing EOF.
    """
    r = _Reader(saved, len(saved))
    _header(r)
    body = bytes(r.d[r.pos :])
    if not body or body[-1] != EOF:
        raise MigrationStreamError("saved device state does not end with EOF (cut short?)")
    if body[0] == SECTION_FULL:
        r.pos += 1
        _section_id_header(r)  # a device section's header, at least
    elif len(body) != 1:
        raise _bad(r, f"saved device state starts with section type {body[0]:#x}")
    return body


# The description QEMU reads (and ignores) after EOF; without one every load logs
# "Expected vmdescription section".  Tools that analyse streams find no devices in it.
_VMDESC = json.dumps({"page_size": PAGE_SIZE, "devices": []}, separators=(",", ":")).encode()


def compose(prefix: Prefix, saved: bytes | memoryview) -> bytes:
    """A loadable stream: ``prefix`` + the device sections of ``saved`` (the output of
    ``xen-save-devices-state``) + an empty vmdescription."""
    body = device_sections(saved)
    return prefix.data + body + bytes([VMDESCRIPTION]) + struct.pack(">I", len(_VMDESC)) + _VMDESC


def join(prefix: Prefix, rest: bytes) -> bytes:
    """The inverse of :func:`split`: ``prefix`` + ``rest`` unchanged."""
    return prefix.data + rest

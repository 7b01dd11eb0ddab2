"""Reading a qcow2 overlay's header on the host: the disk's backing file name.

A VM's overlay is written by its QEMU, which a guest may have taken over, so the
header is hostile input: the name's offset and length come from it.  QEMU itself
refuses backing names longer than 1023 bytes; so do we, before reading anything,
rather than letting a header make the host allocate what it says.
"""

from __future__ import annotations

import struct
from pathlib import Path

from torpor.errors import VMError

MAGIC = b"QFI\xfb"
MAX_BACKING_NAME = 1023  # QEMU's own limit for backing_file_size


def qcow2_backing(path: Path) -> str | None:
    """The backing file name recorded in a qcow2 header (None if it has none).

    Raises VMError for a header whose name is longer than QEMU allows or ends early
    (never an unbounded read), and OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(32)
        if len(head) < 20 or head[:4] != MAGIC:
            return None
        off, size = struct.unpack(">QI", head[8:20])
        if not off or not size:
            return None
        if size > MAX_BACKING_NAME:
            raise VMError(
                f"the disk's qcow2 header names a {size}-byte backing file "
                f"(QEMU allows {MAX_BACKING_NAME}): refused as corrupt",
                step="read disk header",
                path=path,
            )
        f.seek(off)
        name = f.read(size)
    if len(name) != size:
        raise VMError(
            "the disk's qcow2 header points past its end", step="read disk header", path=path
        )
    return name.decode("utf-8", "surrogateescape")

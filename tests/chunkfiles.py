"""Where a stored chunk's frame is on disk, for tests that damage or hide chunks.

A chunk is a loose file ``chunks/<aa>/<hash>`` or a frame inside a local pack
``packs/<name>.pack`` (torpor/store/packs.py): a first snapshot's memory is packed.
Tests that flip bytes of a chunk or move it away go through here, and put everything
back afterwards (the test session's store is shared: later tests verify it whole).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from torpor.store import ChunkStore


def frame_location(store: ChunkStore, h: str) -> tuple[Path, int, int]:
    """(file, offset, length) of chunk ``h``'s stored frame (FileNotFoundError if it is
    not stored)."""
    hit = store._packs.get(h)
    if hit is None:
        store._packs.refresh()
        hit = store._packs.get(h)
    if hit is not None and os.path.exists(store._packs.path(hit[0])):
        return Path(store._packs.path(hit[0])), hit[1].offset, hit[1].length
    p = store.chunk_path(h)
    return p, 0, p.stat().st_size


@contextlib.contextmanager
def damaged(store: ChunkStore, hashes: Iterable[str]) -> Iterator[None]:
    """The frames of ``hashes`` with their last 8 bytes flipped (so they no longer
    decompress to their hash) while the block runs; restored after."""
    saved: list[tuple[Path, int, bytes]] = []
    try:
        for h in hashes:
            path, off, ln = frame_location(store, h)
            os.chmod(path, 0o600)
            with open(path, "r+b") as f:
                f.seek(off + ln - 8)
                old = f.read(8)
                saved.append((path, off + ln - 8, old))
                f.seek(off + ln - 8)
                f.write(bytes(b ^ 0xFF for b in old))
        yield
    finally:
        for path, at, old in reversed(saved):
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(old)


def hide(store: ChunkStore, hashes: Iterable[str]) -> Callable[[], None]:
    """Move the files holding ``hashes`` away (a pack goes whole, with every chunk in
    it); returns the function that puts them back."""
    moved: dict[Path, Path] = {}
    for path in {frame_location(store, h)[0] for h in hashes}:  # all found, then moved
        away = path.with_name(path.name + ".away")
        path.rename(away)
        moved[path] = away

    def put_back() -> None:
        for path, away in moved.items():
            away.rename(path)

    return put_back

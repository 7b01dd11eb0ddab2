"""Listing and removal survive damaged manifests; tags name snapshots; removal is final;
a read-only home is a clear error.  No VMs: snapshots are committed straight into a
private home's store and the real CLI is run against it."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from tests.store.conftest import KiB
from torpor.errors import ConflictError, NotFoundError
from torpor.paths import Paths
from torpor.store import ChunkStore, ManifestError

CS = 64 * KiB


def _home(tmp_path: Path) -> tuple[Path, ChunkStore]:
    home = tmp_path / "home"
    paths = Paths(home).ensure()
    paths.store.mkdir(parents=True, exist_ok=True)
    return home, ChunkStore(paths.store)


def _commit(store: ChunkStore, tmp_path: Path, seed: int, tag: str = "", parent=None):
    src = tmp_path / f"src{seed}"
    src.write_bytes(random.Random(seed).randbytes(3 * CS))
    art, _ = store.put_file(src, chunk_size=CS)
    return store.commit({"memory": art}, parent=parent, meta={"tag": tag})


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return torpor_cli(*args, env={"TORPOR_HOME": str(home)})


def _damage(store: ChunkStore, snap_id: str) -> Path:
    p = store.snapshots_dir / f"{snap_id}.manifest"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x40
    p.write_bytes(bytes(data))
    return p


def test_damaged_manifest_is_listed_marked_and_removable(tmp_path) -> None:
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1, tag="alpha")
    b = _commit(store, tmp_path, 2, tag="beta")
    c = _commit(store, tmp_path, 3, tag="gamma")
    _damage(store, b.id)
    good, bad = store.scan()
    assert [m.id for m in good] == [a.id, c.id]
    assert [i for i, _ in bad] == [b.id] and isinstance(bad[0][1], ManifestError)

    r = _cli(home, "snapshots")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert a.id[:12] in out and c.id[:12] in out
    assert b.id[:12] in out and "DAMAGED" in out
    assert b.id[:12] in r.stderr.decode() and "Traceback" not in r.stderr.decode()

    r = _cli(home, "snapshot", "inspect", c.id[:12])
    assert r.returncode == 0, r.stderr
    r = _cli(home, "snapshot", "inspect", b.id[:12])
    assert r.returncode == 10 and b"damaged" in r.stderr and b"Traceback" not in r.stderr

    r = _cli(home, "snapshot", "rm", b.id[:12])
    assert r.returncode == 0, r.stderr
    r = _cli(home, "snapshot", "rm", a.id[:12])
    assert r.returncode == 0, r.stderr
    assert [m.id for m in store.list()] == [c.id]
    assert store.scan()[1] == []


def test_unreadable_manifest_file_is_damage_not_a_crash(tmp_path) -> None:
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1)
    (store.snapshots_dir / f"{'ab' * 32}.manifest").mkdir()  # a directory where a file goes
    good, bad = store.scan()
    assert [m.id for m in good] == [a.id] and [i for i, _ in bad] == ["ab" * 32]
    r = _cli(home, "snapshots")
    assert r.returncode == 0 and b"DAMAGED" in r.stdout, r.stderr


def test_a_tag_works_wherever_an_id_does(tmp_path) -> None:
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1, tag="after-install")
    b = _commit(store, tmp_path, 2, tag="twin")
    c = _commit(store, tmp_path, 3, tag="twin")
    assert store.get("after-install").id == a.id
    assert store.get(a.id[:10]).id == a.id
    with pytest.raises(ConflictError) as e:
        store.get("twin")
    assert b.id[:12] in str(e.value) and c.id[:12] in str(e.value)  # the candidates
    with pytest.raises(NotFoundError):
        store.get("no-such-tag")

    r = _cli(home, "snapshot", "inspect", "after-install")
    assert r.returncode == 0 and a.id.encode() in r.stdout, r.stderr
    r = _cli(home, "snapshot", "inspect", "twin")
    assert r.returncode == 4 and b.id[:12].encode() in r.stderr
    r = _cli(home, "restore", "twin")
    assert r.returncode == 4 and c.id[:12].encode() in r.stderr
    r = _cli(home, "snapshot", "rm", "after-install")
    assert r.returncode == 0, r.stderr
    assert a.id not in store.ids()


def test_removed_snapshot_stays_removed_when_its_manifest_is_copied_back(tmp_path) -> None:
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1, tag="keep")
    b = _commit(store, tmp_path, 2, tag="gone")
    path = store.snapshots_dir / f"{b.id}.manifest"
    saved = tmp_path / "saved.manifest"
    shutil.copy2(path, saved)
    store.remove(b.id)
    shutil.copy2(saved, path)  # put back: its MAC still verifies
    with pytest.raises(NotFoundError):
        store.get(b.id)
    with pytest.raises(NotFoundError):
        store.get("gone")
    assert [m.id for m in store.list()] == [a.id]
    assert store.verify().ok
    r = _cli(home, "snapshots")
    assert r.returncode == 0 and b.id[:12].encode() not in r.stdout
    r = _cli(home, "snapshot", "inspect", b.id)
    assert r.returncode == 3, r.stderr
    # gc neither keeps its chunks nor the copied-back file
    report = store.gc(grace_seconds=0)
    assert report.chunks_deleted == len(b.chunks - a.chunks)
    assert not path.exists()


def test_removing_a_snapshot_drops_its_hot_cache(tmp_path) -> None:
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1)
    b = _commit(store, tmp_path, 2)
    cache = Paths(home).snapshot_cache
    for s in (a, b):
        (cache / s.id).mkdir(parents=True)
        (cache / s.id / "devstate").write_bytes(b"x")
    r = _cli(home, "snapshot", "rm", a.id[:12])
    assert r.returncode == 0, r.stderr
    assert not (cache / a.id).exists() and (cache / b.id).exists()
    # a snapshot removed behind torpor's back: gc takes its cache
    store.remove(b.id)
    r = _cli(home, "gc", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert not (cache / b.id).exists()


def _ro_cli(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI with ``home`` mounted read-only (a private mount namespace)."""
    import shlex
    import sys

    cmd = (
        f"mount --bind {shlex.quote(str(home))} {shlex.quote(str(home))} && "
        f"mount -o remount,bind,ro {shlex.quote(str(home))} && "
        f"exec {shlex.quote(sys.executable)} -m torpor.cli.main "
        + " ".join(shlex.quote(a) for a in args)
    )
    return torpor_cli_raw(["unshare", "-m", "sh", "-c", cmd], home)


def torpor_cli_raw(argv: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    import os

    env = dict(os.environ, TORPOR_HOME=str(home))
    env.pop("TORPOR_DEBUG", None)
    return subprocess.run(argv, capture_output=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def _can_mount_ro(tmp_path: Path) -> bool:
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"],
        capture_output=True,
    )
    return r.returncode == 0


def test_read_only_home_is_a_clear_error(tmp_path) -> None:
    if not _can_mount_ro(tmp_path):
        pytest.skip("needs mount namespaces (unshare -m) to make a read-only home")
    home, store = _home(tmp_path)
    a = _commit(store, tmp_path, 1, tag="t")
    for args in (("snapshot", "rm", a.id[:12]), ("gc", "--grace", "0")):
        r = _ro_cli(home, *args)
        err = r.stderr.decode()
        assert r.returncode != 0 and "Traceback" not in err, (args, err)
        assert "read-only" in err.lower() and str(home) in err, (args, err)
    assert store.get(a.id).id == a.id  # nothing changed


def test_tag_lookup_reads_only_authentic_meta(tmp_path) -> None:
    _, store = _home(tmp_path)
    weird = 'we"ird ✓ ,"meta":{"tag":"x"} \\'
    a = _commit(store, tmp_path, 1, tag=weird)
    b = _commit(store, tmp_path, 2, tag="x")
    assert store.get(weird).id == a.id
    assert store.get("x").id == b.id
    # a manifest whose MAC fails is not a tag candidate, even if it names the tag
    _damage(store, b.id)
    with pytest.raises(NotFoundError):
        store.get("x")

"""The CLI with snapshots in a bucket: every store command sees the bucket, not the cache.

Two homes on one machine stand for two hosts sharing a bucket (real SeaweedFS) and
one store key.  Home A (the test session's home, which has the image) snapshots a
VM through ``torpor --store ...`` with a tiny cache bound, so its cache is evicted
right after the commit; home B has never seen the snapshot and has an empty cache.
One VM boot in all.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from torpor.paths import Paths

pytestmark = pytest.mark.vm


def _cli(*args: str, home: Path, env: dict[str, str]) -> str:
    r = torpor_cli(*args, env={**env, "TORPOR_HOME": str(home)})
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert b"Traceback" not in r.stderr
    return r.stdout.decode()


def _keys(s3_server, bucket: str) -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _ids(out: str) -> set[str]:
    return {row["id"] for row in json.loads(out)}


def test_store_commands_see_the_bucket_from_another_home(
    vms,
    tools_image,
    paths,
    tmp_path,
    s3_server,
    bucket,
) -> None:
    url = f"s3://{bucket}/torpor"
    env = {k: v for k, v in s3_server.env(bucket, "torpor").items() if k.startswith("AWS_")}
    # the option wins over the environment: this bucket does not exist
    env |= {"TORPOR_STORE": "s3://no-such-bucket-here/x", "TORPOR_CACHE_MAX": "1"}
    vm = vms.run(tools_image, "sleep", "infinity", name="bucket-cli")
    a = paths.root
    snap = _cli("--store", url, "snapshot", vm.name, "--tag", "bucket-cli", home=a, env=env)
    snap = snap.strip()
    m = json.loads(_cli("--store", url, "snapshot", "inspect", snap, home=a, env=env))
    loc = m["location"]
    assert loc["store"] == "bucket" and loc["in_bucket"] and not loc["upload_pending"]
    # TORPOR_CACHE_MAX=1: the commit evicted what the bucket holds from A's cache
    assert loc["cached_chunks"] < loc["chunks"]
    assert "ok" in _cli("--store", url, "verify", home=a, env=env).splitlines()[-1]

    b = Paths(tmp_path / "host-b").ensure()
    b.store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(paths.store / "key", b.store / "key")  # one key per deployment
    on_b = {"home": b.root, "env": env}
    rows = json.loads(_cli("--store", url, "snapshot", "ls", "--format", "json", **on_b))
    assert snap in {r["id"] for r in rows}
    # the VM's base disk travels as a manifest of its own: listed, and named as such
    bases = [r for r in rows if r["kind"] == "image-base"]
    assert all(r["Tag"] == "(image-base)" for r in bases)
    assert {r["kind"] for r in rows if r["id"] == snap} == {"vm-snapshot"}
    got = json.loads(_cli("--store", url, "snapshot", "inspect", "bucket-cli", **on_b))
    assert got["id"] == snap and got["vm"] == "bucket-cli"
    assert got["location"]["in_bucket"] and got["location"]["cached_chunks"] == 0
    # B's cache holds none of its chunks: absent from a cache is not damage
    out = _cli("--store", url, "verify", **on_b)
    assert out.splitlines()[-1] == "ok" and "missing" not in out
    # what verify said before it opened the bucket: the cache alone lacks every chunk
    cache_only = torpor_cli("--store", "local", "verify", env={"TORPOR_HOME": str(b.root)})
    assert cache_only.returncode == 10 and b"missing chunk" in cache_only.stdout

    # an object the bucket lost is damage
    client = s3_server.client()
    for k in _keys(s3_server, bucket):
        if k.startswith("torpor/packs/"):
            client.delete_object(Bucket=bucket, Key=k)
    lost = torpor_cli("--store", url, "verify", env={**env, "TORPOR_HOME": str(b.root)})
    assert lost.returncode == 10 and f"snapshot {snap[:12]} is damaged".encode() in lost.stdout

    assert _cli("--store", url, "snapshot", "rm", snap, **on_b).strip() == snap
    # gc --dry-run lists what would go (the removed snapshot's objects) and deletes nothing
    before = _keys(s3_server, bucket)
    dry = _cli("--store", url, "gc", "--dry-run", "--grace", "0", **on_b)
    assert f"would delete snapshots/{snap}.manifest (bucket)" in dry, dry
    assert _keys(s3_server, bucket) == before
    # removed on B: gone on A too (a tombstone in the bucket)
    assert snap not in _ids(_cli("--store", url, "snapshots", "--format", "json", home=a, env=env))
    gone = torpor_cli(
        "--store", url, "snapshot", "inspect", snap, env={**env, "TORPOR_HOME": str(a)}
    )
    assert gone.returncode != 0 and b"Traceback" not in gone.stderr


def test_info_names_the_store(tmp_path) -> None:
    env = {"TORPOR_HOME": str(tmp_path / "h"), "TORPOR_CACHE_MAX": "2G"}
    r = torpor_cli("--store", "s3://some-bucket/pre", "--durability", "local", "info", env=env)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.decode().splitlines() if ln.startswith("store"))
    assert "s3://some-bucket/pre" in line and "durability local" in line and "2.15GB" in line
    r = torpor_cli("info", env={**env, "TORPOR_STORE": ""})
    assert "local folder" in r.stdout.decode()


@pytest.mark.parametrize(
    "args", [("--store", "ftp://x/y"), ("--store", "s3://b/../x"), ("--durability", "maybe")]
)
def test_bad_store_options_are_usage_errors(args: tuple[str, ...], tmp_path) -> None:
    r = torpor_cli(*args, "snapshots", env={"TORPOR_HOME": str(tmp_path / "h")})
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr


def test_store_option_reaches_the_idle_watcher(tools_image, tmp_path, s3_server, bucket) -> None:
    """``--store`` on the command that arms a session's idle watcher reaches the
    watcher (a separate process): its hibernation checkpoint goes to the bucket.  The
    turn's tool output holds rich markup, which the progress lines print literally."""
    url = f"s3://{bucket}/torpor"
    env = {k: v for k, v in s3_server.env(bucket, "torpor").items() if k.startswith("AWS_")}
    env["TORPOR_STORE"] = ""  # the option alone names the bucket
    script = tmp_path / "script.json"
    step = {"tool_calls": [{"name": "shell", "arguments": {"cmd": "echo '[/x] [bold]b'"}}]}
    script.write_text(json.dumps({"version": 1, "turns": [{"steps": [step, {"text": "done"}]}]}))
    dsn = str(tmp_path / "ctx.db")
    run = ("--store", url, "session", "--dsn", dsn)
    model = f"scripted:{script}"
    made = torpor_cli(
        *run, "create", "--image", tools_image, "--model", model, "--idle", "3s", "-q", env=env
    )
    assert made.returncode == 0, made.stderr
    sid = made.stdout.decode().strip()
    try:
        sent = torpor_cli(*run, "send", sid, "go", env=env)
        assert sent.returncode == 0 and b"Traceback" not in sent.stderr, sent.stderr
        assert sent.stdout.decode().strip() == "done"
        assert b"[/x] [bold]b" in sent.stderr  # printed as text, not taken as markup
        # the send armed the idle watcher (--idle at create, below): it hibernates
        shown: dict = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            r = torpor_cli(*run, "show", sid, "--json", env=env)
            assert r.returncode == 0, r.stderr
            shown = json.loads(r.stdout)
            # (the VM ends before the checkpoint entry is logged: wait for the entry)
            if shown["checkpoint_list"][-1]["reason"] == "hibernate":
                break
            time.sleep(0.5)
        last = shown["checkpoint_list"][-1]
        assert last["reason"] == "hibernate" and last["durability"] == "bucket", last
    finally:
        torpor_cli(*run, "rm", sid, env=env)


def test_serve_checks_its_store_before_serving(tmp_path, s3_server) -> None:
    """``torpor serve --store`` opens the store first: a bucket that does not exist is
    a clear error at start, not a failure at the first snapshot."""
    env = {k: v for k, v in s3_server.env("x").items() if k.startswith("AWS_")}
    env["TORPOR_HOME"] = str(tmp_path / "h")
    args = ("serve", "--listen", "127.0.0.1:1", "--store")
    r = torpor_cli(*args, "s3://no-such-bucket-for-serve/p", env=env, timeout=120)
    assert r.returncode == 10 and b"Traceback" not in r.stderr, r.stderr
    assert b"no-such-bucket-for-serve" in r.stderr
    r = torpor_cli(*args, "ftp://x", env=env, timeout=60)
    assert r.returncode == 2 and b"s3://bucket/prefix" in r.stderr, r.stderr


def _complete(*words: str, env: dict[str, str]) -> list[str]:
    line = ["torpor", *words]
    r = torpor_cli(
        env={
            **env,
            "_TORPOR_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(line),
            "COMP_CWORD": str(len(line) - 1),
        }
    )
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    return [ln.split(",", 1)[1] for ln in r.stdout.decode().splitlines() if "," in ln]


def test_completion_offers_the_buckets_snapshots(tmp_path, s3_server, bucket, monkeypatch) -> None:
    from torpor.store.home import home_store

    url = f"s3://{bucket}/torpor"
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    a = Paths(tmp_path / "a").ensure()
    src = tmp_path / "f"
    src.write_bytes(b"x" * 100_000)
    store = home_store(a)
    try:
        art, _ = store.put_file(src)
        snap = store.commit({"memory": art}, meta={"tag": "cmpl-bucket"}).id
    finally:
        store.close()
    homes = []
    for name in ("b", "c"):
        h = Paths(tmp_path / name).ensure()
        h.store.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a.store / "key", h.store / "key")
        homes.append(h)
    env = {"TORPOR_HOME": str(homes[0].root)}
    assert "cmpl-bucket" in _complete("restore", "cmpl", env=env)  # TORPOR_STORE
    # the bucket unreachable: what this host's cache holds, without hanging
    down = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    assert snap[:12] in _complete("snapshot", "rm", snap[:6], env=down)
    # --store on the command line counts too (no TORPOR_STORE)
    env = {"TORPOR_HOME": str(homes[1].root), "TORPOR_STORE": ""}
    assert _complete("restore", "cmpl", env=env) == []
    assert "cmpl-bucket" in _complete("--store", url, "restore", "cmpl", env=env)

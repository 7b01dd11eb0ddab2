"""``torpor --host URL`` (or ``TORPOR_HOST``): CLI commands that act on a server, like
``docker -H``.

The root group (:class:`HostGroup`) resolves a command name to the remote command of
that name here when a host is given, else to the local one.  Remote commands parse
the same options, call :class:`torpor.client.Client` (``--token`` /
``TORPOR_TOKEN``) and print the same formats through :mod:`torpor.cli.format`.

Invariants:

- A command with no remote twin fails loudly — ``not available with --host`` (a
  UsageError, exit 2) — never silently acts on the local host instead.  Only
  ``serve`` and ``token`` (the server's own administration) stay local when the host
  comes from ``TORPOR_HOST`` rather than ``--host``.
- Errors are the server's typed errors mapped back (torpor.client), so exit codes
  match the local CLI's; ``run``/``exec`` exit 125 when torpor failed, as locally.
- Start-up: nothing here imports httpx or the client until a remote command runs
  (``torpor ps`` without a host must stay small: tests/cli/test_startup.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from torpor.cli.lazy import LazyGroup
from torpor.errors import NotFoundError, TorporError, UsageError

HOST = "torpor.host"
TOKEN = "torpor.token"
HOST_FROM_ENV = "torpor.host_from_env"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PASSTHROUGH = {**CONTEXT, "allow_interspersed_args": False}
#: Commands that administer the server itself: local even when TORPOR_HOST is set.
SERVER_SIDE = ("serve", "token")


# -- the hook ----------------------------------------------------------------------------


def _store(key: str) -> Any:
    def cb(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value:
            ctx.meta[key] = value
            if key == HOST:
                src = ctx.get_parameter_source(param.name or "host")
                ctx.meta[HOST_FROM_ENV] = src == click.core.ParameterSource.ENVIRONMENT
        return value

    return cb


def host_options(f: Any) -> Any:
    """``--host`` and ``--token`` on the root group (kept out of its callback's args)."""
    f = click.option(
        "--token",
        envvar="TORPOR_TOKEN",
        expose_value=False,
        callback=_store(TOKEN),
        metavar="TOKEN",
        help="API token for --host (= TORPOR_TOKEN).",
    )(f)
    f = click.option(
        "-H",
        "--host",
        envvar="TORPOR_HOST",
        expose_value=False,
        callback=_store(HOST),
        metavar="URL",
        help="Act on the torpor server at URL (`torpor serve`) instead of this host "
        "(= TORPOR_HOST).",
    )(f)
    return f


class HostGroup(LazyGroup):
    """The root group: with a host, a command name resolves to its remote twin."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if not ctx.meta.get(HOST) or (cmd_name in SERVER_SIDE and ctx.meta.get(HOST_FROM_ENV)):
            return super().get_command(ctx, cmd_name)
        cmd = remote.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        if super().get_command(ctx, cmd_name) is None:
            return None  # unknown everywhere: click's own "No such command"
        return _unavailable(cmd_name)


class _RemoteGroup(click.Group):
    """A group of remote commands; a name it lacks is a local-only command."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and cmd_name in self.local_only:
            return _unavailable(f"{self.name} {cmd_name}")
        return cmd

    local_only: tuple[str, ...] = ()


def _unavailable(name: str) -> click.Command:
    @click.command(
        name=name.rsplit(" ", 1)[-1],
        context_settings={**CONTEXT, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: tuple[str, ...]) -> None:
        raise UsageError(
            f"`torpor {name}` is not available with --host: it acts on this host only "
            "(unset TORPOR_HOST or drop --host to run it here)"
        )

    return stub


# -- helpers -----------------------------------------------------------------------------


def _client() -> Any:
    from torpor.client import Client

    ctx = click.get_current_context()
    return Client(ctx.meta.get(HOST), ctx.meta.get(TOKEN))


def _fail125(e: TorporError) -> None:
    from torpor.cli.main import _fail

    _fail(e, 125)


def _labels(label: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for kv in label:
        k, _sep, v = kv.partition("=")
        if not k:
            raise UsageError(f"invalid label {kv!r} (expected K=V)")
        out[k] = v
    return out


def _env(env: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for e in env:
        k, sep, v = e.partition("=")
        if not k:
            raise UsageError(f"invalid environment variable {e!r} (expected K=V)")
        if not sep:  # K alone copies it from here, as locally
            if k not in os.environ:
                continue
            v = os.environ[k]
        out[k] = v
    return out


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("stdin through --host is text: this input is not UTF-8") from None


def _ago(t: float) -> str:
    from torpor.cli.main import ago

    return ago(t)


def _size(n: float) -> str:
    from torpor.cli.main import human_size

    return human_size(n)


@click.group(cls=_RemoteGroup, name="remote")
def remote() -> None:
    """Commands acting on a torpor server (see torpor.cli.remote)."""


# -- sandboxes (VMs) ---------------------------------------------------------------------


def _ps_row(d: dict[str, Any]) -> dict[str, Any]:
    status = str(d.get("status", ""))
    return {
        "ID": str(d["id"])[:12],
        "Image": d.get("image", ""),
        "Command": "",
        "QuotedCommand": '""',
        "CreatedAt": d.get("created"),
        "RunningFor": _ago(float(d.get("created") or 0)) + " ago",
        "Status": "Up" if status == "running" else status.capitalize(),
        "State": status,
        "Accel": d.get("accel") or "-",
        "Ports": "",
        "Names": d.get("name", ""),
        "Name": d.get("name", ""),
        "Labels": ",".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items())),
    }


def _sandboxes(c: Any, status: str | None = None) -> list[dict[str, Any]]:
    from torpor.client.sync import _pages

    params = [("status", status)] if status else []
    return [x for page in _pages(c._t, "/v1/sandboxes", params, "items") for x in page]


@remote.command(context_settings=CONTEXT)
@click.option("-a", "--all", "all_", is_flag=True, help="Show all VMs (default: running).")
@click.option("-q", "--quiet", is_flag=True, help="Only VM ids.")
@click.option("--format", "fmt", metavar="FORMAT")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE")
def ps(all_: bool, quiet: bool, fmt: str | None, filters: tuple[str, ...]) -> None:
    """List the server's sandboxes (running and hibernated; -a: every status)."""
    from torpor.cli import format as fmt_

    with _client() as c:
        rows = _sandboxes(c)
        if all_ or filters:
            seen = {r["id"] for r in rows}
            from torpor.client._wire import OTHER_STATUSES

            for st in OTHER_STATUSES:
                rows += [r for r in _sandboxes(c, st) if r["id"] not in seen]
    for f in filters:
        k, _, v = f.partition("=")
        if k == "label":
            lk, sep, lv = v.partition("=")
            rows = [
                r
                for r in rows
                if lk in (r.get("labels") or {}) and (not sep or r["labels"][lk] == lv)
            ]
        elif k == "status":
            rows = [r for r in rows if r.get("status") == v]
        elif k == "name":
            rows = [r for r in rows if v in str(r.get("name", ""))]
        elif k == "id":
            rows = [r for r in rows if str(r["id"]).startswith(v)]
        else:
            raise UsageError(f"invalid filter {f!r} (label=, status=, name=, id=)")
    if quiet:
        for r in rows:
            click.echo(str(r["id"])[:12])
        return
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ("VM ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "ACCEL", "PORTS", "NAMES")
    keys = ("ID", "Image", "QuotedCommand", "RunningFor", "Status", "Accel", "Ports", "Names")
    fmt_.emit([_ps_row(r) for r in rows], fmt, list(zip(cols, keys, strict=True)))


@remote.command(context_settings=PASSTHROUGH)
@click.option("--name", help="Name of the VM.")
@click.option("-e", "--env", multiple=True, metavar="K=V")
@click.option("-m", "--memory", default="512M", show_default=True)
@click.option("--cpus", default=1, show_default=True, type=int)
@click.option("-w", "--workdir")
@click.option("-u", "--user")
@click.option("--network", type=click.Choice(["user", "none"]), default="user", show_default=True)
@click.option("-l", "--label", multiple=True, metavar="K=V")
@click.option("-i", "--interactive", is_flag=True, help="Feed stdin to the command (with --rm).")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the VM id.")
@click.option("--rm", is_flag=True, help="Remove the VM when the command exits.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    image: str,
    command: tuple[str, ...],
    name: str | None,
    env: tuple[str, ...],
    memory: str,
    cpus: int,
    workdir: str | None,
    user: str | None,
    network: str,
    label: tuple[str, ...],
    interactive: bool,
    detach: bool,
    rm: bool,
) -> None:
    """Create a sandbox on the server.  -d: COMMAND is its main process, print its id;
    --rm: run COMMAND in it, print its output, exit with its code, remove it."""
    if detach == rm:
        raise UsageError(
            "with --host, run takes -d (a VM whose main process is COMMAND) or --rm "
            "(run COMMAND, print its output, remove the VM)"
        )
    if rm and not command:
        raise UsageError("run --rm with --host needs a COMMAND")
    try:
        with _client() as c:
            sb = c.Sandbox.create(
                image,
                memory=memory,
                cpus=cpus,
                env=_env(env),
                network=network != "none",
                labels=_labels(label),
                name=name,
                cwd=workdir,
                user=user,
                command=list(command) if detach and command else None,
            )
            if detach:
                click.echo(sb.id)
                return
            try:
                code = _exec_stream(c, sb.id, list(command), {}, None, None, interactive)
            finally:
                sb.kill()
    except TorporError as e:
        _fail125(e)
    sys.exit(code)


def _exec_stream(
    c: Any,
    ref: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    interactive: bool,
) -> int:
    """Run argv in ``ref`` through the server; its bytes to our stdout/stderr."""
    import base64

    from torpor.client import _wire as W

    body: dict[str, Any] = W.drop_none({"cmd": argv, "cwd": cwd, "user": user})
    body["env"] = env
    body["timeout"] = None  # like the local exec: no limit
    if interactive:
        body["stdin"] = _stdin_text()
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    for ev in c._t.events(
        "POST", f"/v1/sandboxes/{W.seg(ref)}/exec", json=body, params={"encoding": "base64"}
    ):
        if ev.event in streams:
            f = streams[ev.event]
            f.write(base64.b64decode(json.loads(ev.data)))
            f.flush()
        elif ev.event in ("exit", "json"):
            d = ev.json()
            code = d.get("exit_code") if isinstance(d, dict) else None
            if code is None:
                raise W.error_from(int(d.get("status", 500)), d)
            return int(code)
        elif ev.event == "error":
            d = ev.json()
            raise W.error_from(int(d.get("status", 500)), d)
    from torpor.errors import AgentError

    raise AgentError("the server ended the exec stream without an exit status", step="exec")


@remote.command(name="exec", context_settings=PASSTHROUGH)
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin (read to its end first).")
@click.option("-t", "--tty", is_flag=True, help="Run it on a terminal (with -i: this one).")
@click.option("-e", "--env", multiple=True, metavar="K=V")
@click.option("-w", "--workdir")
@click.option("-u", "--user")
@click.option("-d", "--detach", is_flag=True, help="Start the command and return at once.")
@click.argument("vm")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    vm: str,
    command: tuple[str, ...],
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    detach: bool,
) -> None:
    """Run COMMAND in a sandbox on the server; exits with its exit code."""
    if tty:
        sys.exit(_exec_tty(vm, command, interactive, env, workdir, user, detach))
    try:
        with _client() as c:
            if detach:
                from torpor.client import _wire as W

                body = {"cmd": list(command), "env": _env(env), "background": True}
                body.update(W.drop_none({"cwd": workdir, "user": user}))
                c.request("POST", f"/v1/sandboxes/{W.seg(vm)}/exec", json=body)
                return
            code = _exec_stream(c, vm, list(command), _env(env), workdir, user, interactive)
    except TorporError as e:
        _fail125(e)
    sys.exit(code)


def _exec_tty(
    vm: str,
    command: tuple[str, ...],
    interactive: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    detach: bool,
) -> int:
    """``exec -t``/``-it``: COMMAND on a guest terminal over the PTY WebSocket, this
    terminal as its keyboard and screen (torpor.cli.tty)."""
    from torpor.cli import tty as tty_
    from torpor.client.pty import TTYHandle, _cmd_text

    if detach:
        raise UsageError("exec -d -t is not available with --host")
    if env or workdir or user:
        raise UsageError("exec -t with -e, -w or -u is not available with --host yet")
    tty_.check_input(interactive)
    try:
        with _client() as c:
            sb = c.Sandbox(c.Sandbox.get_info(vm))
            with sb.pty(_cmd_text(command), *tty_.terminal_size()) as p:
                return tty_.interact(TTYHandle(p), interactive)
    except TorporError as e:
        _fail125(e)
        raise  # not reached: _fail exits


@remote.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill running VMs first.")
def rm(vms: tuple[str, ...], force: bool) -> None:
    """Remove sandboxes (a running one only with -f)."""
    from torpor.cli.main import err_console
    from torpor.cli.term import markup_safe
    from torpor.errors import ConflictError

    failed: TorporError | None = None
    with _client() as c:
        for ref in vms:
            try:
                info = c.Sandbox.get_info(ref)
                if not force and info.status in ("running", "hibernated", "paused"):
                    raise ConflictError(
                        f"VM {info.name} is {info.status}: stop it first or use rm -f"
                    )
                c.Sandbox(info).kill()
                click.echo(ref)
            except TorporError as e:
                err_console.print(f"[red]torpor:[/red] {markup_safe(e)}", soft_wrap=True)
                failed = e
    if failed:
        sys.exit(failed.exit_code)


@remote.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True)
@click.option("-t", "--time", "timeout", default=10, show_default=True)
def stop(vms: tuple[str, ...], timeout: int) -> None:
    """Stop sandboxes: SIGTERM the main process, then power the guest off."""
    from torpor.client import _wire as W

    with _client() as c:
        for ref in vms:
            c.request("POST", f"/v1/sandboxes/{W.seg(ref)}/stop", json={"timeout": timeout})
            click.echo(ref)


@remote.command(context_settings=CONTEXT)
@click.argument("vm")
@click.option("--console", "console_", is_flag=True, help="The guest kernel console.")
@click.option("-n", "--tail", default="all", show_default=True, help="Lines from the end.")
def logs(vm: str, console_: bool, tail: str) -> None:
    """The console log of a sandbox (with --host only --console is available)."""
    from torpor.client import _wire as W

    if not console_:
        raise UsageError(
            "`torpor logs` of the main command's output is not available with --host "
            "(the API does not serve it yet); `logs --console` shows the guest console"
        )
    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r} (a number of lines, or all)")
    params = {"tail": tail} if tail != "all" else None
    with _client() as c:
        text = c._t.send("GET", f"/v1/sandboxes/{W.seg(vm)}/logs", params=params).text
    sys.stdout.write(text)


@remote.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", metavar="FORMAT")
def inspect(vms: tuple[str, ...], fmt: str | None) -> None:
    """A sandbox as the server describes it (JSON)."""
    from torpor.cli import format as fmt_
    from torpor.client import _wire as W

    with _client() as c:
        objs = [c.request("GET", f"/v1/sandboxes/{W.seg(r)}") for r in vms]
    if fmt in (None, "json"):
        fmt_.emit_one(objs, None)
        return
    for o in objs:
        fmt_.emit_one(o, fmt)


@remote.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dest")
def cp(src: str, dest: str) -> None:
    """Copy one file between here and a sandbox on the server (VM:PATH on one side)."""
    s_vm, _, s_path = (
        src.partition(":") if ":" in src and not src.startswith("/") else ("", "", src)
    )
    d_vm, _, d_path = (
        dest.partition(":") if ":" in dest and not dest.startswith("/") else ("", "", dest)
    )
    if bool(s_vm) == bool(d_vm):
        raise UsageError("exactly one of SRC and DEST must be VM:PATH")
    with _client() as c:
        if s_vm:
            info = c.Sandbox.get_info(s_vm)
            sb = c.Sandbox(info)
            out = Path(d_path)
            if d_path == "-":
                raise UsageError("cp VM:PATH - (a tar stream) is not available with --host")
            if out.is_dir():
                out = out / s_path.rstrip("/").rsplit("/", 1)[-1]
            tmp = out.with_name(f".{out.name}.torpor-cp")
            try:
                with tmp.open("wb") as f:
                    for chunk in sb.files.read_stream(s_path):
                        f.write(chunk)
                tmp.replace(out)  # all of it or nothing at DEST
            finally:
                tmp.unlink(missing_ok=True)
        else:
            p = Path(s_path)
            if s_path == "-" or not p.is_file():
                raise UsageError(f"with --host, cp copies one regular file: {s_path}")
            sb = c.Sandbox(c.Sandbox.get_info(d_vm))
            target = d_path + p.name if d_path.endswith("/") else d_path
            with p.open("rb") as f:
                sb.files.write(target, f.read(), mode=p.stat().st_mode & 0o777)


# -- snapshots ---------------------------------------------------------------------------


class _SnapshotGroup(_RemoteGroup):
    """``snapshot VM`` takes one; ``snapshot inspect|rm`` manage (as locally)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


@remote.group(cls=_SnapshotGroup, context_settings=CONTEXT)
def snapshot() -> None:
    """Snapshot a sandbox on the server; inspect or remove snapshots."""


@snapshot.command(name="create", context_settings=CONTEXT)
@click.argument("vm")
@click.option("--tag")
@click.option("--stop", is_flag=True, help="End the VM once the snapshot is durable (hibernate).")
def snapshot_create(vm: str, tag: str | None, stop: bool) -> None:
    with _client() as c:
        sb = c.Sandbox(c.Sandbox.get_info(vm))
        if stop:
            if tag:
                raise UsageError("--tag and --stop together are not available with --host")
            snap = sb.hibernate()
        else:
            snap = sb.snapshot(tag=tag)
    click.echo(snap.id)


@snapshot.command(name="inspect", context_settings=CONTEXT)
@click.argument("snap")
def snapshot_inspect(snap: str) -> None:
    with _client() as c:
        click.echo(json.dumps(c.inspect_snapshot(snap), indent=2, default=str))


@snapshot.command(name="rm", context_settings=CONTEXT)
@click.argument("snaps", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True)
def snapshot_rm(snaps: tuple[str, ...], force: bool) -> None:
    from torpor.cli.main import err_console
    from torpor.cli.term import markup_safe

    failed: TorporError | None = None
    with _client() as c:
        for s in snaps:
            try:
                full = c.inspect_snapshot(s)["id"]
                c.remove_snapshot(full, force=force)
                click.echo(full)
            except TorporError as e:
                err_console.print(f"[red]torpor:[/red] {markup_safe(e)}", highlight=False)
                failed = failed or e
    if failed is not None:
        sys.exit(failed.exit_code)


@remote.command(context_settings=CONTEXT)
@click.argument("vm", required=False)
@click.option("--format", "fmt", metavar="FORMAT")
def snapshots(vm: str | None, fmt: str | None) -> None:
    """List the server's snapshots (of VM, if given)."""
    from torpor.cli import format as fmt_

    with _client() as c:
        rows = c.snapshots()
    if vm:
        rows = [r for r in rows if r.get("vm") == vm]
    for r in rows:
        sizes = r.get("sizes") or {}
        r["ShortID"] = str(r["id"])[:12]
        r["ShortParent"] = (r.get("parent") or "-")[:12]
        r["Created"] = str(r.get("created", ""))[:19]
        r["Memory"] = _size(sizes.get("memory", 0))
        r["Disk"] = _size(sizes.get("disk", 0))
        if r.get("damaged"):
            r["tag"] = "DAMAGED"
    cols = ("SNAPSHOT", "PARENT", "VM", "TAG", "CREATED", "MEMORY", "DISK")
    keys = ("ShortID", "ShortParent", "vm", "tag", "Created", "Memory", "Disk")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))


@remote.command(context_settings=CONTEXT)
@click.argument("snap")
@click.option("--name")
def restore(snap: str, name: str | None) -> None:
    """A snapshot as a new running sandbox on the server; prints its id."""
    t0 = time.perf_counter()
    with _client() as c:
        sb = c.Sandbox.restore(snap, name=name)
    from torpor.cli.main import err_console

    err_console.print(
        f"[dim]restored {sb.name} in {(time.perf_counter() - t0) * 1000:.0f} ms[/dim]"
    )
    click.echo(sb.id)


@remote.command(context_settings=CONTEXT)
@click.argument("snap")
@click.option("-n", "count", default=1, show_default=True)
@click.option("--name-prefix", default=None)
def fork(snap: str, count: int, name_prefix: str | None) -> None:
    """Start N sandboxes from one snapshot on the server."""
    if count < 1:
        raise UsageError("-n must be at least 1")
    t0 = time.perf_counter()
    with _client() as c:
        got = [
            c.Sandbox.restore(snap, name=f"{name_prefix}-{i}" if name_prefix else None)
            for i in range(1, count + 1)
        ]
    from torpor.cli.main import err_console

    err_console.print(f"[dim]forked {len(got)} in {(time.perf_counter() - t0) * 1000:.0f} ms[/dim]")
    for sb in got:
        click.echo(f"{sb.name} {sb.id}")


# -- images ------------------------------------------------------------------------------


@remote.command(context_settings=CONTEXT)
@click.option("-q", "--quiet", is_flag=True)
@click.option("--format", "fmt", metavar="FORMAT")
def images(quiet: bool, fmt: str | None) -> None:
    """List the server's images."""
    from datetime import datetime

    from torpor.cli import format as fmt_

    with _client() as c:
        imgs = c.images()
    if quiet:
        for im in imgs:
            click.echo(str(im["id"])[:12])
        return
    rows = []
    for im in imgs:
        created = im.get("created")
        when = ""
        if created:
            try:
                when = _ago(datetime.fromisoformat(str(created)).timestamp()) + " ago"
            except ValueError:
                when = str(created)
        for rt in im.get("repo_tags") or ["<none>:<none>"]:
            repo, _, tag = rt.rpartition(":")
            rows.append(
                {
                    "Repository": repo,
                    "Tag": tag,
                    "ID": im["id"],
                    "ShortID": str(im["id"])[:12],
                    "CreatedSince": when,
                    "Size": im.get("size", 0),
                    "HumanSize": _size(im.get("size", 0)),
                }
            )
    cols = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")
    keys = ("Repository", "Tag", "ShortID", "CreatedSince", "HumanSize")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))


@remote.command(context_settings=CONTEXT)
@click.argument("reference")
@click.option("--insecure", is_flag=True)
def pull(reference: str, insecure: bool) -> None:
    """Have the server pull an image from a registry."""
    with _client() as c:
        im = c.pull(reference, insecure=insecure)
    click.echo(f"{reference}: {str(im['id'])[:12]} ({_size(im.get('size', 0))})")


@remote.command(name="import", context_settings=CONTEXT)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("tag", required=False)
def import_(archive: Path, tag: str | None) -> None:
    """Upload an image archive to the server."""
    if not archive.is_file():
        raise NotFoundError(f"no such file: {archive}")
    with _client() as c, archive.open("rb") as f:
        im = c._t.call(
            "POST",
            "/v1/images/import",
            params={"name": tag} if tag else None,
            content=f,
            headers={"Content-Type": "application/octet-stream"},
        )
    names = ", ".join(im.get("repo_tags") or []) or "<untagged>"
    click.echo(f"{names}: {str(im['id'])[:12]} ({_size(im.get('size', 0))})")


@remote.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True)
def rmi(images: tuple[str, ...], force: bool) -> None:
    """Remove images on the server."""
    with _client() as c:
        for ref in images:
            d = c.remove_image(ref, force=force)
            for line in (d or {}).get("done") or ():
                click.echo(line)


@remote.command(context_settings=CONTEXT)
def info() -> None:
    """The server: version, host and the namespace the token acts in."""
    with _client() as c:
        d = c.info()
    click.echo(f"{'server':14} {c.url}")
    for k in ("version", "host", "namespace", "authenticated"):
        click.echo(f"{k:14} {d.get(k)}")


# -- sessions ----------------------------------------------------------------------------


@remote.group(cls=_RemoteGroup, context_settings=CONTEXT)
def session() -> None:
    """Durable agent sessions on the server."""


session.local_only = ("shell", "prune", "verify")  # type: ignore[attr-defined]


def _model_arg(model: str) -> str | dict[str, Any]:
    """``scripted:FILE`` naming a file here is sent as the script itself (the server
    reads no client paths); any other spec goes as it is."""
    provider, _, rest = model.partition(":")
    if provider == "scripted" and rest and Path(rest).is_file():
        try:
            doc = json.loads(Path(rest).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the script {rest}: {e}") from e
        if not isinstance(doc, dict):
            raise UsageError(f"the script {rest} is not a JSON object")
        return doc
    return model


@session.command(name="create", context_settings=CONTEXT)
@click.option("--image", required=True)
@click.option("--model", default="scripted:demo", show_default=True)
@click.option("--name")
@click.option("-m", "--memory", default="256m", show_default=True)
@click.option("--idle", default="0", show_default=True)
@click.option("--system")
@click.option("--network/--no-network", default=False, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
def session_create(
    image: str,
    model: str,
    name: str | None,
    memory: str,
    idle: str,
    system: str | None,
    network: bool,
    quiet: bool,
) -> None:
    """Create a session on the server; prints its id."""
    from torpor.cli.session import err_console, parse_duration
    from torpor.session.text import human_size
    from torpor.vmm.manager import parse_memory

    if not quiet:
        err_console.print(f"booting a VM from {image} and taking the first checkpoint…")
    with _client() as c:
        s = c.Session.create(
            image,
            _model_arg(model),
            name=name,
            memory_mib=parse_memory(memory),
            idle=parse_duration(idle) or None,
            system=system,
            network=network,
        )
        if not quiet:
            ck = s.checkpoints[-1]
            err_console.print(
                f"session [bold]{s.name}[/bold] ready; checkpoint 0: "
                f"{human_size(ck.stored_bytes)} stored in {ck.durable_ms:.0f} ms",
                markup=True,
            )
    click.echo(s.id)


@session.command(name="send", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
@click.argument("message")
@click.option("--key")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def session_send(ref: str, message: str, key: str | None, as_json: bool, quiet: bool) -> None:
    """Send MESSAGE ("-" reads stdin) and print the model's answer."""
    from torpor.cli.session import _entry_json, _progress

    if message == "-":
        message = sys.stdin.read()
    got: list[Any] = []

    def hook(e: Any) -> None:
        got.append(e)
        if not (quiet or as_json):
            _progress(e)

    with _client() as c:
        s = c.Session.open(ref, on_event=hook)
        answer = s.send(message, key=key)
    if as_json:
        click.echo(json.dumps({"answer": answer, "entries": [_entry_json(e) for e in got]}))
    else:
        click.echo(answer)


@session.command(name="log", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
@click.option("-f", "--follow", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--after", default=0, show_default=True)
def session_log(ref: str, follow: bool, as_json: bool, after: int) -> None:
    """The session's context log, entry by entry (superseded entries marked ~)."""
    from torpor.cli.session import print_log

    with _client() as c:
        print_log(c.Session.open(ref), after=after, follow=follow, as_json=as_json)


def _session_row(d: dict[str, Any]) -> dict[str, Any]:
    vm = d.get("vm")
    return {
        "id": d["id"],
        "name": d.get("name"),
        "status": d.get("status"),
        "model": d.get("model"),
        "image": d.get("image"),
        "turns": d.get("turns", 0),
        "entries": d.get("entries", 0),
        "checkpoints": d.get("checkpoints", 0),
        "snapshot_bytes": d.get("stored_bytes", 0),
        "log_bytes": d.get("log_bytes", 0),
        "vm": vm.get("name") if isinstance(vm, dict) else None,
        "parent": d.get("parent"),
        "parent_seq": d.get("parent_seq"),
        "created": d.get("created"),
    }


@session.command(name="ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True)
@click.option("--format", "fmt", metavar="FORMAT")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-a", "--all", "show_all", is_flag=True)
def session_ls(as_json: bool, fmt: str | None, quiet: bool, show_all: bool) -> None:
    """List the server's sessions."""
    from torpor.cli.format import emit
    from torpor.session.text import human_size

    with _client() as c:
        docs = [s._doc for s in c.Session.list(include_removed=show_all)]
    if quiet:
        for d in docs:
            click.echo(d["id"])
        return
    rows = [_session_row(d) for d in docs]
    if as_json or fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    cells = [
        {
            **r,
            "ShortID": r["id"][:12],
            "Stored": human_size(r["snapshot_bytes"]),
            "Model": r["model"] or "",
            "VM": r["vm"] or "",
        }
        for r in rows
    ]
    cols = ("SESSION", "NAME", "STATUS", "TURNS", "CHECKPOINTS", "STORED", "MODEL", "VM")
    keys = ("ShortID", "name", "status", "turns", "checkpoints", "Stored", "Model", "VM")
    emit(cells, fmt, list(zip(cols, keys, strict=True)))


@session.command(name="show", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
@click.option("--json", "as_json", is_flag=True)
def session_show(ref: str, as_json: bool) -> None:
    """State, checkpoints and storage of one session."""
    from rich.table import Table

    from torpor.cli.session import out_console
    from torpor.session.text import human_size

    with _client() as c:
        s = c.Session.open(ref)
        row = _session_row(s._doc)
        cks = s.checkpoints
    row["checkpoint_list"] = [c.__dict__ for c in cks]
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    for k in ("id", "name", "status", "model", "image", "vm", "turns", "entries"):
        out_console.print(f"{k:>12}: {row[k]}", markup=False)
    if row["parent"]:
        out_console.print(f"{'forked from':>12}: {row['parent']} at {row['parent_seq']}")
    out_console.print(f"{'log':>12}: {human_size(row['log_bytes'])} in this session's own entries")
    t = Table(title="checkpoints", header_style="bold")
    for col in ("SEQ", "TURN", "REASON", "SNAPSHOT", "STORED", "PAUSED", "DURABLE"):
        t.add_column(col)
    for ck in cks:
        t.add_row(
            str(ck.seq),
            str(ck.turn),
            ck.reason,
            ck.snapshot[:12],
            human_size(ck.stored_bytes),
            f"{ck.pause_ms:.0f} ms",
            f"{ck.durable_ms:.0f} ms",
        )
    out_console.print(t)


@session.command(name="hibernate", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
def session_hibernate(ref: str) -> None:
    """Checkpoint the session and end its VM."""
    from torpor.session.text import human_size

    with _client() as c:
        s = c.Session.open(ref)
        ck = s.hibernate()
    click.echo(f"hibernated {s.name} at checkpoint {ck.seq} ({human_size(ck.stored_bytes)} stored)")


@session.command(name="resume", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
def session_resume(ref: str) -> None:
    """Wake a hibernated session now."""
    with _client() as c:
        s = c.Session.open(ref)
        t0 = time.perf_counter()
        vm = s.wake()
    name = vm.name if vm is not None else "?"
    click.echo(f"{s.name} running in VM {name} ({(time.perf_counter() - t0) * 1000:.0f} ms)")


@session.command(name="recover", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
def session_recover(ref: str) -> None:
    """After a crash: restore the last checkpoint and replay an interrupted turn."""
    with _client() as c:
        s = c.Session.open(ref)
        answer = s.recover()
    if answer is None:
        click.echo(f"{s.name}: no interrupted turn; the VM is running")
    else:
        click.echo(answer)


@session.command(name="fork", context_settings=CONTEXT)
@click.argument("ref", metavar="S")
@click.option("--at", type=int)
@click.option("--name")
def session_fork(ref: str, at: int | None, name: str | None) -> None:
    """A new session sharing S's log up to a checkpoint, with a VM forked from it."""
    from torpor.cli.session import err_console

    with _client() as c:
        s = c.Session.open(ref)
        child = s.fork(at=at, name=name)
    err_console.print(
        f"forked {s.name} at entry {child._doc.get('parent_seq')} into [bold]{child.name}[/bold]",
        markup=True,
    )
    click.echo(child.id)


@session.command(name="rm", context_settings=CONTEXT)
@click.argument("refs", metavar="S...", nargs=-1, required=True)
def session_rm(refs: tuple[str, ...]) -> None:
    """Remove sessions on the server."""
    from torpor.cli.session import err_console

    with _client() as c:
        for ref in refs:
            s = c.Session.open(ref)
            released = s.remove()
            err_console.print(f"[dim]{s.name}: {len(released)} snapshots released[/dim]")
            click.echo(s.name)

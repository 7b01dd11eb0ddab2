"""The ``torpor`` command: a thin Docker-like CLI over the library.

Each command parses its arguments, builds a typed request, calls the library and
prints.  Errors are :class:`torpor.errors.TorporError` subclasses; :func:`main`
prints them as ``torpor: <step>: <message>`` and exits with the class's code.
``run`` and ``exec`` follow Docker instead: the command's own exit code, or 125
when torpor itself failed, 126/127 when the command could not be run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from torpor import __version__
from torpor.cli import complete
from torpor.cli import format as fmt_
from torpor.cli.format import FORMAT_HELP, LazyConsole
from torpor.cli.lazy import LazyGroup, StdoutClosed
from torpor.cli.remote import HostGroup, host_options
from torpor.cli.term import markup_safe
from torpor.errors import TorporError, UsageError
from torpor.paths import Paths

# built on first use: rich is not imported by `--version`, `ps` or `exec` (cli/format.py)
err_console = LazyConsole(stderr=True, highlight=False)
out_console = LazyConsole(highlight=False)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PASSTHROUGH = {**CONTEXT, "allow_interspersed_args": False}


class Exit125(click.ClickException):
    """A torpor failure inside ``run`` / ``exec``: exit 125 like Docker."""

    exit_code = 125


def _paths() -> Paths:
    return Paths.default()


STORE_HELP = (
    "Where snapshots live: s3://BUCKET/PREFIX keeps them in an S3-compatible bucket, "
    "with this home's store folder as a cache (endpoint and credentials: the AWS "
    "configuration, e.g. AWS_ENDPOINT_URL, AWS_PROFILE); 'local' = the folder alone. "
    "Wins over TORPOR_STORE; the VMs and helpers this command starts use it too."
)
DURABILITY_HELP = (
    "With a bucket, when a checkpoint counts as taken: 'bucket' (default) once it is in "
    "the bucket; 'local' once written here, uploaded behind (a turn is acknowledged with "
    "its upload pending). Wins over TORPOR_DURABILITY."
)


def apply_store_options(store_url: str | None, durability: str | None) -> None:
    """``--store`` / ``--durability``: checked, then set in this process's environment
    (TORPOR_STORE / TORPOR_DURABILITY), which every store open and every process
    torpor starts (the VM's shim, the idle watcher) reads (torpor.store.home)."""
    if store_url is not None:  # (imported only then: `ps` and `exec` stay small)
        from torpor.store.home import check_store_url

        os.environ["TORPOR_STORE"] = check_store_url(store_url.strip()) or "local"
    if durability is not None:  # a click.Choice: one of bucket / local
        os.environ["TORPOR_DURABILITY"] = durability


def _manager():  # imported lazily: `torpor --help` must not need QEMU or the image store
    from torpor.vmm.manager import VMManager

    try:
        return VMManager(_paths())
    except OSError as e:  # a read-only or foreign home: name it, no traceback
        raise _os_error(e, "open torpor home") from e


def _fail(e: TorporError, code: int | None = None) -> NoReturn:
    # the message may quote a name, a ref or guest output: no raw control characters,
    # no rich markup taken from it
    # soft_wrap: a path in the message stays on one line (copy-pasteable)
    err_console.print(
        f"[red]torpor:[/red] {markup_safe(e)}", markup=True, highlight=False, soft_wrap=True
    )
    sys.exit(code if code is not None else e.exit_code)


def _os_error(e: OSError, what: str) -> TorporError:
    """An OSError while writing torpor's own files, as a typed error naming the path."""
    from torpor.errors import SetupError

    where = e.filename if e.filename is not None else _paths().root
    return SetupError(f"{e.strerror or e}: {where}", step=what, path=where)


def ago(t: Any) -> str:
    if hasattr(t, "timestamp"):
        t = t.timestamp()
    d = max(0.0, time.time() - t)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if d >= n:
            k = int(d // n)
            return f"{k} {unit}{'s' if k != 1 else ''}"
    return f"{int(d)} seconds" if d >= 2 else "Less than a second"


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}"


@click.group(
    cls=HostGroup,  # --host URL / TORPOR_HOST: commands act on a server (cli/remote.py)
    context_settings=CONTEXT,
    # imported only when used: start-up of other commands stays small (cli/lazy.py)
    lazy_subcommands={
        "session": "torpor.cli.session:session",
        "serve": "torpor.cli.serve:serve",
        "token": "torpor.cli.serve:token",
        "hosts": "torpor.cli.session:hosts",
    },
)
@click.version_option(__version__, "--version", "-v")
@host_options
@click.option(
    "--debug", is_flag=True, envvar="TORPOR_DEBUG", help="Log protocol frames and show tracebacks."
)
@click.option(
    "--no-jail",
    is_flag=True,
    help="Run QEMU without its jail (uid, namespaces, cgroup) for VMs this command starts "
    "(= TORPOR_JAIL=0; the jail needs root and is on by default as root).",
)
@click.option(
    "--allow-tcg",
    is_flag=True,
    help="Accept TCG, which is no security boundary, where a use may serve several "
    "tenants (= TORPOR_ALLOW_TCG=1).",
)
@click.option("--store", "store_url", metavar="URL", help=STORE_HELP)
@click.option("--durability", type=click.Choice(["bucket", "local"]), help=DURABILITY_HELP)
def cli(
    debug: bool,
    no_jail: bool = False,
    allow_tcg: bool = False,
    store_url: str | None = None,
    durability: str | None = None,
) -> None:
    """torpor runs OCI images in QEMU microVMs, Docker-style.

    \b
    Get an image, run it, work in it:
      torpor import ./image.tar            # docker save / OCI layout / rootfs tarball
      torpor pull localhost:5000/tools     # or from an OCI registry
      torpor run --rm tools uname -a
      torpor run -d --name box tools sleep infinity
      torpor exec box sh -c 'echo hi'
      torpor ps ; torpor logs box ; torpor stop box ; torpor rm box

    State lives in $TORPOR_HOME (default /var/lib/torpor as root,
    ~/.local/share/torpor otherwise).  Snapshots can live in an S3 bucket shared by
    several hosts: --store s3://BUCKET/PREFIX (docs/deploy.md; `torpor info` shows it).
    """
    # through the environment: the VM's shim (forked by a zygote, or spawned) reads them
    if no_jail:
        os.environ["TORPOR_JAIL"] = "0"
    if allow_tcg:
        os.environ["TORPOR_ALLOW_TCG"] = "1"
    apply_store_options(store_url, durability)
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


# -- setup ---------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.option(
    "--kernel-deb",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Unpack this linux-image .deb instead of fetching one with apt-get.",
)
def setup(kernel_deb: Path | None) -> None:
    """Fetch the guest kernel, build the guest agent and detect the accelerator.

    Idempotent; scripts/setup runs it after installing the host packages.
    """
    from torpor.guest.kernel import ensure_kernel, unpack_kernel_deb
    from torpor.vmm import boot

    paths = _paths().ensure()
    kernel = unpack_kernel_deb(kernel_deb, paths) if kernel_deb else ensure_kernel(paths)
    err_console.print(f"guest kernel   {kernel.version}  ({kernel.root})")
    _k, initrd = boot.guest_boot_files(paths)
    err_console.print(f"initramfs      {initrd} ({human_size(initrd.stat().st_size)})")
    d = boot.detect_accel(paths, refresh=True)
    err_console.print(f"accelerator    {d['accel']}  ({d['reason']})")


@cli.command(context_settings=CONTEXT)
def info() -> None:
    """Show where state lives, the guest kernel, the accelerator and the snapshot store."""
    from torpor.guest.kernel import installed_kernel
    from torpor.vmm import boot, qemu

    paths = _paths()
    rows: list[tuple[str, str]] = [("version", __version__), ("home", str(paths.root))]
    try:
        rows.append(("guest kernel", installed_kernel(paths).version))
    except TorporError as e:
        rows.append(("guest kernel", f"missing: {e}"))
    try:
        rows.append(("qemu", qemu.qemu_version()))
        d = boot.detect_accel(paths)
        rows.append(("accelerator", f"{d['accel']} ({d['reason']})"))
        rows.append(("isolation", qemu.ISOLATION[d["accel"]]))
    except TorporError as e:
        rows.append(("qemu", f"unusable: {e}"))
    from torpor.vmm import jail

    rows.append(("jail", jail.host_summary()))
    rows.append(
        ("multi-tenant TCG", "allowed (TORPOR_ALLOW_TCG)" if jail.tcg_allowed() else "refused")
    )
    rows.append(("store", _store_summary(paths)))
    for k, v in rows:  # soft_wrap: a long value (paths, a URL) stays on one line
        out_console.print(f"[bold]{k:14}[/bold] {v}", soft_wrap=True)


def _store_summary(paths: Paths) -> str:
    """``info``'s store line: the folder alone, or bucket + endpoint, durability and the
    cache's size and bound (from the configuration: no request to the bucket)."""
    from torpor.store.home import store_info

    try:
        s = store_info(paths.root)
    except TorporError as e:
        return f"misconfigured: {e}"
    used = human_size(s.cache_bytes)
    if s.kind == "local":
        return f"local folder {paths.store} ({used} of chunks; no bucket: --store / TORPOR_STORE)"
    cap = human_size(s.cache_max) if s.cache_max is not None else "unbounded (TORPOR_CACHE_MAX)"
    return (
        f"bucket {s.url} at {s.endpoint}, durability {s.durability}; "
        f"cache {paths.store}: {used} of {cap}"
    )


@contextlib.contextmanager
def _working(text: str) -> Iterator[None]:
    """A spinner with ``text`` on stderr while a long operation runs (snapshot,
    restore, fork, cp), on a terminal only: a pipe or file gets no progress noise.
    ``text`` may name guest-chosen things: shown literally, control characters
    escaped."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.text import Text

    from torpor.cli.term import printable

    with err_console.status(Text(printable(text)), spinner="dots"):
        yield


# -- images --------------------------------------------------------------------------


def _progress_printer() -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=err_console.real,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def cb(event: str, done: int, total: int) -> None:
        if event not in tasks:
            tasks[event] = progress.add_task(event[:60], total=total or None)
        progress.update(tasks[event], completed=done, total=total or None)

    return progress, cb


@cli.command(context_settings=CONTEXT)
@click.argument("reference")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
def pull(reference: str, insecure: bool) -> None:
    """Pull an image from an OCI / Docker v2 registry.

    \b
    torpor pull localhost:5000/tools:latest
    torpor pull registry.example.com/team/app@sha256:…
    Credentials: TORPOR_REGISTRY_USER / TORPOR_REGISTRY_PASSWORD.
    """
    from torpor.image.store import ImageStore

    store = ImageStore(_paths().ensure())
    progress, cb = _progress_printer()
    with progress:
        kwargs: dict[str, Any] = {"progress": cb}
        if insecure:
            kwargs["insecure"] = True
        image = store.pull(reference, **kwargs)
    out_console.print(f"{reference}: {image.id[:12]} ({human_size(image.size)})")


@cli.command(name="import", context_settings=CONTEXT)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("tag", required=False)
def import_(archive: Path, tag: str | None) -> None:
    """Import a `docker save` tarball, an OCI layout (tarball or folder) or a rootfs tarball.

    TAG names the image (repo[:tag]); archives that carry their own names keep them.
    """
    from torpor.errors import NotFoundError
    from torpor.image.store import ImageStore

    if not archive.exists():
        raise NotFoundError(f"no such file: {archive}")
    store = ImageStore(_paths().ensure())
    progress, cb = _progress_printer()
    with progress:
        image = store.import_archive(archive, tag, progress=cb)
    names = ", ".join(image.repo_tags) or "<untagged>"
    out_console.print(f"{names}: {image.id[:12]} ({human_size(image.size)})")


@cli.command(context_settings=CONTEXT)
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
def images(quiet: bool, fmt: str | None) -> None:
    """List images."""
    from torpor.image.store import ImageStore

    imgs = ImageStore(_paths().ensure()).list()
    if quiet:
        for im in imgs:
            click.echo(im.id[:12])
        return
    rows = []
    for im in imgs:
        for rt in im.repo_tags or ["<none>:<none>"]:
            repo, _, tag = rt.rpartition(":")
            rows.append(
                {
                    "Repository": repo,
                    "Tag": tag,
                    "ID": im.id,
                    "ShortID": im.id[:12],
                    "CreatedSince": ago(im.created) + " ago" if im.created else "",
                    "Size": im.size,
                    "HumanSize": human_size(im.size),
                }
            )
    fmt_.emit(
        rows,
        fmt,
        [
            ("REPOSITORY", "Repository"),
            ("TAG", "Tag"),
            ("IMAGE ID", "ShortID"),
            ("CREATED", "CreatedSince"),
            ("SIZE", "HumanSize"),
        ],
    )


@cli.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, shell_complete=complete.image_names)
@click.option("-f", "--force", is_flag=True, help="Remove even if a VM uses it.")
def rmi(images: tuple[str, ...], force: bool) -> None:
    """Remove images (a tag; the image goes with its last tag)."""
    from torpor.image.store import ImageStore

    mgr = _manager()
    store = ImageStore(_paths())
    for ref in images:
        for line in store.remove(ref, force=force, in_use=mgr.in_use):
            click.echo(line)


@cli.command(context_settings=CONTEXT)
@click.argument("source", shell_complete=complete.image_names)
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Give image SOURCE the additional name TARGET."""
    from torpor.image.store import ImageStore

    store = ImageStore(_paths())
    store.tag(store.get(source), target)


# -- VMs -----------------------------------------------------------------------------


def _run_options(f: Any) -> Any:
    opts = [
        click.option("--name", help="Name of the VM (default: a random one)."),
        click.option(
            "-e",
            "--env",
            "env",
            multiple=True,
            metavar="K=V",
            help="Set an environment variable (K alone copies it from here).",
        ),
        click.option(
            "-m", "--memory", default="512M", show_default=True, help="Guest RAM (e.g. 256M, 2G)."
        ),
        click.option("--cpus", default=1, show_default=True, type=int, help="Virtual CPUs."),
        click.option(
            "-p",
            "--publish",
            multiple=True,
            metavar="[IP:]HOST:GUEST[/PROTO]",
            help="Forward a host port to the guest (default IP 127.0.0.1).",
        ),
        click.option("-w", "--workdir", help="Working directory of the command."),
        click.option("-u", "--user", help="User (name|uid[:group|gid]) of the command."),
        click.option("--entrypoint", help="Override the image's ENTRYPOINT."),
        click.option(
            "--network",
            type=click.Choice(["user", "none"]),
            default="user",
            show_default=True,
            help="user: NAT with port forwards; none: no NIC.",
        ),
        click.option(
            "--accel",
            type=click.Choice(["auto", "kvm", "tcg"]),
            default="auto",
            show_default=True,
            help="Accelerator (auto probes KVM once).",
        ),
        click.option("-i", "--interactive", is_flag=True, help="Keep stdin open."),
        click.option(
            "-t",
            "--tty",
            is_flag=True,
            help="Run the command on a terminal (run -it: this one, in raw mode).",
        ),
        click.option("-l", "--label", multiple=True, metavar="K=V", help="Set a label."),
        click.option(
            "--env-file",
            "env_file",
            multiple=True,
            type=click.Path(path_type=Path),
            metavar="FILE",
            help="Read K=V lines (# comments; K alone copies it from here); -e wins.",
        ),
        click.option(
            "--log-opt",
            "log_opt",
            multiple=True,
            metavar="KEY=VALUE",
            help="Cap the command's log and the console log, each: max-size=10m, "
            "max-file=3 (the defaults).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _build_request(
    image: str,
    command: tuple[str, ...],
    *,
    name: str | None,
    env: tuple[str, ...],
    memory: str,
    cpus: int,
    publish: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    entrypoint: str | None,
    network: str,
    accel: str,
    interactive: bool,
    label: tuple[str, ...],
    rm: bool,
    log_opt: tuple[str, ...] = (),
    env_file: tuple[Path, ...] = (),
) -> Any:
    import shlex

    from torpor.vmm.logfile import parse_log_opts
    from torpor.vmm.manager import RunRequest, parse_memory, parse_port, read_env_file

    # files first, then -e: a later K=V wins when the guest environment is merged
    env = (*(e for f in env_file for e in read_env_file(f)), *env)

    labels = {}
    for kv in label:
        k, _sep, v = kv.partition("=")
        if not k:
            raise UsageError(f"invalid label {kv!r} (expected K=V)")
        labels[k] = v
    for e in env:
        if not e or e.startswith("="):
            raise UsageError(f"invalid environment variable {e!r} (expected K=V)")
    return RunRequest(
        image=image,
        command=command,
        entrypoint=tuple(shlex.split(entrypoint)) if entrypoint is not None else None,
        name=name,
        env=env,
        workdir=workdir,
        user=user,
        memory_mib=parse_memory(memory),
        cpus=cpus,
        accel=accel,
        ports=tuple(parse_port(p) for p in publish),
        network=network != "none",
        stdin_open=interactive,
        auto_remove=rm,
        labels=labels,
        log_limits=parse_log_opts(log_opt),
    )


def _announce_accel(vm: Any) -> None:
    from torpor.vmm import jail
    from torpor.vmm.qemu import ISOLATION

    j = jail.describe(vm.dir)
    if sys.stderr.isatty():
        err_console.print(
            f"[dim]torpor: {vm.name} runs under {vm.state.accel}; isolation: "
            f"{ISOLATION.get(vm.state.accel, '?')}; {markup_safe(jail.summary(j))}[/dim]"
        )
    elif not j.get("applied") and os.geteuid() != 0:
        err_console.print(f"torpor: {markup_safe(jail.summary(j))}")


@cli.command(context_settings=PASSTHROUGH)
@_run_options
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the VM id.")
@click.option("--rm", is_flag=True, help="Remove the VM when its command exits.")
@click.argument("image", shell_complete=complete.image_names)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, command: tuple[str, ...], detach: bool, rm: bool, tty: bool, **kw: Any) -> None:
    """Create a VM from IMAGE, boot it and run COMMAND (default: the image's) in it.

    \b
    torpor run --rm tools:latest uname -a          # exits with the command's code
    torpor run -d --name box -m 1G --cpus 2 -p 8080:80 tools sleep infinity
    echo hi | torpor run -i --rm tools cat

    The VM lives as long as its command; `torpor exec` runs more commands in it.
    """
    try:
        req = _build_request(image, command, rm=rm, **kw)
        from dataclasses import replace

        if rm and not detach:
            # attached, this process removes the VM once it has the command's exit
            # (below); its shim removing it first, had the command ended before we
            # could attach, would take the exit along
            req = replace(req, client_removes=True)
        if tty:  # the main command runs on a guest terminal of our size (cli/tty.py)
            from torpor.cli import tty as tty_

            if not detach:
                tty_.check_input(req.stdin_open)
            req = replace(req, tty=tty_.terminal_size())
        mgr = _manager()
        with (
            err_console.status(f"starting {image}…", spinner="dots")
            if sys.stderr.isatty()
            else contextlib.nullcontext()
        ):
            vm = mgr.run(req)
        _announce_accel(vm)
    except TorporError as e:
        _fail(e, 125)
    except OSError as e:  # read-only or full home, permissions
        _fail(_os_error(e, "run"), 125)
    if detach:
        click.echo(vm.id)
        return
    code = None
    try:
        if tty:
            try:
                code = tty_.attach_main(mgr, vm, req.stdin_open)
            except TorporError as e:
                _fail(e, 125)
        if code is None:
            code = _attach(mgr, vm, req.stdin_open)
    finally:  # also when attaching failed (_fail exits): the VM is ours to remove
        if rm:
            with contextlib.suppress(TorporError):
                vm2 = mgr.get(vm.id)
                if vm2.state.status.active:
                    mgr.stop(vm.id, timeout=10)
                mgr.remove(vm.id, force=True)
    sys.exit(code)


@contextlib.contextmanager
def _forward_signals(handle: Any) -> Iterator[None]:
    """Ctrl-C and SIGTERM go to the process in the VM, like `docker run`'s sig-proxy."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    old = {}
    count = {"n": 0}

    def handler(signo: int, frame: Any) -> None:
        count["n"] += 1
        if count["n"] >= 3:  # third Ctrl-C: give up waiting
            os._exit(130)
        with contextlib.suppress(TorporError, OSError):
            handle.signal(signo)

    for s in sigs:
        old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pump_stdin(handle: Any) -> None:
    def pump() -> None:
        try:
            fd = sys.stdin.fileno()
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                handle.write_stdin(data)
        except (OSError, ValueError, TorporError):
            pass
        with contextlib.suppress(TorporError, OSError):
            handle.close_stdin()

    threading.Thread(target=pump, daemon=True, name="stdin").start()


def _stream(handle: Any, stdin: bool) -> int:
    from torpor.agent.protocol import T

    out = sys.stdout.buffer
    err = sys.stderr.buffer
    if stdin:
        _pump_stdin(handle)
    with _forward_signals(handle):
        for kind, data in handle.events():
            stream = out if kind == T.STDOUT else err
            stream.write(data)
            stream.flush()
        status = handle.wait()
    return status.code


#: How long an attach that finds the agent gone waits for the VM's exit to be recorded
#: (its shim stops listening a moment before: QEMU's last console words, up to 2 s).
ATTACH_SETTLE_S = 15.0


def _attach(mgr: Any, vm: Any, stdin: bool) -> int:
    from torpor import failpoints

    failpoints.hit("cli.attach")
    deadline = time.monotonic() + ATTACH_SETTLE_S
    while True:
        try:
            client = mgr.client(vm)
            break
        except TorporError as e:
            # the command may have finished before we could attach: report from the
            # record once the VM's end is in it
            vm = mgr.get(vm.id)
            if not vm.state.status.active and vm.state.exit_code is not None:
                for _, stream, data in mgr.logs(vm.id):
                    (sys.stdout if stream == "stdout" else sys.stderr).buffer.write(data)
                sys.stdout.flush()
                return vm.state.exit_code
            if not vm.state.status.active or time.monotonic() > deadline:
                _fail(e, 125)
            time.sleep(0.05)
    with client:
        try:
            return _stream(client.attach(), stdin)
        except TorporError as e:
            _fail(e, 125)


@cli.command(context_settings=PASSTHROUGH)
@_run_options
@click.argument("image", shell_complete=complete.image_names)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(image: str, command: tuple[str, ...], tty: bool, **kw: Any) -> None:
    """Create a VM without starting it (see `torpor start`)."""
    try:
        req = _build_request(image, command, rm=False, **kw)
        if tty:  # the command will run on a guest terminal (cli/tty.py)
            from dataclasses import replace

            from torpor.cli.tty import terminal_size

            req = replace(req, tty=terminal_size())
        vm = _manager().create(req)
    except TorporError as e:
        _fail(e, 125)
    except OSError as e:
        _fail(_os_error(e, "create"), 125)
    click.echo(vm.id)


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
@click.option("-a", "--attach", is_flag=True, help="Attach to the command's output.")
def start(vms: tuple[str, ...], attach: bool) -> None:
    """Start stopped VMs (their disk is kept; memory starts afresh)."""
    mgr = _manager()
    for ref in vms:
        vm = mgr.start(ref)
        _announce_accel(vm)
        if attach:
            sys.exit(_attach(mgr, vm, False))
        click.echo(ref)


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
@click.option(
    "-t",
    "--time",
    "timeout",
    default=10,
    show_default=True,
    help="Seconds to wait for the command to exit after SIGTERM before SIGKILL.",
)
def stop(vms: tuple[str, ...], timeout: int) -> None:
    """Stop running VMs: SIGTERM the command, then power the guest off."""
    mgr = _manager()
    for ref in vms:
        mgr.stop(ref, timeout=timeout)
        click.echo(ref)


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
@click.option(
    "-s",
    "--signal",
    "sig",
    default="KILL",
    show_default=True,
    help="KILL ends the VM at once; another signal (TERM, HUP, 15…) goes to its command.",
)
def kill(vms: tuple[str, ...], sig: str) -> None:
    """Kill running VMs at once (no clean shutdown), or signal their command."""
    from torpor.vmm.query import parse_signal

    signo = parse_signal(sig)
    mgr = _manager()
    for ref in vms:
        mgr.signal_main(ref, signo)
        click.echo(ref)


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
def wait(vms: tuple[str, ...]) -> None:
    """Block until VMs stop, then print their exit codes."""
    mgr = _manager()
    for ref in vms:
        vm = mgr.wait(ref)
        click.echo(vm.state.exit_code if vm.state.exit_code is not None else -1)


@cli.command(context_settings=CONTEXT)
@click.argument("vm", shell_complete=complete.vm_names)
@click.argument("private", required=False, metavar="[GUEST_PORT[/PROTO]]")
def port(vm: str, private: str | None) -> None:
    """List a VM's port forwards, or the host address of one guest port."""
    ports = _manager().get(vm).config.ports
    if private is not None:
        num, _, proto = private.partition("/")
        if not num.isdigit():
            raise UsageError(f"invalid port {private!r} (expected PORT or PORT/PROTO)")
        ports = tuple(p for p in ports if p.guest_port == int(num) and p.proto == (proto or "tcp"))
        if not ports:
            from torpor.errors import NotFoundError

            raise NotFoundError(f"no forward to guest port {private} in VM {vm}")
        for p in ports:
            click.echo(f"{p.host_ip}:{p.host_port}")
        return
    for p in ports:
        click.echo(f"{p.guest_port}/{p.proto} -> {p.host_ip}:{p.host_port}")


@cli.command(context_settings=CONTEXT)
@click.argument("vm", shell_complete=complete.vm_names)
@click.argument("new_name")
def rename(vm: str, new_name: str) -> None:
    """Rename a VM."""
    _manager().rename(vm, new_name)


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, shell_complete=complete.vm_names)
@click.option("-a", "--all", "all_", is_flag=True, help="Stopped VMs too.")
@click.option("--no-stream", is_flag=True, help="One sample (the only mode today).")
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
def stats(vms: tuple[str, ...], all_: bool, no_stream: bool, fmt: str | None) -> None:
    """CPU and memory of each VM's QEMU process (one sample over half a second)."""
    from torpor.vmm.query import stats as sample

    mgr = _manager()
    targets = [mgr.get(r) for r in vms] if vms else mgr.list(all=all_)
    got = sample(targets)
    rows = []
    for vm in targets:
        st = got[vm.id]
        rows.append(
            {
                "ID": vm.id[:12],
                "Name": vm.name,
                "CPUPerc": f"{st.cpu_percent:.1f}%" if st else "--",
                "MemUsage": f"{human_size(st.rss_bytes)} / {human_size(st.memory_limit_bytes)}"
                if st
                else "--",
                "PIDs": st.pids if st else 0,
                "cpu_percent": st.cpu_percent if st else None,
                "rss_bytes": st.rss_bytes if st else None,
                "memory_bytes": vm.config.memory_mib * 1024 * 1024,
            }
        )
    cols = ("VM ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "THREADS")
    keys = ("ID", "Name", "CPUPerc", "MemUsage", "PIDs")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
@click.option("-f", "--force", is_flag=True, help="Kill running VMs first.")
def rm(vms: tuple[str, ...], force: bool) -> None:
    """Remove VMs and every file they own."""
    mgr = _manager()
    failed: TorporError | None = None
    for ref in vms:
        try:
            mgr.remove(ref, force=force)
            click.echo(ref)
        except TorporError as e:
            err_console.print(f"[red]torpor:[/red] {markup_safe(e)}", soft_wrap=True)
            failed = e
    if failed:
        sys.exit(failed.exit_code)


def _status_text(vm: Any) -> str:
    st = vm.state
    s = st.status.value
    if s == "running":
        if st.io_error:  # QEMU holds the guest paused: see `inspect` for the folder
            why = "disk full" if "full" in st.io_error else "I/O error"
            return f"Up {ago(st.started_at)} (paused: {why})"
        return f"Up {ago(st.started_at)}"
    if s in ("exited", "dead"):
        when = f" {ago(st.finished_at)} ago" if st.finished_at else ""
        return f"{s.capitalize()} ({st.exit_code}){when}"
    return s.capitalize()


@cli.command(context_settings=CONTEXT)
@click.option("-a", "--all", "all_", is_flag=True, help="Show all VMs (default: running).")
@click.option("-q", "--quiet", is_flag=True, help="Only VM ids.")
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
@click.option(
    "-f",
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="label=K, label=K=V, status=S, name=SUBSTRING, id=PREFIX (implies -a).",
)
def ps(all_: bool, quiet: bool, fmt: str | None, filters: tuple[str, ...]) -> None:
    """List VMs."""
    from torpor.vmm.query import matches, parse_filters

    where = parse_filters(filters)
    vms = [vm for vm in _manager().list(all=all_ or bool(where)) if matches(vm, where)]
    if quiet:
        for vm in vms:
            click.echo(vm.id[:12])
        return
    if fmt == "json":  # the inspect objects, as before
        click.echo(json.dumps([_inspect_dict(vm) for vm in vms], indent=2))
        return
    rows = [_ps_row(vm) for vm in vms]
    cols = ("VM ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "ACCEL", "PORTS", "NAMES")
    keys = ("ID", "Image", "QuotedCommand", "RunningFor", "Status", "Accel", "Ports", "Names")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))


def _ps_row(vm: Any) -> dict[str, Any]:
    """docker-ps-style fields (``{{.Names}}``, ``{{.Status}}``) plus the inspect object."""
    cmd = " ".join(vm.config.command)
    return {
        "ID": vm.id[:12],
        "Image": vm.config.image_ref,
        "Command": cmd,
        "QuotedCommand": '"' + fmt_.clip(cmd, 30) + '"',
        "CreatedAt": vm.config.created,
        "RunningFor": ago(vm.config.created) + " ago",
        "Status": _status_text(vm),
        "State": vm.state.status.value,
        "Accel": vm.state.accel or "-",
        "Ports": ", ".join(str(p) for p in vm.config.ports),
        "Names": vm.name,
        "Name": vm.name,
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(vm.config.labels.items())),
    }


def _inspect_dict(vm: Any) -> dict[str, Any]:
    from torpor.vmm.jail import describe as describe_jail
    from torpor.vmm.qemu import ISOLATION

    return {
        "Id": vm.id,
        "Name": vm.name,
        "Config": vm.config.to_json(),
        "State": vm.state.to_json(),
        "Accelerator": vm.state.accel or None,
        "Isolation": ISOLATION.get(vm.state.accel) if vm.state.accel else None,
        "Jail": describe_jail(vm.dir),  # what was applied to QEMU (torpor.vmm.jail)
        "Path": str(vm.dir),
    }


@cli.command(context_settings=CONTEXT)
@click.argument("vms", nargs=-1, required=True, shell_complete=complete.vm_names)
@click.option(
    "-f",
    "--format",
    "fmt",
    metavar="FORMAT",
    help="json (default) or a template: '{{.State.status}}'.",
)
def inspect(vms: tuple[str, ...], fmt: str | None) -> None:
    """Show a VM's configuration and state as JSON."""
    mgr = _manager()
    objs = [_inspect_dict(mgr.get(r)) for r in vms]
    if fmt in (None, "json"):
        fmt_.emit_one(objs, None)
        return
    for o in objs:
        fmt_.emit_one(o, fmt)


@cli.command(context_settings=CONTEXT)
@click.argument("vm", shell_complete=complete.vm_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each chunk with its time.")
@click.option("--console", "console_", is_flag=True, help="Show the guest kernel console.")
@click.option("-n", "--tail", default="all", show_default=True, help="Lines from the end.")
@click.option("--since", help="Only output since: 10m, 2h, a Unix time or RFC 3339 time.")
def logs(
    vm: str, follow: bool, timestamps: bool, console_: bool, tail: str, since: str | None
) -> None:
    """Print the output of a VM's main command (stdout and stderr kept apart)."""
    from datetime import UTC, datetime

    from torpor.vmm.query import log_records, parse_since

    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r} (a number of lines, or all)")
    t0 = parse_since(since) if since is not None else None
    mgr = _manager()
    if console_:  # every kept (rotated) file, oldest first
        sys.stdout.write(mgr.console(vm).decode(errors="replace"))
        return
    n = None if tail == "all" else int(tail)
    records = log_records(mgr, vm, follow=follow, tail=n, since=t0)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for t, stream, data in records:
            f = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
            if timestamps:
                f.write(datetime.fromtimestamp(t, UTC).isoformat().encode() + b" ")
            f.write(data)
            f.flush()


@cli.command(name="exec", context_settings=PASSTHROUGH)
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin.")
@click.option("-t", "--tty", is_flag=True, help="Run it on a terminal (with -i: this one).")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Add an environment variable.")
@click.option("-w", "--workdir", help="Working directory (default: the VM's).")
@click.option("-u", "--user", help="User (default: the VM's).")
@click.option("-d", "--detach", is_flag=True, help="Start the command and return at once.")
@click.argument("vm", shell_complete=complete.vm_names)
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
    """Run COMMAND in a running VM; exits with its exit code.

    \b
    torpor exec box sh -c 'echo hi > /root/f; cat /root/f'
    echo data | torpor exec -i box sh -c 'cat > /tmp/in'
    torpor exec -it box sh                         # an interactive shell on a terminal
    """
    from torpor.vmm.manager import exec_settings

    try:
        mgr = _manager()
        v = mgr.get(vm)
        client = mgr.client(v)
        full_env, cwd, run_as = exec_settings(v.config, env, workdir, user)
        with client:
            if tty and not detach:  # see torpor/cli/tty.py
                from torpor.cli import tty as tty_

                code = tty_.run_exec(
                    client, command, env=full_env, cwd=cwd, user=run_as, interactive=interactive
                )
                sys.exit(code)
            handle = client.start_exec(
                list(command),
                env=full_env,
                cwd=cwd,
                user=run_as,
                stdin=interactive,
            )
            if detach:
                return
            try:
                code = _stream(handle, interactive)
            except BrokenPipeError:
                # our reader went away (`torpor exec VM yes | head -1`): the command
                # would write into the agent's pipe for ever; a real pipe gives its
                # writer SIGPIPE, so does this.  Exit 141 as any closed stdout.
                with contextlib.suppress(TorporError, OSError):
                    handle.signal(signal.SIGPIPE)
                code = 141
    except TorporError as e:
        _fail(e, 125)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (freeing every module: ~10 ms of a
    ~100 ms ``torpor exec VM true``, issue 10's start-up target).  Safe here: the
    agent connection is closed, no atexit work of ours is pending, and output is
    flushed first (a closed stdout is exit 141, as in main()).  Only as the ``torpor``
    program: ``cli`` invoked in a process of someone else's (CliRunner) gets sys.exit."""
    if not _AS_PROGRAM:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 141
    os._exit(code)


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dest")
@click.option("-a", "--archive", is_flag=True, help="Keep uid/gid of copied files.")
def cp(src: str, dest: str, archive: bool) -> None:
    """Copy files or folders between the host and a VM (VM:PATH on one side).

    \b
    torpor cp ./local.txt box:/root/
    torpor cp box:/root/f ./f
    torpor cp ./dir box:/srv/dir
    torpor cp box:/srv/dir - > dir.tar     (a tar archive on stdout)
    torpor cp - box:/srv/ < dir.tar        (extract a tar from stdin)

    A copy out of a VM never follows links below DEST and stops at
    TORPOR_CP_MAX_BYTES (default 64 GiB) or TORPOR_CP_MAX_ENTRIES (1,000,000).
    """
    from torpor.agent.files import (
        copy_from_vm,
        copy_from_vm_tar,
        copy_tar_to_vm,
        copy_to_vm,
        split_vm_path,
    )

    mgr = _manager()
    s_vm, s_path = split_vm_path(src)
    d_vm, d_path = split_vm_path(dest)
    if (s_vm is None) == (d_vm is None):
        raise UsageError("exactly one of SRC and DEST must be VM:PATH")
    if s_vm is not None:
        with mgr.client(s_vm) as c, _working(f"copying {src} to {dest}…"):
            if d_path == "-":
                skipped = copy_from_vm_tar(c, s_path, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                skipped = copy_from_vm(c, s_path, Path(d_path))
    else:
        assert d_vm is not None
        with mgr.client(d_vm) as c, _working(f"copying {src} to {dest}…"):
            if s_path == "-":
                skipped = copy_tar_to_vm(c, sys.stdin.buffer, d_path)
            else:
                copy_to_vm(c, Path(s_path), d_path, keep_owner=archive)
                skipped = []
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        err_console.print(
            f"torpor: skipped {len(skipped)} device(s), FIFO(s), socket(s) or hard link(s): "
            + shown,
            markup=False,
        )


# -- snapshots -------------------------------------------------------------------------


class _DefaultGroup(click.Group):
    """``torpor snapshot VM`` takes a snapshot; ``torpor snapshot inspect|rm …`` manage."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


def _store() -> Any:
    """The home's store as every command sees it: with a bucket (--store /
    TORPOR_STORE) the bucket's snapshots, any host's, not just this cache."""
    from torpor.store.home import home_store

    return home_store(_paths().ensure())


def _store_io(f: Any) -> Any:
    """Snapshot commands: an OSError (a read-only or full home) is a StoreError naming
    the path, not a traceback."""
    import functools

    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return f(*args, **kw)
        except OSError as e:
            # imported only here: the store package is a fifth of a pooled CLI restore
            from torpor.store.errors import io_error

            raise io_error(e, f.__name__.replace("_", " "), None) from e

    return wrapper


@cli.group(cls=_DefaultGroup, context_settings=CONTEXT)
def snapshot() -> None:
    """Snapshot a running VM (memory, processes, disk) into the store.

    \b
    torpor snapshot box --tag after-install   # VM keeps running; prints the snapshot id
    torpor snapshot box --stop                # hibernate: snapshot, then free CPU and RAM
    torpor snapshot ls ; torpor snapshot inspect SNAP ; torpor snapshot rm SNAP
    With a bucket (--store s3://… / TORPOR_STORE) these see the bucket's snapshots,
    whichever host took them; `rm` removes a snapshot on every host.
    """


@snapshot.command(name="create", context_settings=CONTEXT)
@click.argument("vm", shell_complete=complete.vm_names)
@click.option("--tag", help="A label stored with the snapshot.")
@click.option(
    "--stop",
    is_flag=True,
    help="End the VM once the snapshot is durable (hibernate); `torpor start VM` restores it.",
)
def snapshot_create(vm: str, tag: str | None, stop: bool) -> None:
    """Snapshot VM; prints the snapshot id."""
    from torpor.snapshot import snapshot as take

    with _working(f"snapshotting {vm}{' (then ending it)' if stop else ''}…"):
        r = take(_manager(), vm, tag=tag, stop=stop)
    err_console.print(
        f"[dim]paused {r.pause_ms:.0f} ms, durable after {r.durable_ms:.0f} ms, "
        f"stored {human_size(r.stored_bytes)} in {r.new_chunks} new chunks[/dim]"
    )
    click.echo(r.manifest.id)


def _snap_row(m: Any) -> dict[str, Any]:
    import json as _json

    cfg = _json.loads(m.meta.get("vm", "{}"))
    return {
        "id": m.id,
        "parent": m.parent,
        "created": m.created,
        "kind": m.kind,  # vm-snapshot; image-base: a base disk kept for other hosts
        "tag": m.meta.get("tag", ""),
        "vm": cfg.get("name", ""),
        "image": cfg.get("image_ref", ""),
        "sizes": {k: a.size for k, a in m.artifacts.items()},
        "chunks": {k: sum(1 for c in a.chunks if c) for k, a in m.artifacts.items()},
    }


@snapshot.command(name="inspect", context_settings=CONTEXT)
@click.argument("snap", shell_complete=complete.snapshot_names)
@_store_io
def snapshot_inspect(snap: str) -> None:
    """Show a snapshot's parent, sizes and chunks as JSON (SNAP: id, id prefix or tag)."""
    from torpor.store import ManifestError

    store = _store()
    snap_id = store.resolve_id(snap)
    try:
        m = store.get(snap_id)
    except ManifestError as e:
        raise ManifestError(
            f"snapshot {snap_id[:12]} is damaged and cannot be shown ({e.message}); "
            f"`torpor snapshot rm {snap_id[:12]}` removes it",
            step="snapshot inspect",
            path=e.path,
        ) from e
    from torpor.store.home import where

    # where it is: the bucket (upload pending?) and how much of it this cache holds
    click.echo(json.dumps({**_snap_row(m), "location": where(store, m)}, indent=2, default=str))


@snapshot.command(name="rm", context_settings=CONTEXT)
@click.argument("snaps", nargs=-1, required=True, shell_complete=complete.snapshot_names)
@click.option("-f", "--force", is_flag=True, help="Remove even if other snapshots build on it.")
@_store_io
def snapshot_rm(snaps: tuple[str, ...], force: bool) -> None:
    """Remove snapshots (id, id prefix or tag; damaged ones too) and their caches.

    Their chunks go at the next `torpor gc`.  A removed snapshot stays removed, even
    if its manifest file is copied back.
    """
    from torpor.snapshot.core import remove_snapshot

    failed: TorporError | None = None
    mgr = _manager()
    for s in snaps:
        try:
            click.echo(remove_snapshot(mgr, s, force=force))
        except TorporError as e:  # the others are still removed, like `docker rm`
            err_console.print(f"[red]torpor:[/red] {markup_safe(e)}", highlight=False)
            failed = failed or e
    if failed is not None:
        sys.exit(failed.exit_code)


@cli.command(context_settings=CONTEXT)
@click.argument("vm", required=False, shell_complete=complete.vm_names)
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
@_store_io
def snapshots(vm: str | None, fmt: str | None) -> None:
    """List snapshots (of VM, if given); damaged ones are listed as DAMAGED."""
    good, bad = _store().scan()
    rows = [_snap_row(m) for m in good]
    if vm:
        rows = [r for r in rows if r["vm"] == vm]
    rows.sort(key=lambda r: str(r["created"]))
    for r in rows:  # table cells; the JSON keeps the raw fields too
        r["ShortID"] = r["id"][:12]
        r["ShortParent"] = (r["parent"] or "-")[:12]
        r["Created"] = str(r["created"])[:19]
        r["Memory"] = human_size(r["sizes"].get("memory", 0))
        r["Disk"] = human_size(r["sizes"].get("disk", 0))
        r["Tag"] = r["tag"] or ("" if r["kind"] == "vm-snapshot" else f"({r['kind']})")
    for snap_id, e in bad if not vm else ():
        rows.append(
            {
                **dict.fromkeys(("ShortParent", "vm", "Created", "Memory", "Disk"), "?"),
                **{"id": snap_id, "ShortID": snap_id[:12], "tag": "DAMAGED", "Tag": "DAMAGED"},
                "damaged": e.message,
            }
        )
    cols = ("SNAPSHOT", "PARENT", "VM", "TAG", "CREATED", "MEMORY", "DISK")
    keys = ("ShortID", "ShortParent", "vm", "Tag", "Created", "Memory", "Disk")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))
    for snap_id, e in bad:
        err_console.print(
            f"[yellow]torpor:[/yellow] snapshot {snap_id[:12]} is damaged: {e.message} "
            f"(`torpor snapshot rm {snap_id[:12]}` removes it)",
            markup=True,
            highlight=False,
        )


snapshot.add_command(snapshots, name="ls")  # `torpor snapshot ls` = `torpor snapshots`


@cli.command(context_settings=CONTEXT)
@click.argument("snap", shell_complete=complete.snapshot_names)
@click.option("--name", help="Name of the restored VM (default: a random one).")
@click.option(
    "--cold",
    is_flag=True,
    help="Restore from compressed chunks only, ignoring the local uncompressed cache.",
)
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[IP:]HOST:GUEST[/PROTO]",
    help="Forward a host port (the snapshot's own forwards are not inherited).",
)
@_store_io
def restore(snap: str, name: str | None, cold: bool, publish: tuple[str, ...]) -> None:
    """Bring a snapshot (id, id prefix or tag) back as a running VM: same processes,
    memory and disk."""
    t0 = time.perf_counter()
    vm = None
    with _working(f"restoring {snap}…"):
        if not cold and not publish and len(snap) == 64 and snap.isalnum():
            # a ready spare of this snapshot id (torpor.vmm.pool): claimed without the
            # snapshot and store layers (their imports are most of a CLI restore)
            from torpor.vmm import pool

            mgr = _manager()
            vm = pool.claim(mgr, snap.lower(), name)
            if vm is not None:
                pool.want_soon(mgr.paths, snap.lower())
        if vm is None:
            from torpor.snapshot import restore as do_restore
            from torpor.vmm.manager import parse_port

            ports = tuple(parse_port(p) for p in publish)
            vm = do_restore(_manager(), snap, name=name, cold=cold, ports=ports)
        _adopt_sandboxes([vm])
    # click, not rich: the message is plain, and rich's import is a tenth of a restore
    ms = (time.perf_counter() - t0) * 1000
    click.echo(click.style(f"restored {vm.name} in {ms:.0f} ms", dim=True), err=True)
    click.echo(vm.id)


def _adopt_sandboxes(vms: list[Any]) -> None:
    """A sandbox's snapshot carries its timeout/idle (labels): enforce them as
    ``Sandbox.restore`` does (the sandbox layer is imported only then)."""
    for vm in vms:
        if any(k.startswith("torpor.sandbox.") for k in vm.config.labels):
            from torpor.sandbox import Sandbox

            Sandbox.adopt(vm.id, paths=_paths())


@cli.command(context_settings=CONTEXT)
@click.argument("snap", shell_complete=complete.snapshot_names)
@click.option("-n", "count", default=1, show_default=True, help="How many VMs.")
@click.option("--name-prefix", default=None, help="Names PREFIX-1 … PREFIX-N.")
@click.option("--cold", is_flag=True, help="Restore from compressed chunks only.")
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[IP:]HOST:GUEST[/PROTO]",
    help="Forward a host port (with -n 1 only; forwards are not inherited).",
)
@_store_io
def fork(
    snap: str, count: int, name_prefix: str | None, cold: bool, publish: tuple[str, ...]
) -> None:
    """Start N independent VMs from one snapshot (in parallel; each its own hostname)."""
    from torpor.snapshot import fork as do_fork
    from torpor.vmm.manager import parse_port

    if count < 1:
        raise UsageError("-n must be at least 1")
    ports = tuple(parse_port(p) for p in publish)
    t0 = time.perf_counter()
    what = f"{count} VMs" if count > 1 else "a VM"
    with _working(f"forking {what} from {snap}…"):
        vms = do_fork(_manager(), snap, count, name_prefix=name_prefix, cold=cold, ports=ports)
        _adopt_sandboxes(vms)
    err_console.print(f"[dim]forked {len(vms)} in {(time.perf_counter() - t0) * 1000:.0f} ms[/dim]")
    for vm in vms:
        click.echo(f"{vm.name} {vm.id}")


@cli.command(context_settings=CONTEXT)
@click.option(
    "--grace",
    default=900,
    show_default=True,
    help="Keep chunks younger than this (seconds), whatever references them.",
)
@click.option(
    "--dry-run", is_flag=True, help="List what would be deleted (and condemned); change nothing."
)
@_store_io
def gc(grace: int, dry_run: bool) -> None:
    """Delete chunks no snapshot references (safe while snapshots are being taken),
    and the caches of removed snapshots.

    With a bucket (--store / TORPOR_STORE) this also collects the bucket, from every
    host's snapshots: an unreferenced pack older than --grace is first condemned, and
    deleted by a later gc if still unreferenced a grace period after (docs/deploy.md).
    """
    from torpor.snapshot.core import gc as do_gc
    from torpor.store.home import store_url

    store = _store()  # the same checks and errors as the other snapshot commands
    if dry_run:
        try:
            r = store.gc(grace_seconds=grace, dry_run=True)
        finally:
            store.close()
        for h in r.chunks_doomed:
            click.echo(f"would delete chunk {h}")
        for obj in r.bucket_deleted:
            click.echo(f"would delete {obj} (bucket)")
        for obj in r.bucket_condemned:
            click.echo(f"would condemn {obj} (bucket; deleted by a gc after the grace period)")
    else:
        store.close()
        r = do_gc(_manager(), grace)
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {r.chunks_deleted} chunks ({human_size(r.bytes_freed)}), kept "
        f"{r.chunks_kept} (+{r.chunks_kept_young} unreferenced but young or leased), "
        f"{r.leases_live} writers in flight"
    )
    if store_url(_paths().root) is not None:
        click.echo(
            f"bucket: {verb} {len(r.bucket_deleted)} objects "
            f"({human_size(r.bucket_bytes_freed)}), condemned {len(r.bucket_condemned)}, "
            f"kept {r.packs_kept} packs (+{r.packs_kept_young} young)"
        )


@cli.command(context_settings=CONTEXT)
@_store_io
def verify() -> None:
    """Re-hash every chunk, check every manifest and every cached snapshot file; name
    what is damaged (a bad cache is rebuilt from the store)."""
    from torpor.snapshot.core import verify_caches

    store = _store()
    r = store.verify()
    for c in verify_caches(_manager(), store):
        if c.shadow:
            click.echo(
                f"RAM shadow of VM {c.shadow[:12]} did not match snapshot {c.snapshot[:12]}: "
                "no longer used (its next snapshot reads all of its RAM)"
            )
        elif c.orphan:
            click.echo(f"cache of snapshot {c.snapshot[:12]} had no valid snapshot: deleted")
        else:
            what = "rebuilt from the store" if c.repaired else "deleted"
            click.echo(
                f"cache of snapshot {c.snapshot[:12]} was damaged ({', '.join(c.bad)}): {what}"
            )
    click.echo(
        f"checked {r.chunks_checked} chunks ({human_size(r.bytes_checked)}) and "
        f"{r.manifests_checked} snapshots"
    )
    for h in r.corrupt:
        click.echo(f"corrupt chunk {h}")
    for h in r.missing:
        click.echo(f"missing chunk {h}")
    for name, why in r.bad_manifests:
        click.echo(f"bad manifest {name}: {why}")
    for name, why in r.bad_packs:
        click.echo(f"bad pack {name}: {why}")
    for snap, chunks in r.affected.items():
        click.echo(f"snapshot {snap[:12]} is damaged ({len(chunks)} chunks)")
    if not r.ok:
        sys.exit(10)
    click.echo("ok")


@cli.command(context_settings=CONTEXT)
def demo() -> None:
    """Run the demo: a durable agent session — work, hibernate, wake, fork — on real VMs."""
    from torpor.demo.run import run_demo

    run_demo(_paths(), out_console.real)


# -- system -----------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def system() -> None:
    """Disk use and clean-up of everything under TORPOR_HOME."""


@system.command(name="df", context_settings=CONTEXT)
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
def system_df(fmt: str | None) -> None:
    """Disk used by images, VMs, snapshots and caches (like `docker system df`)."""
    from torpor.vmm.query import disk_usage

    rows = [
        {
            "Type": d.kind,
            "TotalCount": d.total,
            "Active": d.active,
            "Size": human_size(d.size),
            "Reclaimable": human_size(d.reclaimable),
            "size_bytes": d.size,
            "reclaimable_bytes": d.reclaimable,
        }
        for d in disk_usage(_manager())
    ]
    from torpor.vmm import pool

    spares = pool.spares(_paths())
    if spares:  # host memory, not disk: restored VMs waiting for a claim (`prune` stops them)
        held = sum(int(x.get("memory", 0)) for x in spares)
        rows.append(
            {
                "Type": "Pool spares (memory)",
                "TotalCount": len(spares),
                "Active": 0,
                "Size": human_size(held),
                "Reclaimable": human_size(held),
                "size_bytes": held,
                "reclaimable_bytes": held,
            }
        )
    cols = ("TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE")
    keys = ("Type", "TotalCount", "Active", "Size", "Reclaimable")
    fmt_.emit(rows, fmt, list(zip(cols, keys, strict=True)))


@system.command(name="prune", context_settings=CONTEXT)
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--grace",
    default=900,
    show_default=True,
    help="Keep unreferenced chunks younger than this (seconds), as `torpor gc`.",
)
@_store_io
def system_prune(force: bool, grace: int) -> None:
    """Remove stopped VMs (not hibernated ones, not sessions') and unreferenced chunks."""
    from torpor.vmm.query import prune

    if not force:
        if not sys.stdin.isatty():
            raise UsageError("system prune asks for confirmation: use -f to run it unattended")
        click.confirm(
            "This removes every stopped VM (not hibernated ones, not sessions' VMs) and "
            "the chunks no snapshot references. Continue?",
            abort=True,
            err=True,
        )
    r = prune(_manager(), grace)
    from torpor.vmm import pool

    stopped = pool.drain(_paths())  # spare VMs of the restore pool: memory held for speed
    if stopped:
        click.echo(f"stopped {stopped} pool spare VM{'s' if stopped != 1 else ''}")
    for vm_id in r.vms_removed:
        click.echo(f"deleted VM {vm_id[:12]}")
    click.echo(f"Total reclaimed space: {human_size(r.bytes_freed)} ({r.chunks_deleted} chunks)")


# -- bench ----------------------------------------------------------------------------


@cli.group(
    cls=LazyGroup,
    context_settings=CONTEXT,
    lazy_subcommands={
        "thesis": "torpor.bench.thesis.cli:thesis",
        "thesis-report": "torpor.bench.thesis.cli:thesis_report",
        "serve": "torpor.bench.serve:serve",
        "store-s3": "torpor.bench.store_s3:store_s3",
        "cluster": "torpor.bench.cluster:cluster",
        "restore": "torpor.bench.restore:restore_cmd",
        "starts": "torpor.bench.starts:starts_cmd",
        "lazy": "torpor.bench.lazy:lazy_cmd",
        "fork": "torpor.bench.fork:fork_cmd",
        "capture": "torpor.bench.capture:capture_cmd",
    },
)
def bench() -> None:
    """Measure torpor (prints a table, writes JSON)."""


def _bench_output(result: dict[str, Any], json_out: Path, print_table: Any) -> None:
    """Every benchmark: JSON to ``json_out``, its table on stdout."""
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, out_console.real)
    err_console.print(f"wrote {json_out}")


def _json_out(bench_name: str) -> Any:
    """A bench's ``--json PATH`` option (default ``bench-results/<name>.json``)."""
    return click.option(
        "--json",
        "json_out",
        type=click.Path(path_type=Path),
        default=Path(f"bench-results/{bench_name}.json"),
        show_default=True,
    )


@bench.command(name="boot", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option("--runs", default=10, show_default=True, help="Cold boots to time.")
@click.option("--execs", default=200, show_default=True, help="`exec true` round trips.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
@_json_out("boot")
def bench_boot(image: str, runs: int, execs: int, accel: str, json_out: Path) -> None:
    """Cold boot to agent-ready, `exec true` round trip, 1 MiB stdout throughput."""
    from torpor.bench.boot import print_table, run_boot_bench

    result = run_boot_bench(
        _paths(),
        image=image,
        runs=runs,
        execs=execs,
        accel=accel,
        progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
    )
    _bench_output(result, json_out, print_table)


@bench.command(name="cli", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option("--runs", default=20, show_default=True, help="Timed runs of each command.")
@_json_out("cli")
@click.option(
    "--no-bytecode-cache",
    is_flag=True,
    help="Run the CLI with PYTHONDONTWRITEBYTECODE=1 (compile on every start).",
)
def bench_cli(image: str, runs: int, json_out: Path, no_bytecode_cache: bool) -> None:
    """CLI start-up, `ps`, `images`, `exec VM true`: the CLI next to the library call."""
    from torpor.bench.cli import print_table, run_cli_bench

    if runs < 1:
        raise UsageError("--runs must be at least 1")
    result = run_cli_bench(
        _paths(),
        image=image,
        runs=runs,
        progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
        bytecode_cache=not no_bytecode_cache,
    )
    _bench_output(result, json_out, print_table)


@bench.command(name="snapshot", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option("--trials", default=3, show_default=True)
@_json_out("snapshot")
@click.option("--forks", default=8, show_default=True, help="VMs to fork from one snapshot.")
@click.option(
    "--first-only",
    is_flag=True,
    help="Only the first snapshot of a fresh VM (phase by phase) and the incremental one after it.",
)
def bench_snapshot(image: str, trials: int, forks: int, json_out: Path, first_only: bool) -> None:
    """Pause window, durability, stored bytes, hot/cold restore, fork 8; with a baseline."""
    from torpor.bench.snapshot import print_table, run_snapshot_bench

    result = run_snapshot_bench(
        _paths(),
        image=image,
        trials=trials,
        forks=forks,
        progress=lambda m: err_console.print(f"[dim]{m}[/dim]"),
        first_only=first_only,
    )
    _bench_output(result, json_out, print_table)


@bench.command(name="sessions", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option(
    "--turns",
    default="10,100",
    show_default=True,
    help="Session lengths to measure, comma-separated (1000 takes ~20 min under TCG).",
)
@_json_out("sessions")
def bench_sessions(image: str, turns: str, json_out: Path) -> None:
    """Per-turn checkpoint cost, stored bytes, resume and crash recovery vs session length."""
    from torpor.bench.sessions import print_table, run_sessions_bench

    try:
        lengths = [int(x) for x in turns.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--turns wants numbers like 10,100,1000, not {turns!r}") from None
    if not lengths or min(lengths) < 1:
        raise UsageError("--turns wants positive numbers like 10,100,1000")
    result = run_sessions_bench(_paths(), image, lengths, lambda m: err_console.print(m))
    _bench_output(result, json_out, print_table)


@bench.command(name="turn", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option("--turns", default=30, show_default=True, help="Turns of each session.")
@click.option(
    "--think-ms",
    default=0.0,
    show_default=True,
    help="Pause between turns (0: the next turn starts at once, competing with commits).",
)
@_json_out("turn")
def bench_turn(image: str, turns: int, think_ms: float, json_out: Path) -> None:
    """What a turn's checkpoint adds, phase by phase: synchronous vs journal, side by side."""
    from torpor.bench.turn import print_table, run_turn_bench

    if turns < 2 or think_ms < 0:
        raise UsageError("--turns wants 2 or more, --think-ms 0 or more")
    result = run_turn_bench(
        _paths(), image, turns, lambda m: err_console.print(m), think_ms=think_ms
    )
    _bench_output(result, json_out, print_table)


@bench.command(name="faults", context_settings=CONTEXT)
@click.option("--image", default="tools:latest", show_default=True)
@click.option("--runs", default=200, show_default=True, help="Runs per fault.")
@click.option(
    "--faults",
    "faults_",
    default="kill-torpor,kill-shim,kill-qemu,kill-gc,enospc-store,eio-store,enospc-log,eio-log",
    show_default=True,
    help="Comma-separated fault classes.",
)
@click.option("--budget", type=float, help="Stop after this many seconds (shared by the faults).")
@click.option("--seed", type=int, help="Random seed (printed; default: a random one).")
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    help="The campaign's torpor home (default: a fresh one under /tmp; needs root for mounts).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench-results/faults.json"),
    show_default=True,
)
def bench_faults(
    image: str,
    runs: int,
    faults_: str,
    budget: float | None,
    seed: int | None,
    home: Path | None,
    json_out: Path,
) -> None:
    """Crash and fault campaign: kill -9, ENOSPC and EIO during snapshot, restore, gc, send."""
    from torpor.bench.faults import prepare_home, print_table, run_faults_bench

    if runs < 1:
        raise UsageError("--runs must be at least 1")
    names = [f.strip() for f in faults_.split(",") if f.strip()]
    paths = prepare_home(home, image)
    err_console.print(f"[dim]campaign home {paths.root}[/dim]")
    try:
        result = run_faults_bench(
            paths,
            image,
            names,
            runs,
            seed=seed,
            budget_s=budget,
            progress=lambda m: err_console.print(m, markup=False, highlight=False),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    _bench_output(result, json_out, print_table)




_AS_PROGRAM = False  # set by main(): this process is the `torpor` program (see _exit_now)


def main() -> None:
    global _AS_PROGRAM
    _AS_PROGRAM = True
    # every file torpor writes holds guest data: private to its owner (torpor/paths.py)
    os.umask(0o077)
    try:
        cli.main(standalone_mode=False, prog_name="torpor")
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code if e.exit_code != 1 else 2)
    except TorporError as e:
        if os.environ.get("TORPOR_DEBUG"):
            raise
        _fail(e)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except (BrokenPipeError, StdoutClosed):
        # nothing more can reach the reader; the interpreter's final flush must not
        # print a second error about it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.exit(141)
    sys.exit(0)


if __name__ == "__main__":
    main()

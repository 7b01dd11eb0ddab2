"""``torpor session …``: durable agent sessions from the command line.

A thin layer over :class:`torpor.session.Session`; every command opens the
session from the context log (SQLite in $TORPOR_HOME by default, PostgreSQL with
``--dsn`` / ``$TORPOR_CONTEXT_DSN``), does one thing and prints.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from torpor.cli.complete import session_names
from torpor.cli.format import FORMAT_HELP, emit
from torpor.cli.term import markup_safe
from torpor.errors import UsageError
from torpor.paths import Paths
from torpor.session.text import describe, durability_text, human_size

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def parse_duration(text: str) -> float:
    """``60``, ``60s``, ``5m``, ``1h``, ``7d``, ``0`` (never) to seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise UsageError(f"invalid duration {text!r} (examples: 30s, 5m, 1h, 7d, 0 for never)")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    return float(m.group(1)) * unit


DURABILITY_KEYS = ("durability", "commit_local_ms", "commit_bucket_ms")  # checkpoint entry


def _open(ctx: click.Context, ref: str, **kw: Any) -> Any:
    from torpor.session import Session

    return Session.open(ref, paths=Paths.default(), dsn=ctx.obj.get("dsn"), **kw)


def _entry_json(e: Any) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "turn": e.turn,
        "kind": e.kind.value,
        "time": e.created_at,
        "key": e.key,
        "payload": e.payload,
    }


def _progress(e: Any) -> None:
    if e.kind.value in ("tool_call", "tool_result", "checkpoint", "vm", "resume", "supersede"):
        # describe() quotes guest output (tool results): never taken as markup
        err_console.print(f"[dim]  {e.seq:>4} {markup_safe(describe(e))}[/dim]", markup=True)


@click.group(context_settings=CONTEXT)
@click.option(
    "--dsn",
    envvar="TORPOR_CONTEXT_DSN",
    help="Context log database: postgresql://… (default: SQLite in $TORPOR_HOME).",
)
@click.pass_context
def session(ctx: click.Context, dsn: str | None) -> None:
    """Durable agent sessions: a context log plus a checkpointed microVM.

    \b
      torpor session create --image tools:latest --model scripted:demo
      torpor session send S "set up a counter service"
      torpor session log S --follow
      torpor session hibernate S        # or automatically: create --idle 60s
      torpor session send S "is it still running?"   # wakes the VM
      torpor session fork S --at 7 --name S2
      torpor session recover S          # after a crash: last checkpoint + replay
      torpor session verify             # check the log's MAC chain
      torpor session rm S               # or: torpor session prune --older-than 7d

    Model specs: scripted:demo (offline), openai:MODEL (OPENAI_BASE_URL for vLLM,
    Ollama, llama.cpp), anthropic:MODEL.  S is a session name, id or id prefix.
    """
    ctx.ensure_object(dict)
    ctx.obj["dsn"] = dsn


@session.command(context_settings=CONTEXT)
@click.option("--image", required=True, help="Image the session's VM boots from.")
@click.option("--model", default="scripted:demo", show_default=True, help="Model spec.")
@click.option("--name", help="Session name (default s-<id prefix>).")
@click.option("-m", "--memory", default="256m", show_default=True, help="VM memory.")
@click.option(
    "--idle",
    default="0",
    show_default=True,
    help="Hibernate after this long without activity (30s, 5m; 0 = never).",
)
@click.option("--system", help="System prompt (default: a short one about the VM and tools).")
@click.option("--network/--no-network", default=False, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Print only the session id.")
@click.pass_context
def create(
    ctx: click.Context,
    image: str,
    model: str,
    name: str | None,
    memory: str,
    idle: str,
    system: str | None,
    network: bool,
    quiet: bool,
) -> None:
    """Create a session: boot its VM and take checkpoint 0; prints the session id."""
    from torpor.session import Session
    from torpor.vmm.manager import parse_memory

    if not quiet:
        err_console.print(f"booting a VM from {image} and taking the first checkpoint…")
    s = Session.create(
        image,
        model,
        name=name,
        memory_mib=parse_memory(memory),
        idle=parse_duration(idle),
        system=system,
        network=network,
        paths=Paths.default(),
        dsn=ctx.obj.get("dsn"),
    )
    if not quiet:
        ck = s.checkpoints[-1]
        err_console.print(
            f"session [bold]{s.name}[/bold] ready; checkpoint 0: {human_size(ck.stored_bytes)} "
            f"stored in {ck.durable_ms:.0f} ms",
            markup=True,
        )
    click.echo(s.id)


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.argument("message")
@click.option("--key", help="Idempotency key: a retried send with the same key never repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print the turn's entries as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the answer.")
@click.pass_context
def send(ctx: click.Context, ref: str, message: str, key: str | None, as_json: bool, quiet: bool):
    """Send MESSAGE ("-" reads stdin) and print the model's answer.

    Wakes a hibernated session, recovers an interrupted one, then runs the turn:
    model steps and tool calls in the VM, then a checkpoint.  Ctrl-C leaves the
    message acknowledged; the next send or `recover` replays the turn.
    """
    if message == "-":
        message = sys.stdin.read()
    with _open(ctx, ref, on_event=None if quiet or as_json else _progress) as s:
        before = s.state().last_seq
        try:
            answer = s.send(message, key=key)
        except KeyboardInterrupt:
            err_console.print(
                f"interrupted: the message is in the log; `torpor session recover {s.name}` "
                "(or the next send) finishes the turn"
            )
            raise
        if as_json:
            entries = s.log(after=before)
            click.echo(json.dumps({"answer": answer, "entries": [_entry_json(e) for e in entries]}))
        else:
            click.echo(answer)


@session.command(name="log", context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries (Ctrl-C ends).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--after", default=0, show_default=True, help="Start after this sequence number.")
@click.pass_context
def log_(ctx: click.Context, ref: str, follow: bool, as_json: bool, after: int) -> None:
    """The session's context log, entry by entry (superseded entries marked ~)."""
    with _open(ctx, ref) as s:
        print_log(s, after=after, follow=follow, as_json=as_json)


def print_log(s: Any, *, after: int, follow: bool, as_json: bool) -> None:
    """``session log`` for a local or a remote (torpor.Client) session: same output."""
    from torpor.context import superseded

    everything = s.log()
    gone = superseded(everything)
    entries = [e for e in everything if e.seq > after]

    def show(e: Any) -> None:
        if as_json:
            click.echo(json.dumps(_entry_json(e), ensure_ascii=False))
            return
        mark = "~" if e.seq in gone else " "
        when = time.strftime("%H:%M:%S", time.localtime(e.created_at))
        out_console.print(
            f"{e.seq:>5}{mark} {when} t{e.turn:<3} {e.kind.value:<14} {describe(e)}",
            markup=False,
        )

    for e in entries:
        show(e)
    if follow:
        last = entries[-1].seq if entries else after
        try:
            for e in s.follow(after=last):
                show(e)
        except KeyboardInterrupt:
            pass


def _session_row(s: Any) -> dict[str, Any]:
    from torpor.context import ChainError

    try:
        return _row_of(s)
    except ChainError:  # one edited log must not hide the others from `ls`
        return {
            "id": s.id,
            "name": s.name,
            "status": "broken",  # `torpor session verify` names the entries
            "model": s.record.meta.get("model"),
            "image": s.record.meta.get("image"),
            "turns": 0,
            "entries": 0,
            "checkpoints": 0,
            "snapshot_bytes": 0,
            "log_bytes": 0,
            "vm": None,
            "parent": s.record.parent_id,
            "parent_seq": s.record.parent_seq,
            "created": s.record.created_at,
        }


def _row_of(s: Any) -> dict[str, Any]:
    st = s.state()
    stats = s.stats()
    vm = s.vm()
    return {
        "id": s.id,
        "name": s.name,
        "status": s.status(),
        "model": s.record.meta.get("model"),
        "image": s.record.meta.get("image"),
        "turns": st.turns,
        "entries": st.last_seq,
        "checkpoints": len(st.checkpoints),
        "snapshot_bytes": stats["snapshot_bytes"],
        "log_bytes": stats["log_bytes"],
        "vm": vm.name if vm else None,
        "parent": s.record.parent_id,
        "parent_seq": s.record.parent_seq,
        "created": s.record.created_at,
    }


@session.command(name="ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="= --format json.")
@click.option("--format", "fmt", metavar="FORMAT", help=FORMAT_HELP)
@click.option("-q", "--quiet", is_flag=True, help="Only session ids.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Removed sessions too.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool, fmt: str | None, quiet: bool, show_all: bool) -> None:
    """List sessions."""
    from torpor.session import Session

    sessions = Session.list(paths=Paths.default(), dsn=ctx.obj.get("dsn"), include_removed=show_all)
    if quiet:
        for s in sessions:
            click.echo(s.id)
        return
    rows = [_session_row(s) for s in sessions]
    if as_json or fmt == "json":  # exactly the rows, as before
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


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """State, checkpoints (with sizes and times) and storage of one session."""
    with _open(ctx, ref) as s:
        row = _session_row(s)
        cks = s.checkpoints
        # how each was durable (bucket / local, upload pending / local) is in its entry
        durable = {
            e.seq: {k: e.payload.get(k) for k in DURABILITY_KEYS}
            for e in s.log()
            if e.kind.value == "checkpoint"
        }
        row["checkpoint_list"] = [{**c.__dict__, **durable.get(c.seq, {})} for c in cks]
        if as_json:
            click.echo(json.dumps(row, indent=2))
            return
        for k in ("id", "name", "status", "model", "image", "vm", "turns", "entries"):
            out_console.print(f"{k:>12}: {row[k]}", markup=False)
        if row["parent"]:
            out_console.print(f"{'forked from':>12}: {row['parent']} at {row['parent_seq']}")
        own = human_size(row["log_bytes"])
        out_console.print(f"{'log':>12}: {own} in this session's own entries")
        t = Table(title="checkpoints", header_style="bold")
        cols = ("SEQ", "TURN", "REASON", "SNAPSHOT", "STORED", "PAUSED", "DURABLE", "WHERE")
        for col in cols:
            t.add_column(col)
        for c in cks:
            t.add_row(
                str(c.seq),
                str(c.turn),
                c.reason,
                c.snapshot[:12],
                human_size(c.stored_bytes),
                f"{c.pause_ms:.0f} ms",
                f"{c.durable_ms:.0f} ms",
                durability_text(durable.get(c.seq, {})).strip(" ()") or "-",
            )
        out_console.print(t)


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.pass_context
def hibernate(ctx: click.Context, ref: str) -> None:
    """Checkpoint the session and end its VM (frees CPU and RAM)."""
    with _open(ctx, ref) as s:
        ck = s.hibernate()
        size = human_size(ck.stored_bytes)
        click.echo(f"hibernated {s.name} at checkpoint {ck.seq} ({size} stored)")


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.pass_context
def resume(ctx: click.Context, ref: str) -> None:
    """Wake a hibernated session now (send does this by itself)."""
    with _open(ctx, ref) as s:
        t0 = time.perf_counter()
        vm = s.wake()
        click.echo(f"{s.name} running in VM {vm.name} ({(time.perf_counter() - t0) * 1000:.0f} ms)")


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.pass_context
def shell(ctx: click.Context, ref: str) -> None:
    """An interactive shell in the session's VM (woken first); exits with its code.

    What you change there is part of the machine at the session's next checkpoint.
    """
    from torpor.cli.tty import check_input, shell_in_vm
    from torpor.vmm.manager import VMManager

    check_input(True)  # before waking anything
    with _open(ctx, ref) as s:
        vm_id = s.sandbox.id
        paths = s.paths
    sys.exit(shell_in_vm(VMManager(paths), vm_id))


@session.command(context_settings=CONTEXT)
@click.argument("refs", metavar="S...", nargs=-1, shell_complete=session_names)
@click.option(
    "--anywhere",
    is_flag=True,
    help="Take the sessions over on this host (PostgreSQL log): without S, every session "
    "whose host stopped heartbeating; a session another live host holds is left to it.",
)
@click.option("--json", "as_json", is_flag=True, help="With --anywhere: one JSON row per session.")
@click.pass_context
def recover(ctx: click.Context, refs: tuple[str, ...], anywhere: bool, as_json: bool) -> None:
    """After a crash: restore the last checkpoint and replay an interrupted turn.

    \b
      torpor session recover S             # S's host is this one
      torpor session recover --anywhere    # every session of a dead host, here, now
      torpor session recover --anywhere S  # S, here, unless a live host holds it
    """
    if anywhere:
        _recover_anywhere(ctx, refs, as_json)
        return
    if len(refs) != 1:
        raise UsageError("session recover takes one session (or --anywhere [S...])")
    with _open(ctx, refs[0], on_event=_progress) as s:
        answer = s.recover()
        if answer is None:
            click.echo(f"{s.name}: no interrupted turn; the VM is running")
        else:
            click.echo(answer)


def _recover_anywhere(ctx: click.Context, refs: tuple[str, ...], as_json: bool) -> None:
    """One failover pass here (torpor.cluster.failover); exit 1 if a session failed."""
    from torpor.cluster.failover import FAILED, failover_once
    from torpor.context import open_log

    paths = Paths.default().ensure()
    dsn = ctx.obj.get("dsn")
    with open_log(dsn, paths=paths) as lg:
        results = failover_once(paths, lg, dsn=dsn, sessions=list(refs) or None, on_event=_progress)
    for r in results:
        if as_json:
            click.echo(json.dumps(r.to_json()))
        else:
            frm = f" from {r.from_host}" if r.from_host else ""
            click.echo(f"{r.name}: {r.outcome}{frm}" + (f" ({r.detail})" if r.detail else ""))
    if not results and not as_json:
        err_console.print("no session of a dead host to recover")
    if any(r.outcome == FAILED for r in results):
        sys.exit(1)


@session.command(context_settings=CONTEXT)
@click.argument("ref", metavar="S", shell_complete=session_names)
@click.option("--at", type=int, help="Checkpoint entry to fork at (default: the last one).")
@click.option("--name", help="Name of the new session.")
@click.pass_context
def fork(ctx: click.Context, ref: str, at: int | None, name: str | None) -> None:
    """A new session sharing S's log up to a checkpoint, with a VM forked from it."""
    with _open(ctx, ref) as s:
        child = s.fork(at=at, name=name)
        err_console.print(
            f"forked {s.name} at entry {child.record.parent_seq} into [bold]{child.name}[/bold]",
            markup=True,
        )
        click.echo(child.id)


@session.command(context_settings=CONTEXT)
@click.argument("refs", metavar="S...", nargs=-1, required=True, shell_complete=session_names)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove sessions: their VMs, their logs (a tombstone entry; nothing is deleted)
    and the snapshots no live fork still needs (`torpor gc` then frees the space).

    A removed session is no longer listed, and send/show/resume/log answer that it
    was removed.  Forks of it keep working.
    """
    for ref in refs:
        with _open(ctx, ref) as s:
            released = s.remove()
            err_console.print(f"[dim]{s.name}: {len(released)} snapshots released[/dim]")
            click.echo(s.name)


@session.command(context_settings=CONTEXT)
@click.option(
    "--older-than",
    "older_than",
    help="Only sessions without activity for this long (30m, 12h, 7d).",
)
@click.option("--all-hibernated", is_flag=True, help="Hibernated sessions too.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def prune(
    ctx: click.Context, older_than: str | None, all_hibernated: bool, dry_run: bool, force: bool
) -> None:
    """Remove every session that ended (its VM stopped or is gone, or it never
    started); with --all-hibernated the hibernated ones too.  Running and interrupted
    sessions are never pruned.  Prints the removed sessions' names."""
    from torpor.session import Session

    age = parse_duration(older_than) if older_than else None
    kw: dict[str, Any] = {"paths": Paths.default(), "dsn": ctx.obj.get("dsn")}
    if not dry_run and not force:
        what = "stopped and failed" + (" and hibernated" if all_hibernated else "")
        older = f" idle for more than {older_than}" if older_than else ""
        if not click.confirm(
            f"WARNING! This will remove all {what} sessions{older}. Are you sure you want"
            " to continue?",
            err=True,
        ):
            return
    gone = Session.prune(older_than=age, hibernated=all_hibernated, dry_run=dry_run, **kw)
    for _, name, status in gone:
        click.echo(f"{name}" + (f" ({status}, would be removed)" if dry_run else ""))
    if not gone:
        err_console.print("[dim]nothing to prune[/dim]")


@session.command(context_settings=CONTEXT)
@click.argument("refs", metavar="[S...]", nargs=-1, shell_complete=session_names)
@click.pass_context
def verify(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Check the context log's MAC chain (every session, removed ones too, or S...):
    prints each entry whose content or place changed after it was written, and
    exits 11 if there is one."""
    from torpor.context import open_log

    bad = 0
    with open_log(ctx.obj.get("dsn"), paths=Paths.default()) as log:
        if refs:
            records = [log.get_session(r, include_removed=True) for r in refs]
        else:
            records = log.list_sessions(include_removed=True)
        for r in records:
            problems = log.verify(r.id)
            bad += len(problems)
            label = markup_safe(r.name) + (" (removed)" if r.removed else "")
            if not problems:
                out_console.print(f"{label}: ok", markup=False)
            for seq, why in problems:
                out_console.print(f"{label}: entry {seq}: {why}", markup=False)
    if bad:
        err_console.print(f"{bad} broken entries: the context log was changed after writing")
        sys.exit(11)


@click.command(context_settings=CONTEXT)
@click.option(
    "--dsn",
    envvar="TORPOR_CONTEXT_DSN",
    help="Context log database: postgresql://… (default: SQLite in $TORPOR_HOME).",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
def hosts(dsn: str | None, as_json: bool) -> None:
    """Hosts sharing this context log: id, alive, seconds since the last heartbeat,
    and the sessions each holds (a dead host's are taken over by `torpor serve` on
    the others, or by `torpor session recover --anywhere`)."""
    from torpor.cluster.failover import host_rows
    from torpor.context import open_log

    with open_log(dsn, paths=Paths.default().ensure()) as lg:
        rows = host_rows(lg)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("HOST", "ALIVE", "FAILOVER", "HEARTBEAT", "SESSIONS"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            markup_safe(r["id"]),
            "yes" if r["alive"] else "no",
            "on" if r["failover"] else "-",
            f"{r['heartbeat_age']:.1f}s ago",
            markup_safe(", ".join(r["sessions"]) or "-"),
        )
    out_console.print(t)

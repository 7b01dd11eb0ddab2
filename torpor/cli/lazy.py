"""A click group whose subcommands live in modules imported only when used.

``torpor --version``, ``torpor ps`` and ``torpor exec VM true`` must not pay for the
session, snapshot, model or bench layers (issue 10, start-up).  A lazy subcommand is
named ``"module:attribute"`` and imported the first time click resolves it — when it
is run, or when ``--help`` lists every command.  Completion and ``--help`` therefore
still see every command; only the start-up of other commands stays small.
"""

from __future__ import annotations

import importlib
import select
import sys
from typing import Any

import click


class StdoutClosed(Exception):
    """stdout is a pipe whose reader has gone (``torpor cp VM:f - | head -c1``).

    click turns any EPIPE into a silent exit 1 before ``main()`` could see it; the
    group re-raises it as this (not an OSError) so that ``main()`` exits 141, as the
    exit-code table says.  An EPIPE on any other stream (a socket) stays an error.
    """


def stdout_closed() -> bool:
    """Whether fd 1 is a pipe whose read end is closed (poll reports POLLERR)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


class LazyGroup(click.Group):
    """``click.Group`` plus ``lazy_subcommands={name: "pkg.module:attr"}``."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            if stdout_closed():
                raise StdoutClosed() from e
            raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands and cmd_name not in self.commands:
            module, _, attr = self.lazy_subcommands[cmd_name].partition(":")
            cmd = getattr(importlib.import_module(module), attr)
            if not isinstance(cmd, click.Command):  # a wrong table entry is our bug, say so
                raise TypeError(f"{module}:{attr} is not a click command")
            self.add_command(cmd, cmd_name)
        return super().get_command(ctx, cmd_name)

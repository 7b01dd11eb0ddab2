"""One formatter for every listing and ``inspect`` (docker/cli's ``formatter`` package).

``--format`` takes ``table`` (default), ``json`` (the rows as one JSON array) or a
Go-template subset: ``{{.Field}}``, ``{{.A.B}}``, ``{{json .}}``, ``{{json .Field}}``,
with ``\\t`` / ``\\n`` written as two characters, and a ``table `` prefix for a header
row.  Anything else in ``{{ }}`` is a :class:`~torpor.errors.UsageError`, not silence.

Invariants: every cell printed as text goes through :func:`torpor.cli.term.printable`
(guest-, image- and user-chosen names may hold control characters); tables are plain
aligned text — never wrapped, and truncated (long commands) only when stdout is a
terminal; JSON is exactly the rows.  Colour comes only from the rich consoles below,
created on first use (rich costs start-up time) and off when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torpor.cli.term import printable
from torpor.errors import UsageError

FORMAT_HELP = (
    "table (default), json, or a Go template: '{{.Name}}', '{{json .}}', "
    "'table {{.ID}}\\t{{.Name}}'."
)
_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)
_FIELD = re.compile(r"^(json\s+)?\.((?:[A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?$")


class LazyConsole:
    """A ``rich.console.Console`` built on first attribute access."""

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._console: Any = None

    @property
    def real(self) -> Any:
        """The rich console itself (for code that needs the object, not its methods)."""
        if self._console is None:
            from rich.console import Console

            # rich honours NO_COLOR itself; said explicitly so FORCE_COLOR cannot override it
            no_color = bool(os.environ.get("NO_COLOR"))
            self._console = Console(no_color=no_color or None, **self._kw)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    # dunders bypass __getattr__: rich's Progress and Live use the console as a context
    def __enter__(self) -> Any:
        return self.real.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)


def is_tty() -> bool:
    return sys.stdout.isatty()


def clip(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters on a terminal only (pipes get every byte)."""
    return text if not is_tty() or len(text) <= n else text[: n - 1] + "…"


def _lookup(row: Any, path: str, template: str) -> Any:
    v = row
    for part in path.split("."):
        if not isinstance(v, dict):
            raise UsageError(f"template {template!r}: .{path} is not a field")
        if part in v:
            v = v[part]
            continue
        folded = {k.lower(): k for k in v}
        if part.lower() not in folded:
            raise UsageError(
                f"template {template!r}: no field .{part} (fields: {', '.join(sorted(v))})"
            )
        v = v[folded[part.lower()]]
    return v


def _text(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def template(fmt: str) -> Callable[[Any], str]:
    """Compile a Go-template subset into ``row -> line`` (raises UsageError early)."""
    body = fmt.replace("\\t", "\t").replace("\\n", "\n")
    parts: list[tuple[bool, str, str]] = []  # (is_json, path or literal, kind)
    pos = 0
    for m in _ACTION.finditer(body):
        parts.append((False, body[pos : m.start()], "lit"))
        f = _FIELD.match(m.group(1))
        if not f:
            raise UsageError(
                f"template {fmt!r}: unsupported action {{{{{m.group(1)}}}}} "
                "(supported: {{.Field}}, {{.A.B}}, {{json .}}, {{json .Field}})"
            )
        parts.append((bool(f.group(1)), f.group(2) or "", "field"))
        pos = m.end()
    parts.append((False, body[pos:], "lit"))

    def render(row: Any) -> str:
        out = []
        for is_json, s, kind in parts:
            if kind == "lit":
                out.append(s)
                continue
            v = _lookup(row, s, fmt) if s else row
            # json output escapes control characters itself; text goes through printable
            out.append(json.dumps(v, default=str) if is_json else printable(_text(v)))
        return "".join(out)

    return render


def table_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns, three spaces apart (like ``docker ps``), never wrapped."""
    cells = [[printable(c) for c in header], *[[printable(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def emit(
    rows: Sequence[dict[str, Any]],
    fmt: str | None,
    columns: Sequence[tuple[str, str]],
) -> None:
    """Print ``rows`` as ``fmt``: ``table`` uses ``columns`` (HEADER, key) of each row."""
    fmt = fmt or "table"
    if fmt == "json":
        sys.stdout.write(json.dumps(list(rows), indent=2, default=str) + "\n")
        return
    if fmt == "table":
        sys.stdout.write(
            table_text([h for h, _ in columns], [[_cell(r[k]) for _, k in columns] for r in rows])
            + "\n"
        )
        return
    header = fmt.startswith("table ")
    body = fmt[len("table ") :] if header else fmt
    if "{{" not in body:
        raise UsageError(f"--format {fmt!r}: use table, json or a template like '{{{{.Name}}}}'")
    render = template(body)
    lines = [render(r) for r in rows]
    if header:  # the header of each column is its field name, upper-cased (like docker)
        names = [
            m.group(1).removeprefix("json").strip().lstrip(".").upper()
            for m in _ACTION.finditer(body)
        ]
        lines.insert(0, _ACTION.sub(lambda _m: names.pop(0), body.replace("\\t", "\t")))
    sys.stdout.write("".join(line + "\n" for line in lines))


def emit_one(obj: Any, fmt: str | None) -> None:
    """``inspect``: one object as JSON (default) or through a template."""
    if fmt in (None, "json"):
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        return
    if "{{" not in fmt:
        raise UsageError(f"--format {fmt!r}: use json or a template like '{{{{.Name}}}}'")
    sys.stdout.write(template(fmt)(obj) + "\n")


def _cell(v: Any) -> str:
    return "" if v is None else _text(v)

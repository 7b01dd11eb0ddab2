"""Text from VMs, images and users made safe for a terminal.

Names, tags, commands and error messages can carry bytes chosen by a guest, an
image or whoever typed them; an ``ESC ]`` or ``ESC [`` sequence printed raw can
retitle the terminal, hide lines or worse.  :func:`printable` replaces every
control character (C0, DEL, C1) with a visible ``\\xNN`` escape; :func:`markup_safe`
also escapes rich markup (``[bold]``) for text printed through a rich console.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with control characters shown as ``\\xNN`` (a backslash shown as itself)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def markup_safe(text: object) -> str:
    """:func:`printable`, and rich markup escaped: for ``Console.print`` with markup on."""
    from rich.markup import escape

    return escape(printable(text))

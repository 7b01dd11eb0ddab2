"""A session's conversation as a sequence that decodes only what is read.

:class:`MsgList` holds the messages a session's log folds to: first the *sealed
segments* of its state record (:mod:`torpor.session.record`), each decoded and checked
on first access, then a plain list of the messages folded after them.  It keeps the
number of user messages and the total content length as messages are appended, so
those are known without decoding anything.  :class:`SessionConversation` puts the
system prompt in front; it is the :class:`~torpor.model.types.Conversation` a session
hands a model with ``lazy_messages`` (the scripted model reads the tail only), so a
recovery of a 10,000-turn session does not decode 45 MB of conversation to answer.

Invariants:

- ``len``, :attr:`MsgList.users` and :attr:`MsgList.chars` equal what a walk over the
  decoded messages gives (the record stores them with the segments; a segment whose
  decoded count differs is refused).
- A segment is checked (BLAKE3 digest against the MAC'd head, message count) before any
  of its messages is returned; a failure raises
  :class:`~torpor.session.record.RecordRefused` at the access, and the session then
  reads its whole log instead (``Session._folded`` / ``_run_turn``).
- Messages are shared, never copied: callers must not mutate them.
- Thread-safe for reads: a background prefetch and the caller may decode the same
  segment; it is decoded once.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from torpor.model.types import Conversation

Message = dict[str, Any]


class Segment:
    """``n`` messages sealed in a state record, loaded by ``load()`` on first access
    (``load`` checks them and raises RecordRefused when they fail)."""

    __slots__ = ("_items", "_load", "_lock", "n")

    def __init__(self, n: int, load: Callable[[], list[Message]]):
        self.n = n
        self._load = load
        self._items: list[Message] | None = None
        self._lock = threading.Lock()

    def items(self) -> list[Message]:
        got = self._items
        if got is None:
            with self._lock:
                if self._items is None:
                    self._items = self._load()
                got = self._items
        return got


class MsgList:
    """The folded messages: sealed segments (lazy) then a list; appends go to the list."""

    __slots__ = ("_ends", "chars", "items", "segs", "users")

    def __init__(
        self,
        segs: Sequence[Segment] = (),
        items: list[Message] | None = None,
        *,
        users: int | None = None,
        chars: int | None = None,
    ):
        self.segs = tuple(segs)
        self.items: list[Message] = items if items is not None else []
        ends, n = [], 0
        for s in self.segs:
            n += s.n
            ends.append(n)
        self._ends = ends  # index just past each segment
        if users is None or chars is None:  # a plain list: count it
            assert not self.segs, "sealed segments need their counts"
            users = sum(1 for m in self.items if m.get("role") == "user")
            chars = sum(len(m.get("content") or "") for m in self.items)
        self.users, self.chars = users, chars

    @property
    def sealed(self) -> int:
        """How many messages the segments hold."""
        return self._ends[-1] if self._ends else 0

    def append(self, m: Message) -> None:
        self.items.append(m)
        if m.get("role") == "user":
            self.users += 1
        self.chars += len(m.get("content") or "")

    def copy(self) -> MsgList:
        return MsgList(self.segs, list(self.items), users=self.users, chars=self.chars)

    def __len__(self) -> int:
        return self.sealed + len(self.items)

    def at(self, i: int) -> Message:
        """Message ``i`` (0 <= i < len): decodes at most the segment holding it."""
        sealed = self.sealed
        if i >= sealed:
            return self.items[i - sealed]
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return self.segs[k].items()[i - start]

    def since(self, k: int) -> list[Message]:
        """The messages from index ``k`` on (only the segments that hold them decode)."""
        sealed = self.sealed
        if k >= sealed:
            return self.items[k - sealed :]
        return [self.at(i) for i in range(k, sealed)] + self.items

    def __iter__(self) -> Iterator[Message]:
        for s in self.segs:
            yield from s.items()
        yield from self.items

    def decode(self) -> None:
        """Decode (and check) every segment now, e.g. in a background thread."""
        for s in self.segs:
            s.items()


class SessionConversation(Conversation):
    """The system message followed by a :class:`MsgList` (a snapshot: the list is the
    caller's copy)."""

    def __init__(self, system: str, msgs: MsgList):
        self._system: Message = {"role": "system", "content": system}
        self._msgs = msgs

    @property
    def users(self) -> int:
        return self._msgs.users

    @property
    def chars(self) -> int:
        return len(self._system["content"]) + self._msgs.chars

    def __len__(self) -> int:
        return 1 + len(self._msgs)

    @overload
    def __getitem__(self, i: int) -> Message: ...

    @overload
    def __getitem__(self, i: slice) -> list[Message]: ...

    def __getitem__(self, i: int | slice) -> Message | list[Message]:
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("conversation index out of range")
        return self._system if i == 0 else self._msgs.at(i - 1)

    def __iter__(self) -> Iterator[Message]:
        yield self._system
        yield from self._msgs

    def to_list(self) -> list[Message]:
        return [self._system, *self._msgs]

    def __repr__(self) -> str:
        return f"<SessionConversation {len(self)} messages>"

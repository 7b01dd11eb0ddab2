"""SET_IDENTITY without a VM: the codec, the host's checks before sending, a hostile
agent's answers (over a socketpair: the test plays the guest), and the real C agent in
host mode (it validates like the host and never renames the host it runs on).

The request doing its job in a guest is tested on real VMs in
tests/snapshot/test_fork_identity.py."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from torpor.agent import AgentClient, AgentRequestError
from torpor.agent.protocol import (
    IDENTITY_REPLY_MAX,
    ErrorReply,
    Frame,
    FrameDecoder,
    IdentityReply,
    IdentityRequest,
    T,
    parse_mac,
)
from torpor.errors import AgentError, ProtocolError, UsageError

MAC = bytes.fromhex("525400aabbcc")
FIXTURES = Path(__file__).parent.parent / "fixtures" / "protocol"


def test_codec_round_trips_and_refuses_what_the_rules_refuse() -> None:
    req = IdentityRequest("fork-1", "eth0", MAC)
    assert IdentityRequest.decode(req.encode()) == req
    assert IdentityRequest.decode(IdentityRequest("a" * 64).encode()) == IdentityRequest("a" * 64)
    reply = IdentityReply("fork-1", MAC)
    assert IdentityReply.decode(reply.encode()) == reply
    assert parse_mac("52:54:00:AA:bb:cc") == MAC
    for bad in (
        IdentityRequest(""),
        IdentityRequest("a" * 65),
        IdentityRequest("-x"),
        IdentityRequest("a b"),
        IdentityRequest("a/b"),
        IdentityRequest("a\0b"),
        IdentityRequest("h\xe9"),
        IdentityRequest("h", "eth0"),  # an interface without a MAC
        IdentityRequest("h", "", MAC),  # a MAC without an interface
        IdentityRequest("h", "e" * 16, MAC),
        IdentityRequest("h", "eth0", MAC[:5]),
        IdentityRequest("h", "eth0", b"\x01" + MAC[1:]),  # multicast
        IdentityRequest("h", "eth0", bytes(6)),
    ):
        with pytest.raises(ProtocolError):
            bad.encode()
    # decode refuses the same, and leftovers
    raw = struct.pack("<I", 3) + b"a b" + struct.pack("<II", 0, 0)
    with pytest.raises(ProtocolError):
        IdentityRequest.decode(raw)
    with pytest.raises(ProtocolError):
        IdentityRequest.decode(IdentityRequest("h").encode() + b"\0")
    bad_macs = ("52:54:00:aa:bb", "52:54:00:aa:bb:cc:dd", "52-54-00-aa-bb-cc", "zz:54:00:aa:bb:cc")
    for text in bad_macs:
        with pytest.raises(ProtocolError):
            parse_mac(text)


class FakeGuest:
    """The other end of a socketpair, answering each request with ``answer(frame)``."""

    def __init__(self, answer: Callable[[Frame], list[Frame]]):
        self.ours, self.theirs = socket.socketpair()
        self.received: list[Frame] = []
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        dec = FrameDecoder()
        while data := self.theirs.recv(1 << 16):
            for frame in dec.feed(data):
                self.received.append(frame)
                for reply in self._answer(frame):
                    self.theirs.sendall(reply.encode())

    def close(self) -> None:
        self.theirs.close()
        self._thread.join(timeout=5)


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[Frame], list[Frame]]], AgentClient]]:
    made: list[tuple[FakeGuest, AgentClient]] = []

    def make(answer: Callable[[Frame], list[Frame]]) -> AgentClient:
        guest = FakeGuest(answer)
        client = AgentClient(guest.ours)
        made.append((guest, client))
        return client

    yield make
    for guest, client in made:
        client.close()
        guest.close()


def _ok(payload: bytes) -> Callable[[Frame], list[Frame]]:
    return lambda f: [Frame(T.OK, f.id, payload)]


def test_an_honest_answer_is_returned(fake) -> None:
    client = fake(_ok(IdentityReply("fork-1", MAC).encode()))
    assert client.set_identity("fork-1", "eth0", MAC, timeout=10) == IdentityReply("fork-1", MAC)


@pytest.mark.parametrize(
    "answer, match",
    [
        (_ok(b"\0" * (IDENTITY_REPLY_MAX + 1)), "at most"),  # oversized
        (_ok(b"\xff" * 1000), "at most"),
        (_ok(IdentityReply("fork-1", MAC).encode()[:-1]), "malformed"),  # truncated
        (_ok(IdentityReply("fork-1", MAC).encode() + b"\0"), "left over"),
        (_ok(b""), "malformed"),  # an old-style empty OK
        (_ok(IdentityReply("other", MAC).encode()), "asked for"),  # not what was asked
        (_ok(IdentityReply("fork-1", MAC[::-1]).encode()), "asked for"),
        (_ok(IdentityReply("fork-1").encode()), "asked for"),
        (lambda f: [Frame(T.FILEINFO, f.id, b"x" * 40)], "expected OK"),  # wrong type
        (lambda f: [Frame(T.EXIT, f.id, struct.pack("<iI", 0, 0))], "expected OK"),
    ],
)
def test_a_hostile_answer_is_a_clear_error(fake, answer, match) -> None:
    client = fake(answer)
    with pytest.raises(ProtocolError, match=match):
        client.set_identity("fork-1", "eth0", MAC, timeout=10)


def test_an_agent_that_never_answers_times_out(fake) -> None:
    client = fake(lambda f: [])
    with pytest.raises(AgentError, match="timed out waiting for the reply to SET_IDENTITY"):
        client.set_identity("fork-1", timeout=0.5)


def test_an_older_agent_answers_enosys(fake) -> None:
    client = fake(lambda f: [Frame(T.ERROR, f.id, ErrorReply(errno.ENOSYS, "unknown").encode())])
    with pytest.raises(AgentRequestError) as e:
        client.set_identity("fork-1", timeout=10)
    assert e.value.errno == errno.ENOSYS


@pytest.mark.parametrize(
    "hostname, ifname, mac",
    [("", "", b""), ("x" * 65, "", b""), ("a;reboot", "", b""), ("h", "eth0", b"\x01" * 6),
     ("h", "../x", MAC), ("h", "eth0", b"")],
)  # fmt: skip
def test_bad_identities_are_refused_before_sending(fake, hostname, ifname, mac) -> None:
    guest = FakeGuest(_ok(b""))
    client = AgentClient(guest.ours)
    try:
        with pytest.raises(UsageError):
            client.set_identity(hostname, ifname, mac, timeout=10)
        client.sync(timeout=10)  # a round trip: anything sent before it has arrived
        assert [f.type for f in guest.received] == [T.SYNC]
    finally:
        client.close()
        guest.close()


def test_host_mode_agent_validates_and_never_renames_the_host(raw_agent) -> None:
    before = socket.gethostname()
    good = IdentityRequest("fork-1", "eth0", MAC).encode()
    cases = [
        (1, good, errno.EPERM),  # valid, but host mode: the host keeps its name
        (2, struct.pack("<I", 3) + b"a b" + struct.pack("<II", 0, 0), errno.EINVAL),
        (3, struct.pack("<I", 65) + b"a" * 65 + struct.pack("<II", 0, 0), errno.EINVAL),
        (4, IdentityRequest("h").encode()[:-1], errno.EINVAL),  # truncated
        (5, IdentityRequest("h").encode() + b"\0", errno.EINVAL),  # left over
        (6, good[: -len(MAC) - 4] + struct.pack("<I", 6) + b"\x01" * 6, errno.EINVAL),  # multicast
        (7, good[: -len(MAC) - 4] + struct.pack("<I", 0), errno.EINVAL),  # ifname, no MAC
    ]
    for fid, payload, code in cases:
        raw_agent.send(Frame(T.SET_IDENTITY, fid, payload).encode())
        (reply,) = raw_agent.read_until(lambda f, fid=fid: f.id == fid)
        assert reply.type == T.ERROR, (fid, reply)
        assert ErrorReply.decode(reply.payload).errno == code, (fid, reply)
    # the golden frame (tests/fixtures/protocol), as the C agent reads it
    raw_agent.send((FIXTURES / "set_identity_id8.bin").read_bytes())
    (reply,) = raw_agent.read_until(lambda f: f.id == 8)
    assert (reply.type, ErrorReply.decode(reply.payload).errno) == (T.ERROR, errno.EPERM)
    assert socket.gethostname() == before

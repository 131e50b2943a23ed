"""The shared-key handshake (``auth=KEY``), sans-IO: a mutual HMAC-SHA256 challenge.

Modelled on ``multiprocessing.connection``'s ``deliver_challenge`` / ``answer_challenge``, made
mutual, with SHA-256, role-bound digests and the client's challenge sent in the same flight as
its answer (one round trip less). Each line below is one frame of the channel's framing
(length-prefixed by default), sent before any user message::

    server -> client   b"#PW1CHALLENGE#" + Ns          Ns: 32 random bytes
    client -> server   b"#PW1ANSWER#" + HMAC(K, b"procwire-auth-1 client" + Ns)
    client -> server   b"#PW1CHALLENGE#" + Nc          Nc: 32 random bytes
    server -> client   b"#PW1WELCOME#"                 or b"#PW1FAILURE#", then it closes
    server -> client   b"#PW1ANSWER#" + HMAC(K, b"procwire-auth-1 server" + Nc)
    client -> server   b"#PW1WELCOME#"                 or b"#PW1FAILURE#", then it closes

HMAC is HMAC-SHA256 (32-byte digests), compared with ``hmac.compare_digest``. The role label
in each digest means an answer one side gives can never be replayed as the other side's answer
(a reflection attack). The server answers nothing before the client has proven the key, so an
unauthenticated peer cannot use a server as an oracle. User messages may follow each side's
last frame at once; the I/O driver hands them back to the channel.

Every handshake frame is at most ``MAX_FRAME`` (256) bytes; a larger one, an unknown frame, or
a frame out of turn is a ``ProtocolError``. A wrong digest is an ``AuthenticationError`` on the
side that checked it (which also sends FAILURE), and on the side that receives FAILURE.

This module does no I/O and draws no randomness: the driver passes the nonce in. Usage::

    hs = Handshake("server", key, os.urandom(32))
    send(hs.initial())
    while not done:
        step = hs.receive(frame)       # frames to send, and maybe a Done / Failed event
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from .._errors import AuthenticationError, ProtocolError

__all__ = [
    "CHALLENGE",
    "MAX_FRAME",
    "NONCE_SIZE",
    "Done",
    "Failed",
    "Handshake",
    "State",
    "Step",
]

MAX_FRAME = 256
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size

CHALLENGE = b"#PW1CHALLENGE#"
ANSWER = b"#PW1ANSWER#"
WELCOME = b"#PW1WELCOME#"
FAILURE = b"#PW1FAILURE#"
_LABEL = b"procwire-auth-1 "

Role = Literal["client", "server"]


class State(Enum):
    """Where one side of the handshake stands."""

    AWAIT_CHALLENGE = "await challenge"  # client: nothing received yet
    AWAIT_ANSWER = "await answer"        # the side that challenged waits for the digest
    AWAIT_VERDICT = "await verdict"      # the side that answered waits for WELCOME / FAILURE
    AWAIT_CHALLENGE_BACK = "await challenge back"  # server: client proven, its challenge next
    DONE = "done"
    FAILED = "failed"


class Kind(Enum):
    CHALLENGE = "challenge"
    ANSWER = "answer"
    WELCOME = "welcome"
    FAILURE = "failure"


@dataclass(frozen=True)
class Done:
    """The handshake succeeded: both sides proved the key."""


@dataclass(frozen=True)
class Failed:
    """The handshake failed; ``error`` is what the driver raises (after sending ``Step.send``)."""

    error: AuthenticationError | ProtocolError


@dataclass
class Step:
    """What one received frame leads to: frames to send (in order), then maybe an event."""

    send: list[bytes] = field(default_factory=list)
    event: Done | Failed | None = None


_PREFIXES = ((CHALLENGE, Kind.CHALLENGE), (ANSWER, Kind.ANSWER), (WELCOME, Kind.WELCOME),
             (FAILURE, Kind.FAILURE))
_BODY_SIZE = {Kind.CHALLENGE: NONCE_SIZE, Kind.ANSWER: DIGEST_SIZE, Kind.WELCOME: 0,
              Kind.FAILURE: 0}


def parse(frame: bytes) -> tuple[Kind, bytes]:
    """Split a handshake frame into its kind and body; ProtocolError if it is none."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"handshake frame of {len(frame)} bytes (limit {MAX_FRAME}): "
                            "the peer is not speaking the procwire auth handshake")
    for prefix, kind in _PREFIXES:
        if frame.startswith(prefix):
            body = frame[len(prefix):]
            if len(body) != _BODY_SIZE[kind]:
                raise ProtocolError(f"malformed handshake {kind.value} frame "
                                    f"({len(frame)} bytes)")
            return kind, body
    raise ProtocolError("expected a procwire auth handshake frame: the peer sent something "
                        "else (is auth= set on both sides?)")


def digest(key: bytes, role: Role, nonce: bytes) -> bytes:
    """The answer ``role`` gives to the challenge ``nonce``."""
    return hmac.new(key, _LABEL + role.encode() + nonce, hashlib.sha256).digest()


Handler = Callable[["Handshake", bytes], Step]


class Handshake:
    """One side of the mutual challenge. Feed it frames with ``receive``; it never does I/O.

    ``role`` is ``"client"`` (the side that connected) or ``"server"``; ``nonce`` is 32 random
    bytes (``os.urandom(32)``) used as this side's challenge.
    """

    def __init__(self, role: Role, key: bytes, nonce: bytes) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not isinstance(key, bytes) or not key:
            raise ValueError("the auth key must be non-empty bytes")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self.role: Role = role
        self._key = key
        self._nonce = bytes(nonce)
        self._peer: Role = "client" if role == "server" else "server"
        self.state = State.AWAIT_ANSWER if role == "server" else State.AWAIT_CHALLENGE

    def initial(self) -> list[bytes]:
        """Frames to send as soon as the connection is up (the server's challenge)."""
        if self.role == "server" and self.state is State.AWAIT_ANSWER:
            return [CHALLENGE + self._nonce]
        return []

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def receive(self, frame: bytes) -> Step:
        """Process one frame from the peer. Never raises for bad input: it returns ``Failed``."""
        if self.state in (State.DONE, State.FAILED):
            raise RuntimeError(f"handshake already {self.state.value}")
        try:
            kind, body = parse(bytes(frame))
        except ProtocolError as exc:
            return self._fail(exc)
        handler = _TRANSITIONS.get((self.role, self.state, kind))
        if handler is None:
            return self._fail(ProtocolError(
                f"unexpected handshake {kind.value} frame while the {self.role} is in state "
                f"'{self.state.value}'"))
        return handler(self, body)

    # -- transition handlers (referenced only from _TRANSITIONS) ----------------------------
    def _fail(self, error: AuthenticationError | ProtocolError,
              send: list[bytes] | None = None) -> Step:
        self.state = State.FAILED
        return Step(send or [], Failed(error))

    def _answer_and_challenge(self, nonce: bytes) -> Step:
        # Client: answer the server, and challenge it in the same flight.
        self.state = State.AWAIT_VERDICT
        return Step([ANSWER + digest(self._key, self.role, nonce), CHALLENGE + self._nonce])

    def _check_answer(self, answer: bytes) -> Step:
        expected = digest(self._key, self._peer, self._nonce)
        if not hmac.compare_digest(answer, expected):
            return self._fail(AuthenticationError(
                f"the {self._peer} failed the auth challenge (different key)"), [FAILURE])
        if self.role == "server":
            self.state = State.AWAIT_CHALLENGE_BACK
        else:
            self.state = State.DONE
            return Step([WELCOME], Done())
        return Step([WELCOME])

    def _answer_back(self, nonce: bytes) -> Step:
        # Server: the client is proven; answer its challenge, then wait for its verdict.
        self.state = State.AWAIT_VERDICT
        return Step([ANSWER + digest(self._key, self.role, nonce)])

    def _welcomed(self, _body: bytes) -> Step:
        if self.role == "client":
            self.state = State.AWAIT_ANSWER
            return Step()
        self.state = State.DONE
        return Step([], Done())

    def _rejected(self, _body: bytes) -> Step:
        return self._fail(AuthenticationError(
            f"the {self._peer} rejected our answer to its auth challenge (different key)"))


# Every transition of both roles: (role, state, frame kind) -> handler. Anything not listed is a
# ProtocolError. FAILURE is accepted wherever a verdict can come.
_TRANSITIONS: dict[tuple[Role, State, Kind], Handler] = {
    ("client", State.AWAIT_CHALLENGE, Kind.CHALLENGE): Handshake._answer_and_challenge,
    ("client", State.AWAIT_VERDICT, Kind.WELCOME): Handshake._welcomed,
    ("client", State.AWAIT_VERDICT, Kind.FAILURE): Handshake._rejected,
    ("client", State.AWAIT_ANSWER, Kind.ANSWER): Handshake._check_answer,
    ("server", State.AWAIT_ANSWER, Kind.ANSWER): Handshake._check_answer,
    ("server", State.AWAIT_CHALLENGE_BACK, Kind.CHALLENGE): Handshake._answer_back,
    ("server", State.AWAIT_VERDICT, Kind.WELCOME): Handshake._welcomed,
    ("server", State.AWAIT_VERDICT, Kind.FAILURE): Handshake._rejected,
}

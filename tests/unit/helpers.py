"""Domain helpers for the socket-free unit tests: claims, a session driven by a fake clock,
tokens made with PyJWT (or forged by hand where PyJWT refuses), and reply assertions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson

from workers.auth import Claims, TokenVerifier, VerificationKey
from workers.errors import CloseReason, ReplyCode
from workers.protocol import Close, Forward, Join, Output, Send, Session, SessionLimits

SECRET = "s" * 32 + "-unit-test-secret"  # >= 32 bytes, like production
OTHER_SECRET = "o" * 32 + "-another-secret!"
START = 1_000.0  # the injected clock starts here (monotonic seconds, like loop.time())


# -- claims and sessions -----------------------------------------------------------------------
def make_claims(sub: str = "u1", *, channels: tuple[str, ...] = ("conversation:*",),
                publish: tuple[str, ...] = ("conversation:*",), exp: float = 2_000_000_000.0) -> Claims:
    return Claims(sub=sub, exp=exp, channels=tuple(channels), publish=tuple(publish))


class Clock:
    """The time handed to the session; tests move it, nothing sleeps."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def _payload(message: Any) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8", "surrogatepass")
    return orjson.dumps(message)


@dataclass
class Client:
    """A Session with its clock and the hub state, fed messages like the glue feeds it."""

    session: Session
    clock: Clock
    hub_up: bool = True
    log: list[list[Output]] = field(default_factory=list)

    def send(self, message: Any) -> list[Output]:
        outputs = self.session.handle(_payload(message), self.clock.now, lambda channel: self.hub_up)
        self.log.append(outputs)
        return outputs

    def subscribe(self, channel: str, id_: str | None = None) -> list[Output]:
        msg: dict[str, Any] = {"type": "subscribe", "data": {"channel": channel}}
        if id_ is not None:
            msg["id"] = id_
        return self.send(msg)

    def unsubscribe(self, channel: str, id_: str | None = None) -> list[Output]:
        msg: dict[str, Any] = {"type": "unsubscribe", "data": {"channel": channel}}
        if id_ is not None:
            msg["id"] = id_
        return self.send(msg)

    def publish(self, channel: str, type_: str = "chat_message", data: Any = None,
                id_: str | None = None) -> list[Output]:
        msg: dict[str, Any] = {"type": "publish",
                               "data": {"channel": channel, "type": type_, "data": {} if data is None else data}}
        if id_ is not None:
            msg["id"] = id_
        return self.send(msg)

    def ping(self, id_: str | None = None) -> list[Output]:
        return self.send({"type": "ping", "data": {}} if id_ is None else {"type": "ping", "id": id_, "data": {}})


def make_client(claims: Claims | None = None, limits: SessionLimits | None = None, *,
                clock: Clock | None = None, hub_up: bool = True, connection_id: str = "c-1") -> Client:
    clock = clock or Clock()
    session = Session(claims or make_claims(), connection_id, limits or SessionLimits(), clock.now)
    return Client(session, clock, hub_up)


# -- assertions on outputs -------------------------------------------------------------------------
def decode(payload: bytes) -> dict[str, Any]:
    message = json.loads(payload)  # stdlib: stricter about what a browser would get
    assert isinstance(message, dict), payload
    return message


def reply_payloads(outputs: list[Output]) -> list[bytes]:
    """The frames the client is told about now or on success: Send, Forward.ok. (A Join carries
    no reply: the glue builds `subscribed`/`connected` once it knows the channel's position.)"""
    payloads = []
    for out in outputs:
        if isinstance(out, Send):
            payloads.append(out.payload)
        elif isinstance(out, Forward):
            payloads.append(forward_reply(out))
    return payloads


def forward_reply(forward: Forward, offset: int = 1, epoch: bytes = b"3f2a9c0d1e5b7a88") -> bytes:
    """A Forward's success reply. Publishes are moving from a prebuilt `ok` to `published(offset,
    epoch)`, built once the hub stamped the event: accept either, so these tests hold on both sides."""
    published = getattr(forward, "published", None)
    return published(offset, epoch) if published is not None else forward.ok  # type: ignore[attr-defined]


def assert_reply(outputs: list[Output], type_: str, id_: str | None = None) -> dict[str, Any]:
    """Exactly one reply, of `type_`, echoing `id_` (no `id` key when None); returns its data."""
    payloads = reply_payloads(outputs)
    assert len(payloads) == 1, outputs
    message = decode(payloads[0])
    assert message["type"] == type_, message
    if id_ is None:
        assert "id" not in message, message
    else:
        assert message["id"] == id_, message
    assert isinstance(message["data"], dict), message
    return message["data"]


def assert_error_code(outputs: list[Output], code: ReplyCode, id_: str | None = None) -> dict[str, Any]:
    """Exactly one output, a Send of an `error` reply with `code`; returns its data."""
    assert len(outputs) == 1 and isinstance(outputs[0], Send), outputs
    data = assert_reply(outputs, "error", id_)
    assert data["code"] == code.value, data
    assert isinstance(data["message"], str) and data["message"], data
    return data


def assert_closed_with(outputs: list[Output], reason: CloseReason) -> Close:
    assert len(outputs) == 1 and isinstance(outputs[0], Close), outputs
    assert outputs[0].error.reason is reason, outputs[0].error.reason
    return outputs[0]


def assert_join(outputs: list[Output], channel: str, id_: str | None = None, *,
                since: tuple[int, bytes] | None = None, connect: bool = False, held: bool = False) -> Join:
    """Exactly one output, a Join of `channel` with these fields; returns it."""
    join = only(outputs, Join)
    assert (join.channel, join.request_id, join.since, join.connect, join.held) == (channel, id_, since, connect, held)
    return join


def only(outputs: list[Output], kind: type) -> Any:
    assert len(outputs) == 1 and isinstance(outputs[0], kind), outputs
    return outputs[0]


# -- tokens ----------------------------------------------------------------------------------------
def hs_verifier(**kwargs: Any) -> TokenVerifier:
    return TokenVerifier([VerificationKey(SECRET)], "HS256", **kwargs)


def claims_payload(now: float, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"sub": "u1", "iat": int(now), "exp": int(now) + 600,
                               "channels": ["conversation:*"], "publish": []}
    for name, value in overrides.items():
        if value is DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


DROP = object()  # claims_payload(now, exp=DROP) leaves the claim out


def make_token(now: float, key: Any = SECRET, algorithm: str = "HS256", headers: dict[str, Any] | None = None,
               **overrides: Any) -> str:
    return jwt.encode(claims_payload(now, **overrides), key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, for what PyJWT will not sign (alg none, a PEM used as an HMAC key)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"

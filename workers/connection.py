"""picows glue: RFC 6455 rules picows leaves to us, then feed -> carry out outputs -> flush.

picows parses frames but leaves these to the application: RSV bits must be 0 (we negotiate no
extension), text must be valid UTF-8, a continuation must follow an unfinished message, a
message spread over frames is capped as a whole, and a peer's close code must be valid.
`FramedConnection` enforces them once for every endpoint and hands whole messages to
`on_message`. Outbound frames never go through picows' send: the worker queues prebuilt frame
bytes per connection and writes each connection's queue once per loop pass (`LoopPassWriter`).
"""

from __future__ import annotations

import codecs
import logging
import socket
import struct
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from hub.envelope import ingress_record
from workers import errors
from workers.errors import CloseReason, Disconnect, ReplyCode, RequestError
from workers.protocol import Close, Forward, Join, Leave, Output, Refresh, Send, Session, error_reply

if TYPE_CHECKING:
    from workers.server import Worker

log = logging.getLogger("tidings.worker")

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE
PONG = WSMsgType.PONG
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and frees the buffers
CLOSE_HANDSHAKE_TIMEOUT = 2.0  # seconds we wait for the peer's close frame before dropping TCP
NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # shared, read-only


def frame_header(opcode: int, length: int) -> bytes:
    """An unmasked server frame header, FIN set."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    return frame_header(0x1, len(payload)) + payload


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("strict")


def shed_handshake(transport: WSTransport) -> None:
    """picows keeps the upgrade request and its response on the transport for the connection's
    whole life: the path (with the token) and both header multidicts, ~2.4 KiB a connection
    (measured on 10k idle connections). Nothing reads them once the connection is up."""
    request, response = transport.request, transport.response
    if request is not None:
        request.method = request.path = request.version = b""
        request.headers = NO_HEADERS
    if response is not None:
        response.headers = NO_HEADERS


def valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4: codes a peer may send (1004-1006 and 1015 are never on the wire)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FramedConnection(WSListener):
    """Frame-level rules shared by every endpoint; subclasses implement `on_message`."""

    __slots__ = (
        "close_code",
        "closed",
        "fragment_type",
        "fragments",
        "last_seen",
        "ping_sent_at",
        "raw",
        "transport",
        "utf8",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.transport: WSTransport | None = None
        self.raw = None  # the uvloop transport under picows: frames are written to it directly
        self.fragments: bytearray | None = None  # a message being reassembled
        self.fragment_type = TEXT
        self.utf8: codecs.IncrementalDecoder | None = None  # only while a text message is in pieces
        self.last_seen = 0.0
        self.ping_sent_at: float | None = None
        self.closed = False
        self.close_code = 1006  # what we record if the peer vanishes without a close frame

    # -- picows callbacks ---------------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport
        self.last_seen = self.worker.loop.time()
        shed_handshake(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closed or transport.is_close_frame_sent:
            # picows itself sent a close (an oversized frame: 1009) yet still hands us that
            # frame: never act on anything after a close.
            self.closed = True
            # Closing handshake: the peer's close frame ends it; anything else is read and dropped
            # (closing with unread input would reset the connection before the peer reads our code).
            if frame.msg_type is CLOSE:
                transport.disconnect(graceful=True)
            return
        self.last_seen = self.worker.loop.time()
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            return self.close(errors.PROTOCOL_ERROR)
        msg_type = frame.msg_type
        if msg_type is TEXT or msg_type is BINARY:
            if self.fragments is not None:
                return self.close(errors.PROTOCOL_ERROR)  # a new message inside an unfinished one
            if frame.fin:
                return self._message(msg_type, frame.get_payload_as_bytes())
            self.fragments = bytearray(frame.get_payload_as_memoryview())
            self.fragment_type = msg_type
            if msg_type is TEXT:
                # Check UTF-8 as the fragments arrive, so a bad message fails at its first bad frame.
                self.utf8 = _utf8_decoder()
                if not self._utf8_ok(self.fragments, final=False):
                    return self.close(errors.INVALID_PAYLOAD)
            return None
        if msg_type is CONTINUATION:
            if self.fragments is None:
                return self.close(errors.PROTOCOL_ERROR)
            if len(self.fragments) + frame.payload_size > self.worker.config.max_message_bytes:
                return self.close(errors.MESSAGE_TOO_BIG)
            chunk = frame.get_payload_as_bytes()
            self.fragments += chunk
            if self.utf8 is not None and not self._utf8_ok(chunk, final=frame.fin):
                return self.close(errors.INVALID_PAYLOAD)
            if frame.fin:
                payload, self.fragments, self.utf8 = bytes(self.fragments), None, None
                return self._message(self.fragment_type, payload)
            return None
        if msg_type is CLOSE:
            return self._peer_close(frame)
        if msg_type is PONG:
            self.ping_sent_at = None
        return None  # PING: picows answers it (enable_auto_pong)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.worker.connection_lost(self)

    # -- inbound ------------------------------------------------------------------------------------
    def _utf8_ok(self, chunk: bytes | bytearray, final: bool) -> bool:
        assert self.utf8 is not None
        try:
            self.utf8.decode(chunk, final)
            return True
        except UnicodeDecodeError:
            return False

    def _message(self, msg_type: WSMsgType, payload: bytes) -> None:
        if msg_type is TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                return self.close(errors.INVALID_PAYLOAD)
        try:
            self.on_message(msg_type, payload)
        except Exception:
            # A bug, not the client's fault: log it, tell the client, keep the connection.
            log.exception("internal error handling a message on %s", self.describe())
            self.worker.stats.commands[("unknown", "error")] += 1
            self.send(error_reply(RequestError(ReplyCode.INTERNAL_ERROR, "internal error")))
        return None

    def on_message(self, msg_type: WSMsgType, payload: bytes) -> None:
        raise NotImplementedError

    def _peer_close(self, frame: WSFrame) -> None:
        size = frame.payload_size
        if size == 0:
            code, reason = 1000, b""
        elif size == 1:
            return self.close(errors.PROTOCOL_ERROR)
        else:
            code = int(frame.get_close_code())
            reason = frame.get_close_message() or b""  # None when the frame carries a code only
            if not valid_close_code(code):
                return self.close(errors.PROTOCOL_ERROR)
            try:
                reason.decode()
            except UnicodeDecodeError:
                return self.close(errors.INVALID_PAYLOAD)
        self.close(CloseReason(code, ""), echo=True)  # echo the peer's code (RFC 6455 §5.5.1)
        return None

    # -- outbound -----------------------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        """Queue one text frame; it leaves with everything else queued in this loop pass."""
        if not self.closed:
            self.worker.writer.frame(self, text_frame(payload))

    def close(self, reason: CloseReason, reply: bytes | None = None, echo: bool = False) -> None:
        """Flush what is queued, send `reply`, then the close frame (or abort), and disconnect."""
        if self.closed or self.transport is None:
            return
        writer = self.worker.writer
        if not reason.graceful:
            writer.drop(self)  # an aborted peer gets nothing more
        else:
            if reply is not None:
                writer.frame(self, text_frame(reply))
            writer.flush_one(self)
        self.closed = True
        self.close_code = reason.code
        if not reason.graceful:
            # Abort with a TCP reset: a plain close would leave the kernel holding the unsent
            # bytes of a reader that never reads (measured: ~1.5 GiB for 500 stalled readers).
            sock = self.raw.get_extra_info("socket") if self.raw is not None else None
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
            self.transport.disconnect(graceful=False)
            return
        self.transport.send_close(WSCloseCode(reason.code), reason.reason.encode())
        if echo:
            self.transport.disconnect(graceful=True)  # the peer closed first: handshake done
        else:
            self.worker.loop.call_later(CLOSE_HANDSHAKE_TIMEOUT, self.transport.disconnect, False)

    def send_ping(self, now: float) -> None:
        if self.transport is not None and not self.closed:
            self.worker.writer.flush_one(self)
            self.transport.send_ping()
            self.ping_sent_at = now

    def describe(self) -> str:
        return "connection"


class ClientConnection(FramedConnection):
    """/ws: the tidings protocol, driven through a sans-I/O `Session`."""

    __slots__ = ("session",)

    def __init__(self, worker: Worker, session: Session) -> None:
        super().__init__(worker)
        self.session = session

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        refusal = self.worker.connection_made(self)
        if refusal is not None:
            return self.close(refusal)
        self.carry_out(self.session.open())
        return None

    def on_message(self, msg_type: WSMsgType, payload: bytes) -> None:
        stats = self.worker.stats
        if msg_type is not TEXT:
            stats.commands[("binary", "error")] += 1
            return self.send(error_reply(RequestError(
                ReplyCode.INVALID_REQUEST, "binary frames are not part of the protocol; send JSON text")))
        session = self.session
        outputs = session.handle(payload, self.last_seen, self.worker.hub_up_for)
        result = self.carry_out(outputs, session.last_result)
        if result == "rate_limited":
            stats.rate_limited += 1
        if result != "queued":  # a queued publish is counted when the hub answers it
            stats.commands[(session.last_type, result)] += 1
        return None

    def carry_out(self, outputs: list[Output], result: str = "ok") -> str:
        """Do what the session decided; returns `result`, or "queued" for a publish whose reply
        waits for the hub (see LoopPassWriter)."""
        worker = self.worker
        for out in outputs:
            kind = type(out)
            if kind is Send:  # most commands: one reply, nothing else
                self.send(out.payload)
            elif kind is Forward:
                if not self.closed:
                    worker.writer.publish(self, ingress_record(out.topic, out.body), out)
                result = "queued"
            elif kind is Join:
                worker.join(self, out, self.last_seen)  # answered now, or once the hub sent the position
            elif kind is Leave:
                worker.leave(self, out.channel, self.last_seen)  # answers a join of it still waiting first
            elif kind is Refresh:
                self.carry_out(worker.refresh(self, out))
                result = self.session.last_result  # the verdict came after `result` was read
            elif kind is Close:
                self._close_for(out.error)
        return result

    def _close_for(self, error: Disconnect) -> None:
        reply = error_reply(error.reply) if error.reply is not None else None
        log.warning("closing %s: %s", self.describe(), error.reason.reason)
        self.close(error.reason, reply)

    def describe(self) -> str:
        return f"{self.session.connection_id} (sub {self.session.claims.sub})"


class RejectedConnection(FramedConnection):
    """A bad token: the upgrade completes so the client can read why, then 4001/4002."""

    __slots__ = ("reason", "reply")

    def __init__(self, worker: Worker, reason: CloseReason, reply: bytes) -> None:
        super().__init__(worker)
        self.reason = reason
        self.reply = reply

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        self.close(self.reason, self.reply)

    def on_message(self, msg_type: WSMsgType, payload: bytes) -> None:
        return None

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True  # never counted as a connection


class EchoConnection(FramedConnection):
    """/echo (TIDINGS_CONFORMANCE_ECHO=1 only): the same frame layer, each message sent back."""

    __slots__ = ()

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        self.worker.echo_connections.add(self)

    def on_message(self, msg_type: WSMsgType, payload: bytes) -> None:
        opcode = 0x1 if msg_type is TEXT else 0x2
        self.worker.writer.frame(self, frame_header(opcode, len(payload)) + payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.worker.echo_connections.discard(self)

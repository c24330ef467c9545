"""A small synchronous WebSocket test client (websocket-client) with protocol helpers."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import websocket
from websocket import ABNF

TIMEOUT = 5.0  # generous for a loaded 2-core CI box; tests never assert on speed


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason!r}")
        self.code = code
        self.reason = reason


class Client:
    def __init__(self, url: str, headers: list[str] | None = None, timeout: float = TIMEOUT,
                 origin: str | None = None) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout, header=headers or [], origin=origin,
                                              suppress_origin=origin is None,
                                              skip_utf8_validation=True, enable_multithread=False)
        self.ws.settimeout(timeout)
        self.backlog: list[dict[str, Any]] = []  # messages `request` read past while awaiting a reply

    # -- receiving ----------------------------------------------------------------------------------
    def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        self.ws.settimeout(timeout)
        opcode, frame = self.ws.recv_data_frame(control_frame=True)
        return opcode, frame.data if frame is not None else b""

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Next JSON message; raises Closed if the server closed instead."""
        if self.backlog:
            return self.backlog.pop(0)
        while True:
            opcode, data = self.recv_frame(timeout)
            if opcode == ABNF.OPCODE_TEXT:
                msg: dict[str, Any] = orjson.loads(data)
                return msg
            if opcode == ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                raise Closed(code, data[2:].decode(errors="replace"))
            # pings are answered by websocket-client; pongs are ignored

    def recv_type(self, type_: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = self.recv(timeout)
        assert msg["type"] == type_, msg
        return msg

    def expect_close(self, timeout: float = TIMEOUT) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the close frame; returns its code and the messages before it."""
        before: list[dict[str, Any]] = []
        try:
            while True:
                before.append(self.recv(timeout))
        except Closed as closed:
            return closed.code, before
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None, before

    def nothing(self, wait: float = 0.3) -> None:
        """Assert no message arrives within `wait` seconds."""
        try:
            msg = self.recv(wait)
        except (websocket.WebSocketTimeoutException, TimeoutError):
            return
        raise AssertionError(f"unexpected message {msg}")

    # -- sending ------------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any] | str | bytes) -> None:
        if isinstance(msg, dict):
            self.ws.send(orjson.dumps(msg).decode())
        elif isinstance(msg, bytes):
            self.ws.send_frame(ABNF.create_frame(msg, ABNF.OPCODE_TEXT))
        else:
            self.ws.send(msg)

    def request(self, type_: str, data: dict[str, Any] | None = None, id_: str = "r") -> dict[str, Any]:
        """Send a command and return its reply; events arriving first stay queued for `recv`."""
        self.send({"type": type_, "id": id_, "data": data or {}})
        skipped: list[dict[str, Any]] = []
        while True:
            msg = self.recv()
            if msg.get("id") == id_ or msg["type"] == "error":
                self.backlog[:0] = skipped
                return msg
            skipped.append(msg)

    def subscribe(self, channel: str) -> dict[str, Any]:
        return self.request("subscribe", {"channel": channel}, id_="sub-" + channel)

    def unsubscribe(self, channel: str) -> dict[str, Any]:
        return self.request("unsubscribe", {"channel": channel}, id_="unsub-" + channel)

    def send_raw_frame(self, frame: ABNF) -> None:
        self.ws.send_frame(frame)

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:
            self.ws.shutdown()


def connect(url: str, **kw: Any) -> tuple[Client, dict[str, Any]]:
    """Connect and read the `connected` message."""
    client = Client(url, **kw)
    hello = client.recv()
    assert hello["type"] == "connected", hello
    return client, hello

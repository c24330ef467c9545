"""The naive baseline: one picows process, `for t in subscribers: t.send(...)`.

It speaks the tidings client protocol (connected on connect; subscribe, unsubscribe, ping
and publish with their replies; events with offset/epoch/timestamp) but does nothing else:
no hub, no token check, no authorisation, no slow-consumer policy, default picows settings
(16 KiB read buffer). Every bench run measures tidings against it on the same machine, in
the same run, so a ratio means something even on a noisy shared box.

    python -m loadtest.bench.baseline --host 127.0.0.1 --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

READY_LINE = "baseline is ready"


def _iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Broadcaster:
    """Channel name -> set of transports, plus the per-channel offset counter."""

    def __init__(self) -> None:
        self.channels: dict[str, set[WSTransport]] = {}
        self.offsets: dict[str, int] = {}
        self.epoch = os.urandom(6).hex()
        self.next_id = 0

    def publish(self, channel: str, type_: str, data: Any) -> None:
        offset = self.offsets.get(channel, 0) + 1
        self.offsets[channel] = offset
        frame = orjson.dumps({
            "type": type_, "channel": channel, "data": data, "offset": offset,
            "epoch": self.epoch, "timestamp": _iso_now(),
        })
        # the naive loop the issue measures: one send (one write) per subscriber
        for t in self.channels.get(channel, ()):
            t.send(WSMsgType.TEXT, frame)


class Conn(WSListener):
    def __init__(self, hub: Broadcaster) -> None:
        self.hub = hub
        self.subs: set[str] = set()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.hub.next_id += 1
        transport.send(WSMsgType.TEXT, orjson.dumps({
            "type": "connected",
            "data": {"user_id": "anonymous", "connection_id": str(self.hub.next_id), "expires_at": 0},
        }))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = orjson.loads(frame.get_payload_as_memoryview())
        kind = msg.get("type")
        data = msg.get("data") or {}
        reply: dict[str, Any]
        if kind == "ping":
            reply = {"type": "pong", "data": {}}
        elif kind == "subscribe":
            channel = data["channel"]
            self.hub.channels.setdefault(channel, set()).add(transport)
            self.subs.add(channel)
            reply = {"type": "subscribed", "data": {"channel": channel}}
        elif kind == "unsubscribe":
            channel = data["channel"]
            self.hub.channels.get(channel, set()).discard(transport)
            self.subs.discard(channel)
            reply = {"type": "unsubscribed", "data": {"channel": channel}}
        elif kind == "publish":
            self.hub.publish(data["channel"], data["type"], data.get("data"))
            reply = {"type": "published", "data": {"channel": data["channel"]}}
        else:
            reply = {"type": "error", "data": {"code": "invalid_request", "message": "unknown type"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        transport.send(WSMsgType.TEXT, orjson.dumps(reply))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for channel in self.subs:
            self.hub.channels.get(channel, set()).discard(transport)


async def serve(host: str, port: int) -> None:
    hub = Broadcaster()

    def factory(request: WSUpgradeRequest) -> WSListener | None:
        return Conn(hub) if request.path.startswith(b"/ws") else None

    server = await ws_create_server(factory, host, port, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY_LINE} on ws://{host}:{port}/ws", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args(argv)
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

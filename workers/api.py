"""The HTTP side of a worker (aiohttp, SO_REUSEPORT on the API port): publish, metrics, health.

POST /api/publish   {"channel", "type", "data"}          -> 200 {"ok": true, "channels": 1}
POST /api/broadcast {"channels": [...], "type", "data"}  -> 200 {"ok": true, "channels": N}
GET  /metrics       Prometheus text, summed over every tidings process
GET  /healthz       200 {"ok": true, "ready": ...} while this worker serves

It lives in the workers so the hub stays a lean forwarding loop and the API scales with the
worker count; events go to the hub through the worker's PUSH socket, the same way a client
publish does.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from hub.envelope import EnvelopeError, encode_event, ingress_record
from tidings.metrics import render_metrics

if TYPE_CHECKING:
    from workers.server import Worker

MAX_BODY_BYTES = 1 << 20  # a broadcast to many channels with a 64 KiB payload still fits
MAX_BROADCAST_CHANNELS = 1000


class BadRequest(Exception):
    pass


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class PublishAPI:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_post("/api/publish", self.publish)
        self.app.router.add_post("/api/broadcast", self.broadcast)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_port=True, backlog=1024)
        await site.start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    # -- handlers ------------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.worker.config.api_key}"
        return hmac.compare_digest(given.encode(), expected.encode())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    async def publish(self, request: web.Request) -> web.Response:
        return await self._handle(request, broadcast=False)

    async def broadcast(self, request: web.Request) -> web.Response:
        return await self._handle(request, broadcast=True)

    async def _handle(self, request: web.Request, broadcast: bool) -> web.Response:
        if not self._authorized(request):
            self.worker.stats.auth_failures["api_key"] += 1
            return _json(401, {"ok": False, "error": "unauthorized", "message": "bad or missing API key"})
        try:
            body = await self._body(request)
            if broadcast:
                channels = body.get("channels")
                if not isinstance(channels, list) or not channels or len(channels) > MAX_BROADCAST_CHANNELS:
                    raise BadRequest(f"channels must be a list of 1 to {MAX_BROADCAST_CHANNELS} channels")
            else:
                channels = [body.get("channel")]
            if not all(isinstance(ch, str) for ch in channels):
                raise BadRequest("channel must be a non-empty string")
            encoded = [encode_event(ch, body.get("type"), body.get("data")) for ch in dict.fromkeys(channels)]
        except (BadRequest, EnvelopeError) as exc:
            return _json(400, {"ok": False, "error": "invalid_request", "message": str(exc)})
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"ok": False, "error": "invalid_request", "message": "body too large"})
        if not self.worker.hub_up:
            return _json(503, {"ok": False, "error": "hub_unavailable", "message": "hub is not connected"})
        # one message: the hub takes every channel of a broadcast or none of them
        if not self.worker.bus.push_message(b"".join(ingress_record(t, b) for t, b in encoded)):
            self.worker.stats.publishes_failed += len(encoded)
            return _json(503, {"ok": False, "error": "hub_unavailable", "published": 0,
                               "message": "hub did not take the event"})
        sent = len(encoded)
        return _json(200, {"ok": True, "channels": sent})

    async def metrics(self, request: web.Request) -> web.Response:
        self.worker.exporter.flush()  # this worker's freshest numbers; the others flush each second
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, render_metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.worker.ready and not self.worker.stopping
        return _json(200 if ready else 503, {"ok": ready, "ready": ready, "worker": self.worker.index,
                                             "hub": self.worker.hub_up})


"""The HTTP side of a worker (aiohttp, SO_REUSEPORT on the API port): publish, metrics, health.

POST /api/publish   {"channel", "type", "data"}
                    -> 200 {"ok": true, "channels": 1, "channel", "offset", "epoch"} once the hub stamped it
POST /api/broadcast {"channels": [...], "type", "data"}
                    -> 200 {"ok": true, "channels": N, "positions": [{"channel", "offset", "epoch"}, ...]}
     either with "confirm": false -> 200 {"ok": true, "channels": N, "confirmed": false} as soon as the
                    hub's socket took it: at most once, for backends that prefer speed to an answer
GET  /api/history?channel=C[&since=OFFSET&epoch=E][&limit=N]
                    -> 200 {"ok": true, "channel", "offset", "epoch", "covered", "events": [...]}
GET  /metrics       Prometheus text, summed over every tidings process
GET  /healthz       200 {"ok": true, "ready": ...} while this worker serves

Errors: 400 invalid_request, 401 unauthorized, 503 hub_unavailable (the hub did not take or answer:
the event was not published, or for a confirmed publish that timed out, may have been).

With several hub shards a broadcast goes to each channel's shard: each shard takes its part whole
or not at all, and a 503 lists the channels that did get published (`positions`) beside the ones
that did not (`failed`), so a retry can skip the former.

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

from hub.envelope import (
    HISTORY_REQUEST,
    EnvelopeError,
    check_channel,
    encode_event,
    ingress_record,
    split_egress,
)
from hub.shards import split_by_shard
from tidings.metrics import render_metrics

if TYPE_CHECKING:
    from workers.bus import HubBus
    from workers.server import Worker

MAX_BODY_BYTES = 1 << 20  # a broadcast to many channels with a 64 KiB payload still fits
MAX_BROADCAST_CHANNELS = 1000
DEFAULT_HISTORY_LIMIT = 100  # events a history read returns unless asked for more
MAX_HISTORY_LIMIT = 10_000  # the hub's own cap on one read


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
        self.app.router.add_get("/api/history", self.history)
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
        confirm = body.get("confirm", True)
        if not isinstance(confirm, bool):
            return _json(400, {"ok": False, "error": "invalid_request", "message": "confirm must be true or false"})
        names = list(dict.fromkeys(channels))
        hubs = self.worker.hubs
        groups = split_by_shard(zip((t for t, _ in encoded), zip(names, encoded, strict=True), strict=True),
                                hubs.count)
        if not confirm:
            taken = 0
            for shard, group in groups.items():
                # one message per shard: the shard takes all of its channels of a broadcast or none
                if hubs.buses[shard].connected and hubs.buses[shard].push_message(
                        b"".join(ingress_record(t, b) for _, (_, (t, b)) in group)):
                    taken += len(group)
            if taken < len(encoded):
                self.worker.stats.publishes_failed += len(encoded) - taken
                return _json(503, {"ok": False, "error": "hub_unavailable", "published": taken,
                                   "message": "hub did not take the event" if len(encoded) == 1 else
                                   f"hub shards took {taken} of {len(encoded)} channels"})
            return _json(200, {"ok": True, "channels": len(encoded), "confirmed": False})
        shards = list(groups)
        answers = await asyncio.gather(*(self._ask(
            hubs.buses[shard], b"".join(ingress_record(t, b) for _, (_, (t, b)) in groups[shard]))
            for shard in shards))
        stamped: dict[str, dict[str, Any]] = {}
        unanswered = False
        for shard, (asked, frames) in zip(shards, answers, strict=True):
            header = orjson.loads(frames[0]) if frames else {}
            positions = header.get("positions")
            group = groups[shard]
            if header.get("ok") and isinstance(positions, list) and len(positions) == len(group):
                for (_, (name, _)), (offset, epoch) in zip(group, positions, strict=True):
                    stamped[name] = {"channel": name, "offset": offset, "epoch": epoch}
            elif asked and frames is None:
                unanswered = True  # sent, unanswered: claim nothing about it
        if len(stamped) < len(names):
            failed = [n for n in names if n not in stamped]
            self.worker.stats.publishes_failed += len(failed)
            body: dict[str, Any] = {"ok": False, "error": "hub_unavailable", "published": len(stamped),
                                    "message": "hub did not answer in time: the event may or may not have been "
                                    "published" if unanswered else "hub did not take the event"}
            if broadcast:
                body["positions"] = [stamped[n] for n in names if n in stamped]
                body["failed"] = failed
            return _json(503, body)
        if broadcast:
            return _json(200, {"ok": True, "channels": len(names), "positions": [stamped[n] for n in names]})
        return _json(200, {"ok": True, "channels": 1, **stamped[names[0]]})

    async def _ask(self, bus: HubBus, records: bytes | None, history: bytes = b"",
                   channel: str = "") -> tuple[bool, list[bytes] | None]:
        """Confirmed ingress `records` for `bus`'s shard, or a `history` read of `channel`: (sent,
        the hub's answer frames, or None when it could not go or timed out)."""
        future: asyncio.Future[list[bytes] | None] = asyncio.get_running_loop().create_future()

        def answer(frames: list[bytes] | None) -> None:
            if not future.done():
                future.set_result(frames)

        if records is not None:
            sent = self.worker.publish_confirmed(bus, records, answer)
        else:
            sent = self.worker.request(channel, HISTORY_REQUEST, history, answer) is not None
        if not sent:
            return False, None
        return True, await future

    async def history(self, request: web.Request) -> web.Response:
        """A channel's kept events after a position (or the last `limit`), and where it stands."""
        if not self._authorized(request):
            self.worker.stats.auth_failures["api_key"] += 1
            return _json(401, {"ok": False, "error": "unauthorized", "message": "bad or missing API key"})
        query = request.rel_url.query
        try:
            channel = check_channel(query.get("channel"))
            limit = int(query.get("limit", DEFAULT_HISTORY_LIMIT))
            if not 0 <= limit <= MAX_HISTORY_LIMIT:
                raise ValueError(f"limit must be 0 to {MAX_HISTORY_LIMIT}")
            since: dict[str, Any] | None = None
            if "since" in query or "epoch" in query:
                if "since" not in query or "epoch" not in query:
                    raise ValueError("since and epoch go together: the position the client last had")
                since = {"offset": int(query["since"]), "epoch": query["epoch"]}
                if since["offset"] < 0:
                    raise ValueError("since must be an offset >= 0")
        except (EnvelopeError, ValueError) as exc:
            return _json(400, {"ok": False, "error": "invalid_request", "message": str(exc)})
        _, frames = await self._ask(self.worker.hubs.for_channel(channel), None,
                                    orjson.dumps({"channel": channel, "since": since, "limit": limit}), channel)
        header = orjson.loads(frames[0]) if frames else {}
        if not header.get("ok"):
            return _json(503, {"ok": False, "error": "hub_unavailable",
                               "message": header.get("error", "hub did not answer")})
        events = [orjson.Fragment(split_egress(m)[4]) for m in frames[1:]]  # type: ignore[index]
        return _json(200, {"ok": True, "channel": channel, "offset": header["offset"], "epoch": header["epoch"],
                           "covered": header["covered"], "events": events})

    async def metrics(self, request: web.Request) -> web.Response:
        self.worker.exporter.flush()  # this worker's freshest numbers; the others flush each second
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, render_metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.worker.ready and not self.worker.stopping
        return _json(200 if ready else 503, {"ok": ready, "ready": ready, "worker": self.worker.index,
                                             "hub": self.worker.hub_up,
                                             "hubs_down": self.worker.hubs.down})


"""A worker process: picows listener + hub bus + HTTP API, with an ordered lifecycle.

startup  -> bind the WebSocket port (SO_REUSEPORT) and the API port, connect to the hub
serve    -> one housekeeping tick a second (expiry, idle pings, hub releases, metrics, watchdog)
shutdown -> SIGTERM: stop accepting, close clients with 1001 spread over the drain window,
            abort what is left, exit 0.  SIGHUP: reload keys and origins.

The fan-out path: `on_hub_messages` turns each event into frame bytes once and queues the same
bytes for every local subscriber; the `LoopPassWriter` writes each connection's queue in one write.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import resource
import secrets
import signal
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from picows import (
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from hub.envelope import (
    ANSWERED,
    HISTORY_REQUEST,
    REQUEST_ID,
    TOPIC_END,
    confirmed_ingress,
    reply_topic_for,
    split_answer,
    split_egress,
)
from hub.shards import split_by_shard
from tidings.config import Config, ConfigError
from tidings.links import keys_for, warn_if_insecure
from tidings.logs import RateLimitedLog
from tidings.metrics import Stats, StatsExporter, mark_process_dead
from tidings.sdnotify import Notifier
from workers import errors
from workers.api import PublishAPI
from workers.auth import AuthFailure, Claims, TokenVerifier
from workers.bus import REDIAL_AFTER_REFUSAL_SECONDS, HubBus, HubShards
from workers.channels import Channel, ChannelRegistry, PendingJoin
from workers.connection import ClientConnection, EchoConnection, FramedConnection, RejectedConnection, text_frame
from workers.errors import CloseReason, ReplyCode, RequestError
from workers.expiry import ExpiryQueue
from workers.protocol import (
    INSUFFICIENT_STATE,
    Forward,
    Join,
    Output,
    Refresh,
    Session,
    SessionLimits,
    error_reply,
    parse_connect_since,
    subscribed_reply,
    unsubscribed_reply,
)
from workers.recovery import ChannelRecovery, Outcome, Waiter, WaiterKind
from workers.writer import LoopPassWriter

TICK_SECONDS = 1.0  # housekeeping period: expiry precision and metrics freshness
# A worker is ready once it is linked to every hub shard, or this long after it listens with some
# still away (a shard down must not keep a restarted worker from serving the others' channels,
# nor make systemd's start timeout kill it in a loop).
READY_WITHOUT_EVERY_HUB_SECONDS = 10.0
READ_RETRY_SECONDS = 0.02  # a history read that could not leave yet is tried again after this
REFUSAL_LOG_SECONDS = 30.0  # a refused hub link is retried every few seconds: say so once in a while
IDLE_SWEEP_SECONDS = 5.0  # how often every connection's idle time is looked at
READ_BUFFER_BYTES = 1024  # picows allocates max(this, 2048) per connection up front (2.3.1); it grows for big frames
FD_WARN_FRACTION = 0.9  # warn when connections reach this share of RLIMIT_NOFILE
FD_RESERVED = 100  # descriptors a worker needs besides its connections (listeners, ZeroMQ, logs)
FD_WARN_EVERY = 10.0  # seconds between those warnings: the condition lasts, the log must not flood
CLIENTS_JS = Path(__file__).resolve().parent.parent / "clients" / "js"
DEMO_FILES = {  # path -> (file in clients/js, content type), served when TIDINGS_DEMO=1
    "/demo": ("", ""),  # redirected to /demo/, so the page's `./tidings.js` resolves under /demo/
    "/demo/": ("demo.html", "text/html; charset=utf-8"),
    "/demo/tidings.js": ("tidings.js", "text/javascript; charset=utf-8"),
}


class Worker:
    def __init__(self, config: Config, index: int, log: logging.Logger, notifier: Notifier, stats: Stats) -> None:
        self.config = config
        self.index = index
        self.log = log
        self.notifier = notifier
        self.stats = stats
        self.verifier = TokenVerifier.from_config(config)
        self.limits = SessionLimits.from_config(config)
        self.loop = asyncio.get_running_loop()
        self.hub_keys = keys_for(config)
        self.hubs = HubShards(config, self.hub_keys, self.on_hub_messages, self.on_hub_state, self.on_hub_reply)
        for bus in self.hubs.buses:
            bus.refused = self.on_hub_refused
            bus.events_lost = self.on_hub_events_lost
        self.refusal_log = RateLimitedLog(log, REFUSAL_LOG_SECONDS)
        self.channels = ChannelRegistry(self.hubs.subscribe, self.hubs.unsubscribe)
        self.connections: dict[ClientConnection, None] = {}
        self.echo_connections: set[EchoConnection] = set()
        self.per_user: Counter[str] = Counter()
        self.expiry = ExpiryQueue()
        self.ids = itertools.count(1)
        self.request_ids = itertools.count(1)
        # Requests to the hub's ROUTER awaiting an answer: id -> (deadline, what to do with the
        # reply frames after op and id, or None when the hub did not answer in time).
        self.requests: dict[bytes, tuple[float, Callable[[list[bytes] | None], None]]] = {}
        self.boot = secrets.token_hex(2)
        # The hub answers this worker's confirmed publishes on this topic of its XPUB.
        self.reply_topic = reply_topic_for(f"worker-{index}-{os.getpid()}-{self.boot}")
        self.writer = LoopPassWriter(self.loop, self.push_publishes, config.max_pending_bytes, self.drop_slow)
        self.ready = False
        self.stopping = False
        self.stopped = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.api: PublishAPI | None = None
        self.gap_log = RateLimitedLog(log)
        self.heal_log = RateLimitedLog(log)  # its own: right after a "missed" line, it must still show
        self.exporter = StatsExporter(stats)  # before the API starts: /metrics flushes it
        # uvloop (libuv) rides out EMFILE on accept without spinning or logging; we say it once in a while.
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_warn_at = min(int(self.fd_limit * FD_WARN_FRACTION), self.fd_limit - FD_RESERVED)
        self.fd_log = RateLimitedLog(log, FD_WARN_EVERY)
        self.next_idle_sweep = 0.0
        self.listening = False  # set once the WebSocket and API ports both accept
        self.finishing = False
        self.drain_deadline: asyncio.TimerHandle | None = None

    # == lifecycle =============================================================================
    async def start(self) -> None:
        warn_if_insecure(self.config, self.log)
        self.hubs.start(self.loop)
        self.hubs.subscribe_everywhere(self.reply_topic)
        self.server = await ws_create_server(
            self.listener_factory, self.config.host, self.config.port,
            reuse_port=True, backlog=self.config.backlog,
            websocket_handshake_timeout=self.config.handshake_timeout,
            max_frame_size=self.config.max_message_bytes,
            read_buffer_init_size=READ_BUFFER_BYTES,
            # picows gives every connection a child logging.Logger of the one it is handed (~0.5 KiB
            # each) unless that is not a Logger: an adapter is the same logger, nothing per connection.
            logger_name=logging.LoggerAdapter(logging.getLogger("picows.server"), {}),
            enable_auto_pong=True,
            disconnect_on_exception=True,
            use_aiofastnet=self.config.fast_transport,
        )
        if self.config.send_buffer_bytes:
            # Accepted sockets inherit SO_SNDBUF (and the lock that turns autotuning off) from the
            # listener: a stalled reader then pins ~2x this in the kernel, not tcp_wmem's 4 MiB.
            for sock in self.server.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer_bytes)
        if self.config.api_port:
            self.api = PublishAPI(self)
            await self.api.start(self.config.api_host, self.config.api_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.begin_shutdown)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.log.info("worker %d serving ws://%s:%d/ws (pid %d)%s", self.index, self.config.host,
                      self.config.port, os.getpid(), ", /echo on" if self.config.conformance_echo else "")
        self.loop.call_later(TICK_SECONDS, self.tick)
        if self.notifier.watchdog_interval:
            self._watchdog()
        self.listening = True
        self._check_ready()
        self.loop.call_later(READY_WITHOUT_EVERY_HUB_SECONDS, self._ready_without_every_hub)

    async def run(self) -> int:
        await self.start()
        await self.stopped.wait()
        return 0

    def _check_ready(self) -> None:
        if not self.ready and self.hub_up and self.listening:
            self.ready = True
            self.notifier.ready(self.status_line())
            self.log.info("worker %d ready", self.index)

    def _ready_without_every_hub(self) -> None:
        if self.ready or self.stopping or not self.listening:
            return
        away = [str(bus.shard) for bus in self.hubs.buses if not bus.connected]
        self.log.warning("worker %d ready without hub shard(s) %s after %.0fs: their channels refuse subscribes "
                         "and publishes until they link", self.index, ",".join(away),
                         READY_WITHOUT_EVERY_HUB_SECONDS)
        self.ready = True
        self.notifier.ready(self.status_line())

    def begin_shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        window = self.config.drain_window
        count = len(self.connections)
        self.notifier.stopping(f"draining {count} connections over {window:.0f}s")
        self.log.info("worker %d draining %d connections over %.1fs", self.index, count, window)
        if self.server is not None:
            self.server.close()  # stop accepting; queued connects go to sibling workers
        # Spread the 1001s so clients do not all reconnect in one stampede.
        for conn in list(self.connections):
            self.loop.call_later(random.uniform(0, window * 0.9), conn.close, errors.GOING_AWAY)
        for echo in list(self.echo_connections):
            echo.close(errors.GOING_AWAY)
        self.drain_deadline = self.loop.call_later(window, self._finish_shutdown)
        if not self.connections:
            self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self.finishing:
            return
        self.finishing = True
        if self.drain_deadline is not None:
            self.drain_deadline.cancel()
        left = [c for c in self.connections if not c.closed]
        for conn in left:
            conn.close(CloseReason(1001, "server going away", graceful=False))
        self.loop.create_task(self._final_cleanup(len(left)))

    async def _final_cleanup(self, aborted: int) -> None:
        if self.api is not None:
            await self.api.stop()
        await asyncio.sleep(0.05)  # let disconnect callbacks run
        self.exporter.flush()
        mark_process_dead(os.getpid())  # this process's live gauges leave /metrics with it
        self.hubs.close()
        self.log.info("worker %d stopped (%d connections aborted at the end of the drain)", self.index, aborted)
        self.stopped.set()

    def reload(self) -> None:
        """SIGHUP: re-read keys and origins; the old key stays valid for the rotation overlap."""
        self.notifier.reloading()
        try:
            fresh = Config.load({"env_file": self.config.env_file or None})
            fresh.check_keys(need_api_key=False)
            new = TokenVerifier.from_config(fresh)
        except Exception as exc:
            self.log.error("reload failed, keeping the current keys: %s", exc)
            self.notifier.ready(self.status_line())
            return
        self.verifier = new.with_previous(self.verifier, time.time() + fresh.jwt_rotation_overlap)
        self.config = self.config.replace(allowed_origins=fresh.allowed_origins)
        self.log.info("worker %d reloaded keys and origins (previous key valid %.0fs more)",
                      self.index, fresh.jwt_rotation_overlap)
        self._reload_hub_keys()
        self.notifier.ready(self.status_line())

    def _reload_hub_keys(self) -> None:
        """A new host key pair or hub.key in TIDINGS_HUB_KEYS (a rotation): re-link every hub with
        it. Clients stay connected; what a hub sent during the re-link is healed from history like
        any short outage. Turning CURVE on or off, or moving the directory, needs a restart."""
        if self.hub_keys is None:
            return
        try:
            fresh = self.hub_keys.reread(server=False)
        except ConfigError as exc:
            self.log.error("worker %d keeps its hub keys: %s", self.index, exc)
            return
        if fresh is None:
            return
        self.hub_keys = fresh
        self.log.info("worker %d re-links its hubs with new keys (host key %s, hub key %s)", self.index,
                      fresh.host_public.decode() if fresh.host_public else "?", fresh.hub_public.decode())
        for bus in self.hubs.buses:
            bus.rekey(fresh)  # the SUB re-subscribes on its new connection: like a lost events link
            self.on_hub_events_lost(bus.shard)
        self.stats.hubs_down = self.hubs.down

    @property
    def hub_up(self) -> bool:
        """Linked to every hub shard."""
        return self.hubs.down == 0

    def hub_up_for(self, channel: str) -> bool:
        """Linked to the shard that owns `channel`: its subscribes and publishes can go."""
        return self.hubs.for_channel(channel).connected

    def status_line(self) -> str:
        down = self.hubs.down
        hubs = "hub up" if not down else ("hub down" if self.hubs.count == 1 else
                                           f"{down} of {self.hubs.count} hub shards down")
        return f"{len(self.connections)} connections, {self.channels.active_channels} channels, {hubs}"

    # == housekeeping ==========================================================================
    def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop stops it and systemd restarts us."""
        if self.stopped.is_set() or not self.notifier.watchdog_interval:
            return
        self.notifier.watchdog()
        self.loop.call_later(self.notifier.watchdog_interval, self._watchdog)

    def tick(self) -> None:
        if self.stopped.is_set():
            return
        self.loop.call_later(TICK_SECONDS, self.tick)
        now = self.loop.time()
        wall = time.time()
        self._expire_tokens(wall)
        if now >= self.next_idle_sweep:
            c = self.config
            self.next_idle_sweep = now + min(IDLE_SWEEP_SECONDS, c.idle_timeout / 2, c.pong_timeout / 2)
            self._sweep_idle(now)
        for late in self.channels.sweep(now, self.config.unsubscribe_grace):
            self._answer_late_join(late)
        for bus in self.hubs.buses:
            bus.poke()
        for request_id in [r for r, (deadline, _) in self.requests.items() if deadline <= now]:
            _, answer = self.requests.pop(request_id)
            answer(None)
        if len(self.connections) > self.fd_warn_at:
            self.fd_log.warning(now, "worker %d holds %d connections, near its file descriptor limit (%d): "
                                "new connects are refused by the kernel until some leave; raise LimitNOFILE",
                                self.index, len(self.connections), self.fd_limit)
        s = self.stats
        s.connections = len(self.connections)
        s.subscriptions = self.channels.subscriptions
        s.channels = self.channels.active_channels
        s.hub_topics = self.channels.hub_topics
        s.hubs_down = self.hubs.down
        self.exporter.flush()
        self.notifier.status(self.status_line())

    def _expire_tokens(self, wall: float) -> None:
        cutoff = wall - self.config.jwt_leeway
        for conn in self.expiry.pop_due(cutoff):
            if conn.session.claims.exp > cutoff:
                continue  # refreshed since: its later entry is in the queue
            reply = error_reply(RequestError(ReplyCode.UNAUTHORIZED, "token expired"))
            self.log.info("closing %s: token expired", conn.describe())
            conn.close(errors.TOKEN_EXPIRED, reply)

    def _sweep_idle(self, now: float) -> None:
        idle_after = self.config.idle_timeout
        pong_within = self.config.pong_timeout
        for conn in list(self.connections):
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > pong_within:
                    self.log.info("dropping %s: no pong in %.0fs", conn.describe(), pong_within)
                    conn.close(errors.PING_TIMEOUT)
            elif now - conn.last_seen > idle_after:
                conn.send_ping(now)

    def _answer_late_join(self, late: PendingJoin) -> None:
        conn, join = late.member, late.join
        if conn.closed:
            return
        failed = join.failed
        channel = self.channels.by_name[join.channel]
        if failed is None:  # keep the membership: ZeroMQ re-sends the subscription
            self.channels.add_member(channel, conn)
            self._reply_join(conn, channel, join, False if join.since else None)
            return
        self.channels.leave(conn, join.channel, self.loop.time())
        conn.session.forget(join.channel)
        self.log.warning("hub did not confirm %s within %.1fs", join.channel, self.config.subscribe_timeout)
        conn.send(failed)

    # == connections ==========================================================================
    def listener_factory(self, request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener | None:
        try:
            return self._route(request)
        except Exception:
            # picows would answer 500 with the exception text; say nothing to the client.
            self.log.exception("upgrade failed")
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(500, b"internal error"), None)

    def _route(self, request: WSUpgradeRequest) -> Any:
        target = urllib.parse.urlsplit(request.path.decode("latin-1"))
        if target.path == "/healthz":
            body = orjson.dumps({"ok": True, "ready": self.ready and not self.stopping, "worker": self.index})
            status_ok = not self.stopping
            response = (WSUpgradeResponse.create_ok_response(body, {"Content-Type": "application/json"})
                        if status_ok else WSUpgradeResponse.create_error_response(503, body))
            return WSUpgradeResponseWithListener(response, None)
        if target.path in DEMO_FILES and self.config.demo:
            return self._demo_file(target.path, target.query)
        if target.path not in ("/ws", "/echo") or (target.path == "/echo" and not self.config.conformance_echo):
            return None
        if self.stopping:
            return _http_error(503, b"server going away")
        if not self._origin_allowed(request):
            self.stats.auth_failures["origin"] += 1
            return _http_error(403, b"origin not allowed")
        if target.path == "/echo":
            return EchoConnection(self)
        query = urllib.parse.parse_qs(target.query)
        token = query.get("token", [None])[0]
        try:
            since = parse_connect_since(query.get("since", [None])[0])
        except ValueError as exc:
            return _http_error(400, str(exc).encode())
        try:
            claims = self.verifier.verify(token, time.time())
        except AuthFailure as failure:
            self.stats.auth_failures[failure.kind] += 1
            self.log.info("refused a token: %s (%s)", failure.kind, failure.detail)
            reason = errors.TOKEN_EXPIRED if failure.kind == "expired" else errors.UNAUTHORIZED
            return RejectedConnection(self, reason, error_reply(
                RequestError(ReplyCode.UNAUTHORIZED, failure.client_message)))
        connection_id = f"{self.index}-{self.boot}-{next(self.ids)}"
        return ClientConnection(self, Session(claims, connection_id, self.limits, self.loop.time(), since=since))

    def _demo_file(self, path: str, query: str) -> WSUpgradeResponseWithListener:
        """The demo page and the client module it imports, read from clients/js on each request
        (a development aid: edits show on reload)."""
        name, content_type = DEMO_FILES[path]
        if not name:
            location = "/demo/" + (f"?{query}" if query else "")
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_redirect_response(HTTPStatus.FOUND, location), None)
        try:
            body = (CLIENTS_JS / name).read_bytes()
        except OSError as exc:
            self.log.warning("demo: cannot read %s: %s", CLIENTS_JS / name, exc)
            return _http_error(404, b"demo files not found (clients/js is not next to this install)")
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(body, headers), None)

    def _origin_allowed(self, request: WSUpgradeRequest) -> bool:
        origins = request.headers.getall("Origin", [])
        if not origins:
            return True  # not a browser: CSWSH needs a browser
        if len(origins) > 1:
            return False  # ambiguous: which one would a check be about?
        origin = origins[0]
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # The server's own origin (a page it served, or the same host:port) is always fine.
        host = request.headers.get("Host", "")
        return urllib.parse.urlsplit(origin).netloc == host and host != ""

    def connection_made(self, conn: ClientConnection) -> CloseReason | None:
        claims: Claims = conn.session.claims
        if len(self.connections) >= self.config.max_connections:
            self.log.warning("refusing a connection: worker full (%d)", len(self.connections))
            return errors.WORKER_FULL
        if self.per_user[claims.sub] >= self.config.max_connections_per_user:
            self.log.info("refusing a connection for sub %s: %d already", claims.sub, self.per_user[claims.sub])
            return errors.USER_CONNECTION_LIMIT
        self.connections[conn] = None
        self.per_user[claims.sub] += 1
        self.stats.connections_opened += 1
        self.expiry.add(claims.exp, conn)
        return None

    def connection_lost(self, conn: FramedConnection) -> None:
        self.writer.drop(conn)
        if not isinstance(conn, ClientConnection) or conn not in self.connections:
            return
        del self.connections[conn]
        sub = conn.session.claims.sub
        self.per_user[sub] -= 1
        if self.per_user[sub] <= 0:
            del self.per_user[sub]
        now = self.loop.time()
        for name in conn.session.channels:
            self.channels.leave(conn, name, now)  # nothing to answer: the connection is gone
        self.stats.connections_closed[str(conn.close_code)] += 1
        self.expiry.forget()
        if self.stopping and not self.connections:
            self._finish_shutdown()  # everyone is gone before the window ended

    def refresh(self, conn: ClientConnection, out: Refresh) -> list[Output]:
        """`refresh`: the token checked as at connect, the verdict to the session, the expiry moved."""
        try:
            claims: Claims | None = self.verifier.verify(out.token, time.time())
            refusal = ""
        except AuthFailure as failure:
            self.stats.auth_failures[failure.kind] += 1
            self.log.info("refused a refresh token for %s: %s (%s)", conn.describe(), failure.kind, failure.detail)
            claims, refusal = None, failure.client_message
        outputs = conn.session.refreshed(claims, refusal, out.request_id)
        if claims is not None and conn.session.claims is claims:
            self.expiry.move(claims.exp, conn)
        return outputs

    # == channels: joins, positions and recovery ================================================
    def join(self, conn: ClientConnection, join: Join, now: float) -> None:
        """conn joins a channel: answered now when its position is known, else once the hub sent it."""
        channel, known = self.channels.join(conn, join, now, self.config.subscribe_timeout)
        if known:
            self._answer_join(conn, channel, join, now)

    def leave(self, conn: ClientConnection, name: str, now: float) -> None:
        """conn leaves a channel; a join of it still waiting is answered first, so replies keep
        the order of the commands."""
        pending, recovering = self.channels.leave(conn, name, now)
        channel = self.channels.by_name.get(name)
        for waiting in pending:
            if channel is not None:
                self._reply_join(conn, channel, waiting.join, False if waiting.join.since else None)
        for waiter in recovering:
            if channel is not None and waiter.kind != WaiterKind.HEAL:
                self._reply_waiter(conn, channel, waiter, False)

    def _answer_join(self, conn: ClientConnection, channel: Channel, join: Join, now: float) -> None:
        """The channel's position is known: answer the join, or begin its recovery."""
        recovered: bool | None = None
        if join.since is not None:
            offset, epoch = join.since
            last = channel.last_offset
            if epoch == channel.epoch and offset < last and last - offset <= self.config.recovery_max_events:
                kind = WaiterKind.CONNECT if join.connect else WaiterKind.SUBSCRIBE
                self._wait(channel, Waiter(conn, offset, kind, join.request_id), now)
                return
            # Nothing missed (recovered, no history needed), or nothing we can give: all or nothing.
            recovered = epoch == channel.epoch and offset == last
            self.stats.recoveries["recovered" if recovered else "not_recovered"] += 1
            self.channels.add_member(channel, conn)
        self._reply_join(conn, channel, join, recovered)

    def _reply_join(self, conn: ClientConnection, channel: Channel, join: Join, recovered: bool | None) -> None:
        if join.connect:
            conn.send(conn.session.connected_reply(channel.last_offset, channel.epoch, recovered))
        else:
            conn.send(subscribed_reply(join.request_id, channel.name, channel.last_offset, channel.epoch, recovered))

    def _reply_waiter(self, conn: ClientConnection, channel: Channel, waiter: Waiter, recovered: bool) -> None:
        if waiter.kind == WaiterKind.CONNECT:
            conn.send(conn.session.connected_reply(channel.last_offset, channel.epoch, recovered))
        else:
            conn.send(subscribed_reply(waiter.request_id, channel.name, channel.last_offset, channel.epoch, recovered))

    def _wait(self, channel: Channel, waiter: Waiter, now: float) -> None:
        self._wait_quietly(channel, waiter)
        self._read(channel, now)

    def _read(self, channel: Channel, now: float) -> None:
        """Ask the hub for the history the channel's waiters need (one read in flight at a time)."""
        recovery = channel.recovery
        assert recovery is not None
        since = recovery.next_read()
        if since is None:
            return
        body = orjson.dumps({"channel": channel.name, "since": {"offset": since, "epoch": channel.epoch.decode()},
                             "limit": self.config.recovery_max_events, "source": "worker"})
        request_id = self.request(channel.name, HISTORY_REQUEST, body, lambda frames: self._on_read(channel, frames))
        if request_id is None:
            # The hub is there, yet the read cannot leave: its socket's handshake ends a moment
            # after the events socket's (a re-link), or its queue is full. Try again rather than
            # fail everyone.
            reachable = self.hubs.for_channel(channel.name).reachable
            if reachable and recovery.read_unsent(now, self.config.subscribe_timeout):
                self.loop.call_later(READ_RETRY_SECONDS, self._read_again, channel)
                return
            self.log.warning("cannot ask the hub for history of %s: hub unavailable", channel.name)
            self._finish_recovery(channel, recovery.give_up(), now)
            return
        recovery.read_sent(request_id, since)

    def _read_again(self, channel: Channel) -> None:
        recovery = channel.recovery
        if recovery is not None and recovery.retry_pending:
            recovery.retry_pending = False
            self._read(channel, self.loop.time())

    def _on_read(self, channel: Channel, frames: list[bytes] | None) -> None:
        """A history read came back (or timed out: None): settle the channel's waiters."""
        recovery = channel.recovery
        if recovery is None or recovery.read_id is None:
            return  # the recovery ended meanwhile (the channel restarted)
        now = self.loop.time()
        header = orjson.loads(frames[0]) if frames else None
        if header is None or not header.get("ok"):
            self.log.warning("no history for %s: %s", channel.name,
                             "the hub did not answer in time" if header is None else header.get("error"))
            outcomes = recovery.give_up()
        else:
            history = []
            for message in frames[1:]:  # type: ignore[index]
                _, offset, _, _, payload = split_egress(message)
                history.append((offset, payload))
            outcomes = recovery.settle(bool(header["covered"]), header["epoch"].encode() == channel.epoch,
                                       history, channel.last_offset, self.config.recovery_max_events)
        self._finish_recovery(channel, outcomes, now)

    # == requests to the hub ===================================================================
    def request(self, channel: str, op: bytes, body: bytes,
                answer: Callable[[list[bytes] | None], None]) -> bytes | None:
        """Send a request about `channel` to the hub shard owning it; `answer` gets the reply
        (header, items...) or None after subscribe_timeout. Returns the request id, or None when
        it could not be sent."""
        request_id = b"%d" % next(self.request_ids)
        bus = self.hubs.for_channel(channel)
        if not bus.connected or not bus.request(op, request_id, body):
            return None
        self.requests[request_id] = (self.loop.time() + self.config.subscribe_timeout, answer)
        return request_id

    def on_hub_reply(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        pending = self.requests.pop(frames[1], None)
        if pending is not None:  # else answered after its deadline: already told it failed
            pending[1](frames[2:])

    def publish_confirmed(self, bus: HubBus, records: bytes, answer: Callable[[list[bytes] | None], None]) -> bool:
        """Send ingress records (all of `bus`'s shard) that the hub answers on this worker's reply
        topic (hub/envelope.py); `answer` gets [the JSON answer], or None after subscribe_timeout.
        False if not sent."""
        request_id = next(self.request_ids)
        if not bus.connected or not bus.push_message(confirmed_ingress(self.reply_topic, request_id, records)):
            return False
        self.requests[REQUEST_ID.pack(request_id)] = (self.loop.time() + self.config.subscribe_timeout, answer)
        return True

    def _on_answer(self, message: bytes) -> None:
        request_id, body = split_answer(message)
        pending = self.requests.pop(REQUEST_ID.pack(request_id), None)
        if pending is not None:  # else answered after its deadline: already told it failed
            pending[1]([body])

    def push_publishes(self, records: list[bytes], publishers: list[tuple[ClientConnection, Forward]]) -> bool:
        """A loop pass's client publishes (ingress records, one per publisher), one confirmed
        message per hub shard: each is answered `published` with its offset and epoch once its
        shard stamped it. False: none could go (the writer answers them all)."""
        if self.hubs.count == 1:
            sent = self.publish_confirmed(self.hubs.buses[0], records[0] if len(records) == 1 else b"".join(records),
                                          lambda frames: self._answer_publishes(publishers, frames))
            if not sent:
                self._count_publishes(len(publishers), False)
            return sent
        failed = 0
        groups = split_by_shard(((record[:record.index(TOPIC_END) + 1], (record, publisher))
                                 for record, publisher in zip(records, publishers, strict=True)), self.hubs.count)
        for shard, group in groups.items():
            part = b"".join(record for _, (record, _) in group)
            who = [publisher for _, (_, publisher) in group]
            if not self.publish_confirmed(self.hubs.buses[shard], part,
                                          lambda frames, who=who: self._answer_publishes(who, frames)):
                failed += len(who)
                if len(groups) > 1:  # else the writer answers them all
                    for conn, forward in who:
                        if not conn.closed:
                            conn.send(forward.failed)
        if failed:
            self._count_publishes(failed, False)
        return failed < len(publishers) or len(groups) > 1

    def _answer_publishes(self, publishers: list[tuple[ClientConnection, Forward]],
                          frames: list[bytes] | None) -> None:
        header = orjson.loads(frames[0]) if frames else None
        positions = header.get("positions") if header is not None and header.get("ok") else None
        if positions is None or len(positions) != len(publishers):
            self.log.warning("hub did not confirm %d publish(es): %s", len(publishers),
                             "no answer in time" if header is None else header.get("error"))
            for conn, forward in publishers:
                if not conn.closed:
                    conn.send(forward.unanswered if frames is None else forward.failed)
            self._count_publishes(len(publishers), False)
            return
        for (conn, forward), (offset, epoch) in zip(publishers, positions, strict=True):
            if not conn.closed:
                conn.send(forward.published(offset, epoch.encode()))  # leaves with the pass's writes
        self._count_publishes(len(publishers), True)

    def _finish_recovery(self, channel: Channel, outcomes: list[Outcome], now: float) -> None:
        """Send each settled waiter its events (or the news that there are none) and make it live."""
        frames_for: dict[int, bytes] = {}  # since -> the joined frames: waiters of one position share them
        signalled = 0
        for outcome in outcomes:
            waiter, events = outcome.waiter, outcome.events
            conn = waiter.member
            if conn.closed or channel.name not in conn.session.channels:
                continue
            if waiter.kind == WaiterKind.HEAL:
                self.stats.heals["healed" if events is not None else "signalled"] += 1
                if events is None:
                    self._signal(conn, channel, now)
                    signalled += 1
                    continue
            else:
                self.stats.recoveries["recovered" if events is not None else "not_recovered"] += 1
                self._reply_waiter(conn, channel, waiter, events is not None)
            self.channels.add_member(channel, conn)
            if events:
                frames = frames_for.get(waiter.since)
                if frames is None:
                    frames = frames_for[waiter.since] = b"".join(text_frame(p) for p in events)
                self.writer.replay(conn, frames)
                self.stats.deliveries += len(events)
        if signalled:
            self.heal_log.warning(now, "could not heal %d member(s) of %s (history no longer has the missed events, "
                                 "the hub did not answer, or this worker kept falling behind): told them to "
                                 "resubscribe (insufficient_state)", signalled, channel.name)
        recovery = channel.recovery
        if recovery is not None:
            if recovery.waiters:
                self._read(channel, now)
            else:
                channel.recovery = None
        self.writer.flush()

    def _signal(self, conn: ClientConnection, channel: Channel, now: float) -> None:
        """conn missed events nobody can give it any more: end its subscription with a reason, so
        its client resubscribes with `since` and learns to refetch."""
        self.channels.remove_member(channel, conn, now)
        conn.session.forget(channel.name)
        conn.send(unsubscribed_reply(None, channel.name, INSUFFICIENT_STATE))

    def _heal(self, channel: Channel, since: int, top: int, now: float) -> None:
        """Members missed since+1 .. top: they wait for history like a resuming client."""
        for conn in list(channel.members):
            self.channels.remove_member(channel, conn, now)
            self._wait_quietly(channel, Waiter(conn, since, WaiterKind.HEAL))
        channel.last_offset = top
        if channel.recovery is not None:
            self._read(channel, now)

    def _wait_quietly(self, channel: Channel, waiter: Waiter) -> None:
        if channel.recovery is None:
            channel.recovery = ChannelRecovery()
        channel.recovery.waiters.append(waiter)

    def _restart(self, channel: Channel, top: int, epoch: bytes, now: float) -> None:
        """The hub knows the channel under a new epoch (it restarted, or dropped the channel's
        metadata): nobody's position means anything in it."""
        self.log.info("channel %s restarted at the hub (epoch %s -> %s): %d member(s) told to resubscribe",
                      channel.name, channel.epoch.decode(), epoch.decode(), len(channel.members))
        channel.last_offset, channel.epoch = top, epoch
        for conn in list(channel.members):
            self._signal(conn, channel, now)
        if channel.recovery is not None:
            self._finish_recovery(channel, channel.recovery.give_up(), now)

    def _on_position(self, channel: Channel, top: int, epoch: bytes, now: float) -> None:
        """The hub said where the channel stands: a worker subscribed to it (maybe this one), or
        the hub's periodic check of the channels published to lately."""
        if channel.confirmed:
            # A check that this worker lost nothing: a top above what it saw means the last events
            # were dropped at the high-water mark (no later event showed the jump).
            if epoch == channel.epoch and top > channel.last_offset:
                self._gap(channel.name, channel.last_offset, top + 1)
                self._heal(channel, channel.last_offset, top, now)
            return
        if not channel.epoch:
            channel.last_offset, channel.epoch = top, epoch
        elif epoch != channel.epoch or top < channel.last_offset:
            self._restart(channel, top, epoch, now)
        elif top > channel.last_offset:  # events went by while the hub link was down
            self._gap(channel.name, channel.last_offset, top + 1)
            self._heal(channel, channel.last_offset, top, now)
        for waiting in self.channels.confirm(channel):
            if not waiting.member.closed:
                self._answer_join(waiting.member, channel, waiting.join, now)

    def _out_of_step(self, channel: Channel, offset: int, epoch: bytes, now: float) -> bool:
        """An event that is not last + 1 of the channel's epoch: False to drop it."""
        if not channel.epoch:
            return True  # before the hub's position message: the first news of this channel
        if epoch != channel.epoch:
            self._restart(channel, offset - 1, epoch, now)
            return True
        if offset <= channel.last_offset:
            return False  # already delivered
        self._gap(channel.name, channel.last_offset, offset)
        self._heal(channel, channel.last_offset, offset - 1, now)
        return True  # held for the healing members (it is past the hole)

    # == hub ==================================================================================
    def on_hub_state(self, shard: int, up: bool) -> None:
        bus = self.hubs.buses[shard]
        self.stats.worker_hub_links[(str(shard), "up" if up else "lost")] += 1
        self.stats.hubs_down = self.hubs.down
        if up:
            self.log.info("worker %d linked to hub %d (%s)", self.index, shard, bus.egress)
            self._check_ready()
        else:
            self.log.warning("worker %d lost hub %d (%s: closed, or silent for %.0fs of heartbeats); clients "
                             "stay connected, its channels' publishes and new subscribes are refused until it is "
                             "back", self.index, shard, bus.egress, self.config.hub_heartbeat * 3)

    def on_hub_events_lost(self, shard: int) -> None:
        bus = self.hubs.buses[shard]
        self.channels.hub_lost(lambda topic: self.hubs.for_topic(topic) is bus)

    def on_hub_refused(self, shard: int, why: str) -> None:
        self.stats.worker_hub_links[(str(shard), "refused")] += 1
        self.refusal_log.warning(self.loop.time(), "worker %d cannot link to hub %d (%s): %s; trying again every "
                                 "%.0fs", self.index, shard, self.hubs.buses[shard].egress, why,
                                 REDIAL_AFTER_REFUSAL_SECONDS)

    def on_hub_messages(self, batch: list[bytes]) -> None:
        """The fan-out hot path. Per event: add a frame header to the payload the hub built, once.
        Per channel and batch: join its frames into one bytes object. Per subscriber: queue that
        same object, so a subscriber costs one append and one write per batch, not per event."""
        by_topic = self.channels.by_topic
        chunks: dict[Channel, list[bytes]] = {}
        events = 0
        hub_time = 0.0
        answers: list[bytes] | None = None
        for message in batch:
            if message[0] == ANSWERED:  # the hub's answer to this worker's confirmed publishes
                if answers is None:
                    answers = [message]
                else:
                    answers.append(message)
                continue
            topic, offset, hub_time, epoch, payload = split_egress(message)
            channel = by_topic.get(topic)
            if channel is None:
                continue
            if not payload or offset != channel.last_offset + 1 or epoch != channel.epoch:
                # The rare path may move members out (healing, a restart): first they get what
                # this batch already queued for them.
                earlier = chunks.pop(channel, None)
                if earlier:
                    self.writer.fan_out(channel.members, b"".join(earlier))
                    self.stats.deliveries += len(channel.members) * len(earlier)
                if not payload:  # a position: the hub saw a subscription to this channel
                    self._on_position(channel, offset, epoch, self.loop.time())
                    continue
                if not self._out_of_step(channel, offset, epoch, self.loop.time()):
                    continue
            channel.last_offset = offset
            channel.epoch = epoch
            if channel.recovery is not None:  # waiters get it from here, merged with history
                channel.recovery.held.append((offset, payload))
            events += 1
            frame = text_frame(payload)
            queued = chunks.get(channel)
            if queued is None:
                chunks[channel] = [frame]
            else:
                queued.append(frame)
        if events:
            fan_out = self.writer.fan_out
            deliveries = 0
            for channel, frames in chunks.items():
                fan_out(channel.members, frames[0] if len(frames) == 1 else b"".join(frames))
                deliveries += len(channel.members) * len(frames)
            self.stats.events_in += events
            self.stats.deliveries += deliveries
            self.stats.latency_samples.append(max(0.0, time.time() - hub_time))
        if answers is not None:  # after the events they confirm: `published` follows them
            for message in answers:
                self._on_answer(message)
        self.writer.flush()

    def _gap(self, channel: str, last: int, offset: int) -> None:
        missed = offset - last - 1 if offset > last else 1
        self.stats.gaps += missed
        self.gap_log.warning(self.loop.time(), "missed %d event(s) on %s (offset %d after %d): "
                             "this worker fell behind the hub's high-water mark", missed, channel, offset, last)

    def _count_publishes(self, count: int, confirmed: bool) -> None:
        self.stats.commands[("publish", "ok" if confirmed else "error")] += count
        if not confirmed:
            self.stats.publishes_failed += count

    def drop_slow(self, conn: FramedConnection) -> None:
        self.stats.slow_consumer_drops += 1
        self.log.warning("aborting %s: slow consumer, over %d bytes pending",
                         conn.describe(), self.config.max_pending_bytes)
        conn.close(errors.SLOW_CONSUMER)


def _http_error(status: int, body: bytes) -> WSUpgradeResponseWithListener:
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(status, body), None)


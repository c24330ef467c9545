"""tidings across hosts: hub shards and workers in separate network namespaces, CURVE on every link.

Three namespaces stand for three machines on one switch (tests/netns.py): "hub" runs every hub
shard, "w1" and "w2" one worker each. Browsers and backends are the test itself, in the root
namespace, so a client of w2 reaches it over w2's cable like the hub does. What the single-host
tests check over loopback is checked here over real TCP between hosts:

- every publish path reaches subscribers on both worker hosts exactly once, offsets in order,
  with one hub shard and with two;
- CURVE lets in only the keys in authorized/: an unknown worker, an unknown publisher, a plain
  tcp:// publisher and a plain SUB socket get nothing;
- faults: a hub shard killed (its channels fail fast, the other shard's keep flowing, the
  restarted shard is re-linked and its subscribers told to resubscribe), a worker host cut off
  and back (the other host notices nothing, the cut-off one catches up), a slow link (netem).

Detection times are printed (`pytest -s`); assertions bound them by the heartbeat setting only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
import zmq.auth
from tidings_client import Event, Reset, ServerError, Subscription, TidingsClient

from hub import HubUnavailable, Publisher
from hub.shards import shard_of
from tests.client import connect
from tests.netns import (
    PYTHON,
    Cluster,
    Keyring,
    Network,
    NetworkUnavailable,
    authorize,
    channels_on_every_shard,
    established_peers,
    metric_value,
    users_on_shard,
)
from tidings.config import Config

T = TypeVar("T")
HEARTBEAT = 0.5  # seconds: a silent hub link is dropped after 3 of them, 1.5 s
DETECT_BOUND = HEARTBEAT * 3 + 2.0  # a lost link must be noticed within this (scheduling slack included)
FAIL_FAST = 4.0  # a publish to a dead shard must be refused within this, never hang
PATTERNS = ["conversation:*"]
ROLES = ("w1", "w2")
READ = 10.0  # seconds to wait for events that are due (a loaded 2-core box)


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    """Key pairs made once by `tidings keys generate`; each test installs its own copies."""
    return Keyring.generate(tmp_path_factory.mktemp("keyring"))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    """Namespaces hub, w1, w2 on a fresh bridge; torn down (processes first) even on failure."""
    try:
        network = Network.create(["hub", *ROLES], tmp_path)
    except NetworkUnavailable as exc:
        pytest.skip(f"multi-host tests need network namespaces: {exc}")
    try:
        yield network
    finally:
        network.close()
    assert not network.leftovers(), f"left behind: {network.leftovers()}"


def start_cluster(net: Network, keyring: Keyring, tmp_path: Path, hubs: int,
                  authorized: Sequence[str] = ("w1", "w2", "pub"), workers: Sequence[str] = ROLES,
                  extra: dict[str, str] | None = None) -> Cluster:
    cluster = Cluster(net, keyring.install(tmp_path / "keys", authorized), hubs=hubs, heartbeat=HEARTBEAT,
                      extra=extra)
    cluster.start_hubs()
    cluster.start_workers(workers)
    return cluster


# -- clients and backends ---------------------------------------------------------------------------
@dataclass
class Seen:
    at: float  # monotonic time it was read
    item: Event | Reset


class Watcher:
    """One tidings_client connection to a worker host, subscribed to `channels`. Everything each
    subscription yields (Events, Resets) is collected in the background with its arrival time."""

    def __init__(self, cluster: Cluster, role: str, sub: str, channels: Sequence[str]) -> None:
        self.role = role
        self.sub = sub
        self.channels = list(channels)
        self.client = TidingsClient(cluster.ws_url(role),
                                    get_token=lambda: cluster.token(sub, channels=PATTERNS, publish=PATTERNS))
        self.items: dict[str, list[Seen]] = {ch: [] for ch in channels}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Watcher:
        self.client.start()
        try:
            for channel in self.channels:
                subscription = await self.client.subscribe(channel)
                self._tasks.append(asyncio.create_task(self._collect(channel, subscription)))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await self.client.close()

    async def _collect(self, channel: str, subscription: Subscription) -> None:
        async for item in subscription:
            self.items[channel].append(Seen(time.monotonic(), item))

    def events(self, channel: str) -> list[Event]:
        return [s.item for s in self.items[channel] if isinstance(s.item, Event)]

    def resets(self, channel: str) -> list[Reset]:
        return [s.item for s in self.items[channel] if isinstance(s.item, Reset)]

    def __repr__(self) -> str:
        return f"<Watcher {self.sub} on {self.role}>"


class Backend:
    """A backend host in the root namespace: one Publisher, used from one thread (ZeroMQ sockets
    are thread-confined), callable from an async test body."""

    def __init__(self, cluster: Cluster, keys: str | None = "pub", **options: Any) -> None:
        self.config = Config.load(environ=cluster.publisher_env(keys))
        self.options = options
        self.executor = ThreadPoolExecutor(1)
        self.pub: Publisher | None = None

    def _publisher(self) -> Publisher:
        if self.pub is None:
            self.pub = Publisher.from_config(self.config, **self.options)
        return self.pub

    async def run(self, method: Callable[..., T], *args: Any) -> T:
        """`method(publisher, *args)` in the publisher's thread, e.g. run(Publisher.publish, ...)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: method(self._publisher(), *args))

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pub is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.pub.close)
        self.executor.shutdown(wait=True)


async def until(predicate: Callable[[], bool], what: str, timeout: float = READ) -> float:
    """Wait for `predicate()`; returns the monotonic time it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic()


def run(body: Callable[[], Any], timeout: float = 60.0) -> None:
    """Run an async test body with a hard cap, so a hang fails instead of stalling the suite."""
    async def capped() -> None:
        async with asyncio.timeout(timeout):
            await body()

    asyncio.run(capped())


def check_once_in_order(events: Sequence[Event], marks: Sequence[str], where: str, first: int = 1) -> None:
    """Offsets first, first+1, ... in one epoch, and each expected mark exactly once."""
    offsets = [e.offset for e in events]
    assert offsets == list(range(first, first + len(events))), f"{where}: offsets {offsets}"
    assert len({e.epoch for e in events}) <= 1, f"{where}: several epochs {[e.epoch for e in events]}"
    got = [e.data["m"] for e in events]
    assert len(set(got)) == len(got), f"{where}: duplicates in {got}"
    assert sorted(got) == sorted(marks), f"{where}: got {sorted(got)}, expected {sorted(marks)}"


def public_key(key_dir: Path) -> str:
    public, _ = zmq.auth.load_certificate(key_dir / "host.key")
    return public.decode()


# -- end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hubs", [1, 2])
def test_every_backend_publish_path_reaches_both_worker_hosts_once_in_order(net: Network, keyring: Keyring,
                                                                             tmp_path: Path, hubs: int) -> None:
    """The whole service over CURVE between hosts: each way a backend publishes (Publisher
    fire-and-forget and confirmed, both broadcasts, the CLI, HTTP publish and broadcast on either
    worker, confirmed or not) lands on both worker hosts' subscribers, once each, offsets
    consecutive per channel; confirmed paths report the position the subscribers then see. With
    two shards the two channels live on different shards, so routing by CRC-32 is what makes them
    arrive at all. (Client publishes over WebSocket: the next test.)"""
    cluster = start_cluster(net, keyring, tmp_path, hubs)
    channels = channels_on_every_shard(2)
    if hubs == 2:
        assert [shard_of(ch.encode(), 2) for ch in channels] == [0, 1]
    expected: dict[str, list[str]] = {ch: [] for ch in channels}
    positions: dict[tuple[str, str], tuple[int, str]] = {}

    def landed(channel: str, mark: str, offset: int | None = None, epoch: str | None = None) -> None:
        expected[channel].append(mark)
        if offset is not None and epoch is not None:
            positions[(channel, mark)] = (offset, epoch)

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(Watcher(cluster, role, f"{role}-reader-{i}", channels))
                        for role in ROLES for i in range(2)]
            backend = await stack.enter_async_context(Backend(cluster))
            for ch in channels:
                await backend.run(Publisher.publish, ch, "chat_message", {"m": "publisher"})
                landed(ch, "publisher")
                pos = await backend.run(Publisher.publish, ch, "chat_message", {"m": "publisher-confirmed"}, True)
                assert pos is not None
                landed(ch, "publisher-confirmed", pos.offset, pos.epoch)
            assert await backend.run(Publisher.broadcast, channels, "notification", {"m": "broadcast"}) == 2
            for ch in channels:
                landed(ch, "broadcast")
            for pos in await backend.run(Publisher.broadcast_confirmed, channels, "notification",
                                         {"m": "broadcast-confirmed"}):
                landed(pos.channel, "broadcast-confirmed", pos.offset, pos.epoch)

            cli = await asyncio.to_thread(cluster.cli, "publish", *(a for ch in channels for a in ("--channel", ch)),
                                          "--type", "status_update", "--data", '{"m": "cli"}')
            assert cli.returncode == 0, cli.stderr
            for ch in channels:
                found = re.search(rf"{re.escape(ch)}: offset (\d+), epoch ([0-9a-f]+)", cli.stdout)
                assert found, cli.stdout
                landed(ch, "cli", int(found[1]), found[2])

            for role in ROLES:
                for ch in channels:
                    status, body = await asyncio.to_thread(cluster.api, role, "/api/publish", {
                        "channel": ch, "type": "chat_message", "data": {"m": f"http-{role}"}})
                    assert status == 200, body
                    landed(ch, f"http-{role}", body["offset"], body["epoch"])
                status, body = await asyncio.to_thread(cluster.api, role, "/api/broadcast", {
                    "channels": channels, "type": "notification", "data": {"m": f"http-broadcast-{role}"}})
                assert status == 200, body
                for p in body["positions"]:
                    landed(p["channel"], f"http-broadcast-{role}", p["offset"], p["epoch"])
            status, body = await asyncio.to_thread(cluster.api, "w2", "/api/broadcast", {
                "channels": channels, "type": "notification", "data": {"m": "http-unconfirmed"}, "confirm": False})
            assert status == 200 and body["confirmed"] is False, body
            for ch in channels:
                landed(ch, "http-unconfirmed")
            await settled(watchers, expected, positions)
        print(f"\n{hubs} hub shard(s): {sum(map(len, expected.values()))} events over {len(channels)} channels "
              f"reached {len(watchers)} clients on 2 worker hosts once each")

    run(body)


async def settled(watchers: Sequence[Watcher], expected: dict[str, list[str]],
                  positions: dict[tuple[str, str], tuple[int, str]]) -> None:
    """Every watcher got every expected mark of each channel once, offsets 1, 2, ... in order, no
    Reset, nothing more within half a second, and confirmed positions where the events sit."""
    await until(lambda: all(len(w.events(ch)) >= len(marks) for w in watchers for ch, marks in expected.items()),
                f"{ {ch: len(m) for ch, m in expected.items()} } events on every watcher")
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up by now
    for w in watchers:
        for ch, marks in expected.items():
            assert not w.resets(ch), f"{w}: {w.resets(ch)}"
            check_once_in_order(w.events(ch), marks, f"{w} {ch}")
            by_mark = {e.data["m"]: e for e in w.events(ch)}
            for (channel, mark), position in positions.items():
                if channel == ch:
                    assert by_mark[mark].position == position, (w, ch, mark)


@pytest.mark.parametrize("hubs", [1, 2])
def test_client_publish_reaches_both_hosts_and_fails_fast_on_a_dead_shard(net: Network, keyring: Keyring,
                                                                          tmp_path: Path, hubs: int) -> None:
    """A client's publish over WebSocket (token with a `publish` claim) on either worker host is
    answered `published` with its position and reaches both hosts' subscribers once, in order.
    Then the shard owning the last channel is killed: a client publish to it is refused with
    internal_error within the heartbeat bound (the worker knows its link is gone), while, with two
    shards, the other shard's channel still takes publishes."""
    cluster = start_cluster(net, keyring, tmp_path, hubs)
    channels = channels_on_every_shard(2)
    expected: dict[str, list[str]] = {ch: [] for ch in channels}
    positions: dict[tuple[str, str], tuple[int, str]] = {}

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(Watcher(cluster, role, f"{role}-ws-{i}", channels))
                        for role in ROLES for i in range(2)]
            for watcher in watchers:
                for ch in channels:
                    mark = f"ws-{watcher.sub}"
                    pos = await watcher.client.publish(ch, "chat_message", {"m": mark}, timeout=5)
                    expected[ch].append(mark)
                    positions[(ch, mark)] = pos
            await settled(watchers, expected, positions)

            doomed = channels[-1]
            shard = shard_of(doomed.encode(), hubs)
            marks = {role: cluster.workers[role].mark() for role in ROLES}
            cluster.hub_procs[shard].kill()
            for role in ROLES:
                await asyncio.to_thread(cluster.workers[role].wait_for, rf"lost hub {shard}", after=marks[role],
                                        timeout=DETECT_BOUND)
            top = len(expected[channels[0]])
            for watcher in (watchers[0], watchers[2]):
                started = time.monotonic()
                with pytest.raises(ServerError) as refused:
                    await watcher.client.publish(doomed, "chat_message", {"m": "into the void"}, timeout=FAIL_FAST)
                assert refused.value.code == "internal_error"
                print(f"\nclient publish to a dead shard on {watcher.role}: internal_error after "
                      f"{time.monotonic() - started:.3f}s")
                if hubs > 1:
                    pos = await watcher.client.publish(channels[0], "chat_message", {"m": "still"}, timeout=5)
                    top += 1
                    assert pos.offset == top, pos

    run(body)


# -- CURVE ---------------------------------------------------------------------------------------------------
def test_curve_admits_only_authorized_keys(net: Network, keyring: Keyring, tmp_path: Path) -> None:
    """A hub admits exactly the public keys in its authorized/.

    - A worker host whose key is not there is refused: the hub names the key in its log, the
      worker says so too, is not linked (a TCP connect is not a link) and not ready (/healthz 503,
      so no load balancer sends it clients), its clients cannot subscribe and it never receives an
      event.
    - A publisher with an unknown key, a plain tcp:// publisher (TIDINGS_HUB_INSECURE=1, no keys,
      Python and CLI) and a plain SUB socket get nothing through, in or out; the first event a
      legitimate publisher then stamps has offset 1, so none of the refused publishes was stamped.
    - Adding the worker's key to authorized/ and sending the hub SIGHUP admits the running worker
      (it redials a hub that refused it), which then delivers events."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, authorized=("w1", "pub"), workers=("w1",))
    hub = cluster.hub_procs[0]
    channel = "conversation:curve"
    refused = cluster.start_worker("w2", wait=False)
    hub.wait_for(rf"refused a hub link: CURVE key {re.escape(public_key(cluster.keys['w2']))} is not in")
    refused.wait_for(r"refused this host's CURVE key")
    refused.wait_for(r"serving ws://")
    status, health = cluster.api("w2", "/healthz")
    assert (status, health["ready"], health["hub"], health["hubs_down"]) == (503, False, False, 1), health
    assert not refused.seen(r"linked to hub"), refused.log()
    # Its clients cannot subscribe: the worker has no hub to subscribe at.
    stranger, hello = connect(f"{cluster.ws_url('w2')}?token={cluster.token('stranger', channels=PATTERNS)}")
    assert "offset" not in hello["data"]["personal"], hello  # no position: the hub never answered
    answer = stranger.subscribe(channel)
    assert answer["type"] == "error" and answer["data"]["code"] == "subscription_failed", answer

    async def body() -> None:
        async with Watcher(cluster, "w1", "insider", [channel]) as insider:
            for keys in ("rogue", None):  # an unknown key pair; plain tcp:// without keys
                async with Backend(cluster, keys, send_timeout_ms=500, reply_timeout_ms=500) as outsider:
                    with pytest.raises(HubUnavailable):
                        await outsider.run(Publisher.publish, channel, "chat_message", {"m": f"fire-{keys}"})
                    with pytest.raises(HubUnavailable):
                        await outsider.run(Publisher.publish, channel, "chat_message", {"m": f"conf-{keys}"}, True)
            plain_cli = await asyncio.to_thread(cluster.cli, "publish", "--channel", channel, "--type",
                                                "chat_message", "--data", '{"m": "plain-cli"}', keys=None)
            assert plain_cli.returncode == 1, plain_cli
            ctx = zmq.Context()
            spy = ctx.socket(zmq.SUB)
            try:
                spy.setsockopt(zmq.SUBSCRIBE, b"")
                spy.setsockopt(zmq.LINGER, 0)
                mark = hub.mark()
                spy.connect(cluster.egress[0])
                # Usually "not a CURVE peer"; when the plain peer notices the mismatch first and hangs
                # up, libzmq reports no detail to the hub (and the peer does not redial).
                await asyncio.to_thread(
                    hub.wait_for, r"refused a link from \S+ on \S+ \(\w+\): (not a CURVE peer|handshake failed)",
                    after=mark)
                async with Backend(cluster) as backend:
                    pos = await backend.run(Publisher.publish, channel, "chat_message", {"m": "legit"}, True)
                assert pos is not None and pos.offset == 1, pos  # nothing refused was ever stamped
                await until(lambda: len(insider.events(channel)) == 1, "the legitimate event")
                assert insider.events(channel)[0].data == {"m": "legit"}
                assert await asyncio.to_thread(spy.poll, 500) == 0, "a plain SUB socket received something"
            finally:
                spy.close(0)
                ctx.term()
        await asyncio.to_thread(stranger.nothing, 0.2)  # no event ever reached the refused worker's client
        stranger.close()
        await until(lambda: metric_value(cluster.hub_metrics(), "tidings_hub_link_events_total",
                                         'event="refused"') >= 2, "refusals counted at the hub", 5)
        metrics = await asyncio.to_thread(cluster.metrics, "w2")
        assert metric_value(metrics, "tidings_worker_events_in_total") == 0
        assert metric_value(metrics, "tidings_worker_hub_link_events_total", 'event="refused"') >= 1

        # Admit the worker: its key into authorized/ and SIGHUP; the hub checks the next handshake.
        authorize(cluster.keys["hub"], cluster.keys["w2"], "w2")
        mark, worker_mark = hub.mark(), refused.mark()
        reloaded = time.monotonic()
        hub.signal(signal.SIGHUP)
        await asyncio.to_thread(hub.wait_for, r"reloaded the authorized keys: 3 admitted", after=mark)
        linked = await asyncio.to_thread(refused.wait_for, r"linked to hub 0", after=worker_mark, timeout=15)
        print(f"\nhub reloaded authorized/ -> the refused worker linked {linked - reloaded:.3f}s later, no restart")
        status, health = await asyncio.to_thread(cluster.api, "w2", "/healthz")
        assert (status, health["ready"], health["hub"]) == (200, True, True), health
        async with Watcher(cluster, "w2", "admitted", [channel]) as watcher, Backend(cluster) as backend:
            pos = await backend.run(Publisher.publish, channel, "chat_message", {"m": "welcome"}, True)
            await until(lambda: len(watcher.events(channel)) == 1, "the event on the admitted worker")
            assert watcher.events(channel)[0].position == (pos.offset, pos.epoch)

    run(body)


def test_host_and_hub_keys_rotate_by_reload_without_dropping_a_client(net: Network, keyring: Keyring,
                                                                     tmp_path: Path) -> None:
    """Keys are files rotated by SIGHUP (`systemctl reload`), as the JWT keys are, not by a restart.

    - A worker host's key: a new pair made by `tidings keys generate`, admitted at the hub while
      the old one is removed, hub reloaded (links up stay up), then the worker reloaded: it re-links
      with the new pair (the old one would now be refused) and its client notices nothing.
    - The hubs' key: a new pair on the hub and its hub.key on the hosts; the hub reloaded cuts
      every link and serves with the new pair, keeping history, epochs and offsets; an event
      published while the worker still has the old hub.key reaches the client from history once
      the worker is reloaded. One WebSocket throughout, every event once, in order, one epoch."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, authorized=("w1", "pub"), workers=("w1",))
    hub, worker = cluster.hub_procs[0], cluster.workers["w1"]
    hub_dir, w1_dir = cluster.keys["hub"], cluster.keys["w1"]
    channel = "conversation:rotation"
    reader, _ = connect(f"{cluster.ws_url('w1')}?token={cluster.token('reader', channels=PATTERNS)}")
    assert reader.subscribe(channel)["type"] == "subscribed"

    def publish(mark: str) -> None:
        with Publisher.from_config(Config.load(environ=cluster.publisher_env("pub"))) as pub:
            pub.publish(channel, "chat_message", {"m": mark}, confirm=True)

    def generate(directory: Path, *hub_flag: str) -> None:
        done = cluster.cli("keys", "generate", *hub_flag, "--dir", str(directory), keys=None)
        assert done.returncode == 0, done

    publish("before")
    # The worker host's pair.
    old_host = public_key(w1_dir)
    for name in ("host.key", "host.key_secret"):
        (w1_dir / name).rename(tmp_path / f"old-{name}")
    generate(w1_dir)
    assert public_key(w1_dir) != old_host
    authorize(hub_dir, w1_dir, "w1-new")
    (hub_dir / "authorized" / "w1.key").unlink()
    mark, worker_mark = hub.mark(), worker.mark()
    hub.signal(signal.SIGHUP)
    hub.wait_for(r"reloaded the authorized keys: 2 admitted", after=mark)
    reloaded = time.monotonic()
    worker.signal(signal.SIGHUP)
    worker.wait_for(r"re-links its hubs with new keys", after=worker_mark)
    host_relinked = worker.wait_for(r"linked to hub 0", after=worker_mark, timeout=15) - reloaded
    assert not hub.seen(r"refused", after=mark), hub.log()
    publish("after-host")

    # The hubs' pair.
    new_hub = tmp_path / "new-hub"
    generate(new_hub, "--hub")
    for name in ("hub.key", "hub.key_secret"):
        shutil.copyfile(new_hub / name, hub_dir / name)
    for host in ("w1", "pub"):
        shutil.copyfile(new_hub / "hub.key", cluster.keys[host] / "hub.key")
    mark, worker_mark = hub.mark(), worker.mark()
    hub.signal(signal.SIGHUP)
    hub.wait_for(r"serves with a new key pair", after=mark)
    worker.wait_for(r"lost hub 0", after=worker_mark, timeout=DETECT_BOUND)
    publish("during")  # the publisher has the new hub.key; the worker does not yet
    worker_mark, reloaded = worker.mark(), time.monotonic()
    worker.signal(signal.SIGHUP)
    hub_relinked = worker.wait_for(r"linked to hub 0", after=worker_mark, timeout=15) - reloaded
    publish("after-hub")
    print(f"\nworker reload -> linked again: {host_relinked:.3f}s with a new host pair, "
          f"{hub_relinked:.3f}s with a new hub.key")

    events = [reader.recv(READ) for _ in range(4)]
    assert [e["data"]["m"] for e in events] == ["before", "after-host", "during", "after-hub"], events
    assert [e["offset"] for e in events] == [1, 2, 3, 4]
    assert len({e["epoch"] for e in events}) == 1, events  # the hub kept its history: no new epoch
    reader.nothing(0.2)
    reader.close()


def test_a_worker_is_linked_only_when_all_three_sockets_are(net: Network, keyring: Keyring, tmp_path: Path) -> None:
    """Events, publishes and history reads ride three sockets to a hub. A worker that reaches the
    hub's events and ingress ports but not its requests port (a wrong port here) would fail every
    history read and confirmed publish: it says it is not linked and is not ready."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, workers=())
    env = {**cluster.worker_env("w1", cluster.keys["w1"]), "TIDINGS_HUB_REQUESTS": cluster.requests[0][:-1] + "9"}
    worker = net.spawn("w1", [PYTHON, "-m", "tidings", "worker", "--index", "0"], env, "worker-w1-half")
    worker.wait_for(r"serving ws://")
    cluster.hub_procs[0].wait_for(r"worker link from .* up")  # its events socket did link
    time.sleep(HEARTBEAT * 2)
    assert not worker.seen(r"linked to hub"), worker.log()
    status, health = cluster.api("w1", "/healthz")
    assert (status, health["ready"], health["hubs_down"]) == (503, False, 1), health


# -- faults ------------------------------------------------------------------------------------------------
def test_a_killed_hub_shard_fails_fast_and_heals_while_the_other_flows(net: Network, keyring: Keyring,
                                                                        tmp_path: Path) -> None:
    """kill -9 of one of two hub shards: the workers on both hosts notice at once (the kernel
    closes the dead process's connections); the other shard's channel keeps flowing to both
    hosts; a publish to the dead shard's channel fails fast, never hangs: HTTP 503 hub_unavailable
    (a broadcast over both shards says which part got through), hub.Publisher HubUnavailable.
    The shard restarted on the same endpoints (no persistence) is re-linked by the workers on
    their own; it knows its channels under a new epoch, so subscribers are told
    `unsubscribed` / `insufficient_state` (raw protocol), which the Python client answers by
    resubscribing from its position and yielding a Reset (recovered: false); then they receive
    the shard's new events live. Personal channels are on the surviving shard, so only the
    channel under test is affected."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=2)
    live, dead = channels_on_every_shard(2)
    users = users_on_shard("shardkill-", 0, 2, 6)
    expected_live = ["before"]

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(Watcher(cluster, role, users[2 * n + i], [live, dead]))
                        for n, role in enumerate(ROLES) for i in range(2)]
            raws = {}
            for n, role in enumerate(ROLES):
                raw, _ = connect(f"{cluster.ws_url(role)}?token={cluster.token(users[4 + n], channels=PATTERNS)}")
                stack.callback(raw.close)
                assert raw.subscribe(dead)["type"] == "subscribed"
                raws[role] = raw
            backend = await stack.enter_async_context(Backend(cluster))
            before = {}
            for ch in (live, dead):
                before[ch] = await backend.run(Publisher.publish, ch, "chat_message", {"m": "before"}, True)
            for raw in raws.values():
                assert (await asyncio.to_thread(raw.recv))["data"] == {"m": "before"}

            marks = {role: cluster.workers[role].mark() for role in ROLES}
            killed = time.monotonic()
            cluster.hub_procs[1].kill()
            for role in ROLES:
                seen = await asyncio.to_thread(cluster.workers[role].wait_for, r"lost hub 1", after=marks[role],
                                               timeout=DETECT_BOUND)
                print(f"\nhub shard 1 killed -> worker on {role} logged the loss after {seen - killed:.3f}s")
                metrics = await asyncio.to_thread(cluster.metrics, role)
                assert metric_value(metrics, "tidings_worker_hubs_down") == 1
                assert metric_value(metrics, "tidings_worker_hub_link_events_total", 'shard="1"', 'event="lost"') == 1
                status, health = await asyncio.to_thread(cluster.api, role, "/healthz")
                assert (health["hub"], health["hubs_down"]) == (False, 1), health

            # The live shard does not care.
            await backend.run(Publisher.publish, live, "chat_message", {"m": "publisher-after"}, True)
            expected_live.append("publisher-after")
            for role in ROLES:
                status, body = await asyncio.to_thread(cluster.api, role, "/api/publish", {
                    "channel": live, "type": "chat_message", "data": {"m": f"http-{role}-after"}})
                assert status == 200, body
                expected_live.append(f"http-{role}-after")

            # The dead shard's channel is refused, quickly, by every path.
            for role in ROLES:
                started = time.monotonic()
                status, body = await asyncio.to_thread(cluster.api, role, "/api/publish", {
                    "channel": dead, "type": "chat_message", "data": {"m": "void"}})
                took = time.monotonic() - started
                assert (status, body["error"]) == (503, "hub_unavailable") and took < FAIL_FAST, (status, body, took)
                print(f"HTTP publish to the dead shard on {role}: 503 after {took:.3f}s")
            status, body = await asyncio.to_thread(cluster.api, "w1", "/api/broadcast", {
                "channels": [live, dead], "type": "notification", "data": {"m": "half-broadcast"}})
            assert status == 503 and body["failed"] == [dead], body
            assert [p["channel"] for p in body["positions"]] == [live], body
            expected_live.append("half-broadcast")
            for confirm in (False, True):
                started = time.monotonic()
                with pytest.raises(HubUnavailable):
                    await backend.run(Publisher.publish, dead, "chat_message", {"m": "void"}, confirm)
                took = time.monotonic() - started
                assert took < FAIL_FAST, took
                print(f"hub.Publisher publish(confirm={confirm}) to the dead shard: HubUnavailable after {took:.3f}s")

            # Back on the same endpoints: the workers re-link by themselves.
            marks = {role: cluster.workers[role].mark() for role in ROLES}
            restarted = time.monotonic()
            cluster.start_hub(1)
            for role in ROLES:
                seen = await asyncio.to_thread(cluster.workers[role].wait_for, r"linked to hub 1", after=marks[role],
                                               timeout=10)
                print(f"hub shard 1 restarted -> worker on {role} re-linked after {seen - restarted:.3f}s")
                metrics = await asyncio.to_thread(cluster.metrics, role)
                assert metric_value(metrics, "tidings_worker_hubs_down") == 0
                assert metric_value(metrics, "tidings_worker_hub_link_events_total", 'shard="1"', 'event="up"') == 2
            for role, raw in raws.items():
                told = await asyncio.to_thread(raw.recv)
                assert told == {"type": "unsubscribed", "data": {"channel": dead, "reason": "insufficient_state"}}, \
                    (role, told)
                again = await asyncio.to_thread(raw.request, "subscribe", {
                    "channel": dead, "since": {"offset": before[dead].offset, "epoch": before[dead].epoch}})
                assert again["type"] == "subscribed" and again["data"]["recovered"] is False, again
                assert again["data"]["epoch"] != before[dead].epoch, again
            await until(lambda: all(w.resets(dead) for w in watchers), "a Reset of the dead shard's channel")

            reborn = None
            deadline = time.monotonic() + 5
            while reborn is None:  # the Publisher's own sockets re-link too, within ZeroMQ's retry
                try:
                    reborn = await backend.run(Publisher.publish, dead, "chat_message", {"m": "reborn"}, True)
                except HubUnavailable:
                    if time.monotonic() > deadline:
                        raise
            assert reborn.offset == 1 and reborn.epoch != before[dead].epoch, reborn
            for raw in raws.values():
                event = await asyncio.to_thread(raw.recv)
                assert (event["data"], event["offset"], event["epoch"]) == ({"m": "reborn"}, 1, reborn.epoch)
            await until(lambda: all(len(w.events(dead)) == 2 for w in watchers), "the reborn event")
            await until(lambda: all(len(w.events(live)) == len(expected_live) for w in watchers), "live events")
            await asyncio.sleep(0.3)
        for w in watchers:
            check_once_in_order(w.events(live), expected_live, f"{w} {live}")
            assert not w.resets(live)
            kinds = [(type(s.item).__name__, getattr(s.item, "position", None)) for s in w.items[dead]]
            assert kinds == [("Event", (1, before[dead].epoch)), ("Reset", (0, reborn.epoch)),
                             ("Event", (1, reborn.epoch))], (w, kinds)

    run(body)


def test_a_worker_host_cut_off_and_back(net: Network, keyring: Keyring, tmp_path: Path) -> None:
    """w2's cable is pulled for 3 s (its veth end on the bridge goes down) while a backend keeps
    publishing a confirmed event every 50 ms.

    - w1's clients notice nothing: every event arrives, in order, each well within a second of
      its publish, during the outage too.
    - The w2 worker logs that it lost the hub once three heartbeats went unanswered, and the hub
      drops its end of the link as well (measured from the hub's TCP table: the hub's own log
      line for it is checked by the link test at the end of this file); both times are printed.
    - After the cable is back, w2 re-links by itself. Its clients come from the root namespace
      over the same cable, so their TCP connections were cut too, but they survive a 3 s outage
      without a reconnect. What they get, observed: the hub's position for the channel is ahead
      of what w2 last delivered, in the same epoch, so w2 heals the gap from the hub's history:
      its clients receive every event published during the outage, exactly once and in order,
      then the live ones, with no Reset and no insufficient_state. (History is sized here to hold
      the whole outage; with less, they would get insufficient_state instead.)"""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, extra={"TIDINGS_HISTORY": "conversation=1000/300s"})
    channel = "conversation:cable"
    hub, w2 = cluster.hub_procs[0], cluster.workers["w2"]
    w2_ip = net.host("w2").ip
    egress_port = int(cluster.egress[0].rsplit(":", 1)[1])
    published: dict[int, float] = {}  # offset -> when its confirmed publish returned

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(Watcher(cluster, role, f"{role}-cable-{i}", [channel]))
                        for role in ROLES for i in range(2)]
            backend = await stack.enter_async_context(Backend(cluster))
            stop = asyncio.Event()

            async def stream() -> None:
                n = 0
                while not stop.is_set():
                    pos = await backend.run(Publisher.publish, channel, "chat_message", {"m": f"e{n}"}, True)
                    published[pos.offset] = time.monotonic()
                    n += 1
                    await asyncio.sleep(0.05)

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(0.5)
            assert w2_ip in established_peers(hub.pid, egress_port)
            w2_mark = w2.mark()
            down = time.monotonic()
            net.link("w2", up=False)
            worker_saw = hub_saw = None
            while worker_saw is None or hub_saw is None:
                now = time.monotonic()
                if worker_saw is None and w2.seen(r"lost hub 0", w2_mark):
                    worker_saw = now
                if hub_saw is None and w2_ip not in established_peers(hub.pid, egress_port):
                    hub_saw = now
                assert now - down < DETECT_BOUND + 2, f"not detected: worker {worker_saw}, hub {hub_saw}"
                await asyncio.sleep(0.01)
            print(f"\nw2 cut off -> the w2 worker logged the hub lost after {worker_saw - down:.3f}s; the hub "
                  f"dropped w2's link after {hub_saw - down:.3f}s (heartbeat {HEARTBEAT}s x 3)")
            assert worker_saw - down < DETECT_BOUND and hub_saw - down < DETECT_BOUND
            await asyncio.sleep(max(0.0, down + 3.0 - time.monotonic()))
            up = time.monotonic()
            net.link("w2", up=True)
            relinked = await asyncio.to_thread(w2.wait_for, r"linked to hub 0", after=w2_mark, timeout=15)
            print(f"w2 back -> re-linked to the hub after {relinked - up:.3f}s")
            await asyncio.sleep(1.0)
            stop.set()
            await streaming
            last = max(published)
            await until(lambda: all(len(w.events(channel)) >= last or w.resets(channel) for w in watchers),
                        f"{last} events on every watcher", timeout=20)
            await asyncio.sleep(0.5)
        during = [o for o, t in published.items() if down < t < up]
        assert len(during) > 20, during  # the backend kept publishing through the outage
        marks = [f"e{n}" for n in range(last)]
        for w in watchers:
            check_once_in_order(w.events(channel), marks, f"{w}")
            assert not w.resets(channel), f"{w}: {w.resets(channel)}"
            arrived = {s.item.offset: s.at for s in w.items[channel] if isinstance(s.item, Event)}
            lag = max(arrived[o] - published[o] for o in published)
            if w.role == "w1":
                assert lag < 2.5, f"{w}: an event took {lag:.2f}s"  # 2 shared cores: a stall, not the cut
            else:
                caught_up = max(arrived[o] for o in during) - up
                print(f"{w}: the {len(during)} events of the outage arrived by {caught_up:.3f}s after the cable "
                      f"was back")
        assert w2.seen(r"missed \d+ event", w2_mark), "the w2 worker healed without noticing the gap?"

    run(body)


def test_a_slow_link_still_delivers_once_in_order(net: Network, keyring: Keyring, tmp_path: Path) -> None:
    """30 ms of netem delay each way on w2's link (hub links and its clients' connections alike):
    heartbeats still pass and every event still reaches both hosts once, in order; only later.
    Skipped where the kernel has no netem qdisc."""
    why = net.netem_available()
    if why is not None:
        pytest.skip(why)
    net.delay("w2", 30)
    cluster = start_cluster(net, keyring, tmp_path, hubs=2)
    channels = channels_on_every_shard(2)
    expected: dict[str, list[str]] = {ch: [] for ch in channels}
    positions: dict[tuple[str, str], tuple[int, str]] = {}

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(Watcher(cluster, role, f"{role}-slow-{i}", channels))
                        for role in ROLES for i in range(2)]
            backend = await stack.enter_async_context(Backend(cluster))
            for n in range(20):
                for ch in channels:
                    if n % 3 == 0:
                        await backend.run(Publisher.publish, ch, "chat_message", {"m": f"fire-{n}"})
                        expected[ch].append(f"fire-{n}")
                    elif n % 3 == 1:
                        pos = await backend.run(Publisher.publish, ch, "chat_message", {"m": f"conf-{n}"}, True)
                        expected[ch].append(f"conf-{n}")
                        positions[(ch, f"conf-{n}")] = (pos.offset, pos.epoch)
                    else:
                        status, body = await asyncio.to_thread(cluster.api, "w2", "/api/publish", {
                            "channel": ch, "type": "chat_message", "data": {"m": f"http-{n}"}})
                        assert status == 200, body
                        expected[ch].append(f"http-{n}")
                        positions[(ch, f"http-{n}")] = (body["offset"], body["epoch"])
            await settled(watchers, expected, positions)
        assert not any(cluster.workers[role].seen(r"lost hub") for role in ROLES), "heartbeats lost to 30 ms?"

    run(body)


# -- the hub names its links ------------------------------------------------------------------------------
def test_the_hub_logs_a_worker_link_up_and_lost_with_its_address(net: Network, keyring: Keyring,
                                                                 tmp_path: Path) -> None:
    """The hub names each worker link that comes up and each one it loses (kill -9 of the worker:
    the kernel closes the connection at once), so an operator sees a host come and go."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, workers=("w2",))
    hub = cluster.hub_procs[0]
    w2_ip = re.escape(net.host("w2").ip)
    hub.wait_for(r"worker link from .* up")
    assert hub.seen(rf"worker link from {w2_ip}:\d+ up"), hub.log()
    mark = hub.mark()
    cluster.workers["w2"].kill()
    hub.wait_for(rf"worker link from {w2_ip}:\d+ lost", after=mark, timeout=DETECT_BOUND)


def test_the_hub_logs_a_refused_plain_publisher(net: Network, keyring: Keyring, tmp_path: Path) -> None:
    """A backend misconfigured with TIDINGS_HUB_INSECURE=1 against a CURVE hub gets HubUnavailable;
    the hub operator should see why in the hub's log, as for a plain SUB socket."""
    cluster = start_cluster(net, keyring, tmp_path, hubs=1, workers=())
    hub = cluster.hub_procs[0]
    with Publisher.from_config(Config.load(environ=cluster.publisher_env(None)), send_timeout_ms=500) as plain, \
            pytest.raises(HubUnavailable):
        plain.publish("conversation:plain", "chat_message", {}, confirm=True)
    root_ip = re.escape(f"{net.prefix}.1")  # publishers run in the root namespace, behind the bridge
    hub.wait_for(rf"refused a link from {root_ip}:\d+ on tcp://.* \(requests\)", timeout=2)

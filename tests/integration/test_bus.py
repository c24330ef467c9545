"""workers/bus.py against real ZeroMQ sockets standing in for a hub (loopback, in this process):
what counts as linked, and which losses make the worker wait for channel positions again."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import zmq

from workers.bus import HubBus

HEARTBEAT = 0.2


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_linked_needs_all_three_sockets_and_only_the_events_link_loses_positions() -> None:
    """Linked = the SUB, PUSH and DEALER handshakes all done: a publish or read needs the latter
    two. But only a lost SUB link drops the subscriptions (re-sent, and answered with positions,
    when it is back); a lost read link must not leave channels waiting for positions that a SUB
    which never went away will not bring."""
    ingress, egress, requests = (f"tcp://127.0.0.1:{port}" for port in free_ports(3))

    async def scenario() -> None:
        hub = zmq.Context()
        xpub, pull, router = hub.socket(zmq.XPUB), hub.socket(zmq.PULL), hub.socket(zmq.ROUTER)
        for sock, endpoint in ((xpub, egress), (pull, ingress), (router, requests)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
        states: list[bool] = []
        lost: list[int] = []
        worker = zmq.Context()
        bus = HubBus(worker, 0, ingress, egress, requests, 1000, lambda batch: None,
                     lambda shard, up: states.append(up), lambda frames: None)
        bus.events_lost = lost.append
        bus.secure(None, HEARTBEAT)
        bus.start(asyncio.get_running_loop())
        try:
            await until(lambda: states == [True], "linked")
            router.close(0)  # drops the DEALER's link only (unbinding would leave it half open)
            await until(lambda: states == [True, False], "the read link lost")
            assert bus.reachable and not bus.connected and lost == []
            router = hub.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(requests)
            await until(lambda: states == [True, False, True], "linked again")
            assert lost == []
            xpub.close(0)
            await until(lambda: lost == [0], "the events link lost")
            assert states == [True, False, True, False]
        finally:
            bus.close()
            worker.term()
            for sock in (xpub, pull, router):
                sock.close(0)
            hub.term()

    asyncio.run(asyncio.wait_for(scenario(), 20))

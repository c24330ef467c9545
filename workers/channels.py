"""The worker's local index: channel -> connections, and which channels it holds at the hub.

The worker, not each client, subscribes to the hub: a channel's topic is subscribed when its
first local member joins and released `grace` seconds after its last member left (if nobody
came back), so reconnect churn costs the hub nothing. A newly subscribed topic is `confirmed`
once the hub's confirmation arrives; joins made before that wait for it (`pending`), so that a
client told "subscribed" misses no event published afterwards.

No sockets here: subscribing at the hub is a callback the bus provides.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from hub.envelope import topic_for


@dataclass(slots=True)
class PendingJoin:
    channel: str
    member: Any
    ok: bytes
    failed: bytes | None
    deadline: float


@dataclass(slots=True, eq=False)
class Channel:
    name: str
    topic: bytes
    # Who is subscribed, in join order: a one-slot list while there is a single member (every
    # personal channel, typically: 64 bytes instead of a dict's 224), a dict used as an ordered set
    # from the second member on (O(1) leave on big channels). Read it by iterating, len and `in`.
    members: list[Any] | dict[Any, None] = field(default_factory=list)
    confirmed: bool = False
    pending: list[PendingJoin] | None = None  # joins waiting for the hub; None, not [], when none wait
    empty_since: float | None = None
    last_offset: int = 0  # for gap detection; 0 = nothing seen since subscribing
    epoch: bytes = b""


class ChannelRegistry:
    def __init__(self, subscribe: Callable[[bytes], None], unsubscribe: Callable[[bytes], None]) -> None:
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self.by_name: dict[str, Channel] = {}
        self.by_topic: dict[bytes, Channel] = {}
        self.subscriptions = 0  # member x channel pairs

    def join(self, member: Hashable, name: str, ok: bytes, failed: bytes | None,
             now: float, timeout: float) -> bytes | None:
        """Add member; returns `ok` to send now, or None when it must wait for the hub."""
        channel = self.by_name.get(name)
        if channel is None:
            channel = Channel(name, topic_for(name), [member])
            self.by_name[name] = channel
            self.by_topic[channel.topic] = channel
            self._subscribe(channel.topic)
            self.subscriptions += 1
        elif member not in channel.members:
            members = channel.members
            if type(members) is dict:
                members[member] = None
            elif members:
                channel.members = dict.fromkeys((*members, member))
            else:
                members.append(member)
            self.subscriptions += 1
        channel.empty_since = None
        if channel.confirmed:
            return ok
        waiting = PendingJoin(name, member, ok, failed, now + timeout)
        if channel.pending is None:
            channel.pending = [waiting]
        else:
            channel.pending.append(waiting)
        return None

    def leave(self, member: Hashable, name: str, now: float) -> list[PendingJoin]:
        """Remove member; returns its joins still waiting for the hub (the caller answers them,
        so a subscribe followed at once by an unsubscribe still gets its reply, in order)."""
        channel = self.by_name.get(name)
        if channel is None or member not in channel.members:
            return []
        members = channel.members
        if type(members) is dict:
            del members[member]
        else:
            members.remove(member)
        self.subscriptions -= 1
        waiting: list[PendingJoin] = []
        if channel.pending:
            waiting = [p for p in channel.pending if p.member == member]
            channel.pending = [p for p in channel.pending if p.member != member] or None
        if not channel.members:
            channel.empty_since = now
        return waiting

    def confirm(self, topic: bytes) -> list[PendingJoin]:
        """The hub confirmed topic: the joins to answer with `ok` now."""
        channel = self.by_topic.get(topic)
        if channel is None or channel.confirmed:
            return []
        channel.confirmed = True
        ready, channel.pending = channel.pending or [], None
        return ready

    def sweep(self, now: float, grace: float) -> list[PendingJoin]:
        """Release channels empty for longer than grace; return joins whose wait ran out."""
        expired: list[PendingJoin] = []
        for channel in list(self.by_name.values()):
            if channel.pending:
                late = [p for p in channel.pending if p.deadline <= now]
                if late:
                    channel.pending = [p for p in channel.pending if p.deadline > now] or None
                    expired.extend(late)
            if not channel.members and channel.empty_since is not None and now - channel.empty_since >= grace:
                del self.by_name[channel.name]
                del self.by_topic[channel.topic]
                self._unsubscribe(channel.topic)
        return expired

    def hub_lost(self) -> None:
        """The hub connection dropped. ZeroMQ re-sends every subscription when it is back and the
        hub confirms each again; until then new joins wait, and offsets start over."""
        for channel in self.by_name.values():
            channel.confirmed = False
            channel.last_offset = 0

    def members(self, topic: bytes) -> Channel | None:
        return self.by_topic.get(topic)

    @property
    def hub_topics(self) -> int:
        return len(self.by_name)

    @property
    def active_channels(self) -> int:
        return sum(1 for c in self.by_name.values() if c.members)

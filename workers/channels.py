"""The worker's local index: channel -> connections, and which channels it holds at the hub.

The worker, not each client, subscribes to the hub: a channel's topic is subscribed when its
first local member joins and released `grace` seconds after its last member left (if nobody
came back), so reconnect churn costs the hub nothing. A newly subscribed topic is `confirmed`
once the hub's position message arrives (the channel's top offset and epoch); joins made before
that wait for it (`pending`), so that a client told "subscribed" misses no event published
afterwards and learns where the channel stands. A joining connection that resumes from a
position (`since`) is not a member until its recovery is done (`workers/recovery.py`).

No sockets here: subscribing at the hub is a callback the bus provides.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from hub.envelope import topic_for
from workers.protocol import Join
from workers.recovery import ChannelRecovery, Waiter


@dataclass(slots=True)
class PendingJoin:
    member: Any
    join: Join
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
    last_offset: int = 0  # the last offset received (or the hub's top when it confirmed)
    epoch: bytes = b""  # b"": no position known yet
    recovery: ChannelRecovery | None = None  # resumes and gap heals in progress


class ChannelRegistry:
    def __init__(self, subscribe: Callable[[bytes], None], unsubscribe: Callable[[bytes], None]) -> None:
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self.by_name: dict[str, Channel] = {}
        self.by_topic: dict[bytes, Channel] = {}
        self.subscriptions = 0  # member x channel pairs

    def join(self, member: Hashable, join: Join, now: float, timeout: float) -> tuple[Channel, bool]:
        """(channel, position known). A join without `since` makes member a member at once;
        when the position is not known yet, the join waits for the hub (`pending`)."""
        name = join.channel
        channel = self.by_name.get(name)
        if channel is None:
            channel = Channel(name, topic_for(name))
            self.by_name[name] = channel
            self.by_topic[channel.topic] = channel
            self._subscribe(channel.topic)
        if join.held:
            return channel, True  # already a member (or recovering): answered with what is known now
        if join.since is None:
            self.add_member(channel, member)
        channel.empty_since = None
        if channel.confirmed:
            return channel, True
        waiting = PendingJoin(member, join, now + timeout)
        if channel.pending is None:
            channel.pending = [waiting]
        else:
            channel.pending.append(waiting)
        return channel, False

    def add_member(self, channel: Channel, member: Hashable) -> None:
        members = channel.members
        if member in members:
            return
        if type(members) is dict:
            members[member] = None
        elif members:
            channel.members = dict.fromkeys((*members, member))
        else:
            members.append(member)
        self.subscriptions += 1

    def remove_member(self, channel: Channel, member: Hashable, now: float) -> None:
        members = channel.members
        if member not in members:
            return
        if type(members) is dict:
            del members[member]
        else:
            members.remove(member)
        self.subscriptions -= 1
        if not members:
            channel.empty_since = now

    def leave(self, member: Hashable, name: str, now: float) -> tuple[list[PendingJoin], list[Waiter]]:
        """Remove member; returns its joins still waiting for the hub and its recoveries in
        progress (the caller answers them, so a subscribe followed at once by an unsubscribe
        still gets its reply, in order)."""
        channel = self.by_name.get(name)
        if channel is None:
            return [], []
        self.remove_member(channel, member, now)
        waiting: list[PendingJoin] = []
        if channel.pending:
            waiting = [p for p in channel.pending if p.member == member]
            if waiting:
                channel.pending = [p for p in channel.pending if p.member != member] or None
        recovering = channel.recovery.remove(member) if channel.recovery is not None else []
        if not channel.members and channel.empty_since is None:
            channel.empty_since = now
        return waiting, recovering

    def confirm(self, channel: Channel) -> list[PendingJoin]:
        """The hub sent channel's position: the joins to answer now."""
        if channel.confirmed:
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
            if (not channel.members and channel.empty_since is not None and now - channel.empty_since >= grace
                    and not channel.pending and not (channel.recovery and channel.recovery.waiters)):
                del self.by_name[channel.name]
                del self.by_topic[channel.topic]
                self._unsubscribe(channel.topic)
        return expired

    def hub_lost(self, owned: Callable[[bytes], bool]) -> None:
        """The link to a hub shard dropped; `owned(topic)` says which channels are its. ZeroMQ
        re-sends every subscription when it is back and the hub sends each channel's position
        again; until then new joins wait. The last position is kept: the new one says whether
        members missed events (healed from history) or the channel restarted with a new epoch
        (members are told to resubscribe)."""
        for channel in self.by_name.values():
            if owned(channel.topic):
                channel.confirmed = False

    def members(self, topic: bytes) -> Channel | None:
        return self.by_topic.get(topic)

    @property
    def hub_topics(self) -> int:
        return len(self.by_name)

    @property
    def active_channels(self) -> int:
        return sum(1 for c in self.by_name.values() if c.members)

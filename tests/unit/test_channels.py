"""workers/channels.py: the worker's channel index and its hub subscriptions, with a fake hub."""

from __future__ import annotations

import pytest

from hub.envelope import topic_for
from workers.channels import Channel, ChannelRegistry, PendingJoin
from workers.protocol import Join
from workers.recovery import ChannelRecovery, Waiter, WaiterKind

A, B = "conversation:conv-1", "conversation:conv-12"
TOPIC_A, TOPIC_B = topic_for(A), topic_for(B)
TIMEOUT, GRACE = 2.0, 1.0
EPOCH = b"3f2a9c0d1e5b7a88"


class FakeHub:
    """Records what the registry asked of the SUB socket."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def subscribe(self, topic: bytes) -> None:
        self.calls.append(("sub", topic))

    def unsubscribe(self, topic: bytes) -> None:
        self.calls.append(("unsub", topic))


class Member:
    """A stand-in for a connection: hashed and compared by identity, like the real one."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Member({self.name})"


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def registry(hub: FakeHub) -> ChannelRegistry:
    return ChannelRegistry(hub.subscribe, hub.unsubscribe)


def join(registry: ChannelRegistry, member: object, name: str = A, now: float = 0.0, *,
         since: tuple[int, bytes] | None = None, connect: bool = False, request_id: str | None = "r") -> bool:
    """Join like the glue does; True when the channel's position is known (the join is answered now)."""
    channel, known = registry.join(member, Join(name, request_id, since, connect=connect), now, TIMEOUT)
    assert registry.by_name[name] is channel and registry.by_topic[topic_for(name)] is channel
    return known


def the(registry: ChannelRegistry, name: str = A) -> Channel:
    channel = registry.by_name.get(name)
    assert channel is not None
    return channel


def confirm(registry: ChannelRegistry, name: str = A) -> list[PendingJoin]:
    """The hub's position message for `name` arrived (the glue looks the topic up, then confirms)."""
    channel = registry.members(topic_for(name))
    return [] if channel is None else registry.confirm(channel)


# -- joining ------------------------------------------------------------------------------------------
def test_first_join_subscribes_at_the_hub_and_waits(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    assert join(registry, m) is False  # no position yet: the reply waits
    assert hub.calls == [("sub", TOPIC_A)]
    assert registry.subscriptions == 1
    assert registry.hub_topics == 1
    channel = registry.members(TOPIC_A)
    assert channel is not None and list(channel.members) == [m] and not channel.confirmed
    assert (channel.last_offset, channel.epoch, channel.recovery) == (0, b"", None)  # no position known


def test_members_stay_in_join_order_from_one_to_many_and_back(registry: ChannelRegistry) -> None:
    # one member is held in a one-slot list (personal channels), more in a dict: same behaviour
    m1, m2, m3 = Member("m1"), Member("m2"), Member("m3")
    join(registry, m1)
    join(registry, m1)  # twice: still one membership
    channel = registry.members(TOPIC_A)
    assert channel is not None and list(channel.members) == [m1] and registry.subscriptions == 1
    join(registry, m2)
    join(registry, m3)
    assert list(channel.members) == [m1, m2, m3] and registry.subscriptions == 3
    registry.leave(m2, A, 1.0)
    registry.leave(m2, A, 1.0)  # not a member any more: nothing happens
    assert list(channel.members) == [m1, m3] and registry.subscriptions == 2
    registry.leave(m1, A, 1.0)
    registry.leave(m3, A, 1.0)
    assert len(channel.members) == 0 and registry.subscriptions == 0 and channel.empty_since == 1.0
    join(registry, m2, now=1.5)  # back within the grace period: the same channel
    assert registry.members(TOPIC_A) is channel and list(channel.members) == [m2]
    assert channel.empty_since is None


def test_topics_are_terminated_so_prefixes_stay_apart(registry: ChannelRegistry, hub: FakeHub) -> None:
    join(registry, Member("m1"), A)
    join(registry, Member("m2"), B)
    assert hub.calls == [("sub", b"conversation:conv-1\0"), ("sub", b"conversation:conv-12\0")]
    assert registry.members(TOPIC_A) is not registry.members(TOPIC_B)
    assert registry.members(b"conversation:conv-1") is None


def test_pending_joins_are_answered_on_confirm(registry: ChannelRegistry, hub: FakeHub) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1, now=0.0, request_id="1")
    join(registry, m2, now=0.5, request_id="2")
    assert hub.calls == [("sub", TOPIC_A)]  # one hub subscription for the worker, not per client
    ready = confirm(registry)
    assert [(p.member, p.join.channel, p.join.request_id) for p in ready] == [(m1, A, "1"), (m2, A, "2")]
    assert the(registry).confirmed and the(registry).pending is None
    assert confirm(registry) == []  # confirmations are answered once
    assert join(registry, Member("m3")) is True  # confirmed: answered at once


def test_pending_joins_keep_the_whole_join(registry: ChannelRegistry) -> None:
    # the glue answers `subscribed` or `connected` (or resumes from since) from the Join it kept
    m = Member("m")
    registry.join(m, Join(A, "sub-1", (7, EPOCH)), 0.5, TIMEOUT)
    registry.join(m, Join("user:u1", None, None, connect=True), 0.5, TIMEOUT)
    [ready] = confirm(registry)
    assert ready.join == Join(A, "sub-1", (7, EPOCH)) and ready.deadline == 0.5 + TIMEOUT
    [personal] = confirm(registry, "user:u1")
    assert personal.join.connect and personal.join.failed is None


def test_a_position_for_a_topic_not_held_finds_no_channel(registry: ChannelRegistry) -> None:
    # the glue looks the topic up before confirming: a stray position message changes nothing
    assert registry.members(b"task:1\0") is None
    assert confirm(registry, "task:1") == []
    assert registry.hub_topics == 0


def test_rejoining_member_is_counted_once(registry: ChannelRegistry) -> None:
    m = Member("m")
    join(registry, m)
    confirm(registry)
    assert join(registry, m) is True
    assert registry.subscriptions == 1


def test_pending_join_times_out_in_sweep(registry: ChannelRegistry) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1, now=0.0)
    join(registry, m2, now=1.0)
    assert registry.sweep(now=TIMEOUT - 0.01, grace=GRACE) == []
    late = registry.sweep(now=TIMEOUT, grace=GRACE)  # the deadline itself is late
    assert [p.member for p in late] == [m1]
    assert late[0].join.failed is not None  # a subscribe: the glue undoes it and says it failed
    assert [p.member for p in registry.sweep(now=1.0 + TIMEOUT, grace=GRACE)] == [m2]
    assert registry.sweep(now=100.0, grace=GRACE) == []  # each late join is reported once
    assert confirm(registry) == []  # nothing left to answer


def test_timed_out_members_stay_until_the_glue_removes_them(registry: ChannelRegistry, hub: FakeHub) -> None:
    # sweep only reports: the glue leaves (failed set) or keeps the member (failed None: connect).
    m = Member("m")
    join(registry, m, "user:u1", connect=True, request_id=None)
    assert [p.join.failed for p in registry.sweep(now=TIMEOUT, grace=GRACE)] == [None]
    assert registry.subscriptions == 1
    assert ("unsub", topic_for("user:u1")) not in hub.calls


# -- joining with since: not a member until recovered -----------------------------------------------------
def test_a_join_with_since_is_not_a_member_yet(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    assert join(registry, m, since=(3, EPOCH)) is False
    channel = the(registry)
    assert hub.calls == [("sub", TOPIC_A)]  # the worker holds the channel at the hub all the same
    assert list(channel.members) == [] and registry.subscriptions == 0  # no live events before recovery
    [ready] = confirm(registry)
    assert ready.member is m and ready.join.since == (3, EPOCH)
    assert join(registry, Member("n"), since=(3, EPOCH)) is True  # position known: the glue resumes it now
    assert list(channel.members) == []
    registry.add_member(channel, m)  # recovered: the glue makes it live
    registry.add_member(channel, m)
    assert list(channel.members) == [m] and registry.subscriptions == 1


def test_a_channel_with_only_a_resuming_join_is_not_released(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    join(registry, m, since=(3, EPOCH))
    registry.sweep(now=1.0, grace=GRACE)  # not late yet, and the join still waits
    assert hub.calls == [("sub", TOPIC_A)] and registry.hub_topics == 1


def test_leave_of_a_resuming_join_drops_it_and_starts_the_grace(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    join(registry, m, since=(3, EPOCH))
    waiting, recovering = registry.leave(m, A, now=5.0)
    assert [p.join.since for p in waiting] == [(3, EPOCH)] and recovering == []
    assert the(registry).empty_since == 5.0 and the(registry).pending is None
    registry.sweep(now=5.0 + GRACE, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A), ("unsub", TOPIC_A)]


def test_waiters_in_recovery_keep_the_channel_and_leave_returns_them(registry: ChannelRegistry,
                                                                     hub: FakeHub) -> None:
    m, other = Member("m"), Member("other")
    join(registry, m)
    confirm(registry)
    channel = the(registry)
    registry.remove_member(channel, m, now=1.0)  # healing a gap: out of the live members while it waits
    assert channel.empty_since == 1.0 and registry.subscriptions == 0
    mine, theirs = Waiter(m, 3, WaiterKind.HEAL), Waiter(other, 2, WaiterKind.SUBSCRIBE, "s")
    channel.recovery = ChannelRecovery(waiters=[mine, theirs])
    registry.sweep(now=1.0 + 10 * GRACE, grace=GRACE)
    assert ("unsub", TOPIC_A) not in hub.calls  # its waiters need the channel's live events
    assert registry.leave(m, A, now=20.0) == ([], [mine])  # the caller answers them
    assert channel.recovery.waiters == [theirs]
    registry.sweep(now=100.0, grace=GRACE)
    assert ("unsub", TOPIC_A) not in hub.calls
    assert registry.leave(other, A, now=100.0) == ([], [theirs])
    registry.sweep(now=100.0 + GRACE, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A), ("unsub", TOPIC_A)]


def test_remove_member_is_idempotent(registry: ChannelRegistry) -> None:
    m = Member("m")
    join(registry, m)
    channel = the(registry)
    registry.remove_member(channel, m, now=2.0)
    registry.remove_member(channel, m, now=3.0)  # not a member: nothing changes, not even empty_since
    assert registry.subscriptions == 0 and channel.empty_since == 2.0


# -- leaving and the grace period -------------------------------------------------------------------------
def test_last_leave_releases_after_grace_not_before(registry: ChannelRegistry, hub: FakeHub) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1)
    join(registry, m2)
    confirm(registry)
    registry.leave(m1, A, now=10.0)
    registry.sweep(now=100.0, grace=GRACE)
    assert ("unsub", TOPIC_A) not in hub.calls  # m2 is still there
    registry.leave(m2, A, now=100.0)
    assert registry.subscriptions == 0
    assert registry.active_channels == 0 and registry.hub_topics == 1
    registry.sweep(now=100.0 + GRACE - 0.01, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A)]
    registry.sweep(now=100.0 + GRACE, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A), ("unsub", TOPIC_A)]
    assert registry.hub_topics == 0 and registry.members(TOPIC_A) is None
    registry.sweep(now=200.0, grace=GRACE)
    assert hub.calls.count(("unsub", TOPIC_A)) == 1


def test_rejoin_within_grace_keeps_the_topic(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    join(registry, m)
    confirm(registry)
    registry.leave(m, A, now=10.0)
    assert join(registry, Member("back"), now=10.5) is True  # still confirmed
    registry.sweep(now=50.0, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A)]
    assert registry.active_channels == 1


def test_join_after_release_subscribes_again(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    join(registry, m)
    confirm(registry)
    registry.leave(m, A, now=0.0)
    registry.sweep(now=GRACE, grace=GRACE)
    assert join(registry, m, now=5.0) is False  # a new hub subscription, to be confirmed again
    assert hub.calls == [("sub", TOPIC_A), ("unsub", TOPIC_A), ("sub", TOPIC_A)]
    assert the(registry).epoch == b""  # a new Channel: its position is learnt again


def test_leave_is_idempotent_and_ignores_strangers(registry: ChannelRegistry) -> None:
    m = Member("m")
    join(registry, m)
    registry.leave(Member("stranger"), A, now=0.0)
    registry.leave(m, "task:never", now=0.0)
    assert registry.subscriptions == 1
    registry.leave(m, A, now=0.0)
    registry.leave(m, A, now=0.0)
    assert registry.subscriptions == 0


def test_leave_drops_that_members_pending_join(registry: ChannelRegistry) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1)
    join(registry, m2)
    registry.leave(m1, A, now=0.5)
    assert [p.member for p in confirm(registry)] == [m2]


def test_leave_drops_the_pending_join_of_an_equal_member_key(registry: ChannelRegistry) -> None:
    def key() -> tuple[str, int]:
        return ("conn", int("1000001"))  # built at run time: equal each call, never the same object

    assert key() == key() and key() is not key()
    registry.join(key(), Join(A, None), 0.0, TIMEOUT)
    registry.leave(key(), A, now=0.5)
    assert registry.subscriptions == 0
    assert confirm(registry) == []


# -- the hub going away --------------------------------------------------------------------------------------
def test_hub_lost_makes_new_joins_wait_until_confirmed_again(registry: ChannelRegistry, hub: FakeHub) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1)
    confirm(registry)
    channel = registry.members(TOPIC_A)
    assert channel is not None
    channel.last_offset, channel.epoch = 41, EPOCH
    registry.hub_lost(lambda topic: True)
    # the last position is kept: the hub's next one says whether members missed events
    assert not channel.confirmed and (channel.last_offset, channel.epoch) == (41, EPOCH)
    assert join(registry, m2, now=3.0) is False
    assert hub.calls == [("sub", TOPIC_A)]  # ZeroMQ re-sends subscriptions: nothing asked here
    assert [p.member for p in confirm(registry)] == [m2]
    assert set(channel.members) == {m1, m2}


# -- counting -------------------------------------------------------------------------------------------------
def test_subscription_counting(registry: ChannelRegistry) -> None:
    members = [Member(f"m{i}") for i in range(3)]
    for m in members:
        join(registry, m, A)
    join(registry, members[0], B)
    assert (registry.subscriptions, registry.hub_topics, registry.active_channels) == (4, 2, 2)
    registry.leave(members[0], A, now=0.0)
    registry.leave(members[0], B, now=0.0)
    assert (registry.subscriptions, registry.hub_topics, registry.active_channels) == (2, 2, 1)
    # B's only join was left while it waited: released after the grace like any empty channel
    registry.sweep(now=GRACE, grace=GRACE)
    assert (registry.subscriptions, registry.hub_topics, registry.active_channels) == (2, 1, 1)
    for m in members[1:]:
        registry.leave(m, A, now=5.0)
    registry.sweep(now=5.0 + GRACE, grace=GRACE)
    assert (registry.subscriptions, registry.hub_topics, registry.active_channels) == (0, 0, 0)
    assert registry.by_name == {} and registry.by_topic == {}


def test_leave_returns_the_members_joins_still_waiting(registry: ChannelRegistry) -> None:
    early, other = Member("early"), Member("other")
    join(registry, early)
    join(registry, other)
    waiting, recovering = registry.leave(early, A, now=0.0)
    assert [(p.member, p.join.channel) for p in waiting] == [(early, A)]  # answered by the caller
    assert recovering == []
    assert [p.member for p in confirm(registry)] == [other]
    assert registry.leave(other, A, now=0.0) == ([], [])  # confirmed: nothing waits any more
    assert registry.leave(other, "task:never", now=0.0) == ([], [])

"""workers/channels.py: the worker's channel index and its hub subscriptions, with a fake hub."""

from __future__ import annotations

import pytest

from hub.envelope import topic_for
from workers.channels import ChannelRegistry

A, B = "conversation:conv-1", "conversation:conv-12"
TOPIC_A, TOPIC_B = topic_for(A), topic_for(B)
TIMEOUT, GRACE = 2.0, 1.0


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


def join(registry: ChannelRegistry, member: object, name: str = A, now: float = 0.0,
         failed: bytes | None = b"failed") -> bytes | None:
    return registry.join(member, name, b"ok:" + name.encode(), failed, now, TIMEOUT)


# -- joining ------------------------------------------------------------------------------------------
def test_first_join_subscribes_at_the_hub_and_waits(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    assert join(registry, m) is None  # not confirmed yet: the reply waits
    assert hub.calls == [("sub", TOPIC_A)]
    assert registry.subscriptions == 1
    assert registry.hub_topics == 1
    channel = registry.members(TOPIC_A)
    assert channel is not None and list(channel.members) == [m] and not channel.confirmed


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
    join(registry, m1, now=0.0)
    join(registry, m2, now=0.5)
    assert hub.calls == [("sub", TOPIC_A)]  # one hub subscription for the worker, not per client
    ready = registry.confirm(TOPIC_A)
    assert [(p.member, p.ok, p.channel) for p in ready] == [(m1, b"ok:" + A.encode(), A), (m2, b"ok:" + A.encode(), A)]
    assert registry.confirm(TOPIC_A) == []  # confirmations are answered once
    assert join(registry, Member("m3")) == b"ok:" + A.encode()  # confirmed: answered at once


def test_confirm_of_an_unknown_topic_is_ignored(registry: ChannelRegistry) -> None:
    assert registry.confirm(b"task:1\0") == []
    assert registry.hub_topics == 0


def test_rejoining_member_is_counted_once(registry: ChannelRegistry) -> None:
    m = Member("m")
    join(registry, m)
    registry.confirm(TOPIC_A)
    assert join(registry, m) == b"ok:" + A.encode()
    assert registry.subscriptions == 1


def test_pending_join_times_out_in_sweep(registry: ChannelRegistry) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1, now=0.0)
    join(registry, m2, now=1.0)
    assert registry.sweep(now=TIMEOUT - 0.01, grace=GRACE) == []
    late = registry.sweep(now=TIMEOUT, grace=GRACE)  # the deadline itself is late
    assert [(p.member, p.failed) for p in late] == [(m1, b"failed")]
    assert [p.member for p in registry.sweep(now=1.0 + TIMEOUT, grace=GRACE)] == [m2]
    assert registry.sweep(now=100.0, grace=GRACE) == []  # each late join is reported once
    assert registry.confirm(TOPIC_A) == []  # nothing left to answer


def test_timed_out_members_stay_until_the_glue_removes_them(registry: ChannelRegistry, hub: FakeHub) -> None:
    # sweep only reports: the glue leaves (failed set) or keeps the member (failed None).
    m = Member("m")
    join(registry, m, failed=None)
    assert [p.failed for p in registry.sweep(now=TIMEOUT, grace=GRACE)] == [None]
    assert registry.subscriptions == 1
    assert ("unsub", TOPIC_A) not in hub.calls


# -- leaving and the grace period -------------------------------------------------------------------------
def test_last_leave_releases_after_grace_not_before(registry: ChannelRegistry, hub: FakeHub) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1)
    join(registry, m2)
    registry.confirm(TOPIC_A)
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
    registry.confirm(TOPIC_A)
    registry.leave(m, A, now=10.0)
    assert join(registry, Member("back"), now=10.5) == b"ok:" + A.encode()  # still confirmed
    registry.sweep(now=50.0, grace=GRACE)
    assert hub.calls == [("sub", TOPIC_A)]
    assert registry.active_channels == 1


def test_join_after_release_subscribes_again(registry: ChannelRegistry, hub: FakeHub) -> None:
    m = Member("m")
    join(registry, m)
    registry.confirm(TOPIC_A)
    registry.leave(m, A, now=0.0)
    registry.sweep(now=GRACE, grace=GRACE)
    assert join(registry, m, now=5.0) is None  # a new hub subscription, to be confirmed again
    assert hub.calls == [("sub", TOPIC_A), ("unsub", TOPIC_A), ("sub", TOPIC_A)]


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
    assert [p.member for p in registry.confirm(TOPIC_A)] == [m2]


def test_leave_drops_the_pending_join_of_an_equal_member_key(registry: ChannelRegistry) -> None:
    def key() -> tuple[str, int]:
        return ("conn", int("1000001"))  # built at run time: equal each call, never the same object

    assert key() == key() and key() is not key()
    registry.join(key(), A, b"ok", b"failed", 0.0, TIMEOUT)
    registry.leave(key(), A, now=0.5)
    assert registry.subscriptions == 0
    assert registry.confirm(TOPIC_A) == []


# -- the hub going away --------------------------------------------------------------------------------------
def test_hub_lost_makes_new_joins_wait_until_confirmed_again(registry: ChannelRegistry, hub: FakeHub) -> None:
    m1, m2 = Member("m1"), Member("m2")
    join(registry, m1)
    registry.confirm(TOPIC_A)
    channel = registry.members(TOPIC_A)
    assert channel is not None
    channel.last_offset = 41
    registry.hub_lost()
    assert not channel.confirmed and channel.last_offset == 0
    assert join(registry, m2, now=3.0) is None
    assert hub.calls == [("sub", TOPIC_A)]  # ZeroMQ re-sends subscriptions: nothing asked here
    assert [p.member for p in registry.confirm(TOPIC_A)] == [m2]
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
    waiting = registry.leave(early, A, now=0.0)
    assert [(p.member, p.channel) for p in waiting] == [(early, A)]  # answered by the caller
    assert [p.member for p in registry.confirm(TOPIC_A)] == [other]
    assert registry.leave(other, A, now=0.0) == []  # confirmed: nothing waits any more

"""workers/recovery.py: merging history with held live events, and one channel's recovery
(reads, settling waiters, retries, giving up). Pure: no sockets, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.recovery import MAX_READS, ChannelRecovery, Outcome, Waiter, WaiterKind, merge

MAX_EVENTS = 100


def p(offset: int) -> bytes:
    return b'{"offset":%d}' % offset


def events(first: int, last: int) -> list[tuple[int, bytes]]:
    """(offset, payload) for first..last inclusive."""
    return [(o, p(o)) for o in range(first, last + 1)]


def payloads(first: int, last: int) -> list[bytes]:
    return [p(o) for o in range(first, last + 1)]


class Member:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Member({self.name})"


def begin_read(recovery: ChannelRecovery, request_id: bytes = b"r") -> int:
    """What the worker does to ask the hub: read from next_read(), one read more."""
    since = recovery.next_read()
    assert since is not None
    recovery.read_sent(request_id, since)
    return since


def waiter(since: int, name: str = "m", kind: int = WaiterKind.SUBSCRIBE) -> Waiter:
    return Waiter(Member(name), since, kind, "id-" + name)


# -- merge -------------------------------------------------------------------------------------------------
def test_merge_joins_sources_in_offset_order() -> None:
    assert merge(2, 5, events(3, 4), events(5, 5)) == payloads(3, 5)
    assert merge(2, 5, events(5, 5), events(3, 4)) == payloads(3, 5)  # source order does not matter
    assert merge(0, 4, [(3, p(3)), (1, p(1))], [(4, p(4)), (2, p(2))]) == payloads(1, 4)


def test_merge_drops_duplicates_across_and_within_sources() -> None:
    assert merge(0, 6, events(1, 5), events(3, 6), events(2, 2)) == payloads(1, 6)
    assert merge(0, 2, [(1, p(1)), (1, p(1)), (2, p(2))]) == payloads(1, 2)


def test_merge_keeps_only_the_asked_range() -> None:
    assert merge(3, 5, events(1, 9)) == payloads(4, 5)


def test_merge_is_none_on_any_hole() -> None:
    assert merge(0, 3, [(1, p(1)), (3, p(3))]) is None  # in the middle
    assert merge(0, 3, events(2, 3)) is None  # at the start
    assert merge(0, 3, events(1, 2)) is None  # at the end
    assert merge(0, 1) is None  # no source at all
    assert merge(0, 3, events(1, 1), events(3, 5)) is None  # out-of-range extras do not fill it


def test_merge_is_empty_when_nothing_is_asked() -> None:
    assert merge(5, 5) == []
    assert merge(5, 5, events(1, 9)) == []
    assert merge(7, 3, events(1, 9)) == []


@st.composite
def recoveries(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(since S, live N, history, held): history a contiguous slice A..H of 1..N with A <= S+1 and
    H >= S, held L..N with L <= H+1 (overlapping history or not), both shuffled, with duplicates."""
    n = draw(st.integers(1, 60))
    since = draw(st.integers(0, n))
    history_end = draw(st.integers(since, n))
    history_start = draw(st.integers(1, since + 1))
    held_start = draw(st.integers(1, history_end + 1))
    history = events(history_start, history_end)
    held = events(held_start, n)
    for source in (history, held):
        if source:
            source.extend(draw(st.lists(st.sampled_from(source), max_size=10)))  # duplicates
    history = draw(st.permutations(history))
    held = draw(st.permutations(held))
    return since, n, history, held


PROPERTY = settings(max_examples=400, deadline=None, database=None, derandomize=True)


@PROPERTY
@given(recoveries())
def test_merge_gives_every_offset_once_in_order(case: tuple[int, int, list, list]) -> None:
    since, live, history, held = case
    assert merge(since, live, history, held) == payloads(since + 1, live)
    assert merge(since, live, held, history) == payloads(since + 1, live)


@PROPERTY
@given(recoveries())
def test_merge_is_none_when_any_single_offset_is_missing(case: tuple[int, int, list, list]) -> None:
    since, live, history, held = case
    for missing in range(since + 1, live + 1):
        assert merge(since, live, [e for e in history if e[0] != missing], [e for e in held if e[0] != missing]) \
            is None, missing


# -- ChannelRecovery: reads ------------------------------------------------------------------------------------
def test_next_read_is_the_lowest_position_and_none_while_a_read_is_in_flight() -> None:
    recovery = ChannelRecovery()
    assert recovery.next_read() is None  # nobody waits
    recovery.waiters += [waiter(5, "a"), waiter(3, "b"), waiter(7, "c")]
    assert recovery.next_read() == 3
    assert begin_read(recovery) == 3
    recovery.waiters.append(waiter(1, "late"))
    assert recovery.next_read() is None  # one read at a time per channel
    recovery.settle(True, True, events(4, 9), 9, MAX_EVENTS)
    assert recovery.read_id is None and recovery.next_read() == 1  # the late one, from further back


def test_a_read_that_cannot_leave_is_retried_for_a_while_then_given_up() -> None:
    """Right after a re-link the read socket may not be linked yet: the waiters wait a moment."""
    recovery = ChannelRecovery(waiters=[waiter(3)])
    assert recovery.read_unsent(10.0, patience=2.0) and recovery.retry_pending
    assert recovery.next_read() is None  # one retry pending, no second read meanwhile
    recovery.retry_pending = False  # the retry runs
    assert recovery.next_read() == 3
    assert recovery.read_unsent(11.9, patience=2.0)  # measured from the first failure
    recovery.retry_pending = False
    assert not recovery.read_unsent(12.0, patience=2.0) and not recovery.retry_pending
    recovery.read_sent(b"r", 3)
    assert recovery.unsent_since is None  # a later failure gets its full patience again


def test_giving_up_ends_a_pending_retry() -> None:
    recovery = ChannelRecovery(waiters=[waiter(3)])
    recovery.read_unsent(0.0, patience=2.0)
    assert [o.events for o in recovery.give_up()] == [None]
    assert not recovery.retry_pending and recovery.unsent_since is None


# -- ChannelRecovery: settle -----------------------------------------------------------------------------------
def test_settle_gives_each_waiter_its_events_from_history_and_held() -> None:
    recovery = ChannelRecovery()
    a, b = waiter(3, "a"), waiter(5, "b", WaiterKind.HEAL)
    recovery.waiters += [a, b]
    begin_read(recovery)
    recovery.held += events(7, 9)  # live events that arrived while the read was in flight
    done = recovery.settle(True, True, events(4, 8), 9, MAX_EVENTS)  # history overlaps held at 7, 8
    assert done == [Outcome(a, payloads(4, 9)), Outcome(b, payloads(6, 9))]
    assert recovery.waiters == [] and recovery.held == [] and recovery.read_id is None


def test_a_waiter_already_at_the_live_position_gets_no_events() -> None:
    recovery = ChannelRecovery(waiters=[w := waiter(9)])
    begin_read(recovery)
    assert recovery.settle(True, True, [], 9, MAX_EVENTS) == [Outcome(w, [])]


def test_another_epoch_fails_every_waiter() -> None:
    recovery = ChannelRecovery()
    a, b = waiter(3, "a"), waiter(5, "b")
    recovery.waiters += [a]
    begin_read(recovery)
    recovery.waiters.append(b)
    recovery.held += events(6, 6)
    done = recovery.settle(True, False, events(4, 6), 6, MAX_EVENTS)
    assert done == [Outcome(a, None), Outcome(b, None)]  # the waiter's position means nothing in it
    assert recovery.waiters == [] and recovery.held == []


def test_a_gap_above_max_events_fails() -> None:
    recovery = ChannelRecovery()
    far, edge = waiter(10, "far"), waiter(11, "edge")
    recovery.waiters += [far, edge]
    begin_read(recovery)
    live = 11 + MAX_EVENTS
    done = recovery.settle(True, True, events(11, live), live, MAX_EVENTS)
    assert done == [Outcome(far, None), Outcome(edge, payloads(12, live))]  # exactly max_events is fine


def test_a_waiter_from_below_the_read_waits_for_the_next_read() -> None:
    recovery = ChannelRecovery()
    first = waiter(5, "first")
    recovery.waiters.append(first)
    assert begin_read(recovery, b"1") == 5
    late = waiter(2, "late")  # joined while the read was in flight, from further back
    recovery.waiters.append(late)
    recovery.held += events(8, 8)
    assert recovery.settle(True, True, events(6, 7), 8, MAX_EVENTS) == [Outcome(first, payloads(6, 8))]
    assert recovery.waiters == [late] and recovery.held == events(8, 8)  # kept for it
    assert begin_read(recovery, b"2") == 2
    recovery.held += events(9, 9)
    assert recovery.settle(True, True, events(3, 8), 9, MAX_EVENTS) == [Outcome(late, payloads(3, 9))]
    assert recovery.waiters == [] and recovery.held == []


def test_a_hole_above_the_history_reads_again_then_fails_after_max_reads() -> None:
    # offset 7 was lost on the way to this worker while it waited: the hub had only up to 6 when it
    # answered, so the next read may bring it
    recovery = ChannelRecovery(waiters=[w := waiter(3)])
    recovery.held += events(8, 8)
    for read in range(1, MAX_READS):
        begin_read(recovery)
        assert recovery.settle(True, True, events(4, 6), 8, MAX_EVENTS) == []
        assert recovery.waiters == [w] and recovery.reads == read and recovery.next_read() == 3
    begin_read(recovery)
    assert recovery.settle(True, True, events(4, 6), 8, MAX_EVENTS) == [Outcome(w, None)]
    assert recovery.reads == MAX_READS and recovery.waiters == [] and recovery.held == []


def test_a_hole_filled_by_a_later_read_recovers() -> None:
    recovery = ChannelRecovery(waiters=[w := waiter(3)])
    recovery.held += events(8, 8)
    begin_read(recovery)
    assert recovery.settle(True, True, events(4, 6), 8, MAX_EVENTS) == []
    begin_read(recovery)
    assert recovery.settle(True, True, events(4, 8), 8, MAX_EVENTS) == [Outcome(w, payloads(4, 8))]


def test_not_covered_fails() -> None:
    # the hub no longer has the events after the waiter's position (trimmed, expired, evicted)
    recovery = ChannelRecovery(waiters=[w := waiter(3)])
    recovery.held += events(8, 8)
    begin_read(recovery)
    assert recovery.settle(False, True, [], 8, MAX_EVENTS) == [Outcome(w, None)]
    assert recovery.reads == 1 and recovery.waiters == []


def test_a_hole_inside_the_history_fails_at_once() -> None:
    recovery = ChannelRecovery(waiters=[w := waiter(3)])
    begin_read(recovery)
    assert recovery.settle(True, True, [*events(4, 5), *events(7, 8)], 8, MAX_EVENTS) == [Outcome(w, None)]


def test_held_events_alone_can_recover_whatever_the_hub_says() -> None:
    recovery = ChannelRecovery(waiters=[w := waiter(5)])
    recovery.held += events(6, 8)
    begin_read(recovery)
    assert recovery.settle(False, True, [], 8, MAX_EVENTS) == [Outcome(w, payloads(6, 8))]


# -- ChannelRecovery: giving up and leaving -------------------------------------------------------------------
def test_give_up_fails_every_waiter_and_resets() -> None:
    recovery = ChannelRecovery()
    a, b = waiter(3, "a"), waiter(1, "b", WaiterKind.CONNECT)
    recovery.waiters += [a, b]
    begin_read(recovery)
    recovery.held += events(4, 5)
    assert recovery.give_up() == [Outcome(a, None), Outcome(b, None)]
    assert (recovery.waiters, recovery.held, recovery.read_id) == ([], [], None)
    assert recovery.next_read() is None
    assert recovery.give_up() == []


def test_remove_returns_that_members_waiters_only() -> None:
    m, other = Member("m"), Member("other")
    mine = [Waiter(m, 3, WaiterKind.SUBSCRIBE, "1"), Waiter(m, 4, WaiterKind.HEAL)]
    theirs = Waiter(other, 2, WaiterKind.CONNECT)
    recovery = ChannelRecovery(waiters=[mine[0], theirs, mine[1]])
    assert recovery.remove(m) == mine
    assert recovery.waiters == [theirs]
    assert recovery.remove(m) == [] and recovery.remove(Member("stranger")) == []
    assert recovery.next_read() == 2


@pytest.mark.parametrize("kind", [WaiterKind.SUBSCRIBE, WaiterKind.CONNECT, WaiterKind.HEAL])
def test_waiters_keep_what_the_worker_answers_with(kind: int) -> None:
    w = Waiter(Member("m"), 7, kind, "req")
    recovery = ChannelRecovery(waiters=[w])
    begin_read(recovery)
    [outcome] = recovery.settle(True, True, events(8, 8), 8, MAX_EVENTS)
    assert outcome.waiter is w and (w.kind, w.request_id, w.since) == (kind, "req", 7)

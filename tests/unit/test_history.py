"""hub/history.py: the retention spec, per-channel offsets and epochs, reads with `since`, and
the three memory bounds (per namespace, the byte budget, the metadata TTL). Time is passed in."""

from __future__ import annotations

import json

import pytest

from hub.envelope import EPOCH_BYTES, split_egress
from hub.history import HistoryRead, HistorySpecError, HistoryStore, Retention, parse_history_spec

SPEC = "conversation=3/10s,user=5/100s"  # conversation keeps 3 events for 10 s, user 5 for 100 s
META_TTL = 1_000.0
NOW = 5_000.0


def new_store(spec: str = SPEC, max_bytes: int = 1 << 20, meta_ttl: float = META_TTL) -> HistoryStore:
    return HistoryStore(parse_history_spec(spec), max_bytes, meta_ttl)


def topic(name: str) -> bytes:
    return name.encode() + b"\0"


def body(name: str, n: int = 0) -> bytes:
    return b'{"type":"x","channel":"%s","data":{"n":%d},"timestamp":"t"}' % (name.encode(), n)


def stamp(store: HistoryStore, name: str, count: int = 1, now: float = NOW) -> list[bytes]:
    """`count` events on channel `name`, their data numbered by the offset they will get."""
    start = store.position(topic(name), now)[0] if topic(name) in store.streams else 0
    return [store.stamp(topic(name), body(name, start + i + 1), now) for i in range(count)]


def offsets(items: list[bytes]) -> list[int]:
    return [split_egress(m)[1] for m in items]


def never(_topic: bytes) -> bool:
    return False


def read(store: HistoryStore, name: str, since: tuple[int, bytes] | None, limit: int = 100,
         now: float = NOW) -> HistoryRead:
    return store.read(topic(name), since, limit, now)


# -- the spec ----------------------------------------------------------------------------------------------
def test_spec_of_several_namespaces() -> None:
    retentions = parse_history_spec("conversation=100/300s,user=50/3600s")
    assert list(retentions) == ["conversation", "user"]
    assert [(r.namespace, r.size, r.ttl) for r in retentions.values()] == [
        ("conversation", 100, 300.0), ("user", 50, 3600.0)]
    assert all(isinstance(r, Retention) and not r.holding for r in retentions.values())


@pytest.mark.parametrize(("spec", "expected"), [
    ("", {}),
    (",", {}),
    ("task=1/0.5s", {"task": (1, 0.5)}),
    ("task=7/30", {"task": (7, 30.0)}),  # the s is optional
    (" conversation = 10 / 60s , user=2/5s, ", {"conversation": (10, 60.0), "user": (2, 5.0)}),
    ("a.b-c_d@e=1/1s", {"a.b-c_d@e": (1, 1.0)}),
])
def test_good_specs(spec: str, expected: dict[str, tuple[int, float]]) -> None:
    assert {n: (r.size, r.ttl) for n, r in parse_history_spec(spec).items()} == expected


FORMAT = "namespace=EVENTS/SECONDSs"


@pytest.mark.parametrize(("spec", "part", "why"), [
    ("conversation", "conversation", FORMAT),
    ("conversation=100", "conversation=100", FORMAT),
    ("conversation=/300s", "conversation=/300s", FORMAT),
    ("conversation=x/300s", "conversation=x/300s", FORMAT),
    ("conversation=1.5/300s", "conversation=1.5/300s", FORMAT),
    ("conversation=100/", "conversation=100/", FORMAT),
    ("conversation=100/s", "conversation=100/s", FORMAT),
    ("conversation=100/5m", "conversation=100/5m", FORMAT),
    ("conversation=100/300s/2", "conversation=100/300s/2", FORMAT),
    ("user=1/1s,conversation=100/abc", "conversation=100/abc", FORMAT),
    ("=100/300s", "=100/300s", "the namespace is the part of a channel before its first ':'"),
    ("conversation:x=100/300s", "conversation:x=100/300s", "before its first ':'"),
    ("conversation=0/300s", "conversation=0/300s", "keep at least 1 event for more than 0 seconds"),
    ("conversation=-3/300s", "conversation=-3/300s", "at least 1 event"),
    ("conversation=10/0s", "conversation=10/0s", "more than 0 seconds"),
    ("conversation=10/-5s", "conversation=10/-5s", "more than 0 seconds"),
    ("conversation=1/1s,user=2/2s,conversation=3/3s", "conversation=3/3s", "namespace 'conversation' is named twice"),
])
def test_bad_specs_say_which_part_and_why(spec: str, part: str, why: str) -> None:
    with pytest.raises(HistorySpecError) as info:
        parse_history_spec(spec)
    message = str(info.value)
    assert message.startswith(repr(part) + ":"), message
    assert why in message, message
    assert isinstance(info.value, ValueError)


def test_a_nan_ttl_is_a_bad_spec() -> None:
    with pytest.raises(HistorySpecError):
        parse_history_spec("conversation=10/nans")


# -- stamping: offsets and epochs --------------------------------------------------------------------------
def test_offsets_count_from_one_per_channel() -> None:
    store = new_store()
    a1, b1, a2, a3, b2 = (store.stamp(topic(n), body(n), NOW) for n in
                          ("conversation:a", "conversation:b", "conversation:a", "conversation:a", "conversation:b"))
    assert offsets([a1, a2, a3]) == [1, 2, 3]
    assert offsets([b1, b2]) == [1, 2]
    assert store.position(topic("conversation:a"), NOW)[0] == 3


def test_the_stamped_message_is_the_egress_event() -> None:
    store = new_store()
    message = store.stamp(topic("conversation:a"), body("conversation:a", 1), NOW)
    got_topic, offset, hub_time, epoch, payload = split_egress(message)
    assert (got_topic, offset, hub_time) == (topic("conversation:a"), 1, NOW)
    assert json.loads(payload) == {"type": "x", "channel": "conversation:a", "data": {"n": 1}, "timestamp": "t",
                                   "offset": 1, "epoch": epoch.decode()}


def test_epochs_are_per_channel_ascii_and_stable() -> None:
    store = new_store()
    names = ["conversation:a", "conversation:b", "user:u1", "task:1"]  # with and without history
    epochs = {}
    for name in names:
        epochs[name] = split_egress(store.stamp(topic(name), body(name), NOW))[3]
    for name, epoch in epochs.items():
        assert len(epoch) == EPOCH_BYTES == 16 and epoch.isascii() and epoch.decode().isprintable()
        again = [split_egress(m)[3] for m in stamp(store, name, 3)]
        assert again == [epoch] * 3  # stable for the channel
        assert store.position(topic(name), NOW)[1] == epoch
    # streams created in one era share the era's epoch (and its objects: no copy per channel)
    assert len(set(epochs.values())) == 1
    assert store.streams[topic("conversation:a")].epoch is store.streams[topic("task:1")].epoch
    assert len({e[:8] for e in epochs.values()}) == 1  # one hub start: one random prefix


def test_an_injected_epoch_prefix_starts_every_epoch() -> None:
    store = HistoryStore({}, 1 << 20, META_TTL, epoch_prefix=b"0badcafe")
    assert store.position(topic("a:1"), NOW)[1] == b"0badcafe00000001"
    assert store.position(topic("a:2"), NOW)[1] == b"0badcafe00000001"  # the same era


def test_a_dropped_channel_comes_back_in_a_new_era_and_the_others_keep_theirs() -> None:
    store = HistoryStore({}, 1 << 20, META_TTL, epoch_prefix=b"0badcafe")
    stamp(store, "a:gone", 3, now=NOW)
    kept = store.position(topic("a:kept"), NOW)[1]
    store.expire(NOW + META_TTL, lambda t: t == topic("a:kept"))
    assert topic("a:gone") not in store.streams and store.era == 2
    again = split_egress(stamp(store, "a:gone", 1, now=NOW + META_TTL + 1)[0])
    assert (again[1], again[3]) == (1, b"0badcafe00000002")  # offset 1 of a new epoch
    assert store.position(topic("a:kept"), NOW + META_TTL + 1)[1] == kept  # untouched
    store.expire(NOW + META_TTL + 2, lambda t: True)
    assert store.era == 2  # nothing dropped: no new era


def test_position_creates_a_stream_at_top_zero() -> None:
    store = new_store()
    top, epoch = store.position(topic("conversation:new"), NOW)
    assert top == 0 and len(epoch) == EPOCH_BYTES
    assert topic("conversation:new") in store.streams
    assert store.position(topic("conversation:new"), NOW + 1) == (0, epoch)  # asked again: the same
    first = store.stamp(topic("conversation:new"), body("conversation:new"), NOW + 2)
    assert split_egress(first)[1:4:2] == (1, epoch)  # the subscriber's position is in the stamped epoch
    assert read(store, "conversation:new", (0, epoch)).items == [first]


# -- reads ---------------------------------------------------------------------------------------------------
@pytest.fixture
def five() -> tuple[HistoryStore, bytes, list[bytes]]:
    """user:u1 with offsets 1..5, all kept (user keeps 5)."""
    store = new_store()
    events = stamp(store, "user:u1", 5)
    return store, split_egress(events[0])[3], events


def test_read_with_the_wrong_epoch_is_not_covered(five: tuple[HistoryStore, bytes, list[bytes]]) -> None:
    store, epoch, _ = five
    other = b"ffffffff00000099"
    assert read(store, "user:u1", (2, other)) == HistoryRead(5, epoch, False, [])
    assert read(store, "user:u1", (5, other)) == HistoryRead(5, epoch, False, [])  # even at the top
    assert read(store, "user:u1", (0, b"")) == HistoryRead(5, epoch, False, [])


def test_read_at_the_top_is_covered_with_nothing(five: tuple[HistoryStore, bytes, list[bytes]]) -> None:
    store, epoch, _ = five
    assert read(store, "user:u1", (5, epoch)) == HistoryRead(5, epoch, True, [])


@pytest.mark.parametrize("since", [0, 1, 2, 4])
def test_read_returns_exactly_the_events_after_since(five: tuple[HistoryStore, bytes, list[bytes]],
                                                     since: int) -> None:
    store, epoch, events = five
    got = read(store, "user:u1", (since, epoch))
    assert got.covered and (got.top, got.epoch) == (5, epoch)
    assert got.items == events[since:] and offsets(got.items) == list(range(since + 1, 6))


def test_read_beyond_the_top_is_not_covered(five: tuple[HistoryStore, bytes, list[bytes]]) -> None:
    store, epoch, _ = five
    assert read(store, "user:u1", (6, epoch)) == HistoryRead(5, epoch, False, [])
    assert read(store, "user:u1", (10**12, epoch)) == HistoryRead(5, epoch, False, [])
    assert read(store, "user:u1", (-1, epoch)) == HistoryRead(5, epoch, False, [])


def test_read_from_before_the_oldest_kept_is_not_covered() -> None:
    store = new_store()
    events = stamp(store, "conversation:c", 5)  # conversation keeps 3: offsets 3, 4, 5
    epoch = split_egress(events[0])[3]
    assert read(store, "conversation:c", (1, epoch)) == HistoryRead(5, epoch, False, [])  # 2 is gone
    assert read(store, "conversation:c", (0, epoch)) == HistoryRead(5, epoch, False, [])
    assert read(store, "conversation:c", (2, epoch)) == HistoryRead(5, epoch, True, events[2:])  # 3.. kept


def test_read_respects_the_limit(five: tuple[HistoryStore, bytes, list[bytes]]) -> None:
    store, epoch, events = five
    assert read(store, "user:u1", (0, epoch), limit=2) == HistoryRead(5, epoch, True, events[:2])  # oldest first
    assert read(store, "user:u1", (3, epoch), limit=1) == HistoryRead(5, epoch, True, events[3:4])
    assert read(store, "user:u1", (0, epoch), limit=0) == HistoryRead(5, epoch, True, [])
    assert read(store, "user:u1", (0, epoch), limit=99).items == events


def test_read_without_since_returns_the_last_events(five: tuple[HistoryStore, bytes, list[bytes]]) -> None:
    store, epoch, events = five
    assert read(store, "user:u1", None, limit=2) == HistoryRead(5, epoch, True, events[3:])
    assert read(store, "user:u1", None, limit=100).items == events
    assert read(store, "user:u1", None, limit=0).items == []


def test_read_of_an_unknown_channel_creates_it() -> None:
    store = new_store()
    got = read(store, "conversation:never", None)
    assert (got.top, got.covered, got.items) == (0, True, [])
    assert store.position(topic("conversation:never"), NOW) == (0, got.epoch)
    assert read(store, "conversation:never", (0, got.epoch)) == HistoryRead(0, got.epoch, True, [])


# -- per-namespace retention: size, TTL, none ---------------------------------------------------------------
def test_each_namespace_keeps_its_own_number_of_events() -> None:
    store = new_store()
    conversation = stamp(store, "conversation:c", 10)
    user = stamp(store, "user:u1", 10)
    assert offsets(read(store, "conversation:c", None).items) == [8, 9, 10]
    assert offsets(read(store, "user:u1", None).items) == [6, 7, 8, 9, 10]
    assert store.nbytes == sum(map(len, conversation[-3:] + user[-5:]))
    assert store.streams[topic("conversation:c")].nbytes == sum(map(len, conversation[-3:]))


def test_namespaces_not_named_keep_no_events_but_have_positions() -> None:
    store = new_store()
    events = stamp(store, "task:1", 4)
    epoch = split_egress(events[0])[3]
    assert offsets(events) == [1, 2, 3, 4]
    assert store.nbytes == 0 and store.streams[topic("task:1")].items is None
    assert read(store, "task:1", None) == HistoryRead(4, epoch, True, [])
    assert read(store, "task:1", (4, epoch)) == HistoryRead(4, epoch, True, [])  # at the top: nothing missed
    assert read(store, "task:1", (3, epoch)) == HistoryRead(4, epoch, False, [])  # missed one: cannot give it
    # a namespace is the part before the first ':' exactly: "user" keeps history, "users" does not
    stamp(store, "users:u1", 2)
    assert store.streams[topic("users:u1")].items is None


def test_events_past_the_ttl_are_not_returned() -> None:
    store = new_store()  # conversation: 10 s
    old = stamp(store, "conversation:c", 1, now=NOW)
    young = stamp(store, "conversation:c", 2, now=NOW + 6)
    epoch = split_egress(old[0])[3]
    assert read(store, "conversation:c", None, now=NOW + 9.999).items == old + young
    got = read(store, "conversation:c", None, now=NOW + 10)  # exactly the TTL: gone
    assert got == HistoryRead(3, epoch, True, young)
    assert read(store, "conversation:c", (0, epoch), now=NOW + 10).covered is False
    assert read(store, "conversation:c", (1, epoch), now=NOW + 10) == HistoryRead(3, epoch, True, young)
    assert store.counters.expired_events == 1
    assert store.nbytes == sum(map(len, young))


def test_expire_drops_events_past_the_ttl_and_keeps_the_position() -> None:
    store = new_store()
    events = stamp(store, "conversation:c", 3, now=NOW)
    kept = stamp(store, "user:u1", 2, now=NOW)  # user keeps them for 100 s
    epoch = split_egress(events[0])[3]
    store.expire(NOW + 9, never)
    assert store.nbytes == sum(map(len, events + kept))  # not yet
    store.expire(NOW + 10, never)
    stream = store.streams[topic("conversation:c")]
    assert stream.items is None and stream.nbytes == 0 and (stream.top, stream.epoch) == (3, epoch)
    assert store.nbytes == sum(map(len, kept)) and store.counters.expired_events == 3
    assert topic("conversation:c") not in store.retentions["conversation"].holding
    # a client at the top still recovers (nothing missed); one behind it cannot
    assert read(store, "conversation:c", (3, epoch), now=NOW + 11) == HistoryRead(3, epoch, True, [])
    assert read(store, "conversation:c", (2, epoch), now=NOW + 11) == HistoryRead(3, epoch, False, [])
    assert offsets(stamp(store, "conversation:c", 1, now=NOW + 12)) == [4]  # offsets go on in the same epoch
    assert store.position(topic("conversation:c"), NOW + 12) == (4, epoch)


def test_expire_takes_streams_in_publish_order_and_stops_at_a_young_one() -> None:
    store = new_store()
    stamp(store, "conversation:a", 1, now=NOW)
    stamp(store, "conversation:b", 1, now=NOW + 5)
    stamp(store, "conversation:a", 1, now=NOW + 6)  # a was published last now
    store.expire(NOW + 15, never)  # b's newest is 10 s old, a's 9 s
    assert store.streams[topic("conversation:b")].items is None
    assert offsets(read(store, "conversation:a", None, now=NOW + 15).items) == [2]  # its first is past the TTL


# -- the byte budget ----------------------------------------------------------------------------------------
def test_over_the_byte_budget_the_least_recently_published_lose_their_events() -> None:
    size = len(new_store().stamp(topic("conversation:c1"), body("conversation:c1", 1), NOW))
    store = new_store("conversation=3/100s", max_bytes=3 * size)  # room for 3 events of these channels
    for i, name in enumerate(["conversation:c1", "conversation:c2", "conversation:c3"]):
        stamp(store, name, 1, now=NOW + i)
    assert store.nbytes == 3 * size and store.counters.evicted_streams == 0
    stamp(store, "conversation:c1", 1, now=NOW + 3)  # c1 is now the most recent: c2 is the oldest
    assert store.counters.evicted_streams == 1 and store.nbytes == 3 * size
    assert store.streams[topic("conversation:c2")].items is None
    assert offsets(read(store, "conversation:c1", None, now=NOW + 3).items) == [1, 2]
    stamp(store, "conversation:c4", 1, now=NOW + 4)  # c3 goes next
    assert store.counters.evicted_streams == 2 and store.nbytes == 3 * size
    assert store.streams[topic("conversation:c3")].items is None
    # an evicted channel keeps its top and epoch: a client at the top still recovers
    top, epoch = store.position(topic("conversation:c2"), NOW + 5)
    assert top == 1
    assert read(store, "conversation:c2", (1, epoch), now=NOW + 5) == HistoryRead(1, epoch, True, [])
    assert read(store, "conversation:c2", (0, epoch), now=NOW + 5).covered is False


def test_the_byte_budget_spans_namespaces() -> None:
    store = new_store("conversation=10/100s,user=10/100s", max_bytes=600)
    stamp(store, "user:old", 1, now=NOW)
    stamp(store, "conversation:mid", 1, now=NOW + 1)
    stamp(store, "user:new", 1, now=NOW + 2)
    while store.counters.evicted_streams == 0:
        stamp(store, "conversation:mid", 1, now=NOW + 3)
        assert store.nbytes <= store.max_bytes
    assert store.streams[topic("user:old")].items is None  # published first: evicted first, whatever its namespace
    assert store.streams[topic("user:new")].items is not None


def test_the_byte_budget_holds_after_every_stamp() -> None:
    store = new_store("conversation=50/1000s,user=50/1000s", max_bytes=4_000)
    for i in range(2_000):
        name = f"{'conversation' if i % 3 else 'user'}:c{i % 37}"
        store.stamp(topic(name), body(name, i), NOW + i * 0.01)
        assert store.nbytes <= store.max_bytes
        assert store.nbytes == sum(s.nbytes for s in store.streams.values())
    assert store.counters.evicted_streams > 0
    for stream in store.streams.values():  # what is kept still ends at the top, contiguous
        kept = offsets(stream.items or [])
        assert kept == list(range(stream.top - len(kept) + 1, stream.top + 1))


def test_an_event_bigger_than_the_budget_is_not_kept() -> None:
    store = new_store(max_bytes=10)
    events = stamp(store, "conversation:c", 2)
    epoch = split_egress(events[0])[3]
    assert store.nbytes == 0 and store.counters.evicted_streams == 2
    assert read(store, "conversation:c", (2, epoch)) == HistoryRead(2, epoch, True, [])


# -- the metadata TTL ---------------------------------------------------------------------------------------
def test_a_stream_idle_past_meta_ttl_is_dropped_and_comes_back_in_a_new_epoch() -> None:
    store = new_store()
    old = stamp(store, "task:1", 3, now=NOW)
    old_epoch = split_egress(old[0])[3]
    store.expire(NOW + META_TTL - 0.001, never)
    assert topic("task:1") in store.streams
    store.expire(NOW + META_TTL, never)
    assert topic("task:1") not in store.streams and store.counters.dropped_streams == 1
    again = store.stamp(topic("task:1"), body("task:1"), NOW + META_TTL + 1)
    assert split_egress(again)[1] == 1 and split_egress(again)[3] != old_epoch
    # an old position does not match the new offsets
    assert read(store, "task:1", (1, old_epoch), now=NOW + META_TTL + 1).covered is False


def test_reads_and_positions_count_as_use() -> None:
    store = new_store()
    stamp(store, "task:1", 1, now=NOW)
    store.position(topic("task:1"), NOW + 500)
    stamp(store, "task:2", 1, now=NOW)
    read(store, "task:2", None, now=NOW + 700)
    store.expire(NOW + META_TTL + 100, never)
    assert set(store.streams) == {topic("task:1"), topic("task:2")}
    store.expire(NOW + 500 + META_TTL, never)
    assert set(store.streams) == {topic("task:2")}
    store.expire(NOW + 700 + META_TTL, never)
    assert store.streams == {}


def test_a_stream_a_worker_subscribes_to_is_kept() -> None:
    store = new_store()
    events = stamp(store, "task:held", 2, now=NOW)
    stamp(store, "task:idle", 1, now=NOW)
    asked: list[bytes] = []

    def subscribed(t: bytes) -> bool:
        asked.append(t)
        return t == topic("task:held")

    store.expire(NOW + META_TTL, subscribed)
    assert asked == [topic("task:held"), topic("task:idle")]
    assert list(store.streams) == [topic("task:held")] and store.counters.dropped_streams == 1
    assert store.position(topic("task:held"), NOW + META_TTL) == (2, split_egress(events[0])[3])
    asked.clear()
    store.expire(NOW + META_TTL + 1, subscribed)  # seen in use just now: not asked again yet
    assert asked == [] and topic("task:held") in store.streams


def test_dropping_a_stream_frees_its_events() -> None:
    store = new_store("conversation=3/5000s", meta_ttl=100.0)  # a config would refuse this; the store copes
    stamp(store, "conversation:c", 3, now=NOW)
    store.expire(NOW + 100, never)
    assert store.streams == {} and store.nbytes == 0
    assert not store.retentions["conversation"].holding


def test_memory_stays_flat_under_one_shot_channels() -> None:
    store = new_store("conversation=10/300s,user=5/100s", max_bytes=1 << 30, meta_ttl=600.0)
    for i in range(100_000):
        name = (b"conversation:once-%d\0" if i % 2 else b"task:once-%d\0") % i
        store.stamp(name, b'{"type":"x","channel":"c","data":{},"timestamp":"t"}', NOW + i * 0.001)
    assert len(store.streams) == 100_000 and store.nbytes > 0
    store.expire(NOW + 100 + 600, never)
    assert len(store.streams) == 0 and store.nbytes == 0
    assert all(not r.holding for r in store.retentions.values())
    assert store.counters.dropped_streams == 100_000
    assert store.counters.expired_events == 50_000  # the TTL sweep took the events first

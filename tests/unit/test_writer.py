"""workers/writer.py: what one loop pass sends, driven without sockets or a running loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from hub.envelope import ingress_record, read_ingress
from workers.connection import text_frame
from workers.writer import LoopPassWriter


class Loop:
    """call_soon only records: the test runs the pass's end itself."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], Any]] = []

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self.soon.append(fn)

    def run_pass_end(self) -> None:
        todo, self.soon = self.soon, []
        for fn in todo:
            fn()


@dataclass
class Raw:
    buffered: int = 0
    writes: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered


@dataclass(eq=False)
class Conn:
    raw: Raw = field(default_factory=Raw)
    closed: bool = False


@dataclass
class Replies:
    """A publish's reply when the hub did not take it (`published` comes from the worker's
    confirmation path, once the hub stamped the event: not the writer's business)."""

    failed: bytes


class Harness:
    def __init__(self, hub_takes: bool = True, cap: int = 1000) -> None:
        self.loop = Loop()
        self.hub: list[bytes] = []
        self.publishers: list[list[tuple[Any, Any]]] = []  # who published, per hub message
        self.hub_takes = hub_takes
        self.slow: list[Conn] = []
        self.writer = LoopPassWriter(self.loop, self.push, cap, self.slow.append)  # type: ignore[arg-type]

    def push(self, records: list[bytes], publishers: list[tuple[Any, Any]]) -> bool:
        assert len(records) == len(publishers)  # one record per publisher, in order
        if self.hub_takes:
            self.hub.append(b"".join(records))  # what the worker sends for one hub shard
            self.publishers.append(publishers)
        return self.hub_takes


def frames(*payloads: bytes) -> bytes:
    return b"".join(text_frame(p) for p in payloads)


def test_a_pass_writes_each_connection_once() -> None:
    h, a, b = Harness(), Conn(), Conn()
    h.writer.frame(a, text_frame(b"1"))
    h.writer.frame(b, text_frame(b"2"))
    h.writer.frame(a, text_frame(b"3"))
    assert a.raw.writes == [] and len(h.loop.soon) == 1  # nothing leaves before the pass ends
    h.loop.run_pass_end()
    assert a.raw.writes == [frames(b"1", b"3")]
    assert b.raw.writes == [frames(b"2")]


def test_fan_out_queues_the_same_bytes_for_every_member() -> None:
    h, members = Harness(), [Conn(), Conn(), Conn()]
    data = text_frame(b'{"type":"x"}')
    h.writer.fan_out(members, data)
    assert all(h.writer.pending[m][0] is data for m in members)  # one object, no copies
    h.loop.run_pass_end()
    assert [m.raw.writes for m in members] == [[data]] * 3


def test_publishes_of_a_pass_leave_in_one_hub_message_with_their_publishers_in_record_order() -> None:
    h, a, b = Harness(), Conn(), Conn()
    one, two = ingress_record(b"a:b\0", b'{"n":1}'), ingress_record(b"a:c\0", b'{"n":2}')
    ra, rb = Replies(b"failed-1"), Replies(b"failed-2")
    h.writer.publish(a, one, ra)
    h.writer.frame(a, text_frame(b"pong"))  # a ping answered after the publish
    h.writer.publish(b, two, rb)
    assert h.hub == []  # nothing leaves before the pass ends
    h.loop.run_pass_end()
    assert h.hub == [one + two]
    assert read_ingress(h.hub[0], 100)[0] == [(b"a:b\0", b'{"n":1}'), (b"a:c\0", b'{"n":2}')]
    assert h.publishers == [[(a, ra), (b, rb)]]  # the hub's positions come back in this order
    # `published` waits for the hub's answer; the ping's reply does not wait for it
    assert a.raw.writes == [frames(b"pong")]
    assert b.raw.writes == []


def test_each_pass_sends_its_own_publishes() -> None:
    h, a = Harness(), Conn()
    one, two = ingress_record(b"a:b\0", b'{"n":1}'), ingress_record(b"a:b\0", b'{"n":2}')
    h.writer.publish(a, one, Replies(b"failed"))
    h.loop.run_pass_end()
    h.writer.publish(a, two, Replies(b"failed"))
    h.loop.run_pass_end()
    assert h.hub == [one, two] and len(h.publishers) == 2


def test_a_refused_hub_message_fails_every_publish_of_the_pass() -> None:
    h, a, b, gone = Harness(hub_takes=False), Conn(), Conn(), Conn()
    h.writer.publish(a, ingress_record(b"a:b\0", b"{}"), Replies(b"failed-a"))
    h.writer.frame(a, text_frame(b"pong"))
    h.writer.publish(b, ingress_record(b"a:b\0", b"{}"), Replies(b"failed-b"))
    h.writer.publish(gone, ingress_record(b"a:b\0", b"{}"), Replies(b"failed-gone"))
    gone.closed = True
    h.loop.run_pass_end()
    # answered in the same pass, after what was already queued: clients match replies by id
    assert a.raw.writes == [frames(b"pong", b"failed-a")]
    assert b.raw.writes == [frames(b"failed-b")]
    assert gone.raw.writes == []


def test_flush_one_sends_the_pending_publishes_first() -> None:
    # A close flushes one connection at once: the publishes queued before it still leave.
    h, a = Harness(), Conn()
    h.writer.publish(a, ingress_record(b"a:b\0", b"{}"), Replies(b"failed"))
    h.writer.frame(a, text_frame(orjson.dumps({"type": "error"})))
    h.writer.flush_one(a)
    assert len(h.hub) == 1
    assert a.raw.writes == [frames(b'{"type":"error"}')]
    h.loop.run_pass_end()  # nothing left for the pass
    assert len(a.raw.writes) == 1 and len(h.hub) == 1


def test_flush_one_with_the_hub_refusing_writes_the_failure_too() -> None:
    h, a = Harness(hub_takes=False), Conn()
    h.writer.publish(a, ingress_record(b"a:b\0", b"{}"), Replies(b"failed"))
    h.writer.frame(a, text_frame(b"bye"))
    h.writer.flush_one(a)
    assert a.raw.writes == [frames(b"bye", b"failed")]


def test_a_reader_over_the_cap_is_reported_and_not_written() -> None:
    h, slow, fine = Harness(cap=1000), Conn(Raw(buffered=1001)), Conn(Raw(buffered=1000))
    h.writer.fan_out([slow, fine], text_frame(b"x"))
    h.loop.run_pass_end()
    assert h.slow == [slow] and slow.raw.writes == []
    assert fine.raw.writes == [text_frame(b"x")]


def test_closed_and_dropped_connections_get_nothing() -> None:
    h, closed, dropped = Harness(), Conn(closed=True), Conn()
    h.writer.frame(closed, text_frame(b"x"))
    h.writer.frame(dropped, text_frame(b"y"))
    h.writer.drop(dropped)
    h.loop.run_pass_end()
    assert closed.raw.writes == [] and dropped.raw.writes == []


def test_a_history_replay_may_sit_over_the_cap_until_it_drains() -> None:
    """A resuming reader is handed its whole gap at once: those bytes are not held against it, the
    live events after them are, and once its buffer is back under the cap the allowance ends."""
    h, reader = Harness(cap=1000), Conn()
    replay = frames(b"r" * 1500)
    h.writer.replay(reader, replay)
    h.loop.run_pass_end()
    assert reader.raw.writes == [replay]
    reader.raw.buffered = 1000 + len(replay)  # the kernel took none of it yet
    h.writer.frame(reader, text_frame(b"live"))
    h.loop.run_pass_end()
    assert h.slow == [] and reader.raw.writes[-1] == text_frame(b"live")
    reader.raw.buffered = 1001 + len(replay)  # live bytes on top of the cap and the replay: too slow
    h.writer.frame(reader, text_frame(b"more"))
    h.loop.run_pass_end()
    assert h.slow == [reader]


def test_the_replay_allowance_ends_when_the_reader_catches_up() -> None:
    h, reader = Harness(cap=1000), Conn()
    h.writer.replay(reader, frames(b"r" * 1500))
    h.loop.run_pass_end()
    reader.raw.buffered = 10  # drained
    h.writer.frame(reader, text_frame(b"live"))
    h.loop.run_pass_end()
    assert h.writer.allowance == {}
    reader.raw.buffered = 1001
    h.writer.frame(reader, text_frame(b"x"))
    h.loop.run_pass_end()
    assert h.slow == [reader]


def test_a_replay_is_checked_against_the_buffer_before_it_as_any_pass() -> None:
    h, reader = Harness(cap=1000), Conn(Raw(buffered=1001))
    h.writer.replay(reader, frames(b"r"))
    h.loop.run_pass_end()
    assert h.slow == [reader] and reader.raw.writes == []


def test_allowances_of_gone_readers_are_forgotten() -> None:
    h, gone, dropped = Harness(cap=1000), Conn(), Conn()
    for conn in (gone, dropped):
        h.writer.replay(conn, frames(b"r" * 1500))
    h.loop.run_pass_end()
    gone.raw.buffered = dropped.raw.buffered = 2000
    gone.closed = True
    h.writer.drop(dropped)
    h.writer.frame(Conn(), text_frame(b"x"))
    h.loop.run_pass_end()
    assert h.writer.allowance == {} and h.writer.replaying == {}

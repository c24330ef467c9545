"""Per-channel streams at the hub: top offset, epoch and recent events. Pure: time comes in as an
argument, nothing here touches a socket or a file.

Every channel the hub stamps has a `Stream`: its top offset (the last one handed out), its epoch
and, when its namespace keeps history, its last events as the exact egress messages the hub sent
(topic + stamp + client payload), so a replay costs no re-encoding. The offsets of the kept events
are always contiguous and end at the top, so the first one is `top - len(items) + 1` without
parsing anything.

Epochs are per channel stream: the first 8 hex digits are random per hub start, the last 8 count
the hub's eras. A new stream takes the current era's epoch, and the era advances whenever a sweep
drops a stream, so a channel whose stream was dropped (its metadata idle past `meta_ttl`, or a hub
restart without persistence) comes back under a new epoch and an old position never matches new
offsets. Streams of one era share their epoch objects: a million quiet channels do not hold a
million copies of the same 16 bytes. The top offset is kept apart from the events: a channel whose events expired still
answers "nothing missed" to a client already at the top.

Memory is bounded three ways:
- per channel, by its namespace's `Retention` (at most `size` events, none older than `ttl`);
- in total, by `max_bytes` of stored events: the channels published least recently lose their
  events first (their top and epoch stay, so a client at the top still recovers);
- per channel metadata, by `meta_ttl`: a stream neither published to, read nor subscribed for
  that long is dropped, so a flood of one-shot channels does not grow the hub forever.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hub.envelope import EGRESS, EPOCH_BYTES, STAMP, epoch_tail

NAMESPACE_END = b":"
META_SWEEP_MIN = 1000  # recently used streams `expire` looks at per call, at least
JournalRecord = bytes | tuple[bytes, bytes, int]  # an egress message, or (topic, epoch, top)


class HistorySpecError(ValueError):
    """TIDINGS_HISTORY cannot be read; the message says which part and why."""


@dataclass(eq=False, slots=True)
class Retention:
    """How much history one namespace keeps: the last `size` events, none older than `ttl` s."""

    namespace: str
    size: int
    ttl: float
    # Streams of this namespace holding events, least recently published first: the TTL sweep
    # and the byte budget both take from the front.
    holding: OrderedDict[bytes, Stream] = field(default_factory=OrderedDict)


def parse_history_spec(spec: str) -> dict[str, Retention]:
    """'conversation=100/300s,user=50/3600s' -> {namespace: Retention}. '' keeps no history."""
    retentions: dict[str, Retention] = {}
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            namespace, rule = part.split("=", 1)
            size_text, ttl_text = rule.split("/", 1)
            size = int(size_text)
            ttl = float(ttl_text[:-1] if ttl_text.endswith("s") else ttl_text)
        except ValueError:
            raise HistorySpecError(f"{part!r}: write namespace=EVENTS/SECONDSs, e.g. user=50/3600s") from None
        if not namespace or ":" in namespace:
            raise HistorySpecError(f"{part!r}: the namespace is the part of a channel before its first ':'")
        if size < 1 or not 0 < ttl < math.inf:  # NaN fails both comparisons
            raise HistorySpecError(f"{part!r}: keep at least 1 event for more than 0 seconds (or leave it out)")
        if namespace in retentions:
            raise HistorySpecError(f"{part!r}: namespace {namespace!r} is named twice")
        retentions[namespace] = Retention(namespace, size, ttl)
    return retentions


class Stream:
    __slots__ = ("epoch", "items", "last_publish", "last_use", "nbytes", "retention", "tail", "top", "topic")

    def __init__(self, topic: bytes, epoch: bytes, tail: bytes, top: int, now: float,
                 retention: Retention | None) -> None:
        self.topic = topic
        self.epoch = epoch
        self.tail = tail  # epoch_tail(epoch), how every payload ends: one format per event
        self.top = top
        self.last_use = now  # publish, read or subscription: what meta_ttl counts from
        self.last_publish = now
        self.retention = retention
        self.items: list[bytes] | None = None  # egress messages, offsets top-len+1 .. top
        self.nbytes = 0

    @property
    def first(self) -> int:
        """The offset of the oldest kept event (top + 1 when none is kept)."""
        return self.top - len(self.items or ()) + 1


@dataclass(slots=True)
class HistoryRead:
    """What a read found. `covered`: the kept events reach back to since + 1 (always True without
    `since`); `items` are egress messages, oldest first, at most the limit asked for."""

    top: int
    epoch: bytes
    covered: bool
    items: list[bytes]


@dataclass(slots=True)
class StoreCounters:
    evicted_streams: int = 0  # streams that lost their events to the byte budget
    expired_events: int = 0  # events dropped by their namespace's TTL
    dropped_streams: int = 0  # streams whose metadata passed meta_ttl


class HistoryStore:
    def __init__(self, retentions: dict[str, Retention], max_bytes: int, meta_ttl: float,
                 epoch_prefix: bytes | None = None) -> None:
        self.retentions = retentions
        self.by_namespace = {r.namespace.encode(): r for r in retentions.values()}
        self.max_bytes = max_bytes
        self.meta_ttl = meta_ttl
        self.epoch_prefix = epoch_prefix or secrets.token_hex(EPOCH_BYTES // 4).encode()
        self.era = 0
        self.era_epoch = b""
        self.era_tail = b""
        self._epochs: dict[bytes, tuple[bytes, bytes]] = {}  # epoch -> (the shared epoch, its tail)
        self._next_era()
        # Every stream. Not reordered per event (that costs every publish ~50 ns): `expire` walks it
        # from the front like a clock hand, dropping stale streams and moving fresh ones back.
        self.streams: OrderedDict[bytes, Stream] = OrderedDict()
        self.nbytes = 0  # bytes of kept events, against max_bytes
        self.counters = StoreCounters()
        # Streams created and events stamped since the last `take_journal`, for persistence:
        # an egress message, or (topic, epoch, top) for a stream that starts at that top.
        self.journal: list[JournalRecord] | None = None

    # -- the hot path ----------------------------------------------------------------------------
    def stamp(self, topic: bytes, body: bytes, now: float) -> bytes:
        """The next offset of topic's stream: returns the egress message, keeping it as history
        when the channel's namespace asks for that. (The hub's per-event cost: kept lean.)"""
        stream = self.streams.get(topic)
        if stream is None:
            stream = self._create(topic, now)
        offset = stream.top = stream.top + 1
        stream.last_use = now
        message = EGRESS % (topic, STAMP.pack(offset, now, stream.epoch), body[:-1], offset, stream.tail)
        retention = stream.retention
        if retention is None:
            if self.journal is not None:
                self.journal.append((topic, stream.epoch, offset))  # no history: the position is all to keep
            return message
        size = len(message)
        items = stream.items
        if items is None:
            stream.items = [message]
            retention.holding[topic] = stream
        else:
            items.append(message)
            retention.holding.move_to_end(topic)
            if len(items) > retention.size:
                size -= len(items.pop(0))  # a list, not a deque: ~60 bytes against ~600 per channel
        stream.nbytes += size
        stream.last_publish = now
        self.nbytes += size
        if self.nbytes > self.max_bytes:
            self._evict()
        if self.journal is not None:
            self.journal.append(message)
        return message

    def _keep(self, stream: Stream, retention: Retention, message: bytes, now: float) -> None:
        """Keep a restored event (the same bookkeeping as `stamp`, off the hot path)."""
        items = stream.items
        if items is None:
            items = stream.items = []
            retention.holding[stream.topic] = stream
        else:
            retention.holding.move_to_end(stream.topic)
        items.append(message)
        size = len(message)
        if len(items) > retention.size:
            size -= len(items.pop(0))
        stream.nbytes += size
        self.nbytes += size
        stream.last_publish = now
        if self.nbytes > self.max_bytes:
            self._evict()

    def _next_era(self) -> None:
        self.era += 1
        self.era_epoch, self.era_tail = self._shared(b"%b%08x" % (self.epoch_prefix, self.era & 0xFFFFFFFF))

    def _shared(self, epoch: bytes) -> tuple[bytes, bytes]:
        """One (epoch, tail) pair of objects per distinct epoch (eras, and those read from disk)."""
        pair = self._epochs.get(epoch)
        if pair is None:
            pair = self._epochs[epoch] = (epoch, epoch_tail(epoch))
        return pair

    def _create(self, topic: bytes, now: float, epoch: bytes | None = None, top: int = 0) -> Stream:
        epoch, tail = (self.era_epoch, self.era_tail) if epoch is None else self._shared(epoch)
        namespace = topic.split(NAMESPACE_END, 1)[0]
        stream = Stream(topic, epoch, tail, top, now, self.by_namespace.get(namespace))
        self.streams[topic] = stream
        if self.journal is not None:
            self.journal.append((topic, epoch, top))
        return stream

    # -- reads -----------------------------------------------------------------------------------
    def position(self, topic: bytes, now: float) -> tuple[int, bytes]:
        """(top, epoch) of topic, creating its stream: a subscriber gets a position to resume
        from before anything was published."""
        stream = self._touch(topic, now)
        return stream.top, stream.epoch

    def read(self, topic: bytes, since: tuple[int, bytes] | None, limit: int, now: float) -> HistoryRead:
        """Events after `since` (offset, epoch), oldest first, at most `limit`; without `since`,
        the last `limit` events. Reading refreshes the stream's metadata TTL."""
        stream = self._touch(topic, now)
        self._trim_expired(stream, now)
        items = stream.items or []
        if since is None:
            return HistoryRead(stream.top, stream.epoch, True, items[-limit:] if limit > 0 else [])
        offset, epoch = since
        if epoch != stream.epoch or offset > stream.top or offset < 0:
            return HistoryRead(stream.top, stream.epoch, False, [])
        start = offset + 1 - stream.first
        if start < 0:
            return HistoryRead(stream.top, stream.epoch, False, [])
        return HistoryRead(stream.top, stream.epoch, True, items[start:start + limit] if limit > 0 else [])

    def _touch(self, topic: bytes, now: float) -> Stream:
        stream = self.streams.get(topic)
        if stream is None:
            return self._create(topic, now)
        stream.last_use = now
        return stream

    # -- housekeeping ----------------------------------------------------------------------------
    def _trim_expired(self, stream: Stream, now: float) -> None:
        items, retention = stream.items, stream.retention
        if not items or retention is None:
            return
        cutoff = now - retention.ttl
        stamp_at = len(stream.topic)
        dropped = 0
        while dropped < len(items) and STAMP.unpack_from(items[dropped], stamp_at)[1] <= cutoff:
            dropped += 1
        if dropped:
            self._drop_items(stream, dropped)
            self.counters.expired_events += dropped

    def _drop_items(self, stream: Stream, count: int) -> None:
        items = stream.items
        assert items is not None and stream.retention is not None
        if count >= len(items):
            freed = stream.nbytes
            stream.items = None
            stream.retention.holding.pop(stream.topic, None)
        else:
            freed = sum(len(m) for m in items[:count])
            del items[:count]
        stream.nbytes -= freed
        self.nbytes -= freed

    def _evict(self) -> None:
        """Over the byte budget: the channels published least recently lose their events."""
        while self.nbytes > self.max_bytes:
            oldest: Stream | None = None
            for retention in self.retentions.values():
                if retention.holding:
                    candidate = next(iter(retention.holding.values()))
                    if oldest is None or candidate.last_publish < oldest.last_publish:
                        oldest = candidate
            if oldest is None:
                return
            self._drop_items(oldest, len(oldest.items or ()))
            self.counters.evicted_streams += 1

    def expire(self, now: float, subscribed: Callable[[bytes], bool]) -> None:
        """Once a second or so: drop events past their TTL and streams past meta_ttl. A stream
        that a worker still subscribes to is kept (its subscribers hold positions in it)."""
        for retention in self.retentions.values():
            holding = retention.holding
            cutoff = now - retention.ttl
            while holding:
                stream = next(iter(holding.values()))
                if stream.last_publish > cutoff:
                    break  # the rest were published later: their newest events are younger
                self.counters.expired_events += len(stream.items or ())
                self._drop_items(stream, len(stream.items or ()))
        # The clock hand: stale streams at the front go; fresh (or subscribed) ones move to the
        # back, at most `budget` of them per call. Called once a second, the budget brings every
        # stream to the front at least twice per meta_ttl: a stream is dropped within 1.5 x meta_ttl.
        streams = self.streams
        cutoff = now - self.meta_ttl
        budget = max(META_SWEEP_MIN, int(len(streams) * 2 / self.meta_ttl) + 1)
        dropped = self.counters.dropped_streams
        while streams and budget > 0:
            topic, stream = next(iter(streams.items()))
            if stream.last_use <= cutoff and subscribed(topic):
                stream.last_use = now  # its subscribers hold positions in it
            if stream.last_use > cutoff:
                streams.move_to_end(topic)
                budget -= 1
                continue
            del streams[topic]
            if stream.items:
                self._drop_items(stream, len(stream.items))
            self.counters.dropped_streams += 1
        if self.counters.dropped_streams != dropped:
            self._next_era()  # the dropped channels' next streams must not reuse their epoch

    # -- persistence -----------------------------------------------------------------------------
    def take_journal(self) -> list[JournalRecord]:
        """What changed since the last call: new streams and stamped events, in order."""
        journal = self.journal or []
        if self.journal is not None:
            self.journal = []
        return journal

    def restore_stream(self, topic: bytes, epoch: bytes, top: int, now: float) -> None:
        """A stream read back from disk: its epoch and top as they were, no events yet."""
        stream = self.streams.get(topic)
        if stream is None or stream.epoch != epoch:
            if stream is not None:
                self._forget(stream)
            self._create(topic, now, epoch, top)
        elif top > stream.top:
            if stream.items:
                self._drop_items(stream, len(stream.items))
            stream.top = top

    def restore_event(self, message: bytes, now: float) -> None:
        """An event read back from disk, in the order it was stamped."""
        end = message.index(b"\0") + 1
        topic = message[:end]
        offset, hub_time, epoch = STAMP.unpack_from(message, end)
        stream = self.streams.get(topic)
        if stream is None or stream.epoch != epoch:
            if stream is not None:
                self._forget(stream)
            stream = self._create(topic, now, epoch, offset - 1)
        if offset <= stream.top:
            return  # already known (a snapshot and the records after it may overlap)
        if offset != stream.top + 1 and stream.items:
            self._drop_items(stream, len(stream.items))  # kept events must run contiguously to the top
        stream.top = offset
        stream.last_use = max(stream.last_use, hub_time)
        if stream.retention is not None and hub_time > now - stream.retention.ttl:
            self._keep(stream, stream.retention, message, hub_time)

    def _forget(self, stream: Stream) -> None:
        if stream.items:
            self._drop_items(stream, len(stream.items))
        self.streams.pop(stream.topic, None)

    def snapshot(self, now: float) -> list[JournalRecord]:
        """What a compacted journal starts from: every stream's position, then the streams that
        keep events, each followed by them, least recently published first (the order the TTL
        sweep and the byte budget rely on after a restore)."""
        records: list[JournalRecord] = []
        for stream in self.streams.values():
            if not stream.items:
                records.append((stream.topic, stream.epoch, stream.top))
        for retention in self.retentions.values():
            for stream in list(retention.holding.values()):
                self._trim_expired(stream, now)
                if stream.items:
                    records.append((stream.topic, stream.epoch, stream.first - 1))
                    records.extend(stream.items)
                else:
                    records.append((stream.topic, stream.epoch, stream.top))
        return records

"""hub/persist.py: the history journal round-trips a HistoryStore, cuts torn or corrupt tails,
compacts, and keeps its fsync policy. Real files under tmp_path; time is passed in."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from hub.history import HistoryRead, HistoryStore, parse_history_spec
from hub.persist import HEADER, HistoryLog, LoadReport

NOW = 1_000.0
LOG = logging.getLogger("test.persist")


def new_store() -> HistoryStore:
    store = HistoryStore(parse_history_spec("conversation=10/300s"), 1 << 20, 3600.0)
    store.journal = []  # as the broker does, before loading
    return store


def topic(name: str) -> bytes:
    return b"%s\0" % name.encode()


def body(channel: bytes) -> bytes:
    return b'{"type":"x","channel":"%s","data":{},"timestamp":"t"}' % channel[:-1]


def stamp(store: HistoryStore, name: str, count: int, now: float = NOW) -> None:
    for _ in range(count):
        store.stamp(topic(name), body(topic(name)), now)


def state(store: HistoryStore, topics: list[bytes], now: float) -> dict[bytes, tuple[tuple[int, bytes], HistoryRead]]:
    """Position and kept events of every topic, read the way a resuming client does."""
    result = {}
    for t in topics:
        top, epoch = store.position(t, now)
        kept = store.read(t, None, 100, now)
        resumed = store.read(t, (top - len(kept.items), epoch), 100, now)
        assert resumed.covered and resumed.items == kept.items
        result[t] = ((top, epoch), kept)
    return result


def journal(path: Path, fsync_seconds: float = 1.0, max_bytes: int = 1 << 30) -> HistoryLog:
    return HistoryLog(path, max_bytes, fsync_seconds, LOG)


def reload(path: Path, now: float = NOW + 1) -> tuple[HistoryStore, HistoryLog, LoadReport]:
    store = new_store()
    log = journal(path)
    report = log.load(store, now)
    return store, log, report


TOPICS = [topic(n) for n in ("conversation:c1", "conversation:c2", "conversation:c3", "user:u1", "conversation:idle")]


def filled(path: Path) -> tuple[HistoryStore, HistoryLog]:
    """A store with kept, overflowing, history-less and event-less channels, all journaled."""
    store = new_store()
    log = journal(path)
    log.load(store, NOW)
    stamp(store, "conversation:c1", 3)
    stamp(store, "conversation:c2", 15)  # more than the namespace keeps
    stamp(store, "user:u1", 4)  # no history for this namespace: only its position
    store.position(topic("conversation:idle"), NOW)  # subscribed to, never published
    stamp(store, "conversation:c1", 2)
    stamp(store, "conversation:c3", 1)
    log.write(store.take_journal(), NOW)
    return store, log


# -- round trip ----------------------------------------------------------------------------------
def test_round_trip_keeps_positions_epochs_and_events(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.journal"
    store, log = filled(path)
    log.close()
    before = state(store, TOPICS, NOW + 1)

    restored, log2, report = reload(path)
    assert state(restored, TOPICS, NOW + 1) == before
    assert before[topic("conversation:c2")][0][0] == 15
    assert len(before[topic("conversation:c2")][1].items) == 10
    assert before[topic("user:u1")][1].items == []
    # user:u1 keeps no history: its 4 events are journaled as 4 position records, not as events
    assert report == LoadReport(records=5 + 4 + 21, streams=5 + 4, events=21, truncated_bytes=0)
    assert restored.take_journal() == []  # what came from the file is not journaled again
    log2.close()


def test_event_less_stream_keeps_its_epoch(tmp_path: Path) -> None:
    path = tmp_path / "history.journal"
    store = new_store()
    log = journal(path)
    log.load(store, NOW)
    position = store.position(topic("conversation:quiet"), NOW)
    log.write(store.take_journal(), NOW)
    log.close()

    restored, log2, _ = reload(path)
    assert restored.position(topic("conversation:quiet"), NOW + 1) == position == (0, position[1])
    assert restored.epoch_prefix != store.epoch_prefix  # a new hub start, yet the old epoch
    log2.close()


def test_expired_events_come_back_as_positions_only(tmp_path: Path) -> None:
    path = tmp_path / "history.journal"
    store, log = filled(path)
    log.close()
    restored, log2, _ = reload(path, now=NOW + 301)
    c1 = topic("conversation:c1")
    top, epoch = restored.position(c1, NOW + 301)
    assert (top, epoch) == store.position(c1, NOW)
    assert restored.read(c1, (top, epoch), 10, NOW + 301) == HistoryRead(5, epoch, True, [])
    log2.close()


def test_missing_file_and_directories_are_created_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "history.journal"
    _, log, report = reload(path)
    assert report == LoadReport(0, 0, 0, 0)
    assert log.size == 0 and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    log.close()


# -- torn and corrupt tails ----------------------------------------------------------------------
def cut_mid_header(data: bytes, last: int) -> bytes:
    return data[:last + HEADER.size - 3]


def cut_mid_payload(data: bytes, last: int) -> bytes:
    return data[:-5]


def flip_payload_byte(data: bytes, last: int) -> bytes:
    at = last + HEADER.size + 4
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def append_garbage(data: bytes, last: int) -> bytes:
    return data + b"\xde\xad\xbe\xef" * 7  # a length far over the cap


def append_unknown_type(data: bytes, last: int) -> bytes:
    return data + HEADER.pack(0, 0, 9)


@pytest.mark.parametrize("damage", [cut_mid_header, cut_mid_payload, flip_payload_byte, append_garbage,
                                    append_unknown_type])
def test_damaged_tail_is_cut_to_the_good_prefix(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                damage: Callable[[bytes, int], bytes]) -> None:
    path = tmp_path / "history.journal"
    store, log = filled(path)
    good = log.size
    stamp(store, "conversation:c1", 1)  # the record the damage may hit
    log.write(store.take_journal(), NOW)
    log.close()
    data = path.read_bytes()
    damaged = damage(data, good)
    path.write_bytes(damaged)
    whole = damage in (append_garbage, append_unknown_type)
    prefix = len(data) if whole else good

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        restored, log2, report = reload(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"cut {len(damaged) - prefix} bytes at offset {prefix}" in warnings[0].getMessage()
    assert report.truncated_bytes == len(damaged) - prefix
    assert path.stat().st_size == log2.size == prefix
    c1 = topic("conversation:c1")
    assert restored.position(c1, NOW + 1)[0] == (6 if whole else 5)

    # appending after the cut reads back whole
    stamp(restored, "conversation:c1", 2, NOW + 1)
    log2.write(restored.take_journal(), NOW + 1)
    log2.close()
    caplog.clear()
    again, log3, report3 = reload(path, NOW + 2)
    assert report3.truncated_bytes == 0 and not caplog.records
    assert state(again, TOPICS, NOW + 2) == state(restored, TOPICS, NOW + 2)
    assert again.position(c1, NOW + 2)[0] == (8 if whole else 7)
    log3.close()


def test_failed_write_is_cut_back_and_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.journal"
    store, log = filled(path)
    good = log.size
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if fd == log._fd and len(data) > 1:
            real_write(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    stamp(store, "conversation:c3", 2)
    lost = store.take_journal()
    with caplog.at_level(logging.ERROR, logger=LOG.name), pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", half_then_full)
        with pytest.raises(OSError):
            log.write(lost, NOW)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert path.stat().st_size == log.size == good

    stamp(store, "conversation:c3", 1)
    log.write(store.take_journal(), NOW)
    log.close()
    restored, log2, report = reload(path)
    assert report.truncated_bytes == 0
    assert restored.position(topic("conversation:c3"), NOW + 1)[0] == 4  # the gap: events 2-3 were lost
    c3 = restored.read(topic("conversation:c3"), None, 10, NOW + 1)
    assert len(c3.items) == 1  # kept events stay contiguous up to the top
    log2.close()


# -- compaction ----------------------------------------------------------------------------------
def test_compaction_bounds_the_file_and_keeps_the_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.journal"
    max_bytes = 16384  # about three times the live state: 4 channels x 10 events + 10 idle streams
    store = new_store()
    log = journal(path, max_bytes=max_bytes)
    log.load(store, NOW)
    compactions = 0
    with caplog.at_level(logging.INFO, logger=LOG.name):
        for i in range(400):
            now = NOW + i * 0.01
            stamp(store, f"conversation:c{i % 4}", 1, now)
            if i % 7 == 0 and i < 70:
                store.position(topic(f"conversation:idle{i}"), now)
            log.write(store.take_journal(), now)
            compactions += log.maybe_compact(store, now)
            assert log.size == path.stat().st_size
            assert log.size <= max_bytes + 512  # over it by at most one write, until the compaction
    assert compactions >= 3
    assert sum("compacted" in r.getMessage() for r in caplog.records) == compactions
    assert not path.with_name(path.name + ".tmp").exists()
    log.close()

    topics = list(store.streams)
    before = state(store, topics, NOW + 5)
    restored, log2, report = reload(path, NOW + 5)
    assert report.truncated_bytes == 0
    assert state(restored, topics, NOW + 5) == before
    assert before[topic("conversation:c0")][0][0] == 100
    assert len(before[topic("conversation:c0")][1].items) == 10
    log2.close()


def test_compaction_waits_when_the_snapshot_alone_is_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "history.journal"
    store, log = filled(path)
    log.max_bytes = 100  # smaller than any snapshot of this store
    assert log.maybe_compact(store, NOW) is True
    compacted = log.size
    assert compacted > 100
    assert log.maybe_compact(store, NOW) is False  # not again until the file doubles
    log.close()


def test_failed_compaction_keeps_appending_to_the_old_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "history.journal"
    store, log = filled(path)
    size = log.size
    log.max_bytes = 100
    (tmp_path / "history.journal.tmp").mkdir()  # the temporary file cannot be created
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        assert log.maybe_compact(store, NOW) is False
        assert log.maybe_compact(store, NOW + 1) is False  # backs off: no second attempt, no second line
    assert len(caplog.records) == 1 and "compaction failed" in caplog.records[0].getMessage()
    stamp(store, "conversation:c1", 1)
    log.write(store.take_journal(), NOW + 1)
    assert log.size > size
    log.close()
    restored, log2, report = reload(path)
    assert report.truncated_bytes == 0
    assert state(restored, TOPICS, NOW + 1) == state(store, TOPICS, NOW + 1)
    log2.close()


# -- fsync policy --------------------------------------------------------------------------------
@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_fsync_every_write_when_the_period_is_zero(tmp_path: Path, fsyncs: list[int]) -> None:
    path = tmp_path / "history.journal"
    store = new_store()
    log = journal(path, fsync_seconds=0)
    log.load(store, NOW)
    fsyncs.clear()
    for i in range(3):
        stamp(store, "conversation:c1", 1)
        log.write(store.take_journal(), NOW + i * 0.001)
    assert len(fsyncs) == 3
    log.flush(NOW + 1)  # nothing new to sync
    assert len(fsyncs) == 3
    log.close()
    restored, log2, _ = reload(path)
    assert len(restored.read(topic("conversation:c1"), None, 10, NOW + 1).items) == 3
    log2.close()


def test_fsync_at_most_once_per_period(tmp_path: Path, fsyncs: list[int]) -> None:
    path = tmp_path / "history.journal"
    store = new_store()
    log = journal(path, fsync_seconds=1.0)
    log.load(store, NOW)
    fsyncs.clear()
    stamp(store, "conversation:c1", 1)
    log.write(store.take_journal(), NOW + 0.5)
    assert fsyncs == []
    log.flush(NOW + 0.6)  # the tick syncs what was written, even without a new write
    assert len(fsyncs) == 1
    log.flush(NOW + 0.7)
    assert len(fsyncs) == 1
    stamp(store, "conversation:c1", 1)
    log.write(store.take_journal(), NOW + 1.0)
    assert len(fsyncs) == 1
    stamp(store, "conversation:c1", 1)
    log.write(store.take_journal(), NOW + 1.6)  # a period after the last fsync
    assert len(fsyncs) == 2
    stamp(store, "conversation:c1", 1)
    log.write(store.take_journal(), NOW - 50)  # the clock stepped back: sync, do not wait it out
    assert len(fsyncs) == 3
    log.close()
    assert len(fsyncs) == 4

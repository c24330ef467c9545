"""The hub's history journal: an append-only file from which channel history and positions come
back after a restart (TIDINGS_HISTORY_PERSIST=1).

File format: records back to back, no file header.
    record = HEADER(length, crc, type) + payload        HEADER = struct "!IIB" (9 bytes)
        length  payload bytes, at most MAX_PAYLOAD
        crc     zlib.crc32 of the type byte followed by the payload
        type 1  an event: payload = the egress message exactly as the hub sent it
                (topic + STAMP + client payload), so restoring it costs no re-encoding
        type 2  a stream: payload = "!Q" top + epoch (EPOCH_BYTES) + topic (ending in b"\\0"),
                a channel that starts (or, after a compaction, resumes) at that top and epoch
    Records are applied in order, the way HistoryStore journaled them. Reading stops at the first
    record that is short, fails its CRC or has an unknown type: everything from there on is cut
    off, because an append-only file can only be damaged at its end by a crash, and records
    after a bad one could not be trusted to follow it anyway.

Durability: every `write` reaches the kernel before it returns, so a hub crash loses nothing
written. fsync is what costs (milliseconds on a disk), so it runs at most once per
`fsync_seconds` (on a write, or on the hub's tick through `flush`): a machine crash loses at
most that much. fsync_seconds = 0 syncs every write, for deployments that want none lost.

Size: when the file grows past `max_bytes`, it is rewritten from the store's snapshot (every
stream and its kept events) through a temporary file, fsync and rename, so a crash leaves either
the old file or the new one. A snapshot that is itself near `max_bytes` would make every tick
compact again, so the next compaction also waits for the file to double its compacted size.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hub.envelope import EPOCH_BYTES, STAMP, TOPIC_END
from hub.history import HistoryStore, JournalRecord

HEADER = struct.Struct("!IIB")  # payload length, crc32(type + payload), type
TOP = struct.Struct("!Q")
EVENT = 1
STREAM = 2
MAX_PAYLOAD = 16 << 20  # a corrupt length must not make load allocate gigabytes
EVENT_CRC = zlib.crc32(bytes([EVENT]))
STREAM_CRC = zlib.crc32(bytes([STREAM]))
COMPACT_RETRY_SECONDS = 30.0  # after a failed compaction (disk full): not a rewrite every tick
FILE_MODE = 0o600  # events may be private: only the hub's user reads them
DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class LoadReport:
    records: int  # good records applied
    streams: int  # of which stream records
    events: int  # of which events
    truncated_bytes: int  # cut off the end as torn or corrupt


def encode(record: JournalRecord) -> bytes:
    if isinstance(record, bytes):
        return HEADER.pack(len(record), zlib.crc32(record, EVENT_CRC), EVENT) + record
    topic, epoch, top = record
    payload = TOP.pack(top) + epoch + topic
    return HEADER.pack(len(payload), zlib.crc32(payload, STREAM_CRC), STREAM) + payload


class HistoryLog:
    def __init__(self, path: Path, max_bytes: int, fsync_seconds: float, log: logging.Logger) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.fsync_seconds = fsync_seconds
        self.log = log
        self._fd: int | None = None
        self._size = 0
        self._dirty = False  # written since the last fsync
        self._last_fsync = 0.0
        self._compacted_size = 0  # the file's size right after the last compaction
        self._compact_after = 0.0  # no compaction attempt before this time (after a failure)

    @property
    def size(self) -> int:
        return self._size

    # -- start -----------------------------------------------------------------------------------
    def load(self, store: HistoryStore, now: float) -> LoadReport:
        """Apply every good record of the file to `store`, cut off a torn tail, open for append.
        Raises OSError (the caller logs it: the hub cannot start without its journal)."""
        self._make_parents()
        try:
            # Read as a stream, not whole: the file may be up to about twice max_bytes.
            with open(self.path, "rb", buffering=1 << 20) as file:
                total = os.fstat(file.fileno()).st_size
                good, records, streams, reason = self._apply(file, store, now)
        except FileNotFoundError:
            total = good = records = streams = 0
            reason = ""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        created = not self.path.exists()
        self._fd = fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        if good < total:
            os.ftruncate(fd, good)
            os.fsync(fd)
            self.log.warning("history journal %s: cut %d bytes at offset %d (%s)",
                             self.path, total - good, good, reason)
        if created:
            self._sync_dir()
        self._size = good
        self._dirty = False
        self._last_fsync = now
        return LoadReport(records, streams, records - streams, total - good)

    def _apply(self, file: BinaryIO, store: HistoryStore, now: float) -> tuple[int, int, int, str]:
        """(end of the last good record, records, stream records, why reading stopped)."""
        # The broker turns journaling on before loading: what comes back from the file is on disk
        # already, and journaling it again would copy the whole file on the next write.
        journal, store.journal = store.journal, None
        pos = records = streams = 0
        reason = ""
        try:
            while header := file.read(HEADER.size):
                if len(header) < HEADER.size:
                    reason = "short header"
                    break
                length, crc, kind = HEADER.unpack(header)
                if length > MAX_PAYLOAD:
                    reason = f"length {length} over the cap"
                    break
                payload = file.read(length)
                if len(payload) < length:
                    reason = "short payload"
                    break
                if kind == EVENT:
                    if zlib.crc32(payload, EVENT_CRC) != crc:
                        reason = "bad CRC"
                        break
                    topic_end = payload.find(TOPIC_END) + 1
                    if topic_end == 0 or topic_end + STAMP.size > length:
                        reason = "malformed event"
                        break
                    store.restore_event(payload, now)
                elif kind == STREAM:
                    if zlib.crc32(payload, STREAM_CRC) != crc:
                        reason = "bad CRC"
                        break
                    topic_at = TOP.size + EPOCH_BYTES
                    if topic_at >= length or not payload.endswith(TOPIC_END):
                        reason = "malformed stream"
                        break
                    (top,) = TOP.unpack_from(payload)
                    store.restore_stream(payload[topic_at:], payload[TOP.size:topic_at], top, now)
                    streams += 1
                else:
                    reason = f"unknown type {kind}"
                    break
                records += 1
                pos += HEADER.size + length
        finally:
            store.journal = journal
        return pos, records, streams, reason

    # -- the write path --------------------------------------------------------------------------
    def write(self, records: list[JournalRecord], now: float) -> None:
        """Append `records` in one system call; raises OSError (logged) if they did not all land."""
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, f"history journal {self.path} is not open")
        parts = [encode(record) for record in records]
        data = b"".join(parts)
        try:
            if any(len(part) - HEADER.size > MAX_PAYLOAD for part in parts):
                # load would take it for corruption and cut it and everything after it
                raise OSError(errno.EFBIG, f"a record is over {MAX_PAYLOAD} bytes")
            written = os.write(fd, data)
            while written < len(data):  # a short write to a file means the disk filled up
                written += os.write(fd, memoryview(data)[written:])
        except OSError as exc:
            self.log.error("history journal %s: write of %d bytes failed: %s", self.path, len(data), exc)
            self._rewind()
            raise
        self._size += len(data)
        self._dirty = True
        # A clock that stepped back (now < last fsync) must not postpone the fsync until it catches up.
        if self.fsync_seconds <= 0 or not self._last_fsync <= now < self._last_fsync + self.fsync_seconds:
            self._fsync(now)

    def _rewind(self) -> None:
        """Cut a partly written batch off: appending after a torn record would hide every later
        record from load, which stops at the first bad one."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            self.log.error("history journal %s: cannot cut back to %d bytes: %s", self.path, self._size, exc)

    def flush(self, now: float) -> None:
        """fsync what was written since the last fsync (the hub's tick keeps fsync_seconds)."""
        if self._dirty and self._fd is not None:
            self._fsync(now)

    def _fsync(self, now: float) -> None:
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.log.error("history journal %s: fsync failed: %s", self.path, exc)
            raise
        self._dirty = False
        self._last_fsync = now

    # -- compaction ------------------------------------------------------------------------------
    def maybe_compact(self, store: HistoryStore, now: float) -> bool:
        """Rewrite the file from `store.snapshot()` when it grew past max_bytes; True if it did."""
        if self._fd is None or self._size <= max(self.max_bytes, 2 * self._compacted_size):
            return False
        if now < self._compact_after:
            return False
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = b"".join(encode(record) for record in store.snapshot(now))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            return self._compaction_failed(tmp, now, exc)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, memoryview(data)[written:])
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            return self._compaction_failed(tmp, now, exc)
        # The new file is in place and its fd already appends to it: no reopen that could fail.
        old_size, self._size = self._size, len(data)
        os.close(self._fd)
        self._fd = fd
        self._compacted_size = len(data)
        self._dirty = False
        self._last_fsync = now
        try:
            self._sync_dir()
        except OSError as exc:  # the rename may not survive a machine crash; either file is whole
            self.log.error("history journal %s: fsync of its directory failed: %s", self.path, exc)
        self.log.info("history journal %s: compacted %d bytes to %d", self.path, old_size, len(data))
        return True

    def _compaction_failed(self, tmp: Path, now: float, exc: OSError) -> bool:
        self.log.error("history journal %s: compaction failed, appending to the old file: %s", self.path, exc)
        self._compact_after = now + COMPACT_RETRY_SECONDS
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False

    # -- files -----------------------------------------------------------------------------------
    def _make_parents(self) -> None:
        # Path.mkdir(parents=True) gives missing parents the default mode; every new one here is 0o700.
        missing: list[Path] = []
        parent = self.path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(mode=DIR_MODE, exist_ok=True)

    def _sync_dir(self) -> None:
        """A new or renamed file survives a machine crash only once its directory is synced."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """fsync and close. Errors are logged, not raised: the hub is stopping either way."""
        fd, self._fd = self._fd, None
        self._dirty = False
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            self.log.error("history journal %s: fsync on close failed: %s", self.path, exc)
        finally:
            os.close(fd)

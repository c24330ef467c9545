"""Which hub shard owns a channel. Pure.

    shard = CRC-32(channel name as UTF-8) % shards

CRC-32 is the IEEE 802.3 one (polynomial 0xEDB88320 reflected, initial and final XOR
0xFFFFFFFF): Python's `zlib.crc32`, Node's `zlib.crc32`, Go's `crc32.ChecksumIEEE`, Java's
`java.util.zip.CRC32`, PHP's `crc32`. Every publisher, in any language, picks the same shard
for a channel; `clients/shards.json` holds test vectors each implementation checks against.
It is stable across processes and releases (unlike Python's `hash`, salted per process), costs
~0.1 us in C, and spreads channel names evenly enough for a handful of shards.

Changing the shard count moves most channels to another shard, whose epochs differ: clients of
a moved channel resume with `recovered: false` and refetch. Reshard rarely (docs/production.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar
from zlib import crc32

T = TypeVar("T")


def shard_of(name: bytes, shards: int) -> int:
    """The shard owning a channel, from its UTF-8 name (a topic without its terminator)."""
    return crc32(name) % shards if shards > 1 else 0


def shard_of_topic(topic: bytes, shards: int) -> int:
    """The same, from an egress/ingress topic (channel + b"\\0")."""
    return crc32(topic[:-1]) % shards if shards > 1 else 0


def split_by_shard(items: Iterable[tuple[bytes, T]], shards: int) -> dict[int, list[tuple[bytes, T]]]:
    """(topic, anything) pairs grouped by the shard of the topic, each group in input order."""
    groups: dict[int, list[tuple[bytes, T]]] = {}
    for item in items:
        groups.setdefault(shard_of_topic(item[0], shards), []).append(item)
    return groups

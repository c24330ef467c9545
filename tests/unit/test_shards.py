"""hub/shards.py: the channel -> shard rule, against the test vectors every implementation shares."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from zlib import crc32

import pytest

from hub.envelope import MAX_CHANNEL_BYTES, topic_for
from hub.shards import shard_of, shard_of_topic, split_by_shard

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "clients" / "shards.json").read_text(encoding="utf-8"))


def test_the_vectors_cover_what_they_promise() -> None:
    names = [v["channel"] for v in VECTORS]
    assert len(names) == len(set(names)) >= 10
    assert any(len(name.encode()) == MAX_CHANNEL_BYTES for name in names)
    assert any(not name.isascii() for name in names)  # pins UTF-8, not Latin-1 or UTF-16
    assert any(v["crc32"] >= 2**31 for v in VECTORS)  # an implementation must treat CRC-32 as unsigned
    for shards in ("2", "3", "4", "16"):
        assert len({v["shards"][shards] for v in VECTORS}) > 1, f"every vector on one shard of {shards}"


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["channel"][:40])
def test_vectors(vector: dict) -> None:
    name = vector["channel"].encode("utf-8")
    assert crc32(name) == vector["crc32"]
    for shards, shard in vector["shards"].items():
        assert shard_of(name, int(shards)) == shard
        assert shard_of_topic(topic_for(vector["channel"]), int(shards)) == shard


def test_one_shard_is_always_shard_0() -> None:
    for vector in VECTORS:
        assert shard_of(vector["channel"].encode(), 1) == 0
        assert shard_of_topic(topic_for(vector["channel"]), 1) == 0
    items = [(topic_for(v["channel"]), i) for i, v in enumerate(VECTORS)]
    assert split_by_shard(items, 1) == {0: items}


def test_split_by_shard_groups_by_the_vectors_shard_in_input_order() -> None:
    items = [(topic_for(v["channel"]), i) for i, v in enumerate(VECTORS)]
    items += [(topic, i + len(items)) for topic, i in items]  # each topic twice, the second later
    for shards in (2, 3, 4, 16):
        groups = split_by_shard(items, shards)
        assert sorted(item for group in groups.values() for item in group) == sorted(items)
        for shard, group in groups.items():
            assert group, "no empty groups"
            assert [i for _, i in group] == sorted(i for _, i in group)  # input order kept
            for _, i in group:
                assert VECTORS[i % len(VECTORS)]["shards"][str(shards)] == shard
    assert split_by_shard([], 4) == {}


@pytest.mark.parametrize("shards", [2, 4])
def test_conversations_spread_evenly(shards: int) -> None:
    names = [f"conversation:conv-{n}".encode() for n in range(10_000)]
    counts = Counter(shard_of(name, shards) for name in names)
    even = len(names) / shards
    assert sorted(counts) == list(range(shards))
    for shard, count in counts.items():
        assert abs(count - even) <= 0.05 * even, f"shard {shard} of {shards}: {count} of {len(names)}"

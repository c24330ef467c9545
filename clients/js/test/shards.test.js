// shardOf() against clients/shards.json, the vectors every implementation of the channel -> hub
// shard rule checks against (Python's in tests/unit/test_shards.py).
// Run: node --test clients/js/test/shards.test.js
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import zlib from "node:zlib";

import { shardOf } from "../tidings.js";

const VECTORS = JSON.parse(readFileSync(new URL("../../shards.json", import.meta.url), "utf8"));

test("shardOf agrees with clients/shards.json", () => {
  assert.ok(VECTORS.length >= 10);
  for (const { channel, crc32, shards } of VECTORS) {
    assert.equal(shardOf(channel, 2 ** 32), crc32, `CRC-32 of ${channel}`); // modulo 2^32: the CRC itself, unsigned
    for (const [count, shard] of Object.entries(shards)) {
      assert.equal(shardOf(channel, Number(count)), shard, `${channel} over ${count} shards`);
    }
  }
});

test("one shard is always shard 0", () => {
  for (const { channel } of VECTORS) assert.equal(shardOf(channel, 1), 0);
});

test("shards must be a positive integer", () => {
  for (const bad of [0, -2, 2.5, NaN, Infinity, "4", undefined]) {
    assert.throws(() => shardOf("user:42", bad), RangeError, String(bad));
  }
});

test("shardOf is Node's zlib.crc32 over the UTF-8 bytes", { skip: !zlib.crc32 && "zlib.crc32 needs Node 20.15+" }, () => {
  const names = VECTORS.map((v) => v.channel);
  for (let n = 0; n < 2000; n++) names.push(`conversation:conv-${n}`);
  for (const name of names) assert.equal(shardOf(name, 2 ** 32), zlib.crc32(Buffer.from(name, "utf8")), name);
});

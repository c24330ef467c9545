// tidings.js against a real `tidings run` (two workers, history on by default): a worker killed,
// a worker restarted gracefully, 100 clients dropped at once. Run:
//   node --test clients/js/test/server.test.js
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { freePort, serviceMissing, TidingsService, waitFor } from "../testkit/service.js";
import { TidingsClient } from "../tidings.js";

const missing = serviceMissing();
let svc;

before(async () => {
  if (!missing) svc = await new TidingsService({ workers: 2 }).start();
});

after(async () => {
  await svc?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A client for `sub` on the service, and what it reported, with times. */
function open(sub, options = {}) {
  const getToken = async () => svc.token(sub, { channels: ["conversation:*"], publish: ["conversation:*"] });
  const client = new TidingsClient(svc.wsUrl(), { WebSocket, getToken, ...options });
  const log = { connected: [], disconnected: [], connecting: [] };
  client.on("connected", (d) => log.connected.push({ at: Date.now(), ...d }));
  client.on("disconnected", (d) => log.disconnected.push({ at: Date.now(), ...d }));
  client.on("connecting", () => log.connecting.push(Date.now()));
  return { client, log };
}

/** Offsets run on by one from the first: nothing lost, nothing twice, in order. */
function assertConsecutive(events, what) {
  const offsets = events.map((e) => e.offset);
  offsets.forEach((o, i) => assert.equal(o, offsets[0] + i, `${what}: offsets ${offsets.join(",")}`));
  assert.ok(events.every((e) => e.epoch === events[0].epoch), `${what}: one epoch`);
}

/**
 * Subscribes, receives, lets `interrupt(pid of its worker)` end the connection, publishes while the
 * client is away, then checks it came back, resumed (recovered: true) and lost nothing.
 */
async function survives(name, interrupt, closeCode, [low, high]) {
  const sub = `js-${name}`;
  const channel = `conversation:js-${name}`;
  const { client, log } = open(sub);
  try {
    await waitFor(() => log.connected.length === 1, 10_000, "connected");
    const got = [];
    const personal = [];
    const recovered = [];
    const s = client.subscribe(channel, (e) => got.push(e));
    s.on("subscribed", (d) => recovered.push(d.recovered));
    client.personal.on("event", (e) => personal.push(e));
    await waitFor(() => s.state === "subscribed", 5000, "subscribed");
    for (let n = 1; n <= 5; n++) await svc.publish(channel, "chat_message", { n });
    await svc.publish(`user:${sub}`, "notification", { n: 1 });
    await waitFor(() => got.length === 5 && personal.length === 1, 5000, "the first events");

    interrupt(svc.workerOf(log.connected[0].connection_id));
    await waitFor(() => log.disconnected.length === 1, 10_000, "the disconnect");
    for (let n = 6; n <= 10; n++) await svc.publish(channel, "chat_message", { n }); // missed while away
    await svc.publish(`user:${sub}`, "notification", { n: 2 });
    await waitFor(() => log.connected.length === 2, 20_000, "the reconnect");
    await waitFor(() => got.length >= 10 && personal.length >= 2, 5000, "the missed events");
    for (let n = 11; n <= 15; n++) await svc.publish(channel, "chat_message", { n });
    await waitFor(() => got.length >= 15, 5000, "live events after the resume");
    await sleep(300); // a duplicate would have arrived by now

    const drop = log.disconnected[0];
    console.log(`${name}: closed with ${drop.code}, reconnect planned after ${drop.delayMs} ms, ` +
      `connected again ${log.connected[1].at - drop.at} ms after the drop; resumed with recovered: ${recovered.at(-1)}`);
    assert.equal(drop.code, closeCode);
    assert.equal(drop.willReconnect, true);
    assert.ok(drop.delayMs >= low && drop.delayMs <= high, `delay ${drop.delayMs} not in [${low}, ${high}]`);
    assert.equal(recovered.at(-1), true, "the channel resumed from its position");
    assert.equal(log.connected[1].personal.recovered, true, "the personal channel resumed from the URL's since");
    assert.equal(got.length, 15);
    assertConsecutive(got, channel);
    assert.deepStrictEqual(new Set(got.map((e) => e.data.n)), new Set(Array.from({ length: 15 }, (_, i) => i + 1)));
    assert.deepStrictEqual(personal.map((e) => e.data.n), [1, 2]);
    assertConsecutive(personal, "personal");
  } finally {
    client.close();
  }
}

test("a worker killed (kill -9): reconnect, resume from the position, lose nothing", { skip: missing ?? false }, async () => {
  await survives("killed", (pid) => process.kill(pid, "SIGKILL"), 1006, [1000, 2000]);
});

test("a graceful worker restart (SIGTERM, 1001): reconnect soon, resume, lose nothing", { skip: missing ?? false }, async () => {
  await survives("restarted", (pid) => process.kill(pid, "SIGTERM"), 1001, [100, 1000]);
});

test("100 clients dropped at once spread their reconnects", { skip: missing ?? false }, async () => {
  await waitFor(() => Object.keys(svc.children()).length === 3, 20_000, "both workers back");
  await sleep(500); // the restarted ones finish starting
  const clients = Array.from({ length: 100 }, (_, i) => open(`herd-${i}`));
  try {
    await waitFor(() => clients.every((c) => c.log.connected.length === 1), 30_000, "100 clients connected");
    const workers = Object.entries(svc.children()).filter(([role]) => role.startsWith("worker"));
    const droppedAt = Date.now();
    for (const [, pid] of workers) process.kill(pid, "SIGKILL");
    await waitFor(() => clients.every((c) => c.log.connected.length === 2), 45_000, "100 clients connected again");
    const planned = clients.map((c) => c.log.disconnected[0].delayMs).sort((a, b) => a - b);
    const dialled = clients.map((c) => c.log.connecting[1] - droppedAt).sort((a, b) => a - b);
    const back = clients.map((c) => c.log.connected[1].at - droppedAt).sort((a, b) => a - b);
    const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];
    const perBucket = new Map();
    for (const t of dialled) perBucket.set(Math.floor(t / 100), (perBucket.get(Math.floor(t / 100)) ?? 0) + 1);
    const busiest = Math.max(...perBucket.values());
    console.log(`100 clients dropped at once (both workers killed):\n` +
      `  planned first delays: min ${planned[0]} ms, p50 ${pct(planned, 50)} ms, max ${planned.at(-1)} ms\n` +
      `  first redials after the drop: min ${dialled[0]} ms, p10 ${pct(dialled, 10)}, p50 ${pct(dialled, 50)}, ` +
      `p90 ${pct(dialled, 90)}, max ${dialled.at(-1)} ms (spread ${dialled.at(-1) - dialled[0]} ms); ` +
      `busiest 100 ms: ${busiest} dials\n` +
      `  connected again: first ${back[0]} ms, p50 ${pct(back, 50)} ms, last ${back.at(-1)} ms after the drop`);
    assert.ok(planned.every((d) => d >= 1000 && d <= 2000), "attempt 1 backs off over [1 s, 2 s]");
    assert.ok(dialled.at(-1) - dialled[0] >= 500, "the redials are spread, not a pulse");
    assert.ok(busiest <= 30, `${busiest} clients redialled within one 100 ms window`);
  } finally {
    for (const { client } of clients) client.close();
  }
});

test("ten refused dials on a real socket follow the backoff (scaled down: 20 ms .. 640 ms)", async () => {
  const port = await freePort(); // nothing listens there
  const client = new TidingsClient(`ws://127.0.0.1:${port}/ws`, {
    WebSocket, getToken: async () => "unused", minDelayMs: 20, maxDelayMs: 640,
  });
  const delays = [];
  const dials = [];
  client.on("connecting", () => dials.push(Date.now()));
  client.on("disconnected", (d) => delays.push(d.delayMs));
  try {
    await waitFor(() => dials.length === 11, 20_000, "ten refused dials and the eleventh");
  } finally {
    client.close();
  }
  const planned = delays.slice(0, 10);
  const gaps = dials.slice(1).map((t, i) => t - dials[i]);
  console.log(`real socket, ten refusals: planned ${planned.join(", ")} ms; measured gaps ${gaps.join(", ")} ms`);
  planned.forEach((d, i) => assert.ok(d >= 20 && d <= Math.min(640, 20 * 2 ** (i + 1)), `delay ${i + 1}: ${d}`));
  gaps.forEach((g, i) => assert.ok(g >= planned[i] - 5, `gap ${i + 1}: ${g} < ${planned[i]}`));
});

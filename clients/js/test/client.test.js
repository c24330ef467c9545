// Unit tests of tidings.js: a fake WebSocket plays the server, a fake clock the time, a seeded
// generator the jitter. Run: node --test clients/js/test/client.test.js
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { FakeClock, FakeNetwork, fakeWebSocketClass, seededRandom, settle } from "../testkit/fakes.js";
import { POLICY, TidingsClient, TidingsError } from "../tidings.js";

const SEED = 20260101;

/** A client on fakes; `tokens` counts getToken() calls. */
function setup(options = {}) {
  const clock = new FakeClock();
  const WS = fakeWebSocketClass();
  const network = new FakeNetwork();
  const tokens = { calls: 0 };
  const getToken = options.getToken ?? (async () => `token-${++tokens.calls}`);
  const client = new TidingsClient("ws://tidings.test/ws", {
    random: seededRandom(SEED), clock, network, WebSocket: WS, ...options, getToken,
  });
  const seen = { disconnected: [], errors: [], connecting: 0 };
  client.on("disconnected", (d) => seen.disconnected.push(d));
  client.on("error", (e) => seen.errors.push(e));
  client.on("connecting", () => seen.connecting++);
  const socket = () => WS.sockets.at(-1);
  /** Lets the pending dial reach its socket, and accepts it. */
  const connect = async (data) => {
    await settle();
    socket().accept(data);
    return socket();
  };
  return { client, clock, WS, network, tokens, seen, socket, connect };
}

/** Sockets neither closed by the client nor by the server. */
const live = (WS) => WS.sockets.filter((s) => s.readyState !== 3);

test("the embedded policy is clients/policy.json", () => {
  const table = JSON.parse(readFileSync(new URL("../../policy.json", import.meta.url), "utf8"));
  delete table.$comment;
  assert.deepStrictEqual(JSON.parse(JSON.stringify(POLICY)), table);
});

test("backoff: ten failures in a row follow full jitter, capped with the jitter kept", async () => {
  const { clock, seen, socket } = setup();
  const random = seededRandom(SEED); // the same draws the client makes
  const expected = [];
  for (let attempt = 1; attempt <= 10; attempt++) {
    const high = Math.min(30000, 1000 * 2 ** attempt);
    expected.push(Math.round(1000 + random() * (high - 1000)));
  }
  for (let i = 0; i < 10; i++) {
    await settle();
    socket().serverClose(1006); // refused before `connected`
    await clock.advance(seen.disconnected.at(-1).delayMs);
  }
  const delays = seen.disconnected.map((d) => d.delayMs);
  console.log(`reconnect delays of ten failures in a row (seed ${SEED}): ${delays.join(", ")} ms`);
  assert.deepStrictEqual(delays, expected);
  delays.forEach((d, i) => assert.ok(d >= 1000 && d <= Math.min(30000, 1000 * 2 ** (i + 1)), `delay ${i + 1}: ${d}`));
  const capped = delays.slice(5);
  assert.ok(new Set(capped).size === capped.length, "at the cap the delays still differ");
  assert.ok(capped.some((d) => d < 30000), "jitter kept at the cap: not everyone at exactly max");
});

test("a delay is never 0 ms, even when random() says 0", async () => {
  for (const code of [1001, 4200, 1006, 4100]) {
    const { clock, seen, connect } = setup({ random: () => 0 });
    const ws = await connect();
    await clock.advance(POLICY.stable_after_ms);
    ws.serverClose(code);
    assert.ok(seen.disconnected[0].delayMs >= 100, `${code}: ${seen.disconnected[0].delayMs}`);
  }
});

test("the policy table, close code by close code", async () => {
  const bands = [
    [[1001, 4200, 4201, 4299], 100, 1000, "soon"],
    [[4100, 4101, 4129, 4199], 5000, 10000, "back off with a floor"],
    [[1006, 1011, 1002, 1009, 3000, 4300, 4500, 1000], 1000, 2000, "back off"],
    [[4001, 4002, 4099], 100, 1000, "new token, then soon"],
  ];
  for (const [codes, low, high, what] of bands) {
    for (const code of codes) {
      const { client, clock, WS, seen, connect, socket } = setup();
      const ws = await connect();
      await clock.advance(POLICY.stable_after_ms); // the connection counts as good: attempt 1 next
      ws.serverClose(code, "bye");
      const d = seen.disconnected[0];
      assert.equal(d.code, code);
      assert.equal(d.willReconnect, true, `${code} reconnects`);
      assert.ok(d.delayMs >= low && d.delayMs <= high, `${code} (${what}): ${d.delayMs} not in [${low}, ${high}]`);
      await clock.advance(d.delayMs - 1);
      assert.equal(WS.sockets.length, 1, `${code}: no dial before the delay`);
      await clock.advance(1);
      assert.equal(WS.sockets.length, 2, `${code}: dialled after the delay`);
      if (code >= 4000 && code <= 4099) assert.equal(socket().params.get("token"), "token-2");
      client.close();
    }
  }
});

test("soon only once: a repeat before the connection is stable backs off", async () => {
  const { clock, seen, connect } = setup();
  let ws = await connect();
  await clock.advance(POLICY.stable_after_ms);
  ws.serverClose(1001);
  await clock.advance(seen.disconnected[0].delayMs);
  ws = await connect();
  await clock.advance(POLICY.stable_after_ms - 1); // up, but not for long enough
  ws.serverClose(1001);
  const second = seen.disconnected[1].delayMs;
  assert.ok(second >= 1000 && second <= 4000, `attempt 2 backs off: ${second}`);
  await clock.advance(second);
  ws = await connect();
  await clock.advance(POLICY.stable_after_ms); // stable: the count starts over
  ws.serverClose(1001);
  assert.ok(seen.disconnected[2].delayMs <= 1000);
});

test("close() does not reconnect, and 1000 goes to the server", async () => {
  const { client, clock, WS, seen, connect } = setup();
  const ws = await connect();
  client.close();
  assert.equal(ws.closedWith, 1000);
  assert.deepStrictEqual(seen.disconnected, [{ code: 1000, reason: "closed by the client", willReconnect: false, delayMs: null }]);
  await clock.advance(120_000);
  assert.equal(WS.sockets.length, 1);
  assert.equal(client.state, "closed");
});

test("4001/4002: a new token first, never the refused one; refused again at once: stop", async () => {
  // getToken keeps handing out the refused token: stop rather than present it again.
  {
    const { client, clock, WS, seen, socket } = setup({ getToken: async () => "same" });
    await settle();
    socket().serverClose(4001, "unauthorized");
    await clock.advance(seen.disconnected[0].delayMs);
    assert.equal(WS.sockets.length, 1, "no dial with the same token");
    assert.equal(seen.errors.at(-1).code, "unauthorized");
    assert.equal(seen.disconnected.at(-1).willReconnect, false);
    assert.equal(client.state, "closed");
    assert.equal(clock.pending, 0);
  }
  // Every token is new but the server refuses them all: one retry, then stop.
  {
    const { client, clock, WS, tokens, seen, socket } = setup();
    await settle();
    socket().serverClose(4002, "token expired");
    await clock.advance(seen.disconnected[0].delayMs);
    assert.equal(socket().params.get("token"), "token-2");
    socket().serverClose(4001, "unauthorized");
    await clock.advance(60_000);
    assert.equal(WS.sockets.length, 2);
    assert.equal(tokens.calls, 2);
    assert.equal(seen.errors.at(-1).code, "unauthorized");
    assert.equal(client.state, "closed");
  }
  // A token that expires on a connection that was up: a new token, and on we go.
  {
    const { client, clock, seen, connect } = setup();
    let ws = await connect();
    ws.serverClose(4002, "token expired");
    await clock.advance(seen.disconnected[0].delayMs);
    ws = await connect();
    assert.equal(ws.params.get("token"), "token-2");
    ws.serverClose(4002, "token expired"); // up again in between: not "refused at once"
    await clock.advance(seen.disconnected[1].delayMs);
    await connect();
    assert.equal(client.state, "connected");
  }
});

test("one socket at a time, whatever ends the last one", async () => {
  const { client, clock, WS, network, seen, connect } = setup();
  const got = [];
  client.subscribe("conversation:c1", (e) => got.push(e.offset));
  const check = () => assert.ok(live(WS).length <= 1, `${live(WS).length} sockets open`);
  let ws = await connect();
  ws.receive({ type: "subscribed", id: ws.lastSent("subscribe").id, data: { channel: "conversation:c1", offset: 0, epoch: "E" } });
  // connect timeout
  ws.serverClose(1006);
  await clock.advance(seen.disconnected.at(-1).delayMs);
  check();
  await clock.advance(POLICY.connect_timeout_ms);
  assert.equal(seen.disconnected.at(-1).reason, "connect timeout");
  check();
  await clock.advance(seen.disconnected.at(-1).delayMs);
  // offline while connecting, online, then a dead connection
  network.go("offline");
  check();
  network.go("online");
  await clock.advance(seen.disconnected.at(-1).delayMs);
  ws = await connect();
  ws.answerPings = false;
  check();
  await clock.advance(60_000); // quiet: ping, no pong
  assert.equal(seen.disconnected.at(-1).code, 4200);
  check();
  // An old socket that still talks is not listened to.
  const old = WS.sockets[0];
  old.receive({ type: "chat_message", channel: "conversation:c1", data: {}, offset: 1, epoch: "E" });
  old.serverClose(1001);
  assert.deepStrictEqual(got, []);
  assert.ok(WS.sockets.length >= 5);
  assert.ok(WS.openAtDial.every((n) => n === 0), `sockets open at each dial: ${WS.openAtDial}`);
  // A slow getToken with online/offline churn around it still dials once.
  let release;
  const slow = setup({ getToken: () => new Promise((r) => (release = r)) });
  await settle();
  slow.network.go("offline");
  slow.network.go("online");
  await slow.clock.advance(slow.seen.disconnected.at(-1).delayMs);
  release("t");
  await settle();
  assert.equal(slow.WS.sockets.length, 1);
  client.close();
  slow.client.close();
});

test("offline pauses, online reconnects at once with jitter", async () => {
  const { clock, WS, network, seen, connect } = setup();
  const ws = await connect();
  network.go("offline");
  assert.equal(ws.closedWith, 1000);
  assert.deepStrictEqual(seen.disconnected.at(-1), { code: 1006, reason: "offline", willReconnect: true, delayMs: null });
  await clock.advance(600_000);
  assert.equal(WS.sockets.length, 1, "no dialling while offline");
  network.go("online");
  const d = seen.disconnected.at(-1).delayMs;
  assert.ok(d >= 100 && d <= 1000, `online: ${d}`);
  await clock.advance(d);
  assert.equal(WS.sockets.length, 2);
});

test("the token is refreshed at 80-90 % of its lifetime, one getToken for concurrent needs", async () => {
  const { client, clock, tokens, seen, connect } = setup();
  const start = clock.now() / 1000;
  const ws = await connect({ expires_at: start + 1000 });
  await clock.advance(799_000);
  assert.equal(ws.lastSent("refresh"), undefined, "not before 80 %");
  await clock.advance(101_000);
  const refresh = ws.lastSent("refresh");
  assert.ok(refresh, "by 90 %");
  assert.equal(refresh.data.token, "token-2");
  ws.receive({ type: "refreshed", id: refresh.id, data: { expires_at: start + 4000 } });
  await clock.advance(0.9 * (start + 4000 - clock.now() / 1000) * 1000);
  const again = ws.lastSent("refresh");
  assert.notEqual(again.id, refresh.id, "the next one is scheduled from the new expiry");
  // A refused refresh is reported and tried again before the expiry.
  ws.receive({ type: "error", id: again.id, data: { code: "unauthorized", message: "invalid token" } });
  assert.equal(seen.errors.at(-1).code, "unauthorized");
  await clock.advance(0.9 * (start + 4000 - clock.now() / 1000) * 1000);
  assert.notEqual(ws.lastSent("refresh").id, again.id);
  assert.equal(tokens.calls, 4);
  client.close();

  // The refresh timer and a 4002 reconnect need a token at the same time: one call.
  let calls = 0;
  let release;
  const c = setup({
    getToken: () => (++calls === 1 ? "first" : new Promise((r) => (release = r))),
  });
  const w = await c.connect({ expires_at: c.clock.now() / 1000 + 100 });
  await c.clock.advance(90_000); // the refresh asked getToken, which has not answered
  assert.equal(calls, 2);
  w.serverClose(4002, "token expired");
  await c.clock.advance(c.seen.disconnected.at(-1).delayMs);
  assert.equal(calls, 2, "the reconnect waits for the same call");
  release("second");
  await settle();
  assert.equal(c.WS.sockets.length, 2);
  assert.equal(c.socket().params.get("token"), "second");
  assert.equal(w.lastSent("refresh"), undefined, "nothing sent on the old socket");
  c.client.close();
});

test("a quiet connection is pinged; no answer within pong_timeout: reconnect", async () => {
  const { clock, seen, connect } = setup();
  const ws = await connect({ ping_interval: 25, pong_timeout: 20 });
  ws.answerPings = false;
  await clock.advance(29_999);
  assert.equal(ws.lastSent("ping"), undefined);
  await clock.advance(1);
  assert.ok(ws.lastSent("ping"), "pinged after ping_interval + grace of silence");
  ws.receive({ type: "pong", data: {} });
  await clock.advance(20_000);
  assert.equal(seen.disconnected.length, 0, "the pong kept it");
  await clock.advance(15_000); // quiet again: ping at 30 s after the pong, then 20 s
  assert.equal(ws.sent.filter((m) => m.type === "ping").length, 2);
  await clock.advance(20_000);
  assert.equal(seen.disconnected[0].code, 4200);
  assert.ok(seen.disconnected[0].delayMs <= 1000);
});

test("after a reconnect every channel resumes from its position; recovered: false is surfaced", async () => {
  const { client, clock, seen, connect } = setup();
  const got = [];
  const sub = client.subscribe("conversation:c1", (e) => got.push(e.offset));
  const subscribed = [];
  sub.on("subscribed", (s) => subscribed.push(s));
  const personal = [];
  client.personal.on("event", (e) => personal.push(e.offset));
  let ws = await connect({ personal: { offset: 3, epoch: "P" } });
  assert.deepStrictEqual(ws.lastSent("subscribe").data, { channel: "conversation:c1" });
  ws.receive({ type: "subscribed", id: ws.lastSent("subscribe").id, data: { channel: "conversation:c1", offset: 5, epoch: "E" } });
  for (const offset of [6, 7, 7, 5]) ws.receive({ type: "chat_message", channel: "conversation:c1", data: {}, offset, epoch: "E" });
  ws.receive({ type: "notification", channel: "user:u1", data: {}, offset: 4, epoch: "P" });
  assert.deepStrictEqual(got, [6, 7], "duplicates dropped");
  assert.deepStrictEqual(sub.position, { offset: 7, epoch: "E" });
  ws.serverClose(1006);
  await clock.advance(seen.disconnected[0].delayMs);
  await settle();
  ws = await connect({ personal: { offset: 4, epoch: "P", recovered: true } });
  assert.equal(ws.params.get("since"), "4:P", "the personal channel resumes on the URL");
  const resume = ws.lastSent("subscribe");
  assert.deepStrictEqual(resume.data, { channel: "conversation:c1", since: { offset: 7, epoch: "E" } });
  ws.receive({ type: "subscribed", id: resume.id, data: { channel: "conversation:c1", offset: 40, epoch: "E", recovered: false } });
  assert.equal(subscribed.at(-1).recovered, false);
  assert.deepStrictEqual(sub.position, { offset: 40, epoch: "E" });
  // The server ends it (insufficient_state): resubscribe from the last position.
  ws.receive({ type: "unsubscribed", data: { channel: "conversation:c1", reason: "insufficient_state" } });
  const again = ws.lastSent("subscribe");
  assert.deepStrictEqual(again.data.since, { offset: 40, epoch: "E" });
  ws.receive({ type: "subscribed", id: again.id, data: { channel: "conversation:c1", offset: 42, epoch: "E", recovered: true } });
  for (const offset of [41, 42]) ws.receive({ type: "chat_message", channel: "conversation:c1", data: {}, offset, epoch: "E" });
  assert.deepStrictEqual(got, [6, 7, 41, 42]);
  // A resume answered as already held (no `recovered`, nothing replayed) while behind: not whole.
  ws.receive({ type: "unsubscribed", data: { channel: "conversation:c1", reason: "insufficient_state" } });
  ws.receive({ type: "subscribed", id: ws.lastSent("subscribe").id, data: { channel: "conversation:c1", offset: 50, epoch: "E" } });
  assert.equal(subscribed.at(-1).recovered, false);
  assert.deepStrictEqual(sub.position, { offset: 50, epoch: "E" });
  // ... and for a token that no longer allows it: told, not resubscribed.
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  const before = ws.sent.length;
  ws.receive({ type: "unsubscribed", data: { channel: "conversation:c1", reason: "unauthorized" } });
  assert.equal(errors[0].code, "unauthorized");
  assert.equal(ws.sent.length, before);
  assert.equal(client.subscriptions.size, 0);
  assert.equal(sub.state, "unsubscribed");
});

test("a failed subscribe is retried when the failure passes, and dropped when it will not", async () => {
  const { client, clock, connect } = setup();
  const ws = await connect();
  const sub = client.subscribe("conversation:c1");
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  const first = ws.lastSent("subscribe");
  ws.receive({ type: "error", id: first.id, data: { code: "subscription_failed", message: "hub unavailable" } });
  assert.equal(errors[0].willRetry, true);
  await clock.advance(errors[0].delayMs);
  assert.notEqual(ws.lastSent("subscribe").id, first.id);
  const denied = client.subscribe("secret:x");
  denied.on("error", (e) => errors.push(e));
  ws.receive({ type: "error", id: ws.lastSent("subscribe").id, data: { code: "unauthorized", message: "no" } });
  assert.equal(errors.at(-1).willRetry, false);
  assert.equal(client.subscriptions.has("secret:x"), false);
});

test("publish resolves by id on published, rejects with the server's code; ping measures", async () => {
  const { client, clock, connect } = setup();
  await assert.rejects(client.publish("conversation:c1", "chat_message", {}), { code: "not_connected" });
  const ws = await connect();
  const a = client.publish("conversation:c1", "chat_message", { n: 1 });
  const b = client.publish("conversation:c1", "chat_message", { n: 2 });
  const [pa, pb] = ws.sent.filter((m) => m.type === "publish");
  assert.deepStrictEqual(pa.data, { channel: "conversation:c1", type: "chat_message", data: { n: 1 } });
  ws.receive({ type: "error", id: pb.id, data: { code: "rate_limited", message: "slow down", retry_after_ms: 50 } });
  ws.receive({ type: "published", id: pa.id, data: { channel: "conversation:c1", offset: 9, epoch: "E" } });
  assert.deepStrictEqual(await a, { channel: "conversation:c1", offset: 9, epoch: "E" });
  await assert.rejects(b, (err) => err instanceof TidingsError && err.code === "rate_limited" && err.retryAfterMs === 50);
  const p = client.ping();
  await clock.advance(12);
  ws.receive({ type: "pong", id: ws.lastSent("ping").id, data: {} });
  assert.equal(await p, 12);
  const lost = client.publish("conversation:c1", "chat_message", {});
  ws.serverClose(1006);
  await assert.rejects(lost, { code: "disconnected" });
});

test("nothing is left behind: 1000 subscribe/unsubscribe cycles, then close()", async () => {
  const { client, clock, network, connect } = setup();
  const ws = await connect();
  const timersBefore = clock.pending;
  let events = 0;
  for (let i = 0; i < 1000; i++) {
    const channel = `conversation:c${i % 7}`;
    const sub = client.subscribe(channel, () => events++);
    sub.on("subscribed", () => {});
    const off = sub.on("error", () => {});
    const cmd = ws.lastSent("subscribe");
    if (i % 10 === 0) { // a failure that schedules a retry, which unsubscribe must cancel
      ws.receive({ type: "error", id: cmd.id, data: { code: "subscription_failed", message: "later" } });
    } else {
      ws.receive({ type: "subscribed", id: cmd.id, data: { channel, offset: i, epoch: "E" } });
      ws.receive({ type: "chat_message", channel, data: {}, offset: i + 1, epoch: "E" });
    }
    off();
    sub.unsubscribe();
    assert.equal(sub._handlers.size, 0);
    ws.receive({ type: "unsubscribed", data: { channel } });
  }
  assert.equal(events, 900);
  assert.equal(client.subscriptions.size, 0);
  assert.equal(client._pending.size, 0);
  assert.equal(clock.pending, timersBefore, "no timer left per cycle");
  assert.equal(network.listeners, 2);
  const inFlight = client.publish("conversation:c1", "chat_message", {});
  client.subscribe("conversation:kept", () => events++);
  client.close();
  await assert.rejects(inFlight, { code: "closed" });
  assert.equal(clock.pending, 0, "no timer after close()");
  assert.equal(network.listeners, 0, "online/offline listeners removed");
  assert.equal(client._handlers.size, 0);
  assert.equal(client.personal._handlers.size, 0);
  assert.equal(client.subscriptions.size, 0);
  assert.equal(ws.closedWith, 1000);
  assert.equal(new Set([ws.onmessage, ws.onclose, ws.onerror]).size, 1, "socket handlers detached (one no-op)");
  ws.receive({ type: "chat_message", channel: "conversation:kept", data: {}, offset: 1, epoch: "E" });
  assert.equal(events, 900);
  await assert.rejects(client.ping(), { code: "closed" });
  assert.throws(() => client.subscribe("conversation:late"));
});

test("a getToken that never answers times out like a connect; a malformed URL stops", async () => {
  const { clock, WS, seen } = setup({ getToken: () => new Promise(() => {}) });
  await clock.advance(POLICY.connect_timeout_ms);
  assert.equal(seen.disconnected[0].reason, "connect timeout");
  assert.equal(seen.disconnected[0].willReconnect, true);
  assert.equal(WS.sockets.length, 0);
  class Refusing {
    constructor() {
      throw new SyntaxError("bad URL");
    }
  }
  const bad = setup({ WebSocket: Refusing });
  await settle();
  assert.equal(bad.seen.errors[0].code, "invalid_request");
  assert.equal(bad.client.state, "closed");
});

test("zero or inverted delays are refused", () => {
  const make = (options) => () => new TidingsClient("ws://x/ws", { getToken: () => "t", WebSocket: fakeWebSocketClass(), network: null, ...options });
  assert.throws(make({ minDelayMs: 0 }), RangeError);
  assert.throws(make({ minDelayMs: 2000, maxDelayMs: 1000 }), RangeError);
});

test("a subscription to the personal channel is refused: client.personal has its events", async () => {
  const { client, connect } = setup();
  const sub = client.subscribe("user:u1");
  const errors = [];
  sub.on("error", (e) => errors.push(e.code));
  const ws = await connect();
  assert.deepStrictEqual(errors, ["invalid_request"]);
  assert.equal(client.subscriptions.size, 0);
  assert.equal(ws.lastSent("subscribe"), undefined);
  assert.throws(() => client.subscribe("user:u1"));
  assert.throws(() => client.personal.unsubscribe());
});

test("maxAttempts: gives up after that many reconnects in a row", async () => {
  const { client, clock, WS, seen, socket } = setup({ maxAttempts: 3 });
  for (let i = 0; i < 4; i++) {
    await settle();
    socket().serverClose(1006);
    if (seen.disconnected.at(-1).willReconnect) await clock.advance(seen.disconnected.at(-1).delayMs);
  }
  assert.equal(WS.sockets.length, 4);
  assert.equal(seen.errors.at(-1).code, "max_attempts");
  assert.equal(client.state, "closed");
});

test("a handler that throws does not break the client", async () => {
  const { client, connect } = setup();
  const sub = client.subscribe("conversation:c1", () => {
    throw new Error("app bug");
  });
  const got = [];
  sub.on("event", (e) => got.push(e.offset));
  const thrown = [];
  globalThis.reportError = (err) => thrown.push(err.message); // what browsers have
  const ws = await connect();
  ws.receive({ type: "subscribed", id: ws.lastSent("subscribe").id, data: { channel: "conversation:c1", offset: 0, epoch: "E" } });
  ws.receive({ type: "chat_message", channel: "conversation:c1", data: {}, offset: 1, epoch: "E" });
  delete globalThis.reportError;
  assert.deepStrictEqual(got, [1]);
  assert.deepStrictEqual(sub.position, { offset: 1, epoch: "E" });
  assert.deepStrictEqual(thrown, ["app bug"]);
});

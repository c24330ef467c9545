// Test doubles for the unit tests: a clock whose time only moves when told, a WebSocket class
// the test plays the server through, an online/offline event target that counts its listeners,
// and a seeded random.

/** Time and timers that move only in advance(); timers fire in time order. */
export class FakeClock {
  constructor(start = Date.UTC(2026, 0, 1)) {
    this.t = start;
    this.timers = new Map();
    this.nextId = 1;
  }

  now() {
    return this.t;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** Timers not yet fired or cleared. */
  get pending() {
    return this.timers.size;
  }

  /** Moves time on by `ms`, firing what falls due (and what those schedule), settling promises between. */
  async advance(ms) {
    const end = this.t + ms;
    await settle();
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) if (timer.at <= end && (!next || timer.at < next[1].at)) next = [id, timer];
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
      await settle();
    }
    this.t = end;
  }
}

/** Lets every pending promise callback run. */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** mulberry32: a small seeded generator, uniform in [0, 1). */
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** An EventTarget for `online`/`offline` that counts the listeners left on it. */
export class FakeNetwork extends EventTarget {
  constructor() {
    super();
    this.listeners = 0;
  }

  addEventListener(type, fn) {
    this.listeners++;
    super.addEventListener(type, fn);
  }

  removeEventListener(type, fn) {
    this.listeners--;
    super.removeEventListener(type, fn);
  }

  go(type) {
    this.dispatchEvent(new Event(type));
  }
}

/**
 * A fresh WebSocket class whose instances the test drives as the server would: `accept(connected)`,
 * `receive(message)`, `serverClose(code)`. `FakeWebSocket.sockets` lists every one dialled.
 */
export function fakeWebSocketClass() {
  class FakeWebSocket {
    static sockets = [];
    /** For each dial, how many earlier sockets were still open then (one at a time: always 0). */
    static openAtDial = [];

    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      this.answerPings = true; // the client's liveness pings (no id): a live server answers them
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      FakeWebSocket.openAtDial.push(FakeWebSocket.sockets.filter((s) => s.readyState !== 3).length);
      FakeWebSocket.sockets.push(this);
    }

    get params() {
      return new URL(this.url).searchParams;
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      const message = JSON.parse(text);
      this.sent.push(message);
      if (this.answerPings && message.type === "ping" && message.id === undefined) {
        queueMicrotask(() => this.readyState === 1 && this.receive({ type: "pong", data: {} }));
      }
    }

    /** The client closed it: like a browser, the close event still fires, to whatever handler is left. */
    close(code) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.closedWith = code;
      this.onclose?.({ code: 1006, reason: "" });
    }

    /** Opens it and says `connected`. */
    accept(data = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.receive({ type: "connected", data: connectedData(data) });
    }

    receive(message) {
      this.onmessage?.({ data: JSON.stringify(message) });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    /** The last command of `type` the client sent. */
    lastSent(type) {
      return this.sent.findLast((m) => m.type === type);
    }
  }
  return FakeWebSocket;
}

const NOW_S = () => Math.floor(Date.UTC(2026, 0, 1) / 1000);

function connectedData({ personal, ...rest } = {}) {
  return {
    user_id: "u1",
    connection_id: "0-1-1",
    expires_at: NOW_S() + 3600,
    ping_interval: 25,
    pong_timeout: 20,
    personal: { channel: "user:u1", offset: 0, epoch: "e0", ...personal },
    ...rest,
  };
}

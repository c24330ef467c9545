// The tidings client for browsers and Node 20+: one ES module, no dependencies, no build step.
//
// It holds one WebSocket at a time, reconnects by the shared policy (clients/policy.json), keeps
// each channel's last position and resumes from it, refreshes its token before it expires and
// notices a dead connection that no close event reports. The wire protocol is in the README's
// "Protocol" section.

/**
 * The reconnection policy shared by every tidings client: the values of clients/policy.json, which
 * explains each one (a test checks the two agree). Times are milliseconds.
 */
export const POLICY = Object.freeze({
  backoff_min_ms: 1000,
  backoff_max_ms: 30000,
  soon_ms: Object.freeze([100, 1000]),
  floor_ms: 5000,
  stable_after_ms: 5000,
  connect_timeout_ms: 10000,
  liveness_grace_ms: 5000,
  refresh_at: Object.freeze([0.8, 0.9]),
  close_codes: Object.freeze([
    Object.freeze({ first: 1001, last: 1001, action: "soon" }),
    Object.freeze({ first: 4000, last: 4099, action: "new_token" }),
    Object.freeze({ first: 4100, last: 4199, action: "floor" }),
    Object.freeze({ first: 4200, last: 4299, action: "soon" }),
  ]),
  other_codes: "backoff",
});

// The server's own message types; anything else that names a channel is an event.
const REPLY_TYPES = new Set(["connected", "subscribed", "unsubscribed", "pong", "published", "refreshed", "error"]);
// Subscribe errors that pass (the hub was briefly away, or we went too fast): try again later.
const RETRYABLE = new Set(["subscription_failed", "internal_error", "rate_limited"]);
// The server's defaults, for a server whose `connected` does not carry its figures yet.
const DEFAULT_PING_INTERVAL_S = 25;
const DEFAULT_PONG_TIMEOUT_S = 20;
// A token this close to expiry is not worth refreshing: the server closes with 4002 and the
// reconnect fetches a new one.
const MIN_REFRESH_MS = 1000;
// Detached sockets keep no-op handlers rather than none: the `ws` package throws on an `error`
// event nobody listens to.
const NOOP = () => {};

const DEFAULT_CLOCK = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (id) => clearTimeout(id),
};

/** An error reply from the server, or the client's own reason a request did not complete. */
export class TidingsError extends Error {
  /**
   * @param {string} code the server's code (`unauthorized`, `rate_limited`, ...) or the client's:
   *   `not_connected` (never sent), `disconnected` (sent, then the connection dropped: a publish
   *   may or may not have happened), `closed` (close() was called)
   * @param {string} message
   * @param {number} [retryAfterMs] with `rate_limited`: when to try again
   */
  constructor(code, message, retryAfterMs) {
    super(message);
    this.name = "TidingsError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

/** Handlers by event name; `on` returns the function that removes the handler. */
class Emitter {
  constructor() {
    /** @private */
    this._handlers = new Map();
  }

  /**
   * Calls `fn` on every `event` until the returned function is called.
   * @param {string} event
   * @param {(arg: any) => void} fn
   * @returns {() => void} removes this handler
   */
  on(event, fn) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0 && this._handlers.get(event) === set) this._handlers.delete(event);
    };
  }

  /** @private */
  _emit(event, arg) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const fn of set) {
      try {
        fn(arg);
      } catch (err) {
        // The page's error reporting sees it (Node: an uncaught exception, as from any
        // listener); the client's own state stays consistent.
        (globalThis.reportError ?? rethrow)(err);
      }
    }
  }
}

/**
 * One channel the client holds: renewed after every reconnect from its last position.
 * Events: `event` (each event, in offset order, once), `subscribed` ({channel, offset, epoch,
 * recovered}: recovered is false when missed events could not be replayed: reload the channel
 * from your backend), `error` ({code, message, willRetry, delayMs}).
 */
export class Subscription extends Emitter {
  /** @private */
  constructor(client, channel, position) {
    super();
    /** @type {string | null} the channel; null for the personal channel until the first `connected` */
    this.channel = channel;
    /** @type {{offset: number, epoch: string} | null} the last event received, or the position joined at */
    this.position = position;
    /** @type {"subscribing" | "subscribed" | "unsubscribed"} */
    this.state = "subscribing";
    /** @private */
    this._client = client;
    /** @private consecutive failed subscribes, for their retry delay */
    this._failures = 0;
    /** @private */
    this._retry = null;
  }

  /** Leaves the channel and drops every handler of this subscription. */
  unsubscribe() {
    this._client._unsubscribe(this);
  }

  /**
   * @private `subscribed` (`since`: the position the subscribe resumed from), or the personal
   * channel's part of `connected`
   */
  _joined(data, since) {
    let recovered = data.recovered;
    // A resume answered as "already held" replays nothing: whole only if nothing was missed.
    if (since && recovered === undefined) recovered = data.epoch === since.epoch && data.offset === since.offset;
    // With recovered: true the missed events follow and move the position on themselves; taking
    // the reply's offset now would skip them if the connection dropped halfway through.
    if (data.recovered !== true && data.epoch) this.position = { offset: data.offset, epoch: data.epoch };
    this.state = "subscribed";
    this._failures = 0;
    this._emit("subscribed", { channel: this.channel, offset: data.offset, epoch: data.epoch, recovered });
  }

  /** @private */
  _deliver(event) {
    if (this.state !== "subscribed") return; // what a previous subscription of the channel still had in flight
    const at = this.position;
    if (typeof event.offset === "number" && event.epoch) {
      if (at && at.epoch === event.epoch && event.offset <= at.offset) return; // delivered already
      this.position = { offset: event.offset, epoch: event.epoch };
    }
    this._emit("event", event);
  }

  /** @private */
  _end() {
    this.state = "unsubscribed";
    this._handlers.clear();
  }
}

/**
 * A tidings connection that keeps itself up. It starts connecting right away (after the current
 * task, so handlers registered now see `connecting`).
 *
 * Events: `connecting` ({attempt}), `connected` (the server's `connected` data), `disconnected`
 * ({code, reason, willReconnect, delayMs}; delayMs is null while the browser is offline), `error`
 * ({code, message}: a refused refresh, a failing getToken, an error reply nothing asked for, or why
 * the client stopped). `code` is the close code, or what the client itself detected: 4200 when a
 * ping went unanswered, 1006 for a connect timeout, going offline or a failing getToken.
 */
export class TidingsClient extends Emitter {
  /**
   * @param {string} url the WebSocket endpoint, e.g. `wss://example.com/ws`
   * @param {object} options
   * @param {() => Promise<string> | string} options.getToken a JWT; called before each connect and
   *   before the token expires (concurrent needs share one call); an empty token stops the client
   * @param {any} [options.WebSocket] a WebSocket class: the global one by default (pass `ws` in Node 20)
   * @param {number} [options.minDelayMs] first reconnect delay bound (policy: 1000)
   * @param {number} [options.maxDelayMs] reconnect delay cap (policy: 30000)
   * @param {number} [options.maxAttempts] reconnects in a row before giving up (Infinity)
   * @param {() => number} [options.random] uniform in [0, 1): for tests
   * @param {{now(): number, setTimeout(fn: () => void, ms: number): any, clearTimeout(id: any): void}} [options.clock] for tests
   * @param {EventTarget | null} [options.network] where `online`/`offline` fire: the window in browsers
   */
  constructor(url, options) {
    super();
    if (typeof options?.getToken !== "function") throw new TypeError("options.getToken must be a function");
    const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket (the ws package in Node 20)");
    }
    /** @type {"connecting" | "connected" | "disconnected" | "closed"} */
    this.state = "disconnected";
    /** The personal channel `user:<sub>`, joined by the server at connect: `client.personal.on("event", fn)`. */
    this.personal = new Subscription(this, null, null);
    /** @type {Map<string, Subscription>} the channels subscribed, by name */
    this.subscriptions = new Map();
    /** @private */ this._url = url;
    /** @private */ this._getToken = options.getToken;
    /** @private */ this._WebSocket = WebSocketClass;
    /** @private */ this._minDelay = options.minDelayMs ?? POLICY.backoff_min_ms;
    /** @private */ this._maxDelay = options.maxDelayMs ?? POLICY.backoff_max_ms;
    /** @private */ this._maxAttempts = options.maxAttempts ?? Infinity;
    if (!(this._minDelay > 0 && this._maxDelay >= this._minDelay)) {
      // A zero delay is the reconnect loop that hits a server hundreds of times a second.
      throw new RangeError("reconnect delays must be positive, with minDelayMs <= maxDelayMs");
    }
    /** @private */ this._random = options.random ?? Math.random;
    /** @private */ this._clock = options.clock ?? DEFAULT_CLOCK;
    /** @private */ this._network =
      options.network !== undefined ? options.network : typeof globalThis.addEventListener === "function" ? globalThis : null;
    /** @private */ this._ws = null;
    /** @private bumped by whatever makes an in-flight dial stale (close, offline, a newer dial) */
    this._dialSeq = 0;
    /** @private the token the current connection was opened or refreshed with */
    this._token = null;
    /** @private the getToken() call in flight, shared */
    this._tokenCall = null;
    /** @private set by a 4000-4099 close: the next dial must not use it, and must not be refused too */
    this._refusedToken = null;
    /** @private id -> {kind, resolve, reject, sub, since, token, expiresAt, sentAt} */
    this._pending = new Map();
    /** @private */ this._nextId = 1;
    /** @private failures in a row since the last stable connection */
    this._attempt = 0;
    /** @private */ this._offline = false;
    /** @private what the last disconnect said, repeated when only its delay changes */
    this._lastClose = { code: 1006, reason: "" };
    /** @private name -> timer id: reconnect, connect, liveness, stable, refresh */
    this._timers = new Map();
    /** @private */ this._received = 0;
    /** @private */ this._lastSeen = 0;
    /** @private the value of _received when our liveness ping went out, or null */
    this._pingMark = null;
    /** @private */ this._pingSentAt = 0;
    /** @private */ this._liveness = null;
    if (this._network) {
      this._onOffline = () => this._wentOffline();
      this._onOnline = () => this._wentOnline();
      this._network.addEventListener("offline", this._onOffline);
      this._network.addEventListener("online", this._onOnline);
    }
    queueMicrotask(() => this._dial());
  }

  /**
   * Subscribes to `channel`, now if connected, else as soon as the connection is up; renewed from
   * its last position after every reconnect.
   * @param {string} channel
   * @param {(event: object) => void} [onEvent] each event: {type, channel, data, timestamp, offset, epoch}
   * @param {{since?: {offset: number, epoch: string}}} [options] resume from a position kept earlier
   * @returns {Subscription}
   */
  subscribe(channel, onEvent, options) {
    if (this.state === "closed") throw new Error("the client is closed");
    if (this.subscriptions.has(channel) || channel === this.personal.channel) {
      throw new Error(`already subscribed to ${channel}`); // two would each get every event
    }
    const since = options?.since;
    const sub = new Subscription(this, channel, since ? { offset: since.offset, epoch: since.epoch } : null);
    if (onEvent) sub.on("event", onEvent);
    this.subscriptions.set(channel, sub);
    if (this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  /**
   * Publishes an event; resolves once the server stamped it, rejects with a TidingsError whose
   * code is the server's (`unauthorized`, `rate_limited`, ...) or `not_connected`/`disconnected`.
   * @param {string} channel
   * @param {string} type
   * @param {object} data
   * @returns {Promise<{channel: string, offset: number, epoch: string}>}
   */
  publish(channel, type, data) {
    return this._request("publish", { channel, type, data });
  }

  /**
   * Round trip to the server.
   * @returns {Promise<number>} milliseconds until the pong
   */
  ping() {
    return this._request("ping", {});
  }

  /** Stops for good: closes the socket (1000), clears every timer and handler, rejects what is pending. */
  close() {
    if (this.state === "closed") return;
    this._release(new TidingsError("closed", "the client was closed"));
    this._emit("disconnected", { code: 1000, reason: "closed by the client", willReconnect: false, delayMs: null });
    for (const sub of this.subscriptions.values()) sub._end();
    this.subscriptions.clear();
    this.personal._end();
    this._handlers.clear();
  }

  // -- connecting ----------------------------------------------------------------------------------
  /** @private */
  async _dial() {
    if (this.state === "closed" || this._offline) return;
    this._setTimer("reconnect", null);
    this._dropSocket();
    const seq = ++this._dialSeq;
    this.state = "connecting";
    // Counted from here: a getToken() that never answers is a failed attempt too.
    this._setTimer("connect", POLICY.connect_timeout_ms, () => this._closed(1006, "connect timeout"));
    this._emit("connecting", { attempt: this._attempt });
    let token;
    try {
      token = await this._freshToken();
    } catch (err) {
      if (seq !== this._dialSeq) return;
      this._emit("error", { code: "token_unavailable", message: `getToken failed: ${err?.message ?? err}` });
      this._closed(1006, "getToken failed");
      return;
    }
    if (seq !== this._dialSeq) return; // closed, offline or superseded meanwhile
    if (!token) return this._stop("unauthorized", "getToken returned no token");
    if (token === this._refusedToken) {
      return this._stop("unauthorized", "getToken returned the token the server refused");
    }
    this._token = token;
    let ws;
    try {
      ws = new this._WebSocket(this._connectUrl(token));
    } catch (err) {
      // A malformed URL: no retry will fix it. (The message leaves out the URL: it holds the token.)
      return this._stop("invalid_request", `cannot open a WebSocket to ${this._url}: ${err?.name ?? err}`);
    }
    this._ws = ws;
    ws.onmessage = (m) => this._ws === ws && this._receive(m.data);
    ws.onclose = (e) => this._ws === ws && this._closed(e.code, e.reason);
    ws.onerror = NOOP; // a close event follows every error
  }

  /** @private */
  _connectUrl(token) {
    let url = `${this._url}${this._url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
    const at = this.personal.position;
    if (at) url += `&since=${at.offset}:${encodeURIComponent(at.epoch)}`;
    return url;
  }

  /** @private one getToken() call however many need a token at once */
  _freshToken() {
    if (!this._tokenCall) {
      const call = (async () => this._getToken())();
      const done = () => {
        if (this._tokenCall === call) this._tokenCall = null;
      };
      call.then(done, done);
      this._tokenCall = call;
    }
    return this._tokenCall;
  }

  /** @private the connection ended: by the server, by the network, or by what the client detected */
  _closed(code, reason) {
    if (this.state === "closed") return;
    const wasConnected = this.state === "connected";
    this._dialSeq++;
    this._dropSocket();
    this._endConnection(new TidingsError("disconnected", `connection closed (${code}) before the reply`));
    this.state = "disconnected";
    this._lastClose = { code, reason };
    if (this._offline) {
      this._emit("disconnected", { code, reason, willReconnect: true, delayMs: null });
      return;
    }
    this._attempt += 1;
    if (this._attempt > this._maxAttempts) {
      return this._stop("max_attempts", `gave up after ${this._maxAttempts} reconnect attempts`, code, reason);
    }
    const action = closeAction(code);
    if (action === "new_token") {
      if (!wasConnected && this._refusedToken !== null) {
        return this._stop("unauthorized", `a fresh token was refused too (${code} ${reason})`, code, reason);
      }
      this._refusedToken = this._token;
    }
    const delayMs = reconnectDelay(action, this._attempt, this._minDelay, this._maxDelay, this._random);
    this._setTimer("reconnect", delayMs, () => this._dial());
    this._emit("disconnected", { code, reason, willReconnect: true, delayMs });
  }

  /** @private ends the client after a failure it cannot get past by retrying */
  _stop(errorCode, message, code = 1006, reason = message) {
    this._release(new TidingsError(errorCode, message));
    this._emit("error", { code: errorCode, message });
    this._emit("disconnected", { code, reason, willReconnect: false, delayMs: null });
  }

  /** @private releases the socket, timers, network listeners and pending requests */
  _release(error) {
    this.state = "closed";
    this._dialSeq++;
    this._dropSocket();
    this._endConnection(error);
    for (const name of [...this._timers.keys()]) this._setTimer(name, null);
    if (this._network) {
      this._network.removeEventListener("offline", this._onOffline);
      this._network.removeEventListener("online", this._onOnline);
      this._network = null;
    }
  }

  /** @private one socket at a time: the old one is detached and closed before a new one is dialled */
  _dropSocket() {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    ws.onmessage = ws.onclose = ws.onerror = NOOP;
    ws.close(1000);
  }

  /** @private what belongs to one connection: its timers, pending requests, subscription states */
  _endConnection(error) {
    for (const name of ["connect", "liveness", "stable", "refresh"]) this._setTimer(name, null);
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) entry.reject?.(error);
    for (const sub of [this.personal, ...this.subscriptions.values()]) {
      this._clearRetry(sub);
      if (sub.state === "subscribed") sub.state = "subscribing";
    }
  }

  // -- the network ---------------------------------------------------------------------------------
  /** @private */
  _wentOffline() {
    if (this._offline) return;
    this._offline = true;
    if (this.state === "disconnected") {
      this._setTimer("reconnect", null);
      this._emit("disconnected", { ...this._lastClose, willReconnect: true, delayMs: null });
    } else {
      this._closed(1006, "offline");
    }
  }

  /** @private back online: reconnect at once, after a little jitter so a whole office does not dial together */
  _wentOnline() {
    this._offline = false;
    if (this.state !== "disconnected") return;
    const delayMs = uniform(this._random, POLICY.soon_ms[0], POLICY.soon_ms[1]);
    this._setTimer("reconnect", delayMs, () => this._dial());
    this._emit("disconnected", { ...this._lastClose, willReconnect: true, delayMs });
  }

  // -- receiving -----------------------------------------------------------------------------------
  /** @private */
  _receive(raw) {
    this._received++;
    this._lastSeen = this._clock.now();
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return; // the server sends JSON objects only
    }
    if (typeof msg.channel === "string" && !REPLY_TYPES.has(msg.type)) {
      const sub = msg.channel === this.personal.channel ? this.personal : this.subscriptions.get(msg.channel);
      sub?._deliver(msg);
      return;
    }
    const data = msg.data ?? {};
    if (msg.type === "connected") return this._connected(data);
    const entry = msg.id === undefined ? undefined : this._pending.get(msg.id);
    if (entry) {
      this._pending.delete(msg.id);
      return this._reply(entry, msg.type, data);
    }
    if (msg.type === "unsubscribed" && data.reason) return this._ended(data);
    if (msg.type === "error") this._emit("error", { code: data.code, message: data.message });
  }

  /** @private */
  _connected(data) {
    this._setTimer("connect", null);
    this.state = "connected";
    this._refusedToken = null;
    const ping = (data.ping_interval ?? DEFAULT_PING_INTERVAL_S) * 1000;
    const pong = (data.pong_timeout ?? DEFAULT_PONG_TIMEOUT_S) * 1000;
    this._liveness = { quietMs: ping + POLICY.liveness_grace_ms, pongMs: pong };
    this._pingMark = null;
    this._setTimer("liveness", this._liveness.quietMs, () => this._checkLiveness());
    this._setTimer("stable", POLICY.stable_after_ms, () => {
      this._attempt = 0;
    });
    this._scheduleRefresh(data.expires_at);
    const personal = data.personal ?? {};
    if (this.personal.channel !== personal.channel) {
      this.personal.channel = personal.channel; // another user's position means nothing here
      this.personal.position = null;
    }
    this.personal._joined(personal);
    const clash = this.subscriptions.get(personal.channel);
    if (clash) this._drop(clash, "invalid_request", `${personal.channel} is the personal channel: use client.personal`);
    for (const sub of this.subscriptions.values()) this._sendSubscribe(sub);
    this._emit("connected", data);
  }

  /** @private a reply to one of our requests */
  _reply(entry, type, data) {
    const { kind, sub } = entry;
    if (kind === "subscribe") {
      if (!this._holds(sub)) return;
      if (type === "subscribed") sub._joined(data, entry.since);
      else this._subscribeFailed(sub, data);
    } else if (kind === "refresh") {
      if (type === "refreshed") {
        this._token = entry.token;
        this._scheduleRefresh(data.expires_at);
      } else {
        this._emit("error", { code: data.code, message: `token refresh refused: ${data.message}` });
        this._scheduleRefresh(entry.expiresAt);
      }
    } else if (type === "error") {
      entry.reject(new TidingsError(data.code, data.message, data.retry_after_ms));
    } else {
      entry.resolve(kind === "ping" ? this._clock.now() - entry.sentAt : data);
    }
  }

  /** @private the server ended a subscription by itself */
  _ended(data) {
    const sub = data.channel === this.personal.channel ? this.personal : this.subscriptions.get(data.channel);
    if (!sub) return;
    if (data.reason === "insufficient_state") {
      // It missed events nobody can replay any more: resubscribing from the last position says
      // so (recovered: false), or recovers them if the hub still has them.
      sub.state = "subscribing";
      this._sendSubscribe(sub);
      return;
    }
    // "unauthorized": a refreshed token no longer allows the channel; it will not take us back.
    this._drop(sub, data.reason, `the server ended the subscription: ${data.reason}`);
  }

  /** @private a subscription that is over: told why, then forgotten */
  _drop(sub, code, message) {
    this._clearRetry(sub);
    sub.state = "unsubscribed";
    sub._emit("error", { code, message, willRetry: false, delayMs: null });
    if (sub === this.personal) return; // held by the server for as long as the connection
    this.subscriptions.delete(sub.channel);
    sub._end();
  }

  /** @private */
  _subscribeFailed(sub, data) {
    if (!RETRYABLE.has(data.code)) return this._drop(sub, data.code, data.message);
    sub._failures += 1;
    const delayMs =
      data.code === "rate_limited" && data.retry_after_ms
        ? uniform(this._random, data.retry_after_ms, data.retry_after_ms + this._minDelay)
        : reconnectDelay("backoff", sub._failures, this._minDelay, this._maxDelay, this._random);
    sub._retry = this._clock.setTimeout(() => {
      sub._retry = null;
      if (this.state === "connected" && this._holds(sub)) this._sendSubscribe(sub);
    }, delayMs);
    sub._emit("error", { code: data.code, message: data.message, willRetry: true, delayMs });
  }

  // -- sending -------------------------------------------------------------------------------------
  /** @private */
  _sendSubscribe(sub) {
    this._clearRetry(sub);
    const id = this._newId();
    const since = sub.position;
    this._pending.set(id, { kind: "subscribe", sub, since });
    const data = since ? { channel: sub.channel, since } : { channel: sub.channel };
    this._send({ type: "subscribe", id, data });
  }

  /** @private */
  _unsubscribe(sub) {
    if (sub === this.personal) throw new Error("the personal channel is held for as long as the connection");
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    this._clearRetry(sub);
    sub._end();
    // No id: the server's own `unsubscribed` messages carry a reason, this reply does not.
    if (this.state === "connected") this._send({ type: "unsubscribe", data: { channel: sub.channel } });
  }

  /** @private */
  _request(type, data) {
    if (this.state !== "connected") {
      const code = this.state === "closed" ? "closed" : "not_connected";
      return Promise.reject(new TidingsError(code, `cannot ${type}: the client is ${this.state}`));
    }
    return new Promise((resolve, reject) => {
      const id = this._newId();
      this._pending.set(id, { kind: type, resolve, reject, sentAt: this._clock.now() });
      this._send({ type, id, data });
    });
  }

  /** @private */
  _send(message) {
    this._ws?.send(JSON.stringify(message));
  }

  /** @private */
  _newId() {
    return String(this._nextId++);
  }

  /** @private */
  _holds(sub) {
    return sub === this.personal || this.subscriptions.get(sub.channel) === sub;
  }

  /** @private */
  _clearRetry(sub) {
    if (sub._retry !== null) {
      this._clock.clearTimeout(sub._retry);
      sub._retry = null;
    }
  }

  // -- timers --------------------------------------------------------------------------------------
  /** @private (re)arms the timer `name`, or only clears it when `ms` is null */
  _setTimer(name, ms, fn) {
    const id = this._timers.get(name);
    if (id !== undefined) {
      this._clock.clearTimeout(id);
      this._timers.delete(name);
    }
    if (ms === null) return;
    this._timers.set(
      name,
      this._clock.setTimeout(() => {
        this._timers.delete(name);
        fn();
      }, ms),
    );
  }

  /**
   * @private A browser never sees WebSocket pings, and a dead TCP path may report nothing for
   * minutes: after a quiet spell longer than the server's ping interval, ask with a JSON ping.
   */
  _checkLiveness() {
    const now = this._clock.now();
    const { quietMs, pongMs } = this._liveness;
    const check = () => this._checkLiveness();
    if (this._pingMark !== null) {
      if (this._received === this._pingMark) {
        const waited = now - this._pingSentAt;
        if (waited >= pongMs) return this._closed(4200, "no pong");
        return this._setTimer("liveness", pongMs - waited, check);
      }
      this._pingMark = null;
    }
    const quiet = now - this._lastSeen;
    if (quiet < quietMs) return this._setTimer("liveness", quietMs - quiet, check);
    this._pingMark = this._received;
    this._pingSentAt = now;
    this._send({ type: "ping", data: {} });
    this._setTimer("liveness", pongMs, check);
  }

  /** @private */
  _scheduleRefresh(expiresAt) {
    const left = expiresAt * 1000 - this._clock.now();
    if (!(left >= MIN_REFRESH_MS)) return;
    const [early, late] = POLICY.refresh_at;
    this._setTimer("refresh", uniform(this._random, left * early, left * late), () => this._refresh(expiresAt));
  }

  /** @private */
  async _refresh(expiresAt) {
    const ws = this._ws;
    let token;
    try {
      token = await this._freshToken();
    } catch (err) {
      if (this._ws !== ws) return;
      this._emit("error", { code: "token_unavailable", message: `getToken failed: ${err?.message ?? err}` });
      this._scheduleRefresh(expiresAt);
      return;
    }
    if (this._ws !== ws || this.state !== "connected") return; // a new connection brought its own token
    const id = this._newId();
    this._pending.set(id, { kind: "refresh", token, expiresAt });
    this._send({ type: "refresh", id, data: { token } });
  }
}

/** The policy's action for a close code: backoff, floor, soon or new_token. */
function closeAction(code) {
  for (const rule of POLICY.close_codes) if (code >= rule.first && code <= rule.last) return rule.action;
  return POLICY.other_codes;
}

/** The delay before reconnect `attempt` (1 = the first failure in a row) after a close with this action. */
function reconnectDelay(action, attempt, minMs, maxMs, random) {
  if ((action === "soon" || action === "new_token") && attempt === 1) {
    return uniform(random, POLICY.soon_ms[0], POLICY.soon_ms[1]);
  }
  const low = action === "floor" ? Math.max(minMs, POLICY.floor_ms) : minMs;
  const high = Math.max(low, Math.min(maxMs, low * 2 ** Math.min(attempt, 31)));
  return uniform(random, low, high);
}

function rethrow(err) {
  queueMicrotask(() => {
    throw err;
  });
}

function uniform(random, low, high) {
  return Math.round(low + random() * (high - low));
}

let crcTable = null; // the CRC-32 table, built on the first shardOf()

/**
 * The hub shard that owns a channel, as the server computes it (hub/shards.py): CRC-32 (IEEE) of
 * the name's UTF-8 bytes, modulo the number of shards. For a JavaScript backend that routes by
 * shard; subscribing and publishing through TidingsClient never need it.
 * @param {string} channel
 * @param {number} shards the hub count (TIDINGS_HUBS), a positive integer
 * @returns {number} 0 to shards - 1
 */
export function shardOf(channel, shards) {
  if (!Number.isInteger(shards) || shards < 1) throw new RangeError("shards must be a positive integer");
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c;
    }
  }
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(channel)) crc = crcTable[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return ((crc ^ 0xffffffff) >>> 0) % shards;
}

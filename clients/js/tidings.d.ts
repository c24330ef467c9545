// Types for tidings.js, the tidings client (browsers and Node 20+).

/** A channel's place in its stream: resume from it with `since`. */
export interface Position {
  offset: number;
  epoch: string;
}

/** An event as the server sends it. */
export interface TidingsEvent<D = Record<string, unknown>> {
  type: string;
  channel: string;
  data: D;
  /** ISO 8601, set by the publisher's side. */
  timestamp: string;
  offset: number;
  epoch: string;
}

export interface ConnectedInfo {
  user_id: string;
  connection_id: string;
  /** Unix seconds. */
  expires_at: number;
  /** Seconds of silence before the server pings. */
  ping_interval?: number;
  pong_timeout?: number;
  personal: { channel: string; offset?: number; epoch?: string; recovered?: boolean };
}

export interface DisconnectedInfo {
  /** The close code, or what the client detected: 4200 (no pong), 1006 (connect timeout, offline, getToken failed). */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** Milliseconds until the next attempt; null when not reconnecting or waiting for the browser's `online`. */
  delayMs: number | null;
}

export interface ErrorInfo {
  code: string;
  message: string;
}

export interface SubscribedInfo {
  channel: string;
  offset?: number;
  epoch?: string;
  /** Only on a resume: false means nothing was replayed: reload the channel from your backend. */
  recovered?: boolean;
}

export interface SubscriptionErrorInfo extends ErrorInfo {
  willRetry: boolean;
  delayMs: number | null;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
}

export interface TidingsClientOptions {
  /** A JWT; called before each connect and before expiry. An empty token stops the client. */
  getToken: () => Promise<string> | string;
  /** A WebSocket class: the global one by default; pass `ws` in Node 20. */
  WebSocket?: unknown;
  /** Default 1000. */
  minDelayMs?: number;
  /** Default 30000. */
  maxDelayMs?: number;
  /** Reconnects in a row before giving up. Default Infinity. */
  maxAttempts?: number;
  /** For tests: uniform in [0, 1). */
  random?: () => number;
  /** For tests: time and timers. */
  clock?: Clock;
  /** Where `online`/`offline` fire (the window in browsers); null for none. */
  network?: EventTarget | null;
}

/** A reconnection policy value, as in clients/policy.json. */
export declare const POLICY: Readonly<{
  backoff_min_ms: number;
  backoff_max_ms: number;
  soon_ms: readonly [number, number];
  floor_ms: number;
  stable_after_ms: number;
  connect_timeout_ms: number;
  liveness_grace_ms: number;
  refresh_at: readonly [number, number];
  close_codes: ReadonlyArray<{ first: number; last: number; action: "soon" | "new_token" | "floor" | "backoff" }>;
  other_codes: "backoff";
}>;

export declare class TidingsError extends Error {
  constructor(code: string, message: string, retryAfterMs?: number);
  /** The server's code, or the client's: not_connected, disconnected, closed. */
  readonly code: string;
  readonly retryAfterMs?: number;
}

export declare class Subscription {
  private constructor();
  /** null only for the personal channel before the first `connected`. */
  readonly channel: string | null;
  readonly position: Position | null;
  readonly state: "subscribing" | "subscribed" | "unsubscribed";
  on(event: "event", fn: (event: TidingsEvent) => void): () => void;
  on(event: "subscribed", fn: (info: SubscribedInfo) => void): () => void;
  on(event: "error", fn: (info: SubscriptionErrorInfo) => void): () => void;
  unsubscribe(): void;
}

export declare class TidingsClient {
  constructor(url: string, options: TidingsClientOptions);
  readonly state: "connecting" | "connected" | "disconnected" | "closed";
  /** The personal channel user:<sub>, joined at connect. */
  readonly personal: Subscription;
  readonly subscriptions: ReadonlyMap<string, Subscription>;
  subscribe(channel: string, onEvent?: (event: TidingsEvent) => void, options?: { since?: Position }): Subscription;
  publish(channel: string, type: string, data: Record<string, unknown>): Promise<Position & { channel: string }>;
  /** Resolves with the round trip in milliseconds. */
  ping(): Promise<number>;
  close(): void;
  on(event: "connecting", fn: (info: { attempt: number }) => void): () => void;
  on(event: "connected", fn: (info: ConnectedInfo) => void): () => void;
  on(event: "disconnected", fn: (info: DisconnectedInfo) => void): () => void;
  on(event: "error", fn: (info: ErrorInfo) => void): () => void;
}

/**
 * The hub shard that owns a channel: CRC-32 (IEEE) of its UTF-8 bytes modulo `shards`, as the
 * server computes it. For a JavaScript backend that routes by shard; the client never needs it.
 * Throws a RangeError unless `shards` is a positive integer.
 */
export declare function shardOf(channel: string, shards: number): number;

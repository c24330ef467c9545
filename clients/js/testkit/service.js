// A real tidings for the JavaScript tests: `python -m tidings run` from the repository's .venv on
// free loopback ports, like tests/service.py. Every process it starts is stopped by PID (its
// process group) when the test ends, even on failure.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, closeSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = path.resolve(fileURLToPath(new URL("../../..", import.meta.url)));
export const PYTHON = path.join(REPO, ".venv", "bin", "python");
const READY_LINE = "tidings is ready"; // printed once the hub and every worker reported READY=1
const STARTUP_TIMEOUT_MS = 30_000; // a cold start of hub + workers on a loaded 2-core box

/** Why the real-server tests cannot run here, or null. */
export function serviceMissing() {
  return existsSync(PYTHON) ? null : `no ${PYTHON}: run make install first`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** An HS256 JWT, as tidings checks them. */
export function hs256(claims, secret) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const signed = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

/** Polls `predicate` every 20 ms until it is truthy; throws `what` after `timeoutMs`. */
export async function waitFor(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export class TidingsService {
  /** @param {{workers?: number, env?: Record<string, string>}} [options] */
  constructor({ workers = 2, env = {} } = {}) {
    this.workers = workers;
    this.extraEnv = env;
    this.secret = randomBytes(32).toString("hex");
    this.apiKey = randomBytes(16).toString("hex");
    this.proc = null;
  }

  async start() {
    this.dir = mkdtempSync(path.join(os.tmpdir(), "tidings-js-test-"));
    this.logPath = path.join(this.dir, "service.log");
    this.port = await freePort();
    this.apiPort = await freePort();
    const env = {
      ...process.env,
      TIDINGS_HOST: "127.0.0.1",
      TIDINGS_PORT: String(this.port),
      TIDINGS_API_PORT: String(this.apiPort),
      TIDINGS_WORKERS: String(this.workers),
      TIDINGS_RUNTIME_DIR: this.dir,
      TIDINGS_JWT_SECRET: this.secret,
      TIDINGS_API_KEY: this.apiKey,
      TIDINGS_DRAIN_WINDOW: "1",
      PYTHONUNBUFFERED: "1",
      ...this.extraEnv,
    };
    const log = openSync(this.logPath, "w");
    // detached: its own process group, so stop() can take every child down by the group's id.
    this.proc = spawn(PYTHON, ["-m", "tidings", "run"], { cwd: REPO, env, detached: true, stdio: ["ignore", log, log] });
    closeSync(log);
    this.exited = new Promise((resolve) => this.proc.once("exit", (code, signal) => resolve(code ?? signal)));
    this._killOnExit = () => this._killGroup();
    process.once("exit", this._killOnExit);
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    while (!this.logs().includes(READY_LINE)) {
      if (this.proc.exitCode !== null) throw new Error(`tidings exited early (${this.proc.exitCode}):\n${this.logs()}`);
      if (Date.now() > deadline) throw new Error(`tidings not ready after ${STARTUP_TIMEOUT_MS} ms:\n${this.logs()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    return this;
  }

  /** SIGTERM the supervisor (it drains its children), SIGKILL the group if it is late, remove the files. */
  async stop() {
    if (!this.proc) return;
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGTERM");
      const late = setTimeout(() => this._killGroup(), 15_000);
      await this.exited;
      clearTimeout(late);
    }
    this._killGroup(); // anything that outlived the supervisor
    process.removeListener("exit", this._killOnExit);
    rmSync(this.dir, { recursive: true, force: true });
    this.proc = null;
  }

  _killGroup() {
    try {
      process.kill(-this.proc.pid, "SIGKILL");
    } catch {
      // the group is gone already
    }
  }

  logs() {
    try {
      return readFileSync(this.logPath, "utf8");
    } catch {
      return "";
    }
  }

  /** Role -> pid of the supervisor's live children: {"hub": 123, "worker 0": 124, ...}. */
  children() {
    const found = {};
    let pids = [];
    try {
      pids = readFileSync(`/proc/${this.proc.pid}/task/${this.proc.pid}/children`, "utf8").split(/\s+/).filter(Boolean);
    } catch {
      return found;
    }
    for (const pid of pids.map(Number)) {
      let argv;
      try {
        argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      } catch {
        continue;
      }
      if (argv.includes("hub")) found.hub = pid;
      else if (argv.includes("worker")) found[`worker ${argv[argv.indexOf("--index") + 1]}`] = pid;
    }
    return found;
  }

  /** The pid of the worker that holds a connection, from its connection_id ("<index>-<boot>-<n>"). */
  workerOf(connectionId) {
    const pid = this.children()[`worker ${connectionId.split("-")[0]}`];
    if (!pid) throw new Error(`no worker for connection ${connectionId}: ${JSON.stringify(this.children())}`);
    return pid;
  }

  token(sub, { channels = [], publish = [], ttl = 3600 } = {}) {
    const now = Math.floor(Date.now() / 1000);
    return hs256({ sub, exp: now + ttl, iat: now, channels, publish }, this.secret);
  }

  wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  pageUrl(pathname) {
    return `http://127.0.0.1:${this.port}${pathname}`;
  }

  /** POST /api/publish; retried while a worker restarts (the API lives in the workers). */
  async publish(channel, type, data) {
    let lastError;
    for (let i = 0; i < 50; i++) {
      try {
        const r = await fetch(`http://127.0.0.1:${this.apiPort}/api/publish`, {
          method: "POST",
          headers: { Authorization: `Bearer ${this.apiKey}`, "Content-Type": "application/json" },
          body: JSON.stringify({ channel, type, data }),
        });
        const body = await r.json();
        if (r.status === 200) return body;
        lastError = new Error(`publish: HTTP ${r.status} ${JSON.stringify(body)}`);
        if (r.status < 500) break;
      } catch (err) {
        lastError = err;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw lastError;
  }
}

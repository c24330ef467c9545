"""The one configuration object: every setting, its default and why, read once and passed down.

Sources, later ones winning: the named defaults below, `TIDINGS_*` environment variables, then
command-line flags. Nothing else in tidings reads the environment for settings; components get
the `Config` (or the fields they need) as an argument.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hub.history import HistorySpecError, parse_history_spec

ENV_PREFIX = "TIDINGS_"
ROLES = ("all", "hubs", "workers")  # what `tidings run` starts on a host
MAX_HUBS = 64  # shards are processes with a core each: past a box's cores they only compete
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash output
DEV_SECRET_FILE = "jwt-secret"  # created by `tidings run` when no key is configured
DEV_API_KEY_FILE = "api-key"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the setting and what to do."""


def _default_runtime_dir() -> str:
    # XDG_RUNTIME_DIR is per user and wiped at logout, the right home for sockets and a dev secret.
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"tidings-{os.getuid()}")


def _setting(default: Any, doc: str, *, secret: bool = False, flag: bool = True) -> Any:
    meta = {"doc": doc, "secret": secret, "flag": flag}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # -- where it listens ------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "WebSocket listen address (loopback until you mean otherwise)")
    port: int = _setting(8080, "WebSocket port, shared by every worker through SO_REUSEPORT")
    workers: int = _setting(lambda: os.cpu_count() or 1, "worker processes for `tidings run`: one per core")
    api_host: str = _setting("127.0.0.1", "HTTP publish API and /metrics address (keep it private)")
    api_port: int = _setting(8081, "HTTP publish API port, shared by the workers (0 turns the API off)")
    api_key: str = _setting("", "bearer key for POST /api/*; `tidings run` makes one when unset", secret=True)
    backlog: int = _setting(4096, "listen backlog: absorbs a reconnect storm (capped by net.core.somaxconn)")

    # -- tokens ----------------------------------------------------------------------------
    jwt_secret: str = _setting("", "HS256 shared secret, at least 32 bytes", secret=True)
    jwt_public_key: str = _setting("", "path of a PEM public key for RS256/ES256 tokens")
    jwt_algorithm: str = _setting("HS256", "the one algorithm accepted: HS256, RS256 or ES256")
    jwt_previous_secret: str = _setting("", "the key being rotated out, accepted until the overlap ends",
                                        secret=True)
    jwt_previous_public_key: str = _setting("", "path of the PEM public key being rotated out")
    jwt_rotation_overlap: float = _setting(86400.0, "seconds the previous key stays valid after a reload")
    jwt_issuer: str = _setting("", "required `iss` claim, checked when set")
    jwt_audience: str = _setting("", "required `aud` claim, checked when set")
    jwt_leeway: float = _setting(5.0, "seconds of clock skew tolerated on exp/nbf/iat")
    max_token_ttl: float = _setting(86400.0, "a token whose exp lies further ahead is refused (24 h)")
    max_token_bytes: int = _setting(8192, "tokens longer than this are refused before decoding")

    # -- processes and endpoints -----------------------------------------------------------
    runtime_dir: str = _setting(_default_runtime_dir, "ipc:// endpoints, dev secrets and metrics live here")
    role: str = _setting("all", "what `tidings run` starts on this host: all (hubs and workers), hubs, or workers "
                                "(which connect to the hub endpoints below)")
    hubs: int = _setting(1, "hub shards; each owns the channels whose CRC-32(name) % HUBS is its number. One hub "
                            "forwards ~250k events per core-second: add shards when one core is the limit")
    hub_ingress: str = _setting("", "hub PULL endpoints publishers push to, one per shard, comma-separated "
                                    "(default ipc://RUNTIME_DIR/ingress; hub-N/ingress with several shards)")
    hub_egress: str = _setting("", "hub XPUB endpoints workers subscribe to, one per shard (default "
                                   "ipc://RUNTIME_DIR/egress)")
    hub_hwm: int = _setting(100_000, "ZeroMQ messages queued per peer before the hub drops (~20 MB at 200 B)")
    hub_requests: str = _setting("", "hub ROUTER endpoints for history reads and confirmed publishes, one per "
                                     "shard (default ipc://RUNTIME_DIR/requests)")
    hub_keys: str = _setting("", "directory of CURVE keys for hub links (`tidings keys generate`): hub.key, "
                                 "hub.key_secret on hub hosts, host.key_secret where workers or publishers run, "
                                 "authorized/ with the public keys a hub admits; empty = no encryption")
    hub_insecure: bool = _setting(False, "allow tcp:// hub endpoints without CURVE keys: anyone who reaches the "
                                         "port reads and injects events (a private test network only)")
    hub_heartbeat: float = _setting(1.0, "seconds between ZeroMQ heartbeats on hub links; a link silent 3x as "
                                         "long is dropped and logged (a lost host is noticed in ~4 s)")
    metrics_dir: str = _setting("", "prometheus multiprocess directory (default RUNTIME_DIR/metrics)")

    # -- history and recovery ----------------------------------------------------------------
    history: str = _setting("user=32/600s,conversation=64/300s",
                            "events kept per channel, by namespace: NS=EVENTS/SECONDSs,...; other namespaces "
                            "keep none (on by default so a reconnecting client resumes out of the box)")
    history_max_bytes: int = _setting(256 << 20, "all kept events together; past it the channels published "
                                                 "least recently lose theirs first")
    history_meta_ttl: float = _setting(86400.0, "seconds a channel nobody publishes to, reads or subscribes keeps "
                                                "its position; then its next event starts a new epoch")
    recovery_max_events: int = _setting(300, "most events one resume replays; a bigger gap is recovered: false "
                                             "(the client refetches from its backend instead)")
    history_persist: bool = _setting(False, "keep history and positions in a journal under STATE_DIR, so they "
                                            "survive a hub restart")
    state_dir: str = _setting("", "where the hub keeps its journal (default RUNTIME_DIR/state; systemd: "
                                  "StateDirectory=)")
    history_persist_max_bytes: int = _setting(1 << 30, "journal size that triggers a compaction to a snapshot")
    history_fsync_seconds: float = _setting(1.0, "journal fsync period: a process crash loses nothing written, a "
                                                 "machine crash up to this much; 0 = fsync every hub pass")

    # -- limits ----------------------------------------------------------------------------
    max_message_bytes: int = _setting(65536, "largest client message, frames or reassembled (Centrifugo's)")
    max_subscriptions: int = _setting(256, "channels one connection may hold")
    max_connections: int = _setting(100_000, "connections per worker before new ones get close 4100")
    max_connections_per_user: int = _setting(100, "connections per `sub` per worker before close 4101")
    max_pending_bytes: int = _setting(1 << 20, "unsent bytes a connection may queue before it is aborted")
    send_buffer_bytes: int = _setting(65536, "SO_SNDBUF per connection (the kernel doubles it): bounds the kernel "
                                             "memory a stalled reader pins; 0 leaves it to autotuning (up to 4 MiB)")
    rate_limit: float = _setting(100.0, "commands per second per connection (token bucket refill)")
    rate_burst: int = _setting(200, "commands a connection may send at once")
    publish_rate_limit: float = _setting(20.0, "publishes per second per connection")
    publish_burst: int = _setting(20, "publishes a connection may send at once")
    rate_abuse_limit: int = _setting(1000, "refusals within 10 s that close the connection with 4129")
    handshake_timeout: float = _setting(5.0, "seconds to complete the HTTP upgrade (slowloris)")
    idle_timeout: float = _setting(25.0, "seconds of silence before the server pings")
    pong_timeout: float = _setting(20.0, "seconds to answer that ping before the connection is dropped")
    subscribe_timeout: float = _setting(2.0, "seconds to wait for the hub to confirm a new channel, answer a "
                                             "history read or confirm a publish")
    unsubscribe_grace: float = _setting(1.0, "seconds a channel stays subscribed at the hub after its last "
                                             "local subscriber leaves (reconnects are cheap)")
    drain_window: float = _setting(10.0, "seconds over which a stopping worker closes its clients with 1001")
    allowed_origins: tuple[str, ...] = _setting((), "browser Origins allowed besides the server's own; '*' = any")

    # -- operations ------------------------------------------------------------------------
    env_file: str = _setting("", "KEY=VALUE file read at start and on every reload, winning over the "
                                 "environment (systemd fixes Environment= at start; keys rotate here)")
    fast_transport: bool = _setting(False, "picows' aiofastnet transport instead of uvloop's: ~5 KiB more per "
                                           "connection, and it spins and logs on EMFILE (measured), so off")
    sched_batch: bool = _setting(True, "hub and workers run as SCHED_BATCH: a woken process does not preempt the "
                                       "running one, so each wake-up carries more messages (measured: ~1.6x chat "
                                       "throughput, ~half the CPU per event)")
    log_format: str = _setting("text", "text for a terminal, json for journald")
    log_level: str = _setting("info", "debug, info, warning or error")
    conformance_echo: bool = _setting(False, "serve /echo for the Autobahn test suite (a test aid)")
    demo: bool = _setting(False, "serve the demo page (GET /demo, the JavaScript client at work) on the "
                                 "WebSocket port; `make run` turns it on")

    # -- derived -----------------------------------------------------------------------------
    @property
    def ingress_endpoints(self) -> tuple[str, ...]:
        return self._endpoints(self.hub_ingress, "ingress")

    @property
    def egress_endpoints(self) -> tuple[str, ...]:
        return self._endpoints(self.hub_egress, "egress")

    @property
    def requests_endpoints(self) -> tuple[str, ...]:
        return self._endpoints(self.hub_requests, "requests")

    def _endpoints(self, listed: str, name: str) -> tuple[str, ...]:
        if listed:
            return tuple(e for e in listed.replace(",", " ").split() if e)
        base = Path(self.runtime_dir)
        if self.hubs == 1:
            return (f"ipc://{base / name}",)
        return tuple(f"ipc://{base / f'hub-{shard}' / name}" for shard in range(self.hubs))

    def journal_path(self, shard: int) -> Path:
        state = Path(self.state_dir or Path(self.runtime_dir) / "state")
        return state / ("history.journal" if self.hubs == 1 else f"history-{shard}.journal")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics_dir or Path(self.runtime_dir) / "metrics")

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Config:
        """Defaults, then TIDINGS_* variables, then explicit overrides (parsed CLI flags)."""
        env: dict[str, str] = dict(os.environ if environ is None else environ)
        env_file = (overrides or {}).get("env_file") or env.get(env_name("env_file"))
        if env_file:
            env.update(read_env_file(Path(env_file)))
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        for name, value in (overrides or {}).items():
            if value is not None:
                f = _FIELDS[name]
                values[name] = parse_value(f, value) if isinstance(value, str) else value
        config = cls(**values)
        config.check_values()
        return config

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def check_values(self) -> None:
        """Checks that need no key material; every role runs these."""
        if self.jwt_algorithm not in ("HS256", "RS256", "ES256"):
            raise ConfigError(f"TIDINGS_JWT_ALGORITHM must be HS256, RS256 or ES256, not {self.jwt_algorithm!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError("TIDINGS_LOG_FORMAT must be text or json")
        if self.workers < 1:
            raise ConfigError("TIDINGS_WORKERS must be at least 1")
        if self.role not in ROLES:
            raise ConfigError(f"TIDINGS_ROLE must be one of {', '.join(ROLES)}, not {self.role!r}")
        if not 1 <= self.hubs <= MAX_HUBS:
            raise ConfigError(f"TIDINGS_HUBS must be 1 to {MAX_HUBS}")
        for name in ("hub_ingress", "hub_egress", "hub_requests"):
            listed = self._endpoints(getattr(self, name), "")
            if getattr(self, name) and len(listed) != self.hubs:
                raise ConfigError(f"{env_name(name)} lists {len(listed)} endpoint(s) but TIDINGS_HUBS is "
                                  f"{self.hubs}: one endpoint per shard, in shard order")
            for endpoint in listed:
                if not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
                    raise ConfigError(f"{env_name(name)}: {endpoint!r} is not an ipc://, tcp:// or inproc:// endpoint")
        if self.hub_heartbeat <= 0:
            raise ConfigError(f"{env_name('hub_heartbeat')} must be above 0")
        if self.send_buffer_bytes < 0:
            raise ConfigError(f"{env_name('send_buffer_bytes')} must be 0 (kernel autotuning) or more")
        for name in ("max_message_bytes", "max_subscriptions", "max_pending_bytes", "rate_burst",
                     "publish_burst", "max_connections", "max_connections_per_user"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be at least 1")
        try:
            retentions = parse_history_spec(self.history)
        except HistorySpecError as exc:
            raise ConfigError(f"{env_name('history')}: {exc}") from None
        longest = max((r.ttl for r in retentions.values()), default=0.0)
        if self.history_meta_ttl <= longest:
            raise ConfigError(f"{env_name('history_meta_ttl')} ({self.history_meta_ttl:g}s) must be longer than the "
                              f"longest history TTL ({longest:g}s): a position must outlive its events")
        if self.history_fsync_seconds < 0:
            raise ConfigError(f"{env_name('history_fsync_seconds')} must be 0 (every pass) or more")
        for name in ("history_max_bytes", "recovery_max_events", "history_persist_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be at least 1")
        for name in ("rate_limit", "publish_rate_limit", "idle_timeout", "pong_timeout", "drain_window",
                     "handshake_timeout", "subscribe_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)} must be above 0")

    @property
    def uses_tcp(self) -> bool:
        return any(e.startswith("tcp://") for e in
                   (*self.ingress_endpoints, *self.egress_endpoints, *self.requests_endpoints))

    def check_hub_links(self) -> None:
        """Every process that binds or connects hub sockets: no clear-text tcp:// by accident."""
        if self.uses_tcp and not self.hub_keys and not self.hub_insecure:
            raise ConfigError("tcp:// hub endpoints need CURVE keys: set TIDINGS_HUB_KEYS to a directory made by "
                              "`tidings keys generate`, or TIDINGS_HUB_INSECURE=1 on a private test network")

    def check_keys(self, *, need_api_key: bool) -> None:
        """What a serving process needs: refuse to start rather than accept any token."""
        if self.jwt_algorithm == "HS256":
            if not self.jwt_secret:
                raise ConfigError(
                    "no token key: set TIDINGS_JWT_SECRET (at least 32 random bytes, e.g. "
                    "`openssl rand -hex 32`) or TIDINGS_JWT_PUBLIC_KEY with TIDINGS_JWT_ALGORITHM=RS256/ES256"
                )
            if len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"TIDINGS_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
            if self.jwt_public_key:
                raise ConfigError("TIDINGS_JWT_PUBLIC_KEY is set but TIDINGS_JWT_ALGORITHM is HS256: "
                                  "one algorithm family per key")
        else:
            if not self.jwt_public_key:
                raise ConfigError(f"TIDINGS_JWT_ALGORITHM={self.jwt_algorithm} needs TIDINGS_JWT_PUBLIC_KEY")
            if not Path(self.jwt_public_key).is_file():
                raise ConfigError(f"TIDINGS_JWT_PUBLIC_KEY: no file at {self.jwt_public_key}")
        if need_api_key and self.api_port and len(self.api_key) < 16:
            raise ConfigError("TIDINGS_API_KEY must be set (16+ characters) for the HTTP publish API, "
                              "or TIDINGS_API_PORT=0 to turn the API off")

    def with_dev_keys(self) -> Config:
        """First-run convenience for `tidings run` and `tidings token`: keys kept in the runtime dir."""
        changes: dict[str, Any] = {}
        if self.jwt_algorithm == "HS256" and not self.jwt_secret:
            changes["jwt_secret"] = _read_or_create_secret(Path(self.runtime_dir) / DEV_SECRET_FILE)
        if not self.api_key:
            changes["api_key"] = _read_or_create_secret(Path(self.runtime_dir) / DEV_API_KEY_FILE)
        return self.replace(**changes) if changes else self

    # -- showing ----------------------------------------------------------------------------
    def to_env(self) -> dict[str, str]:
        """The config as TIDINGS_* variables: how `tidings run` hands it to its children."""
        return {env_name(f.name): format_value(getattr(self, f.name)) for f in fields(self)}

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value with secrets redacted, doc) for `tidings config`."""
        rows = []
        for f in fields(self):
            value = format_value(getattr(self, f.name))
            if f.metadata["secret"] and value:
                value = "<redacted>"
            rows.append((env_name(f.name), value, f.metadata["doc"]))
        return rows


_FIELDS = {f.name: f for f in fields(Config)}


def markdown_rows() -> list[str]:
    """The README's configuration table, one row per setting (tests keep the README in step)."""
    defaults = Config.load(environ={})
    shown = {"workers": "CPU count", "runtime_dir": "$XDG_RUNTIME_DIR/tidings-UID, else /tmp/tidings-UID"}
    rows = []
    for f in fields(Config):
        value = shown.get(f.name) or format_value(getattr(defaults, f.name)) or "(empty)"
        flag = "(env only: secret)" if f.metadata["secret"] else f"`--{f.name.replace('_', '-')}`"
        rows.append(f"| `{env_name(f.name)}` | {flag} | {value} | {f.metadata['doc']} |")
    return rows


def read_env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile= syntax, the subset that matters: KEY=VALUE, # comments, quotes."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"TIDINGS_ENV_FILE: cannot read {path}: {exc.strerror}") from None
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def config_fields() -> list[dataclasses.Field[Any]]:
    return list(fields(Config))


def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind.startswith("tuple"):
            return tuple(p for p in raw.replace(",", " ").split() if p)
    except ValueError:
        raise ConfigError(f"{env_name(f.name)}: cannot read {raw!r} as {kind}") from None
    return raw


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _read_or_create_secret(path: Path) -> str:
    """The secret in `path`, created (0600) when missing or empty. Written to a temporary file and
    linked into place, so a concurrent reader sees either no file or the whole secret."""
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    try:
        try:
            os.link(tmp, path)  # fails if another process won the race: use its secret
        except FileExistsError:
            if path.read_text().strip():
                return path.read_text().strip()
            os.replace(tmp, path)  # an empty leftover from a crash: replace it
            return path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()

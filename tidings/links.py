"""Hub links between processes and hosts: CURVE keys and heartbeats on ZeroMQ sockets.

Heartbeats (ZMTP 3.1 PING/PONG, both directions): every hub socket and every worker socket
pings its peers every TIDINGS_HUB_HEARTBEAT seconds and drops a link silent for three times
that. A hub host that vanishes (power, cable, partition) is noticed by its workers within about
4 s, which then refuse its channels' publishes at once instead of queueing into a dead TCP
connection; a vanished worker host is noticed by the hub, which drops its subscriptions. Without
them TCP would notice only after minutes of retransmissions.

Layout of TIDINGS_HUB_KEYS (made by `tidings keys generate`; ZeroMQ's certificate format, the
one `zmq.auth.create_certificates` writes):

    hub.key              the hubs' public key: every host that connects to a hub needs it
    hub.key_secret       the hubs' key pair: hub hosts only (all shards share it)
    host.key_secret      this host's key pair: hosts that run workers or publish
    host.key             its public half, to copy into each hub host's authorized/
    authorized/*.key     public keys the hubs admit (ZAP); re-read on SIGHUP

SIGHUP also rotates the pairs: a hub that finds a new hub.key_secret reopens its sockets with it (cutting
every link), a worker that finds a new host pair or hub.key re-dials with them.

A hub is a CURVE server: it proves it holds hub.key_secret, every peer proves it holds a key
listed in authorized/, and everything on the link is encrypted (CurveZMQ). A link that fails
either check carries nothing. ZAP runs at each handshake, so a key removed from authorized/
refuses that host's next connection; links already up stay up until they drop or the hub
restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tidings.config import Config, ConfigError
from tidings.logs import RateLimitedLog

HUB_NAME = "hub"
HOST_NAME = "host"
AUTHORIZED_DIR = "authorized"
ZAP_DOMAIN = "tidings"
REFUSAL_LOG_SECONDS = 10.0  # a refused peer retries every second: say so once in a while
HEARTBEAT_MISSES = 3  # heartbeats a link may miss before it is dropped: one lost packet is not a lost host


def set_heartbeat(sock: zmq.Socket[Any], seconds: float) -> None:
    """Before bind/connect: ping the peer every `seconds`, drop it after HEARTBEAT_MISSES silent ones."""
    interval = max(1, int(seconds * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, interval * HEARTBEAT_MISSES)
    sock.setsockopt(zmq.HEARTBEAT_TTL, interval * HEARTBEAT_MISSES)  # the peer drops us as late, no later


@dataclass(frozen=True)
class CurveKeys:
    directory: Path
    hub_public: bytes
    hub_secret: bytes | None  # present on hub hosts
    host_public: bytes | None  # present where workers or publishers run
    host_secret: bytes | None

    @classmethod
    def load(cls, directory: str | Path) -> CurveKeys:
        d = Path(directory)
        hub = d / f"{HUB_NAME}.key"
        if not hub.is_file() and not (d / f"{HUB_NAME}.key_secret").is_file():
            raise ConfigError(f"TIDINGS_HUB_KEYS: no {hub} (copy it from a hub host, or run `tidings keys generate "
                              f"--hub --dir {d}` on the first hub host)")
        hub_public, hub_secret = _load(d / f"{HUB_NAME}.key_secret") if (d / f"{HUB_NAME}.key_secret").is_file() \
            else _load(hub)
        host_public = host_secret = None
        if (d / f"{HOST_NAME}.key_secret").is_file():
            host_public, host_secret = _load(d / f"{HOST_NAME}.key_secret")
        return cls(d, hub_public, hub_secret, host_public, host_secret)

    @property
    def authorized(self) -> Path:
        return self.directory / AUTHORIZED_DIR

    def make_server(self, sock: zmq.Socket[Any]) -> None:
        """Before bind: the socket proves it is the hub and admits only authorized peers."""
        self.check_server()
        assert self.hub_secret is not None
        sock.curve_publickey = self.hub_public
        sock.curve_secretkey = self.hub_secret
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    @property
    def client_pair(self) -> tuple[bytes, bytes | None, bytes | None]:
        """What a connecting socket uses: a change of any part is a rotation."""
        return self.hub_public, self.host_public, self.host_secret

    @property
    def server_pair(self) -> tuple[bytes, bytes | None]:
        return self.hub_public, self.hub_secret

    def check_client(self) -> None:
        if self.host_secret is None or self.host_public is None:
            raise ConfigError(f"TIDINGS_HUB_KEYS: {self.directory / (HOST_NAME + '.key_secret')} is missing: "
                              "workers and publishers need this host's key pair (`tidings keys generate`)")

    def check_server(self) -> None:
        if self.hub_secret is None:
            raise ConfigError(f"TIDINGS_HUB_KEYS: {self.directory / (HUB_NAME + '.key_secret')} is missing: a hub "
                              "needs the hub key pair (`tidings keys generate --hub`)")

    def reread(self, *, server: bool) -> CurveKeys | None:
        """The directory again (on SIGHUP): the new keys if the pair this side uses changed (a
        rotation), None if not. Raises ConfigError if that pair is now unreadable or missing."""
        fresh = CurveKeys.load(self.directory)
        if server:
            fresh.check_server()
            return fresh if fresh.server_pair != self.server_pair else None
        fresh.check_client()
        return fresh if fresh.client_pair != self.client_pair else None

    def make_client(self, sock: zmq.Socket[Any]) -> None:
        """Before connect: the socket talks only to the holder of hub.key_secret, as this host."""
        self.check_client()
        assert self.host_public is not None and self.host_secret is not None
        sock.curve_serverkey = self.hub_public
        sock.curve_publickey = self.host_public
        sock.curve_secretkey = self.host_secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"TIDINGS_HUB_KEYS: cannot read {path}: {exc}") from None
    return public, secret


def keys_for(config: Config) -> CurveKeys | None:
    """The keys the configuration names, or None for unencrypted links (ipc://, or tcp:// with
    TIDINGS_HUB_INSECURE=1, which the caller warns about)."""
    config.check_hub_links()
    return CurveKeys.load(config.hub_keys) if config.hub_keys else None


def warn_if_insecure(config: Config, log: logging.Logger) -> None:
    if config.uses_tcp and not config.hub_keys:
        log.warning("hub links over tcp:// WITHOUT encryption or authentication (TIDINGS_HUB_INSECURE=1): anyone "
                    "who reaches those ports can read and inject events; use TIDINGS_HUB_KEYS outside a test network")


class KeyGate:
    """The hub's ZAP handler: admits the public keys in authorized/, logs the ones it refuses.
    Runs pyzmq's authenticator thread (the hub's loop never waits on a handshake)."""

    def __init__(self, ctx: zmq.Context[Any], keys: CurveKeys, log: logging.Logger) -> None:
        self.keys = keys
        self.log = log
        self.refusals = 0
        self.refusal_log = RateLimitedLog(log, REFUSAL_LOG_SECONDS)
        self.allowed: frozenset[bytes] = frozenset()
        self.reload()
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("tidings.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def reload(self) -> int:
        """Re-read authorized/ (at start and on SIGHUP); returns how many keys it admits."""
        try:
            found = zmq.auth.load_certificates(self.keys.authorized)
        except (OSError, ValueError) as exc:
            self.log.error("cannot read the authorized hub keys in %s: %s (keeping %d keys)",
                           self.keys.authorized, exc, len(self.allowed))
            return len(self.allowed)
        self.allowed = frozenset(k for k, ok in found.items() if ok)  # z85-encoded public keys
        return len(self.allowed)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials_provider hook: called in the authenticator thread per handshake."""
        if key in self.allowed:
            return True
        self.refusals += 1
        self.refusal_log.warning(time.monotonic(), "refused a hub link: CURVE key %s is not in %s (add its host.key "
                                 "there and send the hub SIGHUP to admit it)", key.decode(), self.keys.authorized)
        return False

    def stop(self) -> None:
        self.auth.stop()


def generate(directory: Path, *, hub: bool) -> list[Path]:
    """Write this host's key pair (and with `hub`, the hubs' pair) into `directory`; existing
    keys are kept, never overwritten. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / AUTHORIZED_DIR).mkdir(exist_ok=True, mode=0o700)
    written: list[Path] = []
    names = [HOST_NAME] + ([HUB_NAME] if hub else [])
    for name in names:
        if (directory / f"{name}.key_secret").exists():
            continue
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    host_public = directory / f"{HOST_NAME}.key"
    if hub and host_public.exists():
        # A hub host's own workers and publishers are admitted from the start.
        own = directory / AUTHORIZED_DIR / f"{socket.gethostname()}.key"
        if not own.exists():
            shutil.copyfile(host_public, own)
            written.append(own)
    return written


class LinkWatch:
    """The links of one bound socket, from its ZeroMQ monitor events. Pure: the caller reads the
    monitor and logs what `on_event` returns.

    libzmq reports a connection as ACCEPTED (value: its descriptor), then HANDSHAKE_SUCCEEDED or
    HANDSHAKE_FAILED_* (value: 0 or an error, not the descriptor), then DISCONNECTED (the
    descriptor again). A handshake outcome is matched to the oldest accepted connection still
    waiting for one: handshakes finish in about the order they start, and a rare swap only swaps
    two addresses in the log, never a count."""

    def __init__(self) -> None:
        self.peers: dict[int, str] = {}  # descriptor -> peer address, from ACCEPTED on
        self.waiting: list[int] = []  # accepted, handshake not finished
        self.linked: set[int] = set()

    def on_event(self, kind: int, value: int, peer_of: Callable[[int], str]) -> tuple[str, str] | None:
        """("up" | "lost" | "refused", peer address), or None for nothing to report."""
        if kind == zmq.EVENT_ACCEPTED:
            self.peers[value] = peer_of(value)
            self.waiting.append(value)
            return None
        if kind == zmq.EVENT_DISCONNECTED:
            peer = self.peers.pop(value, "?")
            if value in self.waiting:
                self.waiting.remove(value)  # closed before its handshake finished
            if value in self.linked:
                self.linked.discard(value)
                return "lost", peer
            return None
        fd = self.waiting.pop(0) if self.waiting else None
        peer = self.peers.get(fd, "?") if fd is not None else "?"
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if fd is not None:
                self.linked.add(fd)
            return "up", peer
        return "refused", peer  # a handshake failed: not CURVE, unknown key, or no detail

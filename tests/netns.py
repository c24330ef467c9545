"""Hosts for multi-host tests: Linux network namespaces on a bridge, and tidings run across them.

    net = Network.create(["hub", "w1", "w2"], tmp_path)   # NetworkUnavailable: skip, with its reason
    try:
        cluster = Cluster(net, keyring.install(tmp_path / "keys"), hubs=2)
        cluster.start_hubs()
        cluster.start_worker("w1")
        ...
    finally:
        net.close()    # every process it started killed by PID, then the namespaces and the bridge

Why namespaces rather than several loopback addresses: each namespace has its own interfaces and
TCP stack, so one host can be cut off (its veth taken down), delayed (netem) or have its processes
killed without touching the others, and hub links behave as between machines: real TCP
retransmissions, no loopback shortcut, a dead link noticed only by heartbeats.

Layout: a bridge in the root namespace holds .1 of a private /24 (10.200-250.x.0/24, picked so it
collides with no address already on the machine); each namespace is joined by a veth pair and
gets .2, .3, ... in the order named. Clients, publishers and the test itself stay in the root
namespace and reach every host through the bridge. A process runs inside a namespace through
`ip netns exec NS ...`, which execs: the Popen pid is the process itself.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson

from hub.shards import shard_of

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
START_TIMEOUT = 20.0  # seconds for a hub or worker to come up on a loaded 2-core box
HUB_BASE_PORT = 6000  # shard s binds HUB_BASE_PORT + 10 s (+0 ingress, +1 egress, +2 requests)
WS_PORT = 8080  # every worker host has its own namespace, so all use the same ports
API_PORT = 8081
# urllib would send requests for 10.x addresses to an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NetworkUnavailable(Exception):
    """This machine cannot build the namespaces (not root, no `ip`, no netns support)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without settings that would leak into a host: no TIDINGS_* of the
    caller's own, no NOTIFY_SOCKET (the processes' sd_notify is then a no-op)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_") and k != "NOTIFY_SOCKET"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# -- processes --------------------------------------------------------------------------------------
@dataclass
class HostProcess:
    """One process the test started (in a namespace or not), its stdout+stderr in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def mark(self) -> int:
        """Where the log ends now: pass as `after` to wait for lines written from here on."""
        return len(self.log())

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 10.0) -> float:
        """Wait until the regex `pattern` matches the log past `after`; returns the monotonic time
        it was seen (polled every 10 ms, so detection times are measured to about that)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if regex.search(self.log(), after):
                return now
            if now > deadline:
                raise AssertionError(f"{self.name}: no /{pattern}/ after {timeout:.1f}s; log tail:\n"
                                     f"{self.log()[-3000:]}")
            if not self.alive() and not regex.search(self.log(), after):
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before /{pattern}/:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.01)

    def seen(self, pattern: str, after: int = 0) -> bool:
        return re.search(pattern, self.log()[after:]) is not None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL by PID (and the session it leads, which is ours), then reap it."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


# -- the network ----------------------------------------------------------------------------------
@dataclass
class Host:
    """A namespace: its name, address and both ends of its veth pair."""

    role: str
    netns: str
    ip: str
    veth_root: str  # the end on the bridge, in the root namespace
    veth_inner: str  # the end inside the namespace


class Network:
    """Namespaces joined by a bridge; every process started through it is killed on close()."""

    def __init__(self, tag: str, prefix: str, log_dir: Path) -> None:
        self.tag = tag
        self.prefix = prefix  # "10.a.b"
        self.bridge = f"tdg-{tag}-br"
        self.hosts: dict[str, Host] = {}
        self.processes: list[HostProcess] = []
        self.log_dir = log_dir
        self.closed = False

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def create(cls, roles: Sequence[str], log_dir: Path) -> Network:
        """Build the bridge and one namespace per role; NetworkUnavailable if this machine
        cannot (not root, no `ip`, namespaces refused), with the reason."""
        if os.geteuid() != 0:
            raise NetworkUnavailable("needs root to create network namespaces and veth pairs")
        if not Path(IP).exists():
            raise NetworkUnavailable("the `ip` command (iproute2) is not installed")
        tag = secrets.token_hex(2)
        net = cls(tag, _free_prefix(), log_dir)
        try:
            net._build(roles)
        except BaseException:
            net.close()
            raise
        return net

    def _build(self, roles: Sequence[str]) -> None:
        first = f"tdg-{roles[0]}-{self.tag}"
        probe = _run(IP, "netns", "add", first, check=False)
        if probe.returncode != 0:
            raise NetworkUnavailable(f"`ip netns add` failed: {probe.stderr.strip()}")
        self.hosts[roles[0]] = Host(roles[0], first, "", "", "")  # so close() removes it whatever happens
        _run(IP, "link", "add", self.bridge, "type", "bridge")
        _run(IP, "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        _run(IP, "link", "set", self.bridge, "up")
        for n, role in enumerate(roles):
            netns = f"tdg-{role}-{self.tag}"
            if n:
                _run(IP, "netns", "add", netns)
            host = Host(role, netns, f"{self.prefix}.{n + 2}", f"tdg{self.tag}{role}r"[:15],
                        f"tdg{self.tag}{role}n"[:15])
            self.hosts[role] = host
            _run(IP, "link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_inner)
            _run(IP, "link", "set", host.veth_inner, "netns", netns)
            _run(IP, "link", "set", host.veth_root, "master", self.bridge)
            _run(IP, "link", "set", host.veth_root, "up")
            self.inside(role, IP, "link", "set", "lo", "up")
            self.inside(role, IP, "addr", "add", f"{host.ip}/24", "dev", host.veth_inner)
            self.inside(role, IP, "link", "set", host.veth_inner, "up")
        self.wait_reachable()

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Until each namespace's address answers from the root namespace (no `ping` here: a TCP
        connect to a closed port answers RST as soon as the path works, which is all we need)."""
        for host in self.hosts.values():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    socket.create_connection((host.ip, 9), timeout=0.5).close()
                    break
                except ConnectionRefusedError:
                    break  # RST: the host answered
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{host.netns} ({host.ip}) unreachable from the root namespace") from None
                    time.sleep(0.05)

    # -- using --------------------------------------------------------------------------------
    def host(self, role: str) -> Host:
        return self.hosts[role]

    def inside(self, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(IP, "netns", "exec", self.hosts[role].netns, *argv, check=check)

    def spawn(self, role: str | None, argv: Sequence[str], env: Mapping[str, str], name: str) -> HostProcess:
        """Start `argv` inside `role`'s namespace (None: the root namespace), output to a log file.
        `ip netns exec` execs the command, so the returned pid is the process itself."""
        assert not self.closed
        log_path = self.log_dir / f"{name}.log"
        prefix = [IP, "netns", "exec", self.hosts[role].netns] if role is not None else []
        with open(log_path, "ab") as out:
            popen = subprocess.Popen([*prefix, *argv], env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        proc = HostProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def link(self, role: str, up: bool) -> None:
        """Take the host's cable out (or back in): its veth end on the bridge goes down/up. The
        namespace keeps its address and sockets, as a host whose switch port died would."""
        _run(IP, "link", "set", self.hosts[role].veth_root, "up" if up else "down")

    def netem_available(self) -> str | None:
        """None if a netem qdisc can be added here, else why not (tc's own words)."""
        if not Path(TC).exists():
            return "the `tc` command is not installed"
        probe = _run(TC, "qdisc", "add", "dev", self.bridge, "root", "netem", "delay", "1ms", check=False)
        if probe.returncode != 0:
            return f"tc netem unavailable: {probe.stderr.strip() or probe.stdout.strip()}"
        _run(TC, "qdisc", "del", "dev", self.bridge, "root", check=False)
        return None

    def delay(self, role: str, ms: int) -> None:
        """netem delay on both directions of the host's link (each veth end's egress)."""
        _run(TC, "qdisc", "add", "dev", self.hosts[role].veth_root, "root", "netem", "delay", f"{ms}ms")
        self.inside(role, TC, "qdisc", "add", "dev", self.hosts[role].veth_inner, "root", "netem", "delay", f"{ms}ms")

    # -- tearing down ---------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process started here by PID, then delete the namespaces and the bridge.
        Safe to call twice and after a half-built network."""
        if self.closed:
            return
        self.closed = True
        for proc in self.processes:
            proc.kill()
        for host in self.hosts.values():
            _run(IP, "netns", "del", host.netns, check=False)
            if host.veth_root:
                _run(IP, "link", "del", host.veth_root, check=False)  # gone with its peer, normally
        _run(IP, "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network that still exist (for the cleanup check)."""
        left = [ns for ns in _run(IP, "netns", "list").stdout.split() if ns.endswith(f"-{self.tag}")]
        links = _run(IP, "-o", "link", "show").stdout
        left += [name for name in [self.bridge, *(h.veth_root for h in self.hosts.values())]
                 if name and re.search(rf"\b{re.escape(name)}[@:]", links)]
        return left


def _free_prefix() -> str:
    """10.a.b with a in 200-250: a /24 no address on this machine already falls in."""
    taken = _run(IP, "-o", "-4", "addr", "show").stdout
    routes = _run(IP, "-4", "route", "show").stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in taken and not routes.startswith(f"{prefix}.") and f"\n{prefix}." not in routes:
            return prefix
    raise NetworkUnavailable("no free 10.200-250.x.0/24 subnet")


# -- keys -----------------------------------------------------------------------------------------
@dataclass
class Keyring:
    """CURVE key directories made once by `python -m tidings keys generate`: the hub host's (with
    the hubs' pair), one per worker host, the publisher's, and a rogue host nobody authorized."""

    base: Path
    names: tuple[str, ...] = ("w1", "w2", "pub", "rogue")

    @classmethod
    def generate(cls, base: Path) -> Keyring:
        ring = cls(base)
        base.mkdir(parents=True, exist_ok=True)
        for name, hub in (("hub", True), *((n, False) for n in ring.names)):
            result = subprocess.run([PYTHON, "-m", "tidings", "keys", "generate", *(["--hub"] if hub else []),
                                     "--dir", str(base / name)], env=clean_environ(), capture_output=True,
                                    text=True, timeout=30, cwd=REPO)
            if result.returncode != 0:
                raise RuntimeError(f"tidings keys generate failed: {result.stderr}")
        return ring

    def install(self, into: Path, authorized: Iterable[str] = ("w1", "w2", "pub")) -> dict[str, Path]:
        """Per-test copies: `into`/hub holds the hubs' pair and authorized/ = exactly the public
        keys of `authorized`; every other directory holds its host pair and a copy of hub.key, as
        an operator would lay them out on each machine."""
        dirs: dict[str, Path] = {}
        hub = into / "hub"
        shutil.copytree(self.base / "hub", hub)
        for stale in (hub / "authorized").glob("*.key"):
            stale.unlink()  # the hub host's own key: no worker or publisher runs there in these tests
        dirs["hub"] = hub
        for name in self.names:
            d = into / name
            shutil.copytree(self.base / name, d)
            shutil.copyfile(hub / "hub.key", d / "hub.key")
            dirs[name] = d
        for name in authorized:
            authorize(dirs["hub"], dirs[name], name)
        return dirs


def authorize(hub_keys: Path, host_keys: Path, name: str) -> None:
    """Copy a host's public key into the hub's authorized/ (the hub reads it on SIGHUP)."""
    shutil.copyfile(host_keys / "host.key", hub_keys / "authorized" / f"{name}.key")


# -- tidings across the hosts -----------------------------------------------------------------------
class Cluster:
    """tidings on the namespaces: hub shards on "hub", one worker per worker host, CURVE links.

    Settings shared by every host (JWT secret, API key, endpoint lists, heartbeat) live here;
    each process gets its own runtime directory, as a separate machine would have."""

    def __init__(self, net: Network, keys: dict[str, Path], hubs: int = 1, heartbeat: float = 0.5,
                 extra: Mapping[str, str] | None = None) -> None:
        self.net = net
        self.keys = keys
        self.hubs = hubs
        self.heartbeat = heartbeat
        self.secret = secrets.token_hex(32)
        self.api_key = secrets.token_hex(16)
        hub_ip = net.host("hub").ip
        self.ingress = [f"tcp://{hub_ip}:{HUB_BASE_PORT + 10 * s}" for s in range(hubs)]
        self.egress = [f"tcp://{hub_ip}:{HUB_BASE_PORT + 10 * s + 1}" for s in range(hubs)]
        self.requests = [f"tcp://{hub_ip}:{HUB_BASE_PORT + 10 * s + 2}" for s in range(hubs)]
        self.extra = dict(extra or {})
        self.hub_procs: dict[int, HostProcess] = {}
        self.workers: dict[str, HostProcess] = {}
        self._runs = 0

    # -- environments ---------------------------------------------------------------------------
    def shared_env(self, keys: Path | None, runtime: str) -> dict[str, str]:
        runtime_dir = self.net.log_dir / "runtime" / runtime
        runtime_dir.mkdir(parents=True, exist_ok=True)
        env = clean_environ({
            "TIDINGS_HUBS": str(self.hubs),
            "TIDINGS_HUB_INGRESS": ",".join(self.ingress),
            "TIDINGS_HUB_EGRESS": ",".join(self.egress),
            "TIDINGS_HUB_REQUESTS": ",".join(self.requests),
            "TIDINGS_HUB_HEARTBEAT": str(self.heartbeat),
            "TIDINGS_JWT_SECRET": self.secret,
            "TIDINGS_API_KEY": self.api_key,
            "TIDINGS_RUNTIME_DIR": str(runtime_dir),
            **self.extra,
        })
        if keys is not None:
            env["TIDINGS_HUB_KEYS"] = str(keys)
        else:
            env["TIDINGS_HUB_INSECURE"] = "1"
        return env

    def hub_env(self, shard: int) -> dict[str, str]:
        return self.shared_env(self.keys["hub"], "hub-host")  # the shards share the host's runtime dir

    def worker_env(self, role: str, keys: Path | None) -> dict[str, str]:
        ip = self.net.host(role).ip
        return {**self.shared_env(keys, f"worker-{role}"), "TIDINGS_HOST": ip, "TIDINGS_PORT": str(WS_PORT),
                "TIDINGS_API_HOST": ip, "TIDINGS_API_PORT": str(API_PORT), "TIDINGS_DRAIN_WINDOW": "1"}

    def publisher_env(self, keys: str | None = "pub") -> dict[str, str]:
        """What a backend host sets to publish (root namespace): its own key pair and hub.key."""
        self._runs += 1
        return self.shared_env(self.keys[keys] if keys else None, f"publisher-{self._runs}")

    # -- processes ------------------------------------------------------------------------------
    def start_hub(self, shard: int, wait: bool = True) -> HostProcess:
        """`tidings hub --shard N` in the hub namespace, waiting until it serves."""
        proc = self.net.spawn("hub", [PYTHON, "-m", "tidings", "hub", "--shard", str(shard)],
                              self.hub_env(shard), f"hub-{shard}-{len(self.net.processes)}")
        self.hub_procs[shard] = proc
        if wait:
            proc.wait_for(r"serving", timeout=START_TIMEOUT)
        return proc

    def start_hubs(self) -> None:
        procs = [self.start_hub(s, wait=False) for s in range(self.hubs)]
        for proc in procs:
            proc.wait_for(r"serving", timeout=START_TIMEOUT)

    def start_worker(self, role: str, keys: str | None = None, wait: bool = True) -> HostProcess:
        """`tidings worker --index 0` in `role`'s namespace with that host's keys (or `keys`, the
        name of another key directory: a host with the wrong key pair), waiting until ready."""
        key_dir = self.keys[keys or role]
        proc = self.net.spawn(role, [PYTHON, "-m", "tidings", "worker", "--index", "0"],
                              self.worker_env(role, key_dir), f"worker-{role}-{len(self.net.processes)}")
        self.workers[role] = proc
        if wait:
            proc.wait_for(r"worker 0 ready", timeout=START_TIMEOUT)
        return proc

    def start_workers(self, roles: Iterable[str] = ("w1", "w2")) -> None:
        procs = [self.start_worker(role, wait=False) for role in roles]
        for proc in procs:
            proc.wait_for(r"worker 0 ready", timeout=START_TIMEOUT)

    def cli(self, *args: str, keys: str | None = "pub", timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`python -m tidings ARGS` in the root namespace, as a backend host with key dir `keys`."""
        return subprocess.run([PYTHON, "-m", "tidings", *args], env=self.publisher_env(keys), capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)

    # -- talking to it ------------------------------------------------------------------------
    def token(self, sub: str, channels: Iterable[str] = (), publish: Iterable[str] = (), ttl: float = 3600) -> str:
        now = int(time.time())
        claims = {"sub": sub, "exp": now + int(ttl), "iat": now, "channels": list(channels),
                  "publish": list(publish)}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def ws_url(self, role: str) -> str:
        return f"ws://{self.net.host(role).ip}:{WS_PORT}/ws"

    def api(self, role: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        """An HTTP call to the worker on `role` (GET without a body): (status, JSON body)."""
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(
            f"http://{self.net.host(role).ip}:{API_PORT}{path}", data=data, method="GET" if data is None else "POST",
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"})
        try:
            with _HTTP.open(request, timeout=timeout) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return exc.code, raw.decode(errors="replace")

    def metrics(self, role: str) -> str:
        with _HTTP.open(f"http://{self.net.host(role).ip}:{API_PORT}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def hub_metrics(self) -> str:
        """The hub host's metrics (no worker runs there to serve them): its shards' multiprocess
        files, summed as a worker's /metrics would (they flush once a second)."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.net.log_dir / "runtime" / "hub-host" / "metrics"))
        return generate_latest(registry).decode()


def channels_on_every_shard(hubs: int, namespace: str = "conversation", stem: str = "mh") -> list[str]:
    """One channel per shard (shard 0 first): the first names `NS:STEM-N` each shard owns."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < hubs:
        name = f"{namespace}:{stem}-{n}"
        found.setdefault(shard_of(name.encode(), hubs), name)
        n += 1
    return [found[s] for s in range(hubs)]


def metric_value(text: str, name: str, *labels: str) -> float:
    """The sum of a metric's samples whose labels include each of `labels` ('event="lost"'), 0
    when there are none."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {" and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def established_peers(pid: int, port: int) -> list[str]:
    """Remote IPv4 addresses of ESTABLISHED TCP connections on local `port`, as seen in the network
    namespace of process `pid` (/proc/PID/net/tcp is that namespace's table: no `ss`, no exec)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return []
    peers = []
    for line in lines:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01" or int(local.split(":")[1], 16) != port:
            continue
        raw = bytes.fromhex(remote.split(":")[0])[::-1]  # little-endian on x86 and arm64
        peers.append(".".join(str(b) for b in raw))
    return peers


def users_on_shard(prefix: str, shard: int, hubs: int, count: int) -> list[str]:
    """`count` user ids whose personal channel `user:ID` the given shard owns, so a test that faults
    one shard knows which personal channels it touches."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        sub = f"{prefix}{n}"
        if shard_of(f"user:{sub}".encode(), hubs) == shard:
            found.append(sub)
        n += 1
    return found

"""The systemd units in systemd/: what they say, what systemd-analyze thinks of them, and whether
their ExecStart= lines start tidings the way systemd would (outside systemd: PID 1 here is not it).

- static checks of every setting production needs: notify/watchdog, restart, limits, sandboxing (no tools needed);
- `systemd-analyze verify` (rc 0 and not one warning) and `systemd-analyze security --offline=true`
  (exposure <= 2.5) on copies rendered with this venv's `tidings`, since verify wants ExecStart= to exist;
- install.sh staged into a DESTDIR, twice (idempotent, keys kept);
- each ExecStart= run with the unit's Environment=, an env file made from tidings.env.example, a
  notify socket and WATCHDOG_USEC the way systemd sets them: READY=1 from the main PID, WATCHDOG=1,
  a client served, ExecReload= keeps it connected, KillSignal= gets close 1001 and exit 0 in time.
"""

from __future__ import annotations

import array
import contextlib
import functools
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
HUB = "tidings-hub.service"
WORKER = "tidings-worker@.service"
TARGET = "tidings.target"
SERVICES = (HUB, WORKER)
UNITS = (*SERVICES, TARGET)
ENV_EXAMPLE = SYSTEMD_DIR / "tidings.env.example"
SYSCTL_CONF = SYSTEMD_DIR / "sysctl.d" / "90-tidings.conf"
INSTALL_SH = SYSTEMD_DIR / "install.sh"
DEFAULT_BIN = "/opt/tidings/venv/bin/tidings"  # what the shipped units run; install.sh rewrites it
MAX_EXPOSURE = 2.5  # `systemd-analyze security --offline=true` rates <= 2.5 "OK": every service must stay there
VENV_TIDINGS = Path(sys.executable).parent / "tidings"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze not installed: `apt-get install systemd` (it works without systemd as PID 1)",
)


def _core_landed() -> bool:
    # An empty workers/ directory is still importable as a namespace package: want the real one.
    spec = importlib.util.find_spec("workers")
    return spec is not None and spec.origin is not None


needs_core = pytest.mark.skipif(
    not _core_landed(), reason="the server core (workers/, hub/) has not landed yet"
)

Unit = dict[str, list[tuple[str, str]]]


# -- reading unit files ------------------------------------------------------------------------
def parse_unit(text: str) -> Unit:
    """Sections to (key, value) lists, in order: systemd allows a key many times."""
    sections: Unit = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"no line continuations, please: {line!r}"
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def load_unit(name: str) -> Unit:
    return parse_unit((SYSTEMD_DIR / name).read_text())


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str | None:
    found = values(unit, section, key)
    return found[-1] if found else None


def seconds(text: str) -> float:
    """systemd time spans as used here: "30", "30s", "1min", "1min 30s"."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def read_env_file(text: str) -> dict[str, str]:
    """EnvironmentFile= as systemd reads the simple form used here: VAR=value, # comments."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, val = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad env line {line!r}"
        env[key] = val
    return env


def expand(text: str, instance: str, runtime_base: Path) -> str:
    """The specifiers the units use: %i (instance), %t (runtime directory root), %%."""
    out = re.sub(r"%([it%])", lambda m: {"i": instance, "t": str(runtime_base), "%": "%"}[m.group(1)], text)
    assert "%" not in out.replace("%%", ""), f"unhandled specifier in {text!r}"
    return out


def example_drain_window() -> float:
    return float(read_env_file(ENV_EXAMPLE.read_text()).get("TIDINGS_DRAIN_WINDOW", "10"))


# -- 1. what the units say ---------------------------------------------------------------------
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_every_setting_issue_6_asks_for(name: str) -> None:
    unit = load_unit(name)
    svc = "Service"
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartSec": "1",
        "KillSignal": "SIGTERM",
        "User": "tidings",
        "Group": "tidings",
        "RuntimeDirectory": "tidings",
        "RuntimeDirectoryPreserve": "yes",
        "LimitNOFILE": "1048576",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "EnvironmentFile": "/etc/tidings/tidings.env",
        **HARDENING,
    }
    for key, want in expected.items():
        assert value(unit, svc, key) == want, f"{name}: {key}={value(unit, svc, key)!r}, want {want!r}"
    assert values(unit, svc, "SystemCallFilter")[0] == "@system-service"
    assert value(unit, svc, "MemoryMax"), f"{name}: MemoryMax= missing"
    assert seconds(value(unit, svc, "WatchdogSec") or "0") > 0
    stop = seconds(value(unit, svc, "TimeoutStopSec") or "0")
    assert stop >= example_drain_window() + 10, f"{name}: TimeoutStopSec={stop} leaves no room to drain"
    assert value(unit, "Unit", "PartOf") == TARGET
    assert value(unit, "Unit", "ReloadPropagatedFrom") == TARGET
    assert value(unit, "Install", "WantedBy") == TARGET
    # The runtime dir the code uses is the one systemd creates and leaves writable.
    env = dict(kv.split("=", 1) for line in values(unit, svc, "Environment") for kv in shlex.split(line))
    assert env["TIDINGS_RUNTIME_DIR"] == "%t/tidings"
    exec_start = shlex.split(value(unit, svc, "ExecStart") or "")
    assert exec_start[0] == DEFAULT_BIN
    assert exec_start[1:] == (["hub"] if name == HUB else ["worker", "--index", "%i"])


def test_worker_wants_the_hub_but_survives_its_restart() -> None:
    worker = load_unit(WORKER)
    assert "tidings-hub.service" in (value(worker, "Unit", "Wants") or "").split()
    assert "tidings-hub.service" in (value(worker, "Unit", "After") or "").split()
    for key in ("Requires", "BindsTo", "Requisite", "PartOf"):
        assert "tidings-hub.service" not in " ".join(values(worker, "Unit", key)), (
            f"{key}= would restart every worker (and drop every client) whenever the hub restarts"
        )


def test_hub_and_workers_share_user_and_runtime_dir() -> None:
    hub, worker = load_unit(HUB), load_unit(WORKER)
    for key in ("User", "Group", "RuntimeDirectory", "RuntimeDirectoryMode", "RuntimeDirectoryPreserve",
                "UMask", "EnvironmentFile", "Environment"):
        assert values(hub, "Service", key) == values(worker, "Service", key), key
    assert "DynamicUser" not in dict(worker["Service"]), "DynamicUser= gives each unit its own UID"


def test_target_pulls_in_the_hub() -> None:
    target = load_unit(TARGET)
    assert "tidings-hub.service" in (value(target, "Unit", "Wants") or "").split()
    assert value(target, "Install", "WantedBy") == "multi-user.target"


def test_env_example_names_only_real_settings() -> None:
    text = ENV_EXAMPLE.read_text()
    env = read_env_file(text)
    for key in ("TIDINGS_JWT_SECRET", "TIDINGS_API_KEY"):
        assert env[key] == "", f"{key} must ship empty: a published default key would be accepted"
    named = set(re.findall(r"^#?(TIDINGS_[A-Z0-9_]+)=", text, re.MULTILINE))
    assert {"TIDINGS_HOST", "TIDINGS_PORT", "TIDINGS_API_PORT", "TIDINGS_DRAIN_WINDOW"} <= named
    if importlib.util.find_spec("tidings.config") is None:
        pytest.skip("tidings.config not importable: variable names not checked against Config")
    from tidings import config

    known = {config.env_name(f.name) for f in config.config_fields()}
    assert named <= known, f"not tidings settings: {sorted(named - known)}"


def test_sysctl_settings_each_have_a_reason_and_exist() -> None:
    lines = SYSCTL_CONF.read_text().splitlines()
    settings = 0
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        assert sep and val.strip(), f"not key = value: {line!r}"
        assert i > 0 and lines[i - 1].startswith("# "), f"{key.strip()}: no reason on the line above"
        proc = Path("/proc/sys") / key.strip().replace(".", "/")
        if Path("/proc/sys/net").is_dir():
            assert proc.exists(), f"{key.strip()}: no such kernel setting"
        settings += 1
    text = SYSCTL_CONF.read_text()
    for key in ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_migrate_req",
                "fs.nr_open"):
        assert re.search(rf"^{re.escape(key)} = ", text, re.MULTILINE), key
    assert settings >= 4


# -- 2. systemd-analyze --------------------------------------------------------------------------
def tidings_bin_for_analyze() -> str:
    """verify insists that ExecStart= exists: this venv's tidings, or (before the core is installed)
    this interpreter as a stand-in, since only the unit is being checked."""
    return str(VENV_TIDINGS if VENV_TIDINGS.exists() else Path(sys.executable))


def render_units(dest: Path, tidings_bin: str) -> dict[str, Path]:
    """Copies of the units with ExecStart= pointing at tidings_bin, plus instance 0 of the worker."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in UNITS:
        path = dest / name
        path.write_text((SYSTEMD_DIR / name).read_text().replace(DEFAULT_BIN, tidings_bin))
        paths[name] = path
    instance = dest / "tidings-worker@0.service"
    shutil.copyfile(paths[WORKER], instance)
    paths[instance.name] = instance
    return paths


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    paths = render_units(tmp_path, tidings_bin_for_analyze())
    result = analyze("verify", "--man=no", *(str(p) for p in paths.values()))
    # verify exits 0 on an unknown value ("..., ignoring"): any output at all counts as a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        f"rc={result.returncode}\n{result.stdout}{result.stderr}"
    )


@needs_analyze
def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """Guards the test above: a typo must produce output, or silence would prove nothing."""
    paths = render_units(tmp_path, tidings_bin_for_analyze())
    hub = paths[HUB]
    hub.write_text(hub.read_text().replace("Type=notify", "Type=notifyy"))
    result = analyze("verify", "--man=no", str(hub))
    assert "notifyy" in result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("name", [HUB, "tidings-worker@0.service"])
def test_systemd_analyze_security_exposure(tmp_path: Path, name: str) -> None:
    paths = render_units(tmp_path, tidings_bin_for_analyze())
    threshold = f"--threshold={round(MAX_EXPOSURE * 10)}"  # in tenths
    result = analyze("security", "--offline=true", threshold, str(paths[name]))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    print(f"{name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE and result.returncode == 0, output


# -- 3. install.sh -------------------------------------------------------------------------------
def test_install_script_is_valid_posix_sh() -> None:
    subprocess.run(["sh", "-n", str(INSTALL_SH)], check=True)


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
    reason="install.sh needs systemd-sysusers and systemctl: `apt-get install systemd`",
)
def test_install_script_stages_everything_and_is_idempotent(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "tidings"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    root = tmp_path / "root"

    def install(*args: str) -> str:
        result = subprocess.run(
            ["sh", str(INSTALL_SH), "--venv", str(venv), *args], env={**os.environ, "DESTDIR": str(root)},
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    install("--workers", "3")
    unitdir = root / "etc/systemd/system"
    for name in UNITS:
        text = (unitdir / name).read_text()
        assert DEFAULT_BIN not in text and (name == TARGET or f"{venv}/bin/tidings" in text)
    env_file = root / "etc/tidings/tidings.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o750
    env = read_env_file(env_file.read_text())
    assert len(env["TIDINGS_JWT_SECRET"]) >= 32 and len(env["TIDINGS_API_KEY"]) >= 16
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^tidings:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.MULTILINE), passwd
    if os.geteuid() == 0:
        uid, gid = env_file.stat().st_uid, env_file.stat().st_gid
        assert uid == 0 and f"tidings:x:{gid}:" in (root / "etc/group").read_text()
    wants = unitdir / "tidings.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == [
        "tidings-hub.service", "tidings-worker@0.service", "tidings-worker@1.service",
        "tidings-worker@2.service",
    ]
    assert (unitdir / "multi-user.target.wants" / TARGET).is_symlink()
    assert (root / "etc/sysctl.d/90-tidings.conf").read_text().count("net.ipv4.tcp_migrate_req = 1") == 1

    out = install("--workers", "2")  # again, with fewer workers
    assert "kept existing" in out
    assert read_env_file(env_file.read_text()) == env, "a second run must keep the keys"
    assert sorted(p.name for p in wants.iterdir()) == [
        "tidings-hub.service", "tidings-worker@0.service", "tidings-worker@1.service",
    ]
    assert passwd == (root / "etc/passwd").read_text()


# -- 4. the ExecStart= lines, run the way systemd would -------------------------------------------
class NotifySocket:
    """A stand-in for systemd's notify socket: datagrams with the sender's credentials, read all the
    time by a thread as systemd does (a full queue would block the senders' sendto())."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        path.chmod(0o666)  # like /run/systemd/notify: any service user may write
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, str]] = []  # (sender pid, one line)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.closing.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:12])[0]
            with self.lock:
                self.messages.extend((pid, line) for line in data.decode(errors="replace").splitlines())

    def sent_by(self, pid: int) -> list[str]:
        with self.lock:
            return [m for p, m in self.messages if p == pid]

    def seen(self, pid: int, line: str) -> int:
        return self.sent_by(pid).count(line)

    def wait_for(self, pid: int, line: str, timeout: float, count: int = 1, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.seen(pid, line) < count:
            if proc is not None and proc.popen.poll() is not None:
                rc = proc.popen.returncode
                raise AssertionError(f"{proc.name} exited ({rc}) before {line}:\n{proc.log()}")
            if time.monotonic() > deadline:
                with self.lock:
                    others = sorted({p for p, _ in self.messages if p != pid})
                raise AssertionError(
                    f"no {line} x{count} from pid {pid} within {timeout}s; it sent {self.sent_by(pid)}; "
                    f"other senders: {others}" + (f"\n{proc.log()}" if proc else "")
                )
            time.sleep(0.05)

    def wait_for_new_sender(self, line: str, timeout: float, proc: Proc) -> int:
        """The PID of the first process to send `line` that had not sent it before."""
        with self.lock:
            before = {p for p, m in self.messages if m == line}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                new = [p for p, m in self.messages if m == line and p not in before]
            if new:
                return new[0]
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {line} from {proc.name} within {timeout}s:\n{proc.log()}")

    def close(self) -> None:
        self.closing.set()
        self.reader.join(2)
        self.sock.close()


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name, self.popen, self.log_path = name, popen, log_path
        self.main_pid: int | None = None  # set when a tracer sits between us and the service

    @property
    def pid(self) -> int:
        """The service's main PID, as systemd would know it ($MAINPID)."""
        return self.main_pid or self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_account(tidings_bin: Path) -> tuple[int, int] | None:
    """Run as an unprivileged user, as User=tidings does, when we are root and that user can read the
    venv; None means: run as ourselves."""
    if os.geteuid() != 0:
        return None
    uid = gid = 65534  # nobody / nogroup
    try:  # e.g. a venv made from a pyenv Python under /root: unreachable for other users
        probe = subprocess.run(
            [str(tidings_bin.parent / "python"), "-c", "import tidings.cli, hub, workers"],
            user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, timeout=60,
        )
    except OSError:
        return None
    return (uid, gid) if probe.returncode == 0 else None


def websocket_close_code(ws: Any, timeout: float) -> int:
    """Read until the close frame; its first two bytes are the code."""
    import websocket  # websocket-client, in the test extras

    assert isinstance(ws, websocket.WebSocket)
    ws.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", data[:2])[0]) if len(data) >= 2 else 1005
    raise AssertionError("no close frame")


class UnitRunner:
    """Does what systemd does for these units, minus the sandbox: RuntimeDirectory= owned by User=,
    Environment= then EnvironmentFile= (an env file made from tidings.env.example with test ports and
    keys), NOTIFY_SOCKET and WATCHDOG_USEC, cwd /, UMask=, the service user when possible."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        assert VENV_TIDINGS.exists(), f"{VENV_TIDINGS} missing: `pip install -e .` (make install) first"
        self.root = root
        self.units = {name: load_unit(name) for name in SERVICES}
        self.account = service_account(VENV_TIDINGS)
        self.runtime_base = root / "run"  # plays /run (%t)
        self.runtime_dir = self.runtime_base / "tidings"
        self.runtime_dir.mkdir(parents=True)
        self.runtime_dir.chmod(0o750)
        if self.account:
            os.chown(self.runtime_dir, *self.account)
        self.port, self.api_port = free_port(), free_port()
        self.secret, self.api_key = secrets.token_hex(32), secrets.token_hex(24)
        env_text = ENV_EXAMPLE.read_text()
        for key, val in {
            "TIDINGS_HOST": "127.0.0.1", "TIDINGS_PORT": str(self.port), "TIDINGS_API_HOST": "127.0.0.1",
            "TIDINGS_API_PORT": str(self.api_port), "TIDINGS_JWT_SECRET": self.secret,
            "TIDINGS_API_KEY": self.api_key, "TIDINGS_DRAIN_WINDOW": "1", **(settings or {}),
        }.items():  # the example's lines, filled in (or uncommented) as an operator would
            env_text, n = re.subn(rf"^#?{key}=.*$", f"{key}={val}", env_text, count=1, flags=re.MULTILINE)
            assert n == 1, f"{key} is not in tidings.env.example"
        self.env_file = root / "tidings.env"
        self.env_file.write_text(env_text)
        self.env_file.chmod(0o640)
        if self.account:  # root:tidings in production, so the service user can re-read it on reload
            os.chown(self.env_file, 0, self.account[1])
        self.notify = NotifySocket(root / "notify")
        self.watchdog_usec = 1_000_000
        self.procs: list[Proc] = []

    def start(self, name: str, instance: str = "", tracer: list[str] | None = None) -> Proc:
        unit = self.units[name]
        env = {  # systemd's environment for a system service with User=
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
            "LANG": "C.UTF-8",
            "HOME": "/nonexistent", "USER": "tidings", "LOGNAME": "tidings", "SHELL": "/usr/sbin/nologin",
            "INVOCATION_ID": secrets.token_hex(16),
            "RUNTIME_DIRECTORY": str(self.runtime_dir),
            "NOTIFY_SOCKET": str(self.notify.path),
            "WATCHDOG_USEC": str(self.watchdog_usec),
        }
        for line in values(unit, "Service", "Environment"):
            for assignment in shlex.split(expand(line, instance, self.runtime_base)):
                key, _, val = assignment.partition("=")
                env[key] = val
        env.update(read_env_file(self.env_file.read_text()))  # EnvironmentFile= wins over Environment=
        if env.get("TIDINGS_ENV_FILE") == "/etc/tidings/tidings.env":
            env["TIDINGS_ENV_FILE"] = str(self.env_file)  # the same file, at its test path
        argv = shlex.split(expand(value(unit, "Service", "ExecStart") or "", instance, self.runtime_base))
        assert argv[0] == DEFAULT_BIN
        argv[0] = str(VENV_TIDINGS)
        if tracer is None:
            # systemd also sets WATCHDOG_PID to the main PID: the shell's PID survives `exec`.
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv]
        else:
            argv = [*tracer, *argv]
        label = name.replace("@", f"@{instance}")
        log_path = self.root / f"{label}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                umask=int(value(unit, "Service", "UMask") or "0022", 8), start_new_session=True,
                **({"user": self.account[0], "group": self.account[1], "extra_groups": []}
                   if self.account else {}),
            )
        proc = Proc(label, popen, log_path)
        if tracer is not None:  # the service is the tracer's child: its READY=1 names it
            proc.main_pid = self.notify.wait_for_new_sender("READY=1", 30, proc)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, name: str) -> int:
        unit = self.units[name]
        os.kill(proc.pid, getattr(signal, value(unit, "Service", "KillSignal") or "SIGTERM"))
        try:
            return proc.popen.wait(seconds(value(unit, "Service", "TimeoutStopSec") or "90"))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.name} still running after TimeoutStopSec:\n{proc.log()}") from None

    def reload(self, proc: Proc, name: str) -> None:
        argv = shlex.split(value(self.units[name], "Service", "ExecReload") or "")
        subprocess.run([str(proc.pid) if a == "$MAINPID" else a for a in argv], check=True, timeout=10)

    def healthz(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
            return int(r.status)

    def token(self, **claims: object) -> str:
        import jwt

        return jwt.encode({"sub": "u1", "exp": int(time.time()) + 600, **claims}, self.secret, algorithm="HS256")

    def connect(self, token: str) -> Any:
        import websocket

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?token={token}", timeout=10)

    def close(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(5)
        self.notify.close()


@pytest.fixture
def service_root() -> Iterator[Path]:
    # Not tmp_path: its parents are 0700, and the service user must reach its runtime dir.
    base = Path(tempfile.mkdtemp(prefix="tidings-units-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def unit_runner(root: Path, settings: dict[str, str] | None = None) -> Iterator[UnitRunner]:
    run = UnitRunner(root, settings)
    try:
        yield run
    finally:
        run.close()


@pytest.fixture
def runner(service_root: Path) -> Iterator[UnitRunner]:
    with unit_runner(service_root) as run:
        yield run


@needs_core
def test_exec_start_lines_run_outside_systemd(runner: UnitRunner) -> None:
    notify = runner.notify
    hub = runner.start(HUB)
    notify.wait_for(hub.pid, "READY=1", 30, proc=hub)
    workers = [runner.start(WORKER, str(i)) for i in range(2)]
    for w in workers:
        notify.wait_for(w.pid, "READY=1", 30, proc=w)
    assert runner.healthz() == 200
    ws = runner.connect(runner.token(channels=["conversation:*"]))
    try:
        assert '"connected"' in ws.recv()
        with urllib.request.urlopen(f"http://127.0.0.1:{runner.api_port}/metrics", timeout=5) as r:
            assert r.status == 200

        # WatchdogSec=: WATCHDOG=1 at least every WATCHDOG_USEC/2 from the main PID (NotifyAccess=main).
        for p in (hub, *workers):
            notify.wait_for(p.pid, "WATCHDOG=1", 3 * runner.watchdog_usec / 1e6, count=2, proc=p)

        # ExecReload= (key rotation) leaves every process up and the client connected.
        for p, name in ((hub, HUB), *((w, WORKER) for w in workers)):
            runner.reload(p, name)
        time.sleep(1.0)
        for p in (hub, *workers):
            assert p.popen.poll() is None, f"{p.name} died on ExecReload=:\n{p.log()}"
        ws.send('{"type":"ping","id":"r","data":{}}')
        assert '"pong"' in ws.recv()

        # KillSignal=: STOPPING=1, clients closed with 1001, exit 0 within TimeoutStopSec=
        # (workers first: they are ordered After= the hub, so systemd stops them first).
        for w in workers:
            assert runner.stop(w, WORKER) == 0, w.log()
        assert websocket_close_code(ws, 10) == 1001
        assert runner.stop(hub, HUB) == 0, hub.log()
        time.sleep(0.2)
        for p in (hub, *workers):
            assert notify.seen(p.pid, "STOPPING=1") == 1, f"{p.name}: {notify.sent_by(p.pid)}"
    finally:
        with contextlib.suppress(Exception):
            ws.close()


@needs_core
def test_reload_rotates_a_public_key_without_dropping_clients(service_root: Path) -> None:
    """`systemctl reload` with an ES256 key file replaced in place: the new key works at once, the
    old one for TIDINGS_JWT_ROTATION_OVERLAP, and connected clients stay."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def keypair() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return key, pem

    (old_key, old_pem), (new_key, new_pem) = keypair(), keypair()
    public = service_root / "jwt.pub"  # plays /etc/tidings/jwt.pub (0640 root:tidings)
    public.write_bytes(old_pem)
    public.chmod(0o644)

    def token(key: ec.EllipticCurvePrivateKey) -> str:
        return jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, key, algorithm="ES256")

    settings = {"TIDINGS_JWT_SECRET": "", "TIDINGS_JWT_ALGORITHM": "ES256", "TIDINGS_JWT_PUBLIC_KEY": str(public)}
    with unit_runner(service_root, settings) as runner:
        hub = runner.start(HUB)
        runner.notify.wait_for(hub.pid, "READY=1", 30, proc=hub)
        worker = runner.start(WORKER, "0")
        runner.notify.wait_for(worker.pid, "READY=1", 30, proc=worker)

        def first_reply(tok: str) -> str:
            ws = runner.connect(tok)
            try:
                return str(ws.recv())
            finally:
                ws.close()

        client = runner.connect(token(old_key))
        try:
            assert '"connected"' in client.recv()
            assert "unauthorized" in first_reply(token(new_key))
            public.write_bytes(new_pem)
            runner.reload(worker, WORKER)
            runner.notify.wait_for(worker.pid, "READY=1", 10, count=2, proc=worker)  # reload done
            assert '"connected"' in first_reply(token(new_key))
            assert '"connected"' in first_reply(token(old_key)), "the old key must last the overlap"
            client.send('{"type":"ping","id":"p","data":{}}')
            assert '"pong"' in client.recv()
        finally:
            client.close()


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """A systemd syscall group, nested groups expanded (systemd-analyze syscall-filter)."""
    out = analyze("syscall-filter", name).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= syscall_group(item) if item.startswith("@") else {item}
    assert names, f"empty syscall group {name}"
    return frozenset(names)


def allowed_syscalls(unit: Unit) -> frozenset[str]:
    """SystemCallFilter= lines in order: the first sets the list, then each adds or (~) removes."""
    allowed: set[str] = set()
    for line in values(unit, "Service", "SystemCallFilter"):
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    assert values(unit, "Service", "SystemCallFilter")[0][0] != "~", "expected an allow list first"
    return frozenset(allowed)


def traced_syscalls(summary: Path) -> set[str]:
    """Syscall names from an `strace -c` summary table."""
    names = set()
    for line in summary.read_text().splitlines():
        cols = line.split()
        if len(cols) >= 5 and re.fullmatch(r"[\d.]+", cols[0]) and cols[-1] != "total":
            names.add(cols[-1])
    return names


@needs_core
@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed: `apt-get install strace`")
def test_every_syscall_made_is_allowed_by_the_units_filter(runner: UnitRunner) -> None:
    """SystemCallFilter= cannot be applied without systemd, so trace what the processes really call
    (start, a client, publishes both ways, /metrics, a refused token, reload, drain) and compare."""
    traces = runner.root / "traces"  # strace runs as the service user: it must write here
    traces.mkdir()
    if runner.account:
        os.chown(traces, *runner.account)
    summaries = {HUB: traces / "hub.strace", WORKER: traces / "worker.strace"}

    def tracer(name: str) -> list[str]:
        return ["strace", "-f", "-qq", "-c", "-o", str(summaries[name])]

    hub = runner.start(HUB, tracer=tracer(HUB))
    worker = runner.start(WORKER, "0", tracer=tracer(WORKER))
    ws = runner.connect(runner.token(channels=["conversation:*"], publish=["conversation:*"]))
    bad = runner.connect("not-a-token")
    try:
        assert '"connected"' in ws.recv()
        assert "unauthorized" in bad.recv()
        ws.send('{"type":"subscribe","id":"1","data":{"channel":"conversation:c1"}}')
        assert '"subscribed"' in ws.recv()
        body = b'{"channel":"conversation:c1","type":"chat_message","data":{"n":1}}'
        request = urllib.request.Request(
            f"http://127.0.0.1:{runner.api_port}/api/publish", data=body, method="POST",
            headers={"Authorization": f"Bearer {runner.api_key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
        assert '"chat_message"' in ws.recv()
        ws.send('{"type":"publish","id":"2","data":{"channel":"conversation:c1",'
                '"type":"chat_message","data":{}}}')
        replies = ws.recv() + ws.recv()
        assert '"published"' in replies and '"chat_message"' in replies
        with urllib.request.urlopen(f"http://127.0.0.1:{runner.api_port}/metrics", timeout=5) as r:
            assert r.status == 200
        for p, name in ((hub, HUB), (worker, WORKER)):
            runner.reload(p, name)
        time.sleep(1.5)  # a watchdog tick or two
        assert runner.stop(worker, WORKER) == 0, worker.log()
        assert runner.stop(hub, HUB) == 0, hub.log()
    finally:
        for sock in (ws, bad):
            with contextlib.suppress(Exception):
                sock.close()
    for name, summary in summaries.items():
        used = traced_syscalls(summary)
        assert len(used) > 20, summary.read_text()
        denied = used - allowed_syscalls(runner.units[name])
        assert not denied, f"{name} calls {sorted(denied)}, which its SystemCallFilter= refuses"

"""The systemd units in systemd/: what they say, what systemd-analyze thinks of them, and whether
their ExecStart= lines start tidings the way systemd would (outside systemd: PID 1 here is not it).

- static checks of every setting production needs: notify/watchdog, restart, limits, sandboxing (no tools needed);
- `systemd-analyze verify` (rc 0 and not one warning) and `systemd-analyze security --offline=true`
  (exposure <= 2.5) on copies rendered with this venv's `tidings`, since verify wants ExecStart= to exist;
- install.sh staged into a DESTDIR: idempotent, keys kept, the roles (all, hubs, workers) and shard
  counts mapped to enabled instances, an install with the old single tidings-hub.service migrated;
- each ExecStart= run with the unit's Environment=, an env file made from tidings.env.example, a
  notify socket and WATCHDOG_USEC the way systemd sets them: READY=1 from the main PID, WATCHDOG=1,
  a client served, ExecReload= keeps it connected, KillSignal= gets close 1001 and exit 0 in time;
  two hub shards side by side in one runtime and state directory, with CURVE keys re-read on reload.
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
HUB = "tidings-hub@.service"  # one instance per hub shard: tidings-hub@0, @1, ...
WORKER = "tidings-worker@.service"
TARGET = "tidings.target"
HUBS_TARGET = "tidings-hubs.target"  # the shards enabled on this host; the workers order after it
OLD_HUB = "tidings-hub.service"  # the single hub of earlier versions: install.sh migrates it away
SERVICES = (HUB, WORKER)
TARGETS = (TARGET, HUBS_TARGET)
UNITS = (*SERVICES, *TARGETS)
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
    assert TARGET in values(unit, "Unit", "ReloadPropagatedFrom")
    # Enabling a shard adds it to tidings-hubs.target (which tidings.target wants), a worker to tidings.target.
    assert value(unit, "Install", "WantedBy") == (HUBS_TARGET if name == HUB else TARGET)
    # The runtime dir the code uses is the one systemd creates and leaves writable.
    env = dict(kv.split("=", 1) for line in values(unit, svc, "Environment") for kv in shlex.split(line))
    assert env["TIDINGS_RUNTIME_DIR"] == "%t/tidings"
    exec_start = shlex.split(value(unit, svc, "ExecStart") or "")
    assert exec_start[0] == DEFAULT_BIN
    assert exec_start[1:] == (["hub", "--shard", "%i"] if name == HUB else ["worker", "--index", "%i"])


def unit_names(unit: Unit, key: str) -> list[str]:
    """The units a dependency setting names, over every line of it."""
    return " ".join(values(unit, "Unit", key)).split()


def test_worker_wants_the_hubs_but_survives_their_restart() -> None:
    worker, hub, hubs = load_unit(WORKER), load_unit(HUB), load_unit(HUBS_TARGET)
    # Started with this host's shards and after them, through the target their instances join.
    assert HUBS_TARGET in unit_names(worker, "Wants") and HUBS_TARGET in unit_names(worker, "After")
    assert HUBS_TARGET in unit_names(hub, "Before"), "the target must wait for every shard's READY=1"
    assert value(hub, "Install", "WantedBy") == HUBS_TARGET
    for key in ("Requires", "BindsTo", "Requisite", "PartOf", "StopPropagatedFrom"):
        named = [u for u in unit_names(worker, key) if u.startswith("tidings-hub")]
        assert not named, f"{key}={named} would restart every worker (and drop every client) whenever a hub restarts"
    assert not values(hub, "Unit", "PropagatesStopTo"), "a shard's stop or restart must not reach the workers"
    # The target only groups: it never stops with a shard, and a shard never drags it along.
    assert {k for k, _ in hubs["Unit"]} <= {"Description", "Documentation", "PartOf"}
    assert value(hubs, "Unit", "PartOf") == TARGET, "stop/restart of tidings.target must order through it"
    assert "Install" not in hubs, "pulled in by tidings.target and the workers, never enabled itself"
    # `systemctl reload tidings-hubs.target` re-reads the authorized CURVE keys of this host's shards.
    assert HUBS_TARGET in values(hub, "Unit", "ReloadPropagatedFrom")


def test_hub_and_workers_share_user_and_runtime_dir() -> None:
    hub, worker = load_unit(HUB), load_unit(WORKER)
    for key in ("User", "Group", "RuntimeDirectory", "RuntimeDirectoryMode", "RuntimeDirectoryPreserve",
                "UMask", "EnvironmentFile", "Environment"):
        assert values(hub, "Service", key) == values(worker, "Service", key), key
    assert "DynamicUser" not in dict(worker["Service"]), "DynamicUser= gives each unit its own UID"


def test_target_pulls_in_the_hubs_and_workers() -> None:
    target = load_unit(TARGET)
    assert HUBS_TARGET in unit_names(target, "Wants")
    assert value(target, "Install", "WantedBy") == "multi-user.target"
    # No unit names the single hub of earlier versions any more.
    for name in UNITS:
        assert OLD_HUB not in (SYSTEMD_DIR / name).read_text(), name
    assert not (SYSTEMD_DIR / OLD_HUB).exists()


def test_env_example_names_only_real_settings() -> None:
    text = ENV_EXAMPLE.read_text()
    env = read_env_file(text)
    for key in ("TIDINGS_JWT_SECRET", "TIDINGS_API_KEY"):
        assert env[key] == "", f"{key} must ship empty: a published default key would be accepted"
    named = set(re.findall(r"^#?(TIDINGS_[A-Z0-9_]+)=", text, re.MULTILINE))
    assert {"TIDINGS_HOST", "TIDINGS_PORT", "TIDINGS_API_PORT", "TIDINGS_DRAIN_WINDOW"} <= named
    assert {"TIDINGS_ROLE", "TIDINGS_HUBS", "TIDINGS_HUB_INGRESS", "TIDINGS_HUB_EGRESS", "TIDINGS_HUB_REQUESTS",
            "TIDINGS_HUB_KEYS", "TIDINGS_HUB_INSECURE", "TIDINGS_HUB_HEARTBEAT"} <= named
    # install.sh writes --role and --hubs into these lines of a new env file: one of each, set.
    for key, default in (("TIDINGS_ROLE", "all"), ("TIDINGS_HUBS", "1")):
        assert len(re.findall(rf"^#?{key}=", text, re.MULTILINE)) == 1, key
        assert env[key] == default, key
    # The multi-host example: one endpoint per shard in every list.
    lists = [v.split(",") for v in re.findall(r"^#TIDINGS_HUB_(?:INGRESS|EGRESS|REQUESTS)=(.*)$", text, re.MULTILINE)]
    assert len(lists) == 3 and all(len(x) == len(lists[0]) >= 2 for x in lists), lists
    assert all(e.startswith("tcp://") for x in lists for e in x)
    if importlib.util.find_spec("tidings.config") is None:
        pytest.skip("tidings.config not importable: variable names not checked against Config")
    from tidings import config

    known = {config.env_name(f.name) for f in config.config_fields()}
    assert named <= known, f"not tidings settings: {sorted(named - known)}"
    match = re.search(r"^MAX_HUBS=(\d+)", INSTALL_SH.read_text(), re.MULTILINE)
    assert match and int(match.group(1)) == config.MAX_HUBS, "install.sh's MAX_HUBS is tidings.config's"


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


INSTANCES = {"tidings-hub@0.service": HUB, "tidings-hub@1.service": HUB, "tidings-worker@0.service": WORKER}


def render_units(dest: Path, tidings_bin: str, names: tuple[str, ...] = UNITS) -> dict[str, Path]:
    """Copies of the units with ExecStart= pointing at tidings_bin, plus the instances of the
    templates among them (two hub shards, worker 0)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = dest / name
        path.write_text((SYSTEMD_DIR / name).read_text().replace(DEFAULT_BIN, tidings_bin))
        paths[name] = path
    for instance, template in INSTANCES.items():
        if template in names:
            shutil.copyfile(paths[template], dest / instance)
            paths[instance] = dest / instance
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
    hub = paths["tidings-hub@0.service"]
    hub.write_text(hub.read_text().replace("Type=notify", "Type=notifyy"))
    result = analyze("verify", "--man=no", str(hub))
    assert "notifyy" in result.stdout + result.stderr


@needs_analyze
def test_a_worker_verifies_on_a_host_without_hub_units(tmp_path: Path) -> None:
    """A workers-only host (its hubs elsewhere), even one where the hub unit files were never
    installed: the worker's Wants=/After= on tidings-hubs.target must not need it. verify does
    check for missing units, which the Requires= variant proves."""
    alone = render_units(tmp_path / "workers-only", tidings_bin_for_analyze(), (WORKER, TARGET))
    assert not (tmp_path / "workers-only" / HUBS_TARGET).exists()
    files = [str(alone["tidings-worker@0.service"]), str(alone[TARGET])]
    result = analyze("verify", "--man=no", *files)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        f"rc={result.returncode}\n{result.stdout}{result.stderr}"
    )
    worker = alone["tidings-worker@0.service"]
    text, n = re.subn(r"^Wants=.*$", f"Requires={HUBS_TARGET}", worker.read_text(), flags=re.MULTILINE)
    assert n == 1
    worker.write_text(text)
    result = analyze("verify", "--man=no", *files)
    assert HUBS_TARGET in result.stdout + result.stderr and "not found" in result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("name", ["tidings-hub@0.service", "tidings-worker@0.service"])
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


def test_install_script_help_names_every_option() -> None:
    out = subprocess.run(["sh", str(INSTALL_SH), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--venv", "--role", "--hubs", "--workers", "--no-sysctl", "--no-enable", "TIDINGS_ROLE"):
        assert option in out, option
    assert "set -eu" not in out


needs_install_tools = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
    reason="install.sh needs systemd-sysusers and systemctl: `apt-get install systemd`",
)


class Staged:
    """install.sh run into a DESTDIR, with a stand-in venv whose bin/tidings does nothing (or runs
    this venv's tidings, for the configuration check)."""

    def __init__(self, base: Path, real_tidings: bool = False) -> None:
        self.venv = base / "venv"
        (self.venv / "bin").mkdir(parents=True)
        fake = self.venv / "bin" / "tidings"
        fake.write_text(f'#!/bin/sh\nexec {shlex.quote(str(VENV_TIDINGS))} "$@"\n' if real_tidings
                        else "#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
        self.root = base / "root"
        self.unitdir = self.root / "etc/systemd/system"
        self.env_file = self.root / "etc/tidings/tidings.env"

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        return subprocess.run(
            ["sh", str(INSTALL_SH), "--venv", str(self.venv), *args],
            env={**environ, "DESTDIR": str(self.root), **(env or {})}, capture_output=True, text=True, timeout=60,
        )

    def install(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = self.run(*args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    def refused(self, *args: str, env: dict[str, str] | None = None) -> str:
        before = self.state()
        result = self.run(*args, env=env)
        assert result.returncode != 0, result.stdout + result.stderr
        assert self.state() == before, "a refused run must change nothing"
        return result.stderr

    def wants(self, target: str) -> list[str]:
        d = self.unitdir / f"{target}.wants"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def enabled(self) -> tuple[list[str], list[str]]:
        """(hub shards, workers) enabled here."""
        return self.wants(HUBS_TARGET), self.wants(TARGET)

    def settings(self) -> dict[str, str]:
        return read_env_file(self.env_file.read_text())

    def edit(self, **changes: str) -> None:
        text = self.env_file.read_text()
        for key, val in changes.items():
            text, n = re.subn(rf"^#?{key}=.*$", f"{key}={val}", text, count=1, flags=re.MULTILINE)
            assert n == 1, key
        self.env_file.write_text(text)

    def state(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): os.readlink(p) if p.is_symlink() else p.read_text()
                for p in sorted(self.root.rglob("*")) if p.is_symlink() or p.is_file()}


def hubs(n: int) -> list[str]:
    return [f"tidings-hub@{i}.service" for i in range(n)]


def workers(n: int) -> list[str]:
    return sorted(f"tidings-worker@{i}.service" for i in range(n))


@needs_install_tools
def test_install_script_stages_everything_and_is_idempotent(tmp_path: Path) -> None:
    staged = Staged(tmp_path)
    root, unitdir, env_file, venv = staged.root, staged.unitdir, staged.env_file, staged.venv
    staged.install("--workers", "3")
    for name in UNITS:
        text = (unitdir / name).read_text()
        assert DEFAULT_BIN not in text and (name in TARGETS or f"{venv}/bin/tidings" in text)
    assert not (unitdir / OLD_HUB).exists()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o750
    env = read_env_file(env_file.read_text())
    assert len(env["TIDINGS_JWT_SECRET"]) >= 32 and len(env["TIDINGS_API_KEY"]) >= 16
    assert (env["TIDINGS_ROLE"], env["TIDINGS_HUBS"]) == ("all", "1")
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^tidings:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.MULTILINE), passwd
    if os.geteuid() == 0:
        uid, gid = env_file.stat().st_uid, env_file.stat().st_gid
        assert uid == 0 and f"tidings:x:{gid}:" in (root / "etc/group").read_text()
    # One shard, in tidings-hubs.target (which tidings.target wants); the workers in tidings.target.
    assert staged.enabled() == (hubs(1), workers(3))
    assert (unitdir / "multi-user.target.wants" / TARGET).is_symlink()
    assert os.readlink(unitdir / f"{HUBS_TARGET}.wants/tidings-hub@0.service") == f"/etc/systemd/system/{HUB}"
    assert (root / "etc/sysctl.d/90-tidings.conf").read_text().count("net.ipv4.tcp_migrate_req = 1") == 1

    out = staged.install("--workers", "2")  # again, with fewer workers
    assert "kept existing" in out
    assert read_env_file(env_file.read_text()) == env, "a second run must keep the keys"
    assert staged.enabled() == (hubs(1), workers(2))
    assert passwd == (root / "etc/passwd").read_text()


@needs_install_tools
def test_install_script_maps_roles_and_shards_to_instances(tmp_path: Path) -> None:
    for bad in (["--role", "both"], ["--hubs", "0"], ["--hubs", "65"], ["--hubs", "two"]):
        assert "error" in Staged(tmp_path / "bad" / bad[1]).refused(*bad)

    # A hub host: shards only. The options go into the new env file...
    staged = Staged(tmp_path / "hubs")
    out = staged.install("--role", "hubs", "--hubs", "2", "--workers", "3")
    assert "--workers 3 ignored" in out
    assert staged.enabled() == (hubs(2), [])
    assert (staged.settings()["TIDINGS_ROLE"], staged.settings()["TIDINGS_HUBS"]) == ("hubs", "2")
    assert "role hubs, but the hub endpoints are ipc://" in out, "a hubs-only host on ipc:// reaches no other host"
    assert (staged.unitdir / "multi-user.target.wants" / TARGET).is_symlink()
    # ...which the next run reads: no options needed, and different ones are refused, not applied.
    staged.install()
    assert staged.enabled() == (hubs(2), [])
    assert "TIDINGS_HUBS=2" in staged.refused("--hubs", "3")
    assert "TIDINGS_ROLE=hubs" in staged.refused(env={"TIDINGS_ROLE": "workers"})
    # The operator edits the file (every host at once, for the shard count); the units follow.
    staged.edit(TIDINGS_HUBS="3")
    staged.install("--hubs", "3")
    assert staged.enabled() == (hubs(3), [])
    staged.edit(TIDINGS_ROLE="workers")
    staged.install("--workers", "2")
    assert staged.enabled() == ([], workers(2)), "a workers-only host runs no shard"
    staged.edit(TIDINGS_ROLE="all", TIDINGS_HUBS="1")
    staged.install("--workers", "2")
    assert staged.enabled() == (hubs(1), workers(2))

    # A worker host, set up from the environment (the options' twins).
    staged = Staged(tmp_path / "workers")
    staged.install("--workers", "2", env={"TIDINGS_ROLE": "workers", "TIDINGS_HUBS": "3"})
    assert staged.enabled() == ([], workers(2))
    assert (staged.settings()["TIDINGS_ROLE"], staged.settings()["TIDINGS_HUBS"]) == ("workers", "3")
    # Every unit file is there whatever the role: a worker Wants= tidings-hubs.target.
    assert all((staged.unitdir / name).is_file() for name in UNITS)

    staged = Staged(tmp_path / "none")
    staged.install("--hubs", "2", "--no-enable")
    assert staged.enabled() == ([], []) and staged.settings()["TIDINGS_HUBS"] == "2"


OLD_HUB_UNIT = """[Unit]
Description=tidings hub (event broker)
PartOf=tidings.target

[Service]
ExecStart=/opt/tidings/venv/bin/tidings hub

[Install]
WantedBy=tidings.target
"""


@needs_install_tools
def test_install_script_migrates_the_single_hub_unit(tmp_path: Path) -> None:
    """An install from before the shards: tidings-hub.service enabled in tidings.target, with a
    drop-in from `systemctl edit tidings-hub`."""
    staged = Staged(tmp_path / "a")
    staged.install("--workers", "1")
    unitdir = staged.unitdir
    (unitdir / OLD_HUB).write_text(OLD_HUB_UNIT)
    for command in (["disable", "tidings-hub@0.service"], ["enable", OLD_HUB]):
        subprocess.run(["systemctl", f"--root={staged.root}", *command, "--quiet"], check=True, timeout=30)
    assert staged.enabled() == ([], sorted([OLD_HUB, *workers(1)]))
    (unitdir / f"{OLD_HUB}.d").mkdir()
    (unitdir / f"{OLD_HUB}.d" / "override.conf").write_text("[Service]\nMemoryMax=4G\n")

    out = staged.install("--workers", "1")
    assert f"removed {OLD_HUB}" in out
    assert not (unitdir / OLD_HUB).exists() and not (unitdir / f"{OLD_HUB}.d").exists()
    assert not [p for p in unitdir.rglob(OLD_HUB)], "no link may point at the removed unit"
    assert (unitdir / f"{HUB}.d" / "override.conf").read_text() == "[Service]\nMemoryMax=4G\n"
    assert staged.enabled() == (hubs(1), workers(1))
    assert f"removed {OLD_HUB}" not in staged.install("--workers", "1"), "migrated once"

    # Drop-ins for both: the template's are kept, the old ones left for the operator to merge.
    staged = Staged(tmp_path / "b")
    staged.install("--workers", "1")
    (staged.unitdir / OLD_HUB).write_text(OLD_HUB_UNIT)
    for d in (f"{OLD_HUB}.d", f"{HUB}.d"):
        (staged.unitdir / d).mkdir()
        (staged.unitdir / d / "override.conf").write_text(f"# {d}\n")
    out = staged.install("--workers", "1")
    assert "merge them by hand" in out and not (staged.unitdir / OLD_HUB).exists()
    assert (staged.unitdir / f"{HUB}.d" / "override.conf").read_text() == f"# {HUB}.d\n"


@needs_core
@needs_install_tools
def test_install_script_checks_the_configuration(tmp_path: Path) -> None:
    """With a real tidings behind the venv, install.sh shows each shard's endpoints and warns about
    what the services would refuse: endpoint lists that do not match TIDINGS_HUBS, tcp:// without
    keys, key files this role needs and lacks."""
    staged = Staged(tmp_path, real_tidings=True)
    out = staged.install("--hubs", "2", "--workers", "1")
    assert "hub 1: ingress ipc:///run/tidings/hub-1/ingress" in out and "warning" not in out, out
    staged.edit(TIDINGS_HUB_INGRESS="tcp://10.0.0.11:5561")
    out = staged.install()
    assert "TIDINGS_HUB_INGRESS lists 1 endpoint(s) but TIDINGS_HUBS is 2" in out
    assert "tcp:// hub endpoints without TIDINGS_HUB_KEYS" in out
    staged.edit(TIDINGS_HUB_INGRESS="tcp://10.0.0.11:5561,tcp://10.0.0.12:5561", TIDINGS_HUB_KEYS="/etc/tidings/keys")
    out = staged.install()
    assert "lacks hub.key_secret hub.key host.key_secret for role all" in out, out
    keys = staged.root / "etc/tidings/keys"
    keys.mkdir()
    for name in ("hub.key", "hub.key_secret", "host.key", "host.key_secret"):
        (keys / name).write_text("")
    assert "warning" not in staged.install(), "a list with one endpoint per shard, keys in place"


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
        assert instance or not name.endswith("@.service"), f"{name} is a template: which instance?"
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
    hub = runner.start(HUB, "0")
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
        # (workers first: they are ordered after tidings-hubs.target, which is after the shards, so
        # systemd stops them first).
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
        hub = runner.start(HUB, "0")
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


def recv_until(ws: Any, text: str, timeout: float = 10) -> str:
    """Messages until one holds `text` (others, like positions, may come first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        message = str(ws.recv())
        if text in message:
            return message
    raise AssertionError(f"no message with {text!r} within {timeout}s")


def wait_for_log(proc: Proc, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert time.monotonic() < deadline, f"{proc.name} never logged {text!r}:\n{proc.log()}"
        time.sleep(0.05)


@needs_core
def test_hub_shards_share_runtime_and_state_dirs_and_reload_their_keys(service_root: Path) -> None:
    """tidings-hub@0 and @1 on one host: each binds its own ipc:// endpoints in the shared
    RuntimeDirectory= and writes its own journal in the shared StateDirectory=; a worker links to
    both (CURVE keys, this host admitted) and serves a channel of each. A publisher on another
    host is refused until its key is in authorized/ and ExecReload= has told the shards."""
    from hub.publisher import HubUnavailable, Publisher
    from hub.shards import shard_of
    from tidings.config import Config
    from tidings.links import generate

    state = service_root / "state"  # plays /var/lib/tidings (StateDirectory=, shared by the shards)
    keys = service_root / "keys"  # plays /etc/tidings/keys on a host with both roles
    generate(keys, hub=True)
    other = service_root / "other-host"  # a publishing host's key directory
    generate(other, hub=False)
    shutil.copyfile(keys / "hub.key", other / "hub.key")
    settings = {"TIDINGS_HUBS": "2", "TIDINGS_HISTORY_PERSIST": "1", "TIDINGS_STATE_DIR": str(state),
                "TIDINGS_HUB_KEYS": str(keys)}
    with unit_runner(service_root, settings) as runner:
        state.mkdir(mode=0o750)
        if runner.account:  # what systemd does for StateDirectory=; the keys as the operator hands them over
            for path in (state, keys, *keys.rglob("*")):
                os.chown(path, *runner.account)
        shards = [runner.start(HUB, str(i)) for i in range(2)]
        for shard in shards:
            runner.notify.wait_for(shard.pid, "READY=1", 30, proc=shard)
        worker = runner.start(WORKER, "0")
        runner.notify.wait_for(worker.pid, "READY=1", 30, proc=worker)  # linked to both shards
        for i in range(2):
            assert (runner.runtime_dir / f"hub-{i}" / "ingress").exists()

        channels: dict[int, str] = {}  # shard -> a channel it owns
        n = 0
        while len(channels) < 2:
            channels.setdefault(shard_of(f"conversation:c{n}".encode(), 2), f"conversation:c{n}")
            n += 1
        ws = runner.connect(runner.token(channels=["conversation:*"]))
        try:
            assert '"connected"' in ws.recv()
            for i, channel in channels.items():
                ws.send(f'{{"type":"subscribe","id":"{i}","data":{{"channel":"{channel}"}}}}')
                recv_until(ws, '"subscribed"')
            for channel in channels.values():
                body = f'{{"channel":"{channel}","type":"chat_message","data":{{}}}}'.encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{runner.api_port}/api/publish", data=body, method="POST",
                    headers={"Authorization": f"Bearer {runner.api_key}", "Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as r:
                    assert r.status == 200
                assert channel in recv_until(ws, '"chat_message"')

            other_config = Config.load(environ={"TIDINGS_HUBS": "2", "TIDINGS_RUNTIME_DIR": str(runner.runtime_dir),
                                                "TIDINGS_HUB_KEYS": str(other)})

            def publish_from_the_other_host() -> None:
                with Publisher.from_config(other_config, send_timeout_ms=300, reply_timeout_ms=1000) as pub:
                    pub.broadcast_confirmed(list(channels.values()), "other_host", {})

            with pytest.raises(HubUnavailable):
                publish_from_the_other_host()
            for shard in shards:  # refused for its key, not for anything else
                wait_for_log(shard, "is not in " + str(keys / "authorized"), 5)
            admitted = keys / "authorized" / "other-host.key"
            shutil.copyfile(other / "host.key", admitted)
            if runner.account:
                os.chown(admitted, *runner.account)
            for shard in shards:
                runner.reload(shard, HUB)
            for i, shard in enumerate(shards):
                wait_for_log(shard, f"hub {i} reloaded the authorized keys: 2 admitted", 10)
            publish_from_the_other_host()
            for _ in channels:
                recv_until(ws, '"other_host"')
        finally:
            with contextlib.suppress(Exception):
                ws.close()
        assert runner.stop(worker, WORKER) == 0, worker.log()
        for shard in shards:
            assert runner.stop(shard, HUB) == 0, shard.log()
    journals = sorted(p.name for p in state.iterdir() if p.name.endswith(".journal"))
    assert journals == ["history-0.journal", "history-1.journal"], sorted(p.name for p in state.iterdir())


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


@pytest.fixture(params=["ipc", "curve"])
def syscall_runner(request: pytest.FixtureRequest, service_root: Path) -> Iterator[UnitRunner]:
    """The plain runner, or one whose hub links use CURVE keys: key files read, the hub's ZAP
    thread, authorized/ re-read on reload."""
    if request.param == "ipc":
        with unit_runner(service_root) as run:
            yield run
        return
    from tidings.links import generate

    keys = service_root / "keys"
    generate(keys, hub=True)
    with unit_runner(service_root, {"TIDINGS_HUB_KEYS": str(keys)}) as run:
        if run.account:
            for path in (keys, *keys.rglob("*")):
                os.chown(path, *run.account)
        yield run


@needs_core
@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed: `apt-get install strace`")
def test_every_syscall_made_is_allowed_by_the_units_filter(syscall_runner: UnitRunner) -> None:
    """SystemCallFilter= cannot be applied without systemd, so trace what the processes really call
    (start, a client, publishes both ways, /metrics, a refused token, reload, drain) and compare."""
    runner = syscall_runner
    traces = runner.root / "traces"  # strace runs as the service user: it must write here
    traces.mkdir()
    if runner.account:
        os.chown(traces, *runner.account)
    summaries = {HUB: traces / "hub.strace", WORKER: traces / "worker.strace"}

    def tracer(name: str) -> list[str]:
        return ["strace", "-f", "-qq", "-c", "-o", str(summaries[name])]

    hub = runner.start(HUB, "0", tracer=tracer(HUB))
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
        if read_env_file(runner.env_file.read_text()).get("TIDINGS_HUB_KEYS"):
            assert "reloaded the authorized keys" in hub.log(), hub.log()
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

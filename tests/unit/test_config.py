"""tidings/config.py: defaults, TIDINGS_* parsing, flags over env, key checks, dev keys, redaction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tidings.config import (
    DEV_API_KEY_FILE,
    DEV_SECRET_FILE,
    MIN_SECRET_BYTES,
    Config,
    ConfigError,
    config_fields,
    env_name,
)

SECRET = "k" * MIN_SECRET_BYTES
API_KEY = "a" * 16


def load(**env: str) -> Config:
    return Config.load(environ={env_name(name): value for name, value in env.items()})


# -- defaults ---------------------------------------------------------------------------------------
def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    config = Config.load(environ={})
    assert (config.host, config.port, config.api_host, config.api_port) == ("127.0.0.1", 8080, "127.0.0.1", 8081)
    assert config.workers == (os.cpu_count() or 1)
    assert (config.jwt_algorithm, config.jwt_secret, config.api_key) == ("HS256", "", "")
    assert (config.jwt_leeway, config.max_token_ttl, config.max_token_bytes) == (5.0, 86400.0, 8192)
    assert (config.max_message_bytes, config.max_subscriptions, config.max_pending_bytes) == (65536, 256, 1 << 20)
    assert (config.rate_limit, config.rate_burst, config.publish_rate_limit) == (100.0, 200, 20.0)
    assert config.rate_abuse_limit == 1000
    assert (config.handshake_timeout, config.idle_timeout, config.pong_timeout) == (5.0, 25.0, 20.0)
    assert (config.allowed_origins, config.conformance_echo) == ((), False)
    assert config.runtime_dir == f"/run/user/1234/tidings-{os.getuid()}"
    assert config.ingress_endpoints == (f"ipc:///run/user/1234/tidings-{os.getuid()}/ingress",)
    assert config.egress_endpoints == (f"ipc:///run/user/1234/tidings-{os.getuid()}/egress",)
    assert (config.role, config.hubs, config.hub_keys, config.hub_insecure) == ("all", 1, "", False)
    assert config.metrics_path == Path(f"/run/user/1234/tidings-{os.getuid()}/metrics")


def test_runtime_dir_falls_back_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert Config.load(environ={}).runtime_dir == f"/tmp/tidings-{os.getuid()}"


def test_endpoint_overrides() -> None:
    config = load(HUB_INGRESS="tcp://10.0.0.1:5555", HUB_EGRESS="tcp://10.0.0.1:5556", METRICS_DIR="/m")
    assert (config.ingress_endpoints, config.egress_endpoints) == (("tcp://10.0.0.1:5555",), ("tcp://10.0.0.1:5556",))
    assert config.metrics_path == Path("/m")


def test_shards_get_an_ipc_directory_each_by_default() -> None:
    config = load(HUBS="2", RUNTIME_DIR="/r")
    assert config.ingress_endpoints == ("ipc:///r/hub-0/ingress", "ipc:///r/hub-1/ingress")
    assert config.requests_endpoints == ("ipc:///r/hub-0/requests", "ipc:///r/hub-1/requests")
    assert config.journal_path(1) == Path("/r/state/history-1.journal")
    assert load(RUNTIME_DIR="/r").journal_path(0) == Path("/r/state/history.journal")


def test_listed_endpoints_must_match_the_shard_count() -> None:
    with pytest.raises(ConfigError, match=r"lists 1 endpoint.*TIDINGS_HUBS is 2"):
        load(HUBS="2", HUB_INGRESS="tcp://a:1")
    config = load(HUBS="2", HUB_INGRESS="tcp://a:1, tcp://b:1")
    assert config.ingress_endpoints == ("tcp://a:1", "tcp://b:1")
    with pytest.raises(ConfigError, match="not an ipc://, tcp://"):
        load(HUB_EGRESS="udp://a:1")
    with pytest.raises(ConfigError, match="TIDINGS_ROLE"):
        load(ROLE="relay")


def test_tcp_hub_links_need_keys_or_an_explicit_insecure() -> None:
    config = load(HUB_INGRESS="tcp://10.0.0.1:5555")
    with pytest.raises(ConfigError, match="need CURVE keys"):
        config.check_hub_links()
    load(HUB_INGRESS="tcp://10.0.0.1:5555", HUB_INSECURE="1").check_hub_links()
    load(HUB_INGRESS="tcp://10.0.0.1:5555", HUB_KEYS="/k").check_hub_links()
    load().check_hub_links()  # ipc:// needs nothing


def test_every_field_is_documented() -> None:
    for f in config_fields():
        assert f.metadata["doc"], f.name


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_PORT", "9123")
    assert Config.load().port == 9123


# -- environment parsing -------------------------------------------------------------------------------
def test_env_parsing_of_each_type() -> None:
    config = load(PORT="9000", JWT_LEEWAY="2.5", CONFORMANCE_ECHO="true", HOST="0.0.0.0",
                  ALLOWED_ORIGINS="https://a.example, https://b.example  https://c.example")
    assert config.port == 9000 and isinstance(config.port, int)
    assert config.jwt_leeway == 2.5 and isinstance(config.jwt_leeway, float)
    assert config.conformance_echo is True
    assert config.host == "0.0.0.0"
    assert config.allowed_origins == ("https://a.example", "https://b.example", "https://c.example")


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_bools(raw: str, expected: bool) -> None:
    assert load(CONFORMANCE_ECHO=raw).conformance_echo is expected


def test_empty_env_values_mean_unset() -> None:
    assert load(PORT="", HOST="").port == 8080


def test_float_fields_take_ints() -> None:
    assert load(RATE_LIMIT="50").rate_limit == 50.0


@pytest.mark.parametrize(("name", "raw"), [
    ("PORT", "eighty"), ("PORT", "8080.5"), ("RATE_LIMIT", "fast"), ("CONFORMANCE_ECHO", "maybe"),
])
def test_unreadable_env_values_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"TIDINGS_{name}: cannot read"):
        load(**{name: raw})


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("JWT_ALGORITHM", "HS512", "TIDINGS_JWT_ALGORITHM must be HS256, RS256 or ES256"),
    ("JWT_ALGORITHM", "none", "TIDINGS_JWT_ALGORITHM"),
    ("LOG_FORMAT", "xml", "TIDINGS_LOG_FORMAT"),
    ("WORKERS", "0", "TIDINGS_WORKERS must be at least 1"),
    ("MAX_SUBSCRIPTIONS", "0", "TIDINGS_MAX_SUBSCRIPTIONS must be at least 1"),
    ("RATE_BURST", "-1", "TIDINGS_RATE_BURST must be at least 1"),
    ("RATE_LIMIT", "0", "TIDINGS_RATE_LIMIT must be above 0"),
    ("PONG_TIMEOUT", "-1", "TIDINGS_PONG_TIMEOUT must be above 0"),
])
def test_bad_values_are_refused_with_the_variable_named(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**{name: raw})


# -- flags win over env ------------------------------------------------------------------------------------
def test_flags_win_over_env() -> None:
    env = {"TIDINGS_PORT": "8000", "TIDINGS_HOST": "10.0.0.1", "TIDINGS_WORKERS": "3"}
    config = Config.load({"port": 9000, "host": None, "workers": "5"}, environ=env)
    assert config.port == 9000  # a flag given
    assert config.host == "10.0.0.1"  # a flag left out (None): the env stays
    assert config.workers == 5  # a flag given as text is parsed like the env


def test_flags_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="TIDINGS_WORKERS"):
        Config.load({"workers": 0}, environ={})
    with pytest.raises(ConfigError, match="TIDINGS_PORT: cannot read"):
        Config.load({"port": "x"}, environ={})


def test_to_env_round_trips() -> None:
    config = load(PORT="9000", ALLOWED_ORIGINS="https://a,https://b", CONFORMANCE_ECHO="1", JWT_SECRET=SECRET)
    assert Config.load(environ=config.to_env()) == config


# -- check_keys ---------------------------------------------------------------------------------------------
def test_check_keys_accepts_a_good_setup() -> None:
    load(JWT_SECRET=SECRET, API_KEY=API_KEY).check_keys(need_api_key=True)
    load(JWT_SECRET=SECRET).check_keys(need_api_key=False)
    load(JWT_SECRET=SECRET, API_PORT="0").check_keys(need_api_key=True)  # API turned off


def test_check_keys_missing_secret() -> None:
    with pytest.raises(ConfigError, match="no token key: set TIDINGS_JWT_SECRET"):
        load().check_keys(need_api_key=False)


def test_check_keys_short_secret() -> None:
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        load(JWT_SECRET="k" * (MIN_SECRET_BYTES - 1)).check_keys(need_api_key=False)


def test_check_keys_counts_secret_bytes_not_characters() -> None:
    load(JWT_SECRET="é" * 16).check_keys(need_api_key=False)  # 16 characters, 32 bytes


def test_check_keys_public_key_with_hs256(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="one algorithm family per key"):
        load(JWT_SECRET=SECRET, JWT_PUBLIC_KEY=str(key)).check_keys(need_api_key=False)


def test_check_keys_asymmetric(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TIDINGS_JWT_ALGORITHM=RS256 needs TIDINGS_JWT_PUBLIC_KEY"):
        load(JWT_ALGORITHM="RS256").check_keys(need_api_key=False)
    with pytest.raises(ConfigError, match="no file at"):
        load(JWT_ALGORITHM="ES256", JWT_PUBLIC_KEY=str(tmp_path / "absent.pem")).check_keys(need_api_key=False)
    key = tmp_path / "key.pem"
    key.write_text("pem")
    load(JWT_ALGORITHM="ES256", JWT_PUBLIC_KEY=str(key)).check_keys(need_api_key=False)


@pytest.mark.parametrize("api_key", ["", "a" * 15])
def test_check_keys_missing_api_key(api_key: str) -> None:
    config = load(JWT_SECRET=SECRET, API_KEY=api_key) if api_key else load(JWT_SECRET=SECRET)
    with pytest.raises(ConfigError, match="TIDINGS_API_KEY must be set"):
        config.check_keys(need_api_key=True)
    config.check_keys(need_api_key=False)


# -- dev keys ---------------------------------------------------------------------------------------------
def test_with_dev_keys_creates_0600_secrets_once_and_reuses_them(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    first = load(RUNTIME_DIR=str(runtime)).with_dev_keys()
    assert len(first.jwt_secret) == 64 and len(first.api_key) == 64
    assert first.jwt_secret != first.api_key
    for name in (DEV_SECRET_FILE, DEV_API_KEY_FILE):
        assert stat.S_IMODE((runtime / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) & 0o077 == 0
    second = load(RUNTIME_DIR=str(runtime)).with_dev_keys()
    assert (second.jwt_secret, second.api_key) == (first.jwt_secret, first.api_key)
    first.check_keys(need_api_key=True)


def test_with_dev_keys_keeps_configured_keys(tmp_path: Path) -> None:
    config = load(RUNTIME_DIR=str(tmp_path), JWT_SECRET=SECRET, API_KEY=API_KEY)
    assert config.with_dev_keys() is config
    assert list(tmp_path.iterdir()) == []


def test_with_dev_keys_makes_no_secret_for_public_key_setups(tmp_path: Path) -> None:
    config = load(RUNTIME_DIR=str(tmp_path), JWT_ALGORITHM="RS256").with_dev_keys()
    assert config.jwt_secret == ""
    assert [p.name for p in tmp_path.iterdir()] == [DEV_API_KEY_FILE]


def test_with_dev_keys_never_returns_an_empty_secret(tmp_path: Path) -> None:
    (tmp_path / DEV_SECRET_FILE).write_text("")
    assert len(load(RUNTIME_DIR=str(tmp_path)).with_dev_keys().jwt_secret.encode()) >= MIN_SECRET_BYTES


# -- describe -----------------------------------------------------------------------------------------------
def test_describe_redacts_secrets() -> None:
    config = load(JWT_SECRET=SECRET, API_KEY=API_KEY, JWT_PREVIOUS_SECRET="p" * 40, PORT="9000")
    rows = {name: (value, doc) for name, value, doc in config.describe()}
    for name in ("TIDINGS_JWT_SECRET", "TIDINGS_API_KEY", "TIDINGS_JWT_PREVIOUS_SECRET"):
        assert rows[name][0] == "<redacted>"
    text = repr(config.describe())
    assert SECRET not in text and API_KEY not in text and "p" * 40 not in text
    assert rows["TIDINGS_PORT"][0] == "9000"
    assert rows["TIDINGS_HOST"] == ("127.0.0.1", "WebSocket listen address (loopback until you mean otherwise)")
    assert len(rows) == len(config_fields())


def test_describe_shows_unset_secrets_as_empty() -> None:
    rows = {name: value for name, value, _ in load().describe()}
    assert rows["TIDINGS_JWT_SECRET"] == "" and rows["TIDINGS_API_KEY"] == ""

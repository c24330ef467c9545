"""Each loadtest.reliability run at a tiny size: the JSON summary's shape and the criteria that
are not timing (healthy clients lose nothing, slow readers are dropped, hostile tokens are
refused, no token in the log). No speed thresholds: the 2-core CI box is shared.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from tests.service import REPO

RUN_TIMEOUT = 90.0


def run(name: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "loadtest.reliability", name, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary: dict[str, Any] = orjson.loads(lines[-1])
    assert summary["run"] == name
    assert isinstance(summary["pass"], bool)
    assert isinstance(summary["wall_s"], float | int)
    return summary


def test_slow_readers_are_dropped_and_healthy_clients_lose_nothing() -> None:
    # 200 x 16 KiB/s for 3 s is 9.6 MB per stalled reader: past kernel buffers (<= 4 MiB) + the 1 MiB cap.
    s = run("slow_readers", "--readers", "20", "--healthy", "3", "--rate", "200", "--duration", "3",
            "--drain-timeout", "0")
    assert s["slow_connected"] == 20 and s["healthy_connected"] == 3
    assert s["published"] == 600
    assert s["slow_consumer_drops"] == 20
    assert s["healthy_lost"] == 0 and s["healthy_out_of_order"] == 0
    assert s["server_connections_end"] == 3  # only the healthy ones are left on the server
    assert set(s["rss_kib"]) == {"idle", "t0", "t10", "end", "peak", "after"}
    assert s["latency_ms"]["p99"] is not None
    assert s["pass"] is True


def test_flood_connects_everyone() -> None:
    s = run("flood", "--connections", "200", "--pings", "10", "--ping-clients", "5")
    assert s["connected"] == 200 and s["success_rate"] == 1.0 and s["failures"] == {}
    assert s["still_open_after_pings"] == 200
    assert s["ping_rtt_ms"]["n"] == 10
    assert s["rss_per_connection_kib"] is not None
    assert s["pass"] is True


def test_fd_exhaustion_recovers_once_clients_leave() -> None:
    # CPU and log-rate criteria are timing-like and, today, failing (see RELIABILITY.md): only shape
    # and recovery are asserted here.
    # Few enough attempts that the connects still queued when the clients leave (accepted then,
    # and held until the handshake timeout) leave fds free for the recovery connects.
    s = run("fd_exhaustion", "--nofile", "128", "--connections", "150", "--saturated", "2",
            "--connect-timeout", "4", "--settle", "1", "--recovery-connections", "5")
    assert 0 < s["upgraded"] < 150
    assert sum(s["outcomes"].values()) == 150
    assert s["recovery"]["upgraded"] == 5
    assert {"worker_cpu_pct_saturated", "log_lines_per_s_saturated", "log_top", "worker_fds"} <= set(s)


def test_slowloris_sockets_are_closed_and_normal_clients_connect() -> None:
    s = run("slowloris", "--sockets", "100", "--interval", "0.5", "--handshake-timeout", "1", "--max-wait", "6")
    assert s["connected"] == 100
    assert s["closed_by_server"] == 100 and s["still_open_at_end"] == 0
    assert s["normal_clients"]["ok"] >= 1 and s["normal_clients"]["failed"] == 0
    assert s["pass"] is True


def test_hostile_tokens_are_refused_and_never_logged() -> None:
    s = run("hostile_tokens")
    assert s["control_accepted"] is True
    assert s["total"] >= 30
    # Each case refused with 4001/4002 after an `unauthorized` error frame, or an HTTP 4xx; the
    # known deviations (accepted kid traversal, bare TCP close over the header cap) are reported.
    assert s["unexpected"] == []
    for name, case in s["cases"].items():
        if name == "valid_control" or name in s["not_refused_as_t3_asks"]:
            continue
        assert case["outcome"] in ("closed", "http_refused"), (name, case)
        if case["outcome"] == "closed":
            assert case["close"] in (4001, 4002), (name, case)
            assert case["error"]["code"] == "unauthorized", (name, case)
    assert s["error_frames_ok"] is True
    assert s["tokens_in_log"] == [] and s["secret_in_log"] is False and s["raw_token_param_in_log"] is False
    assert s["tracebacks_in_log"] == 0
    assert s["pass"] is True


@pytest.mark.parametrize("clients", [40])
def test_soak_loses_nothing_and_fds_come_back(clients: int) -> None:
    s = run("soak", "--clients", str(clients), "--duration", "3", "--sample", "1", "--warmup", "1")
    assert s["clients"] == clients and s["still_open"] == clients
    assert s["lost"] == 0 and s["published"] == 300
    assert s["fds"]["after_leave"] <= s["fds"]["before"]
    assert isinstance(s["rss_drift_pct"], float | int)
    assert s["pass"] is True

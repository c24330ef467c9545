"""The Locust capacity tooling end to end: `python -m loadtest` against a real `tidings run`.

A few seconds of load with a few dozen users of every class, once from one Locust process and
once from a master with two workers. The assertions are about correctness, never timing: no
failures, every WebSocket metric sampled, events delivered, no offset gaps.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service import REPO, TidingsService

CLASSES = ("Subscriber", "ChatPublisher", "BackendPublisher", "Churn")
WS_METRICS = ("connect", "subscribe", "ping", "publish", "event")
USERS_PER_CLASS = 30


@pytest.fixture(scope="module")
def service() -> Any:
    with TidingsService(workers=2) as svc:
        yield svc


def run_loadtest(svc: TidingsService, results: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIDINGS_JWT_SECRET": svc.secret, "TIDINGS_API_KEY": svc.api_key}
    cmd = [
        sys.executable, "-m", "loadtest", "--url", svc.ws_url(), "--api-url", f"http://127.0.0.1:{svc.api_port}",
        "--shape", "fixed", "-u", str(USERS_PER_CLASS * len(CLASSES)), "-r", "100", "-t", "8s",
        "--results", str(results), "--name", name, "--max-seconds", "180",
        "--mix", ",".join(f"{c}=1" for c in CLASSES),
        # Few channels and quick timers: every class gets to act several times in 8 seconds.
        "--channels", "6", "--channels-per-user", "2", "--ping-interval", "1",
        "--chat-rate", "2", "--backend-rate", "2", "--churn-hold", "1", *extra,
    ]
    # Generous bounds: a shared 2-core CI box can be slow to start Locust; nothing here is timed.
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = results / f"{name}_locust.log"
    locust_log = log.read_text()[-3000:] if log.exists() else "(no Locust log)"
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{locust_log}\n{svc.logs()[-3000:]}"
    return proc


def check_reports(results: Path, name: str) -> dict[str, Any]:
    prefix = results / name
    with open(f"{prefix}_stats.csv", newline="") as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    tally = json.loads(Path(f"{prefix}_tidings.json").read_text())

    assert failures == [], failures
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    for metric in WS_METRICS:
        row = stats.get(("WS", metric))
        assert row is not None, f"no {metric} samples: {sorted(stats)}"
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
    for path in ("/api/publish", "/api/broadcast"):
        assert int(stats[("POST", path)]["Request Count"]) > 0
    # Users per class as the load shape saw them at the end of each window (the busiest one counts).
    windows = tally["shape"]["windows"]
    assert all(max(w["classes"].get(c, 0) for w in windows) >= USERS_PER_CLASS for c in CLASSES), windows

    counts = tally["counts"]
    assert counts["events"] > 0
    assert counts["gaps"] == 0 and counts["missed"] == 0 and counts["duplicates"] == 0, counts
    assert tally["closes"] == {} and tally["errors"] == {}, tally
    assert Path(f"{prefix}.html").stat().st_size > 0
    return tally


def test_loadtest_one_process(service: TidingsService, tmp_path: Path) -> None:
    proc = run_loadtest(service, tmp_path, "single")
    tally = check_reports(tmp_path, "single")
    assert tally["workers"] == 0
    assert "peak users held" in proc.stdout and "gaps: 0" in proc.stdout


def test_loadtest_distributed_master_and_two_workers(service: TidingsService, tmp_path: Path) -> None:
    proc = run_loadtest(service, tmp_path, "distributed", "--locust-workers", "2")
    tally = check_reports(tmp_path, "distributed")
    assert tally["workers"] == 2  # both workers reported their counters to the master
    assert "locust workers=2" in proc.stdout

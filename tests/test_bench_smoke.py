"""Smoke test of the benchmark suite (loadtest/bench): every scenario at tiny sizes.

Runs against a real tidings (TidingsService: hub + 2 workers) and the suite's naive baseline
(notify and hub_alone: tidings only).
It checks that each scenario completes with 0 loss and reports sane numbers; it never checks
speed (timing thresholds on a shared 2-core box would only make the test flaky).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from loadtest.bench import __main__ as bench
from loadtest.bench import report, scenarios
from loadtest.bench.servers import BENCH_LIMITS, AttachedServer, BaselineServer, Server
from tests.service import TidingsService


@pytest.fixture(scope="module")
def tidings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    sock_dir = tmp_path_factory.mktemp("hub")
    ingress = f"ipc://{sock_dir}/in"
    env = {**BENCH_LIMITS, "TIDINGS_HUB_INGRESS": ingress, "TIDINGS_HUB_EGRESS": f"ipc://{sock_dir}/out"}
    with TidingsService(workers=2, env=env) as svc:
        assert svc.proc is not None
        yield AttachedServer("tidings", svc.proc.pid, svc.port, svc.secret, ingress=ingress)


@pytest.fixture(scope="module")
def baseline() -> Iterator[Server]:
    with BaselineServer() as srv:
        yield srv


@pytest.fixture(params=["baseline", "tidings"])
def server(request: pytest.FixtureRequest) -> Server:
    srv: Server = request.getfixturevalue(request.param)
    return srv


def finite(*values: float) -> bool:
    return all(isinstance(v, float | int) and not math.isnan(v) and v >= 0 for v in values)


def test_fanout(server: Server) -> None:
    run = scenarios.fanout(server, subscribers=20, channels=2, events=100, window=8, clients=2, probe_every=5)
    m = run.metrics
    assert m["expected"] == 20 * 50 and m["delivered"] == m["expected"]
    assert m["loss"] == 0 and m["extra"] == 0 and m["order_errors"] == 0
    assert m["deliveries_per_s"] > 0 and finite(m["lat_p50_ms"], m["lat_p99_ms"], m["cpu_us_per_delivery"])
    assert 100 < m["frame_bytes"] < 400
    assert run.notes["latency_samples"] == 4 * 50  # 4 probes (every 5th of 20), 50 events each


def test_fanout_through_hub_publisher(tidings: Server) -> None:
    m = scenarios.fanout(tidings, subscribers=10, events=50, via="hub", clients=1).metrics
    assert m["loss"] == 0 and m["delivered"] == 500 and m["order_errors"] == 0


def test_latency(server: Server) -> None:
    runs = scenarios.latency(server, subscribers=10, max_events_per_s=100, loads=[0.2, 0.5], duration=0.5)
    assert [r.notes["load"] for r in runs] == [0.2, 0.5]
    for r in runs:
        assert r.metrics["loss"] == 0 and r.metrics["delivered"] > 0
        assert finite(r.metrics["lat_p50_ms"], r.metrics["lat_p99_ms"], r.metrics["lat_max_ms"])


def test_connect(server: Server) -> None:
    m = scenarios.connect(server, connections=40, concurrency=8).metrics
    assert m["ok"] == 40 and m["failed"] == 0 and m["handshakes_per_s"] > 0
    assert finite(m["hs_p50_ms"], m["hs_p99_ms"])


def test_idle(server: Server) -> None:
    run = scenarios.idle(server, connections=40, channels=4, settle=0.2)
    assert run.metrics["connected"] == 40 and run.metrics["failed"] == 0
    assert run.metrics["rss_after_mib"] > 0 and not math.isnan(run.metrics["kib_per_connection"])
    assert run.notes["rss_by_process_kib"]  # the server's processes were found in /proc


def test_ping(server: Server) -> None:
    m = scenarios.ping(server, connections=4, duration=0.3).metrics
    assert m["replies"] > 0 and m["bad"] == 0 and finite(m["rtt_p50_ms"], m["rtt_p99_ms"])


def test_hub(server: Server) -> None:
    m = scenarios.hub(server, events=500, window=64).metrics
    assert m["loss"] == 0 and m["delivered"] == 2 * 500 and m["order_errors"] == 0
    assert m["events_per_s"] > 0


def test_chat(server: Server) -> None:
    run = scenarios.chat(server, connections=40, events=200, window=16, clients=2, probe_every=5)
    m = run.metrics
    assert run.notes["channels"] == 20 and run.notes["clients"] == 2
    # every event reaches both members of its channel, the publishing one included
    assert m["events"] == 200 and m["expected"] == 400 and m["delivered"] == 400
    assert m["loss"] == 0 and m["extra"] == 0 and m["order_errors"] == 0
    assert m["unacked"] == 0 and m["other_frames"] == 0
    assert m["deliveries_per_s"] > 0 and m["events_per_s"] > 0
    assert finite(m["lat_p50_ms"], m["lat_p99_ms"], m["cpu_us_per_event"], m["cpu_us_per_delivery"])
    assert 100 < m["frame_bytes"] < 400
    # 8 probes (every 5th of each job's 20 connections), 10 events on each probe's channel
    assert run.notes["latency_samples"] == 8 * 10


def test_chat_paced(server: Server) -> None:
    run = scenarios.chat(server, connections=40, rate=200, duration=1.0, clients=2, probe_every=5)
    m = run.metrics
    assert m["rate_events_per_s"] == 200 and m["events"] == 200 and m["delivered"] == 400
    assert m["loss"] == 0 and m["extra"] == 0 and m["order_errors"] == 0 and m["unacked"] == 0
    assert finite(m["cpu_us_per_event"], m["lat_p50_ms"], m["lat_p99_ms"], m["lat_max_ms"])
    assert run.notes["rate"] == 200 and not run.notes["stalled"]


def test_notify(tidings: Server) -> None:
    run = scenarios.notify(tidings, connections=40, events=400, window=16, publishers=2, probe_every=5)
    m = run.metrics
    assert run.notes["publishers"] == 2
    assert m["events"] == 400 and m["delivered"] == 400 and m["expected"] == 400
    assert m["loss"] == 0 and m["extra"] == 0 and m["order_errors"] == 0
    assert m["events_per_s"] > 0 and finite(m["cpu_us_per_event"], m["lat_p50_ms"], m["lat_p99_ms"])
    assert run.notes["latency_samples"] == 8 * 10  # 8 probes (every 5th of 2 x 20), 10 events each


def test_notify_needs_a_hub(baseline: Server) -> None:
    with pytest.raises(ValueError, match=r"hub\.Publisher"):
        scenarios.notify(baseline, connections=4, events=4)


def test_hub_alone_from_the_cli(tmp_path: Path) -> None:
    """The scenario starts its own hub; the CLI runs it without starting a server tree."""
    out = tmp_path / "results"
    assert bench.main(["hub_alone", "--hub-events", "3000", "--runs", "1", "--out", str(out)]) == 0
    [raw] = out.glob("hub_alone-*.json")
    [case] = orjson.loads(raw.read_bytes())["cases"]
    assert case["server"] == "tidings" and case["error"] is None
    m = case["runs"][0]["metrics"]
    assert m["events"] == 3000 and m["publisher_per_s"] > 0 and m["subscriber_per_s"] > 0
    assert finite(m["hub_cpu_us_per_event"])
    # a short run may take less than one 10 ms clock tick of hub CPU: nan then, never infinity
    assert m["hub_events_per_cpu_s"] is None or m["hub_events_per_cpu_s"] > 0


def test_cli_writes_results_and_plots(tmp_path: Path) -> None:
    """The command line end to end (baseline only, to stay quick), then RESULTS.md and plots."""
    out = tmp_path / "results"
    rc = bench.main(["fanout", "--server", "baseline", "--subscribers", "5,10", "--events", "20",
                     "--runs", "2", "--clients", "1", "--out", str(out)])
    assert rc == 0
    [raw] = out.glob("fanout-*.json")
    data = orjson.loads(raw.read_bytes())
    assert [c["case"] for c in data["cases"]] == ["subscribers=5 via=socket", "subscribers=10 via=socket"]
    assert all(len(c["runs"]) == 2 and c["runs"][0]["metrics"]["loss"] == 0 for c in data["cases"])

    # the report from hand-made cases: both servers, every scenario's table, the two plots
    cases = [report.Case("fanout", f"subscribers={s} via=socket", k, {"subscribers": s, "via": "socket"},
                         [scenarios.Run({"deliveries_per_s": v * s, "loss": 0, "events_per_s": v})])
             for k, v in (("baseline", 300.0), ("tidings", 1500.0)) for s in (1000, 5000)]
    # chat beats the baseline but lost events: its targets are not met
    cases += [report.Case("chat", "connections=2000", k, {"connections": 2000},
                          [scenarios.Run({"deliveries_per_s": d, "loss": loss, "cpu_us_per_event": 20.0})])
              for k, d, loss in (("baseline", 1e5, 0), ("tidings", 2e5, 3))]
    # notify has no baseline: an absolute target
    cases += [report.Case("notify", "connections=5000", "tidings", {"connections": 5000},
                          [scenarios.Run({"events_per_s": 70_000.0, "loss": 0})])]
    cases += [report.Case("latency", "subscribers=5000 load=0.5", k, {"subscribers": 5000},
                          [scenarios.Run({"deliveries_per_s": 1e5, "lat_p50_ms": 1.0, "lat_p99_ms": p99,
                                          "lat_max_ms": 9.0})]) for k, p99 in (("baseline", 5.0), ("tidings", 3.0))]
    args = bench.parser().parse_args(["all", "--results-md", str(tmp_path / "R.md"),
                                      "--plots", str(tmp_path / "plots")])
    bench.write_results(cases, args, {"command": "python -m loadtest.bench all", "date": "today",
                                      "machine": report.machine()})
    text = (tmp_path / "R.md").read_text()
    assert "| fan-out 1000 subs: >= 5x baseline, 0 loss | deliveries_per_s | 300,000 | 1,500,000 | 5.00 | yes |" in text
    assert ("| chat 2000 conns / 1000 channels: >= baseline, 0 loss | deliveries_per_s | 100,000 | 200,000 | 2.00 "
            "| **no** |") in text
    assert "| notify 5000 users: >= 60k events/s, 0 loss | events_per_s | - | 70,000 | - | yes |" in text
    assert "## Targets\n" in text
    assert (tmp_path / "plots" / "fanout_deliveries.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "latency_vs_load.png").stat().st_size > 1000

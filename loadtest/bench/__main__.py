"""python -m loadtest.bench SCENARIO [options]   (or `all`, which `make bench` runs)

Scenarios (each against tidings and the naive baseline, `--runs` times, medians reported):
  fanout      S subscribers on C channels, P events from one publisher with a window in flight
  latency     the same at fixed publish rates (fractions of the measured maximum): p50/p99/max
  connect     N handshakes as fast as possible, each with its own JWT
  idle        N idle subscribed connections: server RSS per connection
  ping        M connections in a closed ping loop: replies/s, RTT
  hub         events/s through the hub to 2 workers (one subscriber on each), offsets in order
  chat        N connections on N/2 channels of 2 members; one member of each publishes over its
              socket, a window of publishes awaiting `published`: deliveries/s, CPU per event
  chat_paced  the same at a fixed publish rate for a few seconds: CPU per event, p50/p99 latency
  notify      N connections on their personal channel user:<sub> only, notified round-robin by
              backend processes through hub.Publisher: events/s, CPU per event (tidings only)
  hub_alone   the hub by itself (hub_alone.py): hub events per hub CPU-second (tidings only)
  all         every scenario at its full size; writes loadtest/RESULTS.md and loadtest/plots/
  report      re-render RESULTS.md and the plots from a saved run: report --from loadtest/results/all-*.json

Examples:
  python -m loadtest.bench fanout --subscribers 1000,5000 --via socket,hub
  python -m loadtest.bench ping --server tidings --connections 100 --duration 5
  python -m loadtest.bench chat --chat-connections 2000 --chat-window 128
  python -m loadtest.bench chat_paced --chat-rate 2000 --chat-duration 5
  python -m loadtest.bench notify --notify-connections 5000 --notify-publishers 2
  python -m loadtest.bench all --quick      # small sizes, a minute or two: check the suite works
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import report, scenarios
from .report import Case
from .scenarios import Run
from .servers import NoServer, Server, make_server

HERE = Path(__file__).resolve().parent
LOAD_AT_START = os.getloadavg()[0]
LOADTEST = HERE.parent
# the targets checked in the RESULTS.md summary: (scenario, case, metric, op, value, what);
# metric "ratio" is tidings / baseline of the scenario's headline metric; a target on a
# scenario that reports loss is only met with 0 loss
TARGETS: list[tuple[str, str, str, str, float, str]] = [
    ("chat", "connections=2000", "ratio", ">=", 1.0, "chat 2000 conns / 1000 channels: >= baseline, 0 loss"),
    ("chat", "connections=2000", "cpu_us_per_event", "<=", 30.0, "chat: <= 30 µs server CPU per event"),
    ("chat_paced", "connections=2000 rate=2000", "cpu_us_per_event", "<=", 100.0,
     "chat at 2000 events/s: <= 100 µs server CPU per event"),
    ("chat_paced", "connections=2000 rate=2000", "lat_p99_ms", "<=", 2.0, "chat at 2000 events/s: p99 <= 2 ms"),
    ("notify", "connections=5000", "events_per_s", ">=", 60_000.0, "notify 5000 users: >= 60k events/s, 0 loss"),
    ("hub_alone", "events=300000", "hub_events_per_cpu_s", ">=", 150_000.0,
     "hub alone: >= 150k events per hub CPU-s"),
    ("connect", "connections=5000", "ratio", ">=", 1.0, "connect 5000: >= baseline handshakes/s (HS256)"),
    ("ping", "connections=100", "ratio", ">=", 1.0, "ping 100 conns: >= baseline replies/s"),
    ("idle", "connections=10000", "kib_per_connection", "<=", 8.0, "<= 8 KiB per idle subscribed conn"),
    ("fanout", "subscribers=1000 via=socket", "ratio", ">=", 5.0, "fan-out 1000 subs: >= 5x baseline, 0 loss"),
    ("fanout", "subscribers=5000 via=socket", "ratio", ">=", 5.0, "fan-out 5000 subs: >= 5x baseline, 0 loss"),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def csv_str(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# -- running cases -----------------------------------------------------------------------------
def run_case(
    scenario: str, case: str, params: dict[str, Any], kinds: list[str], args: argparse.Namespace,
    fn: Callable[[Server], Run | list[Run]], fresh_per_run: bool = False,
    make: Callable[[str, int], Server] | None = None,
) -> list[Case]:
    """Run fn `args.runs` times against each server kind; one Case per (kind, sub-case).

    Runs are interleaved (baseline 1, tidings 1, baseline 2, ...) with both servers up, so that
    the other load on a shared machine drifts over both servers alike and the ratio stays fair.
    `make(kind, workers)` builds the server (NoServer for a scenario that starts its own)."""
    if make is None:
        env = tidings_env(args)
        make = lambda kind, workers: make_server(kind, workers, env, args.hubs, args.hub_link)  # noqa: E731
    out: dict[tuple[str, str], Case] = {}
    servers: dict[str, Server] = {}
    failed: set[str] = set()
    try:
        for i in range(args.runs):
            for kind in kinds:
                if kind in failed:
                    continue
                try:
                    if kind not in servers:
                        servers[kind] = make(kind, args.workers)
                        servers[kind].start()
                    time.sleep(scenarios.SETTLE)
                    t0 = time.monotonic()
                    result = fn(servers[kind])
                    for run in result if isinstance(result, list) else [result]:
                        sub = case + (f" load={run.notes['load']}" if "load" in run.notes else "")
                        c = out.setdefault((kind, sub), Case(scenario, sub, kind, {**params, **run.notes}))
                        c.runs.append(run)
                        metric, _ = report.HEADLINE[scenario]
                        log(f"{scenario} {sub} {kind} run {i + 1}/{args.runs}: {metric}="
                            f"{report.fmt(run.metrics.get(metric, math.nan))} "
                            f"loss={run.metrics.get('loss', '-')} ({time.monotonic() - t0:.1f}s)")
                except Exception as exc:
                    log(f"{scenario} {case} {kind} failed: {exc}")
                    traceback.print_exc()
                    failed.add(kind)
                    c = out.setdefault((kind, case), Case(scenario, case, kind, params))
                    c.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    if kind in servers:
                        log(f"server log tail:\n{servers[kind].logs()[-2000:]}")
                if fresh_per_run and kind in servers:
                    servers.pop(kind).stop()
    finally:
        for server in servers.values():
            server.stop()
    return list(out.values())


def tidings_env(args: argparse.Namespace) -> dict[str, str]:
    """Settings the bench gives the tidings server on top of its own (--history)."""
    history = getattr(args, "history", None)
    return {} if history is None else {"TIDINGS_HISTORY": history}


def fanout_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    cases: list[Case] = []
    for via in args.via:
        for subs in args.subscribers:
            events = args.events or max(50, args.deliveries // subs)
            ks = [k for k in kinds if via == "socket" or k == "tidings"]
            params = {"subscribers": subs, "via": via, "events": events, "window": args.window}
            cases += run_case(
                "fanout", f"subscribers={subs} via={via}", params, ks, args,
                lambda srv, subs=subs, events=events, via=via: scenarios.fanout(
                    srv, subscribers=subs, channels=args.channels, events=events, window=args.window,
                    via=via, clients=args.clients))
    return cases


def latency_cases(args: argparse.Namespace, kinds: list[str], max_rates: dict[str, float] | None = None,
                  ) -> list[Case]:
    cases: list[Case] = []
    rates = dict(max_rates or {})
    for kind in kinds:
        if not rates.get(kind) and args.max_rate:
            rates[kind] = args.max_rate
        if not rates.get(kind):
            log(f"latency: measuring the maximum publish rate of {kind} first")
            probe = run_case("fanout", "max", {}, [kind], _one_run(args), lambda srv: scenarios.fanout(
                srv, subscribers=args.lat_subscribers, events=max(50, args.deliveries // args.lat_subscribers),
                clients=args.clients))
            rates[kind] = probe[0].median("events_per_s") if probe and not probe[0].error else 0.0
        cases += run_case(
            "latency", f"subscribers={args.lat_subscribers}",
            {"subscribers": args.lat_subscribers, "max_events_per_s": rates[kind]}, [kind], args,
            lambda srv, kind=kind: scenarios.latency(
                srv, subscribers=args.lat_subscribers, max_events_per_s=rates[kind], loads=args.loads,
                duration=args.duration, clients=args.clients))
    return cases


def _one_run(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "runs": 1})


DEFAULT_CONNECTIONS = {"connect": 5000, "idle": 10_000, "ping": 100}


def connections(args: argparse.Namespace, scenario: str) -> int:
    sizes: dict[str, int] = getattr(args, "sizes", {})
    return sizes.get(scenario) or args.connections or DEFAULT_CONNECTIONS[scenario]


def connect_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n = connections(args, "connect")
    return run_case("connect", f"connections={n}", {"connections": n}, kinds, args,
                    lambda srv: scenarios.connect(srv, connections=n, concurrency=args.concurrency,
                                                  clients=args.clients))


def idle_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n = connections(args, "idle")
    # a fresh server per run: freed memory of a previous run would hide the growth
    return run_case("idle", f"connections={n}", {"connections": n}, kinds, args,
                    lambda srv: scenarios.idle(srv, connections=n, clients=args.clients), fresh_per_run=True)


def ping_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n = connections(args, "ping")
    return run_case("ping", f"connections={n}", {"connections": n}, kinds, args,
                    lambda srv: scenarios.ping(srv, connections=n, duration=args.duration, clients=args.clients))


def hub_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    cases = run_case("hub", "events", {"events": args.hub_events, "window": args.hub_window}, kinds, args,
                     lambda srv: scenarios.hub(srv, events=args.hub_events, window=args.hub_window))
    return cases


def chat_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n = args.chat_connections
    params = {"connections": n, "channels": n // 2, "events": args.chat_events, "window": args.chat_window}
    return run_case("chat", f"connections={n}", params, kinds, args,
                    lambda srv: scenarios.chat(srv, connections=n, events=args.chat_events,
                                               window=args.chat_window, clients=args.clients))


def chat_paced_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n, rate, duration = args.chat_connections, args.chat_rate, args.chat_duration
    params = {"connections": n, "channels": n // 2, "rate": rate, "duration": duration}
    return run_case("chat_paced", f"connections={n} rate={rate:g}", params, kinds, args,
                    lambda srv: scenarios.chat(srv, connections=n, rate=rate, duration=duration,
                                               clients=args.clients, timeout=duration * 4 + 30))


def _tidings_only(scenario: str, kinds: list[str]) -> list[str]:
    if "tidings" not in kinds:
        log(f"{scenario}: tidings only (the baseline has no hub); nothing to run with --server baseline")
    return [k for k in kinds if k == "tidings"]


def notify_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    n = args.notify_connections
    params = {"connections": n, "events": args.notify_events, "window": args.notify_window,
              "publishers": args.notify_publishers}
    return run_case("notify", f"connections={n}", params, _tidings_only("notify", kinds), args,
                    lambda srv: scenarios.notify(srv, connections=n, events=args.notify_events,
                                                 window=args.notify_window, publishers=args.notify_publishers))


def hub_alone_cases(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    # hub_alone starts its own hub: no server tree to start for it. The size is in the case name:
    # a short run is a few 10 ms ticks of hub CPU, too coarse for the target
    n = args.hub_events
    return run_case("hub_alone", f"events={n}", {"events": n}, _tidings_only("hub_alone", kinds), args,
                    lambda srv: scenarios.hub_alone(events=n, env=tidings_env(args)),
                    make=lambda kind, workers: NoServer(kind))


# -- output ------------------------------------------------------------------------------------
def git_revision() -> str:
    """The commit the servers ran from, '+dirty' when the tree had local changes."""
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty=+dirty"], cwd=LOADTEST.parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return rev or "unknown"


def run_info(command: str, started: float) -> dict[str, Any]:
    return {"command": command, "date": report.now(), "machine": report.machine(), "revision": git_revision(),
            "minutes": (time.monotonic() - started) / 60, "load_start": LOAD_AT_START,
            "load_end": os.getloadavg()[0]}


def save_json(cases: list[Case], out_dir: Path, name: str, info: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps({**info, "cases": [c.to_json() for c in cases]},
                                  option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def load_json(path: Path) -> tuple[list[Case], dict[str, Any]]:
    """Cases and run info back from a raw results file (`report --from FILE` re-renders it)."""
    data = orjson.loads(path.read_bytes())
    cases = [Case(c["scenario"], c["case"], c["server"], c["params"],
                  [Run(r["metrics"], r["notes"]) for r in c["runs"]], c.get("error")) for c in data["cases"]]
    info = {k: v for k, v in data.items() if k != "cases"}
    return cases, info


def summary(cases: list[Case]) -> str:
    lines = ["| target | metric | baseline | tidings | ratio | met |", "|---|---|---|---|---|---|"]
    for scenario, case, metric, op, goal, what in TARGETS:
        tid = next((c for c in cases if c.scenario == scenario and c.case == case and c.server == "tidings"),
                   None)
        base = next((c for c in cases if c.scenario == scenario and c.server == "baseline"
                     and c.case == case.replace("via=hub", "via=socket")), None)
        if tid is None:
            continue
        head, _ = report.HEADLINE[scenario]
        shown = head if metric == "ratio" else metric
        t = tid.median(shown) if not tid.error else math.nan
        b = base.median(shown) if base and not base.error else math.nan
        r = t / b if b else math.nan
        value = r if metric == "ratio" else t
        met = (value >= goal) if op == ">=" else (value <= goal) if op == "<=" else (value < goal)
        loss = tid.median("loss")  # nan where the scenario counts none (connect, idle, ...)
        if not math.isnan(loss) and loss > 0:
            met = False
        verdict = "error" if tid.error else ("yes" if met else "**no**")
        lines.append(f"| {what} | {shown} | {report.fmt(b)} | {report.fmt(t)} | {report.fmt(r)} | {verdict} |")
    return "\n".join(lines)


def write_results(cases: list[Case], args: argparse.Namespace, info: dict[str, Any]) -> None:
    command = info["command"]
    minutes = f"{info['minutes']:.1f} min" if info.get("minutes") else "duration not recorded"
    loads = (f"1-min load average {info['load_start']:.2f} at the start and {info['load_end']:.2f} at the end"
             if "load_start" in info else "load average not recorded")
    plots = Path(args.plots)
    fan_png, lat_png = plots / "fanout_deliveries.png", plots / "latency_vs_load.png"
    report.plot_fanout(cases, fan_png)
    report.plot_latency(cases, lat_png)
    md = Path(args.results_md)

    def rel(p: Path) -> Path:  # links in RESULTS.md relative to it, so they work on GitHub too
        return p.resolve().relative_to(md.resolve().parent) if p.resolve().is_relative_to(
            md.resolve().parent) else p.resolve()
    text = f"""# tidings benchmark results

Generated by `{command}` (the whole file and the plots are regenerated by that one command;
`make bench` runs it). Do not edit by hand.

- **Date:** {info["date"]} ({minutes} for the whole suite)
- **Machine:** {info["machine"]}
- **Code:** git `{info.get("revision", "not recorded")}`
- **Other load on the machine:** {loads} (other engineers' tests share these cores; the
  suite interleaves the servers' runs so that both meet the same background)
- **Servers:** tidings (`tidings run`, 1 hub + {args.workers} workers) and the naive baseline
  (`loadtest/bench/baseline.py`: one picows process, `for t in subscribers: t.send(...)`), started
  fresh by the suite on loopback; the load client (picows + uvloop, {args.clients} processes plus a
  publisher process) shares the same {os.cpu_count()} cores.
- **Method:** every number is the **median of {args.runs} runs**; "runs" lists each run's headline
  figure; ratio = tidings / baseline for the headline metric (for latency and memory lower is better,
  so a ratio below 1 is the good direction). Server CPU is utime+stime of every process of the server
  tree (read from /proc before and after the timed phase) divided by deliveries, events, handshakes or
  replies. A "-" under baseline means the scenario is tidings only (notify, hub_alone: no hub there).
- **Fan-out window:** "64 in flight" = at most 64 publishes sent but not yet received by every
  subscriber (each load-client process publishes its received count to shared memory every 1-5 ms;
  the publisher reads the minimum). Events are ~{scenarios.EVENT_BYTES} bytes on the wire (see frame_bytes).
- **Chat:** connections in pairs, one channel per pair; one member of each channel publishes over its
  own socket (round-robin over the channels) and both members receive each event, so deliveries are
  2 per event. The window is {args.chat_window} publishes whose `published` reply has not arrived yet (over all
  load-client processes); chat_paced publishes {args.chat_rate:g} events/s instead. Latency is publish to
  receive on every 10th connection.
- **Notify:** every connection holds only its personal channel `user:<sub>`; {args.notify_publishers} backend
  processes publish through `hub.Publisher`, each to the users of one load-client process, with
  {args.notify_window} notifications not yet received in flight.

## Targets

{summary(cases)}

Why targets are missed, the profiles of the hot paths (`python -m loadtest.bench.profile`) and
the cost model: [SCALING.md](SCALING.md). Server CPU per delivery (`cpu_us_per_delivery`) is the
fairest column: the load client shares the cores, so rates are lower bounds.

## All results
{report.table(cases)}

## Plots

- Deliveries/s vs subscribers, both servers: [{rel(fan_png)}]({rel(fan_png)})
- Latency percentiles vs load: [{rel(lat_png)}]({rel(lat_png)})

![fan-out]({rel(fan_png)})
![latency]({rel(lat_png)})
"""
    md.write_text(text)
    log(f"wrote {md}, {fan_png}, {lat_png}")


# -- CLI ---------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["fanout", "latency", "connect", "idle", "ping", "hub", "chat", "chat_paced",
                                        "notify", "hub_alone", "all", "report"])
    p.add_argument("--from", dest="from_json", help="report: re-render RESULTS.md and plots from this JSON")
    p.add_argument("--server", default="both", choices=["both", "tidings", "baseline"])
    p.add_argument("--runs", type=int, default=3, help="runs per case; the median is reported (3)")
    p.add_argument("--workers", type=int, default=2, help="tidings workers (2)")
    p.add_argument("--clients", type=int, default=2, help="load-client processes for subscribers (2)")
    p.add_argument("--out", default=str(LOADTEST / "results"), help="raw JSON results directory")
    p.add_argument("--hubs", type=int, default=1, help="tidings hub shards (1)")
    p.add_argument("--hub-link", default="ipc", choices=["ipc", "tcp", "curve"],
                   help="hub links: ipc://, plain tcp:// on loopback, or tcp:// with CURVE (ipc)")
    p.add_argument("--history", default=None, metavar="SPEC",
                   help="TIDINGS_HISTORY for tidings ('' = none; default: the server's own), "
                        "e.g. 'bench=64/300s,user=32/600s' to measure what keeping history costs")
    g = p.add_argument_group("fanout / latency")
    g.add_argument("--subscribers", type=csv_ints, default=[1000, 5000], help="fanout sizes (1000,5000)")
    g.add_argument("--channels", type=int, default=1, help="channels the subscribers spread over (1)")
    g.add_argument("--deliveries", type=int, default=600_000,
                   help="deliveries per fanout run; events = deliveries / subscribers (600000)")
    g.add_argument("--events", type=int, default=0, help="events per fanout run (overrides --deliveries)")
    g.add_argument("--window", type=int, default=64, help="publishes in flight (64)")
    g.add_argument("--via", type=csv_str, default=["socket"], help="publish path(s): socket,hub (socket)")
    g.add_argument("--lat-subscribers", type=int, default=5000, help="latency scenario subscribers (5000)")
    g.add_argument("--loads", type=csv_floats, default=[0.1, 0.5, 0.8], help="fractions of max (0.1,0.5,0.8)")
    g.add_argument("--max-rate", type=float, default=0.0, help="max events/s for latency (0: measure)")
    g.add_argument("--duration", type=float, default=3.0, help="seconds per latency load / ping run (3)")
    g = p.add_argument_group("connect / idle / ping / hub")
    g.add_argument("--connections", type=int, default=0,
                   help="connections of the scenario (connect 5000, idle 10000, ping 100)")
    g.add_argument("--concurrency", type=int, default=128, help="connect: handshakes in progress (128)")
    g.add_argument("--hub-events", type=int, default=300_000, help="hub / hub_alone: events (300000)")
    g.add_argument("--hub-window", type=int, default=4096, help="hub: events in flight (4096)")
    g = p.add_argument_group("chat / chat_paced / notify")
    g.add_argument("--chat-connections", type=int, default=2000,
                   help="chat connections, 2 per channel (2000: 1000 channels)")
    g.add_argument("--chat-events", type=int, default=100_000, help="chat: events, 2 deliveries each (100000)")
    g.add_argument("--chat-window", type=int, default=128,
                   help="chat: publishes awaiting their `published` reply, in total (128)")
    g.add_argument("--chat-rate", type=float, default=2000.0, help="chat_paced: events/s in total (2000)")
    g.add_argument("--chat-duration", type=float, default=5.0, help="chat_paced: seconds of publishing (5)")
    g.add_argument("--notify-connections", type=int, default=5000, help="notify: users, one connection each (5000)")
    g.add_argument("--notify-events", type=int, default=200_000,
                   help="notify: events, rounded down to whole rounds over the users (200000)")
    g.add_argument("--notify-window", type=int, default=256,
                   help="notify: notifications not yet received, per publisher (256)")
    g.add_argument("--notify-publishers", type=int, default=2,
                   help="notify: hub.Publisher processes, one per load-client process (2)")
    g = p.add_argument_group("all")
    g.add_argument("--quick", action="store_true", help="small sizes and 1 run: check the suite works")
    g.add_argument("--sweep", type=csv_ints, default=[100, 1000, 2500, 5000],
                   help="fanout subscriber counts for the plot (100,1000,2500,5000)")
    g.add_argument("--results-md", default=str(LOADTEST / "RESULTS.md"))
    g.add_argument("--plots", default=str(LOADTEST / "plots"))
    return p


def run_all(args: argparse.Namespace, kinds: list[str]) -> list[Case]:
    if args.quick:
        args.runs, args.sweep, args.deliveries = 1, [50, 200], 20_000
        args.lat_subscribers, args.duration = 200, 1.0
        args.sizes, args.hub_events = {"connect": 300, "idle": 300, "ping": 10}, 5000
        args.chat_connections, args.chat_events, args.chat_rate, args.chat_duration = 200, 5000, 500.0, 1.0
        args.notify_connections, args.notify_events = 300, 6000
    else:
        # `all` runs each scenario at its full size; --connections would set all three at once
        args.sizes = {k: v for k, v in DEFAULT_CONNECTIONS.items()}
    cases: list[Case] = []
    args.subscribers, args.via = args.sweep, ["socket"]
    cases += fanout_cases(args, kinds)
    hub_sizes = [s for s in (1000, 5000) if s in args.sweep] or args.sweep[-1:]
    args.subscribers, args.via = hub_sizes, ["hub"]
    cases += fanout_cases(args, ["tidings"] if "tidings" in kinds else [])
    # latency at fractions of the fanout maximum just measured at the same size (socket path)
    max_rates = {c.server: c.median("events_per_s") for c in cases if c.scenario == "fanout"
                 and c.params.get("subscribers") == args.lat_subscribers and c.params.get("via") == "socket"}
    cases += latency_cases(args, kinds, max_rates)
    cases += connect_cases(args, kinds)
    cases += idle_cases(args, kinds)
    cases += ping_cases(args, kinds)
    cases += hub_cases(args, kinds)
    cases += chat_cases(args, kinds)
    cases += chat_paced_cases(args, kinds)
    cases += notify_cases(args, kinds)
    cases += hub_alone_cases(args, kinds)
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = "python -m loadtest.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    kinds = ["baseline", "tidings"] if args.server == "both" else [args.server]
    started = time.monotonic()
    if args.scenario == "report":
        cases, info = load_json(Path(args.from_json))
        write_results(cases, args, info)
        return 0
    if args.scenario == "all":
        cases = run_all(args, kinds)
    else:
        cases = {
            "fanout": fanout_cases, "latency": latency_cases, "connect": connect_cases,
            "idle": idle_cases, "ping": ping_cases, "hub": hub_cases, "chat": chat_cases,
            "chat_paced": chat_paced_cases, "notify": notify_cases, "hub_alone": hub_alone_cases,
        }[args.scenario](args, kinds)
    print(report.table(cases))
    info = run_info(command, started)
    path = save_json(cases, Path(args.out), args.scenario, info)
    log(f"raw results: {path}")
    if args.scenario == "all":
        print("\n" + summary(cases))
        write_results(cases, args, info)
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())

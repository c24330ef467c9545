"""`python -m loadtest`: one headless Locust capacity run, its reports, and a summary.

Without --url it starts a tidings of its own (`tidings run` on free loopback ports, stopped by
PID afterwards) and also samples the server's memory and CPU. With --url it targets a running
tidings; pass its secret and API key through TIDINGS_JWT_SECRET / TIDINGS_API_KEY (they are
handed to Locust through the environment, never on a command line that `ps` shows).

Any argument this command does not know goes to Locust and the locustfile unchanged, e.g.
`--step-users 50 --p99-limit 100 --mix Subscriber=50,ChatPublisher=1` (see
`locust -f loadtest/locustfile.py --help`, section "tidings").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from loadtest.capacity.options import PROFILES
from loadtest.capacity.server import REPO, LocalTidings, Sampler, free_port
from loadtest.capacity.summary import summarize

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
RESULTS = REPO / "loadtest" / "results"
# Log lines from the master worth showing while a run is in progress.
PROGRESS = ("loadtest.shape", "All users spawned", "Gave up", "Traceback", "Error", "knee")

EXAMPLES = """\
examples:
  python -m loadtest                                   # step ramp against a tidings it starts: finds the knee
  python -m loadtest --shape spike --spike-users 2000  # reconnect storm
  python -m loadtest --shape soak --soak-time 1800 --soak-users 1000
  python -m loadtest --shape fixed -u 300 -r 100 -t 60s --mix Subscriber=50,ChatPublisher=2
  python -m loadtest --locust-workers 2                # master + 2 local Locust workers
  TIDINGS_JWT_SECRET=... TIDINGS_API_KEY=... python -m loadtest \\
      --url ws://10.0.0.5:8080/ws --api-url http://10.0.0.5:8081
"""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Locust capacity run against tidings; see loadtest/CAPACITY.md",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="WebSocket URL of a running tidings (default: start one here)")
    p.add_argument("--api-url", help="its HTTP API base URL (default: same host, port 8081)")
    p.add_argument("--shape", choices=PROFILES, default=os.environ.get("LOADTEST_SHAPE", "step"),
                   help="load shape (default: step, the knee finder; env LOADTEST_SHAPE)")
    p.add_argument("-u", "--users", type=int, help="fixed shape: users")
    p.add_argument("-r", "--spawn-rate", type=float, help="fixed shape: users started per second")
    p.add_argument("-t", "--run-time", default="60s", help="fixed shape: duration (default 60s)")
    p.add_argument("--locust-workers", type=int, default=0,
                   help="0: one Locust process; N: a master and N local workers (see CAPACITY.md for remote)")
    p.add_argument("--server-workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes of the tidings started here (default: CPU count)")
    p.add_argument("--results", type=Path, default=RESULTS, help="report folder (default: loadtest/results)")
    p.add_argument("--name", help="report file prefix (default: <shape>-<timestamp>)")
    p.add_argument("--max-seconds", type=float, default=3600,
                   help="hard bound: Locust is stopped by PID after this long")
    return p.parse_known_args(argv)


class Proc:
    """A child process in its own session, its output in a log file (optionally echoed)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, echo: bool = False) -> None:
        self.log_path = log
        self._log: IO[str] = open(log, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, start_new_session=True)
        self._pump = threading.Thread(target=self._copy, args=(echo,), daemon=True)
        self._pump.start()

    def _copy(self, echo: bool) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._log.write(line)
            if echo and any(k in line for k in PROGRESS):
                print("  " + line.rstrip()[:200], flush=True)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.p.wait(10)
        self._pump.join(5)
        self._log.close()
        return rc

    def kill(self) -> None:
        """SIGTERM by PID (Locust writes its reports on SIGTERM), SIGKILL if it lingers."""
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()


def locust_commands(args: argparse.Namespace, extra: list[str], prefix: Path,
                    ws_url: str, api_url: str) -> tuple[list[str], list[list[str]]]:
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    target = ["--ws-url", ws_url, "--api-url", api_url, "--load-shape", args.shape, *extra]
    master = [*base, "--headless", "--only-summary", "--csv", str(prefix), "--csv-full-history",
              "--html", f"{prefix}.html", *target]
    if args.shape == "fixed":
        master += ["-u", str(args.users or 100), "-r", str(args.spawn_rate or args.users or 100),
                   "-t", args.run_time]
    workers: list[list[str]] = []
    if args.locust_workers > 0:
        port = free_port()
        master += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                   "--expect-workers", str(args.locust_workers), "--expect-workers-max-wait", "60"]
        workers = [[*base, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port), *target]
                   for _ in range(args.locust_workers)]
    return master, workers


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{args.shape}-{time.strftime('%Y%m%d-%H%M%S')}"
    prefix = args.results / name
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    server: LocalTidings | None = None
    sampler: Sampler | None = None
    procs: list[Proc] = []
    rc = 2
    ws_url = args.url or ""
    with tempfile.TemporaryDirectory(prefix="loadtest-tidings-") as runtime:
        try:
            if args.url is None:
                server = LocalTidings(args.server_workers, Path(f"{prefix}_tidings.log"), Path(runtime))
                print(f"starting tidings ({args.server_workers} workers) on 127.0.0.1 ...", flush=True)
                server.start()
                ws_url, api_url = server.ws_url, server.api_url
                env.update(TIDINGS_JWT_SECRET=server.secret, TIDINGS_API_KEY=server.api_key)
            else:
                ws_url = args.url
                host = urlsplit(ws_url).hostname or "127.0.0.1"
                api_url = args.api_url or f"http://{host}:8081"
                if not env.get("TIDINGS_JWT_SECRET"):
                    print("set TIDINGS_JWT_SECRET to the target's secret (users mint their own tokens)")
                    return 2
            sampler = Sampler(Path(f"{prefix}_server.csv"), api_url, server.proc.pid if server and server.proc
                              else None)
            sampler.start()
            master_cmd, worker_cmds = locust_commands(args, extra, prefix, ws_url, api_url)
            print(f"running Locust ({args.shape}, {args.locust_workers or 'no'} workers) against {ws_url};"
                  f" logs: {prefix}_locust*.log", flush=True)
            master = Proc(master_cmd, env, Path(f"{prefix}_locust.log"), echo=True)
            procs.append(master)
            for i, cmd in enumerate(worker_cmds):
                procs.append(Proc(cmd, env, Path(f"{prefix}_locust_worker{i}.log")))
            rc = master.wait(args.max_seconds)
            for w in procs[1:]:
                w.wait(30)  # workers quit when the master tells them; bounded all the same
        except KeyboardInterrupt:
            print("interrupted: stopping Locust and tidings", flush=True)
        finally:
            for p in procs:
                p.kill()
            if sampler is not None:
                sampler.stop()
            if server is not None:
                server.stop()
    if not Path(f"{prefix}_stats.csv").exists():
        print(f"Locust wrote no report (exit {rc}); see {prefix}_locust.log")
        return 2
    print()
    print(summarize(prefix, ws_url))
    # Locust exits 1 when any request failed; past the knee that is the expected outcome of a
    # capacity run, so only a run that did not complete is an error here.
    return 0 if rc in (0, 1) else rc

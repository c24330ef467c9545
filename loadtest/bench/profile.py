"""Profile tidings' fan-out hot path under the bench load: cProfile in every hub and worker process.

    python -m loadtest.bench.profile --subscribers 1000 --events 600 [--via socket|hub]
    python -m loadtest.bench.profile --scenario hub --events 100000 --window 4096
    python -m loadtest.bench.profile --scenario connect --subscribers 3000
    python -m loadtest.bench.profile --scenario ping --subscribers 100
    python -m loadtest.bench.profile --scenario chat_paced --subscribers 2000 --rate 2000
    python -m loadtest.bench.profile --scenario notify --subscribers 5000 --events 200000

It starts `tidings run` with a `sitecustomize` on PYTHONPATH that lets SIGUSR2 switch cProfile
on and off in each `tidings hub` / `tidings worker` process; one fanout run drives them, with
profiling on for exactly its timed phase. The top functions by own and by cumulative time are
printed per process and saved under loadtest/results/.
cProfile slows Python code about 2x, so read shares, not absolute times; the run also reports
the user/kernel split of the servers' CPU from /proc, which cProfile cannot see.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import scenarios
from .servers import TidingsServer

HERE = Path(__file__).resolve().parent

# SIGUSR2 starts cProfile in the hub/worker's main thread, the next SIGUSR2 stops it and dumps:
# only the timed phase is profiled, not start-up and the connection set-up
SITECUSTOMIZE = '''
import cProfile, os, signal, sys
_out = os.environ.get("BENCH_PROFILE_DIR")
if _out and ("worker" in sys.argv or "hub" in sys.argv):
    _prof = cProfile.Profile()
    _on = [False]
    def _toggle(signum, frame):
        if not _on[0]:
            _on[0] = True
            _prof.enable()
            return
        _prof.disable()
        role = "hub" if "hub" in sys.argv else "worker-" + sys.argv[-1]
        _prof.dump_stats(os.path.join(_out, f"{role}-{os.getpid()}.prof"))
    signal.signal(signal.SIGUSR2, _toggle)
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="fanout",
                   choices=["fanout", "hub", "connect", "ping", "chat", "chat_paced", "notify"])
    p.add_argument("--rate", type=float, default=2000.0, help="chat_paced: events/s (2000)")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--events", type=int, default=600)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--via", default="socket", choices=["socket", "hub"])
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=str(HERE.parent / "results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        site, dumps = Path(tmp) / "site", Path(tmp) / "dumps"
        site.mkdir()
        dumps.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        server = TidingsServer(extra_env={"PYTHONPATH": f"{site}:{HERE.parents[1]}",
                                          "BENCH_PROFILE_DIR": str(dumps)})
        with server:
            targets = [pid for pid in server.pids() if pid != (server.proc.pid if server.proc else -1)]

            def toggle() -> None:
                for pid in targets:
                    os.kill(pid, signal.SIGUSR2)

            if args.scenario == "hub":
                run = scenarios.hub(server, events=args.events, window=args.window, on_go=toggle, on_done=toggle)
            elif args.scenario == "ping":
                run = scenarios.ping(server, connections=args.subscribers, duration=3.0, on_go=toggle,
                                     on_done=toggle)
            elif args.scenario in ("chat", "chat_paced"):
                paced = args.scenario == "chat_paced"
                run = scenarios.chat(server, connections=args.subscribers, events=args.events,
                                     rate=args.rate if paced else 0.0, on_go=toggle, on_done=toggle)
            elif args.scenario == "notify":
                run = scenarios.notify(server, connections=args.subscribers, events=args.events,
                                       on_go=toggle, on_done=toggle)
            elif args.scenario == "connect":
                run = scenarios.connect(server, connections=args.subscribers, on_go=toggle, on_done=toggle)
            else:
                run = scenarios.fanout(server, subscribers=args.subscribers, events=args.events,
                                       window=args.window, via=args.via, on_go=toggle, on_done=toggle)
            time.sleep(1.0)  # the dumps are written by the processes' signal handlers
        text = io.StringIO()
        text.write(f"# profile of {args.scenario}: {args.subscribers} subscribers/connections, "
                   f"{args.events} events via {args.via}\n")
        text.write("# under cProfile: " + ", ".join(f"{k}={v:.3g}" for k, v in run.metrics.items()) + "\n")
        for prof in sorted(dumps.glob("*.prof")):
            text.write(f"\n## {prof.stem}\n")
            stats = pstats.Stats(str(prof), stream=text)
            stats.strip_dirs().sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(text.getvalue())
    print(text.getvalue())
    print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m loadtest.reliability NAME [options]`: one reliability run, one JSON summary line."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from loadtest.reliability.common import summary_line

RUNS = {
    "slow_readers": "T7: stalled subscribers vs healthy ones under 16 KiB events",
    "flood": "T8: many idle connections at once",
    "fd_exhaustion": "T9: one worker under a low RLIMIT_NOFILE, more connections than fds",
    "slowloris": "T10: half upgrade requests, one byte every few seconds",
    "hostile_tokens": "T3: the invalid-JWT corpus through real connects",
    "soak": "T20: steady clients and events; RSS and fd drift",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.reliability", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for name, doc in RUNS.items():
        module = importlib.import_module(f"loadtest.reliability.{name}")
        p = sub.add_parser(name, help=doc, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"loadtest.reliability.{args.name}")
    started = time.monotonic()
    result = module.run(args)
    print(summary_line({"run": args.name, **result, "wall_s": round(time.monotonic() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

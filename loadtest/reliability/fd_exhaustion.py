"""T9 fd exhaustion: one worker under RLIMIT_NOFILE=256 (set before exec of `tidings run`, so
hub and worker inherit it) and 400 connection attempts.

Reported: how the attempts ended (upgraded / refused / reset / timed out), the worker's CPU %
while saturated (utime+stime from /proc/PID/stat over the window), log lines per second in that
window with the most frequent lines, and whether new connects succeed once the clients leave.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

from loadtest.reliability import common
from loadtest.reliability.common import Service

DIGITS = re.compile(r"\d+")


def _shape(line: str) -> str:
    """A log line without its time stamp and numbers, for counting repeats."""
    return DIGITS.sub("N", line.split(" ", 2)[-1])[:160]


async def attempt(svc: Service, i: int, timeout: float, keep: list[common.WSClient],
                  outcomes: Counter[str]) -> None:
    try:
        client, hello = await common.open_client(
            svc.port, "/ws?token=" + svc.token(f"fd-{i}"), timeout=timeout)
    except TimeoutError:
        outcomes["timeout"] += 1
        return
    except OSError as exc:
        outcomes[type(exc).__name__] += 1
        return
    if hello is not None:
        outcomes["upgraded"] += 1
        client.keep_messages = False
        keep.append(client)
    else:
        outcomes[f"no_upgrade_http_{client.parser.status}_close_{client.close_code}"] += 1
        client.close()


async def _run(svc: Service, args: Any) -> dict[str, Any]:
    worker = svc.worker_pids()[0]
    keep: list[common.WSClient] = []
    outcomes: Counter[str] = Counter()
    fds_idle = common.fd_count([worker])
    log_mark = len(svc.log_path.read_bytes())
    tasks = [asyncio.create_task(attempt(svc, i, args.connect_timeout, keep, outcomes))
             for i in range(args.connections)]
    await asyncio.sleep(1.0)  # the burst lands; those beyond the limit are now queued or refused
    # -- saturated window --------------------------------------------------------------------
    cpu0, t0, log0 = common.cpu_seconds([worker]), time.monotonic(), len(svc.log_path.read_bytes())
    await asyncio.sleep(args.saturated)
    cpu1, t1 = common.cpu_seconds([worker]), time.monotonic()
    window = svc.log_path.read_bytes()[log0:].decode(errors="replace").splitlines()
    fds_saturated = common.fd_count([worker])
    await asyncio.gather(*tasks)
    upgraded = len(keep)
    # -- clients leave, then new ones try -------------------------------------------------------
    for c in keep:
        c.close()
    await asyncio.sleep(args.settle)
    fds_after_leave = common.fd_count([worker])
    later: list[common.WSClient] = []
    later_outcomes: Counter[str] = Counter()
    t_rec = time.monotonic()
    await asyncio.gather(*(attempt(svc, 100_000 + i, args.connect_timeout, later, later_outcomes)
                           for i in range(args.recovery_connections)))
    recovery_s = time.monotonic() - t_rec
    for c in later:
        c.close()
    whole = svc.log_path.read_bytes()[log_mark:].decode(errors="replace").splitlines()
    top = Counter(_shape(line) for line in whole).most_common(5)
    elapsed = t1 - t0
    return {
        "worker_nofile": args.nofile,
        "attempts": args.connections,
        "outcomes": dict(outcomes),
        "upgraded": upgraded,
        "worker_fds": {"idle": fds_idle, "saturated": fds_saturated, "after_leave": fds_after_leave},
        "saturated_window_s": round(elapsed, 2),
        "worker_cpu_pct_saturated": round(100 * (cpu1 - cpu0) / elapsed, 1),
        "log_lines_per_s_saturated": round(len(window) / elapsed, 2),
        "log_lines_total": len(whole),
        "log_top": [{"count": n, "line": s} for s, n in top],
        "recovery": {"attempts": args.recovery_connections, "upgraded": len(later),
                     "outcomes": dict(later_outcomes), "seconds": round(recovery_s, 2)},
    }


def run(args: Any) -> dict[str, Any]:
    common.raise_nofile()
    with Service(workers=1, nofile=args.nofile, env={"TIDINGS_MAX_CONNECTIONS_PER_USER": "100000"}) as svc:
        result = asyncio.run(_run(svc, args))
    result["pass"] = (result["recovery"]["upgraded"] == args.recovery_connections
                      and result["worker_cpu_pct_saturated"] < 20 and result["log_lines_per_s_saturated"] <= 1.5)
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--nofile", type=int, default=256, help="RLIMIT_NOFILE of tidings run and its children")
    p.add_argument("--connections", type=int, default=400)
    p.add_argument("--saturated", type=float, default=10.0, help="seconds measured while saturated")
    p.add_argument("--connect-timeout", type=float, default=15.0, help="per attempt (handshake included)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after the clients leave")
    p.add_argument("--recovery-connections", type=int, default=20)

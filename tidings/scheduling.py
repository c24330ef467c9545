"""CPU scheduling policy of the hub and worker processes."""

from __future__ import annotations

import logging
import os


def use_batch_scheduling(log: logging.Logger) -> None:
    """Run this process, and every thread it starts afterwards (ZeroMQ's I/O thread among them),
    as SCHED_BATCH: a thread woken by a message then no longer preempts the one running on its
    CPU, so each side finishes its loop pass and takes the next one's messages in one go instead
    of one at a time. Call it before any thread exists. Needs no privilege (SCHED_BATCH has no
    priority); systemd's @system-service filter allows it."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that refuses it: run as is
        log.warning("could not switch to SCHED_BATCH, running with the default policy: %s", exc)

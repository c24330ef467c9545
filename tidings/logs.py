"""Logging set-up: plain lines for a terminal, JSON lines for journald. Never a token or key."""

from __future__ import annotations

import logging
import re
import sys

import orjson

# A token may ride in a query string that ends up in an exception or a request line.
_TOKEN = re.compile(r"(token=)[^&\s\"']+")


def redact(text: str) -> str:
    return _TOKEN.sub(r"\1REDACTED", text)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def setup_logging(fmt: str, level: str, role: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # picows logs every write-buffer crossing and aiohttp every request at INFO: keep them quiet.
    logging.getLogger("picows").setLevel(logging.ERROR)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return logging.getLogger(f"tidings.{role.split('-')[0]}")


class RateLimitedLog:
    """At most one line per `interval` seconds for a repeating condition (EMFILE, drops)."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self.last = -1e18
        self.suppressed = 0

    def warning(self, now: float, msg: str, *args: object) -> None:
        if now - self.last >= self.interval:
            if self.suppressed:
                msg += f" ({self.suppressed} similar suppressed)"
            self.logger.warning(msg, *args)
            self.last = now
            self.suppressed = 0
        else:
            self.suppressed += 1

"""When to reconnect, and after how long: the policy every tidings client shares.

The numbers live in `policy.json`, a copy of the repository's `clients/policy.json` (a test keeps
the two equal, and the JavaScript client embeds the same values), so every client backs off the
same way. Everything here is pure: the caller passes the close code, how many attempts in a row
have failed and a source of randomness, and gets back what to do. That keeps the rules testable
without sockets or clocks.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["Action", "Plan", "Policy"]

MAX_EXPONENT = 31  # 2**31 times any minimum is far past every cap; keeps the number small


class Action(enum.Enum):
    """What a closed connection calls for (the policy's `close_codes` actions, plus stop)."""

    BACKOFF = "backoff"  # exponentially growing, fully jittered delay
    FLOOR = "floor"  # backoff with its minimum raised: the server is full, or we were abusive
    SOON = "soon"  # the server asked for a quick reconnect: a short random delay, never zero
    NEW_TOKEN = "new_token"  # the token was refused or expired: get another one, then as soon
    STOP = "stop"  # the application closed the client: no reconnect


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    delay: float  # seconds before the next attempt (0 for STOP)


@dataclass(frozen=True, slots=True)
class Policy:
    """The reconnect table, in seconds. `Policy.default()` reads the packaged policy.json."""

    min_delay: float
    max_delay: float
    soon: tuple[float, float]
    floor: float
    stable_after: float  # a connection `connected` this long resets the failure count
    connect_timeout: float  # dial to `connected`
    liveness_grace: float  # silence beyond the server's ping interval before we ping
    refresh_at: tuple[float, float]  # fraction of the token's remaining lifetime
    close_codes: tuple[tuple[int, int, Action], ...]
    other_codes: Action

    @classmethod
    def from_json(cls, table: Mapping[str, Any]) -> Policy:
        """Build a policy from the shared table (milliseconds)."""
        soon_low, soon_high = table["soon_ms"]
        refresh_low, refresh_high = table["refresh_at"]
        policy = cls(
            min_delay=table["backoff_min_ms"] / 1000, max_delay=table["backoff_max_ms"] / 1000,
            soon=(soon_low / 1000, soon_high / 1000), floor=table["floor_ms"] / 1000,
            stable_after=table["stable_after_ms"] / 1000, connect_timeout=table["connect_timeout_ms"] / 1000,
            liveness_grace=table["liveness_grace_ms"] / 1000,
            refresh_at=(float(refresh_low), float(refresh_high)),
            close_codes=tuple((int(r["first"]), int(r["last"]), Action(r["action"])) for r in table["close_codes"]),
            other_codes=Action(table["other_codes"]),
        )
        # A zero delay is the reconnect loop that hammers a server hundreds of times a second.
        if not 0 < policy.min_delay <= policy.max_delay or not 0 < policy.soon[0] <= policy.soon[1]:
            raise ValueError("reconnect delays must be positive, with min <= max")
        if not 0 < policy.refresh_at[0] <= policy.refresh_at[1] < 1:
            raise ValueError("refresh_at must be fractions of the lifetime, 0 < low <= high < 1")
        return policy

    @classmethod
    def default(cls) -> Policy:
        """The policy shipped with the package (policy.json)."""
        text = resources.files(__package__).joinpath("policy.json").read_text()
        return cls.from_json(json.loads(text))

    # -- decisions --------------------------------------------------------------------------------
    def action_for(self, code: int) -> Action:
        """The table's action for a close code (1006, a dropped connection, is an other code)."""
        for first, last, action in self.close_codes:
            if first <= code <= last:
                return action
        return self.other_codes

    def delay(self, action: Action, attempt: int, random: Callable[[], float]) -> float:
        """Seconds before reconnect `attempt` (1 = the first failure in a row).

        soon and new_token: uniform(soon) on the first attempt; a repeat before the connection
        was stable backs off instead, so a server that keeps saying "come back soon" (a restart
        loop) is not hit every second forever. backoff: full jitter, uniform(min, min(max,
        min * 2**attempt)): even the first retry is spread over [min, 2*min], and at the cap the
        range stays [min, max], never everyone at exactly max. floor: the same with min raised."""
        if action is Action.STOP:
            return 0.0
        if action in (Action.SOON, Action.NEW_TOKEN) and attempt <= 1:
            return _uniform(random, *self.soon)
        low = max(self.min_delay, self.floor) if action is Action.FLOOR else self.min_delay
        high = max(low, min(self.max_delay, low * 2 ** min(max(attempt, 1), MAX_EXPONENT)))
        return _uniform(random, low, high)

    def plan(self, code: int, attempt: int, random: Callable[[], float], *, by_client: bool = False) -> Plan:
        """What to do after a connection ended with `code`, on failure `attempt` in a row.

        `by_client`: the application called close(); only then does the client stay down. A 1000
        the server sent, like any code the table does not name, backs off."""
        action = Action.STOP if by_client else self.action_for(code)
        return Plan(action, self.delay(action, attempt, random))

    def backoff(self, attempt: int, random: Callable[[], float]) -> float:
        """The plain backoff delay for failure `attempt` in a row (also used for retries of a
        refused subscribe)."""
        return self.delay(Action.BACKOFF, attempt, random)

    def refresh_delay(self, remaining: float, random: Callable[[], float]) -> float | None:
        """Seconds until the token should be refreshed: uniform(refresh_at) of its remaining
        lifetime, jittered so connections made in one burst do not all refresh in the same
        second. None when under a second is left: the server's 4002 and the reconnect (which
        fetches a new token first) will do better than a refresh racing the expiry."""
        if remaining < 1.0:
            return None
        low, high = self.refresh_at
        return _uniform(random, remaining * low, remaining * high)


def _uniform(random: Callable[[], float], low: float, high: float) -> float:
    # Whole milliseconds, rounded as JavaScript's Math.round does, so that both clients fed the
    # same random numbers pick the same delays.
    return math.floor((low + random() * (high - low)) * 1000 + 0.5) / 1000

"""The reconnect policy as pure functions: delays per close code and failure count, seeded."""

from __future__ import annotations

import json
import random
import statistics
from importlib import resources
from pathlib import Path

import pytest
from tidings_client import Action, Policy

SHARED_POLICY = Path(__file__).resolve().parents[2] / "clients" / "policy.json"
POLICY = Policy.default()


def test_the_packaged_policy_is_the_shared_table() -> None:
    packaged = resources.files("tidings_client").joinpath("policy.json").read_text()
    assert json.loads(packaged) == json.loads(SHARED_POLICY.read_text())
    assert Policy.from_json(json.loads(SHARED_POLICY.read_text())) == POLICY


def test_backoff_doubles_its_range_with_full_jitter_up_to_the_cap() -> None:
    rng = random.Random(42)
    delays = [POLICY.backoff(n, rng.random) for n in range(1, 11)]
    print("\nten consecutive failures (seed 42):", ", ".join(f"{d:.3f}s" for d in delays))
    for n, delay in enumerate(delays, start=1):
        assert POLICY.min_delay <= delay <= min(POLICY.max_delay, POLICY.min_delay * 2**n)
    rng = random.Random(42)  # the same seed, the same sequence: reproducible in tests
    assert delays == [POLICY.backoff(n, rng.random) for n in range(1, 11)]


def test_jitter_is_kept_at_the_cap() -> None:
    rng = random.Random(1)
    at_cap = [POLICY.backoff(25, rng.random) for _ in range(1000)]
    assert min(at_cap) >= POLICY.min_delay and max(at_cap) <= POLICY.max_delay
    # spread over the whole range rather than a fixed 30 s for everyone
    assert min(at_cap) < 3 and max(at_cap) > 28 and 12 < statistics.median(at_cap) < 19
    assert POLICY.backoff(10**6, rng.random) <= POLICY.max_delay  # no overflow for huge counts


def test_no_delay_is_ever_zero() -> None:
    zero = lambda: 0.0  # noqa: E731 - the lowest draw a random source can make
    assert POLICY.backoff(1, zero) == POLICY.min_delay > 0
    assert POLICY.plan(1001, 1, zero).delay == POLICY.soon[0] > 0
    assert POLICY.plan(4001, 1, zero).delay == POLICY.soon[0] > 0
    assert POLICY.backoff(1, lambda: 0.9999) <= 2 * POLICY.min_delay


@pytest.mark.parametrize(
    ("code", "attempt", "action", "low", "high"),
    [
        (1006, 1, Action.BACKOFF, 1.0, 2.0),  # dropped
        (1006, 3, Action.BACKOFF, 1.0, 8.0),
        (1011, 1, Action.BACKOFF, 1.0, 2.0),  # internal error
        (1000, 1, Action.BACKOFF, 1.0, 2.0),  # a 1000 the server sent is no reason to stay down
        (3999, 1, Action.BACKOFF, 1.0, 2.0),  # unknown
        (4001, 1, Action.NEW_TOKEN, 0.1, 1.0),  # unauthorized: a new token, then soon
        (4002, 1, Action.NEW_TOKEN, 0.1, 1.0),  # expired
        (4002, 3, Action.NEW_TOKEN, 1.0, 8.0),  # ...backing off when it keeps happening
        (4099, 1, Action.NEW_TOKEN, 0.1, 1.0),
        (4100, 1, Action.FLOOR, 5.0, 10.0),  # worker full: backoff from a 5 s floor
        (4101, 2, Action.FLOOR, 5.0, 20.0),
        (4129, 9, Action.FLOOR, 5.0, 30.0),
        (4200, 1, Action.SOON, 0.1, 1.0),  # no pong
        (4201, 1, Action.SOON, 0.1, 1.0),  # slow consumer
        (1001, 1, Action.SOON, 0.1, 1.0),  # going away
        (1001, 2, Action.SOON, 1.0, 4.0),  # ...but not in a loop: a repeat before stable backs off
    ],
)
def test_plan_per_close_code(code: int, attempt: int, action: Action, low: float, high: float) -> None:
    for draw in (0.0, 0.5, 0.9999):
        plan = POLICY.plan(code, attempt, lambda d=draw: d)
        assert plan.action is action
        assert low <= plan.delay <= high


def test_close_from_the_application_stops() -> None:
    assert POLICY.plan(1000, 1, random.random, by_client=True).action is Action.STOP


def test_refresh_at_80_to_90_percent_of_the_remaining_lifetime() -> None:
    assert POLICY.refresh_delay(100.0, lambda: 0.0) == pytest.approx(80.0)
    assert POLICY.refresh_delay(100.0, lambda: 0.9999) == pytest.approx(90.0, abs=0.01)
    assert POLICY.refresh_delay(0.5, lambda: 0.5) is None  # too close to expiry: let 4002 do it
    rng = random.Random(3)
    spread = [POLICY.refresh_delay(8.0, rng.random) or 0.0 for _ in range(100)]
    assert 6.4 <= min(spread) < 6.6 and 7.0 < max(spread) <= 7.2


def test_a_table_with_zero_delays_is_refused() -> None:
    table = json.loads(SHARED_POLICY.read_text())
    for bad in ({"soon_ms": [0, 1000]}, {"backoff_min_ms": 0}, {"refresh_at": [0.8, 1.2]}):
        with pytest.raises(ValueError):
            Policy.from_json({**table, **bad})

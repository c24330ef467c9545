"""Command-line options of the locustfile, and the channel-size distribution they describe.

Every option has an environment twin (Locust's parser is configargparse), so the same
settings reach `--worker` processes on other machines without repeating flags.
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Any

# The option names `python -m loadtest` passes through; kept in one place so run.py and the
# locustfile cannot drift apart.
PROFILES = ("fixed", "step", "spike", "soak")


def add_options(parser: Any) -> None:
    """Register the tidings options on Locust's argument parser (events.init_command_line_parser)."""
    g = parser.add_argument_group("tidings")
    add = g.add_argument
    # Target and credentials.
    add("--ws-url", env_var="TIDINGS_WS_URL", default="ws://127.0.0.1:8080/ws",
        help="WebSocket endpoint of tidings (the token is appended as ?token=)")
    add("--api-url", env_var="TIDINGS_API_URL", default="http://127.0.0.1:8081",
        help="HTTP API base URL (POST /api/publish, /api/broadcast) for BackendPublisher")
    add("--jwt-secret", env_var="TIDINGS_JWT_SECRET", default="",
        help="HS256 secret the users mint their tokens with (the server's TIDINGS_JWT_SECRET)")
    add("--api-key", env_var="TIDINGS_API_KEY", default="", help="bearer key of the HTTP API")
    add("--source-ips", env_var="LOADTEST_SOURCE_IPS", default="",
        help="comma-separated local addresses to connect from, round robin (ws:// only): each gives"
             " another ~28k ephemeral ports toward one server address")
    # Traffic model.
    add("--channels", env_var="LOADTEST_CHANNELS", type=int, default=200,
        help="number of group channels (group:0 .. group:N-1)")
    add("--channels-per-user", env_var="LOADTEST_CHANNELS_PER_USER", type=int, default=3,
        help="group channels each Subscriber joins besides its personal channel")
    add("--channel-skew", env_var="LOADTEST_CHANNEL_SKEW", type=float, default=0.8,
        help="Zipf exponent of channel popularity: 0 = uniform sizes, 1 = a few big channels")
    add("--ping-interval", env_var="LOADTEST_PING_INTERVAL", type=float, default=10.0,
        help="mean seconds between a Subscriber's pings")
    add("--chat-rate", env_var="LOADTEST_CHAT_RATE", type=float, default=0.5,
        help="publishes per second per ChatPublisher (server limit: 20/s per connection)")
    add("--backend-rate", env_var="LOADTEST_BACKEND_RATE", type=float, default=2.0,
        help="HTTP requests per second per BackendPublisher")
    add("--notify-range", env_var="LOADTEST_NOTIFY_RANGE", type=int, default=100,
        help="BackendPublisher notifies user:lt-sub-0..N-1 when its process runs no Subscriber")
    add("--churn-hold", env_var="LOADTEST_CHURN_HOLD", type=float, default=3.0,
        help="mean seconds a Churn user stays connected before it reconnects")
    add("--mix", env_var="LOADTEST_MIX", default="",
        help="class weights (default Subscriber=40,ChatPublisher=2,BackendPublisher=1,Churn=2)")
    add("--reply-timeout", env_var="LOADTEST_REPLY_TIMEOUT", type=float, default=10.0,
        help="seconds before an unanswered subscribe/ping/publish counts as a failure")
    # Load shape (one shape class dispatches on --load-shape: Locust uses the first shape it finds;
    # Locust itself owns --profile).
    add("--load-shape", env_var="LOADTEST_SHAPE", choices=PROFILES, default="fixed",
        help="fixed (-u/-r/-t), step (find the knee), spike (reconnect storm) or soak")
    add("--step-users", env_var="LOADTEST_STEP_USERS", type=int, default=100, help="users added per step")
    add("--step-time", env_var="LOADTEST_STEP_TIME", type=float, default=15.0, help="seconds per step")
    add("--step-max", env_var="LOADTEST_STEP_MAX", type=int, default=3000,
        help="stop the ramp here even if no limit was crossed")
    add("--p99-limit", env_var="LOADTEST_P99_LIMIT", type=float, default=250.0,
        help="knee: p99 `event` latency (ms) over a step above this")
    add("--fail-limit", env_var="LOADTEST_FAIL_LIMIT", type=float, default=0.01,
        help="knee: failure ratio over a step above this")
    add("--spike-users", env_var="LOADTEST_SPIKE_USERS", type=int, default=1000,
        help="users that connect at once in the spike profile")
    add("--spike-base", env_var="LOADTEST_SPIKE_BASE", type=int, default=50,
        help="users before and after the spike")
    add("--soak-users", env_var="LOADTEST_SOAK_USERS", type=int, default=500, help="users held by the soak")
    add("--soak-time", env_var="LOADTEST_SOAK_TIME", type=float, default=600.0, help="soak seconds")
    add("--window", env_var="LOADTEST_WINDOW", type=float, default=30.0,
        help="seconds per reported window in the soak and fixed profiles")
    add("--tally-file", env_var="LOADTEST_TALLY_FILE", default="",
        help="JSON file for events/gaps/closes and the knee (default: CSV prefix + _tidings.json)")


def parse_mix(spec: str) -> dict[str, int]:
    """`Subscriber=20,Churn=2` -> {"Subscriber": 20, "Churn": 2}; weights are integers >= 0."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        mix[name.strip()] = int(weight)
    return mix


class ChannelPicker:
    """Draws group channels with Zipf(skew) popularity, so channel sizes follow a long tail.

    Subscribers and publishers draw from the same distribution: big channels get more
    subscribers *and* more traffic, as in a chat product where popular rooms are busy.
    """

    def __init__(self, count: int, skew: float, prefix: str = "group:") -> None:
        self.names = [f"{prefix}{i}" for i in range(max(1, count))]
        weights = [1.0 / (rank**skew) for rank in range(1, len(self.names) + 1)]
        self.cumulative = list(itertools.accumulate(weights))

    def one(self) -> str:
        x = random.random() * self.cumulative[-1]
        return self.names[min(bisect.bisect_right(self.cumulative, x), len(self.names) - 1)]

    def distinct(self, k: int) -> list[str]:
        """k different channels (fewer if there are fewer channels)."""
        k = min(k, len(self.names))
        picked: dict[str, None] = {}
        for _ in range(50 * k):  # bounded: with a steep skew the tail is rarely drawn
            if len(picked) == k:
                break
            picked[self.one()] = None
        rest = [n for n in self.names if n not in picked]
        picked.update(dict.fromkeys(random.sample(rest, k - len(picked))))
        return list(picked)

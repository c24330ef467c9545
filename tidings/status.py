"""`tidings status`: the live numbers from /metrics as a small terminal table."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

ROWS = (
    ("connections", "tidings_connections", None),
    ("connections opened", "tidings_connections_opened_total", None),
    ("connections closed", "tidings_connections_closed_total", "code"),
    ("subscriptions", "tidings_subscriptions", None),
    ("channels (hub view)", "tidings_hub_channels", None),
    ("events into the hub", "tidings_hub_events_in_total", None),
    ("events into workers", "tidings_worker_events_in_total", None),
    ("deliveries", "tidings_deliveries_total", None),
    ("commands", "tidings_commands_total", "type"),
    ("rate limited", "tidings_rate_limited_total", None),
    ("auth failures", "tidings_auth_failures_total", "reason"),
    ("slow consumers dropped", "tidings_slow_consumer_drops_total", None),
    ("offset gaps", "tidings_offset_gaps_total", None),
    ("publishes failed", "tidings_publishes_failed_total", None),
)


def format_status(text: str) -> str:
    totals: dict[str, float] = defaultdict(float)
    by_label: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            totals[sample.name] += sample.value
            for _, metric, label in ROWS:
                if sample.name == metric and label and label in sample.labels:
                    by_label[metric][sample.labels[label]] += sample.value
    width = max(len(r[0]) for r in ROWS)
    lines = []
    for title, metric, label in ROWS:
        value = f"{totals.get(metric, 0):,.0f}"
        if label and by_label.get(metric):
            detail = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(by_label[metric].items()))
            value += f"  ({detail})"
        lines.append(f"{title:<{width}}  {value}")
    return "\n".join(lines)

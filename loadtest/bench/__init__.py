"""The tidings benchmark suite: a picows + uvloop load client, a naive baseline server, scenarios.

    python -m loadtest.bench all                  # `make bench`: RESULTS.md + plots (~10-15 min)
    python -m loadtest.bench fanout --subscribers 1000,5000 --via socket,hub
    python -m loadtest.bench chat --chat-connections 2000     # also chat_paced, notify, hub_alone
    python -m loadtest.bench --help

Modules: client (load-client job processes), baseline (the naive picows broadcast server),
servers (start/stop/measure a server tree), procs (/proc readers), scenarios (one run of each
scenario), report (medians, tables, RESULTS.md, plots), hub_alone (the hub by itself, raw
ZeroMQ). Apart from hub_alone, the suite imports nothing from the server except
`hub.Publisher`, the backend API, for the hub publish path; everything else goes over the
public WebSocket protocol.
"""

"""The tidings benchmark suite: a picows + uvloop load client, a naive baseline server, scenarios.

    python -m loadtest.bench all                  # `make bench`: RESULTS.md + plots (~10-15 min)
    python -m loadtest.bench fanout --subscribers 1000,5000 --via socket,hub
    python -m loadtest.bench --help

Modules: client (load-client job processes), baseline (the naive picows broadcast server),
servers (start/stop/measure a server tree), procs (/proc readers), scenarios (one run of each
scenario), report (medians, tables, RESULTS.md, plots). The suite imports nothing from the
server except `hub.Publisher`, the backend API, for the hub publish path.
"""

"""Locust capacity planning for tidings.

The users live in `loadtest/locustfile.py`; this package holds what the locustfile and the
`python -m loadtest` command share: options (`options`), the run-wide counters that cross
from Locust workers to the master (`tally`), the load shapes (`shapes`), the service
launcher and sampler (`server`), the command itself (`run`), the summary (`summary`), the
parameter sweeps behind CAPACITY.md (`sweep`) and the plots (`plots`).
"""

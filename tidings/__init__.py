"""tidings: a real-time event service. `tidings.cli` is the command line; `hub` and `workers` the processes."""

__version__ = "0.1.0"

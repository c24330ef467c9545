"""Reliability runs (T3 hostile tokens, T7-T10 slow readers to slowloris, T20 soak): `python -m loadtest.reliability`.

Each run starts its own `tidings run` on free loopback ports, drives it from this process, stops
every process it started, and prints one JSON line: the figures plus `"pass"` for the criteria
that are not timing. See loadtest/RELIABILITY.md for the commands and the figures measured.
"""

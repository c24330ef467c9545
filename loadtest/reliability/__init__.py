"""Reliability runs of issue 3 (reliability.md T3, T7-T10, T20): `python -m loadtest.reliability NAME`.

Each run starts its own `tidings run` on free loopback ports, drives it from this process, stops
every process it started, and prints one JSON line: the figures plus `"pass"` for the criteria
that are not timing. See loadtest/RELIABILITY.md for the commands and the figures measured.
"""

"""Tests of the Python client library (clients/python)."""

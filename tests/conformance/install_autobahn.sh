#!/usr/bin/env bash
# Install Autobahn|Testsuite (Python 2.7) into .cache/autobahn/site; a no-op when already installed.
# Exit 0: ready; 2: unavailable here (no Python 2.7, no pip for it, or PyPI unreachable); other: failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.conformance.autobahn install

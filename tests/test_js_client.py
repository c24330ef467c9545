"""The JavaScript client's suites (clients/js/test/), each run by Node's own test runner: unit tests
on fakes, tests against a real `tidings run`, and the demo page in a real Chromium.

Node's output is printed (`pytest -s` or `-rP` shows the reconnect delays and spreads it reports)
and makes up the failure message when node fails. A suite whose tests all skipped (no chromium,
say) is a pytest skip with node's reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.service import REPO

JS = REPO / "clients" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")
MIN_NODE = 20  # the client needs nothing newer; the tests use node:test and global fetch
SUITE_TIMEOUT = 180  # seconds per suite; together they take well under a minute here


def _node_major() -> int:
    assert NODE is not None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.strip().lstrip("v").split(".")[0])


@pytest.fixture(scope="module")
def node() -> str:
    if NODE is None:
        pytest.skip("node is not installed: the JavaScript client's tests need Node 20+")
    if _node_major() < MIN_NODE:
        pytest.skip(f"node {_node_major()} is too old: the JavaScript client's tests need Node {MIN_NODE}+")
    if not (JS / "node_modules").is_dir():
        if NPM is None:
            pytest.skip("npm is not installed: cannot install clients/js's devDependencies (ws, playwright-core)")
        done = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True,
                              timeout=SUITE_TIMEOUT)
        if done.returncode != 0:
            pytest.fail(f"npm ci in clients/js failed:\n{done.stdout}\n{done.stderr}")
    return NODE


def run_suite(node: str, name: str) -> None:
    done = subprocess.run([node, "--test", f"test/{name}"], cwd=JS, capture_output=True, text=True,
                          timeout=SUITE_TIMEOUT)
    output = done.stdout + done.stderr
    print(output)
    if done.returncode != 0:
        pytest.fail(f"node --test test/{name} failed ({done.returncode}):\n{output}", pytrace=False)
    ran = re.search(r"^# pass (\d+)", output, re.M)
    skips = re.findall(r"^ok \d+ - .* # SKIP (.*)$", output, re.M)
    if ran and int(ran.group(1)) == 0 and skips:
        pytest.skip(f"{name}: {skips[0]}")


def test_unit(node: str) -> None:
    """Backoff sequence, the policy table per close code, tokens, one socket, refresh, leaks."""
    run_suite(node, "client.test.js")


def test_shard_of_matches_the_shared_vectors(node: str) -> None:
    """shardOf() against clients/shards.json, the vectors hub/shards.py checks too."""
    run_suite(node, "shards.test.js")


def test_against_a_real_server(node: str) -> None:
    """A worker killed and one restarted: resumed without loss; 100 clients spread their redials."""
    run_suite(node, "server.test.js")


def test_demo_page_in_a_real_browser(node: str) -> None:
    """The demo page in headless Chromium; screenshots under .cache/browser-test/."""
    run_suite(node, "browser.test.js")

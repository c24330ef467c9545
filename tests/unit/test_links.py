"""tidings/links.py: LinkWatch (which link a monitor event is about, without a socket), key files,
and the topology `tidings config` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from tidings.cli import topology
from tidings.config import Config, ConfigError
from tidings.links import CurveKeys, LinkWatch, generate

ACCEPTED, UP, GONE = zmq.EVENT_ACCEPTED, zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED
REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH


def peer(fd: int) -> str:
    return f"10.0.0.{fd}:5000"


def test_a_link_up_then_lost_names_its_peer() -> None:
    watch = LinkWatch()
    assert watch.on_event(ACCEPTED, 7, peer) is None
    assert watch.on_event(UP, 0, peer) == ("up", "10.0.0.7:5000")  # libzmq's value is 0 here
    assert watch.linked == {7}
    assert watch.on_event(GONE, 7, peer) == ("lost", "10.0.0.7:5000")
    assert watch.linked == set() and watch.peers == {}


def test_a_refused_handshake_is_never_a_lost_link() -> None:
    watch = LinkWatch()
    watch.on_event(ACCEPTED, 8, peer)
    watch.on_event(ACCEPTED, 9, peer)
    assert watch.on_event(REFUSED, 13, peer) == ("refused", "10.0.0.8:5000")
    assert watch.on_event(UP, 0, peer) == ("up", "10.0.0.9:5000")
    assert watch.on_event(GONE, 8, peer) is None
    assert watch.on_event(GONE, 9, peer) == ("lost", "10.0.0.9:5000")


def test_a_connection_closed_before_its_handshake_leaves_nothing_behind() -> None:
    watch = LinkWatch()
    watch.on_event(ACCEPTED, 5, peer)
    assert watch.on_event(GONE, 5, peer) is None
    watch.on_event(ACCEPTED, 6, peer)
    assert watch.on_event(UP, 0, peer) == ("up", "10.0.0.6:5000")  # not matched to the closed one
    assert watch.waiting == [] and watch.linked == {6}


def test_generate_writes_the_pairs_once_and_admits_its_own_host(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    written = {p.name for p in generate(keys, hub=True)}
    assert {"hub.key", "hub.key_secret", "host.key", "host.key_secret"} <= written
    assert len(list((keys / "authorized").glob("*.key"))) == 1  # this host, admitted from the start
    assert (keys / "hub.key_secret").stat().st_mode & 0o077 == 0
    before = (keys / "hub.key_secret").read_bytes()
    assert generate(keys, hub=True) == []  # never overwritten
    assert (keys / "hub.key_secret").read_bytes() == before
    loaded = CurveKeys.load(keys)
    assert loaded.hub_secret is not None and loaded.host_secret is not None


def test_a_worker_host_without_its_pair_or_the_hub_key_is_told_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no .*hub\.key"):
        CurveKeys.load(tmp_path)
    hub_dir, worker_dir = tmp_path / "hub", tmp_path / "worker"
    generate(hub_dir, hub=True)
    worker_dir.mkdir()
    (worker_dir / "hub.key").write_bytes((hub_dir / "hub.key").read_bytes())
    keys = CurveKeys.load(worker_dir)
    assert keys.hub_secret is None
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        with pytest.raises(ConfigError, match=r"host\.key_secret is missing"):
            keys.make_client(sock)
        with pytest.raises(ConfigError, match=r"hub\.key_secret is missing"):
            keys.make_server(sock)
    finally:
        sock.close(0)


def test_a_rotation_is_a_change_of_the_pair_a_side_uses(tmp_path: Path) -> None:
    generate(tmp_path, hub=True)
    before = CurveKeys.load(tmp_path)
    assert before.reread(server=False) is None and before.reread(server=True) is None  # unchanged: no re-link
    for name in ("host.key", "host.key_secret"):
        (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match=r"host\.key_secret is missing"):
        before.reread(server=False)  # a worker keeps its links rather than drop them for a half-made pair
    generate(tmp_path, hub=False)
    host_rotated = before.reread(server=False)
    assert host_rotated is not None and host_rotated.client_pair != before.client_pair
    assert before.reread(server=True) is None  # the hubs' pair did not change
    for name in ("hub.key", "hub.key_secret"):
        (tmp_path / name).unlink()
    generate(tmp_path, hub=True)
    hub_rotated = before.reread(server=True)
    assert hub_rotated is not None and hub_rotated.server_pair != before.server_pair


def test_topology_says_what_runs_and_where() -> None:
    config = Config.load(environ={"TIDINGS_HUBS": "2", "TIDINGS_ROLE": "workers", "TIDINGS_RUNTIME_DIR": "/r"})
    text = "\n".join(topology(config))
    assert "no hub (the hubs run elsewhere)" in text and "local ipc://" in text
    assert "hub 1: ingress ipc:///r/hub-1/ingress" in text
    insecure = Config.load(environ={"TIDINGS_HUB_INGRESS": "tcp://a:1", "TIDINGS_HUB_INSECURE": "1"})
    assert "WITHOUT encryption" in "\n".join(topology(insecure))

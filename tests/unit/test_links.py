"""tidings/links.py LinkWatch: which link a monitor event is about, without a socket."""

from __future__ import annotations

import zmq

from tidings.links import LinkWatch

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

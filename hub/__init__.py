"""The tidings hub: the ZeroMQ broker process, its wire contract, and the backend publisher."""

from hub.envelope import EnvelopeError, encode_event, topic_for
from hub.publisher import History, HubUnavailable, Position, Publisher

__all__ = ["EnvelopeError", "History", "HubUnavailable", "Position", "Publisher", "encode_event", "topic_for"]

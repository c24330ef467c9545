"""The tidings hub: the ZeroMQ broker process, its wire contract, and the backend publisher."""

from hub.envelope import EnvelopeError, encode_event, topic_for
from hub.publisher import HubUnavailable, Publisher

__all__ = ["EnvelopeError", "HubUnavailable", "Publisher", "encode_event", "topic_for"]

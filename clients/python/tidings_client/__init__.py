"""tidings_client: an asyncio client for tidings that reconnects and resumes without losing events.

    from tidings_client import TidingsClient

    async with TidingsClient("ws://127.0.0.1:8080/ws", get_token=fetch_token) as client:
        sub = await client.subscribe("conversation:c1")
        async for item in sub:
            ...
"""

from tidings_client.client import Subscription, TidingsClient
from tidings_client.errors import ClientClosed, ConnectionLost, ServerError, TidingsError, Unauthorized
from tidings_client.events import Connected, Connecting, Disconnected, Event, Position, Reset
from tidings_client.policy import Action, Plan, Policy

__all__ = [
    "Action",
    "ClientClosed",
    "Connected",
    "Connecting",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "Plan",
    "Policy",
    "Position",
    "Reset",
    "ServerError",
    "Subscription",
    "TidingsClient",
    "TidingsError",
    "Unauthorized",
]

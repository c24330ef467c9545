"""Exceptions raised by the client. Every one derives from TidingsError.

- TidingsError
  - ServerError: the server answered a command with an error; `.code` is the protocol's code
  - Unauthorized: the server refused the token twice in a row, or get_token() raised it;
    the client has stopped
  - ConnectionLost: the connection dropped before the reply came (a publish may have landed)
  - ClientClosed: the client was closed
"""

from __future__ import annotations

__all__ = ["ClientClosed", "ConnectionLost", "ServerError", "TidingsError", "Unauthorized"]


class TidingsError(Exception):
    """Base class of the client's exceptions."""


class ServerError(TidingsError):
    """An `error` reply: `code` is one of invalid_request, unauthorized, subscription_failed,
    internal_error or rate_limited; `retry_after_ms` is set for rate_limited."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class Unauthorized(TidingsError):
    """The token was refused and a fresh one did not help, or get_token() gave up.

    get_token() may raise it to stop the client (the user logged out, say). `close_code` is the
    server's close code when the server refused (4001 or 4002)."""

    code = "unauthorized"

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class ConnectionLost(TidingsError):
    """The connection ended while a command waited for its reply. For a publish this is
    ambiguous: the event may or may not have been published."""


class ClientClosed(TidingsError):
    """The client was closed."""

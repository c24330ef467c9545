"""When each connection's token runs out: a heap the worker's 1 s tick pops, no timer per connection.

Pure: members only need a `closed` attribute. A member that closes stays in the heap until its
time comes (removing from a heap's middle is O(n)); `pop_due` skips it, and the heap is rebuilt
from the open members whenever the closed ones make up most of it, so reconnect churn cannot pile
up dead connections for the length of a token's life.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol

SLACK = 1024  # closed members tolerated beyond as many as there are open ones


class Closable(Protocol):
    closed: bool


class ExpiryQueue:
    def __init__(self, slack: int = SLACK) -> None:
        self.heap: list[tuple[float, int, Any]] = []
        self.order = itertools.count()  # ties on exp never compare the members themselves
        self.slack = slack
        self.open = 0  # members added and not yet reported closed via `forget`

    def add(self, expires_at: float, member: Closable) -> None:
        heapq.heappush(self.heap, (expires_at, next(self.order), member))
        self.open += 1

    def move(self, expires_at: float, member: Closable) -> None:
        """member's token was refreshed: a later entry for it. The old one stays until due and
        the caller skips it there (its member's expiry is no longer due)."""
        heapq.heappush(self.heap, (expires_at, next(self.order), member))

    def forget(self) -> None:
        """A member closed (it stays in the heap until popped or compacted)."""
        self.open -= 1
        if len(self.heap) > 2 * max(self.open, 0) + self.slack:
            self.heap = [entry for entry in self.heap if not entry[2].closed]
            heapq.heapify(self.heap)

    def pop_due(self, now: float) -> list[Any]:
        """Members whose time is up and that are still open, earliest first."""
        due = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            member = heapq.heappop(heap)[2]
            if not member.closed:
                due.append(member)
        return due

    def __len__(self) -> int:
        return len(self.heap)

"""workers/expiry.py: due members in order, closed ones skipped, and no pile-up under churn."""

from __future__ import annotations

from workers.expiry import ExpiryQueue


class Member:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def __repr__(self) -> str:
        return self.name


def test_pop_due_returns_open_members_earliest_first() -> None:
    q = ExpiryQueue()
    late, early, same = Member("late"), Member("early"), Member("same")
    q.add(30.0, late)
    q.add(10.0, early)
    q.add(10.0, same)  # equal times: members are never compared
    assert q.pop_due(9.9) == []
    assert q.pop_due(10.0) == [early, same]
    assert q.pop_due(100.0) == [late]
    assert len(q) == 0


def test_closed_members_are_skipped() -> None:
    q = ExpiryQueue()
    gone, kept = Member("gone"), Member("kept")
    q.add(1.0, gone)
    q.add(2.0, kept)
    gone.closed = True
    q.forget()
    assert q.pop_due(5.0) == [kept]


def test_churn_does_not_pile_up_closed_members() -> None:
    q = ExpiryQueue(slack=10)
    steady = [Member(f"s{i}") for i in range(5)]
    for m in steady:
        q.add(1e9, m)
    for i in range(10_000):  # connect and disconnect, each with a far-off expiry
        m = Member(f"c{i}")
        q.add(1e9, m)
        m.closed = True
        q.forget()
        assert len(q) <= 2 * len(steady) + 10 + 1
    assert sorted(q.pop_due(2e9), key=lambda m: m.name) == steady

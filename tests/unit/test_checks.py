"""Unit tests of the initiator's checks (the room "Around the node"): a check passes only when its work happened.

The bookkeeping of responders that leave while the checks run, on fake sessions
and trio's MockClock: the check that was running fails naming the peer and the
reason, later checks that need the responder are not run, a local check still
runs, a session ending after our 'done' is no failure, and a check that failed a
moment before the session ended is attributed to the departure.
"""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from pangea import DEPARTURE_GRACE_S, CheckFailed, Departure, InitiatorChecks, Scheduler

PEER = "12D3KooWFakeResponderPeerIdForTheChecksTable"


class FakeNode:
    def __init__(self) -> None:
        self.on_session_closed: list[Any] = []


class FakeManager:
    """What InitiatorChecks reads of a Manager for its rows: the fallback count and the scheduler's suspicion."""

    def __init__(self) -> None:
        self.fallbacks = 0
        self.scheduler = Scheduler()


class FakeSession:
    """What InitiatorChecks reads of a PeerSession: id, closed, close_reason, leaving."""

    def __init__(self, node: FakeNode, peer_id: str = PEER) -> None:
        self.node = node
        self.peer_id = peer_id
        self.label = peer_id[-4:]
        self.closed = trio.Event()
        self.close_reason = ""
        self.leaving = False

    def end(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()
        for callback in self.node.on_session_closed:
            callback(self)

    async def bye(self, reason: str = "done") -> None:
        self.leaving = True


def _initiator_checks(node: FakeNode, session: FakeSession) -> InitiatorChecks:
    return InitiatorChecks(cast(Any, node), cast(Any, FakeManager()), [cast(Any, session)], size=2, transfer_bytes=8)


def _checks() -> tuple[InitiatorChecks, FakeSession]:
    node = FakeNode()
    session = FakeSession(node)
    return _initiator_checks(node, session), session


def _run(main: Any) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_checks_departure_fails_the_running_check_and_skips_the_later_ones() -> None:
    checks, session = _checks()

    async def main() -> None:
        async def passes() -> str:
            return "fine"

        async def loses_the_responder() -> str:
            session.end("peer closed the stream")
            return "looked fine"  # what a local fallback would have reported

        await checks._run("connection", passes)
        await checks._run("throughput", loses_the_responder)
        await checks._run("local execution", passes)
        await checks._run("fallback", passes)

    _run(main)
    rows = {r.name: r for r in checks.results}
    assert rows["connection"].ok and rows["connection"].detail == "fine"
    throughput = rows["throughput"]
    assert not throughput.ok
    assert throughput.detail == f"responder {PEER} left during the throughput check: peer closed the stream"
    assert rows["local execution"].ok, rows["local execution"]  # needs no responder
    fallback = rows["fallback"]
    assert not fallback.ok and fallback.detail.startswith("not run: responder "), fallback
    assert "left during the throughput check" in fallback.detail


def test_checks_failure_a_moment_before_the_session_ends_names_the_departure() -> None:
    checks, session = _checks()

    async def main() -> None:
        async def session_ends_later() -> None:
            await trio.sleep(DEPARTURE_GRACE_S / 2)
            session.end("peer said bye (stopped by Ctrl-C or SIGTERM)")

        async def fails() -> str:
            raise CheckFailed("the dot task ran locally, not on the responder")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(session_ends_later)
            await checks._run("delegation", fails)

    _run(main)
    (row,) = checks.results
    assert not row.ok
    assert row.detail == (
        f"responder {PEER} left during the delegation check: peer said bye (stopped by Ctrl-C or SIGTERM); "
        "the dot task ran locally, not on the responder"
    )


def test_checks_session_ending_after_done_is_no_failure() -> None:
    checks, session = _checks()

    async def main() -> None:
        async def says_done() -> str:
            await session.bye("done")
            session.end("peer closed the stream")
            return "the responder left after 'done'"

        await checks._run("fallback", says_done)

    _run(main)
    (row,) = checks.results
    assert row.ok, row
    assert checks.departures[PEER] == Departure(PEER, "fallback", "peer closed the stream", after_done=True)


def test_checks_responder_gone_before_the_checks() -> None:
    node = FakeNode()
    session = FakeSession(node)
    session.end("peer closed the stream")
    checks = _initiator_checks(node, session)

    async def main() -> None:
        async def never() -> str:
            raise AssertionError("a check that needs the responder ran without it")

        await checks._run("connection", never)

    _run(main)
    (row,) = checks.results
    assert not row.ok and row.detail == f"not run: responder {PEER} left before the checks: peer closed the stream"

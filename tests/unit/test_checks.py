"""Unit tests of the initiator's checks (the room "Around the node"): a check passes only when its work happened.

The bookkeeping of responders that leave while the checks run, on fake sessions
and trio's MockClock: the check that was running fails naming the peer and the
reason, later checks that need the responder are not run, a local check still
runs, a session ending after our 'done' is no failure, and a check that failed a
moment before the session ended is attributed to the departure.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any, cast

import numpy as np
import trio
import trio.testing

import pangea
from pangea import DEPARTURE_GRACE_S, CheckFailed, Departure, InitiatorChecks, Scheduler, check_result, run_kernel

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


# ---------------------------------------------------------------- a worker's large O(n) results, checked in slices

SLICE = 4096  # CHECK_SLICE_ELEMENTS in these tests: large results in many slices, still small tests


def checked(kernel: str, operands: list[Any], params: dict[str, float], out: Any) -> tuple[str | None, int]:
    """(check_result's verdict, the bytes it allocated at its peak)."""
    tracemalloc.start()
    try:
        verdict = check_result(kernel, operands, params, (out,), random.Random(7))
        return verdict, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def whole(kernel: str, operands: list[Any], params: dict[str, float], out: Any, monkeypatch: Any) -> str | None:
    """The verdict of the same check in one slice."""
    with monkeypatch.context() as m:
        m.setattr(pangea, "CHECK_SLICE_ELEMENTS", 1 << 40)
        return check_result(kernel, operands, params, (out,), random.Random(7))


def test_check_result_of_a_large_dot_checked_in_slices_accepts_numpy_within_a_fraction_of_the_operands(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(pangea, "CHECK_SLICE_ELEMENTS", SLICE)
    rng = np.random.default_rng(3)
    n = 1 << 18  # 2 MiB of float64 per operand, 64 slices
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    cases: list[tuple[np.ndarray, np.ndarray]] = [
        (a, b),
        (a.astype(np.float32), b),  # cast to float64 a slice at a time, not whole
        (a * 2.0**900, b * 2.0**-950),  # beyond 2**400: scaled, a slice at a time
        ((a + 1j * b).astype(np.complex64), b.astype(np.float32)),
    ]
    for x, y in cases:
        (out,) = run_kernel("dot", [x, y], {})
        verdict, peak = checked("dot", [x, y], {}, out)
        assert verdict is None, (x.dtype, y.dtype, verdict)
        assert peak < min(x.nbytes, y.nbytes) // 4, (x.dtype, y.dtype, peak)


def test_check_result_of_a_large_dot_checked_in_slices_catches_a_lie_as_the_whole_check_does(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(pangea, "CHECK_SLICE_ELEMENTS", SLICE)
    rng = np.random.default_rng(4)
    n = (1 << 17) + 13  # a last slice of 13
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    (out,) = run_kernel("dot", [a, b], {})
    magnitude = np.abs(a) @ np.abs(b)  # the bound is ~2 n eps this: 6e-11 of it
    for lie in (out + magnitude * 1e-9, out - magnitude * 1e-3, np.asarray(np.inf), np.asarray(np.nan)):
        verdict, _ = checked("dot", [a, b], {}, lie)
        assert verdict is not None and verdict.startswith("dot: the result is wrong"), (lie, verdict)
        other = whole("dot", [a, b], {}, lie, monkeypatch)  # numpy's value: summed in another order
        assert other is not None and verdict.split("numpy gives")[0] == other.split("numpy gives")[0]
    a[n - 5] = np.inf  # an inf in the last slice: the sum is inf, a finite answer is a lie
    (out,) = run_kernel("dot", [a, b], {})
    assert checked("dot", [a, b], {}, out)[0] is None
    assert checked("dot", [a, b], {}, np.asarray(1.0))[0] is not None


def test_check_result_of_a_large_elementwise_result_checked_in_slices_still_names_a_wrong_entry(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(pangea, "CHECK_SLICE_ELEMENTS", SLICE)
    rng = np.random.default_rng(5)
    m = rng.standard_normal((300, 700))
    cases: list[tuple[str, list[Any], dict[str, float]]] = [
        ("add", [m, m[::-1].copy()], {}),
        ("subtract", [m, rng.standard_normal((1, 700))], {}),  # broadcast
        ("multiply", [(m + 1j * m).astype(np.complex64), m[:1].astype(np.complex64)], {}),
        ("scale", [m.astype(np.float32)], {"factor": 2.5}),
        ("transpose", [m], {}),
        ("add", [rng.integers(-9, 9, (4, 8, 5000)), np.int64(4) * np.ones((5000,), np.int64)], {}),  # rows > a slice
    ]
    for kernel, operands, params in cases:
        (out,) = run_kernel(kernel, operands, params)
        verdict, peak = checked(kernel, operands, params, out)
        assert verdict is None, (kernel, verdict)
        assert peak < out.nbytes // 4, (kernel, peak, out.nbytes)
        lie = out.copy()
        flat = lie.reshape(-1)
        for where in (flat.size - 1, flat.size // 2 + 1, 3 * SLICE + 17):  # three wrong entries, in other slices
            flat[where] += 1
        verdict, _ = checked(kernel, operands, params, lie)
        first = tuple(int(i) for i in np.unravel_index(3 * SLICE + 17, out.shape))
        assert verdict is not None and verdict.startswith(f"{kernel}: the result is wrong at {list(first)} ("), verdict
        assert verdict.endswith("; 3 wrong entries)"), verdict
        assert verdict == whole(kernel, operands, params, lie, monkeypatch)
        shape_lie = out.reshape(-1)
        assert (
            checked(kernel, operands, params, shape_lie)[0]
            == f"{kernel}: result shape {shape_lie.shape}, expected {out.shape}"
        )

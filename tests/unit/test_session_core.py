"""Unit tests of the session protocol (pure): `SessionProtocol`, `check_hello` and friends.

h11-style: two cores joined back to back (`Pair`: what one emits as `Transmit` is
encoded, fed to the other's Decoder, whose gate is the other core, and the
decoded message is handed to that core), events fed by hand, and a fake clock
(plain floats passed as ``now``) for the ping and idle timeouts. No sockets, no
trio. The same behaviours over real connections are in tests/integration
(test_security.py, test_hostile.py, test_data_plane.py).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytest

from pangea import (
    NEED_DATA,
    PROTOCOL_VERSION,
    ByeMsg,
    CancelMsg,
    DataPlaneMsg,
    Decoder,
    EndSession,
    ErrorKind,
    ErrorMsg,
    HelloMsg,
    Limits,
    LocalPeer,
    Log,
    MemoryBudget,
    MessageError,
    NoteLoad,
    PeerError,
    PeerFellBack,
    PingMsg,
    PongMsg,
    RemoteProtocolError,
    Resolve,
    RunTask,
    SessionAction,
    SessionProtocol,
    StopTask,
    TaskRequestMsg,
    TaskResultMsg,
    Transmit,
    __version__,
    check_hello,
    encode,
    peer_refusal,
    vouch_candidate,
)

A_ID = "12D3KooWAY9d6xPMZsVgaPbmtvHRcsUjXwSwPRx1knZ3BEDGq9gG"  # the dialer
B_ID = "12D3KooWBikNkNG44AaUML5AXV5ox6yAFZ8xcJ2ZGDPAuvQp6n13"  # the acceptor
STREAM = "stream"  # the channel key both sides use (the adapter passes its Channel objects)


class Waiter:
    """What the adapter's trio.Event is to the core: something `Resolve` names."""

    def __init__(self) -> None:
        self.woken = 0

    def set(self) -> None:
        self.woken += 1


def core(me: str, peer: str, *, budget: MemoryBudget | None = None, trusted: bool = True, **limits: Any) -> Any:
    lim = Limits(**limits)
    return SessionProtocol(
        me,
        peer,
        limits=lim,
        budget=budget if budget is not None else MemoryBudget(lim.memory_budget_bytes),
        may_serve=lambda: trusted,
        rng=random.Random(1),
    )


class Pair:
    """Two session cores back to back: ``a`` dialed ``b``; one channel between them."""

    def __init__(self, a: SessionProtocol, b: SessionProtocol) -> None:
        self.a, self.b = a, b
        self.decoders = {id(a): self._decoder(a), id(b): self._decoder(b)}
        self.now = 0.0

    @staticmethod
    def _decoder(side: SessionProtocol) -> Decoder:
        decoder = Decoder(side.limits.max_payload_bytes, limits=side.limits)
        decoder.gate = side.gate(STREAM)
        return decoder

    def deliver(self, to: SessionProtocol, msg: Any, load: int = 0) -> list[SessionAction]:
        """Put ``msg`` on the wire to ``to``; return what ``to`` decides (its decoder's refusals included)."""
        decoder = self.decoders[id(to)]
        decoder.feed(encode(msg))
        actions: list[SessionAction] = []
        while True:
            try:
                got = decoder.next()
            except MessageError as exc:
                actions += to.bad_message(exc, STREAM)
                continue
            if got is NEED_DATA:
                return actions
            actions += to.receive(got, STREAM, self.now, load)

    def request(self, operands: tuple[np.ndarray, ...] = (np.ones(4),)) -> tuple[Any, list[SessionAction]]:
        """``a`` sends a task to ``b``; return a's pending request and b's actions."""
        pending = self.a.start_request(STREAM, Waiter())
        return pending, self.deliver(self.b, TaskRequestMsg(pending.task_id, "sum", operands))

    def answer(self, task_id: int, result: TaskResultMsg | None = None) -> list[SessionAction]:
        """``b`` ran task ``task_id``: its result goes back to ``a``; return a's actions."""
        assert self.b.reserve_output(task_id, 8) is None
        self.b.task_ran(task_id, ok=True)
        assert self.b.answer_to(task_id, stopped=False)
        actions = self.deliver(self.a, result or TaskResultMsg(task_id, (np.ones(1),)))
        self.b.task_done(task_id)
        return actions


def pair(**b_limits: Any) -> Pair:
    return Pair(core(A_ID, B_ID), core(B_ID, A_ID, **b_limits))


def kinds(actions: list[SessionAction]) -> list[str]:
    return [type(action).__name__ for action in actions]


# ---------------------------------------------------------------- the Hello check


LOCAL = LocalPeer(B_ID, "serve", instance_id=1, host_id=b"box-b")


def hello(**changes: Any) -> HelloMsg:
    fields: dict[str, Any] = dict(
        pangea_version=__version__,
        protocol_version=PROTOCOL_VERSION,
        kernels=("sum",),
        role="initiate",
        instance_id=2,
        host_id=b"box-a",
    )
    fields.update(changes)
    return HelloMsg(**fields)


def nowhere() -> str:
    raise AssertionError("where() is asked only for a duplicate's text")


def test_check_hello_accepts_a_compatible_peer_without_asking_where_it_is() -> None:
    assert check_hello(LOCAL, A_ID, hello(), None, nowhere) is None
    assert check_hello(LOCAL, A_ID, hello(), hello(), nowhere) is None  # the same process again


def test_check_hello_refuses_another_protocol_as_incompatible_with_a_hint() -> None:
    verdict = check_hello(LOCAL, A_ID, hello(protocol_version=PROTOCOL_VERSION + 1), None, nowhere)
    assert verdict is not None and verdict.kind == ErrorKind.INCOMPATIBLE
    assert verdict.message.startswith("pangea protocol mismatch") and A_ID in verdict.message
    assert verdict.hint == "use the same pangea.pyz on both machines"


def test_check_hello_own_peer_id_from_this_machine_is_identity_in_use() -> None:
    verdict = check_hello(LOCAL, B_ID, hello(host_id=b"box-b"), None, nowhere)
    assert verdict is not None and verdict.kind == ErrorKind.IDENTITY_IN_USE and verdict.hint is None
    assert "PANGEA_HOME" in verdict.message


def test_check_hello_own_peer_id_from_another_machine_is_a_copied_home() -> None:
    for host_id in (b"box-a", b""):  # a machine that does not say counts as another one
        verdict = check_hello(LOCAL, B_ID, hello(host_id=host_id), None, nowhere)
        assert verdict is not None and verdict.kind == ErrorKind.DUPLICATE_IDENTITY
        assert "delete identity.key" in verdict.message


def test_check_hello_own_peer_id_of_this_very_process_is_no_duplicate() -> None:
    assert check_hello(LOCAL, B_ID, hello(instance_id=LOCAL.instance_id), None, nowhere) is None


def test_check_hello_a_second_process_of_a_connected_peer() -> None:
    current = hello(instance_id=7, role="respond")
    same_machine = check_hello(LOCAL, A_ID, hello(), current, nowhere)
    assert same_machine is not None and same_machine.kind == ErrorKind.IDENTITY_IN_USE
    assert "(respond)" in same_machine.message
    elsewhere = check_hello(LOCAL, A_ID, hello(host_id=b"box-c"), current, lambda: "/ip4/10.0.0.9/tcp/7777")
    assert elsewhere is not None and elsewhere.kind == ErrorKind.DUPLICATE_IDENTITY
    assert "(/ip4/10.0.0.9/tcp/7777)" in elsewhere.message


def test_check_hello_verdict_is_the_error_message_the_peer_gets() -> None:
    verdict = check_hello(LOCAL, B_ID, hello(), None, nowhere)
    assert verdict is not None and verdict.to_msg() == ErrorMsg(verdict.kind, verdict.message)


def test_peer_refusal_keeps_the_known_kinds_with_their_hints_and_calls_the_rest_refused() -> None:
    for kind in (ErrorKind.INCOMPATIBLE, ErrorKind.DUPLICATE_IDENTITY, ErrorKind.IDENTITY_IN_USE):
        verdict = peer_refusal(B_ID, ErrorMsg(str(kind), "no"))
        assert verdict.kind == kind and verdict.hint
        assert verdict.message == f"cannot work with {B_ID}: it refused the session: no"
    other = peer_refusal(B_ID, ErrorMsg("not-trusted-here", "go away"))
    assert (other.kind, other.hint) == (ErrorKind.REFUSED, None)


def test_vouch_candidate_only_for_our_own_or_a_trusted_home() -> None:
    home = "12D3KooWEmuc4TGtskBSh2ht5eo5tucorVuJikCN7vtDGWEE6V71"
    signed = hello(home_id=home, home_proof=b"sig")
    assert vouch_candidate(B_ID, A_ID, signed, lambda peer_id: peer_id == home) == home
    assert vouch_candidate(B_ID, A_ID, signed, lambda peer_id: False) is None
    assert vouch_candidate(home, A_ID, signed, lambda peer_id: False) == home  # our own home
    assert vouch_candidate(B_ID, A_ID, hello(home_id=home), lambda peer_id: True) is None  # no proof
    assert vouch_candidate(B_ID, home, signed, lambda peer_id: True) is None  # vouching for itself


# ---------------------------------------------------------------- admission


def test_a_request_is_admitted_run_and_answered_with_its_bytes_held_until_then() -> None:
    p = pair()
    pending, actions = p.request((np.ones(4),))
    assert kinds(actions) == ["RunTask"]
    run = actions[0]
    assert isinstance(run, RunTask) and run.request.task_id == pending.task_id and run.key == STREAM
    assert p.b.held_tasks == 1 and p.b.budget.in_use == 32
    answered = p.answer(pending.task_id)
    assert answered == [Resolve(pending.waiter)] and pending.result is not None and pending.result.ok
    assert p.b.held_tasks == 0 and p.b.budget.in_use == 0 and p.b.tasks_served == 1
    assert p.a.finish_request(pending) == []  # answered: no Cancel


def test_admission_refuses_a_peer_the_node_does_not_serve() -> None:
    p = Pair(core(A_ID, B_ID), core(B_ID, A_ID, trusted=False))
    pending, actions = p.request()
    (refusal,) = actions
    assert isinstance(refusal, Transmit) and isinstance(refusal.msg, TaskResultMsg)
    assert refusal.msg.error_kind == ErrorKind.REFUSED and A_ID in refusal.msg.error_message
    assert p.b.tasks_refused == 1 and p.b.budget.in_use == 0
    assert p.deliver(p.a, refusal.msg) == [Resolve(pending.waiter)]
    assert pending.result is not None and pending.result.error_kind == ErrorKind.REFUSED


def test_admission_refuses_a_task_id_already_in_flight() -> None:
    p = pair()
    p.request()
    actions = p.deliver(p.b, TaskRequestMsg(1, "sum", (np.ones(4),)))
    assert kinds(actions) == ["Transmit", "Log"]  # a bad-input refusal is logged as a bad message too
    refusal = actions[0]
    assert isinstance(refusal, Transmit) and isinstance(refusal.msg, TaskResultMsg)
    assert (refusal.msg.error_kind, refusal.msg.error_message) == ("bad-input", "task id 1 is already in flight")
    assert p.b.held_tasks == 1 and p.b.budget.in_use == 32  # the first one's bytes, once


def test_admission_limits_tasks_bytes_and_the_shared_budget_with_busy() -> None:
    p = pair(max_inflight_tasks=1)
    p.request()
    _, actions = p.request()
    assert isinstance(actions[0], Transmit) and "limit 1" in actions[0].msg.error_message  # type: ignore[union-attr]
    p = pair(max_inflight_bytes=40)
    p.request((np.ones(4),))
    _, actions = p.request((np.ones(2),))
    assert isinstance(actions[0], Transmit) and "exceeds" in actions[0].msg.error_message  # type: ignore[union-attr]
    budget = MemoryBudget(40)
    assert budget.try_acquire(20)  # another peer's task
    p = Pair(core(A_ID, B_ID), core(B_ID, A_ID, budget=budget))
    _, actions = p.request((np.ones(4),))
    assert isinstance(actions[0], Transmit) and "memory budget" in actions[0].msg.error_message  # type: ignore[union-attr]
    assert budget.in_use == 20 and p.b.tasks_refused == 1


def test_a_result_nobody_waits_for_is_skipped_and_logged() -> None:
    p = pair()
    actions = p.deliver(p.a, TaskResultMsg(99, (np.ones(4),)))
    (note,) = actions
    assert isinstance(note, Log) and note.level == logging.INFO and "nobody is waiting" in note.text
    assert p.a.receive(TaskResultMsg(98), STREAM, 0.0, 0)[0] == Log(
        logging.INFO, f"dropping late result of task 98 from {p.a.label}"
    )


def test_an_admitted_request_with_bad_contents_gives_its_bytes_back_and_is_answered() -> None:
    p = pair()
    exc = MessageError("array 0: runs past the end of the payload", task_id=5)
    assert p.b.admit_request(5, 64, STREAM) is None and p.b.budget.in_use == 64
    actions = p.b.bad_message(exc, STREAM)
    assert kinds(actions) == ["Transmit", "Log"] and p.b.budget.in_use == 0 and p.b.held_tasks == 0
    assert kinds(p.b.bad_message(exc, STREAM)) == ["Transmit", "Log"]  # again: answered, nothing released twice
    assert p.b.budget.in_use == 0


# ---------------------------------------------------------------- giving up, cancelling


def test_a_request_given_up_sends_a_cancel_that_stops_the_task_once() -> None:
    p = pair()
    pending, _ = p.request()
    (cancel,) = p.a.finish_request(pending)
    assert cancel == Transmit(CancelMsg(pending.task_id))
    assert p.deliver(p.b, cancel.msg) == [StopTask(pending.task_id, by_sender=True)]
    assert p.deliver(p.b, cancel.msg) == []  # a second Cancel changes nothing
    assert p.b.tasks_cancelled == 1
    assert not p.b.answer_to(pending.task_id, stopped=True)  # nobody wants the result
    p.b.task_done(pending.task_id)
    assert p.b.budget.in_use == 0 and p.b.held_tasks == 0
    assert p.deliver(p.b, cancel.msg) == []  # the task is over


def test_a_cancel_for_an_unknown_task_is_ignored() -> None:
    assert pair().b.receive(CancelMsg(4), STREAM, 0.0, 0) == []


def test_no_cancel_once_the_session_is_closed() -> None:
    p = pair()
    pending, _ = p.request()
    p.a.close("bye")
    assert p.a.finish_request(pending) == []


# ---------------------------------------------------------------- ping and the idle timeout (fake clock)


def test_a_heartbeat_pings_and_the_pong_gives_the_rtt() -> None:
    p = pair()
    (ping,) = p.a.tick(now=10.0, last_byte_at=8.0, load=3)
    assert isinstance(ping, Transmit) and isinstance(ping.msg, PingMsg) and ping.msg.load == 3
    actions = p.deliver(p.b, ping.msg, load=2)
    assert actions == [NoteLoad(3), Transmit(PongMsg(ping.msg.nonce, 2), STREAM)]
    assert p.b.peer_load == 3
    p.now = 10.25
    pong = actions[1]
    assert isinstance(pong, Transmit)
    assert p.deliver(p.a, pong.msg) == [NoteLoad(2), Resolve(None)]
    assert p.a.rtt_s == 0.25 and p.a.peer_load == 2
    assert p.deliver(p.a, pong.msg) == [NoteLoad(2)]  # a pong again: no new rtt
    assert p.a.rtt_s == 0.25


def test_an_explicit_ping_wakes_its_waiter_and_is_forgotten() -> None:
    a = core(A_ID, B_ID)
    waiter = Waiter()
    nonce = a.ping_sent(5.0, waiter)
    assert a.receive(PongMsg(nonce), STREAM, 5.5, 0) == [NoteLoad(0), Resolve(waiter)]
    other = a.ping_sent(6.0, Waiter())
    a.forget_ping(other)
    assert a.receive(PongMsg(other), STREAM, 7.0, 0) == [NoteLoad(0)] and a.rtt_s == 0.5


def test_the_idle_timeout_is_measured_from_the_last_byte() -> None:
    a = core(A_ID, B_ID, idle_timeout_s=30.0)
    assert isinstance(a.tick(now=130.0, last_byte_at=100.0, load=0)[0], Transmit)  # exactly 30 s: alive
    (end,) = a.tick(now=131.0, last_byte_at=100.0, load=0)
    assert end == EndSession("nothing received for 31 s (peer gone or network down)", reset=True)


# ---------------------------------------------------------------- what ends a session


def test_bye_and_error_end_the_session_and_hello_does_not_belong() -> None:
    b = core(B_ID, A_ID)
    assert b.receive(ByeMsg("done"), STREAM, 0.0, 0) == [EndSession("peer said bye (done)")]
    assert b.bye_reason == "done"
    actions = b.receive(ErrorMsg("protocol", "bad"), STREAM, 0.0, 0)
    assert kinds(actions) == ["Log", "EndSession"] and "protocol: bad" in actions[1].reason
    with pytest.raises(RemoteProtocolError, match="unexpected HelloMsg"):
        b.receive(hello(), STREAM, 0.0, 0)


def test_a_data_plane_failure_of_the_peer_falls_back() -> None:
    b = core(B_ID, A_ID)
    assert b.receive(DataPlaneMsg(True), STREAM, 0.0, 0) == []
    (fell,) = b.receive(DataPlaneMsg(False, "port blocked"), STREAM, 0.0, 0)
    assert fell == PeerFellBack("the peer could not use our data plane: port blocked")


def test_close_fails_every_request_wakes_pings_and_refuses_new_requests() -> None:
    p = pair()
    first, _ = p.request()
    second, _ = p.request()
    ping = Waiter()
    p.a.ping_sent(1.0, ping)
    actions = p.a.close("the test ends it")
    assert actions == [Resolve(first.waiter), Resolve(second.waiter), Resolve(ping)]
    for pending in (first, second):
        assert isinstance(pending.error, PeerError) and pending.error.kind == ErrorKind.DISCONNECTED
        assert "went away: the test ends it" in str(pending.error)
    assert p.a.close("again") == [] and p.a.close_reason == "the test ends it"
    with pytest.raises(PeerError, match="not connected") as info:
        p.a.start_request(STREAM, Waiter())
    assert info.value.kind == ErrorKind.UNAVAILABLE


def test_a_lost_channel_fails_its_requests_and_stops_the_tasks_that_came_on_it() -> None:
    p = pair()
    on_data = p.a.start_request("data", Waiter())
    on_stream, _ = p.request()
    p.b.admit_request(3, 8, "data")
    p.b.receive(TaskRequestMsg(3, "sum"), "data", 0.0, 0)
    assert p.a.channel_lost("data", "reset") == [Resolve(on_data.waiter)]
    assert isinstance(on_data.error, PeerError) and "broke: reset" in str(on_data.error)
    assert p.a.awaits_result(on_stream.task_id) and not p.a.awaits_result(on_data.task_id)
    assert p.b.channel_lost("data", "reset") == [StopTask(3, by_sender=False)]
    assert p.b.receive(CancelMsg(3), STREAM, 0.0, 0) == []  # stopped already: not counted as the sender's
    assert p.b.tasks_cancelled == 0


# ---------------------------------------------------------------- reservations: given back exactly once


def shared_budget() -> MemoryBudget:
    budget = MemoryBudget(1000)
    assert budget.try_acquire(100)  # another peer's task: a second release would eat into it
    return budget


def test_reservation_released_once_when_answered() -> None:
    budget = shared_budget()
    b = core(B_ID, A_ID, budget=budget)
    assert b.admit_request(1, 50, STREAM) is None
    b.receive(TaskRequestMsg(1, "sum"), STREAM, 0.0, 0)
    assert b.reserve_output(1, 30) is None and budget.in_use == 180
    assert b.answer_to(1, stopped=False) and budget.in_use == 130  # operands first, before the write
    b.task_done(1)
    b.task_done(1)
    b.release(1)
    assert budget.in_use == 100


def test_reservation_released_once_when_the_output_does_not_fit() -> None:
    budget = shared_budget()
    b = core(B_ID, A_ID, budget=budget)
    b.admit_request(1, 50, STREAM)
    b.receive(TaskRequestMsg(1, "sum"), STREAM, 0.0, 0)
    refusal = b.reserve_output(1, 10_000)
    assert refusal is not None and refusal.kind == ErrorKind.BUSY and "result would not fit" in refusal.message
    assert budget.in_use == 100
    b.task_done(1)
    assert budget.in_use == 100


def test_reservation_released_once_when_cancelled() -> None:
    budget = shared_budget()
    b = core(B_ID, A_ID, budget=budget)
    b.admit_request(1, 50, STREAM)
    b.receive(TaskRequestMsg(1, "sum"), STREAM, 0.0, 0)
    b.reserve_output(1, 30)
    assert b.receive(CancelMsg(1), STREAM, 0.0, 0) == [StopTask(1, by_sender=True)]
    assert not b.answer_to(1, stopped=True)
    b.task_done(1)
    b.task_done(1)
    assert budget.in_use == 100


def test_reservation_released_once_when_closed_mid_frame_or_while_serving() -> None:
    budget = shared_budget()
    b = core(B_ID, A_ID, budget=budget)
    assert b.admit_request(1, 50, STREAM) is None  # its frame is still arriving
    b.admit_request(2, 20, "data")
    b.receive(TaskRequestMsg(2, "sum"), "data", 0.0, 0)  # being served
    b.close("gone")
    assert budget.in_use == 120  # the cut-off frame's bytes are back; the served task still holds its own
    assert not b.answer_to(2, stopped=False)  # closed: nobody wants the result
    b.task_done(2)
    b.close("again")
    b.channel_lost(STREAM, "gone")
    assert budget.in_use == 100 and b.held_tasks == 0


def test_reservation_released_once_when_the_channel_is_lost_mid_frame() -> None:
    budget = shared_budget()
    b = core(B_ID, A_ID, budget=budget)
    b.admit_request(1, 50, "data")
    b.channel_lost("data", "reset")
    b.channel_lost("data", "reset")
    b.close("gone")
    assert budget.in_use == 100 and b.held_tasks == 0

"""Arrays a worker holds for a peer session: the wire fields (TaskRequest.keep, ArrayMeta.held,
Release) round-trip, and the worker's book of them (HeldArrays) resolves, refuses and releases."""

from __future__ import annotations

import numpy as np
import pytest

import pangea
from pangea import Decoder, HeldArrays, MemoryBudget, ReleaseMsg, TaskError, TaskRequestMsg, encode


def round_trip(msg: object) -> object:
    decoder = Decoder()
    decoder.feed(encode(msg))  # type: ignore[arg-type]
    return decoder.next()


def test_a_task_naming_a_held_operand_sends_only_the_others_bytes() -> None:
    a, b = np.arange(12.0).reshape(3, 4), np.ones((4, 5))
    plain = encode(TaskRequestMsg(1, "matmul", (a, b), {}))
    named = encode(TaskRequestMsg(1, "matmul", (a, b), {}, held=(0, 7)))
    assert len(plain) - len(named) >= b.nbytes - 16  # b's bytes stay home
    got = round_trip(TaskRequestMsg(1, "matmul", (a, b), {}, held=(0, 7), keep=9))
    assert isinstance(got, TaskRequestMsg)
    assert got.held == (0, 7) and got.keep == 9
    np.testing.assert_array_equal(got.operands[0], a)
    assert got.operands[1].shape == b.shape and got.operands[1].dtype == b.dtype  # a stand-in for b


def test_a_task_can_send_an_operand_and_have_it_kept() -> None:
    a, b = np.arange(12.0).reshape(3, 4), np.ones((4, 5))
    got = round_trip(TaskRequestMsg(1, "matmul", (a, b), {}, store=(0, 11)))
    assert isinstance(got, TaskRequestMsg) and got.store == (0, 11) and got.held == ()
    np.testing.assert_array_equal(got.operands[1], b)  # its bytes came along


def test_a_task_without_held_operands_decodes_as_before() -> None:
    got = round_trip(TaskRequestMsg(3, "add", (np.ones(3), np.ones(3)), {}))
    assert isinstance(got, TaskRequestMsg) and got.held == () and got.keep == 0 and got.store == ()


def test_release_round_trips() -> None:
    assert round_trip(ReleaseMsg((1, 2, 2**63))) == ReleaseMsg((1, 2, 2**63))


def test_held_arrays_resolve_refuse_and_release() -> None:
    budget = MemoryBudget(1000)
    held = HeldArrays(budget, limit=2)
    b = np.ones(50)  # 400 bytes
    held.keep(5, b)
    assert budget.in_use == 400 and held.nbytes == 400
    req = TaskRequestMsg(1, "add", (np.zeros(50), np.broadcast_to(np.zeros(()), (50,))), {}, held=(0, 5))
    operands = held.operands(req)
    assert operands[1] is held.arrays[5] and not operands[1].flags.writeable
    with pytest.raises(TaskError, match="held already"):
        held.keep(5, b)
    with pytest.raises(TaskError) as over:
        held.keep(6, np.ones(100))  # 800 more
    assert over.value.kind == "busy" and "memory budget" in str(over.value)
    unknown = TaskRequestMsg(2, "add", req.operands, {}, held=(0, 99))
    with pytest.raises(TaskError, match="does not hold for you") as missing:
        held.operands(unknown)
    assert missing.value.kind == "bad-input"
    wrong = TaskRequestMsg(2, "add", (np.zeros(50), np.broadcast_to(np.zeros(()), (7,))), {}, held=(0, 5))
    with pytest.raises(TaskError, match="declares"):
        held.operands(wrong)
    held.keep(6, np.ones(10))
    with pytest.raises(TaskError, match="its limit per session"):
        held.keep(7, np.ones(1))
    held.release((5, 6, 123))
    assert budget.in_use == 0 and held.arrays == {}


def test_a_kept_view_is_copied_out_of_the_buffer_it_came_in() -> None:
    buffer = np.arange(10.0)
    held = HeldArrays(MemoryBudget(1 << 20))
    held.keep(1, buffer[2:6])
    buffer[:] = -1
    np.testing.assert_array_equal(held.arrays[1], [2.0, 3.0, 4.0, 5.0])


def test_the_session_protocol_turns_a_release_into_an_action() -> None:
    limits = pangea.Limits()
    protocol = pangea.SessionProtocol("me", "peer", limits=limits, budget=MemoryBudget(1 << 20), may_serve=lambda: True)
    actions = protocol.receive(ReleaseMsg((4,)), object(), 0.0, 0)
    assert actions == [pangea.ReleaseHeld((4,))]

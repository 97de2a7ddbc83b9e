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


def test_a_result_kept_by_its_worker_carries_dtypes_and_shapes_but_no_bytes() -> None:
    outputs = (np.ones((300, 200)), np.arange(5, dtype=np.int32))
    sent = encode(pangea.TaskResultMsg(4, outputs, compute_s=0.5, kept=11))
    assert len(sent) < 4096  # 480 KB of outputs stay on the worker
    got = round_trip(pangea.TaskResultMsg(4, outputs, compute_s=0.5, kept=11))
    assert isinstance(got, pangea.TaskResultMsg) and got.kept == 11 and got.ok
    assert [(o.dtype, o.shape) for o in got.outputs] == [(np.float64, (300, 200)), (np.int32, (5,))]
    plain = round_trip(pangea.TaskResultMsg(4, outputs))
    assert isinstance(plain, pangea.TaskResultMsg) and plain.kept == 0
    np.testing.assert_array_equal(plain.outputs[0], outputs[0])


def test_a_worker_keeps_all_outputs_of_a_task_or_none() -> None:
    budget = MemoryBudget(10_000)
    held = HeldArrays(budget)
    held.keep_all(5, (np.zeros(100), np.zeros(100)))  # 1600 bytes under 5 and 6
    assert set(held.arrays) == {5, 6} and budget.in_use == 1600
    with pytest.raises(TaskError):
        held.keep_all(7, (np.zeros(100), np.zeros(2000)))  # the second does not fit: neither is kept
    assert set(held.arrays) == {5, 6} and budget.in_use == 1600
    held.release((5, 6))
    assert budget.in_use == 0


@pytest.mark.parametrize(
    ("placement", "held_on", "usable", "keep", "expected"),
    [
        ("auto", {}, ["w1"], False, ""),  # nothing held on a worker: the usual way
        ("auto", {"w1": 100, "w2": 900}, ["w1", "w2"], False, "w2"),  # the most bytes spared
        ("remote", {"w1": 100, "w2": 900}, ["w1", "w2"], False, "w2"),
        ("auto", {"w1": 100, "w2": 900}, ["w1"], False, ""),  # the holder is suspect or gone
        ("local", {"w1": 100}, ["w1"], True, ""),  # asked here: brought here
        ("split", {"w1": 100}, ["w1"], False, ""),
        ("w1", {}, ["w1"], True, "w1"),  # a put on w1, a result kept there
        ("w1", {}, ["w1"], False, ""),  # named, holding nothing, keeping nothing: the usual way
        ("w2", {"w1": 100}, ["w1", "w2"], False, ""),  # named elsewhere: w1's operand brought here, sent
        ("w3", {}, ["w1"], True, ""),  # not usable: the usual way says why
    ],
)
def test_a_task_runs_where_its_operands_are_held(
    placement: str, held_on: dict[str, int], usable: list[str], keep: bool, expected: str
) -> None:
    assert pangea.holder_for(placement, held_on, usable, keep=keep) == expected


def test_a_lineage_keeps_the_small_arrays_sent_with_its_task_and_names_held_ones() -> None:
    kept = pangea.KeptArrays(MemoryBudget(1 << 20))
    held = kept.keep(np.ones(4))
    small, large = np.arange(3.0), np.zeros(pangea.LINEAGE_INLINE_MAX_BYTES // 8 + 1)
    made = pangea.Lineage.of("add", {"x": 1}, (held, small, large), 0)
    assert made.inputs[0] == held.key and made.inputs[2] is None
    kept_small = made.inputs[1]
    assert isinstance(kept_small, np.ndarray) and not kept_small.flags.writeable
    small[0] = 99.0  # the client's array changes: the lineage's copy does not
    assert kept_small[0] == 0.0
    assert pangea.Lineage.of("copy", {}, (large,)).put and not made.put


def test_a_rebuilt_array_is_charged_here_and_an_array_released_meanwhile_is_not() -> None:
    budget = MemoryBudget(1 << 20)
    kept = pangea.KeptArrays(budget)
    told: list[int] = []
    kept.on_release = lambda entry: told.append(entry.held_id)
    stand_in = np.broadcast_to(np.zeros(()), (10, 10))
    remote = kept.hold_remote("w1", None, 42, stand_in, lineage="the result of add on w1")
    assert budget.in_use == 0 and kept.held_elsewhere == {"w1": 800} and kept.held_bytes == 0
    kept.settle(remote, np.ones((10, 10)), "local")
    assert remote.holder == pangea.LOCAL and budget.in_use == 800 and kept.held_bytes == 800
    gone = kept.hold_remote("w1", None, 43, stand_in)
    kept.release(gone.key)
    assert told == [43]  # the worker is told
    kept.settle(gone, np.ones((10, 10)), "local")  # a rebuild that ended after the release
    assert budget.in_use == 800 and kept.find(gone.key) is None
    kept.release(remote.key)
    assert budget.in_use == 0 and told == [43]  # held here: nothing to tell a worker

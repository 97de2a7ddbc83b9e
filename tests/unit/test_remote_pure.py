"""The pure parts of remote arrays: shapes and indices decided before a task is sent, and the
node's book of kept arrays (its budget, its count, release)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pangea
from pangea import BadInputError, KeptArrays, MemoryBudget, TaskError


@pytest.mark.parametrize(
    ("a", "b"),
    [((3, 4), (4, 5)), ((4,), (4, 2)), ((2, 4), (4,)), ((4,), (4,)), ((7, 3, 4), (4, 2)), ((2, 1, 3, 4), (5, 4, 6))],
)
def test_matmul_shapes_are_numpys(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    assert pangea._matmul_shapes(a, b) == np.matmul(np.zeros(a), np.zeros(b)).shape


@pytest.mark.parametrize(("a", "b"), [((3, 4), (3, 4)), ((4,), (3,)), ((2, 3, 4), (3, 4, 2))])
def test_matmul_shapes_that_do_not_fit_raise_numpys_value_error(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as numpy_says:
        np.matmul(np.zeros(a), np.zeros(b))
    with pytest.raises(ValueError) as ours:
        pangea._matmul_shapes(a, b)
    assert str(ours.value) == str(numpy_says.value)


@pytest.mark.parametrize(
    "key",
    [
        (slice(1, 3), slice(None, None, 2)),
        1,
        -1,
        (Ellipsis, 2),
        (slice(None), slice(-3, None)),
        slice(5, 1, -1),
        (0, slice(1, 2), 3),
        slice(10, 20),
    ],
)
def test_slice_params_select_what_numpy_selects(key: object) -> None:
    a = np.arange(6 * 5 * 4).reshape(6, 5, 4)
    params, dropped = pangea._slice_params(key, a.shape)
    part = a[tuple(slice(b, e, s) for b, e, s in zip(params["start"], params["stop"], params["step"], strict=True))]
    shape = tuple(d for i, d in enumerate(part.shape) if i not in dropped)
    np.testing.assert_array_equal(part.reshape(shape), a[key])  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ((1, 2, 3, 4), "too many indices"),
        (9, "index 9 is out of bounds for axis 0 with size 6"),
        (([1, 2],), "takes ranges and integers"),
        ((Ellipsis, Ellipsis), "single ellipsis"),
    ],
)
def test_slice_params_refuse_what_is_not_a_range_in_numpys_words(key: object, words: str) -> None:
    with pytest.raises(IndexError, match=words):
        pangea._slice_params(key, (6, 5, 4))


def test_kept_arrays_are_charged_to_the_budget_until_released() -> None:
    budget = MemoryBudget(1000)
    kept = KeptArrays(budget)
    first = kept.keep(np.zeros(50), lineage="the result of add")  # 400 bytes
    assert (budget.in_use, kept.held_bytes, kept.held_arrays) == (400, 400, 1)
    assert first.array is not None and not first.array.flags.writeable  # tasks share it: nobody writes it
    with pytest.raises(TaskError) as refused:
        kept.keep(np.zeros(100))  # 800 more: over the 1000
    assert refused.value.kind == "busy" and "memory budget" in str(refused.value)
    assert kept.held_arrays == 1 and budget.in_use == 400  # nothing held for the refused one
    with pytest.raises(TaskError) as never:
        kept.keep(np.zeros(200))  # 1600: never fits
    assert never.value.kind == "bad-input" and "can never fit" in str(never.value)
    kept.release(first.key)
    kept.release(first.key)  # twice: nothing more
    assert (budget.in_use, kept.held_bytes, kept.held_arrays) == (0, 0, 0)
    assert kept.find(first.key) is None


def test_kept_arrays_are_bounded_in_count() -> None:
    kept = KeptArrays(MemoryBudget(1 << 20), limit=3)
    keys = [kept.keep(np.zeros(1)).key for _ in range(3)]
    with pytest.raises(TaskError, match="holds 3 arrays for its clients"):
        kept.keep(np.zeros(1))
    kept.release(keys[0])
    kept.keep(np.zeros(1))
    assert kept.held_arrays == 3


def test_a_kept_view_is_copied_so_the_memory_under_it_may_go() -> None:
    base = np.arange(20.0)
    view = base[::2]
    kept = KeptArrays(MemoryBudget(1 << 20)).keep(view)
    base[:] = -1  # the memory the view was over changes (a client's segment, a pooled buffer)
    assert kept.array is not None
    np.testing.assert_array_equal(kept.array, np.arange(0.0, 20.0, 2))
    assert kept.array.flags.c_contiguous and kept.array.flags.owndata


def test_kept_arrays_are_safe_from_several_threads() -> None:
    budget = MemoryBudget(1 << 30)
    kept = KeptArrays(budget, limit=10_000)

    def churn() -> None:
        for _ in range(500):
            kept.release(kept.keep(np.zeros(8)).key)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (budget.in_use, kept.held_arrays) == (0, 0)


def test_a_bad_input_error_is_a_value_error_and_a_task_error() -> None:
    error = pangea.task_error("matmul: shapes (2, 3) and (4, 5) do not match", "bad-input")
    assert isinstance(error, BadInputError) and isinstance(error, ValueError) and isinstance(error, TaskError)
    assert error.kind == "bad-input"
    other = pangea.task_error("no worker", "unavailable")
    assert not isinstance(other, ValueError) and other.kind == "unavailable"


def test_a_failure_says_what_failed_once_and_where_it_was_tried_more_than_once() -> None:
    bad = "matmul: shapes (3, 4) and (3, 4) do not match (4 != 3)"
    assert pangea.failure_text("matmul", bad, [("local", "bad-input")]) == bad  # no "after 1 attempt(s)"
    assert pangea.failure_text("add", "out of memory", [("12D3abc", "error")]) == "add failed: out of memory"
    remote = "matmul on 12D3KooW…RM25: shapes (3, 4) and (3, 4) do not match (4 != 3)"  # a worker's answer
    assert pangea.failure_text("matmul", remote, [("12D3KooW…RM25", "bad-input")]) == remote
    assert pangea.failure_text("add", "no worker", []) == "cannot run add: no worker"
    tried = [("12D3abc", "lost"), ("local", "error")]
    assert pangea.failure_text("add", "out of memory", tried) == (
        "add failed after 2 attempts: out of memory [12D3abc: lost; local: error]"
    )


def test_held_operands_do_not_count_as_bytes_sent() -> None:
    big = np.broadcast_to(np.zeros(()), (1 << 20,))  # 8 MiB declared, a held operand's stand-in
    small = np.zeros(10)
    # in the message: over a 4 MiB limit when it travels, within it when it is held
    assert pangea.client_size_refusal("add", [big, small], {}, 4 << 20, 4 << 20, 0) is not None
    assert pangea.client_size_refusal("add", [big, small], {}, 4 << 20, 4 << 20, 0, held=[1, 0]) is None

"""Splitting a task by rows: which operands are cut (`row_split`), and the split itself on this node."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio

from pangea import LOCAL, ErrorKind, Manager, TaskError, row_split, run_kernel


@pytest.mark.parametrize(
    ("kernel", "shapes", "expected"),
    [
        ("add", [(8, 3), (3,)], (8, (True, False))),  # a row vector broadcast along the rows: whole
        ("add", [(8, 1), (1, 5)], (8, (True, False))),  # one row broadcast: whole
        ("add", [(8, 3), (8, 3)], (8, (True, True))),
        ("where", [(6,), (6,), ()], (6, (True, True, False))),  # a scalar is whole
        ("exp", [(5, 2, 2)], (5, (True,))),
        ("matmul", [(4, 3, 2), (2, 5)], (4, (True, False))),  # a stack times one matrix: by the stack
        ("matmul", [(4, 3, 2), (4, 2, 5)], (4, (True, True))),
        ("matmul", [(3, 2), (2, 5)], None),  # 2-D: split_matmul's own way
        ("add", [(1, 3), (3,)], None),  # one row: nothing to split
        ("add", [(), ()], None),
        ("svd", [(8, 8)], None),  # its rows are not the result's rows
        ("sum", [(8, 8)], None),
    ],
)
def test_row_split_says_which_operands_are_cut_into_rows(
    kernel: str, shapes: list[tuple[int, ...]], expected: Any
) -> None:
    assert row_split(kernel, shapes) == expected


async def execute_local(kernel: str, operands: Any, params: Any, **_: Any) -> tuple[tuple[np.ndarray, ...], float]:
    return run_kernel(kernel, operands, params), 0.0


def local_manager() -> Manager:
    """A manager of a node without peers: every block runs here."""
    node = SimpleNamespace(
        on_session=[], on_session_closed=[], on_peer_load=[], gflops=0.0, sessions={}, execute_local=execute_local
    )
    return Manager(node)  # type: ignore[arg-type]


def split_here(kernel: str, operands: list[np.ndarray], params: dict[str, Any] | None = None) -> Any:
    """``kernel`` split by rows over this node alone, in blocks of one to a few rows."""
    split = row_split(kernel, [o.shape for o in operands])
    assert split is not None

    async def main() -> Any:
        manager = local_manager()
        return await manager.split_rows(kernel, operands, params or {}, split[1], workers=[LOCAL], blocks_per_worker=5)

    return trio.run(main)


def test_a_split_element_wise_task_is_numpys_result_gathered_in_order() -> None:
    rng = np.random.default_rng(3)
    x, row = rng.standard_normal((23, 7)), rng.standard_normal(7)
    out = split_here("add", [x, row])
    np.testing.assert_array_equal(out.result, x + row)
    assert out.shares[LOCAL].rows == 23 and out.shares[LOCAL].blocks == 5
    cond = (rng.random((23, 7)) > 0.5).astype(np.int32)
    np.testing.assert_array_equal(split_here("where", [cond, x, np.zeros(())]).result, np.where(cond, x, 0.0))
    clipped = split_here("clip", [x], {"a_min": -0.5, "a_max": 0.5}).result
    np.testing.assert_array_equal(clipped, np.clip(x, -0.5, 0.5))
    ints = rng.integers(-5, 5, (11, 3), dtype=np.int32)
    got = split_here("power", [ints, np.full((), 2, np.int32)]).result
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ints**2)


def test_a_split_batched_matmul_is_numpys_result() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((9, 4, 3)), rng.standard_normal((3, 5))
    np.testing.assert_allclose(split_here("matmul", [a, b]).result, a @ b, rtol=1e-12)
    c = rng.standard_normal((9, 3, 2)) + 1j * rng.standard_normal((9, 3, 2))
    got = split_here("matmul", [a, c]).result
    assert got.dtype == np.complex128
    np.testing.assert_allclose(got, a @ c, rtol=1e-12)


def test_a_split_on_shapes_that_do_not_fit_is_refused_before_any_block() -> None:
    async def main() -> None:
        manager = local_manager()
        with pytest.raises(TaskError) as info:
            await manager.split_rows("add", [np.ones((8, 3)), np.ones((8, 4))], {}, (True, True), workers=[LOCAL])
        assert info.value.kind == ErrorKind.BAD_INPUT
        assert str(info.value) == "add: shapes (8, 3) and (8, 4) do not match"  # the operands' shapes
        assert manager.tasks_done == 0

    trio.run(main)

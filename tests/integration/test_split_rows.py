"""Element-wise kernels and batched matmuls split by rows over real workers.

Real `serve` processes from the built pyz on 127.0.0.1: a node A (the one the `Client`
talks to) dialling two workers. Placement ``split-remote`` cuts the operands with as many
rows as the result into blocks the workers pull; an operand broadcast along the rows is
whole in every block and, from 64 KiB, crosses to each worker once (A's byte counters
show it); the result is numpy's, gathered in order; shapes that do not fit are numpy's
ValueError before any block runs; a kernel that does not split by rows is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyz_helpers import ServeNode, client_of, cluster

from pangea import BadInputError, TaskError

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture(scope="module")
def nodes(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeNode, list[ServeNode]]]:
    with cluster(pyz, tmp_path_factory.mktemp("split-rows")) as (a, workers):
        yield a, workers


@pytest.fixture
def node(nodes: tuple[ServeNode, list[ServeNode]], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with client_of(nodes[0], monkeypatch) as c:
        yield c


def rows_by_worker(task: dict[str, Any]) -> dict[str, int]:
    """worker -> rows, from a split task's attempts ("ok: R rows in B blocks, busy P%")."""
    return {a["worker"]: int(a["outcome"].split()[1]) for a in task["attempts"]}


def moved(c: Any, before: dict[str, Any]) -> int:
    after = c.status()
    return int(after["bytes_in"] + after["bytes_out"] - before["bytes_in"] - before["bytes_out"])


def test_an_element_wise_task_splits_by_rows_over_both_workers(
    node: Any, nodes: tuple[ServeNode, list[ServeNode]]
) -> None:
    rng = np.random.default_rng(1)
    x, row = rng.standard_normal((4000, 300)), rng.standard_normal(300)
    got = node.submit("add", x, row, placement="split-remote")
    task = node.last_task
    np.testing.assert_array_equal(got, x + row)  # exact: each block is numpy's add on its rows
    assert task["ran_on"] == "split", task
    shares = rows_by_worker(task)
    assert set(shares) == {w.peer_id for w in nodes[1]}, task["attempts"]  # split-remote: the workers only
    assert sum(shares.values()) == 4000, task["attempts"]  # every row once


def test_a_batched_matmul_splits_by_its_stack_and_its_whole_operand_crosses_once_per_worker(node: Any) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((16, 32, 512)), rng.standard_normal((512, 512))  # 2 MiB each
    before = node.status()
    got = node.submit("matmul", a, b, placement="split-remote")
    used = moved(node, before)
    task = node.last_task
    np.testing.assert_allclose(got, a @ b, rtol=1e-10, atol=1e-10)
    blocks = sum(int(at["outcome"].split()[4]) for at in task["attempts"])
    assert sum(rows_by_worker(task).values()) == 16 and blocks >= 4, task["attempts"]
    # a's rows out and the result back once; b once to each of the two workers, not with every block
    assert used < a.nbytes + got.nbytes + 2 * b.nbytes + MIB, (used, blocks)
    assert used < a.nbytes + got.nbytes + blocks * b.nbytes, (used, blocks)


def test_split_runs_where_clip_and_power_on_this_node_and_the_workers(node: Any) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 64))
    cond = (rng.random((3000, 64)) > 0.5).astype(np.int32)
    np.testing.assert_array_equal(node.submit("where", cond, x, np.zeros(()), placement="split"), np.where(cond, x, 0))
    assert node.last_task["ran_on"] == "split"
    clipped = node.submit("clip", x, a_min=-0.5, a_max=0.5, placement="split")
    np.testing.assert_array_equal(clipped, np.clip(x, -0.5, 0.5))
    ints = rng.integers(-9, 9, (3000, 64), dtype=np.int64)
    cubed = node.submit("power", ints, np.full((), 3, np.int64), placement="split")
    assert cubed.dtype == np.int64
    np.testing.assert_array_equal(cubed, ints**3)


def test_a_split_that_cannot_be_done_is_refused_in_one_line(node: Any) -> None:
    with pytest.raises(BadInputError) as mismatch:
        node.submit("add", np.ones((100, 3)), np.ones((100, 4)), placement="split-remote")
    assert "(100, 3) and (100, 4)" in str(mismatch.value), mismatch.value
    with pytest.raises(TaskError) as svd:
        node.submit("svd", np.ones((100, 100)), placement="split")
    assert "svd cannot be split" in str(svd.value) and "use placement 'auto'" in str(svd.value), svd.value
    one_row = node.submit("add", np.ones((1, 3)), np.ones(3), placement="split")  # one block: an ordinary task
    np.testing.assert_array_equal(one_row, np.full((1, 3), 2.0))
    empty = node.submit("add", np.ones((0, 3)), np.ones(3), placement="split-remote")
    assert empty.shape == (0, 3)
    after = node.submit("add", np.ones((4, 3)), np.ones(3), placement="split")  # the node goes on
    np.testing.assert_array_equal(after, np.full((4, 3), 2.0))

"""The RPC limits follow a node's memory budget, and the Client refuses what cannot fit before sending.

A `serve` node from the built pangea.pyz with the default limits takes a 1 GiB
operand from a `pangea.Client` made with no options (a real transfer, ~10-30 s
on this machine); one with ``--memory-budget-mib 64`` announces a message
limit of half that plus room at login, serves what fits, and never sees what
does not: the Client refuses it first (the node's refused-task counter and its
peak memory stay where they were, and the same connection keeps serving).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_node_home
from pyz_helpers import ServeNode, start_serve

import pangea
from pangea import Client, RpcError, TaskError

BUDGET_MIB = 64
MIB = 1 << 20


def peak_kib(node: ServeNode) -> int:
    """The node's peak resident memory so far (VmHWM, KiB)."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{node.proc.pid}/status").read_text(), re.M)
    assert match
    return int(match.group(1))


@pytest.fixture
def default_node(pyz: Path, tmp_path: Path) -> Iterator[ServeNode]:
    node = start_serve(pyz, make_node_home(tmp_path), name="serve", ready_timeout=60)
    try:
        yield node
    finally:
        node.proc.stop()


@pytest.fixture
def small_node(pyz: Path, tmp_path: Path) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path)
    node = start_serve(pyz, home, "--memory-budget-mib", str(BUDGET_MIB), name="serve-64", ready_timeout=60)
    try:
        yield node
    finally:
        node.proc.stop()


def test_client_sends_a_1_gib_operand_to_a_node_with_the_default_limits(default_node: ServeNode) -> None:
    node = default_node
    big = np.ones((8192, 16384))  # 1 GiB of float64
    assert big.nbytes == 1 << 30
    with Client(node.rpc, token=node.token, timeout_s=300) as rpc:  # no size option
        assert rpc.node_max_message_bytes == pangea.rpc_max_bytes_for_budget(pangea.DEFAULT_MEMORY_BUDGET_BYTES)
        out = rpc.submit("sum", big, placement="local", axis=0.0)
        task = rpc.last_task
    np.testing.assert_array_equal(out, np.full(16384, 8192.0))
    print(f"1 GiB operand: {task['timings']['client_total_s']:.1f} s through the client")


def test_node_limits_follow_its_budget_and_the_client_refuses_before_sending(small_node: ServeNode) -> None:
    node = small_node
    with Client(node.rpc, token=node.token, timeout_s=60) as rpc:
        assert rpc.node_memory_budget_bytes == BUDGET_MIB * MIB
        assert rpc.node_max_message_bytes == pangea.rpc_max_bytes_for_budget(BUDGET_MIB * MIB) < BUDGET_MIB * MIB
        fits = np.arange(512 * 1024.0).reshape(512, 1024)  # 4 MiB: 24 MiB held with its operand and output
        np.testing.assert_array_equal(rpc.submit("add", fits, fits, placement="local"), fits + fits)
        before = (rpc.status(), peak_kib(node))
        big = np.zeros((2048, 2048))  # 32 MiB each: 64 MiB, over the node's message limit of 48 MiB
        with pytest.raises(RpcError) as over_message:
            rpc.submit("add", big, big, placement="local")
        text = str(over_message.value)
        assert "exceed the RPC message limit of 48.0 MiB (the node)" in text and "nothing was sent" in text, text
        assert "--memory-budget-mib" in (over_message.value.hint or "")
        with pytest.raises(TaskError) as over_budget:  # 24 MiB fits a message; twice, with its output, not the budget
            rpc.future("scale", big[:1536], placement="local", factor=2.0)
        assert over_budget.value.kind == "bad-input"
        assert f"can never fit the node's memory budget of {BUDGET_MIB}.0 MiB" in str(over_budget.value)
        after = (rpc.status(), peak_kib(node))
        # the node saw neither request: nothing refused there, no memory for them, the connection serves on
        assert after[0]["rpc_tasks_refused"] == before[0]["rpc_tasks_refused"] == 0
        assert after[0]["tasks_done"] == before[0]["tasks_done"]
        assert after[1] - before[1] < 16 * 1024, (before[1], after[1])
        np.testing.assert_array_equal(rpc.submit("add", fits, fits, placement="local"), fits + fits)

"""The RPC limits follow a node's memory budget, and the Client refuses what cannot fit before sending.

A `serve` node from the built pangea.pyz with the default limits takes a 1 GiB
operand from a `pangea.Client` made with no options (a real transfer, ~10-30 s
on this machine); one with ``--memory-budget-mib 64`` announces a message
limit of half that plus room at login, serves what fits, and never sees what
does not: the Client refuses it first (the node's refused-task counter and its
peak memory stay where they were, and the same connection keeps serving).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_node_home, wait_until
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


PATHS = ["shared-memory", "in-message"]


def client_on(node: ServeNode, monkeypatch: pytest.MonkeyPatch, path: str, **kwargs: object) -> Client:
    """A Client of ``node`` from the node's home, on the shared-memory path or with the arrays in the messages."""
    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home))
    client = Client(node.rpc, token=node.token, timeout_s=120, shared_memory=path == "shared-memory", **kwargs)  # type: ignore[arg-type]
    assert client.shared_memory == (path == "shared-memory"), client.shared_memory_note
    return client


def used_bytes(rpc: Client) -> int:
    """The bytes of the node's memory budget its tasks hold now."""
    return int(rpc.status()["memory_budget_used_bytes"])


@pytest.fixture
def roomy_node(pyz: Path, tmp_path: Path) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path)
    node = start_serve(pyz, home, "--memory-budget-mib", "1024", name="serve-1024", ready_timeout=60)
    try:
        yield node
    finally:
        node.proc.stop()


@pytest.mark.parametrize("path", PATHS)
def test_a_cancelled_call_gives_back_what_it_held_of_the_budget(
    roomy_node: ServeNode, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    node = roomy_node
    a = np.random.default_rng(1).standard_normal((3000, 3000))  # a matmul of a second or more here
    with client_on(node, monkeypatch, path) as rpc, client_on(node, monkeypatch, path) as watcher:
        for round_ in range(2):  # the second round starts while the first kernel may still run
            future = rpc.future("matmul", a, a, placement="local")
            charged = lambda f=future: used_bytes(watcher) > 0 or f.done()  # noqa: E731
            wait_until(charged, 60, f"round {round_}: the matmul is charged")
            assert not future.done(), "the matmul ended before it could be cancelled: make it larger"
            assert future.cancel()
            # what the call held comes back at once, though its kernel cannot be stopped mid-way
            wait_until(lambda: used_bytes(watcher) == 0, 30, f"round {round_}: the cancelled call gives its share back")
        small = np.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(rpc.submit("add", small, small, placement="local"), small + small)
        assert used_bytes(watcher) == 0


@pytest.fixture
def small_message_node(pyz: Path, tmp_path: Path) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path)
    node = start_serve(
        pyz, home, "--memory-budget-mib", str(BUDGET_MIB), "--rpc-max-mib", "4", name="serve-4", ready_timeout=60
    )
    try:
        yield node
    finally:
        node.proc.stop()


def test_a_shared_memory_operand_is_held_to_the_budget_not_the_message_limit(
    small_message_node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = small_message_node
    a = np.random.default_rng(2).standard_normal((1024, 1024))  # 8 MiB: twice the message limit
    with client_on(node, monkeypatch, "shared-memory") as rpc:
        assert rpc.node_max_message_bytes == 4 * MIB
        out = rpc.submit("scale", a, placement="local", factor=3.0)  # an 8 MiB result, copied off the RPC loop
        np.testing.assert_array_equal(out, a * 3.0)
        assert rpc.last_task["arrays_via"] == "shared memory, result: shared memory"
        small = a[:256]  # 2 MiB, a result of the size copied by a worker thread
        np.testing.assert_array_equal(rpc.submit("scale", small, placement="local", factor=-1.0), -small)
        with pytest.raises(TaskError) as over_budget:  # the budget still holds on this path, before sending
            rpc.submit("add", np.zeros((2048, 2048)), np.zeros((2048, 2048)), placement="local")
        assert over_budget.value.kind == "bad-input" and "nothing was sent" in str(over_budget.value)
    with client_on(node, monkeypatch, "in-message") as rpc:
        with pytest.raises(RpcError) as over_message:
            rpc.submit("scale", a, placement="local", factor=3.0)
        assert "exceed the RPC message limit of 4.0 MiB (the node)" in str(over_message.value)
        assert "nothing was sent" in str(over_message.value)
        assert rpc.status()["rpc_tasks_refused"] == 0


MIXED_CLIENT = """
import json, sys
import numpy as np
import pangea
address, token, shared, calls, seed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(seed)
big = rng.standard_normal((768, 768))
counts = {"right": 0, "wrong": 0, "busy_big": 0, "refused_small": 0, "other": []}
with pangea.Client(address, token=token, timeout_s=120, shared_memory=shared) as c:
    assert c.shared_memory == shared, c.shared_memory_note
    for i in range(calls):
        is_big = i % 4 == 0
        a = big if is_big else rng.standard_normal((4, 4))
        want = a @ a if is_big else a + a
        try:
            out = c.submit("matmul", a, a, placement="local") if is_big else c.submit("add", a, a, placement="local")
        except pangea.TaskError as exc:
            if exc.kind == "busy" and is_big:
                counts["busy_big"] += 1
            elif exc.kind == "busy":
                counts["refused_small"] += 1
            else:
                counts["other"].append(str(exc))
            continue
        counts["right" if np.allclose(out, want) else "wrong"] += 1
print(json.dumps(counts), flush=True)
"""


def test_clients_in_separate_processes_get_their_answers_within_the_budget(
    small_node: ServeNode, tmp_path: Path
) -> None:
    node = small_node
    script = tmp_path / "mixed_client.py"
    script.write_text(MIXED_CLIENT)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PANGEA_HOME": str(node.home.pangea_home), "PYTHONPATH": repo}
    with Client(node.rpc, token=node.token, timeout_s=60) as watcher:
        before = watcher.status()
        children = [
            subprocess.Popen(
                [sys.executable, str(script), node.rpc, node.token or "", shared, "100", str(seed)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed, shared in enumerate(["1", "1", "0"])
        ]
        results = []
        try:
            for child in children:
                out, err = child.communicate(timeout=240)
                assert child.returncode == 0, err
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
        after = watcher.status()
    assert all(r["wrong"] == 0 and r["refused_small"] == 0 and not r["other"] for r in results), results
    assert all(r["right"] + r["busy_big"] == 100 for r in results), results
    assert all(r["right"] >= 75 for r in results), results  # every small task, and some big ones
    refused = sum(r["busy_big"] for r in results)
    assert after["rpc_tasks_refused"] - before["rpc_tasks_refused"] == refused
    assert after["memory_budget_used_bytes"] == 0

"""`pangea.Client` from many threads, its futures and `map`, against real `serve` nodes.

A pair from the built pangea.pyz on 127.0.0.1 (A ``--peer B``, B ``--allow-peer A``)
serves the module: 8 threads x 200 mixed calls on one Client (each caller gets
its own answers and its own task information, per thread and per future),
``concurrent.futures.as_completed``/``wait`` over the Client's futures, `map`'s
order and its bound on tasks in flight. A second pair, whose worker B stalls
before each task (``--fault slow=60``), shows that cancelling a future cancels
its task on the worker: B counts it cancelled by its sender.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import Proc, wait_until
from pyz_helpers import Pair, ServeNode, live_pair, running_pair

import pangea
from pangea import Client, TaskError, TaskFuture

CLIENT_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0
THREADS = 8
CALLS_PER_THREAD = 200


@pytest.fixture(scope="module")
def module_pair(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with running_pair(pyz, tmp_path_factory.mktemp("futures-pair")) as pair:
        yield pair


@pytest.fixture
def pair(module_pair: Pair) -> Pair:
    return live_pair(module_pair)


def client(node: ServeNode) -> Client:
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S)


def operands(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two small matrices whose shapes and values tell the caller apart."""
    rng = np.random.default_rng(seed)
    n = 2 + seed % 7
    return rng.standard_normal((n, n + 1)), rng.standard_normal((n + 1, n))


# ---------------------------------------------------------------- threads


def test_client_threads_each_get_their_own_answers_and_task_information(pair: Pair) -> None:
    failures: list[str] = []
    placements = ("local", "remote", "auto")

    def caller(t: int, rpc: Client) -> None:
        for i in range(CALLS_PER_THREAD):
            seed = t * 1000 + i
            a, b = operands(seed)
            placement = placements[(t + i) % 3]
            which = i % 4
            if which == 0:  # blocking matmul: its thread's last_task
                got = rpc.submit("matmul", a, b, placement=placement)
                want, task = a @ b, rpc.last_task
            elif which == 1:  # a future: its own task
                future = rpc.future("sum", a, placement=placement, axis=float(seed % 2))
                got, want, task = future.result(CLIENT_TIMEOUT_S), a.sum(axis=seed % 2), future.task
                if rpc.last_task.get("kernel") != "matmul":  # the future leaves last_task alone
                    failures.append(f"thread {t} call {i}: last_task changed by a future: {rpc.last_task}")
            elif which == 2:  # scale, blocking, with a parameter that tells the call apart
                got = rpc.submit("scale", a, placement=placement, factor=float(seed))
                want, task = a * seed, rpc.last_task
            else:  # a task that fails: its error and its task information are its own
                with pytest.raises(TaskError) as refused:
                    rpc.submit("matmul", a, a, placement="local")  # (n, n+1) @ (n, n+1): shapes do not fit
                got, want, task = None, None, rpc.last_task
                if refused.value.kind != "bad-input" or task.get("error_kind") != "bad-input":
                    failures.append(f"thread {t} call {i}: {refused.value.kind} {task}")
            kernel = ("matmul", "sum", "scale", "matmul")[which]
            if want is not None and not (got is not None and got.shape == want.shape and np.allclose(got, want)):
                failures.append(f"thread {t} call {i}: wrong answer for {kernel} {a.shape}")
            if task.get("kernel") != kernel:
                failures.append(f"thread {t} call {i}: task information of another call: {task}")
            if which != 3 and placement == "remote" and task.get("ran_on") != pair.b.peer_id:
                failures.append(f"thread {t} call {i}: remote ran on {task.get('ran_on')!r}")
            if which != 3 and placement == "local" and task.get("ran_on") != "local":
                failures.append(f"thread {t} call {i}: local ran on {task.get('ran_on')!r}")
            if which != 3 and not task["timings"]["client_total_s"] >= task["timings"]["total_s"] >= 0:
                failures.append(f"thread {t} call {i}: timings {task['timings']}")

    with client(pair.a) as rpc:
        threads = [threading.Thread(target=caller, args=(t, rpc)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not any(thread.is_alive() for thread in threads)
        assert rpc.last_task == {}  # this thread made no call
        assert rpc.status()["peer_id"] == pair.a.peer_id
    assert failures == [], failures[:10]


def test_remote_result_says_the_node_verified_it_and_a_local_one_does_not(pair: Pair) -> None:
    a, b = operands(5)
    with client(pair.a) as rpc:
        remote = rpc.future("matmul", a, b, placement="remote")
        local = rpc.future("matmul", a, b, placement="local")
        concurrent.futures.wait([remote, local], timeout=CLIENT_TIMEOUT_S)
    assert remote.task["verified_by_node"] is True and remote.task["ran_on"] == pair.b.peer_id
    assert local.task["verified_by_node"] is False and local.task["ran_on"] == "local"
    assert set(remote.task["timings"]) >= {"client_total_s", "rpc_s", "compute_s", "total_s"}


# ---------------------------------------------------------------- futures and map


def test_futures_work_with_as_completed_and_wait(pair: Pair) -> None:
    jobs = [operands(seed) for seed in range(24)]
    with client(pair.a) as rpc:
        futures: dict[concurrent.futures.Future[Any], int] = {
            rpc.future("matmul", a, b, placement=("local", "remote")[i % 2]): i for i, (a, b) in enumerate(jobs)
        }
        assert all(isinstance(f, concurrent.futures.Future) and isinstance(f, TaskFuture) for f in futures)
        seen = []
        for future in concurrent.futures.as_completed(futures, timeout=CLIENT_TIMEOUT_S):
            i = futures[future]
            a, b = jobs[i]
            np.testing.assert_allclose(future.result(), a @ b)
            seen.append(i)
        assert sorted(seen) == list(range(len(jobs)))
        bad = rpc.future("matmul", jobs[0][0], jobs[0][0], placement="local")
        done, pending = concurrent.futures.wait([bad], timeout=CLIENT_TIMEOUT_S)
        assert done == {bad} and not pending
        assert isinstance(bad.exception(), TaskError) and bad.task["error_kind"] == "bad-input"
        called = threading.Event()
        last = rpc.future("transpose", jobs[1][0])
        last.add_done_callback(lambda _: called.set())
        np.testing.assert_array_equal(last.result(CLIENT_TIMEOUT_S), jobs[1][0].T)
        assert called.wait(10)


def test_map_returns_results_in_order_with_a_bounded_number_in_flight(pair: Pair) -> None:
    pulled: list[int] = []
    jobs = [operands(seed) for seed in range(40)]

    def items() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, job in enumerate(jobs):
            pulled.append(i)
            yield job

    with client(pair.a) as rpc:
        results = rpc.map("matmul", items(), in_flight=4, placement="auto")
        assert len(pulled) == 4  # started before the first next(), no more than in_flight
        for i, out in enumerate(results):
            a, b = jobs[i]
            np.testing.assert_allclose(out, a @ b)
            assert len(pulled) <= i + 1 + 4
            assert rpc.last_task["kernel"] == "matmul"
        assert len(pulled) == len(jobs)
        single = list(rpc.map("transpose", (a for a, _ in jobs[:3])))  # one array per item
        assert [s.shape for s in single] == [a.T.shape for a, _ in jobs[:3]]
        with pytest.raises(pangea.UsageError):
            rpc.map("matmul", [], in_flight=0)


def test_map_raises_the_first_failure_and_cancels_the_rest(pair: Pair) -> None:
    a, b = operands(3)
    with client(pair.a) as rpc:
        results = rpc.map("matmul", [(a, b), (a, a), (a, b), (a, b)], in_flight=2, placement="local")
        np.testing.assert_allclose(next(results), a @ b)
        with pytest.raises(TaskError):
            next(results)
        assert rpc.status()["tasks_in_flight"] == 0 or wait_in_flight_zero(rpc)


def wait_in_flight_zero(rpc: Client) -> bool:
    wait_until(lambda: rpc.status()["tasks_in_flight"] == 0, 30, "A has no task in flight")
    return True


# ---------------------------------------------------------------- cancellation


@pytest.fixture(scope="module")
def slow_pair(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A pair whose worker B stalls 60 s before each task."""
    with running_pair(pyz, tmp_path_factory.mktemp("slow-pair"), "--fault", "slow=60") as pair:
        Proc.started.extend([pair.a.proc, pair.b.proc])
        yield pair


def counters(node: ServeNode) -> dict[str, Any]:
    with client(node) as rpc:
        return rpc.status()


def test_cancelled_future_cancels_its_task_on_the_worker(slow_pair: Pair) -> None:
    pair = slow_pair
    before = counters(pair.b)["tasks_cancelled"]
    a, b = operands(1)
    with client(pair.a) as rpc:
        future = rpc.future("matmul", a, b, placement="remote", fallback=False)
        wait_until(lambda: rpc.status()["tasks_in_flight"] == 1, 30, "A sends the task to B")
        time.sleep(1.0)  # the request crosses to B, which stalls in front of it
        assert not future.done()
        assert future.cancel() and future.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(1)
        wait_until(lambda: counters(pair.b)["tasks_cancelled"] == before + 1, 30, "B counts the task cancelled")
        wait_until(lambda: rpc.status()["tasks_in_flight"] == 0, 30, "A has no task in flight")
        assert rpc.status()["peer_id"] == pair.a.peer_id  # the connection stays usable
        assert not future.cancel() or future.cancelled()


def test_a_finished_future_cannot_be_cancelled(pair: Pair) -> None:
    a, b = operands(2)
    with client(pair.a) as rpc:
        future = rpc.future("matmul", a, b, placement="local")
        np.testing.assert_allclose(future.result(CLIENT_TIMEOUT_S), a @ b)
        assert not future.cancel() and not future.cancelled()


def test_closing_the_client_fails_its_pending_futures_and_the_task_runs_on(slow_pair: Pair) -> None:
    a, b = operands(4)
    with client(slow_pair.a) as rpc:
        future = rpc.future("matmul", a, b, placement="remote", fallback=False)
        wait_until(lambda: rpc.status()["tasks_in_flight"] >= 1, 30, "A sends the task to B")
    with pytest.raises(pangea.RpcError, match="the client was closed"):
        future.result(30)
    # NOTE: a client that goes away leaves its task to the node's queue: it runs on, for a later result()
    with client(slow_pair.a) as rpc:
        time.sleep(pangea.QUEUE_LET_GO_S + 0.5)
        (task,) = [t for t in rpc.tasks() if t["key"] == future.key]
        assert task["state"] == "running" and task["kernel"] == "matmul", task
        assert rpc.status()["tasks_in_flight"] >= 1

"""Arrays that stay remote: `Client.put`, tasks on handles, ``keep=True``, `RemoteArray`.

A real `serve` node from the built pyz and a real `Client` over Cap'n Proto (in
shared memory and in RPC messages). The tests check that put/get round-trips every
dtype and layout; that tasks on handles and kept results give numpy's answers; that
dropping a handle (or closing the client) brings the node's held bytes back to zero;
that held arrays count against the memory budget and a put over it is refused with a
clear error; that a capability the node did not make is refused; and that the
numpy face (operators, indexing, numpy functions) matches numpy, with numpy's kind of
errors.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, make_node_home
from pyz_helpers import ServeNode, running_pair, start_serve

import pangea
from pangea import ALLOWED_DTYPES, BadInputError, Client, RemoteArray, TaskError, UsageError

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 120.0
RELEASE_TIMEOUT_S = 30.0  # a dropped handle's release crosses the connection; the node frees at once
MODES = {"shared-memory": {"bulk_min_bytes": 0}, "rpc-messages": {"shared_memory": False}}


@pytest.fixture(scope="module")
def node(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path_factory.mktemp("remote-arrays"), "node")
    served = start_serve(pyz, home, name="serve")
    try:
        yield served
    finally:
        served.proc.stop()


def client_of(node: ServeNode, monkeypatch: pytest.MonkeyPatch, mode: str = "shared-memory") -> Client:
    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home))
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S, **MODES[mode])  # type: ignore[arg-type]


@pytest.fixture(params=sorted(MODES))
def client(request: pytest.FixtureRequest, node: ServeNode, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    with client_of(node, monkeypatch, request.param) as c:
        yield c


def held(c: Client) -> tuple[int, int]:
    status = c.status()
    return status["held_bytes"], status["held_arrays"]


def wait_held(c: Client, want: tuple[int, int]) -> tuple[int, int]:
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    got = held(c)
    while got != want and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
        got = held(c)
    return got


def layouts(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    base = (rng.standard_normal((6, 8)) * 100).astype(dtype)
    if base.dtype.kind == "c":
        base = base + 1j * base[::-1]
    return {
        "contiguous": base,
        "non-contiguous": base[::2, 1::3],
        "fortran": np.asfortranarray(base),
        "big-endian": base.astype(base.dtype.newbyteorder(">")),
        "0-d": base[2, 3].copy().reshape(()),
        "empty": base[:0],
    }


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_put_and_get_round_trip_every_dtype_and_layout(client: Client, dtype: str) -> None:
    for layout, a in layouts(dtype).items():
        ref = client.put(a)
        assert isinstance(ref, RemoteArray)
        assert (ref.shape, ref.dtype, ref.nbytes) == (a.shape, a.dtype.newbyteorder("="), a.nbytes), layout
        back = ref.get()
        assert back.dtype == a.dtype.newbyteorder("=") and back.shape == a.shape, layout
        np.testing.assert_array_equal(back, a, err_msg=layout)
        np.testing.assert_array_equal(np.asarray(ref), a, err_msg=layout)


def test_a_large_array_round_trips_and_counts_in_the_nodes_held_bytes(client: Client) -> None:
    a = np.random.default_rng(1).standard_normal((1024, 1024))  # 8 MiB
    before = held(client)
    ref = client.put(a)
    assert held(client) == (before[0] + a.nbytes, before[1] + 1)
    np.testing.assert_array_equal(client.get(ref), a)
    ref.release()
    assert wait_held(client, before) == before


def test_tasks_take_handles_and_keep_their_results_on_the_node(client: Client) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((64, 48)), rng.standard_normal((48, 32))
    x, y = client.put(a), client.put(b)
    product = client.submit("matmul", x, y, keep=True)
    assert isinstance(product, RemoteArray) and product.shape == (64, 32)
    assert client.last_task["arrays_via"].endswith("result: kept on the node")
    # a handle beside an array that travels, and a result that comes back
    total = client.submit("add", product, np.ones((64, 32)))
    np.testing.assert_allclose(total, a @ b + 1.0)
    sums = client.submit("sum", product, axis=0)
    np.testing.assert_allclose(sums, (a @ b).sum(axis=0))


def test_dropping_handles_and_closing_the_client_release_what_the_node_holds(
    node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_of(node, monkeypatch) as watcher:
        start = held(watcher)
        with client_of(node, monkeypatch) as c:
            refs = [c.put(np.full((256, 256), float(i))) for i in range(3)]
            kept = c.submit("add", refs[0], refs[1], keep=True)
            assert wait_held(watcher, (start[0] + 4 * 256 * 256 * 8, start[1] + 4)) == (
                start[0] + 4 * 256 * 256 * 8,
                start[1] + 4,
            )
            del refs[1:]
            assert wait_held(watcher, (start[0] + 2 * 256 * 256 * 8, start[1] + 2))[1] == start[1] + 2
            np.testing.assert_array_equal(kept.get(), np.full((256, 256), 1.0))
        # the client closed with two handles alive: the node let go of both
        assert wait_held(watcher, start) == start


def test_a_put_over_the_memory_budget_is_refused_clearly_and_the_node_goes_on(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home: NodeHome = make_node_home(tmp_path, "small")
    small = start_serve(pyz, home, "--memory-budget-mib", "128", name="serve-small")
    try:
        with client_of(small, monkeypatch) as c:
            a = np.zeros((3 << 20) // 8 * 8)  # 24 MiB
            first = c.put(a)
            with pytest.raises(TaskError) as refused:
                # 40 MiB more (120 MiB while it is copied in): over the 128 MiB budget beside the first
                c.put(np.zeros((40 << 20) // 8))
            message = str(refused.value)
            assert "memory budget" in message and ("retry" in message or "raise --memory-budget-mib" in message)
            assert held(c) == (a.nbytes, 1)
            first.release()
            assert wait_held(c, (0, 0)) == (0, 0)
            again = c.put(np.zeros((40 << 20) // 8))  # fits once the first is released
            assert again.nbytes == 40 << 20
    finally:
        small.proc.stop()


def test_a_capability_the_node_did_not_make_is_refused(client: Client, node: ServeNode) -> None:
    schema = pangea.load_schema()

    class Forged(schema.RemoteArray.Server):  # type: ignore[name-defined]
        async def claim(self, nonce: Any, _context: Any, **kwargs: Any) -> None:
            pass  # a client's own object: it cannot make the node's claim succeed

    async def forge() -> int:
        handle = next(client._handle_ids)
        client._handles[handle] = schema.RemoteArray._new_client(Forged())
        return handle

    assert client._loop is not None
    handle = asyncio.run_coroutine_threadsafe(forge(), client._loop).result(30)
    fake = RemoteArray(client, handle, np.dtype("float64"), (4, 4))
    with pytest.raises(BadInputError, match="not held by this node"):
        client.submit("copy", fake)
    # the node goes on
    np.testing.assert_array_equal(client.put(np.eye(3)).get(), np.eye(3))


def test_a_handle_of_another_client_or_released_is_a_clear_usage_error(
    client: Client, node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = client.put(np.arange(4.0))
    with client_of(node, monkeypatch) as other, pytest.raises(UsageError, match="another Client"):
        other.submit("copy", ref)
    ref.release()
    with pytest.raises(UsageError, match="released: put the array again"):
        client.get(ref)
    with pytest.raises(UsageError, match="RemoteArray"):
        client.get(np.arange(3.0))  # type: ignore[arg-type]


def test_operators_and_numpy_functions_match_numpy(client: Client) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    x, y = client.array(a), client.array(b)
    cases: dict[str, tuple[Any, np.ndarray]] = {
        "x + 1": (x + 1.0, a + 1.0),
        "2 * x": (2.0 * x, 2.0 * a),
        "x - x": (x - x, a - a),
        "a - x (numpy on the left)": (a - x, a - a),
        "x @ y": (x @ y, a @ b),
        "x.T": (x.T, a.T),
        "-x": (-x, -a),
        "x.sum(axis=0)": (x.sum(axis=0), a.sum(axis=0)),
        "np.add(x, x)": (np.add(x, x), a + a),
        "np.matmul(x, y)": (np.matmul(x, y), a @ b),
        "np.sum(x, 1)": (np.sum(x, 1), a.sum(axis=1)),
        "np.transpose(x)": (np.transpose(x), a.T),
    }
    for name, (got, want) in cases.items():
        assert isinstance(got, RemoteArray), name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got), want, err_msg=name)


def test_numpy_functions_of_linalg_fft_and_reductions_run_on_the_node(client: Client) -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 5))
    x = client.array(a)
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    assert all(isinstance(part, RemoteArray) for part in (u, s, vh))
    np.testing.assert_allclose(np.asarray(u) @ np.diag(np.asarray(s)) @ np.asarray(vh), a, atol=1e-12)
    cases: dict[str, tuple[Any, np.ndarray]] = {
        "np.mean(x, axis=0)": (np.mean(x, axis=0), a.mean(axis=0)),
        "x.std(ddof=1)": (x.std(ddof=1), np.asarray(a.std(ddof=1))),
        "np.max(x, axis=1, keepdims=True)": (np.max(x, axis=1, keepdims=True), a.max(axis=1, keepdims=True)),
        "np.exp(x)": (np.exp(x), np.exp(a)),
        "x / 2 ** x": (x / 2**x, a / 2**a),
        "np.fft.fft(x)": (np.fft.fft(x), np.fft.fft(a)),
        "np.concatenate([x, x])": (np.concatenate([x, x]), np.concatenate([a, a])),
        "x.reshape(5, 6)": (x.reshape(5, 6), a.reshape(5, 6)),
        "x[1:4, ::2]": (x[1:4, ::2], a[1:4, ::2]),
        "x[2]": (x[2], a[2]),
        "np.linalg.norm(x)": (np.linalg.norm(x), np.asarray(np.linalg.norm(a))),
        "np.einsum('ij,ij->j', x, x)": (np.einsum("ij,ij->j", x, x), np.einsum("ij,ij->j", a, a)),
    }
    for name, (got, want) in cases.items():
        assert isinstance(got, RemoteArray), name
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12, err_msg=name)
    assert client.last_task["verification"] == "local"  # ran on the node itself


def test_numpy_kind_of_errors_before_anything_is_sent(client: Client) -> None:
    x = client.array(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="mismatch in its core dimension 0"):
        x @ x
    with pytest.raises(ValueError, match="broadcast"):
        x + np.zeros(5)
    with pytest.raises(IndexError, match="too many indices"):
        x[1, 2, 3]
    with pytest.raises(IndexError, match="out of bounds"):
        x[7]
    # what the node refuses is a ValueError too
    with pytest.raises(ValueError):
        client.submit("solve", x, np.zeros(3), keep=True)


def test_a_task_on_held_arrays_runs_on_a_remote_worker_and_its_result_stays_on_the_node(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_pair(pyz, tmp_path) as pair:
        with client_of(pair.a, monkeypatch) as c:
            rng = np.random.default_rng(5)
            a, b = rng.standard_normal((200, 300)), rng.standard_normal((300, 100))
            x, y = c.put(a), c.put(b)
            product = c.submit("matmul", x, y, placement="remote", keep=True)
            task = c.last_task
            assert task["ran_on"] == pair.b.peer_id and task["verified_by_node"], task
            assert isinstance(product, RemoteArray)
            np.testing.assert_allclose(product.get(), a @ b)
            assert held(c)[1] == 3

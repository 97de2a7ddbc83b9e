"""The Cap'n Proto RPC service and its clients against real `serve` nodes.

Two nodes run from the built pangea.pyz on 127.0.0.1, joined by libp2p the
way the README tells two boxes to do it: B starts with ``--allow-peer <A's
id>`` (from ``pangea.pyz id``), A with ``--peer <B's address>``. Programs talk
to A over RPC, with `pangea.Client` imported in this process and with
``pangea.pyz call``; work placed ``remote`` must run on B. One pair serves
the whole module (starting nodes is the slow part), so the tests that count
tasks compare counters before and after their own work.

Also here: requests that must be refused without hurting the node, a third
node that B does not trust, 256 MiB operands through RPC, and the README's
client example run verbatim through the pyz (``SHIV_INTERPRETER=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import Proc, make_node_home, wait_until
from pyz_helpers import Pair, ServeNode, live_pair, running_pair, start_serve

import pangea
from pangea import Client, PangeaError, RpcError, TaskError

REPO_ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 90.0  # one `pangea.pyz call` / `id` run, pyz start included
CLIENT_TIMEOUT_S = 60.0  # Client(timeout_s=...): every RPC call here answers well within it
CONNECT_TIMEOUT_S = 30.0  # A dials B right after both print their ready lines
README_RPC = "127.0.0.1:7780"

# ---------------------------------------------------------------- serve nodes
# ServeNode, peer_id_of and start_serve are shared (tests/pyz_helpers.py).
# NOTE: test_serve.py keeps a copy of run_pyz, client, wait_until and
# assert_readable (importing a test module would confuse mypy).


def run_pyz(pyz: Path, args: Sequence[str], env: dict[str, str], timeout: float = CALL_TIMEOUT_S) -> Any:
    """Run the pyz to completion (no stdin); return the CompletedProcess."""
    return subprocess.run(
        [str(pyz), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def module_pair(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with running_pair(pyz, tmp_path_factory.mktemp("rpc-pair")) as pair:
        yield pair


@pytest.fixture
def pair(module_pair: Pair) -> Pair:
    """The module's pair; its nodes' output goes into the report of a failing test."""
    return live_pair(module_pair)


def client(node: ServeNode, **kwargs: Any) -> Client:
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S, **kwargs)


def matrices(m: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)), rng.standard_normal((k, n))


def assert_readable(message: str) -> None:
    """A message for people: one line, no traceback or Python internals."""
    assert message and "\n" not in message, repr(message)
    for noise in ("Traceback", 'File "', "capnp.pyx", "stack:", "KjException"):
        assert noise not in message, repr(message)


# ---------------------------------------------------------------- placement


def test_submit_remote_runs_on_peer_b_and_returns_the_product(pair: Pair) -> None:
    a, b = matrices(200, 300, 100)
    with client(pair.a) as node:
        c = node.matmul(a, b, placement="remote")
        task = node.last_task
    np.testing.assert_allclose(c, a @ b)
    assert task["ran_on"] == pair.b.peer_id
    assert task["attempts"] == [{"worker": pair.b.peer_id, "outcome": "ok"}]
    assert task["error_kind"] == "" and task["error_message"] == ""
    t = task["timings"]
    assert all(t[k] >= 0 for k in ("queue_s", "transfer_s", "compute_s", "total_s")), t
    assert t["total_s"] >= t["compute_s"]


NODE_TIMINGS = ("queue_s", "transfer_s", "compute_s", "total_s")


@pytest.mark.parametrize("placement", ["remote", "local"])
def test_last_task_timings_add_the_client_node_hop_to_the_node_s(pair: Pair, placement: str) -> None:
    a, b = matrices(256, 256, 256, seed=9)
    with client(pair.a) as node:
        node.matmul(a, b, placement=placement)
        t = node.last_task["timings"]
        with pytest.raises(TaskError):
            node.matmul(a, b[:7], placement=placement)
        failed = node.last_task["timings"]
    assert list(t) == [*NODE_TIMINGS, "client_total_s", "rpc_s"]
    assert all(t[k] >= 0 for k in t), t
    assert t["client_total_s"] >= t["total_s"] > 0
    assert t["rpc_s"] == pytest.approx(t["client_total_s"] - t["total_s"])
    assert failed["client_total_s"] > 0 and failed["rpc_s"] >= 0


def test_submit_local_runs_on_this_node(pair: Pair) -> None:
    a, b = matrices(150, 150, 150, seed=1)
    with client(pair.a) as node:
        c = node.matmul(a, b, placement="local")
        task = node.last_task
    np.testing.assert_allclose(c, a @ b)
    assert task["ran_on"] == "local"
    assert task["attempts"] == [{"worker": "local", "outcome": "ok"}]
    assert task["timings"]["transfer_s"] == 0.0


def test_submit_auto_runs_here_or_on_b_and_is_right(pair: Pair) -> None:
    with client(pair.a) as node:
        for seed in range(4):
            a, b = matrices(120, 80, 60, seed=seed)
            np.testing.assert_allclose(node.matmul(a, b), a @ b)  # placement defaults to auto
            assert node.last_task["ran_on"] in ("local", pair.b.peer_id)
            np.testing.assert_allclose(node.submit("add", a, a, placement="auto"), a + a)
            assert node.last_task["ran_on"] in ("local", pair.b.peer_id)


def test_submit_to_a_peer_id_runs_on_that_peer(pair: Pair) -> None:
    a, b = matrices(64, 32, 16, seed=2)
    with client(pair.a) as node:
        c = node.submit("matmul", a, b, placement=pair.b.peer_id)
        task = node.last_task
    np.testing.assert_allclose(c, a @ b)
    assert task["ran_on"] == pair.b.peer_id
    assert [x["worker"] for x in task["attempts"]] == [pair.b.peer_id]


def test_b_serves_its_own_clients_too(pair: Pair) -> None:
    a, b = matrices(40, 40, 40, seed=3)
    with client(pair.b) as node:
        np.testing.assert_allclose(node.matmul(a, b, placement="local"), a @ b)
        assert node.last_task["ran_on"] == "local"


# ---------------------------------------------------------------- kernels and dtypes over the wire

CASES: dict[str, tuple[str, tuple[np.ndarray, ...], dict[str, float], Callable[..., np.ndarray]]] = {
    "scale-float32": ("scale", (np.arange(12, dtype=np.float32).reshape(3, 4),), {"factor": 2.5}, lambda x: x * 2.5),
    "add-int64": ("add", (np.arange(6).reshape(2, 3), np.full((2, 3), 7)), {}, lambda x, y: x + y),
    "subtract-int32": (
        "subtract",
        (np.arange(5, dtype=np.int32), np.ones(5, dtype=np.int32)),
        {},
        lambda x, y: x - y,
    ),
    "transpose-complex128": (
        "transpose",
        (np.arange(6).reshape(2, 3) * (1 + 2j),),
        {},
        lambda x: x.T,
    ),
    "multiply-complex64": (
        "multiply",
        (np.array([1 + 1j, 2 - 1j], dtype=np.complex64), np.array([3j, 1], dtype=np.complex64)),
        {},
        lambda x, y: x * y,
    ),
    "sum-to-0d": ("sum", (np.arange(10, dtype=np.float64),), {}, lambda x: np.sum(x)),
    "dot": ("dot", (np.arange(4.0), np.arange(4.0) + 1), {}, lambda x, y: np.dot(x, y)),
    "solve": ("solve", (np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([9.0, 8.0])), {}, np.linalg.solve),
    "inverse": ("inverse", (np.array([[4.0, 7.0], [2.0, 6.0]]),), {}, np.linalg.inv),
    "empty": ("transpose", (np.zeros((0, 3)),), {}, lambda x: x.T),
}


@pytest.mark.parametrize("placement", ["remote", "local"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_and_dtypes_cross_the_rpc_and_the_peer_link(pair: Pair, case: str, placement: str) -> None:
    kernel, operands, params, reference = CASES[case]
    with client(pair.a) as node:
        out = node.submit(kernel, *operands, placement=placement, **params)
        ran_on = node.last_task["ran_on"]
    want = np.asarray(reference(*operands))
    assert ran_on == (pair.b.peer_id if placement == "remote" else "local")
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want)


def test_concurrent_submits_from_threads_and_clients(pair: Pair) -> None:
    jobs = [(matrices(90, 70, 50, seed=s), ("remote", "local", "auto")[s % 3]) for s in range(9)]
    with client(pair.a) as shared, client(pair.a) as other, ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(shared.matmul, a, b, placement) for (a, b), placement in jobs]
        statuses = [pool.submit(other.status) for _ in range(3)]
        for ((a, b), _), future in zip(jobs, futures, strict=True):
            np.testing.assert_allclose(future.result(timeout=CLIENT_TIMEOUT_S), a @ b)
        for status in statuses:
            assert status.result(timeout=CLIENT_TIMEOUT_S)["peer_id"] == pair.a.peer_id


# ---------------------------------------------------------------- status and peers


def test_status_and_peers_reflect_the_work_done(pair: Pair) -> None:
    a, b = matrices(100, 100, 100, seed=4)
    with client(pair.a) as node:
        before = node.status()
        (b_before,) = node.peers()
        for _ in range(3):
            node.matmul(a, b, placement="remote")
        node.matmul(a, b, placement="local")
        with pytest.raises(TaskError):
            node.matmul(a, b[:7], placement="remote")  # refused by B as bad input
        after = node.status()
        (b_after,) = node.peers()

    assert after["peer_id"] == pair.a.peer_id
    assert pair.a.address in after["addresses"]
    assert after["version"] == pangea.__version__
    assert after["rpc_address"] == pair.a.rpc
    assert after["peer_count"] == 1
    assert after["tasks_done"] - before["tasks_done"] == 4
    assert after["tasks_failed"] - before["tasks_failed"] == 1
    assert after["tasks_in_flight"] == 0
    assert after["uptime_s"] > before["uptime_s"]
    # three operand pairs went to B and three products came back
    assert after["bytes_out"] - before["bytes_out"] >= 3 * (a.nbytes + b.nbytes)
    assert after["bytes_in"] - before["bytes_in"] >= 3 * a.nbytes

    assert b_after["peer_id"] == pair.b.peer_id
    assert b_after["version"] == pangea.__version__
    assert b_after["role"] == "serve"
    assert sorted(b_after["kernels"]) == sorted(pangea.KERNELS)
    assert b_after["trusted"] is True
    assert b_after["tasks_done"] - b_before["tasks_done"] == 3
    assert any(addr.startswith(pair.b.address.rsplit("/p2p/", 1)[0]) for addr in b_after["addresses"])
    assert b_after["rtt_ms"] >= 0 and b_after["last_seen_s"] >= 0


def test_b_lists_a_as_a_trusted_peer(pair: Pair) -> None:
    with client(pair.b) as node:
        wait_until(lambda: len(node.peers()) == 1, 10, "B lists one peer")
        (peer,) = node.peers()
        status = node.status()
    assert peer["peer_id"] == pair.a.peer_id
    assert peer["trusted"] is True and peer["role"] == "serve"
    assert peer["version"] == pangea.__version__
    assert status["peer_count"] == 1 and status["rpc_address"] == pair.b.rpc


# ---------------------------------------------------------------- bad requests

ONES22 = np.ones((2, 2))
BAD_REQUESTS: dict[str, tuple[str, tuple[np.ndarray, ...], dict[str, Any], list[str]]] = {
    "unknown-kernel": ("nokernel", (ONES22,), {}, ["unknown kernel 'nokernel'", "matmul"]),
    "shape-mismatch-local": (
        "matmul",
        (np.ones((2, 3)), np.ones((2, 3))),
        {"placement": "local"},
        ["(2, 3)", "do not match"],
    ),
    "shape-mismatch-remote": (
        "matmul",
        (np.ones((2, 3)), np.ones((2, 3))),
        {"placement": "remote"},
        ["(2, 3)", "do not match"],
    ),
    "bad-placement": ("matmul", (ONES22, ONES22), {"placement": "nowhere"}, ["unknown placement 'nowhere'", "remote"]),
    "unknown-peer-id": (
        "matmul",
        (ONES22, ONES22),
        {"placement": "12D3KooWRdCk2SKeikogBA5NZ1V8ThxDNFEYtotKNVEZwyPMZK65"},
        ["unknown placement"],
    ),
    "wrong-operand-count": ("matmul", (ONES22,), {"placement": "remote"}, ["takes 2 operand"]),
    "unknown-param": ("scale", (ONES22,), {"placement": "remote", "bogus": 1.0}, ["bogus"]),
    "nan-param": ("scale", (ONES22,), {"placement": "local", "factor": float("nan")}, ["not a finite number"]),
    "singular": ("inverse", (np.zeros((2, 2)),), {"placement": "remote"}, ["singular"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_as_bad_input_and_the_node_keeps_serving(pair: Pair, case: str) -> None:
    kernel, operands, kwargs, needles = BAD_REQUESTS[case]
    a, b = matrices(30, 20, 10, seed=5)
    with client(pair.a) as node:
        with pytest.raises(TaskError) as info:
            node.submit(kernel, *operands, **kwargs)
        assert info.value.kind == "bad-input"
        assert node.last_task["error_kind"] == "bad-input"
        # and the same connection still works, on both nodes
        np.testing.assert_allclose(node.matmul(a, b, placement="remote"), a @ b)
        assert node.last_task["ran_on"] == pair.b.peer_id
    message = str(info.value)
    assert_readable(message)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if case.startswith("shape-mismatch"):  # the kernel named once, and where it ran when remote
        assert message.count("matmul") == 1 and "attempt" not in message, message
        assert message.startswith("matmul on " if case.endswith("remote") else "matmul: shapes"), message
    assert pair.a.proc.returncode is None and pair.b.proc.returncode is None


@pytest.mark.parametrize(
    "bad",
    [np.array([True, False]), np.array(["a"]), np.ones((1,) * (pangea.MAX_NDIM + 1))],
    ids=["bool", "str", "too-many-dims"],
)
def test_client_refuses_an_unsendable_array_and_stays_usable(pair: Pair, bad: np.ndarray) -> None:
    with client(pair.a) as node:
        with pytest.raises(PangeaError) as info:
            node.submit("sum", bad, placement="local")
        assert_readable(str(info.value))
        assert node.submit("sum", np.arange(4.0), placement="local") == 6.0


@pytest.mark.parametrize(
    ("bad", "target"),
    [
        (np.arange(6, dtype=np.float16).reshape(2, 3), "float32"),
        (np.ones((2, 3), dtype=bool), "int32"),
        (np.arange(6, dtype=np.uint8).reshape(2, 3), "int32"),
        (np.arange(6, dtype=np.uint64).reshape(2, 3), "int64"),
        (np.full((2, 3), 1 << 63, dtype=np.uint64), "float64"),
    ],
    ids=["float16", "bool", "uint8", "uint64", "uint64-past-int64"],
)
def test_client_refuses_a_dtype_before_sending_with_the_cast_to_make(pair: Pair, bad: np.ndarray, target: str) -> None:
    cast = f"a.astype(np.{target})"
    with client(pair.a) as node:
        before = node.status()
        with pytest.raises(TaskError) as info:
            node.submit("transpose", bad, placement="local")
        after = node.status()
        # the cast it names works, on the same connection
        fixed = bad.astype(target)
        np.testing.assert_array_equal(node.submit("transpose", fixed, placement="local"), fixed.T)
    message = str(info.value)
    assert_readable(message)
    assert info.value.kind == "bad-input"
    assert message.startswith(f"cannot submit transpose: operand 0 is a {bad.dtype.name} array; pangea takes ")
    assert f"cast it first, e.g. {cast} (" in message
    # refused here: the node saw no task
    assert (after["tasks_done"], after["tasks_failed"]) == (before["tasks_done"], before["tasks_failed"])


def test_client_names_the_second_operand_in_its_cast(pair: Pair) -> None:
    with client(pair.a) as node, pytest.raises(TaskError) as info:
        node.submit("add", np.ones(3), np.ones(3, dtype=np.uint16), placement="local")
    assert "operand 1 is a uint16 array" in str(info.value) and "b.astype(np.int32)" in str(info.value)


# ---------------------------------------------------------------- kernels


def test_client_kernels_lists_every_registry_kernel_with_its_operands(pair: Pair) -> None:
    with client(pair.a) as node:
        kernels = node.kernels()
        assert node.status()["peer_id"] == pair.a.peer_id  # the connection still serves
    assert [k["name"] for k in kernels] == sorted(pangea.KERNELS)
    for k in kernels:
        entry = pangea.KERNELS[k["name"]]
        assert k["operands"] == entry.arity, k
        assert k["params"] == list(entry.params), k
        assert k["description"] == entry.doc, k
        assert k["dtypes"] == (list(pangea.ALLOWED_DTYPES) if entry.arity else []), k
        assert k["max_ndim"] == pangea.MAX_NDIM and k["max_elements"] > 0, k
        assert (k["outputs"], k["variadic"]) == (entry.outputs, entry.variadic), k
    assert len(kernels) >= 60
    assert set(kernels[0]) == {
        "name",
        "operands",
        "params",
        "dtypes",
        "description",
        "max_ndim",
        "max_elements",
        "verification",
        "outputs",
        "variadic",
    }


# A node of an older pangea: its schema has no `Compute.kernels` (run in a process of its own:
# one process cannot load two schemas with one file id).
OLD_NODE = """
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])

class OldCompute(schema.Compute.Server):
    async def status(self, _context, **kwargs):
        _context.results.status.version = "0.0.1"

class OldGate(schema.Gate.Server):
    async def login(self, token, _context, **kwargs):
        _context.results.compute = OldCompute()
        _context.results.maxMessageBytes = 1 << 20

async def main():
    async with capnp.kj_loop():
        async def on_connection(stream):
            await capnp.TwoPartyServer(stream, bootstrap=OldGate()).on_disconnect()
        server = await capnp.AsyncIoStream.create_server(on_connection, "127.0.0.1", 0)
        print("listening on port", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.contextmanager
def node_without_kernels(tmp_path: Path) -> Iterator[str]:
    """Start a Cap'n Proto `Gate` on 127.0.0.1 whose schema lacks `Compute.kernels`; yield its address."""
    import sys

    text = pangea.schema_path().read_text()
    old = re.sub(r"^  (kernels @4|result  @5|tasks   @6|cancel  @7) .*\n", "", text, flags=re.M)  # newer calls
    assert old != text
    (tmp_path / "old.capnp").write_text(old)
    (tmp_path / "old_node.py").write_text(OLD_NODE)
    with Proc([sys.executable, tmp_path / "old_node.py", tmp_path / "old.capnp"], name="old-node") as proc:
        port = proc.wait_for_line(r"^listening on port (\d+)$", timeout=30).group(1)
        yield f"127.0.0.1:{port}"


def test_client_kernels_of_an_older_node_says_so_and_stays_usable(tmp_path: Path) -> None:
    with node_without_kernels(tmp_path) as address, Client(address, token="", timeout_s=CLIENT_TIMEOUT_S) as node:
        with pytest.raises(RpcError) as info:
            node.kernels()
        assert node.status()["version"] == "0.0.1"
    assert str(info.value) == f"cannot list kernels: the node at {address} runs an older pangea without this call"
    assert info.value.kind == "incompatible"


def _raw_submit(rpc: str, token: str | None, fill: Callable[[Any], None]) -> tuple[str, str]:
    """Submit a hand-built TaskSpec with pycapnp alone (no pangea.Client checks); return (errorKind, errorMessage)."""
    import capnp

    host, port = rpc.rsplit(":", 1)

    async def main() -> tuple[str, str]:
        async with capnp.kj_loop():  # type: ignore[attr-defined]
            stream = await asyncio.wait_for(capnp.AsyncIoStream.create_connection(host, int(port)), 10)  # type: ignore[attr-defined]
            gate = capnp.TwoPartyClient(stream).bootstrap().cast_as(pangea.load_schema().Gate)  # type: ignore[attr-defined]
            compute = (await asyncio.wait_for(gate.login(token or ""), 10)).compute
            request = compute.submit_request()
            fill(request.task)
            result = (await asyncio.wait_for(request.send(), CLIENT_TIMEOUT_S)).result
            return str(result.errorKind), str(result.errorMessage)

    return asyncio.run(main())


def _spec(kernel: str, *arrays: tuple[str, list[int], list[bytes]], placement: str = "") -> Callable[[Any], None]:
    def fill(task: Any) -> None:
        task.kernel, task.placement = kernel, placement
        slots = task.init("operands", len(arrays))
        for slot, (dtype, shape, chunks) in zip(slots, arrays, strict=True):
            slot.dtype, slot.shape = dtype, shape
            data = slot.init("chunks", len(chunks))
            for i, chunk in enumerate(chunks):
                data[i] = chunk

    return fill


@pytest.mark.parametrize(
    ("fill", "needle"),
    [
        (_spec("sum", ("float64", [2, 2], [b"\0" * 8])), "operand 0"),
        (_spec("add", ("float64", [2], [b"\0" * 16]), ("object", [2], [b"\0" * 16])), "operand 1"),
        (_spec("sum", ("float64", [1 << 40, 1 << 40], [])), "operand 0"),
        (_spec("sum", ("float64", [1] * 9, [b"\0" * 8])), "at most 8"),
        (_spec("sum", ("float64", [3], [b"\0" * 24]), placement="elsewhere"), "unknown placement"),
    ],
    ids=["too-few-bytes", "bad-dtype", "absurd-shape", "too-many-dims", "bad-placement"],
)
def test_hostile_task_spec_gets_bad_input_and_the_node_keeps_serving(
    pair: Pair, fill: Callable[[Any], None], needle: str
) -> None:
    kind, message = _raw_submit(pair.a.rpc, pair.a.token, fill)
    assert kind == "bad-input"
    assert needle in message
    assert_readable(message)
    with client(pair.a) as node:
        assert node.status()["peer_count"] == 1


# ---------------------------------------------------------------- the `call` command


def test_call_status_prints_a_readable_table(pair: Pair, pyz: Path) -> None:
    result = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "status"], {**pair.a.home.env, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1].strip() for line in result.stdout.splitlines()}
    assert rows["peer_id"] == pair.a.peer_id
    assert rows["rpc_address"] == pair.a.rpc
    assert rows["version"] == pangea.__version__
    assert rows["peer_count"] == "1"
    assert rows["tasks_in_flight"] == "0"
    assert re.fullmatch(r"\d+", rows["tasks_done"])
    for key in ("bytes_out", "memory_budget_bytes", "state_max_bytes"):
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB)", rows[key]), rows
    narrow = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "status"], {**pair.a.home.env, "COLUMNS": "80"})
    lines = narrow.stdout.splitlines()
    assert narrow.returncode == 0 and max(len(line) for line in lines) <= 80, narrow.stdout
    assert any(line.split()[-1:] == [pair.a.peer_id] for line in lines), narrow.stdout  # whole, if under its label


def test_call_peers_prints_b_with_version_and_trust(pair: Pair, pyz: Path) -> None:
    result = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "peers"], {**pair.a.home.env, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()
    assert header.split() == [
        "peer",
        "id",
        "role",
        "version",
        "rtt",
        "ms",
        "tasks",
        "done",
        "last",
        "seen",
        "s",
        "trusted",
        "results",
    ]
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[:3] == [pair.b.peer_id, "serve", pangea.__version__]
    assert cells[-2:] == ["yes", "ok"]  # trusted, and its results are not under suspicion
    narrow = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "peers"], {**pair.a.home.env, "COLUMNS": "80"})
    lines = narrow.stdout.splitlines()
    assert narrow.returncode == 0 and max(len(line) for line in lines) <= 80, narrow.stdout
    assert lines[2].split()[:3] == [pair.b.peer_id, "serve", pangea.__version__]  # the last columns fold under it
    assert "  trusted: yes" in lines and "  results: ok" in lines, narrow.stdout


def test_call_matmul_remote_prints_where_it_ran_and_that_it_was_verified(pair: Pair, pyz: Path) -> None:
    args = ["call", "--rpc", pair.a.rpc, "matmul", "--size", "256", "--placement", "remote"]
    result = run_pyz(pyz, args, pair.a.home.env)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"256x256 matmul ran on {pair.b.peer_id} in \d+\.\d{{3}} s at this client "
        r"\(node \d+\.\d{3} s: compute \d+\.\d{3} s, transfer \d+\.\d{3} s; RPC hop \d+\.\d{3} s\): "
        r"verified against local numpy",
        " ".join(result.stdout.split()),  # wrapped at the width (80 when not a terminal)
    ), result.stdout


def test_call_matmul_local_says_this_node(pair: Pair, pyz: Path) -> None:
    args = ["call", "--rpc", pair.a.rpc, "matmul", "--size", "64", "--placement", "local"]
    result = run_pyz(pyz, args, pair.a.home.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("64x64 matmul ran on this node in "), result.stdout


def test_call_json_output_parses(pair: Pair, pyz: Path) -> None:
    env = pair.a.home.env

    def call_json(*args: str) -> Any:
        result = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "--json", *args], env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    status = call_json("status")
    assert status["peer_id"] == pair.a.peer_id and status["peer_count"] == 1
    assert status["rpc_address"] == pair.a.rpc and status["version"] == pangea.__version__

    peers = call_json("peers")
    assert [p["peer_id"] for p in peers] == [pair.b.peer_id]
    assert peers[0]["trusted"] is True and "matmul" in peers[0]["kernels"]

    doc = call_json("matmul", "--size", "256", "--placement", "remote")
    assert doc["verified"] is True and doc["size"] == 256
    assert doc["ran_on"] == pair.b.peer_id
    assert doc["attempts"] == [{"worker": pair.b.peer_id, "outcome": "ok"}]
    assert set(doc["timings"]) == {"queue_s", "transfer_s", "compute_s", "total_s", "client_total_s", "rpc_s"}


def test_call_connect_to_an_already_connected_peer_reports_it(pair: Pair, pyz: Path) -> None:
    result = run_pyz(pyz, ["call", "--rpc", pair.a.rpc, "connect", pair.b.address], pair.a.home.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"connected to {pair.b.peer_id} (serve, pangea {pangea.__version__})"
    with client(pair.a) as node:
        assert node.status()["peer_count"] == 1


def test_call_bad_placement_is_a_usage_error_with_one_error_line_and_a_hint(pair: Pair, pyz: Path) -> None:
    args = ["call", "--rpc", pair.a.rpc, "matmul", "--size", "8", "--placement", "nowhere"]
    result = run_pyz(pyz, args, pair.a.home.env)
    assert result.returncode == 2, result.stderr  # the option is wrong, not the task: a usage error
    lines = result.stderr.splitlines()
    assert lines[0].startswith(
        f"pangea: error: cannot run matmul on the node at {pair.a.rpc}: unknown placement 'nowhere'"
    )
    assert "use one of: auto, local, remote, split, split-remote" in lines[0]
    assert lines[1:] == ["hint: `./pangea.pyz call peers` lists the peer ids a placement may name"]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- trust


def test_untrusted_peer_is_refused_and_b_keeps_serving(pair: Pair, pyz: Path, tmp_path: Path) -> None:
    home_c = make_node_home(tmp_path, "c")
    c = start_serve(pyz, home_c, "--peer", pair.b.address, name="serve-C")
    with c.proc:
        refused = c.proc.wait_for_line(r"not trusted", stream="stderr").string
        assert refused.startswith("pangea: ")
        assert f"peer {c.peer_id} is not trusted by node {pair.b.peer_id}" in refused
        assert f"--allow-peer {c.peer_id}" in refused

        result = run_pyz(pyz, ["call", "--rpc", c.rpc, "connect", pair.b.address], home_c.env)
        assert result.returncode == 1
        error = result.stderr.splitlines()[0]
        assert error.startswith("pangea: error: ") and "Traceback" not in result.stderr
        assert "not trusted" in error and f"--allow-peer {c.peer_id}" in error

        with client(c) as node:
            with pytest.raises(RpcError, match="not trusted"):
                node.connect(pair.b.address)
            assert node.status()["peer_count"] == 0
            assert node.peers() == []

    assert c.proc.returncode == 0
    b_refusal = pair.b.proc.wait_for_line(rf"refused .*{c.peer_id} is not trusted", stream="stderr")
    assert f"--allow-peer {c.peer_id}" in b_refusal.string
    a, b = matrices(50, 50, 50, seed=6)
    with client(pair.b) as node:
        assert [p["peer_id"] for p in node.peers()] == [pair.a.peer_id]
    with client(pair.a) as node:
        np.testing.assert_allclose(node.matmul(a, b, placement="remote"), a @ b)
        assert node.last_task["ran_on"] == pair.b.peer_id


def test_refused_connect_names_the_address_once(pair: Pair, pyz: Path, tmp_path: Path) -> None:
    home_c = make_node_home(tmp_path, "c")
    c = start_serve(pyz, home_c, name="serve-C")
    with c.proc:
        result = run_pyz(pyz, ["call", "--rpc", c.rpc, "connect", pair.b.address], home_c.env)
    assert result.returncode == 1
    error = result.stderr.splitlines()[0]
    assert error.count("cannot connect to") == 1, error
    assert error.count(pair.b.address) == 1, error


# ---------------------------------------------------------------- big operands


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["local", "remote"])
def test_256_mib_operand_round_trips_through_rpc(pair: Pair, placement: str) -> None:
    x = np.random.default_rng(8).standard_normal(32 << 20)  # 256 MiB of float64
    assert x.nbytes == 256 << 20
    with Client(pair.a.rpc, token=pair.a.token, timeout_s=300) as node:
        y = node.submit("scale", x, factor=2.0, placement=placement)
        ran_on = node.last_task["ran_on"]
    assert ran_on == (pair.b.peer_id if placement == "remote" else "local")
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.array_equal(y, x * 2.0)


# ---------------------------------------------------------------- the README example


def readme_client_example() -> str:
    """The Python code between <!-- client-example --> and <!-- /client-example --> in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"<!-- client-example -->\s*```python\n(.*?)```\s*<!-- /client-example -->", text, flags=re.S)
    assert found, "README.md has no client example between <!-- client-example --> markers"
    return found.group(1)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_readme_client_example_runs_verbatim_through_the_pyz(pyz: Path, tmp_path: Path) -> None:
    code = readme_client_example()
    assert f'"{README_RPC}"' in code
    rpc_a = README_RPC if port_is_free("127.0.0.1", 7780) else "127.0.0.1:0"
    with running_pair(pyz, tmp_path / "nodes", rpc_a=rpc_a) as pair:
        if pair.a.rpc != README_RPC:  # 7780 is taken on this machine: change only the address string
            code = code.replace(f'"{README_RPC}"', f'"{pair.a.rpc}"')
        script = tmp_path / "client_example.py"
        script.write_text(code)
        env = dict(pair.a.home.env, SHIV_INTERPRETER="1")
        result = subprocess.run(
            [str(pyz), str(script)],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        ran_on, solve_shape, counts, params = result.stdout.splitlines()
        assert ran_on.startswith(f"{pair.b.peer_id} {{'queue_s': ")
        assert solve_shape == "(1000,)"
        assert counts == f"2 [{pair.b.peer_id!r}]"
        assert params == str(
            {k.name: list(k.params) for k in sorted(pangea.KERNELS.values(), key=lambda k: k.name) if k.params}
        )
        with client(pair.a) as node:
            assert node.status()["tasks_done"] == 2

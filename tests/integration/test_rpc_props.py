"""No traceback reaches a client or a terminal: generated RPC requests and command lines.

One real `serve` node (from the built pyz, with an RPC token) takes requests
built field by field from the schema with hostile values: NaN, inf and
negative timeouts, unknown kernels, wrong arity, bad dtypes, shapes that do
not match their chunks, absurd shapes, empty and huge placements, malformed
multiaddrs for `connect`, bad tokens. Every answer must be a result (a
structured errorKind/errorMessage with a one-line message, or a real
output), never a Cap'n Proto remote exception carrying the server's
traceback, and the node must keep serving: a good request afterwards works.

The real pyz also runs a small set of command lines: hostile numbers (one
usage line, exit 2) and a stdout whose reader left (`status | head -1`,
`call peers | head -1`): exit 0, nothing on stderr.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, make_node_home
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyz_helpers import ServeNode, run_pyz, start_serve

import pangea
from pangea import Client, RpcError, TaskError

TOKEN = "errors-test-token-0123456789abcdef"
PEER_ID = "12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y"
ANSWER_S = 60.0  # one RPC answer, under load


@pytest.fixture(scope="module")
def node(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path_factory.mktemp("rpc-props"), "serve")
    serve = start_serve(pyz, home, "--rpc-token", TOKEN, "--data-port", "off", "--metrics", "off", name="serve")
    try:
        yield serve
    finally:
        serve.proc.stop()


@pytest.fixture(scope="module")
def client(node: ServeNode) -> Iterator[Client]:
    with Client(node.rpc, token=TOKEN, timeout_s=ANSWER_S) as c:
        yield c


def raw(client: Client, make: Any) -> Any:
    """Run ``make(compute)`` on the client's loop; a remote exception propagates as is (KjException)."""
    future = asyncio.run_coroutine_threadsafe(make(client._compute), client._loop)  # type: ignore[arg-type]
    return future.result(ANSWER_S + 30)


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) <= 1000, repr(message)
    assert "Traceback" not in message and 'File "' not in message, message


def assert_still_serving(client: Client) -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.testing.assert_array_equal(client.submit("add", a, a, placement="local"), a + a)


# ---------------------------------------------------------------- submit


def _itemsize(dtype: str) -> int | None:
    try:
        return int(np.dtype(dtype).itemsize) if dtype in pangea.ALLOWED_DTYPES else None
    except TypeError:
        return None


@st.composite
def operands(draw: st.DrawFn) -> tuple[str, list[int], list[bytes]]:
    dtype = draw(
        st.sampled_from(
            [*pangea.ALLOWED_DTYPES, "object", "float16", "", "<f8", "V8", "U4", "ü", "float64" * 40, "complex256"]
        )
    )
    dim = st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**32 + 1, 2**63, 2**64 - 1, 10**12]))
    shape = draw(st.lists(dim, max_size=10))
    size, item = math.prod(shape), _itemsize(dtype)
    if item is not None and size * item <= 4096 and draw(st.booleans()):
        data = draw(st.binary(min_size=size * item, max_size=size * item))
        chunks = [data[: len(data) // 2], data[len(data) // 2 :]] if draw(st.booleans()) else [data]
    else:
        chunks = draw(st.lists(st.binary(max_size=64), max_size=3))
    return dtype, shape, chunks


HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -5.0, -0.0, 0.0, 1e-300, 1e300, 2.0**64, -1.0]
KERNEL_NAMES = [*pangea.KERNELS, "", "nope", "matmul" * 300, "ü", "__import__('os').system('id')"]
PLACEMENTS = ["auto", "local", "remote", "split", "split-remote", "", PEER_ID, "x" * 100_000, "local\n"]


@st.composite
def task_specs(draw: st.DrawFn) -> dict[str, Any]:
    param_value = st.one_of(st.sampled_from(HOSTILE_FLOATS + [3.0, 0.5, 1e30]), st.floats(-1000, 1000))
    return {
        "kernel": draw(st.one_of(st.sampled_from(KERNEL_NAMES), st.text(max_size=20))),
        "operands": draw(st.lists(operands(), max_size=3)),
        "params": draw(
            st.lists(
                st.tuples(
                    st.one_of(st.sampled_from(["rows", "cols", "seed", "factor", "axis"]), st.text(max_size=8)),
                    param_value,
                ),
                max_size=3,
            )
        ),
        "placement": draw(st.one_of(st.sampled_from(PLACEMENTS), st.text(max_size=30))),
        "timeout": draw(st.one_of(st.sampled_from(HOSTILE_FLOATS + [5.0]), st.floats())),
    }


def submit_raw(client: Client, spec: dict[str, Any]) -> dict[str, Any]:
    async def make(compute: Any) -> dict[str, Any]:
        request = compute.submit_request()
        task = request.task
        task.kernel, task.placement, task.timeoutSeconds = spec["kernel"], spec["placement"], spec["timeout"]
        slots = task.init("operands", len(spec["operands"]))
        for slot, (dtype, shape, chunks) in zip(slots, spec["operands"], strict=True):
            slot.dtype, slot.shape = dtype, shape
            parts = slot.init("chunks", len(chunks))
            for i, chunk in enumerate(chunks):
                parts[i] = chunk
        params = task.init("params", len(spec["params"]))
        for slot, (name, value) in zip(params, spec["params"], strict=True):
            slot.name, slot.value = name, value
        r = (await request.send()).result
        return {"kind": str(r.errorKind), "message": str(r.errorMessage), "outputs": len(r.outputs)}

    return dict(raw(client, make))


@pytest.mark.parametrize("timeout", [math.nan, -5.0, math.inf, -math.inf, 1e300])
def test_submit_bad_timeout_is_a_bad_input_result(client: Client, timeout: float) -> None:
    a = [("float64", [2, 2], [bytes(32)])] * 2
    answer = submit_raw(
        client, {"kernel": "matmul", "operands": a, "params": [], "placement": "local", "timeout": timeout}
    )
    assert answer["kind"] == "bad-input", answer
    assert_one_line(answer["message"])
    assert "timeoutSeconds" in answer["message"] and repr(timeout) in answer["message"], answer
    with pytest.raises(TaskError, match="bad timeoutSeconds") as info:
        client.submit("matmul", np.eye(2), np.eye(2), timeout_s=timeout)
    assert info.value.kind == "bad-input"
    assert_still_serving(client)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(spec=task_specs())
def test_submit_hostile_requests_get_results_and_the_node_keeps_serving(client: Client, spec: dict[str, Any]) -> None:
    answer = submit_raw(client, spec)  # a remote exception (KjException) fails the test here
    if answer["kind"]:
        assert answer["outputs"] == 0, answer
        assert_one_line(answer["message"])
        assert answer["kind"] != "internal", answer  # every bad argument has a kind of its own
    else:
        assert answer["outputs"] >= 1, answer
    assert_still_serving(client)


# ---------------------------------------------------------------- connect, peers, status, login


def connect_raw(client: Client, multiaddr: str) -> dict[str, Any]:
    async def make(compute: Any) -> dict[str, Any]:
        r = await compute.connect(multiaddr)
        return {"kind": str(r.errorKind), "message": str(r.errorMessage), "peer": str(r.peer.peerId)}

    return dict(raw(client, make))


MULTIADDRS = [
    "",
    "garbage",
    "/ip4/999.1.1.1/tcp/5/p2p/" + PEER_ID,
    "/ip6/::1/tcp/70000/p2p/" + PEER_ID,
    "/ip4/127.0.0.1/tcp/1",
    "/ip4/127.0.0.1/tcp/1/p2p/notapeerid",
    "/ip4/127.0.0.1/tcp/1/p2p/" + PEER_ID,  # nothing listens: refused at once
    "pangea://ip4/127.0.0.1/tcp/1/p2p/" + PEER_ID + "#ABCD-EFGH",
    "/" * 5000,
    "/ip4/127.0.0.1/tcp/1/p2p/" + "1" * 100_000,
    "ü/\x00",
]


@pytest.mark.parametrize("multiaddr", MULTIADDRS, ids=range(len(MULTIADDRS)))
def test_connect_malformed_or_dead_address_is_an_error_result(client: Client, multiaddr: str) -> None:
    answer = connect_raw(client, multiaddr)
    assert answer["kind"] and answer["kind"] != "internal", answer
    assert_one_line(answer["message"])
    assert answer["message"].startswith("cannot "), answer
    if answer["kind"] != "unreachable":  # NOTE: a dial takes its 10 s again
        with pytest.raises(RpcError) as info:
            client.connect(multiaddr)
        assert info.value.kind == answer["kind"]
        assert_one_line(str(info.value))
    assert_still_serving(client)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(multiaddr=st.one_of(st.text(max_size=40), st.text(max_size=20).map(lambda t: f"/ip4/{t}/tcp/1/p2p/{PEER_ID}")))
def test_connect_generated_addresses_get_error_results(client: Client, multiaddr: str) -> None:
    answer = connect_raw(client, multiaddr)
    assert answer["kind"], answer
    assert_one_line(answer["message"])


def test_peers_and_status_answer_without_error_fields(client: Client) -> None:
    async def make(compute: Any) -> tuple[str, str]:
        peers, status = await compute.peers(), await compute.status()
        return str(peers.errorKind), str(status.errorKind)

    assert raw(client, make) == ("", "")
    assert client.status()["peer_id"].startswith("12D3KooW")
    assert client.peers() == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.one_of(st.sampled_from(["", TOKEN[:-1], TOKEN + "x", "\x00" * 64, "x" * 100_000]), st.text()))
def test_login_with_a_bad_token_is_refused_in_one_line(node: ServeNode, client: Client, token: str) -> None:
    with pytest.raises(RpcError) as info:
        Client(node.rpc, token=token, timeout_s=ANSWER_S)
    assert "login refused: wrong or missing RPC token" in str(info.value)
    assert_one_line(str(info.value))
    assert_still_serving(client)


# ---------------------------------------------------------------- the real pyz


def closed_stdout_run(pyz: Path, args: list[str], home: NodeHome) -> tuple[int, str]:
    """Run the pyz with a stdout nobody reads (like `| head -1` once head has left)."""
    proc = subprocess.Popen(
        [str(pyz), *args], env=home.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes its first line
    err = proc.stderr.read().decode(errors="replace")
    return proc.wait(timeout=60), err


def test_status_and_call_peers_with_a_closed_stdout_end_quietly(pyz: Path, node: ServeNode) -> None:
    for args in (["status"], ["status", "--json"], ["call", "--rpc", node.rpc, "--token", TOKEN, "peers"]):
        code, err = closed_stdout_run(pyz, args, node.home)
        err = "".join(line for line in err.splitlines(True) if not line.startswith("pangea: warning: --token "))
        assert (code, err) == (0, ""), (args, code, err)


@pytest.mark.parametrize(
    "args",
    [
        ["initiate", "--timeout", "-5", "--port", "0"],
        ["respond", "pangea://ip4/127.0.0.1/tcp/1/p2p/" + PEER_ID + "#ABCD-EFGH", "--timeout", "-5"],
        ["status", "--size", "8"],  # an option of another command
        ["serve", "--task-timeout", "nan", "--port", "0"],
    ],
)
def test_pyz_refuses_bad_command_lines_in_one_line(pyz: Path, pangea_home: NodeHome, args: list[str]) -> None:
    run = run_pyz(pyz, args, pangea_home.env)
    assert run.returncode == 2, run
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("pangea: error: ") and lines[1].startswith("hint: "), run.stderr
    assert run.stdout == "", run.stdout


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    verb=st.sampled_from(["initiate", "respond", "doctor", "bench"]),  # NOTE: serve has no --timeout (it runs on)
    value=st.sampled_from(["-5", "nan", "inf", "1e400", "٣", ""]),
)
def test_pyz_hostile_timeouts_end_tidily(pyz: Path, pangea_home: NodeHome, verb: str, value: str) -> None:
    run = run_pyz(pyz, [verb, "--timeout", value], pangea_home.env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run
    assert run.stderr.startswith(f"pangea: error: argument --timeout: got {value!r}; expected "), run.stderr

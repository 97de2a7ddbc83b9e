"""The bulk channel: a Client on the node's box passes arrays in shared memory.

A `Client` of a plain loopback endpoint of a node of its home opens the node's bulk
socket (0600 in a 0700 directory, its path in the node's session file), hands each
task's operands over as sealed memfd segments and gets the output written into a
segment of its own; the RPC carries only the metadata. These tests check the results
are numpy's for every dtype and layout the Client takes, locally and on a remote
worker; that another user of the box can neither reach the socket nor open a segment;
that a client killed mid-call leaves nothing mapped in the node; and that a client
without the channel (PANGEA_NO_SHM, shared_memory=False, no session file) still works.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome
from pyz_helpers import Pair, ServeNode, running_pair, start_serve

import pangea
from pangea import ALLOWED_DTYPES, Client

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 120.0  # every call here answers well within it on a loaded box
CONNECT_TIMEOUT_S = 60.0
RELEASE_TIMEOUT_S = 60.0  # a killed client's segments are unmapped once its task's kernel returns
NOBODY = 65534
SHARED = "shared memory, result: shared memory"


@pytest.fixture(scope="module")
def pair(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """B (trusting A), then A with --peer B: A's clients reach B's kernels over the data plane."""
    with running_pair(pyz, tmp_path_factory.mktemp("shm-pair")) as pair:
        yield pair


@pytest.fixture
def node(pyz: Path, pangea_home: NodeHome) -> Iterator[ServeNode]:
    served = start_serve(pyz, pangea_home, name="serve")
    try:
        yield served
    finally:
        served.proc.stop()


def client_of(node: ServeNode, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> Client:
    """A Client of ``node`` run from the node's home (where it finds the bulk socket); every task
    through shared memory, however small, unless ``bulk_min_bytes`` says otherwise."""
    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home))
    kwargs.setdefault("bulk_min_bytes", 0)
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S, **kwargs)  # type: ignore[arg-type]


def layouts(dtype: str) -> dict[str, np.ndarray]:
    """One array of ``dtype`` in each layout a Client takes."""
    rng = np.random.default_rng(abs(hash(dtype)) % 1000)
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


def segment_fds(pid: int) -> list[str]:
    """The descriptors of pangea's shared segments open in process ``pid``."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # NOTE: one closed as we look (the listing's own)
            if "memfd:pangea" in os.readlink(fd):
                found.append(fd.name)
    return found


def bulk_lines(pid: int) -> tuple[int, int]:
    """(mappings, descriptors) of pangea's shared segments in process ``pid``."""
    maps = sum("memfd:pangea" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return maps, len(segment_fds(pid))


@pytest.mark.parametrize("placement", ["local", "remote"])
def test_shared_memory_results_equal_numpys_for_every_dtype_and_layout(
    pair: Pair, placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_of(pair.a, monkeypatch) as c:
        assert c.shared_memory, c.shared_memory_note
        for dtype in ALLOWED_DTYPES:
            for layout, a in layouts(dtype).items():
                b = np.ones_like(a) * 3
                got = c.submit("add", a, b, placement=placement, fallback=False)
                want = a + b
                assert got.dtype == want.dtype.newbyteorder("<") and got.shape == want.shape, (dtype, layout)
                assert np.array_equal(got, want), (dtype, layout)
                task = c.last_task
                assert task["ran_on"] == ("local" if placement == "local" else pair.b.peer_id)
                assert task["arrays_via"] == ("RPC messages" if layout == "empty" else SHARED), (dtype, layout)
        # a kernel whose output differs in shape and dtype from its operands, and one of one operand
        m = np.arange(12.0).reshape(3, 4)
        assert np.array_equal(c.submit("matmul", m, m.T, placement=placement, fallback=False), m @ m.T)
        assert c.submit("sum", m, placement=placement, fallback=False) == m.sum()
        assert c.last_task["arrays_via"] == SHARED
        # a result the caller owns: writable, alive after the client is gone
        kept = c.submit("scale", m, factor=2.0, placement=placement, fallback=False)
    kept += 1
    assert np.array_equal(kept, m * 2 + 1)


def test_a_client_without_the_bulk_channel_still_works(node: ServeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.arange(24.0).reshape(4, 6)
    monkeypatch.setenv("PANGEA_NO_SHM", "1")
    with client_of(node, monkeypatch) as c:
        assert not c.shared_memory and "PANGEA_NO_SHM" in c.shared_memory_note
        assert np.array_equal(c.submit("add", a, a), a + a)
        assert c.last_task["arrays_via"] == "RPC messages"
    monkeypatch.delenv("PANGEA_NO_SHM")
    with client_of(node, monkeypatch, shared_memory=False) as c:
        assert not c.shared_memory and "shared_memory=False" in c.shared_memory_note
        assert np.array_equal(c.submit("transpose", a), a.T)
        assert c.last_task["arrays_via"] == "RPC messages"
    # a client of another home does not find the node's bulk socket: it says so and still works
    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home.parent / "elsewhere"))
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as c:
        assert not c.shared_memory and "no node of this home announced a bulk socket" in c.shared_memory_note
        assert np.array_equal(c.submit("scale", a, factor=3.0), a * 3)
    # and the node's own client uses it, the same node serving both
    with client_of(node, monkeypatch) as c:
        assert c.shared_memory and np.array_equal(c.submit("add", a, a), a + a)
        assert c.last_task["arrays_via"] == SHARED


def test_a_small_task_travels_in_the_message_and_a_large_one_in_shared_memory(
    node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_of(node, monkeypatch, bulk_min_bytes=pangea.BULK_MIN_BYTES) as c:
        assert c.shared_memory, c.shared_memory_note
        tiny = np.arange(16.0).reshape(4, 4)  # 128 bytes each, 384 with the result
        assert np.array_equal(c.submit("add", tiny, tiny), tiny + tiny)
        assert c.last_task["arrays_via"] == "RPC messages"
        edge = np.ones(pangea.BULK_MIN_BYTES // 8 // 2)  # operand and result: exactly the threshold
        assert np.array_equal(c.submit("scale", edge, factor=2.0), edge * 2)
        assert c.last_task["arrays_via"] == SHARED
        large = np.random.default_rng(3).standard_normal((256, 256))  # 512 KiB
        assert np.array_equal(c.submit("add", large, large), large + large)
        assert c.last_task["arrays_via"] == SHARED
    with client_of(node, monkeypatch, bulk_min_bytes=1 << 30) as c:  # raised: 512 KiB in the message too
        assert np.array_equal(c.submit("add", large, large), large + large)
        assert c.last_task["arrays_via"] == "RPC messages"
    with pytest.raises(pangea.UsageError, match="bad bulk_min_bytes -1"):
        Client(node.rpc, token=node.token, bulk_min_bytes=-1)


def _prepared(c: Client) -> tuple[list[Any], list[Any]]:
    """The segments ``c`` prepared ahead and has not used yet (operands', results'), once made."""
    for pool in (c._pool, c._out_pool):
        if pool._warming is not None:
            pool._warming.join(30)
    return list(c._pool._prepared), list(c._out_pool._prepared)


def test_a_client_prepares_its_first_segments_as_it_connects_uses_them_and_releases_them_on_close(
    node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    mib = 1 << 20
    a = np.random.default_rng(5).standard_normal(8 * mib // 8)
    with client_of(node, monkeypatch, warm_mib=8) as c:
        assert c.shared_memory, c.shared_memory_note
        (operand,), (result,) = _prepared(c)
        assert (operand.size, result.size) == (8 * mib, 8 * mib)  # a result's: the output bound is its bytes
        assert os.fstat(operand.fd).st_blocks * 512 == 8 * mib  # touched ahead
        assert os.fstat(result.fd).st_blocks * 512 == 8 * mib  # the first 8 MiB only
        got = c.submit("scale", a, factor=2.0, placement="local")
        assert np.array_equal(got, a * 2) and c.last_task["arrays_via"] == SHARED
        assert _prepared(c) == ([], [])  # both used by the first call
        assert c._pool._free == [operand]  # back in the pool for the next call
        assert os.fstat(result.fd).st_blocks * 512 == 8 * mib  # the node wrote only the result's pages
    assert operand.fd < 0  # closed with the client
    assert result.fd >= 0 and np.array_equal(got, a * 2)  # the caller's result outlives it...
    del got
    assert result.fd < 0  # ...and its segment goes with it


def test_a_client_prepares_nothing_with_warm_mib_0_or_without_shared_memory(
    node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = np.arange(24.0).reshape(4, 6)
    for kwargs in ({"warm_mib": 0}, {"shared_memory": False}):
        with client_of(node, monkeypatch, **kwargs) as c:
            assert c._pool._warming is None and c._out_pool._warming is None, kwargs
            assert np.array_equal(c.submit("add", a, a), a + a)
    # a client of another home finds no bulk socket: it prepares nothing either
    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home.parent / "elsewhere"))
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as c:
        assert not c.shared_memory and c._pool._warming is None


def _nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_another_user_of_the_box_can_neither_reach_the_bulk_socket_nor_open_a_segment(
    node: ServeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user (setpriv)")
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("needs /usr/bin/python3.11 for the probe")
    with client_of(node, monkeypatch) as c:
        assert c.shared_memory, c.shared_memory_note
        path = Path(c.shared_memory_note.removeprefix("on: "))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        a = np.arange(1 << 16, dtype=np.float64)
        assert np.array_equal(c.submit("scale", a, factor=2.0), a * 2)
        # the client keeps its operand segments for reuse: a stranger tries to open one
        segments = segment_fds(os.getpid())  # NOTE: the Client runs in this process
        assert segments, "the client keeps no segment to probe"
        probe = textwrap.dedent(
            """
            import socket, sys
            path, pid, fds = sys.argv[1], sys.argv[2], sys.argv[3:]
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
                print("connected")
            except PermissionError:
                print("socket refused")
            for fd in fds:
                try:
                    open(f"/proc/{pid}/fd/{fd}", "rb").read(1)
                    print("opened")
                except PermissionError:
                    print("segment refused")
            """
        )
        result = _nobody("/usr/bin/python3.11", "-c", probe, str(path), str(os.getpid()), *segments)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[0] == "socket refused", result.stdout
        assert result.stdout.count("segment refused") == len(segments), result.stdout
        assert "opened" not in result.stdout and "connected" not in result.stdout
        # the legitimate client still gets its answer
        assert np.array_equal(c.submit("add", a, a), a + a)


KILLED_CLIENT = """
import os, sys
import numpy as np
import pangea
n = int(sys.argv[2])
with pangea.Client(sys.argv[1], timeout_s=600) as c:
    assert c.shared_memory, c.shared_memory_note
    a = np.random.default_rng(1).standard_normal((n, n))
    print("submitting", flush=True)
    c.submit("matmul", a, a, placement="local")
    print("done", flush=True)
"""


def test_a_client_killed_mid_call_leaves_no_segment_in_the_node(
    node: ServeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline = bulk_lines(node.proc.pid)
    assert baseline == (0, 0)
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    env = {
        **os.environ,
        "PANGEA_HOME": str(node.home.pangea_home),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    child = subprocess.Popen(
        [sys.executable, str(script), node.rpc, "3000"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        mapped = False
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while time.monotonic() < deadline and child.poll() is None:
            if bulk_lines(node.proc.pid)[0] > 0:  # the node maps the task's segments
                mapped = True
                break
            time.sleep(0.01)
        assert mapped, f"the node never mapped the client's segments (client exit {child.poll()})"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while time.monotonic() < deadline and bulk_lines(node.proc.pid) != baseline:
        time.sleep(0.1)
    assert bulk_lines(node.proc.pid) == baseline, Path(f"/proc/{node.proc.pid}/maps").read_text()[-2000:]
    # and the node keeps serving, shared memory included
    with client_of(node, monkeypatch) as c:
        a = np.arange(6.0).reshape(2, 3)
        assert c.shared_memory and np.array_equal(c.submit("add", a, a), a + a)


def test_threads_and_futures_on_the_shared_memory_path_each_get_their_own_answer(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    with client_of(pair.a, monkeypatch) as c:
        assert c.shared_memory, c.shared_memory_note

        def caller(seed: int) -> int:
            rng = np.random.default_rng(seed)
            for i in range(40):
                n = 1 + (seed * 7 + i) % 50
                a, b = rng.standard_normal((n, n + 1)), rng.standard_normal((n + 1, n))
                calls = [("matmul", (a, b), a @ b), ("add", (a, a), a + a), ("transpose", (a,), a.T)]
                kernel, arrays, want = calls[i % 3]
                got = c.submit(kernel, *arrays)
                assert got.shape == want.shape and np.allclose(got, want), (seed, i, kernel)
                assert c.last_task["kernel"] == kernel and c.last_task["arrays_via"] == SHARED
            return seed

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(caller, range(8))) == list(range(8))
        # futures and map share the pools: every result its own
        xs = [np.full((64, 64), float(k)) for k in range(40)]
        assert [float(s) for s in c.map("sum", xs)] == [64 * 64 * k for k in range(40)]
        futures = [c.future("scale", x, factor=2.0) for x in xs]
        cancelled = futures[-1].cancel()
        for k, f in enumerate(futures[:-1]):
            assert np.array_equal(f.result(CLIENT_TIMEOUT_S), xs[k] * 2) and f.task["arrays_via"] == SHARED
        assert cancelled or np.array_equal(futures[-1].result(CLIENT_TIMEOUT_S), xs[-1] * 2)
    # nothing of the client's stays mapped in the node
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while time.monotonic() < deadline and bulk_lines(pair.a.proc.pid) != (0, 0):
        time.sleep(0.1)
    assert bulk_lines(pair.a.proc.pid) == (0, 0)


@pytest.mark.parametrize("placement", ["local", "remote"])
def test_client_empty_arrays_and_results_pass_as_operands_without_a_copy(
    pair: Pair, placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run: dict[str, Any] = {"placement": placement, "fallback": False}
    with client_of(pair.a, monkeypatch) as c:
        assert c.shared_memory, c.shared_memory_note
        a = c.empty((300, 400))
        assert a.shape == (300, 400) and a.dtype == np.float64 and a.flags.writeable and a.flags.c_contiguous
        a[...] = np.arange(a.size, dtype=np.float64).reshape(a.shape)  # filled in place
        plain = np.arange(a.size, dtype=np.float64).reshape(a.shape)
        assert c.operands_copied == 0
        doubled = c.submit("scale", a, factor=2.0, **run)
        assert np.array_equal(doubled, plain * 2) and c.last_task["arrays_via"] == SHARED
        assert c.operands_copied == 0, "an array of empty() is read where it is"
        summed = c.submit("add", doubled, a, **run)  # a result passed on, beside the empty array
        assert np.array_equal(summed, plain * 3) and c.operands_copied == 0
        assert np.array_equal(c.submit("subtract", a, a, **run), plain * 0) and c.operands_copied == 0  # twice
        rows = a[100:250]  # a C-ordered view at an offset in its segment
        assert np.array_equal(c.submit("multiply", rows, summed[100:250], **run), plain[100:250] * plain[100:250] * 3)
        assert c.operands_copied == 0, "views at an offset are read in place"
        tail = summed.reshape(-1)[7:1007]  # an odd offset, 1-d
        assert np.array_equal(
            c.submit("dot", tail, tail, **run), np.dot(plain.reshape(-1)[7:1007] * 3, plain.reshape(-1)[7:1007] * 3)
        )
        assert c.operands_copied == 0
        assert np.array_equal(c.submit("add", a.T, plain.T, **run), plain.T * 2)  # a transposed view: copied
        assert c.operands_copied == 2, "the transposed view and the plain numpy array are copied"
        ints = c.empty(5, "int32")
        ints[:] = [1, 2, 3, 4, 5]
        assert np.array_equal(c.submit("scale", ints, factor=0.5, **run), [0.5, 1.0, 1.5, 2.0, 2.5])
        assert c.operands_copied == 2
        for shape in ((0,), (3, 0)):  # empty arrays: nothing to share, they travel in the message
            nothing = c.empty(shape)
            assert nothing.shape == shape and c.submit("add", nothing, nothing, **run).shape == shape
        assert c.operands_copied == 2
        with pytest.raises(pangea.UsageError, match="float16"):
            c.empty(3, "float16")
        # dropped (with its views), an empty array's segment goes back to the pool: no longer shared
        before = len(c._shared)
        del a, rows
        gc.collect()
        assert len(c._shared) == before - 1
        again = c.empty((300, 400))
        again[...] = 1.0
        assert np.array_equal(c.submit("add", again, again, **run), np.full((300, 400), 2.0))
        assert c.operands_copied == 2
    # without shared memory, empty() is numpy's own and every operand travels in the message
    with client_of(pair.a, monkeypatch, shared_memory=False) as c:
        plain_empty = c.empty((4, 5), np.float32)
        assert type(plain_empty) is np.ndarray and plain_empty.shape == (4, 5) and plain_empty.dtype == np.float32
        plain_empty[...] = 2.0
        assert np.array_equal(c.submit("add", plain_empty, plain_empty, **run), np.full((4, 5), 4.0, np.float32))
        assert c.last_task["arrays_via"] == "RPC messages" and c.operands_copied == 0


def _raw_submit(node: ServeNode, fill: Any) -> tuple[str, str, list[Any]]:
    """A task built by pycapnp alone (no pangea.Client): (errorKind, errorMessage, output arrays)."""
    import asyncio

    import capnp
    import pangea

    host, port = node.rpc.rsplit(":", 1)

    async def main() -> tuple[str, str, list[Any]]:
        async with capnp.kj_loop():  # type: ignore[attr-defined]
            stream = await asyncio.wait_for(capnp.AsyncIoStream.create_connection(host, int(port)), 10)  # type: ignore[attr-defined]
            gate = capnp.TwoPartyClient(stream).bootstrap().cast_as(pangea.load_schema().Gate)  # type: ignore[attr-defined]
            compute = (await asyncio.wait_for(gate.login(node.token or ""), 10)).compute
            request = compute.submit_request()
            fill(request.task)
            result = (await asyncio.wait_for(request.send(), CLIENT_TIMEOUT_S)).result
            outputs = [pangea.array_from_capnp(o) for o in result.outputs]
            return str(result.errorKind), str(result.errorMessage), outputs

    return asyncio.run(main())


def test_a_plain_capnp_client_sends_arrays_in_its_messages_and_cannot_name_segments_it_did_not_hand_over(
    node: ServeNode,
) -> None:
    import pangea

    a = np.arange(6.0)

    def in_message(task: Any) -> None:
        task.kernel = "scale"
        pangea.array_to_capnp(task.init("operands", 1)[0], a)
        (param,) = task.init("params", 1)
        param.name, param.value = "factor", 2.0

    kind, message, outputs = _raw_submit(node, in_message)
    assert (kind, message) == ("", "") and np.array_equal(outputs[0], a * 2)

    def forged(batch: bytes, segment: int) -> Any:
        def fill(task: Any) -> None:
            task.kernel = "sum"
            (slot,) = task.init("operands", 1)
            slot.dtype, slot.shape = "float64", [6]
            slot.shared.segment = segment
            task.bulkBatch = batch

        return fill

    for batch, segment, needle in [
        (bytes(16), 1, "no shared segments under the batch"),  # a batch nobody handed over
        (b"", 1, "operand 0: no shared segment 1"),  # a segment without a batch
    ]:
        kind, message, _ = _raw_submit(node, forged(batch, segment))
        assert kind == "bad-input" and needle in message, (kind, message)
    # the node keeps serving
    kind, message, outputs = _raw_submit(node, in_message)
    assert kind == "" and np.array_equal(outputs[0], a * 2)

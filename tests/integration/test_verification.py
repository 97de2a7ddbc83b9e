"""Result verification against real workers: no honest worker accused, small lies caught.

A serve node A (driven with `pangea.Client`, as a user would) has ``--peer`` an
honest serve worker B and one lying worker per small lie (``--fault
lie=KIND``: the largest entry off by 1e-6 relative, a sign flipped, two rows
swapped, a NaN put in, an integer off by one). Every call of tests/corpus.py
(NaN, inf, overflow, underflow and subnormals, integer wrap-around, float32,
complex, empty arrays, condition numbers up to 1e12, Hilbert matrices up to 12,
huge and tiny magnitudes) runs on B with ``placement=B``: it must run there,
pass A's check at the first attempt and equal numpy's result (exactly where
numpy is exact, else within the check's rounding-error bound). Each liar's
result must fail A's check and the task come back right from another worker.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from corpus import LIES, Case, corpus
from helpers import Proc, make_node_home, wait_until
from pyz_helpers import ServeNode, launch_serve, peer_id_of, serve_node, start_serve

import pangea
from pangea import Client, reference_result, verify

READY_TIMEOUT_S = 120.0  # several serve nodes start side by side on 2 cores
CONNECT_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 120.0
EXACT_KERNELS = ("add", "subtract", "multiply", "transpose", "scale", "random")  # one correctly rounded answer


@dataclass
class Lab:
    """A (the node the client talks to), the honest worker B, and a liar per kind of LIES."""

    a: ServeNode
    b: ServeNode
    liars: dict[str, ServeNode]


@pytest.fixture(scope="module")
def lab(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("verification")
    home_a = make_node_home(base, "a")
    trust = ["--allow-peer", peer_id_of(pyz, home_a)]
    kinds = ["honest", *LIES]
    with contextlib.ExitStack() as stack:
        launched = {}
        for kind in kinds:
            home = make_node_home(base, kind)
            fault = [] if kind == "honest" else ["--fault", f"lie={kind}"]
            launched[kind] = (stack.enter_context(launch_serve(pyz, home, *trust, *fault, name=f"serve-{kind}")), home)
        workers = {kind: serve_node(proc, home, READY_TIMEOUT_S) for kind, (proc, home) in launched.items()}
        peers = [arg for w in workers.values() for arg in ("--peer", w.address)]
        a_proc = stack.enter_context(launch_serve(pyz, home_a, "-v", *peers, name="serve-A"))
        a = serve_node(a_proc, home_a, READY_TIMEOUT_S)
        for w in workers.values():
            a.proc.wait_for_line(rf"^pangea: connected to peer {w.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        honest = workers.pop("honest")
        yield Lab(a, honest, workers)


@pytest.fixture
def nodes(lab: Lab) -> Lab:
    """The module's nodes; their output goes into the report of a failing test."""
    every = [lab.a, lab.b, *lab.liars.values()]
    Proc.started.extend(n.proc for n in every)  # NOTE: started before this test, so list them again
    for node in every:
        assert node.proc.returncode is None, f"a node of the module has exited\n{node.proc.output()}"
    return lab


def run_on(node: ServeNode, worker: ServeNode, case: Case) -> tuple[np.ndarray, dict[str, Any]]:
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        out = rpc.submit(case.kernel, *case.operands, placement=worker.peer_id, **case.params)
        return np.asarray(out), rpc.last_task


def failed_verification(node: ServeNode) -> list[str]:
    return [line for line in node.proc.stderr_lines if "failed verification" in line]


def test_an_honest_worker_passes_every_awkward_call_and_matches_numpy(nodes: Lab) -> None:
    before = len(failed_verification(nodes.a))
    ran = []
    for case in corpus():
        out, task = run_on(nodes.a, nodes.b, case)
        assert task["ran_on"] == nodes.b.peer_id, (case.id, task)
        assert task["attempts"] == [{"worker": nodes.b.peer_id, "outcome": "ok"}], (case.id, task)
        expected = np.asarray(reference_result(case.kernel, case.operands, case.params))
        assert out.shape == expected.shape and out.dtype == expected.dtype, (case.id, out.dtype, expected.dtype)
        if case.kernel in EXACT_KERNELS or expected.dtype.kind not in "fc":
            assert np.array_equal(out, expected, equal_nan=True), case.id
        else:
            verify(case.id, out, expected, case.operands, case.params, kernel=case.kernel)
            assert np.array_equal(np.isnan(out), np.isnan(expected)) or case.kernel in ("solve", "inverse"), case.id
        ran.append(case.id)
    assert failed_verification(nodes.a)[before:] == [], nodes.a.proc.output()
    assert failed_verification(nodes.b) == []
    assert len(ran) == len(corpus())


@pytest.mark.parametrize("kind", LIES)
def test_a_small_lie_is_caught_and_the_task_runs_right_elsewhere(nodes: Lab, kind: str) -> None:
    rng = np.random.default_rng(17)
    a: np.ndarray
    if kind == "plus-one":
        a = rng.integers(1 << 40, 1 << 50, (60, 60))  # wraps around: the product is right modulo 2**64
    else:
        a = rng.standard_normal((120, 120))
    case = Case(kind, "matmul", [a, a.T.copy()])
    liar = nodes.liars[kind]
    out, task = run_on(nodes.a, liar, case)
    expected = a @ a.T
    if expected.dtype.kind == "i":
        assert np.array_equal(out, expected)
    else:
        verify("matmul", out, expected, case.operands)
    first, *rest = task["attempts"]
    assert first["worker"] == liar.peer_id, task
    assert first["outcome"].startswith("wrong-result: ") and "failed verification" in first["outcome"], first
    assert "matmul: the result fails Freivalds' check" in first["outcome"] or kind == "nan", first
    assert "matmul: the result is wrong at [0, 0] (got np.float64(nan)" in first["outcome"] or kind != "nan", first
    assert rest and rest[-1]["outcome"] == "ok" and task["ran_on"] != liar.peer_id, task
    # NOTE: A's log line reaches this process through a pipe a moment after the answer: wait for it
    wait_until(
        lambda: any(liar.peer_id in line for line in failed_verification(nodes.a)), 20, "A logs the failed check"
    )


NUMPY_LIES: list[tuple[str, dict[str, Any]]] = [
    ("divide", {}),
    ("mean", {"axis": 0}),
    ("cumsum", {"axis": 1}),
    ("reshape", {"shape": (-1,)}),
    ("fft", {}),
    ("svd", {}),
    ("eigh", {}),
    ("qr", {}),
    ("cholesky", {}),
    ("lstsq", {}),
    ("pinv", {}),
]


@pytest.mark.parametrize(("kernel", "params"), NUMPY_LIES, ids=[k for k, _ in NUMPY_LIES])
def test_a_lie_in_a_numpy_kernel_is_caught_by_its_check(nodes: Lab, kernel: str, params: dict[str, Any]) -> None:
    rng = np.random.default_rng(23)
    a = rng.standard_normal((40, 40))
    operands = {
        "divide": [a, np.abs(a) + 1.0],
        "eigh": [a @ a.T + 40 * np.eye(40)],
        "cholesky": [a @ a.T + 40 * np.eye(40)],
        "lstsq": [a, a[:, 0].copy()],
    }.get(kernel, [a])
    liar = nodes.liars["relative"]
    with Client(nodes.a.rpc, token=nodes.a.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        out = rpc.submit(kernel, *operands, placement=liar.peer_id, **params)
        task = rpc.last_task
    first, *rest = task["attempts"]
    assert first["worker"] == liar.peer_id and first["outcome"].startswith("wrong-result: "), task
    assert f"{kernel}: " in first["outcome"] and "failed verification" in first["outcome"], first
    assert rest and rest[-1]["outcome"] == "ok" and task["ran_on"] != liar.peer_id, task
    outputs = out if isinstance(out, tuple) else (out,)
    assert pangea.check_result(kernel, operands, params, outputs, random.Random(0)) is None  # right this time


def test_an_unverified_kernel_says_so_and_a_recompute_check_catches_its_lie(
    nodes: Lab, pyz: Path, tmp_path: Path
) -> None:
    a = np.random.default_rng(29).standard_normal((30, 30))
    # a liar of its own: the module's are suspect by now (their lies were caught), so A would not use them
    trust = ["--allow-peer", nodes.a.peer_id]
    liar = start_serve(pyz, make_node_home(tmp_path, "liar"), *trust, "--fault", "lie=relative", name="serve-liar")
    with contextlib.ExitStack() as stack:
        stack.callback(liar.proc.stop)
        rpc = stack.enter_context(Client(nodes.a.rpc, token=nodes.a.token, timeout_s=CLIENT_TIMEOUT_S))
        rpc.connect(liar.address)
        taken = rpc.submit("det", a, placement=liar.peer_id)
        task = rpc.last_task
        assert task["ran_on"] == liar.peer_id and task["verification"] == "unverified", task  # taken as sent
        assert not task["verified_by_node"]
        assert float(taken) != float(np.linalg.det(a))  # the lie came through: nothing checked it
        checked = rpc.submit("det", a, placement=liar.peer_id, check="recompute")
        task = rpc.last_task
    first, *rest = task["attempts"]
    assert first["worker"] == liar.peer_id and first["outcome"].startswith("wrong-result: "), task
    assert rest and task["ran_on"] != liar.peer_id and task["verification"] in ("local", "recompute"), task
    assert float(checked) == pytest.approx(float(np.linalg.det(a)), rel=1e-9)


@pytest.mark.parametrize("kernel", ["eigh", "inv", "svd"])
def test_a_stack_of_matrices_is_checked_matrix_by_matrix_on_a_real_worker(nodes: Lab, kernel: str) -> None:
    rng = np.random.default_rng(31)
    a3 = rng.standard_normal((3, 24, 24))
    stack = a3 @ np.swapaxes(a3, -1, -2) + 24 * np.eye(24)  # Hermitian, positive definite, well conditioned
    liar = nodes.liars["relative"]
    with Client(nodes.a.rpc, token=nodes.a.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        honest = rpc.submit(kernel, stack, placement=nodes.b.peer_id)
        assert rpc.last_task["verification"] != "unverified" and rpc.last_task["ran_on"] == nodes.b.peer_id
        out = rpc.submit(kernel, stack, placement=liar.peer_id)
        task = rpc.last_task
    numpy_fn: Any = {"eigh": np.linalg.eigh, "inv": np.linalg.inv, "svd": np.linalg.svd}[kernel]
    want = numpy_fn(stack)
    for got in (honest, out):
        first = got[0] if isinstance(got, tuple) else got
        ref = want[1] if kernel == "svd" else want[0] if kernel == "eigh" else want
        np.testing.assert_allclose(got[1] if kernel == "svd" else first, ref, rtol=1e-9, atol=1e-9)
    first_attempt, *rest = task["attempts"]
    assert first_attempt["worker"] == liar.peer_id and first_attempt["outcome"].startswith("wrong-result: "), task
    assert f"{kernel}: matrix [" in first_attempt["outcome"] and "of the stack" in first_attempt["outcome"], task
    assert rest and rest[-1]["outcome"] == "ok" and task["ran_on"] != liar.peer_id, task

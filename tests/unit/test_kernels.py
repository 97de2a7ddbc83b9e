"""Unit tests of pangea.py's kernels: the registry and its input checks.

Every kernel is compared with numpy on random inputs; every bad input must
raise KernelError (kind "bad-input") whose message names the kernel and the
problem, because that text is what the peer who sent the task gets back.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from corpus import Case, corpus, lie, reordered, with_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pangea
from pangea import (
    ALLOWED_DTYPES,
    FREIVALDS_ROUNDS,
    KERNELS,
    MAX_RANDOM_ELEMENTS,
    CheckFailed,
    Fault,
    Kernel,
    KernelError,
    TaskError,
    UsageError,
    check_inputs,
    check_result,
    output_nbytes,
    parse_fault,
    reference_result,
    run_kernel,
    task_cost,
    verify,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str = "float64") -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "i":
        return rng.integers(-50, 50, size=shape).astype(dtype)
    if kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def well_conditioned(rng: np.random.Generator, n: int, dtype: str = "float64") -> np.ndarray:
    return (random_array(rng, (n, n), dtype) + n * np.eye(n)).astype(dtype)


def assert_close(got: Any, want: Any, dtype: str) -> None:
    """Compare with a tolerance that fits the precision of ``dtype``."""
    tol = 1e-4 if dtype in ("float32", "complex64") else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def kernel_error(name: str, operands: list[Any], params: dict[str, float] | None = None) -> KernelError:
    with pytest.raises(KernelError) as info:
        run_kernel(name, operands, params)
    assert info.value.kind == "bad-input"
    assert isinstance(info.value, TaskError)
    return info.value


# ---------------------------------------------------------------- the registry


def test_kernels_registry_has_the_documented_kernels() -> None:
    assert set(KERNELS) - {k.name for k in (*pangea.NUMPY_ARRAY_KERNELS, *pangea.NUMPY_LINALG_KERNELS)} == {
        "matmul",
        "add",
        "subtract",
        "multiply",
        "transpose",
        "scale",
        "sum",
        "dot",
        "solve",
        "inverse",
        "random",
        "copy",
    }
    for name, kernel in KERNELS.items():
        assert kernel.name == name
        assert kernel.doc
        assert kernel.arity in (0, 1, 2, 3)


def test_kernels_every_entry_owns_each_of_its_parts() -> None:
    for name, kernel in KERNELS.items():
        for part in dataclasses.fields(Kernel):
            value = getattr(kernel, part.name)
            if part.name == "check" and kernel.verification == "unverified":
                assert value is None, f"{name}: unverified, yet it has a check"
                continue
            assert value is not None, f"{name}: {part.name} is not set"
            if part.name in ("fn", "out_nbytes", "flops", "check", "sample", "reference"):
                assert callable(value), f"{name}: {part.name} is not callable"
        operands, params = check_inputs(name, np.random.default_rng(0), 8)
        assert len(operands) == kernel.arity or (kernel.variadic and len(operands) > kernel.arity)
        assert set(params) <= set(kernel.params)


def test_kernels_a_kernel_registered_in_a_test_runs_through_every_lookup(monkeypatch: Any) -> None:
    def negate(ops: Sequence[np.ndarray], params: Any) -> tuple[np.ndarray, ...]:
        return (-ops[0],)

    def recompute(
        name: str, ops: Sequence[np.ndarray], params: Any, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
    ) -> str | None:
        return None if np.array_equal(outputs[0], -ops[0]) else f"{name}: wrong"

    toy = Kernel(
        "negate",
        1,
        negate,
        "-a",
        out_nbytes=lambda ops, params: ops[0].size * 16,
        flops=lambda ops, params: float(ops[0].size),
        check=recompute,
        sample=lambda a, b, v: ((a,), {}),
        reference=lambda ops, params: -ops[0],
    )
    monkeypatch.setitem(KERNELS, "negate", toy)
    operands, params = check_inputs("negate", np.random.default_rng(1), 4)
    (a,) = operands
    assert output_nbytes("negate", operands, params) == 16 * 16
    assert task_cost("negate", operands, params) == (16.0, a.nbytes + 16 * 16)
    (out,) = run_kernel("negate", operands, params)
    np.testing.assert_array_equal(reference_result("negate", operands, params), out)
    assert check_result("negate", operands, params, (out,), random.Random(0)) is None
    assert check_result("negate", operands, params, (out + 1,), random.Random(0)) == "negate: wrong"


@pytest.mark.parametrize("exact", [True, False])
def test_kernels_the_entry_says_whether_the_initiators_check_allows_rounding(monkeypatch: Any, exact: bool) -> None:
    toy = dataclasses.replace(KERNELS["add"], name="toy", exact=exact)
    monkeypatch.setitem(KERNELS, "toy", toy)
    expected = np.array([1.0, 2.0, 3.0])
    off_by_rounding = expected * (1 + 1e-12)
    if exact:
        with pytest.raises(CheckFailed, match="differs from local numpy"):
            verify("toy", off_by_rounding, expected)
    else:
        assert verify("toy", off_by_rounding, expected) == pytest.approx(3e-12)
    numpy_kernels = {k.name for k in (*pangea.NUMPY_ARRAY_KERNELS, *pangea.NUMPY_LINALG_KERNELS)}  # tested apart
    inexact = {name for name, k in KERNELS.items() if not k.exact} - numpy_kernels
    assert inexact == {"matmul", "sum", "dot", "solve", "inverse"} | (set() if exact else {"toy"})


# ---------------------------------------------------------------- results match numpy


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (3, 4, 5), (17, 9, 2), (0, 3, 2), (2, 0, 3)])
def test_run_kernel_matmul_matches_numpy(rng: np.random.Generator, dtype: str, m: int, k: int, n: int) -> None:
    a, b = random_array(rng, (m, k), dtype), random_array(rng, (k, n), dtype)
    (out,) = run_kernel("matmul", [a, b])
    assert out.shape == (m, n)
    assert out.dtype == (a @ b).dtype
    assert_close(out, a @ b, dtype)


@pytest.mark.parametrize("name", ["add", "subtract", "multiply"])
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_run_kernel_elementwise_matches_numpy(rng: np.random.Generator, name: str, dtype: str) -> None:
    a, b = random_array(rng, (6, 7), dtype), random_array(rng, (6, 7), dtype)
    (out,) = run_kernel(name, [a, b])
    np.testing.assert_array_equal(out, getattr(np, name)(a, b))


@pytest.mark.parametrize(("sa", "sb"), [((4, 1), (1, 5)), ((3, 4), (4,)), ((), (2, 2)), ((2, 1, 3), (4, 1))])
def test_run_kernel_elementwise_broadcasts(rng: np.random.Generator, sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = random_array(rng, sa), random_array(rng, sb)
    (out,) = run_kernel("add", [a, b])
    np.testing.assert_array_equal(out, a + b)


def test_run_kernel_elementwise_mixed_dtypes_follow_numpy_promotion(
    rng: np.random.Generator,
) -> None:
    a, b = random_array(rng, (3,), "int32"), random_array(rng, (3,), "complex64")
    (out,) = run_kernel("multiply", [a, b])
    assert out.dtype == (a * b).dtype
    np.testing.assert_array_equal(out, a * b)


@pytest.mark.parametrize("shape", [(3, 5), (1, 4), (2, 3, 4), (6,), ()])
def test_run_kernel_transpose_matches_numpy_and_is_c_contiguous(
    rng: np.random.Generator, shape: tuple[int, ...]
) -> None:
    a = random_array(rng, shape)
    (out,) = run_kernel("transpose", [a])
    np.testing.assert_array_equal(out, a.T)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("factor", [2.5, -1.0, 0.0, 1e300])
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_run_kernel_scale_matches_numpy(rng: np.random.Generator, factor: float, dtype: str) -> None:
    a = random_array(rng, (4, 3), dtype)
    (out,) = run_kernel("scale", [a], {"factor": factor})
    with np.errstate(over="ignore"):  # 1e300 overflows float32 to inf, in the kernel too
        expected = a * factor
    np.testing.assert_array_equal(out, expected)


def test_run_kernel_scale_defaults_to_factor_one(rng: np.random.Generator) -> None:
    a = random_array(rng, (2, 2))
    (out,) = run_kernel("scale", [a])
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_run_kernel_sum_of_all_elements_is_0d(rng: np.random.Generator, dtype: str) -> None:
    a = random_array(rng, (5, 6), dtype)
    (out,) = run_kernel("sum", [a])
    assert out.shape == ()
    assert_close(out, np.sum(a), dtype)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_run_kernel_sum_along_axis_matches_numpy(rng: np.random.Generator, axis: int) -> None:
    a = random_array(rng, (3, 4, 5))
    (out,) = run_kernel("sum", [a], {"axis": float(axis)})
    np.testing.assert_allclose(out, np.sum(a, axis=axis), rtol=1e-12)


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_run_kernel_dot_matches_numpy(rng: np.random.Generator, dtype: str) -> None:
    a, b = random_array(rng, (50,), dtype), random_array(rng, (50,), dtype)
    (out,) = run_kernel("dot", [a, b])
    assert out.shape == ()
    assert_close(out, np.dot(a, b), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "complex64", "complex128"])
@pytest.mark.parametrize("rhs", [(8,), (8, 3)])
def test_run_kernel_solve_matches_numpy(rng: np.random.Generator, dtype: str, rhs: tuple[int, ...]) -> None:
    a = well_conditioned(rng, 8, dtype)
    b = random_array(rng, rhs, dtype)
    (x,) = run_kernel("solve", [a, b])
    assert x.shape == rhs
    assert_close(a.astype(np.complex128) @ x, b, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "complex128"])
def test_run_kernel_inverse_matches_numpy(rng: np.random.Generator, dtype: str) -> None:
    a = well_conditioned(rng, 6, dtype)
    (inv,) = run_kernel("inverse", [a])
    assert_close(inv, np.linalg.inv(a.astype(inv.dtype)), dtype)
    assert_close(a @ inv, np.eye(6), dtype)


def test_run_kernel_random_is_seeded_uniform() -> None:
    (out,) = run_kernel("random", [], {"rows": 30.0, "cols": 20.0, "seed": 42.0})
    assert out.shape == (30, 20) and out.dtype == np.float64
    np.testing.assert_array_equal(out, np.random.default_rng(42).random((30, 20)))
    assert 0.0 <= out.min() and out.max() < 1.0
    (again,) = run_kernel("random", [], {"rows": 30.0, "cols": 20.0, "seed": 42.0})
    np.testing.assert_array_equal(out, again)
    (other,) = run_kernel("random", [], {"rows": 30.0, "cols": 20.0, "seed": 43.0})
    assert not np.array_equal(out, other)


def test_run_kernel_random_defaults_to_empty_matrix() -> None:
    (out,) = run_kernel("random", [])
    assert out.shape == (0, 0)


@pytest.mark.parametrize("name", sorted(set(KERNELS) - {"random"}))
def test_run_kernel_does_not_modify_operands(rng: np.random.Generator, name: str) -> None:
    operands: Any
    numpy_kernels = {k.name for k in (*pangea.NUMPY_ARRAY_KERNELS, *pangea.NUMPY_LINALG_KERNELS)}
    if name in numpy_kernels:
        operands, params = check_inputs(name, rng, 4)  # their own sample: clip and reshape need params
    else:
        operands, params = (
            {
                1: [well_conditioned(rng, 4)],
                2: [well_conditioned(rng, 4), random_array(rng, (4, 4))]
                if name != "dot"
                else [random_array(rng, (4,))] * 2,
            }[KERNELS[name].arity],
            {},
        )
    operands = list(operands)
    before = [a.copy() for a in operands]
    outputs = run_kernel(name, operands, params)
    for a, b in zip(operands, before, strict=True):
        np.testing.assert_array_equal(a, b)
    for out in outputs:
        assert isinstance(out, np.ndarray)
        assert out.flags.c_contiguous
        assert not any(np.shares_memory(out, a) for a in operands)


def test_run_kernel_accepts_params_dict_none_and_empty(rng: np.random.Generator) -> None:
    a = random_array(rng, (2, 2))
    np.testing.assert_array_equal(run_kernel("transpose", [a], None)[0], run_kernel("transpose", [a], {})[0])


# ---------------------------------------------------------------- output bounds are the real output's bytes

DTYPE_PAIRS = [(x, y) for x in ALLOWED_DTYPES for y in ALLOWED_DTYPES]


def _calls_of_every_bounded_kernel(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], dict[str, float]]]:
    def arr(shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.asarray(random_array(rng, shape, dtype))  # NOTE: a 0-d shape gives a numpy scalar

    calls: list[tuple[str, list[np.ndarray], dict[str, float]]] = []
    for x, y in DTYPE_PAIRS:
        for name in ("add", "subtract", "multiply"):
            for sa, sb in (((3, 4), (3, 4)), ((3, 1), (1, 4)), ((5,), ()), ((0, 4), (1, 4)), ((2, 1, 3), (4, 1))):
                calls.append((name, [arr(sa, x), arr(sb, y)], {}))
        calls.append(("dot", [arr((7,), x), arr((7,), y)], {}))
        calls.append(("matmul", [arr((3, 5), x), arr((5, 2), y)], {}))
        calls.append(("solve", [well_conditioned(rng, 4, x), arr((4,), y)], {}))
        calls.append(("solve", [well_conditioned(rng, 4, x), arr((4, 3), y)], {}))
    for x in ALLOWED_DTYPES:
        for shape in ((3, 4), (6,), (), (0, 3), (2, 3, 4)):
            a = arr(shape, x)
            calls.append(("transpose", [a], {}))
            calls.append(("copy", [a], {}))
            calls += [("scale", [a], {"factor": f}) for f in (2.5, 2.0, -1.0)]
            calls += [("scale", [a], {}), ("sum", [a], {})]
            calls += [("sum", [a], {"axis": float(i)}) for i in range(a.ndim)]
        calls.append(("dot", [arr((0,), x), arr((0,), x)], {}))
        calls.append(("inverse", [well_conditioned(rng, 3, x)], {}))
    calls.append(("random", [], {"rows": 3.0, "cols": 5.0, "seed": 1.0}))
    return calls


def test_output_nbytes_is_the_bytes_of_the_real_output_and_not_above(rng: np.random.Generator) -> None:
    seen = set()
    for name, operands, params in _calls_of_every_bounded_kernel(rng):
        (out,) = run_kernel(name, operands, params)
        bound = output_nbytes(name, operands, params)
        what = (name, [(a.dtype.name, a.shape) for a in operands], params, out.dtype.name, out.shape)
        assert bound == out.nbytes, what
        seen.add(name)
    assert seen == set(KERNELS) - {k.name for k in (*pangea.NUMPY_ARRAY_KERNELS, *pangea.NUMPY_LINALG_KERNELS)}
    # the case that was refused: the dot of two 512 MiB float64 vectors is one number
    big = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(1 << 26,), strides=(0,))
    assert output_nbytes("dot", [big, big], {}) == 8
    assert output_nbytes("add", [big, big], {}) == 512 << 20
    assert output_nbytes("scale", [big.astype(np.float32)[:4]], {"factor": 2.5}) == 16  # float32 stays float32


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_run_into_operand_writes_an_elementwise_result_over_its_first_operand(
    rng: np.random.Generator, dtype: str
) -> None:
    a, b = random_array(rng, (5, 7), dtype), random_array(rng, (5, 7), dtype)
    cases: list[tuple[str, list[np.ndarray], dict[str, float]]] = [
        ("add", [a, b], {}),
        ("subtract", [a, b[:1]], {}),  # the second operand broadcasts: the first has the result's shape
        ("multiply", [a, b], {}),
        ("add", [a, a], {}),  # the same buffer twice: numpy's overlap handling, the result is a + a
        *([("scale", [a], {"factor": -2.5})] if np.dtype(dtype).kind in "fc" else []),  # ints scale to float64
    ]
    for name, operands, params in cases:
        fresh = [x.copy() for x in operands]
        (want,) = run_kernel(name, fresh, params)
        mine = [x.copy() for x in operands]
        if operands[0] is (operands[1] if len(operands) > 1 else None):
            mine = [mine[0], mine[0]]
        got = pangea.run_into_operand(name, mine, params)
        assert got is not None and np.shares_memory(got[0], mine[0]), name
        assert got[0].dtype == want.dtype and np.array_equal(got[0], want, equal_nan=True), name


def test_run_into_operand_leaves_the_operands_alone_when_the_result_does_not_fit_in_the_first() -> None:
    m = np.arange(12.0).reshape(3, 4)
    read_only = m.copy()
    read_only.flags.writeable = False
    cases: list[tuple[str, list[np.ndarray], dict[str, float]]] = [
        ("add", [m[:1].copy(), m], {}),  # the result is larger than the first operand
        ("add", [m.astype(np.float32), m], {}),  # float32 + float64 is float64
        ("scale", [m.astype(np.int32)], {"factor": 2.5}),  # int32 * 2.5 is float64
        ("multiply", [read_only, m], {}),
        ("subtract", [m.copy().T, m.T], {}),  # not C-ordered
        ("matmul", [m, m.T], {}),
        ("add", [m, np.ones((2, 4))], {}),  # shapes that do not match: the kernel says so
    ]
    for name, operands, params in cases:
        before = [x.copy() for x in operands]
        assert pangea.run_into_operand(name, operands, params) is None, name
        assert all(np.array_equal(x, y) for x, y in zip(operands, before, strict=True)), name
    with pytest.raises(KernelError, match="unknown parameter"):
        pangea.run_into_operand("add", [m.copy(), m], {"factor": 2.0})


# ---------------------------------------------------------------- bad inputs name the problem


def test_run_kernel_unknown_kernel_lists_known_ones() -> None:
    err = kernel_error("eval", [])
    assert "unknown kernel 'eval'" in str(err) and f"this node runs {len(KERNELS)} kernels: abs, add" in str(err)
    assert "did you mean 'inv'" in str(kernel_error("invv", [np.eye(2)]))
    assert "matmul" in str(err) and "solve" in str(err)


@pytest.mark.parametrize(
    ("name", "count"),
    [("matmul", 1), ("matmul", 3), ("transpose", 0), ("transpose", 2), ("random", 1)],
)
def test_run_kernel_wrong_arity(name: str, count: int) -> None:
    err = kernel_error(name, [np.zeros((2, 2))] * count)
    assert f"{name}: takes {KERNELS[name].arity} operand(s), got {count}" in str(err)


@pytest.mark.parametrize(
    ("name", "params"),
    [("matmul", {"alpha": 1.0}), ("scale", {"factr": 2.0}), ("sum", {"axes": 0.0})],
)
def test_run_kernel_unknown_param(name: str, params: dict[str, float]) -> None:
    operands = [np.eye(2)] * KERNELS[name].arity
    err = kernel_error(name, operands, params)
    assert f"{name}: unknown parameter(s) {sorted(params)}" in str(err)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([True, False]),
        np.array([1, 2], dtype=object),
        np.zeros(2, dtype=np.float16),
        np.zeros(2, dtype=np.uint8),
        np.zeros(2, dtype=">f8").astype("S8"),
        [1.0, 2.0],
    ],
    ids=["bool", "object", "float16", "uint8", "bytes", "list"],
)
def test_run_kernel_rejects_disallowed_operand_types(bad: Any) -> None:
    err = kernel_error("add", [np.zeros(2), bad])
    assert "add: operand 1 must be an array of float32" in str(err)


@pytest.mark.parametrize(
    ("name", "a", "b", "problem"),
    [
        ("matmul", (2, 3), (2, 3), "matmul: shapes (2, 3) and (2, 3) do not match (3 != 2)"),
        ("matmul", (4,), (3, 3), "matmul: Input operand 1 has a mismatch in its core dimension 0"),
        ("matmul", (3, 3), (4,), "(size 4 is different from 3)"),
        ("matmul", (2, 2, 3), (2, 2), "mismatch in its core dimension 0"),
        ("matmul", (), (2, 2), "Input operand does not have enough dimensions"),
        ("add", (2, 3), (3, 2), "add: shapes (2, 3) and (3, 2) do not match"),
        ("subtract", (4,), (5,), "subtract: shapes (4,) and (5,) do not match"),
        ("multiply", (2, 3), (2,), "multiply: shapes"),
        (
            "dot",
            (3,),
            (4,),
            "dot: operands must be vectors of the same length, got shapes (3,) and (4,)",
        ),
        ("dot", (3, 1), (3, 1), "dot: operands must be vectors"),
        (
            "solve",
            (3, 3),
            (4,),
            "solve: right-hand side of shape (4,) does not fit a (3, 3) matrix",
        ),
        ("solve", (3, 3), (3, 2, 1), "solve: right-hand side of shape (3, 2, 1)"),
        ("solve", (3, 4), (3,), "solve: matrix must be square, got shape (3, 4)"),
        ("solve", (3,), (3,), "solve: operand must be a 2-D matrix"),
    ],
)
def test_run_kernel_shape_mismatch(name: str, a: tuple[int, ...], b: tuple[int, ...], problem: str) -> None:
    err = kernel_error(name, [np.ones(a), np.ones(b)])
    assert problem in str(err)


@pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 2, 3)])  # (2, 2, 3): a stack of two 2 x 3 matrices
def test_run_kernel_inverse_needs_a_square_matrix(shape: tuple[int, ...]) -> None:
    err = kernel_error("inverse", [np.ones(shape)])
    assert str(err).startswith("inverse: ")
    assert "square" in str(err) or "2-D" in str(err)


@pytest.mark.parametrize("name", ["solve", "inverse"])
@pytest.mark.parametrize(
    "matrix",
    [
        np.zeros((3, 3)),
        np.ones((3, 3)),
        np.array([[1.0, 2.0], [2.0, 4.0]]),
        np.zeros((2, 2), dtype=np.int64),
    ],
    ids=["zeros", "ones", "rank1", "int-zeros"],
)
def test_run_kernel_singular_matrix(name: str, matrix: np.ndarray) -> None:
    operands = [matrix] + ([np.ones(matrix.shape[0])] if name == "solve" else [])
    err = kernel_error(name, operands)
    assert f"{name}: matrix is singular" in str(err)


@pytest.mark.parametrize("name", ["solve", "inverse"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_run_kernel_nan_or_inf_matrix(name: str, value: float) -> None:
    a = np.eye(3)
    a[1, 2] = value
    operands = [a] + ([np.ones(3)] if name == "solve" else [])
    err = kernel_error(name, operands)
    assert f"{name}: matrix contains NaN or Inf" in str(err)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_run_kernel_solve_nan_or_inf_right_hand_side(value: float) -> None:
    b = np.ones(3)
    b[0] = value
    err = kernel_error("solve", [np.eye(3), b])
    assert "solve: right-hand side contains NaN or Inf" in str(err)


def test_run_kernel_complex_nan_matrix_rejected() -> None:
    a = np.eye(2, dtype=np.complex128)
    a[0, 0] = complex(1.0, np.nan)
    assert "NaN or Inf" in str(kernel_error("inverse", [a]))


@pytest.mark.parametrize("axis", [2.0, -3.0, 0.5, 100.0])
def test_run_kernel_sum_bad_axis(axis: float) -> None:
    err = kernel_error("sum", [np.ones((2, 2))], {"axis": axis})
    assert f"sum: axis {axis!r} is out of range for 2 dimensions" in str(err)


def test_run_kernel_sum_axis_of_0d_array() -> None:
    assert "out of range for 0 dimensions" in str(kernel_error("sum", [np.array(1.0)], {"axis": 0.0}))


@pytest.mark.parametrize("factor", [math.nan, math.inf, -math.inf])
def test_run_kernel_scale_non_finite_factor(factor: float) -> None:
    err = kernel_error("scale", [np.ones(2)], {"factor": factor})
    assert "scale: factor" in str(err) and "is not a finite number" in str(err)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        (
            {"rows": -1.0, "cols": 2.0},
            "random: rows must be a whole number in 0..16777216, got -1.0",
        ),
        ({"rows": 2.5, "cols": 2.0}, "random: rows must be a whole number"),
        ({"rows": 2.0, "cols": float(1 << 25)}, "random: cols must be a whole number in 0.."),
        (
            {"rows": float(1 << 24), "cols": float(1 << 24)},
            f"exceeds {MAX_RANDOM_ELEMENTS} elements",
        ),
        (
            {"rows": 2.0, "cols": 2.0, "seed": -1.0},
            "random: seed must be a whole number >= 0, got -1.0",
        ),
        ({"rows": 2.0, "cols": 2.0, "seed": 0.5}, "random: seed must be a whole number"),
    ],
)
def test_run_kernel_random_bad_params(params: dict[str, float], problem: str) -> None:
    assert problem in str(kernel_error("random", [], params))


@pytest.mark.parametrize(
    ("name", "key"),
    [("sum", "axis"), ("random", "rows"), ("random", "cols"), ("random", "seed")],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_run_kernel_non_finite_integer_params_are_kernel_errors(name: str, key: str, value: float) -> None:
    operands = [np.ones((2, 2))] if name == "sum" else []
    params = {"rows": 1.0, "cols": 1.0} if name == "random" else {}
    params[key] = value
    err = kernel_error(name, operands, params)
    assert key in str(err)


# ---------------------------------------------------------------- result checks: no false accusation, no small lie


CORPUS = corpus()


def _check(case: Case, result: np.ndarray, seed: int = 0, rounds: int = FREIVALDS_ROUNDS) -> str | None:
    return check_result(case.kernel, case.operands, case.params, (result,), random.Random(seed), rounds)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_check_result_accepts_numpys_own_result_on_awkward_inputs(case: Case) -> None:
    (result,) = run_kernel(case.kernel, case.operands, case.params)
    for seed in range(3):
        assert _check(case, result, seed) is None, (case.id, seed)
    other = reordered(case)
    if other is not None:  # another BLAS or blocking: the same sums in another order
        assert other.shape == result.shape and other.dtype == result.dtype
        assert _check(case, other) is None, case.id


@pytest.mark.parametrize("case", [c for c in CORPUS if c.kernel in ("solve", "inverse")], ids=lambda c: c.id)
def test_check_result_solve_and_inverse_pass_the_cheap_residual_check(case: Case, monkeypatch: Any) -> None:
    """Hilbert up to 12, condition 1e12, huge and tiny: numpy's answer passes without solving again here."""
    (result,) = run_kernel(case.kernel, case.operands, case.params)
    monkeypatch.setattr("pangea._solve_here", lambda *args: pytest.fail("solved again"))
    assert _check(case, result) is None


def _lie_cases() -> list[Any]:
    out = []
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((100, 100)), rng.standard_normal((100, 100))
    well = a + 100 * np.eye(100)
    plain = [
        Case("matmul", "matmul", [a, b]),
        Case("matmul-rectangular", "matmul", [a[:, :30].copy(), b[:30].copy()]),
        Case("matmul-nan", "matmul", [with_values(a, np.nan), b]),
        Case("matmul-overflow", "matmul", [np.full((20, 20), 1e160), np.full((20, 20), 1e160)]),
        Case("matmul-overflow-some", "matmul", [with_values(a, 1e300), b]),
        Case("add", "add", [a, b]),
        Case("multiply", "multiply", [a, b]),
        Case("subtract-inf", "subtract", [with_values(a, np.inf), b]),
        Case("transpose", "transpose", [a]),
        Case("scale", "scale", [a], {"factor": 3.0}),
        Case("sum-axis", "sum", [a], {"axis": 0.0}),
        Case("sum", "sum", [a]),
        Case("dot", "dot", [a[0], b[0]]),
        Case("solve", "solve", [well, b[0]]),
        Case("solve-columns", "solve", [well, b[:, :4].copy()]),
        Case("inverse", "inverse", [well]),
    ]
    for case in plain:
        for kind in ("relative", "sign", "swap", "nan"):
            if kind == "swap" and case.kernel in ("sum", "dot") and "axis" not in case.params:
                continue  # a 0-d result has nothing to swap
            out.append(pytest.param(case, kind, id=f"{case.id}-{kind}"))
    ints = [
        Case("matmul-int64-wraps", "matmul", [rng.integers(1 << 40, 1 << 50, (30, 30))] * 2),
        Case("matmul-int32", "matmul", [rng.integers(-1000, 1000, (30, 30)).astype(np.int32)] * 2),
        Case("add-int64-wraps", "add", [rng.integers(1 << 62, 1 << 63, 10), rng.integers(1 << 62, 1 << 63, 10)]),
        Case("sum-int64", "sum", [rng.integers(-(1 << 62), 1 << 62, 100)]),
        Case("dot-int32", "dot", [np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32)]),
    ]
    for case in ints:
        for kind in ("plus-one", "sign", "swap"):
            if kind == "swap" and case.kernel in ("sum", "dot"):
                continue
            out.append(pytest.param(case, kind, id=f"{case.id}-{kind}"))
    return out


@pytest.mark.parametrize(("case", "kind"), _lie_cases())
def test_check_result_catches_a_small_lie(case: Case, kind: str) -> None:
    (result,) = run_kernel(case.kernel, case.operands, case.params)
    wrong = lie(kind, result)
    if np.array_equal(wrong, result, equal_nan=True):
        pytest.skip("this lie changes nothing in this result")  # e.g. a row swap in an all-inf product
    for seed in range(5):  # at the default rounds, whatever the random vectors
        problem = _check(case, wrong, seed)
        assert problem is not None, (case.id, kind, seed)
        assert problem.startswith(f"{case.kernel}: "), problem


def test_check_result_catches_a_wrong_inf_sign_and_a_missing_nan() -> None:
    a = with_values(np.eye(3), np.inf)
    case = Case("matmul", "matmul", [a, np.eye(3)])
    (result,) = run_kernel("matmul", case.operands)
    flipped = result.copy()
    flipped[0, 0] = -np.inf
    assert "wrong at [0, 0]" in str(_check(case, flipped))
    nan_case = Case("add", "add", [with_values(np.ones(4), np.nan), np.ones(4)])
    (total,) = run_kernel("add", nan_case.operands)
    assert "wrong at [0]" in str(_check(nan_case, np.where(np.isnan(total), 2.0, total)))


def test_check_result_catches_a_finite_answer_to_an_overflowing_product() -> None:
    case = Case("matmul", "matmul", [np.full((10, 10), 1e160), np.full((10, 10), 1e160)])
    problem = _check(case, np.full((10, 10), 5.0))
    assert problem is not None and "wrong at" in problem


def test_check_result_catches_a_wrong_dtype_or_shape() -> None:
    a = np.eye(4)
    case = Case("matmul", "matmul", [a, a])
    assert "dtype float32, expected float64" in str(_check(case, a.astype(np.float32)))
    assert "shape (4, 3)" in str(_check(case, a[:, :3].copy()))
    add = Case("add", "add", [a, a])
    assert "dtype float32, expected float64" in str(_check(add, (a + a).astype(np.float32)))


def test_check_result_solve_of_a_matrix_with_pivot_growth_is_settled_by_solving_here() -> None:
    """Wilkinson's matrix: elimination doubles the pivots (2**39 here); numpy's answer is inaccurate, but honest."""
    n = 40
    a = np.tril(-np.ones((n, n)), -1) + np.eye(n)
    a[:, -1] = 1.0
    case = Case("solve", "solve", [a, np.arange(n, dtype=np.float64)])
    (x,) = run_kernel("solve", case.operands)
    assert _check(case, x) is None
    assert _check(case, lie("sign", x)) is not None


def test_check_result_nan_result_of_a_finite_system_is_caught() -> None:
    case = Case("inverse", "inverse", [np.eye(3) * 2.0])
    assert "NaN or Inf" in str(_check(case, with_values(np.eye(3) / 2.0, np.nan)))


@pytest.mark.parametrize("kernel", ["matmul", "dot", "sum", "add", "multiply"])
@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_check_result_never_accuses_numpy_on_generated_inputs(kernel: str, data: st.DataObject) -> None:
    """Any values, inf and NaN included, any magnitude, any dtype: numpy's result passes."""
    dtype = data.draw(st.sampled_from(["float64", "float32", "complex128", "int64", "int32"]), label="dtype")
    floats: dict[str, Any] = {
        "float64": st.floats(allow_nan=True, allow_infinity=True, width=64),
        "float32": st.floats(allow_nan=True, allow_infinity=True, width=32),
        "complex128": st.complex_numbers(allow_nan=True, allow_infinity=True, max_magnitude=None),
    }
    if dtype in floats:
        elements = floats[dtype]
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    m, k, p = (data.draw(st.integers(0, 5), label=name) for name in "mkp")
    shapes = {"matmul": ((m, k), (k, p)), "dot": ((k,), (k,)), "sum": ((m, k),), "add": ((m, k),) * 2}
    shapes["multiply"] = shapes["add"]
    operands = [data.draw(hnp.arrays(dtype, shape, elements=elements)) for shape in shapes[kernel]]
    case = Case(kernel, kernel, operands)
    (result,) = run_kernel(kernel, operands)
    assert _check(case, result) is None
    other = reordered(case)
    if other is not None:
        assert _check(case, other) is None


# ---------------------------------------------------------------- the initiator's own comparison with numpy


@pytest.mark.parametrize(
    "case", [c for c in CORPUS if c.kernel not in ("solve", "inverse") or c.operands[0].size], ids=lambda c: c.id
)
def test_verify_accepts_numpys_result_on_awkward_inputs(case: Case) -> None:
    expected = reference_result(case.kernel, case.operands, case.params)
    (got,) = run_kernel(case.kernel, case.operands, case.params)
    assert isinstance(verify(case.id, got, np.asarray(expected), case.operands, case.params, kernel=case.kernel), float)
    other = reordered(case)
    if other is not None:
        verify(case.id, other, np.asarray(expected), case.operands, case.params, kernel=case.kernel)


def test_verify_nan_and_ints_without_operands_and_lies() -> None:
    a = with_values(np.ones(5), np.nan)
    assert verify("add", a + a, a + a) == 0.0
    wrap = np.full(3, (1 << 62) + 1, np.int64)
    verify("multiply", wrap * wrap, wrap * wrap)
    with pytest.raises(CheckFailed, match="differs from local numpy"):
        verify("multiply", wrap * wrap + 1, wrap * wrap)
    g = np.random.default_rng(3).standard_normal((50, 50))
    with pytest.raises(CheckFailed, match="Freivalds"):
        verify("gathered matmul", lie("relative", g @ g), g @ g, (g, g), kernel="matmul")
    with pytest.raises(CheckFailed, match="dtype"):
        verify("matmul", (g @ g).astype(np.float32), g @ g, (g, g))


@pytest.mark.parametrize("kind", ["relative", "sign", "swap", "nan", "plus-one"])
def test_parse_fault_lie_names_a_small_lie(kind: str) -> None:
    assert parse_fault(f"lie={kind}") == Fault("lie", text=kind)


@pytest.mark.parametrize("text", ["lie", "lie=", "lie=big", "lie=sign=1"])
def test_parse_fault_unknown_lie_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="lie=relative"):
        parse_fault(text)


def test_check_result_many_rows_reached_by_nan_are_sampled_within_the_budget(monkeypatch: Any) -> None:
    """Every row of A has an inf or NaN: more entries than the budget recomputes; a sample is, honest passes."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((300, 300)), rng.standard_normal((300, 300))
    a[np.arange(300), rng.integers(0, 300, 300)] = rng.choice([np.nan, np.inf, -np.inf], 300)
    case = Case("matmul", "matmul", [a, b])
    (result,) = run_kernel("matmul", case.operands)
    monkeypatch.setattr("pangea.RECOMPUTE_FLOOR", 0)
    for seed in range(3):
        assert _check(case, result, seed) is None
    finite = result.copy()
    finite[17, 3] = 1.0  # a finite entry in a row an inf or NaN reaches: caught without recomputing
    assert "finite where an operand's inf or NaN" in str(_check(case, finite))

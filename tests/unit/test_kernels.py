"""Unit tests of section 5 of pangea.py: the kernel registry and its input checks.

Every kernel is compared with numpy on random inputs; every bad input must
raise KernelError (kind "bad-input") whose message names the kernel and the
problem, because that text is what the peer who sent the task gets back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pangea import ALLOWED_DTYPES, KERNELS, MAX_RANDOM_ELEMENTS, KernelError, TaskError, run_kernel


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
    assert set(KERNELS) == {
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
    }
    for name, kernel in KERNELS.items():
        assert kernel.name == name
        assert kernel.doc
        assert kernel.arity in (0, 1, 2)


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
    operands = {
        1: [well_conditioned(rng, 4)],
        2: [well_conditioned(rng, 4), random_array(rng, (4, 4))] if name != "dot" else [random_array(rng, (4,))] * 2,
    }[KERNELS[name].arity]
    before = [a.copy() for a in operands]
    outputs = run_kernel(name, operands)
    for a, b in zip(operands, before, strict=True):
        np.testing.assert_array_equal(a, b)
    for out in outputs:
        assert isinstance(out, np.ndarray)
        assert out.flags.c_contiguous
        assert not any(np.shares_memory(out, a) for a in operands)


def test_run_kernel_accepts_params_dict_none_and_empty(rng: np.random.Generator) -> None:
    a = random_array(rng, (2, 2))
    np.testing.assert_array_equal(run_kernel("transpose", [a], None)[0], run_kernel("transpose", [a], {})[0])


# ---------------------------------------------------------------- bad inputs name the problem


def test_run_kernel_unknown_kernel_lists_known_ones() -> None:
    err = kernel_error("eval", [])
    assert "unknown kernel 'eval'" in str(err)
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
        ("matmul", (3,), (3, 3), "matmul: left operand must be a 2-D matrix, got shape (3,)"),
        ("matmul", (3, 3), (3,), "matmul: right operand must be a 2-D matrix"),
        ("matmul", (2, 2, 2), (2, 2), "left operand must be a 2-D matrix"),
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


@pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 2, 2)])
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

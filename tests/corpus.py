"""Honest-but-awkward kernel calls, and the small lies a worker could tell about them.

Shared by tests/unit/test_kernels.py (every result numpy gives must pass the
result check; every lie must fail it) and tests/integration/test_verification.py
(the same calls run on a real remote worker). Each case is what an ordinary user
might send: NaN and inf in the data, products that overflow, sums that cancel,
integer wrap-around, float32 and complex, empty arrays, ill-conditioned and
Hilbert matrices, huge (1e150) and tiny (1e-150) magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pangea import SMALL_LIES, small_lie


@dataclass
class Case:
    """One kernel call: ``id`` names it in test reports."""

    id: str
    kernel: str
    operands: list[np.ndarray]
    params: dict[str, float] = field(default_factory=dict)


def hilbert(n: int) -> np.ndarray:
    """The n x n Hilbert matrix 1 / (i + j + 1): condition number ~1e16 at n = 12."""
    i = np.arange(n, dtype=np.float64)
    return 1.0 / (i[:, None] + i[None, :] + 1.0)


def conditioned(n: int, cond: float, seed: int = 0) -> np.ndarray:
    """A random n x n matrix with condition number ``cond`` (U diag(s) V^T, s log-spaced)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * np.logspace(0, -np.log10(cond), n)) @ v.T


def with_values(a: np.ndarray, *values: complex) -> np.ndarray:
    """A copy of ``a`` with ``values`` written at the first flat positions 0, 7, 14, ..."""
    out = a.copy()
    for i, value in enumerate(values):
        out.reshape(-1)[(7 * i) % out.size] = value
    return out


def corpus() -> list[Case]:
    """Every case, built from fixed seeds (the same arrays on every run)."""
    rng = np.random.default_rng(11)
    n = 40
    g = rng.standard_normal((n, n))
    h = rng.standard_normal((n, n))
    v = rng.standard_normal(300)
    w = rng.standard_normal(300)
    signs = np.where(rng.random((n, n)) < 0.5, -1.0, 1.0)
    big32 = rng.integers(-(1 << 31), 1 << 31, size=(n, n)).astype(np.int32)
    big64 = rng.integers(-(1 << 62), 1 << 62, size=(n, n), dtype=np.int64)
    cplx = g + 1j * h
    nan_g = with_values(g, np.nan)
    inf_g = with_values(g, np.inf, -np.inf)
    sub = with_values(g * 1e-300, 5e-324, -1e-310)  # subnormals among tiny numbers
    cases = [
        # ------------------------------------------------------------ matmul
        Case("matmul-nan", "matmul", [nan_g, nan_g]),
        Case("matmul-nan-left-only", "matmul", [nan_g, h]),
        Case("matmul-inf", "matmul", [inf_g, h]),
        Case("matmul-inf-right", "matmul", [g, inf_g]),
        Case("matmul-inf-times-zero", "matmul", [with_values(np.ones((4, 4)), np.inf), np.eye(4)]),
        Case("matmul-overflow", "matmul", [np.full((n, n), 1e160), np.full((n, n), 1e160)]),
        Case("matmul-overflow-signs", "matmul", [1e160 * signs, 1e160 * signs.T]),
        Case("matmul-overflow-one-row", "matmul", [with_values(g, 1e300), h * 1e10]),
        Case("matmul-underflow", "matmul", [np.full((n, n), 1e-160), np.full((n, n), 1e-160)]),
        Case("matmul-subnormal", "matmul", [sub, g]),
        Case("matmul-huge", "matmul", [g * 1e150, h * 1e150]),
        Case("matmul-tiny", "matmul", [g * 1e-150, h * 1e-150]),
        Case("matmul-huge-times-tiny", "matmul", [g * 1e150, h * 1e-150]),
        # a row of B spanning more than the float range's width, beside a product near overflow:
        # the check rescales B and its tiny entry underflows there (found by hypothesis)
        Case(
            "matmul-complex-range-wider-than-floats",
            "matmul",
            [np.array([[9.61287416e94j]]), np.array([[1.03873759e213j, 1.60526616e-133j]])],
        ),
        # a finite complex entry whose modulus overflows (|z| > the float maximum; found by hypothesis)
        Case(
            "matmul-complex-modulus-overflows",
            "matmul",
            [np.array([[0j]]), np.array([[1.27116101e308 + 1.27116101e308j]])],
        ),
        Case("dot-complex-modulus-overflows", "dot", [np.array([1.0 + 0j]), np.array([1.3e308 + 1.3e308j])]),
        Case("dot-range-wider-than-floats", "dot", [np.array([9.6e94, 9.6e94]), np.array([1.0e213, 1.6e-133])]),
        Case("matmul-int64-wrap", "matmul", [np.full((n, n), 1 << 31, np.int64)] * 2),
        Case("matmul-int64-random-wrap", "matmul", [big64, big64.T.copy()]),
        Case("matmul-int32-wrap", "matmul", [big32, big32]),
        Case("matmul-int32-int64", "matmul", [big32, big64]),
        Case("matmul-int32-float32", "matmul", [big32, h.astype(np.float32)]),
        Case("matmul-float32", "matmul", [g.astype(np.float32), h.astype(np.float32)]),
        Case("matmul-float32-nan", "matmul", [nan_g.astype(np.float32), h.astype(np.float32)]),
        Case("matmul-float32-overflow", "matmul", [np.full((n, n), 1e20, np.float32)] * 2),
        Case("matmul-float32-float64", "matmul", [g.astype(np.float32), h]),
        Case("matmul-complex128", "matmul", [cplx, cplx.T.copy()]),
        Case("matmul-complex64", "matmul", [cplx.astype(np.complex64), cplx.astype(np.complex64)]),
        Case("matmul-complex-nan", "matmul", [with_values(cplx, complex(np.nan, 1)), cplx]),
        Case("matmul-complex-inf", "matmul", [with_values(cplx, complex(np.inf, 0)), cplx]),
        Case("matmul-empty-rows", "matmul", [np.zeros((0, n)), h]),
        Case("matmul-empty-inner", "matmul", [np.zeros((n, 0)), np.zeros((0, 5))]),
        Case("matmul-empty-cols", "matmul", [g, np.zeros((n, 0))]),
        Case("matmul-ill-conditioned", "matmul", [conditioned(n, 1e12), conditioned(n, 1e12, seed=1)]),
        Case("matmul-cancellation", "matmul", [np.array([[1e16, 1.0, -1e16]]), np.ones((3, 2))]),
        Case("matmul-all-nan", "matmul", [np.full((n, n), np.nan), h]),
        # ------------------------------------------------------------ element-wise
        Case("add-nan", "add", [nan_g, h]),
        Case("add-inf-minus-inf", "add", [inf_g, -inf_g]),
        Case("add-overflow", "add", [np.full(50, 1e308), np.full(50, 1e308)]),
        Case("add-int64-wrap", "add", [big64, big64]),
        Case("add-int32-wrap", "add", [big32, big32]),
        Case("add-subnormal", "add", [sub, sub]),
        Case("add-float32", "add", [g.astype(np.float32), h.astype(np.float32)]),
        Case("add-complex-inf", "add", [with_values(cplx, complex(np.inf, np.nan)), cplx]),
        Case("add-broadcast-nan", "add", [nan_g, h[0]]),
        Case("add-empty", "add", [np.zeros((0, 3)), np.zeros((0, 3))]),
        Case("subtract-inf", "subtract", [inf_g, inf_g]),
        Case("subtract-int32-wrap", "subtract", [big32, -big32]),
        Case("subtract-huge", "subtract", [g * 1e150, h * 1e150]),
        Case("multiply-overflow", "multiply", [g * 1e200, h * 1e200]),
        Case("multiply-underflow", "multiply", [g * 1e-200, h * 1e-200]),
        Case("multiply-inf-times-zero", "multiply", [inf_g, np.zeros((n, n))]),
        Case("multiply-int64-wrap", "multiply", [big64, big64]),
        Case("multiply-complex", "multiply", [cplx, cplx * 1e150]),
        Case("multiply-complex64-inf", "multiply", [with_values(cplx, complex(np.inf, 1)).astype(np.complex64)] * 2),
        Case("multiply-int32-complex64", "multiply", [big32, cplx.astype(np.complex64)]),
        # ------------------------------------------------------------ transpose, scale
        Case("transpose-nan-inf", "transpose", [inf_g + nan_g]),
        Case("transpose-empty", "transpose", [np.zeros((0, 7))]),
        Case("transpose-complex", "transpose", [cplx]),
        Case("transpose-int32", "transpose", [big32]),
        Case("scale-overflow", "scale", [g * 1e300], {"factor": 1e10}),
        Case("scale-float32-overflow", "scale", [g.astype(np.float32)], {"factor": 1e300}),
        Case("scale-subnormal", "scale", [sub], {"factor": 0.5}),
        Case("scale-nan", "scale", [nan_g], {"factor": 0.0}),
        Case("scale-int64", "scale", [big64], {"factor": 3.0}),
        Case("scale-complex-inf", "scale", [with_values(cplx, complex(np.inf, 2))], {"factor": -2.5}),
        # ------------------------------------------------------------ sum, dot
        Case("sum-nan", "sum", [nan_g]),
        Case("sum-inf", "sum", [with_values(g, np.inf)]),
        Case("sum-inf-minus-inf", "sum", [inf_g]),
        Case("sum-overflow", "sum", [np.full(100, 1e307)]),
        Case("sum-overflow-cancels", "sum", [np.array([1e308, 1e308, -1e308, -1e308])]),
        Case("sum-cancellation", "sum", [np.array([1e16, 1.0, -1e16, 3.0])]),
        Case("sum-int64-wrap", "sum", [big64]),
        Case("sum-int32", "sum", [big32]),
        Case("sum-float32-long", "sum", [rng.random(100_000).astype(np.float32)]),
        Case("sum-complex", "sum", [cplx * 1e150]),
        Case("sum-empty", "sum", [np.zeros((0, 4))]),
        Case("sum-axis-nan", "sum", [nan_g], {"axis": 1.0}),
        Case("sum-axis-empty", "sum", [np.zeros((0, 4))], {"axis": 0.0}),
        Case("sum-tiny", "sum", [sub]),
        Case("sum-0d", "sum", [np.array(np.inf)]),
        Case("dot-nan", "dot", [with_values(v, np.nan), w]),
        Case("dot-overflow", "dot", [v * 1e200, w * 1e200]),
        Case("dot-cancellation", "dot", [np.array([1e16, 1.0, -1e16]), np.ones(3)]),
        Case("dot-int64-wrap", "dot", [np.full(64, 1 << 40, np.int64), np.full(64, 1 << 30, np.int64)]),
        Case("dot-float32", "dot", [v.astype(np.float32), w.astype(np.float32)]),
        Case("dot-complex", "dot", [v + 1j * w, w - 1j * v]),
        Case("dot-empty", "dot", [np.zeros(0), np.zeros(0)]),
        Case("dot-tiny", "dot", [v * 1e-150, w * 1e-150]),
        # ------------------------------------------------------------ solve, inverse
        *(Case(f"solve-hilbert-{k}", "solve", [hilbert(k), np.ones(k)]) for k in (2, 4, 8, 10, 12)),
        *(Case(f"inverse-hilbert-{k}", "inverse", [hilbert(k)]) for k in (2, 4, 8, 10, 12)),
        Case("solve-cond-1e12", "solve", [conditioned(n, 1e12), v[:n]]),
        Case("solve-cond-1e12-columns", "solve", [conditioned(n, 1e12, seed=2), g[:, :5].copy()]),
        Case("inverse-cond-1e12", "inverse", [conditioned(n, 1e12, seed=3)]),
        Case("solve-huge", "solve", [(g + n * np.eye(n)) * 1e150, v[:n] * 1e150]),
        Case("solve-tiny", "solve", [(g + n * np.eye(n)) * 1e-150, v[:n]]),
        Case("inverse-huge", "inverse", [(g + n * np.eye(n)) * 1e150]),
        Case("inverse-tiny", "inverse", [(g + n * np.eye(n)) * 1e-150]),
        Case("inverse-float32-hilbert", "inverse", [hilbert(6).astype(np.float32)]),
        Case("solve-float32", "solve", [conditioned(n, 1e4).astype(np.float32), v[:n].astype(np.float32)]),
        Case("solve-complex", "solve", [cplx + n * np.eye(n), v[:n] + 0j]),
        Case("inverse-complex64", "inverse", [(cplx + n * np.eye(n)).astype(np.complex64)]),
        Case("solve-int", "solve", [big32 % 100 + 100 * np.eye(n, dtype=np.int32), np.arange(n)]),
        Case("inverse-int64", "inverse", [np.array([[2, 1], [1, 3]], dtype=np.int64)]),
        Case("solve-empty", "solve", [np.zeros((0, 0)), np.zeros(0)]),
        Case("inverse-empty", "inverse", [np.zeros((0, 0))]),
        # ------------------------------------------------------------ random
        Case("random", "random", [], {"rows": 5.0, "cols": 7.0, "seed": 3.0}),
    ]
    return cases


def reordered(case: Case) -> np.ndarray | None:
    """The same result summed in another order, as another BLAS or blocking would give; None when
    the kernel has one correctly rounded answer (element-wise, transpose, scale, integers)."""
    ops = case.operands
    if case.kernel not in ("matmul", "dot", "sum") or np.result_type(*ops).kind not in "fc":
        return None
    with np.errstate(all="ignore"):
        if case.kernel == "matmul":
            a, b = ops
            half = a.shape[1] // 2
            return np.asarray(a[:, half:] @ b[half:] + a[:, :half] @ b[:half], dtype=np.result_type(a, b))
        if case.kernel == "dot":
            return np.asarray(np.dot(ops[0][::-1], ops[1][::-1]))
        if "axis" not in case.params:
            return np.asarray(np.sum(ops[0].reshape(-1)[::-1]))
    return None


# ---------------------------------------------------------------- lies

LIES = SMALL_LIES
lie = small_lie  # the worker's --fault lie=KIND tells exactly these

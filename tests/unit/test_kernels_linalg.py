"""numpy.linalg: decompositions, solvers, determinants, norms, powers and einsum.

Each kernel against numpy itself (a decomposition by what numpy's own returns and
by its defining identity, since eigenvectors' signs and phases are not unique), on
one matrix and on stacks of them as numpy takes them (empty stacks too; an error or
a lie names the matrix of the stack), the output bound equal to the outputs'
bytes, an honest result passing its projection check on random and awkward inputs
(Hilbert, a condition number of 1e12, float32, complex, empty, integers, 1e150 and
1e-150 magnitudes, rank-deficient), and a lying one (one entry changed) caught.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pytest
from corpus import conditioned, hilbert

from pangea import KERNELS, NUMPY_LINALG_KERNELS, KernelError, check_result, output_nbytes, run_kernel

RNG = np.random.default_rng(0)
A = RNG.standard_normal((6, 6))
R = RNG.standard_normal((7, 4))
S = A @ A.T + 6 * np.eye(6)
Z = A + 1j * RNG.standard_normal((6, 6))
A3 = RNG.standard_normal((2, 3, 5, 5))  # stacks: numpy.linalg takes (..., M, N)
R3 = RNG.standard_normal((3, 6, 4))
S3 = A3 @ np.swapaxes(A3, -1, -2) + 5 * np.eye(5)

CASES: list[tuple[str, list[np.ndarray], dict[str, Any]]] = [
    ("svd", [R], {}),
    ("svd", [R.T], {"full_matrices": 0}),
    ("svd", [Z], {}),
    ("eigh", [S], {}),
    ("eigh", [Z @ Z.conj().T], {"UPLO": "U"}),
    ("eigvalsh", [S], {}),
    ("eig", [A], {}),
    ("eig", [S.astype(np.float32)], {}),
    ("eigvals", [A], {}),
    ("qr", [R], {}),
    ("qr", [R], {"mode": "complete"}),
    ("cholesky", [S], {}),
    ("lstsq", [R, RNG.standard_normal(7)], {}),
    ("lstsq", [R, RNG.standard_normal((7, 2))], {"rcond": 1e-10}),
    ("pinv", [R], {}),
    ("inv", [S], {}),
    ("det", [A], {}),
    ("slogdet", [A], {}),
    ("matrix_rank", [R], {}),
    ("matrix_power", [A / 4], {"n": 5}),
    ("matrix_power", [S], {"n": -2}),
    ("matrix_power", [np.arange(9).reshape(3, 3).astype(np.int64)], {"n": 3}),
    ("norm", [A], {}),
    ("norm", [A], {"ord": "nuc"}),
    ("norm", [A], {"ord": 2}),
    ("norm", [R], {"axis": 1, "keepdims": True}),
    ("norm", [RNG.standard_normal(5)], {"ord": 1}),
    ("einsum", [R, R], {"subscripts": "ij,ik->jk"}),
    ("einsum", [A], {"subscripts": "ii"}),
    ("einsum", [R, R, R.T], {"subscripts": "ij,ij,ji->i"}),
    ("svd", [R3], {}),
    ("svd", [R3.astype(np.float32)], {"full_matrices": 0}),
    ("eigh", [S3], {}),
    ("eigvalsh", [S3], {}),
    ("eig", [A3 + 1j * A3[::-1]], {}),
    ("eigvals", [A3], {}),
    ("qr", [R3], {"mode": "complete"}),
    ("cholesky", [S3], {}),
    ("pinv", [R3], {}),
    ("inv", [S3], {}),
    ("inv", [np.zeros((0, 3, 3))], {}),
    ("det", [A3], {}),
    ("slogdet", [A3], {}),
    ("matrix_rank", [R3], {}),
    ("matrix_power", [A3 / 4], {"n": 3}),
    ("svd", [np.zeros((2, 0, 4, 3))], {}),
]
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]


def numpy_of(name: str, o: list[np.ndarray], p: dict[str, Any]) -> tuple[Any, ...]:
    la = np.linalg
    with np.errstate(all="ignore"):
        calls = {
            "svd": lambda: la.svd(o[0], full_matrices=bool(p.get("full_matrices", 1))),
            "eigh": lambda: la.eigh(o[0], UPLO=p.get("UPLO", "L")),
            "eigvalsh": lambda: la.eigvalsh(o[0]),
            "eig": lambda: la.eig(o[0]),
            "eigvals": lambda: la.eigvals(o[0]),
            "qr": lambda: la.qr(o[0], mode=p.get("mode", "reduced")),
            "cholesky": lambda: la.cholesky(o[0]),
            "lstsq": lambda: la.lstsq(o[0], o[1], rcond=p.get("rcond")),
            "pinv": lambda: la.pinv(o[0]),
            "inv": lambda: la.inv(o[0]),
            "det": lambda: la.det(o[0]),
            "slogdet": lambda: la.slogdet(o[0]),
            "matrix_rank": lambda: la.matrix_rank(o[0]),
            "matrix_power": lambda: la.matrix_power(o[0], int(p["n"])),
            "norm": lambda: la.norm(o[0], ord=p.get("ord"), axis=p.get("axis"), keepdims=bool(p.get("keepdims"))),
            "einsum": lambda: np.einsum(p["subscripts"], *o),
        }
        out = calls[name]()
    return tuple(out) if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize(("name", "ops", "params"), CASES, ids=IDS)
def test_each_kernel_agrees_with_numpy_within_its_bound_and_passes_its_check(
    name: str, ops: list[np.ndarray], params: dict[str, Any]
) -> None:
    outs = run_kernel(name, ops, params)
    want = numpy_of(name, ops, params)
    assert len(outs) == KERNELS[name].outputs == len(want)
    if name in ("eig", "eigvals"):  # the order of eigenvalues is numpy's, the type always complex
        np.testing.assert_allclose(np.sort_complex(outs[0]), np.sort_complex(np.asarray(want[0], complex)))
    elif name in ("svd", "eigh"):  # singular values and eigenvalues are unique; vectors up to sign or phase
        np.testing.assert_allclose(outs[1 if name == "svd" else 0], want[1 if name == "svd" else 0], atol=1e-10)
    elif name == "qr":
        np.testing.assert_allclose(np.abs(outs[1]), np.abs(want[1]), atol=1e-10)
    else:
        for got, ref in zip(outs, want, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-9)
    assert output_nbytes(name, ops, params) >= sum(o.nbytes for o in outs)
    if name not in ("eig", "eigvals", "lstsq"):  # those: an upper bound (complex, residuals' shape)
        assert output_nbytes(name, ops, params) == sum(o.nbytes for o in outs)
    assert check_result(name, ops, params, outs, random.Random(1)) is None


@pytest.mark.parametrize(("name", "ops", "params"), CASES, ids=IDS)
def test_a_lying_result_is_caught_by_every_kernel_with_a_check(
    name: str, ops: list[np.ndarray], params: dict[str, Any]
) -> None:
    if KERNELS[name].check is None:
        assert KERNELS[name].verification == "unverified"
        return
    outs = [o.copy() for o in run_kernel(name, ops, params)]
    if outs[0].size == 0:
        pytest.skip("an empty result has no entry to change")
    finite = np.flatnonzero(np.isfinite(outs[0]))
    k = int(finite[finite.size // 2])
    outs[0].flat[k] = outs[0].flat[k] * 3 + 7
    problem = check_result(name, ops, params, tuple(outs), random.Random(1))
    assert problem is not None and problem.startswith(name), problem


AWKWARD = {
    "hilbert12": hilbert(12),
    "cond1e12": conditioned(40, 1e12),
    "empty": np.zeros((0, 0)),
    "int": RNG.integers(-9, 9, (8, 8)),
    "float32": RNG.standard_normal((30, 30)).astype(np.float32),
    "complex128": RNG.standard_normal((10, 10)) + 1j * RNG.standard_normal((10, 10)),
    "complex64": (RNG.standard_normal((10, 10)) + 1j * RNG.standard_normal((10, 10))).astype(np.complex64),
    "huge": RNG.standard_normal((50, 50)) * 1e150,
    "tiny": RNG.standard_normal((20, 20)) * 1e-150,
    "rank1": np.outer(np.arange(1.0, 9), np.arange(1.0, 9)),
}


@pytest.mark.parametrize("name", sorted(k.name for k in NUMPY_LINALG_KERNELS if k.check is not None))
def test_honest_results_on_awkward_inputs_pass_their_check(name: str) -> None:
    ran = 0
    for label, m in AWKWARD.items():
        ops = [m, m[:, 0] if m.size else np.zeros(0)] if name == "lstsq" else [m]
        if name in ("eigh", "eigvalsh", "cholesky"):
            ops = [m @ m.conj().T + (m.shape[0] * np.eye(m.shape[0]) if name == "cholesky" else 0)]
        params = {"n": 3} if name == "matrix_power" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                outs = run_kernel(name, ops, params)
            except KernelError:
                continue  # numpy refuses it too (singular, not positive definite, NaN)
        ran += 1
        assert check_result(name, ops, params, outs, random.Random(5)) is None, label
    assert ran >= 5


@pytest.mark.parametrize(
    ("name", "ops", "params", "words"),
    [
        ("einsum", [A], {"subscripts": "i...j"}, "letters, commas and '->'"),
        ("einsum", [A, R], {"subscripts": "ij,jk"}, "dimension 'j' is 6 in one operand and 7"),
        ("einsum", [A], {"subscripts": "ij,jk->ik"}, "2 operand(s) in the subscripts, 1 given"),
        ("cholesky", [-S], {}, "not positive definite"),
        ("inv", [np.zeros((3, 3))], {}, "singular"),
        ("svd", [np.full((2, 2), np.nan)], {}, "NaN or Inf"),
        ("qr", [A], {"mode": "r"}, "mode must be one of"),
        ("matrix_power", [A], {}, "give the power as n"),
        ("eigh", [R], {}, "must be square"),
        ("eigh", [S], {"UPLO": "X"}, "UPLO"),
        ("svd", [np.stack([A, np.full((6, 6), np.nan)])], {}, "svd: matrix [1] of the stack: matrix contains NaN"),
        ("cholesky", [np.stack([S, S, -S])], {}, "cholesky: matrix [2] of the stack:"),
        ("eigh", [R3], {}, "must be square"),
        ("lstsq", [R3, np.zeros(6)], {}, "2-D"),
        ("svd", [np.ones(4)], {}, "2-D"),
        ("lstsq", [R, np.zeros(3)], {}, "does not fit"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(
    name: str, ops: list[np.ndarray], params: dict[str, Any], words: str
) -> None:
    with pytest.raises(KernelError) as refused:
        run_kernel(name, ops, params)
    assert words in str(refused.value), str(refused.value)


def test_unverified_kernels_say_so_in_the_registry() -> None:
    unverified = {k.name for k in NUMPY_LINALG_KERNELS if k.check is None}
    assert unverified == {"det", "slogdet", "matrix_rank", "norm", "einsum"}
    assert all(KERNELS[name].verification == "unverified" for name in unverified)


def test_the_registry_has_at_least_sixty_kernels() -> None:
    assert len(KERNELS) >= 60, sorted(KERNELS)


@pytest.mark.parametrize(
    ("sa", "sb"),
    [
        ((3, 4, 5), (5, 2)),
        ((4,), (4, 3)),
        ((2, 4), (4,)),
        ((4,), (4,)),
        ((2, 1, 3, 4), (5, 4, 6)),
        ((7, 3, 4), (7, 4, 2)),
    ],
)
def test_matmul_takes_vectors_and_stacks_as_numpy_does(sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = RNG.standard_normal(sa), RNG.standard_normal(sb)
    (c,) = run_kernel("matmul", [a, b])
    np.testing.assert_allclose(c, np.matmul(a, b), rtol=1e-12, atol=1e-12)
    assert c.shape == np.matmul(a, b).shape and output_nbytes("matmul", [a, b], {}) == c.nbytes
    assert check_result("matmul", [a, b], {}, (c,), random.Random(1)) is None
    lie = c.copy()
    lie.flat[lie.size // 2] += 1.0
    problem = check_result("matmul", [a, b], {}, (lie,), random.Random(1))
    assert problem is not None and "Freivalds" in problem


def test_matmul_of_stacks_that_do_not_fit_says_so_in_numpys_words() -> None:
    with pytest.raises(KernelError, match="mismatch in its core dimension 0"):
        run_kernel("matmul", [np.zeros((2, 3, 4)), np.zeros((2, 5, 6))])
    with pytest.raises(KernelError, match="do not broadcast together"):
        run_kernel("matmul", [np.zeros((2, 3, 4)), np.zeros((3, 4, 2))])

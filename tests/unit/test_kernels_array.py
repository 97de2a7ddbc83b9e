"""numpy's O(n) kernels and fft: element-wise, reductions, shapes, numpy.fft.

Each kernel against numpy itself on random and awkward inputs (the corpus of
tests/corpus.py: NaN, inf, overflow, cancelling sums, int wrap-around, float32,
complex, empty, 0-d), N-dimensional where numpy is; its output bound is the real
output's bytes; an honest result passes its check and a lying one (one entry
changed) is caught; bad arguments are refused with numpy's kind of message.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pytest
from corpus import corpus

from pangea import KERNELS, KernelError, check_result, output_nbytes, run_kernel

RNG = np.random.default_rng(0)
A = RNG.standard_normal((6, 5))
B = RNG.standard_normal((6, 5))
C3 = RNG.standard_normal((3, 4, 5))
AI = RNG.integers(-5, 5, (6, 5)).astype(np.int32)
Z = A + 1j * B

CASES: list[tuple[str, list[np.ndarray], dict[str, Any]]] = [
    ("divide", [A, B], {}),
    ("divide", [AI, AI + 10], {}),
    ("divide", [C3, A[0]], {}),
    ("power", [np.abs(A), B], {}),
    ("power", [AI, np.abs(AI)], {}),
    ("maximum", [A, B[:1]], {}),
    ("minimum", [A, np.zeros(5)], {}),
    ("exp", [A], {}),
    ("exp", [Z.astype(np.complex64)], {}),
    ("log", [np.abs(A)], {}),
    ("sqrt", [AI.astype(np.float32)], {}),
    ("abs", [Z], {}),
    ("sin", [A.astype(np.float32)], {}),
    ("cos", [AI], {}),
    ("tanh", [C3], {}),
    ("clip", [A], {"a_min": -0.5, "a_max": 0.5}),
    ("clip", [AI], {"a_max": 2.0}),
    ("where", [AI, A, B], {}),
    ("prod", [A], {"axis": 0}),
    ("mean", [AI], {}),
    ("mean", [C3], {"axis": (0, 2), "keepdims": True}),
    ("std", [A], {"axis": (0, 1), "ddof": 1}),
    ("var", [Z], {"axis": 1, "keepdims": True}),
    ("min", [A], {"axis": 1}),
    ("max", [AI], {"keepdims": True}),
    ("argmin", [A], {}),
    ("argmax", [C3], {"axis": 2}),
    ("cumsum", [AI], {"axis": 1}),
    ("cumsum", [A], {}),
    ("reshape", [A], {"shape": (5, -1)}),
    ("reshape", [C3], {"newshape": (60,)}),
    ("concatenate", [A, B, A], {"axis": 1}),
    ("concatenate", [A, AI], {}),
    ("stack", [A, B], {"axis": 2}),
    ("slice", [A], {"start": (1, 0), "stop": (5, 5), "step": (2, 2)}),
    ("slice", [C3], {"start": (-2,), "step": (-1,)}),
    ("transpose", [C3], {"axes": (2, 0, 1)}),
    ("transpose", [A], {}),
    ("fft", [A], {}),
    ("ifft", [Z], {"n": 8, "axis": 0}),
    ("rfft", [A], {"norm": "ortho"}),
    ("irfft", [np.fft.rfft(A)], {}),
    ("irfft", [np.fft.rfft(A, axis=0)], {"n": 6, "axis": 0}),
    ("fft2", [A], {}),
    ("ifft2", [A], {"s": (4, 4)}),
    ("fftn", [C3], {"axes": (0, 2)}),
    ("ifftn", [A.astype(np.float32)], {"norm": "forward"}),
]

NEW = sorted({name for name, _, _ in CASES})


def numpy_of(name: str, ops: list[np.ndarray], params: dict[str, Any]) -> Any:
    """What numpy itself gives for the call."""
    p = dict(params)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "clip":
            return np.clip(ops[0], p.get("a_min"), p.get("a_max"))
        if name == "where":
            return np.where(ops[0], ops[1], ops[2])
        if name in ("concatenate", "stack"):
            return getattr(np, name)(ops, **p)
        if name == "reshape":
            return np.reshape(ops[0], p.get("shape", p.get("newshape")))
        if name == "slice":
            n = max(len(p.get(k, ())) for k in ("start", "stop", "step"))
            keys = tuple(
                slice(*(p[k][i] if k in p and i < len(p[k]) else None for k in ("start", "stop", "step")))
                for i in range(n)
            )
            return ops[0][keys]
        if name in ("fft", "ifft", "rfft", "irfft", "fft2", "ifft2", "fftn", "ifftn"):
            return getattr(np.fft, name)(*ops, **p)
        return getattr(np, name)(*ops, **p)


@pytest.mark.parametrize(("name", "ops", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_each_kernel_gives_numpys_result_within_its_bound_and_passes_its_own_check(
    name: str, ops: list[np.ndarray], params: dict[str, Any]
) -> None:
    (out,) = run_kernel(name, ops, params)
    want = np.asarray(numpy_of(name, ops, params))
    assert out.shape == want.shape and out.dtype == want.dtype, (out.dtype, out.shape, want.dtype, want.shape)
    np.testing.assert_allclose(out, want, rtol=1e-5 if out.dtype in (np.float32, np.complex64) else 1e-12, atol=1e-6)
    assert output_nbytes(name, ops, params) == out.nbytes
    assert check_result(name, ops, params, (out,), random.Random(1)) is None


@pytest.mark.parametrize(("name", "ops", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_a_lying_result_is_caught(name: str, ops: list[np.ndarray], params: dict[str, Any]) -> None:
    (out,) = run_kernel(name, ops, params)
    lie = out.copy()
    finite = np.flatnonzero(np.isfinite(lie))
    assert finite.size, "a lie needs a finite entry to change"
    k = int(finite[finite.size // 2])
    lie.flat[k] = lie.flat[k] * 3 + 7
    problem = check_result(name, ops, params, (lie,), random.Random(1))
    assert problem is not None and problem.startswith(name)
    wrong_dtype = out.astype(np.complex128 if out.dtype != np.complex128 else np.float64)
    assert check_result(name, ops, params, (wrong_dtype,), random.Random(1)) is not None


def test_the_registry_lists_each_with_its_check_named() -> None:
    for name in NEW:
        kernel = KERNELS[name]
        assert kernel.check is not None and kernel.verification in ("recompute", "sampled"), name
        assert kernel.doc and kernel.reference is not None


def awkward_operands() -> list[tuple[str, np.ndarray]]:
    out = []
    for case in corpus():
        for i, a in enumerate(case.operands):
            if a.ndim <= 3 and a.size <= 4096:
                out.append((f"{case.id}[{i}]", a))
    return out


@pytest.mark.parametrize("name", NEW)
def test_honest_results_on_awkward_inputs_pass_their_check(name: str) -> None:
    ran = 0
    for label, a in awkward_operands():
        kernel = KERNELS[name]
        ops = [a] * (3 if name == "where" else 2 if kernel.arity == 2 or kernel.variadic else 1)
        params: dict[str, Any] = {"a_min": -1.0, "a_max": 1.0} if name == "clip" else {}
        if name == "reshape":
            params = {"shape": (-1,)}
        try:
            outputs = run_kernel(name, ops, params)
        except KernelError:
            continue  # numpy refuses it too (an empty min, rfft of complex, ...)
        ran += 1
        assert check_result(name, ops, params, outputs, random.Random(3)) is None, (label, a.dtype, a.shape)
    assert ran


@pytest.mark.parametrize(
    ("name", "ops", "params", "words"),
    [
        ("divide", [A, np.zeros(4)], {}, "could not be broadcast together with shapes (6,5) (4,)"),
        ("power", [AI, AI], {}, "Integers to negative integer powers are not allowed"),
        ("min", [np.zeros((0, 3))], {}, "zero-size array to reduction operation min which has no identity"),
        ("reshape", [A], {"shape": (7, -1)}, "cannot reshape array of size 30 into shape (7, -1)"),
        ("reshape", [A], {}, "give the new shape as shape"),
        ("concatenate", [A, np.zeros((4, 4))], {}, "dimensions except for the concatenation axis must match"),
        ("stack", [A, np.zeros((4, 4))], {}, "all input arrays must have the same shape"),
        ("fft", [A], {"axis": 3}, "axis 3 is out of bounds for array of dimension 2"),
        ("fft", [A], {"norm": "sideways"}, "norm"),
        ("rfft", [Z], {}, "the input must be real"),
        ("argmin", [A], {"axis": (0, 1)}, "axis must be one integer"),
        ("sum", [A], {"axis": 2}, "axis 2"),
        ("mean", [A], {"axis": (0, 0)}, "repeated axis"),
        ("clip", [A], {}, "One of max or min must be given"),
        ("slice", [A], {"step": (0,)}, "slice step cannot be zero"),
        ("slice", [A], {"start": (0, 0, 0)}, "too many indices"),
        ("transpose", [C3], {"axes": (0, 1)}, "axes (0, 1) don't match array of dimension 3"),
        ("exp", [A], {"axis": 1}, "unknown parameter"),
    ],
)
def test_bad_arguments_are_refused_in_numpys_words(
    name: str, ops: list[np.ndarray], params: dict[str, Any], words: str
) -> None:
    with pytest.raises(KernelError) as refused:
        run_kernel(name, ops, params)
    assert words in str(refused.value) and str(refused.value).startswith(name)

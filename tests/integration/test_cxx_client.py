"""A client that is not pycapnp: the reference C++ Cap'n Proto library against a real node.

tests/cxx/client.cpp is built here with Debian's libcapnp-dev (capnp compile -oc++ of
the repository's schema into a temporary directory, then g++), once per source hash,
and run against a real `serve` node from the built pyz. It logs in (and is refused
with a wrong token), lists kernels, reads status, runs a matmul whose sum is numpy's,
gets a bad-input error as a result, pipelines a call on the promise of login, holds a
`RemoteArray` capability and uses it as the operands of a second task whose result it
gets (the node's held arrays return to zero once it drops them), and is refused when
it passes a capability it made itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_node_home
from pyz_helpers import ServeNode, start_serve

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "tests" / "cxx" / "client.cpp"
SCHEMA = REPO / "capnp" / "pangea.capnp"
RUN_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 300.0


def _missing_tools() -> str:
    for tool in ("g++", "capnp", "pkg-config"):
        if shutil.which(tool) is None:
            return tool
    probe = subprocess.run(["pkg-config", "--exists", "capnp-rpc"], check=False)
    return "" if probe.returncode == 0 else "libcapnp-dev (pkg-config capnp-rpc)"


@pytest.fixture(scope="module")
def cxx_client(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The compiled C++ client, cached by the hash of its source and the schema."""
    missing = _missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the C++ client test needs {missing}: .ci/run installs libcapnp-dev g++ pkg-config")
        pytest.skip(f"needs {missing} (apt-get install libcapnp-dev g++ pkg-config)")
    digest = hashlib.sha256(SOURCE.read_bytes() + SCHEMA.read_bytes()).hexdigest()[:16]
    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: built for this run only
    cache = Path(str(store.mkdir("cxx-client"))) if store is not None else tmp_path_factory.mktemp("cxx")
    binary = cache / f"client-{digest}"
    if binary.exists():
        return binary
    work = tmp_path_factory.mktemp("cxx-build")
    shutil.copy(SCHEMA, work / "pangea.capnp")
    shutil.copy(SOURCE, work / "client.cpp")
    subprocess.run(["capnp", "compile", "-oc++", "pangea.capnp"], cwd=work, check=True, timeout=BUILD_TIMEOUT_S)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "capnp-rpc"], capture_output=True, text=True, check=True
    ).stdout.split()
    out = work / "client"
    cmd = ["g++", "-std=c++17", "-O1", "client.cpp", "pangea.capnp.c++", "-I.", *flags, "-o", str(out)]
    built = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    shutil.copy(out, binary)
    return binary


@pytest.fixture(scope="module")
def node(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeNode]:
    served = start_serve(pyz, make_node_home(tmp_path_factory.mktemp("cxx-node"), "node"), name="serve")
    try:
        yield served
    finally:
        served.proc.stop()


def run(client: Path, node: ServeNode, *args: str, token: str | None = None) -> dict[str, Any]:
    result = subprocess.run(
        [str(client), node.rpc, (node.token or "") if token is None else token, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def formula(n: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.indices((n, n))
    return ((i + j) % 7 - 3).astype(np.float64), ((i * j) % 5 - 2).astype(np.float64)


def test_login_with_the_token_and_a_wrong_one(cxx_client: Path, node: ServeNode) -> None:
    good = run(cxx_client, node, "login")
    assert good["error"] == "" and good["max_message_bytes"] > 0 and good["memory_budget_bytes"] > 0
    bad = run(cxx_client, node, "login", token="0" * 32)
    assert bad["error"] == "login refused: wrong or missing RPC token"


def test_kernels_and_status(cxx_client: Path, node: ServeNode) -> None:
    names = run(cxx_client, node, "kernels")["kernels"]
    assert {"matmul", "copy", "add", "solve"} <= set(names) and names == sorted(names)
    status = run(cxx_client, node, "status")
    assert status["peer_id"] == node.peer_id and status["memory_budget_bytes"] > 0


@pytest.mark.parametrize("n", [1, 8, 300])
def test_a_matmul_from_cxx_is_numpys(cxx_client: Path, node: ServeNode, n: int) -> None:
    a, b = formula(n)
    out = run(cxx_client, node, "matmul", str(n))
    assert out == {"dtype": "float64", "rows": n, "sum": float((a @ b).sum()), "ran_on": "local"}


def test_a_bad_input_is_an_error_kind_and_one_line(cxx_client: Path, node: ServeNode) -> None:
    out = run(cxx_client, node, "bad", "16")
    assert out["error_kind"] == "bad-input"
    assert "shapes (16, 16) and (17, 17) do not match" in out["error_message"] and "\n" not in out["error_message"]


def test_a_call_pipelined_on_the_promise_of_login(cxx_client: Path, node: ServeNode) -> None:
    assert run(cxx_client, node, "pipelined")["pipelined_peer_id"] == node.peer_id


@pytest.mark.parametrize("n", [16, 512])
def test_a_cxx_client_holds_a_remote_array_and_uses_it_in_a_task(cxx_client: Path, node: ServeNode, n: int) -> None:
    a, _ = formula(n)
    out = run(cxx_client, node, "handle", str(n))
    assert out["dtype"] == "float64" and out["nbytes"] == a.nbytes
    assert out["sum"] == float((a + a).sum())
    assert out["held_while"] == out["held_before"] + 2 and out["held_bytes_while"] >= 2 * a.nbytes
    assert (out["held_after"], out["held_bytes_after"]) == (out["held_before"], 0)


def test_a_capability_the_cxx_client_made_itself_is_refused(cxx_client: Path, node: ServeNode) -> None:
    out = run(cxx_client, node, "forged")
    assert out["error_kind"] == "bad-input" and "not held by this node" in out["error_message"]
    assert run(cxx_client, node, "status")["peer_id"] == node.peer_id  # the node goes on

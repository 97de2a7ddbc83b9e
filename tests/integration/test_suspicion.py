"""A worker whose result failed verification: shown as suspect, probed, cleared, used again.

Two serve nodes from the built pangea.pyz on 127.0.0.1: a worker W started
with ``--fault corrupt=2`` (its first two results are wrong, then it tells the
truth) and A with ``--peer W --suspect-backoff 8``. The first remote task's
result fails A's verification: W becomes suspect and the task runs on A, saying
why. While W is suspect, every place that reports on W says so (`call --json
peers`, `call peers`, `call status`, `status`, /metrics), a strict request
(``fallback=False``, ``call matmul --no-fallback``) fails with one clear line,
and ``call matmul --placement remote`` prints ``ran locally: ...``. W's first
canary (8 s on) is its second lie, which doubles the back-off; its second
canary (16 s later) passes, W goes on probation, placement="remote" runs on W
again, and three verified results clear it.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_node_home, wait_until
from pyz_helpers import ServeNode, assert_expected_error, free_port, launch_serve, peer_id_of, run_pyz, serve_node

from pangea import Client, TaskError, short_id

BACKOFF_S = 8.0  # A's --suspect-backoff: the suspect window is BACKOFF_S + 2 * BACKOFF_S (one failed canary)
CALL_TIMEOUT_S = 60.0  # one `pangea.pyz call ...` run, pyz start included, on a busy machine
READY_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 60.0
CLEARED_TIMEOUT_S = 90.0  # from the first lie until the second canary passed: 24 s plus ticks and load


@dataclass
class Pair:
    a: ServeNode
    w: ServeNode


@pytest.fixture
def pair(pyz: Path, tmp_path: Path) -> Iterator[Pair]:
    home_a, home_w = make_node_home(tmp_path, "a"), make_node_home(tmp_path, "w")
    a_id = peer_id_of(pyz, home_a, CALL_TIMEOUT_S)
    with contextlib.ExitStack() as stack:
        w_args = ["-v", "--allow-peer", a_id, "--fault", "corrupt=2"]
        w = serve_node(stack.enter_context(launch_serve(pyz, home_w, *w_args, name="serve-W")), home_w, READY_TIMEOUT_S)
        a_args = ["--peer", w.address, "--suspect-backoff", f"{BACKOFF_S:g}", "--metrics", "127.0.0.1:0"]
        a = serve_node(stack.enter_context(launch_serve(pyz, home_a, *a_args, name="serve-A")), home_a, READY_TIMEOUT_S)
        a.proc.wait_for_line(rf"^pangea: connected to peer {w.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        yield Pair(a, w)


def call(pyz: Path, node: ServeNode, *args: str) -> Any:
    """`pangea.pyz call --rpc A ARGS`; the completed process."""
    return run_pyz(pyz, ["call", "--rpc", node.rpc, *args], node.home.env, timeout=CALL_TIMEOUT_S)


def metric(node: ServeNode, name: str, peer: str) -> float:
    assert node.metrics is not None
    with urllib.request.urlopen(node.metrics, timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{peer="{peer}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} for {peer} in:\n{text}")


def suspicion_of(rpc: Client, peer_id: str) -> dict[str, Any] | None:
    (peer,) = [p for p in rpc.peers() if p["peer_id"] == peer_id]
    return peer["suspicion"]


def test_a_worker_that_lied_is_shown_suspect_refused_when_strict_probed_and_cleared(pyz: Path, pair: Pair) -> None:
    w_id, w_short = pair.w.peer_id, short_id(pair.w.peer_id)
    a, b = (np.random.default_rng(1).standard_normal((64, 64)) for _ in range(2))
    with Client(pair.a.rpc, token=pair.a.token, timeout_s=120) as rpc:
        # The lie: caught, and the task runs on A, which says why.
        c = rpc.matmul(a, b, placement="remote")
        np.testing.assert_allclose(c, a @ b)
        task = rpc.last_task
        first_lie = time.time()
        assert task["ran_on"] == "local", task
        assert task["attempts"][0]["worker"] == w_id and task["attempts"][0]["outcome"].startswith("wrong-result")
        assert task["fallback_reason"].startswith(f"no remote worker usable: {w_short}: "), task
        assert "failed verification" in task["fallback_reason"], task

        # A strict request fails with one line naming W, why, and what to do.
        with pytest.raises(TaskError) as caught:
            rpc.matmul(a, b, placement="remote", fallback=False)
        assert caught.value.kind == "unavailable", caught.value
        message = str(caught.value)
        assert message.startswith("cannot run matmul: no remote worker usable: "), message
        assert f"{w_short}: suspect since " in message and "failed verification" in message, message
        assert "allow the local fallback" in message and "\n" not in message, message

        # Shown: peers and status over RPC ...
        info = suspicion_of(rpc, w_id)
        assert info is not None and info["state"] in ("suspect", "probing"), info
        assert "failed verification" in info["reason"] and abs(info["since"] - first_lie) < 10, info
        (suspect,) = rpc.status()["suspects"]
        assert suspect["peer_id"] == w_id and suspect["state"] in ("suspect", "probing"), suspect
        assert metric(pair.a, "pangea_peer_suspect", w_id) == 1.0

        # ... and on the command line: call --json peers, call peers, call matmul, status.
        peers = call(pyz, pair.a, "--json", "peers")
        assert peers.returncode == 0, peers.stderr
        (listed,) = json.loads(peers.stdout)
        assert listed["suspect"] is True and "failed verification" in listed["suspicion"]["reason"], listed
        human = call(pyz, pair.a, "peers")
        assert human.returncode == 0 and "suspect since " in human.stdout, human.stdout
        fell_back = call(pyz, pair.a, "matmul", "--size", "64", "--placement", "remote")
        assert fell_back.returncode == 0, fell_back.stderr
        ran_locally = [line for line in fell_back.stdout.splitlines() if line.startswith("ran locally: ")]
        assert ran_locally and f"no remote worker usable: {w_short}: suspect since " in ran_locally[0], fell_back.stdout
        strict = call(pyz, pair.a, "matmul", "--size", "64", "--placement", "remote", "--no-fallback")
        assert strict.returncode == 1, strict
        assert_expected_error(strict.stderr, "no remote worker usable", w_short, "allow the local fallback")
        status = run_pyz(pyz, ["status"], pair.a.home.env, timeout=CALL_TIMEOUT_S)
        assert status.returncode == 0, status.stderr
        assert f"serve {pair.a.proc.pid}: peer {w_id} suspect since " in status.stdout, status.stdout
        assert time.time() - first_lie < 3 * BACKOFF_S, "too slow: W may have been probed and cleared meanwhile"

        # Probed: the first canary is W's second lie (a longer back-off), the second passes.
        def on_probation() -> bool:
            info = suspicion_of(rpc, w_id)
            return info is not None and info["state"] == "probation"

        wait_until(on_probation, CLEARED_TIMEOUT_S, "W passed a canary task")
        cleared_after = time.time() - first_lie
        log = "\n".join(pair.a.proc.stderr_lines)
        assert "its canary matmul failed verification" in log, log
        assert cleared_after >= 3 * BACKOFF_S - 2, cleared_after  # one back-off, then a doubled one
        assert metric(pair.a, "pangea_peer_suspect", w_id) == 0.0
        assert metric(pair.a, "pangea_peer_probation", w_id) == 1.0

        # Used again: remote tasks run on W, verified; three of them clear it for good.
        for seed in range(3):
            a, b = (np.random.default_rng(10 + seed).standard_normal((64, 64)) for _ in range(2))
            np.testing.assert_allclose(rpc.matmul(a, b, placement="remote"), a @ b)
            assert rpc.last_task["ran_on"] == w_id and rpc.last_task["fallback_reason"] == "", rpc.last_task
        assert suspicion_of(rpc, w_id) is None
        assert rpc.status()["suspects"] == []
    assert metric(pair.a, "pangea_peer_suspect", w_id) == 0.0
    assert "cleared: 3 verified results since its canary passed" in "\n".join(pair.a.proc.stderr_lines)


def test_a_suspect_worker_that_reconnects_is_still_suspect_and_it_is_logged(pyz: Path, tmp_path: Path) -> None:
    home_a, home_w = make_node_home(tmp_path, "a"), make_node_home(tmp_path, "w")
    a_id = peer_id_of(pyz, home_a, CALL_TIMEOUT_S)
    port = free_port()  # W comes back on the same address, so A's --peer redials it
    w_args = ["--allow-peer", a_id, "--fault", "corrupt"]
    with contextlib.ExitStack() as stack:
        w_proc = stack.enter_context(launch_serve(pyz, home_w, *w_args, name="serve-W", port=port))
        w = serve_node(w_proc, home_w, READY_TIMEOUT_S)
        a_proc = stack.enter_context(launch_serve(pyz, home_a, "--peer", w.address, name="serve-A"))
        a = serve_node(a_proc, home_a, READY_TIMEOUT_S)
        connected = rf"^pangea: connected to peer {w.peer_id}$"
        a.proc.wait_for_line(connected, timeout=CONNECT_TIMEOUT_S)
        m = np.eye(8)
        with Client(a.rpc, token=a.token, timeout_s=120) as rpc:
            rpc.matmul(m, m, placement="remote")
            assert rpc.last_task["ran_on"] == "local", rpc.last_task
            before = suspicion_of(rpc, w.peer_id)
            assert before is not None and before["state"] == "suspect", before
            w_proc.stop()
            wait_until(lambda: all(p["peer_id"] != w.peer_id for p in rpc.peers()), 30, "A noticed W left")
            assert rpc.status()["suspects"][0]["peer_id"] == w.peer_id  # kept while it is away
            again = stack.enter_context(launch_serve(pyz, home_w, *w_args, name="serve-W-again", port=port))
            serve_node(again, home_w, READY_TIMEOUT_S)
            a.proc.wait_for_line(
                rf"^pangea: peer {w.peer_id} reconnected; still suspect since .+\(.*failed verification", timeout=60
            )
            after = suspicion_of(rpc, w.peer_id)
            assert after is not None and after["state"] == "suspect", after
            assert after["reason"] == before["reason"]
            assert after["since"] == pytest.approx(before["since"], abs=0.5)  # a monotonic time shown as wall time
            rpc.matmul(m, m, placement="remote")
            assert rpc.last_task["ran_on"] == "local" and "suspect since" in rpc.last_task["fallback_reason"]

"""Split jobs move each byte once: a worker holds `b` for the job.

Real `serve` processes from the built pyz on 127.0.0.1: two workers (W1, W2) trust
a submitting node A, which a `Client` asks for split-remote matmuls. With A's
default (`--split-hold on`) b crosses to each worker once, checked by A's own byte
counters against the same job on a node started with `--split-hold off`; the
result is numpy's; the workers' memory budgets are back to zero after the job (the
Release arrived); and a worker killed in the middle of a held job still gives the
right result (its blocks are recomputed elsewhere, b sent with them).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from pyz_helpers import budget_used, client_of, cluster

from pangea import Client

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 60.0
N = 768  # b is 4.5 MiB: its crossings dominate the bytes of the job


def split_job(c: Client, seed: int) -> tuple[int, dict[str, int]]:
    """Run one split-remote matmul; check it; return A's bytes moved and the blocks per worker."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((N, N)), rng.standard_normal((N, N))
    before = c.status()
    got = c.submit("matmul", a, b, placement="split-remote")
    after = c.status()
    np.testing.assert_allclose(got, a @ b, rtol=1e-10, atol=1e-9)
    blocks = {}
    for attempt in c.last_task["attempts"]:
        blocks[attempt["worker"]] = int(attempt["outcome"].split(" rows in ")[1].split(" ")[0])
    moved = after["bytes_in"] + after["bytes_out"] - before["bytes_in"] - before["bytes_out"]
    return moved, blocks


@pytest.mark.parametrize("hold", ["on", "off"])
def test_a_split_job_sends_b_once_per_worker_when_held(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: str
) -> None:
    b_bytes = N * N * 8
    with cluster(pyz, tmp_path, "--split-hold", hold) as (a, ws):
        with client_of(a, monkeypatch) as c:
            split_job(c, 0)  # warm-up: the workers' speeds are measured ones
            moved, blocks = split_job(c, 1)
        assert set(blocks) == {w.peer_id for w in ws}, blocks
        # a's rows go out once and the result comes back once, whatever the mode
        floor = 2 * b_bytes
        if hold == "on":  # b once to each worker
            assert floor + len(ws) * b_bytes <= moved <= 1.1 * (floor + len(ws) * b_bytes) + (1 << 20), (moved, blocks)
        else:  # b with every block
            assert moved >= floor + sum(blocks.values()) * b_bytes, (moved, blocks)
        deadline = time.monotonic() + 30
        while any(budget_used(w, monkeypatch) for w in ws) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [budget_used(w, monkeypatch) for w in ws] == [0] * len(ws)  # released at the job's end


def test_a_worker_killed_in_a_held_job_still_gives_the_right_result(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with cluster(pyz, tmp_path) as (a, ws), client_of(a, monkeypatch) as c:
        split_job(c, 2)
        rng = np.random.default_rng(3)
        x, y = rng.standard_normal((2 * N, N)), rng.standard_normal((N, N))
        future = c.future("matmul", x, y, placement="split-remote")
        time.sleep(0.3)  # the job is under way: b held on both workers, blocks out
        ws[1].proc._signal_group(signal.SIGKILL)  # kill -9 of the worker, mid-job
        got = future.result(CLIENT_TIMEOUT_S)
        np.testing.assert_allclose(got, x @ y, rtol=1e-10, atol=1e-9)

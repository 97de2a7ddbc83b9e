"""Arrays held on a worker: put there, tasks run where their operands are, made again when it leaves.

Real `serve` processes from the built pyz on 127.0.0.1: a node A (the one the `Client`
talks to) and two workers it dials. An array put on a worker is charged to that
worker's budget; a task on it runs there (A's byte counters show its bytes never
cross), kept results stay there, `get` brings them back once; the release of a handle
frees the worker's budget. After a kill -9 of a worker, a result it held is made again
from its lineage (its inputs are held on A), while an array put there is lost and
using it raises an error naming the worker.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import wait_until
from pyz_helpers import budget_used, client_of, cluster

from pangea import TaskError, short_id

pytestmark = pytest.mark.integration

N = 384  # 1.1 MiB of float64: far above the few KiB of a task's messages


def moved(c: Any, before: dict[str, Any]) -> int:
    after = c.status()
    return int(after["bytes_in"] + after["bytes_out"] - before["bytes_in"] - before["bytes_out"])


def test_a_worker_holds_a_put_and_tasks_on_it_run_there(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((N, N))
    with cluster(pyz, tmp_path) as (node, (w1, _w2)):
        with client_of(node, monkeypatch) as c:
            before = c.status()
            x = c.put(a, placement=w1.peer_id)
            assert moved(c, before) >= a.nbytes  # it crossed once, to the worker
            assert c.where(x)["holder"] == w1.peer_id and x.holder == w1.peer_id
            assert c.status()["held_bytes"] == 0  # charged on the worker, not here
            assert budget_used(w1, monkeypatch) >= a.nbytes
            before = c.status()
            y = c.submit("matmul", x, x, keep=True)  # auto: where the operands are
            z = (y + 1.0).sum(axis=0)
            assert moved(c, before) < a.nbytes // 8  # no operand and no result crossed
            assert c.where(z)["holder"] == w1.peer_id
            assert c.last_task["verification"] == "unverified"  # this node never saw the bytes
            assert c.last_task["attempts"][0]["worker"] == w1.peer_id
            np.testing.assert_allclose(np.asarray(z), (a @ a + 1.0).sum(axis=0), rtol=1e-9, atol=1e-8)
            checked = c.submit("matmul", x, x, keep=True, check="recompute")
            assert c.last_task["verification"] == "recompute"
            np.testing.assert_allclose(c.get(checked), a @ a, rtol=1e-9, atol=1e-8)
            local = c.submit("multiply", x, 2.0 * np.ones(1), placement="local")  # brought here for it
            np.testing.assert_array_equal(local, a * 2.0)
            del x, y, z, checked
            wait_until(lambda: budget_used(w1, monkeypatch) == 0, 30, "the worker to let go of the arrays")
            assert c.status()["held_arrays"] == 0


def test_a_result_held_on_a_worker_that_left_is_made_again_from_its_lineage(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((N, N)), rng.standard_normal((N, N))
    with cluster(pyz, tmp_path) as (node, (w1, w2)):
        with client_of(node, monkeypatch) as c:
            base = c.put(a)  # on A: survives any worker
            made = c.submit("matmul", base, base, placement=w2.peer_id, keep=True)  # kept on w2
            assert made.holder == w2.peer_id
            chained = c.submit("add", made, base, keep=True)  # on w2 too: it holds the bigger operand
            assert chained.holder == w2.peer_id
            lost = c.put(b, placement=w2.peer_id)
            w2.proc._signal_group(signal.SIGKILL)  # kill -9 of the holder
            wait_until(lambda: all(p["peer_id"] != w2.peer_id for p in c.peers()), 60, "A to see the worker go")
            np.testing.assert_allclose(np.asarray(chained), a @ a + a, rtol=1e-9, atol=1e-8)  # made again
            assert chained.holder == "local" and made.holder == "local"  # its input was made again too
            np.testing.assert_allclose(np.asarray(made), a @ a, rtol=1e-9, atol=1e-8)
            with pytest.raises(TaskError) as gone:
                np.asarray(lost)
            message = str(gone.value)
            assert short_id(w2.peer_id) in message and "left" in message and "put it again" in message
            on_w1 = c.put(b, placement=w1.peer_id)  # the other worker is untouched
            np.testing.assert_array_equal(c.get(on_w1), b)

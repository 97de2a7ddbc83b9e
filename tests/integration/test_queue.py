"""The durable task queue of `serve`: its journal across kill -9, a damaged journal, its disk quota.

Every node runs from the built pangea.pyz on 127.0.0.1 with ``--rpc`` on a fixed
port chosen free, since a node finds its journal again by its RPC port: a restart
reuses the port and the home. Clients are `pangea.Client`, in this process or in
a child process that is killed -9 so its connection closes with its calls open.
The node has one kernel runner, so a large matmul ahead of other tasks keeps
them queued for a few seconds (all but the tiniest: a task under INLINE_FLOPS
runs on the node's event loop at once): that is how a test holds tasks
unfinished while it kills a client or the node.

What is checked, every answer against numpy (exact for integers):

* kill -9 of the node with answers waiting for a client that went away (killed
  too) and tasks queued and running: after a restart on the same port and home
  a new Client gets each result once by its key, then "not-found"; `tasks()`
  shows the finished ones did not run again (runs 1) and the others did (runs
  2), and a task collected before the kill stays collected.
* futures pending in this process across kill -9 and restart of the node: each
  connects again, asks for its task by its key and gets the right answer (the
  node ran the journaled task again).
* a burst of 200 small keyed tasks and three with 32 MiB operands, the node
  killed -9 while a large operand was being written to the journal: every
  future ends with the right answer; a task still waiting after the restart is
  one answered just before the kill and run again (runs 2), never a first
  answer delivered twice; no temporary file is left.
* a kill -9 between a task's two large operand files (the first whole, the
  second half written, no row yet): once the task is answered, no array file
  is left that no task names.
* a journal that cannot be read (garbage, truncated, another schema version) is
  moved aside with one stderr line; the node starts with an empty queue and serves.
* ``--state-max-gib``: tasks under the quota are answered right; one over it is
  refused "busy" naming the flag, and fits once the others are collected; the
  Prometheus metrics show the queue's tasks by state, its bytes and the refusals.
* ``--state-max-gib 0``: no journal, tasks still run.
* a key once answered names its task for good, also for a quick task with large
  operands (answered before its operands reached the journal).
* a Client whose node was killed says so at once on its next calls, and the same
  Client works again once the node is back.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO_ROOT, NodeHome, Proc, make_node_home, wait_until
from pyz_helpers import ServeNode, free_port, metric, scrape, start_serve

import pangea
from pangea import Client, RpcError, TaskError, TaskFuture

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 120.0  # Client(timeout_s=...); a broken future tries to connect again for this + 30 s
STATE_TIMEOUT_S = 60.0  # a task reaches a state (journaled, done) well within this on a loaded box
CHILD_TIMEOUT_S = 60.0  # a child client starts, makes its operands and submits within this
BURST_IN_FLIGHT = 32  # futures of the burst at once: below the node's 64 RPC calls in flight (busy above)
UNFINISHED = ("queued", "running")


# ---------------------------------------------------------------- tasks and their answers


def operand(shape: list[int] | tuple[int, ...], seed: int, dtype: str) -> Any:
    """One operand, the same in this process and in a child client (its source is copied there)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if dtype == "int64":
        return rng.integers(-1000, 1000, size=tuple(shape), dtype=np.int64)
    return rng.standard_normal(tuple(shape))


@dataclass(frozen=True)
class Job:
    """A task: its key, kernel, operands (shape, seed, dtype) and parameters, and numpy's answer to it."""

    key: str
    kernel: str
    operands: tuple[tuple[tuple[int, ...], int, str], ...]
    params: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> list[np.ndarray]:
        return [operand(*o) for o in self.operands]

    def want(self) -> np.ndarray:
        arrays = self.arrays()
        if self.kernel == "matmul":
            return np.asarray(arrays[0] @ arrays[1])
        if self.kernel == "add":
            return np.asarray(arrays[0] + arrays[1])
        if self.kernel == "sum":
            return np.asarray(arrays[0].sum(axis=int(self.params["axis"])))
        assert self.kernel == "copy", self.kernel
        return arrays[0].copy()

    def check(self, got: Any) -> None:
        """Assert ``got`` is numpy's answer (exactly, for integers)."""
        want = self.want()
        assert isinstance(got, np.ndarray) and got.shape == want.shape, (self.key, getattr(got, "shape", got))
        if want.dtype.kind == "i":
            assert got.dtype == want.dtype and np.array_equal(got, want), self.key
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-8, err_msg=self.key)

    def as_json(self) -> list[Any]:
        return [
            self.key,
            self.kernel,
            [[list(shape), seed, dtype] for shape, seed, dtype in self.operands],
            self.params,
        ]


def matmul(key: str, n: int, seed: int) -> Job:
    """(n, n) @ (n, n) float64: 2500 takes ~0.5-1 s on the 2 cores here, 5000 ~4-8 s."""
    return Job(key, "matmul", (((n, n), seed, "float64"), ((n, n), seed + 1, "float64")))


def add(key: str, n: int, seed: int) -> Job:
    return Job(key, "add", (((n,), seed, "int64"), ((n,), seed + 1, "int64")))


def total(key: str, n: int, seed: int) -> Job:
    return Job(key, "sum", (((n, n + 1), seed, "float64"),), {"axis": 0.0})


def copy(key: str, nbytes: int, seed: int) -> Job:
    return Job(key, "copy", (((nbytes // 8,), seed, "float64"),))


def submit(c: Client, job: Job) -> TaskFuture:
    return c.future(job.kernel, *job.arrays(), key=job.key, **job.params)


def result_kind(c: Client, key: str) -> str:
    """The error kind of ``c.result(key)`` ("not-found" for a task answered already), or "answered"."""
    try:
        c.result(key, timeout_s=30)
    except (TaskError, RpcError) as exc:
        return str(exc.kind)
    return "answered"


def by_key(c: Client) -> dict[str, dict[str, Any]]:
    """The node's queue listing (`tasks()`), by key."""
    return {t["key"]: t for t in c.tasks()}


def states(c: Client, jobs: list[Job]) -> dict[str, str]:
    listing = by_key(c)
    return {job.key: listing[job.key]["state"] if job.key in listing else "absent" for job in jobs}


# ---------------------------------------------------------------- nodes and child clients


def queue_dir(home: NodeHome, port: int) -> Path:
    return home.pangea_home / pangea.QUEUE_DIRNAME / str(port)


def journal_path(home: NodeHome, port: int) -> Path:
    return queue_dir(home, port) / pangea.QUEUE_JOURNAL_FILENAME


def journal_keys(home: NodeHome, port: int) -> set[str]:
    """The keys of the tasks the node's journal names now (read-only, beside the running node)."""
    uri = f"file:{journal_path(home, port)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return {str(k) for (k,) in db.execute("SELECT key FROM tasks WHERE key IS NOT NULL")}


def journal_states(home: NodeHome, port: int) -> dict[str, str]:
    """The state of each keyed task in the node's journal now (read-only, beside the running node)."""
    uri = f"file:{journal_path(home, port)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return {str(k): str(v) for k, v in db.execute("SELECT key, state FROM tasks WHERE key IS NOT NULL")}


def wait_admitted(c: Client, nbytes: int) -> None:
    """Wait until the node has charged at least ``nbytes`` to its memory budget (a task it took)."""
    wait_until(
        lambda: c.status()["memory_budget_used_bytes"] >= nbytes, STATE_TIMEOUT_S, f"the node takes {nbytes} bytes"
    )


def half_written(arrays_dir: Path, timeout: float = STATE_TIMEOUT_S) -> bool:
    """Wait until a task's second operand is being written beside the journal (its first is whole, renamed
    into place, and the journal does not name the task yet); polled every 2 ms: it lasts ~0.05 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(arrays_dir.glob("*-in1.npy.tmp")):
            return True
        time.sleep(0.002)
    return False


def kill_9(proc: Proc) -> None:
    """SIGKILL a process this test started (its own group: pgid == its pid) and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.output()


CHILD_MAIN = """
import json, os, sys, time
import pangea

rpc, token, jobs, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
client = pangea.Client(rpc, token=token, timeout_s=300)
made = [(key, kernel, [operand(*o) for o in ops], params) for key, kernel, ops, params in jobs]
print("ready", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
futures = [client.future(kernel, *arrays, key=key, **params) for key, kernel, arrays, params in made]
print(f"submitted {len(futures)}", flush=True)
time.sleep(600)  # its calls stay open until the test kills it
"""


@dataclass
class ChildClient:
    """A Python child with a Client of its own and its tasks' operands made, ready to submit them."""

    proc: Proc
    go_file: Path
    jobs: list[Job]

    def submit(self) -> None:
        """Let it submit its tasks as futures (and hold them): return once it has."""
        self.go_file.touch()
        self.proc.wait_for_line(rf"^submitted {len(self.jobs)}$", timeout=CHILD_TIMEOUT_S, stream="stdout")


class Procs:
    """The serve nodes and child clients of one test, all stopped at its end."""

    def __init__(self, pyz: Path, base: Path) -> None:
        self.pyz = pyz
        self.base = base
        self.started: list[Proc] = []

    def serve(self, home: NodeHome, port: int, *args: str, name: str = "serve") -> ServeNode:
        """`serve --rpc 127.0.0.1:PORT` on ``home``, ready."""
        node = start_serve(self.pyz, home, *args, name=name, rpc=f"127.0.0.1:{port}")
        self.started.append(node.proc)
        assert node.rpc == f"127.0.0.1:{port}", node.proc.output()
        return node

    def child(self, node: ServeNode, jobs: list[Job], name: str) -> ChildClient:
        """A child client of ``node`` for ``jobs``, connected and its operands made (`ChildClient.submit`)."""
        script, go_file = self.base / f"{name}.py", self.base / f"{name}.go"
        source = textwrap.dedent(inspect.getsource(operand))
        script.write_text(f"from __future__ import annotations\n{source}\n{CHILD_MAIN}")
        env = {**node.home.env, "PYTHONPATH": str(REPO_ROOT)}
        jobs_json = json.dumps([j.as_json() for j in jobs])
        argv = [sys.executable, str(script), node.rpc, node.token or "", jobs_json, str(go_file)]
        proc = Proc(argv, env=env, name=name)
        self.started.append(proc)
        proc.wait_for_line(r"^ready$", timeout=CHILD_TIMEOUT_S, stream="stdout")
        return ChildClient(proc, go_file, jobs)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def procs(pyz: Path, tmp_path: Path) -> Iterator[Procs]:
    started = Procs(pyz, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NodeHome:
    """The node's home, also this process's PANGEA_HOME: its Clients find the node's bulk socket there."""
    node_home = make_node_home(tmp_path, "node")
    monkeypatch.setenv("PANGEA_HOME", str(node_home.pangea_home))
    return node_home


def client(node: ServeNode) -> Client:
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S)


# ---------------------------------------------------------------- kill -9 and restart


def test_kill_9_keeps_waiting_answers_and_runs_unfinished_tasks_again(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    blocker = matmul("t1-blocker", 4000, 1)  # ~2-3 s on the node's one kernel runner
    # each over INLINE_FLOPS, so it runs on the kernel runner (behind the blocker), not on the event loop
    waiting = [add("t1-wait-add", 200_000, 10), total("t1-wait-sum", 300, 12), matmul("t1-wait-matmul", 64, 14)]
    unfinished = [
        matmul("t1-run-5000", 5000, 20),  # running at the kill; the others queued behind it
        matmul("t1-run-2500-a", 2500, 22),
        matmul("t1-run-2500-b", 2500, 24),
        matmul("t1-run-small", 60, 26),  # operands inline in the journal
    ]
    node = procs.serve(home, port)
    leaving = procs.child(node, waiting, "client-waiting")
    with client(node) as c:
        first = submit(c, blocker)
        wait_until(lambda: states(c, [blocker])[blocker.key] == "running", STATE_TIMEOUT_S, "the blocker runs")
        # A client whose tasks wait behind the blocker, killed with its calls open: its tasks run on
        leaving.submit()
        wait_until(lambda: "absent" not in states(c, waiting).values(), STATE_TIMEOUT_S, "the node lists them")
        before = states(c, waiting)
        assert set(before.values()) <= set(UNFINISHED), before  # behind the blocker, not answered to the child
        kill_9(leaving.proc)
        blocker.check(first.result(CLIENT_TIMEOUT_S))
        # NOTE: its collected mark reaches the journal a moment after its answer (QUEUE_COLLECT_AFTER_S): a
        # kill before that would run it again, as the README says; this test kills after
        wait_until(
            lambda: journal_states(home, port).get(blocker.key) == "collected",
            STATE_TIMEOUT_S,
            "the journal marks the blocker collected",
        )
        wait_until(lambda: c.status()["queue_waiting"] == len(waiting), STATE_TIMEOUT_S, "3 answers wait")
        assert states(c, waiting) == {job.key: "done" for job in waiting}
        # A second client's tasks, one running and three queued, in the journal: then kill -9 of both
        holding = procs.child(node, unfinished, "client-unfinished")
        holding.submit()
        keys = {job.key for job in unfinished}
        wait_until(lambda: keys <= journal_keys(home, port), STATE_TIMEOUT_S, "the journal names every task")
        at_kill = states(c, unfinished)
        assert set(at_kill.values()) <= set(UNFINISHED), at_kill
    kill_9(holding.proc)  # NOTE: first the client, so no future of its own collects its tasks after the restart
    kill_9(node.proc)

    node = procs.serve(home, port)
    read_back = (
        rf"^pangea: task queue: 7 task\(s\) read back from {re.escape(str(journal_path(home, port)))}: "
        r"4 to run again, 3 answer\(s\) waiting for their client$"
    )
    node.proc.wait_for_line(read_back, stream="stderr")
    with client(node) as c:
        status = c.status()
        assert status["queue_recovered"] == len(waiting) + len(unfinished), status
        assert node.metrics is not None, node.proc.output()
        samples = scrape(node.metrics)
        assert metric(samples, "pangea_task_queue_recovered") == len(waiting) + len(unfinished)
        by_state = {s: metric(samples, "pangea_task_queue_tasks", state=s) for s in pangea.TASK_STATES}
        assert sum(by_state.values()) == len(waiting) + len(unfinished), by_state  # none collected yet
        assert by_state["done"] >= len(waiting), by_state
        listing = by_key(c)
        assert listing[blocker.key]["state"] == "collected" and listing[blocker.key]["runs"] == 1, listing
        assert all(listing[job.key]["state"] == "done" for job in waiting), listing
        for job in waiting + unfinished:
            job.check(c.result(job.key))
            assert c.last_task["task_id"] == listing[job.key]["task_id"]
        for job in [blocker, *waiting, *unfinished]:
            assert result_kind(c, job.key) == "not-found", job.key  # answered once
        runs = {key: (t["state"], t["runs"]) for key, t in by_key(c).items()}
        assert runs == {
            blocker.key: ("collected", 1),
            **{job.key: ("collected", 1) for job in waiting},  # finished before the kill: not run again
            **{job.key: ("collected", 2) for job in unfinished},  # read back and run again
        }
        status = c.status()
        assert (status["queue_tasks"], status["queue_waiting"], status["state_bytes"]) == (0, 0, 0), status


def test_pending_futures_get_their_answers_across_a_kill_9_and_restart(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    jobs = [
        matmul("t2-run-5000", 5000, 30),  # running at the kill; the others queued behind it
        matmul("t2-2500", 2500, 32),
        add("t2-add", 100_000, 34),
        total("t2-sum", 400, 36),
        matmul("t2-small", 50, 38),
    ]
    node = procs.serve(home, port)
    with client(node) as c:
        futures = [(job, submit(c, job)) for job in jobs]
        keys = {job.key for job in jobs}
        wait_until(lambda: keys <= journal_keys(home, port), STATE_TIMEOUT_S, "the journal names every task")
        at_kill = states(c, jobs)
        assert set(at_kill.values()) <= set(UNFINISHED), at_kill
        kill_9(node.proc)
        assert not any(f.done() for _, f in futures), [(j.key, f.exception(0)) for j, f in futures if f.done()]
        node = procs.serve(home, port)
        for job, future in futures:
            job.check(future.result(CLIENT_TIMEOUT_S))
            assert future.key == job.key and future.task_id.startswith("t"), (future.key, future.task_id)
        listing = by_key(c)
        # the journaled tasks ran again (runs 2) under their own ids: the futures found them, none submitted anew
        assert {job.key: (listing[job.key]["state"], listing[job.key]["runs"]) for job in jobs} == {
            job.key: ("collected", 2) for job in jobs
        }
        assert {f.task_id for _, f in futures} == {listing[job.key]["task_id"] for job in jobs}
        for job in jobs:
            assert result_kind(c, job.key) == "not-found", job.key


def test_a_burst_killed_while_its_journal_is_written_answers_every_task_once(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    jobs = [add(f"t3-{i:03d}", 4 + i % 7, 1000 + 2 * i) for i in range(200)]
    large = [matmul(f"t3-large-{i}", 2048, 50 + 2 * i) for i in range(3)]  # 32 MiB per operand, journaled as files
    jobs[60:60] = large  # one after the other: the later ones wait, their operands are written meanwhile
    node = procs.serve(home, port)
    arrays_dir = queue_dir(home, port) / "arrays"
    futures: list[tuple[Job, TaskFuture]] = []
    failures: list[str] = []
    large_sent = threading.Event()
    window = threading.Semaphore(BURST_IN_FLIGHT)

    def burst(c: Client) -> None:
        try:
            for job in jobs:
                if not window.acquire(timeout=CLIENT_TIMEOUT_S + 60):
                    failures.append(f"no future of the burst ended within {CLIENT_TIMEOUT_S + 60:g} s")
                    return
                future = submit(c, job)
                future.add_done_callback(lambda _: window.release())
                futures.append((job, future))
                if job is large[-1]:
                    large_sent.set()
        except pangea.PangeaError as exc:  # reported by the test, not lost in the thread
            failures.append(f"submitting: {exc!r}")

    with client(node) as c:
        thread = threading.Thread(target=burst, args=(c,), name="burst")
        thread.start()
        try:
            assert large_sent.wait(STATE_TIMEOUT_S), failures
            # kill -9 while a task's large operands are being written: its first is whole on disk (renamed
            # into place), its second still under its temporary name, its row not in the journal yet
            assert half_written(arrays_dir), "no task's second large operand was being written to the journal"
            kill_9(node.proc)
            answered = sum(f.done() for _, f in list(futures))
            assert 0 < answered < len(jobs), answered
            node = procs.serve(home, port)
        finally:
            thread.join(CLIENT_TIMEOUT_S + 90)
        assert not thread.is_alive() and failures == [], failures
        assert [job.key for job, _ in futures] == [job.key for job in jobs]
        lost: dict[str, str] = {}
        for job, future in futures:
            try:
                job.check(future.result(CLIENT_TIMEOUT_S))
            except (TaskError, RpcError, AssertionError) as exc:
                lost[job.key] = f"{type(exc).__name__}: {exc}"
        assert not lost, f"{len(lost)} futures without their answer ({sorted(lost)}): {next(iter(lost.values()))}"
        # NOTE: a task answered within QUEUE_COLLECT_AFTER_S before the kill was not marked collected yet:
        # it ran again after the restart (runs 2) and its second answer waits for nobody. No first answer
        # is ever delivered twice: whatever waits must be a second run.
        listing = by_key(c)
        again = {k: (t["state"], t["runs"]) for k, t in listing.items() if t["state"] != "collected"}
        assert all(runs == 2 for _state, runs in again.values()), again
        for job in jobs:
            assert result_kind(c, job.key) == ("answered" if job.key in again else "not-found"), job.key
        listing = by_key(c)
        assert {t["state"] for t in listing.values()} <= {"collected"}, listing
        assert set(listing) <= {job.key for job in jobs}, set(listing) - {job.key for job in jobs}
        status = c.status()
        assert (status["queue_tasks"], status["queue_waiting"], status["state_bytes"]) == (0, 0, 0), status
    assert list(arrays_dir.glob("*.tmp")) == []  # the restart removed the half-written files


def test_a_kill_while_large_operands_are_written_leaves_no_array_file_behind(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    node = procs.serve(home, port)
    arrays_dir = queue_dir(home, port) / "arrays"
    job = matmul("t8-large", 2048, 700)  # two 32 MiB operands: .npy files beside the journal
    with client(node) as blocking, client(node) as c:
        big = operand((4000, 4000), 1, "float64")
        # keep=True: not the queue's, so no files of its own; it holds the kernel runner ~2-3 s
        blocker = blocking.future("matmul", big, big, keep=True)
        wait_admitted(c, big.nbytes)  # and on the node's one kernel runner, microseconds later
        future = submit(c, job)  # waits behind the blocker while its operands are written
        assert half_written(arrays_dir), "the task's second operand was never being written"
        kill_9(node.proc)
        at_kill = sorted(p.name for p in arrays_dir.iterdir())
        node = procs.serve(home, port)
        job.check(future.result(CLIENT_TIMEOUT_S))  # never journaled: not-found, so the future submitted it again
        assert isinstance(blocker.exception(CLIENT_TIMEOUT_S), RpcError)  # keep=True: no key, no reconnect
        assert result_kind(c, job.key) == "not-found"
        assert c.status()["queue_tasks"] == 0
        # NOTE: an answered task keeps its operands until its collected mark is written (a moment after its
        # answer: a kill before that runs it again), then they go
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(arrays_dir.iterdir()), STATE_TIMEOUT_S, "the answered task's files go")
    left = sorted(p.name for p in arrays_dir.iterdir())
    assert left == [], (
        f"array files no task names, left after its answer was collected: {left} (at the kill: {at_kill})"
    )


# ---------------------------------------------------------------- a journal that cannot be read


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database\n" * 512)


def _version_7(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY)")
        db.execute("PRAGMA user_version = 7")
        db.commit()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("garbage", r"cannot be read \(file is not a database\)"),
        ("truncated", r"(?:cannot be read|is damaged) \(.+\)"),
        ("version-7", r"is of schema version 7, and this pangea reads version 1"),
    ],
    ids=["garbage", "truncated", "version-7"],
)
def test_an_unreadable_journal_is_moved_aside_and_the_node_starts_empty(
    procs: Procs, home: NodeHome, damage: str, reason: str
) -> None:
    port = free_port()
    path = journal_path(home, port)
    if damage == "truncated":
        node = procs.serve(home, port)
        with client(node) as c:
            for i in range(40):  # rows and inline arrays enough for several pages
                job = copy(f"t4-{i}", 60_000, 200 + i)
                job.check(c.submit(job.kernel, *job.arrays(), key=job.key))
        assert node.proc.stop() == 0, node.proc.output()  # SIGTERM: a clean close folds the WAL in
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, wal.stat()
        whole = path.read_bytes()
        assert len(whole) >= 8 * 4096, len(whole)
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.parent.mkdir(parents=True)
        _garbage(path) if damage == "garbage" else _version_7(path)
    damaged = path.read_bytes()

    node = procs.serve(home, port)
    pattern = rf"^pangea: the task journal {re.escape(str(path))} {reason}: moved aside to (\S+); "
    aside = Path(node.proc.wait_for_line(pattern, stream="stderr").group(1))
    assert sum(line.startswith("pangea: the task journal") for line in node.proc.stderr_lines) == 1
    assert "Traceback" not in node.proc.output()
    assert re.fullmatch(rf"{port}\.unreadable-\d{{8}}T\d{{6}}Z", aside.name) and aside.parent == path.parent.parent
    assert (aside / path.name).read_bytes() == damaged
    with client(node) as c:
        status = c.status()
        assert status["queue_tasks"] == 0 and status["queue_recovered"] == 0, status
        assert status["queue_journal"] == str(path), status
        assert c.tasks() == []
        job = add("t4-after", 100, 300)
        job.check(c.submit(job.kernel, *job.arrays(), key=job.key))
        assert by_key(c)[job.key]["state"] == "collected"


# ---------------------------------------------------------------- the disk quota


def test_the_quota_refuses_a_task_over_it_and_takes_it_once_the_others_are_collected(
    procs: Procs, home: NodeHome
) -> None:
    port = free_port()
    quota_gib = 0.01  # 10.24 MiB
    mib = 1 << 20
    node = procs.serve(home, port, "--state-max-gib", str(quota_gib))
    under = [copy(f"t5-under-{i}", mib, 400 + i) for i in range(3)]  # 1 MiB in + 1 MiB out each
    over = copy("t5-over", 3 * mib, 410)  # 6 MiB: with the 6 MiB of the others over the quota, alone under it
    a = over.arrays()
    with client(node) as blocking, client(node) as leaving, client(node) as c:
        assert c.status()["state_max_bytes"] == int(quota_gib * (1 << 30))
        big = np.random.default_rng(1).standard_normal((4000, 4000))
        # keep=True: the output stays on the node, so the task is not the queue's (nor on its quota)
        blocker = blocking.future("matmul", big, big, keep=True)
        wait_admitted(c, big.nbytes)  # and on the node's one kernel runner, microseconds later
        pending = [submit(leaving, job) for job in under]
        wait_until(lambda: c.status()["queue_tasks"] == len(under), STATE_TIMEOUT_S, "the node accepts them")
        assert c.status()["state_bytes"] == len(under) * 2 * mib
        leaving.close()  # the tasks run on; their answers wait (on the quota) for a client to collect them
        with pytest.raises(TaskError) as refused:
            c.submit(over.kernel, *a, key=over.key)
        assert refused.value.kind == "busy", refused.value
        assert "disk quota" in str(refused.value) and "--state-max-gib" in str(refused.value), refused.value
        assert isinstance(blocker.result(CLIENT_TIMEOUT_S), pangea.RemoteArray)
        wait_until(lambda: c.status()["queue_waiting"] == len(under), STATE_TIMEOUT_S, "their answers wait")
        assert all(f.done() for f in pending)  # failed: their client closed
        assert c.status()["state_bytes"] == len(under) * 2 * mib
        with pytest.raises(TaskError) as still:
            c.submit(over.kernel, *a, key=over.key)
        assert still.value.kind == "busy", still.value
        assert node.metrics is not None, node.proc.output()
        samples = scrape(node.metrics)  # the metrics read what `status` says, and count the refusals
        assert {s: metric(samples, "pangea_task_queue_tasks", state=s) for s in ("queued", "running", "done")} == {
            "queued": 0,
            "running": 0,
            "done": len(under),
        }
        assert metric(samples, "pangea_task_queue_disk_bytes") == len(under) * 2 * mib
        assert metric(samples, "pangea_task_queue_disk_quota_bytes") == int(quota_gib * (1 << 30))
        assert metric(samples, "pangea_refused_total", reason="task-queue-full") == 2
        assert c.status()["queue_refused"] == 2
        for job in under:  # nothing lost
            job.check(c.result(job.key))
        assert c.status()["state_bytes"] == 0
        over.check(c.submit(over.kernel, *a, key=over.key))
        status = c.status()
        assert (status["queue_tasks"], status["state_bytes"]) == (0, 0), status
        samples = scrape(node.metrics)
        assert sum(metric(samples, "pangea_task_queue_tasks", state=s) for s in pangea.TASK_STATES) == 0
        assert metric(samples, "pangea_task_queue_disk_bytes") == 0


def test_state_max_gib_0_keeps_no_journal_and_still_runs_tasks(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    node = procs.serve(home, port, "--state-max-gib", "0")
    with client(node) as c:
        status = c.status()
        assert status["queue_journal"] == "" and status["state_max_bytes"] == 0, status
        jobs = [add("t6-add", 1000, 500), matmul("t6-matmul", 300, 502), copy("t6-copy", 4 << 20, 504)]
        for job in jobs:
            job.check(c.submit(job.kernel, *job.arrays(), key=job.key))
        futures = [(job, submit(c, job)) for job in [total("t6-sum", 50, 506), add("t6-add-2", 10, 508)]]
        for job, future in futures:
            job.check(future.result(CLIENT_TIMEOUT_S))
        assert c.status()["queue_tasks"] == 0
    assert not (home.pangea_home / pangea.QUEUE_DIRNAME).exists()


# ---------------------------------------------------------------- keys


def test_a_key_answered_once_is_refused_also_for_a_quick_task_with_large_operands(procs: Procs, home: NodeHome) -> None:
    port = free_port()
    node = procs.serve(home, port)
    small = copy("t7-small", 4096, 600)  # inline: journaled with its call
    large = copy("t7-large", 32 << 20, 602)  # past QUEUE_INLINE_MAX_BYTES, and done long before 0.25 s
    with client(node) as c:
        for job in (small, large):
            job.check(c.submit(job.kernel, *job.arrays(), key=job.key))
        listing = by_key(c)
        listed = {job.key: listing[job.key]["state"] if job.key in listing else "not listed" for job in (small, large)}
        again: dict[str, str] = {}
        for job in (small, large):
            try:
                job.check(c.submit(job.kernel, *job.arrays(), key=job.key))
                again[job.key] = "accepted: the task ran a second time under its key"
            except TaskError as exc:
                again[job.key] = f"{exc.kind}: already answered" if "already answered" in str(exc) else repr(exc)
    assert (listed, again) == (
        {small.key: "collected", large.key: "collected"},
        {small.key: "bad-input: already answered", large.key: "bad-input: already answered"},
    ), (listed, again)


def test_a_client_says_at_once_that_its_node_is_down_and_works_again_once_it_is_back(
    procs: Procs, home: NodeHome
) -> None:
    port = free_port()
    node = procs.serve(home, port)
    job = add("t9-after", 5, 900)
    with client(node) as c:
        assert c.status()["queue_tasks"] == 0
        kill_9(node.proc)
        started = time.monotonic()
        with pytest.raises(RpcError, match="closed the connection"):
            c.status()
        with pytest.raises(RpcError):  # NOTE: a new call tries to connect once, and says so
            c.submit(job.kernel, *job.arrays(), key=job.key)
        assert time.monotonic() - started < 10, "a call to a node that is down waits for nothing"
        node = procs.serve(home, port)
        job.check(c.submit(job.kernel, *job.arrays(), key=job.key))  # the same Client, connected again
        assert c.status()["queue_recovered"] == 0


# ---------------------------------------------------------------- `call tasks`


def test_call_tasks_lists_the_queue_by_state_with_an_answer_waiting_for_a_client_that_left(
    procs: Procs, home: NodeHome
) -> None:
    node = procs.serve(home, free_port())
    quick, blocker, waits = (
        add("t10-quick", 1000, 1000),
        matmul("t10-blocker", 4000, 1002),
        add("t10-waits", 200_000, 1004),
    )

    def call_tasks(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(procs.pyz), "call", "--rpc", node.rpc, "tasks", *args]
        done = subprocess.run(
            argv, env=node.home.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not done.stderr, done
        return done

    leaving = procs.child(node, [waits], "client-leaving")
    with client(node) as c:
        quick.check(c.submit(quick.kernel, *quick.arrays(), key=quick.key))
        first = submit(c, blocker)
        wait_until(lambda: states(c, [blocker])[blocker.key] == "running", STATE_TIMEOUT_S, "the blocker runs")
        leaving.submit()  # its task waits behind the blocker; its client goes before the answer
        wait_until(lambda: states(c, [waits])[waits.key] in UNFINISHED, STATE_TIMEOUT_S, "the node lists it")
        kill_9(leaving.proc)
        unfinished = call_tasks("--state", "queued,running").stdout.splitlines()
        assert [line.split()[1] for line in unfinished[2:-1]] == [blocker.key, waits.key], unfinished
        assert unfinished[-1].startswith("2 task(s): "), unfinished  # 1 queued, 1 running; or 2 running
        blocker.check(first.result(CLIENT_TIMEOUT_S))
        wait_until(lambda: states(c, [waits])[waits.key] == "done", STATE_TIMEOUT_S, "its answer waits")
    listed = json.loads(call_tasks("--json").stdout)
    assert {t["key"]: t["state"] for t in listed} == {
        quick.key: "collected",
        blocker.key: "collected",
        waits.key: "done",
    }
    assert next(t for t in listed if t["key"] == waits.key)["result_bytes"] == 200_000 * 8
    text = call_tasks().stdout.splitlines()
    assert [line.split()[1] for line in text[2:-1]] == [quick.key, blocker.key, waits.key], text  # oldest first
    assert text[-1] == "3 task(s): 1 done, 2 collected", text
    assert call_tasks("--state", "failed,queued").stdout == "none of the node's 3 task(s) is failed or queued\n"

"""Many workers: split matmuls, slow, dying, crashing, lying and cancelled workers.

Every node runs from the built pangea.pyz on 127.0.0.1 (libp2p port 0,
``--rpc 127.0.0.1:0``). Two ways in, as the README's "Many workers, failures
and verified results" describes them:

* ``initiate --expect N`` with N ``respond <join string>`` processes (one
  pairing code, N uses): every check runs on every responder, and the
  aggregation check's JSON ``shares`` says who computed which rows.
* a ``serve`` node A with ``--peer`` serve workers (each started with
  ``--allow-peer <A's id>``, the id from ``pangea.pyz id``), driven with
  `pangea.Client`: placement ``split-remote`` spreads a matmul over the
  workers and reports, per worker, ``"ok: R rows in B blocks, busy X%"`` in
  ``last_task["attempts"]``.

Faults come from the workers' ``--fault`` test aid (``slow=S``,
``crash-after=N``, ``corrupt``) and from SIGKILL. What must hold whatever
happens: the result equals ``a @ b`` and the blocks cover every row exactly
once (the rows of the attempts sum to n).

Sizes: the split jobs use 2048x2048, not 4096. Every block carries all of b
(32 MiB at 2048, 128 MiB at 4096) over a Noise + Yamux stream that moves
~45 MB/s on this 2-core machine's loopback, with every node sharing the two
cores; at 4096 one split job moves ~2 GiB and takes minutes, at 2048 it
takes 5-10 s and still gives every worker several blocks.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, Proc, make_node_home
from pyz_helpers import (
    ServeNode,
    last_json,
    launch_serve,
    loopback_address,
    peer_id_from,
    peer_id_of,
    printed_addresses,
    serve_node,
    start_initiator,
)

from pangea import Client, TaskError, short_id

SPLIT_N = 2048  # see the module docstring: why not 4096
ID_TIMEOUT_S = 90.0  # one `pangea.pyz id` run, pyz start included, on a busy machine
READY_TIMEOUT_S = 120.0  # a serve node's ready line; several start at once on 2 cores
CONNECT_TIMEOUT_S = 60.0  # A's `connected to peer` line for each --peer
CLIENT_TIMEOUT_S = 240.0  # Client(timeout_s=...): a split job answers well within it
JOB_TIMEOUT_S = 300.0  # a thread running one client job must be done by then
PAIR_RUN_TIMEOUT_S = 300.0  # the whole `initiate --expect 4` run, start-up included
SHARE = re.compile(r"^ok: (\d+) rows in (\d+) blocks, busy (\d+)%$")


# ---------------------------------------------------------------- serve nodes
def launch_worker_serve(pyz: Path, home: NodeHome, *args: str, name: str) -> Proc:
    """Start `pangea.pyz serve -v` on 127.0.0.1 without waiting (-v logs tasks to stderr)."""
    return launch_serve(pyz, home, "-v", *args, name=name)


@dataclass
class Cluster:
    """A serve node A with ``--peer`` workers, all connected."""

    a: ServeNode
    workers: list[ServeNode]


@contextlib.contextmanager
def running_cluster(
    pyz: Path,
    base: Path,
    worker_args: Sequence[Sequence[str]],
    a_args: Sequence[str] = (),
    allow: Sequence[str] = (),
) -> Iterator[Cluster]:
    """Start one worker per entry of ``worker_args`` (its extra serve options, e.g. a --fault),
    each trusting A (and the ids in ``allow``); then A with ``--peer`` every worker.
    Waits until A has connected to all; stops A, then the workers."""
    home_a = make_node_home(base, "a")
    trusted = [peer_id_of(pyz, home_a, ID_TIMEOUT_S), *allow]
    allow_args = [arg for peer in trusted for arg in ("--allow-peer", peer)]
    with contextlib.ExitStack() as stack:
        launched = []
        for i, extra in enumerate(worker_args):
            home = make_node_home(base, f"w{i}")
            proc = stack.enter_context(launch_worker_serve(pyz, home, *allow_args, *extra, name=f"serve-w{i}"))
            launched.append((proc, home))
        workers = [serve_node(proc, home, READY_TIMEOUT_S) for proc, home in launched]  # they start side by side
        peers = [arg for w in workers for arg in ("--peer", w.address)]
        a = serve_node(
            stack.enter_context(launch_worker_serve(pyz, home_a, *peers, *a_args, name="serve-A")),
            home_a,
            READY_TIMEOUT_S,
        )
        for w in workers:
            a.proc.wait_for_line(rf"^pangea: connected to peer {w.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        yield Cluster(a, workers)


def client(node: ServeNode) -> Client:
    return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S)


def matrices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def shares_of(task: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """worker -> (rows, blocks, busy %) from a split job's attempts."""
    out = {}
    for attempt in task["attempts"]:
        match = SHARE.match(attempt["outcome"])
        assert match, f"not a split share: {attempt}"
        assert attempt["worker"] not in out, f"worker listed twice: {task['attempts']}"
        out[attempt["worker"]] = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return out


def split_remote(node: ServeNode, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Submit a @ b with placement split-remote; return the result and last_task."""
    with client(node) as rpc:
        c = rpc.submit("matmul", a, b, placement="split-remote")
        task = rpc.last_task
    assert task["ran_on"] == "split", task
    return c, task


def assert_every_row_once(task: dict[str, Any], n: int) -> dict[str, tuple[int, int, int]]:
    """The shares cover n rows: no block lost, none counted twice."""
    shares = shares_of(task)
    assert sum(rows for rows, _, _ in shares.values()) == n, task["attempts"]
    assert all(rows > 0 and blocks > 0 for rows, blocks, _ in shares.values()), task["attempts"]
    return shares


class Job(threading.Thread):
    """One client call on a thread, so the test can act (kill a worker) while it runs."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(name="client-job", daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the test thread by outcome()
            self.error = exc

    def outcome(self, timeout: float = JOB_TIMEOUT_S) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"the client job is still running after {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.result


def served_tasks(worker: ServeNode) -> list[int]:
    """Task ids (of the worker's session with A) the worker logged as done (-v)."""
    done = re.compile(r"^pangea: task (\d+) from \S+: \w+ done in ")
    return [int(m.group(1)) for line in list(worker.proc.stderr_lines) if (m := done.match(line))]


def count(proc: Proc, text: str) -> int:
    return sum(text in line for line in list(proc.stderr_lines))


def refused_results(proc: Proc) -> int:
    """Results the node logged (-v) as failing verification, one line each."""
    refused = re.compile(r"^pangea: result of task \d+ from \S+ failed verification: ")
    return sum(bool(refused.match(line)) for line in list(proc.stderr_lines))


def no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in "\n".join(proc.stdout_lines + proc.stderr_lines), proc.output()


# ---------------------------------------------------------------- initiate --expect 4


def _join_string(initiator: Proc) -> str:
    """The loopback join string of an `initiate --expect N` (its code line says "N uses")."""
    initiator.wait_for_line(r"^Waiting up to \d+ s for \d+ responders", timeout=READY_TIMEOUT_S, stream="stdout")
    code = initiator.wait_for_line(r"^Pairing code \(\d+ uses, valid \d+ s\): ([0-9A-Z-]+)$", stream="stdout").group(1)
    loopback = [a for a in printed_addresses(initiator.stdout_lines) if a.startswith("/ip4/127.0.0.1/")]
    assert loopback, initiator.output()
    return f"pangea://{loopback[0].lstrip('/')}#{code.replace('-', '')}"


@pytest.mark.slow
def test_initiate_with_four_responders_one_slow_passes_every_check(pyz: Path, make_home: Any) -> None:
    size = SPLIT_N
    initiate = [str(pyz), "initiate", "--host", "127.0.0.1", "--port", "0", "--expect", "4", "--timeout", "180"]
    initiate += ["--size", str(size), "--transfer-mib", "8", "--json"]
    with Proc(initiate, env=make_home("initiator").env, name="initiator") as initiator:
        join = _join_string(initiator)
        with contextlib.ExitStack() as stack:
            responders = []
            for i in range(4):
                fault = ["--fault", "slow=0.5"] if i == 3 else []
                cmd = [str(pyz), "respond", join, "--timeout", "120", "--json", *fault]
                responders.append(stack.enter_context(Proc(cmd, env=make_home(f"r{i}").env, name=f"responder{i}")))
            assert initiator.wait(timeout=PAIR_RUN_TIMEOUT_S) == 0, initiator.output()
            for r in responders:
                assert r.wait(timeout=60) == 0, r.output()
    no_traceback(initiator, *responders)

    doc = last_json(initiator.stdout_lines)
    assert doc["ok"] is True, doc
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert not failed, failed
    initiator_id = peer_id_from(initiator.stdout_lines, "initiator")
    ids = [peer_id_from(r.stdout_lines, "responder") for r in responders]
    for r in responders:
        reply = last_json(r.stdout_lines)
        assert reply["ok"] is True and all(c["ok"] for c in reply["checks"]), reply
        assert reply["peer"] == initiator_id, reply
    assert sorted(doc["peers"]) == sorted(ids)

    shares = doc["shares"]
    assert set(shares) == {"local", *ids}, shares
    assert sum(s["rows"] for s in shares.values()) == size, shares  # every row once
    for worker, share in shares.items():
        assert share["rows"] > 0 and share["blocks"] > 0, (worker, shares)
        assert 0.0 <= share["busy"] <= 1.0, (worker, shares)
    print(f"\ninitiate --expect 4 --size {size} shares: " + ", ".join(f"{w[-4:]} {s}" for w, s in shares.items()))


def test_initiate_with_a_corrupt_responder_refuses_its_results_and_recomputes_them(pyz: Path, make_home: Any) -> None:
    size = 512
    with start_initiator(
        pyz, make_home("initiator"), "--size", str(size), "--transfer-mib", "8", "--json"
    ) as initiator:
        join = loopback_address(initiator)
        cmd = [str(pyz), "respond", join, "--timeout", "60", "--json", "--fault", "corrupt"]
        with Proc(cmd, env=make_home("responder").env, name="responder") as responder:
            assert initiator.wait(timeout=PAIR_RUN_TIMEOUT_S) == 1, initiator.output()  # checks failed, as they must
            assert responder.wait(timeout=60) == 0, responder.output()  # it was told done, like any responder
    no_traceback(initiator, responder)
    assert any("failed verification" in line for line in initiator.stderr_lines), initiator.output()
    doc = last_json(initiator.stdout_lines)
    checks = {c["name"]: c for c in doc["checks"]}
    assert doc["ok"] is False and checks["delegation"]["ok"] is False, checks
    assert "not on the responder" in checks["delegation"]["detail"], checks["delegation"]
    # The rows of checks that ran on the responder once it was suspect say so, and that tasks fell back.
    for name in ("delegation", "aggregation", "throughput"):
        assert "the responder is suspect since " in checks[name]["detail"], checks[name]
        assert "failed verification" in checks[name]["detail"], checks[name]
    assert "ran locally because no responder was usable" in checks["delegation"]["detail"], checks["delegation"]
    # Every block the responder returned was refused and recomputed here; the gathered
    # product itself verified (the check fails only because the responder kept no block).
    responder_id = peer_id_from(responder.stdout_lines, "responder")
    assert doc["shares"]["local"]["rows"] == size and doc["shares"][responder_id]["rows"] == 0, doc["shares"]
    assert "got no block" in checks["aggregation"]["detail"], checks["aggregation"]
    assert "differs" not in checks["aggregation"]["detail"], checks["aggregation"]
    assert checks["fallback"]["ok"] is True, checks["fallback"]


# ---------------------------------------------------------------- split-remote: speeds


@pytest.mark.slow
def test_split_remote_gives_a_slow_worker_fewer_rows(pyz: Path, tmp_path: Path) -> None:
    # The last one stalls 2 s before every block: longer than a block's transfer and compute
    # even on a loaded 2-core CI box (0.5 s was lost in the noise there: 546 rows vs a median of 509).
    workers = [[], [], [], ["--fault", "slow=2"]]
    with running_cluster(pyz, tmp_path, workers) as cluster:
        slow = cluster.workers[3].peer_id
        # A first, small job: the workers' speeds are then measured ones (an EWMA of
        # the blocks they ran), not the figures their Hello carried from start-up.
        warm_a, warm_b = matrices(512, seed=1)
        warm, _ = split_remote(cluster.a, warm_a, warm_b)
        np.testing.assert_allclose(warm, warm_a @ warm_b)

        a, b = matrices(SPLIT_N)
        c, task = split_remote(cluster.a, a, b)
    np.testing.assert_allclose(c, a @ b)
    shares = assert_every_row_once(task, SPLIT_N)
    assert set(shares) == {w.peer_id for w in cluster.workers}, task["attempts"]  # split-remote: A computed nothing
    others = [rows for worker, (rows, _, _) in shares.items() if worker != slow]
    median = statistics.median(others)
    # Blocks follow measured speed and are pulled when a worker has room, so the
    # stalling worker ends with well under the others' median (~0.3-0.5 of it here).
    assert shares[slow][0] < 0.75 * median, task["attempts"]
    print(f"\nsplit-remote {SPLIT_N}: slow worker {shares[slow][0]} rows, others {sorted(others)}")


# ---------------------------------------------------------------- split-remote: failures


@pytest.mark.slow
def test_split_remote_survives_kill_9_of_a_worker_mid_job(pyz: Path, tmp_path: Path) -> None:
    # Both stall 1 s before each block, so the job outlasts the victim's first block by several blocks:
    # when it is killed, 0.5 s after that block, its next ones are in flight (stalling). Without the
    # stall a job whose b is held on the workers may be over before the kill.
    slow = ["--fault", "slow=1"]
    with running_cluster(pyz, tmp_path, [slow, slow]) as cluster:
        survivor, victim = cluster.workers
        a, b = matrices(SPLIT_N, seed=2)
        job = Job(lambda: split_remote(cluster.a, a, b))
        job.start()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not served_tasks(victim) and job.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_tasks(victim), f"the victim served no block\n{victim.proc.output()}"
        time.sleep(0.5)  # its first result reaches A, its next blocks are on their way
        victim.proc.popen.send_signal(signal.SIGKILL)
        c, task = job.outcome()
        assert victim.proc.wait(timeout=30) == -signal.SIGKILL
        gone = re.escape(short_id(victim.peer_id))
        # mid-job: an attempt was running on the victim when it died, and was retried
        cluster.a.proc.wait_for_line(rf"^pangea: task \d+ attempt 1 on {gone} failed: ", timeout=30, stream="stderr")
    np.testing.assert_allclose(c, a @ b)
    shares = assert_every_row_once(task, SPLIT_N)
    assert survivor.peer_id in shares, task["attempts"]
    assert set(shares) <= {survivor.peer_id, victim.peer_id, "local"}, task["attempts"]
    print(f"\nkill -9 mid-job: shares {[(w[-4:], s) for w, s in shares.items()]}")


@pytest.mark.slow
def test_split_remote_survives_a_worker_that_crashes_after_one_task(pyz: Path, tmp_path: Path) -> None:
    with running_cluster(pyz, tmp_path, [[], ["--fault", "crash-after=1"]]) as cluster:
        survivor, crasher = cluster.workers
        a, b = matrices(SPLIT_N, seed=3)
        c, task = split_remote(cluster.a, a, b)
        assert crasher.proc.wait(timeout=30) == 70  # os._exit(70) when its second task arrived
        assert count(crasher.proc, "fault injection: exiting abruptly after 1 tasks") == 1
        # the node is fine afterwards: the next job runs on the survivor alone
        a2, b2 = matrices(512, seed=4)
        c2, task2 = split_remote(cluster.a, a2, b2)
    np.testing.assert_allclose(c, a @ b)
    shares = assert_every_row_once(task, SPLIT_N)
    assert shares.get(crasher.peer_id, (0, 0, 0))[1] <= 1, task["attempts"]  # it delivered at most its one block
    np.testing.assert_allclose(c2, a2 @ b2)
    assert set(assert_every_row_once(task2, 512)) == {survivor.peer_id}, task2["attempts"]


@pytest.mark.slow
def test_split_remote_finishes_the_job_when_its_only_worker_dies(pyz: Path, tmp_path: Path) -> None:
    with running_cluster(pyz, tmp_path, [["--fault", "crash-after=0"]]) as cluster:
        (crasher,) = cluster.workers
        n = 1024
        a, b = matrices(n, seed=5)
        with client(cluster.a) as rpc:
            c = rpc.submit("matmul", a, b, placement="split-remote")
            task = rpc.last_task
        assert crasher.proc.wait(timeout=30) == 70
    # Every block the dead worker did not deliver is recomputed elsewhere (here: on A).
    assert sum(rows for rows, _, _ in shares_of(task).values()) == n, task["attempts"]
    np.testing.assert_allclose(c, a @ b)


# ---------------------------------------------------------------- corrupt, stalling and missing workers


@dataclass
class Lab:
    """Workers ok, corrupt (--fault corrupt) and stall (--fault slow=4), and A, a serve node with
    --peer all three plus a ghost: a --peer whose node never runs. More A nodes can join: every
    worker also trusts the ids in ``spare`` (their homes are ready, their nodes not started)."""

    a: ServeNode
    ok: ServeNode
    corrupt: ServeNode
    stall: ServeNode
    ghost: str  # the peer id of A's --peer that never comes up
    spare: list[NodeHome]


STALL_S = 4.0  # the stall worker's --fault slow: every task it is given waits this long first


@pytest.fixture(scope="module")
def module_lab(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("workers-lab")
    spare = [make_node_home(base, name) for name in ("trusting", "fresh", "fresh2", "fresh3")]
    allow = [peer_id_of(pyz, home, ID_TIMEOUT_S) for home in spare]
    ghost_home = make_node_home(base, "ghost")
    ghost = peer_id_of(pyz, ghost_home, ID_TIMEOUT_S)
    with socket.socket() as probe:  # a port nothing listens on: the ghost's address
        probe.bind(("127.0.0.1", 0))
        ghost_port = probe.getsockname()[1]
    workers = [[], ["--fault", "corrupt"], ["--fault", f"slow={STALL_S:g}"]]
    a_args = ["--peer", f"/ip4/127.0.0.1/tcp/{ghost_port}/p2p/{ghost}"]
    with running_cluster(pyz, base, workers, a_args=a_args, allow=allow) as cluster:
        ok, corrupt, stall = cluster.workers
        yield Lab(cluster.a, ok, corrupt, stall, ghost, spare)


@pytest.fixture
def lab(module_lab: Lab) -> Lab:
    """The module's nodes; their output goes into the report of a failing test."""
    nodes = [module_lab.a, module_lab.ok, module_lab.corrupt, module_lab.stall]
    Proc.started.extend(n.proc for n in nodes)  # NOTE: started before this test, so list them again
    for node in nodes:
        assert node.proc.returncode is None, f"a node of the module has exited\n{node.proc.output()}"
    return module_lab


def test_a_corrupt_peer_fails_verification_and_the_task_runs_elsewhere(lab: Lab) -> None:
    a, b = matrices(300, seed=6)
    before = refused_results(lab.a.proc)
    with client(lab.a) as rpc:
        c = rpc.submit("matmul", a, b, placement=lab.corrupt.peer_id)
        task = rpc.last_task
    np.testing.assert_allclose(c, a @ b)
    first, *rest = task["attempts"]
    assert first["worker"] == lab.corrupt.peer_id, task["attempts"]
    assert first["outcome"].startswith("wrong-result: "), first
    assert "failed verification" in first["outcome"] and "Freivalds" in first["outcome"], first
    assert rest and rest[-1]["outcome"] == "ok" and rest[-1]["worker"] != lab.corrupt.peer_id, task["attempts"]
    assert task["ran_on"] == rest[-1]["worker"]
    assert refused_results(lab.a.proc) > before


@contextlib.contextmanager
def fresh_node(pyz: Path, home: NodeHome, workers: Sequence[ServeNode], *args: str) -> Iterator[ServeNode]:
    """Start another A (one of the lab's spare homes) with --peer the given workers; wait until connected."""
    peers = [arg for w in workers for arg in ("--peer", w.address)]
    with launch_worker_serve(pyz, home, *peers, *args, name=f"serve-{home.root.name}") as proc:
        node = serve_node(proc, home, READY_TIMEOUT_S)
        for w in workers:
            proc.wait_for_line(rf"^pangea: connected to peer {w.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        yield node


def test_split_with_a_corrupt_worker_recomputes_its_blocks_and_is_right(pyz: Path, lab: Lab) -> None:
    # A node of its own, so the corrupt worker is not yet suspect and is given blocks.
    with fresh_node(pyz, lab.spare[1], [lab.ok, lab.corrupt]) as node:
        a, b = matrices(1024, seed=7)
        c, task = split_remote(node, a, b)
        failed = refused_results(node.proc)
    np.testing.assert_allclose(c, a @ b)
    shares = assert_every_row_once(task, 1024)
    assert lab.corrupt.peer_id not in shares, task["attempts"]  # none of its wrong blocks was kept
    assert failed >= 1, node.proc.output()  # its blocks were sent, checked and refused


def test_split_stops_giving_blocks_to_a_worker_once_it_failed_verification(pyz: Path, lab: Lab) -> None:
    with fresh_node(pyz, lab.spare[2], [lab.ok, lab.corrupt]) as node:
        a, b = matrices(1024, seed=11)
        c, _ = split_remote(node, a, b)
        failed = refused_results(node.proc)
    np.testing.assert_allclose(c, a @ b)
    # At most the two blocks it had in flight when the first one was refused.
    assert failed <= 2, node.proc.output()


def test_a_split_element_wise_task_with_a_corrupt_worker_is_recomputed_and_right(pyz: Path, lab: Lab) -> None:
    # Element-wise blocks are checked by recomputing them: every wrong one is refused and run again.
    with fresh_node(pyz, lab.spare[3], [lab.ok, lab.corrupt]) as node:
        rng = np.random.default_rng(13)
        x, y = rng.standard_normal((2000, 256)), rng.standard_normal((2000, 256))
        with client(node) as rpc:
            got = rpc.submit("multiply", x, y, placement="split-remote")
            task = rpc.last_task
        failed = refused_results(node.proc)
    np.testing.assert_array_equal(got, x * y)
    shares = assert_every_row_once(task, 2000)
    assert lab.corrupt.peer_id not in shares, task["attempts"]
    assert failed >= 1, node.proc.output()


def test_verify_rounds_0_accepts_a_corrupt_result(pyz: Path, lab: Lab) -> None:
    """The control: the same corrupt peer, trusted blindly, gets a wrong product through."""
    with fresh_node(pyz, lab.spare[0], [lab.corrupt], "--verify-rounds", "0") as node:
        a, b = matrices(300, seed=8)
        with client(node) as rpc:
            c = rpc.submit("matmul", a, b, placement=lab.corrupt.peer_id)
            task = rpc.last_task
        assert refused_results(node.proc) == 0
    assert task["attempts"] == [{"worker": lab.corrupt.peer_id, "outcome": "ok"}]
    assert not np.allclose(c, a @ b)


def test_a_task_whose_client_gives_up_is_dropped_by_its_worker(lab: Lab) -> None:
    a, b = matrices(64, seed=9)
    done_before = served_tasks(lab.stall)
    with client(lab.a) as rpc:
        start = time.monotonic()
        with pytest.raises(TaskError) as caught:
            rpc.submit("matmul", a, b, placement=lab.stall.peer_id, timeout_s=1.5)  # the worker stalls 4 s first
        gave_up_s = time.monotonic() - start
        assert caught.value.kind == "deadline", caught.value
        assert gave_up_s < STALL_S + 10, gave_up_s
        cancelled = lab.stall.proc.wait_for_line(r"^pangea: task (\d+) from \S+ cancelled by its sender$", timeout=30)
        cancelled_id = int(cancelled.group(1))

        start = time.monotonic()
        np.testing.assert_allclose(rpc.submit("matmul", a, b, placement=lab.stall.peer_id), a @ b)
        next_s = time.monotonic() - start
        assert rpc.last_task["ran_on"] == lab.stall.peer_id, rpc.last_task
    # The next task waited only its own stall, and the given-up one never ran.
    assert next_s < STALL_S + 15, next_s
    assert cancelled_id not in served_tasks(lab.stall), lab.stall.proc.output()
    assert len(served_tasks(lab.stall)) == len(done_before) + 1


def test_placement_on_a_configured_peer_that_is_down_falls_back_to_local(lab: Lab) -> None:
    a, b = matrices(100, seed=10)
    with client(lab.a) as rpc:
        assert lab.ghost not in [p["peer_id"] for p in rpc.peers()]
        c = rpc.submit("matmul", a, b, placement=lab.ghost)
        task = rpc.last_task
    np.testing.assert_allclose(c, a @ b)
    assert task["attempts"][0]["worker"] == lab.ghost
    assert task["attempts"][0]["outcome"].startswith("unavailable"), task["attempts"]
    assert task["ran_on"] == "local", task


def test_split_remote_of_fewer_rows_than_workers_returns(lab: Lab) -> None:
    # One row, two or more workers: one block for the first worker to pull, none for the others.
    a, b = matrices(4, seed=12)
    a = a[:1]
    with Client(lab.a.rpc, token=lab.a.token, timeout_s=5) as rpc:  # gives up 30 s after the node's own 5 s deadline
        c = rpc.submit("matmul", a, b, placement="split-remote")
        task = rpc.last_task
    np.testing.assert_allclose(c, a @ b)
    assert sum(rows for rows, _, _ in shares_of(task).values()) == 1, task["attempts"]

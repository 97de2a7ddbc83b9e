"""A hostile peer against a real `serve` node: bad bytes never take the node down.

The hostile peer is tests/peers/hostile.py, a libp2p node of its own run with
the built pyz's environment (``SHIV_INTERPRETER=1 pangea.pyz hostile.py``).
The node under test trusts it (``--allow-peer``), so everything here is what a
paired or trusted peer can do; what an untrusted one can do is in
test_security.py. Each scenario sends something broken (truncated, oversized
or garbage frames, messages out of order, bad arrays, floods of streams and
tasks, a disconnect mid-frame) and then a GOOD task, which must still be
served. The node must answer with an error reply or a stream reset, log a
line, and keep running; and under a flood of large requests its memory must
stay within its ``--memory-budget-mib``.

Nodes: one module-wide target (``--handshake-timeout 3``), one module-wide
slow node (``--max-inflight 4 --fault slow=1``: every task is held in
flight 1 s, which makes the in-flight limits deterministic), and a fresh
node for each memory test. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import NodeHome, Proc, make_node_home
from pyz_helpers import ServeNode, peer_id_of, start_serve

HOSTILE = Path(__file__).resolve().parents[1] / "peers" / "hostile.py"
HOSTILE_TIMEOUT_S = 240.0  # one hostile run, pyz start (and a cold extraction) included
ENDED = {"eof", "reset"}  # how a stream the node drops looks from the peer's side
MIB = 1 << 20

# ---------------------------------------------------------------- helpers


@dataclass
class HostileRun:
    """What the hostile peer observed: its JSON lines."""

    proc: Proc
    events: list[dict[str, Any]]

    def all(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def one(self, event: str, **match: Any) -> dict[str, Any]:
        found = self.all(event, **match)
        assert len(found) == 1, f"expected one {event} {match}, got {found}\n{self.proc.output()}"
        return found[0]

    def assert_good(self) -> None:
        """Every scenario's closing good task was served and verified."""
        goods = self.all("good")
        assert goods, self.proc.output()
        for good in goods:
            assert good["ok"] is True, f"the good task after {good['scenario']} failed: {good['reply']}"


@dataclass
class Hostile:
    """The hostile peer's home (its identity) and peer id."""

    home: NodeHome
    peer_id: str

    def run(self, pyz: Path, target: str, *scenarios: str, options: tuple[str, ...] = ()) -> HostileRun:
        cmd = [str(pyz), str(HOSTILE), "--home", str(self.home.pangea_home), "--target", target, *options]
        with Proc([*cmd, *scenarios], env={**self.home.env, "SHIV_INTERPRETER": "1"}, name="hostile") as proc:
            rc = proc.wait(timeout=HOSTILE_TIMEOUT_S)
        events = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
        assert not [e for e in events if e["event"] == "crash"], proc.output()
        assert rc == 0, proc.output()
        assert [e["scenario"] for e in events if e["event"] == "done"] == list(scenarios), proc.output()
        return HostileRun(proc, events)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def show_output_on_failure(*nodes: ServeNode) -> None:
    # conftest.py attaches the output of Procs started during a test; module nodes started earlier.
    Proc.started.extend(node.proc for node in nodes)


def assert_alive(node: ServeNode) -> None:
    assert node.proc.returncode is None, node.proc.output()
    assert not [line for line in node.proc.stderr_lines if "Traceback" in line], node.proc.output()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hostile(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    home = make_node_home(tmp_path_factory.mktemp("hostile"), "hostile")
    return Hostile(home, peer_id_of(pyz, home))


@pytest.fixture(scope="module")
def target_node(pyz: Path, hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path_factory.mktemp("target"), "target")
    node = start_serve(
        pyz, home, "--allow-peer", hostile.peer_id, "--handshake-timeout", "3", name="serve-target", ready_timeout=60
    )
    with node.proc:
        yield node


@pytest.fixture
def target(target_node: ServeNode) -> Iterator[ServeNode]:
    """The module's target node, alive before and after the test."""
    show_output_on_failure(target_node)
    assert_alive(target_node)
    yield target_node
    assert_alive(target_node)


@pytest.fixture(scope="module")
def slow_node(pyz: Path, hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeNode]:
    home = make_node_home(tmp_path_factory.mktemp("slow"), "slow")
    args = ("--allow-peer", hostile.peer_id, "--max-inflight", "4", "--fault", "slow=1")
    node = start_serve(pyz, home, *args, name="serve-slow", ready_timeout=60)
    with node.proc:
        yield node


@pytest.fixture
def slow(slow_node: ServeNode) -> Iterator[ServeNode]:
    """A node that holds every task 1 s before running it (--fault slow=1), --max-inflight 4."""
    show_output_on_failure(slow_node)
    assert_alive(slow_node)
    yield slow_node
    assert_alive(slow_node)


@pytest.fixture
def fresh_node(pyz: Path, hostile: Hostile, tmp_path: Path) -> Iterator[Any]:
    """A factory of nodes for one test (stopped at its end): fresh_node(*serve args)."""
    started: list[ServeNode] = []

    def start(*args: str) -> ServeNode:
        home = make_node_home(tmp_path, f"node{len(started)}")
        node = start_serve(
            pyz, home, "--allow-peer", hostile.peer_id, *args, name=f"serve-{len(started)}", ready_timeout=60
        )
        started.append(node)
        return node

    yield start
    for node in started:
        node.proc.stop()


# ---------------------------------------------------------------- framing


@dataclass
class Observed:
    """A hostile run and what the node did meanwhile."""

    run: HostileRun
    logged: list[str]  # the node's stderr lines during the run
    grew_kib: int  # growth of the node's RSS over the run


@pytest.fixture(scope="module")
def framing(pyz: Path, hostile: Hostile, target_node: ServeNode) -> Observed:
    """One hostile run of the framing attacks, each followed by a good task."""
    mark = len(target_node.proc.stderr_lines)
    before = memory_kib(target_node.proc.pid)["VmRSS"]
    scenarios = ("truncated", "oversized", "garbage", "wrong-order", "mid-frame-disconnect")
    run = hostile.run(pyz, target_node.address, *scenarios, options=("--announce-mib", "64"))
    return Observed(run, target_node.stderr_since(mark), memory_kib(target_node.proc.pid)["VmRSS"] - before)


def test_truncated_frame_then_close_drops_the_session_and_the_next_task_is_served(
    framing: Observed, target: ServeNode
) -> None:
    assert framing.run.one("reply", scenario="truncated")["reply"]["type"] in ENDED
    framing.run.one("good", scenario="truncated", ok=True)
    assert wait_until(lambda: "peer closed the stream in the middle of a frame" in target.session_log(), 10)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("payload-2^40", "frame payload of 1024.0 GiB exceeds the limit of 2.0 GiB"),
        ("header-0", "frame header of 0 bytes is outside 1..1048576"),
        ("header-1MiB+1", "frame header of 1048577 bytes is outside 1..1048576"),
        ("header-2^32-1", "frame header of 4294967295 bytes is outside 1..1048576"),
    ],
)
def test_oversized_frame_prefix_is_refused_from_the_prefix_alone(
    framing: Observed, hostile: Hostile, target: ServeNode, case: str, message: str
) -> None:
    in_session = framing.run.one("in-session", scenario="oversized", case=case)
    # In a session: an Error naming the limit, then the stream ends.
    assert in_session["reply"] == {"type": "ErrorMsg", "kind": "protocol", "message": message}
    assert in_session["then"]["type"] in ENDED
    # Before any Hello: no payload at all is accepted, the stream is reset without a word.
    assert framing.run.one("before-hello", scenario="oversized", case=case)["reply"]["type"] in ENDED
    framing.run.one("good", scenario="oversized", ok=True)
    assert framing.grew_kib < 512 * 1024  # nothing of 2^40 (or of a 4 GiB header) was allocated
    assert any(f"dropping peer {hostile.peer_id[:8]}" in line and message in line for line in framing.logged), (
        framing.logged
    )


def test_garbage_bytes_in_a_session_and_before_hello(framing: Observed, target: ServeNode) -> None:
    for reply in framing.run.all("in-session", scenario="garbage"):
        assert reply["reply"]["type"] == "ErrorMsg" and reply["reply"]["kind"] == "protocol", reply
    for reply in framing.run.all("before-hello", scenario="garbage"):
        assert reply["reply"]["type"] in ENDED, reply
    bad = framing.run.one("bad-capnp")["reply"]
    assert bad["type"] == "ErrorMsg" and bad["message"].startswith("malformed message header"), bad
    framing.run.one("good", scenario="garbage", ok=True)
    logged = [line for line in framing.logged if "malformed message header" in line]
    assert logged, framing.logged


def test_wrong_message_types_first_and_a_second_hello(framing: Observed, hostile: Hostile, target: ServeNode) -> None:
    for first in ("TaskResultMsg", "TaskRequestMsg", "PongMsg"):
        assert framing.run.one("before-hello", first=first)["reply"]["type"] in ENDED
    second = framing.run.one("second-hello")
    assert second["reply"] == {
        "type": "ErrorMsg",
        "kind": "protocol",
        "message": "unexpected HelloMsg in an open session",
    }
    assert second["then"]["type"] in ENDED
    framing.run.one("good", scenario="wrong-order", ok=True)
    logged = "\n".join(framing.logged)
    assert f"dropping peer {hostile.peer_id}: expected Hello first, got TaskResultMsg" in logged
    assert f"dropping peer {hostile.peer_id}: expected Hello first, got PongMsg" in logged
    # A TaskRequest before Hello is refused from its prefix: no payload before the handshake.
    assert f"dropping peer {hostile.peer_id}: frame payload of " in logged and "exceeds the limit of 0 B" in logged


def test_disconnect_mid_frame_then_the_next_task_is_served(framing: Observed, target: ServeNode) -> None:
    assert framing.run.one("disconnected")["announced"] == 64 * MIB
    framing.run.one("good", scenario="mid-frame-disconnect", ok=True)


def test_framing_attacks_leave_no_traceback(framing: Observed, target: ServeNode) -> None:
    framing.run.assert_good()
    assert all(line.startswith(("pangea: ", "hint: ")) for line in framing.logged), framing.logged


# ---------------------------------------------------------------- bad tasks on an open session

BAD_TASKS = {
    # case: (error kind, text in the message)
    "unknown-kernel": ("bad-input", "unknown kernel \"__import__('os').system\"; this node runs"),
    "unknown-kernel-empty": ("bad-input", "unknown kernel ''"),
    "dtype-object": ("bad-input", "dtype 'object' is not allowed"),
    "dtype-float16": ("bad-input", "dtype 'float16' is not allowed"),
    "dtype-void": ("bad-input", "dtype 'V8' is not allowed"),
    "dtype-bigendian": ("bad-input", "dtype '>f8' is not allowed"),
    "nbytes-lies": ("bad-input", "shape (10, 10) of float64 needs 800 bytes, header says 80"),
    "payload-short": ("bad-input", "runs past the end of the payload"),
    "payload-long": ("bad-input", "payload has 64 bytes, the arrays describe 16"),
    "huge-dims": ("bad-input", "shape (1099511627776, 1099511627776) has more than 268435456 elements"),
    "huge-dims-max": ("bad-input", "has more than 268435456 elements"),
    "zero-by-huge": ("bad-input", "elements"),
    "nine-dims": ("bad-input", "9 dimensions, at most 8 allowed"),
    "wrong-arity": ("bad-input", "matmul: takes 2 operand(s), got 1"),
    "unknown-param": ("bad-input", "unknown parameter(s) ['evil']"),
    "nan-param": ("bad-input", "factor nan is not a finite number"),
    "random-huge": ("bad-input", "more than 268435456 elements"),
    "shape-mismatch": ("bad-input", "shapes (2, 3) and (2, 3) do not match"),
    "solve-nan-matrix": ("bad-input", "solve: matrix contains NaN or Inf"),
    "solve-inf-matrix": ("bad-input", "solve: matrix contains NaN or Inf"),
    "solve-nan-rhs": ("bad-input", "solve: right-hand side contains NaN or Inf"),
    "inverse-nan": ("bad-input", "inverse: matrix contains NaN or Inf"),
    "inverse-inf": ("bad-input", "inverse: matrix contains NaN or Inf"),
    "inverse-singular": ("bad-input", "inverse: matrix is singular"),
}


@pytest.fixture(scope="module")
def bad_tasks_run(pyz: Path, hostile: Hostile, target_node: ServeNode) -> HostileRun:
    """One hostile run of every bad task, each on the session the one before left open."""
    return hostile.run(pyz, target_node.address, "bad-arrays", "nan-inf", "huge-output")


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_gets_an_error_result_and_the_session_goes_on(
    bad_tasks_run: HostileRun, target: ServeNode, case: str
) -> None:
    kind, needle = BAD_TASKS[case]
    reply = bad_tasks_run.one("reply", case=case)["reply"]
    assert reply["type"] == "TaskResultMsg" and reply["ok"] is False, reply
    assert reply["error_kind"] == kind and needle in reply["error_message"], reply
    assert "Traceback" not in reply["error_message"] and "\n" not in reply["error_message"]
    bad_tasks_run.assert_good()  # on the same session, after all of them


def test_nan_is_fine_where_it_does_not_matter(bad_tasks_run: HostileRun) -> None:
    reply = bad_tasks_run.one("reply", case="add-nan")["reply"]
    assert reply["ok"] is True and reply["shapes"] == [[4, 4]]


@pytest.mark.parametrize("kernel", ["matmul", "add", "multiply"])
def test_huge_output_from_small_operands_is_refused_before_computing(bad_tasks_run: HostileRun, kernel: str) -> None:
    """(200000 x 1) op (1 x 200000): 3 MB in, 4e10 elements (320 GB) out."""
    reply = bad_tasks_run.one("reply", case=kernel)
    result = reply["reply"]
    assert result["ok"] is False, result
    if result["error_kind"] == "bad-input":
        assert f"{kernel}: the result would have more than 268435456 elements" in result["error_message"], result
    else:
        assert result["error_kind"] == "busy", result
    assert reply["seconds"] < 30, reply  # refused, not attempted


def test_bad_tasks_are_logged_with_the_peer_id(bad_tasks_run: HostileRun, hostile: Hostile, target: ServeNode) -> None:
    logged = "\n".join(target.proc.stderr_lines)
    assert f"bad message from {hostile.peer_id}: array 0: dtype 'object' is not allowed" in logged
    assert "unknown kernel" in target.session_log()


# ---------------------------------------------------------------- floods of streams and tasks


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one moment."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_flood_of_idle_streams_is_reset_beyond_16_pending_and_dropped_after_the_handshake_timeout(
    pyz: Path, hostile: Hostile, target: ServeNode
) -> None:
    mark = len(target.proc.stderr_lines)
    run = hostile.run(pyz, target.address, "stream-flood", options=("--count", "300"))
    flood = run.one("flood")
    assert flood["count"] == 300
    streams = flood["streams"]
    assert {s["end"] for s in streams} <= ENDED | {"open failed: StreamFailure"}, flood["kinds"]  # none hangs
    held = [(s["opened"], s["ended"]) for s in streams if s["ended"] - s["opened"] >= 1.5]
    assert 1 <= max_overlap(held) <= 16, held  # at most 16 wait for their Hello at once...
    assert all(end - opened < 3 + 10 for opened, end in held), held  # ...and only until --handshake-timeout 3
    run.assert_good()
    logged = target.stderr_since(mark)
    resets = [line for line in logged if f"resetting a stream from {hostile.peer_id}: 16 streams already" in line]
    timeouts = [line for line in logged if f"dropping peer {hostile.peer_id}: no Hello within 3 s" in line]
    assert len(resets) >= 300 - 16 * 2 and 1 <= len(timeouts), logged[-5:]
    assert len(resets) + len(timeouts) == 300, (len(resets), len(timeouts))


@pytest.fixture(scope="module")
def limits_run(pyz: Path, hostile: Hostile, slow_node: ServeNode) -> Observed:
    """One hostile run of the in-flight limit scenarios against the slow node."""
    mark = len(slow_node.proc.stderr_lines)
    scenarios = ("inflight", "duplicate-id", "duplicate-id-3", "inflight-after-duplicate")
    run = hostile.run(pyz, slow_node.address, *scenarios, options=("--count", "8", "--n", "256"))
    return Observed(run, slow_node.stderr_since(mark), 0)


def test_more_than_max_inflight_tasks_get_busy_unbuffered(limits_run: Observed, slow: ServeNode) -> None:
    replies = limits_run.run.one("replies", scenario="inflight")["replies"]
    assert len(replies) == 8, replies
    busy = [r for r in replies if r["error_kind"] == "busy"]
    ok = [r for r in replies if r["ok"]]
    assert len(ok) == 4 and len(busy) == 4, replies
    assert all(r["error_message"] == "4 tasks of yours are in flight (limit 4)" for r in busy), busy
    assert all(r["shapes"] == [[256, 256]] for r in ok), ok
    limits_run.run.one("good", scenario="inflight", ok=True)
    assert sum("(busy): 4 tasks of yours are in flight" in line for line in limits_run.logged) >= 4


def test_same_task_id_twice_in_flight_second_gets_bad_input(limits_run: Observed, slow: ServeNode) -> None:
    replies = limits_run.run.one("replies", scenario="duplicate-id")["replies"]
    assert len(replies) == 2 and all(r["task_id"] == 4242 for r in replies), replies
    refused = [r for r in replies if not r["ok"]]
    assert [(r["error_kind"], r["error_message"]) for r in refused] == [
        ("bad-input", "task id 4242 is already in flight")
    ]
    assert [r["shapes"] for r in replies if r["ok"]] == [[[256, 256]]]  # the first one ran
    limits_run.run.one("good", scenario="duplicate-id", ok=True)
    assert any("refusing task 4242" in line and "already in flight" in line for line in limits_run.logged)


def test_same_task_id_three_times_in_flight_only_the_first_runs(limits_run: Observed, slow: ServeNode) -> None:
    replies = limits_run.run.one("replies", scenario="duplicate-id-3")["replies"]
    assert len(replies) == 3, replies
    assert [r["shapes"] for r in replies if r["ok"]] == [[[256, 256]]], replies
    assert sum(r["error_message"] == "task id 4343 is already in flight" for r in replies) == 2, replies


def test_refused_duplicate_does_not_free_the_slot_of_the_task_still_running(
    limits_run: Observed, slow: ServeNode
) -> None:
    event = limits_run.run.one("replies", scenario="inflight-after-duplicate")
    replies = event["replies"]
    assert len(replies) == 6, replies
    first = [r for r in replies if r["task_id"] == event["first"]]
    assert sorted(r["error_kind"] for r in first) == ["", "bad-input"], first
    others = [r for r in replies if r["task_id"] != event["first"]]
    # A is still running: of the 4 that follow, 3 fit under --max-inflight 4 and one is busy.
    assert sum(r["ok"] for r in others) == 3 and sum(r["error_kind"] == "busy" for r in others) == 1, others


def test_limit_scenarios_end_with_a_good_task(limits_run: Observed, slow: ServeNode) -> None:
    limits_run.run.assert_good()


# ---------------------------------------------------------------- memory


@pytest.mark.slow
def test_flood_of_large_requests_is_refused_with_busy_within_the_memory_budget(
    pyz: Path, hostile: Hostile, fresh_node: Any, record_property: Any
) -> None:
    """8 matmuls of two 2048x2048 float64 operands (64 MiB each request, 512 MiB in all)
    written back to back on one session to a node with a 256 MiB budget. The node holds
    each task 6 s (--fault slow=6), so the flood outpaces it even on a busy machine."""
    budget_mib = 256
    node = fresh_node(
        *("--memory-budget-mib", str(budget_mib), "--max-inflight-mib", "1024", "--max-inflight", "64"),
        *("--fault", "slow=6"),
    )
    baseline = memory_kib(node.proc.pid)
    run = hostile.run(pyz, node.address, "flood", options=("--count", "8", "--n", "2048", "--timeout", "60"))
    after = memory_kib(node.proc.pid)
    flood = run.one("flood")
    assert flood["results"] == flood["sent"] == 8 and flood["others"] == [], flood
    assert flood["wrong_shapes"] == [], flood
    assert flood["kinds"].get("ok", 0) >= 2 and flood["kinds"].get("busy", 0) >= 1, flood
    assert set(flood["kinds"]) <= {"ok", "busy"}, flood
    assert "memory budget of 256.0 MiB" in flood["busy_example"][0], flood
    run.assert_good()
    grew_mib = (after["VmHWM"] - baseline["VmRSS"]) / 1024
    figures = {
        "baseline_rss_mib": round(baseline["VmRSS"] / 1024),
        "peak_hwm_mib": round(after["VmHWM"] / 1024),
        "rss_after_mib": round(after["VmRSS"] / 1024),
        "peak_growth_mib": round(grew_mib),
        "busy": flood["kinds"].get("busy", 0),
        "ok": flood["kinds"].get("ok", 0),
        "flood_s": flood["seconds"],
    }
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nmemory flood: {figures}")
    # Operands and reserved outputs within the budget, plus 256 MiB for buffers and temporaries.
    assert grew_mib < budget_mib + 256, figures
    assert_alive(node)


@dataclass
class CutOff:
    node: ServeNode
    run: HostileRun
    baseline_kib: int  # the node's RSS before the run


@pytest.fixture(scope="module")
def cut_off_node(pyz: Path, hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CutOff]:
    """A node with a 512 MiB budget, after a hostile run that announced 512 MiB of operands,
    sent 4 KiB of them and disconnected, then asked for a good task."""
    home = make_node_home(tmp_path_factory.mktemp("cut-off"), "node")
    node = start_serve(
        pyz, home, "--allow-peer", hostile.peer_id, "--memory-budget-mib", "512", name="serve-cut-off", ready_timeout=60
    )
    with node.proc:
        baseline = memory_kib(node.proc.pid)["VmRSS"]
        run = hostile.run(pyz, node.address, "mid-frame-disconnect", options=("--announce-mib", "512"))
        yield CutOff(node, run, baseline)


@pytest.fixture
def cut_off(cut_off_node: CutOff) -> CutOff:
    show_output_on_failure(cut_off_node.node)
    assert_alive(cut_off_node.node)
    cut_off_node.run.one("disconnected")
    return cut_off_node


def test_disconnect_mid_frame_gives_the_admitted_bytes_back_to_the_budget(cut_off: CutOff) -> None:
    cut_off.run.assert_good()  # today: busy, "the node's memory budget of 512.0 MiB is in use (512.0 MiB)"


def test_disconnect_mid_frame_frees_the_payload_buffer(cut_off: CutOff) -> None:
    pid = cut_off.node.proc.pid
    freed = wait_until(lambda: memory_kib(pid)["VmRSS"] - cut_off.baseline_kib < 128 * 1024, 3)
    assert freed, f"RSS {memory_kib(pid)['VmRSS'] // 1024} MiB, baseline {cut_off.baseline_kib // 1024} MiB"


def test_payload_announced_on_a_ping_or_unsolicited_result_is_refused_at_the_header(
    pyz: Path, hostile: Hostile, fresh_node: Any
) -> None:
    node = fresh_node("--memory-budget-mib", "256")
    baseline = memory_kib(node.proc.pid)["VmRSS"]
    run = hostile.run(pyz, node.address, "payload-on-ping", options=("--announce-mib", "512"))
    run.assert_good()
    grew_mib = (memory_kib(node.proc.pid)["VmHWM"] - baseline) / 1024
    # a Ping with a payload breaks framing: the node says so and resets the stream
    reply = run.one("reply", case="ping")["reply"]
    assert reply["type"] == "ErrorMsg" and reply["kind"] == "protocol", (reply, grew_mib)
    # a result nobody awaits may be a late one (its task was cancelled): skipped unbuffered, no reply
    assert run.one("reply", case="task-result")["reply"]["type"] == "timeout"
    assert grew_mib < 256, grew_mib


def test_error_messages_name_no_internals(bad_tasks_run: HostileRun) -> None:
    for reply in bad_tasks_run.all("reply"):
        text = reply["reply"].get("error_message", "")
        assert not re.search(r"Traceback|File \"|\.py\"|0x[0-9a-f]{8}", text), reply

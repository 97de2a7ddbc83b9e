"""Network faults between two serve nodes, one per network namespace.

Serve node A runs in namespace ``a`` with ``--peer`` B; B runs in namespace
``b`` with ``--allow-peer`` A (A's id from ``pangea.pyz id``); the two talk
over the veth pair of tests/helpers.py's NetnsPair. A's RPC endpoint is on
127.0.0.1 *inside* namespace a, so the client runs there too: a small driver
script run by the pyz's own interpreter (``SHIV_INTERPRETER=1 ip netns exec
<a> pangea.pyz driver.py ...``) submits the tasks with `pangea.Client` and
prints one JSON line per task.

The faults, all inside the test's own namespaces (iptables, nft and tc come
with the CI image; nothing is installed): random packet loss on B's input,
a token-bucket rate limit on B's veth, and a partition (the veth pair down)
longer than the idle timeout. Every rule and qdisc added is removed again (and
would die with the namespaces anyway). What must hold: tasks complete with a
correct result or fail with a clear error before their deadline, never hang;
a partitioned peer is dropped, its task falls back to A, and A redials it
with backoff once the link is back.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import NetnsPair, NodeHome, Proc
from pyz_helpers import peer_id_of

pytestmark = pytest.mark.netns

READY_TIMEOUT_S = 120.0  # a serve node's ready line (pyz start-up on a busy 2-core machine)
CONNECT_TIMEOUT_S = 60.0  # A's `connected to peer` line
IDLE_TIMEOUT_S = 6  # --idle-timeout of the partition test's nodes
REDIAL_TIMEOUT_S = 60.0  # keep_connected backs off 1, 2, 4, ... 30 s between dials of 10 s at most
DRIVER_SLACK_S = 60.0  # a driver run's own start-up and client set-up, on top of its tasks' deadlines

# Runs inside namespace a with the pyz's interpreter: one JSON line per task or query.
DRIVER = r"""
import json, sys, time

import numpy as np
import pangea

rpc, op, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


def report(**fields):
    print(json.dumps(fields), flush=True)


with pangea.Client(rpc, timeout_s=args.get("timeout", 60)) as node:
    if op == "peers":
        report(peers=node.peers())
    elif op == "matmul":
        rng = np.random.default_rng(args.get("seed", 0))
        n = args["n"]
        for _ in range(args.get("count", 1)):
            a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
            start = time.monotonic()
            try:
                c = node.submit("matmul", a, b, placement=args["placement"], timeout_s=args["timeout"])
                ok, correct, error, kind = True, bool(np.allclose(c, a @ b)), "", ""
            except pangea.PangeaError as exc:
                ok, correct, error, kind = False, False, str(exc), getattr(exc, "kind", "")
            report(ok=ok, correct=correct, error=error, kind=kind, seconds=time.monotonic() - start,
                   task=node.last_task)
    elif op == "download":
        rows = args["mib"] * 128  # 1024 float64 columns: 8 KiB a row
        params = {"rows": float(rows), "cols": 1024.0, "seed": 7.0}
        start = time.monotonic()
        out = node.submit("random", placement=args["placement"], timeout_s=args["timeout"], **params)
        seconds = time.monotonic() - start
        expected = np.random.default_rng(7).random((rows, 1024))
        moving_s = seconds - node.last_task["timings"]["compute_s"]
        report(ok=True, correct=bool(np.array_equal(out, expected)), seconds=seconds, task=node.last_task,
               mb_s=out.nbytes / 1e6 / max(moving_s, 1e-9))
    elif op == "upload":  # an array to B, its sum back: A's bytes out say whether it crossed packed
        rng = np.random.default_rng(3)
        n = args["mib"] << 17  # 8-byte elements
        a = rng.integers(0, 100, 2 * n).astype(np.int32) if args["kind"] == "smooth" else rng.standard_normal(n)
        before = node.status()["bytes_out"]
        start = time.monotonic()
        total = node.submit("sum", a, placement=args["placement"], timeout_s=args["timeout"])
        seconds = time.monotonic() - start
        report(ok=True, correct=bool(np.isclose(total, a.sum())), seconds=seconds, task=node.last_task,
               nbytes=int(a.nbytes), sent=node.status()["bytes_out"] - before)
    else:
        raise SystemExit(f"unknown op {op!r}")
"""


@dataclass
class Nodes:
    """Serve node A (namespace a, --peer B) and B (namespace b), connected."""

    pair: NetnsPair
    pyz: Path
    a: Proc
    b: Proc
    a_home: NodeHome
    a_id: str
    b_id: str
    rpc: str  # A's RPC endpoint, 127.0.0.1:PORT inside namespace a
    driver: Path

    def drive(self, op: str, timeout_s: float, **args: Any) -> list[dict[str, Any]]:
        """Run the driver in namespace a; return its JSON lines. Bounded: timeout_s + start-up slack."""
        env = dict(self.a_home.env, SHIV_INTERPRETER="1")
        cmd: list[str | Path] = [self.pyz, self.driver, self.rpc, op, json.dumps(args)]
        try:
            result = self.pair.run("a", cmd, env=env, timeout=timeout_s + DRIVER_SLACK_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"the client hung: {op} {args} not done within {timeout_s + DRIVER_SLACK_S:g} s"
            ) from exc
        assert result.returncode == 0, f"driver {op} failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def peer_ids(self) -> list[str]:
        return [p["peer_id"] for p in self.drive("peers", 30)[0]["peers"]]


def serve_in(pair: NetnsPair, which: str, pyz: Path, home: NodeHome, *args: str) -> Proc:
    """Start `pangea.pyz -v serve` inside a namespace, listening on its veth address (port 0)."""
    cmd: list[str | Path] = [
        pyz,
        "-v",
        "serve",
        "--host",
        pair.addr(which),
        "--port",
        "0",
        "--rpc",
        "127.0.0.1:0",
        *args,
    ]
    return pair.proc(which, cmd, env=home.env, name=f"serve@{which}")


@contextlib.contextmanager
def connected_nodes(pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path, *args: str) -> Iterator[Nodes]:
    """B in namespace b trusting A; A in namespace a with --peer B; both with ``args``."""
    home_a, home_b = make_home("a"), make_home("b")
    a_id = peer_id_of(pyz, home_a)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with serve_in(pair, "b", pyz, home_b, "--allow-peer", a_id, *args) as b:
        b.wait_for_line(r"^pangea: serving on ", timeout=READY_TIMEOUT_S, stream="stdout")
        b_id = b.wait_for_line(r"serve node, peer ID (12D3KooW\w+)$", stream="stdout").group(1)
        b_addr = b.wait_for_line(rf"^  (/ip4/{re.escape(pair.addr_b)}/tcp/\d+/p2p/{b_id})$", stream="stdout").group(1)
        with serve_in(pair, "a", pyz, home_a, "--peer", b_addr, *args) as a:
            a.wait_for_line(r"^pangea: serving on ", timeout=READY_TIMEOUT_S, stream="stdout")
            rpc = a.wait_for_line(r"^RPC: (127\.0\.0\.1:\d+) \(", stream="stdout").group(1)
            a.wait_for_line(rf"^pangea: connected to peer {b_id}$", timeout=CONNECT_TIMEOUT_S, stream="stdout")
            yield Nodes(pair, pyz, a, b, home_a, a_id, b_id, rpc, driver)


def ns_cmd(pair: NetnsPair, which: str, cmd: Sequence[str]) -> None:
    """Run a setup command (iptables, tc) in a namespace; fail the test if it fails."""
    result = pair.run(which, cmd, timeout=30)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr.strip()}"


@contextlib.contextmanager
def ns_rule(pair: NetnsPair, which: str, add: Sequence[str], remove: Sequence[str]) -> Iterator[None]:
    """Add a firewall rule or qdisc in a namespace for the block; remove it after."""
    ns_cmd(pair, which, add)
    try:
        yield
    finally:
        pair.run(which, remove, timeout=30)


# ---------------------------------------------------------------- packet loss


@pytest.mark.slow
def test_remote_matmuls_under_3_percent_packet_loss_finish_or_fail_clearly(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path, record_property: Any
) -> None:
    task_timeout_s = 90.0
    with connected_nodes(netns_pair, pyz, make_home, tmp_path) as nodes:
        loss = ["INPUT", "-m", "statistic", "--mode", "random", "--probability", "0.03", "-j", "DROP"]
        with ns_rule(netns_pair, "b", ["iptables", "-A", *loss], ["iptables", "-D", *loss]):
            count = 3
            results = nodes.drive(
                "matmul", count * task_timeout_s, n=1024, count=count, placement=nodes.b_id, timeout=task_timeout_s
            )
            dropped = netns_pair.run("b", ["iptables", "-L", "INPUT", "-v", "-n", "-x"]).stdout
        assert nodes.a.returncode is None and nodes.b.returncode is None
    assert len(results) == count, results
    for r in results:
        assert r["seconds"] < task_timeout_s + 15, r  # within its deadline: no hang
        if r["ok"]:
            assert r["correct"], r
            assert r["task"]["ran_on"] in (nodes.b_id, "local"), r["task"]
        else:  # allowed, if it says what went wrong
            assert r["kind"] and r["error"] and "\n" not in r["error"] and "Traceback" not in r["error"], r
    on_b = sum(r["ok"] and r["task"]["ran_on"] == nodes.b_id for r in results)
    packets = re.search(r"^\s*(\d+)\s+\d+\s+DROP", dropped, re.MULTILINE)
    record_property("loss_tasks_on_b", on_b)
    print(
        f"\n3% loss on B's input: {on_b}/{count} ran on B, {sum(r['ok'] for r in results)}/{count} ok, "
        f"seconds {[round(r['seconds'], 2) for r in results]}, packets dropped {packets.group(1) if packets else '?'}"
    )


# ---------------------------------------------------------------- rate limit


def rate_limit(pair: NetnsPair, which: str, rate: str = "100mbit") -> contextlib.AbstractContextManager[None]:
    """A token bucket of ``rate`` on the egress of namespace ``which`` for the block."""
    iface, tbf = NetnsPair.IFACE, ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    return ns_rule(
        pair, which, ["tc", "qdisc", "add", "dev", iface, *tbf], ["tc", "qdisc", "del", "dev", iface, "root"]
    )


@pytest.mark.slow
def test_a_64_mib_transfer_through_a_100_mbit_link_completes(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path, record_property: Any
) -> None:
    mib, deadline_s = 64, 120.0
    with connected_nodes(netns_pair, pyz, make_home, tmp_path) as nodes:
        (free,) = nodes.drive("download", deadline_s, mib=mib, placement=nodes.b_id, timeout=deadline_s)
        with rate_limit(netns_pair, "b"):  # B's egress (the download direction, B -> A)
            start = time.monotonic()
            (shaped,) = nodes.drive("download", deadline_s, mib=mib, placement=nodes.b_id, timeout=deadline_s)
            elapsed = time.monotonic() - start
    for r in (free, shaped):
        assert r["ok"] and r["correct"], r
        assert r["task"]["ran_on"] == nodes.b_id, r["task"]
    assert elapsed < deadline_s + DRIVER_SLACK_S
    assert shaped["seconds"] < deadline_s, shaped
    # Not a timing assertion: nothing passes a 100 Mbit/s bucket faster than 12.5 MB/s
    # (with slack for the 256 KiB burst), so this only shows the qdisc was in the way.
    assert shaped["mb_s"] < 12.5 * 1.25, shaped
    record_property("veth_download_mb_s", round(free["mb_s"], 1))
    record_property("tbf_100mbit_download_mb_s", round(shaped["mb_s"], 1))
    print(
        f"\n{mib} MiB download B -> A: {free['mb_s']:.1f} MB/s unshaped, {shaped['mb_s']:.1f} MB/s through "
        f"tbf 100mbit ({shaped['seconds']:.1f} s)"
    )


@pytest.mark.slow
def test_through_a_100_mbit_link_a_compressible_array_crosses_packed_and_a_random_one_raw(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path, record_property: Any
) -> None:
    deadline_s = 120.0
    with connected_nodes(netns_pair, pyz, make_home, tmp_path) as nodes:
        with rate_limit(netns_pair, "a"):  # A's egress (A -> B, the operands' way)
            args = {"placement": nodes.b_id, "timeout": deadline_s}
            (warm,) = nodes.drive("upload", deadline_s, mib=8, kind="random", **args)  # measures the link
            (smooth,) = nodes.drive("upload", deadline_s, mib=32, kind="smooth", **args)
            (rand,) = nodes.drive("upload", deadline_s, mib=16, kind="random", **args)
    for r in (warm, smooth, rand):
        assert r["ok"] and r["correct"] and r["task"]["ran_on"] == nodes.b_id, r
    assert smooth["sent"] < smooth["nbytes"] / 2, smooth  # int32 in [0, 100): packed to well under half
    assert rand["sent"] >= rand["nbytes"], rand  # random float64 does not compress: sent as it is
    record_property("tbf_100mbit_smooth_32mib_s", round(smooth["seconds"], 2))
    record_property("tbf_100mbit_random_16mib_s", round(rand["seconds"], 2))
    print(
        f"\n100 Mbit/s upload: 32 MiB of small int32 in {smooth['seconds']:.2f} s ({smooth['sent'] / 2**20:.1f} MiB"
        f" on the wire); 16 MiB of random float64 in {rand['seconds']:.2f} s ({rand['sent'] / 2**20:.1f} MiB)"
    )


@pytest.mark.slow
def test_with_compression_off_the_same_array_crosses_raw_and_the_task_is_right(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    # --compression off: the Hello lists no codec, as an older pangea's: both sides send raw arrays
    with connected_nodes(netns_pair, pyz, make_home, tmp_path, "--compression", "off") as nodes:
        with rate_limit(netns_pair, "a"):
            args = {"placement": nodes.b_id, "timeout": 120.0}
            nodes.drive("upload", 120.0, mib=8, kind="random", **args)
            (smooth,) = nodes.drive("upload", 120.0, mib=16, kind="smooth", **args)
    assert smooth["ok"] and smooth["correct"] and smooth["task"]["ran_on"] == nodes.b_id, smooth
    assert smooth["sent"] >= smooth["nbytes"], smooth  # not packed


# ---------------------------------------------------------------- partition


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.5)


def redials(nodes: Nodes) -> int:
    """How often A has printed that it (re)connected to B."""
    return sum(line == f"pangea: connected to peer {nodes.b_id}" for line in list(nodes.a.stdout_lines))


def wait_until_dropped(nodes: Nodes) -> None:
    """A's health check drops B (nothing received for the idle timeout) and peers() stops listing it."""
    dropped = rf"^pangea: dropping peer {nodes.b_id}: nothing received for \d+ s \(peer gone or network down\)$"
    nodes.a.wait_for_line(dropped, timeout=IDLE_TIMEOUT_S + 30, stream="stderr")
    wait_for(lambda: nodes.b_id not in nodes.peer_ids(), 30, "B gone from A's peers()")


def assert_fell_back(during: dict[str, Any], b_id: str) -> None:
    """The task sent to B over the dead link failed there and then ran on A, correctly."""
    assert during["ok"] and during["correct"], during
    attempts = during["task"]["attempts"]
    assert attempts[0]["worker"] == b_id, attempts
    assert attempts[0]["outcome"].startswith(("disconnected", "unavailable", "timeout")), attempts
    assert during["task"]["ran_on"] == "local" and attempts[-1] == {"worker": "local", "outcome": "ok"}, attempts
    assert during["seconds"] < 60, during  # the idle timeout plus a heartbeat, not the task's deadline


def heal_and_wait_for_redial(nodes: Nodes, redials_before: int) -> float:
    """Bring the link back up; return the seconds until A printed `connected to peer` B again."""
    nodes.pair.set_link(True)
    restored = time.monotonic()
    wait_for(lambda: redials(nodes) > redials_before, REDIAL_TIMEOUT_S, "A redialed B after the link came back")
    return time.monotonic() - restored


@pytest.mark.slow
def test_a_partition_drops_the_peer_and_its_task_falls_back_to_a(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    idle = ["--idle-timeout", str(IDLE_TIMEOUT_S)]
    with connected_nodes(netns_pair, pyz, make_home, tmp_path, *idle) as nodes:
        (before,) = nodes.drive("matmul", 60, n=256, placement=nodes.b_id, timeout=60)
        assert before["ok"] and before["correct"] and before["task"]["ran_on"] == nodes.b_id, before
        netns_pair.set_link(False)
        try:
            # Sent to B over the dead link: it fails when B is dropped, then runs on A.
            (during,) = nodes.drive("matmul", 90, n=256, placement=nodes.b_id, timeout=90, seed=1)
            wait_until_dropped(nodes)
        finally:
            netns_pair.set_link(True)
    assert_fell_back(during, nodes.b_id)
    print(f"\npartition: the task on B fell back to A after {during['seconds']:.1f} s")


@pytest.mark.slow
def test_a_quiet_partition_heals_and_a_redials_the_peer(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    idle = ["--idle-timeout", str(IDLE_TIMEOUT_S)]
    with connected_nodes(netns_pair, pyz, make_home, tmp_path, *idle) as nodes:
        netns_pair.set_link(False)
        cut = time.monotonic()
        try:
            wait_until_dropped(nodes)
            time.sleep(max(0.0, IDLE_TIMEOUT_S + 2 - (time.monotonic() - cut)))  # down well past the idle timeout
            down_s = time.monotonic() - cut
            redial_s = heal_and_wait_for_redial(nodes, redials(nodes))
        finally:
            netns_pair.set_link(True)
        (after,) = nodes.drive("matmul", 60, n=256, placement=nodes.b_id, timeout=60, seed=2)
        assert nodes.b_id in nodes.peer_ids()
    assert after["ok"] and after["correct"] and after["task"]["ran_on"] == nodes.b_id, after
    print(f"\nquiet partition of {down_s:.1f} s: A redialed B {redial_s:.1f} s after the link came back")


@pytest.mark.slow
def test_a_partition_with_a_task_in_flight_heals_and_a_redials_the_peer(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    idle = ["--idle-timeout", str(IDLE_TIMEOUT_S)]
    with connected_nodes(netns_pair, pyz, make_home, tmp_path, *idle) as nodes:
        netns_pair.set_link(False)
        try:
            (during,) = nodes.drive("matmul", 90, n=256, placement=nodes.b_id, timeout=90, seed=1)
            wait_until_dropped(nodes)
            heal_and_wait_for_redial(nodes, redials(nodes))
        finally:
            netns_pair.set_link(True)
        (after,) = nodes.drive("matmul", 60, n=256, placement=nodes.b_id, timeout=60, seed=2)
    assert_fell_back(during, nodes.b_id)
    assert after["ok"] and after["correct"] and after["task"]["ran_on"] == nodes.b_id, after

"""`pangea.pyz bench`: the benchmark command of the built pyz, on 127.0.0.1.

Correctness only, never a figure: every metric is measured (a positive
number next to a positive baseline), every pangea bulk transfer arrived intact
(the peer's sum of what was uploaded, the sha256 of what was downloaded), the
spawned loopback peer is gone afterwards, `bench --listen` pairs with one
benchmarker through its join string and refuses a wrong code with one line,
its baseline stream serves only the paired peer and its raw TCP port only
the holder of the token, and against a `serve` node the baselines are
skipped with the reason. The verb's module (pangea_bench, packed into the pyz)
is imported by `bench` only, never by `--help` or another verb.
"""

from __future__ import annotations

import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

import pytest
from helpers import NodeHome, Proc
from pyz_helpers import PAIR_TIMEOUT_S, assert_expected_error, last_json, peer_id_of, run_pyz, session_dirs, start_serve

import pangea
import pangea_bench

QUICK = ["--quick", "--json"]
METRICS = [
    "bulk_upload_4",
    "bulk_upload_4_vs_tcp",
    "bulk_download_4",
    "bulk_download_4_vs_tcp",
    "task_p50",
    "tasks_per_s",
    "tasks_per_s_inflight",
    "matmul_overhead",
]
JOIN_LINE = r"^Join string: (pangea://\S+)$"
LISTEN_READY = r"^Waiting up to \d+ s for a benchmarker"


def start_listener(pyz: Path, home: NodeHome, *args: str) -> Proc:
    """Start `bench --listen` on 127.0.0.1, port 0, and wait for its ready line."""
    cmd = [str(pyz), "bench", "--listen", "--host", "127.0.0.1", "--port", "0", "--timeout", "90", *args]
    proc = Proc(cmd, env=home.env, name="bench listener")
    try:
        proc.wait_for_line(LISTEN_READY, stream="stdout", timeout=PAIR_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return proc


def join_of(listener: Proc) -> str:
    return listener.wait_for_line(JOIN_LINE, stream="stdout").group(1)


def assert_full_run(doc: dict[str, Any]) -> None:
    """Every metric measured against its baseline, and every bulk transfer verified."""
    assert doc["ok"] is True and doc["skipped"] == {}, doc["skipped"]
    assert list(doc["metrics"]) == METRICS
    for key, metric in doc["metrics"].items():
        for field in ("pangea", "baseline", "ratio"):
            assert isinstance(metric[field], float) and metric[field] > 0, (key, metric)
        assert metric["met"] in (True, False, None) and metric["target"], (key, metric)
    verified = {(v["direction"], v["mib"], v["check"]) for v in doc["verified"]["bulk"]}
    assert verified == {("upload", 4, "sum"), ("download", 4, "sha256")}
    assert doc["connection"]["security"].startswith("/noise")
    samples = doc["samples"]
    assert samples["tasks"]["ran_on_peer"] == 2 * 100  # sequential and in flight, none fell back to local
    assert len(samples["matmul"]["pangea"]) == 1 and samples["matmul"]["n"] == 256
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["python"].count(".") == 2
    assert doc["peer_machine"]["cores"] >= 1


def test_bench_spawns_a_loopback_peer_measures_every_metric_and_verifies_the_transfers(
    pyz: Path, pangea_home: NodeHome
) -> None:
    run = run_pyz(pyz, ["bench", *QUICK], pangea_home.env, timeout=PAIR_TIMEOUT_S * 2)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert len(run.stdout.splitlines()) == 1, run.stdout  # --json: the object and nothing else
    doc = last_json(run.stdout.splitlines())
    assert_full_run(doc)
    assert doc["peer_role"] == "bench-listener" and doc["address"].startswith("/ip4/127.0.0.1/")
    assert not pangea.pid_alive(doc["spawned_pid"]), "the loopback peer outlived the run"
    assert session_dirs(pangea_home) == []  # neither side left a session directory behind


def test_bench_prints_an_aligned_table_without_json(pyz: Path, pangea_home: NodeHome) -> None:
    run = run_pyz(pyz, ["bench", "--quick"], {**pangea_home.env, "COLUMNS": "200"}, timeout=PAIR_TIMEOUT_S * 2)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    lines = run.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    assert lines[head].split() == ["metric", "pangea", "baseline", "ratio", "target", "met"]
    body = lines[head + 2 : head + 2 + len(METRICS)]
    assert [re.split(r"\s{2,}", line.strip())[0] for line in body] == [
        "bulk upload 4 MiB",
        "vs raw TCP",
        "bulk download 4 MiB",
        "vs raw TCP",
        "tiny task p50",
        "tasks/s sequential",
        "tasks/s 8 in flight",
        "matmul 256x256 overhead",
    ]
    met_column = lines[head].index(" met") + 1
    assert all(line[met_column:].strip() in ("yes", "no", "-") for line in body), body
    assert any(line.startswith("Verified: 1 upload(s) by their sum, 1 download(s) by sha256") for line in lines)
    assert run.stderr == "", run.stderr


def test_bench_listen_and_bench_join_as_two_processes(pyz: Path, make_home: Any) -> None:
    listener_home, client_home = make_home("listener"), make_home("client")
    with start_listener(pyz, listener_home) as listener:
        assert re.search(r"^Raw TCP baseline: port \d+$", "\n".join(listener.stdout_lines), re.M), listener.output()
        run = run_pyz(pyz, ["bench", join_of(listener), *QUICK], client_home.env, timeout=PAIR_TIMEOUT_S * 2)
        assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}\n{listener.output()}"
        doc = last_json(run.stdout.splitlines())
        assert_full_run(doc)
        assert doc["spawned_pid"] is None and doc["peer_role"] == "bench-listener"
        assert listener.wait(timeout=30) == 0  # it leaves by itself once the benchmarker says bye
        listener.wait_for_line(r"^Benchmarker finished: \d+ task\(s\) served", stream="stdout")
        assert session_dirs(listener_home) == []
    moved = listener_traffic(listener.stdout_lines)
    mib = 1 << 20
    # --quick moves 4 MiB each way over pangea (on its data plane) and over each baseline
    assert moved["pangea_in"] >= 4 * mib and moved["pangea_out"] >= 4 * mib, moved
    assert moved["pangea_in"] - moved["stream_in"] >= 4 * mib, moved  # the data plane's share is counted
    assert moved["baselines_in"] >= 8 * mib and moved["baselines_out"] >= 8 * mib, moved


def parse_bytes(text: str) -> float:
    """``4.1 MiB`` (as format_bytes prints it) in bytes."""
    number, unit = text.split()
    return float(number) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(unit)


def listener_traffic(stdout_lines: list[str]) -> dict[str, float]:
    """The bytes the listener's last line reports (it may wrap at the width: joined first)."""
    text = " ".join(" ".join(stdout_lines).split())
    size = r"(\d+(?:\.\d)? (?:B|KiB|MiB|GiB))"
    found = re.search(
        rf"pangea session {size} in, {size} out \(of which libp2p stream {size} in, {size} out, the rest on the "
        rf"data plane\); baselines {size} in, {size} out\.",
        text,
    )
    assert found, text
    keys = ("pangea_in", "pangea_out", "stream_in", "stream_out", "baselines_in", "baselines_out")
    return {key: parse_bytes(found.group(i + 1)) for i, key in enumerate(keys)}


def test_bench_with_a_wrong_code_is_refused_with_one_line(pyz: Path, make_home: Any) -> None:
    listener_home, client_home = make_home("listener"), make_home("client")
    with start_listener(pyz, listener_home) as listener:
        multiaddr = "/" + join_of(listener).removeprefix("pangea://").split("#")[0]
        run = run_pyz(pyz, ["bench", multiaddr, "--code", "ABCD-EFGH-JKMN", *QUICK], client_home.env)
        assert run.returncode == 2, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        assert_expected_error(run.stderr, "refused", "wrong pairing code")
        assert run.stdout == ""
        assert listener.returncode is None  # still waiting for the right benchmarker
        listener.wait_for_line(r"refused bench 12D3KooW\w+ .*wrong pairing code", stream="stderr")


def test_bench_listener_serves_its_baselines_only_to_the_paired_peer(pyz: Path, pangea_home: NodeHome) -> None:
    """A peer that did not pair gets its bench stream reset; a raw TCP connection without
    the token gets nothing."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.host.exceptions import StreamFailure
    from libp2p.network.stream.exceptions import StreamError
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    with start_listener(pyz, pangea_home) as listener:
        address = pangea.parse_peer_address(join_of(listener))
        tcp_port = int(listener.wait_for_line(r"^Raw TCP baseline: port (\d+)$", stream="stdout").group(1))

        async def unpaired_stream() -> bytes:
            host = pangea.make_host(create_new_key_pair())
            async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with trio.fail_after(30):
                    await host.connect(info_from_p2p_addr(Multiaddr(address.text)))
                    # NOTE: the listener's reset can overtake the end of the protocol
                    # negotiation, so it shows up in new_stream or in the read.
                    try:
                        stream = await host.new_stream(
                            ID.from_base58(address.peer_id), [TProtocol(pangea_bench.BENCH_PROTOCOL_ID)]
                        )
                        await stream.write(pangea_bench.BENCH_COMMAND.pack(b"T", 0))
                        return bytes(await stream.read(pangea_bench.BENCH_TCP_OFFER.size))
                    except (StreamError, StreamFailure):
                        return b""

        assert trio.run(unpaired_stream) == b""  # no raw TCP port and token for a stranger
        listener.wait_for_line(r"refusing a bench stream from 12D3KooW\w+: not the paired benchmarker", stream="stderr")

        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as conn:
            conn.sendall(os.urandom(16) + pangea_bench.BENCH_COMMAND.pack(b"D", 1 << 20))
            conn.settimeout(20)
            assert conn.recv(1) == b""  # closed without sending a byte
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as conn:
            conn.sendall(b"x")  # too short to be a token, then silence: dropped after a few seconds
            conn.settimeout(30)
            assert conn.recv(1) == b""
        assert listener.returncode is None


def test_bench_against_a_serve_node_measures_pangea_and_says_why_the_baselines_are_skipped(
    pyz: Path, make_home: Any
) -> None:
    worker_home, client_home = make_home("worker"), make_home("client")
    client_id = peer_id_of(pyz, client_home)
    node = start_serve(pyz, worker_home, "--allow-peer", client_id, "--metrics", "off", name="serve")
    with node.proc:
        run = run_pyz(pyz, ["bench", node.address, *QUICK], client_home.env, timeout=PAIR_TIMEOUT_S * 2)
        assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        doc = last_json(run.stdout.splitlines())
        assert doc["peer_role"] == "serve"
        assert set(doc["skipped"]) == {"libp2p", "tcp"}
        assert "serve" in doc["skipped"]["libp2p"] and pangea_bench.BENCH_PROTOCOL_ID in doc["skipped"]["libp2p"]
        metrics = doc["metrics"]
        assert set(metrics) == {m for m in METRICS if not m.endswith("_vs_tcp")}
        for key, metric in metrics.items():
            assert isinstance(metric["pangea"], float) and metric["pangea"] > 0, (key, metric)
            assert metric["baseline"] is None and metric["ratio"] is None, (key, metric)
        assert len(doc["verified"]["bulk"]) == 2
        assert node.proc.returncode is None  # the serve node keeps running


@pytest.mark.parametrize("argv", [["bench", "--listen", "--port", "70000"], ["bench", "--listen", "--tcp-port", "-1"]])
def test_bench_listen_refuses_bad_ports_with_one_line(pyz: Path, pangea_home: NodeHome, argv: list[str]) -> None:
    run = run_pyz(pyz, argv, pangea_home.env)
    assert run.returncode == 2
    assert_expected_error(run.stderr, "a whole number in 0-65535")


def test_bench_against_a_serve_node_of_its_own_home_runs_on_a_throwaway_identity(pyz: Path, make_home: Any) -> None:
    home = make_home("one-home")
    node = start_serve(pyz, home, "--metrics", "off", name="serve")  # trusts nobody: the home's key vouches
    with node.proc:
        run = run_pyz(pyz, ["bench", node.address, *QUICK], home.env, timeout=PAIR_TIMEOUT_S * 2)
        assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        doc = last_json(run.stdout.splitlines())
        assert doc["peer"] == node.peer_id and doc["peer_role"] == "serve", doc
        assert all(m["pangea"] > 0 for m in doc["metrics"].values()), doc["metrics"]
        assert "identity.key" not in run.stderr and "copied" not in run.stderr, run.stderr
        assert f"runs from the pangea home of {node.peer_id} (signed)" in node.session_log()
        assert node.proc.returncode is None


def test_bench_from_a_home_whose_serve_is_connected_still_works_against_the_trusting_peer(
    pyz: Path, make_home: Any
) -> None:
    worker_home, client_home = make_home("worker"), make_home("client")
    client_id = peer_id_of(pyz, client_home)
    worker = start_serve(pyz, worker_home, "--allow-peer", client_id, "--metrics", "off", name="worker")
    with worker.proc:
        # The client's home runs a serve node with a session to the worker, under the home's peer id.
        client = start_serve(pyz, client_home, "--peer", worker.address, "--metrics", "off", name="client-serve")
        with client.proc:
            client.proc.wait_for_line(rf"^pangea: connected to peer {worker.peer_id}$", stream="stdout")
            run = run_pyz(pyz, ["bench", worker.address, "--quick"], client_home.env, timeout=PAIR_TIMEOUT_S * 2)
            assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
            assert f"this home's identity is in use by serve (pid {client.proc.pid})" in run.stdout, run.stdout
            assert "throwaway identity" in run.stdout
            # The worker took the bench because the client's home vouched for it; its serve node stays connected.
            assert f"runs from the pangea home of {client_id} (signed)" in worker.session_log(), worker.proc.output()
            assert not any("refused" in line for line in worker.proc.stderr_lines), worker.proc.output()
            assert client.proc.returncode is None and worker.proc.returncode is None


def imported_modules(pyz: Path, home: NodeHome, argv: list[str]) -> tuple[int, set[str]]:
    """Run the pyz with PYTHONPROFILEIMPORTTIME (as -X importtime); its exit code and the modules it imported."""
    run = run_pyz(pyz, argv, {**home.env, "PYTHONPROFILEIMPORTTIME": "1"})
    lines = [line for line in run.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    return run.returncode, {line.rsplit("|", 1)[1].strip() for line in lines}


@pytest.mark.parametrize("argv", [["--help"], ["id"], ["bench", "--help"]])
def test_help_and_other_verbs_do_not_import_the_bench_module(pyz: Path, pangea_home: NodeHome, argv: list[str]) -> None:
    code, names = imported_modules(pyz, pangea_home, argv)
    assert code == 0
    assert {"argparse", "_bootstrap"} <= names, sorted(names)  # the log is what we think it is
    assert "pangea_bench" not in names


def test_bench_imports_the_bench_module_it_ships(pyz: Path, pangea_home: NodeHome) -> None:
    code, names = imported_modules(pyz, pangea_home, ["bench", "--code", "ABCD-EFGH-JKMN"])
    assert code == 2  # its usage error comes from pangea_bench.cmd_bench
    assert "pangea_bench" in names
    root = Path(__file__).resolve().parents[2]
    with zipfile.ZipFile(pyz) as archive:
        shipped = archive.read("site-packages/pangea_bench.py")
    if pyz.resolve() == (root / "pangea.pyz").resolve():
        assert shipped == (root / "bench" / "pangea_bench.py").read_bytes()

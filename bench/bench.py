#!/usr/bin/env python3
"""Benchmark harness for pangea: its figures side by side with baselines measured in the same run.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/bench.py                    # full run, a few minutes
    .build/venv/bin/python bench/bench.py --quick            # smaller sizes, about a minute
    .build/venv/bin/python bench/bench.py --json out.json    # also write every number as JSON
    .build/venv/bin/python bench/bench.py --only bulk,tasks  # some phases: tcp bulk tasks matmul rss start
    SHIV_INTERPRETER=1 ./pangea.pyz bench/bench.py --quick   # the pangea and libraries inside the pyz

Other options: --pyz PATH (the pyz whose start-up is timed, default <repo>/pangea.pyz),
--bulk-mib 64,1024, --rss-mib 1024, --tasks N, --inflight N, --matmul-n N, --reps N,
--start-reps N, --wait-quiet SECONDS (first wait, at most that long, until other programs
have left the CPUs idle for 10 s; in any case each phase records the cores others used
meanwhile, and the run warns when that disturbed it: on a shared 2-core box it halves
every figure), --no-baseline and --directions upload|download (to profile one transfer:
``py-spy record --subprocesses -f raw -o out.txt -- .build/venv/bin/python bench/bench.py
--only bulk --no-baseline --directions upload --bulk-mib 1024``). Run with --help for all.

What runs. Every measurement that needs two nodes uses two processes: this one and a
peer, the same script started again with the hidden ``--role peer``. The peer runs,
at once, a raw TCP server, a plain py-libp2p host (Noise + Yamux, built with
libp2p's own calls as in the tech notes, so pangea changing its ``make_host``
does not move the baseline) and a pangea ``Node`` that serves every task. This
process dials all three, and the baseline and pangea measurements of each size
alternate, so drift of the machine hits both alike.

- tcp:    raw TCP on 127.0.0.1, bulk MB/s each way (the ceiling of this machine).
- bulk:   MB/s each way per size. Baseline: a plain libp2p stream, 1 MiB writes,
          ``read(1 MiB)`` loop into a full-size ``bytearray`` (made in the timed part,
          as pangea's receiver makes its buffer when the frame arrives). pangea: ``PeerSession.request``
          of ``sum`` (upload) and ``random`` (download), minus the worker's compute time.
- tasks:  round trip p50 and tasks/s. Baseline: 64-byte echo on an already open libp2p
          stream (sequential; --inflight streams at once). pangea: a tiny ``add`` task
          through ``Manager.run`` (the user path: scheduler, verification), and through
          ``PeerSession.request`` alone.
- matmul: NxN float64 matmul delegated with ``Manager.run``: wall time minus the
          worker's compute time. Baseline: the time a plain libp2p stream needs for the
          same bytes (2 operands up, 1 result down) at the bulk rates measured above.
- rss:    a fresh peer and a fresh client process transfer one operand (``sum`` up, and
          ``random`` down in another fresh pair); the peak RSS (VmHWM) of each process
          over the operand size. --quick uses 256 MiB instead of 1 GiB.
- start:  ``pangea.pyz --help`` warm (baseline: the same pyz running an empty script),
          and from launching ``respond`` to the first task it served (``respond -v``
          logs ``task N from <peer>: <kernel> done``; baseline: the pyz importing
          numpy, trio, libp2p and capnp and nothing else). Both are timed again with the
          interpreter the pyz's first lines pick, run directly (``python pangea.pyz``): the
          difference is what that sh head costs (a python3 on PATH that is a wrapper, such as
          a pyenv shim, cost 60-100 ms when the head was ``#!/usr/bin/env python3``).

The table has, per metric: pangea, baseline, ratio (pangea / baseline), the
target pangea sets itself and whether it is met. With --json every sample, the machine
(cores, Python, numpy and its BLAS threads, OPENBLAS_CORETYPE) and the
configuration are written too.

- link:   (root only; skipped otherwise) bench/link.py: two network namespaces
          joined by a veth with a 1 Gbit/s tbf limit each way; pangea's bulk MB/s
          across it against the link rate (target: 90%) and raw TCP on the same link.

Only 127.0.0.1 is used (and, for link, addresses inside the namespaces it
makes). Every wait has a timeout, every loop a bound, and every process this
script starts is stopped in a ``finally`` (the peers also exit on their own
when this process goes away: they watch their stdin).

Between two boxes, with only the pyz: ``./pangea.pyz bench`` runs the tcp, bulk, tasks
and matmul measurements against ``bench --listen`` on the other box. Both are one
benchmark system: the verb's code is bench/pangea_bench.py (the module ``pangea_bench``
in the pyz), and this script builds on it: its targets, rows and table, quantiles and
summaries, machine info and the TCP and libp2p transfer loops are pangea_bench's. What
stays here is the harness's own: its baseline host is built with libp2p's own calls in a
peer process of its own that serves anyone (the verb's baselines run on the paired
pangea connection, for the paired peer only), and the rss, start and link phases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent
MIB = 1 << 20

# The baseline protocol of this script's peer: pangea_bench's BENCH_COMMAND (U upload, D download,
# E echo, one command per stream or connection; an upload is acknowledged with b"k"), for anyone.
BENCH_PROTOCOL = "/pangea-bench/raw/1.0.0"
PHASES = ("tcp", "bulk", "tasks", "matmul", "rss", "start", "link")
READY_S = 60.0  # a peer or node must print its ready line within this
# A bulk transfer must go faster than this, or it fails with a timeout instead of hanging.
MIN_RATE_BYTES_S = 10e6

# The first completed task in `respond -v`'s log: "pangea: task 1 from 12D3...: add done in 0.001 s".
FIRST_TASK = re.compile(r"task \d+ from \S+: \w+ done in")
SESSION_UP = re.compile(r"^Connected to initiator ")


def bulk_timeout_s(nbytes: int) -> float:
    """Return the time allowed for one transfer of ``nbytes`` (or one task carrying them)."""
    return 60.0 + nbytes / MIN_RATE_BYTES_S


SNAPSHOT_ENV = "PANGEA_BENCH_SNAPSHOT"  # a copy of pangea.py that every process of one run imports


def import_pangea() -> Any:
    """Import pangea: this run's snapshot, else the one on sys.path (the pyz's), else the work tree's."""
    snapshot = os.environ.get(SNAPSHOT_ENV)
    if snapshot and snapshot not in sys.path:
        sys.path.insert(0, snapshot)
    try:
        import pangea
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import pangea
    return pangea


# pangea_bench imports pangea: this run's snapshot, else the pyz's, else the work tree's (see
# import_pangea). It comes from beside this script, or from the pyz when run inside one.
import_pangea()
from pangea_bench import (  # noqa: E402
    BENCH_COMMAND,
    BENCH_ECHO_BYTES,
    BULK_TARGET,
    INFO_TARGET,
    LATENCY_TARGET,
    OVERHEAD_TARGET,
    RATE_TARGET,
    BenchRow,
    BenchTarget,
    _dig,
    _size_text,
    bench_machine_info,
    bench_row,
    format_bench_table,
    latency_summary,
    rate_summary,
    recv_into_all,
    send_all,
    send_filler,
    stream_read_exactly,
    stream_read_into,
    stream_send_filler,
    stream_write_all,
)


def snapshot_pangea(directory: Path) -> None:
    """Copy the work tree's pangea.py and schema into ``directory`` and make this process and
    its children import that copy: the work tree may change during a run of several minutes.

    Inside the pyz (SHIV_INTERPRETER) the pyz's own pangea is already fixed, so nothing is done."""
    source, schema = REPO_ROOT / "pangea.py", REPO_ROOT / "capnp" / "pangea.capnp"
    if os.environ.get("SHIV_INTERPRETER") or not source.is_file() or not schema.is_file():
        return
    shutil.copy2(source, directory / "pangea.py")
    shutil.copy2(schema, directory / "pangea.capnp")  # schema_path() looks beside pangea.py first
    os.environ[SNAPSHOT_ENV] = str(directory)


def pangea_fingerprint(pangea: Any) -> str:
    """Return a short hash of the pangea.py a process imported (the work tree may change mid-run)."""
    import hashlib

    return hashlib.sha256(Path(pangea.__file__).read_bytes()).hexdigest()[:12]


def vm_status(pid: int | str = "self") -> dict[str, float]:
    """Return the Vm* lines of /proc/PID/status in MiB (VmRSS, VmHWM = peak RSS, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm") and line.rstrip().endswith("kB"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return out


def _proc_cpu_s(pid: int) -> float:
    """Return the CPU seconds (user + system) of a live (or zombie) process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_snapshot() -> tuple[float, float, float]:
    """Return (monotonic time, CPU seconds the machine was busy, CPU seconds of this bench).

    The bench's own share is this process, its reaped children (getrusage) and
    its live children (/proc), so busy minus own is what other programs used."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    own += sum(_proc_cpu_s(child.pid) for child in Child.live)
    return time.monotonic(), busy, own


def foreign_load(since: tuple[float, float, float]) -> dict[str, float]:
    """Return the wall time since a snapshot and the cores other programs used meanwhile."""
    now = cpu_snapshot()
    wall = max(now[0] - since[0], 1e-9)
    return {"wall_s": wall, "foreign_cores": max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / wall}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.15, quiet_s: float = 10.0) -> float:
    """Wait (up to max_wait_s) until other programs used less than threshold_cores for quiet_s
    in a row; return the load of the last 2-second window."""
    deadline = time.monotonic() + max_wait_s
    quiet_since = time.monotonic()
    while True:
        snap = cpu_snapshot()
        time.sleep(2.0)
        load = foreign_load(snap)["foreign_cores"]
        if load >= threshold_cores:
            quiet_since = time.monotonic()
            print(f"bench: waiting for a quiet machine: others use {load:.2f} cores", file=sys.stderr, flush=True)
        if time.monotonic() - quiet_since >= quiet_s or time.monotonic() >= deadline:
            return load


###############################################################################
# Raw TCP: plain blocking sockets, the same framing as the libp2p baseline
###############################################################################


def tcp_serve(server: socket.socket) -> None:
    """Peer side of the raw TCP baseline: one command per connection (runs on a thread)."""
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(bulk_timeout_s(1 << 31))
            header = bytearray(BENCH_COMMAND.size)
            recv_into_all(conn, memoryview(header))
            op, nbytes = BENCH_COMMAND.unpack(header)
            if op == b"U":
                recv_into_all(conn, memoryview(bytearray(nbytes)))
                conn.sendall(b"k")
            elif op == b"D":
                send_filler(conn, nbytes)


def tcp_transfer(port: int, direction: str, data: memoryview, host: str = "127.0.0.1") -> float:
    """Move ``data`` (its size, for a download) over raw TCP; return the seconds it took."""
    nbytes = len(data)
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.settimeout(bulk_timeout_s(nbytes))
        start = time.perf_counter()
        if direction == "upload":
            conn.sendall(BENCH_COMMAND.pack(b"U", nbytes))
            send_all(conn, data)
            recv_into_all(conn, memoryview(bytearray(1)))
        else:
            # NOTE: the receive buffer is made inside the timed part, in both directions and
            # for every system: a real transfer needs it, and first touches of fresh memory
            # are slow on some VMs (about 1 s per GiB here).
            conn.sendall(BENCH_COMMAND.pack(b"D", nbytes))
            recv_into_all(conn, memoryview(bytearray(nbytes)))
        return time.perf_counter() - start


###############################################################################
# Plain py-libp2p: the host of the tech notes and the baseline stream protocol
###############################################################################


def plain_host() -> Any:
    """Return a py-libp2p host with a new identity: TCP, Noise only, Yamux only (tech notes 1)."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    key_pair = create_new_key_pair()
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: Noise(key_pair, noise_privkey=new_x25519().private_key)},
        muxer_opt={YAMUX_ID: Yamux},  # type: ignore[dict-item]
    )


async def baseline_handler(stream: Any) -> None:
    """Peer side of the libp2p baseline: upload, download or echo, one command per stream.

    NOTE: an exception escaping a stream handler kills the whole py-libp2p
    host (tech notes), so everything is caught and the stream reset."""
    from libp2p.network.stream.exceptions import StreamEOF

    try:
        op, nbytes = BENCH_COMMAND.unpack(await stream_read_exactly(stream, BENCH_COMMAND.size))
        if op == b"U":
            await stream_read_into(stream, memoryview(bytearray(nbytes)))
            await stream.write(b"k")
        elif op == b"D":
            await stream_send_filler(stream, nbytes)
        elif op == b"E":
            for _ in range(10_000_000):  # bounded; ends at the client's EOF long before
                msg = await stream_read_exactly(stream, nbytes)
                await stream.write(bytes(msg))
        await stream.close()
    except StreamEOF:
        with contextlib.suppress(Exception):
            await stream.close()
    except Exception as exc:  # noqa: BLE001  NOTE: see the docstring
        print(f"bench peer: baseline stream failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await stream.reset()


async def open_bench_stream(host: Any, peer_id: Any) -> Any:
    """Open a new baseline stream to the peer."""
    from libp2p.custom_types import TProtocol

    return await host.new_stream(peer_id, [TProtocol(BENCH_PROTOCOL)])


async def libp2p_transfer(host: Any, peer_id: Any, direction: str, data: memoryview) -> float:
    """Move ``data`` (its size, for a download) on a fresh baseline stream; return the seconds."""
    import trio

    nbytes = len(data)
    stream = await open_bench_stream(host, peer_id)
    with trio.fail_after(bulk_timeout_s(nbytes)):
        start = time.perf_counter()
        if direction == "upload":
            await stream.write(BENCH_COMMAND.pack(b"U", nbytes))
            await stream_write_all(stream, data)
            await stream_read_exactly(stream, 1)
        else:  # the receive buffer is made in the timed part (see tcp_transfer)
            await stream.write(BENCH_COMMAND.pack(b"D", nbytes))
            await stream_read_into(stream, memoryview(bytearray(nbytes)))
        seconds = time.perf_counter() - start
    with contextlib.suppress(Exception):
        await stream.close()
    return seconds


async def libp2p_echo(host: Any, peer_id: Any, count: int, warmup: int) -> list[float]:
    """Return ``count`` round-trip times of a 64-byte echo on one already open stream."""
    stream = await open_bench_stream(host, peer_id)
    await stream.write(BENCH_COMMAND.pack(b"E", BENCH_ECHO_BYTES))
    msg = b"p" * BENCH_ECHO_BYTES
    samples = []
    for i in range(warmup + count):
        start = time.perf_counter()
        await stream.write(msg)
        await stream_read_exactly(stream, BENCH_ECHO_BYTES)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    with contextlib.suppress(Exception):
        await stream.close()
    return samples


###############################################################################
# The peer process (--role peer): raw TCP server, plain libp2p host, pangea node
###############################################################################


def exit_when_stdin_closes() -> None:
    """Exit this process at once when the parent closes our stdin (or dies)."""

    def watch() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def pangea_node(pangea: Any, role: str, *, serve: bool) -> Any:
    """Return a pangea Node with a new identity that serves every peer (or nobody)."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    return pangea.Node(
        key_pair=create_new_key_pair(),
        role=role,
        accept=(lambda peer_id, hello: None) if serve else (lambda peer_id, hello: "a bench client takes no sessions"),
        may_serve=lambda peer_id: serve,
        limits=pangea.Limits(),
    )


def peer_main() -> int:
    """Run the peer until stdin closes; print one JSON ready line with its addresses."""
    import trio

    exit_when_stdin_closes()
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=tcp_serve, args=(server,), name="tcp-serve", daemon=True).start()

    async def run() -> None:
        from libp2p.custom_types import TProtocol
        from multiaddr import Multiaddr

        pangea = import_pangea()
        host = plain_host()
        node = pangea_node(pangea, "bench-worker", serve=True)
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(TProtocol(BENCH_PROTOCOL), baseline_handler)
            async with node.running("127.0.0.1", 0):
                ready = {
                    "pid": os.getpid(),
                    "tcp_port": server.getsockname()[1],
                    "libp2p": f"{host.get_transport_addrs()[0]}/p2p/{host.get_id()}",
                    "pangea": node.addresses[0],
                    "rss_mib": vm_status()["VmRSS"],
                    "pangea_sha": pangea_fingerprint(pangea),
                }
                print(json.dumps(ready), flush=True)
                await trio.sleep_forever()

    trio.run(run)
    return 0


###############################################################################
# Child processes
###############################################################################


class Child:
    """A child process whose output lines are collected, with their arrival times, by threads."""

    live: list[Child] = []  # started and not yet reaped (their CPU time is read from /proc)

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, name: str = "") -> None:
        self.name = name or Path(cmd[0]).name
        self.lines: dict[str, list[tuple[float, str]]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self.started_at = time.perf_counter()
        self.popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,  # a Ctrl-C of the bench is not also delivered to the child
        )
        self.pid = self.popen.pid
        Child.live.append(self)
        for stream_name in ("stdout", "stderr"):
            pipe = getattr(self.popen, stream_name)
            threading.Thread(target=self._pump, args=(pipe, stream_name), daemon=True).start()

    def _pump(self, pipe: Any, stream_name: str) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in pipe:
                with self._changed:
                    self.lines[stream_name].append((time.perf_counter(), line.rstrip("\n")))
                    self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], stream_name: str, timeout_s: float) -> tuple[float, str]:
        """Return (arrival time, line) of the first line matching ``pattern``; RuntimeError on timeout or exit."""
        deadline = time.perf_counter() + timeout_s
        with self._changed:
            while True:
                for at, line in self.lines[stream_name]:
                    if pattern.search(line):
                        return at, line
                left = deadline - time.perf_counter()
                if left <= 0 or self.popen.poll() is not None:
                    why = "timed out" if left <= 0 else f"exited with {self.popen.returncode}"
                    raise RuntimeError(f"{self.name} {why} before printing /{pattern.pattern}/:\n{self.output()}")
                self._changed.wait(min(left, 0.2))

    def output(self, last: int = 30) -> str:
        """Return the last lines of both streams, for error messages."""
        with self._changed:
            out = [f"  {s}: {line}" for s in ("stdout", "stderr") for _, line in self.lines[s][-last:]]
        return "\n".join(out)

    def stop(self, grace_s: float = 5.0) -> int | None:
        """Close stdin, then SIGTERM, then SIGKILL, each after a grace period; return the exit code."""
        with contextlib.suppress(OSError):
            if self.popen.stdin:
                self.popen.stdin.close()
        for step in (None, self.popen.terminate, self.popen.kill):
            if step is not None and self.popen.poll() is None:
                step()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace_s if step is not self.popen.kill else 10)
                break
        code = self.popen.poll()
        if code is not None and self in Child.live:
            Child.live.remove(self)
        return code


def self_command(args: argparse.Namespace) -> list[str]:
    """Return the command that starts this script again with the same Python and libraries."""
    if os.environ.get("SHIV_INTERPRETER"):  # we run inside the pyz: the children must too
        return [sys.executable, str(Path(args.pyz).resolve()), str(SCRIPT)]
    return [sys.executable, str(SCRIPT)]


SEEN_PANGEA: dict[str, str] = {}  # child process -> hash of the pangea.py it imported


@contextlib.contextmanager
def running_peer(args: argparse.Namespace) -> Iterator[tuple[Child, dict[str, Any]]]:
    """Start a peer process; yield it and its ready line; always stop it."""
    peer = Child([*self_command(args), "--role", "peer"], name="bench peer")
    try:
        _, line = peer.wait_for(re.compile(r"^\{"), "stdout", READY_S)
        ready = json.loads(line)
        SEEN_PANGEA[f"peer {peer.pid}"] = ready.get("pangea_sha", "?")
        yield peer, ready
    finally:
        peer.stop()


###############################################################################
# Measurements
###############################################################################


@dataclass
class Config:
    """What one run measures."""

    quick: bool
    bulk_mib: list[int]
    rss_mib: int
    tasks: int
    inflight: int
    matmul_n: int
    reps: int
    start_reps: int
    baseline: bool = True
    directions: list[str] = field(default_factory=lambda: ["upload", "download"])
    phases: list[str] = field(default_factory=lambda: list(PHASES))


def measure_tcp(args: argparse.Namespace, cfg: Config, ready: dict[str, Any], data: dict[int, Any]) -> dict[str, Any]:
    """Raw TCP MB/s each direction and size (median of reps)."""
    out: dict[str, Any] = {}
    for mib in cfg.bulk_mib:
        view = memoryview(data[mib]).cast("B")
        for direction in ("upload", "download"):
            samples = [tcp_transfer(ready["tcp_port"], direction, view) for _ in range(reps_for(cfg, mib))]
            out[f"{direction}_{mib}"] = rate_summary(mib * MIB, samples)
    return out


def measure_link(cfg: Config) -> dict[str, Any]:
    """Target 6: bench/link.py (two namespaces, a 1 Gbit/s tbf link) in a child; needs root."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (ip netns, tc)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "link.json"
        cmd = [sys.executable, str(SCRIPT.with_name("link.py")), "--json", str(out)]
        cmd += ["--mib", "64", "--reps", "1"] if cfg.quick else ["--mib", "256", "--reps", "3"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"bench/link.py failed: {done.stderr.strip()[-500:]}")
        print(done.stdout, file=sys.stderr, end="")
        return json.loads(out.read_text())


def reps_for(cfg: Config, mib: int) -> int:
    """Repetitions of a bulk transfer: cfg.reps for every size (the median is the steady state; the
    first, cold transfer is among the JSON samples), at most 3 from 512 MiB up."""
    return min(cfg.reps, 3) if mib >= 512 else cfg.reps


@dataclass
class Pair:
    """This process's side of the two-process phases: both hosts, dialed to the peer."""

    cfg: Config
    host: Any  # the plain libp2p host
    libp2p_peer: Any  # the peer's libp2p peer ID (an ID object)
    session: Any  # the pangea PeerSession with the peer's node
    manager: Any  # pangea's Manager of our node
    data: dict[int, Any]  # bulk operands by size in MiB
    results: dict[str, Any]

    @property
    def peer(self) -> str:
        """The peer node's id, the placement of delegated tasks."""
        return str(self.session.peer_id)


async def two_process_phases(cfg: Config, ready: dict[str, Any], data: dict[int, Any], results: dict) -> None:
    """Dial the peer's libp2p host and pangea node; run bulk, tasks and matmul into ``results``."""
    import trio
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    pangea = import_pangea()
    host = plain_host()
    node = pangea_node(pangea, "bench-client", serve=False)
    manager = pangea.Manager(node)
    info = info_from_p2p_addr(Multiaddr(ready["libp2p"]))
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]), node.running("127.0.0.1", 0):
        with trio.fail_after(30):
            await host.connect(info)
            session = await node.dial(pangea.parse_peer_address(ready["pangea"]), timeout_s=20)
        conn = node.connection_info(session.peer_id)
        results["pangea_connection"] = {"security": conn["security"], "muxer": conn["muxer"]}
        pair = Pair(cfg, host, info.peer_id, session, manager, data, results)
        for phase, fn in (("bulk", bulk), ("tasks", tasks), ("matmul", matmul)):
            if phase not in cfg.phases:
                continue
            print(f"bench: {phase} ...", file=sys.stderr, flush=True)
            snap = cpu_snapshot()
            try:
                results[phase] = await fn(pair)
            except Exception as exc:  # noqa: BLE001  one failed phase must not lose the others
                results[phase] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"bench: {phase} failed: {results[phase]['error']}", file=sys.stderr, flush=True)
            results.setdefault("load", {})[phase] = foreign_load(snap)
        await session.close("bench done")


async def bulk(pair: Pair) -> dict[str, Any]:
    """Bulk MB/s each way: the libp2p baseline and pangea's task path, alternating."""
    import trio

    cfg, session = pair.cfg, pair.session

    out: dict[str, Any] = {"libp2p": {}, "pangea": {}, "pangea_compute_s": {}}
    for mib in cfg.bulk_mib:
        array = pair.data[mib]
        view = memoryview(array).cast("B")
        rows = array.size // 1024
        params = {"rows": float(rows), "cols": 1024.0, "seed": 1.0}
        samples: dict[str, list[float]] = {}
        computes: dict[str, list[float]] = {}
        for _ in range(reps_for(cfg, mib)):
            for direction in cfg.directions:
                if cfg.baseline:
                    seconds = await libp2p_transfer(pair.host, pair.libp2p_peer, direction, view)
                    samples.setdefault(f"libp2p_{direction}", []).append(seconds)
                with trio.fail_after(bulk_timeout_s(mib * MIB)):
                    start = time.perf_counter()
                    if direction == "upload":
                        result = await session.request("sum", (array,))
                    else:
                        result = await session.request("random", (), params)
                    wall = time.perf_counter() - start
                if not result.ok:
                    raise RuntimeError(f"pangea {direction} task failed: {result.error_kind}: {result.error_message}")
                if direction == "upload" and float(result.outputs[0]) != float(array.size):
                    raise RuntimeError(f"sum of the uploaded ones is {result.outputs[0]}, expected {array.size}")
                if direction == "download" and result.outputs[0].shape != (rows, 1024):
                    raise RuntimeError(f"downloaded shape {result.outputs[0].shape}, expected {(rows, 1024)}")
                result.outputs = ()  # free the download before the next transfer
                samples.setdefault(f"pangea_{direction}", []).append(wall - result.compute_s)
                computes.setdefault(direction, []).append(result.compute_s)
        for key, times in samples.items():
            system, direction = key.split("_")
            out[system][f"{direction}_{mib}"] = rate_summary(mib * MIB, times)
        out["pangea_compute_s"][str(mib)] = computes
    return out


async def tasks(pair: Pair) -> dict[str, Any]:
    """Tiny-task round trips and tasks/s against a bare 64-byte echo on an open stream."""
    import numpy as np
    import trio

    cfg, host, libp2p_peer, session, manager, peer = (
        pair.cfg,
        pair.host,
        pair.libp2p_peer,
        pair.session,
        pair.manager,
        pair.peer,
    )

    out: dict[str, Any] = {}
    warmup = max(5, cfg.tasks // 20)
    a, b = np.ones(1), np.ones(1)
    with trio.fail_after(120 + cfg.tasks * 0.5):
        if cfg.baseline:
            echoes = await libp2p_echo(host, libp2p_peer, cfg.tasks, warmup)
            out["echo_sequential"] = latency_summary(echoes, sum(echoes))
            per_stream = max(1, cfg.tasks // cfg.inflight)
            echo_all: list[float] = []

            async def echo_one() -> None:
                echo_all.extend(await libp2p_echo(host, libp2p_peer, per_stream, warmup))

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(cfg.inflight):
                    nursery.start_soon(echo_one)
            # NOTE: the warm-up echoes are in the wall time; count them as done work too.
            wall = time.perf_counter() - start
            out["echo_inflight"] = latency_summary(
                echo_all, wall * len(echo_all) / (len(echo_all) + warmup * cfg.inflight)
            )

        # pangea, full user path: Manager.run (scheduler, delegator, verification of the result).
        where: dict[str, int] = {}

        async def run_task() -> float:
            start = time.perf_counter()
            outcome = await manager.run("add", (a, b), placement=peer, timeout_s=30)
            where[outcome.worker_id] = where.get(outcome.worker_id, 0) + 1
            return time.perf_counter() - start

        for _ in range(warmup):
            await run_task()
        where.clear()
        start = time.perf_counter()
        samples = [await run_task() for _ in range(cfg.tasks)]
        out["pangea_sequential"] = latency_summary(samples, time.perf_counter() - start)

        # pangea, the wire path alone: PeerSession.request.
        for _ in range(warmup):
            await session.request("add", (a, b))
        req_samples = []
        for _ in range(cfg.tasks):
            start = time.perf_counter()
            result = await session.request("add", (a, b))
            req_samples.append(time.perf_counter() - start)
            if not result.ok:
                raise RuntimeError(f"tiny task failed: {result.error_kind}: {result.error_message}")
        out["pangea_request_sequential"] = latency_summary(req_samples, sum(req_samples))

        inflight_samples: list[float] = []
        per_loop = max(1, cfg.tasks // cfg.inflight)

        async def loop() -> None:
            for _ in range(per_loop):
                inflight_samples.append(await run_task())

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(cfg.inflight):
                nursery.start_soon(loop)
        out["pangea_inflight"] = latency_summary(inflight_samples, time.perf_counter() - start)
        out["ran_on"] = {("peer" if k == peer else k): v for k, v in where.items()}
    return out


async def matmul(pair: Pair) -> dict[str, Any]:
    """Delegated NxN float64 matmul: wall time minus the worker's compute time."""
    import numpy as np
    import trio

    cfg, session, manager, peer = pair.cfg, pair.session, pair.manager, pair.peer

    n = cfg.matmul_n
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    start = time.perf_counter()
    expected = a @ b
    local_s = time.perf_counter() - start
    out: dict[str, Any] = {"n": n, "local_compute_s": local_s, "manager": [], "request": []}
    with trio.fail_after(120 + cfg.reps * 30 * (n / 2048) ** 3):
        await manager.run("matmul", (a[:64], b[:, :64]), placement=peer)  # warm-up: BLAS threads, code paths
        for _ in range(cfg.reps):
            start = time.perf_counter()
            outcome = await manager.run("matmul", (a, b), placement=peer)
            wall = time.perf_counter() - start
            if outcome.worker_id != peer or not np.allclose(outcome.outputs[0], expected):
                raise RuntimeError(f"matmul ran on {outcome.worker_id} or gave a wrong result")
            out["manager"].append(
                {"wall_s": wall, "compute_s": outcome.compute_s, "overhead_s": wall - outcome.compute_s}
            )
            start = time.perf_counter()
            result = await session.request("matmul", (a, b))
            wall = time.perf_counter() - start
            out["request"].append(
                {"wall_s": wall, "compute_s": result.compute_s, "overhead_s": wall - result.compute_s}
            )
    out["overhead_s"] = statistics.median(x["overhead_s"] for x in out["manager"])
    out["request_overhead_s"] = statistics.median(x["overhead_s"] for x in out["request"])
    # Baseline: what a plain libp2p stream needs for the same bytes at this run's bulk rates.
    libp2p = pair.results.get("bulk", {}).get("libp2p", {})
    small = min(cfg.bulk_mib)
    if f"upload_{small}" in libp2p and f"download_{small}" in libp2p:
        up, down = libp2p[f"upload_{small}"]["mb_s"] * 1e6, libp2p[f"download_{small}"]["mb_s"] * 1e6
        out["libp2p_transfer_s"] = 2 * a.nbytes / up + a.nbytes / down
    return out


def measure_rss(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Peak RSS of a fresh client and a fresh worker moving one operand each way."""
    out: dict[str, Any] = {"operand_mib": cfg.rss_mib}
    for direction in ("upload", "download"):
        with running_peer(args) as (peer, ready):
            client = Child(
                [
                    *self_command(args),
                    "--role",
                    "rss-client",
                    "--peer",
                    ready["pangea"],
                    "--direction",
                    direction,
                    "--rss-mib",
                    str(cfg.rss_mib),
                ],
                name=f"rss client ({direction})",
            )
            try:
                _, line = client.wait_for(re.compile(r"^\{"), "stdout", bulk_timeout_s(cfg.rss_mib * MIB) + READY_S)
                report = json.loads(line)
                worker = vm_status(peer.pid)
            finally:
                client.stop()
            SEEN_PANGEA[f"rss client {client.pid}"] = report.get("pangea_sha", "?")
            out[direction] = {
                "client_peak_mib": report["peak_mib"],
                "client_idle_mib": report["idle_mib"],
                "worker_peak_mib": worker["VmHWM"],
                "worker_idle_mib": ready["rss_mib"],
                "seconds": report["seconds"],
            }
    return out


def rss_client_main(args: argparse.Namespace) -> int:
    """Dial a peer, move one operand (sum up or random down), print our peak RSS as JSON."""
    import numpy as np
    import trio

    exit_when_stdin_closes()
    pangea = import_pangea()
    nbytes = args.rss_mib * MIB

    async def run() -> dict[str, float]:
        node = pangea_node(pangea, "bench-client", serve=False)
        async with node.running("127.0.0.1", 0):
            session = await node.dial(pangea.parse_peer_address(args.peer), timeout_s=20)
            idle = vm_status()["VmRSS"]
            with trio.fail_after(bulk_timeout_s(nbytes)):
                if args.direction == "upload":
                    operand = np.ones(nbytes // 8)
                    start = time.perf_counter()
                    result = await session.request("sum", (operand,))
                else:
                    start = time.perf_counter()
                    params = {"rows": float(nbytes // 8192), "cols": 1024.0, "seed": 3.0}
                    result = await session.request("random", (), params)
                seconds = time.perf_counter() - start - result.compute_s
            if not result.ok:
                raise RuntimeError(f"{args.direction} failed: {result.error_kind}: {result.error_message}")
            report = {
                "peak_mib": vm_status()["VmHWM"],
                "idle_mib": idle,
                "seconds": seconds,
                "pangea_sha": pangea_fingerprint(pangea),
            }
            await session.close("bench done")
            return report

    print(json.dumps(trio.run(run)), flush=True)
    return 0


def timed_runs(cmd: Sequence[str], reps: int, env: dict[str, str] | None = None) -> list[float]:
    """Run ``cmd`` once to warm up, then ``reps`` times; return the wall times of those."""
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # NOTE: a blocking wait(), with a timer for the 60 s bound: wait(timeout=...) polls
        # with sleeps of up to 50 ms, which rounded every start-up figure up to the next tick.
        watchdog = threading.Timer(60, child.kill)
        watchdog.start()
        try:
            code = child.wait()
        finally:
            watchdog.cancel()
        if code != 0:
            raise subprocess.CalledProcessError(code, cmd)
        if i:
            times.append(time.perf_counter() - start)
    return times


def measure_start(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """`pangea.pyz --help` warm, and launching `respond` to its first served task."""
    pyz = str(Path(args.pyz).resolve())
    out: dict[str, Any] = {"pyz": pyz}
    if not os.path.isfile(pyz):
        raise RuntimeError(f"no pyz at {pyz!r}: build it with ./build.sh or pass --pyz")
    import hashlib
    import zipfile

    with zipfile.ZipFile(pyz) as z, contextlib.suppress(KeyError):
        out["pyz_pangea_sha"] = hashlib.sha256(z.read("site-packages/pangea.py")).hexdigest()[:12]
    measured = pangea_fingerprint(import_pangea())
    if out.get("pyz_pangea_sha") != measured:
        out["warning"] = (
            f"the pyz holds another pangea.py ({out.get('pyz_pangea_sha')}) than the other phases ran "
            f"({measured}): rebuild with ./build.sh to time the same code"
        )
        print(f"bench: warning: {out['warning']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pangea-bench-") as tmp:
        empty, imports = Path(tmp) / "empty.py", Path(tmp) / "imports.py"
        empty.write_text("")
        imports.write_text("import numpy, trio, libp2p, capnp\n")
        shiv_env = {**os.environ, "SHIV_INTERPRETER": "1"}
        plain_env = {k: v for k, v in os.environ.items() if k != "SHIV_INTERPRETER"}
        out["help_s"] = timed_runs([pyz, "--help"], cfg.start_reps * 2, plain_env)
        out["shiv_empty_s"] = timed_runs([pyz, str(empty)], cfg.start_reps * 2, shiv_env)
        out["python_empty_s"] = timed_runs([sys.executable, "-S", "-c", "pass"], cfg.start_reps * 2, plain_env)
        # NOTE: the interpreter the pyz's first lines pick (build.sh's pyz_head; formerly
        # `#!/usr/bin/env python3`, where a python3 on PATH that is a wrapper, such as a
        # pyenv shim, added its own start-up to every run).
        shebang_python = subprocess.run(
            [pyz, "-c", "import sys; print(sys.executable)"],
            env=shiv_env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        out["shebang_python"] = {"on_path": shutil.which("python3", path=plain_env.get("PATH")), "runs": shebang_python}
        out["help_direct_s"] = timed_runs([shebang_python, pyz, "--help"], cfg.start_reps * 2, plain_env)
        out["imports_s"] = timed_runs([pyz, str(imports)], cfg.start_reps, shiv_env)
        for suffix, launcher in (("", [pyz]), ("_direct", [shebang_python, pyz])):
            runs = [
                respond_to_first_task(launcher, Path(tmp), f"{suffix}{i}", plain_env) for i in range(cfg.start_reps + 1)
            ]
            out[f"respond_first_task{suffix}_s"] = [r["first_task_s"] for r in runs[1:]]  # the first one warms up
            out[f"respond_session{suffix}_s"] = [r["session_s"] for r in runs[1:]]
    for key in (
        "help_s", "help_direct_s", "shiv_empty_s", "python_empty_s", "imports_s", "respond_first_task_s",
        "respond_session_s", "respond_first_task_direct_s", "respond_session_direct_s",
    ):  # fmt: skip
        out[key.removesuffix("_s") + "_median_s"] = statistics.median(out[key])
    return out


def respond_to_first_task(pyz: list[str], tmp: Path, i: str, env: dict[str, str]) -> dict[str, float]:
    """Start an initiator, then time a responder from its launch to its first served task."""
    homes = [tmp / f"initiator-{i}", tmp / f"responder-{i}"]
    for home in homes:
        home.mkdir(mode=0o700)
    children: list[Child] = []
    try:
        initiator = Child(
            [
                *pyz,
                "initiate",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--size",
                "64",
                "--transfer-mib",
                "1",
                "--timeout",
                "60",
            ],  # fmt: skip
            env={**env, "PANGEA_HOME": str(homes[0]), "PYTHONUNBUFFERED": "1"},
            name="initiate",
        )
        children.append(initiator)
        _, line = initiator.wait_for(re.compile(r"^Join string: pangea://"), "stdout", READY_S)
        join = line.removeprefix("Join string: ").strip()
        start = time.perf_counter()
        responder = Child(
            [*pyz, "respond", "-v", join],
            env={**env, "PANGEA_HOME": str(homes[1]), "PYTHONUNBUFFERED": "1"},
            name="respond",
        )
        children.append(responder)
        session_at, _ = responder.wait_for(SESSION_UP, "stdout", READY_S)
        task_at, _ = responder.wait_for(FIRST_TASK, "stderr", READY_S)
        return {"session_s": session_at - start, "first_task_s": task_at - start}
    finally:
        for child in reversed(children):
            child.stop()


###############################################################################
# Machine info, the table, main
###############################################################################


def blas_info() -> dict[str, Any]:
    """Return numpy's BLAS: library, threads and core type (threadpoolctl if present, else ctypes)."""
    import ctypes

    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info  # optional; not a dependency of pangea

        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture")} for p in threadpool_info()
        ]
        return info
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    for path in libs:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", ""), ("openblas_", "64_")):
                threads = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                corename = getattr(lib, f"{prefix}get_corename{suffix}", None)
                if threads is not None:
                    info["blas_library"] = path
                    info["blas_threads"] = int(threads())
                    if corename is not None:
                        corename.restype = ctypes.c_char_p
                        info["blas_corename"] = corename().decode()
                    return info
    return info


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Return what the numbers depend on: cores, CPU, Python, library versions, BLAS, the code's commit."""
    import libp2p  # noqa: F401
    import trio

    pangea = import_pangea()
    # The verb's figures (cores, cpu_model, memory_gib, python, numpy, pangea), without its
    # guess at the BLAS threads (blas_info reads them from the library) and its short forms.
    shared = {k: v for k, v in bench_machine_info().items() if k not in ("blas_threads", "platform", "env")}
    info: dict[str, Any] = {
        **shared,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "pangea_version": pangea.__version__,
        "pangea_file": pangea.__file__,
        "pangea_sha": pangea_fingerprint(pangea),
        "trio": getattr(trio, "__version__", None),
        "libp2p": _dist_version("libp2p"),
        "env": {
            k: os.environ.get(k)
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
                "SHIV_INTERPRETER",
            )
        },
        **blas_info(),
    }
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(REPO_ROOT)]
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["git_dirty"] = bool(
            subprocess.run(
                [*git, "status", "--porcelain", "--", "pangea.py"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# Targets of the verb (pangea_bench: BULK, LATENCY, RATE, OVERHEAD, INFO) and the harness's own.
RSS_TARGET = BenchTarget("<= 2.5x", max_ratio=2.5)
HELP_TARGET = BenchTarget("<= 0.2 s", max_value=0.2)
FIRST_TASK_TARGET = BenchTarget("<= 1.0 s", max_value=1.0)
LINK_TARGET = BenchTarget(">= 90% of link", min_ratio=0.9)


def build_rows(cfg: Config, r: dict[str, Any]) -> list[BenchRow]:
    """Turn the results into table rows (pangea_bench's rows) with their performance targets."""
    rows: list[BenchRow] = []
    for mib in cfg.bulk_mib:
        for direction in ("upload", "download"):
            key, label = f"{direction}_{mib}", f"{direction} {_size_text(mib)}"
            ours = _dig(r, "bulk", "pangea", key, "mb_s")
            rows.append(bench_row(f"bulk_{key}", f"bulk {label}", "MB/s", ours, _dig(r, "bulk", "libp2p", key, "mb_s"),
                                  "libp2p stream", BULK_TARGET))  # fmt: skip
            if _dig(r, "tcp", key, "mb_s") is not None:
                rows.append(bench_row(f"bulk_{key}_vs_tcp", f"  vs raw TCP ({label})", "MB/s", ours,
                                      _dig(r, "tcp", key, "mb_s"), "raw TCP", INFO_TARGET))  # fmt: skip
    t = r.get("tasks", {})
    echo = _dig(t, "echo_sequential", "p50_ms")
    rows += [
        bench_row("task_p50", "tiny task p50 (Manager.run)", "ms", _dig(t, "pangea_sequential", "p50_ms"), echo,
                  "echo p50", LATENCY_TARGET),
        bench_row("task_p50_request", "tiny task p50 (session.request)", "ms",
                  _dig(t, "pangea_request_sequential", "p50_ms"), echo, "echo p50", LATENCY_TARGET),
        bench_row("tasks_per_s", "tasks/s sequential", "1/s", _dig(t, "pangea_sequential", "per_s"),
                  _dig(t, "echo_sequential", "per_s"), "echo/s", RATE_TARGET),
        bench_row("tasks_per_s_inflight", f"tasks/s {cfg.inflight} in flight", "1/s",
                  _dig(t, "pangea_inflight", "per_s"), _dig(t, "echo_inflight", "per_s"), "echo/s", RATE_TARGET),
    ]  # fmt: skip
    m, n = r.get("matmul", {}), cfg.matmul_n
    for key, suffix, how in (("overhead_s", "", "Manager.run"), ("request_overhead_s", "_request", "session.request")):
        rows.append(bench_row(f"matmul_overhead{suffix}", f"matmul {n} overhead ({how})", "s", m.get(key),
                              m.get("libp2p_transfer_s"), "libp2p, same bytes", OVERHEAD_TARGET))  # fmt: skip
    size = _size_text(cfg.rss_mib) + (" (--quick)" if cfg.quick else "")
    for direction in ("upload", "download"):
        for who in ("client", "worker"):
            rows.append(bench_row(f"rss_{who}_{direction}", f"peak RSS {who}, {direction} {size}", "MiB",
                                  _dig(r, "rss", direction, f"{who}_peak_mib"), float(cfg.rss_mib), "operand",
                                  RSS_TARGET))  # fmt: skip
    link = r.get("link", {})
    for direction in ("upload", "download"):
        label = f"{link.get('rate_mbit', 1000)} Mbit/s link {direction} (netns)"
        ours = _dig(link, direction, "pangea_mb_s")
        rows.append(bench_row(f"link_{direction}", label, "MB/s", ours, _dig(link, direction, "link_mb_s"),
                              "link rate", LINK_TARGET))  # fmt: skip
        rows.append(bench_row(f"link_{direction}_vs_tcp", f"  vs raw TCP on that link ({direction})", "MB/s", ours,
                              _dig(link, direction, "tcp_mb_s"), "raw TCP", INFO_TARGET))  # fmt: skip
    st = r.get("start", {})
    rows += [
        bench_row("help", "pyz --help warm", "s", st.get("help_median_s"), st.get("shiv_empty_median_s"),
                  "pyz empty script", HELP_TARGET),
        bench_row("help_direct", "  --help, python3 binary direct", "s", st.get("help_direct_median_s"),
                  st.get("help_median_s"), "via shebang", INFO_TARGET),
        bench_row("respond_first_task", "respond -> first task warm", "s", st.get("respond_first_task_median_s"),
                  st.get("imports_median_s"), "pyz imports only", FIRST_TASK_TARGET),
        bench_row("respond_first_task_direct", "  respond, python3 binary direct", "s",
                  st.get("respond_first_task_direct_median_s"), st.get("respond_first_task_median_s"), "via shebang",
                  INFO_TARGET),
    ]  # fmt: skip
    return rows


def table_rows(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Return the rows for the JSON's ``table``: every field but the key (the metric names the row)."""
    return [{k: v for k, v in asdict(row).items() if k != "key"} for row in rows]


def make_config(args: argparse.Namespace) -> Config:
    """Return the run's configuration: --quick defaults, then explicit options."""
    quick = args.quick
    phases = PHASES if not args.only else tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"bench: error: unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return Config(
        quick=quick,
        bulk_mib=[int(x) for x in (args.bulk_mib or ("64" if quick else "64,1024")).split(",")],
        rss_mib=args.rss_mib or (256 if quick else 1024),
        tasks=args.tasks or (200 if quick else 1000),
        inflight=args.inflight,
        matmul_n=args.matmul_n,
        reps=args.reps or (1 if quick else 3),
        start_reps=args.start_reps or (2 if quick else 5),
        baseline=not args.no_baseline,
        directions=[d.strip() for d in args.directions.split(",")],
        phases=list(phases),
    )


def run_phase(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one phase into results[name]; a failure is recorded and the run goes on."""
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    snap = cpu_snapshot()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001  one failed phase must not lose the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"bench: {name} failed: {results[name]['error']}", file=sys.stderr, flush=True)
    results.setdefault("load", {})[name] = foreign_load(snap)


def bench_main(args: argparse.Namespace) -> int:
    """Run the selected phases, print the table, write the JSON; 0 when every phase ran."""
    with tempfile.TemporaryDirectory(prefix="pangea-bench-snapshot-") as snapshot_dir:
        return _bench_main(args, snapshot_dir)


def _bench_main(args: argparse.Namespace, snapshot_dir: str) -> int:
    import numpy as np
    import trio

    cfg = make_config(args)
    started = time.time()
    print(
        f"bench: {', '.join(cfg.phases)}; bulk {cfg.bulk_mib} MiB, rss {cfg.rss_mib} MiB"
        f"{' (--quick)' if cfg.quick else ''}",
        file=sys.stderr,
        flush=True,
    )
    results: dict[str, Any] = {}
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    snapshot_pangea(Path(snapshot_dir))
    doc: dict[str, Any] = {"machine": machine_info(args), "config": asdict(cfg), "results": results}
    doc["foreign_cores_at_start"], doc["loadavg_at_start"] = quiet, os.getloadavg()
    # Operands of the bulk phases: ones, so the worker's sum checks every byte arrived.
    data = {mib: np.ones(mib * MIB // 8) for mib in cfg.bulk_mib} if {"tcp", "bulk"} & set(cfg.phases) else {}
    if {"tcp", "bulk", "tasks", "matmul"} & set(cfg.phases):
        with running_peer(args) as (_, ready):
            if "tcp" in cfg.phases and cfg.baseline:
                run_phase(results, "tcp", lambda: measure_tcp(args, cfg, ready, data))
            try:
                trio.run(two_process_phases, cfg, ready, data, results)
            except BaseException as exc:  # noqa: BLE001  e.g. an ExceptionGroup from libp2p's teardown (#1516)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                results["two_process_error"] = f"{type(exc).__name__}: {exc}"
                print(f"bench: two-process phases: {results['two_process_error']}", file=sys.stderr)
    data.clear()
    if "rss" in cfg.phases:
        run_phase(results, "rss", lambda: measure_rss(args, cfg))
    if "start" in cfg.phases:
        run_phase(results, "start", lambda: measure_start(args, cfg))
    if "link" in cfg.phases:
        run_phase(results, "link", lambda: measure_link(cfg))
    rows = build_rows(cfg, results)
    doc["table"] = table_rows(rows)
    doc["seconds"] = time.time() - started
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if "two_process_error" in results:
        errors["two_process"] = results["two_process_error"]
    doc["errors"] = errors
    print()
    print(format_bench_table(rows))
    print(
        f"\nbench: {doc['seconds']:.0f} s; machine: {doc['machine']['cpu_count']} cores, "
        f"Python {doc['machine']['python']}, numpy {doc['machine']['numpy']}, "
        f"BLAS threads {doc['machine'].get('blas_threads', '?')}, "
        f"OPENBLAS_CORETYPE={doc['machine']['env']['OPENBLAS_CORETYPE']}"
    )
    doc["pangea_sha_by_process"] = {"main": doc["machine"]["pangea_sha"], **SEEN_PANGEA}
    if len(set(doc["pangea_sha_by_process"].values())) > 1:
        print("bench: warning: pangea.py changed during the run; processes ran different versions (see the JSON)")
    loads = results.get("load", {}).items()
    busy = {k: v["foreign_cores"] for k, v in loads if v["foreign_cores"] > 0.2 and v["wall_s"] > 0.5}
    if busy:
        what = ", ".join(f"{k} {v:.2f}" for k, v in busy.items())
        print(f"bench: warning: other programs used CPU during phases (cores: {what}); those figures are disturbed")
    for name, error in errors.items():
        print(f"bench: error in {name}: {error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"bench: wrote {args.json}")
    return 1 if errors else 0


def make_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (rss: 256 MiB)")
    p.add_argument("--json", metavar="FILE", help="write every number, the machine and the config as JSON")
    p.add_argument("--pyz", default=str(REPO_ROOT / "pangea.pyz"), help="the pyz whose start-up is timed")
    p.add_argument("--only", metavar="PHASES", help=f"comma-separated subset of: {','.join(PHASES)}")
    p.add_argument("--bulk-mib", metavar="LIST", help="bulk sizes in MiB (default 64,1024; --quick 64)")
    p.add_argument("--rss-mib", type=int, help="operand of the RSS phase in MiB (default 1024; --quick 256)")
    p.add_argument("--tasks", type=int, help="tiny tasks per measurement (default 1000; --quick 200)")
    p.add_argument("--inflight", type=int, default=8, help="tasks (echo streams) in flight at once (default 8)")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the delegated matmul (default 2048)")
    p.add_argument("--reps", type=int, help="repetitions of bulk (< 512 MiB) and matmul (default 3; --quick 1)")
    p.add_argument("--start-reps", type=int, help="measured start-up runs after one warm-up (default 5; --quick 2)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other programs to leave the CPUs idle (default: do not wait)",
    )
    p.add_argument("--directions", default="upload,download", help="bulk directions to measure (for profiling)")
    p.add_argument("--no-baseline", action="store_true", help="skip the tcp and libp2p baselines (for profiling)")
    p.add_argument("--role", choices=("main", "peer", "rss-client"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--direction", choices=("upload", "download"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the orchestrating run, or one of the hidden child roles."""
    args = make_parser().parse_args(argv)
    if args.role == "peer":
        return peer_main()
    if args.role == "rss-client":
        return rss_client_main(args)
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())

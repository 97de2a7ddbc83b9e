#!/usr/bin/env python3
"""The Python client path, `pangea.Client` -> serve A -> serve B, next to raw TCP, numpy, Ray and Dask.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/client_path.py                  # every row, 5 rounds (a few minutes)
    .build/venv/bin/python bench/client_path.py --quick          # small sizes, 1 round (a smoke run)
    .build/venv/bin/python bench/client_path.py --only matmul,tiny --rounds 7 --json out.json

What runs, all on 127.0.0.1: serve B, then serve A ``--peer B`` (ports 0, a home of
each in a temporary directory, stopped at the end; bench/nodes.py), and in this
process a `pangea.Client` of A made from A's home, so it finds the token and the
shared-memory socket. Baselines, measured in the same run: local numpy in this
process; a raw TCP worker process (a plain socket, length-prefixed float64 bytes:
it computes and sends the result back); Ray (one ``@ray.remote`` task after
``ray.init(num_cpus=N)``) and Dask (``distributed.LocalCluster(n_workers=1,
threads_per_worker=1, processes=True)`` and ``Client.submit``) when their venvs
exist, each run by a driver child started with that venv's interpreter (a row's
absent anchor is left out with a note). This script installs nothing; to make the
anchors' venvs:

    python3 -m venv ~/.venv-ray && ~/.venv-ray/bin/pip install ray numpy
    python3 -m venv ~/.venv-dask && ~/.venv-dask/bin/pip install 'dask[distributed]' numpy

Every process runs BLAS with the same threads (``--blas-threads``: OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS, for this process, the nodes and every
child). Each round runs every job once on every system, interleaved, after one
unrecorded warm-up of each; the table gives the median of ``--rounds`` with min and
max. Every result is checked against numpy. The jobs (``--only`` names them):

  matmul     2048x2048 float64 matmul, placement remote (A hands it to B): the wall
             time, and the wall time minus the worker's compute (pangea's
             ``last_task["timings"]["compute_s"]``; the anchors time their kernel).
  roundtrip  `scale` factor 1 of 64 MiB, placement local (the shared-memory path)
             and remote: MB/s each way = bytes / ((wall - compute) / 2).
  tiny       a 4x4 add, one call at a time: the p50 latency, placement local and remote.
  threads    tiny tasks/s with 1 and 4 calling threads (placement local).
  rss        peak RSS of this client, A and B over one remote `add` of 2 x 512 MiB:
             (VmHWM - VmRSS before) / operand bytes, peaks reset through
             /proc/PID/clear_refs before the call.
  first      a fresh client process: its first 64 MiB `scale` (local) against its next ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_threads_of(argv: Sequence[str], default: str = "2") -> str:
    """The --blas-threads value in ``argv`` (read before numpy loads its BLAS), else ``default``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--blas-threads="):
            return arg.split("=", 1)[1]
        if arg == "--blas-threads" and i + 1 < len(argv):
            return argv[i + 1]
    return default


if __name__ == "__main__":  # NOTE: before numpy is imported, so this process's BLAS uses them too
    os.environ.update(dict.fromkeys(BLAS_VARS, blas_threads_of(sys.argv[1:])))

sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "bench")]

import numpy as np  # noqa: E402

import client_path_driver as drv  # noqa: E402
import nodes  # noqa: E402
import pangea  # noqa: E402
from client_threads import run_threads  # noqa: E402

ANCHORS = ("numpy", "raw TCP", "Ray", "Dask")
JOBS = ("matmul", "roundtrip", "tiny", "threads", "rss", "first")
READY_TIMEOUT_S = 180.0  # an anchor driver's ready line (ray.init on a loaded 2-core box: 10-30 s)
REPLY_TIMEOUT_S = 600.0  # one command's answer
CLIENT_TIMEOUT_S = 600.0
BREAKDOWN = {  # pangea's task timings, in the order a call spends them
    "wall_s": "wall",
    "rpc_s": "client<->A (rpc_s)",
    "queue_s": "queue",
    "transfer_s": "A<->B (transfer_s)",
    "compute_s": "compute",
}
MAKE_VENV = {
    "Ray": "python3 -m venv ~/.venv-ray && ~/.venv-ray/bin/pip install ray numpy",
    "Dask": "python3 -m venv ~/.venv-dask && ~/.venv-dask/bin/pip install 'dask[distributed]' numpy",
}


# ---------------------------------------------------------------------------
# Pure parts: summaries, rates, targets, verdicts, the table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median, min and max of a figure over the rounds."""

    median: float
    low: float
    high: float
    n: int


def summarize(values: Sequence[float]) -> Summary | None:
    """The summary of ``values`` (None when there are none)."""
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def mb_per_s_each_way(nbytes: int, wall_s: float, compute_s: float) -> float:
    """MB/s each way of a there-and-back of ``nbytes``: the bytes over half of (wall - compute)."""
    crossing = wall_s - compute_s
    return nbytes / (crossing / 2) / 1e6 if crossing > 0 else math.inf


def p50(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def peak_ratio(hwm_kib: int, rss_before_kib: int, operand_bytes: int) -> float:
    """(peak RSS - RSS before) over the operand bytes."""
    return (hwm_kib - rss_before_kib) * 1024 / operand_bytes


@dataclass(frozen=True)
class Target:
    """A target on a row's pangea median: ``op`` ("<=" or ">=") ``value``, times the median of the
    baseline ``of`` when given; ``of`` None: an absolute figure in the row's unit."""

    op: str
    value: float
    of: str | None = None

    def text(self, unit: str) -> str:
        """How the table shows it ("<= 0.15 s", ">= 0.8x raw TCP")."""
        if self.of is None:
            return f"{self.op} {self.value:g}x" if unit == "x" else f"{self.op} {self.value:g} {unit}"
        return f"{self.op} {self.value:g}x {self.of}"


def verdict(target: Target | None, pangea_fig: Summary | None, baselines: Mapping[str, Summary | None]) -> str:
    """ "yes" or "no" for the pangea median against ``target``; "-" without a target; "n/a (...)" when a
    figure it needs is missing."""
    if target is None:
        return "-"
    if pangea_fig is None:
        return "n/a (not measured)"
    bound = target.value
    if target.of is not None:
        ref = baselines.get(target.of)
        if ref is None:
            return f"n/a ({target.of} absent)"
        bound *= ref.median
    ok = pangea_fig.median <= bound if target.op == "<=" else pangea_fig.median >= bound
    return "yes" if ok else "no"


@dataclass
class Row:
    """One table row: the per-round samples of pangea and of each baseline."""

    key: str
    label: str
    unit: str
    target: Target | None
    anchors: tuple[str, ...] = ()  # the anchors that run this row's job
    pangea: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)

    def summaries(self) -> dict[str, Summary | None]:
        """Each baseline's summary."""
        return {name: summarize(values) for name, values in self.baselines.items()}

    def met(self) -> str:
        """The verdict of this row."""
        return verdict(self.target, summarize(self.pangea), self.summaries())


def format_value(value: float, unit: str) -> str:
    """A figure in its unit's precision."""
    if math.isinf(value):
        return "inf"
    if unit in ("MB/s", "/s"):
        return f"{value:.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_cell(summary: Summary | None, unit: str, spread: bool = True) -> str:
    """ "median (min-max)" of a figure; "-" when there is none."""
    if summary is None:
        return "-"
    med = format_value(summary.median, unit)
    if not spread or summary.n < 2:
        return med
    return f"{med} ({format_value(summary.low, unit)}-{format_value(summary.high, unit)})"


def table(rows: Sequence[Row], absent: Mapping[str, str]) -> str:
    """The markdown table: row, pangea median (min-max), each anchor's median, target, met."""
    head = ["row", "pangea (min-max)", *ANCHORS, "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        summaries = row.summaries()
        cells = [f"{row.label} ({row.unit})", format_cell(summarize(row.pangea), row.unit)]
        for anchor in ANCHORS:
            if anchor not in row.anchors:
                cells.append("-")
            elif anchor in absent:
                cells.append("absent")
            else:
                cells.append(format_cell(summaries.get(anchor), row.unit, spread=False))
        target = "" if row.target is None else row.target.text(row.unit)
        if row.target is not None and row.target.of is not None and row.target.of not in ANCHORS:
            ref = summaries.get(row.target.of)
            target += f" ({format_value(ref.median, row.unit)})" if ref is not None else ""
        cells += [target or "-", row.met()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown(timings: Mapping[str, Sequence[Mapping[str, float]]]) -> list[str]:
    """One line per job.placement: the medians of pangea's task timings (where the wall time went)."""
    lines = []
    for key, samples in timings.items():
        if not samples:
            continue
        med = {name: statistics.median(s[name] for s in samples) for name in BREAKDOWN if name in samples[0]}
        parts = ", ".join(f"{what} {med[name]:.3f}" for name, what in BREAKDOWN.items() if name in med)
        lines.append(f"- pangea {key}: median s: {parts}")
    return lines


def make_rows(n: int, mib: int, rss_mib: int, first_mib: int, threads: int) -> dict[str, Row]:
    """Every row the benchmark can fill, by key (``job.what``), with its target."""
    operands = f"2 x {rss_mib} MiB"
    remote = ANCHORS[1:]  # raw TCP, Ray, Dask: a worker process of their own
    rows = [
        Row("matmul.wall", f"{n} matmul remote: wall", "s", Target("<=", 1.5, "Ray"), ANCHORS),
        Row("matmul.overhead", f"{n} matmul remote: wall - worker compute", "s", Target("<=", 0.15), remote),
        Row(
            "roundtrip.local",
            f"{mib} MiB there and back, local (shared memory): each way",
            "MB/s",
            Target(">=", 2000),
            remote,
        ),
        Row(
            "roundtrip.remote",
            f"{mib} MiB there and back, remote: each way",
            "MB/s",
            Target(">=", 0.8, "raw TCP"),
            remote,
        ),
        Row("tiny.local", "tiny task p50, local", "ms", Target("<=", 1.0, "Ray"), remote),
        Row("tiny.remote", "tiny task p50, remote", "ms", Target("<=", 1.0, "Ray"), remote),
        Row("threads.1", "tiny tasks/s, 1 calling thread (local)", "/s", None),
        Row(
            f"threads.{threads}",
            f"tiny tasks/s, {threads} calling threads (local)",
            "/s",
            Target(">=", 2.0, "1 thread"),
        ),
        Row("rss.client", f"peak RSS of the client, {operands} remote add", "x", Target("<=", 1.3)),
        Row("rss.a", f"peak RSS of node A, {operands} remote add", "x", Target("<=", 1.5)),
        Row("rss.b", f"peak RSS of worker B, {operands} remote add", "x", Target("<=", 1.3)),
        Row("first", f"first {first_mib} MiB transfer of a fresh client / its steady state", "x", Target(">=", 0.8)),
    ]
    return {row.key: row for row in rows}


def parse_only(text: str | None) -> list[str]:
    """The jobs ``--only`` names, by job or row key ("tiny.local": its job); all when None; SystemExit
    naming the bad one and the choices."""
    if not text:
        return list(JOBS)
    chosen = [word.strip().split(".")[0] for word in text.split(",") if word.strip()]
    bad = [word for word in chosen if word not in JOBS]
    if bad or not chosen:
        raise SystemExit(f"client_path.py: error: bad --only {text!r}: expected some of {','.join(JOBS)}")
    return [job for job in JOBS if job in chosen]


# ---------------------------------------------------------------------------
# The anchors' child processes
# ---------------------------------------------------------------------------


class Child:
    """A child of bench/client_path_driver.py: JSON lines on stdout (read with a timeout), stderr to a file."""

    def __init__(self, python: str, role: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.role = role
        self.log = log_dir / f"{role}.stderr"
        with self.log.open("w") as err:
            self.popen = subprocess.Popen(
                [python, str(REPO_ROOT / "bench" / "client_path_driver.py"), role],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=dict(env),
                start_new_session=True,  # its own group: stop() ends it and what it started (Ray's raylet...)
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=self._pump, args=(self.popen.stdout,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line; SystemExit (with the end of its stderr) on a timeout, EOF or an error."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
            why = f"answered nothing within {timeout_s:g} s"
        else:
            why = "exited"
        if line is None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"client_path.py: the {self.role} child {why}; its stderr ends:\n{tail}")
        doc = json.loads(line)
        if "error" in doc:
            raise SystemExit(f"client_path.py: the {self.role} child failed: {doc['error']}")
        return dict(doc)

    def send(self, cmd: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Send one command, return its answer."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()
        return self.read(timeout_s)

    def stop(self) -> None:
        """Close its stdin, then end its process group (by its PID) if it lingers."""
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, 9)


class RawTcp:
    """The raw TCP anchor: one connection to a worker child that computes and sends the result back."""

    def __init__(self, child: Child) -> None:
        self.child = child
        ready = child.read(READY_TIMEOUT_S)
        self.meta = ready
        self.sock = socket.create_connection(("127.0.0.1", int(ready["port"])), timeout=REPLY_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, job: str, args: tuple[np.ndarray, ...]) -> tuple[float, float, np.ndarray]:
        """(wall s, worker compute s, result) of one job."""
        started = time.perf_counter()
        drv.send_frame(self.sock, {"job": job, "shapes": [list(a.shape) for a in args]}, *args)
        header = drv.recv_frame_header(self.sock)
        out = drv.recv_array(self.sock, header["shape"])
        return time.perf_counter() - started, float(header["compute_s"]), out

    def close(self) -> None:
        """Close the connection (the worker then exits)."""
        self.sock.close()
        self.child.stop()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, KiB (/proc/PID/status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Reset a process's peak RSS (VmHWM) to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Sizes:
    """The sizes of one run (full or --quick)."""

    n: int
    mib: int
    calls: int
    thread_s: float
    threads: int
    rss_mib: int
    first_mib: int
    first_repeats: int


FULL = Sizes(n=2048, mib=64, calls=200, thread_s=1.5, threads=4, rss_mib=512, first_mib=64, first_repeats=3)
QUICK = Sizes(n=256, mib=4, calls=20, thread_s=0.3, threads=4, rss_mib=8, first_mib=4, first_repeats=1)


class Bench:
    """One run: the pangea pair and client, the anchors, the rows they fill."""

    def __init__(
        self,
        sizes: Sizes,
        client: pangea.Client,
        a: nodes.Node,
        b: nodes.Node,
        tcp: RawTcp,
        anchors: dict[str, Child],
        child_env: dict[str, str],
        log_dir: Path,
    ) -> None:
        self.sizes, self.client, self.a, self.b, self.tcp = sizes, client, a, b, tcp
        self.anchors = anchors  # "Ray"/"Dask" -> its driver, the present ones
        self.child_env, self.log_dir = child_env, log_dir
        self.rows = make_rows(sizes.n, sizes.mib, sizes.rss_mib, sizes.first_mib, sizes.threads)
        self.extra: dict[str, list[Any]] = {}
        self.timings: dict[str, list[dict[str, float]]] = {}  # pangea's task timings, by job.placement
        self.recording = False  # True in the rounds, False in the warm-up
        self.matmul_args = drv.operands({"job": "matmul", "n": sizes.n})
        self.roundtrip_args = drv.operands({"job": "roundtrip", "mib": sizes.mib})
        self.tiny_args = drv.operands({"job": "tiny"})
        self.rss_args: tuple[np.ndarray, ...] = ()

    def add(self, key: str, column: str, value: float, record: bool) -> None:
        """One round's figure of ``column`` ("pangea" or a baseline) in row ``key``."""
        if not record:
            return
        row = self.rows[key]
        (row.pangea if column == "pangea" else row.baselines.setdefault(column, [])).append(value)

    def pangea_call(self, job: str, args: tuple[np.ndarray, ...], placement: str) -> tuple[float, float, np.ndarray]:
        """(wall s, the node's compute s, result) of one call through the Client."""
        kernel, params = {"matmul": ("matmul", {}), "roundtrip": ("scale", {"factor": 1.0}), "tiny": ("add", {})}[job]
        started = time.perf_counter()
        out = self.client.submit(kernel, *args, placement=placement, fallback=False, **params)
        wall = time.perf_counter() - started
        task = self.client.last_task
        if placement == "remote" and task["ran_on"] != self.b.peer_id:
            raise SystemExit(f"client_path.py: a remote {job} ran on {task['ran_on']}, not on B")
        # where the time went: the node's queue, transfer (A-B), compute; rpc_s (client-A)
        if self.recording and job != "tiny":
            self.timings.setdefault(f"{job}.{placement}", []).append(task["timings"] | {"wall_s": wall})
        return wall, float(task["timings"]["compute_s"]), out

    def anchor(self, name: str, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one command on the anchor ``name``; its samples."""
        return list(self.anchors[name].send(cmd)["samples"])

    def matmul(self, record: bool) -> None:
        """One round of the remote matmul on every system."""
        args = self.matmul_args
        wall, compute_s, out = self.pangea_call("matmul", args, "remote")
        drv.check("matmul", args, out)
        self.add("matmul.wall", "pangea", wall, record)
        self.add("matmul.overhead", "pangea", wall - compute_s, record)
        del out
        started = time.perf_counter()
        out = args[0] @ args[1]
        self.add("matmul.wall", "numpy", time.perf_counter() - started, record)
        drv.check("matmul", args, out)
        del out
        wall, compute_s, out = self.tcp.call("matmul", args)
        drv.check("matmul", args, out)
        self.add("matmul.wall", "raw TCP", wall, record)
        self.add("matmul.overhead", "raw TCP", wall - compute_s, record)
        del out
        for name in self.anchors:
            (sample,) = self.anchor(name, {"job": "matmul", "n": self.sizes.n, "repeats": 1})
            self.add("matmul.wall", name, sample["wall_s"], record)
            self.add("matmul.overhead", name, sample["wall_s"] - sample["compute_s"], record)

    def roundtrip(self, record: bool) -> None:
        """One round of the there-and-back: pangea local and remote, raw TCP, the anchors."""
        args = self.roundtrip_args
        nbytes = args[0].nbytes
        for placement in ("local", "remote"):
            wall, compute_s, out = self.pangea_call("roundtrip", args, placement)
            drv.check("roundtrip", args, out)
            del out
            if placement == "local" and not self.client.last_task["arrays_via"].startswith("shared memory"):
                raise SystemExit(f"client_path.py: local arrays went by {self.client.last_task['arrays_via']}")
            self.add(f"roundtrip.{placement}", "pangea", mb_per_s_each_way(nbytes, wall, compute_s), record)
        wall, compute_s, out = self.tcp.call("roundtrip", args)
        drv.check("roundtrip", args, out)
        del out
        for key in ("roundtrip.local", "roundtrip.remote"):
            self.add(key, "raw TCP", mb_per_s_each_way(nbytes, wall, compute_s), record)
        for name in self.anchors:
            (sample,) = self.anchor(name, {"job": "roundtrip", "mib": self.sizes.mib, "repeats": 1})
            for key in ("roundtrip.local", "roundtrip.remote"):
                self.add(key, name, mb_per_s_each_way(nbytes, sample["wall_s"], sample["compute_s"]), record)

    def tiny(self, record: bool) -> None:
        """One round of tiny tasks: ``calls`` one at a time per system, their p50 in ms."""
        args = self.tiny_args
        for placement in ("local", "remote"):
            lat = []
            for _ in range(self.sizes.calls):
                wall, _, out = self.pangea_call("tiny", args, placement)
                drv.check("tiny", args, out)
                lat.append(wall)
            self.add(f"tiny.{placement}", "pangea", p50(lat) * 1000, record)
        lat = []
        for _ in range(self.sizes.calls):
            wall, _, out = self.tcp.call("tiny", args)
            drv.check("tiny", args, out)
            lat.append(wall)
        for key in ("tiny.local", "tiny.remote"):
            self.add(key, "raw TCP", p50(lat) * 1000, record)
        for name in self.anchors:
            (sample,) = self.anchor(name, {"job": "tiny", "calls": self.sizes.calls})
            for key in ("tiny.local", "tiny.remote"):
                self.add(key, name, p50(sample["latencies_s"]) * 1000, record)

    def threads(self, record: bool) -> None:
        """One round of tiny tasks/s with 1 and N calling threads (placement local)."""
        seconds = self.sizes.thread_s
        tasks, elapsed = run_threads(self.client, 1, seconds, "local")
        one = tasks / elapsed
        self.add("threads.1", "pangea", one, record)
        tasks, elapsed = run_threads(self.client, self.sizes.threads, seconds, "local")
        self.add(f"threads.{self.sizes.threads}", "pangea", tasks / elapsed, record)
        self.add(f"threads.{self.sizes.threads}", "1 thread", one, record)

    def rss(self, record: bool) -> None:
        """One remote `add` of the large operands: peak RSS growth of this client, A and B."""
        if not self.rss_args:
            rng = np.random.default_rng(drv.SEED)
            count = (self.sizes.rss_mib << 20) // 8
            self.rss_args = (rng.standard_normal(count), rng.standard_normal(count))
        x, y = self.rss_args
        pids = {"client": os.getpid(), "a": self.a.pid, "b": self.b.pid}
        before = {}
        for who, pid in pids.items():
            reset_peak(pid)
            before[who] = status_kib(pid)["VmRSS"]
        out = self.client.submit("add", x, y, placement="remote", fallback=False)
        peaks = {who: status_kib(pid)["VmHWM"] for who, pid in pids.items()}
        if not np.array_equal(out[::4099], x[::4099] + y[::4099]):
            raise SystemExit("client_path.py: a wrong result of the large add")
        del out
        for who in pids:
            self.add(f"rss.{who}", "pangea", peak_ratio(peaks[who], before[who], x.nbytes + y.nbytes), record)

    def first(self, record: bool) -> None:
        """A fresh client process: its first transfer's MB/s over its steady state's."""
        child = Child(sys.executable, "pangea-fresh", self.a.client_env() | self.child_env, self.log_dir)
        try:
            child.read(READY_TIMEOUT_S)
            cmd = {"job": "first", "rpc": self.a.rpc, "mib": self.sizes.first_mib, "placement": "local"}
            answer = child.send(cmd | {"repeats": self.sizes.first_repeats})
        finally:
            child.stop()
        nbytes = (self.sizes.first_mib << 20) // 8 * 8
        rates = [mb_per_s_each_way(nbytes, s["wall_s"], s["compute_s"]) for s in answer["samples"]]
        self.extra.setdefault("first_mb_per_s", []).append({"first": rates[0], "next": rates[1:]})
        self.add("first", "pangea", rates[0] / statistics.median(rates[1:]), record)


def start_anchor(name: str, python: str, env: dict[str, str], log_dir: Path) -> tuple[Child | None, str]:
    """Start the driver of Ray or Dask with its venv's interpreter: (child, "") or (None, why absent)."""
    if not Path(python).expanduser().is_file():
        return None, f"no interpreter at {python} (make it: {MAKE_VENV[name]})"
    child = Child(str(Path(python).expanduser()), name.lower(), env, log_dir)
    try:
        meta = child.read(READY_TIMEOUT_S)
    except SystemExit as exc:
        child.stop()
        return None, f"its driver did not start: {str(exc).splitlines()[0]} (see {child.log})"
    return child, f"{name} {meta.get('version')}, worker BLAS: {meta.get('worker_blas')}"


@contextlib.contextmanager
def stopping_children(children: Sequence[Child | RawTcp]) -> Iterator[None]:
    """Stop the children at the end (each by its PID)."""
    try:
        yield
    finally:
        for child in children:
            child.close() if isinstance(child, RawTcp) else child.stop()


def run(args: argparse.Namespace, jobs: list[str], sizes: Sizes, rounds: int) -> dict[str, Any]:
    """Start everything, run the rounds, stop everything; the results."""
    child_env = dict.fromkeys(BLAS_VARS, str(args.blas_threads))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")} | child_env
    notes: dict[str, str] = {}
    absent: dict[str, str] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pangea-bench-client-path-") as tmp:
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        anchors: dict[str, Child] = {}
        for name, python in (("Ray", args.ray_python), ("Dask", args.dask_python)):
            child, note = start_anchor(name, python, base_env, log_dir)
            if child is None:
                absent[name] = note
            else:
                anchors[name] = child
                notes[name] = note
        tcp = RawTcp(Child(sys.executable, "tcp-worker", base_env, log_dir))
        notes["raw TCP"] = f"worker BLAS: {tcp.meta['worker_blas']}"
        with (
            stopping_children([*anchors.values(), tcp]),
            nodes.pair(args.pyz, Path(tmp)) as (a, b),
            a.client(timeout_s=CLIENT_TIMEOUT_S) as client,
        ):
            if not client.shared_memory:
                raise SystemExit(f"client_path.py: the Client has no shared-memory path ({client.shared_memory_note})")
            bench = Bench(sizes, client, a, b, tcp, anchors, child_env, log_dir)
            steps: dict[str, Callable[[bool], None]] = {
                "matmul": bench.matmul,
                "roundtrip": bench.roundtrip,
                "tiny": bench.tiny,
                "threads": bench.threads,
                "rss": bench.rss,
                "first": bench.first,
            }
            for job in jobs:
                if job not in ("rss", "first"):  # those are about the first time; the rounds give steady ones
                    steps[job](False)
            bench.recording = True
            for i in range(rounds):
                print(f"client_path.py: round {i + 1}/{rounds}: {', '.join(jobs)}", file=sys.stderr, flush=True)
                for job in jobs:
                    steps[job](True)
    wanted = [row for row in bench.rows.values() if row.key.split(".")[0] in jobs]
    return {
        "rows": wanted,
        "absent": absent,
        "notes": notes,
        "extra": bench.extra | {"pangea_timings": bench.timings},
        "elapsed_s": time.monotonic() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def report(result: dict[str, Any], rounds: int, blas_threads: int) -> str:
    """The table and its notes, as printed."""
    lines = [
        f"pangea Client path vs anchors on 127.0.0.1, median of {rounds} round(s) (min-max), interleaved; "
        f"{os.cpu_count()} cores, BLAS threads {blas_threads}, load {result['load_before'][0]:.2f} -> "
        f"{result['load_after'][0]:.2f}, {result['elapsed_s']:.0f} s",
        "",
        table(result["rows"], result["absent"]),
        "",
    ]
    for name in ANCHORS:
        if name in result["absent"]:
            lines.append(f"- {name}: absent: {result['absent'][name]}")
        elif name in result["notes"]:
            lines.append(f"- {name}: {result['notes'][name]}")
    return "\n".join([*lines, *breakdown(result["extra"]["pangea_timings"])])


def as_json(result: dict[str, Any], args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    """Everything measured, for --json."""

    def summary(values: list[float]) -> dict[str, Any] | None:
        s = summarize(values)
        return None if s is None else {"median": s.median, "min": s.low, "max": s.high, "samples": values}

    return {
        "rounds": rounds,
        "quick": args.quick,
        "blas_threads": args.blas_threads,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "load": {"before": result["load_before"], "after": result["load_after"]},
        "elapsed_s": result["elapsed_s"],
        "absent": result["absent"],
        "notes": result["notes"],
        "extra": result["extra"],
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "unit": row.unit,
                "pangea": summary(row.pangea),
                "baselines": {name: summary(values) for name, values in row.baselines.items()},
                "target": None if row.target is None else row.target.text(row.unit),
                "met": row.met(),
            }
            for row in result["rows"]
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run, print the table."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Make the anchors' venvs (this script installs nothing):\n  "
        + "\n  ".join(MAKE_VENV.values())
        + "\nJobs for --only: "
        + ",".join(JOBS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pyz", type=Path, default=REPO_ROOT / "pangea.pyz", help="the pangea.pyz to serve with")
    parser.add_argument("--rounds", type=int, help="rounds; the table gives the median (default 5, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 round: a smoke run, not figures")
    parser.add_argument(
        "--only", metavar="JOB[,JOB]", help=f"run only these jobs ({','.join(JOBS)}; a row key names its job)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample to this file")
    for name in ("Ray", "Dask"):
        default = f"~/.venv-{name.lower()}/bin/python"
        parser.add_argument(
            f"--{name.lower()}-python",
            default=default,
            metavar="PATH",
            help=f"the interpreter of {name}'s venv (default {default}); missing: its figures are left out",
        )
    parser.add_argument(
        "--blas-threads", type=int, default=2, metavar="N", help="BLAS threads of every process (default 2)"
    )
    args = parser.parse_args(argv)
    jobs = parse_only(args.only)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1 or args.blas_threads < 1:
        parser.error("--rounds and --blas-threads need a whole number >= 1")
    result = run(args, jobs, QUICK if args.quick else FULL, rounds)
    print(report(result, rounds, args.blas_threads))
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(result, args, rounds), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Tiny tasks per second through `pangea.Client` with 1 and N calling threads.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/client_threads.py                      # 1 and 4 threads, 3 s each, 3 rounds
    .build/venv/bin/python bench/client_threads.py --threads 1 4 8 --seconds 5 --rounds 5 --placement local

What runs. One `pangea.pyz serve` on 127.0.0.1 (ports 0, a home of its own in a
temporary directory, stopped at the end), and one `pangea.Client` of it in this
process. Each round, for each thread count T, T threads submit a 4x4 float64
`matmul` (placement local by default: the node computes it on its own event
loop, so the figure is the RPC path's cost) as fast as they can for the given
seconds; the table gives the median tasks/s over the rounds with min and max,
and the ratio to one thread. ``--futures`` adds a row where one thread keeps
``--in-flight`` futures outstanding through `Client.map`. Every result is
checked. Nothing is installed; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import nodes  # noqa: E402
import pangea  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run: Any, node_pid: int) -> tuple[float, float, float]:
    """(tasks/s, client CPU ms per task, node CPU ms per task) of ``run()``, which returns (tasks, seconds).

    CPU per task depends little on what else the machine runs; tasks/s does."""
    client0, node0 = time.process_time(), cpu_s(node_pid)
    tasks, seconds = run()
    client_ms = (time.process_time() - client0) * 1000 / max(1, tasks)
    node_ms = (cpu_s(node_pid) - node0) * 1000 / max(1, tasks)
    return tasks / seconds, client_ms, node_ms


def run_threads(client: pangea.Client, threads: int, seconds: float, placement: str) -> tuple[int, float]:
    """(tasks, seconds) of ``threads`` callers submitting tiny matmuls for ``seconds``."""
    x = np.arange(16.0).reshape(4, 4)
    want = x @ x
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def caller(i: int) -> None:
        while time.monotonic() < stop:
            out = client.submit("matmul", x, x, placement=placement)
            assert np.array_equal(out, want)
            counts[i] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 120)
    return sum(counts), time.perf_counter() - started


def run_map(client: pangea.Client, seconds: float, placement: str, in_flight: int) -> tuple[int, float]:
    """(tasks, seconds) of one thread keeping ``in_flight`` futures outstanding through Client.map."""
    x = np.arange(16.0).reshape(4, 4)
    want = x @ x
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = [(x, x)] * 200
        for out in client.map("matmul", batch, placement=placement, in_flight=in_flight):
            assert np.array_equal(out, want)
            done += 1
    return done, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyz", default=str(REPO / "pangea.pyz"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--placement", default="local")
    parser.add_argument("--futures", action="store_true", help="also one thread with futures in flight (Client.map)")
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="pangea-bench-") as tmp,
        nodes.serving(Path(args.pyz), Path(tmp), "serve") as node,
    ):
        rows: dict[str, list[tuple[float, float, float]]] = {}
        with node.client(timeout_s=120) as client:
            client.submit("matmul", np.eye(2), np.eye(2), placement=args.placement)  # warm
            for _ in range(args.rounds):
                for t in args.threads:
                    run = functools.partial(run_threads, client, t, args.seconds, args.placement)
                    rows.setdefault(f"{t} thread(s)", []).append(measured(run, node.pid))
                if args.futures:
                    run = functools.partial(run_map, client, args.seconds, args.placement, args.in_flight)
                    rows.setdefault(f"map, {args.in_flight} in flight", []).append(measured(run, node.pid))
    base = statistics.median(r[0] for r in next(iter(rows.values())))
    print(f"tiny matmul 4x4, placement {args.placement}, {args.seconds:g} s x {args.rounds} rounds")
    print(f"{'callers':<22} {'tasks/s':>8} {'min':>8} {'max':>8} {'x 1st':>6} {'client ms':>10} {'node ms':>8}")
    for name, values in rows.items():
        rates = [r[0] for r in values]
        med = statistics.median(rates)
        client_ms, node_ms = (statistics.median(r[i] for r in values) for i in (1, 2))
        print(
            f"{name:<22} {med:8.0f} {min(rates):8.0f} {max(rates):8.0f} {med / base:6.2f} "
            f"{client_ms:10.3f} {node_ms:8.3f}"
        )
    print("client ms / node ms: median CPU milliseconds per task in this process / in the node")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

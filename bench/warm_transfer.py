#!/usr/bin/env python3
"""A fresh process's first 64 MiB transfer through `pangea.Client` against its later ones.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/warm_transfer.py                      # 3 fresh clients, 64 MiB, 5 rounds each
    .build/venv/bin/python bench/warm_transfer.py --clients 5 --mib 256 --array-first

What runs. One `pangea.pyz serve` on 127.0.0.1 (ports 0, a home of its own in a
temporary directory, stopped at the end). Then, one after the other, ``--clients``
fresh child processes of this script each make a `pangea.Client` of that node (the
shared-memory path: the node's bulk socket, found in the same home), build a float64
operand of ``--mib`` MiB (before the Client with ``--array-first``), and time their
first and next ``--rounds`` round trips of `scale` (factor 1: the output is as large
as the operand) with placement local. MB/s each way is the array's bytes over half of
(the call's wall time minus the node's compute time), as bench/client_shm.py counts it.
The table gives, per client, the first round's MB/s, the median of the later rounds
(steady) and first/steady; the first client also meets a fresh node. Every result is
checked. Nothing is installed; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CHILD_TIMEOUT_S = 300.0


def child(rpc: str, mib: int, rounds: int, array_first: bool) -> int:
    """In a fresh process: one Client, its first and next ``rounds`` round trips; one JSON line."""
    import numpy as np

    import pangea

    def operand() -> np.ndarray:
        return np.random.default_rng(0).standard_normal((mib << 20) // 8)

    a = operand() if array_first else None
    with pangea.Client(rpc, timeout_s=CHILD_TIMEOUT_S) as client:
        if not client.shared_memory:
            raise SystemExit(f"bench: no shared-memory path ({client.shared_memory_note})")
        if a is None:
            a = operand()
        crossings, walls = [], []
        for _ in range(1 + rounds):
            started = time.perf_counter()
            out = client.submit("scale", a, factor=1.0, placement="local")
            wall = time.perf_counter() - started
            task = client.last_task
            if out.shape != a.shape or not np.array_equal(out[::4099], a[::4099]):
                raise SystemExit("bench: a wrong result")
            if not task["arrays_via"].startswith("shared memory"):
                raise SystemExit(f"bench: the arrays went by {task['arrays_via']}")
            del out
            crossings.append(wall - task["timings"]["compute_s"])
            walls.append(wall)
    print(json.dumps({"nbytes": int(a.nbytes), "crossings": crossings, "walls": walls}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyz", default=str(REPO / "pangea.pyz"))
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds after the first, per client")
    parser.add_argument("--clients", type=int, default=3, help="fresh client processes, one after the other")
    parser.add_argument("--array-first", action="store_true", help="build the operand before the Client")
    parser.add_argument("--child", metavar="RPC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.mib, args.rounds, args.array_first)

    import nodes

    results = []
    with (
        tempfile.TemporaryDirectory(prefix="pangea-bench-") as tmp,
        nodes.serving(Path(args.pyz), Path(tmp), "serve") as node,
    ):
        env = node.client_env()  # the Client finds the token and bulk socket in the node's home
        cmd = [sys.executable, __file__, "--child", node.rpc, "--mib", str(args.mib), "--rounds", str(args.rounds)]
        cmd += ["--array-first"] if args.array_first else []
        for _ in range(args.clients):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            if done.returncode != 0:
                raise SystemExit(f"bench: a client failed:\n{done.stderr[-2000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    order = "operand built before the Client" if args.array_first else "Client made, then the operand built"
    print(f"{args.mib} MiB float64 scale there and back, placement local, shared memory; {order}")
    heads = ("first MB/s", "steady MB/s", "min-max", "first/steady", "first wall s")
    print(f"{'client':<8} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, (10, 11, 11, 12, 12), strict=True)))
    ratios = []
    for i, r in enumerate(results, 1):
        rates = [r["nbytes"] * 2 / s / 1e6 for s in r["crossings"]]
        first, steady = rates[0], statistics.median(rates[1:])
        ratios.append(first / steady)
        spread = f"{min(rates[1:]):.0f}-{max(rates[1:]):.0f}"
        note = " (fresh node)" if i == 1 else ""
        print(f"{i:<8} {first:10.0f} {steady:11.0f} {spread:>11} {first / steady:12.2f} {r['walls'][0]:12.3f}{note}")
    print(f"first/steady, median over the clients: {statistics.median(ratios):.2f} (target >= 0.8)")
    print("MB/s each way: the bytes of one array over half the crossing (wall minus the node's compute)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""64 MiB there and back through `pangea.Client` on one box: shared memory against RPC messages.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/client_shm.py                    # 64 MiB, 5 rounds
    .build/venv/bin/python bench/client_shm.py --mib 256 --rounds 7

What runs. One `pangea.pyz serve` on 127.0.0.1 (ports 0, a home of its own in a
temporary directory, stopped at the end) and, in this process, two Clients of it: one
that takes the shared-memory path (the node's bulk socket, found in its home) and one
with ``shared_memory=False`` (the arrays inside the Cap'n Proto messages). Each round
runs, interleaved, `scale` (factor 1: the output is as large as the operand) with
placement local through each Client, and a local numpy copy of the same array as the
baseline. MB/s each way is the array's bytes over half of (the call's wall time minus
the node's compute time), so it counts only the crossing: operand in, result out. The
table gives the median over the rounds with min and max. Every result is checked.
Nothing is installed; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import nodes  # noqa: E402
import pangea  # noqa: E402


def crossing(client: pangea.Client, a: np.ndarray) -> tuple[float, float, str]:
    """One round trip: (seconds of the crossing, wall seconds, how the arrays went)."""
    started = time.perf_counter()
    out = client.submit("scale", a, factor=1.0, placement="local")
    wall = time.perf_counter() - started
    task = client.last_task
    if out.shape != a.shape or not np.array_equal(out[::4099], a[::4099]):
        raise SystemExit("bench: a wrong result")
    return wall - task["timings"]["compute_s"], wall, task["arrays_via"]


def numpy_copy(a: np.ndarray) -> float:
    """Seconds of one local copy of ``a`` (into fresh memory, as a result is)."""
    started = time.perf_counter()
    b = a.copy()
    elapsed = time.perf_counter() - started
    del b
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyz", default=str(REPO / "pangea.pyz"))
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    a = np.random.default_rng(0).standard_normal((args.mib << 20) // 8)
    rows: dict[str, list[float]] = {"shared memory": [], "RPC messages": [], "numpy copy": []}
    walls: dict[str, list[float]] = {"shared memory": [], "RPC messages": []}
    with (
        tempfile.TemporaryDirectory(prefix="pangea-bench-") as tmp,
        nodes.serving(Path(args.pyz), Path(tmp), "serve") as node,
    ):
        # the Client finds the token and bulk socket in the node's home
        with node.client(timeout_s=300) as fast, node.client(timeout_s=300, shared_memory=False) as rpc_only:
            if not fast.shared_memory:
                raise SystemExit(f"bench: no shared-memory path ({fast.shared_memory_note})")
            for client in (fast, rpc_only):
                crossing(client, a)  # warm: the first call of each path is not measured
            for _ in range(args.rounds):
                for name, client in (("shared memory", fast), ("RPC messages", rpc_only)):
                    seconds, wall, via = crossing(client, a)
                    if not via.startswith(name):
                        raise SystemExit(f"bench: the {name} client's arrays went by {via}")
                    rows[name].append(seconds)
                    walls[name].append(wall)
                rows["numpy copy"].append(numpy_copy(a) * 2)  # there and back: two copies
    print(f"{args.mib} MiB float64 there and back, placement local, median of {args.rounds} (min-max), interleaved")
    print(f"{'path':<16} {'MB/s each way':>14} {'min':>7} {'max':>7} {'crossing s':>11} {'wall s':>7}")
    for name, values in rows.items():
        rates = [a.nbytes * 2 / s / 1e6 for s in values]
        wall_text = f"{statistics.median(walls[name]):7.3f}" if name in walls else f"{'':>7}"
        print(
            f"{name:<16} {statistics.median(rates):14.0f} {min(rates):7.0f} {max(rates):7.0f} "
            f"{statistics.median(values):11.3f} {wall_text}"
        )
    print("MB/s each way: the bytes of one array over half the crossing (wall minus the node's compute)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

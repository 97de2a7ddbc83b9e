#!/usr/bin/env python3
"""Benchmark: a split matmul over 1, 2 and 4 `serve` workers against local numpy, in one run.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/workers.py                  # --size 2048, workers 1,2,4, b held and not
    .build/venv/bin/python bench/workers.py --size 1024 --reps 3 --json out.json
    .build/venv/bin/python bench/workers.py --workers 4 --split-hold on,off

Other options: --workers 1,2,4 (the worker counts), --pyz PATH (default <repo>/pangea.pyz),
--reps N (timed jobs per worker count; the table shows the median).

What runs, all on 127.0.0.1: four ``pangea.pyz serve`` workers (each trusting the
submitting node's peer id, from ``pangea.pyz id``) stay up for the whole run; for
each worker count k a submitting ``serve`` node A starts with ``--peer`` the first k
workers, and this process, through `pangea.Client`, first runs a small warm-up
split (so the workers' speeds are measured ones), then ``--reps`` jobs of
``matmul`` size x size with placement ``split-remote`` (row blocks over the
workers only, A computes nothing). Between jobs the same product is timed with
plain numpy ``a @ b`` in this process: the local baseline, measured in the same
run so drift of the machine hits both alike. Each job's ``last_task["attempts"]``
gives, per worker, ``ok: R rows in B blocks, busy X%``: the rows it computed and
the fraction of the job's wall time it spent computing them. "MiB moved" is what
A's own byte counters (its `status` bytes in and out, over every session) saw
during the median job. Each worker count runs twice, A started with
``--split-hold on`` (b crosses to each worker once, held there for the job) and
with ``--split-hold off`` (every block carries all of b), so the two are compared
in the same run.

Every process started here is stopped in a ``finally`` (SIGTERM, then SIGKILL, by
its own process group); every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import numpy as np  # noqa: E402
from helpers import NodeHome  # noqa: E402

import nodes  # noqa: E402
import pangea  # noqa: E402

CLIENT_TIMEOUT_S = 900.0  # one split job
SHARE = re.compile(r"^ok: (\d+) rows in (\d+) blocks, busy (\d+)%$")


def shares(task: dict[str, Any]) -> dict[str, dict[str, int]]:
    out = {}
    for attempt in task["attempts"]:
        match = SHARE.match(attempt["outcome"])
        if match is None:
            raise SystemExit(f"unexpected attempt in a split job: {attempt}")
        rows, blocks, busy = (int(g) for g in match.groups())
        out[attempt["worker"]] = {"rows": rows, "blocks": blocks, "busy_pct": busy}
    return out


def run_count(
    pyz: Path, home_a: NodeHome, workers: Sequence[nodes.Node], size: int, reps: int, rng: Any, hold: str = "on"
) -> dict[str, Any]:
    """Start A with --peer the given workers, warm up, time `reps` split jobs and local numpy."""
    a_node = nodes.with_peers(pyz, home_a, workers, "--split-hold", hold, name="serve-A")
    with nodes.stopping([a_node]) as (a,):
        jobs: list[dict[str, Any]] = []
        local_s: list[float] = []
        with a.client(timeout_s=CLIENT_TIMEOUT_S) as node:  # the token in the node's home
            warm = rng.standard_normal((512, 512))
            node.submit("matmul", warm, warm, placement="split-remote")
            for _ in range(reps):
                x, y = rng.standard_normal((size, size)), rng.standard_normal((size, size))
                start = time.perf_counter()
                expected = x @ y
                local_s.append(time.perf_counter() - start)
                before = node.status()
                start = time.perf_counter()
                got = node.submit("matmul", x, y, placement="split-remote")
                seconds = time.perf_counter() - start
                after = node.status()
                if not np.allclose(got, expected):
                    raise SystemExit(f"the split result differs from a @ b with {len(workers)} worker(s)")
                moved = after["bytes_in"] + after["bytes_out"] - before["bytes_in"] - before["bytes_out"]
                jobs.append({"seconds": seconds, "shares": shares(node.last_task), "bytes_moved": moved})
    best = sorted(jobs, key=lambda j: j["seconds"])[len(jobs) // 2]  # the median job (the upper one of an even count)
    moved = best["bytes_moved"]
    ids = [w.peer_id for w in workers]
    return {
        "workers": len(workers),
        "split_hold": hold,
        "split_s": statistics.median(j["seconds"] for j in jobs),
        "local_s": statistics.median(local_s),
        "jobs": jobs,
        "median_job_bytes_moved": moved,
        "median_job_shares": {
            ("local" if w == "local" else f"w{ids.index(w) + 1}" if w in ids else w): s
            for w, s in best["shares"].items()
        },
    }


def table(results: list[dict[str, Any]], size: int) -> str:
    flops = 2.0 * size**3
    rows = []
    for r in results:
        per = r["median_job_shares"]
        rows.append(
            (
                r["workers"],
                r["split_hold"],
                f"{r['split_s']:.2f}",
                f"{r['local_s']:.2f}",
                f"{r['split_s'] / r['local_s']:.1f}x",
                f"{flops / r['split_s'] / 1e9:.1f}",
                f"{r['median_job_bytes_moved'] / 2**20:.0f}",
                ", ".join(f"{w} {s['rows']}" for w, s in sorted(per.items())),
                ", ".join(f"{w} {s['busy_pct']}%" for w, s in sorted(per.items())),
            )
        )
    headers = ["workers", "b held", "split-remote s", "local numpy s", "split/local", "GFLOP/s", "MiB moved"]
    headers += ["rows", "busy"]
    return pangea.format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="n of the n x n matmul (default 2048)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run (default 1,2,4)")
    parser.add_argument("--reps", type=int, default=2, help="timed jobs per worker count (default 2)")
    parser.add_argument("--split-hold", default="on,off", help="A's --split-hold settings to run (default on,off)")
    parser.add_argument("--pyz", type=Path, default=REPO_ROOT / "pangea.pyz", help="the pangea.pyz to run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.workers.split(",")})
    if not args.pyz.is_file():
        raise SystemExit(f"no pangea.pyz at {args.pyz}: run ./build.sh first")
    if not counts or counts[0] < 1 or args.size < 2 or args.reps < 1:
        raise SystemExit("--workers needs counts >= 1, --size >= 2, --reps >= 1")

    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="pangea-bench-workers-") as tmp:
        base = Path(tmp)
        home_a = nodes.node_home(base, "a")
        a_id = nodes.peer_id_of(args.pyz, home_a)
        homes = [nodes.node_home(base, f"w{i + 1}") for i in range(counts[-1])]
        procs = [nodes.launch(args.pyz, h, "--allow-peer", a_id, name=f"serve-w{i + 1}") for i, h in enumerate(homes)]
        try:
            workers = [nodes.ready(p, h) for p, h in zip(procs, homes, strict=True)]
            holds = [h for h in args.split_hold.split(",") if h in ("on", "off")] or ["on"]
            for k in counts:
                for hold in holds:
                    what = f"{k} worker(s), b held {hold}, {args.size}x{args.size}, {args.reps} job(s)"
                    print(f"bench/workers.py: {what}...", flush=True)
                    results.append(run_count(args.pyz, home_a, workers[:k], args.size, args.reps, rng, hold))
        finally:
            for proc in reversed(procs):
                proc.stop()

    print()
    print(table(results, args.size))
    doc = {
        "size": args.size,
        "reps": args.reps,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "results": results,
    }
    print(json.dumps(doc))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

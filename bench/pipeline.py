#!/usr/bin/env python3
"""A ten-step pipeline from a Client on another box over a 1 Gbit/s link: remote arrays against arrays that travel.

Usage (as root, from the repo root, after ./build.sh):

    .build/venv/bin/python bench/pipeline.py                   # n = 4096, 1 Gbit/s, 2 rounds
    .build/venv/bin/python bench/pipeline.py --n 2048 --rate-mbit 1000 --rounds 3 --json pipeline.json

What runs. Two network namespaces joined by a veth pair stand for two boxes (made by
this script, removed at the end), with a token bucket (`tc qdisc ... tbf`) on both
ends limiting each direction to --rate-mbit. In namespace a, `pangea.pyz serve` with
its RPC on the veth address (TLS, a token file); in namespace b, the pyz's own
interpreter runs a driver with a `pangea.Client` of it (its arrays on the bulk
channel over TLS). The same ten steps on the same seeded n x n float64 matrix run,
interleaved, two ways:

- arrays that travel: each step is `submit` with numpy operands, its result comes back;
- remote arrays: `put` once, each step `submit(..., keep=True)` on the handles (the
  results stay on the node), one `get` of the last result.

The steps: scale (normalize), matmul, add, multiply (element-wise), transpose, matmul,
subtract, scale, matmul, sum over axis 0. "MB moved" is what the veth in namespace b
counted both ways (/sys/class/net/<dev>/statistics) during the pipeline; every result
is checked against numpy's in the driver. Every wait has a timeout; nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import NetnsPair, make_node_home  # noqa: E402

RPC_PORT = 7780

# Runs in namespace b with the pyz's interpreter: one JSON line of figures.
DRIVER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import pangea
rpc, token, fingerprint, dev = sys.argv[1:5]
n, rounds = int(sys.argv[5]), int(sys.argv[6])

def counted():
    stats = Path(f"/sys/class/net/{dev}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())

def pipeline(op, x):
    y = op("scale", x, factor=1.0 / n)      # 1 normalize
    z = op("matmul", y, y)                  # 2
    z = op("add", z, y)                     # 3
    w = op("multiply", z, z)                # 4 element-wise
    t = op("transpose", w)                  # 5
    u = op("matmul", t, y)                  # 6
    u = op("subtract", u, z)                # 7
    u = op("scale", u, factor=0.5)          # 8
    v = op("matmul", u, y)                  # 9
    return op("sum", v, axis=0)             # 10

a = np.random.default_rng(7).standard_normal((n, n))
want = pipeline(lambda k, *ops, **p: pangea.run_kernel(k, ops, p)[0], a)
rows = {"arrays travel": [], "remote arrays": []}
with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=1800) as node:
    node.submit("scale", a[:64, :64], factor=1.0)  # warm-up
    for _ in range(rounds):
        for name in rows:
            start_bytes, t0 = counted(), time.perf_counter()
            if name == "arrays travel":
                got = pipeline(lambda k, *ops, **p: node.submit(k, *ops, placement="local", **p), a)
            else:
                x = node.put(a)
                kept = lambda k, *ops, **p: node.submit(k, *ops, placement="local", keep=True, **p)
                got = np.asarray(pipeline(kept, x))
                del x
            wall = time.perf_counter() - t0
            moved = counted() - start_bytes
            if not np.allclose(got, want, rtol=1e-9, atol=1e-9):
                raise SystemExit(f"{name}: the pipeline's result differs from numpy's")
            rows[name].append({"wall_s": wall, "bytes": moved})
    held = node.status()["held_bytes"]
print(json.dumps({"rows": rows, "held_after": held}))
"""


def main() -> int:
    """Run the comparison and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyz", type=Path, default=REPO / "pangea.pyz")
    parser.add_argument("--n", type=int, default=4096, help="n of the n x n float64 matrix (default 4096)")
    parser.add_argument("--rate-mbit", type=int, default=1000, help="the link's rate each way (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both pipelines (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: network namespaces need root")
    if not args.pyz.is_file():
        raise SystemExit(f"no pangea.pyz at {args.pyz}: run ./build.sh first")
    with tempfile.TemporaryDirectory() as tmp, NetnsPair() as pair:
        for which in ("a", "b"):  # NOTE: burst must hold a 64 KiB GSO packet and a few ms at the rate
            tc = ["ip", "netns", "exec", pair.ns(which), "tc", "qdisc", "add", "dev", pair.IFACE, "root", "tbf"]
            subprocess.run([*tc, "rate", f"{args.rate_mbit}mbit", "burst", "1mb", "latency", "20ms"], check=True)
        base = Path(tmp)
        home_a, home_b = make_node_home(base, "a"), make_node_home(base, "b")
        token = secrets.token_hex(16)
        token_file = base / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        (base / "driver.py").write_text(DRIVER)
        rpc = f"{pair.addr_a}:{RPC_PORT}"
        cmd = [args.pyz, "serve", "--host", pair.addr_a, "--port", "0", "--rpc", rpc, "--rpc-token-file", token_file]
        cmd += ["--memory-budget-mib", str(max(4096, 24 * args.n * args.n * 8 >> 20))]
        with pair.proc("a", cmd, env=home_a.env, name="serve@a") as serve:
            serve.wait_for_line(r"^pangea: serving on ", timeout=120, stream="stdout")
            fingerprint = serve.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
            driver = [args.pyz, base / "driver.py", rpc, token, fingerprint, pair.IFACE, str(args.n), str(args.rounds)]
            env = dict(home_b.env, SHIV_INTERPRETER="1")
            result = pair.run("b", driver, env=env, timeout=3600, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench: the driver failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    rows = figures["rows"]
    med = {
        k: (statistics.median(r["wall_s"] for r in v), statistics.median(r["bytes"] for r in v))
        for k, v in rows.items()
    }
    print(f"ten steps on a {args.n}x{args.n} float64 matrix, Client on another box, {args.rate_mbit} Mbit/s each way,")
    print(f"{args.rounds} round(s), medians")
    print(f"{'pipeline':<16} {'wall s':>8} {'MB moved':>10}")
    for name, (wall, moved) in med.items():
        print(f"{name:<16} {wall:>8.2f} {moved / 1e6:>10.0f}")
    (t_wall, t_bytes), (r_wall, r_bytes) = med["arrays travel"], med["remote arrays"]
    print(f"remote / travel: wall {r_wall / t_wall:.2f}x, bytes {r_bytes / t_bytes:.3f}x")
    print(f"held on the node afterwards: {figures['held_after']} bytes")
    if args.json is not None:
        args.json.write_text(json.dumps({"n": args.n, "rate_mbit": args.rate_mbit, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

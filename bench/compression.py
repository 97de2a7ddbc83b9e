#!/usr/bin/env python3
"""Benchmark of compression on slow links: arrays packed (blosc-lz4) against the same arrays raw.

Usage (root; from the repo root, after ./build.sh):

    .build/venv/bin/python bench/compression.py                      # 100 Mbit/s, 1 Gbit/s and loopback
    .build/venv/bin/python bench/compression.py --rates 100 --mib 64 --reps 1 --json compression.json

What runs. For each link: two network namespaces joined by a veth with a token bucket
(`tc qdisc ... tbf`) of the rate on both ends (bench/link.py's Link), or, for `0`,
loopback in this namespace. A pangea node serves in one; in the other a client node
dials it twice, once with compression off (its Hello lists no codec: both sides send
raw) and once on, alternating per repetition so drift hits both. After one warm-up
transfer (the session measures its link), each kind of array goes to the worker as
the operand of `sum` (the result is checked), and the time minus the worker's compute
is the transfer's: 256 MiB of int32 in [0, 100), a smooth float64 field, a matrix of
95% zeros, and random float64 (which never compresses: it must cost nothing).

Targets: a compressible array >= 3x faster packed than raw at 100 Mbit/s; random
float64 never more than 5% slower with compression on (loopback, 100 Mbit/s, 1 Gbit/s).
Namespaces are named after this process's pid and always removed; every wait is bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as core  # noqa: E402  the shared helpers of bench/bench.py
from link import Link  # noqa: E402

MIB = 1 << 20
KINDS = ("int32 in [0, 100)", "smooth float64 field", "95% zeros", "random float64")


def make_array(kind: str, mib: int) -> Any:
    """``mib`` MiB of one kind of array (the same bytes every time)."""
    import numpy as np

    rng = np.random.default_rng(5)
    n = mib * MIB // 8
    if kind == KINDS[0]:
        return rng.integers(0, 100, 2 * n).astype(np.int32)
    if kind == KINDS[1]:
        side = int(n**0.5)
        x = np.linspace(0.0, 4.0, side)
        return np.round(np.sin(x)[:, None] * np.cos(x)[None, :], 6)  # a field stored to 6 digits, as measured
    if kind == KINDS[2]:
        a = np.zeros(n)
        hits = rng.choice(n, n // 20, replace=False)
        a[hits] = rng.standard_normal(hits.size)
        return a
    return rng.standard_normal(n)


def peer_main(bind: str) -> int:
    """The worker: a pangea node serving every peer; one JSON ready line."""
    import trio

    core.exit_when_stdin_closes()

    async def serve() -> None:
        pangea = core.import_pangea()
        node = core.pangea_node(pangea, "bench-worker", serve=True)
        async with node.running(bind, 0):
            print(json.dumps({"pangea": node.addresses[0]}), flush=True)
            await trio.sleep_forever()

    trio.run(serve)
    return 0


def client_main(bind: str, ready: dict[str, Any], mib: int, reps: int) -> int:
    """The client: per repetition, a session with compression off then on; one JSON line of seconds."""
    import numpy as np
    import trio

    arrays = {kind: make_array(kind, mib) for kind in KINDS}
    warm = make_array(KINDS[3], 8)
    out: dict[str, Any] = {mode: {kind: [] for kind in KINDS} for mode in ("off", "on")}
    out["on_wire"] = {}

    async def measure(mode: str) -> None:
        pangea = core.import_pangea()
        node = core.pangea_node(pangea, f"bench-client-{mode}", serve=False)
        node.limits = dataclasses.replace(node.limits, compression=mode == "on")
        async with node.running(bind, 0):
            with trio.fail_after(30):
                session = await node.dial(pangea.parse_peer_address(ready["pangea"]), timeout_s=20)
            out["data_plane"] = session.data_note
            with trio.fail_after(core.bulk_timeout_s(warm.nbytes)):
                await session.request("sum", (warm,))  # the session measures its link
            for kind, a in arrays.items():
                before = session.bytes_out
                with trio.fail_after(4 * core.bulk_timeout_s(a.nbytes)):
                    start = time.perf_counter()
                    result = await session.request("sum", (a,))
                    seconds = time.perf_counter() - start - result.compute_s
                if not result.ok or not np.isclose(result.outputs[0], a.sum()):
                    raise RuntimeError(f"{kind}: {result.error_message or 'the worker sum differs'}")
                out[mode][kind].append(seconds)
                out["on_wire"][f"{mode} {kind}"] = session.bytes_out - before
            await session.close("bench done")

    for _ in range(reps):
        for mode in ("off", "on"):
            trio.run(measure, mode)
    print(json.dumps(out), flush=True)
    return 0


def run_link(rate_mbit: int, mib: int, reps: int) -> dict[str, Any]:
    """One link's figures: in two namespaces with a tbf of ``rate_mbit``, or on loopback (0)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    budget_s = 120 + 3 * reps * len(KINDS) * mib * MIB / ((rate_mbit or 8000) * 1e6 / 8 * 0.5)

    def roles(link: Link | None) -> dict[str, Any]:
        wrap = (lambda ns: ["ip", "netns", "exec", ns]) if link else (lambda ns: [])
        peer_bind, client_bind = (link.ip[1], link.ip[0]) if link else ("127.0.0.1", "127.0.0.1")
        peer_ns, client_ns = (link.ns[1], link.ns[0]) if link else ("", "")
        peer = subprocess.Popen(
            [*wrap(peer_ns), *me, "--role", "peer", "--bind", peer_bind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdout is not None
            line = peer.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"the peer did not start: {line!r}")
            cmd = [*wrap(client_ns), *me, "--role", "client", "--bind", client_bind, "--ready", line.strip()]
            client = subprocess.run(
                [*cmd, "--mib", str(mib), "--reps", str(reps)], capture_output=True, text=True, timeout=budget_s
            )
        finally:
            peer.kill()
            peer.wait(timeout=10)
        if client.returncode:
            raise RuntimeError(client.stderr[-3000:])
        return json.loads(client.stdout.strip().splitlines()[-1])

    if not rate_mbit:
        return roles(None)
    with Link(rate_mbit) as link:
        return roles(link)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100,1000,0", help="links in Mbit/s, 0 for loopback (default 100,1000,0)")
    p.add_argument("--mib", type=int, default=256, help="bytes of each array, MiB (default 256)")
    p.add_argument("--reps", type=int, default=1, help="transfers per kind and mode (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--role", choices=("main", "peer", "client"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--bind", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("PANGEA_MDNS", "off")
    if args.role == "peer":
        return peer_main(args.bind)
    if args.role == "client":
        return client_main(args.bind, json.loads(args.ready), args.mib, args.reps)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    if any(rates) and os.geteuid() != 0:
        print(
            "bench/compression.py needs root for its links (ip netns, tc); --rates 0 runs on loopback", file=sys.stderr
        )
        return 2
    head = ("link", "array", f"raw s ({args.mib} MiB)", "packed s", "speed-up", "MiB on the wire", "target")
    rows, summary = [], {}
    for rate in rates:
        figures = run_link(rate, args.mib, args.reps)
        summary[str(rate)] = figures
        name = f"{rate} Mbit/s" if rate else "loopback"
        for kind in KINDS:
            raw, packed = statistics.median(figures["off"][kind]), statistics.median(figures["on"][kind])
            wire = figures["on_wire"][f"on {kind}"] / MIB
            if kind == KINDS[3]:
                target = "<= 5% slower: " + ("yes" if packed <= 1.05 * raw else "NO")
            elif rate == 100 and kind == KINDS[0]:
                target = ">= 3x: " + ("yes" if raw >= 3 * packed else "NO")
            else:
                target = ""
            rows.append((name, kind, f"{raw:.2f}", f"{packed:.2f}", f"{raw / packed:.2f}x", f"{wire:.0f}", target))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark of bulk transfer over a rate-limited link between two hosts (network namespaces).

Usage (root; from the repo root, after ./build.sh):

    .build/venv/bin/python bench/link.py                  # 1 Gbit/s link, 256 MiB each way, 3 reps
    .build/venv/bin/python bench/link.py --rate-mbit 1000 --mib 256 --reps 3 --json link.json

What runs. Two network namespaces joined by a veth pair, with a token bucket
(`tc qdisc ... tbf rate <R>mbit`) on both ends, so each direction is limited to
R Mbit/s. In one namespace a peer process serves a raw TCP sink/source and a
pangea ``Node``; in the other a client process measures, alternating so drift
hits both:

- raw TCP: a plain socket moving the same bytes (the baseline: what the link
  really carries after TCP/IP headers);
- pangea: ``PeerSession.request`` of ``sum`` (upload) and ``random`` (download)
  on a session dialed across the link (its arrays on the TLS data plane), minus
  the worker's compute time; the result is checked.

The table gives MB/s, the percentage of the nominal link rate (R / 8 MB/s) and
pangea / raw TCP. Target: pangea >= 90% of the link rate. Namespaces are named
after this process's pid and always removed; every wait has a timeout.
"""

from __future__ import annotations

import argparse
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

MIB = 1 << 20
NET = "10.231.{}.{}"  # private addresses, only inside the namespaces this script makes


def run(*cmd: str) -> None:
    """Run a setup command; raise with its stderr when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Link:
    """Two namespaces, a veth pair, and a tbf rate limit on both ends."""

    def __init__(self, rate_mbit: int) -> None:
        tag = os.getpid() % 250 + 1
        self.ns = (f"pgl{os.getpid()}a", f"pgl{os.getpid()}b")
        self.dev = (f"pgl{tag}a", f"pgl{tag}b")
        self.ip = (NET.format(tag, 1), NET.format(tag, 2))
        self.rate_mbit = rate_mbit

    def __enter__(self) -> Link:
        try:
            for ns in self.ns:
                run("ip", "netns", "add", ns)
            run(
                "ip",
                "link",
                "add",
                self.dev[0],
                "netns",
                self.ns[0],
                "type",
                "veth",
                "peer",
                "name",
                self.dev[1],
                "netns",
                self.ns[1],
            )
            for ns, dev, ip in zip(self.ns, self.dev, self.ip, strict=True):
                run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
                # NOTE: burst must hold a 64 KiB GSO packet and a few ms at the rate
                run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", f"{self.rate_mbit}mbit", "burst", "1mb", "latency", "20ms")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ---------------------------------------------------------------- the two roles


def peer_main(bind: str) -> int:
    """In namespace B: raw TCP server and a pangea node serving every peer; one JSON ready line."""
    import socket
    import threading

    import trio

    core.exit_when_stdin_closes()
    server = socket.create_server((bind, 0))
    threading.Thread(target=core.tcp_serve, args=(server,), daemon=True).start()

    async def serve() -> None:
        pangea = core.import_pangea()
        node = core.pangea_node(pangea, "bench-worker", serve=True)
        async with node.running(bind, 0):
            ready = {"tcp_port": server.getsockname()[1], "pangea": node.addresses[0]}
            print(json.dumps(ready), flush=True)
            await trio.sleep_forever()

    trio.run(serve)
    return 0


def client_main(bind: str, ready: dict[str, Any], mib: int, reps: int) -> int:
    """In namespace A: alternate raw TCP and pangea transfers; print one JSON line of seconds."""
    import numpy as np
    import trio

    host = ready["pangea"].split("/")[2]
    data = np.random.default_rng(1).random(mib * MIB // 8)
    view = data.data.cast("B")
    out: dict[str, Any] = {"tcp": {"upload": [], "download": []}, "pangea": {"upload": [], "download": []}}

    async def measure() -> None:
        pangea = core.import_pangea()
        node = core.pangea_node(pangea, "bench-client", serve=False)
        async with node.running(bind, 0):
            with trio.fail_after(30):
                session = await node.dial(pangea.parse_peer_address(ready["pangea"]), timeout_s=20)
            out["data_plane"] = session.data_note
            rows = data.size // 1024
            params = {"rows": float(rows), "cols": 1024.0, "seed": 7.0}
            for _ in range(reps):
                for direction in ("upload", "download"):
                    seconds = await trio.to_thread.run_sync(core.tcp_transfer, ready["tcp_port"], direction, view, host)
                    out["tcp"][direction].append(seconds)
                    with trio.fail_after(core.bulk_timeout_s(data.nbytes)):
                        start = time.perf_counter()
                        if direction == "upload":
                            result = await session.request("sum", (data,))
                        else:
                            result = await session.request("random", (), params)
                        seconds = time.perf_counter() - start - result.compute_s
                    if not result.ok:
                        raise RuntimeError(f"{direction}: {result.error_message}")
                    if direction == "upload" and not np.isclose(result.outputs[0], data.sum()):
                        raise RuntimeError("upload: the worker's sum differs")
                    if direction == "download" and result.outputs[0].nbytes != data.nbytes:
                        raise RuntimeError("download: wrong size")
                    out["pangea"][direction].append(seconds)
            await session.close("bench done")

    trio.run(measure)
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate-mbit", type=int, default=1000, help="tbf rate on each end of the veth (default 1000)")
    p.add_argument("--mib", type=int, default=256, help="bytes per transfer, MiB (default 256)")
    p.add_argument("--reps", type=int, default=3, help="transfers per direction and system (default 3)")
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
    if os.geteuid() != 0:
        print("bench/link.py needs root (ip netns, tc)", file=sys.stderr)
        return 2
    me = [sys.executable, str(Path(__file__).resolve())]
    with Link(args.rate_mbit) as link:
        peer = subprocess.Popen(
            ["ip", "netns", "exec", link.ns[1], *me, "--role", "peer", "--bind", link.ip[1]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdout is not None
            line = peer.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"the peer did not start: {line!r}")
            client = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    link.ns[0],
                    *me,
                    "--role",
                    "client",
                    "--bind",
                    link.ip[0],
                    "--ready",
                    line.strip(),
                    "--mib",
                    str(args.mib),
                    "--reps",
                    str(args.reps),
                ],  # fmt: skip
                capture_output=True,
                text=True,
                timeout=60 + 4 * args.reps * args.mib * MIB / (args.rate_mbit * 1e6 / 8 * 0.5),
            )
        finally:
            peer.kill()
            peer.wait(timeout=10)
    if client.returncode:
        print(client.stderr, file=sys.stderr)
        return 1
    figures = json.loads(client.stdout.strip().splitlines()[-1])
    link_mb_s = args.rate_mbit * 1e6 / 8 / 1e6
    nbytes = args.mib * MIB
    rows = []
    summary: dict[str, Any] = {"rate_mbit": args.rate_mbit, "mib": args.mib, "data_plane": figures["data_plane"]}
    for direction in ("upload", "download"):
        tcp = nbytes / statistics.median(figures["tcp"][direction]) / 1e6
        pg = nbytes / statistics.median(figures["pangea"][direction]) / 1e6
        summary[direction] = {"pangea_mb_s": pg, "tcp_mb_s": tcp, "link_mb_s": link_mb_s, "samples": figures}
        met = "yes" if pg >= 0.9 * link_mb_s else "NO"
        rows.append(
            (
                f"{direction} {args.mib} MiB",
                f"{pg:.1f}",
                f"{100 * pg / link_mb_s:.0f}%",
                f"{tcp:.1f}",
                f"{100 * tcp / link_mb_s:.0f}%",
                f"{pg / tcp:.2f}x",
                met,
            )  # fmt: skip
        )
    head = ("transfer", "pangea MB/s", "of link", "raw TCP MB/s", "of link", "pangea/TCP", ">=90% of link?")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"link: {args.rate_mbit} Mbit/s each way (tbf on a veth between two namespaces) = {link_mb_s:.0f} MB/s")
    print(f"pangea arrays: {figures['data_plane']}")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

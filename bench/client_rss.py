#!/usr/bin/env python3
"""Peak memory of a remote `dot` and `add` of large operands: the Client, node A and worker B.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/client_rss.py                       # 2 x 512 MiB float64
    .build/venv/bin/python bench/client_rss.py --mib 64 --rounds 2   # a quick look

What runs. Two `pangea.pyz serve` nodes on 127.0.0.1 (ports 0, homes of their own in a
temporary directory, stopped at the end): B trusting A, A with ``--peer B``; in this
process a `pangea.Client` of A, from A's home (so it takes the shared-memory path when
it can). For each kernel (`dot`, `add`), placement remote (A delegates to B, no
fallback), with the operands as plain numpy arrays and as arrays of `Client.empty`
(``--client-empty`` runs only those, ``--numpy`` only the others): before each call the
peaks of the three processes are reset (5 written to /proc/PID/clear_refs) and their
VmRSS read; after it, their VmHWM (the client's once it has read the whole result).
The table gives (VmHWM - VmRSS before) / operand bytes for each process: what the
call itself took, beyond what each held already, and the sampled peaks of A's and
B's anonymous and shared (the client's segments) memory.
Every result is checked against numpy's. The box may be shared: read the ratios, which
depend little on other load, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import nodes  # noqa: E402
import pangea  # noqa: E402

READY_TIMEOUT_S = 90.0


@contextlib.contextmanager
def started_pair(pyz: Path, base: Path) -> Iterator[tuple[str, Path, list[int]]]:
    """Serve B (trusting A), then A with --peer B (bench/nodes.py), each with a home under ``base``;
    yield (A's RPC HOST:PORT, A's pangea home, [A's pid, B's pid]) once A lists B as usable."""
    with nodes.pair(pyz, base) as (a, b):
        yield a.rpc, a.home.pangea_home, [a.pid, b.pid]


FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssShmem")
SAMPLE_S = 0.01  # how often the split of RSS (anonymous / shared) is read during a call


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssShmem of a process, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(m.group(1)) if (m := re.search(rf"^{k}:\s+(\d+)", text, re.M)) else 0 for k in FIELDS}


def reset_peaks(pids: list[int]) -> dict[int, dict[str, int]]:
    """Reset each process's VmHWM to its VmRSS; return what /proc says then, by pid."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return {pid: status_kib(pid) for pid in pids}


@contextlib.contextmanager
def sampled(pids: list[int]) -> Iterator[dict[int, dict[str, int]]]:
    """The largest RssAnon and RssShmem of each process, read every SAMPLE_S while the block runs
    (VmHWM gives the peak of their sum, not how it splits: shared pages are the client's segments)."""
    peaks = {pid: status_kib(pid) for pid in pids}
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(SAMPLE_S):
            for pid in pids:
                now = status_kib(pid)
                peaks[pid] = {k: max(v, now[k]) for k, v in peaks[pid].items()}

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join(5)


def operands(client: pangea.Client, n: int, empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 vectors of ``n`` entries: numpy's own, or filled in arrays of client.empty."""
    rng = np.random.default_rng(1)
    if not empty:
        return rng.random(n), rng.random(n)
    a, b = client.empty(n), client.empty(n)
    rng.random(out=a)
    rng.random(out=b)
    return a, b


def checked(kernel: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
    """Whether ``out`` is numpy's answer, read whole, a slice at a time (no temporaries of the operands' size)."""
    if kernel == "dot":
        return bool(np.isclose(out, np.dot(a, b), rtol=1e-9))
    step = 1 << 20
    return all(np.array_equal(out[i : i + step], a[i : i + step] + b[i : i + step]) for i in range(0, a.size, step))


def measure(client: pangea.Client, kernel: str, a: np.ndarray, b: np.ndarray, pids: list[int]) -> dict[str, object]:
    """One remote call, checked: the peak ratios of client, A and B (and of A's and B's shared and
    anonymous parts), its wall seconds, the operands copied and how its arrays went."""
    nbytes = a.nbytes + b.nbytes
    copied = getattr(client, "operands_copied", None)  # NOTE: None: a pangea before Client.empty
    before = reset_peaks(pids)
    started = time.perf_counter()
    try:
        with sampled(pids) as split:
            out = client.submit(kernel, a, b, placement="remote", fallback=False)
    except pangea.PangeaError as exc:
        return {"refused": pangea.one_line(str(exc), 160)}
    wall = time.perf_counter() - started
    peaks = {pid: status_kib(pid)["VmHWM"] for pid in pids}
    if not checked(kernel, a, b, out):
        raise SystemExit(f"bench: a wrong {kernel} result")
    peaks[pids[0]] = status_kib(pids[0])["VmHWM"]  # NOTE: after reading the whole result, as a caller does
    del out
    row: dict[str, object] = {"wall_s": wall, "via": client.last_task["arrays_via"]}
    for name, pid in zip(("client", "A", "B"), pids, strict=True):
        row[name] = (peaks[pid] - before[pid]["VmRSS"]) * 1024 / nbytes
        for part in ("RssAnon", "RssShmem"):
            row[f"{name} {part}"] = (split[pid][part] - before[pid][part]) * 1024 / nbytes
    row["copied"] = None if copied is None else client.operands_copied - copied
    return row


def run_case(
    pyz: Path, mib: int, kernel: str, empty: bool, rounds: int, shm: bool = True
) -> tuple[list[dict[str, object]], str]:
    """Fresh nodes and a fresh Client (nothing warm from another case): ``rounds`` calls; (rows, the
    client's shared-memory note)."""
    n = (mib << 20) // 8
    with tempfile.TemporaryDirectory(prefix="pangea-bench-rss-") as tmp, started_pair(pyz, Path(tmp)) as pair:
        rpc, home_a, node_pids = pair
        os.environ["PANGEA_HOME"] = str(home_a)  # the Client finds the token and the bulk socket there
        with pangea.Client(rpc, timeout_s=900, shared_memory=shm) as client:
            client.submit("add", np.ones(4), np.ones(4), placement="remote", fallback=False)  # B is reachable
            if empty and not hasattr(client, "empty"):
                return [{"refused": "this pangea has no Client.empty"}], client.shared_memory_note
            a, b = operands(client, n, empty)
            pids = [os.getpid(), *node_pids]
            return [measure(client, kernel, a, b, pids) for _ in range(max(1, rounds))], client.shared_memory_note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyz", default=str(REPO / "pangea.pyz"))
    parser.add_argument("--mib", type=int, default=512, help="MiB of each of the two float64 operands")
    parser.add_argument("--rounds", type=int, default=1, help="calls of each case (after the first: warm)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--client-empty", action="store_true", help="only operands made by Client.empty")
    only.add_argument("--numpy", action="store_true", help="only operands that are plain numpy arrays")
    parser.add_argument("--kernels", default="dot,add", help="comma-separated: dot, add")
    parser.add_argument("--no-shm", action="store_true", help="a Client with shared_memory=False (arrays in messages)")
    args = parser.parse_args()
    kinds = [False] if args.numpy else [True] if args.client_empty else [False, True]
    rows: list[tuple[str, str, dict[str, object]]] = []
    note = ""
    for empty in kinds:
        for kernel in args.kernels.split(","):
            results, note = run_case(Path(args.pyz), args.mib, kernel, empty, args.rounds, not args.no_shm)
            rows += [(kernel, "Client.empty" if empty else "numpy", row) for row in results]
    print(f"2 x {args.mib} MiB float64, placement remote (A -> B), fresh nodes per case; client {note}")
    print("peak growth during a call / operand bytes: (VmHWM - VmRSS before) / (2 x operand bytes);")
    print("anon/shm: the peaks of RssAnon and RssShmem (sampled) of the same, shm being the client's segments")
    print(
        f"{'kernel':<7} {'operands':<13} {'client':>6} {'A':>5} {'B':>5} {'A anon':>6} {'A shm':>5} "
        f"{'B anon':>6} {'wall s':>6} {'copied':>6}  arrays"
    )
    for kernel, kind, row in rows:
        if "refused" in row:
            print(f"{kernel:<7} {kind:<13} refused: {row['refused']}")
            continue
        print(
            f"{kernel:<7} {kind:<13} {row['client']:6.2f} {row['A']:5.2f} {row['B']:5.2f} {row['A RssAnon']:6.2f} "
            f"{row['A RssShmem']:5.2f} {row['B RssAnon']:6.2f} {row['wall_s']:6.1f} {row['copied']!s:>6}  {row['via']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

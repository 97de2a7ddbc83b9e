"""pangea's benchmark: its figures next to baselines measured in the same run.

One benchmark system with two front ends:

* ``./pangea.pyz bench`` (between two boxes: ``bench --listen`` on one, ``bench <join>``
  on the other, or ``bench`` alone with a peer spawned on loopback). pangea.py keeps the
  verb's parser and a small ``cmd_bench`` that imports this module only when the verb
  runs; build.sh packs this file into the pyz as the top-level module ``pangea_bench``.
* bench/bench.py, the developer harness (Ray/Dask/raw baselines, RSS, start-up, the
  link phase), which builds on the shared parts here: targets, rows and the table,
  quantiles and summaries, machine info, and the TCP and libp2p transfer loops.

The verb measures the performance targets with each of pangea's figures next to a
baseline measured in the same run, alternating so drift of the machine hits both: a
plain py-libp2p Noise + Yamux stream (the connection `make_host` builds, without
pangea's framing) and a raw TCP socket. Baselines need a peer that serves them:
`bench --listen` registers BENCH_PROTOCOL_ID on its libp2p host, for the paired
benchmarker only, and runs a raw TCP sink/source whose port and one-time token travel
over that authenticated stream. A `serve` node offers neither, so against one only
pangea's own figures are measured, and the table says why. Pure helpers first
(targets, rows, the table), then the transfer loops, the listener and the
benchmarker, then the verb itself.

pangea comes from whoever imports this module: the pyz (``pangea:main``), pangea.py's
``cmd_bench`` (which registers itself as ``pangea`` when it runs as ``__main__``), the
tests (the repo root on sys.path) or bench/bench.py (``import_pangea``). Every pangea
internal used here is imported from that one module, never copied.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pangea import (
    BENCH_DEFAULTS,
    BENCH_MAX_BYTES,
    BENCH_MAX_INFLIGHT,
    BENCH_QUICK,
    DEFAULT_TASK_TIMEOUT_S,
    HANDSHAKE_TIMEOUT_S,
    CheckFailed,
    ErrorKind,
    HelloMsg,
    Limits,
    Manager,
    Node,
    NoPeerError,
    Pairing,
    PangeaError,
    PeerAddress,
    PeerError,
    PeerSession,
    Refusal,
    SessionDir,
    TaskError,
    UsageError,
    __version__,
    capacity,
    describe_exception,
    describe_sessions,
    format_bytes,
    format_pairing_code,
    format_seconds,
    format_table,
    join_string,
    key_peer_id,
    live_sessions,
    load_or_create_identity,
    log,
    new_pairing_code,
    node_session,
    normalize_pairing_code,
    pangea_home,
    parse_peer_address,
    read_psk_file,
    reference_result,
    run_trio,
    self_command,
    setup_logging,
    short_id,
    terminal_columns,
    wrap_text,
)

# ---------------------------------------------------------------- constants
#
# The parser's constants (BENCH_DEFAULTS, BENCH_QUICK, BENCH_MAX_INFLIGHT, BENCH_MAX_BYTES)
# live in pangea.py's Constants, so that `--help` needs no import of this module.

BENCH_PROTOCOL_ID = "/pangea/bench/1.0.0"
# One command per baseline stream or raw TCP connection: op, then a byte count.
# Ops: U (client uploads N bytes, the peer answers with the count it got),
# D (the peer sends N bytes), E (echo N-byte messages until EOF), T (offer raw TCP).
BENCH_COMMAND = struct.Struct("!cQ")
BENCH_TCP_OFFER = struct.Struct("!H16s")  # raw TCP port (0: not offered), one-time token
BENCH_IO_CHUNK_BYTES = 1 << 20  # baselines write and read 1 MiB at a time, as in the tech notes' table
BENCH_ECHO_BYTES = 64  # the "small message" of the bare request/response baseline
BENCH_MAX_ECHO_BYTES = 4096
BENCH_MAX_ECHOES = 1_000_000  # echoes on one stream: far above any run, but a bound
# An echo stream waits while pangea's tasks take their turn (a round of --tasks 100000 takes
# minutes); a benchmarker that vanished closes the connection, which ends the wait at once.
BENCH_ECHO_IDLE_S = DEFAULT_TASK_TIMEOUT_S
BENCH_MIN_RATE_BYTES_S = 10e6  # a transfer slower than this fails by timeout instead of hanging
BENCH_TOKEN_WAIT_S = 5.0  # a raw TCP connection must present its token within this
BENCH_ROUNDS = 4  # the tiny-task measurements alternate with the echo baseline in this many rounds


def bench_timeout_s(nbytes: int) -> float:
    """Return the time allowed for one transfer of ``nbytes`` (or one task carrying them)."""
    return 30.0 + nbytes / BENCH_MIN_RATE_BYTES_S


def percentile(samples: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) of samples by the nearest rank."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def rate_summary(nbytes: int, seconds: Sequence[float]) -> dict[str, Any]:
    """Return the median MB/s of transfers of ``nbytes`` taking ``seconds``, with the samples."""
    return {
        "bytes": nbytes,
        "seconds": list(seconds),
        "mb_s": nbytes / max(percentile(seconds, 0.5), 1e-9) / 1e6,
        "mb_s_samples": [nbytes / max(s, 1e-9) / 1e6 for s in seconds],
    }


def latency_summary(samples: Sequence[float], wall_s: float) -> dict[str, Any]:
    """Return p50/p90/p99 round trips in ms and the rate (samples per second of ``wall_s``)."""
    return {
        "count": len(samples),
        "p50_ms": percentile(samples, 0.5) * 1000,
        "p90_ms": percentile(samples, 0.9) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        "per_s": len(samples) / max(wall_s, 1e-9),
        "wall_s": wall_s,
    }


@dataclass(frozen=True)
class BenchTarget:
    """A performance target: bounds on pangea's value and on its ratio to the baseline."""

    text: str
    min_value: float | None = None
    max_value: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """True when every bound holds, False when one fails, None when one is unknown (or no bounds)."""
        checks: list[bool | None] = []
        for got, low, high in ((value, self.min_value, self.max_value), (ratio, self.min_ratio, self.max_ratio)):
            if low is not None:
                checks.append(None if got is None else got >= low)
            if high is not None:
                checks.append(None if got is None else got <= high)
        if False in checks:
            return False
        if not checks or None in checks:
            return None
        return True


BULK_TARGET = BenchTarget(">= 4x and >= 1000 MB/s", min_value=1000.0, min_ratio=4.0)
LATENCY_TARGET = BenchTarget("<= 1.2x", max_ratio=1.2)
RATE_TARGET = BenchTarget(">= 1000/s", min_value=1000.0)
OVERHEAD_TARGET = BenchTarget("<= 0.1 s", max_value=0.1)
INFO_TARGET = BenchTarget("info")


@dataclass
class BenchRow:
    """One line of the bench table; ``ratio`` is pangea / baseline (fields as in bench/bench.py's rows)."""

    key: str  # the metric's name in the JSON
    metric: str
    unit: str
    pangea: float | None
    baseline: float | None
    baseline_name: str
    target: str
    ratio: float | None = None
    met: bool | None = None


def bench_row(
    key: str,
    metric: str,
    unit: str,
    pangea: float | None,
    baseline: float | None,
    baseline_name: str,
    target: BenchTarget,
) -> BenchRow:
    """Return a row with its ratio and whether the target is met (None when that is unknown)."""
    ratio = pangea / baseline if pangea is not None and baseline else None
    return BenchRow(key, metric, unit, pangea, baseline, baseline_name, target.text, ratio, target.met(pangea, ratio))


def _dig(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _size_text(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def bench_rows(results: dict[str, Any]) -> list[BenchRow]:
    """Turn a bench run's results into the table rows, with their performance targets."""
    rows: list[BenchRow] = []
    bulk = results.get("bulk", {})
    for mib in results.get("config", {}).get("sizes_mib", []):
        for direction in ("upload", "download"):
            key = f"{direction}_{mib}"
            ours = _dig(bulk, "pangea", key, "mb_s")
            label = f"bulk {direction} {_size_text(mib)}"
            rows.append(bench_row(f"bulk_{key}", label, "MB/s", ours, _dig(bulk, "libp2p", key, "mb_s"),
                                  "libp2p stream", BULK_TARGET))  # fmt: skip
            tcp = _dig(bulk, "tcp", key, "mb_s")
            if tcp is not None:
                rows.append(bench_row(f"bulk_{key}_vs_tcp", "  vs raw TCP", "MB/s", ours, tcp, "raw TCP", INFO_TARGET))
    tasks = results.get("tasks", {})
    inflight = results.get("config", {}).get("inflight", 8)
    if tasks:
        rows += [
            bench_row("task_p50", "tiny task p50", "ms", _dig(tasks, "pangea_sequential", "p50_ms"),
                      _dig(tasks, "echo_sequential", "p50_ms"), "echo p50", LATENCY_TARGET),
            bench_row("tasks_per_s", "tasks/s sequential", "1/s", _dig(tasks, "pangea_sequential", "per_s"),
                      _dig(tasks, "echo_sequential", "per_s"), "echoes/s", RATE_TARGET),
            bench_row("tasks_per_s_inflight", f"tasks/s {inflight} in flight", "1/s",
                      _dig(tasks, "pangea_inflight", "per_s"), _dig(tasks, "echo_inflight", "per_s"),
                      f"echoes/s, {inflight} streams", RATE_TARGET),
        ]  # fmt: skip
    matmul = results.get("matmul", {})
    if matmul:
        n = matmul.get("n")
        rows.append(bench_row("matmul_overhead", f"matmul {n}x{n} overhead", "s", matmul.get("overhead_s"),
                              matmul.get("libp2p_s"), "libp2p, same bytes", OVERHEAD_TARGET))  # fmt: skip
    return rows


def format_bench_value(value: float | None, unit: str) -> str:
    """Return a figure with its unit, to a precision that reads well (``-`` when missing)."""
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "1/s":
        return f"{value:.0f}/s"
    number = f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{number} {unit}"


def format_bench_table(rows: Sequence[BenchRow], width: int | None = None) -> str:
    """Return the bench rows as an aligned table: metric, pangea, baseline, ratio, target, met
    (within ``width`` columns when given)."""
    body = [
        (
            row.metric,
            format_bench_value(row.pangea, row.unit),
            "-" if row.baseline is None else f"{format_bench_value(row.baseline, row.unit)} ({row.baseline_name})",
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            row.target,
            {True: "yes", False: "no", None: "-"}[row.met],
        )
        for row in rows
    ]
    return format_table(("metric", "pangea", "baseline", "ratio", "target", "met"), body, width)


def bench_machine_info() -> dict[str, Any]:
    """Return what the figures depend on: cores, CPU, memory, Python, numpy, pangea, BLAS settings."""
    import numpy as np

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    memory = 0.0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return {
        **capacity(),
        "cpu_model": cpu,
        "memory_gib": round(memory, 1),
        "python": sys.version.split()[0],
        "platform": f"{sys.implementation.cache_tag} {platform.machine()} {platform.system()}",
        "numpy": np.__version__,
        "pangea": __version__,
        "env": {
            k: os.environ[k]
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE")
            if k in os.environ
        },
    }


# ------------------------------------------------ transfer loops (the verb's and bench/bench.py's)


async def stream_read_into(stream: Any, view: memoryview) -> None:
    """Fill ``view`` from a libp2p stream with read(1 MiB) calls (not read_exactly: see the tech notes)."""
    got = 0
    while got < len(view):
        chunk = await stream.read(min(len(view) - got, BENCH_IO_CHUNK_BYTES))
        view[got : got + len(chunk)] = chunk
        got += len(chunk)


async def stream_read_exactly(stream: Any, nbytes: int) -> bytearray:
    """Return exactly ``nbytes`` read from a libp2p stream."""
    buf = bytearray(nbytes)
    await stream_read_into(stream, memoryview(buf))
    return buf


async def stream_write_all(stream: Any, view: memoryview) -> None:
    """Write ``view`` to a libp2p stream in BENCH_IO_CHUNK_BYTES pieces."""
    for at in range(0, len(view), BENCH_IO_CHUNK_BYTES):
        await stream.write(view[at : at + BENCH_IO_CHUNK_BYTES])


async def stream_send_filler(stream: Any, nbytes: int) -> None:
    """Write ``nbytes`` of filler to a libp2p stream in BENCH_IO_CHUNK_BYTES pieces."""
    chunk = memoryview(os.urandom(BENCH_IO_CHUNK_BYTES))
    for start in range(0, nbytes, BENCH_IO_CHUNK_BYTES):
        await stream.write(chunk[: min(BENCH_IO_CHUNK_BYTES, nbytes - start)])


def recv_into_all(conn: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from a blocking socket; EOFError when the peer closes first."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:], min(len(view) - got, BENCH_IO_CHUNK_BYTES))
        if n == 0:
            raise EOFError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def send_all(conn: socket.socket, view: memoryview) -> None:
    """Send ``view`` on a blocking socket in BENCH_IO_CHUNK_BYTES pieces."""
    for at in range(0, len(view), BENCH_IO_CHUNK_BYTES):
        conn.sendall(view[at : at + BENCH_IO_CHUNK_BYTES])


def send_filler(conn: socket.socket, nbytes: int) -> None:
    """Send ``nbytes`` of filler on a blocking socket in BENCH_IO_CHUNK_BYTES pieces."""
    chunk = memoryview(os.urandom(BENCH_IO_CHUNK_BYTES))
    for start in range(0, nbytes, BENCH_IO_CHUNK_BYTES):
        conn.sendall(chunk[: min(BENCH_IO_CHUNK_BYTES, nbytes - start)])


# ------------------------------------------------ the listener's side of the baselines


class BenchServer:
    """The baselines a `bench --listen` node serves to its paired benchmarker: the
    BENCH_PROTOCOL_ID stream handler and a raw TCP sink/source on a thread.

    The TCP port is no secret (anyone can scan it), so a connection must first
    send the token given out over the authenticated libp2p stream; every
    transfer is bounded in size (BENCH_MAX_BYTES) and time."""

    def __init__(self, host: str, tcp_port: int) -> None:
        import secrets

        self.allowed: set[str] = set()  # peer ids that paired
        self.token = secrets.token_bytes(16)
        self.bytes_in = 0  # bulk bytes the baselines received and sent (libp2p stream and raw TCP)
        self.bytes_out = 0
        self._stop = threading.Event()
        self.tcp_port = 0
        self.tcp_problem = ""
        self._listener: socket.socket | None = None
        try:
            self._listener = socket.create_server((host, tcp_port))
            self._listener.settimeout(0.5)  # the accept loop checks for close() this often
            self.tcp_port = int(self._listener.getsockname()[1])
        except OSError as exc:
            self.tcp_problem = f"cannot listen on {host}:{tcp_port}: {exc.strerror or exc}"
            log.warning("raw TCP baseline unavailable: %s", self.tcp_problem)

    def start(self) -> None:
        """Start the raw TCP thread (when its socket could be made)."""
        if self._listener is not None:
            threading.Thread(target=self._tcp_loop, name="bench-tcp", daemon=True).start()

    def close(self) -> None:
        """Stop the raw TCP thread (within half a second) and close its socket."""
        self._stop.set()

    def _tcp_loop(self) -> None:
        assert self._listener is not None
        with self._listener:
            while not self._stop.is_set():
                try:
                    conn, where = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.warning("raw TCP baseline stopped: %s", exc)
                    return
                with conn:
                    try:
                        self._tcp_serve(conn)
                    except (OSError, EOFError, ValueError) as exc:
                        log.info("raw TCP baseline connection from %s ended: %s", where[0], exc)

    def _tcp_serve(self, conn: socket.socket) -> None:
        import hmac

        conn.settimeout(BENCH_TOKEN_WAIT_S)
        head = bytearray(len(self.token) + BENCH_COMMAND.size)
        recv_into_all(conn, memoryview(head))
        if not hmac.compare_digest(bytes(head[: len(self.token)]), self.token):
            raise ValueError("wrong token")
        op, nbytes = BENCH_COMMAND.unpack(head[len(self.token) :])
        if nbytes > BENCH_MAX_BYTES:
            raise ValueError(f"{nbytes} bytes asked, more than {BENCH_MAX_BYTES}")
        conn.settimeout(bench_timeout_s(nbytes))
        if op == b"U":  # NOTE: the buffer is made per transfer, as pangea's receiver makes its own
            recv_into_all(conn, memoryview(bytearray(nbytes)))
            self.bytes_in += nbytes
            conn.sendall(struct.pack("!Q", nbytes))
        elif op == b"D":
            send_filler(conn, nbytes)
            self.bytes_out += nbytes
        else:
            raise ValueError(f"unknown op {op!r}")

    async def handle_stream(self, stream: Any) -> None:
        """Serve one baseline command on a BENCH_PROTOCOL_ID stream, for a paired peer only.

        NOTE: an exception escaping a stream handler kills the libp2p host, so
        everything is caught and the stream reset."""
        import trio
        from libp2p.network.stream.exceptions import StreamEOF

        peer_id = str(stream.muxed_conn.peer_id)
        try:
            if peer_id not in self.allowed:
                log.warning("refusing a bench stream from %s: not the paired benchmarker", peer_id)
                await stream.reset()
                return
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                op, nbytes = BENCH_COMMAND.unpack(await stream_read_exactly(stream, BENCH_COMMAND.size))
            if op in (b"U", b"D") and nbytes > BENCH_MAX_BYTES:
                raise ValueError(f"{nbytes} bytes asked, more than {BENCH_MAX_BYTES}")
            if op == b"U":
                with trio.fail_after(bench_timeout_s(nbytes)):
                    await stream_read_into(stream, memoryview(bytearray(nbytes)))
                    self.bytes_in += nbytes
                    await stream.write(struct.pack("!Q", nbytes))
            elif op == b"D":
                with trio.fail_after(bench_timeout_s(nbytes)):
                    await stream_send_filler(stream, nbytes)
                self.bytes_out += nbytes
            elif op == b"E":
                if not 1 <= nbytes <= BENCH_MAX_ECHO_BYTES:
                    raise ValueError(f"echo messages of {nbytes} bytes; expected 1-{BENCH_MAX_ECHO_BYTES}")
                for _ in range(BENCH_MAX_ECHOES):  # ends at the client's EOF long before
                    with trio.fail_after(BENCH_ECHO_IDLE_S):
                        msg = await stream_read_exactly(stream, nbytes)
                    await stream.write(bytes(msg))
            elif op == b"T":
                await stream.write(BENCH_TCP_OFFER.pack(self.tcp_port, self.token if self.tcp_port else b""))
            else:
                raise ValueError(f"unknown op {op!r}")
            await stream.close()
        except StreamEOF:
            with contextlib.suppress(Exception):
                await stream.close()
        except Exception as exc:  # noqa: BLE001  NOTE: see the docstring
            log.info("bench stream from %s ended: %s", short_id(peer_id), describe_exception(exc))
            with contextlib.suppress(Exception):
                await stream.reset()


# ------------------------------------------------ the benchmarker's side


@dataclass
class BenchConfig:
    """What one `bench` run measures."""

    sizes_mib: list[int]
    tasks: int
    inflight: int
    matmul_n: int
    reps: int
    quick: bool = False


class BenchBaselines:
    """The benchmarker's side of the baselines: BENCH_PROTOCOL_ID streams on the
    libp2p connection to the peer, and the raw TCP socket the peer offered.

    ``skipped`` maps a baseline (``libp2p``, ``tcp``) to why it is not measured."""

    def __init__(self, node: Node, peer_id: str, peer_host: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.peer_host = peer_host
        self.tcp: tuple[str, int, bytes] | None = None
        self.skipped: dict[str, str] = {}

    async def _open(self) -> Any:
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        return await self.node.host.new_stream(ID.from_base58(self.peer_id), [TProtocol(BENCH_PROTOCOL_ID)])

    async def probe(self, peer_role: str) -> None:
        """Find out which baselines the peer offers; record why the others are skipped."""
        import trio

        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                stream = await self._open()
                await stream.write(BENCH_COMMAND.pack(b"T", 0))
                port, token = BENCH_TCP_OFFER.unpack(await stream_read_exactly(stream, BENCH_TCP_OFFER.size))
            with contextlib.suppress(Exception):
                await stream.close()
        except Exception as exc:  # noqa: BLE001  py-libp2p raises many types for a protocol it cannot agree on
            log.info("no %s at the peer: %s", BENCH_PROTOCOL_ID, describe_exception(exc))
            if peer_role == "bench-listener":
                self.skipped["libp2p"] = f"the peer's {BENCH_PROTOCOL_ID} stream failed: {describe_exception(exc)}"
            else:
                self.skipped["libp2p"] = f"the peer is a `{peer_role}` node, which does not offer {BENCH_PROTOCOL_ID}"
            self.skipped["tcp"] = f"it is offered over {BENCH_PROTOCOL_ID} (only `bench --listen` serves it)"
            return
        if not port:
            self.skipped["tcp"] = "the peer could not open a raw TCP port (see its log)"
            return
        self.tcp = (self.peer_host, port, token)
        try:  # NOTE: a firewall may pass the libp2p port and block this one
            await self.tcp_transfer("upload", memoryview(b""))
        except (OSError, EOFError, ValueError) as exc:
            self.tcp = None
            self.skipped["tcp"] = (
                f"cannot reach the peer's raw TCP port {self.peer_host}:{port}: {describe_exception(exc)}"
                " (open it in the firewall, or choose it with `bench --listen --tcp-port`)"
            )

    async def libp2p_transfer(self, direction: str, data: memoryview) -> float:
        """Move ``data`` (its size, for a download) on a fresh plain stream; return the seconds."""
        import trio

        nbytes = len(data)
        stream = await self._open()
        try:
            with trio.fail_after(bench_timeout_s(nbytes)):
                start = time.perf_counter()
                if direction == "upload":
                    await stream.write(BENCH_COMMAND.pack(b"U", nbytes))
                    await stream_write_all(stream, data)
                    (got,) = struct.unpack("!Q", await stream_read_exactly(stream, 8))
                    if got != nbytes:
                        raise PeerError(f"the peer received {got} of {nbytes} bytes on the baseline stream")
                else:  # NOTE: the buffer is made in the timed part, as pangea's receiver makes its own
                    await stream.write(BENCH_COMMAND.pack(b"D", nbytes))
                    await stream_read_into(stream, memoryview(bytearray(nbytes)))
                seconds = time.perf_counter() - start
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        return seconds

    async def open_echo(self) -> Any:
        """Open a plain stream in echo mode (64-byte messages), ready for `echo`."""
        stream = await self._open()
        await stream.write(BENCH_COMMAND.pack(b"E", BENCH_ECHO_BYTES))
        return stream

    async def echo(self, stream: Any, count: int) -> list[float]:
        """Return ``count`` round trips of a 64-byte echo on an already open stream."""
        import trio

        msg = b"p" * BENCH_ECHO_BYTES
        samples = []
        with trio.fail_after(30 + count * 0.1):
            for _ in range(count):
                start = time.perf_counter()
                await stream.write(msg)
                await stream_read_exactly(stream, BENCH_ECHO_BYTES)
                samples.append(time.perf_counter() - start)
        return samples

    async def tcp_transfer(self, direction: str, data: memoryview) -> float:
        """Move ``data`` (its size, for a download) over the raw TCP socket (blocking, in a thread)."""
        import trio

        assert self.tcp is not None
        host, port, token = self.tcp

        def transfer() -> float:
            nbytes = len(data)
            with socket.create_connection((host, port), timeout=BENCH_TOKEN_WAIT_S) as conn:
                conn.settimeout(bench_timeout_s(nbytes))
                start = time.perf_counter()
                if direction == "upload":
                    conn.sendall(token + BENCH_COMMAND.pack(b"U", nbytes))
                    send_all(conn, data)
                    reply = bytearray(8)
                    recv_into_all(conn, memoryview(reply))
                    if struct.unpack("!Q", reply)[0] != nbytes:
                        raise ValueError(f"the peer received {struct.unpack('!Q', reply)[0]} of {nbytes} bytes")
                else:
                    conn.sendall(token + BENCH_COMMAND.pack(b"D", nbytes))
                    recv_into_all(conn, memoryview(bytearray(nbytes)))
                return time.perf_counter() - start

        return await trio.to_thread.run_sync(transfer)

    async def measure(self, kind: str, fn: Callable[[], Any]) -> Any:
        """Run one baseline measurement; on failure record why and skip that baseline from now on."""
        if kind in self.skipped:
            return None
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001  a failed baseline must not lose pangea's figures
            self.skipped[kind] = f"failed mid-run: {describe_exception(exc)}"
            log.warning("%s baseline skipped: %s", kind, self.skipped[kind])
            return None


def bench_reps(cfg: BenchConfig, mib: int) -> int:
    """Repetitions of a bulk size: --reps, at most 3 from 512 MiB up (each takes seconds). NOTE: the
    first transfer of a size touches fresh memory, slow on VMs; the median shows the steady state."""
    return min(cfg.reps, 3) if mib >= 512 else cfg.reps


async def bench_bulk(
    session: PeerSession, baselines: BenchBaselines, cfg: BenchConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    """Bulk MB/s each way per size: pangea's task path (minus the worker's compute time),
    the plain libp2p stream and raw TCP, alternating; every pangea transfer is verified."""
    out: dict[str, Any] = {"pangea": {}, "libp2p": {}, "tcp": {}, "pangea_compute_s": {}, "verified": []}
    for mib in cfg.sizes_mib:
        say(f"bulk {_size_text(mib)}: {bench_reps(cfg, mib)} rep(s) each way, alternating with the baselines")
        await _bench_bulk_size(session, baselines, cfg, mib, out)
    return out


async def _bench_bulk_size(
    session: PeerSession, baselines: BenchBaselines, cfg: BenchConfig, mib: int, out: dict[str, Any]
) -> None:
    import hashlib

    import numpy as np
    import trio

    nbytes = mib << 20
    # Uploads are int64s below 2^31: their sum is exact, a checksum of every byte that arrived.
    data = np.random.default_rng(mib).integers(0, 1 << 31, size=nbytes // 8, dtype=np.int64)
    view = data.view(np.uint8).data
    expected_sum = int(data.sum())
    params = {"rows": float(nbytes // 8 // 1024), "cols": 1024.0, "seed": float(mib)}
    expected_sha = hashlib.sha256(reference_result("random", (), params).data).hexdigest()
    computes: list[float] = []

    async def pangea(direction: str) -> float:
        with trio.fail_after(bench_timeout_s(nbytes)):
            start = time.perf_counter()
            if direction == "upload":
                result = await session.request("sum", (data,))
            else:
                result = await session.request("random", (), params)
            wall = time.perf_counter() - start
        if not result.ok:
            raise TaskError(f"bulk {direction} on the peer: {result.error_message}", kind=result.error_kind)
        size = _size_text(mib)
        if direction == "upload" and int(result.outputs[0]) != expected_sum:
            raise CheckFailed(
                f"the bulk upload of {size} arrived changed: sum {result.outputs[0]}, sent {expected_sum}"
            )
        if direction == "download":
            sha = hashlib.sha256(np.ascontiguousarray(result.outputs[0]).data).hexdigest()
            if sha != expected_sha:
                raise CheckFailed(f"the bulk download of {size} arrived changed (sha256 {sha[:16]}...)")
        out["verified"].append(
            {"direction": direction, "mib": mib, "check": "sum" if direction == "upload" else "sha256"}
        )
        computes.append(result.compute_s)
        return wall - result.compute_s

    async def libp2p(direction: str) -> float | None:
        return await baselines.measure("libp2p", functools.partial(baselines.libp2p_transfer, direction, view))

    async def tcp(direction: str) -> float | None:
        return await baselines.measure("tcp", functools.partial(baselines.tcp_transfer, direction, view))

    systems: list[tuple[str, Callable[[str], Any]]] = [("libp2p", libp2p), ("tcp", tcp), ("pangea", pangea)]
    samples: dict[tuple[str, str], list[float]] = {}
    for rep in range(bench_reps(cfg, mib)):
        order = systems[rep % 3 :] + systems[: rep % 3]  # no system always goes first
        for direction in ("upload", "download"):
            for name, run in order:
                seconds = await run(direction)
                if seconds is not None:
                    samples.setdefault((name, direction), []).append(seconds)
    for (name, direction), times in samples.items():
        out[name][f"{direction}_{mib}"] = rate_summary(nbytes, times)
    out["pangea_compute_s"][str(mib)] = computes


async def bench_tasks(
    manager: Manager, peer_id: str, baselines: BenchBaselines, cfg: BenchConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    """Tiny-task round trips and tasks/s through `Manager.run` (the user path: scheduler,
    verification), sequential and with ``inflight`` at once, against a 64-byte echo on
    already open plain streams (one, and ``inflight``); they alternate in BENCH_ROUNDS rounds."""
    import trio

    say(f"tiny tasks: {cfg.tasks} sequential and {cfg.tasks} with {cfg.inflight} in flight, alternating with echoes")
    streams: list[Any] = []
    try:
        with trio.fail_after(60 + 4 * cfg.tasks * 0.1):
            opened = await baselines.measure("libp2p", lambda: _open_echoes(baselines, 1 + cfg.inflight))
            streams = opened or []
            return await _bench_task_rounds(manager, peer_id, baselines, streams, cfg)
    finally:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.close()


async def _open_echoes(baselines: BenchBaselines, count: int) -> list[Any]:
    streams: list[Any] = []
    for _ in range(count):
        streams.append(await baselines.open_echo())
    return streams


async def _bench_task_rounds(
    manager: Manager, peer_id: str, baselines: BenchBaselines, streams: list[Any], cfg: BenchConfig
) -> dict[str, Any]:
    import numpy as np
    import trio

    a, b = np.ones(1), np.ones(1)
    where: dict[str, int] = {}

    async def tasks(count: int) -> list[float]:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            outcome = await manager.run("add", (a, b), placement=peer_id, timeout_s=30)
            samples.append(time.perf_counter() - start)
            where[outcome.worker_id] = where.get(outcome.worker_id, 0) + 1
        return samples

    async def echoes(stream: Any, count: int) -> list[float]:
        return await baselines.echo(stream, count)

    async def at_once(count: int, loops: Sequence[Callable[[int], Any]]) -> tuple[list[float], float]:
        """Run ``count`` round trips split over the loops, all at once; return the samples and the wall time."""
        samples: list[float] = []

        async def one(loop: Callable[[int], Any], n: int) -> None:
            samples.extend(await loop(n))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, loop in enumerate(loops):
                nursery.start_soon(one, loop, count // len(loops) + (i < count % len(loops)))
        return samples, time.perf_counter() - start

    collected: dict[str, tuple[list[float], float]] = {}

    async def measure(key: str, count: int, loops: Sequence[Callable[[int], Any]], baseline: bool = False) -> None:
        if baseline:
            result = await baselines.measure("libp2p", functools.partial(at_once, count, loops))
            if result is None:
                return
        else:
            result = await at_once(count, loops)
        old = collected.get(key, ([], 0.0))
        collected[key] = (old[0] + result[0], old[1] + result[1])

    echo_one = [functools.partial(echoes, streams[0])] if streams else []
    echo_many = [functools.partial(echoes, s) for s in streams[1:]]
    warmup = max(3, cfg.tasks // 20)
    await tasks(warmup)
    if streams:
        await measure("warmup", warmup, echo_many + echo_one, baseline=True)
    where.clear()
    rounds = max(1, min(BENCH_ROUNDS, cfg.tasks))
    for i in range(rounds):
        count = cfg.tasks // rounds + (i < cfg.tasks % rounds)
        if echo_one:
            await measure("echo_sequential", count, echo_one, baseline=True)
        await measure("pangea_sequential", count, [tasks])
        if echo_many:
            await measure("echo_inflight", count, echo_many, baseline=True)
        await measure("pangea_inflight", count, [tasks] * cfg.inflight)
    collected.pop("warmup", None)
    out: dict[str, Any] = {key: latency_summary(samples, wall) for key, (samples, wall) in collected.items()}
    remote = where.pop(peer_id, 0)
    out["ran_on_peer"] = remote
    if where:
        raise CheckFailed(
            f"{sum(where.values())} of {remote + sum(where.values())} tiny tasks did not run on the peer "
            f"({', '.join(short_id(w) for w in where)}): it refused them (too many in flight? lower --inflight)"
        )
    return out


async def bench_matmul(
    manager: Manager, peer_id: str, baselines: BenchBaselines, cfg: BenchConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    """Delegated NxN float64 matmul through `Manager.run`: wall time minus the worker's compute
    time. Baseline: the same bytes (two operands up, the product down) on plain streams."""
    import numpy as np
    import trio

    n = cfg.matmul_n
    say(f"matmul {n}x{n} float64, delegated: {cfg.reps} rep(s), alternating with the same bytes on a plain stream")
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    up, down = np.concatenate((a.ravel(), b.ravel())).view(np.uint8).data, a.reshape(-1).view(np.uint8).data
    out: dict[str, Any] = {"n": n, "pangea": [], "libp2p": [], "verified": "Freivalds (Manager.run)"}

    async def plain_bytes() -> float:
        return float(await baselines.libp2p_transfer("upload", up) + await baselines.libp2p_transfer("download", down))

    with trio.fail_after(120 + cfg.reps * 3 * bench_timeout_s(3 * a.nbytes)):
        await manager.run("matmul", (a[:64], b[:, :64]), placement=peer_id)  # warm-up: BLAS threads, code paths
        for _ in range(cfg.reps):
            seconds = await baselines.measure("libp2p", plain_bytes)
            if seconds is not None:
                out["libp2p"].append(seconds)
            start = time.perf_counter()
            outcome = await manager.run("matmul", (a, b), placement=peer_id)
            wall = time.perf_counter() - start
            if outcome.worker_id != peer_id:
                raise CheckFailed(f"the matmul ran on {outcome.worker_id}, not on the peer: {outcome.attempts}")
            out["pangea"].append(
                {"wall_s": wall, "compute_s": outcome.compute_s, "overhead_s": wall - outcome.compute_s}
            )
    out["overhead_s"] = percentile([x["overhead_s"] for x in out["pangea"]], 0.5)
    out["compute_s"] = percentile([x["compute_s"] for x in out["pangea"]], 0.5)
    if out["libp2p"]:
        out["libp2p_s"] = percentile(out["libp2p"], 0.5)
    return out


async def run_bench(
    node: Node, manager: Manager, session: PeerSession, peer_host: str, cfg: BenchConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    """Run every measurement against the peer of ``session``; return the results (see `bench_rows`)."""
    baselines = BenchBaselines(node, session.peer_id, peer_host)
    await baselines.probe(session.hello.role)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
    results["bulk"] = await bench_bulk(session, baselines, cfg, say)
    results["tasks"] = await bench_tasks(manager, session.peer_id, baselines, cfg, say)
    results["matmul"] = await bench_matmul(manager, session.peer_id, baselines, cfg, say)
    results["skipped"] = dict(baselines.skipped)
    return results


# ---------------------------------------------------------------- the verb: options, the benchmarker, the listener

BENCH_SPAWN_S = 60.0  # the loopback peer must print its join string within this (a cold pyz extracts first)


def parse_sizes_mib(text: str) -> list[int]:
    """Parse --sizes-mib (``64,1024``); raise UsageError naming a bad value."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= BENCH_MAX_BYTES >> 20:
            raise UsageError(
                f"bad --sizes-mib {text!r}: {part!r} is not a whole number of MiB in 1-{BENCH_MAX_BYTES >> 20}",
                hint="for example --sizes-mib 64,1024",
            )
        sizes.append(int(part))
    return sizes


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """Return what a bench run measures: the --quick or full defaults, then explicit options."""
    defaults = BENCH_QUICK if args.quick else BENCH_DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    cfg = BenchConfig(
        sizes_mib=parse_sizes_mib(pick("sizes_mib")),
        tasks=pick("tasks"),
        inflight=args.inflight,
        matmul_n=pick("matmul_n"),
        reps=pick("reps"),
        quick=args.quick,
    )
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: measure pangea next to its baselines against a peer (spawned on loopback when
    no address is given), or with --listen be that peer for a benchmarker on another box."""
    if args.listen:
        if args.address:
            raise UsageError("give either --listen (be the peer) or an ADDRESS (benchmark against it), not both")
        return _cmd_bench_listen(args)
    if args.code and not args.address:
        raise UsageError("--code goes with an ADDRESS", hint="./pangea.pyz bench 'pangea://...#CODE'")
    cfg = bench_config(args)
    psk = read_psk_file(args.psk)
    setup_logging(None, getattr(args, "verbose", 0), getattr(args, "debug", False))
    home = pangea_home()
    key_pair, home_key = load_or_create_identity(home), None
    others = live_sessions(home)
    if others:
        # NOTE: one identity cannot be in two processes' sessions at once (the peer would refuse
        # the second as a copied home); the home's key vouches for the throwaway in our Hello.
        from libp2p.crypto.ed25519 import create_new_key_pair

        key_pair, home_key = create_new_key_pair(), key_pair
        if not args.json:
            print(
                f"bench: this home's identity is in use by {describe_sessions(others)}; "
                "benchmarking with a throwaway identity that the home's key vouches for",
                flush=True,
            )
    if args.address is not None:
        address = parse_peer_address(args.address)
        if args.code:
            address = dataclasses.replace(address, code=normalize_pairing_code(args.code))
        return run_trio(_bench, args, address, key_pair, cfg, (psk, None, home_key))
    psk_path = str(Path(args.psk).resolve()) if args.psk else None
    if not args.json:
        print("bench: starting a peer on 127.0.0.1 (this pangea, `bench --listen`) ...", flush=True)
    with spawned_bench_peer(args.timeout, psk_path) as (join, pid):
        return run_trio(_bench, args, parse_peer_address(join), key_pair, cfg, (psk, pid, home_key))


@contextlib.contextmanager
def spawned_bench_peer(timeout_s: float, psk_path: str | None) -> Iterator[tuple[str, int]]:
    """Start `bench --listen` on loopback from this same pangea; yield its join string and pid.

    The peer exits by itself after our Bye; otherwise (a failed run, Ctrl-C) it
    is stopped by its pid: SIGTERM, then SIGKILL."""
    cmd = [*self_command(), "bench", "--listen", "--host", "127.0.0.1", "--port", "0", "--timeout", f"{timeout_s:g}"]
    if psk_path:
        cmd += ["--psk", psk_path]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # a Ctrl-C at the terminal reaches us; we stop it
    )
    found: list[str] = []
    errors: list[str] = []
    ready = threading.Event()

    def pump(pipe: Any, into: list[str], prefix: str | None) -> None:
        for line in pipe:
            line = line.rstrip("\n")
            if prefix is None:
                into.append(line)
            elif line.startswith(prefix):
                into.append(line.removeprefix(prefix).strip())
                ready.set()
        ready.set()  # EOF: it exited

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, found, "Join string: "), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, errors, None), daemon=True),
    ]
    for thread in threads:
        thread.start()
    finished = False
    try:
        if not ready.wait(BENCH_SPAWN_S) or not found:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2.0)
            threads[1].join(timeout=2.0)  # its last words on stderr
            why = next(
                (e.removeprefix("pangea: error: ") for e in reversed(errors) if e.startswith("pangea: error: ")),
                errors[-1] if errors else f"it printed no join string within {BENCH_SPAWN_S:.0f} s",
            )
            raise PangeaError(
                f"cannot start the loopback peer: {why}",
                hint="run `./pangea.pyz bench --listen --host 127.0.0.1 --port 0` to see why",
            )
        yield found[0], proc.pid
        finished = True
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0 if finished else 0.1)  # it leaves on its own after our Bye
        for stop in (proc.terminate, proc.kill):
            if proc.poll() is None:
                stop()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        for thread in threads:
            thread.join(timeout=2.0)


async def _bench(
    args: argparse.Namespace,
    address: PeerAddress,
    key_pair: Any,
    cfg: BenchConfig,
    options: tuple[str | None, int | None, Any],
) -> int:
    psk, spawned_pid, home_key = options
    node = Node(
        key_pair=key_pair,
        role="bench",
        accept=lambda peer_id, hello: "a benchmarker takes no sessions",
        may_serve=lambda peer_id: False,
        psk=psk,
        home_key=home_key,
    )
    manager = Manager(node)  # NOTE: before the dial, so the session's worker is known to its scheduler

    def say(text: str) -> None:
        if not args.json:
            print(f"bench: {text}", flush=True)

    started = time.perf_counter()
    async with node.running("127.0.0.1", 0):  # dials out only; nobody needs to reach this node
        try:
            session = await node.dial(address, timeout_s=args.timeout)
        except PeerError as exc:
            if exc.kind == ErrorKind.REFUSED and exc.hint is None:
                exc.hint = (
                    "pass the join string `bench --listen` printed (pangea://...#CODE), or add --code CODE; "
                    f"a serve node must trust this box: serve --allow-peer {key_peer_id(home_key or key_pair)}"
                )
            raise
        hello, connection = session.hello, node.connection_info(session.peer_id)
        say(
            f"connected to {hello.role} {session.peer_id} (pangea {hello.pangea_version}, {hello.platform}); "
            f"{connection['security']} + {connection['muxer']}; arrays: {session.data_note}"
        )
        connection["data_plane"] = session.data_note
        results = await run_bench(node, manager, session, address.host, cfg, say)
        await session.close("bench done")
    rows = bench_rows(results)
    doc = bench_report(session, connection, address, results, rows)
    doc["spawned_pid"] = spawned_pid
    doc["seconds"] = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps(doc), flush=True)
    else:
        print_bench_report(doc, rows)
    return 0


def bench_report(
    session: PeerSession,
    connection: dict[str, str],
    address: PeerAddress,
    results: dict[str, Any],
    rows: list[BenchRow],
) -> dict[str, Any]:
    """Return the --json object of a bench run: the figures by metric, every sample, both machines."""
    hello, bulk = session.hello, results["bulk"]
    return {
        "ok": True,
        "version": __version__,
        "peer": session.peer_id,
        "peer_role": hello.role,
        "address": address.text,
        "connection": {k: connection[k] for k in ("security", "muxer", "data_plane") if k in connection},
        "machine": bench_machine_info(),
        "peer_machine": {
            "pangea": hello.pangea_version,
            "platform": hello.platform,
            "cores": hello.cores,
            "blas_threads": hello.blas_threads,
            "gflops": round(hello.gflops, 1),
        },
        "config": results["config"],
        "metrics": {row.key: {k: v for k, v in dataclasses.asdict(row).items() if k != "key"} for row in rows},
        "verified": {"bulk": bulk["verified"], "matmul": results["matmul"]["verified"]},
        "skipped": results["skipped"],
        "samples": {"bulk": bulk, "tasks": results["tasks"], "matmul": results["matmul"]},
    }


def print_bench_report(doc: dict[str, Any], rows: list[BenchRow]) -> None:
    """Print the table, the skipped baselines with their reasons, what was verified, both machines
    (within the terminal's width)."""
    width = terminal_columns()
    print()
    print(format_bench_table(rows, width))
    print()
    names = {"libp2p": "plain libp2p stream", "tcp": "raw TCP"}
    lines = [f"Baseline skipped: {names.get(kind, kind)}: {why}" for kind, why in doc["skipped"].items()]
    if doc["skipped"].get("libp2p", "").startswith("the peer is"):
        lines.append(
            "  (for every baseline, run `./pangea.pyz bench --listen` on the other box and pass its join string)"
        )
    verified = doc["verified"]["bulk"]
    uploads = sum(1 for v in verified if v["direction"] == "upload")
    lines.append(
        f"Verified: {uploads} upload(s) by their sum, {len(verified) - uploads} download(s) by sha256, "
        "the matmuls by Freivalds' check."
    )
    machine, peer = doc["machine"], doc["peer_machine"]
    lines.append(
        f"This box: {machine['cores']} cores, {machine['cpu_model'] or '?'}, Python {machine['python']}, "
        f"numpy {machine['numpy']}; peer: {peer['platform']}, {peer['cores']} cores."
    )
    lines.append(
        f"Ratio = pangea / baseline; targets: what pangea aims for on a LAN. {doc['seconds']:.0f} s. "
        "Exit 0: every figure was measured and verified (a missed target is not an error)."
    )
    print(wrap_text("\n".join(lines), width, indent="  "))


def _cmd_bench_listen(args: argparse.Namespace) -> int:
    psk = read_psk_file(args.psk)
    with node_session("bench-listener", args) as (_, session_dir):
        return run_trio(_bench_listen, args, session_dir, psk)


async def _bench_listen(args: argparse.Namespace, session_dir: SessionDir, psk: str | None) -> int:
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol

    pairing = Pairing(new_pairing_code(), expires_at=time.monotonic() + args.timeout, issuer="bench --listen")
    server = BenchServer(args.host, args.tcp_port)

    def accept(peer_id: str, hello: HelloMsg) -> str | Refusal | None:
        if hello.role != "bench":
            return f"this node serves `pangea.pyz bench` only, not a {hello.role!r}"
        refusal = pairing.check(hello.pairing_proof, node.peer_id, peer_id, time.monotonic())
        if refusal is None:
            server.allowed.add(peer_id)
        return refusal

    node = Node(
        key_pair=create_new_key_pair(),  # a one-off identity: the pairing code is what is trusted
        role="bench-listener",
        accept=accept,
        may_serve=lambda peer_id: peer_id in server.allowed,
        limits=Limits(max_inflight_tasks=BENCH_MAX_INFLIGHT),
        psk=psk,
    )
    session: PeerSession | None = None
    try:
        async with node.running(args.host, args.port):
            node.host.set_stream_handler(TProtocol(BENCH_PROTOCOL_ID), server.handle_stream)
            server.start()
            session_dir.write_addresses(node.addresses)
            session_dir.save(peer_id=node.peer_id)
            print(f"pangea {__version__} bench listener, peer ID {node.peer_id}")
            print("Addresses:")
            for address in node.addresses:
                print(f"  {address}")
            tcp = f"port {server.tcp_port}" if server.tcp_port else f"unavailable ({server.tcp_problem})"
            print(f"Raw TCP baseline: {tcp}")
            print(f"Pairing code (one use, valid {args.timeout:.0f} s): {format_pairing_code(pairing.code)}")
            if node.addresses:
                join = join_string(node.addresses[0], pairing.code)
                print(f"Join string: {join}")
                print(f"  on the other box: ./pangea.pyz bench '{join}'")
            print(f"Waiting up to {args.timeout:.0f} s for a benchmarker (Ctrl-C to stop)...", flush=True)
            with trio.move_on_after(args.timeout):
                session = await node.next_session()
            if session is None:
                port = node.addresses[0].split("/tcp/")[1].split("/")[0] if node.addresses else args.port
                raise NoPeerError(
                    f"cannot serve a benchmark: nobody connected within {format_seconds(args.timeout)}",
                    kind=ErrorKind.TIMEOUT,
                    hint=f"on the other box run `./pangea.pyz bench` with the join string printed above; "
                    f"check that box can reach this one (firewall open for TCP port {port})",
                )
            print(f"Benchmarker connected: {session.peer_id}", flush=True)
            await session.closed.wait()
    finally:
        server.close()
    if session.bye_reason is None:
        print(f"pangea: error: the benchmarker vanished mid-run: {session.close_reason}", file=sys.stderr)
        return 1
    print(wrap_text(listener_summary(session, server), terminal_columns(), indent="  "))
    return 0


def listener_summary(session: PeerSession, server: BenchServer) -> str:
    """The listener's last line: tasks served and the bytes moved, on the pangea session (its libp2p
    stream and its data plane together) and on the baselines."""
    pangea = f"{format_bytes(session.bytes_in)} in, {format_bytes(session.bytes_out)} out"
    stream = f"{format_bytes(session.channel.bytes_in)} in, {format_bytes(session.channel.bytes_out)} out"
    baselines = f"{format_bytes(server.bytes_in)} in, {format_bytes(server.bytes_out)} out"
    return (
        f"Benchmarker finished: {session.tasks_served} task(s) served; pangea session {pangea} "
        f"(of which libp2p stream {stream}, the rest on the data plane); baselines {baselines}."
    )

"""The child processes of bench/client_path.py: anchor drivers, the raw TCP worker, a fresh pangea client.

Run by bench/client_path.py, never by hand:

    PYTHON bench/client_path_driver.py ray|dask|pangea-fresh   # a driver: JSON commands in, JSON timings out
    PYTHON bench/client_path_driver.py tcp-worker              # prints its port, serves one connection

A driver prints one JSON line when it is ready (``{"ready": true, ...}``), then reads
one JSON command per line on stdin (``{"job": "matmul", "n": 2048, "repeats": 1}``),
runs it and prints one JSON line of timings (``{"samples": [...]}``, or
``{"error": "..."}``). Each sample is checked against numpy here, outside the timed
part. Ray and Dask run with the interpreter of their own venv, so this file needs
only numpy at import time (and pangea only for ``pangea-fresh``). Every read of
stdin has a timeout: a driver whose parent went away exits.

The raw TCP worker speaks length-prefixed frames: a 4-byte big-endian length, a
JSON header (``job``, operand ``shapes``, ``factor``), then each operand's float64
bytes; the answer is a length and a JSON header (``compute_s``, ``shape``) then the
result's bytes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

IDLE_TIMEOUT_S = 900.0  # a driver waits this long for its next command, then exits
ACCEPT_TIMEOUT_S = 120.0  # the TCP worker waits this long for its one connection
SEED = 20261203


_OPERANDS: dict[str, tuple[np.ndarray, ...]] = {}  # the last job's operands, made once per process


def operands(job: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """The job's operands: the same numbers in every process (seeded)."""
    key = json.dumps({k: job.get(k) for k in ("job", "n", "mib")})
    if key not in _OPERANDS:
        _OPERANDS.clear()
        _OPERANDS[key] = _make_operands(job)
    return _OPERANDS[key]


def _make_operands(job: dict[str, Any]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(SEED)
    name = job["job"]
    if name == "matmul":
        n = int(job["n"])
        return rng.standard_normal((n, n)), rng.standard_normal((n, n))
    if name == "roundtrip":
        return (rng.standard_normal((int(job["mib"]) << 20) // 8),)
    if name == "tiny":
        x = np.arange(16.0).reshape(4, 4)
        return x, x
    raise ValueError(f"unknown job {name!r}")


def check(job: str, args: tuple[np.ndarray, ...], out: np.ndarray) -> None:
    """Raise ValueError unless ``out`` is what numpy gives for ``job`` on ``args``."""
    if job == "matmul":
        a, b = args
        v = np.random.default_rng(1).standard_normal(b.shape[1])  # Freivalds: (a @ b) v == a (b v)
        ok = out.shape == (a.shape[0], b.shape[1]) and np.allclose(out @ v, a @ (b @ v), rtol=1e-8, atol=1e-6)
    elif job == "roundtrip":
        ok = out.shape == args[0].shape and np.array_equal(out, args[0])
    elif job in ("tiny", "add"):
        ok = np.array_equal(out, args[0] + args[1])
    else:
        raise ValueError(f"unknown job {job!r}")
    if not ok:
        raise ValueError(f"a wrong {job} result")


def compute(job: str, args: tuple[np.ndarray, ...], factor: float = 1.0) -> tuple[np.ndarray, float]:
    """Run one job's kernel: (result, compute seconds). What every worker runs."""
    started = time.perf_counter()
    if job == "matmul":
        out = args[0] @ args[1]
    elif job == "roundtrip":
        out = args[0] * factor  # `scale` with factor 1: a result as large as the operand
    elif job in ("tiny", "add"):
        out = args[0] + args[1]
    else:
        raise ValueError(f"unknown job {job!r}")
    return out, time.perf_counter() - started


def blas_info() -> str:
    """The BLAS threads this process uses (threadpoolctl when installed, else the environment)."""
    import numpy  # noqa: F401  (threadpoolctl sees only the BLAS libraries already loaded)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '')} (threadpoolctl absent)"
    return ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()) or "no BLAS pool"


# ---------------------------------------------------------------------------
# Anchors: one call of a job, (wall seconds, compute seconds, result)
# ---------------------------------------------------------------------------

Call = Callable[[str, tuple[np.ndarray, ...]], tuple[float, float, np.ndarray]]


def ray_system(num_cpus: int) -> tuple[Call, dict[str, Any]]:
    """ray.init on this box and a call through one @ray.remote task."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote
    def task(job: str, *args: np.ndarray) -> tuple[np.ndarray, float]:
        return compute(job, args)

    @ray.remote
    def info() -> str:
        return blas_info()

    def call(job: str, args: tuple[np.ndarray, ...]) -> tuple[float, float, np.ndarray]:
        started = time.perf_counter()
        out, compute_s = ray.get(task.remote(job, *args))
        return time.perf_counter() - started, compute_s, out

    return call, {"version": ray.__version__, "worker_blas": ray.get(info.remote())}


def dask_system(blas_threads: str) -> tuple[Call, dict[str, Any]]:
    """A one-worker, one-thread distributed.LocalCluster (processes) and Client.submit."""
    import dask
    import distributed

    # NOTE: the nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in its workers unless told otherwise.
    threads = {k: blas_threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    dask.config.set(
        {"distributed.nanny.pre-spawn-environ": threads, "distributed.admin.large-graph-warning-threshold": "2GB"}
    )
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
    )
    client = distributed.Client(cluster)

    def call(job: str, args: tuple[np.ndarray, ...]) -> tuple[float, float, np.ndarray]:
        started = time.perf_counter()
        out, compute_s = client.submit(compute, job, args, pure=False).result()
        return time.perf_counter() - started, compute_s, out

    info = client.submit(blas_info, pure=False).result()
    return call, {"version": dask.__version__, "worker_blas": info}


def run_anchor(call: Call, cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one command on an anchor; every result checked."""
    job = cmd["job"]
    args = operands(cmd)
    if job == "tiny":
        lat = []
        for _ in range(int(cmd["calls"])):
            wall, _, out = call(job, args)
            check(job, args, out)
            lat.append(wall)
        return {"samples": [{"latencies_s": lat}]}
    samples = []
    for _ in range(int(cmd.get("repeats", 1))):
        wall, compute_s, out = call(job, args)
        check(job, args, out)
        del out
        samples.append({"wall_s": wall, "compute_s": compute_s})
    return {"samples": samples}


def run_fresh(cmd: dict[str, Any]) -> dict[str, Any]:
    """A fresh process's first and next `scale` transfers through a new pangea.Client."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import pangea

    (a,) = operands({"job": "roundtrip", "mib": cmd["mib"]})
    samples = []
    with pangea.Client(cmd["rpc"], timeout_s=300) as client:
        for _ in range(1 + int(cmd["repeats"])):
            started = time.perf_counter()
            out = client.submit("scale", a, factor=1.0, placement=cmd["placement"])
            wall = time.perf_counter() - started
            check("roundtrip", (a,), out)
            del out
            samples.append({"wall_s": wall, "compute_s": client.last_task["timings"]["compute_s"]})
        via = client.last_task["arrays_via"]
    return {"samples": samples, "arrays_via": via}


def read_command(timeout_s: float) -> dict[str, Any] | None:
    """The next JSON command on stdin, or None at EOF or after ``timeout_s`` of silence."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    if not ready:
        return None
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def reply(doc: dict[str, Any]) -> None:
    """One JSON line to the parent."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def driver(system: str) -> int:
    """Serve JSON commands for one system until EOF, "quit" or an idle timeout."""
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "2")
    call: Call | None = None
    meta: dict[str, Any] = {}
    if system == "ray":
        call, meta = ray_system(max(2, int(blas_threads)))
    elif system == "dask":
        call, meta = dask_system(blas_threads)
    elif system != "pangea-fresh":
        reply({"error": f"unknown system {system!r}"})
        return 2
    reply({"ready": True, "system": system, "python": sys.version.split()[0], "numpy": np.__version__, **meta})
    while (cmd := read_command(IDLE_TIMEOUT_S)) is not None and cmd.get("job") != "quit":
        try:
            reply(run_fresh(cmd) if call is None else run_anchor(call, cmd))
        except Exception as exc:  # NOTE: reported to the parent, which ends the run with it
            reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


# ---------------------------------------------------------------------------
# The raw TCP worker
# ---------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError when the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n


def recv_frame_header(sock: socket.socket) -> dict[str, Any]:
    """A length-prefixed JSON header."""
    size = bytearray(4)
    recv_exactly(sock, memoryview(size))
    header = bytearray(struct.unpack("!I", size)[0])
    recv_exactly(sock, memoryview(header))
    return dict(json.loads(header))


def send_frame(sock: socket.socket, header: dict[str, Any], *arrays: np.ndarray) -> None:
    """A length-prefixed JSON header, then each array's bytes."""
    data = json.dumps(header).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)
    for array in arrays:
        sock.sendall(np.ascontiguousarray(array).data.cast("B"))


def recv_array(sock: socket.socket, shape: list[int]) -> np.ndarray:
    """A float64 array of ``shape`` straight into its own buffer."""
    out = np.empty(shape, dtype=np.float64)
    recv_exactly(sock, out.data.cast("B"))
    return out


def tcp_worker() -> int:
    """Listen on 127.0.0.1:0, print the port, serve one connection: job in, result out."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(ACCEPT_TIMEOUT_S)
        reply({"ready": True, "port": server.getsockname()[1], "worker_blas": blas_info()})
        conn, _ = server.accept()
    with conn:
        conn.settimeout(IDLE_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                header = recv_frame_header(conn)
            except (EOFError, TimeoutError):
                return 0
            args = tuple(recv_array(conn, shape) for shape in header["shapes"])
            out, compute_s = compute(header["job"], args, float(header.get("factor", 1.0)))
            send_frame(conn, {"compute_s": compute_s, "shape": list(out.shape)}, out)


def main(argv: list[str]) -> int:
    """Run the child named by ``argv[0]``."""
    if argv == ["tcp-worker"]:
        return tcp_worker()
    if len(argv) == 1:
        return driver(argv[0])
    print(
        "usage: client_path_driver.py ray|dask|pangea-fresh|tcp-worker (run by bench/client_path.py)", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

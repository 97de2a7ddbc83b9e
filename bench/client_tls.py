#!/usr/bin/env python3
"""A Client on another box: its arrays on the bulk channel over TLS against inside the RPC messages.

Usage (as root, from the repo root, after ./build.sh):

    .build/venv/bin/python bench/client_tls.py                 # 64 MiB, 5 rounds
    .build/venv/bin/python bench/client_tls.py --mib 16 --rounds 3

What runs. Two network namespaces joined by a veth pair stand for two boxes (made by
this script, removed at the end). In namespace a, `pangea.pyz serve` with its RPC on the
veth address (TLS, a token file); in namespace b, the pyz's own interpreter runs a
driver with two `pangea.Client`s of it, one with the bulk channel over TLS (the default)
and one with ``tls_bulk=False`` (the arrays inside the Cap'n Proto messages), and a raw
TLS 1.3 socket to a sink in namespace a as the baseline (the same cipher, no pangea).
Each round runs, interleaved, `scale` (factor 1, placement local: the result is as large
as the operand) through each Client and one round trip of the same bytes over the raw
socket. MB/s each way is the array's bytes over half of (the wall time minus the node's
compute time). The table gives the median over the rounds with min and max. Every
result is checked. Nothing is installed; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import NetnsPair, make_node_home  # noqa: E402

RPC_PORT = 7780
SINK_PORT = 7790

# Runs in namespace a: a TLS 1.3 sink that echoes what it is sent (the raw baseline).
SINK = r"""
import socket, ssl, sys
pem, host, port, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(pem)
listener = socket.create_server((host, port)); listener.settimeout(120)
print("listening", flush=True)
conn, _ = listener.accept()
conn = ctx.wrap_socket(conn, server_side=True); conn.settimeout(120)
for _ in range(rounds):
    size = int.from_bytes(conn.read(8), "big")
    buf = bytearray(size); view = memoryview(buf); got = 0
    while got < size:
        got += conn.recv_into(view[got:])
    conn.sendall(buf)
"""

# Runs in namespace b with the pyz's interpreter: one JSON line of figures.
DRIVER = r"""
import json, socket, ssl, statistics, sys, time
import numpy as np
import pangea
rpc, token, fingerprint, sink = sys.argv[1:5]
mib, rounds = int(sys.argv[5]), int(sys.argv[6])
a = np.random.default_rng(1).standard_normal(mib << 17)
rows = {"bulk channel over TLS": [], "RPC messages over TLS": [], "raw TLS socket": []}
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
host, port = sink.split(":")
raw = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=120))
back = np.empty_like(a)
with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=300) as bulk, \
        pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=300, tls_bulk=False) as plain:
    for c in (bulk, plain):  # one warm-up each
        c.submit("scale", a[:1024], factor=1.0, placement="local")
    for _ in range(rounds):
        for name, c in (("bulk channel over TLS", bulk), ("RPC messages over TLS", plain)):
            t0 = time.perf_counter()
            out = c.submit("scale", a, factor=1.0, placement="local")
            wall = time.perf_counter() - t0
            assert np.array_equal(out[::4099], a[::4099]) and out.shape == a.shape
            rows[name].append((wall - c.last_task["timings"]["compute_s"], c.last_task["arrays_via"]))
            del out
        t0 = time.perf_counter()
        raw.sendall(a.nbytes.to_bytes(8, "big")); raw.sendall(a.data)
        view = memoryview(back).cast("B"); got = 0
        while got < a.nbytes:
            got += raw.recv_into(view[got:])
        rows["raw TLS socket"].append((time.perf_counter() - t0, "raw"))
        assert np.array_equal(back[::4099], a[::4099])
result = {}
for name, samples in rows.items():
    rates = sorted(a.nbytes / (s / 2) / 1e6 for s, _ in samples)
    result[name] = {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "via": samples[0][1]}
print(json.dumps(result))
"""


def main() -> int:
    """Run the comparison and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyz", type=Path, default=REPO / "pangea.pyz")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: network namespaces need root")
    with tempfile.TemporaryDirectory() as tmp, NetnsPair() as pair:
        base = Path(tmp)
        home_a, home_b = make_node_home(base, "a"), make_node_home(base, "b")
        token = secrets.token_hex(16)
        token_file = base / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        (base / "sink.py").write_text(SINK)
        (base / "driver.py").write_text(DRIVER)
        rpc = f"{pair.addr_a}:{RPC_PORT}"
        cmd = [args.pyz, "serve", "--host", pair.addr_a, "--port", "0", "--rpc", rpc, "--rpc-token-file", token_file]
        with pair.proc("a", cmd, env=home_a.env, name="serve@a") as serve:
            serve.wait_for_line(r"^pangea: serving on ", timeout=120, stream="stdout")
            fingerprint = serve.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
            pem = home_a.pangea_home / "rpc-tls.pem"
            sink_cmd: list[str | Path] = [sys.executable, base / "sink.py", pem, pair.addr_a, str(SINK_PORT)]
            sink_cmd.append(str(args.rounds))
            with pair.proc("a", sink_cmd, name="sink@a") as sink:
                sink.wait_for_line(r"^listening$", timeout=30, stream="stdout")
                driver = [args.pyz, base / "driver.py", rpc, token, fingerprint, f"{pair.addr_a}:{SINK_PORT}"]
                env = dict(home_b.env, SHIV_INTERPRETER="1")
                result = pair.run(
                    "b",
                    [*driver, str(args.mib), str(args.rounds)],
                    env=env,
                    timeout=900,
                    capture_output=True,
                    text=True,
                )
        if result.returncode != 0:
            raise SystemExit(f"bench: the driver failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{args.mib} MiB there and back from a Client on another box (veth), {args.rounds} rounds")
    print(f"{'path':<24} {'MB/s each way':>14} {'min':>8} {'max':>8}  arrays_via")
    for name, f in figures.items():
        print(f"{name:<24} {f['median']:>14.0f} {f['min']:>8.0f} {f['max']:>8.0f}  {f['via']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

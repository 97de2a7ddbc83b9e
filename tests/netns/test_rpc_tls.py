"""RPC between two hosts: TLS 1.3 on the wire, the certificate pinned or trusted on first use.

A serve node in namespace a listens for RPC on its veth address with a token
file, as the README recommends for a program on another machine. A client in
namespace b (the pyz's own interpreter running pangea.Client) connects with no
fingerprint: it trusts the certificate on first use, with a warning, and keeps
its fingerprint in its home. A packet capture on b's veth (AF_PACKET, every
frame of the test) must not contain the marker token or the marker operand's
bytes, and must contain a TLS ClientHello (the capture saw the connection).
Then a wrong fingerprint and a changed certificate are refused.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NetnsPair, NodeHome, Proc
from pyz_helpers import assert_expected_error

pytestmark = pytest.mark.netns

READY_TIMEOUT_S = 120.0
RPC_PORT = 7780
MARKER_VALUE = 1234.56789  # the operand: this float64 repeated; its 8 bytes, 4 times over, are the marker
CAPTURE_LIMIT_S = 240.0  # the capture stops by itself after this long, or when its stop file appears

# Runs in namespace b as root with sys.executable: every frame on the veth, appended to a file.
CAPTURE = r"""
import socket, sys, time
iface, out, stop, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((iface, 0))
s.settimeout(0.2)
print("capturing", flush=True)
deadline = time.monotonic() + limit
with open(out, "wb") as f:
    while time.monotonic() < deadline:
        try:
            f.write(s.recv(65535))
        except socket.timeout:
            import os
            if os.path.exists(stop):
                break
"""

# Runs in namespace b with the pyz's interpreter: one JSON line.
DRIVER = r"""
import json, sys, warnings
import numpy as np
import pangea
rpc, token, fingerprint, value = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=60) as node:
            a = np.full((256, 256), value)
            c = node.matmul(a, np.eye(256), placement="local")
            print(json.dumps({"ok": True, "correct": bool(np.array_equal(c, a)), "tls": node.tls,
                              "fingerprint": node.fingerprint, "warnings": [str(w.message) for w in caught],
                              "arrays_via": node.last_task["arrays_via"], "tls_bulk_note": node.tls_bulk_note}))
    except pangea.PangeaError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "hint": exc.hint or ""}))
"""


def _serve(pair: NetnsPair, pyz: Path, home: NodeHome, token_file: Path) -> tuple[Proc, str]:
    rpc = f"{pair.addr_a}:{RPC_PORT}"
    cmd: list[str | Path] = [pyz, "serve", "--host", pair.addr_a, "--port", "0", "--rpc", rpc]
    proc = pair.proc("a", [*cmd, "--rpc-token-file", str(token_file)], env=home.env, name="serve@a")
    try:
        proc.wait_for_line(r"^pangea: serving on ", timeout=READY_TIMEOUT_S, stream="stdout")
        fingerprint = proc.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
    except BaseException:
        proc.stop()
        raise
    return proc, fingerprint


def _drive(pair: NetnsPair, pyz: Path, home: NodeHome, driver: Path, token: str, fingerprint: str = "") -> Any:
    env = dict(home.env, SHIV_INTERPRETER="1")
    args: list[str | Path] = [pyz, driver, f"{pair.addr_a}:{RPC_PORT}", token, fingerprint, repr(MARKER_VALUE)]
    result = pair.run("b", args, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rpc_between_hosts_is_encrypted_pinned_and_trusted_on_first_use(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    box_a, box_b = make_home("box-a"), make_home("box-b")
    token = "MARKERTOKEN" + secrets.token_hex(12)
    token_file = tmp_path / "rpc.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    driver, capture = tmp_path / "driver.py", tmp_path / "capture.py"
    driver.write_text(DRIVER)
    capture.write_text(CAPTURE)
    frames, stop = tmp_path / "frames.bin", tmp_path / "stop"
    cap_cmd: list[str | Path] = [sys.executable, capture, NetnsPair.IFACE, frames, stop, str(CAPTURE_LIMIT_S)]
    serve, fingerprint = _serve(netns_pair, pyz, box_a, token_file)
    try:
        with netns_pair.proc("b", cap_cmd, name="capture@b") as sniffer:
            sniffer.wait_for_line(r"^capturing$", timeout=30, stream="stdout")
            first = _drive(netns_pair, pyz, box_b, driver, token)
            stop.touch()
            assert sniffer.wait(timeout=30) == 0, sniffer.output()
        # the client trusted the certificate on first use, said so, and kept it
        assert first["ok"] and first["correct"] and first["tls"], first
        # the operand and the result crossed on the bulk channel over TLS, pinned like the RPC
        assert first["arrays_via"] == "TLS bulk channel, result: TLS bulk channel", first
        assert first["tls_bulk_note"].startswith("on: ") and fingerprint in first["tls_bulk_note"], first
        assert first["fingerprint"] == fingerprint, first
        assert any("first connection to" in w and fingerprint in w for w in first["warnings"]), first
        known = (box_b.pangea_home / "known_rpc_nodes").read_text()
        assert f"{netns_pair.addr_a}:{RPC_PORT} {fingerprint}\n" == known
        # nothing secret on the wire; but the capture did see the TLS connection
        wire = frames.read_bytes()
        operand = np.full(4, MARKER_VALUE).tobytes()
        assert len(wire) > 256 * 256 * 8, f"the capture saw only {len(wire)} bytes"
        assert b"\x16\x03\x01" in wire, "no TLS ClientHello in the capture"
        assert token.encode() not in wire, "the RPC token crossed the network in clear"
        assert operand not in wire, "the operand crossed the network in clear"
        # the second time: known, no warning
        again = _drive(netns_pair, pyz, box_b, driver, token)
        assert again["ok"] and again["correct"] and not again["warnings"], again
        # a wrong fingerprint is refused
        wrong = _drive(netns_pair, pyz, box_b, driver, token, "sha256:" + "ab" * 32)
        assert not wrong["ok"] and f"it presented certificate {fingerprint}" in wrong["error"], wrong
    finally:
        serve.stop()
    # the node's home set up again: a new certificate, which the client refuses loudly
    (box_a.pangea_home / "rpc-tls.pem").unlink()
    serve, renewed = _serve(netns_pair, pyz, box_a, token_file)
    try:
        assert renewed != fingerprint
        changed = _drive(netns_pair, pyz, box_b, driver, token)
        assert not changed["ok"], changed
        assert f"its certificate changed: it presented {renewed}, trusted until now {fingerprint}" in changed["error"]
        assert "known_rpc_nodes" in changed["error"] and "intercepting" in changed["hint"], changed
        call: list[str | Path] = [
            pyz,
            "call",
            "--rpc",
            f"{netns_pair.addr_a}:{RPC_PORT}",
            "--token-file",
            token_file,
            "status",
        ]
        result = netns_pair.run("b", call, env=box_b.env, timeout=120)
        assert result.returncode == 2, result.stdout  # a setup problem: the certificate
        assert_expected_error(result.stderr, "its certificate changed")
        pinned = netns_pair.run("b", [*call[:-1], "--fingerprint", renewed, "--json", "status"], env=box_b.env)
        assert pinned.returncode == 0, pinned.stderr
    finally:
        serve.stop()


def test_a_non_loopback_rpc_endpoint_without_a_token_is_refused(
    netns_pair: NetnsPair, pyz: Path, make_home: Any
) -> None:
    box = make_home("box-a")
    cmd: list[str | Path] = [
        pyz,
        "serve",
        "--host",
        netns_pair.addr_a,
        "--port",
        "0",
        "--rpc",
        f"{netns_pair.addr_a}:{RPC_PORT}",
    ]
    result = netns_pair.run("a", cmd, env=box.env, timeout=120)
    assert result.returncode == 2, result.stdout
    assert_expected_error(result.stderr, "without a token")
    assert "hint: add --rpc-token-file FILE" in result.stderr, result.stderr


# Runs in namespace b with the pyz's interpreter: what a remote Client's arrays give on each path.
BULK_DRIVER = r"""
import concurrent.futures, json, sys, threading, time
import numpy as np
import pangea
rpc, token, fingerprint = sys.argv[1], sys.argv[2], sys.argv[3]
report = {"wrong": [], "via": {}}

def check(name, got, want):
    same = got.shape == want.shape and got.dtype == want.dtype.newbyteorder("<")
    if not same or not np.array_equal(got, want):
        report["wrong"].append(name)

rng = np.random.default_rng(5)
base = rng.standard_normal((300, 400)) * 100
layouts = {
    "contiguous": base, "non-contiguous": base[::3, 1::2], "fortran": np.asfortranarray(base),
    "big-endian": base.astype(">f8"), "0-d": np.array(2.5), "empty": np.zeros((0, 400)),
}
with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=120) as node:
    report["tls_bulk"] = node.tls_bulk
    for dtype in pangea.ALLOWED_DTYPES:
        for layout, a in layouts.items():
            a = a.astype(np.dtype(dtype).newbyteorder(a.dtype.byteorder))
            b = np.ones_like(a)
            check(f"{dtype}/{layout}", node.submit("add", a, b, placement="local"), a + b)
            report["via"][f"{dtype}/{layout}"] = node.last_task["arrays_via"]
    m = rng.standard_normal((512, 256))
    check("matmul", node.submit("matmul", m, m.T, placement="local"), m @ m.T)
    check("sum", np.asarray(node.submit("sum", m, placement="local")), np.asarray(m.sum()))
    report["via"]["sum"] = node.last_task["arrays_via"]
    # 8 threads x 25 mixed calls on one Client: every caller its own answer and task information
    def caller(seed):
        r = np.random.default_rng(seed)
        for i in range(25):
            a = r.standard_normal((256, 256) if i % 3 == 0 else (4, 4))
            out = node.submit("scale", a, placement="local", factor=float(seed))
            if not np.array_equal(out, a * float(seed)) or node.last_task["kernel"] != "scale":
                report["wrong"].append(f"thread {seed} call {i}")
    threads = [threading.Thread(target=caller, args=(s,)) for s in range(1, 9)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    # a cancelled future gives back what it held; the node serves on
    big = rng.standard_normal((2500, 2500))
    future = node.future("matmul", big, big, placement="local")
    deadline = time.monotonic() + 60
    while node.status()["memory_budget_used_bytes"] == 0 and not future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    report["cancelled"] = future.cancel()
    deadline = time.monotonic() + 30
    while node.status()["memory_budget_used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    report["held_after_cancel"] = node.status()["memory_budget_used_bytes"]
    # the budget holds before a byte moves: 192 MiB to scale cannot fit 384 MiB with its output
    try:
        node.submit("scale", np.zeros((24 << 20,)), placement="local", factor=2.0)
        report["over_budget"] = "sent"
    except pangea.TaskError as exc:
        report["over_budget"] = f"{exc.kind}: {exc}"
    check("after", node.submit("add", base, base, placement="local"), base + base)
with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=120, tls_bulk=False) as plain:
    check("in-message", plain.submit("add", base, base, placement="local"), base + base)
    report["in_message_via"] = plain.last_task["arrays_via"]
    report["in_message_note"] = plain.tls_bulk_note
print(json.dumps(report))
"""


def test_a_remote_client_s_arrays_travel_on_the_tls_bulk_channel_and_equal_numpy_s(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    box_a, box_b = make_home("box-a"), make_home("box-b")
    token_file = tmp_path / "rpc.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    driver = tmp_path / "bulk_driver.py"
    driver.write_text(BULK_DRIVER)
    rpc = f"{netns_pair.addr_a}:{RPC_PORT}"
    cmd: list[str | Path] = [pyz, "serve", "--host", netns_pair.addr_a, "--port", "0", "--rpc", rpc]
    cmd += ["--rpc-token-file", str(token_file), "--memory-budget-mib", "384"]
    serve = netns_pair.proc("a", cmd, env=box_a.env, name="serve@a")
    try:
        serve.wait_for_line(r"^pangea: serving on ", timeout=READY_TIMEOUT_S, stream="stdout")
        fingerprint = serve.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
        env = dict(box_b.env, SHIV_INTERPRETER="1")
        args: list[str | Path] = [pyz, driver, rpc, token_file.read_text().strip(), fingerprint]
        result = netns_pair.run("b", args, env=env, timeout=400)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        serve.stop()
    assert report["tls_bulk"] and not report["wrong"], report
    via = report["via"]
    bulk = "TLS bulk channel, result: TLS bulk channel"
    assert all(v == bulk for k, v in via.items() if not k.endswith(("/0-d", "/empty"))), via
    assert all(v == "RPC messages" for k, v in via.items() if k.endswith(("/0-d", "/empty"))), via  # under 64 KiB
    assert report["cancelled"] and report["held_after_cancel"] == 0, report
    assert report["over_budget"].startswith("bad-input: ") and "nothing was sent" in report["over_budget"], report
    assert report["in_message_via"] == "RPC messages" and report["in_message_note"] == "off: tls_bulk=False", report


REMOTE_DRIVER = r"""
import gc, json, sys, time
import numpy as np
import pangea
rpc, token, fingerprint = sys.argv[1], sys.argv[2], sys.argv[3]
report = {"wrong": []}
rng = np.random.default_rng(9)
a, b = rng.standard_normal((600, 500)), rng.standard_normal((500, 400))
with pangea.Client(rpc, token=token, fingerprint=fingerprint, timeout_s=120) as node:
    x, y = node.put(a), node.put(b)
    report["put_via"] = node.last_task["arrays_via"]
    z = (x @ y) + 1.0
    report["step_via"] = node.last_task["arrays_via"]
    back = z.get()
    report["get_via"] = node.last_task["arrays_via"]
    if not np.allclose(back, a @ b + 1.0):
        report["wrong"].append("pipeline")
    if not np.array_equal(np.asarray(x), a):
        report["wrong"].append("round trip")
    report["held"] = node.status()["held_arrays"]
    del x, y, z
    gc.collect()
    deadline = time.monotonic() + 30
    while node.status()["held_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    report["held_after"] = node.status()["held_bytes"]
print(json.dumps(report))
"""


def test_a_remote_client_keeps_arrays_on_the_node_across_hosts(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, tmp_path: Path
) -> None:
    box_a, box_b = make_home("box-a"), make_home("box-b")
    token_file = tmp_path / "rpc.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    driver = tmp_path / "remote_driver.py"
    driver.write_text(REMOTE_DRIVER)
    rpc = f"{netns_pair.addr_a}:{RPC_PORT}"
    cmd: list[str | Path] = [pyz, "serve", "--host", netns_pair.addr_a, "--port", "0", "--rpc", rpc]
    cmd += ["--rpc-token-file", str(token_file)]
    serve = netns_pair.proc("a", cmd, env=box_a.env, name="serve@a")
    try:
        serve.wait_for_line(r"^pangea: serving on ", timeout=READY_TIMEOUT_S, stream="stdout")
        fingerprint = serve.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
        env = dict(box_b.env, SHIV_INTERPRETER="1")
        args: list[str | Path] = [pyz, driver, rpc, token_file.read_text().strip(), fingerprint]
        result = netns_pair.run("b", args, env=env, timeout=400)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        serve.stop()
    assert not report["wrong"], report
    assert report["put_via"] == "TLS bulk channel, result: kept on the node", report
    assert report["step_via"].endswith("result: kept on the node"), report
    assert report["get_via"].endswith("result: TLS bulk channel"), report
    assert report["held"] == 3 and report["held_after"] == 0, report  # x @ y was a temporary: released

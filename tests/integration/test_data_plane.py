"""The TLS 1.3 data plane (issue 6) between real pangea.pyz processes on 127.0.0.1.

Every node listens on a data port (``--data-port``, default the libp2p port
+ 1). The libp2p dialer (``respond``, ``serve --peer``) connects there, pins
the certificate the acceptor announced in its Noise-authenticated Hello, and
proves a one-time token; from then on every session message travels on that
TLS connection. What is checked here, after the issue's list:

* the fast path is used and says so (the connection check, ``call peers``),
  and its results are right, also with many tasks in flight both ways;
* confidentiality: a proxy on the data path (``--fault data-via``, a TEST
  AID of the dialer) records both directions and never sees the operand;
* integrity: the proxy flips one byte in either direction in the middle of a
  large operand or result: the connection is dropped with a readable reason,
  the task is retried and right, the session goes on on the libp2p stream;
  and a data connection that ends while a large send is blocked (the proxy
  stops reading, then hangs up): the task still fails over (and a request
  queued behind the blocked send runs once);
* authentication: a man in the middle with its own certificate is refused
  before it is sent anything (never the token), and the pair falls back; a
  client with a wrong token is refused; more than 16 connections in their
  handshake are closed;
* replay: the recorded client bytes of a data connection, replayed on a new
  connection, fail the TLS handshake; records replayed inside the live
  connection drop it; no task runs twice;
* fallback: ``--data-port off`` on either side, and ``auto`` with the port
  + 1 taken; ``doctor`` on the default data port.

The proxy and the man in the middle are small threaded servers in this file,
with a bounded lifetime; nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import secrets
import select
import signal
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, Proc, wait_until
from pyz_helpers import (
    CHECK_NAMES,
    FAST,
    PAIR_TIMEOUT_S,
    RESPONDER_CHECK_NAMES,
    ServeNode,
    assert_expected_error,
    free_port,
    last_json,
    loopback_address,
    peer_id_of,
    printed_addresses,
    run_pyz,
    start_initiator,
    start_serve,
)

import pangea
from pangea import Client

CLIENT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 30.0  # A's `connected to peer B` line
PROXY_LIFETIME_S = 180.0  # a proxy or man in the middle stops by itself after this
DIALER_QUIET_S = 0.5  # the proxy passes an acceptor's hang-up on once the dialer was quiet this long
LOG_WAIT_S = 20.0  # a log line that follows from something the test just did
TLS_CHECK = "arrays: TLS 1.3 TLS_AES_256_GCM_SHA384"
INTEGRITY = "a TLS record failed its integrity check (bytes altered on the way); connection dropped"
WRONG_CERT = "presented a TLS certificate the peer did not announce"
NO_TOKEN = r"^pangea: data plane: refused a connection from 127\.0\.0\.1:\d+: no valid token$"
HANDSHAKE_FAILED = r"^pangea: data plane: connection from 127\.0\.0\.1:\d+ failed: "
STRANGER_CLOSED = (
    r"^pangea: data plane: closed a connection from 127\.0\.0\.1:\d+: no peer connected from there holds a token$"
)

TLS_HEADER_BYTES = 5
TLS_APPLICATION_DATA = 23

# ---------------------------------------------------------------- a TLS-record-aware TCP proxy


class RecordStream:
    """One direction of a proxied connection: every byte that passed, cut into TLS records.

    A TLS 1.3 stream is a sequence of records, each a 5-byte header (content
    type, version, length) and a body; after the handshake every record is
    ``application_data`` (23), encrypted and authenticated. Tracking the
    boundaries lets the proxy alter a byte inside a body (not a length), and
    replay whole records.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.records: list[tuple[int, int, int]] = []  # (start, end, content type) of complete records
        self._start = 0  # where the current record starts
        self._in_header = True
        self._type = 0
        self._body_end = 0

    @property
    def at_boundary(self) -> bool:
        """True when everything that passed ends with a complete record."""
        return self._in_header and self._start == len(self.data)

    def add(self, chunk: bytes | bytearray) -> list[tuple[int, int, int]]:
        """Record ``chunk``; return the record-body spans (start, end, type) it holds, in stream offsets."""
        pos = len(self.data)
        self.data += chunk
        end = len(self.data)
        spans = []
        while pos < end:
            if self._in_header:
                header_end = self._start + TLS_HEADER_BYTES
                if end < header_end:
                    break
                self._type = self.data[self._start]
                self._body_end = header_end + int.from_bytes(self.data[self._start + 3 : header_end], "big")
                self._in_header = False
                pos = header_end
            stop = min(end, self._body_end)
            if stop > pos:
                spans.append((pos, stop, self._type))
            pos = stop
            if pos == self._body_end:
                self.records.append((self._start, self._body_end, self._type))
                self._start, self._in_header = self._body_end, True
        return spans

    def record_bytes(self, first: int, last: int, content_type: int = TLS_APPLICATION_DATA) -> bytes:
        """The bytes of complete records number ``first`` to ``last - 1`` of one content type."""
        return b"".join(bytes(self.data[s:e]) for s, e, t in self.records[first:last] if t == content_type)


class ProxiedConnection:
    """One connection through a `TlsProxy`: two pump threads and what they saw.

    When the acceptor hangs up, the proxy goes on reading (and dropping) what the
    dialer still writes, and passes the hang-up on only once the dialer has been
    quiet for DIALER_QUIET_S: the dialer then learns of it from its reader, with no
    write of its own cut off. (A write cut off is its own case, pinned in
    `test_a_send_blocked_when_the_data_connection_ends_fails_over_to_libp2p`.)
    """

    def __init__(self, proxy: TlsProxy, client: socket.socket, upstream: socket.socket, index: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.first = index == 0  # flips and stalls apply to the first connection only
        self.c2s = RecordStream()  # dialer (TLS client) -> acceptor (TLS server)
        self.s2c = RecordStream()
        self.lock = threading.Lock()
        self.flipped: dict[str, int] = {}  # direction -> stream offset of the byte altered
        self._inject: list[bytes] = []  # bytes to put into c2s at the next record boundary
        self.injected = 0
        self.last_c2s = time.monotonic()  # when the dialer last sent something
        self.stalled = threading.Event()  # the dialer's bytes are no longer read (stall_c2s_after)
        self.half_close = threading.Event()  # set by the test: send the stalled dialer a FIN
        self._threads = [
            threading.Thread(target=self._pump_c2s, name="proxy-c2s", daemon=True),
            threading.Thread(target=self._pump_s2c, name="proxy-s2c", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def inject_c2s(self, data: bytes) -> None:
        """Send ``data`` towards the acceptor, between two records of the dialer's stream."""
        with self.lock:
            self._inject.append(data)

    def snapshot(self, direction: str) -> bytes:
        stream = self.c2s if direction == "c2s" else self.s2c
        with self.lock:
            return bytes(stream.data)

    def record_count(self) -> int:
        """Complete TLS records the dialer has sent so far."""
        with self.lock:
            return len(self.c2s.records)

    def c2s_records(self, first: int, last: int) -> bytes:
        """The dialer's application-data records number ``first`` to ``last - 1``, as sent."""
        with self.lock:
            return self.c2s.record_bytes(first, last)

    def _take(self, direction: str, chunk: bytearray) -> None:
        """Record a chunk, altering one record-body byte if this direction is to be flipped."""
        stream = self.c2s if direction == "c2s" else self.s2c
        flip_at = self.proxy.flip.get(direction) if self.first else None
        with self.lock:
            base = len(stream.data)
            spans = stream.add(chunk)
            if flip_at is None or direction in self.flipped:
                return
            for start, end, content_type in spans:
                pos = max(start, flip_at)
                if content_type == TLS_APPLICATION_DATA and pos < end:
                    chunk[pos - base] ^= 0x5A
                    stream.data[pos] ^= 0x5A
                    self.flipped[direction] = pos
                    return

    def _stall(self) -> bool:
        """stall_c2s_after: once that much has passed, read nothing more; True when the pump should end."""
        stall_at = self.proxy.stall_c2s_after if self.first else None
        if stall_at is None or len(self.c2s.data) < stall_at:
            return False
        self.stalled.set()  # the dialer's writes now block
        while not self.half_close.wait(0.05):
            if self.proxy.stopped():
                return True
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)  # a FIN towards the dialer, while its write is blocked
        while not self.proxy.stopped():
            time.sleep(0.05)
        return True

    def _pump_c2s(self) -> None:
        upstream_open = True
        try:
            while not self.proxy.stopped():
                if self._stall():
                    return
                with self.lock:
                    ready = upstream_open and bool(self._inject) and self.c2s.at_boundary
                    pending = self._inject.pop(0) if ready else None
                if pending is not None:
                    self.upstream.sendall(pending)
                    self.injected += len(pending)
                    continue
                if not select.select([self.client], [], [], 0.05)[0]:
                    continue
                chunk = bytearray(self.client.recv(1 << 20))
                if not chunk:
                    return
                self.last_c2s = time.monotonic()
                self._take("c2s", chunk)
                if upstream_open:
                    try:
                        self.upstream.sendall(chunk)
                    except OSError:
                        upstream_open = False  # the acceptor hung up: drain the dialer (see _pump_s2c)
        except OSError:
            return
        finally:
            self._shut_both()

    def _pump_s2c(self) -> None:
        try:
            while not self.proxy.stopped():
                if not select.select([self.upstream], [], [], 0.05)[0]:
                    continue
                try:
                    chunk = bytearray(self.upstream.recv(1 << 20))
                except OSError:
                    chunk = bytearray()
                if not chunk:
                    break
                self._take("s2c", chunk)
                self.client.sendall(chunk)
            while not self.proxy.stopped() and time.monotonic() - self.last_c2s < DIALER_QUIET_S:
                time.sleep(0.05)
        except OSError:
            return
        finally:
            self._shut_both()

    def _shut_both(self) -> None:
        """End both directions (the other pump sees EOF and ends too)."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._shut_both()
        for thread in self._threads:
            thread.join(5.0)
        for sock in (self.client, self.upstream):
            sock.close()


class TlsProxy:
    """A TCP proxy on 127.0.0.1 in front of a node's data port, for ``--fault data-via``.

    It forwards every connection to 127.0.0.1:``target_port`` and records both
    directions; ``flip={"c2s": offset}`` (or "s2c") alters one byte of a record
    body at or after that stream offset, in the first connection only. Stops
    by itself after PROXY_LIFETIME_S.
    """

    def __init__(
        self, target_port: int, *, flip: dict[str, int] | None = None, stall_c2s_after: int | None = None
    ) -> None:
        self.target_port = target_port
        self.flip = dict(flip or {})
        self.stall_c2s_after = stall_c2s_after
        self.connections: list[ProxiedConnection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._deadline = time.monotonic() + PROXY_LIFETIME_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)

    def stopped(self) -> bool:
        return self._stop.is_set() or time.monotonic() > self._deadline

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.stopped():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            self.connections.append(ProxiedConnection(self, client, upstream, len(self.connections)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._listener.close()
        for conn in self.connections:
            conn.close()

    def only_connection(self) -> ProxiedConnection:
        assert len(self.connections) == 1, f"expected one data connection through the proxy, got {self.connections}"
        return self.connections[0]


class ImpostorTls:
    """A man in the middle: a TLS 1.3 server with its own (pangea-style, Ed25519) certificate.

    It completes the handshake with whoever connects and records every byte of
    application data it then receives. Stops by itself after PROXY_LIFETIME_S.
    """

    def __init__(self) -> None:
        self.context, _, self.cert_sha256 = pangea.make_tls_contexts()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self.handshakes = 0
        self.received = bytearray()
        self.endings: list[str] = []
        self._deadline = time.monotonic() + PROXY_LIFETIME_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="impostor", daemon=True)

    def __enter__(self) -> ImpostorTls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15.0)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            raw.settimeout(5.0)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes += 1
                    while True:
                        data = tls.recv(65536)
                        if not data:
                            self.endings.append("eof")
                            break
                        self.received += data
            except (ssl.SSLError, OSError) as exc:
                self.endings.append(f"{type(exc).__name__}: {exc}")
            finally:
                raw.close()


def tls_client(port: int, timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS 1.3 client connection to 127.0.0.1:port that trusts any certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until EOF, reset or a TLS error; return the bytes and how it ended ("timeout" if it did not)."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return bytes(got), "eof"
            got += data
    except TimeoutError:
        return bytes(got), "timeout"
    except (ssl.SSLError, OSError) as exc:
        return bytes(got), type(exc).__name__


def count_lines(proc: Proc, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in list(proc.stderr_lines) if regex.search(line))


def wait_for_count(proc: Proc, pattern: str, at_least: int, what: str) -> None:
    """Wait until ``proc`` has printed at least ``at_least`` stderr lines matching ``pattern``."""
    wait_until(lambda: count_lines(proc, pattern) >= at_least, LOG_WAIT_S, what)


# ---------------------------------------------------------------- serve pairs


@dataclass
class Pair:
    """Serve node A (``--peer B``, the data plane dialer) and B (the acceptor, data port known)."""

    a: ServeNode
    b: ServeNode
    b_data_port: int

    def client(self, node: ServeNode) -> Client:
        return Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S)

    def data_plane(self, node: ServeNode) -> str:
        """What ``node`` says about its data plane with the other node (`peers()`)."""
        with self.client(node) as rpc:
            peers = rpc.peers()
        assert len(peers) == 1, peers
        return str(peers[0]["data_plane"])

    def served_by_b(self) -> int:
        with self.client(self.b) as rpc:
            return int(rpc.status()["tasks_served"])

    def run_on_b(self, kernel: str, *operands: np.ndarray, **params: float) -> tuple[np.ndarray, dict[str, Any]]:
        with self.client(self.a) as rpc:
            out = rpc.submit(kernel, *operands, placement=self.b.peer_id, **params)
            return out, rpc.last_task


@contextlib.contextmanager
def serve_pair(
    pyz: Path,
    make_home: Callable[[str], NodeHome],
    *,
    a_args: Sequence[str] = (),
    b_data_port: int | None = None,
    b_args: Sequence[str] = (),
) -> Iterator[Pair]:
    """B (``-v``, trusting A, data plane on a known port, + b_args), then A (``-v --peer B`` + a_args), connected."""
    home_a, home_b = make_home("a"), make_home("b")
    port = b_data_port if b_data_port is not None else free_port()
    with contextlib.ExitStack() as stack:
        trust = ("--allow-peer", peer_id_of(pyz, home_a))
        b = start_serve(pyz, home_b, "-v", *trust, "--data-port", str(port), *b_args, name="serve-B")
        stack.callback(b.proc.stop)
        a = start_serve(pyz, home_a, "-v", "--peer", b.address, *a_args, name="serve-A")
        stack.callback(a.proc.stop)
        a.proc.wait_for_line(rf"^pangea: connected to peer {b.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        yield Pair(a, b, port)


@contextlib.contextmanager
def proxied_pair(
    pyz: Path,
    make_home: Callable[[str], NodeHome],
    flip: dict[str, int] | None = None,
    stall_c2s_after: int | None = None,
) -> Iterator[tuple[TlsProxy, Pair]]:
    """A serve pair whose data connection goes through a `TlsProxy` (A runs with ``--fault data-via``).
    Both run with ``--compression off``: the proxy counts and alters the arrays' bytes at given offsets,
    and a slow proxy would have them packed."""
    port = free_port()
    off = ("--compression", "off")
    with TlsProxy(port, flip=flip, stall_c2s_after=stall_c2s_after) as proxy:
        with serve_pair(
            pyz, make_home, a_args=("--fault", f"data-via=127.0.0.1:{proxy.port}", *off), b_data_port=port, b_args=off
        ) as pair:
            yield proxy, pair


def assert_tls(pair: Pair, via_port: int | None = None) -> None:
    """Both nodes report the TLS data plane (A dialed ``via_port``, default B's data port)."""
    on_a = pair.data_plane(pair.a)
    assert on_a == f"TLS 1.3 TLS_AES_256_GCM_SHA384 to 127.0.0.1:{via_port or pair.b_data_port}", on_a
    wait_until(lambda: pair.data_plane(pair.b).startswith("TLS 1.3 "), LOG_WAIT_S, "B reports the TLS data plane")
    assert re.fullmatch(r"TLS 1\.3 TLS_AES_256_GCM_SHA384 from 127\.0\.0\.1:\d+", pair.data_plane(pair.b))


def matrices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


# ---------------------------------------------------------------- initiate + respond


@dataclass
class PairRun:
    initiator: Proc
    responder: Proc
    initiator_doc: dict[str, Any]
    responder_doc: dict[str, Any]
    initiator_port: int  # the libp2p port the initiator printed


def run_initiate_respond(
    pyz: Path,
    make_home: Callable[[str], NodeHome],
    initiator_args: Sequence[str] = (),
    responder_args: Sequence[str] = (),
) -> PairRun:
    """Run a whole initiate + respond pair on 127.0.0.1 (--json); both must exit 0."""
    a, b = make_home("initiator"), make_home("responder")
    with start_initiator(pyz, a, "--json", *FAST, "--timeout", "60", *initiator_args) as initiator:
        join = loopback_address(initiator)
        port = int(printed_addresses(initiator.stdout_lines)[0].split("/tcp/")[1].split("/")[0])
        cmd = [str(pyz), "respond", join, "--json", "--host", "127.0.0.1", "--timeout", "30", *responder_args]
        with Proc(cmd, env=b.env, name="responder") as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    return PairRun(initiator, responder, last_json(initiator.stdout_lines), last_json(responder.stdout_lines), port)


def check_detail(doc: dict[str, Any], name: str) -> str:
    (check,) = [c for c in doc["checks"] if c["name"] == name]
    return str(check["detail"])


def assert_all_passed(run: PairRun) -> None:
    for doc, names in ((run.initiator_doc, CHECK_NAMES), (run.responder_doc, RESPONDER_CHECK_NAMES)):
        assert [c["name"] for c in doc["checks"]] == names, doc
        assert doc["ok"] is True and all(c["ok"] for c in doc["checks"]), doc


def arrays_of(doc: dict[str, Any]) -> str:
    """The ``arrays: ...`` part of a connection check's detail."""
    detail = check_detail(doc, "connection")
    assert "; arrays: " in detail, detail
    return "arrays: " + detail.split("; arrays: ", 1)[1]


# ================================================================ 1. the fast path


def test_initiate_and_respond_carry_arrays_on_tls_13_and_pass_every_check(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    run = run_initiate_respond(pyz, make_home)
    assert_all_passed(run)
    # auto: the initiator's data plane is its libp2p port + 1, dialed at the libp2p connection's IP.
    assert arrays_of(run.responder_doc) == f"{TLS_CHECK} to 127.0.0.1:{run.initiator_port + 1}", run.responder_doc
    assert re.fullmatch(rf"{TLS_CHECK} from 127\.0\.0\.1:\d+", arrays_of(run.initiator_doc)), run.initiator_doc
    for proc in (run.initiator, run.responder):
        assert not any("unavailable" in line or "lost" in line for line in proc.stderr_lines), proc.output()


def test_serve_peers_report_the_tls_data_plane_and_remote_work_is_right(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with serve_pair(pyz, make_home) as pair:
        assert_tls(pair)
        for node, direction in ((pair.a, "to"), (pair.b, "from")):
            result = run_pyz(pyz, ["call", "--rpc", node.rpc, "--json", "peers"], node.home.env)
            assert result.returncode == 0, result.stderr
            (peer,) = json.loads(result.stdout)
            assert peer["data_plane"].startswith(f"TLS 1.3 TLS_AES_256_GCM_SHA384 {direction} 127.0.0.1:"), peer
        before = pair.served_by_b()
        for seed, n in enumerate((8, 300)):
            x, y = matrices(n, seed)
            out, task = pair.run_on_b("matmul", x, y)
            np.testing.assert_allclose(out, x @ y)
            assert task["ran_on"] == pair.b.peer_id and len(task["attempts"]) == 1, task
        assert pair.served_by_b() == before + 2
        assert_tls(pair)  # still on TLS afterwards


def test_with_psk_on_every_interface_the_data_plane_dials_the_real_address_and_peers_list_no_wildcard(
    pyz: Path, make_home: Callable[[str], NodeHome], tmp_path: Path
) -> None:
    key = tmp_path / "swarm.key"
    made = run_pyz(pyz, ["psk", str(key)], make_home("keymaker").env)
    assert made.returncode == 0, made.stderr
    # Both listen on 0.0.0.0 and announce it; A dials B's 127.0.0.1 address.
    wide = ("--psk", str(key), "--host", "0.0.0.0")
    with serve_pair(pyz, make_home, a_args=wide, b_args=wide) as pair:
        assert_tls(pair)  # A dialed 127.0.0.1:<B's data port>, not 0.0.0.0
        for node in (pair.a, pair.b):
            result = run_pyz(pyz, ["call", "--rpc", node.rpc, "--json", "peers"], node.home.env)
            assert result.returncode == 0, result.stderr
            (peer,) = json.loads(result.stdout)
            assert peer["addresses"], peer
            assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in peer["addresses"]), peer
        x, y = matrices(64, 3)
        out, task = pair.run_on_b("matmul", x, y)
        np.testing.assert_allclose(out, x @ y)
    for node in (pair.a, pair.b):
        logged = "\n".join(node.proc.stderr_lines) + node.session_log()
        # Its own "listening on 0.0.0.0:PORT" is true; a peer's address never is.
        assert not re.search(r"/ip4/0\.0\.0\.0/|\b(to|from|at) 0\.0\.0\.0\b", logged), node.proc.output()


def test_concurrent_tasks_both_ways_share_the_tls_connection_and_are_right(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    """A sends tasks to B while B sends tasks to A, several at once, some larger than one 4 MiB write:
    frames of both directions interleave on the one TLS connection (full duplex)."""
    sizes = (16, 700, 1100, 300, 900, 64)  # 1100 x 1100 float64: 9.2 MiB per operand

    def work(pair: Pair, sender: ServeNode, worker: ServeNode, n: int, seed: int) -> tuple[bool, dict[str, Any]]:
        x, y = matrices(n, seed)
        with pair.client(sender) as rpc:
            out = rpc.submit("matmul", x, y, placement=worker.peer_id)
            return bool(np.allclose(out, x @ y)), rpc.last_task

    with serve_pair(pyz, make_home) as pair:
        assert_tls(pair)
        jobs = [(pair.a, pair.b, n, seed) for seed, n in enumerate(sizes)]
        jobs += [(pair.b, pair.a, n, 100 + seed) for seed, n in enumerate(reversed(sizes))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: work(pair, *job), jobs))
        for (sender, worker, n, _), (right, task) in zip(jobs, results, strict=True):
            assert right, (sender.peer_id, n, task)
            assert task["ran_on"] == worker.peer_id and len(task["attempts"]) == 1, task
        assert_tls(pair)  # nothing broke on the way
        for node in (pair.a, pair.b):
            assert not any(" lost: " in line for line in node.proc.stderr_lines), node.proc.output()


# ================================================================ 2. confidentiality


def test_a_proxy_on_the_data_path_sees_only_ciphertext(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    marker = b"PANGEA<secret>16"  # 16 bytes: two float64 values, finite
    operand = np.frombuffer(marker * 65536, dtype=np.float64).reshape(256, 512)  # 1 MiB of the marker
    assert np.isfinite(operand).all()
    with proxied_pair(pyz, make_home) as (proxy, pair):
        pair.a.proc.wait_for_line(rf"fault injection: dialing the data plane via 127\.0\.0\.1:{proxy.port}")
        assert_tls(pair, via_port=proxy.port)
        out, task = pair.run_on_b("add", operand, np.zeros_like(operand))  # the result is the operand again
        assert task["ran_on"] == pair.b.peer_id and len(task["attempts"]) == 1, task
        np.testing.assert_array_equal(out, operand)
        assert out.tobytes() == marker * 65536
        conn = proxy.only_connection()
        c2s, s2c = conn.snapshot("c2s"), conn.snapshot("s2c")
    assert len(c2s) >= 2 * operand.nbytes, "the operands did not go through the proxy"
    assert len(s2c) >= operand.nbytes, "the result did not go through the proxy"
    for name, seen in (("dialer -> acceptor", c2s), ("acceptor -> dialer", s2c)):
        for piece in (marker, marker[:8], marker[8:]):
            assert piece not in seen, f"{piece!r} readable in the {name} bytes"
        assert seen[:1] == b"\x16", f"{name} does not start with a TLS handshake record"
    # After the handshake everything is an encrypted application_data record.
    assert {t for _, _, t in conn.c2s.records[2:]} == {TLS_APPLICATION_DATA}, conn.c2s.records[:4]


# ================================================================ 3. tampering


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_a_flipped_byte_drops_the_data_connection_and_the_task_is_retried_right(
    pyz: Path, make_home: Callable[[str], NodeHome], direction: str
) -> None:
    """One byte of a 2 MiB operand (c2s, dialer A -> acceptor B) or result (s2c) altered after 1 MiB."""
    with proxied_pair(pyz, make_home, flip={direction: 1 << 20}) as (proxy, pair):
        assert_tls(pair, via_port=proxy.port)
        before = pair.served_by_b()
        x, y = matrices(512, 1)  # 2 MiB each way and back
        out, first = pair.run_on_b("matmul", x, y)
        np.testing.assert_allclose(out, x @ y)
        assert first["ran_on"] in (pair.b.peer_id, "local"), first
        conn = proxy.only_connection()
        assert direction in conn.flipped, "the proxy altered no byte"
        assert conn.flipped[direction] >= 1 << 20
        # The reader of the altered record says what happened.
        reader = pair.b if direction == "c2s" else pair.a
        line = reader.proc.wait_for_line(rf"^pangea: data plane with \S+ lost: .*{re.escape(INTEGRITY)}", LOG_WAIT_S)
        assert "going on with the libp2p stream" in line.string
        wait_until(
            lambda: (
                pair.data_plane(pair.a).startswith("libp2p stream (data connection lost: ")
                and pair.data_plane(pair.b).startswith("libp2p stream (data connection lost: ")
            ),
            LOG_WAIT_S,
            "both nodes report the lost data connection",
        )
        attempts = first["attempts"]
        assert attempts[0]["worker"] == pair.b.peer_id and attempts[-1]["outcome"] == "ok", first
        if direction == "s2c":  # B ran it, its result was lost on the way: the attempt failed and was retried
            assert len(attempts) >= 2 and attempts[0]["outcome"].startswith("disconnected"), first
        # The session goes on (on the libp2p stream) and B keeps serving.
        for seed in (2, 3):
            x, y = matrices(200, seed)
            out, task = pair.run_on_b("matmul", x, y)
            np.testing.assert_allclose(out, x @ y)
            assert task["ran_on"] == pair.b.peer_id and len(task["attempts"]) == 1, task
        # Each task ran on B once: the altered request never reached a kernel (c2s), the run whose
        # result was altered counts once (s2c), the retry counts if it ran on B.
        runs_of_first = (direction == "s2c") + (first["ran_on"] == pair.b.peer_id)
        assert pair.served_by_b() == before + runs_of_first + 2
        assert len(proxy.connections) == 1  # no second data connection
        for node in (pair.a, pair.b):
            assert node.proc.returncode is None
            assert not any("Traceback" in line for line in node.proc.stderr_lines), node.proc.output()


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive buffer (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def wait_until_dialer_blocked(proxy: TlsProxy) -> ProxiedConnection:
    """Wait until the stalled proxy reads no more and the dialer's bytes pile up unread (its write blocks)."""
    wait_until(lambda: bool(proxy.connections), LOG_WAIT_S, "the data connection through the proxy")
    conn = proxy.only_connection()
    assert conn.stalled.wait(LOG_WAIT_S), "the dialer never sent stall_c2s_after bytes"
    seen = -1
    deadline = time.monotonic() + LOG_WAIT_S
    while (waiting := unread_bytes(conn.client)) <= 0 or waiting != seen:  # growing: still being written
        assert time.monotonic() < deadline, "the dialer's unread bytes never settled"
        seen = waiting
        time.sleep(0.3)
    return conn


def test_a_send_blocked_when_the_data_connection_ends_fails_over_to_libp2p(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    """The proxy stops reading A's 17 MiB operand after 1 MiB (A's write blocks), then sends A a FIN."""
    with proxied_pair(pyz, make_home, stall_c2s_after=1 << 20) as (proxy, pair):
        assert_tls(pair, via_port=proxy.port)
        x, y = matrices(1500, 8)  # 17 MiB each: far more than the socket buffers hold
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(pair.run_on_b, "matmul", x, y)
            wait_until_dialer_blocked(proxy).half_close.set()
            out, task = big.result(timeout=120)
        np.testing.assert_allclose(out, x @ y)
        assert task["attempts"][-1]["outcome"] == "ok", task
        assert pair.data_plane(pair.a).startswith("libp2p stream (data connection lost: "), pair.data_plane(pair.a)


def test_a_request_queued_behind_a_blocked_send_runs_once_when_the_data_connection_ends(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with proxied_pair(pyz, make_home, stall_c2s_after=1 << 20) as (proxy, pair):
        assert_tls(pair, via_port=proxy.port)
        x, y = matrices(1500, 9)
        v = np.arange(10.0)
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(pair.run_on_b, "matmul", x, y)
            conn = wait_until_dialer_blocked(proxy)
            small = pool.submit(pair.run_on_b, "scale", v, factor=7.0)
            with pair.client(pair.a) as rpc:
                wait_until(lambda: rpc.status()["tasks_in_flight"] >= 2, LOG_WAIT_S, "both tasks in flight on A")
            time.sleep(0.5)  # the small request reaches the send lock the big one holds
            conn.half_close.set()
            out, task = small.result(timeout=120)
            with contextlib.suppress(Exception):  # the big one is the other test's subject
                big.result(timeout=120)
        np.testing.assert_array_equal(out, v * 7.0)
        stray = r"^pangea: dropping a result for task \d+, which nobody is waiting for"
        with contextlib.suppress(AssertionError):  # only there when the bug is
            pair.a.proc.wait_for_line(stray, timeout=5)
        runs_on_b = count_lines(pair.b.proc, r"^pangea: task \d+ from \S+: scale done in ")
        assert runs_on_b == (1 if task["ran_on"] == pair.b.peer_id else 0), (task, pair.b.proc.output())
        assert count_lines(pair.a.proc, stray) == 0, pair.a.proc.output()
        # Nor is the big request sent again after it failed.
        assert not any("is already in flight" in line for line in pair.b.proc.stderr_lines), pair.b.proc.output()


# ================================================================ 4. a man in the middle


def test_a_man_in_the_middle_with_its_own_certificate_gets_nothing_and_the_pair_falls_back(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with ImpostorTls() as impostor:
        run = run_initiate_respond(pyz, make_home, responder_args=("--fault", f"data-via=127.0.0.1:{impostor.port}"))
    assert_all_passed(run)
    assert impostor.accepted == 1 and impostor.handshakes == 1, (impostor.accepted, impostor.endings)
    assert bytes(impostor.received) == b"", "the dialer sent data to a server with the wrong certificate"
    responder_arrays = arrays_of(run.responder_doc)
    assert responder_arrays.startswith(f"arrays: libp2p stream (127.0.0.1:{impostor.port} {WRONG_CERT} "), (
        responder_arrays
    )
    assert responder_arrays.endswith("not sending anything)"), responder_arrays
    initiator_arrays = arrays_of(run.initiator_doc)
    assert initiator_arrays.startswith("arrays: libp2p stream (the peer could not use our data plane: "), (
        initiator_arrays
    )
    assert WRONG_CERT in initiator_arrays, initiator_arrays
    for proc in (run.responder, run.initiator):
        line = proc.wait_for_line(r"^pangea: data plane with \S+ unavailable: ", stream="stderr", timeout=1).string
        assert WRONG_CERT in line and line.endswith("; arrays travel on the libp2p stream (slower)"), line


# ================================================================ 5. replay


def test_a_recorded_data_connection_replayed_on_a_new_connection_is_refused(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with proxied_pair(pyz, make_home) as (proxy, pair):
        assert_tls(pair, via_port=proxy.port)
        x, y = matrices(64, 4)
        out, task = pair.run_on_b("matmul", x, y)
        np.testing.assert_allclose(out, x @ y)
        assert task["ran_on"] == pair.b.peer_id
        served = pair.served_by_b()
        recorded = proxy.only_connection().snapshot("c2s")  # ClientHello ... token ... the task
        assert len(recorded) > 2 * x.nbytes
        # No token waits now, so B closes the replay before TLS; were one waiting for this
        # address, the replayed ClientHello would fail the handshake (fresh keys).
        refused = f"{HANDSHAKE_FAILED}|{STRANGER_CLOSED}"
        failures = count_lines(pair.b.proc, refused)

        with socket.create_connection(("127.0.0.1", pair.b_data_port), timeout=10) as replay:
            with contextlib.suppress(OSError):  # B may hang up before it has read everything
                replay.sendall(recorded)
            answer, ended = read_until_closed(replay)
        assert ended != "timeout", "B kept the replayed connection open"
        assert answer[:1] in (b"\x16", b"\x15", b""), answer[:16]  # a fresh ServerHello, or an alert
        wait_for_count(pair.b.proc, refused, failures + 1, "B logged the replay's refusal")
        assert not any("no valid token" in line for line in pair.b.proc.stderr_lines), pair.b.proc.output()
        assert pair.served_by_b() == served, "the replayed task ran again"
        # The real data connection is untouched.
        assert_tls(pair, via_port=proxy.port)
        x, y = matrices(64, 5)
        out, task = pair.run_on_b("matmul", x, y)
        np.testing.assert_allclose(out, x @ y)
        assert pair.served_by_b() == served + 1
        done = count_lines(pair.b.proc, r"^pangea: task \d+ from \S+: matmul done in ")
        assert done == served + 1, pair.b.proc.output()


def test_records_replayed_inside_the_data_connection_drop_it_and_no_task_runs_twice(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with proxied_pair(pyz, make_home) as (proxy, pair):
        assert_tls(pair, via_port=proxy.port)
        conn = proxy.only_connection()
        first = conn.record_count()
        x = np.arange(65536, dtype=np.float64).reshape(256, 256)
        out, task = pair.run_on_b("scale", x, factor=3.0)
        np.testing.assert_array_equal(out, x * 3.0)
        assert task["ran_on"] == pair.b.peer_id
        served = pair.served_by_b()
        request = conn.c2s_records(first, conn.record_count())
        assert len(request) > x.nbytes, "the request's records were not recorded"

        conn.inject_c2s(request)  # the same records again, after the task is done
        line = pair.b.proc.wait_for_line(rf"^pangea: data plane with \S+ lost: .*{re.escape(INTEGRITY)}", LOG_WAIT_S)
        assert "going on with the libp2p stream" in line.string
        assert conn.injected == len(request)
        wait_until(
            lambda: pair.data_plane(pair.a).startswith("libp2p stream (data connection lost: "),
            LOG_WAIT_S,
            "A reports the lost data connection",
        )
        assert pair.served_by_b() == served, "a replayed record ran the task again"
        # Later tasks still succeed, on the libp2p stream, each once.
        for factor in (2.0, 5.0):
            out, task = pair.run_on_b("scale", x, factor=factor)
            np.testing.assert_array_equal(out, x * factor)
            assert task["ran_on"] == pair.b.peer_id and len(task["attempts"]) == 1, task
        assert pair.served_by_b() == served + 2
        assert count_lines(pair.b.proc, r"^pangea: task \d+ from \S+: scale done in ") == served + 2
        assert len(proxy.connections) == 1


# ================================================================ 6. tokens and unauthenticated connections


@contextlib.contextmanager
def waiting_token_pair(pyz: Path, make_home: Callable[[str], NodeHome]) -> Iterator[Pair]:
    """A serve pair whose dialer A sends its data connection into a black hole (a port that
    accepts and never answers): for about DATA_CONNECT_S after the session opens, B holds
    an unused token for 127.0.0.1, so connections from there may begin their handshake."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        with serve_pair(pyz, make_home, a_args=("--fault", f"data-via=127.0.0.1:{hole.getsockname()[1]}")) as pair:
            yield pair
    finally:
        hole.close()


def test_a_connection_from_an_address_without_a_waiting_token_is_closed_before_tls(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    with serve_pair(pyz, make_home) as pair:
        assert_tls(pair)  # A's token is used: nobody at 127.0.0.1 holds one now
        for _ in range(3):
            closed = count_lines(pair.b.proc, STRANGER_CLOSED)
            with socket.create_connection(("127.0.0.1", pair.b_data_port), timeout=10) as plain:
                with contextlib.suppress(OSError):
                    plain.sendall(pangea.DATA_MAGIC + bytes(32))
                _, ended = read_until_closed(plain)
            assert ended != "timeout", "the node kept a connection without a waiting token open"
            wait_for_count(pair.b.proc, STRANGER_CLOSED, closed + 1, "B logged the closed connection")
        x, y = matrices(100, 6)
        out, task = pair.run_on_b("matmul", x, y)
        np.testing.assert_allclose(out, x @ y)
        assert task["ran_on"] == pair.b.peer_id
        assert_tls(pair)
        assert pair.b.proc.returncode is None


def test_while_a_token_waits_a_wrong_token_is_refused_and_stalled_handshakes_are_evicted_oldest_first(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    limit = pangea.DATA_MAX_HANDSHAKES
    with waiting_token_pair(pyz, make_home) as pair:
        sockets: list[socket.socket] = []
        try:
            for hello in (
                pangea.DATA_MAGIC + secrets.token_bytes(pangea.DATA_TOKEN_BYTES),  # a guessed token
                b"XXXX" + secrets.token_bytes(pangea.DATA_TOKEN_BYTES),  # not even the magic
            ):
                with tls_client(pair.b_data_port) as tls:
                    assert tls.version() == "TLSv1.3"
                    tls.sendall(hello)
                    answer, ended = read_until_closed(tls)
                assert answer in (b"\x00", b""), answer
                assert ended != "timeout", "the node kept a connection without a valid token open"
            for _ in range(limit + 2):  # TCP only: no ClientHello, so each one waits in its handshake
                sockets.append(socket.create_connection(("127.0.0.1", pair.b_data_port), timeout=10))
            evicting = rf"^pangea: data plane: cancelled the handshake of 127\.0\.0\.1:\d+, the oldest of {limit} "
            wait_for_count(pair.b.proc, evicting, 2, "B evicted the two oldest stalled handshakes")
        finally:
            for sock in sockets:
                sock.close()
        wait_for_count(pair.b.proc, NO_TOKEN, 2, "B logged the refused tokens")
        x, y = matrices(100, 6)
        out, task = pair.run_on_b("matmul", x, y)  # on the libp2p stream: A's data connection went nowhere
        np.testing.assert_allclose(out, x @ y)
        assert task["ran_on"] == pair.b.peer_id
        assert pair.b.proc.returncode is None


class StalledConnections:
    """A stranger's plain TCP connections to a data port that send nothing, or the first
    bytes of a ClientHello (a TLS record header announcing 512 bytes), and then wait; one
    the node closes is opened again within KEEP_S, so there are always ``count``."""

    KEEP_S = 0.5

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.sockets = [self._open(i) for i in range(count)]
        self.opened = count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _open(self, i: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if i % 2:
            with contextlib.suppress(OSError):
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        return sock

    def _keep(self) -> None:
        while not self._stop.wait(self.KEEP_S):
            for i, sock in enumerate(self.sockets):
                readable, _, _ = select.select([sock], [], [], 0)
                if not readable:
                    continue
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    if sock.recv(1) != b"":
                        continue
                sock.close()
                with contextlib.suppress(OSError):
                    self.sockets[i] = self._open(i)
                    self.opened += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()


def test_32_stalled_handshakes_from_a_stranger_do_not_keep_a_trusted_peer_off_the_data_plane(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    # Today's main: 16 of them hold every handshake slot for 10 s; the trusted peer's data
    # connection is closed at once and its session stays on the libp2p stream for good.
    home_a, home_b = make_home("a"), make_home("b")
    port = free_port()
    trust = ("--allow-peer", peer_id_of(pyz, home_a))
    b = start_serve(pyz, home_b, "-v", *trust, "--data-port", str(port), name="serve-B")
    try:
        stalled = StalledConnections(port, 32)
        try:
            a = start_serve(pyz, home_a, "-v", "--peer", b.address, name="serve-A")
            try:
                a.proc.wait_for_line(rf"^pangea: connected to peer {b.peer_id}$", timeout=CONNECT_TIMEOUT_S)
                pair = Pair(a, b, port)
                assert_tls(pair)
                x, y = matrices(128, 7)
                out, task = pair.run_on_b("matmul", x, y)
                np.testing.assert_allclose(out, x @ y)
                assert task["ran_on"] == b.peer_id
            finally:
                a.proc.stop()
        finally:
            stalled.close()
        assert b.proc.returncode is None, b.proc.output()
    finally:
        b.proc.stop()


# ================================================================ 7. fallback


def test_data_port_off_on_the_initiator_falls_back_to_libp2p_and_every_check_passes(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    run = run_initiate_respond(pyz, make_home, initiator_args=("--data-port", "off"))
    assert_all_passed(run)
    assert arrays_of(run.responder_doc) == "arrays: libp2p stream (the peer has no data plane (--data-port off there))"
    # The initiator's own reason stands; the responder's DataPlane message does not replace it (it did).
    assert arrays_of(run.initiator_doc) == "arrays: libp2p stream (this node's data plane is off (--data-port off))"
    for proc, reason in (
        (run.responder, "the peer has no data plane"),
        (run.initiator, "this node's data plane is off"),
    ):
        line = proc.wait_for_line(r"^pangea: data plane with \S+ unavailable: ", stream="stderr", timeout=1).string
        assert reason in line, line
        assert count_lines(proc, r"^pangea: data plane with \S+ unavailable: ") == 1, proc.output()


def test_data_port_off_on_the_responder_falls_back_to_libp2p_and_every_check_passes(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    run = run_initiate_respond(pyz, make_home, responder_args=("--data-port", "off"))
    assert_all_passed(run)
    assert arrays_of(run.responder_doc) == "arrays: libp2p stream (this node's data plane is off (--data-port off))"
    initiator_arrays = arrays_of(run.initiator_doc)
    assert initiator_arrays.startswith("arrays: libp2p stream (the peer could not use our data plane: "), (
        initiator_arrays
    )
    assert "data plane is off" in initiator_arrays, initiator_arrays
    for proc in (run.initiator, run.responder):
        line = proc.wait_for_line(r"^pangea: data plane with \S+ unavailable: ", stream="stderr", timeout=1).string
        assert "data plane is off" in line and line.endswith("arrays travel on the libp2p stream (slower)"), line


def port_pair() -> tuple[int, socket.socket]:
    """A free port P whose P + 1 this test holds (listening), so `auto` finds it taken."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        blocker = socket.socket()
        try:
            blocker.bind(("127.0.0.1", port + 1))
            blocker.listen(1)
        except OSError:
            blocker.close()
            continue
        return port, blocker
    raise AssertionError("no free port P with a free P + 1")


def test_auto_data_port_taken_warns_and_takes_another_port(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    port, blocker = port_pair()
    with blocker:
        run = run_initiate_respond(pyz, make_home, initiator_args=("--port", str(port)))
    assert run.initiator_port == port
    assert_all_passed(run)
    warning = run.initiator.wait_for_line(r"^pangea: cannot listen for the data plane on ", stream="stderr", timeout=1)
    assert warning.string.startswith(f"pangea: cannot listen for the data plane on 127.0.0.1:{port + 1}: "), warning
    assert warning.string.endswith("; the data plane takes any free port instead"), warning.string
    match = re.fullmatch(rf"{TLS_CHECK} to 127\.0\.0\.1:(\d+)", arrays_of(run.responder_doc))
    assert match is not None, run.responder_doc
    assert int(match.group(1)) not in (port, port + 1)


def test_an_explicit_data_port_that_is_taken_is_a_setup_error(pyz: Path, pangea_home: NodeHome) -> None:
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        taken = int(blocker.getsockname()[1])
        result = run_pyz(
            pyz,
            ["initiate", "--host", "127.0.0.1", "--port", "0", "--data-port", str(taken), "--timeout", "5"],
            pangea_home.env,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"cannot listen for the data plane on 127.0.0.1:{taken}")


def test_a_bad_data_port_is_a_usage_error(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, ["serve", "--data-port", "lots"], pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--data-port" in result.stderr and "'lots'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ================================================================ doctor


def free_port_with_next() -> int:
    """A port P on 127.0.0.1 such that P and P + 1 were both free a moment ago."""
    port, blocker = port_pair()
    blocker.close()
    return port


def doctor_peer(pyz: Path, home: NodeHome, address: str) -> dict[str, Any]:
    result = run_pyz(pyz, ["doctor", address, "--json", "--timeout", "10"], home.env)
    assert "Traceback" not in result.stderr, result.stderr
    doc = last_json(result.stdout.splitlines())
    assert result.returncode == (0 if doc["ok"] else 1), result.stdout + result.stderr
    return doc


def test_doctor_reports_the_default_data_port_reachable(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    port = free_port_with_next()
    node = start_serve(pyz, make_home("node"), port=port, name="serve")
    try:
        doc = doctor_peer(pyz, make_home("doctor"), node.address)
    finally:
        node.proc.stop()
    peer = doc["peer"]
    assert peer["libp2p"] == "ok", peer
    assert peer["data_plane"] == f"TCP port {port + 1} (the default data port) reaches it", peer
    assert "data_plane_blocked" not in peer, peer
    assert doc["ok"] is True and doc["verdict"].startswith("the peer is reachable and speaks pangea"), doc


def test_doctor_does_not_blame_a_firewall_for_a_node_without_a_data_plane(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    port = free_port_with_next()
    node = start_serve(pyz, make_home("node"), "--data-port", "off", port=port, name="serve")
    try:
        doc = doctor_peer(pyz, make_home("doctor"), node.address)
    finally:
        node.proc.stop()
    assert doc["peer"]["libp2p"] == "ok", doc
    assert "data_plane_blocked" not in doc["peer"], doc
    assert f"let TCP port {port + 1} through" not in doc["verdict"], doc["verdict"]


# ================================================================ 6. a task given up by its client


# Lines that mean the session or its data connection went down: none may follow a cancel.
SESSION_DAMAGE = (
    "dropping peer",
    "closed the data connection",
    "in the middle of a frame",
    "data plane with",  # "... lost: ..." or "... unavailable: ..."
    "session with",  # "session with X closed"
    "disconnected",
    "protocol error",
)


STALL_S = 6.0  # B's --fault slow: each task waits this long before it runs


def the_peer(pair: Pair, node: ServeNode) -> dict[str, Any]:
    """``call --json peers`` on ``node``: its one peer."""
    result = run_pyz(pyz_of(node), ["call", "--rpc", node.rpc, "--json", "peers"], node.home.env)
    assert result.returncode == 0, result.stderr
    (peer,) = json.loads(result.stdout)
    return {**peer, "measured_at": time.monotonic()}


def pyz_of(node: ServeNode) -> str:
    return node.proc.cmd[0]


def cancelled_on(pair: Pair, node: ServeNode) -> int:
    with pair.client(node) as rpc:
        return int(rpc.status()["tasks_cancelled"])


def assert_no_session_damage(pair: Pair, marks: tuple[int, int]) -> None:
    for node, mark in zip((pair.a, pair.b), marks, strict=True):
        damage = [line for line in node.stderr_since(mark) if any(word in line for word in SESSION_DAMAGE)]
        assert not damage, "\n".join(node.stderr_since(mark))


def assert_same_session_carries_the_next_task_on_tls(
    pair: Pair, before: tuple[dict[str, Any], dict[str, Any]], n: int
) -> None:
    """The next task runs on B over the same session and the same data connection (no reconnect)."""
    x, y = matrices(n, 99)
    a_old = the_peer(pair, pair.a)
    out, task = pair.run_on_b("matmul", x, y)
    np.testing.assert_allclose(out, x @ y)
    assert task["ran_on"] == pair.b.peer_id and [a["outcome"] for a in task["attempts"]] == ["ok"], task
    after = the_peer(pair, pair.a), the_peer(pair, pair.b)
    for old, new in zip(before, after, strict=True):
        assert new["data_plane"] == old["data_plane"] and new["data_plane"].startswith("TLS 1.3 "), (old, new)
        # the same session all along, not a new one
        assert new["connected_s"] - old["connected_s"] > new["measured_at"] - old["measured_at"] - 1.5, (old, new)
    a_new = after[0]
    # the operands went out on the data connection, the result came back on it
    assert a_new["data_bytes_out"] - a_old["data_bytes_out"] >= x.nbytes + y.nbytes, (a_old, a_new)
    assert a_new["data_bytes_in"] - a_old["data_bytes_in"] >= x.nbytes, (a_old, a_new)


def test_a_client_timeout_on_a_large_remote_task_cancels_it_on_the_worker_and_keeps_the_data_plane(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    """A timeout shorter than the transfer: A gives up while the request is on the data connection."""
    with serve_pair(pyz, make_home) as pair:
        assert_tls(pair)
        marks = len(pair.a.proc.stderr_lines), len(pair.b.proc.stderr_lines)
        before = the_peer(pair, pair.a), the_peer(pair, pair.b)
        x, y = matrices(2000, 5)  # 32 MB per operand
        with pair.client(pair.a) as rpc:
            with pytest.raises(pangea.TaskError) as caught:
                rpc.submit("matmul", x, y, placement=pair.b.peer_id, timeout_s=0.05)
        assert caught.value.kind == "deadline", caught.value
        wait_until(lambda: cancelled_on(pair, pair.b) == 1, LOG_WAIT_S, "B counts the cancelled task")
        pair.b.proc.wait_for_line(rf"task \d+ from {pair.a.peer_id} cancelled by its sender", timeout=LOG_WAIT_S)
        assert_same_session_carries_the_next_task_on_tls(pair, before, 1000)
        assert cancelled_on(pair, pair.b) == 1 and cancelled_on(pair, pair.a) == 0
        assert_no_session_damage(pair, marks)


def test_a_call_interrupted_mid_task_cancels_it_on_the_worker_and_keeps_the_data_plane(
    pyz: Path, make_home: Callable[[str], NodeHome]
) -> None:
    """Ctrl-C of `call matmul` while B runs the task (B stalls 6 s per task): its client
    disconnects, A gives the task up, B stops it at once and the session goes on."""
    with serve_pair(pyz, make_home, b_args=("--fault", f"slow={STALL_S:g}")) as pair:
        assert_tls(pair)
        marks = len(pair.a.proc.stderr_lines), len(pair.b.proc.stderr_lines)
        before = the_peer(pair, pair.a), the_peer(pair, pair.b)
        size = 1500
        cmd = [str(pyz), "call", "--rpc", pair.a.rpc, "matmul", "--size", str(size), "--placement", pair.b.peer_id]
        with Proc(cmd, env=pair.a.home.env, name="call") as call:
            operands = 2 * size * size * 8
            wait_until(
                lambda: the_peer(pair, pair.b)["data_bytes_in"] - before[1]["data_bytes_in"] >= operands,
                CLIENT_TIMEOUT_S,
                "the request reaches B",
            )
            started = time.monotonic()
            call.popen.send_signal(signal.SIGINT)
            assert call.wait(timeout=20) == 130, call.output()
        wait_until(lambda: cancelled_on(pair, pair.b) == 1, LOG_WAIT_S, "B counts the cancelled task")
        assert time.monotonic() - started < STALL_S - 2, "B stopped the task only when its stall ended"
        pair.b.proc.wait_for_line(rf"task \d+ from {pair.a.peer_id} cancelled by its sender", timeout=LOG_WAIT_S)
        assert_same_session_carries_the_next_task_on_tls(pair, before, 300)
        assert cancelled_on(pair, pair.b) == 1
        assert_no_session_damage(pair, marks)

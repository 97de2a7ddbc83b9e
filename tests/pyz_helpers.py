"""Small helpers for the integration and netns tests of the built pangea.pyz.

They read what `pangea.pyz initiate` / `respond` print (the peer ID line, the
address block, the ``--json`` last line, the session directories) and check
the shape of an expected error on stderr. Process handling itself is
tests/helpers.py's `Proc`; this module only adds pangea's own vocabulary.

Tests import it as ``from pyz_helpers import ...``, like helpers.py
(tests/conftest.py puts tests/ on ``sys.path``). It sits in tests/ rather than
tests/integration/ so tests/netns/ can share it, and so mypy, which maps a
file in a directory without ``__init__.py`` to its bare name, sees one module.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import READY_TIMEOUT_S, NodeHome, Proc, make_node_home

# One pair run (initiate + respond with --size 512 --transfer-mib 16) takes
# 3-6 s on this machine; a cold first run of the pyz adds ~7 s of extraction.
PAIR_TIMEOUT_S = 90.0
# Small work sizes for runs whose figures do not matter.
FAST = ["--size", "512", "--transfer-mib", "16"]
# How long a short-lived command (usage error, --version) may take.
QUICK_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 10.0  # one HTTP GET of /metrics

PEER_ID_LINE = r"pangea \S+ {role}, peer ID (12D3KooW\w+)"
INITIATOR_READY = r"^Waiting up to \d+ s for a responder"
RESPONDER_CONNECTED = r"^Connected to initiator 12D3KooW\w+"
CHECK_NAMES = ["connection", "local execution", "delegation", "aggregation", "throughput", "fallback"]
RESPONDER_CHECK_NAMES = ["connection", "tasks", "finish"]


def run_pyz(
    pyz: Path | str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = QUICK_TIMEOUT_S,
    interpreter: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the pyz (by its shebang, or with `interpreter`) to completion; no stdin."""
    cmd = [interpreter, str(pyz)] if interpreter else [str(pyz)]
    return subprocess.run(
        [*cmd, *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def build_stamp(pyz: Path) -> dict[str, Any]:
    """The build stamp (_pangea_build.py) inside the pyz: BUILT_FOR, PYTHON_VERSION, ..."""
    with zipfile.ZipFile(pyz) as archive:
        source = archive.read("site-packages/_pangea_build.py")
    stamp: dict[str, Any] = {}
    exec(source, stamp)  # our own generated stamp file
    return {k: v for k, v in stamp.items() if k.isupper()}


DATA_PORT_TAKEN = "pangea: cannot listen for the data plane on "


def assert_expected_error(stderr: str | Sequence[str], *needles: str) -> str:
    """Check the shape of an expected failure on stderr and return its error line.

    Exactly one ``pangea: error: ...`` line, then at most one ``hint: ...``
    line, nothing else, and no traceback. Every needle must occur in the error line.
    A run whose data port (its libp2p port + 1) was taken by another process on a busy
    machine says so first, as it should; that warning line is not the failure checked here.
    """
    lines = stderr.splitlines() if isinstance(stderr, str) else list(stderr)
    lines = [line for line in lines if not line.startswith(DATA_PORT_TAKEN)]
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert lines, "stderr is empty; expected one 'pangea: error: ...' line"
    assert lines[0].startswith("pangea: error: "), text
    assert len(lines) <= 2, f"expected one error line and at most one hint, got:\n{text}"
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def peer_id_from(lines: Sequence[str], role: str) -> str:
    """The node's own peer ID from its ``pangea X <role>, peer ID <id>`` line."""
    pattern = re.compile(PEER_ID_LINE.format(role=role))
    for line in lines:
        match = pattern.search(line)
        if match:
            return match.group(1)
    raise AssertionError(f"no {role} peer ID line in:\n" + "\n".join(lines))


def printed_addresses(lines: Sequence[str]) -> list[str]:
    """The multiaddrs printed under ``Copy this address for responder:``."""
    try:
        start = lines.index("Copy this address for responder:") + 1
    except ValueError:
        raise AssertionError("no 'Copy this address for responder:' line in:\n" + "\n".join(lines)) from None
    out = []
    for line in lines[start:]:
        if not line.startswith("  /"):
            break
        out.append(line.strip())
    return out


def last_json(lines: Sequence[str]) -> dict[str, Any]:
    """Parse the last stdout line as the --json object."""
    assert lines, "no stdout at all"
    try:
        doc = json.loads(lines[-1])
    except ValueError:
        raise AssertionError(f"last stdout line is not JSON: {lines[-1]!r}") from None
    assert isinstance(doc, dict), doc
    return doc


def session_dirs(home: NodeHome, role: str | None = None) -> list[Path]:
    """The session directories under $PANGEA_HOME/compute_test (of one role, or all)."""
    root = home.pangea_home / "compute_test"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if role is None or d.name.startswith(f"{role}-"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def start_initiator(
    pyz: Path | str,
    home: NodeHome,
    *args: str,
    name: str = "initiator",
    prefix: Sequence[str] = (),
) -> Proc:
    """Start `pangea.pyz initiate ARGS` (on 127.0.0.1, --port 0 unless ARGS say otherwise)."""
    extra = list(args)
    if "--host" not in extra:
        extra += ["--host", "127.0.0.1"]
    if "--port" not in extra:
        extra += ["--port", "0"]
    return Proc([*prefix, str(pyz), "initiate", *extra], env=home.env, name=name)


def pairing_code(lines: Sequence[str]) -> str:
    """The one-time code from the initiator's ``Pairing code (...): XXXX-XXXX-XXXX`` line."""
    for line in lines:
        match = re.match(r"^Pairing code \(one use, valid \d+ s\): ([0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4})$", line)
        if match:
            return match.group(1)
    raise AssertionError("no pairing code line in:\n" + "\n".join(lines))


def loopback_address(initiator: Proc) -> str:
    """Wait for the initiator's ready line and return the join string of its 127.0.0.1
    multiaddr (``pangea://ip4/127.0.0.1/...#CODE``), what `respond` needs to pair."""
    initiator.wait_for_line(INITIATOR_READY, stream="stdout")
    code = pairing_code(initiator.stdout_lines).replace("-", "")
    for address in printed_addresses(initiator.stdout_lines):
        if address.startswith("/ip4/127.0.0.1/"):
            return f"pangea://{address.lstrip('/')}#{code}"
    raise AssertionError(f"no loopback address printed\n{initiator.output()}")


# ---------------------------------------------------------------- serve nodes


@dataclass
class ServeNode:
    """One running `pangea.pyz serve` and what it printed."""

    proc: Proc
    home: NodeHome
    peer_id: str
    rpc: str  # HOST:PORT of its RPC endpoint
    address: str  # its loopback multiaddr, /ip4/127.0.0.1/tcp/N/p2p/<id>
    metrics: str | None = None  # the URL of its /metrics, as printed

    @property
    def token(self) -> str | None:
        """The RPC token `serve` keeps in its home (None when it was given one, or --rpc-open)."""
        path = self.home.pangea_home / "rpc-token"
        return path.read_text().strip() if path.exists() else None

    def stderr_since(self, mark: int) -> list[str]:
        """Its stderr lines from index ``mark`` on."""
        return list(self.proc.stderr_lines[mark:])

    def session_log(self) -> str:
        """Its session log (pangea.log): INFO lines that do not reach stderr."""
        logs = list((self.home.pangea_home / "compute_test").glob(f"serve-{self.proc.pid}/pangea.log"))
        return logs[0].read_text(errors="replace") if logs else ""


def peer_id_of(pyz: Path | str, home: NodeHome, timeout: float = 90.0) -> str:
    """`pangea.pyz id` for this home: the id to pass to --allow-peer elsewhere."""
    result = run_pyz(pyz, ["id"], home.env, timeout=timeout)
    assert result.returncode == 0, result.stderr
    peer_id = result.stdout.strip()
    assert re.fullmatch(r"12D3KooW[1-9A-HJ-NP-Za-km-z]+", peer_id), result.stdout
    return peer_id


def launch_serve(
    pyz: Path | str, home: NodeHome, *args: str, name: str, rpc: str = "127.0.0.1:0", port: int = 0
) -> Proc:
    """Start `serve` on 127.0.0.1 (libp2p port 0 unless given) without waiting: several can start side by side."""
    cmd = [str(pyz), "serve", "--host", "127.0.0.1", "--port", str(port), "--rpc", rpc, *args]
    return Proc(cmd, env=home.env, name=name)


def serve_node(proc: Proc, home: NodeHome, ready_timeout: float = READY_TIMEOUT_S) -> ServeNode:
    """Wait for a launched serve node's ready line and parse what it printed; stop it when that fails."""
    try:
        proc.wait_for_line(r"^pangea: serving on /ip4/", timeout=ready_timeout, stream="stdout")
        peer_id = proc.wait_for_line(r"serve node, peer ID (12D3KooW\w+)$", stream="stdout").group(1)
        rpc_address = proc.wait_for_line(r"^RPC: (127\.0\.0\.1:\d+) \(", stream="stdout").group(1)
        address = proc.wait_for_line(rf"^  (/ip4/127\.0\.0\.1/tcp/\d+/p2p/{peer_id})$", stream="stdout").group(1)
    except BaseException:
        proc.stop()
        raise
    urls = [line.removeprefix("Metrics: ") for line in proc.stdout_lines if line.startswith("Metrics: ")]
    assert len(urls) <= 1, proc.output()
    return ServeNode(proc, home, peer_id, rpc_address, address, urls[0] if urls else None)


def start_serve(
    pyz: Path | str,
    home: NodeHome,
    *args: str,
    name: str,
    rpc: str = "127.0.0.1:0",
    port: int = 0,
    ready_timeout: float = READY_TIMEOUT_S,
) -> ServeNode:
    """Start `serve` on 127.0.0.1 (libp2p port 0 unless given), wait for its ready line, parse what it printed."""
    return serve_node(launch_serve(pyz, home, *args, name=name, rpc=rpc, port=port), home, ready_timeout)


PAIR_CONNECT_TIMEOUT_S = 60.0  # A dials B right after both print their ready lines (a loaded box: slow)


@dataclass
class Pair:
    """A (``--peer B``) and B (``--allow-peer A``), connected: A's clients reach B's kernels."""

    a: ServeNode
    b: ServeNode


@contextlib.contextmanager
def running_pair(pyz: Path, base: Path, *b_args: str, rpc_a: str = "127.0.0.1:0") -> Iterator[Pair]:
    """Start B (trusting A's id, with ``b_args``), then A with --peer B; wait until A is connected;
    stop A, then B."""
    home_a, home_b = make_node_home(base, "a"), make_node_home(base, "b")
    with contextlib.ExitStack() as stack:
        b = start_serve(pyz, home_b, "--allow-peer", peer_id_of(pyz, home_a), *b_args, name="serve-B")
        stack.callback(b.proc.stop)
        a = start_serve(pyz, home_a, "--peer", b.address, name="serve-A", rpc=rpc_a)
        stack.callback(a.proc.stop)
        a.proc.wait_for_line(rf"^pangea: connected to peer {b.peer_id}$", timeout=PAIR_CONNECT_TIMEOUT_S)
        yield Pair(a, b)


def live_pair(pair: Pair) -> Pair:
    """A module's pair, for one test: both nodes still running, their output in the test's report."""
    # NOTE: conftest.py attaches the output of the Procs started during a test;
    # the pair started earlier, so list its Procs again for this test.
    Proc.started.extend([pair.a.proc, pair.b.proc])
    for node in (pair.a, pair.b):
        assert node.proc.returncode is None, f"a serve node of the module pair has exited\n{node.proc.output()}"
    return pair


CLUSTER_CLIENT_TIMEOUT_S = 300.0
CLUSTER_CONNECT_TIMEOUT_S = 60.0


@contextlib.contextmanager
def cluster(pyz: Path, base: Path, *a_args: str, workers: int = 2) -> Iterator[tuple[ServeNode, list[ServeNode]]]:
    """A `serve` node A (started with ``a_args``) that dials ``workers`` serve nodes trusting it."""
    home_a: NodeHome = make_node_home(base, "a")
    a_id = peer_id_of(pyz, home_a)
    with contextlib.ExitStack() as stack:
        ws = []
        for i in range(workers):
            w = start_serve(pyz, make_node_home(base, f"w{i + 1}"), "--allow-peer", a_id, name=f"serve-w{i + 1}")
            stack.callback(w.proc.stop)
            ws.append(w)
        dial = [arg for w in ws for arg in ("--peer", w.address)]
        a = start_serve(pyz, home_a, *dial, *a_args, name="serve-A")
        stack.callback(a.proc.stop)
        for w in ws:
            a.proc.wait_for_line(rf"^pangea: connected to peer {w.peer_id}$", timeout=CLUSTER_CONNECT_TIMEOUT_S)
        yield a, ws


def client_of(node: ServeNode, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A `pangea.Client` of ``node``, with its home's token."""
    from pangea import Client

    monkeypatch.setenv("PANGEA_HOME", str(node.home.pangea_home))
    return Client(node.rpc, token=node.token, timeout_s=CLUSTER_CLIENT_TIMEOUT_S)


def budget_used(node: ServeNode, monkeypatch: pytest.MonkeyPatch) -> int:
    """Bytes of ``node``'s memory budget in use (held arrays among them)."""
    with client_of(node, monkeypatch) as c:
        return int(c.status()["memory_budget_used_bytes"])


# ---------------------------------------------------------------- metrics


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """GET /metrics and parse the Prometheus text format into {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        assert family.name.startswith("pangea_"), family.name
        for sample in family.samples:
            assert sample.name.startswith("pangea_"), sample.name
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet, as Prometheus treats a new counter)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}

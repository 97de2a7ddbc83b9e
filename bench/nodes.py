"""The one place in bench/ that starts `pangea.pyz serve` nodes.

Every node listens on 127.0.0.1 with ports 0 (libp2p, data plane and RPC), has
a home of its own (HOME and PANGEA_HOME under a temporary directory, so each node
looks like a separate box), and is stopped by its own process group at the end
(SIGTERM, then SIGKILL: tests/helpers.py's `Proc`). Every wait has a timeout; a
node that does not come up ends the benchmark with one line saying what to do.

    with nodes.serving(pyz, base, "serve") as node:          # one node
        client = node.client()                               # finds its token and bulk socket
    with nodes.pair(pyz, base) as (a, b):                    # B, then A --peer B, A lists B usable
        ...

`serving`/`pair` are context managers; `launch` + `ready` start several nodes side
by side (bench/workers.py), `with_peers` starts a node that dials others and
waits until it lists each of them as a usable worker.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO_ROOT), str(REPO_ROOT / "tests")) if p not in sys.path]

from helpers import NodeHome, Proc, make_node_home  # noqa: E402

READY_TIMEOUT_S = 120.0  # a serve node's ready lines (a cold first run of the pyz extracts it)
CONNECT_TIMEOUT_S = 60.0  # until A lists a peer it dials as a usable worker
ID_TIMEOUT_S = 90.0  # `pangea.pyz id`


class NodeError(SystemExit):
    """A node did not start or connect; the message says what to look at (raised by this module)."""


@dataclass
class Node:
    """One running `serve` node and what it printed."""

    proc: Proc
    home: NodeHome
    peer_id: str
    rpc: str  # HOST:PORT of its RPC endpoint
    address: str  # its loopback multiaddr, /ip4/127.0.0.1/tcp/N/p2p/<id>

    @property
    def pid(self) -> int:
        """The node's process id (for /proc/PID/...)."""
        return self.proc.pid

    @property
    def token(self) -> str:
        """The RPC token `serve` keeps in its home."""
        return (self.home.pangea_home / "rpc-token").read_text().strip()

    def client_env(self) -> dict[str, str]:
        """The environment for a child process whose `pangea.Client` of this node finds its token and
        shared-memory socket (its PANGEA_HOME)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
        env["PANGEA_HOME"] = str(self.home.pangea_home)
        return env

    def client(self, **kwargs: Any) -> Any:
        """A `pangea.Client` of this node made from its home (token and shared-memory socket)."""
        import pangea

        # NOTE: the Client finds a local node's bulk socket through $PANGEA_HOME, read at connect time.
        os.environ["PANGEA_HOME"] = str(self.home.pangea_home)
        return pangea.Client(self.rpc, **kwargs)

    def stop(self) -> None:
        """Stop the node (its process group, by PID)."""
        self.proc.stop()


def node_home(base: Path, name: str) -> NodeHome:
    """A fresh home for one node under ``base``."""
    return make_node_home(base, name)


def peer_id_of(pyz: Path, home: NodeHome) -> str:
    """`pangea.pyz id` for this home: the id a node of it will have (for --allow-peer elsewhere)."""
    try:
        result = subprocess.run(
            [str(pyz), "id"],
            env=home.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ID_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise NodeError(f"bench: `{pyz} id` took over {ID_TIMEOUT_S:g} s; is the box overloaded?") from None
    if result.returncode != 0:
        raise NodeError(f"bench: `{pyz} id` failed: {result.stderr.strip()}; rebuild with ./build.sh")
    return result.stdout.strip()


def launch(pyz: Path, home: NodeHome, *args: str, name: str) -> Proc:
    """Start `serve` on 127.0.0.1 with ports 0 without waiting (several can start side by side)."""
    if not Path(pyz).is_file():
        raise NodeError(f"bench: no pangea.pyz at {pyz}: run ./build.sh first (or pass --pyz)")
    cmd = [str(pyz), "serve", "--host", "127.0.0.1", "--port", "0", "--rpc", "127.0.0.1:0", *args]
    return Proc(cmd, env=home.env, name=name)


def ready(proc: Proc, home: NodeHome, timeout: float = READY_TIMEOUT_S) -> Node:
    """Wait for a launched node's ready lines and parse them; stop it and end the run when they do not come."""
    try:
        proc.wait_for_line(r"^pangea: serving on /ip4/", timeout=timeout, stream="stdout")
        peer_id = proc.wait_for_line(r"serve node, peer ID (12D3KooW\w+)$", stream="stdout").group(1)
        rpc = proc.wait_for_line(r"^RPC: (127\.0\.0\.1:\d+) \(", stream="stdout").group(1)
        address = proc.wait_for_line(rf"^  (/ip4/127\.0\.0\.1/tcp/\d+/p2p/{peer_id})$", stream="stdout").group(1)
    except AssertionError as exc:
        proc.stop()
        print(exc, file=sys.stderr)
        raise NodeError(f"bench: {proc.name} did not start within {timeout:g} s (its output is above)") from None
    return Node(proc, home, peer_id, rpc, address)


def serve(pyz: Path, home: NodeHome, *args: str, name: str) -> Node:
    """Start `serve` and wait until it is ready."""
    return ready(launch(pyz, home, *args, name=name), home)


def wait_usable(node: Node, peer_ids: Sequence[str], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Wait until ``node`` lists every peer in ``peer_ids`` as a usable worker (connected, trusted, its
    kernels known, not suspect), asking it through its RPC `peers()`."""
    want = set(peer_ids)
    deadline = time.monotonic() + timeout
    with node.client(timeout_s=30) as client:
        while True:
            usable = {p["peer_id"] for p in client.peers() if p["trusted"] and p["kernels"] and not p["suspect"]}
            if want <= usable:
                return
            if time.monotonic() > deadline or node.proc.returncode is not None:
                print(node.proc.output(), file=sys.stderr)
                missing = ", ".join(sorted(want - usable))
                raise NodeError(f"bench: {node.proc.name} lists no usable worker {missing} within {timeout:g} s")
            time.sleep(0.1)


def with_peers(pyz: Path, home: NodeHome, peers: Sequence[Node], *args: str, name: str) -> Node:
    """Start `serve --peer P ...` for the given nodes (they trust this home's id) and wait until it lists
    each of them as a usable worker."""
    dial = [arg for peer in peers for arg in ("--peer", peer.address)]
    node = serve(pyz, home, *dial, *args, name=name)
    try:
        wait_usable(node, [peer.peer_id for peer in peers])
    except BaseException:
        node.stop()
        raise
    return node


@contextlib.contextmanager
def stopping(nodes: list[Node]) -> Iterator[list[Node]]:
    """Yield ``nodes``; stop them all (last first) at the end."""
    try:
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


@contextlib.contextmanager
def serving(pyz: Path, base: Path, name: str, *args: str) -> Iterator[Node]:
    """One ready node with a home of its own under ``base``; stopped at the end."""
    node = serve(pyz, node_home(base, name), *args, name=name)
    with stopping([node]):
        yield node


@contextlib.contextmanager
def pair(
    pyz: Path, base: Path, *, a_args: Sequence[str] = (), b_args: Sequence[str] = ()
) -> Iterator[tuple[Node, Node]]:
    """Serve B (trusting A's id), then A ``--peer B``; yield (A, B) once A lists B as a usable worker;
    stop A, then B."""
    home_a, home_b = node_home(base, "a"), node_home(base, "b")
    b = serve(pyz, home_b, "--allow-peer", peer_id_of(pyz, home_a), *b_args, name="serve-B")
    with stopping([b]):
        a = with_peers(pyz, home_a, [b], *a_args, name="serve-A")
        with stopping([a]):
            yield a, b

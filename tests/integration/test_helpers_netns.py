"""Self-test of NetnsPair: two namespaces talk over their veth pair, and vanish after."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import NetnsPair, netns_names

pytestmark = pytest.mark.netns

# A one-shot TCP echo server: bind to argv[1] on a free port, print it,
# answer argv[2] connections with b"pong:" + what they sent.
SERVER = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print("listening on port", srv.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, peer = srv.accept()
    with conn:
        conn.sendall(b"pong:" + conn.recv(100))
    print("served", peer[0], flush=True)
"""

CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as sock:
    sock.sendall(b"ping")
    print(sock.recv(100).decode())
"""


def _ping_b_from_a(pair: NetnsPair, port: str) -> subprocess.CompletedProcess[str]:
    return pair.run("a", [sys.executable, "-c", CLIENT, pair.addr_b, port], timeout=20)


def test_netns_pair_tcp_from_a_to_b_then_cleaned_up() -> None:
    with NetnsPair() as pair:
        assert set(pair.names) <= netns_names()
        with pair.proc("b", [sys.executable, "-c", SERVER, pair.addr_b, "1"]) as server:
            port = server.wait_for_line(r"listening on port (\d+)", timeout=20).group(1)
            result = _ping_b_from_a(pair, port)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "pong:ping"
            server.wait_for_line(rf"served {pair.addr_a}$", timeout=10)
            assert server.wait(timeout=10) == 0
    assert not set(pair.names) & netns_names()


def test_netns_pair_has_no_route_out() -> None:
    with NetnsPair() as pair:
        for ns in ("a", "b"):
            routes = pair.run(ns, ["ip", "-4", "route", "show"], check=True).stdout
            assert routes.split() != []
            assert "default" not in routes, routes
            assert f"10.231.{pair.subnet}.0/24" in routes, routes


def test_netns_pair_set_link_partitions_and_heals() -> None:
    with NetnsPair() as pair:
        with pair.proc("b", [sys.executable, "-c", SERVER, pair.addr_b, "2"]) as server:
            port = server.wait_for_line(r"listening on port (\d+)", timeout=20).group(1)
            assert _ping_b_from_a(pair, port).stdout.strip() == "pong:ping"

            pair.set_link(up=False)
            cut = _ping_b_from_a(pair, port)
            assert cut.returncode != 0
            assert "unreachable" in cut.stderr.lower(), cut.stderr

            pair.set_link(up=True)
            deadline = time.monotonic() + 10
            healed = _ping_b_from_a(pair, port)
            while healed.returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                healed = _ping_b_from_a(pair, port)
            assert healed.stdout.strip() == "pong:ping", healed.stderr
            assert server.wait(timeout=10) == 0


def test_netns_pair_cleans_up_after_error_and_kills_leftovers() -> None:
    pair = NetnsPair()
    with pytest.raises(RuntimeError, match="boom"), pair:
        leftover = pair.proc("a", ["sh", "-c", "echo inside; exec sleep 300"])
        # NOTE: wait until it runs inside the namespace; before that it is an
        # `ip netns exec` still in the root namespace, which close() cannot see.
        leftover.wait_for_line("inside", timeout=20)
        raise RuntimeError("boom")
    try:
        assert leftover.popen.wait(timeout=10) < 0  # killed by NetnsPair.close()
    finally:
        leftover.stop()
    assert not set(pair.names) & netns_names()


def test_netns_pair_setup_failure_still_cleans_up() -> None:
    pair = NetnsPair(subnet=300)  # 10.231.300.1 is not an address: setup fails midway
    with pytest.raises(RuntimeError, match="ip -n"), pair:
        pytest.fail("setup should have failed")
    assert not set(pair.names) & netns_names()

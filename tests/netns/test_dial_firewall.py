"""A dial that gets no answer, or has no route, says so (README "When something is wrong").

Namespace a drops TCP to port 7777 with an iptables rule (a host firewall that
drops rather than rejects); namespace b runs `respond` to that address, then to
an address no route of b leads to. Each ends with exit 2 and one error line
naming the cause (no answer from HOST:PORT, no route to HOST:PORT) and a hint
about the firewall or the address, never py-libp2p's SwarmDialAllFailedError.
The rule (and the namespaces, via NetnsPair) are removed afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import NetnsPair
from pyz_helpers import assert_expected_error

pytestmark = pytest.mark.netns

PORT = 7777
PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
NO_ROUTE = "198.18.255.1"  # a benchmarking address (RFC 2544): namespace b has no route to it


def test_respond_to_a_firewall_that_drops_says_no_answer(netns_pair: NetnsPair, pyz: Path, make_home: Any) -> None:
    drop = ["INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    added = netns_pair.run("a", ["iptables", "-A", *drop], timeout=30)
    assert added.returncode == 0, added.stderr
    try:
        address = f"/ip4/{netns_pair.addr_a}/tcp/{PORT}/p2p/{PEER_ID}"
        started = time.monotonic()
        result = netns_pair.run(
            "b",
            [pyz, "respond", address, "--code", "AAAA-BBBB-CCCC", "--timeout", "3"],
            env=make_home("b").env,
            timeout=90,
        )
        took = time.monotonic() - started
    finally:
        netns_pair.run("a", ["iptables", "-D", *drop], timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"no answer from {netns_pair.addr_a}:{PORT} within 3 s")
    assert "firewall" in result.stderr.splitlines()[-1], result.stderr
    assert "SwarmDialAllFailedError" not in result.stderr
    assert took < 60, took


def test_respond_to_an_address_without_a_route_says_no_route(netns_pair: NetnsPair, pyz: Path, make_home: Any) -> None:
    address = f"/ip4/{NO_ROUTE}/tcp/{PORT}/p2p/{PEER_ID}"
    result = netns_pair.run(
        "b", [pyz, "respond", address, "--code", "AAAA-BBBB-CCCC", "--timeout", "3"], env=make_home("b").env, timeout=90
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"no route to {NO_ROUTE}:{PORT}")
    assert "same LAN or VPN" in result.stderr.splitlines()[-1], result.stderr

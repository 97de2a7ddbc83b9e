"""Discovery by mDNS, and `doctor` across a link: two network namespaces joined by a
veth pair (tests/helpers.py NetnsPair), one "box" (its own pangea.pyz copy and
home) per namespace.

mDNS is multicast, so it is turned on (``PANGEA_MDNS=on``) only in the
environment of processes started inside this test's own namespaces; the veth
pair leads nowhere else, so no announcement leaves them. Every other test node
runs with ``PANGEA_MDNS=off`` (tests/helpers.py make_node_home).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import NetnsPair, NodeHome, Proc
from pyz_helpers import (
    CHECK_NAMES,
    FAST,
    INITIATOR_READY,
    PAIR_TIMEOUT_S,
    RESPONDER_CHECK_NAMES,
    assert_expected_error,
    last_json,
    pairing_code,
    peer_id_from,
    printed_addresses,
    session_dirs,
)

pytestmark = pytest.mark.netns

DEFAULT_PORT = 7777
MDNS_ON = {"PANGEA_MDNS": "on"}
ANNOUNCED = r"^Announced on the LAN by mDNS: `\./pangea\.pyz respond --discover` finds this node$"
# `respond --discover` listens up to 8 s (DISCOVER_S); pyz start-up on a busy box adds some.
DISCOVER_RUN_S = 90.0
DOCTOR_RUN_S = 120.0


class Box:
    """One "machine": its own copy of pangea.pyz and its own HOME and PANGEA_HOME."""

    def __init__(self, pyz: Path, home: NodeHome) -> None:
        self.home = home
        self.pyz = home.root / "pangea.pyz"
        shutil.copy2(pyz, self.pyz)  # keeps the executable bit

    def env(self, mdns: bool = False) -> dict[str, str]:
        return {**self.home.env, **MDNS_ON} if mdns else dict(self.home.env)


@pytest.fixture
def boxes(pyz: Path, make_home: Any) -> tuple[Box, Box]:
    return Box(pyz, make_home("box-a")), Box(pyz, make_home("box-b"))


def _veth_address(pair: NetnsPair, lines: list[str]) -> str:
    """The address A printed on its veth IP (default port)."""
    prefix = f"/ip4/{pair.addr_a}/tcp/{DEFAULT_PORT}/p2p/"
    veth = [a for a in printed_addresses(lines) if a.startswith(prefix)]
    assert len(veth) == 1, lines
    return veth[0]


def _no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


# ---------------------------------------------------------------- respond --discover


def test_discover_initiate_in_a_respond_discover_in_b_every_check_passes(
    netns_pair: NetnsPair, boxes: tuple[Box, Box]
) -> None:
    a, b = boxes
    initiate: list[str | Path] = [a.pyz, "initiate", "--json", *FAST, "--timeout", "90"]  # default host 0.0.0.0
    with netns_pair.proc("a", initiate, env=a.env(mdns=True), name="initiator@a") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        initiator.wait_for_line(ANNOUNCED, stream="stdout", timeout=30)
        address = _veth_address(netns_pair, initiator.stdout_lines)
        initiator_id = peer_id_from(initiator.stdout_lines, "initiator")
        code = pairing_code(initiator.stdout_lines)
        respond: list[str | Path] = [b.pyz, "respond", "--discover", "--code", code, "--json", "--timeout", "30"]
        with netns_pair.proc("b", respond, env=b.env(mdns=True), name="responder@b") as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    _no_traceback(initiator, responder)

    out = responder.stdout_lines
    assert out[0].startswith("Looking for initiators on this network (mDNS, up to "), out
    # exactly one initiator found, by its veth address (loopback is never announced)
    assert out[1] == f"  1) {address} (pangea {last_json(out)['version']})", out
    assert not any(line.startswith("  2) ") for line in out), out
    assert f"Connecting to {address} (up to 30 s)..." in out

    doc = last_json(initiator.stdout_lines)
    assert doc["ok"] is True and [c["name"] for c in doc["checks"]] == CHECK_NAMES, doc
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert doc["peer"] == peer_id_from(out, "responder")
    reply = last_json(out)
    assert reply["ok"] is True and [c["name"] for c in reply["checks"]] == RESPONDER_CHECK_NAMES, reply
    assert reply["peer"] == initiator_id
    assert session_dirs(a.home) == [] and session_dirs(b.home) == []


def _respond_discover(
    pair: NetnsPair, b: Box, timeout: float = DISCOVER_RUN_S
) -> tuple[subprocess.CompletedProcess[str], float]:
    cmd: list[str | Path] = [b.pyz, "respond", "--discover", "--code", "AAAA-BBBB-CCCC", "--timeout", "10"]
    start = time.monotonic()
    result = pair.run("b", cmd, env=b.env(mdns=True), timeout=timeout)
    return result, time.monotonic() - start


def _assert_cannot_find(result: subprocess.CompletedProcess[str], elapsed: float, b: Box) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "cannot find an initiator")
    assert result.stdout.splitlines() == ["Looking for initiators on this network (mDNS, up to 8 s)..."], result.stdout
    assert elapsed < 8 + 60, elapsed  # the listening window plus start-up, not a hang
    assert session_dirs(b.home) == []


def test_discover_without_any_initiator_exits_2(netns_pair: NetnsPair, boxes: tuple[Box, Box]) -> None:
    _, b = boxes
    result, elapsed = _respond_discover(netns_pair, b)
    _assert_cannot_find(result, elapsed, b)


@pytest.mark.parametrize("how", ["--no-mdns", "PANGEA_MDNS=off"])
def test_discover_does_not_find_an_initiator_with_mdns_off(
    netns_pair: NetnsPair, boxes: tuple[Box, Box], how: str
) -> None:
    a, b = boxes
    flags = ["--no-mdns"] if how == "--no-mdns" else []
    env = a.env(mdns=how == "--no-mdns")  # --no-mdns wins over PANGEA_MDNS=on
    initiate: list[str | Path] = [a.pyz, "initiate", *flags, "--timeout", "90"]
    with netns_pair.proc("a", initiate, env=env, name="initiator@a") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        result, elapsed = _respond_discover(netns_pair, b)
        assert not any("mDNS" in line for line in initiator.stdout_lines), initiator.output()
        assert initiator.returncode is None
    _assert_cannot_find(result, elapsed, b)


# ---------------------------------------------------------------- doctor across the link


def _doctor(pair: NetnsPair, b: Box, address: str, *args: str) -> dict[str, Any]:
    cmd: list[str | Path] = [b.pyz, "doctor", address, "--port", "0", "--json", *args]
    result = pair.run("b", cmd, env=b.env(), timeout=DOCTOR_RUN_S)
    assert "Traceback" not in result.stderr, result.stderr
    doc = last_json(result.stdout.splitlines())
    assert result.returncode == (0 if doc["ok"] else 1), result.stdout + result.stderr
    return doc


def test_doctor_across_namespaces_reachable_then_link_down(netns_pair: NetnsPair, boxes: tuple[Box, Box]) -> None:
    a, b = boxes
    initiate: list[str | Path] = [a.pyz, "initiate", "--timeout", "300"]
    with netns_pair.proc("a", initiate, env=a.env(), name="initiator@a") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        address = _veth_address(netns_pair, initiator.stdout_lines)

        doc = _doctor(netns_pair, b, address, "--timeout", "10")
        assert doc["ok"] is True, doc
        assert doc["peer"]["tcp"] is True and doc["peer"]["libp2p"] == "ok", doc["peer"]
        assert doc["verdict"].startswith("the peer is reachable and speaks pangea"), doc["verdict"]
        # B's own view: its veth is a LAN interface, advertised before loopback
        assert {"name": NetnsPair.IFACE, "ip": netns_pair.addr_b, "kind": "lan"} in doc["interfaces"]
        assert doc["advertised"] == [netns_pair.addr_b, "127.0.0.1"]

        # a port nobody listens on, on A's reachable address
        wrong_port = address.replace(f"/tcp/{DEFAULT_PORT}/", "/tcp/7790/")
        doc = _doctor(netns_pair, b, wrong_port, "--timeout", "10")
        assert doc["ok"] is False
        assert doc["peer"] == {"address": wrong_port, "tcp": False, "tcp_error": "Connection refused"}
        assert doc["verdict"].startswith("nothing listens at that address"), doc["verdict"]

        netns_pair.set_link(False)
        try:
            start = time.monotonic()
            doc = _doctor(netns_pair, b, address, "--timeout", "5")
            elapsed = time.monotonic() - start
        finally:
            netns_pair.set_link(True)
        assert doc["ok"] is False
        assert doc["peer"]["tcp"] is False and "libp2p" not in doc["peer"], doc["peer"]
        assert "refused" not in doc["peer"]["tcp_error"].lower(), doc["peer"]
        assert doc["verdict"].startswith("TCP does not reach the peer"), doc["verdict"]
        assert "firewall" in doc["verdict"]
        assert elapsed < 5 + 60, elapsed
        assert initiator.returncode is None, initiator.output()

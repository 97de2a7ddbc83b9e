"""Two hosts: pangea.pyz copied to two directories with separate homes, one
node per network namespace, joined by a veth pair (tests/helpers.py NetnsPair).

Namespace A runs `initiate` on the default port 7777 (each namespace has its
own port space); namespace B runs `respond` with the address A printed for
its veth interface, as a user would copy it from one box to the other.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from helpers import NetnsPair, NodeHome
from pyz_helpers import (
    CHECK_NAMES,
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


class Box:
    """One "machine": its own copy of pangea.pyz and its own HOME and PANGEA_HOME."""

    def __init__(self, pyz: Path, home: NodeHome) -> None:
        self.home = home
        self.pyz = home.root / "pangea.pyz"
        shutil.copy2(pyz, self.pyz)  # keeps the executable bit


@pytest.fixture
def boxes(pyz: Path, make_home) -> tuple[Box, Box]:
    return Box(pyz, make_home("box-a")), Box(pyz, make_home("box-b"))


def _veth_address(pair: NetnsPair, addresses: list[str], port: int = DEFAULT_PORT) -> str:
    """The printed address on A's veth IP; checks the whole list as it goes."""
    prefix = f"/ip4/{pair.addr_a}/tcp/{port}/p2p/"
    veth = [a for a in addresses if a.startswith(prefix)]
    assert veth, f"no address on A's veth ({pair.addr_a}) among {addresses}"
    assert addresses[-1].startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/"), f"loopback not last: {addresses}"
    # A namespace has exactly two interfaces with IPv4: the veth end and lo.
    assert addresses == [veth[0], addresses[-1]], addresses
    return veth[0]


def test_cross_host_initiate_in_a_respond_in_b_every_check_passes(
    netns_pair: NetnsPair, boxes: tuple[Box, Box], record_property
) -> None:
    a, b = boxes
    # Default --host 0.0.0.0 and --port 7777, and the default 64 MiB transfer for the MB/s figure.
    initiate: list[str | Path] = [a.pyz, "initiate", "--json", "--size", "512", "--timeout", "60"]
    with netns_pair.proc("a", initiate, env=a.home.env, name="initiator@a") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        address = _veth_address(netns_pair, printed_addresses(initiator.stdout_lines))
        initiator_id = peer_id_from(initiator.stdout_lines, "initiator")
        code = pairing_code(initiator.stdout_lines)
        respond: list[str | Path] = [b.pyz, "respond", address, "--code", code, "--json", "--timeout", "30"]
        with netns_pair.proc("b", respond, env=b.home.env, name="responder@b") as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    for proc in (initiator, responder):
        assert "Traceback" not in "\n".join(proc.stderr_lines), proc.output()

    doc = last_json(initiator.stdout_lines)
    assert doc["role"] == "initiator" and doc["ok"] is True, doc
    assert [c["name"] for c in doc["checks"]] == CHECK_NAMES
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    assert doc["peer"] == peer_id_from(responder.stdout_lines, "responder")
    assert doc["addresses"] == printed_addresses(initiator.stdout_lines)

    reply = last_json(responder.stdout_lines)
    assert reply["role"] == "responder" and reply["ok"] is True, reply
    assert [c["name"] for c in reply["checks"]] == RESPONDER_CHECK_NAMES
    assert all(c["ok"] for c in reply["checks"]), reply["checks"]
    assert reply["peer"] == initiator_id
    # Two boxes, two identities, two session directories gone.
    assert (a.home.pangea_home / "identity.key").read_bytes() != (b.home.pangea_home / "identity.key").read_bytes()
    assert session_dirs(a.home) == [] and session_dirs(b.home) == []

    rtt, up, down = doc["rtt_ms"], doc["throughput_mb_s"]["upload"], doc["throughput_mb_s"]["download"]
    assert rtt > 0 and up > 0 and down > 0, doc
    for key, value in (("rtt_ms", rtt), ("upload_mb_s", up), ("download_mb_s", down)):
        record_property(f"netns_{key}", round(value, 3))
    print(f"\nnetns (veth) figures: rtt_ms={rtt:.3f} upload={up:.1f} MB/s download={down:.1f} MB/s")


def test_cross_host_respond_without_initiator_exits_2_within_timeout(
    netns_pair: NetnsPair, boxes: tuple[Box, Box]
) -> None:
    a, b = boxes
    # An address A really printed, from an initiator that then gave up (exit 2): nothing listens.
    gone = netns_pair.run("a", [a.pyz, "initiate", "--timeout", "1"], env=a.home.env, timeout=60)
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert_expected_error(gone.stderr, "nobody connected within 1 s")
    address = _veth_address(netns_pair, printed_addresses(gone.stdout.splitlines()))

    timeout_s = 3
    start = time.monotonic()
    result = netns_pair.run("b", [b.pyz, "respond", address, "--timeout", str(timeout_s)], env=b.home.env, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pangea: error: ")]
    assert len(errors) == 1, result.stderr
    assert f"cannot reach {address} within {timeout_s} s" in errors[0], errors[0]
    attempts = re.search(r"\((\d+) attempts\)", errors[0])
    assert attempts and int(attempts.group(1)) >= 2, errors[0]  # it retried, with backoff
    # Startup of the pyz (~1.5 s warm) plus the dial budget; nowhere near a hang.
    assert elapsed < timeout_s + 20, elapsed
    print(f"\nnetns respond to a dead address: exit 2 after {elapsed:.1f} s (--timeout {timeout_s})")

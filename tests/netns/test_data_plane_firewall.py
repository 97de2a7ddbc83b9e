"""A firewall in front of the data plane: the pair falls back to the libp2p stream and says why.

Namespace a runs ``initiate`` on its veth address with a fixed ``--data-port``
and an iptables rule in namespace a that silently drops TCP to that port
(the libp2p port stays open), the way a host firewall that only knows about
pangea's main port would. Namespace b runs ``respond`` with the address a
printed. The responder's data plane dial gets no answer, gives up after
DATA_CONNECT_S, tells the initiator, and every message of the session
travels on the libp2p stream: every check passes and both connection checks
name the reason. The rule (and the namespaces, via NetnsPair) are removed
afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helpers import NetnsPair
from pyz_helpers import (
    CHECK_NAMES,
    INITIATOR_READY,
    PAIR_TIMEOUT_S,
    RESPONDER_CHECK_NAMES,
    last_json,
    pairing_code,
    printed_addresses,
)

import pangea

pytestmark = pytest.mark.netns

LIBP2P_PORT = 7777
DATA_PORT = 7790  # not the auto port (7778), so the test shows --data-port is what is dialed


def arrays_of(doc: dict[str, Any]) -> str:
    """The ``arrays: ...`` part of the connection check's detail."""
    (check,) = [c for c in doc["checks"] if c["name"] == "connection"]
    detail = str(check["detail"])
    assert "; arrays: " in detail, detail
    return "arrays: " + detail.split("; arrays: ", 1)[1]


def test_a_firewalled_data_port_falls_back_to_libp2p_after_the_connect_timeout(
    netns_pair: NetnsPair, pyz: Path, make_home: Any
) -> None:
    a, b = make_home("box-a"), make_home("box-b")
    drop = ["INPUT", "-p", "tcp", "--dport", str(DATA_PORT), "-j", "DROP"]
    added = netns_pair.run("a", ["iptables", "-A", *drop], timeout=30)
    assert added.returncode == 0, added.stderr
    try:
        initiate: list[str | Path] = [
            pyz,
            "initiate",
            "--host",
            netns_pair.addr_a,
            "--port",
            str(LIBP2P_PORT),
            "--data-port",
            str(DATA_PORT),
            "--json",
            "--size",
            "256",
            "--transfer-mib",
            "8",
            "--timeout",
            "60",
        ]
        with netns_pair.proc("a", initiate, env=a.env, name="initiator@a") as initiator:
            initiator.wait_for_line(INITIATOR_READY, stream="stdout")
            (address,) = printed_addresses(initiator.stdout_lines)
            assert address.startswith(f"/ip4/{netns_pair.addr_a}/tcp/{LIBP2P_PORT}/p2p/"), address
            code = pairing_code(initiator.stdout_lines)
            respond: list[str | Path] = [pyz, "respond", address, "--code", code, "--json", "--timeout", "30"]
            with netns_pair.proc("b", respond, env=b.env, name="responder@b") as responder:
                assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
                assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
        counters = netns_pair.run("a", ["iptables", "-L", "INPUT", "-v", "-n", "-x"], timeout=30).stdout
    finally:
        netns_pair.run("a", ["iptables", "-D", *drop], timeout=30)
    assert netns_pair.run("a", ["iptables", "-C", *drop], timeout=30).returncode != 0, "the rule is still there"

    for proc in (initiator, responder):
        assert "Traceback" not in "\n".join(proc.stderr_lines), proc.output()
    initiator_doc, responder_doc = last_json(initiator.stdout_lines), last_json(responder.stdout_lines)
    for doc, names in ((initiator_doc, CHECK_NAMES), (responder_doc, RESPONDER_CHECK_NAMES)):
        assert [c["name"] for c in doc["checks"]] == names, doc
        assert doc["ok"] is True and all(c["ok"] for c in doc["checks"]), doc

    seconds = f"{pangea.DATA_CONNECT_S:.0f}"
    reason = f"no answer from {netns_pair.addr_a}:{DATA_PORT} within {seconds} s (a firewall dropping the data port?)"
    assert arrays_of(responder_doc) == f"arrays: libp2p stream ({reason})", responder_doc
    assert arrays_of(initiator_doc) == f"arrays: libp2p stream (the peer could not use our data plane: {reason})", (
        initiator_doc
    )
    for proc in (responder, initiator):
        warning = proc.wait_for_line(r"^pangea: data plane with \S+ unavailable: ", stream="stderr", timeout=1).string
        assert reason in warning and warning.endswith("; arrays travel on the libp2p stream (slower)"), warning
    # The rule did drop the responder's SYNs (its counter is not 0).
    match = re.search(rf"^\s*(\d+)\s+\d+\s+DROP\s+.*dpt:{DATA_PORT}\b", counters, re.MULTILINE)
    assert match is not None and int(match.group(1)) > 0, counters

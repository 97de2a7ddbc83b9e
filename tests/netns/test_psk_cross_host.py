"""Two hosts with ``--psk``: the data plane is dialed at the peer's real address.

With a pre-shared key py-libp2p wraps the TCP connection, and its own idea of
the connection's remote address falls back to what the peer announced:
``/ip4/0.0.0.0/...`` for a node listening on every interface. Across two
network namespaces (tests/helpers.py NetnsPair) a dial to 0.0.0.0 reaches
nothing, so this is where the mistake shows: both sides run with the same
key file on the default ``--host 0.0.0.0``, and the dialer's data connection
must go to the other namespace's veth address, and ``peers`` must list only
addresses another machine can dial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import NetnsPair
from pyz_helpers import (
    CHECK_NAMES,
    INITIATOR_READY,
    PAIR_TIMEOUT_S,
    last_json,
    pairing_code,
    peer_id_of,
    printed_addresses,
    run_pyz,
    serve_node,
)

pytestmark = pytest.mark.netns

LIBP2P_PORT = 7777  # each namespace has its own ports; the data plane is 7778 (auto)
TLS = "TLS 1.3 TLS_AES_256_GCM_SHA384"
WILDCARD = re.compile(r"/ip4/0\.0\.0\.0/|\b(to|from|at) 0\.0\.0\.0\b")


@pytest.fixture
def psk_file(tmp_path: Path, pyz: Path, make_home: Any) -> Path:
    key = tmp_path / "swarm.key"
    made = run_pyz(pyz, ["psk", str(key)], make_home("keymaker").env)
    assert made.returncode == 0 and key.is_file(), made.stderr
    return key


def arrays_of(doc: dict[str, Any]) -> str:
    (check,) = [c for c in doc["checks"] if c["name"] == "connection"]
    return str(check["detail"]).split("; arrays: ", 1)[1]


def test_psk_initiate_and_respond_use_the_data_plane_at_the_real_address(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, psk_file: Path
) -> None:
    a, b = make_home("box-a"), make_home("box-b")
    psk = ["--psk", str(psk_file)]
    initiate: list[str | Path] = [pyz, "initiate", *psk, "--json", "--size", "256", "--transfer-mib", "32"]
    with netns_pair.proc("a", [*initiate, "--timeout", "60"], env=a.env, name="initiator@a") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        (address,) = [x for x in printed_addresses(initiator.stdout_lines) if f"/{netns_pair.addr_a}/" in x]
        code = pairing_code(initiator.stdout_lines)
        respond: list[str | Path] = [pyz, "respond", address, "--code", code, *psk, "--json", "--timeout", "30"]
        with netns_pair.proc("b", respond, env=b.env, name="responder@b") as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    initiator_doc, responder_doc = last_json(initiator.stdout_lines), last_json(responder.stdout_lines)
    assert [c["name"] for c in initiator_doc["checks"]] == CHECK_NAMES
    assert initiator_doc["ok"] is True and all(c["ok"] for c in initiator_doc["checks"]), initiator_doc
    assert responder_doc["ok"] is True, responder_doc
    # The responder dialed the initiator's veth address, port + 1; the initiator saw it come from b.
    assert arrays_of(responder_doc) == f"{TLS} to {netns_pair.addr_a}:{LIBP2P_PORT + 1}", responder_doc
    assert re.fullmatch(rf"{TLS} from {re.escape(netns_pair.addr_b)}:\d+", arrays_of(initiator_doc)), initiator_doc
    for proc in (initiator, responder):
        text = "\n".join(proc.stderr_lines)
        # The throughput check's bytes went over the data plane: it was never lost or refused.
        assert "unavailable" not in text and "lost" not in text and "Traceback" not in text, proc.output()
        assert not WILDCARD.search(text + "\n".join(proc.stdout_lines)), proc.output()
    up, down = initiator_doc["throughput_mb_s"]["upload"], initiator_doc["throughput_mb_s"]["download"]
    print(f"\nnetns --psk throughput over the data plane: upload {up:.0f} MB/s, download {down:.0f} MB/s")


def test_psk_serve_pair_peers_list_dialable_addresses_only(
    netns_pair: NetnsPair, pyz: Path, make_home: Any, psk_file: Path
) -> None:
    home_a, home_b = make_home("box-a"), make_home("box-b")
    common = ["serve", "--psk", str(psk_file), "--rpc", "127.0.0.1:0", "--metrics", "off", "-v"]
    b_proc = netns_pair.proc("b", [pyz, *common, "--allow-peer", peer_id_of(pyz, home_a)], env=home_b.env, name="B")
    with b_proc:
        b = serve_node(b_proc, home_b)
        (b_veth,) = [x.strip() for x in b_proc.stdout_lines if x.startswith(f"  /ip4/{netns_pair.addr_b}/")]
        a_proc = netns_pair.proc("a", [pyz, *common, "--peer", b_veth], env=home_a.env, name="A")
        with a_proc:
            a = serve_node(a_proc, home_a)
            a_proc.wait_for_line(rf"^pangea: connected to peer {b.peer_id}$", timeout=60)
            peers = {}
            for which, node in (("a", a), ("b", b)):
                result = netns_pair.run(which, [pyz, "call", "--rpc", node.rpc, "--json", "peers"], env=node.home.env)
                assert result.returncode == 0, result.stderr
                (peers[which],) = json.loads(result.stdout)
            # A dialed B: B's announced 0.0.0.0 listener is listed at B's veth address.
            assert peers["a"]["addresses"] == [b_veth], peers["a"]
            assert peers["a"]["data_plane"] == f"{TLS} to {netns_pair.addr_b}:{int(b_veth.split('/')[4]) + 1}"
            # B was dialed by A: A's listener at A's veth address, the data connection from there.
            (a_listed,) = peers["b"]["addresses"]
            assert a_listed.startswith(f"/ip4/{netns_pair.addr_a}/tcp/") and a_listed.endswith(a.peer_id), peers
            assert re.fullmatch(rf"{TLS} from {re.escape(netns_pair.addr_a)}:\d+", peers["b"]["data_plane"]), peers
    for proc in (a_proc, b_proc):
        text = "\n".join(proc.stderr_lines) + a.session_log() + b.session_log()
        assert not WILDCARD.search(text), proc.output()

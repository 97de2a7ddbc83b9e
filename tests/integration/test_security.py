"""Who may use a node: pairing codes, trust lists, pre-shared keys, copied identities, files.

Real processes from the built pangea.pyz on 127.0.0.1, plus the hostile test
peer (tests/peers/hostile.py, run with ``SHIV_INTERPRETER=1``) where a peer
must do something the pangea CLI never does: say Hello without being
trusted, try many pairing codes in a row, ask an initiator or a responder to
run its tasks. What is checked, after README "Security":

* an untrusted peer is refused with a readable error naming ``--allow-peer``
  (serve) or the pairing code (initiate), runs no task, and the node logs
  ``pangea: refused <role> <peer id> at <address>: <reason>``;
* pairing: the join string works; a wrong code is refused; a code used by one
  peer is refused to another; 5 wrong tries burn it; ``serve --pair
  --remember`` writes ``trusted_peers`` (0600), so both nodes reconnect after a
  restart without a code; a trusted_peers file with comments and a bad line;
* ``--psk``: nodes with different keys (or only one with a key) cannot connect;
* a copied pangea home (one peer id, two processes on two machines: the
  copy runs with PANGEA_TEST_HOST_ID, the test aid that stands for another
  machine) is refused as ``duplicate-identity`` with a hint to delete
  identity.key; one home run twice on one machine is refused as
  ``identity-in-use``, naming the process, never with that hint;
* modes of the home, session dirs and key files; the pairing code is never
  written to the session files or the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, Proc
from pyz_helpers import (
    FAST,
    PAIR_TIMEOUT_S,
    RESPONDER_CONNECTED,
    ServeNode,
    assert_expected_error,
    free_port,
    last_json,
    loopback_address,
    pairing_code,
    peer_id_from,
    peer_id_of,
    run_pyz,
    session_dirs,
    start_initiator,
    start_serve,
)

import pangea
from pangea import Client, RpcError

HOSTILE = Path(__file__).resolve().parents[1] / "peers" / "hostile.py"
ENDED = {"eof", "reset"}
CLIENT_TIMEOUT_S = 60.0
REFUSED_LINE = r"^pangea: refused {role} {peer_id} at /ip4/127\.0\.0\.1/tcp/\d+: "

# ---------------------------------------------------------------- helpers
# NOTE: the same small helpers as in test_hostile.py; importing them from there
# would make mypy see that file under two module names.


@dataclass
class HostileRun:
    proc: Proc
    events: list[dict[str, Any]]

    def all(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def one(self, event: str, **match: Any) -> dict[str, Any]:
        found = self.all(event, **match)
        assert len(found) == 1, f"expected one {event} {match}, got {found}\n{self.proc.output()}"
        return found[0]


def run_hostile(pyz: Path, home: NodeHome, target: str, *scenarios: str, options: tuple[str, ...] = ()) -> HostileRun:
    """Run the hostile peer (identity in ``home``) against ``target``; its JSON lines."""
    cmd = [str(pyz), str(HOSTILE), "--home", str(home.pangea_home), "--target", target, *options, *scenarios]
    with Proc(cmd, env={**home.env, "SHIV_INTERPRETER": "1"}, name="hostile") as proc:
        rc = proc.wait(timeout=180)
    events = [json.loads(line) for line in proc.stdout_lines if line.startswith("{")]
    assert rc == 0 and not [e for e in events if e["event"] == "crash"], proc.output()
    return HostileRun(proc, events)


def bare_address(join: str) -> str:
    """The multiaddr of a join string, without its code."""
    return "/" + join.removeprefix("pangea://").partition("#")[0]


def other_code(code: str, shift: int = 1) -> str:
    """A valid-looking pairing code that is not ``code``."""
    alphabet = pangea.PAIRING_ALPHABET
    plain = code.replace("-", "")
    return alphabet[(alphabet.index(plain[0]) + shift) % len(alphabet)] + plain[1:]


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def remote_matmul_runs_on(node: ServeNode, peer_id: str) -> None:
    x = np.arange(16.0).reshape(4, 4)
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        np.testing.assert_allclose(rpc.matmul(x, x, placement=peer_id), x @ x)
        assert rpc.last_task["ran_on"] == peer_id


@pytest.fixture
def serve(pyz: Path) -> Iterator[Callable[..., ServeNode]]:
    """Start serve nodes for one test (`serve(home, *args, name=...)`); all stopped at its end."""
    started: list[ServeNode] = []

    def start(home: NodeHome, *args: str, name: str, port: int = 0) -> ServeNode:
        node = start_serve(pyz, home, *args, name=name, port=port, ready_timeout=60)
        started.append(node)
        return node

    yield start
    for node in reversed(started):
        node.proc.stop()


# ---------------------------------------------------------------- untrusted peers


def test_serve_trusts_its_trusted_peers_file_and_refuses_anyone_else_naming_allow_peer(
    pyz: Path, make_home: Any, serve: Any
) -> None:
    """A trusted_peers file with comments and a bad line (ignored with a warning): the peer
    it names runs tasks; a stranger is refused, runs nothing, and is logged."""
    home, friend, stranger = make_home("node"), make_home("friend"), make_home("stranger")
    friend_id, stranger_id = peer_id_of(pyz, friend), peer_id_of(pyz, stranger)
    path = home.pangea_home / "trusted_peers"
    path.write_text(f"# boxes allowed to use this one\n\n{friend_id}   # the friend box\nnot-a-peer-id\n# end\n")
    path.chmod(0o600)
    node = serve(home, name="serve")
    warning = node.proc.wait_for_line(r"^pangea: ignoring .*trusted_peers", stream="stderr").string
    assert warning == f"pangea: ignoring {path} line 4: 'not-a-peer-id' is not a peer id", warning
    node.proc.wait_for_line(rf"^Trusted peers: {friend_id}$", stream="stdout")

    run = run_hostile(pyz, stranger, node.address, "hello")
    reply = run.one("hello")["reply"]
    assert reply["type"] == "ErrorMsg" and reply["kind"] == "refused", reply
    assert reply["message"].startswith(f"peer {stranger_id} is not trusted by node {node.peer_id}"), reply
    assert f"--allow-peer {stranger_id}" in reply["message"] and "serve --pair" in reply["message"], reply
    assert run.one("after")["reply"]["type"] in ENDED  # the stream ends after the refusal
    assert run.one("task-without-session")["reply"]["type"] in ENDED  # a task without a session: reset
    refused = node.proc.wait_for_line(REFUSED_LINE.format(role="serve", peer_id=stranger_id), stream="stderr")
    assert "is not trusted" in refused.string and f"--allow-peer {stranger_id}" in refused.string
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        status = rpc.status()
    assert status["tasks_served"] == 0 and status["peer_count"] == 0, status

    run = run_hostile(pyz, friend, node.address, "hello")
    assert run.one("hello")["reply"]["type"] == "HelloMsg"
    assert run.one("good")["ok"] is True
    assert node.proc.returncode is None


def test_a_failed_connect_leaves_no_trust_behind(pyz: Path, make_home: Any, serve: Any) -> None:
    """`connect` to a dead address, or to a live node under another peer id, fails as before and does
    not make the node trust the peer it named: a peer with that id is refused a session afterwards."""
    home, decoy, stranger = make_home("node"), make_home("decoy"), make_home("stranger")
    stranger_id = peer_id_of(pyz, stranger)
    node = serve(home, name="serve")
    other = serve(decoy, name="serve-decoy")
    other_port = other.address.split("/tcp/")[1].split("/")[0]
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{stranger_id}"
    impostor = f"/ip4/127.0.0.1/tcp/{other_port}/p2p/{stranger_id}"  # a live node, but not that peer
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        for address in (dead, impostor):
            with pytest.raises(RpcError) as info:
                rpc.connect(address)
            assert str(info.value).startswith("cannot "), info.value
        assert rpc.peers() == [] and rpc.status()["peer_count"] == 0

    run = run_hostile(pyz, stranger, node.address, "hello")
    reply = run.one("hello")["reply"]
    assert reply["type"] == "ErrorMsg" and reply["kind"] == "refused", reply
    assert reply["message"].startswith(f"peer {stranger_id} is not trusted by node {node.peer_id}"), reply
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        assert rpc.status()["tasks_served"] == 0
    assert node.proc.returncode is None


def test_initiator_refuses_a_responder_without_the_code_and_pairs_with_the_join_string_never_writing_it(
    pyz: Path, make_home: Any
) -> None:
    """Also the modes of the home, identity and session dir, and the code kept out of every file."""
    a, stranger, b = make_home("initiator"), make_home("stranger"), make_home("responder")
    with start_initiator(pyz, a, "-v", "--json", *FAST, "--timeout", "90") as initiator:
        join = loopback_address(initiator)
        code = pairing_code(initiator.stdout_lines)
        home = a.pangea_home
        assert mode(home) == 0o700
        assert mode(home / pangea.IDENTITY_FILENAME) == 0o600
        assert mode(home / pangea.SESSIONS_DIRNAME) == 0o700
        (session,) = session_dirs(a, "initiator")
        assert mode(session) == 0o700
        secrets = {code, code.replace("-", ""), join}

        def assert_no_secret() -> None:
            for name in ("pangea.log", "info.json", "addresses.txt", "pid"):
                text = (session / name).read_text(errors="replace")
                for secret in secrets:
                    assert secret not in text, (name, secret)
            stderr = "\n".join(initiator.stderr_lines)  # -v: the log on stderr too
            assert not any(secret in stderr for secret in secrets), stderr

        assert wait_until(lambda: "pairing code issued" in (session / "pangea.log").read_text(), 10)
        assert_no_secret()

        refused = run_pyz(pyz, ["respond", bare_address(join), "--timeout", "20"], stranger.env)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        error = assert_expected_error(refused.stderr, "needs its pairing code", "--code")
        assert "join string" in error
        stranger_id = peer_id_of(pyz, stranger)
        line = initiator.wait_for_line(REFUSED_LINE.format(role="responder", peer_id=stranger_id), stream="stderr")
        assert "needs its pairing code" in line.string

        # A peer that proves the code works (the join string carries it).
        with Proc([str(pyz), "respond", join, "--json", "--timeout", "30"], env=b.env, name="responder") as responder:
            initiator.wait_for_line(r"^Responder connected: ", stream="stdout", timeout=60)
            if session.exists():  # still running its checks: the log of the pairing itself
                assert_no_secret()
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    assert last_json(initiator.stdout_lines)["peer"] == peer_id_from(responder.stdout_lines, "responder")
    assert last_json(initiator.stdout_lines)["ok"] is True
    assert mode(b.pangea_home) == 0o700 and mode(b.pangea_home / pangea.IDENTITY_FILENAME) == 0o600
    assert not session.exists()


def test_initiator_runs_no_task_for_its_paired_responder(pyz: Path, make_home: Any) -> None:
    a, fake = make_home("initiator"), make_home("fake-responder")
    with start_initiator(pyz, a, *FAST, "--timeout", "60") as initiator:
        join = loopback_address(initiator)
        code = pairing_code(initiator.stdout_lines)
        options = ("--role", "responder", "--code", code)
        run = run_hostile(pyz, fake, bare_address(join), "task-on-initiator", options=options)
    reply = run.one("reply")["reply"]
    assert reply["type"] == "TaskResultMsg" and reply["error_kind"] == "refused", reply
    assert "does not run tasks for" in reply["error_message"], reply


# ---------------------------------------------------------------- pairing codes


def test_wrong_codes_are_refused_and_five_burn_the_code(pyz: Path, make_home: Any) -> None:
    a, wrong, guesser, late = make_home("initiator"), make_home("wrong"), make_home("guesser"), make_home("late")
    with start_initiator(pyz, a, "--timeout", "120") as initiator:
        join = loopback_address(initiator)
        code = pairing_code(initiator.stdout_lines)
        # 1: a responder with a wrong --code gets one readable line, the tries left, and exit 2
        result = run_pyz(pyz, ["respond", bare_address(join), "--code", other_code(code), "--timeout", "20"], wrong.env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert_expected_error(result.stderr, "wrong pairing code (4 tries left")
        # 2-5: four more wrong guesses burn the code; the initiator says so and exits
        guesses = [other_code(code, shift) for shift in (2, 3, 4, 5)]
        options = ("--role", "responder", "--codes", ",".join(guesses))
        run = run_hostile(pyz, guesser, bare_address(join), "pair-tries", options=options)
        replies = [e["reply"] for e in run.all("try")]
        assert all(r.get("message", "").startswith("wrong pairing code (") for r in replies[:3]), replies
        assert replies[3]["kind"] == "refused" and "the code is burned now" in replies[3]["message"], replies
        assert initiator.wait(timeout=30) == 2, initiator.output()
        refusals = [line for line in initiator.stderr_lines if line.startswith("pangea: refused responder ")]
    assert_expected_error(initiator.stderr_lines[-2:], "burned after 5 wrong tries")
    # and the real join string no longer works either: that initiator is gone
    result = run_pyz(pyz, ["respond", join, "--timeout", "3"], late.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "nothing listening on 127.0.0.1:")
    assert sum("wrong pairing code" in line for line in refusals) == 5, refusals
    for line in refusals:
        assert re.match(r"^pangea: refused responder 12D3KooW\w+ at /ip4/127\.0\.0\.1/tcp/\d+: ", line), line
    assert not any(code in line or code.replace("-", "") in line for line in initiator.stderr_lines)


def test_serve_pair_remember_then_both_restart_and_reconnect_without_a_code(
    pyz: Path, make_home: Any, serve: Any
) -> None:
    home_p, home_q, other = make_home("p"), make_home("q"), make_home("other")
    port = free_port()
    p = serve(home_p, "--pair", "--remember", name="serve-P", port=port)
    join = p.proc.wait_for_line(r"^Join string: (pangea://\S+)$", stream="stdout").group(1)
    code = p.proc.wait_for_line(r"^Pairing code \(one use, valid 600 s\): (\S+)$", stream="stdout").group(1)
    assert bare_address(join) == p.address
    # The code is on stdout only: not in the session files nor the log.
    (session,) = session_dirs(home_p)
    for path in session.iterdir():
        text = path.read_text(errors="replace")
        assert code not in text and code.replace("-", "") not in text, path

    q = serve(home_q, "--peer", join, name="serve-Q")
    p.proc.wait_for_line(rf"^pangea: paired with {q.peer_id} \(remembered\)$", stream="stdout")
    q.proc.wait_for_line(rf"^pangea: connected to peer {p.peer_id}$", stream="stdout")
    trusted = home_p.pangea_home / "trusted_peers"
    assert mode(trusted) == 0o600
    ids, complaints = pangea.parse_trusted_peers(trusted.read_text())
    assert ids == {q.peer_id} and complaints == []
    remote_matmul_runs_on(q, p.peer_id)

    # The same code from another peer: already used.
    other_id = peer_id_of(pyz, other)
    run = run_hostile(pyz, other, p.address, "hello", options=("--code", code))
    reply = run.one("hello")["reply"]
    assert reply["kind"] == "refused" and "already used by another peer" in reply["message"], reply
    p.proc.wait_for_line(REFUSED_LINE.format(role="serve", peer_id=other_id) + ".*already used", stream="stderr")

    # Restart both without any code: P trusts Q from trusted_peers, Q dials P's plain address.
    assert q.proc.stop() == 0 and p.proc.stop() == 0
    p2 = serve(home_p, name="serve-P-again", port=port)
    assert p2.peer_id == p.peer_id
    p2.proc.wait_for_line(rf"^Trusted peers: {q.peer_id}$", stream="stdout")
    assert not any(line.startswith("Pairing code") for line in p2.proc.stdout_lines)
    q2 = serve(home_q, "--peer", p.address, name="serve-Q-again")
    q2.proc.wait_for_line(rf"^pangea: connected to peer {p.peer_id}$", stream="stdout")
    remote_matmul_runs_on(q2, p.peer_id)
    assert not [line for line in p2.proc.stderr_lines if line.startswith("pangea: refused")], p2.proc.output()


# ---------------------------------------------------------------- private network (--psk)


def test_psk_writes_a_0600_swarm_key_and_refuses_to_overwrite(pyz: Path, pangea_home: NodeHome, tmp_path: Path) -> None:
    key = tmp_path / "swarm.key"
    result = run_pyz(pyz, ["psk", str(key)], pangea_home.env)
    assert result.returncode == 0, result.stderr
    assert mode(key) == 0o600
    lines = key.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and re.fullmatch(r"[0-9a-f]{64}", lines[2]), lines
    assert pangea.parse_psk(key.read_text()) == lines[2]
    assert lines[2] not in result.stdout + result.stderr  # the key is not echoed
    again = run_pyz(pyz, ["psk", str(key)], pangea_home.env)
    assert again.returncode == 2
    assert_expected_error(again.stderr, "exists")
    assert key.read_text().splitlines()[2] == lines[2]


@pytest.mark.slow
def test_psk_nodes_without_the_same_key_cannot_connect(pyz: Path, make_home: Any, tmp_path: Path) -> None:
    a, b, c = make_home("initiator"), make_home("responder"), make_home("other")
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    for key in (k1, k2):
        assert run_pyz(pyz, ["psk", str(key)], a.env).returncode == 0
    with start_initiator(pyz, a, "--json", *FAST, "--psk", str(k1), "--timeout", "120") as initiator:
        join = loopback_address(initiator)
        # No key, and another key, at once: neither gets through.
        with contextlib.ExitStack() as stack:
            procs = [
                stack.enter_context(
                    Proc([str(pyz), "respond", join, "--timeout", "3", *extra], env=home.env, name=f"responder-{name}")
                )
                for name, extra, home in (("no-key", [], b), ("other-key", ["--psk", str(k2)], c))
            ]
            for proc in procs:
                assert proc.wait(timeout=60) == 2, proc.output()
        for proc in procs:
            assert_expected_error(proc.stderr_lines, "cannot reach")
            assert proc.stderr_lines[1].startswith("hint: ") and "--psk" in proc.stderr_lines[1], proc.output()
        assert initiator.returncode is None, initiator.output()
        # The same key: the whole run.
        with Proc(
            [str(pyz), "respond", join, "--json", "--psk", str(k1), "--timeout", "30"], env=b.env, name="responder"
        ) as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    assert last_json(initiator.stdout_lines)["ok"] is True


def test_psk_file_that_is_not_a_key_is_one_error_line(pyz: Path, pangea_home: NodeHome, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = run_pyz(pyz, ["serve", "--port", "0", "--rpc", "127.0.0.1:0", "--psk", str(bad)], pangea_home.env)
    assert result.returncode == 2
    assert_expected_error(result.stderr, "64 hex digits")


# ---------------------------------------------------------------- copied identities


def copy_identity(source: NodeHome, target: NodeHome) -> None:
    shutil.copy2(source.pangea_home / pangea.IDENTITY_FILENAME, target.pangea_home / pangea.IDENTITY_FILENAME)


@pytest.mark.slow
def test_copied_home_second_process_is_refused_as_duplicate_identity(pyz: Path, make_home: Any, serve: Any) -> None:
    home_c, home_a, home_copy = make_home("c"), make_home("a"), make_home("a-copy")
    home_copy.env[pangea.HOST_ID_ENV] = "another-box"  # the copy runs on another machine
    a_id = peer_id_of(pyz, home_a)
    copy_identity(home_a, home_copy)
    assert peer_id_of(pyz, home_copy) == a_id
    c = serve(home_c, "--allow-peer", a_id, name="serve-C")
    a = serve(home_a, "--peer", c.address, name="serve-A")
    a.proc.wait_for_line(rf"^pangea: connected to peer {c.peer_id}$", stream="stdout")

    a_copy = serve(home_copy, "--peer", c.address, name="serve-A-copy")
    line = a_copy.proc.wait_for_line(r"cannot reach peer .*already connected from another process", stream="stderr")
    assert "delete identity.key" in line.string, line.string
    refused = c.proc.wait_for_line(REFUSED_LINE.format(role="serve", peer_id=a_id), stream="stderr").string
    assert f"peer id {a_id} is already connected from another process" in refused, refused
    assert "identity.key" in refused
    assert not any(f"connected to peer {c.peer_id}" in line for line in a_copy.proc.stdout_lines)

    # Seen from the wire: the refusal's kind is duplicate-identity.
    run = run_hostile(pyz, home_copy, c.address, "hello")
    reply = run.one("hello")["reply"]
    assert reply["type"] == "ErrorMsg" and reply["kind"] == "duplicate-identity", reply
    assert "delete identity.key" in reply["message"]
    # The original keeps working.
    remote_matmul_runs_on(a, c.peer_id)


def test_one_home_run_twice_is_refused_as_identity_in_use_naming_the_process_not_as_a_copy(
    pyz: Path, make_home: Any, serve: Any
) -> None:
    home_c, home_a = make_home("c"), make_home("a")
    a_id = peer_id_of(pyz, home_a)
    c = serve(home_c, "--allow-peer", a_id, name="serve-C")
    a = serve(home_a, "--peer", c.address, name="serve-A")
    a.proc.wait_for_line(rf"^pangea: connected to peer {c.peer_id}$", stream="stdout")

    again = serve(home_a, "--peer", c.address, name="serve-A-again")  # the same home, a second process
    line = again.proc.wait_for_line(r"cannot reach peer .*another pangea process on its machine", stream="stderr")
    assert "(serve)" in line.string and "PANGEA_HOME" in line.string, line.string
    refused = c.proc.wait_for_line(REFUSED_LINE.format(role="serve", peer_id=a_id), stream="stderr").string
    assert f"peer id {a_id} already has a session here from another pangea process on its machine" in refused
    for text in (line.string, refused):
        assert "identity.key" not in text and "copied" not in text, text
    remote_matmul_runs_on(a, c.peer_id)  # the first one keeps working


def test_a_forged_claim_to_run_from_the_nodes_own_home_is_refused(pyz: Path, make_home: Any, serve: Any) -> None:
    node = serve(make_home("node"), name="serve")
    run = run_hostile(pyz, make_home("forger"), node.address, "forged-home")
    for proof in ("garbage", "wrong-key"):
        reply = run.one("forged-home", proof=proof)["reply"]
        assert reply["type"] == "ErrorMsg" and reply["kind"] == "refused", (proof, reply)
    assert "runs from the pangea home" not in node.session_log()
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        assert rpc.status()["peer_count"] == 0


def peak_rss_mib(pid: int) -> float:
    """VmHWM (the peak resident memory) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


PENDING_RSS_BOUND_MIB = 200  # what 100 identities' waiting streams may add to a node's peak memory


@pytest.mark.slow
def test_fresh_identities_cannot_hold_more_pending_streams_than_the_node_wide_cap(
    pyz: Path, make_home: Any, serve: Any
) -> None:
    # 100 fresh identities x 16 streams that each start a frame and never finish its header:
    # per peer each is within the cap of 16; node-wide only 64 strangers' streams may wait.
    home = make_home("flooder")
    flooder = peer_id_of(pyz, home)
    node = serve(make_home("node"), "--allow-peer", flooder, name="serve")
    before = peak_rss_mib(node.proc.pid)
    mark = len(node.proc.stderr_lines)
    options = ("--identities", "100", "--count", "16", "--header-kib", "8", "--partial-kib", "4", "--hold", "5")
    run = run_hostile(pyz, home, node.address, "identity-flood", options=options)
    flood = run.one("identity-flood")
    assert flood["count"] == 1600, flood
    assert flood["accepted"] <= pangea.DEFAULT_MAX_PENDING_STRANGER_STREAMS, flood  # today's main: 1,600
    assert run.one("good")["ok"] is True  # the trusted peer still gets its session and a correct result
    logged = node.stderr_since(mark)
    assert any("streams of untrusted peers already wait for their Hello" in line for line in logged), logged[-5:]
    per_address = (
        "untrusted peers from 127.0.0.1 already wait for their Hello",
        "untrusted peers from 127.0.0.1 are open",
    )
    assert any(any(text in line for text in per_address) for line in logged), logged[-5:]
    # Frames whose header is larger than a Hello can be are refused at once before the Hello.
    options = ("--identities", "40", "--count", "16", "--header-kib", "1023", "--partial-kib", "256", "--hold", "5")
    run = run_hostile(pyz, home, node.address, "identity-flood", options=options)
    flood = run.one("identity-flood")
    assert flood["accepted"] == 0, flood  # today's main: 640, +463-674 MiB
    assert run.one("good")["ok"] is True
    assert peak_rss_mib(node.proc.pid) - before < PENDING_RSS_BOUND_MIB, (before, peak_rss_mib(node.proc.pid))
    x = np.arange(16.0).reshape(4, 4)
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        np.testing.assert_allclose(rpc.matmul(x, x), x @ x)
    assert node.proc.returncode is None, node.proc.output()


def test_idle_connections_of_strangers_are_capped_per_address_and_closed_after_the_handshake_timeout(
    pyz: Path, make_home: Any, serve: Any
) -> None:
    home = make_home("idler")
    node = serve(make_home("node"), "--allow-peer", peer_id_of(pyz, home), name="serve")
    mark = len(node.proc.stderr_lines)
    run = run_hostile(pyz, home, node.address, "idle-connections", options=("--identities", "30", "--hold", "14"))
    idle = run.one("idle-connections")
    assert idle["connected"] == 30, idle
    # today's main: 30 and 30 (every idle connection stays, taking one of py-libp2p's 250 inbound slots)
    assert idle["open_after_connect"] <= pangea.MAX_STRANGER_CONNECTIONS_PER_ADDRESS, idle
    assert idle["open_at_end"] == 0, idle  # closed 10 s (the handshake timeout) after they opened
    assert run.one("good")["ok"] is True  # the trusted peer connects and gets a correct result meanwhile
    logged = node.stderr_since(mark)
    assert any("connections of untrusted peers from 127.0.0.1 are open" in line for line in logged), logged[-5:]
    x = np.arange(9.0).reshape(3, 3)
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        np.testing.assert_allclose(rpc.matmul(x, x), x @ x)
    assert node.proc.returncode is None, node.proc.output()


def test_a_node_still_accepts_connections_after_hundreds_in_its_lifetime(pyz: Path, make_home: Any, serve: Any) -> None:
    home = make_home("cycler")
    node = serve(make_home("node"), "--allow-peer", peer_id_of(pyz, home), name="serve")
    options = ("--identities", "300", "--count", "10", "--timeout", "10")
    cycle = run_hostile(pyz, home, node.address, "reconnect-cycle", options=options).one("reconnect-cycle")
    # today's main: 249 connected, then every new connection (trusted peers' too) closed for good
    assert cycle["connected"] == 300 and cycle["first_failure"] is None, cycle
    # a new process, hence a new connection of the trusted peer, still gets its session and a correct result
    assert run_hostile(pyz, home, node.address, "good").one("good")["ok"] is True
    assert node.proc.returncode is None, node.proc.output()


def test_respond_with_a_copy_of_the_initiators_identity_is_refused(pyz: Path, make_home: Any) -> None:
    a, b = make_home("initiator"), make_home("responder")
    peer_id_of(pyz, a)  # creates a's identity
    copy_identity(a, b)
    with start_initiator(pyz, a, "--timeout", "60") as initiator:
        join = loopback_address(initiator)
        result = run_pyz(pyz, ["respond", join, "--timeout", "10"], b.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "own peer ID")


# ---------------------------------------------------------------- a responder works only for its initiator


@pytest.mark.slow
def test_responder_refuses_every_peer_but_its_initiator(pyz: Path, make_home: Any) -> None:
    a, b, stranger = make_home("initiator"), make_home("responder"), make_home("stranger")
    port = free_port()
    responder_id = peer_id_of(pyz, b)
    with start_initiator(pyz, a, "--size", "3000", "--transfer-mib", "256", "--timeout", "60") as initiator:
        join = loopback_address(initiator)
        initiator_id = peer_id_from(initiator.stdout_lines, "initiator")
        cmd = [str(pyz), "respond", join, "--host", "127.0.0.1", "--port", str(port), "--timeout", "30"]
        with Proc(cmd, env=b.env, name="responder") as responder:
            responder.wait_for_line(RESPONDER_CONNECTED, stream="stdout")
            target = f"/ip4/127.0.0.1/tcp/{port}/p2p/{responder_id}"
            run = run_hostile(pyz, stranger, target, "hello", options=("--role", "initiator"))
            reply = run.one("hello")["reply"]
            assert reply["type"] == "ErrorMsg" and reply["kind"] == "refused", reply
            assert reply["message"] == f"this responder only works for {initiator_id}", reply


# ---------------------------------------------------------------- files


def test_id_creates_a_0600_identity_in_a_0700_home(pyz: Path, make_home: Any) -> None:
    home = make_home("fresh")
    shutil.rmtree(home.pangea_home)
    peer_id = peer_id_of(pyz, home)
    assert pangea.is_peer_id(peer_id)
    assert mode(home.pangea_home) == 0o700
    assert mode(home.pangea_home / pangea.IDENTITY_FILENAME) == 0o600
    assert os.listdir(home.pangea_home) == [pangea.IDENTITY_FILENAME]

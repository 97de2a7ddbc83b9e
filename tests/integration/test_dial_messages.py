"""Dial and pairing failures that name their cause and the next step (README "When something is wrong").

Real processes from the built pangea.pyz on 127.0.0.1:

* `respond` to a port with nothing listening, and to a real initiator's address
  with another /p2p/ id: one error line naming the cause (nothing listening on
  HOST:PORT; the node there has peer id X, you asked for Y), a hint, exit 2;
* five wrong pairing codes: each responder is told how many tries are left and
  what to do; the fifth burns the code and the initiator says so at once and
  exits 2, long before its --timeout;
* `respond --discover` without a terminal or --code stops before any dial;
* `serve --peer` at a port with nothing listening says the cause once, briefly,
  then stays quiet while it redials;
* `doctor` against a node that refuses it names this box's own peer id to allow,
  never the throwaway id it probed with.

And the exception chains py-libp2p 0.8.1 really raises, collected in this process
(real dials on loopback: a closed port, a real node under a wrong peer id, its data
port, a listener that never answers), each classified by `classify_dial_error`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import NodeHome
from pyz_helpers import (
    assert_expected_error,
    free_port,
    loopback_address,
    pairing_code,
    peer_id_from,
    peer_id_of,
    run_pyz,
    start_initiator,
    start_serve,
)

import pangea

WRONG_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"  # a valid peer id nobody here runs


def bare(join: str) -> str:
    """The multiaddr of a join string, without its code."""
    return "/" + join.removeprefix("pangea://").partition("#")[0]


def other_code(code: str, shift: int) -> str:
    """A valid-looking pairing code that is not ``code``."""
    alphabet = pangea.PAIRING_ALPHABET
    plain = code.replace("-", "")
    first = alphabet[(alphabet.index(plain[0]) + shift) % len(alphabet)]
    return first + plain[1:]


# ---------------------------------------------------------------- respond: refused, wrong peer id


def test_respond_to_a_port_with_nothing_listening_names_it(pyz: Path, make_home: Any) -> None:
    port = free_port()
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{WRONG_ID}"
    result = run_pyz(pyz, ["respond", address, "--code", "AAAA-BBBB-CCCC", "--timeout", "3"], make_home("r").env)
    assert result.returncode == 2, result.stdout + result.stderr
    line = assert_expected_error(result.stderr, f"nothing listening on 127.0.0.1:{port}")
    assert "SwarmDialAllFailedError" not in result.stderr and "with exceptions" not in result.stderr, line
    assert "hint: is the initiator running there, and on that port?" in result.stderr, result.stderr


def test_respond_to_an_initiator_under_a_wrong_peer_id_names_the_real_one(pyz: Path, make_home: Any) -> None:
    a, b = make_home("initiator"), make_home("responder")
    with start_initiator(pyz, a, "--timeout", "120") as initiator:
        join = loopback_address(initiator)
        real_id = peer_id_from(initiator.stdout_lines, "initiator")
        wrong = bare(join).replace(real_id, WRONG_ID)
        started = time.monotonic()
        result = run_pyz(
            pyz, ["respond", wrong, "--code", pairing_code(initiator.stdout_lines), "--timeout", "60"], b.env
        )
        took = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"the node there has peer id {real_id}, you asked for {WRONG_ID}")
    assert "hint: check the address you copied" in result.stderr, result.stderr
    assert took < 45, f"a wrong peer id is final: no redials until --timeout 60 ({took:.0f} s)"


# ---------------------------------------------------------------- pairing codes


def test_five_wrong_codes_tell_tries_left_then_the_initiator_exits_naming_the_burned_code(
    pyz: Path, make_home: Any
) -> None:
    a, b = make_home("initiator"), make_home("responder")
    limit = pangea.MAX_PAIRING_FAILURES
    with start_initiator(pyz, a, "--timeout", "300") as initiator:
        join = loopback_address(initiator)
        code = pairing_code(initiator.stdout_lines)
        errors = []
        for shift in range(1, limit + 1):
            result = run_pyz(pyz, ["respond", bare(join), "--code", other_code(code, shift), "--timeout", "20"], b.env)
            assert result.returncode == 2, result.stdout + result.stderr
            errors.append(result.stderr)
        burned_at = time.monotonic()
        exit_code = initiator.wait(timeout=30)  # at once, not after --timeout 300
        waited = time.monotonic() - burned_at
    for tries, stderr in enumerate(errors[:-1], 1):
        left = limit - tries
        assert_expected_error(stderr, f"wrong pairing code ({left} {'try' if left == 1 else 'tries'} left")
        assert "hint: copy the join string `initiate` printed" in stderr, stderr
    assert_expected_error(errors[-1], f"that was the last of {limit} tries, the code is burned now")
    assert "hint: run `initiate` there again for a new code" in errors[-1], errors[-1]
    assert exit_code == 2, initiator.output()
    assert waited < 30
    responder_id = peer_id_of(pyz, b)
    line = assert_expected_error(initiator.stderr_lines[-2:], f"pairing code burned after {limit} wrong tries from")
    assert f"{responder_id} (127.0.0.1)" in line, line
    assert "run `./pangea.pyz initiate` again for a new code" in initiator.stderr_lines[-1], initiator.output()
    assert "nobody connected" not in initiator.output()


def test_initiator_whose_code_expires_unused_says_expired(pyz: Path, make_home: Any) -> None:
    with start_initiator(pyz, make_home("initiator"), "--timeout", "3") as initiator:
        assert initiator.wait(timeout=60) == 2, initiator.output()
    assert_expected_error(initiator.stderr_lines, "nobody connected within 3 s; the pairing code expired unused")


def test_respond_discover_without_a_terminal_or_code_stops_before_dialing(pyz: Path, make_home: Any) -> None:
    started = time.monotonic()
    result = run_pyz(pyz, ["respond", "--discover", "--timeout", "30"], make_home("r").env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "no pairing code")
    assert "--code" in result.stderr.splitlines()[-1], result.stderr
    assert "Looking for initiators" not in result.stdout and "Connecting to" not in result.stdout, result.stdout
    assert time.monotonic() - started < pangea.DISCOVER_S + 20


# ---------------------------------------------------------------- serve --peer redials quietly


def test_serve_peer_unreachable_says_the_cause_once_then_stays_quiet(pyz: Path, make_home: Any) -> None:
    port = free_port()
    peer = f"/ip4/127.0.0.1/tcp/{port}/p2p/{WRONG_ID}"
    node = start_serve(pyz, make_home("serve"), "--peer", peer, name="serve")
    try:
        first = node.proc.wait_for_line(r"^pangea: cannot reach peer ", timeout=60, stream="stderr")
        # The old console repeated a ~300-character line at 1+10, 2+10, 4+10 ... s: 2-3 within 30 s.
        time.sleep(30)
        lines = [line for line in node.proc.stderr_lines if "peer" in line]
    finally:
        node.proc.stop()
    assert f"nothing listening on 127.0.0.1:{port}" in first.string, first.string
    assert len(first.string) < 160, first.string
    assert "SwarmDialAllFailedError" not in node.proc.output()
    assert lines == [first.string], lines


# ---------------------------------------------------------------- doctor


def test_doctor_refused_names_this_box_id_not_its_throwaway_one(pyz: Path, make_home: Any) -> None:
    a, b = make_home("serve"), make_home("doctor")
    box_id = peer_id_of(pyz, b)
    node = start_serve(pyz, a, name="serve")
    try:
        result = run_pyz(pyz, ["doctor", node.address, "--port", "0", "--json"], b.env)
    finally:
        node.proc.stop()
    findings = json.loads(result.stdout)
    detail = findings["peer"]["detail"]
    assert findings["peer"]["libp2p"] == "ok", findings
    assert f"--allow-peer {box_id}" in detail and "throwaway" in detail, detail
    ids = set(re.findall(r"12D3KooW\w+", detail))
    assert ids == {node.peer_id, box_id}, detail  # no other id (the probe's) to copy


# ---------------------------------------------------------------- the real exception chains


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


async def real_dial_error(tmp_path: Path, address: str, timeout_s: float) -> BaseException:
    """The exception py-libp2p raises for one connect to ``address`` (or our own deadline)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    key_pair = pangea.load_or_create_identity(tmp_path)
    node = pangea.Node(key_pair=key_pair, role="doctor", accept=lambda p, h: "no", may_serve=lambda p: False)
    async with node.running("127.0.0.1", 0):
        try:
            with trio.fail_after(timeout_s):
                await node.host.connect(info_from_p2p_addr(Multiaddr(address)))
        except Exception as exc:
            return exc
    raise AssertionError(f"{address} connected")


def classify(exc: BaseException, address: str, **kw: Any) -> pangea.DialFailure:
    parsed = pangea.parse_peer_address(address)
    return pangea.classify_dial_error(exc, parsed.host, parsed.port, parsed.peer_id, waited_s=5.0, **kw)


def test_real_libp2p_chains_are_classified(pyz: Path, make_home: Any, tmp_path: Path, silent_listener: int) -> None:
    pangea.setup_logging(None, 0, False)  # libp2p's own complaints stay quiet
    closed = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{WRONG_ID}"
    silent = f"/ip4/127.0.0.1/tcp/{silent_listener}/p2p/{WRONG_ID}"
    home: NodeHome = make_home("initiator")
    with start_initiator(pyz, home, "--timeout", "120") as initiator:
        join = loopback_address(initiator)
        real_id = peer_id_from(initiator.stdout_lines, "initiator")
        port = int(bare(join).split("/tcp/")[1].split("/")[0])
        wrong_id = f"/ip4/127.0.0.1/tcp/{port}/p2p/{WRONG_ID}"
        data_port = f"/ip4/127.0.0.1/tcp/{port + 1}/p2p/{real_id}"
        errors = {
            name: trio.run(real_dial_error, tmp_path / name, address, timeout)
            for name, address, timeout in [
                ("closed", closed, 15.0),
                ("wrong-id", wrong_id, 15.0),
                ("data-port", data_port, 15.0),
                ("silent", silent, 3.0),
            ]
        }
    assert type(errors["closed"]).__name__ == "SwarmDialAllFailedError", errors
    assert classify(errors["closed"], closed).cause == "refused"
    found = classify(errors["wrong-id"], wrong_id)
    assert found.cause == "peer-id" and found.final, found
    assert found.reason == f"the node there has peer id {real_id}, you asked for {WRONG_ID}"
    assert classify(errors["data-port"], data_port).cause == "handshake"
    assert type(errors["silent"]).__name__ == "TooSlowError", errors
    assert classify(errors["silent"], silent).cause == "timeout"
    assert classify(errors["silent"], silent, tcp_reached=True).cause == "handshake"
    assert (
        "accepts TCP but no libp2p handshake completed" in classify(errors["silent"], silent, tcp_reached=True).reason
    )


def test_tcp_probe_tells_refused_from_reached(silent_listener: int) -> None:
    ms, why = trio.run(pangea.tcp_probe, "127.0.0.1", silent_listener, 5.0)
    assert ms is not None and why == "", (ms, why)
    ms, why = trio.run(pangea.tcp_probe, "127.0.0.1", free_port(), 5.0)
    assert ms is None and why == "Connection refused", (ms, why)

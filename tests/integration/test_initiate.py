"""`pangea.pyz initiate` on its own, and the session directories of both roles.

What the initiator prints and records before a responder comes (the peer ID,
one full multiaddr per interface with loopback last, addresses.txt), that its
identity survives restarts, how it gives up after --timeout, and that every
session directory disappears on exit, Ctrl-C and SIGTERM, or at the next
start when its process died.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import NodeHome, Proc
from pyz_helpers import (
    INITIATOR_READY,
    assert_expected_error,
    dead_pid,
    free_port,
    peer_id_from,
    printed_addresses,
    run_pyz,
    session_dirs,
    start_initiator,
)

MULTIADDR = re.compile(r"^/ip4/(?P<ip>[\d.]+)/tcp/(?P<port>\d+)/p2p/(?P<peer>12D3KooW\w+)$")


def _machine_ipv4_addresses() -> set[str]:
    """IPv4 addresses of this machine's interfaces, from `ip -4 -o addr`."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10, check=True)
    return {fields[3].split("/")[0] for fields in (line.split() for line in out.stdout.splitlines())}


def test_initiate_prints_one_full_address_per_interface_loopback_last(pyz: Path, pangea_home: NodeHome) -> None:
    # Default --host 0.0.0.0: the wildcard must be expanded to real addresses.
    with start_initiator(pyz, pangea_home, "--host", "0.0.0.0", "--timeout", "30") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        peer_id = peer_id_from(initiator.stdout_lines, "initiator")
        addresses = printed_addresses(initiator.stdout_lines)

        assert addresses, initiator.output()
        matches = [MULTIADDR.match(a) for a in addresses]
        assert all(matches), addresses
        ips = [m.group("ip") for m in matches if m]
        assert {m.group("peer") for m in matches if m} == {peer_id}
        ports = {m.group("port") for m in matches if m}
        assert len(ports) == 1 and ports != {"0"}, addresses
        assert "0.0.0.0" not in ips
        assert len(set(ips)) == len(ips), f"an address is printed twice: {addresses}"
        assert ips[-1] == "127.0.0.1", f"loopback is not last: {addresses}"
        first_loopback = next(i for i, ip in enumerate(ips) if ipaddress.ip_address(ip).is_loopback)
        assert all(ipaddress.ip_address(ip).is_loopback for ip in ips[first_loopback:]), addresses
        if shutil.which("ip"):
            usable = {ip for ip in _machine_ipv4_addresses() if not ip.startswith("169.254.")}
            assert set(ips) == usable, f"printed {ips}, interfaces have {sorted(usable)}"

        # The session directory: <role>-<pid> with the pid, the log and the addresses.
        (session,) = session_dirs(pangea_home)
        assert session.name == f"initiator-{initiator.pid}"
        assert (session / "pid").read_text().strip() == str(initiator.pid)
        assert (session / "pangea.log").is_file()
        assert (session / "addresses.txt").read_text().splitlines() == addresses
        assert stat.S_IMODE(session.stat().st_mode) == 0o700


def test_initiate_listens_on_the_given_port(pyz: Path, pangea_home: NodeHome) -> None:
    port = free_port()
    with start_initiator(pyz, pangea_home, "--port", str(port), "--timeout", "30") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        assert printed_addresses(initiator.stdout_lines) == [
            f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_from(initiator.stdout_lines, 'initiator')}"
        ]


def test_initiate_identity_persists_across_restarts(pyz: Path, make_home) -> None:
    home, other = make_home("box"), make_home("other-box")
    args = ["initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "0.5"]
    runs = [run_pyz(pyz, args, h.env) for h in (home, home, other)]
    for run in runs:
        assert run.returncode == 2, run.stdout + run.stderr
    first, again, elsewhere = (peer_id_from(r.stdout.splitlines(), "initiator") for r in runs)
    assert first == again
    assert elsewhere != first

    key = home.pangea_home / "identity.key"
    assert key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.pangea_home.stat().st_mode) == 0o700


def test_initiate_timeout_is_one_line_and_exit_2(pyz: Path, pangea_home: NodeHome) -> None:
    start = time.monotonic()
    result = run_pyz(pyz, ["initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "1"], pangea_home.env)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout + result.stderr
    port = MULTIADDR.match(printed_addresses(result.stdout.splitlines())[0])
    assert port is not None
    assert_expected_error(result.stderr, "nobody connected within 1 s")
    assert f"TCP port {port.group('port')}" in result.stderr, result.stderr  # the port to open in a firewall
    assert 1.0 <= elapsed < 30, elapsed
    assert session_dirs(pangea_home) == []


def test_initiate_failed_run_keeps_its_log_where_the_error_says_and_status_lists_it(
    pyz: Path, pangea_home: NodeHome
) -> None:
    result = run_pyz(pyz, ["initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "1"], pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "nobody connected within 1 s")
    hint = result.stderr.splitlines()[-1]
    match = re.search(r"; log kept in (\S+\.log)$", hint)
    assert match, result.stderr
    log = Path(match.group(1))
    assert log.parent == pangea_home.pangea_home / "logs", log
    assert re.fullmatch(r"initiator-\d{8}-\d{6}-\d+\.log", log.name), log.name
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "listening on /ip4/127.0.0.1/" in text and "nobody connected within 1 s" in text, text
    assert session_dirs(pangea_home) == []  # the session directory still goes

    status = run_pyz(pyz, ["status"], pangea_home.env)
    assert status.returncode == 0, status.stderr
    assert f"log of a failed run: {log} (" in status.stdout, status.stdout
    doc = json.loads(run_pyz(pyz, ["status", "--json"], pangea_home.env).stdout)
    assert [entry["path"] for entry in doc["logs"]] == [str(log)], doc
    assert doc["logs"][0]["bytes"] == log.stat().st_size


def _start_responder_to_nowhere(pyz: Path, home: NodeHome, ghost: NodeHome) -> Proc:
    """A responder that keeps dialing a closed port on 127.0.0.1 (for up to 60 s).

    The address is a real one: printed by an initiator (in `ghost`'s home)
    that has given up and exited since, so nobody listens there.
    """
    initiator = run_pyz(pyz, ["initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "0.2"], ghost.env)
    assert initiator.returncode == 2, initiator.stdout + initiator.stderr
    address = printed_addresses(initiator.stdout.splitlines())[0]
    return Proc([str(pyz), "respond", address, "--timeout", "60"], env=home.env, name="responder")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("role", ["initiator", "responder"])
def test_session_dir_removed_on_signal(pyz: Path, make_home, role: str, sig: signal.Signals) -> None:
    home = make_home(role)
    if role == "initiator":
        proc = start_initiator(pyz, home, "--timeout", "60")
        ready = INITIATOR_READY
    else:
        proc = _start_responder_to_nowhere(pyz, home, make_home("ghost"))
        ready = r"^Connecting to /ip4/127\.0\.0\.1/"
    with proc:
        proc.wait_for_line(ready, stream="stdout")
        (session,) = session_dirs(home, role)
        assert session.name == f"{role}-{proc.pid}"
        time.sleep(0.5)  # let it settle into waiting (trio's signal receiver is up by then)
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=20)
    assert rc == 128 + sig, proc.output()
    assert "Traceback" not in "\n".join(proc.stderr_lines), proc.output()
    assert not session.exists()
    assert session_dirs(home) == []


def test_session_dir_stale_ones_are_cleaned_on_start(pyz: Path, pangea_home: NodeHome) -> None:
    root = pangea_home.pangea_home / "compute_test"
    stale = [root / f"initiator-{dead_pid()}", root / f"responder-{dead_pid()}"]
    live = root / f"responder-{os.getpid()}"  # this pytest process: alive, must be kept
    for d in [*stale, live]:
        d.mkdir(parents=True, mode=0o700)
        (d / "pid").write_text(d.name.rsplit("-", 1)[1] + "\n")
        (d / "pangea.log").write_text("old log\n")
        (d / "addresses.txt").write_text("/ip4/127.0.0.1/tcp/1/p2p/x\n")

    with start_initiator(pyz, pangea_home, "--timeout", "30") as initiator:
        initiator.wait_for_line(INITIATOR_READY, stream="stdout")
        assert not any(d.exists() for d in stale), sorted(root.iterdir())
        assert live.is_dir()
        assert {d.name for d in session_dirs(pangea_home)} == {live.name, f"initiator-{initiator.pid}"}
        os.kill(initiator.pid, signal.SIGTERM)
        assert initiator.wait(timeout=20) == 128 + signal.SIGTERM
    assert session_dirs(pangea_home) == [live]

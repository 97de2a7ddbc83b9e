"""The initiator's checks pass only when their work happened.

A responder killed (SIGKILL, or Ctrl-C's SIGINT) while the throughput or the
delegation check runs: the initiator exits 1, the check that was running
fails and names the peer and what happened, the checks after it are not run
(not passed), and no impossible MB/s figure is printed. The kill is timed from
the session logs (the check that just ended, the task the responder just
finished), with a transfer or a per-task stall large enough that it lands
inside the check. An undisturbed pair passing every check is
test_pair.py::test_pair_loopback_every_check_passes.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
from pathlib import Path

import pytest
from helpers import NodeHome, Proc, wait_until
from pyz_helpers import CHECK_NAMES, PAIR_TIMEOUT_S, last_json, loopback_address, peer_id_from, start_initiator

# Faster than any link: a figure above this was not measured on bytes that crossed one.
MAX_PLAUSIBLE_MB_S = 100_000.0
# Large enough that the download (the responder generates it, then sends it) lasts
# a second or more on this machine, so a kill timed by the responder's log lands in it.
TRANSFER_MIB = "256"
RATE = re.compile(r"(\d+(?:\.\d+)?) MB/s")


def _session_log(home: NodeHome, role: str) -> str:
    """The INFO lines of a node's session log (pangea.log of its session directory)."""
    logs = sorted((home.pangea_home / "compute_test").glob(f"{role}-*/pangea.log"))
    return "".join(path.read_text(errors="replace") for path in logs)


def _kill_responder_during(
    pyz: Path, make_home, sig: signal.Signals, *, check: str, responder_args: tuple[str, ...] = ()
) -> tuple[Proc, str]:
    """Pair an initiator and a responder; signal the responder once its log shows the first
    task of ``check`` done; return the finished initiator and the responder's peer id."""
    a, b = make_home("initiator"), make_home("responder")
    initiator_args = ("--json", "--size", "256", "--transfer-mib", TRANSFER_MIB, "--timeout", "60")
    with start_initiator(pyz, a, *initiator_args) as initiator:
        address = loopback_address(initiator)
        cmd = [str(pyz), "respond", address, "--json", "--timeout", "30", *responder_args]
        with Proc(cmd, env=b.env, name="responder") as responder:
            previous = CHECK_NAMES[CHECK_NAMES.index(check) - 1]
            wait_until(lambda: f"check {previous}: ok" in _session_log(a, "initiator"), 60, f"{previous} passed")
            # The first task the responder serves in this check: the upload's sum in the
            # throughput check, the first kernel in the delegation check.
            done = re.compile(r"task \d+ from \S+: (sum|\w+) done")
            served = len(done.findall(_session_log(b, "responder")))
            wait_until(lambda: len(done.findall(_session_log(b, "responder"))) > served, 60, f"a {check} task served")
            os.killpg(responder.pid, sig)
            responder.wait(timeout=30)
            initiator.wait(timeout=PAIR_TIMEOUT_S)
        responder_id = peer_id_from(responder.stdout_lines, "responder")
    return initiator, responder_id


def _assert_check_failed_naming(initiator: Proc, responder_id: str, check: str) -> None:
    assert initiator.returncode == 1, initiator.output()
    out = "\n".join(initiator.stdout_lines)
    assert "All checks passed" not in out, initiator.output()
    assert "Traceback" not in "\n".join(initiator.stderr_lines), initiator.output()
    for rate in RATE.findall(out):
        assert float(rate) <= MAX_PLAUSIBLE_MB_S, f"impossible rate {rate} MB/s printed\n{initiator.output()}"
    doc = last_json(initiator.stdout_lines)
    assert doc["ok"] is False, doc
    rows = {c["name"]: c for c in doc["checks"]}
    assert [c["name"] for c in doc["checks"]] == CHECK_NAMES, doc
    failing = rows[check]
    assert failing["ok"] is False, failing
    assert responder_id in failing["detail"] and f"left during the {check} check" in failing["detail"], failing
    for name in CHECK_NAMES[: CHECK_NAMES.index(check)]:
        assert rows[name]["ok"] is True, rows[name]
    for name in CHECK_NAMES[CHECK_NAMES.index(check) + 1 :]:
        if name == "local execution":
            continue  # it needs no responder: it still runs, and passes
        assert rows[name]["ok"] is False and "not run" in rows[name]["detail"], rows[name]
        assert f"left during the {check} check" in rows[name]["detail"], rows[name]
    assert "left after 'done'" not in rows["fallback"]["detail"], rows["fallback"]
    for value in doc["throughput_mb_s"].values():
        assert value <= MAX_PLAUSIBLE_MB_S, doc["throughput_mb_s"]
    lines = list(initiator.stdout_lines)
    at = next(i for i, line in enumerate(lines) if re.match(rf"{check}\s+FAILED\s", line))
    table_row = [lines[at], *itertools.takewhile(lambda line: line.startswith(" "), lines[at + 1 :])]
    assert responder_id in "".join("".join(table_row).split()), table_row  # its detail may wrap at the width


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_checks_responder_killed_during_throughput_fails_the_throughput_check(
    pyz: Path, make_home, sig: signal.Signals
) -> None:
    initiator, responder_id = _kill_responder_during(pyz, make_home, sig, check="throughput")
    _assert_check_failed_naming(initiator, responder_id, "throughput")
    assert last_json(initiator.stdout_lines)["throughput_mb_s"] == {}, initiator.output()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_checks_responder_killed_during_delegation_fails_the_delegation_check(
    pyz: Path, make_home, sig: signal.Signals
) -> None:
    # Each task stalls 0.5 s on the responder: the 11 kernels of the delegation check
    # take over 5 s, and the kill after the first lands inside it.
    initiator, responder_id = _kill_responder_during(
        pyz, make_home, sig, check="delegation", responder_args=("--fault", "slow=0.5")
    )
    _assert_check_failed_naming(initiator, responder_id, "delegation")

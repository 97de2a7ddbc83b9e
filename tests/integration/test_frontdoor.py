"""The user-facing extras of the built pangea.pyz, as real processes on 127.0.0.1:
live progress, the no-argument menu, `status`, Prometheus metrics and `doctor`.

* Progress (rich) shows only on a terminal: a pair run through pipes prints
  none of it; in a tmux pane `initiate` shows "waiting for responders" unless
  --quiet or --json.
* The menu runs in a tmux pane (a real pseudo-terminal), on its own tmux server
  (``tmux -S <private socket>``), so the pane gets this test's environment and
  nothing of anybody else's tmux is touched; the server is killed in `finally`.
* `status` lists the running `serve` node and removes a stale session directory.
* Metrics are scraped over HTTP from `serve` nodes (a pair, with local and remote
  tasks submitted through `pangea.Client`) and from a waiting initiator and its
  responder.
  A split matmul counts once per row block; bad --metrics values are setup errors.
* `doctor` on loopback: a reachable peer, a closed port, a wrong peer ID, a
  peer of another protocol version, a port in use, and the --json shape; an
  out-of-range --port or a --timeout <= 0 is a usage error.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NodeHome, Proc, make_node_home, wait_until
from pyz_helpers import (
    CHECK_NAMES,
    FAST,
    PAIR_TIMEOUT_S,
    RESPONDER_CHECK_NAMES,
    RESPONDER_CONNECTED,
    Samples,
    ServeNode,
    assert_expected_error,
    dead_pid,
    free_port,
    last_json,
    loopback_address,
    metric,
    names,
    peer_id_from,
    peer_id_of,
    printed_addresses,
    run_pyz,
    scrape,
    session_dirs,
    start_initiator,
    start_serve,
)

import pangea
from pangea import Client, TaskError

CLIENT_TIMEOUT_S = 60.0  # Client(timeout_s=...): every call here answers well within it
CONNECT_TIMEOUT_S = 60.0  # serve A connecting to its --peer B on a busy 2-core box
PANE_TIMEOUT_S = 60.0  # a line to appear in a tmux pane (pyz start-up included)
DOCTOR_TIMEOUT_S = 120.0  # one `doctor` run with a peer (its --timeout 5 per test, plus start-up)

# rich's progress rows (LiveView) and any ANSI escape: what must not reach a pipe.
PROGRESS_TEXT = ("waiting for responders", "traffic", "serving the initiator", "check: ", "\x1b[")


def _no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


# ---------------------------------------------------------------- tmux panes


class Pane:
    """A command in a tmux pane (a pseudo-terminal) on a private tmux server.

    The command runs as ``CMD; echo rc=N`` and the exit code is also written to a
    file, so a test can read it after the command ended (the pane stays open).
    """

    def __init__(self, command: Sequence[str | Path], env: dict[str, str], name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pg-tmux-"))  # short: a socket path has a length limit
        self.socket = self.dir / "sock"
        self.rc_file = self.dir / "rc"
        self.name = name
        # NOTE: the pane's shell gets its environment from the tmux server, which
        # starts with `env`; HOME and PANGEA_* are repeated on the command line anyway.
        pinned = {k: v for k, v in env.items() if k in ("HOME", "PANGEA_HOME", "PANGEA_MDNS", "SHIV_ROOT")}
        line = shlex.join(["env", *(f"{k}={v}" for k, v in pinned.items()), *map(str, command)])
        script = f'{line}; rc=$?; echo "rc=$rc" > {shlex.quote(str(self.rc_file))}; echo "rc=$rc"; sleep 600'
        try:
            for _attempt in range(3):  # NOTE: a new tmux server has been seen to vanish at once on a busy box
                self._tmux("-f", "/dev/null", "new-session", "-d", "-s", name, "-x", "200", "-y", "50", script, env=env)
                if self._started(env):
                    break
            else:
                raise AssertionError(f"tmux did not start a session for {line}")
        except BaseException:
            self.close()
            raise

    def _started(self, env: dict[str, str], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            has = subprocess.run(
                ["tmux", "-S", str(self.socket), "has-session", "-t", self.name],
                env=env,
                capture_output=True,
                timeout=30,
                check=False,
            )
            if has.returncode == 0:
                return True
            time.sleep(0.2)
        return False

    def _tmux(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def text(self) -> str:
        """What the pane shows now, with its scrollback."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def wait_for(self, pattern: str, timeout: float = PANE_TIMEOUT_S) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            match = regex.search(text)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"pane {self.name}: nothing matching {pattern!r} within {timeout:g} s:\n{text}")
            time.sleep(0.2)

    def exit_code(self, timeout: float = PANE_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout
        while not self.rc_file.exists() or not self.rc_file.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"pane {self.name}: the command still runs after {timeout:g} s:\n{self.text()}")
            time.sleep(0.2)
        return int(self.rc_file.read_text().strip().removeprefix("rc="))

    def close(self) -> None:
        """Kill the session and this private server (SIGHUP ends the command), delete the socket."""
        self._tmux("kill-session", "-t", self.name, check=False)
        self._tmux("kill-server", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pane() -> Iterator[Callable[..., Pane]]:
    """Factory: `pane([pyz, args...], env)` starts it in tmux; every pane is closed after the test."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    panes: list[Pane] = []

    def start(command: Sequence[str | Path], env: dict[str, str]) -> Pane:
        name = f"pg-{len(panes)}-{time.monotonic_ns() % 10**9}"
        panes.append(Pane(command, env, name))
        return panes[-1]

    try:
        yield start
    finally:
        for each in panes:
            # pytest shows this only when the test failed
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                print(f"----- pane {each.name}:\n{each.text()}")
            each.close()


# ---------------------------------------------------------------- progress


def test_progress_is_off_without_a_terminal(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    """A whole pair run through pipes: no progress rows, no escapes; --json's last line is JSON."""
    a, b = make_home("initiator"), make_home("responder")
    with start_initiator(pyz, a, *FAST, "--timeout", "60") as initiator:
        address = loopback_address(initiator)
        responder = Proc([str(pyz), "respond", address, "--json", "--timeout", "30"], env=b.env, name="responder")
        with responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    _no_traceback(initiator, responder)
    for proc in (initiator, responder):
        for line in proc.stdout_lines + proc.stderr_lines:
            for text in PROGRESS_TEXT:
                assert text not in line, f"{text!r} in {line!r}\n{proc.output()}"
    assert initiator.stdout_lines[-1] == "All checks passed (initiator)."
    reply = last_json(responder.stdout_lines)
    assert reply["ok"] is True and [c["name"] for c in reply["checks"]] == RESPONDER_CHECK_NAMES


@pytest.mark.parametrize(
    ("flags", "shown"), [([], True), (["--quiet"], False), (["--json"], False)], ids=["plain", "quiet", "json"]
)
def test_progress_on_a_terminal_shows_the_wait_unless_quiet_or_json(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane], flags: list[str], shown: bool
) -> None:
    cmd = [pyz, "initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "60", *flags]
    term = pane(cmd, pangea_home.env)
    term.wait_for(r"^Waiting up to 60 s for a responder")
    if shown:
        row = term.wait_for(r"waiting for responders .*0 of 1 connected", timeout=15)
        assert "━" in row.string  # rich's bar
        term.wait_for(r"traffic .*sent 0 B, received 0 B", timeout=15)
    else:
        # rich refreshes several times a second: 3 s without a row means there is none
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            text = term.text()
            assert "waiting for responders" not in text and "traffic" not in text, text
            time.sleep(0.25)
    term.send("C-c")
    assert term.exit_code() == 130, term.text()
    assert "Traceback" not in term.text()
    assert session_dirs(pangea_home) == []


def test_progress_on_a_terminal_ends_with_the_wait(pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]) -> None:
    """The rows are transient: when the wait times out they are gone and the error is what stays."""
    term = pane([pyz, "initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "5"], pangea_home.env)
    term.wait_for(r"waiting for responders")
    assert term.exit_code() == 2, term.text()
    text = term.text()
    assert "pangea: error: cannot run the checks: nobody connected within 5 s" in text, text
    assert "waiting for responders" not in text, text


# ---------------------------------------------------------------- the menu


MENU_LINES = [
    r"^  1\) initiate ",
    r"^  2\) respond ",
    r"^  3\) demo ",
    r"^  4\) serve ",
    r"^  5\) doctor ",
    r"^  q\) quit$",
]


def test_menu_in_a_terminal_lists_the_commands_and_q_exits_0(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]
) -> None:
    term = pane([pyz], pangea_home.env)
    term.wait_for(r"Choose \[1-5, q\]: $")
    text = term.text()
    assert text.startswith(f"pangea {pangea.__version__}: "), text
    for line in MENU_LINES:
        assert re.search(line, text, re.MULTILINE), f"{line!r} not in\n{text}"
    term.send("nonsense", "Enter")
    term.wait_for(r"^please type a number from 1 to 5, or q$")
    term.send("q", "Enter")
    assert term.exit_code() == 0, term.text()
    assert "Traceback" not in term.text()
    assert session_dirs(pangea_home) == []


def test_menu_in_a_terminal_5_runs_doctor(pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]) -> None:
    term = pane([pyz], pangea_home.env)
    term.wait_for(r"Choose \[1-5, q\]: $")
    term.send("5", "Enter")
    verdict = term.wait_for(r"^verdict     (.+)$").group(1)
    # doctor's default port 7777 may be in use by somebody else on this box: 0 or 1
    assert term.exit_code() in (0, 1), term.text()
    text = term.text()
    assert re.search(r"^interface   lo\s+127\.0\.0\.1\s+loopback$", text, re.MULTILINE), text
    assert re.search(r"^port        7777: ", text, re.MULTILINE), text
    assert verdict.startswith(("this box is ready", "port 7777 is taken")), verdict
    assert "Traceback" not in text


def test_menu_ctrl_c_at_the_prompt_ends_on_a_fresh_line_and_exits_130(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]
) -> None:
    term = pane([pyz], pangea_home.env)
    term.wait_for(r"Choose \[1-5, q\]: $")
    term.send("C-c")
    assert term.exit_code() == 130, term.text()
    text = term.text()
    assert re.search(r"^pangea: interrupted$", text, re.MULTILINE), text  # on a line of its own
    assert "^Cpangea" not in text and "Traceback" not in text, text


PASTE = r"Paste the initiator's join string or address: "


def test_menu_respond_asks_again_after_a_bad_paste_and_enter_gives_up(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]
) -> None:
    term = pane([pyz], pangea_home.env)
    term.wait_for(r"Choose \[1-5, q\]: $")
    term.send("2", "Enter")
    term.wait_for(PASTE + "$")
    term.send("garbage", "Enter")
    term.wait_for(r"^pangea: bad address 'garbage': .+; try again \(2 more tries, Enter to stop\)$")
    term.wait_for(PASTE + "$")  # asked again, not ended
    assert term.text().count(PASTE) == 2, term.text()
    term.send("/ip4/127.0.0.1/tcp/99999/p2p/x", "Enter")
    term.wait_for(r"port '99999' is not a number in 1-65535; try again \(1 more try, Enter to stop\)$")
    term.send("Enter")
    assert term.exit_code() == 2, term.text()
    text = term.text()
    assert re.search(r"^pangea: error: no initiator address given$", text, re.MULTILINE), text
    assert "Traceback" not in text and session_dirs(pangea_home) == []


def test_menu_respond_bad_pastes_end_after_the_last_try(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]
) -> None:
    term = pane([pyz, "respond"], pangea_home.env)
    for n in range(3):
        term.wait_for(PASTE + "$")
        assert term.text().count(PASTE) == n + 1, term.text()
        term.send(f"junk{n}", "Enter")
    assert term.exit_code() == 2, term.text()
    text = term.text()
    assert re.search(r"^pangea: error: bad address 'junk2': ", text, re.MULTILINE), text
    assert text.count(PASTE) == 3, text


def test_menu_respond_ctrl_c_at_the_paste_prompt_exits_130_on_a_fresh_line(
    pyz: Path, pangea_home: NodeHome, pane: Callable[..., Pane]
) -> None:
    term = pane([pyz, "respond"], pangea_home.env)
    term.wait_for(PASTE + "$")
    term.send("C-c")
    assert term.exit_code() == 130, term.text()
    text = term.text()
    assert re.search(r"^pangea: interrupted$", text, re.MULTILINE), text
    assert "Traceback" not in text and session_dirs(pangea_home) == []


# ---------------------------------------------------------------- serve nodes
# ServeNode, peer_id_of and start_serve come from tests/pyz_helpers.py.


def status_json(pyz: Path, home: NodeHome) -> dict[str, Any]:
    result = run_pyz(pyz, ["status", "--json"], home.env)
    assert result.returncode == 0, result.stdout + result.stderr
    return last_json(result.stdout.splitlines())


# ---------------------------------------------------------------- status


def test_status_lists_a_running_serve_node(pyz: Path, pangea_home: NodeHome) -> None:
    node = start_serve(pyz, pangea_home, name="serve")
    with node.proc:
        doc = status_json(pyz, pangea_home)
        assert doc["cleaned"] == []
        (entry,) = doc["nodes"]
        assert entry["role"] == "serve"
        assert entry["pid"] == node.proc.pid
        assert entry["peer_id"] == node.peer_id
        assert entry["rpc"] == node.rpc
        assert node.address in entry["addresses"]
        assert entry["metrics"] == node.metrics
        assert entry["version"] == pangea.__version__
        assert 0 <= entry["uptime_s"] < 600
        assert entry["session_dir"] == str(session_dirs(pangea_home)[0])

        text = run_pyz(pyz, ["status"], {**pangea_home.env, "COLUMNS": "300"})
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split() == ["role", "pid", "peer", "id", "uptime", "rpc", "addresses"], text.stdout
        (row,) = [line for line in lines if line.startswith("serve ")]
        for value in ("serve", str(node.proc.pid), node.peer_id, node.rpc, node.address):
            assert value in row, row
        narrow = run_pyz(pyz, ["status"], {**pangea_home.env, "COLUMNS": "80"})
        lines = narrow.stdout.splitlines()
        assert narrow.returncode == 0 and max(len(line) for line in lines) <= 80, narrow.stdout
        (row,) = [line for line in lines if line.startswith("serve ")]
        assert row.split()[:3] == ["serve", str(node.proc.pid), node.peer_id]  # whole, the rest folded under it
        assert f"  rpc: {node.rpc}" in lines, narrow.stdout
    assert node.proc.returncode == 0
    assert status_json(pyz, pangea_home) == {"nodes": [], "cleaned": [], "logs": []}


def test_status_removes_a_stale_session_dir_and_reports_it(pyz: Path, pangea_home: NodeHome) -> None:
    node = start_serve(pyz, pangea_home, name="serve")
    with node.proc:
        (live,) = session_dirs(pangea_home)
        gone = dead_pid()
        stale = live.parent / f"serve-{gone}"
        shutil.copytree(live, stale)
        (stale / "pid").write_text(f"{gone}\n")
        doc = status_json(pyz, pangea_home)
        assert doc["cleaned"] == [str(stale)]
        assert not stale.exists()
        assert [n["pid"] for n in doc["nodes"]] == [node.proc.pid]
        # and in words, for the next one
        stale2 = live.parent / f"serve-{dead_pid()}"
        shutil.copytree(live, stale2)
        text = run_pyz(pyz, ["status"], pangea_home.env)
        assert text.returncode == 0, text.stderr
        assert f"removed the stale session directory {stale2} (its process is gone)" in text.stdout.splitlines()
        assert not stale2.exists()
        assert live.exists()


def test_status_with_nothing_running(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, ["status"], pangea_home.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no pangea node is running on this box (for this PANGEA_HOME)"
    assert result.stderr == ""
    assert status_json(pyz, pangea_home) == {"nodes": [], "cleaned": [], "logs": []}


# ---------------------------------------------------------------- metrics


def test_metrics_serve_default_is_a_free_loopback_port(pyz: Path, pangea_home: NodeHome) -> None:
    node = start_serve(pyz, pangea_home, name="serve")
    with node.proc:
        assert node.metrics is not None, node.proc.output()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", node.metrics), node.metrics
        assert not node.metrics.endswith(":0/metrics")
        samples = scrape(node.metrics)
        assert names(samples) >= {
            "pangea_connected_peers",
            "pangea_queue_length",
            "pangea_memory_budget_used_bytes",
            "pangea_task_retries_total",
            "pangea_verification_failures_total",
            "pangea_received_bytes_total",
            "pangea_sent_bytes_total",
            "pangea_memory_budget_bytes",
            "pangea_rpc_calls_in_flight",
            "pangea_refused_total",
        }
        assert metric(samples, "pangea_connected_peers") == 0
        assert metric(samples, "pangea_refused_total", reason="rpc-tasks-budget") == 0
        assert metric(samples, "pangea_queue_length") == 0
        # nothing submitted yet: no task series, and no *_created series
        assert not any(name.startswith("pangea_tasks") for name in names(samples))
        assert not any(name.endswith("_created") for name in names(samples))


def test_metrics_off_prints_no_metrics_line(pyz: Path, pangea_home: NodeHome) -> None:
    node = start_serve(pyz, pangea_home, "--metrics", "off", name="serve")
    with node.proc:
        assert node.metrics is None
        assert not any("Metrics" in line or "/metrics" in line for line in node.proc.stdout_lines), node.proc.output()
        (entry,) = status_json(pyz, pangea_home)["nodes"]
        assert entry["metrics"] is None


def test_metrics_on_a_port_in_use_is_a_setup_error(pyz: Path, pangea_home: NodeHome) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = ["serve", "--host", "127.0.0.1", "--port", "0", "--rpc", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"]
        result = run_pyz(pyz, args, pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"cannot serve metrics on 127.0.0.1:{port}")
    assert session_dirs(pangea_home) == []


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("127.0.0.1:99999", "bad address '127.0.0.1:99999'"), ("nonsense", "cannot serve metrics on nonsense:9477")],
    ids=["port-out-of-range", "unknown-host"],
)
def test_metrics_bad_address_is_a_setup_error(pyz: Path, pangea_home: NodeHome, spec: str, needle: str) -> None:
    args = ["serve", "--host", "127.0.0.1", "--port", "0", "--rpc", "127.0.0.1:0", "--metrics", spec]
    result = run_pyz(pyz, args, pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, needle)
    assert session_dirs(pangea_home) == []


@dataclass
class MetricsPair:
    a: ServeNode  # --peer B, metrics on a port chosen by the test
    b: ServeNode  # --allow-peer A, default metrics


@pytest.fixture(scope="module")
def metrics_pair(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsPair]:
    base = tmp_path_factory.mktemp("metrics-pair")
    home_a, home_b = make_node_home(base, "a"), make_node_home(base, "b")
    port = free_port()
    with contextlib.ExitStack() as stack:
        b = start_serve(pyz, home_b, "--allow-peer", peer_id_of(pyz, home_a), name="serve-B")
        stack.callback(b.proc.stop)
        a = start_serve(pyz, home_a, "--peer", b.address, "--metrics", f"127.0.0.1:{port}", name="serve-A")
        stack.callback(a.proc.stop)
        a.proc.wait_for_line(rf"^pangea: connected to peer {b.peer_id}$", timeout=CONNECT_TIMEOUT_S)
        assert a.metrics == f"http://127.0.0.1:{port}/metrics", a.proc.output()
        yield MetricsPair(a, b)


@pytest.fixture
def mpair(metrics_pair: MetricsPair) -> MetricsPair:
    # NOTE: conftest.py attaches the output of the Procs a test started; these started earlier.
    Proc.started.extend([metrics_pair.a.proc, metrics_pair.b.proc])
    for node in (metrics_pair.a, metrics_pair.b):
        assert node.proc.returncode is None, node.proc.output()
    return metrics_pair


def test_metrics_count_local_and_remote_tasks_while_they_run(mpair: MetricsPair) -> None:
    a, b = mpair.a, mpair.b
    assert a.metrics and b.metrics
    n_local, n_remote = 6, 5
    x = np.random.default_rng(1).standard_normal((96, 96))
    before_a, before_b = scrape(a.metrics), scrape(b.metrics)
    assert metric(before_a, "pangea_connected_peers") == 1
    assert metric(before_b, "pangea_connected_peers") == 1
    received0 = metric(before_a, "pangea_received_bytes_total", peer=b.peer_id)
    sent0 = metric(before_a, "pangea_sent_bytes_total", peer=b.peer_id)
    local0 = metric(before_a, "pangea_tasks_total", kernel="matmul", outcome="ok", placement="local")
    remote0 = metric(before_a, "pangea_tasks_total", kernel="matmul", outcome="ok", placement="remote")
    count0 = metric(before_a, "pangea_task_duration_seconds_count", kernel="matmul")
    served0 = metric(before_b, "pangea_served_tasks_total", kernel="matmul", outcome="ok")

    ran_on: list[str] = []
    errors: list[BaseException] = []

    def submit_all() -> None:
        try:
            with Client(a.rpc, token=a.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
                for placement in ["local"] * n_local + ["remote"] * n_remote:
                    np.testing.assert_allclose(rpc.matmul(x, x, placement=placement), x @ x)
                    ran_on.append(rpc.last_task["ran_on"])
        except BaseException as exc:  # recorded for the main thread
            errors.append(exc)

    worker = threading.Thread(target=submit_all, daemon=True)
    worker.start()
    seen: list[float] = []
    while worker.is_alive():  # scrapes answer while tasks run, and counters only grow
        done = scrape(a.metrics)
        seen.append(sum(v for (name, _), v in done.items() if name == "pangea_tasks_total"))
        time.sleep(0.05)
    worker.join(timeout=CLIENT_TIMEOUT_S)
    assert not errors, errors
    assert ran_on == ["local"] * n_local + [b.peer_id] * n_remote
    assert seen == sorted(seen), seen

    after_a, after_b = scrape(a.metrics), scrape(b.metrics)
    local = metric(after_a, "pangea_tasks_total", kernel="matmul", outcome="ok", placement="local") - local0
    remote = metric(after_a, "pangea_tasks_total", kernel="matmul", outcome="ok", placement="remote") - remote0
    assert (local, remote) == (n_local, n_remote), after_a
    count = metric(after_a, "pangea_task_duration_seconds_count", kernel="matmul") - count0
    assert count == n_local + n_remote
    assert metric(after_a, "pangea_task_duration_seconds_bucket", kernel="matmul", le="+Inf") == metric(
        after_a, "pangea_task_duration_seconds_count", kernel="matmul"
    )
    assert metric(after_a, "pangea_task_duration_seconds_sum", kernel="matmul") > 0
    # operands went to B and results came back: at least the array bytes of each remote task
    assert metric(after_a, "pangea_received_bytes_total", peer=b.peer_id) - received0 >= n_remote * x.nbytes
    assert metric(after_a, "pangea_sent_bytes_total", peer=b.peer_id) - sent0 >= n_remote * 2 * x.nbytes
    assert metric(after_a, "pangea_connected_peers") == 1
    assert metric(after_a, "pangea_queue_length") == 0
    assert metric(after_a, "pangea_task_retries_total") == 0
    assert metric(after_a, "pangea_verification_failures_total") == 0
    # B ran exactly the remote ones for A, and holds nothing for it any more
    assert metric(after_b, "pangea_served_tasks_total", kernel="matmul", outcome="ok") - served0 == n_remote
    assert metric(after_b, "pangea_memory_budget_used_bytes") == 0
    assert metric(after_b, "pangea_received_bytes_total", peer=a.peer_id) >= n_remote * 2 * x.nbytes
    assert not any(name.startswith("pangea_tasks") for name in names(after_b)), "B submitted nothing itself"


def test_metrics_count_each_block_of_a_split_matmul(mpair: MetricsPair) -> None:
    """A split job is one call but many tasks: every row block is counted where it ran."""
    a, b = mpair.a, mpair.b
    assert a.metrics and b.metrics
    x = np.random.default_rng(2).standard_normal((256, 256))

    def by_placement(samples: Samples) -> dict[str, float]:
        return {
            p: metric(samples, "pangea_tasks_total", kernel="matmul", outcome="ok", placement=p)
            for p in ("local", "remote")
        }

    before, served0 = by_placement(scrape(a.metrics)), scrape(b.metrics)
    with Client(a.rpc, token=a.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        np.testing.assert_allclose(rpc.matmul(x, x, placement="split"), x @ x)
        attempts = rpc.last_task["attempts"]
    blocks = {"local": 0, "remote": 0}
    for attempt in attempts:  # e.g. {"worker": "local", "outcome": "ok: 192 rows in 3 blocks, busy 80%"}
        match = re.search(r"in (\d+) blocks", attempt["outcome"])
        assert match, attempts
        blocks["local" if attempt["worker"] == "local" else "remote"] += int(match.group(1))
    after, served1 = by_placement(scrape(a.metrics)), scrape(b.metrics)
    assert {p: after[p] - before[p] for p in after} == blocks, attempts
    served = {"kernel": "matmul", "outcome": "ok"}
    assert (
        metric(served1, "pangea_served_tasks_total", **served) - metric(served0, "pangea_served_tasks_total", **served)
        == blocks["remote"]
    )


@pytest.mark.parametrize("placement", ["local", "remote"])
def test_metrics_count_a_bad_request_as_bad_input(mpair: MetricsPair, placement: str) -> None:
    a, b = mpair.a, mpair.b
    assert a.metrics and b.metrics
    labels = {"kernel": "matmul", "outcome": "bad-input", "placement": placement}
    before_a, before_b = scrape(a.metrics), scrape(b.metrics)
    with Client(a.rpc, token=a.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        with pytest.raises(TaskError) as info:
            rpc.submit("matmul", np.ones((2, 3)), np.ones((2, 3)), placement=placement)
        assert info.value.kind == "bad-input"
    after_a, after_b = scrape(a.metrics), scrape(b.metrics)
    assert metric(after_a, "pangea_tasks_total", **labels) - metric(before_a, "pangea_tasks_total", **labels) == 1
    count = "pangea_task_duration_seconds_count"
    assert metric(after_a, count, kernel="matmul") - metric(before_a, count, kernel="matmul") == 1
    served = {"kernel": "matmul", "outcome": "bad-input"}
    ran_on_b = metric(after_b, "pangea_served_tasks_total", **served) - metric(
        before_b, "pangea_served_tasks_total", **served
    )
    assert ran_on_b == (1 if placement == "remote" else 0)
    assert metric(after_a, "pangea_queue_length") == 0


def test_metrics_of_initiate_and_respond(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    """An initiator waiting for two responders serves /metrics; so does the responder already connected."""
    a, r1, r2 = make_home("initiator"), make_home("responder-1"), make_home("responder-2")
    port_a, port_r1 = free_port(), free_port()
    url_a, url_r1 = f"http://127.0.0.1:{port_a}/metrics", f"http://127.0.0.1:{port_r1}/metrics"
    args = ["--expect", "2", *FAST, "--json", "--timeout", "90", "--metrics", f"127.0.0.1:{port_a}"]
    with start_initiator(pyz, a, *args) as initiator:
        initiator.wait_for_line(r"^Waiting up to 90 s for 2 responders", stream="stdout")
        address = initiator.wait_for_line(r"^Join string: (pangea://ip4/127\.0\.0\.1/\S+)$", stream="stdout").group(1)
        assert f"Metrics: {url_a}" in initiator.stdout_lines, initiator.output()
        waiting = scrape(url_a)
        assert metric(waiting, "pangea_connected_peers") == 0
        assert metric(waiting, "pangea_queue_length") == 0
        (entry,) = status_json(pyz, a)["nodes"]
        assert (entry["role"], entry["metrics"], entry["pid"]) == ("initiator", url_a, initiator.pid)

        first = Proc(
            [str(pyz), "respond", address, "--json", "--timeout", "30", "--metrics", f"127.0.0.1:{port_r1}"],
            env=r1.env,
            name="responder-1",
        )
        with first:
            first.wait_for_line(RESPONDER_CONNECTED, stream="stdout")
            assert f"Metrics: {url_r1}" in first.stdout_lines, first.output()
            r1_id = peer_id_from(first.stdout_lines, "responder")
            initiator.wait_for_line(rf"^Responder connected: {r1_id} .*\(1 of 2\)$", stream="stdout")
            wait_until(lambda: metric(scrape(url_a), "pangea_connected_peers") == 1, 20, "the initiator counts R1")
            connected = scrape(url_a)
            assert metric(connected, "pangea_received_bytes_total", peer=r1_id) > 0  # its Hello, pings
            assert metric(scrape(url_r1), "pangea_connected_peers") == 1

            second = Proc([str(pyz), "respond", address, "--json", "--timeout", "30"], env=r2.env, name="responder-2")
            with second:
                for proc in (second, first, initiator):
                    assert proc.wait(timeout=PAIR_TIMEOUT_S) == 0, proc.output()
    _no_traceback(initiator, first, second)
    doc = last_json(initiator.stdout_lines)
    assert doc["ok"] is True and [c["name"] for c in doc["checks"]] == CHECK_NAMES, doc
    assert set(doc["peers"]) == {r1_id, peer_id_from(second.stdout_lines, "responder")}
    assert not any(line.startswith("Metrics:") for line in second.stdout_lines), "respond has no metrics by default"
    for proc in (initiator, first):
        assert not any(t in line for line in proc.stdout_lines for t in PROGRESS_TEXT), proc.output()


# ---------------------------------------------------------------- doctor


def doctor(pyz: Path, home: NodeHome, *args: str) -> subprocess.CompletedProcess[str]:
    """`doctor ARGS --port 0` (a port that is always free, unless ARGS name one)."""
    port = [] if "--port" in args else ["--port", "0"]
    return run_pyz(pyz, ["doctor", *args, *port], {**home.env, "COLUMNS": "80"}, timeout=DOCTOR_TIMEOUT_S)


def verdict_of(result: subprocess.CompletedProcess[str]) -> str:
    """The verdict field, the last one: its line and the lines it wrapped onto (doctor runs in 80 columns)."""
    lines = result.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("verdict     ")]
    assert len(at) == 1, result.stdout + result.stderr
    rest = lines[at[0] + 1 :]
    assert all(line.startswith(" " * 12) for line in rest), "the verdict is the last field"
    assert max(len(line) for line in lines[at[0] :]) <= 80, result.stdout
    return " ".join([lines[at[0]].removeprefix("verdict     "), *(line.strip() for line in rest)])


def doctor_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in result.stderr, result.stderr
    doc = last_json(result.stdout.splitlines())
    assert len(result.stdout.splitlines()) == 1, "--json prints only the JSON line"
    return doc


@pytest.fixture
def waiting_initiator(pyz: Path, make_home: Callable[[str], NodeHome]) -> Iterator[tuple[Proc, str]]:
    """A running initiator and its loopback join string."""
    with start_initiator(pyz, make_home("initiator"), "--timeout", "300") as initiator:
        yield initiator, loopback_address(initiator)


def test_doctor_reachable_peer(pyz: Path, pangea_home: NodeHome, waiting_initiator: tuple[Proc, str]) -> None:
    initiator, join = waiting_initiator
    result = doctor(pyz, pangea_home, join, "--timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdict_of(result).startswith("the peer is reachable and speaks pangea"), result.stdout
    assert re.search(r"^  tcp       reaches it in [\d.]+ ms$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^  libp2p    ok: ", result.stdout, re.MULTILINE), result.stdout

    multiaddr = printed_addresses(initiator.stdout_lines)[0]
    doc = doctor_json(doctor(pyz, pangea_home, multiaddr, "--timeout", "10", "--json"))
    assert doc["ok"] is True, doc
    peer = doc["peer"]
    assert peer["address"] == multiaddr
    assert peer["tcp"] is True and peer["tcp_ms"] >= 0
    assert peer["libp2p"] == "ok", peer
    assert "reachable" in doc["verdict"]
    # the initiator refused the doctor's session (it is not a responder) and keeps waiting
    initiator.wait_for_line(r"^pangea: refused doctor 12D3KooW\w+ ", stream="stderr", timeout=10)
    assert initiator.returncode is None
    # doctor's probe identity is throwaway: not this box's own
    assert not (pangea_home.pangea_home / "identity.key").exists()
    assert session_dirs(pangea_home) == []


def test_doctor_closed_port_says_nothing_listens(pyz: Path, pangea_home: NodeHome) -> None:
    peer_id = peer_id_of(pyz, pangea_home)
    address = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id}"
    result = doctor(pyz, pangea_home, address, "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict_of(result).startswith("nothing listens at that address"), result.stdout
    assert "  tcp       FAILS: Connection refused" in result.stdout.splitlines()
    assert "libp2p" not in result.stdout

    doc = doctor_json(doctor(pyz, pangea_home, address, "--timeout", "5", "--json"))
    assert doc["ok"] is False
    assert doc["peer"] == {"address": address, "tcp": False, "tcp_error": "Connection refused"}


def test_doctor_wrong_peer_id_tcp_ok_libp2p_fails(
    pyz: Path, make_home: Callable[[str], NodeHome], waiting_initiator: tuple[Proc, str]
) -> None:
    initiator, _ = waiting_initiator
    initiator_id = printed_addresses(initiator.stdout_lines)[0].rsplit("/", 1)[1]
    home = make_home("doctor")
    other_id = peer_id_of(pyz, make_home("someone-else"))
    multiaddr = printed_addresses(initiator.stdout_lines)[0]
    wrong = multiaddr.rsplit("/", 1)[0] + "/" + other_id
    start = time.monotonic()
    doc = doctor_json(doctor(pyz, home, wrong, "--timeout", "5", "--json"))
    assert time.monotonic() - start < 5 + 60, "doctor kept going well past its --timeout"
    assert doc["ok"] is False
    assert doc["peer"]["tcp"] is True
    assert doc["peer"]["libp2p"] == "failed", doc["peer"]
    assert "peer ID" in doc["verdict"] and doc["verdict"].startswith("TCP works but the libp2p handshake fails")

    result = doctor(pyz, home, wrong, "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the peer ID in the address is wrong: the node there has peer id {initiator_id}" in verdict_of(result)
    assert initiator.returncode is None


def test_doctor_peer_of_another_protocol_version(pyz: Path, make_home: Callable[[str], NodeHome]) -> None:
    a, home = make_home("old-initiator"), make_home("doctor")
    script = a.root / "other_version.py"
    script.write_text("import sys, pangea\npangea.PROTOCOL_VERSION = 99\nsys.exit(pangea.main(sys.argv[1:]))\n")
    cmd = ["env", "SHIV_INTERPRETER=1", str(pyz), str(script), "initiate", "--host", "127.0.0.1", "--port", "0"]
    with Proc([*cmd, "--timeout", "300"], env=a.env, name="old-initiator") as old:
        join = loopback_address(old)
        result = doctor(pyz, home, join, "--timeout", "10", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    doc = doctor_json(result)
    assert doc["peer"]["libp2p"] == "incompatible", doc
    assert doc["verdict"].startswith("version mismatch: ")
    assert "protocol 99" in doc["verdict"] and "protocol 2 " in doc["verdict"]


def test_doctor_port_in_use_names_the_port(pyz: Path, pangea_home: NodeHome) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = doctor(pyz, pangea_home, "--port", str(port))
        doc = doctor_json(doctor(pyz, pangea_home, "--port", str(port), "--json"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict_of(result) == f"port {port} is taken: start pangea with --port 0 or another port"
    assert f"port        {port}: cannot listen on 0.0.0.0:{port}: port {port} is already in use" in result.stdout
    assert doc["port"] == port and doc["port_free"] is False and doc["ok"] is False
    assert f"port {port} is already in use" in doc["port_problem"]


def test_doctor_json_shape(pyz: Path, pangea_home: NodeHome) -> None:
    result = doctor(pyz, pangea_home, "--json")
    doc = doctor_json(result)
    assert result.returncode == (0 if doc["ok"] else 1)
    assert set(doc) == {"python", "build", "interfaces", "advertised", "port", "port_free", "ok", "verdict"}, doc
    assert doc["build"] is None  # the pyz runs on the Python it was built for
    assert doc["port"] == 0 and doc["port_free"] is True
    assert isinstance(doc["python"], str) and "cpython" in doc["python"]
    for interface in doc["interfaces"]:
        assert set(interface) == {"name", "ip", "kind"}, interface
        assert interface["kind"] in ("loopback", "lan", "vpn", "virtual", "link-local"), interface
    assert {"name": "lo", "ip": "127.0.0.1", "kind": "loopback"} in doc["interfaces"]
    assert doc["advertised"][-1] == "127.0.0.1"  # loopback last
    assert set(doc["advertised"]) <= {i["ip"] for i in doc["interfaces"]}
    assert doc["ok"] is True and doc["verdict"].startswith("this box is ready"), doc
    assert "peer" not in doc

    text = doctor(pyz, pangea_home)
    assert text.returncode == 0, text.stdout + text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()][:1] == ["python"]
    assert verdict_of(text) == doc["verdict"]


@pytest.mark.parametrize(
    ("address", "needle"),
    [("not-an-address", "bad address 'not-an-address'"), ("/ip4/127.0.0.1/tcp/7777", "/p2p/")],
    ids=["garbage", "no-peer-id"],
)
def test_doctor_bad_address_is_a_usage_error(pyz: Path, pangea_home: NodeHome, address: str, needle: str) -> None:
    result = doctor(pyz, pangea_home, address)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, needle)
    assert result.stdout == ""


GHOST = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "70000"),
        (["--port", "-1"], "-1"),
        (["--port", "0", "--timeout", "-1", GHOST], "--timeout"),
        (["--port", "0", "--timeout", "0", GHOST], "--timeout"),
    ],
    ids=["port-70000", "port-minus-1", "timeout-minus-1", "timeout-0"],
)
def test_doctor_bad_port_or_timeout_is_a_usage_error(
    pyz: Path, pangea_home: NodeHome, args: list[str], needle: str
) -> None:
    result = doctor(pyz, pangea_home, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, needle)

"""Self-test of Proc: line waiting, diagnostics, and stopping only its own process group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from helpers import NodeHome, Proc


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (it does not exist, or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_proc_wait_for_line_matches_stdout_and_stderr() -> None:
    code = "import sys; print('ready on port 4242', flush=True); print('warn: x', file=sys.stderr)"
    with Proc(_py(code)) as proc:
        assert proc.wait_for_line(r"port (\d+)").group(1) == "4242"
        assert proc.wait_for_line(r"^warn", stream="stderr")
        assert proc.wait(timeout=10) == 0
    assert proc.stdout_lines == ["ready on port 4242"]


def test_proc_wait_for_line_timeout_reports_output() -> None:
    code = "import sys, time; print('hello', file=sys.stderr, flush=True); time.sleep(60)"
    with Proc(_py(code), name="sleeper") as proc:
        proc.wait_for_line("hello")
        with pytest.raises(AssertionError, match=r"(?s)sleeper printed no line.*hello"):
            proc.wait_for_line("never", timeout=0.5)


def test_proc_wait_for_line_fails_fast_when_child_exits() -> None:
    with Proc(_py("import sys; sys.exit(3)")) as proc:
        start = time.monotonic()
        with pytest.raises(AssertionError, match=r"rc 3"):
            proc.wait_for_line("never", timeout=30)
        assert time.monotonic() - start < 10


def test_proc_stop_kills_ignoring_child_and_its_group() -> None:
    code = (
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "print('grandchild', child.pid, flush=True)\n"
        "child.wait()\n"
    )
    with Proc(_py(code)) as proc:
        grandchild = int(proc.wait_for_line(r"grandchild (\d+)").group(1))
        assert os.getpgid(grandchild) == proc.pid
        start = time.monotonic()
        assert proc.stop(grace_s=0.5) == -9
        assert time.monotonic() - start < 10
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


def test_proc_stop_sends_sigterm_first() -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('got TERM', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    with Proc(_py(code)) as proc:
        proc.wait_for_line("up")
        assert proc.stop() == 0
    assert "got TERM" in proc.output()


def test_pangea_home_env_isolates_each_node(pangea_home: NodeHome, make_home) -> None:
    other = make_home("other")
    assert pangea_home.env["HOME"] != other.env["HOME"]
    assert pangea_home.env["PANGEA_HOME"] == str(pangea_home.pangea_home)
    assert pangea_home.pangea_home.is_dir() and pangea_home.home.is_dir()
    # Every node shares one extraction of the pyz instead of one per HOME.
    assert pangea_home.env["SHIV_ROOT"] == other.env["SHIV_ROOT"]
    with Proc(_py("import os; print(os.environ['HOME'])"), env=other.env) as proc:
        proc.wait_for_line(f"^{other.home}$")

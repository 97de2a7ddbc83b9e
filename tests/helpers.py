"""Process and network-namespace helpers shared by the integration and netns tests.

Two things live here, both built so that a failing test never leaves anything
behind:

* `Proc` runs one child (usually the built ``pangea.pyz``) in its own process
  group, collects its stdout and stderr lines on background threads, lets a
  test wait for a line such as ``pangea: listening on <multiaddr>`` under a
  timeout, and on exit signals only that process group: SIGTERM, then SIGKILL.
* `NetnsPair` makes two uniquely named network namespaces joined by a veth
  pair (``10.231.X.1/24`` and ``10.231.X.2/24``) and always deletes them.
  Nothing in them routes anywhere else, so traffic stays between the two
  namespaces (or on their loopback).

Tests import this module as ``from helpers import ...``; tests/conftest.py puts
tests/ on ``sys.path``. Fixtures built on these helpers live in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent

# How long stop() waits after SIGTERM before SIGKILL. pangea shuts down on
# SIGTERM by cancelling its trio nursery; a few seconds is plenty for that.
STOP_GRACE_S = 5.0
# Default timeout for waiting on a ready line: a cold first run of the pyz
# extracts ~200 MB (6-7 s on this machine, see tech notes section 4).
READY_TIMEOUT_S = 30.0

Stream = Literal["stdout", "stderr", "both"]


# ---------------------------------------------------------------------------
# Proc: one child process in its own process group
# ---------------------------------------------------------------------------


class Proc:
    """A child process with collected output, a line waiter and a safe stop()."""

    # Every Proc started in this test session, so conftest.py can attach the
    # output of the ones a failing test started to its report.
    started: list[Proc] = []

    def __init__(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.cmd = [os.fspath(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._open_streams = 2
        self.popen = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            errors="replace",
            # Own session, so its pid is also its process group id and stop()
            # can signal it and its children without touching anything else.
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(self.popen.stdout, self.stdout_lines),
                name=f"{self.name}-stdout",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(self.popen.stderr, self.stderr_lines),
                name=f"{self.name}-stderr",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        Proc.started.append(self)

    def _pump(self, pipe: IO[str], lines: list[str]) -> None:
        """Move lines from one pipe into `lines` until EOF (runs on a thread)."""
        try:
            for line in pipe:
                with self._changed:
                    lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        except ValueError:  # NOTE: the pipe was closed under us by stop().
            pass
        finally:
            with self._changed:
                self._open_streams -= 1
                self._changed.notify_all()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while the process runs."""
        return self.popen.poll()

    def _lines(self, stream: Stream) -> list[str]:
        if stream == "stdout":
            return self.stdout_lines
        if stream == "stderr":
            return self.stderr_lines
        return self.stdout_lines + self.stderr_lines

    def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = READY_TIMEOUT_S,
        stream: Stream = "both",
    ) -> re.Match[str]:
        """Return the first match of `pattern` (re.search) in a collected line.

        Lines are searched from the start of the output, so a line printed
        before this call is found too. Raises AssertionError, with all the
        output so far, on timeout or when the process exits without it.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines(stream):
                    match = regex.search(line)
                    if match:
                        return match
                if self._open_streams == 0:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f"printed no line matching within {timeout:g} s:"
                    raise AssertionError(f"{self.name} {why} {regex.pattern!r}\n{self.output()}")
                self._changed.wait(remaining)
        # NOTE: EOF on its pipes comes a moment before the exit status, so
        # wait for that rather than report "rc None" for a child that exited.
        try:
            rc: int | None = self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            rc = None
        why = f"exited (rc {rc}) before printing" if rc is not None else "closed its output"
        raise AssertionError(f"{self.name} {why} a line matching {regex.pattern!r}\n{self.output()}")

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and return its exit code.

        Raises AssertionError, with the output so far, if it is still running
        after `timeout` seconds (the process is left running; stop() ends it).
        """
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g} s\n{self.output()}") from None
        self._join_pumps(timeout=5.0)
        return rc

    def _signal_group(self, sig: signal.Signals) -> None:
        # NOTE: only the group this Proc created (pgid == its pid, from
        # start_new_session); never a broad kill by name.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """End the process group: SIGTERM, then SIGKILL after `grace_s`; return the exit code."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(10.0)
        # Children the leader left behind in its group (e.g. a crashed parent).
        self._signal_group(signal.SIGKILL)
        self._join_pumps(timeout=5.0)
        return self.popen.returncode

    def _join_pumps(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def output(self) -> str:
        """The collected stdout and stderr, framed for a failure message."""
        with self._changed:
            out, err = list(self.stdout_lines), list(self.stderr_lines)
        head = f"{self.name} (pid {self.pid}, rc {self.popen.poll()}): {' '.join(self.cmd)}"
        return "\n".join([f"----- {head}", "----- stdout:", *out, "----- stderr:", *err, "----- end"])


# ---------------------------------------------------------------------------
# Per-node home directories
# ---------------------------------------------------------------------------


@dataclass
class NodeHome:
    """A node's own HOME and PANGEA_HOME, so each node looks like a separate box."""

    root: Path
    home: Path
    pangea_home: Path
    env: dict[str, str] = field(repr=False)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s; AssertionError naming ``what`` when it is not true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def make_node_home(base: Path, name: str = "node") -> NodeHome:
    """Create `base/name/{home,pangea}` and an env dict pointing HOME and PANGEA_HOME there.

    SHIV_ROOT is kept at the real user's ~/.shiv (or an inherited SHIV_ROOT)
    so every node shares one extraction of the pyz instead of unpacking
    ~200 MB into each fresh HOME.
    """
    root = base / name
    home = root / "home"
    pangea_home = root / "pangea"
    home.mkdir(parents=True)
    pangea_home.mkdir(parents=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PANGEA_", "XDG_")) or key == "PANGEA_PYZ"
    }
    env["SHIV_ROOT"] = os.environ.get("SHIV_ROOT") or str(Path.home() / ".shiv")
    env["HOME"] = str(home)
    env["PANGEA_HOME"] = str(pangea_home)
    env["PYTHONUNBUFFERED"] = "1"  # ready lines must not sit in a pipe buffer
    # No mDNS announcements from test nodes: multicast must not leave the test machine.
    # The discovery test turns it back on inside its own network namespaces.
    env["PANGEA_MDNS"] = "off"
    return NodeHome(root=root, home=home, pangea_home=pangea_home, env=env)


# ---------------------------------------------------------------------------
# NetnsPair: two network namespaces joined by a veth pair
# ---------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; on failure raise RuntimeError with its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed with {result.returncode}: {result.stderr.strip()}")
    return result


def netns_names() -> set[str]:
    """The names `ip netns list` shows now."""
    out = _ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_unavailable_reason() -> str | None:
    """Why netns tests cannot run here (not root, no `ip`, no netns support), or None."""
    if os.geteuid() != 0:
        return "netns tests need root (to create network namespaces)"
    if shutil.which("ip") is None:
        return "netns tests need `ip` from iproute2 (apt-get install iproute2)"
    probe = f"pg-{os.getpid()}-probe"
    try:
        added = _ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"`ip netns add` does not work here: {added.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class NetnsPair:
    """Two fresh network namespaces `a` and `b` joined by a veth pair.

    Use as a context manager; the namespaces (and the veth pair with them)
    are deleted on exit, even when setup or the test failed. Any process a
    test left running inside them is killed first, since only this test's
    processes can be in namespaces with these unique names.
    """

    IFACE = "pg0"  # the veth end's name inside each namespace

    def __init__(self, subnet: int | None = None) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.ns_a = f"pg-{tag}-a"
        self.ns_b = f"pg-{tag}-b"
        self.subnet = subnet if subnet is not None else random.randint(1, 250)
        self.addr_a = f"10.231.{self.subnet}.1"
        self.addr_b = f"10.231.{self.subnet}.2"
        self._created: list[str] = []

    def __repr__(self) -> str:
        return f"<NetnsPair {self.ns_a}={self.addr_a} {self.ns_b}={self.addr_b}>"

    @property
    def names(self) -> tuple[str, str]:
        """The two namespace names, (a, b)."""
        return (self.ns_a, self.ns_b)

    def ns(self, which: str) -> str:
        """Resolve 'a' or 'b' (or a full name of this pair) to the namespace name."""
        if which in ("a", "A"):
            return self.ns_a
        if which in ("b", "B"):
            return self.ns_b
        if which in self.names:
            return which
        raise ValueError(f"unknown namespace {which!r}: expected 'a', 'b' or one of {self.names}")

    def addr(self, which: str) -> str:
        """The veth address of namespace 'a' or 'b'."""
        return self.addr_a if self.ns(which) == self.ns_a else self.addr_b

    def __enter__(self) -> NetnsPair:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _setup(self) -> None:
        for name in self.names:
            _ip("netns", "add", name)
            self._created.append(name)
        # Create both ends directly inside the namespaces, so the interface
        # names never meet (or clash) in the root namespace.
        veth = f"link add {self.IFACE} netns {self.ns_a} type veth peer name {self.IFACE}"
        _ip(*veth.split(), "netns", self.ns_b)
        for name, addr in ((self.ns_a, self.addr_a), (self.ns_b, self.addr_b)):
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", self.IFACE)
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "set", self.IFACE, "up")

    def close(self) -> None:
        """Kill what runs in the namespaces and delete them; safe to call twice."""
        errors = []
        for name in list(self._created):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            deleted = _ip("netns", "del", name, check=False)
            if deleted.returncode == 0 or name not in netns_names():
                self._created.remove(name)
            else:
                errors.append(f"{name}: {deleted.stderr.strip()}")
        if errors:
            raise RuntimeError(f"could not delete network namespaces: {'; '.join(errors)}")

    def set_link(self, up: bool) -> None:
        """Bring the veth pair up or down on both sides (down = a network partition)."""
        state = "up" if up else "down"
        for name in self.names:
            _ip("-n", name, "link", "set", self.IFACE, state)

    def exec_cmd(self, which: str, cmd: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`cmd` prefixed with `ip netns exec <ns>`."""
        return ["ip", "netns", "exec", self.ns(which), *(os.fspath(c) for c in cmd)]

    def run(
        self, which: str, cmd: Sequence[str | os.PathLike[str]], **popen_kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` to completion inside namespace 'a' or 'b' (subprocess.run keywords).

        Defaults: capture_output, text, timeout 60 s, check=False.
        """
        popen_kwargs.setdefault("capture_output", True)
        popen_kwargs.setdefault("text", True)
        popen_kwargs.setdefault("timeout", 60)
        popen_kwargs.setdefault("check", False)
        return subprocess.run(self.exec_cmd(which, cmd), **popen_kwargs)

    def proc(
        self,
        which: str,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> Proc:
        """Start `cmd` as a `Proc` inside namespace 'a' or 'b'.

        `ip netns exec` execs the command in place, so the Proc's pid (and
        process group) is the command itself.
        """
        label = name or f"{Path(os.fspath(cmd[0])).name}@{which}"
        return Proc(self.exec_cmd(which, cmd), env=env, name=label)

"""What the built pangea.pyz imports at start-up (issue 6, target 5), read from
``python -X importtime``: `--help` loads none of the heavy libraries, and a
responder's whole session runs without the libp2p modules pangea defers
(QUIC, AutoTLS, WebSocket, multiaddr's DNS resolver; see
defer_unused_libp2p_modules). No timing assertions: the figures are the
benchmark's (bench/bench.py --only start).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import NodeHome, Proc
from pyz_helpers import FAST, PAIR_TIMEOUT_S, QUICK_TIMEOUT_S, loopback_address, run_pyz, start_initiator

# Libraries a command that does compute or networking needs, but --help must not load.
HEAVY = ("numpy", "trio", "capnp", "libp2p", "multiaddr", "rich", "cryptography", "zeroconf", "psutil")
# Loaded only by the libp2p modules that pangea defers; a responder's session needs none.
DEFERRED_ONLY = ("aioquic", "pylsqpack", "service_identity", "httpx", "requests", "dns", "trio_websocket")


def imported(stderr_lines: Sequence[str]) -> set[str]:
    """The top-level packages named in ``-X importtime`` lines."""
    names = set()
    for line in stderr_lines:
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_imports_none_of_the_heavy_libraries(pyz: Path, pangea_home: NodeHome) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(pyz), "--help"],
        env=pangea_home.env,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    names = imported(result.stderr.splitlines())
    assert {"argparse", "_bootstrap"} <= names, sorted(names)  # the log is what we think it is
    assert sorted(names & set(HEAVY)) == []


def test_respond_session_runs_without_the_deferred_libp2p_modules(pyz: Path, make_home) -> None:
    a, b = make_home("initiator"), make_home("responder")
    with start_initiator(pyz, a, *FAST, "--timeout", "60") as initiator:
        address = loopback_address(initiator)
        responder_cmd = [sys.executable, "-X", "importtime", str(pyz), "respond", address, "--timeout", "30"]
        with Proc(responder_cmd, env=b.env, name="responder") as responder:
            assert responder.wait(timeout=PAIR_TIMEOUT_S) == 0, responder.output()
            assert initiator.wait(timeout=PAIR_TIMEOUT_S) == 0, initiator.output()
    names = imported(responder.stderr_lines)
    assert {"libp2p", "numpy", "trio", "capnp"} <= names, sorted(names)
    assert sorted(names & set(DEFERRED_ONLY)) == []


FIRST_RUN = re.compile(
    r"^pangea: first run of this build: unpacking \d+ MB into (?P<dir>\S+) "
    r"\(once; --version names older builds to remove\)$"
)


def test_first_run_of_a_build_says_it_unpacks_once_on_stderr(pyz: Path, pangea_home: NodeHome, tmp_path: Path) -> None:
    """A fresh SHIV_ROOT: the first run says (on stderr, stdout's JSON untouched) where it
    unpacks, the second says nothing; --version names where, and older pangea builds only."""
    root = tmp_path / "shiv"
    env = {**pangea_home.env, "SHIV_ROOT": str(root)}
    first = run_pyz(pyz, ["status", "--json"], env, timeout=300)
    assert first.returncode == 0, first.stderr
    json.loads(first.stdout)  # the message is not on stdout
    (line,) = first.stderr.splitlines()
    match = FIRST_RUN.match(line)
    assert match, first.stderr
    unpacked = Path(match.group("dir"))
    assert unpacked.parent == root and unpacked.name.startswith(f"{pyz.name}_"), unpacked
    assert (unpacked / "site-packages" / "pangea.py").is_file()

    second = run_pyz(pyz, ["status", "--json"], env)
    assert second.returncode == 0 and second.stderr == "", second.stderr
    json.loads(second.stdout)

    version = run_pyz(pyz, ["--version"], env)
    assert version.stderr == "" and len(version.stdout.splitlines()) == 1, version
    assert f"; unpacked in {unpacked} (no other pangea build unpacked beside it)" in version.stdout, version.stdout

    # An older pangea build beside it is named for removal; this one and other zipapps never.
    older = root / f"pangea.pyz_{'0' * 64}"
    (older / "site-packages").mkdir(parents=True)
    (older / "site-packages" / "_pangea_build.py").write_text("BUILT_FOR = ('x', 'y')\n")
    stranger = root / f"other.pyz_{'1' * 64}"
    (stranger / "site-packages").mkdir(parents=True)
    version = run_pyz(pyz, ["--version"], env)
    assert version.returncode == 0 and version.stderr == "", version.stderr
    text = version.stdout.strip()
    assert text.endswith(f": rm -rf {older}"), text
    assert f"; unpacked in {unpacked}; 1 other pangea build(s) unpacked beside it, not this one" in text, text
    assert str(stranger) not in text

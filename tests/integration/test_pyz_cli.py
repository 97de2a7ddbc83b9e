"""The built pangea.pyz's command line: --help, --version, the wrong interpreter,
and the usage and setup errors that stop it before any peer is involved.

Every expected failure must be one ``pangea: error: ...`` line (plus at most
one ``hint: ...``), exit code 2, and never a traceback.
"""

from __future__ import annotations

import glob
import os
import socket
from pathlib import Path

import pytest
from helpers import NodeHome
from pyz_helpers import assert_expected_error, build_stamp, free_port, run_pyz, session_dirs

# A well-formed peer ID (of a node that is not running anywhere).
SOME_PEER_ID = "12D3KooWR5EXod8UAw9hqCzcaGV5WeuiYPciCYvkTdoHqcVGjMA6"


def _normalized(text: str) -> str:
    """Text with every run of whitespace (including line breaks) made one space."""
    return " ".join(text.split())


def test_cli_help_lists_commands_and_options(pyz: Path, pangea_home: NodeHome) -> None:
    top = run_pyz(pyz, ["--help"], pangea_home.env)
    assert top.returncode == 0, top.stderr
    for command in ("initiate", "respond", "demo", "--version", "--debug"):
        assert command in top.stdout, top.stdout

    expected = {
        "initiate": ["--host", "--port", "--timeout", "--size", "--transfer-mib", "--json"],
        "respond": ["address", "--host", "--port", "--timeout", "--json"],
        "demo": ["--size"],
    }
    for command, options in expected.items():
        result = run_pyz(pyz, [command, "--help"], pangea_home.env)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        for option in options:
            assert option in result.stdout, f"{command} --help lacks {option}:\n{result.stdout}"
        if command == "initiate":  # the documented defaults: port 7777, wait 60 s
            text = _normalized(result.stdout)
            assert "(default: 7777)" in text and "(default: 60)" in text, text


def test_cli_version_names_the_build_target(pyz: Path, pangea_home: NodeHome) -> None:
    stamp = build_stamp(pyz)
    tag, machine = stamp["BUILT_FOR"]
    result = run_pyz(pyz, ["--version"], pangea_home.env)
    assert result.returncode == 0, result.stderr
    text = _normalized(result.stdout)
    assert text.startswith("pangea 0.1.0 "), text
    assert f"built for {tag} {machine}" in text, text
    assert stamp["GIT_COMMIT"] in text, text


def test_cli_version_is_one_line(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, ["--version"], {**pangea_home.env, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout


def _other_pythons() -> list[tuple[str, str | None]]:
    home = Path(os.path.expanduser("~"))
    out: list[tuple[str, str | None]] = []
    for version in ("3.12", "3.10"):
        found = sorted(glob.glob(str(home / ".pyenv" / "versions" / f"{version}.*" / "bin" / "python")))
        out.append((version, found[-1] if found else None))
    return out


@pytest.mark.parametrize(("version", "interpreter"), _other_pythons(), ids=lambda v: v if v and "/" not in v else "")
@pytest.mark.parametrize("args", [["--version"], ["initiate", "--host", "127.0.0.1", "--port", "0", "--timeout", "1"]])
def test_cli_wrong_interpreter_names_the_build_target(
    pyz: Path, pangea_home: NodeHome, version: str, interpreter: str | None, args: list[str]
) -> None:
    if interpreter is None:
        pytest.skip(f"no ~/.pyenv/versions/{version}.*/bin/python on this machine")
    tag, machine = build_stamp(pyz)["BUILT_FOR"]
    if tag == f"cpython-{version.replace('.', '')}":
        pytest.skip(f"the pyz was built for Python {version} itself")
    result = run_pyz(pyz, args, pangea_home.env, interpreter=interpreter)
    assert result.returncode == 2, result.stdout + result.stderr
    for bad in ("ImportError", "ModuleNotFoundError", "Traceback"):
        assert bad not in result.stderr, result.stderr
    assert_expected_error(result.stderr, f"built for {tag} on {machine}")
    assert session_dirs(pangea_home) == []


def test_cli_no_command_prints_usage_and_exits_2(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, [], pangea_home.env)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_command_is_one_error_line(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, ["bogus"], pangea_home.env)
    assert result.returncode == 2
    assert_expected_error(result.stderr, "'bogus'")


def test_respond_without_address_and_no_terminal_exits_2(pyz: Path, pangea_home: NodeHome) -> None:
    result = run_pyz(pyz, ["respond"], pangea_home.env)  # stdin is /dev/null, not a terminal
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "no initiator address")
    assert session_dirs(pangea_home) == []


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("garbage", "starts with '/'"),
        ("/ip4/127.0.0.1/tcp/7777", "/p2p/<peer id>"),
        (f"/ip4/300.1.1.1/tcp/7777/p2p/{SOME_PEER_ID}", "'300.1.1.1'"),
        (f"/ip4/127.0.0.1/udp/7777/p2p/{SOME_PEER_ID}", "'udp'"),
        (f"/ip4/127.0.0.1/tcp/70000/p2p/{SOME_PEER_ID}", "'70000'"),
        ("/ip4/127.0.0.1/tcp/7777/p2p/not-a-peer-id", "'not-a-peer-id'"),
    ],
    ids=["no-slash", "no-p2p", "bad-ip", "udp", "bad-port", "bad-peer-id"],
)
def test_respond_bad_address_names_what_is_wrong(pyz: Path, pangea_home: NodeHome, address: str, what: str) -> None:
    result = run_pyz(pyz, ["respond", address, "--timeout", "5"], pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, "bad address", what)
    assert session_dirs(pangea_home) == []


@pytest.mark.parametrize(
    "command",
    [
        ["initiate", "--host", "127.0.0.1", "--timeout", "5"],
        ["initiate", "--timeout", "5"],  # default --host 0.0.0.0
        ["respond", f"/ip4/127.0.0.1/tcp/9/p2p/{SOME_PEER_ID}", "--host", "127.0.0.1", "--timeout", "5"],
    ],
    ids=["initiate-loopback", "initiate-all-interfaces", "respond"],
)
def test_cli_port_in_use_suggests_port_0(pyz: Path, pangea_home: NodeHome, command: list[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_pyz(pyz, [*command, "--port", str(port)], pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, f"port {port}", "in use")
    assert "--port 0" in result.stderr, result.stderr
    assert session_dirs(pangea_home) == []


NOT_LOCAL_HOST = "203.0.113.254"  # TEST-NET-3: documentation only, on no interface here


@pytest.mark.parametrize(
    "port",
    [
        "0",
        "free",
    ],
)
def test_initiate_host_not_on_this_machine_exits_2(pyz: Path, pangea_home: NodeHome, port: str) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((NOT_LOCAL_HOST, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"{NOT_LOCAL_HOST} is an address of this machine")
    port_arg = str(free_port()) if port == "free" else port
    args = ["initiate", "--host", NOT_LOCAL_HOST, "--port", port_arg, "--timeout", "5"]
    result = run_pyz(pyz, args, pangea_home.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_expected_error(result.stderr, NOT_LOCAL_HOST, "not an address of this machine")

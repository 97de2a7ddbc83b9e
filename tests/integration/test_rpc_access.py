"""Who may use a serve node's RPC endpoint.

On loopback the node requires a token it keeps in its home (0600, in a 0700
home): `call` and `Client` of the same user and home read it, another user of
the box cannot, and `--rpc-open` is the explicit way back to an endpoint any
local user may use. Off loopback the endpoint speaks TLS 1.3 with a
certificate kept in the home, whose fingerprint `serve` prints and clients pin
(the cross-namespace capture is in tests/netns/test_rpc_tls.py). Every test
checks a legitimate client still gets a correct answer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import NodeHome, Proc
from pyz_helpers import ServeNode, assert_expected_error, run_pyz, start_serve

from pangea import Client, RpcError

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 60.0  # every call here answers well within it
READY_TIMEOUT_S = 120.0
NOBODY = 65534


@pytest.fixture
def node(pyz: Path, pangea_home: NodeHome) -> Iterator[ServeNode]:
    served = start_serve(pyz, pangea_home, name="serve")
    try:
        yield served
    finally:
        served.proc.stop()


def test_a_loopback_node_keeps_its_token_in_its_home_and_local_clients_of_its_user_read_it(
    pyz: Path, node: ServeNode, make_home: object
) -> None:
    token_file = node.home.pangea_home / "rpc-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.home.pangea_home.stat().st_mode) == 0o700
    assert node.token and len(node.token) >= 32
    assert f"token required; programs of this user read it from {token_file}" in "\n".join(node.proc.stdout_lines)
    # `call` of this user and home: no token option needed
    ok = run_pyz(pyz, ["call", "--rpc", node.rpc, "--json", "status"], node.home.env)
    assert ok.returncode == 0, ok.stderr
    # a program that does not know the token (another home stands for another user) is refused
    stranger = make_home("stranger")  # type: ignore[operator]
    refused = run_pyz(pyz, ["call", "--rpc", node.rpc, "status"], stranger.env)
    assert refused.returncode == 2, refused.stdout  # a setup problem: the token
    assert_expected_error(refused.stderr, "login refused: wrong or missing RPC token")
    assert "rpc-token file" in refused.stderr, refused.stderr
    # Client in this process: the token given, then the matmul is right
    a = np.arange(12.0).reshape(3, 4)
    with Client(node.rpc, token=node.token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
        assert np.array_equal(rpc.matmul(a, a.T, placement="local"), a @ a.T)
    with pytest.raises(RpcError, match="login refused"):
        Client(node.rpc, token="x" * 32, timeout_s=CLIENT_TIMEOUT_S)


def test_the_home_token_stays_the_same_across_restarts(pyz: Path, pangea_home: NodeHome) -> None:
    first = start_serve(pyz, pangea_home, name="serve-1")
    token = first.token
    first.proc.stop()
    second = start_serve(pyz, pangea_home, name="serve-2")
    try:
        assert second.token == token
        with Client(second.rpc, token=token, timeout_s=CLIENT_TIMEOUT_S) as rpc:
            assert rpc.status()["peer_id"] == second.peer_id
    finally:
        second.proc.stop()


def test_rpc_open_lets_any_client_in_and_says_so(pyz: Path, pangea_home: NodeHome, make_home: object) -> None:
    node = start_serve(pyz, pangea_home, "--rpc-open", name="serve-open")
    try:
        assert node.token is None
        banner = "(open: no token; every user of this machine can use this node)"
        assert any(line.endswith(banner) for line in node.proc.stdout_lines), node.proc.output()
        stranger = make_home("stranger")  # type: ignore[operator]
        ok = run_pyz(pyz, ["call", "--rpc", node.rpc, "--json", "status"], stranger.env)
        assert ok.returncode == 0, ok.stderr
        with Client(node.rpc, token="any-token-at-all", timeout_s=CLIENT_TIMEOUT_S) as rpc:
            assert rpc.status()["peer_id"] == node.peer_id
    finally:
        node.proc.stop()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rpc", "0.0.0.0:0", "--rpc-open"], "--rpc-open serves RPC without a token, so only on loopback"),
        (["--rpc-open", "--rpc-token-file", "TOKEN_FILE"], "--rpc-open serves RPC without a token"),
    ],
)
def test_rpc_open_off_loopback_or_with_a_token_is_a_usage_error(
    pyz: Path, pangea_home: NodeHome, args: list[str], needle: str, token_file: tuple[Path, str]
) -> None:
    args = [str(token_file[0]) if arg == "TOKEN_FILE" else arg for arg in args]
    result = run_pyz(pyz, ["serve", "--port", "0", *args], pangea_home.env, timeout=60)
    assert result.returncode == 2, result.stdout
    assert_expected_error(result.stderr, needle)


# ---------------------------------------------------------------- another user of the box


def _as_nobody_command(workdir: Path, pyz: Path, *args: str) -> list[str]:
    """`pangea.pyz ARGS` run as uid/gid 65534 with a home of its own (Debian's python3.11: the
    build's interpreter may live under /root, which other users cannot enter)."""
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "env",
        f"HOME={workdir / 'home'}",
        f"SHIV_ROOT={workdir / 'home' / 'shiv'}",
        f"PANGEA_HOME={workdir / 'home' / 'pangea'}",
        "/usr/bin/python3.11",
        str(workdir / pyz.name),
        *args,
    ]


def _nobody_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a command as another user (setpriv)"
    if shutil.which("setpriv") is None or not Path("/usr/bin/python3.11").exists():
        return "needs setpriv and /usr/bin/python3.11"
    return None


@pytest.fixture
def nobody_box(pyz: Path) -> Iterator[Path]:
    """A directory user 65534 can use, holding a copy of the pyz."""
    reason = _nobody_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="pangea-nobody-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        shutil.copy2(pyz, workdir / pyz.name)
        os.chmod(workdir / pyz.name, 0o755)
        (workdir / "home").mkdir()
        os.chown(workdir / "home", NOBODY, NOBODY)
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_another_user_of_the_box_is_refused_by_the_default_loopback_rpc(
    pyz: Path, node: ServeNode, nobody_box: Path, pangea_home: NodeHome
) -> None:
    command = _as_nobody_command(nobody_box, pyz, "call", "--rpc", node.rpc, "--json", "status")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)  # a setup problem: the token
    assert_expected_error(result.stderr, "login refused: wrong or missing RPC token")
    # and it cannot read the token where the node keeps it
    peek = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "cat",
            str(node.home.pangea_home / "rpc-token"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert peek.returncode != 0 and str(node.token) not in peek.stdout, peek.stdout
    # the node's own user still gets a correct answer
    ok = run_pyz(pyz, ["call", "--rpc", node.rpc, "matmul", "--size", "32", "--placement", "local"], node.home.env)
    assert ok.returncode == 0 and "verified against local numpy" in " ".join(ok.stdout.split()), ok.stderr


def test_another_user_gets_in_only_when_the_node_was_started_with_rpc_open(
    pyz: Path, pangea_home: NodeHome, nobody_box: Path
) -> None:
    node = start_serve(pyz, pangea_home, "--rpc-open", name="serve-open")
    try:
        command = _as_nobody_command(nobody_box, pyz, "call", "--rpc", node.rpc, "--json", "status")
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert node.peer_id in result.stdout
    finally:
        node.proc.stop()


# ---------------------------------------------------------------- TLS off loopback (reached over 127.0.0.1 here)


def _start_tls_serve(pyz: Path, home: NodeHome, token_file: Path, name: str = "serve-tls") -> tuple[Proc, str, str]:
    """`serve --rpc 0.0.0.0:0 --rpc-token-file F`; return (proc, 127.0.0.1:PORT, fingerprint)."""
    cmd = [str(pyz), "serve", "--host", "127.0.0.1", "--port", "0", "--rpc", "0.0.0.0:0"]
    proc = Proc([*cmd, "--rpc-token-file", str(token_file)], env=home.env, name=name)
    try:
        proc.wait_for_line(r"^pangea: serving on /ip4/", timeout=READY_TIMEOUT_S, stream="stdout")
        port = proc.wait_for_line(r"^RPC: 0\.0\.0\.0:(\d+) \(TLS 1\.3, token required\)$", stream="stdout").group(1)
        fingerprint = proc.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
    except BaseException:
        proc.stop()
        raise
    return proc, f"127.0.0.1:{port}", fingerprint


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, str]:
    token = secrets.token_hex(16)
    path = tmp_path / "rpc.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


def test_an_endpoint_off_loopback_speaks_tls_with_a_fingerprint_clients_pin(
    pyz: Path, pangea_home: NodeHome, make_home: object, token_file: tuple[Path, str]
) -> None:
    path, token = token_file
    proc, rpc, fingerprint = _start_tls_serve(pyz, pangea_home, path)
    try:
        assert stat.S_IMODE((pangea_home.pangea_home / "rpc-tls.pem").stat().st_mode) == 0o600
        a = np.arange(16.0).reshape(4, 4)
        # pinned: the fingerprint serve printed
        with Client(rpc, token=token, fingerprint=fingerprint, timeout_s=CLIENT_TIMEOUT_S) as node:
            assert node.tls and node.fingerprint == fingerprint
            assert np.array_equal(node.matmul(a, a, placement="local"), a @ a)
        # a wrong fingerprint is refused before the token is sent
        wrong = "sha256:" + "0" * 64
        with pytest.raises(RpcError, match=f"it presented certificate {fingerprint}, not the fingerprint {wrong}"):
            Client(rpc, token=token, fingerprint=wrong, timeout_s=CLIENT_TIMEOUT_S)
        # plain Cap'n Proto to a TLS endpoint: refused, with the hint to pin
        stranger = make_home("stranger")  # type: ignore[operator]
        plain = run_pyz(pyz, ["call", "--rpc", rpc, "--token-file", str(path), "status"], stranger.env)
        assert plain.returncode == 2, plain.stdout  # a setup problem: the fingerprint
        assert_expected_error(plain.stderr, f"cannot use the pangea node at {rpc}: it closed the connection")
        assert "speaks TLS: pass the fingerprint" in plain.stderr, plain.stderr
        pinned = ["call", "--rpc", rpc, "--token-file", str(path), "--fingerprint", fingerprint, "--json", "status"]
        assert run_pyz(pyz, pinned, stranger.env).returncode == 0
        # `call` of the node's own home finds the fingerprint of its running node
        local = run_pyz(pyz, ["call", "--rpc", rpc, "--token-file", str(path), "--json", "status"], pangea_home.env)
        assert local.returncode == 0, local.stderr
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_the_rpc_certificate_is_kept_so_the_fingerprint_survives_a_restart(
    pyz: Path, pangea_home: NodeHome, token_file: tuple[Path, str]
) -> None:
    path, token = token_file
    first, _, fingerprint = _start_tls_serve(pyz, pangea_home, path, "serve-tls-1")
    first.stop()
    second, rpc, again = _start_tls_serve(pyz, pangea_home, path, "serve-tls-2")
    try:
        assert again == fingerprint
        with Client(rpc, token=token, fingerprint=fingerprint, timeout_s=CLIENT_TIMEOUT_S) as node:
            assert node.status()["rpc_address"].endswith(rpc.rsplit(":", 1)[1])
    finally:
        second.stop()


def test_no_token_or_pairing_code_in_ps_while_serve_and_call_run_as_the_readme_recommends(
    pyz: Path, pangea_home: NodeHome, make_home: object, token_file: tuple[Path, str]
) -> None:
    path, token = token_file
    cmd = [str(pyz), "serve", "--host", "127.0.0.1", "--port", "0", "--rpc", "0.0.0.0:0", "--pair"]
    with Proc([*cmd, "--rpc-token-file", str(path)], env=pangea_home.env, name="serve") as serve:
        serve.wait_for_line(r"^pangea: serving on /ip4/", timeout=READY_TIMEOUT_S, stream="stdout")
        port = serve.wait_for_line(r"^RPC: 0\.0\.0\.0:(\d+) ", stream="stdout").group(1)
        code = serve.wait_for_line(r"^Pairing code \(one use, valid \d+ s\): (\S+)$", stream="stdout").group(1)
        secrets_seen = {token, code, code.replace("-", "")}
        client = make_home("client")  # type: ignore[operator]
        call = [str(pyz), "call", "--rpc", f"127.0.0.1:{port}", "--token-file", str(path)]
        fingerprint = serve.wait_for_line(r"^RPC fingerprint: (sha256:[0-9a-f]{64}) ", stream="stdout").group(1)
        call += ["--fingerprint", fingerprint, "matmul", "--size", "1024", "--placement", "local"]
        tables: list[str] = []
        with Proc(call, env=client.env, name="call") as caller:
            for _ in range(600):  # bounded: at most ~60 s of snapshots
                tables.append(subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout)
                if caller.returncode is not None:
                    break
                time.sleep(0.1)
            assert caller.wait(timeout=120) == 0, caller.output()
        assert "verified against local numpy" in " ".join(" ".join(caller.stdout_lines).split()), caller.output()
    text = "\n".join(tables)
    assert f"{serve.pid} " in text and " call --rpc" in text, "ps never showed serve and call"
    for secret in secrets_seen:
        assert secret not in text, "a secret is on a command line"

"""Unit tests of the CLI section of pangea.py: the parser, `main()` exit codes and error lines.

Only paths that end before any node starts are exercised here (argument and
address errors, the build-target guard, --version); running nodes is the job
of tests/integration. Errors must be one `pangea: error: ...` line on stderr,
optionally followed by one `hint: ...` line, and no traceback without --debug.
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
from pathlib import Path
from typing import Any

import pytest

import pangea
from pangea import UsageError, main, make_parser

PEER_ID = "12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y"
HERE = (sys.implementation.cache_tag, __import__("platform").machine())


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any accidental session directory out of the real home; no stdin."""
    monkeypatch.setenv("PANGEA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.delenv(pangea.JOIN_ENV, raising=False)
    monkeypatch.setattr(pangea, "build_info", lambda: None)  # as when run from source


def run(argv: list[str]) -> int:
    """main(argv) as a shell sees it: argparse's SystemExit (--version, --help) is its code."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def error_lines(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    """Return (stdout, stderr lines); check stderr is one error line and at most one hint line."""
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("pangea: error: "), err
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), err
    assert "Traceback" not in err
    return out, lines


# ---------------------------------------------------------------- argument errors -> 2


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["initiate", "--port", "http"], "argument --port: got 'http'; expected a TCP port"),
        (["initiate", "--timeout", "soon"], "argument --timeout: got 'soon'; expected a number of seconds"),
        (["initiate", "--size", "1.5"], "argument --size: got '1.5'; expected a matrix size, a whole number in 2-"),
        (["initiate", "extra"], "unrecognized arguments: extra"),
        (["respond", "a", "b"], "unrecognized arguments: b"),
        (["demo", "--size"], "argument --size: expected one argument"),
        (["-vv"], "no command given"),
        (
            ["initiate", "--port", "70000"],
            "argument --port: got '70000'; expected a TCP port (0: any free one), a whole number in 0-65535",
        ),
        (["initiate", "--port", "-1"], "argument --port: got '-1'; expected a TCP port"),
        (["initiate", "--size", "1"], "argument --size: got '1'; expected a matrix size, a whole number in 2-32768"),
    ],
)
def test_main_argument_error_exits_2_with_one_error_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], problem: str
) -> None:
    assert run(argv) == 2
    out, lines = error_lines(capsys)
    assert problem in lines[0]
    assert out == ""


def test_main_argument_error_hint_points_at_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["initiate", "--port", "x"]) == 2
    _, lines = error_lines(capsys)
    assert lines[1] == "hint: see `pangea.pyz initiate --help`"


def test_main_without_arguments_prints_help_to_stderr_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: pangea.pyz")
    for command in ("initiate", "respond", "demo"):
        assert command in err


def test_main_no_command_has_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--verbose"]) == 2
    _, lines = error_lines(capsys)
    assert lines == [
        "pangea: error: no command given",
        "hint: pangea.pyz initiate | respond ADDRESS | demo | serve | call | status | doctor | bench | id",
    ]


def test_main_no_traceback_without_debug_but_one_with_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["respond", "garbage"]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert run(["--debug", "respond", "garbage"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("pangea: error: bad address 'garbage'")
    assert "Traceback (most recent call last)" in err
    assert "UsageError" in err


def test_main_debug_after_the_command_also_shows_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["respond", "garbage", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------- respond addresses


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("garbage", "a multiaddr starts with '/'"),
        ("/ip4/1.2.3.4/tcp/7777", "it has no /p2p/<peer id> part"),
        ("/ip4/999.1.1.1/tcp/7777/p2p/" + PEER_ID, "'999.1.1.1' is not an ip4 address"),
        ("/ip4/1.2.3.4/tcp/0/p2p/" + PEER_ID, "port '0' is not a number in 1-65535"),
        ("/ip4/1.2.3.4/udp/7777/p2p/" + PEER_ID, "pangea uses tcp"),
        ("/ip4/1.2.3.4/tcp/7777/p2p/notapeerid", "is not a peer id"),
    ],
)
def test_main_respond_bad_address_exits_2(capsys: pytest.CaptureFixture[str], address: str, problem: str) -> None:
    assert run(["respond", address]) == 2
    _, lines = error_lines(capsys)
    assert lines[0].startswith("pangea: error: bad address ")
    assert problem in lines[0]


def test_main_respond_without_p2p_part_prints_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["respond", "/ip4/192.168.1.5/tcp/7777"]) == 2
    _, lines = error_lines(capsys)
    assert len(lines) == 2 and "/p2p/" in lines[1]


def test_main_respond_bad_address_creates_no_session_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["respond", "/ip4/1.2.3.4/tcp/7777"]) == 2
    assert not (tmp_path / "home" / pangea.SESSIONS_DIRNAME).exists()


def test_main_respond_without_address_and_no_terminal_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["respond"]) == 2
    _, lines = error_lines(capsys)
    assert lines[0] == "pangea: error: no initiator address given"
    assert lines[1].startswith("hint: ./pangea.pyz respond 'pangea://ip4/")


JOIN = f"pangea://ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}#4E5QZNFDYK3N"


def test_respond_dash_reads_the_join_string_from_one_line_of_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"  {JOIN}\nnot this line\n"))
    monkeypatch.setenv(pangea.JOIN_ENV, "pangea://not-this-one")
    assert pangea.join_text("-", discover=False) == JOIN


def test_respond_dash_with_nothing_on_stdin_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["respond", "-"]) == 2
    _, lines = error_lines(capsys)
    assert lines[0] == "pangea: error: no initiator address on stdin"
    assert "respond -" in lines[1]


def test_respond_without_address_takes_the_join_string_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pangea.JOIN_ENV, JOIN + "\n")
    assert pangea.join_text(None, discover=False) == JOIN
    assert pangea.join_text("/ip4/1.2.3.4/tcp/1", discover=False) == "/ip4/1.2.3.4/tcp/1"  # ADDRESS wins
    assert pangea.join_text(None, discover=True) is None  # --discover wins: it runs discovery


def test_respond_without_address_or_environment_is_as_before() -> None:
    assert pangea.join_text(None, discover=False) is None
    assert pangea.join_text(None, discover=True) is None


def test_respond_help_names_stdin_and_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["respond", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "- reads it from stdin" in out and f"${pangea.JOIN_ENV}" in out, out


@pytest.mark.parametrize(
    ("verb", "flag", "safer"),
    [("serve", "--rpc-token", "--rpc-token-file FILE"), ("call", "--token", "--token-file FILE")],
)
def test_token_flag_help_says_it_is_unsafe_on_a_shared_machine(
    capsys: pytest.CaptureFixture[str], verb: str, flag: str, safer: str
) -> None:
    assert run([verb, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "unsafe on a shared machine" in out and safer in out and "$PANGEA_RPC_TOKEN" in out, out
    assert "a file other users can read is refused" in out and f"{flag} TOKEN" in out, out


def test_main_respond_non_ascii_digit_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["respond", f"/ip4/1.2.3.4/tcp/\u00b3/p2p/{PEER_ID}"]) == 2
    error_lines(capsys)


# ---------------------------------------------------------------- --version, build-target guard


def test_main_version_from_source(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert run(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (
        f"pangea {pangea.__version__} (protocol {pangea.PROTOCOL_VERSION}), running from source; "
        f"running on {HERE[0]} {HERE[1]}"
    )
    assert err == ""


def test_main_version_of_a_build_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    stamp = {"BUILT_FOR": HERE, "PYTHON_VERSION": "3.11", "GIT_COMMIT": "abc1234"}
    monkeypatch.setattr(pangea, "build_info", lambda: stamp)
    assert run(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(f"pangea {pangea.__version__} (protocol {pangea.PROTOCOL_VERSION}), ")
    assert f"built for {HERE[0]} {HERE[1]} (Python 3.11), commit abc1234" in out


def test_version_text_of_a_build(monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = {"BUILT_FOR": HERE, "PYTHON_VERSION": "3.11", "GIT_COMMIT": "abc1234"}
    monkeypatch.setattr(pangea, "build_info", lambda: stamp)
    text = pangea.version_text()
    assert text == (
        f"pangea {pangea.__version__} (protocol {pangea.PROTOCOL_VERSION}), "
        f"built for {HERE[0]} {HERE[1]} (Python 3.11), commit abc1234; "
        f"running on {HERE[0]} {HERE[1]}"
    )


@pytest.mark.parametrize("built_for", [("cpython-99", HERE[1]), (HERE[0], "sparc64")])
@pytest.mark.parametrize("argv", [["initiate"], ["respond", "/ip4/1.2.3.4/tcp/1"], ["--version"], ["bogus"]])
def test_main_build_target_mismatch_exits_2_before_anything_else(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    built_for: tuple[str, str],
    argv: list[str],
) -> None:
    monkeypatch.setattr(pangea, "build_info", lambda: {"BUILT_FOR": built_for, "PYTHON_VERSION": "3.99"})
    assert run(argv) == 2
    out, lines = error_lines(capsys)
    assert out == ""
    problem = pangea.build_target_mismatch(built_for, HERE)
    assert problem is not None
    assert lines[0] == f"pangea: error: {problem}"
    assert lines[1].startswith("hint: run it with python3.99 ")
    assert "./build.sh" in lines[1]


def test_main_matching_build_target_passes_the_guard(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pangea, "build_info", lambda: {"BUILT_FOR": list(HERE), "PYTHON_VERSION": "3.11"})
    assert run(["respond", "nonsense"]) == 2
    _, lines = error_lines(capsys)
    assert "bad address 'nonsense'" in lines[0]  # got past the guard to the address check


def test_main_build_stamp_without_target_is_ignored(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pangea, "build_info", lambda: {"GIT_COMMIT": "abc"})
    assert run(["bogus"]) == 2
    _, lines = error_lines(capsys)
    assert "invalid choice" in lines[0]


# ---------------------------------------------------------------- the parser


def test_make_parser_defaults() -> None:
    parser = make_parser()
    args = parser.parse_args(["initiate"])
    assert (args.command, args.port, args.host, args.timeout, args.json) == (
        "initiate",
        pangea.DEFAULT_PORT,
        "0.0.0.0",
        pangea.DEFAULT_WAIT_S,
        False,
    )
    assert (args.size, args.transfer_mib) == (pangea.AGGREGATE_N, pangea.THROUGHPUT_BYTES >> 20)
    assert args.func is pangea.cmd_initiate
    args = parser.parse_args(["respond", "/ip4/1.2.3.4/tcp/1/p2p/x"])
    assert (args.command, args.address, args.port) == ("respond", "/ip4/1.2.3.4/tcp/1/p2p/x", 0)
    assert args.func is pangea.cmd_respond
    assert parser.parse_args(["demo"]).func is pangea.cmd_demo


@pytest.mark.parametrize(
    ("argv", "debug", "verbose"),
    [
        (["initiate"], False, 0),
        (["--debug", "initiate"], True, 0),
        (["initiate", "--debug"], True, 0),
        (["-vv", "initiate"], False, 2),
        (["initiate", "-v"], False, 1),
        (["-v", "respond", "x", "-v"], False, 1),  # the subcommand's count replaces the global one
    ],
)
def test_make_parser_debug_and_verbose_anywhere(argv: list[str], debug: bool, verbose: int) -> None:
    args = make_parser().parse_args(argv)
    assert (args.debug, args.verbose) == (debug, verbose)


def test_make_parser_errors_raise_usage_error_not_system_exit() -> None:
    with pytest.raises(UsageError) as info:
        make_parser().parse_args(["initiate", "--port", "x"])
    assert info.value.exit_code == 2
    assert info.value.hint == "see `pangea.pyz initiate --help`"


def test_make_parser_json_and_port_zero() -> None:
    args = make_parser().parse_args(["initiate", "--port", "0", "--json", "--timeout", "2.5"])
    assert (args.port, args.json, args.timeout) == (0, True, 2.5)


def test_make_parser_each_verb_has_its_add_parser_right_above_its_cmd() -> None:
    """A verb's options and its code sit together: `add_<verb>_parser`, then `cmd_<verb>` (bench: its
    block of helpers between them), with no other verb's parser or command in between."""
    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    defs = sorted(
        (inspect.getsourcelines(obj)[1], name)
        for name, obj in vars(pangea).items()
        if inspect.isfunction(obj)
        and (name.startswith("cmd_") or (name.startswith("add_") and name.endswith("_parser")))
    )
    names = [name for _, name in defs]
    for verb, parser in sub.choices.items():
        assert parser.get_default("func") is getattr(pangea, f"cmd_{verb}")
        at = names.index(f"add_{verb}_parser")
        assert names[at + 1] == f"cmd_{verb}", (verb, names[at : at + 2])


def test_main_help_goes_to_stdout_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: pangea.pyz") and err == ""


def _keyboard_interrupt(args: Any) -> int:
    raise KeyboardInterrupt


def test_main_ctrl_c_exits_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pangea, "cmd_demo", _keyboard_interrupt)
    assert run(["demo"]) == 130
    assert capsys.readouterr().err == "pangea: interrupted\n"


def _pangea_error(args: Any) -> int:
    raise pangea.PangeaError("cannot reach peer: refused", hint="check the firewall")


def test_main_pangea_error_exit_code_and_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pangea, "cmd_demo", _pangea_error)
    assert run(["demo"]) == 1
    _, lines = error_lines(capsys)
    assert lines == ["pangea: error: cannot reach peer: refused", "hint: check the firewall"]


# ---------------------------------------------------------------- libp2p's records in pangea's log


def _record(name: str, level: int, msg: str, at: float) -> Any:
    import logging

    record = logging.LogRecord(name, level, __file__, 1, msg, (), None)
    record.created = at
    return record


def test_libp2p_log_filter_drops_libp2p_info_and_holds_back_repeats_with_a_count() -> None:
    import logging

    quiet = pangea.Libp2pLogFilter(debug=False, repeat_s=60.0)
    dials = "Connections below target; initiating 199 new dials"
    assert not quiet.filter(_record("libp2p.network.auto_connector", logging.INFO, dials, 0.0))
    assert quiet.filter(_record("pangea", logging.INFO, "session with x closed", 0.0))  # pangea's own: kept
    tcp = "Failed to open TCP stream: all attempts to connect to 10.0.0.2:7777 failed"
    first = _record("libp2p.transport.tcp.tcp", logging.ERROR, tcp, 1.0)
    assert quiet.filter(first) and quiet.filter(first)  # one record, decided once for every handler
    assert [quiet.filter(_record("libp2p.transport.tcp.tcp", logging.ERROR, tcp, 1.0 + i / 4)) for i in range(40)] == [
        False
    ] * 40
    other = _record("libp2p.network.swarm", logging.WARNING, "something else", 2.0)
    assert quiet.filter(other)  # another kind is not held back by the first
    later = _record("libp2p.transport.tcp.tcp", logging.ERROR, tcp, 62.0)
    assert quiet.filter(later)
    assert later.getMessage() == f"{tcp} (and 40 more like it in 61 s)"

    loud = pangea.Libp2pLogFilter(debug=True)
    assert loud.filter(_record("libp2p.network.auto_connector", logging.INFO, dials, 0.0))
    assert all(loud.filter(_record("libp2p.transport.tcp.tcp", logging.ERROR, tcp, 1.0)) for _ in range(5))


# ---------------------------------------------------------------- options where people type them

ADDRESS = f"/ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}"


@pytest.mark.parametrize(
    "variants",
    [
        [
            ["call", "matmul", "--size", "4096", "--placement", "split-remote", "--json"],
            ["call", "--json", "matmul", "--size", "4096", "--placement", "split-remote"],
            ["call", "matmul", "--json", "--placement", "split-remote", "--size", "4096"],
        ],
        [["call", "status", "--json"], ["call", "--json", "status"]],
        [["call", "peers", "--json"], ["call", "--json", "peers"]],
        [["call", "status", "--rpc", "127.0.0.1:27792"], ["call", "--rpc", "127.0.0.1:27792", "status"]],
        [
            ["call", "--rpc", "127.0.0.1:1", "connect", ADDRESS, "--token-file", "t", "--json"],
            ["call", "connect", ADDRESS, "--rpc", "127.0.0.1:1", "--json", "--token-file", "t"],
            ["call", "--json", "--token-file", "t", "connect", "--rpc", "127.0.0.1:1", ADDRESS],
        ],
        [["call", "--debug", "matmul", "-v"], ["--debug", "-v", "call", "matmul"], ["call", "matmul", "--debug", "-v"]],
        [["status", "-v"], ["-v", "status"]],
        [["status", "--json", "--debug"], ["--debug", "status", "--json"]],
        [["id", "--debug"], ["--debug", "id"]],
        [["doctor", "-v"], ["-v", "doctor"]],
        [["demo", "--size", "64", "-v"], ["-v", "demo", "--size", "64"]],
        [["psk", "f", "--debug"], ["--debug", "psk", "f"]],
        [["bench", "--quick", "-v"], ["-v", "bench", "--quick"]],
        [["serve", "--debug", "--port", "0"], ["--debug", "serve", "--port", "0"]],
        [["respond", ADDRESS, "--json", "-v"], ["-v", "respond", "--json", ADDRESS]],
        [["initiate", "--json", "--debug"], ["--debug", "initiate", "--json"]],
    ],
    ids=lambda variants: " ".join(variants[0]),
)
def test_an_option_parses_the_same_before_or_after_its_verb(variants: list[list[str]]) -> None:
    parser = make_parser()
    parsed = [vars(pangea.parse_command_line(parser, argv)) for argv in variants]
    for argv, namespace in zip(variants[1:], parsed[1:], strict=True):
        assert namespace == parsed[0], argv


def test_an_option_given_twice_keeps_the_last_and_a_later_parser_never_resets_an_earlier_one() -> None:
    parser = make_parser()
    args = pangea.parse_command_line(parser, ["call", "--rpc", "127.0.0.1:1", "status", "--rpc", "127.0.0.1:2"])
    assert args.rpc == "127.0.0.1:2"
    args = pangea.parse_command_line(parser, ["call", "--json", "--rpc", "127.0.0.1:3", "matmul", "--size", "8"])
    assert (args.json, args.rpc, args.size, args.placement) == (True, "127.0.0.1:3", 8, "auto")
    args = pangea.parse_command_line(parser, ["call", "status"])  # every default still there
    assert (args.rpc, args.json, args.token, args.debug, args.verbose) == (
        f"127.0.0.1:{pangea.DEFAULT_RPC_PORT}",
        False,
        None,
        False,
        0,
    )


@pytest.mark.parametrize(
    "argv", [["demo", "--version"], ["status", "--version"], ["call", "matmul", "--version"], ["id", "--version"]]
)
def test_version_after_any_verb_prints_the_version(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert run(argv) == 0
    assert capsys.readouterr().out.startswith(f"pangea {pangea.__version__} (protocol ")


@pytest.mark.parametrize(
    ("argv", "error", "hint"),
    [
        (
            ["serve", "--json"],
            "unrecognized arguments: --json (`serve` has no --json)",
            "hint: --json is an option of `bench`, `call`, `doctor`, `initiate`, `respond`, `status`; "
            "see `pangea.pyz serve --help`",
        ),
        (
            ["serve", "--timeout", "5"],
            "unrecognized arguments: --timeout 5 (`serve` has no --timeout)",
            "hint: --timeout is an option of `bench`, `doctor`, `initiate`, `respond`; see `pangea.pyz serve --help`",
        ),
        (["serve", "--quiet"], "(`serve` has no --quiet)", "hint: --quiet is an option of `initiate`, `respond`; "),
        (
            ["call", "status", "--size", "5"],
            "unrecognized arguments: --size 5 (`call status` has no --size)",
            "hint: --size is an option of `call matmul`, `demo`, `initiate`; see `pangea.pyz call status --help`",
        ),
        (
            ["call", "matmul", "--bogus"],
            "unrecognized arguments: --bogus (`call matmul` has no --bogus)",
            "hint: see `pangea.pyz call matmul --help`",
        ),
        (
            ["--json", "status"],
            "unrecognized arguments: --json (--json is an option of `status`: after it)",
            "hint: pangea.pyz status --json ...; see `pangea.pyz status --help`",
        ),
        (
            ["--rpc", "127.0.0.1:1", "call", "status"],
            "(--rpc is an option of `call status`: after it)",
            "hint: pangea.pyz call status --rpc HOST:PORT ...; see `pangea.pyz call status --help`",
        ),
        (
            ["call", "--size", "8", "matmul"],
            "unrecognized arguments: --size 8 (--size is an option of `call matmul`: after it)",
            "hint: pangea.pyz call matmul --size N ...; see `pangea.pyz call matmul --help`",
        ),
        (["status", "extra"], "unrecognized arguments: extra", "hint: see `pangea.pyz status --help`"),
    ],
)
def test_a_refused_option_names_the_commands_help_and_where_it_goes(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: str, hint: str
) -> None:
    assert run(argv) == 2
    out, lines = error_lines(capsys)
    assert error in lines[0], lines
    assert lines[1].startswith(hint), lines
    assert out == ""


def test_serve_has_no_option_that_means_nothing_to_it() -> None:
    serve = pangea.parser_tree(make_parser())[("serve",)]
    for flag in ("--json", "--timeout", "--quiet"):
        assert flag not in serve._option_string_actions, flag
    for verb in ("initiate", "respond"):  # the runs that end keep them
        parser = pangea.parser_tree(make_parser())[(verb,)]
        assert {"--json", "--timeout", "--quiet"} <= set(parser._option_string_actions), verb


def test_every_command_takes_the_global_options() -> None:
    for words, parser in pangea.parser_tree(make_parser()).items():
        assert {"--version", "--debug", "-v", "--verbose"} <= set(parser._option_string_actions), words
        assert "--debug" in parser.format_help(), words  # and says so in its --help


# ---------------------------------------------------------------- help agrees with the program


def _help(words: tuple[str, ...]) -> str:
    return " ".join(pangea.parser_tree(make_parser())[words].format_help().split())


@pytest.mark.parametrize("words", [("call",), ("call", "matmul")])
def test_call_help_lists_every_placement(words: tuple[str, ...]) -> None:
    text = _help(words)
    for placement in pangea.PLACEMENTS + pangea.SPLIT_PLACEMENTS:
        assert placement in text, (placement, text)
    assert "peer id" in text.lower() or "PEER_ID" in text, text


def test_call_synopsis_lists_every_placement_and_is_the_readmes() -> None:
    for placement in pangea.PLACEMENTS + pangea.SPLIT_PLACEMENTS:
        assert f"{placement}|" in pangea.CALL_SYNOPSIS
    readme = (Path(pangea.__file__).parent / "README.md").read_text()
    assert pangea.CALL_SYNOPSIS.replace("pangea.pyz", "./pangea.pyz", 1) in readme


def test_serve_peer_help_names_the_join_string_of_serve_pair() -> None:
    text = _help(("serve",))
    assert "--peer MULTIADDR|JOIN" in text and "'pangea://...#CODE'" in text and "`serve --pair`" in text, text
    assert "(ps)" in text and f"${pangea.JOIN_ENV} is read by `respond` only" in text, text


def test_no_help_text_speaks_of_issues() -> None:
    import re

    for words, parser in pangea.parser_tree(make_parser()).items():
        text = parser.format_help()
        assert not re.search(r"\bissues?\b|#\d", text, re.IGNORECASE), (words, text)


def test_no_bench_tool_describes_itself_by_an_issue() -> None:
    import ast
    import re

    for path in sorted((Path(pangea.__file__).parent / "bench").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert not re.search(r"\bissue\s*\d", doc.split("\n\n")[0], re.IGNORECASE), path  # its --help description


# ---------------------------------------------------------------- colliding ports, call's exit codes and hints


def _ports(argv: list[str]) -> list[pangea.ListenPort]:
    args = make_parser().parse_args(argv)
    return pangea.node_ports(args, getattr(args, "rpc", None))


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (
            ["serve", "--port", "7920", "--rpc", "127.0.0.1:7921"],
            "cannot serve: the --rpc port 7921 is also the data port (the libp2p port 7920 + 1)",
        ),
        (["serve", "--port", "7920", "--rpc", "0.0.0.0:7920"], "cannot serve: the --rpc port 7920 is also the libp2p"),
        (["serve", "--port", "7920", "--data-port", "7920"], "cannot serve: --data-port 7920 is also the libp2p port"),
        (
            ["initiate", "--port", "7777", "--metrics", "127.0.0.1:7778"],
            "cannot serve: the --metrics port 7778 is also the data port (the libp2p port 7777 + 1)",
        ),
        (
            ["serve", "--port", "0", "--rpc", "127.0.0.1:9000", "--metrics", "localhost:9000"],
            "cannot serve: the --metrics port 9000 is also the RPC port (--rpc 127.0.0.1:9000)",
        ),
    ],
)
def test_port_collision_names_both_options(argv: list[str], problem: str) -> None:
    error = pangea.port_collision("serve", _ports(argv))
    assert error is not None and str(error).startswith(problem), error
    assert error.exit_code == 2 and error.hint and error.hint.startswith("pick another ")


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],  # 7777, data 7778, RPC 7780, metrics any free port
        ["serve", "--port", "0", "--rpc", "127.0.0.1:0", "--data-port", "0", "--metrics", "127.0.0.1:0"],
        ["serve", "--port", "7920", "--rpc", "127.0.0.1:7921", "--data-port", "off"],
        ["serve", "--port", "7920", "--rpc", "127.0.0.1:7921", "--data-port", "7930"],
        ["serve", "--host", "10.0.0.5", "--port", "7920", "--rpc", "127.0.0.1:7921"],  # other addresses
        ["respond", ADDRESS, "--port", "65535"],  # no auto data port past 65535
        ["initiate", "--metrics", "off"],
    ],
)
def test_ports_that_differ_pass(argv: list[str]) -> None:
    assert pangea.port_collision("serve", _ports(argv)) is None


def _no_node(*args: Any) -> int:
    raise AssertionError("a node started")  # a unit test never binds a socket


def test_serve_refuses_colliding_ports_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pangea, "run_trio", _no_node)
    assert run(["serve", "--port", "7920", "--rpc", "127.0.0.1:7921"]) == 2
    _, lines = error_lines(capsys)
    assert lines == [
        "pangea: error: cannot serve: the --rpc port 7921 is also the data port (the libp2p port 7920 + 1)",
        "hint: pick another --rpc port or set --data-port (PORT or off)",
    ]
    assert not (tmp_path / "home").exists()  # no home, no session directory, nothing bound


def test_call_refused_by_the_node_is_a_setup_problem() -> None:
    refused = pangea.RpcError("cannot use the pangea node at 127.0.0.1:1: login refused: wrong or missing RPC token")
    setup = pangea.call_setup_error(refused)
    assert setup.exit_code == 2 and str(setup) == str(refused)
    unreachable = pangea.RpcError("cannot reach the pangea node at 127.0.0.1:1: ConnectionRefusedError")
    assert pangea.call_setup_error(unreachable).exit_code == 1


def test_largest_call_size_fits_the_clients_own_check() -> None:
    for limit in (1 << 20, 64 << 20, pangea.DEFAULT_RPC_MAX_BYTES, pangea.RPC_MAX_MIB << 20):
        n = pangea.largest_call_size(limit)
        room = min(64 << 10, limit // 16)
        assert 2 * n * n * 8 + room <= limit < 2 * (n + 1) * (n + 1) * 8 + room, limit


def test_call_matmul_too_large_names_size_and_rpc_max_mib_not_a_client_setting() -> None:
    with pytest.raises(UsageError) as info:
        pangea.check_call_size(20000, pangea.DEFAULT_RPC_MAX_BYTES, "127.0.0.1:7780")
    assert str(info.value) == (
        "cannot run matmul --size 20000 on the node at 127.0.0.1:7780: its two operands are 6.0 GiB, "
        "over the node's RPC message limit of 1.0 GiB"
    )
    assert info.value.hint == "use --size 8191 or less, or start the node with a larger --rpc-max-mib (at most 4096)"
    pangea.check_call_size(8191, pangea.DEFAULT_RPC_MAX_BYTES, "127.0.0.1:7780")  # fits: no error


# ---------------------------------------------------------------- output that fits the terminal


LONG_DETAIL = f"peer {PEER_ID} (pangea 0.1.0, cpython-311 x86_64 Linux); /noise + /yamux/1.0.0; " + "rtt 2.71 ms; " * 12


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_checks_table_fits_columns_and_json_keeps_the_whole_detail(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    rows = [pangea.CheckRow("connection", True, 0.16, LONG_DETAIL), pangea.CheckRow("matmul", False, 1.5, "x")]
    assert pangea.print_report("initiator", PEER_ID, rows, {}, as_json=True) is False
    out = capsys.readouterr().out.splitlines()
    doc = __import__("json").loads(out[-1])
    assert doc["checks"][0]["detail"] == LONG_DETAIL  # --json: unchanged, one line
    table = out[:-1]
    assert max(len(line) for line in table) <= columns, "\n".join(table)
    head = next(i for i, line in enumerate(table) if line.startswith("check "))
    start = table[head].index("detail")
    body = table[head + 2 : table.index("", head)]
    assert body[-1].startswith("matmul ")
    detail = "".join("".join(line[start:].split()) for line in body[:-1])
    assert detail == "".join(LONG_DETAIL.split())  # every character of the detail, in order


def test_terminal_columns_reads_columns_and_has_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "132")
    assert pangea.terminal_columns() == 132
    monkeypatch.setenv("COLUMNS", "10")
    assert pangea.terminal_columns() == pangea.TERMINAL_MIN_COLUMNS
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert pangea.terminal_columns() == pangea.UNBOUNDED_COLUMNS  # a pipe: whole lines
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert pangea.terminal_columns() >= pangea.TERMINAL_MIN_COLUMNS  # the tty's


def test_serving_line_on_every_interface_says_so_and_names_the_port() -> None:
    addresses = [f"/ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}", f"/ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}"]
    line = pangea.serving_line("0.0.0.0", addresses)
    assert line.startswith("pangea: serving on /ip4/0.0.0.0/tcp/7777, every interface ")
    assert "127.0.0.1" not in line and "2 addresses above" in line
    assert line.endswith("; Ctrl-C or SIGTERM stops")


def test_serving_line_on_one_address_names_it() -> None:
    address = f"/ip4/10.0.0.2/tcp/4001/p2p/{PEER_ID}"
    assert pangea.serving_line("10.0.0.2", [address]) == f"pangea: serving on {address}; Ctrl-C or SIGTERM stops"


def test_timings_text_shows_the_client_the_node_and_the_hop() -> None:
    node = {"queue_s": 0.0, "transfer_s": 0.3, "compute_s": 0.5, "total_s": 0.84}
    text = pangea.timings_text(pangea.client_timings(node, 1.53))
    assert text == "1.530 s at this client (node 0.840 s: compute 0.500 s, transfer 0.300 s; RPC hop 0.690 s)"
    assert pangea.timings_text(node) == "0.840 s (compute 0.500 s, transfer 0.300 s)"  # the node's own only


def test_kernels_table_lists_every_kernel_and_how_it_is_verified() -> None:
    records = [pangea.KernelInfoRecord.from_kernel(k, pangea.Limits(), 1000, 2) for k in pangea.KERNELS.values()]
    text = pangea.kernels_table([r.as_dict() for r in records], 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert lines[0].split() == ["kernel", "operands", "params", "dtypes", "verified", "what"]
    names = [line.split()[0] for line in lines[2:] if line and not line.startswith(" ")]
    assert names[: len(pangea.KERNELS)] == list(pangea.KERNELS)
    random_row = next(line for line in lines if line.startswith("random "))
    assert random_row.split()[1:3] == ["0", "rows,"] and " unverified " in random_row
    assert "Freivalds," in next(line for line in lines if line.startswith("matmul "))
    assert "at most 4 dimensions and 1,000 elements" in text.replace("\n", " ") or "1,000 elements" in text


def test_tasks_table_shows_each_task_and_counts_them_by_state() -> None:
    now = 1_800_000_000.0
    task = {"key": "", "error": "", "result_bytes": 0, "runs": 1, "finished": 0.0}
    tasks = [
        {**task, "task_id": "t-1", "key": "job-7", "kernel": "matmul", "state": "done", "accepted": now - 4000,
         "finished": now - 3990, "result_bytes": 8 << 20, "runs": 2},
        {**task, "task_id": "t-2", "kernel": "add", "state": "failed", "accepted": now - 3, "finished": now - 2.5,
         "error": "bad-input: add: shapes (3,) and (4,)\ndiffer"},
        {**task, "task_id": "t-3", "kernel": "sum", "state": "queued", "accepted": now - 0.25},
        {**task, "task_id": "t-4", "key": "c" + "0f" * 16, "kernel": "add", "state": "running", "accepted": now - 1},
    ]  # fmt: skip
    lines = pangea.tasks_table(tasks, now, 120).splitlines()
    assert lines[0].split() == ["task", "id", "key", "kernel", "state", "age", "took", "result", "error"]
    assert lines[2].split() == ["t-1", "job-7", "matmul", "done", "(run", "2", "times)", "67", "min", "10", "s",
                                "8.0", "MiB", "-"]  # fmt: skip
    assert lines[3].split()[:7] == ["t-2", "-", "add", "failed", "3", "s", "0.5"]
    assert lines[3].endswith("bad-input: add: shapes (3,) and (4,) differ")  # on one line
    assert lines[4].split() == ["t-3", "-", "sum", "queued", "0.25", "s", "-", "-", "-"]
    assert lines[5].split()[:4] == ["t-4", "auto", "add", "running"]  # the key Client made up: not 33 columns
    assert lines[-1] == "4 task(s): 1 queued, 1 running, 1 done, 1 failed"
    assert [pangea.is_auto_key(k) for k in ("c" + "0f" * 16, "c" + "0F" * 16, "c" + "0f" * 15, "job-7", "")] == [
        True, False, False, False, False
    ]  # fmt: skip
    assert pangea.tasks_table([], now) == "no tasks in the node's queue"
    assert [pangea._span_text(s) for s in (-1.0, 0.00174, 0.05, 0.25, 65, 119.4, 3725, 90000)] == [
        "0 s", "1.74 ms", "50 ms", "0.25 s", "65 s", "119 s", "62 min", "25 h"
    ]  # fmt: skip


def test_call_tasks_state_takes_a_list_of_states_and_refuses_others(capsys: pytest.CaptureFixture[str]) -> None:
    args = make_parser().parse_args(["call", "tasks", "--state", "queued, running"])
    assert (args.call, args.state) == ("tasks", frozenset({"queued", "running"}))
    assert make_parser().parse_args(["call", "tasks"]).state is None
    assert run(["call", "tasks", "--state", "finished,done"]) == 2
    _, lines = error_lines(capsys)
    assert lines[0] == (
        "pangea: error: argument --state: bad state 'finished': expected one or more of queued, running, done, "
        "failed, collected, cancelled, separated by commas"
    )
    assert run(["call", "tasks", "--state", ","]) == 2
    assert "bad state ','" in error_lines(capsys)[1][0]


def test_unpacked_builds_names_this_build_and_only_other_pangea_builds(tmp_path: Path) -> None:
    root = tmp_path / "shiv"
    here = root / f"pangea.pyz_{'a' * 64}"
    for build in (here, root / f"pangea.pyz_{'b' * 64}", root / f"renamed.pyz_{'c' * 64}"):
        (build / "site-packages").mkdir(parents=True)
        (build / "site-packages" / "_pangea_build.py").write_text("")
    (root / f"other.pyz_{'d' * 64}" / "site-packages").mkdir(parents=True)  # not pangea: no build stamp
    (root / f"pangea.pyz_{'e' * 64}.tmp" / "site-packages").mkdir(parents=True)  # an unpacking in progress
    found = pangea.unpacked_builds(str(here / "site-packages" / "pangea.py"))
    assert found == (here, [root / f"pangea.pyz_{'b' * 64}", root / f"renamed.pyz_{'c' * 64}"])
    assert pangea.unpacked_builds(str(tmp_path / "src" / "pangea.py")) is None  # from source

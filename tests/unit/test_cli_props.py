"""Property tests of the CLI section of pangea.py: no command line ends in a traceback.

Generated command lines (every verb, its options with hostile values:
negative, zero, NaN, inf, huge, empty, unicode digits, missing values) run
through ``pangea.main(argv)`` in this process with stdin closed. Whatever
they hold, the run ends with exit code 0, 1 or 2, no traceback, and an error
is one ``pangea: error: ...`` line (plus at most one ``hint: ...``). Every
numeric option is parsed by a `NumberOption`, so a bad number is refused
while parsing, before any node starts.

Lines that would start a node always carry one option whose value no
`NumberOption` accepts, so parsing stops there; the verbs that end at once
(id, status, psk, call against a closed port, doctor without a peer) also
run with valid values. The real pyz runs a smaller set
(tests/integration/test_rpc_props.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pangea
from pangea import NumberOption, main, make_parser

# Hostile texts for any option; each NumberOption also gets values just outside its range.
HOSTILE = [
    "-5",
    "-1",
    "0",
    "-0.0",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "infinity",
    "1e400",
    "1e18",
    "9" * 40,
    "",
    " ",
    "x",
    "٣",
    "１２",
    "0x10",
    "1.5",
    "1e3",
    "5 s",
    "\x00",
    "--",
]
# Parsers other than NumberOption that numeric-looking options may use (they raise UsageError themselves).
OTHER_PARSERS = {pangea.parse_data_port, pangea.parse_fault, pangea.task_states}  # not numbers: tested apart


def verb_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser by its words: ("initiate",), ("call", "matmul"), ..."""
    return pangea.parser_tree(make_parser())


PARSERS = verb_parsers()
VERBS = sorted(words for words in PARSERS if words)


def options_of(words: tuple[str, ...]) -> list[argparse.Action]:
    """The options (not positionals, not --help or --version, which end the run at once) of one command."""
    exits = (argparse._HelpAction, argparse._SubParsersAction, pangea._VersionAction)
    return [a for a in PARSERS[words]._actions if a.option_strings and not isinstance(a, exits)]


def number_options(words: tuple[str, ...]) -> list[argparse.Action]:
    return [a for a in options_of(words) if isinstance(a.type, NumberOption)]


def refused_values(kind: NumberOption) -> list[str]:
    """Texts that this option type must refuse."""
    below = kind.low if kind.low_open else kind.low - 1
    above = kind.high + 1 if kind.kind is int else kind.high * 2
    values = [str(int(below)) if kind.kind is int else repr(float(below)), str(above), "nan", "inf", "-inf"]
    values += ["", " ", "x", "١", "1e400", "9" * 400, "0x10"]
    return values + (["1.5", "1e3"] if kind.kind is int else [])


@contextlib.contextmanager
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) as a shell sees it; return (code, stdout, stderr)."""
    with captured() as (out, err):
        try:
            code = main(argv)
        except SystemExit as exc:  # --help, --version
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def assert_tidy(code: int, err: str, argv: list[str]) -> None:
    """Exit 0/1/2, no traceback, an error as one line plus at most a hint."""
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "Exception" not in err, (argv, err)
    lines = err.splitlines()
    if code != 0 and lines and not lines[0].startswith("usage:"):
        errors = [line for line in lines if line.startswith("pangea: error: ")]
        assert len(errors) == 1, (argv, err)
        assert lines[-1] is errors[0] or (lines[-1].startswith("hint: ") and lines[-2] is errors[0]), (argv, err)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A throwaway home, no stdin, as when run from source; no mDNS."""
    monkeypatch.setenv("PANGEA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PANGEA_MDNS", "off")
    monkeypatch.delenv("PANGEA_RPC_TOKEN", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(pangea, "build_info", lambda: None)


# ---------------------------------------------------------------- the option table


def test_every_numeric_option_of_every_command_is_validated() -> None:
    untyped = []
    for words in VERBS + [()]:
        for action in options_of(words):
            if action.type is None or action.type is str or action.type in OTHER_PARSERS:
                continue
            if not isinstance(action.type, NumberOption):
                untyped.append(f"{' '.join(words)} {action.option_strings[-1]}: {action.type!r}")
    assert untyped == []
    assert len([w for w in VERBS if number_options(w)]) >= 7  # initiate, respond, demo, serve, call matmul, ...


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["initiate", "--timeout", "-5"], "--timeout"),
        (["respond", "pangea://x", "--timeout", "-5"], "--timeout"),
        (["initiate", "--timeout", "nan"], "--timeout"),
        (["serve", "--pair-timeout", "inf"], "--pair-timeout"),
        (["initiate", "--task-timeout", "nan"], "--task-timeout"),
        (["respond", "--idle-timeout", "1e400"], "--idle-timeout"),
        (["serve", "--max-payload-mib", "99999999999999999999"], "--max-payload-mib"),
        (["initiate", "--transfer-mib", "0"], "--transfer-mib"),
        (["initiate", "--verify-rounds", "-1"], "--verify-rounds"),
        (["demo", "--size", "100000000"], "--size"),
        (["doctor", "--port", "٣"], "--port"),
        (["bench", "--tcp-port", "70000"], "--tcp-port"),
        (["call", "matmul", "--size", "0"], "--size"),
    ],
)
def test_main_bad_number_is_one_usage_line_naming_option_value_and_form(argv: list[str], option: str) -> None:
    code, out, err = run_main(argv)
    assert code == 2 and out == ""
    assert_tidy(code, err, argv)
    first = err.splitlines()[0]
    assert first.startswith(f"pangea: error: argument {option}: got {argv[-1]!r}; expected "), err


@pytest.mark.parametrize("words", [w for w in VERBS if number_options(w)], ids=" ".join)
def test_every_number_option_refuses_hostile_values(words: tuple[str, ...]) -> None:
    for action in number_options(words):
        assert isinstance(action.type, NumberOption)
        for value in refused_values(action.type):
            argv = [*words, action.option_strings[-1], value]
            code, out, err = run_main(argv)
            assert code == 2, (argv, err)
            assert_tidy(code, err, argv)
            # NOTE: argparse takes "-inf" or "-1e400" for an option, not a value: "expected one argument"
            assert f"argument {action.option_strings[-1]}: " in err, (argv, err)


# ---------------------------------------------------------------- global flags after a verb


@pytest.mark.parametrize(
    "argv", [["status", "--debug"], ["id", "--debug"], ["psk", "{tmp}/f", "-v"], ["doctor", "--debug"]]
)
def test_global_flag_after_a_verb_never_shows_a_traceback(argv: list[str], tmp_path: Path) -> None:
    argv = [word.format(tmp=tmp_path) for word in argv]  # psk writes its file: never in the checkout
    code, _, err = run_main(argv)
    assert_tidy(code, err, argv)
    assert "Traceback" not in err


# ---------------------------------------------------------------- unexpected errors


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(pangea, "cmd_id", broken)
    code, _, err = run_main(["id"])
    assert code == 1
    assert err.splitlines() == [
        "pangea: error: internal error: RuntimeError: boom",
        "hint: run again with --debug for the traceback, and report it",
    ]
    code, _, err = run_main(["--debug", "id"])
    assert code == 1 and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err


def test_an_error_inside_an_exception_group_is_reported_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def grouped(args: argparse.Namespace) -> int:
        raise ExceptionGroup("trio", [ValueError("`seconds` must be non-negative")])

    monkeypatch.setattr(pangea, "cmd_id", grouped)
    code, _, err = run_main(["id"])
    assert (
        code == 1 and err.splitlines()[0] == "pangea: error: internal error: ValueError: `seconds` must be non-negative"
    )

    def grouped_usage(args: argparse.Namespace) -> int:
        raise ExceptionGroup("trio", [pangea.UsageError("bad")])

    monkeypatch.setattr(pangea, "cmd_id", grouped_usage)
    code, _, err = run_main(["id"])
    assert code == 2 and err.splitlines() == ["pangea: error: bad"]


# ---------------------------------------------------------------- generated command lines


def hostile_value() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.text(max_size=12),
    )


@st.composite
def node_command_lines(draw: st.DrawFn) -> list[str]:
    """A command line of any verb with hostile option values, one of them surely refused."""
    words = draw(st.sampled_from([w for w in VERBS if number_options(w)]))
    argv = list(words)
    options = options_of(words)
    for action in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs != 0:
            if draw(st.booleans()) or action is options[-1]:
                argv.append(draw(hostile_value()))
    if draw(st.booleans()):
        argv.insert(len(words), draw(st.text(max_size=20)))  # a positional (an address, a file)
    bad = draw(st.sampled_from(number_options(words)))
    assert isinstance(bad.type, NumberOption)
    argv += [bad.option_strings[-1], draw(st.sampled_from(refused_values(bad.type)))]
    if draw(st.booleans()):
        argv.insert(0, draw(st.sampled_from(["--debug", "-v", "-vv"])))
    return argv


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=node_command_lines())
def test_main_hostile_command_lines_end_tidily(argv: list[str]) -> None:
    code, out, err = run_main(argv)
    assert_tidy(code, err, argv)
    if "--help" not in argv and "-h" not in argv:
        assert code == 2, (argv, code, err)
        assert out == "", (argv, out)


@st.composite
def quick_command_lines(draw: st.DrawFn) -> list[str]:
    """Whole command lines of the verbs that end at once, valid or not."""
    rpc = draw(st.sampled_from(["127.0.0.1:1", "[::1]:1", ":1", "127.0.0.1:99999", "[]:5", "a:b:c", "127.0.0.1:x"]))
    text = st.text(max_size=16)
    choice = draw(st.sampled_from(["id", "status", "psk", "call", "doctor", "respond", "version"]))
    if choice == "id":
        argv = ["id"]
    elif choice == "status":
        argv = ["status", *draw(st.sampled_from([[], ["--json"]]))]
    elif choice == "psk":
        argv = ["psk", draw(st.sampled_from(["", ".", "/", "/nonexistent/dir/key", "\u00e9t\u00e9"]))]
    elif choice == "call":
        sub = draw(st.sampled_from([["status"], ["peers"], ["connect", draw(text)], ["matmul", "--size", "4"], []]))
        argv = ["call", "--rpc", rpc, *draw(st.sampled_from([[], ["--token", draw(text)], ["--json"]])), *sub]
    elif choice == "doctor":
        argv = [
            "doctor",
            "--port",
            str(draw(st.integers(0, 65535))),
            "--json",
            *draw(st.sampled_from([[], [draw(text)]])),
        ]
        if len(argv) == 5 and not argv[-1].strip():
            argv.pop()
    elif choice == "respond":
        argv = ["respond", draw(text), "--code", draw(text)]
    else:
        argv = [draw(st.sampled_from(["--version", "--help", "call", "call --help"]))]
        argv = argv[0].split()
    return argv


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(argv=quick_command_lines())
@example(argv=["respond", "-\r", "--code", ""])  # a CR in an argument once split the error line in two
@example(argv=["call", "status", "--x\n\x1b[2Jy"])
def test_main_quick_commands_end_tidily_with_any_arguments(argv: list[str], tmp_path: Path) -> None:
    if argv[:1] == ["psk"] and argv[1] not in ("", ".", "/") and not argv[1].startswith("/"):
        argv = ["psk", str(tmp_path / argv[1])]
        Path(argv[1]).unlink(missing_ok=True)
    code, _, err = run_main(argv)
    assert_tidy(code, err, argv)

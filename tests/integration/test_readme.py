"""The README is tested: its examples run as written, and its options are the program's.

Every fenced ``sh`` and ``python`` block of README.md, and every ``text`` block
whose lines start with a ``box N:`` prompt (a transcript with commands in it),
is cut into examples: one shell command per line (``box A:`` says on which
machine, ``# or: ...`` is a second way to run the command above it), the
indented lines after a command are the output the README shows for it, and a
python block is one script. The examples run with ``bash -c`` exactly as they
are written, against the built pyz (``./pangea.pyz`` in a directory of its
own, with its own home): one-box examples on 127.0.0.1, two-box examples in
two network namespaces (box 1 or A in one, box 2 or B in the other; each
namespace has its own ports, so the README's ports are used as written).

Placeholders (``12D3KooW...``, ``<B's peer id>``, ``192.168.1.100``, the
pairing code) are replaced by real values of the running nodes through one
explicit table per scenario; what is left in the command must be what the
README says. An example that cannot run as written is in `NOT_RUN` with the
reason; one that runs with a small change (``bench --quick``) is in `CHANGED`
with the reason. `test_readme_every_example_is_run_or_allow_listed` fails when the
README gains an example that no scenario runs, so the README cannot drift
away from this file either.

Each run asserts its exit code and the output lines the README shows (with
peer IDs and timings as wildcards), and a failure names the README line.

The option tests need no process: every ``--option`` the README writes after a
command exists in that command's parser, every option of the program is in
its ``--help``, and every option users need is in the README. The ``--help``
epilogs are searched for examples too (lines that start with ``./pangea.pyz``).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT, NetnsPair, NodeHome, Proc, make_node_home, netns_unavailable_reason
from pyz_helpers import CHECK_NAMES, INITIATOR_READY, pairing_code, peer_id_from

import pangea

README = REPO_ROOT / "README.md"
README_TEXT = README.read_text()
# One command or script may take this long; bench --quick and the 4096 split matmul are the slowest.
RUN_TIMEOUT_S = 180.0
PAIR_TIMEOUT_S = 120.0

# ---------------------------------------------------------------------------
# Pure part: cutting README.md into examples
# ---------------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\s*$")
PROMPT = re.compile(r"^box (\w+):\s+(.*)$")
ALTERNATIVE = re.compile(r"^#\s*or:\s+(.*)$")
# What a README placeholder looks like; none may be left in a command after substitution.
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>|12D3KooW\.\.\.|#CODE\b")


@dataclass(frozen=True)
class Example:
    """One command (or python script) of the README and the output lines shown after it."""

    line: int  # README line number (1-based) of the command, or of the python block's fence
    kind: str  # "sh" or "python"
    text: str  # the command or script, as written
    box: str | None = None  # "1", "2", "A", "B" for a two-box example
    expected: tuple[str, ...] = ()  # output lines the README shows after it
    source: str = "README.md"  # or the --help whose epilog shows it

    def where(self) -> str:
        """How a failure names it."""
        box = f"box {self.box}: " if self.box else ""
        return f"{self.source} line {self.line} ({box}{self.text.splitlines()[0]!r})"


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line of the first body line, language, body lines) of every fenced block."""
    blocks: list[tuple[int, str, list[str]]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        blocks.append((index + 2, opened.group(1), lines[index + 1 : end]))
        index = end + 1
    return blocks


def block_examples(first_line: int, lang: str, body: Sequence[str]) -> list[Example]:
    """The examples of one fenced block (none for a transcript without prompts)."""
    if lang == "python":
        return [Example(first_line - 1, "python", "\n".join(body) + "\n")]
    if lang not in ("sh", "text"):
        return []
    prompted = any(PROMPT.match(line) for line in body)
    if lang == "text" and not prompted:
        return []  # a transcript of output only
    found: list[Example] = []
    for offset, raw in enumerate(body):
        line_no = first_line + offset
        if not raw.strip():
            continue
        prompt = PROMPT.match(raw)
        alternative = ALTERNATIVE.match(raw.strip())
        if prompt:
            found.append(Example(line_no, "sh", prompt.group(2).strip(), prompt.group(1)))
        elif alternative and found:
            found.append(Example(line_no, "sh", alternative.group(1).strip(), found[-1].box))
        elif raw[0].isspace() and found:
            last = found[-1]
            found[-1] = Example(last.line, last.kind, last.text, last.box, (*last.expected, raw.strip()))
        else:
            found.append(Example(line_no, "sh", raw.strip()))
    return found


def readme_examples(text: str) -> list[Example]:
    """Every example of the README, in order."""
    return [ex for first, lang, body in fenced_blocks(text) for ex in block_examples(first, lang, body)]


def substitute(text: str, table: Mapping[str, str]) -> str:
    """Replace the README's placeholders by real values, longest first; none may be left."""
    for key in sorted(table, key=len, reverse=True):
        text = text.replace(key, table[key])
    return text


def placeholders_left(text: str) -> list[str]:
    """The placeholders still in a command (a substitution table missing an entry)."""
    return PLACEHOLDER.findall(text)


def expected_pattern(line: str, table: Mapping[str, str]) -> re.Pattern[str]:
    """A README output line as a pattern: its placeholders replaced, peer IDs and timings as wildcards."""
    pattern = re.escape(substitute(line, table))
    pattern = pattern.replace(re.escape("12D3KooW..."), r"12D3KooW\w+")
    pattern = re.sub(r"\d+\\\.\d+", r"\\d+\\.\\d+", pattern)
    return re.compile(rf"^\s*{pattern}\s*$")


def command_words(tokens: Sequence[str], tree: Mapping[tuple[str, ...], argparse.ArgumentParser]) -> tuple[str, ...]:
    """The (sub-)command a README command line names: ("call", "matmul"), ("serve",), or () for none."""
    words: tuple[str, ...] = ()
    for token in tokens:
        if token.startswith("-") or not token.isidentifier():
            continue
        if (*words, token) in tree:
            words = (*words, token)
        elif words:
            break
    return words


OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def options_in(text: str) -> list[str]:
    """The option names (--name, -v) written in a piece of text, without values."""
    return OPTION.findall(text)


def epilog_examples(tree: Mapping[tuple[str, ...], argparse.ArgumentParser]) -> list[Example]:
    """Every line of a --help epilog that starts with ``./pangea.pyz`` (or ``$ ./pangea.pyz``)."""
    found = []
    for words, parser in tree.items():
        for number, line in enumerate((parser.epilog or "").splitlines(), 1):
            if line.strip().startswith(("./pangea.pyz ", "$ ./pangea.pyz ")):
                where = f"`{' '.join(('pangea.pyz', *words))} --help` epilog"
                found.append(Example(number, "sh", line.strip().removeprefix("$ "), source=where))
    return found


def test_readme_examples_are_cut_from_blocks_with_prompts_outputs_and_alternatives() -> None:
    text = "\n".join(
        [
            "```text",
            "box 1:  ./pangea.pyz initiate",
            "        Pairing code: 4E5Q",
            "",
            "box 2:  ./pangea.pyz respond 'x'",
            "        # or: ./pangea.pyz respond y --code 4E5Q",
            "```",
            "```text",
            "bulk upload 64 MiB   1282 MB/s",
            "```",
            "```sh",
            "./pangea.pyz bench    # comment",
            "```",
            "```python",
            "import pangea",
            "```",
        ]
    )
    assert readme_examples(text) == [
        Example(2, "sh", "./pangea.pyz initiate", "1", ("Pairing code: 4E5Q",)),
        Example(5, "sh", "./pangea.pyz respond 'x'", "2"),
        Example(6, "sh", "./pangea.pyz respond y --code 4E5Q", "2"),
        Example(12, "sh", "./pangea.pyz bench    # comment"),
        Example(14, "python", "import pangea\n"),
    ]


def test_help_epilog_examples_are_found() -> None:
    root = argparse.ArgumentParser(prog="pangea.pyz")
    sub = root.add_subparsers(dest="verb").add_parser("call", epilog="e.g.\n  $ ./pangea.pyz call status\nnot this")
    assert sub.epilog
    (found,) = epilog_examples(pangea.parser_tree(root))
    assert found == Example(2, "sh", "./pangea.pyz call status", source="`pangea.pyz call --help` epilog")


def test_readme_substitution_and_expected_patterns() -> None:
    table = {"12D3KooW...": "12D3KooWAbc", "<B's ip>": "10.0.0.2", "#CODE": "#XYZ"}
    assert substitute("serve --peer /ip4/<B's ip>/tcp/7777/p2p/12D3KooW...", table) == (
        "serve --peer /ip4/10.0.0.2/tcp/7777/p2p/12D3KooWAbc"
    )
    assert placeholders_left("call --peer /p2p/<B's peer id> 12D3KooW... 'pangea://x#CODE'") == [
        "<B's peer id>",
        "12D3KooW...",
        "#CODE",
    ]
    assert placeholders_left("respond - # <- here") == []  # "<-" is no placeholder
    pattern = expected_pattern("2048x2048 matmul ran on 12D3KooW... in 1.312 s: verified", {})
    assert pattern.match("  2048x2048 matmul ran on 12D3KooWxyz9 in 0.5 s: verified")
    assert not pattern.match("2048x2048 matmul ran on local in 0.5 s: verified")
    assert expected_pattern("valid 60 s", {}).match("valid 60 s") and not expected_pattern("valid 60 s", {}).match(
        "valid 61 s"
    )


# ---------------------------------------------------------------------------
# Which example runs where: every example is claimed by a scenario or NOT_RUN
# ---------------------------------------------------------------------------

# Examples that are not run, by the start of their text, with the reason. Keep it short.
NOT_RUN = {
    "./build.sh test": "runs the whole test suite, this file included (CI runs it: .ci/run)",
    "./build.sh --python": "builds for another target from downloaded wheels (minutes, needs PyPI); "
    "tests/integration/test_cross_target.py builds the cp312 one",
    ".build/venv/bin/python bench/": "a benchmark of minutes, not a test; its options are checked "
    "against its --help (test_readme_options_of_the_developer_tools_exist)",
}
# Examples run with a change, by (start of the example, box): (old text, new text, why).
CHANGED = {
    ("./build.sh && ./pangea.pyz demo", None): ("./build.sh && ", "", "the build ran already: the test runs its pyz"),
    ("./pangea.pyz bench ", None): ("bench ", "bench --quick ", "the full run takes ~40 s: the --quick it names"),
    ("./pangea.pyz bench 'pangea://", "1"): ("bench ", "bench --quick ", "the full run takes ~40 s: --quick"),
    ("./pangea.pyz bench /ip4/", "1"): ("bench ", "bench --quick ", "the full run takes ~40 s: --quick"),
}
# Scenario of each runnable example, by (start of its text, its box).
SCENARIOS = {
    ("./build.sh && ./pangea.pyz demo", None): "demo",
    ("./pangea.pyz initiate", "1"): "pair",
    ("./pangea.pyz respond 'pangea://", "2"): "pair",
    ("./pangea.pyz respond /ip4/", "2"): "pair",
    ("./pangea.pyz id", "B"): "serve",
    ("./pangea.pyz id", "A"): "serve",
    ("./pangea.pyz serve --allow-peer", "B"): "serve",
    ("./pangea.pyz serve --peer", "A"): "serve",
    ("./pangea.pyz call matmul --size 2048", "A"): "serve",
    ("import numpy as np", None): "serve",
    ("import concurrent.futures", None): "serve",
    ("import numpy as np\nimport pangea\n\nwith pangea.Client() as node:", None): "serve",
    ("./pangea.pyz call matmul --size 4096", None): "serve",
    ("./pangea.pyz bench /ip4/", "1"): "serve",
    ("./pangea.pyz bench ", None): "bench",
    ("./pangea.pyz bench --listen", "2"): "bench",
    ("./pangea.pyz bench 'pangea://", "1"): "bench",
}


def _entry(example: Example, table: Mapping[tuple[str, str | None], object]) -> tuple[str, str | None] | None:
    """The key of ``table`` for an example: the longest start it begins with, for its box."""
    keys = [k for k in table if k[1] == example.box and example.text.startswith(k[0])]
    return max(keys, key=lambda k: len(k[0])) if keys else None


def scenario_of(example: Example) -> str | None:
    """The scenario that runs an example, or None."""
    key = _entry(example, SCENARIOS)
    return SCENARIOS[key] if key else None


def not_run_reason(example: Example) -> str | None:
    return next((why for start, why in NOT_RUN.items() if example.text.startswith(start)), None)


def as_run(example: Example, table: Mapping[str, str]) -> str:
    """The command to run: CHANGED applied (it must still apply), then the placeholders substituted."""
    text = example.text
    key = _entry(example, CHANGED)
    if key is not None:
        old, new, _why = CHANGED[key]
        assert old in text, f"{example.where()}: the CHANGED entry {old!r} no longer applies"
        text = text.replace(old, new, 1)
    text = substitute(text, table)
    left = placeholders_left(text)
    assert not left, f"{example.where()}: placeholders {left} have no value in the substitution table"
    return text


EXAMPLES = readme_examples(README_TEXT)
TREE = pangea.parser_tree(pangea.make_parser())
# Verbs whose examples end by themselves (the others wait for a peer or run until stopped).
ENDING_VERBS = {"call", "id", "status", "doctor"}


def examples_of(scenario: str) -> list[Example]:
    return [ex for ex in EXAMPLES if scenario_of(ex) == scenario]


def test_readme_every_example_is_run_or_allow_listed() -> None:
    unclaimed = [ex.where() for ex in EXAMPLES if scenario_of(ex) is None and not_run_reason(ex) is None]
    assert not unclaimed, "README examples that no scenario runs (add them to SCENARIOS or NOT_RUN):\n" + "\n".join(
        unclaimed
    )
    twice = [ex.where() for ex in EXAMPLES if scenario_of(ex) is not None and not_run_reason(ex) is not None]
    assert not twice, twice
    # Each entry of the tables still matches something, so they cannot rot.
    for (start, box), _ in SCENARIOS.items():
        assert any(ex.text.startswith(start) and ex.box == box for ex in EXAMPLES), f"no README example {start!r}"
    for start in NOT_RUN:
        assert any(ex.text.startswith(start) for ex in EXAMPLES), f"no README example {start!r} (NOT_RUN)"
    for start, box in CHANGED:
        assert (start, box) in SCENARIOS, f"CHANGED {start!r} is run by no scenario"


# ---------------------------------------------------------------------------
# Running examples: a box is a directory with ./pangea.pyz and its own home
# ---------------------------------------------------------------------------


@dataclass
class Box:
    """One "machine" of the README: ./pangea.pyz in its directory, its own home, maybe a namespace."""

    home: NodeHome
    netns: str | None = None

    @property
    def dir(self) -> Path:
        return self.home.root

    def argv(self, command: str) -> list[str]:
        """``bash -c COMMAND`` in this box (inside its namespace, if it has one)."""
        argv = ["bash", "-c", command]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


def make_box(pyz: Path, base: Path, name: str, netns: str | None = None) -> Box:
    home = make_node_home(base, name)
    (home.root / "pangea.pyz").symlink_to(pyz.resolve())
    return Box(home, netns)


def run_example(
    box: Box, example: Example, table: Mapping[str, str], timeout: float = RUN_TIMEOUT_S
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Run an example to its end in ``box``: (the command as run, its result)."""
    command = as_run(example, table)
    result = subprocess.run(
        box.argv(command),
        cwd=box.dir,
        env=box.home.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return command, result


def start_example(box: Box, example: Example, table: Mapping[str, str], name: str) -> Proc:
    """Start an example that keeps running (initiate, serve, bench --listen) in ``box``."""
    return Proc(box.argv(as_run(example, table)), env=box.home.env, cwd=box.dir, name=name)


def show(example: Example, command: str, rc: int | None, stdout: Sequence[str], stderr: Sequence[str]) -> str:
    return "\n".join(
        [f"{example.where()}, run as {command!r}: exit {rc}", "----- stdout:", *stdout, "----- stderr:", *stderr]
    )


def assert_shows(example: Example, lines: Sequence[str], table: Mapping[str, str], context: str) -> None:
    """The output lines the README shows after the example appear in ``lines``, in that order."""
    position = 0
    for shown in example.expected:
        pattern = expected_pattern(shown, table)
        hits = [i for i in range(position, len(lines)) if pattern.match(lines[i])]
        assert hits, f"the README shows {shown!r} after it; the program did not print that (in order):\n{context}"
        position = hits[0] + 1


def assert_ran(
    example: Example, command: str, result: subprocess.CompletedProcess[str], table: Mapping[str, str], rc: int = 0
) -> list[str]:
    """Exit code ``rc`` and the README's output lines; returns the stdout lines."""
    out, err = result.stdout.splitlines(), result.stderr.splitlines()
    context = show(example, command, result.returncode, out, err)
    assert result.returncode == rc, f"expected exit {rc}\n{context}"
    assert "Traceback" not in result.stderr, context
    assert_shows(example, out, table, context)
    return out


def table_rows(text: str, header: str) -> list[tuple[int, list[str]]]:
    """(README line, cells) of the rows of the table whose header starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for index in range(start + 2, len(lines)):
        if not lines[index].startswith("|"):
            break
        rows.append((index + 1, [cell.strip() for cell in re.split(r"(?<!\\)\|", lines[index])[1:-1]]))
    return rows


README_CHECKS = [cells[0] for _, cells in table_rows(README_TEXT, "| check | what it shows |")]


def bench_rows() -> list[re.Pattern[str]]:
    """The row labels of the README's `bench` transcript, sizes as wildcards."""
    block = next(body for _, lang, body in fenced_blocks(README_TEXT) if lang == "text" and body[0].startswith("bulk "))
    labels = [re.split(r"\s{2,}", line.strip())[0] for line in block]
    patterns = [re.sub(r"\\d\+\\ [GM]iB", r"\\d+\\ [KMG]iB", re.sub(r"\d+", r"\\d+", re.escape(x))) for x in labels]
    return [re.compile(rf"^\s*{pattern}\s{{2,}}") for pattern in dict.fromkeys(patterns)]


@pytest.fixture(scope="module")
def namespaces() -> Iterator[NetnsPair]:
    """Two namespaces for the two-box examples, shared by this file's tests (one scenario at a time)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsPair() as pair:
        yield pair


def two_boxes(pyz: Path, tmp_path: Path, pair: NetnsPair) -> tuple[Box, Box]:
    """Box 1 (or A) in namespace a, box 2 (or B) in namespace b."""
    return make_box(pyz, tmp_path, "box-a", pair.ns_a), make_box(pyz, tmp_path, "box-b", pair.ns_b)


def box_of(example: Example, a: Box, b: Box) -> Box:
    return a if example.box in ("1", "A", None) else b


# ---------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------


def test_readme_demo_runs_on_one_box(pyz: Path, tmp_path: Path) -> None:
    (example,) = examples_of("demo")
    box = make_box(pyz, tmp_path, "box")
    command, result = run_example(box, example, {})
    out = assert_ran(example, command, result, {})
    context = show(example, command, result.returncode, out, result.stderr.splitlines())
    for name in README_CHECKS:  # the README's check table: both nodes ran every one of them
        assert any(re.match(rf"^initiator \| {re.escape(name)}\s", line) for line in out), f"no {name!r}\n{context}"


def pair_table(pair: NetnsPair, initiator: Proc) -> dict[str, str]:
    """The pairing transcript's placeholders, from what the initiator really printed."""
    code = pairing_code(initiator.stdout_lines)
    return {
        "12D3KooW...": peer_id_from(initiator.stdout_lines, "initiator"),
        "192.168.1.100": pair.addr_a,
        "4E5Q-ZNFD-YK3N": code,
        "4E5QZNFDYK3N": code.replace("-", ""),
    }


@pytest.mark.netns
@pytest.mark.slow
def test_readme_two_machines_pair_as_written(pyz: Path, tmp_path: Path, namespaces: NetnsPair) -> None:
    a, b = two_boxes(pyz, tmp_path, namespaces)
    initiate, *responds = examples_of("pair")
    assert initiate.box == "1" and [r.box for r in responds] == ["2", "2"], examples_of("pair")
    for respond in responds:  # the join string, then the multiaddr with --code: a pairing each
        with start_example(a, initiate, {}, "initiate@box1") as initiator:
            initiator.wait_for_line(INITIATOR_READY, stream="stdout", timeout=60)
            table = pair_table(namespaces, initiator)
            context = show(initiate, initiate.text, None, initiator.stdout_lines, initiator.stderr_lines)
            assert_shows(initiate, initiator.stdout_lines, table, context)
            command, result = run_example(b, respond, table, timeout=PAIR_TIMEOUT_S)
            assert_ran(respond, command, result, table)
            rc = initiator.wait(timeout=PAIR_TIMEOUT_S)
            context = show(initiate, initiate.text, rc, initiator.stdout_lines, initiator.stderr_lines)
            assert rc == 0, f"the README: exit code 0 only when every check passed\n{context}"
        for name in README_CHECKS:
            assert any(line.startswith(name + " ") for line in initiator.stdout_lines), f"no {name!r}\n{context}"
    assert README_CHECKS == CHECK_NAMES


def wait_for_peers(box: Box, count: int, timeout: float = 60.0) -> list[dict[str, object]]:
    """Poll `call --json peers` in ``box`` until it lists ``count`` peers (test plumbing, not an example)."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            box.argv("./pangea.pyz call --json peers"),
            cwd=box.dir,
            env=box.home.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode == 0:
            peers = json.loads(result.stdout.splitlines()[-1])
            peers = peers.get("peers", peers) if isinstance(peers, dict) else peers
            if len(peers) >= count:
                return list(peers)
        if time.monotonic() > deadline:
            raise AssertionError(f"box {box.netns}: not {count} peer(s) within {timeout:g} s\n{result}")
        time.sleep(0.5)


@pytest.mark.netns
@pytest.mark.slow
def test_readme_serve_call_and_the_python_client_as_written(pyz: Path, tmp_path: Path, namespaces: NetnsPair) -> None:
    a, b = two_boxes(pyz, tmp_path, namespaces)
    ids = [ex for ex in examples_of("serve") if ex.text.startswith("./pangea.pyz id")]
    table: dict[str, str] = {"<B's ip>": namespaces.addr_b, "<ip>": namespaces.addr_b}
    for example in ids:  # box B's, then box A's: "prints B's peer id"
        box = box_of(example, a, b)
        command, result = run_example(box, example, table)
        (peer_id,) = assert_ran(example, command, result, table)
        assert re.fullmatch(r"12D3KooW\w+", peer_id), show(example, command, 0, [peer_id], [])
        table[f"<{example.box}'s peer id>"] = peer_id
    table["<id>"] = table["12D3KooW..."] = table["<B's peer id>"]

    serve_b, serve_a = (ex for ex in examples_of("serve") if ex.text.startswith("./pangea.pyz serve"))
    with start_example(b, serve_b, table, "serve@B") as node_b:
        node_b.wait_for_line(r"^pangea: serving on /ip4/", stream="stdout", timeout=60)
        address_b = f"/ip4/{namespaces.addr_b}/tcp/7777/p2p/{table['<id>']}"
        context = show(serve_b, serve_b.text, None, node_b.stdout_lines, node_b.stderr_lines)
        assert any(line.strip() == address_b for line in node_b.stdout_lines), f"prints B's addresses\n{context}"
        with start_example(a, serve_a, table, "serve@A") as node_a:
            node_a.wait_for_line(r"^pangea: serving on /ip4/", stream="stdout", timeout=60)
            wait_for_peers(a, 1)
            for example in examples_of("serve"):
                if example.text.startswith(("./pangea.pyz id", "./pangea.pyz serve")):
                    continue
                run_in_serve_scenario(example, a, table)
            # The --help epilogs' examples of commands that end by themselves run here too (exit 0).
            for example in epilog_examples(TREE):
                if example.text.split()[1] in ENDING_VERBS:
                    command, result = run_example(a, example, table)
                    assert_ran(example, command, result, table)
        assert node_b.returncode is None, node_b.output()


def run_in_serve_scenario(example: Example, a: Box, table: Mapping[str, str]) -> None:
    """The examples run on box A while A's serve node holds a session with B's."""
    peer_b = table["<B's peer id>"]
    if example.kind == "python":  # as the README says: SHIV_INTERPRETER=1 ./pangea.pyz script.py
        (a.dir / "script.py").write_text(example.text)
        script = Example(example.line, "sh", "SHIV_INTERPRETER=1 ./pangea.pyz script.py")
        command, result = run_example(a, script, table)
        out = assert_ran(example, command, result, table)
        context = show(example, command, 0, out, result.stderr.splitlines())
        if example.text.startswith("import concurrent.futures"):  # futures and map
            assert out[:4] == [f"{peer_b} True (500, 500)"] * 4, (
                f"each future ran on B, with its own timings\n{context}"
            )
            assert out[4:] == ["8 (10,) True"], context
            return
        if "node.array(" in example.text:  # arrays that stay remote: x, y and s held, numpy's error
            assert re.fullmatch(r"RemoteArray\(shape=\(500, 500\), dtype=float64, on [\d.]+:\d+\) 3", out[0]), context
            assert out[1].startswith("matmul: Input operand 1 has a mismatch in its core dimension 0"), context
            return
        if "placement=worker" in example.text:  # arrays held on a worker (B): run there, checked on asking
            assert out == ["True unverified", "recompute True True"], context
            return
        if 'placement="split"' in example.text:  # element-wise by rows, batched matmul by its stack
            assert out == ["True (64, 32, 16) split"], context
            return
        if "node.result(" in example.text:  # the durable queue: collected by its key from another Client
            assert out == ["True ['collected']"], f"the task ran on after its Client closed\n{context}"
            return
        if "node.empty(" in example.text:  # operands without a copy
            assert out == ["True 0 True"], f"an empty() array, a result and a view are not copied\n{context}"
            return
        assert out[0].startswith(f"{peer_b} "), f"placement='remote' runs on a connected peer (B)\n{context}"
        assert out[1] == "(1000,)", context
        assert peer_b in out[2], context
        return
    command, result = run_example(a, example, table)
    out = assert_ran(example, command, result, table)
    context = show(example, command, 0, out, result.stderr.splitlines())
    assert not any(line.startswith("ran locally") for line in out), context
    if "--placement remote" in command:
        assert any(f"ran on {peer_b} " in line for line in out), context
    elif "split-remote" in command:  # shares per worker in "attempts": split-remote uses the peers only
        attempts = json.loads(out[-1])["attempts"]
        assert attempts and all(peer_b in json.dumps(attempt) for attempt in attempts), context
    elif command.startswith("./pangea.pyz bench"):  # a serve node: pangea's figures only, no baselines
        assert_bench_rows(out, context, baselines=False)
        assert any(line.startswith("Baseline skipped: ") for line in out), context


def assert_bench_rows(out: Sequence[str], context: str, *, baselines: bool = True) -> None:
    """Every row of the README's bench transcript is in the output (without baselines: no "vs raw TCP")."""
    for row in bench_rows():
        if not baselines and "raw" in row.pattern:
            continue
        assert any(row.search(line) for line in out), f"no row {row.pattern!r} of the README's bench table\n{context}"


@pytest.mark.slow
def test_readme_bench_on_one_box(pyz: Path, tmp_path: Path) -> None:
    (example,) = examples_of("bench")[:1]
    command, result = run_example(make_box(pyz, tmp_path, "box"), example, {})
    out = assert_ran(example, command, result, {})
    assert_bench_rows(out, show(example, command, 0, out, result.stderr.splitlines()))


@pytest.mark.netns
@pytest.mark.slow
def test_readme_bench_between_two_boxes(pyz: Path, tmp_path: Path, namespaces: NetnsPair) -> None:
    a, b = two_boxes(pyz, tmp_path, namespaces)
    listen, join = examples_of("bench")[1:]
    with start_example(b, listen, {}, "bench-listen@box2") as listener:
        printed = listener.wait_for_line(r"^Join string: (pangea://\S+)$", stream="stdout", timeout=60).group(1)
        peer_id, code = re.fullmatch(r"pangea://\S+/p2p/(\w+)#(\w+)", printed).groups()  # type: ignore[union-attr]
        table = {"192.168.1.20": namespaces.addr_b, "12D3KooW...": peer_id, "#CODE": f"#{code}"}
        assert substitute(join.text, table).split("'")[1] == printed, f"{join.where()}: the README's form\n{printed}"
        command, result = run_example(a, join, table)
        out = assert_ran(join, command, result, table)
        assert_bench_rows(out, show(join, command, 0, out, result.stderr.splitlines()))
        rc = listener.wait(timeout=60)
        assert rc == 0, f"{listen.where()}: serves one benchmarker, exits\n{listener.output()}"


# ---------------------------------------------------------------------------
# Options: the README's are the program's, the program's are in --help and the README
# ---------------------------------------------------------------------------

# Options of the program the README need not name, with the reason.
NOT_IN_README = {
    "-h": "argparse's, shown in every usage line (the README says --help)",
    "--verbose": "the long form of -v, which the README uses",
}
# Options the README writes that belong to other programs than pangea.pyz, with the program.
FOREIGN = {
    "--only-binary": "pip download",
    "--python-version": "pip download",
    "--implementation": "pip download",
    "--no-deps": "pip wheel",
}


def options_of(words: tuple[str, ...]) -> set[str]:
    return {option for action in TREE[words]._actions for option in action.option_strings}


def prose(text: str) -> str:
    """The README without its fenced blocks (their lines blanked, so line numbers stay)."""
    lines = text.splitlines()
    for first, _, body in fenced_blocks(text):
        for index in range(first - 2, first - 1 + len(body) + 1):
            lines[index] = ""
    return "\n".join(lines)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def written_commands(text: str) -> list[tuple[int, tuple[str, ...], str]]:
    """(README line, command words, the text after them) of every command the README writes:
    the examples, and code spans in the prose that start with a verb (``call --json peers``);
    a span listing alternatives (``call ... status | peers | matmul --size N``) is one command each."""
    found: list[tuple[int, tuple[str, ...], str]] = []

    def add(line: int, written: str) -> None:
        tokens = written.split()
        while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
            tokens = tokens[1:]  # SHIV_INTERPRETER=1 ./pangea.pyz ...
        if tokens and tokens[0] in ("./pangea.pyz", "pangea.pyz"):
            tokens = tokens[1:]
        if not tokens or (tokens[0],) not in TREE:
            return
        cut = next((i for i, t in enumerate(tokens) if t.startswith("#")), len(tokens))
        words = command_words(tokens[:cut], TREE)
        found.append((line, words, " ".join(tokens[:cut])))

    for example in EXAMPLES:
        if example.kind == "sh":
            add(example.line, example.text)
    body = prose(text)
    for span in re.finditer(r"`([^`]+)`", body):
        head, *alternatives = span.group(1).split(" | ")
        add(line_of(body, span.start()), head)
        verb = head.split()[1] if head.startswith("./pangea.pyz ") else head.split()[0]
        for alternative in alternatives:
            add(line_of(body, span.start()), f"{verb} {alternative}")
    return found


def test_readme_options_exist_in_the_command_they_are_written_with() -> None:
    wrong = []
    for line, words, written in written_commands(README_TEXT):
        for option in options_in(written):
            if option not in options_of(words):
                wrong.append(f"README.md line {line}: {option} is no option of `{' '.join(words)}` ({written!r})")
    # The tables name the commands in one column and their options in another.
    node_verbs: list[tuple[str, ...]] = [("initiate",), ("respond",), ("serve",)]
    for line, (commands, options) in table_rows(README_TEXT, "| command | options |"):
        verbs: list[tuple[str, ...]] = [(w,) for w in re.findall(r"`(\w+)", commands)] or [()]
        for option in options_in(options):
            wrong += [
                f"README.md line {line}: {option} is no option of {v}" for v in verbs if option not in options_of(v)
            ]
    tables: list[tuple[str, list[tuple[str, ...]]]] = [
        ("| option of `serve` |", [("serve",)]),
        ("| option | default |", node_verbs),
    ]
    for header, verbs in tables:
        for line, cells in table_rows(README_TEXT, header):
            for option in options_in(cells[0]):
                wrong += [
                    f"README.md line {line}: {option} is no option of {v}" for v in verbs if option not in options_of(v)
                ]
    assert not wrong, "\n".join(wrong)


def test_readme_every_option_written_is_an_option_of_some_program() -> None:
    ours = {option for words in TREE for option in options_of(words)}
    tools = set(options_in(developer_help()))
    unknown = [
        f"README.md line {line_of(README_TEXT, m.start())}: {m.group(1)}"
        for m in OPTION.finditer(README_TEXT)
        if m.group(1).startswith("--") and m.group(1) not in ours | tools | set(FOREIGN)
    ]
    assert not unknown, "options no program has:\n" + "\n".join(unknown)


@functools.cache
def developer_help() -> str:
    """The --help of build.sh and of the bench scripts the README shows (run by this venv's Python)."""
    texts = []
    for argv in (
        ["./build.sh", "--help"],
        [sys.executable, "bench/bench.py", "--help"],
        [sys.executable, "bench/workers.py", "--help"],
        [sys.executable, "bench/client_path.py", "--help"],
        [sys.executable, "bench/client_tls.py", "--help"],
        [sys.executable, "bench/client_rss.py", "--help"],
        [sys.executable, "bench/warm_transfer.py", "--help"],
        [sys.executable, "bench/pipeline.py", "--help"],
        [sys.executable, "bench/compression.py", "--help"],
        [sys.executable, "bench/task_queue.py", "--help"],
    ):
        result = subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        texts.append(result.stdout + result.stderr)
    return "\n".join(texts)


def test_readme_options_of_the_developer_tools_exist() -> None:
    known = set(options_in(developer_help()))
    for example in EXAMPLES:
        if not_run_reason(example) and example.text.startswith(("./build.sh", ".build/venv/bin/python bench/")):
            missing = [o for o in options_in(example.text.split("#")[0]) if o not in known]
            assert not missing, f"{example.where()}: {missing} not in the tool's --help"


def test_every_option_of_the_program_is_in_its_help() -> None:
    for words, parser in TREE.items():
        text = parser.format_help()
        for action in parser._actions:
            assert action.help != argparse.SUPPRESS, f"`{' '.join(words)}` hides {action.option_strings} from --help"
            for option in action.option_strings:
                assert option in text, f"{option} missing from `{' '.join(words)} --help`"


def test_options_users_need_are_in_the_readme() -> None:
    missing = sorted(
        {
            f"{option} (of `{' '.join(words) or 'pangea.pyz'}`)"
            for words in TREE
            for option in options_of(words)
            if option not in NOT_IN_README and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README_TEXT)
        }
    )
    assert not missing, "options of the program the README does not name:\n" + "\n".join(missing)


def test_help_epilog_examples_are_commands_the_program_takes() -> None:
    """Every epilog example parses; those that end by themselves also run, in the serve scenario."""
    parser = pangea.make_parser()
    for example in epilog_examples(TREE):
        try:
            parser.parse_args(shlex.split(example.text.split(" #")[0])[1:])
        except SystemExit as exit:
            raise AssertionError(f"{example.where()}: exit {exit.code}") from None

"""Errors: every error kind is a member of ErrorKind, and the members keep their wire strings."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pangea
from pangea import RETRYABLE_KINDS, ErrorKind, PangeaError

SOURCE = Path(pangea.__file__).read_text(encoding="utf-8")

# The strings the wire, the RPC and the JSON output have always carried; a rename breaks older peers.
WIRE_KINDS = {
    "bad-input",
    "refused",
    "busy",
    "unavailable",
    "deadline",
    "internal",
    "wrong-result",
    "disconnected",
    "timeout",
    "unreachable",
    "incompatible",
    "duplicate-identity",
    "identity-in-use",
    "unsolicited",
    "protocol",
    "failed",
    "not-found",
    "lost",
}


def test_error_kind_values_are_unique() -> None:
    values = [member.value for member in ErrorKind]
    assert len(values) == len(set(values)), values
    assert len(ErrorKind.__members__) == len(ErrorKind), "an alias: two names for one kind"


def test_error_kind_values_are_the_wire_strings() -> None:
    assert {member.value for member in ErrorKind} == WIRE_KINDS


def test_error_kind_reads_and_compares_as_its_string() -> None:
    for member in ErrorKind:
        assert str(member) == member.value == f"{member}"
        assert member == member.value and hash(member) == hash(member.value)
        assert json.dumps({"kind": member}) == json.dumps({"kind": member.value})
    assert "busy" in RETRYABLE_KINDS  # a kind read off the wire is a plain str


def test_error_kind_no_bare_kind_literals_left_in_the_module() -> None:
    bare = re.findall(r'^.*\b(?:error_)?kind(?::\s*str)?\s*=\s*"[^"]+".*$', SOURCE, flags=re.M)
    assert bare == [], "use ErrorKind members:\n" + "\n".join(bare)


def test_error_kind_every_kind_used_in_the_module_is_a_member() -> None:
    used = set(re.findall(r"\bErrorKind\.([A-Z_]+)\b", SOURCE))
    assert used and used <= set(ErrorKind.__members__), used - set(ErrorKind.__members__)
    assert all(isinstance(kind, ErrorKind) for kind in RETRYABLE_KINDS)


def test_error_kind_every_exception_class_lives_in_section_2() -> None:
    tree = ast.parse(SOURCE)
    start = SOURCE.index("# 2. Errors")
    end = SOURCE.index("# 3. Pure helpers")
    first_line, last_line = SOURCE.count("\n", 0, start) + 1, SOURCE.count("\n", 0, end) + 1
    classes = {node.name: node.lineno for node in tree.body if isinstance(node, ast.ClassDef)}
    errors = {
        name: line
        for name, line in classes.items()
        if isinstance(getattr(pangea, name, None), type) and issubclass(getattr(pangea, name), BaseException)
    }
    assert {"PangeaError", "NoPeerError", "RpcError", "CheckFailed", "Interrupted"} <= set(errors)
    outside = {name: line for name, line in errors.items() if not first_line < line < last_line}
    assert outside == {}, outside
    assert all(issubclass(getattr(pangea, name), PangeaError) for name in errors if name != "Interrupted")

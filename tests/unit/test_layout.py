"""The layout of pangea.py: its rooms in order, each using only the rooms above it.

pangea.py is one module of numbered sections (``# N. Title`` under a rule of
``#``). These tests keep that map true: the sections stand in the documented
order, a section's code names only what sections above it (or itself) define,
the pure sections never await, each section stays within its line budget, and
the module docstring's map lists every section. Growth past a budget is a
decision: raise the budget here, in the same change, and say why.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "pangea.py"

# (title, pure, line budget) of every section, top to bottom.
SECTIONS: list[tuple[str, bool, int]] = [
    ("Constants", True, 1200),
    ("Errors", True, 1200),
    ("Pure helpers", True, 1200),
    ("Wire framing (sans-I/O)", True, 1200),
    ("Session protocol (sans-I/O)", True, 1200),
    ("Kernels", True, 1200),
    ("Kernels: linear algebra", True, 1200),
    ("Kernels: element-wise, reductions, shapes and fft", True, 1200),
    ("Scheduler (sans-I/O)", True, 1200),
    ("Session directories", False, 1200),
    ("Transports", False, 1200),
    ("Bulk channels", False, 1200),
    ("The node", False, 1200),
    ("The manager", False, 1200),
    ("Around the node", False, 1200),
    ("RPC records", False, 1200),
    ("Held arrays", False, 1200),
    ("Task journal", False, 1200),
    ("Task queue", False, 1200),
    ("RPC service", False, 1200),
    ("Dashboard", False, 1200),
    ("Remote arrays and futures", False, 1200),
    ("The Python client", False, 1200),
    ("Start-up", False, 1200),
    ("CLI: options and the verbs of a pair", False, 1200),
    ("CLI: serve and call", False, 1200),
    ("CLI: the tools and main", False, 1200),
]

HEADER = re.compile(r"^# (\d+)\. (.+)$")
RULE = "#" * 79


@dataclass
class Section:
    number: int
    title: str
    start: int  # first line (1-based), the header's rule
    end: int  # last line
    nodes: list[ast.stmt]


def read_sections() -> tuple[str, list[Section]]:
    source = MODULE.read_text()
    lines = source.splitlines()
    heads = []
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if m and i > 0 and lines[i - 1] == RULE:
            heads.append((i, int(m.group(1)), m.group(2)))  # i: 0-based line of the title
    sections = []
    for k, (i, number, title) in enumerate(heads):
        end = heads[k + 1][0] - 1 if k + 1 < len(heads) else len(lines)  # up to the next header's rule
        sections.append(Section(number, title, i, end, []))  # i (0-based title) == 1-based rule line
    tree = ast.parse(source)
    for stmt in tree.body:
        for s in sections:
            if s.start <= stmt.lineno <= s.end:
                s.nodes.append(stmt)
    return source, sections


def defined_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    names = []
    for t in targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name):
                names.append(n.id)
    return names


class _Uses(ast.NodeVisitor):
    """Names loaded by code that runs (annotations are left out: they are strings here)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for stmt in node.body:
            self.visit(stmt)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)


def uses(stmt: ast.stmt) -> set[str]:
    v = _Uses()
    v.visit(stmt)
    return v.names


SOURCE, FOUND = read_sections()


def test_the_sections_stand_in_the_documented_order() -> None:
    assert [(s.number, s.title) for s in FOUND] == [(i + 1, t) for i, (t, _, _) in enumerate(SECTIONS)]


def test_a_section_uses_only_the_sections_above_it() -> None:
    home: dict[str, int] = {}
    for k, s in enumerate(FOUND):
        for stmt in s.nodes:
            for name in defined_names(stmt):
                home.setdefault(name, k)
    upward = []
    for k, s in enumerate(FOUND):
        for stmt in s.nodes:
            for name in sorted(uses(stmt)):
                if home.get(name, -1) > k:
                    where = defined_names(stmt) or [f"line {stmt.lineno}"]
                    upward.append(f"{s.title}: {where[0]} uses {name} ({FOUND[home[name]].title})")
    assert upward == []


@pytest.mark.parametrize("title", [t for t, pure, _ in SECTIONS if pure])
def test_a_pure_section_never_awaits(title: str) -> None:
    section = next(s for s in FOUND if s.title == title)
    found = [
        f"line {n.lineno}: {type(n).__name__}"
        for stmt in section.nodes
        for n in ast.walk(stmt)
        if isinstance(n, (ast.Await, ast.AsyncFunctionDef, ast.AsyncWith, ast.AsyncFor))
    ]
    assert found == []


# What a pure section may not touch: the event loop, sockets, libp2p, or a clock
# (time comes in as an argument, so a fake clock drives every timeout in tests).
IMPURE_MODULES = {"trio", "socket", "libp2p", "asyncio", "subprocess"}
IMPURE_CALLS = {("time", "monotonic"), ("time", "perf_counter"), ("time", "time"), ("time", "sleep")}


@pytest.mark.parametrize("title", [t for t, pure, _ in SECTIONS if pure])
def test_a_pure_section_imports_no_event_loop_and_reads_no_clock(title: str) -> None:
    section = next(s for s in FOUND if s.title == title)
    found = []
    for stmt in section.nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Import):
                found += [
                    f"line {n.lineno}: import {a.name}" for a in n.names if a.name.split(".")[0] in IMPURE_MODULES
                ]
            elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in IMPURE_MODULES:
                found.append(f"line {n.lineno}: from {n.module} import ...")
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                if (n.value.id, n.attr) in IMPURE_CALLS:
                    found.append(f"line {n.lineno}: {n.value.id}.{n.attr}")
    assert found == []


@pytest.mark.parametrize(("title", "budget"), [(t, b) for t, _, b in SECTIONS])
def test_a_section_stays_within_its_line_budget(title: str, budget: int) -> None:
    section = next(s for s in FOUND if s.title == title)
    assert section.end - section.start + 1 <= budget


def test_the_module_docstring_maps_every_section() -> None:
    doc = ast.get_docstring(ast.parse(SOURCE)) or ""
    missing = [t for t, _, _ in SECTIONS if t.lower() not in " ".join(doc.lower().split())]
    assert missing == []

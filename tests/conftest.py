"""Shared pytest setup for pangea: import paths, markers, and fixtures.

* The repo root, bench/ and tests/ go on ``sys.path``, so tests can ``import pangea``
  (the module under test, straight from the work tree), ``import pangea_bench``
  (the bench verb, bench/pangea_bench.py) and
  ``from helpers import Proc, NetnsPair, ...`` (tests/helpers.py).
* Markers: ``slow``, ``integration`` (runs pangea.pyz as real processes) and
  ``netns`` (needs root and ``ip netns``). Every test runs by default; tests
  under tests/integration/ and tests/netns/ get their marker automatically,
  and a ``netns`` test is skipped, with the reason, only where namespaces
  cannot be made (not root, no iproute2, no kernel support).
* When a test fails, the output of every `Proc` it started is added to its
  report, so a failing integration test shows the child's stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(REPO_ROOT), str(REPO_ROOT / "bench"), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from helpers import NetnsPair, NodeHome, Proc, make_node_home, netns_unavailable_reason  # noqa: E402

MARKERS = {
    "slow": "takes more than a few seconds (still runs by default)",
    "integration": "runs the built pangea.pyz as real processes on 127.0.0.1",
    "netns": "needs root and `ip netns`: one node per network namespace",
}

# Directory under tests/ -> marker given to every test in it.
_DIR_MARKERS = {"integration": "integration", "netns": "netns"}


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml declares them too; add any that a different config lacks.
    declared = {line.split(":")[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            top = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except (ValueError, IndexError):
            continue
        marker = _DIR_MARKERS.get(top)
        if marker is not None:
            item.add_marker(marker)


_procs_before = pytest.StashKey[int]()  # len(Proc.started) when a test began
_netns_reason: list[str | None] = []  # computed once per session, on first need


def _netns_skip_reason() -> str | None:
    if not _netns_reason:
        _netns_reason.append(netns_unavailable_reason())
    return _netns_reason[0]


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_procs_before] = len(Proc.started)
    if item.get_closest_marker("netns") is not None:
        reason = _netns_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for proc in Proc.started[item.stash.get(_procs_before, len(Proc.started)) :]:
            report.sections.append((f"Captured output of {proc.name}", proc.output()))
    return report


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pyz() -> Path:
    """The built pangea.pyz: $PANGEA_PYZ, else <repo>/pangea.pyz; skips if missing."""
    path = Path(os.environ.get("PANGEA_PYZ") or REPO_ROOT / "pangea.pyz")
    if not path.is_file():
        pytest.skip(f"no pangea.pyz at {path}: run ./build.sh (or ./build.sh test)")
    # The first run of a build unpacks it and says so on stderr (once): have it now, in the
    # SHIV_ROOT the tests share (helpers.make_node_home), not in the first test's output.
    shiv_root = os.environ.get("SHIV_ROOT") or str(Path.home() / ".shiv")
    subprocess.run(
        [str(path), "--version"],
        env={**os.environ, "SHIV_ROOT": shiv_root},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
        check=False,
    )
    return path


@pytest.fixture
def pangea_home(tmp_path: Path) -> NodeHome:
    """A fresh HOME and PANGEA_HOME under tmp_path, with `.env` for a Proc."""
    return make_node_home(tmp_path, "node")


@pytest.fixture
def make_home(tmp_path: Path) -> Callable[[str], NodeHome]:
    """Factory for more nodes in one test: `make_home("a")`, `make_home("b")`."""

    def make(name: str) -> NodeHome:
        return make_node_home(tmp_path, name)

    return make


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A NetnsPair (two namespaces joined by veth), deleted after the test."""
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsPair() as pair:
        yield pair

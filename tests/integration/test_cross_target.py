"""./build.sh --python X.Y --platform TAG: a pyz for another box, from that target's wheels.

The slow tests build ``pangea-cp312-<machine>.pyz`` for CPython 3.12 on this
machine type (``--platform manylinux_2_28_<machine>``: numpy 2.4.6 and pycapnp
2.2.4 have no manylinux2014 wheels for cp312, so 2.28 is the oldest glibc tag
that works) once per module, into .build/test-cross-target/, and reuse it
while it is newer than pangea.py, bench/pangea_bench.py, capnp/, pyproject.toml,
build.sh and build_helpers.py. The wheels, the pinned closure and the staged
site-packages are cached under .build/ by build.sh itself, so a rebuild after an
edit is about a minute.

They check that the zip holds the cp312 extensions (not this interpreter's
cp311 ones), that its stamp names cpython-312, that running it here with
this interpreter gives the one-line wrong-target error, and that CPython 3.12
from ~/.pyenv runs it (demo loads libp2p, capnp and numpy). They skip when no
~/.pyenv/versions/3.12.* exists or PyPI is unreachable.

The fast test: a pyz for aarch64 cannot be made here without --wheels, since
fastecdsa has no wheels on PyPI and must be compiled on the target.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import make_node_home
from pyz_helpers import assert_expected_error, build_stamp, run_pyz

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = REPO_ROOT / "build.sh"
MACHINE = platform.machine()
PLATFORM = f"manylinux_2_28_{MACHINE}"
PYZ_NAME = f"pangea-cp312-{MACHINE}.pyz"
OUT_DIR = REPO_ROOT / ".build" / "test-cross-target"
# The files a pyz is built from (as in build.sh's pyz_is_stale).
INPUTS = ["pangea.py", "bench/pangea_bench.py", "capnp/pangea.capnp", "pyproject.toml", "build.sh", "build_helpers.py"]
# What build.sh says when pip cannot reach PyPI.
UNREACHABLE = "cannot reach the package index"
# A cold build (resolve, download ~60 MB of wheels, install, zip) takes about a
# minute alone; other test runs may share the 2 CPUs.
BUILD_TIMEOUT_S = 1800
# The first run of a new pyz unpacks ~200 MB and compiles .pyc (16 s alone).
FIRST_RUN_TIMEOUT_S = 300
# The .so suffix names the machine like this (`uname -m` -> multiarch triplet part).
SO_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64", "i686": "i386"}


def python312() -> Path | None:
    """The newest ~/.pyenv/versions/3.12.*/bin/python, or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = [p for p in pyenv.glob("versions/3.12.*/bin/python") if p.is_file()]

    def patch(path: Path) -> int:
        tail = path.parts[-3].split(".")[-1]
        return int(tail) if tail.isdigit() else -1

    return max(found, key=patch) if found else None


def run_build(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ./build.sh ARGS to completion; skip the test if PyPI is unreachable."""
    env = {k: v for k, v in os.environ.items() if k != "PANGEA_PYZ"}
    result = subprocess.run(
        [str(BUILD_SH), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    if result.returncode != 0 and UNREACHABLE in result.stderr:
        error = next(line for line in result.stderr.splitlines() if UNREACHABLE in line)
        pytest.skip(f"PyPI is unreachable, cannot fetch the target's wheels: {error}")
    return result


@dataclass
class CrossBuild:
    pyz: Path
    python312: Path
    shiv_root: Path  # where runs of this pyz unpack it (cleared with each rebuild)


def is_fresh(pyz: Path) -> bool:
    if not pyz.is_file():
        return False
    built = pyz.stat().st_mtime
    return all((REPO_ROOT / name).stat().st_mtime < built for name in INPUTS)


@pytest.fixture(scope="module")
def cross() -> CrossBuild:
    py312 = python312()
    if py312 is None:
        pytest.skip("no CPython 3.12 under ~/.pyenv/versions/3.12.*: cannot build fastecdsa for cp312 here")
    pyz = OUT_DIR / PYZ_NAME
    shiv_root = OUT_DIR / "shiv"
    if not is_fresh(pyz):
        # Also drops the previous build's extraction (shiv never deletes one).
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        OUT_DIR.mkdir(parents=True)
        result = run_build(["--python", "3.12", "--platform", PLATFORM, "--out-dir", str(OUT_DIR)], BUILD_TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        assert f"built {pyz} (" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    return CrossBuild(pyz=pyz, python312=py312, shiv_root=shiv_root)


@pytest.fixture
def cross_env(cross: CrossBuild, tmp_path: Path) -> dict[str, str]:
    """A fresh HOME and PANGEA_HOME; the pyz unpacks under .build/test-cross-target/shiv."""
    env = make_node_home(tmp_path, "node").env
    env["SHIV_ROOT"] = str(cross.shiv_root)
    return env


@pytest.mark.slow
def test_cross_pyz_is_named_after_its_target(cross: CrossBuild) -> None:
    assert cross.pyz.name == PYZ_NAME == f"pangea-cp312-{MACHINE}.pyz"
    assert sorted(p.name for p in OUT_DIR.glob("*.pyz")) == [PYZ_NAME]
    assert os.access(cross.pyz, os.X_OK)
    head = cross.pyz.read_bytes()[:4096].split(b"PK\x03\x04")[0].decode()
    assert head.splitlines()[0] == "#!/bin/sh"
    # The head runs python3.12 from PATH (or python3): no interpreter of this box is named.
    assert "py=$(command -v python3.12) || py=python3" in head.splitlines()
    data = cross.pyz.read_bytes()
    end = data.rfind(b"PK\x05\x06")  # the zip's offsets count from the start of the file
    size, offset = struct.unpack_from("<LL", data, end + 12)
    assert offset + size == end


@pytest.mark.slow
def test_cross_pyz_packs_the_targets_cp312_extensions_and_no_cp311_ones(cross: CrossBuild) -> None:
    with zipfile.ZipFile(cross.pyz) as archive:
        names = archive.namelist()
        wheel_files = {
            name.split("/")[1]: archive.read(name).decode()
            for name in names
            if re.fullmatch(r"site-packages/[^/]+\.dist-info/WHEEL", name)
        }
    extensions = [n for n in names if re.search(r"\.cpython-\d+-", n)]
    so_arch = SO_ARCH.get(MACHINE, MACHINE)
    assert f"site-packages/numpy/_core/_multiarray_umath.cpython-312-{so_arch}-linux-gnu.so" in names
    for package in ("capnp", "fastecdsa", "numpy", "cryptography", "coincurve"):
        assert any(n.startswith(f"site-packages/{package}/") for n in names), package
    for package in ("capnp", "fastecdsa"):
        assert any(n.startswith(f"site-packages/{package}/") and ".cpython-312-" in n for n in extensions), package
    assert not [n for n in extensions if ".cpython-311-" in n]
    assert [n for n in extensions if ".cpython-312-" not in n] == []
    # Every packed distribution came from a wheel of the target: pure, abi3, or cp312,
    # for a platform that manylinux_2_28_<machine> allows.
    assert len(wheel_files) > 40, sorted(wheel_files)
    allowed_platform = re.compile(rf"any|linux_{MACHINE}|manylinux(1|2010|2014|_2_\d+)_{MACHINE}")
    for dist, text in wheel_files.items():
        tags = re.findall(r"^Tag: (\S+)-(\S+)-(\S+)$", text, flags=re.M)
        assert tags, (dist, text)
        for python, abi, plat in tags:
            assert allowed_platform.fullmatch(plat), (dist, plat)
            if plat.startswith("manylinux_2_"):
                assert int(plat.split("_")[2]) <= 28, (dist, plat)
            if abi not in ("none", "abi3"):
                assert (python, abi) == ("cp312", "cp312"), (dist, python, abi)
    for dist in ("numpy-2.4.6", "pycapnp-2.2.4", "fastecdsa-2.3.2"):
        assert "Tag: cp312-cp312-" in wheel_files[f"{dist}.dist-info"], dist


@pytest.mark.slow
def test_cross_pyz_stamp_names_cpython_312(cross: CrossBuild) -> None:
    stamp = build_stamp(cross.pyz)
    assert stamp["BUILT_FOR"] == ("cpython-312", MACHINE)
    assert stamp["PYTHON_VERSION"] == "3.12"
    assert isinstance(stamp["GIT_COMMIT"], str) and stamp["GIT_COMMIT"]


@pytest.mark.slow
def test_cross_pyz_run_by_this_interpreter_gives_the_wrong_target_error(
    cross: CrossBuild, cross_env: dict[str, str]
) -> None:
    if sys.version_info[:2] == (3, 12):
        pytest.skip("the tests run on CPython 3.12, the pyz's own target")
    result = run_pyz(cross.pyz, ["--version"], cross_env, interpreter=sys.executable, timeout=FIRST_RUN_TIMEOUT_S)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    here = sys.implementation.cache_tag
    assert_expected_error(
        result.stderr,
        f"this pangea.pyz was built for cpython-312 on {MACHINE}, but this is {here} on {MACHINE}",
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: ") and "python3.12" in lines[1], result.stderr


@pytest.mark.slow
def test_cross_pyz_runs_under_cpython_312(cross: CrossBuild, cross_env: dict[str, str]) -> None:
    py = str(cross.python312)
    version = run_pyz(cross.pyz, ["--version"], cross_env, interpreter=py, timeout=FIRST_RUN_TIMEOUT_S)
    assert version.returncode == 0, version.stderr
    assert f"built for cpython-312 {MACHINE} (Python 3.12)" in version.stdout, version.stdout
    assert f"running on cpython-312 {MACHINE}" in version.stdout, version.stdout

    ident = run_pyz(cross.pyz, ["id"], cross_env, interpreter=py, timeout=FIRST_RUN_TIMEOUT_S)
    assert ident.returncode == 0, ident.stderr
    assert re.fullmatch(r"12D3KooW\w+\n", ident.stdout), ident.stdout

    # demo: two nodes over libp2p, capnp messages, numpy kernels, all under 3.12.
    demo = run_pyz(cross.pyz, ["demo", "--size", "64"], cross_env, interpreter=py, timeout=FIRST_RUN_TIMEOUT_S)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "every check passed" in demo.stdout, demo.stdout
    assert f"cpython-312 {MACHINE}" in demo.stdout, demo.stdout


def test_foreign_machine_without_wheels_fails_with_one_line_about_fastecdsa(tmp_path: Path) -> None:
    foreign = "aarch64" if MACHINE != "aarch64" else "x86_64"
    result = run_build(["--platform", f"manylinux2014_{foreign}", "--python", "3.11", "--out-dir", str(tmp_path)], 600)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("build.sh: error:")]
    assert len(errors) == 1, result.stderr
    error = lines[errors[0]]
    assert "fastecdsa" in error and foreign in error and "compiled" in error, error
    # The error, then one hint, and nothing after them.
    assert lines[errors[0] + 1 :] == [lines[-1]] and lines[-1].startswith("hint: "), result.stderr
    assert "--wheels DIR" in lines[-1], lines[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--python", "3.9"], "pangea needs CPython >= 3.11"),
        (["--python", "twelve"], "bad --python 'twelve'"),
        (["--platform", "macosx_11_0_arm64"], "unknown --platform 'macosx_11_0_arm64'"),
        (["--wheels", "/nonexistent"], "add --python X.Y and/or --platform TAG"),
        (["--python"], "--python needs a value"),
    ],
)
def test_bad_target_options_fail_with_one_line(args: list[str], needle: str) -> None:
    result = run_build(args, 300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("==> build.sh:")]
    assert len(lines) == 2 and lines[0].startswith("build.sh: error: ") and lines[1].startswith("hint: "), lines
    assert needle in lines[0], lines[0]

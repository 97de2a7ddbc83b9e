"""The built pangea.pyz holds the app, its schema and a build stamp for this interpreter."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def members(pyz: Path) -> dict[str, bytes]:
    wanted = ("pangea.py", "pangea.capnp", "_pangea_build.py")
    with zipfile.ZipFile(pyz) as archive:
        return {name: archive.read(f"site-packages/{name}") for name in wanted}


# The interpreter behind the build venv's python: the one build.sh names in the pyz head.
BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def pyz_head(pyz: Path) -> str:
    """The sh lines before the zip (build.sh's pyz_head)."""
    return pyz.read_bytes()[:4096].split(b"PK\x03\x04")[0].decode()


def test_pyz_is_executable_zipapp_whose_head_picks_the_interpreter(pyz: Path) -> None:
    assert os.access(pyz, os.X_OK)
    head = pyz_head(pyz)
    lines = head.splitlines()
    xy = "{}.{}".format(*sys.version_info[:2])
    assert lines[0] == "#!/bin/sh"
    assert lines[-1] == 'exec "$py" "$0" "$@"'
    assert f"command -v python{xy}" in head
    with zipfile.ZipFile(pyz) as archive:
        assert "__main__.py" in archive.namelist()
    assert zip_offsets_off_by(pyz) == 0  # build.sh moved them with the head: unzip -l does not warn


def zip_offsets_off_by(pyz: Path) -> int:
    """How many bytes the offsets a zip records are off by (0: they count from the file's start)."""
    data = pyz.read_bytes()
    end = data.rfind(b"PK\x05\x06")  # end of central directory: its size, then its offset
    size, offset = struct.unpack_from("<LL", data, end + 12)
    return end - (offset + size)


def test_pyz_runs_with_the_interpreter_its_head_names(pyz: Path, pangea_home) -> None:
    named = [line.removeprefix("py=") for line in pyz_head(pyz).splitlines() if line.startswith("py=/")]
    assert len(named) == 1, pyz_head(pyz)
    assert os.path.realpath(named[0]) == BASE_PYTHON
    result = subprocess.run(
        [str(pyz), "-c", "import sys; print(sys.executable)"],
        env={**pangea_home.env, "SHIV_INTERPRETER": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == named[0]


@pytest.mark.parametrize("on_path", ["pythonX.Y", "python3"])
def test_pyz_head_falls_back_to_python_on_path(pyz: Path, tmp_path: Path, on_path: str) -> None:
    # The same head on a tiny zipapp, on a box without the build interpreter.
    xy = "{}.{}".format(*sys.version_info[:2])
    head = "".join(
        "py=/nonexistent/python\n" if line.startswith("py=/") else line
        for line in pyz_head(pyz).splitlines(keepends=True)
    )
    app = tmp_path / "app.pyz"
    with zipfile.ZipFile(app, "w") as archive:
        archive.writestr("__main__.py", "import sys; print(sys.executable)\n")
    app.write_bytes(head.encode() + app.read_bytes())
    app.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / on_path.replace("X.Y", xy)
    python.symlink_to(BASE_PYTHON)
    env = {**os.environ, "PATH": f"{bin_dir}:/nonexistent"}
    result = subprocess.run([str(app)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(python)


def test_pyz_ships_pangea_and_schema_from_the_work_tree(members: dict[str, bytes], pyz: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    if pyz.resolve() == (root / "pangea.pyz").resolve():
        assert members["pangea.py"] == (root / "pangea.py").read_bytes()
        assert members["pangea.capnp"] == (root / "capnp" / "pangea.capnp").read_bytes()


def test_pyz_build_stamp_matches_this_interpreter(members: dict[str, bytes]) -> None:
    stamp: dict[str, object] = {}
    exec(members["_pangea_build.py"], stamp)  # our own generated stamp file
    assert stamp["BUILT_FOR"] == (sys.implementation.cache_tag, platform.machine())
    assert stamp["PYTHON_VERSION"] == "{}.{}".format(*sys.version_info[:2])
    assert isinstance(stamp["GIT_COMMIT"], str) and stamp["GIT_COMMIT"]
    assert isinstance(stamp["BUILD_TIME"], str) and stamp["BUILD_TIME"].endswith("Z")


def test_pyz_imports_its_runtime_deps(pyz: Path, pangea_home) -> None:
    code = (
        "import capnp, libp2p, numpy, trio, _pangea_build, pangea; "
        "print('deps ok', numpy.__version__, trio.__version__)"
    )
    result = subprocess.run(
        [sys.executable, str(pyz), "-c", code],
        env={**pangea_home.env, "SHIV_INTERPRETER": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deps ok 2.4.6 0.35.0"), result.stdout

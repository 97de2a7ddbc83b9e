"""The built pangea.pyz holds the app, its schema and a build stamp for this interpreter."""

from __future__ import annotations

import os
import platform
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


def test_pyz_is_executable_zipapp_with_env_shebang(pyz: Path) -> None:
    assert os.access(pyz, os.X_OK)
    assert pyz.read_bytes()[:64].split(b"\n")[0] == b"#!/usr/bin/env python3"


def test_pyz_ships_pangea_and_schema_from_the_work_tree(
    members: dict[str, bytes], pyz: Path
) -> None:
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

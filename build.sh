#!/usr/bin/env bash
# build.sh: build pangea.pyz (a shiv zipapp) and run the tests against it.
#
# Everything goes into .build/ (a build venv, the staged app, requirement
# lists); nothing is installed into the system Python. The build venv is
# reused until pyproject.toml or the build interpreter changes.
#
# See `./build.sh --help`.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: ./build.sh [build]            build pangea.pyz at the repo root
       ./build.sh test [PYTEST_ARGS]  build pangea.pyz if it is out of date, then run
                                      pytest (on tests/ unless PYTEST_ARGS name test
                                      paths, e.g. tests/unit) with PANGEA_PYZ set to it;
                                      "no tests collected" counts as a failure
       ./build.sh --help              show this help

environment:
  PYTHON   interpreter for the build venv (default: python3; needs CPython >= 3.11).
           The pyz runs only on the same Python minor version and machine type.

files:
  .build/venv   build venv (runtime + dev dependencies), keyed on a hash of
                pyproject.toml and the interpreter; rebuilt when either changes
  .build/app    staged app: pangea.py, pangea.capnp, _pangea_build.py
  pangea.pyz    the zipapp; run it as ./pangea.pyz --help

needs: gcc and libgmp-dev (fastecdsa, a libp2p dependency, is built from source).
EOF
}

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
PY=${PYTHON:-python3}
BUILD_DIR=.build
VENV=$BUILD_DIR/venv
APP=$BUILD_DIR/app
PYZ=pangea.pyz
SHEBANG="/usr/bin/env python3"

say() { echo "==> build.sh: $*" >&2; }
die() {
    echo "build.sh: error: $1" >&2
    [[ $# -gt 1 ]] && echo "hint: $2" >&2
    exit 2
}

check_python() {
    command -v "$PY" >/dev/null 2>&1 \
        || die "cannot find the build interpreter: '$PY' is not on PATH" \
               "set PYTHON=/path/to/python3.11 (CPython >= 3.11)"
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        local ver
        ver=$("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo '?')
        die "cannot build with '$PY': it is Python $ver, pangea needs >= 3.11" \
            "set PYTHON=/path/to/python3.11"
    fi
}

# Write .build/requirements.txt (runtime) and .build/requirements-dev.txt (dev
# group) from pyproject.toml, so the build venv and shiv use the same pins.
write_requirements() {
    mkdir -p "$BUILD_DIR"
    "$PY" - "$BUILD_DIR" <<'EOF'
import sys, tomllib
from pathlib import Path

out = Path(sys.argv[1])
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
runtime = project["dependencies"]
dev = project.get("optional-dependencies", {}).get("dev", [])
(out / "requirements.txt").write_text("".join(r + "\n" for r in runtime))
(out / "requirements-dev.txt").write_text("".join(r + "\n" for r in dev))
EOF
}

check_toolchain() {
    command -v gcc >/dev/null 2>&1 \
        || die "cannot build fastecdsa (a libp2p dependency): gcc is not installed" \
               "apt-get install gcc libgmp-dev python3-dev"
    echo '#include <gmp.h>' | gcc -E -x c - >/dev/null 2>&1 \
        || die "cannot build fastecdsa (a libp2p dependency): gmp.h not found" \
               "apt-get install libgmp-dev"
}

# Create or reuse .build/venv. Sets VENV_REBUILT=1 when it was (re)created.
VENV_REBUILT=0
ensure_venv() {
    local key
    key=$( { cat pyproject.toml
             "$PY" -c 'import sys; print(sys.executable, sys.version)'; } | sha256sum | cut -d' ' -f1)
    if [[ -x $VENV/bin/python && -f $VENV/.pangea-key && $(cat "$VENV/.pangea-key") == "$key" ]]; then
        say "reusing $VENV"
        return
    fi
    check_toolchain
    say "creating $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" \
        || die "cannot create the build venv with '$PY'" \
               "install the venv module for that interpreter (Debian: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check \
        -r "$BUILD_DIR/requirements.txt" -r "$BUILD_DIR/requirements-dev.txt"
    # Written last, so an interrupted install is redone on the next run.
    echo "$key" >"$VENV/.pangea-key"
    VENV_REBUILT=1
}

stage_app() {
    [[ -f pangea.py ]] || die "cannot stage the app: pangea.py is missing in $ROOT"
    [[ -f capnp/pangea.capnp ]] || die "cannot stage the app: capnp/pangea.capnp is missing"
    rm -rf "$APP"
    mkdir -p "$APP"
    cp pangea.py "$APP/pangea.py"
    # pangea.py loads Path(__file__).with_name("pangea.capnp").
    cp capnp/pangea.capnp "$APP/pangea.capnp"
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    "$VENV/bin/python" - "$APP/_pangea_build.py" "$commit" <<'EOF'
import datetime, platform, sys
from pathlib import Path

path, commit = sys.argv[1], sys.argv[2]
built_for = (sys.implementation.cache_tag, platform.machine())
now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
Path(path).write_text(
    '"""Build stamp for pangea.pyz, generated by build.sh; do not edit."""\n'
    f"BUILT_FOR = {built_for!r}\n"
    f"PYTHON_VERSION = {'%d.%d' % sys.version_info[:2]!r}\n"
    f"BUILD_TIME = {now!r}\n"
    f"GIT_COMMIT = {commit!r}\n"
)
EOF
}

build_pyz() {
    stage_app
    local reqs=()
    mapfile -t reqs <"$BUILD_DIR/requirements.txt"
    say "running shiv (runtime deps: ${reqs[*]})"
    rm -f "$PYZ.tmp"
    "$VENV/bin/shiv" -o "$PYZ.tmp" -e pangea:main -p "$SHEBANG" --compile-pyc \
        --site-packages "$APP" --disable-pip-version-check "${reqs[@]}"
    chmod +x "$PYZ.tmp"
    mv -f "$PYZ.tmp" "$PYZ"
    say "built $ROOT/$PYZ ($(du -h "$PYZ" | cut -f1), $(stat -c %s "$PYZ") bytes)"
}

pyz_is_stale() {
    [[ ! -f $PYZ || $VENV_REBUILT == 1 ]] && return 0
    local f
    for f in pangea.py capnp/pangea.capnp pyproject.toml build.sh; do
        [[ $f -nt $PYZ ]] && return 0
    done
    return 1
}

build() {
    check_python
    write_requirements
    ensure_venv
    build_pyz
}

run_tests() {
    check_python
    write_requirements
    ensure_venv
    if pyz_is_stale; then
        build_pyz
    else
        say "reusing $ROOT/$PYZ (newer than pangea.py, capnp/, pyproject.toml, build.sh)"
    fi
    export PANGEA_PYZ=$ROOT/$PYZ
    # `./build.sh test tests/unit -q` runs one tier: `tests` is added only when
    # no argument names a test path (a file, a directory, or path::test).
    local targets=(tests) arg
    for arg in "$@"; do
        if [[ $arg != -* && -e ${arg%%::*} ]]; then
            targets=()
            break
        fi
    done
    say "running pytest ${targets[*]} $*"
    local rc=0
    "$VENV/bin/python" -m pytest "${targets[@]}" "$@" || rc=$?
    if [[ $rc == 5 ]]; then
        echo "build.sh: error: pytest collected no tests; treating that as a failure" >&2
        exit 1
    fi
    exit "$rc"
}

case ${1:-build} in
    -h | --help | help) usage ;;
    build) build ;;
    test) shift; run_tests "$@" ;;
    *)
        echo "build.sh: error: unknown command '$1'" >&2
        usage >&2
        exit 2
        ;;
esac

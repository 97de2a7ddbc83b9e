#!/usr/bin/env bash
# build.sh: build pangea.pyz (a shiv zipapp) and run the tests against it.
#
# Everything goes into .build/ (a build venv, the staged app, requirement
# lists); nothing is installed into the system Python. The build venv is
# reused until pyproject.toml or the build interpreter changes. The steps
# that need Python run build_helpers.py (beside this file), one sub-command
# per job.
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
       ./build.sh [build] --python X.Y [--platform TAG] [--wheels DIR] [--out-dir DIR]
       ./build.sh [build] --platform TAG [--python X.Y] [--wheels DIR] [--out-dir DIR]
                                      build a pyz for another box from wheels of that
                                      target: pangea-cpXY-MACHINE.pyz, e.g.
                                      ./build.sh --python 3.12 --platform manylinux_2_28_aarch64
                                      -> pangea-cp312-aarch64.pyz
       ./build.sh --help              show this help

options for another target (either or both of --python and --platform; the one
left out is this machine's):
  --python X.Y     CPython version of the target (>= 3.11)
  --platform TAG   the newest pip platform tag the target supports: manylinux_2_28_aarch64
                   (glibc >= 2.28 on aarch64), manylinux_2_34_x86_64, manylinux2014_x86_64
                   (= manylinux_2_17) ...; the older manylinux tags it implies are added.
                   Default: this machine's tags (manylinux_2_<this glibc>_<this machine>)
  --wheels DIR     extra target wheels (pip --find-links), e.g. a fastecdsa wheel built on
                   the target; needed when the target's machine differs from this one,
                   since fastecdsa has no wheels on PyPI and is a C extension
  --out-dir DIR    where to write the pyz (default: the repo root)
Sdist-only dependencies are built here with a local CPython X.Y (the build venv's,
pythonX.Y on PATH, or ~/.pyenv/versions/X.Y.*) when the target's machine is this one.

environment:
  PYTHON   interpreter for the build venv (default: python3; needs CPython >= 3.11).
           The pyz runs only on the same Python minor version and machine type.

files:
  .build/venv   build venv (runtime + dev dependencies), keyed on a hash of
                pyproject.toml's pins and the interpreter; rebuilt when either changes
  .build/app    staged app: pangea.py, pangea_bench.py, pangea.capnp, _pangea_build.py
  .build/site   staged runtime dependencies: the closure pinned in
                .build/requirements-site.txt, less those nothing imports
                (DROP_DISTS), pruned of tests, stubs and debug symbols
  pangea.pyz    the zipapp; run it as ./pangea.pyz --help (its first lines are a
                sh script that picks the interpreter: see pyz_head in build.sh)
  .build/wheels-cpXY-MACHINE/, .build/site-cpXY-MACHINE/, .build/app-cpXY-MACHINE/
                another target's downloaded wheels, staged site-packages and app;
                .build/requirements-cpXY-MACHINE.txt is its pinned runtime closure

needs: gcc and libgmp-dev (fastecdsa, a libp2p dependency, is built from source).
EOF
}

CALLER_DIR=$PWD # --wheels and --out-dir are relative to it
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
PY=${PYTHON:-python3}
BUILD_DIR=.build
VENV=$BUILD_DIR/venv
APP=$BUILD_DIR/app
PYZ=pangea.pyz
SITE=$BUILD_DIR/site
# build.sh's Python: one sub-command per job (see its docstring); checked by ruff and mypy.
HELPERS=$ROOT/build_helpers.py
# shiv writes this one-line shebang; pyz_head replaces it (see there).
SHEBANG="/usr/bin/env python3"

# Distributions of the resolved runtime closure that nothing pangea runs imports
# (tech notes, section 4 "Size"; a static scan of every import statement reachable
# from pangea.py finds none of them, and the test suite passes without them). Each is
# declared by a package pangea does use, for its tools, type checking or nothing:
#   grpcio                      libp2p: only host/autonat/pb/autonat_pb2_grpc.py, never imported
#   jinja2, markupsafe          pycapnp: only its capnpc code generator (capnp/_gen.py)
#   mypy-protobuf, types-protobuf, types-requests   libp2p: type-checking tools and stubs
#   mypy-extensions, importlib-metadata, zipp, lazy-importer, packaging
#                               trio-typing: its mypy plugin (and a backport for Python < 3.10)
#   lru-dict, rpcudp, u-msgpack-python   libp2p: declared, imported by none of its modules
#   six                         py-multibase, py-multihash: declared, not imported
DROP_DISTS=(grpcio jinja2 markupsafe mypy-protobuf types-protobuf types-requests mypy-extensions
            importlib-metadata zipp lazy-importer packaging lru-dict rpcudp u-msgpack-python six)

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
    "$PY" "$HELPERS" requirements "$BUILD_DIR"
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
    # Keyed on the pins (written from pyproject.toml just before), not on the whole
    # file: editing a tool's settings there does not reinstall every package.
    key=$( { cat "$BUILD_DIR/requirements.txt" "$BUILD_DIR/requirements-dev.txt"
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

# stage_app [DIR CACHE_TAG MACHINE PYTHON_VERSION]: copy the app into DIR
# (default .build/app) with its build stamp; the stamp names the build venv's
# interpreter unless another target's cache tag, machine and X.Y are given.
stage_app() {
    local app=${1:-$APP}
    [[ -f pangea.py ]] || die "cannot stage the app: pangea.py is missing in $ROOT"
    [[ -f capnp/pangea.capnp ]] || die "cannot stage the app: capnp/pangea.capnp is missing"
    [[ -f bench/pangea_bench.py ]] || die "cannot stage the app: bench/pangea_bench.py is missing"
    rm -rf "$app"
    mkdir -p "$app"
    cp pangea.py "$app/pangea.py"
    # pangea.py loads Path(__file__).with_name("pangea.capnp").
    cp capnp/pangea.capnp "$app/pangea.capnp"
    # The bench verb's code: the top-level module pangea_bench beside pangea (imported only by `bench`).
    cp bench/pangea_bench.py "$app/pangea_bench.py"
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    "$VENV/bin/python" "$HELPERS" stamp "$app/_pangea_build.py" "$commit" "${@:2}"
}

# prune_site DIR MACHINE: delete from a staged site-packages what no import reaches:
# libp2p's stray top-level examples/, interop/, docs/, newsfragments/ and stubs/,
# console scripts (bin/; the pyz has one entry point), type stubs (*-stubs/, *.pyi),
# test suites (tests/, _tests/), the Cython and C++ sources of compiled extensions;
# and strip the debug sections of the extensions that ship them (capnp's .so:
# 19 MB -> 5 MB), when they are built for this machine's architecture.
prune_site() {
    local site=$1 machine=$2 so
    rm -rf "$site"/{examples,interop,docs,newsfragments,stubs,bin} "$site"/*-stubs
    find "$site" -depth -type d \( -name tests -o -name _tests -o -name __pycache__ \) -exec rm -rf {} +
    find "$site" -type f \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.cpp' \) -delete
    if [[ $machine == "$(uname -m)" ]] && command -v strip >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1; then
        while IFS= read -r -d '' so; do
            if readelf -S "$so" 2>/dev/null | grep -q '\.debug_'; then
                strip --strip-unneeded "$so"
            fi
        done < <(find "$site" -type f -name '*.so*' -print0)
    fi
}

# pyz_head X.Y [PYTHON]: print the lines the pyz starts with, in place of shiv's
# `#!/usr/bin/env python3`. Python runs a zip whatever precedes it, so the head can
# be a small sh script that picks the interpreter: PYTHON (the build interpreter,
# for a pyz built for this box) if it exists, else pythonX.Y on PATH, else python3,
# which then reports the wrong version in pangea's own words (check_build_target).
# Why not `#!/usr/bin/env pythonX.Y`: the first pythonX.Y on PATH is often a wrapper
# (a pyenv shim is a bash script running `pyenv exec`: 60-100 ms of every start,
# a third of a warm --help). Why not the build interpreter's path alone: the pyz
# must still run on other boxes with a CPython X.Y elsewhere.
# With PYZ_BUILD_ID and PYZ_UNPACK_MB set (finish_pyz), the head also says on stderr, once,
# that the first run of this build unpacks it and where: shiv does so silently (seconds),
# into $SHIV_ROOT (default ~/.shiv)/<the pyz's file name, links resolved>_<build id>.
pyz_head() {
    local xy=$1 python=${2:-}
    echo '#!/bin/sh'
    echo "# pangea.pyz: a zipapp (shiv) for CPython $xy; the zip follows these lines."
    echo "# They run it with the interpreter it was built with if this box has it, else with"
    echo "# python$xy from PATH (possibly a slower wrapper such as a pyenv shim), else python3."
    if [[ -n ${PYZ_BUILD_ID:-} ]]; then
        echo "# The first run of a build unpacks it (shiv, silently): say so, and where."
        echo 'n=$0; [ -L "$n" ] && n=$(readlink -f -- "$n" 2>/dev/null || printf %s "$n"); n=${n##*/}'
        echo "d=\${SHIV_ROOT:-\$HOME/.shiv}; d=\${d%/}/\${n}_$PYZ_BUILD_ID"
        echo "[ -d \"\$d/site-packages\" ] || echo \"pangea: first run of this build: unpacking $PYZ_UNPACK_MB MB into \$d (once; --version names older builds to remove)\" >&2"
    fi
    if [[ -n $python ]]; then
        printf 'py=%q\n' "$python"
        echo "[ -x \"\$py\" ] || py=\$(command -v python$xy) || py=python3"
    else
        echo "py=\$(command -v python$xy) || py=python3"
    fi
    echo 'exec "$py" "$0" "$@"'
}

# finish_pyz TMP OUT X.Y [PYTHON]: replace shiv's shebang line of TMP by pyz_head
# and move it to OUT, executable. The zip's recorded offsets count from the start of
# the file, so they move by the head's extra length (Python would cope without, but
# unzip and zipinfo would warn of "extra bytes at beginning").
finish_pyz() {
    local tmp=$1 out=$2
    local skip head_bytes PYZ_BUILD_ID PYZ_UNPACK_MB
    read -r PYZ_BUILD_ID PYZ_UNPACK_MB < <("$VENV/bin/python" "$HELPERS" unpack-info "$tmp")
    [[ -n $PYZ_BUILD_ID && -n $PYZ_UNPACK_MB ]] || { echo "build.sh: error: no shiv build id in $tmp" >&2; exit 1; }
    skip=$(head -1 "$tmp" | wc -c)
    head_bytes=$(pyz_head "${@:3}" | wc -c)
    { pyz_head "${@:3}"; tail -c +$((skip + 1)) "$tmp"; } >"$tmp.head"
    rm -f "$tmp"
    "$VENV/bin/python" "$HELPERS" shift-offsets "$tmp.head" $((head_bytes - skip))
    chmod +x "$tmp.head"
    mv -f "$tmp.head" "$out"
}

# stage_site: install the runtime closure pinned from pip's resolution, less
# DROP_DISTS, into .build/site (pip --target --no-deps) and prune it; reused
# until the pins, the drop list or the build interpreter change.
stage_site() {
    local pinned=$BUILD_DIR/requirements-site.txt lines key host_py
    host_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    TARGET_DESC="this machine"
    TARGET_MACHINE=$(uname -m)
    host_report
    lines=$(target_py pin "$BUILD_DIR/host-report.json" "$BUILD_DIR/requirements.txt" "$host_py" "$TARGET_MACHINE" \
        "${DROP_DISTS[@]}") || exit 2
    echo "$lines" >"$pinned"
    key=$( { cat "$pinned" "$VENV/.pangea-key"; declare -f prune_site; } | sha256sum | cut -d' ' -f1)
    if [[ -f $SITE.key && $(cat "$SITE.key") == "$key" && -d $SITE ]]; then
        say "reusing $SITE ($(wc -l <"$pinned") packages)"
        return
    fi
    say "installing $(wc -l <"$pinned") packages into $SITE (left out, imported by nothing: ${DROP_DISTS[*]})"
    rm -rf "$SITE" "$SITE.key"
    # --no-compile: shiv's --compile-pyc compiles everything once, where the pyz unpacks.
    pip_logged "$BUILD_DIR/logs/install-site.log" "installing the runtime closure into $SITE" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --no-compile \
        --target "$SITE" -r "$pinned"
    prune_site "$SITE" "$TARGET_MACHINE"
    echo "$key" >"$SITE.key"
}

build_pyz() {
    stage_app
    stage_site
    local python xy
    python=$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
    xy=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    say "running shiv"
    rm -f "$PYZ.tmp"
    "$VENV/bin/shiv" -o "$PYZ.tmp" -e pangea:main -p "$SHEBANG" --compile-pyc \
        --site-packages "$APP" --site-packages "$SITE"
    finish_pyz "$PYZ.tmp" "$PYZ" "$xy" "$python"
    say "built $ROOT/$PYZ ($(du -h "$PYZ" | cut -f1), $(stat -c %s "$PYZ") bytes; runs with $python)"
}

pyz_is_stale() {
    [[ ! -f $PYZ || $VENV_REBUILT == 1 ]] && return 0
    local f
    for f in pangea.py bench/pangea_bench.py capnp/pangea.capnp pyproject.toml build.sh build_helpers.py; do
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
        say "reusing $ROOT/$PYZ (newer than pangea.py, bench/pangea_bench.py, capnp/, pyproject.toml, build.sh, build_helpers.py)"
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

###############################################################################
# Another target: ./build.sh --python X.Y and/or --platform TAG
#
# Recipe (tech notes, section 4): resolve the runtime closure for the target
# with pip's target options (--only-binary=:all: --python-version X.Y
# --implementation cp --platform TAG... for every older manylinux tag TAG
# implies), build the sdist-only dependencies as wheels (pure ones with any
# interpreter; fastecdsa, a C extension, only with CPython X.Y on this machine
# type, or take it from --wheels), download the closure's wheels, install them
# into .build/site-<target> with --target, and zip that with shiv.
###############################################################################

TARGET_PY=""      # --python X.Y
TARGET_PLATFORM="" # --platform TAG
WHEELS_DIR=""     # --wheels DIR
OUT_DIR=""        # --out-dir DIR

# target_py SUBCOMMAND ARGS...: the Python half of the target build (build_helpers.py),
# run with the build venv's interpreter (it uses the venv's `packaging`). Errors are
# printed in build.sh's own format and exit 2.
target_py() {
    "$VENV/bin/python" "$HELPERS" "$@"
}

# pip_logged LOG WHAT ARGS...: run the build venv's pip with output to LOG; on
# failure print one error line (PyPI unreachable, or no wheel of some package
# for the target, or the log's last ERROR line) and exit 2.
pip_logged() {
    local log=$1 what=$2
    shift 2
    mkdir -p "$(dirname "$log")"
    if "$@" >"$log" 2>&1; then
        return 0
    fi
    local pkg
    if grep -qE 'NewConnectionError|Temporary failure in name resolution|Max retries exceeded|Network is unreachable|ConnectTimeout|ReadTimeout|Could not fetch URL' "$log"; then
        die "cannot reach the package index while $what: PyPI is unreachable (see $log)" \
            "check the network or pip's index settings (pip config list), then run the same command again"
    fi
    pkg=$(grep -oE 'No matching distribution found for [^ ]+' "$log" | head -1 | awk '{print $NF}')
    if [[ -n $pkg ]]; then
        die "$pkg has no wheel for $TARGET_DESC (while $what; see $log)" \
            "if the target's glibc is newer, name it: --platform manylinux_2_28_$TARGET_MACHINE (run ldd --version on the target), or pass --wheels DIR with that package built on the target"
    fi
    die "pip failed while $what: $(grep -E '^ERROR' "$log" | tail -1 | cut -c1-300) (see $log)"
}

# find_target_python X.Y: print a local CPython X.Y with pip, or return 1.
find_target_python() {
    local want=$1 c v pyenv=${PYENV_ROOT:-$HOME/.pyenv}
    local candidates=("$VENV/bin/python" "python$want")
    mapfile -t -O 2 candidates < <(ls -d "$pyenv"/versions/"$want".*/bin/python 2>/dev/null | sort -rV)
    candidates+=("/usr/local/bin/python$want" "/usr/bin/python$want")
    for c in "${candidates[@]}"; do
        v=$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2], sys.implementation.name)' 2>/dev/null) || continue
        [[ $v == "$want cpython" ]] || continue
        "$c" -m pip --version >/dev/null 2>&1 || continue
        echo "$c"
        return 0
    done
    return 1
}

# Parse --python/--platform into TARGET_* and the pip options that select the target.
setup_target() {
    local host_py
    host_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    TARGET_PY=${TARGET_PY:-$host_py}
    [[ $TARGET_PY =~ ^3\.([0-9]+)$ ]] \
        || die "bad --python '$TARGET_PY': give the target's CPython version as X.Y" "e.g. --python 3.12"
    ((BASH_REMATCH[1] >= 11)) \
        || die "cannot build for Python $TARGET_PY: pangea needs CPython >= 3.11" "e.g. --python 3.11 or --python 3.12"
    TARGET_XY=${TARGET_PY/./}
    local lines
    lines=$(target_py platforms "$TARGET_PLATFORM") || exit 2
    mapfile -t TARGET_TAGS <<<"$lines"
    read -r TARGET_MACHINE TARGET_LIBC TARGET_LIBC_VERSION <<<"${TARGET_TAGS[0]}"
    TARGET_TAGS=("${TARGET_TAGS[@]:1}")
    TARGET=cp$TARGET_XY-$TARGET_MACHINE
    TARGET_DESC="CPython $TARGET_PY on ${TARGET_PLATFORM:-this machine (${TARGET_TAGS[0]})}"
    PIP_TARGET=(--only-binary=:all: --python-version "$TARGET_PY" --implementation cp)
    local tag
    for tag in "${TARGET_TAGS[@]}"; do
        PIP_TARGET+=(--platform "$tag")
    done
    FIND_LINKS=(--find-links "$BUILD_DIR/local-wheels-$TARGET")
    if [[ -n $WHEELS_DIR ]]; then
        [[ $WHEELS_DIR == /* ]] || WHEELS_DIR=$CALLER_DIR/$WHEELS_DIR
        [[ -d $WHEELS_DIR ]] || die "--wheels $WHEELS_DIR: no such directory"
        WHEELS_DIR=$(cd "$WHEELS_DIR" && pwd)
        FIND_LINKS+=(--find-links "$WHEELS_DIR")
    fi
}

key_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

# The runtime closure as resolved for this interpreter: which dependencies come
# only as sdists. Cached in .build/host-report.json until requirements change.
host_report() {
    local report=$BUILD_DIR/host-report.json key
    key=$( { cat "$BUILD_DIR/requirements.txt" "$VENV/.pangea-key"; } | sha256sum | cut -d' ' -f1)
    if [[ -f $report && -f $report.key && $(cat "$report.key") == "$key" ]]; then
        return
    fi
    say "resolving the runtime closure with pip (kept in $report until the requirements change)"
    rm -f "$report" "$report.key"
    pip_logged "$BUILD_DIR/logs/host-resolve.log" "resolving the runtime requirements" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check --dry-run --ignore-installed \
        --report "$report.$$" -r "$BUILD_DIR/requirements.txt"
    mv -f "$report.$$" "$report"
    echo "$key" >"$report.key"
}

# Put a target wheel of every sdist-only dependency into .build/local-wheels-<target>.
prepare_sdist_wheels() {
    local local_dir=$BUILD_DIR/local-wheels-$TARGET spec w host_dir target_dir tpy
    local host_tag
    host_tag=$("$VENV/bin/python" -c 'import sys; print(sys.implementation.cache_tag)')-$(uname -m)
    host_dir=$BUILD_DIR/sdist-wheels/$host_tag
    target_dir=$BUILD_DIR/sdist-wheels/cpython-$TARGET_XY-$TARGET_MACHINE
    rm -rf "$local_dir"
    mkdir -p "$local_dir" "$host_dir"
    local sdists
    sdists=$(target_py sdists "$BUILD_DIR/host-report.json") || exit 2
    for spec in $sdists; do
        # 1. A target wheel the user passed with --wheels.
        if [[ -n $WHEELS_DIR ]] && w=$(target_py pick "$WHEELS_DIR" "$spec" "$TARGET_PY" "${TARGET_TAGS[@]}"); then
            say "$spec: using $w"
            cp "$w" "$local_dir/"
            continue
        fi
        # 2. Built here; a pure-Python wheel serves every target.
        if ! w=$(target_py pick "$host_dir" "$spec"); then
            say "$spec has no wheel on PyPI: building it with $VENV/bin/python"
            [[ $spec == fastecdsa==* ]] && check_toolchain
            pip_logged "$BUILD_DIR/logs/wheel-$spec.log" "building a wheel of $spec" \
                "$VENV/bin/python" -m pip wheel --disable-pip-version-check --no-deps -w "$host_dir" "$spec"
            w=$(target_py pick "$host_dir" "$spec") || die "pip wheel $spec left no wheel in $host_dir"
        fi
        if target_py pure "$w"; then
            cp "$w" "$local_dir/"
            continue
        fi
        # 3. A C extension: compile it with CPython X.Y, if this box is the target's kind.
        local name=${spec%%==*} why=""
        [[ $TARGET_MACHINE == "$(uname -m)" ]] || why="this box is $(uname -m)"
        [[ -n $why || $TARGET_LIBC == glibc ]] || why="this box uses glibc, the target $TARGET_LIBC"
        if [[ -n $why ]]; then
            die "cannot build $name for $TARGET_MACHINE ($TARGET_DESC) here: it has no wheels on PyPI and is a C extension that must be compiled for $TARGET_MACHINE ($why)" \
                "build it on the target or under emulation (python$TARGET_PY -m pip wheel --no-deps $spec -w DIR; needs gcc and libgmp-dev), then pass --wheels DIR"
        fi
        if ! w=$(target_py pick "$host_dir" "$spec" "$TARGET_PY" "${TARGET_TAGS[@]}") \
            && ! w=$(target_py pick "$target_dir" "$spec" "$TARGET_PY" "${TARGET_TAGS[@]}"); then
            tpy=$(find_target_python "$TARGET_PY") \
                || die "cannot build $name for CPython $TARGET_PY: it has no wheels on PyPI and must be compiled with CPython $TARGET_PY, which is not installed here" \
                       "install it (e.g. pyenv install $TARGET_PY) or pass --wheels DIR with a $spec wheel built on the target"
            check_toolchain
            say "$spec has no wheel on PyPI: building it with $tpy"
            mkdir -p "$target_dir"
            pip_logged "$BUILD_DIR/logs/wheel-$spec-$TARGET.log" "building a wheel of $spec with $tpy" \
                "$tpy" -m pip wheel --disable-pip-version-check --no-deps -w "$target_dir" "$spec"
            w=$(target_py pick "$target_dir" "$spec" "$TARGET_PY" "${TARGET_TAGS[@]}") \
                || die "$tpy -m pip wheel $spec gave no wheel for $TARGET_DESC in $target_dir"
        fi
        cp "$w" "$local_dir/"
    done
    if [[ $TARGET_LIBC == glibc ]]; then
        target_py check-glibc "$local_dir" "$TARGET_LIBC_VERSION" || exit 2
    fi
}

# Resolve the closure for the target (from wheels only) and pin it in
# .build/requirements-<target>.txt; cached until its inputs change.
resolve_target() {
    local report=$BUILD_DIR/report-$TARGET.json pinned=$BUILD_DIR/requirements-$TARGET.txt key
    key=$( { cat "$BUILD_DIR/requirements.txt"; echo "${PIP_TARGET[*]} ${FIND_LINKS[*]} ${DROP_DISTS[*]}"
             ls "$BUILD_DIR/local-wheels-$TARGET" ${WHEELS_DIR:+"$WHEELS_DIR"}; } | sha256sum | cut -d' ' -f1)
    if [[ -f $pinned && -f $pinned.key && $(cat "$pinned.key") == "$key" ]]; then
        say "reusing $pinned"
        return
    fi
    say "resolving the runtime closure for $TARGET_DESC"
    rm -f "$report" "$pinned.key"
    # --target: pip accepts the platform options for a dry run only with it (nothing is written).
    pip_logged "$BUILD_DIR/logs/resolve-$TARGET.log" "resolving the runtime requirements for the target" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check --dry-run --ignore-installed \
        --target "$BUILD_DIR/dry-run-$TARGET" --report "$report" "${PIP_TARGET[@]}" "${FIND_LINKS[@]}" \
        -r "$BUILD_DIR/requirements.txt"
    local lines
    lines=$(target_py pin "$report" "$BUILD_DIR/requirements.txt" "$TARGET_PY" "$TARGET_MACHINE" \
        "${DROP_DISTS[@]}") || exit 2
    echo "$lines" >"$pinned"
    echo "$key" >"$pinned.key"
}

build_target() {
    check_python
    write_requirements
    ensure_venv
    setup_target
    local started=$SECONDS
    local wheels=$BUILD_DIR/wheels-$TARGET site=$BUILD_DIR/site-$TARGET app=$BUILD_DIR/app-$TARGET
    local pinned=$BUILD_DIR/requirements-$TARGET.txt
    local out_dir=${OUT_DIR:-$ROOT}
    [[ $out_dir == /* ]] || out_dir=$CALLER_DIR/$out_dir
    mkdir -p "$out_dir" || die "cannot create --out-dir $out_dir"
    local out
    out=$(cd "$out_dir" && pwd)/pangea-$TARGET.pyz
    # One target build at a time per target (they share .build/*-<target>).
    exec 9>"$BUILD_DIR/.lock-$TARGET"
    command -v flock >/dev/null 2>&1 && flock 9
    say "building $(basename "$out") for $TARGET_DESC (platform tags: ${TARGET_TAGS[*]:0:3} ...)"
    host_report
    prepare_sdist_wheels
    resolve_target
    say "downloading $(wc -l <"$pinned") wheels for $TARGET_DESC into $wheels"
    # The wheels built here or given with --wheels are copied in afresh (pip
    # download keeps a file of the same name), so a rebuilt one is picked up.
    local f
    for f in "$BUILD_DIR/local-wheels-$TARGET"/*.whl; do
        [[ -e $f ]] && rm -f "$wheels/$(basename "$f")"
    done
    pip_logged "$BUILD_DIR/logs/download-$TARGET.log" "downloading the target's wheels" \
        "$VENV/bin/python" -m pip download --disable-pip-version-check "${PIP_TARGET[@]}" --no-deps \
        "${FIND_LINKS[@]}" -d "$wheels" -r "$pinned"
    local key
    key=$( { cat "$pinned"; echo "${PIP_TARGET[*]}"; ls "$wheels"
             cat "$BUILD_DIR/local-wheels-$TARGET"/*.whl 2>/dev/null; declare -f prune_site; } | sha256sum | cut -d' ' -f1)
    # The key sits beside the site, not in it (shiv would pack it).
    if [[ -d $site && -f $site.key && $(cat "$site.key") == "$key" ]]; then
        say "reusing $site"
    else
        say "installing them into $site"
        rm -rf "$site" "$site.key"
        # --no-compile: .pyc of this interpreter are no use to the target's;
        # shiv's --compile-pyc compiles them on the target at first run.
        pip_logged "$BUILD_DIR/logs/install-$TARGET.log" "installing the target's wheels into $site" \
            "$VENV/bin/python" -m pip install --disable-pip-version-check "${PIP_TARGET[@]}" --no-deps \
            --no-index --no-compile --find-links "$wheels" "${FIND_LINKS[@]}" --target "$site" -r "$pinned"
        prune_site "$site" "$TARGET_MACHINE"
        echo "$key" >"$site.key"
    fi
    local extensions
    extensions=$(target_py check-site "$site" "$TARGET_PY" "$TARGET_MACHINE") || exit 2
    stage_app "$app" "cpython-$TARGET_XY" "$TARGET_MACHINE" "$TARGET_PY"
    say "running shiv ($(wc -l <"$pinned") packages, $extensions compiled extensions, all cpython-$TARGET_XY $TARGET_MACHINE)"
    rm -f "$out.tmp"
    "$VENV/bin/shiv" -o "$out.tmp" -e pangea:main -p "$SHEBANG" --compile-pyc \
        --site-packages "$app" --site-packages "$site"
    finish_pyz "$out.tmp" "$out" "$TARGET_PY"
    say "built $out ($(du -h "$out" | cut -f1), $(stat -c %s "$out") bytes) in $((SECONDS - started)) s"
    say "it runs on $TARGET_DESC: copy it there and run python$TARGET_PY $(basename "$out") --help"
}

# Command line: options may come before or after `build`; everything after
# `test` goes to pytest.
COMMAND=""
TARGET_OPTION=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --python | --platform | --wheels | --out-dir)
            [[ $# -ge 2 && $2 != -* ]] || die "$1 needs a value" "see ./build.sh --help"
            set -- "$1=$2" "${@:3}"
            continue
            ;;
        --python=*) TARGET_PY=${1#*=}; TARGET_OPTION=1 ;;
        --platform=*) TARGET_PLATFORM=${1#*=}; TARGET_OPTION=1 ;;
        --wheels=*) WHEELS_DIR=${1#*=}; TARGET_OPTION=1 ;;
        --out-dir=*) OUT_DIR=${1#*=}; TARGET_OPTION=1 ;;
        -h | --help | help) usage; exit 0 ;;
        build)
            [[ -z $COMMAND ]] || break
            COMMAND=build
            ;;
        test)
            [[ -z $COMMAND ]] || break
            COMMAND=test
            shift
            break
            ;;
        *) break ;;
    esac
    shift
done
if [[ $# -gt 0 && $COMMAND != test ]]; then
    echo "build.sh: error: unknown command '$1'" >&2
    usage >&2
    exit 2
fi
if [[ $TARGET_OPTION == 1 ]]; then
    [[ -n $TARGET_PY || -n $TARGET_PLATFORM ]] \
        || die "--wheels and --out-dir are for another target's pyz: add --python X.Y and/or --platform TAG" \
               "see ./build.sh --help"
    [[ $COMMAND != test ]] \
        || die "--python/--platform build a pyz for another box; ./build.sh test runs the tests with this box's pangea.pyz" \
               "run ./build.sh --python ... first, then the tests"
fi

case ${COMMAND:-build} in
    build) if [[ $TARGET_OPTION == 1 ]]; then build_target; else build; fi ;;
    test) run_tests "$@" ;;
esac

"""Unit tests of pangea.py's session directories: the pangea home and one directory per process.

Every test points PANGEA_HOME into tmp_path; nothing touches the real ~/.pangea.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import pangea
from pangea import (
    SESSIONS_DIRNAME,
    SessionDir,
    SessionError,
    clean_stale_sessions,
    pangea_home,
    pid_alive,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dead_pid() -> int:
    """A pid no process has: above the kernel's pid_max where it can be read."""
    for pid in (4_000_000, 4_194_000, 3_999_999):
        if not pid_alive(pid):
            return pid
    pytest.skip("could not find a pid that is surely dead")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pangea-home"
    monkeypatch.setenv("PANGEA_HOME", str(path))
    return pangea_home()


# ---------------------------------------------------------------- pangea_home


def test_pangea_home_uses_env_and_creates_it_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("PANGEA_HOME", str(target))
    assert pangea_home() == target
    assert target.is_dir()
    assert mode(target) == 0o700


def test_pangea_home_tightens_an_existing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "home"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    (target / "keep.txt").write_text("x")
    monkeypatch.setenv("PANGEA_HOME", str(target))
    assert pangea_home() == target
    assert mode(target) == 0o700
    assert (target / "keep.txt").read_text() == "x"


def test_pangea_home_defaults_to_dot_pangea_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PANGEA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pangea_home() == tmp_path / ".pangea"
    assert mode(tmp_path / ".pangea") == 0o700


def test_pangea_home_empty_env_means_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANGEA_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pangea_home() == tmp_path / ".pangea"


def test_pangea_home_expands_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PANGEA_HOME", "~/custom")
    assert pangea_home() == tmp_path / "custom"


def test_pangea_home_unusable_is_session_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PANGEA_HOME", str(blocker / "home"))
    with pytest.raises(SessionError) as info:
        pangea_home()
    assert "cannot use pangea home" in str(info.value)
    assert repr(str(blocker / "home")) in str(info.value)
    assert info.value.hint is not None and "PANGEA_HOME" in info.value.hint
    assert info.value.exit_code == 2


# ---------------------------------------------------------------- create / remove


def test_session_dir_create_makes_0700_dirs_pid_and_info(home: Path) -> None:
    session = SessionDir(home, "initiator").create()
    assert session.path == home / SESSIONS_DIRNAME / f"initiator-{os.getpid()}"
    assert session.path.is_dir()
    assert mode(session.path) == 0o700
    assert mode(home / SESSIONS_DIRNAME) == 0o700
    assert (session.path / "pid").read_text() == f"{os.getpid()}\n"
    info = SessionDir.load(session.path)
    assert info["role"] == "initiator"
    assert info["pid"] == os.getpid()
    assert info["version"] == pangea.__version__
    assert isinstance(info["started"], float)
    assert session.log_path == session.path / "pangea.log"


def test_session_dir_create_with_explicit_pid(home: Path) -> None:
    session = SessionDir(home, "responder", pid=os.getpid()).create()
    assert session.path.name == f"responder-{os.getpid()}"


def test_session_dir_create_twice_is_fine(home: Path) -> None:
    session = SessionDir(home, "initiator")
    session.create()
    session.save(note="kept")
    session.create()
    assert SessionDir.load(session.path)["note"] == "kept"


def test_session_dir_remove_deletes_everything_and_is_idempotent(home: Path) -> None:
    session = SessionDir(home, "responder").create()
    session.write_addresses(["/ip4/127.0.0.1/tcp/1/p2p/x"])
    session.log_path.write_text("log line\n")
    session.remove()
    assert not session.path.exists()
    session.remove()  # again: no error
    assert (home / SESSIONS_DIRNAME).is_dir()


def test_session_dir_create_in_unusable_home_is_session_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file-home"
    blocker.write_text("")
    with pytest.raises(SessionError, match="cannot create session directory"):
        SessionDir(blocker, "initiator").create()


# ---------------------------------------------------------------- info.json


def test_session_dir_save_and_load_round_trip(home: Path) -> None:
    session = SessionDir(home, "initiator").create()
    session.save(peer_id="12D3KooWxyz", rtt_ms=1.25, checks=["a", "b"], nested={"k": [1, 2]})
    session.save(peer_id="12D3KooWabc")  # merges, last value wins
    info = SessionDir.load(session.path)
    assert info == {**session.info, "peer_id": "12D3KooWabc"}
    assert info["rtt_ms"] == 1.25 and info["nested"] == {"k": [1, 2]}
    assert json.loads((session.path / "info.json").read_text()) == info
    assert not (session.path / "info.json.tmp").exists()


def test_session_dir_write_addresses(home: Path) -> None:
    session = SessionDir(home, "initiator").create()
    addresses = ["/ip4/192.168.1.5/tcp/7777/p2p/x", "/ip4/127.0.0.1/tcp/7777/p2p/x"]
    session.write_addresses(addresses)
    assert (session.path / "addresses.txt").read_text().splitlines() == addresses
    assert SessionDir.load(session.path)["addresses"] == addresses


@pytest.mark.parametrize("content", [None, "", "{not json", "[1, 2"])
def test_session_dir_load_missing_or_corrupt_is_empty(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "info.json").write_text(content)
    assert SessionDir.load(tmp_path) == {}


# ---------------------------------------------------------------- stale sessions


def test_pid_alive_for_this_process_and_a_dead_pid() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())


def test_session_dir_create_removes_stale_session_of_dead_pid(home: Path) -> None:
    pid = dead_pid()
    stale = home / SESSIONS_DIRNAME / f"responder-{pid}"
    stale.mkdir(parents=True)
    (stale / "pid").write_text(f"{pid}\n")
    (stale / "pangea.log").write_text("old\n")
    session = SessionDir(home, "initiator").create()
    assert not stale.exists()
    assert session.path.is_dir()


def test_clean_stale_sessions_keeps_live_and_unrelated_entries(home: Path) -> None:
    root = home / SESSIONS_DIRNAME
    root.mkdir()
    pid = dead_pid()
    dead = [root / f"initiator-{pid}", root / f"responder-{pid}", root / f"serve-x-{pid}"]
    alive = root / f"responder-{os.getpid()}"
    unrelated = [root / "notes", root / "initiator-abc", root / "README"]
    for d in [*dead, alive, *unrelated[:2]]:
        d.mkdir()
    unrelated[2].write_text("a file")
    removed = clean_stale_sessions(home)
    assert sorted(removed) == sorted(dead)
    assert not any(d.exists() for d in dead)
    assert alive.is_dir()
    assert all(p.exists() for p in unrelated)


def test_clean_stale_sessions_without_sessions_dir_is_a_no_op(tmp_path: Path) -> None:
    assert clean_stale_sessions(tmp_path) == []
    assert not (tmp_path / SESSIONS_DIRNAME).exists()


def test_clean_stale_sessions_leaves_a_file_named_like_a_session(home: Path) -> None:
    root = home / SESSIONS_DIRNAME
    root.mkdir()
    decoy = root / f"initiator-{dead_pid()}"
    decoy.write_text("not a directory")
    assert clean_stale_sessions(home) == []
    assert decoy.is_file()


# ---------------------------------------------------------------- one home, several processes


def test_live_sessions_lists_the_other_running_processes_of_a_home(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = pangea.SessionDir(tmp_path, "serve").create()
    parent = pangea.SessionDir(tmp_path, "initiator", pid=os.getppid()).create()
    gone = tmp_path / pangea.SESSIONS_DIRNAME / f"responder-{dead.pid}"
    gone.mkdir()
    assert pangea.live_sessions(tmp_path) == [("initiator", os.getppid())]  # not ours, not the dead one
    assert pangea.live_sessions(tmp_path, besides=os.getppid()) == [("serve", os.getpid())]
    assert pangea.describe_sessions(pangea.live_sessions(tmp_path)) == f"initiator (pid {os.getppid()})"
    ours.remove()
    parent.remove()


def test_host_fingerprint_is_stable_and_the_test_aid_stands_for_another_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(pangea.HOST_ID_ENV, raising=False)
    here = pangea.host_fingerprint()
    assert len(here) == 16 and pangea.host_fingerprint() == here
    monkeypatch.setenv(pangea.HOST_ID_ENV, "another-box")
    assert pangea.host_fingerprint() != here

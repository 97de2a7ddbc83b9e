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


# ---------------------------------------------------------------- logs kept after a failed run


def test_logs_to_prune_keeps_the_newest_files() -> None:
    logs = [(f"log{i}", float(i), 10) for i in range(15)]  # log14 is the newest
    assert sorted(pangea.logs_to_prune(logs, keep_files=10, max_total_bytes=1000)) == sorted(
        f"log{i}" for i in range(5)
    )


def test_logs_to_prune_bounds_the_total_and_drops_everything_older() -> None:
    logs = [("old-small", 1.0, 1), ("big", 2.0, 600), ("new", 3.0, 500)]
    # "big" would take the total past 1000: it goes, and so does the older "old-small".
    assert sorted(pangea.logs_to_prune(logs, keep_files=10, max_total_bytes=1000)) == ["big", "old-small"]
    assert pangea.logs_to_prune([], keep_files=10, max_total_bytes=1000) == []
    assert pangea.logs_to_prune([("a", 1.0, 5)], keep_files=0, max_total_bytes=1000) == ["a"]


def test_log_tail_keeps_a_small_log_whole_and_cuts_a_big_one_at_a_line() -> None:
    assert pangea.log_tail(b"a\nb\n", 100) == b"a\nb\n"
    data = b"".join(b"line %05d\n" % i for i in range(1000))  # 11,000 bytes
    tail = pangea.log_tail(data, 1000)
    assert len(tail) <= 1000
    first, rest = tail.split(b"\n", 1)
    assert first.startswith(b"[pangea: the first ") and first.endswith(b" bytes of this log were dropped]")
    assert rest.startswith(b"line ") and data.endswith(rest)  # whole lines, the last ones
    dropped = int(first.split()[3])
    assert dropped == len(data) - len(rest)


def _session_with_log(home: Path, text: str, role: str = "initiator") -> SessionDir:
    session = SessionDir(home, role).create()
    session.log_path.write_text(text)
    return session


def test_keep_log_copies_the_log_with_its_rotated_files_private(home: Path) -> None:
    session = _session_with_log(home, "newest 1\nnewest 2\n")
    session.log_path.with_name("pangea.log.1").write_text("older\n")
    session.log_path.with_name("pangea.log.2").write_text("oldest\n")
    kept = session.keep_log()
    assert kept == session.kept_log_path
    assert kept.parent == home / pangea.LOGS_DIRNAME
    assert kept.name.startswith("initiator-") and kept.name.endswith(f"-{os.getpid()}.log")
    assert kept.read_text() == "oldest\nolder\nnewest 1\nnewest 2\n"
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700
    assert pangea.kept_logs(home)[0]["path"] == str(kept)


def test_keep_log_skips_a_log_that_only_says_the_process_started(home: Path) -> None:
    session = _session_with_log(home, "started\n")
    assert session.keep_log() is None
    assert not (home / pangea.LOGS_DIRNAME).exists()


def test_keep_log_is_bounded_per_file(home: Path) -> None:
    session = _session_with_log(home, "x" * 99 + "\n" + "y" * 5000 + "\nlast line\n")
    kept = session.keep_log("why it failed", max_bytes=1000)
    assert kept is not None and kept.stat().st_size <= 1000
    assert kept.read_text().endswith("last line\nwhy it failed\n")


def test_keep_log_of_a_setup_error_keeps_nothing_even_with_its_last_line(home: Path) -> None:
    session = _session_with_log(home, "started\n")
    assert session.keep_log("the run failed (cannot use port 7777)") is None


def test_keep_log_prunes_the_kept_logs_to_their_bound(home: Path) -> None:
    logs = home / pangea.LOGS_DIRNAME
    logs.mkdir(mode=0o700)
    for i in range(pangea.LOG_KEPT_FILES + 3):
        old = logs / f"responder-2020010{i % 10}-00000{i}-{i}.log"
        old.write_text("old\nlog\n")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    kept = _session_with_log(home, "a\nb\n").keep_log()
    names = [Path(entry["path"]).name for entry in pangea.kept_logs(home)]
    assert kept is not None and len(names) == pangea.LOG_KEPT_FILES
    assert names[0] == kept.name  # the newest is always kept

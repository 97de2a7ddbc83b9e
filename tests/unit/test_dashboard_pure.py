"""The dashboard's pure parts: the manager's TaskBoard, the throughput's RateHistory, the token rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pangea import (
    BOARD_RECENT,
    ConfigError,
    RateHistory,
    TaskBoard,
    dashboard_endpoint,
    dashboard_request_token,
)


def test_the_board_follows_a_task_from_the_queue_to_the_recent_list() -> None:
    board = TaskBoard()
    board.start(1, "matmul", "auto", now=10.0)
    (queued,) = board.snapshot(now=10.5)["running"]
    assert queued["state"] == "queued" and queued["attempts"] == 0 and queued["seconds"] == 0.5
    board.attempt(1, "peer-a", now=11.0)
    board.attempt(1, "peer-b", now=12.0)  # a retry elsewhere
    (running,) = board.snapshot(now=12.5)["running"]
    assert running["state"] == "running" and running["where"] == "peer-b" and running["workers"] == ["peer-a", "peer-b"]
    assert running["queued_s"] == 1.0 and running["seconds"] == 2.5
    board.end(1, "ok", now=13.0)
    snap = board.snapshot(now=20.0)
    assert snap["running"] == [] and snap["recent"][0]["state"] == "ok" and snap["recent"][0]["seconds"] == 3.0


def test_a_split_job_counts_its_workers_shares_and_its_blocks_stay_off_the_recent_list() -> None:
    board = TaskBoard()
    board.start(5, "add", "split", now=0.0, rows=100)
    for block, (worker, rows) in enumerate([("a", 30), ("b", 50), ("a", 20)]):
        board.start(6 + block, "add", "auto", now=0.1, part_of=5)
        board.attempt(6 + block, worker, now=0.1)
        board.end(6 + block, "ok", now=0.2)
        board.block(5, worker, rows)
    board.end(5, "ok", now=1.0)
    (job,) = board.snapshot(now=2.0)["recent"]  # the blocks are not listed: their job is
    assert job["shares"] == {"a": {"rows": 50, "blocks": 2}, "b": {"rows": 50, "blocks": 1}}
    assert job["rows"] == 100 and job["queued_s"] == 0.0 and job["seconds"] == 1.0


def test_the_board_is_bounded() -> None:
    board = TaskBoard(max_running=2)
    for i in range(5):
        board.start(i, "add", "auto", now=0.0)
    assert len(board.running) == 2 and board.snapshot(0.0)["unlisted"] == 3
    board.end(4, "ok", now=1.0)  # not followed: nothing to end
    board.end(0, "ok", now=1.0)
    board.end(1, "ok", now=1.0)
    for i in range(BOARD_RECENT + 10):
        board.start(100 + i, "add", "auto", now=0.0)
        board.end(100 + i, "deadline", now=1.0)
    assert len(board.snapshot(2.0)["recent"]) == BOARD_RECENT


def test_rates_come_from_the_counters_between_samples_and_the_history_is_bounded() -> None:
    history = RateHistory(limit=3)
    history.add(0.0, 0, 0)
    history.add(2.0, 4_000_000, 2_000_000)
    assert history.rates() == [{"at": 2.0, "in_mb_s": 2.0, "out_mb_s": 1.0}]
    history.add(3.0, 4_000_000, 2_000_000)
    history.add(4.0, 5_000_000, 2_000_000)
    assert [r["at"] for r in history.rates()] == [3.0, 4.0] and history.rates()[-1]["in_mb_s"] == 1.0


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/?token=abc", {}, ("abc", True)),
        ("/api/snapshot", {"authorization": "Bearer abc"}, ("abc", False)),
        ("/", {"cookie": "theme=dark; pangea_token=a%2Bb"}, ("a+b", False)),
        ("/", {"authorization": "Basic abc"}, ("", False)),
        ("/", {}, ("", False)),
    ],
)
def test_the_token_of_a_request(target: str, headers: dict[str, str], expected: tuple[str, bool]) -> None:
    assert dashboard_request_token(target, headers) == expected


def test_a_dashboard_off_loopback_needs_a_token_and_gets_a_certificate_browsers_take(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ConfigError) as refused:
        dashboard_endpoint("0.0.0.0:0", "", tmp_path)  # serve --rpc-open: no token to ask for
    assert "without a token" in str(refused.value)
    assert dashboard_endpoint(None, "", tmp_path) is None
    local = dashboard_endpoint("127.0.0.1:0", "", tmp_path)
    assert local is not None and local.tls_pem is None and local.token == ""
    guarded = dashboard_endpoint("0.0.0.0:0", "s3cret", tmp_path)
    assert guarded is not None and guarded.token == "s3cret" and guarded.tls_pem is not None
    cert = x509.load_pem_x509_certificate(guarded.tls_pem.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)  # not Ed25519: browsers refuse that
    assert guarded.tls_pem.stat().st_mode & 0o077 == 0

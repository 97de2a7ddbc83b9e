"""Unit tests of the pure helpers of `pangea.pyz bench` (bench/pangea_bench.py): targets, rows,
the table, options.

No sockets and no timing: the figures are made up; what is checked is the
arithmetic (ratios, quantiles, rates), whether a target counts as met, and
that the table is aligned and says "-" for what was not measured.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from typing import Any

import pytest

import pangea
from pangea import UsageError, make_parser
from pangea_bench import (
    BULK_TARGET,
    INFO_TARGET,
    LATENCY_TARGET,
    OVERHEAD_TARGET,
    RATE_TARGET,
    BenchConfig,
    BenchTarget,
    bench_config,
    bench_reps,
    bench_row,
    bench_rows,
    format_bench_table,
    format_bench_value,
    latency_summary,
    parse_sizes_mib,
    percentile,
    rate_summary,
)

# ---------------------------------------------------------------- quantiles and summaries


def test_percentile_is_the_nearest_rank() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 0.5) == 3.0
    assert percentile(samples, 0.0) == 1.0
    assert percentile(samples, 1.0) == 5.0
    assert percentile(samples, 0.9) == 5.0
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_rate_summary_is_the_median_rate_with_every_sample() -> None:
    summary = rate_summary(100_000_000, [1.0, 2.0, 0.5])
    assert summary["mb_s"] == pytest.approx(100.0)  # median time 1.0 s
    assert summary["mb_s_samples"] == pytest.approx([100.0, 50.0, 200.0])
    assert summary["seconds"] == [1.0, 2.0, 0.5] and summary["bytes"] == 100_000_000


def test_latency_summary_gives_ms_quantiles_and_the_rate_over_the_wall_time() -> None:
    summary = latency_summary([0.001] * 9 + [0.010], wall_s=0.5)
    assert summary["count"] == 10
    assert summary["p50_ms"] == pytest.approx(1.0)
    assert summary["p99_ms"] == pytest.approx(10.0)
    assert summary["per_s"] == pytest.approx(20.0)


# ---------------------------------------------------------------- targets and rows


@pytest.mark.parametrize(
    ("value", "ratio", "met"),
    [
        (1500.0, 5.0, True),
        (1500.0, 3.0, False),  # fast, but not 4x the baseline
        (900.0, 5.0, False),  # 4x, but under 1 GB/s
        (900.0, None, False),  # a failed absolute bound is a "no" even without a baseline
        (1500.0, None, None),  # the ratio part cannot be judged without a baseline
        (None, None, None),
    ],
)
def test_bulk_target_needs_both_the_ratio_and_the_rate(
    value: float | None, ratio: float | None, met: bool | None
) -> None:
    assert BULK_TARGET.met(value, ratio) is met


def test_targets_of_the_issue() -> None:
    assert LATENCY_TARGET.met(3.0, 1.2) is True and LATENCY_TARGET.met(3.0, 1.21) is False
    assert LATENCY_TARGET.met(3.0, None) is None
    assert RATE_TARGET.met(1000.0, None) is True and RATE_TARGET.met(999.0, 99.0) is False
    assert OVERHEAD_TARGET.met(0.1, None) is True and OVERHEAD_TARGET.met(0.11, 0.1) is False
    assert INFO_TARGET.met(1.0, 1.0) is None  # no bounds: nothing to meet


def test_a_target_with_an_upper_and_a_lower_bound() -> None:
    band = BenchTarget("between", min_value=1.0, max_value=2.0)
    assert [band.met(v, None) for v in (0.5, 1.0, 2.0, 2.5)] == [False, True, True, False]


def test_bench_row_ratio_is_pangea_over_baseline() -> None:
    row = bench_row("k", "bulk upload", "MB/s", 300.0, 150.0, "libp2p stream", BULK_TARGET)
    assert row.ratio == pytest.approx(2.0)
    assert row.met is False and row.target == BULK_TARGET.text
    assert bench_row("k", "m", "MB/s", 300.0, None, "x", BULK_TARGET).ratio is None
    assert bench_row("k", "m", "MB/s", 300.0, 0.0, "x", BULK_TARGET).ratio is None  # no division by zero
    assert bench_row("k", "m", "MB/s", None, 150.0, "x", BULK_TARGET).ratio is None


def _results(tcp: bool = True) -> dict[str, Any]:
    """Results shaped like run_bench's, with made-up figures."""
    rate = {"mb_s": 200.0}
    bulk: dict[str, Any] = {
        "pangea": {"upload_64": {"mb_s": 400.0}, "download_64": {"mb_s": 300.0}},
        "libp2p": {"upload_64": rate, "download_64": rate},
        "tcp": {"upload_64": {"mb_s": 1000.0}, "download_64": {"mb_s": 1000.0}} if tcp else {},
    }
    tasks = {
        "pangea_sequential": {"p50_ms": 2.0, "per_s": 500.0},
        "echo_sequential": {"p50_ms": 1.0, "per_s": 1000.0},
        "pangea_inflight": {"p50_ms": 4.0, "per_s": 1200.0},
        "echo_inflight": {"p50_ms": 2.0, "per_s": 3000.0},
    }
    matmul = {"n": 2048, "overhead_s": 0.5, "libp2p_s": 0.25}
    config = {"sizes_mib": [64], "inflight": 8}
    return {"config": config, "bulk": bulk, "tasks": tasks, "matmul": matmul}


def test_bench_rows_have_every_metric_with_its_baseline_and_target() -> None:
    rows = {row.key: row for row in bench_rows(_results())}
    assert list(rows) == [
        "bulk_upload_64",
        "bulk_upload_64_vs_tcp",
        "bulk_download_64",
        "bulk_download_64_vs_tcp",
        "task_p50",
        "tasks_per_s",
        "tasks_per_s_inflight",
        "matmul_overhead",
    ]
    assert rows["bulk_upload_64"].ratio == pytest.approx(2.0)
    assert rows["bulk_upload_64_vs_tcp"].ratio == pytest.approx(0.4)
    assert rows["bulk_upload_64_vs_tcp"].met is None  # raw TCP is information, not a target
    assert rows["task_p50"].ratio == pytest.approx(2.0) and rows["task_p50"].met is False
    assert rows["tasks_per_s_inflight"].met is True  # 1200/s >= 1000/s
    assert rows["tasks_per_s_inflight"].metric == "tasks/s 8 in flight"
    assert rows["matmul_overhead"].ratio == pytest.approx(2.0) and rows["matmul_overhead"].met is False
    assert rows["matmul_overhead"].metric == "matmul 2048x2048 overhead"


def test_bench_rows_leave_out_raw_tcp_when_it_was_not_measured() -> None:
    keys = [row.key for row in bench_rows(_results(tcp=False))]
    assert "bulk_upload_64_vs_tcp" not in keys and "bulk_upload_64" in keys


def test_bench_rows_without_any_baseline_have_no_ratios() -> None:
    results = _results(tcp=False)
    results["bulk"]["libp2p"] = {}
    for key in ("echo_sequential", "echo_inflight"):
        del results["tasks"][key]
    del results["matmul"]["libp2p_s"]
    rows = bench_rows(results)
    assert all(row.ratio is None and row.baseline is None for row in rows)
    assert all(row.pangea is not None for row in rows)
    by_key = {row.key: row for row in rows}
    assert by_key["task_p50"].met is None  # a ratio target cannot be judged
    assert by_key["tasks_per_s"].met is False  # an absolute one can: 500/s < 1000/s


# ---------------------------------------------------------------- the table


def test_format_bench_value_by_unit() -> None:
    assert format_bench_value(None, "MB/s") == "-"
    assert format_bench_value(1234.4, "MB/s") == "1234 MB/s"
    assert format_bench_value(3.14159, "MB/s") == "3.14 MB/s"
    assert format_bench_value(0.6912, "ms") == "0.691 ms"
    assert format_bench_value(0.0512, "s") == "0.051 s"
    assert format_bench_value(1359.6, "1/s") == "1360/s"


def test_format_bench_table_is_aligned_with_a_rule_and_dashes_for_the_missing() -> None:
    results = _results()
    results["bulk"]["libp2p"] = {}
    text = format_bench_table(bench_rows(results))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "pangea", "baseline", "ratio", "target", "met"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    starts = [lines[0].index(" " + h) + 1 for h in ("pangea", "baseline", "ratio", "target", "met")]
    rule_starts = [i for i, c in enumerate(lines[1]) if c == "-" and (i == 0 or lines[1][i - 1] == " ")]
    assert rule_starts[1:] == starts  # every column starts where its header does
    upload = next(line for line in lines if line.startswith("bulk upload 64 MiB"))
    assert upload[starts[0] :].startswith("400 MB/s")
    assert upload[starts[1] :].startswith("- ")  # no baseline measured
    assert upload[starts[2] :].startswith("- ")  # so no ratio
    assert upload.rstrip().endswith("no")  # 400 MB/s < 1000 MB/s fails regardless
    p50 = next(line for line in lines if line.startswith("tiny task p50"))
    assert "1.000 ms (echo p50)" in p50 and "2.00x" in p50 and p50.rstrip().endswith("no")


@pytest.mark.parametrize("width", [80, 120])
def test_format_bench_table_fits_the_width_and_keeps_every_cell(width: int) -> None:
    rows = bench_rows(_results())
    wide, narrow = format_bench_table(rows), format_bench_table(rows, width)
    assert max(len(line) for line in narrow.splitlines()) <= width, narrow

    def text(table: str) -> list[str]:  # every character but the rule's
        lines = table.splitlines()
        return sorted("".join(" ".join(lines[:1] + lines[2:]).split()))

    assert text(narrow) == text(wide)


# ---------------------------------------------------------------- options


def test_parse_sizes_mib() -> None:
    assert parse_sizes_mib("64") == [64]
    assert parse_sizes_mib(" 64, 1024 ") == [64, 1024]


@pytest.mark.parametrize("text", ["", "64,", "0", "-1", "1.5", "big", "4096"])
def test_parse_sizes_mib_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UsageError, match="--sizes-mib"):
        parse_sizes_mib(text)


def _config(*argv: str) -> BenchConfig:
    return bench_config(make_parser().parse_args(["bench", *argv]))


def test_bench_config_defaults_quick_and_explicit_options() -> None:
    full = _config()
    assert (full.sizes_mib, full.tasks, full.matmul_n, full.reps, full.inflight) == ([64], 1000, 2048, 3, 8)
    quick = _config("--quick")
    assert quick.quick and quick.sizes_mib == [4] and quick.tasks < full.tasks and quick.reps == 1
    mixed = _config("--quick", "--tasks", "7", "--sizes-mib", "64,1024")
    assert mixed.tasks == 7 and mixed.sizes_mib == [64, 1024] and mixed.matmul_n == quick.matmul_n


@pytest.mark.parametrize(
    "argv", [["--tasks", "0"], ["--inflight", "0"], ["--inflight", "65"], ["--matmul-n", "1"], ["--reps", "0"]]
)
def test_bench_config_refuses_values_out_of_range(argv: list[str]) -> None:
    with pytest.raises(UsageError, match=argv[0]):
        _config(*argv)


def test_bench_reps_at_most_three_for_large_sizes() -> None:
    cfg = _config()
    assert bench_reps(cfg, 64) == 3 and bench_reps(cfg, 1024) == 3
    many = dataclasses.replace(cfg, reps=7)
    assert bench_reps(many, 64) == 7 and bench_reps(many, 1024) == 3


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "--listen", "/ip4/127.0.0.1/tcp/1/p2p/x"], "either --listen"),
        (["bench", "--code", "ABCD-EFGH-JKMN"], "--code goes with an ADDRESS"),
        (["bench", "--sizes-mib", "lots"], "--sizes-mib"),
        (["bench", "--timeout", "0"], "--timeout"),
    ],
)
def test_bench_usage_errors_are_one_line(
    argv: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PANGEA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(pangea, "build_info", lambda: None)
    assert pangea.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("pangea: error: ") and needle in err[0], err
    assert len(err) <= 2 and all(line.startswith("hint: ") for line in err[1:]), err
    assert not (tmp_path / "home" / "compute_test").exists() or not any((tmp_path / "home" / "compute_test").iterdir())

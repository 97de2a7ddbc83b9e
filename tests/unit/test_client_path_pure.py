"""Unit tests of the pure parts of bench/client_path.py: summaries, rates, verdicts and the table.

No sockets, no processes, no timing: the figures are made up; what is checked is
the arithmetic, whether a target counts as met (or cannot be judged because an
anchor is absent), and what the table shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from client_path import (
    ANCHORS,
    JOBS,
    Row,
    Summary,
    Target,
    blas_threads_of,
    breakdown,
    format_cell,
    format_value,
    make_rows,
    mb_per_s_each_way,
    p50,
    parse_only,
    peak_ratio,
    summarize,
    table,
    verdict,
)
from client_path_driver import check, compute, operands


def test_summarize_gives_median_min_max_and_count() -> None:
    assert summarize([3.0, 1.0, 2.0, 10.0, 4.0]) == Summary(3.0, 1.0, 10.0, 5)
    assert summarize([2.0, 4.0]) == Summary(3.0, 2.0, 4.0, 2)
    assert summarize([]) is None


def test_mb_per_s_each_way_counts_half_the_crossing() -> None:
    # 64 MB there and back in 0.1 s of crossing: 0.05 s each way, 1280 MB/s
    assert mb_per_s_each_way(64_000_000, wall_s=0.3, compute_s=0.2) == pytest.approx(1280.0)
    assert mb_per_s_each_way(1, wall_s=0.2, compute_s=0.2) == math.inf


def test_p50_and_peak_ratio() -> None:
    assert p50([0.004, 0.001, 0.002]) == 0.002
    assert peak_ratio(hwm_kib=3 << 20, rss_before_kib=1 << 20, operand_bytes=1 << 30) == 2.0


def test_verdict_against_an_absolute_bound() -> None:
    target = Target("<=", 0.15)
    assert verdict(target, Summary(0.15, 0.1, 0.2, 5), {}) == "yes"
    assert verdict(target, Summary(0.16, 0.1, 0.2, 5), {}) == "no"
    assert verdict(Target(">=", 2000), Summary(2500, 2000, 3000, 5), {}) == "yes"


def test_verdict_against_a_multiple_of_a_baseline_median() -> None:
    ray = {"Ray": Summary(0.4, 0.3, 0.9, 5)}
    assert verdict(Target("<=", 1.5, "Ray"), Summary(0.6, 0.5, 0.7, 5), ray) == "yes"
    assert verdict(Target("<=", 1.5, "Ray"), Summary(0.61, 0.5, 0.7, 5), ray) == "no"
    tcp = {"raw TCP": Summary(1000, 900, 1100, 5)}
    assert verdict(Target(">=", 0.8, "raw TCP"), Summary(799, 700, 900, 5), tcp) == "no"


def test_verdict_when_a_figure_is_missing() -> None:
    assert verdict(Target("<=", 1.0, "Ray"), Summary(1, 1, 1, 1), {"Ray": None}) == "n/a (Ray absent)"
    assert verdict(Target("<=", 1.0, "Ray"), Summary(1, 1, 1, 1), {}) == "n/a (Ray absent)"
    assert verdict(Target("<=", 1.0), None, {}) == "n/a (not measured)"
    assert verdict(None, Summary(1, 1, 1, 1), {}) == "-"


def test_target_text_names_the_bound_or_the_baseline() -> None:
    assert Target("<=", 0.15).text("s") == "<= 0.15 s"
    assert Target(">=", 2000).text("MB/s") == ">= 2000 MB/s"
    assert Target("<=", 1.3).text("x") == "<= 1.3x"
    assert Target(">=", 0.8, "raw TCP").text("MB/s") == ">= 0.8x raw TCP"


def test_format_value_and_cell_per_unit() -> None:
    assert format_value(1234.56, "MB/s") == "1235"
    assert format_value(0.61234, "ms") == "0.61"
    assert format_value(0.1523, "s") == "0.152"
    assert format_value(math.inf, "MB/s") == "inf"
    assert format_cell(Summary(0.2, 0.1, 0.3, 5), "s") == "0.200 (0.100-0.300)"
    assert format_cell(Summary(0.2, 0.2, 0.2, 1), "s") == "0.200"  # one round: no spread
    assert format_cell(Summary(0.2, 0.1, 0.3, 5), "s", spread=False) == "0.200"
    assert format_cell(None, "s") == "-"


def filled(row: Row, pangea: list[float], **baselines: list[float]) -> Row:
    row.pangea = pangea
    row.baselines = {name.replace("_", " "): values for name, values in baselines.items()}
    return row


def test_table_shows_each_anchor_target_and_verdict() -> None:
    rows = make_rows(2048, 64, 512, 64, 4)
    wall = filled(rows["matmul.wall"], [1.0, 0.9, 1.2], numpy=[0.3], raw_TCP=[0.4], Ray=[0.5], Dask=[0.8])
    out = table([wall], absent={}).splitlines()
    assert out[0] == "| row | pangea (min-max) | numpy | raw TCP | Ray | Dask | target | met |"
    assert out[1] == "|---|---|---|---|---|---|---|---|"
    assert (
        out[2]
        == "| 2048 matmul remote: wall (s) | 1.000 (0.900-1.200) | 0.300 | 0.400 | 0.500 | 0.800 | <= 1.5x Ray | no |"
    )


def test_table_marks_absent_anchors_and_cannot_judge_against_them() -> None:
    rows = make_rows(2048, 64, 512, 64, 4)
    tiny = filled(rows["tiny.local"], [0.6, 0.7], raw_TCP=[0.2, 0.3])  # an absent anchor adds no column
    (line,) = table([tiny], absent={"Ray": "no interpreter", "Dask": "no interpreter"}).splitlines()[2:]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        "tiny task p50, local (ms)",
        "0.65 (0.60-0.70)",
        "-",
        "0.25",
        "absent",
        "absent",
        "<= 1x Ray",
        "n/a (Ray absent)",
    ]


def test_table_shows_a_non_anchor_reference_in_the_target() -> None:
    rows = make_rows(2048, 64, 512, 64, 4)
    four = filled(rows["threads.4"], [900.0, 1000.0, 950.0], **{"1 thread": [400.0, 420.0, 410.0]})
    (line,) = table([four], absent={}).splitlines()[2:]
    assert ">= 2x 1 thread (410) | yes |" in line
    assert "| - | - | - | - |" in line  # no anchor runs this row


def test_make_rows_has_every_target_of_the_issue() -> None:
    rows = make_rows(2048, 64, 512, 64, 4)
    assert {key.split(".")[0] for key in rows} == set(JOBS)
    want = {
        "matmul.wall": Target("<=", 1.5, "Ray"),
        "matmul.overhead": Target("<=", 0.15),
        "roundtrip.local": Target(">=", 2000),
        "roundtrip.remote": Target(">=", 0.8, "raw TCP"),
        "tiny.local": Target("<=", 1.0, "Ray"),
        "tiny.remote": Target("<=", 1.0, "Ray"),
        "threads.4": Target(">=", 2.0, "1 thread"),
        "rss.client": Target("<=", 1.3),
        "rss.a": Target("<=", 1.5),
        "rss.b": Target("<=", 1.3),
        "first": Target(">=", 0.8),
    }
    assert {key: rows[key].target for key in want} == want
    assert set(ANCHORS) == {"numpy", "raw TCP", "Ray", "Dask"}


def test_parse_only_keeps_the_run_order_and_refuses_unknown_jobs() -> None:
    assert parse_only(None) == list(JOBS)
    assert parse_only("tiny,matmul") == ["matmul", "tiny"]
    assert parse_only("tiny.remote,rss.a") == ["tiny", "rss"]  # a row key names its job
    with pytest.raises(SystemExit, match="bad --only 'tiny,nope': expected some of matmul,"):
        parse_only("tiny,nope")


def test_blas_threads_of_reads_the_option_before_argparse() -> None:
    assert blas_threads_of(["--quick"]) == "2"
    assert blas_threads_of(["--blas-threads", "1"]) == "1"
    assert blas_threads_of(["--blas-threads=3", "--quick"]) == "3"


@pytest.mark.parametrize("job", ["matmul", "roundtrip", "tiny"])
def test_driver_check_accepts_numpy_and_refuses_a_wrong_result(job: str) -> None:
    args = operands({"job": job, "n": 16, "mib": 1})
    out, seconds = compute(job, args)
    check(job, args, out)
    assert seconds >= 0
    wrong = out.copy()
    wrong.flat[3] += 1.0
    with pytest.raises(ValueError, match=f"a wrong {job} result"):
        check(job, args, wrong)


def test_driver_operands_are_the_same_in_every_process() -> None:
    (a,) = operands({"job": "roundtrip", "mib": 1})
    assert a.nbytes == 1 << 20
    assert np.array_equal(a, np.random.default_rng(20261203).standard_normal(a.size))


def test_breakdown_gives_the_median_of_each_timing_in_call_order() -> None:
    samples = [
        {"wall_s": 1.0, "rpc_s": 0.2, "queue_s": 0.0, "transfer_s": 0.3, "compute_s": 0.5, "total_s": 0.8},
        {"wall_s": 3.0, "rpc_s": 0.4, "queue_s": 0.0, "transfer_s": 0.5, "compute_s": 2.1, "total_s": 2.6},
    ]
    assert breakdown({"matmul.remote": samples, "roundtrip.local": []}) == [
        "- pangea matmul.remote: median s: wall 2.000, client<->A (rpc_s) 0.300, queue 0.000, "
        "A<->B (transfer_s) 0.400, compute 1.300"
    ]

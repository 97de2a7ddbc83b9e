"""Unit tests of the pure parts of bench/task_queue.py: paired ratios, costs, verdicts, the restart's rows.

No sockets, no processes, no timing: the figures are made up; what is checked is the
arithmetic, when a target counts as met, the spec the restart journals take, and what
the table and the verdict lines show.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import pangea
from task_queue import (
    DEFAULT_SPEC,
    RESTART_KEY_PREFIX,
    Figures,
    Summary,
    added_ms_per_task,
    burst_sizes,
    first_and_last,
    format_figure,
    format_table,
    met,
    paired_ratios,
    report,
    restart_key,
    restart_operand,
    summarize,
    template_spec,
    throughput_loss,
    time_cost,
    verdicts,
)


def test_summarize_gives_median_min_max_and_count() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Summary(2.0, 1.0, 3.0, 3)
    assert summarize([]) is None


def test_paired_ratios_divide_round_by_round_and_refuse_unpaired_figures() -> None:
    assert paired_ratios([2.0, 3.0], [4.0, 3.0]) == [0.5, 1.0]
    assert paired_ratios([1.0], [0.0]) == []
    with pytest.raises(ValueError, match="not paired"):
        paired_ratios([1.0, 2.0], [1.0])


def test_costs_read_a_lower_throughput_and_a_longer_time_as_positive() -> None:
    assert throughput_loss(0.93) == pytest.approx(0.07)
    assert time_cost(1.04) == pytest.approx(0.04)
    assert throughput_loss(1.1) < 0 and time_cost(0.9) < 0


def test_met_is_yes_at_the_limit_no_above_and_na_without_a_figure() -> None:
    assert met(0.10, 0.10) == "yes"
    assert met(0.11, 0.10) == "NO"
    assert met(None, 0.10) == "n/a"
    assert met(float("nan"), 0.10) == "n/a"


def test_added_ms_per_task_is_the_difference_of_the_inverse_rates() -> None:
    assert added_ms_per_task(Summary(400.0, 0, 0, 1), Summary(500.0, 0, 0, 1)) == pytest.approx(0.5)
    assert added_ms_per_task(None, Summary(500.0, 0, 0, 1)) is None


def test_restart_tasks_have_distinct_keys_and_operands_under_the_inline_limit() -> None:
    assert restart_key(7) == f"{RESTART_KEY_PREFIX}00007"
    a, b = restart_operand(0), restart_operand(1)
    assert a.dtype == np.float64 and a.shape == (3, 4) and not np.array_equal(a, b)
    assert 2 * a.nbytes <= pangea.QUEUE_INLINE_MAX_BYTES
    assert pangea.check_task_key(restart_key(99999)) == restart_key(99999)


def test_template_spec_takes_a_real_add_row_and_falls_back_to_the_default() -> None:
    real = dict(DEFAULT_SPEC, timeout_s=120.0)
    spec, origin = template_spec(json.dumps(real))
    assert spec == real and "wrote in this run" in origin
    for bad in (None, "", "not json", json.dumps({"params": []}), json.dumps(dict(DEFAULT_SPEC, operands=1))):
        spec, origin = template_spec(bad)
        assert spec == DEFAULT_SPEC and "no real row" in origin


def test_default_spec_reads_back_as_the_queue_reads_a_journaled_add() -> None:
    assert pangea.params_from_json(DEFAULT_SPEC["params"]) == {}
    assert set(DEFAULT_SPEC) >= {"params", "placement", "timeout_s", "fallback", "check", "held", "operands"}


def test_first_and_last_are_seconds_from_the_spawn() -> None:
    assert first_and_last(100.0, [101.5, 100.75, 103.0]) == (0.75, 3.0)
    with pytest.raises(ValueError):
        first_and_last(100.0, [])


def test_format_figure_gives_median_and_spread_in_its_unit() -> None:
    assert format_figure(Summary(412.4, 400.0, 430.0, 5), "tasks/s") == "412 tasks/s (400-430)"
    assert format_figure(Summary(1.0234, 1.0, 1.1, 1), "x") == "1.023x"
    assert format_figure(None, "s") == "-"


def test_format_table_pads_columns_under_a_rule() -> None:
    text = format_table(("a", "bb"), [("xyz", "1")])
    assert text.splitlines() == ["a    bb", "---  --", "xyz  1"]


def made_up(tiny_journal: list[float], copy_journal: list[float]) -> Figures:
    fig = Figures()
    fig.tiny = {"journal": tiny_journal, "none": [500.0] * len(tiny_journal)}
    fig.transfer = {"journal": copy_journal, "none": [0.1] * len(copy_journal)}
    fig.bare_ready, fig.restart_ready, fig.first, fig.last = [0.8], [0.9], [1.2], [2.5]
    return fig


def test_verdicts_judge_each_target_on_the_median_of_the_paired_ratios() -> None:
    ok = verdicts(made_up([480.0, 460.0, 300.0], [0.102, 0.104, 0.2]), 64, 1000)
    assert [v.met for v in ok] == ["yes", "yes", "yes"]
    assert ok[0].figure == pytest.approx(0.08) and ok[1].figure == pytest.approx(0.04)
    bad = verdicts(made_up([400.0], [0.11]), 64, 1000)
    assert [v.met for v in bad] == ["NO", "NO", "yes"]
    assert [v.met for v in verdicts(Figures(), 64, 1000)] == ["n/a", "n/a", "n/a"]


def test_report_shows_every_figure_and_the_count_of_targets_met() -> None:
    args = argparse.Namespace(
        pairs=2, reps=3, restarts=1, tiny=300, kernel="copy", mib=64, tasks=1000, quick=False, same_nodes=False
    )
    text = report(made_up([480.0, 460.0, 300.0], [0.102, 0.104, 0.2]), args, 60.0, (1.0, 1.5))
    assert "spawn -> first of 1000 resumed" in text and "0.800 s bare start-up" in text
    assert "the journal adds" in text and "2 pair(s) of nodes x 3 interleaved round(s)" in text
    assert text.splitlines()[-1] == "verdict: 3 of 3 targets met"


def test_burst_sizes_split_a_round_evenly_and_keep_every_task() -> None:
    assert burst_sizes(10, 4) == [4, 3, 3]
    assert burst_sizes(300, 50) == [50] * 6
    assert burst_sizes(7, 50) == [7]
    assert sum(burst_sizes(301, 50)) == 301

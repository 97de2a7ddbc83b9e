"""bench/bench.py runs end to end with tiny sizes and writes its JSON report.

Correctness only: every phase runs without error and the report has its
shape (machine info, one table row per metric with pangea, baseline, ratio,
target and met). No figure is asserted: timings on a shared 2-core machine
say nothing in a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import NodeHome

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench" / "bench.py"
TINY = [
    "--quick",
    "--bulk-mib", "1",
    "--rss-mib", "4",
    "--tasks", "10",
    "--inflight", "2",
    "--matmul-n", "64",
    "--reps", "1",
    "--start-reps", "1",
]  # fmt: skip
ROW_KEYS = {"metric", "unit", "pangea", "baseline", "baseline_name", "ratio", "target", "met"}


def test_bench_tiny_run_writes_every_phase_and_a_full_table(pyz: Path, pangea_home: NodeHome, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), *TINY, "--pyz", str(pyz), "--json", str(out)],
        env=pangea_home.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.stdout.lstrip().startswith("metric"), run.stdout

    doc = json.loads(out.read_text())
    assert doc["errors"] == {}
    machine = doc["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"].count(".") == 2
    assert "OPENBLAS_CORETYPE" in machine["env"] and "numpy" in machine

    results = doc["results"]
    for phase in ("tcp", "bulk", "tasks", "matmul", "rss", "start"):
        assert phase in results and "error" not in results[phase], (phase, results.get(phase))
        assert results["load"][phase]["wall_s"] > 0
    assert results["pangea_connection"]["security"].startswith("/noise")
    assert set(results["bulk"]["pangea"]) == set(results["bulk"]["libp2p"]) == {"upload_1", "download_1"}
    assert results["tasks"]["ran_on"] == {"peer": 10 + 10 // 2 * 2}  # the sequential and the in-flight tasks
    for direction in ("upload", "download"):
        assert results["rss"][direction]["worker_peak_mib"] >= results["rss"][direction]["worker_idle_mib"]

    table = doc["table"]
    assert {tuple(sorted(row)) for row in table} == {tuple(sorted(ROW_KEYS))}
    metrics = [row["metric"] for row in table]
    # bulk each way (+ raw TCP), tasks, matmul, rss, start (+ the python3-direct rows), link (+ raw TCP)
    assert len(metrics) == len(set(metrics)) == 2 * 2 + 4 + 2 + 4 + 4 + 2 * 2
    link_rows = [row for row in table if "link" in row["metric"]]
    if os.geteuid() == 0:  # the link phase builds namespaces: it runs as root, and is skipped otherwise
        assert "error" not in results["link"] and results["link"]["data_plane"].startswith("TLS 1.3"), results["link"]
        assert all(row["baseline"] > 0 for row in link_rows), link_rows
    else:
        assert results["link"] == {"skipped": "needs root (ip netns, tc)"}
        table = [row for row in table if row not in link_rows]
    for row in table:
        assert isinstance(row["pangea"], float | int), row
        assert row["met"] in (True, False, None)
        if row["target"] != "info":
            assert isinstance(row["met"], bool), row

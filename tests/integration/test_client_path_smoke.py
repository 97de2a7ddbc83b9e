"""bench/client_path.py --quick runs end to end against the built pyz and fills every pangea row.

Correctness only: with the Ray and Dask interpreters pointed at a missing path,
every pangea figure and the raw TCP and numpy baselines are measured (each result
checked by the script), the absent anchors are skipped with a note, and the
targets that need them cannot be judged. No figure is asserted: timings on a
shared 2-core machine say nothing in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import NodeHome

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "client_path.py"


def test_client_path_quick_fills_every_pangea_row_and_skips_absent_anchors(
    pyz: Path, pangea_home: NodeHome, tmp_path: Path
) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    out = tmp_path / "client_path.json"
    argv = [sys.executable, str(SCRIPT), "--quick", "--pyz", str(pyz), "--json", str(out)]
    argv += ["--ray-python", str(missing), "--dask-python", str(missing)]
    run = subprocess.run(
        argv, env=pangea_home.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"

    doc = json.loads(out.read_text())
    assert doc["quick"] and doc["rounds"] == 1 and doc["blas_threads"] == 2
    assert set(doc["absent"]) == {"Ray", "Dask"}
    assert all(str(missing) in why and "pip install" in why for why in doc["absent"].values())
    rows = {row["key"]: row for row in doc["rows"]}
    assert set(rows) == {
        "matmul.wall",
        "matmul.overhead",
        "roundtrip.local",
        "roundtrip.remote",
        "tiny.local",
        "tiny.remote",
        "threads.1",
        "threads.4",
        "rss.client",
        "rss.a",
        "rss.b",
        "first",
    }
    for key, row in rows.items():
        assert row["pangea"] is not None and len(row["pangea"]["samples"]) == 1, key
        assert row["pangea"]["median"] > 0 or key.startswith("rss."), row
        assert not {"Ray", "Dask"} & set(row["baselines"]), row
    assert rows["matmul.wall"]["baselines"].keys() == {"numpy", "raw TCP"}
    for key in ("roundtrip.remote", "tiny.local", "matmul.overhead"):
        assert rows[key]["baselines"].keys() == {"raw TCP"}, rows[key]
    assert rows["threads.4"]["baselines"].keys() == {"1 thread"}
    for key in ("matmul.wall", "tiny.local", "tiny.remote"):
        assert rows[key]["met"] == "n/a (Ray absent)", rows[key]
    assert {rows[k]["met"] for k in ("matmul.overhead", "roundtrip.remote", "rss.a", "first")} <= {"yes", "no"}

    table = run.stdout.splitlines()
    assert "| row | pangea (min-max) | numpy | raw TCP | Ray | Dask | target | met |" in table
    tiny = next(line for line in table if line.startswith("| tiny task p50, local"))
    assert "| absent | absent |" in tiny
    assert f"- Ray: absent: no interpreter at {missing}" in run.stdout

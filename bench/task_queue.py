#!/usr/bin/env python3
"""What serve's durable task queue costs: a node journaling its tasks against one with no journal.

Usage (from the repo root, after ./build.sh):

    .build/venv/bin/python bench/task_queue.py                  # every target (one to two minutes)
    .build/venv/bin/python bench/task_queue.py --quick          # a smoke run: rough figures
    .build/venv/bin/python bench/task_queue.py --reps 15 --restarts 5 --json queue.json

(Not bench/queue.py: a file of that name shadows the standard library's ``queue``
for every script run from bench/ and for pytest, whose conftest puts bench/ first
on sys.path; concurrent.futures then fails with "module 'queue' has no attribute
'SimpleQueue'", and mypy checks client_path.py's ``queue.Queue`` against it.)

What runs, all on 127.0.0.1 (bench/nodes.py: ports 0, a home of each in a
temporary directory, stopped at the end; a restart takes an RPC port found free,
the one its journal is named after). Two serve nodes at once: one with the
journal (the default, SQLite in WAL mode under $PANGEA_HOME/queue/<rpc port>/) and
one with ``--state-max-gib 0`` (no journal: the same queue, in memory only), each
with a `pangea.Client` in this process. Each round measures both, in an order that
alternates per round, and the figure of a target is the median over the rounds of
the round's ratio (journal / none), so drift of the machine hits both sides alike.
The rounds run on --pairs pairs of fresh nodes, one pair after the other, the
journaling node started first in one pair and second in the next: a process has
offsets of its own (where its memory landed, which node and Client started first:
up to 4% in the A/A check, ``--same-nodes``), and with one pair they would all fall
on one side.

  tiny      --tiny sequential ``Client.submit("add", a, a)`` of a 3x4 float64 per
            node per round, in bursts of 50 alternating between the nodes:
            tasks/s (target: the journal loses <= 10% of them).
  transfer  --copies ``Client.submit("copy", b)`` of a --mib MiB float64 array per
            node per round, alternating, each timed whole; a round's figure is their median
            (target: <= 5% slower with the journal).
  restart   a journal of --tasks queued tasks (small keyed ``add`` tasks), then
            ``serve --rpc 127.0.0.1:P`` on it: from spawning the process to the
            first of those tasks finished (target: <= 2 s), and to all finished,
            against the bare start-up of the same pyz (spawn to its ready line,
            with an empty journal), alternating per --restarts.

How the restart's journal is made, and why. A node only leaves tasks "queued" in
its journal when it is killed while they wait, and it holds at most 64 RPC calls
(and runs at most 64 tasks) at once, so 1,000 real submits would need 64 long
tasks blocking the runners and clients that go away while the rest wait; with
operands large enough to keep the runners busy for seconds those are gigabytes of
memory and disk, and the restart would then run those blockers first. So the
journal is written with pangea's own classes (``TaskJournal.open``, ``JournalRow``,
``journal.add``: what the node runs for every task it accepts, small operands
inline), with the spec of a real ``add`` row the journaling node wrote earlier in
the run, in a child process run by the pyz's own interpreter and packages
(``SHIV_INTERPRETER=1 pangea.pyz bench/task_queue.py``: the pangea that serves,
not the work tree's) that ends without closing the database, as a killed node
leaves it (its WAL not folded in). Each restart reads a fresh one. The node's
log must say it read back all of them; the run checks a few answers (a + a) through
``Client.result`` by their keys after timing. Finished times are the node's own
(the journal's ``finished``, unix seconds) minus the spawn time taken here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO_ROOT), str(REPO_ROOT / "bench")) if p not in sys.path]

from client_path import Summary, summarize  # noqa: E402

MIB = 1 << 20
TINY_SHAPE = (3, 4)
TINY_BURST = 50  # tiny adds in a row on one node before the other node's turn
RESTART_KEY_PREFIX = "bench-restart-"
# The spec TaskQueue.accept journals for a plain `add` (the run takes the one a real row has).
DEFAULT_SPEC: dict[str, Any] = {
    "params": [],
    "placement": "auto",
    "timeout_s": 600.0,
    "fallback": True,
    "check": "",
    "held": [],
    "operands": 2,
}
CLIENT_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 120.0  # from spawn until every task of the journal has finished
POLL_S = 0.02  # how often the journal is read while the restarted node works (the figures are its timestamps)
WRITER_TIMEOUT_S = 120.0
FULL = {"pairs": 3, "reps": 6, "tiny": 300, "copies": 5, "mib": 64, "restarts": 5, "tasks": 1000}
QUICK = {"pairs": 1, "reps": 2, "tiny": 50, "copies": 1, "mib": 16, "restarts": 1, "tasks": 100}


# ---------------------------------------------------------------------------
# Pure parts: summaries, costs, verdicts, the journal's rows, the table
# ---------------------------------------------------------------------------


def paired_ratios(journal: Sequence[float], none: Sequence[float]) -> list[float]:
    """Each round's journal / none (rounds where none is 0 are left out)."""
    if len(journal) != len(none):
        raise ValueError(f"{len(journal)} journal figures for {len(none)} without: not paired")
    return [j / n for j, n in zip(journal, none, strict=True) if n > 0]


def burst_sizes(n: int, burst: int) -> list[int]:
    """``n`` tasks in bursts of at most ``burst``, as even as they come (10, 4 -> 4 3 3)."""
    count = max(1, math.ceil(n / burst))
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def throughput_loss(ratio: float) -> float:
    """The share of throughput the journal costs, from journal / none tasks/s (0.93 -> 0.07)."""
    return 1.0 - ratio


def time_cost(ratio: float) -> float:
    """The share of time the journal adds, from journal / none seconds (1.04 -> 0.04)."""
    return ratio - 1.0


def added_ms_per_task(journal: Summary | None, none: Summary | None) -> float | None:
    """Milliseconds a task takes longer with the journal, from the median tasks/s of each (None: unmeasured)."""
    if journal is None or none is None or journal.median <= 0 or none.median <= 0:
        return None
    return 1e3 * (1.0 / journal.median - 1.0 / none.median)


def met(value: float | None, limit: float) -> str:
    """ "yes" when ``value`` <= ``limit``, "NO" when above, "n/a" when it was not measured."""
    if value is None or math.isnan(value):
        return "n/a"
    return "yes" if value <= limit else "NO"


def restart_operand(i: int) -> Any:
    """The operand of restart task ``i`` (3x4 float64, different for each task)."""
    import numpy as np

    return np.arange(12, dtype=np.float64).reshape(TINY_SHAPE) + float(i)


def restart_key(i: int) -> str:
    """The key of restart task ``i``."""
    return f"{RESTART_KEY_PREFIX}{i:05d}"


def template_spec(found: str | None) -> tuple[dict[str, Any], str]:
    """The spec for the restart's rows: the one of a real `add` row (JSON text), else DEFAULT_SPEC; and
    where it came from. A row without the keys the queue reads back is not taken."""
    if found:
        try:
            spec = json.loads(found)
        except ValueError:
            spec = None
        if isinstance(spec, dict) and set(DEFAULT_SPEC) <= set(spec) and spec.get("operands") == 2:
            return spec, "the spec of an `add` row the journaling node wrote in this run"
    return dict(DEFAULT_SPEC), "pangea's spec of an `add` as written in bench/task_queue.py (no real row found)"


def first_and_last(spawned: float, finished: Sequence[float]) -> tuple[float, float]:
    """Seconds from ``spawned`` to the first and to the last of the ``finished`` times (unix seconds)."""
    if not finished:
        raise ValueError("no task finished")
    return min(finished) - spawned, max(finished) - spawned


def format_figure(summary: Summary | None, unit: str) -> str:
    """ "median (min-max)" in the unit's precision; "-" when there is none."""
    if summary is None:
        return "-"
    digits = {"tasks/s": 0, "s": 3, "x": 3}.get(unit, 3)

    def one(v: float) -> str:
        return f"{v:.{digits}f}"

    text = f"{one(summary.median)}{'' if unit == 'x' else ' '}{unit}"
    return text if summary.n < 2 else f"{text} ({one(summary.low)}-{one(summary.high)})"


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the head."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [head, tuple("-" * w for w in widths), *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines)


@dataclass
class Figures:
    """Everything measured, per round or per restart."""

    tiny: dict[str, list[float]] = field(default_factory=lambda: {"journal": [], "none": []})  # tasks/s
    transfer: dict[str, list[float]] = field(default_factory=lambda: {"journal": [], "none": []})  # s
    bare_ready: list[float] = field(default_factory=list)  # s, spawn -> ready line, empty journal
    restart_ready: list[float] = field(default_factory=list)  # s, spawn -> ready line, the journal of --tasks
    first: list[float] = field(default_factory=list)  # s, spawn -> first task of the journal finished
    last: list[float] = field(default_factory=list)  # s, spawn -> all of them finished
    write_s: list[float] = field(default_factory=list)  # s to write each journal (not part of any figure)
    writer: str = ""  # the file of the pangea that wrote the restart journals
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """One target: its figure, its limit, and how the table shows them."""

    name: str
    figure: float | None
    limit: float
    text: str  # the figure as the verdict line says it

    @property
    def met(self) -> str:
        return met(self.figure, self.limit)


def verdicts(fig: Figures, mib: int, tasks: int) -> list[Verdict]:
    """The three targets from the figures."""
    tiny = summarize(paired_ratios(fig.tiny["journal"], fig.tiny["none"]))
    big = summarize(paired_ratios(fig.transfer["journal"], fig.transfer["none"]))
    first = summarize(fig.first)
    loss = throughput_loss(tiny.median) if tiny else None
    extra = time_cost(big.median) if big else None
    return [
        Verdict(
            "tiny-task throughput, journal vs none",
            loss,
            0.10,
            "n/a" if loss is None else f"{loss:+.1%} of tasks/s lost (target <= 10%)",
        ),
        Verdict(
            f"{mib} MiB transfer time, journal vs none",
            extra,
            0.05,
            "n/a" if extra is None else f"{extra:+.1%} time (target <= +5%)",
        ),
        Verdict(
            f"restart to first resumed task, {tasks} queued",
            first.median if first else None,
            2.0,
            "n/a" if first is None else f"{first.median:.3f} s (target <= 2 s)",
        ),
    ]


def report(fig: Figures, args: argparse.Namespace, elapsed_s: float, load: tuple[float, float]) -> str:
    """The table, its notes and the verdict, as printed."""
    tiny_r = summarize(paired_ratios(fig.tiny["journal"], fig.tiny["none"]))
    big_r = summarize(paired_ratios(fig.transfer["journal"], fig.transfer["none"]))
    bare = summarize(fig.bare_ready)
    first = summarize(fig.first)
    since_ready = summarize([f - b for f, b in zip(fig.first, fig.bare_ready, strict=False)])
    found = verdicts(fig, args.mib, args.tasks)
    head = ("figure", "journal", "no journal / baseline", "journal / none", "target", "met")
    rows = [
        (
            f"tiny add {TINY_SHAPE[0]}x{TINY_SHAPE[1]}, {args.tiny} sequential",
            format_figure(summarize(fig.tiny["journal"]), "tasks/s"),
            format_figure(summarize(fig.tiny["none"]), "tasks/s"),
            format_figure(tiny_r, "x"),
            ">= 0.90x (<= 10% lost)",
            found[0].met,
        ),
        (
            f"{args.kernel} of {args.mib} MiB float64",
            format_figure(summarize(fig.transfer["journal"]), "s"),
            format_figure(summarize(fig.transfer["none"]), "s"),
            format_figure(big_r, "x"),
            "<= 1.05x (<= 5% slower)",
            found[1].met,
        ),
        (
            f"spawn -> first of {args.tasks} resumed",
            format_figure(first, "s"),
            format_figure(bare, "s") + " bare start-up",
            "-",
            "<= 2 s",
            found[2].met,
        ),
        (f"spawn -> all {args.tasks} resumed", format_figure(summarize(fig.last), "s"), "-", "-", "-", "-"),
        (
            "spawn -> ready line",
            format_figure(summarize(fig.restart_ready), "s"),
            format_figure(bare, "s") + " empty journal",
            "-",
            "-",
            "-",
        ),
        ("first resumed - bare start-up", format_figure(since_ready, "s"), "-", "-", "-", "-"),
    ]
    notes = list(fig.notes)
    added = added_ms_per_task(summarize(fig.tiny["journal"]), summarize(fig.tiny["none"]))
    if added is not None:
        notes.insert(0, f"tiny tasks: the journal adds {added:.3f} ms a task (1 / median tasks/s, journal - none)")
    lines = [
        f"pangea task queue: journal (SQLite WAL) vs --state-max-gib 0, on 127.0.0.1; {args.pairs} pair(s) of "
        f"nodes x {args.reps} interleaved round(s), {0 if args.same_nodes else args.restarts} restart(s); "
        f"median (min-max); {os.cpu_count()} cores, load {load[0]:.2f} -> {load[1]:.2f}, {elapsed_s:.0f} s"
        + (" (--quick: rough figures)" if args.quick else ""),
        *(
            ["A/A CHECK (--same-nodes): the 'journal' column is a second node without a journal"]
            if args.same_nodes
            else []
        ),
        "",
        format_table(head, rows),
        "",
        *[f"- {note}" for note in notes],
        "",
    ]
    ok = sum(1 for v in found if v.met == "yes")
    lines += [f"verdict: {v.met:3}  {v.name}: {v.text}" for v in found]
    lines.append(f"verdict: {ok} of {len(found)} targets met")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The restart's journal: written by a child process with pangea's own classes
# ---------------------------------------------------------------------------


def writer_main(directory: Path, tasks: int, spec: dict[str, Any]) -> int:
    """Journal ``tasks`` queued `add` tasks in ``directory`` as TaskQueue.accept does, then end without
    closing the database (as a killed node leaves it); one JSON line: rows, seconds and the pangea that wrote
    them. Run by the pyz's interpreter (SHIV_INTERPRETER=1), so that pangea is the one that serves."""
    if os.environ.get("SHIV_INTERPRETER"):  # NOTE: the pyz's pangea, not the work tree's (it may differ)
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]
        sys.modules.pop("pangea", None)  # NOTE: client_path, imported above, took the work tree's
    import pangea

    journal, note = pangea.TaskJournal.open(directory)
    if note:
        print(json.dumps({"error": note}), flush=True)
        return 1
    started = time.perf_counter()
    seq = journal.next_seq()
    for i in range(tasks):
        a = restart_operand(i)
        out_bytes = pangea.output_nbytes("add", [a, a], {})
        row = pangea.JournalRow(
            "t" + os.urandom(8).hex(),
            restart_key(i),
            seq + i,
            "add",
            dict(spec),
            "queued",
            time.time(),
            reserved=2 * int(a.nbytes) + out_bytes,
        )
        journal.add(row, [(0, a, ""), (1, a, "")])
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": tasks, "seconds": seconds, "pangea": pangea.__file__}), flush=True)
    os._exit(0)  # NOTE: no close: the WAL stays as a node killed with -9 leaves it


def write_journal(pyz: Path, directory: Path, tasks: int, spec: Mapping[str, Any]) -> tuple[float, str]:
    """Run the writer child with the pyz's interpreter and packages; the seconds it took and the file of the
    pangea that wrote the journal."""
    cmd = [str(pyz), str(Path(__file__).resolve()), "--role", "write-journal", "--dir", str(directory)]
    cmd += ["--tasks", str(tasks), "--spec", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")} | {"SHIV_INTERPRETER": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=WRITER_TIMEOUT_S, env=env)
    lines = done.stdout.strip().splitlines()
    doc = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if done.returncode or doc.get("rows") != tasks:
        raise SystemExit(f"task_queue.py: cannot write the journal: {doc.get('error') or done.stderr[-2000:]}")
    return float(doc["seconds"]), str(doc["pangea"])


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def build_stamp(pyz: Path) -> tuple[int, int]:
    """The pyz's modification time (ns) and size: another engineer's ./build.sh during a run changes them."""
    st = pyz.stat()
    return st.st_mtime_ns, st.st_size


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a node whose journal must be that of a known RPC port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def journal_path(home_pangea: Path, port: int) -> Path:
    """Where a serve node of this PANGEA_HOME keeps the journal of RPC port ``port``."""
    import pangea

    return home_pangea / pangea.QUEUE_DIRNAME / str(port) / pangea.QUEUE_JOURNAL_FILENAME


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a journal a node writes (WAL: it never blocks the node)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        yield db
    finally:
        db.close()


def journal_rows(path: Path, kernel: str) -> int:
    """Rows of ``kernel`` tasks in a journal."""
    with read_only(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM tasks WHERE kernel = ?", (kernel,)).fetchone()[0])


def port_of(node: Any) -> int:
    """The RPC port of a node (its "127.0.0.1:N")."""
    return int(str(node.rpc).rsplit(":", 1)[1])


def check_close(got: Any, want: Any, what: str) -> None:
    """SystemExit when an answer differs from numpy's."""
    import numpy as np

    if not (np.shape(got) == np.shape(want) and np.array_equal(got, want)):
        raise SystemExit(f"task_queue.py: the answer of {what} differs from numpy's")


class Pair:
    """The two live nodes (journal, none) and a Client of each."""

    def __init__(self, clients: Mapping[str, Any], kernel: str, mib: int) -> None:
        import numpy as np

        self.clients = clients
        self.kernel = kernel
        self.tiny_a = np.arange(12, dtype=np.float64).reshape(TINY_SHAPE)
        self.big = np.random.default_rng(7).standard_normal(mib * MIB // 8)
        self.want_big = self.big.copy() if kernel == "copy" else self.big.sum()

    def tiny(self, side: str, n: int) -> float:
        """Seconds of ``n`` sequential tiny adds (the last answer checked)."""
        client = self.clients[side]
        start = time.perf_counter()
        for _ in range(n):
            out = client.submit("add", self.tiny_a, self.tiny_a)
        seconds = time.perf_counter() - start
        check_close(out, self.tiny_a + self.tiny_a, f"a tiny add ({side})")
        return seconds

    def tiny_round(self, order: Sequence[str], n: int) -> dict[str, float]:
        """tasks/s of each side over ``n`` tiny adds, run in bursts of TINY_BURST alternating A B B A ...,
        so that a change of the machine's load within the round hits both sides alike."""
        seconds = dict.fromkeys(order, 0.0)
        bursts = burst_sizes(n, TINY_BURST)
        for k, size in enumerate(bursts):
            for side in order if k % 2 == 0 else order[::-1]:
                seconds[side] += self.tiny(side, size)
        return {side: n / s for side, s in seconds.items()}

    def transfer(self, side: str, check: bool) -> float:
        """Seconds of one large task, timed whole."""
        start = time.perf_counter()
        out = self.clients[side].submit(self.kernel, self.big)
        seconds = time.perf_counter() - start
        if check:
            if self.kernel == "copy":
                check_close(out, self.want_big, f"the {self.kernel} ({side})")
            elif not math.isclose(float(out), float(self.want_big), rel_tol=1e-9, abs_tol=1e-6):
                raise SystemExit(f"task_queue.py: the {self.kernel} ({side}) differs from numpy's")
        del out
        return seconds


def measure_pair(pyz: Path, base: Path, args: argparse.Namespace, fig: Figures, k: int) -> str:
    """Targets 1 and 2 on pair ``k`` of two live nodes, interleaved (the journaling node and its Client
    started first in even pairs, second in odd ones); return the spec of a real `add` row the journaling
    node wrote (JSON text, "" when none was found)."""
    import nodes

    journal_args = ("--state-max-gib", "0") if args.same_nodes else ()
    starts = [("journal", journal_args), ("none", ("--state-max-gib", "0"))]
    if k % 2:
        starts.reverse()
    with contextlib.ExitStack() as stack:
        started = {side: stack.enter_context(nodes.serving(pyz, base / f"pair{k}", side, *a)) for side, a in starts}
        journal_node, none_node = started["journal"], started["none"]
        opened = {side: stack.enter_context(started[side].client(timeout_s=CLIENT_TIMEOUT_S)) for side, _ in starts}
        clients = {side: opened[side] for side in ("journal", "none")}
        for side, client in clients.items():
            if not client.shared_memory:
                fig.notes.append(f"the {side} node's Client has no shared-memory path: {client.shared_memory_note}")
        db_path = journal_path(journal_node.home.pangea_home, port_of(journal_node))
        none_dir = none_node.home.pangea_home / "queue"
        pair = Pair(clients, args.kernel, args.mib)
        for side in clients:  # NOTE: unrecorded warm-up: first touches of memory, the first calls' set-up
            pair.tiny(side, max(20, args.tiny // 5))  # (seconds, not kept)
            for _ in range(2):
                pair.transfer(side, check=True)
        rows_before = 0 if args.same_nodes else journal_rows(db_path, args.kernel)
        for i in range(args.reps):
            print(f"task_queue.py: pair {k + 1}/{args.pairs}, round {i + 1}/{args.reps}", file=sys.stderr, flush=True)
            order = ("journal", "none") if i % 2 == 0 else ("none", "journal")
            for side, rate in pair.tiny_round(order, args.tiny).items():
                fig.tiny[side].append(rate)
            samples: dict[str, list[float]] = {"journal": [], "none": []}
            for j in range(args.copies):
                for side in order if j % 2 == 0 else order[::-1]:
                    samples[side].append(pair.transfer(side, check=j == 0))
            for side in order:
                fig.transfer[side].append(statistics.median(samples[side]))
        if args.same_nodes:
            return ""
        with read_only(db_path) as db:
            found = db.execute("SELECT spec FROM tasks WHERE kernel = 'add' ORDER BY seq DESC LIMIT 1").fetchone()
            counts = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
        rows_after = journal_rows(db_path, args.kernel)
        timed = args.reps * args.copies
        fig.notes.append(
            f"pair {k + 1}'s journaling node: {sum(counts.values())} rows in {db_path.name} at the end "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); of the {timed} timed {args.mib} MiB "
            f"{args.kernel} tasks {rows_after - rows_before} got a row (a large operand is journaled only once its "
            "task has run 0.25 s: QUEUE_JOURNAL_LARGE_AFTER_S; a row still 'queued' is of a task answered just "
            "before the end: its collected mark follows its answer by QUEUE_COLLECT_AFTER_S, 1 s or more)"
        )
        journals = list(none_dir.glob("*/*.sqlite3")) if none_dir.exists() else []
        fig.notes.append(
            f"pair {k + 1}'s node with --state-max-gib 0: "
            + (f"unexpected journal(s) {', '.join(map(str, journals))}" if journals else "no journal on disk, as asked")
        )
    return str(found[0]) if found else ""


def wait_resumed(proc: Any, db_path: Path, tasks: int, spawned: float) -> list[float]:
    """Poll the journal until its ``tasks`` tasks have finished; their finished times (unix seconds).
    SystemExit when the node exits, a task fails, or it takes over RESTART_TIMEOUT_S."""
    deadline = spawned + RESTART_TIMEOUT_S
    query = (
        "SELECT state, finished FROM tasks WHERE key LIKE ? AND finished > 0"
        " AND state IN ('done', 'failed', 'collected')"
    )
    with read_only(db_path) as db:
        while True:
            finished = db.execute(query, (RESTART_KEY_PREFIX + "%",)).fetchall()
            failed = [r for r in finished if r[0] == "failed"]
            if failed:
                raise SystemExit(
                    f"task_queue.py: {len(failed)} resumed task(s) failed; the node's output:\n{proc.output()}"
                )
            if len(finished) >= tasks:
                return [float(r[1]) for r in finished]
            if proc.returncode is not None or time.time() > deadline:
                why = "exited" if proc.returncode is not None else f"took over {RESTART_TIMEOUT_S:g} s"
                raise SystemExit(
                    f"task_queue.py: the restarted node {why} with {len(finished)} of {tasks} tasks finished:\n"
                    f"{proc.output()}"
                )
            time.sleep(POLL_S)


def bare_start(pyz: Path, base: Path, i: int) -> float:
    """Seconds from spawning `serve` with an empty journal to its ready line."""
    import nodes

    home = nodes.node_home(base, f"bare-{i}")
    spawned = time.time()
    node = nodes.ready(nodes.launch(pyz, home, "--rpc", f"127.0.0.1:{free_port()}", name=f"bare-{i}"), home)
    ready = time.time() - spawned
    node.stop()
    return ready


def restart(pyz: Path, base: Path, i: int, tasks: int, spec: Mapping[str, Any], fig: Figures) -> None:
    """One restart on a fresh journal of ``tasks`` queued tasks: its figures into ``fig``."""
    import nodes

    home = nodes.node_home(base, f"restart-{i}")
    port = free_port()
    db_path = journal_path(home.pangea_home, port)
    seconds, fig.writer = write_journal(pyz, db_path.parent, tasks, spec)
    fig.write_s.append(seconds)
    spawned = time.time()
    proc = nodes.launch(pyz, home, "--rpc", f"127.0.0.1:{port}", name=f"restart-{i}")
    try:
        node = nodes.ready(proc, home)
        fig.restart_ready.append(time.time() - spawned)
        if port_of(node) != port:
            raise SystemExit(f"task_queue.py: the node serves RPC on {node.rpc}, not on port {port} of its journal")
        try:
            said = proc.wait_for_line(r"task queue: (\d+) task\(s\) read back from .*: (\d+) to run again", 10.0)
        except AssertionError:
            raise SystemExit(f"task_queue.py: the restarted node read back no tasks:\n{proc.output()}") from None
        if int(said.group(2)) != tasks:
            raise SystemExit(f"task_queue.py: the node read back {said.group(2)} tasks to run, not {tasks}")
        first, last = first_and_last(spawned, wait_resumed(proc, db_path, tasks, spawned))
        fig.first.append(first)
        fig.last.append(last)
        with node.client(timeout_s=CLIENT_TIMEOUT_S) as client:  # after timing: a few answers, by their keys
            for k in sorted({0, tasks // 2, tasks - 1}):
                a = restart_operand(k)
                check_close(client.result(restart_key(k)), a + a, f"resumed task {restart_key(k)}")
    finally:
        proc.stop()


def run(args: argparse.Namespace) -> tuple[Figures, float, tuple[float, float]]:
    """Every measurement; the figures, the seconds it took and the load before and after."""
    fig = Figures()
    if not args.pyz.is_file():
        raise SystemExit(f"task_queue.py: no pangea.pyz at {args.pyz}: run ./build.sh first (or pass --pyz)")
    build = build_stamp(args.pyz)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pangea-bench-queue-") as tmp:
        base = Path(tmp)
        found = ""
        for k in range(args.pairs):  # NOTE: fresh processes per pair: an offset of one process (its memory, its
            found = measure_pair(args.pyz, base, args, fig, k) or found  # start order) does not stay on one side
        if args.same_nodes:
            fig.notes.append("A/A check (--same-nodes): both nodes run --state-max-gib 0; every ratio should be 1")
        spec, origin = template_spec(found)
        for i in range(0 if args.same_nodes else args.restarts):
            print(f"task_queue.py: restart {i + 1}/{args.restarts}", file=sys.stderr, flush=True)
            if i % 2 == 0:
                fig.bare_ready.append(bare_start(args.pyz, base, i))
                restart(args.pyz, base, i, args.tasks, spec, fig)
            else:
                restart(args.pyz, base, i, args.tasks, spec, fig)
                fig.bare_ready.append(bare_start(args.pyz, base, i))
    if not args.same_nodes:
        fig.notes.append(
            f"restart journals: {args.tasks} queued add tasks of {TINY_SHAPE[0]}x{TINY_SHAPE[1]} float64 "
            f"(operands inline), written by TaskJournal.add of the pyz's own pangea ({fig.writer}) in a child that "
            "exits without closing the database "
            f"(as kill -9 leaves it), {statistics.median(fig.write_s):.2f} s to add the rows of each ("
            f"{1e6 * statistics.median(fig.write_s) / args.tasks:.0f} us a task); spec: {origin}: {json.dumps(spec)}"
        )
        fig.notes.append(
            "restart figures: the journal's own 'finished' times (the node's clock) minus the spawn time here; "
            "the node's log said it read back every task; answers of tasks 0, n/2 and n-1 checked after timing"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(build[0] / 1e9))
    if build_stamp(args.pyz) != build:
        fig.notes.append(f"WARNING: {args.pyz} changed during the run (rebuilt?): the figures may mix two builds")
    else:
        fig.notes.append(f"pyz: {args.pyz} of {stamp}, {build[1] / MIB:.0f} MiB, unchanged during the run")
    return fig, time.monotonic() - started, (load_before, os.getloadavg()[0])


def as_json(fig: Figures, args: argparse.Namespace, elapsed_s: float) -> dict[str, Any]:
    """Every sample and verdict, for --json."""
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "role"},
        "cores": os.cpu_count(),
        "elapsed_s": elapsed_s,
        "tiny_tasks_per_s": fig.tiny,
        "transfer_s": fig.transfer,
        "bare_ready_s": fig.bare_ready,
        "restart_ready_s": fig.restart_ready,
        "first_resumed_s": fig.first,
        "all_resumed_s": fig.last,
        "journal_write_s": fig.write_s,
        "notes": fig.notes,
        "verdicts": [
            {"name": v.name, "figure": v.figure, "limit": v.limit, "met": v.met}
            for v in verdicts(fig, args.mib, args.tasks)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run, print the table and the verdict."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Targets: journaling loses <= 10% of tiny-task throughput and adds <= 5% to a 64 MiB "
        "transfer; a restart on 1,000 queued tasks finishes the first of them <= 2 s after the process starts.",
    )
    parser.add_argument("--pyz", type=Path, default=REPO_ROOT / "pangea.pyz", help="the pangea.pyz to serve with")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, small sizes, rough figures")
    parser.add_argument(
        "--pairs",
        type=int,
        help=f"pairs of fresh nodes, started in alternating order, one after the other (default {FULL['pairs']})",
    )
    parser.add_argument(
        "--reps", type=int, help=f"interleaved rounds of tiny and transfer on each pair (default {FULL['reps']})"
    )
    parser.add_argument("--tiny", type=int, help=f"sequential tiny adds per node per round (default {FULL['tiny']})")
    parser.add_argument("--copies", type=int, help=f"large tasks per node per round (default {FULL['copies']})")
    parser.add_argument("--mib", type=int, help=f"MiB of the large task's float64 operand (default {FULL['mib']})")
    parser.add_argument(
        "--kernel", choices=("copy", "sum"), default="copy", help="the large task: copy (there and back) or sum"
    )
    parser.add_argument("--restarts", type=int, help=f"restarts, each beside a bare start (default {FULL['restarts']})")
    parser.add_argument("--tasks", type=int, help=f"queued tasks in each restart's journal (default {FULL['tasks']})")
    parser.add_argument(
        "--same-nodes",
        action="store_true",
        help="A/A check of the method: both nodes without a journal (the ratios should be 1), no restarts",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample to this file")
    parser.add_argument("--role", choices=("main", "write-journal"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "write-journal":
        return writer_main(args.dir, args.tasks, json.loads(args.spec))
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name} needs a whole number >= 1")
    os.environ.setdefault("PANGEA_MDNS", "off")
    fig, elapsed_s, load = run(args)
    print(report(fig, args, elapsed_s, load))
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(fig, args, elapsed_s), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The task queue without a network: `TaskJournal` on a real SQLite file, `TaskQueue` on trio.

What is checked: the journal keeps a task with its operands (small ones inside it, large ones in
.npy files written whole or not at all), gives them back bit for bit, records answers and forgets
them; a journal that cannot be read (garbage, truncated, another schema version) is moved aside with
one line and an empty one starts; a lost array file is said, not read as zeros. The queue answers a
call, writes the answer of a call that went away, reads unfinished tasks back and runs them again
once, leaves answered ones alone, attaches a second call of the same key to the same task, refuses a
used key and a task over its quota, and leaves tasks unfinished in the journal when the node stops.
"""

from __future__ import annotations

import json
import re
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import pangea
from pangea import (
    ErrorKind,
    JournalRow,
    JournalUnreadable,
    MemoryBudget,
    TaskError,
    TaskJournal,
    TaskOutcome,
    TaskOutputRecord,
    TaskQueue,
)

SPEC = {"params": [], "placement": "auto", "timeout_s": 60.0, "fallback": True, "check": ""}


def row(task_id: str, seq: int, state: str = "queued", key: str = "") -> JournalRow:
    return JournalRow(task_id, key, seq, "add", dict(SPEC, held=[], operands=2), state, 1_700_000_000.0 + seq)


# ---------------------------------------------------------------- pure helpers


def test_a_key_is_printable_ascii_of_at_most_128_characters() -> None:
    assert pangea.check_task_key("job-1/step_2") == "job-1/step_2"
    assert pangea.check_task_key("") == ""
    for bad in ("a b", "é", "x" * 129, "tab\t"):
        with pytest.raises(TaskError, match="bad task key") as info:
            pangea.check_task_key(bad)
        assert info.value.kind == ErrorKind.BAD_INPUT


def test_params_survive_the_journal_as_they_were() -> None:
    params: dict[str, pangea.ParamValue] = {"axis": (0, 1), "ord": "fro", "ddof": 1.0, "n": 3}
    back = pangea.params_from_json(json.loads(json.dumps(pangea.params_to_json(params))))
    assert back == params and isinstance(back["axis"], tuple)


def test_an_answer_survives_the_journal_with_its_outputs() -> None:
    record = TaskOutputRecord(
        ran_on="local",
        attempts=(pangea.AttemptInfoRecord("local", "ok"),),
        timings=pangea.TimingsRecord(0.1, 0.0, 0.5, 0.75),
        verification="local",
    )
    out = np.arange(6.0).reshape(2, 3)
    back = pangea.record_from_json(pangea.record_to_json(record), [out])
    assert back == record and np.array_equal(back.outputs[0], out)


# ---------------------------------------------------------------- the journal


def test_a_task_and_its_operands_come_back_bit_for_bit(tmp_path: Path) -> None:
    journal, note = TaskJournal.open(tmp_path / "q")
    assert note == ""
    small = np.array([[1.5, np.nan], [np.inf, -0.0]])
    large = np.arange(200_000, dtype=np.int64).reshape(400, 500)  # over QUEUE_INLINE_MAX_BYTES: a file
    assert journal.write_file("t1-in1.npy", large)
    journal.add(row("t1", 1, key="k1"), [(0, small, ""), (1, large, "t1-in1.npy")])
    a, b = journal.arrays("t1", "in")
    assert a.tobytes() == small.tobytes() and b.dtype == large.dtype and np.array_equal(b, large)
    assert journal.find("k1") is not None and journal.find("t1") is not None and journal.find("x") is None
    assert [r.task_id for r in journal.rows()] == ["t1"] and journal.next_seq() == 2
    mode = stat.S_IMODE(journal.path.stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_an_answer_replaces_the_operands_and_collecting_it_drops_its_arrays(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    big = np.ones((300, 300))
    journal.write_file("t1-in0.npy", big)
    journal.add(row("t1", 1), [(0, big, "t1-in0.npy"), (1, big, "t1-in0.npy")])
    journal.write_file("t1-out0.npy", big * 2)
    journal.finish("t1", "done", 1.0, "{}", [(0, big * 2, "t1-out0.npy")])
    assert not (journal.files / "t1-in0.npy").exists()
    (out,) = journal.arrays("t1", "out")
    assert np.array_equal(out, big * 2)
    journal.collect("t1", "collected", 2.0)
    assert journal.arrays("t1", "out") == [] and list(journal.files.iterdir()) == []
    assert journal.rows()[0].state == "collected" and journal.rows()[0].reserved == 0
    journal.forget(["t1"])
    assert journal.rows() == []


def test_answered_tasks_are_kept_for_listing_up_to_a_count_and_a_time(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    for i in range(1, 6):
        journal.add(row(f"t{i}", i, key=f"k{i}"), [])
        journal.collect(f"t{i}", "collected", 100.0 + i)
    journal.add(row("t9", 9), [])  # unanswered: never forgotten here
    journal.forget_answered(before=0.0, keep=2)
    assert [r.task_id for r in journal.rows(answered=True)] == ["t4", "t5"]
    assert [r.task_id for r in journal.rows(answered=True, limit=1)] == ["t5"]
    journal.forget_answered(before=104.5, keep=10)
    assert [r.task_id for r in journal.rows()] == ["t5", "t9"]
    assert [r.task_id for r in journal.rows(answered=False)] == ["t9"]


def test_a_file_write_stopped_midway_leaves_nothing_and_a_stray_one_goes_at_open(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    stop = pangea.threading.Event()
    stop.set()
    assert not journal.write_file("t1-in0.npy", np.ones(3 << 20), stop)  # two pieces at least
    assert list(journal.files.iterdir()) == []
    (journal.files / "t2-in0.npy.tmp").write_bytes(b"half an array")
    journal.close()
    TaskJournal.open(tmp_path / "q")
    assert list((tmp_path / "q" / "arrays").iterdir()) == []


def test_an_array_file_no_task_names_goes_at_open(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    big = np.ones((300, 300))
    journal.write_file("t1-in0.npy", big)
    journal.add(row("t1", 1), [(0, big, "t1-in0.npy")])
    journal.write_file("t2-in0.npy", big)  # NOTE: renamed into place, then killed before its row
    journal.close()
    journal, _ = TaskJournal.open(tmp_path / "q")
    assert sorted(p.name for p in journal.files.iterdir()) == ["t1-in0.npy"]


def test_a_lost_array_file_is_said_not_read(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    big = np.ones((300, 300))
    journal.write_file("t1-in0.npy", big)
    journal.add(row("t1", 1), [(0, big, "t1-in0.npy")])
    (journal.files / "t1-in0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(JournalUnreadable, match="array 0 of task t1"):
        journal.arrays("t1", "in")
    (journal.files / "t1-in0.npy").unlink()
    with pytest.raises(JournalUnreadable, match="lost array 0 of task t1"):
        journal.arrays("t1", "in")


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _other_version(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("spoil", "says"),
    [(_garbage, "cannot be read"), (_truncated, "damaged|cannot be read"), (_other_version, "schema version 7")],
)
def test_a_journal_that_cannot_be_read_is_moved_aside_and_an_empty_one_starts(
    tmp_path: Path, spoil: Callable[[Path], None], says: str
) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    for i in range(1, 200):  # NOTE: several pages, so half of the file is a damaged database
        journal.add(row(f"t{i}", i), [(0, np.full(500, float(i)), "")])
    journal.close()  # NOTE: folds the WAL into the file
    spoil(tmp_path / "q" / pangea.QUEUE_JOURNAL_FILENAME)
    journal, note = TaskJournal.open(tmp_path / "q")
    assert journal.rows() == []
    assert "\n" not in note and "moved aside to" in note and "starts with an empty queue" in note
    assert re.search(says, note), note
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("q.unreadable-")]
    assert (aside / pangea.QUEUE_JOURNAL_FILENAME).exists()


# ---------------------------------------------------------------- the queue


class Runs:
    """A fake `execute`: counts runs per kernel, adds its two operands, waits on ``gate`` when set."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: trio.Event | None = None

    async def __call__(self, kernel: str, operands: Any, params: Any, *rest: Any) -> TaskOutcome:
        self.count += 1
        if self.gate is not None:
            await self.gate.wait()
        a, b = operands
        return TaskOutcome(0, kernel, (np.asarray(a) + np.asarray(b),), "local", [], 0.0, 0.0)


def make_queue(journal: TaskJournal | None, runs: Runs, max_bytes: int = 1 << 30) -> TaskQueue:
    budget = MemoryBudget(1 << 30)
    return TaskQueue(
        journal,
        execute=runs,
        admit=lambda kernel, arrays, params: 0,
        budget=budget,
        verified=lambda outcome: False,
        max_bytes=max_bytes,
        retention_s=3600.0,
    )


def run_queue(queue: TaskQueue, body: Callable[[TaskQueue], Any]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(queue.run)
            await body(queue)
            nursery.cancel_scope.cancel()

    trio.run(main)


def accept(queue: TaskQueue, key: str, x: np.ndarray) -> tuple[Any, int]:
    return queue.accept(key, "add", [x, x], {}, dict(SPEC), int(x.nbytes), None)


def test_an_answered_call_leaves_its_task_collected(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.arange(4.0)

    async def body(queue: TaskQueue) -> None:
        entry, token = accept(queue, "k1", x)
        answer = await queue.wait(entry, token, 10.0)
        assert isinstance(answer, TaskOutcome) and np.array_equal(answer.outputs[0], 2 * x)
        queue.answered(entry, token)
        assert queue.tasks == {} and queue.reserved == 0

    run_queue(make_queue(journal, runs), body)
    (r,) = journal.rows()
    assert (r.key, r.state, runs.count) == ("k1", "collected", 1)
    assert journal.arrays(r.task_id, "in") == []


def test_a_call_that_went_away_leaves_the_answer_for_a_later_one(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.arange(3.0)

    async def body(queue: TaskQueue) -> None:
        entry, token = accept(queue, "k1", x)
        queue.let_go(entry, token, gone=True)  # its client went away while it ran
        with trio.fail_after(10):
            while not entry.written or not entry.events["written"].is_set():  # noqa: ASYNC110 (set by the queue)
                await trio.sleep(0.01)
        assert queue.counts()["queue_waiting"] == 1
        again = queue.find("k1")
        token2 = queue.attach(again)
        answer = await queue.wait(again, token2, 10.0)
        assert isinstance(answer, TaskOutputRecord) and np.array_equal(answer.outputs[0], 2 * x)
        queue.answered(again, token2)
        with pytest.raises(TaskError, match="collected") as info:
            queue.find("k1")
        assert info.value.kind == ErrorKind.NOT_FOUND

    run_queue(make_queue(journal, runs), body)
    assert runs.count == 1


def test_a_restart_runs_unfinished_tasks_once_and_leaves_answers_waiting(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    x = np.arange(5.0)
    journal.add(row("tq", 1, key="queued"), [(0, x, ""), (1, x, "")])
    journal.add(row("tr", 2, "running", key="running"), [(0, x, ""), (1, x, "")])
    journal.add(row("td", 3, key="done"), [(0, x, ""), (1, x, "")])
    done = TaskOutputRecord(ran_on="local")
    journal.finish("td", "done", pangea.time.time(), pangea.record_to_json(done), [(0, 3 * x, "")])
    journal.add(row("tc", 4, key="collected"), [])
    journal.collect("tc", "collected", pangea.time.time())
    runs = Runs()

    async def body(queue: TaskQueue) -> None:
        assert queue.recovered == 3
        listed = {r.key: (r.state, r.result_bytes) for r in queue.listing()}
        assert listed["done"] == ("done", (3 * x).nbytes)  # the answer's size, as before the restart
        answers = {}
        for key in ("queued", "running", "done"):
            entry = queue.find(key)
            token = queue.attach(entry)
            answer = await queue.wait(entry, token, 10.0)
            answers[key] = answer.outputs[0]
            queue.answered(entry, token)
        assert np.array_equal(answers["queued"], 2 * x) and np.array_equal(answers["running"], 2 * x)
        assert np.array_equal(answers["done"], 3 * x)  # as written: it did not run again

    run_queue(make_queue(journal, runs), body)
    assert runs.count == 2
    states = {r.key: (r.state, r.runs) for r in journal.rows()}
    assert states == {
        "queued": ("collected", 2),
        "running": ("collected", 2),
        "done": ("collected", 1),
        "collected": ("collected", 1),
    }


def test_the_same_key_attaches_to_the_same_task_and_a_used_one_is_refused(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.ones(2)

    async def body(queue: TaskQueue) -> None:
        runs.gate = trio.Event()
        first, t1 = accept(queue, "same", x)
        second, t2 = accept(queue, "same", x)
        assert second is first and t2 != t1
        runs.gate.set()
        answer = await queue.wait(first, t2, 10.0)
        assert np.array_equal(answer.outputs[0], 2 * x)
        with pytest.raises(TaskError, match="newer call"):
            await queue.wait(first, t1, 10.0)
        queue.answered(first, t2)
        with pytest.raises(TaskError, match="already answered") as info:
            accept(queue, "same", x)
        assert info.value.kind == ErrorKind.BAD_INPUT

    run_queue(make_queue(journal, runs), body)
    assert runs.count == 1


def test_over_its_quota_a_task_is_refused_and_below_it_nothing_is_lost(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.ones(1000)  # 8 KB each; a task reserves 3 x that (operands and output)

    async def body(queue: TaskQueue) -> None:
        runs.gate = trio.Event()
        held = [accept(queue, f"k{i}", x) for i in range(4)]  # 96 KB of 100 KB
        with pytest.raises(TaskError, match="disk quota.*--state-max-gib") as info:
            accept(queue, "k4", x)
        assert info.value.kind == ErrorKind.BUSY
        assert queue.refused == 1 and sum(queue.state_counts().values()) == 4, queue.state_counts()
        runs.gate.set()
        for entry, token in held:
            answer = await queue.wait(entry, token, 10.0)
            assert np.array_equal(answer.outputs[0], 2 * x)
            queue.answered(entry, token)
        assert queue.state_counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}
        entry, token = accept(queue, "k4", x)  # room again
        await queue.wait(entry, token, 10.0)
        assert queue.refused == 1

    run_queue(make_queue(journal, runs, max_bytes=100_000), body)


def test_a_cancelled_call_cancels_its_task(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.ones(2)

    async def body(queue: TaskQueue) -> None:
        runs.gate = trio.Event()  # never set: it runs until cancelled
        entry, token = accept(queue, "k", x)
        await trio.sleep(0.05)
        queue.let_go(entry, token, gone=False)
        with trio.fail_after(10):
            while entry.state != "cancelled":  # noqa: ASYNC110 (a state, no event)
                await trio.sleep(0.01)
        assert queue.tasks == {}

    run_queue(make_queue(journal, runs), body)
    assert journal.rows()[0].state == "cancelled"


def test_a_node_that_stops_leaves_its_running_tasks_unfinished_in_the_journal(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.ones(2)

    async def body(queue: TaskQueue) -> None:
        runs.gate = trio.Event()
        accept(queue, "k", x)
        await trio.sleep(0.05)
        queue.stopping = True

    run_queue(make_queue(journal, runs), body)
    assert [(r.key, r.state) for r in journal.rows()] == [("k", "queued")]


def test_without_a_journal_tasks_run_the_same_and_nothing_is_kept() -> None:
    runs, x = Runs(), np.ones(3)

    async def body(queue: TaskQueue) -> None:
        entry, token = accept(queue, "", x)
        answer = await queue.wait(entry, token, 10.0)
        assert np.array_equal(answer.outputs[0], 2 * x)
        queue.answered(entry, token)
        assert queue.counts()["queue_journal"] == "" and queue.counts()["state_max_bytes"] == 0

    run_queue(make_queue(None, runs), body)


def test_a_detached_task_is_journaled_and_its_answer_waits_for_a_later_call(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.arange(3.0)

    async def body(queue: TaskQueue) -> None:
        entry, token = queue.accept("d1", "add", [x, x], {}, dict(SPEC), int(x.nbytes), None, detach=True)
        assert token == 0
        with trio.fail_after(10):  # NOTE: also when its answer is written before the next flush
            await entry.events["journaled"].wait()
        assert entry.journaled
        again = queue.find("d1")
        token = queue.attach(again)
        answer = await queue.wait(again, token, 10.0)
        assert np.array_equal(answer.outputs[0], 2 * x)
        queue.answered(again, token)

    run_queue(make_queue(journal, runs), body)
    assert [(r.key, r.state) for r in journal.rows()] == [("d1", "collected")]


def test_a_cancel_by_key_stops_the_task_even_with_no_call_left(tmp_path: Path) -> None:
    journal, _ = TaskJournal.open(tmp_path / "q")
    runs, x = Runs(), np.ones(2)

    async def body(queue: TaskQueue) -> None:
        runs.gate = trio.Event()  # never set: it runs until cancelled
        entry, token = accept(queue, "ctrl-c", x)
        await trio.sleep(0.05)
        queue.cancel("ctrl-c")  # the client's `cancel` first ...
        queue.let_go(entry, token, gone=True)  # ... then its connection closes: the task stays cancelled
        with trio.fail_after(10):
            while entry.state != "cancelled":  # noqa: ASYNC110 (a state, no event)
                await trio.sleep(0.01)
        queue.cancel("no such task")  # harmless

    run_queue(make_queue(journal, runs), body)
    assert [(r.key, r.state) for r in journal.rows()] == [("ctrl-c", "cancelled")]

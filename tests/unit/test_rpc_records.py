"""Unit tests of the RPC records of pangea.py (the room "RPC service and client").

Each record (`SuspicionRecord`, `PeerRecord`, `StatusRecord`, `TaskOutputRecord`
with its `AttemptInfoRecord`s and `TimingsRecord`, `KernelInfoRecord`) is filled into a
real Cap'n Proto message built from capnp/pangea.capnp with `to_capnp`, sent
through bytes, and read back with `from_capnp`: the record comes back equal,
and `as_dict()` has the shape the Client returns (keys and types; for a task,
`Client.last_task`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pangea import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_ELEMENTS,
    KERNELS,
    MAX_NDIM,
    AttemptInfoRecord,
    AttemptRecord,
    KernelInfoRecord,
    Limits,
    PeerRecord,
    StatusRecord,
    SuspicionRecord,
    TaskInfoRecord,
    TaskOutcome,
    TaskOutputRecord,
    TimingsRecord,
    load_schema,
)

# ---------------------------------------------------------------- helpers


def round_trip(struct: str, record: Any) -> Any:
    """Fill a `struct` message from ``record``, serialize it, and read it back as the record's class."""
    builder = getattr(load_schema(), struct).new_message()
    record.to_capnp(builder)
    data = bytes(builder.to_bytes())
    with getattr(load_schema(), struct).from_bytes(data) as reader:
        return type(record).from_capnp(reader)


SUSPECT = SuspicionRecord("12D3KooWsuspect", "suspect", "wrong result", 1_700_000_000.5, 12.25, 0, "suspect since ...")
PROBATION = SuspicionRecord("12D3KooWprobation", "probation", "timed out", 1_700_000_100.0, 0.0, 3, "on probation ...")


def peer(suspicion: SuspicionRecord | None = None) -> PeerRecord:
    return PeerRecord(
        "12D3KooWpeer",
        ("/ip4/10.0.0.2/tcp/7777", "/ip4/192.168.1.2/tcp/7777"),
        "1.2.3",
        ("matmul", "add"),
        1.5,
        7,
        "worker",
        True,
        0.25,
        "TLS 1.3 to 10.0.0.2:7779",
        42.0,
        1 << 33,
        12345,
        suspicion,
    )


def status(suspects: tuple[SuspicionRecord, ...] = ()) -> StatusRecord:
    return StatusRecord(
        "12D3KooWself",
        ("/ip4/127.0.0.1/tcp/7777",),
        "1.2.3",
        3600.5,
        10,
        2,
        1,
        1 << 40,
        99,
        "127.0.0.1:7780",
        3,
        5,
        1,
        suspects,
        queue_journal="/home/me/.pangea/queue/7780/journal.sqlite3",
        queue_tasks=4,
        queue_waiting=1,
        state_bytes=3 << 20,
        state_max_bytes=4 << 30,
        state_retention_s=86400.0,
        queue_recovered=2,
        queue_refused=5,
    )


# ---------------------------------------------------------------- suspicion


def test_suspicion_round_trips() -> None:
    assert round_trip("Suspicion", SUSPECT) == SUSPECT
    assert round_trip("Suspicion", PROBATION) == PROBATION


def test_suspicion_from_manager_info() -> None:
    info = {"state": "suspect", "reason": "wrong result", "since": 1_700_000_000.5, "next_probe_s": 12.25}
    info |= {"good_results": 0, "text": "suspect since ..."}
    assert SuspicionRecord.from_info("12D3KooWsuspect", info) == SUSPECT


def test_suspicion_as_dict_has_no_peer_id() -> None:
    assert SUSPECT.as_dict() == {
        "state": "suspect",
        "reason": "wrong result",
        "since": 1_700_000_000.5,
        "next_probe_s": 12.25,
        "good_results": 0,
        "text": "suspect since ...",
    }


# ---------------------------------------------------------------- peer


def test_trusted_peer_round_trips_without_suspicion() -> None:
    record = peer()
    assert round_trip("PeerInfo", record) == record
    d = round_trip("PeerInfo", record).as_dict()
    assert d["suspect"] is False and d["suspicion"] is None


def test_suspect_peer_round_trips_with_its_suspicion() -> None:
    record = peer(SUSPECT)
    back = round_trip("PeerInfo", record)
    assert back == record
    assert back.suspect is True
    assert back.as_dict()["suspicion"] == SUSPECT.as_dict()


def test_peer_on_probation_is_not_suspect() -> None:
    assert round_trip("PeerInfo", peer(PROBATION)).as_dict()["suspect"] is False


def test_peer_as_dict_keys_and_types() -> None:
    d = round_trip("PeerInfo", peer(SUSPECT)).as_dict()
    types = {
        "peer_id": str,
        "addresses": list,
        "version": str,
        "kernels": list,
        "rtt_ms": float,
        "tasks_done": int,
        "role": str,
        "trusted": bool,
        "last_seen_s": float,
        "data_plane": str,
        "connected_s": float,
        "data_bytes_in": int,
        "data_bytes_out": int,
        "suspect": bool,
        "suspicion": dict,
    }
    assert list(d) == list(types)
    assert {k: type(v) for k, v in d.items()} == types
    assert d["addresses"] == ["/ip4/10.0.0.2/tcp/7777", "/ip4/192.168.1.2/tcp/7777"]
    assert d["kernels"] == ["matmul", "add"]


# ---------------------------------------------------------------- status


def test_status_round_trips_with_and_without_suspects() -> None:
    assert round_trip("NodeStatus", status()) == status()
    assert round_trip("NodeStatus", status((SUSPECT, PROBATION))) == status((SUSPECT, PROBATION))


def test_status_as_dict_keys_and_types() -> None:
    d = round_trip("NodeStatus", status((SUSPECT,))).as_dict()
    types = {
        "peer_id": str,
        "addresses": list,
        "version": str,
        "uptime_s": float,
        "tasks_done": int,
        "tasks_failed": int,
        "tasks_in_flight": int,
        "bytes_in": int,
        "bytes_out": int,
        "rpc_address": str,
        "peer_count": int,
        "tasks_served": int,
        "tasks_cancelled": int,
        "suspects": list,
        "rpc_calls_refused": int,
        "rpc_tasks_refused": int,
        "streams_refused": int,
        "data_handshakes_evicted": int,
        "memory_budget_used_bytes": int,
        "memory_budget_bytes": int,
        "stranger_connections_closed": int,
        "held_bytes": int,
        "held_arrays": int,
        "queue_journal": str,
        "queue_tasks": int,
        "queue_waiting": int,
        "state_bytes": int,
        "state_max_bytes": int,
        "state_retention_s": float,
        "queue_recovered": int,
        "queue_refused": int,
    }
    assert list(d) == list(types)
    assert {k: type(v) for k, v in d.items()} == types
    assert d["suspects"] == [{"peer_id": "12D3KooWsuspect", **SUSPECT.as_dict()}]


# ---------------------------------------------------------------- task output


def test_task_output_round_trips_with_its_outputs() -> None:
    c = np.arange(12, dtype=np.float64).reshape(3, 4)
    record = TaskOutputRecord(
        (c,),
        ran_on="12D3KooWpeer",
        fallback_reason="",
        attempts=(AttemptInfoRecord("12D3KooWother", "unavailable: gone"), AttemptInfoRecord("12D3KooWpeer", "ok")),
        timings=TimingsRecord(0.5, 0.25, 1.5, 2.25),
    )
    back = round_trip("TaskOutput", record)
    assert back == record
    (out,) = back.outputs
    assert out.dtype == c.dtype and np.array_equal(out, c)


def test_task_output_of_an_error_carries_only_the_error() -> None:
    record = TaskOutputRecord(error_kind="bad-input", error_message="cannot submit: bad operand")
    back = round_trip("TaskOutput", record)
    assert back == record and back.outputs == ()


def test_task_output_from_an_outcome() -> None:
    outcome = TaskOutcome(1, "matmul", (np.eye(2),), "12D3KooWpeer", [AttemptRecord("12D3KooWpeer")], 1.0, 3.0, 0.5, "")
    record = TaskOutputRecord.from_outcome(outcome)
    assert record.attempts == (AttemptInfoRecord("12D3KooWpeer", "ok"),)
    assert record.timings == TimingsRecord(queue_s=0.5, transfer_s=1.5, compute_s=1.0, total_s=3.0)
    local = TaskOutputRecord.from_outcome(dataclasses.replace(outcome, worker_id="local"))
    assert local.timings.transfer_s == 0.0 and local.ran_on == "local"


def test_task_output_as_dict_is_last_task() -> None:
    record = TaskOutputRecord(
        (np.zeros(1),),
        ran_on="local",
        fallback_reason="no remote worker",
        attempts=(AttemptInfoRecord("local", "ok"),),
        timings=TimingsRecord(0.0, 0.0, 1.0, 1.25),
        verified_by_node=True,
        task_id="t0123456789abcdef",
    )
    assert round_trip("TaskOutput", record).as_dict() == {
        "error_kind": "",
        "error_message": "",
        "ran_on": "local",
        "fallback_reason": "no remote worker",
        "attempts": [{"worker": "local", "outcome": "ok"}],
        "timings": {"queue_s": 0.0, "transfer_s": 0.0, "compute_s": 1.0, "total_s": 1.25},
        "verified_by_node": True,
        "verification": "",
        "task_id": "t0123456789abcdef",
        "arrays_via": "RPC messages",  # the Client's own note, not on the wire
    }


# ---------------------------------------------------------------- kernel info


def test_kernel_info_of_every_registry_entry_round_trips() -> None:
    for kernel in KERNELS.values():
        record = KernelInfoRecord.from_kernel(kernel, Limits(), 1 << 20)
        assert round_trip("KernelInfo", record) == record, kernel.name


def test_kernel_info_says_what_the_registry_says() -> None:
    matmul = KernelInfoRecord.from_kernel(KERNELS["matmul"], Limits(), DEFAULT_MAX_ELEMENTS)
    assert (matmul.name, matmul.operands, matmul.params) == ("matmul", 2, ())
    assert matmul.dtypes == ALLOWED_DTYPES and matmul.description == KERNELS["matmul"].doc
    assert (matmul.max_ndim, matmul.max_elements) == (MAX_NDIM, DEFAULT_MAX_ELEMENTS)
    scale = KernelInfoRecord.from_kernel(KERNELS["scale"], Limits(), DEFAULT_MAX_ELEMENTS)
    assert (scale.operands, scale.params) == (1, ("factor",))


def test_kernel_info_of_a_kernel_without_operands_lists_no_dtypes() -> None:
    random = KernelInfoRecord.from_kernel(KERNELS["random"], Limits(), DEFAULT_MAX_ELEMENTS)
    assert random.operands == 0 and random.dtypes == ()
    assert random.params == ("rows", "cols", "seed")


def test_kernel_info_takes_the_limits_it_is_given() -> None:
    limits = Limits(dtypes=("float64",), max_ndim=2)
    record = round_trip("KernelInfo", KernelInfoRecord.from_kernel(KERNELS["add"], limits, 1000))
    assert (record.dtypes, record.max_ndim, record.max_elements) == (("float64",), 2, 1000)


def test_kernel_info_as_dict_is_what_client_kernels_lists() -> None:
    d = round_trip("KernelInfo", KernelInfoRecord.from_kernel(KERNELS["sum"], Limits(), 1 << 28)).as_dict()
    assert d == {
        "name": "sum",
        "operands": 1,
        "params": ["axis"],
        "dtypes": list(ALLOWED_DTYPES),
        "description": "sum of all elements, or along axis",
        "max_ndim": MAX_NDIM,
        "max_elements": 1 << 28,
        "verification": "recomputed",
        "outputs": 1,
        "variadic": False,
    }


def test_kernel_info_says_how_a_remote_result_is_verified() -> None:
    def how(name: str, rounds: int = 2) -> str:
        return round_trip(
            "KernelInfo", KernelInfoRecord.from_kernel(KERNELS[name], Limits(), 1000, rounds)
        ).verification

    assert how("matmul") == "Freivalds, 2 rounds" and how("matmul", 5) == "Freivalds, 5 rounds"
    assert how("solve") == how("inverse") == "residual, 2 rounds"
    assert how("add") == how("transpose") == "recomputed"
    assert how("random") == how("random", 0) == "unverified"  # nothing cheaper than recomputing it
    checked = [name for name in KERNELS if KERNELS[name].check is not None]
    assert {how(name, 0) for name in checked} == {""}  # --verify-rounds 0 checks nothing


def test_compute_interface_has_the_kernels_method() -> None:
    methods = load_schema().Compute.schema.methods
    assert {"submit", "peers", "status", "connect", "kernels"} <= set(methods)


def test_a_task_of_the_queue_round_trips_as_tasks_lists_it() -> None:
    record = TaskInfoRecord(
        "t0123456789abcdef",
        "nightly",
        "matmul",
        "failed",
        1_700_000_000.5,
        1_700_000_002.25,
        "deadline: too slow",
        1 << 20,
        2,
    )
    assert round_trip("TaskInfo", record) == record
    assert record.as_dict()["runs"] == 2

"""pangea: share numpy compute between your own machines, from one file.

Copy ``pangea.pyz`` to two boxes and start it on each::

    box 1:  ./pangea.pyz initiate            # prints its multiaddr, waits
    box 2:  ./pangea.pyz respond <multiaddr> # connects; both run the checks

Nodes talk libp2p (TCP + Noise + Yamux). A node delegates numpy matrix work
to another node over the stream protocol ``/pangea/compute/1.0.0``, collects
and aggregates the results, and runs a task locally when its worker is gone.

How the module is laid out: twenty-seven rooms, each using only the rooms above
it (tests/unit/test_layout.py keeps that true, and each room under its line
budget). Rooms 1-9 are pure (no I/O, no await); rooms 10-27 perform I/O.

  0. this docstring, imports, version
  1. Constants                 protocol ids, limits, timeouts, each with its unit
  2. Errors                    every exception, and ErrorKind (the kinds on the wire)
  3. Pure helpers              addresses, pairing codes, tables, formatting
  4. Wire framing (sans-I/O)   messages, encode_parts, the Decoder and its FrameGate
  5. Session protocol (sans-I/O)   SessionProtocol: the Hello check, admission,
                               pending, ping and cancel bookkeeping of one session
  6. Kernels                   the registry core: Kernel, parameters, validation,
                               output size, cost, the checks' rounding bounds
  7. Kernels: linear algebra   matmul, solve, inv and numpy.linalg, their checks
  8. Kernels: element-wise, reductions, shapes and fft   numpy's O(n) kernels;
                               the registry KERNELS is filled at its end
  9. Scheduler (sans-I/O)      placement, retries, suspicion: handle(event, now)
 10. Session directories       the pangea home, one directory per process, RPC files
 11. Transports                identity and libp2p host, Channel, the TLS data plane
 12. Bulk channels             arrays off the RPC: shared memory on the box, TLS off it
 13. The node                  PeerSession (performs its SessionProtocol), Node
 14. The manager               delegators, Manager (drives the Scheduler, verifies)
 15. Around the node           mDNS, metrics, the initiator's checks, the fault injector
 16. RPC records              constants, arrays to and from Cap'n Proto, the records
 17. Held arrays              KeptArrays, Lineage, ArrayKeeper: arrays held here or
                               on a worker for clients, run where held, made again
 18. Task journal             TaskJournal: the queue's tasks in SQLite, spill files
 19. Task queue               TaskQueue: tasks that outlive their call and the
                               node's restart
 20. RPC service              NodeService, RpcServer, _RpcConnection, the Gate
 21. Dashboard                 serve --dashboard: the live page and its HTTP server
 22. Remote arrays and futures   RemoteArray: the numpy face of an array a node
                               holds; TaskFuture; _PinnedConnection (the TLS pin)
 23. The Python client        Client
 24. Start-up                  build guard, deferred imports, logging, the trio runner
 25. CLI: options and the verbs of a pair   initiate, respond, demo
 26. CLI: serve and call      serve, call
 27. CLI: the tools and main  psk, status, doctor, bench (code in
                               bench/pangea_bench.py), id, main

How one task travels through them: `Client.submit` (23) reaches the node's
`NodeService` (20), its arrays on a bulk channel (12); the service journals it
in the `TaskJournal` (18) of its `TaskQueue` (19), whose runner hands it to
the `Manager` (14); the `Scheduler` (9) answers `Dispatch`, and the peer's
`RemoteDelegator` writes a `TaskRequestMsg` (4) on the session's `TlsChannel`
(11). On the worker, the channel's Decoder
asks that session's `SessionProtocol` (5) whether to admit the payload, the
`PeerSession` (13) runs the kernel (6-8) in a worker thread and sends the
`TaskResultMsg` back; the manager verifies it (6-8) and reports it to the
scheduler, which answers `Deliver`, or a new `Dispatch` when it failed.

Design: everything that decides (framing, the session protocol, kernels,
placement, retries) is pure and unit-tested without sockets or clocks. The
I/O rooms are thin adapters: read bytes, feed a decoder, act on what the
cores return, write bytes. Importing this module has no side effects; libp2p,
trio, capnp and numpy are imported inside the functions that need them, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import enum
import errno
import functools
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import types
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, Union

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__version__ = "0.1.0"

__all__ = [
    "ErrorKind",
    "PangeaError",
    "UsageError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "MessageError",
    "PeerError",
    "TaskError",
    "KernelError",
    "BadInputError",
    "SessionError",
    "Decoder",
    "encode",
    "NEED_DATA",
    "NUMPY_ARRAY_KERNELS",
    "NUMPY_LINALG_KERNELS",
    "KERNELS",
    "run_kernel",
    "Scheduler",
    "Client",
    "KeptArrays",
    "MemoryBudget",
    "RemoteArray",
    "main",
    "__version__",
]

log = logging.getLogger("pangea")


###############################################################################
# 1. Constants
#
# Protocol identifiers, limits and timeouts. Each has its unit in the name and
# says why it has the value it has.
###############################################################################

PROTOCOL_ID = "/pangea/compute/1.0.0"
# Bumped on any incompatible change of the messages in capnp/pangea.capnp;
# peers with a different number refuse each other in the handshake.
# 2: Hello announces the TLS data plane; the DataPlane message.
PROTOCOL_VERSION = 2

DEFAULT_PORT = 7777
DEFAULT_WAIT_S = 60.0  # how long initiate waits for a responder, respond for an initiator

# Frame prefix: header length (u32) then payload length (u64), big-endian.
FRAME_PREFIX = struct.Struct("!IQ")
# A header is one Cap'n Proto Message: a kernel list and a few array shapes.
# 1 MiB is thousands of times what a real one needs and bounds what a peer
# can make us buffer before we know what it is sending.
MAX_HEADER_BYTES = 1 << 20
# Largest payload (array bytes of one message) accepted by default. 2 GiB
# lets two 1 GiB operands through; a node with less memory should lower it.
DEFAULT_MAX_PAYLOAD_BYTES = 2 << 30
# stream.read(n) of py-libp2p returns at most ~64 KiB per call anyway; asking
# for 1 MiB keeps the number of awaits low without a large temporary buffer.
READ_CHUNK_BYTES = 1 << 20
# Writes are cut into 4 MiB pieces so a ping is never stuck behind a whole
# gigabyte, while each write stays large enough for good throughput.
WRITE_CHUNK_BYTES = 4 << 20
# A frame up to this size is joined into one write: copying 64 KiB costs a few
# microseconds, each extra write a Yamux frame or TLS record and a syscall.
COALESCE_BYTES = 64 << 10
# Receive buffers from this size up are kept for reuse (BufferPool): touching
# fresh memory costs as much as moving it on a VM; smaller ones are cheap.
POOL_MIN_BYTES = 16 << 20
POOL_MAX_BUFFERS = 2

MAX_NDIM = 8  # kernels are matrix work; more dimensions are a mistake
# numpy dtypes that may cross the wire. No object, string or void dtypes:
# nothing a peer sends is turned into Python objects.
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "complex64", "complex128")
# A kernel's parameters (axis, ord, subscripts, shapes...): numpy's take a few, so
# more, or longer, are a mistake or an attack; each bounds what a peer makes us hold.
MAX_PARAMS = 16  # parameters of one task
MAX_PARAM_TEXT = 256  # characters of a text parameter (an einsum's subscripts, a mode)
MAX_PARAM_INTS = 64  # entries of an ints parameter (a shape, axes): MAX_NDIM is far less
MAX_OPERANDS = 64  # operands of a variadic kernel (concatenate, stack, einsum)

# The data plane: big arrays on a direct TLS 1.3 connection whose record
# layer runs in C (OpenSSL), next to the libp2p session that authenticates it.
# See `DataPlane` for the security argument.
DATA_PORT_OFFSET = 1  # by default the data plane listens on the libp2p port + 1 (7778)
DATA_CONNECT_S = 3.0  # TCP connect + TLS handshake + token check; longer means a firewall
DATA_SETTLE_S = DATA_CONNECT_S + 3.0  # the acceptor's wait for the dialer's outcome
DATA_TOKEN_BYTES = 32  # one-time secret the dialer presents on the data plane (256 bits)
DATA_MAGIC = b"PGD1"  # first bytes inside TLS from the dialer: magic + token
DATA_MAX_HANDSHAKES = 16  # unauthenticated data connections at once; a new one evicts the oldest
# The acceptor's deadline for a data connection's TLS handshake and token: the dialer
# gives up after DATA_CONNECT_S anyway, and a stranger's stalled handshake holds a slot no longer.
DATA_HANDSHAKE_S = DATA_CONNECT_S
DATA_RETRIES = 2  # a data connection closed or reset in its handshake is tried again this often...
DATA_RETRY_PAUSE_S = 0.5  # ...after this pause, while the acceptor still waits (DATA_SETTLE_S)
DATA_YIELD_BYTES = 8 << 20  # a long receive lets other tasks run after this many bytes

# A kernel this small (floating-point operations) runs on the event loop itself:
# it takes microseconds, while a hop to a worker thread and back costs ~0.1 ms.
INLINE_FLOPS = 50_000

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that does not say Hello in 10 s is dropped
PING_COUNT = 5  # pings for the RTT figure of the connection check
DIAL_PROBE_S = 3.0  # a dial that timed out tries a plain TCP connect this long: a firewall, or a stuck handshake?
DIAL_BACKOFF_FIRST_S = 0.25  # respond retries: 0.25, 0.5, 1, 2, 4, 4, ... s
DIAL_BACKOFF_MAX_S = 4.0
BYE_WAIT_S = 5.0  # how long the initiator waits for the responder to hang up
FAREWELL_S = 1.0  # Ctrl-C or SIGTERM: how long a Bye to the peers may hold up the exit
MAX_ATTEMPTS = 3  # a task is tried at most this often (remote, then local)

# Directory under $PANGEA_HOME holding one session directory per process.
SESSIONS_DIRNAME = "compute_test"
IDENTITY_FILENAME = "identity.key"
LOG_MAX_BYTES = 1 << 20  # session log rotates at 1 MiB, keeping 3 old files
LOG_BACKUPS = 3
# A failed run's log is kept in $PANGEA_HOME/logs/ (its session directory goes): the newest
# LOG_KEPT_FILES, each its last LOG_KEPT_MAX_BYTES, at most LOG_KEPT_TOTAL_BYTES in all.
LOGS_DIRNAME = "logs"
LOG_KEPT_FILES = 10
LOG_KEPT_MAX_BYTES = 1 << 20
LOG_KEPT_TOTAL_BYTES = 8 << 20
LOG_DROPPED_NOTE_BYTES = 100  # room for the line that says what a cut kept log lost
LOG_MAX_RECORD_CHARS = 4000  # a log line's message is cut here: a peer's or client's long text cannot flood the log
LIBP2P_LOG_REPEAT_S = 60.0  # one libp2p warning or error of a kind per minute in the log; a redial makes dozens

# Work sizes of the distributed checks.
CHECK_MATRIX_N = 64  # operands of the per-kernel delegation check
AGGREGATE_N = 1024  # the matmul split between initiator and responder
THROUGHPUT_BYTES = 64 << 20  # array data sent each way for the MB/s figure
# The throughput check reports a steady state: a process's first large transfer touches
# fresh memory (64 MiB: 0.06-0.18 s cold against 0.003 s warm), so one uncounted warm-up
# round each way, then the median of up to THROUGHPUT_SAMPLES rounds; no round starts
# after THROUGHPUT_MEASURE_S, so a slow link gives fewer samples, not a check of minutes.
THROUGHPUT_SAMPLES = 3
THROUGHPUT_MEASURE_S = 10.0

LOCAL = "local"  # the worker id of this node in the scheduler

# Defaults of the limits a node enforces on what peers send (all configurable,
# see `Limits` and the CLI options of the same names).
DEFAULT_MAX_ELEMENTS = 1 << 28  # per array: 2 GiB of float64
DEFAULT_MAX_INFLIGHT_TASKS = 8  # per peer; more get `busy` (BLAS runs one kernel at a time anyway)
DEFAULT_MAX_INFLIGHT_BYTES = 2 << 30  # per peer: operand bytes received and not yet answered
DEFAULT_MEMORY_BUDGET_BYTES = 4 << 30  # whole node: operand bytes held for all peers together
DEFAULT_IDLE_TIMEOUT_S = 20.0  # a session that receives nothing (not even a pong) this long is dead
DEFAULT_TASK_TIMEOUT_S = 600.0  # a task that has not finished in 10 min fails with `deadline`
DEFAULT_MAX_PENDING_STREAMS = 16  # per peer: streams opened without a Hello yet; more are reset
# Node-wide: fresh libp2p identities cost nothing, so a per-peer cap alone lets 100
# identities hold 1,600 streams. Strangers (peers not trusted by id) share 64 slots
# and at most 8 of them may wait from one source address; every peer together 256.
DEFAULT_MAX_PENDING_STREAMS_TOTAL = 256
DEFAULT_MAX_PENDING_STRANGER_STREAMS = 64
DEFAULT_MAX_STRANGERS_PER_ADDRESS = 8
# A header before the Hello is a Hello (about 1 KiB); 16 KiB bounds what a stream
# that has not said who it is makes us buffer (MAX_HEADER_BYTES applies after).
HELLO_MAX_HEADER_BYTES = 16 << 10
# Connections of untrusted peers that have no session (yet): 8 from one source address,
# 64 in all, each closed when it has no session after the handshake timeout. py-libp2p
# accepts 250 inbound connections, so strangers can never take the slots trusted peers need.
MAX_STRANGER_CONNECTIONS = 64
INBOUND_WATCH_S = 1.0  # how often a closed inbound libp2p connection is noticed (and its swarm slot freed)
MAX_STRANGER_CONNECTIONS_PER_ADDRESS = 8
HEARTBEAT_S = 5.0  # every session pings its peer this often (liveness and RTT)
DEFAULT_METRICS_PORT = 9477  # Prometheus /metrics, when --metrics names no port

# Pairing: a one-time code the initiator (or `serve --pair`) prints. 12 Crockford
# base32 characters = 60 bits; with one use, a deadline and at most 5 wrong
# tries before the code is burned, guessing it online is hopeless.
PAIRING_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PAIRING_CODE_CHARS = 12
MAX_PAIRING_FAILURES = 5
# A serve node redialing a --peer says the cause once, then "still unreachable" after 60 s,
# 2, 4, ... minutes, at most hourly: the console stays readable over a night of outage.
REDIAL_NOTE_FIRST_S = 60.0
REDIAL_NOTE_MAX_S = 3600.0
REDIAL_MAX_S = 30.0  # the longest pause between two dials of a --peer
PAIRING_BURNED_GRACE_S = 0.5  # an initiator whose code burned lets the last refusal reach its peer, then exits
REFUSAL_HINT_MARK = "\nhint: "  # in an ErrorMsg's text: the refusal's reason, then what its user can do
TRUSTED_PEERS_FILENAME = "trusted_peers"

# The RPC endpoint before login: a stranger holds little. Until `login`
# succeeds a connection may send messages of at most 256 KiB (a login is ~100 bytes;
# a garbage token of 100,000 characters still gets its "login refused"; 64 waiting
# connections hold at most 16 MiB; --rpc-max-mib applies only after) and must log in
# within 10 s, or it is closed.
# At most 64 connections wait for a login (16 per source address); a new one evicts
# the oldest waiting one, so a flood of idle connections cannot lock a client out.
# 128 connections in all (a logged-in program usually holds one): with the usual
# 1,024 open files that leaves the node room for its peers and files.
RPC_PRE_LOGIN_MAX_BYTES = 256 << 10
RPC_MAX_MIB = 4096  # the largest --rpc-max-mib (4 GiB); `call` accepts replies up to it too
RPC_LOGIN_TIMEOUT_S = 10.0
RPC_MAX_CONNECTIONS = 128
RPC_MAX_PENDING_LOGINS = 64
RPC_MAX_PENDING_LOGINS_PER_SOURCE = 16
# A refused login is answered after 0.1 s, doubling per refusal from the same source
# address up to 5 s (forgotten after 10 min without one): a guesser gets a few tries
# a second, not thousands. The log gets one line per source per minute with the count.
RPC_LOGIN_DELAY_BASE_S = 0.1
RPC_LOGIN_DELAY_MAX_S = 5.0
RPC_LOGIN_FORGET_S = 600.0
RPC_LOGIN_REPORT_S = 60.0
RPC_LOGIN_MAX_SOURCES = 4096  # sources remembered by the login limiter; the oldest go first
# Files of the RPC endpoint in $PANGEA_HOME (0600, in a 0700 home): the token a
# loopback endpoint requires by default (local clients of the same user read it, other
# users of the box cannot), the certificate and key of a TLS endpoint (kept, so its
# fingerprint stays what clients pinned), and the fingerprints a client trusted on
# first use, one "HOST:PORT sha256:HEX" per line.
RPC_TOKEN_FILENAME = "rpc-token"
RPC_TLS_FILENAME = "rpc-tls.pem"
DASHBOARD_TLS_FILENAME = "dashboard-tls.pem"  # ECDSA P-256: browsers take no Ed25519 certificate
KNOWN_NODES_FILENAME = "known_rpc_nodes"
RPC_TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake on the RPC port, client and server side
# RPC calls in flight on the node, all connections together; one more is answered
# "busy" at once. Each call is a trio task (no thread) and a task's memory is
# charged to the node's budget, so this bounds the bookkeeping and the requests
# held while they wait (a legitimate program keeps a few in flight; the kernels
# run one at a time anyway).
RPC_MAX_CALLS_IN_FLIGHT = 64
# Arrays a worker holds for one peer session (TaskRequest.keep): a split job holds its shared
# operand once per worker, a client's arrays put there and the results kept there; each is charged
# to the worker's memory budget, and the count bounds the bookkeeping a peer can make it keep.
MAX_HELD_PER_SESSION = 256
RPC_DEFAULT_TIMEOUT_S = 600.0  # a task's timeoutSeconds of 0 means this
RPC_MAX_TIMEOUT_S = 7 * 86400.0  # a week: a longer task timeout is a mistake (and overflows timers)
RPC_MAX_TEXT_CHARS = 1000  # kernel names, placements and multiaddrs are short; longer ones are refused
# A result at least this large is copied into its client's shared segment by a worker
# thread, not on the RPC loop: 64 MiB takes 10-20 ms, which every other call would wait.
SHARED_COPY_IN_THREAD_BYTES = 1 << 20
# Arrays a node holds for its RPC clients (RemoteArray capabilities), all clients together:
# each costs a capability and an entry besides its bytes (which the memory budget bounds), so
# a client that keeps millions of empty arrays is refused past this, with a clear error.
MAX_KEPT_ARRAYS = 4096
MAX_TASK_ARRAYS = 64  # held arrays one task may name (TaskSpec.arrays): no kernel takes more operands
# The node recognises a capability it was handed by calling its `claim`: one of its own answers
# at once (a local call); one a client made up may never answer, so the task waits this long.
CLAIM_TIMEOUT_S = 2.0

# The durable task queue of `serve` (room 18): its journal lives in $PANGEA_HOME/queue/<RPC port>/
# (a node is found again at its address, so a restart on the same port reads its own journal).
QUEUE_DIRNAME = "queue"
QUEUE_JOURNAL_FILENAME = "journal.sqlite3"
QUEUE_SCHEMA_VERSION = 1  # PRAGMA user_version of the journal; another number is moved aside
# Arrays up to this size are kept in the journal itself (one transaction with their task, at once);
# larger ones in .npy files beside it, written by a worker thread while the task already runs.
QUEUE_INLINE_MAX_BYTES = 64 << 10
QUEUE_MAX_RUNNING = RPC_MAX_CALLS_IN_FLIGHT  # tasks of the queue that run at once; the others wait "queued"
AUTO_KEY_PREFIX, AUTO_KEY_BYTES = "c", 16  # the key Client gives a task not named by its caller: c + 32 hex digits
QUEUE_MAX_TASKS = 10_000  # tasks not answered yet (queued, running, or waiting for their client)
# Answered tasks (collected, cancelled) keep a row without arrays until the retention time, so
# `tasks` lists them and their keys are not taken again by mistake; at most this many.
QUEUE_ANSWERED_KEPT = 10_000
QUEUE_LISTED_ANSWERED = 1000  # the newest of them that `tasks` lists
QUEUE_KEY_MAX_CHARS = 128  # a client's key for a task (TaskSpec.key): printable ASCII
DEFAULT_STATE_MAX_GIB = 4.0  # --state-max-gib: the queue's operands and results on disk, at most
DEFAULT_STATE_RETENTION_HOURS = 24.0  # --state-retention-hours: a result waits this long for its client
QUEUE_SWEEP_S = 60.0  # how often results past their retention time are dropped
# A call that ends without its answer (cancelled) is let go after this: if its connection closed
# meanwhile, its client went away and the task goes on; otherwise the client cancelled it.
QUEUE_LET_GO_S = 0.5
# A call waits for its task's answer this much longer than the task's own timeout (the task's
# timeout is its runner's; the call's end is the queue's wait).
RPC_QUEUE_WAIT_ROOM_S = 60.0
QUEUE_SPILL_CHUNK_BYTES = 4 << 20  # a large array is written in pieces; a task that ends first stops it
# A task with large operands is journaled once it has run this long: writing 64 MiB takes about as
# long as a short task runs, and one that ends first never needs them written. A kill before that
# loses the task as though it never arrived: its client's future, finding no task of its key,
# submits it again.
QUEUE_JOURNAL_LARGE_AFTER_S = 0.25
# Tasks of small operands reach the journal together, every QUEUE_FLUSH_S (one transaction for
# them all, not one per task): a kill loses at most the tasks of the last flush, as though they never
# arrived (their clients' futures submit them again). A task answered is marked collected
# QUEUE_COLLECT_AFTER_S after its answer went out: a node killed before then runs it again after its
# restart (its answer then waits for nobody) rather than lose an answer still on its way.
QUEUE_FLUSH_S = 0.05
QUEUE_COLLECT_AFTER_S = 1.0
CLIENT_CANCEL_FLUSH_S = 2.0  # a closing Client waits this long, at most, for its cancels to reach the node
QUEUE_COLLECT_RATE_BYTES_S = 100e6  # and one more second per 100 MB of answer: the time to carry it

# bench verb: what its parser needs; the rest of the verb is bench/pangea_bench.py.
# Defaults of a full run and of --quick (a run of a few seconds whose figures are rough).
BENCH_DEFAULTS = {"sizes_mib": "64", "tasks": 1000, "matmul_n": 2048, "reps": 3}
BENCH_QUICK = {"sizes_mib": "4", "tasks": 100, "matmul_n": 256, "reps": 1}
BENCH_MAX_INFLIGHT = 64  # tasks a benchmarker may keep in flight at a bench listener
BENCH_MAX_BYTES = DEFAULT_MAX_PAYLOAD_BYTES  # the largest baseline transfer a listener takes (also --transfer-mib)


###############################################################################
# 2. Errors
#
# One root class; a subclass per area. Each docstring says who raises it and
# what the user should do. ``exit_code`` is what the CLI returns for it.
###############################################################################


class ErrorKind(str, enum.Enum):  # noqa: UP042 (see the NOTE below)
    """Why something failed: the strings that travel on the wire (ErrorMsg.kind,
    TaskResult.errorKind, the RPC's errorKind) and appear in messages and JSON.

    A str enum: a member equals, hashes and prints as its string, so kinds read
    off the wire compare with the members as they are. Each comment says who
    raises the kind and what the user should do.

    NOTE: not enum.StrEnum (3.11+): the module must import on an older Python so the
    pyz can say, in one line, which Python it was built for."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    # A task's inputs or a request are malformed (kernels, the Decoder, the RPC
    # service, the scheduler for a reused task id): fix the call; retrying will not help.
    BAD_INPUT = "bad-input"
    # The other side will not do it: a worker that does not run tasks for this
    # peer, a node that refuses the session (Node.accept, a wrong data plane
    # token). Pass the join string or trust this box (serve --allow-peer).
    REFUSED = "refused"
    # A worker's in-flight limits or memory budget are full (admission, the
    # worker before it runs a task): retried after a backoff; raise the worker's
    # --max-inflight limits or add workers if it persists.
    BUSY = "busy"
    # No usable worker, or a peer or node that is not connected (Manager, the
    # scheduler, the RPC client when the node cannot be asked): start a worker,
    # check the node is running.
    UNAVAILABLE = "unavailable"
    # A task did not finish within its timeout (the worker, the scheduler, the
    # manager): give it a longer timeout or a smaller task.
    DEADLINE = "deadline"
    # A task failed for a reason of its own (TaskError's default), a canary that
    # failed verification, or a bug in an RPC method (rpc_error_fields): retried
    # elsewhere; when it is a bug the node's log has the traceback.
    INTERNAL = "internal"
    # A worker's result failed verification (the manager's Freivalds and
    # recomputation checks): the worker is suspect; check its hardware and build.
    WRONG_RESULT = "wrong-result"
    # A stream or connection to a peer went away (Channel, DataPlane,
    # PeerSession): retried elsewhere; check the network if it repeats.
    DISCONNECTED = "disconnected"
    # A peer did not answer in time (handshake, ping, canary, dial): check that
    # it runs and that the network and the firewall let it through.
    TIMEOUT = "timeout"
    # A peer cannot be reached at all (dial, the data plane's connect): check
    # the address, the port and the firewall.
    UNREACHABLE = "unreachable"
    # The peer speaks another protocol version, or not pangea (the handshake):
    # use the same pangea.pyz on both machines.
    INCOMPATIBLE = "incompatible"
    # Two machines use one peer id (the handshake): a pangea home was copied;
    # delete identity.key in the copy.
    DUPLICATE_IDENTITY = "duplicate-identity"
    # One home runs two processes on one machine (the handshake): give the
    # second its own PANGEA_HOME.
    IDENTITY_IN_USE = "identity-in-use"
    # A task result nobody waits for (the Decoder's gate: awaits_result): dropped
    # quietly, usually a result that arrived after its task was cancelled.
    UNSOLICITED = "unsolicited"
    # The peer broke framing or the schema (PeerSession sends it in an ErrorMsg
    # before it drops the peer): use the same pangea.pyz on both machines.
    PROTOCOL = "protocol"
    # A pangea error that carries no kind of its own, as the RPC service reports
    # it (rpc_error_fields): the message says what went wrong.
    FAILED = "failed"
    # The node's queue has no task of that id or key (the `result` call): it was
    # answered already, or expired, or never reached the node: submit it again.
    NOT_FOUND = "not-found"
    # A task the node accepted but could not run after it restarted (its operands
    # were held arrays, or it stopped before they reached its journal): submit it again.
    LOST = "lost"


class PangeaError(Exception):
    """Root of every error pangea raises on purpose; catch this to catch them all."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(PangeaError):
    """Raised by the CLI for a malformed argument; fix the command line."""

    exit_code = 2


class ConfigError(PangeaError):
    """Raised when the setup cannot work (port in use, wrong build target,
    unusable home directory); the message says what to change."""

    exit_code = 2


class ProtocolError(PangeaError):
    """Root of wire protocol errors; see the two subclasses."""


class LocalProtocolError(ProtocolError):
    """Raised when this process asks the encoder for something the protocol
    cannot express (a bad dtype, a huge header): a bug in the caller."""


class RemoteProtocolError(ProtocolError):
    """Raised by the Decoder when the peer sent bytes that break framing or
    the schema. The stream cannot continue: reset it and drop the peer."""


class MessageError(RemoteProtocolError):
    """Raised by the Decoder for a well-framed message with bad contents
    (a dtype not allowed, a shape that does not match its bytes). Framing is
    intact, so the receiver answers with an error and goes on."""

    def __init__(
        self, message: str, *, task_id: int | None = None, kind: str = ErrorKind.BAD_INPUT, admitted: bool = True
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.kind = kind  # the error kind of the TaskResult the receiver answers with
        self.admitted = admitted  # False: refused from its header, nothing was reserved for it


class PeerError(PangeaError):
    """Raised when a peer cannot be reached, refuses us, is incompatible, or
    disconnects. ``kind`` is an ErrorKind: unreachable, refused, incompatible,
    disconnected, timeout, unavailable (not connected), duplicate-identity (a copied
    home), identity-in-use (one home run twice on one machine); a kind read off the
    wire is kept as its string. Check the address, the firewall, the versions."""

    def __init__(self, message: str, *, kind: str = ErrorKind.DISCONNECTED, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.kind = kind
        if kind in (ErrorKind.INCOMPATIBLE, ErrorKind.REFUSED, ErrorKind.DUPLICATE_IDENTITY, ErrorKind.IDENTITY_IN_USE):
            self.exit_code = 2  # a setup problem: the command cannot work as given


class NoPeerError(PeerError):
    """Raised when nobody connected (initiate) or the initiator could not be
    reached (respond) within --timeout; check the address and the firewall."""

    exit_code = 2


class DialError(NoPeerError):
    """Raised by Node.dial when a peer cannot be reached; ``cause`` (see DialFailure) says why:
    refused (nothing listening), timeout, unreachable, peer-id (another node answers at that
    address), handshake, other. The message names the address; the hint says what to check."""

    def __init__(self, message: str, *, cause: str, reason: str = "", hint: str | None = None) -> None:
        super().__init__(message, kind=ErrorKind.TIMEOUT if cause == "timeout" else ErrorKind.UNREACHABLE, hint=hint)
        self.cause = cause
        self.reason = reason or message  # the cause in words, without the address dialed


class TaskError(PangeaError):
    """Raised when a task fails: ``kind`` (an ErrorKind, or the string a worker
    sent) says why (bad-input, refused, busy, unavailable, deadline, internal,
    wrong-result, ...) and the message says what to fix."""

    def __init__(self, message: str, *, kind: str = ErrorKind.INTERNAL) -> None:
        super().__init__(message)
        self.kind = kind


class KernelError(TaskError):
    """Raised by a kernel for invalid inputs; the message names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=ErrorKind.BAD_INPUT)


class BadInputError(TaskError, ValueError):
    """A task refused for what it was given (kind bad-input): also a ValueError, as numpy raises
    for a shape that does not fit or an argument out of range, so ``except ValueError`` catches
    both."""

    def __init__(self, message: str, *, kind: str = ErrorKind.BAD_INPUT) -> None:
        super().__init__(message, kind=kind)


def task_error(message: str, kind: str) -> TaskError:
    """The TaskError of a task that failed with ``kind`` (a BadInputError for bad-input)."""
    return BadInputError(message) if kind == ErrorKind.BAD_INPUT else TaskError(message, kind=kind)


def failure_text(kernel: str, message: str, attempts: Sequence[tuple[str, str]]) -> str:
    """Pure: the one line of a task that failed with ``message`` after ``attempts`` (where, outcome):
    the kernel's own message when it ran once (``matmul: shapes ...``, ``matmul on <peer>: shapes ...``),
    the count and where otherwise."""
    if not attempts:
        return f"cannot run {kernel}: {message}"
    if len(attempts) == 1:
        return message if message.startswith((f"{kernel}:", f"{kernel} on ")) else f"{kernel} failed: {message}"
    where = "; ".join(f"{worker}: {outcome}" for worker, outcome in attempts)
    return f"{kernel} failed after {len(attempts)} attempts: {message} [{where}]"


class JournalUnreadable(PangeaError):
    """The journal file is not one this pangea can read (its text says why, as "is ...")."""


class SessionError(PangeaError):
    """Raised when the pangea home or a session directory cannot be used;
    check permissions of $PANGEA_HOME (default ~/.pangea)."""

    exit_code = 2


class CheckFailed(PangeaError):
    """Raised inside one of the initiator's checks (and the bench's) when a
    result does not verify or a task ran where it should not; the check's row
    shows the message. Look at the responder named in it: its build or hardware."""


class RpcError(PangeaError):
    """Raised by the Client when the node refuses a call (wrong token, node
    shutting down, bad request) or the connection to it fails. ``kind`` is the
    node's error kind ("unavailable" when the node could not be asked)."""

    def __init__(self, message: str, *, kind: str = ErrorKind.UNAVAILABLE, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class Interrupted(Exception):  # not a PangeaError: the CLI turns it into an exit code
    """Raised by run_trio_value when a signal stopped the run; ``code`` is the exit code
    (130 or 143). Nothing to fix: the user asked the command to stop."""

    def __init__(self, code: int) -> None:
        super().__init__(f"interrupted ({code})")
        self.code = code


###############################################################################
# 3. Pure helpers
#
# Formatting, parsing and small decisions with no I/O, shared by the CLI and
# the node.
###############################################################################


def format_bytes(n: float) -> str:
    """Return ``n`` bytes as a short human string (``64.0 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """``0.05 s``, ``2.5 s``, ``65 s``: whole seconds from 10 s up, three significant digits below."""
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.3g} s"


TABLE_GAP = "  "  # between the columns of format_table
TABLE_MIN_COLUMN = 6  # a column narrowed to fit the width keeps at least this many characters


def fit_column_widths(natural: Sequence[int], width: int, gap: int = len(TABLE_GAP)) -> list[int]:
    """Pure: narrow the widest columns first until the row (with ``gap`` between columns) fits
    ``width``; a column never goes below TABLE_MIN_COLUMN (nor its own natural width)."""
    widths = list(natural)
    floors = [min(w, TABLE_MIN_COLUMN) for w in widths]
    over = sum(widths) + gap * max(0, len(widths) - 1) - width
    for _ in range(max(0, over)):  # one character a step, from the widest column that can give one
        room = [i for i, w in enumerate(widths) if w > floors[i]]
        if not room:
            break  # narrower than every column's floor: lines run over rather than lose text
        widths[max(room, key=lambda i: widths[i])] -= 1
    return widths


def wrap_cell(text: str, width: int, break_words: bool = True) -> list[str]:
    """Pure: ``text`` in lines of at most ``width`` characters, broken at spaces (inside a word
    only when the word is longer than the width, unless ``break_words`` is False: then that
    word runs over), its own newlines kept; [""] for an empty cell."""
    import textwrap

    lines: list[str] = []
    for part in text.split("\n"):
        fits = len(part) <= width
        lines += [part] if fits else textwrap.wrap(part, width, break_long_words=break_words, break_on_hyphens=False)
    return lines


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], width: int | None = None, fold: bool = False
) -> str:
    """Return rows as an aligned plain-text table with a header rule; with ``width``, the widest
    columns are narrowed to fit it and their cells wrap within the column (no text is dropped).

    ``fold``: rather than cut a word (a peer id, an address) to fit, move the last columns under
    each row, one ``header: value`` line each, until the columns left fit with their words whole."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError(f"every row of the table must have {len(headers)} cells")
    keep = len(headers)
    if fold and width is not None:
        words = [max(len(word) for r in cells for word in [*r[i].split(), ""]) for i in range(keep)]
        while (
            keep > 1
            and sum(max(w, len(h)) for w, h in zip(words[:keep], headers, strict=False)) + len(TABLE_GAP) * (keep - 1)
            > width
        ):
            keep -= 1
    natural = [max(max(len(line) for line in r[i].split("\n")) for r in cells) for i in range(keep)]
    widths = natural if width is None else fit_column_widths(natural, width)
    lines: list[str] = []
    for index, r in enumerate(cells):
        wrapped = [wrap_cell(c, w) for c, w in zip(r[:keep], widths, strict=True)]
        for k in range(max(len(w) for w in wrapped)):
            parts = [(w[k] if k < len(w) else "").ljust(n) for w, n in zip(wrapped, widths, strict=True)]
            lines.append(TABLE_GAP.join(parts).rstrip())
        if index == 0:
            lines.append(TABLE_GAP.join("-" * w for w in widths))
        elif keep < len(headers) and width is not None:
            for header, value in zip(headers[keep:], r[keep:], strict=True):
                folded = wrap_cell(f"{header}: {value}", max(TABLE_MIN_COLUMN, width - 4))
                lines += [("  " if i == 0 else "    ") + line for i, line in enumerate(folded)]
    return "\n".join(lines)


def format_fields(fields: Iterable[tuple[str, str]], width: int | None = None, label_width: int = 12) -> str:
    """Return label/value lines (labels in a column of ``label_width``); with ``width``, each value
    wraps under itself within it; a value with a word too long for that (an address) goes on the
    lines under its label, indented by 2 (whole, unless even that line is too narrow)."""
    lines: list[str] = []
    for label, value in fields:
        if width is None:
            lines.append(f"{label:<{label_width}}{value}".rstrip())
            continue
        room = max(TABLE_MIN_COLUMN, width - label_width)
        if max([len(word) for word in value.split()] + [0]) <= room:
            values = wrap_cell(value, room)
            lines += [f"{(label if i == 0 else ''):<{label_width}}{v}".rstrip() for i, v in enumerate(values)]
        else:
            lines += [label, *("  " + v for v in wrap_cell(value, max(TABLE_MIN_COLUMN, width - 2)))]
    return "\n".join(lines)


def wrap_text(text: str, width: int | None = None, indent: str = "") -> str:
    """Return ``text`` (lines of prose) wrapped at ``width``, continuation lines indented by ``indent``."""
    if width is None:
        return text
    import textwrap

    out: list[str] = []
    for line in text.split("\n"):
        fits = len(line) <= width
        wrapped = textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        out += [line] if fits else wrapped
    return "\n".join(out)


@dataclass(frozen=True)
class PeerAddress:
    """A parsed, dialable multiaddr that ends in ``/p2p/<peer id>``."""

    text: str
    host: str
    port: int
    peer_id: str
    code: str = ""  # the pairing code of a join string, normalized


_ADDR_FORMS = "/ip4/<address>/tcp/<port>/p2p/<peer id> (as printed by `pangea.pyz initiate`)"


_PEER_ID_CHARS = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def is_peer_id(text: str) -> bool:
    """Return True when ``text`` looks like a base58 libp2p peer id."""
    return 40 <= len(text) <= 64 and set(text) <= _PEER_ID_CHARS


def join_string(multiaddr: str, code: str) -> str:
    """Return the one-line join string of an address and a pairing code: ``pangea://ip4/...#CODE``."""
    return f"pangea://{multiaddr.lstrip('/')}#{code}"


def parse_peer_address(text: str) -> PeerAddress:
    """Check a peer multiaddr (or join string) the user pasted; raise UsageError naming what is wrong."""
    import ipaddress

    text = text.strip()
    code = ""
    if text.startswith("pangea://"):
        text, _, secret = text[len("pangea://") :].partition("#")
        text = "/" + text.lstrip("/")
        if secret:
            code = normalize_pairing_code(secret)
    if not text.startswith("/"):
        raise UsageError(f"bad address {text!r}: a multiaddr starts with '/'; expected {_ADDR_FORMS}")
    parts = text.strip("/").split("/")
    if len(parts) < 4:
        raise UsageError(f"bad address {text!r}: too short; expected {_ADDR_FORMS}")
    proto, host, transport, port_text = parts[:4]
    if proto not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise UsageError(f"bad address {text!r}: unknown network {proto!r}; expected {_ADDR_FORMS}")
    try:
        if proto == "ip4":
            ipaddress.IPv4Address(host)
        elif proto == "ip6":
            ipaddress.IPv6Address(host)
    except ValueError:
        raise UsageError(f"bad address {text!r}: {host!r} is not an {proto} address") from None
    if transport != "tcp":
        raise UsageError(f"bad address {text!r}: pangea uses tcp, not {transport!r}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad address {text!r}: port {port_text!r} is not a number in 1-65535")
    rest = parts[4:]
    if len(rest) < 2 or rest[0] != "p2p":
        raise UsageError(
            f"bad address {text!r}: it has no /p2p/<peer id> part",
            hint="copy the whole line that `pangea.pyz initiate` printed, including /p2p/...",
        )
    if len(rest) > 2:
        raise UsageError(f"bad address {text!r}: unexpected {'/'.join(rest[2:])!r} after the peer id")
    peer_id = rest[1]
    if not is_peer_id(peer_id):
        raise UsageError(f"bad address {text!r}: {peer_id!r} is not a peer id (base58, like 12D3KooW...)")
    return PeerAddress("/" + "/".join(parts), host, int(port_text), peer_id, code)


def interface_kind(name: str, ip: str) -> str:
    """Classify an interface for `doctor`: loopback, virtual (docker, bridges), vpn, or lan."""
    if ip.startswith("127."):
        return "loopback"
    if name.startswith(("docker", "br-", "veth", "virbr", "lxc", "cni", "flannel")):
        return "virtual"
    if name.startswith(("tun", "tap", "wg", "tailscale", "zt", "utun")):
        return "vpn"
    if ip.startswith("169.254."):
        return "link-local"
    return "lan"


_KIND_RANK = {"lan": 0, "link-local": 0, "vpn": 1, "virtual": 2, "loopback": 3}


def rank_interface_addresses(addresses: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order (interface, ipv4) pairs for printing: real interfaces first, VPNs, then
    virtual bridges, loopback last; drop link-local 169.254/16."""

    def rank(item: tuple[str, str]) -> tuple[int, str, str]:
        name, ip = item
        return (_KIND_RANK[interface_kind(name, ip)], name, ip)

    seen: set[str] = set()
    out = []
    for name, ip in sorted(addresses, key=rank):
        if ip.startswith("169.254.") or ip in seen or ip == "0.0.0.0":
            continue
        seen.add(ip)
        out.append((name, ip))
    return out


def build_target_mismatch(built_for: tuple[str, str], here: tuple[str, str]) -> str | None:
    """Return the one-line complaint when this interpreter is not the build
    target of the pyz, or None when it is."""
    if tuple(built_for) == tuple(here):
        return None
    return (
        f"this pangea.pyz was built for {built_for[0]} on {built_for[1]}, but this is "
        f"{here[0]} on {here[1]} ({sys.executable})"
    )


def hello_mismatch(
    local_version: int,
    remote_version: int,
    remote_pangea: str,
    *,
    local_role: str = "this node",
    remote_role: str = "the peer",
) -> str | None:
    """Return why a peer speaking ``remote_version`` cannot work with us, or None.

    The text names both sides by role, so it reads right on either side."""
    if local_version == remote_version:
        return None
    return (
        f"pangea protocol mismatch: {local_role} speaks protocol {local_version} (pangea {__version__}), "
        f"{remote_role} speaks protocol {remote_version} (pangea {remote_pangea})"
    )


def backoff_delays(first_s: float, max_s: float) -> Iterator[float]:
    """Yield retry delays doubling from ``first_s`` up to ``max_s``, forever."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


def multiaddr_ip(text: str) -> str | None:
    """The IP address of an ``/ip4/...`` or ``/ip6/...`` multiaddr, or None."""
    parts = text.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] else None


def is_unspecified_ip(ip: str | None) -> bool:
    """True for 0.0.0.0, :: and the like: a listening wildcard, never an address to dial."""
    import ipaddress

    try:
        return ip is not None and ipaddress.ip_address(ip.strip("[]")).is_unspecified
    except ValueError:
        return False


def endpoint_multiaddr(endpoint: Any) -> str | None:
    """``/ip4/IP/tcp/PORT`` (or ip6) of a socket's (host, port) tuple; None when it is not one."""
    if not isinstance(endpoint, tuple) or len(endpoint) < 2 or not isinstance(endpoint[0], str):
        return None
    host, port = endpoint[0], endpoint[1]
    if not host or is_unspecified_ip(host) or not isinstance(port, int):
        return None
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


def dialable_addresses(addresses: Iterable[str], remote_ip: str | None) -> list[str]:
    """The addresses of a peer that another machine can dial, in order, without repeats.

    A peer that listens on every interface announces ``/ip4/0.0.0.0/...``; it
    listens on the address its connection came from too, so that IP takes the
    wildcard's place (the wildcard is dropped when the connection's IP is unknown)."""
    out: list[str] = []
    for address in addresses:
        ip = multiaddr_ip(address)
        if is_unspecified_ip(ip):
            if not remote_ip or is_unspecified_ip(remote_ip):
                continue
            family = "ip6" if ":" in remote_ip else "ip4"
            address = "/".join(["", family, remote_ip, *address.split("/")[3:]])
        if address not in out:
            out.append(address)
    return out


def plain_ip(host: str) -> str:
    """An IP as a data connection's socket and a libp2p multiaddr both name it: no brackets,
    an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as the IPv4 one, lower case."""
    host = host.strip("[]").lower()
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_data_port(text: str) -> int | None:
    """Parse --data-port: a port, 0 for any free one, ``auto`` (-1: the libp2p port + 1) or ``off`` (None)."""
    value = text.strip().lower()
    if value == "off":
        return None
    if value == "auto":
        return -1
    if value.isascii() and value.isdigit() and 0 <= int(value) <= 65535:
        return int(value)
    raise UsageError(f"bad --data-port {text!r}: expected a port (0-65535), auto or off")


def data_port_for(spec: int | None, libp2p_port: int) -> int | None:
    """The port the data plane binds: ``auto`` is the libp2p port + 1, or any port when that is 0."""
    if spec is None or spec >= 0:
        return spec
    return libp2p_port + DATA_PORT_OFFSET if libp2p_port and libp2p_port < 65535 else 0


def short_id(peer_id: str) -> str:
    """Return a peer id shortened for tables (``12D3KooW…x9Qa``)."""
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-4:]}"


@dataclass(frozen=True)
class Limits:
    """What a node accepts from its peers. Each per-peer field has a CLI option; see README "Security"."""

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES  # one frame's array bytes
    max_elements: int = DEFAULT_MAX_ELEMENTS  # per array
    max_ndim: int = MAX_NDIM
    dtypes: tuple[str, ...] = ALLOWED_DTYPES
    max_inflight_tasks: int = DEFAULT_MAX_INFLIGHT_TASKS  # per peer
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES  # per peer
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES  # whole node
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    max_pending_streams: int = DEFAULT_MAX_PENDING_STREAMS  # per peer
    # node-wide (no CLI options): every peer, the strangers, strangers per source address
    max_pending_streams_total: int = DEFAULT_MAX_PENDING_STREAMS_TOTAL
    max_pending_stranger_streams: int = DEFAULT_MAX_PENDING_STRANGER_STREAMS
    max_strangers_per_address: int = DEFAULT_MAX_STRANGERS_PER_ADDRESS
    compression: bool = True  # arrays packed on a slow link, both ways (the Hello lists the codecs)

    def validate(self) -> Limits:
        """Return self, or raise UsageError naming the first bad value."""
        bad = [d for d in self.dtypes if d not in ALLOWED_DTYPES]
        if bad or not self.dtypes:
            raise UsageError(f"dtypes {bad or 'none'} are not allowed; choose from {', '.join(ALLOWED_DTYPES)}")
        for name in (
            "max_payload_bytes",
            "max_elements",
            "max_inflight_tasks",
            "max_inflight_bytes",
            "memory_budget_bytes",
            "max_pending_streams",
            "max_pending_streams_total",
            "max_pending_stranger_streams",
            "max_strangers_per_address",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("handshake_timeout_s", "idle_timeout_s", "task_timeout_s"):
            if not 0 < getattr(self, name) < 1e6:
                raise UsageError(f"{name.replace('_', ' ')} must be a positive number of seconds")
        if not 1 <= self.max_ndim <= MAX_NDIM:
            raise UsageError(f"max ndim must be within 1-{MAX_NDIM}")
        return self


class MemoryBudget:
    """Counts the operand bytes a node holds for its peers; refuses what would exceed the limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_use = 0
        self.peak = 0
        # NOTE: taken by the trio thread (peers' tasks) and the RPC thread (clients' tasks), so
        # an RPC task is charged where it arrives, without a hop into trio
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        """Take n bytes if they fit; return whether they did (from any thread)."""
        with self._lock:
            if self.in_use + n > self.limit_bytes:
                return False
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, n: int) -> None:
        """Give back n bytes taken earlier (from any thread)."""
        with self._lock:
            self.in_use = max(0, self.in_use - n)


def rpc_task_bytes(operand_bytes: int, out_bytes: int) -> int:
    """The bytes an RPC task holds on its node until its answer is built: its operands in the
    message twice (the request message pycapnp keeps until the call returns, and the arrays read
    from it) and its output bound twice (the kernel's result, and its copy on the way out).
    Operands on the bulk channel are not counted here: shared memory is the client's, and what
    a remote client uploads is charged from its upload's header on."""
    return 2 * operand_bytes + 2 * out_bytes


def budget_refusal(
    budget: MemoryBudget, kernel: str, need: int, out_bytes: int, *, held: str | None = None
) -> TaskError | None:
    """Why a task that holds ``need`` bytes (``out_bytes`` of them its output) cannot run now (None: it
    fits). Kind "bad-input" when it exceeds the whole budget (it never will), "busy" when other
    tasks hold the rest (it may, later). ``held``: what the message says holds them (default: the
    task named by ``kernel`` and its output)."""
    if budget.in_use + need <= budget.limit_bytes:
        return None
    if held is None:
        output = f"its output of {format_bytes(out_bytes)}"
        held = f"cannot run {kernel}: {output} ({format_bytes(need)} with its operands and the answer's copy)"
    if need > budget.limit_bytes:
        return TaskError(
            f"{held} can never fit the node's memory budget of "
            f"{format_bytes(budget.limit_bytes)}; ask for less, or raise --memory-budget-mib",
            kind=ErrorKind.BAD_INPUT,
        )
    return TaskError(
        f"{held} would not fit the node's memory budget of {format_bytes(budget.limit_bytes)} "
        f"({format_bytes(budget.in_use)} in use); retry later or raise --memory-budget-mib",
        kind=ErrorKind.BUSY,
    )


class CallBound:
    """Counts the RPC calls in flight; refuses one past ``limit`` (pure; touched by one thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0  # calls answered "busy", for status and metrics

    def try_enter(self) -> bool:
        """Take a slot for one call if one is free; return whether it was."""
        if self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        """The call is over: its slot is free."""
        self.in_flight = max(0, self.in_flight - 1)


# ---------------------------------------------------------------- RPC arguments


def one_line(text: str, limit: int = 1000) -> str:
    """Return ``text`` on one line, at most ``limit`` characters (for error lines and RPC errors)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def visible(text: str) -> str:
    """Return ``text`` with its control characters escaped (a CR or a newline in an argument a user typed
    must not break, or overwrite, the one line an error is)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def check_task_timeout(timeout_s: float) -> float:
    """Return a task's timeout in seconds (0: the default); TaskError(bad-input) for NaN, inf,
    negative or absurd values."""
    if timeout_s == 0:
        return RPC_DEFAULT_TIMEOUT_S
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= RPC_MAX_TIMEOUT_S):
        raise TaskError(
            f"bad timeoutSeconds {timeout_s!r}: expected a number of seconds more than 0 and at most "
            f"{RPC_MAX_TIMEOUT_S:g}, or 0 for the node's default ({RPC_DEFAULT_TIMEOUT_S:g})",
            kind=ErrorKind.BAD_INPUT,
        )
    return timeout_s


def check_rpc_text(name: str, text: str) -> str:
    """Return a short text argument of an RPC call; TaskError(bad-input) when absurdly long."""
    if len(text) > RPC_MAX_TEXT_CHARS:
        raise TaskError(
            f"bad {name}: {len(text)} characters, expected at most {RPC_MAX_TEXT_CHARS}", kind=ErrorKind.BAD_INPUT
        )
    return text


def rpc_words(max_bytes: int) -> int:
    """Return the Cap'n Proto traversal limit (in 8-byte words) for messages of max_bytes."""
    return max_bytes // 8 + (1 << 20)


# ---------------------------------------------------------------- what the Client sends

# The cast the Client suggests for an operand whose dtype pangea does not take:
# the smallest allowed dtype that holds every value of the refused one exactly,
# else the nearest that keeps the magnitudes. (target dtype, why) per dtype name.
_CASTS: dict[str, tuple[str, str]] = {
    "float16": ("float32", "exact: every float16 is a float32"),
    # NOTE: int32, not int64: half the bytes on the wire and in memory, and a count of 0/1 values
    # (a sum, a matmul entry) reaches at most the elements of one array (2**28 by default) < 2**31
    "bool": ("int32", "True and False become 1 and 0; int32 holds any count of them"),
    "int8": ("int32", "exact: every int8 is an int32"),
    "int16": ("int32", "exact: every int16 is an int32"),
    "uint8": ("int32", "exact: every uint8 is an int32"),
    "uint16": ("int32", "exact: every uint16 is an int32"),
    "uint32": ("int64", "exact: uint32 reaches 2**32 - 1, past int32, well within int64"),
    "float128": ("float64", "rounds each value to float64's 53-bit mantissa"),
    "complex256": ("complex128", "rounds each part to float64's 53-bit mantissa"),
}


def cast_suggestion(dtype_name: str, max_value: int | None = None) -> tuple[str, str] | None:
    """Return (allowed dtype to cast to, why) for an array of numpy dtype ``dtype_name`` that
    pangea does not take; None when no cast gives numbers back (str, bytes, object, void).

    ``max_value``: the array's largest value, which decides a uint64's cast: int64 when it
    fits (exact), else float64 (its magnitude, rounded); None: unknown, so float64."""
    if dtype_name in _CASTS:
        return _CASTS[dtype_name]
    if dtype_name == "uint64":
        if max_value is not None and max_value < 1 << 63:  # int64 holds up to 2**63 - 1
            return "int64", f"exact: its largest value {max_value} fits in int64"
        if max_value is None:
            return "float64", "int64 may not hold its values; float64 does, rounded to 53 bits"
        return (
            "float64",
            f"its largest value {max_value} passes int64's 2**63 - 1; float64 holds it, rounded to 53 bits",
        )
    if dtype_name.startswith(("datetime64", "timedelta64")):
        return "int64", "counts of its time unit"
    return None


def refused_dtype_message(kernel: str, index: int, dtype_name: str, max_value: int | None = None) -> str:
    """The one-line error of the Client for operand ``index`` of a dtype pangea does not take,
    with the cast to make (see cast_suggestion)."""
    head = f"cannot submit {kernel}: operand {index} is a {dtype_name} array; pangea takes {', '.join(ALLOWED_DTYPES)}"
    cast = cast_suggestion(dtype_name, max_value)
    if cast is None:
        return f"{head}: convert it to numbers of one of those first"
    name = chr(ord("a") + index) if index < 26 else f"operands[{index}]"  # as the kernels' descriptions name them
    return f"{head}: cast it first, e.g. {name}.astype(np.{cast[0]}) ({cast[1]})"


def client_timings(node_timings: dict[str, float], client_total_s: float) -> dict[str, float]:
    """A task's timings as `Client.last_task` gives them: the node's (queue_s, transfer_s,
    compute_s, total_s) plus ``client_total_s``, the wall time the Client measured around the
    call, and ``rpc_s``, what the client-to-node hop took on top of the node's total (the
    operands and results crossing the RPC connection, both ends building and reading them)."""
    node_total_s = float(node_timings.get("total_s", 0.0))
    return {**node_timings, "client_total_s": client_total_s, "rpc_s": max(0.0, client_total_s - node_total_s)}


def remote_error_text(exc: BaseException) -> str:
    """Return the readable part of a pycapnp remote exception (the last `XError: message` line)."""
    import re

    text = str(exc)
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Refused)): (.+)$", text, flags=re.M)
    if found:
        return found[-1][1].strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first.removeprefix("(remote):0: failed: ").strip()


class RedialNotes:
    """What a node that keeps a --peer connected says on its console, decided here (pure, time
    comes in as ``now``): the cause of the first failure, once and briefly; then only changes:
    another cause, "still unreachable after N tries" at growing intervals (REDIAL_NOTE_FIRST_S,
    doubling up to REDIAL_NOTE_MAX_S), and "reconnected". Each dial's details go to the log."""

    def __init__(self, label: str, first_s: float = REDIAL_NOTE_FIRST_S, max_s: float = REDIAL_NOTE_MAX_S) -> None:
        self.label = label
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0  # failed dials since the last success
        self.since = 0.0  # when the first of them failed
        self.cause = ""  # the kind of failure last said
        self.next_note = 0.0  # when "still unreachable" is due
        self.interval = first_s

    def failed(self, cause: str, reason: str, retry_max_s: float, now: float) -> str | None:
        """A dial failed (``cause``: its kind, see DialFailure; ``reason``: in words): the line to
        print, or None to stay quiet."""
        self.failures += 1
        if self.failures == 1 or cause != self.cause:
            first = self.failures == 1
            self.since = now if first else self.since
            self.cause, self.interval, self.next_note = cause, self.first_s, now + self.first_s
            now_text = "" if first else "now "
            return f"cannot reach peer {self.label}: {now_text}{reason}; retrying every {retry_max_s:.0f} s at most"
        if now < self.next_note:
            return None
        self.interval = min(self.interval * 2, self.max_s)
        self.next_note = now + self.interval
        return (
            f"peer {self.label} still unreachable after {self.failures} tries in {format_seconds(now - self.since)} "
            f"({reason}); retrying every {retry_max_s:.0f} s"
        )

    def connected(self, now: float) -> str:
        """A dial succeeded: the line to print."""
        if not self.failures:
            return f"connected to peer {self.label}"
        tries = "1 failed try" if self.failures == 1 else f"{self.failures} failed tries"
        text = f"reconnected to peer {self.label} after {tries} in {format_seconds(now - self.since)}"
        self.failures, self.cause = 0, ""
        return text


def new_pairing_code(rng: random.Random | None = None) -> str:
    """Return a fresh pairing code (12 Crockford base32 characters) from a CSPRNG."""
    import secrets

    choice = rng.choice if rng is not None else secrets.choice
    return "".join(choice(PAIRING_ALPHABET) for _ in range(PAIRING_CODE_CHARS))


def format_pairing_code(code: str) -> str:
    """Return a code in groups of four for reading aloud: ``ABCD-EFGH-JKMN``."""
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def normalize_pairing_code(text: str) -> str:
    """Return the canonical form of a typed code: upper case, no dashes or spaces, O->0, I/L->1.

    Raise UsageError when it cannot be a pairing code."""
    code = text.strip().upper().replace("-", "").replace(" ", "")
    code = code.translate(str.maketrans("OIL", "011"))
    if len(code) != PAIRING_CODE_CHARS or not set(code) <= set(PAIRING_ALPHABET):
        raise UsageError(
            f"bad pairing code {text!r}: expected {PAIRING_CODE_CHARS} letters and digits like ABCD-EFGH-JKMN"
        )
    return code


def pairing_proof(code: str, acceptor_id: str, dialer_id: str) -> bytes:
    """Return the proof a dialer sends in its Hello: HMAC-SHA256 of both peer ids under the code.

    Both ids are authenticated by Noise, so the proof cannot be replayed by
    another peer or against another node; the code itself never crosses the wire."""
    import hashlib
    import hmac

    message = f"pangea-pair-v1|{acceptor_id}|{dialer_id}".encode()
    return hmac.new(code.encode(), message, hashlib.sha256).digest()


def home_proof_message(acceptor_id: str, dialer_id: str) -> bytes:
    """What a process on a throwaway identity signs with its home's key, for one acceptor.

    Both ids are authenticated by Noise, so the signature vouches for this one
    dialer towards this one acceptor and cannot be replayed elsewhere."""
    return f"pangea-home-v1|{acceptor_id}|{dialer_id}".encode()


def parse_trusted_peers(text: str) -> tuple[set[str], list[str]]:
    """Parse a trusted_peers file: one peer id per line, `#` comments; return (ids, complaints)."""
    ids: set[str] = set()
    complaints = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if is_peer_id(entry):
            ids.add(entry)
        else:
            complaints.append(f"line {number}: {entry!r} is not a peer id")
    return ids, complaints


def parse_psk(text: str) -> str:
    """Return the 64-hex pre-shared key of a swarm key file (plain hex, or the go-libp2p
    `/key/swarm/psk/1.0.0/` + `/base16/` form); raise ConfigError otherwise."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"]:
        lines = lines[2:]
    key = lines[0].lower() if len(lines) == 1 else ""
    if len(key) != 64 or not set(key) <= set("0123456789abcdef"):
        raise ConfigError(
            "the pre-shared key file must hold 64 hex digits (32 bytes)",
            hint="create one with `./pangea.pyz psk FILE` and copy that file to every node",
        )
    return key


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """Parse HOST:PORT, [IPV6]:PORT, HOST or :PORT; raise UsageError naming the problem."""
    host, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise UsageError(
            f"bad address {text!r}: expected HOST:PORT, like 127.0.0.1:{default_port}, "
            f"with an IPv6 address in brackets: [::1]:{default_port}"
        )
    host = host.strip("[]") or "127.0.0.1"
    if not sep:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) < 65536:
        raise UsageError(f"bad address {text!r}: expected HOST:PORT, like 127.0.0.1:{default_port}")
    return host, int(port_text)


def is_loopback_host(host: str) -> bool:
    """Return True for 127.0.0.0/8, ::1 and localhost."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_exception(exc: BaseException) -> str:
    """Return a one-line description of an exception from a library."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return describe_exception(exc.exceptions[0])
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# a connect that failed with one of these found no way to the address (as opposed to nobody listening)
UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL})


def connect_error_text(exc: BaseException, waited_s: float) -> str:
    """Pure: why a TCP connect to a node failed, in words (``nothing listening there``), not the
    socket's exception; another error as `describe_exception` says it."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "nothing listening there"
    if code in UNREACHABLE_ERRNOS:
        return "no route to it (is that the address of a box this one reaches?)"
    if isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
        return f"no answer within {format_seconds(waited_s)} (a firewall dropping the port?)"
    return describe_exception(exc)


def exception_chain(exc: BaseException, limit: int = 64) -> list[BaseException]:
    """Every exception inside ``exc``, outermost first: its causes, contexts, the members of
    exception groups and of py-libp2p's MultiError (``.errors``). At most ``limit``."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < limit:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        members = list(getattr(current, "exceptions", None) or []) + list(getattr(current, "errors", None) or [])
        todo += [e for e in members if isinstance(e, BaseException)]
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return found


@dataclass(frozen=True)
class DialFailure:
    """Why a libp2p dial failed, as `classify_dial_error` reads py-libp2p's exception chain.

    ``cause``: refused (nothing listening), timeout (no answer), unreachable (no route),
    peer-id (another node answers there), handshake (something answered but the libp2p
    security handshake failed), other. ``final``: dialing again cannot help."""

    cause: str
    reason: str
    hint: str
    final: bool = False


PSK_HINT = "both nodes need the same --psk file, or neither"


def classify_dial_error(
    exc: BaseException,
    host: str,
    port: int,
    peer_id: str,
    *,
    waited_s: float,
    tcp_reached: bool | None = None,
    who: str = "pangea",
) -> DialFailure:
    """The cause of a failed dial of ``peer_id`` at ``host:port`` from the exceptions py-libp2p
    0.8.1 raised (a SwarmDialAllFailedError keeps them in its cause's MultiError) or our own
    deadline (trio.TooSlowError). ``tcp_reached``: what a plain TCP connect to the address
    found afterwards (None: not tried); it tells a firewall from a handshake that hangs.
    ``who``: what should listen there, for the hint ("the initiator")."""
    import re

    where = format_host_port(host, port)
    chain = exception_chain(exc)
    names = {type(e).__name__ for e in chain}
    texts = " | ".join(str(e) for e in chain)
    if "PeerIDMismatchesPubkey" in names or "peer id does not correspond" in texts or "Peer ID mismatch" in texts:
        found = re.search(r"remote_peer_id_from_pubkey=(\w+)", texts)
        actual = f"the node there has peer id {found.group(1)}" if found else "the node there has another peer id"
        return DialFailure(
            "peer-id",
            f"{actual}, you asked for {peer_id}",
            "check the address you copied: its /p2p/ part must be the peer id that node printed "
            "(copy its whole line, or the join string, again)",
            final=True,
        )
    codes = {e.errno for e in chain if isinstance(e, OSError) and e.errno}
    if codes & {errno.ECONNREFUSED} or any(isinstance(e, ConnectionRefusedError) for e in chain):
        return DialFailure(
            "refused",
            f"nothing listening on {where}",
            f"is {who} running there, and on that port? (it prints the address to copy when it starts)",
        )
    if codes & UNREACHABLE_ERRNOS:
        return DialFailure(
            "unreachable",
            f"no route to {where}",
            f"is {host} the address of that box on a network this one reaches (same LAN or VPN)? "
            "a firewall rejecting the port?",
        )
    timed_out = codes & {errno.ETIMEDOUT} or names & {"TooSlowError", "TimeoutError", "timeout"}
    if timed_out and tcp_reached:
        return DialFailure(
            "handshake",
            f"{where} accepts TCP but no libp2p handshake completed within {format_seconds(waited_s)}",
            f"is that port pangea's (the one it printed, not its data port)? {PSK_HINT}",
        )
    if timed_out:
        return DialFailure(
            "timeout",
            f"no answer from {where} within {format_seconds(waited_s)}",
            f"is {host} reachable from this box (same network or VPN)? is a firewall dropping TCP port {port}?",
        )
    if names & {"SecurityUpgradeFailure", "MultiselectError", "HandshakeFailure", "NoiseFailure"} or (
        "handshake" in texts.lower()
    ):
        return DialFailure(
            "handshake",
            f"{where} answered, but the libp2p security handshake failed",
            f"is that port pangea's (the one it printed, not its data port or another program)? {PSK_HINT}",
        )
    inner = chain[-1] if chain else exc
    return DialFailure("other", describe_exception(inner), f"check the address and that pangea runs there; {PSK_HINT}")


def format_fingerprint(digest: bytes) -> str:
    """``sha256:<64 hex>``: how a certificate's SHA-256 is printed and pinned."""
    return "sha256:" + digest.hex()


def parse_fingerprint(text: str) -> bytes:
    """The SHA-256 digest in a fingerprint as `serve` prints it (``sha256:`` optional, colons and
    case ignored); UsageError when it is not 32 bytes of hex."""
    raw = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(raw) != 64 or any(c not in "0123456789abcdef" for c in raw):
        raise UsageError(
            f"bad fingerprint {one_line(text, 100)!r}: expected sha256: and 64 hex digits, as `serve` prints it"
        )
    return bytes.fromhex(raw)


class CapnpFrameMeter:
    """Sans-I/O: the declared size of each Cap'n Proto message in a byte stream (standard framing).

    ``feed(data)`` returns the largest size (segment table plus segments, in bytes) of the
    messages whose segment table ends in ``data``; the segments themselves are counted,
    never kept, so a caller can refuse a message from its first 8 bytes."""

    MAX_SEGMENTS = 512  # Cap'n Proto refuses more; the meter reports such a table as huge

    def __init__(self) -> None:
        self._table = bytearray()  # the segment table read so far (at most 2 KiB)
        self._skip = 0  # bytes of the current message's segments still to come

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Count ``data``; return the largest message size declared in it (0: none)."""
        view, largest = memoryview(data).cast("B"), 0
        while True:
            if self._skip:
                if not len(view):
                    return largest
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = 4
            if len(self._table) >= 4:
                count = int.from_bytes(self._table[:4], "little") + 1
                if count > self.MAX_SEGMENTS:
                    return 1 << 64  # a table Cap'n Proto refuses: the connection ends here
                need = (4 * (count + 1) + 7) // 8 * 8
            if len(self._table) < need:
                if not len(view):
                    return largest
                step = min(need - len(self._table), len(view))
                self._table += view[:step]
                view = view[step:]
                continue
            sizes = [int.from_bytes(self._table[4 + 4 * i : 8 + 4 * i], "little") for i in range(count)]
            self._skip = 8 * sum(sizes)
            largest = max(largest, need + self._skip)
            self._table.clear()


@dataclass
class LoginLimiter:
    """Pure: how long to hold a refused login from each source address, and when to log them.

    ``refused(source, now)`` returns (delay in seconds, count to log): the delay doubles per
    refusal from one source (bounded), and the count is nonzero at most once per
    ``report_s`` per source: the refusals since its last line. Time comes in as ``now``."""

    base_delay_s: float
    max_delay_s: float
    forget_s: float
    report_s: float
    max_sources: int
    # source -> [refusals in a row, time of the last one, refusals not yet logged, time of the last line]
    _sources: dict[str, list[float]] = field(default_factory=dict)

    def refused(self, source: str, now: float) -> tuple[float, int]:
        """Count one refused login from ``source`` at ``now``; return (delay_s, count to log or 0)."""
        entry = self._sources.pop(source, None)
        if entry is None or now - entry[1] > self.forget_s:
            entry = [0.0, now, 0.0, -math.inf] if entry is None else [0.0, now, entry[2], entry[3]]
        entry[0] += 1
        entry[1] = now
        entry[2] += 1
        report = 0
        if now - entry[3] >= self.report_s:
            report, entry[2], entry[3] = int(entry[2]), 0.0, now
        self._sources[source] = entry  # NOTE: re-inserted last: the dict's order is least recent first
        while len(self._sources) > self.max_sources:
            del self._sources[next(iter(self._sources))]
        return min(self.max_delay_s, self.base_delay_s * 2 ** min(entry[0] - 1, 64)), report


@dataclass
class RpcAdmission:
    """Pure: which RPC connections the node keeps: a cap on all, and on those awaiting their login.

    ``open(conn, source)`` returns (admitted, connections to close): a new connection that
    would pass a cap on waiting logins evicts the oldest waiting one (of its source first);
    past the cap on all connections with none waiting, it is refused."""

    max_connections: int
    max_pending: int
    max_pending_per_source: int
    _pending: dict[object, str] = field(default_factory=dict)  # conn -> source, oldest first
    _open: set[object] = field(default_factory=set)

    def open(self, conn: object, source: str) -> tuple[bool, list[object]]:
        """Admit ``conn`` from ``source``, or not; return (admitted, the waiting ones to close)."""
        evict: list[object] = []
        mine = [c for c, s in self._pending.items() if s == source]
        if len(mine) >= self.max_pending_per_source:
            evict.append(mine[0])
        elif len(self._pending) >= self.max_pending or len(self._open) >= self.max_connections:
            if not self._pending:
                return False, []
            evict.append(next(iter(self._pending)))
        for old in evict:
            self.close(old)
        self._pending[conn] = source
        self._open.add(conn)
        return True, evict

    def logged_in(self, conn: object) -> None:
        """``conn`` logged in: it no longer counts as waiting."""
        self._pending.pop(conn, None)

    def close(self, conn: object) -> None:
        """``conn`` is gone (closing it twice is harmless)."""
        self._pending.pop(conn, None)
        self._open.discard(conn)

    def counts(self) -> tuple[int, int]:
        """(open connections, of which waiting for a login)."""
        return len(self._open), len(self._pending)


def _blocks(shape: Sequence[int], limit: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples (slices, one per axis) that cover an array of ``shape`` in C order, each of at most
    ``limit`` elements (or one row of the last axis): the slices the checks of O(n) results read."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if len(shape) == 1 or inner <= limit:
        step = max(1, limit // max(1, inner))
        for start in range(0, shape[0], step):
            yield (slice(start, start + step),) + (slice(None),) * (len(shape) - 1)
        return
    for i in range(shape[0]):
        for rest in _blocks(shape[1:], limit):
            yield (slice(i, i + 1), *rest)


def serving_line(listen_host: str, addresses: Sequence[str]) -> str:
    """Pure: serve's ready line, saying where it really listens: one address, or (``--host``
    0.0.0.0) every interface at the port of the addresses printed above it."""
    tail = "; Ctrl-C or SIGTERM stops"
    if not addresses:
        return f"pangea: serving on /ip4/{listen_host} (no dialable address){tail}"
    if listen_host not in ("0.0.0.0", "::"):
        return f"pangea: serving on {addresses[0]}{tail}"
    port = addresses[0].split("/tcp/")[1].split("/")[0]
    count = f"{len(addresses)} address{'es' if len(addresses) > 1 else ''} above"
    return f"pangea: serving on /ip4/0.0.0.0/tcp/{port}, every interface (peers dial one of the {count}){tail}"


def doctor_verdict(findings: dict[str, Any]) -> tuple[bool, str]:
    """Return (ok, one line with the next thing to try) from the doctor's findings (pure)."""
    if findings.get("build") is not None:
        return False, f"wrong interpreter: {findings['build']}; run the pyz with the Python it was built for"
    peer = findings.get("peer")
    if peer is None:
        if not findings.get("port_free", True):
            return False, f"port {findings['port']} is taken: start pangea with --port 0 or another port"
        if not findings.get("advertised"):
            return False, "no usable network interface: connect this box to a network"
        return True, "this box is ready: start `./pangea.pyz initiate` here, or run doctor with a peer's address"
    if not peer.get("tcp"):
        why = peer.get("tcp_error", "")
        if "refused" in why.lower():
            return False, "nothing listens at that address: is pangea running there, on that port?"
        return False, (
            "TCP does not reach the peer: check that both boxes are on one network (or a VPN), "
            "the address is the peer's LAN/VPN address, and no firewall blocks the port"
        )
    if peer.get("libp2p") == "incompatible":
        return False, f"version mismatch: {peer.get('detail')}; use the same pangea.pyz on both boxes"
    if peer.get("libp2p") == "failed" and peer.get("cause") == "peer-id":
        reason = str(peer.get("detail", "")).rpartition(": ")[2]
        return False, (
            f"TCP works but the libp2p handshake fails: the peer ID in the address is wrong: {reason}; "
            "copy that node's whole address line again"
        )
    if peer.get("libp2p") == "failed":
        return False, (
            "TCP works but the libp2p handshake fails: the peer ID in the address is probably wrong "
            "(copy the whole line again), the port is not pangea's, or only one side uses --psk"
        )
    rtt = peer.get("rtt_ms") or peer.get("tcp_ms")
    blocked = peer.get("data_plane_blocked")
    if blocked:
        return True, (
            f"the peer speaks pangea, but its data port {blocked} is not reachable: tasks will work, arrays "
            f"will travel on the slower libp2p stream; let TCP port {blocked} through the firewall"
        )
    return (
        True,
        f"the peer is reachable and speaks pangea{f' (rtt {rtt:.1f} ms)' if rtt else ''}: respond/serve will work",
    )


###############################################################################
# 4. Wire framing (sans-I/O)
#
# Messages are Python dataclasses; on the wire each is one frame:
#     FRAME_PREFIX(header_len, payload_len) + header + payload
# The header is a Cap'n Proto `Message` (capnp/pangea.capnp); the payload is
# the raw bytes of the arrays the header describes. `encode_parts` returns the
# pieces to write (array memory is not copied); `Decoder.feed` takes bytes as
# they arrive and `Decoder.next` returns a message or NEED_DATA. Limits are
# checked from the 12-byte prefix, before any header or payload is buffered.
###############################################################################


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA


@dataclass
class HelloMsg:
    """First message of a session, from both sides: who we are, what we run."""

    pangea_version: str
    protocol_version: int
    kernels: tuple[str, ...]
    role: str
    cores: int = 1
    blas_threads: int = 1
    gflops: float = 0.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    platform: str = ""
    pairing_proof: bytes = b""
    instance_id: int = 0
    data_port: int = 0  # our TLS data plane's port, 0 when we have none
    data_cert: bytes = b""  # SHA-256 of its certificate
    data_token: bytes = b""  # acceptor only: the one-time secret the dialer presents there
    host_id: bytes = b""  # names the sender's machine (host_fingerprint), empty when unknown
    home_id: str = ""  # the peer id of the home the sender runs from, when it runs on a throwaway identity
    home_proof: bytes = b""  # home_id's signature over both peer ids (home_proof_message)
    codecs: tuple[str, ...] = ()  # the array codecs the sender decodes (`codecs_available`)


@dataclass(eq=False)
class TaskRequestMsg:
    """Run ``kernel`` on ``operands`` with ``params``; answered by a TaskResultMsg."""

    task_id: int
    kernel: str
    operands: tuple[np.ndarray, ...] = ()
    params: Params = field(default_factory=dict)
    # per operand: nonzero, the id under which the receiver holds it for this session (its bytes are
    # not sent: the operand given here stands for its dtype and shape); () or 0: sent
    held: tuple[int, ...] = ()
    # nonzero: the receiver keeps output i under this id + i and answers with their dtypes and shapes only
    keep: int = 0
    # per operand: nonzero, sent, and the receiver keeps it under this id for later tasks; () or 0: not
    store: tuple[int, ...] = ()


@dataclass(eq=False)
class TaskResultMsg:
    """The outputs of a task, or ``error_kind`` and ``error_message``."""

    task_id: int
    outputs: tuple[np.ndarray, ...] = ()
    error_kind: str = ""
    error_message: str = ""
    compute_s: float = 0.0
    # nonzero: the outputs are kept by the sender under this id + i (TaskRequest.keep); only their
    # dtypes and shapes travel, and the outputs here are stand-ins holding no memory
    kept: int = 0

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return not self.error_kind


@dataclass
class PingMsg:
    """Liveness and RTT probe; the peer answers with a PongMsg of the same nonce."""

    nonce: int
    load: int = 0  # tasks the sender is running or has queued for its peers


@dataclass
class PongMsg:
    """Answer to a PingMsg."""

    nonce: int
    load: int = 0


@dataclass
class CancelMsg:
    """The sender no longer wants the result of its task ``task_id``."""

    task_id: int


@dataclass
class ReleaseMsg:
    """The sender no longer needs the arrays the receiver holds for it under ``ids``."""

    ids: tuple[int, ...]


@dataclass
class ByeMsg:
    """The sender ends the session on purpose."""

    reason: str = "done"


@dataclass
class ErrorMsg:
    """A session-level refusal or protocol complaint; the stream ends after it."""

    kind: str
    message: str


# typing.Union, not `|`: this line runs at import, and a wrong-interpreter run must
# get as far as main() to print the build-target error.
@dataclass
class DataPlaneMsg:
    """From the dialer: whether its TLS data plane connection works (see `DataPlane`)."""

    ok: bool
    reason: str = ""


Message = Union[  # noqa: UP007
    HelloMsg, TaskRequestMsg, TaskResultMsg, PingMsg, PongMsg, ByeMsg, ErrorMsg, CancelMsg, DataPlaneMsg, ReleaseMsg
]


@dataclass(frozen=True)
class Refusal:
    """A decision to say no: the ErrorKind that travels (ErrorMsg.kind, TaskResult.errorKind),
    the reason, and a hint for the user when there is one to give."""

    kind: str
    message: str
    hint: str | None = None

    def to_msg(self) -> ErrorMsg:
        """The ErrorMsg that tells the peer; a `refused` one's hint travels after REFUSAL_HINT_MARK (the
        dialer knows the hints of the other kinds by their kind, and an incompatible peer may be older)."""
        travels = self.hint and self.kind == ErrorKind.REFUSED
        return ErrorMsg(self.kind, self.message + (REFUSAL_HINT_MARK + str(self.hint) if travels else ""))


class FrameGate(Protocol):
    """What the Decoder asks from a frame's header alone, before it buffers the payload
    (the session protocol answers, `SessionProtocol.gate`)."""

    def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
        """None to buffer a TaskRequest's operands, or why they are skipped unbuffered."""
        ...

    def awaits_result(self, task_id: int) -> bool:
        """Whether a TaskResult for ``task_id`` is awaited (others are skipped unbuffered)."""
        ...


def schema_path() -> Path:
    """Return the path of pangea.capnp: beside this file in the pyz, else in capnp/."""
    here = Path(__file__).resolve()
    for candidate in (here.with_name("pangea.capnp"), here.parent / "capnp" / "pangea.capnp"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"cannot find pangea.capnp next to {here}", hint="rebuild with ./build.sh")


@functools.cache
def load_schema() -> Any:
    """Load and cache the Cap'n Proto schema module."""
    import capnp

    return capnp.load(str(schema_path()))  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: Any) -> str:
    # NOTE: numpy computes dtype.name in Python on every access (~10 us); a task has several.
    return str(dtype.name)


@functools.lru_cache(maxsize=64)
def _wire_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name).newbyteorder("<")


def _carries_bytes(msg: Message, nbytes: int) -> bool:
    """Whether ``msg`` carries an array of at least ``nbytes`` (a task's operands or its outputs)."""
    arrays = msg.operands if isinstance(msg, TaskRequestMsg) else msg.outputs if isinstance(msg, TaskResultMsg) else ()
    return any(getattr(a, "nbytes", 0) >= nbytes for a in arrays)


# ---- compression: arrays packed on a slow link (the codec a Hello lists; the channel decides)
#
# A sender packs an array only for a peer whose Hello lists the codec, only from
# COMPRESS_MIN_BYTES, and only when a sample of it says packing pays on this link
# (`compression_pays`, from the sample's ratio and speed and the session's measured
# bandwidth: the channel's packer, room 11). The receiver checks the frame's own
# header against the array's (exactly its bytes, exactly the bytes stored) before it
# allocates the output: a frame cannot unpack to more than the header announced, and
# the header's sizes are bounded by the same limits as raw arrays.

CODEC_BLOSC = "blosc-lz4"  # c-blosc 1.x: byte shuffle by the dtype's item size, then lz4
COMPRESS_MIN_BYTES = 1 << 20  # below this the sample and the frame's own header cost more than they save
COMPRESS_MAX_BYTES = (1 << 31) - (1 << 20)  # one c-blosc 1.x frame holds less than 2 GiB
COMPRESS_SAMPLE_BYTES = 64 << 10  # each of the COMPRESS_SAMPLES slices a sample packs
COMPRESS_SAMPLES = 4
COMPRESS_GAIN = 0.8  # pack only when that is expected to take at most this share of the raw time
COMPRESS_GUESS_BYTES_S = 2e9  # packing and unpacking speed until a sample measured them (lz4 on one core)
UNPACK_IN_THREAD_BYTES = 4 << 20  # a frame that unpacks to more is decoded in a worker thread (ms of lz4)
BLOSC_HEADER = struct.Struct("<BBBBiii")  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes


def codecs_available() -> tuple[str, ...]:
    """The codecs this node packs and unpacks (none when c-blosc cannot be imported)."""
    try:
        import blosc  # noqa: F401
    except ImportError:
        return ()
    return (CODEC_BLOSC,)


def compression_pays(
    nbytes: int, ratio: float, pack_bytes_s: float, unpack_bytes_s: float, link_bytes_s: float
) -> bool:
    """Whether ``nbytes`` packed (``ratio``: raw over packed, as a sample measured) reach the other
    side sooner than raw over a link of ``link_bytes_s``: packing, the packed bytes on the link and
    unpacking, one after the other, against the raw bytes alone (0 link speed: not measured, no)."""
    if min(link_bytes_s, pack_bytes_s, unpack_bytes_s) <= 0 or ratio <= 1.0 or nbytes > COMPRESS_MAX_BYTES:
        return False
    raw_s = nbytes / link_bytes_s
    packed_s = nbytes / pack_bytes_s + nbytes / (ratio * link_bytes_s) + nbytes / unpack_bytes_s
    return packed_s <= COMPRESS_GAIN * raw_s


def blosc_frame_sizes(frame: bytes | memoryview) -> tuple[int, int]:
    """(bytes it unpacks to, bytes it takes) as a c-blosc 1.x frame's own header declares them."""
    if len(frame) < BLOSC_HEADER.size:
        return -1, -1
    _, _, _, _, nbytes, _, cbytes = BLOSC_HEADER.unpack_from(frame)
    return nbytes, cbytes


def pack_blosc(a: np.ndarray) -> bytes:
    """A C-ordered array as one c-blosc frame (byte shuffle by its item size, lz4)."""
    import blosc

    return bytes(
        blosc.compress_ptr(
            a.__array_interface__["data"][0], a.size, typesize=a.itemsize, clevel=5, shuffle=blosc.SHUFFLE, cname="lz4"
        )
    )


def unpack_blosc(frame: memoryview, out: np.ndarray) -> None:
    """Unpack a c-blosc frame into ``out`` (uint8, exactly its declared size: `blosc_frame_sizes`)."""
    import blosc

    if blosc_frame_sizes(frame) != (out.nbytes, len(frame)):
        raise ValueError("the frame's own header does not match the array's")
    blosc.decompress_ptr(frame, out.__array_interface__["data"][0])


# A packer, given by a channel whose peer decodes a codec: the bytes of an array in that codec
# (one frame of exactly its bytes, `pack_blosc`), or None to send it as it is.
Packer = Callable[["np.ndarray"], "bytes | None"]
ArrayMetaParts = tuple[str, tuple[int, ...], int, str, int]  # dtype, shape, nbytes, codec, stored


def _array_parts(
    arrays: Sequence[np.ndarray], packer: Packer | None = None
) -> tuple[list[ArrayMetaParts], list[memoryview]]:
    """Return (dtype, shape, nbytes, codec, stored) metadata and the byte views of arrays: zero-copy,
    or the packer's bytes for an array it packed (codec CODEC_BLOSC, ``stored`` bytes)."""
    import numpy as np

    metas: list[ArrayMetaParts] = []
    views = []
    for a in arrays:
        a = np.asarray(a)
        name = _dtype_name(a.dtype)
        if name not in ALLOWED_DTYPES:
            raise LocalProtocolError(f"dtype {name!r} cannot be sent; allowed: {', '.join(ALLOWED_DTYPES)}")
        if a.ndim > MAX_NDIM:
            raise LocalProtocolError(f"an array of {a.ndim} dimensions cannot be sent; at most {MAX_NDIM}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # NOTE: not np.ascontiguousarray, which turns 0-d into 1-d
        packed = packer(a) if packer is not None and a.nbytes >= COMPRESS_MIN_BYTES else None
        codec, stored = (CODEC_BLOSC, len(packed)) if packed is not None else ("", 0)
        metas.append((_dtype_name(a.dtype), tuple(int(d) for d in a.shape), int(a.nbytes), codec, stored))
        views.append(memoryview(packed) if packed is not None else a.reshape(-1).view(np.uint8).data)
    return metas, views


# A kernel's parameter: a number (float; an int or bool becomes one), a text, or a
# tuple of integers (axes, a shape). Params travel as these on the wire and the RPC.
ParamValue = float | str | tuple[int, ...]
Params = Mapping[str, ParamValue]  # what a kernel reads (a dict of floats is one too)
PARAM_NUMBER, PARAM_TEXT, PARAM_INTS = 0, 1, 2  # Param.kind
_INT64 = 1 << 63


def param_value(name: str, value: Any) -> ParamValue | None:
    """A Python value as a kernel parameter: int, float, bool -> number, str -> text, a tuple or list of
    ints -> ints, None -> None (omitted); ValueError naming the parameter for anything else or too long."""
    import numbers

    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_PARAM_TEXT:
            raise ValueError(f"parameter {name!r}: text of {len(value)} characters, at most {MAX_PARAM_TEXT}")
        return value
    if isinstance(value, numbers.Real):  # int, float, bool and numpy's scalars
        return float(value)
    if isinstance(value, tuple | list) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        if len(value) > MAX_PARAM_INTS:
            raise ValueError(f"parameter {name!r}: {len(value)} integers, at most {MAX_PARAM_INTS}")
        ints = tuple(int(v) for v in value)
        if any(not -_INT64 <= v < _INT64 for v in ints):
            raise ValueError(f"parameter {name!r}: an integer beyond 64 bits")
        return ints
    raise ValueError(f"parameter {name!r}: {type(value).__name__} is not a number, a text or a tuple of integers")


def params_from_python(values: dict[str, Any]) -> Params:
    """Keyword arguments as kernel parameters (see param_value): None omitted, at most MAX_PARAMS."""
    out: dict[str, ParamValue] = {}
    for name, value in values.items():
        p = param_value(name, value)
        if p is not None:
            out[str(name)] = p
    if len(out) > MAX_PARAMS:
        raise ValueError(f"{len(out)} parameters, at most {MAX_PARAMS}")
    return out


def params_to_capnp(builder: Any, params: Params) -> None:
    """Fill the ``params`` list of a TaskRequest or TaskSpec builder (the one writer of both)."""
    slots = builder.init("params", len(params))
    for slot, (name, value) in zip(slots, params.items(), strict=True):
        slot.name = name
        if isinstance(value, str):
            slot.kind, slot.text = PARAM_TEXT, value
        elif isinstance(value, tuple):
            slot.kind = PARAM_INTS
            slot.ints = [int(v) for v in value]
        else:
            slot.kind, slot.value = PARAM_NUMBER, float(value)


def params_from_capnp(readers: Any, task_id: int | None = None) -> Params:
    """The params of a TaskRequest or TaskSpec reader (the one reader of both); MessageError (bad-input)
    for too many, an unknown kind, a text or ints list over its bound, or a name given twice."""
    if len(readers) > MAX_PARAMS:
        raise MessageError(f"{len(readers)} parameters, at most {MAX_PARAMS}", task_id=task_id)
    out: dict[str, ParamValue] = {}
    for p in readers:
        name = str(p.name)
        if len(name) > MAX_PARAM_TEXT or name in out:
            raise MessageError(f"parameter {name[:40]!r}: too long or given twice", task_id=task_id)
        kind = int(p.kind)
        if kind == PARAM_NUMBER:
            out[name] = float(p.value)
        elif kind == PARAM_TEXT:
            if len(p.text) > MAX_PARAM_TEXT:
                raise MessageError(f"parameter {name!r}: text over {MAX_PARAM_TEXT} characters", task_id=task_id)
            out[name] = str(p.text)
        elif kind == PARAM_INTS:
            if len(p.ints) > MAX_PARAM_INTS:
                raise MessageError(f"parameter {name!r}: over {MAX_PARAM_INTS} integers", task_id=task_id)
            out[name] = tuple(int(v) for v in p.ints)
        else:
            raise MessageError(f"parameter {name!r}: unknown kind {kind} (0 number, 1 text, 2 ints)", task_id=task_id)
    return out


def _set_metas(builder_list: Any, metas: Sequence[ArrayMetaParts]) -> None:
    for slot, (dtype, shape, nbytes, codec, stored) in zip(builder_list, metas, strict=True):
        slot.dtype = dtype
        slot.shape = list(shape)
        slot.nbytes = nbytes
        if codec:
            slot.codec, slot.stored = codec, stored


def encode_parts(msg: Message, packer: Packer | None = None) -> list[bytes | memoryview]:
    """Return the byte pieces of one frame for ``msg``: prefix+header, then array views (``packer``:
    the channel's, when its peer decodes a codec: arrays it packs travel packed)."""
    import capnp

    m = load_schema().Message.new_message()
    try:
        views = _build_message(m, msg, packer)
        header = m.to_bytes()
    except (capnp.KjException, OverflowError, TypeError, ValueError) as exc:  # type: ignore[attr-defined]
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {text}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"message header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    payload_len = sum(len(v) for v in views)
    return [FRAME_PREFIX.pack(len(header), payload_len) + header, *views]


def coalesce_parts(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Join a small frame's pieces into one, so it goes out as one write (one TLS record,
    one Yamux frame, one syscall) instead of one per piece; large arrays stay uncopied."""
    if len(parts) > 1 and sum(len(p) for p in parts) <= COALESCE_BYTES:
        return [b"".join(parts)]
    return parts


def _build_message(m: Any, msg: Message, packer: Packer | None = None) -> list[memoryview]:
    """Fill the capnp Message builder ``m`` from ``msg``; return the payload views."""
    views: list[memoryview] = []
    if isinstance(msg, HelloMsg):
        h = m.init("hello")
        h.pangeaVersion = msg.pangea_version
        h.protocolVersion = msg.protocol_version
        h.kernels = list(msg.kernels)
        h.role = msg.role
        h.capacity.cores = msg.cores
        h.capacity.blasThreads = msg.blas_threads
        h.capacity.gflops = msg.gflops
        h.maxPayloadBytes = msg.max_payload_bytes
        h.platform = msg.platform
        h.pairingProof = msg.pairing_proof
        h.instanceId = msg.instance_id
        h.dataPort = msg.data_port
        h.dataCert = msg.data_cert
        h.dataToken = msg.data_token
        h.hostId = msg.host_id
        h.homeId = msg.home_id
        h.homeProof = msg.home_proof
        h.codecs = list(msg.codecs)
    elif isinstance(msg, TaskRequestMsg):
        held = msg.held or (0,) * len(msg.operands)
        store = msg.store or (0,) * len(msg.operands)
        metas, views = _array_parts([a for a, h in zip(msg.operands, held, strict=True) if not h], packer)
        r = m.init("taskRequest")
        r.taskId = msg.task_id
        r.kernel = msg.kernel
        r.keep = msg.keep
        sent = iter(metas)
        for slot, a, h, k in zip(r.init("operands", len(msg.operands)), msg.operands, held, store, strict=True):
            if h:  # NOTE: held by the receiver: its dtype and shape, no bytes
                slot.dtype, slot.shape, slot.held = _dtype_name(a.dtype), [int(d) for d in a.shape], h
            else:
                _set_metas([slot], [next(sent)])
                slot.held = k  # NOTE: with its bytes: the receiver keeps it under this id
        params_to_capnp(r, msg.params)
    elif isinstance(msg, TaskResultMsg):
        metas, views = _array_parts(() if msg.kept else msg.outputs, packer)
        r = m.init("taskResult")
        r.taskId = msg.task_id
        if msg.kept:  # NOTE: kept by this node: their dtypes and shapes, no bytes
            for i, (slot, a) in enumerate(zip(r.init("outputs", len(msg.outputs)), msg.outputs, strict=True)):
                slot.dtype, slot.shape, slot.held = _dtype_name(a.dtype), [int(d) for d in a.shape], msg.kept + i
        else:
            _set_metas(r.init("outputs", len(metas)), metas)
        r.errorKind = str(msg.error_kind)
        r.errorMessage = msg.error_message
        r.computeSeconds = msg.compute_s
    elif isinstance(msg, PingMsg | PongMsg):
        p = m.init("ping" if isinstance(msg, PingMsg) else "pong")
        p.nonce = msg.nonce
        p.load = msg.load
    elif isinstance(msg, ReleaseMsg):
        m.init("release").ids = list(msg.ids)
    elif isinstance(msg, CancelMsg):
        m.init("cancel").taskId = msg.task_id
    elif isinstance(msg, DataPlaneMsg):
        d = m.init("dataPlane")
        d.ok = msg.ok
        d.reason = msg.reason
    elif isinstance(msg, ByeMsg):
        m.init("bye").reason = msg.reason
    elif isinstance(msg, ErrorMsg):
        e = m.init("error")
        e.kind = str(msg.kind)
        e.message = msg.message
    else:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}")
    return views


def encode(msg: Message) -> bytes:
    """Return the whole frame for ``msg`` as bytes (copies arrays; tests and small messages)."""
    return b"".join(bytes(p) for p in encode_parts(msg))


def frame_size(msg: Message) -> int:
    """Return the number of bytes ``msg`` takes on the wire."""
    return sum(len(p) for p in encode_parts(msg))


class PayloadPool(Protocol):
    """Where a Decoder takes the buffer of a payload (the node's BufferPool reuses large ones)."""

    def take(self, n: int) -> np.ndarray:
        """Return a writable uint8 array of n bytes."""
        ...


class Decoder:
    """Turn a byte stream into messages, one frame at a time.

    ``feed(data)`` keeps the bytes; ``next()`` returns the next complete
    message or NEED_DATA. A RemoteProtocolError from ``next()`` means the
    stream is unusable (every later call raises it again); a MessageError
    means one frame had bad contents and decoding can go on.
    """

    def __init__(
        self,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        *,
        limits: Limits | None = None,
        gate: FrameGate | None = None,
        pool: PayloadPool | None = None,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_header_bytes = max_header_bytes
        self.limits = limits
        # gate.admit_request(task_id, payload_len) is asked before a TaskRequest's payload is
        # buffered; it returns None, or a Refusal to skip the payload unbuffered and raise
        # MessageError for that task (rate limits, budget). gate.awaits_result(task_id) says
        # whether a TaskResult is awaited; others are skipped unbuffered.
        self.gate = gate
        self.pool = pool  # None: a fresh buffer for every payload
        self._refused: tuple[int, str, str] | None = None
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._header_len: int | None = None
        self._payload_len = 0
        self._header: bytes | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._unpacked = 0  # what the current frame's packed arrays unpack to (`peek_frame`)
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: fed but not yet consumed, plus the current payload buffer."""
        return self._buffered + (len(self._payload) if self._payload is not None else 0)

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has been received (EOF now means truncation)."""
        return self._buffered > 0 or self._header_len is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; call ``next()`` until it returns NEED_DATA."""
        if self._broken is not None or not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # NOTE: the caller may reuse its buffer; bytes from stream.read are kept as they are
        self._chunks.append(memoryview(data))
        self._buffered += len(data)

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._chunks[0]
            need = n - len(out)
            if len(chunk) <= need:
                out += chunk
                self._chunks.popleft()
            else:
                out += chunk[:need]
                self._chunks[0] = chunk[need:]
        self._buffered -= n
        return bytes(out)

    def _admit_frame(self) -> None:
        """Decide, from the header alone, whether the payload may be buffered."""

        assert self._header is not None
        if self._payload_len:
            try:
                which, task_id, unpacked = peek_frame(self._header)
            except RemoteProtocolError as exc:
                raise self._fail(str(exc)) from None
            self._unpacked = unpacked
            if which not in ("taskRequest", "taskResult") or task_id is None:
                raise self._fail(f"a {which} message carries no payload, but this frame announces one")
            if unpacked > self.max_payload_bytes:  # NOTE: packed arrays are held to the limit of raw ones
                raise self._fail(
                    f"frame payload unpacks to {format_bytes(unpacked)}, over the limit of "
                    f"{format_bytes(self.max_payload_bytes)}"
                )
            verdict: Refusal | None = None
            if which == "taskRequest" and self.gate is not None:  # charged: the payload and what it unpacks to
                verdict = self.gate.admit_request(task_id, self._payload_len + unpacked)
            elif which == "taskResult" and self.gate is not None and not self.gate.awaits_result(task_id):
                verdict = Refusal(ErrorKind.UNSOLICITED, f"a result for task {task_id}, which nobody is waiting for")
            if verdict is not None:
                self._refused = (task_id, verdict.kind, verdict.message)
                self._payload = bytearray()  # skip the payload: read it, keep none of it
                return
        elif self.gate is not None:
            try:
                which, task_id = peek_header(self._header)
            except RemoteProtocolError as exc:
                raise self._fail(str(exc)) from None
            if which == "taskRequest" and task_id is not None:
                verdict = self.gate.admit_request(task_id, 0)
                if verdict is not None:
                    self._refused = (task_id, verdict.kind, verdict.message)
                    self._payload = bytearray()
                    return
        # NOTE: np.empty, not bytearray: the OS maps the pages as the bytes arrive, so a
        # payload announced and never sent does not become resident memory.
        if self.pool is not None:
            self._payload = self.pool.take(self._payload_len)  # type: ignore[assignment]
        else:
            import numpy as np

            self._payload = np.empty(self._payload_len, dtype=np.uint8)  # type: ignore[assignment]

    def _fill_payload(self) -> None:
        assert self._payload is not None
        view = memoryview(self._payload)
        skipping = self._refused is not None
        while self._filled < self._payload_len and self._chunks:
            chunk = self._chunks[0]
            need = self._payload_len - self._filled
            n = min(need, len(chunk))
            if not skipping:
                view[self._filled : self._filled + n] = chunk[:n]
            self._filled += n
            self._buffered -= n
            if n == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[n:]

    def payload_space(self) -> memoryview | None:
        """Where the next bytes of the stream belong, when that is the current payload.

        A transport that can read straight into a buffer (`TlsChannel`) writes the
        payload there, without a copy, then calls ``payload_written(n)``. None while
        bytes are buffered, between frames, or when the payload is being skipped."""
        if (
            self._payload is None
            or self._refused is not None
            or self._chunks
            or self._broken is not None
            or self._filled >= self._payload_len
        ):
            return None
        return memoryview(self._payload)[self._filled : self._payload_len]

    def payload_written(self, n: int) -> None:
        """Count ``n`` payload bytes written into ``payload_space()``."""
        assert 0 <= n <= self._payload_len - self._filled
        self._filled += n

    def discard(self) -> None:
        """Drop every buffered byte and the gate (the stream is gone)."""
        self._chunks.clear()
        self._buffered = 0
        self._header_len, self._header, self._payload = None, None, None
        self.gate = None

    def _fail(self, message: str) -> RemoteProtocolError:
        self._broken = RemoteProtocolError(message)
        self._chunks.clear()
        self._buffered = 0
        self._header_len, self._header, self._payload = None, None, None
        self._refused = None
        return self._broken

    def next(self) -> Message | _NeedData:
        """Return the next complete message, or NEED_DATA."""
        msg = self.next_frame()
        assert not isinstance(msg, PackedFrame)
        return msg

    def next_frame(self, unpack_later_bytes: int = 0) -> Message | PackedFrame | _NeedData:
        """As `next`, but a frame whose packed arrays unpack to at least ``unpack_later_bytes`` (0: none)
        comes whole and undecoded, as a `PackedFrame` for `decode`, which its caller may run in a
        worker thread: unpacking is most of such a frame's work."""
        if self._broken is not None:
            raise self._broken
        if self._header_len is None:
            if self._buffered < FRAME_PREFIX.size:
                return NEED_DATA
            header_len, payload_len = FRAME_PREFIX.unpack(self._take(FRAME_PREFIX.size))
            if not 0 < header_len <= self.max_header_bytes:
                raise self._fail(f"frame header of {header_len} bytes is outside 1..{self.max_header_bytes}")
            if payload_len > self.max_payload_bytes:
                raise self._fail(
                    f"frame payload of {format_bytes(payload_len)} exceeds the limit of "
                    f"{format_bytes(self.max_payload_bytes)}"
                )
            self._header_len, self._payload_len = header_len, payload_len
        if self._header is None:
            if self._buffered < self._header_len:
                return NEED_DATA
            self._header = self._take(self._header_len)
            self._filled, self._unpacked = 0, 0
            self._admit_frame()
        self._fill_payload()
        if self._filled < self._payload_len:
            return NEED_DATA
        header, payload = self._header, self._payload
        self._header_len, self._header, self._payload = None, None, None
        refused, self._refused = self._refused, None
        if refused is not None:
            raise MessageError(refused[2], task_id=refused[0], kind=refused[1], admitted=False)
        assert payload is not None
        if unpack_later_bytes and self._unpacked >= unpack_later_bytes:
            return PackedFrame(header, payload)
        return self.decode(header, payload)

    def decode(self, header: bytes, payload: bytearray) -> Message:
        """One whole frame as its message (`next` does it, unless it handed the frame out packed);
        MessageError for bad contents, RemoteProtocolError (the stream unusable from now on) for garbage."""
        try:
            return decode_message(header, payload, self.limits)
        except MessageError:
            raise
        except RemoteProtocolError as exc:
            raise self._fail(str(exc)) from None


@dataclass(frozen=True)
class PackedFrame:
    """A whole frame with large packed arrays, not decoded yet (`Decoder.next_frame`)."""

    header: bytes
    payload: bytearray


def _array_layout(meta: Any, i: int, task_id: int, limits: Limits) -> tuple[np.dtype[Any], list[int], int]:
    """(dtype, shape, bytes) that array ``i``'s header metadata declares; MessageError when its dtype,
    dimensions or elements are not allowed (checked before any of its bytes are stored)."""
    dtype_name = str(meta.dtype)
    if dtype_name not in limits.dtypes:
        raise MessageError(
            f"array {i}: dtype {dtype_name!r} is not allowed ({', '.join(limits.dtypes)})", task_id=task_id
        )
    shape = [int(d) for d in meta.shape]
    if len(shape) > limits.max_ndim:
        raise MessageError(f"array {i}: {len(shape)} dimensions, at most {limits.max_ndim} allowed", task_id=task_id)
    if math.prod(shape) > limits.max_elements or any(d > limits.max_elements for d in shape):
        raise MessageError(
            f"array {i}: shape {tuple(shape)} has more than {limits.max_elements} elements", task_id=task_id
        )
    dtype = _wire_dtype(dtype_name)
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _arrays_from(
    metas: Any, payload: bytearray, task_id: int, limits: Limits | None = None, *, held_ok: bool = False
) -> tuple[np.ndarray, ...]:
    """Build arrays over ``payload`` (no copy) from header metadata; MessageError if inconsistent.
    ``held_ok``: an operand may be held by the receiver (`ArrayMeta.held`): it stands as an array of
    its dtype and shape holding no memory, and takes no payload."""
    import numpy as np

    limits = limits or Limits()
    arrays = []
    offset = 0
    for i, meta in enumerate(metas):
        dtype, shape, expected = _array_layout(meta, i, task_id, limits)
        if int(getattr(meta, "held", 0)):
            if not held_ok:
                raise MessageError(f"array {i}: held arrays are operands of a task", task_id=task_id)
            if not int(meta.nbytes) and expected:  # held by the receiver: no bytes follow
                arrays.append(np.broadcast_to(np.zeros((), dtype=dtype), shape))
                continue
        dtype_name = str(meta.dtype)
        nbytes = int(meta.nbytes)
        if nbytes != expected:
            raise MessageError(
                f"array {i}: shape {tuple(shape)} of {dtype_name} needs {expected} bytes, header says {nbytes}",
                task_id=task_id,
            )
        codec = str(getattr(meta, "codec", ""))
        if codec:  # packed: its frame is checked against the header before its output is allocated
            stored = int(meta.stored)
            if codec not in codecs_available():
                raise MessageError(
                    f"array {i}: packed with {codec!r}, which this node does not unpack", task_id=task_id
                )
            if offset + stored > len(payload):
                raise MessageError(f"array {i}: runs past the end of the payload", task_id=task_id)
            frame = memoryview(payload)[offset : offset + stored]
            declared, cbytes = blosc_frame_sizes(frame)
            if (declared, cbytes) != (nbytes, stored):
                raise MessageError(
                    f"array {i}: its {codec} frame declares {declared} bytes in {cbytes}, "
                    f"the header {nbytes} in {stored}",
                    task_id=task_id,
                )
            out = np.empty(nbytes, dtype=np.uint8)
            try:
                unpack_blosc(frame, out)
            except (ValueError, RuntimeError) as exc:
                raise MessageError(f"array {i}: its {codec} frame cannot be unpacked: {exc}", task_id=task_id) from None
            arrays.append(out.view(dtype).reshape(shape))
            offset += stored
            continue
        if offset + nbytes > len(payload):
            raise MessageError(f"array {i}: runs past the end of the payload", task_id=task_id)
        try:
            a = np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        except ValueError as exc:
            raise MessageError(f"array {i}: shape {tuple(shape)} cannot be built: {exc}", task_id=task_id) from None
        arrays.append(a)
        offset += nbytes
    if offset != len(payload):
        raise MessageError(f"payload has {len(payload)} bytes, the arrays describe {offset}", task_id=task_id)
    return tuple(arrays)


def operand_stand_ins(readers: Any) -> list[np.ndarray] | None:
    """Arrays of the dtypes and shapes an RPC task's operands declare, holding no memory (a stride-0
    view of one zero), for admission before the operands are copied out of the request; None
    when one is malformed (`array_from_capnp` then says what is wrong)."""
    import numpy as np

    limits = Limits()
    out = []
    for reader in readers:
        name, shape = str(reader.dtype), tuple(int(d) for d in reader.shape)
        too_many = math.prod(shape) > limits.max_elements or any(d > limits.max_elements for d in shape)
        if name not in limits.dtypes or len(shape) > limits.max_ndim or too_many:
            return None
        try:
            out.append(np.broadcast_to(np.zeros((), dtype=_wire_dtype(name)), shape))
        except ValueError:  # NOTE: a shape numpy refuses (a negative or absurd dimension)
            return None
    return out


def peek_header(header: bytes) -> tuple[str, int | None]:
    """Return (message type, task id or None) of a frame header, before its payload arrives."""
    which, task_id, _ = peek_frame(header)
    return which, task_id


def peek_frame(header: bytes) -> tuple[str, int | None, int]:
    """(message type, task id or None, the bytes its packed arrays unpack to) of a frame header,
    before its payload arrives: what the payload will hold in memory beyond its own bytes."""
    import capnp

    try:
        with load_schema().Message.from_bytes(header, traversal_limit_in_words=len(header) // 8 + 64) as m:
            which = str(m.which())
            if which in ("taskRequest", "taskResult"):
                body = m.taskRequest if which == "taskRequest" else m.taskResult
                metas = body.operands if which == "taskRequest" else body.outputs
                unpacked = sum(int(a.nbytes) for a in metas if a.codec)
                return which, int(body.taskId), unpacked
            return which, None, 0
    except (capnp.KjException, UnicodeDecodeError, ValueError) as exc:  # type: ignore[attr-defined]
        log.debug("malformed header: %s", exc)
        raise RemoteProtocolError("malformed message header: not a pangea Message") from None


def decode_message(header: bytes, payload: bytearray, limits: Limits | None = None) -> Message:
    """Decode one frame's header and payload into a message (pure)."""
    import capnp

    schema = load_schema()
    try:
        with schema.Message.from_bytes(header, traversal_limit_in_words=len(header) // 8 + 64) as m:
            which = str(m.which())
            if len(payload) and which not in ("taskRequest", "taskResult"):
                raise RemoteProtocolError(f"a {which} message carries no payload, but this frame has one")
            if which == "hello":
                h = m.hello
                return HelloMsg(
                    pangea_version=str(h.pangeaVersion),
                    protocol_version=int(h.protocolVersion),
                    kernels=tuple(str(k) for k in h.kernels),
                    role=str(h.role),
                    cores=int(h.capacity.cores),
                    blas_threads=int(h.capacity.blasThreads),
                    gflops=float(h.capacity.gflops),
                    max_payload_bytes=int(h.maxPayloadBytes),
                    platform=str(h.platform),
                    pairing_proof=bytes(h.pairingProof),
                    instance_id=int(h.instanceId),
                    data_port=int(h.dataPort),
                    data_cert=bytes(h.dataCert),
                    data_token=bytes(h.dataToken),
                    host_id=bytes(h.hostId),
                    home_id=str(h.homeId),
                    home_proof=bytes(h.homeProof),
                    codecs=tuple(str(c) for c in h.codecs)[:8],
                )
            if which == "taskRequest":
                r = m.taskRequest
                task_id = int(r.taskId)
                params = params_from_capnp(r.params, task_id)
                operands = _arrays_from(r.operands, payload, task_id, limits, held_ok=True)
                held = tuple(int(o.held) if not int(o.nbytes) else 0 for o in r.operands)
                store = tuple(int(o.held) if int(o.nbytes) else 0 for o in r.operands)
                return TaskRequestMsg(
                    task_id,
                    str(r.kernel),
                    operands,
                    params,
                    held if any(held) else (),
                    int(r.keep),
                    store if any(store) else (),
                )
            if which == "taskResult":
                r = m.taskResult
                task_id = int(r.taskId)
                kept = tuple(int(o.held) for o in r.outputs)
                if any(kept) and (
                    any(int(o.nbytes) for o in r.outputs) or kept != tuple(range(kept[0], kept[0] + len(kept)))
                ):
                    raise MessageError("a result's kept outputs carry bytes, or ids out of order", task_id=task_id)
                return TaskResultMsg(
                    task_id,
                    _arrays_from(r.outputs, payload, task_id, limits, held_ok=True),
                    str(r.errorKind),
                    str(r.errorMessage),
                    float(r.computeSeconds),
                    kept[0] if kept else 0,
                )
            if which == "release":
                ids = m.release.ids
                if len(ids) > MAX_HELD_PER_SESSION:
                    raise RemoteProtocolError(f"a release of {len(ids)} ids, at most {MAX_HELD_PER_SESSION}")
                return ReleaseMsg(tuple(int(i) for i in ids))
            if which == "ping":
                return PingMsg(int(m.ping.nonce), int(m.ping.load))
            if which == "pong":
                return PongMsg(int(m.pong.nonce), int(m.pong.load))
            if which == "cancel":
                return CancelMsg(int(m.cancel.taskId))
            if which == "dataPlane":
                return DataPlaneMsg(bool(m.dataPlane.ok), str(m.dataPlane.reason))
            if which == "bye":
                return ByeMsg(str(m.bye.reason))
            if which == "error":
                return ErrorMsg(str(m.error.kind), str(m.error.message))
            raise RemoteProtocolError(f"unknown message type {which!r}")
    except (capnp.KjException, UnicodeDecodeError, ValueError) as exc:  # type: ignore[attr-defined]
        if isinstance(exc, PangeaError):
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RemoteProtocolError(f"malformed message header: {text[:200]}") from None


# ---------------------------------------------------------------- sending frames
#
# A channel's frames go out through one writer per channel that owns the socket
# (`SendQueue` holds the order; the I/O lives in `Channel`). A sender that gives
# up (its task was cancelled: a client timeout, a client that went away) never
# cuts a frame in the middle:
# - a frame that has not started is taken out of the queue: the peer never sees it;
# - a frame that has started is finished by the writer, and the sender's Cancel
#   follows it, so the peer drops the task as soon as it has arrived.
# Why finish rather than abort: a frame is a length prefix, a header, then raw
# payload bytes that the receiver decrypts straight into the operands' numpy
# buffer; an in-band abort would need the payload cut into chunks, each with a
# header to check, which costs that zero-copy path on every transfer to save
# at most one frame (bounded by max_payload_bytes) on a rare one. The rest of a
# frame at data-plane speed takes well under a second for the usual sizes, and
# the session, its data connection and every later task are kept.


@dataclass(eq=False)
class OutgoingFrame:
    """One encoded message waiting for, or being written by, its channel's writer."""

    parts: list[bytes | memoryview]
    state: str = "queued"  # queued -> writing -> sent | dropped | failed
    error: PangeaError | None = None
    done: Any = None  # the I/O layer's completion event (a trio.Event)


class SendQueue:
    """The frames of one channel in the order they go out (pure: no socket, no clock).

    The writer takes ``next()``, writes it, then calls ``sent()``; a sender that
    gives up calls ``abandon()``; ``close()`` fails what is left."""

    def __init__(self) -> None:
        self._frames: deque[OutgoingFrame] = deque()
        self.writing: OutgoingFrame | None = None
        self.closed_error: PangeaError | None = None
        self.dropped = 0  # frames taken out before their first byte
        self.finished_for_nobody = 0  # frames whose sender gave up once they had started

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: OutgoingFrame) -> None:
        """Queue a frame; PeerError when the channel is closed."""
        if self.closed_error is not None:
            raise self.closed_error
        self._frames.append(frame)

    def next(self) -> OutgoingFrame | None:
        """The frame to write now, or None when none waits; it is then ``writing``."""
        assert self.writing is None, "the writer asked for a frame before finishing one"
        if not self._frames:
            return None
        frame = self.writing = self._frames.popleft()
        frame.state = "writing"
        return frame

    def sent(self, frame: OutgoingFrame) -> None:
        """The writer wrote the whole frame; its buffers are let go."""
        assert frame is self.writing
        self.writing = None
        frame.state, frame.parts = "sent", []

    def abandon(self, frame: OutgoingFrame) -> bool:
        """The frame's sender gave up: True when it was dropped (nothing of it was
        written), False when it is being (or was) written and is finished as it is."""
        if frame.state == "queued" and frame in self._frames:
            self._frames.remove(frame)
            frame.state, frame.parts = "dropped", []
            self.dropped += 1
            return True
        if frame.state == "writing":
            self.finished_for_nobody += 1
        return False

    def close(self, error: PangeaError) -> list[OutgoingFrame]:
        """The channel is gone: fail the frame being written and every queued one; return them."""
        if self.closed_error is None:
            self.closed_error = error
        failed = [self.writing] if self.writing is not None else []
        failed += self._frames
        self._frames.clear()
        self.writing = None
        for frame in failed:
            frame.state, frame.error, frame.parts = "failed", error, []
        return failed


def silence_s(now: float, last_byte_at: float) -> float:
    """Seconds since the last byte arrived from a peer, on whichever of its connections."""
    return max(0.0, now - last_byte_at)


def idle_reason(now: float, last_byte_at: float, idle_timeout_s: float) -> str | None:
    """Why a session counts as dead (nothing at all received for longer than the
    timeout), or None while it is alive. A transfer in progress is not silence:
    ``last_byte_at`` moves with every chunk read, not with whole messages."""
    silent = silence_s(now, last_byte_at)
    if silent <= idle_timeout_s:
        return None
    return f"nothing received for {silent:.0f} s (peer gone or network down)"


###############################################################################
# 5. Session protocol (sans-I/O)
#
# The decisions of one session with a peer, made once, as a state object in
# the manner of h11's Connection: no socket, no trio, no clock (time comes in
# as ``now``), no numpy. The I/O adapter (`PeerSession`) tells it what happened
# (a message decoded from a channel, a bad frame, a channel lost, a tick of the
# clock, the session closing) and performs the actions it returns: `Transmit`
# a message, `RunTask` for the peer, `StopTask`, `Resolve` a waiter, `NoteLoad`,
# `EndSession`, `PeerFellBack`, `Log`. It owns:
# - the Hello check (`check_hello`), one verdict for the acceptor and the dialer;
# - admission of a peer's TaskRequest from its header, asked by the Decoder
#   through `SessionProtocol.gate(key)`: trust, a task id in flight, the per-peer
#   limits and the node's memory budget; the operand and output bytes a served
#   task holds, released exactly once however the task ends;
# - our requests waiting for results, pings waiting for pongs, the tasks the
#   peer gave up, the counters, and the idle timeout.
# A channel is an opaque key here (the adapter passes its Channel objects).
# It sits after wire framing, not after kernels: a task's output size comes in
# as a number (`reserve_output`), so the kernel registry is not needed.
###############################################################################

ChannelKey = Any  # an opaque, hashable name of one of a session's channels

# The hint a dialer's user gets when the acceptor refused the session for one of these kinds.
REFUSAL_HINTS: dict[str, str] = {
    ErrorKind.INCOMPATIBLE: "use the same pangea.pyz on both machines",
    ErrorKind.DUPLICATE_IDENTITY: "delete identity.key in the copied pangea home, then restart that node",
    ErrorKind.IDENTITY_IN_USE: "one pangea home runs two processes there; give the second its own PANGEA_HOME",
}


@dataclass(frozen=True)
class LocalPeer:
    """What the Hello check knows of this node."""

    peer_id: str
    role: str
    instance_id: int  # tells two processes with one identity apart
    host_id: bytes  # names this machine (host_fingerprint)


def check_hello(
    local: LocalPeer, peer_id: str, hello: HelloMsg, current: HelloMsg | None, where: Callable[[], str]
) -> Refusal | None:
    """Why a session with ``peer_id``, whose Hello is ``hello``, cannot go on, or None.

    ``current`` is the Hello of the open session with that peer id, if any;
    ``where()`` names where that peer connects from (asked only for the text).
    The same verdict on both sides: the acceptor answers with it, the dialer too."""
    problem = hello_mismatch(
        PROTOCOL_VERSION,
        hello.protocol_version,
        hello.pangea_version,
        local_role=f"{local.role} {local.peer_id}",
        remote_role=f"{hello.role or 'peer'} {peer_id}",
    )
    if problem is not None:
        return Refusal(ErrorKind.INCOMPATIBLE, problem, REFUSAL_HINTS[ErrorKind.INCOMPATIBLE])
    return duplicate_identity(local, peer_id, hello, current, where)


def duplicate_identity(
    local: LocalPeer, peer_id: str, hello: HelloMsg, current: HelloMsg | None, where: Callable[[], str]
) -> Refusal | None:
    """A Refusal when another process already speaks as ``peer_id``, else None.

    The same machine (host_id) means one home run twice (identity-in-use);
    another machine, or one that does not say, means a copied home."""
    copied = "a pangea home was copied; delete identity.key in the copy to give that box its own peer id"
    if peer_id == local.peer_id and hello.instance_id != local.instance_id:
        if hello.host_id and hello.host_id == local.host_id:
            return Refusal(
                ErrorKind.IDENTITY_IN_USE,
                f"the peer ({hello.role or 'peer'}) is another pangea process of this node's home on this "
                f"machine (peer id {peer_id}); one home's processes cannot work with each other: "
                "start one of them with its own home (PANGEA_HOME=DIR)",
            )
        return Refusal(ErrorKind.DUPLICATE_IDENTITY, f"the peer uses this node's own peer id {peer_id}: {copied}")
    if current is not None and current.instance_id != hello.instance_id:
        if hello.host_id and hello.host_id == current.host_id:
            return Refusal(
                ErrorKind.IDENTITY_IN_USE,
                f"peer id {peer_id} already has a session here from another pangea process on its machine "
                f"({current.role or 'peer'}): that home runs two processes; stop one, or start the "
                "second with its own home (PANGEA_HOME=DIR)",
            )
        return Refusal(
            ErrorKind.DUPLICATE_IDENTITY,
            f"peer id {peer_id} is already connected from another process ({where()}): {copied}",
        )
    return None


@dataclass
class Pairing:
    """One pairing code offered by this node: ``max_uses`` peers (one by default), with a deadline.

    `check` decides each Hello that proves a code; its refusals say what happened (wrong, with
    the tries left; burned; expired; used) and the next step, for the dialer's user. ``issuer``
    is the command whose run prints a new code (initiate, serve --pair, bench --listen)."""

    code: str
    expires_at: float  # on the clock passed to check()
    used_by: str | None = None  # the first peer that paired
    failures: int = 0
    max_uses: int = 1  # `initiate --expect N` pairs N responders with one code
    others: list[str] = field(default_factory=list)  # the peers after the first
    issuer: str = "initiate"
    tried_by: list[str] = field(default_factory=list)  # who sent the wrong codes: "peer id (address)", once each

    @property
    def burned(self) -> bool:
        """Whether wrong tries used up the code: nobody can pair with it any more."""
        return self.failures >= MAX_PAIRING_FAILURES

    def expired(self, now: float) -> bool:
        """Whether the deadline has passed."""
        return now > self.expires_at

    def _renew(self) -> str:
        return f"run `{self.issuer}` there again for a new code and copy the join string it prints"

    def check(self, proof: bytes, acceptor_id: str, dialer_id: str, now: float, source: str = "") -> Refusal | None:
        """Return None and mark the code used when ``proof`` is right; else the Refusal (reason and hint).
        ``source``: where the dialer connects from, remembered with a wrong try."""
        import hmac

        if dialer_id == self.used_by or dialer_id in self.others:
            return None  # the same peer reconnecting
        if self.used_by is not None and 1 + len(self.others) >= self.max_uses:
            return self._refuse("the pairing code was already used by another peer", self._renew())
        if self.burned:
            return self._refuse(f"the pairing code was burned after {MAX_PAIRING_FAILURES} wrong tries", self._renew())
        if self.expired(now):
            ago = format_seconds(now - self.expires_at)
            return self._refuse(f"the pairing code expired {ago} ago, unused", self._renew())
        if not proof:
            return Refusal(
                ErrorKind.REFUSED,
                "this node needs its pairing code: run respond with the join string it printed "
                "(pangea://...#CODE), or add --code CODE",
            )
        if not hmac.compare_digest(proof, pairing_proof(self.code, acceptor_id, dialer_id)):
            self.failures += 1
            who = f"{dialer_id} ({source})" if source else dialer_id
            if who not in self.tried_by:
                self.tried_by.append(who)
            left = MAX_PAIRING_FAILURES - self.failures
            if not left:
                return self._refuse(
                    f"wrong pairing code: that was the last of {MAX_PAIRING_FAILURES} tries, the code is burned now",
                    self._renew(),
                )
            return self._refuse(
                f"wrong pairing code ({left} {'try' if left == 1 else 'tries'} left before the code is burned)",
                f"copy the join string `{self.issuer}` printed (pangea://...#CODE) whole; "
                "each run prints a new code, so take the one of the run that is waiting",
            )
        if self.used_by is None:
            self.used_by = dialer_id
        else:
            self.others.append(dialer_id)
        return None

    @staticmethod
    def _refuse(reason: str, hint: str) -> Refusal:
        return Refusal(ErrorKind.REFUSED, reason, hint)

    def burned_text(self) -> str:
        """The acceptor's own line when wrong tries burned the code: how many, from whom."""
        return f"pairing code burned after {self.failures} wrong tries from {', '.join(self.tried_by) or '?'}"


def peer_refusal(peer_id: str, msg: ErrorMsg) -> Refusal:
    """The dialer's verdict when the acceptor answered its Hello with ``msg`` (its hint, after
    REFUSAL_HINT_MARK, becomes the verdict's)."""
    message, _, hint = msg.message.partition(REFUSAL_HINT_MARK)
    return Refusal(
        msg.kind if msg.kind in REFUSAL_HINTS else ErrorKind.REFUSED,
        f"cannot work with {peer_id}: it refused the session: {message}",
        hint or REFUSAL_HINTS.get(msg.kind),
    )


def vouch_candidate(local_peer_id: str, peer_id: str, hello: HelloMsg, trusted: Callable[[str], bool]) -> str | None:
    """The home a dialer on a throwaway identity says it runs from, when that home is this
    node's own or one it trusts (then its signature over `home_proof_message` is worth checking)."""
    if not hello.home_id or not hello.home_proof or hello.home_id == peer_id:
        return None
    if hello.home_id != local_peer_id and not trusted(hello.home_id):
        return None
    return hello.home_id


class PendingStreams:
    """The streams that wait for their Hello, counted per peer, per source address and
    node-wide; `admit` decides whether one more may wait (see `Limits`).

    A stranger is a peer not trusted by its id (a pairing responder is one until its
    Hello proves the code). Strangers share a node-wide number of slots and, from one
    source address, only a few of them may wait at once; trusted peers are held to
    the per-peer cap and the node-wide total only."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.per_peer: dict[str, int] = {}
        self.strangers: dict[str, str] = {}  # a stranger with streams waiting -> its source address
        self.total = 0
        self.refused = 0  # streams turned away, for status and metrics

    def stranger_streams(self) -> int:
        """Streams of strangers that wait now."""
        return sum(self.per_peer.get(peer_id, 0) for peer_id in self.strangers)

    def admit(self, peer_id: str, address: str, trusted: bool) -> str | None:
        """Count one more waiting stream of ``peer_id`` and return None, or return why not."""
        limits = self.limits
        pending = self.per_peer.get(peer_id, 0)
        reason = None
        if pending >= limits.max_pending_streams:
            reason = f"{pending} streams already wait for their Hello"
        elif self.total >= limits.max_pending_streams_total:
            reason = f"{self.total} streams of all peers already wait for their Hello"
        elif not trusted and self.stranger_streams() >= limits.max_pending_stranger_streams:
            reason = f"{self.stranger_streams()} streams of untrusted peers already wait for their Hello"
        elif not trusted and peer_id not in self.strangers:
            others = sum(1 for where in self.strangers.values() if where == address)
            if others >= limits.max_strangers_per_address:
                reason = f"{others} untrusted peers from {address} already wait for their Hello"
        if reason is not None:
            self.refused += 1
            return reason
        self.per_peer[peer_id] = pending + 1
        self.total += 1
        if not trusted:
            self.strangers[peer_id] = address
        return None

    def release(self, peer_id: str) -> None:
        """One stream of ``peer_id`` said Hello or ended."""
        left = self.per_peer.get(peer_id, 0) - 1
        if left < 0:
            return
        self.total -= 1
        if left:
            self.per_peer[peer_id] = left
        else:
            del self.per_peer[peer_id]
            self.strangers.pop(peer_id, None)


class StrangerConnections:
    """The libp2p connections of strangers (untrusted peers without a session), counted per
    source address and node-wide; `opened` decides whether one more may stay open.

    A connection costs a socket and Noise/Yamux state before it carries a single stream,
    and fresh identities cost nothing: without a cap, idle connections would take the
    inbound slots py-libp2p has (250) and lock trusted peers out. So at most
    ``per_address`` stay open from one address and ``total`` in all, and one that has
    no session ``idle_s`` after it opened is closed (`idle` lists them)."""

    def __init__(self, total: int, per_address: int, idle_s: float) -> None:
        self.total, self.per_address, self.idle_s = total, per_address, idle_s
        self.open: dict[Any, tuple[str, str, float]] = {}  # connection -> (peer id, address, opened at)
        self.refused = 0  # connections closed at once, for status and metrics
        self.expired = 0  # connections closed for staying idle

    def opened(self, key: Any, peer_id: str, address: str, now: float) -> str | None:
        """Count a stranger's new connection and return None, or return why it must close."""
        same = sum(1 for _, where, _ in self.open.values() if where == address)
        reason = None
        if len(self.open) >= self.total:
            reason = f"{len(self.open)} connections of untrusted peers are open"
        elif same >= self.per_address:
            reason = f"{same} connections of untrusted peers from {address} are open"
        if reason is not None:
            self.refused += 1
            return reason
        self.open[key] = (peer_id, address, now)
        return None

    def closed(self, key: Any) -> None:
        """A connection closed, or its peer got a session (no longer a stranger's)."""
        self.open.pop(key, None)

    def idle(self, now: float) -> list[tuple[Any, str]]:
        """(connection, peer id) of every counted connection open for ``idle_s`` or longer."""
        return [(key, peer_id) for key, (peer_id, _, since) in self.open.items() if now - since >= self.idle_s]


def retry_data_connect(kind: str, attempt: int, elapsed_s: float) -> bool:
    """Whether the dialer tries its data connection again after attempt ``attempt`` (0 the
    first) failed with ``kind``, ``elapsed_s`` after the first began. Only a connection
    closed or reset on the way (``unreachable``: the acceptor was busy with strangers'
    handshakes) is worth another try; a timeout (a firewall), a refusal or a wrong
    certificate is not. The acceptor must still be waiting when the try would end."""
    if kind != ErrorKind.UNREACHABLE or attempt >= DATA_RETRIES:
        return False
    return elapsed_s + DATA_RETRY_PAUSE_S + DATA_CONNECT_S <= DATA_SETTLE_S


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Transmit:
    """Send ``msg`` on the channel ``key`` (None, or a channel that is gone: the session's current one)."""

    msg: Message
    key: ChannelKey = None


@dataclass(frozen=True)
class RunTask:
    """Run the peer's task ``request`` (it came on ``key``; its answer goes back there)."""

    request: TaskRequestMsg
    key: ChannelKey


@dataclass(frozen=True)
class StopTask:
    """Stop serving task ``task_id``: its sender gave it up (``by_sender``) or its channel is gone."""

    task_id: int
    by_sender: bool


@dataclass(frozen=True)
class Resolve:
    """Wake ``waiter`` (the adapter's): a request is answered or failed (see its PendingRequest), a pong came."""

    waiter: Any


@dataclass(frozen=True)
class ReleaseHeld:
    """Let go of the arrays held for the peer under ``ids`` (it sent a Release)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class NoteLoad:
    """The peer reported ``load`` (tasks it runs for all its peers)."""

    load: int


@dataclass(frozen=True)
class EndSession:
    """The session is over for ``reason`` (reset: without a Bye, the peer is gone)."""

    reason: str
    reset: bool | None = None


@dataclass(frozen=True)
class PeerFellBack:
    """The peer could not use our data plane: messages stay on the libp2p stream."""

    reason: str


@dataclass(frozen=True)
class Log:
    """Say what happened (at logging level ``level``)."""

    level: int
    text: str


SessionAction = Union[  # noqa: UP007
    Transmit, RunTask, StopTask, Resolve, NoteLoad, EndSession, PeerFellBack, Log, ReleaseHeld
]


class HeldArrays:
    """The arrays a worker holds for one peer session (TaskRequest.keep), by the peer's ids, charged
    to the node's memory budget until released (a Release, or the session's end). Pure."""

    def __init__(self, budget: MemoryBudget, limit: int = MAX_HELD_PER_SESSION) -> None:
        self.budget = budget
        self.limit = limit
        self.arrays: dict[int, np.ndarray] = {}

    def operands(self, req: TaskRequestMsg) -> tuple[np.ndarray, ...]:
        """A task's operands, those it names as held replaced by the arrays held for the peer;
        TaskError(bad-input) for an id this session does not hold."""
        if not req.held:
            return req.operands
        out = []
        for i, (a, key) in enumerate(zip(req.operands, req.held, strict=True)):
            held = self.arrays.get(key) if key else a
            if held is None:
                raise TaskError(
                    f"operand {i} names array {key}, which this worker does not hold for you (released, or held "
                    "in an earlier session): send it again",
                    kind=ErrorKind.BAD_INPUT,
                )
            if held.dtype != a.dtype or held.shape != a.shape:
                raise TaskError(
                    f"operand {i} declares a {a.dtype} of shape {a.shape}, but array {key} is a {held.dtype} of "
                    f"shape {held.shape}",
                    kind=ErrorKind.BAD_INPUT,
                )
            out.append(held)
        return tuple(out)

    def keep(self, key: int, array: np.ndarray) -> None:
        """Hold ``array`` under ``key``; TaskError when the id is taken or the count or budget says no."""
        if key in self.arrays:
            raise TaskError(f"array {key} is held already: release it first", kind=ErrorKind.BAD_INPUT)
        if len(self.arrays) >= self.limit:
            raise TaskError(
                f"this worker holds {self.limit} arrays for you (its limit per session): release some",
                kind=ErrorKind.BUSY,
            )
        nbytes = int(array.nbytes)
        held = f"cannot hold an array of {format_bytes(nbytes)}"
        refusal = budget_refusal(self.budget, "", nbytes, nbytes, held=held)
        if refusal is not None or not self.budget.try_acquire(nbytes):
            raise refusal or TaskError(f"{held}: the memory budget is full", kind=ErrorKind.BUSY)
        if not array.flags.owndata:  # NOTE: a view of a pooled payload buffer would be overwritten
            array = array.copy()
        array.flags.writeable = False
        self.arrays[key] = array

    def keep_all(self, first: int, arrays: Sequence[np.ndarray]) -> None:
        """Hold each of ``arrays`` under ``first`` + its index, all or none (TaskError as `keep`)."""
        done: list[int] = []
        try:
            for i, array in enumerate(arrays):
                self.keep(first + i, array)
                done.append(first + i)
        except TaskError:
            self.release(done)
            raise

    def release(self, ids: Sequence[int]) -> None:
        """Let go of arrays (unknown ids: nothing)."""
        for key in ids:
            array = self.arrays.pop(key, None)
            if array is not None:
                self.budget.release(int(array.nbytes))

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


@dataclass(eq=False)
class PendingRequest:
    """One of our requests, waiting for the peer's result."""

    task_id: int
    key: ChannelKey  # where it went (a lost data connection fails it)
    waiter: Any = None  # the adapter's wake-up (a trio.Event); the core never touches it
    result: TaskResultMsg | None = None
    error: PangeaError | None = None


@dataclass(eq=False)
class ServedTask:
    """A task of the peer's that we hold: from its request's arrival until it is answered."""

    key: ChannelKey  # the channel its request came on
    stopped: bool = False  # cancelled: by its sender, or its channel is gone
    out_bytes: int = 0  # its output's bytes, reserved in the node's budget


@dataclass(frozen=True)
class ChannelGate:
    """The `FrameGate` of one channel of a session: the Decoder's questions, answered by its core."""

    core: SessionProtocol
    key: ChannelKey

    def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
        """See `SessionProtocol.admit_request`."""
        return self.core.admit_request(task_id, payload_len, self.key)

    def awaits_result(self, task_id: int) -> bool:
        """See `SessionProtocol.awaits_result`."""
        return self.core.awaits_result(task_id)


class SessionProtocol:
    """The protocol state of one session with a peer: events in, actions out (pure).

    ``may_serve()`` says whether this node runs tasks for the peer now; ``budget``
    is the node's memory budget, shared by all its sessions; ``rng`` makes ping
    nonces. Every method that takes ``now`` uses it for nothing but arithmetic."""

    def __init__(
        self,
        local_peer_id: str,
        peer_id: str,
        *,
        limits: Limits,
        budget: MemoryBudget,
        may_serve: Callable[[], bool],
        rng: random.Random | None = None,
    ) -> None:
        self.local_peer_id = local_peer_id
        self.peer_id = peer_id
        self.label = short_id(peer_id)
        self.limits = limits
        self.budget = budget
        self.may_serve = may_serve
        self._rng = rng if rng is not None else random.Random()
        self.closed = False
        self.close_reason = ""
        self.bye_reason: str | None = None  # the peer's Bye, when it said one
        self.rtt_s: float | None = None
        self.peer_load = 0  # what the peer last reported running for all its peers
        self.tasks_served = 0
        self.tasks_refused = 0
        self.tasks_cancelled = 0  # tasks of the peer's it gave up while we held them, and we dropped
        self._next_task_id = 1
        self._pending: dict[int, PendingRequest] = {}
        self._pings: dict[int, tuple[float, Any]] = {}  # nonce -> (sent at, waiter)
        # NOTE: mutated in place, never rebound: the adapter and tests may hold it.
        self._reserved: dict[int, int] = {}  # task id -> operand bytes admitted, held until answered
        self._receiving: dict[ChannelKey, int] = {}  # channel -> the admitted task whose frame is arriving
        self._served: dict[int, ServedTask] = {}

    # -- admission (the Decoder asks, from a frame's header)

    def gate(self, key: ChannelKey) -> ChannelGate:
        """The Decoder's gate for the channel ``key``."""
        return ChannelGate(self, key)

    @property
    def held_tasks(self) -> int:
        """Tasks of the peer's we hold (admitted and not yet answered)."""
        return len(self._reserved)

    def admit_request(self, task_id: int, payload_len: int, key: ChannelKey) -> Refusal | None:
        """Decide from a TaskRequest's header whether its operands may be buffered; on yes,
        reserve their bytes (held until the task is answered)."""
        limits, budget = self.limits, self.budget
        verdict: Refusal | None = None
        if not self.may_serve():
            verdict = Refusal(ErrorKind.REFUSED, f"node {self.local_peer_id} does not run tasks for {self.peer_id}")
        elif task_id in self._reserved:
            verdict = Refusal(ErrorKind.BAD_INPUT, f"task id {task_id} is already in flight")
        elif len(self._reserved) >= limits.max_inflight_tasks:
            verdict = Refusal(
                ErrorKind.BUSY,
                f"{len(self._reserved)} tasks of yours are in flight (limit {limits.max_inflight_tasks})",
            )
        elif sum(self._reserved.values()) + payload_len > limits.max_inflight_bytes:
            held = format_bytes(sum(self._reserved.values()))
            verdict = Refusal(
                ErrorKind.BUSY,
                f"your tasks in flight hold {held}; {format_bytes(payload_len)} more exceeds "
                f"the limit of {format_bytes(limits.max_inflight_bytes)}",
            )
        elif not budget.try_acquire(payload_len):
            verdict = Refusal(
                ErrorKind.BUSY,
                f"the node's memory budget of {format_bytes(budget.limit_bytes)} is in use "
                f"({format_bytes(budget.in_use)}); retry later",
            )
        if verdict is None:
            self._reserved[task_id] = payload_len
            self._receiving[key] = task_id
        else:
            self.tasks_refused += 1
            # NOTE: logged here, when it is decided: the refusal reaches the adapter only once the
            # skipped payload has gone by (as a MessageError), which for a large frame is much later.
            log.warning("refusing task %d from %s (%s): %s", task_id, self.peer_id, verdict.kind, verdict.message)
        return verdict

    def awaits_result(self, task_id: int) -> bool:
        """Whether we wait for the result of our task ``task_id``."""
        return task_id in self._pending

    def release(self, task_id: int) -> None:
        """Give back the operand bytes reserved for ``task_id`` (once; again is harmless)."""
        held = self._reserved.pop(task_id, None)
        if held is not None:
            self.budget.release(held)

    # -- what arrives

    def receive(self, msg: Message, key: ChannelKey, now: float, load: int) -> list[SessionAction]:
        """A message decoded from channel ``key``; ``load`` is this node's, for a Pong.
        RemoteProtocolError for a message that has no place in an open session."""
        if isinstance(msg, TaskRequestMsg):
            self._receiving.pop(key, None)  # handed to the task, which releases its reservation
            self._served[msg.task_id] = ServedTask(key)
            return [RunTask(msg, key)]
        if isinstance(msg, TaskResultMsg):
            pending = self._pending.pop(msg.task_id, None)
            if pending is None:
                return [Log(logging.INFO, f"dropping late result of task {msg.task_id} from {self.label}")]
            pending.result = msg
            return [Resolve(pending.waiter)]
        if isinstance(msg, PingMsg):
            self.peer_load = msg.load
            return [NoteLoad(msg.load), Transmit(PongMsg(msg.nonce, load), key)]
        if isinstance(msg, PongMsg):
            self.peer_load = msg.load
            actions: list[SessionAction] = [NoteLoad(msg.load)]
            sent = self._pings.pop(msg.nonce, None)
            if sent is not None:
                self.rtt_s = now - sent[0]
                actions.append(Resolve(sent[1]))
            return actions
        if isinstance(msg, CancelMsg):
            task = self._served.get(msg.task_id)
            if task is None or task.stopped:
                return []
            task.stopped = True
            self.tasks_cancelled += 1
            return [StopTask(msg.task_id, by_sender=True)]
        if isinstance(msg, ReleaseMsg):
            return [ReleaseHeld(msg.ids)]
        if isinstance(msg, DataPlaneMsg):
            return [] if msg.ok else [PeerFellBack(f"the peer could not use our data plane: {msg.reason}")]
        if isinstance(msg, ByeMsg):
            self.bye_reason = msg.reason
            return [EndSession(f"peer said bye ({msg.reason})")]
        if isinstance(msg, ErrorMsg):
            reason = f"peer closed the session: {msg.kind}: {msg.message}"
            return [Log(logging.WARNING, f"{self.label}: {reason}"), EndSession(reason)]
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} in an open session")

    def bad_message(self, exc: MessageError, key: ChannelKey) -> list[SessionAction]:
        """A frame from channel ``key`` with bad contents, or one refused from its header."""
        if exc.kind == ErrorKind.UNSOLICITED:
            return [Log(logging.INFO, f"dropping {exc} from {self.label}")]
        actions: list[SessionAction] = []
        if exc.task_id is not None:
            if exc.admitted and exc.task_id == self._receiving.get(key):
                self.release(exc.task_id)  # admitted, then its contents were bad
            self._receiving.pop(key, None)
            actions.append(Transmit(TaskResultMsg(exc.task_id, error_kind=exc.kind, error_message=str(exc)), key))
        if exc.kind == ErrorKind.BAD_INPUT:
            actions.append(Log(logging.WARNING, f"bad message from {self.peer_id}: {exc}"))
        return actions

    def channel_lost(self, key: ChannelKey, reason: str) -> list[SessionAction]:
        """Channel ``key`` is gone: the reservation of a frame cut off on it is given back; while the
        session is open, our requests on it fail and the tasks that came on it stop."""
        cut = self._receiving.pop(key, None)
        if cut is not None:
            self.release(cut)
        if self.closed:
            return []
        actions: list[SessionAction] = []
        for task_id, pending in list(self._pending.items()):
            if pending.key is key:
                del self._pending[task_id]
                pending.error = PeerError(
                    f"the data connection to {self.label} broke: {reason}", kind=ErrorKind.DISCONNECTED
                )
                actions.append(Resolve(pending.waiter))
        for task_id, task in self._served.items():
            if task.key is key and not task.stopped:
                task.stopped = True  # its sender has failed it and will retry
                actions.append(StopTask(task_id, by_sender=False))
        return actions

    def close(self, reason: str) -> list[SessionAction]:
        """The session ends: every frame cut off gives back its bytes, every request fails,
        every ping waiter wakes. Tasks being served finish on their own (`task_done`)."""
        if self.closed:
            return []
        self.closed = True
        self.close_reason = reason
        for key in list(self._receiving):
            self.release(self._receiving.pop(key))
        actions: list[SessionAction] = []
        for pending in self._pending.values():
            pending.error = PeerError(f"peer {self.label} went away: {reason}", kind=ErrorKind.DISCONNECTED)
            actions.append(Resolve(pending.waiter))
        self._pending.clear()
        actions += [Resolve(waiter) for _, waiter in self._pings.values()]
        return actions

    # -- the clock

    def tick(self, now: float, last_byte_at: float, load: int) -> list[SessionAction]:
        """A heartbeat: end the session when nothing arrived for idle_timeout_s, else ping."""
        reason = idle_reason(now, last_byte_at, self.limits.idle_timeout_s)
        if reason is not None:
            return [EndSession(reason, reset=True)]
        return [Transmit(PingMsg(self.ping_sent(now), load))]

    def ping_sent(self, now: float, waiter: Any = None) -> int:
        """Record a ping sent at ``now``; return its nonce (its pong sets ``rtt_s`` and wakes ``waiter``)."""
        nonce = self._rng.getrandbits(63)
        self._pings[nonce] = (now, waiter)
        return nonce

    def forget_ping(self, nonce: int) -> None:
        """Stop waiting for the pong of ``nonce``."""
        self._pings.pop(nonce, None)

    # -- our requests

    def start_request(self, key: ChannelKey, waiter: Any) -> PendingRequest:
        """A request of ours goes out on channel ``key``; PeerError when the session is over."""
        if self.closed:
            raise PeerError(f"peer {self.label} is not connected ({self.close_reason})", kind=ErrorKind.UNAVAILABLE)
        pending = PendingRequest(self._next_task_id, key, waiter)
        self._next_task_id += 1
        self._pending[pending.task_id] = pending
        return pending

    def finish_request(self, pending: PendingRequest) -> list[SessionAction]:
        """We stop waiting for ``pending``: answered, failed, or given up (then the peer is told)."""
        if self._pending.pop(pending.task_id, None) is not None and not self.closed:
            return [Transmit(CancelMsg(pending.task_id))]  # we gave up on it: the worker can stop
        return []

    # -- the peer's tasks

    def served_on(self, task_id: int) -> ChannelKey:
        """The channel task ``task_id``'s request came on (None when unknown)."""
        task = self._served.get(task_id)
        return None if task is None else task.key

    def reserve_output(self, task_id: int, out_bytes: int) -> Refusal | None:
        """Before a task runs: reserve its output's bytes, or refuse it (then its operands are released)."""
        if not self.budget.try_acquire(out_bytes):
            self.release(task_id)
            budget = self.budget
            return Refusal(
                ErrorKind.BUSY,
                f"the result would not fit the node's memory budget of {format_bytes(budget.limit_bytes)} "
                f"({format_bytes(budget.in_use)} in use); retry later",
            )
        self._served.setdefault(task_id, ServedTask(None)).out_bytes = out_bytes
        return None

    def task_ran(self, task_id: int, *, ok: bool) -> None:
        """The kernel of task ``task_id`` returned (``ok``: with outputs)."""
        if ok:
            self.tasks_served += 1

    def answer_to(self, task_id: int, *, stopped: bool) -> bool:
        """The task's result is ready: its operands are released now (the peer may send its next task
        the moment the result arrives); whether the result goes out (nobody wants it once the session
        is over or the task ``stopped``)."""
        self.release(task_id)
        return not self.closed and not stopped

    def task_done(self, task_id: int) -> None:
        """Task ``task_id`` is over: everything it held is given back (once)."""
        task = self._served.pop(task_id, None)
        self.release(task_id)
        if task is not None:
            self.budget.release(task.out_bytes)


###############################################################################
# 6. Kernels
#
# The fixed registry of numpy operations a peer may ask for. A kernel checks
# its inputs and raises KernelError naming the problem; nothing else a peer
# sends is ever interpreted. Kernels run in a worker thread (numpy releases
# the GIL), never on the trio thread. Each KERNELS entry owns all a kernel
# is: its run, output bound, cost, verification, the initiator's check inputs
# and numpy reference; output_nbytes, task_cost, check_result, check_inputs
# and reference_result only look the entry up.
###############################################################################


Operands = Sequence["np.ndarray"]
CheckInputs = tuple[tuple["np.ndarray", ...], Params]


@dataclass(frozen=True)
class Kernel:
    """One registry entry: everything the node and the initiator's checks know of a kernel.

    ``fn(operands, params) -> outputs`` validates and runs it (``outputs`` arrays:
    svd, qr, eigh give several); ``out_nbytes`` bounds its outputs' bytes, all
    together, before it runs; ``flops`` is its cost for placement;
    ``check(name, operands, params, outputs, seed, rounds)`` verifies a worker's
    outputs (None when numpy could have given them), cheaper than the kernel, or
    is None: the kernel is unverified; ``verification`` names the check
    ("freivalds", "residual", "projection", "recompute", "unverified");
    ``sample(a, b, v)`` turns the initiator's random n x n matrices and n-vector
    into this kernel's check inputs; ``reference(operands, params)`` is plain
    numpy's answer (a tuple for several outputs); ``exact`` is False where the
    result rounds in an order numpy leaves open (a product or a sum over many
    terms), so two honest machines may differ; ``unique`` is False where two
    honest answers may differ by more than rounding (eigenvectors' signs), so
    recomputing one cannot judge the other. ``variadic``: it takes ``arity`` up
    to MAX_OPERANDS operands (concatenate, einsum)."""

    name: str
    arity: int
    fn: Callable[[Operands, Params], tuple[np.ndarray, ...]]
    doc: str
    params: tuple[str, ...] = ()
    _: dataclasses.KW_ONLY
    out_nbytes: Callable[[Operands, Params], int]
    flops: Callable[[Operands, Params], float]
    check: Callable[[str, Operands, Params, tuple[np.ndarray, ...], int, int], str | None] | None
    sample: Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]
    reference: Callable[[Operands, Params], Any]
    verification: str = "recompute"
    exact: bool = True
    outputs: int = 1
    variadic: bool = False
    unique: bool = True

    def __post_init__(self) -> None:
        if (self.check is None) != (self.verification == UNVERIFIED):
            raise ValueError(f"kernel {self.name}: a check, or verification {UNVERIFIED!r}, not both")


UNVERIFIED = "unverified"  # a kernel without a check, or a task the user asked not to check
LOCAL_VERIFICATION = "local"  # a task that ran on this node: its result needs no check
RECOMPUTE = "recompute"  # the node recomputes the result and compares (TaskSpec.check "recompute")
CHECKS = ("", RECOMPUTE, "none")  # TaskSpec.check: the kernel's own check, recompute, accept as sent


def check_choice(check: str) -> str:
    """A task's ``check`` as given (TaskSpec.check, `Client.submit(check=)`); KernelError when unknown."""
    if check not in CHECKS:
        raise KernelError(f"check {check[:40]!r} is not one of: '' (the kernel's own), 'recompute', 'none'")
    return check


def _param(name: str, params: Params, key: str, kind: type, what: str) -> Any:
    value = params[key]
    ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
    if not ok or (kind is tuple and not all(isinstance(v, int) for v in value)):  # type: ignore[union-attr]
        raise KernelError(f"{name}: {key} must be {what}, got {str(value)[:40]!r}")
    return value


def number_param(name: str, params: Params, key: str, default: float) -> float:
    """Kernel ``name``'s finite number ``key`` (``default`` when absent); KernelError otherwise."""
    if key not in params:
        return default
    value = float(_param(name, params, key, float, "a number"))
    if not math.isfinite(value):
        raise KernelError(f"{name}: {key} {value!r} is not a finite number")
    return value


def int_param(name: str, params: Params, key: str, default: int | None) -> int | None:
    """Kernel ``name``'s whole number ``key`` (an axis, a count; ``default`` when absent)."""
    if key not in params:
        return default
    value = _param(name, params, key, float, "a whole number")
    if not math.isfinite(value) or value != int(value) or abs(value) >= 1 << 62:
        raise KernelError(f"{name}: {key} must be a whole number, got {value!r}")
    return int(value)


def text_param(name: str, params: Params, key: str, default: str, choices: Sequence[str] | None = None) -> str:
    """Kernel ``name``'s text ``key`` (``default`` when absent), one of ``choices`` when given."""
    if key not in params:
        return default
    value = _param(name, params, key, str, "a text")
    if choices is not None and value not in choices:
        raise KernelError(f"{name}: {key} must be one of {', '.join(map(repr, choices))}, got {value[:40]!r}")
    return str(value)


def ints_param(name: str, params: Params, key: str, default: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Kernel ``name``'s tuple of integers ``key`` (a shape, axes; ``default`` when absent). A single
    whole number is taken as a tuple of one."""
    if key not in params:
        return default
    if isinstance(params[key], int | float):
        one = int_param(name, params, key, None)
        return None if one is None else (one,)
    return tuple(_param(name, params, key, tuple, "a tuple of integers"))


def axis_param(name: str, params: Params, ndim: int, key: str = "axis") -> tuple[int, ...] | None:
    """Kernel ``name``'s axis: None (absent: all axes), or an int or tuple of ints, each in
    -ndim..ndim-1 (numpy's AxisError wording), normalized to 0..ndim-1 and not repeated."""
    axes = ints_param(name, params, key, None)
    if axes is None:
        return None
    out = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise KernelError(f"{name}: axis {axis} is out of bounds for array of dimension {ndim}")
        out.append(axis % ndim)
    if len(set(out)) != len(out):
        raise KernelError(f"{name}: repeated axis in {key} {axes}")
    return tuple(out)


# The registry, by name: filled at the end of room 8 from every kernel room's tuple
# (BASIC_KERNELS here, LINALG_KERNELS, ARRAY_KERNELS); only looked up in between.
KERNELS: dict[str, Kernel] = {}


def kernel_table_markdown() -> str:
    """The README's kernel table, from the registry (tests/unit/test_kernels_table.py keeps them equal):
    per kernel its operands, parameters, outputs, how a remote result is checked, and what it is."""
    rows = ["| kernel | operands | params | outputs | check of a remote result | what |", "|---|---|---|---|---|---|"]
    for name in sorted(KERNELS):
        k = KERNELS[name]
        operands = f"{k.arity} or more" if k.variadic else str(k.arity)
        params = ", ".join(f"`{p}`" for p in k.params) or "-"
        doc = k.doc.replace("|", "\\|")
        rows.append(f"| `{name}` | {operands} | {params} | {k.outputs} | {k.verification} | {doc} |")
    return "\n".join(rows) + "\n"


MAX_RANDOM_ELEMENTS = 1 << 28  # 2 GiB of float64; a larger request is a mistake or an attack


def _k_random(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    dims = []
    for key in ("rows", "cols"):
        v = float(_param("random", params, key, float, "a number")) if key in params else 0.0
        if not math.isfinite(v) or v != int(v) or not 0 <= v <= 1 << 24:
            raise KernelError(f"random: {key} must be a whole number in 0..{1 << 24}, got {v!r}")
        dims.append(int(v))
    if dims[0] * dims[1] > MAX_RANDOM_ELEMENTS:
        raise KernelError(f"random: {dims[0]}x{dims[1]} exceeds {MAX_RANDOM_ELEMENTS} elements")
    seed = float(_param("random", params, "seed", float, "a number")) if "seed" in params else 0.0
    if not math.isfinite(seed) or seed != int(seed) or seed < 0:
        raise KernelError(f"random: seed must be a whole number >= 0, got {seed!r}")
    return (np.random.default_rng(int(seed)).random((dims[0], dims[1])),)


def check_kernel_call(name: str, operands: Sequence[np.ndarray], params: Params) -> Kernel:
    """Return the registry entry for a call, or raise KernelError naming what is wrong with it."""
    import numpy as np

    kernel = KERNELS.get(name)
    if kernel is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(KERNELS), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise KernelError(
            f"unknown kernel {name[:80]!r}; {hint}this node runs {len(KERNELS)} kernels: {', '.join(sorted(KERNELS))}"
        )
    if kernel.variadic and not kernel.arity <= len(operands) <= MAX_OPERANDS:
        raise KernelError(f"{name}: takes {kernel.arity} to {MAX_OPERANDS} operands, got {len(operands)}")
    if not kernel.variadic and len(operands) != kernel.arity:
        raise KernelError(f"{name}: takes {kernel.arity} operand(s), got {len(operands)}")
    unknown = set(params) - set(kernel.params)
    if unknown:
        raise KernelError(f"{name}: unknown parameter(s) {sorted(unknown)}; known: {list(kernel.params)}")
    if len(params) > MAX_PARAMS:
        raise KernelError(f"{name}: {len(params)} parameters, at most {MAX_PARAMS}")
    for i, a in enumerate(operands):
        if not isinstance(a, np.ndarray) or a.dtype.name not in ALLOWED_DTYPES:
            raise KernelError(f"{name}: operand {i} must be an array of {', '.join(ALLOWED_DTYPES)}")
    return kernel


def output_nbytes(name: str, operands: Sequence[np.ndarray], params: Params) -> int:
    """Return the bytes of a kernel call's output: numpy's result dtype times its shape, exact for
    every kernel of the registry (an upper bound for an unknown name).

    Lets a worker refuse, before computing, an output that would not fit its
    limits ((n x 1) @ (1 x n) turns two small vectors into n^2 elements), and
    sizes a Client's result segment: a bound above the result is memory taken for nothing."""
    kernel = KERNELS.get(name)
    if kernel is None:
        return _bytes_of_operands(operands, params)
    try:
        return kernel.out_nbytes(operands, params)
    except (ValueError, IndexError, OverflowError, TypeError):
        return 0  # the kernel itself will reject these operands


def task_cost(
    name: str, operands: Sequence[np.ndarray], params: Params, *, out_nbytes: int | None = None
) -> tuple[float, int]:
    """Return (floating-point operations, bytes moved: operands plus result) of a kernel call,
    for placement: a worker's speed and bandwidth turn them into seconds (``out_nbytes``: its
    `output_nbytes`, when the caller has it already)."""
    kernel = KERNELS.get(name)
    flops = (kernel.flops if kernel is not None else _flops_of_elements)(operands, params)
    if out_nbytes is None:
        out_nbytes = output_nbytes(name, operands, params)
    nbytes = sum(a.nbytes for a in operands) + out_nbytes
    return flops, int(nbytes)


def runs_inline(flops: float) -> bool:
    """Whether work of ``flops`` operations runs on the event loop rather than a worker thread."""
    return flops <= INLINE_FLOPS


def run_kernel(
    name: str,
    operands: Sequence[np.ndarray],
    params: Params | None = None,
    *,
    max_elements: int | None = None,
    out_nbytes: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Run registry kernel ``name``; raise KernelError for any bad input or an oversized output
    (``out_nbytes``: its `output_nbytes`, when the caller has it already)."""
    import numpy as np

    params = dict(params or {})
    kernel = check_kernel_call(name, operands, params)
    if out_nbytes is None and max_elements is not None:
        out_nbytes = output_nbytes(name, operands, params)
    # NOTE: a bound in bytes: max_elements of the widest dtype (what the limit protects is memory)
    if max_elements is not None and out_nbytes is not None and out_nbytes > max_elements * _WIDEST_ITEMSIZE:
        raise KernelError(f"{name}: the result would have more than {max_elements} elements (the node's limit)")
    with np.errstate(all="ignore"):
        outputs = kernel.fn(operands, params)
    return tuple(np.asarray(o) if np.asarray(o).flags.c_contiguous else np.asarray(o).copy(order="C") for o in outputs)


FREIVALDS_ROUNDS = 2  # columns of r; one wrong entry is caught by each (see _check_matmul)

# How the checks judge a floating-point result. An honest worker runs the same
# numpy, but maybe another BLAS kernel, blocking or FMA use, so its sums are
# added in another order. Any order of a sum of k products is within
# gamma_k * sum|products| of the exact sum, gamma_k = k*u/(1-k*u), u = eps/2;
# complex arithmetic adds sqrt(2) and 2 to k (Higham, "Accuracy and Stability
# of Numerical Algorithms", 2nd ed., sections 3.1 and 3.6). Each bound below is
# that worst case times a slack of 2 or more, so an honest worker is never
# accused; a lie larger than it is caught (matmul entries that inf or NaN
# reach beyond the recompute budget: with the probability of the sample). NaN and inf follow IEEE (and
# numpy): where an operand's inf or NaN enters a sum the result is inf or NaN
# in every order; where the magnitude of finite terms reaches the overflow
# threshold, an order may overflow (to either sign, or NaN) or not. Integer
# results wrap modulo 2**bits exactly as numpy's do, and are compared exactly.
SUM_SLACK = 2.0  # two honest sums differ by at most 2*gamma_k*sum|terms| ~ k*eps*sum|terms|
FREIVALDS_SLACK = 3.0  # the Freivalds chain's worst case is ~2*n*eps*|A|(|B||r|), see _freivalds
SOLVE_SLACK = 4.0  # LU with partial pivoting: ||A x - b|| <= ~n*eps*(||A|| ||x|| + ||b||) at moderate pivot growth
# Entries the Freivalds check cannot judge (inf or NaN reached their row) are
# recomputed here, at most this many times the multiply-adds of the check
# itself, or this floor; beyond it a random sample of them.
RECOMPUTE_FACTOR = 16
RECOMPUTE_FLOOR = 1 << 22  # ~4 M multiply-adds, a few ms: small products are simply recomputed


def _eps_tiny(dtype: Any) -> tuple[float, float]:
    """(machine epsilon, smallest normal number) of an inexact dtype's real part."""
    import numpy as np

    info = np.finfo(dtype)
    return float(info.eps), float(info.tiny)


def _safe_ldexp(x: float, exp: int) -> float:
    """x * 2**exp as a Python float; inf when that overflows."""
    try:
        return math.ldexp(x, exp)
    except OverflowError:
        return math.inf


def _ldexp(a: np.ndarray, exp: int) -> np.ndarray:
    """a * 2**exp, exact but for underflow, for real and complex arrays; keeps NaN and inf."""
    import numpy as np

    if a.dtype.kind != "c":
        return np.ldexp(a, exp)
    out = np.empty_like(a)
    out.real, out.imag = np.ldexp(a.real, exp), np.ldexp(a.imag, exp)
    return out


# Operands whose largest magnitude is within 2**+-400 are not scaled: a sum of
# fewer than 2**200 products of two of them stays far below the overflow
# threshold (2**1024), and underflow is covered by the bounds' absolute term.
SCALE_FREE_EXP = 400
# The checks of O(n) results (element-wise, dot) read operands and result a slice of this many
# elements at a time: what they allocate is a few slices (8 MiB of float64 each), never arrays
# as large as the operands, which on a delegating node are already 1 GiB of its memory.
CHECK_SLICE_ELEMENTS = 1 << 20


def _scale_exponent(a: np.ndarray, dtype: Any = None) -> int:
    """The binary exponent ``_scaled`` divides ``a`` (as ``dtype``) by: that of its largest finite
    magnitude (0 when it is within 2**+-SCALE_FREE_EXP). Read a slice of CHECK_SLICE_ELEMENTS at a
    time: no copy of a."""
    import numpy as np

    dtype = np.dtype(a.dtype if dtype is None else dtype)
    top = 0.0
    flat = a.reshape(-1) if a.flags.c_contiguous else a.ravel()  # NOTE: a view for a C-ordered a
    step = max(1, CHECK_SLICE_ELEMENTS)
    for start in range(0, flat.size, step):
        part = flat[start : start + step].astype(dtype, copy=False)
        with np.errstate(all="ignore"):
            if dtype.kind == "c":
                # NOTE: the modulus of a finite complex entry near the float maximum overflows to inf,
                # its parts do not: the exponent comes from them (|z| <= 2 * max(|re|, |im|))
                size = np.maximum(np.abs(part.real), np.abs(part.imag))
            else:
                size = np.abs(part)
            size[~np.isfinite(part)] = 0
        top = max(top, float(size.max()) if size.size else 0.0)
    e = (math.frexp(top)[1] + (1 if dtype.kind == "c" else 0)) if top > 0 else 0
    return e if not -SCALE_FREE_EXP <= e <= SCALE_FREE_EXP else 0


def _scaled_by(a: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(a * 2**-e, |finite part of a| * 2**-e): `_scaled` with its exponent given (a itself for 0)."""
    import numpy as np

    finite = np.isfinite(a)
    if not e:
        return a, np.where(finite, np.abs(a), 0)  # no sum of two such operands' products can overflow: no copy
    scaled = np.array(_ldexp(a, -e))  # NOTE: an array even for 0-d a: written below
    # NOTE: an entry scaled down to 0 becomes the smallest subnormal of its sign instead: a
    # change the underflow allowance covers, and inf * it stays inf, not NaN as inf * 0.
    least = np.finfo(a.dtype).smallest_subnormal
    for part, original in ((scaled.real, a.real), (scaled.imag, a.imag)) if a.dtype.kind == "c" else ((scaled, a),):
        lost = (part == 0) & (original != 0)
        part[lost] = np.copysign(least, original[lost])
    if a.dtype.kind == "c":
        return scaled, np.where(finite, np.abs(scaled), 0)
    return scaled, np.ldexp(np.where(finite, np.abs(a), 0), -e)


def _scaled(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (a * 2**-e, |finite part of a| * 2**-e, e), e the binary exponent of a's largest finite magnitude
    (0, and a itself, when that is within 2**+-SCALE_FREE_EXP).

    At this scale the finite entries are at most 1 (or 2**400), so no sum of k
    products of scaled operands can overflow."""
    e = _scale_exponent(a)
    return (*_scaled_by(a, e), e)


def _sum_mismatches(
    got: np.ndarray,
    ref_s: np.ndarray,
    mag_s: np.ndarray,
    shift: int,
    terms: int,
    dtype: Any,
    lost_s: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Mask of the entries of ``got`` that no honest order of their sums can give.

    ``ref_s`` is each sum and ``mag_s`` the sum of its finite terms' magnitudes,
    computed here from operands scaled by powers of two whose exponents add up
    to ``shift`` (nothing overflows at that scale); ``terms`` products per entry;
    ``lost_s``: what the scaling's own underflow may have changed in each sum (see _scaled)."""
    import numpy as np

    eps, tiny = _eps_tiny(dtype)
    top = float(np.finfo(dtype).max)
    with np.errstate(all="ignore"):
        scaled = _ldexp(got, -shift)  # exact but for underflow, which the absolute term covers
        # Underflow: a product may lose up to `tiny` (a worker that flushes subnormals to
        # zero), on the worker (unscaled) and here (scaled), and scaling `got` rounds once.
        floor = 4 * (terms + 2) * (tiny + _safe_ldexp(tiny, -shift))
        bound = SUM_SLACK * (terms + 2) * eps * mag_s + floor + lost_s
        # Finite terms this large (half the largest float, unscaled) may overflow a partial sum;
        # +inf needs the positive terms that large, -inf the negative ones, NaN both.
        limit = _safe_ldexp(top / 2, -shift)
        overflow = mag_s >= limit
        fin_got, fin_scaled, fin_ref = np.isfinite(got), np.isfinite(scaled), np.isfinite(ref_s)
        bad = fin_scaled & fin_ref & ~(np.abs(scaled - ref_s) <= bound)
        bad |= fin_got & ~fin_ref  # an inf or NaN term makes the sum non-finite in every order
        bad |= ~fin_scaled & fin_ref & ~overflow
        if np.dtype(dtype).kind != "c":
            # |t| + t = 2 max(t, 0): the positive terms sum to (mag + ref) / 2, within the bound
            positive = (mag_s + ref_s) / 2 + bound >= limit
            negative = (mag_s - ref_s) / 2 + bound >= limit
            possible = np.where(np.isnan(got), positive & negative, np.where(got > 0, positive, negative))
            bad |= ~fin_got & fin_ref & ~possible
        if np.dtype(dtype).kind != "c":  # complex inf and NaN parts differ between formulas: any non-finite
            same = (np.isnan(got) & np.isnan(ref_s)) | (got == ref_s)
            bad |= ~fin_got & ~fin_ref & ~overflow & ~same
    return np.asarray(bad)


def _exact_mismatches(got: np.ndarray, want: np.ndarray, tol: np.ndarray | None = None) -> np.ndarray:
    """Mask of the entries where ``got`` is not numpy's correctly rounded ``want``.

    NaN matches NaN; inf matches inf of its sign. ``tol``: a per-entry rounding
    allowance (complex products may be formed with or without FMA)."""
    import numpy as np

    if want.dtype.kind not in "fc":
        return np.asarray(got != want)
    _, tiny = _eps_tiny(want.dtype)
    with np.errstate(all="ignore"):
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        # NOTE: `tiny`: a worker whose FPU flushes subnormal results to zero is honest
        same |= np.abs(got - want) <= (tiny if tol is None else tol + tiny)
        if tol is not None and want.dtype.kind == "c":
            same |= ~np.isfinite(got) & ~np.isfinite(want)
    return np.asarray(~same)


def _first_wrong(kernel: str, mask: np.ndarray, got: np.ndarray, want: np.ndarray | None = None) -> str | None:
    """None when ``mask`` is all False, else a message naming the first wrong entry."""
    import numpy as np

    if not mask.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
    where = f" at {list(index)}" if index else ""
    detail = f"got {got[index]!r}" + (f", numpy gives {want[index]!r}" if want is not None else "")
    return f"{kernel}: the result is wrong{where} ({detail}; {int(mask.sum())} wrong entries)"


def check_result(
    kernel: str,
    operands: Sequence[np.ndarray],
    params: Params,
    outputs: Sequence[np.ndarray],
    rng: random.Random,
    rounds: int = FREIVALDS_ROUNDS,
    check: str = "",
) -> str | None:
    """Check a worker's outputs cheaply; return None when numpy could have given them, else what is wrong.

    ``check`` "" runs the kernel's own check: matmul, Freivalds' check, C @ r
    against A @ (B @ r) for random r, O(n^2) instead of O(n^3), within a
    rounding-error bound (exact for integers); solve, inverse: the residual,
    within a bound scaled by the norms of A, x and b; O(n) kernels: recomputed;
    decompositions: random projections of their defining identities; a kernel
    without a check (unverified): nothing. "recompute": this node computes the
    result again and compares (`check_by_recompute`); "none": nothing. NaN and inf as
    numpy gives them. Workers are not trusted to do arithmetic right; a wrong
    answer is a worker fault, and an honest one is never called wrong."""
    entry = KERNELS.get(kernel)
    if entry is None or check == "none":
        return None  # an unknown kernel never ran: nothing to check
    if len(outputs) != entry.outputs:
        return f"{kernel}: expected {entry.outputs} output(s), got {len(outputs)}"
    seed = rng.getrandbits(64)
    try:
        if check == RECOMPUTE and entry.unique:
            return check_by_recompute(kernel, operands, params, tuple(outputs))
        if entry.check is None:
            return None
        return entry.check(kernel, operands, params, tuple(outputs), seed, max(1, rounds))
    except (ValueError, IndexError, TypeError, KernelError) as exc:
        return f"{kernel}: the result cannot be checked: {exc}"


def task_verification(kernel: str, check: str, remote: bool, rounds: int) -> str:
    """How a task's result was verified, as its outcome says (TaskOutput.verification): "local" when it
    ran here, "unverified" when taken as sent (check "none", --verify-rounds 0, a kernel without a
    check), "recompute", or the kernel's check ("freivalds", "residual", "projection", ...)."""
    entry = KERNELS.get(kernel)
    if not remote:
        return LOCAL_VERIFICATION
    if entry is None or check == "none":
        return UNVERIFIED
    if check == RECOMPUTE and entry.unique:
        return RECOMPUTE
    if rounds <= 0:
        return UNVERIFIED
    return entry.verification


RECOMPUTE_RTOL_EPS = 0.5  # a recomputed result's tolerance: eps ** this of its largest entry (about 1.5e-8)


def check_by_recompute(
    kernel: str, operands: Sequence[np.ndarray], params: Params, outputs: tuple[np.ndarray, ...]
) -> str | None:
    """Compute ``kernel`` here and compare each output: shape and dtype exactly, values exactly for an
    exact kernel, else within sqrt(eps) of the output's largest finite entry (another BLAS may add in
    another order; an ill-conditioned input may differ more between honest machines: its kernel's own
    check is the one that knows its bound). NaN where numpy gives NaN."""
    import numpy as np

    entry = KERNELS[kernel]
    try:
        want = run_kernel(kernel, operands, params)
    except KernelError:
        return None  # this node cannot compute it either: no answer to compare with
    for i, (got, ref) in enumerate(zip(outputs, want, strict=True)):
        label = kernel if len(want) == 1 else f"{kernel} output {i}"
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return f"{label}: result {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if entry.exact or ref.dtype.kind not in "fc":
            bad = _exact_mismatches(got, ref)
        else:
            eps, tiny = _eps_tiny(ref.dtype)
            with np.errstate(all="ignore"):
                finite = np.abs(ref[np.isfinite(ref)])
                top = float(finite.max()) if finite.size else 0.0
                tol = np.full(ref.shape, eps**RECOMPUTE_RTOL_EPS * top + tiny)
            bad = _exact_mismatches(got, ref, tol)
        problem = _first_wrong(label, bad, got, ref)
        if problem is not None:
            return f"{problem} (recomputed)"
    return None


# ---- numpy itself, as the kernels call it


@contextlib.contextmanager
def _numpy_errors(name: str) -> Iterator[None]:
    """numpy's own refusal of an argument (ValueError, TypeError) as the kernel's KernelError."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise KernelError(f"{name}: {one_line(str(exc), 300)}") from None


def _numpy_fn(path: str) -> Callable[..., Any]:
    import numpy as np

    fn: Any = np
    for part in path.split("."):
        fn = getattr(fn, part)
    return fn


def _broadcast_shape(name: str, operands: Operands) -> tuple[int, ...]:
    """The broadcast shape of the operands; KernelError in numpy's words when they do not broadcast."""
    import numpy as np

    try:
        return tuple(np.broadcast_shapes(*(a.shape for a in operands)))
    except ValueError:
        shapes = " ".join(
            "(" + ",".join(str(d) for d in a.shape) + ("," if a.ndim == 1 else "") + ")" for a in operands
        )
        raise KernelError(f"{name}: operands could not be broadcast together with shapes {shapes}") from None


def _dtype_of(path: str, operands: Operands, **kwargs: Any) -> np.dtype:
    """numpy's result dtype of ``path`` on operands of these dtypes (run on one entry each)."""
    import numpy as np

    with np.errstate(all="ignore"):
        return np.asarray(_numpy_fn(path)(*(np.ones(1, a.dtype) for a in operands), **kwargs)).dtype


# ---- What each kernel owns besides fn: output bound, cost, check, check inputs, reference.
# The registry below puts them together; a kernel added without one of them does not build.

_WIDEST_ITEMSIZE = 16  # complex128, the widest result


def _bytes_of_operands(operands: Operands, params: Params) -> int:
    """Loose output bound of a kernel whose result is no larger than its operands in entries, of any dtype.

    Only for a kernel whose output is not known in advance (an unknown name): every
    kernel of the registry has its exact bound below."""
    return sum(a.size for a in operands) * _WIDEST_ITEMSIZE


def _bytes_of(shape: Sequence[int], dtype: Any) -> int:
    import numpy as np

    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def _dims_of_random(params: Params) -> tuple[int, int]:
    """random's rows and cols as far as they are whole numbers >= 0 (else 0: the kernel refuses them)."""
    dims = []
    for key in ("rows", "cols"):
        v = params.get(key, 0.0)
        dims.append(int(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0)
    return dims[0], dims[1]


def _bytes_of_random(operands: Operands, params: Params) -> int:
    rows, cols = _dims_of_random(params)
    return rows * cols * 8


def _flops_of_elements(operands: Operands, params: Params) -> float:
    """Cost of a kernel that touches each element once (random: each element it makes)."""
    return float(sum(a.size for a in operands) or math.prod(_dims_of_random(params)))


def _sample_two(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (a, b), {}


def _sample_random(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (), {"rows": 8, "cols": a.shape[0], "seed": 42}


# The references are plain numpy, written apart from the kernels' fn on purpose:
# the initiator's checks compare a peer's answer with them.


def _ref_random(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.random.default_rng(int(params["seed"])).random(_dims_of_random(params))  # type: ignore[arg-type]


BASIC_KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "random",
        0,
        _k_random,
        "uniform [0, 1) matrix rows x cols from seed",
        ("rows", "cols", "seed"),
        out_nbytes=_bytes_of_random,
        flops=_flops_of_elements,
        check=None,
        sample=_sample_random,
        reference=_ref_random,
        verification=UNVERIFIED,
    ),
)


###############################################################################
# 7. Kernels: linear algebra
#
# numpy.linalg's operations, matmul and einsum under numpy's names and argument
# names, stacked (N-d) where numpy is. Each entry's check costs less than the
# kernel: Freivalds' projection for products, residuals and random projections
# for solves and decompositions; an entry without one says "unverified".
###############################################################################


def _need_2d(name: str, a: np.ndarray, what: str = "operand") -> None:
    if a.ndim != 2:
        raise KernelError(f"{name}: {what} must be a 2-D matrix, got shape {a.shape}")


def _need_square_float(name: str, a: np.ndarray) -> np.ndarray:
    """A square float or complex matrix of finite entries (ints become float64); KernelError otherwise."""
    import numpy as np

    _need_2d(name, a)
    if a.shape[0] != a.shape[1]:
        raise KernelError(f"{name}: matrix must be square, got shape {a.shape}")
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise KernelError(f"{name}: matrix contains NaN or Inf")
    return a


def _k_matmul(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a, b = ops
    if a.ndim == 2 and b.ndim == 2:
        if a.shape[1] != b.shape[0]:
            raise KernelError(f"matmul: shapes {a.shape} and {b.shape} do not match ({a.shape[1]} != {b.shape[0]})")
        return (a @ b,)
    _matmul_stack_shape(a.shape, b.shape)  # numpy's rules for vectors and stacks, in numpy's words
    return (np.asarray(np.matmul(a, b)),)


def _matmul_stack_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the broadcast batch shape, the result's shape) of a matmul of a vector or a stack of matrices;
    KernelError in numpy's words when the shapes do not fit."""
    import numpy as np

    if not a or not b:
        raise KernelError("matmul: Input operand does not have enough dimensions (0-d: use multiply)")
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    if a2[-1] != b2[-2]:
        raise KernelError(
            f"matmul: Input operand 1 has a mismatch in its core dimension 0, with gufunc signature "
            f"(n?,k),(k,m?)->(n?,m?) (size {b2[-2]} is different from {a2[-1]})"
        )
    try:
        batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    except ValueError:
        raise KernelError(f"matmul: the stacks of shapes {a} and {b} do not broadcast together") from None
    core = (a2[-2],) * (len(a) > 1) + (b2[-1],) * (len(b) > 1)
    return batch, batch + core


def _k_solve(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a, b = ops
    a = _need_square_float("solve", a)
    if b.ndim not in (1, 2) or b.shape[0] != a.shape[0]:
        raise KernelError(f"solve: right-hand side of shape {b.shape} does not fit a {a.shape} matrix")
    if not np.isfinite(b).all():
        raise KernelError("solve: right-hand side contains NaN or Inf")
    try:
        return (np.linalg.solve(a, b),)
    except np.linalg.LinAlgError as exc:
        raise KernelError(f"solve: matrix is singular ({exc})") from None


def _k_inverse(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("inverse", ops[0])
    try:
        return (np.linalg.inv(a),)
    except np.linalg.LinAlgError as exc:
        raise KernelError(f"inverse: matrix is singular ({exc})") from None


_FREIVALDS_FAILED = "matmul: the result fails Freivalds' check (C @ r != A @ (B @ r) beyond the rounding-error bound)"


ABS_BLOCK_BYTES = 1 << 18  # X @ v and |X| @ w a block of rows at a time, in cache: no fresh n^2 array


def _and_abs_matmul(x: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x @ v, |x| @ w) for a 2-D x and thin v, w: a block of x's rows at a time, read from memory
    once for both and never allocating |x| whole."""
    import numpy as np

    rows = max(1, ABS_BLOCK_BYTES // max(1, x.shape[1] * x.itemsize))
    if rows >= x.shape[0]:
        return x @ v, np.abs(x) @ w
    real = np.abs(x[:0]).dtype
    plain = np.empty((x.shape[0], v.shape[1]), dtype=np.result_type(x.dtype, v.dtype))
    magnitude = np.empty((x.shape[0], w.shape[1]), dtype=np.result_type(real, w.dtype))
    buf = np.empty((rows, x.shape[1]), dtype=real)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        plain[start : start + rows] = block @ v
        magnitude[start : start + rows] = np.abs(block, out=buf[: block.shape[0]]) @ w
    return plain, magnitude


def _freivalds(a: np.ndarray, b: np.ndarray, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (C r, A (B r), the rounding-error bound of their difference), element-wise.

    With C = A B + E, |E| <= gamma_k |A||B| (any summation order), and the three
    products formed here each adding gamma of its length: |C r - A (B r)| <=
    gamma_n (3 |A|(|B||r|) + |C||r|) <= 2 n eps |A|(|B||r|), n = max(k, p)
    (gamma_n ~ n eps / 2); complex: sqrt(2) and n + 2. The bound is
    FREIVALDS_SLACK * (n + 2) * eps * 2 |A|(|B||r|): three times the real worst
    case. O(n^2): every product is with a vector."""
    import numpy as np

    k, p = b.shape
    eps, tiny = _eps_tiny(c.dtype)
    n = max(k, p)
    scale = FREIVALDS_SLACK * (n + 2) * eps
    abs_r = np.abs(r)
    # NOTE: `under` inside the product: the underflow of B r (up to 2p*tiny per entry)
    # reaches the result through |A|, so it is scaled by A's rows like the rest.
    under = 4 * (p + 1) * tiny / scale
    # NOTE: |C||r| <= (1 + gamma_k) |A|(|B||r|) for an honest C, so the bound uses twice
    # |A|(|B||r|): one pass over |C| less, and a lying C cannot widen its own bound.
    b_r, abs_b_r = _and_abs_matmul(b, r, abs_r)
    right, magnitude = _and_abs_matmul(a, b_r, abs_b_r + under)
    bound = scale * 2 * magnitude + 4 * (p + 1) * (k + 2) * tiny
    return c @ r, right, bound


def _check_matmul_int(a: np.ndarray, b: np.ndarray, c: np.ndarray, gen: Any, rounds: int) -> str | None:
    """Freivalds' check in integers modulo 2**64, compared modulo 2**bits of the result.

    numpy's integer matmul wraps modulo 2**bits, so C = A B (mod 2**bits) and
    C r = A (B r) there exactly. r is odd: a single wrong entry, whatever its
    error, changes its row of C r (an odd number is invertible modulo 2**bits)."""
    import numpy as np

    def u64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.int64).view(np.uint64)

    r = gen.integers(0, 1 << 62, size=(b.shape[1], rounds), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    diff = u64(c) @ r - u64(a) @ (u64(b) @ r)
    bits = c.dtype.itemsize * 8
    if bits < 64:
        diff &= np.uint64((1 << bits) - 1)
    return None if not diff.any() else "matmul: the result fails Freivalds' check in integers (C @ r != A @ (B @ r))"


def _recompute_budget(m: int, k: int, p: int) -> int:
    return max(RECOMPUTE_FLOOR, RECOMPUTE_FACTOR * (m * k + k * p + m * p))


def _check_matmul_exceptional(a: np.ndarray, b: np.ndarray, c: np.ndarray, r: np.ndarray, gen: Any) -> str | None:
    """Check a product that inf or NaN reached: Freivalds on the finite part, recomputing the rest.

    A row of A with an inf or NaN makes that row of C non-finite, a column of B
    so its column; those are left out of the Freivalds check (r restricted to
    B's finite columns, A's rows with inf or NaN skipped), and they, and the rows
    whose check overflowed, are recomputed here from scaled operands (within a
    budget of a few Freivalds passes; a random sample when there are more)."""
    import numpy as np

    m, k = a.shape
    p = b.shape[1]
    want = c.dtype
    with np.errstate(all="ignore"):
        bad_rows = ~np.isfinite(a).all(axis=1)
        bad_cols = ~np.isfinite(b).all(axis=0)
        keep = ~bad_cols
        # NOTE: the rows of A with inf or NaN give garbage here, but they are not clean: left out
        finite = (b, c, r) if keep.all() else (b[:, keep], c[:, keep], r[keep])
        left, right, bound = _freivalds(a, *finite)
        clean = ~bad_rows & np.isfinite(left).all(1) & np.isfinite(right).all(1) & np.isfinite(bound).all(1)
        if not (np.abs(left[clean] - right[clean]) <= bound[clean]).all():
            return _FREIVALDS_FAILED
    if np.isfinite(c[bad_rows]).any() or np.isfinite(c[:, bad_cols]).any():
        return "matmul: the result is finite where an operand's inf or NaN makes every order of the sum non-finite"
    budget = _recompute_budget(m, k, p)
    rows = np.flatnonzero(~clean)
    if rows.size * k * p > budget:
        rows = np.sort(gen.choice(rows, size=max(1, budget // max(1, k * p)), replace=False))
    others = np.setdiff1d(np.arange(m), rows)
    cols = np.flatnonzero(bad_cols)
    if others.size * k * cols.size > budget:
        cols = np.sort(gen.choice(cols, size=max(1, budget // max(1, k * others.size)), replace=False))
    if not rows.size and not (others.size and cols.size):
        return None
    a_s, a_mag, a_exp = _scaled(a.astype(want, copy=False))
    b_s, b_mag, b_exp = _scaled(b.astype(want, copy=False))
    # NOTE: an entry the scaling moved to the smallest subnormal (see _scaled) was smaller than
    # it, so each product with it is off by at most |other factor| * least (per part, hence 2):
    # summed over k, least * 2 * (row sum of |A_s| + column sum of |B_s|) bounds the change.
    least = float(np.finfo(want).smallest_subnormal) if a_exp or b_exp else 0.0
    a_row, b_col = 2 * least * a_mag.sum(axis=1), 2 * least * b_mag.sum(axis=0)
    with np.errstate(all="ignore"):
        for rr, cc in ((rows, np.arange(p)), (others, cols)):
            if not rr.size or not cc.size:
                continue
            if rr.size * 4 < m:  # a few rows of A times B
                got, ref_s, mag_s = c[rr], a_s[rr] @ b_s, a_mag[rr] @ b_mag
                got, ref_s, mag_s = (x[:, cc] for x in (got, ref_s, mag_s)) if cc.size < p else (got, ref_s, mag_s)
            else:  # A times a few columns of B: no copy of A's rows
                got, ref_s, mag_s = (x[rr] for x in (c[:, cc], a_s @ b_s[:, cc], a_mag @ b_mag[:, cc]))
            lost = a_row[rr][:, None] + b_col[cc][None, :] if least else 0.0
            bad = _sum_mismatches(got, ref_s, mag_s, a_exp + b_exp, k, want, lost)
            if bad.any():
                i, j = (int(x) for x in np.unravel_index(int(np.argmax(bad)), bad.shape))
                row, col = int(rr[i]), int(cc[j])
                near = _ldexp(ref_s[i : i + 1, j], a_exp + b_exp)[0]
                return f"matmul: the result is wrong at [{row}, {col}] (got {c[row, col]!r}, numpy gives ~{near!r})"
    return None


def _check_matmul(a: np.ndarray, b: np.ndarray, c: np.ndarray, gen: Any, rounds: int) -> str | None:
    """Freivalds' check of C = A @ B in O(n^2), with the rounding-error bound of _freivalds."""
    import numpy as np

    want = np.result_type(a.dtype, b.dtype)
    if c.shape != (a.shape[0], b.shape[1]):
        return f"matmul: result shape {c.shape}, expected {(a.shape[0], b.shape[1])}"
    if c.dtype != want:
        return f"matmul: result dtype {c.dtype}, expected {want}"
    if want.kind in "iu":
        return _check_matmul_int(a, b, c, gen, rounds)
    # NOTE: the rounds are the columns of one random matrix: each column is an
    # independent check, and A, B and C are read from memory once, not per round.
    # Random signs times [1, 2): a lone wrong entry moves its row of C r by at least
    # its error; several cancel with probability 0.
    real = np.finfo(want).dtype
    r = (gen.uniform(1.0, 2.0, (b.shape[1], rounds)) * gen.choice([-1.0, 1.0], (b.shape[1], rounds))).astype(real)
    with np.errstate(all="ignore"):
        left, right, bound = _freivalds(a, b, c, r)
        if np.isfinite(left).all() and np.isfinite(right).all() and np.isfinite(bound).all():
            # every operand entry is finite then: an inf or NaN anywhere reaches a row of these
            return None if (np.abs(left - right) <= bound).all() else _FREIVALDS_FAILED
    return _check_matmul_exceptional(a, b, c, r, gen)


def _linalg_dtype(*arrays: np.ndarray) -> Any:
    """The dtype numpy.linalg gives: single only when every operand is, complex when any is."""
    import numpy as np

    single = all(x.dtype in (np.float32, np.complex64) for x in arrays)
    cplx = any(x.dtype.kind == "c" for x in arrays)
    return np.dtype(
        {(True, True): np.complex64, (True, False): np.float32, (False, True): np.complex128}.get(
            (single, cplx), np.float64
        )
    )


def _check_solve(
    kernel: str, operands: Sequence[np.ndarray], params: Params, x: np.ndarray, gen: Any, rounds: int
) -> str | None:
    """Check A x = b (inverse: A X = I) by its residual in O(n^2), scaled by the norms of A, x and b.

    For each column j, LU with partial pivoting gives ||A x_j - b_j|| <= c n eps
    (||A|| ||x_j|| + ||b_j||) (infinity norms; c grows with the pivot growth,
    small in practice). The columns are combined by random r (as in Freivalds),
    which adds |r_j| and the rounding of X r and A (X r) - B r. A residual above
    the bound (a lie, or a matrix whose elimination grows a lot) is settled by
    solving here: the result passes when its residual is within twice this
    node's own plus the bound, so an honest worker is never accused."""
    import numpy as np

    a = operands[0] if operands[0].dtype.kind in "fc" else operands[0].astype(np.float64)
    b = operands[1] if kernel == "solve" else None
    want = _linalg_dtype(a) if b is None else _linalg_dtype(a, b)
    expected_shape = a.shape if b is None else b.shape
    if x.shape != expected_shape:
        return f"{kernel}: result shape {x.shape}, expected {expected_shape}"
    if x.dtype != want:
        return f"{kernel}: result dtype {x.dtype}, expected {want}"
    n = a.shape[0]
    if x.size == 0:
        return None
    eps, tiny = _eps_tiny(want)
    x2 = x.reshape(n, -1)
    cols = x2.shape[1]
    r = gen.uniform(1.0, 2.0, (cols, rounds)) * gen.choice([-1.0, 1.0], (cols, rounds))

    def residual(x2: np.ndarray) -> np.ndarray:
        rb = r if b is None else b.reshape(n, -1) @ r
        return np.abs(a @ (x2 @ r) - rb).max(axis=0)

    with np.errstate(all="ignore"):
        if not np.isfinite(x).all():
            local = _solve_here(kernel, operands, params)
            if local is not None and np.isfinite(local).all():
                return f"{kernel}: the result has NaN or Inf where the solution is finite"
            return None  # the system is beyond the format's range: this node's answer is no better
        abs_r = np.abs(r).astype(np.float64)
        norm_a = float(np.abs(a).sum(axis=1).max())
        norm_b = np.ones(cols) if b is None else np.abs(b.reshape(n, -1)).max(axis=0)
        size = n + cols + 2
        bound = SOLVE_SLACK * size * eps * (norm_a * (np.abs(x2).max(axis=0) @ abs_r) + norm_b @ abs_r)
        bound += 4 * size * tiny * (norm_a + 1) * abs_r.sum(axis=0)
        got = residual(x2)
        if (got <= bound).all():
            return None
        local = _solve_here(kernel, operands, params)
        if local is None:
            return None  # singular here: no answer to compare with
        own = residual(local.reshape(n, -1))
        if (~np.isfinite(own) | (got <= 2 * own + bound)).all():
            return None
    what = "A @ X - I" if b is None else "A @ x - b"
    worst, limit = float(got.max()), float(bound.max())
    return f"{kernel}: the residual {what} is {worst:.3g}, above its rounding-error bound {limit:.3g}"


def _solve_here(kernel: str, operands: Sequence[np.ndarray], params: Params) -> np.ndarray | None:
    """This node's own solve/inverse of the operands; None when it finds the matrix singular."""
    try:
        return run_kernel(kernel, operands, params)[0]
    except KernelError:
        return None


def _bytes_of_matmul(operands: Operands, params: Params) -> int:
    import numpy as np

    a, b = operands
    if a.ndim == 2 and b.ndim == 2:
        return _bytes_of((a.shape[0], b.shape[-1]), np.result_type(a.dtype, b.dtype))
    return _bytes_of(_matmul_stack_shape(a.shape, b.shape)[1], np.result_type(a.dtype, b.dtype))


def _bytes_of_solve(operands: Operands, params: Params) -> int:
    return _bytes_of(operands[1].shape, _linalg_dtype(operands[0], operands[1]))  # as _check_solve expects


def _bytes_of_inverse(operands: Operands, params: Params) -> int:
    return _bytes_of(operands[0].shape, _linalg_dtype(operands[0]))


def _flops_of_matmul(operands: Operands, params: Params) -> float:
    if len(operands) == 2 and operands[0].ndim == 2 and operands[1].ndim == 2:
        return 2.0 * operands[0].shape[0] * operands[0].shape[1] * operands[1].shape[1]
    if len(operands) == 2 and operands[0].ndim and operands[1].ndim:  # a stack: its products, each 2 n k m
        try:
            _, out = _matmul_stack_shape(operands[0].shape, operands[1].shape)
        except KernelError:
            return _flops_of_elements(operands, params)
        return 2.0 * math.prod(out) * operands[0].shape[-1]
    return _flops_of_elements(operands, params)


def _flops_of_cubic(operands: Operands, params: Params) -> float:
    """solve, inverse: LU of an n x n matrix."""
    if operands and operands[0].ndim == 2:
        return 2.0 * operands[0].shape[0] ** 3
    return _flops_of_elements(operands, params)


def _verify_matmul(
    name: str, operands: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    import numpy as np

    gen = np.random.default_rng(seed)  # NOTE: made only here: it costs more than a tiny check
    a, b = operands
    if a.ndim == 2 and b.ndim == 2:
        return _check_matmul(a, b, outputs[0], gen, rounds)
    # vectors and stacks: Freivalds' check of each product of the stack, as numpy broadcasts them
    batch, shape = _matmul_stack_shape(a.shape, b.shape)
    c = outputs[0]
    if c.shape != shape:
        return f"matmul: result shape {c.shape}, expected {shape}"
    a2, b2 = (a if a.ndim > 1 else a[None, :]), (b if b.ndim > 1 else b[:, None])
    a3 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b3 = np.broadcast_to(b2, batch + b2.shape[-2:])
    c3 = c.reshape(batch + (a2.shape[-2], b2.shape[-1]))
    for index in np.ndindex(*batch):
        problem = _check_matmul(a3[index], b3[index], c3[index], gen, rounds)
        if problem is not None:
            return problem.replace("matmul:", f"matmul: product {list(index)} of the stack:", 1) if index else problem
    return None


def _verify_solve(
    name: str, operands: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    import numpy as np

    return _check_solve(name, operands, params, outputs[0], np.random.default_rng(seed), rounds)


def _well_conditioned(a: np.ndarray) -> np.ndarray:
    import numpy as np

    n = a.shape[0]
    return a + n * np.eye(n)


def _sample_solve(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (_well_conditioned(a), v), {}


def _sample_inverse(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (_well_conditioned(a),), {}


def _ref_matmul(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.matmul(ops[0], ops[1])


def _ref_solve(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.linalg.solve(ops[0], ops[1])


def _ref_inverse(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.linalg.inv(ops[0])


def _stacked(k: Kernel) -> Kernel:
    """``k`` (a kernel of one matrix) over a stack of them, as numpy.linalg takes them: operand 0 of
    shape (..., M, N) holds its matrices on its last two axes, and each output gets the stack's
    leading axes. Each matrix is validated, computed and checked as one (its check, O(n^2) a matrix,
    still costs less than computing it); an error names the matrix ("matrix [1, 0] of the stack").
    Runs at import: numpy is imported only by the functions it returns."""

    def batch_of(ops: Operands) -> tuple[int, ...]:
        return tuple(ops[0].shape[:-2]) if ops and ops[0].ndim > 2 else ()

    def matrix(ops: Operands, index: tuple[int, ...]) -> Operands:
        return (ops[0][index], *ops[1:])

    def one_matrix(ops: Operands) -> Operands:  # a stand-in of no bytes, for bounds and costs
        import numpy as np

        return (np.broadcast_to(np.zeros((), ops[0].dtype), ops[0].shape[-2:]), *ops[1:])

    def named(message: str, index: tuple[int, ...], name: str = k.name) -> str:
        return message.replace(f"{name}:", f"{name}: matrix {list(index)} of the stack:", 1)

    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        import numpy as np

        batch = batch_of(ops)
        if not batch:
            return k.fn(ops, params)
        each = []
        for index in np.ndindex(*batch):
            try:
                each.append(k.fn(matrix(ops, index), params))
            except KernelError as exc:
                raise KernelError(named(str(exc), index)) from None
        if not each:  # an empty stack: the outputs' shapes and dtypes from one (invertible) matrix
            eye = np.eye(*ops[0].shape[-2:], dtype=ops[0].dtype)
            return tuple(np.empty(batch + o.shape, o.dtype) for o in k.fn((eye, *ops[1:]), params))
        return tuple(
            np.stack([outs[j] for outs in each]).reshape(batch + each[0][j].shape) for j in range(len(each[0]))
        )

    def check(
        name: str, ops: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
    ) -> str | None:
        import numpy as np

        assert k.check is not None
        batch = batch_of(ops)
        if not batch:
            return k.check(name, ops, params, outputs, seed, rounds)
        for j, o in enumerate(outputs):
            if tuple(o.shape[: len(batch)]) != batch:
                return f"{name}: output {j} of shape {o.shape} for a stack of {list(batch)} matrices"
        for i, index in enumerate(np.ndindex(*batch)):
            problem = k.check(
                name, matrix(ops, index), params, tuple(o[(*index, ...)] for o in outputs), seed + i, rounds
            )
            if problem is not None:
                return named(problem, index, name)
        return None

    def out_nbytes(ops: Operands, params: Params) -> int:
        return (
            math.prod(batch_of(ops)) * k.out_nbytes(one_matrix(ops), params)
            if batch_of(ops)
            else k.out_nbytes(ops, params)
        )

    def flops(ops: Operands, params: Params) -> float:
        return math.prod(batch_of(ops)) * k.flops(one_matrix(ops), params) if batch_of(ops) else k.flops(ops, params)

    def reference(ops: Operands, params: Params) -> Any:
        if not batch_of(ops):
            return k.reference(ops, params)
        outs = fn(ops, params)
        return outs[0] if len(outs) == 1 else outs

    return dataclasses.replace(
        k,
        fn=fn,
        check=check if k.check is not None else None,
        out_nbytes=out_nbytes,
        flops=flops,
        reference=reference,
        doc=f"{k.doc} (stacks of matrices too)",
    )


LINALG_KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "matmul",
        2,
        _k_matmul,
        "matrix product a @ b",
        out_nbytes=_bytes_of_matmul,
        flops=_flops_of_matmul,
        check=_verify_matmul,
        sample=_sample_two,
        reference=_ref_matmul,
        verification="freivalds",
        exact=False,
    ),
    Kernel(
        "solve",
        2,
        _k_solve,
        "x with a @ x = b",
        out_nbytes=_bytes_of_solve,
        flops=_flops_of_cubic,
        check=_verify_solve,
        verification="residual",
        sample=_sample_solve,
        reference=_ref_solve,
        exact=False,
    ),
    _stacked(
        Kernel(
            "inverse",
            1,
            _k_inverse,
            "matrix inverse",
            out_nbytes=_bytes_of_inverse,
            flops=_flops_of_cubic,
            check=_verify_solve,
            verification="residual",
            sample=_sample_inverse,
            reference=_ref_inverse,
            exact=False,
        )
    ),
)


# ---- numpy.linalg beyond solve and inverse: decompositions checked by random projections
#
# A decomposition is checked by its defining identities applied to a few random
# vectors r (O(n^2) each, against the kernel's O(n^3)): U diag(s) Vh r against
# A r for svd, A V r against V diag(w) r for eig and eigh, Q R r against A r and
# Q^H Q r against r for qr, L L^H r against A r for cholesky, the normal
# equations A^H (A x - b) for lstsq, and A P A r against A r for pinv. Each is
# judged within PROJECTION_SLACK x n x eps x the norms the identity multiplies
# (an honest machine's rounding, whatever its BLAS), so an ill-conditioned input
# is not a lie; a result wrong by more is. det, slogdet, matrix_rank and einsum
# have no check cheaper than computing them: they are unverified (or checked by
# recomputing, if the task asks).

PROJECTION_SLACK = 64.0  # decompositions round more than a product: n * eps * |A| times this


def _finite_matrix(name: str, a: np.ndarray) -> np.ndarray:
    import numpy as np

    _need_2d(name, a)
    if a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise KernelError(f"{name}: matrix contains NaN or Inf")
    return a


def _linalg_call(name: str, fn: Callable[[], Any]) -> Any:
    import numpy as np

    try:
        with np.errstate(all="ignore"):
            return fn()
    except np.linalg.LinAlgError as exc:
        raise KernelError(f"{name}: {exc}") from None


def _k_svd(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _finite_matrix("svd", ops[0])
    full = bool(number_param("svd", params, "full_matrices", 1.0))
    u, s, vh = _linalg_call("svd", lambda: np.linalg.svd(a, full_matrices=full))
    return (u, s, vh)


def _k_eigh(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("eigh", ops[0])
    uplo = text_param("eigh", params, "UPLO", "L", ("L", "U"))
    w, v = _linalg_call("eigh", lambda: np.linalg.eigh(a, UPLO=uplo))  # type: ignore[call-overload]
    return (w, v)


def _k_eigvalsh(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("eigvalsh", ops[0])
    uplo = text_param("eigvalsh", params, "UPLO", "L", ("L", "U"))
    w = _linalg_call("eigvalsh", lambda: np.linalg.eigvalsh(a, UPLO=uplo))  # type: ignore[call-overload]
    return (w,)


def _k_eig(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("eig", ops[0])
    w, v = _linalg_call("eig", lambda: np.linalg.eig(a))
    return (w.astype(_complex_of(a.dtype)), v.astype(_complex_of(a.dtype)))


def _k_eigvals(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("eigvals", ops[0])
    return (_linalg_call("eigvals", lambda: np.linalg.eigvals(a)).astype(_complex_of(a.dtype)),)


def _complex_of(dtype: np.dtype) -> np.dtype:
    """The complex dtype of a float or complex one (eig's result: complex whatever the values)."""
    import numpy as np

    return np.result_type(dtype, np.complex64)


def _k_qr(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _finite_matrix("qr", ops[0])
    mode = text_param("qr", params, "mode", "reduced", ("reduced", "complete"))
    q, r = _linalg_call("qr", lambda: np.linalg.qr(a, mode=mode))  # type: ignore[call-overload]
    return (q, r)


def _k_cholesky(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("cholesky", ops[0])
    return (_linalg_call("cholesky", lambda: np.linalg.cholesky(a)),)


def _k_lstsq(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a, b = _finite_matrix("lstsq", ops[0]), ops[1]
    if b.ndim not in (1, 2) or b.shape[0] != a.shape[0]:
        raise KernelError(f"lstsq: right-hand side of shape {b.shape} does not fit a {a.shape} matrix")
    if not np.isfinite(b).all():
        raise KernelError("lstsq: right-hand side contains NaN or Inf")
    rcond = number_param("lstsq", params, "rcond", -1.0) if "rcond" in params else None
    x, res, rank, s = _linalg_call("lstsq", lambda: np.linalg.lstsq(a, b, rcond=rcond))
    return (x, res, np.asarray(rank, dtype=np.int64), s)


def _k_pinv(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _finite_matrix("pinv", ops[0])
    rcond = number_param("pinv", params, "rcond", 1e-15)
    return (_linalg_call("pinv", lambda: np.linalg.pinv(a, rcond=rcond)),)


def _k_det(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("det", ops[0])
    return (np.asarray(_linalg_call("det", lambda: np.linalg.det(a))),)


def _k_slogdet(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _need_square_float("slogdet", ops[0])
    sign, logdet = _linalg_call("slogdet", lambda: np.linalg.slogdet(a))
    return (np.asarray(sign), np.asarray(logdet))


def _k_matrix_rank(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = _finite_matrix("matrix_rank", ops[0])
    tol = number_param("matrix_rank", params, "tol", 0.0) if "tol" in params else None
    return (np.asarray(_linalg_call("matrix_rank", lambda: np.linalg.matrix_rank(a, tol=tol)), dtype=np.int64),)


def _k_matrix_power(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = ops[0]
    _need_2d("matrix_power", a)
    if a.shape[0] != a.shape[1]:
        raise KernelError(f"matrix_power: matrix must be square, got shape {a.shape}")
    n = int_param("matrix_power", params, "n", None)
    if n is None:
        raise KernelError("matrix_power: give the power as n (a whole number; negative powers invert)")
    if abs(n) > MAX_MATRIX_POWER:
        raise KernelError(f"matrix_power: n must be within -{MAX_MATRIX_POWER}..{MAX_MATRIX_POWER}, got {n}")
    if n < 0 and a.dtype.kind not in "fc":
        a = a.astype(np.float64)
    return (np.asarray(_linalg_call("matrix_power", lambda: np.linalg.matrix_power(a, n))),)


MAX_MATRIX_POWER = 1 << 16  # a larger power is a mistake: its entries overflow long before


def _k_norm(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a = ops[0]
    ord_, axis, keep = _norm_args(a, params)
    with np.errstate(all="ignore"), _numpy_errors("norm"):
        return (np.asarray(np.linalg.norm(a, ord=ord_, axis=axis, keepdims=keep)),)


def _norm_args(a: np.ndarray, params: Params) -> tuple[Any, Any, bool]:
    """numpy.linalg.norm's ord (a number, or "fro" / "nuc"), axis and keepdims from the params."""
    ord_: Any = None
    if "ord" in params:
        value = params["ord"]
        if isinstance(value, str):
            ord_ = text_param("norm", params, "ord", "fro", ("fro", "nuc"))
        else:
            ord_ = number_param("norm", params, "ord", 2.0)
            ord_ = int(ord_) if math.isfinite(ord_) and ord_ == int(ord_) else ord_
    axes = axis_param("norm", params, max(a.ndim, 1))
    if axes is not None and len(axes) > 2:
        raise KernelError(f"norm: axis takes one or two axes, got {axes}")
    if axes is None and a.ndim > 2 and ord_ is not None:
        raise KernelError(f"norm: an ord needs one or two axes of a {a.ndim}-d array")
    keep = number_param("norm", params, "keepdims", 0.0) == 1.0
    axis = None if axes is None else axes[0] if len(axes) == 1 else axes
    return ord_, axis, keep


def _einsum_shape(subscripts: str, operands: Operands) -> tuple[str, tuple[int, ...]]:
    """The explicit subscripts (with "->") and output shape of an einsum; KernelError for subscripts
    that are not letters, commas and one "->", or do not fit the operands (checked before running)."""
    import string

    text = subscripts.replace(" ", "")
    if not text or len(text) > 128 or any(c not in string.ascii_letters + ",->" for c in text):
        raise KernelError(f"einsum: subscripts must be letters, commas and '->' (no '...'), got {subscripts[:60]!r}")
    if text.count("->") > 1 or text.replace("->", "").count("-") or text.replace("->", "").count(">"):
        raise KernelError(f"einsum: subscripts take one '->', got {subscripts[:60]!r}")
    inputs, _, output = text.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(operands):
        raise KernelError(f"einsum: {len(terms)} operand(s) in the subscripts, {len(operands)} given")
    sizes: dict[str, int] = {}
    for i, (term, a) in enumerate(zip(terms, operands, strict=True)):
        if len(term) != a.ndim:
            raise KernelError(f"einsum: operand {i} has {a.ndim} dimensions, its subscripts {term!r} {len(term)}")
        for letter, size in zip(term, a.shape, strict=True):
            if sizes.setdefault(letter, size) != size and size != 1 and sizes[letter] != 1:
                raise KernelError(
                    f"einsum: dimension {letter!r} is {sizes[letter]} in one operand and {size} in another"
                )
            sizes[letter] = max(sizes[letter], size)
    if "->" not in text:  # numpy's implicit output: the letters seen once, in order
        output = "".join(sorted(c for c in sizes if inputs.count(c) == 1))
    if len(set(output)) != len(output) or any(c not in sizes for c in output):
        raise KernelError(f"einsum: output subscripts {output!r} repeat a letter or name one no operand has")
    if len(output) > MAX_NDIM:
        raise KernelError(f"einsum: an output of {len(output)} dimensions, at most {MAX_NDIM}")
    return f"{inputs}->{output}", tuple(sizes[c] for c in output)


def _k_einsum(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    subscripts = text_param("einsum", params, "subscripts", "")
    explicit, _ = _einsum_shape(subscripts, ops)
    with np.errstate(all="ignore"), _numpy_errors("einsum"):
        return (np.asarray(np.einsum(explicit, *ops, optimize=len(ops) > 2)),)


# ---- bounds, costs, checks, samples


def _bytes_of_linalg(name: str) -> Callable[[Operands, Params], int]:
    """Each decomposition's outputs from its shapes (numpy's dtypes: float64 for ints, complex for eig)."""

    def out_nbytes(ops: Operands, params: Params) -> int:
        import numpy as np

        a = ops[0]
        dtype = np.result_type(a.dtype, np.float32) if a.dtype.kind in "fc" else np.dtype(np.float64)
        real = np.finfo(dtype).dtype  # the real dtype of singular values and eigh's eigenvalues
        m, n = (a.shape + (1, 1))[:2] if a.ndim == 2 else (0, 0)
        k = min(m, n)
        if name == "svd":
            full = bool(number_param(name, params, "full_matrices", 1.0))
            u, vh = ((m, m), (n, n)) if full else ((m, k), (k, n))
            return _bytes_of(u, dtype) + _bytes_of((k,), real) + _bytes_of(vh, dtype)
        if name == "eigh":
            return _bytes_of((n,), real) + _bytes_of((n, n), dtype)
        if name == "eigvalsh":
            return _bytes_of((n,), real)
        if name == "eig":
            return _bytes_of((n,), _complex_of(dtype)) + _bytes_of((n, n), _complex_of(dtype))
        if name == "eigvals":
            return _bytes_of((n,), _complex_of(dtype))
        if name == "qr":
            complete = text_param(name, params, "mode", "reduced", ("reduced", "complete")) == "complete"
            q, r = ((m, m), (m, n)) if complete else ((m, k), (k, n))
            return _bytes_of(q, dtype) + _bytes_of(r, dtype)
        if name in ("cholesky", "pinv"):
            return _bytes_of((n, m) if name == "pinv" else (n, n), dtype)
        if name == "lstsq":
            b = ops[1]
            dtype = np.result_type(dtype, b.dtype if b.dtype.kind in "fc" else np.float64)
            nrhs = () if b.ndim == 1 else (b.shape[1],)
            return _bytes_of((n, *nrhs), dtype) + _bytes_of(nrhs or (1,), real) + 8 + _bytes_of((k,), real)
        if name in ("det", "slogdet"):
            return int(dtype.itemsize) * (1 if name == "det" else 2)
        if name == "matrix_rank":
            return 8
        if name == "matrix_power":
            n_pow = int_param(name, params, "n", 1) or 0
            return _bytes_of(a.shape, a.dtype if n_pow >= 0 or a.dtype.kind in "fc" else np.float64)
        if name == "norm":
            ord_, axis, keep = _norm_args(a, params)
            one = np.ones((1,) * a.ndim, a.dtype)
            with np.errstate(all="ignore"):
                dt = np.asarray(np.linalg.norm(one, ord=None, axis=axis, keepdims=keep)).dtype
            if axis is None:
                return int(dt.itemsize)  # one number (keepdims: in as many dimensions of 1)
            axes = {axis} if isinstance(axis, int) else set(axis)
            dims = [1 if i in axes else d for i, d in enumerate(a.shape) if keep or i not in axes]
            return _bytes_of(dims, dt)
        if name == "einsum":
            _, out_shape = _einsum_shape(text_param(name, params, "subscripts", ""), ops)
            return _bytes_of(out_shape, np.result_type(*(o.dtype for o in ops)))
        raise KernelError(f"{name}: no output bound")

    return out_nbytes


def _projection_mismatch(
    precision: Any, name: str, what: str, got: np.ndarray, want: np.ndarray, scale: float, n: int
) -> str | None:
    """None when two projections agree within PROJECTION_SLACK x n x eps x ``scale`` (eps of
    ``precision``, the dtype the kernel computed in), else what differs."""
    import numpy as np

    eps, tiny = _eps_tiny(precision)
    if not math.isfinite(scale) or scale * n * PROJECTION_SLACK > float(np.finfo(precision).max) / 4:
        return None  # the identity's terms reach overflow: which order of the sums overflows decides, no judge
    with np.errstate(all="ignore"):
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
    tol = PROJECTION_SLACK * max(n, 1) * eps * scale + tiny
    if not err <= tol:  # NOTE: NaN is not <=: a NaN where the identity gives a number is wrong
        return f"{name}: {what} is off by {err:.3g}, more than rounding allows ({tol:.3g})"
    return None


def _norm2(a: np.ndarray) -> float:
    """A cheap bound of the 2-norm: the Frobenius norm (at least the 2-norm, within sqrt(rank) of it)."""
    import numpy as np

    with np.errstate(all="ignore"):
        return float(np.linalg.norm(a)) if a.size else 0.0


def _check_linalg(
    kernel: str, ops: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    """The projection checks of the decompositions (see the comment above)."""
    import numpy as np

    want_bytes = _bytes_of_linalg(kernel)(ops, params)
    got_bytes = sum(int(o.nbytes) for o in outputs)
    if kernel not in ("eig", "eigvals", "lstsq") and got_bytes != want_bytes:
        return f"{kernel}: outputs of {got_bytes} bytes, expected {want_bytes}"
    a = ops[0] if ops[0].dtype.kind in "fc" else ops[0].astype(np.float64)
    precision = np.result_type(a.dtype, np.float32)  # float32 and complex64 compute in single
    rng = np.random.default_rng(seed)
    n = max(a.shape) if a.ndim else 1
    for _ in range(max(1, rounds)):
        try:
            problem = _one_projection(precision, kernel, a, ops, params, outputs, rng, n)
        except OverflowError:
            return None  # a norm to the power n beyond floats: too near overflow to judge
        if problem is not None:
            return problem
    return None


def _one_projection(
    precision: Any,
    kernel: str,
    a: np.ndarray,
    ops: Operands,
    params: Params,
    out: tuple[np.ndarray, ...],
    rng: Any,
    n: int,
) -> str | None:
    import numpy as np

    norm_a = _norm2(a)
    with np.errstate(all="ignore"):
        if kernel == "svd":
            u, s, vh = out
            r = rng.standard_normal(vh.shape[1])
            k = s.shape[0]
            got = u[:, :k] @ (s * (vh[:k] @ r))
            problem = _projection_mismatch(
                precision, kernel, "U diag(S) Vh r against A r", got, a @ r, norm_a * _norm2(r), n
            )
            if problem is None:
                q = rng.standard_normal(u.shape[1])
                problem = _projection_mismatch(
                    precision, kernel, "U^H U r against r", u.conj().T @ (u @ q), q, _norm2(q), n
                )
            if problem is None and not np.all(np.diff(s) <= 0) or (s < 0).any():
                problem = f"{kernel}: singular values not in descending order or negative"
            return problem
        if kernel in ("eigh", "eig"):
            w, v = out
            m = _hermitian_part(a, params) if kernel == "eigh" else a
            r = rng.standard_normal(v.shape[1])
            got, want = m @ (v @ r), v @ (w * r)
            scale = _norm2(m) * _norm2(v) * _norm2(r)
            problem = _projection_mismatch(precision, kernel, "A V r against V diag(w) r", got, want, scale, n)
            if problem is None and kernel == "eigh":
                problem = _projection_mismatch(
                    precision, kernel, "V^H V r against r", v.conj().T @ (v @ r), r, _norm2(r), n
                )
            return problem
        if kernel in ("eigvalsh", "eigvals"):
            (w,) = out
            m = _hermitian_part(a, params) if kernel == "eigvalsh" else a
            if w.shape != (m.shape[0],):
                return f"{kernel}: {w.shape[0] if w.ndim else 0} eigenvalues for a {m.shape} matrix"
            scale = _norm2(m) * math.sqrt(max(n, 1))
            problem = _projection_mismatch(
                precision,
                kernel,
                "the sum of the eigenvalues against the trace",
                np.asarray(w.sum()),
                np.asarray(np.trace(m)),
                scale,
                n,
            )
            if problem is None:  # the sum of their squares: trace(A A) without the product (O(n^2))
                sq = np.asarray(np.sum(m * m.T))
                problem = _projection_mismatch(
                    precision,
                    kernel,
                    "the sum of their squares against trace(A^2)",
                    np.asarray((w * w).sum()),
                    sq,
                    _norm2(m) ** 2 * math.sqrt(max(n, 1)),
                    n,
                )
            return problem
        if kernel == "qr":
            q, r_ = out
            if np.any(np.tril(r_, -1)):
                return f"{kernel}: R is not upper triangular"
            r = rng.standard_normal(r_.shape[1])
            problem = _projection_mismatch(
                precision, kernel, "Q R r against A r", q @ (r_ @ r), a @ r, norm_a * _norm2(r), n
            )
            if problem is None:
                p = rng.standard_normal(q.shape[1])
                problem = _projection_mismatch(
                    precision, kernel, "Q^H Q r against r", q.conj().T @ (q @ p), p, _norm2(p), n
                )
            return problem
        if kernel == "cholesky":
            (lo,) = out
            if np.any(np.triu(lo, 1)):
                return f"{kernel}: L is not lower triangular"
            r = rng.standard_normal(lo.shape[1])
            m = _hermitian_part(a, {"UPLO": "L"})
            return _projection_mismatch(
                precision, kernel, "L L^H r against A r", lo @ (lo.conj().T @ r), m @ r, norm_a * _norm2(r), n
            )
        if kernel == "lstsq":
            x = out[0]
            b = ops[1] if ops[1].dtype.kind in "fc" else ops[1].astype(np.float64)
            if x.shape != (a.shape[1], *b.shape[1:]):
                return f"{kernel}: solution of shape {x.shape} for a {a.shape} matrix and a {b.shape} right-hand side"
            rank = int(out[2])
            if rank < min(a.shape):
                return None  # rank-deficient: numpy's minimum-norm solution is one of many; only recomputing judges it
            resid = a.conj().T @ (a @ x - b)
            scale = norm_a * (norm_a * _norm2(x) + _norm2(b))
            return _projection_mismatch(
                precision, kernel, "the normal equations' residual A^H (A x - b)", resid, np.zeros_like(resid), scale, n
            )
        if kernel == "pinv":
            (p,) = out
            r = rng.standard_normal(a.shape[1])
            got = a @ (p @ (a @ r))
            scale = norm_a * _norm2(p) * norm_a * _norm2(r)
            return _projection_mismatch(precision, kernel, "A P A r against A r", got, a @ r, scale, n)
        if kernel == "matrix_power":
            (out_,) = out
            power = int_param(kernel, params, "n", 1) or 0
            r = rng.standard_normal(a.shape[1])
            if power < 0:  # A^|n| applied to (A^n r) gives r back
                back = out_ @ r
                for _ in range(-power):
                    back = a @ back
                scale = norm_a ** (-power) * _norm2(out_) * _norm2(r)
                return _projection_mismatch(precision, kernel, "A^|n| (A^n r) against r", back, r, scale * -power, n)
            want = r.astype(np.result_type(a.dtype, np.float64))
            for _ in range(power):
                want = a @ want
            got = out_ @ r
            scale = norm_a ** max(power, 1) * _norm2(r)
            return _projection_mismatch(
                precision, kernel, "A^n r against n products with A", got, want, scale * max(power, 1), n
            )
    return None


def _hermitian_part(a: np.ndarray, params: Params) -> np.ndarray:
    """The Hermitian matrix eigh reads: its UPLO triangle, mirrored."""
    import numpy as np

    uplo = text_param("eigh", params, "UPLO", "L", ("L", "U")) if "UPLO" in params else "L"
    tri = np.tril(a) if uplo == "L" else np.triu(a)
    return tri + tri.conj().T - np.diag(np.diag(tri).real)


def _linalg_reference(fn: Callable[[Operands, Params], tuple[np.ndarray, ...]]) -> Callable[[Operands, Params], Any]:
    def reference(ops: Operands, params: Params) -> Any:
        outputs = fn(ops, params)
        return outputs[0] if len(outputs) == 1 else outputs

    return reference


def _sample_linalg(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]:
    def sample(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
        import numpy as np

        n = a.shape[0]
        if name in ("eigh", "eigvalsh", "cholesky"):
            return (a @ a.T + n * np.eye(n),), {}
        if name == "lstsq":
            return (a, v), {}
        if name == "matrix_power":
            return (a / max(1.0, float(np.abs(a).sum(axis=1).max())),), {"n": 3.0}
        if name == "einsum":
            return (a, b), {"subscripts": "ij,jk->ik"}
        return (a,), {}

    return sample


def _flops_of_power(operands: Operands, params: Params) -> float:
    n = operands[0].shape[0] if operands[0].ndim else 1
    return 2.0 * n**3 * max(1, int(math.log2(abs(int(params.get("n", 1.0) or 1)) + 1)))  # type: ignore[arg-type]


def _flops_of_einsum(operands: Operands, params: Params) -> float:
    return float(math.prod(max(1, a.size) for a in operands[:2]))


def _linalg_entry(
    name: str,
    fn: Callable[[Operands, Params], tuple[np.ndarray, ...]],
    doc: str,
    params: tuple[str, ...] = (),
    *,
    outputs: int = 1,
    arity: int = 1,
    checked: bool = True,
    verification: str = "projection",
    variadic: bool = False,
    unique: bool = True,
    flops: Callable[[Operands, Params], float] | None = None,
    stacks: bool = True,
) -> Kernel:
    """A numpy.linalg entry; ``stacks``: it takes a stack of matrices as numpy does (`_stacked`)."""
    entry = Kernel(
        name,
        arity,
        fn,
        doc,
        params,
        out_nbytes=_bytes_of_linalg(name),
        flops=flops or _flops_of_cubic,
        check=_check_linalg if checked else None,
        sample=_sample_linalg(name),
        reference=_linalg_reference(fn),
        verification=verification if checked else UNVERIFIED,
        exact=False,
        outputs=outputs,
        variadic=variadic,
        unique=unique,
    )
    return _stacked(entry) if stacks else entry


def _renamed(k: Kernel, name: str, doc: str) -> Kernel:
    """``k`` under numpy's name for it, its errors in that name ("inv: ...", not "inverse: ...")."""

    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        try:
            return k.fn(ops, params)
        except KernelError as exc:
            raise KernelError(str(exc).replace(f"{k.name}:", f"{name}:", 1)) from None

    return dataclasses.replace(k, name=name, doc=doc, fn=fn)


NUMPY_LINALG_KERNELS: tuple[Kernel, ...] = (
    _linalg_entry("svd", _k_svd, "singular value decomposition U, S, Vh", ("full_matrices",), outputs=3, unique=False),
    _linalg_entry(
        "eigh",
        _k_eigh,
        "eigenvalues and eigenvectors of a Hermitian matrix (its UPLO triangle)",
        ("UPLO",),
        outputs=2,
        unique=False,
    ),
    _linalg_entry(
        "eigvalsh", _k_eigvalsh, "eigenvalues of a Hermitian matrix, ascending", ("UPLO",), verification="trace"
    ),
    _linalg_entry("eig", _k_eig, "eigenvalues and right eigenvectors (complex)", outputs=2, unique=False),
    _linalg_entry("eigvals", _k_eigvals, "eigenvalues (complex)", verification="trace", unique=False),
    _linalg_entry("qr", _k_qr, "QR decomposition Q, R (mode reduced or complete)", ("mode",), outputs=2, unique=False),
    _linalg_entry("cholesky", _k_cholesky, "lower Cholesky factor L of a Hermitian positive-definite matrix"),
    _linalg_entry(
        "lstsq",
        _k_lstsq,
        "least squares x, residuals, rank, singular values",
        ("rcond",),
        outputs=4,
        arity=2,
        verification="residual",
        stacks=False,  # numpy's lstsq takes one matrix
    ),
    _linalg_entry("pinv", _k_pinv, "Moore-Penrose pseudo-inverse", ("rcond",)),
    _renamed(next(k for k in LINALG_KERNELS if k.name == "inverse"), "inv", "matrix inverse (stacks of matrices too)"),
    _linalg_entry("det", _k_det, "determinant", checked=False),
    _linalg_entry("slogdet", _k_slogdet, "sign and log of the absolute determinant", outputs=2, checked=False),
    _linalg_entry("matrix_rank", _k_matrix_rank, "rank by SVD (tol)", ("tol",), checked=False),
    _linalg_entry(
        "matrix_power",
        _k_matrix_power,
        "a ** n by repeated squaring (n < 0: of its inverse)",
        ("n",),
        flops=_flops_of_power,
    ),
    _linalg_entry(
        "norm",
        _k_norm,
        "matrix or vector norm (ord, axis, keepdims)",
        ("ord", "axis", "keepdims"),
        checked=False,
        flops=_flops_of_elements,
        stacks=False,  # its axis says which axes are the matrix
    ),
    _linalg_entry(
        "einsum",
        _k_einsum,
        "Einstein summation over explicit subscripts (letters, no '...')",
        ("subscripts",),
        variadic=True,
        checked=False,
        flops=_flops_of_einsum,
        stacks=False,
    ),
)


###############################################################################
# 8. Kernels: element-wise, reductions, shapes and fft
#
# numpy's element-wise operations, reductions (axis, keepdims), shape changes
# and fft under numpy's names, checked by recomputing them a slice at a time
# (O(n) work, like the kernel). The registry KERNELS is filled at the end of
# this room from every kernel room's tuple.
###############################################################################


def _broadcast(name: str, a: np.ndarray, b: np.ndarray) -> None:
    import numpy as np

    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise KernelError(f"{name}: shapes {a.shape} and {b.shape} do not match") from None


def _k_elementwise(op: str) -> Callable[[Sequence[np.ndarray], Params], tuple[np.ndarray, ...]]:
    def fn(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
        import numpy as np

        a, b = ops
        _broadcast(op, a, b)
        return ({"add": np.add, "subtract": np.subtract, "multiply": np.multiply}[op](a, b),)

    return fn


def _k_copy(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    return (ops[0].copy(order="C"),)


def _k_scale(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    (a,) = ops
    return (a * number_param("scale", params, "factor", 1.0),)


def _k_sum(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    (a,) = ops
    if "axis" in params:
        axis = float(_param("sum", params, "axis", float, "a whole number"))
        if not math.isfinite(axis) or axis != int(axis) or not -a.ndim <= int(axis) < a.ndim:
            raise KernelError(f"sum: axis {axis!r} is out of range for {a.ndim} dimensions")
        return (np.sum(a, axis=int(axis)),)
    return (np.asarray(np.sum(a)),)


def _k_dot(ops: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    a, b = ops
    _need_vectors(a, b)
    return (np.asarray(np.dot(a, b)),)


def _need_vectors(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise KernelError(f"dot: operands must be vectors of the same length, got shapes {a.shape} and {b.shape}")


def _elementwise_slices(
    kernel: str, operands: Sequence[np.ndarray], params: Params
) -> tuple[tuple[int, ...], Callable[[tuple[slice, ...]], np.ndarray], Callable[[tuple[slice, ...]], Any]]:
    """(result shape, numpy's result in a slice, its complex rounding allowance there) of an element-wise
    kernel, transpose or scale: views of the operands, nothing computed before a slice is asked for."""
    import numpy as np

    check_kernel_call(kernel, operands, params)
    if kernel == "transpose":
        t = operands[0].T
        return t.shape, lambda blk: t[blk], lambda blk: None
    if kernel == "scale":
        a, factor = operands[0], number_param("scale", params, "factor", 1.0)
        return a.shape, lambda blk: a[blk] * factor, lambda blk: np.abs(a[blk]) * abs(factor)
    _broadcast(kernel, operands[0], operands[1])
    shape = np.broadcast_shapes(operands[0].shape, operands[1].shape)
    a, b = (np.broadcast_to(x, shape) for x in operands)  # NOTE: views, stride 0 where broadcast
    op = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply}[kernel]
    return shape, lambda blk: op(a[blk], b[blk]), lambda blk: np.abs(a[blk]) * np.abs(b[blk])


def _check_elementwise(kernel: str, operands: Sequence[np.ndarray], params: Params, out: np.ndarray) -> str | None:
    """Recompute an element-wise result a slice at a time and compare it exactly (complex products
    within their FMA allowance); the message names the first wrong entry and counts them all."""
    import numpy as np

    shape, want_in, size_in = _elementwise_slices(kernel, operands, params)
    with np.errstate(all="ignore"):
        dtype = want_in(tuple(slice(0, 0) for _ in shape)).dtype  # nothing computed (0-d: its one entry)
    if out.shape != shape:
        return f"{kernel}: result shape {out.shape}, expected {shape}"
    if out.dtype != dtype:
        return f"{kernel}: result dtype {out.dtype}, expected {dtype}"
    complex_product = dtype.kind == "c" and kernel in ("multiply", "scale")
    eps, _ = _eps_tiny(dtype) if dtype.kind in "fc" else (0.0, 0.0)
    first: str | None = None
    wrong = 0
    for blk in _blocks(shape, CHECK_SLICE_ELEMENTS):
        with np.errstate(all="ignore"):
            got, want = out[blk], want_in(blk)
            tol = 4 * eps * size_in(blk) if complex_product else None  # a complex product, with or without FMA
            mask = _exact_mismatches(got, want, tol)
        count = int(mask.sum())
        if count and first is None:
            inner = np.unravel_index(int(np.argmax(mask)), mask.shape)
            index = tuple(int(i) + (s.start or 0) for i, s in zip(inner, blk, strict=True))
            where = f" at {list(index)}" if index else ""
            first = f"{kernel}: the result is wrong{where} (got {out[index]!r}, numpy gives {want[inner]!r}"
        wrong += count
    return None if first is None else f"{first}; {wrong} wrong entries)"


def _check_dot(operands: Sequence[np.ndarray], out: np.ndarray) -> str | None:
    """Check a dot a slice of the operands at a time: integers exactly (their sums wrap modulo
    2**bits in any order), floating point within the rounding bound of any order of its sum, from
    scaled slices. No magnitude array, cast or scaled copy as large as the operands."""
    import numpy as np

    check_kernel_call("dot", operands, {})
    a, b = operands
    _need_vectors(a, b)
    want = np.result_type(a.dtype, b.dtype)
    if out.shape != ():
        return f"dot: result shape {out.shape}, expected ()"
    if out.dtype != want:
        return f"dot: result dtype {out.dtype}, expected {want}"
    exact = want.kind not in "fc"
    a_exp, b_exp = (0, 0) if exact else (_scale_exponent(a, want), _scale_exponent(b, want))
    ref_s, mag_s, mag_sums = want.type(0), np.abs(np.zeros(0, want)).dtype.type(0), 0.0
    with np.errstate(all="ignore"):
        for start in range(0, a.size, step := max(1, CHECK_SLICE_ELEMENTS)):
            x, y = (v[start : start + step].astype(want, copy=False) for v in (a, b))
            if exact:
                ref_s += np.dot(x, y)  # NOTE: wraps as numpy's own sum does: the same number modulo 2**bits
                continue
            (a_s, a_mag), (b_s, b_mag) = _scaled_by(x, a_exp), _scaled_by(y, b_exp)
            ref_s += np.dot(a_s, b_s)  # partial sums: one more order of the same sum, within the bound
            mag_s += np.dot(a_mag, b_mag)
            mag_sums += float(a_mag.sum()) + float(b_mag.sum())
        if exact:
            return _first_wrong("dot", _exact_mismatches(out, np.asarray(ref_s)), out, np.asarray(ref_s))
        shift = a_exp + b_exp
        near = np.asarray(_ldexp(np.asarray(ref_s), shift))
    # what the scaling's underflow may change (see _check_matmul_exceptional)
    least = float(np.finfo(want).smallest_subnormal) if shift else 0.0
    bad = _sum_mismatches(out, np.asarray(ref_s), np.asarray(mag_s), shift, a.size, want, 2 * least * mag_sums)
    return _first_wrong("dot", bad, out, near)


def _check_recomputed(kernel: str, operands: Sequence[np.ndarray], params: Params, out: np.ndarray) -> str | None:
    """O(n) kernels, recomputed here: exact where numpy is exact, within the rounding bound of sum and dot.

    Element-wise kernels, transpose, scale and dot are read a slice at a time (CHECK_SLICE_ELEMENTS):
    a delegating node checks a worker's 1 GiB result without another 1 GiB of temporaries."""
    import numpy as np

    if kernel in ("add", "subtract", "multiply", "transpose", "scale"):
        return _check_elementwise(kernel, operands, params, out)
    if kernel == "dot":
        return _check_dot(operands, out)
    want = run_kernel(kernel, operands, params)[0]
    if out.shape != want.shape:
        return f"{kernel}: result shape {out.shape}, expected {want.shape}"
    if out.dtype != want.dtype:
        return f"{kernel}: result dtype {out.dtype}, expected {want.dtype}"
    if kernel == "sum" and want.dtype.kind in "fc":
        a = operands[0].astype(want.dtype, copy=False)
        a_s, a_mag, shift = _scaled(a)
        axis = int_param(kernel, params, "axis", None)
        with np.errstate(all="ignore"):
            ref_s, mag_s = np.asarray(np.sum(a_s, axis=axis)), np.asarray(np.sum(a_mag, axis=axis))
        terms = a.size if axis is None else a.shape[axis]
        # a lost entry changes the sum by at most `least`: the bound's floor covers it
        return _first_wrong(kernel, _sum_mismatches(out, ref_s, mag_s, shift, terms, want.dtype), out, want)
    return _first_wrong(kernel, _exact_mismatches(out, want), out, want)


def _bytes_of_broadcast(operands: Operands, params: Params) -> int:
    """add, subtract, multiply: numpy's result dtype over the broadcast shape."""
    import numpy as np

    a, b = operands
    return _bytes_of(np.broadcast_shapes(a.shape, b.shape), np.result_type(a.dtype, b.dtype))


def _bytes_of_transpose(operands: Operands, params: Params) -> int:
    return int(operands[0].nbytes)


def _bytes_of_scale(operands: Operands, params: Params) -> int:
    import numpy as np

    # NOTE: the factor as _k_scale takes it: a Python float is a weak scalar (float32 * 2.5 stays
    # float32, int32 * 2.5 is float64), so the dtype follows the same promotion as the kernel's
    (a,) = operands
    return _bytes_of(a.shape, np.result_type(a.dtype, params.get("factor", 1.0)))


def _bytes_of_dot(operands: Operands, params: Params) -> int:
    import numpy as np

    return int(np.result_type(operands[0].dtype, operands[1].dtype).itemsize)  # one number


def _bytes_of_sum(operands: Operands, params: Params) -> int:
    import numpy as np

    if not operands:
        return _bytes_of_operands(operands, params)
    shape = operands[0].shape
    itemsize = int(np.sum(np.zeros(0, operands[0].dtype)).itemsize)  # numpy's own rule: int32 sums to int64
    axis = params.get("axis")
    if not isinstance(axis, int | float) or not math.isfinite(axis) or not -len(shape) <= int(axis) < len(shape):
        return itemsize
    # NOTE: not the input's size: summing a (huge x 0) array over axis 1 gives `huge` zeros
    return math.prod(d for i, d in enumerate(shape) if i != int(axis) % len(shape)) * itemsize


def _verify_recomputed(
    name: str, operands: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    return _check_recomputed(name, operands, params, outputs[0])


def _sample_one(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (a,), {}


def _sample_transpose(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (a[:, : a.shape[0] // 2],), {}


def _sample_scale(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (a,), {"factor": 2.5}


def _sample_dot(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
    return (v, v[::-1].copy()), {}


def _ref_add(ops: Operands, params: Params) -> np.ndarray:
    return ops[0] + ops[1]


def _ref_subtract(ops: Operands, params: Params) -> np.ndarray:
    return ops[0] - ops[1]


def _ref_multiply(ops: Operands, params: Params) -> np.ndarray:
    return ops[0] * ops[1]


def _ref_copy(ops: Operands, params: Params) -> np.ndarray:
    return ops[0].copy()


def _ref_scale(ops: Operands, params: Params) -> np.ndarray:
    return ops[0] * params["factor"]


def _ref_sum(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.asarray(ops[0].sum(axis=int_param("sum", params, "axis", None)))


def _ref_dot(ops: Operands, params: Params) -> np.ndarray:
    import numpy as np

    return np.asarray(np.dot(ops[0], ops[1]))


# ---- numpy's O(n) kernels by family: element-wise, reductions, shapes (room 8 continues)
#
# Each family is a table of numpy functions; one builder makes each entry's run,
# output bound (from numpy's own dtype rule on a one-entry sample, and the shape
# rule of the family), cost, check, check inputs and reference. The checks
# recompute the result a slice of outputs at a time (O(n), like the kernel):
# exact where numpy is exact (integers, min/max, shapes, IEEE division), within
# a few units in the last place for numpy's transcendental functions (another
# libm may round them otherwise), within the rounding bound of any order of the
# sum for reductions that add (SUM_SLACK times terms times eps times the sum of
# the magnitudes).

ELEMENTWISE_ULPS = 4.0  # exp, log, sin ... of another libm: within a few ulps of numpy's own


# element-wise: name -> (numpy function, arity, exact)
ELEMENTWISE: dict[str, tuple[str, int, bool]] = {
    "divide": ("divide", 2, True),
    "power": ("power", 2, False),
    "maximum": ("maximum", 2, True),
    "minimum": ("minimum", 2, True),
    "exp": ("exp", 1, False),
    "log": ("log", 1, False),
    "sqrt": ("sqrt", 1, True),
    "abs": ("abs", 1, True),
    "sin": ("sin", 1, False),
    "cos": ("cos", 1, False),
    "tanh": ("tanh", 1, False),
}


def _elementwise_fn(name: str) -> Callable[[Operands, Params], tuple[np.ndarray, ...]]:
    path, _, _ = ELEMENTWISE[name]

    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        import numpy as np

        _broadcast_shape(name, ops)
        if name == "power" and all(a.dtype.kind == "i" for a in ops) and (ops[1] < 0).any():
            raise KernelError("power: Integers to negative integer powers are not allowed.")
        with _numpy_errors(name):
            return (np.asarray(_numpy_fn(path)(*ops)),)

    return fn


def _k_clip(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    low, high = _clip_bounds(params)
    return (np.asarray(np.clip(ops[0], low, high)),)


def _clip_bounds(params: Params) -> tuple[float | None, float | None]:
    low = number_param("clip", params, "a_min", math.nan) if "a_min" in params else None
    high = number_param("clip", params, "a_max", math.nan) if "a_max" in params else None
    if low is None and high is None:
        raise KernelError("clip: One of max or min must be given (a_min, a_max)")
    return low, high


def _k_where(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    _broadcast_shape("where", ops)
    return (np.asarray(np.where(ops[0] != 0, ops[1], ops[2])),)


def _elementwise_reference(name: str) -> Callable[[Operands, Params], Any]:
    def reference(ops: Operands, params: Params) -> Any:
        import numpy as np

        with np.errstate(all="ignore"):
            if name == "clip":
                return np.clip(ops[0], *_clip_bounds(params))
            if name == "where":
                return np.where(ops[0] != 0, ops[1], ops[2])
            return _numpy_fn(ELEMENTWISE[name][0])(*ops)

    return reference


def _bytes_of_elementwise(name: str) -> Callable[[Operands, Params], int]:
    def out_nbytes(ops: Operands, params: Params) -> int:
        import numpy as np

        shape = _broadcast_shape(name, ops)
        if name == "clip":
            dtype = np.asarray(np.clip(np.ones(1, ops[0].dtype), *_clip_bounds(params))).dtype
        elif name == "where":
            dtype = np.result_type(ops[1].dtype, ops[2].dtype)
        else:
            dtype = _dtype_of(ELEMENTWISE[name][0], ops)
        return _bytes_of(shape, dtype)

    return out_nbytes


def _check_by_slices(name: str, exact: bool) -> Callable[..., str | None]:
    """A check that recomputes an element-wise or shape result a slice of outputs at a time."""

    def check(
        kernel: str, ops: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
    ) -> str | None:
        import numpy as np

        (out,) = outputs
        want = KERNELS[kernel].reference(ops, params)
        want = np.asarray(want)
        if out.shape != want.shape:
            return f"{kernel}: result shape {out.shape}, expected {want.shape}"
        if out.dtype != want.dtype:
            return f"{kernel}: result dtype {out.dtype}, expected {want.dtype}"
        eps, _ = _eps_tiny(want.dtype) if want.dtype.kind in "fc" else (0.0, 0.0)
        first: str | None = None
        wrong = 0
        for blk in _blocks(want.shape, CHECK_SLICE_ELEMENTS):
            with np.errstate(all="ignore"):
                got, ref = out[blk], want[blk]
                tol = None if exact or not eps else ELEMENTWISE_ULPS * eps * np.abs(ref)
                mask = _exact_mismatches(got, ref, tol)
            count = int(mask.sum())
            if count and first is None:
                inner = np.unravel_index(int(np.argmax(mask)), mask.shape)
                index = tuple(int(i) + (b.start or 0) for i, b in zip(inner, blk, strict=True))
                where = f" at {list(index)}" if index else ""
                first = f"{kernel}: the result is wrong{where} (got {out[index]!r}, numpy gives {want[index]!r}"
            wrong += count
        return None if first is None else f"{first}; {wrong} wrong entries)"

    return check


def _sample_elementwise(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]:
    def sample(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
        import numpy as np

        if name == "clip":
            return (a,), {"a_min": 0.25, "a_max": 0.75}
        if name == "where":
            return (a - 0.5, a, b), {}
        if name in ("log", "sqrt"):
            return (np.abs(a) + 0.5,), {}
        if ELEMENTWISE[name][1] == 2:
            return (a, np.abs(b) + 0.5 if name in ("divide", "power") else b), {}
        return (a,), {}

    return sample


def _elementwise_entry(name: str, doc: str) -> Kernel:
    arity = {"clip": 1, "where": 3}.get(name) or ELEMENTWISE[name][1]
    exact = name in ("clip", "where") or ELEMENTWISE[name][2]
    return Kernel(
        name,
        arity,
        _k_clip if name == "clip" else _k_where if name == "where" else _elementwise_fn(name),
        doc,
        ("a_min", "a_max") if name == "clip" else (),
        out_nbytes=_bytes_of_elementwise(name),
        flops=_flops_of_elements,
        check=_check_by_slices(name, exact),
        sample=_sample_elementwise(name),
        reference=_elementwise_reference(name),
        verification="recompute",
        exact=exact,
    )


# ---- reductions: name -> (numpy function, params beyond axis and keepdims, adds terms)
REDUCTIONS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "prod": ("prod", (), True),
    "mean": ("mean", (), True),
    "std": ("std", ("ddof",), True),
    "var": ("var", ("ddof",), True),
    "min": ("min", (), False),
    "max": ("max", (), False),
    "argmin": ("argmin", (), False),
    "argmax": ("argmax", (), False),
    "cumsum": ("cumsum", (), True),
}


def _reduction_args(name: str, a: np.ndarray, params: Params) -> dict[str, Any]:
    """numpy's keyword arguments of a reduction from its params (KernelError for bad ones)."""
    axes = axis_param(name, params, max(a.ndim, 1))
    kwargs: dict[str, Any] = {}
    if name in ("argmin", "argmax", "cumsum"):
        if axes is not None and len(axes) != 1:
            raise KernelError(f"{name}: axis must be one integer, got {axes}")
        kwargs["axis"] = None if axes is None else axes[0]
    else:
        kwargs["axis"] = axes
    if name != "cumsum":
        keep = number_param(name, params, "keepdims", 0.0)
        if keep not in (0.0, 1.0):
            raise KernelError(f"{name}: keepdims must be true or false, got {keep!r}")
        if keep:
            kwargs["keepdims"] = True
    if name in ("std", "var"):
        ddof = number_param(name, params, "ddof", 0.0)
        if not math.isfinite(ddof) or ddof < 0:
            raise KernelError(f"{name}: ddof must be a finite number, 0 or more, got {ddof!r}")
        kwargs["ddof"] = ddof
    if a.ndim == 0 and kwargs.get("axis") not in (None, (0,), 0):
        raise KernelError(f"{name}: axis is out of bounds for array of dimension 0")
    if a.ndim == 0 and kwargs.get("axis") is not None:
        kwargs["axis"] = None
    return kwargs


def _reduce(name: str, a: np.ndarray, params: Params) -> np.ndarray:
    import numpy as np

    kwargs = _reduction_args(name, a, params)
    if a.size == 0 and name in ("min", "max", "argmin", "argmax"):
        axis = kwargs.get("axis")
        axes = range(a.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
        if any(a.shape[i] == 0 for i in axes):
            raise KernelError(f"{name}: zero-size array to reduction operation {name} which has no identity")
    with np.errstate(all="ignore"), _numpy_errors(name):
        return np.asarray(_numpy_fn(REDUCTIONS[name][0])(a, **kwargs))


def _reduction_fn(name: str) -> Callable[[Operands, Params], tuple[np.ndarray, ...]]:
    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        return (_reduce(name, ops[0], params),)

    return fn


def _reduction_reference(name: str) -> Callable[[Operands, Params], Any]:
    def reference(ops: Operands, params: Params) -> Any:
        return _reduce(name, ops[0], params)

    return reference


def _bytes_of_reduction(name: str) -> Callable[[Operands, Params], int]:
    def out_nbytes(ops: Operands, params: Params) -> int:
        import numpy as np

        (a,) = ops
        kwargs = _reduction_args(name, a, params)
        one = np.ones((1,) * a.ndim, a.dtype)
        with np.errstate(all="ignore"):
            dtype = np.asarray(_numpy_fn(REDUCTIONS[name][0])(one, **kwargs)).dtype
        axis = kwargs.get("axis")
        if name == "cumsum":
            return _bytes_of((a.size,) if axis is None else a.shape, dtype)
        axes = set(range(a.ndim)) if axis is None else {axis} if isinstance(axis, int) else set(axis)
        keep = kwargs.get("keepdims", False)
        shape = [1 if i in axes else d for i, d in enumerate(a.shape) if keep or i not in axes]
        return _bytes_of(shape, dtype)

    return out_nbytes


def _check_reduction(
    kernel: str, ops: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    """Recompute a reduction: exact for integers, min, max, argmin and argmax; for one that adds,
    within SUM_SLACK x terms x eps x the same reduction of the magnitudes (any order of the sum)."""
    import numpy as np

    (out,) = outputs
    (a,) = ops
    want = _reduce(kernel, a, params)
    if out.shape != want.shape or out.dtype != want.dtype:
        return f"{kernel}: result {out.dtype}{list(out.shape)}, expected {want.dtype}{list(want.shape)}"
    if want.dtype.kind not in "fc" or not REDUCTIONS[kernel][2]:
        return _first_wrong(kernel, _exact_mismatches(out, want), out, want)
    eps, _ = _eps_tiny(want.dtype)
    kwargs = _reduction_args(kernel, a, params)
    axis = kwargs.get("axis")
    terms = a.size if axis is None else a.shape[axis] if isinstance(axis, int) else math.prod(a.shape[i] for i in axis)
    with np.errstate(all="ignore"):
        mag = np.abs(a).astype(np.abs(want).dtype, copy=False)
        if kernel == "prod":
            bound = np.abs(want) * (terms + 1)
        elif kernel in ("std", "var"):
            centred = np.abs(a - np.mean(a, axis=axis, keepdims=True)) ** 2
            bound = np.sum(centred, axis=axis, keepdims=kwargs.get("keepdims", False)) / max(1, terms)
            bound = bound + np.abs(np.mean(mag, axis=axis, keepdims=kwargs.get("keepdims", False))) ** 2
            if kernel == "std":
                bound = np.sqrt(bound)
            bound = bound * (terms + 1)
        elif kernel == "cumsum":
            bound = np.cumsum(mag, axis=axis)
        else:  # mean
            bound = np.mean(mag, axis=axis, keepdims=kwargs.get("keepdims", False))
        tol = SUM_SLACK * (terms + 2) * eps * np.asarray(bound)
    return _first_wrong(kernel, _exact_mismatches(out, want, tol), out, want)


def _sample_reduction(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]:
    def sample(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
        return (a,), ({"axis": 0.0} if name not in ("prod",) else {"axis": 1.0})

    return sample


def _reduction_entry(name: str, doc: str) -> Kernel:
    _, extra, adds = REDUCTIONS[name]
    params = ("axis",) + (() if name == "cumsum" else ("keepdims",)) + extra
    return Kernel(
        name,
        1,
        _reduction_fn(name),
        doc,
        params,
        out_nbytes=_bytes_of_reduction(name),
        flops=_flops_of_elements,
        check=_check_reduction,
        sample=_sample_reduction(name),
        reference=_reduction_reference(name),
        verification="recompute",
        exact=not adds,
    )


# ---- shapes: transpose with axes, reshape, concatenate, stack, slice (copy and transpose are above)


def _k_transpose_axes(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    (a,) = ops
    axes = ints_param("transpose", params, "axes", None)
    if axes is not None:
        if sorted(a % max(1, a_nd) if -a_nd <= a < a_nd else -999 for a, a_nd in ((x, a.ndim) for x in axes)) != list(
            range(a.ndim)
        ):
            raise KernelError(f"transpose: axes {axes} don't match array of dimension {a.ndim}")
        return (np.array(np.transpose(a, axes), order="C"),)
    return (np.array(a.T, order="C"),)


def _reshape_target(a: np.ndarray, params: Params) -> tuple[int, ...]:
    if ("shape" in params) == ("newshape" in params):
        raise KernelError("reshape: give the new shape as shape (numpy's name; newshape is its old one)")
    shape = ints_param("reshape", params, "shape" if "shape" in params else "newshape", None)
    assert shape is not None
    if sum(d == -1 for d in shape) > 1 or any(d < -1 for d in shape):
        raise KernelError(f"reshape: can only specify one unknown dimension (-1), got {shape}")
    known = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if known == 0 or a.size % known:
            raise KernelError(f"reshape: cannot reshape array of size {a.size} into shape {shape}")
        shape = tuple(a.size // known if d == -1 else d for d in shape)
    if math.prod(shape) != a.size:
        raise KernelError(f"reshape: cannot reshape array of size {a.size} into shape {shape}")
    if len(shape) > MAX_NDIM:
        raise KernelError(f"reshape: at most {MAX_NDIM} dimensions, got {len(shape)}")
    return shape


def _k_reshape(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    return (np.array(ops[0], order="C").reshape(_reshape_target(ops[0], params)),)


def _joined(name: str, ops: Operands, params: Params) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of concatenate or stack of the operands; KernelError in numpy's words."""
    import numpy as np

    axis = int_param(name, params, "axis", 0)
    assert axis is not None
    first = ops[0].shape
    ndim = len(first) + (name == "stack")
    if not -ndim <= axis < ndim or (name == "concatenate" and not first):
        raise KernelError(f"{name}: axis {axis} is out of bounds for array of dimension {ndim}")
    axis %= ndim
    for i, a in enumerate(ops):
        if name == "stack" and a.shape != first:
            raise KernelError(f"{name}: all input arrays must have the same shape (operand {i} is {a.shape})")
        if name == "concatenate" and (
            a.ndim != len(first) or a.shape[:axis] + a.shape[axis + 1 :] != first[:axis] + first[axis + 1 :]
        ):
            raise KernelError(
                f"{name}: all the input array dimensions except for the concatenation axis must match exactly "
                f"(operand 0 is {first}, operand {i} is {a.shape})"
            )
    dtype = np.result_type(*(a.dtype for a in ops))
    if name == "stack":
        return first[:axis] + (len(ops),) + first[axis:], dtype
    return first[:axis] + (sum(a.shape[axis] for a in ops),) + first[axis + 1 :], dtype


def _join_fn(name: str) -> Callable[[Operands, Params], tuple[np.ndarray, ...]]:
    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        import numpy as np

        _joined(name, ops, params)
        axis = int_param(name, params, "axis", 0)
        return (np.asarray(_numpy_fn(name)(list(ops), axis=axis)),)

    return fn


def _slice_keys(a: np.ndarray, params: Params) -> tuple[slice, ...]:
    """The ranges of "slice": start, stop and step per axis (as many as given; the rest whole)."""
    start = ints_param("slice", params, "start", ()) or ()
    stop = ints_param("slice", params, "stop", ()) or ()
    step = ints_param("slice", params, "step", ()) or ()
    n = max(len(start), len(stop), len(step))
    if n > a.ndim:
        raise KernelError(f"slice: too many indices for array: array is {a.ndim}-dimensional, but {n} were indexed")
    keys = []
    for axis in range(n):
        st = step[axis] if axis < len(step) else 1
        if st == 0:
            raise KernelError("slice: slice step cannot be zero")
        b = start[axis] if axis < len(start) else None
        e = stop[axis] if axis < len(stop) else None
        keys.append(slice(b, e, st))
    return tuple(keys)


def _k_slice(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
    import numpy as np

    return (np.array(ops[0][_slice_keys(ops[0], params)], order="C"),)


def _shape_reference(name: str) -> Callable[[Operands, Params], Any]:
    def reference(ops: Operands, params: Params) -> Any:
        import numpy as np

        if name == "transpose":
            axes = ints_param(name, params, "axes", None)
            return np.transpose(ops[0], axes)
        if name == "reshape":
            return np.reshape(ops[0], _reshape_target(ops[0], params))
        if name in ("concatenate", "stack"):
            return _numpy_fn(name)(list(ops), axis=int_param(name, params, "axis", 0))
        return ops[0][_slice_keys(ops[0], params)]

    return reference


def _bytes_of_shape(name: str) -> Callable[[Operands, Params], int]:
    def out_nbytes(ops: Operands, params: Params) -> int:
        if name in ("concatenate", "stack"):
            shape, dtype = _joined(name, ops, params)
            return _bytes_of(shape, dtype)
        if name == "slice":
            a = ops[0]
            keys = _slice_keys(a, params)
            dims = [len(range(*k.indices(a.shape[i]))) for i, k in enumerate(keys)] + list(a.shape[len(keys) :])
            return _bytes_of(dims, a.dtype)
        return int(ops[0].nbytes)

    return out_nbytes


def _sample_shape(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]:
    def sample(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
        if name == "transpose":
            return (a[:, : a.shape[0] // 2],), {}
        if name == "reshape":
            return (a,), {"shape": (-1,)}
        if name in ("concatenate", "stack"):
            return (a, b), {"axis": 1.0}
        return (a,), {"start": (1, 0), "stop": (a.shape[0] - 1, a.shape[1]), "step": (2, 3)}

    return sample


def _shape_entry(name: str, doc: str, params: tuple[str, ...], arity: int = 1, variadic: bool = False) -> Kernel:
    fn = {"transpose": _k_transpose_axes, "reshape": _k_reshape, "slice": _k_slice}.get(name) or _join_fn(name)
    return Kernel(
        name,
        arity,
        fn,
        doc,
        params,
        out_nbytes=_bytes_of_shape(name),
        flops=_flops_of_elements,
        check=_check_by_slices(name, True),
        sample=_sample_shape(name),
        reference=_shape_reference(name),
        verification="recompute",
        variadic=variadic,
    )


# ---- numpy.fft: checked on sampled output entries, each a direct DFT sum of the (cropped or padded)
# input along the transformed axes, within the rounding bound of that sum
FFT_SAMPLES = 8  # output entries a check computes directly, per round
FFT_SLACK = 8.0  # an FFT's error grows like log n eps |x|; the direct sum's like n eps sum|x|: both under this
FFT_KERNELS: dict[str, tuple[bool, bool, bool]] = {
    # name: (inverse, real (rfft/irfft), several axes)
    "fft": (False, False, False),
    "ifft": (True, False, False),
    "rfft": (False, True, False),
    "irfft": (True, True, False),
    "fft2": (False, False, True),
    "ifft2": (True, False, True),
    "fftn": (False, False, True),
    "ifftn": (True, False, True),
}


def _fft_args(name: str, a: np.ndarray, params: Params) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """The (axes, sizes along them, norm) of an fft call, as numpy would take them."""
    _, real, several = FFT_KERNELS[name]
    norm = text_param(name, params, "norm", "backward", ("backward", "ortho", "forward"))
    if a.ndim == 0:
        raise KernelError(f"{name}: the input must have at least one dimension")
    if several:
        axes = ints_param(name, params, "axes", None)
        sizes = ints_param(name, params, "s", None)
        if axes is None:
            axes = tuple(range(a.ndim))[-2:] if name.endswith("2") else tuple(range(a.ndim))
            if sizes is not None and name.endswith("n"):
                axes = tuple(range(a.ndim))[-len(sizes) :]
        if sizes is not None and len(sizes) != len(axes):
            raise KernelError(f"{name}: s and axes must have the same length, got {sizes} and {axes}")
    else:
        axis = int_param(name, params, "axis", -1)
        assert axis is not None
        axes = (axis,)
        n = int_param(name, params, "n", None)
        sizes = None if n is None else (n,)
    norm_axes = []
    for axis in axes:
        if not -a.ndim <= axis < a.ndim:
            raise KernelError(f"{name}: axis {axis} is out of bounds for array of dimension {a.ndim}")
        norm_axes.append(axis % a.ndim)
    if len(set(norm_axes)) != len(norm_axes):
        raise KernelError(f"{name}: repeated axis in axes {tuple(axes)}")
    if sizes is None:
        sizes = tuple(a.shape[x] for x in norm_axes)
        if name == "irfft":
            sizes = (2 * (a.shape[norm_axes[0]] - 1),)
    for n in sizes:
        if n < 1:
            raise KernelError(f"{name}: Invalid number of FFT data points ({n}) specified.")
    return tuple(norm_axes), tuple(sizes), norm


def _fft_call(name: str, a: np.ndarray, params: Params) -> np.ndarray:
    import numpy as np

    axes, sizes, norm = _fft_args(name, a, params)
    if name == "rfft" and a.dtype.kind == "c":
        raise KernelError("rfft: the input must be real (fft takes complex input)")
    fn = _numpy_fn(f"fft.{name}")
    with np.errstate(all="ignore"), _numpy_errors(name):
        if FFT_KERNELS[name][2]:
            return np.asarray(fn(a, s=sizes, axes=axes, norm=norm))
        return np.asarray(fn(a, n=sizes[0], axis=axes[0], norm=norm))


def _fft_fn(name: str) -> Callable[[Operands, Params], tuple[np.ndarray, ...]]:
    def fn(ops: Operands, params: Params) -> tuple[np.ndarray, ...]:
        return (_fft_call(name, ops[0], params),)

    return fn


def _fft_reference(name: str) -> Callable[[Operands, Params], Any]:
    def reference(ops: Operands, params: Params) -> Any:
        return _fft_call(name, ops[0], params)

    return reference


def _fft_shape_dtype(name: str, a: np.ndarray, params: Params) -> tuple[list[int], np.dtype]:
    import numpy as np

    axes, sizes, _ = _fft_args(name, a, params)
    shape = list(a.shape)
    for axis, n in zip(axes, sizes, strict=True):
        shape[axis] = n // 2 + 1 if name == "rfft" else n
    one = np.ones((2,) * a.ndim, a.dtype)
    small = dict(params)
    small.pop("s", None)
    small.pop("n", None)
    dtype = _fft_call(name, one, small).dtype
    return shape, dtype


def _bytes_of_fft(name: str) -> Callable[[Operands, Params], int]:
    def out_nbytes(ops: Operands, params: Params) -> int:
        shape, dtype = _fft_shape_dtype(name, ops[0], params)
        return _bytes_of(shape, dtype)

    return out_nbytes


def _fft_input(name: str, a: np.ndarray, axes: tuple[int, ...], sizes: tuple[int, ...]) -> np.ndarray:
    """The input as the transform reads it: cropped or zero-padded to the sizes along the axes
    (irfft: its half spectrum to n // 2 + 1 entries)."""
    import numpy as np

    x = np.asarray(a, dtype=np.complex128)
    for axis, n in zip(axes, sizes, strict=True):
        m = n // 2 + 1 if name == "irfft" else n
        if x.shape[axis] > m:
            x = np.take(x, np.arange(m), axis=axis)
        elif x.shape[axis] < m:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, m - x.shape[axis])
            x = np.pad(x, pad)
    return x


def _check_fft(
    kernel: str, ops: Operands, params: Params, outputs: tuple[np.ndarray, ...], seed: int, rounds: int
) -> str | None:
    """Compute FFT_SAMPLES x rounds output entries directly, each a DFT sum over the transformed
    axes (irfft: with the half spectrum's Hermitian extension), and compare within the bound of
    that sum: FFT_SLACK x terms x eps x the sum of the terms' magnitudes."""
    import numpy as np

    (out,) = outputs
    (a,) = ops
    inverse, _, _ = FFT_KERNELS[kernel]
    axes, sizes, norm = _fft_args(kernel, a, params)
    shape, dtype = _fft_shape_dtype(kernel, a, params)
    if list(out.shape) != shape or out.dtype != dtype:
        return f"{kernel}: result {out.dtype}{list(out.shape)}, expected {dtype}{shape}"
    if not out.size:
        return None
    x = _fft_input(kernel, a, axes, sizes)
    total = math.prod(sizes)
    problem = _fft_energy(kernel, x, out, axes, sizes, norm)
    if problem is not None:
        return problem
    scale = {
        "backward": 1.0 / total if inverse else 1.0,
        "ortho": 1.0 / math.sqrt(total),
        "forward": 1.0 if inverse else 1.0 / total,
    }[norm]
    sign = 1.0 if inverse else -1.0
    eps, tiny = _eps_tiny(dtype)
    rng = np.random.default_rng(seed)
    for _ in range(FFT_SAMPLES * max(1, rounds)):
        index = tuple(int(rng.integers(0, d)) for d in out.shape)
        part = x[tuple(slice(None) if i in axes else index[i] for i in range(x.ndim))]
        kept = [i for i in range(x.ndim) if i in axes]  # the axes left in `part`, in order
        terms = part
        for j, axis in enumerate(kept):
            n = sizes[axes.index(axis)]
            k = index[axis]
            m = terms.shape[j]
            if kernel == "irfft":  # the full spectrum's sum over its n entries, from the half
                coef = np.exp(sign * 2j * np.pi * k * np.arange(m) / n)
                weight = np.full(m, 2.0)
                weight[0] = 1.0
                if n % 2 == 0:
                    weight[-1] = 1.0
                vals = terms.copy()
                vals[..., 0] = vals[..., 0].real
                if n % 2 == 0:
                    vals[..., -1] = vals[..., -1].real
                terms = (vals * coef * weight).real.astype(np.complex128)
            else:
                coef = np.exp(sign * 2j * np.pi * k * np.arange(m) / n)
                shape_c = [1] * terms.ndim
                shape_c[j] = m
                terms = terms * coef.reshape(shape_c)
        with np.errstate(all="ignore"):
            mag = float(np.abs(terms).sum())
            if not mag * (total + 2) < float(np.finfo(dtype).max) / 16:
                continue  # inf or NaN in it, or so near overflow that the order of the sum decides: no judge
            want = complex(terms.sum()) * scale
            mag *= abs(scale)
        got = complex(out[index])
        if not abs(got - want) <= FFT_SLACK * (total + 2) * eps * mag + tiny:
            return f"{kernel}: the result is wrong at {list(index)} (got {got!r}, the DFT sum gives {want!r})"
    return None


def _half_weights(m: int, n: int) -> np.ndarray:
    """The weights of a half spectrum's entries in the full one's sum of squares (rfft, irfft)."""
    import numpy as np

    w = np.full(m, 2.0)
    w[0] = 1.0
    if n % 2 == 0 and m > 1:
        w[-1] = 1.0
    return w


def _fft_energy(
    kernel: str, x: np.ndarray, out: np.ndarray, axes: tuple[int, ...], sizes: tuple[int, ...], norm: str
) -> str | None:
    """Parseval's identity, O(n): the sum of squares of the output against the input's, scaled by
    the norm; it catches a result wrong anywhere by more than the rounding of the two sums."""
    import numpy as np

    inverse = FFT_KERNELS[kernel][0]
    total = math.prod(sizes)
    with np.errstate(all="ignore"):
        if kernel == "irfft":
            half = np.moveaxis(x, axes[0], -1).copy()
            half[..., 0] = half[..., 0].real
            if sizes[0] % 2 == 0:
                half[..., -1] = half[..., -1].real
            e_in = float((np.abs(half) ** 2 * _half_weights(half.shape[-1], sizes[0])).sum())
        else:
            e_in = float((np.abs(x) ** 2).sum())
        if kernel == "rfft":
            moved = np.moveaxis(np.abs(out.astype(np.complex128)) ** 2, axes[0], -1)
            e_out = float((moved * _half_weights(moved.shape[-1], sizes[0])).sum())
        else:
            e_out = float((np.abs(out.astype(np.complex128)) ** 2).sum())
    factor = {"backward": 1.0 / total if inverse else float(total), "ortho": 1.0}.get(
        norm, float(total) if inverse else 1.0 / total
    )
    want = e_in * factor
    if not (math.isfinite(want) and math.isfinite(e_out)):
        return None  # inf or NaN in the input: the sampled entries judge it
    eps, tiny = _eps_tiny(out.dtype)
    if abs(e_out - want) > FFT_SLACK * 8 * (math.log2(total) + 2) * eps * max(e_out, want) + tiny:
        return f"{kernel}: the result's sum of squares is {e_out!r}, Parseval's identity gives {want!r}"
    return None


def _sample_fft(name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], CheckInputs]:
    def sample(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> CheckInputs:
        return ((a + 1j * b) if name not in ("rfft",) else a,), {}

    return sample


def _fft_entry(name: str, doc: str) -> Kernel:
    several = FFT_KERNELS[name][2]
    return Kernel(
        name,
        1,
        _fft_fn(name),
        doc,
        ("s", "axes", "norm") if several else ("n", "axis", "norm"),
        out_nbytes=_bytes_of_fft(name),
        flops=_flops_of_fft,
        check=_check_fft,
        sample=_sample_fft(name),
        reference=_fft_reference(name),
        verification="sampled",
        exact=False,
    )


def _flops_of_fft(operands: Operands, params: Params) -> float:
    n = max(2, operands[0].size)
    return 5.0 * n * math.log2(n)


NUMPY_ARRAY_KERNELS: tuple[Kernel, ...] = (
    *(
        _elementwise_entry(name, doc)
        for name, doc in (
            ("divide", "a / b (true division), broadcasting"),
            ("power", "a ** b, broadcasting"),
            ("maximum", "element-wise maximum of a and b (NaN wins)"),
            ("minimum", "element-wise minimum of a and b (NaN wins)"),
            ("exp", "e ** a"),
            ("log", "natural logarithm"),
            ("sqrt", "square root"),
            ("abs", "absolute value (complex: its modulus)"),
            ("sin", "sine"),
            ("cos", "cosine"),
            ("tanh", "hyperbolic tangent"),
            ("clip", "a limited to [a_min, a_max]"),
            ("where", "x where condition is nonzero, else y (operands: condition, x, y)"),
        )
    ),
    *(
        _reduction_entry(name, doc)
        for name, doc in (
            ("prod", "product over axis (all axes when absent)"),
            ("mean", "mean over axis"),
            ("std", "standard deviation over axis (ddof)"),
            ("var", "variance over axis (ddof)"),
            ("min", "minimum over axis"),
            ("max", "maximum over axis"),
            ("argmin", "index of the minimum (over the flattened array when axis is absent)"),
            ("argmax", "index of the maximum"),
            ("cumsum", "cumulative sum along axis (of the flattened array when absent)"),
        )
    ),
    _shape_entry("reshape", "a in another shape (one -1 allowed), C order", ("shape", "newshape")),
    _shape_entry("concatenate", "the operands joined along axis", ("axis",), 1, True),
    _shape_entry("stack", "the operands stacked along a new axis", ("axis",), 1, True),
    _shape_entry("slice", "a[start:stop:step] per axis (ranges)", ("start", "stop", "step")),
    *(
        _fft_entry(name, doc)
        for name, doc in (
            ("fft", "discrete Fourier transform along axis (numpy.fft.fft)"),
            ("ifft", "inverse DFT along axis"),
            ("rfft", "DFT of real input, the half spectrum"),
            ("irfft", "inverse of rfft: real output of n points"),
            ("fft2", "2-D DFT over axes (default the last two)"),
            ("ifft2", "inverse 2-D DFT"),
            ("fftn", "N-D DFT over axes (default all)"),
            ("ifftn", "inverse N-D DFT"),
        )
    ),
)


ARRAY_KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "add",
        2,
        _k_elementwise("add"),
        "element-wise a + b",
        out_nbytes=_bytes_of_broadcast,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_two,
        reference=_ref_add,
    ),
    Kernel(
        "subtract",
        2,
        _k_elementwise("subtract"),
        "element-wise a - b",
        out_nbytes=_bytes_of_broadcast,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_two,
        reference=_ref_subtract,
    ),
    Kernel(
        "multiply",
        2,
        _k_elementwise("multiply"),
        "element-wise a * b",
        out_nbytes=_bytes_of_broadcast,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_two,
        reference=_ref_multiply,
    ),
    Kernel(
        "transpose",
        1,
        _k_transpose_axes,
        "a with its axes permuted (axes; default reversed: a.T)",
        ("axes",),
        out_nbytes=_bytes_of_transpose,
        flops=_flops_of_elements,
        check=_check_by_slices("transpose", True),
        sample=_sample_transpose,
        reference=_shape_reference("transpose"),
    ),
    Kernel(
        "scale",
        1,
        _k_scale,
        "a * factor",
        ("factor",),
        out_nbytes=_bytes_of_scale,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_scale,
        reference=_ref_scale,
    ),
    Kernel(
        "sum",
        1,
        _k_sum,
        "sum of all elements, or along axis",
        ("axis",),
        out_nbytes=_bytes_of_sum,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_one,
        reference=_ref_sum,
        exact=False,
    ),
    Kernel(
        "dot",
        2,
        _k_dot,
        "dot product of two vectors",
        out_nbytes=_bytes_of_dot,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_dot,
        reference=_ref_dot,
        exact=False,
    ),
    Kernel(
        "copy",
        1,
        _k_copy,
        "a copy of a (how put and get move a remote array)",
        out_nbytes=_bytes_of_transpose,
        flops=_flops_of_elements,
        check=_verify_recomputed,
        sample=_sample_one,
        reference=_ref_copy,
    ),
)

# The registry: every kernel room's entries, by name (KERNELS is declared in room 6, empty).
KERNELS.update(
    (k.name, k) for k in (*BASIC_KERNELS, *LINALG_KERNELS, *NUMPY_LINALG_KERNELS, *ARRAY_KERNELS, *NUMPY_ARRAY_KERNELS)
)


###############################################################################
# 9. Scheduler (sans-I/O)
#
# Decides where each task runs and what happens when an attempt fails. It
# never awaits, reads a clock or touches a socket: `handle(event, now)` takes
# one event and returns a list of actions for the I/O layer to perform.
# Workers are peer ids, plus LOCAL for this node. A task is tried on the
# placement asked for, then on other workers, then locally, at most
# `max_attempts` times; a result of an attempt that is no longer current is
# dropped (counted), never delivered twice.
#
# A worker whose result failed verification becomes suspect: no task is placed
# on it (unless it is named), and a local run that happens because no remote
# worker is usable records why (`AttemptRecord.reason`), or fails when the
# task asked for no fallback. After a back-off (SUSPECT_BACKOFF_S, doubled by
# each failed canary, capped) a tick emits `Probe`: the I/O layer sends a canary
# task with a known answer and reports a `ProbeDoneEvent`. A passing canary puts
# the worker on probation (used, but weighted down); PROBATION_GOOD_RESULTS
# verified results clear it. The state survives a disconnect, and a suspect
# worker that reconnects is reported (`Report`), never silently trusted again.
###############################################################################

PLACEMENTS = ("auto", "local", "remote")  # or a peer id
SPLIT_PLACEMENTS = ("split", "split-remote")  # a task in row blocks over every worker (RPC and `call`)
EWMA_ALPHA = 0.3  # weight of the newest measurement of a worker's speed or bandwidth
PROBATION_S = 3 * HEARTBEAT_S  # a worker back from being down gets less work this long (times its downs, up to 4)
DEFAULT_BANDWIDTH_BYTES_S = 100e6  # assumed until a transfer to the worker has been measured
RETRY_BACKOFF_S = 0.2  # first pause before retrying a task a worker said it was too busy for
RETRYABLE_KINDS = frozenset(
    {
        ErrorKind.UNAVAILABLE,
        ErrorKind.DISCONNECTED,
        ErrorKind.TIMEOUT,
        ErrorKind.BUSY,
        ErrorKind.REFUSED,
        ErrorKind.INTERNAL,
        ErrorKind.WRONG_RESULT,
    }
)
SUSPECT_BACKOFF_S = 30.0  # a suspect worker's first canary comes this long after its wrong result
SUSPECT_BACKOFF_MAX_S = 900.0  # each failed canary doubles the wait, up to this
PROBATION_GOOD_RESULTS = 3  # verified results after a passing canary that clear a worker for good


def holder_for(placement: str, held_on: Mapping[str, int], usable: Collection[str], *, keep: bool = False) -> str:
    """The worker a task runs on because it holds the task's operands (``held_on``: bytes of them each
    worker holds for this node), or that is to keep its outputs; "" when the task takes the usual
    way (its held operands brought here first). "auto" and "remote" weigh the bytes each holder
    would spare moving: the one holding the most, if usable; a peer id runs there when it holds
    some operands or is to keep the outputs; "local" and the split placements never do."""
    if placement in ("local", *SPLIT_PLACEMENTS):
        return ""
    if placement in ("auto", "remote"):
        best = max(sorted(held_on), key=lambda w: held_on[w], default="")
        return best if best and best in usable else ""
    return placement if placement in usable and (placement in held_on or keep) else ""


# kernels whose output rows (along axis 0) are made from the same rows of their operands alone
ROW_SPLIT_KERNELS = frozenset({"add", "subtract", "multiply", "clip", "where", "matmul", *ELEMENTWISE})


def row_split(kernel: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, tuple[bool, ...]] | None:
    """How a task splits into blocks of rows (axis 0 of its output): the rows, and for each operand
    whether its blocks take its rows (else it is whole in every block: broadcast along that axis);
    None when it does not split so. Element-wise kernels split by the broadcast shape's rows;
    matmul by its stack (a 2-D matmul splits its own way, `Manager.split_matmul`)."""
    if kernel not in ROW_SPLIT_KERNELS or not shapes:
        return None
    ndim = max(len(s) for s in shapes)
    if ndim == 0 or (kernel == "matmul" and (len(shapes) != 2 or ndim < 3)):
        return None
    n = max(s[0] for s in shapes if len(s) == ndim)
    sliced = tuple(len(s) == ndim and s[0] == n and n > 1 for s in shapes)
    return (n, sliced) if any(sliced) else None


@dataclass
class SubmitEvent:
    """A new task; ``placement`` is auto, local, remote or a peer id; ``flops`` and
    ``nbytes`` (operands and result) let placement weigh compute against transfer."""

    task_id: int
    placement: str
    deadline: float
    flops: float = 0.0
    nbytes: int = 0
    fallback: bool = True  # False: fail rather than run locally because no remote worker is usable


@dataclass
class WorkerStatsEvent:
    """Measured figures of a worker: compute speed (GFLOP/s), bandwidth to it (bytes/s),
    and the load it reported in its last heartbeat. None leaves a figure as it is."""

    worker_id: str
    speed: float | None = None
    bandwidth: float | None = None
    load: int | None = None


@dataclass
class WorkerUpEvent:
    """A worker became usable (session opened); ``speed`` is relative (GFLOP/s)."""

    worker_id: str
    speed: float = 1.0


@dataclass
class WorkerDownEvent:
    """A worker went away; its running attempts are retried elsewhere."""

    worker_id: str
    reason: str = "disconnected"


@dataclass
class TaskDoneEvent:
    """Attempt ``attempt`` of a task succeeded."""

    task_id: int
    attempt: int


@dataclass
class TaskFailedEvent:
    """Attempt ``attempt`` of a task failed with error ``kind``."""

    task_id: int
    attempt: int
    kind: str
    message: str


@dataclass
class CancelEvent:
    """The user no longer wants the task."""

    task_id: int


@dataclass
class TickEvent:
    """Time passed; tasks past their deadline fail, suspect workers due for a canary are probed."""


@dataclass
class ProbeDoneEvent:
    """The canary sent to a suspect worker ended: ``kind`` "" it passed, "wrong-result" its
    answer was wrong, anything else it could not run (the worker left, timed out)."""

    worker_id: str
    kind: str = ""
    message: str = ""


SchedulerEvent = Union[  # noqa: UP007
    SubmitEvent,
    WorkerUpEvent,
    WorkerDownEvent,
    WorkerStatsEvent,
    TaskDoneEvent,
    TaskFailedEvent,
    CancelEvent,
    TickEvent,
    ProbeDoneEvent,
]


@dataclass
class Dispatch:
    """Run attempt ``attempt`` of the task on ``worker_id``, after ``delay_s`` (retry backoff)."""

    task_id: int
    attempt: int
    worker_id: str
    delay_s: float = 0.0


@dataclass
class Deliver:
    """The attempt's result is the task's result: hand it to the caller."""

    task_id: int
    attempt: int
    worker_id: str


@dataclass
class Fail:
    """The task failed for good."""

    task_id: int
    kind: str
    message: str


@dataclass
class Cancel:
    """Stop attempt ``attempt`` on ``worker_id``; its result is no longer wanted."""

    task_id: int
    attempt: int
    worker_id: str


@dataclass
class DropLate:
    """A result arrived for an attempt that is no longer current; it was dropped."""

    task_id: int
    attempt: int


@dataclass
class Probe:
    """Send a canary task with a known answer to a suspect worker; report a ProbeDoneEvent."""

    worker_id: str


@dataclass
class Report:
    """Tell the user about a worker's suspicion: it changed, or a suspect worker came back."""

    worker_id: str
    message: str


SchedulerAction = Union[Dispatch, Deliver, Fail, Cancel, DropLate, Probe, Report]  # noqa: UP007


@dataclass
class AttemptRecord:
    """Where one attempt ran and how it ended ("" while running); ``reason`` says why a
    local attempt ran locally when no remote worker was usable ("" otherwise)."""

    worker_id: str
    outcome: str = ""
    reason: str = ""


@dataclass
class _TaskState:
    task_id: int
    placement: str
    deadline: float
    flops: float = 0.0
    nbytes: int = 0
    fallback: bool = True
    attempts: list[AttemptRecord] = field(default_factory=list)


@dataclass
class _WorkerState:
    speed: float = 1.0  # GFLOP/s, an EWMA of what its tasks achieved (its Hello's figure at first)
    bandwidth: float = 0.0  # bytes/s to and from it, an EWMA; 0 = not measured yet
    load: int = 0  # tasks it reported running for all its peers (heartbeat)
    up: bool = True
    running: int = 0  # our attempts running there
    downs: int = 0  # how often it went down: a flapping worker is put on probation when it returns
    measured: int = 0  # tasks whose speed was measured
    probation_until: float = 0.0
    # Suspicion (see the section comment): "" trusted, "suspect" (waiting for its canary),
    # "probing" (a canary is out), "probation" (its canary passed; good results needed).
    suspicion: str = ""
    suspect_reason: str = ""  # the failure that made it suspect (the latest)
    suspect_since: float = 0.0  # when it last stopped being trusted (scheduler time)
    probe_at: float = 0.0  # when its next canary is due
    backoff_s: float = 0.0  # the wait before that canary; doubles per failed canary
    good_results: int = 0  # verified results since its canary passed

    @property
    def suspect(self) -> bool:
        """Whether its results are not used now (it waits for, or runs, a canary)."""
        return self.suspicion in ("suspect", "probing")


class Scheduler:
    """The pure placement and retry core; see the section comment."""

    def __init__(
        self,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        rng: random.Random | None = None,
        suspect_backoff_s: float = SUSPECT_BACKOFF_S,
        describe_time: Callable[[float], str] | None = None,
    ) -> None:
        self.max_attempts = max_attempts
        self.rng = rng or random.Random(0)
        self.suspect_backoff_s = suspect_backoff_s
        self.suspect_backoff_max_s = max(SUSPECT_BACKOFF_MAX_S, suspect_backoff_s)
        # how messages show a scheduler time (the I/O layer maps it to a wall clock)
        self.describe_time = describe_time or (lambda t: f"t={t:.0f} s")
        self.tasks: dict[int, _TaskState] = {}
        self.workers: dict[str, _WorkerState] = {LOCAL: _WorkerState()}
        self.history: dict[int, list[AttemptRecord]] = {}  # attempts of finished tasks
        self.late_dropped = 0
        self.now = 0.0

    def attempts(self, task_id: int) -> list[AttemptRecord]:
        """Return the attempt records of a running or finished task."""
        if task_id in self.tasks:
            return self.tasks[task_id].attempts
        return self.history.get(task_id, [])

    def handle(self, event: SchedulerEvent, now: float) -> list[SchedulerAction]:
        """Apply one event; return the actions the I/O layer must perform."""
        self.now = now
        if isinstance(event, SubmitEvent):
            return self._on_submit(event)
        if isinstance(event, WorkerUpEvent):
            state = self.workers.setdefault(event.worker_id, _WorkerState())
            state.speed = max(event.speed, 1e-3)
            state.up = True
            if state.downs:  # damping: a worker that keeps dropping out gets less work for a while
                state.probation_until = now + PROBATION_S * min(state.downs, 4)
            if state.suspicion:  # NOTE: a reconnect neither clears suspicion nor keeps it silently
                return [Report(event.worker_id, f"reconnected; still {self.suspicion_text(event.worker_id)}")]
            return []
        if isinstance(event, WorkerStatsEvent):
            state = self.workers.setdefault(event.worker_id, _WorkerState(up=False))
            if event.speed is not None and event.speed > 0:
                # the first real measurement replaces the Hello's figure (taken while the box was starting)
                old_speed = state.speed if state.measured else event.speed
                state.speed = (1 - EWMA_ALPHA) * old_speed + EWMA_ALPHA * event.speed
                state.measured += 1
            if event.bandwidth is not None and event.bandwidth > 0:
                old = state.bandwidth or event.bandwidth
                state.bandwidth = (1 - EWMA_ALPHA) * old + EWMA_ALPHA * event.bandwidth
            if event.load is not None:
                state.load = max(0, event.load)
            return []
        if isinstance(event, WorkerDownEvent):
            return self._on_worker_down(event)
        if isinstance(event, TaskDoneEvent | TaskFailedEvent):
            return self._on_attempt_end(event)
        if isinstance(event, CancelEvent):
            running = self.tasks.get(event.task_id)
            return [] if running is None else self._give_up(running, "cancelled", "cancelled by the user")
        if isinstance(event, TickEvent):
            actions: list[SchedulerAction] = []
            for task in [t for t in self.tasks.values() if now >= t.deadline]:
                actions += self._give_up(task, ErrorKind.DEADLINE, "the task missed its deadline")
            for worker_id, state in self.workers.items():
                if state.suspicion == "suspect" and state.up and now >= state.probe_at:
                    state.suspicion = "probing"
                    actions.append(Probe(worker_id))
            return actions
        if isinstance(event, ProbeDoneEvent):
            return self._on_probe_done(event)
        raise TypeError(f"unknown scheduler event {event!r}")

    def _on_submit(self, event: SubmitEvent) -> list[SchedulerAction]:
        if event.task_id in self.tasks or event.task_id in self.history:
            return [Fail(event.task_id, ErrorKind.BAD_INPUT, f"task id {event.task_id} was already used")]
        task = self.tasks[event.task_id] = _TaskState(
            event.task_id, event.placement, event.deadline, event.flops, event.nbytes, event.fallback
        )
        return self._dispatch_next(task)

    def _on_worker_down(self, event: WorkerDownEvent) -> list[SchedulerAction]:
        worker = self.workers.get(event.worker_id)
        if worker is None or event.worker_id == LOCAL:
            return []
        worker.up = False
        worker.downs += 1
        actions: list[SchedulerAction] = []
        for task in list(self.tasks.values()):
            last = task.attempts[-1]
            if last.worker_id == event.worker_id and not last.outcome:
                actions += self._attempt_failed(task, ErrorKind.DISCONNECTED, event.reason)
        return actions

    def _on_attempt_end(self, event: TaskDoneEvent | TaskFailedEvent) -> list[SchedulerAction]:
        task = self._current(event.task_id, event.attempt)
        if task is None:
            self.late_dropped += 1
            return [DropLate(event.task_id, event.attempt)]
        if isinstance(event, TaskFailedEvent):
            return self._attempt_failed(task, event.kind, event.message)
        record = task.attempts[-1]
        record.outcome = "ok"
        self._finish(task)
        actions: list[SchedulerAction] = [Deliver(task.task_id, event.attempt, record.worker_id)]
        worker = self.workers.get(record.worker_id)
        if worker is not None and worker.suspicion == "probation":
            worker.good_results += 1
            if worker.good_results >= PROBATION_GOOD_RESULTS:
                worker.suspicion, worker.suspect_reason, worker.backoff_s = "", "", 0.0
                text = f"cleared: {worker.good_results} verified results since its canary passed"
                actions.append(Report(record.worker_id, text))
        return actions

    def _current(self, task_id: int, attempt: int) -> _TaskState | None:
        task = self.tasks.get(task_id)
        if task is None or len(task.attempts) != attempt or task.attempts[-1].outcome:
            return None
        return task

    def _finish(self, task: _TaskState) -> None:
        if task.attempts:
            worker = self.workers.get(task.attempts[-1].worker_id)
            if worker is not None and worker.running > 0:
                worker.running -= 1
        self.history[task.task_id] = task.attempts
        del self.tasks[task.task_id]

    def _give_up(self, task: _TaskState, kind: str, message: str) -> list[SchedulerAction]:
        actions: list[SchedulerAction] = []
        if task.attempts and not task.attempts[-1].outcome:
            record = task.attempts[-1]
            record.outcome = kind
            actions.append(Cancel(task.task_id, len(task.attempts), record.worker_id))
        self._finish(task)
        actions.append(Fail(task.task_id, kind, message))
        return actions

    def _attempt_failed(self, task: _TaskState, kind: str, message: str) -> list[SchedulerAction]:
        record = task.attempts[-1]
        record.outcome = f"{kind}: {message}"
        worker = self.workers.get(record.worker_id)
        if worker is not None and worker.running > 0:
            worker.running -= 1
        reports: list[SchedulerAction] = []
        if worker is not None and kind == ErrorKind.WRONG_RESULT and record.worker_id != LOCAL:
            reports = self._suspect(record.worker_id, worker, message)
        if kind not in RETRYABLE_KINDS or len(task.attempts) >= self.max_attempts:
            self._finish_failed(task)
            return [*reports, Fail(task.task_id, kind, message)]
        # backoff: a busy worker is retried elsewhere after a pause that grows per attempt
        delay = RETRY_BACKOFF_S * 2 ** (len(task.attempts) - 1) if kind == ErrorKind.BUSY else 0.0
        return [*reports, *self._dispatch_next(task, delay)]

    def _suspect(self, worker_id: str, state: _WorkerState, reason: str) -> list[SchedulerAction]:
        """Make a worker suspect; a first offence waits the base back-off, a repeat (a failed
        canary, a wrong result on probation) doubles the last one, up to the cap."""
        if state.suspicion:
            state.backoff_s = min(self.suspect_backoff_max_s, max(state.backoff_s, self.suspect_backoff_s) * 2)
        else:
            state.backoff_s = self.suspect_backoff_s
            state.suspect_since = self.now
        state.suspicion, state.suspect_reason, state.good_results = "suspect", reason, 0
        state.probe_at = self.now + state.backoff_s
        return [Report(worker_id, f"is {self.suspicion_text(worker_id)}; its results are not used until then")]

    def _on_probe_done(self, event: ProbeDoneEvent) -> list[SchedulerAction]:
        state = self.workers.get(event.worker_id)
        if state is None or state.suspicion != "probing":
            return []  # NOTE: a late report (the worker was cleared or named meanwhile)
        if not event.kind:
            state.suspicion, state.good_results = "probation", 0
            text = f"passed its canary task; on probation until {PROBATION_GOOD_RESULTS} verified results"
            return [Report(event.worker_id, text)]
        if event.kind == ErrorKind.WRONG_RESULT:
            return self._suspect(event.worker_id, state, event.message)
        state.suspicion, state.probe_at = "suspect", self.now + state.backoff_s  # not its fault: same wait
        text = f"could not be probed ({event.message}); {self.suspicion_text(event.worker_id)}"
        return [Report(event.worker_id, text)]

    def suspicion(self, worker_id: str) -> dict[str, Any] | None:
        """A worker's suspicion (state, reason, since, seconds to its next canary), None when trusted."""
        state = self.workers.get(worker_id)
        if state is None or not state.suspicion:
            return None
        due = max(0.0, state.probe_at - self.now) if state.suspicion == "suspect" else 0.0
        return {
            "state": state.suspicion,
            "reason": state.suspect_reason,
            "since": state.suspect_since,
            "next_probe_s": due,
            "good_results": state.good_results,
        }

    def suspicion_text(self, worker_id: str) -> str:
        """One phrase on a worker's suspicion: "suspect since <time> (<reason>); next probe in N s"."""
        info = self.suspicion(worker_id)
        if info is None:
            return "trusted"
        since = f"since {self.describe_time(info['since'])} ({info['reason']})"
        if info["state"] == "probation":
            return f"on probation {since}: {info['good_results']}/{PROBATION_GOOD_RESULTS} verified results"
        if info["state"] == "probing":
            return f"suspect {since}; its canary task is running"
        return f"suspect {since}; next probe in {info['next_probe_s']:.0f} s"

    def no_remote_reason(self, tried: dict[str, str] | None = None) -> str:
        """Why no remote worker is usable: each known worker and what keeps it out."""
        tried = tried or {}
        parts = []
        for worker_id, state in self.workers.items():
            if worker_id == LOCAL:
                continue
            if worker_id in tried:
                why = f"failed this task ({tried[worker_id]})"
            elif state.suspect:
                why = self.suspicion_text(worker_id)
            elif not state.up:
                why = "not connected"
            else:
                continue
            parts.append(f"{short_id(worker_id)}: {why}")
        return "no remote worker usable: " + ("; ".join(parts) if parts else "no peer is connected")

    def _finish_failed(self, task: _TaskState) -> None:
        self.history[task.task_id] = task.attempts
        del self.tasks[task.task_id]

    def estimate_s(self, worker_id: str, flops: float, nbytes: int) -> float:
        """Estimated seconds until a task of ``flops`` and ``nbytes`` would finish on a worker:
        its queue, the compute at its measured speed, and the transfer at its bandwidth."""
        state = self.workers[worker_id]
        compute = (flops or 1e9) / (max(state.speed, 1e-3) * 1e9)
        transfer = 0.0 if worker_id == LOCAL else nbytes / (state.bandwidth or DEFAULT_BANDWIDTH_BYTES_S)
        estimate = (state.running + state.load) * compute + compute + transfer
        limited = self.now < state.probation_until or state.suspicion == "probation"
        return estimate * 4 if limited else estimate

    def _choose(self, task: _TaskState) -> tuple[str, str]:
        """The worker for the task's next attempt, and why it runs locally when that is a
        fallback (no remote worker usable), "" otherwise."""
        tried = {a.worker_id: a.outcome for a in task.attempts}
        placement = task.placement
        if placement == LOCAL:
            return LOCAL, ""
        if placement not in ("auto", "remote"):  # a peer id
            # The named peer gets the first attempt even when it is down or
            # unknown: the attempt fails at once and the record shows why the
            # task then ran elsewhere.
            if placement not in tried:
                return placement, ""
            placement = "auto"
        remotes = [w for w, s in self.workers.items() if w != LOCAL and s.up and w not in tried and not s.suspect]
        candidates = remotes if placement == "remote" else remotes + ([LOCAL] if LOCAL not in tried else [])
        known = any(w != LOCAL for w in self.workers)
        fallback = not remotes and (placement == "remote" or known)
        if not candidates:
            # fallback: every remote worker is gone, suspect or has failed this task
            return LOCAL, self.no_remote_reason(tried)
        best = min(candidates, key=lambda w: (self.estimate_s(w, task.flops, task.nbytes), self.rng.random()))
        return best, self.no_remote_reason(tried) if fallback and best == LOCAL else ""

    def _dispatch_next(self, task: _TaskState, delay_s: float = 0.0) -> list[SchedulerAction]:
        worker_id, reason = self._choose(task)
        if reason and not task.fallback:
            self._finish_failed(task)
            hint = "wait for the probe, connect another worker, or allow the local fallback"
            return [Fail(task.task_id, ErrorKind.UNAVAILABLE, f"{reason}; {hint}")]
        task.attempts.append(AttemptRecord(worker_id, reason=reason))
        self.workers.setdefault(worker_id, _WorkerState(up=False)).running += 1
        return [Dispatch(task.task_id, len(task.attempts), worker_id, delay_s)]

    def validate(self) -> None:
        """Check the invariants (running counts match running attempts); raise AssertionError."""
        running: dict[str, int] = {}
        for task in self.tasks.values():
            assert task.attempts, f"task {task.task_id} has no attempt"
            assert all(a.outcome for a in task.attempts[:-1]), f"task {task.task_id} has two live attempts"
            if not task.attempts[-1].outcome:
                running[task.attempts[-1].worker_id] = running.get(task.attempts[-1].worker_id, 0) + 1
        for worker_id, state in self.workers.items():
            assert state.running == running.get(worker_id, 0), (
                f"worker {worker_id}: running {state.running} != {running.get(worker_id, 0)}"
            )
        assert not set(self.tasks) & set(self.history), "a task is both running and finished"


# ---- the task board: what the dashboard shows of the tasks

BOARD_RECENT = 50  # ended tasks the board remembers (the dashboard's "recent" table)
BOARD_MAX_RUNNING = 4096  # tasks it follows at once; more are counted, not listed


@dataclass
class BoardTask:
    """One task as the dashboard shows it: where its attempts ran, how long, how it ended."""

    task_id: int
    kernel: str
    placement: str
    started: float  # the clock of the one who feeds the board
    part_of: int = 0  # the split job it is a block of (0: a task of its own)
    workers: list[str] = field(default_factory=list)  # where each attempt ran, in order
    first_attempt: float | None = None
    outcome: str = ""  # "" while it runs, then "ok" or an error kind
    seconds: float = 0.0  # start to end (while running: so far)
    shares: dict[str, list[int]] = field(default_factory=dict)  # a split job's: worker -> [rows, blocks]
    rows: int = 0  # a split job's rows in all

    def as_dict(self, now: float) -> dict[str, Any]:
        """The task as the dashboard's snapshot carries it."""
        queued = (self.first_attempt if self.first_attempt is not None else now) - self.started
        return {
            "task_id": self.task_id,
            "kernel": self.kernel,
            "placement": self.placement,
            "part_of": self.part_of,
            "where": self.workers[-1] if self.workers else "",
            "attempts": len(self.workers),
            "workers": list(self.workers),
            "state": self.outcome or ("queued" if not self.workers else "running"),
            "queued_s": round(queued, 6),
            "seconds": round(self.seconds if self.outcome else now - self.started, 6),
            "shares": {w: {"rows": r, "blocks": b} for w, (r, b) in self.shares.items()},
            "rows": self.rows,
        }


class TaskBoard:
    """Pure: the tasks running now and the last BOARD_RECENT that ended, fed by the manager
    (``now`` from its clock); split jobs with their workers' shares of rows. Bounded: at most
    BOARD_MAX_RUNNING followed at once (the rest only counted), blocks of a split job are not
    kept among the recent (their job is)."""

    def __init__(self, recent: int = BOARD_RECENT, max_running: int = BOARD_MAX_RUNNING) -> None:
        self.running: dict[int, BoardTask] = {}
        self.recent: deque[BoardTask] = deque(maxlen=recent)
        self.max_running = max_running
        self.unlisted = 0  # tasks started while the board was full

    def start(self, task_id: int, kernel: str, placement: str, now: float, part_of: int = 0, rows: int = 0) -> None:
        """A task (or a split job, with its ``rows``) began."""
        if len(self.running) >= self.max_running:
            self.unlisted += 1
            return
        task = self.running[task_id] = BoardTask(task_id, kernel, placement, now, part_of, rows=rows)
        if rows:  # a split job waits in no queue: its blocks do, each a task of its own
            task.first_attempt = now

    def attempt(self, task_id: int, worker: str, now: float) -> None:
        """An attempt of the task was sent to ``worker``."""
        task = self.running.get(task_id)
        if task is not None:
            task.workers.append(worker)
            task.first_attempt = now if task.first_attempt is None else task.first_attempt

    def block(self, job_id: int, worker: str, rows: int) -> None:
        """A block of ``rows`` of split job ``job_id`` was done by ``worker``."""
        job = self.running.get(job_id)
        if job is not None:
            share = job.shares.setdefault(worker, [0, 0])
            share[0] += rows
            share[1] += 1
            if worker not in job.workers:
                job.workers.append(worker)

    def end(self, task_id: int, outcome: str, now: float) -> None:
        """The task ended: "ok" or its error kind."""
        task = self.running.pop(task_id, None)
        if task is None:
            return
        task.outcome, task.seconds = outcome or "ok", now - task.started
        if not task.part_of:
            self.recent.appendleft(task)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The running tasks (oldest first) and the recent ones (newest first), as plain values."""
        return {
            "running": [t.as_dict(now) for t in sorted(self.running.values(), key=lambda t: t.started)],
            "recent": [t.as_dict(now) for t in self.recent],
            "unlisted": self.unlisted,
        }


###############################################################################
# 10. Session directories
#
# The pangea home ($PANGEA_HOME, default ~/.pangea, mode 0700) holds the
# identity key and one session directory per running process:
#     compute_test/<role>-<pid>/{pid, info.json, addresses.txt, pangea.log}
# Created at start, removed on exit (normal, Ctrl-C, SIGTERM); directories of
# dead processes are removed by the next start. The log of a run that failed
# (exit code not 0) is kept first, bounded, as logs/<role>-<UTC start>-<pid>.log.
###############################################################################


def home_path() -> Path:
    """The pangea home ($PANGEA_HOME, default ~/.pangea), not created: a client only reads it."""
    return Path(os.environ.get("PANGEA_HOME") or str(Path.home() / ".pangea")).expanduser()


def pangea_home() -> Path:
    """Return the pangea home directory, creating it with mode 0700."""
    home = home_path()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise SessionError(
            f"cannot use pangea home {str(home)!r}: {exc.strerror}", hint="set PANGEA_HOME to a writable directory"
        ) from None
    return home


def pid_alive(pid: int) -> bool:
    """Return True when a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_sessions(home: Path) -> list[Path]:
    """Remove session directories whose process is gone; return what was removed."""
    root = home / SESSIONS_DIRNAME
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        _, _, pid_text = d.name.rpartition("-")
        if d.is_dir() and pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def live_sessions(home: Path, *, besides: int | None = None) -> list[tuple[str, int]]:
    """(role, pid) of every running pangea process of this home but ``besides`` (default: this one)."""
    own = os.getpid() if besides is None else besides
    root = home / SESSIONS_DIRNAME
    found: list[tuple[str, int]] = []
    with contextlib.suppress(OSError):
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            role, _, pid_text = d.name.rpartition("-")
            if d.is_dir() and role and pid_text.isdigit() and int(pid_text) != own and pid_alive(int(pid_text)):
                found.append((role, int(pid_text)))
    return found


def log_tail(data: bytes, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a log: all of it, or a line saying how much was dropped and
    then its last lines (where a failure is), from a line start (pure)."""
    if len(data) <= max_bytes:
        return data
    tail = data[len(data) - max(0, max_bytes - LOG_DROPPED_NOTE_BYTES) :]
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]
    note = f"[pangea: the first {len(data) - len(tail)} bytes of this log were dropped]\n".encode()
    return (note + tail)[-max_bytes:]


def logs_to_prune(
    logs: Sequence[tuple[str, float, int]],
    keep_files: int = LOG_KEPT_FILES,
    max_total_bytes: int = LOG_KEPT_TOTAL_BYTES,
) -> list[str]:
    """The kept logs to delete (pure), given (name, mtime, size) of each: every one but the
    newest ``keep_files``, and from the first that would take the total past ``max_total_bytes``
    on, every older one too."""
    prune: list[str] = []
    kept, total = 0, 0
    for name, _, size in sorted(logs, key=lambda entry: (entry[1], entry[0]), reverse=True):
        if prune or kept >= keep_files or total + size > max_total_bytes:
            prune.append(name)
            continue
        kept, total = kept + 1, total + size
    return prune


def kept_logs(home: Path) -> list[dict[str, Any]]:
    """The logs of failed runs in $PANGEA_HOME/logs, newest first: path, bytes, modified (epoch s)."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for path in (home / LOGS_DIRNAME).glob("*.log"):
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append({"path": str(path), "bytes": st.st_size, "modified": st.st_mtime})
    return sorted(found, key=lambda entry: (entry["modified"], entry["path"]), reverse=True)


def prune_kept_logs(home: Path) -> list[str]:
    """Delete the kept logs beyond the bounds of logs_to_prune; return their paths."""
    logs = [(entry["path"], float(entry["modified"]), int(entry["bytes"])) for entry in kept_logs(home)]
    pruned = logs_to_prune(logs)
    for path in pruned:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return pruned


def describe_sessions(sessions: Sequence[tuple[str, int]]) -> str:
    """``serve (pid 4242), initiator (pid 4243)``."""
    return ", ".join(f"{role} (pid {pid})" for role, pid in sessions)


# ---------------------------------------------------------------- the RPC endpoint's files


def read_token_file(path: str | Path) -> str:
    """Return the token in the file ``path`` (stripped); refuse a file that other users can read."""
    import shlex
    import stat

    try:
        if os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigError(
                f"cannot use token file {path}: it is readable by other users",
                hint=f"chmod 600 {shlex.quote(str(path))}",
            )
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {str(path)!r}: {exc.strerror}") from None


def write_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data``, atomically; False when it exists already
    (another process of this home made it first: use theirs)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)  # NOTE: link, not replace: never overwrite what a running node uses
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def home_rpc_token(home: Path) -> tuple[str, Path]:
    """The token of this home's loopback RPC endpoints and its file, created (0600) on first use.

    Local clients of the same user read it (`local_rpc_token`); other users of the box
    cannot, since the home is 0700."""
    import secrets

    path = home / RPC_TOKEN_FILENAME
    if not path.exists():
        write_private_file(path, (secrets.token_hex(16) + "\n").encode())
    return read_token_file(path), path


def local_rpc_token() -> str | None:
    """The RPC token in this user's pangea home, for a client on this box; None when there is none."""
    path = home_path() / RPC_TOKEN_FILENAME
    return read_token_file(path) if path.exists() else None


def self_signed_certificate(common_name: str, *, for_browsers: bool = False) -> tuple[bytes, bytes]:
    """A new Ed25519 key (``for_browsers``: ECDSA P-256, which browsers take and Ed25519 they do
    not) and a certificate for it: (PEM of both, SHA-256 of the certificate).

    NOTE: nobody checks names or dates: a client pins the certificate's SHA-256, and the
    TLS 1.3 handshake proves the server holds its private key."""
    import datetime
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key: Any = ec.generate_private_key(ec.SECP256R1()) if for_browsers else Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256() if for_browsers else None)
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def rpc_tls_identity(home: Path, filename: str = RPC_TLS_FILENAME) -> tuple[Path, bytes]:
    """The TLS certificate (and key) file of this home's RPC endpoints (``filename``
    DASHBOARD_TLS_FILENAME: the dashboard's, a key browsers take), created once (0600) and
    kept so that its fingerprint stays what clients pinned; and the certificate's SHA-256."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = home / filename
    if not path.exists():
        browsers = filename == DASHBOARD_TLS_FILENAME
        write_private_file(path, self_signed_certificate(f"pangea {path.stem}", for_browsers=browsers)[0])
    try:
        read_token_file(path)  # the same rule as a token: nobody else may read the key
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the RPC certificate {str(path)!r}: {describe_exception(exc)}",
            hint="delete the file to create a new one (clients that pinned the old fingerprint must pin the new one)",
        ) from None
    return path, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def known_fingerprint(address: str) -> bytes | None:
    """The certificate SHA-256 this user's clients trusted for the RPC endpoint ``address``."""
    for line in _read_lines(home_path() / KNOWN_NODES_FILENAME):
        name, _, fingerprint = line.partition(" ")
        if name == address:
            with contextlib.suppress(UsageError):
                return parse_fingerprint(fingerprint)
    return None


def remember_fingerprint(address: str, digest: bytes) -> Path:
    """Record (trust on first use) the certificate SHA-256 of the RPC endpoint ``address``."""
    home = pangea_home()
    path = home / KNOWN_NODES_FILENAME
    lines = [line for line in _read_lines(path) if line.partition(" ")[0] != address]
    text = "".join(f"{line}\n" for line in [*lines, f"{address} {format_fingerprint(digest)}"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def local_node_fingerprint(port: int) -> bytes | None:
    """The certificate SHA-256 of a TLS RPC endpoint on ``port`` run by a node of this user's home."""
    root = home_path() / SESSIONS_DIRNAME
    for role, pid in live_sessions(home_path()) if root.is_dir() else []:
        info = SessionDir.load(root / f"{role}-{pid}")
        if str(info.get("rpc", "")).endswith(f":{port}") and info.get("rpc_fingerprint"):
            with contextlib.suppress(UsageError):
                return parse_fingerprint(str(info["rpc_fingerprint"]))
    return None


HOST_ID_ENV = "PANGEA_TEST_HOST_ID"  # TEST AID: pretend to be another machine (copied-home tests)


def host_fingerprint() -> bytes:
    """16 bytes naming this machine: a hash of /etc/machine-id (else hostname + boot id).

    Two processes with one peer id and one fingerprint are one home run twice,
    not a home copied to another box. NOTE: the environment variable
    PANGEA_TEST_HOST_ID is a TEST AID that stands for another machine."""
    import hashlib

    source = os.environ.get(HOST_ID_ENV, "")
    if not source:
        for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            with contextlib.suppress(OSError):
                source = Path(path).read_text().strip()
            if source:
                break
    if not source:
        with contextlib.suppress(OSError):
            source = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        source = f"{socket.gethostname()}|{source}"
    return hashlib.sha256(f"pangea-host-v1|{source}".encode()).digest()[:16]


class SessionDir:
    """The session directory of this process; see the section comment."""

    def __init__(self, home: Path, role: str, pid: int | None = None) -> None:
        self.home = home
        self.role = role
        self.pid = pid if pid is not None else os.getpid()
        self.path = home / SESSIONS_DIRNAME / f"{role}-{self.pid}"
        self.info: dict[str, Any] = {"role": role, "pid": self.pid, "started": time.time(), "version": __version__}
        self.exit_code: int | None = None  # set by finish()

    @property
    def log_path(self) -> Path:
        """Path of this session's log file."""
        return self.path / "pangea.log"

    @property
    def kept_log_path(self) -> Path:
        """Where this session's log is kept when the run fails: logs/<role>-<UTC start>-<pid>.log."""
        started = time.strftime("%Y%m%d-%H%M%S", time.gmtime(float(self.info["started"])))
        return self.home / LOGS_DIRNAME / f"{self.role}-{started}-{self.pid}.log"

    def finish(self, code: int) -> int:
        """Record the run's exit code (node_session keeps the log when it is not 0); return it."""
        self.exit_code = code
        return code

    def keep_log(self, last_line: str = "", max_bytes: int = LOG_KEPT_MAX_BYTES) -> Path | None:
        """Copy the log (its rotated files first, then ``last_line``; the last ``max_bytes``
        of them) to ``kept_log_path`` and prune the kept logs; None when the log says nothing
        but that the process started (a setup error: its message says it all), or it cannot
        be kept (the failure is reported either way)."""
        parts = [self.log_path.with_name(f"{self.log_path.name}.{i}") for i in range(LOG_BACKUPS, 0, -1)]
        try:
            data = b"".join(part.read_bytes() for part in [*parts, self.log_path] if part.is_file())
            if data.count(b"\n") <= 1:
                return None
            if last_line:
                data += last_line.encode(errors="replace") + b"\n"
            dest = self.kept_log_path
            dest.parent.mkdir(mode=0o700, exist_ok=True)
            write_private_file(dest, log_tail(data, max_bytes))
            prune_kept_logs(self.home)
        except OSError as exc:
            log.debug("cannot keep the log of %s: %s", self.path, exc)
            return None
        return dest

    def create(self) -> SessionDir:
        """Clean stale sessions, then create this one with its pid file."""
        clean_stale_sessions(self.home)
        try:
            (self.home / SESSIONS_DIRNAME).mkdir(mode=0o700, exist_ok=True)
            self.path.mkdir(mode=0o700, exist_ok=True)
            (self.path / "pid").write_text(f"{self.pid}\n")
        except OSError as exc:
            raise SessionError(f"cannot create session directory {str(self.path)!r}: {exc.strerror}") from None
        self.save()
        return self

    def save(self, **info: Any) -> None:
        """Merge ``info`` into info.json and write it atomically."""
        self.info.update(info)
        tmp = self.path / "info.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=2) + "\n")
        os.replace(tmp, self.path / "info.json")

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Read a session directory's info.json ({} when missing or unreadable)."""
        try:
            return dict(json.loads((path / "info.json").read_text()))
        except (OSError, ValueError):
            return {}

    def write_addresses(self, addresses: Sequence[str]) -> None:
        """Record the multiaddrs a peer can dial (addresses.txt, one per line)."""
        (self.path / "addresses.txt").write_text("".join(a + "\n" for a in addresses))
        self.save(addresses=list(addresses))

    def remove(self) -> None:
        """Delete the session directory (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)


###############################################################################
# 11. Transports
#
# The thin adapters between sockets and the sans-I/O cores above: the node's
# identity and its libp2p host (TCP + Noise + Yamux); `Channel`, one libp2p
# stream with its Decoder and one writer task (`SendQueue`); and the TLS 1.3
# data plane (`TlsChannel`, `DataPlane`) that carries a session's frames once
# it is up. Nothing here decides anything about a task or a peer.
#
# NOTE: an exception escaping a libp2p stream handler kills the whole host
# (tech notes), so the handler catches everything and resets the stream.
# NOTE: Yamux fails a write after 5 s without a window update, so a reader
# must always be draining: the session reader hands work to other tasks and
# never waits on a write itself.
###############################################################################


def stream_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean a libp2p stream or connection went away."""
    import trio
    from libp2p.network.stream.exceptions import StreamError
    from libp2p.stream_muxer.exceptions import MuxedConnUnavailable, MuxedStreamError

    return (StreamError, MuxedStreamError, MuxedConnUnavailable, trio.BrokenResourceError, trio.ClosedResourceError)


def key_peer_id(key_pair: Any) -> str:
    """The peer id of an identity key pair."""
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(key_pair.public_key))


def load_or_create_identity(home: Path) -> Any:
    """Return this node's Ed25519 key pair, created once and kept (0600) in the home."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.identity_utils import load_identity, save_identity

    path = home / IDENTITY_FILENAME
    if path.exists():
        try:
            return load_identity(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read identity key {str(path)!r}: {describe_exception(exc)}",
                hint="delete the file to create a new identity (the peer ID changes)",
            ) from None
    key_pair = create_new_key_pair()
    save_identity(key_pair, path)
    os.chmod(path, 0o600)
    return key_pair


def make_host(key_pair: Any, psk: str | None = None) -> Any:
    """Return a libp2p host: TCP, Noise only (never plaintext), Yamux only; with a
    pre-shared key (64 hex), a private network that keyless nodes cannot join."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: Noise(key_pair, noise_privkey=new_x25519().private_key)},
        muxer_opt={YAMUX_ID: Yamux},  # type: ignore[dict-item]
        psk=psk,
    )
    end_inbound_handlers_with_their_connection(host.get_network())
    return host


def end_inbound_handlers_with_their_connection(swarm: Any) -> None:
    """Let each inbound connection give back its slot when its socket closes.

    NOTE: py-libp2p 0.8.1 keeps the handler of every inbound connection alive until
    the swarm stops (an "intentional barrier" after the upgrade), and that handler holds
    one of the swarm's 250 inbound slots: after 250 inbound connections in a node's
    lifetime, however short each was, every new one is closed during its handshake,
    trusted peers' too. Measured: a stranger that connects and hangs up 249 times locks
    every peer out for good. Wrapped here: the handler is cancelled (and its slot freed)
    once its socket has closed; a handler whose socket cannot be found keeps the old way."""
    import trio

    handle = swarm._handle_inbound_connection

    async def handle_until_closed(read_write_closer: Any, maddr: Any) -> None:
        sock = getattr(getattr(read_write_closer, "stream", None), "socket", None)
        async with trio.open_nursery() as nursery:
            if sock is not None and callable(getattr(sock, "fileno", None)):

                async def watch() -> None:
                    while True:  # NOTE: polled: nothing tells when py-libp2p closes the socket
                        await trio.sleep(INBOUND_WATCH_S)
                        if sock.fileno() == -1:
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(watch)
            await handle(read_write_closer, maddr)
            nursery.cancel_scope.cancel()

    swarm._handle_inbound_connection = handle_until_closed


def local_interface_addresses() -> list[tuple[str, str]]:
    """Return (interface, IPv4 address) pairs of this machine."""
    import psutil

    out = []
    for name, addrs in psutil.net_if_addrs().items():
        out += [(name, a.address) for a in addrs if a.family == socket.AF_INET]
    return out


def ensure_port_free(host: str, port: int, option: str = "--port") -> None:
    """Raise ConfigError when host:port cannot be listened on.

    NOTE: py-libp2p's listener sets SO_REUSEPORT, so a second node on a busy
    port would start without error and share it; a plain bind finds out.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot listen on {host}:{port}: port {port} is already in use",
                    hint=f"stop the other program, or pick another port: {option} 0 chooses a free one"
                    if option == "--port"
                    else f"stop the other program, or pick another one with {option}",
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"cannot listen on {host}:{port}: {host} is not an address of this machine",
                    hint="use --host 0.0.0.0 (all interfaces) or one of: "
                    + ", ".join(ip for _, ip in rank_interface_addresses(local_interface_addresses())),
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def measure_gflops(n: int = 256, repeats: int = 8) -> float:
    """Return this machine's float64 matmul speed in GFLOP/s (about 30 ms of work)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n))
    a @ a  # warm up BLAS threads
    best = math.inf
    for _ in range(repeats):  # NOTE: the best run, not the mean: other processes starting at the same time skew it
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def capacity() -> dict[str, int]:
    """Return the cores and BLAS threads this node offers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    blas = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or cores)
    return {"cores": cores, "blas_threads": blas}


class BufferPool:
    """Large receive buffers kept for reuse once nothing refers to them any more.

    NOTE: the first touch of fresh memory is slow on VMs (0.2-1.4 s per GiB on this
    project's machine kind, as much as moving the bytes), and every big payload is
    fresh memory. A buffer comes back when the arrays built over it are gone (its
    reference count says so: the worker dropped the operands, the user the
    result). Whatever is reused is overwritten in full before anyone sees it
    (the Decoder hands out a message only when its payload is complete). At most
    ``max_buffers`` are kept, each dropped after ``idle_s`` unused."""

    def __init__(self, min_bytes: int = POOL_MIN_BYTES, max_buffers: int = POOL_MAX_BUFFERS, idle_s: float = 30.0):
        self.min_bytes = min_bytes
        self.max_buffers = max_buffers
        self.idle_s = idle_s
        self._buffers: list[list[Any]] = []  # [buffer, last handed out (monotonic)]
        self.reused = 0

    def take(self, n: int) -> np.ndarray:
        """Return a writable uint8 array of n bytes, reused when a free one fits."""
        import numpy as np

        self.trim()
        if n >= self.min_bytes:
            for entry in self._buffers:
                buf = entry[0]
                # NOTE: 3 references when free: the entry, the local name, getrefcount's argument
                if n <= buf.nbytes <= 2 * n and sys.getrefcount(buf) == 3:
                    entry[1] = time.monotonic()
                    self.reused += 1
                    return buf[:n]
        buf = np.empty(n, dtype=np.uint8)
        if n >= self.min_bytes:
            self._buffers.append([buf, time.monotonic()])
            if len(self._buffers) > self.max_buffers:
                self._buffers.pop(0)
        return buf

    def trim(self) -> None:
        """Drop buffers unused for idle_s."""
        now = time.monotonic()
        self._buffers = [e for e in self._buffers if now - e[1] < self.idle_s]


class Channel:
    """One libp2p stream with a Decoder: whole messages in, whole frames out."""

    name = "libp2p"

    def __init__(self, stream: Any, limits: Limits | None = None, pool: PayloadPool | None = None) -> None:
        import trio

        limits = limits or Limits()
        self.stream = stream
        # NOTE: no payload at all until the handshake is done (a Hello has none), so an
        # unauthenticated peer cannot make us allocate; PeerSession raises the limit.
        self.decoder = Decoder(0, HELLO_MAX_HEADER_BYTES, limits=limits, pool=pool)
        self._send_lock = trio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.clock: Callable[[], float] = time.monotonic  # the clock of last_read (and of Node._watch's `now`)
        self.last_read = self.clock()  # bytes arriving, even mid-frame, mean the peer is alive
        self.receiving: int | None = None  # the admitted task whose frame is still arriving
        self.closed = False
        self.queue = SendQueue()  # used once the writer runs (start_writer); before, sends write directly
        self._writer_started = False
        self._wakeup = trio.Event()
        # compression: the peer's Hello lists the codec (set by PeerSession), and this link's speed,
        # an EWMA of large frames written and read (bytes/s; 0 until one was measured)
        self.packs = False
        self.link_bytes_s = 0.0
        self.packed_arrays = 0  # arrays sent packed, and the bytes packing saved
        self.packed_saved_bytes = 0
        self.pack_speeds = (COMPRESS_GUESS_BYTES_S, COMPRESS_GUESS_BYTES_S)  # packing, unpacking: the last sample's

    def may_pack(self) -> bool:
        """Whether packing could pay on this link at all, however well an array compressed (no sample)."""
        return bool(self.packs and self.link_bytes_s) and compression_pays(
            COMPRESS_MIN_BYTES, math.inf, *self.pack_speeds, self.link_bytes_s
        )

    def _note_rate(self, nbytes: int, seconds: float) -> None:
        """Count one large frame's transfer in the link's speed."""
        if nbytes >= COMPRESS_MIN_BYTES and seconds > 0:
            rate = nbytes / seconds
            self.link_bytes_s = rate if not self.link_bytes_s else 0.5 * self.link_bytes_s + 0.5 * rate

    def pack(self, a: np.ndarray) -> bytes | None:
        """The array packed for this link, or None when a sample says packing does not pay (`Packer`)."""
        import numpy as np

        if not self.may_pack() or a.nbytes > COMPRESS_MAX_BYTES:
            return None
        flat = a.reshape(-1)
        step = max(1, COMPRESS_SAMPLE_BYTES // a.itemsize)
        starts = np.linspace(0, max(0, flat.size - step), COMPRESS_SAMPLES).astype(int)
        sample = [np.ascontiguousarray(flat[i : i + step]) for i in dict.fromkeys(starts.tolist())]
        raw = sum(x.nbytes for x in sample)
        t0 = time.perf_counter()
        packed = [pack_blosc(x) for x in sample]
        t1 = time.perf_counter()
        unpack_blosc(memoryview(packed[0]), np.empty(sample[0].nbytes, np.uint8))
        t2 = time.perf_counter()
        ratio = raw / max(1, sum(len(p) for p in packed))
        pack_s, unpack_s = raw / max(t1 - t0, 1e-9), sample[0].nbytes / max(t2 - t1, 1e-9)
        self.pack_speeds = (pack_s, unpack_s)
        if not compression_pays(a.nbytes, ratio, pack_s, unpack_s, self.link_bytes_s):
            return None
        out = pack_blosc(a)
        self.packed_arrays += 1
        self.packed_saved_bytes += a.nbytes - len(out)
        return out

    def start_writer(self, nursery: Any) -> None:
        """From now on every send goes through one writer task that owns the stream (see SendQueue)."""
        if not self._writer_started:
            self._writer_started = True
            nursery.start_soon(self._write_loop)

    async def send(self, msg: Message) -> None:
        """Write one message; raise PeerError when the channel is gone.

        A sender cancelled while it waits loses nothing but its own frame: one not
        started is dropped, one started is finished by the writer (see SendQueue)."""
        if self.may_pack() and _carries_bytes(msg, COMPRESS_MIN_BYTES):
            import trio

            # NOTE: packing a large array takes tens of milliseconds: not on the event loop
            parts = await trio.to_thread.run_sync(encode_parts, msg, self.pack)
        else:
            parts = coalesce_parts(encode_parts(msg))
        if not self._writer_started:  # the handshake, before the session exists
            async with self._send_lock:
                await self._write_parts(parts)
            return
        import trio

        frame = OutgoingFrame(parts, done=trio.Event())
        self.queue.push(frame)
        del parts
        self._wakeup.set()
        try:
            await frame.done.wait()
        except BaseException:
            self.queue.abandon(frame)
            raise
        if frame.error is not None:
            raise frame.error

    async def _write_loop(self) -> None:
        """The writer: write queued frames one after the other until the channel closes."""
        import trio

        try:
            while not self.closed:
                frame = self.queue.next()
                if frame is None:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                size, start = sum(len(p) for p in frame.parts), time.perf_counter()
                async with self._send_lock:
                    await self._write_parts(frame.parts)
                self._note_rate(size, time.perf_counter() - start)
                self.queue.sent(frame)
                frame.done.set()
        except PeerError as exc:
            self._writer_failed(exc)
        finally:
            self._writer_failed(PeerError(f"the {self.name} channel is closed", kind=ErrorKind.DISCONNECTED))

    def _writer_failed(self, error: PeerError) -> None:
        for frame in self.queue.close(error):
            frame.done.set()

    def _stop_writer(self) -> None:
        self._wakeup.set()

    async def _write_parts(self, parts: list[bytes | memoryview]) -> None:
        """Write one encoded frame to the stream; PeerError when the stream is gone."""
        try:
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), WRITE_CHUNK_BYTES):
                    chunk = view[start : start + WRITE_CHUNK_BYTES]
                    await self.stream.write(chunk)
                    self.bytes_out += len(chunk)
        except stream_errors() as exc:
            raise PeerError(f"cannot send to peer: {describe_exception(exc)}", kind=ErrorKind.DISCONNECTED) from None

    async def receive(self) -> Message:
        """Return the next message; raise PeerError at EOF or reset, RemoteProtocolError for garbage."""
        first, start = self.bytes_in, 0.0
        while True:
            msg = self.decoder.next_frame(UNPACK_IN_THREAD_BYTES)
            if msg is not NEED_DATA:
                if start:  # from its first bytes to its last: the link's speed, for a large frame
                    self._note_rate(self.bytes_in - first, time.perf_counter() - start)
                if isinstance(msg, PackedFrame):
                    import trio

                    # NOTE: unpacking hundreds of MiB takes tenths of a second: not on the event loop
                    return await trio.to_thread.run_sync(self.decoder.decode, msg.header, msg.payload)
                return msg
            before = self.bytes_in
            await self._fill()
            if not start:
                first, start = before, time.perf_counter()

    async def _fill(self) -> None:
        """Wait for bytes and feed them to the decoder."""
        from libp2p.network.stream.exceptions import StreamEOF

        try:
            data = await self.stream.read(READ_CHUNK_BYTES)
        except StreamEOF:
            where = " in the middle of a frame" if self.decoder.in_frame else ""
            raise PeerError(f"peer closed the stream{where}", kind=ErrorKind.DISCONNECTED) from None
        except stream_errors() as exc:
            raise PeerError(f"stream lost: {describe_exception(exc)}", kind=ErrorKind.DISCONNECTED) from None
        self.bytes_in += len(data)
        self.last_read = self.clock()
        self.decoder.feed(data)

    async def close(self, reset: bool = False) -> None:
        """Close (or reset) the stream, ignoring a stream that is already gone."""
        self.closed = True
        self._stop_writer()
        with contextlib.suppress(*stream_errors()):
            if reset:
                await self.stream.reset()
            else:
                await self.stream.close()


# ---------------------------------------------------------------- the TLS data plane


def make_tls_contexts() -> tuple[Any, Any, bytes]:
    """Return (server context, client context, SHA-256 of our certificate) for the data plane.

    The certificate and its Ed25519 key are new in every process and never
    written to disk (a memfd, or a 0700 temporary directory where memfd is missing)."""
    import tempfile

    pem, digest = self_signed_certificate("pangea data plane")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pangea-tls")
        try:
            os.write(fd, pem)
            server = tls_server_context(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:  # pragma: no cover - Linux has memfd
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "data-plane.pem"
            path.write_bytes(pem)
            server = tls_server_context(str(path))
    return server, tls_client_context(), digest


def tls_server_context(pem_path: str) -> Any:
    """A TLS 1.3 server context with the certificate and key in ``pem_path``."""
    import ssl

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pem_path)
    return server


def tls_client_context() -> Any:
    """A TLS 1.3 client context that checks no CA and no host name: the caller pins the
    SHA-256 of the server's certificate (the data plane: the one the peer announced in its
    Noise-authenticated Hello; RPC: the fingerprint `serve` printed)."""
    import ssl

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return client


def describe_tls_error(exc: BaseException) -> str:
    """A short text for an ssl or socket error on the data plane."""
    import ssl

    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        if reason in ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_MAC"):
            return "a TLS record failed its integrity check (bytes altered on the way); connection dropped"
        if "BAD_RECORD_MAC" in reason:
            return "the peer found a TLS record altered on the way (integrity check failed); connection dropped"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            return "the other side does not speak TLS (not a pangea data port, or a libp2p dial to it?)"
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "the peer closed the data connection"
        return f"TLS error: {reason or exc}"
    return describe_exception(exc)


async def _tls_io(sock: Any, call: Callable[[], Any], *, writing: bool = False) -> Any:
    """Run a non-blocking ssl call until it completes, waiting for the socket as it asks."""
    import ssl

    import trio

    try:
        while True:
            try:
                return call()
            except ssl.SSLWantReadError:
                if writing:
                    await trio.sleep(0.001)  # NOTE: the reader task owns the readable wait (trio allows one)
                else:
                    await trio.lowlevel.wait_readable(sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)
    except trio.ClosedResourceError:  # the session closed the socket while we waited
        raise PeerError("the data connection was closed", kind=ErrorKind.DISCONNECTED) from None


async def _tls_read_exactly(sock: Any, n: int) -> bytes:
    """Read exactly n bytes from a TLS socket during setup (small messages only)."""
    out = bytearray()
    while len(out) < n:
        want = n - len(out)
        chunk = await _tls_io(sock, lambda want=want: sock.recv(want))  # type: ignore[misc]
        if not chunk:
            raise PeerError("the data connection closed during setup", kind=ErrorKind.DISCONNECTED)
        out += chunk
    return bytes(out)


async def _tls_send_all(sock: Any, data: bytes) -> None:
    """Send a small message during setup."""
    view = memoryview(data)
    while view:
        n = await _tls_io(sock, lambda view=view: sock.send(view), writing=True)  # type: ignore[misc]
        view = view[n:]


def _close_socket(sock: Any) -> None:
    """Close a socket trio may be waiting on (the waiters get ClosedResourceError)."""
    import trio

    with contextlib.suppress(Exception):
        trio.lowlevel.notify_closing(sock)
    with contextlib.suppress(OSError):
        sock.close()


class TlsChannel(Channel):
    """The data plane connection of a session: the same frames as `Channel`, on a
    non-blocking ``ssl.SSLSocket`` driven by trio's readiness waits.

    Encryption and framing of the array bytes run in C (OpenSSL), and payloads
    are decrypted straight into their numpy buffers (`Decoder.payload_space`)."""

    name = "tls"

    def __init__(
        self, sock: Any, limits: Limits, where: str, *, accepted: bool = False, pool: PayloadPool | None = None
    ) -> None:
        super().__init__(None, limits, pool)
        self.sock = sock
        self.where = where  # host:port of the other end, for messages
        cipher = sock.cipher()
        version = str(sock.version() or "TLS").replace("TLSv", "TLS ")
        self.description = f"{version} {cipher[0] if cipher else ''} {'from' if accepted else 'to'} {where}"
        self._scratch = memoryview(bytearray(READ_CHUNK_BYTES))

    async def _write_parts(self, parts: list[bytes | memoryview]) -> None:
        """Write one frame; on any failure the connection is closed (a cut frame cannot be resumed)."""
        import ssl

        sock = self.sock
        if self.closed:
            raise PeerError("the data connection is closed", kind=ErrorKind.DISCONNECTED)
        try:
            for part in parts:
                view = memoryview(part)
                pos = 0
                while pos < len(view):
                    # NOTE: after SSLWantWriteError OpenSSL needs the same bytes again: the
                    # slice is the same until the call succeeds.
                    chunk = view[pos : pos + WRITE_CHUNK_BYTES]
                    n = await _tls_io(sock, lambda c=chunk: sock.send(c), writing=True)  # type: ignore[misc]
                    pos += n
                    self.bytes_out += n
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.close_now()
            raise PeerError(f"data connection lost: {describe_tls_error(exc)}", kind=ErrorKind.DISCONNECTED) from None
        except BaseException:
            # NOTE: only the writer writes, and only the node's shutdown cancels it: a frame
            # cut here can never be followed by another one the peer would misread.
            self.close_now()
            raise

    async def _fill(self) -> None:
        """Read what has arrived: payload bytes straight into their buffer, the rest via the decoder."""
        import ssl

        import trio

        sock, decoder = self.sock, self.decoder
        got = 0
        while True:
            space = decoder.payload_space()
            view = space if space is not None else self._scratch
            try:
                n = sock.recv_into(view)
            except ssl.SSLWantReadError:
                if got:
                    return
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    raise PeerError("the data connection was closed", kind=ErrorKind.DISCONNECTED) from None
                continue
            except ssl.SSLWantWriteError:
                await trio.sleep(0.001)  # NOTE: the sender owns the writable wait
                continue
            except (ssl.SSLError, OSError, ValueError) as exc:
                self.close_now()
                raise PeerError(
                    f"data connection lost: {describe_tls_error(exc)}", kind=ErrorKind.DISCONNECTED
                ) from None
            if n == 0:
                self.close_now()
                where = " in the middle of a frame" if decoder.in_frame else ""
                raise PeerError(f"the peer closed the data connection{where}", kind=ErrorKind.DISCONNECTED)
            self.bytes_in += n
            self.last_read = self.clock()
            if space is None:
                decoder.feed(view[:n])
                return
            decoder.payload_written(n)
            got += n
            if n == len(space):
                return  # the payload is complete
            if got >= DATA_YIELD_BYTES:
                await trio.lowlevel.checkpoint()  # let pings and other sessions run
                got = 0

    def close_now(self) -> None:
        """Close the connection at once."""
        if not self.closed:
            self.closed = True
            self._stop_writer()
            _close_socket(self.sock)

    async def close(self, reset: bool = False) -> None:
        """Close the connection."""
        self.close_now()


@dataclass
class _DataSlot:
    """A token handed to a dialer in our Hello, waiting for its data connection."""

    peer_id: str
    expires: float
    ready: Any  # trio.Event, set once the session exists
    session: PeerSession | None = None
    source: str = ""  # the IP the peer's libp2p connection comes from ("": unknown, any may use it)


class DataPlane:
    """A node's TLS 1.3 listener for array traffic, and the way to dial a peer's.

    The libp2p session stays the control plane; once both sides agree, every
    message of the session travels on one direct TLS connection instead, whose
    record layer is OpenSSL's C code rather than py-libp2p's Python framing.

    Why this is as safe as the libp2p stream:
    - The server is authenticated by pinning. Each node makes a new certificate
      at start; its SHA-256 travels in the node's Hello, inside the Noise session
      that proved the node's libp2p identity (the peer id the user paired with or
      allowed). The dialer accepts a TLS server only with exactly that
      certificate, and TLS 1.3's CertificateVerify proves the server holds its
      private key: a machine in the middle cannot stand in for it.
    - The client is authenticated by a one-time 256-bit token the acceptor puts in
      its Hello (again inside Noise). The dialer sends it only inside TLS to the
      pinned server; it is compared in constant time, used once, expires with the
      handshake timeout. A connection without a valid token never reaches a session.
    - TLS 1.3 (AEAD) encrypts every byte and rejects altered, reordered or replayed
      records; each connection has fresh keys, so recorded bytes of one connection
      mean nothing on another. Inside it, each frame names its task; a result is
      admitted only for a task this session is waiting for, a request only with an
      id not in flight (`Decoder.admit`).
    If the data connection cannot be made (a firewall on the data port) or breaks,
    the session keeps using the libp2p stream, and says so.
    """

    def __init__(self, node: Node, host: str, port: int) -> None:
        self.node = node
        self.server_ctx, self.client_ctx, self.cert_sha256 = make_tls_contexts()
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._slots: dict[bytes, _DataSlot] = {}
        self._handshakes: dict[int, tuple[str, Any]] = {}  # oldest first: number -> (where, its cancel scope)
        self._next_handshake = 0
        self.evicted = 0  # unauthenticated handshakes cancelled to make room for a newer one
        self.refused = 0  # data connections turned away (bad token, too many, failed handshake)

    def listen(self) -> int:
        """Bind the listening socket; return its port. ConfigError when the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen for the data plane on {self.host}:{self.port}: {exc.strerror or exc}",
                hint="pass --data-port with a free port, 0 for any, or off (arrays then use the slower libp2p stream)",
            ) from None
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self.port = int(sock.getsockname()[1])
        return self.port

    def close(self) -> None:
        """Stop listening."""
        if self._listener is not None:
            _close_socket(self._listener)
            self._listener = None

    async def serve(self) -> None:
        """Accept data connections until cancelled; each is checked in its own task."""
        import trio

        listener = self._listener
        assert listener is not None
        try:
            while True:
                try:
                    raw, addr = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener.fileno())
                    continue
                except OSError as exc:  # e.g. EMFILE: do not spin
                    log.warning("data plane: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                self.node.nursery.start_soon(self._accept_one, raw, addr[0], format_host_port(addr[0], addr[1]))
        except trio.ClosedResourceError:
            return
        finally:
            self.close()

    def expect(self, peer_id: str, source: str = "") -> tuple[bytes, _DataSlot]:
        """Make a one-time token for a peer we are about to greet; the slot waits for its session.
        ``source``: the IP its libp2p connection comes from, the only one its data connection may."""
        import secrets

        import trio

        token = secrets.token_bytes(DATA_TOKEN_BYTES)
        expires = time.monotonic() + self.node.limits.handshake_timeout_s + DATA_SETTLE_S
        slot = _DataSlot(peer_id, expires, trio.Event(), source=plain_ip(source))
        self._slots[token] = slot
        return token, slot

    def expected_from(self, host: str) -> bool:
        """Whether a data connection from ``host`` may begin its handshake: a token handed
        out to a peer connected from there (or from an address we could not see) is unused."""
        now, host = time.monotonic(), plain_ip(host)
        return any(slot.expires >= now and slot.source in ("", host) for slot in self._slots.values())

    def forget(self, slot: _DataSlot) -> None:
        """Drop a token that will not be used (the session ended or settled)."""
        for token, other in list(self._slots.items()):
            if other is slot:
                del self._slots[token]

    def _claim(self, token: bytes) -> _DataSlot | None:
        import hmac

        now = time.monotonic()
        found = None
        for key, slot in list(self._slots.items()):
            if slot.expires < now:
                del self._slots[key]
            elif hmac.compare_digest(key, token):
                found = key
        return self._slots.pop(found) if found is not None else None

    async def _accept_one(self, raw: socket.socket, host: str, where: str) -> None:
        import ssl

        import trio

        if not self.expected_from(host):
            self.refused += 1
            log.info("data plane: closed a connection from %s: no peer connected from there holds a token", where)
            raw.close()
            return
        if len(self._handshakes) >= DATA_MAX_HANDSHAKES:
            oldest = next(iter(self._handshakes))
            old_where, old_scope = self._handshakes.pop(oldest)
            self.evicted += 1
            log.warning(
                "data plane: cancelled the handshake of %s, the oldest of %d unauthenticated connections, for %s",
                old_where,
                DATA_MAX_HANDSHAKES,
                where,
            )
            old_scope.cancel()
        number, self._next_handshake = self._next_handshake, self._next_handshake + 1
        scope = trio.CancelScope(deadline=trio.current_time() + DATA_HANDSHAKE_S)
        self._handshakes[number] = (where, scope)
        sock: Any = raw
        slot = None
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with scope:
                sock = self.server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                await _tls_io(sock, sock.do_handshake)
                hello = await _tls_read_exactly(sock, len(DATA_MAGIC) + DATA_TOKEN_BYTES)
                slot = self._claim(hello[len(DATA_MAGIC) :]) if hello.startswith(DATA_MAGIC) else None
            evicted = number not in self._handshakes
            self._handshakes.pop(number, None)  # authenticated (or refused below): no slot held any more
            if scope.cancelled_caught:
                self.refused += 1
                if evicted:
                    return  # logged by the newer connection
                log.warning("data plane: dropped a connection from %s: no TLS handshake and token in time", where)
                return
            if slot is None:
                self.refused += 1
                log.warning("data plane: refused a connection from %s: no valid token", where)
                with contextlib.suppress(PeerError, ssl.SSLError, OSError):
                    await _tls_send_all(sock, b"\x00")
                return
            with trio.move_on_after(max(0.0, slot.expires - time.monotonic())):
                await slot.ready.wait()
            session = slot.session
            if session is None or session.closed.is_set():
                return
            await _tls_send_all(sock, b"\x01")
            channel = TlsChannel(sock, self.node.limits, where, accepted=True, pool=self.node.buffers)
            sock = None  # the session owns it now
            session.attach_data(channel)
        except (ssl.SSLEOFError, ConnectionResetError) as exc:
            self.refused += 1  # closed before a word: a port check (doctor) or a scanner
            log.info("data plane: connection from %s closed before its handshake: %s", where, describe_tls_error(exc))
        except (ssl.SSLError, OSError, PeerError) as exc:
            self.refused += 1
            log.warning("data plane: connection from %s failed: %s", where, describe_tls_error(exc))
        finally:
            self._handshakes.pop(number, None)
            if sock is not None:
                _close_socket(sock)

    async def connect(self, host: str, port: int, cert_sha256: bytes, token: bytes) -> TlsChannel:
        """Dial a peer's data plane and prove our token; PeerError with the reason otherwise."""
        import hashlib
        import hmac
        import ssl

        import trio

        where = format_host_port(host, port)
        sock: Any = None
        try:
            with trio.fail_after(DATA_CONNECT_S):
                sock = await _tcp_connect(host, port)
                sock = self.client_ctx.wrap_socket(sock, do_handshake_on_connect=False)
                await _tls_io(sock, sock.do_handshake)
                presented = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").digest()
                if not hmac.compare_digest(presented, cert_sha256):
                    raise PeerError(
                        f"{where} presented a TLS certificate the peer did not announce "
                        "(another program on that port, or a machine in the middle); not sending anything",
                        kind=ErrorKind.REFUSED,
                    )
                await _tls_send_all(sock, DATA_MAGIC + token)
                answer = await _tls_read_exactly(sock, 1)
                if answer != b"\x01":
                    raise PeerError(f"{where} refused our data plane token", kind=ErrorKind.REFUSED)
            channel = TlsChannel(sock, self.node.limits, where, pool=self.node.buffers)
            sock = None
            return channel
        except trio.TooSlowError:
            raise PeerError(
                f"no answer from {where} within {DATA_CONNECT_S:.0f} s (a firewall dropping the data port?)",
                kind=ErrorKind.TIMEOUT,
            ) from None
        except ConnectionRefusedError:
            raise PeerError(
                f"{where} refused the connection (nothing listening on the data port)", kind=ErrorKind.REFUSED
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise PeerError(
                f"cannot connect to {where}: {describe_tls_error(exc)}", kind=ErrorKind.UNREACHABLE
            ) from None
        finally:
            if sock is not None:
                _close_socket(sock)


async def _tcp_connect(host: str, port: int) -> socket.socket:
    """Connect a non-blocking TCP socket (TCP_NODELAY: small messages go out at once)."""
    import trio

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        await trio.lowlevel.wait_writable(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.ECONNREFUSED:
            raise ConnectionRefusedError(err, os.strerror(err))
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        _close_socket(sock)
        raise
    return sock


async def tcp_probe(host: str, port: int, timeout_s: float) -> tuple[float | None, str]:
    """A plain TCP connect to ``host:port`` (doctor, and a dial that timed out): (milliseconds,
    "") when it connects, else (None, why: "timed out" or the OS's reason, "Connection refused")."""
    import trio

    start = time.perf_counter()
    sock: socket.socket | None = None
    try:
        with trio.fail_after(timeout_s):
            found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # a /dns4/ name too
            sock = await _tcp_connect(str(found[0][4][0]), port)
        return (time.perf_counter() - start) * 1000, ""
    except trio.TooSlowError:
        return None, "timed out"
    except OSError as exc:  # ConnectionRefusedError: "Connection refused", as doctor prints it
        return None, exc.strerror or type(exc).__name__
    finally:
        if sock is not None:
            _close_socket(sock)


###############################################################################
# 12. Bulk channels
#
# Array bytes off the Cap'n Proto path, both ends: for a client on this box, shared
# memory (memfd segments handed over a Unix socket: `BulkServer` on the node; the
# Client's `_BulkChannel` and its segment pools); for a client on another box, TLS
# connections to the RPC port itself (`TlsBulkConnection` and `TlsBulkBatches` on the
# node; the Client's `_TlsBulkLink` and `_TlsBulkPool`). Either way the RPC carries a
# task's metadata and names its batch; the RPC service (20) takes and finishes batches.
###############################################################################


# The bulk channel: arrays off the Cap'n Proto path for a client on this box.
#
# Beside a loopback RPC endpoint the node listens on a Unix socket (SOCK_SEQPACKET,
# 0600 in a 0700 directory of its own; its path is in the node's session file, where
# a `Client` of the same home finds it). A client proves it is this user (SO_PEERCRED
# and the RPC token), then, for each task, hands over a batch of sealed memfd segments
# with SCM_RIGHTS under a random 16-byte name and sends only the metadata on the RPC
# (`SharedSlice`, `TaskSpec.bulkBatch`). The node maps operand segments read-only and
# wraps them as numpy arrays (kernels read them in place), writes the output into the
# client's output segment, and unmaps the batch when the task ends or the socket closes.

BULK_MAX_CONNECTIONS = 32  # bulk sockets open at once (only this user can reach it; bounded anyway)
BULK_MAX_BATCHES = RPC_MAX_CALLS_IN_FLIGHT  # batches one connection may have waiting for their task
BULK_MAX_SEGMENTS = 16  # segments of one batch: a kernel's operands and its output
BULK_MESSAGE_BYTES = 4096  # the largest message on the bulk socket (a name and one kind byte per segment)
BULK_SOCKET_FILENAME = "bulk.sock"
# The bulk channel over TLS, for a Client on another box: a TLS connection to the RPC port
# that opens with this line carries array bytes, not Cap'n Proto (a Cap'n Proto stream
# cannot open so: its first word counts segments, and this one would be 1.4 billion).
BULK_TLS_MAGIC = b"PGBULK1\n"
BULK_TLS_FRAME_BYTES = 5  # a control frame: its type (one byte) and its payload's length (4 bytes, big-endian)
BULK_TLS_WRITE_BYTES = 1 << 20  # a result goes out in writes of this size, with the loop free between them
BULK_TLS_MAX_BATCHES = 2  # batches one TLS connection may have waiting: a Client runs one task per connection
# A batch of more bytes than this is mapped in a worker thread (its operands' page tables:
# ~5-10 ms per 64 MiB), so the RPC loop serves other calls meanwhile; a smaller one at once
# (a thread hop would cost tiny tasks more than the mapping).
BULK_MAP_INLINE_BYTES = 1 << 20
# Linux 5.14 (not in Python 3.11's mmap): map a range's pages in one call. READ maps the pages
# there 16 at a time (and allocates the missing ones), 3x faster than WRITE for a shared segment
# a client filled; WRITE allocates them dirty, for a client's fresh segment.
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23


@dataclass
class BulkSegment:
    """One segment a client handed the node: its bytes, size and whether the node may write it.

    On the bulk socket (same box) ``mapping`` maps the client's memfd. Over TLS (another box)
    an operand's ``mapping`` is the node's own buffer the bytes were received into, and the
    output has none: ``sender`` sends the result back on the connection of batch ``name``."""

    mapping: Any  # an mmap.mmap (bulk socket), a numpy uint8 buffer (TLS), None (a TLS output)
    size: int
    writable: bool
    sender: TlsBulkConnection | None = None
    name: bytes = b""

    def close(self) -> None:
        """Unmap now; while a numpy view still holds it (a kernel still running), when that view goes."""
        if hasattr(self.mapping, "close"):
            with contextlib.suppress(BufferError):
                self.mapping.close()
        else:  # NOTE: a buffer of the node's own (TLS): freed when the last view of it goes
            self.mapping = None


def bulk_take_fds(fds: Sequence[int], kinds: bytes, room_bytes: int) -> list[BulkSegment]:
    """Map the memfd segments ``fds`` (``kinds``: b"r" read-only operand, b"w" output) and close
    the descriptors, whatever happens; TaskError(bad-input) for a descriptor that is not a
    memfd sealed against shrinking, or segments beyond ``room_bytes`` in all."""
    import fcntl
    import mmap
    import stat as stat_module

    segments: list[BulkSegment] = []
    try:
        if len(fds) != len(kinds) or not fds or len(fds) > BULK_MAX_SEGMENTS:
            raise TaskError(f"a batch of {len(fds)} segments for {len(kinds)} kinds", kind=ErrorKind.BAD_INPUT)
        total = 0
        for fd, kind in zip(fds, kinds, strict=True):
            info = os.fstat(fd)
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            needed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            # NOTE: a segment its owner could shrink would crash the node (SIGBUS) as it reads
            if not stat_module.S_ISREG(info.st_mode) or seals & needed != needed or info.st_size <= 0:
                raise TaskError("a segment that is not a sealed memfd", kind=ErrorKind.BAD_INPUT)
            total += info.st_size
            if total > room_bytes:
                raise TaskError(
                    f"segments of more than {format_bytes(room_bytes)} on one connection", kind=ErrorKind.BUSY
                )
            writable = kind == ord("w")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            # NOTE: an operand's page tables at once, not per fault; an output's only where
            # write_shared_output writes (its segment is sized for the kernel's bound, often 2x)
            flags = mmap.MAP_SHARED | (0 if writable else getattr(mmap, "MAP_POPULATE", 0))
            segments.append(BulkSegment(mmap.mmap(fd, info.st_size, flags=flags, prot=prot), info.st_size, writable))
    except BaseException:
        for s in segments:
            s.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return segments


def shared_operand(reader: Any, index: int, segments: Sequence[BulkSegment]) -> np.ndarray:
    """The array of an RPC `Array` whose bytes are in a shared segment (``reader.shared``), read in
    place (a read-only view, no copy); TaskError(bad-input) when inconsistent."""
    from types import SimpleNamespace

    slot, offset = int(reader.shared.segment), int(reader.shared.offset)
    if not 1 <= slot <= len(segments) or segments[slot - 1].writable:
        raise TaskError(f"operand {index}: no shared segment {slot} in its batch", kind=ErrorKind.BAD_INPUT)
    segment = segments[slot - 1]
    name, shape = str(reader.dtype), [int(d) for d in reader.shape]
    itemsize = _wire_dtype(name).itemsize if name in ALLOWED_DTYPES else 0
    nbytes = math.prod(shape) * itemsize
    if offset + nbytes > segment.size:
        raise TaskError(f"operand {index}: runs past the end of its shared segment", kind=ErrorKind.BAD_INPUT)
    meta = SimpleNamespace(dtype=name, shape=shape, nbytes=nbytes)
    view = memoryview(segment.mapping)[offset : offset + nbytes]
    try:
        (array,) = _arrays_from([meta], view, task_id=0)  # type: ignore[arg-type]
    except MessageError as exc:
        raise TaskError(str(exc).replace("array 0", f"operand {index}"), kind=ErrorKind.BAD_INPUT) from None
    return array


def write_shared_output(output: np.ndarray, segment: BulkSegment) -> bool:
    """Copy a task's output into the client's output segment (little-endian, C order); False
    when it does not fit (the output then travels in the message). From any thread: numpy's
    copy lets go of the GIL."""
    import numpy as np

    (meta,), (view,) = _array_parts([output])
    if not segment.writable or meta[2] > segment.size:
        return False
    with contextlib.suppress(OSError, ValueError):  # NOTE: before Linux 5.14 the copy faults them in
        segment.mapping.madvise(MADV_POPULATE_READ, 0, meta[2])  # its pages in one call, not per fault
    target = np.frombuffer(segment.mapping, dtype=np.uint8, count=meta[2])
    target[...] = np.frombuffer(view, dtype=np.uint8)
    del target  # NOTE: the mapping cannot be closed while a view of it lives
    return True


def _fd_size(fd: int) -> int:
    """The size of the file behind ``fd`` (0 when it cannot say: bulk_take_fds refuses it then)."""
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


def _remove_stale_bulk_dirs(root: Path) -> None:
    """Remove the bulk-socket directories this user's nodes left behind when killed (their pid is gone)."""
    import stat as stat_module

    for directory in root.glob("pangea-bulk-*-*"):
        pid = directory.name.split("-")[2]
        with contextlib.suppress(OSError, ValueError):
            info = directory.lstat()  # NOTE: not a symlink another user planted in /tmp
            if (
                stat_module.S_ISDIR(info.st_mode)
                and info.st_uid == os.geteuid()
                and not Path(f"/proc/{int(pid)}").exists()
            ):
                shutil.rmtree(directory, ignore_errors=True)


class BulkServer:
    """The node's end of the bulk socket (on the RPC thread's asyncio loop): who may connect, and the
    batches of segments each connection handed over until a task takes them."""

    def __init__(self, token: str, room_bytes: int) -> None:
        self.token = token.encode()
        self.room_bytes = room_bytes  # bytes of segments one connection may have mapped at once
        self.path: Path | None = None
        self._listener: socket.socket | None = None
        self._loop: Any = None
        self._peers: dict[socket.socket, dict[bytes, list[BulkSegment]]] = {}
        self._authenticated: set[socket.socket] = set()
        self._taken: dict[bytes, list[BulkSegment]] = {}  # batches of tasks in flight
        self._mapping: dict[bytes, tuple[socket.socket, int]] = {}  # batches mapped off the loop: whose, bytes

    def start(self, loop: Any) -> Path:
        """Listen in a new 0700 directory; return the socket's path (0600)."""
        import tempfile

        _remove_stale_bulk_dirs(Path(tempfile.gettempdir()))
        # NOTE: 0700, short enough for sun_path; the pid in its name tells a later node it is stale
        directory = Path(tempfile.mkdtemp(prefix=f"pangea-bulk-{os.getpid()}-"))
        self.path = directory / BULK_SOCKET_FILENAME
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(BULK_MAX_CONNECTIONS)
        listener.setblocking(False)
        self._listener, self._loop = listener, loop
        loop.add_reader(listener.fileno(), self._accept)
        return self.path

    def stop(self) -> None:
        """Close every connection and unmap what they handed over; remove the socket and its directory."""
        for peer in list(self._peers):
            self._drop(peer)
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
        if self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            peer, _ = self._listener.accept()
        except OSError:
            return
        pid, uid, _gid = struct.unpack("3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid() or len(self._peers) >= BULK_MAX_CONNECTIONS:
            log.warning("bulk: refusing a connection of uid %d (pid %d): %d open", uid, pid, len(self._peers))
            peer.close()
            return
        peer.setblocking(False)
        self._peers[peer] = {}
        self._loop.add_reader(peer.fileno(), self._readable, peer)

    def _drop(self, peer: socket.socket) -> None:
        self._loop.remove_reader(peer.fileno())
        for batch in self._peers.pop(peer, {}).values():
            for s in batch:
                s.close()
        self._authenticated.discard(peer)
        peer.close()

    def _readable(self, peer: socket.socket) -> None:
        import hmac

        try:
            data, fds, flags, _ = socket.recv_fds(peer, BULK_MESSAGE_BYTES, BULK_MAX_SEGMENTS)
        except BlockingIOError:
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if not data or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            self._drop(peer)
            return
        if peer not in self._authenticated:
            for fd in fds:
                os.close(fd)
            if data[:1] == b"H" and (not self.token or hmac.compare_digest(data[1:], self.token)):
                self._authenticated.add(peer)
                self._reply(peer, b"K")
            else:
                log.warning("bulk: closing a connection: wrong or missing token")
                self._reply(peer, b"Ewrong or missing RPC token")
                self._drop(peer)
            return
        name, kinds = data[1:17], data[17:]
        batches = self._peers[peer]
        if data[:1] != b"S" or len(name) != 16 or name in batches or name in self._taken or name in self._mapping:
            for fd in fds:
                os.close(fd)
            self._drop(peer)
            return
        try:
            mapping = [nbytes for owner, nbytes in self._mapping.values() if owner is peer]
            if len(batches) + len(mapping) >= BULK_MAX_BATCHES:
                for fd in fds:
                    os.close(fd)
                raise TaskError(f"{BULK_MAX_BATCHES} batches wait for their task", kind=ErrorKind.BUSY)
            held = sum(s.size for batch in batches.values() for s in batch) + sum(mapping)
            nbytes = sum(_fd_size(fd) for fd in fds)
            if nbytes <= BULK_MAP_INLINE_BYTES:
                batches[name] = bulk_take_fds(fds, kinds, self.room_bytes - held)
                self._reply(peer, b"K" + name)
                return
            try:
                future = self._loop.run_in_executor(None, bulk_take_fds, fds, kinds, self.room_bytes - held)
            except RuntimeError:  # NOTE: the loop is shutting down: no task will take it
                for fd in fds:
                    os.close(fd)
                raise OSError("the node is stopping") from None
            self._mapping[name] = (peer, nbytes)  # NOTE: counted against the room until mapped
            future.add_done_callback(functools.partial(self._mapped, peer, name))
        except (TaskError, OSError, ValueError) as exc:
            self._reply(peer, b"E" + name + one_line(describe_exception(exc), 300).encode())

    def _mapped(self, peer: socket.socket, name: bytes, future: Any) -> None:
        """A batch mapped off the loop: keep it for its task and say so, or say why not; its
        segments are unmapped at once when the connection closed meanwhile."""
        self._mapping.pop(name, None)
        try:
            segments = future.result()
        except (TaskError, OSError, ValueError) as exc:
            self._reply(peer, b"E" + name + one_line(describe_exception(exc), 300).encode())
            return
        if peer not in self._peers:
            for segment in segments:
                segment.close()
            return
        self._peers[peer][name] = segments
        self._reply(peer, b"K" + name)

    def _reply(self, peer: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):  # NOTE: a full or closed socket: the client gives up on its own
            peer.send(data)

    def take(self, name: bytes) -> list[BulkSegment]:
        """The segments of batch ``name`` for the task that names it (once); TaskError(bad-input) when
        no connection handed it over. Give them back with `finish`."""
        for batches in self._peers.values():
            if name in batches:
                self._taken[name] = batches.pop(name)
                return self._taken[name]
        raise TaskError("no shared segments under the batch the task names", kind=ErrorKind.BAD_INPUT)

    def finish(self, name: bytes) -> None:
        """Unmap the segments of a task that ended."""
        for s in self._taken.pop(name, []):
            s.close()


def bulk_frame(kind: bytes, payload: bytes = b"") -> bytes:
    """A control frame of the bulk channel over TLS: its type, its payload's length, the payload."""
    return kind + len(payload).to_bytes(4, "big") + payload


def parse_bulk_upload(payload: bytes) -> tuple[bytes, bytes, list[int]]:
    """The batch name, kinds and sizes an upload header ("U") declares; MessageError when malformed."""
    if len(payload) < 17:
        raise MessageError("an upload header shorter than its name and count")
    name, count = payload[:16], payload[16]
    entries = payload[17:]
    if not 1 <= count <= BULK_MAX_SEGMENTS or len(entries) != 9 * count:
        raise MessageError(f"an upload header of {count} segments in {len(entries)} bytes")
    kinds, sizes = b"", list[int]()
    for i in range(count):
        kind, size = entries[9 * i : 9 * i + 1], int.from_bytes(entries[9 * i + 1 : 9 * i + 9], "big")
        if kind not in (b"r", b"w") or size <= 0 or size > RPC_MAX_MIB << 20:
            raise MessageError(f"segment {i}: kind {kind!r} of {size} bytes")
        kinds, sizes = kinds + kind, [*sizes, size]
    if kinds.count(b"w") > 1 or (b"w" in kinds and not kinds.endswith(b"w")):
        raise MessageError("an upload with an output segment that is not its last and only one")
    return name, kinds, sizes


class TlsBulkBatches:
    """The batches remote Clients uploaded over TLS, until a task takes them (the same `take` and
    `finish` as `BulkServer`). The operands' bytes live in the node's memory, so each batch is
    charged to the node's budget from its header to the end of its task."""

    def __init__(self, token: str, budget: MemoryBudget, limiter: LoginLimiter) -> None:
        self.token = token.encode()
        self.budget = budget
        self.limiter = limiter  # the RPC login's: a wrong token here waits like one there
        self._waiting: dict[bytes, tuple[TlsBulkConnection, list[BulkSegment], int]] = {}
        self._taken: dict[bytes, tuple[list[BulkSegment], int]] = {}

    def charge(self, nbytes: int) -> TaskError | None:
        """Take ``nbytes`` of the budget for an upload; why not when they do not fit (None: taken)."""
        held = f"operands of {format_bytes(nbytes)}"
        while not self.budget.try_acquire(nbytes):
            refusal = budget_refusal(self.budget, "", nbytes, 0, held=held)
            if refusal is not None:  # NOTE: None: what held the rest was given back meanwhile
                return refusal
        return None

    def add(self, conn: TlsBulkConnection, name: bytes, segments: list[BulkSegment], charged: int) -> None:
        """Keep an uploaded batch for the task that will name it."""
        self._waiting[name] = (conn, segments, charged)

    def pending(self, conn: TlsBulkConnection) -> int:
        """The batches of ``conn`` that wait for their task."""
        return sum(1 for c, _, _ in self._waiting.values() if c is conn)

    def known(self, name: bytes) -> bool:
        """Whether a batch of that name waits or runs."""
        return name in self._waiting or name in self._taken

    def take(self, name: bytes) -> list[BulkSegment]:
        """The segments of batch ``name`` for the task that names it (once); TaskError(bad-input) when
        no connection uploaded it. Give them back with `finish`."""
        if name not in self._waiting:
            raise TaskError("no uploaded arrays under the batch the task names", kind=ErrorKind.BAD_INPUT)
        _, segments, charged = self._waiting.pop(name)
        self._taken[name] = (segments, charged)
        return segments

    def finish(self, name: bytes) -> None:
        """Free the buffers of a task that ended and give back their share of the budget."""
        segments, charged = self._taken.pop(name, ([], 0))
        for s in segments:
            s.close()
        self.budget.release(charged)

    def drop(self, conn: TlsBulkConnection) -> None:
        """A connection closed: free its batches no task took (a task that took one finishes it)."""
        for name in [n for n, (c, _, _) in self._waiting.items() if c is conn]:
            _, segments, charged = self._waiting.pop(name)
            for s in segments:
                s.close()
            self.budget.release(charged)


class TlsBulkConnection:
    """The node's end of one bulk connection over TLS: a remote Client's arrays, received straight
    into buffers allocated from the header that declared them (no copy: asyncio's TLS reader
    decrypts into them), and its results sent back in bounded writes.

    The stream after `BULK_TLS_MAGIC`, client to node: control frames (`bulk_frame`), "H" + the RPC
    token first, then per task "U" + a 16-byte batch name + a count + per segment a kind ("r":
    an operand, "w": the output) and a size (8 bytes, big-endian). The node answers "K" + name,
    or "E" + name + kind + newline + reason; after a "K" the client sends each operand's bytes
    in order, and the node answers "K" + name once they are in. Node to client, after a task
    that wrote its output here: "R" + name + size, then the output's bytes. NOTE: the connection
    owns no socket: `write`, `close` and `logged_in` are its RpcConnection's."""

    def __init__(
        self,
        batches: TlsBulkBatches,
        source: str,
        write: Callable[[Any], None],
        close: Callable[[], None],
        logged_in: Callable[[], None],
        unsent: Callable[[], int] = lambda: 0,
    ) -> None:
        self.batches, self.source = batches, source
        self._write, self._close, self._logged_in = write, close, logged_in
        self._unsent = unsent  # bytes written and not sent yet (the transport's buffer)
        self.authenticated = False
        self.closed = False
        self._control = bytearray(BULK_TLS_FRAME_BYTES + BULK_MESSAGE_BYTES)
        self._filled = 0  # bytes of _control received
        self._upload: list[Any] = []  # the buffers of the batch being received (numpy uint8)
        self._index = self._offset = 0
        self._batch: tuple[bytes, list[BulkSegment], int] | None = None
        self._discarding = False  # a refused login waits out its delay: what comes meanwhile is dropped

    # -- bytes in
    def get_buffer(self) -> memoryview:
        """Where the next bytes go: the current operand's buffer, or the control frame's."""
        if self._discarding:
            return memoryview(self._control)
        if self._upload:
            return memoryview(self._upload[self._index])[self._offset :]
        return memoryview(self._control)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer `get_buffer` gave."""
        if self._discarding:
            return
        if self._upload:
            self._offset += nbytes
            if self._offset == self._upload[self._index].nbytes:
                self._index, self._offset = self._index + 1, 0
                if self._index == len(self._upload):
                    self._uploaded()
            return
        self._filled += nbytes
        self._frames()

    def receive(self, data: bytes) -> None:
        """Bytes that arrived before the connection knew its kind: fed as if they came now."""
        view = memoryview(data)
        while view and not self.closed and not self._discarding:
            buffer = self.get_buffer()
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def _frames(self) -> None:
        while self._filled >= BULK_TLS_FRAME_BYTES and not self.closed and not self._upload:
            size = int.from_bytes(self._control[1:BULK_TLS_FRAME_BYTES], "big")
            if size > BULK_MESSAGE_BYTES:
                return self._fail(f"a control frame of {size} bytes")
            end = BULK_TLS_FRAME_BYTES + size
            if self._filled < end:
                return None
            kind, payload = bytes(self._control[:1]), bytes(self._control[BULK_TLS_FRAME_BYTES:end])
            rest = bytes(self._control[end : self._filled])
            self._filled = 0
            self._handle(kind, payload)
            if rest:  # NOTE: a client that sent on without waiting for the answer
                self.receive(rest)
                return None
        return None

    def _handle(self, kind: bytes, payload: bytes) -> None:
        import hmac

        if not self.authenticated:
            if kind == b"H" and (not self.batches.token or hmac.compare_digest(payload, self.batches.token)):
                self.authenticated = True
                self._logged_in()
                self._write(bulk_frame(b"K"))
                return
            delay_s, count = self.batches.limiter.refused(self.source, time.monotonic())
            if count:
                log.warning("bulk over TLS: wrong or missing token, %d time(s) from %s", count, self.source)
            self._refuse_later(delay_s)
            return
        if kind != b"U":
            return self._fail(f"a control frame of type {kind!r}")
        try:
            name, kinds, sizes = parse_bulk_upload(payload)
        except MessageError as exc:
            return self._fail(str(exc))
        if self.batches.known(name) or self._batch is not None:
            return self._fail("a batch name in use")
        if self.batches.pending(self) >= BULK_TLS_MAX_BATCHES:
            return self._answer_error(name, TaskError("batches wait for their tasks already", kind=ErrorKind.BUSY))
        need = sum(size for k, size in zip(kinds, sizes, strict=True) if k == ord("r"))
        refusal = self.batches.charge(need)
        if refusal is not None:
            return self._answer_error(name, refusal)
        import numpy as np

        segments = []
        for k, size in zip(kinds, sizes, strict=True):
            if k == ord("r"):
                buffer = np.empty(size, dtype=np.uint8)  # NOTE: pages come as the bytes do
                segments.append(BulkSegment(buffer, size, False, name=name))
                self._upload.append(buffer)
            else:
                segments.append(BulkSegment(None, size, True, sender=self, name=name))
        self._batch, self._index, self._offset = (name, segments, need), 0, 0
        self._write(bulk_frame(b"K", name))
        if not self._upload:
            self._uploaded()

    def _uploaded(self) -> None:
        assert self._batch is not None
        name, segments, charged = self._batch
        self._upload, self._batch = [], None
        self.batches.add(self, name, segments, charged)
        self._write(bulk_frame(b"K", name))

    def _answer_error(self, name: bytes, error: TaskError) -> None:
        self._write(bulk_frame(b"E", name + f"{error.kind}\n{one_line(str(error), 300)}".encode()))

    def _refuse_later(self, delay_s: float) -> None:
        import asyncio

        def refuse() -> None:
            self._write(bulk_frame(b"E", b"bad-input\nlogin refused: wrong or missing RPC token"))
            self._fail("")

        self._discarding = True
        asyncio.get_running_loop().call_later(delay_s, refuse)

    def _fail(self, reason: str) -> None:
        if reason:
            log.info("bulk over TLS: closing a connection from %s: %s", self.source, reason)
        self.connection_lost()
        self._close()

    # -- bytes out
    async def send_result(self, name: bytes, output: np.ndarray, room: int) -> bool:
        """Send a task's output back on this connection (at most ``room`` bytes); False when it does
        not fit or the connection is gone (then the output travels in the RPC message)."""
        import asyncio

        (meta,), (view,) = _array_parts([output])
        if self.closed or meta[2] > room or self._unsent():  # NOTE: a result not read yet: one at a time
            return False
        data = memoryview(view).cast("B")
        self._write(bulk_frame(b"R", name + meta[2].to_bytes(8, "big")))
        for start in range(0, meta[2], BULK_TLS_WRITE_BYTES):
            if self.closed:
                return False
            # NOTE: no wait for the socket to drain: the client reads the result once the task's
            # answer has come, which waits for this; the transport holds what it could not send
            self._write(data[start : start + BULK_TLS_WRITE_BYTES])
            await asyncio.sleep(0)  # the loop serves other calls between writes
        return not self.closed

    def connection_lost(self) -> None:
        """The connection closed: what it uploaded and no task took is freed; senders stop."""
        if self.closed:
            return
        self.closed = True
        if self._batch is not None:  # half-received: its charge goes back
            self.batches.budget.release(self._batch[2])
            self._batch, self._upload = None, []
        self.batches.drop(self)


NO_SHM_ENV = "PANGEA_NO_SHM"  # set to 1: a Client sends every array in its RPC messages
# A task whose operands and result are fewer bytes goes in the RPC message even with shared
# memory: handing segments over (a bulk-socket round trip, fstat and mmap on the node) cost
# tiny tasks a quarter of their throughput, and 64 KiB cross in a message in well under a ms.
BULK_MIN_BYTES = 64 << 10
BULK_POOL_SEGMENTS = 8  # operand segments a Client keeps for reuse (warm: written again, not faulted in)
BULK_POOL_MAX_BYTES = 2 << 30  # their bytes at most
# A Client with shared memory prepares, as it connects and in a background thread, one
# operand segment and one result segment of this size, touching them: fresh memory costs
# 0.06-0.18 s per 64 MiB the first time, which would otherwise fall on its first transfer
# (0.2x the steady rate). So 2 x 64 MiB held until close (`Client(warm_mib=0)`: none); a
# prepared segment its calls show too small for them goes at once.
BULK_WARM_MIB = 64
BULK_WARM_WAIT_S = 10.0  # a call waits this long at most for a segment being prepared
BULK_REPLY_TIMEOUT_S = 30.0  # a node answers a batch at once; one that does not has gone away
# TLS bulk connections a Client of a node on another box keeps: one per task in flight, so
# this many large tasks cross at once (more wait for one); each is a TCP connection and a
# thread of its own while it sends or receives.
BULK_TLS_CLIENT_CONNECTIONS = 4
BULK_TLS_CONNECT_TIMEOUT_S = 10.0  # TCP connect plus the TLS handshake and the token's answer


def local_node_bulk_socket(port: int) -> str:
    """The bulk socket of the node of this user's home that serves RPC on loopback ``port``; "": none."""
    root = home_path() / SESSIONS_DIRNAME
    for role, pid in live_sessions(home_path()) if root.is_dir() else []:
        info = SessionDir.load(root / f"{role}-{pid}")
        if str(info.get("rpc", "")).endswith(f":{port}") and info.get("bulk"):
            return str(info["bulk"])
    return ""


class _Segment:
    """One memfd of a Client, sealed at its size and mapped here read-write."""

    def __init__(self, size: int, name: str) -> None:
        import fcntl
        import mmap

        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.mapping = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.address = _buffer_address(self.mapping)  # where an array over it starts: found again by address

    def holds(self, a: np.ndarray) -> int:
        """The offset of ``a``'s bytes in this segment; -1 when they are not all in it."""
        start = int(a.__array_interface__["data"][0])
        inside = self.address <= start and start + a.nbytes <= self.address + self.size and self.fd >= 0
        return start - self.address if inside else -1

    def populate(self, nbytes: int) -> None:
        """Fault the first ``nbytes`` in now, writable (page tables too), so the first write into
        them and the node's mapping find the memory there: one madvise, else a write per page."""
        import numpy as np

        nbytes = min(self.size, -(-nbytes // mmap_page()) * mmap_page())
        try:
            self.mapping.madvise(MADV_POPULATE_WRITE, 0, nbytes)
        except OSError:  # NOTE: EINVAL before Linux 5.14
            np.frombuffer(self.mapping, dtype=np.uint8)[: nbytes : mmap_page()] = 0

    def array(self, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        """A numpy array over the segment's first bytes (C order)."""
        import numpy as np

        return np.ndarray(tuple(shape), dtype=dtype, buffer=self.mapping)

    def close(self) -> None:
        """Unmap (when no array views it any more) and close the descriptor."""
        with contextlib.suppress(BufferError):
            self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _buffer_address(buffer: Any) -> int:
    """The address of a writable buffer's first byte (no view of it is left behind)."""
    import numpy as np

    return int(np.frombuffer(buffer, np.uint8, count=1).__array_interface__["data"][0])


@dataclass
class _BulkTask:
    """The shared segments of one task of a Client: its operands' (pooled, or borrowed from the
    caller's shared arrays) and its output's."""

    segments: list[_Segment]
    slots: list[int]  # per operand: 1 + its segment's index, 0: in the message (an empty array)
    output: _Segment | None
    pool: _SegmentPool
    outputs: _SegmentPool
    released: bool = False
    handed: bool = False  # the output segment is the caller's result now (back to the pool when it goes)
    offsets: list[int] = field(default_factory=list)  # per operand: where its bytes start in its segment
    borrowed: list[_Segment] = field(default_factory=list)  # the caller's: not given back to a pool here

    def release(self) -> None:
        """Give the segments back to their pools (once); the output's only when not handed out."""
        if self.released:
            return
        self.released = True
        for s in self.segments:
            if s is not self.output and not any(s is b for b in self.borrowed):
                self.pool.put(s)
        if self.output is not None and not self.handed:
            self.outputs.put(self.output)


class _SegmentPool:
    """The segments a Client reuses, for any thread (a lock around the free list), and the
    one it may prepare ahead (`prepare`): made and touched in a background thread."""

    def __init__(self, name: str = "pangea-operand") -> None:
        self.name = name
        self._free: list[_Segment] = []
        self._prepared: list[_Segment] = []  # prepared ahead and not used yet (also in _free)
        self._warming: threading.Thread | None = None
        self._warm_bytes = 0
        self._lock = threading.RLock()  # NOTE: re-entrant: a result's finalizer may run (GC) while it is held
        self._closed = False

    def prepare(self, nbytes: int, touch_bytes: int) -> None:
        """Make one segment of ``nbytes`` (page-rounded) and touch its first ``touch_bytes`` in a
        background thread, for the first `get` it fits; at most one at a time, none after `close`.
        (Untouched pages take no memory.)"""
        size = -(-nbytes // mmap_page()) * mmap_page()
        with self._lock:
            if self._closed or self._warming is not None or size <= 0:
                return
            self._warm_bytes = size
            self._warming = threading.Thread(
                target=self._warm, args=(size, touch_bytes), name="pangea-warm", daemon=True
            )
        self._warming.start()

    def _warm(self, size: int, touch_bytes: int) -> None:
        try:
            segment = _Segment(size, self.name)
            segment.populate(touch_bytes)
        except (OSError, ValueError) as exc:  # NOTE: no memory for it: the first call makes its own
            log.info("Client: no segment prepared ahead: %s", describe_exception(exc))
            return
        with self._lock:
            if not self._closed:
                self._free.append(segment)
                self._prepared.append(segment)
                return
        segment.close()

    def _wait_warm(self, nbytes: int) -> None:
        """Wait (bounded) for the segment being prepared when ``nbytes`` would fit it: it is
        part made, so waiting is faster than making another."""
        warming = self._warming
        if warming is not None and warming.is_alive() and nbytes <= self._warm_bytes <= 2 * nbytes + mmap_page():
            warming.join(BULK_WARM_WAIT_S)

    def get(self, nbytes: int) -> _Segment:
        """A free segment of at least ``nbytes`` (and not much more), else a new one."""
        self._wait_warm(nbytes)
        unused: list[_Segment] = []
        with self._lock:
            fits = [s for s in self._free if nbytes <= s.size <= 2 * nbytes + mmap_page()]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._free.remove(best)
                if best in self._prepared:
                    self._prepared.remove(best)
                return best
            # NOTE: a prepared segment too small for the calls made is memory nobody asked for
            unused = [s for s in self._prepared if s.size < nbytes]
            for s in unused:
                self._prepared.remove(s)
                self._free.remove(s)
        for s in unused:
            s.close()
        return _Segment(-(-nbytes // mmap_page()) * mmap_page(), self.name)

    def put(self, segment: _Segment) -> None:
        """Keep a segment for reuse, or close it when the pool is full."""
        with self._lock:
            if self._closed:  # NOTE: a result dropped after its Client closed
                segment.close()
                return
            self._free.append(segment)
            while len(self._free) > BULK_POOL_SEGMENTS or sum(s.size for s in self._free) > BULK_POOL_MAX_BYTES:
                # NOTE: too many: the smallest goes (a burst of small calls must not evict the warm
                # large segments, the dear ones to make again); too many bytes: the oldest
                many = len(self._free) > BULK_POOL_SEGMENTS
                dropped = min(self._free, key=lambda s: s.size) if many else self._free[0]
                self._free.remove(dropped)
                if dropped in self._prepared:
                    self._prepared.remove(dropped)
                dropped.close()

    def close(self) -> None:
        """Close every free segment (and the one being prepared, once it is made)."""
        with self._lock:
            free, self._free, self._prepared, self._closed = self._free, [], [], True
            warming = self._warming
        for s in free:
            s.close()
        if warming is not None:
            warming.join(BULK_WARM_WAIT_S)


def mmap_page() -> int:
    """The size of a memory page."""
    import mmap

    return mmap.PAGESIZE


class _BulkChannel:
    """A Client's end of its node's bulk socket (see `BulkServer`): opened and authenticated once,
    then used from the Client's loop, each batch answered by name."""

    def __init__(self, path: str, token: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(5.0)
            self.sock.connect(path)
            self.sock.send(b"H" + token.encode())
            reply = self.sock.recv(BULK_MESSAGE_BYTES)
            if reply != b"K":
                raise RpcError(f"the node refused the bulk channel: {reply[1:].decode(errors='replace') or 'closed'}")
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.broken = ""
        self._waiting: dict[bytes, Any] = {}
        self._loop: Any = None

    def attach(self, loop: Any) -> None:
        """Read the node's answers on ``loop`` (the Client's)."""
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(BULK_MESSAGE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            data, self.broken = b"", describe_exception(exc)
        if not data:
            self.broken = self.broken or "the node closed the bulk channel"
            self.close()
            return
        waiter = self._waiting.pop(data[1:17], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(data[:1] + data[17:])

    async def send(self, segments: Sequence[_Segment], kinds: bytes) -> bytes:
        """Hand ``segments`` to the node; return the batch's name. RpcError when it refuses them."""
        import asyncio
        import secrets

        if self.broken:
            raise RpcError(f"no bulk channel: {self.broken}")
        name = secrets.token_bytes(16)
        waiter = self._loop.create_future()
        self._waiting[name] = waiter
        try:
            for _ in range(1000):  # NOTE: bounded; a full socket buffer drains within milliseconds
                try:
                    socket.send_fds(self.sock, [b"S" + name + kinds], [s.fd for s in segments])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            else:
                raise RpcError("the bulk channel stays full")
            async with asyncio.timeout(BULK_REPLY_TIMEOUT_S):
                reply = await waiter
        except OSError as exc:
            raise RpcError(f"the bulk channel failed: {describe_exception(exc)}") from None
        finally:
            self._waiting.pop(name, None)
        if reply[:1] != b"K":
            raise RpcError(f"the node refused the shared segments: {reply[1:].decode(errors='replace')}")
        return name

    def close(self) -> None:
        """Close the socket; batches waiting for an answer fail."""
        if self.sock.fileno() >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(RpcError(f"no bulk channel: {self.broken or 'closed'}"))


class _TlsBulkLink:
    """One bulk connection over TLS of a Client (see `TlsBulkConnection`), blocking, used by one
    task at a time from a worker thread: the certificate pinned like the RPC connection's."""

    def __init__(self, host: str, port: int, pin: bytes, token: str) -> None:
        import hashlib
        import hmac

        raw = socket.create_connection((host, port), timeout=BULK_TLS_CONNECT_TIMEOUT_S)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = tls_client_context().wrap_socket(raw, server_hostname=None)
        except BaseException:
            raw.close()
            raise
        try:
            der = self.sock.getpeercert(binary_form=True) or b""
            if not hmac.compare_digest(hashlib.sha256(der).digest(), pin):
                raise RpcError("the node's bulk channel presented another certificate than its RPC endpoint")
            self.sock.sendall(BULK_TLS_MAGIC + bulk_frame(b"H", token.encode()))
            kind, payload = self._frame()
            if kind != b"K":
                raise RpcError(f"the node refused the bulk channel: {payload.decode(errors='replace')}")
        except BaseException:
            self.sock.close()
            raise

    def _exactly(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if not n:
                raise RpcError("the node closed the bulk channel")
            view = view[n:]

    def _frame(self) -> tuple[bytes, bytes]:
        head = bytearray(BULK_TLS_FRAME_BYTES)
        self._exactly(memoryview(head))
        size = int.from_bytes(head[1:], "big")
        if size > BULK_MESSAGE_BYTES:
            raise RpcError(f"the node sent a bulk frame of {size} bytes")
        payload = bytearray(size)
        self._exactly(memoryview(payload))
        return bytes(head[:1]), bytes(payload)

    def _answer(self, name: bytes) -> None:
        kind, payload = self._frame()
        if payload[:16] != name or kind not in (b"K", b"E"):
            raise RpcError("the node's bulk channel answered out of turn")
        if kind == b"E":
            error_kind, _, message = payload[16:].decode(errors="replace").partition("\n")
            raise TaskError(message, kind=error_kind if error_kind in set(ErrorKind) else ErrorKind.BAD_INPUT)

    def upload(self, name: bytes, arrays: Sequence[np.ndarray], out_bytes: int, timeout_s: float) -> None:
        """Send the operands of batch ``name`` (each C-order, little-endian) and declare its output
        (``out_bytes``, 0: none); TaskError when the node refuses them (its budget), RpcError or
        OSError when the connection fails."""
        self.sock.settimeout(timeout_s)
        entries = b"".join(b"r" + int(a.nbytes).to_bytes(8, "big") for a in arrays)
        entries += b"w" + out_bytes.to_bytes(8, "big") if out_bytes else b""
        self.sock.sendall(bulk_frame(b"U", name + bytes([len(arrays) + bool(out_bytes)]) + entries))
        self._answer(name)
        for view in _array_parts(arrays)[1]:  # C order, little-endian, no copy when they are so already
            self.sock.sendall(view)
        self._answer(name)

    def download(self, name: bytes, dtype: Any, shape: Sequence[int], timeout_s: float) -> np.ndarray:
        """Receive the output of batch ``name`` into a new array of ``dtype`` and ``shape``."""
        import numpy as np

        self.sock.settimeout(timeout_s)
        kind, payload = self._frame()
        out = np.empty(tuple(shape), dtype=dtype)
        if kind != b"R" or payload[:16] != name or int.from_bytes(payload[16:24], "big") != out.nbytes:
            raise RpcError("the node's bulk channel sent another result than the task's")
        self._exactly(out.reshape(-1).view(np.uint8).data)
        return out

    def close(self) -> None:
        """Close the connection (the node frees what it holds of it)."""
        with contextlib.suppress(OSError):
            self.sock.close()


class _TlsBulkPool:
    """A Client's bulk connections over TLS: at most BULK_TLS_CLIENT_CONNECTIONS, each for one task
    at a time, opened when needed; their blocking I/O runs in threads of their own (on the loop,
    only the bookkeeping)."""

    def __init__(self, host: str, port: int, pin: bytes, token: str) -> None:
        import asyncio

        self.host, self.port, self.pin, self.token = host, port, pin, token
        self.executor = concurrent.futures.ThreadPoolExecutor(BULK_TLS_CLIENT_CONNECTIONS, "pangea-bulk")
        self._slots = asyncio.Semaphore(BULK_TLS_CLIENT_CONNECTIONS)
        self._idle: list[_TlsBulkLink] = []
        self.closed = False

    async def acquire(self) -> _TlsBulkLink:
        """A connection of this client's own until `release` (a new one when none is idle)."""
        import asyncio

        await self._slots.acquire()
        if self._idle:
            return self._idle.pop()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, _TlsBulkLink, self.host, self.port, self.pin, self.token
            )
        except BaseException:
            self._slots.release()
            raise

    def release(self, link: _TlsBulkLink, reusable: bool) -> None:
        """Give a connection back (closed unless ``reusable``: its task ended in step)."""
        if reusable and not self.closed:
            self._idle.append(link)
        else:
            link.close()
        self._slots.release()

    def close(self) -> None:
        """Close the idle connections; those in use close when their tasks give them back."""
        self.closed = True
        for link in self._idle:
            link.close()
        self._idle.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


###############################################################################
# 13. The node
#
# `PeerSession` is the adapter of one session with a peer: its readers feed
# each channel's Decoder, hand what arrives to the session's
# `SessionProtocol` and perform the actions it returns (send, run a kernel,
# cancel, wake a waiter, close). `Node` owns the libp2p host, the data plane
# and the sessions: it accepts and dials them (the Hello verdict comes from
# the session protocol), runs the peers' kernels in worker threads, and keeps
# the node-wide limits (memory budget, tasks in flight).
###############################################################################


class PeerSession:
    """The session with one peer: requests we send, tasks we serve.

    A thin adapter around its `SessionProtocol` (``protocol``), which decides:
    this class reads channels, feeds what arrives to the protocol and performs
    the actions it returns (send, start or stop a task, wake a waiter, close).
    Messages travel on the libp2p stream (``channel``) until the TLS data
    plane (``data``) is attached; then every message goes there, and back to the
    libp2p stream if the data connection breaks. Answers go back on the channel
    their request came on."""

    def __init__(self, node: Node, channel: Channel, peer_id: str, hello: HelloMsg, *, dialed: bool) -> None:
        import trio

        self.node = node
        self.protocol = SessionProtocol(
            node.peer_id,
            peer_id,
            limits=node.limits,
            budget=node.budget,
            may_serve=lambda: node.may_serve(peer_id),
        )
        self.channel = channel
        self.data: TlsChannel | None = None
        self.data_note = "connecting"  # what the data plane is doing, for status and the checks
        self.data_settled = trio.Event()  # the data plane is attached, or we know why not
        self.data_slot: _DataSlot | None = None  # acceptor: the token we handed out
        self._data_bytes = [0, 0]  # bytes of data connections that have ended
        self._data_last_read = 0.0  # when the last byte arrived on a data connection that has ended
        self.peer_id = peer_id
        self.hello = hello
        self.dialed = dialed
        self.leaving = False  # we said Bye
        self.closed = trio.Event()
        self.opened_at = time.monotonic()
        self.last_seen = time.monotonic()
        self.held = HeldArrays(node.budget)  # arrays this node keeps for the peer (TaskRequest.keep)
        self._scopes: dict[int, Any] = {}  # task id -> cancel scope of a task being served
        self._wire(channel)

    def _wire(self, channel: Channel) -> None:
        both = CODEC_BLOSC in self.hello.codecs and CODEC_BLOSC in codecs_available()
        channel.packs = both and self.node.limits.compression  # the peer unpacks it, and we may pack
        channel.decoder.gate = self.protocol.gate(channel)
        channel.decoder.max_payload_bytes = self.node.limits.max_payload_bytes
        channel.decoder.max_header_bytes = MAX_HEADER_BYTES  # HELLO_MAX_HEADER_BYTES until now
        channel.start_writer(self.node.nursery)

    @property
    def label(self) -> str:
        """The short peer id for log lines."""
        return short_id(self.peer_id)

    @property
    def close_reason(self) -> str:
        """Why the session ended ("" while it is open)."""
        return self.protocol.close_reason

    @property
    def bye_reason(self) -> str | None:
        """The reason of the peer's Bye, None when it said none."""
        return self.protocol.bye_reason

    @property
    def rtt_s(self) -> float | None:
        """The last round-trip time measured by a ping, None before the first pong."""
        return self.protocol.rtt_s

    @property
    def peer_load(self) -> int:
        """What the peer last reported running for all its peers."""
        return self.protocol.peer_load

    @property
    def tasks_served(self) -> int:
        """Tasks of the peer's that ran to a result here."""
        return self.protocol.tasks_served

    @property
    def held_tasks(self) -> int:
        """Tasks of the peer's we hold (admitted, not yet answered)."""
        return self.protocol.held_tasks

    @property
    def transport(self) -> str:
        """Where messages travel now: "tls" (the data plane) or "libp2p"."""
        return "tls" if self.data is not None else "libp2p"

    @property
    def bytes_in(self) -> int:
        """Bytes received from the peer on the libp2p stream and data connections."""
        return self.channel.bytes_in + self._data_bytes[0] + (self.data.bytes_in if self.data else 0)

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the peer on the libp2p stream and data connections."""
        return self.channel.bytes_out + self._data_bytes[1] + (self.data.bytes_out if self.data else 0)

    @property
    def last_read(self) -> float:
        """When bytes last arrived on any of the session's connections (also one that has ended:
        after a data connection is lost, the libp2p stream's own last byte may be minutes old)."""
        data = self.data.last_read if self.data else 0.0
        return max(self.channel.last_read, data, self._data_last_read, self.opened_at)

    def _out(self) -> Channel:
        return self.data if self.data is not None else self.channel

    async def run(self) -> None:
        """Read the libp2p stream until the session ends; never blocks on a write."""
        reason, _ = await self._read(self.channel)
        await self._close(reason)

    async def _read(self, channel: Channel) -> tuple[str, bool]:
        """Handle messages from one channel; return why it stopped, and whether that
        ends the whole session (Bye, Error, garbage) rather than only this channel."""
        try:
            while True:
                try:
                    msg = await channel.receive()
                except MessageError as exc:
                    self.last_seen = time.monotonic()
                    self._perform(self.protocol.bad_message(exc, channel))
                    continue
                self.last_seen = time.monotonic()
                actions = self.protocol.receive(msg, channel, time.monotonic(), self.node.load)
                # NOTE: not kept while the next message arrives: the payload buffer can then be reused
                del msg
                ended = self._perform(actions)
                del actions
                if ended is not None:
                    return ended, True
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("dropping peer %s: %s", self.label, reason)
            with contextlib.suppress(PeerError):
                await channel.send(ErrorMsg(ErrorKind.PROTOCOL, str(exc)))
            await self._close(reason, reset=True)
            return reason, True
        except PeerError as exc:
            return str(exc), False

    def _perform(self, actions: list[SessionAction]) -> str | None:
        """Carry out the protocol's actions; return the reason when one ends the session."""
        ended = None
        for action in actions:
            if isinstance(action, Transmit):
                self._send_soon(action.msg, action.key)
            elif isinstance(action, RunTask):
                import trio

                # NOTE: the scope exists before _serve_task starts: a Cancel right behind the request
                # (its sender gave up while the frame was on its way) must find it.
                self._scopes[action.request.task_id] = trio.CancelScope()
                self.node.nursery.start_soon(self._serve_task, action.request)
            elif isinstance(action, StopTask):
                scope = self._scopes.get(action.task_id)
                if scope is not None:
                    if action.by_sender:
                        self.node.tasks_cancelled += 1
                        log.info("task %d from %s cancelled by its sender", action.task_id, self.peer_id)
                    scope.cancel()
            elif isinstance(action, Resolve):
                if action.waiter is not None:
                    action.waiter.set()
            elif isinstance(action, ReleaseHeld):
                self.held.release(action.ids)
            elif isinstance(action, NoteLoad):
                for callback in self.node.on_peer_load:
                    callback(self.peer_id, action.load)
            elif isinstance(action, PeerFellBack):
                if self.data is None:
                    self.data_fallback(action.reason, tell_peer=False)
            elif isinstance(action, Log):
                log.log(action.level, "%s", action.text)
            elif isinstance(action, EndSession):
                ended = action.reason
        return ended

    # -- the data plane

    async def connect_data(self, host: str) -> None:
        """Dialer: connect to the peer's data plane at ``host``; on failure keep libp2p and tell the peer."""
        hello, plane = self.hello, self.node.data_plane
        if plane is None:
            reason = "this node's data plane is off (--data-port off)"
        elif not hello.data_port or len(hello.data_cert) != 32 or len(hello.data_token) != DATA_TOKEN_BYTES:
            reason = "the peer has no data plane (--data-port off there)"
        else:
            import trio

            port, faults = hello.data_port, self.node.faults
            if faults is not None:
                host, port = faults.data_address(host, port)
            started = time.monotonic()
            for attempt in range(DATA_RETRIES + 1):
                try:
                    channel = await plane.connect(host, port, hello.data_cert, hello.data_token)
                except PeerError as exc:
                    reason = str(exc)
                    if not retry_data_connect(exc.kind, attempt, time.monotonic() - started):
                        break
                    log.info("data plane with %s: %s; trying again", self.label, reason)
                    await trio.sleep(DATA_RETRY_PAUSE_S)
                else:
                    self.attach_data(channel)
                    return
        self.data_fallback(reason, tell_peer=True)

    def attach_data(self, channel: TlsChannel) -> None:
        """Use ``channel`` for every message from now on."""
        if self.closed.is_set():
            channel.close_now()
            return
        if self.data is not None:
            self._data_lost(self.data, "replaced by a new data connection")
        self._wire(channel)
        self.data = channel
        self.data_note = channel.description
        self.data_settled.set()
        if self.data_slot is not None:
            self.node.data_plane.forget(self.data_slot)  # type: ignore[union-attr]
        log.info("data plane with %s: %s", self.label, channel.description)
        self.node.nursery.start_soon(self._run_data, channel)

    def data_fallback(self, reason: str, *, tell_peer: bool) -> None:
        """Keep every message on the libp2p stream, and say why (the first reason stands)."""
        if not self.data_settled.is_set():
            self.data_note = f"libp2p stream ({reason})"
            self.data_settled.set()
            log.warning(
                "data plane with %s unavailable: %s; arrays travel on the libp2p stream (slower)", self.label, reason
            )
            for callback in self.node.on_data_fallback:
                callback(self, reason)
        if tell_peer:
            self._send_soon(DataPlaneMsg(False, reason), self.channel)

    async def _run_data(self, channel: TlsChannel) -> None:
        reason, ends_session = await self._read(channel)
        if ends_session:
            await self._close(reason)
        else:
            self._data_lost(channel, reason)

    def _data_lost(self, channel: TlsChannel, reason: str) -> None:
        """The data connection broke: fail what was on it, go on with the libp2p stream."""
        channel.close_now()
        if self.data is not channel:
            return
        self.data = None
        self._data_bytes[0] += channel.bytes_in
        self._data_bytes[1] += channel.bytes_out
        self._data_last_read = max(self._data_last_read, channel.last_read)
        channel.decoder.discard()
        actions = self.protocol.channel_lost(channel, reason)
        if self.closed.is_set():
            return
        self.data_note = f"libp2p stream (data connection lost: {reason})"
        # NOTE: after our Bye the peer hangs up; its data connection closing first is expected.
        level = logging.INFO if self.leaving else logging.WARNING
        log.log(level, "data plane with %s lost: %s; going on with the libp2p stream", self.label, reason)
        self._perform(actions)

    def _send_soon(self, msg: Message, channel: Channel | None = None) -> None:
        async def send() -> None:
            target = channel if channel is not None and not channel.closed else self._out()
            with contextlib.suppress(PeerError):
                await target.send(msg)

        self.node.nursery.start_soon(send)

    async def close(self, reason: str) -> None:
        """End the session on purpose: say Bye with the reason, then close the stream."""
        self.leaving = True
        if not self.closed.is_set():
            with contextlib.suppress(PeerError):
                await self._out().send(ByeMsg(reason))
        await self._close(reason, reset=False)

    async def drop(self, reason: str) -> None:
        """End the session at once, without a Bye (the peer is gone): reset the stream."""
        await self._close(reason, reset=True)

    def heartbeat(self, now: float) -> str | None:
        """Ping the peer, or return why the session is dead (nothing received for idle_timeout_s)."""
        actions = self.protocol.tick(now, self.last_read, self.node.load)
        for action in actions:
            if isinstance(action, EndSession):
                return action.reason
        self._perform(actions)
        return None

    async def _close(self, reason: str, *, reset: bool | None = None) -> None:
        if self.closed.is_set():
            return
        actions = self.protocol.close(reason)
        self.closed.set()
        self.data_settled.set()
        if self.data_slot is not None and self.node.data_plane is not None:
            self.node.data_plane.forget(self.data_slot)
        self.channel.decoder.discard()
        if self.data is not None:
            self.data.decoder.discard()
        self._perform(actions)
        self.held.release(tuple(self.held.arrays))  # NOTE: held for this session only
        self.node.session_closed(self)
        if self.data is not None:
            self.data.close_now()
        await self.channel.close(reset=self.bye_reason is None if reset is None else reset)

    async def _serve_task(self, req: TaskRequestMsg) -> None:
        import trio

        task_id, protocol, faults = req.task_id, self.protocol, self.node.faults
        came_on: Channel = protocol.served_on(task_id) or self.channel
        out_nbytes = output_nbytes(req.kernel, req.operands, req.params)  # once per task
        refusal = protocol.reserve_output(task_id, min(out_nbytes, self.node.limits.max_payload_bytes))
        if refusal is not None:
            self._send_soon(TaskResultMsg(task_id, error_kind=refusal.kind, error_message=refusal.message), came_on)
            protocol.task_done(task_id)
            self._scopes.pop(task_id, None)
            return
        cancelled = self._scopes.setdefault(task_id, trio.CancelScope())
        try:
            with cancelled, trio.move_on_after(self.node.limits.task_timeout_s) as deadline:
                try:
                    stall_start = time.perf_counter()
                    if faults is not None:
                        await faults.before_task(self.node.tasks_served)
                    stalled_s = time.perf_counter() - stall_start  # a stalling worker reports slow compute
                    for key, operand in zip(req.store, req.operands, strict=False):
                        if key:  # NOTE: kept before the task runs: the sender's next block names it
                            self.held.keep(key, operand)
                    operands = self.held.operands(req)
                    outputs, compute_s = await self.node.execute_local(  # NOTE: its operands are this task's own
                        req.kernel, operands, req.params, out_nbytes=out_nbytes, own_operands=not req.held
                    )
                    del operands
                    compute_s += stalled_s
                    if faults is not None:
                        outputs = faults.into(outputs)
                    if req.keep:  # NOTE: kept here; the sender learns their dtypes and shapes only
                        self.held.keep_all(req.keep, outputs)
                    result = TaskResultMsg(req.task_id, outputs, compute_s=compute_s, kept=req.keep)
                    protocol.task_ran(task_id, ok=True)
                    self.node.tasks_served += 1
                    self.node.served(req.kernel, "ok")
                    log.info("task %d from %s: %s done in %.3f s", req.task_id, self.label, req.kernel, compute_s)
                except TaskError as exc:
                    self.node.served(req.kernel, exc.kind)
                    log.info("task %d from %s: %s failed: %s", req.task_id, self.label, req.kernel, exc)
                    result = TaskResultMsg(req.task_id, error_kind=exc.kind, error_message=str(exc))
            if deadline.cancelled_caught:
                timeout = self.node.limits.task_timeout_s
                log.warning("task %d from %s: %s ran past %.0f s", req.task_id, self.label, req.kernel, timeout)
                result = TaskResultMsg(
                    req.task_id,
                    error_kind=ErrorKind.DEADLINE,
                    error_message=f"{req.kernel} did not finish within {format_seconds(timeout)}",
                )
            del req  # drop the operands before the result goes out
            # NOTE: and free its slot and operand bytes now (answer_to): the peer may send its next
            # task the moment the result arrives, before the writer has told us the frame is out.
            if not protocol.answer_to(task_id, stopped=cancelled.cancelled_caught):
                return  # nobody wants the result
            # NOTE: the answer goes back on the channel its request came on; a data
            # connection lost meanwhile made the sender fail the task, so it is not sent.
            if came_on is self.data or came_on is self.channel:
                try:
                    await came_on.send(result)
                except PeerError as exc:
                    log.info("cannot return task %d to %s: %s", task_id, self.label, exc)
        finally:
            self._scopes.pop(task_id, None)
            protocol.task_done(task_id)

    async def request(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params | None = None,
        *,
        held: tuple[int, ...] = (),
        keep: int = 0,
        store: tuple[int, ...] = (),
    ) -> TaskResultMsg:
        """Send a task to the peer and wait for its result; PeerError if the peer goes away.
        ``held[i]`` nonzero: the peer holds operand i for us under that id (its bytes are not
        sent); ``keep``: the peer keeps output 0 under this id and sends no outputs; ``store[i]``
        nonzero: operand i is sent and the peer keeps it under that id for later tasks."""
        import trio

        pending = self.protocol.start_request(self._out(), trio.Event())
        request = TaskRequestMsg(pending.task_id, kernel, tuple(operands), dict(params or {}), held, keep, store)
        try:
            try:
                await pending.key.send(request)
            except PeerError as exc:
                # NOTE: not sent again here: the reader may already have failed this task, and
                # its sender retries it (on the libp2p stream, another worker or locally).
                if isinstance(pending.key, TlsChannel):
                    self._data_lost(pending.key, str(exc))
                raise
            del request
            await pending.waiter.wait()
        finally:
            self._perform(self.protocol.finish_request(pending))
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def send_release(self, ids: tuple[int, ...]) -> None:
        """Tell the peer it may let go of the arrays it holds for us under ``ids`` (no answer)."""
        self._send_soon(ReleaseMsg(ids))

    def send_ping(self) -> None:
        """Send a ping without waiting; its pong updates ``rtt_s``."""
        nonce = self.protocol.ping_sent(time.monotonic())
        self._send_soon(PingMsg(nonce, self.node.load))

    async def ping(self, timeout_s: float = 5.0) -> float:
        """Return one round-trip time in seconds over the session stream."""
        import trio

        done = trio.Event()
        nonce = self.protocol.ping_sent(time.monotonic(), done)
        start = time.perf_counter()
        await self._out().send(PingMsg(nonce, self.node.load))
        with trio.move_on_after(timeout_s):
            await done.wait()
        self.protocol.forget_ping(nonce)
        if self.closed.is_set() or not done.is_set():
            raise PeerError(f"no pong from {self.label} within {format_seconds(timeout_s)}", kind=ErrorKind.TIMEOUT)
        return time.perf_counter() - start

    async def bye(self, reason: str = "done") -> None:
        """Tell the peer we are finished (it hangs up)."""
        self.leaving = True
        with contextlib.suppress(PeerError):
            await self._out().send(ByeMsg(reason))


class Node:
    """A pangea libp2p node: identity, host, sessions, local kernel execution.

    ``accept(peer_id, hello)`` returns None to accept an incoming session or
    the reason to refuse it; ``may_serve(peer_id)`` says whether we run tasks
    for that peer.
    """

    def __init__(
        self,
        *,
        key_pair: Any,
        role: str,
        accept: Callable[[str, HelloMsg], str | Refusal | None],
        may_serve: Callable[[str], bool],
        limits: Limits | None = None,
        psk: str | None = None,
        faults: FaultInjector | None = None,
        data_port: int | None = -1,
        home_key: Any = None,
    ) -> None:
        import trio

        self.host = make_host(key_pair, psk)
        self.home_key = home_key  # the home's identity when this node runs on a throwaway one
        self.host_id = host_fingerprint()
        self._vouched: dict[str, str] = {}  # throwaway peer id -> the home it proved it runs from
        self.faults = faults  # TEST AID (--fault): None on every real node
        self.buffers = BufferPool()  # receive buffers of large payloads, reused by every channel
        self.data_port_spec = data_port  # parse_data_port: -1 auto, 0 any, None off
        self.data_plane: DataPlane | None = None
        self.on_data_fallback: list[Callable[[PeerSession, str], None]] = []
        self.tasks_served = 0
        self.tasks_cancelled = 0  # tasks run for peers that their senders gave up (CancelMsg)
        self.peer_id = str(self.host.get_id())
        self.role = role
        self.accept = accept
        self.may_serve: Callable[[str], bool] = lambda peer_id: peer_id in self._vouched or may_serve(peer_id)
        self._may_serve = may_serve
        self.limits = limits or Limits()
        self.psk = psk
        self.budget = MemoryBudget(self.limits.memory_budget_bytes)
        self.rpc_calls = CallBound(RPC_MAX_CALLS_IN_FLIGHT)  # touched by the RPC thread only
        self.rpc_tasks_refused = 0  # RPC tasks refused by the memory budget
        self.instance_id = random.SystemRandom().getrandbits(63)  # tells two processes with one identity apart
        self.pending = PendingStreams(self.limits)  # streams still in their handshake
        self.strangers = StrangerConnections(
            MAX_STRANGER_CONNECTIONS, MAX_STRANGER_CONNECTIONS_PER_ADDRESS, self.limits.handshake_timeout_s
        )
        self._strangers_logged_at, self._strangers_unlogged = -math.inf, 0
        self.sessions: dict[str, PeerSession] = {}
        self.nursery: Any = None
        self.kernel_limiter = trio.CapacityLimiter(1)  # BLAS already uses every core
        self.addresses: list[str] = []
        self.on_session: list[Callable[[PeerSession], None]] = []
        self.on_session_closed: list[Callable[[PeerSession], None]] = []
        self._closed_bytes = [0, 0]
        self.started_at = time.monotonic()
        self.gflops = 0.0  # measured when the node starts
        self.on_peer_load: list[Callable[[str, int], None]] = []
        self.on_task_served: list[Callable[[str, str], None]] = []  # kernel, outcome
        self._new_sessions_send, self._new_sessions = trio.open_memory_channel[PeerSession](math.inf)

    def served(self, kernel: str, outcome: str) -> None:
        """Report a task run for a peer (metrics)."""
        for callback in self.on_task_served:
            callback(kernel, outcome)

    @property
    def load(self) -> int:
        """Tasks this node is running or has queued for its peers (sent in heartbeats)."""
        return sum(s.held_tasks for s in self.sessions.values())

    def hello(self, pairing_proof: bytes = b"") -> HelloMsg:
        """Return our Hello message."""
        cap = capacity()
        return HelloMsg(
            pangea_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            kernels=tuple(sorted(KERNELS)),
            role=self.role,
            cores=cap["cores"],
            blas_threads=cap["blas_threads"],
            gflops=self.gflops,
            max_payload_bytes=self.limits.max_payload_bytes,
            platform=f"{sys.implementation.cache_tag} {platform.machine()} {platform.system()}",
            pairing_proof=pairing_proof,
            instance_id=self.instance_id,
            data_port=self.data_plane.port if self.data_plane else 0,
            data_cert=self.data_plane.cert_sha256 if self.data_plane else b"",
            host_id=self.host_id,
            codecs=codecs_available() if self.limits.compression else (),
        )

    @contextlib.asynccontextmanager
    async def running(self, listen_host: str, port: int) -> Any:
        """Run the host listening on listen_host:port; yields when ready."""
        import trio
        from libp2p.custom_types import TProtocol
        from multiaddr import Multiaddr

        ensure_port_free(listen_host, port)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            # NOTE: cancel our nursery only after host.run has exited: cancelling
            # it while an exception unwinds through host.run's cleanup turns
            # that exception into a Cancelled, which the scope then swallows.
            try:
                async with self.host.run([Multiaddr(f"/ip4/{listen_host}/tcp/{port}")]):
                    self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self._handle_stream)
                    self.host.get_network().register_notifee(_forget_departed_peers(self.host))
                    self.host.get_network().register_notifee(_watch_strangers(self))
                    nursery.start_soon(self._close_idle_strangers)
                    self.addresses = self.dialable_addresses(listen_host)
                    self._start_data_plane(listen_host)
                    self.gflops = await trio.to_thread.run_sync(measure_gflops)
                    yield self
            finally:
                nursery.cancel_scope.cancel()
                if self.data_plane is not None:
                    self.data_plane.close()

    def data_plane_text(self) -> str:
        """One line for the start-up output: where arrays travel, and the port a firewall must pass."""
        if self.data_plane is None:
            return "Arrays: on the libp2p stream (--data-port off; slower)"
        return f"Arrays: TLS 1.3 data plane on TCP port {self.data_plane.port} (a firewall must let it through too)"

    def _start_data_plane(self, listen_host: str) -> None:
        """Listen for data connections (--data-port); ``auto`` takes any port when port + 1 is busy."""
        port = int(self.host.get_transport_addrs()[0].value_for_protocol("tcp"))
        data_port = data_port_for(self.data_port_spec, port)
        if data_port is None:
            log.info("data plane off: arrays travel on the libp2p stream")
            return
        plane = DataPlane(self, listen_host, data_port)
        try:
            plane.listen()
        except ConfigError as exc:
            if self.data_port_spec != -1:
                raise
            log.warning("%s; the data plane takes any free port instead", exc)
            plane.port = 0
            plane.listen()
        self.data_plane = plane
        self.nursery.start_soon(plane.serve)
        log.info("data plane listening on %s (TLS 1.3)", format_host_port(listen_host, plane.port))

    def dialable_addresses(self, listen_host: str) -> list[str]:
        """Return our full multiaddrs, one per usable interface, loopback last.

        NOTE: libp2p advertises a 0.0.0.0 listener verbatim, which no peer can
        dial, so the wildcard is expanded to the interfaces' addresses.
        """
        ports = [int(a.value_for_protocol("tcp")) for a in self.host.get_transport_addrs()]
        if not ports:
            raise ConfigError(
                f"cannot listen on {listen_host}: libp2p reports no listening address",
                hint="use --host 0.0.0.0 or one of this machine's addresses",
            )
        port = ports[0]
        if listen_host == "0.0.0.0":
            ips = [ip for _, ip in rank_interface_addresses(local_interface_addresses())]
        else:
            ips = [listen_host]
        return [f"/ip4/{ip}/tcp/{port}/p2p/{self.peer_id}" for ip in ips]

    def connection_info(self, peer_id: str) -> dict[str, str]:
        """Return the negotiated security and muxer of our connection to a peer."""
        from libp2p.peer.id import ID

        conns = self.host.get_network().get_connections(ID.from_base58(peer_id))
        if not conns:
            return {"security": "?", "muxer": "?", "remote": "?"}
        conn = conns[0]
        return {
            "security": str(conn.get_negotiated_security_protocol() or "?"),
            "muxer": str(conn.get_negotiated_muxer_protocol() or "?"),
            "remote": connection_remote(conn) or "?",
        }

    def stranger_connected(self, conn: Any) -> None:
        """Count a new libp2p connection of an untrusted peer; close it when it is one too many."""
        peer_id = str(conn.muxed_conn.peer_id)
        if self.may_serve(peer_id) or peer_id in self.sessions or conn.muxed_conn.is_initiator:
            return  # trusted, already in a session, or dialed by us
        address = multiaddr_ip(connection_remote(conn) or "") or "?"
        now = time.monotonic()
        refused = self.strangers.opened(conn, peer_id, address, now)
        if refused is not None:
            # NOTE: one line a minute, with the count: a flood of identities must not flood the log
            self._strangers_unlogged += 1
            if now - self._strangers_logged_at >= LIBP2P_LOG_REPEAT_S:
                more = (
                    f" ({self._strangers_unlogged - 1} more since the last such line)"
                    if self._strangers_unlogged > 1
                    else ""
                )
                log.warning("closing a connection of untrusted peer %s at %s: %s%s", peer_id, address, refused, more)
                self._strangers_logged_at, self._strangers_unlogged = now, 0
            self.nursery.start_soon(_close_quietly, conn)

    async def _close_idle_strangers(self) -> None:
        """Close strangers' connections that got no session within the handshake timeout."""
        import trio

        while True:
            await trio.sleep(1.0)
            for conn, peer_id in self.strangers.idle(time.monotonic()):
                self.strangers.closed(conn)
                if peer_id not in self.sessions:
                    log.info(
                        "closing the connection of untrusted peer %s: no session within %gs",
                        peer_id,
                        self.strangers.idle_s,
                    )
                    self.strangers.expired += 1
                    self.nursery.start_soon(_close_quietly, conn)

    async def next_session(self) -> PeerSession:
        """Wait for the next accepted or dialed session."""
        return await self._new_sessions.receive()

    def _session_opened(self, session: PeerSession) -> bool:
        """Make ``session`` the current one with its peer; False when it is a duplicate to close.

        Two nodes that dial each other at once get two sessions. Both sides keep
        the one dialed by the smaller peer id, so they agree without talking.
        """
        old = self.sessions.get(session.peer_id)
        if old is not None and not old.closed.is_set():

            def dialer(s: PeerSession) -> str:
                return self.peer_id if s.dialed else s.peer_id

            if dialer(old) <= dialer(session):
                return False
            self.nursery.start_soon(old.close, "duplicate session")
        self.sessions[session.peer_id] = session
        self.nursery.start_soon(self._watch, session)
        for callback in self.on_session:
            callback(session)
        self._new_sessions_send.send_nowait(session)
        return True

    async def _watch(self, session: PeerSession) -> None:
        """Health check of one session: ping every HEARTBEAT_S (the pong gives the RTT) and
        drop the session when nothing at all has arrived for idle_timeout_s.

        NOTE: liveness counts bytes read, not whole messages: a peer in the middle
        of sending us a gigabyte is alive even though no message completes."""
        import trio

        while not session.closed.is_set():
            with trio.move_on_after(HEARTBEAT_S):
                await session.closed.wait()
            if session.closed.is_set():
                return
            self.buffers.trim()  # an idle node gives spare receive buffers back
            reason = session.heartbeat(time.monotonic())
            if reason is not None:
                log.warning("dropping peer %s: %s", session.peer_id, reason)
                await session.drop(reason)
                await self.disconnect(session.peer_id)
                return

    @property
    def bytes_in(self) -> int:
        """Bytes received on every session, closed or open."""
        return self._closed_bytes[0] + sum(s.bytes_in for s in self.sessions.values())

    @property
    def bytes_out(self) -> int:
        """Bytes sent on every session, closed or open."""
        return self._closed_bytes[1] + sum(s.bytes_out for s in self.sessions.values())

    @property
    def departed_bytes(self) -> tuple[int, int]:
        """Bytes (received, sent) of the sessions that have closed."""
        return self._closed_bytes[0], self._closed_bytes[1]

    def session_closed(self, session: PeerSession) -> None:
        """Called by a session when it has ended: count its bytes, forget it."""
        self._closed_bytes[0] += session.bytes_in
        self._closed_bytes[1] += session.bytes_out
        log.info("session with %s closed: %s", session.label, session.close_reason)
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
            self._vouched.pop(session.peer_id, None)
            for callback in self.on_session_closed:
                callback(session)

    def remote_address(self, peer_id: str) -> str:
        """Return the transport address of our connection to a peer, for log lines."""
        return self.connection_info(peer_id)["remote"]

    def hello_refusal(self, peer_id: str, hello: HelloMsg) -> Refusal | None:
        """The Hello check (`check_hello`) of a session with ``peer_id``, as this node sees it now."""
        current = self.sessions.get(peer_id)
        open_hello = current.hello if current is not None and not current.closed.is_set() else None
        local = LocalPeer(self.peer_id, self.role, self.instance_id, self.host_id)
        return check_hello(local, peer_id, hello, open_hello, lambda: self.remote_address(peer_id))

    def _refusal(self, peer_id: str, hello: HelloMsg) -> Refusal | None:
        """Return why to refuse an incoming session, or None to accept it."""
        refusal = self.hello_refusal(peer_id, hello)
        if refusal is not None:
            return refusal
        home = self._vouched_home(peer_id, hello)
        if home is not None:
            self._vouched[peer_id] = home
            log.info("accepting %s %s: it runs from the pangea home of %s (signed)", hello.role, peer_id, home)
            return None
        verdict = self.accept(peer_id, hello)
        return Refusal(ErrorKind.REFUSED, verdict) if isinstance(verdict, str) else verdict

    def _vouched_home(self, peer_id: str, hello: HelloMsg) -> str | None:
        """The home a dialer on a throwaway identity proved (by its key's signature) it runs
        from, when that home is this node's own or one this node trusts; else None."""
        home_id = vouch_candidate(self.peer_id, peer_id, hello, self._may_serve)
        if home_id is None:
            return None
        try:
            from libp2p.peer.id import ID

            key = ID.from_base58(home_id).extract_public_key()
            ok = key is not None and key.verify(home_proof_message(self.peer_id, peer_id), hello.home_proof)
        except Exception:  # a malformed peer id or signature is no proof
            ok = False
        return home_id if ok else None

    async def _handle_stream(self, stream: Any) -> None:
        import trio

        peer_id = str(stream.muxed_conn.peer_id)
        trusted = self.may_serve(peer_id)
        source = multiaddr_ip(self.remote_address(peer_id)) or "?"
        refused = self.pending.admit(peer_id, source, trusted)
        if refused is not None:
            log.warning("resetting a stream from %s: %s", peer_id, refused)
            with contextlib.suppress(*stream_errors()):
                await stream.reset()
            if not trusted and peer_id not in self.sessions and peer_id not in self.pending.per_peer:
                await self.disconnect(peer_id)  # a stranger turned away keeps no connection either
            return
        channel = Channel(stream, self.limits, self.buffers)
        handshaking = True
        try:
            with trio.fail_after(self.limits.handshake_timeout_s):
                msg = await channel.receive()
            if not isinstance(msg, HelloMsg):
                raise RemoteProtocolError(f"expected Hello first, got {type(msg).__name__}")
            refusal = self._refusal(peer_id, msg)
            if refusal is not None:
                where = self.remote_address(peer_id)
                log.warning("refused %s %s at %s: %s", msg.role or "peer", peer_id, where, refusal.message)
                await channel.send(refusal.to_msg())
                await trio.sleep(0.2)  # let the error reach the peer before the close
                await channel.close()
                if peer_id not in self.sessions and self.pending.per_peer.get(peer_id, 0) <= 1:
                    await self.disconnect(peer_id)  # a refused peer keeps no connection
                return
            reply, slot = self.hello(), None
            if self.data_plane is not None:
                reply.data_token, slot = self.data_plane.expect(peer_id, "" if source == "?" else source)
            await channel.send(reply)
            session = PeerSession(self, channel, peer_id, msg, dialed=False)
            session.data_slot = slot
            self.pending.release(peer_id)
            handshaking = False
            if not self._session_opened(session):
                await session.close("duplicate session")
                return
            log.info("session with %s %s (pangea %s)", msg.role, peer_id, msg.pangea_version)
            if slot is not None:
                slot.session = session
                slot.ready.set()
            self.nursery.start_soon(self._await_data_plane, session)
            await session.run()
        except trio.TooSlowError:
            log.warning("dropping peer %s: no Hello within %.0f s", peer_id, self.limits.handshake_timeout_s)
            await channel.close(reset=True)
        except (RemoteProtocolError, PeerError) as exc:
            log.warning("dropping peer %s: %s", peer_id, exc)
            await channel.close(reset=True)
        except Exception:  # NOTE: anything escaping here would kill the libp2p host
            log.exception("internal error on a stream from %s; resetting it", peer_id)
            await channel.close(reset=True)
        finally:
            if handshaking:
                self.pending.release(peer_id)

    async def dial(self, address: PeerAddress, *, timeout_s: float, who: str = "pangea") -> PeerSession:
        """Connect to a peer (retrying with backoff until timeout_s) and open a session; DialError
        names the cause when it cannot (``who``: what should listen there, for its hint).

        A pairing code in ``address.code`` is proven in our Hello (never sent)."""
        if address.peer_id == self.peer_id:
            others = []
            with contextlib.suppress(SessionError):
                others = live_sessions(pangea_home())
            if others:
                raise ConfigError(
                    f"cannot dial {address.peer_id}: it is this node's own peer ID, the identity of this pangea "
                    f"home, which {describe_sessions(others)} on this machine also runs with",
                    hint="two processes of one home cannot work with each other; "
                    "start this one with its own home: PANGEA_HOME=DIR ./pangea.pyz ...",
                )
            raise ConfigError(
                f"cannot dial {address.peer_id}: it is this node's own peer ID",
                hint="the two boxes share one identity (a copied pangea home); delete identity.key on one of them",
            )
        stream = await self._connect(address, timeout_s, who)
        return await self._handshake(stream, address)

    async def _connect(self, address: PeerAddress, timeout_s: float, who: str) -> Any:
        import trio
        from libp2p.custom_types import TProtocol
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        try:
            info = info_from_p2p_addr(Multiaddr(address.text))
        except Exception as exc:  # multiaddr raises several unrelated types
            raise UsageError(f"bad address {address.text!r}: {describe_exception(exc)}") from None
        deadline = trio.current_time() + timeout_s
        delays = backoff_delays(DIAL_BACKOFF_FIRST_S, DIAL_BACKOFF_MAX_S)
        attempt = 0
        while True:
            attempt += 1
            # NOTE: py-libp2p refuses, for 60 s, to redial a peer whose addresses all
            # failed once (a "negative cache"); a responder started before its
            # initiator would never connect. We do our own backoff instead.
            with contextlib.suppress(Exception):
                self.host.get_network().unblock_peer(info.peer_id)
            try:
                with trio.fail_after(max(1.0, deadline - trio.current_time())):
                    await self.host.connect(info)
                    return await self.host.new_stream(info.peer_id, [TProtocol(PROTOCOL_ID)])
            except Exception as exc:  # py-libp2p raises many unrelated types for a failed dial
                await self.disconnect(address.peer_id)  # a half-dead connection must not be reused
                delay = next(delays)
                waited = timeout_s - max(0.0, deadline - trio.current_time())
                failure = classify_dial_error(
                    exc, address.host, address.port, address.peer_id, waited_s=waited, who=who
                )
                log.info("dial %s (attempt %d) failed: %s", address.text, attempt, failure.reason)
                if failure.final or trio.current_time() + delay >= deadline:
                    raise await self._dial_error(address, exc, failure, (attempt, timeout_s, waited), who) from None
                await trio.sleep(delay)

    async def _dial_error(
        self, address: PeerAddress, exc: BaseException, failure: DialFailure, tries: tuple[int, float, float], who: str
    ) -> DialError:
        """The error of a dial given up: its cause; a timeout is told apart from a handshake that
        hangs by a plain TCP connect (what doctor tries first)."""
        attempts, timeout_s, waited_s = tries
        if failure.cause == "timeout":
            tcp_ms, _ = await tcp_probe(address.host, address.port, DIAL_PROBE_S)
            failure = classify_dial_error(
                exc,
                address.host,
                address.port,
                address.peer_id,
                waited_s=waited_s,
                tcp_reached=tcp_ms is not None,
                who=who,
            )
        count = f" within {format_seconds(timeout_s)} ({attempts} attempt{'s' if attempts > 1 else ''})"
        text = f"cannot reach {address.text}{'' if failure.final else count}: {failure.reason}"
        return DialError(text, cause=failure.cause, reason=failure.reason, hint=failure.hint)

    async def _handshake(self, stream: Any, address: PeerAddress) -> PeerSession:
        import trio

        channel = Channel(stream, self.limits, self.buffers)
        proof = pairing_proof(address.code, address.peer_id, self.peer_id) if address.code else b""
        hello = self.hello(proof)
        if self.home_key is not None:
            hello.home_id = key_peer_id(self.home_key)
            hello.home_proof = self.home_key.private_key.sign(home_proof_message(address.peer_id, self.peer_id))
        try:
            await channel.send(hello)
            with trio.fail_after(self.limits.handshake_timeout_s):
                msg = await channel.receive()
        except trio.TooSlowError:
            await channel.close(reset=True)
            timeout = self.limits.handshake_timeout_s
            raise PeerError(
                f"{address.peer_id} did not answer the handshake within {format_seconds(timeout)}",
                kind=ErrorKind.TIMEOUT,
            ) from None
        except (RemoteProtocolError, PeerError) as exc:
            await channel.close(reset=True)
            raise PeerError(f"handshake with {address.peer_id} failed: {exc}", kind=ErrorKind.DISCONNECTED) from None
        if isinstance(msg, ErrorMsg):
            await channel.close()
            refused = peer_refusal(address.peer_id, msg)
            raise PeerError(refused.message, kind=refused.kind, hint=refused.hint)
        if not isinstance(msg, HelloMsg):
            await channel.close(reset=True)
            raise PeerError(
                f"{address.peer_id} answered the handshake with {type(msg).__name__}", kind=ErrorKind.INCOMPATIBLE
            )
        refusal = self.hello_refusal(address.peer_id, msg)
        if refusal is not None:
            with contextlib.suppress(PeerError):
                await channel.send(refusal.to_msg())
            await channel.close()
            raise PeerError(refusal.message, kind=refusal.kind, hint=refusal.hint)
        session = PeerSession(self, channel, address.peer_id, msg, dialed=True)
        if not self._session_opened(session):
            await session.close("duplicate session")
            return self.sessions[address.peer_id]
        self.nursery.start_soon(session.run)
        ips = [multiaddr_ip(self.remote_address(address.peer_id)), multiaddr_ip(address.text)]
        host = next((ip for ip in ips if ip and not is_unspecified_ip(ip)), "")
        await session.connect_data(host)  # bounded by DATA_CONNECT_S; falls back to libp2p
        return session

    async def _await_data_plane(self, session: PeerSession) -> None:
        """Acceptor: give the dialer DATA_SETTLE_S to connect to our data plane."""
        import trio

        if self.data_plane is None:
            session.data_fallback("this node's data plane is off (--data-port off)", tell_peer=False)
            return
        with trio.move_on_after(DATA_SETTLE_S):
            await session.data_settled.wait()
        if not session.data_settled.is_set():
            session.data_fallback(
                f"the peer did not connect to our data plane within {DATA_SETTLE_S:.0f} s", tell_peer=False
            )

    async def disconnect(self, peer_id: str) -> None:
        """Close every libp2p connection to a peer.

        NOTE: after a partition the connection under a dropped session can stay
        wedged, and a redial would reuse it (its new streams time out forever)."""
        from libp2p.peer.id import ID

        with contextlib.suppress(Exception):  # best effort: it may be gone already
            await self.host.disconnect(ID.from_base58(peer_id))

    async def execute_local(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        *,
        out_nbytes: int | None = None,
        own_operands: bool = False,
    ) -> tuple[tuple[np.ndarray, ...], float]:
        """Run a kernel in a worker thread; return (outputs, compute seconds).
        ``out_nbytes``: its `output_nbytes`, when the caller has it already. ``own_operands``: the
        operands are this node's own buffers, read by nothing after the kernel (a worker's decoded
        task): an element-wise result may be written over the first (`run_into_operand`)."""
        import trio

        def timed() -> tuple[tuple[np.ndarray, ...], float]:
            start = time.perf_counter()
            with _KERNELS_RUNNING:
                over = run_into_operand(kernel, operands, params) if own_operands else None
                limit = self.limits.max_elements
                outputs = over or run_kernel(kernel, operands, params, max_elements=limit, out_nbytes=nbytes)
            return outputs, time.perf_counter() - start

        try:
            nbytes = output_nbytes(kernel, operands, params) if out_nbytes is None else out_nbytes
            if runs_inline(task_cost(kernel, operands, params, out_nbytes=nbytes)[0]):
                return timed()
            # abandon_on_cancel: a task past its deadline is answered at once;
            # numpy cannot be interrupted, so its thread finishes in the background.
            return await trio.to_thread.run_sync(  # type: ignore[call-arg]
                timed, limiter=self.kernel_limiter, abandon_on_cancel=True
            )
        except TaskError:
            raise
        except (ValueError, TypeError, ArithmeticError, MemoryError) as exc:  # numpy's own errors
            raise TaskError(f"{kernel}: {describe_exception(exc)}", kind=ErrorKind.BAD_INPUT) from None


def run_into_operand(kernel: str, operands: Sequence[np.ndarray], params: Params) -> tuple[np.ndarray, ...] | None:
    """add, subtract, multiply or scale written over its first operand, when that operand already has
    the result's shape and dtype and is writable and C-ordered; None: run the kernel as usual.

    Only for operands nothing reads after the kernel (a worker's decoded task): the worker then
    holds its operands and no second array of the result's size. KernelError as `run_kernel`."""
    import numpy as np

    if kernel not in ("add", "subtract", "multiply", "scale"):
        return None
    check_kernel_call(kernel, operands, params)
    a, factor = operands[0], number_param(kernel, params, "factor", 1.0) if kernel == "scale" else 1.0
    try:
        shape = np.broadcast_shapes(*(o.shape for o in operands))
        dtype = np.result_type(a.dtype, operands[1].dtype if kernel != "scale" else factor)
    except (ValueError, TypeError):
        return None  # the kernel itself says what is wrong
    if not (
        math.isfinite(factor) and a.flags.writeable and a.flags.c_contiguous and (a.shape, a.dtype) == (shape, dtype)
    ):
        return None
    with np.errstate(all="ignore"):  # NOTE: numpy buffers an overlap of the operands: the result is a + b's
        if kernel == "scale":
            return (np.multiply(a, factor, out=a),)
        return ({"add": np.add, "subtract": np.subtract, "multiply": np.multiply}[kernel](a, operands[1], out=a),)


class _RunningCount:
    """A thread-safe count of kernels running in worker threads (see `main`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def __enter__(self) -> None:
        with self._lock:
            self.value += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self.value -= 1


_KERNELS_RUNNING = _RunningCount()


def connection_remote(conn: Any) -> str | None:
    """The multiaddr of a libp2p connection's remote end (None when unknown).

    NOTE: the socket's peer first: py-libp2p's own answer falls back to the
    peerstore, which holds what the peer announced (0.0.0.0 when it listens on
    every interface; always so with --psk, whose wrapped connection has none)."""
    remote = None
    with contextlib.suppress(Exception):  # best effort: the API differs by transport
        remote = endpoint_multiaddr(conn.muxed_conn.get_remote_address())
    if remote is None:
        with contextlib.suppress(Exception):
            addrs = dialable_addresses([str(a) for a in conn.get_transport_addresses()], None)
            remote = addrs[0] if addrs else None
    return remote


async def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # NOTE: best effort: it may be closing already
        await conn.close()


def connection_notifee(
    connected: Callable[[Any, Any], None] | None = None, disconnected: Callable[[Any, Any], None] | None = None
) -> Any:
    """A libp2p notifee calling ``connected(network, conn)`` / ``disconnected(network, conn)``."""
    from libp2p.abc import INotifee

    class Notifee(INotifee):
        async def opened_stream(self, network: Any, stream: Any) -> None:
            pass

        async def closed_stream(self, network: Any, stream: Any) -> None:
            pass

        async def connected(self, network: Any, conn: Any) -> None:
            if connected is not None:
                connected(network, conn)

        async def disconnected(self, network: Any, conn: Any) -> None:
            if disconnected is not None:
                disconnected(network, conn)

        async def listen(self, network: Any, multiaddr: Any) -> None:
            pass

        async def listen_close(self, network: Any, multiaddr: Any) -> None:
            pass

    return Notifee()


def _watch_strangers(node: Node) -> Any:
    """Return a notifee that counts strangers' connections in ``node.strangers``."""
    return connection_notifee(
        connected=lambda _, conn: node.stranger_connected(conn),
        disconnected=lambda _, conn: node.strangers.closed(conn),
    )


def _forget_departed_peers(host: Any) -> Any:
    """Return a notifee that clears a peer's addresses once its last connection closes.

    NOTE: py-libp2p's AutoConnector redials peers whose addresses remain in
    the peerstore, so a departed responder would be dialled forever (#1451).
    """

    def disconnected(network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            host.get_peerstore().clear_addrs(peer)

    return connection_notifee(disconnected=disconnected)


###############################################################################
# 14. The manager
#
# The `Manager` drives the Scheduler: it turns a user's task into events,
# performs the actions the scheduler returns through a `TaskDelegator` per
# worker (`LocalDelegator` runs it here, `RemoteDelegator` on a peer's
# session), verifies every remote result, splits a task by rows over workers, and
# probes suspect workers with canary tasks.
###############################################################################


# ---------------------------------------------------------------- delegators


class TaskDelegator(Protocol):
    """Executes a task somewhere: returns (outputs, compute seconds) or raises
    TaskError (the task failed there) or PeerError (the worker is gone)."""

    worker_id: str

    async def execute(
        self, kernel: str, operands: Sequence[np.ndarray], params: Params
    ) -> tuple[tuple[np.ndarray, ...], float]:
        """Run the task on this delegator's worker."""
        ...


class LocalDelegator:
    """Runs tasks on this node."""

    worker_id = LOCAL

    def __init__(self, node: Node) -> None:
        self.node = node

    async def execute(
        self, kernel: str, operands: Sequence[np.ndarray], params: Params
    ) -> tuple[tuple[np.ndarray, ...], float]:
        """Run the kernel in this process's worker thread."""
        return await self.node.execute_local(kernel, operands, params)


class RemoteDelegator:
    """Runs tasks on a connected peer over its session."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self.worker_id = session.peer_id

    async def execute(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        held: tuple[int, ...] = (),
        store: tuple[int, ...] = (),
        keep: int = 0,
    ) -> tuple[tuple[np.ndarray, ...], float]:
        """Send the task to the peer (``held``: the ids under which it holds operands for us, 0 for
        those sent; ``store``: ids under which it should keep operands sent now; ``keep``: it keeps
        the outputs under this id + their index, and they come back as stand-ins of their dtype and
        shape); raise TaskError with the peer's error text."""
        result = await (
            self.session.request(kernel, operands, params, held=held, store=store, keep=keep)
            if held or store or keep
            else self.session.request(kernel, operands, params)
        )
        if not result.ok:
            said = result.error_message.removeprefix(f"{kernel}: ")  # NOTE: the kernel's name once in the line
            raise TaskError(f"{kernel} on {self.session.label}: {said}", kind=result.error_kind)
        if result.kept != keep:
            raise PeerError(f"{self.session.label} answered a task to keep with kept={result.kept}, not {keep}")
        return result.outputs, result.compute_s


@dataclass
class TaskOutcome:
    """The delivered result of a task and where its attempts ran."""

    task_id: int
    kernel: str
    outputs: tuple[np.ndarray, ...]
    worker_id: str
    attempts: list[AttemptRecord]
    compute_s: float
    elapsed_s: float
    queue_s: float = 0.0
    fallback_reason: str = ""  # why it ran locally when no remote worker was usable ("" otherwise)
    verification: str = LOCAL_VERIFICATION  # how its result was verified (task_verification)


CANARY_N = 48  # the canary task: a 48x48 int64 matmul, exact on every machine and tiny to move
CANARY_TIMEOUT_S = 30.0  # a canary not answered within this counts as "could not probe"
PROBE_TICK_S = 1.0  # how often the manager looks for suspect workers due for a canary


def canary_task(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Seeded operands of a canary matmul and its exact answer (integers: no rounding anywhere)."""
    import numpy as np

    gen = np.random.default_rng(seed)
    a, b = (gen.integers(-1000, 1000, (CANARY_N, CANARY_N), dtype=np.int64) for _ in range(2))
    return (a, b), a @ b


def format_utc(unix_s: float) -> str:
    """A wall-clock time as "HH:MM:SS UTC" (suspicion messages)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(unix_s))


@dataclass
class WorkerShare:
    """What one worker did in a split job."""

    blocks: int = 0
    rows: int = 0
    compute_s: float = 0.0  # the worker's own compute time for its blocks
    failed_over: int = 0  # blocks pulled for this worker that ended up elsewhere


@dataclass
class SplitOutcome:
    """The gathered result of a split task and each worker's share of it."""

    result: np.ndarray
    shares: dict[str, WorkerShare]
    elapsed_s: float
    bytes_moved: int = 0  # array bytes between this node and its workers: operands out, results back
    held_on: tuple[str, ...] = ()  # the workers that held the whole operands (b) for the job: crossed once

    def busy_fraction(self, worker_id: str) -> float:
        """The fraction of the job's wall time the worker spent computing its blocks."""
        return min(1.0, self.shares[worker_id].compute_s / max(self.elapsed_s, 1e-9))


SPLIT_HOLD_MIN_BYTES = 64 << 10  # a whole operand of a split task this large is held on each worker for the job


@dataclass
class _SplitJob:
    """One split task in progress: its operands, the result being filled, the next free row, the first failure."""

    kernel: str
    operands: tuple[np.ndarray, ...]
    sliced: tuple[bool, ...]  # per operand: its blocks take its rows (else it is whole in every block)
    params: Params
    n: int  # the rows of the result (and of each sliced operand)
    out: np.ndarray
    chosen: list[str]  # the workers the job was split over
    base_rows: int  # the rows of a block of a worker of mean speed
    shares: dict[str, WorkerShare]
    timeout_s: float  # of each block's task
    on_block: Callable[[str, int, int], None] | None
    cursor: int = 0  # the first row no block has taken yet
    failure: list[TaskError] = field(default_factory=list)
    shared: tuple[int, ...] = ()  # the whole operands held on each worker: the j-th under its id + j
    held: dict[str, int] = field(default_factory=dict)  # worker -> the first id under which it holds them
    storing: dict[str, int] = field(default_factory=dict)  # worker -> id: its first block keeps them there
    bytes_moved: int = 0
    job_id: int = 0  # its id on the task board

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """The operands of the block of rows lo:hi."""
        return tuple(o[lo:hi] if cut else o for o, cut in zip(self.operands, self.sliced, strict=True))


class Manager:
    """Runs tasks: feeds the Scheduler, performs its actions through delegators.

    Each `run()` call owns one task: it waits on a channel of the actions the
    scheduler addressed to that task, so retries after a worker leaves are
    picked up by the task that needs them.
    """

    def __init__(
        self, node: Node, *, clock: Callable[[], float] = time.monotonic, suspect_backoff_s: float = SUSPECT_BACKOFF_S
    ) -> None:
        self.node = node
        self.clock = clock
        self.scheduler = Scheduler(
            suspect_backoff_s=suspect_backoff_s, describe_time=lambda t: format_utc(self.wall_time(t))
        )
        self.on_suspicion: list[Callable[[str, str], None]] = []  # peer id, message: a worker's suspicion changed
        self._due_probes: list[str] = []  # workers the scheduler wants probed (watch_suspects sends the canaries)
        self.delegators: dict[str, TaskDelegator] = {LOCAL: LocalDelegator(node)}
        self._routes: dict[int, Any] = {}
        self._held_operands: dict[int, Mapping[int, Mapping[str, int]]] = {}  # task id -> `run`'s held
        self._next_held = 1  # ids of the arrays workers hold for this node (`hold`)
        self._held_running = 0  # tasks run by `run_held` (not through the scheduler) now
        self.split_hold = True  # split_matmul's default: b held once per worker (serve --split-hold)
        self._next_id = 1
        self.board = TaskBoard()  # what the dashboard shows: running and recent tasks, split shares
        self.tasks_done = 0
        self.tasks_failed = 0
        self.done_by: dict[str, int] = {}  # worker id -> tasks it delivered
        self.verify_rounds = FREIVALDS_ROUNDS  # 0: accept remote results unchecked
        self._local_speed_known = False
        self.verification_failures = 0
        self.retries = 0  # attempts beyond each task's first
        self.fallbacks = 0  # tasks that ran locally because no remote worker was usable
        self.on_task_end: list[Callable[[str, str, str, float], None]] = []  # kernel, outcome, where, seconds
        self._rng = random.Random()
        node.on_session.append(self._worker_up)
        node.on_session_closed.append(self._worker_down)
        node.on_peer_load.append(self._worker_load)

    def _worker_up(self, session: PeerSession) -> None:
        self.delegators[session.peer_id] = RemoteDelegator(session)
        self._apply(self.scheduler.handle(WorkerUpEvent(session.peer_id, max(session.hello.gflops, 1.0)), self.clock()))

    def _worker_down(self, session: PeerSession) -> None:
        delegator = self.delegators.get(session.peer_id)
        if isinstance(delegator, RemoteDelegator) and delegator.session is session:
            del self.delegators[session.peer_id]  # let the closed session be freed
        self._apply(self.scheduler.handle(WorkerDownEvent(session.peer_id, session.close_reason), self.clock()))

    def _worker_load(self, peer_id: str, load: int) -> None:
        self._apply(self.scheduler.handle(WorkerStatsEvent(peer_id, load=load), self.clock()))

    def _measured(self, worker_id: str, cost: tuple[float, int], compute_s: float, elapsed_s: float) -> None:
        """Feed what one successful attempt achieved into the scheduler's speed and bandwidth EWMAs."""
        flops, nbytes = cost
        speed = flops / compute_s / 1e9 if flops >= 1e7 and compute_s > 1e-3 else None
        moving_s = elapsed_s - compute_s
        bandwidth = nbytes / moving_s if worker_id != LOCAL and nbytes >= (1 << 20) and moving_s > 1e-3 else None
        if speed is not None or bandwidth is not None:
            self._apply(self.scheduler.handle(WorkerStatsEvent(worker_id, speed, bandwidth), self.clock()))

    @property
    def tasks_in_flight(self) -> int:
        """Tasks submitted and not finished yet."""
        return len(self._routes) + self._held_running

    def wall_time(self, scheduler_time: float) -> float:
        """The Unix time of a scheduler (clock) time."""
        return time.time() - (self.clock() - scheduler_time)

    def _apply(self, actions: list[SchedulerAction]) -> None:
        for action in actions:
            if isinstance(action, DropLate):
                log.info("dropped a late result of task %d (attempt %d)", action.task_id, action.attempt)
                continue
            if isinstance(action, Probe):
                self._due_probes.append(action.worker_id)
                continue
            if isinstance(action, Report):
                log.warning("peer %s %s", action.worker_id, action.message)
                for callback in self.on_suspicion:
                    callback(action.worker_id, action.message)
                continue
            route = self._routes.get(action.task_id)
            if route is not None:
                route.send_nowait(action)

    async def run(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params | None = None,
        *,
        placement: str = "auto",
        timeout_s: float = 600.0,
        fallback: bool = True,
        held: Mapping[int, Mapping[str, int]] | None = None,
        check: str = "",
        part_of: int = 0,
    ) -> TaskOutcome:
        """Run one task to completion; raise TaskError when every attempt failed. ``fallback=False``:
        fail (kind "unavailable") rather than run locally because no remote worker is usable.
        ``check``: how a remote result is verified (`check_result`): "" the kernel's own check,
        "recompute", or "none" (taken as sent); the outcome's ``verification`` says which ran.
        ``held``: by operand index, the workers that hold that operand for this node and under which
        id: an attempt there names it instead of sending its bytes (a negative id: sends it,
        and the worker keeps it under minus that id); anywhere else (a retry, the local fallback)
        the operand given is used. ``part_of``: the split job it is a block of (the task board's)."""
        import trio

        try:
            check_choice(check)
        except KernelError as exc:
            raise TaskError(str(exc), kind=ErrorKind.BAD_INPUT) from None

        task_id = self._next_id
        self._next_id += 1
        if held:
            self._held_operands[task_id] = held
        send, receive = trio.open_memory_channel[SchedulerAction](math.inf)
        self._routes[task_id] = send
        results: dict[int, tuple[tuple[np.ndarray, ...], float]] = {}
        scopes: dict[int, Any] = {}
        start = self.clock()
        first_attempt_at: float | None = None
        failure: TaskError | None = None
        ended = "cancelled"  # the board's outcome, unless it is delivered or fails
        self.board.start(task_id, kernel, placement, start, part_of)
        try:
            # NOTE: nothing is raised inside the nursery: trio would wrap it in an
            # ExceptionGroup, and callers catch TaskError.
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(timeout_s) as deadline_scope:
                    cost = self._submit(task_id, kernel, operands, params, placement, timeout_s, fallback, start)
                    async for action in receive:
                        if isinstance(action, Dispatch):
                            first_attempt_at = first_attempt_at or self.clock()
                            self.board.attempt(task_id, action.worker_id, self.clock())
                            scopes[action.attempt] = scope = trio.CancelScope()
                            job = (kernel, operands, dict(params or {}), cost, check)
                            nursery.start_soon(self._attempt, task_id, action, scope, job, results)
                        elif isinstance(action, Cancel):
                            if action.attempt in scopes:
                                scopes[action.attempt].cancel()
                        elif isinstance(action, Deliver):
                            nursery.cancel_scope.cancel()
                            outcome = self._delivered(task_id, kernel, action, results, start, first_attempt_at)
                            remote = action.worker_id != LOCAL
                            how = task_verification(kernel, check, remote, self.verify_rounds)
                            ended = "ok"
                            return dataclasses.replace(outcome, verification=how)
                        elif isinstance(action, Fail):
                            failure = TaskError(self._failure_text(task_id, kernel, action), kind=action.kind)
                            break
                if deadline_scope.cancelled_caught:
                    self._apply(self.scheduler.handle(TickEvent(), start + timeout_s))
                nursery.cancel_scope.cancel()
            raise failure or TaskError(
                f"{kernel}: no result within {format_seconds(timeout_s)}", kind=ErrorKind.DEADLINE
            )
        except TaskError as exc:
            ended = exc.kind
            self._task_failed(task_id, kernel, exc, start)
            raise
        finally:
            del self._routes[task_id]
            self._held_operands.pop(task_id, None)
            self.board.end(task_id, ended, self.clock())

    def _submit(
        self,
        task_id: int,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params | None,
        placement: str,
        timeout_s: float,
        fallback: bool,
        start: float,
    ) -> tuple[float, int]:
        """Submit a task to the scheduler (this node's speed first, once); return the task's cost."""
        if not self._local_speed_known and self.node.gflops:
            self._local_speed_known = True
            self.scheduler.handle(WorkerUpEvent(LOCAL, self.node.gflops), start)
        cost = task_cost(kernel, operands, dict(params or {}))
        submit = SubmitEvent(task_id, placement, start + timeout_s, *cost, fallback=fallback)
        self._apply(self.scheduler.handle(submit, start))
        return cost

    def _delivered(
        self,
        task_id: int,
        kernel: str,
        action: Deliver,
        results: dict[int, tuple[tuple[np.ndarray, ...], float]],
        start: float,
        first_attempt_at: float | None,
    ) -> TaskOutcome:
        """Count a delivered task, report its end and return its outcome (with why it ran locally, if it did)."""
        outputs, compute_s = results.pop(action.attempt)
        self.tasks_done += 1
        self.done_by[action.worker_id] = self.done_by.get(action.worker_id, 0) + 1
        attempts = self.scheduler.attempts(task_id)
        elapsed = self.clock() - start
        self._ended(kernel, "ok", action.worker_id, attempts, elapsed)
        queued = (first_attempt_at or start) - start
        why = attempts[-1].reason if attempts else ""
        if why:
            self.fallbacks += 1
            log.info("task %d ran locally: %s", task_id, why)
        return TaskOutcome(task_id, kernel, outputs, action.worker_id, attempts, compute_s, elapsed, queued, why)

    def _task_failed(self, task_id: int, kernel: str, exc: TaskError, start: float) -> None:
        """Count a failed task and report its end to the on_task_end callbacks."""
        self.tasks_failed += 1
        attempts = self.scheduler.attempts(task_id)
        self._ended(kernel, exc.kind, attempts[-1].worker_id if attempts else LOCAL, attempts, self.clock() - start)

    def _ended(self, kernel: str, outcome: str, worker_id: str, attempts: list[AttemptRecord], seconds: float) -> None:
        self.retries += max(0, len(attempts) - 1)
        where = "local" if worker_id == LOCAL else "remote"
        for callback in self.on_task_end:
            callback(kernel, outcome, where, seconds)

    async def _verify(
        self,
        worker_id: str,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        outputs: tuple[np.ndarray, ...],
        flops: float | None = None,
        check: str = "",
    ) -> str | None:
        """Check a remote worker's result (Freivalds for matmul; ``check`` as `check_result`'s); None
        when plausible."""
        import trio

        if worker_id == LOCAL or check == "none" or (self.verify_rounds <= 0 and check != RECOMPUTE):
            return None
        seed = self._rng.getrandbits(64)

        def run_check() -> str | None:
            rounds = max(1, self.verify_rounds)
            return check_result(kernel, operands, params, outputs, random.Random(seed), rounds, check)

        if runs_inline(flops if flops is not None else task_cost(kernel, operands, params)[0]):
            return run_check()
        return await trio.to_thread.run_sync(run_check)

    def suspicions(self) -> dict[str, dict[str, Any]]:
        """Every remote worker that is not fully trusted: its suspicion, ``since`` as a Unix time."""
        out = {}
        for worker_id in self.scheduler.workers:
            info = self.scheduler.suspicion(worker_id)
            if info is not None:
                info["since"] = self.wall_time(info["since"])
                info["text"] = self.scheduler.suspicion_text(worker_id)
                out[worker_id] = info
        return out

    def fallback_reason(self) -> str:
        """Why no remote worker is usable right now ("" when one is)."""
        if any(w != LOCAL for w in self.usable_workers()):
            return ""
        return self.scheduler.no_remote_reason()

    async def watch_suspects(self, tick_s: float = PROBE_TICK_S) -> None:
        """Run forever: tick the scheduler, and send each suspect worker that is due its canary."""
        import trio

        async with trio.open_nursery() as nursery:
            while True:
                self._apply(self.scheduler.handle(TickEvent(), self.clock()))
                while self._due_probes:
                    nursery.start_soon(self._probe, self._due_probes.pop(0))
                await trio.sleep(tick_s)

    async def _probe(self, worker_id: str) -> None:
        """Send one canary task to a suspect worker and report whether its answer was exact."""
        import numpy as np
        import trio

        operands, expected = canary_task(self._rng.getrandbits(32))
        kind, message = "", ""
        delegator = self.delegators.get(worker_id)
        log.info("probing suspect peer %s with a canary task", worker_id)
        try:
            if not isinstance(delegator, RemoteDelegator):
                raise PeerError(f"worker {short_id(worker_id)} is not connected", kind=ErrorKind.UNAVAILABLE)
            with trio.fail_after(CANARY_TIMEOUT_S):
                outputs, _ = await delegator.execute("matmul", operands, {})
            got = outputs[0] if len(outputs) == 1 else None
            if got is None or got.shape != expected.shape or not np.array_equal(got, expected):
                kind = ErrorKind.WRONG_RESULT
                message = "its canary matmul failed verification: the answer differs from the known one"
        except trio.TooSlowError:
            kind, message = ErrorKind.TIMEOUT, f"no answer to the canary within {CANARY_TIMEOUT_S:.0f} s"
        except (TaskError, PeerError) as exc:
            kind, message = (ErrorKind.INTERNAL if exc.kind == ErrorKind.WRONG_RESULT else exc.kind), str(exc)
        self._apply(self.scheduler.handle(ProbeDoneEvent(worker_id, kind, message), self.clock()))

    def usable_workers(self) -> list[str]:
        """This node and every connected peer that is up and not suspect, fastest first."""
        remotes = [
            w
            for w in self.node.sessions
            if self.scheduler.workers.get(w, _WorkerState(up=False)).up and not self.scheduler.workers[w].suspect
        ]
        return sorted([LOCAL, *remotes], key=lambda w: -self.scheduler.workers.get(w, _WorkerState()).speed)

    async def split_matmul(
        self,
        a: np.ndarray,
        b: np.ndarray,
        *,
        workers: Sequence[str] | None = None,
        in_flight: int = 2,
        blocks_per_worker: int = 4,
        timeout_s: float = 600.0,
        on_block: Callable[[str, int, int], None] | None = None,
        hold_shared: bool | None = None,
    ) -> SplitOutcome:
        """Compute a @ b (2-D) split in row blocks of a over workers (this node included): `split_rows`."""
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise TaskError(f"matmul: shapes {a.shape} and {b.shape} do not match", kind=ErrorKind.BAD_INPUT)
        return await self.split_rows(
            "matmul",
            (a, b),
            {},
            (True, False),
            workers=workers,
            in_flight=in_flight,
            blocks_per_worker=blocks_per_worker,
            timeout_s=timeout_s,
            on_block=on_block,
            hold_shared=hold_shared,
        )

    async def split_rows(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        sliced: Sequence[bool],
        *,
        workers: Sequence[str] | None = None,
        in_flight: int = 2,
        blocks_per_worker: int = 4,
        timeout_s: float = 600.0,
        on_block: Callable[[str, int, int], None] | None = None,
        hold_shared: bool | None = None,
    ) -> SplitOutcome:
        """Compute a task split in blocks of its output's rows over workers (this node included),
        gathered in order; ``sliced[i]``: operand i's blocks take its rows (axis 0, as many as the
        output's), else it is whole in every block (`row_split` says which for a kernel).

        Guided self-scheduling: each worker pulls its next block when it has room, and
        its blocks are sized in proportion to its measured speed, so a slow or busy
        worker ends up with less work. Each remote worker has ``in_flight`` blocks
        outstanding, so the transfer of its next block overlaps the compute of the
        current one. Every block is a task of its own: verified (its kernel's check), retried
        elsewhere when its worker fails, and written into the result exactly once.
        ``hold_shared`` (default `split_hold`): each whole operand of at least SPLIT_HOLD_MIN_BYTES
        (b of a matmul) crosses to each remote worker once, held there for the job (released at
        its end), and its blocks name it; a block retried elsewhere sends it. TaskError (bad-input)
        when the operands do not fit the kernel, before any block runs."""
        import numpy as np
        import trio

        operands, sliced = tuple(operands), tuple(sliced)
        n = next(o.shape[0] for o, cut in zip(operands, sliced, strict=True) if cut)
        try:  # NOTE: the kernel on no rows says whether the shapes fit, and the result's dtype and shape
            empty = run_kernel(kernel, [o[:0] if cut else o for o, cut in zip(operands, sliced, strict=True)], params)
        except KernelError as probe:
            message = str(probe)
            stand_ins = [np.broadcast_to(np.zeros((), o.dtype), o.shape) for o in operands]
            try:  # the same refusal in the words of the operands' own shapes, never computing a full result
                if output_nbytes(kernel, stand_ins, params) == 0:  # its shapes are refused (or it is empty)
                    run_kernel(kernel, stand_ins, params, max_elements=0)
            except KernelError as real:
                message = str(real)
            raise TaskError(message, kind=ErrorKind.BAD_INPUT) from None
        if len(empty) != 1 or any(o.shape[0] != n for o, cut in zip(operands, sliced, strict=True) if cut):
            raise TaskError(f"{kernel} cannot be split by rows", kind=ErrorKind.BAD_INPUT)
        chosen = list(workers) if workers is not None else self.usable_workers()
        out = np.empty((n, *empty[0].shape[1:]), dtype=empty[0].dtype)
        base_rows = max(1, math.ceil(n / (blocks_per_worker * len(chosen))))
        shares = {w: WorkerShare() for w in chosen}
        hold_shared = self.split_hold if hold_shared is None else hold_shared
        shared = tuple(
            i
            for i, (o, cut) in enumerate(zip(operands, sliced, strict=True))
            if not cut and o.nbytes >= SPLIT_HOLD_MIN_BYTES
        )
        job = _SplitJob(kernel, operands, sliced, dict(params), n, out, chosen, base_rows, shares, timeout_s, on_block)
        job.shared = shared if hold_shared else ()
        job.job_id, self._next_id, ended = self._next_id, self._next_id + 1, "cancelled"
        self.board.start(job.job_id, kernel, "split", self.clock(), rows=n)
        start = time.perf_counter()
        try:
            async with trio.open_nursery() as nursery:
                for worker in chosen:
                    first_done = trio.Event()
                    nursery.start_soon(self._split_puller, job, worker, first_done, None, bool(job.shared))
                    for _ in range(0 if worker == LOCAL else max(1, in_flight) - 1):  # BLAS already fills local cores
                        nursery.start_soon(self._split_puller, job, worker, trio.Event(), first_done, False)
            while await self._split_block(job, LOCAL, "auto"):
                pass  # rows left because every chosen worker went away: the scheduler places them
            ended = job.failure[0].kind if job.failure else "ok"
        finally:
            for worker, key in (job.storing | job.held).items():
                self.release(worker, tuple(range(key, key + len(job.shared))))
            self.board.end(job.job_id, ended, self.clock())
        if job.failure:
            raise job.failure[0]
        return SplitOutcome(out, shares, time.perf_counter() - start, job.bytes_moved, tuple(job.held))

    def _block_held(self, job: _SplitJob, worker: str, first: bool) -> dict[int, dict[str, int]] | None:
        """`run`'s ``held`` for a block of ``worker``: its first sends the shared operands and has them
        kept (negative ids), later ones name them; None when none is held (this node, holding off, an
        older worker)."""

        def by_operand(where: Mapping[str, int]) -> dict[int, dict[str, int]]:
            return {
                i: {w: key + j if key > 0 else key - j for w, key in where.items()} for j, i in enumerate(job.shared)
            }

        if worker in job.held:
            return by_operand(job.held)
        session = self.node.sessions.get(worker)
        if not first or not job.shared or session is None or "copy" not in session.hello.kernels:
            return by_operand(job.held) if job.held else None
        key = self.held_ids(len(job.shared))
        job.storing[worker] = key
        return by_operand({**job.held, worker: -key})

    def held_ids(self, count: int) -> int:
        """The first of ``count`` fresh ids for arrays a worker holds for this node."""
        first, self._next_held = self._next_held, self._next_held + count
        return first

    async def run_held(
        self,
        worker: str,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        *,
        held: tuple[int, ...],
        keep: int,
        timeout_s: float,
    ) -> TaskOutcome:
        """Run a task on the one ``worker`` that holds some of its operands for this node (``held[i]``:
        its id for operand i, whose entry here is a stand-in; 0: operand i is sent) or is to keep its
        outputs (``keep``: under this id + their index; the outputs returned are stand-ins). No retry
        elsewhere and no check here (this node has not got the bytes): TaskError, or PeerError when
        the worker is gone; the outcome says "unverified"."""
        import trio

        delegator = self.delegators.get(worker)
        if not isinstance(delegator, RemoteDelegator):
            raise PeerError(f"worker {short_id(worker)} is not connected", kind=ErrorKind.UNAVAILABLE)
        start = self.clock()
        self._held_running += 1
        task_id, self._next_id, ended = self._next_id, self._next_id + 1, "cancelled"
        self.board.start(task_id, kernel, worker, start)
        self.board.attempt(task_id, worker, start)
        try:
            with trio.fail_after(timeout_s):
                outputs, compute_s = await delegator.execute(
                    kernel, operands, params, held=held if any(held) else (), keep=keep
                )
            ended = "ok"
        except trio.TooSlowError:
            self.tasks_failed += 1
            ended = ErrorKind.DEADLINE
            raise TaskError(
                f"{kernel} on {short_id(worker)} did not finish within {format_seconds(timeout_s)}",
                kind=ErrorKind.DEADLINE,
            ) from None
        except (TaskError, PeerError) as exc:
            self.tasks_failed += 1
            ended = exc.kind
            raise
        finally:
            self._held_running -= 1
            self.board.end(task_id, ended, self.clock())
        self.tasks_done += 1
        self.done_by[worker] = self.done_by.get(worker, 0) + 1
        elapsed = self.clock() - start
        attempts = [AttemptRecord(worker, "ok")]
        self._ended(kernel, "ok", worker, attempts, elapsed)
        return TaskOutcome(0, kernel, outputs, worker, attempts, compute_s, elapsed, 0.0, "", UNVERIFIED)

    def release(self, worker: str, keys: Sequence[int]) -> None:
        """Tell ``worker`` it may let go of arrays it holds for this node (nothing when it left: the
        session's end freed them)."""
        session = self.node.sessions.get(worker)
        if session is not None and keys:
            session.send_release(tuple(keys))

    def _split_rows(self, job: _SplitJob, worker: str) -> int:
        """Block rows in proportion to the worker's speed as measured so far (EWMA), within
        a factor of 2 of the mean block: speeds measured on busy machines are noisy, and
        pulling does the rest (a slow worker comes back for its next block later)."""
        speed = {w: max(self.scheduler.workers.get(w, _WorkerState()).speed, 1e-3) for w in job.chosen}
        if worker not in speed:
            return job.base_rows
        ratio = min(2.0, max(0.5, len(job.chosen) * speed[worker] / sum(speed.values())))
        return max(1, round(job.base_rows * ratio))

    async def _split_block(self, job: _SplitJob, worker: str, placement: str, store: bool = False) -> bool:
        """Take the next rows for ``worker`` and compute them; False when there is nothing left.
        ``store``: this block sends the shared operands and has the worker keep them for the job's later blocks."""
        if job.cursor >= job.n or job.failure:
            return False
        lo = job.cursor
        hi = job.cursor = min(job.n, lo + self._split_rows(job, worker))
        held = self._block_held(job, worker, store)
        block = job.block(lo, hi)
        try:
            outcome = await self.run(
                job.kernel,
                block,
                job.params,
                placement=placement,
                timeout_s=job.timeout_s,
                held=held,
                part_of=job.job_id,
            )
        except TaskError as exc:
            job.failure.append(exc)
            return False
        job.out[lo:hi] = outcome.outputs[0]
        self.board.block(job.job_id, outcome.worker_id, hi - lo)
        if outcome.worker_id != LOCAL:  # the operands out, unless the worker held them, and the block back
            named = {i for i, where in (held or {}).items() if where.get(outcome.worker_id, 0) > 0}
            sent = sum(int(o.nbytes) for i, o in enumerate(block) if i not in named)
            job.bytes_moved += sent + int(outcome.outputs[0].nbytes)
            if outcome.worker_id in job.storing and outcome.worker_id not in job.held:
                job.held[outcome.worker_id] = job.storing[outcome.worker_id]  # kept there now
        share = job.shares.setdefault(outcome.worker_id, WorkerShare())
        share.blocks += 1
        share.rows += hi - lo
        share.compute_s += outcome.compute_s
        if job.on_block is not None:
            job.on_block(outcome.worker_id, hi - lo, job.n)  # progress: rows done by whom, of n
        if outcome.worker_id != worker:
            job.shares.setdefault(worker, WorkerShare()).failed_over += 1
        return True

    def _split_usable(self, worker: str) -> bool:
        """Whether ``worker`` may pull another block: this node, or a connected peer that is not suspect."""
        state = self.scheduler.workers.get(worker)
        return worker == LOCAL or (worker in self.node.sessions and not (state and state.suspect))

    async def _split_puller(
        self, job: _SplitJob, worker: str, first_done: Any, wait_for: Any, hold: bool = False
    ) -> None:
        """Pull blocks for ``worker`` while it stays usable; with ``wait_for``, only once that event is set;
        ``hold``: its first block leaves the shared operands there for the job (its other pullers wait for it)."""
        try:
            if wait_for is not None:
                await wait_for.wait()  # slow start: pipelining begins once the worker has proven itself
            # a worker that left, or whose results failed verification, pulls no more blocks
            store = hold and worker != LOCAL  # its first block leaves them there (its second waits for it)
            while self._split_usable(worker) and await self._split_block(job, worker, worker, store):
                store = False
                first_done.set()
        finally:
            first_done.set()  # NOTE: or its second puller would wait forever

    def _failure_text(self, task_id: int, kernel: str, fail: Fail) -> str:
        attempts = [(short_id(a.worker_id), a.outcome) for a in self.scheduler.attempts(task_id)]
        return failure_text(kernel, fail.message, attempts)

    async def _attempt(
        self,
        task_id: int,
        action: Dispatch,
        scope: Any,
        job: tuple[str, Sequence[np.ndarray], Params, tuple[float, int], str],
        results: dict[int, tuple[tuple[np.ndarray, ...], float]],
    ) -> None:
        import trio

        kernel, operands, params, cost, check = job
        if action.delay_s:
            await trio.sleep(action.delay_s)
        event: SchedulerEvent
        with scope:
            delegator = self.delegators.get(action.worker_id)
            try:
                if delegator is None:
                    raise PeerError(f"worker {short_id(action.worker_id)} is not connected", kind=ErrorKind.UNAVAILABLE)
                if action.worker_id != LOCAL:  # NOTE: not per local attempt: it cost a tenth of a tiny task
                    worker = short_id(action.worker_id)
                    log.debug("task %d attempt %d on %s: %s", task_id, action.attempt, worker, kernel)
                started = time.perf_counter()
                held = self._held_operands.get(task_id)
                ids = tuple(held.get(i, {}).get(action.worker_id, 0) for i in range(len(operands))) if held else ()
                if any(ids) and isinstance(delegator, RemoteDelegator):  # < 0: send it, and keep it there
                    use, keep = tuple(max(0, i) for i in ids), tuple(max(0, -i) for i in ids)
                    outputs, compute_s = await delegator.execute(kernel, operands, params, held=use, store=keep)
                else:
                    outputs, compute_s = await delegator.execute(kernel, operands, params)
                self._measured(action.worker_id, cost, compute_s, time.perf_counter() - started)
                problem = await self._verify(action.worker_id, kernel, operands, params, outputs, cost[0], check)
                if problem is not None:
                    self.verification_failures += 1
                    log.warning("result of task %d from %s failed verification: %s", task_id, action.worker_id, problem)
                    raise TaskError(
                        f"result from {short_id(action.worker_id)} failed verification: {problem}",
                        kind=ErrorKind.WRONG_RESULT,
                    )
                results[action.attempt] = (outputs, compute_s)
                event = TaskDoneEvent(task_id, action.attempt)
            except TaskError as exc:
                event = TaskFailedEvent(task_id, action.attempt, exc.kind, str(exc))
            except PeerError as exc:
                kind = exc.kind if exc.kind in RETRYABLE_KINDS else ErrorKind.UNAVAILABLE
                event = TaskFailedEvent(task_id, action.attempt, kind, str(exc))
            if isinstance(event, TaskFailedEvent):
                log.info(
                    "task %d attempt %d on %s failed: %s",
                    task_id,
                    action.attempt,
                    short_id(action.worker_id),
                    event.message,
                )
            self._apply(self.scheduler.handle(event, self.clock()))


###############################################################################
# 15. Around the node
#
# What a node runs beside its sessions: discovery on the LAN (mDNS), the
# Prometheus metrics, the initiator's distributed checks (the table of
# `initiate` and `respond`), and the fault injector, a fenced test aid.
###############################################################################


# ---------------------------------------------------------------- discovery on a LAN (mDNS)

MDNS_SERVICE = "_pangea._tcp.local."  # DNS-SD service type of a waiting initiator
DISCOVER_S = 8.0  # how long `respond --discover` listens for initiators


class Announcer:
    """Announces a waiting initiator on the LAN by mDNS (zeroconf), until closed.

    Only the address, port, peer ID and version are announced; the pairing code
    is not: a responder that discovers the initiator still has to type it."""

    def __init__(self, peer_id: str, addresses: Sequence[str]) -> None:
        self.peer_id = peer_id
        self.addresses = [a for a in addresses if not a.startswith("/ip4/127.")]
        self._zeroconf: Any = None
        self._info: Any = None

    def start(self) -> bool:
        """Register the service (blocking, about a second); False when there is nothing to announce."""
        from zeroconf import ServiceInfo, Zeroconf

        if not self.addresses:
            return False
        ips = [a.split("/")[2] for a in self.addresses]
        port = int(self.addresses[0].split("/tcp/")[1].split("/")[0])
        self._info = ServiceInfo(
            MDNS_SERVICE,
            f"pangea-{self.peer_id[-12:]}.{MDNS_SERVICE}",
            addresses=[socket.inet_aton(ip) for ip in ips],
            port=port,
            properties={"peer": self.peer_id, "role": "initiator", "version": __version__},
        )
        # NOTE: only on the interfaces whose addresses are announced, not on every one
        self._zeroconf = Zeroconf(interfaces=ips)
        self._zeroconf.register_service(self._info)
        return True

    def close(self) -> None:
        """Withdraw the announcement."""
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):  # best effort while shutting down
                self._zeroconf.unregister_service(self._info)
            self._zeroconf.close()
            self._zeroconf = None


def best_reachable(ips: Sequence[str]) -> str:
    """Of a multi-homed peer's addresses, the first on one of this box's own IPv4 networks
    (else the first): zeroconf lists them in no stable order."""
    import ipaddress

    import psutil

    networks = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask and not a.address.startswith("127."):
                with contextlib.suppress(ValueError):
                    networks.append(ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False))
    for ip in ips:
        if any(ipaddress.ip_address(ip) in net for net in networks):
            return ip
    return ips[0]


def discover_initiators(timeout_s: float = DISCOVER_S) -> list[dict[str, Any]]:
    """Listen for initiators announced by mDNS; return [{peer, address, version}] (blocking)."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    found: dict[str, dict[str, Any]] = {}
    names: list[str] = []

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Added:
            names.append(name)

    zeroconf = Zeroconf()
    try:
        ServiceBrowser(zeroconf, MDNS_SERVICE, handlers=[on_change])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found:  # give other initiators on the LAN a moment to answer too
                deadline = min(deadline, time.monotonic() + 1.0)
            time.sleep(0.25)
            for name in list(names):
                info = zeroconf.get_service_info(MDNS_SERVICE, name, timeout=1000)
                props = {k.decode(): (v or b"").decode() for k, v in (info.properties if info else {}).items()}
                if info is None or props.get("role") != "initiator" or not is_peer_id(props.get("peer", "")):
                    continue
                ips = [ip for ip in info.parsed_addresses() if ":" not in ip]  # IPv4, like initiate prints
                if ips:
                    ip = best_reachable(ips)
                    address = f"/ip4/{ip}/tcp/{info.port}/p2p/{props['peer']}"
                    found[props["peer"]] = {
                        "peer": props["peer"],
                        "address": address,
                        "version": props.get("version", "?"),
                    }
    finally:
        zeroconf.close()
    return list(found.values())


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics of a node, served on --metrics HOST:PORT (prometheus_client).

    Task outcomes and latencies are recorded as they happen; byte counts, peers,
    queue length, retries, verification failures and the durable queue of a
    `serve` node are read from the node at scrape time (a custom collector), so
    the data path carries no bookkeeping."""

    def __init__(self, node: Node, manager: Manager | None, queue: TaskQueue | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and few dashboards use them
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "pangea_tasks",
            "Tasks submitted on this node, by kernel, outcome and where they ran",
            ["kernel", "outcome", "placement"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pangea_task_duration_seconds",
            "Time from submitting a task to its result",
            ["kernel"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.served = Counter(
            "pangea_served_tasks",
            "Tasks this node ran for its peers, by kernel and outcome",
            ["kernel", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(node, manager, queue))
        if manager is not None:
            manager.on_task_end.append(self._task_end)
        node.on_task_served.append(lambda kernel, outcome: self.served.labels(kernel, outcome).inc())

    def _task_end(self, kernel: str, outcome: str, where: str, seconds: float) -> None:
        self.tasks.labels(kernel, outcome, where).inc()
        self.latency.labels(kernel).observe(seconds)

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics over HTTP in a daemon thread; return the bound address."""
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror}",
                hint="pick another address with --metrics HOST:PORT (port 0: any free one)",
            ) from None
        return host, int(server.server_port)


class _NodeCollector:
    """Reads a node's counters when Prometheus scrapes (runs on the HTTP thread)."""

    def __init__(self, node: Node, manager: Manager | None, queue: TaskQueue | None = None) -> None:
        self.node = node
        self.manager = manager
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        received = CounterMetricFamily("pangea_received_bytes", "Bytes received from each peer", labels=["peer"])
        sent = CounterMetricFamily("pangea_sent_bytes", "Bytes sent to each peer", labels=["peer"])
        sessions = list(self.node.sessions.values())  # NOTE: a snapshot; trio owns the dict
        for session in sessions:
            received.add_metric([session.peer_id], session.bytes_in)
            sent.add_metric([session.peer_id], session.bytes_out)
        departed_in, departed_out = self.node.departed_bytes
        received.add_metric(["departed"], departed_in)
        sent.add_metric(["departed"], departed_out)
        yield received
        yield sent
        yield GaugeMetricFamily("pangea_connected_peers", "Peers with an open session", value=len(sessions))
        yield GaugeMetricFamily(
            "pangea_memory_budget_used_bytes",
            "Operand and result bytes held for peers and RPC tasks",
            value=self.node.budget.in_use,
        )
        yield GaugeMetricFamily(
            "pangea_memory_budget_bytes",
            "The node's memory budget (--memory-budget-mib)",
            value=self.node.budget.limit_bytes,
        )
        refused = CounterMetricFamily(
            "pangea_refused", "What the node turned away to protect itself, by reason", labels=["reason"]
        )
        refused.add_metric(["rpc-calls-busy"], self.node.rpc_calls.refused)  # past RPC_MAX_CALLS_IN_FLIGHT
        refused.add_metric(["rpc-tasks-budget"], self.node.rpc_tasks_refused)  # over the memory budget
        refused.add_metric(["pending-streams"], self.node.pending.refused)  # streams past the pending caps
        data_plane = self.node.data_plane
        refused.add_metric(["data-handshakes-evicted"], data_plane.evicted if data_plane is not None else 0)
        strangers = self.node.strangers  # libp2p connections of untrusted peers: one too many, or idle
        refused.add_metric(["stranger-connections"], strangers.refused + strangers.expired)
        if self.queue is not None:
            refused.add_metric(["task-queue-full"], self.queue.refused)  # over --state-max-gib or QUEUE_MAX_TASKS
        yield refused
        if self.queue is not None:
            yield from self._queue_families(self.queue)
        yield GaugeMetricFamily(
            "pangea_rpc_calls_in_flight", "RPC calls the node is answering", value=self.node.rpc_calls.in_flight
        )
        if self.manager is not None:
            yield GaugeMetricFamily(
                "pangea_queue_length", "Tasks submitted here and not finished", value=self.manager.tasks_in_flight
            )
            yield CounterMetricFamily(
                "pangea_task_retries", "Attempts beyond each task's first", value=self.manager.retries
            )
            yield CounterMetricFamily(
                "pangea_verification_failures",
                "Worker results that failed verification",
                value=self.manager.verification_failures,
            )
            suspect = GaugeMetricFamily(
                "pangea_peer_suspect",
                "1 while a worker's results are not used (it failed verification; waits for or runs a canary task)",
                labels=["peer"],
            )
            probation = GaugeMetricFamily(
                "pangea_peer_probation", "1 while a worker that passed its canary task is on probation", labels=["peer"]
            )
            for worker_id, state in list(self.manager.scheduler.workers.items()):  # NOTE: a snapshot, as above
                if worker_id != LOCAL:
                    suspect.add_metric([worker_id], 1 if state.suspect else 0)
                    probation.add_metric([worker_id], 1 if state.suspicion == "probation" else 0)
            yield suspect
            yield probation

    @staticmethod
    def _queue_families(queue: TaskQueue) -> Iterator[Any]:
        """The durable queue's figures, as `status` has them (`TaskQueue.counts`), its tasks by state."""
        from prometheus_client.core import GaugeMetricFamily

        tasks = GaugeMetricFamily(
            "pangea_task_queue_tasks",
            "Tasks of the serve node's queue not answered yet, by state (done, failed: waiting for their client)",
            labels=["state"],
        )
        for state, count in queue.state_counts().items():
            tasks.add_metric([state], count)
        yield tasks
        journaled = queue.journal is not None
        yield GaugeMetricFamily(
            "pangea_task_queue_disk_bytes",
            "Bytes of the queue's disk quota its tasks hold: operands and results (0 without a journal)",
            value=queue.reserved if journaled else 0,
        )
        yield GaugeMetricFamily(
            "pangea_task_queue_disk_quota_bytes",
            "The queue's disk quota (--state-max-gib; 0: no journal, nothing kept across a restart)",
            value=queue.max_bytes if journaled else 0,
        )
        yield GaugeMetricFamily(
            "pangea_task_queue_recovered", "Tasks read back from the journal at start", value=queue.recovered
        )


def start_metrics(spec: str | None, node: Node, manager: Manager | None, queue: TaskQueue | None = None) -> str | None:
    """Start the metrics endpoint named by --metrics (None or "off": none); return its URL."""
    if spec is None or spec == "off":
        return None
    host, port = parse_host_port(spec, DEFAULT_METRICS_PORT)
    bound = Metrics(node, manager, queue).start(host, port)
    if not is_loopback_host(host):
        log.warning("metrics on %s:%d are readable by anyone who reaches that port", *bound)
    return f"http://{bound[0]}:{bound[1]}/metrics"


# ---------------------------------------------------------------- the distributed checks


@dataclass
class CheckRow:
    """One row of the checks table."""

    name: str
    ok: bool
    seconds: float
    detail: str

    def as_json(self) -> dict[str, Any]:
        """Return the row as the JSON object of the --json output."""
        return {"name": self.name, "ok": self.ok, "seconds": round(self.seconds, 4), "detail": self.detail}


def check_inputs(kernel: str, rng: Any, n: int = CHECK_MATRIX_N) -> CheckInputs:
    """Return operands and params that exercise ``kernel`` in the delegation check."""
    # NOTE: the same draws for every kernel, so each kernel's inputs do not depend on which ran before
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    v = rng.standard_normal(n)
    return KERNELS[kernel].sample(a, b, v)


def reference_result(kernel: str, operands: Sequence[np.ndarray], params: Params) -> np.ndarray:
    """Compute what ``kernel`` must return with plain numpy (independent of the kernel's own fn)."""
    import numpy as np

    reference = KERNELS[kernel].reference
    with np.errstate(all="ignore"):  # overflow to inf and NaN are results like any other, as in run_kernel
        return reference(operands, params)


def verify(
    name: str,
    got: np.ndarray,
    expected: np.ndarray,
    operands: Sequence[np.ndarray] = (),
    params: Params | None = None,
    *,
    kernel: str | None = None,
) -> float:
    """Raise CheckFailed unless ``got`` is a result numpy could give where it gave ``expected``;
    return the max abs error over the entries where both are finite.

    With the call's ``operands``, sums (matmul, sum, dot) and solves may differ
    from ``expected`` by their rounding-error bound (check_result's); otherwise
    results must equal numpy's: NaN where it has NaN, inf of the same sign,
    integers exactly."""
    import numpy as np

    kernel = kernel or name
    if got.shape != expected.shape:
        raise CheckFailed(f"{name}: shape {got.shape}, expected {expected.shape}")
    if got.dtype != expected.dtype:
        raise CheckFailed(f"{name}: dtype {got.dtype}, expected {expected.dtype}")
    with np.errstate(all="ignore"):
        finite = np.isfinite(got) & np.isfinite(expected) if got.dtype.kind in "fc" else np.ones(got.shape, bool)
        error = np.abs(got[finite].astype(np.complex128) - expected[finite]) if got.size else np.zeros(0)
        worst = float(error.max()) if error.size else 0.0
    entry = KERNELS.get(kernel)
    rounds = entry is not None and not entry.exact
    if operands and rounds and got.dtype.kind in "fc":
        problem = check_result(kernel, operands, params or {}, (got,), random.Random(0))
        if problem is not None:
            raise CheckFailed(f"{name}: result differs from local numpy: {problem}")
        return worst
    tol = None
    if got.dtype.kind in "fc" and rounds:
        # NOTE: without the operands there is no bound to derive: a same-machine result, nearly equal
        tol = np.full(got.shape, 1e-9 * max(1.0, float(np.abs(expected[finite]).max()) if finite.any() else 1.0))
    wrong = _exact_mismatches(got, expected, tol)
    if wrong.any():
        raise CheckFailed(
            f"{name}: result differs from local numpy (max error {worst:.3g}, {int(wrong.sum())} entries)"
        )
    return worst


# A rate above this was not measured on bytes that crossed a network (loopback copies
# reach ~10 GB/s on a fast box): the throughput check fails rather than print it.
MAX_PLAUSIBLE_BYTES_S = 100e9
# How long a failed check waits for the session of a responder that died to end too, so
# the failure names the departure (on a LAN the session ends within milliseconds).
DEPARTURE_GRACE_S = 1.0
# The checks that need the responders; the others run on this node alone.
LOCAL_CHECKS = frozenset({"local execution"})


@dataclass(frozen=True)
class Departure:
    """A responder whose session ended while the checks ran: in which check, why, and
    whether we had said 'done' to it first (then leaving is what it should do)."""

    peer_id: str
    check: str  # "" before the first check
    reason: str
    after_done: bool

    def text(self) -> str:
        """``responder 12D3.. left during the throughput check: <reason>``."""
        when = f"during the {self.check} check" if self.check else "before the checks"
        return f"responder {self.peer_id} left {when}: {self.reason or 'the session ended'}"


class InitiatorChecks:
    """The distributed checks the initiator runs against its responders.

    A check passes only when its work happened: a responder whose session ends
    during a check fails that check (naming the peer and the reason), and the
    checks after it that need the responders are reported as not run."""

    def __init__(
        self, node: Node, manager: Manager, sessions: Sequence[PeerSession], *, size: int, transfer_bytes: int
    ) -> None:
        import numpy as np

        self.node = node
        self.manager = manager
        self.sessions = list(sessions)
        self.session = self.sessions[0]
        self.peer = self.session.peer_id
        self.size = size
        self.transfer_bytes = transfer_bytes
        self.rng = np.random.default_rng(2024)
        self.results: list[CheckRow] = []
        self.rtt_ms: float | None = None
        self.throughput: dict[str, float] = {}
        self.shares: dict[str, dict[str, float]] = {}
        self.on_check: Callable[[str], None] = lambda name: None  # progress display hooks
        self.on_block: Callable[[str, int, int], None] | None = None
        self.current = ""  # the check running now
        self.departures: dict[str, Departure] = {}  # peer id -> how its session ended
        node.on_session_closed.append(self._session_ended)
        self._note_departures()  # a responder may have left between connecting and the checks

    def _who(self, session: PeerSession) -> str:
        return "the responder" if len(self.sessions) == 1 else f"responder {session.label}"

    def _session_ended(self, session: PeerSession) -> None:
        if any(s is session for s in self.sessions) and session.peer_id not in self.departures:
            self.departures[session.peer_id] = Departure(
                session.peer_id, self.current, session.close_reason, session.leaving
            )

    def _note_departures(self) -> None:
        """Record sessions that ended without the node's callback (replaced, or closed before we listened)."""
        for session in self.sessions:
            if session.closed.is_set():
                self._session_ended(session)

    def _left(self, *, check: str | None = None) -> list[Departure]:
        """Responders that left before we said 'done' (during ``check`` only, when given)."""
        return [d for d in self.departures.values() if not d.after_done and (check is None or d.check == check)]

    async def _settle(self) -> None:
        """After a failed check, give a responder's session DEPARTURE_GRACE_S to end: a dead
        peer's data connection often breaks (failing the task) a moment before its session does."""
        import trio

        if any(s.closed.is_set() for s in self.sessions):
            return

        async def one_ends(session: PeerSession, scope: Any) -> None:
            await session.closed.wait()
            scope.cancel()

        with trio.move_on_after(DEPARTURE_GRACE_S) as scope:
            async with trio.open_nursery() as nursery:
                for session in self.sessions:
                    nursery.start_soon(one_ends, session, scope)

    async def _run(self, name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        self.current = name
        self.on_check(name)
        needs_responders = name not in LOCAL_CHECKS
        gone = self._left()
        fallbacks = self.manager.fallbacks
        if needs_responders and gone:
            ok, detail = False, "not run: " + "; ".join(d.text() for d in gone)
        else:
            try:
                detail = await fn()
                ok = True
            except PangeaError as exc:
                ok, detail = False, str(exc)
                if needs_responders:
                    await self._settle()
            self._note_departures()
            during = self._left(check=name)
            if during and needs_responders:  # what the check saw follows from the departure
                seen = "" if ok else f"; {detail}"
                ok, detail = False, "; ".join(d.text() for d in during) + seen
        # NOTE: the fallback check's own task runs locally by design; its row already says so
        detail += self._suspicion_note(0 if name == "fallback" else self.manager.fallbacks - fallbacks)
        self.results.append(CheckRow(name, ok, time.perf_counter() - start, detail))
        log.info("check %s: %s (%s)", name, "ok" if ok else "FAILED", detail)

    def _suspicion_note(self, fallbacks: int) -> str:
        """What a check row must add: responders not fully trusted, tasks that fell back to this node."""
        notes = [
            f"{self._who(s)} is {self.manager.scheduler.suspicion_text(s.peer_id)}"
            for s in self.sessions
            if self.manager.scheduler.suspicion(s.peer_id) is not None
        ]
        if fallbacks:
            notes.append(f"{fallbacks} task(s) ran locally because no responder was usable")
        return "".join(f"; {note}" for note in notes)

    async def run_all(self) -> list[CheckRow]:
        """Run every check in order; the last one ends the sessions with the responders."""
        await self._run("connection", self.connection)
        await self._run("local execution", self.local_execution)
        await self._run("delegation", self.delegation)
        await self._run("aggregation", self.aggregation)
        await self._run("throughput", self.throughput_check)
        if not self.results[-1].ok:
            self.throughput = {}  # figures of a failed check are not a rate
        await self._run("fallback", self.fallback)
        for session in self.sessions:  # the fallback check did not run: still say we are done
            if not session.closed.is_set() and not session.leaving:
                await session.bye("done")
        return self.results

    async def _on(
        self, session: PeerSession, what: str, kernel: str, operands: Any, params: Any, *, then: str = ""
    ) -> TaskOutcome:
        """Run a task on ``session``'s responder; CheckFailed when it failed or its result came
        from elsewhere (a fallback is no evidence of the responder's work)."""
        try:
            outcome = await self.manager.run(kernel, operands, params, placement=session.peer_id)
        except TaskError as exc:
            raise CheckFailed(f"the {what} on {self._who(session)} failed: {exc}") from None
        if outcome.worker_id != session.peer_id:
            failed = [a.outcome for a in outcome.attempts if a.worker_id == session.peer_id]
            where = "locally" if outcome.worker_id == LOCAL else f"on {short_id(outcome.worker_id)}"
            # NOTE: once the session has ended, its departure (named by _run) is the reason
            why = f" (its attempt there: {failed[0]})" if failed and not session.closed.is_set() else ""
            raise CheckFailed(f"the {what} ran {where}, not on {self._who(session)}{why}{then}")
        return outcome

    async def connection(self) -> str:
        import trio

        details = []
        for session in self.sessions:
            info = self.node.connection_info(session.peer_id)
            rtts = sorted([await session.ping() for _ in range(PING_COUNT)])
            rtt_ms = rtts[len(rtts) // 2] * 1000
            self.rtt_ms = self.rtt_ms if self.rtt_ms is not None else rtt_ms
            if "noise" not in info["security"]:
                raise CheckFailed(f"connection to {session.peer_id} is not encrypted with Noise: {info['security']}")
            with trio.move_on_after(DATA_SETTLE_S):
                await session.data_settled.wait()
            hello = session.hello
            details.append(
                f"peer {session.peer_id} (pangea {hello.pangea_version}, {hello.platform}, "
                f"{hello.gflops:.0f} GFLOP/s); {info['security']} + {info['muxer']}; rtt {rtt_ms:.2f} ms; "
                f"arrays: {session.data_note}"
            )
        return "; ".join(details)

    async def local_execution(self) -> str:
        a, b = self.rng.standard_normal((256, 256)), self.rng.standard_normal((256, 256))
        outcome = await self.manager.run("matmul", (a, b), placement=LOCAL)
        if outcome.worker_id != LOCAL:
            raise CheckFailed(f"ran on {outcome.worker_id}, not locally")
        err = verify("matmul", outcome.outputs[0], a @ b, (a, b))
        return f"256x256 matmul on this node in {outcome.compute_s * 1000:.1f} ms, max error {err:.1e}"

    async def delegation(self) -> str:
        done = []
        for session in self.sessions:
            for kernel in sorted(KERNELS):
                operands, params = check_inputs(kernel, self.rng)
                outcome = await self._on(session, f"{kernel} task", kernel, operands, params)
                self._verify_outputs(kernel, outcome.outputs, operands, params)
                done.append(kernel)
        where = "the responder" if len(self.sessions) == 1 else f"each of the {len(self.sessions)} responders"
        kernels = ", ".join(sorted(KERNELS))
        return f"{len(KERNELS)}/{len(KERNELS)} kernels ran on {where} and match local numpy: {kernels}"

    @staticmethod
    def _verify_outputs(kernel: str, outputs: Sequence[np.ndarray], operands: Operands, params: Params) -> None:
        """CheckFailed unless a responder's outputs are what numpy could give: one output compared with
        numpy's own; several, or vectors numpy leaves free up to sign (svd, eig), by the kernel's check."""
        import numpy as np

        entry = KERNELS[kernel]
        if entry.outputs == 1 and entry.unique:
            verify(kernel, outputs[0], np.asarray(reference_result(kernel, operands, params)), operands, params)
            return
        if entry.check is not None:
            problem = check_result(kernel, operands, params, outputs, random.Random(0))
            if problem is not None:
                raise CheckFailed(f"{kernel}: result differs from local numpy: {problem}")
            return
        wanted = reference_result(kernel, operands, params)
        for i, (got, want) in enumerate(zip(outputs, wanted, strict=True)):
            verify(f"{kernel} output {i}", got, np.asarray(want), kernel=kernel)

    async def aggregation(self) -> str:
        n = self.size
        a, b = self.rng.standard_normal((n, n)), self.rng.standard_normal((n, n))
        workers = [LOCAL, *(s.peer_id for s in self.sessions)]
        split = await self.manager.split_matmul(a, b, workers=workers, on_block=self.on_block)
        err = verify("gathered matmul", split.result, a @ b, (a, b), kernel="matmul")
        parts = []
        for worker, share in split.shares.items():
            self.shares[worker] = {"rows": share.rows, "blocks": share.blocks, "busy": split.busy_fraction(worker)}
            name = "local" if worker == LOCAL else short_id(worker)
            parts.append(f"{name} {share.rows} rows/{share.blocks} blocks")
        if sum(s.rows for s in split.shares.values()) != n:
            raise CheckFailed(f"the blocks cover {sum(s.rows for s in split.shares.values())} rows, not {n}")
        if not all(split.shares[s.peer_id].rows for s in self.sessions):
            raise CheckFailed("a responder got no block: " + ", ".join(parts))
        moved = f"{format_bytes(split.bytes_moved)} moved"
        if split.held_on:
            moved += f", b sent once to each of {len(split.held_on)} responder(s)"
        return (
            f"{n}x{n} matmul split by rows ({', '.join(parts)}); gathered result matches, max error {err:.1e}; {moved}"
        )

    def _rate(self, session: PeerSession, what: str, nbytes: int, counted: int, seconds: float) -> float:
        """MB/s of ``nbytes`` verified in ``seconds``; CheckFailed when the connection's byte
        counters saw fewer bytes cross, or the figure is not one a network carries."""
        if counted < nbytes:
            raise CheckFailed(
                f"the {what} counted only {format_bytes(counted)} of {format_bytes(nbytes)} on the connection "
                f"to {self._who(session)}"
            )
        if seconds <= 0 or nbytes / seconds > MAX_PLAUSIBLE_BYTES_S:
            raise CheckFailed(
                f"the {what} of {format_bytes(nbytes)} to {self._who(session)} took {seconds:.3g} s by the "
                f"responder's figures, faster than {MAX_PLAUSIBLE_BYTES_S / 1e9:.0f} GB/s: not a measured rate"
            )
        return nbytes / seconds / 1e6

    async def _round_trip(self, session: PeerSession, data: Any, rows: int) -> tuple[float, float]:
        """One upload and one download of ``data``'s size to ``session``'s responder, both
        verified by content; their MB/s (bytes over the task's wall time less its compute)."""
        import numpy as np

        sent, start = session.bytes_out, time.perf_counter()
        up = await self._on(session, "upload", "sum", (data,), {}, then=", so no rate")
        up_s, sent = time.perf_counter() - start - up.compute_s, session.bytes_out - sent
        verify("sum", up.outputs[0], np.asarray(data.sum()))
        params = {"rows": float(rows), "cols": 1024.0, "seed": 7.0}
        received, start = session.bytes_in, time.perf_counter()
        down = await self._on(session, "download", "random", (), params, then=", so no rate")
        down_s, received = time.perf_counter() - start - down.compute_s, session.bytes_in - received
        if not np.array_equal(down.outputs[0], reference_result("random", (), params)):
            raise CheckFailed(f"the array downloaded from {session.label} differs from the expected one")
        return (
            self._rate(session, "upload", data.nbytes, sent, up_s),
            self._rate(session, "download", down.outputs[0].nbytes, received, down_s),
        )

    async def throughput_check(self) -> str:
        """Upload an array and download one to each responder, a steady-state figure: one
        warm-up round (not counted), then the median of up to THROUGHPUT_SAMPLES rounds, none
        started after THROUGHPUT_MEASURE_S. Each figure is the payload's bytes, verified by
        content (the responder's sum; the seeded array), over the time they took to cross
        (the task's wall time less the responder's compute)."""
        rows = max(1, self.transfer_bytes // (8 * 1024))
        data = self.rng.random((rows, 1024))
        details = []
        counts = []
        for session in self.sessions:
            await self._round_trip(session, data, rows)  # warm-up: fresh buffers on both ends
            ups: list[float] = []
            downs: list[float] = []
            begin = time.perf_counter()
            while len(ups) < THROUGHPUT_SAMPLES and (not ups or time.perf_counter() - begin < THROUGHPUT_MEASURE_S):
                up, down = await self._round_trip(session, data, rows)
                ups.append(up)
                downs.append(down)
            figures = {"upload": statistics.median(ups), "download": statistics.median(downs)}
            self.throughput = self.throughput or figures
            counts.append(len(ups))
            prefix = "" if len(self.sessions) == 1 else f"{session.label}: "
            details.append(
                f"{prefix}upload {figures['upload']:.0f} MB/s ({min(ups):.0f}-{max(ups):.0f}), "
                f"download {figures['download']:.0f} MB/s ({min(downs):.0f}-{max(downs):.0f})"
            )
        rounds = str(counts[0]) if len(set(counts)) == 1 else "-".join(str(n) for n in (min(counts), max(counts)))
        head = f"{format_bytes(data.nbytes)} each way, verified, median of {rounds} after a warm-up: "
        return head + "; ".join(details)

    async def fallback(self) -> str:
        """Say done to the responders, then delegate to the first while it hangs up: the
        task must come back from a local run, after a real failed attempt."""
        import trio

        a = self.rng.standard_normal((128, 128))
        for session in self.sessions[1:]:  # the others leave first, so the retry can only go local
            await session.bye("done")
        with trio.move_on_after(BYE_WAIT_S):
            for session in self.sessions[1:]:
                await session.closed.wait()
        await self.session.bye("done")
        outcome = await self.manager.run("inverse", (a,), placement=self.peer)
        first = outcome.attempts[0]
        if first.worker_id != self.peer or outcome.worker_id != LOCAL:
            where = ", ".join(f"{short_id(x.worker_id)}={x.outcome}" for x in outcome.attempts)
            raise CheckFailed(f"expected a failed attempt on the responder, then a local run; got {where}")
        verify("inverse", outcome.outputs[0], reference_result("inverse", (a,), {}), (a,))
        with trio.move_on_after(BYE_WAIT_S):
            await self.session.closed.wait()
        self._note_departures()
        stayed = [s for s in self.sessions if not s.closed.is_set()]
        if stayed:
            names = ", ".join(s.peer_id for s in stayed)
            raise CheckFailed(f"responder {names} did not hang up within {BYE_WAIT_S:.0f} s of 'done'")
        # NOTE: a responder that left before 'done' is the departure _run reports instead.
        how = self.departures[self.peer].reason if self.peer in self.departures else self.session.close_reason
        return (
            f"{self._who(self.session)} left after 'done' ({how}); attempt 1 on it failed ({first.outcome}); "
            "attempt 2 ran locally and verified"
        )


# ---------------------------------------------------------------- fault injection (a TEST AID)
#
# The one place where a node misbehaves on purpose, for the failure tests:
# `--fault` on respond and serve (never for real work). A real node has no
# FaultInjector (Node.faults is None); the node asks one, when it has it, at
# three points: before a served task runs, on that task's outputs, and when
# it dials a peer's data plane.


@dataclass(frozen=True)
class Fault:
    """A fault a worker injects on purpose: a TEST AID for the failure tests, never for real use.

    corrupt: return wrong numbers (corrupt=N: only in its first N results, then
    right ones: a worker that lied and recovered); lie=KIND: tell one small lie per
    result (see small_lie); crash-after=N: exit abruptly when task N+1
    arrives; slow=SECONDS: stall that long before each task; data-via=HOST:PORT:
    dial the peer's data plane through that address (a test's proxy that alters,
    replays or impersonates)."""

    kind: str
    value: float = 0.0
    text: str = ""


SMALL_LIES = ("relative", "sign", "swap", "nan", "plus-one")


def small_lie(kind: str, result: np.ndarray) -> np.ndarray:
    """A copy of ``result`` with one small lie of ``kind`` where it can be told (TEST AID, --fault lie=KIND).

    relative: the largest finite entry off by 1e-6 relative; sign: its sign
    flipped; swap: the first and last rows (or entries) swapped; nan: the first
    entry NaN (or 0 when it is NaN or inf already); plus-one: the first entry plus one."""
    import numpy as np

    out = np.array(result, copy=True)
    flat = out.reshape(-1)
    if not flat.size:
        return out
    top = int(np.argmax(np.where(np.isfinite(flat), np.abs(flat), -1)))
    with np.errstate(all="ignore"):  # NOTE: -(-2**63) wraps to itself; integers wrap as numpy's do
        if kind == "relative" and out.dtype.kind in "fc":
            flat[top] = flat[top] * (1 + 1e-6)
        elif kind == "sign":
            flat[top] = -flat[top]
        elif kind == "swap" and (out if out.ndim else flat).shape[0] > 1:
            rows = out if out.ndim else flat
            rows[[0, -1]] = rows[[-1, 0]]
        elif kind == "nan" and out.dtype.kind in "fc":
            flat[0] = 0 if not np.isfinite(flat[0]) else np.nan
        elif kind == "plus-one":
            flat[0] = flat[0] + 1
    return out


def parse_fault(text: str) -> Fault:
    """Parse --fault corrupt[=N] | lie=KIND | crash-after=N | slow=S | data-via=HOST:PORT; else raise UsageError."""
    name, _, value = text.partition("=")
    try:
        if name == "corrupt" and not value:
            return Fault("corrupt")
        if name == "corrupt" and value.isdigit() and int(value) > 0:
            return Fault("corrupt", float(value))
        if name == "lie" and value in SMALL_LIES:
            return Fault("lie", text=value)
        if name == "crash-after" and value.isdigit():
            return Fault("crash-after", float(value))
        if name == "slow" and 0 <= float(value) <= 3600:
            return Fault("slow", float(value))
        if name == "data-via":
            host, _, port = value.rpartition(":")
            if host and port.isdigit() and 0 < int(port) <= 65535:
                return Fault("data-via", float(port), host.strip("[]"))
    except ValueError:
        pass
    raise UsageError(
        f"bad --fault {text!r}: expected corrupt, corrupt=N, lie={'|'.join(SMALL_LIES)}, crash-after=N, slow=SECONDS"
        " or data-via=HOST:PORT"
    )


class FaultInjector:
    """Misbehaves as ``--fault`` asks (TEST AID): stalls or exits before a task, returns wrong
    numbers, or dials a peer's data plane through a test's proxy."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.lies = 0  # wrong results returned so far (--fault corrupt=N stops after N)

    async def before_task(self, tasks_served: int) -> None:
        """Stall (slow=S), or exit abruptly once ``tasks_served`` reached N (crash-after=N)."""
        import trio

        if self.fault.kind == "crash-after" and tasks_served >= self.fault.value:
            log.warning("fault injection: exiting abruptly after %d tasks (--fault crash-after)", tasks_served)
            os._exit(70)
        if self.fault.kind == "slow":
            await trio.sleep(self.fault.value)

    def into(self, outputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Return slightly wrong numbers (corrupt[=N]: the first N times) or one small lie (lie=KIND)."""
        if self.fault.kind == "lie":
            return tuple(small_lie(self.fault.text, out) for out in outputs)
        if self.fault.kind != "corrupt":
            return outputs
        if self.fault.value and self.lies >= self.fault.value:
            return outputs
        self.lies += 1
        wrong = []
        for out in outputs:
            out = out.copy()
            if out.size and out.dtype.kind in "fc":
                out.reshape(-1)[:: max(1, out.size // 7)] += 1.0
            elif out.size:
                out.reshape(-1)[:: max(1, out.size // 7)] += 1
            wrong.append(out)
        return tuple(wrong)

    def data_address(self, host: str, port: int) -> tuple[str, int]:
        """Where to dial a peer's data plane: through the proxy of data-via=HOST:PORT, else unchanged."""
        if self.fault.kind != "data-via":
            return host, port
        log.warning(
            "fault injection: dialing the data plane via %s", format_host_port(self.fault.text, int(self.fault.value))
        )
        return self.fault.text, int(self.fault.value)


###############################################################################
# 16. RPC records
#
# External programs reach a `serve` node over Cap'n Proto RPC (schema: the
# `Gate`, `Compute` and `RemoteArray` interfaces of capnp/pangea.capnp). This
# room holds what both ends of it share: the RPC's constants, arrays to and from
# Cap'n Proto, and the records (one dataclass per struct that crosses, one
# to/from Cap'n Proto pair for all of them). It opens no socket: the service
# below and the client use it.
###############################################################################

DEFAULT_RPC_PORT = 7780
DEFAULT_RPC_MAX_BYTES = 1 << 30  # a reference size of one RPC message (a node's own follows its memory budget)
RPC_MESSAGE_ROOM_BYTES = 16 << 20  # what one message holds around its arrays (the task spec, lists, padding)
RPC_CHUNK_BYTES = 128 << 20  # Data fields must stay under Cap'n Proto's 512 MiB limit
MIN_TOKEN_CHARS = 16  # a shorter token is guessable; generate one with `openssl rand -hex 16`
RPC_CONNECT_TIMEOUT_S = 10.0  # `connect` over RPC dials for at most this long


def rpc_max_bytes_for_budget(budget_bytes: int) -> int:
    """A node's largest RPC message when --rpc-max-mib does not say: what its memory budget admits.

    A task holds its operands twice on the node (`rpc_task_bytes`), so a request carries at most
    half the budget in arrays (plus the room around them); the answer's output is bounded the
    same way. At most RPC_MAX_MIB. The default budget (4 GiB) gives 2 GiB: 1 GiB of operands fits."""
    return min(budget_bytes // 2 + RPC_MESSAGE_ROOM_BYTES, RPC_MAX_MIB << 20)


def result_verified(outcome: TaskOutcome, verify_rounds: int) -> bool:
    """Whether the node checked a task's result: it ran on remote workers (every block of a split)
    and the node verifies their results (--verify-rounds above 0, or the task asked for "recompute").
    Local results are not checked, nor results of an unverified kernel or check "none"."""
    if outcome.worker_id == LOCAL or outcome.verification in (UNVERIFIED, LOCAL_VERIFICATION):
        return False
    if outcome.verification == RECOMPUTE:
        return True
    if verify_rounds <= 0:
        return False
    return outcome.worker_id != "split" or all(a.worker_id != LOCAL for a in outcome.attempts)


def rpc_error_fields(exc: BaseException, what: str) -> tuple[str, str]:
    """Return (errorKind, errorMessage) of an RPC method that failed with ``exc``.

    pangea's own errors keep their kind and message; anything else is a bug:
    kind "internal", one line to the client, the traceback to the node's log."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, PangeaError):
        kind = getattr(exc, "kind", None) or (ErrorKind.BAD_INPUT if isinstance(exc, UsageError) else ErrorKind.FAILED)
        return str(kind), one_line(str(exc))
    log.error("RPC %s failed unexpectedly: %s", what, describe_exception(exc), exc_info=exc)
    return str(ErrorKind.INTERNAL), one_line(
        f"cannot {what}: internal error ({describe_exception(exc)}); see the node's log"
    )


def array_to_capnp(builder: Any, a: np.ndarray) -> None:
    """Fill an RPC `Array` builder from a numpy array (chunked, no pickling)."""
    (meta,), (view,) = _array_parts([a])
    builder.dtype, shape, nbytes, _, _ = meta
    builder.shape = list(shape)
    n = max(1, math.ceil(nbytes / RPC_CHUNK_BYTES)) if nbytes else 0
    chunks = builder.init("chunks", n)
    for i in range(n):
        chunks[i] = view[i * RPC_CHUNK_BYTES : (i + 1) * RPC_CHUNK_BYTES]


def array_from_capnp(reader: Any, index: int = 0) -> np.ndarray:
    """Return the numpy array of an RPC `Array`; TaskError(bad-input) when inconsistent.

    The bytes are copied out of the message once: each chunk straight into one
    buffer of the size the dtype and shape declare (a chunk's `bytes` lives only
    while it is copied), so an operand costs its bytes here, not twice them."""
    from types import SimpleNamespace

    meta = SimpleNamespace(dtype=str(reader.dtype), shape=[int(d) for d in reader.shape], nbytes=0)
    try:
        _, _, expected = _array_layout(meta, 0, 0, Limits())
        payload = bytearray(expected)
        view = memoryview(payload)
        offset = 0
        chunks = reader.chunks
        for i in range(len(chunks)):  # NOTE: not `for chunk in`: its variable would keep a second chunk alive
            piece = chunks[i]  # pycapnp gives a list's Data only as a copy (bytes): one at a time
            if offset + len(piece) <= expected:
                view[offset : offset + len(piece)] = piece
            offset += len(piece)  # past `expected`: only counted, for the message
            del piece  # before the next chunk's copy is made
        del view
        meta.nbytes = offset  # NOTE: not `expected`: a size that differs is refused with both numbers
        (array,) = _arrays_from([meta], payload, task_id=0)
    except MessageError as exc:
        raise TaskError(str(exc).replace("array 0", f"operand {index}"), kind=ErrorKind.BAD_INPUT) from None
    return array


# The records that cross RPC: each is built once on the node, filled into its
# Cap'n Proto struct by `to_capnp`, read back by `from_capnp` on the client,
# and handed to Python callers (and `call --json`) as `as_dict()`.
#
# A record is a frozen dataclass whose fields each name their Cap'n Proto field
# once, `since: float = field(metadata=capnp_name("sinceUnix"))`; how a value
# travels follows from the field's annotation: str, int, float and bool as they
# are, a record (or `np.ndarray`, an `Array`) as its struct, and `tuple[X, ...]`
# as a list of those. `RpcRecord`'s to_capnp, from_capnp and as_dict serve every
# record; a record overrides one only where it differs (an optional struct, an
# error that carries nothing else, the keys the Client returns), and a field
# without a Cap'n Proto name is its own to carry. Adding a field: one line here,
# one in capnp/pangea.capnp.


def capnp_name(name: str) -> dict[str, str]:
    """The metadata of a record field that travels as the Cap'n Proto field ``name``."""
    return {"capnp": name}


_RPC_SCALARS: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "float": float, "bool": bool}
_RpcRecordT = TypeVar("_RpcRecordT", bound="RpcRecord")


class RpcRecord:
    """A record that crosses RPC as one Cap'n Proto struct; each subclass is a frozen dataclass (see above)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # NOTE: set by @dataclass on each subclass
    _by_name: ClassVar[dict[str, type[RpcRecord]]] = {}  # so "tuple[SuspicionRecord, ...]" finds its class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RpcRecord._by_name[cls.__name__] = cls

    @classmethod
    def capnp_fields(cls) -> list[tuple[str, str, str]]:
        """(attribute, Cap'n Proto name, annotation) of each field that travels by its name."""
        return [(f.name, f.metadata["capnp"], str(f.type)) for f in dataclasses.fields(cls) if "capnp" in f.metadata]

    def to_capnp(self, builder: Any) -> None:
        """Fill the record's Cap'n Proto builder."""
        self._fill_capnp(builder, {attribute for attribute, _, _ in self.capnp_fields()})

    def _fill_capnp(self, builder: Any, attributes: set[str]) -> None:
        """Fill the Cap'n Proto fields of ``attributes`` (the others stay unset)."""
        for attribute, name, annotation in self.capnp_fields():
            if attribute in attributes:
                _rpc_to_capnp(builder, name, annotation, getattr(self, attribute))

    @classmethod
    def from_capnp(cls: type[_RpcRecordT], reader: Any) -> _RpcRecordT:
        """Return the record of its Cap'n Proto reader; TaskError(bad-input) for an inconsistent array."""
        return cls(**cls.capnp_values(reader))

    @classmethod
    def capnp_values(cls, reader: Any) -> dict[str, Any]:
        """The fields that travel by name, read from ``reader``, as keyword arguments of the record."""
        return {a: _rpc_from_capnp(getattr(reader, name), annotation) for a, name, annotation in cls.capnp_fields()}

    def as_dict(self) -> dict[str, Any]:
        """The record as the Client returns it: every field, tuples as lists, records as their dicts."""
        return {f.name: _rpc_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _rpc_item_annotation(annotation: str) -> str | None:
    """Return X of a record field annotated ``tuple[X, ...]``; None for any other annotation.

    NOTE: annotations are strings here (``from __future__ import annotations``), as written."""
    if annotation.startswith("tuple[") and annotation.endswith(", ...]"):
        return annotation[len("tuple[") : -len(", ...]")]
    return None


def _rpc_to_capnp(builder: Any, name: str, annotation: str, value: Any) -> None:
    """Set the Cap'n Proto field ``name`` of ``builder`` to ``value`` (of a record field annotated ``annotation``)."""
    item = _rpc_item_annotation(annotation)
    if annotation in _RPC_SCALARS:
        setattr(builder, name, value)
    elif item in _RPC_SCALARS:  # a List(Text), say
        setattr(builder, name, list(value))
    elif item is not None:  # a list of structs
        for slot, v in zip(builder.init(name, len(value)), value, strict=True):
            _rpc_struct_to_capnp(slot, item, v)
    else:
        _rpc_struct_to_capnp(getattr(builder, name), annotation, value)


def _rpc_struct_to_capnp(builder: Any, annotation: str, value: Any) -> None:
    """Fill a struct builder from ``value``, a record or an array."""
    if annotation == "np.ndarray":
        array_to_capnp(builder, value)
    elif isinstance(value, RpcRecord):
        value.to_capnp(builder)
    else:  # NOTE: a programming error, found by the record's round-trip test
        raise TypeError(f"a record field annotated {annotation!r} cannot travel over RPC")


def _rpc_from_capnp(value: Any, annotation: str) -> Any:
    """Return the Python value of a Cap'n Proto field read for a record field annotated ``annotation``."""
    if annotation in _RPC_SCALARS:
        return _RPC_SCALARS[annotation](value)
    item = _rpc_item_annotation(annotation)
    if item is not None:
        return tuple(_rpc_from_capnp(v, item) for v in value)
    if annotation == "np.ndarray":
        return array_from_capnp(value)
    if annotation not in RpcRecord._by_name:  # NOTE: a programming error, found by the record's round-trip test
        raise TypeError(f"a record field annotated {annotation!r} cannot travel over RPC")
    return RpcRecord._by_name[annotation].from_capnp(value)


def _rpc_plain(value: Any) -> Any:
    """Return a record field's value as `as_dict` gives it (tuples as lists, records as dicts)."""
    if isinstance(value, tuple):
        return [_rpc_plain(v) for v in value]
    return value.as_dict() if isinstance(value, RpcRecord) else value


@dataclass(frozen=True)
class SuspicionRecord(RpcRecord):
    """Why a node does not fully trust a worker's results (the `Suspicion` struct; state "": it does)."""

    peer_id: str = field(metadata=capnp_name("peerId"))
    state: str = field(metadata=capnp_name("state"))
    reason: str = field(metadata=capnp_name("reason"))
    since: float = field(metadata=capnp_name("sinceUnix"))  # seconds since the epoch
    next_probe_s: float = field(metadata=capnp_name("nextProbeSeconds"))
    good_results: int = field(metadata=capnp_name("goodResults"))
    text: str = field(default="", metadata=capnp_name("text"))

    @classmethod
    def from_info(cls, peer_id: str, info: dict[str, Any]) -> SuspicionRecord:
        """Return the record of one entry of `Manager.suspicions()` (its keys are the field names)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"peer_id"}
        return cls(peer_id, **{k: v for k, v in info.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        """The ``suspicion`` of a peer as the Client returns it (no ``peer_id``)."""
        d = super().as_dict()
        del d["peer_id"]
        return d


@dataclass(frozen=True)
class PeerRecord(RpcRecord):
    """What `peers` and `connect` report about one connected peer (the `PeerInfo` struct)."""

    peer_id: str = field(metadata=capnp_name("peerId"))
    addresses: tuple[str, ...] = field(metadata=capnp_name("addresses"))
    version: str = field(metadata=capnp_name("version"))
    kernels: tuple[str, ...] = field(metadata=capnp_name("kernels"))
    rtt_ms: float = field(metadata=capnp_name("rttMs"))  # last measured; 0 when unknown
    tasks_done: int = field(metadata=capnp_name("tasksDone"))
    role: str = field(metadata=capnp_name("role"))
    trusted: bool = field(metadata=capnp_name("trusted"))
    last_seen_s: float = field(metadata=capnp_name("lastSeenSeconds"))
    data_plane: str = field(default="", metadata=capnp_name("dataPlane"))
    connected_s: float = field(default=0.0, metadata=capnp_name("connectedSeconds"))
    data_bytes_in: int = field(default=0, metadata=capnp_name("dataBytesIn"))
    data_bytes_out: int = field(default=0, metadata=capnp_name("dataBytesOut"))
    suspicion: SuspicionRecord | None = None  # None: trusted (on the wire: a `suspicion` of state "")

    @property
    def suspect(self) -> bool:
        """Whether its results wait for a canary ("suspect" or "probing")."""
        return bool(self.suspicion and self.suspicion.state in ("suspect", "probing"))

    def to_capnp(self, builder: Any) -> None:
        """Fill an RPC `PeerInfo` builder."""
        super().to_capnp(builder)
        if self.suspicion is not None:
            self.suspicion.to_capnp(builder.suspicion)

    @classmethod
    def from_capnp(cls, reader: Any) -> PeerRecord:
        """Return the record of an RPC `PeerInfo` reader."""
        suspicion = SuspicionRecord.from_capnp(reader.suspicion)
        return cls(**cls.capnp_values(reader), suspicion=suspicion if suspicion.state else None)

    def as_dict(self) -> dict[str, Any]:
        """The peer as `Client.peers()` and `Client.connect()` return it (``suspect`` before ``suspicion``)."""
        d = super().as_dict()
        suspicion = d.pop("suspicion")
        return d | {"suspect": self.suspect, "suspicion": suspicion}


@dataclass(frozen=True)
class StatusRecord(RpcRecord):
    """What `status` reports about the node itself (the `NodeStatus` struct)."""

    peer_id: str = field(metadata=capnp_name("peerId"))
    addresses: tuple[str, ...] = field(metadata=capnp_name("addresses"))
    version: str = field(metadata=capnp_name("version"))
    uptime_s: float = field(metadata=capnp_name("uptimeSeconds"))
    tasks_done: int = field(metadata=capnp_name("tasksDone"))
    tasks_failed: int = field(metadata=capnp_name("tasksFailed"))
    tasks_in_flight: int = field(metadata=capnp_name("tasksInFlight"))
    bytes_in: int = field(metadata=capnp_name("bytesIn"))
    bytes_out: int = field(metadata=capnp_name("bytesOut"))
    rpc_address: str = field(metadata=capnp_name("rpcAddress"))
    peer_count: int = field(metadata=capnp_name("peerCount"))
    tasks_served: int = field(metadata=capnp_name("tasksServed"))
    tasks_cancelled: int = field(metadata=capnp_name("tasksCancelled"))
    # remote workers not fully trusted, connected or not
    suspects: tuple[SuspicionRecord, ...] = field(default=(), metadata=capnp_name("suspects"))
    # what the node turned away to protect itself (counts since it started) and its memory budget
    rpc_calls_refused: int = field(default=0, metadata=capnp_name("rpcCallsRefused"))
    rpc_tasks_refused: int = field(default=0, metadata=capnp_name("rpcTasksRefused"))
    streams_refused: int = field(default=0, metadata=capnp_name("streamsRefused"))
    data_handshakes_evicted: int = field(default=0, metadata=capnp_name("dataHandshakesEvicted"))
    memory_budget_used_bytes: int = field(default=0, metadata=capnp_name("memoryBudgetUsedBytes"))
    memory_budget_bytes: int = field(default=0, metadata=capnp_name("memoryBudgetBytes"))
    stranger_connections_closed: int = field(default=0, metadata=capnp_name("strangerConnectionsClosed"))
    # the arrays this node holds for its clients (RemoteArray), charged to its memory budget
    held_bytes: int = field(default=0, metadata=capnp_name("heldBytes"))
    held_arrays: int = field(default=0, metadata=capnp_name("heldArrays"))
    # the durable task queue (queue_journal "": the node keeps none)
    queue_journal: str = field(default="", metadata=capnp_name("queueJournal"))
    queue_tasks: int = field(default=0, metadata=capnp_name("queueTasks"))
    queue_waiting: int = field(default=0, metadata=capnp_name("queueWaiting"))
    state_bytes: int = field(default=0, metadata=capnp_name("stateBytes"))
    state_max_bytes: int = field(default=0, metadata=capnp_name("stateMaxBytes"))
    state_retention_s: float = field(default=0.0, metadata=capnp_name("stateRetentionSeconds"))
    queue_recovered: int = field(default=0, metadata=capnp_name("queueRecovered"))
    queue_refused: int = field(default=0, metadata=capnp_name("queueRefused"))

    def as_dict(self) -> dict[str, Any]:
        """The status as `Client.status()` returns it (each suspect with its ``peer_id``)."""
        suspects = [{"peer_id": s.peer_id, **(s.as_dict() if s.state else {})} for s in self.suspects]
        return super().as_dict() | {"suspects": suspects}


@dataclass(frozen=True)
class AttemptInfoRecord(RpcRecord):
    """Where one attempt of a task ran and how it ended (the `AttemptInfo` struct)."""

    worker: str = field(metadata=capnp_name("worker"))  # "local" or a peer id
    outcome: str = field(metadata=capnp_name("outcome"))  # "ok" or "<kind>: <message>"


@dataclass(frozen=True)
class TimingsRecord(RpcRecord):
    """Where a task's time went, in seconds (the `Timings` struct)."""

    queue_s: float = field(default=0.0, metadata=capnp_name("queueSeconds"))
    transfer_s: float = field(default=0.0, metadata=capnp_name("transferSeconds"))
    compute_s: float = field(default=0.0, metadata=capnp_name("computeSeconds"))
    total_s: float = field(default=0.0, metadata=capnp_name("totalSeconds"))


@dataclass(frozen=True)
class TaskOutputRecord(RpcRecord):
    """The answer to `submit` (the `TaskOutput` struct): the outputs and where they came from, or
    the error (``error_kind`` "" on success)."""

    # NOTE: arrays have no ==
    outputs: tuple[np.ndarray, ...] = field(default=(), compare=False, metadata=capnp_name("outputs"))
    error_kind: str = field(default="", metadata=capnp_name("errorKind"))
    error_message: str = field(default="", metadata=capnp_name("errorMessage"))
    ran_on: str = field(default="", metadata=capnp_name("ranOn"))
    fallback_reason: str = field(default="", metadata=capnp_name("fallbackReason"))
    attempts: tuple[AttemptInfoRecord, ...] = field(default=(), metadata=capnp_name("attempts"))
    timings: TimingsRecord = field(default=TimingsRecord(), metadata=capnp_name("timings"))
    verified_by_node: bool = field(default=False, metadata=capnp_name("verified"))
    verification: str = field(default="", metadata=capnp_name("verification"))  # how (task_verification)
    task_id: str = field(default="", metadata=capnp_name("taskId"))  # its id in the node's queue
    # how the arrays crossed between a Client and its node (the Client's own: not on the wire)
    arrays_via: str = "RPC messages"

    @classmethod
    def from_outcome(cls, outcome: TaskOutcome, verified: bool = False) -> TaskOutputRecord:
        """Return the record of a delivered task (transfer: what neither queue nor compute took)."""
        transfer_s = (
            max(0.0, outcome.elapsed_s - outcome.compute_s - outcome.queue_s) if outcome.worker_id != LOCAL else 0.0
        )
        return cls(
            tuple(outcome.outputs),
            ran_on=outcome.worker_id,
            fallback_reason=outcome.fallback_reason,
            attempts=tuple(AttemptInfoRecord(a.worker_id, a.outcome or "ok") for a in outcome.attempts),
            timings=TimingsRecord(outcome.queue_s, transfer_s, outcome.compute_s, outcome.elapsed_s),
            verified_by_node=verified,
            verification=outcome.verification,
        )

    def to_capnp(self, builder: Any) -> None:
        """Fill an RPC `TaskOutput` builder (an error: only its kind and message; a result: all but those)."""
        error = {"error_kind", "error_message"}
        self._fill_capnp(builder, error if self.error_kind else {a for a, _, _ in self.capnp_fields()} - error)

    def as_dict(self) -> dict[str, Any]:
        """The task as `Client.last_task` describes it (everything but the outputs)."""
        d = super().as_dict()
        del d["outputs"]
        return d


@dataclass(frozen=True)
class KernelInfoRecord(RpcRecord):
    """One kernel a node runs for RPC clients (the `KernelInfo` struct): what `Client.kernels()` lists."""

    name: str = field(metadata=capnp_name("name"))
    operands: int = field(metadata=capnp_name("operands"))  # how many arrays it takes
    params: tuple[str, ...] = field(metadata=capnp_name("params"))  # names of its scalar parameters
    dtypes: tuple[str, ...] = field(metadata=capnp_name("dtypes"))  # its operands' dtypes; () when it takes none
    description: str = field(metadata=capnp_name("description"))
    max_ndim: int = field(default=MAX_NDIM, metadata=capnp_name("maxNdim"))
    max_elements: int = field(default=DEFAULT_MAX_ELEMENTS, metadata=capnp_name("maxElements"))
    verification: str = field(default="", metadata=capnp_name("verification"))  # "": results taken as sent
    outputs: int = field(default=1, metadata=capnp_name("outputs"))  # how many arrays it returns
    variadic: bool = field(default=False, metadata=capnp_name("variadic"))  # takes `operands` to MAX_OPERANDS

    @classmethod
    def from_kernel(
        cls, kernel: Kernel, limits: Limits, max_elements: int, rounds: int = FREIVALDS_ROUNDS
    ) -> KernelInfoRecord:
        """Return the record of a registry entry under the limits RPC operands are read with
        (``max_elements``: the fewer of those and the node's own limit on a result; ``rounds``:
        the node's --verify-rounds, 0 when it checks no remote result)."""
        dtypes = tuple(limits.dtypes) if kernel.arity else ()
        verification = kernel_verification(kernel, rounds)
        return cls(
            kernel.name,
            kernel.arity,
            kernel.params,
            dtypes,
            kernel.doc,
            limits.max_ndim,
            max_elements,
            verification,
            kernel.outputs,
            kernel.variadic,
        )


def kernel_verification(kernel: Kernel, rounds: int) -> str:
    """Pure: how a node checks a remote worker's result of ``kernel`` with --verify-rounds
    ``rounds``, in a few words; "" when it takes the result as sent, "unverified" for a kernel
    without a check."""
    if kernel.check is None:
        return UNVERIFIED
    if rounds <= 0:
        return ""
    how = {"freivalds": f"Freivalds, {rounds} rounds", RECOMPUTE: "recomputed"}
    return how.get(kernel.verification, f"{kernel.verification}, {rounds} rounds")


def client_size_refusal(
    kernel: str,
    arrays: Sequence[np.ndarray],
    params: Params,
    client_max_bytes: int,
    node_max_bytes: int,
    node_budget_bytes: int,
    *,
    in_message: bool = True,
    held: Sequence[int] = (),
) -> PangeaError | None:
    """Why a Client must not send these operands (None: it may), decided before a byte moves:
    RpcError when they go in the message (``in_message``; False: in shared memory, which the
    message limit does not bound) and exceed the RPC message limit (the fewer of the client's
    and the node's), TaskError(bad-input) when the task can never fit the node's memory budget
    (0: unknown). ``held[i]`` nonzero: operand i is an array the node holds already (its bytes
    neither travel nor count again)."""
    total = sum(int(a.nbytes) for a, h in zip(arrays, held or [0] * len(arrays), strict=True) if not h)
    limit = min(client_max_bytes, node_max_bytes)
    if in_message and total + min(64 << 10, limit // 16) > limit:  # room for the message around the bytes
        mine = limit == client_max_bytes and limit < node_max_bytes
        return RpcError(
            f"cannot submit {kernel}: operands of {format_bytes(total)} exceed the RPC message limit of "
            f"{format_bytes(limit)} ({'this client' if mine else 'the node'}); nothing was sent",
            hint="raise max_message_bytes here (the node's own limit, --rpc-max-mib, is larger), or split the work"
            if mine
            else "split the work, or start the node with a larger --memory-budget-mib (its RPC limit follows it) "
            "or --rpc-max-mib",
        )
    if node_budget_bytes:
        out_bytes = output_nbytes(kernel, arrays, params)
        # NOTE: operands on the bulk channel counted once (a remote node holds what it receives)
        need = rpc_task_bytes(total, out_bytes) if in_message else total + rpc_task_bytes(0, out_bytes)
        refusal = budget_refusal(MemoryBudget(node_budget_bytes), kernel, need, out_bytes)
        if refusal is not None:
            return TaskError(f"{refusal}; nothing was sent", kind=refusal.kind)
    return None


def _outside_output(reader: Any, room: int, where: str) -> tuple[Any, list[int]]:
    """The dtype and shape of a task's output that came outside the message (an RPC `Array` with
    ``shared`` set), at most ``room`` bytes; RpcError when the node declared another."""
    name, shape = str(reader.dtype), [int(d) for d in reader.shape]
    if name not in ALLOWED_DTYPES or math.prod(shape) * _wire_dtype(name).itemsize > room:
        raise RpcError(f"cannot read a result: a {name} of shape {tuple(shape)} {where}")
    return _wire_dtype(name), shape


def _record_with_outputs(reader: Any, outputs: tuple[Any, ...], arrays_via: str) -> TaskOutputRecord:
    """The record of a task's answer whose outputs came outside the message (or stayed on the node:
    `RemoteArray` handles)."""
    fields = [f for f in TaskOutputRecord.capnp_fields() if f[0] not in ("outputs", "kept")]
    values = {a: _rpc_from_capnp(getattr(reader, n), t) for a, n, t in fields}
    return TaskOutputRecord(outputs, **values, arrays_via=arrays_via)


def held_info(r: Any) -> dict[str, Any]:
    """`RemoteArray.info`'s results as `Client.where` returns them."""
    shape = tuple(int(d) for d in r.shape)
    fields = (str(r.holder), str(r.verification), str(r.dtype), shape, int(r.nbytes))
    return dict(zip(("holder", "verification", "dtype", "shape", "nbytes"), fields, strict=True))


def _detached_capability(cap: Any) -> Any:
    """The same capability, no longer keeping alive the response it came in.

    NOTE: pycapnp's capability keeps its message alive, and a response keeps its request, so a
    kept result's handle would hold the operands' capabilities the request passed (the node could
    not release them while it lives). Here it is held by a one-slot message of its own instead."""
    holder = load_schema().TaskSpec.new_message()
    holder.init("arrays", 1)[0] = cap
    return holder.arrays[0]


def _outcome_to_capnp(
    r: Any, outcome: TaskOutcome | None, error: TaskError | None, verify_rounds: int = 0, shared_output: int = 0
) -> None:
    """Fill an RPC `TaskOutput` builder (``shared_output``: 1 + the index of the batch's segment that
    holds the one output already; 0: the output travels in the message)."""
    if error is not None:
        r.errorKind = str(error.kind)
        r.errorMessage = str(error)
        return
    assert outcome is not None
    record = TaskOutputRecord.from_outcome(outcome, result_verified(outcome, verify_rounds))
    if not shared_output:
        record.to_capnp(r)
        return
    (output,) = record.outputs
    dataclasses.replace(record, outputs=()).to_capnp(r)
    (slot,) = r.init("outputs", 1)
    slot.dtype, shape, *_ = _array_parts([output])[0][0]
    slot.shape = list(shape)
    slot.shared.segment = shared_output


###############################################################################
# 17. Held arrays
#
# The arrays a node holds for its RPC clients, each behind a `RemoteArray`
# capability: here (charged to this node's memory budget) or on a worker that
# holds it for this node's session (charged to the worker's budget). A client
# puts one on a worker (`put(a, placement=peer)`), and a task kept there leaves
# its outputs there. `KeptArrays` is the table (any thread: the RPC thread keeps
# and releases), `Lineage` how an array was made, `ArrayKeeper` the trio side:
# it runs a task where its operands are held (`holder_for` weighs the bytes),
# brings a held array here when a task needs it here, and makes one whose holder
# left again from its lineage when its inputs still exist, or says which node
# left. The node cannot check a result it never sees: a task run on a worker's
# held operands, or kept there, is unverified unless the client asks for a
# recomputation here.
###############################################################################

LINEAGE_INLINE_MAX_BYTES = 64 << 10  # an operand sent with a task is kept for rebuilds up to this size
MAX_REBUILD_DEPTH = 32  # a rebuild goes back at most this many tasks (each input made again in turn)


@dataclass(frozen=True)
class Lineage:
    """How a held array was made, to make it again when its holder leaves: its task's kernel and
    params, which output it is, and each input: the key of a held array, a small array sent with
    the task (kept, read-only), or None (a larger one, not kept: no rebuild then)."""

    kernel: str
    params: Params
    inputs: tuple[int | np.ndarray | None, ...]
    output: int = 0

    @classmethod
    def of(cls, kernel: str, params: Params, operands: Sequence[Any], output: int = 0) -> Lineage:
        """The lineage of output ``output`` of a task on ``operands`` (arrays or `KeptArray`)."""
        inputs: list[int | np.ndarray | None] = []
        for operand in operands:
            if isinstance(operand, KeptArray):
                inputs.append(operand.key)
            elif int(operand.nbytes) <= LINEAGE_INLINE_MAX_BYTES:
                small = operand.copy(order="C")
                small.flags.writeable = False
                inputs.append(small)
            else:
                inputs.append(None)
        return cls(kernel, dict(params), tuple(inputs), output)

    @property
    def put(self) -> bool:
        """Whether this is a put of an array the client sent (a "copy" of it)."""
        return self.kernel == "copy" and not any(isinstance(i, int) for i in self.inputs)


@dataclass(eq=False)
class KeptArray:
    """An array a node holds for its clients: its dtype and shape, its bytes here (read-only) or
    None when the worker ``holder`` holds them (under ``held_id``, for ``session``: its end freed
    them), how it was checked, and how it was made: ``lineage`` in words (for messages),
    ``made`` as a task to run again."""

    key: int
    dtype: np.dtype
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    holder: str = LOCAL
    verification: str = ""
    lineage: str = ""
    made: Lineage | None = None
    held_id: int = 0
    session: Any = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def stand_in(self) -> np.ndarray:
        """An array of its dtype and shape holding no memory (a stride-0 view of one zero)."""
        import numpy as np

        return np.broadcast_to(np.zeros((), dtype=self.dtype), self.shape)


class KeptArrays:
    """The arrays a node holds for RPC clients (each behind a `RemoteArray` capability), those here
    charged to its memory budget while held (from any thread: the RPC thread keeps and releases,
    `status` reads the totals on the trio thread). ``on_release``: called with an entry held on a
    worker when it is released (`ArrayKeeper` tells the worker)."""

    def __init__(self, budget: MemoryBudget, limit: int = MAX_KEPT_ARRAYS) -> None:
        self.budget = budget
        self.limit = limit
        self._arrays: dict[int, KeptArray] = {}
        self._next = 1
        self._lock = threading.Lock()
        self.claims: dict[bytes, int] = {}  # a claim's nonce -> the key of the array that answered it
        self.on_release: Callable[[KeptArray], None] | None = None

    def _room(self, what: str) -> None:
        if len(self._arrays) >= self.limit:
            raise TaskError(
                f"cannot keep {what}: this node holds {self.limit} arrays for its clients "
                "(its limit); release some (drop their handles) or get() them",
                kind=ErrorKind.BUSY,
            )

    def _charge(self, nbytes: int, what: str) -> None:
        refusal = budget_refusal(self.budget, "", nbytes, nbytes, held=f"cannot keep {what} of {format_bytes(nbytes)}")
        if refusal is not None or not self.budget.try_acquire(nbytes):
            raise refusal or TaskError(f"cannot keep {what}: the node's memory budget is full", kind=ErrorKind.BUSY)

    @staticmethod
    def _own(array: np.ndarray) -> np.ndarray:
        if not array.flags.owndata or not array.flags.c_contiguous:
            # NOTE: a view may be of a client's segment (unmapped after the task) or of a pooled buffer
            array = array.copy(order="C")
        array.flags.writeable = False
        return array

    def keep(
        self, array: np.ndarray, *, verification: str = "", lineage: str = "", made: Lineage | None = None
    ) -> KeptArray:
        """Hold ``array`` here (made read-only: several tasks may read it) and charge its bytes;
        TaskError when the budget or the count would be exceeded (nothing is held then)."""
        array = self._own(array)
        with self._lock:
            self._room(lineage or "an array")
            self._charge(int(array.nbytes), lineage or "an array")
            kept = KeptArray(self._next, array.dtype, tuple(array.shape), array, LOCAL, verification, lineage, made)
            self._arrays[kept.key] = kept
            self._next += 1
        return kept

    def hold_remote(
        self,
        holder: str,
        session: Any,
        held_id: int,
        stand_in: np.ndarray,
        *,
        verification: str = "",
        lineage: str = "",
        made: Lineage | None = None,
    ) -> KeptArray:
        """Enter an array the worker ``holder`` holds under ``held_id`` (of ``stand_in``'s dtype and
        shape); TaskError when the count would be exceeded."""
        with self._lock:
            self._room(lineage or "an array")
            kept = KeptArray(
                self._next,
                stand_in.dtype,
                tuple(stand_in.shape),
                None,
                holder,
                verification,
                lineage,
                made,
                held_id,
                session,
            )
            self._arrays[kept.key] = kept
            self._next += 1
        return kept

    def settle(self, kept: KeptArray, array: np.ndarray, verification: str) -> None:
        """Hold here, from now on, the bytes of an array its holder held (rebuilt after it left):
        charged like a `keep`; nothing when the array was released meanwhile."""
        array = self._own(array)
        with self._lock:
            if self._arrays.get(kept.key) is not kept:
                return
            self._charge(int(array.nbytes), kept.lineage or "an array")
            kept.array, kept.holder, kept.session, kept.held_id = array, LOCAL, None, 0
            kept.verification = verification

    def release(self, key: int) -> None:
        """Let go of an array (its last capability was dropped): its bytes leave the budget, or its
        holder is told."""
        with self._lock:
            kept = self._arrays.pop(key, None)
            if kept is not None and kept.array is not None:
                self.budget.release(int(kept.array.nbytes))
        if kept is not None and kept.array is None and self.on_release is not None:
            self.on_release(kept)

    def find(self, key: int) -> KeptArray | None:
        """The array held under ``key`` (None: released)."""
        with self._lock:
            return self._arrays.get(key)

    @property
    def held_bytes(self) -> int:
        """Bytes held on this node (those on workers are charged there)."""
        with self._lock:
            return sum(int(k.array.nbytes) for k in self._arrays.values() if k.array is not None)

    @property
    def held_arrays(self) -> int:
        with self._lock:
            return len(self._arrays)

    @property
    def held_elsewhere(self) -> dict[str, int]:
        """Bytes held for this node's clients on each worker."""
        out: dict[str, int] = {}
        with self._lock:
            for k in self._arrays.values():
                if k.array is None:
                    out[k.holder] = out.get(k.holder, 0) + k.nbytes
        return out


class ArrayKeeper:
    """The trio side of held arrays: runs a task where its held operands are (``usual`` runs one the
    usual way: `NodeService`'s scheduler path), brings an array held on a worker here, and makes
    one whose holder left again from its lineage."""

    def __init__(
        self, kept: KeptArrays, node: Node, manager: Manager, usual: Callable[..., Awaitable[TaskOutcome]]
    ) -> None:
        import trio

        self.kept, self.node, self.manager, self.usual = kept, node, manager, usual
        self.rebuilt = 0  # arrays made again after their holder left
        self._rebuilding: dict[int, Any] = {}  # key -> the trio.Lock of its rebuild
        self._token: Any = None  # the trio token, from the first task (one runs before any array is held)

        def tell_holder(entry: KeptArray) -> None:  # NOTE: from any thread (pycapnp drops capabilities)
            if self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(manager.release, entry.holder, (entry.held_id,))

        kept.on_release = tell_holder

    def alive(self, entry: KeptArray) -> bool:
        """Whether the array's bytes exist: here, or on a worker whose session that held it is still open."""
        if entry.array is not None:
            return True
        session = self.node.sessions.get(entry.holder)
        return session is not None and session is entry.session and not session.closed.is_set()

    async def here(self, entry: KeptArray, timeout_s: float, depth: int = 0) -> np.ndarray:
        """The bytes of a held array on this node: its own, fetched from its holder (over the data
        plane), or made again when its holder left (TaskError naming that node when it cannot be)."""
        if entry.array is not None:
            return entry.array
        if self.alive(entry):
            try:
                return await self._fetch(entry.holder, entry.held_id, entry.stand_in(), timeout_s)
            except PeerError:
                pass  # NOTE: it left meanwhile: made again below
        return await self.rebuild(entry, timeout_s, depth)

    def _gone(self, entry: KeptArray, why: str) -> TaskError:
        what = entry.lineage or f"array {entry.key}"
        return TaskError(
            f"{what} was held on worker {short_id(entry.holder)}, which left; {why}", kind=ErrorKind.UNAVAILABLE
        )

    async def rebuild(self, entry: KeptArray, timeout_s: float, depth: int = 0) -> np.ndarray:
        """Make an array whose holder left again from its lineage, here (held here from now on)."""
        import trio

        lock = self._rebuilding.setdefault(entry.key, trio.Lock())
        try:
            async with lock:  # NOTE: two tasks needing it at once make it once
                if entry.array is not None:
                    return entry.array
                return await self._rebuild(entry, timeout_s, depth)
        finally:
            if not lock.statistics().tasks_waiting:
                self._rebuilding.pop(entry.key, None)

    async def _rebuild(self, entry: KeptArray, timeout_s: float, depth: int) -> np.ndarray:
        made = entry.made
        if made is None or made.put and made.inputs == (None,):
            raise self._gone(entry, "it was put there from the client and no node has a copy: put it again")
        if depth >= MAX_REBUILD_DEPTH:
            raise self._gone(entry, f"making it again would go back more than {MAX_REBUILD_DEPTH} tasks")
        inputs = []
        for i, source in enumerate(made.inputs):
            if source is None:
                why = f"operand {i} of its {made.kernel} was sent with the task and not kept: submit the task again"
                raise self._gone(entry, why)
            if isinstance(source, int):
                parent = self.kept.find(source)
                if parent is None:
                    why = f"operand {i} of its {made.kernel} was released since (its handle dropped): submit it again"
                    raise self._gone(entry, why)
                inputs.append(await self.here(parent, timeout_s, depth + 1))
            else:
                inputs.append(source)
        kernel = KERNELS.get(made.kernel)
        # NOTE: a kernel whose honest answers differ (eigenvectors' signs) is made again here, so the
        # outputs of one task made again agree with each other
        placement = "auto" if kernel is None or kernel.unique else "local"
        outcome = await self.manager.run(made.kernel, inputs, made.params, placement=placement, timeout_s=timeout_s)
        self.kept.settle(entry, outcome.outputs[made.output], outcome.verification)
        self.rebuilt += 1
        log.info("made %s (array %d) again from its lineage: %s left", entry.lineage, entry.key, short_id(entry.holder))
        return outcome.outputs[made.output] if entry.array is None else entry.array

    async def run(
        self,
        kernel: str,
        operands: Sequence[np.ndarray | KeptArray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        check: str,
        keep: bool,
    ) -> tuple[TaskOutcome, tuple[KeptArray, ...]]:
        """Run a task whose operands may be held arrays: on the worker holding most of their bytes
        (`holder_for`), else the usual way with them brought here; ``keep``: hold its outputs (on
        the worker that ran it when it held operands or was named, else here) and return them."""
        import trio

        self._token = self._token or trio.lowlevel.current_trio_token()
        held_on: dict[str, int] = {}
        for op in operands:
            if isinstance(op, KeptArray) and op.array is None and self.alive(op):
                held_on[op.holder] = held_on.get(op.holder, 0) + op.nbytes
        usable = [w for w in self.manager.usable_workers() if w != LOCAL]
        target = holder_for(placement, held_on, usable, keep=keep)
        if target:
            try:
                return await self._run_on(target, kernel, operands, params, timeout_s, check, keep)
            except PeerError as exc:
                if placement == target:
                    raise TaskError(
                        f"cannot run {kernel} on {short_id(target)}: {exc}", kind=ErrorKind.UNAVAILABLE
                    ) from None
                log.info("%s on %s: %s; running it the usual way", kernel, short_id(target), exc)
        arrays = [await self.here(op, timeout_s) if isinstance(op, KeptArray) else op for op in operands]
        outcome = await self.usual(kernel, arrays, params, placement, timeout_s, fallback, check)
        if not keep:
            return outcome, ()
        words = f"the result of {kernel}"
        kept = tuple(
            self.kept.keep(
                a, verification=outcome.verification, lineage=words, made=Lineage.of(kernel, params, operands, i)
            )
            for i, a in enumerate(outcome.outputs)
        )
        return outcome, kept

    async def _run_on(
        self,
        worker: str,
        kernel: str,
        operands: Sequence[np.ndarray | KeptArray],
        params: Params,
        timeout_s: float,
        check: str,
        keep: bool,
    ) -> tuple[TaskOutcome, tuple[KeptArray, ...]]:
        """Run a task on ``worker``, naming the operands it holds; PeerError when it left."""
        import trio

        sent, ids = [], []
        for op in operands:
            if isinstance(op, KeptArray) and op.array is None and op.holder == worker and self.alive(op):
                sent.append(op.stand_in())
                ids.append(op.held_id)
            else:
                sent.append(await self.here(op, timeout_s) if isinstance(op, KeptArray) else op)
                ids.append(0)
        entry = KERNELS.get(kernel)
        count = entry.outputs if entry is not None else 1
        first = self.manager.held_ids(count) if keep else 0
        session = self.node.sessions.get(worker)
        outcome = await self.manager.run_held(
            worker, kernel, sent, params, held=tuple(ids), keep=first, timeout_s=timeout_s
        )
        kept: list[KeptArray] = []
        try:
            if check == RECOMPUTE and entry is not None and entry.unique:
                arrays = [await self.here(op, timeout_s) if isinstance(op, KeptArray) else op for op in operands]
                outputs = outcome.outputs
                if keep:  # NOTE: the outputs cross once, for the check; they stay held there
                    outputs = tuple(
                        [await self._fetch(worker, first + i, o, timeout_s) for i, o in enumerate(outcome.outputs)]
                    )
                problem = await trio.to_thread.run_sync(check_by_recompute, kernel, arrays, params, outputs)
                if problem is not None:
                    self.manager.verification_failures += 1
                    raise TaskError(
                        f"result from {short_id(worker)} failed verification: {problem}", kind=ErrorKind.WRONG_RESULT
                    )
                outcome.verification = RECOMPUTE
                if not keep:
                    outcome.outputs = outputs
            if not keep:
                return outcome, ()
            put = kernel == "copy" and not any(isinstance(op, KeptArray) for op in operands)
            words = f"an array put on {short_id(worker)}" if put else f"the result of {kernel} on {short_id(worker)}"
            for i, stand_in in enumerate(outcome.outputs):
                made = Lineage.of(kernel, params, operands, i)
                kept.append(
                    self.kept.hold_remote(
                        worker,
                        session,
                        first + i,
                        stand_in,
                        verification=outcome.verification,
                        lineage=words,
                        made=made,
                    )
                )
            return outcome, tuple(kept)
        except BaseException:
            for done in kept:  # NOTE: their release tells the worker
                self.kept.release(done.key)
            if first:
                self.manager.release(worker, tuple(range(first + len(kept), first + count)))
            raise

    async def _fetch(self, worker: str, held_id: int, stand_in: np.ndarray, timeout_s: float) -> np.ndarray:
        """The bytes of an array ``worker`` holds for this node under ``held_id``."""
        outcome = await self.manager.run_held(
            worker, "copy", (stand_in,), {}, held=(held_id,), keep=0, timeout_s=timeout_s
        )
        return outcome.outputs[0]


def held_operand(reader: Any, index: int, kept: Sequence[KeptArray]) -> KeptArray:
    """The held array an RPC operand names (`Array.held`: 1 + its index among the task's arrays);
    TaskError(bad-input) when it names none, or declares another dtype or shape."""
    slot = int(reader.held) - 1
    if not 0 <= slot < len(kept):
        raise TaskError(
            f"operand {index} names held array {slot + 1}, but the task passed {len(kept)}", kind=ErrorKind.BAD_INPUT
        )
    a = kept[slot]
    declared = (str(reader.dtype), tuple(int(d) for d in reader.shape))
    if declared != (_dtype_name(a.dtype), a.shape):
        raise TaskError(
            f"operand {index} declares a {declared[0]} of shape {declared[1]}, but the array it names is a "
            f"{_dtype_name(a.dtype)} of shape {a.shape}",
            kind=ErrorKind.BAD_INPUT,
        )
    return a


###############################################################################
# 18. Task journal
#
# What a `serve` node's durable task queue keeps on disk: `TaskJournal`, every
# task the RPC accepted in an SQLite journal (WAL) in the home, its small arrays
# in the journal and its large ones in .npy files beside it, each written whole
# and renamed into place; the schema's version, and a journal that cannot be
# read moved aside (the node starts empty). The task's key, spec and answer as
# the journal writes them, and `TaskInfoRecord`, a task as the `tasks` call
# lists it.
###############################################################################


_UNFINISHED_STATES = ("queued", "running")
_WAITING_STATES = ("done", "failed")  # an answer on disk, waiting for its client


def check_task_key(key: str) -> str:
    """A client's key for a task (TaskSpec.key) as given; TaskError(bad-input) for one too long or not
    printable ASCII ("" is no key)."""
    if len(key) > QUEUE_KEY_MAX_CHARS or not all(" " < c <= "~" for c in key):
        raise TaskError(
            f"bad task key {one_line(key, 40)!r}: expected at most {QUEUE_KEY_MAX_CHARS} printable ASCII characters "
            "without spaces",
            kind=ErrorKind.BAD_INPUT,
        )
    return key


def params_to_json(params: Params) -> list[list[Any]]:
    """A task's parameters as JSON the journal keeps: [[name, kind, value], ...] (tuples as lists)."""
    return [
        [k, "tuple" if isinstance(v, tuple) else type(v).__name__, list(v) if isinstance(v, tuple) else v]
        for k, v in params.items()
    ]


def params_from_json(items: Sequence[Sequence[Any]]) -> dict[str, ParamValue]:
    """The parameters `params_to_json` wrote."""
    out: dict[str, ParamValue] = {}
    for name, kind, value in items:
        out[str(name)] = tuple(int(v) for v in value) if kind == "tuple" else str(value) if kind == "str" else value
    return out


def record_to_json(record: TaskOutputRecord) -> str:
    """A task's answer without its outputs, as the journal keeps it (its outputs go beside it)."""
    return json.dumps(record.as_dict())


def record_from_json(text: str, outputs: Sequence[np.ndarray]) -> TaskOutputRecord:
    """The answer `record_to_json` wrote, with its outputs."""
    d = json.loads(text)
    d["attempts"] = tuple(AttemptInfoRecord(**a) for a in d.get("attempts", ()))
    d["timings"] = TimingsRecord(**d.get("timings", {}))
    names = {f.name for f in dataclasses.fields(TaskOutputRecord)} - {"outputs"}
    return TaskOutputRecord(tuple(outputs), **{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TaskInfoRecord(RpcRecord):
    """One task of a node's queue as the `tasks` call lists it (the `TaskInfo` struct)."""

    task_id: str = field(metadata=capnp_name("taskId"))
    key: str = field(metadata=capnp_name("key"))
    kernel: str = field(metadata=capnp_name("kernel"))
    state: str = field(metadata=capnp_name("state"))
    accepted: float = field(metadata=capnp_name("acceptedUnix"))
    finished: float = field(default=0.0, metadata=capnp_name("finishedUnix"))
    error: str = field(default="", metadata=capnp_name("error"))
    result_bytes: int = field(default=0, metadata=capnp_name("resultBytes"))
    runs: int = field(default=1, metadata=capnp_name("runs"))


@dataclass
class JournalRow:
    """One task as the journal keeps it."""

    task_id: str
    key: str
    seq: int
    kernel: str
    spec: dict[str, Any]  # params, placement, timeout_s, fallback, check, held (operands that were held arrays)
    state: str
    accepted: float
    finished: float = 0.0
    outcome: str = ""  # record_to_json of its answer, once finished
    reserved: int = 0  # bytes of the quota it holds
    runs: int = 1


class TaskJournal:
    """The journal of a node's task queue: an SQLite database in WAL mode (``synchronous=NORMAL``:
    a commit survives the process being killed; a power cut may lose the last ones, never the
    database) and the .npy files of its large arrays beside it. Each array file is written under a
    temporary name and renamed once whole, and the journal names it only after that, so a kill in
    the middle leaves a stray temporary file (removed at the next open), never a half array.

    Used from the trio thread and from worker threads (the large arrays): one lock around the database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / QUEUE_JOURNAL_FILENAME
        self.files = directory / "arrays"
        self._db: Any = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path) -> tuple[TaskJournal, str]:
        """Open the journal in ``directory``, creating it when there is none; return it and a note of one
        line: "" or, when the journal there could not be read (damaged, truncated, not a database, of
        another schema version), how it was moved aside and an empty one started."""
        import sqlite3

        journal = cls(directory)
        try:
            journal._connect()
            return journal, ""
        except (sqlite3.DatabaseError, JournalUnreadable) as exc:
            journal.close()
            reason = str(exc) if isinstance(exc, JournalUnreadable) else f"cannot be read ({one_line(str(exc), 120)})"
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = directory.with_name(f"{directory.name}.unreadable-{stamp}")
            os.replace(directory, aside)
        journal = cls(directory)
        journal._connect()
        note = f"the task journal {journal.path} {reason}: moved aside to {aside}; this node starts with an empty queue"
        return journal, note

    def _connect(self) -> None:
        import sqlite3

        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files.mkdir(mode=0o700, exist_ok=True)
        for stray in self.files.glob("*.tmp"):  # NOTE: a file a kill interrupted: the journal never named it
            stray.unlink(missing_ok=True)
        if not self.path.exists():  # NOTE: private from the start (SQLite gives its WAL the same mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(
                """
                BEGIN;
                CREATE TABLE tasks (
                    id TEXT PRIMARY KEY, key TEXT UNIQUE, seq INTEGER NOT NULL, kernel TEXT NOT NULL,
                    spec TEXT NOT NULL, state TEXT NOT NULL, accepted REAL NOT NULL,
                    finished REAL NOT NULL DEFAULT 0, outcome TEXT NOT NULL DEFAULT '',
                    reserved INTEGER NOT NULL DEFAULT 0, runs INTEGER NOT NULL DEFAULT 1,
                    inline TEXT NOT NULL DEFAULT '', data BLOB, files INTEGER NOT NULL DEFAULT 0);
                CREATE TABLE arrays (
                    task TEXT NOT NULL, role TEXT NOT NULL, idx INTEGER NOT NULL, dtype TEXT NOT NULL,
                    shape TEXT NOT NULL, data BLOB, file TEXT NOT NULL DEFAULT '',
                    PRIMARY KEY (task, role, idx));
                """
                f"PRAGMA user_version = {QUEUE_SCHEMA_VERSION}; COMMIT;"
            )
            version = QUEUE_SCHEMA_VERSION
        if version != QUEUE_SCHEMA_VERSION:
            raise JournalUnreadable(
                f"is of schema version {version}, and this pangea reads version {QUEUE_SCHEMA_VERSION}"
            )
        check = str(db.execute("PRAGMA quick_check").fetchone()[0])
        if check != "ok":
            raise JournalUnreadable(f"is damaged ({one_line(check, 120)})")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"tasks", "arrays"} <= tables:
            raise JournalUnreadable("is a database without the tables of a task queue")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        named = {r[0] for r in db.execute("SELECT file FROM arrays WHERE file != ''")}
        for path in self.files.iterdir():  # NOTE: renamed into place, then a kill before its row: nobody's
            if path.name not in named:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the database (a clean close folds the WAL into it)."""
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None

    def _transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                for sql, args in statements:
                    db.execute(sql, args)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def rows(self, answered: bool | None = None, limit: int = -1) -> list[JournalRow]:
        """The tasks of the journal, oldest first: all, or (``answered``) those collected or cancelled,
        the newest ``limit`` of them, or (not ``answered``) the others."""
        where = {None: "", True: " WHERE state IN ('collected', 'cancelled')"}.get(
            answered, " WHERE state NOT IN ('collected', 'cancelled')"
        )
        with self._lock:
            found = self._db.execute(
                "SELECT id, key, seq, kernel, spec, state, accepted, finished, outcome, reserved, runs"
                f" FROM tasks{where} ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [JournalRow(r[0], r[1] or "", r[2], r[3], json.loads(r[4]), *r[5:]) for r in reversed(found)]

    def output_bytes(self) -> dict[str, int]:
        """The bytes of each waiting answer's outputs, by task id (from their dtypes and shapes)."""
        import numpy as np

        sizes: dict[str, int] = {}
        with self._lock:
            found = self._db.execute("SELECT task, dtype, shape FROM arrays WHERE role = 'out'").fetchall()
        for task_id, dtype, shape in found:
            sizes[task_id] = sizes.get(task_id, 0) + np.dtype(dtype).itemsize * math.prod(json.loads(shape))
        return sizes

    def forget_answered(self, before: float, keep: int) -> None:
        """Delete answered tasks (collected or cancelled: their arrays went already) that finished before
        ``before``, and all but the newest ``keep`` of them."""
        answered = "state IN ('collected', 'cancelled')"
        self._transaction(
            [
                (f"DELETE FROM tasks WHERE {answered} AND finished < ?", (before,)),
                (
                    f"DELETE FROM tasks WHERE {answered} AND seq NOT IN"
                    f" (SELECT seq FROM tasks WHERE {answered} ORDER BY seq DESC LIMIT ?)",
                    (keep,),
                ),
            ]
        )

    def find(self, name: str) -> JournalRow | None:
        """The task of this id or key, None when the journal has none."""
        with self._lock:
            r = self._db.execute(
                "SELECT id, key, seq, kernel, spec, state, accepted, finished, outcome, reserved, runs"
                " FROM tasks WHERE id = ? OR key = ?",
                (name, name),
            ).fetchone()
        return None if r is None else JournalRow(r[0], r[1] or "", r[2], r[3], json.loads(r[4]), *r[5:])

    def keys(self) -> set[str]:
        """The keys of every task the journal has."""
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT key FROM tasks WHERE key IS NOT NULL")}

    def next_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks").fetchone()[0])

    def add(self, row: JournalRow, arrays: Sequence[tuple[int, np.ndarray, str]]) -> None:
        """Journal a task it accepted, in one transaction with its operands: (index, array, "" to keep
        it in the journal or the name of the .npy file `write_file` wrote it to). Small operands go in
        the task's own row: a task of small operands is one INSERT. sqlite3.IntegrityError when its
        key is taken."""
        files = [(i, a, name) for i, a, name in arrays if name]
        insert = self._insert(row, arrays)
        if not files:
            with self._lock:
                self._db.execute(*insert)  # NOTE: one statement is one transaction
            return
        self._transaction([insert, *self._array_rows(row.task_id, "in", files)])

    def _insert(self, row: JournalRow, arrays: Sequence[tuple[int, np.ndarray, str]]) -> tuple[str, Sequence[Any]]:
        """The INSERT of a task's row, with its small operands (those of ``arrays`` without a file name)."""
        inline = [(i, a) for i, a, name in arrays if not name]
        meta, offset = [], 0
        for i, a in inline:
            meta.append([i, _dtype_name(a.dtype), [int(d) for d in a.shape], offset, int(a.nbytes)])
            offset += int(a.nbytes)
        data = b"".join(_c_bytes(a) for _, a in inline)
        return (
            "INSERT INTO tasks (id, key, seq, kernel, spec, state, accepted, reserved, runs, inline, data, files,"
            " finished, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.task_id,
                row.key or None,
                row.seq,
                row.kernel,
                json.dumps(row.spec),
                row.state,
                row.accepted,
                row.reserved,
                row.runs,
                json.dumps(meta) if meta else "",
                data,
                len(arrays) - len(inline),
                row.finished,
                row.outcome,
            ),
        )

    def apply(
        self,
        inserts: Sequence[tuple[JournalRow, Sequence[tuple[int, np.ndarray, str]]]],
        updates: Sequence[tuple[str, str, float]],
    ) -> None:
        """Add tasks of small operands (`add`'s rows) and mark tasks answered ((id, state, finished):
        `collect` of a task without files), all in one transaction."""
        import sqlite3

        statements = [self._insert(row, arrays) for row, arrays in inserts]
        statements += [self._collected(task_id, state, finished) for task_id, state, finished in updates]
        try:
            self._transaction(statements)
        except sqlite3.IntegrityError:  # NOTE: one bad row must not keep the others out: one at a time
            for statement in statements:
                try:
                    self._transaction([statement])
                except sqlite3.IntegrityError as exc:
                    log.warning("task queue: a journal row was refused: %s", describe_exception(exc))

    def _array_rows(
        self, task_id: str, role: str, arrays: Sequence[tuple[int, np.ndarray, str]]
    ) -> list[tuple[str, Sequence[Any]]]:
        return [
            (
                "INSERT INTO arrays (task, role, idx, dtype, shape, data, file) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    role,
                    i,
                    _dtype_name(a.dtype),
                    json.dumps([int(d) for d in a.shape]),
                    None if name else _c_bytes(a),
                    name,
                ),
            )
            for i, a, name in arrays
        ]

    def write_file(self, name: str, a: np.ndarray, stop: threading.Event | None = None) -> bool:
        """Write ``a`` to the .npy file ``name`` beside the journal, whole or not at all: under a
        temporary name, renamed once complete (in a worker thread: it writes in pieces, and gives up,
        returning False, once ``stop`` is set)."""
        import numpy as np

        path, tmp = self.files / name, self.files / f"{name}.tmp"
        a = np.ascontiguousarray(a)
        flat = memoryview(a.reshape(-1).view(np.uint8).data) if a.size else memoryview(b"")
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(a))
                for start in range(0, len(flat), QUEUE_SPILL_CHUNK_BYTES):
                    if stop is not None and stop.is_set():
                        raise InterruptedError
                    f.write(flat[start : start + QUEUE_SPILL_CHUNK_BYTES])
            os.replace(tmp, path)
            return True
        except InterruptedError:
            tmp.unlink(missing_ok=True)
            return False
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def arrays(self, task_id: str, role: str) -> list[np.ndarray]:
        """The arrays of one task ("in": its operands, "out": its outputs), in order; JournalUnreadable
        when one is missing or is not what the journal says (a file lost or damaged)."""
        import numpy as np

        with self._lock:
            found = self._db.execute(
                "SELECT idx, dtype, shape, data, file FROM arrays WHERE task = ? AND role = ? ORDER BY idx",
                (task_id, role),
            ).fetchall()
            own = self._db.execute("SELECT inline, data FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if role == "in" and own is not None and own[0]:  # the small operands, in the task's row
            blob = own[1] or b""
            for idx, dtype, shape, offset, nbytes in json.loads(own[0]):
                found.append((idx, dtype, json.dumps(shape), blob[offset : offset + nbytes], ""))
            found.sort(key=lambda r: int(r[0]))
        out = []
        for idx, dtype, shape_text, data, name in found:
            shape = tuple(int(d) for d in json.loads(shape_text))
            if dtype not in ALLOWED_DTYPES:
                raise JournalUnreadable(f"names array {idx} of task {task_id} as a {one_line(dtype, 20)}")
            try:
                if name:
                    a = np.load(self.files / name, allow_pickle=False)
                else:
                    a = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            except (OSError, ValueError) as exc:
                raise JournalUnreadable(f"lost array {idx} of task {task_id} ({describe_exception(exc)})") from None
            if _dtype_name(a.dtype) != dtype or a.shape != shape:
                raise JournalUnreadable(f"has array {idx} of task {task_id} damaged: not a {dtype} of shape {shape}")
            out.append(a)
        return out

    def started(self, task_id: str) -> None:
        """Count one more start of a task read back after a restart."""
        self._transaction([("UPDATE tasks SET runs = runs + 1, state = 'running' WHERE id = ?", (task_id,))])

    def finish(
        self, task_id: str, state: str, finished: float, outcome: str, outputs: Sequence[tuple[int, np.ndarray, str]]
    ) -> None:
        """Record a task's answer ("done" with its outputs, "failed" with its error) for a client that will
        ask for it; its operands go (their files once the transaction is in)."""
        names = self._file_names(task_id, "in")
        statements: list[tuple[str, Sequence[Any]]] = [
            ("DELETE FROM arrays WHERE task = ? AND role = 'in'", (task_id,)),
            (
                "UPDATE tasks SET state = ?, finished = ?, outcome = ?, inline = '', data = NULL, files = ?"
                " WHERE id = ?",
                (state, finished, outcome, len(outputs), task_id),
            ),
        ]
        self._transaction(statements + self._array_rows(task_id, "out", outputs))
        self._unlink(names)

    def collect(self, task_id: str, state: str, finished: float, outcome: str = "", files: bool = True) -> None:
        """Record that a task was answered ("collected") or given up by its client ("cancelled"): its
        arrays go, its row stays (without what it reserved) until the retention time. ``files``: it may
        have arrays beside its row (False: one UPDATE)."""
        update = self._collected(task_id, state, finished, outcome)
        if not files:
            with self._lock:
                self._db.execute(*update)
            return
        names = self._file_names(task_id, "")
        self._transaction([("DELETE FROM arrays WHERE task = ?", (task_id,)), update])
        self._unlink(names)

    def _collected(self, task_id: str, state: str, finished: float, outcome: str = "") -> tuple[str, Sequence[Any]]:
        return (
            "UPDATE tasks SET state = ?, finished = ?, reserved = 0, inline = '', data = NULL, files = 0,"
            " outcome = CASE WHEN ? = '' THEN outcome ELSE ? END WHERE id = ?",
            (state, finished or time.time(), outcome, outcome, task_id),
        )

    def forget(self, task_ids: Sequence[str]) -> None:
        """Delete tasks and their arrays (past the retention time)."""
        names = [n for t in task_ids for n in self._file_names(t, "")]
        self._transaction(
            [
                s
                for t in task_ids
                for s in (("DELETE FROM arrays WHERE task = ?", (t,)), ("DELETE FROM tasks WHERE id = ?", (t,)))
            ]
        )
        self._unlink(names)

    def _file_names(self, task_id: str, role: str) -> list[str]:
        with self._lock:
            found = self._db.execute(
                "SELECT file FROM arrays WHERE task = ? AND file != '' AND (? = '' OR role = ?)", (task_id, role, role)
            ).fetchall()
        return [r[0] for r in found]

    def _unlink(self, names: Sequence[str]) -> None:
        for name in names:
            (self.files / name).unlink(missing_ok=True)


def _c_bytes(a: np.ndarray) -> bytes:
    """The C-order, little-endian bytes of an array (the journal's and the wire's order)."""
    import numpy as np

    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


###############################################################################
# 19. Task queue
#
# `TaskQueue` runs each task apart from the call that brought it: a client that
# goes away leaves its task running and its result waiting on disk until it
# asks again (by the task's id or its own key). At start the queue reads the
# journal back: unfinished tasks run again, results wait for their clients,
# nothing that finished runs twice. A disk quota and a retention time bound it.
###############################################################################


class BudgetCharge:
    """Bytes of the node's memory budget that one RPC task holds: taken by its call on arrival, handed
    to the queue's runner when the task outlives the call, given back once (from any thread)."""

    def __init__(self, budget: MemoryBudget, nbytes: int = 0) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self._lock = threading.Lock()

    def take(self) -> BudgetCharge:
        """Move the bytes into a new charge (the runner's); this one holds none after."""
        with self._lock:
            moved, self.nbytes = self.nbytes, 0
        return BudgetCharge(self.budget, moved)

    def release(self) -> None:
        with self._lock:
            n, self.nbytes = self.nbytes, 0
        if n:
            self.budget.release(n)


@dataclass(eq=False)
class QueuedTask:
    """One task of the queue as the node holds it in memory (the journal has the rest)."""

    task_id: str
    key: str
    kernel: str
    spec: dict[str, Any]
    seq: int
    accepted: float
    operands: list[Any] | None  # None: in the journal (a task read back after a restart)
    state: str = "queued"
    runs: int = 1
    reserved: int = 0  # bytes of the quota it holds
    finished: float = 0.0
    outcome: TaskOutcome | None = None  # its result while in memory (to answer its call)
    error: TaskError | None = None  # or its error
    record_json: str = ""  # its answer as the journal keeps it, once written
    result_bytes: int = 0  # bytes of its answer in the journal
    has_files: bool = False  # its operands are large: .npy files beside the journal
    journaled: bool = False  # its row is in the journal
    written: bool = False  # its answer is in the journal
    owner: int = 0  # the call that waits for it (its token); 0: none
    charge: BudgetCharge | None = None
    held: tuple[int, ...] = ()  # operands that were held arrays (not journaled: they do not survive a restart)
    events: dict[str, Any] = field(default_factory=dict)  # "done", "journaled" (trio.Events)
    stop_writing: threading.Event = field(default_factory=threading.Event)
    scope: Any = None  # the runner's cancel scope
    settle: list[Callable[[], None]] = field(default_factory=list)  # when its operands are no longer used
    settled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def when_settled(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the task no longer reads its operands (now, if it already does not; any thread)."""
        with self.lock:
            if not self.settled:
                self.settle.append(fn)
                return
        fn()

    def info(self, result_bytes: int = 0) -> TaskInfoRecord:
        error = f"{self.error.kind}: {self.error}" if self.error is not None else ""
        return TaskInfoRecord(
            self.task_id,
            self.key,
            self.kernel,
            self.state,
            self.accepted,
            self.finished,
            error,
            result_bytes,
            self.runs,
        )


class TaskQueue:
    """The durable queue of a `serve` node: every task the RPC accepts (unless it keeps its outputs on the
    node) is journaled and run by a runner of the queue's own, apart from its call (at most
    QUEUE_MAX_RUNNING at once). Its call waits for the answer; should the call's client go away, the
    task runs on and its answer waits in the journal, for `result` by the task's id or its key.

    ``execute(kernel, operands, params, placement, timeout_s, fallback, check)`` runs a task (the
    service's), ``admit(kernel, operands, params)`` charges a task read back from the journal to the
    memory budget, ``verified(outcome)`` says whether the node checked a result. Without a journal
    (``journal`` None) it runs tasks the same way and keeps nothing across a restart."""

    def __init__(
        self,
        journal: TaskJournal | None,
        *,
        execute: Callable[..., Any],
        admit: Callable[..., int],
        budget: MemoryBudget,
        verified: Callable[[TaskOutcome], bool],
        max_bytes: int,
        retention_s: float,
    ) -> None:
        import trio

        self.journal = journal
        self.execute = execute
        self.admit = admit
        self.budget = budget
        self.verified = verified
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.tasks: dict[str, QueuedTask] = {}  # not answered yet, by id
        self.by_key: dict[str, QueuedTask] = {}
        self.reserved = 0  # bytes of the quota the tasks of `tasks` hold
        self.recovered = 0
        self.refused = 0  # tasks turned away: over the quota or QUEUE_MAX_TASKS (for the metrics)
        self.note = ""  # what happened to an unreadable journal ("" when nothing did)
        self._seq = journal.next_seq() if journal is not None else 1
        self._tokens = iter(range(1, 1 << 62))
        self._limiter = trio.CapacityLimiter(QUEUE_MAX_RUNNING)
        self._nursery: Any = None
        self._trio = trio
        self._adds: dict[str, tuple[QueuedTask, JournalRow, list[tuple[int, np.ndarray, str]]]] = {}
        self._marks: dict[str, tuple[float, QueuedTask, str]] = {}  # answered: (due, task, state)
        self._answered: dict[str, QueuedTask] = {}  # those, by id and key, until their mark is written
        self._large: dict[str, tuple[float, QueuedTask]] = {}  # large operands to write once due: (due, task)
        self._keys: set[str] = journal.keys() if journal is not None else set()  # every key the journal has
        self.stopping = False  # the node stops: what its tasks raise now is not their answer

    # -- the runner ------------------------------------------------------------------------

    async def run(self, task_status: Any = None) -> None:
        """Read the journal back (unfinished tasks run again, answers wait), then run tasks and drop
        answers past the retention time until cancelled (a nursery's task: `nursery.start`)."""
        trio = self._trio
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.journal is not None:
                self._recover(time.time())
            if task_status is not None:
                task_status.started()
            swept = time.monotonic()
            try:
                while True:
                    await trio.sleep(QUEUE_FLUSH_S)
                    now = time.monotonic()
                    self._flush(now)
                    self._start_due_writers(now)
                    if now - swept >= QUEUE_SWEEP_S:
                        self.sweep(time.time())
                        swept = now
            finally:
                self._flush(time.monotonic(), everything=True)
                self._nursery = None
                nursery.cancel_scope.cancel()

    def _recover(self, now: float) -> None:
        assert self.journal is not None
        rows = self.journal.rows(answered=False)
        sizes = self.journal.output_bytes()
        for row in rows:
            entry = QueuedTask(
                row.task_id,
                row.key,
                row.kernel,
                row.spec,
                row.seq,
                row.accepted,
                None,
                state=row.state,
                runs=row.runs,
                reserved=row.reserved,
                finished=row.finished,
                record_json=row.outcome,
                journaled=True,
                written=row.state in _WAITING_STATES,
                held=tuple(row.spec.get("held", ())),
                result_bytes=sizes.get(row.task_id, 0),
            )
            self._add(entry)
            if row.state in _UNFINISHED_STATES:
                entry.state = "queued"
                self._nursery.start_soon(self._run_one, entry)
            else:
                entry.settled = True
                entry.events["done"].set()
                entry.events["written"] = written = self._trio.Event()
                written.set()
        self.recovered = len(rows)
        self.sweep(now)
        if self.recovered:
            waiting = sum(1 for e in self.tasks.values() if e.written)
            log.warning(
                "task queue: %d task(s) read back from %s: %d to run again, %d answer(s) waiting for their client",
                self.recovered,
                self.journal.path,
                self.recovered - waiting,
                waiting,
            )

    def _add(self, entry: QueuedTask) -> None:
        entry.events = {"done": self._trio.Event()}
        self.tasks[entry.task_id] = entry
        if entry.key:
            self.by_key[entry.key] = entry
        self.reserved += entry.reserved

    def _drop(self, entry: QueuedTask) -> None:
        if self.tasks.pop(entry.task_id, None) is entry:
            self.reserved -= entry.reserved
        if entry.key and self.by_key.get(entry.key) is entry:
            del self.by_key[entry.key]
        entry.reserved = 0

    # -- accepting, waiting, answering --------------------------------------------------------

    def accept(
        self,
        key: str,
        kernel: str,
        operands: Sequence[Any],
        params: Params,
        spec: dict[str, Any],
        out_bytes: int,
        charge: BudgetCharge | None,
        detach: bool = False,
    ) -> tuple[QueuedTask, int]:
        """Take a task from a call: journal it and start it; return it and the call's token (pass it to
        `wait`, then `answered` or `let_go`). A key the queue knows attaches the call to its task
        instead. ``detach``: no call waits (token 0), and its operands are journaled at once (wait for
        ``entry.events["journaled"]``). TaskError when the queue is full (its quota, or QUEUE_MAX_TASKS)
        or the key was used."""
        import numpy as np

        if key:
            known = self.by_key.get(key)
            if known is not None:
                return known, 0 if detach else self.attach(known)
            self._refuse_used_key(key)
        in_bytes = sum(int(a.nbytes) for a in operands if isinstance(a, np.ndarray))
        need = in_bytes + out_bytes
        if len(self.tasks) >= QUEUE_MAX_TASKS:
            self.refused += 1
            raise TaskError(
                f"cannot accept {kernel}: the node's queue holds {len(self.tasks)} tasks not yet answered (its limit); "
                "collect their results (Client.result, Client.tasks) or wait for them to finish",
                kind=ErrorKind.BUSY,
            )
        if self.journal is not None and self.reserved + need > self.max_bytes:
            self.refused += 1
            raise TaskError(
                f"cannot accept {kernel}: the node's task queue is over its disk quota "
                f"({format_bytes(self.reserved)} of {format_bytes(self.max_bytes)} held by {len(self.tasks)} tasks, "
                f"this one needs {format_bytes(need)}); "
                "collect waiting results (Client.tasks, Client.result), wait for queued tasks to finish, or start "
                "the node with a larger --state-max-gib",
                kind=ErrorKind.BUSY,
            )
        import secrets

        task_id = "t" + secrets.token_hex(8)
        held = tuple(i for i, a in enumerate(operands) if not isinstance(a, np.ndarray))
        spec = dict(spec, held=list(held), operands=len(operands))
        entry = QueuedTask(
            task_id,
            key,
            kernel,
            spec,
            self._seq,
            time.time(),
            list(operands),
            reserved=need if self.journal is not None else 0,
            charge=charge.take() if charge is not None else None,
            held=held,
        )
        self._seq += 1
        self._add(entry)
        if self.journal is not None:
            self._journal(entry, 0.0 if detach else QUEUE_JOURNAL_LARGE_AFTER_S)
        else:
            entry.events["journaled"] = entry.events["spilled"] = None
        token = 0 if detach else self.attach(entry)
        assert self._nursery is not None, "the queue runs (TaskQueue.run) before it accepts tasks"
        self._nursery.start_soon(self._run_one, entry)
        return entry, token

    def _refuse_used_key(self, key: str) -> None:
        if key not in self._keys:  # NOTE: no read of the journal for a new key (every task has one)
            self._keys.add(key)
            return
        answered = self._answered.get(key)
        row = self.journal.find(key) if self.journal is not None and answered is None else None
        if answered is not None:
            row = JournalRow(answered.task_id, key, answered.seq, answered.kernel, {}, answered.state, 0.0)
        if row is not None:
            raise TaskError(
                f"the key {key!r} names task {row.task_id}, already answered ({row.state}); "
                "use a new key for a new task",
                kind=ErrorKind.BAD_INPUT,
            )

    @staticmethod
    def _queued_row(entry: QueuedTask) -> JournalRow:
        """A task's row as the journal first has it: queued."""
        return JournalRow(
            entry.task_id,
            entry.key,
            entry.seq,
            entry.kernel,
            entry.spec,
            "queued",
            entry.accepted,
            reserved=entry.reserved,
        )

    def _start_due_writers(self, now: float) -> None:
        """Start the writers of the tasks with large operands that have run QUEUE_JOURNAL_LARGE_AFTER_S."""
        import numpy as np

        for task_id, (due, entry) in list(self._large.items()):
            if entry.stop_writing.is_set() or entry.operands is None:  # ended first: nothing to write
                del self._large[task_id]
            elif due <= now:
                del self._large[task_id]
                row = self._queued_row(entry)
                arrays = [(i, a) for i, a in enumerate(entry.operands) if isinstance(a, np.ndarray)]
                entry.events["journaled"] = journaled = self._trio.Event()
                self._start_writer(entry, row, arrays, journaled)

    def _journal(self, entry: QueuedTask, after_s: float) -> None:
        """Journal a task it accepted: with its small operands at once, with large ones once their files
        are written (a worker thread, while the task already runs)."""
        import numpy as np

        assert self.journal is not None and entry.operands is not None
        arrays = [(i, a) for i, a in enumerate(entry.operands) if isinstance(a, np.ndarray)]
        row = self._queued_row(entry)
        journaled = entry.events["journaled"] = self._trio.Event()
        if all(a.nbytes <= QUEUE_INLINE_MAX_BYTES for _, a in arrays):
            # NOTE: copied now (its operands may be a client's segment, gone once it is answered); in the
            # journal with the next flush, in one transaction with the others of the moment
            copies = [(i, np.array(a, order="C"), "") for i, a in arrays]
            self._adds[entry.task_id] = (entry, row, copies)
            entry.events["spilled"] = None
            return
        if after_s:  # NOTE: most tasks end sooner: the flush loop starts the writer of those that do not
            entry.events["journaled"] = entry.events["spilled"] = None
            self._large[entry.task_id] = (time.monotonic() + after_s, entry)
            return
        self._start_writer(entry, row, arrays, journaled)

    def _start_writer(
        self, entry: QueuedTask, row: JournalRow, arrays: list[tuple[int, np.ndarray]], journaled: Any
    ) -> None:
        """Write a task's large operands to files and then its row, in a worker thread (while it runs)."""
        assert self.journal is not None
        spilled = entry.events["spilled"] = self._trio.Event()
        journal = self.journal

        def write() -> None:
            named: list[tuple[int, np.ndarray, str]] = []
            for i, a in arrays:
                name = f"{entry.task_id}-in{i}.npy" if a.nbytes > QUEUE_INLINE_MAX_BYTES else ""
                if name and not journal.write_file(name, a, entry.stop_writing):
                    journal._unlink([n for _, _, n in named if n])
                    return
                named.append((i, a, name))
            with entry.lock:  # NOTE: the task may have ended meanwhile: then it needs no row
                if entry.stop_writing.is_set():
                    journal._unlink([n for _, _, n in named if n])
                    return
                journal.add(row, named)
                entry.journaled = entry.has_files = True

        async def in_thread() -> None:
            try:
                await self._trio.to_thread.run_sync(write)
            except Exception as exc:
                log.warning("task queue: cannot journal task %s: %s", entry.task_id, describe_exception(exc))
            finally:
                spilled.set()
                journaled.set()

        self._nursery.start_soon(in_thread)

    def attach(self, entry: QueuedTask) -> int:
        """Make a call the one that waits for a task (a later call takes over from an earlier one)."""
        entry.owner = next(self._tokens)
        return entry.owner

    def find(self, name: str) -> QueuedTask:
        """The task of this id or key that is not answered yet; TaskError(not-found) otherwise."""
        entry = self.tasks.get(name) or self.by_key.get(name)
        if entry is not None:
            return entry
        answered = self._answered.get(name)
        if answered is not None:
            raise TaskError(
                f"task {answered.task_id} ({answered.kernel}) was {answered.state} just now; its answer is not kept",
                kind=ErrorKind.NOT_FOUND,
            )
        row = self.journal.find(name) if self.journal is not None else None
        if row is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.finished)) if row.finished else "earlier"
            raise TaskError(
                f"task {row.task_id} ({row.kernel}) was {row.state} at {when}; its answer is not kept",
                kind=ErrorKind.NOT_FOUND,
            )
        raise TaskError(
            f"this node has no task {one_line(name, 60)!r} (never accepted, or answered and past its retention time); "
            "submit it again",
            kind=ErrorKind.NOT_FOUND,
        )

    async def wait(self, entry: QueuedTask, token: int, timeout_s: float) -> TaskOutputRecord | TaskOutcome:
        """Wait for a task's answer as the call of ``token``: its outcome (from memory) or its record (from
        the journal); its TaskError when it failed. TaskError(deadline) after ``timeout_s``."""
        trio = self._trio
        with trio.move_on_after(timeout_s) as waited:
            await entry.events["done"].wait()
        if waited.cancelled_caught:
            raise TaskError(
                f"task {entry.task_id} ({entry.kernel}) is still {entry.state} after {format_seconds(timeout_s)}; "
                "ask again later (Client.result)",
                kind=ErrorKind.DEADLINE,
            )
        if entry.owner != token:
            raise TaskError(
                f"task {entry.task_id} is answered to a newer call for it (the same key or id, asked again)",
                kind=ErrorKind.BUSY,
            )
        if entry.outcome is not None:
            return entry.outcome
        if entry.error is not None:
            raise entry.error
        assert self.journal is not None and entry.written
        await entry.events["written"].wait()
        outputs = await trio.to_thread.run_sync(self.journal.arrays, entry.task_id, "out")
        record = record_from_json(entry.record_json, outputs)
        if record.error_kind:
            raise task_error(record.error_message, record.error_kind)
        return record

    def answered(self, entry: QueuedTask, token: int) -> None:
        """The call of ``token`` handed the task's answer to its client: the task is collected."""
        if not token or entry.owner != token or entry.state == "collected":
            return
        entry.owner = 0
        nbytes = sum(int(a.nbytes) for a in entry.outcome.outputs) if entry.outcome is not None else entry.result_bytes
        self._collect(entry, "collected", QUEUE_COLLECT_AFTER_S + nbytes / QUEUE_COLLECT_RATE_BYTES_S)

    def let_go(self, entry: QueuedTask, token: int, gone: bool) -> None:
        """The call of ``token`` ended without an answer: ``gone`` (its connection closed) leaves the task
        running and its answer to be written for its client; otherwise its client cancelled it."""
        if not token or entry.owner != token:
            return
        entry.owner = 0
        if not gone:
            self.cancel(entry.task_id)
            return
        if entry.events["done"].is_set() and not entry.written and self._nursery is not None:
            self._nursery.start_soon(self._write_answer, entry)

    def cancel(self, name: str) -> None:
        """Its client gives up on a task (by id or key): it stops, its answer is not kept (the `cancel` call)."""
        entry = self.tasks.get(name) or self.by_key.get(name)
        if entry is None:
            return
        entry.owner = 0
        entry.events["cancelled"] = True
        if entry.scope is not None:
            entry.scope.cancel()
        if entry.state not in _UNFINISHED_STATES:
            self._collect(entry, "cancelled")

    def _collect(self, entry: QueuedTask, state: str, after_s: float = 0.0) -> None:
        """A task is answered (or cancelled): out of memory now, and so in the journal ``after_s`` later
        (QUEUE_COLLECT_AFTER_S for an answer: its bytes may still be on their way to the client, and a
        node killed before they arrive must run the task again rather than call it delivered)."""
        entry.state = state
        entry.outcome = None
        self._drop(entry)
        self._settle(entry)
        if entry.charge is not None:
            entry.charge.release()
        if self.journal is not None:
            self._marks[entry.task_id] = (time.monotonic() + after_s, entry, state)
            self._answered[entry.task_id] = entry
            if entry.key:
                self._answered[entry.key] = entry

    def _flush(self, now: float, everything: bool = False) -> None:
        """Write what the journal waits for, in one transaction: tasks accepted since the last flush, and
        tasks answered (their collected marks due at ``now``, time.monotonic(); all of them when the node
        stops)."""
        if self.journal is None or not (self._adds or self._marks):
            return
        adds, self._adds = list(self._adds.values()), {}
        due = {t: m for t, m in self._marks.items() if everything or m[0] <= now}
        for task_id, (_due, entry, _state) in due.items():
            del self._marks[task_id]
            self._answered.pop(task_id, None)
            if entry.key and self._answered.get(entry.key) is entry:
                del self._answered[entry.key]
        inserts: list[tuple[JournalRow, list[tuple[int, np.ndarray, str]]]] = []
        updates, with_files = [], []
        for entry, row, arrays in adds:
            mark = due.pop(entry.task_id, None)
            if mark is not None:  # NOTE: answered already: its row is born collected, without its operands
                inserts.append((dataclasses.replace(row, state=mark[2], finished=entry.finished, reserved=0), []))
            else:
                inserts.append((row, arrays))
        for _due, entry, state in due.values():
            if entry.journaled and (entry.written or entry.has_files):
                with_files.append((entry, state))
            elif entry.journaled:
                updates.append((entry.task_id, state, entry.finished or time.time()))
            else:  # NOTE: its large operands never reached the journal (it ended first): a row to list it
                row = JournalRow(
                    entry.task_id,
                    entry.key,
                    entry.seq,
                    entry.kernel,
                    entry.spec,
                    state,
                    entry.accepted,
                    entry.finished or time.time(),
                )
                inserts.append((row, []))
        try:
            self.journal.apply(inserts, updates)
            for entry, state in with_files:
                self.journal.collect(entry.task_id, state, entry.finished)
        except Exception as exc:  # NOTE: a full disk, say: the journal is behind, not wrong
            log.warning("task queue: cannot write the journal: %s", describe_exception(exc))
            return
        for entry, _row, _arrays in adds:
            entry.journaled = True
            journaled = entry.events.get("journaled")
            if journaled is not None:
                journaled.set()

    def _settle(self, entry: QueuedTask) -> None:
        with entry.lock:
            entry.settled, callbacks, entry.settle = True, entry.settle, []
        for fn in callbacks:
            fn()

    async def _run_one(self, entry: QueuedTask) -> None:
        """Run one task when a runner is free, then hand its answer to its call or write it for its client."""
        trio = self._trio
        async with self._limiter:
            if "cancelled" in entry.events:  # NOTE: before it ran: nothing of it is to be written
                entry.stop_writing.set()
                entry.operands = None
                return
            entry.state = "running"
            outcome, error = None, None
            try:
                operands = await self._operands(entry)
                with trio.CancelScope() as entry.scope:
                    outcome = await self.execute(
                        entry.kernel,
                        operands,
                        params_from_json(entry.spec["params"]),
                        entry.spec["placement"],
                        float(entry.spec["timeout_s"]),
                        bool(entry.spec["fallback"]),
                        entry.spec.get("check", ""),
                    )
                del operands
            except TaskError as exc:
                error = exc
            except Exception as exc:
                log.warning("task queue: task %s failed: %s", entry.task_id, describe_exception(exc))
                error = TaskError(
                    f"{entry.kernel} failed on the node: {describe_exception(exc)}", kind=ErrorKind.INTERNAL
                )
            finally:
                entry.stop_writing.set()
                entry.operands = None
        spilled = entry.events.get("spilled")
        if spilled is not None:  # NOTE: until then a thread may read its operands (their segments stay)
            await spilled.wait()
        if self.stopping:  # NOTE: the node stops: the journal keeps the task as unfinished, to run again
            return
        if (entry.scope is not None and entry.scope.cancelled_caught) or "cancelled" in entry.events:
            entry.error = TaskError("cancelled by its client", kind=ErrorKind.FAILED)
            self._collect(entry, "cancelled")
            return
        entry.outcome, entry.error, entry.finished = outcome, error, time.time()
        entry.state = "done" if error is None else "failed"
        self._settle(entry)
        entry.events["done"].set()
        if not entry.owner:
            await self._write_answer(entry)

    async def _operands(self, entry: QueuedTask) -> list[Any]:
        """A task's operands: as its call brought them, or read back from the journal (charged to the
        memory budget first; TaskError(lost) when they did not survive)."""
        if entry.operands is not None:
            return entry.operands
        assert self.journal is not None
        if entry.held:
            raise TaskError(
                f"{entry.kernel}'s operand {entry.held[0]} was an array held on the node, which did not survive the "
                "node's restart; put it again and submit the task again",
                kind=ErrorKind.LOST,
            )
        self.journal.started(entry.task_id)
        entry.runs += 1
        try:
            arrays = await self._trio.to_thread.run_sync(self.journal.arrays, entry.task_id, "in")
        except JournalUnreadable as exc:
            raise TaskError(f"the node's journal {exc}; submit the task again", kind=ErrorKind.LOST) from None
        if len(arrays) != int(entry.spec.get("operands", len(arrays))) - len(entry.held):
            raise TaskError(
                "the node stopped before this task's operands reached its journal; submit it again", kind=ErrorKind.LOST
            )
        params = params_from_json(entry.spec["params"])
        while True:
            try:
                charge = self.admit(entry.kernel, arrays, params)
                break
            except TaskError as exc:
                if exc.kind != ErrorKind.BUSY or self.budget.in_use == 0:
                    raise
                await self._trio.sleep(0.5)  # NOTE: the budget is busy with other tasks: wait for them
        entry.charge = BudgetCharge(self.budget, charge)
        return arrays

    async def _write_answer(self, entry: QueuedTask) -> None:
        """Write a finished task's answer into the journal, for a client that will ask for it."""
        if entry.written or entry.state not in _WAITING_STATES:
            return
        entry.written = True
        written = entry.events["written"] = self._trio.Event()
        record = (
            TaskOutputRecord.from_outcome(entry.outcome, self.verified(entry.outcome))
            if entry.outcome is not None
            else TaskOutputRecord(
                error_kind=str(entry.error.kind) if entry.error else "internal", error_message=str(entry.error)
            )
        )
        entry.record_json = record_to_json(dataclasses.replace(record, outputs=()))
        self._adds.pop(entry.task_id, None)  # NOTE: its row comes with its answer (`_write_record`)
        entry.error = None
        entry.outcome = None
        try:
            if self.journal is not None:
                await self._trio.to_thread.run_sync(self._write_record, entry, record)
        except Exception as exc:
            log.warning("task queue: cannot write the answer of task %s: %s", entry.task_id, describe_exception(exc))
        finally:
            written.set()
            journaled = entry.events.get("journaled")
            if journaled is not None:  # NOTE: its row came with its answer (a detached task waits for it)
                journaled.set()
            if entry.charge is not None:
                entry.charge.release()

    def _write_record(self, entry: QueuedTask, record: TaskOutputRecord) -> None:
        assert self.journal is not None
        outputs = []
        for i, a in enumerate(record.outputs):
            name = f"{entry.task_id}-out{i}.npy" if a.nbytes > QUEUE_INLINE_MAX_BYTES else ""
            if name:
                self.journal.write_file(name, a)
            outputs.append((i, a, name))
        entry.result_bytes = sum(int(a.nbytes) for a in record.outputs)
        if not entry.journaled:  # NOTE: it ended before its operands were written: its row comes now
            row = self._queued_row(entry)
            self.journal.add(row, [])
            entry.journaled = True
        self.journal.finish(entry.task_id, entry.state, entry.finished, entry.record_json, outputs)

    # -- bounds and reports -------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop answers that waited past the retention time, and forget answered tasks as old."""
        if self.journal is None:
            return
        expired = [e for e in self.tasks.values() if e.written and e.finished and now - e.finished > self.retention_s]
        for entry in expired:
            log.warning(
                "task queue: the answer of task %s (%s) waited %s for its client and was dropped "
                "(--state-retention-hours)",
                entry.task_id,
                entry.kernel,
                format_seconds(now - entry.finished),
            )
            self._drop(entry)
        if expired:
            self.journal.forget([e.task_id for e in expired])
        self.journal.forget_answered(now - self.retention_s, QUEUE_ANSWERED_KEPT)
        self._flush(time.monotonic())  # NOTE: so the journal's keys are all of them, but for those of `tasks`
        self._keys = self.journal.keys() | set(self.by_key) | {e.key for e in self._answered.values() if e.key}

    def listing(self) -> list[TaskInfoRecord]:
        """The tasks of the queue, oldest first: the newest QUEUE_LISTED_ANSWERED answered ones, and every
        other one."""
        live = {e.task_id: e for e in self.tasks.values()}
        out = []
        if self.journal is not None:
            for row in self.journal.rows(answered=True, limit=QUEUE_LISTED_ANSWERED):
                if row.task_id in live:
                    continue
                error = ""
                if row.outcome:
                    d = json.loads(row.outcome)
                    error = f"{d['error_kind']}: {d['error_message']}" if d.get("error_kind") else ""
                out.append(
                    TaskInfoRecord(
                        row.task_id, row.key, row.kernel, row.state, row.accepted, row.finished, error, 0, row.runs
                    )
                )
        listed = {r.task_id for r in out}
        for _due, entry, _state in self._marks.values():  # answered just now: the journal says so soon
            if entry.task_id not in listed:
                out.append(entry.info())
        for entry in sorted(live.values(), key=lambda e: e.seq):
            out.append(entry.info(entry.result_bytes or entry.reserved if entry.written else 0))
        return sorted(out, key=lambda r: r.accepted)

    def counts(self) -> dict[str, Any]:
        """What `status` reports of the queue."""
        return {
            "queue_journal": str(self.journal.path) if self.journal is not None else "",
            "queue_tasks": len(self.tasks),
            "queue_waiting": sum(1 for e in self.tasks.values() if e.state in _WAITING_STATES and not e.owner),
            "state_bytes": self.reserved,
            "state_max_bytes": self.max_bytes if self.journal is not None else 0,
            "state_retention_s": self.retention_s if self.journal is not None else 0.0,
            "queue_recovered": self.recovered,
            "queue_refused": self.refused,
        }

    def state_counts(self) -> dict[str, int]:
        """Tasks not answered yet, by state, each of `queued`, `running`, `done` and `failed` (the last two:
        an answer waiting for its client); from any thread (a snapshot of `tasks`)."""
        counts = dict.fromkeys((*_UNFINISHED_STATES, *_WAITING_STATES), 0)
        for entry in list(self.tasks.values()):  # NOTE: a snapshot; trio owns the dict
            counts[entry.state] = counts.get(entry.state, 0) + 1
        return counts


###############################################################################
# 20. RPC service
#
# pycapnp runs on asyncio with its own KJ loop, so the RPC server lives in a
# thread of its own; each call (at most RPC_MAX_CALLS_IN_FLIGHT) becomes a trio
# task spawned through the trio token, so the asyncio loop never blocks, and
# runs against the `NodeService`, the trio-side facade of the node, which
# charges each task to the node's memory budget. This is the only place where
# asyncio meets trio. `_RpcConnection` holds each connection to the limits
# before login and, off loopback, speaks TLS 1.3. A `RemoteArray` capability
# stands for one entry of `KeptArrays`, released when its last one is dropped.
###############################################################################


class NodeService:
    """The trio side of the RPC: what `submit`, `peers`, `status`, `connect` and `kernels` do."""

    def __init__(self, node: Node, manager: Manager, *, trust: Callable[[str], None], rpc_address: str) -> None:
        import trio

        self.node = node
        self.manager = manager
        self.trust = trust
        self.rpc_address = rpc_address
        self.bulk_path = ""  # the bulk socket of this node's clients on this box (BulkServer); "": none
        self.kept = KeptArrays(node.budget)  # the arrays clients hold here or on workers (RemoteArray capabilities)
        self.keeper = ArrayKeeper(self.kept, node, manager, self._submit)
        self.queue: TaskQueue | None = None  # the durable queue (`start_queue`); None: tasks run in their calls
        self.closing = False
        self._calls: set[Any] = set()
        self._trio = trio

    @contextlib.contextmanager
    def call_slot(self) -> Iterator[None]:
        """Hold one of the node's RPC_MAX_CALLS_IN_FLIGHT slots for an RPC call (on the RPC thread);
        TaskError(busy) at once when none is free."""
        calls = self.node.rpc_calls
        if not calls.try_enter():
            raise TaskError(
                f"cannot take the call: {calls.limit} RPC calls are in flight on this node (its limit); retry later",
                kind=ErrorKind.BUSY,
            )
        try:
            yield
        finally:
            calls.leave()

    def admit(
        self, kernel: str, operands: Sequence[np.ndarray], params: Params, message_bytes: int | None = None
    ) -> int:
        """Charge a task to the node's memory budget before it runs (on the RPC thread, before its
        operands are read: stand-ins of their shapes do; ``message_bytes``: those of its operands
        that came in the message, None: all); return the bytes taken (give them back with
        `release`). TaskError when they do not fit."""
        out_bytes = output_nbytes(kernel, operands, params)
        in_message = sum(int(a.nbytes) for a in operands) if message_bytes is None else message_bytes
        need = rpc_task_bytes(in_message, out_bytes)
        refusal = budget_refusal(self.node.budget, kernel, need, out_bytes)
        if refusal is not None or not self.node.budget.try_acquire(need):
            self.node.rpc_tasks_refused += 1
            log.info("RPC: %s", one_line(str(refusal), 300))
            raise refusal or TaskError(f"cannot run {kernel}: the node's memory budget is full", kind=ErrorKind.BUSY)
        return need

    def release(self, nbytes: int) -> None:
        """Give back bytes taken by `admit` (from any thread: the budget has a lock)."""
        if nbytes:
            self.node.budget.release(nbytes)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Run one RPC call in a cancel scope that shutdown() can cancel."""
        if self.closing:
            raise RpcError("the node is shutting down")
        scope = self._trio.CancelScope()
        self._calls.add(scope)
        try:
            with scope:
                yield
            if scope.cancelled_caught:
                raise RpcError("the node is shutting down; the call was cancelled")
        finally:
            self._calls.discard(scope)

    def shutdown(self) -> None:
        """Refuse new calls and cancel the ones in flight (they get an error); the queue's tasks stay
        unfinished in its journal, to run again when the node starts again."""
        self.closing = True
        if self.queue is not None:
            self.queue.stopping = True
        for scope in list(self._calls):
            scope.cancel()

    async def start_queue(
        self, journal: TaskJournal | None, max_bytes: int, retention_s: float, task_status: Any = None
    ) -> None:
        """Run the node's task queue (reading ``journal`` back first) until cancelled: a nursery's task."""
        self.queue = TaskQueue(
            journal,
            execute=self._queued,
            admit=self.admit,
            budget=self.node.budget,
            verified=lambda outcome: result_verified(outcome, self.manager.verify_rounds),
            max_bytes=max_bytes,
            retention_s=retention_s,
        )
        try:
            await self.queue.run(task_status)
        finally:
            if journal is not None:
                journal.close()

    async def _queued(
        self,
        kernel: str,
        operands: Sequence[np.ndarray | KeptArray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        check: str,
    ) -> TaskOutcome:
        """Run a task of the queue (on its runner, apart from any call)."""
        outcome, _ = await self.keeper.run(kernel, operands, params, placement, timeout_s, fallback, check, False)
        return outcome

    async def enqueue(
        self,
        box: dict[str, Any],
        key: str,
        kernel: str,
        operands: Sequence[np.ndarray | KeptArray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        check: str,
        charge: BudgetCharge,
        detach: bool = False,
    ) -> TaskOutcome | TaskOutputRecord:
        """Hand a task (its caller charged it with `admit`) to the queue and wait for its answer: its
        outcome, or its record when it waited in the journal. ``box`` gets the queue's task and the
        call's token at once (``"entry"``, ``"token"``), so the call's end can say what became of it.
        ``detach``: answer once the task is journaled, with a record of its id only."""
        assert self.queue is not None
        kernel, placement = check_rpc_text("kernel", kernel), check_rpc_text("placement", placement)
        timeout_s = check_task_timeout(timeout_s)
        check, key = check_choice(check), check_task_key(key)
        spec = {
            "params": params_to_json(params),
            "placement": placement,
            "timeout_s": timeout_s,
            "fallback": fallback,
            "check": check,
        }
        arrays = [o.stand_in() if isinstance(o, KeptArray) else o for o in operands]
        out_bytes = output_nbytes(kernel, arrays, params)
        del arrays
        answer: TaskOutcome | TaskOutputRecord | None = None
        with self._call():
            entry, token = self.queue.accept(key, kernel, operands, params, spec, out_bytes, charge, detach)
            box["entry"], box["token"] = entry, token
            if detach:
                journaled = entry.events.get("journaled")
                if journaled is not None:
                    await journaled.wait()
                if self.queue.journal is not None and not entry.journaled and entry.state in ("queued", "running"):
                    raise TaskError(f"cannot journal {kernel}: see the node's log", kind=ErrorKind.INTERNAL)
                return TaskOutputRecord(task_id=entry.task_id)
            answer = await self.queue.wait(entry, token, timeout_s + RPC_QUEUE_WAIT_ROOM_S)
        assert answer is not None
        return answer

    async def result(self, box: dict[str, Any], name: str, timeout_s: float) -> TaskOutcome | TaskOutputRecord:
        """The answer of a task of the queue, by its id or key (`enqueue`'s, for a call that asks again)."""
        if self.queue is None:
            raise TaskError("this node keeps no task queue", kind=ErrorKind.NOT_FOUND)
        name, timeout_s = check_rpc_text("task", name), check_task_timeout(timeout_s)
        answer: TaskOutcome | TaskOutputRecord | None = None
        with self._call():
            entry = self.queue.find(name)
            token = self.queue.attach(entry)
            box["entry"], box["token"] = entry, token
            answer = await self.queue.wait(entry, token, timeout_s)
        assert answer is not None
        return answer

    async def tasks(self) -> list[TaskInfoRecord]:
        """The tasks of the queue."""
        return self.queue.listing() if self.queue is not None else []

    async def submit(
        self,
        kernel: str,
        operands: Sequence[np.ndarray | KeptArray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool = True,
        check: str = "",
        keep: bool = False,
    ) -> tuple[TaskOutcome, tuple[KeptArray, ...]]:
        """Run a task (its caller charged it with `admit`) on arrays and held arrays; return its
        outcome, and with ``keep`` its outputs held (`ArrayKeeper.run`). TaskError on failure
        (bad-input for a bad argument; ``fallback=False``: also when it would run locally because
        no remote worker is usable). ``check``: as `Manager.run`'s."""
        kernel, placement = check_rpc_text("kernel", kernel), check_rpc_text("placement", placement)
        timeout_s = check_task_timeout(timeout_s)
        check = check_choice(check)
        result: tuple[TaskOutcome, tuple[KeptArray, ...]] | None = None
        with self._call():  # NOTE: held arrays are fetched and made again in this scope too
            result = await self.keeper.run(kernel, operands, params, placement, timeout_s, fallback, check, keep)
        assert result is not None
        return result

    async def _submit(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        check: str = "",
    ) -> TaskOutcome:
        outcome: TaskOutcome | None = None
        with self._call():
            if placement in SPLIT_PLACEMENTS:
                outcome = await self._split(kernel, operands, params, placement, timeout_s, fallback)
            elif (
                placement not in PLACEMENTS
                and placement not in self.node.sessions
                and not (
                    is_peer_id(placement) and self.node.may_serve(placement)  # a known peer, down right now
                )
            ):
                known = ", ".join(PLACEMENTS + SPLIT_PLACEMENTS + tuple(self.node.sessions))
                raise TaskError(f"unknown placement {placement!r}; use one of: {known}", kind=ErrorKind.BAD_INPUT)
            else:
                outcome = await self.manager.run(
                    kernel, operands, params, placement=placement, timeout_s=timeout_s, fallback=fallback, check=check
                )
        assert outcome is not None
        return outcome

    async def _split(
        self,
        kernel: str,
        operands: Sequence[np.ndarray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool = True,
    ) -> TaskOutcome:
        """A task split in row blocks over the connected workers (and this node, for "split"): a 2-D
        matmul by the rows of a, an element-wise kernel by its result's rows, a batched matmul by
        its stack (`row_split`)."""
        try:
            check_kernel_call(kernel, operands, params)
        except KernelError as exc:
            raise TaskError(str(exc), kind=ErrorKind.BAD_INPUT) from None
        two_d = kernel == "matmul" and all(o.ndim == 2 for o in operands)
        rows = None if two_d else row_split(kernel, [o.shape for o in operands])
        if not two_d and rows is None and kernel in ROW_SPLIT_KERNELS:  # one row or none: one block, one task
            where = "remote" if placement == "split-remote" else "auto"
            return await self.manager.run(
                kernel, operands, params, placement=where, timeout_s=timeout_s, fallback=fallback
            )
        if not two_d and rows is None:
            raise TaskError(
                f"placement {placement!r} splits matmul and element-wise kernels by rows; {kernel} cannot be split:"
                " use placement 'auto'",
                kind=ErrorKind.BAD_INPUT,
            )
        workers = self.manager.usable_workers()
        reason = ""
        if placement == "split-remote" and workers == [LOCAL]:
            reason = self.manager.fallback_reason()
            if not fallback:
                hint = "wait for the probe, connect another worker, or allow the local fallback"
                raise TaskError(f"cannot run {kernel} on remote workers: {reason}; {hint}", kind=ErrorKind.UNAVAILABLE)
        elif placement == "split-remote":
            workers = [w for w in workers if w != LOCAL]
        if rows is None:
            split = await self.manager.split_matmul(operands[0], operands[1], workers=workers, timeout_s=timeout_s)
        else:
            split = await self.manager.split_rows(
                kernel, operands, params, rows[1], workers=workers, timeout_s=timeout_s
            )
        attempts = [
            AttemptRecord(w, f"ok: {s.rows} rows in {s.blocks} blocks, busy {split.busy_fraction(w):.0%}")
            for w, s in split.shares.items()
            if s.blocks
        ]
        compute_s = sum(s.compute_s for s in split.shares.values())
        return TaskOutcome(0, kernel, (split.result,), "split", attempts, compute_s, split.elapsed_s, 0.0, reason)

    def peer_info(self, session: PeerSession) -> PeerRecord:
        """Return what `peers` reports about one session."""
        from libp2p.peer.id import ID

        try:
            addrs = [str(a) for a in self.node.host.get_peerstore().addrs(ID.from_base58(session.peer_id))]
        except Exception:  # NOTE: py-libp2p raises PeerStoreError for a peer without addresses
            addrs = []
        addrs = dialable_addresses(addrs, multiaddr_ip(self.node.remote_address(session.peer_id)))
        return PeerRecord(
            session.peer_id,
            tuple(addrs),
            session.hello.pangea_version,
            tuple(session.hello.kernels),
            (session.rtt_s or 0.0) * 1000,
            self.manager.done_by.get(session.peer_id, 0),
            session.hello.role,
            bool(self.node.may_serve(session.peer_id)),
            time.monotonic() - session.last_seen,
            session.data_note,
            time.monotonic() - session.opened_at,
            session.data.bytes_in if session.data is not None else 0,
            session.data.bytes_out if session.data is not None else 0,
            self.suspicion_of(session.peer_id),
        )

    def suspicion_of(self, peer_id: str) -> SuspicionRecord | None:
        """The suspicion record of a peer (None: trusted)."""
        info = self.manager.suspicions().get(peer_id)
        return SuspicionRecord.from_info(peer_id, info) if info else None

    async def peers(self) -> list[PeerRecord]:
        """Return the connected peers."""
        with self._call():
            return [self.peer_info(s) for s in self.node.sessions.values()]
        return []

    async def status(self) -> StatusRecord:
        """Return this node's status."""
        record: StatusRecord | None = None
        with self._call():
            record = StatusRecord(
                self.node.peer_id,
                tuple(self.node.addresses),
                __version__,
                time.monotonic() - self.node.started_at,
                self.manager.tasks_done,
                self.manager.tasks_failed,
                self.manager.tasks_in_flight,
                self.node.bytes_in,
                self.node.bytes_out,
                self.rpc_address,
                len(self.node.sessions),
                self.node.tasks_served,
                self.node.tasks_cancelled,
                tuple(SuspicionRecord.from_info(w, info) for w, info in self.manager.suspicions().items()),
                self.node.rpc_calls.refused,
                self.node.rpc_tasks_refused,
                self.node.pending.refused,
                self.node.data_plane.evicted if self.node.data_plane is not None else 0,
                self.node.budget.in_use,
                self.node.budget.limit_bytes,
                self.node.strangers.refused + self.node.strangers.expired,
                self.kept.held_bytes,
                self.kept.held_arrays,
                **(self.queue.counts() if self.queue is not None else {}),
            )
        assert record is not None
        return record

    def kernels(self) -> list[KernelInfoRecord]:
        """Return the kernels this node runs, in name order, as an RPC client may call them (from
        any thread: the registry and the node's limits never change while it runs).

        NOTE: RPC operands are read with the default `Limits` (array_from_capnp), not the
        node's --dtypes and --max-elements, which bound what its peers send; a result that
        runs here is held to the node's --max-elements."""
        rpc_limits = Limits()
        max_elements = min(rpc_limits.max_elements, self.node.limits.max_elements)
        rounds = self.manager.verify_rounds
        return [
            KernelInfoRecord.from_kernel(KERNELS[name], rpc_limits, max_elements, rounds) for name in sorted(KERNELS)
        ]

    async def connect(self, multiaddr: str) -> PeerRecord:
        """Dial a peer named by the RPC user, trust it once the handshake with it succeeded, and
        return its info. A failed or refused dial leaves no trust behind."""
        info: PeerRecord | None = None
        with self._call():
            address = parse_peer_address(check_rpc_text("multiaddr", multiaddr))

            # NOTE: trusted as the dialed session opens, before it runs: a task the peer sends
            # at once is served. Only a session we dialed: Noise authenticated the peer id we
            # named; a session the peer dialed was judged by the node's own `accept`.
            def trust_dialed(session: PeerSession) -> None:
                if session.dialed and session.peer_id == address.peer_id:
                    self.trust(address.peer_id)

            self.node.on_session.append(trust_dialed)
            try:
                session = await self.node.dial(address, timeout_s=RPC_CONNECT_TIMEOUT_S)
            finally:
                self.node.on_session.remove(trust_dialed)
            self.trust(session.peer_id)  # also when the dial found the peer's own session open
            info = self.peer_info(session)
        assert info is not None
        return info


class RpcServer:
    """The Cap'n Proto RPC endpoint, running in its own thread (asyncio + KJ)."""

    def __init__(
        self, service: NodeService, host: str, port: int, *, token: str, max_bytes: int, tls_pem: Path | None = None
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.token = token
        self.max_bytes = max_bytes
        self.tls_pem = tls_pem  # the certificate and key of a TLS endpoint (None: plain, loopback only)
        self._box: dict[str, Any] = {}
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> tuple[str, int]:
        """Start the RPC thread; return the bound (host, port). ConfigError if it cannot listen."""
        import trio

        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._thread_main, args=(token,), name="pangea-rpc", daemon=True)
        self._thread.start()
        await trio.to_thread.run_sync(self._ready.wait)
        if "error" in self._box:
            raise ConfigError(
                f"cannot serve RPC on {self.host}:{self.port}: {self._box['error']}",
                hint="pick another port with --rpc HOST:PORT",
            )
        return self.host, int(self._box["port"])

    async def stop(self) -> None:
        """Stop serving; calls in flight have already been cancelled by the service."""
        import trio

        loop, stop = self._box.get("loop"), self._box.get("stop")
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join, 10.0)

    def _thread_main(self, trio_token: Any) -> None:
        import asyncio

        try:
            asyncio.run(self._run_server(trio_token))
        except Exception as exc:  # NOTE: report to start(); never leave it waiting
            self._box.setdefault("error", describe_exception(exc))
        finally:
            self._ready.set()

    async def _run_server(self, trio_token: Any) -> None:
        """Listen on the RPC port and serve each connection a `Gate`, until stop() (runs on the RPC thread)."""
        import asyncio

        import capnp

        schema = load_schema()
        loop = asyncio.get_running_loop()
        self._box["loop"], self._box["stop"] = loop, asyncio.Event()
        service, words = self.service, rpc_words(self.max_bytes)

        async def in_trio(fn: Callable[..., Any], *args: Any) -> Any:
            """Run ``fn(*args)`` as a trio task and await its result; the asyncio loop never blocks.

            No thread per call: the task is spawned through the trio token and settles the
            asyncio future with call_soon_threadsafe. When pycapnp cancels the method (its
            client went away), the task's scope is cancelled: a queued kernel never starts and
            remote attempts send Cancel. What a call holds (its share of the budget) is its
            caller's to give back, whether the result came or not.
            NOTE: a system task, so a call cut off by shutdown never keeps trio (or the
            process) alive: trio cancels it when the node's main task ends."""
            import trio

            future = loop.create_future()
            # NOTE: touched on the trio thread only: the scope of the call, and whether its
            # client went away before it started.
            call: dict[str, Any] = {"scope": None, "abandoned": False}

            def settle(ok: bool, value: Any) -> None:
                if not future.done():  # done: cancelled, nobody waits for it
                    future.set_result(value) if ok else future.set_exception(value)

            def post(ok: bool, value: Any) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                    loop.call_soon_threadsafe(settle, ok, value)

            async def run_call() -> None:
                try:
                    with trio.CancelScope() as call["scope"]:
                        if not call["abandoned"]:
                            post(True, await fn(*args))
                            return
                    post(False, RpcError("the client went away"))
                except Exception as exc:  # handed to the awaiting coroutine as is
                    post(False, exc)
                except BaseException:  # NOTE: trio's Cancelled: the call was cut off by shutdown
                    post(False, RpcError("the node is shutting down; the call was cancelled"))
                    raise

            def abandon() -> None:
                call["abandoned"] = True
                if call["scope"] is not None:
                    call["scope"].cancel()  # its remote attempts send Cancel to their workers

            try:
                trio_token.run_sync_soon(trio.lowlevel.spawn_system_task, run_call)
            except trio.RunFinishedError:
                raise RpcError("the node is shutting down") from None
            try:
                return await future
            except asyncio.CancelledError:
                if not future.done() or future.cancelled():
                    with contextlib.suppress(trio.RunFinishedError):
                        trio_token.run_sync_soon(abandon)
                raise

        bulk: BulkServer | None = None
        if self.tls_pem is None:  # NOTE: a loopback endpoint: its clients may be on this box
            bulk = BulkServer(self.token, 2 * max(service.node.budget.limit_bytes, self.max_bytes))
            try:
                service.bulk_path = str(bulk.start(loop))
            except OSError as exc:
                log.warning("bulk: no shared-memory channel, arrays travel in RPC messages: %s", exc)
                bulk = None
        limiter = LoginLimiter(
            RPC_LOGIN_DELAY_BASE_S, RPC_LOGIN_DELAY_MAX_S, RPC_LOGIN_FORGET_S, RPC_LOGIN_REPORT_S, RPC_LOGIN_MAX_SOURCES
        )
        # NOTE: a TLS endpoint: its clients may be on other boxes; their arrays come on TLS connections of their own
        tls_bulk = TlsBulkBatches(self.token, service.node.budget, limiter) if self.tls_pem is not None else None

        def soon(fn: Callable[..., None], *args: Any) -> None:
            import trio

            with contextlib.suppress(trio.RunFinishedError):
                trio_token.run_sync_soon(fn, *args)

        gate_for = _make_gate(schema, in_trio, service, self.token, self.max_bytes, bulk or tls_bulk, limiter, soon)
        admission = RpcAdmission(RPC_MAX_CONNECTIONS, RPC_MAX_PENDING_LOGINS, RPC_MAX_PENDING_LOGINS_PER_SOURCE)
        tls = tls_server_context(str(self.tls_pem)) if self.tls_pem is not None else None

        async def on_connection(conn: _RpcConnection, stream: Any) -> None:
            try:
                server = capnp.TwoPartyServer(stream, bootstrap=gate_for(conn), traversal_limit_in_words=words)  # type: ignore[attr-defined]
                await server.on_disconnect()
            finally:  # NOTE: whatever Cap'n Proto raised, the socket is closed and its descriptor freed
                conn.close()

        def new_protocol() -> Any:  # an asyncio.BufferedProtocol
            conn = _rpc_connection_class()(admission, self.max_bytes, tls, tls_bulk)
            conn.inner = capnp.AsyncIoStream._connect(functools.partial(on_connection, conn))  # type: ignore[attr-defined]
            return conn

        async with capnp.kj_loop():  # type: ignore[attr-defined]
            try:
                server = await loop.create_server(new_protocol, self.host, self.port)
            except OSError as exc:
                self._box["error"] = exc.strerror or str(exc)
                return
            self._box["port"] = server.sockets[0].getsockname()[1]
            self._ready.set()
            try:
                await self._box["stop"].wait()
            finally:
                if bulk is not None:
                    bulk.stop()
            server.close()  # NOTE: no wait_closed(): a connected client must not block shutdown


class _RpcConnection:
    """One RPC connection: pycapnp's protocol behind a meter that holds the limits before login.

    NOTE: pycapnp fixes a connection's message limit when it starts (TwoPartyServer's
    traversal limit), and it reserves a message's declared size as its bytes arrive, so the
    limit before login is enforced here, in front of it: every chunk pycapnp reads into its
    buffer passes `CapnpFrameMeter` before pycapnp sees it, and a message that declares more
    than RPC_PRE_LOGIN_MAX_BYTES before login (or --rpc-max-mib after) ends the connection at
    its segment table. The connection also owns its socket: it is closed at the login
    deadline, on eviction, and when the Cap'n Proto server ends, whatever it raised.

    With ``tls`` (an ssl server context), the connection is admitted first and then upgraded
    to TLS 1.3 (the login deadline covers the handshake); pycapnp sees only the decrypted
    bytes, and it starts once the handshake is done and the first bytes have come (they wait
    in `_early`, metered like the rest). A TLS connection whose first bytes are
    `BULK_TLS_MAGIC` is a remote Client's bulk channel (``tls_bulk``): a `TlsBulkConnection`
    takes its bytes, under the same admission and login deadline, and pycapnp never starts."""

    def __init__(
        self, admission: RpcAdmission, max_bytes: int, tls: Any = None, tls_bulk: TlsBulkBatches | None = None
    ) -> None:
        self.admission, self.max_bytes, self.tls, self.tls_bulk = admission, max_bytes, tls, tls_bulk
        self.bulk: TlsBulkConnection | None = None  # this connection is a bulk channel over TLS
        self.inner: Any = None  # pycapnp's protocol, set by the factory
        self.transport: Any = None
        self.source = ""
        self.authenticated = False
        self.login_lock: Any = None  # one login at a time per connection (asyncio.Lock)
        self._meter = CapnpFrameMeter()
        self._buffer: Any = None
        self._started = False
        self._deadline: Any = None
        self._early = bytearray()
        self._ready = False  # the TLS handshake is done (or there is none)
        self._handshake: Any = None  # the task upgrading to TLS (held: asyncio keeps weak references)

    def connection_made(self, transport: Any) -> None:
        import asyncio

        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        admitted, evicted = self.admission.open(self, self.source)
        for old in evicted:
            log.info("RPC: closing a connection from %s that has not logged in: too many wait", old.source)  # type: ignore[attr-defined]
            old.close()  # type: ignore[attr-defined]
        if not admitted:
            log.warning("RPC: refusing a connection from %s: %d connections open", self.source, RPC_MAX_CONNECTIONS)
            transport.abort()
            return
        self.login_lock = asyncio.Lock()
        self._deadline = asyncio.get_running_loop().call_later(RPC_LOGIN_TIMEOUT_S, self._login_deadline)
        if self.tls is None:
            self._start(transport)
        else:
            self._handshake = asyncio.ensure_future(self._start_tls(transport))

    async def _start_tls(self, raw: Any) -> None:
        import asyncio

        try:
            protocol: Any = self  # an asyncio.BufferedProtocol, see _rpc_connection_class
            transport = await asyncio.get_running_loop().start_tls(
                raw, protocol, self.tls, server_side=True, ssl_handshake_timeout=RPC_TLS_HANDSHAKE_TIMEOUT_S
            )
        except (OSError, RuntimeError) as exc:  # NOTE: ssl.SSLError and a timeout are OSErrors
            log.info(
                "RPC: closing a connection from %s: TLS handshake failed: %s", self.source, describe_tls_error(exc)
            )
            self.close()
            return
        if self.transport is None or transport is None:  # closed during the handshake
            return
        self._start(transport)

    def _start(self, transport: Any) -> None:
        """The connection is ready (after the TLS handshake, when there is one): hand it to pycapnp,
        or, on a TLS endpoint, wait for its first bytes to tell a Cap'n Proto client from a bulk
        channel (a client speaks first either way)."""
        self.transport = transport
        self._ready = True
        if self.tls_bulk is None:
            self._start_capnp()
        elif len(self._early) >= len(BULK_TLS_MAGIC):
            self._choose()

    def _choose(self) -> None:
        """Enough first bytes have come: a bulk channel over TLS, or Cap'n Proto."""
        assert self.tls_bulk is not None
        early, self._early = bytes(self._early), bytearray()
        if early.startswith(BULK_TLS_MAGIC):
            self.bulk = TlsBulkConnection(
                self.tls_bulk, self.source, self._write, self.close, self.logged_in, self._unsent
            )
            self._started = True
            self.bulk.receive(early[len(BULK_TLS_MAGIC) :])
            return
        declared = self._meter.feed(memoryview(early))  # NOTE: metered as if they came now
        if declared > RPC_PRE_LOGIN_MAX_BYTES:
            log.info("RPC: closing a connection from %s: a message of %d bytes before login", self.source, declared)
            self.close()
            return
        self._early = bytearray(early)
        self._start_capnp()

    def _start_capnp(self) -> None:
        self._started = True
        self.inner.connection_made(self.transport)
        early, self._early = memoryview(bytes(self._early)), bytearray()
        while early and self._started:
            buffer = memoryview(self.inner.get_buffer(len(early))).cast("B")
            n = min(len(buffer), len(early))
            buffer[:n] = early[:n]
            self.inner.buffer_updated(n)
            early = early[n:]

    def _write(self, data: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _unsent(self) -> int:
        return int(self.transport.get_write_buffer_size()) if self.transport is not None else 0

    def _login_deadline(self) -> None:
        if not self.authenticated:
            log.info("RPC: closing a connection from %s: no login within %gs", self.source, RPC_LOGIN_TIMEOUT_S)
            self.close()

    def logged_in(self) -> None:
        """The login succeeded: the full message limit from now on, no deadline."""
        self.authenticated = True
        self.admission.logged_in(self)
        if self._deadline is not None:
            self._deadline.cancel()

    def close(self) -> None:
        """Close the socket now (harmless when already closed)."""
        self.admission.close(self)
        if self._deadline is not None:
            self._deadline.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> Any:
        # NOTE: a memoryview, not a bytearray: asyncio's TLS reader fills buf[offset:], and a
        # bytearray's slice is a copy (the bytes would be lost)
        if self.bulk is not None:
            self._buffer = self.bulk.get_buffer()
        else:
            self._buffer = self.inner.get_buffer(sizehint) if self._started else memoryview(bytearray(64 << 10))
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.bulk is not None:
            self.bulk.buffer_updated(nbytes)
            return
        if self.tls_bulk is not None and not self._started:  # a TLS endpoint: what is it?
            self._early += memoryview(self._buffer)[:nbytes]
            if len(self._early) > RPC_PRE_LOGIN_MAX_BYTES:
                self.close()
            elif self._ready and len(self._early) >= len(BULK_TLS_MAGIC):
                self._choose()
            return
        declared = self._meter.feed(memoryview(self._buffer)[:nbytes])
        limit = self.max_bytes if self.authenticated else RPC_PRE_LOGIN_MAX_BYTES
        if declared > limit:
            state = "after" if self.authenticated else "before"
            log.info("RPC: closing a connection from %s: a message of %d bytes %s login", self.source, declared, state)
            self.close()
            return
        if not self._started:
            self._early += memoryview(self._buffer)[:nbytes]
            return
        self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._started and self.bulk is None else None

    def pause_writing(self) -> None:
        if self._started and self.bulk is None:  # NOTE: a bulk channel's writes are bounded by its task
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._started and self.bulk is None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.close(self)
        if self._deadline is not None:
            self._deadline.cancel()
        if self.bulk is not None:
            self.bulk.connection_lost()
        elif self._started:
            self.inner.connection_lost(exc)
        self.transport = None


@functools.cache
def _rpc_connection_class() -> type[_RpcConnection]:
    """_RpcConnection as an asyncio.BufferedProtocol (asyncio is imported on first use, not with pangea)."""
    import asyncio

    return type("RpcConnection", (_RpcConnection, asyncio.BufferedProtocol), {})


def answer_list(
    results: Any, name: str, records: Sequence[RpcRecord], error: Exception | None = None, what: str = ""
) -> None:
    """Fill a list call's results: its records, or (``error``) an empty list and the error's kind and message."""
    slots = results.init(name, len(records))
    for slot, record in zip(slots, records, strict=True):
        record.to_capnp(slot)
    if error is not None:
        results.errorKind, results.errorMessage = rpc_error_fields(error, what)


def _make_gate(
    schema: Any,
    in_trio: Callable[..., Any],
    service: NodeService,
    token: str,
    max_bytes: int,
    bulk: BulkServer | TlsBulkBatches | None = None,
    limiter: LoginLimiter | None = None,
    soon: Callable[..., None] | None = None,
) -> Callable[[_RpcConnection], Any]:
    """Return a factory of the bootstrap `Gate` of each connection: login with the token yields `Compute`
    (one per connection). ``soon(fn, *args)`` runs a function on the trio thread, not waiting for it."""
    import asyncio
    import hmac

    class RemoteArrayImpl(schema.RemoteArray.Server):
        """One capability of an array the node holds: the array is released when pycapnp drops the
        last reference to it (the client dropped its handle, or its connection closed)."""

        def __init__(self, kept: KeptArray) -> None:
            self.kept = kept

        def __del__(self) -> None:
            service.kept.release(self.kept.key)

        async def info(self, _context: Any, **kwargs: Any) -> None:
            r, a = _context.results, self.kept
            r.dtype, r.shape, r.nbytes = _dtype_name(a.dtype), [int(d) for d in a.shape], a.nbytes
            r.holder, r.verification = a.holder, a.verification

        async def get(self, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():
                    a = self.kept.array
                    if a is None:  # NOTE: held on a worker: brought here (or made again) first
                        a = await in_trio(service.keeper.here, self.kept, DEFAULT_TASK_TIMEOUT_S)
                    if int(a.nbytes) + RPC_MESSAGE_ROOM_BYTES > max_bytes:
                        raise TaskError(
                            f"cannot get an array of {format_bytes(int(a.nbytes))} in one message (the node's RPC "
                            f"limit is {format_bytes(max_bytes)}); submit 'copy' with it as operand instead "
                            "(Client.get does)",
                            kind=ErrorKind.BAD_INPUT,
                        )
                    array_to_capnp(_context.results.array, a)
            except Exception as exc:
                _context.results.errorKind, _context.results.errorMessage = rpc_error_fields(exc, "get an array")

        async def claim(self, nonce: Any, _context: Any, **kwargs: Any) -> None:
            key = bytes(nonce)
            if service.kept.claims.get(key) == 0:  # NOTE: only a nonce the node is waiting for
                service.kept.claims[key] = self.kept.key

    async def claimed(caps: Any) -> list[KeptArray]:
        """The arrays a task names by their capabilities (TaskSpec.arrays), each recognised as one of
        this node's own by a claim with a random nonce; TaskError(bad-input) for anything else."""
        import secrets

        if len(caps) > MAX_TASK_ARRAYS:
            raise TaskError(
                f"a task may name at most {MAX_TASK_ARRAYS} held arrays, got {len(caps)}", kind=ErrorKind.BAD_INPUT
            )
        out = []
        for i in range(len(caps)):
            nonce = secrets.token_bytes(16)
            service.kept.claims[nonce] = 0
            try:
                async with asyncio.timeout(CLAIM_TIMEOUT_S):
                    await caps[i].claim(nonce)
            except Exception as exc:  # NOTE: not ours, or gone: said below
                log.debug("RPC: a task's array %d did not answer its claim: %s", i, describe_exception(exc))
            found = service.kept.find(service.kept.claims.pop(nonce, 0))
            if found is None:
                raise TaskError(
                    f"array {i} of the task is not held by this node (released, or another node's handle); "
                    "put it again",
                    kind=ErrorKind.BAD_INPUT,
                )
            out.append(found)
        return out

    async def answer_kept(result: Any, outcome: TaskOutcome, kept: Sequence[KeptArray]) -> None:
        """Answer with the capabilities of a task's held outputs (TaskOutput.kept)."""
        handles = [RemoteArrayImpl(k) for k in kept]
        record = TaskOutputRecord.from_outcome(outcome, result_verified(outcome, service.manager.verify_rounds))
        dataclasses.replace(record, outputs=()).to_capnp(result)
        slots = result.init("outputs", len(handles))
        for i, (slot, handle) in enumerate(zip(slots, handles, strict=True)):
            a = handle.kept
            slot.dtype, slot.shape, slot.held = _dtype_name(a.dtype), [int(d) for d in a.shape], i + 1
        caps = result.init("kept", len(handles))
        for i, handle in enumerate(handles):
            caps[i] = handle

    class ComputeImpl(schema.Compute.Server):
        # NOTE: no method lets an exception out: pycapnp would send the client a
        # "remote exception" carrying this server's traceback. Errors travel as
        # errorKind/errorMessage in the results.

        def __init__(self, conn: _RpcConnection | None = None) -> None:
            self.conn = conn  # the connection it was handed to at login

        def _gone(self) -> bool:
            """Whether the connection of this client closed (its client went away, not cancelled a call)."""
            return self.conn is None or self.conn.transport is None or self.conn.transport.is_closing()

        def _end_of_call(self, box: dict[str, Any], answered: bool) -> None:
            """Tell the queue what became of the call of ``box``'s task: answered, or ended without its
            answer (then, a moment later, whether its client went away or cancelled it)."""
            entry, token = box.get("entry"), box.get("token", 0)
            queue = service.queue
            if entry is None or queue is None or soon is None or box.get("detached"):
                return
            if answered:
                soon(queue.answered, entry, token)
                return
            loop = asyncio.get_running_loop()
            loop.call_later(QUEUE_LET_GO_S, lambda: soon(queue.let_go, entry, token, self._gone()))

        async def submit(self, task: Any, _context: Any, **kwargs: Any) -> None:
            batch = bytes(task.bulkBatch)  # the task's shared segments (the bulk channel); b"": none
            charge = BudgetCharge(service.node.budget)  # what this task holds of the budget until answered
            copying: list[Any] = []  # a copy of the output into the client's segment, still running
            box: dict[str, Any] = {}  # the queue's task and this call's token (a journaled task)
            answered = False
            try:
                await self._submit(task, _context, batch, charge, copying, box)
                answered = True
            finally:  # NOTE: also when the call is cancelled (its client went away)
                charge.release()
                self._end_of_call(box, answered)
                if batch and bulk is not None:
                    entry = box.get("entry")
                    if copying and not copying[0].done():  # unmapped once the copy is over, not under it
                        copying[0].add_done_callback(lambda _: bulk.finish(batch))
                    elif entry is not None:  # NOTE: a task that outlives its call reads its operands there
                        loop = asyncio.get_running_loop()
                        entry.when_settled(lambda: loop.call_soon_threadsafe(bulk.finish, batch))
                    else:
                        bulk.finish(batch)

        async def _submit(
            self, task: Any, _context: Any, batch: bytes, charge: BudgetCharge, copying: list[Any], box: dict[str, Any]
        ) -> None:
            result = _context.results.result
            keep, slot = bool(task.keep), int(task.outputSegment)
            error: TaskError | None = None
            outcome: TaskOutcome | TaskOutputRecord | None = None
            segments: list[BulkSegment] = []
            try:
                with service.call_slot():
                    kernel = check_rpc_text("kernel", str(task.kernel))  # before any copy of the operands
                    key = check_task_key(str(task.key))
                    params = params_from_capnp(task.params)
                    check = check_choice(str(task.check))
                    stand_ins = operand_stand_ins(task.operands)
                    kept = await claimed(task.arrays) if len(task.arrays) else []
                    if batch:
                        if bulk is None:
                            raise TaskError("this node has no bulk channel", kind=ErrorKind.BAD_INPUT)
                        segments = bulk.take(batch)
                    if stand_ins is not None:  # charged before the operands are copied out of the request
                        # NOTE: bytes in a segment or held here already are not in the message
                        in_message = [not (a.shared.segment or a.held) for a in task.operands]
                        message_bytes = sum(int(a.nbytes) for a, m in zip(stand_ins, in_message, strict=True) if m)
                        charge.nbytes = service.admit(kernel, stand_ins, params, message_bytes)
                    operands = [
                        held_operand(a, i, kept)
                        if a.held
                        else shared_operand(a, i, segments)
                        if a.shared.segment
                        else array_from_capnp(a, i)
                        for i, a in enumerate(task.operands)
                    ]
                    if stand_ins is None:  # NOTE: array_from_capnp has said what is wrong, or they are fine
                        arrays = [o.stand_in() if isinstance(o, KeptArray) else o for o in operands]
                        charge.nbytes = service.admit(kernel, arrays, params)
                        del arrays
                    placement = str(task.placement) or "auto"
                    fallback, timeout_s = not bool(task.noFallback), float(task.timeoutSeconds)
                    detach = bool(task.detach)
                    # NOTE: the request's arrays are copied out or mapped: its message (and the
                    # capabilities it passed, which pycapnp would hold until the client sends
                    # Finish) go now
                    del task
                    _context.release_params()
                    if detach and (keep or service.queue is None):
                        raise TaskError(
                            "cannot detach a task from its call: "
                            + (
                                "one that keeps its outputs on the node lives with its connection"
                                if keep
                                else "this node keeps no task queue (--state-max-gib 0)"
                            ),
                            kind=ErrorKind.BAD_INPUT,
                        )
                    if keep or service.queue is None:  # NOTE: outputs held here live with this connection
                        # NOTE: the one hop into trio of a task: charged above, on this thread
                        outcome, outputs_kept = await in_trio(
                            service.submit, kernel, operands, params, placement, timeout_s, fallback, check, keep
                        )
                        del operands, kept
                        if keep and isinstance(outcome, TaskOutcome):
                            await answer_kept(result, outcome, outputs_kept)
                            return
                    else:
                        outcome = await in_trio(
                            service.enqueue,
                            box,
                            key,
                            kernel,
                            operands,
                            params,
                            placement,
                            timeout_s,
                            fallback,
                            check,
                            charge,
                            detach,
                        )
                        del operands, kept
                        box["detached"] = detach
            except Exception as exc:
                kind, message = rpc_error_fields(exc, "submit a task")
                error = exc if isinstance(exc, TaskError) and kind == exc.kind else TaskError(message, kind=kind)
            await self._answer(result, outcome, error, box, _context, segments, slot, copying)

        async def _answer(
            self,
            result: Any,
            outcome: TaskOutcome | TaskOutputRecord | None,
            error: TaskError | None,
            box: dict[str, Any],
            _context: Any,
            segments: Sequence[BulkSegment] = (),
            slot: int = 0,
            copying: list[Any] | None = None,
        ) -> None:
            """Fill a `TaskOutput`: the outcome (its one output in the client's segment ``slot`` when it has one),
            the record read back from the journal, or the error."""
            try:
                if isinstance(outcome, TaskOutputRecord):
                    outcome.to_capnp(result)
                    if "entry" in box:
                        result.taskId = box["entry"].task_id
                    return
                shared = 1 <= slot <= len(segments) and outcome is not None and error is None
                if shared and outcome is not None and len(outcome.outputs) == 1:
                    # NOTE: one memory copy in place of building the message's Data fields; a large
                    # one in a worker thread (numpy lets go of the GIL), so other calls go on
                    output, segment = outcome.outputs[0], segments[slot - 1]
                    if segment.sender is not None:  # a remote client's: back on its TLS bulk connection
                        shared = await segment.sender.send_result(segment.name, output, segment.size)
                    elif output.nbytes < SHARED_COPY_IN_THREAD_BYTES:
                        shared = write_shared_output(output, segment)
                    else:
                        assert copying is not None
                        loop = asyncio.get_running_loop()
                        copying.append(loop.run_in_executor(None, write_shared_output, output, segment))
                        shared = await asyncio.shield(copying[0])
                _outcome_to_capnp(result, outcome, error, service.manager.verify_rounds, shared_output=slot * shared)
                if "entry" in box:
                    result.taskId = box["entry"].task_id
            except Exception as exc:  # an output the message cannot hold: say so instead
                kind, message = rpc_error_fields(exc, "return a task's result")
                _context.results.result = {"errorKind": kind, "errorMessage": message}

        async def result(self, task: Any, timeoutSeconds: Any, _context: Any, **kwargs: Any) -> None:  # noqa: N803
            box: dict[str, Any] = {}
            answered = False
            outcome: TaskOutcome | TaskOutputRecord | None = None
            error: TaskError | None = None
            try:
                with service.call_slot():
                    outcome = await in_trio(service.result, box, str(task), float(timeoutSeconds))
            except Exception as exc:
                kind, message = rpc_error_fields(exc, "get a task's result")
                error = exc if isinstance(exc, TaskError) and kind == exc.kind else TaskError(message, kind=kind)
            try:
                await self._answer(_context.results.result, outcome, error, box, _context)
                answered = True
            finally:
                self._end_of_call(box, answered)

        async def cancel(self, task: Any, _context: Any, **kwargs: Any) -> None:
            try:
                name = check_rpc_text("task", str(task))
                if service.queue is not None and soon is not None:
                    soon(service.queue.cancel, name)  # NOTE: at once, before anything else of this connection
            except Exception as exc:
                _context.results.errorKind, _context.results.errorMessage = rpc_error_fields(exc, "cancel a task")

        async def tasks(self, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():
                    infos = await in_trio(service.tasks)
                answer_list(_context.results, "tasks", infos)
            except Exception as exc:
                answer_list(_context.results, "tasks", [], exc, "list tasks")

        async def peers(self, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():
                    infos = await in_trio(service.peers)
                answer_list(_context.results, "peers", infos)
            except Exception as exc:
                answer_list(_context.results, "peers", [], exc, "list peers")

        async def status(self, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():
                    record = await in_trio(service.status)
                record.to_capnp(_context.results.status)
            except Exception as exc:
                _context.results.errorKind, _context.results.errorMessage = rpc_error_fields(exc, "get status")

        async def kernels(self, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():  # NOTE: no hop into trio: nothing it reads changes
                    infos = service.kernels()
                answer_list(_context.results, "kernels", infos)
            except Exception as exc:
                answer_list(_context.results, "kernels", [], exc, "list kernels")

        async def connect(self, multiaddr: Any, _context: Any, **kwargs: Any) -> None:
            try:
                with service.call_slot():
                    info = await in_trio(service.connect, str(multiaddr))
                info.to_capnp(_context.results.peer)
            except Exception as exc:
                what = f"connect to {one_line(str(multiaddr), 200)!r}"
                kind, message = rpc_error_fields(exc, what)
                _context.results.errorKind = kind
                _context.results.errorMessage = (
                    message if message.startswith(f"cannot {what}") else f"cannot {what}: {message}"
                )

    login_limiter = limiter or LoginLimiter(
        RPC_LOGIN_DELAY_BASE_S, RPC_LOGIN_DELAY_MAX_S, RPC_LOGIN_FORGET_S, RPC_LOGIN_REPORT_S, RPC_LOGIN_MAX_SOURCES
    )

    class GateImpl(schema.Gate.Server):
        def __init__(self, conn: _RpcConnection) -> None:
            self.conn = conn

        async def login(self, token: Any, _context: Any, **kwargs: Any) -> None:
            async with self.conn.login_lock:  # NOTE: pipelined logins on one connection wait their turn
                await self._login(token, _context)

        async def _login(self, token: Any, _context: Any) -> None:
            # NOTE: constant-time comparison, so response time does not leak the token
            try:
                given = str(token).encode()
            except Exception as exc:  # NOTE: never an exception (and its traceback) to an outsider
                _context.results.error = rpc_error_fields(exc, "log in")[1]
                return
            # NOTE: a node started with --rpc-open has no token and lets any login in (a client
            # that found this user's home token sends it anyway)
            if token_expected and not hmac.compare_digest(given, token_expected):
                delay_s, count = login_limiter.refused(self.conn.source, time.monotonic())
                if count:
                    log.warning(
                        "RPC login refused: wrong or missing token, %d time(s) from %s since the last such line",
                        count,
                        self.conn.source,
                    )
                await asyncio.sleep(delay_s)
                _context.results.error = "login refused: wrong or missing RPC token"
                return
            self.conn.logged_in()
            _context.results.compute = ComputeImpl(self.conn)
            _context.results.maxMessageBytes = max_bytes
            _context.results.memoryBudgetBytes = service.node.budget.limit_bytes
            _context.results.tlsBulk = isinstance(bulk, TlsBulkBatches)

    token_expected = token.encode()
    return GateImpl


###############################################################################
# 21. Dashboard
#
# `serve --dashboard [HOST:PORT]`: one page that shows what the node and its peers
# are doing, updating live: the peers (address, speed, RTT, load, data plane or
# stream, suspect or not), the queue and the running tasks (kernel, where,
# attempts, timings), the recent tasks with their outcome, the throughput each
# way over the last minutes, and the shares of split jobs. The page carries its
# style and script inline (the pyz holds everything; nothing is fetched from
# elsewhere) and polls /api/snapshot once a second. The snapshot is made of the
# records `status` and `peers` answer over RPC, the manager's TaskBoard and the
# scheduler's worker figures: one source for the page, `call status` and the
# metrics. HTTP/1.1 by h11 (sans-I/O) on trio: GET and HEAD only, a request head
# of at most DASHBOARD_MAX_HEAD_BYTES, DASHBOARD_MAX_CONNECTIONS at once, each
# closed after DASHBOARD_IDLE_S without a request. On loopback it answers anyone
# on the box (read-only figures); off loopback it speaks TLS 1.3 with a certificate
# of its own (ECDSA P-256, kept in the home: browsers take no Ed25519 certificate,
# the RPC's kind) and answers only requests that carry the RPC token (a cookie set
# by opening /?token=TOKEN once, or `Authorization: Bearer TOKEN`); a wrong token
# waits as a refused RPC login does.
###############################################################################

DEFAULT_DASHBOARD_PORT = 7781  # next to the RPC's 7780
DASHBOARD_MAX_CONNECTIONS = 16  # a page polls on one or two; more is a stuck or hostile client
DASHBOARD_IDLE_S = 30.0  # a connection with no request for this long is closed
DASHBOARD_HANDSHAKE_S = 10.0  # a TLS handshake must end within this
DASHBOARD_MAX_HEAD_BYTES = 8 << 10  # a request line and headers; a page's are well under 1 KiB
DASHBOARD_SAMPLE_S = 1.0  # the throughput is sampled this often
DASHBOARD_HISTORY = 300  # samples kept: five minutes of throughput
DASHBOARD_COOKIE = "pangea_token"


@dataclass
class RateHistory:
    """Pure: the node's byte counters sampled over time, turned into rates each way (MB/s)."""

    limit: int = DASHBOARD_HISTORY
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)  # (wall time, bytes in, bytes out)

    def add(self, at: float, bytes_in: int, bytes_out: int) -> None:
        """One sample of the counters at wall time ``at``."""
        self.samples.append((at, bytes_in, bytes_out))
        while len(self.samples) > self.limit:
            self.samples.popleft()

    def rates(self) -> list[dict[str, float]]:
        """Per interval between two samples: its end time and MB/s received and sent."""
        out = []
        pairs = list(self.samples)
        for (t0, in0, out0), (t1, in1, out1) in zip(pairs, pairs[1:], strict=False):
            dt = max(t1 - t0, 1e-6)
            out.append({"at": t1, "in_mb_s": max(0, in1 - in0) / dt / 1e6, "out_mb_s": max(0, out1 - out0) / dt / 1e6})
        return out


def dashboard_peer(record: PeerRecord, state: Any, session: PeerSession | None = None) -> dict[str, Any]:
    """One peer as the page shows it: its `peers` record, the scheduler's figures of it, and what its
    array channel measured (the link's speed) and packed."""
    peer = record.as_dict()
    channel = (session.data or session.channel) if session is not None else None
    peer["link_mb_s"] = round(channel.link_bytes_s / 1e6, 3) if channel is not None else 0.0
    peer["packed_arrays"] = channel.packed_arrays if channel is not None else 0
    peer["packed_saved_bytes"] = channel.packed_saved_bytes if channel is not None else 0
    peer["address"] = record.addresses[0] if record.addresses else ""
    peer["gflops"] = round(state.speed, 3) if state is not None else 0.0
    peer["bandwidth_mb_s"] = round(state.bandwidth / 1e6, 3) if state is not None else 0.0
    peer["load"] = state.load if state is not None else 0
    peer["running_here"] = state.running if state is not None else 0
    return peer


async def dashboard_snapshot(service: NodeService, history: RateHistory) -> dict[str, Any]:
    """Everything the page shows, from the records `status` and `peers` answer and the task board."""
    status, peers = await service.status(), await service.peers()
    workers = service.manager.scheduler.workers
    return {
        "at": time.time(),
        "node": status.as_dict(),
        "peers": [dashboard_peer(p, workers.get(p.peer_id), service.node.sessions.get(p.peer_id)) for p in peers],
        "tasks": service.manager.board.snapshot(service.manager.clock()),
        "throughput": history.rates(),
    }


def dashboard_request_token(target: str, headers: Mapping[str, str]) -> tuple[str, bool]:
    """Pure: the token a request carries (query ``token``, bearer header or cookie), and whether it
    came in the query (the page then sets the cookie and drops it from the address)."""
    import urllib.parse

    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    if query.get("token"):
        return query["token"][0], True
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == DASHBOARD_COOKIE:
            return urllib.parse.unquote(value), False
    return "", False


@dataclass
class DashboardEndpoint:
    """Where `serve --dashboard` listens and what guards it off loopback."""

    host: str
    port: int
    token: str  # "" on loopback
    tls_pem: Path | None  # off loopback: its certificate and key (DASHBOARD_TLS_FILENAME)
    fingerprint: bytes


def dashboard_endpoint(text: str | None, rpc_token: str, home: Path) -> DashboardEndpoint | None:
    """The dashboard's endpoint from ``--dashboard`` (None: no dashboard): open on loopback; off it,
    the RPC's token and a TLS certificate of the home's (ConfigError when the RPC has no token)."""
    if not text:
        return None
    host, port = parse_host_port(text, DEFAULT_DASHBOARD_PORT)
    ensure_port_free(host, port, option="--dashboard HOST:PORT")
    if is_loopback_host(host):
        return DashboardEndpoint(host, port, "", None, b"")
    if not rpc_token:
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port} without a token: anyone who reaches that port would see"
            " this node's peers and tasks",
            hint="give the RPC a token (--rpc-token-file FILE), not --rpc-open, or keep the dashboard on 127.0.0.1",
        )
    pem, fingerprint = rpc_tls_identity(home, DASHBOARD_TLS_FILENAME)
    return DashboardEndpoint(host, port, rpc_token, pem, fingerprint)


class Dashboard:
    """The dashboard's HTTP server (see the section comment): `run` serves until cancelled."""

    def __init__(self, service: NodeService, endpoint: DashboardEndpoint) -> None:
        self.service, self.host, self.port = service, endpoint.host, endpoint.port
        self.local = is_loopback_host(endpoint.host)
        if not self.local and not (endpoint.token and endpoint.tls_pem):
            raise ValueError("a dashboard off loopback needs a token and a TLS certificate (dashboard_endpoint)")
        self.token, self.tls_pem = endpoint.token, endpoint.tls_pem
        self.history = RateHistory()
        self.connections = 0
        self.refused = 0  # connections over DASHBOARD_MAX_CONNECTIONS, and requests without the token
        self.limiter = LoginLimiter(
            RPC_LOGIN_DELAY_BASE_S, RPC_LOGIN_DELAY_MAX_S, RPC_LOGIN_FORGET_S, RPC_LOGIN_REPORT_S, RPC_LOGIN_MAX_SOURCES
        )
        self.url = ""

    async def run(self, task_status: Any) -> None:
        """Listen, report the page's address through ``task_status``, then serve and sample forever."""
        import trio

        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        port = listeners[0].socket.getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'http' if self.local else 'https'}://{host}:{port}/"
        tls = tls_server_context(str(self.tls_pem)) if self.tls_pem is not None and not self.local else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample)
            task_status.started(self.url)
            await trio.serve_listeners(functools.partial(self._connection, tls), listeners)

    async def _sample(self) -> None:
        import trio

        while True:
            self.history.add(time.time(), self.service.node.bytes_in, self.service.node.bytes_out)
            await trio.sleep(DASHBOARD_SAMPLE_S)

    async def _connection(self, tls: Any, stream: Any) -> None:
        import h11
        import trio

        if self.connections >= DASHBOARD_MAX_CONNECTIONS:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            source = stream.socket.getpeername()[0]
            if tls is not None:
                stream = trio.SSLStream(stream, tls, server_side=True)
                with trio.move_on_after(DASHBOARD_HANDSHAKE_S):
                    await stream.do_handshake()
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=DASHBOARD_MAX_HEAD_BYTES)
            while conn.our_state is not h11.CLOSED and conn.their_state is not h11.CLOSED:
                request = await self._next_request(conn, stream)
                if request is None:
                    break
                status, headers, body = await self._answer(request, source)
                await self._send(conn, stream, status, headers, body, request.method == b"HEAD")
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError) as exc:
            log.debug("dashboard: connection ended: %s", describe_exception(exc))
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _next_request(self, conn: Any, stream: Any) -> Any:
        """The next request's head (its body, if any, is read and dropped); None: the client left or idled."""
        import h11
        import trio

        request, body = None, 0
        with trio.move_on_after(DASHBOARD_IDLE_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(64 << 10))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > DASHBOARD_MAX_HEAD_BYTES:
                        raise h11.RemoteProtocolError("a request body on a read-only page", error_status_hint=413)
                elif isinstance(event, h11.EndOfMessage):
                    return request
                else:  # ConnectionClosed
                    return None
        return None

    async def _send(
        self, conn: Any, stream: Any, status: int, headers: list[tuple[str, str]], body: bytes, head: bool
    ) -> None:
        import h11

        headers = [
            *headers,
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            (
                "Content-Security-Policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
                " connect-src 'self'; img-src data:",
            ),
            ("Server", f"pangea/{__version__}"),
        ]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if not head and body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _answer(self, request: Any, source: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """The status, headers and body of the answer to one request."""
        import hmac
        import urllib.parse

        import trio

        method, target = request.method.decode(), request.target.decode("latin-1")
        path = urllib.parse.urlsplit(target).path
        text = [("Content-Type", "text/plain; charset=utf-8")]
        if method not in ("GET", "HEAD"):
            return 405, [*text, ("Allow", "GET, HEAD")], b"pangea: the dashboard only shows figures (GET)\n"
        if not self.local:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            given, in_query = dashboard_request_token(target, headers)
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                self.refused += 1
                delay_s, count = self.limiter.refused(source, time.monotonic())
                if count:
                    log.warning("dashboard: %d request(s) without the RPC token from %s", count, source)
                await trio.sleep(delay_s)
                return (
                    401,
                    text,
                    (
                        b"pangea: this dashboard needs the node's RPC token: open it once as "
                        b"https://HOST:PORT/?token=TOKEN (the token of the RPC's --rpc-token-file)\n"
                    ),
                )
            if in_query:  # remembered by the browser, and no longer in the address bar
                cookie = f"{DASHBOARD_COOKIE}={urllib.parse.quote(given)}; Secure; HttpOnly; SameSite=Strict; Path=/"
                return 303, [*text, ("Set-Cookie", cookie), ("Location", "/")], b""
        if path == "/":
            return 200, [("Content-Type", "text/html; charset=utf-8")], DASHBOARD_HTML.encode()
        if path == "/api/snapshot":
            snapshot = await dashboard_snapshot(self.service, self.history)
            return 200, [("Content-Type", "application/json")], json.dumps(snapshot).encode()
        return 404, text, f"pangea: no page {path[:100]!r} here: the dashboard is at /\n".encode()


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pangea</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .id{font-family:ui-monospace,monospace;opacity:.8}
main{padding:12px 18px;display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:10px 12px;overflow-x:auto}
section.wide{grid-column:1/-1}
h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#56607a}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f4;white-space:nowrap}
th{font-weight:600;color:#56607a}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,monospace}
.ok{color:#17803d}.bad{color:#b42318}.warn{color:#b54708}.dim{color:#8a93a6}
.cards{display:flex;gap:18px;flex-wrap:wrap}
.card b{display:block;font-size:20px;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#3b6fd8;border-radius:2px;vertical-align:middle}
svg{width:100%;height:140px}
#error{color:#b42318;padding:0 18px}
</style></head>
<body>
<header><h1>pangea</h1><span class="id" id="peer-id">connecting...</span><span id="version"></span>
<span id="uptime"></span><span id="updated" class="dim"></span></header>
<div id="error"></div>
<main>
<section><h2>This node</h2><div class="cards">
<div class="card">tasks done<b id="tasks-done">-</b></div>
<div class="card">failed<b id="tasks-failed">-</b></div>
<div class="card">in flight<b id="tasks-in-flight">-</b></div>
<div class="card">served for peers<b id="tasks-served">-</b></div>
<div class="card">received<b id="bytes-in">-</b></div>
<div class="card">sent<b id="bytes-out">-</b></div>
<div class="card">memory budget<b id="budget">-</b></div>
<div class="card">task queue<b id="queue">-</b></div>
</div></section>
<section><h2>Throughput (MB/s)</h2><svg id="chart" viewBox="0 0 600 140" preserveAspectRatio="none"></svg>
<div><span style="color:#3b6fd8">&#9632; received</span> <span id="rate-in"></span> &nbsp;
<span style="color:#e07b00">&#9632; sent</span> <span id="rate-out"></span></div></section>
<section class="wide"><h2>Peers</h2><table><thead><tr><th>peer</th><th>address</th><th>GFLOP/s</th><th>RTT ms</th>
<th>load</th><th>link</th><th>link MB/s</th><th>packed</th><th>state</th><th>tasks</th></tr></thead>
<tbody id="peers"></tbody></table></section>
<section><h2>Queue and running tasks</h2><table><thead><tr><th>#</th><th>kernel</th><th>state</th><th>where</th>
<th>attempts</th><th>queued s</th><th>s</th></tr></thead><tbody id="running"></tbody></table></section>
<section><h2>Split jobs</h2><div id="splits" class="dim">none yet</div></section>
<section><h2>Recent tasks</h2><table><thead><tr><th>#</th><th>kernel</th><th>outcome</th><th>where</th>
<th>attempts</th><th>queued s</th><th>s</th></tr></thead><tbody id="recent"></tbody></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const short = (id) => !id ? "" : id === "local" || id === "split" ? id : id.slice(0, 8) + "\\u2026" + id.slice(-4);
function mb(n) {  // as format_bytes, and as `call status` says it: 1024-based units
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(1) + " " + units[i] : n.toFixed(0) + " B";
}
const count = (n, one) => `${n} ${one}${n === 1 ? "" : "s"}`;
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function fill(body, items, render) {
  body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
}
function taskRow(row, t) {
  row.dataset.task = t.task_id;
  cell(row, t.task_id, "n"); cell(row, t.kernel, "mono");
  cell(row, t.state, t.state === "ok" ? "ok" : t.state === "running" || t.state === "queued" ? "" : "bad");
  cell(row, t.rows ? "split" : short(t.where) || t.placement, "mono"); cell(row, t.attempts, "n");
  cell(row, t.queued_s.toFixed(3), "n"); cell(row, t.seconds.toFixed(3), "n");
}
function chart(points) {
  const svg = $("chart"); svg.replaceChildren();
  if (points.length < 2) return;
  const top = Math.max(1, ...points.map((p) => Math.max(p.in_mb_s, p.out_mb_s)));
  const t0 = points[0].at, span = Math.max(1, points[points.length - 1].at - t0);
  for (const [key, color] of [["in_mb_s", "#3b6fd8"], ["out_mb_s", "#e07b00"]]) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    const xy = (p) => `${(600 * (p.at - t0)) / span},${138 - (130 * p[key]) / top}`;
    line.setAttribute("points", points.map(xy).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2");
    svg.appendChild(line);
  }
  const last = points[points.length - 1];
  $("rate-in").textContent = last.in_mb_s.toFixed(1); $("rate-out").textContent = last.out_mb_s.toFixed(1);
}
function splits(tasks) {
  const jobs = [...tasks.running, ...tasks.recent].filter((t) => t.rows > 0).slice(0, 3);
  const box = $("splits"); box.replaceChildren();
  if (!jobs.length) { box.textContent = "none yet"; return; }
  box.className = "";
  for (const job of jobs) {
    const title = document.createElement("div");
    title.textContent = `#${job.task_id} ${job.kernel}: ${job.rows} rows, ${job.state}, ${job.seconds.toFixed(2)} s`;
    box.appendChild(title);
    const table = document.createElement("table"); box.appendChild(table);
    for (const [worker, share] of Object.entries(job.shares)) {
      const row = table.insertRow(); row.dataset.share = worker;
      cell(row, short(worker), "mono"); cell(row, `${share.rows} rows in ${share.blocks} blocks`, "n");
      const bar = document.createElement("span"); bar.className = "bar";
      bar.style.width = `${(200 * share.rows) / job.rows}px`; row.insertCell().appendChild(bar);
    }
  }
}
function render(s) {
  const n = s.node;
  $("peer-id").textContent = n.peer_id; $("version").textContent = "pangea " + n.version;
  $("uptime").textContent = "up " + Math.round(n.uptime_s) + " s";
  $("updated").textContent = "updated " + new Date(s.at * 1000).toLocaleTimeString();
  $("tasks-done").textContent = n.tasks_done; $("tasks-failed").textContent = n.tasks_failed;
  $("tasks-in-flight").textContent = n.tasks_in_flight; $("tasks-served").textContent = n.tasks_served;
  $("bytes-in").textContent = mb(n.bytes_in); $("bytes-out").textContent = mb(n.bytes_out);
  $("budget").textContent = `${mb(n.memory_budget_used_bytes)} of ${mb(n.memory_budget_bytes)}`;
  $("queue").textContent = n.queue_journal ? `${count(n.queue_tasks, "task")}, ${n.queue_waiting} waiting; ` +
    `${mb(n.state_bytes)} of its ${mb(n.state_max_bytes)} quota` +
    (n.queue_refused ? `; ${n.queue_refused} refused` : "") : "no journal";
  fill($("peers"), s.peers, (row, p) => {
    row.dataset.peer = p.peer_id;
    cell(row, short(p.peer_id), "mono").title = p.peer_id; cell(row, p.address.split("/p2p/")[0], "mono");
    cell(row, p.gflops.toFixed(1), "n"); cell(row, p.rtt_ms.toFixed(2), "n"); cell(row, p.load, "n");
    cell(row, p.data_plane ? "data plane" : "stream");
    cell(row, p.link_mb_s ? p.link_mb_s.toFixed(1) : "-", "n");
    cell(row, p.packed_arrays ? `${p.packed_arrays} (${mb(p.packed_saved_bytes)} saved)` : "-", "n");
    const state = p.suspect ? "suspect" : p.trusted ? "trusted" : "untrusted";
    cell(row, state, p.suspect ? "bad" : p.trusted ? "ok" : "warn");
    cell(row, p.tasks_done, "n");
  });
  fill($("running"), s.tasks.running.filter((t) => !t.part_of || s.tasks.running.length < 40), taskRow);
  fill($("recent"), s.tasks.recent, taskRow);
  chart(s.throughput); splits(s.tasks);
}
async function poll() {
  try {
    const answer = await fetch("/api/snapshot", { credentials: "same-origin", cache: "no-store" });
    if (!answer.ok) throw new Error(await answer.text());
    render(await answer.json()); $("error").textContent = "";
  } catch (err) { $("error").textContent = "no answer from the node: " + err.message; }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""


###############################################################################
# 22. Remote arrays and futures
#
# `RemoteArray`: the Python face of an array a node holds for a `Client` (a
# `RemoteArray` capability of the schema). It has numpy's shape, dtype and
# operators, and numpy's functions dispatch to it (`__array_ufunc__`,
# `__array_function__`): each step is a task on the node whose result stays
# there, until `np.asarray(x)` or `x.get()` brings it back. Dropping the last
# reference releases it on the node. Errors are numpy's kind (ValueError for a
# shape mismatch, in numpy's words) as well as pangea's. Beside it, the other
# parts a `Client` hands out or stands on: `TaskFuture`, the answer of a call
# that has not arrived, and `_PinnedConnection`, the TLS pin of its connection.
###############################################################################

# numpy ufuncs (called as np.<name>(x, ...)) that run as the kernel of the same name, or another
UFUNC_KERNELS: dict[str, str] = {
    **{n: n for n in ("add", "subtract", "multiply", "divide", "power", "maximum", "minimum", "matmul")},
    **{n: n for n in ("exp", "log", "sqrt", "absolute", "sin", "cos", "tanh")},
    "true_divide": "divide",
    "absolute": "abs",
}
# numpy functions (np.sum(x), np.linalg.svd(x), np.fft.fft(x), ...) whose arguments bind by numpy's
# own signature: these take a sequence of arrays as their first argument, this one a text first
SEQUENCE_FUNCTIONS = ("concatenate", "stack")
FUNCTION_MODULES = ("numpy", "numpy.linalg", "numpy.fft")
FUNCTION_KERNEL_NAMES: dict[str, str] = {"inv": "inv", "absolute": "abs"}


def _matmul_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``a @ b`` for operands of these shapes; ValueError in numpy's words when they do
    not fit (raised before anything is sent)."""
    import numpy as np

    if not a or not b:
        raise ValueError("matmul: Input operand does not have enough dimensions")
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    if a2[-1] != b2[-2]:
        raise ValueError(
            f"matmul: Input operand 1 has a mismatch in its core dimension 0, with gufunc signature "
            f"(n?,k),(k,m?)->(n?,m?) (size {b2[-2]} is different from {a2[-1]})"
        )
    core = (a2[-2],) * (len(a) > 1) + (b2[-1],) * (len(b) > 1)
    try:
        batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    except ValueError:

        def text(shape: tuple[int, ...]) -> str:
            return "(" + ",".join(str(d) for d in shape) + ")"

        remapped = " ".join(
            f"{text(s)}->{text(s[:-2])[:-1]}{',' if len(s) > 2 else ''}newaxis,newaxis)" for s in (a, b)
        )
        raise ValueError(
            f"operands could not be broadcast together with remapped shapes [original->remapped]: {remapped}  "
            f"and requested shape {text(core)}"
        ) from None
    return batch + core


def _slice_params(key: Any, shape: tuple[int, ...]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The "slice" kernel's params for ``x[key]`` (ranges, with an int as a range of one), and the
    axes an int index drops; IndexError in numpy's words for what is not a range or an int."""
    import numpy as np

    keys = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in keys) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(k is Ellipsis for k in keys):
        at = next(i for i, k in enumerate(keys) if k is Ellipsis)
        keys = keys[:at] + (slice(None),) * (len(shape) - len(keys) + 1) + keys[at + 1 :]
    if len(keys) > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, but {len(keys)} were indexed")
    start, stop, step, dropped = [], [], [], []
    for axis, (k, n) in enumerate(zip(keys + (slice(None),) * (len(shape) - len(keys)), shape, strict=True)):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + n * (int(k) < 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of bounds for axis {axis} with size {n}")
            k = slice(i, i + 1, 1)
            dropped.append(axis)
        if not isinstance(k, slice):
            raise IndexError(
                f"a RemoteArray takes ranges and integers as indices, not {type(k).__name__}: "
                "get() it first for fancy or boolean indexing"
            )
        b, e, st = k.indices(n)
        start.append(b)
        stop.append(e)
        step.append(st)
    return {"start": tuple(start), "stop": tuple(stop), "step": tuple(step)}, tuple(dropped)


class RemoteArray:
    """An array a pangea node holds for a `Client` (see `Client.put`); operations on it run on the
    node and their results stay there.

    >>> x = node.array(a)                                # doctest: +SKIP
    >>> y = ((x @ x.T) + 1.0).sum(axis=0)                # each step a task; nothing comes back
    >>> np.asarray(y)                                    # now it does (or y.get())

    ``shape``, ``dtype``, ``ndim``, ``size``, ``nbytes`` are known here without a call. Operators
    ``+ - * / ** @``, unary ``-`` and ``abs``, ``.T``, `transpose`, `reshape`, indexing by ranges
    and integers, the reductions (`sum`, `mean`, ...) and numpy's functions on it (``np.exp(x)``,
    ``np.linalg.svd(x)``, ``np.concatenate([x, y])``) each run as a task on the node. A shape
    mismatch raises ValueError in numpy's words; what the node refuses raises `BadInputError`
    (a ValueError too). Dropping the last reference (or `release`) frees it on the node."""

    __array_priority__ = 100.0  # NOTE: numpy defers `ndarray + RemoteArray` to __radd__ here

    def __init__(self, client: Any, handle: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self._client = client
        self._handle = handle
        self.dtype = dtype
        self.shape = shape

    # ---- what is known here
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def holder(self) -> str:
        """Where its bytes are: "local" (the client's node) or the peer id of the worker holding it
        (a call to the node: `Client.where`)."""
        return str(self._client.where(self)["holder"])

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        where = self._client.address if self._handle else "released"
        return f"RemoteArray(shape={self.shape}, dtype={self.dtype}, on {where})"

    def stand_in(self) -> np.ndarray:
        """An array of this one's dtype and shape holding no memory (checks and output bounds)."""
        import numpy as np

        return np.broadcast_to(np.zeros((), self.dtype), self.shape)

    def _handle_for(self, client: Any) -> int:
        """This array's handle, for a task of ``client``; UsageError when it is another's or released."""
        if client is not self._client:
            raise UsageError(
                "this RemoteArray is held by another Client's node: get() it and pass the array, or put it here"
            )
        if not self._handle:
            raise UsageError("this RemoteArray was released: put the array again")
        return self._handle

    # ---- the bytes, and letting go
    def get(self) -> np.ndarray:
        """The array, brought back from the node."""
        return self._client.get(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.get()
        return a if dtype is None else a.astype(dtype)

    def __float__(self) -> float:
        return float(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __bool__(self) -> bool:
        return bool(self.get())

    def release(self) -> None:
        """Free the array on the node now (dropping the last reference does it too)."""
        handle, self._handle = self._handle, 0
        if handle:
            self._client._drop_handle(handle)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # NOTE: at interpreter exit the client may be gone
            self.release()

    # ---- steps on the node
    def _run(self, kernel: str, *operands: Any, **params: Any) -> Any:
        given = {k: v for k, v in params.items() if v is not None}
        return self._client.submit(kernel, *operands, keep=True, **given)

    def _binary(self, kernel: str, a: Any, b: Any) -> Any:
        import numpy as np

        shapes = [x.shape if isinstance(x, RemoteArray) else np.shape(x) for x in (a, b)]
        if kernel == "matmul":
            _matmul_shapes(tuple(shapes[0]), tuple(shapes[1]))
        else:
            np.broadcast_shapes(*shapes)  # NOTE: numpy's own ValueError, before anything is sent
        ops = [x if isinstance(x, RemoteArray) else np.asarray(x) for x in (a, b)]
        for i, x in enumerate(ops):
            if not isinstance(x, RemoteArray) and x.dtype.kind in "biu" and x.ndim == 0 and self.dtype.kind in "fc":
                ops[i] = x.astype(self.dtype)  # NOTE: a Python scalar takes the array's dtype, as in numpy
            elif not isinstance(x, RemoteArray) and x.ndim == 0 and x.dtype.kind == "f" and self.dtype.kind == "f":
                ops[i] = x.astype(self.dtype)
        return self._run(kernel, *ops)

    def __add__(self, other: Any) -> Any:
        return self._binary("add", self, other)

    def __radd__(self, other: Any) -> Any:
        return self._binary("add", other, self)

    def __sub__(self, other: Any) -> Any:
        return self._binary("subtract", self, other)

    def __rsub__(self, other: Any) -> Any:
        return self._binary("subtract", other, self)

    def __mul__(self, other: Any) -> Any:
        return self._binary("multiply", self, other)

    def __rmul__(self, other: Any) -> Any:
        return self._binary("multiply", other, self)

    def __truediv__(self, other: Any) -> Any:
        return self._binary("divide", self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return self._binary("divide", other, self)

    def __pow__(self, other: Any) -> Any:
        return self._binary("power", self, other)

    def __rpow__(self, other: Any) -> Any:
        return self._binary("power", other, self)

    def __matmul__(self, other: Any) -> Any:
        return self._binary("matmul", self, other)

    def __rmatmul__(self, other: Any) -> Any:
        return self._binary("matmul", other, self)

    def __neg__(self) -> Any:
        return self._binary("multiply", self, -1)

    def __abs__(self) -> Any:
        return self._run("abs", self)

    @property
    def T(self) -> Any:  # noqa: N802 (numpy's name)
        return self.transpose()

    def transpose(self, *axes: Any) -> Any:
        """The transpose on the node (``axes`` as numpy's: none reverses them)."""
        order = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return self._run("transpose", self, axes=tuple(int(a) for a in order) if order else None)

    def reshape(self, *shape: Any) -> Any:
        """The array in another shape, on the node (one -1 allowed, as in numpy)."""
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._run("reshape", self, shape=tuple(int(d) for d in dims))

    def __getitem__(self, key: Any) -> Any:
        params, dropped = _slice_params(key, self.shape)
        part = self._run("slice", self, **params)
        if not dropped:
            return part
        return part.reshape(tuple(d for i, d in enumerate(part.shape) if i not in dropped))

    def _reduce(self, kernel: str, axis: Any, keepdims: bool, **extra: Any) -> Any:
        if isinstance(axis, (list, tuple)):
            axis = tuple(int(a) for a in axis)
        return self._run(kernel, self, axis=axis, keepdims=bool(keepdims) or None, **extra)

    def sum(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("sum", axis, keepdims)

    def prod(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("prod", axis, keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("mean", axis, keepdims)

    def std(self, axis: Any = None, ddof: int = 0, keepdims: bool = False) -> Any:
        return self._reduce("std", axis, keepdims, ddof=ddof or None)

    def var(self, axis: Any = None, ddof: int = 0, keepdims: bool = False) -> Any:
        return self._reduce("var", axis, keepdims, ddof=ddof or None)

    def min(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("min", axis, keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("max", axis, keepdims)

    def argmin(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("argmin", axis, keepdims)

    def argmax(self, axis: Any = None, keepdims: bool = False) -> Any:
        return self._reduce("argmax", axis, keepdims)

    def cumsum(self, axis: Any = None) -> Any:
        return self._run("cumsum", self, axis=axis)

    # ---- numpy's protocols: np.exp(x), np.linalg.svd(x), ...
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        kernel = UFUNC_KERNELS.get(ufunc.__name__)
        if method != "__call__" or kernel is None or kwargs:
            return NotImplemented  # NOTE: numpy then says the operation is not supported for RemoteArray
        if len(inputs) == 2:
            return self._binary(kernel, *inputs)
        return self._run(kernel, *inputs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if getattr(func, "__module__", "") not in FUNCTION_MODULES:
            return NotImplemented
        return _function_call(self._client, func, args, kwargs)


def _function_call(client: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """Run a numpy function called on remote arrays as the kernel of its name: its arrays become
    the operands and its other arguments, bound by numpy's own signature, the params."""
    import inspect

    import numpy as np

    name = func.__name__
    kernel = FUNCTION_KERNEL_NAMES.get(name, name)
    if name == "einsum":
        subscripts, *arrays = args
        return client.submit("einsum", *arrays, keep=True, subscripts=str(subscripts), **kwargs)
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}() on a RemoteArray: {exc}") from None
    operands: list[Any] = []
    params: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if name in SEQUENCE_FUNCTIONS and not operands and isinstance(value, (list, tuple)):
            operands.extend(value)
        elif isinstance(value, (RemoteArray, np.ndarray)):
            operands.append(value)
        elif value is not None and key not in ("out", "dtype", "order", "casting", "subok", "where", "initial"):
            if isinstance(value, bool):
                value = float(value)
            params[key] = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else value
    if not any(isinstance(o, RemoteArray) for o in operands):
        return NotImplemented
    return client.submit(kernel, *operands, keep=True, **params)


class _PinnedConnection:
    """The client's side of a TLS RPC connection: it compares the server's certificate with the
    pin (``expected``; None: trust on first use) before pycapnp's protocol sees a byte."""

    def __init__(self, expected: bytes | None) -> None:
        self.expected = expected
        self.inner: Any = None  # pycapnp's protocol
        self.presented = b""
        self.refused = False

    def connection_made(self, transport: Any) -> None:
        import hashlib
        import hmac

        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
        self.presented = hashlib.sha256(der).digest()
        if self.expected is not None and not hmac.compare_digest(self.presented, self.expected):
            self.refused = True
            transport.abort()
            return
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.refused:
            self.inner.connection_lost(exc)


@functools.cache
def _pinned_connection_class() -> type[_PinnedConnection]:
    """_PinnedConnection as an asyncio.BufferedProtocol."""
    import asyncio

    return type("PinnedConnection", (_PinnedConnection, asyncio.BufferedProtocol), {})


class TaskFuture(concurrent.futures.Future):
    """The answer of one call of a `Client` that has not arrived yet (`Client.future`, `Client.map`).

    A concurrent.futures.Future: ``result(timeout)``, ``done()``, ``add_done_callback``,
    ``concurrent.futures.wait`` and ``as_completed`` work as with an executor's. ``task``
    describes the task once it is done (what `Client.last_task` gives for a blocking call).
    ``cancel()`` works until the answer arrives, and cancels the task on the node (and its
    worker's). NOTE: done callbacks run on the Client's loop thread: they must not wait for
    another call of the Client (start one with `Client.future` instead)."""

    def __init__(self, cancel_call: Callable[[TaskFuture], None] | None = None) -> None:
        super().__init__()
        self.task: dict[str, Any] = {}
        self.key = ""  # the task's key on the node (its queue finds the task by it after a reconnect)
        self.task_id = ""  # the node's id of the task, once answered
        self.submits = False  # it submits a task (which it submits again should the node have lost it)
        self._cancel_call = cancel_call
        self._call_task: Any = None  # its asyncio task, set on the loop thread

    def cancel(self) -> bool:
        """Cancel the call unless its answer arrived; return whether it was cancelled."""
        again = self.cancelled()
        if not super().cancel():
            return False
        if self._cancel_call is not None and not again:
            self._cancel_call(self)
        return True


def _task_answer(future: TaskFuture, record: TaskOutputRecord, kernel: str, started: float, what: str) -> Any:
    """A task's output (a tuple for several) as its future's result, ``future.task`` filled; its TaskError."""
    task = {"kernel": kernel} | record.as_dict()
    task["timings"] = client_timings(task["timings"], time.perf_counter() - started)
    future.task, future.task_id = task, record.task_id
    if record.error_kind:
        raise task_error(record.error_message, record.error_kind)
    if not record.outputs:
        raise RpcError(f"cannot {what}: the node returned no output")
    return record.outputs[0] if len(record.outputs) == 1 else tuple(record.outputs)


def _raise_rpc_error(response: Any, what: str) -> None:
    """Raise RpcError when an RPC response carries an error (errorKind/errorMessage)."""
    kind = str(getattr(response, "errorKind", ""))
    if kind:
        message = one_line(str(response.errorMessage)) or kind
        raise RpcError(message if message.startswith("cannot ") else f"cannot {what}: {message}", kind=kind)


class _ClientConnection:
    """The connection of a `Client` to its node: open it (plain on loopback, TLS pinned off it), log in
    with the token, open the bulk channels, hold it until close, and open it again when it broke (the
    node restarted). The `Client` is its one subclass; the calls live there."""

    # NOTE: set in the Client's __init__
    address: str
    host: str
    port: int
    tls: bool
    max_message_bytes: int
    node_max_message_bytes: int
    node_memory_budget_bytes: int
    fingerprint: str
    shared_memory_note: str
    tls_bulk_note: str
    _token: str
    _pin: bytes | None
    _pin_source: str
    _presented: bytes
    _ready: threading.Event
    _error: BaseException | None
    _loop: Any
    _stopped: Any
    _compute: Any
    _bulk: _BulkChannel | None
    _tls_bulk: _TlsBulkPool | None
    _handles: dict[int, Any]
    _drop_segments: Callable[[], None]
    # the connection now: its Cap'n Proto client, how many times it was opened, and whether it broke
    _capnp_client: Any = None
    _generation: int = 0
    _broken: bool = False
    _reconnecting: Any = None  # an asyncio.Lock: one reconnection at a time
    _cancels: set[Any]  # `cancel` calls on their way to the node

    def _thread_main(self) -> None:
        import asyncio

        try:
            asyncio.run(self._run_connection())
        except Exception as exc:
            if self._error is None:
                self._error = RpcError(f"cannot reach the pangea node at {self.address}: {describe_exception(exc)}")
        finally:
            self._ready.set()

    async def _run_connection(self) -> None:
        """Connect and log in, then hold the connection until close() (runs on the client's thread)."""
        import asyncio

        import capnp

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._reconnecting = asyncio.Lock()
        async with capnp.kj_loop():  # type: ignore[attr-defined]
            self._error = await self._connect()
            if self._error is not None:
                return
            self._ready.set()
            try:
                await self._stopped.wait()
                if self._cancels:  # NOTE: a Ctrl-C's cancels reach the node before the connection closes
                    await asyncio.wait(list(self._cancels), timeout=CLIENT_CANCEL_FLUSH_S)
            finally:
                self._handles.clear()  # NOTE: on this loop, while it runs: the node releases their arrays
                if self._bulk is not None:
                    self._bulk.close()
                if self._tls_bulk is not None:
                    self._tls_bulk.close()

    async def _connect(self) -> RpcError | None:
        """Open the connection and log in (on the loop thread); return why it failed (None: it did not)."""
        import asyncio

        import capnp

        token_hint = (
            "run this as the node's user with its PANGEA_HOME (a node on this box keeps its token in its home's "
            f"{RPC_TOKEN_FILENAME} file), or pass the token: --token-file FILE, Client(token=...) or $PANGEA_RPC_TOKEN"
        )
        waited_s = 10.0 + RPC_TLS_HANDSHAKE_TIMEOUT_S
        try:
            stream = await asyncio.wait_for(self._open_stream(), waited_s)
        except (TimeoutError, OSError) as exc:
            import ssl

            return RpcError(
                f"cannot reach the pangea node at {self.address}: "
                + (describe_tls_error(exc) if isinstance(exc, ssl.SSLError) else connect_error_text(exc, waited_s)),
                hint="start one with `./pangea.pyz serve`, or pass its address with --rpc HOST:PORT",
            )
        except RpcError as exc:
            return exc
        client = capnp.TwoPartyClient(stream, traversal_limit_in_words=rpc_words(self.max_message_bytes))  # type: ignore[attr-defined]
        gate = client.bootstrap().cast_as(load_schema().Gate)
        try:
            login = await gate.login(self._token)
            if str(login.error):
                return RpcError(f"cannot use the pangea node at {self.address}: {login.error}", hint=token_hint)
            self._capnp_client, self._compute = client, login.compute
            self._generation += 1
            self._broken = False
            self.node_max_message_bytes = int(login.maxMessageBytes) or self.max_message_bytes
            self.node_memory_budget_bytes = int(login.memoryBudgetBytes)
            self._open_bulk()
            self._open_tls_bulk(bool(login.tlsBulk))
        except capnp.KjException as exc:  # type: ignore[attr-defined]
            reason, hint = remote_error_text(exc), token_hint
            if "disconnected" in str(exc).lower() and "remote exception" not in str(exc):
                reason = "it closed the connection before answering the login"
                if not self.tls:
                    hint = (
                        "a node serving RPC off loopback speaks TLS: pass the fingerprint `serve` printed "
                        "(call --fingerprint, Client(fingerprint=...)); else see the node's log"
                    )
            return RpcError(f"cannot use the pangea node at {self.address}: {reason}", hint=hint)
        return None

    async def _reconnect(self, generation: int, deadline: float) -> bool:
        """Open the connection again after it broke (the node restarted, the network came back), trying
        every second until ``deadline`` (time.monotonic()); return whether it is open. ``generation``:
        the connection the caller saw break (a newer one is open already: nothing to do)."""
        import asyncio

        async with self._reconnecting:
            while self._generation == generation and not self._stopped.is_set():
                self._handles.clear()  # NOTE: the node released them with the old connection
                for channel in (self._bulk, self._tls_bulk):
                    if channel is not None:
                        channel.close()
                if self._bulk is not None:
                    self._bulk, self.shared_memory_note = None, ""
                if self._tls_bulk is not None:
                    self._tls_bulk, self.tls_bulk_note = None, ""
                error = await self._connect()
                if error is None:
                    log.info("Client: connected to %s again", self.address)
                    return True
                if time.monotonic() + 1.0 > deadline:
                    return False
                await asyncio.sleep(1.0)
        return self._generation != generation

    def _open_bulk(self) -> None:
        """Open the node's bulk channel when this client may use one (on the loop thread); else say why not."""
        if self.shared_memory_note:
            return
        path = local_node_bulk_socket(self.port)
        if not path:
            self.shared_memory_note = "off: no node of this home announced a bulk socket for this port"
            self._drop_segments()
            return
        try:
            self._bulk = _BulkChannel(path, self._token)
        except (OSError, RpcError) as exc:
            self.shared_memory_note = f"off: {describe_exception(exc)}"
            self._drop_segments()
            log.info("Client: arrays travel in RPC messages: %s", describe_exception(exc))
            return
        self._bulk.attach(self._loop)
        self.shared_memory_note = f"on: {path}"

    def _open_tls_bulk(self, offered: bool) -> None:
        """Prepare the bulk connections over TLS when the node offers them (opened on first use)."""
        if self.tls_bulk_note:
            return
        if not offered:
            self.tls_bulk_note = "off: the node does not offer a bulk channel over TLS"
            return
        self._tls_bulk = _TlsBulkPool(self.host, self.port, self._presented, self._token)
        self.tls_bulk_note = f"on: {self.address}, pinned to {format_fingerprint(self._presented)}"

    @property
    def tls_bulk(self) -> bool:
        """Whether this client's large arrays travel on bulk connections over TLS (`tls_bulk_note` says why not)."""
        return self._tls_bulk is not None

    @property
    def shared_memory(self) -> bool:
        """Whether this client's arrays travel in shared memory (`shared_memory_note` says why not)."""
        return self._bulk is not None and not self._bulk.broken

    async def _open_stream(self) -> Any:
        """Connect: plain on loopback, else TLS 1.3 with the server's certificate checked against
        the pin (or trusted on first use) before a byte of Cap'n Proto, or the token, is sent."""
        import asyncio

        import capnp

        if not self.tls:
            return await capnp.AsyncIoStream.create_connection(self.host, self.port)  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        opened = loop.create_future()

        def on_stream(stream: Any) -> None:  # NOTE: not async: pycapnp closes the stream when a task it ran ends
            opened.set_result(stream)

        pinned = _pinned_connection_class()(self._pin)
        pinned.inner = capnp.AsyncIoStream._connect(on_stream)  # type: ignore[attr-defined]
        await loop.create_connection(  # type: ignore[type-var]
            lambda: pinned,
            self.host,
            self.port,
            ssl=tls_client_context(),
            server_hostname="",
            ssl_handshake_timeout=RPC_TLS_HANDSHAKE_TIMEOUT_S,
        )
        presented = format_fingerprint(pinned.presented)
        self._presented = pinned.presented
        if pinned.refused and self._pin_source == "known":
            raise RpcError(
                f"cannot use the pangea node at {self.address}: its certificate changed: it presented {presented}, "
                f"trusted until now {self.fingerprint} (in {home_path() / KNOWN_NODES_FILENAME})",
                hint="if that node's home was set up again, delete its line from that file; otherwise something "
                "between you and the node may be intercepting: do not send it your token",
            )
        if pinned.refused:
            raise RpcError(
                f"cannot use the pangea node at {self.address}: it presented certificate {presented}, "
                f"not the fingerprint {self.fingerprint}",
                hint="check the fingerprint `serve` printed; another one means another program answers there",
            )
        if self._pin is None:
            import warnings

            kept = remember_fingerprint(self.address, pinned.presented)
            self.fingerprint = presented
            warnings.warn(
                f"pangea: first connection to {self.address}: trusting its certificate {presented} from now on "
                f"(kept in {kept}); compare it with the fingerprint `serve` printed",
                stacklevel=2,
            )
        return await opened


###############################################################################
# 23. The Python client
#
# `Client`: a client of a node's RPC endpoint for Python programs, numpy arrays
# in and out. Its asyncio/KJ loop runs in one long-lived private thread: every
# call of every calling thread is a task on that loop, handed over with one
# call_soon_threadsafe and answered through a `TaskFuture` (a
# concurrent.futures.Future), so callers never start threads and share no lock
# across a call. `submit` waits for its future; `future` and `map` return
# before the answer. Cancelling a future cancels its asyncio task, which drops
# pycapnp's promise: Cap'n Proto sends Finish, the node cancels the call's trio
# task and its remote attempts send Cancel. On loopback it speaks plain Cap'n
# Proto with this user's home token; off loopback TLS 1.3, the server's
# certificate checked against a pinned or first-use fingerprint
# (`_PinnedConnection`) before the token is sent.
###############################################################################


class Client(_ClientConnection):
    """A client of a pangea node's RPC endpoint, for any number of threads.

    >>> with pangea.Client("127.0.0.1:7780") as node:      # doctest: +SKIP
    ...     c = node.matmul(a, b, placement="remote")
    ...     f = node.future("matmul", a, b)                 # returns at once: a TaskFuture
    ...     sums = list(node.map("sum", [(x,) for x in xs]))  # in order, a bounded number in flight

    numpy arrays in, numpy arrays out; a failed task raises TaskError with the
    node's error text, and an operand of a dtype pangea does not take (float16,
    bool, unsigned, ...) is refused before sending, its message naming the cast
    to make. `kernels()` lists what the node runs. `last_task` describes the most
    recent task of the calling thread (each thread sees its own; a future's own is
    its ``task``): its ``kernel``, where it ran (``ran_on``), its ``attempts``,
    ``verified_by_node`` (the node checked a remote worker's result) and its timings in seconds: the
    node's ``queue_s``, ``transfer_s`` (between nodes), ``compute_s`` and
    ``total_s``, then ``client_total_s``, the wall time measured here around the
    call, and ``rpc_s``, the client-to-node hop (``client_total_s - total_s``:
    the arrays crossing the RPC connection, built and read at both ends), and
    ``arrays_via``: how the arrays crossed ("shared memory, result: shared memory",
    or "RPC messages"). The asyncio/KJ loop runs in a private thread.

    Shared memory: a client of a plain loopback endpoint whose node runs from this
    user's pangea home (its session file names the node's bulk socket) passes the
    operands and the result in sealed memfd segments, handed over that 0600 Unix
    socket; the RPC carries only their metadata, the node's kernels read the operands
    in place, and the result is an array over the segment the node wrote. A task whose
    operands and result together are under ``bulk_min_bytes`` (default 64 KiB;
    0: every task) travels in the message anyway, unless an operand already lives in
    a segment: for a few bytes, handing segments over costs more than it saves. Off
    loopback (see `tls_bulk`), with ``shared_memory=False`` or $PANGEA_NO_SHM=1, the
    arrays do not travel in shared memory; ``shared_memory`` says which,
    ``shared_memory_note`` why. Operands are copied into a segment before sending,
    except an array of `empty`, a result that came back in shared memory, and C-ordered
    views of either: those the node reads where they are. ``operands_copied`` counts
    the copies. As it connects, such a client prepares one operand segment of
    ``warm_mib`` MiB (default 64) and one result segment for as large a result, their
    pages touched in a background thread, so its first transfer of that size runs as
    fast as later ones; they hold 2 x ``warm_mib`` MiB until close (a prepared segment
    too small for the calls made is released at once); ``warm_mib=0`` prepares none.

    A node on another box (a TLS endpoint): large operands and results travel on bulk
    connections over TLS to the same port and certificate, logged in with the token;
    ``tls_bulk`` says whether, ``tls_bulk_note`` why not (``tls_bulk=False``: in the
    messages).

    Limits: operands in the message that exceed the node's RPC message limit (learned at
    login; it follows the node's --memory-budget-mib), and tasks that can never fit its
    memory budget (shared memory or not), are refused here, before a byte is sent. ``max_message_bytes`` bounds this
    client's own messages (default: the largest any node accepts).

    The node's durable queue: every task has a key (``key=``, or a random one), the node
    journals it, and a task whose connection broke is asked for again by its key once this
    client has connected again (the node restarted, the network came back). `enqueue` hands a
    task over without waiting, `result` and `attach` collect one by its key or id, from any
    Client, and `tasks` lists the queue.

    ``token``: default $PANGEA_RPC_TOKEN, else (for a node on this box) the token in
    this user's pangea home, which `serve` writes there. ``fingerprint``: the
    certificate fingerprint `serve` printed for a TLS endpoint (off loopback);
    without it, a TLS endpoint is trusted on first use and its fingerprint kept
    in the home: a later change is refused.
    """

    def __init__(
        self,
        address: str = f"127.0.0.1:{DEFAULT_RPC_PORT}",
        token: str | None = None,
        *,
        fingerprint: str | None = None,
        timeout_s: float = 600.0,
        max_message_bytes: int = RPC_MAX_MIB << 20,
        shared_memory: bool = True,
        bulk_min_bytes: int = BULK_MIN_BYTES,
        tls_bulk: bool = True,
        warm_mib: int = BULK_WARM_MIB,
    ) -> None:
        import asyncio

        if not (
            isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and 0 < timeout_s <= RPC_MAX_TIMEOUT_S
        ):
            raise UsageError(
                f"bad timeout_s {timeout_s!r}: expected seconds more than 0, at most {RPC_MAX_TIMEOUT_S:g}"
            )
        self.host, self.port = parse_host_port(address, DEFAULT_RPC_PORT)
        self.address = f"{self.host}:{self.port}"
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        if not isinstance(bulk_min_bytes, int) or bulk_min_bytes < 0:
            raise UsageError(f"bad bulk_min_bytes {bulk_min_bytes!r}: expected bytes, 0 or more")
        self.bulk_min_bytes = bulk_min_bytes
        self._local = threading.local()  # per calling thread: its last_task
        self.node_max_message_bytes = max_message_bytes  # learned at login
        self.node_memory_budget_bytes = 0  # learned at login (0: an older node did not say)
        local = is_loopback_host(self.host)
        if token is None:
            token = os.environ.get("PANGEA_RPC_TOKEN") or (local_rpc_token() if local else None) or ""
        self._token = token
        # TLS: pinned to the fingerprint given, to the one trusted before, or to the one a node
        # of this home announced; off loopback always (trusted on first use when nothing is known)
        self._pin: bytes | None = parse_fingerprint(fingerprint) if fingerprint else None
        self._pin_source = "given"
        if self._pin is None:
            self._pin, self._pin_source = known_fingerprint(self.address), "known"
        if self._pin is None and local:
            self._pin, self._pin_source = local_node_fingerprint(self.port), "local"
        self.tls = self._pin is not None or not local
        # The bulk channel: arrays in shared memory, for a plain loopback endpoint of a node of this home
        self._bulk: _BulkChannel | None = None
        self._tls_bulk: _TlsBulkPool | None = None  # a TLS endpoint's bulk connections
        self._presented = b""  # the SHA-256 of the certificate the TLS endpoint presented
        self.tls_bulk_note = "off: tls_bulk=False" if not tls_bulk else "" if self.tls else "off: not a TLS endpoint"
        self._pool = _SegmentPool()  # operands' segments
        self._out_pool = _SegmentPool("pangea-result")  # results' segments, back here when the caller drops its result
        self._warm_bytes = max(0, int(warm_mib)) << 20  # prepared ahead in each pool once shared memory is on
        # The segments under arrays the caller holds (results, `empty`): passed as operands in place
        self._shared: dict[int, _Segment] = {}
        self._shared_lock = threading.RLock()  # NOTE: re-entrant: a finalizer may run in a thread holding it
        self.operands_copied = 0  # operands copied into a segment to be sent (the others were already in one)
        # The capabilities of the arrays this client left on the node, by handle (touched on the loop
        # thread only: a pycapnp capability lives on its loop); a `RemoteArray` names one.
        self._handles: dict[int, Any] = {}
        self._handle_ids = iter(range(1, 1 << 62))
        self._cancels: set[Any] = set()
        self.shared_memory_note = (
            "off: shared_memory=False"
            if not shared_memory
            else f"off: {NO_SHM_ENV} is set"
            if os.environ.get(NO_SHM_ENV, "") not in ("", "0")
            else "off: the node is not on this box"
            if not local
            else "off: a TLS endpoint"
            if self.tls
            else ""
        )
        self.fingerprint = format_fingerprint(self._pin) if self._pin is not None else ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: Any = None
        self._compute: Any = None
        self._error: BaseException | None = None
        if not self.shared_memory_note and self._warm_bytes and local_node_bulk_socket(self.port):
            # NOTE: off the caller's path, while we connect: the first transfer finds them touched
            self._pool.prepare(self._warm_bytes, self._warm_bytes)
            # a result's segment is asked at the kernel's output bound: the result's own bytes
            self._out_pool.prepare(self._warm_bytes, self._warm_bytes)
        self._thread = threading.Thread(target=self._thread_main, name="pangea-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join(5)
            self._drop_segments()
            raise self._error

    def _drop_segments(self) -> None:
        """Close the segment pools (and what they prepared): this client will not use them."""
        self._pool.close()
        self._out_pool.close()

    @property
    def last_task(self) -> dict[str, Any]:
        """The calling thread's most recent task (see the class docstring); {} before its first."""
        return dict(getattr(self._local, "task", {}))

    @last_task.setter
    def last_task(self, task: dict[str, Any]) -> None:
        self._local.task = task

    def _start(
        self, coro_fn: Callable[[], Any], what: str, done: Callable[[TaskFuture, Any], Any] | None = None, key: str = ""
    ) -> TaskFuture:
        """Start ``coro_fn()`` on the client's loop; return its future at once (from any thread).

        ``done(future, value)`` turns the coroutine's value into the future's result (on the loop
        thread; it may raise, and may fill ``future.task``)."""
        if self._loop is None or self._compute is None or self._stopped.is_set():
            raise RpcError(f"cannot {what}: the client is closed")
        future = TaskFuture(self._cancel_soon)
        future.key = key
        try:
            self._loop.call_soon_threadsafe(self._launch, future, coro_fn, what, done)
        except RuntimeError:  # the loop closed meanwhile
            raise RpcError(f"cannot {what}: the client is closed") from None
        return future

    def _cancel_soon(self, future: TaskFuture) -> None:
        """Cancel a future's asyncio task (from any thread): pycapnp drops the call, and (a task of the
        node's queue) a `cancel` of its key tells the node the client gave up on it, so it stops it."""

        def cancel() -> None:
            import asyncio

            if future.key and future.submits and self._compute is not None and not self._broken:
                sent = asyncio.ensure_future(self._compute.cancel(future.key))
                self._cancels.add(sent)
                sent.add_done_callback(self._cancels.discard)
            if future._call_task is not None:
                future._call_task.cancel()

        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the connection, and its calls, are gone
                self._loop.call_soon_threadsafe(cancel)

    def _launch(
        self, future: TaskFuture, coro_fn: Callable[[], Any], what: str, done: Callable[[TaskFuture, Any], Any] | None
    ) -> None:
        """Start the call's asyncio task unless it was cancelled already (on the loop thread)."""
        import asyncio

        if not future.cancelled():
            future._call_task = asyncio.ensure_future(self._settle(future, coro_fn, what, done))

    async def _settle(
        self, future: TaskFuture, coro_fn: Callable[[], Any], what: str, done: Callable[[TaskFuture, Any], Any] | None
    ) -> None:
        """Run one call and settle its future with the result or a pangea error (on the loop thread)."""
        import asyncio

        result: Any = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout_s + 30):
                result = await self._call_again(future, coro_fn, what, time.monotonic() + self.timeout_s + 30)
            if done is not None:
                result = done(future, result)
        except asyncio.CancelledError:  # cancelled by its future, or by close()
            if not future.cancelled() and future.set_running_or_notify_cancel():
                future.set_exception(RpcError(f"cannot {what}: the client was closed"))
            raise
        except Exception as exc:
            error = self._rpc_error(exc, what)
        if future.set_running_or_notify_cancel():  # NOTE: False when cancelled as the answer came
            future.set_result(result) if error is None else future.set_exception(error)

    async def _call_again(self, future: TaskFuture, coro_fn: Callable[[], Any], what: str, deadline: float) -> Any:
        """Run one call; when the connection broke (the node restarted, the network went), open it again.
        A task with a key is then asked for by its key, as the node's queue kept it: its answer, or,
        when the node never journaled it, the task submitted again (on the loop thread)."""
        import capnp

        def broke(exc: Exception) -> bool:
            text = str(exc).lower()
            return isinstance(exc, capnp.KjException) and "disconnected" in text and "remote exception" not in text  # type: ignore[attr-defined]

        generation = self._generation
        if self._broken:  # NOTE: a new call tries once: a node that is down is said at once
            if not await self._reconnect(generation, time.monotonic()):
                raise RpcError(
                    f"cannot {what}: the node at {self.address} closed the connection and does not answer (stopped?)",
                    hint="start it again: this Client connects again by itself on its next call",
                )
            generation = self._generation
        try:
            return await coro_fn()
        except Exception as exc:
            if not broke(exc):
                raise
            if self._stopped.is_set():
                raise RpcError(f"cannot {what}: the client was closed") from None
            self._broken = True
            if not future.key:
                raise
        while True:
            if not await self._reconnect(generation, deadline):
                raise RpcError(
                    f"cannot get task {future.key!r}: the connection to {self.address} broke and did not come back",
                    hint=f"once the node runs again, ask for it: Client.result({future.key!r})",
                )
            generation = self._generation
            try:
                record = await self._result_call(future.key, max(1.0, deadline - time.monotonic() - 30))
            except Exception as exc:
                if not broke(exc):
                    raise
                self._broken = True
                continue
            if record.error_kind == ErrorKind.NOT_FOUND and future.submits:
                log.info("Client: the node has no task %s: submitting it again", future.key)
                return await coro_fn()
            return record

    async def _result_call(self, task: str, timeout_s: float) -> TaskOutputRecord:
        """Ask the node's queue for a task's answer by its id or key (on the loop thread)."""
        request = self._compute.result_request()
        request.task, request.timeoutSeconds = task, min(timeout_s, RPC_MAX_TIMEOUT_S)
        return TaskOutputRecord.from_capnp((await request.send()).result)

    def _rpc_error(self, exc: Exception, what: str) -> Exception:
        """The pangea error of a call that raised ``exc`` (pangea's own errors as they are)."""
        import capnp

        if isinstance(exc, PangeaError):
            return exc
        if isinstance(exc, TimeoutError):
            return RpcError(f"cannot {what}: no answer from {self.address} within {format_seconds(self.timeout_s)}")
        if isinstance(exc, capnp.KjException):  # type: ignore[attr-defined]
            if "disconnected" in str(exc).lower() and "remote exception" not in str(exc):
                return RpcError(f"cannot {what}: the node at {self.address} closed the connection (stopped?)")
            if getattr(exc, "type", "") == "UNIMPLEMENTED":  # a method the node's schema does not have yet
                return RpcError(
                    f"cannot {what}: the node at {self.address} runs an older pangea without this call",
                    kind=ErrorKind.INCOMPATIBLE,
                    hint="run the same pangea.pyz on the node as here",
                )
            return RpcError(f"cannot {what}: {remote_error_text(exc)}")
        return exc

    def _wait(self, future: TaskFuture, what: str) -> Any:
        """The result of a call started by this thread; Ctrl-C (or any interruption) cancels it."""
        if threading.current_thread() is self._thread:
            future.cancel()
            raise RpcError(
                f"cannot {what}: called from a future's callback, which runs on the client's own thread",
                hint="start it with Client.future(...) instead of waiting for it there",
            )
        try:
            return future.result(self.timeout_s + 60)  # NOTE: the loop times the call out first
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RpcError(
                f"cannot {what}: no answer from {self.address} within {format_seconds(self.timeout_s)}"
            ) from None
        except concurrent.futures.CancelledError:
            raise RpcError(f"cannot {what}: it was cancelled") from None
        except PangeaError:
            raise
        except BaseException:  # Ctrl-C: the task is cancelled on the node too
            future.cancel()
            raise

    def _call(self, coro_fn: Callable[[], Any], what: str, done: Callable[[TaskFuture, Any], Any] | None = None) -> Any:
        """Run one call and wait for its result (the blocking methods; ``done`` as `_start`'s)."""
        return self._wait(self._start(coro_fn, what, done), what)

    def _check_operands(
        self,
        kernel: str,
        operands: Sequence[Any],
        params: Params,
        *,
        in_message: bool = True,
        held: Sequence[int] = (),
    ) -> list[np.ndarray]:
        """The operands as arrays, checked before anything is sent: dtypes, dimensions, and sizes
        against the node's RPC message limit and memory budget (learned at login). A `RemoteArray`
        (``held[i]`` its handle) stands in as an array of its dtype and shape holding no memory."""
        import numpy as np

        held = held or [0] * len(operands)
        arrays = [o.stand_in() if h else np.asarray(o) for o, h in zip(operands, held, strict=True)]
        for i, a in enumerate(arrays):
            if a.dtype.name not in ALLOWED_DTYPES:
                # NOTE: a uint64's cast depends on its values (int64 only when they fit)
                top = int(a.max()) if a.dtype.name == "uint64" and a.size else 0
                raise TaskError(refused_dtype_message(kernel, i, a.dtype.name, top), kind=ErrorKind.BAD_INPUT)
            if a.ndim > MAX_NDIM:
                raise TaskError(
                    f"cannot submit {kernel}: operand {i} is a {a.ndim}-d array; pangea takes arrays of at most "
                    f"{MAX_NDIM} dimensions: reshape it first",
                    kind=ErrorKind.BAD_INPUT,
                )
        refusal = client_size_refusal(
            kernel,
            arrays,
            params,
            self.max_message_bytes,
            self.node_max_message_bytes,
            self.node_memory_budget_bytes,
            in_message=in_message,
            held=held,
        )
        if refusal is not None:
            raise refusal
        return arrays

    def _message_refusal(
        self, kernel: str, arrays: Sequence[np.ndarray], held: Sequence[int] = ()
    ) -> PangeaError | None:
        """Why operands that were to go in shared memory cannot go in the message after all (None: they can)."""
        return client_size_refusal(
            kernel, arrays, {}, self.max_message_bytes, self.node_max_message_bytes, 0, in_message=True, held=held
        )

    def future(
        self,
        kernel: str,
        *operands: Any,
        placement: str = "auto",
        timeout_s: float | None = None,
        # NOTE: "| float": callers may pass **params of floats (a dict[str, float])
        fallback: bool | float = True,
        keep: bool | float = False,
        check: str | float = "",
        key: str | float | None = None,
        **params: Any,
    ) -> TaskFuture:
        """Start ``kernel`` on the node and return its `TaskFuture` at once (arguments as `submit`).

        Its result is the kernel's output; a failed task raises TaskError from ``result()``, and
        ``future.task`` describes the task once done. Operands the node cannot take are refused
        here, before sending (TaskError or RpcError from this call). ``cancel()`` cancels the task
        on the node and on its worker."""
        started = time.perf_counter()
        try:
            params = dict(params_from_python(params))
            check = check_choice(str(check))
            key = check_task_key(str(key)) if key is not None else ""
        except (ValueError, KernelError, TaskError) as exc:
            raise UsageError(f"cannot submit {kernel}: {exc}") from None
        held = [o._handle_for(self) if isinstance(o, RemoteArray) else 0 for o in operands]
        if not key and not keep and not any(held):  # NOTE: named, so its future finds it after a reconnect
            import secrets

            key = AUTO_KEY_PREFIX + secrets.token_hex(AUTO_KEY_BYTES)
        # NOTE: operands on a bulk channel are held to the node's budget, not to the message limit
        arrays = self._check_operands(
            kernel, operands, params, in_message=not (self.shared_memory or self.tls_bulk), held=held
        )
        what = f"submit {kernel}"
        keep = bool(keep)
        bulk = self._bulk_task(kernel, arrays, params, held, keep)  # NOTE: operands copied here, in the caller's thread
        tls_bulk = self.tls_bulk and self._large(kernel, arrays, params, held, keep)
        refusal = self._message_refusal(kernel, arrays, held) if bulk is None and not tls_bulk else None
        if refusal is not None:  # no bulk channel after all: the message limit holds
            raise refusal
        handles = [o for o in operands if isinstance(o, RemoteArray)]  # NOTE: alive until the answer

        def done(future: TaskFuture, record: TaskOutputRecord) -> Any:
            handles.clear()
            return _task_answer(future, record, kernel, started, what)

        call = functools.partial(
            self._submit_call,
            kernel,
            arrays,
            params,
            placement,
            float(self.timeout_s if timeout_s is None else timeout_s),
            bool(fallback),
            bulk,
            tls_bulk,
            held,
            keep,
            check,
            key,
        )
        try:
            future = self._start(call, what, done, key)
            future.submits = True
        except BaseException:
            if bulk is not None:
                bulk.release()
            raise
        if bulk is not None:
            future.add_done_callback(lambda _: bulk.release())
        return future

    def _large(
        self,
        kernel: str,
        arrays: Sequence[np.ndarray],
        params: Params,
        held: Sequence[int] = (),
        keep: bool = False,
    ) -> bool:
        """Whether a task's operands and result are enough bytes for a bulk channel (`bulk_min_bytes`):
        those that travel (not the held operands, not a result kept on the node)."""
        sent = sum(int(a.nbytes) for a, h in zip(arrays, held or [0] * len(arrays), strict=True) if not h)
        return sent + (0 if keep else output_nbytes(kernel, arrays, params)) >= self.bulk_min_bytes

    def _bulk_task(
        self,
        kernel: str,
        arrays: Sequence[np.ndarray],
        params: Params,
        held: Sequence[int] = (),
        keep: bool = False,
    ) -> _BulkTask | None:
        """The operands written into shared segments and a segment for the output, when this client
        has a bulk channel; None: the arrays travel in the message."""
        if not self.shared_memory:
            return None
        held = held or [0] * len(arrays)
        sent = [a for a, h in zip(arrays, held, strict=True) if not h]
        if not self._large(kernel, arrays, params, held, keep) and all(self._shared_slot(a)[0] is None for a in sent):
            return None  # NOTE: a tiny task: the bulk round trip, fstat and mmap cost more than its bytes
        out_bytes = 0 if keep else output_nbytes(kernel, arrays, params)
        task = _BulkTask([], [], None, self._pool, self._out_pool)
        try:
            for a, h in zip(arrays, held, strict=True):
                if h or not a.nbytes:  # NOTE: held on the node, or nothing to share (a memfd cannot map 0 bytes)
                    task.slots.append(0)
                    task.offsets.append(0)
                    continue
                segment, offset = self._shared_slot(a)
                if segment is None:
                    segment, offset = self._pool.get(int(a.nbytes)), 0
                    segment.array(a.dtype.newbyteorder("<"), a.shape)[...] = a  # any layout, byte order
                    task.segments.append(segment)
                    with self._shared_lock:
                        self.operands_copied += 1
                elif not any(segment is t for t in task.segments):  # the same array twice: one segment
                    task.segments.append(segment)
                    task.borrowed.append(segment)
                task.slots.append(1 + next(i for i, t in enumerate(task.segments) if t is segment))
                task.offsets.append(offset)
            # NOTE: a result in shared memory is held to the node's budget, like the operands
            if 0 < out_bytes <= max(self.node_max_message_bytes, self.node_memory_budget_bytes):
                task.output = self._out_pool.get(out_bytes)
                task.segments.append(task.output)
        except OSError as exc:  # NOTE: out of memory for memfds, or of descriptors: the message it is
            log.info("Client: %s travels in the RPC message: %s", kernel, describe_exception(exc))
            task.release()
            return None
        if not task.segments:
            return None
        return task

    def _shared_slot(self, a: np.ndarray) -> tuple[_Segment | None, int]:
        """(the segment of an array the caller holds in shared memory, the offset of ``a``'s bytes in
        it) when ``a`` is such an array or a C-ordered little-endian view of one; (None, 0) otherwise."""
        if not a.flags.c_contiguous or a.dtype.byteorder not in "=<|" or sys.byteorder != "little":
            return None, 0
        with self._shared_lock:
            for segment in list(self._shared.values()):  # NOTE: a copy: a finalizer may run in the loop
                offset = segment.holds(a)
                if offset >= 0:
                    return segment, offset
        return None, 0

    def _share(self, array: np.ndarray, segment: _Segment, pool: _SegmentPool) -> np.ndarray:
        """Hand the caller ``array`` over ``segment``: an operand without a copy while it (or any view
        of it) lives, then the segment goes back to ``pool``."""
        import weakref

        with self._shared_lock:
            self._shared[id(segment)] = segment

        def gone() -> None:
            with self._shared_lock:
                self._shared.pop(id(segment), None)
            pool.put(segment)

        weakref.finalize(array, gone)
        return array

    def empty(self, shape: int | Sequence[int], dtype: Any = "float64") -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` in memory shared with the node: fill it in
        place and pass it (or a C-ordered view of it) as an operand, and it is not copied. A plain
        numpy array when this client has no shared memory (`shared_memory`).

        NOTE: the node reads it while a call that takes it runs: do not write it until the answer."""
        import numpy as np

        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        kind = np.dtype(dtype)
        if kind.name not in ALLOWED_DTYPES or any(d < 0 for d in dims) or len(dims) > MAX_NDIM:
            raise UsageError(
                f"cannot make an array of shape {dims} and dtype {kind}: pangea takes {', '.join(ALLOWED_DTYPES)} "
                f"with at most {MAX_NDIM} dimensions of 0 or more"
            )
        nbytes = math.prod(dims) * kind.itemsize
        if not self.shared_memory or not nbytes:
            return np.empty(dims, kind)
        try:
            segment = self._pool.get(nbytes)
        except OSError as exc:  # NOTE: out of memfds or descriptors: an array of this process's own
            log.info("Client: empty%s is not shared: %s", dims, describe_exception(exc))
            return np.empty(dims, kind)
        return self._share(segment.array(_wire_dtype(kind.name), dims), segment, self._pool)

    async def _submit_call(
        self,
        kernel: str,
        arrays: Sequence[np.ndarray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        bulk: _BulkTask | None = None,
        tls_bulk: bool = False,
        held: Sequence[int] = (),
        keep: bool = False,
        check: str = "",
        key: str = "",
        detach: bool = False,
    ) -> TaskOutputRecord:
        """Send one task over Cap'n Proto and read its answer (on the loop thread).

        NOTE: the one place operands and results cross the connection. With ``bulk`` (the
        arrays already in shared segments), the segments go over the bulk channel first and
        the request names them; should the node refuse them, the arrays travel in the message.
        With ``tls_bulk``, they go on a bulk connection over TLS (a node on another box)."""
        if tls_bulk and self._tls_bulk is not None:
            over_tls = await self._submit_over_tls(
                kernel, arrays, params, placement, timeout_s, fallback, held, keep, check, key
            )
            if over_tls is not None:
                return over_tls
            refusal = self._message_refusal(kernel, arrays, held)
            if refusal is not None:  # NOTE: the bulk channel failed before the task was sent
                raise refusal
        batch = b""
        if bulk is not None and self._bulk is not None:
            kinds = b"r" * (len(bulk.segments) - (bulk.output is not None)) + b"w" * (bulk.output is not None)
            try:
                batch = await self._bulk.send(bulk.segments, kinds)
            except RpcError as exc:
                refusal = self._message_refusal(kernel, arrays, held)
                if refusal is not None:  # NOTE: nothing was sent: the segments stay the client's
                    raise refusal from None
                log.info("Client: %s travels in the RPC message: %s", kernel, exc)
        shared = bulk.slots if batch and bulk is not None else [0] * len(arrays)
        offsets = bulk.offsets if batch and bulk is not None else None
        output_segment = len(bulk.segments) if batch and bulk is not None and bulk.output is not None else 0
        request = self._task_request(
            kernel,
            arrays,
            params,
            placement,
            timeout_s,
            fallback,
            shared,
            batch,
            output_segment,
            offsets,
            held,
            keep,
            check,
            key,
        )
        request.task.detach = detach
        response = await request.send()
        reader = response.result
        if keep and not reader.errorKind:
            via = "shared memory" if batch else "RPC messages"
            return _record_with_outputs(reader, self._kept(reader), f"{via}, result: kept on the node")
        if batch and bulk is not None and len(reader.outputs) == 1 and reader.outputs[0].shared.segment:
            output = self._shared_output(reader.outputs[0], bulk)
            operands_via = "shared memory" if any(bulk.slots) or not arrays else "RPC messages"
            return _record_with_outputs(reader, (output,), f"{operands_via}, result: shared memory")
        record = TaskOutputRecord.from_capnp(reader)
        if batch:
            return dataclasses.replace(record, arrays_via="shared memory, result: RPC messages")
        return record

    def _task_request(
        self,
        kernel: str,
        arrays: Sequence[np.ndarray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        shared: Sequence[int],
        batch: bytes,
        output_segment: int,
        offsets: Sequence[int] | None = None,
        held: Sequence[int] = (),
        keep: bool = False,
        check: str = "",
        key: str = "",
    ) -> Any:
        """The `submit` request of a task: each operand in the message, or (``shared[i]`` > 0) named
        by its segment in ``batch`` (at ``offsets[i]`` there, default 0), or (``held[i]`` > 0) a
        remote array of this client's, named by its capability; ``output_segment``: where the
        node may put the output (0: none); ``keep``: leave the outputs on the node (on the loop thread)."""
        request = self._compute.submit_request()
        spec = request.task
        spec.kernel = kernel
        spec.placement = placement
        spec.timeoutSeconds = timeout_s
        spec.noFallback = not fallback
        spec.keep = keep
        spec.check = check
        spec.key = key
        held = held or [0] * len(arrays)
        names = list(dict.fromkeys(h for h in held if h))  # each held array once
        caps = spec.init("arrays", len(names))
        for i, h in enumerate(names):
            cap = self._handles.get(h)
            if cap is None:
                raise RpcError(f"cannot submit {kernel}: one of its remote arrays was released; put it again")
            caps[i] = cap
        slots = spec.init("operands", len(arrays))
        for slot, a, segment, offset, h in zip(slots, arrays, shared, offsets or [0] * len(arrays), held, strict=True):
            if h:
                slot.dtype, slot.shape = _dtype_name(a.dtype), [int(d) for d in a.shape]
                slot.held = 1 + names.index(h)
            elif segment:
                slot.dtype, slot.shape = _dtype_name(a.dtype), [int(d) for d in a.shape]
                slot.shared.segment, slot.shared.offset = segment, offset
            else:
                array_to_capnp(slot, a)
        params_to_capnp(spec, params)
        if batch:
            spec.bulkBatch = batch
            spec.outputSegment = output_segment
        return request

    async def _submit_over_tls(
        self,
        kernel: str,
        arrays: Sequence[np.ndarray],
        params: Params,
        placement: str,
        timeout_s: float,
        fallback: bool,
        held: Sequence[int] = (),
        keep: bool = False,
        check: str = "",
        key: str = "",
    ) -> TaskOutputRecord | None:
        """Send a task's arrays on a bulk connection over TLS and the task over Cap'n Proto; None when
        the bulk channel failed before the task was sent (it then goes in the message). TaskError
        when the node refuses the upload (its memory budget)."""
        import asyncio
        import secrets

        pool = self._tls_bulk
        assert pool is not None
        loop = asyncio.get_running_loop()
        try:
            link = await pool.acquire()
        except (OSError, RpcError) as exc:  # NOTE: a firewall may let the RPC through and not a second connection
            self.tls_bulk_note = f"off: {describe_exception(exc)}"
            log.info("Client: arrays travel in RPC messages: %s", describe_exception(exc))
            self._tls_bulk = None
            pool.close()
            return None
        in_step = False  # the connection is in step with the node: reusable
        try:
            held = held or [0] * len(arrays)
            sent = [a for a, h in zip(arrays, held, strict=True) if a.nbytes and not h]
            shared, count = [], 0  # per operand: 1 + its index among those sent, 0: in the message (empty) or held
            for a, h in zip(arrays, held, strict=True):
                count += bool(a.nbytes and not h)
                shared.append(count if a.nbytes and not h else 0)
            out_bytes = 0 if keep else output_nbytes(kernel, arrays, params)
            name = secrets.token_bytes(16)
            try:
                await loop.run_in_executor(pool.executor, link.upload, name, sent, out_bytes, timeout_s)
            except (OSError, RpcError) as exc:
                log.info("Client: %s travels in the RPC message: %s", kernel, describe_exception(exc))
                return None
            output_segment = len(sent) + 1 if out_bytes else 0
            request = self._task_request(
                kernel,
                arrays,
                params,
                placement,
                timeout_s,
                fallback,
                shared,
                name,
                output_segment,
                None,
                held,
                keep,
                check,
                key,
            )
            reader = (await request.send()).result
            if keep and not reader.errorKind:
                in_step = True
                return _record_with_outputs(reader, self._kept(reader), "TLS bulk channel, result: kept on the node")
            if len(reader.outputs) == 1 and reader.outputs[0].shared.segment:
                dtype, shape = _outside_output(reader.outputs[0], out_bytes, "on the bulk channel")
                output = await loop.run_in_executor(pool.executor, link.download, name, dtype, shape, timeout_s)
                in_step = True
                return _record_with_outputs(reader, (output,), "TLS bulk channel, result: TLS bulk channel")
            in_step = True
            record = TaskOutputRecord.from_capnp(reader)
            return dataclasses.replace(record, arrays_via="TLS bulk channel, result: RPC messages")
        finally:
            pool.release(link, in_step)

    def _shared_output(self, reader: Any, bulk: _BulkTask) -> np.ndarray:
        """The output the node wrote into the task's output segment, as an array over it (no copy).
        The segment is the caller's until that array (and every view of it) is gone; then it goes
        back to the pool, warm for the next result."""
        assert bulk.output is not None
        dtype, shape = _outside_output(reader, bulk.output.size, "in a shared segment")
        bulk.handed = True
        return self._share(bulk.output.array(dtype, shape), bulk.output, bulk.outputs)

    def submit(
        self,
        kernel: str,
        *operands: Any,
        placement: str = "auto",
        timeout_s: float | None = None,
        # NOTE: "| float": callers may pass **params of floats (a dict[str, float])
        fallback: bool | float = True,
        keep: bool | float = False,
        check: str | float = "",
        key: str | float | None = None,
        **params: Any,
    ) -> Any:
        """Run ``kernel`` on the node (placement auto, local, remote or a peer id); return its output
        (a tuple of arrays for a kernel with several).

        Operands are numpy arrays or `RemoteArray` handles of this client (arrays the node holds:
        they do not travel again). ``keep=True``: leave the output on the node and return a
        `RemoteArray` for it (see `put`). ``fallback=False``: raise TaskError (kind "unavailable")
        instead of running locally because no remote worker is usable; by default the node falls
        back and ``last_task["fallback_reason"]`` says why. ``check``: how the node verifies a remote
        worker's result: "" (default) the kernel's own check, "recompute" (the node computes it again
        and compares), "none" (taken as sent); ``last_task["verification"]`` says which ran
        ("local" when it ran on the node). ``key``: the task's name on the node (at most 128 printable
        characters; default: a random one): the node's queue journals the task under it, a second submit
        with the same key gets the first one's answer instead of running it again, and `result` (from any
        Client, after a reconnect or a restart of the node) finds it; should the connection break while
        the task runs, this call connects again and collects it by its key. Parameters take numbers,
        text and tuples of ints (numpy's
        ``axis=(0, 1)``, ``shape=(3, -1)``). A task refused for its input raises
        `BadInputError` (a TaskError and a ValueError). Waits for the answer (`future` does not);
        Ctrl-C while waiting cancels the task."""
        future = self.future(
            kernel,
            *operands,
            placement=placement,
            timeout_s=timeout_s,
            fallback=fallback,
            keep=keep,
            check=check,
            key=key,
            **params,
        )
        try:
            return self._wait(future, f"submit {kernel}")
        finally:
            if future.task:
                self.last_task = future.task

    def map(
        self,
        kernel: str,
        operands: Iterable[Any],
        *,
        in_flight: int = 16,
        placement: str = "auto",
        timeout_s: float | None = None,
        fallback: bool | float = True,
        **params: Any,
    ) -> Iterator[np.ndarray]:
        """Run ``kernel`` on each item of ``operands`` (a tuple of arrays, or one array); yield the
        outputs in order, like `Executor.map`.

        At most ``in_flight`` tasks are out at a time; the items are read as room frees up, so a
        generator of operands is never held all at once. The first task that fails raises its
        TaskError from the iterator, and the tasks still out are cancelled (as when the iterator is
        dropped unfinished)."""
        if not (isinstance(in_flight, int) and 1 <= in_flight <= RPC_MAX_CALLS_IN_FLIGHT):
            raise UsageError(f"bad in_flight {in_flight!r}: expected a whole number within 1-{RPC_MAX_CALLS_IN_FLIGHT}")
        items = iter(operands)
        out: deque[TaskFuture] = deque()

        def refill() -> None:
            while len(out) < in_flight:
                item = next(items, None)
                if item is None:
                    return
                arrays = (item,) if hasattr(item, "dtype") else tuple(item)
                kw = {"placement": placement, "timeout_s": timeout_s, "fallback": fallback}
                out.append(self.future(kernel, *arrays, **kw, **params))  # type: ignore[arg-type]

        def results() -> Iterator[np.ndarray]:
            try:
                while out:
                    future = out.popleft()
                    try:
                        output = self._wait(future, f"submit {kernel}")
                    finally:
                        if future.task:
                            self.last_task = future.task
                    refill()  # NOTE: before the yield: the next tasks run while the caller uses this output
                    yield output
            finally:
                for future in out:
                    future.cancel()

        try:
            refill()  # NOTE: like Executor.map, the first tasks start before the first next()
        except BaseException:
            for future in out:
                future.cancel()
            raise
        return results()

    def put(self, a: Any, *, placement: str = "local") -> RemoteArray:
        """Store ``a`` and return a `RemoteArray` handle for it: tasks take the handle as an operand
        (its bytes do not travel again), `get` (or ``np.asarray``) brings it back, and dropping the
        handle (or `RemoteArray.release`, or closing this client) releases it.

        ``placement``: "local", the node this client talks to (charged to its memory budget: a put
        over it raises TaskError), or a worker's peer id (`peers`; charged to its budget): tasks on
        it run there, and kept leave their results there. When that worker leaves, results made
        there are made again from their lineage while its inputs exist; using a lost put raises
        TaskError naming the worker."""
        import numpy as np

        if isinstance(a, RemoteArray):
            raise UsageError("cannot put a RemoteArray: it is on the node already")
        if placement in ("auto", "remote", *SPLIT_PLACEMENTS) or not isinstance(placement, str):
            raise UsageError(f"bad placement {placement!r} for put: 'local' or a worker's peer id (see peers())")
        result = self.submit("copy", np.asarray(a), placement=placement, keep=True, fallback=False)
        assert isinstance(result, RemoteArray)
        return result

    def where(self, ref: RemoteArray) -> dict[str, Any]:
        """Where a remote array is (``holder``: "local" or a worker's peer id), ``verification`` and the rest."""
        if not isinstance(ref, RemoteArray):
            raise UsageError(f"where takes a RemoteArray, not a {type(ref).__name__}")
        handle = ref._handle_for(self)

        async def call() -> Any:
            cap = self._handles.get(handle)
            if cap is None:
                raise UsageError("this RemoteArray was released: put the array again")
            return held_info(await cap.info())

        return dict(self._call(call, "ask where an array is"))

    def array(self, a: Any) -> RemoteArray:
        """`put`: a `RemoteArray` of ``a`` on the node, for numpy-like work that stays there
        (``x = node.array(a); y = (x @ x.T).sum(axis=0); np.asarray(y)``)."""
        return self.put(a)

    def get(self, ref: RemoteArray) -> np.ndarray:
        """Bring a remote array back as a numpy array (on the bulk channel where there is one)."""
        if not isinstance(ref, RemoteArray):
            raise UsageError(f"cannot get a {type(ref).__name__}: get takes a RemoteArray (put returns one)")
        out: np.ndarray = self.submit("copy", ref, placement="local")
        return out

    def _kept(self, reader: Any) -> tuple[RemoteArray, ...]:
        """The handles of a task's outputs left on the node (TaskOutput.kept; on the loop thread)."""
        kept = reader.kept
        if len(kept) != len(reader.outputs):
            raise RpcError(f"the node kept {len(kept)} arrays for {len(reader.outputs)} outputs")
        out = []
        for i in range(len(kept)):
            meta = reader.outputs[i]
            name, shape = str(meta.dtype), tuple(int(d) for d in meta.shape)
            if name not in ALLOWED_DTYPES or len(shape) > MAX_NDIM:
                raise RpcError(f"the node kept an array of dtype {name!r} and shape {shape}")
            handle = next(self._handle_ids)
            self._handles[handle] = _detached_capability(kept[i])
            out.append(RemoteArray(self, handle, _wire_dtype(name).newbyteorder("="), shape))
        return tuple(out)

    def _drop_handle(self, handle: int) -> None:
        """Forget a remote array's capability (from any thread): pycapnp releases it, the node lets go."""
        loop = self._loop
        if loop is None or self._stopped is None or self._stopped.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the connection, and its arrays, are gone
            loop.call_soon_threadsafe(self._handles.pop, handle, None)

    def matmul(self, a: np.ndarray, b: np.ndarray, placement: str = "auto", *, fallback: bool = True) -> np.ndarray:
        """Return a @ b computed by the node (placement auto, local, remote or a peer id; ``fallback``
        as in `submit`)."""
        return self.submit("matmul", a, b, placement=placement, fallback=fallback)

    def kernels(self) -> list[dict[str, Any]]:
        """Return what the node runs: for each kernel (in name order) its ``name``, ``operands``
        (how many arrays), ``params`` (the names `submit` takes as keywords), ``dtypes`` (of its
        operands), ``description``, the node's ``max_ndim`` and ``max_elements`` per operand, and
        ``verification``: how the node checks a remote worker's result ("" when it takes it as sent)."""

        async def call() -> Any:
            response = await self._compute.kernels()
            _raise_rpc_error(response, "list kernels")
            return [KernelInfoRecord.from_capnp(k).as_dict() for k in response.kernels]

        return list(self._call(call, "list kernels"))

    def enqueue(
        self,
        kernel: str,
        *operands: Any,
        key: str | float | None = None,
        placement: str = "auto",
        timeout_s: float | None = None,
        fallback: bool | float = True,
        check: str | float = "",
        **params: Any,
    ) -> str:
        """Hand a task to the node's queue and return its id as soon as the node has journaled it, without
        waiting for it to run (arguments as `submit`; operands are numpy arrays, and they travel in the
        RPC message). Collect its answer later, from any Client: `result` with the id or the ``key``."""
        try:
            params = dict(params_from_python(params))
            check = check_choice(str(check))
            name = check_task_key(str(key)) if key is not None else ""
        except (ValueError, KernelError, TaskError) as exc:
            raise UsageError(f"cannot enqueue {kernel}: {exc}") from None
        if any(isinstance(o, RemoteArray) for o in operands):
            raise UsageError(f"cannot enqueue {kernel}: a held array lives with its connection; pass numpy arrays")
        arrays = self._check_operands(kernel, operands, params)
        wait_s = float(self.timeout_s if timeout_s is None else timeout_s)
        call = functools.partial(
            self._submit_call,
            kernel,
            arrays,
            params,
            placement,
            wait_s,
            bool(fallback),
            check=check,
            key=name,
            detach=True,
        )

        def done(future: TaskFuture, record: TaskOutputRecord) -> str:
            if record.error_kind:
                raise task_error(record.error_message, record.error_kind)
            return record.task_id

        return str(self._call(call, f"enqueue {kernel}", done))

    def attach(self, task: str, *, timeout_s: float | None = None) -> TaskFuture:
        """A `TaskFuture` for a task of the node's queue, named by its key or the id the node gave it
        (``future.key``, ``future.task_id``, ``last_task["task_id"]``, `tasks`): it waits while the task is
        queued or running and gets its answer once (the node then forgets it: errorKind "not-found"
        after that). Works on another Client than the one that submitted it, after a restart of either."""
        started = time.perf_counter()
        name = check_task_key(str(task))
        what = f"get the result of task {name}"
        wait_s = float(self.timeout_s if timeout_s is None else timeout_s)
        return self._start(
            functools.partial(self._result_call, name, wait_s),
            what,
            lambda future, record: _task_answer(future, record, "", started, what),
            name,
        )

    def result(self, task: str, *, timeout_s: float | None = None) -> Any:
        """The output of a task of the node's queue by its key or id (see `attach`): after a reconnect,
        from another program, or after the node restarted. Waits for it while it runs."""
        future = self.attach(task, timeout_s=timeout_s)
        try:
            return self._wait(future, f"get the result of task {task}")
        finally:
            if future.task:
                self.last_task = future.task

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks of the node's queue, oldest first: ``task_id``, ``key``, ``kernel``, ``state``
        ("queued", "running", "done" or "failed": its answer waits for its client; "collected",
        "cancelled"), ``accepted`` and ``finished`` (seconds since the epoch), ``error``,
        ``result_bytes`` and ``runs`` (more than 1: the node restarted while it ran)."""

        async def call() -> Any:
            response = await self._compute.tasks()
            _raise_rpc_error(response, "list tasks")
            return [TaskInfoRecord.from_capnp(t).as_dict() for t in response.tasks]

        return list(self._call(call, "list tasks"))

    def peers(self) -> list[dict[str, Any]]:
        """Return the node's connected peers."""

        async def call() -> Any:
            response = await self._compute.peers()
            _raise_rpc_error(response, "list peers")
            return [PeerRecord.from_capnp(p).as_dict() for p in response.peers]

        return list(self._call(call, "list peers"))

    def status(self) -> dict[str, Any]:
        """Return the node's status."""

        async def call() -> Any:
            response = await self._compute.status()
            _raise_rpc_error(response, "get status")
            return StatusRecord.from_capnp(response.status).as_dict()

        return dict(self._call(call, "get status"))

    def connect(self, multiaddr: str) -> dict[str, Any]:
        """Ask the node to dial (and trust) another node; return its peer info."""

        async def call() -> Any:
            response = await self._compute.connect(multiaddr)
            _raise_rpc_error(response, f"connect to {multiaddr!r}")
            return PeerRecord.from_capnp(response.peer).as_dict()

        return dict(self._call(call, f"connect to {one_line(multiaddr, 200)!r}"))

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        self._drop_segments()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


###############################################################################
# 24. Start-up
#
# What runs before and around every verb, in the order `_main` runs it: the
# guard that the pyz runs on the interpreter it was built for; the deferred
# libp2p imports (pinned to libp2p's import graph) and sys.path, so that a
# verb starts fast; the log of a node process (kept in logs/ when the run
# fails); the trio runner that turns Ctrl-C and SIGTERM into an exit code,
# after a farewell (a Bye) to the peers; the terminal prompts (`ask`); and the
# end of stdout when its reader has gone (`| head -1`). The CLI below calls
# these; nothing above uses them.
###############################################################################


def build_info() -> dict[str, Any] | None:
    """Return the build stamp of the pyz (None when running from source)."""
    try:
        import _pangea_build  # written by build.sh into the pyz
    except ImportError:
        return None
    return {k: getattr(_pangea_build, k) for k in dir(_pangea_build) if k.isupper()}


def check_build_target() -> None:
    """Raise ConfigError when this interpreter is not the one the pyz was built for."""
    info = build_info()
    if info is None or "BUILT_FOR" not in info:
        return
    here = (sys.implementation.cache_tag, platform.machine())
    problem = build_target_mismatch(tuple(info["BUILT_FOR"]), here)
    if problem is not None:
        python = f"python{info.get('PYTHON_VERSION', '3')}"
        raise ConfigError(
            problem,
            hint=f"run it with {python} ({python} {sys.argv[0]} ...) if this box has it, "
            f"or build a pangea.pyz on this box with ./build.sh",
        )


# Start-up time: `import libp2p` takes ~0.55 s, and half of it loads
# modules that a TCP + Noise + Yamux host never runs, because libp2p 0.8.1 imports them at
# module level (measured with -X importtime, 2 cores):
#   QUIC transport (aioquic, pylsqpack, service_identity, pyOpenSSL)  ~70 ms
#   AutoTLS ACME client (httpx with its CLI: rich, pygments, click; requests)  ~120 ms
#   multiaddr's DNS resolver (dnspython, which checks package versions)  ~75 ms
#   circuit relay (via relay.circuit_v2.nat), WebSocket transport, libp2p's own mDNS  ~80 ms
#   the resource manager's Prometheus exporter (prometheus_client, http.server)  ~20 ms
# Until they are asked for, those modules are stand-ins in sys.modules. A stand-in
# module holds stand-ins for exactly the names its importers take from it; anything
# else asked of it, calling a stand-in function or making an instance of a stand-in
# class loads the real modules first, so nothing is lost, only put off. The one
# exception is DNSResolver: Swarm and TCP make one up front, so its stand-in makes the
# real resolver at its first use (dialling a /dns address).
# NOTE: the table is libp2p 0.8.1's import graph. With any other libp2p version (a pin
# changed in pyproject.toml) nothing is deferred, and tests/unit/test_startup.py fails
# until the table is checked against the new version.
_DEFERRED_LIBP2P_VERSION = "0.8.1"
_DEFERRED_MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # module: ((classes), (functions)) that its importers (after the #) take from it
    "libp2p.transport.quic.utils": ((), ("is_quic_multiaddr",)),  # libp2p/__init__
    "libp2p.transport.quic.transport": (("QUICTransport",), ()),  # libp2p/__init__: made for QUIC addresses only
    "libp2p.transport.quic.stream": (("QUICStream",), ()),  # custom_types: in a type alias
    "libp2p.transport.websocket.transport": (("WebsocketTransport",), ()),  # libp2p.transport
    "libp2p.security.tls.autotls.acme": (("ACMEClient",), ("compute_b36_peer_id",)),  # host.basic_host
    "libp2p.security.tls.autotls.broker": (("BrokerClient",), ()),  # host.basic_host
    "libp2p.relay.circuit_v2.nat": ((), ("is_private_ip",)),  # host.basic_host: for AutoTLS only
    "libp2p.discovery.mdns.mdns": (("MDNSDiscovery",), ("create_mdns_discovery",)),  # host.basic_host
    "libp2p.rcmgr.prometheus_exporter": (("PrometheusExporter",), ("create_prometheus_exporter",)),  # rcmgr
    "multiaddr.resolvers": (("DNSResolver",), ()),  # network.swarm, transport.tcp, utils.dns_utils
}


class _DeferredModule(types.ModuleType):
    """A stand-in for a module in _DEFERRED_MODULES; any name it lacks comes from the real one."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # importlib and inspect probe __path__, __file__ ...
            raise AttributeError(name)
        return getattr(_real_module(self.__name__), name)


class _DeferredClass(type):
    """Metaclass of a stand-in class: making an instance makes one of the real class."""

    _module: str

    def _real(cls) -> Any:
        return getattr(_real_module(cls._module), cls.__name__)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        # Until the real module is loaded no instance of the real class can exist.
        loaded = sys.modules.get(cls._module)
        return loaded is not None and not isinstance(loaded, _DeferredModule) and isinstance(obj, cls._real())

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._real(), name)


class _DeferredDNSResolver:
    """Stand-in for multiaddr's DNSResolver: Swarm and TCP make one each up front, but
    resolve only /dns addresses; the real resolver (and dnspython) comes at first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._deferred_args = (args, kwargs)
        self._resolver: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_deferred_args", "_resolver"):
            raise AttributeError(name)
        if self._resolver is None:
            args, kwargs = self._deferred_args
            self._resolver = _real_module("multiaddr.resolvers").DNSResolver(*args, **kwargs)
        return getattr(self._resolver, name)


def _real_module(name: str) -> Any:
    """Return the real module ``name``, first dropping every remaining stand-in, so that
    the real modules, which import each other, see only real modules."""
    import importlib

    module = sys.modules.get(name)
    if module is None or isinstance(module, _DeferredModule):
        for other, value in list(sys.modules.items()):
            if isinstance(value, _DeferredModule):
                del sys.modules[other]
        module = importlib.import_module(name)
    return module


def _deferred_function(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_real_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = module
    return call


def _installed_version_is(distribution: str, version: str) -> bool:
    """True when ``distribution`` ``version`` is what `import <distribution>` would load
    (its .dist-info sits beside the package; no import, no importlib.metadata scan)."""
    import importlib.util

    spec = importlib.util.find_spec(distribution)
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(next(iter(spec.submodule_search_locations))).parent
    return (site / f"{distribution}-{version}.dist-info").is_dir()


def forget_zipapp_on_sys_path() -> None:
    """Drop the running pyz from sys.path: shiv has unpacked it, and pangea imports
    nothing from the archive itself (its modules come from the unpacked site-packages).

    NOTE: importlib.metadata, which libp2p asks for its own version at import time,
    lists every sys.path entry, and listing the ~3,000 names of the pyz took ~20 ms
    of every start (2.5 ms without it).
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if not argv0 or not os.path.isfile(argv0):
        return
    here = os.path.realpath(argv0)
    sys.path[:] = [p for p in sys.path if not (p and os.path.isfile(p) and os.path.realpath(p) == here)]


def defer_unused_libp2p_modules(version: str = _DEFERRED_LIBP2P_VERSION) -> bool:
    """Put stand-ins for the libp2p modules pangea never runs into sys.modules (see the
    comment above _DEFERRED_MODULES); return whether it did. Call before any libp2p import;
    does nothing once libp2p is imported, or when the installed libp2p is not ``version``."""
    if "libp2p" in sys.modules or not _installed_version_is("libp2p", version):
        return False
    multiaddr_spec = None
    for name, names in _DEFERRED_MODULES.items():
        if name in sys.modules:
            continue
        module = _DeferredModule(name)
        if name == "multiaddr.resolvers":
            import importlib.util

            # A package: `from .resolvers.dns import DNSResolver` (Multiaddr.resolve) must
            # still find the real submodule through it.
            multiaddr_spec = multiaddr_spec or importlib.util.find_spec("multiaddr")
            if multiaddr_spec is None or not multiaddr_spec.submodule_search_locations:
                continue
            module.__path__ = [str(Path(next(iter(multiaddr_spec.submodule_search_locations))) / "resolvers")]
            setattr(module, "DNSResolver", _DeferredDNSResolver)  # noqa: B010
            sys.modules[name] = module
            continue
        classes, functions = names
        for class_name in classes:
            setattr(module, class_name, _DeferredClass(class_name, (), {"_module": name, "__module__": name}))
        for function_name in functions:
            setattr(module, function_name, _deferred_function(name, function_name))
        sys.modules[name] = module
    return True


class Libp2pLogFilter(logging.Filter):
    """What of py-libp2p's own records reaches pangea's log (every handler carries one).

    Without --debug: nothing below WARNING (py-libp2p sets INFO on some of its
    own loggers, e.g. the AutoConnector's "initiating N new dials" every 10 s,
    so the "libp2p" logger's level alone does not hold them back), and a
    warning or error of one kind at most once per LIBP2P_LOG_REPEAT_S: a redial
    makes the TCP transport log "Failed to open TCP stream" several times a
    second, while pangea's own lines name the peer it dials. The next one let
    through after a quiet spell says how many were held back. With --debug
    everything passes."""

    def __init__(self, debug: bool, repeat_s: float = LIBP2P_LOG_REPEAT_S) -> None:
        super().__init__()
        self.debug = debug
        self.repeat_s = repeat_s
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}  # kind -> (time let through, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        """True to log ``record``; False to drop it."""
        if self.debug or not (record.name == "libp2p" or record.name.startswith("libp2p.")):
            return True
        decided = getattr(record, "pangea_libp2p_ok", None)  # the same record, at the next handler
        if decided is None:
            decided = record.levelno >= logging.WARNING and self._first_of_its_kind(record)
            record.pangea_libp2p_ok = decided
        return bool(decided)

    def _first_of_its_kind(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg)[:200])
        if len(self._last) > 1000:  # bounded: libp2p formats some messages with f-strings
            self._last.clear()
        last = self._last.get(kind)
        if last is not None and record.created - last[0] < self.repeat_s:
            self._last[kind] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.msg = f"{record.getMessage()} (and {last[1]} more like it in {record.created - last[0]:.0f} s)"
            record.args = ()
        self._last[kind] = (record.created, 0)
        return True


class BoundedRecordFilter(logging.Filter):
    """Cuts a record's message to ``max_chars`` (every handler carries one): the text of a
    peer, a client or an exception can be as long as a message limit allows (a kernel name,
    an error message), and one line of it must not push the log's history out of rotation."""

    def __init__(self, max_chars: int = LOG_MAX_RECORD_CHARS) -> None:
        super().__init__()
        self.max_chars = max_chars

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True: ``record`` is logged, its message cut when it is too long."""
        if getattr(record, "pangea_bounded", False):  # the same record, at the next handler
            return True
        record.pangea_bounded = True
        message = record.getMessage()
        if len(message) > self.max_chars:
            record.msg = f"{message[: self.max_chars]}... ({len(message) - self.max_chars} more characters)"
            record.args = ()
        return True


def setup_logging(log_file: Path | None, verbose: int, debug: bool) -> None:
    """Send pangea's log to the session log file and, with -v/--debug, to stderr."""
    # NOTE: `import libp2p` resets the "libp2p" logger (libp2p.utils.logging.setup_logging),
    # so it is imported first; otherwise its routine errors reach stderr through lastResort.
    import logging.handlers  # here, not at the top: --help does not need it (~5 ms)

    import libp2p  # noqa: F401

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("pangea: %(message)s"))
    stderr.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    handlers: list[logging.Handler] = [stderr]
    if log_file is not None:
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    libp2p_filter = Libp2pLogFilter(debug)  # one for all handlers: a held-back record is held back everywhere
    bounded = BoundedRecordFilter()
    for handler in handlers:
        handler.addFilter(libp2p_filter)
        handler.addFilter(bounded)
    for name, level, hs in (
        ("", logging.WARNING, handlers[1:]),  # libraries that log through the root logger: file only
        ("pangea", logging.DEBUG, handlers),
        # NOTE: libp2p logs through logging.lastResort unless it has a handler;
        # its routine warnings (a redial failed) belong in the file only.
        ("libp2p", logging.INFO if debug else logging.WARNING, handlers if debug else handlers[1:]),
    ):
        logger = logging.getLogger(name)
        logger.handlers[:] = hs or [logging.NullHandler()]
        logger.setLevel(level)
        logger.propagate = False


@contextlib.contextmanager
def node_session(role: str, args: argparse.Namespace) -> Any:
    """Create the session directory and logging of a node process; remove the directory at exit."""
    home = pangea_home()
    session = SessionDir(home, role).create()
    try:
        setup_logging(session.log_path, getattr(args, "verbose", 0), getattr(args, "debug", False))
        log.info("pangea %s %s started, pid %d", __version__, role, os.getpid())
        yield home, session
    except BaseException as exc:
        kept = _keep_failed_log(session, one_line(describe_exception(exc)))
        if kept is not None:
            exc.pangea_log_kept = str(kept)  # type: ignore[attr-defined]  # _report_error names it
        raise
    else:
        if session.exit_code not in (None, 0):
            kept = _keep_failed_log(session, f"exit code {session.exit_code}")
            if kept is not None:
                print(f"pangea: log kept in {kept}", file=sys.stderr)
    finally:
        session.remove()


def _keep_failed_log(session: SessionDir, why: str) -> Path | None:
    """Keep the log of a failed run (session.keep_log) once every handler has written it out."""
    for name in ("", "pangea", "libp2p"):
        for handler in logging.getLogger(name).handlers:
            with contextlib.suppress(OSError, ValueError):
                handler.flush()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return session.keep_log(f"{when} INFO pangea: the run failed ({why}); this log is kept")


def first_error(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """Return the first exception of ``kind`` inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_error(inner, kind)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kind) else None


class Farewell:
    """The last words of a command stopped by Ctrl-C or SIGTERM (a Bye to its peers): the
    command sets ``say``; run_trio awaits it, for FAREWELL_S at most, before it cancels."""

    def __init__(self) -> None:
        self.say: Callable[[], Awaitable[None]] | None = None


def run_trio_value(fn: Callable[..., Any], *args: Any, farewell: Farewell | None = None) -> Any:
    """Run ``fn(*args)`` under trio and return its value; Ctrl-C and SIGTERM cancel it cleanly
    and raise Interrupted (exit code 130 or 143), after ``farewell.say()`` when it is set.

    NOTE: Ctrl-C inside py-libp2p surfaces as a KeyboardInterrupt nested in an
    exception group; cancelling the main scope from a signal receiver instead
    lets every `finally` run. The farewell comes first, while everything still
    runs: once the scope is cancelled, so are py-libp2p's own tasks, and a
    message written then may never leave.
    """
    import trio

    received: list[int] = []

    async def runner() -> Any:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            received.append(signum)
                            if farewell is not None and farewell.say is not None:
                                with trio.move_on_after(FAREWELL_S):
                                    await farewell.say()
                            scope.cancel()
                            return

                nursery.start_soon(on_signals)
                value = await fn(*args)
                nursery.cancel_scope.cancel()
                if not received:  # NOTE: a run that ended during its farewell was still interrupted
                    return value
        raise Interrupted(128 + received[0] if received else 1)

    try:
        return trio.run(runner)
    except BaseExceptionGroup as group:
        found = first_error(group, PangeaError) or first_error(group, KeyboardInterrupt)
        if found is not None:
            raise found from None
        raise


def run_trio(fn: Callable[..., Any], *args: Any, farewell: Farewell | None = None) -> int:
    """Run a command's ``async`` body under trio; return its exit code (130/143 after a signal)."""
    try:
        return int(run_trio_value(fn, *args, farewell=farewell))
    except Interrupted as exc:
        return exc.code


PROMPT_TRIES = 3  # a bad answer at a prompt (a pasted address, a code) is asked for again, this often in all
_T = TypeVar("_T")


def ask(question: str) -> str | None:
    """One line typed at the terminal, stripped; None at Ctrl-D. At Ctrl-C the prompt's
    line is ended first (the terminal echoed ``^C`` on it), so "pangea: interrupted" starts
    a fresh one; then KeyboardInterrupt goes on to main (exit 130)."""
    try:
        return input(question).strip()
    except EOFError:
        print(flush=True)
        return None
    except KeyboardInterrupt:
        print(flush=True)
        raise


def ask_until_valid(question: str, parse: Callable[[str], _T], tries: int = PROMPT_TRIES) -> _T | None:
    """Ask until ``parse`` takes the answer; None at an empty line or Ctrl-D. A UsageError
    from ``parse`` is shown and the question asked again, ``tries`` times in all; the last
    one goes on to main."""
    for attempt in range(1, tries + 1):
        text = ask(question)
        if not text:
            return None
        try:
            return parse(text)
        except UsageError as exc:
            if attempt == tries:
                raise
            left = tries - attempt
            print(f"pangea: {exc}; try again ({left} more {'try' if left == 1 else 'tries'}, Enter to stop)")
    return None


def _flush_stdout(code: int) -> int:
    """Flush stdout; when its reader has gone (``| head -1``) end quietly with ``code``."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return code


def _stdout_gone() -> bool:
    """True when nobody reads our stdout any more (a pipe or socket whose reader closed)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null after its reader left, so the interpreter's last flush
    at exit cannot print "Exception ignored ... BrokenPipeError" (the recipe of
    the Python docs, "Note on SIGPIPE")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def version_text() -> str:
    """Return the --version text: pangea, protocol, build target and the running interpreter."""
    info = build_info()
    here = f"{sys.implementation.cache_tag} {platform.machine()}"
    if info is None:
        built = "running from source"
    else:
        target = " ".join(info.get("BUILT_FOR", ("?", "?")))
        built = f"built for {target} (Python {info.get('PYTHON_VERSION', '?')}), commit {info.get('GIT_COMMIT', '?')}"
    return f"pangea {__version__} (protocol {PROTOCOL_VERSION}), {built}; running on {here}{unpacked_text()}"


_SHIV_DIR = r".+_[0-9a-f]{64}"  # shiv unpacks a pyz into $SHIV_ROOT/<pyz file name>_<build id>


def unpacked_builds(module_file: str = __file__) -> tuple[Path, list[Path]] | None:
    """(the directory this pyz build is unpacked in, the other pangea builds unpacked beside
    it), when running from shiv's cache; None when running from source."""
    import re

    site = Path(module_file).resolve().parent
    here = site.parent
    if site.name != "site-packages" or not re.fullmatch(_SHIV_DIR, here.name):
        return None
    with contextlib.suppress(OSError):
        others = [
            p
            for p in sorted(here.parent.iterdir())
            if p != here and re.fullmatch(_SHIV_DIR, p.name) and (p / "site-packages" / "_pangea_build.py").is_file()
        ]
        return here, others
    return here, []


def unpacked_text() -> str:
    """The --version clause on shiv's cache: where this build is unpacked, and how to remove older ones."""
    import shlex

    found = unpacked_builds()
    if found is None:
        return ""
    here, others = found
    if not others:
        return f"; unpacked in {here} (no other pangea build unpacked beside it)"
    listed = " ".join(shlex.quote(str(p)) for p in others)
    return (
        f"; unpacked in {here}; {len(others)} other pangea build(s) unpacked beside it, not this one, "
        f"removable when no pangea of theirs runs: rm -rf {listed}"
    )


###############################################################################
# 25. CLI: options and the verbs of a pair
#
# One `cmd_<verb>` per command, with its options in the `add_<verb>_parser`
# right above it. This part holds the option types and the options several
# verbs share (node_options, limit_options, fault_option, verify_option), the
# report of the checks, trust and pairing helpers, the live progress view,
# and the verbs that pair two boxes: initiate, respond, demo. Errors are one
# line on stderr, `pangea: error: ...` plus an optional `hint: ...`; exit
# codes 0 ok, 1 failure, 2 usage/setup error, 130 Ctrl-C (143 SIGTERM).
# Tracebacks only with --debug.
###############################################################################


class _VersionAction(argparse.Action):
    """--version without argparse's line wrapping (the text is one line for scripts)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (UsageError) instead of usage + exit."""

    def error(self, message: str) -> Any:
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def global_options(p: argparse.ArgumentParser) -> None:
    """Add the options of every command, taken before or after its verb: --version, --debug, -v."""
    g = p.add_argument_group("options of every command (before or after it)")
    g.add_argument("--version", action=_VersionAction, help="print the version and build target, then exit")
    g.add_argument("--debug", action="store_true", default=False, help="show tracebacks and debug logs")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log events to stderr")


def option_parent(add: Callable[[argparse.ArgumentParser], None], *, defaults: bool = False) -> _Parser:
    """A parent parser (argparse ``parents=[...]``) with the options ``add`` adds.

    The same options go to a parser and to each parser under it (the root and its verbs, `call`
    and its calls), so they are accepted before or after a verb. Only the outermost one gets
    ``defaults``: below it every default is SUPPRESS, so an option given early is not reset by
    a later parser that did not see it. NOTE: argparse shares the action objects of a parent
    with each child, hence a new parent per use."""
    parent = _Parser(add_help=False)
    add(parent)
    if not defaults:
        for action in parent._actions:
            action.default = argparse.SUPPRESS
    return parent


def parser_tree(root: argparse.ArgumentParser) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser by its words: () the root, ("serve",), ("call", "matmul"), ..."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[words] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk((*words, name), sub)

    walk((), root)
    return found


def command_words(root: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The words of the (sub-)command a parsed command line chose: ("call", "matmul"), or ()."""
    words: tuple[str, ...] = ()
    parser = root
    while True:
        chooser = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, chooser.dest, None) if chooser is not None else None
        if chooser is None or chosen not in chooser.choices:
            return words
        words, parser = (*words, chosen), chooser.choices[chosen]


def refused_arguments(root: argparse.ArgumentParser, words: tuple[str, ...], extras: Sequence[str]) -> UsageError:
    """The error for arguments the command ``words`` did not take: its --help, and where a refused option
    goes when another command has it (or where it goes when it belongs to this command but was given
    before it)."""
    tree = parser_tree(root)
    command = " ".join((root.prog, *words))
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-") and e != "-"]
    if not flags:
        return UsageError(f"unrecognized arguments: {' '.join(extras)}", hint=f"see `{command} --help`")
    flag = flags[0]
    if words and flag in tree[words]._option_string_actions:
        action = tree[words]._option_string_actions[flag]
        value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
        return UsageError(
            f"unrecognized arguments: {' '.join(extras)} ({flag} is an option of `{' '.join(words)}`: after it)",
            hint=f"{command} {flag}{value} ...; see `{command} --help`",
        )
    homes = [w for w, p in tree.items() if w and flag in p._option_string_actions]
    # the nearest first: a sibling sub-command (`call matmul` for `call status --size`), then verbs
    homes.sort(key=lambda w: (w[:1] != words[:1], w))
    outer = [w for w in homes if not any(w[: len(o)] == o for o in homes if len(o) < len(w))]
    where = "" if not words else f" (`{' '.join(words)}` has no {flag})"
    hint = f"see `{command} --help`"
    if outer:
        shown = ", ".join(f"`{' '.join(w)}`" for w in outer[:6]) + (", ..." if len(outer) > 6 else "")
        hint = f"{flag} is an option of {shown}; see `{command} --help`"
    return UsageError(f"unrecognized arguments: {' '.join(extras)}{where}", hint=hint)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    chooser = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(chooser.choices) if chooser is not None else {}


def _before_the_verb(root: argparse.ArgumentParser, argv: Sequence[str]) -> UsageError | None:
    """The error for options of a command given before its verb (`--rpc X call status`, `call --size 8
    matmul`), which argparse would misread, taking the option's value for the verb. None when
    nothing is misplaced."""
    parser, rest = root, list(argv)
    words: tuple[str, ...] = ()
    while verbs := _subcommands(parser):
        at = next((i for i, word in enumerate(rest) if word in verbs), None)
        if at is None:
            return None
        known = parser._option_string_actions
        early = [w for w in rest[:at] if w.split("=", 1)[0] not in known and w[:2] not in known]
        words, parser, rest = (*words, rest[at]), verbs[rest[at]], rest[at + 1 :]
        if any(w.startswith("-") for w in early):
            inner = _subcommands(parser)
            chosen = next((w for w in rest if w in inner), None)
            return refused_arguments(root, words if chosen is None else (*words, chosen), early)
    return None


def parse_command_line(root: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; an argument no parser takes is refused naming the right --help (refused_arguments)."""
    misplaced = _before_the_verb(root, argv)
    if misplaced is not None:
        raise misplaced
    args, extras = root.parse_known_args(argv)
    if extras:
        raise refused_arguments(root, command_words(root, args), extras)
    return args


# Every numeric option is parsed by one of these argparse types, so a bad value
# is refused at parse time with one line naming the option, the value and the
# expected form (no check scattered in the cmd_* functions, no overflow later).
MAX_OPTION_SECONDS = 7 * 86400  # a week: longer waits are typing mistakes (and overflow some timers)
MAX_OPTION_MIB = 1 << 20  # 1 TiB: sizes in MiB beyond it are mistakes (and overflow UInt64 in bytes)
MAX_MATRIX_N = 32768  # an N x N float64 matrix of 8 GiB: the largest size option


class NumberOption:
    """An argparse ``type=``: a finite number in [low, high] (``low_open``: more than low).

    Refuses NaN, inf, non-ASCII digits and out-of-range values with argparse's
    one-line error, ``argument --flag: got '-5'; expected ...``."""

    def __init__(self, kind: type, low: float, high: float, what: str, *, low_open: bool = False) -> None:
        self.kind = kind
        self.low, self.high, self.low_open = low, high, low_open
        self.what = what
        self.__name__ = what  # argparse names the type in some messages

    def expected(self) -> str:
        """The expected form, for messages and --help."""
        if self.kind is int:
            return f"{self.what}, a whole number in {self.low}-{self.high}"
        low = f"more than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{self.what}, {low} and at most {self.high:g}"

    def __call__(self, text: str) -> Any:
        value: float | int | None = None
        plain = text.strip()
        if plain.isascii() and plain:
            try:
                value = int(plain, 10) if self.kind is int else float(plain)
            except ValueError:
                value = None
        if value is not None and (isinstance(value, int) or math.isfinite(value)):
            above_low = value > self.low if self.low_open else value >= self.low
            if above_low and value <= self.high:
                return value
        raise argparse.ArgumentTypeError(f"got {text!r}; expected {self.expected()}")

    def __repr__(self) -> str:
        return f"NumberOption({self.expected()!r})"


def whole_number(low: int, high: int, what: str = "a count") -> NumberOption:
    """An argparse type for a whole number in low-high."""
    return NumberOption(int, low, high, what)


def positive_seconds(high: float = MAX_OPTION_SECONDS) -> NumberOption:
    """An argparse type for a number of seconds, more than 0 and at most ``high``."""
    return NumberOption(float, 0, high, "a number of seconds", low_open=True)


def size_mib(low: int = 1, high: int = MAX_OPTION_MIB) -> NumberOption:
    """An argparse type for a size in MiB."""
    return NumberOption(int, low, high, "a size in MiB")


port_number = NumberOption(int, 0, 65535, "a TCP port (0: any free one)")


def fault_option(p: argparse.ArgumentParser) -> None:
    """Add --fault, the fault-injection TEST AID."""
    p.add_argument(
        "--fault",
        type=parse_fault,
        metavar="corrupt[=N]|lie=KIND|crash-after=N|slow=SECONDS|data-via=HOST:PORT",
        help="TEST AID: make this worker return wrong numbers (corrupt=N: in its first N results; "
        "lie=relative|sign|swap|nan|plus-one: one small lie per result), exit abruptly after N tasks, "
        "stall before each task, or dial the peer's data plane through a test's proxy",
    )


def verify_option(p: argparse.ArgumentParser) -> None:
    """Add --verify-rounds."""
    p.add_argument(
        "--verify-rounds",
        type=whole_number(0, 64, "a number of rounds"),
        default=FREIVALDS_ROUNDS,
        metavar="N",
        help=f"rounds of Freivalds' check on remote results, 0 to trust workers (default: {FREIVALDS_ROUNDS})",
    )


# The limit options of every node command: flag, Limits field, type, shift (MiB -> bytes), metavar, help.
LIMIT_OPTIONS: tuple[tuple[str, str, NumberOption, int, str, str], ...] = (
    ("--max-payload-mib", "max_payload_bytes", size_mib(), 20, "MIB", "largest array data of one message"),
    (
        "--max-elements",
        "max_elements",
        whole_number(1, 1 << 40, "a number of elements"),
        0,
        "N",
        "largest array, in elements",
    ),
    (
        "--max-inflight",
        "max_inflight_tasks",
        whole_number(1, 100_000, "a number of tasks"),
        0,
        "N",
        "tasks one peer may have in flight; more get `busy`",
    ),
    ("--max-inflight-mib", "max_inflight_bytes", size_mib(), 20, "MIB", "operand data one peer may have in flight"),
    ("--memory-budget-mib", "memory_budget_bytes", size_mib(), 20, "MIB", "operand data held for all peers together"),
    (
        "--handshake-timeout",
        "handshake_timeout_s",
        positive_seconds(),
        0,
        "SECONDS",
        "a peer must say Hello within this",
    ),
    (
        "--idle-timeout",
        "idle_timeout_s",
        positive_seconds(),
        0,
        "SECONDS",
        "drop a peer that sends nothing for this long",
    ),
    (
        "--task-timeout",
        "task_timeout_s",
        positive_seconds(),
        0,
        "SECONDS",
        "a task running longer fails with `deadline`",
    ),
)


def limits_from_args(args: argparse.Namespace) -> Limits:
    """Return the Limits the node options ask for; UsageError for a bad value."""
    values: dict[str, Any] = {}
    for flag, name, _, shift, _, _ in LIMIT_OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        values[name] = value << shift if shift else value
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    compression = getattr(args, "compression", "on") == "on"
    return Limits(dtypes=dtypes, compression=compression, **values).validate()


def verb_parents() -> list[_Parser]:
    """The ``parents=`` of every verb's parser: the options of every command (global_options)."""
    return [option_parent(global_options)]


def run_options(p: argparse.ArgumentParser) -> None:
    """Add the options of a run that ends (initiate, respond): how long to wait, and its output.

    NOTE: `serve` runs until stopped and shows no checks or progress, so it has none of them
    (`serve --json` or `--timeout` is refused instead of meaning nothing)."""
    p.add_argument(
        "--timeout",
        type=positive_seconds(),
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for the other side (default: {DEFAULT_WAIT_S:.0f})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no live progress display")


@dataclass(frozen=True)
class ListenPort:
    """One port a node command will listen on, for the collision check before anything binds."""

    option: str  # the option that sets it: --port, --data-port, --rpc, --metrics
    host: str
    port: int  # 0: any free one, which collides with nothing
    what: str  # how a message names it: "the data port (the libp2p port 7920 + 1)"


def _hosts_overlap(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return a in wildcard or b in wildcard or a == b or (is_loopback_host(a) and is_loopback_host(b))


def port_collision(verb: str, ports: Sequence[ListenPort]) -> UsageError | None:
    """Pure: the error for two of a command's own ports that are one (None when all differ).

    NOTE: checked before binding; otherwise the second bind fails with the socket's words only
    (or, as py-libp2p sets SO_REUSEPORT, not at all)."""
    for i, later in enumerate(ports):
        for earlier in ports[:i]:
            if later.port and later.port == earlier.port and _hosts_overlap(later.host, earlier.host):
                # --port and --data-port name a port; --rpc and --metrics name HOST:PORT
                bare = later.option.endswith("port")
                subject = f"{later.option} {later.port}" if bare else f"the {later.option} port {later.port}"
                fix = f"pick another {later.option}" if bare else f"pick another {later.option} port"
                if earlier.option == "--data-port" and "+" in earlier.what:
                    fix += " or set --data-port (PORT or off)"
                elif earlier.option == "--port":
                    fix += " or --port"
                return UsageError(f"cannot {verb}: {subject} is also {earlier.what}", hint=fix)
    return None


def node_ports(args: argparse.Namespace, rpc: str | None = None) -> list[ListenPort]:
    """The ports a node command listens on, from its options: libp2p, data plane, RPC, metrics."""
    ports = [ListenPort("--port", args.host, args.port, f"the libp2p port (--port {args.port})")]
    data = data_port_for(args.data_port, args.port)
    if data:
        auto = args.data_port is not None and args.data_port < 0
        what = f"the data port (the libp2p port {args.port} + {DATA_PORT_OFFSET})" if auto else "the --data-port"
        ports.append(ListenPort("--data-port", args.host, data, what))
    if rpc is not None:
        host, port = parse_host_port(rpc, DEFAULT_RPC_PORT)
        ports.append(ListenPort("--rpc", host, port, f"the RPC port (--rpc {rpc})"))
    if args.metrics not in (None, "off"):
        host, port = parse_host_port(args.metrics, DEFAULT_METRICS_PORT)
        ports.append(ListenPort("--metrics", host, port, f"the metrics port (--metrics {args.metrics})"))
    if getattr(args, "dashboard", None):
        host, port = parse_host_port(args.dashboard, DEFAULT_DASHBOARD_PORT)
        ports.append(ListenPort("--dashboard", host, port, f"the dashboard port (--dashboard {args.dashboard})"))
    return ports


def check_node_ports(verb: str, args: argparse.Namespace, rpc: str | None = None) -> None:
    """Refuse (UsageError) a node command whose own ports collide, before anything binds."""
    problem = port_collision(verb, node_ports(args, rpc))
    if problem is not None:
        raise problem


def node_options(p: argparse.ArgumentParser, port: int) -> None:
    """Add the options of every node command (initiate, respond, serve): where to listen, --psk, the
    data plane, metrics, and the limits on what peers may send."""
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument(
        "--port",
        type=port_number,
        default=port,
        help=f"TCP port to listen on, 0 for any free one (default: {port})",
    )
    p.add_argument("--psk", metavar="FILE", help="pre-shared key file: only nodes with the same file can connect")
    p.add_argument(
        "--data-port",
        type=parse_data_port,
        default=-1,
        metavar="PORT|auto|off",
        help="TCP port of the TLS data plane that carries arrays (default: auto, the --port + 1, or any free "
        "port with --port 0); off: everything on the libp2p stream (slower)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default="127.0.0.1:0" if p.prog.endswith("serve") else None,
        help="serve Prometheus metrics there (serve: default 127.0.0.1:0, any free port; `off` disables)",
    )
    p.add_argument(
        "--compression",
        choices=("on", "off"),
        default="on",
        help="on (default): arrays cross a slow link packed when a sample says that is faster; off: never",
    )
    limit_options(p)


def limit_options(p: argparse.ArgumentParser) -> None:
    """Add the group of limits on what peers may send: LIMIT_OPTIONS and --dtypes."""
    g = p.add_argument_group("limits on what peers may send (see README, Security)")
    d = Limits()
    for flag, name, kind, shift, metavar, text in LIMIT_OPTIONS:
        default = getattr(d, name) >> shift if shift else getattr(d, name)
        shown = f"{default:g}" if kind.kind is float else str(default)
        g.add_argument(flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: {shown})")
    g.add_argument(
        "--dtypes",
        default=",".join(d.dtypes),
        metavar="LIST",
        help=f"dtypes accepted (default: {','.join(d.dtypes)})",
    )


TERMINAL_MIN_COLUMNS = 40  # a narrower $COLUMNS is taken as this: tables below it help nobody
UNBOUNDED_COLUMNS = 1 << 20  # no terminal and no $COLUMNS: a pipe or a file keeps whole lines


def terminal_columns() -> int:
    """The width tables and wrapped text fit: $COLUMNS, else the terminal's; without either (a pipe,
    a file) no width at all, so what a script greps stays on one line."""
    if not os.environ.get("COLUMNS") and not sys.stdout.isatty():
        return UNBOUNDED_COLUMNS
    return max(TERMINAL_MIN_COLUMNS, shutil.get_terminal_size((80, 24)).columns)


def print_report(role: str, peer: str, results: list[CheckRow], extra: dict[str, Any], as_json: bool) -> bool:
    """Print the checks table (and the JSON line); return True when all passed."""
    ok = bool(results) and all(r.ok for r in results)
    rows = [(r.name, "ok" if r.ok else "FAILED", f"{r.seconds:.2f}", r.detail) for r in results]
    print()
    print(format_table(("check", "result", "seconds", "detail"), rows, terminal_columns()))
    print()
    print(f"{'All checks passed' if ok else 'Some checks FAILED'} ({role}).", flush=True)
    if as_json:
        doc = {
            "ok": ok,
            "role": role,
            "version": __version__,
            "peer": peer,
            "checks": [r.as_json() for r in results],
            **extra,
        }
        print(json.dumps(doc), flush=True)
    return ok


def read_psk_file(path: str | None) -> str | None:
    """Return the 64-hex key of a --psk file (None without --psk)."""
    if path is None:
        return None
    try:
        return parse_psk(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pre-shared key file {path!r}: {exc.strerror}") from None


def trusted_peers(home: Path, extra: Iterable[str] = ()) -> set[str]:
    """Return the peer ids of --allow-peer plus $PANGEA_HOME/trusted_peers (one per line, # comments)."""
    ids = set()
    for peer_id in extra:
        if not is_peer_id(peer_id):
            raise UsageError(f"bad --allow-peer {peer_id!r}: not a peer id (base58, like 12D3KooW...)")
        ids.add(peer_id)
    path = home / TRUSTED_PEERS_FILENAME
    if path.exists():
        found, complaints = parse_trusted_peers(path.read_text())
        for complaint in complaints:
            log.warning("ignoring %s %s", path, complaint)
        ids |= found
    return ids


def remember_peer(home: Path, peer_id: str) -> None:
    """Append a paired peer to $PANGEA_HOME/trusted_peers (mode 0600)."""
    path = home / TRUSTED_PEERS_FILENAME
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{peer_id}  # paired {time.strftime('%Y-%m-%d %H:%M')}\n")


def add_initiate_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `initiate` command and its options."""
    p = sub.add_parser(
        "initiate", parents=verb_parents(), help="start node 1: print its address, wait for a responder, run the checks"
    )
    node_options(p, DEFAULT_PORT)
    run_options(p)
    p.add_argument(
        "--size",
        type=whole_number(2, MAX_MATRIX_N, "a matrix size"),
        default=AGGREGATE_N,
        metavar="N",
        help=f"size of the split matmul (default: {AGGREGATE_N})",
    )
    p.add_argument(
        "--transfer-mib",
        type=size_mib(1, BENCH_MAX_BYTES >> 20),
        default=THROUGHPUT_BYTES >> 20,
        metavar="MIB",
        help=f"array data sent each way for the throughput figure (default: {THROUGHPUT_BYTES >> 20})",
    )
    p.set_defaults(func=cmd_initiate)

    p.add_argument(
        "--allow-peer",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="a responder accepted without the pairing code (repeatable; also $PANGEA_HOME/trusted_peers)",
    )
    verify_option(p)
    p.add_argument(
        "--expect",
        type=whole_number(1, 64, "a number of responders"),
        default=1,
        metavar="N",
        help="wait for N responders and run the checks across all of them (default: 1)",
    )
    p.add_argument("--no-mdns", action="store_true", help="do not announce this initiator on the LAN by mDNS")


def cmd_initiate(args: argparse.Namespace) -> int:
    """`initiate`: listen, print the addresses and pairing code, wait for a responder, run the checks."""
    check_node_ports("initiate", args)
    limits, psk = limits_from_args(args), read_psk_file(args.psk)
    with node_session("initiator", args) as (home, session_dir):
        key_pair = load_or_create_identity(home)
        allowed = trusted_peers(home, args.allow_peer)
        farewell = Farewell()
        options = (limits, psk, allowed)
        return session_dir.finish(
            run_trio(_initiate, args, session_dir, key_pair, options, farewell, farewell=farewell)
        )


async def _wait_for_responders(node: Node, sessions: list[PeerSession], expect: int, timeout_s: float) -> None:
    """Collect sessions until ``expect`` responders are connected or the time is up."""
    import trio

    with trio.move_on_after(timeout_s):
        while len(sessions) < expect:
            session = await node.next_session()
            sessions[:] = [s for s in sessions if s.peer_id != session.peer_id and not s.closed.is_set()] + [session]
            count = f" ({len(sessions)} of {expect})" if expect > 1 else ""
            print(f"Responder connected: {session.peer_id} (pangea {session.hello.pangea_version}){count}", flush=True)


def mdns_enabled(args: argparse.Namespace) -> bool:
    """mDNS announcements unless --no-mdns or PANGEA_MDNS=off (the test suite sets it: no
    multicast leaves the test machine)."""
    setting = os.environ.get("PANGEA_MDNS", "on").strip().lower()
    return not getattr(args, "no_mdns", False) and setting not in ("off", "0", "no", "false", "disabled")


async def announce(node: Node, args: argparse.Namespace) -> Announcer | None:
    """Announce a waiting initiator by mDNS (in a thread: zeroconf blocks); None when off or impossible."""
    import trio

    if not mdns_enabled(args):
        return None
    announcer = Announcer(node.peer_id, node.addresses)
    try:
        if await trio.to_thread.run_sync(announcer.start):
            print("Announced on the LAN by mDNS: `./pangea.pyz respond --discover` finds this node", flush=True)
            return announcer
    except (OSError, RuntimeError, ValueError) as exc:  # zeroconf: no multicast on this network
        log.warning("cannot announce by mDNS (%s); pass the address by hand", describe_exception(exc))
    await trio.to_thread.run_sync(announcer.close)
    return None


@contextlib.asynccontextmanager
async def announced(node: Node, args: argparse.Namespace) -> AsyncIterator[Announcer | None]:
    """Announce the initiator by mDNS for the duration of the block; withdraw it even after Ctrl-C."""
    import trio

    announcer = await announce(node, args)
    try:
        yield announcer
    finally:
        if announcer is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(announcer.close)


def show_progress(args: argparse.Namespace) -> bool:
    """Live progress only on a terminal, and not with --json or --quiet."""
    return sys.stdout.isatty() and not getattr(args, "json", False) and not getattr(args, "quiet", False)


class LiveView:
    """Live progress on a terminal (rich): waiting, the current check, traffic, split blocks.

    A no-op when disabled (no terminal, --json, --quiet), so callers never test for it."""

    def __init__(self, enabled: bool, nursery: Any) -> None:
        self.enabled = enabled
        self.nursery = nursery  # where the refresh loops run
        self.progress: Any = None
        self._scopes: list[Any] = []

    def __enter__(self) -> LiveView:
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for scope in self._scopes:
            scope.cancel()
        if self.progress is not None:
            self.progress.stop()

    def add(self, description: str, total: float | None = None, info: str = "") -> Any:
        """Add a line; returns its handle (None when disabled)."""
        return None if self.progress is None else self.progress.add_task(description, total=total, info=info)

    def update(self, task: Any, **fields: Any) -> None:
        """Change a line: completed=..., description=..., info=..."""
        if self.progress is not None and task is not None and task in self.progress.task_ids:
            self.progress.update(task, **fields)

    def remove(self, task: Any) -> None:
        """Drop a line."""
        if self.progress is not None and task is not None and task in self.progress.task_ids:
            self.progress.remove_task(task)

    def _every(self, interval_s: float, fn: Callable[[float], None]) -> None:
        if self.progress is None:
            return
        import trio

        scope = trio.CancelScope()
        self._scopes.append(scope)

        async def loop() -> None:
            start = time.monotonic()
            with scope:
                while True:
                    try:
                        fn(time.monotonic() - start)
                    except Exception:  # NOTE: a display glitch must never stop the node
                        log.debug("progress display failed", exc_info=True)
                        return
                    await trio.sleep(interval_s)

        self.nursery.start_soon(loop)

    def tick(self, task: Any, fn: Callable[[float], tuple[float, str]]) -> None:
        """Refresh a line every 0.5 s from ``fn(elapsed) -> (completed, info)``."""
        self._every(0.5, lambda elapsed: self.update(task, completed=fn(elapsed)[0], info=fn(elapsed)[1]))

    def watch_traffic(self, node: Node) -> None:
        """A line with the bytes sent and received and the current rate (transfers of any size)."""
        task = self.add("traffic")
        last = [0.0, 0]

        def refresh(elapsed: float) -> None:
            total = node.bytes_in + node.bytes_out
            rate = (total - last[1]) / max(elapsed - last[0], 1e-3) / 1e6
            last[:] = [elapsed, total]
            info = f"sent {format_bytes(node.bytes_out)}, received {format_bytes(node.bytes_in)}, {rate:.0f} MB/s"
            self.update(task, info=info)

        self._every(0.5, refresh)

    def block_counter(self) -> Callable[[str, int, int], None] | None:
        """A progress bar of a split job's rows, with the blocks done per worker."""
        if self.progress is None:
            return None
        state: dict[str, Any] = {"task": None, "per": {}}

        def on_block(worker: str, rows: int, total: int) -> None:
            if state["task"] is None:
                state["task"] = self.add("split matmul rows", total=total)
            per = state["per"]
            per[worker] = per.get(worker, 0) + 1
            text = ", ".join(f"{'local' if w == LOCAL else short_id(w)} {b}" for w, b in per.items())
            self.progress.advance(state["task"], rows)
            self.update(state["task"], info=f"blocks: {text}")

        return on_block


async def _initiate(
    args: argparse.Namespace,
    session_dir: SessionDir,
    key_pair: Any,
    options: tuple[Limits, str | None, set[str]],
    farewell: Farewell,
) -> int:

    import trio

    limits, psk, allowed = options
    chosen: list[str] = []
    expect = args.expect
    pairing = Pairing(new_pairing_code(), expires_at=time.monotonic() + args.timeout, max_uses=expect)
    stop_waiting = trio.CancelScope()  # cancelled when wrong tries burn the code: nobody can pair any more

    def accept(peer_id: str, hello: HelloMsg) -> str | Refusal | None:
        if hello.role != "responder":
            return f"this initiator works with a responder, not a {hello.role!r}"
        if peer_id in chosen:
            return None  # a responder reconnecting
        if len(chosen) >= expect:
            return f"this initiator already has its {expect} responder(s): {', '.join(chosen)}"
        if peer_id not in allowed:
            source = multiaddr_ip(node.remote_address(peer_id)) or ""
            refusal = pairing.check(hello.pairing_proof, node.peer_id, peer_id, time.monotonic(), source)
            if pairing.burned:
                stop_waiting.cancel()
            if refusal is not None:
                return refusal
        chosen.append(peer_id)
        return None

    node = Node(
        key_pair=key_pair,
        role="initiator",
        accept=accept,
        may_serve=lambda peer_id: False,
        limits=limits,
        psk=psk,
        data_port=args.data_port,
    )
    manager = Manager(node)
    manager.verify_rounds = args.verify_rounds
    async with node.running(args.host, args.port):
        node.nursery.start_soon(manager.watch_suspects)
        _announce_initiator(args, node, manager, session_dir, pairing)
        sessions: list[PeerSession] = []
        farewell.say = lambda: _say_bye(sessions, INITIATOR_STOPPED)  # on Ctrl-C or SIGTERM
        view = LiveView(show_progress(args), node.nursery)
        with view:
            view.watch_traffic(node)
            waiting = view.add("waiting for responders", total=args.timeout)
            view.tick(waiting, lambda elapsed: (elapsed, f"{len(sessions)} of {expect} connected"))
            async with announced(node, args):  # on the LAN only while waiting
                with stop_waiting:
                    await _wait_for_responders(node, sessions, expect, args.timeout)
                if stop_waiting.cancel_called and len(sessions) < expect:
                    await trio.sleep(PAIRING_BURNED_GRACE_S)  # the last wrong try's refusal reaches its peer
            view.remove(waiting)
            if len(sessions) == expect:
                transfer = args.transfer_mib << 20
                checks = InitiatorChecks(node, manager, sessions, size=args.size, transfer_bytes=transfer)
                current = view.add("checks")
                checks.on_check = lambda name: view.update(current, description=f"check: {name}")
                checks.on_block = view.block_counter()
                results = await checks.run_all()
        if len(sessions) < expect:
            raise _too_few_responders(args, node, sessions, pairing)
    return _initiator_report(args, node, sessions, checks, results)


INITIATOR_STOPPED = "interrupted by Ctrl-C or SIGTERM"  # its Bye to the responders


async def _say_bye(sessions: list[PeerSession], reason: str) -> None:
    """Tell every responder still connected that we leave, and why."""
    for session in sessions:
        if not session.closed.is_set():
            await session.bye(reason)


def _announce_initiator(
    args: argparse.Namespace, node: Node, manager: Manager, session_dir: SessionDir, pairing: Pairing
) -> None:
    """Save the initiator's addresses and session, start its metrics, print how a responder joins it."""
    expect = args.expect
    session_dir.write_addresses(node.addresses)
    metrics_url = start_metrics(args.metrics, node, manager)
    session_dir.save(peer_id=node.peer_id, metrics=metrics_url)
    print(f"pangea {__version__} initiator, peer ID {node.peer_id}")
    if metrics_url:
        print(f"Metrics: {metrics_url}")
    print("Copy this address for responder:")
    for address in node.addresses:
        print(f"  {address}")
    uses = "one use" if expect == 1 else f"{expect} uses"
    print(f"Pairing code ({uses}, valid {args.timeout:.0f} s): {format_pairing_code(pairing.code)}")
    if node.addresses:
        print(f"Join string: {join_string(node.addresses[0], pairing.code)}")
        print(f"  on the other box: ./pangea.pyz respond '{join_string(node.addresses[0], pairing.code)}'")
    print(node.data_plane_text())
    who = "a responder" if expect == 1 else f"{expect} responders"
    print(f"Waiting up to {args.timeout:.0f} s for {who} (Ctrl-C to stop)...", flush=True)
    log.info("listening on %s (pairing code issued)", ", ".join(node.addresses))


def _too_few_responders(
    args: argparse.Namespace, node: Node, sessions: list[PeerSession], pairing: Pairing
) -> NoPeerError:
    """The error of an initiator that did not get its responders: its code burned by wrong tries,
    or the time ran out (the code expired); with a hint on reaching it."""
    port = node.addresses[0].split("/tcp/")[1].split("/")[0] if node.addresses else args.port
    expect = pairing.max_uses
    got = "nobody" if not sessions else f"only {len(sessions)} of {expect} responders"
    if pairing.burned:
        return NoPeerError(
            f"cannot run the checks: {pairing.burned_text()}; {got} paired",
            kind=ErrorKind.REFUSED,
            hint="run `./pangea.pyz initiate` again for a new code, and give the responder its join string whole "
            "(if those tries were not yours, someone else reaches this port)",
        )
    expired = "the pairing code expired" + (
        f" after {pairing.failures} wrong tries from {', '.join(pairing.tried_by)}"
        if pairing.failures
        else ("" if pairing.used_by else " unused")
    )
    return NoPeerError(
        f"cannot run the checks: {got} connected within {format_seconds(args.timeout)}; {expired}",
        kind=ErrorKind.TIMEOUT,
        hint=f"on the other box run `./pangea.pyz respond` with the join string printed above; "
        f"check that box can reach this one (same network, firewall open for TCP port {port}"
        + (f", and {node.data_plane.port} for the data plane)" if node.data_plane else ")"),
    )


def _initiator_report(
    args: argparse.Namespace, node: Node, sessions: list[PeerSession], checks: InitiatorChecks, results: list[CheckRow]
) -> int:
    """Print the initiator's report of the checks; return the exit code (0 when every check passed)."""
    extra = {
        "addresses": node.addresses,
        "rtt_ms": checks.rtt_ms,
        "throughput_mb_s": checks.throughput,
        "peers": [s.peer_id for s in sessions],
        "shares": checks.shares,
    }
    ok = print_report("initiator", sessions[0].peer_id, results, extra, args.json)
    return 0 if ok else 1


def discover_one(interactive: bool) -> str:
    """Find the initiator for `respond --discover` by mDNS: the only one, or the one the user picks."""
    print(f"Looking for initiators on this network (mDNS, up to {DISCOVER_S:.0f} s)...", flush=True)
    found = discover_initiators()
    if not found:
        raise NoPeerError(
            "cannot find an initiator on this network by mDNS",
            kind=ErrorKind.UNREACHABLE,
            hint="start `./pangea.pyz initiate` on the other box (on the same LAN; mDNS does not cross "
            "routers or most VPNs), or paste its address instead",
        )
    for number, item in enumerate(found, 1):
        print(f"  {number}) {item['address']} (pangea {item['version']})")
    if len(found) == 1:
        return str(found[0]["address"])
    if not interactive:
        raise UsageError(f"{len(found)} initiators found; pass the address of the one to join")

    def pick(choice: str) -> str:
        if not (choice.isdigit() and 1 <= int(choice) <= len(found)):
            raise UsageError(f"no initiator {choice!r}: type a number from 1 to {len(found)}")
        return str(found[int(choice) - 1]["address"])

    picked = ask_until_valid(f"Which one [1-{len(found)}]: ", pick)
    if picked is None:
        raise UsageError("no initiator chosen", hint="run `respond --discover` again, or paste the address")
    return picked


JOIN_ENV = "PANGEA_JOIN"  # `respond` without ADDRESS reads the join string from here (demo passes it so)


def add_respond_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `respond` command and its options."""
    p = sub.add_parser("respond", parents=verb_parents(), help="start node 2: connect to an initiator and do its work")
    p.add_argument(
        "address",
        nargs="?",
        help="the join string the initiator printed (pangea://...#CODE), or its multiaddr; - reads it from stdin "
        f"(one line), and without ADDRESS ${JOIN_ENV} is used when set: on a shared machine prefer either, as "
        "other users can read a command line (ps)",
    )
    p.add_argument("--code", help="the initiator's pairing code, when ADDRESS is a bare multiaddr")
    p.add_argument(
        "--discover",
        action="store_true",
        help="find the initiator on this LAN by mDNS instead of pasting its address (the code is still needed)",
    )
    node_options(p, 0)
    run_options(p)
    fault_option(p)
    p.set_defaults(func=cmd_respond)


def join_text(address: str | None, discover: bool) -> str | None:
    """The join string or address `respond` was given: ADDRESS, one line of stdin for ``-``, else
    $PANGEA_JOIN (unless --discover); None when none was given. The last two keep the pairing
    code out of the process table, where other users of the machine can read a command line."""
    if address == "-":
        text = sys.stdin.readline().strip()
        if not text:
            raise UsageError("no initiator address on stdin", hint="echo 'pangea://...#CODE' | ./pangea.pyz respond -")
        return text
    if address is None and not discover:
        return os.environ.get(JOIN_ENV, "").strip() or None
    return address


PASTE_PROMPT = "Paste the initiator's join string or address: "


def cmd_respond(args: argparse.Namespace) -> int:
    """`respond`: dial the initiator, serve its tasks until it says done."""
    check_node_ports("respond", args)
    text = join_text(args.address, args.discover)
    interactive = sys.stdin.isatty()
    if text is None and args.discover and not args.code and not interactive:
        # NOTE: mDNS never carries the code, and without a terminal nobody can type it
        raise UsageError(
            "cannot join an initiator found by --discover: no pairing code (the initiator does not announce it, "
            "and there is no terminal to type it)",
            hint="add --code CODE (the code the initiator printed), or pass its join string instead of --discover",
        )
    if text is None and args.discover:
        text = discover_one(interactive)
    # NOTE: at the terminal a bad paste is asked for again (ask_until_valid); Enter or Ctrl-D gives up.
    pasted = None if text is not None or not interactive else ask_until_valid(PASTE_PROMPT, parse_peer_address)
    if text is None and pasted is None:
        raise UsageError(
            "no initiator address given",
            hint="./pangea.pyz respond 'pangea://ip4/<ip>/tcp/<port>/p2p/<id>#CODE' (on a shared machine: "
            f"pipe it to `respond -`, or set ${JOIN_ENV})",
        )
    address = pasted or parse_peer_address(str(text))
    if args.code:
        address = dataclasses.replace(address, code=normalize_pairing_code(args.code))
    elif not address.code and interactive:
        typed = ask_until_valid(
            "Pairing code shown by the initiator (Enter if it allowed this peer): ", normalize_pairing_code
        )
        if typed:
            address = dataclasses.replace(address, code=typed)
    limits, psk = limits_from_args(args), read_psk_file(args.psk)
    with node_session("responder", args) as (home, session_dir):
        key_pair = load_or_create_identity(home)
        farewell = Farewell()
        options = (limits, psk)
        return session_dir.finish(
            run_trio(_respond, args, address, session_dir, key_pair, options, farewell, farewell=farewell)
        )


RESPONDER_STOPPED = "stopped by Ctrl-C or SIGTERM"  # its Bye to the initiator


async def _respond(
    args: argparse.Namespace,
    address: PeerAddress,
    session_dir: SessionDir,
    key_pair: Any,
    options: tuple[Limits, str | None],
    farewell: Farewell,
) -> int:
    node = _responder_node(args, address, key_pair, options)
    results: list[CheckRow] = []
    async with node.running(args.host, args.port):
        metrics_url = start_metrics(args.metrics, node, None)
        session_dir.save(peer_id=node.peer_id, initiator=address.text, metrics=metrics_url)
        print(f"pangea {__version__} responder, peer ID {node.peer_id}")
        if metrics_url:
            print(f"Metrics: {metrics_url}")
        print(f"Connecting to {address.text} (up to {args.timeout:.0f} s)...", flush=True)
        start = time.perf_counter()
        session = await node.dial(address, timeout_s=args.timeout, who="the initiator")
        farewell.say = lambda: session.bye(RESPONDER_STOPPED)  # on Ctrl-C or SIGTERM: tell the initiator why
        rtt_s = min([await session.ping() for _ in range(3)])
        results.append(_connection_row(node, session, start, rtt_s))
        print(f"Connected to initiator {session.peer_id}; serving its tasks until it says done.", flush=True)
        serve_start = time.perf_counter()
        with LiveView(show_progress(args), node.nursery) as view:
            view.watch_traffic(node)
            serving = view.add("serving the initiator")
            view.tick(serving, lambda elapsed: (0, f"{session.tasks_served} task(s) done"))
            await session.closed.wait()
    return _responder_report(args, session, results, serve_start, rtt_s)


def _responder_node(
    args: argparse.Namespace, address: PeerAddress, key_pair: Any, options: tuple[Limits, str | None]
) -> Node:
    """The responder's node: it accepts and serves only the initiator at ``address``."""
    return Node(
        key_pair=key_pair,
        role="responder",
        accept=lambda peer_id, hello: (
            None if peer_id == address.peer_id else f"this responder only works for {address.peer_id}"
        ),
        may_serve=lambda peer_id: peer_id == address.peer_id,
        limits=options[0],
        psk=options[1],
        faults=FaultInjector(args.fault) if args.fault else None,
        data_port=args.data_port,
    )


def _connection_row(node: Node, session: PeerSession, start: float, rtt_s: float) -> CheckRow:
    """The responder's "connection" check: who the initiator is, how it is reached, the round trip."""
    info = node.connection_info(session.peer_id)
    return CheckRow(
        "connection",
        True,
        time.perf_counter() - start,
        f"initiator {session.peer_id} (pangea {session.hello.pangea_version}); "
        f"{info['security']} + {info['muxer']}; rtt {rtt_s * 1000:.2f} ms; arrays: {session.data_note}",
    )


def _initiator_ending(bye_reason: str | None) -> str:
    """How an initiator that did not say done ended, for "the initiator <ending>": interrupted
    (its Bye says Ctrl-C or SIGTERM), left (a Bye with another reason) or vanished (no Bye)."""
    if bye_reason is None:
        return "vanished"
    return "was interrupted" if bye_reason == INITIATOR_STOPPED else "left"


def _responder_report(
    args: argparse.Namespace, session: PeerSession, results: list[CheckRow], serve_start: float, rtt_s: float
) -> int:
    """Add the "tasks" and "finish" checks, print the responder's report; return the exit code."""
    done = session.bye_reason == "done"
    ended = _initiator_ending(session.bye_reason)
    served = (
        f"{session.tasks_served} task(s) served, {format_bytes(session.bytes_in)} in, "
        f"{format_bytes(session.bytes_out)} out"
    )
    if not done:
        served += f"; the initiator {ended} before its checks finished"
    elif not session.tasks_served:
        served += "; the initiator sent none"
    results.append(CheckRow("tasks", done and session.tasks_served > 0, time.perf_counter() - serve_start, served))
    results.append(
        CheckRow(
            "finish",
            done,
            0.0,
            "the initiator said done" if done else f"the initiator {ended}: {session.close_reason}",
        )
    )
    ok = print_report("responder", session.peer_id, results, {"rtt_ms": rtt_s * 1000}, args.json)
    if not done:
        print(f"pangea: error: the initiator {ended} mid-run: {session.close_reason}", file=sys.stderr)
    return 0 if ok else 1


def self_command() -> list[str]:
    """Return the command that starts this same pangea (the pyz, or pangea.py)."""
    import zipfile

    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0 and os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        return [sys.executable, argv0]
    return [sys.executable, str(Path(__file__).resolve())]


def _pump(proc: subprocess.Popen[str], prefix: str, found: list[str], ready: threading.Event | None) -> None:
    assert proc.stdout is not None
    width = terminal_columns() - len(f"{prefix} | ")
    for line in proc.stdout:
        # NOTE: a line with a peer id, an address or a join string in it stays whole, to be copied
        whole = any(len(word) >= 40 for word in line.split())
        for piece in (line.rstrip("\n") if whole else wrap_text(line.rstrip("\n"), width, indent="  ")).split("\n"):
            print(f"{prefix} | {piece}", flush=True)
        stripped = line.strip()
        if ready is not None and stripped.startswith("Join string: pangea://"):
            found.append(stripped.removeprefix("Join string: "))
            ready.set()
    if ready is not None:
        ready.set()


def add_demo_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `demo` command and its options."""
    p = sub.add_parser(
        "demo", parents=verb_parents(), help="run an initiator and a responder on this machine and show the whole flow"
    )
    p.add_argument(
        "--size",
        type=whole_number(2, MAX_MATRIX_N, "a matrix size"),
        default=AGGREGATE_N,
        metavar="N",
        help="size of the split matmul",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """`demo`: run an initiator and a responder as two processes on loopback."""
    home = pangea_home()
    for role in ("initiator", "responder"):
        (home / "demo" / role).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home / "demo", 0o700)
    command = self_command()
    header = "pangea demo: an initiator and a responder on this machine, talking libp2p over 127.0.0.1"
    print(wrap_text(header, terminal_columns(), indent="  ") + "\n", flush=True)
    procs: list[subprocess.Popen[str]] = []
    threads = []
    try:
        columns = str(terminal_columns() - len("initiator | "))  # each child's lines get that prefix
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": columns,
            "PANGEA_HOME": str(home / "demo" / "initiator"),
        }
        initiator = subprocess.Popen(
            [*command, "initiate", "--host", "127.0.0.1", "--port", "0", "--size", str(args.size)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(initiator)
        found: list[str] = []
        ready = threading.Event()
        threads.append(threading.Thread(target=_pump, args=(initiator, "initiator", found, ready), daemon=True))
        threads[-1].start()
        if not ready.wait(60) or not found:
            raise PangeaError(
                "cannot run the demo: the initiator did not print its address",
                hint="run `./pangea.pyz initiate --port 0` by hand to see why",
            )
        # NOTE: the join string carries the pairing code: in the environment (readable by this
        # user only), never on the command line, which every user of the machine can read (ps).
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": columns,
            "PANGEA_HOME": str(home / "demo" / "responder"),
        }
        env[JOIN_ENV] = found[0]
        responder = subprocess.Popen([*command, "respond"], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(responder)
        threads.append(threading.Thread(target=_pump, args=(responder, "responder", [], None), daemon=True))
        threads[-1].start()
        codes = [p.wait(timeout=600) for p in procs]
        for t in threads:
            t.join(timeout=5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
    ok = codes == [0, 0]
    print(f"\npangea demo: {'both nodes finished, every check passed' if ok else f'FAILED (exit codes {codes})'}")
    return 0 if ok else 1


###############################################################################
# 26. CLI: serve and call
#
# `serve`, the long-running node (its RPC endpoint, dashboard and queue), and
# `call`, a Client of a serve node: one RPC call, printed readably or as JSON.
###############################################################################


def warn_token_on_command_line(option: str, safer: str) -> None:
    """Say on stderr (one line) that a token given as ``option TOKEN`` is visible to other users."""
    print(
        f"pangea: warning: {option} TOKEN puts the token on the command line, where other users of this machine "
        f"can read it (ps, /proc/PID/cmdline); use {safer} or $PANGEA_RPC_TOKEN instead",
        file=sys.stderr,
        flush=True,
    )


def read_rpc_token(args: argparse.Namespace) -> str:
    """Return the RPC token from --rpc-token, --rpc-token-file or $PANGEA_RPC_TOKEN ("" if none)."""
    if args.rpc_token and args.rpc_token_file:
        raise UsageError("give either --rpc-token or --rpc-token-file, not both")
    token = args.rpc_token if args.rpc_token is not None else os.environ.get("PANGEA_RPC_TOKEN", "")
    supplied = args.rpc_token is not None or bool(args.rpc_token_file)
    if args.rpc_token_file:
        token = read_token_file(args.rpc_token_file)
    if (token or supplied) and len(token) < MIN_TOKEN_CHARS:
        raise UsageError(
            f"the RPC token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}",
            hint="generate one: python3 -c 'import secrets; print(secrets.token_hex(16))'",
        )
    if args.rpc_token is not None:
        warn_token_on_command_line("--rpc-token", "--rpc-token-file FILE")
    return token


def read_call_token(args: argparse.Namespace) -> str | None:
    """Return the token of `call`: --token-file, --token (with a warning), or None ($PANGEA_RPC_TOKEN)."""
    if args.token is not None and args.token_file:
        raise UsageError("give either --token or --token-file, not both")
    if args.token_file:
        return read_token_file(args.token_file)
    if args.token is not None:
        warn_token_on_command_line("--token", "--token-file FILE")
    token: str | None = args.token
    return token


def add_serve_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `serve` command and its options."""
    p = sub.add_parser(
        "serve", parents=verb_parents(), help="run a long-lived node with a Cap'n Proto RPC endpoint for your programs"
    )
    node_options(p, DEFAULT_PORT)
    p.add_argument(
        "--split-hold",
        choices=("on", "off"),
        default="on",
        help="on (default): a split task sends b (each whole operand) to each worker once, held there for the job; "
        "off: every block carries it (less memory on the workers, more bytes on the network)",
    )
    p.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        nargs="?",
        const=f"127.0.0.1:{DEFAULT_DASHBOARD_PORT}",
        help=f"serve a live page of the node's peers, tasks and throughput (default 127.0.0.1:{DEFAULT_DASHBOARD_PORT};"
        " off loopback: HTTPS with a certificate of its own, and the RPC token required)",
    )
    p.add_argument(
        "--state-max-gib",
        type=NumberOption(float, 0.0, 1 << 20, "a number of GiB"),
        default=DEFAULT_STATE_MAX_GIB,
        metavar="GIB",
        help=f"disk the task queue may use in $PANGEA_HOME/{QUEUE_DIRNAME} for tasks' operands and results waiting "
        f"for their clients (default: {DEFAULT_STATE_MAX_GIB:g}); over it, new tasks are refused. 0: no journal "
        "(tasks live only as long as this process)",
    )
    p.add_argument(
        "--state-retention-hours",
        type=NumberOption(float, 0.001, 24 * 365, "a number of hours"),
        default=DEFAULT_STATE_RETENTION_HOURS,
        metavar="HOURS",
        help=f"how long a result waits for its client in the task queue (default: {DEFAULT_STATE_RETENTION_HOURS:g})",
    )
    p.add_argument(
        "--rpc",
        default=f"127.0.0.1:{DEFAULT_RPC_PORT}",
        metavar="HOST:PORT",
        help=f"RPC endpoint (default: 127.0.0.1:{DEFAULT_RPC_PORT}; another host needs a token)",
    )
    p.add_argument(
        "--rpc-token",
        metavar="TOKEN",
        help="token RPC clients must present; unsafe on a shared machine (other users can read a command line: "
        "ps), so prefer --rpc-token-file FILE or $PANGEA_RPC_TOKEN",
    )
    p.add_argument(
        "--rpc-token-file",
        metavar="FILE",
        help="read the RPC token from this file (mode 0600: a file other users can read is refused)",
    )
    p.add_argument(
        "--rpc-open",
        action="store_true",
        help=f"no RPC token: every user of this machine can use the node (default: a token kept in "
        f"$PANGEA_HOME/{RPC_TOKEN_FILENAME}, which local programs of this user read; loopback only)",
    )
    p.add_argument(
        "--rpc-max-mib",
        type=size_mib(1, RPC_MAX_MIB),
        default=None,
        metavar="MIB",
        help=f"largest RPC message (default: half the --memory-budget-mib plus {RPC_MESSAGE_ROOM_BYTES >> 20} MiB, "
        f"at most {RPC_MAX_MIB}: {rpc_max_bytes_for_budget(DEFAULT_MEMORY_BUDGET_BYTES) >> 20} MiB with the "
        "default budget)",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="MULTIADDR|JOIN",
        help="a node to dial, trust and keep connected (repeatable): its multiaddr (it must trust this node: "
        "--allow-peer), or the join string 'pangea://...#CODE' a `serve --pair` node printed (pairs with it once; "
        "add --remember there, so it lasts past a restart). Other users of this machine can read a command line "
        "(ps), code included; "
        f"${JOIN_ENV} is read by `respond` only",
    )
    p.add_argument(
        "--allow-peer",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="a peer id allowed to connect and submit tasks (repeatable; also $PANGEA_HOME/trusted_peers)",
    )
    fault_option(p)
    verify_option(p)
    p.add_argument(
        "--suspect-backoff",
        type=NumberOption(float, 0.1, SUSPECT_BACKOFF_MAX_S, "a number of seconds"),
        default=SUSPECT_BACKOFF_S,
        metavar="SECONDS",
        help="wait before a worker whose result failed verification gets a canary task "
        f"(default: {SUSPECT_BACKOFF_S:g}; doubles per failed canary, up to {SUSPECT_BACKOFF_MAX_S:g})",
    )
    p.add_argument("--pair", action="store_true", help="print a one-time pairing code a new peer can connect with")
    p.add_argument(
        "--pair-timeout",
        type=positive_seconds(),
        default=600.0,
        metavar="SECONDS",
        help="how long the pairing code stays valid (default: 600)",
    )
    p.add_argument(
        "--remember",
        action="store_true",
        help="add peers that paired to $PANGEA_HOME/trusted_peers, so they need no code next time",
    )
    p.set_defaults(func=cmd_serve)


@dataclass(frozen=True)
class RpcEndpoint:
    """What `serve` listens on for RPC and what a client must present there."""

    host: str
    port: int
    token: str  # "" with --rpc-open: no login needed
    token_file: Path | None  # the home's token file, when the token is the home's
    tls_pem: Path | None  # off loopback: the certificate and key of the TLS endpoint
    fingerprint: bytes  # the SHA-256 of that certificate (b"" on loopback)


def check_rpc_options(args: argparse.Namespace) -> str:
    """Check `serve`'s RPC options before anything starts; return the token they give ("" if none)."""
    host, port = parse_host_port(args.rpc, DEFAULT_RPC_PORT)
    token, local = read_rpc_token(args), is_loopback_host(host)
    if args.rpc_open and (token or not local):
        raise UsageError(
            "--rpc-open serves RPC without a token, so only on loopback and without --rpc-token(-file)",
            hint="drop --rpc-open, or serve on 127.0.0.1 with no token option",
        )
    if not local and not token:
        raise ConfigError(
            f"cannot serve RPC on {host}:{port} without a token: anyone who reaches that port could use this node",
            hint="add --rpc-token-file FILE (or --rpc-token TOKEN), or keep the default 127.0.0.1",
        )
    return token


def rpc_endpoint(args: argparse.Namespace, home: Path, token: str) -> RpcEndpoint:
    """The RPC endpoint `serve` opens: on loopback, plain with a token (the home's own by default,
    so other users of the box cannot use the node); elsewhere TLS 1.3 and the token given."""
    host, port = parse_host_port(args.rpc, DEFAULT_RPC_PORT)
    local, token_file = is_loopback_host(host), None
    if local and not token and not args.rpc_open:
        token, token_file = home_rpc_token(home)
    tls_pem, fingerprint = rpc_tls_identity(home) if not local else (None, b"")
    return RpcEndpoint(host, port, token, token_file, tls_pem, fingerprint)


def cmd_serve(args: argparse.Namespace) -> int:
    """`serve`: a long-running node with an RPC endpoint; stops cleanly on SIGTERM/Ctrl-C."""
    check_node_ports("serve", args, args.rpc)
    token = check_rpc_options(args)
    peers = [parse_peer_address(text) for text in args.peer]
    limits, psk = limits_from_args(args), read_psk_file(args.psk)
    with node_session("serve", args) as (home, session_dir):
        rpc = rpc_endpoint(args, home, token)
        ensure_port_free(rpc.host, rpc.port, option="--rpc HOST:PORT")
        dashboard = dashboard_endpoint(args.dashboard, rpc.token, home)
        key_pair = load_or_create_identity(home)
        trusted = trusted_peers(home, args.allow_peer) | {p.peer_id for p in peers}
        options = (limits, psk, trusted, home, dashboard)
        code = run_trio(_serve, args, session_dir, key_pair, rpc, peers, options)
        session_dir.finish(0 if code in (130, 128 + signal.SIGTERM) else code)  # how a service stops: no log kept
    return 0 if code == 128 + signal.SIGTERM else code  # SIGTERM is how a service is meant to stop


async def _serve(
    args: argparse.Namespace,
    session_dir: SessionDir,
    key_pair: Any,
    rpc: RpcEndpoint,
    peers: list[PeerAddress],
    options: tuple[Limits, str | None, set[str], Path, DashboardEndpoint | None],
) -> int:
    import trio

    limits, psk, trusted, home, dashboard = options
    pairing = (
        Pairing(new_pairing_code(), expires_at=time.monotonic() + args.pair_timeout, issuer="serve --pair")
        if args.pair
        else None
    )

    def accept(peer_id: str, hello: HelloMsg) -> str | Refusal | None:
        if peer_id in trusted:
            return None
        if pairing is not None and hello.pairing_proof:
            source, was_burned = multiaddr_ip(node.remote_address(peer_id)) or "", pairing.burned
            refusal = pairing.check(hello.pairing_proof, node.peer_id, peer_id, time.monotonic(), source)
            if pairing.burned and not was_burned:  # this try burned it: say so once, on the console
                print(f"pangea: {pairing.burned_text()}; restart `serve --pair` for a new code", flush=True)
            if refusal is not None:
                return refusal
            trusted.add(peer_id)
            print(f"pangea: paired with {peer_id}" + (" (remembered)" if args.remember else ""), flush=True)
            if args.remember:
                remember_peer(home, peer_id)
            return None
        return (
            f"peer {peer_id} is not trusted by node {node.peer_id}; start that node with --allow-peer {peer_id}, "
            "or pair with the code of `serve --pair`"
        )

    node = Node(
        key_pair=key_pair,
        role="serve",
        accept=accept,
        may_serve=lambda peer_id: peer_id in trusted,
        limits=limits,
        psk=psk,
        faults=FaultInjector(args.fault) if args.fault else None,
        data_port=args.data_port,
    )
    manager = Manager(node, suspect_backoff_s=args.suspect_backoff)
    manager.verify_rounds = args.verify_rounds
    manager.split_hold = args.split_hold == "on"
    manager.on_suspicion.append(lambda *_: session_dir.save(suspects=saved_suspects(manager)))
    service = NodeService(node, manager, trust=trusted.add, rpc_address="")
    rpc_max_bytes = args.rpc_max_mib << 20 if args.rpc_max_mib else rpc_max_bytes_for_budget(limits.memory_budget_bytes)
    async with node.running(args.host, args.port):
        if rpc.port:  # NOTE: its journal is read back before the first call can ask for a result
            await start_task_queue(args, service, home, rpc.port)
        server = RpcServer(service, rpc.host, rpc.port, token=rpc.token, max_bytes=rpc_max_bytes, tls_pem=rpc.tls_pem)
        host, port = await server.start()
        service.rpc_address = f"{host}:{port}"
        if not rpc.port:
            await start_task_queue(args, service, home, port)
        for peer in peers:
            node.nursery.start_soon(keep_connected, node, peer)
        node.nursery.start_soon(manager.watch_suspects)
        page = dashboard and Dashboard(service, dashboard)
        dashboard_url = await node.nursery.start(page.run) if page else ""
        _announce_serve(args, node, manager, service, session_dir, rpc, trusted, pairing, dashboard, dashboard_url)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                service.shutdown()
                await trio.sleep(0.2)  # let the cancelled calls' errors reach their clients
                await server.stop()
    return 0


async def start_task_queue(args: argparse.Namespace, service: NodeService, home: Path, port: int) -> None:
    """Start the serve node's task queue on the journal of its RPC port (none with --state-max-gib 0)."""
    journal = None
    if args.state_max_gib > 0:
        try:
            journal, note = TaskJournal.open(home / QUEUE_DIRNAME / str(port))
        except (OSError, JournalUnreadable) as exc:
            raise SessionError(
                f"cannot keep the task queue in {home / QUEUE_DIRNAME}: {describe_exception(exc)}",
                hint="check the permissions and free space of $PANGEA_HOME, or run without a journal "
                "(--state-max-gib 0)",
            ) from None
        if note:
            log.warning("%s", note)
    max_bytes = int(args.state_max_gib * (1 << 30))
    await service.node.nursery.start(service.start_queue, journal, max_bytes, args.state_retention_hours * 3600.0)


def _announce_serve(
    args: argparse.Namespace,
    node: Node,
    manager: Manager,
    service: NodeService,
    session_dir: SessionDir,
    rpc: RpcEndpoint,
    trusted: set[str],
    pairing: Pairing | None,
    dashboard: DashboardEndpoint | None = None,
    dashboard_url: str = "",
) -> None:
    """Save the serve node's addresses and session, start its metrics, print its banner and ready line."""
    session_dir.write_addresses(node.addresses)
    metrics_url = start_metrics(args.metrics, node, manager, service.queue)
    fingerprint = format_fingerprint(rpc.fingerprint) if rpc.fingerprint else ""
    session_dir.save(
        peer_id=node.peer_id,
        rpc=service.rpc_address,
        rpc_fingerprint=fingerprint,
        metrics=metrics_url,
        bulk=service.bulk_path,
        dashboard=dashboard_url,
    )
    print(f"pangea {__version__} serve node, peer ID {node.peer_id}")
    print("Addresses for peers (./pangea.pyz serve --peer <address>):")
    for address in node.addresses:
        print(f"  {address}")
    if rpc.tls_pem is not None:
        print(f"RPC: {service.rpc_address} (TLS 1.3, token required)")
        print(f"RPC fingerprint: {fingerprint} (clients pin it: call --fingerprint, Client(fingerprint=...))")
    elif rpc.token_file is not None:
        print(f"RPC: {service.rpc_address} (token required; programs of this user read it from {rpc.token_file})")
    elif rpc.token:
        print(f"RPC: {service.rpc_address} (token required)")
    else:
        print(f"RPC: {service.rpc_address} (open: no token; every user of this machine can use this node)")
    print(node.data_plane_text())
    if metrics_url:
        print(f"Metrics: {metrics_url}")
    if dashboard is not None:  # off loopback: how to open it (its certificate, for the browser's warning)
        cert = f"certificate {format_fingerprint(dashboard.fingerprint)}" if dashboard.tls_pem else ""
        print(f"Dashboard: {dashboard_url}" + (f" (HTTPS, {cert}; open {dashboard_url}?token=TOKEN once)" * bool(cert)))
    print(f"Trusted peers: {', '.join(sorted(trusted)) or 'none yet (--allow-peer, --peer, --pair)'}")
    if pairing is not None and node.addresses:
        print(f"Pairing code (one use, valid {args.pair_timeout:.0f} s): {format_pairing_code(pairing.code)}")
        print(f"Join string: {join_string(node.addresses[0], pairing.code)}")
    print(serving_line(args.host, node.addresses), flush=True)


def saved_suspects(manager: Manager) -> list[dict[str, Any]]:
    """The suspicions `status` shows from a session directory (times as Unix times: no stale countdowns)."""
    now = time.time()
    return [
        {
            "peer_id": peer_id,
            "state": info["state"],
            "reason": info["reason"],
            "since": info["since"],
            "probe_at": now + info["next_probe_s"] if info["state"] == "suspect" else 0.0,
        }
        for peer_id, info in manager.suspicions().items()
    ]


async def keep_connected(node: Node, address: PeerAddress) -> None:
    """Keep a session with a --peer: dial it, and redial with backoff whenever it drops."""
    import trio

    delays = backoff_delays(1.0, REDIAL_MAX_S)
    notes = RedialNotes(address.peer_id)  # NOTE: the full id: scripts wait for "connected to peer <id>"
    while True:
        session = node.sessions.get(address.peer_id)
        if session is None:
            try:
                session = await node.dial(address, timeout_s=10.0, who="that node")
                print(f"pangea: {notes.connected(time.monotonic())}", flush=True)
                delays = backoff_delays(1.0, REDIAL_MAX_S)
            except PeerError as exc:
                delay = next(delays)
                log.info("cannot reach peer %s: %s; retrying in %.0f s", address.peer_id, exc, delay)
                cause, reason = (exc.cause, exc.reason) if isinstance(exc, DialError) else (str(exc.kind), str(exc))
                note = notes.failed(cause, reason, REDIAL_MAX_S, time.monotonic())
                if note is not None:
                    log.warning("%s", note)
                await trio.sleep(delay)
                continue
        await session.closed.wait()
        log.warning("peer %s disconnected (%s); redialing", short_id(address.peer_id), session.close_reason)
        await trio.sleep(0.1)


def call_options(p: argparse.ArgumentParser) -> None:
    """Add the options of `call`, taken before or after its sub-command: the node, its token, --json."""
    g = p.add_argument_group("options of every call (before or after it)")
    g.add_argument(
        "--rpc", default=f"127.0.0.1:{DEFAULT_RPC_PORT}", metavar="HOST:PORT", help="the node's RPC endpoint"
    )
    g.add_argument(
        "--token",
        metavar="TOKEN",
        help="the node's RPC token (default: $PANGEA_RPC_TOKEN); unsafe on a shared machine (other users can "
        "read a command line: ps), so prefer --token-file FILE or $PANGEA_RPC_TOKEN",
    )
    g.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the node's RPC token from this file (mode 0600: a file other users can read is refused)",
    )
    g.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="the certificate fingerprint the node printed (TLS off loopback; default: the one trusted on first use)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object")


PLACEMENT_HELP = (
    f"{', '.join(PLACEMENTS)} or a peer id: where the matmul runs (auto: the node decides; remote: a peer); "
    f"{' or '.join(SPLIT_PLACEMENTS)}: in row blocks over every worker and the node, or over its peers only"
)
CALL_SYNOPSIS = (
    "pangea.pyz call [--rpc HOST:PORT] [--token-file FILE] [--json] status | peers | kernels | "
    "tasks [--state STATE,...] | connect MULTIADDR | "
    f"matmul --size N [--placement {'|'.join(PLACEMENTS + SPLIT_PLACEMENTS)}|<peer id>] [--no-fallback]"
)
TASK_STATES = (*_UNFINISHED_STATES, *_WAITING_STATES, "collected", "cancelled")  # as `Client.tasks` has them


def task_states(text: str) -> frozenset[str]:
    """argparse type of `call tasks --state`: a comma-separated list of TASK_STATES."""
    states = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(states - set(TASK_STATES))
    if unknown or not states:
        raise argparse.ArgumentTypeError(
            f"bad state {', '.join(map(repr, unknown)) or repr(text)}: expected one or more of "
            f"{', '.join(TASK_STATES)}, separated by commas"
        )
    return states


def add_call_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `call` command, its options (also after a call: `call status --json`) and its calls."""
    p = sub.add_parser(
        "call",
        parents=[*verb_parents(), option_parent(call_options, defaults=True)],
        help="talk to a running `serve` node over RPC",
        description=f"usage in short: {CALL_SYNOPSIS}",
    )

    def add(name: str, text: str) -> argparse.ArgumentParser:
        parents = [*verb_parents(), option_parent(call_options)]
        parser: argparse.ArgumentParser = calls.add_parser(name, parents=parents, help=text, description=text)
        return parser

    calls = p.add_subparsers(dest="call", metavar="CALL", parser_class=_Parser)
    add("status", "the node's peer id, addresses, uptime, task counts")
    add("peers", "the node's connected peers")
    add("kernels", "the kernels the node runs: operands, parameters, dtypes, how a worker's result is verified")
    c = add("tasks", "the tasks of the node's queue, oldest first: id, key, kernel, state, age, run time, result")
    c.add_argument(
        "--state",
        type=task_states,
        metavar="STATE,...",
        help=f"only the tasks in these states, of {', '.join(TASK_STATES)} (default: every task)",
    )
    c = add("connect", "make the node dial (and trust) another node")
    c.add_argument("multiaddr")
    c = add("matmul", "multiply two random N x N matrices on the node and verify the result")
    c.add_argument(
        "--size",
        type=whole_number(1, MAX_MATRIX_N, "a matrix size"),
        default=1024,
        metavar="N",
        help="the size of each matrix (default: 1024)",
    )
    c.add_argument(
        "--placement",
        default="auto",
        metavar="|".join(PLACEMENTS + SPLIT_PLACEMENTS) + "|PEER_ID",
        help=f"{PLACEMENT_HELP} (default: auto)",
    )
    c.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail instead of running locally when no remote worker is usable (default: fall back, and say so)",
    )
    p.set_defaults(func=cmd_call)


# `call` takes operands as large as any node accepts (its --rpc-max-mib at most): the node's limit,
# learned at login, is the one that counts
CALL_MAX_BYTES = RPC_MAX_MIB << 20


def call_setup_error(exc: RpcError) -> PangeaError:
    """A Client that could not start: a node that answered and refused (login, certificate) is a setup
    problem (exit 2); one that could not be reached keeps exit 1."""
    # NOTE: the Client says "cannot use the pangea node" when the node answered and refused it
    # (wrong token, changed or wrong certificate), "cannot reach" when nothing answered.
    if str(exc).startswith("cannot use the pangea node"):
        return ConfigError(str(exc), hint=exc.hint)
    return exc


def largest_call_size(limit_bytes: int) -> int:
    """Pure: the largest N whose two N x N float64 operands fit one RPC message of ``limit_bytes``
    (with the Client's room for the message around them)."""
    room = limit_bytes - min(64 << 10, limit_bytes // 16)
    return max(0, math.isqrt(max(0, room) // 16))


def check_call_size(size: int, limit_bytes: int, address: str) -> None:
    """Refuse `call matmul --size N` whose operands exceed the RPC message limit, before making them."""
    if size <= largest_call_size(limit_bytes):
        return
    largest = largest_call_size(limit_bytes)
    raise UsageError(
        f"cannot run matmul --size {size} on the node at {address}: its two operands are "
        f"{format_bytes(2 * size * size * 8)}, over the node's RPC message limit of {format_bytes(limit_bytes)}",
        hint=f"use --size {largest} or less, or start the node with a larger --rpc-max-mib (at most {RPC_MAX_MIB})",
    )


def cmd_call(args: argparse.Namespace) -> int:
    """`call`: one RPC call to a running node, printed readably or as JSON."""
    if args.call is None:
        raise UsageError("no call given", hint=CALL_SYNOPSIS)
    try:
        client = Client(
            args.rpc, token=read_call_token(args), fingerprint=args.fingerprint, max_message_bytes=CALL_MAX_BYTES
        )
    except RpcError as exc:
        raise call_setup_error(exc) from None
    width = terminal_columns()
    with client:
        if args.call == "status":
            result: Any = client.status()
            fields = [(k, _human(k, v)) for k, v in result.items()]
            text = format_fields(fields, width, label_width=2 + max(len(k) for k, _ in fields))
        elif args.call == "peers":
            result = client.peers()
            rows = [
                (
                    p["peer_id"],
                    p["role"],
                    p["version"],
                    f"{p['rtt_ms']:.2f}",
                    p["tasks_done"],
                    f"{p['last_seen_s']:.1f}",
                    "yes" if p["trusted"] else "no",
                    p["suspicion"]["text"] if p["suspicion"] else "ok",
                )
                for p in result
            ]
            headers = ("peer id", "role", "version", "rtt ms", "tasks done", "last seen s", "trusted", "results")
            text = format_table(headers, rows, width, fold=True) if result else "no connected peers"
        elif args.call == "kernels":
            result = client.kernels()
            text = kernels_table(result, width)
        elif args.call == "tasks":
            every = client.tasks()
            result = [t for t in every if args.state is None or t["state"] in args.state]
            text = tasks_table(result, time.time(), width)
            if every and not result:
                text = f"none of the node's {len(every)} task(s) is {' or '.join(sorted(args.state))}"
        elif args.call == "connect":
            result = client.connect(args.multiaddr)
            text = f"connected to {result['peer_id']} ({result['role']}, pangea {result['version']})"
        else:
            result, text = _call_matmul(client, args.size, args.placement, not args.no_fallback)
            text = wrap_text(text, width, indent="  ")
    print(json.dumps(result) if args.json else text)
    return 1 if isinstance(result, dict) and result.get("verified") is False else 0


def kernels_table(kernels: list[dict[str, Any]], width: int | None = None) -> str:
    """`call kernels`: what the node runs, one row a kernel, then the limits every operand has (the
    dtypes most kernels share are named once, below the table)."""
    shared = max((tuple(k["dtypes"]) for k in kernels if k["dtypes"]), key=len, default=())
    rows = [
        (
            k["name"],
            k["operands"],
            ", ".join(k["params"]) or "-",
            "all" if k["dtypes"] and tuple(k["dtypes"]) == shared else ", ".join(k["dtypes"]) or "-",
            k["verification"] or "no",
            k["description"],
        )
        for k in kernels
    ]
    text = format_table(("kernel", "operands", "params", "dtypes", "verified", "what"), rows, width)
    if kernels:
        notes = (
            f"dtypes all: {', '.join(shared) or '-'}; an operand has at most {kernels[0]['max_ndim']} "
            f"dimensions and {kernels[0]['max_elements']:,} elements.\n"
            "verified: how this node checks a result a remote worker sent (no: taken as sent)."
        )
        text += "\n" + wrap_text(notes, width, indent="  ")
    return text


def tasks_table(tasks: list[dict[str, Any]], now: float, width: int | None = None) -> str:
    """Pure: `call tasks`: one row a task of the node's queue (as `Client.tasks` gives them; ``now``:
    seconds since the epoch), then a line that counts them by state."""
    if not tasks:
        return "no tasks in the node's queue"
    rows = [
        (
            t["task_id"],
            "auto" if is_auto_key(t["key"]) else t["key"] or "-",
            t["kernel"],
            t["state"] + (f" (run {t['runs']} times)" if t["runs"] > 1 else ""),
            _span_text(now - t["accepted"]),
            _span_text(t["finished"] - t["accepted"]) if t["finished"] else "-",
            format_bytes(t["result_bytes"]) if t["result_bytes"] else "-",
            one_line(t["error"], 200) or "-",
        )
        for t in tasks
    ]
    headers = ("task id", "key", "kernel", "state", "age", "took", "result", "error")
    counts = Counter(t["state"] for t in tasks)
    shown = ", ".join(f"{counts[s]} {s}" for s in (*TASK_STATES, *sorted(set(counts) - set(TASK_STATES))) if counts[s])
    return format_table(headers, rows, width, fold=True) + f"\n{len(tasks)} task(s): {shown}"


def is_auto_key(key: str) -> bool:
    """Pure: whether a task's key is one `Client` made up for a task its caller did not name."""
    return (
        len(key) == len(AUTO_KEY_PREFIX) + 2 * AUTO_KEY_BYTES
        and key.startswith(AUTO_KEY_PREFIX)
        and all(ch in "0123456789abcdef" for ch in key[len(AUTO_KEY_PREFIX) :])
    )


def _span_text(seconds: float) -> str:
    """``1.74 ms``, ``0.25 s``, ``65 s``, ``62 min``, ``25 h``: a task's age or run time, at a glance."""
    seconds = max(0.0, seconds)
    if 0 < seconds < 0.1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return format_seconds(seconds)
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def timings_text(t: dict[str, float]) -> str:
    """Pure: a task's timings as `Client.last_task` gives them, in words: the wall time at the
    client, then the node's share (compute, transfer) and the client-to-node RPC hop."""
    node = f"compute {t['compute_s']:.3f} s, transfer {t['transfer_s']:.3f} s"
    if "client_total_s" not in t:
        return f"{t['total_s']:.3f} s ({node})"
    return f"{t['client_total_s']:.3f} s at this client (node {t['total_s']:.3f} s: {node}; RPC hop {t['rpc_s']:.3f} s)"


def _human(key: str, value: Any) -> str:
    if key == "suspects":
        return "; ".join(f"{short_id(s['peer_id'])} {s['text']}" for s in value) or "-"
    if key.startswith("bytes") or key.endswith("_bytes"):  # bytes_in, memory_budget_bytes, state_max_bytes, ...
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _call_matmul(client: Client, size: int, placement: str, fallback: bool = True) -> tuple[dict[str, Any], str]:
    import numpy as np

    check_call_size(size, min(client.max_message_bytes, client.node_max_message_bytes), client.address)
    rng = np.random.default_rng()
    a, b = rng.standard_normal((size, size)), rng.standard_normal((size, size))
    try:
        c = client.matmul(a, b, placement=placement, fallback=fallback)
    except TaskError as exc:
        if exc.kind != ErrorKind.BAD_INPUT:
            raise
        # NOTE: the operands are the command's own, so a task refused as bad input is a bad option
        # (--placement naming no peer), a usage problem: exit 2, not a failed task.
        raise UsageError(
            f"cannot run matmul on the node at {client.address}: {exc}",
            hint="`./pangea.pyz call peers` lists the peer ids a placement may name",
        ) from None
    verified = bool(np.allclose(c, a @ b))
    task = client.last_task
    t = task["timings"]
    result = {"verified": verified, "size": size, **task}
    where = "this node" if task["ran_on"] == LOCAL else task["ran_on"]
    text = f"{size}x{size} matmul ran on {where} in {timings_text(t)}: " + (
        "verified against local numpy" if verified else "WRONG RESULT"
    )
    if task["fallback_reason"]:
        text += f"\nran locally: {task['fallback_reason']}"
    return result, text


###############################################################################
# 27. CLI: the tools and main
#
# The verbs that look at this box: `psk`, `status`, `doctor`, `bench` (its code
# is the module pangea_bench, imported only when the verb runs) and `id`. Then
# make_parser, which puts every verb's parser together, and the entry point:
# `main(argv) -> exit code`, the menu a bare run shows, and `_report_error`.
###############################################################################


def add_psk_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `psk` command and its options."""
    p = sub.add_parser(
        "psk", parents=verb_parents(), help="write a new pre-shared key file for --psk (copy it to every node)"
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_psk)


def cmd_psk(args: argparse.Namespace) -> int:
    """`psk FILE`: write a new random pre-shared key (mode 0600) in the go-libp2p swarm key format."""
    import secrets

    path = Path(args.file)
    if path.exists():
        raise UsageError(f"cannot write {str(path)!r}: it exists; pick another name or delete it first")
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"/key/swarm/psk/1.0.0/\n/base16/\n{key}\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    print(f"wrote {path}: copy it to every node and start each with --psk {path}")
    return 0


def running_sessions(home: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Return the live session directories' info under a pangea home (and the demo homes
    inside it), after removing the stale ones; also return what was removed."""
    removed: list[Path] = []
    nodes: list[dict[str, Any]] = []
    homes = [home, *sorted(p for p in (home / "demo").glob("*") if p.is_dir())]
    for each in homes:
        removed += clean_stale_sessions(each)
        root = each / SESSIONS_DIRNAME
        for path in sorted(root.glob("*-*")) if root.is_dir() else []:
            info = SessionDir.load(path)
            if info:
                info["uptime_s"] = max(0.0, time.time() - float(info.get("started", time.time())))
                info["session_dir"] = str(path)
                nodes.append(info)
    return nodes, removed


def add_status_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `status` command and its options."""
    p = sub.add_parser(
        "status", parents=verb_parents(), help="show the pangea nodes running on this box (and clean up stale entries)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """`status`: the nodes running on this box, from their session directories."""
    home = pangea_home()
    nodes, removed = running_sessions(home)
    logs = kept_logs(home)
    if args.json:
        print(json.dumps({"nodes": nodes, "cleaned": [str(p) for p in removed], "logs": logs}))
        return 0
    for path in removed:
        print(f"removed the stale session directory {path} (its process is gone)")
    _print_kept_logs(logs)
    if not nodes:
        print("no pangea node is running on this box (for this PANGEA_HOME)")
        return 0
    rows = [
        (
            n.get("role", "?"),
            n.get("pid", "?"),
            n.get("peer_id", "?"),
            f"{n['uptime_s']:.0f} s",
            n.get("rpc", "-"),
            ", ".join(n.get("addresses", [])[:2]) or "-",
        )
        for n in nodes
    ]
    print(format_table(("role", "pid", "peer id", "uptime", "rpc", "addresses"), rows, terminal_columns(), fold=True))
    for n in nodes:
        for s in n.get("suspects", []):
            print(f"{n.get('role', '?')} {n.get('pid', '?')}: {suspect_line(s)}")
    return 0


STATUS_LOGS_SHOWN = 3  # status names the newest kept logs; --json lists them all


def _print_kept_logs(logs: list[dict[str, Any]]) -> None:
    """The newest logs of failed runs, one line each (status)."""
    for entry in logs[:STATUS_LOGS_SHOWN]:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(entry["modified"])))
        print(f"log of a failed run: {entry['path']} ({when})")
    if len(logs) > STATUS_LOGS_SHOWN:
        print(f"... and {len(logs) - STATUS_LOGS_SHOWN} older in {Path(logs[0]['path']).parent}")


def suspect_line(s: dict[str, Any]) -> str:
    """One line on a worker a node does not fully trust, from its session directory."""
    line = f"peer {s.get('peer_id', '?')} {s.get('state', '?')} since {format_utc(float(s.get('since', 0)))}"
    line += f" ({s.get('reason', '')})"
    if s.get("state") == "suspect" and s.get("probe_at"):
        line += f"; next probe in {max(0.0, float(s['probe_at']) - time.time()):.0f} s"
    return line


def add_doctor_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `doctor` command and its options."""
    p = sub.add_parser(
        "doctor", parents=verb_parents(), help="explain this box's network setup, and whether a peer can be reached"
    )
    p.add_argument("address", nargs="?", help="a peer's multiaddr or join string to test")
    p.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"the port pangea would listen on (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--timeout", type=positive_seconds(), default=10.0, metavar="SECONDS", help="per network test (default: 10)"
    )
    p.add_argument("--psk", metavar="FILE", help="the pre-shared key file the peer uses, if any")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """`doctor [ADDRESS]`: interfaces, port, build, and a peer's reachability, with a verdict."""
    info = build_info()
    here = (sys.implementation.cache_tag, platform.machine())
    findings: dict[str, Any] = {
        "python": f"{here[0]} {here[1]} ({sys.executable})",
        "build": build_target_mismatch(tuple(info["BUILT_FOR"]), here) if info and "BUILT_FOR" in info else None,
        "interfaces": [
            {"name": name, "ip": ip, "kind": interface_kind(name, ip)} for name, ip in local_interface_addresses()
        ],
        "advertised": [ip for _, ip in rank_interface_addresses(local_interface_addresses())],
        "port": args.port,
    }
    try:
        ensure_port_free("0.0.0.0", args.port)
        findings["port_free"] = True
    except ConfigError as exc:
        findings["port_free"], findings["port_problem"] = False, str(exc)
    if args.address:
        address = parse_peer_address(args.address)
        setup_logging(None, 0, False)  # libp2p's own complaints about the probe stay quiet
        findings["peer"] = probe_peer(address, args.timeout, read_psk_file(args.psk))
    ok, verdict = doctor_verdict(findings)
    findings["ok"], findings["verdict"] = ok, verdict
    if args.json:
        print(json.dumps(findings))
        return 0 if ok else 1
    fields = [
        ("python", f"{findings['python']}" + (f"  PROBLEM: {findings['build']}" if findings["build"] else "  ok"))
    ]
    for i in findings["interfaces"]:
        note = {"virtual": "  (docker/bridge: other boxes cannot reach it)", "vpn": "  (VPN)"}.get(i["kind"], "")
        fields.append(("interface", f"{i['name']:<12} {i['ip']:<16} {i['kind']}{note}"))
    advertised = ", ".join(findings["advertised"]) or "nothing"
    fields.append(("advertised", f"{advertised} (in this order; loopback only works on this box)"))
    port_text = "free" if findings["port_free"] else findings.get("port_problem", "in use")
    fields.append(("port", f"{args.port}: {port_text}"))
    peer = findings.get("peer")
    if peer is not None:
        fields.append(("peer", peer["address"]))
        tcp = "reaches it" if peer["tcp"] else "FAILS: " + peer.get("tcp_error", "")
        fields.append(("  tcp", tcp + (f" in {peer['tcp_ms']:.1f} ms" if peer.get("tcp_ms") is not None else "")))
        if peer["tcp"]:
            fields.append(("  libp2p", f"{peer['libp2p']}: {peer.get('detail', '')}"))
        if peer.get("data_plane"):
            fields.append(("  data", peer["data_plane"]))
    fields.append(("verdict", verdict))
    print(format_fields(fields, terminal_columns()))
    return 0 if ok else 1


def probe_peer(address: PeerAddress, timeout_s: float, psk: str | None) -> dict[str, Any]:
    """Test a peer: TCP connect, then a libp2p dial and pangea handshake with RTT (doctor)."""
    result: dict[str, Any] = {"address": address.text, "tcp": False}
    tcp_ms, why = run_trio_value(tcp_probe, address.host, address.port, timeout_s)
    if tcp_ms is None:
        result["tcp_error"] = why
        return result
    result["tcp"], result["tcp_ms"] = True, tcp_ms
    with tempfile_home() as home:
        probed: dict[str, Any] = run_trio_value(_probe_libp2p, address, timeout_s, psk, load_or_create_identity(home))
        result.update(probed)
    if "data_plane" not in result and address.port < 65535:
        # NOTE: a peer that refuses the doctor's session never says its data port; the
        # default (auto) is the libp2p port + 1, so that is the one a firewall must let through.
        data_port = address.port + DATA_PORT_OFFSET
        try:
            with socket.create_connection((address.host, data_port), timeout=min(timeout_s, DATA_CONNECT_S)):
                result["data_plane"] = f"TCP port {data_port} (the default data port) reaches it"
        except ConnectionRefusedError:
            # nothing listens there: the node runs with --data-port off or another port (fine),
            # or it is not pangea's; a firewall drops or rejects rather than refuses
            result["data_plane"] = (
                f"nothing listens on TCP port {data_port} (the default data port): the node may use "
                "--data-port off or another port; otherwise arrays travel on the slower libp2p stream"
            )
        except OSError as exc:
            result["data_plane"] = f"TCP port {data_port} (the default data port) FAILS: {exc.strerror or exc}"
            result["data_plane_blocked"] = data_port
    return result


def home_peer_id() -> str | None:
    """The peer id of this box's pangea home, when it has an identity (never creates one)."""
    path = pangea_home() / IDENTITY_FILENAME
    if not path.exists():
        return None
    with contextlib.suppress(PangeaError):
        return key_peer_id(load_or_create_identity(path.parent))
    return None


def doctor_refusal_text(refusal: str, throwaway_id: str, home_id: str | None) -> str:
    """Doctor's line on a node that refused its session (pure). Doctor dials with a throwaway
    identity, so the node's "allow <that id>" would name an id nobody will ever use again: name
    the one this box's nodes really run with instead, and say why."""
    said = refusal.replace(throwaway_id, "<doctor's throwaway id>").split("; ")[0]  # its reason, not its advice
    allow = (
        f"start that node with --allow-peer {home_id} (this box's peer id, as `./pangea.pyz id` prints it)"
        if home_id
        else "run `./pangea.pyz id` here (it creates this box's identity and prints its peer id) and start "
        "that node with --allow-peer <that id>"
    )
    return (
        f"the handshake completes; it refuses doctor's session, as it should ({said}). Doctor dials with a "
        f"throwaway identity, never this box's key; to let this box's nodes in, {allow}, or pair with its join string"
    )


@contextlib.contextmanager
def tempfile_home() -> Iterator[Path]:
    """A throwaway pangea home for doctor's probe identity (never the box's own key)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pangea-doctor-") as path:
        yield Path(path)


async def _probe_libp2p(address: PeerAddress, timeout_s: float, psk: str | None, key_pair: Any) -> dict[str, Any]:
    node = Node(
        key_pair=key_pair,
        role="doctor",
        accept=lambda p, h: "doctor accepts nothing",
        may_serve=lambda p: False,
        psk=psk,
    )
    async with node.running("127.0.0.1", 0):
        start = time.perf_counter()
        try:
            session = await node.dial(address, timeout_s=timeout_s)
        except PeerError as exc:
            if exc.kind == ErrorKind.INCOMPATIBLE:
                return {"libp2p": "incompatible", "detail": str(exc)}
            if exc.kind in (ErrorKind.REFUSED, ErrorKind.DUPLICATE_IDENTITY, ErrorKind.IDENTITY_IN_USE):
                # it answered our Hello: Noise, the peer ID and the protocol are all right
                return {
                    "libp2p": "ok",
                    "handshake_ms": (time.perf_counter() - start) * 1000,
                    "detail": doctor_refusal_text(str(exc), node.peer_id, home_peer_id()),
                }
            return {"libp2p": "failed", "detail": str(exc), "cause": getattr(exc, "cause", "")}
        rtt_s = await session.ping()
        await session.close("doctor done")
        hello = session.hello
        found: dict[str, Any] = {
            "libp2p": "ok",
            "rtt_ms": rtt_s * 1000,
            "detail": f"pangea {hello.pangea_version} {hello.role}, {hello.platform}, rtt {rtt_s * 1000:.1f} ms",
            "data_plane": session.data_note,
        }
        if session.data is None and hello.data_port and "no answer" in session.data_note:
            found["data_plane_blocked"] = hello.data_port
        return found


def add_bench_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `bench` command and its options."""
    p = sub.add_parser(
        "bench",
        parents=verb_parents(),
        help="measure pangea next to a plain libp2p stream and raw TCP against its performance targets, in one run",
    )
    p.add_argument(
        "address",
        nargs="?",
        help="the join string `bench --listen` printed (or its multiaddr with --code), or a `serve` node that "
        "trusts this box; without one, a peer is started on 127.0.0.1",
    )
    p.add_argument("--code", help="the listener's pairing code, when ADDRESS is a bare multiaddr")
    p.add_argument(
        "--listen", action="store_true", help="be the peer: print a join string, serve one benchmarker, then exit"
    )
    p.add_argument("--host", default="0.0.0.0", help="--listen: address to listen on (default: all interfaces)")
    p.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"--listen: libp2p port, 0 for any free one (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--tcp-port", type=port_number, default=0, help="--listen: port of the raw TCP baseline (default: any free one)"
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds(),
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for the other side (default: {DEFAULT_WAIT_S:.0f})",
    )
    full, quick = BENCH_DEFAULTS, BENCH_QUICK
    p.add_argument(
        "--sizes-mib",
        metavar="LIST",
        help=f"bulk transfer sizes in MiB, e.g. 64,1024 (default: {full['sizes_mib']}; --quick: {quick['sizes_mib']})",
    )
    p.add_argument(
        "--tasks",
        type=whole_number(1, 100_000, "a number of tasks"),
        metavar="N",
        help=f"tiny tasks per figure (default: {full['tasks']}; --quick: {quick['tasks']})",
    )
    p.add_argument(
        "--inflight",
        type=whole_number(1, BENCH_MAX_INFLIGHT, "a number of tasks"),
        default=8,
        metavar="N",
        help="tasks in flight at once (default: 8)",
    )
    p.add_argument(
        "--matmul-n",
        type=whole_number(64, 8192, "a matrix size"),
        metavar="N",
        help=f"size of the delegated matmul (default: {full['matmul_n']}; --quick: {quick['matmul_n']})",
    )
    p.add_argument(
        "--reps",
        type=whole_number(1, 20, "a number of repetitions"),
        metavar="N",
        help=f"repetitions of bulk (at most 3 from 512 MiB up) and matmul (default: {full['reps']}; --quick: 1)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and counts: a few seconds, rough figures")
    p.add_argument("--json", action="store_true", help="print one JSON object (every sample, both machines)")
    p.add_argument("--psk", metavar="FILE", help="pre-shared key file, when the peer uses one")
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: measure pangea next to its baselines against a peer (spawned on loopback when
    no address is given), or with --listen be that peer for a benchmarker on another box.

    The verb's code is bench/pangea_bench.py (the top-level module ``pangea_bench`` in the
    pyz), imported here only, when the verb runs."""
    # NOTE: pangea_bench imports `pangea`. Run as `python pangea.py`, this module is __main__:
    # registered under its own name first, `import pangea` finds it instead of loading a copy.
    sys.modules.setdefault("pangea", sys.modules[__name__])
    try:
        import pangea_bench
    except ModuleNotFoundError as exc:
        if exc.name != "pangea_bench":
            raise
        sys.path.append(str(Path(__file__).resolve().parent / "bench"))  # a checkout: bench/ beside pangea.py
        import pangea_bench
    return pangea_bench.cmd_bench(args)


def add_id_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add the `id` command and its options."""
    p = sub.add_parser("id", parents=verb_parents(), help="print this box's peer id (creating its identity if needed)")
    p.set_defaults(func=cmd_id)


def cmd_id(args: argparse.Namespace) -> int:
    """`id`: print this box's peer id (the one to give to --allow-peer elsewhere)."""
    from libp2p.peer.id import ID

    key_pair = load_or_create_identity(pangea_home())
    print(ID.from_pubkey(key_pair.public_key).to_base58())
    return 0


def make_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the whole CLI: the global options, then one
    `add_<verb>_parser` per verb (each sits right above its `cmd_<verb>`)."""
    parser = _Parser(
        prog="pangea.pyz",
        description="Share numpy compute between your own machines over libp2p.",
        parents=[option_parent(global_options, defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_parser in (
        add_initiate_parser,
        add_respond_parser,
        add_demo_parser,
        add_serve_parser,
        add_call_parser,
        add_id_parser,
        add_status_parser,
        add_doctor_parser,
        add_psk_parser,
        add_bench_parser,
    ):
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pangea command line; return the exit code."""
    code = _main(argv)
    code = _flush_stdout(code)
    if _KERNELS_RUNNING.value:
        # NOTE: a kernel abandoned at shutdown (Ctrl-C, SIGTERM, a task deadline) is
        # still inside OpenBLAS; at interpreter exit OpenBLAS joins its own threads
        # and deadlocks on that call. Everything is cleaned up by now: leave at once.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


MENU = (
    ("initiate", "start here and wait for another box"),
    ("respond", "join another box (paste the join string it printed)"),
    ("demo", "run both sides on this box and see the whole flow"),
    ("serve", "a long-running node your programs can call"),
    ("doctor", "check this box's network setup"),
)


MENU_TRIES = 20  # answers the menu takes before it quits (every loop is bounded)


def menu() -> list[str]:
    """The no-argument menu on a terminal: return the chosen command line ([] to quit)."""
    print(f"pangea {__version__}: share numpy compute between your own machines\n")
    for number, (command, text) in enumerate(MENU, 1):
        print(f"  {number}) {command:<9} {text}")
    print("  q) quit\n")
    for _ in range(MENU_TRIES):
        answer = ask(f"Choose [1-{len(MENU)}, q]: ")
        choice = "q" if answer is None else answer.lower()
        if choice in ("q", "quit", "exit"):
            return []
        names = [c for c, _ in MENU]
        if choice.isdigit() and 1 <= int(choice) <= len(MENU):
            return [names[int(choice) - 1]]
        if choice in names:
            return [choice]
        print(f"please type a number from 1 to {len(MENU)}, or q")
    print(f"pangea: no choice after {MENU_TRIES} tries; quitting")
    return []


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False  # --debug counts once the command line parsed (a refused line has no traceback)
    try:
        check_build_target()
        parser = make_parser()
        if not argv:
            if not (sys.stdin.isatty() and sys.stdout.isatty()):
                parser.print_help(sys.stderr)
                return 2
            argv = menu()
            if not argv:
                return 0
        args = parse_command_line(parser, argv)
        debug = bool(getattr(args, "debug", False))
        if args.command is None:
            raise UsageError(
                "no command given",
                hint="pangea.pyz initiate | respond ADDRESS | demo | serve | call | status | doctor | bench | id",
            )
        defer_unused_libp2p_modules()  # before any command imports libp2p
        forget_zipapp_on_sys_path()
        return int(args.func(args))
    except KeyboardInterrupt:
        print("pangea: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # NOTE: every error ends as one line; the traceback only with --debug
        return _report_error(exc, debug)


def _report_error(exc: BaseException, debug: bool) -> int:
    """Print an error as `pangea: error: ...` (+ `hint: ...`) and return its exit code.

    A PangeaError says what went wrong; anything else is a bug, named in one
    line. SystemExit (--help, --version) passes through; a closed stdout ends
    quietly."""
    import builtins

    if isinstance(exc, SystemExit):
        raise exc
    found: BaseException | None = exc
    if isinstance(exc, getattr(builtins, "BaseExceptionGroup", ())):  # NOTE: none on a wrong (3.10) interpreter
        found = (
            first_error(exc, PangeaError) or first_error(exc, BrokenPipeError) or first_error(exc, KeyboardInterrupt)
        )
    found = found or exc
    if isinstance(found, BrokenPipeError) and _stdout_gone():
        _silence_stdout()  # the reader of our stdout left (`| head -1`): nothing more to say
        return 0
    if isinstance(found, KeyboardInterrupt):
        print("pangea: interrupted", file=sys.stderr)
        return 130
    kept = getattr(exc, "pangea_log_kept", None)  # a node's failed run: node_session kept its log
    kept_note = f"log kept in {kept}" if kept else ""
    if isinstance(found, PangeaError):
        print(f"pangea: error: {visible(str(found))}", file=sys.stderr)
        hint = "; ".join(part for part in (found.hint, kept_note) if part)
        if hint:
            print(f"hint: {visible(hint)}", file=sys.stderr)
        code = found.exit_code
    else:
        print(f"pangea: error: internal error: {one_line(describe_exception(found))}", file=sys.stderr)
        hint = "run again with --debug for the traceback, and report it"
        print(f"hint: {'; '.join(part for part in (hint, kept_note) if part)}", file=sys.stderr)
        code = 1
    if debug:
        import traceback

        traceback.print_exception(exc)
    return code


if __name__ == "__main__":
    sys.exit(main())

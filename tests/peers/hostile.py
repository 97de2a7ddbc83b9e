"""A hostile pangea peer: a TEST AID for tests/integration/test_hostile.py and test_security.py.

It is a real libp2p node (Noise + Yamux, its own identity in ``--home``) that
speaks pangea's wire protocol badly on purpose: truncated and oversized
frames, garbage, messages out of order, bad arrays, floods of streams and
tasks. Run it with the built pyz's environment, so it uses the pyz's libp2p,
trio, numpy, capnp and ``pangea`` module::

    SHIV_INTERPRETER=1 ./pangea.pyz tests/peers/hostile.py \
        --home DIR --target /ip4/127.0.0.1/tcp/PORT/p2p/ID SCENARIO [SCENARIO ...]

``./pangea.pyz id`` with ``PANGEA_HOME=DIR`` prints its peer id, so the node
under test can ``--allow-peer`` it. Each scenario prints one JSON line per
observation on stdout, ``{"scenario": ..., "event": ..., ...}``, where a reply
of the node is described as ``{"type": "ErrorMsg", "kind": ..., "message": ...}``,
``{"type": "TaskResultMsg", "task_id": ..., "error_kind": ..., ...}``,
``{"type": "HelloMsg", ...}``, or ``{"type": "eof" | "reset" | "timeout"}``.
Most scenarios end with ``{"event": "good", "ok": true}``: a valid matmul
on a fresh (or the same) session that the node must still serve. Every wait
is bounded (``--timeout`` per reply); the process exits 0 when every scenario
ran to its end, 1 when one raised (an ``"event": "crash"`` line says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

import pangea
from pangea import (
    FRAME_PREFIX,
    NEED_DATA,
    ErrorMsg,
    HelloMsg,
    Message,
    PingMsg,
    PongMsg,
    TaskRequestMsg,
    TaskResultMsg,
)

MESSAGE_TYPES = typing.get_args(Message)
WRITE_CHUNK = 1 << 20
GOOD_N = 64  # the good matmul's size
_scenario = "?"  # the scenario running now, for emit()


def emit(event: str, **fields: Any) -> None:
    """Print one observation as a JSON line."""
    print(json.dumps({"scenario": _scenario, "event": event, **fields}), flush=True)


def describe(reply: Message | str) -> dict[str, Any]:
    """A JSON-able description of what the node answered."""
    if isinstance(reply, str):
        return {"type": reply}
    if isinstance(reply, ErrorMsg):
        return {"type": "ErrorMsg", "kind": reply.kind, "message": reply.message}
    if isinstance(reply, TaskResultMsg):
        return {
            "type": "TaskResultMsg",
            "task_id": reply.task_id,
            "ok": reply.ok,
            "error_kind": reply.error_kind,
            "error_message": reply.error_message,
            "shapes": [list(o.shape) for o in reply.outputs],
        }
    if isinstance(reply, HelloMsg):
        return {"type": "HelloMsg", "role": reply.role, "instance_id": reply.instance_id}
    return {"type": type(reply).__name__, **{k: v for k, v in vars(reply).items() if isinstance(v, str | int)}}


# ---------------------------------------------------------------- raw frames


def raw_header(kind: str, **fields: Any) -> bytes:
    """A Cap'n Proto Message header built field by field, with no checks (unlike pangea.encode)."""
    m = pangea.load_schema().Message.new_message()
    body = m.init(kind)
    if kind in ("taskRequest", "taskResult"):
        metas = fields.pop("metas", [])
        slots = body.init("operands" if kind == "taskRequest" else "outputs", len(metas))
        for slot, (dtype, shape, nbytes) in zip(slots, metas, strict=True):
            slot.dtype = dtype
            slot.shape = list(shape)
            slot.nbytes = nbytes
        params = fields.pop("params", {})
        if params:
            for slot, (name, value) in zip(body.init("params", len(params)), params.items(), strict=True):
                slot.name = name
                slot.value = value
    for name, value in fields.items():
        setattr(body, name, value)
    return bytes(m.to_bytes())


def frame(header: bytes, payload_len: int) -> bytes:
    """Prefix + header of a frame announcing ``payload_len`` payload bytes (payload not included)."""
    return FRAME_PREFIX.pack(len(header), payload_len) + header


def matmul_request(task_id: int, n: int = GOOD_N, seed: int = 0) -> tuple[TaskRequestMsg, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    return TaskRequestMsg(task_id, "matmul", (a, b)), a @ b


# ---------------------------------------------------------------- one stream


class Wire:
    """One libp2p stream to the node: raw writes, whole messages back (pings answered when idle)."""

    def __init__(self, stream: Any, timeout_s: float) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.decoder = pangea.Decoder(1 << 40)
        self.lock = trio.Lock()
        self.ended: str | None = None
        self._unread: list[Message] = []

    def unread(self, msg: Message) -> None:
        """Give a message back: the next recv() returns it first."""
        self._unread.append(msg)

    async def write(self, *parts: bytes | memoryview) -> bool:
        """Write bytes; False (and ``ended``) when the stream is gone."""
        async with self.lock:
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    for start in range(0, len(view), WRITE_CHUNK):
                        await self.stream.write(view[start : start + WRITE_CHUNK])
            except pangea.stream_errors() as exc:
                self.ended = self.ended or f"write failed: {pangea.describe_exception(exc)}"
                return False
        return True

    async def send(self, msg: Message) -> bool:
        return await self.write(*pangea.encode_parts(msg))

    async def recv(self, timeout_s: float | None = None) -> Message | str:
        """The next message (pings answered, pongs skipped), or "eof", "reset", "timeout", "garbage"."""
        from libp2p.network.stream.exceptions import StreamEOF, StreamReset

        if self._unread:
            return self._unread.pop(0)
        with trio.move_on_after(self.timeout_s if timeout_s is None else timeout_s):
            while True:
                try:
                    msg = self.decoder.next()
                except pangea.ProtocolError as exc:
                    return f"garbage: {exc}"
                if isinstance(msg, PingMsg):
                    # NOTE: only when no write is under way: waiting for the lock here would stop
                    # the reading, and the node's writes fail after 5 s without a window update.
                    if not self.lock.locked():
                        await self.send(PongMsg(msg.nonce))
                    continue
                if isinstance(msg, PongMsg):
                    continue
                if msg is not NEED_DATA:
                    return msg
                try:
                    data = await self.stream.read(1 << 20)
                except StreamEOF:
                    return "eof"
                except StreamReset:
                    return "reset"
                except pangea.stream_errors():
                    return "reset"
                self.decoder.feed(data)
        return "timeout"

    async def close(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.stream.close()
            except pangea.stream_errors():
                pass

    async def reset(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.stream.reset()
            except pangea.stream_errors():
                pass


# ---------------------------------------------------------------- the peer


class Hostile:
    """The hostile node: its libp2p host, the target, and the moves the scenarios combine."""

    def __init__(self, host: Any, target: pangea.PeerAddress, args: argparse.Namespace) -> None:
        self.host = host
        self.target = target
        self.args = args
        self.peer_id = str(host.get_id())
        self.instance_id = random.SystemRandom().getrandbits(63)
        self.next_task_id = 1000
        self.current: Wire | None = None  # the open session, if any

    def task_id(self) -> int:
        self.next_task_id += 1
        return self.next_task_id

    async def connect(self) -> None:
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        info = info_from_p2p_addr(Multiaddr(self.target.text))
        with trio.fail_after(self.args.timeout):
            await self.host.connect(info)

    async def disconnect(self) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(5):
            await self.host.disconnect(ID.from_base58(self.target.peer_id))

    async def raw(self) -> Wire:
        """A new stream of the pangea protocol, nothing written yet."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        target = ID.from_base58(self.target.peer_id)
        for attempt in range(3):
            # The node closes the connection of a peer it refused or turned away: dial again.
            if not self.host.get_network().get_connections(target):
                await self.connect()
            try:
                with trio.fail_after(self.args.timeout):
                    stream = await self.host.new_stream(target, [TProtocol(pangea.PROTOCOL_ID)])
                return Wire(stream, self.args.timeout)
            except Exception:
                await trio.sleep(0.3)  # a connection the node is closing: wait until it is gone
                if attempt == 2 or self.host.get_network().get_connections(target):
                    raise  # the connection is up: the node reset the stream itself
        raise AssertionError("unreachable")

    def hello(self, code: str = "", **changes: Any) -> HelloMsg:
        """A Hello built like Node.hello(); a proof of ``code`` when given."""
        code = pangea.normalize_pairing_code(code) if code else ""
        proof = pangea.pairing_proof(code, self.target.peer_id, self.peer_id) if code else b""
        msg = HelloMsg(
            pangea_version=pangea.__version__,
            protocol_version=pangea.PROTOCOL_VERSION,
            kernels=tuple(sorted(pangea.KERNELS)),
            role=self.args.role,
            cores=1,
            blas_threads=1,
            platform="hostile test peer",
            pairing_proof=proof,
            instance_id=self.instance_id,
        )
        for name, value in changes.items():
            setattr(msg, name, value)
        return msg

    async def session(self, code: str | None = None) -> tuple[Wire, Message | str]:
        """Open a stream, say Hello, return it with the node's answer (a HelloMsg when accepted).

        A node still closing our previous session answers Hello then Bye ("duplicate
        session"); that is retried a few times."""
        code = self.args.code if code is None else code
        for _ in range(20):
            wire = await self.raw()
            await wire.send(self.hello(code))
            reply = await wire.recv()
            if not isinstance(reply, HelloMsg):
                return wire, reply
            # A Bye right behind the Hello means our previous session was still open there.
            with trio.move_on_after(0.3):
                second = await wire.recv(0.3)
                if isinstance(second, pangea.ByeMsg):
                    await wire.close()
                    await trio.sleep(0.3)
                    continue
                if not isinstance(second, str):
                    wire.unread(second)  # e.g. an initiator's first task: the caller reads it
            return wire, reply
        raise AssertionError("the node kept answering 'duplicate session'")

    async def open_session(self) -> Wire:
        """A session the node accepted (the previous one is ended first: one session per peer)."""
        await self.end_session()
        wire, reply = await self.session()
        if not isinstance(reply, HelloMsg):
            raise AssertionError(f"the node refused the session: {describe(reply)}")
        self.current = wire
        return wire

    async def end_session(self) -> None:
        """Close our side of the current session and wait (bounded) until the node ended its side."""
        wire, self.current = self.current, None
        if wire is None:
            return
        await wire.close()
        with trio.move_on_after(3):
            while isinstance(await wire.recv(3), MESSAGE_TYPES):
                pass

    async def results(self, wire: Wire, count: int, timeout_s: float | None = None) -> list[Message | str]:
        """Read until ``count`` TaskResults arrived or the stream ends (other messages are kept too)."""
        out: list[Message | str] = []
        got = 0
        deadline = trio.current_time() + (timeout_s or self.args.timeout)
        while got < count:
            reply = await wire.recv(max(0.0, deadline - trio.current_time()))
            out.append(reply)
            if isinstance(reply, TaskResultMsg):
                got += 1
            elif isinstance(reply, str):
                break
        return out

    async def exchange(self, wire: Wire, requests: Sequence[TaskRequestMsg], timeout_s: float) -> list[Message | str]:
        """Write ``requests`` back to back while a reader collects their results.

        NOTE: reading while writing matters: a node whose results are not read
        fails its write after 5 s (Yamux flow control, tech notes 1)."""
        collected: list[Message | str] = []

        async def reader() -> None:
            collected.extend(await self.results(wire, len(requests), timeout_s=timeout_s))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for request in requests:
                if not await wire.send(request):
                    break
        return collected

    async def good(self, wire: Wire | None = None) -> bool:
        """A valid matmul that the node must serve, on ``wire`` or on a fresh session."""
        fresh = wire is None
        try:
            if wire is None:
                wire = await self.open_session()
            request, expected = matmul_request(self.task_id(), seed=len(_scenario))
            await wire.send(request)
            (reply,) = await self.results(wire, 1)
        except AssertionError as exc:
            emit("good", ok=False, reply={"type": "refused", "message": str(exc)})
            return False
        ok = isinstance(reply, TaskResultMsg) and reply.ok and np.allclose(reply.outputs[0], expected)
        emit("good", ok=bool(ok), reply=describe(reply))
        if fresh:
            await self.end_session()
        return bool(ok)


# ---------------------------------------------------------------- scenarios


async def s_hello(peer: Hostile) -> None:
    """Say Hello (with --code's proof, if any) and report the answer; then try a task anyway."""
    wire, reply = await peer.session()
    emit("hello", reply=describe(reply))
    if isinstance(reply, HelloMsg):
        peer.current = wire
        await peer.good(wire)
    else:
        emit("after", reply=describe(await wire.recv()))
        # An unaccepted peer cannot run a task on any stream either: a TaskRequest first is refused.
        task = await peer.raw()
        request, _ = matmul_request(peer.task_id())
        await task.send(request)
        emit("task-without-session", reply=describe(await task.recv()))


async def s_pair_tries(peer: Hostile) -> None:
    """One Hello per code in --codes (the proof of each), each answer reported."""
    for code in peer.args.codes.split(","):
        wire = await peer.raw()
        await wire.send(peer.hello(code))
        emit("try", code=code, reply=describe(await wire.recv()))
        await wire.close()


async def s_task_on_initiator(peer: Hostile) -> None:
    """Pair as a responder, then ask the initiator to run a task: it runs none for anybody."""
    wire = await peer.open_session()
    request, _ = matmul_request(77)
    await wire.send(request)
    for _ in range(50):
        reply = await wire.recv()
        if isinstance(reply, TaskRequestMsg):  # the initiator's own checks: answer nothing
            continue
        if not isinstance(reply, TaskResultMsg) or reply.task_id == 77:
            emit("reply", reply=describe(reply))
            return
    emit("reply", reply={"type": "none"})


async def s_truncated(peer: Hostile) -> None:
    """Half a TaskRequest frame, then close the stream; then a good task on a new session."""
    wire = await peer.open_session()
    request, _ = matmul_request(peer.task_id())
    data = b"".join(bytes(p) for p in pangea.encode_parts(request))
    await wire.write(data[: len(data) // 2])
    await wire.close()
    emit("reply", reply=describe(await wire.recv(3)))
    await peer.good()


async def s_oversized(peer: Hostile) -> None:
    """Frame prefixes over the limits, in a session and before any Hello."""
    header = raw_header("ping", nonce=1)
    cases = {
        "payload-2^40": FRAME_PREFIX.pack(len(header), 1 << 40) + header,
        "header-0": FRAME_PREFIX.pack(0, 0),
        "header-1MiB+1": FRAME_PREFIX.pack(pangea.MAX_HEADER_BYTES + 1, 0) + bytes(1000),
        "header-2^32-1": FRAME_PREFIX.pack((1 << 32) - 1, 0),
    }
    for name, data in cases.items():
        wire = await peer.open_session()
        await wire.write(data)
        emit("in-session", case=name, reply=describe(await wire.recv()), then=describe(await wire.recv(3)))
        wire = await peer.raw()
        await wire.write(data)
        emit("before-hello", case=name, reply=describe(await wire.recv()))
    await peer.good()


async def s_garbage(peer: Hostile) -> None:
    """Random bytes, in a session and before any Hello; then a good task."""
    rng = random.Random(7)
    for size in (12, 100, 4096, 65536):
        junk = bytes(rng.getrandbits(8) for _ in range(size))
        wire = await peer.open_session()
        await wire.write(junk)
        emit("in-session", size=size, reply=describe(await wire.recv(3)))
        await wire.reset()
        wire = await peer.raw()
        await wire.write(junk)
        emit("before-hello", size=size, reply=describe(await wire.recv(3)))
    # A well-framed header that is not Cap'n Proto at all.
    wire = await peer.open_session()
    await wire.write(FRAME_PREFIX.pack(64, 0) + b"\xff" * 64)
    emit("bad-capnp", reply=describe(await wire.recv()))
    await peer.good()


async def s_wrong_order(peer: Hostile) -> None:
    """A TaskResult and a TaskRequest before Hello, then a second Hello inside a session."""
    for first in (TaskResultMsg(5, error_kind="busy", error_message="x"), matmul_request(6)[0], PongMsg(3)):
        wire = await peer.raw()
        await wire.send(first)
        emit("before-hello", first=type(first).__name__, reply=describe(await wire.recv()))
    wire = await peer.open_session()
    await wire.send(peer.hello())
    emit("second-hello", reply=describe(await wire.recv()), then=describe(await wire.recv(3)))
    await peer.good()


async def _one_request(peer: Hostile, wire: Wire, name: str, header: bytes, payload: bytes) -> None:
    await wire.write(frame(header, len(payload)), payload)
    (reply,) = await peer.results(wire, 1)
    emit("reply", case=name, reply=describe(reply))


async def s_bad_arrays(peer: Hostile) -> None:
    """Unknown kernels, dtypes not allowed, byte counts that lie, huge dimensions: each one
    answered with a TaskResult error, the session goes on, and a good task runs on it."""
    wire = await peer.open_session()
    f8 = "float64"

    def req(kernel: str, metas: list[tuple[str, list[int], int]], **params: float) -> bytes:
        return raw_header("taskRequest", taskId=peer.task_id(), kernel=kernel, metas=metas, params=params)

    cases: list[tuple[str, bytes, bytes]] = [
        ("unknown-kernel", req("__import__('os').system", [(f8, [2], 16)]), bytes(16)),
        ("unknown-kernel-empty", req("", []), b""),
        ("dtype-object", req("transpose", [("object", [2], 16)]), bytes(16)),
        ("dtype-float16", req("transpose", [("float16", [4], 8)]), bytes(8)),
        ("dtype-void", req("transpose", [("V8", [2], 16)]), bytes(16)),
        ("dtype-bigendian", req("transpose", [(">f8", [2], 16)]), bytes(16)),
        ("nbytes-lies", req("transpose", [(f8, [10, 10], 80)]), bytes(80)),
        ("payload-short", req("transpose", [(f8, [10, 10], 800)]), bytes(80)),
        ("payload-long", req("transpose", [(f8, [2], 16)]), bytes(64)),
        ("huge-dims", req("matmul", [(f8, [1 << 40, 1 << 40], 8), (f8, [1 << 40, 1 << 40], 8)]), bytes(16)),
        ("huge-dims-max", req("transpose", [(f8, [(1 << 64) - 1, (1 << 64) - 1], 0)]), b""),
        ("zero-by-huge", req("transpose", [(f8, [0, (1 << 64) - 1], 0)]), b""),
        ("nine-dims", req("transpose", [(f8, [1] * 9, 8)]), bytes(8)),
        ("wrong-arity", req("matmul", [(f8, [2, 2], 32)]), bytes(32)),
        ("unknown-param", req("scale", [(f8, [2], 16)], evil=1.0), bytes(16)),
        ("nan-param", req("scale", [(f8, [2], 16)], factor=math.nan), bytes(16)),
        ("random-huge", req("random", [], rows=float(1 << 24), cols=float(1 << 24)), b""),
        ("shape-mismatch", req("matmul", [(f8, [2, 3], 48), (f8, [2, 3], 48)]), bytes(96)),
    ]
    for name, header, payload in cases:
        await _one_request(peer, wire, name, header, payload)
    await peer.good(wire)


async def s_huge_output(peer: Hostile) -> None:
    """(n x 1) @ (1 x n) with n = 200000: 40e9 elements (320 GB as float64) from 3 MB of input."""
    n = 200_000
    wire = await peer.open_session()
    a, b = np.ones((n, 1)), np.ones((1, n))
    for kernel, ops in (("matmul", (a, b)), ("add", (a, b)), ("multiply", (a, b))):
        task_id = peer.task_id()
        started = time.monotonic()
        await wire.send(TaskRequestMsg(task_id, kernel, ops))
        (reply,) = await peer.results(wire, 1)
        emit("reply", case=kernel, reply=describe(reply), seconds=round(time.monotonic() - started, 3))
    await peer.good(wire)


async def s_nan_inf(peer: Hostile) -> None:
    """NaN and Inf where they matter (solve, inverse); the same arrays are fine for add."""
    wire = await peer.open_session()
    m = np.eye(4)
    nan_m, inf_m, nan_v = m.copy(), m.copy(), np.ones(4)
    nan_m[1, 2] = np.nan
    inf_m[0, 0] = np.inf
    nan_v[3] = np.nan
    cases = {
        "solve-nan-matrix": ("solve", (nan_m, np.ones(4))),
        "solve-inf-matrix": ("solve", (inf_m, np.ones(4))),
        "solve-nan-rhs": ("solve", (m, nan_v)),
        "inverse-nan": ("inverse", (nan_m,)),
        "inverse-inf": ("inverse", (inf_m,)),
        "inverse-singular": ("inverse", (np.zeros((4, 4)),)),
        "add-nan": ("add", (nan_m, m)),
    }
    for name, (kernel, ops) in cases.items():
        await wire.send(TaskRequestMsg(peer.task_id(), kernel, ops))
        (reply,) = await peer.results(wire, 1)
        emit("reply", case=name, reply=describe(reply))
    await peer.good(wire)


async def s_stream_flood(peer: Hostile) -> None:
    """--count streams opened at once that never write; report how each ended and when
    (seconds since the flood started: when it was open, when it ended)."""
    start = trio.current_time()
    streams: list[dict[str, Any]] = []

    async def one() -> None:
        try:
            wire = await peer.raw()
        except Exception as exc:  # a reset during protocol negotiation fails new_stream itself
            at = round(trio.current_time() - start, 3)
            streams.append({"end": f"open failed: {type(exc).__name__}", "opened": at, "ended": at})
            return
        opened = trio.current_time() - start
        reply = await wire.recv(peer.args.timeout)
        ended = trio.current_time() - start
        streams.append({"end": describe(reply)["type"], "opened": round(opened, 3), "ended": round(ended, 3)})

    async with trio.open_nursery() as nursery:
        for _ in range(peer.args.count):
            nursery.start_soon(one)
    kinds: dict[str, int] = {}
    for stream in streams:
        kinds[stream["end"]] = kinds.get(stream["end"], 0) + 1
    emit("flood", count=len(streams), kinds=kinds, streams=streams)
    await peer.good()


async def s_identity_flood(peer: Hostile) -> None:
    """--identities fresh libp2p identities (each its own host, never trusted) each open
    --count streams and write the start of a frame whose header announces --header-kib
    KiB, of which --partial-kib KiB are sent, then nothing. Report how many streams
    stayed open at the node (accepted: no reset within --hold s) and how each ended;
    then the main identity runs a good task."""
    from contextlib import AsyncExitStack

    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    start = trio.current_time()
    streams: list[dict[str, Any]] = []
    partial = FRAME_PREFIX.pack(peer.args.header_kib << 10, 0) + b"\x00" * (peer.args.partial_kib << 10)
    hold = peer.args.hold or 5.0

    async def one(host: Any) -> None:
        try:
            with trio.fail_after(peer.args.timeout):
                stream = await host.new_stream(ID.from_base58(peer.target.peer_id), [TProtocol(pangea.PROTOCOL_ID)])
            wire = Wire(stream, peer.args.timeout)
        except Exception as exc:  # reset during negotiation, or the connection closed
            streams.append({"end": f"open failed: {type(exc).__name__}", "held": 0.0})
            return
        opened = trio.current_time()
        end = "timeout"  # still open after --hold s: the node accepted it
        with trio.move_on_after(hold):
            end = describe(await wire.recv(hold + 1))["type"] if await wire.write(partial) else "reset"
        held = trio.current_time() - opened
        streams.append({"end": end, "held": round(held, 3)})
        with trio.move_on_after(1):
            await wire.reset()

    async def identity(stack: AsyncExitStack, hosts: list[Any]) -> None:
        host = pangea.make_host(create_new_key_pair(), pangea.read_psk_file(peer.args.psk))
        await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        try:
            with trio.fail_after(peer.args.timeout):
                await host.connect(info_from_p2p_addr(Multiaddr(peer.target.text)))
        except Exception as exc:
            failed = {"end": f"connect failed: {type(exc).__name__}", "held": 0.0}
            streams.extend(dict(failed) for _ in range(peer.args.count))
            return
        hosts.append(host)

    async with AsyncExitStack() as stack:
        hosts: list[Any] = []  # every identity connects first, then all open their streams at once
        for _ in range(peer.args.identities):
            await identity(stack, hosts)
        async with trio.open_nursery() as nursery:
            for host in hosts:
                for _ in range(peer.args.count):
                    nursery.start_soon(one, host)
        kinds: dict[str, int] = {}
        for stream in streams:
            kinds[stream["end"]] = kinds.get(stream["end"], 0) + 1
        accepted = sum(1 for s in streams if s["held"] >= hold - 0.5)
        emit(
            "identity-flood",
            count=len(streams),
            accepted=accepted,
            kinds=kinds,
            seconds=round(trio.current_time() - start, 1),
        )
        await peer.good()


async def s_idle_connections(peer: Hostile) -> None:
    """--identities fresh identities each connect (Noise + Yamux) and open no stream.
    Report how many of their connections the node kept 1 s after the last connected
    (open_after_connect) and after --hold s (open_at_end); then the main identity runs
    a good task."""
    from contextlib import AsyncExitStack

    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    target = ID.from_base58(peer.target.peer_id)

    def still_open(hosts: list[Any]) -> int:
        return sum(1 for host in hosts if host.get_network().get_connections(target))

    async with AsyncExitStack() as stack:
        hosts: list[Any] = []
        for _ in range(peer.args.identities):
            host = pangea.make_host(create_new_key_pair(), pangea.read_psk_file(peer.args.psk))
            await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            try:
                with trio.fail_after(peer.args.timeout):
                    await host.connect(info_from_p2p_addr(Multiaddr(peer.target.text)))
                hosts.append(host)
            except Exception:  # closed at once by the node: counted as not open
                hosts.append(host)
        await trio.sleep(1.0)
        after_connect = still_open(hosts)
        await trio.sleep(max(0.0, (peer.args.hold or 5.0) - 1.0))
        emit("idle-connections", connected=len(hosts), open_after_connect=after_connect, open_at_end=still_open(hosts))
    await peer.good()


async def s_reconnect_cycle(peer: Hostile) -> None:
    """--identities times, --count at once: an identity connects (Noise + Yamux) and
    hangs up at once. Report how many connected and the first that could not; then
    the main identity runs a good task (a node that holds a slot per past connection
    has none left for it)."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    target, info = ID.from_base58(peer.target.peer_id), info_from_p2p_addr(Multiaddr(peer.target.text))
    cycles = iter(range(peer.args.identities))
    connected, failures = 0, []

    async def cycler() -> None:  # --count of them at once, sharing the cycles
        nonlocal connected
        host = pangea.make_host(create_new_key_pair(), pangea.read_psk_file(peer.args.psk))
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            for i in cycles:
                try:
                    with trio.fail_after(peer.args.timeout):
                        await host.connect(info)
                        connected += 1
                        await host.disconnect(target)
                except Exception:
                    failures.append(i)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, peer.args.count)):
            nursery.start_soon(cycler)
    first_failure = min(failures) if failures else None
    emit("reconnect-cycle", cycles=peer.args.identities, connected=connected, first_failure=first_failure)
    await peer.good()


async def s_mid_frame_disconnect(peer: Hostile) -> None:
    """A TaskRequest announcing --announce-mib of operands, a few KiB of them, then the
    connection is closed; reconnect and run a good task."""
    wire = await peer.open_session()
    n = peer.args.announce_mib << 20
    header = raw_header("taskRequest", taskId=peer.task_id(), kernel="scale", metas=[("float64", [n // 8], n)])
    await wire.write(frame(header, n), bytes(4096))
    await trio.sleep(0.5)
    await peer.disconnect()
    emit("disconnected", announced=n)
    await trio.sleep(0.5)
    await peer.connect()
    await peer.good()


async def s_payload_on_ping(peer: Hostile) -> None:
    """Frames whose message type carries no payload (Ping, and an unsolicited TaskResult)
    announcing --announce-mib of payload, none of it sent: the node must refuse them at the
    header, not allocate the payload and wait."""
    n = peer.args.announce_mib << 20
    for name, header in (
        ("ping", raw_header("ping", nonce=5)),
        ("task-result", raw_header("taskResult", taskId=99, metas=[("float64", [n // 8], n)])),
    ):
        wire = await peer.open_session()
        await wire.write(frame(header, n))
        reply = await wire.recv(2)
        emit("reply", case=name, reply=describe(reply))
        if peer.args.hold:
            emit("holding", case=name, seconds=peer.args.hold)
            await trio.sleep(peer.args.hold)
        await wire.reset()
        await trio.sleep(0.5)
    await peer.good()


async def _duplicates(peer: Hostile, task_id: int, copies: int) -> None:
    wire = await peer.open_session()
    first, _ = matmul_request(task_id, n=peer.args.n)
    small = TaskRequestMsg(task_id, "transpose", (np.arange(6.0).reshape(2, 3),))
    replies = await peer.exchange(wire, [first] + [small] * (copies - 1), peer.args.timeout * 2)
    emit("replies", replies=[describe(r) for r in replies])
    await peer.good(wire)


async def s_duplicate_id(peer: Hostile) -> None:
    """Task 4242 (a matmul of --n), and a second request with the same id while it runs."""
    await _duplicates(peer, 4242, 2)


async def s_duplicate_id_3(peer: Hostile) -> None:
    """Task 4343 and two more requests with the same id while it runs: only the first may run."""
    await _duplicates(peer, 4343, 3)


async def s_inflight(peer: Hostile) -> None:
    """--count slow tasks (matmul of --n) sent back to back on one session."""
    wire = await peer.open_session()
    requests = [matmul_request(peer.task_id(), n=peer.args.n, seed=i)[0] for i in range(peer.args.count)]
    replies = await peer.exchange(wire, requests, peer.args.timeout * 3)
    emit("replies", replies=[describe(r) for r in replies])
    await peer.good(wire)


async def s_inflight_after_duplicate(peer: Hostile) -> None:
    """Task A, a duplicate of A (refused), then 4 more: the in-flight limit must still count A."""
    wire = await peer.open_session()
    a = peer.task_id()
    requests = [matmul_request(a, n=peer.args.n)[0], TaskRequestMsg(a, "transpose", (np.ones((2, 2)),))]
    requests += [matmul_request(peer.task_id(), n=peer.args.n, seed=i)[0] for i in range(4)]
    replies = await peer.exchange(wire, requests, peer.args.timeout * 3)
    emit("replies", first=a, replies=[describe(r) for r in replies])
    await peer.good(wire)


async def s_flood(peer: Hostile) -> None:
    """--count large matmuls ((n x n) @ (n x n) float64) written back to back on one session."""
    wire = await peer.open_session()
    n = peer.args.n
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    requests = [TaskRequestMsg(peer.task_id(), "matmul", (a, b)) for _ in range(peer.args.count)]
    started = time.monotonic()
    emit("start", count=len(requests), request_mib=(a.nbytes + b.nbytes) >> 20)
    collected = await peer.exchange(wire, requests, peer.args.timeout * 6)
    results = [r for r in collected if isinstance(r, TaskResultMsg)]
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r.error_kind or "ok"] = kinds.get(r.error_kind or "ok", 0) + 1
    busy = [r.error_message for r in results if r.error_kind == "busy"]
    wrong = [r.task_id for r in results if r.ok and not r.outputs[0].shape == (n, n)]
    emit(
        "flood",
        sent=len(requests),
        results=len(results),
        kinds=kinds,
        others=[describe(r) for r in collected if not isinstance(r, TaskResultMsg)],
        busy_example=busy[:1],
        wrong_shapes=wrong,
        seconds=round(time.monotonic() - started, 2),
    )
    await peer.good(wire)


async def s_good(peer: Hostile) -> None:
    """Only the good task."""
    await peer.good()


async def s_forged_home(peer: Hostile) -> None:
    """Claim to run from the target's own home: a garbage proof, then one signed by our own key."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    message = pangea.home_proof_message(peer.target.peer_id, peer.peer_id)
    for name, proof in (("garbage", b"\x00" * 64), ("wrong-key", create_new_key_pair().private_key.sign(message))):
        wire = await peer.raw()
        await wire.send(peer.hello(home_id=peer.target.peer_id, home_proof=proof))
        emit("forged-home", proof=name, reply=describe(await wire.recv()))
        await wire.close()


SCENARIOS: dict[str, Callable[[Hostile], Awaitable[None]]] = {
    "hello": s_hello,
    "forged-home": s_forged_home,
    "pair-tries": s_pair_tries,
    "task-on-initiator": s_task_on_initiator,
    "truncated": s_truncated,
    "oversized": s_oversized,
    "garbage": s_garbage,
    "wrong-order": s_wrong_order,
    "bad-arrays": s_bad_arrays,
    "huge-output": s_huge_output,
    "nan-inf": s_nan_inf,
    "stream-flood": s_stream_flood,
    "identity-flood": s_identity_flood,
    "idle-connections": s_idle_connections,
    "reconnect-cycle": s_reconnect_cycle,
    "mid-frame-disconnect": s_mid_frame_disconnect,
    "payload-on-ping": s_payload_on_ping,
    "duplicate-id": s_duplicate_id,
    "duplicate-id-3": s_duplicate_id_3,
    "inflight": s_inflight,
    "inflight-after-duplicate": s_inflight_after_duplicate,
    "flood": s_flood,
    "good": s_good,
}


async def run(args: argparse.Namespace) -> int:
    global _scenario
    import libp2p  # noqa: F401  (it resets its logger on import; quieten it afterwards)
    from multiaddr import Multiaddr

    # The hostile side's own libp2p complaints (streams the node reset) are expected noise.
    logging.getLogger("libp2p").handlers[:] = [logging.NullHandler()]
    logging.getLogger("libp2p").propagate = False
    key_pair = pangea.load_or_create_identity(Path(args.home))
    host = pangea.make_host(key_pair, pangea.read_psk_file(args.psk))
    target = pangea.parse_peer_address(args.target)
    failed = 0
    async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        peer = Hostile(host, target, args)
        emit("ready", peer_id=peer.peer_id)
        await peer.connect()
        for name in args.scenarios:
            _scenario = name
            try:
                with trio.fail_after(args.scenario_timeout):
                    await SCENARIOS[name](peer)
            except Exception as exc:  # report and go on: the test asserts on the lines
                failed += 1
                emit("crash", error=f"{type(exc).__name__}: {exc}")
                await peer.connect()
            await peer.end_session()
            emit("done")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="the hostile peer's own PANGEA_HOME (its identity)")
    p.add_argument("--target", required=True, help="multiaddr of the node under test")
    p.add_argument("--role", default="serve", help="role in its Hello (serve, responder)")
    p.add_argument("--code", default="", help="pairing code to prove in the Hello")
    p.add_argument("--codes", default="", help="pair-tries: comma-separated codes, one Hello each")
    p.add_argument("--psk", help="pre-shared key file")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--identities", type=int, default=10, help="identity-flood: fresh identities")
    p.add_argument("--header-kib", type=int, default=1023, help="identity-flood: the header length announced")
    p.add_argument("--partial-kib", type=int, default=1000, help="identity-flood: how much of it is sent")
    p.add_argument("--n", type=int, default=1024, help="matrix size of the slow tasks")
    p.add_argument("--announce-mib", type=int, default=64)
    p.add_argument("--hold", type=float, default=0.0, help="payload-on-ping: seconds to keep the frame open")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for one reply")
    p.add_argument("--scenario-timeout", type=float, default=120.0)
    p.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = p.parse_args(argv)
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())

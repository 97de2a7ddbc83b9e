"""The bulk channel's parts that need no node: what the node maps, how it reads an operand in
place and writes an output, how a Client pools its segments (memfds, no sockets but one
socketpair for the handshake)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pangea
from pangea import TaskError, bulk_take_fds, shared_operand, write_shared_output


def sealed(data: bytes, size: int | None = None) -> int:
    """A memfd holding ``data``, sealed at its size as a Client makes them."""
    segment = pangea._Segment(size or len(data), "pangea-test")
    segment.mapping[: len(data)] = data
    segment.mapping.close()
    return segment.fd


def test_the_node_maps_sealed_memfds_and_closes_their_descriptors() -> None:
    a = np.arange(10.0)
    fds = [sealed(a.tobytes()), sealed(b"\0" * 4096)]
    segments = bulk_take_fds(fds, b"rw", 1 << 20)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    assert [s.writable for s in segments] == [False, True]
    operand = shared_operand(
        SimpleNamespace(dtype="float64", shape=[10], shared=SimpleNamespace(segment=1, offset=0)), 0, segments
    )
    assert np.array_equal(operand, a) and not operand.flags.writeable  # in place, read-only
    with pytest.raises(TypeError):
        segments[0].mapping[:1] = b"x"  # the node cannot write an operand
    assert write_shared_output(np.arange(6, dtype=">i4").reshape(2, 3), segments[1])
    assert np.array_equal(np.frombuffer(segments[1].mapping, "<i4", 6), np.arange(6))
    assert not write_shared_output(np.zeros(1000), segments[1])  # too large: the message takes it
    assert not write_shared_output(np.zeros(1), segments[0])  # an operand's segment is not written
    del operand
    for s in segments:
        s.close()
    assert segments[0].mapping.closed


@pytest.mark.parametrize("kind", ["unsealed", "file", "pipe", "too-large"])
def test_the_node_refuses_what_is_not_a_sealed_memfd_and_closes_it(kind: str) -> None:
    if kind == "unsealed":
        fd = os.memfd_create("pangea-test")
        os.ftruncate(fd, 4096)
    elif kind == "file":
        handle, _ = tempfile.mkstemp()
        os.write(handle, b"x" * 4096)
        fd = handle
    elif kind == "pipe":
        fd, other = os.pipe()
        os.close(other)
    else:
        fd = sealed(b"x" * 8192)
    with pytest.raises(TaskError) as caught:
        bulk_take_fds([fd], b"r", 4096)
    assert caught.value.kind in ("bad-input", "busy")
    with pytest.raises(OSError):
        os.fstat(fd)


def test_an_operand_must_lie_inside_its_segment_and_name_an_operand_segment() -> None:
    segments = bulk_take_fds([sealed(b"\0" * 4096), sealed(b"\0" * 4096)], b"rw", 1 << 20)

    def reader(segment: int, offset: int, shape: list[int], dtype: str = "float64") -> SimpleNamespace:
        return SimpleNamespace(dtype=dtype, shape=shape, shared=SimpleNamespace(segment=segment, offset=offset))

    assert shared_operand(reader(1, 4096 - 8, [1]), 0, segments).shape == (1,)
    for bad, words in [
        (reader(1, 4096, [1]), "runs past the end"),
        (reader(1, 0, [513]), "runs past the end"),
        (reader(2, 0, [1]), "no shared segment 2"),  # the output's segment is not an operand
        (reader(3, 0, [1]), "no shared segment 3"),
        (reader(1, 0, [2], "float16"), "dtype 'float16' is not allowed"),
    ]:
        with pytest.raises(TaskError, match=words) as caught:
            shared_operand(bad, 1, segments)
        assert caught.value.kind == "bad-input" and "operand 1" in str(caught.value)
    for s in segments:
        s.close()


def test_a_client_reuses_its_operand_segments_and_bounds_the_pool() -> None:
    pool = pangea._SegmentPool()
    first = pool.get(100_000)
    assert first.size >= 100_000 and first.size % os.sysconf("SC_PAGE_SIZE") == 0
    seals = fcntl.fcntl(first.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    pool.put(first)
    assert pool.get(90_000) is first  # reused: warm pages
    pool.put(first)
    assert pool.get(10) is not first  # far too large for 10 bytes: a new one
    segments = [pool.get(4096) for _ in range(pangea.BULK_POOL_SEGMENTS + 3)]
    for s in segments:
        pool.put(s)
    assert len(pool._free) <= pangea.BULK_POOL_SEGMENTS
    assert sum(s.fd < 0 for s in segments) >= 3  # the excess closed
    pool.close()
    assert all(s.fd < 0 for s in segments)


def resident_bytes(segment: pangea._Segment) -> int:
    """The bytes of a memfd that have memory behind them (pages touched)."""
    return os.fstat(segment.fd).st_blocks * 512


def test_a_pool_prepares_one_touched_segment_ahead_and_the_first_get_that_fits_takes_it() -> None:
    mib = 1 << 20
    pool = pangea._SegmentPool("pangea-result")
    pool.prepare(8 * mib, 4 * mib)
    pool.prepare(8 * mib, 4 * mib)  # one at a time: this one is ignored
    assert pool._warming is not None
    pool._warming.join(30)
    (prepared,) = pool._free
    assert prepared.size == 8 * mib and pool._prepared == [prepared]
    assert resident_bytes(prepared) == 4 * mib  # only the bytes asked were touched
    assert pool.get(4 * mib) is prepared  # 8 MiB is not too large for 4 MiB: taken
    assert pool._prepared == [] and pool._free == []
    pool.put(prepared)
    pool.close()
    assert prepared.fd < 0


def test_a_get_waits_for_the_segment_being_prepared_rather_than_making_another() -> None:
    pool = pangea._SegmentPool()
    pool.prepare(16 << 20, 16 << 20)
    got = pool.get(16 << 20)  # at once: the thread may not have finished
    assert got.size == 16 << 20 and resident_bytes(got) == 16 << 20
    assert pool._free == [] and pool._prepared == []  # it was the prepared one
    got.close()
    pool.close()


def test_a_prepared_segment_too_small_for_the_calls_made_is_released() -> None:
    pool = pangea._SegmentPool()
    pool.prepare(1 << 20, 1 << 20)
    assert pool._warming is not None
    pool._warming.join(30)
    (prepared,) = pool._prepared
    small = pool.get(4096)  # far smaller: a new one, the prepared one stays for a larger call
    assert small is not prepared and prepared.fd >= 0
    big = pool.get(2 << 20)  # larger than it: it can serve none of these calls
    assert prepared.fd < 0 and pool._prepared == [] and pool._free == []
    for s in (small, big):
        s.close()
    pool.close()


def test_a_closed_pool_releases_what_it_prepared_and_prepares_no_more() -> None:
    pool = pangea._SegmentPool()
    pool.prepare(8 << 20, 8 << 20)
    pool.close()  # maybe while the thread still makes it: then it closes it itself
    assert pool._warming is not None and not pool._warming.is_alive()
    assert pool._free == [] and pool._prepared == []
    pool.prepare(8 << 20, 8 << 20)
    assert pool._free == [] and not pool._warming.is_alive()  # the same, finished thread: none new


def test_the_node_faults_in_only_the_pages_of_the_output_it_writes() -> None:
    segment = pangea._Segment(8 << 20, "pangea-test")  # sized for a bound larger than the result
    (mapped,) = bulk_take_fds([os.dup(segment.fd)], b"w", 1 << 30)
    out = np.arange((1 << 20) // 8, dtype=np.float64)
    assert write_shared_output(out, mapped)
    assert resident_bytes(segment) == 1 << 20  # not the 8 MiB the segment could hold
    assert np.array_equal(np.frombuffer(segment.mapping, dtype=np.float64, count=out.size), out)
    mapped.close()
    segment.close()


def test_the_bulk_server_refuses_a_wrong_token_and_takes_a_batch_once() -> None:
    import asyncio

    async def main() -> None:
        server = pangea.BulkServer("right-token", 1 << 20)
        path = server.start(asyncio.get_running_loop())
        try:
            assert (
                oct(os.stat(path).st_mode & 0o777) == "0o600" and oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
            )
            with pytest.raises(pangea.RpcError, match="wrong or missing RPC token"):
                await asyncio.to_thread(pangea._BulkChannel, str(path), "wrong-token")
            channel = await asyncio.to_thread(pangea._BulkChannel, str(path), "right-token")
            channel.attach(asyncio.get_running_loop())
            segment = pangea._Segment(4096, "pangea-test")
            name = await channel.send([segment], b"r")
            assert len(server.take(name)) == 1
            with pytest.raises(TaskError, match="no shared segments"):
                server.take(name)  # once
            server.finish(name)
            with pytest.raises(pangea.RpcError, match="refused the shared segments"):
                await channel.send([segment], b"rw")  # kinds and segments disagree
            channel.close()
            segment.close()
        finally:
            server.stop()
        assert not path.exists() and not path.parent.exists()

    asyncio.run(main())


def test_the_bulk_server_maps_a_large_batch_off_its_loop_and_refuses_one_past_the_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import threading

    where: list[str] = []
    take_fds = pangea.bulk_take_fds

    def recorded(fds: list[int], kinds: bytes, room_bytes: int) -> list[pangea.BulkSegment]:
        where.append(threading.current_thread().name)
        return take_fds(fds, kinds, room_bytes)

    monkeypatch.setattr(pangea, "bulk_take_fds", recorded)
    big = pangea.BULK_MAP_INLINE_BYTES * 2

    async def main() -> None:
        server = pangea.BulkServer("token", big + pangea.BULK_MAP_INLINE_BYTES)
        path = server.start(asyncio.get_running_loop())
        try:
            channel = await asyncio.to_thread(pangea._BulkChannel, str(path), "token")
            channel.attach(asyncio.get_running_loop())
            small, large = pangea._Segment(4096, "pangea-test"), pangea._Segment(big, "pangea-test")
            await channel.send([small], b"r")
            name = await channel.send([large], b"r")
            assert where == [threading.current_thread().name, where[1]] and where[1] != where[0]  # the large: a worker
            (mapped,) = server.take(name)
            assert mapped.size == big and server._mapping == {}
            with pytest.raises(pangea.RpcError, match="segments of more than"):
                await channel.send([large, pangea._Segment(big, "pangea-test")], b"rr")  # past the room
            assert server._mapping == {}
            server.finish(name)
            channel.close()
        finally:
            server.stop()

    asyncio.run(main())


def test_a_batch_mapped_after_its_connection_closed_is_unmapped_at_once() -> None:
    import concurrent.futures

    server = pangea.BulkServer("token", 1 << 30)
    segment = pangea._Segment(4096, "pangea-test")
    (mapped,) = bulk_take_fds([os.dup(segment.fd)], b"r", 1 << 30)
    done: concurrent.futures.Future[list[pangea.BulkSegment]] = concurrent.futures.Future()
    done.set_result([mapped])
    gone = object()  # a connection the server no longer holds
    server._mapping[b"n" * 16] = (gone, 4096)  # type: ignore[assignment]
    server._mapped(gone, b"n" * 16, done)  # type: ignore[arg-type]
    assert server._mapping == {} and mapped.mapping.closed
    segment.close()


def test_a_node_removes_the_bulk_directories_of_its_dead_nodes_only(tmp_path: Path) -> None:
    dead, alive, other = (
        tmp_path / "pangea-bulk-999999999-abc",
        tmp_path / f"pangea-bulk-{os.getpid()}-x",
        tmp_path / "unrelated",
    )
    for d in (dead, alive, other):
        d.mkdir()
        (d / "bulk.sock").write_text("")
    pangea._remove_stale_bulk_dirs(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()


# The bulk channel over TLS: TlsBulkConnection fed bytes as asyncio's TLS reader would.


class _Wire:
    """What a TlsBulkConnection writes and whether it closed or logged in."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.logins = 0

    def frames(self) -> list[tuple[bytes, bytes]]:
        got, data = [], bytes(self.out)
        while data:
            size = int.from_bytes(data[1:5], "big")
            got.append((data[:1], data[5 : 5 + size]))
            data = data[5 + size :]
        self.out.clear()
        return got


def _tls_bulk(budget_bytes: int = 1 << 20) -> tuple[pangea.TlsBulkConnection, pangea.TlsBulkBatches, _Wire]:
    limiter = pangea.LoginLimiter(0.0, 0.0, 60.0, 60.0, 16)
    batches = pangea.TlsBulkBatches("tok", pangea.MemoryBudget(budget_bytes), limiter)
    wire = _Wire()

    def close() -> None:
        wire.closed = True

    def logged_in() -> None:
        wire.logins += 1

    conn = pangea.TlsBulkConnection(batches, "10.0.0.2", wire.out.extend, close, logged_in)
    return conn, batches, wire


def _feed(conn: pangea.TlsBulkConnection, data: bytes, step: int) -> None:
    """Feed ``data`` through get_buffer/buffer_updated, at most ``step`` bytes at a time."""
    view = memoryview(data)
    while view:
        buffer = conn.get_buffer()
        n = min(len(buffer), len(view), step)
        buffer[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


def _upload_header(name: bytes, sizes: list[int], out: int = 0) -> bytes:
    entries = b"".join(b"r" + n.to_bytes(8, "big") for n in sizes) + (b"w" + out.to_bytes(8, "big") if out else b"")
    return pangea.bulk_frame(b"U", name + bytes([len(sizes) + bool(out)]) + entries)


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_a_tls_bulk_upload_lands_in_the_node_s_buffers_and_is_charged_until_its_task_ends(step: int) -> None:
    conn, batches, wire = _tls_bulk()
    a, b = np.arange(10.0), np.arange(6, dtype="<i4")
    _feed(conn, pangea.bulk_frame(b"H", b"tok"), step)
    assert wire.frames() == [(b"K", b"")] and wire.logins == 1
    name = b"n" * 16
    _feed(conn, _upload_header(name, [a.nbytes, b.nbytes], out=80), step)
    assert wire.frames() == [(b"K", name)]
    assert batches.budget.in_use == a.nbytes + b.nbytes  # charged from the header on
    _feed(conn, a.tobytes() + b.tobytes(), step)
    assert wire.frames() == [(b"K", name)]
    segments = batches.take(name)
    assert [s.writable for s in segments] == [False, False, True] and segments[2].sender is conn
    reader = SimpleNamespace(dtype="int32", shape=[2, 3], shared=SimpleNamespace(segment=2, offset=0))
    assert np.array_equal(shared_operand(reader, 1, segments), b.reshape(2, 3))
    with pytest.raises(TaskError, match="no uploaded arrays"):
        batches.take(name)  # once
    batches.finish(name)
    assert batches.budget.in_use == 0 and not wire.closed


def test_a_tls_bulk_connection_refuses_a_wrong_token_and_what_comes_before_login() -> None:
    conn, batches, wire = _tls_bulk()
    import asyncio

    async def run() -> None:
        _feed(conn, pangea.bulk_frame(b"H", b"wrong"), 64)
        _feed(conn, _upload_header(b"n" * 16, [8]), 64)  # dropped while the refusal waits
        await asyncio.sleep(0.01)

    asyncio.run(run())
    ((kind, payload),) = wire.frames()
    assert kind == b"E" and b"wrong or missing RPC token" in payload
    assert wire.closed and wire.logins == 0 and batches.budget.in_use == 0


@pytest.mark.parametrize(
    "frame",
    [
        pangea.bulk_frame(b"U", b"short"),
        pangea.bulk_frame(b"U", b"n" * 16 + bytes([0])),  # no segments
        pangea.bulk_frame(b"U", b"n" * 16 + bytes([1]) + b"x" + (8).to_bytes(8, "big")),  # unknown kind
        pangea.bulk_frame(b"U", b"n" * 16 + bytes([1]) + b"r" + (0).to_bytes(8, "big")),  # empty segment
        pangea.bulk_frame(b"U", b"n" * 16 + bytes([2]) + b"w" + (8).to_bytes(8, "big") + b"r" + (8).to_bytes(8, "big")),
        pangea.bulk_frame(b"Z", b""),  # unknown frame
        b"U" + (pangea.BULK_MESSAGE_BYTES + 1).to_bytes(4, "big"),  # a frame over the limit, before its bytes
    ],
)
def test_a_tls_bulk_connection_closes_on_a_malformed_frame_and_holds_nothing(frame: bytes) -> None:
    conn, batches, wire = _tls_bulk()
    _feed(conn, pangea.bulk_frame(b"H", b"tok"), 64)
    wire.frames()
    _feed(conn, frame, 64)
    assert wire.closed and batches.budget.in_use == 0


def test_a_tls_bulk_upload_over_the_budget_is_refused_at_its_header_with_its_kind() -> None:
    conn, batches, wire = _tls_bulk(budget_bytes=1000)
    _feed(conn, pangea.bulk_frame(b"H", b"tok"), 64)
    wire.frames()
    _feed(conn, _upload_header(b"a" * 16, [2000]), 64)
    ((kind, payload),) = wire.frames()
    assert kind == b"E" and payload.startswith(b"a" * 16 + b"bad-input\n") and b"can never fit" in payload
    batches.budget.try_acquire(900)  # others hold most of it
    _feed(conn, _upload_header(b"b" * 16, [200]), 64)
    ((kind, payload),) = wire.frames()
    assert kind == b"E" and payload.startswith(b"b" * 16 + b"busy\n") and b"retry later" in payload
    assert not wire.closed and batches.budget.in_use == 900


def test_a_tls_bulk_connection_that_closes_gives_back_its_half_received_and_waiting_batches() -> None:
    conn, batches, wire = _tls_bulk()
    _feed(conn, pangea.bulk_frame(b"H", b"tok"), 64)
    _feed(conn, _upload_header(b"a" * 16, [64]), 64)
    _feed(conn, bytes(64), 64)  # batch a waits for its task
    _feed(conn, _upload_header(b"b" * 16, [128]), 64)
    _feed(conn, bytes(50), 64)  # batch b half received
    assert batches.budget.in_use == 192
    conn.connection_lost()
    assert batches.budget.in_use == 0 and not batches.known(b"a" * 16)


def test_a_tls_bulk_result_goes_out_in_bounded_writes_and_not_while_an_earlier_one_is_unread() -> None:
    import asyncio

    limiter = pangea.LoginLimiter(0.0, 0.0, 60.0, 60.0, 16)
    batches = pangea.TlsBulkBatches("tok", pangea.MemoryBudget(1 << 30), limiter)
    writes: list[int] = []
    unsent = [0]
    conn = pangea.TlsBulkConnection(
        batches, "h", lambda d: writes.append(len(d)), lambda: None, lambda: None, lambda: unsent[0]
    )
    out = np.arange(3 * pangea.BULK_TLS_WRITE_BYTES // 8 + 1, dtype=">f8")  # big-endian: sent little-endian
    assert asyncio.run(conn.send_result(b"n" * 16, out, out.nbytes))
    assert writes[0] == 5 + 16 + 8 and sum(writes[1:]) == out.nbytes
    assert max(writes[1:]) <= pangea.BULK_TLS_WRITE_BYTES
    writes.clear()
    assert not asyncio.run(conn.send_result(b"n" * 16, out, out.nbytes - 1))  # more than its segment declared
    unsent[0] = 1
    assert not asyncio.run(conn.send_result(b"n" * 16, out, out.nbytes))  # the last one not read yet
    assert writes == []
    unsent[0] = 0
    conn.connection_lost()
    assert not asyncio.run(conn.send_result(b"n" * 16, out, out.nbytes))

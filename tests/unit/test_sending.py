"""Unit tests of how frames leave a channel and how silence is measured.

`SendQueue` (wire framing, pure) orders a channel's frames: a frame whose
sender gives up before its first byte is dropped, one that has started is
finished, so the peer never reads a cut frame. `Channel`'s writer (transports)
runs it over a fake stream on trio's MockClock: a sender cancelled in the
middle of a large frame leaves a byte stream the Decoder reads whole, with
the next message right behind it. `idle_reason` decides "nothing received"
from the last byte read (a long transfer is not silence), and a session keeps
the last byte of a data connection that has ended.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

import pangea
from pangea import (
    NEED_DATA,
    WRITE_CHUNK_BYTES,
    Channel,
    Decoder,
    OutgoingFrame,
    PeerError,
    PingMsg,
    SendQueue,
    TaskRequestMsg,
    encode,
    idle_reason,
    silence_s,
)

# ---------------------------------------------------------------- SendQueue (pure)


def frame(text: bytes = b"x") -> OutgoingFrame:
    return OutgoingFrame([text])


def test_send_queue_gives_frames_in_order_one_at_a_time() -> None:
    queue = SendQueue()
    first, second = frame(b"1"), frame(b"2")
    queue.push(first)
    queue.push(second)
    assert queue.next() is first and first.state == "writing"
    with pytest.raises(AssertionError):
        queue.next()  # the writer finishes one frame before it takes the next
    queue.sent(first)
    assert first.state == "sent" and first.parts == []
    assert queue.next() is second
    queue.sent(second)
    assert queue.next() is None


def test_send_queue_drops_an_abandoned_frame_that_has_not_started() -> None:
    queue = SendQueue()
    first, second, third = frame(b"1"), frame(b"2"), frame(b"3")
    for f in (first, second, third):
        queue.push(f)
    assert queue.abandon(second) is True
    assert second.state == "dropped" and second.parts == [] and queue.dropped == 1
    assert queue.next() is first
    queue.sent(first)
    assert queue.next() is third  # the dropped frame is never written


def test_send_queue_finishes_an_abandoned_frame_that_has_started() -> None:
    queue = SendQueue()
    started = frame(b"big")
    queue.push(started)
    assert queue.next() is started
    assert queue.abandon(started) is False  # not cut: the writer completes it
    assert started.state == "writing" and started.parts == [b"big"]
    assert queue.finished_for_nobody == 1
    queue.sent(started)
    assert started.state == "sent"
    assert queue.abandon(started) is False and queue.finished_for_nobody == 1  # too late to matter


def test_send_queue_close_fails_the_frame_in_progress_and_the_queued_ones_and_refuses_more() -> None:
    queue = SendQueue()
    writing, waiting = frame(b"1"), frame(b"2")
    queue.push(writing)
    queue.push(waiting)
    queue.next()
    error = PeerError("the data connection was closed", kind="disconnected")
    assert queue.close(error) == [writing, waiting]
    assert all(f.state == "failed" and f.error is error for f in (writing, waiting))
    with pytest.raises(PeerError, match="the data connection was closed"):
        queue.push(frame())
    assert queue.close(PeerError("later")) == [] and queue.closed_error is error  # the first reason stands


# ---------------------------------------------------------------- the writer over a fake stream


class SlowStream:
    """A libp2p stream stand-in whose writes take one second each (on the MockClock)."""

    def __init__(self, write_s: float = 1.0) -> None:
        self.written = bytearray()
        self.write_s = write_s

    async def write(self, data: Any) -> None:
        await trio.sleep(self.write_s)
        self.written += bytes(data)

    async def close(self) -> None:
        pass


def decode_all(data: bytes) -> list[Any]:
    decoder = Decoder()
    decoder.feed(data)
    out = []
    while (msg := decoder.next()) is not NEED_DATA:
        out.append(msg)
    assert not decoder.in_frame, "a frame was cut"
    return out


def big_request(task_id: int) -> TaskRequestMsg:
    operand = np.arange(3 * WRITE_CHUNK_BYTES // 8, dtype=np.float64)  # three writes of the frame
    return TaskRequestMsg(task_id, "add", (operand, operand), {})


def run_on_mock_clock(fn: Any) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_sender_cancelled_mid_frame_leaves_the_frame_whole_and_the_next_message_readable() -> None:
    async def main() -> None:
        stream = SlowStream()
        channel = Channel(stream)
        async with trio.open_nursery() as nursery:
            channel.start_writer(nursery)
            with trio.move_on_after(1.5) as gave_up:  # the client's timeout, in the middle of the frame
                await channel.send(big_request(1))
            assert gave_up.cancelled_caught
            assert trio.current_time() == pytest.approx(1.5)  # the sender is not held until the frame ends
            await channel.send(PingMsg(7, 0))
            assert channel.queue.finished_for_nobody == 1
            await channel.close()
        request, ping = decode_all(bytes(stream.written))
        assert isinstance(request, TaskRequestMsg) and request.task_id == 1
        np.testing.assert_array_equal(request.operands[0], big_request(1).operands[0])
        assert ping == PingMsg(7, 0)

    run_on_mock_clock(main)


def test_a_sender_cancelled_before_its_frame_started_is_dropped_from_the_queue() -> None:
    async def main() -> None:
        stream = SlowStream()
        channel = Channel(stream)
        async with trio.open_nursery() as nursery:
            channel.start_writer(nursery)
            nursery.start_soon(channel.send, big_request(1))
            await trio.sleep(0.5)  # task 1 is being written; task 2 waits behind it
            with trio.move_on_after(0.5):
                await channel.send(big_request(2))
            await channel.send(PingMsg(8, 0))
            await channel.close()
        assert channel.queue.dropped == 1
        assert [getattr(m, "task_id", None) for m in decode_all(bytes(stream.written))] == [1, None]

    run_on_mock_clock(main)


def test_a_failed_write_fails_the_frames_behind_it_and_later_sends() -> None:
    class BrokenStream(SlowStream):
        async def write(self, data: Any) -> None:
            from libp2p.network.stream.exceptions import StreamReset

            await trio.sleep(0.1)
            raise StreamReset("reset by peer")

    async def main() -> None:
        channel = Channel(BrokenStream())
        errors: list[str] = []

        async def send(msg: Any) -> None:
            try:
                await channel.send(msg)
            except PeerError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            channel.start_writer(nursery)
            nursery.start_soon(send, PingMsg(1, 0))
            nursery.start_soon(send, PingMsg(2, 0))
        assert errors == ["cannot send to peer: StreamReset: reset by peer"] * 2
        with pytest.raises(PeerError):
            await channel.send(PingMsg(3, 0))

    run_on_mock_clock(main)


# ---------------------------------------------------------------- silence from the last byte


class TrickleStream:
    """A stream that delivers ``data`` in 64 KiB reads, one every ``every_s`` seconds, then nothing."""

    def __init__(self, data: bytes, every_s: float) -> None:
        self.data, self.every_s = data, every_s

    async def read(self, n: int) -> bytes:
        if not self.data:
            await trio.sleep_forever()
        await trio.sleep(self.every_s)
        chunk, self.data = self.data[: 64 << 10], self.data[64 << 10 :]
        return chunk


def test_idle_reason_counts_from_the_last_byte() -> None:
    assert silence_s(100.0, 40.0) == 60.0 and silence_s(10.0, 12.0) == 0.0
    assert idle_reason(100.0, 70.0, 30.0) is None  # exactly the timeout: still alive
    assert idle_reason(100.5, 70.0, 30.0) == "nothing received for 30 s (peer gone or network down)"
    assert idle_reason(741.0, 0.0, 60.0) == "nothing received for 741 s (peer gone or network down)"


def test_a_long_transfer_is_not_silence_and_silence_is_measured_from_its_last_byte() -> None:
    payload = np.zeros(1 << 18, dtype=np.float64)  # 32 reads of 64 KiB, 20 s apart: 640 s for one message
    wire = encode(TaskRequestMsg(1, "add", (payload, payload), {}))
    timeout_s = 30.0

    async def main() -> None:
        channel = Channel(TrickleStream(wire, every_s=20.0), pangea.Limits(max_payload_bytes=8 << 20))
        channel.clock = trio.current_time
        channel.decoder.max_payload_bytes = 8 << 20
        verdicts: list[str | None] = []

        async def watch() -> None:  # what Node._watch decides, every 5 s
            while True:
                await trio.sleep(5.0)
                verdicts.append(idle_reason(trio.current_time(), channel.last_read, timeout_s))
                if verdicts[-1] is not None:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            msg = await channel.receive()
            done_at = trio.current_time()
            assert isinstance(msg, TaskRequestMsg) and trio.current_time() > 600
            assert all(v is None for v in verdicts), verdicts  # never "nothing received" mid-transfer
        # then the peer goes quiet: dropped once timeout_s passed since the last byte, and said so truly
        assert verdicts[-1] == "nothing received for 35 s (peer gone or network down)"
        assert channel.last_read == done_at

    run_on_mock_clock(main)


def test_a_session_keeps_the_last_byte_of_a_data_connection_that_has_ended() -> None:
    """The data connection carried everything (pings included) until it broke at t=700; the
    libp2p stream's own last byte is the handshake at t=0. Silence is 5 s, not 705 s."""
    decoder = SimpleNamespace(discard=lambda: None)
    lost = SimpleNamespace(last_read=700.0, bytes_in=10, bytes_out=20, close_now=lambda: None, decoder=decoder)
    limits = pangea.Limits()
    protocol = pangea.SessionProtocol(
        "12D3KooWnode", "12D3KooWpeer", limits=limits, budget=pangea.MemoryBudget(100), may_serve=lambda: True
    )
    session = SimpleNamespace(
        channel=SimpleNamespace(last_read=0.0),
        data=lost,
        _data_last_read=0.0,
        _data_bytes=[0, 0],
        opened_at=0.0,
        protocol=protocol,
        _perform=lambda actions: None,
        closed=trio.Event(),
        leaving=False,
        label="12D3KooW…peer",
        data_note="TLS 1.3",
    )
    last_read = pangea.PeerSession.last_read.fget  # type: ignore[attr-defined]
    assert last_read(session) == 700.0
    pangea.PeerSession._data_lost(session, lost, "the peer closed the data connection")  # type: ignore[arg-type]
    assert session.data is None and session._data_bytes == [10, 20]
    assert last_read(session) == 700.0
    assert idle_reason(705.0, last_read(session), 60.0) is None


# ---------------------------------------------------------------- a served task's reservation


def test_a_served_task_gives_back_its_slot_before_its_result_is_written() -> None:
    """The peer may send its next task as soon as a result arrives: the slot and operand bytes
    of the task it answers must already be free then, or a peer keeping the limit of tasks in
    flight is refused `busy` while the result frame is still being written."""
    limits = pangea.Limits()
    budget = pangea.MemoryBudget(limits.memory_budget_bytes)
    seen_while_sending: list[dict[int, int]] = []

    async def main() -> None:
        release_send = trio.Event()

        async def send(message: Any) -> None:
            seen_while_sending.append(dict(session._reserved))
            await release_send.wait()

        async def execute_local(
            kernel: str, operands: Any, params: Any, out_nbytes: int | None = None, own_operands: bool = False
        ) -> Any:
            return pangea.run_kernel(kernel, operands, params, out_nbytes=out_nbytes), 0.001

        node = SimpleNamespace(
            limits=limits,
            budget=budget,
            faults=None,
            execute_local=execute_local,
            served=lambda kernel, outcome: None,
            tasks_served=0,
        )
        channel = SimpleNamespace(send=send)
        protocol = pangea.SessionProtocol("node", "peer", limits=limits, budget=budget, may_serve=lambda: True)
        session: Any = SimpleNamespace(
            node=node,
            protocol=protocol,
            label="peer",
            channel=channel,
            data=None,
            closed=trio.Event(),
            _scopes={},
            _reserved=protocol._reserved,  # the protocol's own reservations
            held=pangea.HeldArrays(budget),
        )
        a = np.ones((4, 4))
        assert budget.try_acquire(a.nbytes * 2)
        session._reserved[7] = a.nbytes * 2  # what admit_request held for the operands
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pangea.PeerSession._serve_task, session, TaskRequestMsg(7, "add", (a, a), {}))
            await trio.testing.wait_all_tasks_blocked()
            release_send.set()
        assert session._reserved == {} and budget.in_use == 0

    run_on_mock_clock(main)
    assert seen_while_sending == [{}], seen_while_sending

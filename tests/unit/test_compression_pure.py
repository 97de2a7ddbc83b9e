"""Arrays packed on a slow link: the rule, the frames, the bounds (no sockets).

A packed array travels as one c-blosc frame whose own header is checked against the
array's before its output is allocated; the unpacked sizes are held to the limits of
raw arrays; a peer whose Hello lists no codec is sent raw arrays; a receiver without
the codec refuses a packed one in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import pangea
from pangea import (
    ALLOWED_DTYPES,
    CODEC_BLOSC,
    COMPRESS_MIN_BYTES,
    NEED_DATA,
    Decoder,
    HelloMsg,
    Limits,
    MessageError,
    RemoteProtocolError,
    TaskRequestMsg,
    TaskResultMsg,
    blosc_frame_sizes,
    compression_pays,
    decode_message,
    encode,
    encode_parts,
    pack_blosc,
)

MB = 1e6


def decode_all(frame: bytes, max_payload: int = 1 << 30) -> Any:
    decoder = Decoder(max_payload, limits=Limits(max_payload_bytes=max_payload))
    decoder.feed(frame)
    msg = decoder.next()
    assert msg is not NEED_DATA
    return msg


def packed_frame(msg: Any) -> tuple[bytes, int]:
    """The frame of ``msg`` with every array of COMPRESS_MIN_BYTES or more packed; its payload size."""
    parts = encode_parts(msg, pack_blosc)
    return b"".join(bytes(p) for p in parts), sum(len(p) for p in parts[1:])


@pytest.mark.parametrize(
    ("link_mb_s", "ratio", "pays"),
    [
        (12.5, 4.0, True),  # 100 Mbit/s, a compressible array: pack
        (125.0, 4.0, True),  # 1 Gbit/s: still pays
        (2000.0, 4.0, False),  # loopback: packing takes longer than the bytes on the link
        (12.5, 1.0, False),  # random floats: nothing to gain
        (12.5, 1.05, False),
        (0.0, 4.0, False),  # the link's speed not measured yet
    ],
)
def test_packing_only_pays_on_a_slow_link_for_an_array_that_compresses(
    link_mb_s: float, ratio: float, pays: bool
) -> None:
    assert compression_pays(256 << 20, ratio, 3000 * MB, 2000 * MB, link_mb_s * MB) is pays


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_every_dtype_round_trips_packed_and_raw(dtype: str) -> None:
    rng = np.random.default_rng(1)
    n = COMPRESS_MIN_BYTES // np.dtype(dtype).itemsize + 3
    a = (rng.integers(0, 50, n) + (1j * rng.integers(0, 5, n) if dtype.startswith("complex") else 0)).astype(dtype)
    small = np.arange(6, dtype=dtype).reshape(2, 3)
    msg = TaskResultMsg(9, outputs=(a.reshape(-1, 1), small))
    frame, payload = packed_frame(msg)
    assert payload < a.nbytes // 2 + small.nbytes  # the large one went packed, the small one raw
    got = decode_all(frame)
    np.testing.assert_array_equal(got.outputs[0], a.reshape(-1, 1))
    np.testing.assert_array_equal(got.outputs[1], small)
    assert got.outputs[0].dtype == np.dtype(dtype) and got.outputs[0].flags.writeable
    raw = decode_all(encode(msg))  # and without a packer, as before
    np.testing.assert_array_equal(raw.outputs[0], a.reshape(-1, 1))


def test_operands_round_trip_packed_next_to_held_ones() -> None:
    a = np.zeros((1024, 256))
    b = np.arange(12.0).reshape(3, 4)
    msg = TaskRequestMsg(3, "add", (a, b, b), held=(0, 0, 7))
    got = decode_all(packed_frame(msg)[0])
    np.testing.assert_array_equal(got.operands[0], a)
    np.testing.assert_array_equal(got.operands[1], b)
    assert got.held == (0, 0, 7)


def swap_blosc_frame(frame: bytes, new: bytes) -> bytes:
    """``frame`` (one packed array, alone in its payload) with its payload replaced by ``new``."""
    header_len, payload_len = pangea.FRAME_PREFIX.unpack_from(frame)
    prefix = pangea.FRAME_PREFIX.size
    return frame[:prefix] + frame[prefix : prefix + header_len] + new + frame[prefix + header_len + payload_len :]


def test_a_frame_that_unpacks_to_more_than_its_header_says_is_refused_before_any_allocation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = np.zeros(COMPRESS_MIN_BYTES // 8)
    frame, _ = packed_frame(TaskResultMsg(5, outputs=(a,)))
    bomb = pack_blosc(np.zeros(COMPRESS_MIN_BYTES // 4))  # unpacks to twice the array's bytes
    assert blosc_frame_sizes(bomb)[0] == 2 * a.nbytes
    stored = blosc_frame_sizes(pack_blosc(a))[1]
    bomb = (bomb + b"\0" * stored)[:stored]  # in as many bytes as the header says are stored
    allocated: list[int] = []
    real_empty = np.empty

    def spy(n: Any, *args: Any, **kw: Any) -> Any:
        allocated.append(int(np.prod(n)))
        return real_empty(n, *args, **kw)

    monkeypatch.setattr(np, "empty", spy)
    with pytest.raises(MessageError) as refused:
        decode_all(swap_blosc_frame(frame, bomb))
    assert "frame declares" in str(refused.value) and str(a.nbytes) in str(refused.value)
    assert not any(n >= a.nbytes for n in allocated[1:]), allocated  # only the payload buffer itself


def test_a_frame_whose_arrays_unpack_beyond_the_payload_limit_is_refused_from_its_header() -> None:
    a = np.zeros((2048, 1024))  # 16 MiB, packed to a few KiB
    frame, payload = packed_frame(TaskResultMsg(5, outputs=(a,)))
    decoder = Decoder(1 << 20, limits=Limits(max_payload_bytes=1 << 20))
    decoder.feed(frame[: pangea.FRAME_PREFIX.size + pangea.FRAME_PREFIX.unpack_from(frame)[0]])  # the header alone
    with pytest.raises(RemoteProtocolError) as refused:
        decoder.next()
    assert "unpacks to" in str(refused.value) and payload < 1 << 20


def test_a_receiver_without_the_codec_refuses_a_packed_array_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    frame, _ = packed_frame(TaskResultMsg(5, outputs=(np.zeros(COMPRESS_MIN_BYTES // 8),)))
    monkeypatch.setattr(pangea, "codecs_available", lambda: ())
    with pytest.raises(MessageError) as refused:
        decode_all(frame)
    assert f"packed with {CODEC_BLOSC!r}, which this node does not unpack" in str(refused.value)


def test_a_hello_lists_the_codecs_and_an_older_hello_lists_none() -> None:
    hello = HelloMsg("0.1.0", pangea.PROTOCOL_VERSION, ("add",), "serve", codecs=(CODEC_BLOSC,))
    assert decode_all(encode(hello)).codecs == (CODEC_BLOSC,)
    older = HelloMsg("0.1.0", pangea.PROTOCOL_VERSION, ("add",), "serve")  # no codecs field set: as before
    assert decode_all(encode(older)).codecs == ()
    assert pangea.codecs_available() == (CODEC_BLOSC,)


def test_a_channel_packs_only_for_a_measured_slow_link_and_a_compressible_array() -> None:
    channel = pangea.Channel.__new__(pangea.Channel)  # its packing state alone, no stream
    channel.link_bytes_s, channel.packed_arrays, channel.packed_saved_bytes = 0.0, 0, 0
    channel.packs, channel.pack_speeds = True, (2e9, 2e9)  # the peer's Hello lists the codec
    smooth = np.zeros((1024, 512))
    assert channel.pack(smooth) is None  # not measured yet: raw
    channel._note_rate(64 << 20, 64 / 12.5)  # a 64 MiB frame at 100 Mbit/s
    assert 12e6 < channel.link_bytes_s < 14e6
    packed = channel.pack(smooth)
    assert packed is not None and len(packed) < smooth.nbytes // 50 and channel.packed_arrays == 1
    assert channel.pack(np.random.default_rng(0).standard_normal((1024, 512))) is None  # random floats: raw
    channel.link_bytes_s = 3e9  # loopback: not even sampled
    assert not channel.may_pack() and channel.pack(smooth) is None
    channel.link_bytes_s, channel.packs = 12.5e6, False  # a peer whose Hello lists no codec: never
    assert not channel.may_pack() and channel.pack(smooth) is None


def test_decode_message_of_a_raw_frame_is_unchanged() -> None:
    msg = TaskResultMsg(1, outputs=(np.arange(4.0),))
    frame = encode(msg)
    header_len, payload_len = pangea.FRAME_PREFIX.unpack_from(frame)
    start = pangea.FRAME_PREFIX.size
    got = decode_message(frame[start : start + header_len], bytearray(frame[start + header_len :]))
    np.testing.assert_array_equal(got.outputs[0], msg.outputs[0])  # type: ignore[union-attr]


class WireStream:
    """A libp2p stream stand-in that reads out ``data`` in 64 KiB pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        chunk, self.data = self.data[: min(n, 64 << 10)], self.data[min(n, 64 << 10) :]
        return chunk


def test_a_channel_unpacks_a_large_packed_frame_in_a_worker_thread_and_a_small_one_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import trio

    large = np.arange(pangea.UNPACK_IN_THREAD_BYTES // 4, dtype=np.int32) % 100  # unpacks to 4 MiB: a thread
    small = np.zeros(COMPRESS_MIN_BYTES // 8)  # 1 MiB: inline, a thread's hop would cost more than it
    wire = b"".join(packed_frame(TaskResultMsg(i, outputs=(a,)))[0] for i, a in ((1, large), (2, small)))
    threads: list[bool] = []
    real = pangea.unpack_blosc

    def spy(frame: Any, out: Any) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        real(frame, out)

    monkeypatch.setattr(pangea, "unpack_blosc", spy)

    async def main() -> list[Any]:
        channel = pangea.Channel(WireStream(wire), Limits(max_payload_bytes=64 << 20))
        channel.decoder.max_payload_bytes = 64 << 20
        return [await channel.receive(), await channel.receive()]

    first, second = trio.run(main)
    assert threads == [False, True]  # the large one off the event loop's thread, the small one on it
    np.testing.assert_array_equal(first.outputs[0], large)
    np.testing.assert_array_equal(second.outputs[0], small)
    assert (first.task_id, second.task_id) == (1, 2)

"""Unit tests of pangea.py's wire framing (sans-I/O).

Frames are ``!IQ(header_len, payload_len) + header + payload``; the header is a
Cap'n Proto ``Message`` (capnp/pangea.capnp). These tests pin the bytes of a
small frame, round-trip every message type and array kind, feed streams in
every chunking, and check that bad frames are refused the way the Decoder
docstring promises: framing errors break the decoder for good, content errors
(MessageError) cost one frame only.
"""

from __future__ import annotations

import random
import struct
import typing
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pangea
from pangea import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    FRAME_PREFIX,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    NEED_DATA,
    ByeMsg,
    Decoder,
    ErrorMsg,
    HelloMsg,
    LocalProtocolError,
    MessageError,
    PingMsg,
    PongMsg,
    ProtocolError,
    RemoteProtocolError,
    TaskRequestMsg,
    TaskResultMsg,
    encode,
    encode_parts,
    frame_size,
    load_schema,
)

MESSAGE_TYPES = typing.get_args(pangea.Message)

# ---------------------------------------------------------------- helpers


def drain(decoder: Decoder) -> list[Any]:
    """Return every message the decoder can produce now (until NEED_DATA)."""
    out: list[Any] = []
    while True:
        msg = decoder.next()
        if msg is NEED_DATA:
            return out
        out.append(msg)


def feed_in_chunks(decoder: Decoder, data: bytes, sizes: Sequence[int]) -> list[Any]:
    """Feed ``data`` cut into pieces of ``sizes`` (cycled), draining after each piece."""
    out: list[Any] = []
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + n])
        pos += n
        i += 1
        out += drain(decoder)
    return out


def raw_frame(header: bytes, payload: bytes = b"", payload_len: int | None = None) -> bytes:
    """Build a frame by hand, optionally announcing a payload length that differs from the bytes."""
    n = len(payload) if payload_len is None else payload_len
    return struct.pack("!IQ", len(header), n) + header + payload


def metas_header(which: str, task_id: int, metas: Sequence[tuple[str, Sequence[int], int]]) -> bytes:
    """Serialize a taskRequest/taskResult header with arbitrary (dtype, shape, nbytes) metas."""
    m = load_schema().Message.new_message()
    body = m.init(which)
    body.taskId = task_id
    if which == "taskRequest":
        body.kernel = "add"
        slots = body.init("operands", len(metas))
    else:
        slots = body.init("outputs", len(metas))
    for slot, (dtype, shape, nbytes) in zip(slots, metas, strict=True):
        slot.dtype = dtype
        slot.shape = list(shape)
        slot.nbytes = nbytes
    return bytes(m.to_bytes())


def ping_header(nonce: int = 1) -> bytes:
    m = load_schema().Message.new_message()
    m.init("ping").nonce = nonce
    return bytes(m.to_bytes())


def assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype.name == np.asarray(want).dtype.name
    assert got.dtype.byteorder in ("=", "<", "|")
    assert got.shape == np.asarray(want).shape
    np.testing.assert_array_equal(got, want)


def assert_same_request(got: Any, want: TaskRequestMsg) -> None:
    assert isinstance(got, TaskRequestMsg)
    assert (got.task_id, got.kernel, got.params) == (want.task_id, want.kernel, want.params)
    assert len(got.operands) == len(want.operands)
    for g, w in zip(got.operands, want.operands, strict=True):
        assert_same_array(g, w)


def assert_same_result(got: Any, want: TaskResultMsg) -> None:
    assert isinstance(got, TaskResultMsg)
    assert (got.task_id, got.error_kind, got.error_message, got.compute_s) == (
        want.task_id,
        want.error_kind,
        want.error_message,
        want.compute_s,
    )
    assert len(got.outputs) == len(want.outputs)
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert_same_array(g, w)


def round_trip(msg: Any) -> Any:
    decoder = Decoder()
    decoder.feed(encode(msg))
    got = decoder.next()
    assert decoder.next() is NEED_DATA
    assert decoder.buffered_bytes == 0
    assert not decoder.in_frame
    return got


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "i":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


HELLO = HelloMsg(
    pangea_version="0.1.0",
    protocol_version=1,
    kernels=("matmul", "add", "solve"),
    role="initiator",
    cores=16,
    blas_threads=8,
    gflops=123.5,
    max_payload_bytes=1 << 31,
    platform="cpython-311 x86_64 Linux",
    host_id=bytes(range(16)),
    home_id="12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y",
    home_proof=b"\x01" * 64,
)


# ---------------------------------------------------------------- golden bytes

# PingMsg(7): the 12-byte prefix (48-byte header, no payload), then the header:
# Cap'n Proto segment table (1 segment of 5 words), root struct pointer
# (1 data word, 1 pointer), Message data word (union tag 3 = ping), pointer
# to the Ping struct (2 data words), Ping data words (nonce 7, load 0).
PING_7_GOLDEN_HEX = (
    "000000300000000000000000000000000500000000000000010001000300000000000000000000000200000007000000"
    "000000000000000000000000"
)


def _capnp_ping_like_header(tag: int, nonce: int, load: int | None = 0) -> bytes:
    """Build the header of a Ping/Pong message by hand from the Cap'n Proto encoding rules.

    load=None builds the first protocol revision's Ping/Pong (nonce only, 1 data word)."""
    words = 1 if load is None else 2
    segment_table = struct.pack("<II", 0, 3 + words)  # segment count - 1, words in segment 0
    root_pointer = struct.pack("<IHH", 0, 1, 1)  # struct pointer, offset 0, 1 data word, 1 pointer
    message_data = struct.pack("<H6x", tag)  # union discriminant
    body_pointer = struct.pack("<IHH", 0, words, 0)  # struct pointer, offset 0, data words, 0 pointers
    body_data = struct.pack("<Q", nonce) if load is None else struct.pack("<QI4x", nonce, load)
    return segment_table + root_pointer + message_data + body_pointer + body_data


def test_encode_ping_matches_golden_bytes() -> None:
    assert encode(PingMsg(7)).hex() == PING_7_GOLDEN_HEX


def test_encode_ping_matches_hand_built_frame() -> None:
    header = _capnp_ping_like_header(3, 7)
    frame = encode(PingMsg(7))
    assert frame[:12] == struct.pack("!IQ", len(header), 0) == bytes.fromhex("00000030" + "00" * 8)
    assert frame == struct.pack("!IQ", len(header), 0) + header
    assert FRAME_PREFIX.size == 12


def test_encode_ping_header_decodes_with_the_schema() -> None:
    frame = encode(PingMsg(0xDEADBEEF))
    header_len, payload_len = struct.unpack("!IQ", frame[:12])
    assert (header_len, payload_len) == (len(frame) - 12, 0)
    with load_schema().Message.from_bytes(frame[12:]) as m:
        assert m.which() == "ping"
        assert m.ping.nonce == 0xDEADBEEF


@pytest.mark.parametrize(
    ("msg", "tag"),
    [(PingMsg(7), 3), (PongMsg(7), 4)],
)
def test_encode_union_tags_are_pinned(msg: Any, tag: int) -> None:
    # The union order of `Message` is part of the protocol: reordering it is an
    # incompatible change that needs a PROTOCOL_VERSION bump.
    assert encode(msg) == struct.pack("!IQ", 48, 0) + _capnp_ping_like_header(tag, 7)


def test_decode_hand_built_pong_frame() -> None:
    decoder = Decoder()
    decoder.feed(raw_frame(_capnp_ping_like_header(4, 2**64 - 1, load=3)))
    assert decoder.next() == PongMsg(2**64 - 1, 3)


def test_decode_pong_of_the_first_revision_without_load() -> None:
    # Cap'n Proto structs grow compatibly: a Pong without the load field reads as load 0.
    decoder = Decoder()
    decoder.feed(raw_frame(_capnp_ping_like_header(4, 5, load=None)))
    assert decoder.next() == PongMsg(5, 0)


def test_encode_task_request_frame_layout() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    b = np.array([1, 2], dtype=np.int32)
    frame = encode(TaskRequestMsg(9, "add", (a, b), {"factor": 2.0}))
    header_len, payload_len = struct.unpack("!IQ", frame[:12])
    assert payload_len == a.nbytes + b.nbytes == 56
    assert len(frame) == 12 + header_len + payload_len
    assert header_len % 8 == 0
    # The payload is the raw little-endian bytes of each array in order.
    assert frame[12 + header_len :] == a.astype("<f8").tobytes() + b.astype("<i4").tobytes()
    with load_schema().Message.from_bytes(frame[12 : 12 + header_len]) as m:
        r = m.taskRequest
        assert (r.taskId, r.kernel) == (9, "add")
        assert [(o.dtype, list(o.shape), o.nbytes) for o in r.operands] == [
            ("float64", [2, 3], 48),
            ("int32", [2], 8),
        ]
        assert [(p.name, p.value) for p in r.params] == [("factor", 2.0)]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "msg",
    [
        HELLO,
        HelloMsg("0.1.0", 1, (), "responder"),
        PingMsg(0),
        PingMsg(2**64 - 1),
        PongMsg(12345),
        ByeMsg(),
        ByeMsg("interrupted"),
        ErrorMsg("incompatible", "protocol 2 ≠ 1: ünïcödé"),
        ErrorMsg("", ""),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_simple_messages(msg: Any) -> None:
    assert round_trip(msg) == msg


def test_round_trip_hello_keeps_every_field() -> None:
    got = round_trip(HELLO)
    assert isinstance(got, HelloMsg)
    assert dataclass_fields(got) == dataclass_fields(HELLO)
    assert isinstance(got.kernels, tuple)


def dataclass_fields(obj: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (3, 4), (2, 3, 4), (1,) * MAX_NDIM])
def test_round_trip_task_request_arrays(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((dtype, shape)).encode()))
    a = random_array(rng, dtype, shape)
    b = random_array(rng, dtype, (2, 2))
    msg = TaskRequestMsg(2**63 + 5, "add", (a, b), {"factor": -0.5, "seed": 3.0})
    assert_same_request(round_trip(msg), msg)


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_round_trip_task_result_arrays(dtype: str) -> None:
    rng = np.random.default_rng(7)
    outputs = (
        random_array(rng, dtype, (5, 3)),
        random_array(rng, dtype, ()),
        random_array(rng, dtype, (0, 4)),
    )
    msg = TaskResultMsg(41, outputs, compute_s=0.125)
    got = round_trip(msg)
    assert_same_result(got, msg)
    assert got.ok


def test_round_trip_task_result_error() -> None:
    msg = TaskResultMsg(3, (), "bad-input", "matmul: shapes (2, 3) and (2, 3) do not match", 0.0)
    got = round_trip(msg)
    assert_same_result(got, msg)
    assert not got.ok


def test_round_trip_task_request_without_operands_or_params() -> None:
    msg = TaskRequestMsg(1, "random", (), {})
    assert_same_request(round_trip(msg), msg)


def test_round_trip_special_float_values() -> None:
    a = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1.7976931348623157e308])
    c = np.array([complex(np.nan, np.inf)], dtype=np.complex64)
    got = round_trip(TaskRequestMsg(1, "add", (a, c), {"factor": float("inf")}))
    np.testing.assert_array_equal(got.operands[0], a)
    assert np.signbit(got.operands[0][3])
    np.testing.assert_array_equal(got.operands[1], c)
    assert got.params == {"factor": float("inf")}


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1, 1:3],
        lambda a: a[1],
        lambda a: np.broadcast_to(a[:1], (4, 6)),
        lambda a: a[2, 3],  # a 0-d view
    ],
    ids=["strided", "transposed", "fortran", "reversed", "row", "broadcast", "scalar-view"],
)
def test_round_trip_non_contiguous_arrays(make: Any) -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    view = make(base)
    got = round_trip(TaskRequestMsg(1, "transpose", (view,)))
    assert_same_array(got.operands[0], np.array(view))
    assert got.operands[0].flags.c_contiguous


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4", ">i8", ">c8", ">c16"])
def test_round_trip_big_endian_arrays_arrive_little_endian(dtype: str) -> None:
    a = np.arange(-5, 7).reshape(3, 4).astype(dtype)
    got = round_trip(TaskRequestMsg(1, "transpose", (a,))).operands[0]
    assert got.dtype == np.dtype(dtype).newbyteorder("<")
    assert got.dtype.name == a.dtype.name
    np.testing.assert_array_equal(got, a)


def test_encode_big_endian_array_payload_is_little_endian() -> None:
    a = np.array([1, 2], dtype=">i4")
    frame = encode(TaskRequestMsg(1, "transpose", (a,)))
    assert frame.endswith(b"\x01\x00\x00\x00\x02\x00\x00\x00")


def test_encode_equals_joined_encode_parts_and_frame_size() -> None:
    a = np.ones((3, 3))
    msg = TaskRequestMsg(4, "matmul", (a, a[:, ::-1]))
    parts = encode_parts(msg)
    assert b"".join(bytes(p) for p in parts) == encode(msg)
    assert frame_size(msg) == len(encode(msg))
    assert len(parts) == 3  # prefix+header, then one piece per array


def test_encode_parts_does_not_copy_contiguous_arrays() -> None:
    a = np.arange(1000, dtype=np.float64)
    parts = encode_parts(TaskResultMsg(1, (a,)))
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), a)


def test_decoded_arrays_are_writable() -> None:
    got = round_trip(TaskRequestMsg(1, "scale", (np.zeros(3),)))
    got.operands[0][0] = 1.0  # a kernel may work in place
    assert got.operands[0][0] == 1.0


@pytest.mark.parametrize(
    "array",
    [
        np.array([True, False]),
        np.array(["a"], dtype=object),
        np.zeros(2, dtype=np.float16),
        np.zeros(2, dtype=np.uint8),
        np.array(["ab"]),
        np.zeros(1, dtype=[("x", "<f8")]),
    ],
    ids=["bool", "object", "float16", "uint8", "str", "void"],
)
def test_encode_rejects_disallowed_dtype_with_local_protocol_error(array: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError, match="cannot be sent"):
        encode(TaskRequestMsg(1, "add", (array,)))
    with pytest.raises(LocalProtocolError):
        encode(TaskResultMsg(1, (array,)))


def test_encode_rejects_unknown_message_type() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode str"):
        encode("ping")  # type: ignore[arg-type]


def test_encode_rejects_header_over_the_limit() -> None:
    huge = ErrorMsg("protocol", "x" * (MAX_HEADER_BYTES + 1))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode(huge)


def test_encode_rejects_too_many_dimensions_with_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(TaskRequestMsg(1, "add", (np.zeros((1,) * (MAX_NDIM + 1)),)))


@pytest.mark.parametrize("msg", [PingMsg(-1), PingMsg(2**64), TaskRequestMsg(-1, "add")], ids=["neg", "big", "task"])
def test_encode_rejects_out_of_range_integers_with_local_protocol_error(msg: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode(msg)


# ---------------------------------------------------------------- streams


def stream_messages() -> list[Any]:
    rng = np.random.default_rng(0)
    return [
        HELLO,
        PingMsg(1),
        TaskRequestMsg(
            1,
            "matmul",
            (rng.standard_normal((4, 5)), rng.standard_normal((5, 2)).astype(np.float32)),
        ),
        PongMsg(1),
        TaskResultMsg(1, (rng.standard_normal((4, 2)), np.array(3, dtype=np.int64)), compute_s=0.5),
        TaskResultMsg(2, (), "busy", "try later"),
        TaskRequestMsg(2, "random", (), {"rows": 3.0, "cols": 0.0}),
        ErrorMsg("protocol", "x"),
        ByeMsg("done"),
    ]


def assert_same_messages(got: list[Any], want: list[Any]) -> None:
    assert [type(m) for m in got] == [type(m) for m in want]
    for g, w in zip(got, want, strict=True):
        if isinstance(w, TaskRequestMsg):
            assert_same_request(g, w)
        elif isinstance(w, TaskResultMsg):
            assert_same_result(g, w)
        else:
            assert g == w


def test_decoder_stream_fed_at_once() -> None:
    want = stream_messages()
    decoder = Decoder()
    decoder.feed(b"".join(encode(m) for m in want))
    assert_same_messages(drain(decoder), want)
    assert decoder.buffered_bytes == 0


def test_decoder_stream_fed_one_byte_at_a_time() -> None:
    want = stream_messages()
    data = b"".join(encode(m) for m in want)
    decoder = Decoder()
    got: list[Any] = []
    boundaries = set()
    pos = 0
    for m in want:
        pos += len(encode(m))
        boundaries.add(pos)
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        new = drain(decoder)
        # A message completes exactly at its last byte, never earlier or later.
        assert len(new) == (1 if i + 1 in boundaries else 0)
        assert decoder.in_frame == (i + 1 not in boundaries)
        got += new
    assert_same_messages(got, want)
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("seed", range(25))
def test_decoder_stream_fed_in_random_chunks(seed: int) -> None:
    want = stream_messages()
    data = b"".join(encode(m) for m in want)
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 7, 11, 12, 13, 40, 64, 100, 333, 4096]) for _ in range(64)]
    got = feed_in_chunks(Decoder(), data, sizes)
    assert_same_messages(got, want)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decoder_accepts_bytes_like_chunks(kind: type) -> None:
    data = encode(PingMsg(5)) + encode(ByeMsg())
    decoder = Decoder()
    for i in range(0, len(data), 5):
        decoder.feed(kind(data[i : i + 5]))
    assert drain(decoder) == [PingMsg(5), ByeMsg()]


def test_decoder_accepts_non_byte_memoryview() -> None:
    data = encode(PingMsg(9))
    words = memoryview(bytearray(data)).cast("I")  # a 4-byte item format, as array.array would give
    decoder = Decoder()
    decoder.feed(words)
    assert drain(decoder) == [PingMsg(9)]


def test_decoder_empty_is_need_data_and_empty_feed_is_harmless() -> None:
    decoder = Decoder()
    assert decoder.next() is NEED_DATA
    decoder.feed(b"")
    assert decoder.next() is NEED_DATA
    assert decoder.buffered_bytes == 0
    assert not decoder.in_frame


def test_decoder_in_frame_tracks_partial_frames() -> None:
    frame = encode(PingMsg(1))
    decoder = Decoder()
    decoder.feed(frame[:5])
    assert decoder.in_frame and decoder.next() is NEED_DATA
    decoder.feed(frame[5:20])
    assert decoder.in_frame and decoder.next() is NEED_DATA
    decoder.feed(frame[20:])
    assert decoder.next() == PingMsg(1)
    assert not decoder.in_frame


def test_decoder_feed_copies_mutable_buffers() -> None:
    buffer = bytearray(encode(ErrorMsg("protocol", "hello")))
    decoder = Decoder()
    decoder.feed(buffer)
    buffer[-8:-3] = b"XXXXX"  # the receive buffer is reused for the next read
    buffer.clear()
    assert decoder.next() == ErrorMsg("protocol", "hello")


# ---------------------------------------------------------------- broken framing


def assert_stays_broken(decoder: Decoder, first: RemoteProtocolError) -> None:
    decoder.feed(encode(PingMsg(1)))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next()
        assert again.value is first


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"\xff" * 12,
        b"\x00" * 12,  # header length 0
        b"/multistream/1.0.0\n",
    ],
    ids=["http", "ones", "zeros", "multistream"],
)
def test_decoder_garbage_prefix_raises_and_stays_broken(garbage: bytes) -> None:
    decoder = Decoder()
    decoder.feed(garbage)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next()
    assert not isinstance(info.value, MessageError)
    assert_stays_broken(decoder, info.value)


def test_decoder_rejects_zero_header_length_from_prefix_alone() -> None:
    decoder = Decoder()
    decoder.feed(struct.pack("!IQ", 0, 0))
    with pytest.raises(RemoteProtocolError, match=r"frame header of 0 bytes is outside 1\.\."):
        decoder.next()


def test_decoder_rejects_header_over_limit_from_prefix_alone() -> None:
    decoder = Decoder()
    decoder.feed(struct.pack("!IQ", MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(RemoteProtocolError, match=f"frame header of {MAX_HEADER_BYTES + 1} bytes"):
        decoder.next()
    assert decoder.buffered_bytes == 0


def test_decoder_custom_header_limit() -> None:
    decoder = Decoder(max_header_bytes=32)
    decoder.feed(encode(PingMsg(1)))  # a 40-byte header
    with pytest.raises(RemoteProtocolError, match="outside 1..32"):
        decoder.next()


@pytest.mark.parametrize(
    ("limit", "announced"),
    [
        (1024, 1025),
        (1 << 20, 1 << 40),
        (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_BYTES + 1),
        (0, 1),
        (DEFAULT_MAX_PAYLOAD_BYTES, 2**64 - 1),
    ],
)
def test_decoder_rejects_payload_over_limit_before_buffering(limit: int, announced: int) -> None:
    decoder = Decoder(max_payload_bytes=limit)
    decoder.feed(struct.pack("!IQ", 40, announced))  # the prefix only: nothing else has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds the limit") as info:
        decoder.next()
    assert decoder.buffered_bytes == 0
    assert pangea.format_bytes(announced) in str(info.value)


def test_decoder_waits_for_header_without_allocating_announced_payload() -> None:
    decoder = Decoder()
    decoder.feed(struct.pack("!IQ", 40, DEFAULT_MAX_PAYLOAD_BYTES))  # at the limit: allowed
    decoder.feed(b"\x00" * 8)
    assert decoder.next() is NEED_DATA
    assert decoder.buffered_bytes == 8  # the partial header only, no 2 GiB payload buffer


def test_decoder_accepts_payload_exactly_at_limit() -> None:
    a = np.arange(4, dtype=np.float64)  # 32 bytes
    decoder = Decoder(max_payload_bytes=32)
    decoder.feed(encode(TaskResultMsg(1, (a,))))
    msg = decoder.next()
    assert isinstance(msg, TaskResultMsg)
    assert_same_array(msg.outputs[0], a)


def test_decoder_rejects_payload_carrying_ping() -> None:
    decoder = Decoder()
    decoder.feed(raw_frame(ping_header(), b"\x00" * 8))
    with pytest.raises(RemoteProtocolError, match="ping message carries no payload") as info:
        decoder.next()
    assert not isinstance(info.value, MessageError)
    assert_stays_broken(decoder, info.value)


@pytest.mark.parametrize(
    "header",
    [
        b"\x00" * 5,
        b"\xff" * 16,
        b"\x00\x00\x00\x00\x10\x00\x00\x00" + b"\x00" * 8,
        bytes(range(24)),
    ],
    ids=["unaligned", "ones", "short-segment", "counting"],
)
def test_decoder_rejects_malformed_header(header: bytes) -> None:
    decoder = Decoder()
    decoder.feed(raw_frame(header))
    with pytest.raises(RemoteProtocolError, match="malformed message header") as info:
        decoder.next()
    assert_stays_broken(decoder, info.value)


def test_decoder_broken_holds_no_bytes() -> None:
    decoder = Decoder()
    decoder.feed(b"\xff" * 12 + b"x" * 100)
    with pytest.raises(RemoteProtocolError):
        decoder.next()
    decoder.feed(b"y" * 1000)
    assert decoder.buffered_bytes == 0


# ---------------------------------------------------------------- bad contents (MessageError)


@pytest.mark.parametrize(
    ("metas", "payload", "problem"),
    [
        ([("bool", [2], 2)], b"\x00\x01", "dtype 'bool' is not allowed"),
        ([("object", [1], 8)], b"\x00" * 8, "dtype 'object' is not allowed"),
        ([("float16", [2], 4)], b"\x00" * 4, "dtype 'float16' is not allowed"),
        ([(">f8", [1], 8)], b"\x00" * 8, "dtype '>f8' is not allowed"),
        ([("", [1], 8)], b"\x00" * 8, "dtype '' is not allowed"),
        (
            [("float64", [1] * (MAX_NDIM + 1), 8)],
            b"\x00" * 8,
            f"{MAX_NDIM + 1} dimensions, at most {MAX_NDIM}",
        ),
        ([("float64", [2, 2], 24)], b"\x00" * 24, "needs 32 bytes, header says 24"),
        ([("int32", [3], 16)], b"\x00" * 16, "needs 12 bytes, header says 16"),
        ([("float64", [2], 16)], b"\x00" * 24, "payload has 24 bytes, the arrays describe 16"),
        (
            [("float64", [2], 16), ("float64", [2], 16)],
            b"\x00" * 24,
            "array 1: runs past the end of the payload",
        ),
        ([("float64", [4], 32)], b"\x00" * 8, "array 0: runs past the end"),
        ([], b"\x00" * 8, "payload has 8 bytes, the arrays describe 0"),
    ],
)
@pytest.mark.parametrize("which", ["taskRequest", "taskResult"])
def test_decoder_bad_array_metadata_is_message_error_and_decoding_continues(
    which: str, metas: list[tuple[str, list[int], int]], payload: bytes, problem: str
) -> None:
    decoder = Decoder()
    decoder.feed(raw_frame(metas_header(which, 77, metas), payload) + encode(PingMsg(2)) + encode(ByeMsg()))
    with pytest.raises(MessageError) as info:
        decoder.next()
    assert problem in str(info.value)
    assert info.value.task_id == 77
    assert isinstance(info.value, RemoteProtocolError)  # callers that only know the parent still catch it
    assert drain(decoder) == [PingMsg(2), ByeMsg()]
    assert decoder.buffered_bytes == 0


def test_decoder_message_error_split_across_feeds_then_continues() -> None:
    bad = raw_frame(metas_header("taskRequest", 5, [("bool", [3], 3)]), b"\x01\x00\x01")
    data = bad + encode(PongMsg(3))
    decoder = Decoder()
    errors, got = 0, []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while True:
            try:
                msg = decoder.next()
            except MessageError as exc:
                assert exc.task_id == 5
                errors += 1
                continue
            if msg is NEED_DATA:
                break
            got.append(msg)
    assert (errors, got) == (1, [PongMsg(3)])


def test_decoder_unrepresentable_shape_is_message_error() -> None:
    decoder = Decoder()
    decoder.feed(raw_frame(metas_header("taskRequest", 8, [("float64", [0, 2**64 - 1], 0)])) + encode(PingMsg(1)))
    with pytest.raises(MessageError) as info:
        decoder.next()
    assert info.value.task_id == 8
    assert drain(decoder) == [PingMsg(1)]


# ---------------------------------------------------------------- property: messages or errors only


def _valid_frames() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [
        encode(PingMsg(1)),
        encode(ByeMsg()),
        encode(ErrorMsg("refused", "no")),
        encode(HelloMsg("0.1.0", 1, ("add",), "serve")),
        encode(TaskRequestMsg(1, "add", (rng.standard_normal((2, 3)), np.arange(4, dtype=np.int32)), {"f": 1.0})),
        encode(TaskResultMsg(2, (np.arange(3, dtype=np.complex64),))),
    ]


VALID_FRAMES = _valid_frames()


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(st.sampled_from(VALID_FRAMES), min_size=1, max_size=4))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def _decode_everything(data: bytes, sizes: list[int]) -> list[Any]:
    """Feed data in chunks; return messages and protocol errors, stopping at a broken stream."""
    decoder = Decoder(max_payload_bytes=256, max_header_bytes=4096)
    events: list[Any] = []
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
        while True:
            try:
                msg = decoder.next()
            except MessageError as exc:
                events.append(exc)
                continue
            except RemoteProtocolError as exc:
                with pytest.raises(RemoteProtocolError):
                    decoder.next()
                events.append(exc)
                return events
            if msg is NEED_DATA:
                break
            assert isinstance(msg, MESSAGE_TYPES)
            events.append(msg)
        assert decoder.buffered_bytes <= len(data) + 256
    return events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.binary(max_size=300), mutated_stream()),
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
def test_decoder_property_yields_only_messages_need_data_or_protocol_errors(data: bytes, sizes: list[int]) -> None:
    events = _decode_everything(data, sizes)
    for event in events:
        assert isinstance(event, (*MESSAGE_TYPES, ProtocolError))


@settings(max_examples=100, deadline=None)
@given(
    frames=st.lists(st.sampled_from(VALID_FRAMES), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 80), min_size=1, max_size=8),
)
def test_decoder_property_valid_streams_decode_in_any_chunking(frames: list[bytes], sizes: list[int]) -> None:
    events = _decode_everything(b"".join(frames), sizes)
    assert [encode(m) for m in events] == frames


# ---------------------------------------------------------------- BufferPool (reused receive buffers)


def test_buffer_pool_reuses_a_buffer_only_once_nothing_refers_to_it() -> None:
    pool = pangea.BufferPool(min_bytes=1024, max_buffers=2, idle_s=60)
    first = pool.take(4096)
    first[:] = 7
    held = pool.take(4096)
    assert not np.shares_memory(first, held)  # first is still in use
    address = first.__array_interface__["data"][0]
    del first
    again = pool.take(4000)
    assert pool.reused == 1 and again.nbytes == 4000 and again.__array_interface__["data"][0] == address
    assert again.flags.writeable


def test_buffer_pool_keeps_small_payloads_out_and_bounds_what_it_holds() -> None:
    pool = pangea.BufferPool(min_bytes=1024, max_buffers=2, idle_s=60)
    small = pool.take(100)
    del small
    assert pool.take(100) is not None and pool.reused == 0
    kept = [pool.take(2048) for _ in range(5)]  # all in use: five fresh buffers, the pool keeps two
    assert len(pool._buffers) == 2 and len(kept) == 5
    assert pool.take(100_000) is not None and pool.reused == 0  # no free buffer of a fitting size


def test_buffer_pool_drops_buffers_idle_too_long() -> None:
    pool = pangea.BufferPool(min_bytes=1024, max_buffers=2, idle_s=0.0)
    pool.take(2048)
    pool.trim()
    assert pool._buffers == []

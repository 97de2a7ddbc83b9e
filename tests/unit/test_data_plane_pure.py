"""Unit tests of the pure parts of the TLS data plane (issue 6).

No sockets: the option parsers and pure helpers (``parse_data_port``,
``data_port_for``, ``multiaddr_ip``, ``format_host_port``, ``parse_fault`` for
the ``data-via`` test aid), the Hello fields that announce a data plane, the
DataPlane message, and the Decoder's zero-copy API that `TlsChannel` uses:
``payload_space()`` hands out the part of the current payload buffer the next
bytes belong in, ``payload_written(n)`` counts what was written there. Writing
a payload that way must give the same message as feeding every byte.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import pangea
from pangea import (
    DATA_PORT_OFFSET,
    DATA_TOKEN_BYTES,
    FRAME_PREFIX,
    NEED_DATA,
    DataPlaneMsg,
    Decoder,
    Fault,
    HelloMsg,
    MessageError,
    PingMsg,
    Refusal,
    RemoteProtocolError,
    TaskRequestMsg,
    TaskResultMsg,
    UsageError,
    data_port_for,
    encode,
    encode_parts,
    format_host_port,
    multiaddr_ip,
    parse_data_port,
    parse_fault,
)

# ---------------------------------------------------------------- helpers


def drain(decoder: Decoder) -> list[Any]:
    """Every message the decoder can produce now (until NEED_DATA)."""
    out: list[Any] = []
    while (msg := decoder.next()) is not NEED_DATA:
        out.append(msg)
    return out


def head_and_payload(msg: Any) -> tuple[bytes, bytes]:
    """The frame of ``msg`` split into prefix+header and payload bytes."""
    parts = encode_parts(msg)
    return bytes(parts[0]), b"".join(bytes(p) for p in parts[1:])


def fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def request(task_id: int = 3, n: int = 64) -> TaskRequestMsg:
    rng = np.random.default_rng(task_id)
    return TaskRequestMsg(task_id, "add", (rng.standard_normal((n, 8)), rng.standard_normal((n, 8))), {"x": 1.5})


def assert_same_request(got: Any, want: TaskRequestMsg) -> None:
    assert isinstance(got, TaskRequestMsg)
    assert (got.task_id, got.kernel, got.params) == (want.task_id, want.kernel, want.params)
    assert len(got.operands) == len(want.operands)
    for g, w in zip(got.operands, want.operands, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------- --data-port


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("off", None),
        ("OFF", None),
        (" off ", None),
        ("auto", -1),
        ("Auto", -1),
        ("0", 0),
        ("1", 1),
        ("7778", 7778),
        ("65535", 65535),
        (" 9000 ", 9000),
    ],
)
def test_parse_data_port_accepts_ports_auto_and_off(text: str, want: int | None) -> None:
    assert parse_data_port(text) == want


@pytest.mark.parametrize("text", ["", " ", "65536", "99999", "-1", "-0", "1.5", "0x10", "auto1", "none", "on"])
def test_parse_data_port_refuses_anything_else_naming_the_expected_form(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_data_port(text)
    message = str(caught.value)
    assert "--data-port" in message and repr(text) in message, message
    assert "0-65535" in message and "auto" in message and "off" in message, message


@pytest.mark.parametrize(
    ("spec", "libp2p_port", "want"),
    [
        (None, 7777, None),  # off stays off
        (None, 0, None),
        (-1, 7777, 7777 + DATA_PORT_OFFSET),  # auto: the libp2p port + 1
        (-1, 40000, 40001),
        (-1, 0, 0),  # auto with --port 0: any free port
        (-1, 65535, 0),  # no port + 1 above 65535: any free port
        (0, 7777, 0),  # explicit "any"
        (5000, 7777, 5000),  # explicit port, whatever the libp2p port
        (7777, 7777, 7777),
    ],
)
def test_data_port_for_resolves_auto_and_keeps_explicit_ports(
    spec: int | None, libp2p_port: int, want: int | None
) -> None:
    assert data_port_for(spec, libp2p_port) == want


def test_data_port_option_defaults_to_auto_and_parses_off_on_every_node_command() -> None:
    parser = pangea.make_parser()
    for command in (["initiate"], ["respond", "/ip4/127.0.0.1/tcp/1/p2p/x"], ["serve"]):
        assert parser.parse_args(command).data_port == -1
        assert parser.parse_args([*command, "--data-port", "off"]).data_port is None
        assert parser.parse_args([*command, "--data-port", "7001"]).data_port == 7001
        with pytest.raises(UsageError):
            parser.parse_args([*command, "--data-port", "70000"])


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("/ip4/127.0.0.1/tcp/7777", "127.0.0.1"),
        ("/ip4/10.1.2.3/tcp/7777/p2p/12D3KooWabc", "10.1.2.3"),
        ("/ip6/::1/tcp/7777", "::1"),
        ("/ip6/fe80::1/tcp/1/p2p/x", "fe80::1"),
        ("/dns4/example.com/tcp/7777", None),
        ("/ip4/", None),
        ("/ip4", None),
        ("", None),
        ("?", None),
        ("127.0.0.1:7777", None),
    ],
)
def test_multiaddr_ip_takes_the_ip_of_ip4_and_ip6_multiaddrs_only(text: str, want: str | None) -> None:
    assert multiaddr_ip(text) == want


@pytest.mark.parametrize(
    ("host", "port", "want"),
    [
        ("127.0.0.1", 7778, "127.0.0.1:7778"),
        ("10.0.0.2", 0, "10.0.0.2:0"),
        ("::1", 7778, "[::1]:7778"),
        ("fe80::1", 1, "[fe80::1]:1"),
        ("example.com", 80, "example.com:80"),
    ],
)
def test_format_host_port_brackets_ipv6_hosts(host: str, port: int, want: str) -> None:
    assert format_host_port(host, port) == want


# ---------------------------------------------------------------- --fault data-via


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("data-via=127.0.0.1:9000", "127.0.0.1", 9000),
        ("data-via=localhost:1", "localhost", 1),
        ("data-via=[::1]:9000", "::1", 9000),
        ("data-via=10.231.4.1:65535", "10.231.4.1", 65535),
    ],
)
def test_parse_fault_data_via_gives_host_and_port(text: str, host: str, port: int) -> None:
    fault = parse_fault(text)
    assert fault == Fault("data-via", float(port), host)
    assert (fault.text, int(fault.value)) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["data-via", "data-via=", "data-via=127.0.0.1", "data-via=127.0.0.1:", "data-via=:9000", "data-via=h:x"],
)
def test_parse_fault_data_via_without_host_and_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_fault(text)
    assert "data-via=HOST:PORT" in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["data-via=127.0.0.1:65536", "data-via=127.0.0.1:99999999", "data-via=127.0.0.1:0"])
def test_parse_fault_data_via_refuses_a_port_out_of_range(text: str) -> None:
    """Checked at once (it was accepted, and `respond` then died in the dial with an OverflowError traceback)."""
    with pytest.raises(UsageError):
        parse_fault(text)


def test_parse_fault_other_kinds_still_parse() -> None:
    assert parse_fault("corrupt") == Fault("corrupt")
    assert parse_fault("crash-after=2") == Fault("crash-after", 2.0)
    assert parse_fault("slow=0.5") == Fault("slow", 0.5)


def test_parse_fault_corrupt_n_lies_only_in_the_first_n_results() -> None:
    assert parse_fault("corrupt=2") == Fault("corrupt", 2.0)
    for bad in ("corrupt=0", "corrupt=-1", "corrupt=x", "corrupt=1.5"):
        with pytest.raises(UsageError, match="corrupt=N"):
            parse_fault(bad)


# ---------------------------------------------------------------- Hello and DataPlane messages


def round_trip(msg: Any) -> Any:
    decoder = Decoder()
    for part in encode_parts(msg):
        decoder.feed(bytes(part))
    (got,) = drain(decoder)
    assert decoder.buffered_bytes == 0 and not decoder.in_frame
    return got


def test_hello_round_trip_keeps_the_data_plane_fields() -> None:
    hello = HelloMsg(
        pangea_version="0.1.0",
        protocol_version=pangea.PROTOCOL_VERSION,
        kernels=("add", "matmul"),
        role="serve",
        data_port=7778,
        data_cert=bytes(range(32)),
        data_token=bytes(range(100, 100 + DATA_TOKEN_BYTES)),
    )
    got = round_trip(hello)
    assert isinstance(got, HelloMsg)
    assert fields(got) == fields(hello)
    assert (got.data_port, got.data_cert, got.data_token) == (7778, bytes(range(32)), hello.data_token)


def test_hello_without_a_data_plane_decodes_with_empty_fields() -> None:
    hello = HelloMsg("0.1.0", pangea.PROTOCOL_VERSION, ("add",), "responder")
    got = round_trip(hello)
    assert (got.data_port, got.data_cert, got.data_token) == (0, b"", b"")


def test_hello_data_port_keeps_the_full_port_range() -> None:
    for port in (1, 65535):
        assert round_trip(HelloMsg("0.1.0", 2, (), "serve", data_port=port)).data_port == port


@pytest.mark.parametrize(
    "msg",
    [
        DataPlaneMsg(True),
        DataPlaneMsg(True, ""),
        DataPlaneMsg(False, "no answer from 10.0.0.1:7778 within 3 s (a firewall dropping the data port?)"),
        DataPlaneMsg(False, "ünïcödé reason"),
    ],
)
def test_data_plane_message_round_trips_through_encode_parts_and_the_decoder(msg: DataPlaneMsg) -> None:
    parts = encode_parts(msg)
    assert len(parts) == 1  # no payload
    assert round_trip(msg) == msg


def test_data_plane_message_fed_one_byte_at_a_time() -> None:
    msg = DataPlaneMsg(False, "this node's data plane is off (--data-port off)")
    frame = encode(msg) + encode(PingMsg(9))
    decoder = Decoder()
    got: list[Any] = []
    for i in range(len(frame)):
        decoder.feed(frame[i : i + 1])
        got += drain(decoder)
    assert got == [msg, PingMsg(9)]


def test_data_plane_message_with_a_payload_breaks_the_decoder() -> None:
    frame = encode(DataPlaneMsg(True))
    header_len, _ = FRAME_PREFIX.unpack(frame[: FRAME_PREFIX.size])
    forged = FRAME_PREFIX.pack(header_len, 8) + frame[FRAME_PREFIX.size :] + b"\0" * 8
    decoder = Decoder()
    decoder.feed(forged)
    with pytest.raises(RemoteProtocolError, match="dataPlane"):
        decoder.next()


# ---------------------------------------------------------------- Decoder zero-copy API


def test_payload_space_is_none_between_frames_and_for_frames_without_payload() -> None:
    decoder = Decoder()
    assert decoder.payload_space() is None  # nothing yet
    decoder.feed(encode(PingMsg(1)))
    assert decoder.payload_space() is None  # bytes buffered
    assert drain(decoder) == [PingMsg(1)]
    assert decoder.payload_space() is None  # between frames


def test_payload_written_straight_into_the_buffer_gives_the_same_message_as_feeding() -> None:
    msg = request()
    head, payload = head_and_payload(msg)
    fed = Decoder()
    fed.feed(head + payload)
    (want,) = drain(fed)

    decoder = Decoder()
    decoder.feed(head)
    assert decoder.next() is NEED_DATA  # the header is in: the payload buffer exists
    space = decoder.payload_space()
    assert space is not None and len(space) == len(payload)
    space[:] = payload
    decoder.payload_written(len(payload))
    assert decoder.payload_space() is None  # complete
    (got,) = drain(decoder)
    assert_same_request(got, msg)
    assert_same_request(got, want)
    assert decoder.buffered_bytes == 0 and not decoder.in_frame


def test_payload_written_in_pieces_moves_the_space_along() -> None:
    msg = request(n=100)
    head, payload = head_and_payload(msg)
    decoder = Decoder()
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    pos = 0
    for size in (1, 7, 1000, 3, len(payload)):
        space = decoder.payload_space()
        assert space is not None and len(space) == len(payload) - pos
        n = min(size, len(space))
        space[:n] = payload[pos : pos + n]
        decoder.payload_written(n)
        pos += n
        if pos < len(payload):
            assert decoder.next() is NEED_DATA
    assert pos == len(payload)
    (got,) = drain(decoder)
    assert_same_request(got, msg)


def test_payload_space_is_the_buffer_the_decoded_arrays_live_in() -> None:
    msg = TaskRequestMsg(5, "scale", (np.arange(32.0),), {"factor": 2.0})
    head, payload = head_and_payload(msg)
    decoder = Decoder()
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    space = decoder.payload_space()
    assert space is not None
    space[:] = payload
    decoder.payload_written(len(payload))
    (got,) = drain(decoder)
    assert np.shares_memory(np.frombuffer(space, dtype=np.uint8), got.operands[0])  # no copy after the write


def test_payload_space_mixes_with_fed_bytes() -> None:
    """Some payload bytes come through feed (they arrived with the header), the rest straight into the buffer."""
    msg = request(n=50)
    head, payload = head_and_payload(msg)
    decoder = Decoder()
    decoder.feed(head + payload[:100])
    assert decoder.next() is NEED_DATA  # the 100 bytes are now in the buffer
    space = decoder.payload_space()
    assert space is not None and len(space) == len(payload) - 100
    space[:] = payload[100:]
    decoder.payload_written(len(space))
    (got,) = drain(decoder)
    assert_same_request(got, msg)


def test_payload_space_is_none_while_chunks_are_buffered() -> None:
    msg = request()
    head, payload = head_and_payload(msg)
    decoder = Decoder()
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    assert decoder.payload_space() is not None
    decoder.feed(payload[:10])  # fed, not yet consumed by next(): the space would skip them
    assert decoder.payload_space() is None
    assert decoder.next() is NEED_DATA
    space = decoder.payload_space()
    assert space is not None and len(space) == len(payload) - 10
    space[:] = payload[10:]
    decoder.payload_written(len(space))
    (got,) = drain(decoder)
    assert_same_request(got, msg)


def test_payload_space_is_none_while_a_refused_payload_is_skipped() -> None:
    msg = request(task_id=11)
    head, payload = head_and_payload(msg)
    asked: list[tuple[int, int]] = []

    class Gate:
        def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
            asked.append((task_id, payload_len))
            return Refusal("busy", "too much in flight")

        def awaits_result(self, task_id: int) -> bool:
            return True

    decoder = Decoder(gate=Gate())
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    assert asked == [(11, len(payload))]
    assert decoder.payload_space() is None  # skipped bytes must go through feed, which keeps none
    decoder.feed(payload)
    with pytest.raises(MessageError) as caught:
        decoder.next()
    assert (caught.value.task_id, caught.value.kind) == (11, "busy")
    decoder.feed(encode(PingMsg(4)))
    assert drain(decoder) == [PingMsg(4)]  # the stream goes on


def test_payload_space_is_none_for_an_unsolicited_result_being_skipped() -> None:
    result = TaskResultMsg(8, (np.ones(16),))
    head, payload = head_and_payload(result)

    class Gate:
        def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
            return None

        def awaits_result(self, task_id: int) -> bool:
            return False

    decoder = Decoder(gate=Gate())
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    assert decoder.payload_space() is None
    decoder.feed(payload)
    with pytest.raises(MessageError) as caught:
        decoder.next()
    assert caught.value.kind == "unsolicited"


def test_payload_space_is_none_once_the_decoder_is_broken() -> None:
    decoder = Decoder(max_payload_bytes=16)
    head, _ = head_and_payload(request())
    decoder.feed(head)
    with pytest.raises(RemoteProtocolError):
        decoder.next()
    assert decoder.payload_space() is None


def test_payload_space_after_discard_is_none() -> None:
    head, _ = head_and_payload(request())
    decoder = Decoder()
    decoder.feed(head)
    assert decoder.next() is NEED_DATA
    assert decoder.payload_space() is not None
    decoder.discard()
    assert decoder.payload_space() is None


def test_payload_space_two_frames_in_a_row() -> None:
    first, second = request(1), request(2, n=7)
    decoder = Decoder()
    got = []
    for msg in (first, second):
        head, payload = head_and_payload(msg)
        decoder.feed(head)
        assert decoder.next() is NEED_DATA
        space = decoder.payload_space()
        assert space is not None
        space[:] = payload
        decoder.payload_written(len(payload))
        got += drain(decoder)
        assert decoder.payload_space() is None
    assert_same_request(got[0], first)
    assert_same_request(got[1], second)


# ---------------------------------------------------------------- handshakes strangers cannot hog


def test_the_dialer_retries_a_data_connection_closed_on_the_way_twice_while_the_acceptor_waits() -> None:
    unreachable = pangea.ErrorKind.UNREACHABLE
    assert pangea.retry_data_connect(unreachable, 0, 0.01)
    assert pangea.retry_data_connect(unreachable, 1, 0.6)
    assert not pangea.retry_data_connect(unreachable, pangea.DATA_RETRIES, 1.2)  # two retries, no more
    late = pangea.DATA_SETTLE_S - pangea.DATA_CONNECT_S  # a try begun now would end after the acceptor gave up
    assert not pangea.retry_data_connect(unreachable, 0, late)
    for kind in (pangea.ErrorKind.TIMEOUT, pangea.ErrorKind.REFUSED):  # a firewall, a wrong token or certificate
        assert not pangea.retry_data_connect(kind, 0, 0.0)


@pytest.mark.parametrize(
    ("host", "plain"),
    [("127.0.0.1", "127.0.0.1"), ("::ffff:10.0.0.7", "10.0.0.7"), ("[FE80::1]", "fe80::1"), ("::1", "::1")],
)
def test_plain_ip_names_an_address_as_a_socket_and_a_multiaddr_both_do(host: str, plain: str) -> None:
    assert pangea.plain_ip(host) == plain

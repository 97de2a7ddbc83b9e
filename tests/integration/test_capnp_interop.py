"""capnp/pangea.capnp against the reference Cap'n Proto implementation.

pangea's schema is meant for any language with a Cap'n Proto implementation,
so the bytes pangea writes and reads must be exactly what the reference C++
tool (`capnp`, Debian package capnproto) writes and reads:

* `capnp compile -o-` accepts the schema;
* a wire `Message` written in Cap'n Proto text and encoded by `capnp encode`,
  framed with pangea's 12-byte prefix and followed by the raw array bytes,
  is decoded by `pangea.Decoder` into the right message;
* the header of a frame from `pangea.encode` is decoded by `capnp decode`
  into text naming the fields and their values;
* an RPC `TaskSpec` encoded by `capnp encode` is read by pycapnp and
  `pangea.array_from_capnp`, and an `Array` built by `pangea.array_to_capnp`
  is decoded by `capnp decode`.

Skipped, with the reason, only when the `capnp` binary is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pangea
from pangea import (
    FRAME_PREFIX,
    NEED_DATA,
    Decoder,
    ErrorMsg,
    HelloMsg,
    PingMsg,
    TaskRequestMsg,
    TaskResultMsg,
    array_from_capnp,
    array_to_capnp,
    encode,
    load_schema,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = REPO_ROOT / "capnp" / "pangea.capnp"
CAPNP = shutil.which("capnp")

pytestmark = pytest.mark.skipif(CAPNP is None, reason="no `capnp` binary (apt-get install capnproto)")


def capnp_tool(*args: str, stdin: bytes = b"") -> bytes:
    """Run the reference `capnp` tool from the repo root; return stdout, fail with its stderr."""
    assert CAPNP is not None
    result = subprocess.run([CAPNP, *args], input=stdin, capture_output=True, timeout=60, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, f"capnp {' '.join(args)} failed:\n{result.stderr.decode(errors='replace')}"
    return result.stdout


def capnp_encode(type_name: str, text: str) -> bytes:
    """Encode Cap'n Proto text as `type_name` (standard, unpacked serialization with segment table)."""
    return capnp_tool("encode", "capnp/pangea.capnp", type_name, stdin=text.encode())


def capnp_decode(type_name: str, data: bytes) -> str:
    """Decode a serialized `type_name` to Cap'n Proto text, on one line."""
    return capnp_tool("decode", "--short", "capnp/pangea.capnp", type_name, stdin=data).decode()


def hex_data(data: bytes) -> str:
    """A Data literal in Cap'n Proto text (capnp 0.9 reads an empty one only as "")."""
    return f'0x"{data.hex()}"' if data else '""'


def frame(header: bytes, *arrays: np.ndarray) -> bytes:
    """pangea's wire frame: !IQ prefix, header, then the raw bytes of the arrays."""
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return FRAME_PREFIX.pack(len(header), len(payload)) + header + payload


def decode_one(data: bytes) -> object:
    """Feed a whole frame to a fresh Decoder; return its one message (and check nothing is left)."""
    decoder = Decoder()
    decoder.feed(data)
    msg = decoder.next()
    assert decoder.next() is NEED_DATA
    return msg


def header_of(data: bytes) -> tuple[bytes, int]:
    """Split a pangea frame: (Cap'n Proto header, payload length)."""
    header_len, payload_len = FRAME_PREFIX.unpack(data[: FRAME_PREFIX.size])
    assert len(data) == FRAME_PREFIX.size + header_len + payload_len
    return data[FRAME_PREFIX.size : FRAME_PREFIX.size + header_len], payload_len


# ---------------------------------------------------------------- the schema itself


def test_capnp_compiles_the_schema() -> None:
    request = capnp_tool("compile", "-o-", "capnp/pangea.capnp")
    assert len(request) > 1000  # a CodeGeneratorRequest with every node of the schema


def test_schema_file_id_has_the_top_bit_set() -> None:
    found = re.search(r"^@0x([0-9a-f]{16});", SCHEMA.read_text(), flags=re.M)
    assert found, "no file id line"
    assert int(found.group(1), 16) >> 63 == 1


def test_pyz_and_tests_load_the_same_schema_file() -> None:
    assert pangea.schema_path().read_bytes() == SCHEMA.read_bytes()


# ---------------------------------------------------------------- capnp encode -> pangea.Decoder


def test_decoder_reads_a_task_request_encoded_by_capnp() -> None:
    header = capnp_encode(
        "Message",
        '(taskRequest = (taskId = 7, kernel = "matmul", '
        'operands = [(dtype = "float64", shape = [2, 2], nbytes = 32), '
        '(dtype = "float64", shape = [2, 2], nbytes = 32)], params = []))',
    )
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.5, -1.0], [2.0, 1e300]])
    msg = decode_one(frame(header, a, b))
    assert isinstance(msg, TaskRequestMsg)
    assert (msg.task_id, msg.kernel, msg.params) == (7, "matmul", {})
    assert len(msg.operands) == 2
    for got, want in zip(msg.operands, (a, b), strict=True):
        assert got.dtype == np.float64 and got.shape == (2, 2)
        np.testing.assert_array_equal(got, want)


def test_decoder_reads_params_and_mixed_dtypes_encoded_by_capnp() -> None:
    header = capnp_encode(
        "Message",
        '(taskRequest = (taskId = 18446744073709551615, kernel = "scale", '
        'operands = [(dtype = "int32", shape = [3], nbytes = 12), (dtype = "complex64", shape = [1, 2], nbytes = 16), '
        '(dtype = "float32", shape = [], nbytes = 4)], '
        'params = [(name = "factor", value = -2.5), (name = "seed", value = 42)]))',
    )
    ops = (np.array([1, -2, 3], dtype="<i4"), np.array([[1 + 2j, -3j]], dtype="<c8"), np.array(0.25, dtype="<f4"))
    msg = decode_one(frame(header, *ops))
    assert isinstance(msg, TaskRequestMsg)
    assert msg.task_id == 2**64 - 1
    assert msg.params == {"factor": -2.5, "seed": 42.0}
    for got, want in zip(msg.operands, ops, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_decoder_reads_a_task_result_and_an_error_result_encoded_by_capnp() -> None:
    header = capnp_encode(
        "Message",
        '(taskResult = (taskId = 3, outputs = [(dtype = "float64", shape = [2], nbytes = 16)], '
        'errorKind = "", errorMessage = "", computeSeconds = 0.125))',
    )
    out = np.array([np.pi, -0.0])
    msg = decode_one(frame(header, out))
    assert isinstance(msg, TaskResultMsg)
    assert msg.ok and msg.task_id == 3 and msg.compute_s == 0.125
    np.testing.assert_array_equal(msg.outputs[0], out)

    header = capnp_encode(
        "Message", '(taskResult = (taskId = 4, errorKind = "bad-input", errorMessage = "matmul: shapes differ"))'
    )
    msg = decode_one(frame(header))
    assert isinstance(msg, TaskResultMsg)
    assert not msg.ok and msg.outputs == ()
    assert (msg.error_kind, msg.error_message) == ("bad-input", "matmul: shapes differ")


def test_decoder_reads_hello_ping_and_error_encoded_by_capnp() -> None:
    header = capnp_encode(
        "Message",
        '(hello = (pangeaVersion = "9.8.7", protocolVersion = 1, kernels = ["matmul", "add"], role = "serve", '
        "capacity = (cores = 8, blasThreads = 4, gflops = 12.5), maxPayloadBytes = 1048576, "
        'platform = "cpython-311 x86_64 Linux"))',
    )
    hello = decode_one(frame(header))
    assert isinstance(hello, HelloMsg)
    assert (hello.pangea_version, hello.protocol_version, hello.role) == ("9.8.7", 1, "serve")
    assert hello.kernels == ("matmul", "add")
    assert (hello.cores, hello.blas_threads, hello.gflops) == (8, 4, 12.5)
    assert hello.max_payload_bytes == 1 << 20
    assert hello.platform == "cpython-311 x86_64 Linux"

    ping = decode_one(frame(capnp_encode("Message", "(ping = (nonce = 99))")))
    assert ping == PingMsg(99)
    error = decode_one(frame(capnp_encode("Message", '(error = (kind = "refused", message = "not trusted"))')))
    assert error == ErrorMsg("refused", "not trusted")


def test_decoder_refuses_a_capnp_encoded_request_whose_payload_does_not_match() -> None:
    header = capnp_encode(
        "Message",
        '(taskRequest = (taskId = 5, kernel = "sum", operands = [(dtype = "float64", shape = [2, 2], nbytes = 32)]))',
    )
    decoder = Decoder()
    decoder.feed(frame(header, np.zeros(3)))  # 24 bytes where the header says 32
    with pytest.raises(pangea.MessageError):
        decoder.next()


# ---------------------------------------------------------------- pangea.encode -> capnp decode


def test_capnp_decodes_the_header_of_a_pangea_task_request() -> None:
    a = np.arange(4, dtype=np.float64).reshape(2, 2)
    b = np.ones((2, 3), dtype=np.int32)
    data = encode(TaskRequestMsg(task_id=7, kernel="matmul", operands=(a, b), params={"factor": 2.5}))
    header, payload_len = header_of(data)
    assert payload_len == a.nbytes + b.nbytes
    assert data[-payload_len:] == a.tobytes() + b.tobytes()
    text = capnp_decode("Message", header)
    assert text.startswith("(taskRequest = (")
    for needle in (
        "taskId = 7",
        'kernel = "matmul"',
        # held 0: the bytes follow; no codec (the default "", not printed) and stored 0: as they are
        '(dtype = "float64", shape = [2, 2], nbytes = 32, held = 0, stored = 0)',
        '(dtype = "int32", shape = [2, 3], nbytes = 24, held = 0, stored = 0)',
        '(name = "factor", value = 2.5, kind = 0)',  # kind 0: a number
    ):
        assert needle in text, f"{needle!r} not in {text!r}"


def test_capnp_decodes_a_packed_operand_and_the_codecs_of_a_hello() -> None:
    a = np.zeros(pangea.COMPRESS_MIN_BYTES // 8)
    frame = b"".join(bytes(p) for p in pangea.encode_parts(TaskRequestMsg(8, "sum", (a,)), pangea.pack_blosc))
    header, payload_len = header_of(frame)
    text = capnp_decode("Message", header)
    assert f'nbytes = {a.nbytes}, held = 0, codec = "blosc-lz4", stored = {payload_len})' in text, text
    hello = HelloMsg(pangea_version="0.1.0", protocol_version=1, kernels=("sum",), role="serve", codecs=("blosc-lz4",))
    assert 'codecs = ["blosc-lz4"]' in capnp_decode("Message", header_of(encode(hello))[0])


def test_capnp_decodes_pangea_hello_result_and_error_headers() -> None:
    hello = HelloMsg(pangea_version="0.1.0", protocol_version=1, kernels=("matmul", "sum"), role="serve", cores=2)
    text = capnp_decode("Message", header_of(encode(hello))[0])
    for needle in ('pangeaVersion = "0.1.0"', "protocolVersion = 1", 'kernels = ["matmul", "sum"]', 'role = "serve"'):
        assert needle in text, f"{needle!r} not in {text!r}"
    assert "cores = 2" in text

    result = TaskResultMsg(task_id=9, error_kind="bad-input", error_message="unknown kernel x; known: add, sum")
    text = capnp_decode("Message", header_of(encode(result))[0])
    assert "taskResult = (" in text and "taskId = 9" in text
    assert 'errorKind = "bad-input"' in text and 'errorMessage = "unknown kernel x; known: add, sum"' in text

    text = capnp_decode("Message", header_of(encode(ErrorMsg("incompatible", "protocol 2 != 1")))[0])
    assert text.strip() == '(error = (kind = "incompatible", message = "protocol 2 != 1"))'


def test_a_capnp_encoded_header_survives_a_pangea_decode_encode_round_trip() -> None:
    text = (
        '(taskRequest = (taskId = 12, kernel = "add", operands = ['
        '(dtype = "int64", shape = [3], nbytes = 24), (dtype = "int64", shape = [3], nbytes = 24)], params = []))'
    )
    ops = (np.array([1, 2, 3]), np.array([10, 20, 30]))
    msg = decode_one(frame(capnp_encode("Message", text), *ops))
    again = capnp_decode("Message", header_of(encode(msg))[0])  # type: ignore[arg-type]
    assert again.strip() == capnp_decode("Message", capnp_encode("Message", text)).strip()


# ---------------------------------------------------------------- RPC structs


def test_pycapnp_reads_a_task_spec_encoded_by_capnp() -> None:
    a = np.array([[1.5, -2.0, 3.25], [4.0, 5.0, 1e-300]])
    raw = a.tobytes()
    chunks = ", ".join(hex_data(piece) for piece in (raw[:12], raw[12:13], b"", raw[13:]))  # cuts inside values
    text = (
        '(kernel = "scale", operands = [(dtype = "float64", shape = [2, 3], '
        f"chunks = [{chunks}])], "
        'params = [(name = "factor", value = 2)], placement = "remote", timeoutSeconds = 30)'
    )
    data = capnp_encode("TaskSpec", text)
    with load_schema().TaskSpec.from_bytes(data) as spec:
        assert str(spec.kernel) == "scale"
        assert str(spec.placement) == "remote"
        assert spec.timeoutSeconds == 30.0
        assert [(str(p.name), p.value) for p in spec.params] == [("factor", 2.0)]
        assert len(spec.operands) == 1
        got = array_from_capnp(spec.operands[0])
    assert got.dtype == np.float64 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, a)


def test_pycapnp_refuses_a_capnp_encoded_array_with_too_few_bytes_as_bad_input() -> None:
    text = f'(kernel = "sum", operands = [(dtype = "float64", shape = [4], chunks = [{hex_data(bytes(24))}])])'
    with load_schema().TaskSpec.from_bytes(capnp_encode("TaskSpec", text)) as spec:
        with pytest.raises(pangea.TaskError) as info:
            array_from_capnp(spec.operands[0], 0)
    assert info.value.kind == "bad-input"


def test_capnp_decodes_an_array_built_by_pangea(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pangea, "RPC_CHUNK_BYTES", 8)
    builder = load_schema().Array.new_message()
    array_to_capnp(builder, np.array([1, 2], dtype=np.int32).reshape(1, 2).repeat(2, axis=0))
    text = capnp_decode("Array", bytes(builder.to_bytes()))
    assert 'dtype = "int32"' in text and "shape = [2, 2]" in text
    # four little-endian int32 (1, 2, 1, 2), in two chunks of 8 bytes
    assert r'chunks = ["\001\000\000\000\002\000\000\000", "\001\000\000\000\002\000\000\000"]' in text


def test_capnp_round_trips_a_task_output_and_node_status_by_text() -> None:
    output = (
        '(outputs = [(dtype = "float64", shape = [1], chunks = [0x"000000000000f03f"])], errorKind = "", '
        'ranOn = "12D3KooWAbc", attempts = [(worker = "local", outcome = "busy: try later"), '
        '(worker = "12D3KooWAbc", outcome = "ok")], timings = (queueSeconds = 0.5, totalSeconds = 2))'
    )
    with load_schema().TaskOutput.from_bytes(capnp_encode("TaskOutput", output)) as r:
        np.testing.assert_array_equal(array_from_capnp(r.outputs[0]), [1.0])
        assert str(r.ranOn) == "12D3KooWAbc"
        assert [(str(a.worker), str(a.outcome)) for a in r.attempts] == [
            ("local", "busy: try later"),
            ("12D3KooWAbc", "ok"),
        ]
        assert (r.timings.queueSeconds, r.timings.totalSeconds) == (0.5, 2.0)

    status = load_schema().NodeStatus.new_message(peerId="12D3KooWXyz", tasksDone=5, peerCount=1, rpcAddress="h:1")
    text = capnp_decode("NodeStatus", bytes(status.to_bytes()))
    for needle in ('peerId = "12D3KooWXyz"', "tasksDone = 5", 'rpcAddress = "h:1"', "peerCount = 1"):
        assert needle in text, f"{needle!r} not in {text!r}"

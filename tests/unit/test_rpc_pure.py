"""Unit tests of the pure parts of pangea.py's RPC service and client.

No sockets and no event loop: address parsing (`parse_host_port`,
`is_loopback_host`), the cast the Client suggests for a refused dtype
(`cast_suggestion`, `refused_dtype_message`), its timings with the client-node
hop (`client_timings`), the readable text of a pycapnp remote exception
(`remote_error_text`), the RPC `Array` conversion in both directions
(`array_to_capnp` / `array_from_capnp`, including chunking of the bytes into
several `Data` fields), and reading the RPC token (`read_rpc_token`, `read_call_token`:
a token file other users can read is refused, a token on the command line warns). The
service, server and client themselves are tested against real `serve`
processes in tests/integration/test_rpc.py and test_serve.py.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pytest

import pangea
from pangea import (
    ALLOWED_DTYPES,
    MAX_NDIM,
    MIN_TOKEN_CHARS,
    ConfigError,
    LocalProtocolError,
    TaskError,
    UsageError,
    array_from_capnp,
    array_to_capnp,
    cast_suggestion,
    client_timings,
    is_loopback_host,
    load_schema,
    parse_host_port,
    read_rpc_token,
    refused_dtype_message,
    remote_error_text,
    rpc_words,
)

# ---------------------------------------------------------------- helpers


def to_capnp_bytes(a: np.ndarray) -> bytes:
    """Serialize `a` as an RPC `Array` message, as a client or the server does."""
    builder = load_schema().Array.new_message()
    array_to_capnp(builder, a)
    return bytes(builder.to_bytes())


def from_capnp_bytes(data: bytes, index: int = 0) -> np.ndarray:
    """Read an RPC `Array` message back into numpy, as the other side does."""
    with load_schema().Array.from_bytes(data, traversal_limit_in_words=len(data) // 8 + 64) as reader:
        return array_from_capnp(reader, index)


def chunk_sizes(data: bytes) -> list[int]:
    with load_schema().Array.from_bytes(data, traversal_limit_in_words=len(data) // 8 + 64) as reader:
        return [len(c) for c in reader.chunks]


def raw_array(dtype: str, shape: list[int], chunks: list[bytes]) -> bytes:
    """An `Array` message with arbitrary (possibly inconsistent) fields, as a hostile client sends it."""
    builder = load_schema().Array.new_message()
    builder.dtype = dtype
    builder.shape = shape
    slots = builder.init("chunks", len(chunks))
    for i, chunk in enumerate(chunks):
        slots[i] = chunk
    return bytes(builder.to_bytes())


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dtype.startswith("complex"):
        flat = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    elif dtype.startswith("int"):
        flat = rng.integers(-(2**30), 2**30, n)
    else:
        flat = rng.standard_normal(n)
    return flat.astype(dtype).reshape(shape)


def token_args(token: str | None = None, token_file: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(rpc_token=token, rpc_token_file=token_file)


# ---------------------------------------------------------------- parse_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7780", ("127.0.0.1", 7780)),
        ("10.1.2.3:0", ("10.1.2.3", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:9000", ("localhost", 9000)),
        ("box.example:81", ("box.example", 81)),
        ("[::1]:7781", ("::1", 7781)),
        (":9000", ("127.0.0.1", 9000)),
        ("10.1.2.3", ("10.1.2.3", 4242)),
        ("localhost", ("localhost", 4242)),
    ],
)
def test_parse_host_port_accepts_host_port_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 4242) == expected


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:", "127.0.0.1:x", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:1e3", "h:\u0661\u0662", "a:b:c"],
)
def test_parse_host_port_refuses_a_bad_port_naming_the_text_and_the_form(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_host_port(text, 7780)
    message = str(info.value)
    assert repr(text) in message
    assert "HOST:PORT" in message and "127.0.0.1:7780" in message


def test_parse_host_port_does_not_split_a_bare_ipv6_address() -> None:
    try:
        result = parse_host_port("::1", 7780)
    except UsageError as exc:
        assert "'::1'" in str(exc)
    else:
        assert result == ("::1", 7780)


# ---------------------------------------------------------------- is_loopback_host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "127.255.255.254", "::1", "localhost"])
def test_is_loopback_host_true_for_loopback(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.7", "128.0.0.1", "fe80::1", "example.com", "", "localhost.evil"]
)
def test_is_loopback_host_false_for_anything_reachable_or_unknown(host: str) -> None:
    assert not is_loopback_host(host)


# ---------------------------------------------------------------- remote_error_text

# str() of the capnp.KjException a client got when the server's `login` raised
# RpcError (captured from pycapnp 2.2.4; the path is shortened).
LOGIN_REFUSED_TEXT = (
    "(remote):0: failed: remote exception: message = Traceback (most recent call last):\n"
    '  File "capnp/lib/capnp.pyx", line 164, in finalize\n'
    '  File "/root/.shiv/pangea.pyz_d70b/site-packages/pangea.py", line 2867, in login\n'
    '    raise RpcError("login refused: wrong or missing RPC token")\n'
    "pangea.RpcError: login refused: wrong or missing RPC token\n"
    "\n"
    "stack: 7f9bc4685880 7f9bc4675300 7f9bc4511900 7f9bc4513c40"
)
# The same for `connect` with a bad multiaddr: the message itself holds quotes and colons.
CONNECT_FAILED_TEXT = (
    "(remote):0: failed: remote exception: message = Traceback (most recent call last):\n"
    '  File "capnp/lib/capnp.pyx", line 164, in finalize\n'
    '  File "/x/site-packages/pangea.py", line 2857, in connect\n'
    '    raise RpcError(f"cannot connect to {str(multiaddr)!r}: {exc}") from None\n'
    "pangea.RpcError: cannot connect to 'garbage': bad address 'garbage': a multiaddr starts with '/'\n"
    "\n"
    "stack: 7f9bc4685880 7f9bc4675300"
)
# A size-limit refusal by the KJ layer: no Python exception line at all.
SIZE_LIMIT_TEXT = (
    "(remote):0: disconnected: remote exception: expected expectedSizeInWords <= "
    "options.traversalLimitInWords [2097187 <= 1179648]; incoming RPC message exceeds size limit"
)


class FakeKjException(Exception):
    """Stands in for capnp.KjException: only str() matters to remote_error_text."""


def test_remote_error_text_keeps_only_the_python_error_message() -> None:
    assert remote_error_text(FakeKjException(LOGIN_REFUSED_TEXT)) == "login refused: wrong or missing RPC token"


def test_remote_error_text_keeps_colons_and_quotes_inside_the_message() -> None:
    text = remote_error_text(FakeKjException(CONNECT_FAILED_TEXT))
    assert text == "cannot connect to 'garbage': bad address 'garbage': a multiaddr starts with '/'"
    assert "Traceback" not in text and "stack:" not in text


def test_remote_error_text_uses_the_last_error_line_of_a_chained_traceback() -> None:
    text = (
        "(remote):0: failed: remote exception: message = Traceback (most recent call last):\n"
        "ValueError: inner detail\n\nDuring handling of the above exception, another exception occurred:\n\n"
        "pangea.TaskError: scale: factor nan is not a finite number\n"
    )
    assert remote_error_text(FakeKjException(text)) == "scale: factor nan is not a finite number"


def test_remote_error_text_without_a_python_error_line_keeps_the_kj_description() -> None:
    text = remote_error_text(FakeKjException(SIZE_LIMIT_TEXT))
    assert "exceeds size limit" in text
    assert "\n" not in text


def test_remote_error_text_strips_the_failed_prefix_and_handles_empty_text() -> None:
    assert remote_error_text(FakeKjException("(remote):0: failed: node is busy\nmore")) == "node is busy"
    assert remote_error_text(FakeKjException("")) == "FakeKjException"


# ---------------------------------------------------------------- array_to_capnp / array_from_capnp

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 1, 3, 1)]


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_array_round_trips_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    a = sample(dtype, shape)
    b = from_capnp_bytes(to_capnp_bytes(a))
    assert b.dtype == np.dtype(dtype)
    assert b.shape == shape
    np.testing.assert_array_equal(b, a)


def test_array_round_trip_of_non_contiguous_and_big_endian_inputs() -> None:
    a = sample("float64", (4, 6))
    for view in (a.T, a[::2, 1::3], a.astype(">f8"), np.asfortranarray(a)):
        b = from_capnp_bytes(to_capnp_bytes(view))
        assert b.dtype == np.dtype("<f8")
        np.testing.assert_array_equal(b, view)


def test_array_round_trip_keeps_special_values_bit_exact() -> None:
    a = np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324, np.finfo(np.float64).max])
    b = from_capnp_bytes(to_capnp_bytes(a))
    assert b.tobytes() == a.tobytes()


def test_array_from_capnp_returns_a_writable_array_independent_of_the_message() -> None:
    a = sample("int64", (3, 3))
    data = to_capnp_bytes(a)
    b = from_capnp_bytes(data)
    b[0, 0] = 12345  # the server hands operands to kernels that may work in place
    assert from_capnp_bytes(data)[0, 0] == a[0, 0]


def test_array_to_capnp_writes_one_chunk_when_the_array_fits() -> None:
    a = sample("float64", (100,))
    assert chunk_sizes(to_capnp_bytes(a)) == [800]


def test_array_to_capnp_writes_no_chunk_for_an_empty_array() -> None:
    assert chunk_sizes(to_capnp_bytes(np.zeros((0, 5)))) == []


@pytest.mark.parametrize(
    ("dtype", "shape", "chunk", "expected"),
    [
        ("float64", (10,), 7, [7] * 11 + [3]),  # chunk boundaries inside elements
        ("float64", (10,), 16, [16] * 5),  # an exact multiple: no empty trailing chunk
        ("complex128", (3, 2), 40, [40, 40, 16]),
        ("int32", (), 3, [3, 1]),
        ("float32", (5,), 1, [1] * 20),
        ("int64", (4,), 1 << 20, [32]),
    ],
)
def test_array_to_capnp_splits_bytes_into_chunks_of_rpc_chunk_bytes(
    monkeypatch: pytest.MonkeyPatch, dtype: str, shape: tuple[int, ...], chunk: int, expected: list[int]
) -> None:
    monkeypatch.setattr(pangea, "RPC_CHUNK_BYTES", chunk)
    a = sample(dtype, shape)
    data = to_capnp_bytes(a)
    assert chunk_sizes(data) == expected
    b = from_capnp_bytes(data)
    assert b.shape == shape
    np.testing.assert_array_equal(b, a)


def test_array_from_capnp_joins_chunks_it_did_not_split_itself() -> None:
    a = sample("float64", (2, 3))
    raw = a.tobytes()
    cuts = [0, 1, 9, 9, 30, 48]  # uneven pieces, one of them empty
    chunks = [raw[i:j] for i, j in zip(cuts, cuts[1:], strict=False)]
    np.testing.assert_array_equal(from_capnp_bytes(raw_array("float64", [2, 3], chunks)), a)


@pytest.mark.parametrize("chunk", [300_001, 1 << 20, 7 * 8 * 1024 + 5])
def test_array_from_capnp_copies_several_odd_chunks_once_into_one_buffer(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import tracemalloc

    monkeypatch.setattr(pangea, "RPC_CHUNK_BYTES", chunk)
    a = sample("float64", (3, 131_073))  # ~3 MiB, not a multiple of any chunk size above
    data = to_capnp_bytes(a)
    sizes = chunk_sizes(data)
    assert len(sizes) > 2 and sizes[-1] != chunk and sum(sizes) == a.nbytes
    with load_schema().Array.from_bytes(data, traversal_limit_in_words=len(data) // 8 + 64) as reader:
        tracemalloc.start()
        try:
            b = array_from_capnp(reader)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(b, a)
    # the array's buffer and one chunk at a time, not every chunk and then their join (twice the bytes)
    assert peak < a.nbytes + chunk + (64 << 10), (peak, a.nbytes, chunk)


@pytest.mark.parametrize("extra", [-1, 1, 8, 1 << 20])
def test_array_from_capnp_refuses_chunks_that_add_up_to_other_bytes_than_declared(extra: int) -> None:
    raw = sample("float64", (4, 4)).tobytes()
    body = raw + b"\1" * extra if extra > 0 else raw[:extra]
    chunks = [body[:5], body[5:77], body[77:]]
    with pytest.raises(TaskError) as info:
        from_capnp_bytes(raw_array("float64", [4, 4], chunks), index=1)
    assert info.value.kind == "bad-input"
    assert f"needs 128 bytes, header says {128 + extra}" in str(info.value) and "operand 1" in str(info.value)


def test_rpc_chunk_bytes_stays_under_the_capnp_data_field_limit() -> None:
    assert 0 < pangea.RPC_CHUNK_BYTES < 512 << 20


def test_rpc_words_covers_the_message_size_with_headroom() -> None:
    for size in (1 << 20, 256 << 20, pangea.DEFAULT_RPC_MAX_BYTES, 4096 << 20):
        assert rpc_words(size) * 8 > size


@pytest.mark.parametrize("dtype", ["bool", "float16", "object", "uint8", "str", ">f8", ""])
def test_array_from_capnp_refuses_a_dtype_not_allowed_as_bad_input(dtype: str) -> None:
    with pytest.raises(TaskError) as info:
        from_capnp_bytes(raw_array(dtype, [2], [b"\0" * 16]), index=2)
    assert info.value.kind == "bad-input"
    assert "operand 2" in str(info.value)
    assert repr(dtype) in str(info.value)


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([2, 2], 24),  # too few bytes
        ([2, 2], 40),  # too many bytes
        ([3], 0),
        ([], 0),  # a 0-d array needs one element
        ([0], 8),
        ([1 << 40, 1 << 40], 8),  # an absurd shape must not be allocated
        ([1 << 62, 4], 8),  # prod overflows int64
    ],
)
def test_array_from_capnp_refuses_a_shape_that_does_not_match_the_bytes(shape: list[int], nbytes: int) -> None:
    with pytest.raises(TaskError) as info:
        from_capnp_bytes(raw_array("float64", shape, [b"\1" * nbytes]), index=1)
    assert info.value.kind == "bad-input"
    assert "operand 1" in str(info.value)


def test_array_from_capnp_refuses_too_many_dimensions_as_bad_input() -> None:
    shape = [1] * (MAX_NDIM + 1)
    with pytest.raises(TaskError) as info:
        from_capnp_bytes(raw_array("float64", shape, [b"\0" * 8]))
    assert info.value.kind == "bad-input"
    assert f"at most {MAX_NDIM}" in str(info.value)


def test_array_from_capnp_accepts_the_largest_allowed_number_of_dimensions() -> None:
    a = sample("float32", (1, 2) * (MAX_NDIM // 2))
    np.testing.assert_array_equal(from_capnp_bytes(to_capnp_bytes(a)), a)


@pytest.mark.parametrize(
    "bad",
    [np.array([True, False]), np.array(["a", "b"]), np.array([1, 2], dtype=np.uint8), np.zeros((1,) * (MAX_NDIM + 1))],
    ids=["bool", "str", "uint8", "too-many-dims"],
)
def test_array_to_capnp_refuses_an_array_that_cannot_be_sent(bad: np.ndarray) -> None:
    builder = load_schema().Array.new_message()
    with pytest.raises(LocalProtocolError):
        array_to_capnp(builder, bad)


# ---------------------------------------------------------------- cast_suggestion / refused_dtype_message


@pytest.mark.parametrize(
    ("dtype", "target"),
    [
        ("float16", "float32"),
        ("bool", "int32"),
        ("int8", "int32"),
        ("int16", "int32"),
        ("uint8", "int32"),
        ("uint16", "int32"),
        ("uint32", "int64"),
        ("float128", "float64"),
        ("complex256", "complex128"),
        ("datetime64[ns]", "int64"),
        ("timedelta64[s]", "int64"),
    ],
)
def test_cast_suggestion_names_an_allowed_dtype(dtype: str, target: str) -> None:
    suggestion = cast_suggestion(dtype)
    assert suggestion is not None and suggestion[0] == target
    assert target in ALLOWED_DTYPES and suggestion[1]


@pytest.mark.parametrize("dtype", ["float16", "bool", "int8", "int16", "uint8", "uint16", "uint32"])
def test_cast_suggestion_said_to_be_exact_keeps_every_value(dtype: str) -> None:
    suggestion = cast_suggestion(dtype)
    assert suggestion is not None and suggestion[1].startswith(("exact", "True and False"))
    if dtype == "bool":
        values = np.array([False, True])
    elif dtype == "float16":
        values = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every float16, NaNs and infs too
    else:
        info = np.iinfo(dtype)
        values = np.array([info.min, info.min + 1, 0, info.max - 1, info.max], dtype=dtype)
    cast = values.astype(suggestion[0])
    np.testing.assert_array_equal(cast.astype(dtype), values)
    if values.dtype.kind in "biu":
        assert [int(v) for v in cast] == [int(v) for v in values]


def test_cast_suggestion_of_uint64_depends_on_its_largest_value() -> None:
    assert cast_suggestion("uint64", 0) == ("int64", "exact: its largest value 0 fits in int64")
    assert cast_suggestion("uint64", (1 << 63) - 1)[0] == "int64"  # type: ignore[index]
    over = cast_suggestion("uint64", 1 << 63)
    assert over is not None and over[0] == "float64" and str(1 << 63) in over[1]
    unknown = cast_suggestion("uint64")
    assert unknown is not None and unknown[0] == "float64"


@pytest.mark.parametrize("dtype", ["str32", "bytes8", "object", "void16", "<U1", ""])
def test_cast_suggestion_has_none_for_what_is_not_numbers(dtype: str) -> None:
    assert cast_suggestion(dtype) is None


def test_cast_suggestion_has_one_for_every_numeric_numpy_dtype_pangea_refuses() -> None:
    for code in np.typecodes["All"]:
        name = np.dtype(code).name
        if name not in ALLOWED_DTYPES and np.dtype(code).kind in "biufcmM":
            assert cast_suggestion(name) is not None, name


def test_refused_dtype_message_names_the_dtype_what_pangea_takes_and_the_cast() -> None:
    message = refused_dtype_message("matmul", 0, "float16")
    assert message == (
        "cannot submit matmul: operand 0 is a float16 array; pangea takes float32, float64, int32, int64, "
        "complex64, complex128: cast it first, e.g. a.astype(np.float32) (exact: every float16 is a float32)"
    )


def test_refused_dtype_message_names_the_operand_as_the_kernels_do() -> None:
    assert "e.g. b.astype(np.int32)" in refused_dtype_message("add", 1, "bool")
    assert "operand 1 is a bool array" in refused_dtype_message("add", 1, "bool")


def test_refused_dtype_message_of_a_large_uint64_suggests_float64() -> None:
    assert "a.astype(np.int64)" in refused_dtype_message("sum", 0, "uint64", 5)
    assert "a.astype(np.float64)" in refused_dtype_message("sum", 0, "uint64", (1 << 64) - 1)


def test_refused_dtype_message_without_a_cast_says_to_convert() -> None:
    message = refused_dtype_message("sum", 0, "str32")
    assert message.startswith("cannot submit sum: operand 0 is a str32 array; pangea takes float32")
    assert message.endswith("convert it to numbers of one of those first")
    assert "astype" not in message


# ---------------------------------------------------------------- client_timings


def test_client_timings_keeps_the_node_keys_and_adds_the_hop() -> None:
    node = {"queue_s": 0.125, "transfer_s": 0.25, "compute_s": 0.25, "total_s": 0.84}
    t = client_timings(node, 1.53)
    assert {k: t[k] for k in node} == node
    assert t["client_total_s"] == 1.53
    assert t["rpc_s"] == pytest.approx(1.53 - 0.84)
    assert list(t) == [*node, "client_total_s", "rpc_s"]


def test_client_timings_hop_is_never_negative() -> None:
    # NOTE: two clocks on one box may disagree by a little on a tiny task
    assert client_timings({"total_s": 0.5}, 0.25)["rpc_s"] == 0.0
    assert client_timings({}, 0.25) == {"client_total_s": 0.25, "rpc_s": 0.25}


# ---------------------------------------------------------------- read_rpc_token

GOOD_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PANGEA_RPC_TOKEN", raising=False)


def write_token(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a token file with ``mode`` (0600: the only kind `read_rpc_token` accepts)."""
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_is_empty_when_none_is_given() -> None:
    assert read_rpc_token(token_args()) == ""


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_from_the_flag() -> None:
    assert read_rpc_token(token_args(token=GOOD_TOKEN)) == GOOD_TOKEN


def test_read_rpc_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANGEA_RPC_TOKEN", GOOD_TOKEN)
    assert read_rpc_token(token_args()) == GOOD_TOKEN


def test_read_rpc_token_flag_and_file_win_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PANGEA_RPC_TOKEN", "from-the-environment-0000")
    assert read_rpc_token(token_args(token=GOOD_TOKEN)) == GOOD_TOKEN
    path = write_token(tmp_path / "token", GOOD_TOKEN)
    assert read_rpc_token(token_args(token_file=str(path))) == GOOD_TOKEN


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_from_a_file_strips_the_newline(tmp_path: Path) -> None:
    path = write_token(tmp_path / "token", f"  {GOOD_TOKEN}\n")
    assert read_rpc_token(token_args(token_file=str(path))) == GOOD_TOKEN


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_accepts_exactly_the_minimum_length() -> None:
    token = "x" * MIN_TOKEN_CHARS
    assert read_rpc_token(token_args(token=token)) == token


@pytest.mark.usefixtures("no_env_token")
@pytest.mark.parametrize("source", ["flag", "file", "env"])
def test_read_rpc_token_refuses_a_short_token(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = "x" * (MIN_TOKEN_CHARS - 1)
    args = token_args()
    if source == "flag":
        args = token_args(token=short)
    elif source == "file":
        write_token(tmp_path / "token", short + "\n")
        args = token_args(token_file=str(tmp_path / "token"))
    else:
        monkeypatch.setenv("PANGEA_RPC_TOKEN", short)
    with pytest.raises(UsageError) as info:
        read_rpc_token(args)
    assert f"{MIN_TOKEN_CHARS - 1} characters" in str(info.value)
    assert f"at least {MIN_TOKEN_CHARS}" in str(info.value)
    assert short not in str(info.value)  # never echo a secret, even a bad one
    assert info.value.hint


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_refuses_flag_and_file_together(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(GOOD_TOKEN)
    with pytest.raises(UsageError, match="either --rpc-token or --rpc-token-file"):
        read_rpc_token(token_args(token=GOOD_TOKEN, token_file=str(tmp_path / "token")))


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_names_a_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        read_rpc_token(token_args(token_file=missing))
    assert repr(missing) in str(info.value)
    assert "No such file" in str(info.value)


@pytest.mark.usefixtures("no_env_token")
@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_read_rpc_token_refuses_an_empty_token_file(tmp_path: Path, content: str) -> None:
    path = write_token(tmp_path / "token", content)
    with pytest.raises((UsageError, ConfigError)) as info:
        read_rpc_token(token_args(token_file=str(path)))
    assert "0 characters" in str(info.value) or "empty" in str(info.value)


@pytest.mark.usefixtures("no_env_token")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o444])
def test_read_rpc_token_refuses_a_token_file_other_users_can_read(tmp_path: Path, mode: int) -> None:
    path = write_token(tmp_path / "token", GOOD_TOKEN, mode)
    with pytest.raises(ConfigError) as info:
        read_rpc_token(token_args(token_file=str(path)))
    assert str(info.value) == f"cannot use token file {path}: it is readable by other users"
    assert info.value.hint == f"chmod 600 {path}" and info.value.exit_code == 2
    assert GOOD_TOKEN not in str(info.value)


@pytest.mark.usefixtures("no_env_token")
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_read_rpc_token_accepts_a_token_file_only_its_owner_can_read(tmp_path: Path, mode: int) -> None:
    path = write_token(tmp_path / "token", GOOD_TOKEN, mode)
    assert read_rpc_token(token_args(token_file=str(path))) == GOOD_TOKEN


@pytest.mark.usefixtures("no_env_token")
def test_read_rpc_token_from_the_flag_warns_once_that_other_users_can_read_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_rpc_token(token_args(token=GOOD_TOKEN)) == GOOD_TOKEN
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pangea: warning: --rpc-token TOKEN ") and "other users" in line, line
    assert "--rpc-token-file FILE" in line and "$PANGEA_RPC_TOKEN" in line and GOOD_TOKEN not in line
    # the safer forms say nothing
    read_rpc_token(token_args(token_file=str(write_token(tmp_path / "token", GOOD_TOKEN))))
    monkeypatch.setenv("PANGEA_RPC_TOKEN", GOOD_TOKEN)
    read_rpc_token(token_args())
    assert capsys.readouterr().err == ""


def call_args(token: str | None = None, token_file: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(token=token, token_file=token_file)


def test_read_call_token_from_the_flag_warns_and_from_a_file_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pangea.read_call_token(call_args()) is None  # Client reads $PANGEA_RPC_TOKEN
    assert capsys.readouterr().err == ""
    assert pangea.read_call_token(call_args(token=GOOD_TOKEN)) == GOOD_TOKEN
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pangea: warning: --token TOKEN ") and "other users" in line, line
    assert "--token-file FILE" in line and "$PANGEA_RPC_TOKEN" in line
    path = write_token(tmp_path / "token", GOOD_TOKEN + "\n")
    assert pangea.read_call_token(call_args(token_file=str(path))) == GOOD_TOKEN
    assert capsys.readouterr().err == ""
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        pangea.read_call_token(call_args(token_file=str(path)))
    with pytest.raises(UsageError, match="either --token or --token-file"):
        pangea.read_call_token(call_args(token=GOOD_TOKEN, token_file=str(path)))


# ---------------------------------------------------------------- errors in RPC results


def test_rpc_error_fields_keep_pangea_kinds_and_hide_internal_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert pangea.rpc_error_fields(pangea.TaskError("no\nsuch", kind="bad-input"), "submit") == ("bad-input", "no such")
    assert pangea.rpc_error_fields(pangea.UsageError("bad address 'x'"), "connect")[0] == "bad-input"
    assert pangea.rpc_error_fields(pangea.PeerError("gone", kind="unreachable"), "connect") == ("unreachable", "gone")
    grouped = ExceptionGroup("trio", [pangea.RpcError("the node is shutting down")])
    assert pangea.rpc_error_fields(grouped, "list peers") == ("unavailable", "the node is shutting down")
    with caplog.at_level("ERROR", logger="pangea"):
        kind, message = pangea.rpc_error_fields(ZeroDivisionError("division by zero"), "get status")
    assert kind == "internal"
    assert message == "cannot get status: internal error (ZeroDivisionError: division by zero); see the node's log"
    assert caplog.records and caplog.records[-1].exc_info is not None  # the traceback: the node's log only


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -5.0, -1e-9, 1e300])
def test_check_task_timeout_refuses_nan_inf_negative_and_absurd(bad: float) -> None:
    with pytest.raises(pangea.TaskError, match="bad timeoutSeconds") as info:
        pangea.check_task_timeout(bad)
    assert info.value.kind == "bad-input" and "\n" not in str(info.value)


def test_check_task_timeout_zero_is_the_default() -> None:
    assert pangea.check_task_timeout(0.0) == pangea.RPC_DEFAULT_TIMEOUT_S
    assert pangea.check_task_timeout(-0.0) == pangea.RPC_DEFAULT_TIMEOUT_S
    assert pangea.check_task_timeout(2.5) == 2.5


def test_client_refuses_a_bad_timeout_before_connecting() -> None:
    for bad in (math.nan, -1.0, 0.0, math.inf):
        with pytest.raises(pangea.UsageError, match="bad timeout_s"):
            pangea.Client("127.0.0.1:1", timeout_s=bad)


def test_bad_fingerprints_are_usage_errors_that_show_the_expected_form() -> None:
    for bad in ("", "sha256:xyz", "sha256:" + "0" * 63, "md5:" + "0" * 64):
        with pytest.raises(pangea.UsageError, match="expected sha256: and 64 hex digits"):
            pangea.parse_fingerprint(bad)
    digest = bytes(range(32))
    assert pangea.parse_fingerprint(pangea.format_fingerprint(digest)) == digest
    assert pangea.parse_fingerprint(":".join(f"{b:02X}" for b in digest)) == digest
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pangea.format_fingerprint(digest))


# ---------------------------------------------------------------- admission of RPC tasks and calls


def test_rpc_task_bytes_counts_operands_and_output_twice() -> None:
    assert pangea.rpc_task_bytes(0, 1 << 30) == 2 << 30  # the output and its copy in the answer
    assert pangea.rpc_task_bytes(256 << 20, 128 << 20) == 768 << 20  # request + arrays, output + answer


def test_budget_refusal_is_none_while_the_task_fits() -> None:
    budget = pangea.MemoryBudget(512 << 20)
    assert pangea.budget_refusal(budget, "matmul", 512 << 20, 128 << 20) is None
    assert budget.try_acquire(256 << 20)
    assert pangea.budget_refusal(budget, "matmul", 256 << 20, 64 << 20) is None


def test_budget_refusal_of_a_task_over_the_whole_budget_says_it_never_fits() -> None:
    budget = pangea.MemoryBudget(512 << 20)
    refusal = pangea.budget_refusal(budget, "random", pangea.rpc_task_bytes(0, 1 << 30), 1 << 30)
    assert refusal is not None and refusal.kind == pangea.ErrorKind.BAD_INPUT
    text = str(refusal)
    assert text.startswith("cannot run random: its output of 1.0 GiB (2.0 GiB with")
    assert "can never fit the node's memory budget of 512.0 MiB" in text and "--memory-budget-mib" in text


def test_budget_refusal_of_a_task_over_what_is_free_is_busy() -> None:
    budget = pangea.MemoryBudget(512 << 20)
    assert budget.try_acquire(400 << 20)
    refusal = pangea.budget_refusal(budget, "matmul", 200 << 20, 50 << 20)
    assert refusal is not None and refusal.kind == pangea.ErrorKind.BUSY
    assert "(400.0 MiB in use); retry later" in str(refusal)
    budget.release(400 << 20)
    assert pangea.budget_refusal(budget, "matmul", 200 << 20, 50 << 20) is None


def test_call_bound_refuses_past_its_limit_and_frees_a_slot_on_leave() -> None:
    calls = pangea.CallBound(2)
    assert calls.try_enter() and calls.try_enter()
    assert not calls.try_enter() and calls.refused == 1 and calls.in_flight == 2
    calls.leave()
    assert calls.try_enter() and calls.in_flight == 2 and calls.refused == 1
    for _ in range(5):
        calls.leave()
    assert calls.in_flight == 0  # never below zero


def test_rpc_max_calls_in_flight_leaves_room_below_the_connection_cap() -> None:
    assert 1 <= pangea.RPC_MAX_CALLS_IN_FLIGHT <= pangea.RPC_MAX_CONNECTIONS


def test_operand_stand_ins_hold_no_memory_and_refuse_absurd_shapes() -> None:
    from types import SimpleNamespace

    (a,) = pangea.operand_stand_ins([SimpleNamespace(dtype="float64", shape=[4000, 4000])])  # type: ignore[misc]
    assert a.shape == (4000, 4000) and a.nbytes == 4000 * 4000 * 8 and a.base is not None and a.strides == (0, 0)
    assert pangea.operand_stand_ins([SimpleNamespace(dtype="float32", shape=[0, 1 << 63])]) is None
    assert pangea.operand_stand_ins([SimpleNamespace(dtype="object", shape=[2])]) is None
    assert pangea.operand_stand_ins([]) == []


# ---------------------------------------------------------------- limits that follow the memory budget


def test_rpc_max_bytes_follow_the_memory_budget_and_let_1_gib_of_operands_in_by_default() -> None:
    default = pangea.rpc_max_bytes_for_budget(pangea.DEFAULT_MEMORY_BUDGET_BYTES)
    assert default >= (1 << 30) + (64 << 10)  # 1 GiB of operands and the message around them
    assert pangea.rpc_max_bytes_for_budget(64 << 20) == (32 << 20) + pangea.RPC_MESSAGE_ROOM_BYTES
    assert pangea.rpc_max_bytes_for_budget(1 << 40) == pangea.RPC_MAX_MIB << 20
    sizes = [pangea.rpc_max_bytes_for_budget(b << 20) for b in (1, 64, 1024, 4096, 16384, 1 << 20)]
    assert sizes == sorted(sizes)


def test_1_gib_of_operands_fits_the_default_budget_and_limits() -> None:
    a = np.broadcast_to(np.zeros((), dtype=np.float64), (8192, 8192))  # 512 MiB each, holding nothing
    refusal = pangea.client_size_refusal(
        "matmul",
        [a, a],
        {},
        pangea.RPC_MAX_MIB << 20,
        pangea.rpc_max_bytes_for_budget(pangea.DEFAULT_MEMORY_BUDGET_BYTES),
        pangea.DEFAULT_MEMORY_BUDGET_BYTES,
    )
    assert refusal is None, refusal


def test_client_size_refusal_names_the_node_s_message_limit_before_sending() -> None:
    a = np.broadcast_to(np.zeros((), dtype=np.float64), (2048, 2048))  # 32 MiB
    node_max = pangea.rpc_max_bytes_for_budget(64 << 20)  # 48 MiB
    refusal = pangea.client_size_refusal("add", [a, a], {}, pangea.RPC_MAX_MIB << 20, node_max, 64 << 20)
    assert isinstance(refusal, pangea.RpcError), refusal
    assert "64.0 MiB exceed the RPC message limit of 48.0 MiB (the node)" in str(refusal)
    assert "nothing was sent" in str(refusal) and "--memory-budget-mib" in (refusal.hint or "")
    mine = pangea.client_size_refusal("add", [a, a], {}, 16 << 20, node_max, 64 << 20)
    assert (
        isinstance(mine, pangea.RpcError) and "(this client)" in str(mine) and "max_message_bytes" in (mine.hint or "")
    )


def test_client_size_refusal_names_a_budget_the_task_can_never_fit() -> None:
    a = np.broadcast_to(np.zeros((), dtype=np.float64), (1024, 1024))  # 8 MiB: 48 MiB held with its output bound
    refusal = pangea.client_size_refusal("scale", [a], {"factor": 2.0}, 1 << 30, 1 << 30, 24 << 20)
    assert isinstance(refusal, TaskError) and refusal.kind == "bad-input", refusal
    assert "can never fit the node's memory budget of 24.0 MiB" in str(refusal) and "nothing was sent" in str(refusal)
    assert pangea.client_size_refusal("scale", [a], {"factor": 2.0}, 1 << 30, 1 << 30, 0) is None  # an older node
    assert pangea.client_size_refusal("scale", [a], {"factor": 2.0}, 1 << 30, 1 << 30, 48 << 20) is None


def test_result_verified_only_when_remote_workers_ran_it_and_checks_are_on() -> None:
    def outcome(worker: str, *attempts: str, verification: str = "freivalds") -> pangea.TaskOutcome:
        records = [pangea.AttemptRecord(w) for w in attempts or (worker,)]
        return pangea.TaskOutcome(1, "matmul", (), worker, records, 0.0, 0.0, verification=verification)

    peer = "12D3KooWpeer"
    assert pangea.result_verified(outcome(peer), 1)
    assert not pangea.result_verified(outcome(peer), 0)
    assert not pangea.result_verified(outcome("local"), 1)
    assert pangea.result_verified(outcome("split", peer, peer), 1)
    assert not pangea.result_verified(outcome("split", peer, "local"), 1)
    assert not pangea.result_verified(outcome(peer, verification="unverified"), 1)  # a kernel without a check
    assert pangea.result_verified(outcome(peer, verification="recompute"), 0)  # asked for, whatever the rounds


def test_task_future_cancel_reaches_its_call_once_and_only_before_its_answer() -> None:
    import concurrent.futures

    cancelled: list[pangea.TaskFuture] = []
    future = pangea.TaskFuture(cancelled.append)
    assert isinstance(future, concurrent.futures.Future) and future.task == {}
    assert future.cancel() and future.cancel()  # cancelling twice is harmless
    assert cancelled == [future] and future.cancelled()
    answered = pangea.TaskFuture(cancelled.append)
    assert answered.set_running_or_notify_cancel()
    answered.set_result(1)
    assert not answered.cancel() and cancelled == [future] and answered.result() == 1

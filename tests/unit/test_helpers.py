"""Unit tests of pangea.py's pure helpers (parsing, formatting, ranking)."""

from __future__ import annotations

import itertools
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pangea
from pangea import (
    PeerAddress,
    UsageError,
    backoff_delays,
    build_target_mismatch,
    fit_column_widths,
    format_bytes,
    format_fields,
    format_table,
    hello_mismatch,
    parse_peer_address,
    rank_interface_addresses,
    short_id,
    wrap_text,
)

# A realistic Ed25519 peer id: base58btc, 52 characters, starts with 12D3KooW.
PEER_ID = "12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y"
BASE58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
assert len(PEER_ID) == 52 and set(PEER_ID) <= BASE58


# ---------------------------------------------------------------- parse_peer_address


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        (f"/ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}", "192.168.1.5", 7777),
        (f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}", "127.0.0.1", 1),
        (f"/ip4/10.0.0.2/tcp/65535/p2p/{PEER_ID}", "10.0.0.2", 65535),
        (f"/ip6/::1/tcp/4001/p2p/{PEER_ID}", "::1", 4001),
        (f"/ip6/fe80::1ff:fe23:4567:890a/tcp/4001/p2p/{PEER_ID}", "fe80::1ff:fe23:4567:890a", 4001),
        (f"/dns4/box.example.org/tcp/7777/p2p/{PEER_ID}", "box.example.org", 7777),
    ],
)
def test_parse_peer_address_accepts_good_addresses(text: str, host: str, port: int) -> None:
    address = parse_peer_address(text)
    assert address == PeerAddress(text, host, port, PEER_ID)


def test_parse_peer_address_strips_whitespace_and_trailing_slash() -> None:
    text = f"/ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}"
    assert parse_peer_address(f"  {text}/\n").text == text


def test_parse_peer_address_accepts_join_string_and_keeps_the_code_apart() -> None:
    address = parse_peer_address(f"pangea://ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}#abcd-efgh-jkmn")
    assert address == PeerAddress(
        f"/ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}", "192.168.1.5", 7777, PEER_ID, "ABCDEFGHJKMN"
    )
    assert "ABCD" not in address.text
    assert parse_peer_address(f"pangea:///ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}").code == ""


def test_parse_peer_address_rejects_a_join_string_with_a_malformed_code() -> None:
    with pytest.raises(UsageError, match="bad pairing code"):
        parse_peer_address(f"pangea://ip4/192.168.1.5/tcp/7777/p2p/{PEER_ID}#s3cr3t-token")


def test_parse_peer_address_accepts_legacy_rsa_peer_id() -> None:
    rsa_id = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # 46 characters
    assert parse_peer_address(f"/ip4/1.2.3.4/tcp/9/p2p/{rsa_id}").peer_id == rsa_id


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"ip4/1.2.3.4/tcp/7777/p2p/{PEER_ID}", "starts with '/'"),
        ("", "starts with '/'"),
        ("1.2.3.4:7777", "starts with '/'"),
        ("/ip4/1.2.3.4", "too short"),
        ("/ip4/1.2.3.4/tcp", "too short"),
        (f"/ipx/1.2.3.4/tcp/7777/p2p/{PEER_ID}", "unknown network 'ipx'"),
        (f"/ip4/300.1.2.3/tcp/7777/p2p/{PEER_ID}", "'300.1.2.3' is not an ip4 address"),
        (f"/ip4/::1/tcp/7777/p2p/{PEER_ID}", "'::1' is not an ip4 address"),
        (f"/ip6/1.2.3.4/tcp/7777/p2p/{PEER_ID}", "'1.2.3.4' is not an ip6 address"),
        (f"/ip6/fe80:::1/tcp/7777/p2p/{PEER_ID}", "is not an ip6 address"),
        (f"/ip4/1.2.3.4/udp/7777/p2p/{PEER_ID}", "pangea uses tcp, not 'udp'"),
        (f"/ip4/1.2.3.4/tcp/http/p2p/{PEER_ID}", "port 'http' is not a number in 1-65535"),
        (f"/ip4/1.2.3.4/tcp/0/p2p/{PEER_ID}", "port '0' is not a number in 1-65535"),
        (f"/ip4/1.2.3.4/tcp/65536/p2p/{PEER_ID}", "port '65536' is not a number"),
        (f"/ip4/1.2.3.4/tcp/-1/p2p/{PEER_ID}", "port '-1' is not a number"),
        ("/ip4/1.2.3.4/tcp/7777", "no /p2p/<peer id> part"),
        ("/ip4/1.2.3.4/tcp/7777/p2p", "no /p2p/<peer id> part"),
        (f"/ip4/1.2.3.4/tcp/7777/ipfs/{PEER_ID}", "no /p2p/<peer id> part"),
        (f"/ip4/1.2.3.4/tcp/7777/p2p/{PEER_ID}/ws", "unexpected 'ws' after the peer id"),
        ("/ip4/1.2.3.4/tcp/7777/p2p/12D3KooWshort", "'12D3KooWshort' is not a peer id"),
        ("/ip4/1.2.3.4/tcp/7777/p2p/" + "0" * 52, "is not a peer id"),  # 0 is not base58
        ("/ip4/1.2.3.4/tcp/7777/p2p/" + "l" * 52, "is not a peer id"),  # nor is l
        ("/ip4/1.2.3.4/tcp/7777/p2p/" + "A" * 65, "is not a peer id"),
    ],
)
def test_parse_peer_address_rejects_malformed_address_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_peer_address(text)
    message = str(info.value)
    assert message.startswith("bad address ")
    assert problem in message
    assert info.value.exit_code == 2


def test_parse_peer_address_without_p2p_part_has_a_hint() -> None:
    with pytest.raises(UsageError) as info:
        parse_peer_address("/ip4/1.2.3.4/tcp/7777")
    assert info.value.hint is not None and "/p2p/" in info.value.hint


def test_parse_peer_address_quotes_the_bad_value_and_shows_the_expected_form() -> None:
    with pytest.raises(UsageError, match=r"bad address 'nonsense'.*expected /ip4/<address>/tcp/<port>/p2p/"):
        parse_peer_address("nonsense")


def test_parse_peer_address_rejects_non_ascii_digit_port_with_usage_error() -> None:
    with pytest.raises(UsageError, match="port"):
        parse_peer_address(f"/ip4/1.2.3.4/tcp/\u00b2/p2p/{PEER_ID}")


_address_pieces = st.sampled_from(
    ["", "/", "ip4", "ip6", "dns", "tcp", "udp", "p2p", "1.2.3.4", "::1", "7777", "0", "x", PEER_ID]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_address_pieces, max_size=8).map("/".join)))
def test_parse_peer_address_raises_only_usage_error(text: str) -> None:
    # Anything a user pastes either parses or is a UsageError, never a crash.
    try:
        address = parse_peer_address(text)
    except UsageError as exc:
        assert str(exc).startswith("bad address ")
    else:
        assert address.text.startswith("/") and "/p2p/" in address.text
        assert 0 < address.port < 65536


# ---------------------------------------------------------------- rank_interface_addresses


def test_rank_interface_addresses_orders_real_then_vpn_then_bridges_then_loopback() -> None:
    addresses = [
        ("lo", "127.0.0.1"),
        ("docker0", "172.17.0.1"),
        ("wlan0", "10.0.0.5"),
        ("br-1a2b3c", "172.18.0.1"),
        ("tailscale0", "100.64.0.7"),
        ("eth0", "192.168.1.5"),
    ]
    assert rank_interface_addresses(addresses) == [
        ("eth0", "192.168.1.5"),
        ("wlan0", "10.0.0.5"),
        ("tailscale0", "100.64.0.7"),
        ("br-1a2b3c", "172.18.0.1"),
        ("docker0", "172.17.0.1"),
        ("lo", "127.0.0.1"),
    ]


def test_rank_interface_addresses_is_independent_of_input_order() -> None:
    addresses = [
        ("lo", "127.0.0.1"),
        ("veth12", "172.17.0.9"),
        ("enp3s0", "192.168.0.2"),
        ("wg0", "10.8.0.1"),
    ]
    expected = [
        ("enp3s0", "192.168.0.2"),
        ("wg0", "10.8.0.1"),
        ("veth12", "172.17.0.9"),
        ("lo", "127.0.0.1"),
    ]
    for permutation in itertools.permutations(addresses):
        assert rank_interface_addresses(permutation) == expected


def test_rank_interface_addresses_drops_link_local_and_unspecified() -> None:
    addresses = [("eth1", "169.254.3.3"), ("eth0", "192.168.1.5"), ("any", "0.0.0.0")]
    assert rank_interface_addresses(addresses) == [("eth0", "192.168.1.5")]


def test_rank_interface_addresses_drops_duplicate_ips_keeping_the_best_ranked() -> None:
    addresses = [
        ("docker0", "192.168.1.5"),
        ("eth0:1", "192.168.1.5"),
        ("eth0", "192.168.1.5"),
        ("lo", "127.0.0.1"),
        ("lo:1", "127.0.0.1"),
    ]
    assert rank_interface_addresses(addresses) == [("eth0", "192.168.1.5"), ("lo", "127.0.0.1")]


def test_rank_interface_addresses_of_nothing_is_empty() -> None:
    assert rank_interface_addresses([]) == []


# ---------------------------------------------------------------- build target and hello


def test_build_target_mismatch_none_when_equal() -> None:
    assert build_target_mismatch(("cpython-311", "x86_64"), ("cpython-311", "x86_64")) is None
    # a build stamp read back from a module may hold a list
    assert build_target_mismatch(["cpython-311", "x86_64"], ("cpython-311", "x86_64")) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("here", [("cpython-312", "x86_64"), ("cpython-311", "aarch64")])
def test_build_target_mismatch_names_both_targets(here: tuple[str, str]) -> None:
    problem = build_target_mismatch(("cpython-311", "x86_64"), here)
    assert problem is not None
    assert "built for cpython-311 on x86_64" in problem
    assert f"this is {here[0]} on {here[1]}" in problem
    assert sys.executable in problem
    assert "\n" not in problem


def test_hello_mismatch_none_for_same_protocol() -> None:
    assert hello_mismatch(1, 1, "9.9.9") is None


def test_hello_mismatch_names_both_protocol_versions() -> None:
    problem = hello_mismatch(1, 2, "0.2.0")
    assert problem is not None
    assert "protocol 2 (pangea 0.2.0)" in problem
    assert f"protocol 1 (pangea {pangea.__version__})" in problem
    assert "\n" not in problem


# ---------------------------------------------------------------- formatting


def test_format_table_aligns_columns_under_a_rule() -> None:
    table = format_table(("check", "result"), [("connection", "ok"), ("matmul", "FAILED"), ("x", 3)])
    assert table.splitlines() == [
        "check       result",
        "----------  ------",
        "connection  ok",
        "matmul      FAILED",
        "x           3",
    ]


def test_format_table_with_no_rows_has_header_and_rule() -> None:
    assert format_table(("a", "bb"), []) == "a  bb\n-  --"


def test_format_table_width_follows_the_widest_cell() -> None:
    lines = format_table(("a", "b", "c"), [("xxxx", "", "z")]).splitlines()
    assert lines == ["a     b  c", "----  -  -", "xxxx     z"]
    assert all(not line.endswith(" ") for line in lines)


def test_format_table_rejects_rows_of_the_wrong_width() -> None:
    with pytest.raises((ValueError, IndexError)):
        format_table(("a", "b"), [("only one",)])
    with pytest.raises((ValueError, IndexError)):
        format_table(("a", "b"), [("one", "two", "three")])


# The initiator's checks as the demo prints them: the detail column alone runs past 200 characters.
CHECK_ROWS = [
    (
        "connection",
        "ok",
        "0.16",
        f"peer {PEER_ID} (pangea 0.1.0, cpython-311 x86_64 Linux, 3 GFLOP/s); /noise + /yamux/1.0.0; "
        "rtt 2.71 ms; arrays: TLS 1.3 TLS_AES_256_GCM_SHA384 from 127.0.0.1:33536",
    ),
    ("local execution", "ok", "0.09", "256x256 matmul on this node in 38.5 ms, max error 0.0e+00"),
    (
        "delegation",
        "ok",
        "0.12",
        "11/11 kernels ran on the responder and match local numpy: add, dot, inverse, matmul, multiply, "
        "random, scale, solve, subtract, sum, transpose",
    ),
    (
        "throughput",
        "FAILED",
        "2.52",
        "64.0 MiB each way, verified, median of 3 after a warm-up: upload 36 MB/s (35-40), download 330 MB/s (301-333)",
    ),
    ("empty", "ok", "0.00", ""),
]
CHECK_HEADERS = ("check", "result", "seconds", "detail")


def words_by_column(table: str, starts: list[int]) -> list[list[str]]:
    """The words of each column of a table's body, read top to bottom (columns start at ``starts``)."""
    columns: list[list[str]] = [[] for _ in starts]
    for line in table.splitlines()[2:]:
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else None
            columns[i] += line[start:end].split()
    return columns


@pytest.mark.parametrize("width", [80, 120, 200])
def test_format_table_fits_the_width_and_keeps_every_word(width: int) -> None:
    table = format_table(CHECK_HEADERS, CHECK_ROWS, width)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= width, table
    rule = lines[1]
    starts = [0]
    for i in range(1, len(rule)):
        if rule[i] == "-" and rule[i - 1] == " ":
            starts.append(i)
    assert len(starts) == 4, rule
    columns = words_by_column(table, starts)
    for i in range(4):  # a word longer than its column is cut, so letters are compared, not words
        assert "".join(columns[i]) == "".join("".join(row[i].split()) for row in CHECK_ROWS), (i, table)


def test_format_table_narrows_the_widest_column_and_keeps_the_short_ones_whole() -> None:
    lines = format_table(CHECK_HEADERS, CHECK_ROWS, 80).splitlines()
    assert lines[0].split() == ["check", "result", "seconds", "detail"]
    assert lines[2].startswith("connection       ok      0.16     peer ")
    assert any(line.startswith("throughput       FAILED  2.52     ") for line in lines)
    assert lines[3].startswith(" " * 33) and lines[3].strip()  # the detail wraps under its own column


def test_format_table_within_a_wide_enough_width_is_unchanged() -> None:
    rows = [("connection", "ok"), ("matmul", "FAILED")]
    assert format_table(("check", "result"), rows, 200) == format_table(("check", "result"), rows)


def test_format_table_wraps_a_long_word_inside_its_cell() -> None:
    table = format_table(("peer", "state"), [(PEER_ID, "ok")], 40)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 40
    assert "".join(line[: len(lines[1].split()[0])].strip() for line in lines[2:]) == PEER_ID


def test_fit_column_widths_takes_from_the_widest_and_stops_at_a_floor() -> None:
    assert fit_column_widths([10, 6, 7, 200], 80) == [10, 6, 7, 51]
    assert fit_column_widths([50, 50], 62) == [30, 30]
    assert fit_column_widths([3, 40, 40], 10) == [3, 6, 6]  # too narrow for all: floors kept, runs over
    assert fit_column_widths([5, 5], 80) == [5, 5]


def test_format_fields_wraps_values_under_themselves() -> None:
    verdict = "TCP does not reach the peer: check that both boxes are on one network (or a VPN), " * 2
    text = format_fields([("port", "7777: free"), ("verdict", verdict.strip())], 80)
    lines = text.splitlines()
    assert lines[0] == "port        7777: free"
    assert lines[1].startswith("verdict     TCP does not reach")
    assert all(len(line) <= 80 for line in lines) and len(lines) > 2
    assert all(line.startswith(" " * 12) for line in lines[2:])
    assert " ".join(line[12:] for line in lines[1:]).split() == verdict.split()


def test_wrap_text_keeps_short_lines_and_never_breaks_a_word() -> None:
    address = f"/ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}"
    text = f"short line\nconnect to {address} and then wait for the other side to say it is done"
    wrapped = wrap_text(text, 40, indent="  ").splitlines()
    assert wrapped[0] == "short line"
    assert f"  {address}" in wrapped  # a word longer than the width stays whole, on a line of its own
    assert all(len(line) <= 40 for line in wrapped if address not in line)
    assert wrap_text(text, None) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 << 20, "64.0 MiB"),
        (2 << 30, "2.0 GiB"),
        (3 << 40, "3072.0 GiB"),
        (-2048, "-2.0 KiB"),
        (12.6, "13 B"),
    ],
)
def test_format_bytes_picks_unit(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_backoff_delays_double_up_to_the_cap() -> None:
    delays = list(itertools.islice(backoff_delays(0.25, 4.0), 8))
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_backoff_delays_never_exceed_the_cap_when_first_is_not_a_power_of_two() -> None:
    delays = list(itertools.islice(backoff_delays(0.3, 1.0), 5))
    assert delays == [0.3, 0.6, 1.0, 1.0, 1.0]


def test_backoff_delays_uses_the_module_constants() -> None:
    delays = list(itertools.islice(backoff_delays(pangea.DIAL_BACKOFF_FIRST_S, pangea.DIAL_BACKOFF_MAX_S), 7))
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_short_id_shortens_long_peer_ids_only() -> None:
    assert short_id(PEER_ID) == "12D3KooW…eF7y"
    assert short_id("short") == "short"
    assert short_id("x" * 16) == "x" * 16


def test_short_id_keeps_distinct_ids_distinct_in_practice() -> None:
    rng = random.Random(1)
    ids = {"12D3KooW" + "".join(rng.choice(sorted(BASE58)) for _ in range(44)) for _ in range(200)}
    assert len({short_id(i) for i in ids}) == len(ids)


# ---------------------------------------------------------------- dialable addresses


@pytest.mark.parametrize(
    ("ip", "want"),
    [("0.0.0.0", True), ("::", True), ("[::]", True), ("127.0.0.1", False), ("10.0.0.2", False), ("x", False)],
)
def test_is_unspecified_ip_knows_the_wildcards(ip: str, want: bool) -> None:
    assert pangea.is_unspecified_ip(ip) is want
    assert pangea.is_unspecified_ip(None) is False


@pytest.mark.parametrize(
    ("endpoint", "want"),
    [
        (("10.0.0.2", 4001), "/ip4/10.0.0.2/tcp/4001"),
        (("::1", 4001), "/ip6/::1/tcp/4001"),
        (("0.0.0.0", 4001), None),
        (None, None),
        ("10.0.0.2:4001", None),
    ],
)
def test_endpoint_multiaddr_of_a_socket_peer(endpoint: object, want: str | None) -> None:
    assert pangea.endpoint_multiaddr(endpoint) == want


def test_dialable_addresses_put_the_connections_ip_in_place_of_a_wildcard_and_drop_repeats() -> None:
    announced = [f"/ip4/0.0.0.0/tcp/7777/p2p/{PEER_ID}", f"/ip4/10.0.0.2/tcp/7777/p2p/{PEER_ID}"]
    assert pangea.dialable_addresses(announced, "10.0.0.2") == [f"/ip4/10.0.0.2/tcp/7777/p2p/{PEER_ID}"]
    assert pangea.dialable_addresses(announced, None) == [f"/ip4/10.0.0.2/tcp/7777/p2p/{PEER_ID}"]
    assert pangea.dialable_addresses(["/ip6/::/tcp/1"], "fe80::1") == ["/ip6/fe80::1/tcp/1"]
    assert pangea.dialable_addresses(["/ip4/0.0.0.0/tcp/1"], "0.0.0.0") == []


def test_format_seconds_keeps_sub_second_timeouts_readable() -> None:
    assert pangea.format_seconds(0.05) == "0.05 s"
    assert pangea.format_seconds(2.5) == "2.5 s"
    assert pangea.format_seconds(3.0) == "3 s"
    assert pangea.format_seconds(65.4) == "65 s"


def test_format_fields_puts_an_address_too_wide_for_its_column_whole_under_its_label() -> None:
    address = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"  # 77 characters
    assert format_fields([("peer", address)], 100).splitlines() == [f"peer        {address}"]
    assert format_fields([("peer", address), ("port", "1")], 80).splitlines() == [
        "peer",
        f"  {address}",
        "port        1",
    ]


@pytest.mark.parametrize(("width", "folded"), [(80, ["rpc", "addresses"]), (120, ["addresses"]), (200, [])])
def test_format_table_fold_moves_last_columns_under_the_row_to_keep_a_peer_id_whole(
    width: int, folded: list[str]
) -> None:
    address = f"/ip4/127.0.0.1/tcp/40269/p2p/{PEER_ID}"
    headers = ("role", "pid", "peer id", "uptime", "rpc", "addresses")
    rows = [("serve", 4242, PEER_ID, "3 s", "127.0.0.1:7780", f"{address}, {address}")]
    lines = format_table(headers, rows, width, fold=True).splitlines()
    assert max(len(line) for line in lines) <= width, lines
    assert lines[0].split() == [
        "role",
        "pid",
        "peer",
        "id",
        "uptime",
        *(h for h in ("rpc", "addresses") if h not in folded),
    ]
    assert lines[2].split()[:3] == ["serve", "4242", PEER_ID]  # the peer id whole, on its row
    under = [line for line in lines[3:] if line.startswith("  ") and not line.startswith("    ")]
    assert [line.split(":")[0].strip() for line in under] == folded
    assert "".join("".join(lines[2:]).split()).endswith(f"{address},{address}".replace(" ", ""))  # nothing lost


def test_format_table_fold_changes_nothing_when_the_table_fits() -> None:
    rows = [("serve", 4242, "ok")]
    assert format_table(("a", "b", "c"), rows, 80, fold=True) == format_table(("a", "b", "c"), rows)


# ---------------------------------------------------------------- dial failures
#
# The chains below are built the way py-libp2p 0.8.1 builds them (swarm.py's dial_peer and
# _dial_addr_single_attempt, tcp.py's _dial_resolved, the Noise handshake), with its own
# exception classes and messages; tests/integration/test_dial_messages.py classifies the ones
# real dials raise.

DIAL_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
REAL_ID = "12D3KooWNMMNaDqqmHcKBH9eq5zbPFaU9QXPXfuhSLQjgVhwRxgM"


def swarm_failure(inner: BaseException, outer_text: str) -> BaseException:
    """SwarmDialAllFailedError from MultiError([SwarmException from inner]), as dial_peer raises it."""
    from libp2p.exceptions import MultiError
    from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException

    try:
        raise SwarmException(outer_text) from inner
    except SwarmException as one:
        attempt = one
    try:
        raise SwarmDialAllFailedError(
            f"unable to connect to {DIAL_ID}, no addresses established a successful connection (with exceptions)",
            peer_id=None,
            num_addrs_tried=1,
        ) from MultiError([attempt])
    except SwarmDialAllFailedError as exc:
        return exc


def chained(*layers: BaseException) -> BaseException:
    """``layers[0]`` raised from ``layers[1]`` raised from ... (outermost first)."""
    for outer, inner in zip(layers, layers[1:], strict=False):
        outer.__cause__ = inner
    return layers[0]


def refused_chain(port: int) -> BaseException:
    from libp2p.transport.exceptions import OpenConnectionError

    refused = ConnectionRefusedError(111, f"Error connecting to ('127.0.0.1', {port}): Connection refused")
    group = ExceptionGroup(f"all attempts to connect to 127.0.0.1:{port} failed", [refused])
    tcp = chained(
        OpenConnectionError(f"Failed to open TCP stream to /ip4/127.0.0.1/tcp/{port}: all attempts failed"),
        OSError(f"all attempts to connect to 127.0.0.1:{port} failed"),
        group,
    )
    return swarm_failure(tcp, f"fail to open connection to peer {DIAL_ID}")


def mismatch_chain() -> BaseException:
    from libp2p.security.noise.exceptions import PeerIDMismatchesPubkey
    from libp2p.transport.exceptions import SecurityUpgradeFailure

    noise = PeerIDMismatchesPubkey(
        f"peer id does not correspond to the received pubkey: remote_peer={DIAL_ID}, "
        f"remote_peer_id_from_pubkey={REAL_ID}"
    )
    upgrade = chained(SecurityUpgradeFailure("handshake failed when upgrading to secure connection"), noise)
    return swarm_failure(upgrade, f"failed to upgrade security for peer {DIAL_ID}: handshake failed")


def not_libp2p_chain() -> BaseException:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.protocol_muxer.exceptions import MultiselectError
    from libp2p.transport.exceptions import SecurityUpgradeFailure

    upgrade = chained(
        SecurityUpgradeFailure("failed to negotiate the secure protocol"),
        MultiselectError("Failed to negotiate a security protocol: no protocol selected"),
        ConnectionClosedError("TCP connection reset by remote peer"),
        ConnectionResetError(104, "Connection reset by peer"),
    )
    return swarm_failure(upgrade, f"failed to upgrade security for peer {DIAL_ID}: failed to negotiate")


def classify(exc: BaseException, **kw: object) -> pangea.DialFailure:
    return pangea.classify_dial_error(exc, "10.213.0.1", 7999, DIAL_ID, waited_s=10.0, **kw)  # type: ignore[arg-type]


def test_dial_refused_says_nothing_listening_and_is_retried() -> None:
    found = classify(refused_chain(7999), who="the initiator")
    assert (found.cause, found.final) == ("refused", False)
    assert found.reason == "nothing listening on 10.213.0.1:7999"
    assert found.hint.startswith("is the initiator running there, and on that port?")


def test_dial_peer_id_mismatch_names_both_ids_and_is_final() -> None:
    found = classify(mismatch_chain())
    assert (found.cause, found.final) == ("peer-id", True)
    assert found.reason == f"the node there has peer id {REAL_ID}, you asked for {DIAL_ID}"
    assert "check the address you copied" in found.hint


def test_dial_to_something_not_libp2p_is_a_handshake_failure() -> None:
    found = classify(not_libp2p_chain())
    assert found.cause == "handshake" and not found.final
    assert found.reason == "10.213.0.1:7999 answered, but the libp2p security handshake failed"
    assert "--psk" in found.hint and "data port" in found.hint


def test_dial_timeout_is_a_firewall_or_a_stuck_handshake_by_the_tcp_probe() -> None:
    import trio

    deadline = trio.TooSlowError()  # our own fail_after around host.connect: py-libp2p has no deadline of its own
    deadline.__context__ = BaseExceptionGroup("Exceptions from Trio nursery", [KeyboardInterrupt()])
    assert classify(deadline).cause == "timeout"
    assert classify(deadline).reason == "no answer from 10.213.0.1:7999 within 10 s"
    assert "firewall" in classify(deadline, tcp_reached=False).hint
    stuck = classify(deadline, tcp_reached=True)
    assert stuck.cause == "handshake" and "accepts TCP but no libp2p handshake completed within 10 s" in stuck.reason
    assert "--psk" in stuck.hint


@pytest.mark.parametrize("code", ["EHOSTUNREACH", "ENETUNREACH"])
def test_dial_no_route_says_unreachable(code: str) -> None:
    import errno

    from libp2p.transport.exceptions import OpenConnectionError

    tcp = chained(OpenConnectionError("Failed to open TCP stream"), OSError(getattr(errno, code), "No route to host"))
    found = classify(swarm_failure(tcp, f"fail to open connection to peer {DIAL_ID}"))
    assert found.cause == "unreachable" and found.reason == "no route to 10.213.0.1:7999"


def test_dial_unknown_failure_names_the_innermost_exception_not_the_swarm_wrapper() -> None:
    found = classify(swarm_failure(ValueError("something odd"), "Unexpected error dialing peer"))
    assert found.cause == "other" and found.reason == "ValueError: something odd"
    assert "SwarmDialAllFailedError" not in found.reason


def test_exception_chain_is_bounded_and_visits_each_once() -> None:
    loop = ValueError("a")
    loop.__cause__ = KeyError("b")
    loop.__cause__.__context__ = loop  # a cycle
    assert [type(e).__name__ for e in pangea.exception_chain(loop)] == ["ValueError", "KeyError"]
    deep: BaseException = ValueError("0")
    for n in range(1, 200):
        deep = chained(ValueError(str(n)), deep)
    assert len(pangea.exception_chain(deep)) == 64


# ---------------------------------------------------------------- redial notes (fake clock)


def test_redial_notes_say_the_cause_once_then_growing_reminders_then_reconnected() -> None:
    notes = pangea.RedialNotes("12D3KooW…nXTN", first_s=60.0, max_s=240.0)
    said = []
    for now in range(0, 1000, 10):  # a dial every 10 s for 1000 s
        line = notes.failed("refused", "nothing listening on 10.0.0.1:7777", 30.0, float(now))
        if line is not None:
            said.append((now, line))
    assert said[0] == (
        0,
        "cannot reach peer 12D3KooW…nXTN: nothing listening on 10.0.0.1:7777; retrying every 30 s at most",
    )
    assert [now for now, _ in said] == [0, 60, 180, 420, 660, 900]  # after 60 s, then 2, 4, 4, 4 minutes
    assert said[1][1] == (
        "peer 12D3KooW…nXTN still unreachable after 7 tries in 60 s (nothing listening on 10.0.0.1:7777); "
        "retrying every 30 s"
    )
    assert notes.connected(1000.0) == "reconnected to peer 12D3KooW…nXTN after 100 failed tries in 1000 s"
    assert notes.connected(1010.0) == "connected to peer 12D3KooW…nXTN"
    notes.failed("refused", "nothing listening on 10.0.0.1:7777", 30.0, 1020.0)
    assert notes.connected(1022.0) == "reconnected to peer 12D3KooW…nXTN after 1 failed try in 2 s"


def test_redial_notes_say_a_new_cause_at_once() -> None:
    notes = pangea.RedialNotes("p")
    assert notes.failed("refused", "nothing listening on h:1", 30.0, 0.0) is not None
    assert notes.failed("refused", "nothing listening on h:1", 30.0, 10.0) is None
    line = notes.failed("timeout", "no answer from h:1 within 9.5 s", 30.0, 20.0)
    assert line == "cannot reach peer p: now no answer from h:1 within 9.5 s; retrying every 30 s at most"
    assert notes.failed("timeout", "no answer from h:1 within 10 s", 30.0, 30.0) is None  # same kind: quiet


def test_a_failed_rpc_connect_says_why_in_words() -> None:
    import errno

    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 7780)")
    assert pangea.connect_error_text(refused, 15.0) == "nothing listening there"
    assert pangea.connect_error_text(OSError(errno.EHOSTUNREACH, "No route to host"), 15.0).startswith("no route to it")
    assert pangea.connect_error_text(TimeoutError(), 15.0) == "no answer within 15 s (a firewall dropping the port?)"
    assert pangea.connect_error_text(OSError(errno.EMFILE, "Too many open files"), 15.0) == (
        "OSError: [Errno 24] Too many open files"
    )

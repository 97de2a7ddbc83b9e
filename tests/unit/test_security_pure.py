"""Unit tests of pangea.py's security building blocks (pure helpers, wire, session protocol, kernels).

No sockets, no processes: the pairing code (`Pairing.check`, `pairing_proof`,
`normalize_pairing_code`), the trust and key files (`parse_trusted_peers`,
`parse_psk`), the trust `NodeService.connect` gives (only to a peer whose
handshake succeeded; over a fake node on trio), the limits (`Limits.validate`, `MemoryBudget`, the admission
rules of `SessionProtocol.admit_request`), and the Decoder under hostile input with a
``gate`` and small limits: a property test feeds random and mutated
frames in random chunks and checks that it only ever returns messages or
NEED_DATA or raises ProtocolError subclasses, and never holds more than one
payload, one header and one chunk. The same behaviours over real libp2p
connections are in tests/integration/test_hostile.py and test_security.py.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
import struct
import typing
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pangea
from pangea import (
    ALLOWED_DTYPES,
    FRAME_PREFIX,
    MAX_HEADER_BYTES,
    MAX_PAIRING_FAILURES,
    NEED_DATA,
    PAIRING_ALPHABET,
    PAIRING_CODE_CHARS,
    ByeMsg,
    ConfigError,
    Decoder,
    ErrorMsg,
    HelloMsg,
    KernelError,
    Limits,
    MemoryBudget,
    MessageError,
    Pairing,
    PingMsg,
    PongMsg,
    ProtocolError,
    Refusal,
    RemoteProtocolError,
    SessionProtocol,
    TaskRequestMsg,
    TaskResultMsg,
    UsageError,
    encode,
    format_pairing_code,
    load_schema,
    new_pairing_code,
    normalize_pairing_code,
    pairing_proof,
    parse_psk,
    parse_trusted_peers,
    peer_refusal,
)

MESSAGE_TYPES = typing.get_args(pangea.Message)

# Two real-looking peer ids (base58, 52 characters, as Ed25519 ids are).
ACCEPTOR = "12D3KooWBikNkNG44AaUML5AXV5ox6yAFZ8xcJ2ZGDPAuvQp6n13"
DIALER = "12D3KooWAY9d6xPMZsVgaPbmtvHRcsUjXwSwPRx1knZ3BEDGq9gG"
OTHER = "12D3KooWEmuc4TGtskBSh2ht5eo5tucorVuJikCN7vtDGWEE6V71"
CODE = "4E5QZNFDYK3N"

# ---------------------------------------------------------------- pairing codes


def test_new_pairing_code_is_12_characters_of_the_alphabet_and_fresh_each_time() -> None:
    codes = {new_pairing_code() for _ in range(50)}
    assert len(codes) == 50  # 60 bits each: a repeat would mean a broken generator
    for code in codes:
        assert len(code) == PAIRING_CODE_CHARS and set(code) <= set(PAIRING_ALPHABET)
    assert len(PAIRING_ALPHABET) == 32 and len(set(PAIRING_ALPHABET)) == 32  # 5 bits a character
    assert PAIRING_CODE_CHARS * 5 >= 60


def test_new_pairing_code_with_an_injected_rng_is_reproducible() -> None:
    assert new_pairing_code(random.Random(1)) == new_pairing_code(random.Random(1))


@pytest.mark.parametrize(
    ("typed", "code"),
    [
        ("4E5Q-ZNFD-YK3N", CODE),
        ("4e5q-znfd-yk3n", CODE),
        ("  4E5Q ZNFD YK3N \n", CODE),
        ("4E5QZNFDYK3N", CODE),
        ("OOOO-IIII-LLLL", "000011111111"),  # Crockford: O is 0, I and L are 1
        ("oooo-iiii-llll", "000011111111"),
    ],
)
def test_normalize_pairing_code_accepts_what_people_type(typed: str, code: str) -> None:
    assert normalize_pairing_code(typed) == code


@pytest.mark.parametrize(
    "typed",
    ["", "4E5Q-ZNFD-YK3", "4E5Q-ZNFD-YK3NN", "4E5Q-ZNFD-YK3U", "4E5Q_ZNFD_YK3N", "4E5Q-ZNFD-YK3!", "é" * 12],
    ids=["empty", "short", "long", "U", "underscores", "punctuation", "unicode"],
)
def test_normalize_pairing_code_refuses_anything_else_with_usage_error(typed: str) -> None:
    with pytest.raises(UsageError, match="bad pairing code") as info:
        normalize_pairing_code(typed)
    assert "ABCD-EFGH-JKMN" in str(info.value)  # shows the expected form


def test_format_pairing_code_groups_by_four_and_normalizes_back() -> None:
    assert format_pairing_code(CODE) == "4E5Q-ZNFD-YK3N"
    assert normalize_pairing_code(format_pairing_code(CODE)) == CODE


# ---------------------------------------------------------------- pairing_proof


def test_pairing_proof_is_hmac_sha256_of_both_ids_under_the_code() -> None:
    proof = pairing_proof(CODE, ACCEPTOR, DIALER)
    expected = hmac.new(CODE.encode(), f"pangea-pair-v1|{ACCEPTOR}|{DIALER}".encode(), hashlib.sha256).digest()
    assert proof == expected and len(proof) == 32
    assert pairing_proof(CODE, ACCEPTOR, DIALER) == proof  # deterministic
    assert CODE.encode() not in proof


@pytest.mark.parametrize(
    ("code", "acceptor", "dialer"),
    [
        ("4E5QZNFDYK3M", ACCEPTOR, DIALER),  # another code
        (CODE, OTHER, DIALER),  # replayed against another node
        (CODE, ACCEPTOR, OTHER),  # replayed by another peer
        (CODE, DIALER, ACCEPTOR),  # the roles swapped
    ],
    ids=["other-code", "other-acceptor", "other-dialer", "swapped"],
)
def test_pairing_proof_is_bound_to_the_code_and_both_peer_ids(code: str, acceptor: str, dialer: str) -> None:
    assert pairing_proof(code, acceptor, dialer) != pairing_proof(CODE, ACCEPTOR, DIALER)


# ---------------------------------------------------------------- Pairing.check


def offer(expires_at: float = 100.0) -> Pairing:
    return Pairing(CODE, expires_at=expires_at)


def proof_of(dialer: str = DIALER, code: str = CODE) -> bytes:
    return pairing_proof(code, ACCEPTOR, dialer)


WRONG = pairing_proof("0000000000ZZ", ACCEPTOR, DIALER)


def reason_of(refusal: Refusal | None) -> str:
    """The text a refused dialer's user reads: the reason and, after it, the hint."""
    assert refusal is not None and refusal.kind == "refused", refusal
    return f"{refusal.message} | {refusal.hint}"


def is_wrong(refusal: Refusal | None) -> bool:
    return refusal is not None and refusal.message.startswith("wrong pairing code")


def test_pairing_right_proof_is_accepted_once_and_marks_the_code_used() -> None:
    pairing = offer()
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0) is None
    assert pairing.used_by == DIALER and pairing.failures == 0


def test_pairing_same_peer_may_reconnect_even_after_expiry() -> None:
    pairing = offer(expires_at=10.0)
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0) is None
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=5.0) is None
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1000.0) is None


def test_pairing_code_reused_by_another_peer_is_refused() -> None:
    pairing = offer()
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0) is None
    reason = reason_of(pairing.check(proof_of(OTHER), ACCEPTOR, OTHER, now=2.0))
    assert "already used" in reason and "new code" in reason
    assert pairing.used_by == DIALER


def test_pairing_proof_stolen_from_another_peer_is_wrong_for_the_thief() -> None:
    pairing = offer()
    assert is_wrong(pairing.check(proof_of(DIALER), ACCEPTOR, OTHER, now=1.0))  # OTHER replays DIALER's proof
    assert pairing.used_by is None


def test_pairing_proof_made_for_another_node_is_wrong_here() -> None:
    assert is_wrong(offer().check(pairing_proof(CODE, OTHER, DIALER), ACCEPTOR, DIALER, now=1.0))


def test_pairing_wrong_proofs_count_and_burn_the_code_after_the_limit() -> None:
    pairing = offer()
    for n in range(1, MAX_PAIRING_FAILURES + 1):
        assert is_wrong(pairing.check(WRONG, ACCEPTOR, DIALER, now=1.0))
        assert pairing.failures == n
        assert pairing.burned == (n == MAX_PAIRING_FAILURES)
    reason = reason_of(pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0))  # the right code, too late
    assert "burned" in reason and str(MAX_PAIRING_FAILURES) in reason
    assert pairing.used_by is None
    assert reason_of(pairing.check(proof_of(OTHER), ACCEPTOR, OTHER, now=1.0)) == reason  # for everybody


def test_pairing_wrong_code_says_the_tries_left_and_the_next_step() -> None:
    pairing = offer()
    texts = [reason_of(pairing.check(WRONG, ACCEPTOR, DIALER, now=1.0)) for _ in range(MAX_PAIRING_FAILURES)]
    assert texts[0].startswith(f"wrong pairing code ({MAX_PAIRING_FAILURES - 1} tries left before the code is burned)")
    assert texts[MAX_PAIRING_FAILURES - 2].startswith("wrong pairing code (1 try left before the code is burned)")
    for text in texts[:-1]:
        assert "copy the join string `initiate` printed" in text and "each run prints a new code" in text, text
    # the last try says the code is burned now and how to get a new one
    assert texts[-1].startswith(f"wrong pairing code: that was the last of {MAX_PAIRING_FAILURES} tries"), texts[-1]
    assert "burned" in texts[-1] and "run `initiate` there again for a new code" in texts[-1]


def test_pairing_names_the_command_that_prints_a_new_code() -> None:
    pairing = Pairing(CODE, expires_at=100.0, issuer="serve --pair")
    assert "`serve --pair`" in reason_of(pairing.check(WRONG, ACCEPTOR, DIALER, now=1.0))
    assert "`serve --pair`" in reason_of(pairing.check(proof_of(), ACCEPTOR, DIALER, now=101.0))


def test_pairing_burned_text_names_who_tried_once_each() -> None:
    pairing = offer()
    for dialer, source in [(DIALER, "10.0.0.2"), (DIALER, "10.0.0.2"), (OTHER, "10.0.0.3"), (DIALER, "10.0.0.2")]:
        pairing.check(pairing_proof("0000000000ZZ", ACCEPTOR, dialer), ACCEPTOR, dialer, now=1.0, source=source)
    pairing.check(WRONG, ACCEPTOR, DIALER, now=1.0)  # no source known
    assert pairing.burned
    assert pairing.burned_text() == (
        f"pairing code burned after {MAX_PAIRING_FAILURES} wrong tries from "
        f"{DIALER} (10.0.0.2), {OTHER} (10.0.0.3), {DIALER}"
    )


def test_pairing_right_proof_after_fewer_wrong_tries_still_works() -> None:
    pairing = offer()
    for _ in range(MAX_PAIRING_FAILURES - 1):
        assert is_wrong(pairing.check(WRONG, ACCEPTOR, OTHER, now=1.0))
    assert not pairing.burned
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0) is None


def test_pairing_expired_code_is_refused_even_with_the_right_proof() -> None:
    assert offer(expires_at=10.0).check(proof_of(), ACCEPTOR, DIALER, now=10.0) is None  # at the deadline: valid
    late = offer(expires_at=10.0)
    assert not late.expired(10.0) and late.expired(10.001)
    reason = reason_of(late.check(proof_of(), ACCEPTOR, DIALER, now=70.0))
    assert reason.startswith("the pairing code expired 60 s ago, unused"), reason
    assert "run `initiate` there again for a new code" in reason
    assert late.used_by is None and late.failures == 0 and not late.burned


def test_pairing_on_a_fake_clock_expires_without_any_try() -> None:
    clock = [0.0]
    pairing = offer(expires_at=600.0)
    for clock[0] in (0.0, 300.0, 600.0):
        assert not pairing.expired(clock[0])
    clock[0] = 600.5
    assert pairing.expired(clock[0]) and not pairing.burned
    assert "expired" in reason_of(pairing.check(WRONG, ACCEPTOR, DIALER, now=clock[0]))
    assert pairing.failures == 0  # a try after the deadline costs nothing: the code is gone anyway


def test_pairing_missing_proof_names_the_code_and_costs_no_try() -> None:
    pairing = offer()
    for _ in range(MAX_PAIRING_FAILURES + 2):
        refusal = pairing.check(b"", ACCEPTOR, DIALER, now=1.0)
        assert refusal is not None and "pairing code" in refusal.message and "--code" in refusal.message
    assert pairing.failures == 0
    assert pairing.check(proof_of(), ACCEPTOR, DIALER, now=1.0) is None


@pytest.mark.parametrize("proof", [b"\x00", b"\x00" * 31, b"\x00" * 33, b"\xff" * 64, WRONG[:16]])
def test_pairing_malformed_proofs_are_wrong_codes_not_crashes(proof: bytes) -> None:
    assert is_wrong(offer().check(proof, ACCEPTOR, DIALER, now=1.0))


def test_pairing_refusal_hint_travels_to_the_dialer() -> None:
    refusal = offer().check(WRONG, ACCEPTOR, DIALER, now=1.0)
    assert refusal is not None and refusal.hint
    verdict = peer_refusal(ACCEPTOR, refusal.to_msg())
    assert verdict.message == f"cannot work with {ACCEPTOR}: it refused the session: {refusal.message}"
    assert verdict.hint == refusal.hint
    # a refusal without a hint stays as it was
    plain = peer_refusal(ACCEPTOR, ErrorMsg("refused", "no"))
    assert plain.message.endswith(": no") and plain.hint is None
    # other kinds keep their text as it was (an incompatible peer may be an older pangea): the dialer knows their hint
    incompatible = Refusal("incompatible", "protocol 1 vs 2", "use the same pangea.pyz on both machines")
    assert incompatible.to_msg().message == "protocol 1 vs 2"
    assert peer_refusal(ACCEPTOR, incompatible.to_msg()).hint == "use the same pangea.pyz on both machines"


# ---------------------------------------------------------------- trusted_peers


def test_parse_trusted_peers_reads_ids_and_skips_comments_and_blank_lines() -> None:
    text = f"# my boxes\n\n{DIALER}\n   {OTHER}   # the laptop\r\n#{ACCEPTOR}\n{DIALER}\n"
    ids, complaints = parse_trusted_peers(text)
    assert ids == {DIALER, OTHER}
    assert complaints == []


def test_parse_trusted_peers_complains_about_bad_lines_by_number_and_keeps_the_rest() -> None:
    text = f"{DIALER}\nnot-a-peer-id\n{OTHER} {ACCEPTOR}\n12D3KooW0OIl\n{OTHER}\n"
    ids, complaints = parse_trusted_peers(text)
    assert ids == {DIALER, OTHER}
    assert len(complaints) == 3
    assert complaints[0].startswith("line 2: 'not-a-peer-id'") and "not a peer id" in complaints[0]
    assert complaints[1].startswith("line 3: ")
    assert complaints[2].startswith("line 4: ")


def test_parse_trusted_peers_of_an_empty_file() -> None:
    assert parse_trusted_peers("") == (set(), [])


# ---------------------------------------------------------------- trust by `connect`


def connect_with(dial: Any) -> tuple[set[str], Any, Any]:
    """Run `NodeService.connect` against a fake node whose `dial` is ``dial(node, address)``;
    return the trusted set, the fake node and the result (or the exception raised)."""
    import trio

    trusted: set[str] = set()
    node = SimpleNamespace(on_session=[], budget=pangea.MemoryBudget(1 << 20))

    async def fake_dial(address: Any, *, timeout_s: float) -> Any:
        return await dial(node, address, trusted)

    node.dial = fake_dial
    service = pangea.NodeService(node, SimpleNamespace(), trust=trusted.add, rpc_address="")  # type: ignore[arg-type]
    service.peer_info = lambda session: session  # type: ignore[assignment, method-assign, return-value]
    outcome: Any = None

    async def main() -> None:
        nonlocal outcome
        try:
            outcome = await service.connect(f"/ip4/127.0.0.1/tcp/1/p2p/{DIALER}")
        except pangea.PangeaError as exc:
            outcome = exc

    trio.run(main)
    return trusted, node, outcome


def test_connect_that_fails_leaves_no_trust_and_no_hook_behind() -> None:
    async def dial(node: Any, address: Any, trusted: set[str]) -> Any:
        assert address.peer_id not in trusted  # nobody is trusted while the dial runs
        raise pangea.NoPeerError(f"cannot reach {address.text}", kind=pangea.ErrorKind.UNREACHABLE)

    trusted, node, outcome = connect_with(dial)
    assert isinstance(outcome, pangea.NoPeerError) and str(outcome).startswith("cannot reach")
    assert trusted == set() and node.on_session == []


def test_connect_trusts_the_dialed_peer_as_its_session_opens_not_a_peer_that_dialed_in() -> None:
    seen: list[bool] = []

    async def dial(node: Any, address: Any, trusted: set[str]) -> Any:
        incoming = SimpleNamespace(peer_id=address.peer_id, dialed=False)
        stranger = SimpleNamespace(peer_id=OTHER, dialed=True)
        dialed = SimpleNamespace(peer_id=address.peer_id, dialed=True)
        for session in (incoming, stranger):
            for callback in list(node.on_session):
                callback(session)
        seen.append(bool(trusted))
        for callback in list(node.on_session):
            callback(dialed)
        seen.append(address.peer_id in trusted)  # before the session runs: its first task is served
        return dialed

    trusted, node, outcome = connect_with(dial)
    assert seen == [False, True]
    assert outcome.peer_id == DIALER and trusted == {DIALER} and node.on_session == []


# ---------------------------------------------------------------- pre-shared keys

KEY = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "text",
    [
        KEY,
        KEY + "\n",
        KEY.upper(),
        f"\n  {KEY}  \n\n",
        f"/key/swarm/psk/1.0.0/\n/base16/\n{KEY}\n",
        f"/key/swarm/psk/1.0.0/\r\n/base16/\r\n{KEY.upper()}\r\n",
    ],
    ids=["plain", "newline", "upper", "spaces", "swarm-key", "swarm-key-crlf"],
)
def test_parse_psk_accepts_plain_hex_and_the_swarm_key_form(text: str) -> None:
    assert parse_psk(text) == KEY


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        KEY[:-1],
        KEY + "0",
        KEY[:-1] + "g",
        f"{KEY}\n{KEY}",
        "/key/swarm/psk/1.0.0/\n/base16/\n",
        f"/key/swarm/psk/1.0.0/\n/base64/\n{KEY}",
        f"/key/swarm/psk/1.0.0/\n{KEY}",
        "0x" + KEY[2:],
        KEY[:32] + " " + KEY[32:],
    ],
    ids=[
        "empty",
        "blank",
        "63-hex",
        "65-hex",
        "not-hex",
        "two-keys",
        "header-only",
        "base64-header",
        "no-base16-line",
        "0x-prefix",
        "inner-space",
    ],
)
def test_parse_psk_refuses_anything_else_with_config_error_and_hint(text: str) -> None:
    with pytest.raises(ConfigError, match="64 hex digits") as info:
        parse_psk(text)
    assert info.value.hint and "psk" in info.value.hint
    assert KEY not in str(info.value)  # a key, even a bad one, is not echoed


# ---------------------------------------------------------------- Limits


def test_limits_defaults_validate() -> None:
    limits = Limits()
    assert limits.validate() is limits
    assert limits.dtypes == ALLOWED_DTYPES
    assert "object" not in limits.dtypes and "float16" not in limits.dtypes


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"dtypes": ("object",)}, "not allowed"),
        ({"dtypes": ("float64", "float16")}, "not allowed"),
        ({"dtypes": ()}, "not allowed"),
        ({"max_payload_bytes": 0}, "max payload bytes must be at least 1"),
        ({"max_elements": -1}, "max elements must be at least 1"),
        ({"max_inflight_tasks": 0}, "max inflight tasks must be at least 1"),
        ({"max_inflight_bytes": 0}, "max inflight bytes must be at least 1"),
        ({"memory_budget_bytes": 0}, "memory budget bytes must be at least 1"),
        ({"max_pending_streams": 0}, "max pending streams must be at least 1"),
        ({"max_pending_streams_total": 0}, "max pending streams total must be at least 1"),
        ({"max_pending_stranger_streams": 0}, "max pending stranger streams must be at least 1"),
        ({"max_strangers_per_address": 0}, "max strangers per address must be at least 1"),
        ({"handshake_timeout_s": 0.0}, "handshake timeout s must be a positive"),
        ({"idle_timeout_s": -1.0}, "idle timeout s must be a positive"),
        ({"task_timeout_s": math.inf}, "task timeout s must be a positive"),
        ({"task_timeout_s": math.nan}, "task timeout s must be a positive"),
        ({"max_ndim": 0}, "max ndim"),
        ({"max_ndim": pangea.MAX_NDIM + 1}, "max ndim"),
    ],
)
def test_limits_validate_names_the_first_bad_value(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        Limits(**changes).validate()


def test_limits_validate_accepts_a_narrow_configuration() -> None:
    Limits(dtypes=("float32",), max_payload_bytes=1, max_elements=1, max_ndim=1, max_pending_streams=1).validate()


# ---------------------------------------------------------------- PendingStreams


def test_pending_streams_cap_strangers_node_wide_however_many_identities_they_use() -> None:
    pending = pangea.PendingStreams(Limits(max_pending_streams=16, max_pending_stranger_streams=64))
    admitted = sum(
        pending.admit(f"stranger{i}", f"10.0.0.{i}", trusted=False) is None for i in range(100) for _ in range(16)
    )
    assert admitted == 64 and pending.total == 64 and pending.refused == 1600 - 64
    assert pending.admit("friend", "10.0.0.1", trusted=True) is None  # a trusted peer still gets in
    assert pending.admit("stranger99", "10.0.1.1", trusted=False) == (
        "64 streams of untrusted peers already wait for their Hello"
    )
    for _ in range(16):
        pending.release("stranger0")
    assert pending.admit("stranger99", "10.0.1.1", trusted=False) is None  # a released slot is free again


def test_pending_streams_let_few_strangers_wait_from_one_address_and_cap_everyone_together() -> None:
    pending = pangea.PendingStreams(Limits(max_strangers_per_address=2, max_pending_streams_total=5))
    assert pending.admit("a", "10.0.0.1", trusted=False) is None
    assert pending.admit("b", "10.0.0.1", trusted=False) is None
    assert pending.admit("a", "10.0.0.1", trusted=False) is None  # one more stream of a waiting stranger
    assert (
        pending.admit("c", "10.0.0.1", trusted=False) == "2 untrusted peers from 10.0.0.1 already wait for their Hello"
    )
    assert pending.admit("c", "10.0.0.2", trusted=False) is None
    assert pending.admit("t", "10.0.0.1", trusted=True) is None  # trusted peers do not count per address
    assert pending.admit("t", "10.0.0.1", trusted=True) == "5 streams of all peers already wait for their Hello"
    assert pending.admit("t", "10.0.0.1", trusted=True) == "5 streams of all peers already wait for their Hello"
    pending.release("b")
    pending.release("b")  # a second release of a peer with none waiting changes nothing
    assert pending.total == 4 and "b" not in pending.per_peer and "b" not in pending.strangers
    assert pending.admit("c", "10.0.0.1", trusted=False) is None  # b's place from 10.0.0.1 is free


def test_pending_streams_keep_the_per_peer_cap() -> None:
    pending = pangea.PendingStreams(Limits(max_pending_streams=2))
    assert [pending.admit("t", "h", trusted=True) for _ in range(3)][2] == "2 streams already wait for their Hello"


# ---------------------------------------------------------------- MemoryBudget


def test_memory_budget_takes_up_to_the_limit_exactly_and_refuses_more() -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(60) and budget.try_acquire(40)
    assert budget.in_use == 100
    assert not budget.try_acquire(1)
    assert budget.in_use == 100  # a refusal takes nothing
    assert budget.try_acquire(0)
    budget.release(40)
    assert not budget.try_acquire(41) and budget.try_acquire(40)
    assert budget.peak == 100


def test_memory_budget_refuses_a_single_request_over_the_limit() -> None:
    budget = MemoryBudget(1 << 20)
    assert not budget.try_acquire((1 << 20) + 1)
    assert not budget.try_acquire(1 << 62)
    assert budget.in_use == 0 and budget.peak == 0


def test_memory_budget_release_never_goes_negative() -> None:
    budget = MemoryBudget(10)
    assert budget.try_acquire(5)
    budget.release(50)
    assert budget.in_use == 0
    assert budget.try_acquire(10) and not budget.try_acquire(1)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=60))
def test_memory_budget_property_in_use_stays_within_zero_and_the_limit(ops: list[tuple[bool, int]]) -> None:
    budget = MemoryBudget(256)
    held: list[int] = []
    for take, n in ops:
        if take:
            if budget.try_acquire(n):
                held.append(n)
        elif held:
            budget.release(held.pop())
        assert 0 <= budget.in_use <= budget.limit_bytes
        assert budget.in_use == sum(held)
        assert budget.peak <= budget.limit_bytes


# ---------------------------------------------------------------- admission (SessionProtocol.admit_request)


class AdmissionRig:
    """A real SessionProtocol (the acceptor's, for DIALER) and its node's budget, under the
    names the assertions read: ``_reserved``, ``tasks_refused``, ``node.budget``."""

    def __init__(self, core: SessionProtocol, node: Any) -> None:
        self.core = core
        self._node = node

    @property
    def node(self) -> Any:
        return self._node

    @node.setter
    def node(self, node: Any) -> None:  # another peer of the same node: its budget is shared
        self._node = node
        self.core.budget = node.budget

    @property
    def _reserved(self) -> dict[int, int]:
        return self.core._reserved

    @property
    def tasks_refused(self) -> int:
        return self.core.tasks_refused


def fake_session(*, trusted: bool = True, **limit_changes: Any) -> Any:
    """A session protocol of a node with these limits, serving DIALER when ``trusted``."""
    limits = Limits(**limit_changes)
    budget = MemoryBudget(limits.memory_budget_bytes)
    core = SessionProtocol(ACCEPTOR, DIALER, limits=limits, budget=budget, may_serve=lambda: trusted)
    return AdmissionRig(core, SimpleNamespace(budget=budget))


def admit(session: Any, task_id: int, n: int) -> tuple[str, str] | None:
    verdict = session.core.admit_request(task_id, n, "stream")
    return None if verdict is None else (verdict.kind, verdict.message)


def release(session: Any, task_id: int) -> None:
    session.core.release(task_id)


def test_admit_reserves_the_operand_bytes_until_released() -> None:
    session = fake_session(memory_budget_bytes=1000)
    assert admit(session, 1, 600) is None
    assert session._reserved == {1: 600} and session.node.budget.in_use == 600
    release(session, 1)
    assert session._reserved == {} and session.node.budget.in_use == 0
    release(session, 1)  # twice is harmless
    assert session.node.budget.in_use == 0


def test_admit_refuses_a_peer_the_node_does_not_serve() -> None:
    session = fake_session(trusted=False)
    verdict = admit(session, 1, 8)
    assert verdict is not None and verdict[0] == "refused" and DIALER in verdict[1]
    assert session.node.budget.in_use == 0 and session.tasks_refused == 1


def test_admit_refuses_a_task_id_already_in_flight() -> None:
    session = fake_session()
    assert admit(session, 7, 8) is None
    assert admit(session, 7, 8) == ("bad-input", "task id 7 is already in flight")
    assert session._reserved == {7: 8} and session.node.budget.in_use == 8


def test_admit_refuses_more_tasks_than_max_inflight_with_busy() -> None:
    session = fake_session(max_inflight_tasks=2)
    assert admit(session, 1, 1) is None and admit(session, 2, 1) is None
    verdict = admit(session, 3, 1)
    assert verdict is not None and verdict[0] == "busy" and "limit 2" in verdict[1]
    release(session, 1)
    assert admit(session, 3, 1) is None


def test_admit_refuses_more_bytes_than_max_inflight_bytes_with_busy() -> None:
    session = fake_session(max_inflight_bytes=100)
    assert admit(session, 1, 60) is None
    verdict = admit(session, 2, 41)
    assert verdict is not None and verdict[0] == "busy" and "exceeds" in verdict[1]
    assert admit(session, 2, 40) is None


def test_admit_refuses_beyond_the_node_memory_budget_shared_by_all_peers() -> None:
    first, second = fake_session(memory_budget_bytes=100), fake_session(memory_budget_bytes=100)
    second.node = first.node  # two peers of one node
    assert admit(first, 1, 70) is None
    verdict = admit(second, 1, 31)
    assert verdict is not None and verdict[0] == "busy" and "memory budget" in verdict[1]
    assert admit(second, 1, 30) is None
    assert first.node.budget.in_use == 100


def test_admit_checks_in_order_trust_then_duplicate_then_count_then_bytes_then_budget() -> None:
    session = fake_session(trusted=False, max_inflight_tasks=1, memory_budget_bytes=1)
    assert admit(session, 1, 10**12)[0] == "refused"  # type: ignore[index]
    session = fake_session(max_inflight_tasks=1, max_inflight_bytes=10, memory_budget_bytes=5)
    assert admit(session, 1, 5) is None
    assert admit(session, 1, 10**12) == ("bad-input", "task id 1 is already in flight")
    assert admit(session, 2, 1)[0] == "busy"  # type: ignore[index]


# ---------------------------------------------------------------- kernels: outputs bounded before computing


def test_run_kernel_refuses_an_outer_product_over_max_elements_before_allocating() -> None:
    n = 200_000  # (n x 1) @ (1 x n): 4e10 elements, 320 GB of float64
    with pytest.raises(KernelError, match="more than 268435456 elements"):
        pangea.run_kernel("matmul", (np.ones((n, 1)), np.ones((1, n))), max_elements=1 << 28)
    with pytest.raises(KernelError, match="more than"):
        pangea.run_kernel("add", (np.ones((n, 1)), np.ones((1, n))), max_elements=1 << 28)


def test_output_nbytes_bounds_a_sum_over_an_axis_of_an_empty_array_with_huge_dimensions() -> None:
    empty = np.empty((1 << 31, 0))  # 0 elements; sum(axis=1) is 2^31 zeros = 16 GiB
    assert pangea.output_nbytes("sum", (empty,), {"axis": 1.0}) >= (1 << 31) * 8


def test_run_kernel_refuses_a_sum_whose_output_exceeds_max_elements() -> None:
    empty = np.empty((1 << 25, 0))  # sum(axis=1) would return 2^25 elements (256 MiB) from 0 input elements
    with pytest.raises(KernelError, match="more than"):
        pangea.run_kernel("sum", (empty,), {"axis": 1.0}, max_elements=1 << 20)


# ---------------------------------------------------------------- Decoder under hostile input

SMALL_PAYLOAD = 4096  # max_payload_bytes of the property tests
MAX_CHUNK = 512  # largest piece fed at once


def task_request_frame(task_id: int, n_values: int) -> bytes:
    return encode(TaskRequestMsg(task_id, "scale", (np.arange(n_values, dtype=np.float64),), {"factor": 2.0}))


def header_of(msg: Any) -> bytes:
    frame = encode(msg)
    header_len, _ = FRAME_PREFIX.unpack_from(frame)
    return frame[FRAME_PREFIX.size : FRAME_PREFIX.size + header_len]


def _frames() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [
        task_request_frame(1, 4),
        task_request_frame(2, 100),
        task_request_frame(3, SMALL_PAYLOAD // 8),  # exactly at the limit
        task_request_frame(4, SMALL_PAYLOAD // 8 + 1),  # one value over: refused from the prefix
        task_request_frame(5, 0),
        task_request_frame(6, 17),
        encode(TaskRequestMsg(9, "matmul", (rng.standard_normal((4, 4)), rng.standard_normal((4, 4))))),
        encode(TaskResultMsg(3, (np.arange(5, dtype=np.int32),))),
        encode(PingMsg(1)),
        encode(PongMsg(2)),
        encode(ByeMsg("done")),
        encode(ErrorMsg("refused", "no")),
        encode(HelloMsg("0.1.0", 1, ("matmul",), "serve", pairing_proof=b"\x01" * 32)),
        # hand-made hostile prefixes: huge payload, zero header, huge header
        FRAME_PREFIX.pack(len(header_of(PingMsg(1))), 1 << 40) + header_of(PingMsg(1)),
        FRAME_PREFIX.pack(0, 8) + bytes(8),
        FRAME_PREFIX.pack(MAX_HEADER_BYTES + 1, 0),
    ]


FRAMES = _frames()


@st.composite
def hostile_stream(draw: st.DrawFn) -> bytes:
    """Valid and hostile frames, then a few byte-level mutations."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=5))))
    for _ in range(draw(st.integers(0, 5))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=24))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 24))]
        else:
            del data[i:]
    return bytes(data)


class Admission:
    """A Decoder gate that refuses some task ids and records what it saw (every result is awaited)."""

    def __init__(self, decoder: Decoder, refuse: set[int], chunk: int) -> None:
        self.decoder = decoder
        self.refuse = refuse
        self.chunk = chunk
        self.admitted: list[int] = []
        self.refused: list[int] = []

    def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
        # Asked from the prefix and header alone: the payload is not buffered yet.
        assert payload_len <= SMALL_PAYLOAD
        assert self.decoder.buffered_bytes <= MAX_HEADER_BYTES + self.chunk
        if task_id in self.refuse:
            self.refused.append(task_id)
            return Refusal("busy", f"task {task_id} refused by the test")
        self.admitted.append(task_id)
        return None

    def awaits_result(self, task_id: int) -> bool:
        return True


class Gate:
    """A Decoder gate from a function answering ``admit_request`` (every result is awaited)."""

    def __init__(self, admit: Any) -> None:
        self.admit = admit

    def admit_request(self, task_id: int, payload_len: int) -> Refusal | None:
        verdict = self.admit(task_id, payload_len)
        return None if verdict is None else Refusal(*verdict)

    def awaits_result(self, task_id: int) -> bool:
        return True


def drive(data: bytes, sizes: list[int], refuse: set[int]) -> tuple[list[Any], Admission]:
    """Feed ``data`` in chunks of ``sizes`` (cycled) to a small-limit Decoder with admission,
    draining after each chunk; check the invariants after every call; return the events."""
    decoder = Decoder(SMALL_PAYLOAD, limits=Limits(max_payload_bytes=SMALL_PAYLOAD))
    admission = Admission(decoder, refuse, max(sizes))
    decoder.gate = admission
    bound = SMALL_PAYLOAD + MAX_HEADER_BYTES + max(sizes)
    events: list[Any] = []
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
        assert decoder.buffered_bytes <= bound
        while True:
            try:
                msg = decoder.next()
            except MessageError as exc:
                events.append(exc)
                assert decoder.buffered_bytes <= bound
                continue
            except RemoteProtocolError as exc:
                events.append(exc)
                assert decoder.buffered_bytes == 0  # a broken decoder lets go of everything
                with pytest.raises(RemoteProtocolError):
                    decoder.next()
                decoder.feed(data[pos:])
                assert decoder.buffered_bytes == 0
                return events, admission
            assert decoder.buffered_bytes <= bound
            if msg is NEED_DATA:
                break
            events.append(msg)
    return events, admission


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(hostile_stream(), st.binary(max_size=600)),
    sizes=st.lists(st.integers(1, MAX_CHUNK), min_size=1, max_size=8),
    refuse=st.sets(st.integers(0, 10), max_size=5),
)
def test_decoder_with_admission_yields_only_messages_need_data_or_protocol_errors_within_its_limits(
    data: bytes, sizes: list[int], refuse: set[int]
) -> None:
    events, admission = drive(data, sizes, refuse)
    for event in events:
        assert isinstance(event, (*MESSAGE_TYPES, ProtocolError)), repr(event)
    # A task request comes out only when admitted; a refused one comes out as its MessageError.
    requests = [e.task_id for e in events if isinstance(e, TaskRequestMsg)]
    assert set(requests) <= set(admission.admitted)
    refusals = [e for e in events if isinstance(e, MessageError) and e.kind == "busy"]
    assert [e.task_id for e in refusals] == admission.refused[: len(refusals)]
    for request in (e for e in events if isinstance(e, TaskRequestMsg)):
        for operand in request.operands:
            assert operand.nbytes <= SMALL_PAYLOAD and operand.dtype.name in ALLOWED_DTYPES


@settings(max_examples=100, deadline=None)
@given(
    frames=st.lists(st.sampled_from(FRAMES[:13]), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, MAX_CHUNK), min_size=1, max_size=8),
    refuse=st.sets(st.integers(0, 10), max_size=5),
)
def test_decoder_with_admission_skips_refused_payloads_and_keeps_decoding(
    frames: list[bytes], sizes: list[int], refuse: set[int]
) -> None:
    events, admission = drive(b"".join(frames), sizes, refuse)
    over_limit = FRAMES[3]
    expected: list[Any] = []
    for frame in frames:
        if frame == over_limit:
            expected.append("broken")
            break
        plain = Decoder()
        plain.feed(frame)
        decoded = plain.next()
        if isinstance(decoded, TaskRequestMsg) and decoded.task_id in refuse:
            expected.append(("busy", decoded.task_id))
        else:
            expected.append(type(decoded).__name__)
    got: list[Any] = []
    for event in events:
        if isinstance(event, MessageError):
            got.append((event.kind, event.task_id))
        elif isinstance(event, RemoteProtocolError):
            got.append("broken")
        else:
            got.append(type(event).__name__)
    assert got == expected


def test_decoder_skipping_a_refused_payload_holds_no_more_than_one_chunk() -> None:
    decoder = Decoder(SMALL_PAYLOAD, gate=Gate(lambda task_id, n: ("busy", "full")))
    frame = task_request_frame(1, SMALL_PAYLOAD // 8)
    header_end = len(frame) - SMALL_PAYLOAD
    decoder.feed(frame[:header_end])
    assert decoder.next() is NEED_DATA
    for start in range(header_end, len(frame), 100):
        decoder.feed(frame[start : start + 100])
        assert decoder.buffered_bytes <= 100
        if start + 100 < len(frame):
            assert decoder.next() is NEED_DATA
    with pytest.raises(MessageError) as info:
        decoder.next()
    assert (info.value.kind, info.value.task_id) == ("busy", 1)
    decoder.feed(encode(PingMsg(3)))
    assert decoder.next() == PingMsg(3)


def test_decoder_before_the_handshake_accepts_no_payload_at_all() -> None:
    """The Channel's Decoder before Hello has max_payload_bytes 0: an unauthenticated
    peer cannot make the node allocate a payload, only read up to one header."""
    decoder = Decoder(0, limits=Limits())
    decoder.feed(task_request_frame(1, 4)[: FRAME_PREFIX.size])
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 0 B"):
        decoder.next()
    assert decoder.buffered_bytes == 0
    hello = Decoder(0, limits=Limits())
    hello.feed(encode(HelloMsg("0.1.0", 1, ("matmul",), "serve")))
    assert isinstance(hello.next(), HelloMsg)


def test_decoder_huge_prefix_is_refused_before_any_allocation() -> None:
    for prefix in (FRAME_PREFIX.pack(100, 1 << 40), FRAME_PREFIX.pack(0, 0), FRAME_PREFIX.pack(0xFFFFFFFF, 0)):
        decoder = Decoder(SMALL_PAYLOAD, gate=Gate(lambda task_id, n: None))
        decoder.feed(prefix)
        with pytest.raises(RemoteProtocolError):
            decoder.next()
        assert decoder.buffered_bytes == 0


PAYLOADLESS = {
    "ping": PingMsg(1),
    "pong": PongMsg(1),
    "bye": ByeMsg("x"),
    "cancel": pangea.CancelMsg(1),
    "error": ErrorMsg("refused", "x"),
    "hello": HelloMsg("0.1.0", 1, ("matmul",), "serve"),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADLESS))
def test_decoder_refuses_a_payload_on_a_message_type_without_one_at_its_header(kind: str) -> None:
    decoder = Decoder(SMALL_PAYLOAD, gate=Gate(lambda task_id, n: None))
    decoder.feed(FRAME_PREFIX.pack(len(header_of(PAYLOADLESS[kind])), SMALL_PAYLOAD) + header_of(PAYLOADLESS[kind]))
    with pytest.raises(RemoteProtocolError, match="carries no payload"):
        decoder.next()
    assert decoder.buffered_bytes == 0


def test_decoder_payload_on_a_message_type_without_one_is_refused_with_the_payload_present() -> None:
    """The whole frame fed at once is refused the same way."""
    decoder = Decoder(SMALL_PAYLOAD, gate=Gate(lambda task_id, n: None))
    header = header_of(PingMsg(1))
    decoder.feed(FRAME_PREFIX.pack(len(header), 64) + header + bytes(64))
    with pytest.raises(RemoteProtocolError, match="ping message carries no payload"):
        decoder.next()


def test_load_schema_is_the_one_the_decoder_uses() -> None:
    # peek_header and decode_message read the same schema; a header that peeks as a
    # taskRequest decodes as one (so admission and decoding agree on the task id).
    header = header_of(TaskRequestMsg(77, "transpose", (np.ones(2),)))
    assert pangea.peek_header(header) == ("taskRequest", 77)
    with load_schema().Message.from_bytes(header) as m:
        assert m.which() == "taskRequest" and m.taskRequest.taskId == 77


# ---------------------------------------------------------------- the RPC endpoint before login (issue 13)


def _capnp_message(*segment_words: int) -> bytes:
    table = struct.pack(f"<I{len(segment_words)}I", len(segment_words) - 1, *segment_words)
    table += b"\0" * (-len(table) % 8)
    return table + b"\1" * (8 * sum(segment_words))


def test_frame_meter_declares_each_message_size_from_its_segment_table() -> None:
    one, two = _capnp_message(5), _capnp_message(1, 2, 3)
    assert pangea.CapnpFrameMeter().feed(one + two) == len(two)
    meter = pangea.CapnpFrameMeter()
    sizes = [meter.feed(bytes([b])) for b in one + two]  # one byte at a time
    assert [s for s in sizes if s] == [len(one), len(two)]
    assert sizes.index(len(one)) == 7 and sizes.index(len(two)) == len(one) + 15  # known at the table's end


def test_frame_meter_refuses_a_huge_table_from_its_first_eight_bytes() -> None:
    assert pangea.CapnpFrameMeter().feed(struct.pack("<II", 0, 0xFFFFFFFF)) == 8 + 8 * 0xFFFFFFFF
    assert pangea.CapnpFrameMeter().feed(struct.pack("<II", 0xFFFFFFFF, 0)) > 1 << 40


def test_login_limiter_doubles_the_delay_per_source_and_logs_once_per_interval() -> None:
    limiter = pangea.LoginLimiter(0.1, 5.0, forget_s=600.0, report_s=60.0, max_sources=2)
    answers = [limiter.refused("10.0.0.1", now=float(t)) for t in range(10)]
    assert [d for d, _ in answers] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0])
    assert [c for _, c in answers] == [1] + [0] * 9  # one line, not ten
    assert limiter.refused("10.0.0.2", now=10.0) == (pytest.approx(0.1), 1)  # another source starts afresh
    assert limiter.refused("10.0.0.1", now=61.0) == (5.0, 10)  # the count since the last line
    assert limiter.refused("10.0.0.1", now=61.0 + 601.0)[0] == pytest.approx(0.1)  # forgotten after a quiet while
    limiter.refused("10.0.0.3", now=700.0)  # a third source: the least recent one is forgotten
    assert limiter.refused("10.0.0.2", now=701.0) == (pytest.approx(0.1), 1)


def test_rpc_admission_evicts_the_oldest_waiting_login_and_caps_all_connections() -> None:
    admission = pangea.RpcAdmission(max_connections=4, max_pending=3, max_pending_per_source=2)
    assert admission.open("a1", "A") == (True, [])
    assert admission.open("a2", "A") == (True, [])
    assert admission.open("a3", "A") == (True, ["a1"])  # its source's oldest waiting one goes
    assert admission.open("b1", "B") == (True, [])
    assert admission.open("c1", "C") == (True, ["a2"])  # node-wide: the oldest waiting one goes
    for conn in ("a3", "b1", "c1"):
        admission.logged_in(conn)
    assert admission.open("d1", "D") == (True, [])
    admission.logged_in("d1")
    assert admission.counts() == (4, 0)
    assert admission.open("e1", "E") == (False, [])  # all 4 logged in: the new one is refused
    admission.close("d1")
    admission.close("d1")
    assert admission.open("e1", "E") == (True, [])


# ---------------------------------------------------------------- StrangerConnections


def test_stranger_connections_are_capped_per_address_and_node_wide() -> None:
    strangers = pangea.StrangerConnections(total=5, per_address=2, idle_s=10.0)
    assert strangers.opened("c1", "p1", "10.0.0.1", 0.0) is None
    assert strangers.opened("c2", "p2", "10.0.0.1", 0.0) is None
    refused = strangers.opened("c3", "p3", "10.0.0.1", 0.0)
    assert refused == "2 connections of untrusted peers from 10.0.0.1 are open"
    for i, address in enumerate(["10.0.0.2", "10.0.0.2", "10.0.0.3"]):
        assert strangers.opened(f"d{i}", f"q{i}", address, 0.0) is None
    assert strangers.opened("e", "r", "10.0.0.9", 0.0) == "5 connections of untrusted peers are open"
    assert strangers.refused == 2
    strangers.closed("c1")  # a slot comes back when one closes (or its peer got a session)
    assert strangers.opened("c3", "p3", "10.0.0.1", 1.0) is None
    strangers.closed("never-counted")  # harmless


def test_stranger_connections_idle_lists_those_open_for_idle_s_or_longer() -> None:
    strangers = pangea.StrangerConnections(total=64, per_address=8, idle_s=10.0)
    strangers.opened("old", "p1", "a", 0.0)
    strangers.opened("new", "p2", "a", 5.0)
    assert strangers.idle(9.9) == []
    assert strangers.idle(10.0) == [("old", "p1")]
    assert sorted(strangers.idle(15.0)) == [("new", "p2"), ("old", "p1")]

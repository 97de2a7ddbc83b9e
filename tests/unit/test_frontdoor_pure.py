"""Unit tests of pangea's user-facing extras that need no socket: doctor's verdict
and interface kinds, the mDNS switch, the progress switch, `respond --discover`'s
choice among what mDNS found, and the no-argument menu.

`doctor_verdict` is pure: each case is a findings dict as `cmd_doctor` builds
it (``build``, ``port``, ``port_free``, ``advertised``, ``peer``). The menu is
driven through a patched ``builtins.input``; a "terminal" is an object whose
``isatty()`` says True. Running nodes, tmux and mDNS on the wire are the job of
tests/integration/test_frontdoor.py and tests/netns/test_discovery.py.
"""

from __future__ import annotations

import argparse
import builtins
import enum
import io
import socket
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import pangea
from pangea import (
    MENU,
    Announcer,
    LiveView,
    NoPeerError,
    UsageError,
    discover_one,
    doctor_verdict,
    interface_kind,
    main,
    mdns_enabled,
    menu,
    show_progress,
)

PEER_ID = "12D3KooWGzh2Dn5bUbmZJpFjU9pPxT3VTvZ4kNzqAkS9Q1r8eF7y"
OTHER_ID = "12D3KooWRdCk2SKeikogBA5NZ1V8ThxDNFEYtotKNVEZwyPMZK65"
ADDRESS = f"/ip4/192.168.1.20/tcp/7777/p2p/{PEER_ID}"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any session directory out of the real home; no stdin; run as from source."""
    monkeypatch.setenv("PANGEA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PANGEA_MDNS", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(pangea, "build_info", lambda: None)


# ---------------------------------------------------------------- doctor_verdict


def ready_box(**changes: Any) -> dict[str, Any]:
    """Findings of a box with a LAN interface, a free port and the right interpreter."""
    findings: dict[str, Any] = {
        "python": "cpython-311 x86_64 (/usr/bin/python3)",
        "build": None,
        "interfaces": [
            {"name": "lo", "ip": "127.0.0.1", "kind": "loopback"},
            {"name": "eth0", "ip": "192.168.1.10", "kind": "lan"},
        ],
        "advertised": ["192.168.1.10", "127.0.0.1"],
        "port": 7777,
        "port_free": True,
    }
    findings.update(changes)
    return findings


def with_peer(**peer: Any) -> dict[str, Any]:
    return ready_box(peer={"address": ADDRESS, **peer})


def test_doctor_verdict_ready_box_says_start_initiate() -> None:
    ok, verdict = doctor_verdict(ready_box())
    assert ok is True
    assert verdict.startswith("this box is ready")
    assert "./pangea.pyz initiate" in verdict


def test_doctor_verdict_port_taken_names_the_port_and_port_0() -> None:
    ok, verdict = doctor_verdict(ready_box(port=7777, port_free=False))
    assert ok is False
    assert "port 7777 is taken" in verdict
    assert "--port 0" in verdict


def test_doctor_verdict_no_interface_to_advertise() -> None:
    ok, verdict = doctor_verdict(ready_box(advertised=[]))
    assert ok is False
    assert "no usable network interface" in verdict


def test_doctor_verdict_wrong_interpreter_comes_first() -> None:
    problem = (
        "this pangea.pyz was built for cpython-311 on x86_64, but this is cpython-312 on aarch64 (/usr/bin/python3)"
    )
    # A build problem wins over everything else, even a reachable peer.
    for findings in (ready_box(build=problem), with_peer(tcp=True, tcp_ms=0.3, libp2p="ok", rtt_ms=1.0)):
        findings["build"] = problem
        ok, verdict = doctor_verdict(findings)
        assert ok is False
        assert verdict.startswith("wrong interpreter: ")
        assert problem in verdict
        assert "the Python it was built for" in verdict


def test_doctor_verdict_tcp_refused_says_nothing_listens() -> None:
    ok, verdict = doctor_verdict(with_peer(tcp=False, tcp_error="Connection refused"))
    assert ok is False
    assert verdict.startswith("nothing listens at that address")
    assert "on that port" in verdict


@pytest.mark.parametrize("error", ["timed out", "No route to host", "Network is unreachable", "TimeoutError", ""])
def test_doctor_verdict_tcp_unreachable_points_at_network_and_firewall(error: str) -> None:
    ok, verdict = doctor_verdict(with_peer(tcp=False, tcp_error=error))
    assert ok is False
    assert verdict.startswith("TCP does not reach the peer")
    assert "firewall" in verdict and "LAN/VPN address" in verdict


def test_doctor_verdict_tcp_failure_without_error_text() -> None:
    ok, verdict = doctor_verdict(with_peer(tcp=False))
    assert ok is False
    assert verdict.startswith("TCP does not reach the peer")


def test_doctor_verdict_libp2p_failed_suspects_the_peer_id_port_or_psk() -> None:
    detail = "cannot reach ... within 5 s (4 attempts): SwarmDialAllFailedError"
    ok, verdict = doctor_verdict(with_peer(tcp=True, tcp_ms=0.2, libp2p="failed", detail=detail))
    assert ok is False
    assert verdict.startswith("TCP works but the libp2p handshake fails")
    assert "peer ID" in verdict and "--psk" in verdict and "port" in verdict


def test_doctor_verdict_incompatible_quotes_the_mismatch() -> None:
    detail = "pangea protocol mismatch: this node speaks protocol 1 (pangea 0.1.0), the peer speaks protocol 99"
    ok, verdict = doctor_verdict(with_peer(tcp=True, tcp_ms=0.2, libp2p="incompatible", detail=detail))
    assert ok is False
    assert verdict.startswith("version mismatch: ")
    assert detail in verdict
    assert "same pangea.pyz on both boxes" in verdict


def test_doctor_verdict_ok_with_rtt() -> None:
    ok, verdict = doctor_verdict(with_peer(tcp=True, tcp_ms=0.2, libp2p="ok", rtt_ms=1.234, detail="pangea 0.1.0"))
    assert ok is True
    assert verdict.startswith("the peer is reachable and speaks pangea")
    assert "(rtt 1.2 ms)" in verdict


def test_doctor_verdict_ok_refused_session_falls_back_to_the_tcp_time() -> None:
    # A peer that refuses the doctor's session has no ping RTT; the TCP connect time stands in.
    ok, verdict = doctor_verdict(with_peer(tcp=True, tcp_ms=0.5, libp2p="ok", handshake_ms=250.0))
    assert ok is True
    assert "reachable" in verdict and "(rtt 0.5 ms)" in verdict


def test_doctor_verdict_ok_without_any_timing_has_no_rtt() -> None:
    ok, verdict = doctor_verdict(with_peer(tcp=True, libp2p="ok"))
    assert ok is True
    assert "reachable" in verdict and "rtt" not in verdict


def test_doctor_verdict_is_one_line_in_every_case() -> None:
    cases = [
        ready_box(),
        ready_box(port_free=False),
        ready_box(advertised=[]),
        ready_box(build="built for x"),
        with_peer(tcp=False, tcp_error="Connection refused"),
        with_peer(tcp=False, tcp_error="timed out"),
        with_peer(tcp=True, libp2p="failed", detail="x"),
        with_peer(tcp=True, libp2p="incompatible", detail="x"),
        with_peer(tcp=True, libp2p="ok", rtt_ms=3.0),
    ]
    for findings in cases:
        ok, verdict = doctor_verdict(findings)
        assert isinstance(ok, bool)
        assert verdict and "\n" not in verdict, verdict


# ---------------------------------------------------------------- interface_kind


@pytest.mark.parametrize(
    ("name", "ip", "kind"),
    [
        ("lo", "127.0.0.1", "loopback"),
        ("lo", "127.0.1.1", "loopback"),
        ("docker0", "172.17.0.1", "virtual"),
        ("br-3f2a9c1d", "172.18.0.1", "virtual"),
        ("veth1a2b3c", "10.0.3.1", "virtual"),
        ("virbr0", "192.168.122.1", "virtual"),
        ("lxcbr0", "10.0.3.1", "virtual"),
        ("cni0", "10.244.0.1", "virtual"),
        ("flannel.1", "10.244.0.0", "virtual"),
        ("tun0", "10.8.0.2", "vpn"),
        ("tap0", "10.9.0.2", "vpn"),
        ("wg0", "10.66.0.2", "vpn"),
        ("tailscale0", "100.101.102.103", "vpn"),
        ("ztabcdef12", "10.147.17.5", "vpn"),
        ("utun3", "10.10.0.1", "vpn"),
        ("eth0", "169.254.10.20", "link-local"),
        ("eth0", "192.168.1.10", "lan"),
        ("enp3s0", "10.0.0.5", "lan"),
        ("wlan0", "192.168.0.42", "lan"),
        ("pg0", "10.231.7.1", "lan"),  # the netns tests' veth end: a plain LAN to pangea
    ],
)
def test_interface_kind(name: str, ip: str, kind: str) -> None:
    assert interface_kind(name, ip) == kind


def test_interface_kind_agrees_with_the_advertising_order() -> None:
    """What doctor calls virtual is advertised after the LAN, and loopback last."""
    pairs = [("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("wg0", "10.66.0.2"), ("eth0", "192.168.1.10")]
    ranked = [name for name, _ in pangea.rank_interface_addresses(pairs)]
    assert ranked == ["eth0", "wg0", "docker0", "lo"]
    assert [interface_kind(n, ip) for n, ip in pangea.rank_interface_addresses(pairs)] == [
        "lan",
        "vpn",
        "virtual",
        "loopback",
    ]


# ---------------------------------------------------------------- mdns_enabled


def initiate_args(*argv: str) -> argparse.Namespace:
    return pangea.make_parser().parse_args(["initiate", *argv])


def test_mdns_enabled_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PANGEA_MDNS", raising=False)
    assert mdns_enabled(initiate_args()) is True


def test_mdns_enabled_no_mdns_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PANGEA_MDNS", raising=False)
    assert mdns_enabled(initiate_args("--no-mdns")) is False
    monkeypatch.setenv("PANGEA_MDNS", "on")
    assert mdns_enabled(initiate_args("--no-mdns")) is False


@pytest.mark.parametrize("value", ["off", "OFF", "Off", "0", "no", "NO"])
def test_mdns_enabled_env_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PANGEA_MDNS", value)
    assert mdns_enabled(initiate_args()) is False


@pytest.mark.parametrize("value", ["on", "ON", "1", "yes"])
def test_mdns_enabled_env_on(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PANGEA_MDNS", value)
    assert mdns_enabled(initiate_args()) is True


@pytest.mark.parametrize("value", ["false", "False", "FALSE"])
def test_mdns_enabled_env_false_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PANGEA_MDNS", value)
    assert mdns_enabled(initiate_args()) is False


def test_mdns_enabled_without_a_no_mdns_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands without --no-mdns (respond, serve) follow the environment alone."""
    monkeypatch.delenv("PANGEA_MDNS", raising=False)
    assert mdns_enabled(argparse.Namespace()) is True
    monkeypatch.setenv("PANGEA_MDNS", "off")
    assert mdns_enabled(argparse.Namespace()) is False


def test_announcer_never_announces_loopback() -> None:
    announcer = Announcer(PEER_ID, [f"/ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}"])
    assert announcer.addresses == []
    assert announcer.start() is False  # nothing to announce: no zeroconf socket is opened
    announcer.close()  # safe when never started


def test_announcer_keeps_the_lan_addresses_in_order() -> None:
    lan = [f"/ip4/192.168.1.10/tcp/7777/p2p/{PEER_ID}", f"/ip4/10.66.0.2/tcp/7777/p2p/{PEER_ID}"]
    announcer = Announcer(PEER_ID, [*lan, f"/ip4/127.0.0.1/tcp/7777/p2p/{PEER_ID}"])
    assert announcer.addresses == lan


# ---------------------------------------------------------------- discover_initiators (fake zeroconf)


@dataclass
class FakeService:
    """What a fake mDNS network holds for one service name."""

    addresses: list[str]
    properties: dict[bytes, bytes | None]
    port: int = 7777

    def parsed_addresses(self) -> list[str]:
        return list(self.addresses)


def initiator_service(peer_id: str, *addresses: str, role: bytes = b"initiator") -> FakeService:
    return FakeService(list(addresses), {b"peer": peer_id.encode(), b"role": role, b"version": b"0.1.0"})


def fake_zeroconf(monkeypatch: pytest.MonkeyPatch, services: dict[str, FakeService]) -> list[str]:
    """Install a `zeroconf` module whose browser finds `services` at once; no socket is opened.

    Returns the log of calls (so a test can check the browser was closed)."""
    calls: list[str] = []

    class ServiceStateChange(enum.Enum):
        Added = 1
        Removed = 2

    class Zeroconf:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("open")

        def get_service_info(self, service_type: str, name: str, timeout: int = 3000) -> FakeService | None:
            assert service_type == pangea.MDNS_SERVICE
            return services.get(name)

        def close(self) -> None:
            calls.append("close")

    class ServiceBrowser:
        def __init__(self, zc: Zeroconf, service_type: str, handlers: list[Callable[..., None]]) -> None:
            for name in services:
                for handler in handlers:
                    handler(zeroconf=zc, service_type=service_type, name=name, state_change=ServiceStateChange.Added)

    module = types.ModuleType("zeroconf")
    module.Zeroconf = Zeroconf  # type: ignore[attr-defined]
    module.ServiceBrowser = ServiceBrowser  # type: ignore[attr-defined]
    module.ServiceStateChange = ServiceStateChange  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zeroconf", module)
    return calls


def fake_interfaces(monkeypatch: pytest.MonkeyPatch, interfaces: dict[str, tuple[str, str]]) -> None:
    """Make psutil report these IPv4 interfaces: {name: (address, netmask)}."""
    import psutil

    def net_if_addrs() -> dict[str, list[Any]]:
        return {
            name: [SimpleNamespace(family=socket.AF_INET, address=ip, netmask=mask, broadcast=None, ptp=None)]
            for name, (ip, mask) in interfaces.items()
        }

    monkeypatch.setattr(psutil, "net_if_addrs", net_if_addrs)


def svc(peer_id: str) -> str:
    return f"pangea-{peer_id[-12:]}.{pangea.MDNS_SERVICE}"


def test_discover_initiators_reads_peer_address_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_zeroconf(monkeypatch, {svc(PEER_ID): initiator_service(PEER_ID, "192.168.1.20")})
    found = pangea.discover_initiators(timeout_s=0.5)
    assert found == [{"peer": PEER_ID, "address": f"/ip4/192.168.1.20/tcp/7777/p2p/{PEER_ID}", "version": "0.1.0"}]
    assert calls == ["open", "close"]


def test_discover_initiators_ignores_what_is_not_a_pangea_initiator(monkeypatch: pytest.MonkeyPatch) -> None:
    services = {
        "serve." + pangea.MDNS_SERVICE: initiator_service(OTHER_ID, "192.168.1.21", role=b"serve"),
        "bad-id." + pangea.MDNS_SERVICE: initiator_service("not-a-peer-id", "192.168.1.22"),
        "ipv6-only." + pangea.MDNS_SERVICE: initiator_service(OTHER_ID, "fe80::1"),
        "no-props." + pangea.MDNS_SERVICE: FakeService(["192.168.1.23"], {b"peer": None, b"role": None}),
    }
    fake_zeroconf(monkeypatch, services)
    assert pangea.discover_initiators(timeout_s=0.5) == []


def test_discover_initiators_takes_the_ipv4_address(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_zeroconf(monkeypatch, {svc(PEER_ID): initiator_service(PEER_ID, "fe80::1", "192.168.1.20")})
    (item,) = pangea.discover_initiators(timeout_s=0.5)
    assert item["address"] == f"/ip4/192.168.1.20/tcp/7777/p2p/{PEER_ID}"


def test_discover_initiators_finds_two(monkeypatch: pytest.MonkeyPatch) -> None:
    services = {
        svc(PEER_ID): initiator_service(PEER_ID, "192.168.1.20"),
        svc(OTHER_ID): initiator_service(OTHER_ID, "192.168.1.21"),
    }
    fake_zeroconf(monkeypatch, services)
    found = pangea.discover_initiators(timeout_s=0.5)
    assert sorted(item["peer"] for item in found) == sorted([PEER_ID, OTHER_ID])


def test_discover_initiators_prefers_the_address_on_this_boxs_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # The initiator has ethernet on 10.232.7.0/24 and a second network 10.231.7.0/24, which
    # is the one this box is on. (Reproduced with namespaces: about half the runs of
    # `respond --discover` dialed 10.232.7.1 and failed with "cannot reach".)
    fake_zeroconf(monkeypatch, {svc(PEER_ID): initiator_service(PEER_ID, "10.232.7.1", "10.231.7.1")})
    fake_interfaces(monkeypatch, {"lo": ("127.0.0.1", "255.0.0.0"), "pg0": ("10.231.7.2", "255.255.255.0")})
    (item,) = pangea.discover_initiators(timeout_s=0.5)
    assert item["address"] == f"/ip4/10.231.7.1/tcp/7777/p2p/{PEER_ID}"


# ---------------------------------------------------------------- discover_one (respond --discover)


def found(*peer_ids: str) -> list[dict[str, Any]]:
    return [
        {"peer": p, "address": f"/ip4/192.168.1.{20 + i}/tcp/7777/p2p/{p}", "version": "0.1.0"}
        for i, p in enumerate(peer_ids)
    ]


def patch_answers(monkeypatch: pytest.MonkeyPatch, answers: Iterable[str]) -> list[str]:
    """Make input() return these answers in turn (EOFError after the last); return the prompts."""
    queue = list(answers)
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        print(prompt, end="")
        if not queue:
            raise EOFError
        answer = queue.pop(0)
        print(answer)
        return answer

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


def test_discover_one_nothing_found_is_a_no_peer_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pangea, "discover_initiators", lambda timeout_s=0: [])
    with pytest.raises(NoPeerError) as info:
        discover_one(interactive=False)
    assert "cannot find an initiator" in str(info.value)
    assert info.value.exit_code == 2
    assert info.value.hint and "paste its address" in info.value.hint


def test_discover_one_single_initiator_is_taken(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (only,) = found(PEER_ID)
    monkeypatch.setattr(pangea, "discover_initiators", lambda timeout_s=0: [only])
    assert discover_one(interactive=False) == only["address"]
    out = capsys.readouterr().out
    assert "Looking for initiators" in out and f"1) {only['address']} (pangea 0.1.0)" in out


def test_discover_one_several_without_a_terminal_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pangea, "discover_initiators", lambda timeout_s=0: found(PEER_ID, OTHER_ID))
    with pytest.raises(UsageError, match="2 initiators found"):
        discover_one(interactive=False)


def test_discover_one_several_on_a_terminal_asks_which(monkeypatch: pytest.MonkeyPatch) -> None:
    both = found(PEER_ID, OTHER_ID)
    monkeypatch.setattr(pangea, "discover_initiators", lambda timeout_s=0: both)
    prompts = patch_answers(monkeypatch, ["9", "two", "2"])
    assert discover_one(interactive=True) == both[1]["address"]
    assert prompts == ["Which one [1-2]: "] * 3


# ---------------------------------------------------------------- show_progress and a disabled LiveView


class _Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("tty", "flags", "shown"),
    [
        (True, {}, True),
        (True, {"json": True}, False),
        (True, {"quiet": True}, False),
        (False, {}, False),
        (False, {"json": True}, False),
    ],
)
def test_show_progress_only_on_a_terminal_without_json_or_quiet(
    monkeypatch: pytest.MonkeyPatch, tty: bool, flags: dict[str, bool], shown: bool
) -> None:
    monkeypatch.setattr(sys, "stdout", _Tty() if tty else io.StringIO())
    args = argparse.Namespace(json=False, quiet=False)
    for key, value in flags.items():
        setattr(args, key, value)
    assert show_progress(args) is shown


def test_show_progress_parser_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert show_progress(initiate_args()) is True
    assert show_progress(initiate_args("--quiet")) is False
    assert show_progress(initiate_args("--json")) is False
    respond = pangea.make_parser().parse_args(["respond", "--quiet"])
    assert show_progress(respond) is False


def test_live_view_disabled_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveView(False, nursery=None) as view:
        task = view.add("waiting for responders", total=10)
        assert task is None
        view.update(task, completed=5, info="x")
        view.tick(task, lambda elapsed: (elapsed, "x"))
        view.remove(task)
        assert view.block_counter() is None
    assert view.progress is None
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------- the menu


def test_menu_lists_every_command_and_quit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    patch_answers(monkeypatch, ["q"])
    assert menu() == []
    out = capsys.readouterr().out
    assert out.startswith(f"pangea {pangea.__version__}: ")
    for number, name in enumerate(["initiate", "respond", "demo", "serve", "doctor"], 1):
        assert f"  {number}) {name}" in out, out
    assert "  q) quit" in out
    assert "Choose [1-5, q]: " in out
    assert [c for c, _ in MENU] == ["initiate", "respond", "demo", "serve", "doctor"]


@pytest.mark.parametrize(
    ("answer", "argv"),
    [
        ("1", ["initiate"]),
        ("2", ["respond"]),
        ("3", ["demo"]),
        ("4", ["serve"]),
        ("5", ["doctor"]),
        ("  5  ", ["doctor"]),
        ("initiate", ["initiate"]),
        ("respond", ["respond"]),
        ("Doctor", ["doctor"]),
        ("SERVE", ["serve"]),
    ],
)
def test_menu_a_number_or_a_name_chooses_the_command(
    monkeypatch: pytest.MonkeyPatch, answer: str, argv: list[str]
) -> None:
    patch_answers(monkeypatch, [answer])
    assert menu() == argv


@pytest.mark.parametrize("answer", ["q", "Q", "quit", "exit", " q "])
def test_menu_q_quits(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    patch_answers(monkeypatch, [answer])
    assert menu() == []


def test_menu_eof_quits(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = patch_answers(monkeypatch, [])
    assert menu() == []
    assert len(prompts) == 1


def test_menu_wrong_answer_then_a_good_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = patch_answers(monkeypatch, ["7", "0", "", "-1", "status", "3"])
    assert menu() == ["demo"]
    assert len(prompts) == 6
    out = capsys.readouterr().out
    assert out.count("please type a number from 1 to 5, or q") == 5


def test_menu_wrong_answers_then_eof_quits(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_answers(monkeypatch, ["nope"])
    assert menu() == []


# ---------------------------------------------------------------- main([])


def test_main_without_arguments_and_no_terminal_prints_usage_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    called = patch_answers(monkeypatch, ["q"])
    assert not sys.stdout.isatty()  # capsys
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: pangea.pyz")
    for command in ("initiate", "respond", "demo", "serve", "status", "doctor"):
        assert command in err
    assert called == [], "no menu without a terminal"


def test_main_without_arguments_stdout_a_terminal_but_stdin_not_prints_usage(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt="": pytest.fail("the menu asked without a terminal"))
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: pangea.pyz")


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], list[str]]:
    """A function that makes stdin and (the captured) stdout say they are terminals and
    input() return the given answers; it returns the prompts list of patch_answers."""

    def answers(lines: list[str]) -> list[str]:
        # NOTE: called from the test body: capsys swaps in its own sys.stdout only for the call phase.
        monkeypatch.setattr(sys, "stdin", _Tty())
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        return patch_answers(monkeypatch, lines)

    return answers


def test_main_without_arguments_on_a_terminal_shows_the_menu_and_q_exits_0(
    terminal: Callable[[list[str]], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    terminal(["q"])
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert "1) initiate" in out and "q) quit" in out
    assert err == ""


def test_main_without_arguments_on_a_terminal_eof_exits_0(
    terminal: Callable[[list[str]], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    terminal([])
    assert main([]) == 0


def test_main_menu_choice_runs_that_command(
    terminal: Callable[[list[str]], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Choosing respond runs `respond`, which on a terminal asks for the address; a bad one
    is asked for again, and the last bad one ends in its usual one-line error, before any
    node starts."""
    prompts = terminal(["2", "not-an-address", "also-bad", "still-bad"])
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert prompts[1:] == ["Paste the initiator's join string or address: "] * 3
    assert "pangea: bad address 'not-an-address': " in out and "try again (2 more tries, Enter to stop)" in out
    lines = err.splitlines()
    assert lines[0].startswith("pangea: error: bad address 'still-bad'"), err
    assert "Traceback" not in err


# ---------------------------------------------------------------- doctor: the id to allow, a wrong peer id

THROWAWAY = "12D3KooWThrowawayDoctorProbeIdentityAAAAAAAAAAAAAAAAA"
HOME_ID = "12D3KooWHomeIdentityOfThisBoxBBBBBBBBBBBBBBBBBBBBBBBBB"
NODE_ID = "12D3KooWTheServeNodeThatRefusesCCCCCCCCCCCCCCCCCCCCCCC"


def serve_refusal(dialer: str) -> str:
    """What a dialer reads when a serve node does not trust it (cmd_serve's accept)."""
    return (
        f"cannot work with {NODE_ID}: it refused the session: peer {dialer} is not trusted by node {NODE_ID}; "
        f"start that node with --allow-peer {dialer}, or pair with the code of `serve --pair`"
    )


def test_doctor_refusal_names_this_box_id_and_never_the_throwaway_one() -> None:
    text = pangea.doctor_refusal_text(serve_refusal(THROWAWAY), THROWAWAY, HOME_ID)
    assert THROWAWAY not in text
    assert f"--allow-peer {HOME_ID}" in text and "`./pangea.pyz id`" in text
    assert "throwaway identity" in text  # and why doctor's own id is no use
    assert text.startswith("the handshake completes; it refuses doctor's session, as it should")


def test_doctor_refusal_without_a_home_identity_says_how_to_get_one() -> None:
    text = pangea.doctor_refusal_text(serve_refusal(THROWAWAY), THROWAWAY, None)
    assert THROWAWAY not in text and "--allow-peer <that id>" in text and "`./pangea.pyz id`" in text


def test_doctor_verdict_on_a_wrong_peer_id_names_the_real_one() -> None:
    detail = (
        f"cannot reach /ip4/10.0.0.2/tcp/7777/p2p/{THROWAWAY}: the node there has peer id {NODE_ID}, you asked for X"
    )
    peer = {"address": "a", "tcp": True, "tcp_ms": 1.0, "libp2p": "failed", "detail": detail, "cause": "peer-id"}
    ok, verdict = doctor_verdict({"build": None, "peer": peer})
    assert not ok
    assert verdict.startswith("TCP works but the libp2p handshake fails: the peer ID in the address is wrong: "), (
        verdict
    )
    assert f"the node there has peer id {NODE_ID}, you asked for X" in verdict, verdict

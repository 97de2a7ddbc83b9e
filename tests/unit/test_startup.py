"""Unit tests of pangea's start-up helpers: the deferred libp2p modules (the Start-up section).

`defer_unused_libp2p_modules` puts stand-ins for some libp2p modules into
sys.modules; the checks that install them run in a child interpreter, so this
test process keeps the real modules. No sockets, no timing assertions.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pangea

# Packages that only the deferred modules load; a TCP + Noise + Yamux host must not.
HEAVY = ("aioquic", "pylsqpack", "service_identity", "httpx", "requests", "rich", "dns", "trio_websocket", "zeroconf")


def run_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter with the work tree's pangea; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=pangea.__file__.rsplit("/", 1)[0],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_deferred_table_names_exist_in_the_real_modules() -> None:
    # NOTE: fails when a libp2p upgrade moves a name: check _DEFERRED_MODULES against it.
    for name, (classes, functions) in pangea._DEFERRED_MODULES.items():
        # NOTE: not importlib.import_module: a test that ran pangea.main() in this process
        # may have left stand-ins in sys.modules; _real_module replaces them.
        module = pangea._real_module(name)
        assert not isinstance(module, pangea._DeferredModule)
        for class_name in classes:
            assert inspect.isclass(getattr(module, class_name)), (name, class_name)
        for function_name in functions:
            assert inspect.isfunction(getattr(module, function_name)), (name, function_name)


def test_deferred_table_is_for_the_installed_libp2p() -> None:
    assert pangea._installed_version_is("libp2p", pangea._DEFERRED_LIBP2P_VERSION)
    assert not pangea._installed_version_is("libp2p", "0.0.0")
    assert not pangea._installed_version_is("no_such_distribution", "1.0")


def test_defer_keeps_libp2p_import_and_host_free_of_the_deferred_packages() -> None:
    out = run_child(
        f"""
        import sys
        import pangea
        assert pangea.defer_unused_libp2p_modules()
        import libp2p
        from libp2p.crypto.ed25519 import create_new_key_pair
        host = pangea.make_host(create_new_key_pair())
        # Nothing touched a stand-in while libp2p was imported and a host was made.
        stand_ins = [n for n, m in sys.modules.items() if isinstance(m, pangea._DeferredModule)]
        assert sorted(stand_ins) == sorted(pangea._DEFERRED_MODULES), stand_ins
        print(sorted(p for p in {HEAVY!r} if p in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_defer_does_nothing_after_libp2p_is_imported_or_for_another_version() -> None:
    out = run_child(
        """
        import sys
        import pangea
        print(pangea.defer_unused_libp2p_modules(version="0.0.0"))
        import libp2p
        print(pangea.defer_unused_libp2p_modules())
        print(any(isinstance(m, pangea._DeferredModule) for m in sys.modules.values()))
        """
    )
    assert out.split() == ["False", "False", "False"]


def test_deferred_stand_ins_load_the_real_modules_when_used() -> None:
    out = run_child(
        """
        import sys
        import pangea
        pangea.defer_unused_libp2p_modules()
        import libp2p
        from libp2p.relay.circuit_v2.nat import is_private_ip
        from libp2p.transport.quic.transport import QUICTransport
        from multiaddr.resolvers import DNSResolver

        resolver = DNSResolver()
        print("dns" in sys.modules, isinstance(object(), QUICTransport))
        # A stand-in function: the real one answers.
        print(is_private_ip("10.1.2.3"), is_private_ip("8.8.8.8"))
        # Every stand-in module is gone; the real ones import each other.
        print(any(isinstance(m, pangea._DeferredModule) for m in sys.modules.values()))
        import importlib
        real = importlib.import_module("libp2p.transport.quic.transport").QUICTransport
        print(QUICTransport._real() is real, QUICTransport.__name__, QUICTransport.__module__)
        # The resolver becomes a real one at first use (no query is made here).
        print(callable(resolver.resolve), type(resolver._resolver).__module__, "dns" in sys.modules)
        # `from .resolvers.dns import DNSResolver` (Multiaddr.resolve) finds the real submodule.
        from multiaddr.resolvers.dns import DNSResolver as Real
        print(Real.__module__)
        """
    )
    assert out.splitlines() == [
        "False False",
        "True False",
        "False",
        "True QUICTransport libp2p.transport.quic.transport",
        "True multiaddr.resolvers.dns True",
        "multiaddr.resolvers.dns",
    ]


def test_deferred_module_stand_in_forwards_other_names() -> None:
    # One public name of each real module that the stand-in does not hold itself.
    others = {}
    for name, (classes, functions) in pangea._DEFERRED_MODULES.items():
        real = pangea._real_module(name)
        others[name] = next(a for a in sorted(vars(real)) if not a.startswith("_") and a not in classes + functions)
    out = run_child(
        f"""
        import sys
        import pangea
        pangea.defer_unused_libp2p_modules()
        stand_ins = {{name: sys.modules[name] for name in {others!r}}}
        assert all(isinstance(m, pangea._DeferredModule) for m in stand_ins.values())
        for name, other in {others!r}.items():
            value = getattr(stand_ins[name], other)
            assert value is getattr(sys.modules[name], other), (name, other)
            assert not isinstance(sys.modules[name], pangea._DeferredModule), name
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_forget_zipapp_drops_only_the_running_archive_from_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pyz, other_zip = tmp_path / "pangea.pyz", tmp_path / "other.zip"
    pyz.write_bytes(b"")
    other_zip.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["./pangea.pyz", "respond"])
    monkeypatch.setattr(sys, "path", [str(tmp_path / "." / "pangea.pyz"), str(other_zip), str(tmp_path), ""])
    pangea.forget_zipapp_on_sys_path()
    assert sys.path == [str(other_zip), str(tmp_path), ""]


def test_forget_zipapp_keeps_sys_path_when_run_from_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [pangea.__file__])
    before = [str(Path(pangea.__file__).parent), *sys.path]
    monkeypatch.setattr(sys, "path", list(before))
    pangea.forget_zipapp_on_sys_path()
    assert sys.path == before


def test_a_huge_log_message_is_cut_to_one_bounded_line(tmp_path: Path) -> None:
    """A 16 MiB text in one log call (a client's kernel name, a peer's error) writes one short line."""
    log_file = tmp_path / "pangea.log"
    out = run_child(
        f"""
        import logging, pangea
        pangea.setup_logging(pangea.Path({str(log_file)!r}), 0, False)
        log = logging.getLogger("pangea")
        log.warning("unknown kernel %r", "k" * (16 << 20))
        log.warning("after it")
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert len(lines[0]) < pangea.LOG_MAX_RECORD_CHARS + 200
    assert lines[0].endswith(
        f"... ({len(repr('k' * (16 << 20))) + len('unknown kernel ') - pangea.LOG_MAX_RECORD_CHARS} more characters)"
    )
    assert lines[1].endswith("after it")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_run_trio_says_the_farewell_before_it_cancels(sig: str) -> None:
    """A signal: the farewell runs while the command still runs, then the command is
    cancelled (its `finally` runs) and the exit code is 128 + the signal."""
    out = run_child(
        f"""
        import os, signal, trio, pangea
        events = []
        farewell = pangea.Farewell()

        async def say():
            events.append("farewell")
            await trio.sleep(0)

        async def command():
            farewell.say = say
            await trio.sleep(0.2)  # the signal receiver starts beside the command
            try:
                os.kill(os.getpid(), signal.{sig})
                await trio.sleep(30)
            finally:
                events.append("cancelled")
            return 0

        print(pangea.run_trio(command, farewell=farewell), events)
        """
    )
    assert out.split() == [str(128 + getattr(__import__("signal"), sig)), "['farewell',", "'cancelled']"]


def test_run_trio_farewell_is_bounded_in_time() -> None:
    """A farewell that hangs holds up the exit for FAREWELL_S at most."""
    out = run_child(
        """
        import os, signal, time, trio, pangea
        farewell = pangea.Farewell()

        async def command():
            farewell.say = lambda: trio.sleep(60)
            await trio.sleep(0.2)  # the signal receiver starts beside the command
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(60)

        start = time.monotonic()
        code = pangea.run_trio(command, farewell=farewell)
        print(code, round(time.monotonic() - start))
        """
    )
    code, seconds = out.split()
    assert code == "130" and int(seconds) <= pangea.FAREWELL_S + 2, out


@pytest.mark.parametrize(
    ("bye_reason", "ending"),
    [(None, "vanished"), (pangea.INITIATOR_STOPPED, "was interrupted"), ("something else", "left")],
)
def test_responder_names_how_the_initiator_ended(bye_reason: str | None, ending: str) -> None:
    assert pangea._initiator_ending(bye_reason) == ending


def test_importing_pangea_imports_none_of_the_heavy_libraries() -> None:
    # The registry is built at import (kernel entries, their wrappers): none of it may import numpy.
    out = run_child(
        """
        import sys
        import pangea
        print(sorted(p for p in ("numpy", "capnp", "libp2p", "trio", "cryptography") if p in sys.modules))
        """
    )
    assert out.strip() == "[]"

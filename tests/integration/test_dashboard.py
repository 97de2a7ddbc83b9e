"""The dashboard of `serve --dashboard`, in a real browser, while tasks run on two workers.

Real `serve` processes from the built pyz on 127.0.0.1: a node A with the dashboard,
dialling two workers; a client thread keeps A busy (tasks on each worker, split jobs)
for a bounded number of rounds. Debian's chromium, headless and started by the test,
loads the page twice: the peers, task rows and split shares appear, and the figures
change between the two snapshots. A screenshot is kept (tests/screenshots/dashboard.png,
the README's picture, is rewritten when PANGEA_UPDATE_SCREENSHOT=1). Off loopback the
page is HTTPS and refuses a request without the RPC token.
"""

from __future__ import annotations

import hashlib
import html.parser
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_node_home, wait_until
from pyz_helpers import ServeNode, client_of, cluster, free_port, start_serve

import pangea

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # NOTE: the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # NOTE: or it dials Google's hosts, refused on this network
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_TIMEOUT_S = 60.0
LOAD_ROUNDS = 60  # the client thread's rounds at most (each a few tasks), and it stops when told
LOAD_MAX_S = 120.0


class DomTables(html.parser.HTMLParser):
    """The parts of the page's DOM the test reads: data-* rows and the figures by id."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []
        self.tasks: list[str] = []
        self.shares: list[str] = []
        self.figures: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-peer"):
            self.peers.append(str(a["data-peer"]))
        if a.get("data-task"):
            self.tasks.append(str(a["data-task"]))
        if a.get("data-share"):
            self.shares.append(str(a["data-share"]))
        self._id = a.get("id")

    def handle_data(self, data: str) -> None:
        if self._id and self._id not in self.figures:
            self.figures[self._id] = data.strip()


def browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is not installed (.ci/run installs Debian's chromium)"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000", *extra, url],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )


def page(url: str, profile: Path) -> DomTables:
    """The DOM chromium rendered after the page's script ran (a few polls of /api/snapshot)."""
    result = browse(url, profile, "--dump-dom")
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    dom = DomTables()
    dom.feed(result.stdout)
    return dom


class Load(threading.Thread):
    """Tasks on A until told to stop: a matmul on each worker, a split-remote add (bounded rounds)."""

    def __init__(self, node: ServeNode, workers: list[ServeNode], monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(name="dashboard-load", daemon=True)
        self.node, self.workers, self.monkeypatch = node, workers, monkeypatch
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = np.random.default_rng(0)
        a, x = rng.standard_normal((300, 300)), rng.standard_normal((2000, 200))
        deadline = time.monotonic() + LOAD_MAX_S
        try:
            with client_of(self.node, self.monkeypatch) as c:
                while not self.stop.is_set() and self.rounds < LOAD_ROUNDS and time.monotonic() < deadline:
                    for w in self.workers:
                        np.testing.assert_allclose(c.submit("matmul", a, a, placement=w.peer_id), a @ a)
                    np.testing.assert_array_equal(c.submit("add", x, x, placement="split-remote"), x + x)
                    self.rounds += 1
        except BaseException as exc:  # handed to the test by the assertion after join
            self.error = exc


@pytest.fixture
def busy(
    pyz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, ServeNode, list[ServeNode]]]:
    with cluster(pyz, tmp_path, "--dashboard", "127.0.0.1:0") as (node, workers):
        url = node.proc.wait_for_line(r"^Dashboard: (http://127\.0\.0\.1:\d+/)$", stream="stdout").group(1)
        load = Load(node, workers, monkeypatch)
        load.start()
        try:
            wait_until(lambda: load.rounds >= 1 or load.error is not None, LOAD_MAX_S, "a first round of tasks")
            yield url, node, workers
        finally:
            load.stop.set()
            load.join(LOAD_MAX_S)
        assert load.error is None, load.error
        assert load.rounds >= 1


def test_the_dashboard_shows_peers_tasks_and_split_shares_live_in_a_browser(
    busy: tuple[str, ServeNode, list[ServeNode]], tmp_path: Path
) -> None:
    url, node, workers = busy
    profile = tmp_path / "chromium"
    first = page(url, profile)
    time.sleep(3.0)  # tasks go on meanwhile
    second = page(url, profile)
    ids = {w.peer_id for w in workers}
    assert set(second.peers) == ids, second.peers  # both workers, one row each
    assert first.figures["peer-id"] == node.peer_id
    assert second.tasks, "no task rows"
    assert set(second.shares) <= ids and second.shares, second.shares  # a split-remote job's workers
    changed = [k for k in ("tasks-done", "bytes-in", "bytes-out", "updated") if first.figures[k] != second.figures[k]]
    assert "tasks-done" in changed and "bytes-out" in changed, (first.figures, second.figures)
    assert int(second.figures["tasks-done"]) > int(first.figures["tasks-done"]) > 0
    assert second.figures.get("error", "") == ""
    budget = pangea.format_bytes(pangea.DEFAULT_MEMORY_BUDGET_BYTES)  # in the units `call status` has
    assert second.figures["budget"].endswith(f" of {budget}"), second.figures
    queue = r"\d+ tasks?, \d+ waiting; [\d.]+ (B|KiB|MiB|GiB) of its [\d.]+ GiB quota"
    assert re.fullmatch(queue, second.figures["queue"]), second.figures

    shot = tmp_path / "dashboard.png"
    result = browse(url, profile, "--window-size=1400,1000", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
    kept = REPO / ".build" / "test-artifacts"
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept / "dashboard.png")
    if os.environ.get("PANGEA_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "tests" / "screenshots" / "dashboard.png")


def test_the_snapshot_is_the_status_the_rpc_answers(
    busy: tuple[str, ServeNode, list[ServeNode]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, node, _ = busy
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/api/snapshot")
    snap = json.loads(conn.getresponse().read())
    with client_of(node, monkeypatch) as c:
        status, peers = c.status(), c.peers()
    assert snap["node"]["peer_id"] == status["peer_id"] and snap["node"]["rpc_address"] == status["rpc_address"]
    assert snap["node"]["tasks_done"] <= status["tasks_done"]  # the same counters, read a moment earlier
    assert {p["peer_id"] for p in snap["peers"]} == {p["peer_id"] for p in peers}
    conn.request("POST", "/api/snapshot", body=b"x")
    answer = conn.getresponse()
    assert answer.status == 405 and b"only shows figures" in answer.read()
    conn.request("GET", "/nowhere")
    answer = conn.getresponse()
    assert answer.status == 404 and b"the dashboard is at /" in answer.read()
    conn.close()


def test_off_loopback_the_dashboard_is_https_and_refuses_a_request_without_the_token(pyz: Path, tmp_path: Path) -> None:
    port = free_port()
    node = start_serve(pyz, make_node_home(tmp_path, "a"), "--dashboard", f"0.0.0.0:{port}", name="serve-dash")
    try:
        line = node.proc.wait_for_line(
            r"^Dashboard: (https://0\.0\.0\.0:\d+/) \(HTTPS, certificate sha256:([0-9a-f]{64});", stream="stdout"
        )
        assert line.group(1) == f"https://0.0.0.0:{port}/"
        token = node.token
        assert token
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # pinned below by the printed fingerprint

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=30)
            conn.request("GET", path, headers=headers or {})
            answer = conn.getresponse()
            cert = conn.sock.getpeercert(binary_form=True)
            body = answer.read()
            conn.close()
            digest = hashlib.sha256(cert or b"").hexdigest()
            assert digest == line.group(2), "the dashboard's certificate is the one serve printed"
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body

        status, _, body = get("/")
        assert status == 401 and b"needs the node's RPC token" in body
        assert get("/api/snapshot", {"Authorization": "Bearer wrong"})[0] == 401
        status, headers, _ = get(f"/?token={token}")
        assert status == 303 and headers["location"] == "/" and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        status, _, body = get("/", {"Cookie": cookie})
        assert status == 200 and b"<title>pangea</title>" in body
        status, _, body = get("/api/snapshot", {"Authorization": f"Bearer {token}"})
        assert status == 200 and json.loads(body)["node"]["peer_id"] == node.peer_id
        # a real browser without the token gets the refusal, not the page
        result = browse(
            f"https://127.0.0.1:{port}/", tmp_path / "chromium", "--ignore-certificate-errors", "--dump-dom"
        )
        assert "needs the node's RPC token" in result.stdout and "tasks-done" not in result.stdout, result.stdout[-500:]
        assert node.proc.returncode is None  # refusals leave it running
    finally:
        node.proc.stop()

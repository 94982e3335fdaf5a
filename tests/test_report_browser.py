"""The report of the `dvc repro` smoke run (the session fixture `repro`), rendered
in headless Chromium as a reader would open it: every image loads, the key
numbers are in the page's text, nothing is fetched, and a full-page screenshot
is kept as a test artifact (test-artifacts/report.png).

Chromium is Debian's `chromium` package, which `make test` installs; it is
driven over the Chrome DevTools Protocol (websocket-client), with no WebDriver.
Without Chromium this test fails: it is the only check that the page renders.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dpsynth.io.shards import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "test-artifacts" / "report.png"
# no network, no profile state, no background services: a hermetic browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-port=0")
WIDTH = 1200  # CSS pixels: a laptop window


class DevTools:
    """A minimal Chrome DevTools Protocol client: one page, commands and events."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        # no Origin header: Chromium refuses DevTools connections from other origins
        self._ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]

    def send(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self._events.append(reply)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, session=True, **params)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self._events):
            assert time.monotonic() < deadline, f"no {event} within {timeout} s"
            self._events.append(json.loads(self._ws.recv()))

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def close(self) -> None:
        self._ws.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile, and a DevTools session on a new page."""
    binary = shutil.which("chromium")
    assert binary, ("chromium is not installed: `make test` installs Debian's package "
                    "(apt-get install chromium); this test needs it")
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # "<port>\n<browser ws path>"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        tools = DevTools(f"ws://127.0.0.1:{port}{path}")
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def rendered(repro: Path, browser: DevTools) -> dict[str, Any]:
    """The report of the smoke run, loaded: what the page shows, and its screenshot."""
    index = repro / "artifacts" / "report" / "index.html"
    assert index.is_file(), "dvc repro made no artifacts/report/index.html"
    browser.page("Page.enable")
    browser.page("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900,
                 deviceScaleFactor=1, mobile=False)
    browser.page("Page.navigate", url=index.as_uri())
    browser.wait_for("Page.loadEventFired")
    state = browser.evaluate("""({
        images: Array.from(document.images).map(i => ({
            alt: i.alt, complete: i.complete, width: i.naturalWidth,
            shown: i.getBoundingClientRect().width})),
        text: document.body.innerText,
        fetched: performance.getEntriesByType("resource").map(e => e.name),
        height: document.documentElement.scrollHeight})""")
    browser.page("Emulation.setDeviceMetricsOverride", width=WIDTH, height=state["height"],
                  deviceScaleFactor=1, mobile=False)
    shot = browser.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    print(f"\nreport screenshot: {SCREENSHOT}")
    return state


def test_every_image_loads_with_alt_text(rendered: dict[str, Any]) -> None:
    images = rendered["images"]
    # the per-class examples (10 classes x 4, synthetic and real) and the stages' plots
    assert len(images) >= 2 * 10 * 4 + 5
    broken = [i["alt"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(i["alt"].strip() for i in images)
    assert all(i["shown"] > 0 for i in images)  # laid out, not hidden
    assert rendered["fetched"] == []  # self-contained: nothing from disk or network


def _correlation(x: float | None) -> str:
    """How the page states a correlation: undefined when the ranking is constant
    (the barely trained smoke classifiers may all tie)."""
    return "undefined (a constant ranking)" if x is None else f"{x:+.2f}"


def test_key_numbers_appear_in_the_text(rendered: dict[str, Any], repro: Path) -> None:
    art, text = repro / "artifacts", rendered["text"]
    privacy = json.loads((art / "finetune" / "privacy.json").read_text())
    classify = json.loads((art / "classify" / "metrics.json").read_text())
    rank = json.loads((art / "rank" / "metrics.json").read_text())
    fid = json.loads((art / "fid" / "metrics.json").read_text())
    audit = json.loads((art / "audit" / "metrics.json").read_text())
    expected = [
        # the public target, not the accounted epsilon (it gives N: PRIVACY.md rule 8)
        "ε = 10.00", "δ = 1e-5", "Rényi differential privacy",
        "Poisson sampling, expected batch size B = 32", "Clipping norm C",
        f"Augmentation multiplicity K\t{privacy['aug_multiplicity']}",
        f"Steps\t{privacy['steps']}",
        # the ledger: this run and the sweep's extra point, against the smoke budget; no
        # composed ε (rule 8)
        "2 runs on record, composed within the budget (ε ≤ 100, δ = 1e-5)",
        "Test run: the DP noise was drawn from a fixed seed",  # seeded_for_test
        f"{100 * classify['real_test_accuracy']:.1f}%",
        f"{100 * classify['nonprivate_baseline_real_test_accuracy']:.1f}%",
        f"Spearman ρ = {_correlation(rank['spearman_rho'])}",
        f"Kendall τ = {_correlation(rank['kendall_tau'])}",
        f"{fid['fd_digits_cnn']:.4g}", f"{fid['precision_digits_cnn']:.3f}",
        f"is {audit['membership_epsilon_lower_bound']:.2f}",
        read_manifest(art / "prepare" / "test").content_hash,
        read_manifest(art / "sample").content_hash]
    missing = [s for s in expected if s not in text]
    assert not missing, f"not in the rendered page: {missing}"
    for section in ("Privacy guarantee", "Samples", "Fidelity", "Downstream accuracy",
                    "Model selection on synthetic data", "Training", "Empirical privacy audit",
                    "Data provenance"):
        assert section in text
    assert "Not run" not in text  # every stage ran


def test_the_page_never_states_the_private_size(rendered: dict[str, Any], repro: Path) -> None:
    art, text = repro / "artifacts", rendered["text"]
    n = read_manifest(art / "prepare" / "private").count
    privacy = json.loads((art / "finetune" / "privacy.json").read_text())
    # every number on the page, hashes (hex) left out
    numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", re.sub(r"[0-9a-f]{12,}", "", text)))
    assert str(n) not in numbers and f"{n:,}" not in numbers
    for value in (privacy["sample_rate"], privacy["noise_multiplier"]):
        # any decimal with 3+ significant digits that rounds from q or sigma
        shown = [s for s in numbers if "." in s and len(s.replace(".", "").lstrip("0")) >= 3
                 and abs(float(s.replace(",", "")) - value)
                 <= 0.5 * 10.0 ** -len(s.split(".")[1])]
        assert not shown, (value, shown)
    assert "withheld" in text

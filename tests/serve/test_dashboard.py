"""The live dashboard on the real server: admin key, JSON from the server's own metrics, and the page in a
real headless Chromium (Debian's chromium driven by playwright) with traffic flowing."""

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from adaroute.serve.dashboard import quantile, snapshot
from tests.serve.conftest import ServerProcess

KEY = "dash-admin"
CHROMIUM = "/usr/bin/chromium"
# The README's picture: ADAROUTE_DASHBOARD_SCREENSHOT=docs/img/dashboard.png pytest tests/serve/test_dashboard.py
# (by default the screenshot goes to the test's temporary folder, so tests never change tracked files).
SCREENSHOT_VARIABLE = "ADAROUTE_DASHBOARD_SCREENSHOT"


@pytest.fixture(scope="module")
def dash(tiny_routed_dir):
    s = ServerProcess(tiny_routed_dir, "--admin-key", KEY, "--max-batch", "4")
    yield s
    s.stop()


def complete(server, arm: str | None, tokens: int = 16) -> None:
    """One completion; ``arm`` None lets the server (its rollout) choose."""
    # greedy: a sampled answer may stop early, before the per-layer window has published
    body = {"model": "tiny-routed", "prompt": "def f(x):", "max_tokens": tokens, "temperature": 0} | (
        {"arm": arm} if arm else {})
    r = httpx.post(server.url + "/v1/completions", timeout=60, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == tokens, "the tiny model stopped early: choose another prompt"


def test_admin_key_guards_page_and_data(dash):
    for path in ("/dashboard", "/dashboard/data"):
        r = httpx.get(dash.url + path, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(dash.url + path, timeout=30, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(dash.url + path, timeout=30, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    page = httpx.get(dash.url + f"/dashboard?key={KEY}", timeout=30)
    assert page.status_code == 200 and "<svg" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no remote asset
    assert "https://" not in page.text


def test_data_follows_the_traffic(dash):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(dash.url + "/dashboard/data", headers=auth, timeout=30).json()
    complete(dash, "routed", tokens=40)  # the per-layer window publishes every 16 decode steps
    complete(dash, "dense")
    time.sleep(1.1)  # the next data request takes a new snapshot
    d = httpx.get(dash.url + "/dashboard/data", headers=auth, timeout=30).json()
    assert d["stage"]["name"] == "routed" and d["arms"] == ["dense", "routed"]
    for arm in ("dense", "routed"):
        assert d["requests"][arm] == before["requests"][arm] + 1
    assert len(d["layer_density"]) == 2 and all(0 < x < 1 for x in d["layer_density"])
    assert d["series"]["tokens_per_s"]["routed"][-1] > 0 and d["series"]["share"]["routed"][-1] == 0.5
    assert d["latency"]["routed"]["itl_p50"] > 0


def test_quantile_matches_prometheus_interpolation():
    reg = CollectorRegistry()
    h = Histogram("x", "x", buckets=(1.0, 2.0, 4.0), registry=reg)
    old = snapshot(reg)
    for v in (0.5, 1.5, 1.5, 3.0):
        h.observe(v)
    new = snapshot(reg)
    # 4 observations: rank 2 falls in (1, 2] holding 2 of them above 1 below -> 1 + (2 - 1) * (2 - 1) / 2
    assert quantile(0.5, new, old, "x") == pytest.approx(1.5)
    assert quantile(1.0, new, old, "x") == pytest.approx(4.0)
    assert quantile(0.5, old, old, "x") is None


@pytest.fixture(scope="module")
def canary(tiny_routed_dir, tmp_path_factory):
    """A staged rollout in the canary stage with every request shadowed: stage and agreement on the page.
    The tiny random model agrees poorly with dense, so its gates are opened wide (no rollback mid-test)."""
    gates = tmp_path_factory.mktemp("gates") / "gates.toml"
    gates.write_text("min_agreement = 0.0\nmax_kl = 1000.0\nmax_failsafe_rate = 1.0\nmax_itl_ratio = 1000.0\n")
    s = ServerProcess(tiny_routed_dir, "--admin-key", KEY, "--max-batch", "4", "--stage", "canary",
                      "--canary-fraction", "0.5", "--shadow-fraction", "1.0", "--gates", str(gates))
    yield s
    s.stop()


def test_page_renders_in_headless_chromium(canary, tmp_path):
    dash = canary
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium package (make test installs it)")
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            complete(dash, None, tokens=24)  # the canary stage sends about half to each arm

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, chromium_sandbox=False)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(dash.url + f"/dashboard?key={KEY}&refresh=500")
            page.wait_for_function("""() => ['share', 'tps', 'ttft', 'itl'].every(
                id => Number(document.getElementById(id).dataset.points) >= 5)
                && document.querySelectorAll('#density rect.bar').length === 2""", timeout=60_000)
            page.wait_for_function("document.getElementById('agreement').textContent.endsWith('%')",
                                   timeout=60_000)
            assert page.text_content("#stage") == "canary"
            assert page.locator("#tps path.series").count() == 2  # one line per arm
            assert page.text_content("#error") == ""
            shot = Path(os.environ.get(SCREENSHOT_VARIABLE) or tmp_path / "dashboard.png")
            tmp = shot.with_name(".dashboard.partial.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(tmp))
            shutil.move(tmp, shot)  # a rename: the picture is never half-written
            browser.close()
    finally:
        stop.set()
        sender.join(timeout=60)
    assert errors == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

"""The page in headless Chromium: filters, a formula column, plots, live refresh, CSV."""

import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest

from sweep.store import job_slug
from tests.helpers import ROOT, make_run, synthetic_rows
from ui.app import build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("SWEEP_TEST_ARTIFACTS", ROOT / "artifacts"))
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = make_run(root, "demo", [
        synthetic_rows("demo", "alpha-7b", "chat", [300.0, 340.0, 320.0], [200, 220, 210], params_b=7),
        synthetic_rows("demo", "alpha-7b", "chat-concise", [150.0, 170.0, 160.0], [90, 100, 95], params_b=7),
        synthetic_rows("demo", "beta-13b", "chat", [900.0, 1000.0, 950.0], [400, 420, 410], params_b=13),
        synthetic_rows("demo", "beta-13b", "chat-concise", [700.0, 720.0, 710.0], [300, 310, 305], params_b=13),
    ])
    port = _free_port()
    demo = build_app(root, refresh_s=1.0)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}", store
    demo.close()


@pytest.fixture(scope="module")
def page(app):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.goto(app[0])
        yield pg
        browser.close()


def _wait_text(page, selector, text, timeout=20000):
    """Wait until the element's visible text contains `text`."""
    page.wait_for_function("([sel, t]) => (document.querySelector(sel)?.innerText || '').includes(t)",
                           arg=[selector, text], timeout=timeout)


def _table_text(page):
    return page.locator("#leaderboard").inner_text()


def test_leaderboard_filter_formula_plot_live(app, page, tmp_path):
    url, store = app
    _wait_text(page, "#leaderboard", "beta-13b")
    text = _table_text(page)
    assert "alpha-7b" in text and "320" in text and "950" in text  # chat task by default
    # sorted by energy: alpha (320 J) before beta (950 J)
    assert text.index("alpha-7b") < text.index("beta-13b")
    # hub links for hub ids
    assert page.locator("#leaderboard a[href='https://huggingface.co/org/alpha-7b']").count() >= 1

    # change a filter: the concise task
    page.locator("#task-filter").get_by_text("chat-concise").click()
    _wait_text(page, "#leaderboard", "710")
    assert "950" not in _table_text(page)

    # a refused formula changes nothing
    page.locator("#col-name textarea, #col-name input").first.fill("evil")
    page.locator("#col-formula textarea, #col-formula input").first.fill("__import__('os').system('true')")
    page.locator("#add-col").click()
    _wait_text(page, "#col-msg", "Formula refused")
    assert "evil" not in _table_text(page)

    # a good formula adds a column: J per 100 tokens (alpha concise: 160 J / 95 tokens)
    page.locator("#col-name textarea, #col-name input").first.fill("J_per_100_tok")
    page.locator("#col-formula textarea, #col-formula input").first.fill("energy / response_length * 100")
    page.locator("#add-col").click()
    _wait_text(page, "#leaderboard", "J_per_100_tok")
    _wait_text(page, "#leaderboard", "168.421")

    # live: a sweep writes a new model while the page is open; the timer brings it in
    store.write_part(synthetic_rows("demo", "gamma-3b", "chat-concise", [50.0, 60.0], [40, 50], params_b=3),
                     job_slug("gamma-3b", "chat-concise"))
    _wait_text(page, "#leaderboard", "gamma-3b")
    text = _table_text(page)
    assert text.index("gamma-3b") < text.index("alpha-7b")  # 55 J: now first

    # plots render
    page.get_by_role("tab", name="Plots").click()
    page.locator("#scatter canvas, #scatter svg").first.wait_for(timeout=20000)
    page.locator("#pareto canvas, #pareto svg").first.wait_for(timeout=20000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-plots.png"), full_page=True)
    page.get_by_role("tab", name="Leaderboard").click()
    page.screenshot(path=str(ARTIFACTS / "ui-leaderboard.png"), full_page=True)

    # the CSV download holds the filtered table, custom column included
    with page.expect_download() as dl:
        page.locator("#download").click()
    csv = pd.read_csv(dl.value.path())
    assert set(csv["model"]) == {"alpha-7b", "beta-13b", "gamma-3b"} and set(csv["task"]) == {"chat-concise"}
    assert "J_per_100_tok" in csv.columns


def test_verbosity_and_detail_views(app, page):
    page.get_by_role("tab", name="Verbosity").click()
    _wait_text(page, "#verbosity", "alpha-7b")
    verb = page.locator("#verbosity")
    # alpha: 320 J -> 160 J under the concise prompt: 50% saved
    assert "50" in verb.inner_text()
    page.get_by_role("tab", name="Model detail").click()
    # the one per-request run is picked by default, with its first model and the chat task
    _wait_text(page, "body", "prompt number 0")
    _wait_text(page, "body", "answer 0 of alpha-7b")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-detail.png"), full_page=True)

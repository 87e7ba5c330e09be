"""The page in headless Chromium: filters, a formula column, plots, live refresh, CSV,
the verbosity numbers, model detail and compare, an empty folder and a CPU-only folder.
Screenshots go to artifacts/; page load and filter-change times and the bytes an idle
tab receives are printed (pytest -s) and written to artifacts/ui-timings.txt."""

import os
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pytest

from sweep.store import job_slug
from tests.helpers import ROOT, make_run, synthetic_rows
from ui.app import CSS, build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("SWEEP_TEST_ARTIFACTS", ROOT / "artifacts"))
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser)")]
CPU_NOTE = "no GPU energy counter (CPU run)"
TIMINGS = {}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_rows(run_id, model, task, tokens, latency):
    rows = synthetic_rows(run_id, model, task, [None] * len(tokens), tokens, gpu_name="CPU", latency=latency,
                          params_b=0.000355)
    return [{**r, "gpu_index": None, "energy_note": CPU_NOTE, "energy_above_idle_j": None, "idle_power_w": None}
            for r in rows]


def _serve(root, refresh_s):
    port = _free_port()
    demo = build_app(root, refresh_s=refresh_s)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS)
    return demo, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = make_run(root, "demo", [
        synthetic_rows("demo", "alpha-7b", "chat", [300.0, 340.0, 320.0], [200, 220, 210], params_b=7),
        synthetic_rows("demo", "alpha-7b", "chat-concise", [150.0, 170.0, 160.0], [90, 100, 95], params_b=7),
        synthetic_rows("demo", "beta-13b", "chat", [900.0, 1000.0, 950.0], [400, 420, 410], params_b=13),
        synthetic_rows("demo", "beta-13b", "chat-concise", [700.0, 720.0, 710.0], [300, 310, 305], params_b=13),
    ])
    # A CPU run beside it (sorts first by name): the page opens on the GPU with energy and
    # the model detail on the run with energy.
    make_run(root, "a-cpu", [_cpu_rows("a-cpu", "tiny", "chat", [16, 16], [0.5, 0.6])])
    demo, url = _serve(root, refresh_s=1.0)
    yield url, store
    demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()
    if TIMINGS:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k}: {v}\n" for k, v in TIMINGS.items())
        (ARTIFACTS / "ui-timings.txt").write_text(text)
        print("\n" + text)


@pytest.fixture(scope="module")
def page(app, browser):
    pg = browser.new_page(viewport={"width": 1214, "height": 1000})  # the page width
    t0 = time.perf_counter()
    pg.goto(app[0])
    _wait_text(pg, "#leaderboard", "beta-13b")
    TIMINGS["page load to leaderboard shown (s)"] = round(time.perf_counter() - t0, 2)
    yield pg
    pg.close()


def _wait_text(page, selector, text, timeout=20000):
    """Wait until the element's visible text contains `text`."""
    page.wait_for_function("([sel, t]) => (document.querySelector(sel)?.innerText || '').includes(t)",
                           arg=[selector, text], timeout=timeout)


def _text(page, selector):
    return page.locator(selector).inner_text()


def _shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _drawn(page, elem_id, timeout=20000):
    page.locator(f"#{elem_id} canvas, #{elem_id} svg.marks").first.wait_for(timeout=timeout)


def _tick(page, group, name, on):
    """Tick (or untick) one box of a checkbox group, then let the page take it in."""
    box = page.locator(f"{group} label", has_text=name).locator("input")
    box.check() if on else box.uncheck()
    page.wait_for_timeout(400)


def _numbers_on_one_line(page, selector):
    """Every cell holding a number is one line high: nothing wraps mid-digit."""
    broken = page.evaluate("""(sel) => [...document.querySelectorAll(sel + ' td')].filter(td => {
        const t = td.innerText.trim();
        if (!/^[-+]?[0-9][0-9., –%]*$/.test(t)) return false;
        const h = parseFloat(getComputedStyle(td).lineHeight) || 20;
        const span = td.querySelector('span, div') || td;
        return span.getClientRects().length > 1 || span.getBoundingClientRect().height > 1.8 * h;
    }).map(td => td.innerText)""", selector)
    assert not broken, broken


def test_leaderboard_filter_formula_plot_live(app, page):
    url, store = app
    text = _text(page, "#leaderboard")
    assert "alpha-7b" in text and "320" in text and "950" in text  # chat task by default
    # one GPU by default (the one with energy): the CPU run's model is not ranked with them
    assert "tiny" not in text and page.locator("#gpus-filter input:checked").count() == 1
    assert text.index("alpha-7b") < text.index("beta-13b")  # sorted by energy: 320 J before 950 J
    assert "Ranked by energy (J), lowest first" in page.locator("#leaderboard").inner_text()
    assert "7B" in text and "13B" in text  # parameters with their unit
    assert page.locator("#leaderboard a[href='https://huggingface.co/org/alpha-7b']").count() >= 1
    # the page never scrolls sideways (a wide table scrolls inside itself), and no number breaks
    assert page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    _numbers_on_one_line(page, "#leaderboard")

    # tick a second GPU: its rows join, and the notice says why they have no energy
    t0 = time.perf_counter()
    page.locator("#gpus-filter").get_by_text("CPU").click()
    _wait_text(page, "#leaderboard", "tiny")
    TIMINGS["filter change (GPU) to table updated (s)"] = round(time.perf_counter() - t0, 2)
    _wait_text(page, "#energy-notice", CPU_NOTE)
    page.locator("#gpus-filter").get_by_text("CPU").click()
    page.wait_for_function("() => !(document.querySelector('#leaderboard')?.innerText || '').includes('tiny')")

    # change a filter: the concise task
    t0 = time.perf_counter()
    page.locator("#task-filter").get_by_text("chat-concise").click()
    _wait_text(page, "#leaderboard", "710")
    TIMINGS["filter change (task) to table updated (s)"] = round(time.perf_counter() - t0, 2)
    assert "950" not in _text(page, "#leaderboard")

    # a refused formula changes nothing
    page.locator("#col-name textarea, #col-name input").first.fill("evil")
    page.locator("#col-formula textarea, #col-formula input").first.fill("__import__('os').system('true')")
    page.locator("#add-col").click()
    _wait_text(page, "#col-msg", "Formula refused")
    assert "evil" not in _text(page, "#leaderboard")

    # a good formula adds a column: J per 100 tokens (alpha concise: 160 J / 95 tokens)
    page.locator("#col-name textarea, #col-name input").first.fill("J_per_100_tok")
    page.locator("#col-formula textarea, #col-formula input").first.fill("energy / response_length * 100")
    page.locator("#add-col").click()
    _wait_text(page, "#leaderboard", "J_per_100_tok")
    _wait_text(page, "#leaderboard", "168.4")

    # live: a sweep writes a new model while the page is open; the timer brings it in
    store.write_part(synthetic_rows("demo", "gamma-3b", "chat-concise", [50.0, 60.0], [40, 50], params_b=3),
                     job_slug("gamma-3b", "chat-concise"))
    _wait_text(page, "#leaderboard", "gamma-3b")
    text = _text(page, "#leaderboard")
    assert text.index("gamma-3b") < text.index("alpha-7b")  # 55 J: now first
    # a filter change and the timer's refresh together raised no error (e.g. a limit slider's
    # old value beyond the range the new view gave it)
    assert "Error" not in page.locator("body").inner_text()
    _shot(page, "ui-leaderboard.png")

    # plots render, coloured by GPU, with a log scale on request
    page.get_by_role("tab", name="Plots").click()
    _drawn(page, "scatter")
    _drawn(page, "pareto")
    page.locator("#log input").check()
    _drawn(page, "scatter")
    # each chart has a text alternative with its figures; the page has headings to move by
    said = page.locator("#pareto [role=graphics-document]").get_attribute("aria-label")
    assert said.startswith("Latency against energy per response") and "gamma-3b on H200" in said, said
    headings = page.locator("h2, h3").all_inner_texts()
    assert {"Leaderboard", "Plots", "Time against energy"} <= {h.strip() for h in headings}, headings
    _shot(page, "ui-plots.png")
    page.get_by_role("tab", name="Leaderboard").click()

    # the CSV download holds the filtered table, custom column included
    with page.expect_download() as dl:
        page.locator("#download").click()
    csv = pd.read_csv(dl.value.path())
    assert set(csv["model"]) == {"alpha-7b", "beta-13b", "gamma-3b"} and set(csv["task"]) == {"chat-concise"}
    assert "J_per_100_tok" in csv.columns


def test_an_idle_tab_receives_next_to_nothing(app, page):
    """Nothing changes in the folder: the timer (every 1 s here) sends no view again."""
    page.wait_for_timeout(2500)  # let the last change settle
    cdp = page.context.new_cdp_session(page)
    received = []
    cdp.on("Network.dataReceived", lambda e: received.append(e["dataLength"]))
    cdp.send("Network.enable")
    window = 6.0
    page.wait_for_timeout(window * 1000)
    cdp.send("Network.disable")
    per_tick = sum(received) / window
    TIMINGS["idle tab, bytes received per refresh tick"] = round(per_tick)
    TIMINGS["idle tab, bytes received per 30 s at the default 5 s refresh"] = round(per_tick * 6)
    assert received, "the timer did not tick"
    assert per_tick < 2000, received  # a full table and charts are tens of KB


def test_verbosity_numbers_match_a_hand_computation(page):
    page.get_by_role("tab", name="Verbosity").click()
    _wait_text(page, "#verbosity", "alpha-7b")
    _wait_text(page, "#verbosity", "beta-13b")
    # the table as the page shows it, read cell by cell
    headers = [h.strip() for h in page.locator("#verbosity [role=columnheader]").all_inner_texts()]
    body = [[c.strip() for c in row.locator("[role=gridcell]").all_inner_texts()]
            for row in page.locator("#verbosity [role=row]").all()]
    rows = {r[headers.index("model")]: r for r in body if len(r) == len(headers) and any(r)}
    assert "alpha-7b" in rows, (headers, body)
    energy, length = headers.index("energy saved %"), headers.index("length saved %")
    # by hand: alpha 320 J -> 160 J, 210 -> 95 tokens; beta 950 J -> 710 J, 410 -> 305 tokens
    assert float(rows["alpha-7b"][energy]) == round(100 * (1 - 160 / 320), 1) == 50.0
    assert float(rows["beta-13b"][energy]) == round(100 * (1 - 710 / 950), 1) == 25.3
    assert float(rows["alpha-7b"][length]) == round(100 * (1 - 95 / 210), 1) == 54.8
    assert float(rows["beta-13b"][length]) == round(100 * (1 - 305 / 410), 1) == 25.6
    _drawn(page, "verb-plot")
    _shot(page, "ui-verbosity.png")


def test_detail_opens_on_energy_and_follows_the_run(page):
    page.get_by_role("tab", name="Model detail").click()
    # the run with energy is picked by default, with its first model and the chat task
    _wait_text(page, "#detail-summary", "alpha-7b / chat")
    _wait_text(page, "#detail-summary", "energy 320.0 J")
    _wait_text(page, "body", "answer 0 of alpha-7b")
    _drawn(page, "detail-energy")
    # to the CPU run: no energy, and why
    page.locator("#detail-run input").click()
    page.get_by_role("option", name="a-cpu").click()
    _wait_text(page, "#detail-summary", "energy not measured")
    _wait_text(page, "#detail-energy-note", CPU_NOTE)
    # and back: the energy histogram is drawn again at once
    page.locator("#detail-run input").click()
    page.get_by_role("option", name="demo").click()
    _wait_text(page, "#detail-summary", "energy 320.0 J")
    _drawn(page, "detail-energy")
    _shot(page, "ui-detail.png")


def test_a_row_click_opens_that_models_detail_and_compare(page):
    page.get_by_role("tab", name="Leaderboard").click()
    page.locator("#task-filter").get_by_text("chat", exact=True).click()
    _wait_text(page, "#leaderboard", "950")
    page.locator("#leaderboard [role=gridcell]").get_by_text("950", exact=True).first.click()  # beta-13b's energy
    _wait_text(page, "#detail-summary", "beta-13b / chat")
    page.get_by_role("tab", name="Compare").click()
    _drawn(page, "compare-energy")
    _wait_text(page, "#compare-table", "beta-13b")
    assert "alpha-7b" in _text(page, "#compare-table")
    _shot(page, "ui-compare.png")
    page.get_by_role("tab", name="Under limits").click()
    _wait_text(page, "#limits-table", "alpha-7b")
    page.get_by_role("tab", name="About").click()
    _wait_text(page, "#about-runs", "demo")
    assert "batch size 1" in page.locator("body").inner_text()


def test_an_empty_folder_says_how_to_make_a_run(tmp_path, browser):
    demo, url = _serve(tmp_path, refresh_s=1.0)
    try:
        pg = browser.new_page(viewport={"width": 1214, "height": 900})
        pg.goto(url)
        _wait_text(pg, "#live-status", "No runs yet")
        pg.wait_for_timeout(2500)  # a few refreshes: still no error anywhere
        assert "Error" not in pg.locator("body").inner_text()
        _shot(pg, "ui-empty.png")
        pg.close()
    finally:
        demo.close()


def test_a_cpu_only_folder_says_why_energy_is_empty(tmp_path, browser):
    make_run(tmp_path, "cpu", [_cpu_rows("cpu", "tiny", "chat", [16, 14], [0.4, 0.5]),
                               _cpu_rows("cpu", "tiny", "chat-concise", [8, 6], [0.2, 0.3]),
                               _cpu_rows("cpu", "small", "chat", [16, 16], [0.2, 0.2]),
                               _cpu_rows("cpu", "small", "chat-concise", [12, 12], [0.2, 0.2])])
    demo, url = _serve(tmp_path, refresh_s=60)
    try:
        pg = browser.new_page(viewport={"width": 1214, "height": 900})
        pg.goto(url)
        _wait_text(pg, "#energy-notice", CPU_NOTE)
        assert "Ranked by latency (s), lowest first" in _text(pg, "#leaderboard")
        text = _text(pg, "#leaderboard")
        assert text.index("small") < text.index("tiny") and "0.4M" in text and "energy (J)" in text
        _shot(pg, "ui-cpu-only.png")
        pg.get_by_role("tab", name="Plots").click()
        _wait_text(pg, "#pareto-note", "needs energy")
        pg.get_by_role("tab", name="Verbosity").click()
        _wait_text(pg, "#verb-note", "needs energy")
        pg.locator("#verb-measure").get_by_text("length saved %").click()
        _drawn(pg, "verb-plot")
        # tiny: 15 -> 7 tokens
        _wait_text(pg, "#verbosity", str(round(100 * (1 - 7 / 15), 1)))
        pg.get_by_role("tab", name="Model detail").click()
        _wait_text(pg, "#detail-energy-note", CPU_NOTE)
        pg.close()
    finally:
        demo.close()


def test_limits_a_user_set_survive_new_rows(tmp_path, browser):
    """A live sweep brings rows (and a larger maximum) while the Under limits tab is open:
    the budget the user set stays, and the new model is judged by it."""
    store = make_run(tmp_path, "live", [
        synthetic_rows("live", "alpha-7b", "chat", [300.0, 340.0, 320.0], [200, 220, 210], params_b=7),
        synthetic_rows("live", "beta-13b", "chat", [900.0, 1000.0, 950.0], [400, 420, 410], params_b=13),
    ])
    demo, url = _serve(tmp_path, refresh_s=1.0)
    pg = browser.new_page(viewport={"width": 1214, "height": 1000})
    try:
        pg.goto(url)
        _wait_text(pg, "#leaderboard", "beta-13b")
        pg.get_by_role("tab", name="Under limits").click()
        _wait_text(pg, "#limits-table", "beta-13b")
        box = pg.locator("#budget input[type=number]")
        box.fill("500")
        box.press("Enter")
        box.blur()
        _wait_text(pg, "#limits-note", "Not within them: beta-13b")
        store.write_part(synthetic_rows("live", "gamma-70b", "chat", [1500.0, 1600.0], [500, 520], params_b=70),
                         job_slug("gamma-70b", "chat"))
        _wait_text(pg, "#leaderboard", "gamma-70b")
        _wait_text(pg, "#limits-note", "gamma-70b")
        note = pg.locator("#limits-note [data-testid=markdown]").inner_text()  # the text, not a progress line over it
        assert note.startswith("1 model(s) within the limits") and "beta-13b, gamma-70b" in note, note
        assert float(box.input_value()) == 500
        _shot(pg, "ui-limits-live.png")
        time.sleep(2.5)  # two more refreshes with nothing new: still as set
        assert float(box.input_value()) == 500 and "beta-13b" in _text(pg, "#limits-note")
    finally:
        pg.close()
        demo.close()


@pytest.fixture(scope="module")
def with_2023(tmp_path_factory):
    """A fresh H200 run beside the imported 2023 results (whose A40 has the most rows)."""
    from sweep.report import AGGREGATES_FILE

    root = tmp_path_factory.mktemp("runs-2023")
    imported = root / "mlenergy-2023"
    imported.mkdir()
    models = [f"org/m{i}" for i in range(8)]
    pd.DataFrame({"model": models, "gpu": "A40", "task": "chat", "backend": "fastchat", "run_id": "mlenergy-2023",
                  "model_path": models, "energy": [1000.0 + 10 * i for i in range(8)], "throughput": 20.0,
                  "response_length": 250.0, "latency": 12.0, "energy_per_token": 4.0,
                  "parameters": 7.0}).to_parquet(imported / AGGREGATES_FILE)
    (imported / "manifest.json").write_text('{"run_id": "mlenergy-2023", "kind": "aggregate-only", "gpus": ["A40"]}')
    store = make_run(root, "fresh", [
        synthetic_rows("fresh", "ours-1b", "chat", [40.0, 44.0, 42.0], [256, 256, 256], latency=[0.3, 0.3, 0.3]),
        synthetic_rows("fresh", "ours-7b", "chat", [200.0, 210.0, 205.0], [256, 256, 256], latency=[1.2, 1.3, 1.25])])
    manifest = store.manifest_path.read_text().replace('"kind"', '"started_at": "2026-12-06T10:00:00+0000", "kind"')
    store.manifest_path.write_text(manifest)
    demo, url = _serve(root, refresh_s=60)
    yield url
    demo.close()


@pytest.mark.parametrize("viewport", [(1400, 1000), (390, 844)])
def test_the_first_view_a_2023_row_and_a_fresh_row_and_the_limits(with_2023, browser, viewport):
    """Items 1, 2, 3 and 7 of the UI issue, on a desktop and a phone: the page opens on the
    newest run of one's own; a click on a 2023 row says why there is no detail, one on a
    fresh row opens it; a deadline set by typing, by the keyboard and by a drag applies at
    once; no number breaks, and the page does not scroll sideways."""
    w, h = viewport
    pg = browser.new_page(viewport={"width": w, "height": h})
    try:
        pg.goto(with_2023)
        _wait_text(pg, "#leaderboard", "ours-1b")  # the fresh run's GPU, not the 2023 A40
        assert "org/m0" not in _text(pg, "#leaderboard")
        assert pg.locator("#gpus-filter input:checked").count() == 1
        _numbers_on_one_line(pg, "#leaderboard")
        assert pg.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1")
        _shot(pg, f"ui-first-view-{w}.png")
        # a fresh row opens its detail
        pg.locator("#leaderboard [role=gridcell]").get_by_text("42", exact=True).first.click()
        _wait_text(pg, "#detail-summary", "ours-1b / chat")
        # a 2023 row says why there is nothing to show (and nothing fails)
        pg.get_by_role("tab", name="Leaderboard").click()
        _tick(pg, "#gpus-filter", "A40", True)
        _tick(pg, "#gpus-filter", "H200", False)
        _wait_text(pg, "#leaderboard", "org/m0")
        pg.locator("#leaderboard [role=gridcell]").get_by_text("1000", exact=True).first.click()
        _wait_text(pg, "#detail-summary", "no run in this folder holds its per-request rows")
        # the limits follow their controls at once; the GPU filter applies (no 2023 row here)
        pg.get_by_role("tab", name="Leaderboard").click()
        _tick(pg, "#gpus-filter", "H200", True)
        _tick(pg, "#gpus-filter", "A40", False)
        pg.wait_for_function("() => !document.querySelector('#leaderboard').innerText.includes('org/m0')")
        pg.get_by_role("tab", name="Under limits").click()
        _wait_text(pg, "#limits-table", "ours-7b")
        assert "org/m" not in _text(pg, "#limits-table")
        box = pg.locator("#deadline input[type=number]")
        box.fill("1")
        box.press("Enter")  # typed, no blur
        _wait_text(pg, "#limits-note", "Not within them: ours-7b")
        box.fill("1.3")
        box.press("Enter")
        _wait_text(pg, "#limits-note", "2 model(s) within")  # both within 1.3 s
        slider = pg.locator("#deadline input[type=range]")
        slider.focus()
        for _ in range(200):
            pg.keyboard.press("ArrowLeft")  # down to the minimum, by the keyboard
        _wait_text(pg, "#limits-note", "Not within them: ours-1b, ours-7b")
        bbox = slider.bounding_box()
        pg.mouse.move(bbox["x"] + 2, bbox["y"] + bbox["height"] / 2)
        pg.mouse.down()
        pg.mouse.move(bbox["x"] + bbox["width"] - 2, bbox["y"] + bbox["height"] / 2, steps=5)
        pg.mouse.up()  # dragged to the maximum
        _wait_text(pg, "#limits-note", "2 model(s) within")
        _numbers_on_one_line(pg, "#limits-table")
        _shot(pg, f"ui-limits-{w}.png")
    finally:
        pg.close()


def test_the_timer_sends_no_slider_value(tmp_path):
    """Gradio refuses an event whose slider value lies outside the slider's range. A filter
    change gives the limit sliders a new range while the page may still hold the old values,
    so the timer, which can fire in between, takes the limits from server-side state."""
    import gradio as gr

    from ui.app import _layout
    from ui.data import RunsFolder

    with gr.Blocks():
        page = _layout(RunsFolder(tmp_path), tmp_path)
    assert not any(isinstance(c, gr.Slider) for c in page.refresh_inputs())
    assert not any(isinstance(c, gr.Slider) for c in page.view_inputs())


def test_a_control_used_while_its_last_event_runs_is_not_dropped(tmp_path):
    """Gradio's default for input events ignores a use while the previous one is pending:
    a second filter click in quick succession would be lost."""
    demo = build_app(tmp_path)
    modes = {fn.trigger_mode for fn in demo.fns.values() if any(kind == "input" for _, kind in fn.targets)}
    assert modes == {"always_last"}

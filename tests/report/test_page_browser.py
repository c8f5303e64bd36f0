"""report.html in a real browser (headless Chromium through Playwright), opened from file:// with every
other request aborted: the table sorts and filters, the plot shows a run's details on hover, the token
explorer shows a token's experts and p-values, a ``<script>`` in the dataset's text stays text, every
figure loads, and nothing logs an error or reaches for the network."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from routelab.catalogue import REPORT_FIGURES as FIGURES
from routelab.report.aggregate import collect_coactivation, collect_expert_counts, collect_runs, collect_scores
from routelab.report.build import ReportOptions, write_report
from routelab.report.explorer import collect_explorer
from tests.support.report_runs import fake_decode, write_explorer_logs, write_plot_index, write_runs

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if path and Path(path).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium); "
                                "the browser tests drive it through Playwright without downloading one")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "results" / "exp"
    run_dirs = write_runs(root)
    write_explorer_logs(run_dirs)
    write_plot_index(root / "plots")
    explorer = collect_explorer(run_dirs, documents=2, decode=fake_decode)
    return write_report(collect_runs(run_dirs), root / "report", "exp", "topk8", root / "plots",
                        scores=collect_scores(run_dirs), expert_counts=collect_expert_counts(run_dirs),
                        coactivation=collect_coactivation(run_dirs), options=ReportOptions(repetitions=100),
                        analyses={"explorer": explorer})


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, report):
    """The report opened from file:// with the network off; on teardown: no console error, no page
    error, no dialog (an executed alert) and no request other than file://."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    attempted, errors = [], []

    def only_files(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            attempted.append(route.request.url)
            route.abort()

    context.route("**/*", only_files)
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    yield page
    context.close()
    assert errors == [], errors
    assert attempted == [], f"requests other than file:// were attempted: {attempted}"


def column(page, name: str, visible_only: bool = True) -> list[str]:
    """The text of the comparison table's column ``name``, in the order shown."""
    return page.evaluate("""([name, visibleOnly]) => {
        const table = document.querySelector("table.comparison");
        const index = [...table.tHead.rows[0].cells].findIndex((th) => th.textContent.trim() === name);
        return [...table.tBodies[0].rows].filter((row) => !visibleOnly || !row.hidden)
            .map((row) => row.cells[index].textContent.trim());
    }""", [name, visible_only])


def test_every_section_is_there_and_every_figure_loads(page):
    ids = set(page.eval_on_selector_all("h2[id]", "nodes => nodes.map(n => n.id)"))
    assert ids == {"methods", "comparison", "quality-vs-cost", "explorer", "per-run-figures",
                   *(figure.anchor for figure in FIGURES)}
    images = page.eval_on_selector_all("img", "nodes => nodes.map(n => [n.getAttribute('src'), n.naturalWidth])")
    assert len(images) >= 10 and all(width > 0 for _, width in images), images


def test_table_sorts_on_click_numbers_by_value(page):
    # experts mean of the fake runs (report_runs.summary): topk8 8, bh_a0.05_k8 3.1, bh_a0.2_k4 2.6
    page.select_option("#table-dataset", "wiki")
    assert column(page, "routing") == ["bh_a0.05_k8", "bh_a0.2_k4", "topk8"]  # as written: method, routing
    page.click("table.comparison th:text-is('experts')")
    assert column(page, "routing") == ["bh_a0.2_k4", "bh_a0.05_k8", "topk8"]
    assert [float(text.split(" ")[0]) for text in column(page, "experts")] == [2.6, 3.1, 8.0]
    page.click("table.comparison th:text-is('experts')")
    assert column(page, "routing") == ["topk8", "bh_a0.05_k8", "bh_a0.2_k4"]
    assert page.get_attribute("table.comparison th:text-is('experts')", "aria-sort") == "descending"
    # "quality [CI]" sorts by its leading number: perplexity 3.0, 3.1, 3.2 for the 0th, 1st, 2nd routing
    page.click("table.comparison th:text-is('quality [CI]')")
    assert column(page, "routing") == ["topk8", "bh_a0.05_k8", "bh_a0.2_k4"]
    assert [text.split(" ")[0] for text in column(page, "quality [CI]")] == ["3", "3.1", "3.2"]


def test_filter_box_and_dataset_selector_hide_rows(page):
    assert len(column(page, "routing")) == 6
    page.fill("#table-filter", "bh_a0.2")
    assert column(page, "routing") == ["bh_a0.2_k4", "bh_a0.2_k4"]
    page.select_option("#table-dataset", "lambada")
    assert column(page, "routing") == ["bh_a0.2_k4"] and column(page, "dataset") == ["lambada"]
    assert page.inner_text("#table-count") == "1 of 6 runs"
    page.fill("#table-filter", "")
    assert sorted(column(page, "routing")) == ["bh_a0.05_k8", "bh_a0.2_k4", "topk8"]


def test_plot_shows_a_configurations_details_on_hover(page):
    page.select_option("#plot-dataset", "wiki")
    assert page.locator("#cost-plot circle.point").count() == 3
    assert page.locator("#plot-tooltip").is_hidden()
    page.hover("#cost-plot circle.point[data-routing='bh_a0.2_k4']")
    tooltip = page.inner_text("#plot-tooltip")
    # experts mean 2.6 (layers 2.8 and 2.4), FLOPs 1000 per expert: 2600 against the baseline's 8000;
    # perplexity 3.2 (metrics.json), its CI exp(1.1) = 3.004 at both ends (every document loses 0.1 nats)
    for expected in ("bh_a0.2_k4 · wiki", "method: bh", "alpha=0.2, min_k=2, max_k=4", "perplexity (↓): 3.2 "
                     "[3.004, 3.004]", "experts per token and layer: 2.6", "active expert FLOPs per token: 2600",
                     "FLOPs vs baseline (topk8): 0.325"):
        assert expected in tooltip, (expected, tooltip)
    page.mouse.move(5, 5)
    assert page.locator("#plot-tooltip").is_hidden()


def choose_run(page, label: str) -> None:
    page.select_option("#explorer-run", label=label)
    page.wait_for_function("() => document.querySelectorAll('#explorer-text .tok').length > 0 && "
                           "!document.getElementById('explorer-status').textContent.startsWith('loading')")


def layer_rows(page) -> list[list[str]]:
    return page.eval_on_selector_all("#explorer-detail tr.layer-row",
                                     "rows => rows.map(r => [...r.cells].map(c => c.textContent))")


def test_explorer_shows_a_tokens_experts_and_its_pvalues_against_the_bh_line(page):
    choose_run(page, "bh_a0.05_k8 · wiki")
    page.hover("#explorer-text .tok[data-token='0']")
    # token 0: layer 0 expert 0 (weight 1), layer 1 experts 0 and 1 (weights 1/2), BH ranks 1 and 2
    assert layer_rows(page) == [["0", "1", "0 (1)", "1"], ["1", "2", "0 (0.5), 1 (0.5)", "2"]]
    page.click("#explorer-text .tok[data-token='1']")  # pinned: moving over another token keeps it
    page.hover("#explorer-text .tok[data-token='2']")
    assert layer_rows(page)[1] == ["1", "1", "1 (1)", "1"]
    page.click("#explorer-detail tr.layer-row[data-layer='1']")
    plot = page.locator("#explorer-detail .bh-plot")
    assert plot.locator("circle.pv").count() == 4 and plot.locator("circle.pv.selected").count() == 1
    assert plot.locator("path.bh-line").count() == 1
    # layer 1 of token 1: p = [0.3, 0.004, 0.6, 0.2] by expert, expert 1 selected
    assert "Smallest p-values (expert: p): 1: 0.004 ✓, 3: 0.2, 0: 0.3, 2: 0.6" in plot.inner_text()
    titles = plot.locator("circle.pv.selected title").all_text_contents()
    assert titles == ["expert 1: p = 0.004, threshold 0.0125 (selected)"]


def test_explorer_without_pvalues_and_shading_by_layer(page):
    choose_run(page, "topk8 · wiki")
    page.hover("#explorer-text .tok[data-token='2']")
    assert layer_rows(page) == [["0", "1", "2 (1)"], ["1", "3", "0 (0.333), 1 (0.333), 3 (0.333)"]]
    assert page.locator("#explorer-detail .bh-plot").count() == 0
    # summed over layers the tokens use 3, 3 and 4 experts; in layer 1: 2, 2 and 3
    shades = "els => els.map(e => e.style.backgroundColor)"
    summed = page.eval_on_selector_all("#explorer-text .tok", shades)
    assert summed[0] == summed[1] != summed[2]
    page.select_option("#explorer-shade", label="experts in layer 0")
    assert len(set(page.eval_on_selector_all("#explorer-text .tok", shades))) == 1  # one expert everywhere


def test_script_in_the_dataset_shows_as_text_and_does_not_run(page):
    choose_run(page, "bh_a0.2_k4 · lambada")
    assert page.inner_text("#explorer-text") == "<script>alert(1)</script>"
    assert page.locator("#explorer-text script").count() == 0
    # the only scripts: the embedded data, the page's code and the explorer runs loaded so far
    assert page.evaluate("document.scripts.length - Object.keys(window.routelabExplorer).length") == 2
    page.select_option("#explorer-doc", "1")
    assert page.inner_text("#explorer-text") == "<script>alert(1)</script>"


def test_the_page_and_its_figures_are_not_blank(page, tmp_path):
    from matplotlib import image as mpimg

    top, figure = tmp_path / "top.png", tmp_path / "figure.png"
    page.screenshot(path=str(top))  # the viewport only: a full-page shot of the figures takes ~30 s on 2 cores
    page.locator("figure img").first.screenshot(path=str(figure))
    assert mpimg.imread(top)[..., :3].std() > 0.05, "the page renders as a blank image"
    pixels = mpimg.imread(figure)[..., :3].reshape(-1, 3)
    assert len(np.unique(np.round(pixels * 255).astype(int), axis=0)) > 100, "a figure renders flat"

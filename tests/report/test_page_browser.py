"""report.html renders in a real browser (headless Chromium): not blank, every figure loads, every
section is there."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from routelab.catalogue import REPORT_FIGURES as FIGURES
from routelab.report.build import ReportOptions, write_report
from tests.support.report_runs import aggregate, write_plot_index

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                "(Debian: apt-get install chromium); the report's browser test needs it")

# Reports how many <img> elements decoded to a real picture once the page has loaded.
PROBE = ('<script>window.addEventListener("load", () => document.body.setAttribute("data-images-loaded", '
         '[...document.images].filter(i => i.naturalWidth > 0).length));</script>')


def chromium(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--disable-dev-shm-usage", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "results" / "exp"
    tables = aggregate(root)
    write_plot_index(root / "plots")
    return write_report(tables.pop("runs"), root / "report", "exp", "topk8", root / "plots",
                        options=ReportOptions(repetitions=100), **tables)


def test_report_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 0.05, "the page renders as a blank image"
    # the lower part holds figures, not only text: many distinct colours, not white and grey alone
    lower = pixels[2000:].reshape(-1, 3)
    assert len(np.unique(np.round(lower * 255).astype(int), axis=0)) > 200


def test_report_dom_has_every_section_and_loads_every_figure(report):
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri()).stdout
    probe.unlink()
    ids = set(re.findall(r'<h2 id="([^"]+)"', dom))
    assert ids == {"methods", "comparison", "per-run-figures", *(figure.anchor for figure in FIGURES)}
    assert re.search(r'<nav><h2>Contents</h2><ol>(<li><a href="#[^"]+">[^<]+</a></li>){14}</ol></nav>', dom)
    assert re.search(r"<body[^>]*data-images-loaded=\"11\"", dom), "a figure failed to load"
    assert dom.count("<figcaption>") == 11
    assert "bh_a0.2_k4" in dom and 'href="../plots/topk8/wiki/expert_heatmap.png"' in dom

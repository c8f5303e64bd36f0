"""Every figure is described once (routelab.catalogue): its caption file exists and is the text both
Snakemake's report and report.html show, and the rules' outputs are the catalogue's files."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from routelab.catalogue import ANALYSIS_TABLES, CAPTIONS, REPORT_FIGURES, RUN_FIGURES, caption_text
from tests.support import REPO


def test_every_figure_has_its_caption_file_and_every_caption_file_a_use():
    files = {figure.caption_file for figure in (*RUN_FIGURES, *REPORT_FIGURES)}
    assert all((CAPTIONS / name).is_file() for name in files)
    rules = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    others = {p.name for p in CAPTIONS.glob("*.rst")} - files - {"workflow.rst"}  # workflow.rst: the Snakefile's
    assert others and all(f"../report/{name}" in rules for name in others), others
    assert len({f.file for f in RUN_FIGURES}) == len(RUN_FIGURES)
    assert len({f.anchor for f in REPORT_FIGURES}) == len(REPORT_FIGURES)


def test_captions_are_one_paragraph_without_broken_words():
    for figure in (*RUN_FIGURES, *REPORT_FIGURES):
        text = caption_text(figure.caption_file)
        assert text and "\n" not in text and not re.search(r"\w- \w", text), figure.file


def test_plot_and_report_rules_output_exactly_the_catalogued_figures():
    targets = ["results/demo/plots/topk8/code/index.json", "results/demo/report/report.html"]
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", *targets], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def outputs(rule: str, containing: str) -> list[str]:
        """The outputs of the planned ``rule`` job that writes a path containing ``containing``."""
        for match in re.finditer(rf"rule {rule}:\n(?:.*\n)*?\s+output: (.*)\n", result.stdout):
            paths = match.group(1).split(", ")
            if any(containing in path for path in paths):
                return paths
        raise AssertionError(f"no planned {rule} job writes {containing}")

    per_run = sorted([*(f.file for f in RUN_FIGURES), "index.json"])
    plotted = outputs("plot_run", "plots/topk8/")  # one job per routing config: every dataset's run
    datasets = list(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"])
    for dataset in datasets:
        files = [path.rsplit("/", 1)[1] for path in plotted if path.startswith(f"results/demo/plots/topk8/{dataset}/")]
        assert sorted(files) == per_run, dataset
    assert len(plotted) == len(datasets) * len(per_run)
    report_figures = [path.rsplit("/", 1)[1] for path in outputs("report", "report.html") if path.endswith(".png")]
    assert sorted(report_figures) == sorted(f.file for f in REPORT_FIGURES)


def rst_problems(text: str, source: str) -> list[str]:
    """What docutils reports (warnings and worse) parsing ``text`` as reStructuredText: the system
    messages it writes to its warning stream, those left in the doctree and problematic nodes (an
    undefined ``|substitution|`` is reported from a transform, so only the stream and the node show it)."""
    import io

    import docutils.core
    import docutils.nodes

    stream = io.StringIO()
    tree = docutils.core.publish_doctree(text, source_path=source, settings_overrides={
        "report_level": 2, "halt_level": 5, "warning_stream": stream})
    problems = [line for line in stream.getvalue().splitlines() if line.strip()]
    problems += [node.astext() for node in tree.findall(docutils.nodes.system_message)]
    problems += [f"problematic: {node.astext()}" for node in tree.findall(docutils.nodes.problematic)]
    return problems


def test_every_caption_parses_as_restructuredtext_without_warnings():
    captions = sorted(CAPTIONS.glob("*.rst"))
    assert len(captions) > 20
    problems = {path.name: rst_problems(path.read_text(), path.name) for path in captions}
    assert {name: found for name, found in problems.items() if found} == {}


def test_rst_problems_reports_an_undefined_substitution():
    assert any("Undefined substitution" in problem for problem in rst_problems("summarise |r| here", "x.rst"))


def test_the_aggregate_analysis_tables_are_the_ones_the_collectors_make():
    from routelab.report.routing_analyses import TABLES

    assert set(ANALYSIS_TABLES) == (set(TABLES) - {"coactivation"}) | {"router_diagnostics", "explorer"}

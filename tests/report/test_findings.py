"""The report's findings agree with hand-worked cases: ratio CIs that are known exactly, Holm on a
textbook p-value list, exact permutation p-values, and the config a reader should be told to use."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from routelab.report import findings as fd
from routelab.report import statistics as stats
from routelab.report.build import ReportOptions, write_report

TOKENS = np.array([10.0, 20.0, 30.0, 40.0])  # 4 documents
BASE_LOGLIK = -TOKENS * np.array([1.0, 1.5, 0.8, 1.2])


def perplexity_scores(offsets: dict[str, float], dataset: str = "wiki", tokens: np.ndarray = TOKENS,
                      base_loglik: np.ndarray = BASE_LOGLIK) -> pd.DataFrame:
    """Per-document scores where each routing loses ``offset`` nats per token on every document, so its
    perplexity ratio to the baseline is exp(offset) on every resample of documents."""
    frames = [pd.DataFrame({"routing": routing, "dataset": dataset, "doc_id": np.arange(len(tokens)),
                            "loglik": base_loglik - offset * tokens, "tokens": tokens})
              for routing, offset in offsets.items()]
    return pd.concat(frames, ignore_index=True)


def run_rows(experts: dict[str, float], quality: dict[str, float], dataset: str = "wiki",
             metric: str = "perplexity") -> pd.DataFrame:
    return pd.DataFrame({"routing": list(experts), "dataset": dataset, "experts_mean": list(experts.values()),
                         "active_expert_flops_per_token": [100.0 * e for e in experts.values()],
                         metric: [quality[r] for r in experts]})


# --------------------------------------------------------------------------- paired ratio CIs

def test_constant_per_token_loss_gives_the_exact_ratio_on_every_resample():
    scores = perplexity_scores({"topk8": 0.0, "topk4": 0.01})
    _, statistic = stats.metric_statistic("perplexity")
    config, base = fd.paired_documents(scores, "topk4", "topk8", ("loglik", "tokens"))
    ratio, low, high = fd.paired_ratio_intervals(config, base, statistic, repetitions=500, seed=3)
    assert ratio == pytest.approx(math.exp(0.01))
    assert low == pytest.approx(math.exp(0.01)) and high == pytest.approx(math.exp(0.01))


def test_paired_ratio_interval_matches_a_plain_loop_over_the_same_documents():
    rng = np.random.default_rng(5)
    n, repetitions, seed = 25, 300, 11
    tokens = rng.integers(5, 50, n).astype(float)
    base_loglik, config_loglik = -tokens * rng.uniform(0.8, 1.6, n), -tokens * rng.uniform(0.8, 1.6, n)
    _, statistic = stats.metric_statistic("perplexity")
    ratio, low, high = fd.paired_ratio_intervals((config_loglik, tokens), (base_loglik, tokens), statistic,
                                                 repetitions=repetitions, seed=seed)
    draws = np.random.default_rng(seed)
    ratios = []
    for _ in range(repetitions):
        pick = draws.integers(0, n, n)
        ratios.append(math.exp(-config_loglik[pick].sum() / tokens[pick].sum())
                      / math.exp(-base_loglik[pick].sum() / tokens[pick].sum()))
    assert ratio == pytest.approx(math.exp((base_loglik.sum() - config_loglik.sum()) / tokens.sum()))
    assert (low, high) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])))


def test_accuracy_ratio_of_zero_over_zero_is_one():
    _, statistic = stats.metric_statistic("acc")
    zeros = (np.zeros(4),)
    assert fd.paired_ratio_intervals(zeros, zeros, statistic, repetitions=50) == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- Holm

def test_holm_adjusts_a_hand_worked_p_value_list():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    adjusted = fd.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_ignores_nan():
    adjusted = fd.holm([0.6, np.nan, 0.02])  # two tests: 0.02·2 = 0.04, 0.6·1 → max(0.04, 0.6)
    np.testing.assert_allclose(adjusted, [0.6, np.nan, 0.04])
    np.testing.assert_allclose(fd.holm([0.5, 0.9, 0.7]), [1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- permutation p-values

def test_a_config_worse_on_every_document_has_the_exact_two_sided_p_value():
    """8 documents → 2^8 = 256 swaps, enumerated exactly; only the unswapped assignment is as extreme
    as the observed one on its side, so p = 2 · 1/256."""
    tokens = np.arange(1.0, 9.0) * 10
    base = -tokens * 1.1
    _, statistic = stats.metric_statistic("perplexity")
    p = fd.paired_permutation_pvalue((base - 0.02 * tokens, tokens), (base, tokens), statistic, repetitions=2000)
    assert p == pytest.approx(2 / 256)


def test_permutation_p_value_matches_an_enumeration_of_swaps():
    rng = np.random.default_rng(2)
    n = 7
    tokens = rng.integers(5, 40, n).astype(float)
    config_loglik, base_loglik = -tokens * rng.uniform(0.9, 1.3, n), -tokens * rng.uniform(0.9, 1.3, n)

    def perplexity(loglik, tok):
        return math.exp(-sum(loglik) / sum(tok))

    observed = perplexity(config_loglik, tokens) - perplexity(base_loglik, tokens)
    null = []
    for swaps in itertools.product((False, True), repeat=n):
        swap = np.array(swaps)
        first, second = np.where(swap, base_loglik, config_loglik), np.where(swap, config_loglik, base_loglik)
        null.append(perplexity(first, tokens) - perplexity(second, tokens))
    null = np.array(null)
    eps = 1e-12
    expected = min(1.0, 2 * min(np.mean(null >= observed - eps), np.mean(null <= observed + eps)))
    _, statistic = stats.metric_statistic("perplexity")
    p = fd.paired_permutation_pvalue((config_loglik, tokens), (base_loglik, tokens), statistic, repetitions=2000)
    assert p == pytest.approx(expected)


def test_identical_config_is_not_significant():
    _, statistic = stats.metric_statistic("perplexity")
    assert fd.paired_permutation_pvalue((BASE_LOGLIK, TOKENS), (BASE_LOGLIK, TOKENS), statistic) == 1.0


# --------------------------------------------------------------------------- cheapest within a tolerance

PERPLEXITY_OFFSETS = {"topk8": 0.0, "topk7": 0.003, "topk4": 0.008, "topk2": 0.015, "topk16": 0.001}
PERPLEXITY_EXPERTS = {"topk8": 8, "topk7": 7, "topk4": 4, "topk2": 2, "topk16": 16}


def perplexity_comparisons() -> pd.DataFrame:
    scores = perplexity_scores(PERPLEXITY_OFFSETS)
    quality = {r: math.exp(0.0) for r in PERPLEXITY_OFFSETS}
    return fd.compare_with_baseline(scores, run_rows(PERPLEXITY_EXPERTS, quality), "topk8", "perplexity",
                                    repetitions=200)


def test_cheapest_within_lower_is_better_tolerances():
    """Ratios exp(0.003) = 1.0030, exp(0.008) = 1.0080, exp(0.015) = 1.0151 exactly: within 0.5 % only
    topk7 (and topk16, which costs more than the baseline and so does not count), within 1 % topk4 is
    the cheapest, within 2 % and 5 % topk2."""
    comparisons = perplexity_comparisons()
    picks = {t: fd.cheapest_within(comparisons, t, higher_is_better=False)["routing"]
             for t in (0.005, 0.01, 0.02, 0.05)}
    assert picks == {0.005: "topk7", 0.01: "topk4", 0.02: "topk2", 0.05: "topk2"}
    row = fd.cheapest_within(comparisons, 0.01, higher_is_better=False)
    assert row["flops_saving"] == pytest.approx(0.5) and row["experts_mean"] == 4
    assert fd.cheapest_within(comparisons, 0.001, higher_is_better=False) is None


def test_cheapest_within_higher_is_better_uses_the_ci_low():
    comparisons = pd.DataFrame({"routing": ["a", "b", "c"], "ratio": [0.99, 1.0, 0.97],
                                "ratio_low": [0.985, 0.94, 0.951], "ratio_high": [1.0, 1.04, 0.99],
                                "active_expert_flops_per_token": [300.0, 100.0, 200.0],
                                "flops_saving": [0.25, 0.75, 0.5]})
    assert fd.cheapest_within(comparisons, 0.02, higher_is_better=True)["routing"] == "a"
    assert fd.cheapest_within(comparisons, 0.05, higher_is_better=True)["routing"] == "c"
    assert fd.cheapest_within(comparisons, 0.07, higher_is_better=True)["routing"] == "b"
    assert fd.cheapest_within(comparisons, 0.01, higher_is_better=True) is None


def test_accuracy_case_with_four_documents():
    """Baseline right on all 4 documents; `same` agrees on each (ratio 1 on every resample), `miss`
    is wrong on one (ratio 0.75, and a resample can only lower its CI below 0.95)."""
    correct = {"base": [1, 1, 1, 1], "same": [1, 1, 1, 1], "miss": [1, 1, 1, 0]}
    scores = pd.concat([pd.DataFrame({"routing": r, "dataset": "lambada", "doc_id": range(4), "correct": v})
                        for r, v in correct.items()], ignore_index=True)
    runs = run_rows({"base": 8, "same": 4, "miss": 2}, {"base": 1.0, "same": 1.0, "miss": 0.75}, "lambada", "acc")
    comparisons = fd.compare_with_baseline(scores, runs, "base", "acc", repetitions=200)
    by_routing = comparisons.set_index("routing")
    assert by_routing.loc["miss", "ratio"] == 0.75 and by_routing.loc["miss", "ratio_low"] < 0.95
    assert tuple(by_routing.loc["same", ["ratio", "ratio_low", "ratio_high"]]) == (1.0, 1.0, 1.0)
    assert fd.cheapest_within(comparisons, 0.05, higher_is_better=True)["routing"] == "same"


# --------------------------------------------------------------------------- significance

def test_significantly_worse_and_better_configs_with_holm():
    """8 documents: `worse` loses and `better` gains 0.02 nats per token on every one (exact p = 2/256
    each), `same` is the baseline again (p = 1). Holm over 3 tests: 3 · 2/256 = 0.0234 ≤ 0.05."""
    tokens = np.arange(1.0, 9.0) * 10
    scores = perplexity_scores({"base": 0.0, "worse": 0.02, "better": -0.02, "same": 0.0}, tokens=tokens,
                               base_loglik=-tokens * 1.1)
    runs = run_rows({"base": 8, "worse": 4, "better": 8, "same": 8}, {r: 3.0 for r in ("base", "worse", "better",
                                                                                          "same")})
    comparisons = fd.compare_with_baseline(scores, runs, "base", "perplexity", repetitions=2000)
    tested = fd.significant_configs(comparisons, higher_is_better=False, alpha=0.05).set_index("routing")
    assert tested.loc["worse", "p_value"] == pytest.approx(2 / 256)
    assert tested.loc["worse", "p_holm"] == pytest.approx(3 * 2 / 256)
    assert tested.loc["better", "p_holm"] == pytest.approx(3 * 2 / 256)
    assert tested["verdict"].to_dict() == {"better": "better", "same": "not significant", "worse": "worse"}
    strict = fd.significant_configs(comparisons, higher_is_better=False, alpha=0.02)
    assert set(strict["verdict"]) == {"not significant"}  # 0.0234 > 0.02 after the correction


# --------------------------------------------------------------------------- the whole findings

def demo_tables():
    scores = pd.concat([perplexity_scores(PERPLEXITY_OFFSETS, "wiki"),
                        perplexity_scores({"topk8": 0.0, "topk4": 0.05, "topk2": 0.2, "topk7": 0.0,
                                           "topk16": 0.0}, "<code>")], ignore_index=True)
    runs = []
    for dataset in ("wiki", "<code>"):
        part = scores[scores["dataset"] == dataset]
        quality = {r: float(stats.metric_statistic("perplexity")[1](g["loglik"].to_numpy(), g["tokens"].to_numpy()))
                   for r, g in part.groupby("routing")}
        runs.append(run_rows(PERPLEXITY_EXPERTS, quality, dataset))
    return pd.concat(runs, ignore_index=True), scores


def test_findings_name_the_cheapest_config_per_tolerance_and_the_pareto_set():
    runs, scores = demo_tables()
    metrics = {"wiki": ("perplexity", False), "<code>": ("perplexity", False)}
    result = fd.findings(runs, scores, "topk8", metrics, tolerances=(0.02, 0.005), repetitions=200)
    wiki = result["datasets"]["wiki"]
    assert [t["tolerance"] for t in wiki["tolerances"]] == [0.005, 0.02]
    assert [t["config"]["routing"] for t in wiki["tolerances"]] == ["topk7", "topk2"]
    code = result["datasets"]["<code>"]
    assert [t["config"]["routing"] for t in code["tolerances"]] == ["topk7", "topk7"]  # topk4 loses 5 %
    # perplexity rises as experts fall, topk16 = topk7 in quality at more cost: every cheaper one is optimal
    assert [p["routing"] for p in wiki["pareto"]] == ["topk2", "topk4", "topk7", "topk8"]
    assert [p["routing"] for p in code["pareto"]] == ["topk2", "topk4", "topk7"]
    assert wiki["baseline"]["quality"] == pytest.approx(runs.set_index(["dataset", "routing"]).loc[
        ("wiki", "topk8"), "perplexity"])
    assert wiki["baseline"]["low"] <= wiki["baseline"]["quality"] <= wiki["baseline"]["high"]
    assert result["correction"] == "Holm–Bonferroni"


def test_findings_text_is_escaped_and_json_is_stable():
    runs, scores = demo_tables()
    metrics = {"wiki": ("perplexity", False), "<code>": ("perplexity", False)}
    result = fd.findings(runs, scores, "topk8", metrics, repetitions=200)
    block = fd.findings_html(result)
    assert "<code>" not in block and "&lt;code&gt;" in block
    assert block.startswith('<section id="findings"')
    markdown = fd.findings_markdown(result)
    assert "**wiki: topk7 keeps perplexity within 0.5 % of topk8" in markdown
    assert "| 1 % | topk4 | 4 | 50 % |" in markdown
    text = fd.findings_json(result)
    assert text == fd.findings_json(fd.findings(runs, scores, "topk8", metrics, repetitions=200))
    assert json.loads(text)["datasets"]["wiki"]["tolerances"][1]["config"]["routing"] == "topk4"
    assert "NaN" not in text


def test_no_config_within_tolerance_says_keep_the_baseline():
    scores = perplexity_scores({"topk8": 0.0, "topk4": 0.1})
    runs = run_rows({"topk8": 8, "topk4": 4}, {"topk8": 3.0, "topk4": 3.3})
    result = fd.findings(runs, scores, "topk8", {"wiki": ("perplexity", False)}, tolerances=(0.01,),
                         repetitions=100)
    assert result["datasets"]["wiki"]["tolerances"] == [{"tolerance": 0.01, "config": None}]
    assert "none (keep topk8)" in fd.findings_markdown(result)
    assert "no config cheaper than topk8 keeps perplexity within 1 % of it; keep topk8" in fd.findings_html(result)


def test_without_scores_only_the_baseline_and_the_pareto_set_are_reported():
    runs = run_rows({"topk8": 8, "topk4": 4, "topk16": 16}, {"topk8": 3.0, "topk4": 3.3, "topk16": 3.1})
    entry = fd.findings(runs, None, "topk8", {"wiki": ("perplexity", False)})["datasets"]["wiki"]
    assert entry["baseline"]["quality"] == 3.0 and entry["tolerances"] == [] and entry["comparisons"] == []
    assert [p["routing"] for p in entry["pareto"]] == ["topk4", "topk8"]


# --------------------------------------------------------------------------- wiring

@pytest.mark.parametrize("tolerances", [(0.0,), (1.0,), (0.01, -0.2), ()])
def test_report_options_reject_tolerances_outside_zero_one(tolerances):
    with pytest.raises(ValueError, match=r"report\.tolerances .*\(0, 1\)"):
        ReportOptions(tolerances=tolerances)


def test_write_report_writes_findings_and_puts_them_first_in_the_page(tmp_path):
    runs, scores = demo_tables()
    runs = runs.assign(method="topk", task="perplexity", num_layers=2, num_experts=16, k=runs["experts_mean"])
    report = write_report(runs, tmp_path / "report", "exp", "topk8", tmp_path / "plots", scores=scores,
                          options=ReportOptions(repetitions=100, tolerances=(0.01,)))
    page = report.read_text()
    assert page.index('id="findings"') < page.index('id="comparison"')
    found = json.loads((tmp_path / "report" / "findings.json").read_text())
    assert found["tolerances"] == [0.01]
    assert found["datasets"]["wiki"]["tolerances"][0]["config"]["routing"] == "topk4"
    assert (tmp_path / "report" / "findings.md").read_text().startswith("# Findings")

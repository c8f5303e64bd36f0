"""The routing-analysis figures draw at 256 experts and 20 configs, and pick the adaptive configs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from routelab.report import analysis_figures as af

ROUTINGS = [f"config_{i:02d}" for i in range(19)] + ["topk8"]
LAYERS, EXPERTS = 4, 256  # 4 layers keep the test fast; experts and configs at the sizes that crowd a figure


def keyed(rng, per_run: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([per_run.assign(routing=routing, dataset=dataset) for routing in ROUTINGS
                      for dataset in ("a", "b")], ignore_index=True).assign(
        noise=lambda t: rng.random(len(t)))


@pytest.fixture
def tables():
    rng = np.random.default_rng(0)
    layers = pd.DataFrame({"layer": np.arange(LAYERS)})
    vocabulary = keyed(rng, pd.DataFrame({"layer": np.repeat(np.arange(LAYERS), EXPERTS),
                                          "expert": np.tile(np.arange(EXPERTS), LAYERS)}))
    vocabulary = vocabulary.assign(specialisation=vocabulary["noise"], usage=8 / EXPERTS)
    locality = keyed(rng, layers).assign(share_any=lambda t: t["noise"], jaccard=lambda t: t["noise"] / 3,
                                         chance_share_any=0.4, chance_jaccard=0.1)
    cross = keyed(rng, layers).assign(top1_accuracy=lambda t: t["noise"], conditional_entropy_bits=2.0,
                                      entropy_bits=6.0)
    agreement = keyed(rng, layers).assign(jaccard=lambda t: t["noise"], top1_kept=0.9)
    edges = 2 ** np.arange(12)
    bins = pd.DataFrame({"layer": np.repeat(np.arange(LAYERS), 11), "position_low": np.tile(edges[:-1], LAYERS),
                         "position_high": np.tile(edges[1:], LAYERS), "tokens": 10})
    k = keyed(rng, bins)
    # topk8 keeps k = 8 everywhere: not adaptive
    k["k_mean"] = np.where(k["routing"] == "topk8", 8.0, 1 + 10 * k["noise"])
    return {"vocabulary": vocabulary, "locality": locality, "cross_layer": cross, "baseline_agreement": agreement,
            "k": k}


def test_every_figure_draws_at_256_experts_and_20_configs(tables, tmp_path):
    af.vocabulary_specialisation(tables["vocabulary"], path=tmp_path / "v.png")
    af.cross_layer_predictability(tables["cross_layer"], path=tmp_path / "c.png")
    af.temporal_locality(tables["locality"], path=tmp_path / "l.png")
    af.baseline_agreement(tables["baseline_agreement"], "topk8", path=tmp_path / "b.png")
    af.k_by_position(tables["k"], path=tmp_path / "k.png")
    frequency = tables["k"].rename(columns={"position_low": "frequency_low", "position_high": "frequency_high"})
    af.k_by_frequency(frequency, path=tmp_path / "f.png")
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in "vclbkf")


def test_k_figure_draws_only_configs_whose_k_varies(tables):
    assert af.adaptive_routings(tables["k"]) == ROUTINGS[:-1]
    fig = af.k_by_position(tables["k"])
    assert len(fig.axes[0].lines) == 19
    with pytest.raises(ValueError, match="k varies"):
        af.k_by_position(tables["k"][tables["k"]["routing"] == "topk8"])


def test_top_tokens_table_joins_each_experts_tokens():
    top = pd.DataFrame({"routing": "topk8", "dataset": "a", "layer": 1, "expert": [5, 5, 9], "rank": [1, 0, 0],
                        "token_id": [11, 10, 12], "token_share": [0.25, 0.5, 1.0], "specialisation": [0.6, 0.6, 0.9],
                        "text": ["b", "<a>", None]})
    table = af.top_tokens_table(top, "topk8", 1)
    assert table["expert"].tolist() == [9, 5]  # most specialised first
    assert table["top tokens"].tolist() == ["'#12' (100 %)", "'<a>' (50 %), 'b' (25 %)"]

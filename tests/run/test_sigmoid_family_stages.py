"""The calibration and route stages on a DeepSeek-V3-class model (sigmoid scores, selection bias, expert
groups): the null is fitted on what the family ranks, calibrated probability rules read the family's
probabilities, and every rule's run stays within the token's expert groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from routelab.io.files import read_json
from tests.support.families import CASES, COMMON
from tests.support.models import seed_everything
from tests.support.route_setup import load_route_script, make_model_and_data, route_args

EXPERTS, TOP_K, GROUP = 8, 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("deepseek_stages")
    demo_dir, data_dir = make_model_and_data(root)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    seed_everything(0)
    settings = {**COMMON, **CASES["deepseek_v3"][1], "vocab_size": len(tokenizer), "max_position_embeddings": 64,
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **settings))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    model_dir = root / "deepseek"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return root, model_dir, data_dir


@pytest.fixture(scope="module")
def calibrated(setup):
    from routelab.run.calibration import calibrate_null, collect_calibration_logits

    root, model_dir, data_dir = setup
    logits_path = root / "calibration" / "router_logits.npz"
    collect_calibration_logits(model_dir, [data_dir / "windows.parquet"], logits_path, max_per_layer=100_000,
                               batch_size=4)
    calibrate_null(logits_path, "kde", root / "calibration" / "kde", grid_size=512)
    return logits_path, root / "calibration" / "kde" / "null.npz"


def native_gate_outputs(model_dir, windows: pd.DataFrame):
    """Each MoE layer's native router logits of the real tokens and its gate's bias (hooks on the gates)."""
    from routelab.model.loading import load_model

    model = load_model(model_dir, device="cpu")
    gates = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    seen = {i: [] for i in range(len(gates))}
    handles = [g.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0])) for i, g in enumerate(gates)]
    try:
        with torch.no_grad():
            for _, row in windows.iterrows():
                model(input_ids=torch.tensor(np.asarray(row["input_ids"]))[None])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(seen[i]) for i in seen], [g.e_score_correction_bias for g in gates]


def test_calibration_holds_the_biased_sigmoid_scores_and_the_family_probabilities(setup, calibrated):
    from routelab.run.calibration import load_router_logits, load_softmax_logits

    _, model_dir, data_dir = setup
    scores, meta = load_router_logits(calibrated[0])
    windows = pd.read_parquet(data_dir / "windows.parquet")
    raw, biases = native_gate_outputs(model_dir, windows)
    assert meta["num_experts"] == EXPERTS and len(scores) == len(raw) == 2
    for layer, (logits, bias) in enumerate(zip(raw, biases)):
        expected = (torch.sigmoid(logits) + bias).numpy()
        # Windows are padded in batches: compare the multiset of rows, not their order.
        assert scores[layer].shape == expected.shape
        np.testing.assert_allclose(np.sort(scores[layer], axis=0), np.sort(expected, axis=0), atol=1e-6)
    probs = [torch.softmax(torch.from_numpy(layer), -1) for layer in load_softmax_logits(calibrated[0])]
    for p in probs:
        grouped = p.view(-1, 2, GROUP).sum(-1)  # each token's probability lies in one group of four experts
        assert torch.isclose(grouped.max(-1).values, torch.ones(len(p)), atol=1e-6).all()


@pytest.mark.parametrize("routing", [
    {"name": "topk", "method": "topk"},
    {"name": "bh", "method": "bh", "alpha": 0.6, "min_k": 1, "max_k": GROUP, "null_model": "kde"},
    {"name": "bh_gaussian", "method": "bh", "alpha": 0.95, "min_k": 1, "max_k": GROUP, "null_model": "gaussian"},
    {"name": "topp", "method": "topp", "p": 0.6, "min_k": 1, "max_k": GROUP},
    {"name": "ratio", "method": "ratio", "calibrate": "median", "min_k": 1, "max_k": GROUP},
])
def test_every_rule_runs_within_the_expert_groups(setup, calibrated, routing, tmp_path):
    _, model_dir, data_dir = setup
    logits_path, null_path = calibrated
    null = {"kde": str(null_path), "gaussian": "gaussian"}.get(routing.get("null_model"))
    out = tmp_path / routing["name"]
    load_route_script().main(route_args(model_dir, data_dir, out, routing, null=null,
                                        calibration_logits=str(logits_path)))
    rows = pq.read_table(out / "routing.parquet").to_pandas()
    experts = np.stack(rows["experts"].map(lambda e: np.asarray(e)[:1]).to_numpy())[:, 0]
    assert rows["k"].between(1, GROUP if routing["method"] != "topk" else TOP_K).all()
    in_group = rows.apply(lambda r: len({int(e) // GROUP for e in np.asarray(r["experts"])}) == 1, axis=1)
    assert in_group.all() and (experts >= 0).all()
    if routing["method"] != "topk":
        assert rows["k"].nunique() >= 2, rows["k"].value_counts()
    metrics, summary = read_json(out / "metrics.json"), read_json(out / "summary.json")
    assert np.isfinite(metrics["word_perplexity"])
    # Probability statistics describe the family's probabilities (normalised over the kept group): the router
    # entropy is at most log 4, which the softmax of the raw logits over all 8 experts would exceed.
    assert all(0 < layer["router_entropy"] <= np.log(GROUP) + 1e-6 for layer in summary["per_layer"])
    assert summary["router_score"] == "sigmoid"  # what the report's router diagnostics read the logits with

"""Routing statistics: summary.json's numbers from the running counts, against hand-worked and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from routelab.record import Recording, RoutingRecorder, routing_summary
from routelab.record.statistics import ROUTER_STAT_KEYS, load_balancing_loss, normalized_entropy
from routelab.routing import Selection

NUM_EXPERTS, MIN_K, MAX_K = 8, 1, 4


def random_logits(tokens: int, seed: int) -> np.ndarray:
    """``[tokens, E]`` float32 logits, spread enough that the top-2 probabilities are never tied."""
    return (np.random.default_rng(seed).normal(size=(tokens, NUM_EXPERTS)) * 2.0).astype(np.float32)


def random_k(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(MIN_K, MAX_K + 1, size=tokens)


SELECTION_EXTRAS = {"on": False}


def make_selection(logits: np.ndarray, k: np.ndarray) -> Selection:
    """Each token's ``k`` most probable experts with their softmax probabilities, padded to MAX_K; with
    SELECTION_EXTRAS on, also the probabilities, top expert and top-2 probabilities a router passes on."""
    probs = softmax(logits.astype(np.float64), axis=-1)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :MAX_K]
    used = np.arange(MAX_K) < k[:, None]
    indices = np.where(used, order, NUM_EXPERTS)
    weights = np.where(used, np.take_along_axis(probs, order, axis=-1), 0.0)
    extras = {}
    if SELECTION_EXTRAS["on"]:
        extras = {"probs": torch.from_numpy(probs).float(), "top_expert": torch.from_numpy(order[:, 0]),
                  "top_probs": torch.from_numpy(np.take_along_axis(probs, order[:, :2], axis=-1)).float()}
    return Selection(indices=torch.from_numpy(indices).long(), weights=torch.from_numpy(weights).float(),
                     k=torch.from_numpy(k).long(), **extras)


def record(batches: list[tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]]) -> dict:
    """Run a recorder (no Parquet) over batches of (per-layer logits ``[B*S, E]``, mask ``[B, S]``, per-layer k)."""
    num_layers = len(batches[0][0])
    recorder = RoutingRecorder(num_layers, NUM_EXPERTS, MIN_K, MAX_K, path=None)
    recording = Recording(recorder)
    for logits_per_layer, mask, k_per_layer in batches:
        batch, seq = mask.shape
        recording.begin_batch(torch.from_numpy(mask), torch.arange(batch), torch.zeros(batch, dtype=torch.long),
                              torch.full((batch, seq), 5))
        for layer, (logits, k) in enumerate(zip(logits_per_layer, k_per_layer)):
            recording.record(layer, torch.from_numpy(logits), make_selection(logits, k))
        recording.end_batch()
    return recorder.summary()


def record_one_layer(logits: np.ndarray, k: np.ndarray) -> dict:
    """Summary of one layer, one batch, no padding; returns that layer's per_layer entry."""
    summary = record([([logits], np.ones((1, len(logits)), dtype=np.int64), [k])])
    return summary["per_layer"][0]


# 4 experts (histogram columns k = 0..4), min_k 1, max_k 3.
#   layer 0: k = 1, 1, 2, 3      -> [0, 2, 1, 1, 0]
#   layer 1: k = 2, 2, 2, 3      -> [0, 0, 3, 1, 0]
#   overall: k = 1,1,2,2,2,2,3,3 -> [0, 2, 4, 2, 0]
K_HIST = np.array([[0, 2, 1, 1, 0], [0, 0, 3, 1, 0]])


EXPERT_COUNTS = np.array([[3, 2, 1, 1], [4, 3, 2, 0]])


# p moments: p over all experts = 0.1, 0.2, 0.3, 0.4; selected p = 0.1, 0.2
#   [sum p, sum p^2, count, sum selected p, count selected] = [1.0, 0.3, 4, 0.3, 2]
P_MOMENTS = np.array([1.0, 0.3, 4.0, 0.3, 2.0])


NUM_EXPERTS, NUM_LAYERS = 8, 2


ALPHA, MIN_K, MAX_K = 0.2, 1, 6
































def test_routing_summary_hand_worked():
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3, p_moments=P_MOMENTS)
    assert summary["total_decisions"] == 8
    # mean = (2*1 + 4*2 + 2*3) / 8 = 2; var = (2*1 + 4*0 + 2*1) / 8 = 0.5 -> std 0.70710678
    assert summary["experts_mean"] == pytest.approx(2.0)
    assert summary["experts_std"] == pytest.approx(0.70710678, rel=1e-8)
    assert summary["experts_median"] == 2
    assert (summary["experts_min"], summary["experts_max"]) == (1, 3)
    # 2 of 8 decisions at max_k = 3 and 2 of 8 at min_k = 1: 25 % each.
    assert summary["ceiling_hit_rate"] == pytest.approx(25.0)
    assert summary["floor_hit_rate"] == pytest.approx(25.0)
    assert (summary["min_k"], summary["max_k"]) == (1, 3)
    # p: mean 1.0 / 4 = 0.25; var = 0.3 / 4 - 0.25^2 = 0.0125 -> std 0.11180340; selected mean 0.3 / 2 = 0.15
    assert summary["pvalue_mean"] == pytest.approx(0.25)
    assert summary["pvalue_std"] == pytest.approx(0.11180340, rel=1e-7)
    assert summary["selected_pvalue_mean"] == pytest.approx(0.15)
    assert summary["k_histogram"] == {"1": 2, "2": 4, "3": 2}
    assert summary["expert_counts"] == EXPERT_COUNTS.tolist()

    layer0, layer1 = summary["per_layer"]
    # layer 0: k = 1, 1, 2, 3: mean 7/4 = 1.75; var = (0.5625*2 + 0.0625 + 1.5625) / 4 = 0.6875 -> 0.82915620
    assert layer0["layer"] == 0 and layer0["decisions"] == 4
    assert layer0["experts_mean"] == pytest.approx(1.75)
    assert layer0["experts_std"] == pytest.approx(0.82915620, rel=1e-8)
    assert (layer0["ceiling_hit_rate"], layer0["floor_hit_rate"]) == pytest.approx((25.0, 50.0))
    # layer 1: k = 2, 2, 2, 3: mean 2.25; var = (3*0.0625 + 0.5625) / 4 = 0.1875 -> 0.43301270; floor 0 %
    assert layer1["experts_mean"] == pytest.approx(2.25)
    assert layer1["experts_std"] == pytest.approx(0.43301270, rel=1e-8)
    assert (layer1["ceiling_hit_rate"], layer1["floor_hit_rate"]) == pytest.approx((25.0, 0.0))
    assert (layer1["experts_min"], layer1["experts_max"]) == (2, 3)


def test_routing_summary_median_is_the_lower_median():
    # Layer 0's k values 1, 1, 2, 3 have an even count: the median reported is a k that occurred (the
    # lower median, numpy's inverted-CDF percentile), not the midpoint 1.5.
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3)
    assert summary["per_layer"][0]["experts_median"] == np.percentile([1, 1, 2, 3], 50, method="inverted_cdf") == 1
    assert summary["per_layer"][1]["experts_median"] == 2


def test_routing_summary_without_pvalues():
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3, p_moments=None)
    assert summary["pvalue_mean"] is None and summary["pvalue_std"] is None and summary["selected_pvalue_mean"] is None


class TestRecordedStatistics:
    """Every test twice: the recorder computes probabilities and top-2 itself, or takes the router's."""

    @pytest.fixture(autouse=True, params=["recomputed", "from the router"])
    def router_gives_probabilities(self, request, monkeypatch):
        monkeypatch.setitem(SELECTION_EXTRAS, "on", request.param == "from the router")

    def test_weight_entropy_matches_scipy(self):
        logits, k = random_logits(64, seed=0), random_k(64, seed=1)
        probs = softmax(logits.astype(np.float64), axis=-1)
        # scipy.stats.entropy renormalises its argument: the selected weights over the selected experts.
        expected = np.mean([entropy(np.sort(p)[::-1][:n]) for p, n in zip(probs, k)])
        layer = record_one_layer(logits, k)
        assert layer["weight_entropy"] == pytest.approx(expected, rel=1e-5)
        assert layer["weight_entropy_norm"] == pytest.approx(expected / math.log(NUM_EXPERTS), rel=1e-5)
        assert expected > 0.1, "variable k should give a clearly non-zero weight entropy"

    def test_weight_entropy_is_zero_when_one_expert_is_selected(self):
        logits = random_logits(16, seed=2)
        layer = record_one_layer(logits, np.ones(16, dtype=np.int64))
        assert layer["weight_entropy"] == pytest.approx(0.0, abs=1e-7)

    def test_router_entropy_matches_scipy(self):
        logits, k = random_logits(64, seed=3), random_k(64, seed=4)
        expected = entropy(softmax(logits.astype(np.float64), axis=-1), axis=-1).mean()
        layer = record_one_layer(logits, k)
        assert layer["router_entropy"] == pytest.approx(expected, rel=1e-5)
        assert layer["router_entropy_norm"] == pytest.approx(expected / math.log(NUM_EXPERTS), rel=1e-5)
        assert 0 < layer["router_entropy_norm"] < 1

    def test_router_entropy_stays_precise_over_a_long_batch_of_large_logits(self):
        """Entropy is logsumexp minus <p, logits>, two numbers near 50 here: taken per token before summing,
        the mean over 100k tokens keeps float32 precision (a difference of whole-batch sums lost 1e-5)."""
        logits, k = random_logits(100_000, seed=14) + 50.0, random_k(100_000, seed=15)
        expected = entropy(softmax(logits.astype(np.float64), axis=-1), axis=-1).mean()
        assert record_one_layer(logits, k)["router_entropy"] == pytest.approx(expected, rel=1e-6)

    def test_router_z_loss_matches_scipy_logsumexp(self):
        logits, k = random_logits(64, seed=5) + 3.0, random_k(64, seed=6)  # shifted: logsumexp far from 0
        expected = np.mean(logsumexp(logits.astype(np.float64), axis=-1) ** 2)
        assert record_one_layer(logits, k)["router_z_loss"] == pytest.approx(expected, rel=1e-5)

    def test_top1_margin_matches_sorted_probabilities(self):
        logits, k = random_logits(64, seed=7), random_k(64, seed=8)
        probs = np.sort(softmax(logits.astype(np.float64), axis=-1), axis=-1)
        expected = np.mean(probs[:, -1] - probs[:, -2])
        assert record_one_layer(logits, k)["top1_margin"] == pytest.approx(expected, rel=1e-5)

    def test_a_tie_for_the_top_gives_margin_zero_and_counts_the_lower_expert(self):
        logits = random_logits(40, seed=12)
        logits[::3, 2] = logits[::3, 5] = logits[::3].max(-1) + 1.0  # every third token: experts 2 and 5 tie at the top
        k = random_k(40, seed=13)
        summary = record([([logits], np.ones((1, 40), dtype=np.int64), [k])])
        probs = np.sort(softmax(logits.astype(np.float64), axis=-1), axis=-1)
        margins = probs[:, -1] - probs[:, -2]
        assert np.all(margins[::3] < 1e-12)
        assert summary["per_layer"][0]["top1_margin"] == pytest.approx(np.mean(margins), rel=1e-5)
        assert summary["top1_counts"] == [np.bincount(logits.argmax(-1), minlength=NUM_EXPERTS).tolist()]  # first max

    def test_top1_counts_count_the_most_probable_expert(self):
        logits, k = random_logits(200, seed=9), random_k(200, seed=10)
        summary = record([([logits], np.ones((1, 200), dtype=np.int64), [k])])
        expected = np.bincount(logits.argmax(-1), minlength=NUM_EXPERTS)
        assert summary["top1_counts"] == [expected.tolist()]
        # top-1 counts are a different thing from the top-k expert_counts, which count all k selections.
        assert sum(summary["expert_counts"][0]) == k.sum() != 200

    @pytest.mark.parametrize("top_k", [1, 2, 3])
    def test_load_balancing_loss_matches_transformers_for_fixed_k(self, top_k):
        logits = random_logits(96, seed=11 + top_k)
        expected = load_balancing_loss_func((torch.from_numpy(logits),), NUM_EXPERTS, top_k=top_k)
        layer = record_one_layer(logits, np.full(96, top_k))
        assert layer["load_balancing_loss"] == pytest.approx(float(expected), rel=1e-5)

    def test_load_balancing_loss_counts_the_actual_variable_k_selection(self):
        logits, k = random_logits(96, seed=20), random_k(96, seed=21)
        probs = softmax(logits.astype(np.float64), axis=-1)
        order = np.argsort(-probs, axis=-1)
        counts = np.bincount(np.concatenate([row[:n] for row, n in zip(order, k)]), minlength=NUM_EXPERTS)
        expected = NUM_EXPERTS * np.sum(counts / 96 * probs.mean(0))
        assert record_one_layer(logits, k)["load_balancing_loss"] == pytest.approx(expected, rel=1e-5)

    def test_load_balancing_loss_of_uniform_routing_is_k(self):
        # 8 experts, 80 tokens, k = 2: every expert chosen 20 times with mean probability 1/8 -> 8 * 8 * 0.25/8 = 2
        assert load_balancing_loss(np.full(8, 20), np.full(8, 10.0), tokens=80) == pytest.approx(2.0)

    def test_normalized_entropy_of_uniform_probabilities_is_one(self):
        assert normalized_entropy(entropy(np.full(8, 1 / 8)), 8) == pytest.approx(1.0)

    def test_padding_is_excluded_from_every_statistic(self):
        seq, top_k = 10, 2
        mask = np.ones((2, seq), dtype=np.int64)
        mask[1, 6:] = 0  # second row: 6 real tokens, 4 pads
        logits = random_logits(2 * seq, seed=30)
        logits[mask.reshape(-1) == 0] = np.array([40.0] + [0.0] * (NUM_EXPERTS - 1))  # pads: extreme, all expert 0
        k = np.full(2 * seq, top_k)
        padded = record([([logits], mask, [k])])
        real = mask.reshape(-1) == 1
        unpadded = record([([logits[real]], np.ones((1, real.sum()), dtype=np.int64), [k[real]])])
        for key in ROUTER_STAT_KEYS:
            assert padded[key] == pytest.approx(unpadded[key], rel=1e-6), key
        assert padded["top1_counts"] == unpadded["top1_counts"]
        expected = load_balancing_loss_func((torch.from_numpy(logits),), NUM_EXPERTS, top_k=top_k,
                                            attention_mask=torch.from_numpy(mask))
        assert padded["load_balancing_loss"] == pytest.approx(float(expected), rel=1e-5)
        assert padded["router_z_loss"] < 100, "a pad (logsumexp ~40, z ~1600) leaked in"

    def test_recorder_reports_every_statistic_per_layer_and_overall(self):
        """Two layers, two padded batches: every new key against numpy over the real tokens only."""
        masks = [np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]), np.array([[1, 1, 1, 1, 0, 0]])]
        batches, real_logits, real_k = [], [[], []], [[], []]
        for b, mask in enumerate(masks):
            flat = mask.reshape(-1) == 1
            logits = [random_logits(mask.size, seed=40 + 2 * b + layer) for layer in range(2)]
            ks = [random_k(mask.size, seed=50 + 2 * b + layer) for layer in range(2)]
            batches.append((logits, mask, ks))
            for layer in range(2):
                real_logits[layer].append(logits[layer][flat])
                real_k[layer].append(ks[layer][flat])
        summary = record(batches)

        per_layer_expected = []
        for layer in range(2):
            x = np.concatenate(real_logits[layer]).astype(np.float64)
            k = np.concatenate(real_k[layer])
            p = softmax(x, axis=-1)
            order = np.argsort(-p, axis=-1)
            counts = np.bincount(np.concatenate([row[:n] for row, n in zip(order, k)]), minlength=NUM_EXPERTS)
            sorted_p = np.sort(p, axis=-1)
            weight_h = np.mean([entropy(p_row[o[:n]]) for p_row, o, n in zip(p, order, k)])
            router_h = entropy(p, axis=-1).mean()
            per_layer_expected.append({
                "weight_entropy": weight_h, "router_entropy": router_h,
                "weight_entropy_norm": weight_h / np.log(NUM_EXPERTS),
                "router_entropy_norm": router_h / np.log(NUM_EXPERTS),
                "load_balancing_loss": NUM_EXPERTS * np.sum(counts / len(x) * p.mean(0)),
                "router_z_loss": np.mean(logsumexp(x, axis=-1) ** 2),
                "top1_margin": np.mean(sorted_p[:, -1] - sorted_p[:, -2]),
            })
            assert summary["top1_counts"][layer] == np.bincount(p.argmax(-1), minlength=NUM_EXPERTS).tolist()
            assert summary["expert_counts"][layer] == counts.tolist()
            assert summary["per_layer"][layer]["decisions"] == len(x) == 6 + 3 + 4

        for layer, expected in enumerate(per_layer_expected):
            for key, value in expected.items():
                assert summary["per_layer"][layer][key] == pytest.approx(value, rel=1e-5), (layer, key)
        for key in ROUTER_STAT_KEYS:
            assert summary[key] == pytest.approx(np.mean([e[key] for e in per_layer_expected]), rel=1e-5), key
        assert summary["total_decisions"] == 2 * 13  # existing keys keep their meaning

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_recording_a_layer_does_not_sync_with_the_device(self):
        recorder = RoutingRecorder(1, NUM_EXPERTS, MIN_K, MAX_K, path=None)
        mask = torch.tensor([[1, 1, 1, 0]], device="cuda")
        Recording(recorder).begin_batch(mask, torch.tensor([0]), torch.tensor([0]),
                                        torch.full((1, 4), 5, device="cuda"))
        logits = random_logits(4, seed=60)
        selection = make_selection(logits, random_k(4, seed=61))
        selection = Selection(*(t.cuda() for t in (selection.indices, selection.weights, selection.k)))
        logits = torch.from_numpy(logits).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            recorder.record(0, logits, selection)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert recorder.summary()["per_layer"][0]["decisions"] == 3

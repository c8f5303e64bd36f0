"""The routing analyses' pure functions on hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from routelab.report import analyses as an


def test_selection_masks_set_one_bit_per_expert_across_words():
    experts = np.array([[0, 2, -1], [63, 1, -1], [129, 64, 0]])
    masks = an.selection_masks(experts, 130)
    assert masks.shape == (3, 3)
    # token 0: bits 0 and 2 of word 0 = 5; token 1: bits 63 and 1 of word 0; token 2: bit 0 of words 0, 1 and
    # bit 1 of word 2
    assert masks[0].tolist() == [5, 0, 0]
    assert masks[1].tolist() == [2 ** 63 + 2, 0, 0]
    assert masks[2].tolist() == [1, 1, 2]
    assert an.set_sizes(masks).tolist() == [2, 2, 3]


def test_jaccard_of_masks():
    first = an.selection_masks(np.array([[0, 2], [5, -1]]), 64)
    second = an.selection_masks(np.array([[2, 3], [5, -1]]), 64)
    # {0, 2} vs {2, 3}: 1 shared of 3; {5} vs {5}: 1
    np.testing.assert_allclose(an.jaccard(first, second), [1 / 3, 1.0])


def vocabulary_example():
    # token ids 7, 7, 9, 9, 9 routed to [0, 1], [0], [1], [1, 0], [2]:
    # N(7, 0) = 2, N(7, 1) = 1, N(9, 0) = 1, N(9, 1) = 2, N(9, 2) = 1; N(7) = 2, N(9) = 3
    token_ids = np.array([7, 7, 9, 9, 9])
    experts = np.array([[0, 1], [0, -1], [1, -1], [1, 0], [2, -1]])
    ids, index, occurrences = np.unique(token_ids, return_inverse=True, return_counts=True)
    return ids, an.token_expert_counts(index, experts, ids.size, 3), occurrences


def test_token_expert_counts_by_hand():
    ids, counts, occurrences = vocabulary_example()
    assert ids.tolist() == [7, 9]
    assert counts.tolist() == [[2, 1, 0], [1, 2, 1]]
    assert occurrences.tolist() == [2, 3]


def test_vocabulary_specialisation_by_hand():
    _, counts, occurrences = vocabulary_example()
    table = an.vocabulary_specialisation(counts, occurrences, top=1)
    # expert 0: (2^2/2 + 1^2/3) / 3 = 7/9; expert 1: (1^2/2 + 2^2/3) / 3 = 11/18; expert 2: (1^2/3) / 1 = 1/3
    np.testing.assert_allclose(table["specialisation"], [7 / 9, 11 / 18, 1 / 3])
    assert table["tokens"].tolist() == [3, 3, 1]
    assert table["distinct_tokens"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(table["top_share"], [2 / 3, 2 / 3, 1.0])  # the most frequent id's share
    np.testing.assert_allclose(table["usage"], [3 / 5, 3 / 5, 1 / 5])


def test_vocabulary_specialisation_is_one_for_an_expert_owning_its_ids_and_nan_when_unused():
    counts = np.array([[4, 0], [0, 0]])  # expert 0 gets all 4 tokens of id 0; expert 1 nothing
    table = an.vocabulary_specialisation(counts, np.array([4, 0]))
    assert table["specialisation"].iloc[0] == 1.0
    assert math.isnan(table["specialisation"].iloc[1])


def test_top_mass_matches_a_full_sort_on_zipf_counts():
    rng = np.random.default_rng(3)
    token_index = rng.zipf(1.5, size=20_000) % 3000
    ids, index, occurrences = np.unique(token_index, return_inverse=True, return_counts=True)
    experts = np.argsort(rng.random((token_index.size, 16)), axis=1)[:, :4]
    counts = an.token_expert_counts(index, experts, ids.size, 16)
    reference = np.sort(counts, axis=0)[::-1][:10].sum(axis=0)  # sort every column, no pruning
    np.testing.assert_array_equal(an.top_mass(counts, occurrences, 10), reference)


def test_top_tokens_by_hand():
    ids, counts, occurrences = vocabulary_example()
    table = an.top_tokens(ids, counts, occurrences, np.array([1]), keep=2)
    # expert 1: id 9 twice (2 of its 3 tokens, 2 of the 3 id-9 tokens), id 7 once (1 of 2)
    assert table["token_id"].tolist() == [9, 7]
    assert table["count"].tolist() == [2, 1]
    np.testing.assert_allclose(table["token_share"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(table["token_specialisation"], [2 / 3, 1 / 2])


def test_top1_predictability_by_hand():
    result = an.top1_predictability(np.array([0, 0, 0, 1, 1]), np.array([2, 2, 1, 1, 1]), 3)
    # joint: (0, 2) x2, (0, 1) x1, (1, 1) x2; best successor of 0 is 2 (2 right), of 1 is 1 (2 right): 4/5
    assert result["top1_accuracy"] == pytest.approx(4 / 5)
    assert result["top1_majority"] == pytest.approx(3 / 5)  # always "1"
    # H(next) = H(3/5, 2/5); H(next | top1) = 3/5 H(2/3, 1/3) + 2/5 * 0
    assert result["entropy_bits"] == pytest.approx(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))
    assert result["conditional_entropy_bits"] == pytest.approx(0.6 * (math.log2(3) - 2 / 3))


def test_consecutive_pairs_need_the_same_sequence_and_the_next_position():
    pairs = an.consecutive_pairs(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 3, 4, 5]))
    assert pairs.tolist() == [0, 3]  # 1 -> 3 skips a position; row 2 -> 3 changes sequence


def test_temporal_locality_by_hand():
    masks = an.selection_masks(np.array([[0, 1], [1, 2], [3, -1]]), 64)
    result = an.temporal_locality(masks, np.array([0, 1]))
    # {0, 1} -> {1, 2}: shares 1, Jaccard 1/3; {1, 2} -> {3}: shares none, Jaccard 0
    assert result["pairs"] == 2
    assert result["share_any"] == pytest.approx(0.5)
    assert result["jaccard"] == pytest.approx(1 / 6)


def test_temporal_locality_chance_keeps_expert_usage():
    same = an.selection_masks(np.zeros((10, 1), dtype=int), 64)
    assert an.temporal_locality(same, np.arange(9))["chance_jaccard"] == 1.0  # any pairing shares expert 0
    # alternating {0}, {1}: consecutive tokens never share; a random pairing matches about half the time
    alternating = an.selection_masks((np.arange(2000) % 2)[:, None], 64)
    result = an.temporal_locality(alternating, np.arange(1999))
    assert result["share_any"] == 0.0
    assert result["chance_share_any"] == pytest.approx(0.5, abs=0.05)
    assert result["chance_jaccard"] == pytest.approx(result["chance_share_any"])  # single experts: J = share


def test_match_tokens_requires_equal_keys_and_token_ids():
    index, other = an.match_tokens(np.array([1, 2, 3, 5]), np.array([10, 20, 30, 50]),
                                   np.array([1, 3, 4, 5]), np.array([10, 31, 40, 50]))
    # key 2 is missing from the other side; key 3 has another token id there
    assert index.tolist() == [0, 3]
    assert other.tolist() == [0, 3]


def test_baseline_agreement_by_hand():
    run = an.selection_masks(np.array([[0, 1], [2, -1]]), 64)
    baseline = an.selection_masks(np.array([[2, 1], [2, 3]]), 64)
    result = an.baseline_agreement(run, baseline, np.array([2, 2]))
    # {0, 1} vs {1, 2}: 1/3, baseline top-1 (2) dropped; {2} vs {2, 3}: 1/2, kept
    assert result["matched"] == 2
    assert result["jaccard"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert result["top1_kept"] == pytest.approx(0.5)


def test_baseline_agreement_reads_the_top1_bit_in_its_word():
    run = an.selection_masks(np.array([[100, 3]]), 128)
    baseline = an.selection_masks(np.array([[100, 5]]), 128)
    assert an.baseline_agreement(run, baseline, np.array([100]))["top1_kept"] == 1.0


def test_log2_edges_and_mean_by_bin_by_hand():
    assert an.log2_edges(5).tolist() == [0, 1, 2, 4, 8]
    assert an.log2_edges(4, zero=False).tolist() == [1, 2, 4, 8]
    edges = an.log2_edges(5)
    table = an.mean_by_bin(an.bin_index(np.array([0, 1, 2, 3, 5]), edges), np.array([1, 2, 3, 5, 8]), edges)
    # bins [0, 1): k 1; [1, 2): 2; [2, 4): (3 + 5) / 2; [4, 8): 8
    assert table[["low", "high", "tokens"]].values.tolist() == [[0, 1, 1], [1, 2, 1], [2, 4, 2], [4, 8, 1]]
    np.testing.assert_allclose(table["k_mean"], [1, 2, 4, 8])


def test_coactivation_by_hand():
    counts = an.coactivation(np.array([[0, 1], [1, 2], [1, -1]]), 3)
    # diagonal: tokens per expert; (0, 1) and (1, 2) together once each
    assert counts.tolist() == [[1, 1, 0], [1, 3, 1], [0, 1, 1]]

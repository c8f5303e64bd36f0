"""The per-batch context the recorders share: real tokens, every n-th token over the run, the sampled
p-values computed once."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from routelab.record import BatchContext, DecisionSampler, Recording, RoutingRecorder
from routelab.routing import BHRouter, Selection, TopKRouter
from routelab.routing.nulls import fit_kde_null

NUM_EXPERTS, NUM_LAYERS = 8, 2


def batch_context(mask: torch.Tensor, tokens_before: int) -> BatchContext:
    batch = mask.shape[0]
    return BatchContext(mask, torch.arange(batch), torch.arange(batch), torch.ones_like(mask), tokens_before)


def test_selection_pvalues_at_computes_only_the_rows_asked_for():
    table = torch.arange(12.0).view(4, 3) / 12
    asked = []

    def compute(rows):
        asked.append(None if rows is None else rows.tolist())
        return table if rows is None else table.index_select(0, rows)

    lazy = Selection(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), torch.ones(4, dtype=torch.long), compute)
    assert torch.equal(lazy.pvalues_at(torch.tensor([3, 1])), table[[3, 1]]) and asked == [[3, 1]]
    assert torch.equal(lazy.pvalues, table) and asked == [[3, 1], None]
    assert torch.equal(lazy.pvalues_at(torch.tensor([2])), table[[2]]) and len(asked) == 2  # all computed: indexed
    none = Selection(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), torch.ones(4, dtype=torch.long))
    assert none.pvalues_at(torch.tensor([0])) is None and none.pvalues is None


def test_batch_samples_every_nth_real_token_counting_across_batches_and_skipping_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])  # real tokens at flat rows 0, 1, 4, 5, 6
    batch = batch_context(mask, tokens_before=4)
    sample = batch.sample(3)
    # ordinals 4, 5, 6, 7, 8 -> multiples of 3: 6 (3rd real token, flat row 4)
    assert sample.rows.tolist() == [4] and sample.index.tolist() == [2] and batch.real_tokens == 5
    assert batch.sample(3) is sample  # asked again within the batch: the same tensors
    assert batch.real_rows.tolist() == [0, 1, 4, 5, 6]
    assert batch_context(mask, tokens_before=0).sample(2).rows.tolist() == [0, 4, 6]  # ordinals 0, 2, 4
    assert batch_context(torch.ones(2, 3, dtype=torch.long), 0).real_rows is None  # no padding: no row gather


def test_a_batch_smaller_than_the_sampling_step_samples_nothing_or_its_one_due_token():
    # decode steps: two tokens per forward, every 100th token of the run sampled
    assert batch_context(torch.ones(2, 1, dtype=torch.long), tokens_before=30).sample(100).rows.tolist() == []
    assert batch_context(torch.ones(2, 1, dtype=torch.long), tokens_before=99).sample(100).rows.tolist() == [1]


def test_recording_counts_real_tokens_over_the_run():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    recording = Recording(tokens_seen=7)
    first = recording.begin_batch(mask, torch.arange(2), torch.arange(2), torch.ones_like(mask))
    second = recording.begin_batch(mask, torch.arange(2), torch.arange(2), torch.ones_like(mask))
    assert (first.tokens_before, second.tokens_before, recording.tokens_seen) == (7, 12, 17)


@pytest.mark.parametrize("padded", [False, True])
def test_batch_sample_matches_counting_one_by_one(padded):
    rng = np.random.default_rng(int(padded))
    for _ in range(20):
        mask = np.ones((3, 7), dtype=np.int64)
        if padded:
            for row in range(3):
                mask[row, rng.integers(0, 8):] = 0
        seen, every = int(rng.integers(0, 50)), int(rng.integers(1, 6))
        real_rows = np.flatnonzero(mask.reshape(-1))
        keep = [i for i in range(real_rows.size) if (seen + i) % every == 0]
        batch = batch_context(torch.from_numpy(mask), seen)
        sample = batch.sample(every)
        assert sample.index.tolist() == keep and sample.rows.tolist() == real_rows[keep].tolist()
        assert batch.real_tokens == real_rows.size


def test_detail_log_and_recorder_compute_the_sampled_pvalues_once(tmp_path):
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(2 * 6, 5)).astype(np.float32))
    computed = []

    def pvalues(rows):
        computed.append(None if rows is None else rows.tolist())
        chosen = logits if rows is None else logits.index_select(0, rows)
        return torch.sigmoid(-chosen)

    selection = Selection(torch.tensor([[0, 1]] * 12), torch.full((12, 2), 0.3), torch.full((12,), 2), pvalues)
    recorder = RoutingRecorder(1, 5, 1, 2, pvalue_every=3)
    sampler = DecisionSampler(tmp_path / "d.parquet", 5, every_n=3)
    group = Recording(recorder, sampler)
    mask = torch.ones(2, 6, dtype=torch.long)
    group.begin_batch(mask, torch.arange(2), torch.arange(2), torch.full((2, 6), 7))
    group.record(0, logits, selection)
    group.end_batch()
    group.close()
    assert computed == [[0, 3, 6, 9]], "each recorder computed the sampled p-values itself"
    expected = torch.sigmoid(-logits[[0, 3, 6, 9]]).double()
    assert recorder.summary()["pvalue_mean"] == pytest.approx(float(expected.mean()), rel=1e-6)


def test_sampled_pvalues_of_every_layer_are_computed_in_one_call_and_shared(tmp_path, monkeypatch):
    """With a per-layer tabulated null, the sampled p-values of all layers come from one call of the
    null, equal (exactly) to one call per layer, and the detail log reuses them instead of recomputing."""
    from routelab.routing.nulls import TabulatedNull

    gen = torch.Generator().manual_seed(11)
    logits = [torch.randn(2 * 8, NUM_EXPERTS, generator=gen) * 2 for _ in range(3)]
    null = fit_kde_null([layer.numpy() for layer in logits], NUM_EXPERTS)
    router = BHRouter(NUM_EXPERTS, null, alpha=0.5, min_k=1, max_k=4)
    calls = {"pvalues": 0, "pvalues_layers": 0}
    for name in calls:
        original = getattr(TabulatedNull, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TabulatedNull, name, counted)
    selections = [router(layer_logits, layer) for layer, layer_logits in enumerate(logits)]
    calls.update(pvalues=0, pvalues_layers=0)  # routing itself counted in logit space
    recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4, pvalue_every=3)
    sampler = DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=3, alpha=0.5)
    group = Recording(recorder, sampler)
    group.begin_batch(torch.ones(2, 8, dtype=torch.long), torch.arange(2), torch.arange(2),
                      torch.ones(2, 8, dtype=torch.long))
    for layer, (layer_logits, selection) in enumerate(zip(logits, selections)):
        group.record(layer, layer_logits, selection)
    group.end_batch()
    group.close()
    assert calls == {"pvalues": 0, "pvalues_layers": 1}
    sample = [0, 3, 6, 9, 12, 15]
    expected = np.stack([null.pvalues(layer_logits[sample], layer).numpy()
                         for layer, layer_logits in enumerate(logits)])
    rows = pq.read_table(tmp_path / "d.parquet").to_pandas().sort_values(["window_id", "position", "layer"])
    got = np.stack(rows["pvalues"].to_numpy()).reshape(len(sample), 3, NUM_EXPERTS).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, expected)
    assert recorder.summary()["pvalue_mean"] == pytest.approx(float(expected.astype(np.float64).mean()), rel=1e-6)


def test_pvalues_at_layers_falls_back_to_one_call_per_layer():
    """Nulls without a batched method (here gaussian) and selections without p-values still work."""
    from routelab.routing import pvalues_at_layers
    from routelab.routing.nulls import GaussianNull

    gen = torch.Generator().manual_seed(12)
    logits = [torch.randn(6, NUM_EXPERTS, generator=gen) for _ in range(2)]
    null = GaussianNull()
    router = BHRouter(NUM_EXPERTS, null, alpha=0.5, min_k=1, max_k=4)
    rows = torch.tensor([1, 4])
    selections = [router(layer_logits, layer) for layer, layer_logits in enumerate(logits)]
    expected = torch.stack([null.pvalues(layer_logits[rows], layer) for layer, layer_logits in enumerate(logits)])
    assert torch.equal(pvalues_at_layers(selections, rows), expected)
    bare = TopKRouter(NUM_EXPERTS, 2)(logits[0])
    assert pvalues_at_layers([selections[0], bare], rows) is None


def test_selection_cat_joins_the_parts_in_order_and_keeps_only_fields_every_part_has():
    logits = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    first = Selection(torch.tensor([[0, 1], [2, 4]]), torch.tensor([[0.6, 0.4], [1.0, 0.0]]), torch.tensor([2, 1]),
                      pvalues=lambda rows: torch.sigmoid(-(logits[:2] if rows is None else logits[rows])),
                      probs=torch.full((2, 4), 0.25))
    second = Selection(torch.tensor([[3, 0]]), torch.tensor([[0.7, 0.3]]), torch.tensor([2]),
                       pvalues=torch.sigmoid(-logits[2:]))
    joined = Selection.cat([first, second])
    assert joined.indices.tolist() == [[0, 1], [2, 4], [3, 0]] and joined.k.tolist() == [2, 1, 2]
    torch.testing.assert_close(joined.weights, torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.7, 0.3]]))
    torch.testing.assert_close(joined.pvalues, torch.sigmoid(-logits))  # a function's p-values computed, in order
    assert joined.probs is None  # the second part has none
    without = Selection.cat([second, Selection(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.tensor([2]))])
    assert not without.has_pvalues

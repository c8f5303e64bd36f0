"""Record every routing decision: per (token, layer) rows to Parquet plus running summary counts.

Decisions are gathered on the model's device during the forward pass and copied to the host once per
batch. ``routing.parquet`` has one row per (token, MoE layer):

``window_id int32, doc_id int32, position int32, token_id int32, layer int16, k int16,
experts list<int16>, weights list<float32>`` (only the ``k`` selected experts, most preferred first).

Alongside, running sums of per-token router statistics (entropies, z-loss, top-1 margin, per-expert
probability mass and top-1 counts; see :mod:`routelab.routing_stats`) stay on the device and are reduced
only in :meth:`RoutingRecorder.summary`: recording a layer never waits for the device.

During the forward pass the recorder only keeps each layer's tensors; :meth:`RoutingRecorder.end_batch`
does the work once for all layers (statistics, counts, the selection compacted on the device and copied
to the host as one buffer, Arrow lists from offsets), and a background thread compresses and writes
the row groups (:class:`routelab.io.BatchedParquetWriter`).
"""

from __future__ import annotations

import os
from numbers import Integral
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .io import BatchedParquetWriter
from .routers import Selection
from .routing_stats import ROUTER_STAT_KEYS, RouterSums, layer_router_stats, mean_over_layers

# No column holds nulls, and saying so spares Parquet the definition levels; the list columns are
# written without dictionary encoding (weights never repeat enough, expert lists compress well without;
# measured: 17 % less encoding time, and files no larger — 28 % smaller in logging_overhead.py).
SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in (
    ("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("layer", pa.int16()), ("k", pa.int16()),
    ("experts", pa.list_(pa.field("element", pa.int16(), nullable=False))),
    ("weights", pa.list_(pa.field("element", pa.float32(), nullable=False))),
)])
_DICTIONARY_COLUMNS = ["window_id", "doc_id", "position", "token_id", "layer", "k"]
_META = ("window_id", "doc_id", "position", "token_id")  # per-token columns, repeated for each layer
_STATS_ELEMENTS = 1 << 24  # router statistics take at most this many logits (layers x tokens x E) at once


class RoutingRecorder:
    """Collects one run's routing decisions; pass it to :func:`routelab.patching.install_router`.

    Call :meth:`begin_batch` before each forward pass (it says which positions are real tokens) and
    :meth:`end_batch` after it; :meth:`close` finishes the Parquet file, :meth:`summary` reduces the
    running counts. Everything is over every real token except the p-value moments (``pvalue_mean``,
    ``pvalue_std``, ``selected_pvalue_mean``): those are over every ``pvalue_every``-th real token
    (1: all; 0: none), because p-values cost a table lookup per expert that routers otherwise skip
    (:meth:`routelab.routers.Selection.pvalues_at`). The pipeline samples them like decisions.parquet.
    """

    def __init__(self, num_layers: int, num_experts: int, min_k: int, max_k: int,
                 path: str | os.PathLike | None = None, row_group_size: int = 1 << 20, pvalue_every: int = 1):
        if isinstance(pvalue_every, bool) or not isinstance(pvalue_every, Integral) or pvalue_every < 0:
            raise ValueError(f"pvalue_every: {pvalue_every!r} is not valid; need an integer >= 0 "
                             "(1 = every token, n = every n-th token, 0 = no p-value statistics)")
        self.num_layers, self.num_experts, self.min_k, self.max_k = num_layers, num_experts, min_k, max_k
        # p-value moments over every n-th real token (counted over all batches, like DecisionSampler, so a
        # resumed or sharded run samples the same tokens when tokens_seen is carried over)
        self.pvalue_every, self.tokens_seen = int(pvalue_every), 0
        self._writer = (BatchedParquetWriter(path, SCHEMA, row_group_size, use_dictionary=_DICTIONARY_COLUMNS)
                        if path is not None else None)
        self._batch: dict[str, Any] | None = None
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._device: torch.device | None = None
        self._k_hist = self._expert_counts = self._p_moments = None
        self._router_sums = self._router_probs = self._top1_counts = None

    def _init_counts(self, device: torch.device) -> None:
        self._device = device
        self._k_hist = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.long, device=device)
        self._expert_counts = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.long, device=device)
        # sum p, sum p^2, count, sum p over selected, count selected  (float64 for exact-ish sums)
        self._p_moments = torch.zeros(5, dtype=torch.float64, device=device)
        # per layer: tokens, sum weight entropy, sum router entropy, sum logsumexp^2, sum top-1 margin
        self._router_sums = torch.zeros(self.num_layers, 5, dtype=torch.float64, device=device)
        self._router_probs = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self._top1_counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long, device=device)

    def begin_batch(self, attention_mask: torch.Tensor, window_ids: torch.Tensor, doc_ids: torch.Tensor,
                    input_ids: torch.Tensor) -> None:
        """``attention_mask`` / ``input_ids`` ``[batch, seq]``; ids ``[batch]``. Pads are not recorded."""
        valid = attention_mask.bool()
        # Row indices of real tokens in the flat [batch * seq] layout: found once per batch, so that
        # selecting them in every layer needs no device-to-host sync (a boolean mask would).
        flat_rows = valid.reshape(-1).nonzero().squeeze(1)
        seq = valid.shape[1]
        rows, cols = flat_rows // seq, flat_rows % seq
        real = flat_rows.numel()
        sampled = sampled_rows = None  # which real tokens' p-values enter the moments: all (None) or every n-th
        if self.pvalue_every > 1:
            sampled_rows, sampled, _ = every_nth_real_token(attention_mask, self.tokens_seen, self.pvalue_every)
        self.tokens_seen += real
        self._batch = {
            # None when every position is a real token: the layers then skip the row gather (a copy).
            "flat_rows": None if real == valid.numel() else flat_rows,
            "window_id": window_ids.to(valid.device)[rows], "doc_id": doc_ids.to(valid.device)[rows],
            "position": cols, "token_id": input_ids[rows, cols],
            # positions among the real tokens and rows of the flat [batch * seq] layout of the sample
            "pvalue_index": sampled, "pvalue_rows": sampled_rows,
        }
        self._layers = {}
        if self._k_hist is None:
            self._init_counts(valid.device)

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """Called from the patched router for every layer of every forward pass: keeps references only
        (until :meth:`end_batch`: the logits and the selection, with the router's float32 probabilities,
        ``tokens x experts x 4`` bytes per layer — 17 MB per layer for 65k tokens of OLMoE).

        ``router_logits [tokens, E]`` and the selection (``[tokens, max_k]``, ``k [tokens]``, optional
        ``pvalues [tokens, E]``) over the flat ``batch * seq`` tokens. All work happens in
        :meth:`end_batch`, batched over layers: one set of kernels per forward instead of one per layer.
        """
        if self._batch is None:
            return
        self._layers[layer] = (router_logits, selection)

    def end_batch(self) -> None:
        """Add the batch to the running counts and queue its rows for Parquet (one host copy)."""
        batch, self._batch = self._batch, None
        layers_seen, self._layers = self._layers, {}
        if batch is None or not layers_seen:
            return
        self._process(batch, layers_seen)

    def _process(self, batch: dict[str, Any], layers_seen: dict[int, tuple[torch.Tensor, Selection]]) -> None:
        """:meth:`end_batch`'s work on one batch's metadata and per-layer ``(logits, selection)``."""
        layer_ids = sorted(layers_seen)
        selections = [layers_seen[i][1] for i in layer_ids]
        device = selections[0].k.device
        k = torch.stack([s.k for s in selections])  # [L, N]
        indices = torch.stack([s.indices for s in selections])  # [L, N, max_k]
        weights = torch.stack([s.weights for s in selections]).float()
        rows = batch["flat_rows"]
        if rows is not None:  # drop the padding (a gather on the device, no sync)
            rows = rows.to(device)
            k, indices, weights = k[:, rows], indices[:, rows], weights[:, rows]
        layers = torch.as_tensor(layer_ids, device=self._device)
        self._k_hist.index_add_(0, layers, _count_rows(k, self.num_experts + 1).to(self._device))
        self._expert_counts.index_add_(0, layers, _count_rows(indices.flatten(1), self.num_experts + 1)
                                       .to(self._device))
        # [L, T, E] statistics a few layers at a time: a long batch of a large model would otherwise
        # hold several float32 copies of every layer's logits at once.
        group = max(1, _STATS_ELEMENTS // max(1, k.shape[1] * self.num_experts))
        for start in range(0, len(layer_ids), group):
            part = slice(start, start + group)
            logits = torch.stack([layers_seen[i][0].to(device) for i in layer_ids[part]])  # [l, N, E]
            # the router's own probabilities (float32 softmax) when every layer's selection carries them
            probs = _stacked([s.probs for s in selections[part]], device)
            top = [_stacked([s.top_expert for s in selections[part]], device),
                   _stacked([s.top_probs for s in selections[part]], device)]
            if rows is not None:
                logits = logits[:, rows]
                probs = probs[:, rows] if probs is not None else None
                top = [None if value is None else value[:, rows] for value in top]
            self._accumulate_router_stats(layers[part], logits, probs, weights[part], *top)
            if self.pvalue_every:
                self._accumulate_sampled_pvalues(batch, selections[part], indices[part], rows, device)
        if self._writer is not None:
            self._write_rows(batch, layer_ids, k, indices, weights)

    def _accumulate_router_stats(self, layers: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor | None,
                                 weights: torch.Tensor, top_expert: torch.Tensor | None = None,
                                 top_probs: torch.Tensor | None = None) -> None:
        """Add real tokens' logits ``[L, T, E]`` and selected weights ``[L, T, max_k]`` (0 in unused slots)
        to the running sums of the layers ``layers [L]``. ``probs`` (their softmax), ``top_expert``
        ``[L, T]`` and ``top_probs`` ``[L, T, 2]`` come from the router when it has them (see
        :class:`routelab.routers.Selection`); what is missing is computed here."""
        # The largest probability belongs to the largest logit, so logsumexp = max logit - log p_(1), and
        # entropy = -sum_e p_e (logit_e - logsumexp) = logsumexp - sum_e p_e logit_e: reductions that need
        # no expert index. The top two probabilities and the top expert come from the router's order;
        # without it, from the probabilities (argmax only in the rare batch with a tie for the top, as
        # index reductions cost several times more than value reductions on CPU).
        logits = logits.float()
        if probs is None:
            probs = torch.softmax(logits, dim=-1)  # [L, T, E]
        if top_probs is not None and top_expert is not None:
            top1_prob, margin = top_probs[..., 0], top_probs[..., 0] - top_probs[..., 1]
            top1_counts = _count_rows(top_expert, self.num_experts)
        else:
            top1_prob, margin, top1_counts = self._top_from_probs(probs)
        logsumexp = logits.amax(dim=-1) - top1_prob.log()
        router_entropy = logsumexp - torch.linalg.vecdot(probs, logits)
        # Unused slots hold weight 0 (the Selection contract) and add 0 to the entropy (xlogy(0, 0) = 0).
        selected = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        per_token = torch.stack([
            torch.ones_like(logsumexp),
            -torch.special.xlogy(selected, selected).sum(-1),
            router_entropy,
            logsumexp * logsumexp,
            margin,
        ], dim=-1)  # [L, T, 5]
        # One batch is summed in float32 (torch sums pairwise: relative error ~1e-7 for a batch), the
        # running totals in float64; a float64 copy of [L, T, E] first cost more than the statistics.
        self._router_sums.index_add_(0, layers, per_token.sum(1).double().to(self._device))
        self._router_probs.index_add_(0, layers, probs.sum(1).double().to(self._device))
        self._top1_counts.index_add_(0, layers, top1_counts.long().to(self._device))

    def _top_from_probs(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p_(1) [L, T], p_(1) - p_(2) [L, T], top-1 counts [L, E])`` of ``probs [L, T, E]``; the runner-up
        is the maximum once the top is masked, 0 margin when tied for the top (first index counts)."""
        top1_prob = probs.amax(dim=-1, keepdim=True)
        is_top = probs == top1_prob
        tops = is_top.sum(dim=-1)  # experts sharing the top probability (1 unless tied)
        top1_prob = top1_prob.squeeze(-1)
        if self.num_experts > 1:
            margin = torch.where(tops > 1, 0.0, top1_prob - probs.masked_fill(is_top, -1.0).amax(-1))
        else:
            margin = top1_prob
        if bool((tops > 1).any()):
            return top1_prob, margin, _count_rows(probs.argmax(dim=-1), self.num_experts)
        return top1_prob, margin, is_top.sum(dim=1)

    def _accumulate_sampled_pvalues(self, batch: dict[str, Any], selections: list[Selection], indices: torch.Tensor,
                                    rows: torch.Tensor | None, device: torch.device) -> None:
        """The p-value moments of this batch's sampled tokens (all of them for ``pvalue_every`` 1), for
        the layers of ``selections``; ``indices [l, real tokens, max_k]``. Routers that compute p-values
        on demand compute only the sampled rows."""
        if batch["pvalue_index"] is None:
            pvalues = [s.pvalues for s in selections]
            if any(p is None for p in pvalues):
                return
            pvalues = torch.stack(pvalues)
            self._accumulate_pvalues(pvalues if rows is None else pvalues[:, rows], indices)
            return
        sample = batch["pvalue_rows"].to(device)
        pvalues = [s.pvalues_at(sample) for s in selections]
        if any(p is None for p in pvalues):
            return
        self._accumulate_pvalues(torch.stack(pvalues), indices.index_select(1, batch["pvalue_index"].to(device)))

    def _accumulate_pvalues(self, pvalues: torch.Tensor, indices: torch.Tensor) -> None:
        """Add ``pvalues [L, T, E]`` and those of the selected experts ``indices [L, T, max_k]`` to the
        p-value moments (batch sums in float32, running totals in float64; no boolean-mask gather, which
        would wait for the device)."""
        pvalues = pvalues.float()
        used = indices < self.num_experts
        chosen = pvalues.gather(-1, indices.clamp(max=self.num_experts - 1)) * used
        self._p_moments += torch.stack([
            pvalues.sum(), (pvalues * pvalues).sum(), torch.full((), float(pvalues.numel()), device=pvalues.device),
            chosen.sum(), used.sum().float(),
        ]).double().to(self._device)

    def _write_rows(self, batch: dict[str, Any], layer_ids: list[int], k: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor) -> None:
        """Queue one Parquet row per (real token, layer), token-major, from ``k [L, T]`` and
        ``indices`` / ``weights [L, T, max_k]``: compacted on the device, copied to the host once."""
        n_layers, tokens = k.shape
        k = k.T.int().contiguous()  # [T, L]: rows token-major
        # The k selected experts lead each row: the used slots in row-major order are exactly the flat
        # list values, so the Arrow offsets are the running sum of k and no per-row work is needed.
        slots = torch.arange(indices.shape[-1], device=k.device, dtype=torch.int32)
        used = (slots < k.unsqueeze(-1)).view(-1).nonzero().squeeze(1)  # flat [T, L, max_k] positions
        experts = indices.to(torch.int32).transpose(0, 1).reshape(-1).index_select(0, used)
        weight_bits = weights.transpose(0, 1).reshape(-1).index_select(0, used).view(torch.int32)
        meta = torch.stack([batch[key].to(k.device) for key in _META]).int()  # [4, T]
        # One int32 buffer (weights bit-cast) -> a single device-to-host copy per batch.
        packed = torch.cat([meta.reshape(-1), k.reshape(-1), experts, weight_bits]).cpu().numpy()
        total = int(packed.size - (4 + n_layers) * tokens) // 2
        meta_host, k_host = packed[: 4 * tokens].reshape(4, tokens), packed[4 * tokens: (4 + n_layers) * tokens]
        experts, weight_values = packed[(4 + n_layers) * tokens:].reshape(2, total)
        offsets = np.zeros(k_host.size + 1, dtype=np.int32)
        np.cumsum(k_host, out=offsets[1:])
        offsets = pa.array(offsets)
        columns = [pa.array(np.repeat(meta_host[j], n_layers)) for j in range(len(_META))]
        columns += [pa.array(np.tile(np.asarray(layer_ids, dtype=np.int16), tokens)),
                    pa.array(k_host.astype(np.int16)),
                    pa.ListArray.from_arrays(offsets, pa.array(experts.astype(np.int16))),
                    pa.ListArray.from_arrays(offsets, pa.array(weight_values.view(np.float32)))]
        self._writer.append(pa.RecordBatch.from_arrays(columns, schema=SCHEMA))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def summary(self) -> dict[str, Any]:
        """Routing statistics of everything recorded so far (counts as ints, rates in %)."""
        if self._k_hist is None:
            raise RuntimeError("nothing was recorded")
        return summary_from_state(self.state(), self.min_k, self.max_k)

    # The running counts as host arrays: a checkpoint or a shard saves them, and summing the states of
    # consecutive parts gives the state of the whole (see merge_states), so summaries never average averages.
    _STATE_FIELDS = ("k_hist", "expert_counts", "p_moments", "router_sums", "router_probs", "top1_counts")

    def state(self) -> dict[str, np.ndarray] | None:
        """The running counts as numpy arrays, None before the first batch: ``k_hist`` and ``expert_counts``
        ``[layers, E+1]`` int64, ``p_moments [5]``, ``router_sums [layers, 5]``, ``router_probs [layers, E]``
        float64, ``top1_counts [layers, E]`` int64 (see :meth:`_init_counts`)."""
        if self._k_hist is None:
            return None
        return {name: getattr(self, f"_{name}").cpu().numpy() for name in self._STATE_FIELDS}

    def load_state(self, state: dict[str, np.ndarray], device: torch.device | str) -> None:
        """Continue from a saved :meth:`state` (e.g. a checkpoint): later batches add to its counts."""
        self._init_counts(torch.device(device))
        for name in self._STATE_FIELDS:
            target = getattr(self, f"_{name}")
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(f"recorder state {name}: shape {tuple(state[name].shape)} does not match this "
                                 f"recorder's {tuple(target.shape)} (another model or router?)")
            target.copy_(torch.as_tensor(state[name]))


_LAST_SAMPLE: list[tuple[Any, ...]] = []  # (attention_mask, tokens_seen, every, result)


def every_nth_real_token(attention_mask: torch.Tensor, tokens_seen: int,
                         every: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The real tokens of a batch whose running ordinal ``tokens_seen + i`` (over real tokens, in the flat
    ``[batch * seq]`` order) is a multiple of ``every``: ``(their flat rows, their positions among the real
    tokens, the number of real tokens)``.

    :class:`routelab.decisions.DecisionSampler` and :class:`RoutingRecorder` of one run ask with the same
    arguments and get the very same tensors back (the last answer is kept), so a
    :class:`~routelab.routers.Selection` that computes p-values for these rows computes them once for both.
    The kept answer is for the same mask object and arguments only (a mask changed in place between the
    two calls of one batch is not supported; consecutive batches differ in ``tokens_seen`` anyway).
    """
    key = (attention_mask, tokens_seen, every)
    if _LAST_SAMPLE and _LAST_SAMPLE[0][0] is attention_mask and _LAST_SAMPLE[0][1:3] == key[1:]:
        return _LAST_SAMPLE[0][3]
    valid_flat = attention_mask.bool().reshape(-1).nonzero().squeeze(-1)
    ordinal = tokens_seen + torch.arange(valid_flat.numel(), device=valid_flat.device)
    among = (ordinal % every == 0).nonzero().squeeze(-1)
    result = (valid_flat.index_select(0, among), among, int(valid_flat.numel()))
    _LAST_SAMPLE[:] = [(*key, result)]
    return result


def _stacked(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """``torch.stack`` of per-layer tensors on ``device``, None if any layer lacks one."""
    if any(t is None for t in tensors):
        return None
    return torch.stack([t.to(device) for t in tensors])


def _count_rows(values: torch.Tensor, size: int) -> torch.Tensor:
    """``[rows, size]`` int64 occurrences of each value ``0..size-1`` in each row of ``values [rows, n]``
    (one scatter for all rows; unlike ``bincount``, never waits for the device)."""
    rows = values.shape[0]
    flat = values.long() + torch.arange(rows, device=values.device).unsqueeze(1) * size
    return torch.zeros(rows * size, dtype=torch.long, device=values.device).scatter_add_(
        0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.long, device=values.device)).view(rows, size)


def _k_stats(hist: np.ndarray, min_k: int, max_k: int) -> dict[str, float]:
    ks = np.arange(hist.size)
    total = hist.sum()
    mean = float((hist * ks).sum() / total)
    present = ks[hist > 0]
    cdf = np.cumsum(hist) / total
    return {
        "decisions": int(total),
        "experts_mean": mean,
        "experts_std": float(np.sqrt((hist * (ks - mean) ** 2).sum() / total)),
        "experts_median": float(ks[np.searchsorted(cdf, 0.5)]),
        "experts_min": int(present.min()),
        "experts_max": int(present.max()),
        "ceiling_hit_rate": float(100.0 * hist[max_k] / total),
        "floor_hit_rate": float(100.0 * hist[min_k] / total),
    }


def routing_summary(k_hist: np.ndarray, expert_counts: np.ndarray, min_k: int, max_k: int,
                    p_moments: np.ndarray | None = None, router_sums: RouterSums | None = None) -> dict[str, Any]:
    """Reduce per-layer histograms of k ``[layers, E+1]`` and expert counts ``[layers, E]``.

    With ``router_sums``, each ``per_layer`` entry and the top level (mean over layers) also carry the
    statistics of :data:`routelab.routing_stats.ROUTER_STAT_KEYS`, and ``top1_counts`` ``[layers][E]``
    counts tokens by their most probable expert; without, those keys are None.
    """
    overall = _k_stats(k_hist.sum(axis=0), min_k, max_k)
    summary: dict[str, Any] = {"total_decisions": overall.pop("decisions"), **overall,
                               "min_k": min_k, "max_k": max_k}
    if p_moments is not None and p_moments[2] > 0:
        mean = p_moments[0] / p_moments[2]
        summary["pvalue_mean"] = float(mean)
        summary["pvalue_std"] = float(np.sqrt(max(p_moments[1] / p_moments[2] - mean**2, 0.0)))
        summary["selected_pvalue_mean"] = float(p_moments[3] / max(p_moments[4], 1))
    else:
        summary["pvalue_mean"] = summary["pvalue_std"] = summary["selected_pvalue_mean"] = None
    per_layer = [{"layer": i, **_k_stats(h, min_k, max_k)} for i, h in enumerate(k_hist)]
    if router_sums is not None:
        for entry in per_layer:
            entry.update(layer_router_stats(router_sums, expert_counts, entry["layer"]))
        summary.update(mean_over_layers(per_layer))
    else:
        for entry in (summary, *per_layer):
            entry.update(dict.fromkeys(ROUTER_STAT_KEYS))
    summary["per_layer"] = per_layer
    summary["k_histogram"] = {str(k): int(c) for k, c in enumerate(k_hist.sum(axis=0)) if c}
    summary["expert_counts"] = expert_counts.astype(int).tolist()
    summary["top1_counts"] = router_sums.top1_counts.astype(int).tolist() if router_sums is not None else None
    return summary


def summary_from_state(state: dict[str, np.ndarray], min_k: int, max_k: int) -> dict[str, Any]:
    """:func:`routing_summary` of a :meth:`RoutingRecorder.state` (one run's, or merged parts')."""
    num_experts = state["router_probs"].shape[1]
    sums = state["router_sums"]
    router_sums = RouterSums(tokens=sums[:, 0], weight_entropy=sums[:, 1], router_entropy=sums[:, 2],
                             logsumexp_squared=sums[:, 3], top1_margin=sums[:, 4],
                             router_probs=state["router_probs"], top1_counts=state["top1_counts"])
    return routing_summary(state["k_hist"], state["expert_counts"][:, :num_experts], min_k, max_k,
                           state["p_moments"], router_sums)


def merge_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The state of consecutive parts of one run (shards), by summing their counts and sums.

    Integer counts merge exactly; the float64 sums equal one run's up to summation order (~1e-15 relative).
    """
    if not states:
        raise ValueError("merge_states: no states to merge")
    return {name: np.sum([state[name] for state in states], axis=0) for name in states[0]}


class RecorderGroup:
    """Several recorders behind one: every call goes to each (e.g. the full log and the sampled detail)."""

    def __init__(self, *recorders: Any):
        self.recorders = recorders

    def begin_batch(self, *args: Any) -> None:
        for recorder in self.recorders:
            recorder.begin_batch(*args)

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        for recorder in self.recorders:
            recorder.record(layer, router_logits, selection)

    def end_batch(self) -> None:
        for recorder in self.recorders:
            recorder.end_batch()

    def close(self) -> None:
        for recorder in self.recorders:
            recorder.close()

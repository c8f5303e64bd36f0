"""Record every routing decision: per (token, layer) rows to Parquet plus running summary counts.

Decisions are gathered on the model's device during the forward pass and copied to the host once per
batch. ``routing.parquet`` has one row per (token, MoE layer):

``window_id int32, doc_id int32, position int32, token_id int32, layer int16, k int16,
experts list<int16>, weights list<float32>`` (only the ``k`` selected experts, most preferred first).

Alongside, running sums of per-token router statistics (entropies, z-loss, top-1 margin, per-expert
probability mass and top-1 counts; see :mod:`routelab.routing_stats`) stay on the device and are reduced
only in :meth:`RoutingRecorder.summary`: recording a layer never waits for the device.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .io import BatchedParquetWriter
from .routers import Selection
from .routing_stats import ROUTER_STAT_KEYS, RouterSums, layer_router_stats, mean_over_layers

SCHEMA = pa.schema([
    ("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("layer", pa.int16()), ("k", pa.int16()), ("experts", pa.list_(pa.int16())), ("weights", pa.list_(pa.float32())),
])


class RoutingRecorder:
    """Collects one run's routing decisions; pass it to :func:`routelab.patching.install_router`.

    Call :meth:`begin_batch` before each forward pass (it says which positions are real tokens) and
    :meth:`end_batch` after it; :meth:`close` finishes the Parquet file, :meth:`summary` reduces the
    running counts.
    """

    def __init__(self, num_layers: int, num_experts: int, min_k: int, max_k: int,
                 path: str | os.PathLike | None = None, row_group_size: int = 1 << 20):
        self.num_layers, self.num_experts, self.min_k, self.max_k = num_layers, num_experts, min_k, max_k
        self._writer = BatchedParquetWriter(path, SCHEMA, row_group_size) if path is not None else None
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
        rows, cols = valid.nonzero(as_tuple=True)
        self._batch = {
            # Row indices of real tokens in the flat [batch * seq] layout: found once per batch, so that
            # selecting them in every layer needs no device-to-host sync (a boolean mask would).
            "flat_rows": valid.reshape(-1).nonzero().squeeze(1),
            "window_id": window_ids.to(valid.device)[rows], "doc_id": doc_ids.to(valid.device)[rows],
            "position": cols, "token_id": input_ids[rows, cols],
        }
        self._layers = {}
        if self._k_hist is None:
            self._init_counts(valid.device)

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """Called from the patched router for every layer of every forward pass."""
        if self._batch is None:
            return
        rows = self._batch["flat_rows"].to(selection.k.device)
        k, indices, weights = selection.k[rows], selection.indices[rows], selection.weights[rows]
        self._k_hist[layer] += _count(k, self.num_experts + 1).to(self._device)
        self._expert_counts[layer] += _count(indices.reshape(-1), self.num_experts + 1).to(self._device)
        self._accumulate_router_stats(layer, router_logits[rows.to(router_logits.device)], indices, weights)
        if selection.pvalues is not None:
            p = selection.pvalues[rows].double()
            used = indices < self.num_experts
            chosen = p.gather(-1, indices.clamp(max=self.num_experts - 1))[used]
            self._p_moments += torch.stack([p.sum(), (p * p).sum(), torch.tensor(float(p.numel()), device=p.device,
                                            dtype=torch.float64), chosen.sum(),
                                            torch.tensor(float(chosen.numel()), device=p.device, dtype=torch.float64)]
                                           ).to(self._device)
        self._layers[layer] = (k, indices, weights.float())

    def _accumulate_router_stats(self, layer: int, logits: torch.Tensor, indices: torch.Tensor,
                                 weights: torch.Tensor) -> None:
        """Add real tokens' logits ``[T, E]`` and selection ``[T, max_k]`` to the layer's running sums."""
        logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        logsumexp = torch.logsumexp(logits, dim=-1)
        top = probs.topk(min(2, self.num_experts), dim=-1).values
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
        # Unused slots hold weight 0 and add 0 to the entropy (xlogy(0, 0) = 0).
        selected = weights.float() * (indices < self.num_experts)
        selected = selected / selected.sum(-1, keepdim=True).clamp_min(torch.finfo(selected.dtype).tiny)
        per_token = torch.stack([
            torch.ones_like(logsumexp),
            -torch.special.xlogy(selected, selected).sum(-1),
            -(probs * log_probs).sum(-1),
            logsumexp.square(),
            margin,
        ], dim=1)
        self._router_sums[layer] += per_token.double().sum(0).to(self._device)
        self._router_probs[layer] += probs.double().sum(0).to(self._device)
        self._top1_counts[layer] += _count(probs.argmax(-1), self.num_experts).to(self._device)

    def end_batch(self) -> None:
        """Move this batch's decisions to the host in one copy per tensor and queue them for Parquet."""
        if self._batch is None or self._writer is None or not self._layers:
            self._batch = None
            return
        layers = sorted(self._layers)
        k = torch.stack([self._layers[i][0] for i in layers], dim=1).cpu().numpy()  # [T, L]
        idx = torch.stack([self._layers[i][1] for i in layers], dim=1).cpu().numpy()  # [T, L, max_k]
        w = torch.stack([self._layers[i][2] for i in layers], dim=1).cpu().numpy()
        tokens, n_layers = k.shape
        meta = {key: self._batch[key].cpu().numpy().astype(np.int32) for key in ("window_id", "doc_id", "position",
                                                                                 "token_id")}
        used = np.arange(idx.shape[-1]) < k[..., None]
        offsets = np.concatenate([[0], np.cumsum(k.reshape(-1))]).astype(np.int32)
        columns = {key: np.repeat(value, n_layers) for key, value in meta.items()}
        columns["layer"] = np.tile(np.asarray(layers, dtype=np.int16), tokens)
        columns["k"] = k.reshape(-1).astype(np.int16)
        columns["experts"] = pa.ListArray.from_arrays(offsets, idx[used].astype(np.int16))
        columns["weights"] = pa.ListArray.from_arrays(offsets, w[used].astype(np.float32))
        self._writer.append(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))
        self._batch = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def summary(self) -> dict[str, Any]:
        """Routing statistics of everything recorded so far (counts as ints, rates in %)."""
        if self._k_hist is None:
            raise RuntimeError("nothing was recorded")
        k_hist = self._k_hist.cpu().numpy()
        counts = self._expert_counts.cpu().numpy()[:, : self.num_experts]
        sums = self._router_sums.cpu().numpy()
        router_sums = RouterSums(tokens=sums[:, 0], weight_entropy=sums[:, 1], router_entropy=sums[:, 2],
                                 logsumexp_squared=sums[:, 3], top1_margin=sums[:, 4],
                                 router_probs=self._router_probs.cpu().numpy(),
                                 top1_counts=self._top1_counts.cpu().numpy())
        return routing_summary(k_hist, counts, self.min_k, self.max_k, self._p_moments.cpu().numpy(), router_sums)


def _count(values: torch.Tensor, size: int) -> torch.Tensor:
    """``[size]`` int64 occurrences of each value in ``0..size-1``; unlike ``bincount``, never syncs."""
    return torch.zeros(size, dtype=torch.long, device=values.device).scatter_add_(
        0, values.long(), torch.ones_like(values, dtype=torch.long))


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

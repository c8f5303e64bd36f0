"""Record every routing decision: per (token, layer) rows to Parquet plus running summary counts.

Decisions are gathered on the model's device during the forward pass and copied to the host once per
batch. ``routing.parquet`` has one row per (token, MoE layer):

``window_id int32, doc_id int32, position int32, token_id int32, phase dictionary<string>, layer int16,
k int16, experts list<int16>, weights list<float32>`` (only the ``k`` selected experts, most preferred
first; ``phase``: ``prefill`` or ``decode``, a generation step's token).

Alongside, running sums of per-token router statistics (entropies, z-loss, top-1 margin, per-expert
probability mass and top-1 counts; see :mod:`routelab.record.statistics`) stay on the device and are reduced
only in :meth:`RoutingRecorder.summary`: recording a layer never waits for the device.

During the forward pass the recorder only keeps each layer's tensors; :meth:`RoutingRecorder.end_batch`
does the work once per batch: each layer's ``[tokens, experts]`` reductions on its own tensors, everything
smaller stacked and reduced over all layers at once (statistics, counts by a scatter per count, the
selection compacted on the device and copied to the host as one buffer, kept compact in a reused arena
of host memory, :class:`routelab.io.arena.BufferArena`), and a background thread expands each batch into
its columns and compresses and writes the row groups (:class:`routelab.io.parquet.BatchedParquetWriter`).
The summary statistics are reduced from the running counts by :mod:`routelab.record.statistics`.
"""

from __future__ import annotations

import os
from numbers import Integral
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from routelab.io.arena import BufferArena, arrow_backed, pack_for_writer
from routelab.io.parquet import BatchedParquetWriter
from routelab.record.batch import (
    PHASE_TYPE,
    WINDOW_FIELDS,
    BatchContext,
    on_device,
    pack_token_meta,
    phase_array,
    unpack_token_meta,
)
from routelab.record.statistics import summary_from_state
from routelab.routing.contract import Selection

# No column holds nulls, and saying so spares Parquet the definition levels; the list columns are
# written without dictionary encoding (weights never repeat enough, and expert lists compress well
# without: less encoding time and smaller files, see benchmarks/README.md).
SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in (
    ("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("phase", PHASE_TYPE), ("layer", pa.int16()), ("k", pa.int16()),
    ("experts", pa.list_(pa.field("element", pa.int16(), nullable=False))),
    ("weights", pa.list_(pa.field("element", pa.float32(), nullable=False))),
)])
_DICTIONARY_COLUMNS = ["window_id", "doc_id", "position", "token_id", "layer", "k"]
_STATS_ELEMENTS = 1 << 24  # sampled p-value moments take at most this many p-values (layers x tokens x E) at once
_LOG_FLOOR = 1e-30  # a normal float32: log(0) and log(subnormal) are several times slower


class RoutingRecorder:
    """Collects one run's routing decisions (the :class:`~routelab.record.batch.Recorder` protocol).

    Call :meth:`begin_batch` with each forward pass's :class:`~routelab.record.batch.BatchContext` (a
    :class:`~routelab.record.batch.Recording` does) and :meth:`end_batch` after it; :meth:`close`
    finishes the Parquet file, :meth:`summary` reduces the running counts. Everything is over every real
    token except the p-value moments (``pvalue_mean``, ``pvalue_std``, ``selected_pvalue_mean``): those
    are over every ``pvalue_every``-th real token (1: all; 0: none), because p-values cost a table lookup
    per expert that routers otherwise skip (:meth:`routelab.routing.Selection.pvalues_at`). The pipeline
    samples them like decisions.parquet.
    """

    def __init__(self, num_layers: int, num_experts: int, min_k: int, max_k: int,
                 path: str | os.PathLike | None = None, row_group_size: int = 1 << 20, pvalue_every: int = 1):
        if isinstance(pvalue_every, bool) or not isinstance(pvalue_every, Integral) or pvalue_every < 0:
            raise ValueError(f"pvalue_every: {pvalue_every!r} is not valid; need an integer >= 0 "
                             "(1 = every token, n = every n-th token, 0 = no p-value statistics)")
        self.num_layers, self.num_experts, self.min_k, self.max_k = num_layers, num_experts, min_k, max_k
        # p-value moments over every n-th real token of the run (BatchContext.sample), the tokens
        # DecisionSampler keeps when it samples alike
        self.pvalue_every = int(pvalue_every)
        self._writer = (BatchedParquetWriter(path, SCHEMA, row_group_size, use_dictionary=_DICTIONARY_COLUMNS)
                        if path is not None else None)
        self._arena = BufferArena()  # host memory of the batches waiting for their row group
        self._batch: BatchContext | None = None
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._device: torch.device | None = None
        self._layer_sets: dict[tuple, _LayerSet] = {}  # per set of layers and device
        self._slots: dict[tuple, torch.Tensor] = {}  # arange(max_k) per max_k and device
        self._workspace: dict[tuple, dict[str, torch.Tensor]] = {}  # per-batch buffers, per shape and device
        self._k_hist = self._expert_counts = self._p_moments = None
        self._router_sums = self._router_probs = self._top1_counts = None

    def _init_counts(self, device: torch.device) -> None:
        self._device = device
        layers, experts = self.num_layers, self.num_experts
        # The three integer counts share one buffer, [layers, k histogram (E+1) | expert counts (E+1) |
        # top-1 counts (E)], so that a batch adds all of them with a single scatter (_add_counts).
        self._counts = torch.zeros(layers, 3 * experts + 2, dtype=torch.long, device=device)
        self._k_hist = self._counts[:, : experts + 1]
        self._expert_counts = self._counts[:, experts + 1: 2 * experts + 2]
        self._top1_counts = self._counts[:, 2 * experts + 2:]
        self._ones = torch.ones(0, dtype=torch.long, device=device)  # grown on demand, for scatter_add_
        # sum p, sum p^2, count, sum p over selected, count selected  (float64 for exact-ish sums)
        self._p_moments = torch.zeros(5, dtype=torch.float64, device=device)
        # per layer: [tokens, sum weight entropy, sum router entropy, sum logsumexp^2, sum top-1 margin |
        # sum of each expert's probability]: one buffer, so that a batch adds all of them at once
        self._router = torch.zeros(layers, 5 + experts, dtype=torch.float64, device=device)
        self._router_sums, self._router_probs = self._router[:, :5], self._router[:, 5:]

    def begin_batch(self, batch: BatchContext) -> None:
        """The batch the next :meth:`record` calls belong to (padding is not recorded)."""
        self._batch = batch
        self._layers = {}
        if self._k_hist is None:
            self._init_counts(batch.device)

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """Called from the patched router for every layer of every forward pass: keeps references only
        (until :meth:`end_batch`: the logits and the selection, with the router's float32 probabilities,
        ``tokens x experts x 4`` bytes per layer — 17 MB per layer for 65k tokens of OLMoE).

        ``router_logits [tokens, E]`` and the selection (``[tokens, max_k]``, ``k [tokens]``, optional
        ``pvalues [tokens, E]``) over the flat ``batch * seq`` tokens. All work happens in
        :meth:`end_batch`, most of it batched over layers: one set of kernels per forward instead of one
        per layer.
        """
        if self._batch is None:
            return
        # Families whose probabilities are not the softmax of their router logits (sigmoid scores, a
        # candidate mask) give logits that are: the statistics below describe the probabilities rules saw.
        logits = router_logits if selection.softmax_logits is None else selection.softmax_logits
        self._layers[layer] = (logits, selection)

    def end_batch(self) -> None:
        """Add the batch to the running counts and queue its rows for Parquet (one host copy)."""
        batch, self._batch = self._batch, None
        layers_seen, self._layers = self._layers, {}
        if batch is None or not layers_seen:
            return
        self._process(batch, layers_seen)

    def _process(self, batch: BatchContext, layers_seen: dict[int, tuple[torch.Tensor, Selection]]) -> None:
        """:meth:`end_batch`'s work on one batch's metadata and per-layer ``(logits, selection)``.

        CPU time here goes mostly to the fixed cost of each tensor op (several microseconds, more when the
        forward pass has just evicted torch's own code and data from the caches), so the ops are few: the
        ``[T, E]`` reductions run on each layer's own tensors (a stack of every layer's logits or
        probabilities would copy them) straight into per-batch buffers that are reused, and everything
        smaller is stacked once, token-major (``[T, L, ...]``, the order of routing.parquet's rows), and
        reduced over all layers at once."""
        layer_ids = sorted(layers_seen)
        selections = [layers_seen[i][1] for i in layer_ids]
        device = selections[0].k.device
        k = torch.stack([s.k for s in selections], dim=1)  # [T, L]
        indices = torch.stack([s.indices for s in selections], dim=1)  # [T, L, max_k]
        weights = torch.stack([s.weights for s in selections], dim=1)
        if weights.dtype != torch.float32:
            weights = weights.float()
        rows = batch.real_rows
        if rows is not None:  # drop the padding (a gather on the device, no sync)
            rows = on_device(rows, device)
            k, indices, weights = k.index_select(0, rows), indices.index_select(0, rows), weights.index_select(0, rows)
        tokens = k.shape[0]
        layers = self._layer_set(layer_ids, device)
        work = self._buffers(len(layer_ids), tokens, device)
        top_probs, own_top = [], []
        for i, (layer, selection) in enumerate(zip(layer_ids, selections)):
            probs, top = self._reduce_layer(on_device(layers_seen[layer][0], device), selection, rows, work, i)
            top_probs.append(probs)
            own_top.append(top)
        top_probs = torch.stack(top_probs)  # [L, T, 2]
        if all(top is None for top in own_top):  # the routers' top experts: slot 0 of their selections
            top_expert = indices[..., 0]
        else:  # some layer counted its own top-1 from its probabilities: every layer is counted on its own
            top_expert = None
            counts = [_count(indices[:, i, 0], self.num_experts) if top is None else top
                      for i, top in enumerate(own_top)]
            self._top1_counts.index_add_(0, layers.ids, torch.stack(counts).to(self._device))
        # logsumexp = max logit - log p_(1) (the largest probability belongs to the largest logit), and
        # entropy_t = sum_e p_te (logsumexp_t - logit_te) = logsumexp_t - <p_t, logits_t>.
        logsumexp = work["top_logit"] - top_probs[..., 0].log()  # [L, T]
        # Unused slots hold weight 0 (the Selection contract) and add 0 x log(tiny) = 0 to the entropy; the
        # clamp keeps log off 0 and subnormals (much slower than normal floats on CPU; xlogy is not vectorised).
        selected = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        sums = work["sums"]  # [L, 5 + E]: tokens (filled in once), the four sums below, the probability sums
        torch.sum(torch.linalg.vecdot(selected, selected.clamp_min(_LOG_FLOOR).log()), 0, out=sums[:, 1]).neg_()
        torch.sum(logsumexp - work["p_dot_logit"], 1, out=sums[:, 2])  # router entropy
        torch.linalg.vecdot(logsumexp, logsumexp, out=sums[:, 3])
        torch.sum(top_probs[..., 0] - top_probs[..., 1], 1, out=sums[:, 4])  # top-1 margin
        # One batch is summed in float32 (torch sums pairwise: relative error ~1e-7 for a batch), the
        # running totals in float64.
        self._router.index_add_(0, layers.ids, sums.to(self._device, torch.float64))
        self._add_counts(layers, k, indices, top_expert)
        if self.pvalue_every:
            # a few layers at a time: all p-values of a long batch (pvalue_every 1) would be [T, L, E] at once
            group = max(1, _STATS_ELEMENTS // max(1, tokens * self.num_experts))
            for start in range(0, len(layer_ids), group):
                part = slice(start, start + group)
                self._accumulate_sampled_pvalues(batch, layer_ids[part], selections[part], indices[:, part], rows,
                                                 device)
        if self._writer is not None:
            self._write_rows(batch, layer_ids, k, indices, weights, device)

    def _layer_set(self, layer_ids: list[int], device: torch.device) -> _LayerSet:
        key = (tuple(layer_ids), str(device))
        if key not in self._layer_sets:
            self._layer_sets[key] = _LayerSet(layer_ids, self.num_layers, self.num_experts, device, self._device)
        return self._layer_sets[key]

    def _buffers(self, n_layers: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-batch float32 buffers for ``n_layers`` layers of ``tokens`` tokens, reused by later batches
        of that shape (the last shape asked for is kept): ``top_logit`` and ``p_dot_logit`` ``[L, T]``,
        ``sums`` ``[L, 5 + E]`` whose first column holds ``tokens``."""
        key = (n_layers, tokens, str(device))
        if key not in self._workspace:
            sums = torch.zeros(n_layers, 5 + self.num_experts, device=device)
            sums[:, 0] = tokens
            self._workspace = {key: {"top_logit": torch.empty(n_layers, tokens, device=device),
                                     "p_dot_logit": torch.empty(n_layers, tokens, device=device), "sums": sums}}
        return self._workspace[key]

    def _reduce_layer(self, logits: torch.Tensor, selection: Selection, rows: torch.Tensor | None,
                      work: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's ``[T, E]`` reductions over its real tokens (``rows`` of the flat batch, None: all),
        written into row ``i`` of the batch buffers (max logit, ``<probabilities, logits>``, probability
        sums); returns the top-2 probabilities ``[T, 2]`` and, when the router gave no top expert, the
        layer's top-1 counts ``[E]`` (else None: the router's top expert is its selection's first slot).
        The probabilities, top expert and top-2 probabilities are the router's when it gives them (see
        :class:`routelab.routing.Selection`)."""
        probs, top_expert, top_probs = selection.probs, selection.top_expert, selection.top_probs
        if rows is not None:
            logits = logits.index_select(0, rows)
            probs = None if probs is None else probs.index_select(0, rows)
            top_expert = None if top_expert is None else top_expert.index_select(0, rows)
            top_probs = None if top_probs is None else top_probs.index_select(0, rows)
        if logits.dtype != torch.float32:
            logits = logits.float()
        if probs is None:
            probs = torch.softmax(logits, dim=-1)
        # First the pass that streams all of the logits and probabilities (the forward pass has evicted
        # them from the caches; afterwards they sit in L2 for the rest). Per token: the entropy is a
        # small difference of two such numbers, so it is taken per token before summing (a dot product
        # over the whole layer lost up to 1e-5 relative on 100k tokens).
        torch.linalg.vecdot(probs, logits, out=work["p_dot_logit"][i])
        counts = None
        if top_expert is not None and top_probs is not None:
            torch.gather(logits, 1, top_expert.view(-1, 1), out=work["top_logit"][i].view(-1, 1))
        else:
            torch.amax(logits, dim=-1, out=work["top_logit"][i])
            top_probs, counts = _top_from_probs(probs)
        torch.sum(probs, 0, out=work["sums"][i, 5:])
        return top_probs, counts

    def _add_counts(self, layers: _LayerSet, k: torch.Tensor, indices: torch.Tensor,
                    top_expert: torch.Tensor | None) -> None:
        """Add the histogram of ``k [T, L]``, the counts of ``indices [T, L, max_k]`` (the sentinel in
        its own bin) and, if given, of ``top_expert [T, L]`` to their layers: a scatter per count into
        the count buffer's rows (never waits for the device); for some of the layers only, into a
        zeroed buffer added to theirs."""
        tokens, n_layers, max_k = indices.shape
        if self._ones.numel() < tokens * n_layers * max_k:
            self._ones = torch.ones(2 * tokens * n_layers * max_k, dtype=torch.long, device=self._device)
        target = self._counts if layers.all else layers.scratch.zero_()
        experts = self.num_experts
        ones = self._ones[: tokens * n_layers].view(n_layers, tokens)
        target[:, : experts + 1].scatter_add_(1, on_device(k.T, self._device), ones)
        # layer-major for the scatter (one copy of the indices)
        by_layer = indices.permute(1, 0, 2).reshape(n_layers, tokens * max_k)
        target[:, experts + 1: 2 * experts + 2].scatter_add_(
            1, on_device(by_layer, self._device), self._ones[: tokens * n_layers * max_k].view(n_layers, -1))
        if top_expert is not None:
            target[:, 2 * experts + 2:].scatter_add_(1, on_device(top_expert.T, self._device), ones)
        if not layers.all:
            self._counts.index_add_(0, layers.ids, target)

    def _accumulate_sampled_pvalues(self, batch: BatchContext, layer_ids: list[int], selections: list[Selection],
                                    indices: torch.Tensor, rows: torch.Tensor | None, device: torch.device) -> None:
        """The p-value moments of this batch's sampled tokens (all of them for ``pvalue_every`` 1), for
        the layers ``layer_ids`` of ``selections``; ``indices [real tokens, l, max_k]``. Routers that compute
        p-values on demand compute only the sampled rows, once for all recorders
        (:meth:`BatchContext.sampled_pvalues`)."""
        if self.pvalue_every == 1:
            pvalues = [s.pvalues for s in selections]
            if any(p is None for p in pvalues):
                return
            pvalues = torch.stack(pvalues, dim=1)  # [tokens, l, E]
            self._accumulate_pvalues(pvalues if rows is None else pvalues.index_select(0, rows), indices)
            return
        pvalues = batch.sampled_pvalues(self.pvalue_every, layer_ids, selections, device)  # [l, sampled, E]
        if pvalues is not None:
            sampled = on_device(batch.sample(self.pvalue_every).index, device)
            self._accumulate_pvalues(pvalues, indices.index_select(0, sampled).transpose(0, 1))

    def _accumulate_pvalues(self, pvalues: torch.Tensor, indices: torch.Tensor) -> None:
        """Add ``pvalues [..., E]`` and those of the selected experts ``indices [..., max_k]`` (the same
        leading shape) to the p-value moments (batch sums in float32, running totals in float64; no
        boolean-mask gather, which would wait for the device)."""
        if pvalues.dtype != torch.float32:
            pvalues = pvalues.float()
        used = indices < self.num_experts
        chosen = pvalues.gather(-1, indices.clamp(max=self.num_experts - 1)) * used
        self._p_moments += torch.stack([
            pvalues.sum(), (pvalues * pvalues).sum(), torch.full((), float(pvalues.numel()), device=pvalues.device),
            chosen.sum(), used.sum().float(),
        ]).to(self._device, torch.float64)

    def _write_rows(self, batch: BatchContext, layer_ids: list[int], k: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor, device: torch.device) -> None:
        """Queue one Parquet row per (real token, layer), token-major, from ``k [T, L]`` and
        ``indices`` / ``weights [T, L, max_k]``: compacted on the device and written straight into one
        buffer of host memory from the arena (one copy to the host), expanded into columns on the writer thread."""
        tokens, n_layers = k.shape
        # The k selected experts lead each row: the used slots in row-major order are exactly the flat
        # list values, so the Arrow offsets are the running sum of k and no per-row work is needed.
        slots = self._slots.get((indices.shape[-1], str(device)))
        if slots is None:
            slots = self._slots[(indices.shape[-1], str(device))] = torch.arange(indices.shape[-1], device=device)
        used = (k.unsqueeze(-1) > slots).view(-1).nonzero().squeeze(1)  # flat [T, L, max_k] positions
        experts = indices.view(-1).index_select(0, used).to(torch.int16)
        chosen = weights.view(-1).index_select(0, used)
        rows = batch.real_rows
        meta = pack_token_meta(batch, rows, device)
        buffer, _ = pack_for_writer([meta, chosen, k.to(torch.int16), experts], self._arena)  # 4-byte values first
        self._writer.append(_CompactRows(buffer, len(batch.window_ids), batch.seq, tokens, layer_ids,
                                         used.numel(), padded=rows is not None))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._arena = BufferArena()  # every batch is written: its chunks are unmapped

    @property
    def encode_seconds(self) -> float:
        """CPU time the Parquet writer's thread has spent encoding and writing routing.parquet so far."""
        return 0.0 if self._writer is None else self._writer.encode_seconds

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
        # copies: the running counts are views of shared buffers that later batches keep adding to
        return {name: getattr(self, f"_{name}").cpu().numpy().copy() for name in self._STATE_FIELDS}

    def load_state(self, state: dict[str, np.ndarray], device: torch.device | str) -> None:
        """Continue from a saved :meth:`state` (e.g. a checkpoint): later batches add to its counts."""
        self._init_counts(torch.device(device))
        for name in self._STATE_FIELDS:
            target = getattr(self, f"_{name}")
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(f"recorder state {name}: shape {tuple(state[name].shape)} does not match this "
                                 f"recorder's {tuple(target.shape)} (another model or router?)")
            target.copy_(torch.as_tensor(state[name]))


def _top_from_probs(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-2 probabilities [T, 2], top-1 counts [E])`` of ``probs [T, E]``: the runner-up is the maximum
    once the top is masked, so a tie for the top gives both slots the top probability (margin 0); the
    counts credit the first of tied experts. Value reductions (several times cheaper than an index
    reduction on CPU), with ``argmax`` where there is a tie, or always on an accelerator (no sync)."""
    experts = probs.shape[-1]
    top1 = probs.amax(dim=-1, keepdim=True)
    is_top = probs == top1
    tops = is_top.sum(dim=-1)  # experts sharing the top probability (1 unless tied)
    second = probs.masked_fill(is_top, -1.0).amax(-1, keepdim=True) if experts > 1 else torch.zeros_like(top1)
    top_probs = torch.cat([top1, torch.where(tops.unsqueeze(-1) > 1, top1, second)], dim=-1)
    if probs.device.type != "cpu" or bool((tops > 1).any()):
        counts = _count(probs.argmax(dim=-1), experts)
    else:
        counts = is_top.sum(dim=0)
    return top_probs, counts


class _LayerSet:
    """For one set of recorded layers (kept per set): their ids on the count device, whether they are all
    the model's layers in order (then counts are added in place), else a scratch count buffer."""

    def __init__(self, layer_ids: list[int], num_layers: int, num_experts: int, device: torch.device,
                 count_device: torch.device):
        self.ids = torch.as_tensor(layer_ids, device=count_device)
        self.all = list(layer_ids) == list(range(num_layers))
        self.scratch = None if self.all else torch.zeros(len(layer_ids), 3 * num_experts + 2, dtype=torch.long,
                                                          device=count_device)


class _CompactRows:
    """One batch of routing.parquet rows as kept until its row group is written, in one buffer of host
    memory (:class:`routelab.io.arena.BufferArena`): each window's ids once, each real token's id once (not
    once per layer), with padding the real tokens' flat rows, then the selected weights, k and the
    selected experts (~15 bytes per row at mean k 2, against ~41 for the full columns). :meth:`to_batch`
    expands it into the record batch on the Parquet writer's thread (see
    :class:`routelab.io.parquet.BatchedParquetWriter`), so the model's thread neither builds the columns nor
    touches their memory: fresh memory costs a page fault per 4 KiB on first touch, and such faults took
    more time than all the statistics on CPU."""

    __slots__ = ("num_rows", "_buffer", "_windows", "_seq", "_tokens", "_layer_ids", "_total", "_padded")

    def __init__(self, buffer: pa.Buffer, windows: int, seq: int, tokens: int, layer_ids: list[int], total: int,
                 padded: bool):
        """``buffer``: int32 ``[window ids | doc ids | position offsets | phases (windows each) | token ids
        (tokens) | flat rows (tokens, only if padded)]``, float32 ``weights (total)``, int16 ``[k (tokens x
        layers, token-major) | experts (total)]``, as :meth:`RoutingRecorder._write_rows` writes it."""
        self._buffer, self._windows, self._seq, self._tokens = buffer, windows, seq, tokens
        self._layer_ids, self._total, self._padded = list(layer_ids), total, padded
        self.num_rows = tokens * len(self._layer_ids)

    def to_batch(self) -> pa.RecordBatch:
        """The full record batch with :data:`SCHEMA`: each token's metadata repeated for each layer, the
        layer column, and list offsets from the running sum of k (the selected experts lead each row)."""
        windows, tokens, n_layers = self._windows, self._tokens, len(self._layer_ids)
        rows, total = self.num_rows, self._total
        n_meta = WINDOW_FIELDS * windows + tokens * (2 if self._padded else 1)
        *per_token, phases = unpack_token_meta(np.frombuffer(self._buffer, dtype=np.int32, count=n_meta), windows,
                                               tokens, self._seq)
        start = 4 * n_meta
        weights = self._buffer.slice(start, 4 * total)
        k = np.frombuffer(self._buffer, dtype=np.int16, count=rows, offset=start + 4 * total)
        experts = self._buffer.slice(start + 4 * total + 2 * rows, 2 * total)
        columns = []
        for values in per_token:  # each token's value once per layer
            buffer, repeated = arrow_backed(np.int32, rows)
            np.copyto(repeated.reshape(tokens, n_layers), values[:, None])
            columns.append(pa.Array.from_buffers(pa.int32(), rows, [None, buffer]))
        columns.append(phase_array(np.repeat(phases, n_layers)))
        buffer, layer = arrow_backed(np.int16, rows)
        layer.reshape(tokens, n_layers)[:] = self._layer_ids
        columns.append(pa.Array.from_buffers(pa.int16(), rows, [None, buffer]))
        columns.append(pa.Array.from_buffers(pa.int16(), rows, [None, self._buffer.slice(start + 4 * total, 2 * rows)]))
        offsets_buffer, offsets = arrow_backed(np.int32, rows + 1)
        offsets[0] = 0
        np.cumsum(k, out=offsets[1:])
        for kind, values in ((pa.int16(), experts), (pa.float32(), weights)):
            columns.append(pa.ListArray.from_buffers(
                pa.list_(pa.field("element", kind, nullable=False)), rows, [None, offsets_buffer],
                children=[pa.Array.from_buffers(kind, total, [None, values])]))
        return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _count(values: torch.Tensor, size: int) -> torch.Tensor:
    """``[size]`` int64 occurrences of each value ``0..size-1`` in ``values`` (no device sync, unlike bincount)."""
    return torch.zeros(size, dtype=torch.long, device=values.device).index_add_(
        0, values.reshape(-1), torch.ones(values.numel(), dtype=torch.long, device=values.device))

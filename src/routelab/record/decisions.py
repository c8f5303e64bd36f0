"""Sampled routing detail: every n-th real token's full decision (logits, p-values, BH steps) to Parquet.

:class:`DecisionSampler` has the recorder interface (``begin_batch``, ``record``, ``end_batch``,
``close``). It keeps every ``every_n``-th real (non-padding) token, counted by one global counter over
all batches in row-major order (batch row, then position), so the sample is deterministic and holds
``ceil(real tokens / every_n)`` tokens. Kept tokens are picked on the model's device; each batch is
copied to the host once, and the logit statistics, sorted p-values, BH rank and rows are computed on the
Parquet writer's thread. ``decisions.parquet`` has one row per (kept token, MoE layer), token-major:

``window_id, doc_id, position, token_id int32; phase dictionary<string> (prefill / decode); layer, k int16;
logit_mean, logit_std, logit_min, logit_max float32`` (over the experts; std is the population std);
``logits list<float32>`` (all experts, by expert index);
``pvalues list<float32>`` (all experts, by expert index; null for routers without p-values);
``sorted_pvalues list<float32>`` (ascending; null without p-values);
``bh_thresholds list<float32>`` (``i * alpha / N`` for ``i = 1..N``; null when no ``alpha`` is given);
``passing_rank int16`` (BH step-up rank ``max{i : p_(i) <= i * alpha / N}``, 0 if none; null without
``alpha`` or without p-values); ``selected list<int16>``, ``selected_weights list<float32>`` (the ``k``
selected experts, most preferred first, and their weights).

``every_n = 0`` samples nothing but still writes a valid, empty file with the schema, so a pipeline
output exists whether or not sampling is switched on.

:mod:`routelab.record.json_logs` lays the sample out as the JSON routing logs researchers read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from routelab.io.arena import BufferArena, pack_for_writer
from routelab.io.parquet import BatchedParquetWriter
from routelab.record.batch import (
    PHASE_TYPE,
    BatchContext,
    Sample,
    on_device,
    pack_token_meta,
    phase_array,
    unpack_token_meta,
    windows_in_meta,
)
from routelab.routing.contract import Param, Selection

ALPHA = Param("alpha", float, None, "the BH level of the sampled decisions", exclusive_minimum=0, maximum=1)

_F32_LIST, _I16_LIST = pa.list_(pa.float32()), pa.list_(pa.int16())
SCHEMA = pa.schema([
    ("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("phase", PHASE_TYPE), ("layer", pa.int16()), ("k", pa.int16()),
    ("logit_mean", pa.float32()), ("logit_std", pa.float32()), ("logit_min", pa.float32()),
    ("logit_max", pa.float32()),
    ("logits", _F32_LIST), ("pvalues", _F32_LIST), ("sorted_pvalues", _F32_LIST), ("bh_thresholds", _F32_LIST),
    ("passing_rank", pa.int16()), ("selected", _I16_LIST), ("selected_weights", _F32_LIST),
])

_META = ("window_id", "doc_id", "position", "token_id", "phase")
# Dictionary encoding for the integer columns only: the float lists' values hardly ever repeat, and on
# them it made the writer slower and the file larger (benchmarks/README.md).
_DICTIONARY_COLUMNS = ["window_id", "doc_id", "position", "token_id", "layer", "k", "passing_rank"]


class DecisionSampler:
    """Writes the full routing detail of every ``every_n``-th real token to Parquet at ``path`` (or, with
    ``documents``, of every real token of those documents).

    ``alpha`` (the BH level, in (0, 1]: the router's ``bh_level``) adds ``bh_thresholds`` and
    ``passing_rank``; None for routers that are not BH. A :class:`~routelab.record.batch.Recorder`: a
    run's :class:`~routelab.record.batch.Recording` calls it around each forward pass.
    """

    def __init__(self, path: str | os.PathLike, num_experts: int, every_n: int, alpha: float | None = None,
                 row_group_size: int = 1 << 16, documents: Sequence[int] | None = None):
        if isinstance(every_n, bool) or not isinstance(every_n, Integral) or every_n < 0:
            raise ValueError(f"every_n: {every_n!r} is not valid; need an integer >= 0 (0 disables sampling)")
        self.num_experts, self.every_n = num_experts, int(every_n)
        # documents given: every token of those documents instead of every n-th token (the report's explorer)
        self._sample: Sample = self.every_n if documents is None else tuple(sorted({int(d) for d in documents}))
        self.alpha = None if alpha is None else ALPHA.check(alpha)
        self._writer = BatchedParquetWriter(path, SCHEMA, row_group_size, use_dictionary=_DICTIONARY_COLUMNS)
        self._arena = BufferArena(chunk_bytes=2 << 20)  # host memory of the batches waiting for their row group
        self._batch: BatchContext | None = None
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    def begin_batch(self, batch: BatchContext) -> None:
        """The batch the next :meth:`record` calls belong to; its sample is every ``every_n``-th real token."""
        self._layers = {}
        self._batch = None if self._sample in (0, ()) else batch
        if isinstance(self._sample, tuple) and batch.sample(self._sample).rows.numel() == 0:
            self._batch = None  # none of the documents in this batch (decided on the host): no kernel per layer

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """Called from the patched router for every layer of every forward pass: gathers the sampled
        tokens' logits and selection on the device; the rest waits for :meth:`end_batch`, done once for
        all layers."""
        if self._batch is None:
            return
        kept = on_device(self._batch.sample(self._sample).rows, router_logits.device)
        self._layers[layer] = (router_logits.index_select(0, kept), selection.indices.index_select(0, kept),
                               selection.weights.index_select(0, kept), selection)

    def end_batch(self) -> None:
        """This batch's sample: copied to the host as one buffer, queued for the writer thread (which
        derives the statistics and builds the rows when the row group is written)."""
        batch, self._batch = self._batch, None
        layers_seen, self._layers = self._layers, {}
        if batch is None or not layers_seen or batch.sample(self._sample).rows.numel() == 0:
            return
        layers = sorted(layers_seen)
        logits, indices, weights, selections = zip(*(layers_seen[i] for i in layers))
        device = selections[0].k.device
        sample = batch.sample(self._sample)
        kept = on_device(sample.rows, device)
        # only the sampled rows' p-values are computed (routers compute them lazily), once for all recorders
        pvalues = batch.sampled_pvalues(self._sample, layers, selections, device)  # [layers, tokens, E]
        meta = pack_token_meta(batch, sample.rows, device)
        parts = {"meta": meta, "logits": torch.stack(logits, dim=1), "weights": torch.stack(weights, dim=1)}
        if pvalues is not None:
            parts["pvalues"] = pvalues
        parts["k"] = torch.stack([s.k for s in selections], dim=1).index_select(0, kept)
        parts["indices"] = torch.stack(indices, dim=1)
        for name, kind in (("logits", torch.float32), ("weights", torch.float32), ("pvalues", torch.float32),
                           ("k", torch.int16), ("indices", torch.int16)):  # 4-byte values first, then 2-byte ones
            if name in parts and parts[name].dtype != kind:
                parts[name] = parts[name].to(kind)
        buffer, offsets = pack_for_writer(list(parts.values()), self._arena)
        shapes = {name: tuple(part.shape) for name, part in parts.items()}
        self._writer.append(_SampledRows(buffer, dict(zip(parts, offsets)), shapes, batch.seq, layers,
                                         self.num_experts, self.alpha))

    def close(self) -> None:
        """Finish the Parquet file (a valid, possibly empty, file with :data:`SCHEMA`)."""
        self._writer.close()
        self._arena = BufferArena(chunk_bytes=2 << 20)  # every batch is written: its chunks are unmapped

    @property
    def encode_seconds(self) -> float:
        """CPU time the Parquet writer's thread has spent building and writing decisions.parquet so far."""
        return self._writer.encode_seconds


class _SampledRows:
    """One batch's sample as kept until its row group is written, in one buffer of host memory
    (:class:`routelab.io.arena.BufferArena`): the windows' and sampled tokens' ids, the sampled tokens' logits,
    weights, p-values (layer-major, as computed), k and selected experts. :meth:`to_batch` derives the rest
    (logit statistics, sorted p-values, BH thresholds and passing rank) and builds the rows on the Parquet
    writer's thread (see :class:`routelab.io.parquet.BatchedParquetWriter`), off the model's thread."""

    __slots__ = ("num_rows", "_buffer", "_offsets", "_shapes", "_seq", "_layers", "_num_experts", "_alpha")

    def __init__(self, buffer: pa.Buffer, offsets: dict[str, int], shapes: dict[str, tuple[int, ...]], seq: int,
                 layers: list[int], num_experts: int, alpha: float | None):
        """``buffer`` holds, at ``offsets`` with ``shapes``: ``meta`` int32 (the layout of
        :func:`routelab.record.batch.pack_token_meta`), ``logits`` / ``weights`` float32
        ``[tokens, layers, ...]``, optionally ``pvalues`` float32 ``[layers, tokens, E]``, ``k`` int16
        ``[tokens, layers]`` and ``indices`` int16 ``[tokens, layers, max_k]``, as
        :meth:`DecisionSampler.end_batch` packs them."""
        self._buffer, self._offsets, self._shapes, self._seq = buffer, offsets, shapes, seq
        self._layers, self._num_experts, self._alpha = list(layers), num_experts, alpha
        self.num_rows = shapes["k"][0] * len(layers)

    def _array(self, name: str, dtype: Any) -> np.ndarray:
        shape = self._shapes[name]
        count, offset = int(np.prod(shape)), self._offsets[name]
        return np.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset).reshape(shape)

    def to_batch(self) -> pa.RecordBatch:
        """One Parquet row per (token, layer), with :data:`SCHEMA`."""
        return _SampledRows.batch_of([self])

    def _rows(self) -> dict[str, np.ndarray]:
        """This batch's rows as numpy arrays: the per-row columns, ``logits`` / ``pvalues`` ``[rows, E]``
        (``pvalues`` only if kept) and the flat ``selected`` / ``selected_weights`` values."""
        n_layers, rows = len(self._layers), self.num_rows
        tokens = rows // n_layers
        meta = self._array("meta", np.int32)
        per_token = unpack_token_meta(meta, windows_in_meta(meta.size, tokens), tokens, self._seq)
        columns = {key: np.repeat(values, n_layers) for key, values in zip(_META, per_token)}
        columns["layer"] = np.tile(np.asarray(self._layers, dtype=np.int16), tokens)
        k, indices = self._array("k", np.int16), self._array("indices", np.int16)
        used = np.arange(indices.shape[-1]) < k[..., None]
        columns["k"] = k.reshape(-1)
        columns["logits"] = self._array("logits", np.float32).reshape(rows, -1)
        if "pvalues" in self._shapes:  # absent for routers without p-values
            columns["pvalues"] = self._array("pvalues", np.float32).transpose(1, 0, 2).reshape(rows, -1)  # token-major
        columns["selected"], columns["selected_weights"] = indices[used], self._array("weights", np.float32)[used]
        return columns

    @staticmethod
    def batch_of(items: list[_SampledRows]) -> pa.RecordBatch:
        """The rows of several batches (of one sampler) as one record batch with :data:`SCHEMA`: the
        Parquet writer's thread builds a row group's columns once instead of once per forward pass."""
        if len({(item._alpha, item._num_experts, "pvalues" in item._shapes) for item in items}) > 1:
            return pa.concat_batches([_SampledRows.batch_of([item]) for item in items])  # not one sampler's
        parts = [item._rows() for item in items]
        columns: dict[str, Any] = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        alpha, num_experts, rows = items[0]._alpha, items[0]._num_experts, len(columns["k"])
        wide = columns["logits"].astype(np.float64)
        stats = np.stack([wide.mean(-1), wide.std(-1), wide.min(-1), wide.max(-1)], axis=-1).astype(np.float32)
        for j, name in enumerate(("logit_mean", "logit_std", "logit_min", "logit_max")):
            columns[name] = stats[:, j]
        columns["logits"] = _fixed_lists(columns["logits"])
        has_pvalues = "pvalues" in columns
        if has_pvalues:
            ordered = np.sort(columns["pvalues"], axis=-1)
            columns["pvalues"], columns["sorted_pvalues"] = _fixed_lists(columns["pvalues"]), _fixed_lists(ordered)
        else:
            columns["pvalues"] = columns["sorted_pvalues"] = pa.nulls(rows, _F32_LIST)
        if alpha is not None:
            columns["bh_thresholds"] = _fixed_lists(np.tile(bh_thresholds(num_experts, alpha), (rows, 1)))
        else:
            columns["bh_thresholds"] = pa.nulls(rows, _F32_LIST)
        if alpha is not None and has_pvalues:
            columns["passing_rank"] = pa.array(_bh_count(ordered, alpha).astype(np.int16))
        else:
            columns["passing_rank"] = pa.nulls(rows, pa.int16())
        offsets = np.concatenate([[0], np.cumsum(columns["k"])]).astype(np.int32)
        columns["selected"] = pa.ListArray.from_arrays(offsets, columns["selected"])
        columns["selected_weights"] = pa.ListArray.from_arrays(offsets, columns["selected_weights"])
        columns["phase"] = phase_array(columns["phase"])
        return pa.RecordBatch.from_pydict(columns, schema=SCHEMA)


def _bh_count(sorted_pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """:func:`routelab.routing.counting.bh_count` in numpy, with the same float64 thresholds, for the writer thread:
    a torch op there on a large sample would start a second OpenMP team next to the model's."""
    n = sorted_pvalues.shape[-1]
    ranks = np.arange(1, n + 1)
    passing = sorted_pvalues.astype(np.float64) <= ranks.astype(np.float64) * (alpha / n)
    return (passing * ranks).max(axis=-1)


def bh_thresholds(num_experts: int, alpha: float) -> np.ndarray:
    """BH step-up thresholds ``i * alpha / N`` for ``i = 1..N``, float32 ``[N]``."""
    return (np.arange(1, num_experts + 1, dtype=np.float64) * (alpha / num_experts)).astype(np.float32)


def _fixed_lists(values: np.ndarray) -> pa.ListArray:
    """``[rows, width]`` array -> list column, one list of ``width`` values per row."""
    rows, width = values.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, np.ascontiguousarray(values, dtype=np.float32).reshape(-1))

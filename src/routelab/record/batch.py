"""What the recorders of a run share: one forward pass's tokens (:class:`BatchContext`), the
:class:`Recorder` protocol, and :class:`Recording`, the recorders of one run behind one object.

The evaluation loop opens a batch on the :class:`Recording` (which counts real tokens over the whole
run, the ordinal that every-n-th-token sampling is decided on), the patched routers hand every
layer's decisions to it, and each recorder reads the batch context: which positions are real tokens,
which tokens are sampled, and the sampled tokens' p-values, computed once for all recorders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from routelab.routing.contract import Selection, pvalues_at_layers

# What a forward pass does, as the logs' ``phase`` column names it (its codes are the indices).
PHASES = ("prefill", "decode")
PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())
# Per-window values at the head of the packed token metadata: window id, doc id, position offset, phase.
WINDOW_FIELDS = 4


# What a sampling recorder keeps: every n-th real token of the run (an int), or every real token of some
# documents (a sorted tuple of document ids: the report's explorer).
Sample = int | tuple[int, ...]


@dataclass(frozen=True)
class SampledTokens:
    """The sampled real tokens of a batch (:data:`Sample`): ``rows`` of the flat ``[batch * seq]`` layout and ``index``,
    their positions among the batch's real tokens (both 1-D int64)."""

    rows: torch.Tensor
    index: torch.Tensor


class BatchContext:
    """One forward pass's tokens, as every recorder of the batch sees them.

    ``attention_mask`` / ``input_ids`` ``[batch, seq]``, ``window_ids`` / ``doc_ids`` ``[batch]``;
    ``tokens_before``: the real tokens of the run before this batch (every-n-th-token sampling counts
    over the whole run, so a resumed or sharded run samples the same tokens as one run);
    ``position_offsets`` ``[batch]``: a row's token at column ``c`` has position ``c + offset`` in its
    sequence (None: 0; a decode step's one column sits after the tokens in the KV cache, a left-padded
    prompt's first real token is at position 0); ``phase``: ``"prefill"`` or ``"decode"`` (a
    generation step of one token per sequence, the rest of the sequence in the KV cache).
    """

    def __init__(self, attention_mask: torch.Tensor, window_ids: torch.Tensor, doc_ids: torch.Tensor,
                 input_ids: torch.Tensor, tokens_before: int = 0, position_offsets: torch.Tensor | None = None,
                 phase: str = "prefill"):
        if phase not in PHASES:
            raise ValueError(f"phase: {phase!r} is not valid; choose one of {', '.join(PHASES)}")
        valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
        # Row indices of real tokens in the flat [batch * seq] layout: found once per batch, so that
        # selecting them in every layer needs no device-to-host sync (a boolean mask would).
        self._real_flat_rows = valid.reshape(-1).nonzero().squeeze(1)
        self.real_tokens = self._real_flat_rows.numel()
        self.all_real = self.real_tokens == valid.numel()
        self.device, self.seq = valid.device, valid.shape[1]
        self.window_ids, self.doc_ids, self.input_ids = window_ids, doc_ids, input_ids
        self.tokens_before = int(tokens_before)
        batch = len(window_ids)
        self.position_offsets = (torch.zeros(batch, dtype=torch.int32) if position_offsets is None
                                 else position_offsets)
        self.phase = phase
        self.phase_ids = torch.full((batch,), PHASES.index(phase), dtype=torch.int32)
        self._samples: dict[int, SampledTokens] = {}
        self._pvalues: dict[tuple[int, int], torch.Tensor | None] = {}  # (every, layer) -> [sampled, E]

    @property
    def real_rows(self) -> torch.Tensor | None:
        """The real tokens' rows of the flat ``[batch * seq]`` layout; None when every position is a real
        token (the recorders then skip the row gather, a copy)."""
        return None if self.all_real else self._real_flat_rows

    def sample(self, every: Sample) -> SampledTokens:
        """The real tokens whose run ordinal ``tokens_before + i`` is a multiple of ``every``, or, for a tuple
        of document ids, every real token of those documents (kept for the batch: the recorders sampling
        alike get the same tensors)."""
        if every not in self._samples:
            self._samples[every] = (self._documents_tokens(every) if isinstance(every, tuple)
                                    else self._every_nth(every))
        return self._samples[every]

    def _every_nth(self, every: int) -> SampledTokens:
        # the i-th real token is kept when (tokens_before + i) % every == 0: i = first, first + every, ...
        first = (-self.tokens_before) % every
        # a small batch (a decode step) may hold no sampled token: the first lies beyond it
        index = torch.arange(first, max(first, self.real_tokens), every, device=self.device)
        rows = index if self.all_real else self._real_flat_rows.index_select(0, index)
        return SampledTokens(rows, index)

    def _documents_tokens(self, documents: tuple[int, ...]) -> SampledTokens:
        wanted = torch.isin(self.doc_ids.cpu(), torch.tensor(documents, dtype=self.doc_ids.dtype))  # [batch]
        if not wanted.any():  # most batches: decided on the host, nothing to do on the device
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return SampledTokens(empty, empty)
        in_documents = wanted.to(self.device).repeat_interleave(self.seq)  # [batch * seq]
        index = in_documents.index_select(0, self._real_flat_rows).nonzero().squeeze(1)
        return SampledTokens(self._real_flat_rows.index_select(0, index), index)

    def sampled_pvalues(self, every: Sample, layers: Sequence[int], selections: Sequence[Selection],
                        device: torch.device) -> torch.Tensor | None:
        """``[len(layers), sampled tokens, E]``: the p-values of :meth:`sample` ``(every)`` in each of
        ``layers`` (whose ``selections`` these are), None if a layer has none. Each layer's are computed
        once per batch, the layers not yet computed in one call (:func:`routelab.routing.pvalues_at_layers`);
        a second recorder asking computes nothing."""
        missing = [i for i, layer in enumerate(layers) if (every, layer) not in self._pvalues]
        computed = None
        if missing:
            rows = on_device(self.sample(every).rows, device)
            computed = pvalues_at_layers([selections[i] for i in missing], rows)
            for j, i in enumerate(missing):
                self._pvalues[(every, layers[i])] = None if computed is None else computed[j]
            if len(missing) == len(layers):
                return computed
        answers = [self._pvalues[(every, layer)] for layer in layers]
        return None if any(p is None for p in answers) else torch.stack(answers)


class Recorder(Protocol):
    """What a run's recorders implement (the routing log, the sampled detail, test probes)."""

    def begin_batch(self, batch: BatchContext) -> None:
        """Before a forward pass: the batch its ``record`` calls belong to."""

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        """From the patched router, for every MoE layer of the forward pass (``[tokens, ...]`` over the
        flat ``batch * seq`` tokens, padding included)."""

    def end_batch(self) -> None:
        """After the forward pass."""

    def close(self) -> None:
        """After the last batch: finish the recorder's files."""


class Recording:
    """The recorders of one run behind one object: what :func:`routelab.model.install_router` and
    :func:`routelab.run.evaluate.score_windows` are given. :meth:`begin_batch` opens the batch's
    :class:`BatchContext` and counts the run's real tokens (``tokens_seen``; set it to resume a run
    or start a shard where the earlier part ended).

    One-token decode steps are handed to the recorders together, up to ``decode_group`` steps as one
    batch (each step's sequences as rows of one column, in step order: the same rows, in the same order,
    as step by step): a recorder's work per batch is a fixed cost of some hundred small kernels, which at
    batch-1 decode weighed as much as the step's expert products. The steps waiting are handed on when
    ``decode_group`` are reached, when another kind of batch begins, and by :meth:`flush` and :meth:`close`;
    read the recorders' state after one of those. ``decode_group`` 1: every step alone.
    """

    def __init__(self, *recorders: Recorder, tokens_seen: int = 0, decode_group: int = 64):
        if isinstance(decode_group, bool) or not isinstance(decode_group, int) or decode_group < 1:
            raise ValueError(f"decode_group: {decode_group!r} is not valid; need an integer >= 1 "
                             "(the most decode steps recorded as one batch; 1 = each step alone)")
        self.recorders, self.tokens_seen, self.decode_group = recorders, int(tokens_seen), decode_group
        self._step: _Step | None = None  # the decode step being recorded, when it waits to be grouped
        self._waiting: list[_Step] = []

    def begin_batch(self, attention_mask: torch.Tensor, window_ids: torch.Tensor, doc_ids: torch.Tensor,
                    input_ids: torch.Tensor, position_offsets: torch.Tensor | None = None,
                    phase: str = "prefill") -> BatchContext:
        batch = BatchContext(attention_mask, window_ids, doc_ids, input_ids, tokens_before=self.tokens_seen,
                             position_offsets=position_offsets, phase=phase)
        self.tokens_seen += batch.real_tokens
        if self.decode_group > 1 and phase == "decode" and batch.seq == 1:
            self._step = _Step(batch, (attention_mask, window_ids, doc_ids, input_ids, batch.position_offsets))
            return batch
        self.flush()
        self._step = None
        for recorder in self.recorders:
            recorder.begin_batch(batch)
        return batch

    def record(self, layer: int, router_logits: torch.Tensor, selection: Selection) -> None:
        if self._step is not None:
            self._step.layers[layer] = (router_logits, selection)
            return
        for recorder in self.recorders:
            recorder.record(layer, router_logits, selection)

    def end_batch(self) -> None:
        if self._step is not None:
            self._waiting.append(self._step)
            self._step = None
            if len(self._waiting) >= self.decode_group:
                self.flush()
            return
        for recorder in self.recorders:
            recorder.end_batch()

    def flush(self) -> bool:
        """Hand the decode steps waiting to the recorders (consecutive steps of the same layers as one
        batch); whether there were any."""
        waiting, self._waiting = self._waiting, []
        start = 0
        while start < len(waiting):
            end = start + 1
            while end < len(waiting) and list(waiting[end].layers) == list(waiting[start].layers):
                end += 1
            self._replay(waiting[start:end])
            start = end
        return bool(waiting)

    def _replay(self, steps: list[_Step]) -> None:
        if len(steps) == 1:
            batch, layers = steps[0].batch, steps[0].layers
        else:
            inputs = zip(*(step.inputs for step in steps))
            mask, window_ids, doc_ids, input_ids, offsets = (torch.cat(part) for part in inputs)
            batch = BatchContext(mask, window_ids, doc_ids, input_ids, tokens_before=steps[0].batch.tokens_before,
                                 position_offsets=offsets, phase="decode")
            layers = {layer: (torch.cat([s.layers[layer][0] for s in steps]),
                              Selection.cat([s.layers[layer][1] for s in steps])) for layer in steps[0].layers}
        for recorder in self.recorders:
            recorder.begin_batch(batch)
        for layer, (logits, selection) in layers.items():
            for recorder in self.recorders:
                recorder.record(layer, logits, selection)
        for recorder in self.recorders:
            recorder.end_batch()

    def close(self) -> None:
        self.flush()
        for recorder in self.recorders:
            recorder.close()


class _Step:
    """A decode step waiting to be recorded with others: its context, the inputs it was opened with
    (mask, window ids, doc ids, input ids, position offsets) and each layer's ``(router logits, selection)``."""

    __slots__ = ("batch", "inputs", "layers")

    def __init__(self, batch: BatchContext, inputs: tuple[torch.Tensor, ...]):
        self.batch, self.inputs = batch, inputs
        self.layers: dict[int, tuple[torch.Tensor, Selection]] = {}


def pack_token_meta(batch: BatchContext, rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The metadata of a batch's recorded tokens as the logs keep it until written, int32 on ``device``:
    ``[window ids | doc ids | position offsets | phases (batch each) | token ids | flat rows]``: each
    window's values once, then the tokens at ``rows`` of the flat ``[batch * seq]`` layout (``rows`` None:
    every position, and no rows stored). :func:`unpack_token_meta` gives each token's columns back."""
    ids = [batch.window_ids, batch.doc_ids, batch.position_offsets, batch.phase_ids, batch.input_ids.reshape(-1)]
    if rows is not None:
        ids[-1] = ids[-1].index_select(0, on_device(rows, ids[-1].device))
        ids.append(rows)
    return torch.cat([on_device(part, device).to(torch.int32) for part in ids])


def unpack_token_meta(meta: np.ndarray, windows: int, tokens: int, seq: int) -> tuple[np.ndarray, ...]:
    """``(window_id, doc_id, position, token_id, phase)`` of each of ``tokens`` tokens from
    :func:`pack_token_meta`'s layout (with flat rows when ``meta`` holds them) for a batch of ``windows``
    windows of ``seq`` positions; ``phase`` as int8 codes into :data:`PHASES`."""
    head = WINDOW_FIELDS * windows
    stored = meta.size == head + 2 * tokens
    flat = meta[head + tokens:] if stored else np.arange(tokens, dtype=np.int32)
    window, column = np.divmod(flat, seq)
    window_ids, doc_ids, offsets, phases = (meta[i * windows:(i + 1) * windows][window] for i in range(WINDOW_FIELDS))
    return window_ids, doc_ids, column + offsets, meta[head:head + tokens], phases.astype(np.int8)


def phase_array(codes: np.ndarray) -> pa.DictionaryArray:
    """The ``phase`` column of the logs from int8 codes into :data:`PHASES`."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(PHASES, pa.string()))


def windows_in_meta(meta_size: int, tokens: int) -> int:
    """How many windows a packed metadata array of ``meta_size`` values with ``tokens`` tokens and their
    flat rows holds."""
    return (meta_size - 2 * tokens) // WINDOW_FIELDS


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when it is there already, without a call into torch's dispatcher)."""
    return tensor if tensor.device == device else tensor.to(device)

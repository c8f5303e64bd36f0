"""The routing analyses of every run, from each run's routing.parquet read once.

:func:`collect_routing_analyses` reads a run's log into per-layer arrays (:class:`LayerLog`), runs the
pure functions of :mod:`routelab.report.analyses` on them and returns tidy tables, each keyed by
``routing, dataset`` (and ``layer`` where per layer). Runs are taken one dataset at a time: that
dataset's baseline log is read first and kept while its other runs are read one by one, so at most
two runs' logs are in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.report import analyses as an
from routelab.report.aggregate import default_layer, process_map, read_run_file

log = logging.getLogger(__name__)

LOG_COLUMNS = ["window_id", "position", "token_id", "phase", "layer", "experts"]
TOP_TOKENS = 5  # token ids kept per specialised expert
TOP_SHARE_IDS = 10  # the vocabulary table's top_share: share of an expert's tokens in its 10 most frequent ids
SPECIALISED_EXPERTS = 3  # experts per (run, layer) whose top tokens are kept, the most specialised first

PAD_CHUNK = 1 << 16  # rows per step when a layer's selections are padded

Decode = Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class Tokens:
    """The tokens of one layer, sorted by ``keys`` (window, position, phase): ``keys``, ``window``,
    ``position``, ``token_ids`` ``[tokens]``; the distinct ids ``vocab_ids [vocab]``, their counts
    ``occurrences [vocab]`` and each token's index into them ``vocab_index [tokens]``; ``pairs``
    (:func:`~routelab.report.analyses.consecutive_pairs`); the log2 bins of each token's position
    and of its id's count (``*_edges``, ``*_bin [tokens]``). Layers that logged the same tokens share one."""

    keys: np.ndarray
    window: np.ndarray
    position: np.ndarray
    token_ids: np.ndarray
    vocab_ids: np.ndarray
    vocab_index: np.ndarray
    occurrences: np.ndarray
    pairs: np.ndarray
    position_edges: np.ndarray
    position_bin: np.ndarray
    frequency_edges: np.ndarray
    frequency_bin: np.ndarray


def token_table(keys: np.ndarray, window: np.ndarray, position: np.ndarray, token_ids: np.ndarray) -> Tokens:
    """:class:`Tokens` of rows already sorted by ``keys``."""
    vocab_ids, vocab_index, occurrences = np.unique(token_ids, return_inverse=True, return_counts=True)
    position_edges = an.log2_edges(int(position.max()))
    frequency_edges = an.log2_edges(int(occurrences.max()), zero=False)
    return Tokens(keys, window, position, token_ids, vocab_ids, vocab_index, occurrences,
                  an.consecutive_pairs(window, position), position_edges, an.bin_index(position, position_edges),
                  frequency_edges, an.bin_index(occurrences, frequency_edges)[vocab_index])


@dataclass(frozen=True)
class LayerLog:
    """One layer of a run's log: its ``tokens``, ``experts [tokens, slots]`` (-1 padded), ``masks
    [tokens, words]`` (:func:`~routelab.report.analyses.selection_masks`) and ``k [tokens]``."""

    tokens: Tokens
    experts: np.ndarray
    masks: np.ndarray
    k: np.ndarray

    @property
    def top1(self) -> np.ndarray:
        return self.experts[:, 0]


@dataclass(frozen=True)
class RunLog:
    routing: str
    dataset: str
    num_experts: int
    layers: dict[int, LayerLog]


def _decode_flags(phase: pa.ChunkedArray) -> np.ndarray:
    """``[rows]`` bool: the row is a generation step (phase ``decode``), chunk by chunk so that the
    dictionary is never expanded into strings."""
    flags = []
    for chunk in phase.chunks:
        if isinstance(chunk, pa.DictionaryArray):
            names = chunk.dictionary.to_pylist()
            decode = names.index("decode") if "decode" in names else -1
            flags.append(chunk.indices.to_numpy(zero_copy_only=False) == decode)
        else:
            flags.append(np.asarray(chunk.to_pylist()) == "decode")
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def _layer_experts(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """``[tokens, largest k] int16`` experts of the log rows ``rows``, -1 padded, straight from the
    ``experts`` list column's ``offsets [rows + 1]`` and ``values``: one layer at a time, so the whole
    log is never padded at once."""
    starts, lengths = offsets[:-1][rows], np.diff(offsets)[rows]
    slots = max(int(lengths.max()) if lengths.size else 0, 1)
    padded = np.empty((lengths.size, slots), dtype=np.int16)
    slot, last = np.arange(slots), max(values.size - 1, 0)
    for first in range(0, lengths.size, PAD_CHUNK):  # chunks bound the [rows, slots] index arrays
        chunk = slice(first, first + PAD_CHUNK)
        index = np.minimum(starts[chunk, None] + slot, last)  # past a row's end: any valid index, masked out
        padded[chunk] = np.where(slot < lengths[chunk, None], values[index], -1)
    return padded


def _layer_rows(layer: np.ndarray, keys: np.ndarray, path: str | os.PathLike) -> dict[int, np.ndarray | slice]:
    """Each layer's rows of the log, in key order: strided slices when the log is token by token with
    every layer's row together (as the route stage writes it), else index arrays."""
    numbers = np.unique(layer)
    count = numbers.size
    if layer.size % count == 0 and np.array_equal(layer[:count], numbers) and \
            (layer.reshape(-1, count) == numbers).all() and np.all(keys[count::count] > keys[:-count:count]):
        return {int(number): slice(index, None, count) for index, number in enumerate(numbers)}
    by_layer = np.argsort(layer, kind="stable")  # radix sort of int16: rows of a layer keep their order
    rows_of = {}
    for rows in np.split(by_layer, np.flatnonzero(np.diff(layer[by_layer])) + 1):
        rows = rows[np.argsort(keys[rows], kind="stable")]  # shards and resumed runs may interleave tokens
        if np.any(keys[rows][1:] == keys[rows][:-1]):
            raise ValueError(f"{path}: a (window_id, position, phase) appears twice in layer {layer[rows[0]]}")
        rows_of[int(layer[rows[0]])] = rows
    return rows_of


def read_routing_log(path: str | os.PathLike, routing: str, dataset: str, num_experts: int) -> RunLog:
    """A run's routing.parquet as :class:`RunLog` (only the columns the analyses use). Every array it
    keeps is a per-layer copy, so the table and its whole-log arrays are freed when it returns."""
    present = set(pq.read_schema(path).names)  # logs written before the phase column are all prefill
    table = pq.read_table(path, columns=[name for name in LOG_COLUMNS if name in present or name != "phase"])
    if table.num_rows == 0:
        raise ValueError(f"{path} has no routing decisions")
    window = table.column("window_id").to_numpy()
    position = table.column("position").to_numpy()
    token_ids = table.column("token_id").to_numpy()
    decode = (_decode_flags(table.column("phase")) if "phase" in table.column_names
              else np.zeros(table.num_rows, dtype=bool))
    layer = table.column("layer").to_numpy()
    column = table.column("experts").combine_chunks()
    offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
    k = np.diff(offsets)
    if values.size and (values.max() >= num_experts or values.min() < 0) or (k == 0).any():
        raise ValueError(f"{path}: an expert index outside [0, {num_experts}) or a token without experts")
    span = int(position.max()) + 1
    if (int(window.max()) + 1) * span * 2 >= 2 ** 62:
        raise ValueError(f"{path}: window_id x position too large for a 64-bit token key")
    keys = (window.astype(np.int64) * span + position) * 2 + decode  # sorts by window, position, then phase
    fixed = int(k[0]) if (k == k[0]).all() else 0  # top-k: the values are a [rows, k] matrix already
    matrix = values[offsets[0]:offsets[0] + k.size * fixed].reshape(k.size, fixed) if fixed else None
    layers: dict[int, LayerLog] = {}
    shared: Tokens | None = None
    for number, rows in _layer_rows(layer, keys, path).items():
        layer_keys = np.ascontiguousarray(keys[rows])
        if shared is None or not np.array_equal(shared.keys, layer_keys):  # usually every layer has the same tokens
            shared = token_table(layer_keys, *(np.ascontiguousarray(a[rows]) for a in (window, position, token_ids)))
        # contiguous and as wide as the layer's largest k: every per-layer pass reads it several times
        selected = (np.ascontiguousarray(matrix[rows]) if matrix is not None
                    else _layer_experts(offsets, values, rows))
        layers[number] = LayerLog(shared, selected, an.selection_masks(selected, num_experts),
                                  k[rows].astype(np.int16))
    return RunLog(routing, dataset, num_experts, layers)


def _keyed(run: RunLog, rows: list[dict] | pd.DataFrame, **extra) -> pd.DataFrame:
    """``rows`` with the run's keys first (then ``layer`` where there is one) and ``extra`` constant columns."""
    table = pd.DataFrame(rows)
    first = [name for name in ("layer",) if name in table.columns]
    return pd.concat([pd.DataFrame({"routing": run.routing, "dataset": run.dataset}, index=table.index),
                      table[first], table.drop(columns=first)], axis=1).assign(**extra)


def vocabulary_tables(run: RunLog) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(vocabulary, top tokens)`` of every layer (:func:`~routelab.report.analyses.vocabulary_specialisation`,
    :func:`~routelab.report.analyses.top_tokens` of its :data:`SPECIALISED_EXPERTS` most specialised experts)."""
    vocabulary, top = [], []
    for layer, data in sorted(run.layers.items()):
        tokens = data.tokens
        counts = an.token_expert_counts(tokens.vocab_index, data.experts, tokens.vocab_ids.size, run.num_experts)
        table = an.vocabulary_specialisation(counts, tokens.occurrences, top=TOP_SHARE_IDS)
        specialisation = table["specialisation"].to_numpy()
        ranked = np.lexsort((table["expert"].to_numpy(), -np.nan_to_num(specialisation, nan=-1.0)))
        chosen = ranked[:SPECIALISED_EXPERTS][~np.isnan(specialisation[ranked[:SPECIALISED_EXPERTS]])]
        best = an.top_tokens(tokens.vocab_ids, counts, tokens.occurrences, chosen, keep=TOP_TOKENS)
        best["specialisation"] = specialisation[best["expert"].to_numpy().astype(np.int64)]
        vocabulary.append(table.assign(layer=layer))
        top.append(best.assign(layer=layer))
    return _keyed(run, pd.concat(vocabulary, ignore_index=True)), _keyed(run, pd.concat(top, ignore_index=True))


def _matched(first: Tokens, second: Tokens) -> tuple[np.ndarray | slice, np.ndarray | slice]:
    """Rows of ``first`` and ``second`` that are the same token with the same id."""
    if first is second or np.array_equal(first.keys, second.keys) and np.array_equal(first.token_ids, second.token_ids):
        return slice(None), slice(None)
    return an.match_tokens(first.keys, first.token_ids, second.keys, second.token_ids)


def cross_layer_table(run: RunLog) -> pd.DataFrame:
    """One row per pair of consecutive layers (:func:`~routelab.report.analyses.top1_predictability`)."""
    rows = []
    numbers = sorted(run.layers)
    for layer, following in zip(numbers, numbers[1:]):
        first, second = run.layers[layer], run.layers[following]
        index, other = _matched(first.tokens, second.tokens)
        rows.append({"layer": layer, "next_layer": following,
                     **an.top1_predictability(first.top1[index], second.top1[other], run.num_experts)})
    return _keyed(run, rows)


def locality_table(run: RunLog) -> pd.DataFrame:
    """One row per layer (:func:`~routelab.report.analyses.temporal_locality`)."""
    rows = [{"layer": layer, **an.temporal_locality(data.masks, data.tokens.pairs)}
            for layer, data in sorted(run.layers.items())]
    return _keyed(run, rows)


def baseline_table(run: RunLog, baseline: RunLog) -> pd.DataFrame:
    """One row per layer: agreement with ``baseline`` on the tokens both logged with the same id
    (:func:`~routelab.report.analyses.baseline_agreement`)."""
    rows = []
    matches: dict[tuple[int, int], tuple] = {}  # layers share their Tokens: join each pair once
    for layer, data in sorted(run.layers.items()):
        reference = baseline.layers.get(layer)
        if reference is None:
            continue
        pair = (id(data.tokens), id(reference.tokens))
        if pair not in matches:
            matches[pair] = _matched(data.tokens, reference.tokens)
        index, other = matches[pair]
        rows.append({"layer": layer, "tokens": data.tokens.keys.size,
                     **an.baseline_agreement(data.masks[index], reference.masks[other], reference.top1[other])})
    return _keyed(run, rows, baseline=baseline.routing)


def k_tables(run: RunLog) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(k by position, k by token frequency)``, per layer: mean k in log2-spaced bins of the position
    in the window and of the token id's count among the layer's tokens (:func:`~routelab.report.analyses.mean_by_bin`;
    ``distinct_tokens``: the token ids whose count falls in the bin)."""
    by_position, by_frequency = [], []
    for layer, data in sorted(run.layers.items()):
        tokens = data.tokens
        position = an.mean_by_bin(tokens.position_bin, data.k, tokens.position_edges)
        by_position.append(position.rename(columns={"low": "position_low", "high": "position_high"})
                           .assign(layer=layer))
        edges = tokens.frequency_edges
        table = an.mean_by_bin(tokens.frequency_bin, data.k, edges)
        distinct = np.bincount(an.bin_index(tokens.occurrences, edges), minlength=edges.size)
        table["distinct_tokens"] = distinct[np.searchsorted(edges, table["low"].to_numpy())]
        by_frequency.append(table.rename(columns={"low": "frequency_low", "high": "frequency_high"})
                            .assign(layer=layer))
    return (_keyed(run, pd.concat(by_position, ignore_index=True)),
            _keyed(run, pd.concat(by_frequency, ignore_index=True)))


def coactivation_table(run: RunLog, layer: int | None) -> pd.DataFrame:
    """The non-zero cells ``layer, expert, other, count`` of one layer's co-activation
    (:func:`~routelab.report.analyses.coactivation`; None: the middle layer), as
    :func:`routelab.report.aggregate.collect_coactivation` writes them."""
    numbers = sorted(run.layers)
    chosen = default_layer(len(numbers)) if layer is None else layer
    if chosen not in run.layers:
        raise ValueError(f"layer {chosen} does not exist; the model has layers {numbers[0]}..{numbers[-1]}")
    counts = an.coactivation(run.layers[chosen].experts, run.num_experts)
    expert, other = np.nonzero(counts)
    return _keyed(run, {"layer": chosen, "expert": expert, "other": other, "count": counts[expert, other]})


def _decode_texts(table: pd.DataFrame, decode: Decode | None) -> pd.DataFrame:
    if decode is None or table.empty:
        return table.assign(text=None)
    ids = np.unique(table["token_id"].to_numpy())
    texts = decode([int(i) for i in ids])
    if len(texts) != ids.size:
        raise ValueError(f"decode returned {len(texts)} strings for {ids.size} token ids; need one per id")
    return table.assign(text=table["token_id"].map(dict(zip(ids.tolist(), texts))))


TABLES = ("vocabulary", "vocabulary_top_tokens", "cross_layer", "locality", "baseline_agreement",
          "k_by_position", "k_by_frequency", "coactivation")
SORT_KEYS = {"vocabulary": ["layer", "expert"], "vocabulary_top_tokens": ["layer", "expert", "rank"],
             "cross_layer": ["layer"], "locality": ["layer"], "baseline_agreement": ["layer"],
             "k_by_position": ["layer", "position_low"], "k_by_frequency": ["layer", "frequency_low"],
             "coactivation": ["expert", "other"]}
NO_COACTIVATION = False  # collect_routing_analyses' default: collect_coactivation makes that table


def run_tables(run: RunLog, baseline: RunLog | None, coactivation_layer: int | None | bool = NO_COACTIVATION
               ) -> dict[str, pd.DataFrame]:
    """Every analysis table of one run (no ``baseline_agreement`` without a baseline log; ``coactivation``
    of ``coactivation_layer`` unless it is False, None meaning the middle layer)."""
    vocabulary, top = vocabulary_tables(run)
    position, frequency = k_tables(run)
    tables = {"vocabulary": vocabulary, "vocabulary_top_tokens": top, "cross_layer": cross_layer_table(run),
              "locality": locality_table(run), "k_by_position": position, "k_by_frequency": frequency}
    if baseline is not None:
        tables["baseline_agreement"] = baseline_table(run, baseline)
    if coactivation_layer is not False:
        tables["coactivation"] = coactivation_table(run, coactivation_layer)
    return tables


def _read(run_dir: Path, summary: dict) -> RunLog:
    path = run_dir / "routing.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"run file missing: {path}")
    return read_routing_log(path, summary["routing"], summary["dataset"], int(summary["num_experts"]))


def dataset_tables(reference: tuple[Path, dict] | None, runs: list[tuple[Path, dict]], baseline: str,
                   coactivation_layer: int | None | bool) -> dict[str, list[pd.DataFrame]]:
    """:func:`run_tables` of some of one dataset's runs (``(run_dir, summary)`` each) against the dataset's
    baseline run ``reference`` (None: the dataset has none), read once and first: at most two logs in
    memory. ``runs`` may hold the baseline run itself, whose tables then come from the same read."""
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    if not runs:
        return parts
    reference_log = _read(*reference) if reference is not None else None
    for run_dir, summary in runs:
        run = reference_log if reference_log is not None and summary["routing"] == baseline else _read(run_dir, summary)
        for name, table in run_tables(run, reference_log, coactivation_layer).items():
            parts[name].append(table)
        del run
    return parts


def analysis_tasks(runs: list[tuple[Path, dict]], baseline: str, parts: int
                   ) -> list[tuple[tuple[Path, dict] | None, list[tuple[Path, dict]]]]:
    """One dataset's runs as ``parts`` :func:`dataset_tables` tasks of about as many runs each: the
    baseline's own tables in the first, every task reading the baseline for the agreement table. With
    three datasets on two workers, one task per dataset leaves one worker idle for a third of the time."""
    reference = next((run for run in runs if run[1]["routing"] == baseline), None)
    if reference is None:
        log.warning("dataset %s has no %s run: no baseline agreement for it", runs[0][1]["dataset"], baseline)
    others = [run for run in runs if run is not reference]
    parts = max(1, min(parts, len(others)))
    tasks = [(reference, others[index::parts]) for index in range(parts)]
    if reference is not None:
        tasks[0] = (reference, [reference, *tasks[0][1]])
    return tasks


def collect_routing_analyses(run_dirs: Iterable[str | os.PathLike], baseline: str, decode: Decode | None = None,
                             coactivation_layer: int | None | bool = NO_COACTIVATION,
                             workers: int = 1) -> dict[str, pd.DataFrame]:
    """The routing analyses of every run, as tidy tables by name (:data:`TABLES`): ``vocabulary``
    (per run, layer, expert), ``vocabulary_top_tokens`` (per run, layer, specialised expert, rank; with
    ``text`` from ``decode``, one string per token id, when given), ``cross_layer`` (per run, layer pair),
    ``locality``, ``baseline_agreement`` (per run, layer; against the ``baseline`` routing's run of the
    same dataset, left out for a dataset without one), ``k_by_position`` and ``k_by_frequency`` (per
    run, layer, bin) and, unless ``coactivation_layer`` is False, ``coactivation``: the table of
    :func:`routelab.report.aggregate.collect_coactivation` for that layer (None: the middle one) from the
    same read, so the aggregate stage need not read every log twice. Each run's routing.parquet is read
    once; at most two runs' logs (a dataset's baseline and one other run) are in memory per worker.
    ``workers`` > 1: that many processes, each dataset's runs split into ``workers`` tasks
    (:func:`analysis_tasks`) so that the processes stay busy whatever the number of datasets.
    The tables do not depend on ``workers``: they are sorted by run and key."""
    by_dataset: dict[str, list[tuple[Path, dict]]] = {}
    for run_dir in run_dirs:
        summary = read_run_file(run_dir, "summary.json")
        by_dataset.setdefault(summary["dataset"], []).append((Path(run_dir), summary))
    if not by_dataset:
        raise ValueError("run_dirs is empty: no routing logs to read")
    workers = max(1, int(workers))
    tasks = [task for dataset in sorted(by_dataset)
             for task in analysis_tasks(by_dataset[dataset], baseline, 1 if workers == 1 else workers)]
    references, chunks = [task[0] for task in tasks], [task[1] for task in tasks]
    results = process_map(dataset_tables, references, chunks, repeat(baseline), repeat(coactivation_layer),
                          workers=workers, desc="routing analyses", unit="task")
    tables = {name: pd.concat(frames, ignore_index=True)
              for name in TABLES if (frames := [f for result in results for f in result[name]])}
    tables["vocabulary_top_tokens"] = _decode_texts(tables["vocabulary_top_tokens"], decode)
    return {name: table.sort_values(["routing", "dataset", *SORT_KEYS[name]], ignore_index=True)
            for name, table in tables.items()}

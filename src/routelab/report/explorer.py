"""The token-level routing explorer's data: a few documents of every run, each token with its text and,
per layer, its experts, weights and (for p-value rules) p-values.

Two halves, one per stage. :func:`explorer_documents` / :func:`collect_explorer` (aggregate stage) read
the first ``documents`` doc_ids of each run from its ``routing.parquet`` (experts and weights) and, where
the route stage wrote it, ``explorer.parquet`` (every token of those documents in the layout of
``decisions.parquet``: p-values, BH thresholds, passing rank) into one tidy table, one row per (run,
token, layer). :func:`write_explorer_files` (report stage) turns that table into one script per run,
``report/explorer/<n>.js``, which report.html loads on demand: a ``<script>`` tag works from file://,
where ``fetch()`` of a local file is blocked.

Each script sets ``window.routelabExplorer[n]`` to the run's payload; its number arrays are base64
little-endian binary (a quarter of the size of JSON numbers):

- ``k``: uint8 ``[tokens * layers]``, experts selected per (token, layer), token-major;
- ``experts``: uint8 (uint16 when a model has more than 256 experts) ``[sum(k)]``, most preferred first;
- ``weights``: float16 ``[sum(k)]`` (3 significant digits);
- ``pvalues``: uint16 ``[tokens * layers * experts]`` by expert index, ``round(-1000 log10 p)``
  (p = 10^(-code / 1000), 3 significant digits down to 1e-65), :data:`MISSING_PVALUE` where none
  was recorded; null for rules without p-values;
- ``passing_rank``: a list ``[tokens * layers]``, -1 where none was recorded; null without p-values.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from routelab.io.files import write_text
from routelab.report.aggregate import read_run_file

MAX_TOKENS = 128  # tokens per document: with 16 layers x 64 experts a BH run's script is ~1.3 MB (docs/report.md)
ROUTING_COLUMNS = ["doc_id", "window_id", "position", "token_id", "phase", "layer", "k", "experts", "weights"]
PVALUE_COLUMNS = ["doc_id", "window_id", "position", "layer", "pvalues", "passing_rank", "bh_thresholds"]
TOKEN_KEYS = ["doc_id", "window_id", "position"]
MISSING_PVALUE = 65535
PVALUE_SCALE = 1000.0  # code units per decade
SCRIPT_GLOBAL = "routelabExplorer"


def first_documents(routing_log: str | os.PathLike, documents: int) -> list[int]:
    """The ``documents`` smallest doc_ids of a routing.parquet (all of them if it has fewer)."""
    if isinstance(documents, bool) or not isinstance(documents, int) or documents < 0:
        raise ValueError(f"evaluation.explorer_documents: {documents!r} is not valid; need an integer >= 0")
    doc_ids = np.unique(pq.read_table(routing_log, columns=["doc_id"]).column("doc_id").to_numpy())
    return [int(d) for d in doc_ids[:documents]]


def _read_documents(path: Path, columns: list[str], doc_ids: list[int], max_tokens: int) -> pd.DataFrame:
    """The rows of ``path`` of each document's first ``max_tokens`` tokens (in window, position order),
    with ``document_tokens``: how many tokens the document has in all. The cut is made on the arrow
    table, so only the kept rows' list columns become Python objects (three documents of an
    OLMoE-sized p-value log are ~100k rows of 64-wide lists, of which 128 tokens are kept)."""
    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in columns if c in present], filters=[("doc_id", "in", doc_ids)])
    doc, window, position = (table.column(key).to_numpy().astype(np.int64) for key in TOKEN_KEYS)
    order = np.lexsort((position, window, doc))
    doc, window, position = doc[order], window[order], position[order]
    new_token = np.ones(order.size, dtype=bool)
    new_token[1:] = (doc[1:] != doc[:-1]) | (window[1:] != window[:-1]) | (position[1:] != position[:-1])
    token = np.cumsum(new_token) - 1  # each row's token, numbered across the documents
    new_doc = np.ones(order.size, dtype=bool)
    new_doc[1:] = doc[1:] != doc[:-1]
    doc_of_row = np.cumsum(new_doc) - 1
    first_token = token[new_doc]
    tokens_in_doc = np.diff(np.append(first_token, token[-1] + 1 if token.size else 0))
    kept = token - first_token[doc_of_row] < max_tokens
    frame = table.take(order[kept]).to_pandas()
    return frame.assign(document_tokens=tokens_in_doc[doc_of_row[kept]])


def _token_text(log: pd.DataFrame, decode: Callable[[Sequence[int]], list[str]] | None) -> pd.DataFrame:
    """``[doc_id, window_id, position, text]``: each token's display text, decoded window by window."""
    tokens = log[[*TOKEN_KEYS, "token_id"]].drop_duplicates(TOKEN_KEYS).sort_values(TOKEN_KEYS)
    texts = []
    for _, window in tokens.groupby(["doc_id", "window_id"], sort=False):
        ids = window["token_id"].tolist()
        pieces = decode(ids) if decode is not None else [f"[{i}]" for i in ids]
        if len(pieces) != len(ids):
            raise ValueError(f"the decoder returned {len(pieces)} strings for {len(ids)} token ids")
        texts.extend(pieces)
    return tokens.assign(text=texts).drop(columns="token_id")


def _pvalues(path: Path, doc_ids: list[int], max_tokens: int) -> pd.DataFrame | None:
    """``explorer.parquet``'s p-value columns (``alpha`` from the BH thresholds), or None without p-values."""
    if not path.is_file():
        return None
    detail = _read_documents(path, PVALUE_COLUMNS, doc_ids, max_tokens).drop(columns="document_tokens")
    if "pvalues" not in detail.columns or detail["pvalues"].isna().all():
        return None
    # thresholds are i * alpha / N for i = 1..N: the last one is alpha
    detail["alpha"] = [float(t[-1]) if t is not None and len(t) else np.nan for t in detail.pop("bh_thresholds")]
    return detail


def explorer_documents(run_dir: str | os.PathLike, documents: int,
                       decode: Callable[[Sequence[int]], list[str]] | None,
                       max_tokens: int = MAX_TOKENS) -> pd.DataFrame:
    """One run's explorer rows: the first ``documents`` doc_ids of ``run_dir/routing.parquet``, at most
    ``max_tokens`` tokens each, one row per (token, layer).

    Columns: ``doc_id, window_id, position, token_id int; phase str; text str`` (the token's display
    text from ``decode(ids) -> [one string per id]``, e.g. :func:`routelab.report.tokens.load_decoder`;
    ``[id]`` without a decoder); ``document_tokens`` (the document's tokens before the cap); ``layer, k;
    experts, weights`` (lists, most preferred first); ``pvalues`` (list by expert index), ``passing_rank``
    and ``alpha`` from ``run_dir/explorer.parquet`` (null where it is missing or has no p-values).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"report.explorer_tokens: {max_tokens!r} is not valid; need an integer >= 1")
    run_dir = Path(run_dir)
    doc_ids = first_documents(run_dir / "routing.parquet", documents)
    log = _read_documents(run_dir / "routing.parquet", ROUTING_COLUMNS, doc_ids, max_tokens)
    log["phase"] = log["phase"].astype(str) if "phase" in log.columns else "prefill"
    log = log.merge(_token_text(log, decode), on=TOKEN_KEYS)
    detail = _pvalues(run_dir / "explorer.parquet", doc_ids, max_tokens)
    if detail is not None:
        log = log.merge(detail, on=[*TOKEN_KEYS, "layer"], how="left")
    else:
        log = log.assign(pvalues=None, passing_rank=np.nan, alpha=np.nan)
    return log.sort_values([*TOKEN_KEYS, "layer"], ignore_index=True)


def collect_explorer(run_dirs: Iterable[str | os.PathLike], documents: int,
                     decode: Callable[[Sequence[int]], list[str]] | None,
                     max_tokens: int = MAX_TOKENS) -> pd.DataFrame:
    """:func:`explorer_documents` of every run, with ``routing, dataset, num_experts`` from its
    summary.json first: the aggregate stage's ``explorer.parquet``. In one process: arrow's reader already
    decodes a file's columns on every core, so worker processes would add only their start-up."""
    parts = []
    for run_dir in tqdm(list(run_dirs), desc="explorer", unit="run"):
        summary = read_run_file(run_dir, "summary.json")
        rows = explorer_documents(run_dir, documents, decode, max_tokens)
        parts.append(rows.assign(routing=summary["routing"], dataset=summary["dataset"],
                                 num_experts=int(summary["num_experts"])))
    if not parts:
        return pd.DataFrame(columns=["routing", "dataset", "num_experts", *ROUTING_COLUMNS])
    table = pd.concat(parts, ignore_index=True)
    front = ["routing", "dataset", "num_experts"]
    return table[front + [c for c in table.columns if c not in front]]


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def pvalue_codes(pvalues: np.ndarray) -> np.ndarray:
    """p-values in [0, 1] as uint16 codes ``round(-1000 log10 p)`` (p below 1e-65 clamped to it); NaN
    becomes :data:`MISSING_PVALUE`."""
    missing = np.isnan(pvalues)
    clipped = np.clip(np.where(missing, 1.0, pvalues), 1e-65, 1.0)
    codes = np.round(-np.log10(clipped) * PVALUE_SCALE).astype(np.uint16)
    codes[missing] = MISSING_PVALUE
    return codes


def _lists(column: pd.Series, width: int | None = None) -> list[np.ndarray]:
    """A list column as arrays, a missing entry as an empty array (or NaNs of ``width``)."""
    empty = np.zeros(0) if width is None else np.full(width, np.nan)
    return [empty if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)) else np.asarray(v)
            for v in column]


def _document_payload(rows: pd.DataFrame, layers: list[int], num_experts: int, with_pvalues: bool) -> dict:
    """One document's explorer data (see the module docstring for the arrays)."""
    rows = rows.sort_values([*TOKEN_KEYS, "layer"])
    tokens = rows.drop_duplicates(TOKEN_KEYS)
    num_tokens, num_layers = len(tokens), len(layers)
    if len(rows) != num_tokens * num_layers:  # a token without some layer: empty cells there, token-major
        grid = pd.MultiIndex.from_product([range(num_tokens), layers], names=["token", "layer"])
        index = pd.Series(np.arange(num_tokens), index=pd.MultiIndex.from_frame(tokens[TOKEN_KEYS]))
        rows = rows.assign(token=index.reindex(pd.MultiIndex.from_frame(rows[TOKEN_KEYS])).to_numpy())
        rows = rows.drop_duplicates(["token", "layer"]).set_index(["token", "layer"]).reindex(grid)
    experts, weights = _lists(rows["experts"]), _lists(rows["weights"])
    expert_type = np.uint8 if num_experts <= 256 else np.uint16
    payload: dict[str, Any] = {
        "doc_id": int(tokens["doc_id"].iloc[0]), "tokens_total": int(tokens["document_tokens"].iloc[0]),
        "text": tokens["text"].tolist(), "window": tokens["window_id"].astype(int).tolist(),
        "position": tokens["position"].astype(int).tolist(),
        "generated": (tokens["phase"] == "decode").astype(int).tolist(),
        "k": _b64(np.array([len(e) for e in experts], dtype=np.uint8)),
        "experts": _b64(np.concatenate([*experts, np.zeros(0)]).astype(expert_type)),
        "weights": _b64(np.concatenate([*weights, np.zeros(0)]).astype("<f2")),
        "pvalues": None, "passing_rank": None}
    if with_pvalues:
        pvalues = np.stack([p if len(p) == num_experts else np.full(num_experts, np.nan)
                            for p in _lists(rows["pvalues"], num_experts)])
        payload["pvalues"] = _b64(pvalue_codes(pvalues).astype("<u2"))
        payload["passing_rank"] = pd.to_numeric(rows["passing_rank"]).fillna(-1).astype(int).tolist()
    return payload


def run_payload(rows: pd.DataFrame) -> dict:
    """One run's explorer data (rows of :func:`collect_explorer` of one routing and dataset)."""
    layers = sorted(int(layer) for layer in rows["layer"].unique())
    num_experts = int(rows["num_experts"].iloc[0])
    with_pvalues = bool(rows["pvalues"].notna().any()) if "pvalues" in rows.columns else False
    alpha = rows["alpha"].dropna() if "alpha" in rows.columns else pd.Series(dtype=float)
    documents = [_document_payload(doc, layers, num_experts, with_pvalues)
                 for _, doc in rows.groupby("doc_id", sort=True)]
    return {"routing": str(rows["routing"].iloc[0]), "dataset": str(rows["dataset"].iloc[0]),
            "layers": layers, "num_experts": num_experts, "expert_bytes": 1 if num_experts <= 256 else 2,
            "alpha": float(alpha.iloc[0]) if len(alpha) else None, "documents": documents}


def explorer_script(number: int, payload: dict) -> str:
    """The script that sets ``window.routelabExplorer[number]`` to ``payload`` (ASCII JSON, so no
    character can end a string or the script early)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return (f"window.{SCRIPT_GLOBAL} = window.{SCRIPT_GLOBAL} || {{}};\n"
            f"window.{SCRIPT_GLOBAL}[{number}] = {data};\n")


def write_explorer_files(explorer: pd.DataFrame | None, report_dir: str | os.PathLike) -> list[dict]:
    """Write ``report_dir/explorer/<n>.js`` for every run of ``explorer`` (:func:`collect_explorer`'s
    table; None or empty writes none, but the folder is made) and remove older ``<n>.js`` files there.
    Returns the page's index, one entry per run sorted by (routing, dataset): ``id, routing, dataset,
    file`` (relative to report_dir), ``has_pvalues`` and ``documents`` (``doc_id, tokens, tokens_total``)."""
    folder = Path(report_dir) / "explorer"
    folder.mkdir(parents=True, exist_ok=True)  # always there, so a pipeline can declare it as an output
    index = []
    if explorer is not None and not explorer.empty:
        for number, ((routing, dataset), rows) in enumerate(explorer.groupby(["routing", "dataset"], sort=True)):
            payload = run_payload(rows)
            write_text(folder / f"{number}.js", explorer_script(number, payload))
            index.append({"id": number, "routing": routing, "dataset": dataset, "file": f"explorer/{number}.js",
                          "has_pvalues": payload["documents"][0]["pvalues"] is not None,
                          "documents": [{"doc_id": d["doc_id"], "tokens": len(d["text"]),
                                         "tokens_total": d["tokens_total"]} for d in payload["documents"]]})
    for stale in folder.glob("*.js"):  # scripts of runs that are gone: loaded by nothing, yet copied around
        if stale.stem.isdigit() and int(stale.stem) >= len(index):
            stale.unlink()
    return index

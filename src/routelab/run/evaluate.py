"""Score evaluation windows with a (possibly re-routed) model: per-window and per-document scores."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from routelab.data.windows import IGNORE
from routelab.model.loading import input_device

log = logging.getLogger(__name__)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def padded_batches(windows: pd.DataFrame, batch_size: int, pad_token_id: int, device: torch.device,
                   desc: str, progress: bool = True) -> Iterator[tuple[pd.DataFrame, torch.Tensor, torch.Tensor]]:
    """``(chunk, input_ids, attention_mask)`` per batch of windows, right-padded, ``[batch, seq]`` on
    ``device``, with a tqdm progress bar named ``desc``."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, mininterval=2):
        chunk = windows.iloc[start:start + batch_size]
        inputs = _pad([list(r) for r in chunk["input_ids"]], pad_token_id).to(device)
        mask = _pad([[1] * len(r) for r in chunk["input_ids"]], 0).to(device)
        yield chunk, inputs, mask


@torch.inference_mode()
def score_windows(model, windows: pd.DataFrame, batch_size: int, pad_token_id: int, recorder=None,
                  progress: bool = True) -> pd.DataFrame:
    """Log-likelihood, scored-token count and greedy correctness of every window.

    Windows are right-padded into batches; padding is masked from attention and from the recorder.
    Returns one row per window: ``window_id, doc_id, loglik, tokens, correct``.
    """
    device = input_device(model)
    out = []
    for chunk, inputs, mask in padded_batches(windows, batch_size, pad_token_id, device, "evaluate", progress):
        labels = _pad([list(r) for r in chunk["labels"]], IGNORE).to(device)
        if recorder is not None:
            recorder.begin_batch(mask, torch.as_tensor(chunk["window_id"].to_numpy()),
                                 torch.as_tensor(chunk["doc_id"].to_numpy()), inputs)
        logits = model(input_ids=inputs, attention_mask=mask).logits
        if recorder is not None:
            recorder.end_batch()
        scored = labels != IGNORE
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target_lp = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
        greedy_ok = (logits.argmax(-1) == labels) | ~scored
        out.append(np.stack([target_lp.double().sum(-1).cpu().numpy(), scored.sum(-1).cpu().numpy(),
                             greedy_ok.all(-1).cpu().numpy()], axis=1))
    values = np.concatenate(out) if out else np.zeros((0, 3))
    return pd.DataFrame({"window_id": windows["window_id"].to_numpy(), "doc_id": windows["doc_id"].to_numpy(),
                         "loglik": values[:, 0], "tokens": values[:, 1].astype(np.int64),
                         "correct": values[:, 2].astype(bool)})


def document_scores(window_scores: pd.DataFrame, documents: pd.DataFrame) -> pd.DataFrame:
    """Sum window scores per document and attach word / byte counts of the original text."""
    per_doc = window_scores.groupby("doc_id", sort=True).agg(loglik=("loglik", "sum"), tokens=("tokens", "sum"),
                                                              correct=("correct", "all")).reset_index()
    return per_doc.merge(documents[["doc_id", "words", "bytes"]], on="doc_id", how="left")


class Stopwatch:
    """Wall time of a block, synchronising CUDA so GPU work is counted."""

    def __enter__(self) -> Stopwatch:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start

"""Window scoring against a per-window, unpadded log-likelihood computed by hand; tokenizer pairs as lm-eval."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from routelab.data.windows import IGNORE, encode_pair
from routelab.demo.corpus import generate
from routelab.demo.model import train_tokenizer
from routelab.run.evaluate import document_scores, score_windows
from tests.support.models import load_tiny


def reference_window_score(model, inputs: list[int], labels: list[int]) -> tuple[float, int, bool]:
    """One window alone (no padding, no batch): summed log p(label | prefix) over scored positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    scored = [i for i, label in enumerate(labels) if label != IGNORE]
    loglik = sum(logprobs[i, labels[i]].item() for i in scored)
    correct = all(logits[i].argmax().item() == labels[i] for i in scored)
    return loglik, len(scored), correct


@pytest.fixture(scope="module")
def model(tiny_olmoe_dir):
    return load_tiny(tiny_olmoe_dir, "eager")


@pytest.fixture(scope="module")
def windows(model):
    gen = torch.Generator().manual_seed(9)
    rows = []
    for window_id, (doc_id, n, n_context) in enumerate([(0, 10, 1), (0, 6, 3), (1, 12, 0), (2, 2, 1), (3, 8, 5)]):
        inputs = torch.randint(2, 128, (n,), generator=gen).tolist()
        labels = [IGNORE] * n_context + torch.randint(2, 128, (n - n_context,), generator=gen).tolist()
        rows.append({"window_id": window_id, "doc_id": doc_id, "input_ids": inputs, "labels": labels})
    # A window whose labels are the model's own greedy predictions: greedy-correct by construction.
    inputs = rows[0]["input_ids"]
    with torch.no_grad():
        greedy = model(input_ids=torch.tensor([inputs])).logits[0].argmax(-1).tolist()
    rows.append({"window_id": 5, "doc_id": 4, "input_ids": inputs, "labels": [IGNORE, IGNORE] + greedy[2:]})
    return pd.DataFrame(rows)


def test_score_windows_matches_unpadded_reference(model, windows):
    scores = score_windows(model, windows, batch_size=4, pad_token_id=1, progress=False)
    assert scores["window_id"].tolist() == windows["window_id"].tolist()
    assert scores["doc_id"].tolist() == windows["doc_id"].tolist()
    for row, score in zip(windows.itertuples(), scores.itertuples()):
        loglik, tokens, correct = reference_window_score(model, row.input_ids, row.labels)
        assert score.tokens == tokens
        assert score.loglik == pytest.approx(loglik, abs=1e-4)
        assert score.correct == correct
    assert scores["correct"].tolist()[-1] is True and not scores["correct"].iloc[0]


def test_document_scores_sum_windows_and_attach_counts(model, windows):
    scores = score_windows(model, windows, batch_size=3, pad_token_id=1, progress=False)
    documents = pd.DataFrame({"doc_id": [0, 1, 2, 3, 4], "words": [5, 6, 7, 8, 9], "bytes": [50, 60, 70, 80, 90],
                              "text": ["a"] * 5})
    per_doc = document_scores(scores, documents)
    assert per_doc["doc_id"].tolist() == [0, 1, 2, 3, 4]
    doc0 = scores[scores["doc_id"] == 0]
    assert per_doc.loc[0, "loglik"] == pytest.approx(doc0["loglik"].sum())
    assert per_doc.loc[0, "tokens"] == doc0["tokens"].sum() == 9 + 3
    assert per_doc.loc[0, "correct"] == doc0["correct"].all()
    assert per_doc["words"].tolist() == [5, 6, 7, 8, 9] and per_doc["bytes"].tolist() == [50, 60, 70, 80, 90]


# --- encode_pair as lm-eval's _encode_pair -------------------------------------------------------


def lm_eval_encode_pair(tokenizer, context, continuation):
    """lm-eval TemplateLM._encode_pair: trailing context spaces move to the continuation, then split."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    return context_enc, whole_enc[len(context_enc):]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(generate("cloze", "train", 40) + generate("grammar", "train", 40), vocab_size=300)


@pytest.mark.parametrize("context,continuation", [
    ("anna found an old lamp in the attic . anna gave ben back the", " lamp"),
    ("trailing spaces move  ", "kettle"),
    ("no space before", "violin"),
])
def test_encode_pair_matches_lm_eval(tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    assert (ctx, cont) == lm_eval_encode_pair(tokenizer, context, continuation)
    assert len(cont) >= 1
    assert tokenizer.decode(ctx + cont) == context + continuation

"""Prepared windows scored by routelab equal lm-evaluation-harness's own scores of the same documents.

The reference is lm-eval itself: ``HFLM`` on the same model object, its tokenizer loaded from the saved
directory as lm-eval's command line does (``tokenizer=<path>``, so ``add_bos_token`` reaches
``AutoTokenizer.from_pretrained``), ``max_length`` = routelab's window, and lm-eval's own aggregation
functions. Three tokenizers: one with only EOS (the demo's), one with a BOS token it does not add itself,
and one that adds BOS itself (as Llama-style tokenizer.json files do); each with ``add_bos_token``
None (lm-eval's default), True and False.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM

from routelab.data.prepare import load_lm_eval_tokenizer, prepare_dataset
from routelab.data.windows import cloze_window, encode_pair, encode_text, prefix_token_id
from routelab.run import quality
from routelab.run.evaluate import document_scores, score_windows
from tests.support.models import TINY_OLMOE, load_tiny, seed_everything

WINDOW = 16
BOS = "<|startoftext|>"
KINDS = ("eos_only", "bos", "bos_added")
ADD_BOS = (None, True, False)
LONG = ("anna found an old lamp in the attic . anna gave ben back the lamp and ben put the lamp on the "
        "table next to the kettle , then the cat slept under the table all day")
DOCUMENTS = [
    LONG,  # several windows of WINDOW tokens
    "a",  # one token
    "the kettle sang while the cat slept",
    BOS + "the violin was quiet",  # starts with the BOS string: lm-eval adds no special tokens to it
    "spaces  and\ttabs count as word breaks ",
]
REL = 1e-5  # float32 forward passes; both sides sum the same per-token log-probabilities


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """``kind -> directory`` holding the same tiny random OLMoE and that kind's tokenizer."""
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    from routelab.demo.corpus import generate
    from routelab.demo.model import train_tokenizer

    base = train_tokenizer(generate("cloze", "train", 40) + generate("grammar", "train", 40), vocab_size=300)
    seed_everything(0)
    config = OlmoeConfig(**{**TINY_OLMOE, "vocab_size": len(base) + 1, "max_position_embeddings": 64},
                         norm_topk_prob=False, initializer_range=0.2)
    model = OlmoeForCausalLM(config).eval()
    dirs = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        base.save_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind != "eos_only":
            tokenizer.add_special_tokens({"bos_token": BOS})
        if kind == "bos_added":
            tokenizer.add_bos_token = True  # saved in tokenizer.json's post-processor, so the default on reload
        tokenizer.save_pretrained(path)
        model.save_pretrained(path)
        dirs[kind] = str(path)
    reloaded = {kind: AutoTokenizer.from_pretrained(path) for kind, path in dirs.items()}
    assert reloaded["eos_only"].bos_token_id is None and reloaded["bos"].bos_token_id == len(base)
    assert reloaded["bos"].encode("a") == reloaded["bos"].encode("a", add_special_tokens=False)
    bos_added = reloaded["bos_added"]
    assert bos_added.encode("a") == [len(base)] + bos_added.encode("a", add_special_tokens=False)
    return dirs


@pytest.fixture(scope="module")
def models(model_dirs):
    return {kind: load_tiny(path, "eager") for kind, path in model_dirs.items()}


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("documents") / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    return str(path)


def lm_eval_model(model, model_dir: str, add_bos_token: bool | None) -> HFLM:
    return HFLM(pretrained=model, tokenizer=model_dir, batch_size=3, max_length=WINDOW, add_bos_token=add_bos_token)


def routelab_document_scores(model, model_dir: str, documents_file: str, out, task: str,
                             add_bos_token: bool | None) -> tuple[pd.DataFrame, dict]:
    """prepare_dataset's windows scored by routelab's route path: per-document ``loglik, tokens, correct,
    words, bytes`` (with ``text``, ``context``, ``target``), and info.json."""
    spec = {"source": "local", "files": [documents_file], "task": task, "documents": len(DOCUMENTS),
            "calibration_documents": 0}
    info = prepare_dataset(spec, model_dir, out, window=WINDOW, add_bos_token=add_bos_token)
    assert json.loads((out / "info.json").read_text()) == info
    documents = pd.read_parquet(out / "documents.parquet")
    windows = pd.read_parquet(out / "windows.parquet")
    windows["input_ids"] = windows["input_ids"].map(list)
    windows["labels"] = windows["labels"].map(list)
    scores = score_windows(model, windows, batch_size=2, pad_token_id=1, progress=False)
    per_doc = document_scores(scores, documents).merge(documents.drop(columns=["words", "bytes"]), on="doc_id")
    first_inputs = windows.groupby("doc_id")["input_ids"].first()
    return per_doc, {**info, "first_inputs": first_inputs}


@pytest.mark.parametrize("add_bos_token", ADD_BOS, ids=lambda v: f"add_bos_token={v}")
@pytest.mark.parametrize("kind", KINDS)
def test_perplexity_scores_equal_lm_eval_loglikelihood_rolling(model_dirs, models, documents_file, tmp_path,
                                                               kind, add_bos_token):
    per_doc, info = routelab_document_scores(models[kind], model_dirs[kind], documents_file, tmp_path / "ppl",
                                             "perplexity", add_bos_token)
    assert per_doc["text"].tolist() == DOCUMENTS
    assert info["windows"] > len(DOCUMENTS)  # the long document spans several windows
    lm = lm_eval_model(models[kind], model_dirs[kind], add_bos_token)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0) for text in DOCUMENTS]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)

    assert info["prefix_token_id"] == lm.prefix_token_id and info["add_bos_token"] == add_bos_token
    assert all(inputs[0] == lm.prefix_token_id for inputs in info["first_inputs"])
    assert per_doc["loglik"].tolist() == pytest.approx(theirs, rel=REL)
    words = [Task.count_words(text) for text in DOCUMENTS]
    n_bytes = [Task.count_bytes(text) for text in DOCUMENTS]
    ll, our_words, our_bytes = per_doc["loglik"].to_numpy(), per_doc["words"].to_numpy(), per_doc["bytes"].to_numpy()
    by_words, by_bytes = list(zip(theirs, words)), list(zip(theirs, n_bytes))
    assert quality.word_perplexity(ll, our_words) == pytest.approx(weighted_perplexity(by_words), rel=REL)
    assert quality.byte_perplexity(ll, our_bytes) == pytest.approx(weighted_perplexity(by_bytes), rel=REL)
    assert quality.bits_per_byte(ll, our_bytes) == pytest.approx(bits_per_byte(by_bytes), rel=REL)


def test_prefix_token_is_bos_when_the_tokenizer_has_one_else_eos(model_dirs, models):
    for kind, path in model_dirs.items():
        tokenizer = load_lm_eval_tokenizer(path)
        expected = tokenizer.eos_token_id if kind == "eos_only" else tokenizer.bos_token_id
        assert prefix_token_id(tokenizer) == lm_eval_model(models[kind], path, None).prefix_token_id == expected, kind
    bos = load_lm_eval_tokenizer(model_dirs["bos"])
    assert bos.bos_token_id != bos.eos_token_id


@pytest.mark.parametrize("add_bos_token", ADD_BOS, ids=lambda v: f"add_bos_token={v}")
@pytest.mark.parametrize("kind", KINDS)
def test_text_and_pairs_tokenize_as_lm_eval(model_dirs, models, kind, add_bos_token):
    tokenizer = load_lm_eval_tokenizer(model_dirs[kind], add_bos_token)
    lm = lm_eval_model(models[kind], model_dirs[kind], add_bos_token)
    for text in [*DOCUMENTS, "<|endoftext|>after the end-of-text string"]:
        assert encode_text(tokenizer, text, add_bos_token) == lm.tok_encode(text), text
    for context, continuation in [("anna gave ben back the", " lamp"), ("trailing spaces move  ", "kettle"),
                                  (BOS + "the violin was", " quiet")]:
        assert encode_pair(tokenizer, context, continuation, add_bos_token) == lm._encode_pair(context, continuation)


@pytest.mark.parametrize("add_bos_token", ADD_BOS, ids=lambda v: f"add_bos_token={v}")
@pytest.mark.parametrize("kind", KINDS)
def test_cloze_scores_equal_lm_eval_loglikelihood(model_dirs, models, documents_file, tmp_path, kind, add_bos_token):
    per_doc, info = routelab_document_scores(models[kind], model_dirs[kind], documents_file, tmp_path / "cloze",
                                             "cloze", add_bos_token)
    assert info["skipped"]["cloze_no_context"] == 1 and len(per_doc) == len(DOCUMENTS) - 1  # "a" has no context
    lm = lm_eval_model(models[kind], model_dirs[kind], add_bos_token)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(doc.context, doc.target), idx=0)
                for doc in per_doc.itertuples()]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    assert per_doc["loglik"].tolist() == pytest.approx([loglik for loglik, _ in theirs], rel=REL)
    assert per_doc["correct"].tolist() == [greedy for _, greedy in theirs]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_cloze_context_is_lm_eval_prefix_token(model_dirs, models, kind):
    tokenizer = load_lm_eval_tokenizer(model_dirs[kind])
    lm = lm_eval_model(models[kind], model_dirs[kind], None)
    prefix_string = tokenizer.decode(lm.prefix_token_id)
    # The second continuation starts with the prefix token itself, which lm-eval then uses as the context.
    continuations = [" lamp on the table", prefix_string + "lamp on the table"]
    rows = []
    for doc_id, continuation in enumerate(continuations):
        context_ids, continuation_ids = encode_pair(tokenizer, "", continuation)
        assert context_ids == [lm.prefix_token_id]
        inputs, labels = cloze_window(context_ids, continuation_ids, WINDOW, prefix_token_id(tokenizer))
        rows.append({"window_id": doc_id, "doc_id": doc_id, "input_ids": inputs, "labels": labels})
    assert rows[1]["labels"][0] != lm.prefix_token_id  # not scored: it is the context
    ours = score_windows(models[kind], pd.DataFrame(rows), batch_size=2, pad_token_id=1, progress=False)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("", continuation), idx=0)
                for continuation in continuations]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    assert ours["loglik"].tolist() == pytest.approx([loglik for loglik, _ in theirs], rel=REL)

"""Dataset loading: local files through datasets, clear errors for missing columns, mixed files,
unavailable hub data, invalid UTF-8 and broken JSON lines; skipped documents; the document table."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from transformers import AutoTokenizer

from routelab.data.loading import DatasetError, load_documents, load_texts
from routelab.data.prepare import document_table, prepare_dataset, usable_documents

DOCS = ["the first document .", "a second one , longer than the first .", "third"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files_load_through_datasets(tmp_path, fmt):
    path = tmp_path / f"docs.{fmt}"
    if fmt == "txt":
        path.write_text("\n\n".join(DOCS) + "\n")  # one document per paragraph
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        pd.DataFrame({"text": DOCS}).to_parquet(path)
    spec = {"source": "local", "files": [str(path)], "text_column": "text"}
    assert load_texts(spec, 2) == DOCS[:2]
    assert load_texts(spec, 5, start=2) == DOCS[2:]


def test_local_file_with_wrong_text_column_names_the_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"text_column: 'text'.*available: body"):
        load_texts({"source": "local", "files": [str(path)], "text_column": "text"}, 1)


def test_mixed_local_file_types_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.csv").write_text("b")
    with pytest.raises(DatasetError, match="files"):
        load_texts({"source": "local", "files": [str(tmp_path / "a.txt"), str(tmp_path / "b.csv")]}, 1)


def test_unavailable_hub_dataset_says_what_to_fetch(monkeypatch):
    import datasets
    import huggingface_hub

    # The libraries read these variables once, at import: set their constants too, so that no network
    # call (and its retries) is attempted.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="routelab/no-such-dataset"):
        load_texts({"source": "hub", "path": "routelab/no-such-dataset", "split": "test"}, 1)


def test_document_table_counts_words_and_bytes_on_the_original_text():
    table = document_table(["héllo  wide\nworld", "one two three four"], "cloze")
    assert table["words"].tolist() == [3, 4]
    assert table["bytes"].tolist() == [18, 18]
    assert table["target"].tolist() == [" wide\nworld", " four"]


# --- the data users have: a defined outcome for each awkward input ---


def test_empty_and_whitespace_only_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "kept one"}, {"text": ""}, {"text": "  \n\t "}, {"text": None}, {"text": "kept two"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts, skipped = load_documents({"source": "local", "files": [str(path)], "text_column": "text"}, 5)
    assert texts == ["kept one", "kept two"] and skipped == {"empty": 3}


def test_invalid_utf8_in_a_text_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"first paragraph\n\nsecond \xff paragraph\n")
    with pytest.raises(DatasetError, match=r"files\[0\]: .*docs.txt is not valid UTF-8: byte 24 \(line 3\)"):
        load_texts({"source": "local", "files": [str(path)]}, 1)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_broken_json_line_names_the_file_and_line(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    path = tmp_path / f"docs{suffix}"
    path.write_text(json.dumps({"text": "one"}) + "\n" + '{"text": "two"\n' + json.dumps({"text": "three"}) + "\n")
    with pytest.raises(DatasetError, match=rf"files\[1\]: .*docs{suffix} line 2 is not valid JSON"):
        load_texts({"source": "local", "files": [str(good), str(path)]}, 1)


def test_a_parquet_file_without_the_text_column_names_its_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["x"], "id": [1]}).to_parquet(path)
    with pytest.raises(DatasetError, match=r"text_column: 'text' is not a column of .*docs.parquet.*: body, id"):
        load_texts({"source": "local", "files": [str(path)], "text_column": "text"}, 1)


class CharTokenizer:
    """One token per character, none for the characters of ``silent``: a document can encode to nothing."""

    eos_token_id = 0
    silent = "\u200b"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text if c not in self.silent]


def test_documents_a_task_cannot_score_are_skipped_and_counted():
    skipped = Counter()
    texts = ["two words", "\u200b\u200b", "one", "a full sentence here"]
    assert usable_documents(texts, CharTokenizer(), "perplexity", skipped) == ["two words", "one",
                                                                            "a full sentence here"]
    assert skipped == {"no_tokens": 1}
    cloze = Counter()
    assert usable_documents(["lonely", "context then target", "trailing   "], CharTokenizer(), "cloze", cloze) == [
        "context then target"]
    assert cloze == {"cloze_no_context": 2}


def test_prepared_dataset_counts_skips_and_cuts_long_documents_into_windows(tmp_path):
    """A local cloze file and a perplexity file through prepare_dataset: skips in info.json; a document longer
    than the window becomes several windows that score every token once; a one-token document is scored."""
    from tests.support.route_setup import make_model_and_data

    model_dir, _ = make_model_and_data(tmp_path, documents=2)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [long_text, "", "a", "lonely", " ", long_text]))
    spec = {"source": "local", "files": [str(path)], "documents": 4, "calibration_documents": 0}
    info = prepare_dataset(spec, model_dir, tmp_path / "ppl", window=16)
    assert info["skipped"] == {"empty": 2, "no_tokens": 0, "cloze_no_context": 0} and info["documents"] == 4
    windows = pd.read_parquet(tmp_path / "ppl" / "windows.parquet")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for doc_id, text in enumerate([long_text, "a", "lonely", long_text]):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        mine = windows[windows["doc_id"] == doc_id]
        scored = [t for labels in mine["labels"] for t in labels if t != -100]
        assert scored == tokens, doc_id  # every token scored exactly once, in order
        assert len(mine) == (-(-len(tokens) // 16)), doc_id  # disjoint windows of at most 16 scored tokens
    assert (windows.groupby("doc_id").size() > 1).any()

    info = prepare_dataset({**spec, "task": "cloze"}, model_dir, tmp_path / "cloze", window=16)
    assert info["skipped"] == {"empty": 2, "no_tokens": 0, "cloze_no_context": 2} and info["documents"] == 2

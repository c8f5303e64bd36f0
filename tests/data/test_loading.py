"""Dataset loading: local files through datasets, clear errors for missing columns, mixed files and
unavailable hub data; the document table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from routelab.data.loading import DatasetError, load_texts
from routelab.data.prepare import document_table

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

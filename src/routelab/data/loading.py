"""Dataset loading: the demo generator, a Hugging Face hub dataset (its local copy under ``resources/``)
or local text / json / parquet files, as a list of document texts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from routelab.demo import corpus as demo_corpus
from routelab.download import HOW_TO_FETCH, load_dataset_copy

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured."""


def load_texts(spec: dict, count: int, start: int = 0, seed: int = 0, split: str = "eval") -> list[str]:
    """``count`` non-empty documents starting at ``start`` from the dataset ``spec`` describes."""
    if count == 0:
        return []
    if spec["source"] == "demo":
        return demo_corpus.generate(spec["domain"], split, count, seed=seed, start=start)
    dataset = _load_hf_dataset(spec)
    column = spec.get("text_column", "text")
    if column not in dataset.column_names:
        raise DatasetError(
            f"text_column: {column!r} is not a column of {spec.get('path') or spec.get('files')}; "
            f"available: {', '.join(dataset.column_names)}"
        )
    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    if dataset.builder_name == "text":
        # Paragraphs of a plain-text file keep their line breaks but not the blank-line separator.
        texts = [t.strip("\n") for t in texts]
    if start >= len(texts):
        raise DatasetError(
            f"documents: asked for documents {start}..{start + count - 1} but the dataset has {len(texts)} "
            "non-empty ones"
        )
    return texts[start:start + count]


def _load_hf_dataset(spec: dict) -> Any:
    import datasets

    if spec["source"] == "hub":
        split = spec.get("split") or "test"
        if spec.get("download_dir"):  # the pipeline's local copy (see routelab.download): no network needed
            return load_dataset_copy(spec, spec["download_dir"], split)
        try:
            return datasets.load_dataset(spec["path"], spec.get("name"), split=split)
        except Exception as exc:  # the hub raises many types; all mean "could not get it"
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatasetError(
                f"could not load hub dataset {spec['path']!r} (config {spec.get('name')!r}, split {split!r}): "
                f"{first_line}. Without network access, {HOW_TO_FETCH} (or fill the hub cache, "
                "~/.cache/huggingface, on a machine with access; HF_HUB_OFFLINE=0 lets this machine try the hub)"
            ) from None
    files = [str(f) for f in spec["files"]]
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {LOCAL_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise DatasetError(
            f"files: {files} mix or use unsupported types {sorted(suffixes)}; use one of "
            f"{', '.join(sorted(LOCAL_BUILDERS))} for all files"
        )
    builder = builders.pop()
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)

"""Dataset loading: the demo generator, a Hugging Face hub dataset (its local copy under ``resources/``)
or local text / json / parquet files, as a list of document texts."""

from __future__ import annotations

import json
import logging
from collections import Counter
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
    return load_documents(spec, count, start, seed, split)[0]


def load_documents(spec: dict, count: int, start: int = 0, seed: int = 0,
                   split: str = "eval") -> tuple[list[str], Counter]:
    """``count`` non-empty documents starting at ``start`` (counted over non-empty ones), and how many
    records were skipped on the way: ``empty`` (no text, or whitespace only)."""
    if count == 0:
        return [], Counter()
    if spec["source"] == "demo":
        return demo_corpus.generate(spec["domain"], split, count, seed=seed, start=start), Counter()
    dataset = _load_hf_dataset(spec)
    column = spec.get("text_column", "text")
    if column not in dataset.column_names:
        raise DatasetError(
            f"text_column: {column!r} is not a column of {spec.get('path') or spec.get('files')}; "
            f"available: {', '.join(dataset.column_names)}"
        )
    records = dataset[column]
    texts = [t for t in records if isinstance(t, str) and t.strip()]
    skipped = Counter(empty=len(records) - len(texts))
    if dataset.builder_name == "text":
        # Paragraphs of a plain-text file keep their line breaks but not the blank-line separator.
        texts = [t.strip("\n") for t in texts]
    if start >= len(texts):
        raise DatasetError(
            f"documents: asked for documents {start}..{start + count - 1} but the dataset has {len(texts)} "
            "non-empty ones"
        )
    return texts[start:start + count], skipped


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
    for index, path in enumerate(files):
        check_local_file(Path(path), f"files[{index}]")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def check_local_file(path: Path, where: str) -> None:
    """A local text or JSON file's encoding and syntax, with an error naming the file and line (the
    datasets builders fail deep inside with neither). Parquet files carry their own schema."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: {path} is not valid UTF-8: byte {exc.start} (line {_line_of(data, exc.start)}) "
                           f"is {data[exc.start:exc.start + 1]!r}; re-encode the file as UTF-8") from None
    if suffix not in (".json", ".jsonl"):
        return
    if suffix == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # the json builder also reads JSON Lines from a .json file: check it line by line
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: {path} line {number} is not valid JSON ({exc.msg} at column "
                                   f"{exc.colno}): {line[:80]!r}") from None

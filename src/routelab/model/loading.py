"""Load models and tokenizers the way every stage does: through the transformers Auto classes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _from_pretrained(loader, path: str | os.PathLike, **kwargs):
    """``loader.from_pretrained``; a hub id that cannot be fetched or found in the cache raises one clear
    :class:`routelab.download.ResourceMissingError` naming what to download and how."""
    from routelab.download import check_model_path, model_not_available

    source = check_model_path(path)
    if Path(source).is_dir():
        return loader.from_pretrained(source, **kwargs)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as exc:  # transformers reports "not cached / cannot connect / no such repo" as OSError
        raise model_not_available(source, exc) from None


def load_tokenizer(path: str | os.PathLike, revision: str | None = None):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, path, revision=revision)


def load_config(path: str | os.PathLike, revision: str | None = None):
    """The model's ``AutoConfig`` (same errors as :func:`load_model`)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, revision=revision)


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "auto",
               experts_implementation: str | None = None, revision: str | None = None):
    """``AutoModelForCausalLM`` in eval mode on ``device``; the same code path for hub ids and local dirs."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = _from_pretrained(AutoModelForCausalLM, path, revision=revision, **kwargs)
    model.to(resolve_device(device)).eval()
    log.info("loaded %s (%s, %s, experts kernel %s)", path, type(model).__name__, dtype,
             model.config._experts_implementation)
    return model

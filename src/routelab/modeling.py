"""Load models and tokenizers the way every stage does: through the transformers Auto classes."""

from __future__ import annotations

import logging
import os

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


def load_tokenizer(path: str | os.PathLike, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), revision=revision)


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "auto",
               experts_implementation: str | None = None, revision: str | None = None):
    """``AutoModelForCausalLM`` in eval mode on ``device``; the same code path for hub ids and local dirs."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision, **kwargs)
    model.to(resolve_device(device)).eval()
    log.info("loaded %s (%s, %s, experts kernel %s)", path, type(model).__name__, dtype,
             model.config._experts_implementation)
    return model

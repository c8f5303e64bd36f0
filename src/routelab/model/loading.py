"""Load models and tokenizers the way every stage does: through the transformers Auto classes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
               experts_implementation: str | None = None, revision: str | None = None,
               device_map: str | dict[str, Any] | None = None, max_memory: dict[str, Any] | None = None,
               offload_folder: str | os.PathLike | None = None):
    """``AutoModelForCausalLM`` in eval mode; the same code path for hub ids and local dirs.

    Without ``device_map`` the model goes to ``device``. With it (``auto``, ``balanced``, ``sequential`` or
    an explicit ``{module: device}`` map, devices being GPU indices, ``cpu`` or ``disk``) accelerate
    places the model's modules over the visible GPUs, the CPU and ``offload_folder`` (bounded per device by
    ``max_memory``, e.g. ``{0: "70GiB", "cpu": "200GiB"}``), and routelab's routers and recorders work
    through accelerate's hooks (:func:`routelab.model.install_router`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    loader = model_loader(load_config(path, revision))
    model = _from_pretrained(loader, path, revision=revision, **kwargs)
    if device_map is None:
        model.to(resolve_device(device))
    model.eval()
    placed = getattr(model, "hf_device_map", None)
    log.info("loaded %s (%s, %s, experts kernel %s%s)", path, type(model).__name__, dtype,
             model.config._experts_implementation,
             f", modules on {sorted(set(map(str, placed.values())))}" if placed else "")
    return model


def model_loader(config: Any):
    """The Auto class that loads a model with a language-model head: ``AutoModelForCausalLM``, or for a
    vision-language MoE without a causal-LM class (Qwen3-VL-MoE) ``AutoModelForImageTextToText``, whose
    model routes text alone the same way."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


@dataclass(frozen=True)
class ModelPlacement:
    """How a stage loads and places the model (the config's ``model`` section): dtype, device or
    accelerate ``device_map`` (with ``max_memory`` and ``offload_folder``), the experts kernel, and how
    many GPUs the job takes (several for a model spread over them)."""

    dtype: str = "float32"
    device: str = "auto"
    experts_implementation: str | None = None
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, Any] | None = None
    offload_folder: str | None = None
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus: {self.gpus} is not valid; need an integer >= 0")
        for key, value in (("max_memory", self.max_memory), ("offload_folder", self.offload_folder)):
            if value is not None and self.device_map is None:
                raise ValueError(f"{key}: {value!r} given without device_map; it only applies to a model spread "
                                 "by accelerate (set model.device_map)")

    @classmethod
    def from_args(cls, args: Any) -> ModelPlacement:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def pin(self) -> None:
        """Before CUDA starts: this job's free GPUs (Snakemake pins none)."""
        from routelab.model.gpus import pin_gpu

        if self.gpus and (self.device in ("auto", "cuda") or self.device_map is not None):
            pin_gpu(count=self.gpus)

    def load(self, path: str | os.PathLike, revision: str | None = None):
        return load_model(path, self.dtype, self.device, self.experts_implementation, revision,
                          device_map=self.device_map, max_memory=_memory_keys(self.max_memory),
                          offload_folder=self.offload_folder)


def _memory_keys(max_memory: dict[str, Any] | None) -> dict[Any, Any] | None:
    """accelerate names GPUs by index: config and JSON keys are strings ("0"), made integers here."""
    if max_memory is None:
        return None
    return {int(key) if str(key).isdigit() else key: value for key, value in max_memory.items()}


def input_device(model) -> torch.device:
    """Where a model's inputs go: its first parameter's device (under a ``device_map``, that of the
    embedding; accelerate's hooks move activations between devices from there)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")

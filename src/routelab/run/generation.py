"""Routing during generation: every forward pass ``model.generate()`` makes (the prompt's prefill, then
one-token decode steps over the KV cache) opens a batch on the run's recording and is timed by phase.

The evaluation loop of teacher-forced scoring opens its own batches (:func:`routelab.run.evaluate.score_windows`);
inside ``generate()`` the forwards are the library's, so :class:`ForwardLog` opens them from forward hooks
on the model. The caller names the sequences of the next forwards (:meth:`ForwardLog.rows`): the
request and document each row of the batch belongs to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from routelab.model.patching import install_router
from routelab.record.batch import PHASES, Recording
from routelab.routing.contract import Router, RouterConfigError


class ForwardLog:
    """Per forward pass of a model: opens the batch of ``recording`` (None: only timing) with the rows the
    caller named, each token's position in its sequence and the phase, and times the pass by phase.

    ``tokens`` / ``seconds``: real tokens and wall time per phase (``prefill``, ``decode``) so far.
    """

    def __init__(self, recording: Recording | None = None):
        self.recording = recording
        self.tokens = dict.fromkeys(PHASES, 0)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._open: tuple[str, int, float] | None = None

    def rows(self, request_ids: Any, doc_ids: Any, attention_mask: torch.Tensor | None = None) -> None:
        """The sequences of the next forward passes: ``request_ids`` / ``doc_ids`` ``[batch]``, and the
        real tokens ``attention_mask [batch, seq]`` when the forward is called without one (lm-eval's
        scoring calls pass right-padded inputs alone)."""
        self._rows = (torch.as_tensor(request_ids).reshape(-1), torch.as_tensor(doc_ids).reshape(-1), attention_mask)

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator[ForwardLog]:
        """Open a batch before, and close it after, every forward pass of ``model`` inside the block."""
        hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                 model.register_forward_hook(self._after, with_kwargs=True)]
        try:
            yield self
            self._flush_decode()
        finally:
            for hook in hooks:
                hook.remove()
            self._open = None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a routed generation needs input_ids in each forward (inputs_embeds alone name no tokens)")
        sequences, length = input_ids.shape
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        cached = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        phase = "decode" if cached else "prefill"
        request_ids, doc_ids, given_mask = self._rows if self._rows is not None else (
            torch.arange(sequences), torch.arange(sequences), None)
        if len(request_ids) != sequences:
            raise ValueError(f"the forward has {sequences} sequences but the rows named are {len(request_ids)} "
                             "(beam search and several return sequences per prompt are not recorded)")
        mask = given_mask if given_mask is not None else kwargs.get("attention_mask")
        current, offsets = token_positions(mask, sequences, length, cached, input_ids.device)
        if phase != "decode":
            self._flush_decode()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._open = (phase, int(current.sum()), time.perf_counter())
        if self.recording is not None:
            self.recording.begin_batch(current, request_ids, doc_ids, input_ids, position_offsets=offsets, phase=phase)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._open is None:
            return
        if self.recording is not None:
            self.recording.end_batch()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phase, tokens, start = self._open
        self._open = None
        self.tokens[phase] += tokens
        self.seconds[phase] += time.perf_counter() - start

    def _flush_decode(self) -> None:
        # the recording groups decode steps (Recording.decode_group): their recording's time is decode's
        start = time.perf_counter()
        if self.recording is not None and self.recording.flush():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds["decode"] += time.perf_counter() - start

    def throughput(self) -> dict[str, float | int | None]:
        """``{phase}_tokens``, ``{phase}_seconds`` and ``{phase}_tokens_per_s`` (None for a phase not run)."""
        out: dict[str, float | int | None] = {}
        for phase in PHASES:
            tokens, seconds = self.tokens[phase], self.seconds[phase]
            out |= {f"{phase}_tokens": tokens, f"{phase}_seconds": seconds,
                    f"{phase}_tokens_per_s": tokens / seconds if tokens and seconds > 0 else None}
        return out


def token_positions(mask: torch.Tensor | None, sequences: int, length: int, cached: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real [sequences, length] bool, position offsets [sequences] int32)`` of a forward over ``length``
    new tokens after ``cached`` ones in the KV cache: ``mask`` is the attention mask over the new tokens or
    over cache and new tokens together (``generate()`` passes the whole), None for all real. A real
    token at column ``c`` is at position ``c + offset``: the real tokens before it in the cache, less the
    padding columns in front of a left-padded prompt."""
    if mask is None or mask.dim() != 2:  # no mask, or an already expanded 4-D one: every token is real
        real = torch.ones(sequences, length, dtype=torch.bool, device=device)
        return real, torch.full((sequences,), cached, dtype=torch.int32)
    mask = mask.bool()
    real, past = mask[:, -length:], mask[:, :-length]
    leading_padding = (real.cumsum(-1) == 0).sum(-1)
    offsets = past.sum(-1) - leading_padding
    return real, offsets.to(device="cpu", dtype=torch.int32)


def check_causal(router: Router | type[Router], what: str) -> None:
    """Refuse a teacher-forced rule (one that sees every token of a window at once) for ``what``."""
    if router.teacher_forced:
        raise RouterConfigError(
            f"routing method {router.method!r} chooses among all tokens of a window at once (teacher-forced), so it "
            f"cannot route {what}, where each token is routed before the next exists; use a causal rule")


@torch.inference_mode()
def generate_routed(model: nn.Module, router: Router, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, recording: Recording | None = None,
                    request_ids: Any = None, doc_ids: Any = None, **generate_kwargs: Any
                    ) -> tuple[torch.Tensor, ForwardLog]:
    """``model.generate(input_ids, ...)`` with ``router`` installed in every MoE layer: the generated
    sequences ``[batch, prompt + new]`` and the :class:`ForwardLog` of its forwards (recorded into
    ``recording``, rows named ``request_ids`` / ``doc_ids``, default ``0..batch-1``). Greedy by default."""
    check_causal(router, "generation")
    forwards = ForwardLog(recording)
    rows = torch.arange(input_ids.shape[0])
    forwards.rows(rows if request_ids is None else request_ids, rows if doc_ids is None else doc_ids)
    generate_kwargs.setdefault("do_sample", False)
    with install_router(model, router, recording), forwards.attach(model):
        tokens = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    return tokens, forwards

#!/usr/bin/env python
"""Forward-time cost of every registered routelab router relative to the model's native router, at the
demo model's shape and at real models' shapes (OLMoE-1B-7B; DeepSeek-V3's router), in one interleaved run
per model.

Every repetition runs each variant once, in a rotating order, for both workloads, so drift in machine
load affects all variants alike; the printed ratios are ratios of medians of per-repetition times (wall
clock, the target; the process CPU time is printed beside it because on a shared machine it is the
steadier of the two). Installing a router is outside the timed region.

Workloads:

- prefill: one forward over a batch of 512-token sequences (the demo: ``--tokens`` tokens in sequences
  of its 256 positions; the OLMoE shape on the CPU: 1 x 512 tokens), full logits;
- decode: batch 1, a 64-token prompt prefilled natively once with ``use_cache=True`` (not timed), then
  per repetition and variant a copy of that cache and ``--decode-steps`` single-token steps
  ``model(input_ids=token[:, None], past_key_values=cache, use_cache=True)`` on fixed random tokens
  (teacher-forced, so every variant decodes the same steps); the time per step is printed.

Variants: ``native`` (no router installed) and, for every rule in ``routelab.routing.ROUTERS`` (a rule
this script has no setting for in :data:`SETTINGS` stops it), each built with
``build_router(spec, num_experts, model_top_k, null=..., calibration=...)`` (a kde null and per-layer
statistics fitted on the router logits of a separate random calibration batch, never the timed inputs):

- ``<rule> k=k``: the rule at a setting where it selects exactly the model's k for every token (checked):
  pure routing overhead. Targets: prefill <= 1.02 x native at the OLMoE shape, <= 1.05 x on the demo;
  decode <= 1.03 x.
- ``<rule> ~k/2``: each variable-k rule at ``max_k = k`` with its training-free parameter found by
  bisection on the benchmark's prefill inputs so that the mean k over (token, layer) is about k/2
  (``layerk`` and ``seqtopk`` take their budget directly); experts kernel ``grouped_mm`` (fewer experts
  must mean less compute). For prefill the script prints the bound ``1 - share * (1 - mean_k / k)``,
  with ``share`` the experts' share of the native forward (hook-timed in separate forwards): the ratio
  if the experts' cost fell in proportion to the experts selected and routing cost nothing (attention,
  embeddings, norms and the LM head do not shrink). Target: measured <= 1.03 x the bound. For decode,
  which is memory-bound at batch 1, it prints the ideal speed-up ``bytes(k) / bytes(mean_k)`` of the
  weight bytes read per token (attention, router gates, norms, one embedding row and the LM head,
  plus for each MoE layer the gate_up and down matrices of each selected expert; the KV cache is left
  out), the measured speed-up and their ratio. ``seqtopk`` is teacher-forced and is not timed in decode.

``native, again`` times the native model a second time in every repetition: its ratio to ``native`` is
the run's noise floor, to read the other ratios against. For each ~k/2 variant the mean k per MoE layer
is printed beside the mean. The script also prints where the time goes (routers, experts, the rest,
per prefill forward and per decode step; hook-timed in separate runs) and ``seqtopk``'s routing time per
layer against ``bh``'s at ~k/2 in prefill (target: <= 1.2), then a count of the targets met.

Models: ``demo``, the demo architecture in float32 on the CPU; ``olmoe4``, an OLMoE-1B-7B-shaped stack
on the CPU: 4 of its 16 layers, hidden 2048, 64 experts of size 1024, top-8, vocabulary 50304, 16
heads, bfloat16, random weights (routing cost does not depend on training), ~4 GB; ``olmoe16``, the
full 16 layers on a GPU, 16 x 512 tokens (the default when CUDA is available, instead of ``olmoe4``);
and ``deepseek_v3`` (not in the default list), DeepSeek-V3's router and layer width on the CPU: hidden
7168, 256 routed experts (sigmoid scores plus a selection bias, the best 4 of 8 groups, top-8, scaled)
and a shared expert, experts of 256 instead of 2048 so a layer fits in memory, 16 MLA heads, 2 MoE
layers, bfloat16, 1 x 256 tokens, ~7.5 GB. Calibration collects each family's selection scores through
the router seam, as the pipeline's ``collect_router_logits`` does.

    python benchmarks/routing_overhead.py [--repeats N] [--tokens 2048] [--decode-steps 16] [--threads N]
                                          [--models demo,olmoe4] [--rules bh,topp,...] [--stable-malloc]

``--stable-malloc`` reruns the script with glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
raised, so large temporaries are reused instead of being returned to the system and faulted back in:
the native ``grouped_mm`` path (which gathers a fresh ``[tokens * k, hidden]`` tensor every layer) then
takes the same time in every process instead of moving between two levels ~30 % apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from routelab.model.families import find_moe_layers, moe_shape
from routelab.model.patching import install_router
from routelab.routing import ROUTERS, TopKRouter, build_router
from routelab.routing.nulls import fit_kde_null
from routelab.run.calibration import ScoreCollector

DEMO = dict(vocab_size=512, hidden_size=96, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, max_position_embeddings=256)
# DeepSeek-V3's router and MoE layer width (hidden 7168; 256 routed experts, sigmoid scores plus a
# selection bias, the best 4 of 8 groups, top-8, weights renormalised and scaled by 2.5; one shared
# expert; MLA attention) with experts of 256 instead of 2048 (the layer fits in memory: 2.8 GB per layer in
# bf16 instead of 23), 16 instead of 128 heads and a 4096-token vocabulary, so that the router and the
# experts are most of the forward.
DEEPSEEK_V3 = dict(vocab_size=4096, hidden_size=7168, moe_intermediate_size=256,
                   n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                   first_k_dense_replace=0, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                   q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096)
OLMOE = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
             max_position_embeddings=4096)
STABLE_MALLOC = ("MALLOC_MMAP_THRESHOLD_", "33554432")  # blocks up to 32 MiB from the heap, not mmap
TRIM = ("MALLOC_TRIM_THRESHOLD_", "4294967296")  # and the heap is not trimmed back to the system
PROMPT = 64  # decode: tokens of the prompt whose KV cache every decode run starts from
DECODE_TARGET = 1.03
BOUND_TARGET = 1.03  # ~k/2 prefill: measured ratio / bound
SEQTOPK_TARGET = 1.2  # seqtopk's routing time per layer / bh's
TOLERANCE = 0.1  # the search stops when |mean k - k/2| is below it


@dataclass(frozen=True)
class Model:
    """One benchmarked model: ``tokens`` per prefill forward (None: ``--tokens``), in sequences of
    ``min(512, max positions)``; ``repeats`` the default interleaved repetitions; ``exact_target`` the
    k=k prefill target."""

    title: str
    shape: dict
    device: str
    dtype: torch.dtype
    tokens: int | None
    repeats: int
    exact_target: float
    model_type: str = "olmoe"
    case: str | None = None  # a tiny family config of tests/support/families.py (--family)


MODELS = {
    "demo": Model("demo model (CPU)", DEMO, "cpu", torch.float32, None, 20, 1.05),
    "olmoe4": Model("OLMoE-1B-7B-shaped stack, 4 of its 16 layers (CPU)", {**OLMOE, "num_hidden_layers": 4}, "cpu",
                    torch.bfloat16, 512, 10, 1.02),
    "olmoe16": Model("OLMoE-1B-7B-shaped stack (GPU)", OLMOE, "cuda", torch.bfloat16, 8192, 20, 1.02),
    "deepseek_v3": Model("DeepSeek-V3-shaped router and layer width, 2 MoE layers, experts of 256 (CPU)", DEEPSEEK_V3,
                         "cpu", torch.bfloat16, 256, 5, 1.02, model_type="deepseek_v3"),
}


@dataclass(frozen=True)
class Knob:
    """A variable-k rule's training-free parameter, searched for ~k/2: its range, whether k grows with it,
    whether to bisect on a log scale, and whether the rule takes it as a one-item list."""

    name: str
    low: float
    high: float
    k_grows: bool
    log: bool = False
    listed: bool = False

    def spec(self, value: float) -> dict:
        return {self.name: [value] if self.listed else value}


@dataclass(frozen=True)
class Setting:
    """How the benchmark sets a rule, as spec parameters for a model with top-``k`` and ``layers`` MoE
    layers: ``exact`` selects exactly k for every token; ``half`` is the ~k/2 spec without the ``knob``
    (None: a fixed-k rule; ``knob`` None: the spec is complete, no search)."""

    exact: Callable[[int, int], dict]
    half: Callable[[int, int], dict] | None = None
    knob: Knob | None = None


def exactly_k(**params) -> Callable[[int, int], dict]:
    """Spec parameters with min_k = max_k = the model's k."""
    return lambda k, layers: {"min_k": k, "max_k": k, **params}


def up_to_k(**params) -> Callable[[int, int], dict]:
    """Spec parameters with min_k = 1 and max_k = the model's k."""
    return lambda k, layers: {"min_k": 1, "max_k": k, **params}


SETTINGS: dict[str, Setting] = {
    "topk": Setting(lambda k, layers: {"k": k}),
    "topp": Setting(exactly_k(p=0.4), up_to_k(), Knob("p", 1e-4, 1.0, k_grows=True)),
    "bh": Setting(exactly_k(alpha=0.05), up_to_k(), Knob("alpha", 1e-8, 1.0, k_grows=True, log=True)),
    "hc": Setting(exactly_k(alpha0=0.5), up_to_k(), Knob("alpha0", 1e-3, 1.0, k_grows=True, log=True)),
    "minp": Setting(exactly_k(m=0.1), up_to_k(), Knob("m", 0.0, 1.0, k_grows=False)),
    "ratio": Setting(exactly_k(beta=0.5), up_to_k(), Knob("beta", 0.0, 1.0, k_grows=False)),
    "entropy": Setting(lambda k, layers: {"ks": [k], "quantiles": []}, lambda k, layers: {"ks": [1, k]},
                       Knob("quantiles", 1e-3, 1 - 1e-3, k_grows=False, listed=True)),
    "layerk": Setting(lambda k, layers: {"ks": [k] * layers}, lambda k, layers: {"budget": round(layers * k / 2)}),
    "seqtopk": Setting(lambda k, layers: {"budget": k, "min_k": k, "max_k": k},
                       lambda k, layers: {"budget": k / 2, "min_k": 1, "max_k": k}),
}
START = time.perf_counter()


def note(message: str) -> None:
    """Progress on stderr, with the seconds since start."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def build(spec: Model):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if spec.case is not None:
        return build_tiny(spec.case)
    # Special-token ids inside the vocabulary (OLMoE's defaults point past the demo's 512 tokens).
    fields = {"norm_topk_prob": False, **spec.shape}
    config = AutoConfig.for_model(spec.model_type, **fields, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    config._experts_implementation = "grouped_mm"
    # The weights are drawn on the device in the benchmark's dtype (the 16-layer OLMoE stack is ~27 GB in
    # float32, the DeepSeek-V3-shaped one 15 GB).
    default = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)
    try:
        with torch.device(spec.device) if spec.device != "cpu" else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.set_experts_implementation("grouped_mm")
    return model


def build_tiny(case: str):
    """The tiny random model of a family case the families' tests use, in float32 (256 positions, so the
    decode prompt fits); ``grouped_mm`` where the family's experts dispatch through the kernels."""
    from routelab.model.families import model_family
    from routelab.model.loading import model_loader
    from tests.support.families import CASES, tiny_config

    model_type, overrides, _ = CASES[case]
    if "text_config" in overrides:
        overrides = {**overrides, "text_config": {**overrides["text_config"], "max_position_embeddings": 256}}
    else:
        overrides = {**overrides, "max_position_embeddings": 256}
    config = tiny_config(model_type, **overrides)
    model = model_loader(config).from_config(config).eval()
    if model_family(model).kernels:
        model.set_experts_implementation("grouped_mm")
    return model


@dataclass
class Variant:
    label: str
    rule: str | None  # None: native
    kind: str  # "native", "control" (native again), "k=k" or "~k/2"
    router: object | None
    causal: bool = True
    prefill_k: list[float] | None = None  # mean k per MoE layer on the prefill inputs
    decode_k: list[float] | None = None  # and over the decode steps


class MeanK:
    """A recorder that only keeps the experts selected per (token, layer): per layer their sum and count,
    and their range over all layers."""

    def __init__(self) -> None:
        self.total, self.count, self.low, self.high = {}, {}, None, None

    def record(self, layer, router_logits, selection) -> None:
        k = selection.k
        self.total[layer] = self.total.get(layer, 0) + int(k.sum())
        self.count[layer] = self.count.get(layer, 0) + k.numel()
        low, high = int(k.min()), int(k.max())
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    @property
    def mean(self) -> float:
        return sum(self.total.values()) / sum(self.count.values())

    @property
    def per_layer(self) -> list[float]:
        return [self.total[layer] / self.count[layer] for layer in sorted(self.total)]


def average(per_layer: list[float]) -> float:
    return sum(per_layer) / len(per_layer)


def installed(model, router, recorder=None):
    return contextlib.nullcontext() if router is None else install_router(model, router, recorder)


def measure(model, router, work: Callable[[], None], sync) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``work()`` with ``router`` installed (not timed)."""
    with torch.inference_mode(), installed(model, router):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        work()
        sync()
        return time.perf_counter() - start, time.process_time() - start_cpu


def decode_steps(model, prompt_cache, tokens: torch.Tensor) -> Callable[[], None]:
    """The decode workload: single-token steps over ``tokens`` ``[1, steps]`` from a copy of the prompt's
    cache (copied here, outside the timed region)."""
    cache = copy.deepcopy(prompt_cache)

    def work() -> None:
        for step in range(tokens.shape[1]):
            model(input_ids=tokens[:, step:step + 1], past_key_values=cache, use_cache=True)

    return work


def mean_k(model, router, work: Callable[[], None]) -> MeanK:
    recorder = MeanK()
    with torch.inference_mode(), install_router(model, router, recorder):
        work()
    return recorder


def search(mean_k_of: Callable[[float], float], knob: Knob, target: float, steps: int = 16):
    """Bisection on ``knob`` so that the mean k is within :data:`TOLERANCE` of ``target`` (mean k is
    monotone in the knob), until the interval is narrower than 1 % (log scale) or 0.0001; returns the
    closest ``(value, mean k, evaluations)`` found."""
    low, high, best, evaluations = knob.low, knob.high, None, 0
    while evaluations < steps and (high / low > 1.01 if knob.log else high - low > 1e-4):
        evaluations += 1
        value = (low * high) ** 0.5 if knob.log else (low + high) / 2
        mean = mean_k_of(value)
        if best is None or abs(mean - target) < abs(best[1] - target):
            best = (value, mean)
        if abs(mean - target) < TOLERANCE:
            break
        low, high = (value, high) if (mean < target) == knob.k_grows else (low, value)
    return (*best, evaluations)


def module_times(model, variants: list[Variant], work_for: Callable[[Variant], Callable[[], None]], repeats: int,
                 sync) -> dict[str, dict[str, float]]:
    """Per variant, the median ms per run of ``work_for(variant)`` (made before the clock starts) spent in
    the MoE routers (gates) and in the experts modules, and the whole run, timed by hooks in separate
    runs (interleaved; hooks add a little, so these are not used for the ratios)."""
    spent = {"router": 0.0, "experts": 0.0}

    def hooks_for(name):
        def enter(module, args):
            sync()
            spent[name] -= time.perf_counter()

        def leave(module, args, output):
            sync()
            spent[name] += time.perf_counter()

        return enter, leave

    samples = {v.label: {"router": [], "experts": [], "forward": []} for v in variants}
    hooks = []
    for layer in find_moe_layers(model):
        for name, module in (("router", layer.gate), ("experts", layer.experts)):
            enter, leave = hooks_for(name)
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        for rep in range(repeats):
            for variant in rotated(variants, rep):
                work = work_for(variant)
                spent.update(router=0.0, experts=0.0)
                total = measure(model, variant.router, work, sync)[0]
                for name, value in (*spent.items(), ("forward", total)):
                    samples[variant.label][name].append(1000 * value)
    finally:
        for hook in hooks:
            hook.remove()
    return {label: {name: statistics.median(values) for name, values in parts.items()}
            for label, parts in samples.items()}


def rotated(items: list, rep: int) -> list:
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def weight_bytes(model, num_experts: int) -> tuple[float, float]:
    """Decode's weight bytes per token: ``(fixed, per selected expert per layer)``. Fixed: every parameter
    but the experts' and the embedding (attention, router gates, norms, LM head), plus one embedding row."""
    layers = find_moe_layers(model)
    experts = [p for layer in layers for p in layer.experts.parameters()]
    expert_bytes = sum(p.numel() * p.element_size() for p in experts if p.dim() >= 2 and p.shape[0] == num_experts)
    expert_ids = {id(p) for p in experts}
    embedding = model.get_input_embeddings().weight
    fixed = sum(p.numel() * p.element_size() for p in model.parameters()
                if id(p) not in expert_ids and p is not embedding)
    fixed += embedding.shape[1] * embedding.element_size()
    return fixed, expert_bytes / num_experts / len(layers)


def make_variants(model, rules: list[str], num_experts: int, k: int, null, calibration, inputs,
                  notes: list[str]) -> list[Variant]:
    """``native``, ``native, again`` (the noise check) and each rule's k=k and ~k/2 variants; the ~k/2
    parameter searched on ``inputs``. What the searches found is appended to ``notes``."""
    layers = len(find_moe_layers(model))
    target = k / 2

    def router(rule, params):
        return build_router({"method": rule, **params}, num_experts, k, null=null, calibration=calibration)

    def prefill_mean_k(rule, params) -> float:
        # logits_to_keep=1: the LM head (a quarter of the OLMoE-shaped forward) does not change the routing
        return mean_k(model, router(rule, params), lambda: model(input_ids=inputs, logits_to_keep=1)).mean

    variants = [Variant("native", None, "native", None), Variant("native, again (noise check)", None, "control", None)]
    for rule in rules:
        setting, causal = SETTINGS[rule], not getattr(ROUTERS[rule], "teacher_forced", False)
        variants.append(Variant(f"{rule} k=k", rule, "k=k", router(rule, setting.exact(k, layers)), causal))
        if setting.half is None:
            continue
        params = setting.half(k, layers)
        label = f"{rule} ~k/2"
        if setting.knob is not None:
            knob = setting.knob

            def knob_mean_k(value, rule=rule, params=params, knob=knob):
                return prefill_mean_k(rule, {**params, **knob.spec(value)})

            value, found, evaluations = search(knob_mean_k, knob, target)
            params = {**params, **knob.spec(value)}
            label = f"{rule} ~k/2 ({knob.name}={value:.3g})"
            note(f"  {rule}: {knob.name} = {value:.4g} -> mean k {found:.2f} ({evaluations} forwards)")
            notes.append(f"{rule}: {knob.name} = {value:.4g}, mean k {found:.2f} ({evaluations} forwards)")
            if abs(found - target) >= 2 * TOLERANCE:
                notes.append(f"{rule}: mean k cannot reach k/2 = {target:g} with {knob.name} in [{knob.low:g}, "
                             f"{knob.high:g}]; the closest found: {found:.2f} at {knob.name} = {value:.4g}")
        variants.append(Variant(label, rule, "~k/2", router(rule, params), causal))
    return variants


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def bench(key: str, args) -> list[tuple[str, bool]]:
    """Run and print one model's benchmark; returns ``(target, met)`` for the summary."""
    spec = MODELS[key]
    device = spec.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    load = os.getloadavg()
    note(f"{key}: building the model")
    model = build(spec)
    shape = moe_shape(model)
    num_layers, num_experts, k = shape.num_layers, shape.num_experts, shape.top_k
    config = model.config.get_text_config()
    tokens = spec.tokens or args.tokens
    seq = min(512, config.max_position_embeddings, tokens)
    repeats = args.repeats or spec.repeats
    steps = args.decode_steps
    generator = torch.Generator().manual_seed(1)

    def random_tokens(*size):
        return torch.randint(0, config.vocab_size, size, generator=generator).to(device)

    inputs = random_tokens(max(1, tokens // seq), seq)
    calibration_inputs = random_tokens(*inputs.shape)
    prompt, decode_tokens = random_tokens(1, PROMPT), random_tokens(1, steps)
    note(f"{key}: calibration logits and null")
    # As collect_router_logits does: the selection scores through the router seam (the router logits of a
    # softmax family, sigmoid + bias of a DeepSeek-V3-class one), and the log-probabilities calibrated
    # probability rules read where the family has them.
    collector = ScoreCollector()
    collector.valid = torch.ones(calibration_inputs.numel(), dtype=torch.bool, device=device)
    with torch.inference_mode():
        with install_router(model, TopKRouter(num_experts, k), collector):
            model(input_ids=calibration_inputs, logits_to_keep=1)
        prompt_cache = model(input_ids=prompt, use_cache=True).past_key_values
    collected = collector.result()
    null = fit_kde_null(collected.scores, num_experts)
    calibration = collected.probability_logits
    note(f"{key}: building the variants; search for mean k ~ {k / 2:g}")
    notes: list[str] = []
    variants = make_variants(model, args.rules, num_experts, k, null, calibration, inputs, notes)
    decoding = [v for v in variants if v.causal]

    def prefill():
        model(input_ids=inputs)

    def decode():
        return decode_steps(model, prompt_cache, decode_tokens)

    note(f"{key}: warm-up, mean k of every variant")
    for variant in variants:
        if variant.router is None:
            variant.prefill_k = variant.decode_k = [float(k)] * num_layers
            continue
        for workload, work in (("prefill", prefill), ("decode", decode() if variant.causal else None)):
            if work is None:
                continue
            got = mean_k(model, variant.router, work)
            setattr(variant, f"{workload}_k", got.per_layer)
            if variant.kind == "k=k" and not got.low == got.high == k:
                raise SystemExit(f"{variant.label}: selects {got.low}..{got.high} experts per token in {workload}, "
                                 f"not exactly k = {k}; fix its setting in SETTINGS")
    measure(model, None, prefill, sync)
    measure(model, None, decode(), sync)

    prefill_times = {v.label: [] for v in variants}
    decode_times = {v.label: [] for v in decoding}
    for rep in range(repeats):
        note(f"{key}: repetition {rep + 1} of {repeats}")
        for variant in rotated(variants, rep):
            prefill_times[variant.label].append(measure(model, variant.router, prefill, sync))
        for variant in rotated(decoding, rep):
            work = decode()
            decode_times[variant.label].append(measure(model, variant.router, work, sync))
    hook_repeats = max(2, repeats // 4)
    note(f"{key}: hook-timed runs ({hook_repeats} prefill forwards and 1 decode run per variant)")
    prefill_parts = module_times(model, variants, lambda variant: prefill, hook_repeats, sync)
    decode_parts = module_times(model, decoding, lambda variant: decode(), 1, sync)

    share = prefill_parts["native"]["experts"] / prefill_parts["native"]["forward"]
    fixed_bytes, expert_bytes = weight_bytes(model, num_experts)

    def decode_bytes(mean):
        return fixed_bytes + num_layers * mean * expert_bytes

    def medians(samples):
        return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)

    def per_layer(ks):
        return "/".join(f"{value:.1f}" for value in ks)

    results = []
    expert_size = getattr(config, "moe_intermediate_size", config.intermediate_size)
    print(f"\n{spec.title}: {num_layers} layers x {num_experts} experts, top-{k}, hidden {config.hidden_size}, expert "
          f"size {expert_size}, vocabulary {config.vocab_size}, {device} "
          f"{str(spec.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, experts kernel grouped_mm, "
          f"{repeats} interleaved repeats")
    print(f"  load average before the run {load[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 minute)")
    print(f"  calibration: selection scores of a separate random batch of {calibration_inputs.numel()} tokens "
          f"(kde null, per-layer statistics); ~k/2 searched"
          f" on the prefill inputs to |mean k - {k / 2:g}| < {TOLERANCE}:")
    for line in notes:
        print(f"    {line}")

    native_wall, native_cpu = medians(prefill_times["native"])
    print(f"\n  prefill: {inputs.shape[0]} x {inputs.shape[1]} tokens per forward; experts' share of the native "
          f"forward {share:.2f} (hook-timed)")
    print(f"  {'variant':34s} {'mean k':>6s} {'median ms':>10s} {'ratio':>6s} {'CPU ratio':>9s} {'target':>8s} "
          f"{'bound':>6s} {'ratio/bound':>11s}          {'mean k per layer':s}")
    for variant in variants:
        wall, cpu = medians(prefill_times[variant.label])
        ratio, line = wall / native_wall, ""
        if variant.kind == "k=k":
            met = ratio <= spec.exact_target
            results.append((f"{key} prefill {variant.label} <= {spec.exact_target}", met))
            line = f"{'<= ' + str(spec.exact_target):>8s} {'':6s} {'':11s}  {verdict(met):16s}"
        elif variant.kind == "~k/2":
            bound = 1 - share * (1 - average(variant.prefill_k) / k)
            met = ratio <= BOUND_TARGET * bound
            results.append((f"{key} prefill {variant.label} <= {BOUND_TARGET} x bound", met))
            line = f"{'':8s} {bound:6.3f} {ratio / bound:11.3f}  {verdict(met) + ' (<= ' + str(BOUND_TARGET) + ')':16s}"
        layers_k = per_layer(variant.prefill_k) if variant.kind == "~k/2" else ""
        print(f"  {variant.label:34s} {average(variant.prefill_k):6.2f} {1000 * wall:10.2f} {ratio:6.3f} "
              f"{cpu / native_cpu:9.3f} {line or ' ' * 47} {layers_k}".rstrip())

    native_wall, native_cpu = medians(decode_times["native"])
    print(f"\n  decode: batch 1, {PROMPT}-token prompt cache, {steps} steps per repetition; weight bytes per token "
          f"{fixed_bytes / 2**20:.1f} MiB + {expert_bytes / 2**20:.2f} MiB per selected expert and layer "
          f"({decode_bytes(k) / 2**20:.1f} MiB at k = {k})")
    print(f"  {'variant':34s} {'mean k':>6s} {'ms/step':>8s} {'ratio':>6s} {'CPU ratio':>9s} {'target':>8s} "
          f"{'ideal x':>8s} {'measured x':>10s} {'meas/ideal':>10s}")
    for variant in variants:
        if not variant.causal:
            print(f"  {variant.label:34s} skipped: teacher-forced; not causal")
            continue
        wall, cpu = medians(decode_times[variant.label])
        ratio, line = wall / native_wall, ""
        mean = average(variant.decode_k)
        if variant.kind == "k=k":
            met = ratio <= DECODE_TARGET
            results.append((f"{key} decode {variant.label} <= {DECODE_TARGET}", met))
            line = f"{'<= ' + str(DECODE_TARGET):>8s} {'':8s} {'':10s} {'':10s}  {verdict(met)}"
        elif variant.kind == "~k/2":
            ideal, measured = decode_bytes(k) / decode_bytes(mean), native_wall / wall
            line = f"{'':8s} {ideal:8.3f} {measured:10.3f} {measured / ideal:10.3f}"
        print(f"  {variant.label:34s} {mean:6.2f} {1000 * wall / steps:8.2f} {ratio:6.3f} {cpu / native_cpu:9.3f} "
              f"{line}".rstrip())

    print(f"\n  where the time goes, hook-timed in separate runs ({hook_repeats} prefill forwards, 1 decode run of "
          f"{steps} steps per variant; hooks add a little):")
    print(f"  {'':34s} {'prefill, ms per forward':^35s}   {'decode, ms per step':^26s}")
    print(f"  {'variant':34s} {'routers':>8s} {'per layer':>9s} {'experts':>8s} {'the rest':>8s}   {'routers':>8s} "
          f"{'experts':>8s} {'the rest':>8s}")
    for variant in variants:
        times = prefill_parts[variant.label]
        rest = times["forward"] - times["router"] - times["experts"]
        line = (f"  {variant.label:34s} {times['router']:8.2f} {times['router'] / num_layers:9.3f} "
                f"{times['experts']:8.2f} {rest:8.2f}")
        if variant.causal:
            times = {name: value / steps for name, value in decode_parts[variant.label].items()}
            rest = times["forward"] - times["router"] - times["experts"]
            line += f"   {times['router']:8.3f} {times['experts']:8.3f} {rest:8.3f}"
        print(line)
    halves = {v.rule: prefill_parts[v.label]["router"] / num_layers for v in variants if v.kind == "~k/2"}
    if "seqtopk" in halves and "bh" in halves:
        ratio = halves["seqtopk"] / halves["bh"]
        met = ratio <= SEQTOPK_TARGET
        results.append((f"{key} seqtopk routing / bh's <= {SEQTOPK_TARGET}", met))
        print(f"  seqtopk's routing per layer vs bh's (both ~k/2, prefill): {halves['seqtopk']:.3f} / "
              f"{halves['bh']:.3f} ms = {ratio:.3f} (target <= {SEQTOPK_TARGET}) {verdict(met)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repetitions (default: per model, " + ", ".join(
                            f"{key} {model.repeats}" for key, model in MODELS.items()) + ")")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per prefill forward of the demo model")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per repetition")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    default_models = "demo,olmoe16" if torch.cuda.is_available() else "demo,olmoe4"
    parser.add_argument("--models", default=default_models, help=f"of {', '.join(MODELS)} (default {default_models})")
    parser.add_argument("--family", default=None,
                        help="instead of --models: the tiny random model of one supported family (a case of "
                             "tests/support/families.py, e.g. deepseek_v3, llama4_text, deepseek_v2_grouped)")
    parser.add_argument("--rules", default=None, help="comma-separated router methods (default: every registered one)")
    parser.add_argument("--stable-malloc", action="store_true",
                        help="rerun with glibc malloc settings that keep large temporaries (steadier native times)")
    args = parser.parse_args()
    if args.stable_malloc and STABLE_MALLOC[0] not in os.environ:  # glibc reads them at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **dict([STABLE_MALLOC, TRIM])})
    missing = [rule for rule in ROUTERS if rule not in SETTINGS]
    if missing:
        raise SystemExit(f"routing_overhead.py has no setting for the registered rule(s) {', '.join(missing)}: add "
                         "each to SETTINGS (its k=k spec and its ~k/2 spec or search knob)")
    args.rules = list(ROUTERS) if args.rules is None else args.rules.split(",")
    unknown = [rule for rule in args.rules if rule not in ROUTERS]
    if unknown:
        raise SystemExit(f"--rules: {', '.join(unknown)} not registered; registered: {', '.join(ROUTERS)}")
    models = args.models.split(",")
    if args.family is not None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's tests/
        from tests.support.families import CASES

        if args.family not in CASES:
            raise SystemExit(f"--family: {args.family!r}; choose from {', '.join(CASES)}")
        MODELS[args.family] = Model(f"tiny {args.family} (CPU, float32)", {"max_position_embeddings": 256}, "cpu",
                                    torch.float32, None, 20, 1.05, case=args.family)
        models = [args.family]
    if any(key not in MODELS for key in models):
        raise SystemExit(f"--models: {args.models!r}; choose from {', '.join(MODELS)}")
    if PROMPT + args.decode_steps > min(MODELS[key].shape["max_position_embeddings"] for key in models):
        raise SystemExit(f"--decode-steps: {args.decode_steps}; the prompt ({PROMPT}) and the steps must fit the "
                         "models' positions")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers' rename to `cache`
    if args.stable_malloc:
        print(f"glibc malloc: {STABLE_MALLOC[0]}={os.environ[STABLE_MALLOC[0]]} {TRIM[0]}={os.environ.get(TRIM[0])}")
    unset = [rule for rule in SETTINGS if rule not in ROUTERS]
    print(f"rules: {', '.join(args.rules)}" + (f" (settings for unregistered {', '.join(unset)})" if unset else ""))
    results = []
    for key in models:
        results += bench(key, args)
    missed = [target for target, met in results if not met]
    print(f"\ntargets met: {len(results) - len(missed)} of {len(results)}"
          + (f"; missed: {'; '.join(missed)}" if missed else ""))
    print(f"run time: {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()

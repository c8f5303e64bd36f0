#!/usr/bin/env python
"""Decode throughput of ``model.generate()`` with BH routing at a mean k of about k/2 against the model's
native top-k routing, at batch 1 and batch 16, in one interleaved run per model.

Both sides run greedy ``generate()`` from the same random prompts (``--prompt`` tokens, every row real)
with ``max_new_tokens = min_new_tokens = --new-tokens``, so every run decodes the same count of tokens.
BH runs through :func:`routelab.run.generation.generate_routed`; the native side is a plain
``model.generate()`` timed by the same :class:`routelab.run.generation.ForwardLog` hooks (no recording),
so both are timed alike: decode tokens per second are the one-token steps over the KV cache (batch x
(new tokens - 1)) over the wall time inside those forwards. Every repetition runs each (batch, side) once,
the sides in a rotating order, and the script prints medians and the ratio BH / native.

BH is built as ``routing_overhead.py`` builds it (``build_router`` with a kde null and per-layer
statistics fitted on the router scores of a separate random calibration batch), at ``min_k = 1``,
``max_k = k``, with alpha bisected (log scale) per batch so that the mean k over that batch's decode steps
is within 0.1 of k/2 (one alpha does not fit both: greedy decoding from one random prompt repeats itself,
so batch 1's mean k rests on few distinct tokens); the mean k each reached is printed.

Models: ``demo``, the trained demo model (``--demo-model``, default ``results/demo/model``; skipped with a
note if absent), float32; ``olmoe4``, routing_overhead.py's OLMoE-1B-7B-shaped stack on the CPU (4 of its 16
layers, hidden 2048, 64 experts of size 1024, top-8, vocabulary 50304, bfloat16, random weights, ~4 GB).
Both use the ``grouped_mm`` experts kernel.

Also printed:

- the machine's read bandwidth, measured in the same run (once per repetition, between the generations):
  ``torch.sum`` over a 1 GiB float32 tensor (bytes read / seconds; a copy's read + write bandwidth beside it),
  and the rate at which ``F.linear`` of one row reads a 256 MiB matrix of the model's dtype (decode's product);
- per model, the memory-bound ideal of batch-1 decode: the weight bytes read per decoded token (attention,
  router gates and the selected experts' gate_up and down matrices in every layer, norms, the LM head and
  one embedding row; the KV cache is printed apart, not included) over that bandwidth, at native k and at
  BH's mean k, with measured / ideal (target >= 0.9) and measured / the ideal at the matrix-vector rate; at
  batch 16 the same from the distinct experts each decode step selects per layer (counted);
- ``generate()``'s own time per new token, outside the model's forwards;
- where a batch-1 decode step's time goes: ``torch.profiler`` over ``--profile-steps`` steps of each side
  (the top ops by self CPU time, the ``aten::mm`` calls by input shape with the bytes per second they read,
  the time outside ops), the routers, experts and the rest hook-timed, and for the demo model the native
  time per step against the number of layers (the model cut to its first n layers), which separates the
  per-layer cost from the per-step fixed cost.

    python benchmarks/generation.py [--models demo,olmoe4] [--repeats N] [--new-tokens 32] [--prompt 16]
                                    [--demo-model results/demo/model] [--threads N] [--profile-steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

# the sibling script's OLMoE stack, BH setting and search (python puts benchmarks/ on sys.path)
import routing_overhead as overhead
import torch

from routelab.model.families import find_moe_layers, moe_shape
from routelab.model.patching import install_router
from routelab.routing import TopKRouter, build_router
from routelab.routing.nulls import fit_kde_null
from routelab.run.calibration import ScoreCollector
from routelab.run.generation import ForwardLog, generate_routed

BATCHES = (1, 16)
REPEATS = {"demo": 10, "olmoe4": 5}
CALIBRATION = {"demo": (8, 256), "olmoe4": (1, 512)}  # [sequences, tokens] of the calibration batch
BANDWIDTH_BYTES = 2**30
GEMV_BYTES = 2**28  # the matrix of the matrix-vector rate, in the model's dtype
IDEAL_TARGET = 0.9  # measured / memory-bound ideal of batch-1 decode
START = time.perf_counter()


def note(message: str) -> None:
    """Progress on stderr, with the seconds since start."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


class DecodeK:
    """A recording that keeps, for decode forwards only, the experts selected per (token, layer) and the
    distinct experts selected per (forward, layer) (the experts whose weights the step reads)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts, self.phase = num_experts, None
        self.selected = self.slots = 0
        self.distinct: list[int] = []

    def begin_batch(self, *args, phase: str = "prefill", **kwargs) -> None:
        self.phase = phase

    def record(self, layer, router_logits, selection) -> None:
        if self.phase != "decode":
            return
        self.selected += int(selection.k.sum())
        self.slots += selection.k.numel()
        indices = selection.indices
        self.distinct.append(int(indices[indices < self.num_experts].unique().numel()))

    def end_batch(self) -> None:
        pass

    @property
    def mean_k(self) -> float:
        return self.selected / self.slots

    def mean_distinct(self) -> float:
        """Distinct experts per decode step and layer, averaged."""
        return sum(self.distinct) / len(self.distinct)


def generate(model, router, prompt: torch.Tensor, new_tokens: int) -> tuple[ForwardLog, float]:
    """One greedy generation of exactly ``new_tokens`` per row: its :class:`ForwardLog` and the wall seconds
    of the whole ``generate()`` call. ``router`` None: the native model, timed by the same hooks."""
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False)
    start = time.perf_counter()
    if router is None:
        forwards = ForwardLog()
        with torch.inference_mode(), forwards.attach(model):
            model.generate(input_ids=prompt, **kwargs)
    else:
        _, forwards = generate_routed(model, router, prompt, **kwargs)
    return forwards, time.perf_counter() - start


def decode_k(model, router, prompt, new_tokens: int, num_experts: int, k: int) -> DecodeK:
    """The decode steps' selections of one generation (native: the model's top-k through the router seam,
    which selects what the native gate selects)."""
    recording = DecodeK(num_experts)
    generate_routed(model, router or TopKRouter(num_experts, k), prompt, recording=recording,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    attention_mask=torch.ones_like(prompt))
    return recording


def read_bandwidth(data: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """``(read bytes/s of torch.sum over data, read + write bytes/s of out.copy_(data))``, best of 3 each."""
    size = data.numel() * data.element_size()
    sums, copies = [], []
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        sums.append(time.perf_counter() - start)
        start = time.perf_counter()
        out.copy_(data)
        copies.append(time.perf_counter() - start)
    return size / min(sums), 2 * size / min(copies)


def gemv_rate(matrix: torch.Tensor) -> float:
    """Bytes of ``matrix`` ``[rows, 2048]`` per second that ``F.linear`` of one row over it reads (decode's
    product: one token's activations times a weight matrix), best of 3."""
    row = torch.ones(1, matrix.shape[1], dtype=matrix.dtype)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.functional.linear(row, matrix)
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / min(times)


def profile_decode(model, router, prompt, steps: int, top: int = 8):
    """``torch.profiler`` over ``steps`` decode steps of batch ``prompt.shape[0]`` after a native prefill of
    ``prompt``: ``(ms per step under the profiler, op events per step (ops and the ops they call), ms per step
    inside ops (self CPU time of all of them), [(op, self ms per step, calls per step)] of the ``top`` ops by
    self CPU time, the same of the ``top`` ``aten::mm`` input shapes)``; the rest of a step is Python
    (transformers' modules, routelab's router, hooks)."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(5)
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(2, vocab, (prompt.shape[0], steps + 2), generator=generator)

    def step(column: int) -> None:
        model(input_ids=tokens[:, column:column + 1], past_key_values=cache, use_cache=True)

    installed = install_router(model, router) if router is not None else contextlib.nullcontext()
    with torch.inference_mode(), installed:
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        step(0), step(1)  # warm-up, not profiled
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for column in range(2, steps + 2):
                step(column)
            wall = time.perf_counter() - start
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    events = sum(e.count for e in averages) // steps
    in_ops = sum(e.self_cpu_time_total for e in averages) / 1000 / steps
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in averages[:top]]
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"),
                      key=lambda e: e.self_cpu_time_total, reverse=True)
    mm_rows = [(e.input_shapes, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in by_shape[:top]]
    return 1000 * wall / steps, events, in_ops, rows, mm_rows


def truncated(model, layers: int):
    """A copy of ``model`` with only its first ``layers`` decoder layers (the LM head and embeddings kept)."""
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:layers]
    cut.config.num_hidden_layers = layers
    return cut


def load(key: str, args):
    """The model for ``key`` and a one-line description, or None (with the reason) when it is absent."""
    if key == "demo":
        if not os.path.isdir(args.demo_model):
            return None, (f"demo: skipped, no model at {args.demo_model!r} (run the demo pipeline, or pass "
                          "--demo-model DIR)")
        from routelab.model.loading import load_model

        model = load_model(args.demo_model, device="cpu", experts_implementation="grouped_mm")
        return model, f"trained demo model {args.demo_model} (CPU, float32)"
    return overhead.build(overhead.MODELS[key]), overhead.MODELS[key].title + ", bfloat16, random weights"


@dataclass
class Setup:
    """One model's benchmark inputs: its shape, the prompts per batch and BH's router per batch (alpha
    searched on that batch's decode; ``tuned[batch] = (alpha, mean k, generations)``)."""

    model: object
    title: str
    num_layers: int
    num_experts: int
    k: int
    prompts: dict
    routers: dict
    tuned: dict


def prepare(key: str, args):
    """Load ``key``'s model, fit BH's null on a calibration batch and search alpha per batch; None (with a
    note printed) when the model is absent."""
    note(f"{key}: loading the model")
    model, title = load(key, args)
    if model is None:
        print(f"\n{title}")
        return None
    shape = moe_shape(model)
    num_layers, num_experts, k = shape.num_layers, shape.num_experts, shape.top_k
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    # ids 0 and 1 are eos and pad in both models
    prompts = {batch: torch.randint(2, vocab, (batch, args.prompt), generator=generator) for batch in BATCHES}
    calibration_inputs = torch.randint(2, vocab, CALIBRATION[key], generator=generator)
    note(f"{key}: calibration scores and null")
    collector = ScoreCollector()
    collector.valid = torch.ones(calibration_inputs.numel(), dtype=torch.bool)
    with torch.inference_mode(), install_router(model, TopKRouter(num_experts, k), collector):
        model(input_ids=calibration_inputs, logits_to_keep=1)
    collected = collector.result()
    null = fit_kde_null(collected.scores, num_experts)
    setting = overhead.SETTINGS["bh"]
    params = setting.half(k, num_layers)
    # alpha below 1e-4 gives every token min_k on both models; starting there saves two generations a search
    knob = dataclasses.replace(setting.knob, low=1e-4)

    def bh(alpha: float):
        return build_router({"method": "bh", **params, "alpha": alpha}, num_experts, k, null=null,
                            calibration=collected.probability_logits)

    routers, tuned = {}, {}
    for batch in BATCHES:
        note(f"{key}: searching alpha for a decode mean k ~ {k / 2:g} at batch {batch}")

        def mean_k(alpha: float, prompt=prompts[batch]) -> float:
            return decode_k(model, bh(alpha), prompt, args.new_tokens, num_experts, k).mean_k

        alpha, found, evaluations = overhead.search(mean_k, knob, k / 2)
        routers[batch], tuned[batch] = bh(alpha), (alpha, found, evaluations)
    return Setup(model, title, num_layers, num_experts, k, prompts, routers, tuned)


def sides_of(setup: Setup, batch: int) -> dict:
    return {"native": None, "bh": setup.routers[batch]}


def time_generations(setup: Setup, args, repeats: int, data, out, matrix):
    """Interleaved: per repetition each (batch, side) generates once, the sides in a rotating order, then
    one bandwidth sample. Returns ``({(batch, side): [(throughput, wall)]}, [(read, copy, gemv) bytes/s])``."""
    model = setup.model
    for batch in BATCHES[:1]:  # warm-up; the routed paths were warmed by the searches
        for router in sides_of(setup, batch).values():
            generate(model, router, setup.prompts[batch], args.new_tokens)
    runs = {(batch, side): [] for batch in BATCHES for side in sides_of(setup, batch)}
    bandwidth = []
    for rep in range(repeats):
        note(f"repetition {rep + 1} of {repeats}")
        for batch in BATCHES:
            sides = sides_of(setup, batch)
            for side in overhead.rotated(list(sides), rep):
                forwards, wall = generate(model, sides[side], setup.prompts[batch], args.new_tokens)
                runs[batch, side].append((forwards.throughput(), wall))
        bandwidth.append((*read_bandwidth(data, out), gemv_rate(matrix)))
    return runs, bandwidth


def bench(key: str, args, data: torch.Tensor, out: torch.Tensor) -> None:
    load_before = os.getloadavg()
    setup = prepare(key, args)
    if setup is None:
        return
    model, k, new = setup.model, setup.k, args.new_tokens
    dtype = next(model.parameters()).dtype
    matrix = torch.ones(GEMV_BYTES // (2048 * dtype.itemsize), 2048, dtype=dtype)
    note(f"{key}: the selections of every (batch, side)")
    selections = {(batch, side): decode_k(model, router, setup.prompts[batch], new, setup.num_experts, k)
                  for batch in BATCHES for side, router in sides_of(setup, batch).items()}
    repeats = args.repeats or REPEATS[key]
    runs, bandwidth = time_generations(setup, args, repeats, data, out, matrix)
    del matrix
    load_after = os.getloadavg()
    read_bw, copy_bw, gemv_bw = (statistics.median(b[i] for b in bandwidth) for i in range(3))
    config = model.config.get_text_config()
    print(f"\n{setup.title}: {setup.num_layers} layers x {setup.num_experts} experts, top-{k}, hidden "
          f"{config.hidden_size}, vocabulary {config.vocab_size}, {torch.get_num_threads()} threads, experts kernel "
          f"{model.config._experts_implementation}, {repeats} interleaved repeats")
    print(f"  load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; greedy, prompt "
          f"{args.prompt} random tokens, {new} new tokens per row (min_new_tokens = max_new_tokens)")
    for batch, (alpha, found, evaluations) in setup.tuned.items():
        print(f"  bh at batch {batch}: min_k 1, max_k {k}, alpha = {alpha:.4g} (searched on this batch's decode: "
              f"mean k {found:.2f}, {evaluations} generations; tolerance {overhead.TOLERANCE})")
    print(f"  bandwidth, measured between the generations (median of {repeats}): read {read_bw / 1e9:.2f} GB/s "
          f"(torch.sum over {BANDWIDTH_BYTES // 2**20} MiB float32), copy {copy_bw / 1e9:.2f} GB/s (read + write); "
          f"{str(dtype).removeprefix('torch.')} matrix-vector product {gemv_bw / 1e9:.2f} GB/s of matrix "
          f"(F.linear of one row over a [{GEMV_BYTES // (2048 * dtype.itemsize)}, 2048] matrix, "
          f"{GEMV_BYTES // 2**20} MiB)")
    decode_rate = print_throughput(runs, selections, new)
    print_ideal(setup, selections, decode_rate, read_bw, gemv_bw, args)
    note(f"{key}: profiling {args.profile_steps} batch-1 decode steps per side")
    profile_decode(model, None, setup.prompts[1], 1)  # the profiler's own start-up, discarded
    print(f"\n  where a batch-1 decode step goes: torch.profiler over {args.profile_steps} steps after a "
          f"{args.prompt}-token prefill (self CPU time, ms per step; the profiler adds its own cost)")
    for side, router in sides_of(setup, 1).items():
        print_profile(side, profile_decode(model, router, setup.prompts[1], args.profile_steps), dtype.itemsize)
    print_parts(setup, args.profile_steps)
    if key == "demo":
        layers_vs_time(model, setup.prompts[1], new, max(5, repeats))


def print_throughput(runs, selections, new: int) -> dict:
    """The table of decode tokens/s per (batch, side); returns the medians."""
    print(f"\n  {'batch':>5s} {'side':6s} {'mean k':>6s} {'decode tok/s':>12s} {'ms/step':>8s} {'ratio':>6s} "
          f"{'prefill ms':>10s} {'outside fwd ms/step':>19s}")
    decode_rate = {}
    for (batch, side), samples in runs.items():
        rate = statistics.median(t["decode_tokens_per_s"] for t, _ in samples)
        decode_rate[batch, side] = rate
        prefill = statistics.median(t["prefill_seconds"] for t, _ in samples)
        outside = statistics.median((wall - t["prefill_seconds"] - t["decode_seconds"]) / new for t, wall in samples)
        print(f"  {batch:5d} {side:6s} {selections[batch, side].mean_k:6.2f} {rate:12.1f} {1000 * batch / rate:8.2f} "
              f"{rate / decode_rate[batch, 'native']:6.3f} {1000 * prefill:10.2f} {1000 * outside:19.3f}")
    print("  (mean k over the decode steps; ratio: BH decode tokens/s over native's, medians; ms/step = batch / "
          "tokens per s; outside fwd: generate()'s own time per new token, outside the model's forwards)")
    return decode_rate


def print_ideal(setup: Setup, selections, decode_rate, read_bw: float, gemv_bw: float, args) -> None:
    """The memory-bound ideal of decode (weight bytes per step / read bandwidth) against the measured."""
    model, layers = setup.model, setup.num_layers
    fixed, per_expert = overhead.weight_bytes(model, setup.num_experts)
    cache_bytes = cache_bytes_per_token(model, args.prompt + args.new_tokens // 2)
    print(f"\n  memory-bound ideal, batch 1: weight bytes per decoded token {fixed / 2**20:.1f} MiB fixed (attention, "
          f"gates, norms, LM head, one embedding row) + {per_expert / 2**20:.2f} MiB per selected expert and layer; "
          f"KV cache read per step at the middle position {cache_bytes / 2**20:.2f} MiB (not included)")
    print(f"  {'side':6s} {'mean k':>6s} {'MiB/token':>9s} {'ideal tok/s':>11s} {'measured':>9s} {'meas/ideal':>10s}"
          f"   {'at the matrix-vector rate':s}")
    for side in ("native", "bh"):
        mean = selections[1, side].mean_k
        size = fixed + layers * mean * per_expert
        ideal, measured = read_bw / size, decode_rate[1, side]
        verdict = "reaches" if measured / ideal >= IDEAL_TARGET else "below"
        print(f"  {side:6s} {mean:6.2f} {size / 2**20:9.1f} {ideal:11.1f} {measured:9.1f} {measured / ideal:10.3f}  "
              f"{verdict + ' ' + str(IDEAL_TARGET):13s} ideal {gemv_bw / size:.1f} tok/s, meas/that "
              f"{measured / (gemv_bw / size):.3f}")
    batch = BATCHES[-1]
    print(f"  batch {batch}, from the distinct experts each decode step selects per layer (counted):")
    for side in ("native", "bh"):
        distinct = selections[batch, side].mean_distinct()
        size = fixed + layers * distinct * per_expert
        ideal, measured = batch * read_bw / size, decode_rate[batch, side]
        print(f"  {side:6s} {distinct:5.1f} experts/layer {size / 2**20:8.1f} MiB/step  ideal {ideal:8.1f} tok/s  "
              f"measured {measured:8.1f}  meas/ideal {measured / ideal:.3f}")


def print_parts(setup: Setup, steps: int) -> None:
    """Routers, experts and the rest of a batch-1 decode step, hook-timed (routing_overhead.py's
    ``module_times``: 3 interleaved runs of ``steps`` steps from the prompt's cache, on fixed random tokens)."""
    model = setup.model
    with torch.inference_mode():
        cache = model(input_ids=setup.prompts[1], use_cache=True).past_key_values
    tokens = torch.randint(2, model.config.get_text_config().vocab_size, (1, steps),
                           generator=torch.Generator().manual_seed(7))
    variants = [overhead.Variant(side, None, side, router) for side, router in sides_of(setup, 1).items()]
    parts = overhead.module_times(model, variants, lambda variant: overhead.decode_steps(model, cache, tokens), 3,
                                  sync=lambda: None)
    print(f"  hook-timed batch-1 decode, ms per step over {steps} steps (median of 3 runs; hooks add a little):")
    for side, times in parts.items():
        per_step = {name: value / steps for name, value in times.items()}
        rest = per_step["forward"] - per_step["router"] - per_step["experts"]
        print(f"    {side:6s} step {per_step['forward']:7.3f}: routers {per_step['router']:6.3f}, experts "
              f"{per_step['experts']:7.3f} ({per_step['experts'] / setup.num_layers:.3f} per layer), the rest "
              f"{rest:7.3f} (attention, norms, embedding, LM head, Python)")


def print_profile(side: str, profiled, itemsize: int) -> None:
    wall, events, in_ops, rows, mm_rows = profiled
    print(f"  {side}: {wall:.2f} ms per step under the profiler; {events} op events per step (ops and the ops they "
          f"call), {in_ops:.2f} ms inside ops ({100 * in_ops / wall:.0f} %), the other {wall - in_ops:.2f} ms Python "
          "(modules, router, hooks); top ops:")
    for name, ms, calls in rows:
        print(f"    {name[:44]:44s} {ms:8.3f} ms {100 * ms / wall:5.1f} %  {calls:5d} calls")
    print("    aten::mm by input shapes (GB/s: the second operand's bytes per second):")
    for shapes, ms, calls in mm_rows:
        weight = shapes[1] if len(shapes) > 1 and shapes[1] else [0]
        size = calls * itemsize * math.prod(weight)
        empty = shapes and shapes[0] and shapes[0][0] == 0
        rate = "no rows (an expert no token chose)" if empty else f"{size / ms / 1e6:6.2f} GB/s" if ms > 0 else ""
        print(f"      {str(shapes)[:44]:44s} {ms:8.3f} ms {100 * ms / wall:5.1f} %  {calls:5d} calls  {rate}")


def cache_bytes_per_token(model, position: int) -> float:
    """KV cache bytes one decode step reads at ``position`` (keys and values of every layer)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * position * size


def step_seconds(model, prompt: torch.Tensor, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` native decode steps on fixed random tokens after a prefill of
    ``prompt`` (the forward ``generate()`` makes per new token, without its own per-token work)."""
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randint(2, model.config.get_text_config().vocab_size, (prompt.shape[0], steps), generator=generator)
    seconds = []
    with torch.inference_mode():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        for column in range(steps):
            start = time.perf_counter()
            model(input_ids=tokens[:, column:column + 1], past_key_values=cache, use_cache=True)
            seconds.append(time.perf_counter() - start)
    return seconds


def layers_vs_time(model, prompt, steps: int, repeats: int) -> None:
    """Native batch-1 decode ms per step of the model cut to 1..L layers (interleaved; the median over every
    step but each run's first two), and the linear fit: the cost per layer and the fixed cost per step
    (embedding, final norm, LM head, the model's own overhead)."""
    total = len(find_moe_layers(model))
    cuts = {n: truncated(model, n) for n in range(1, total + 1)}
    times = {n: [] for n in cuts}
    for rep in range(repeats):
        for n in overhead.rotated(list(cuts), rep):
            times[n] += step_seconds(cuts[n], prompt, steps)[2:]
    step = {n: 1000 * statistics.median(samples) for n, samples in times.items()}
    xs, ys = list(step), list(step.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    print(f"\n  demo, native batch-1 decode step vs layers (the model cut to its first n layers; {repeats} interleaved "
          f"runs of {steps} steps, median ms per step):")
    print("    " + ", ".join(f"{n} layers {step[n]:.3f} ms" for n in step))
    print(f"    linear fit: {slope:.3f} ms per layer + {intercept:.3f} ms per step without layers (embedding, final "
          "norm, LM head, the forward's own overhead)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,olmoe4", help="comma-separated, of demo, olmoe4 (default both)")
    parser.add_argument("--demo-model", default="results/demo/model", help="the demo model's directory")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repetitions (default: " + ", ".join(f"{m} {n}" for m, n in REPEATS.items())
                             + ")")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (default 16)")
    parser.add_argument("--profile-steps", type=int, default=8, help="batch-1 decode steps profiled per side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [key for key in models if key not in REPEATS]
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(REPEATS)}")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens: {args.new_tokens}; at least 2 (the first new token comes from the prefill)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*generation.*")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    data, out = torch.ones(BANDWIDTH_BYTES // 4), torch.empty(BANDWIDTH_BYTES // 4)
    for key in models:
        bench(key, args, data, out)
    print(f"\nuptime: {os.popen('uptime').read().strip()}")
    print(f"run time: {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()

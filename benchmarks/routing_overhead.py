#!/usr/bin/env python
"""Forward-time cost of routelab routers relative to the model's native router, measured in one run.

Variants are interleaved (every repetition runs each variant once, in a rotating order) so drift in
machine load affects them alike; the printed ratios are medians of per-repetition times (wall clock,
the target; the process CPU time is printed beside it because on a shared machine it is the steadier
of the two).

- ``bh k=k``: BH with min_k = max_k = the model's k (same experts as native; pure routing overhead).
  Target: <= 1.05.
- ``bh ~k/2``: BH with alpha chosen so that about half of the model's k experts are selected on
  average, experts kernel ``grouped_mm`` (fewer experts must mean less compute). Target: <= 0.70.

For each model the script also prints the experts' share of the native forward time (hook-timed in
separate native forwards) and the ratio that share allows at the measured mean k if the experts'
cost fell exactly in proportion to the experts selected and routing cost nothing:
``1 - share * (1 - mean_k / k)``. Attention, embeddings, norms and the LM head do not shrink.

Models: the demo architecture (random weights; routing cost does not depend on training) on the CPU;
``--wide``: the same with 8x wider experts (intermediate size 512), an experts-dominated CPU model that
shows how the ratio scales with the experts' share (not the target model); and, when CUDA is
available, an OLMoE-1B-7B-sized layer stack (16 layers, 64 experts, top-8, hidden 2048, expert size
1024) in bfloat16.

    python benchmarks/routing_overhead.py [--repeats 20] [--tokens 2048] [--threads N] [--wide] [--stable-malloc]

``--stable-malloc`` reruns the script with glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
raised, so large temporaries are reused instead of being returned to the system and faulted back in:
the native ``grouped_mm`` path (which gathers a fresh ``[tokens * k, hidden]`` tensor every layer) then
takes the same time in every process instead of moving between two levels ~30 % apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from routelab.model.families import find_moe_layers, moe_shape
from routelab.model.patching import install_router
from routelab.routing import BHRouter
from routelab.routing.nulls import fit_kde_null

DEMO = dict(vocab_size=512, hidden_size=96, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, max_position_embeddings=256)
OLMOE = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
             max_position_embeddings=4096)


def build(shape: dict, device: str, dtype: torch.dtype, kernel: str):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    # Special-token ids inside the vocabulary (OLMoE's defaults point past the demo's 512 tokens).
    config = OlmoeConfig(**shape, norm_topk_prob=False, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    config._experts_implementation = kernel
    model = OlmoeForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.set_experts_implementation(kernel)
    return model


WIDE = {**DEMO, "intermediate_size": 512}
STABLE_MALLOC = ("MALLOC_MMAP_THRESHOLD_", "33554432")  # blocks up to 32 MiB from the heap, not mmap
TRIM = ("MALLOC_TRIM_THRESHOLD_", "4294967296")  # and the heap is not trimmed back to the system


def timed(model, inputs, router=None) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one forward."""
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        if router is None:
            model(input_ids=inputs)
        else:
            with install_router(model, router):
                model(input_ids=inputs)
        sync()
    return time.perf_counter() - start, time.process_time() - start_cpu


def module_times(model, inputs, router, repeats: int) -> dict[str, float]:
    """Median ms per forward spent in the MoE routers (gates) and in the experts modules, and the whole
    forward, timed by hooks in separate forwards (hooks add overhead: not used for the ratios)."""
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    spent = {"router": 0.0, "experts": 0.0}

    def hooks_for(name):
        def enter(module, args):
            sync()
            spent[name] -= time.perf_counter()

        def leave(module, args, output):
            sync()
            spent[name] += time.perf_counter()

        return enter, leave

    samples = {"router": [], "experts": [], "forward": []}
    with install_router(model, router) if router is not None else contextlib.nullcontext():
        hooks = []
        for layer in find_moe_layers(model):
            for name, module in (("router", layer.gate), ("experts", layer.experts)):
                enter, leave = hooks_for(name)
                hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        try:
            for _ in range(repeats):
                spent.update(router=0.0, experts=0.0)
                total = timed(model, inputs)[0]
                for name, value in (*spent.items(), ("forward", total)):
                    samples[name].append(1000 * value)
        finally:
            for hook in hooks:
                hook.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


class MeanK:
    """A recorder that only averages the experts selected per (token, layer)."""

    def __init__(self) -> None:
        self.total, self.count = 0, 0

    def record(self, layer, router_logits, selection) -> None:
        self.total += int(selection.k.sum())
        self.count += selection.k.numel()


def alpha_for_mean_k(model, inputs, null, num_experts, k, target):
    """Bisection on alpha so that BH selects about ``target`` experts per token on ``inputs``."""
    low, high = 1e-6, 1.0
    for _ in range(20):
        alpha = (low * high) ** 0.5
        recorder = MeanK()
        with torch.inference_mode(), install_router(model, BHRouter(num_experts, null, alpha, 1, k), recorder):
            model(input_ids=inputs)
        mean = recorder.total / recorder.count
        if abs(mean - target) < 0.1:
            break
        low, high = (alpha, high) if mean < target else (low, alpha)
    return alpha, mean


def bench(name: str, shape: dict, device: str, dtype: torch.dtype, tokens: int, repeats: int) -> None:
    model = build(shape, device, dtype, "grouped_mm")
    shape = moe_shape(model)
    num_layers, num_experts, k = shape.num_layers, shape.num_experts, shape.top_k
    seq = min(512, shape["max_position_embeddings"])
    inputs = torch.randint(0, shape["vocab_size"], (max(1, tokens // seq), seq), device=device)
    with torch.inference_mode():
        logits = model(input_ids=inputs, output_router_logits=True).router_logits
    null = fit_kde_null([layer.float().cpu().numpy() for layer in logits], num_experts)
    alpha, mean = alpha_for_mean_k(model, inputs, null, num_experts, k, k / 2)
    variants = {
        "native": None,
        "bh k=k": BHRouter(num_experts, null, 0.05, k, k),
        f"bh ~k/2 (alpha={alpha:.3g}, mean k={mean:.2f})": BHRouter(num_experts, null, alpha, 1, k),
    }
    for router in variants.values():  # warm-up
        timed(model, inputs, router)
    times = {label: [] for label in variants}
    labels = list(variants)
    for rep in range(repeats):
        for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
            times[label].append(timed(model, inputs, variants[label]))
    parts = {label: module_times(model, inputs, variants[label], max(3, repeats // 2)) for label in labels}
    share = parts["native"]["experts"] / parts["native"]["forward"]
    native_wall = statistics.median(wall for wall, _ in times["native"])
    native_cpu = statistics.median(cpu for _, cpu in times["native"])
    print(f"\n{name}: {num_layers} layers x {num_experts} experts, top-{k}, hidden {shape['hidden_size']}, expert "
          f"size {shape['intermediate_size']}, {inputs.numel()} tokens/forward, {device} "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, experts kernel grouped_mm, "
          f"{repeats} interleaved repeats")
    print(f"  {'variant':45s} {'median ms':>10s} {'ratio vs native':>16s} {'CPU-time ratio':>15s}")
    for label in labels:
        wall = statistics.median(w for w, _ in times[label])
        cpu = statistics.median(c for _, c in times[label])
        print(f"  {label:45s} {1000 * wall:10.2f} {wall / native_wall:16.3f} {cpu / native_cpu:15.3f}")
    print(f"  experts' share of the native forward: {share:.2f}; at mean k {mean:.2f} of {k} the ratio could "
          f"reach {1 - share * (1 - mean / k):.3f} if experts' cost fell in proportion and routing cost nothing")
    print("  where the time goes (ms per forward, hook-timed in separate forwards; hooks add a little):")
    print(f"  {'variant':45s} {'routers':>10s} {'experts':>10s} {'the rest':>10s}")
    for label in labels:
        times = parts[label]
        rest = times["forward"] - times["router"] - times["experts"]
        print(f"  {label:45s} {times['router']:10.2f} {times['experts']:10.2f} {rest:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--wide", action="store_true", help="also the experts-dominated wide demo variant")
    parser.add_argument("--stable-malloc", action="store_true",
                        help="rerun with glibc malloc settings that keep large temporaries (steadier native times)")
    args = parser.parse_args()
    if args.stable_malloc and STABLE_MALLOC[0] not in os.environ:  # glibc reads them at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **dict([STABLE_MALLOC, TRIM])})
    if args.stable_malloc:
        print(f"glibc malloc: {STABLE_MALLOC[0]}={os.environ[STABLE_MALLOC[0]]} {TRIM[0]}={os.environ.get(TRIM[0])}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench("demo model (CPU)", DEMO, "cpu", torch.float32, args.tokens, args.repeats)
    if args.wide:
        bench("wide demo variant (CPU; experts-dominated, not the target model)", WIDE, "cpu", torch.float32,
              args.tokens, args.repeats)
    if torch.cuda.is_available():
        bench("OLMoE-sized stack (GPU)", OLMOE, "cuda", torch.bfloat16, 4 * args.tokens, args.repeats)


if __name__ == "__main__":
    main()

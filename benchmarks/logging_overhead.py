#!/usr/bin/env python
"""Forward-time cost of recording routing decisions, measured in one interleaved run.

On the demo architecture (random weights: logging cost does not depend on training), routed with BH
(variable k), each repetition runs, in rotating order:

- ``no logging``: the router installed, no recorder;
- ``full log``: :class:`RoutingRecorder` writing every (token, layer) decision to Parquet;
- ``full log + 1/100 detail``: plus :class:`DecisionSampler` keeping every 100th token's detail.

Targets: full log <= 1.05 x no logging; the 1/100 detail on top <= 1.02 x the full log. Also prints
the Parquet bytes per million (token, layer) records of routing.parquet.

    python benchmarks/logging_overhead.py [--repeats 20] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from routelab.decisions import DecisionSampler
from routelab.nulls import fit_kde_null
from routelab.patching import install_router, model_routing_shape
from routelab.recording import RecorderGroup, RoutingRecorder
from routelab.routers import BHRouter

DEMO = dict(vocab_size=512, hidden_size=96, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, max_position_embeddings=256)


def forward(model, inputs, router, recorder) -> float:
    mask = torch.ones_like(inputs)
    ids = torch.arange(inputs.shape[0])
    start = time.perf_counter()
    with torch.inference_mode(), install_router(model, router, recorder):
        if recorder is not None:
            recorder.begin_batch(mask, ids, ids, inputs)
        model(input_ids=inputs, attention_mask=mask)
        if recorder is not None:
            recorder.end_batch()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**DEMO, norm_topk_prob=False)).eval()
    num_layers, num_experts, k, _ = model_routing_shape(model)
    seq = DEMO["max_position_embeddings"]
    inputs = torch.randint(0, DEMO["vocab_size"], (max(1, args.tokens // seq), seq))
    with torch.inference_mode():
        logits = model(input_ids=inputs, output_router_logits=True).router_logits
    null = fit_kde_null([layer.numpy() for layer in logits], num_experts)
    router = BHRouter(num_experts, null, alpha=0.5, min_k=1, max_k=k)

    tmp = tempfile.mkdtemp(prefix="routelab-logging-")
    full_path, detail_path = os.path.join(tmp, "routing.parquet"), os.path.join(tmp, "decisions.parquet")
    full = RoutingRecorder(num_layers, num_experts, 1, k, path=full_path)
    both = RecorderGroup(RoutingRecorder(num_layers, num_experts, 1, k, path=os.path.join(tmp, "r2.parquet")),
                         DecisionSampler(detail_path, num_experts, every_n=100, alpha=0.5))
    variants = {"no logging": None, "full log": full, "full log + 1/100 detail": both}
    labels = list(variants)
    for label in labels:
        forward(model, inputs, router, variants[label])
    times = {label: [] for label in labels}
    for rep in range(args.repeats):
        for label in labels[rep % 3:] + labels[:rep % 3]:
            times[label].append(forward(model, inputs, router, variants[label]))
    full.close()
    both.close()
    median = {label: statistics.median(values) for label, values in times.items()}
    print(f"demo model (CPU, BH alpha 0.5): {num_layers} layers x {num_experts} experts, {inputs.numel()} "
          f"tokens/forward, {args.repeats} interleaved repeats")
    print(f"  {'variant':28s} {'median ms':>10s} {'ratio':>8s}")
    for label in labels:
        print(f"  {label:28s} {1000 * median[label]:10.2f} {median[label] / median['no logging']:8.3f}")
    print(f"  1/100 detail on top of the full log: {median['full log + 1/100 detail'] / median['full log']:.3f}")
    records = (args.repeats + 1) * inputs.numel() * num_layers
    print(f"  routing.parquet: {os.path.getsize(full_path) / records * 1e6 / 2**20:.2f} MiB per million "
          f"(token, layer) records ({records} records, mean k {full.summary()['experts_mean']:.2f})")


if __name__ == "__main__":
    main()

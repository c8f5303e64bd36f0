#!/usr/bin/env python
"""Forward-time cost of recording routing decisions, measured in one interleaved run.

On the trained demo model (``--model``, default ``results/demo/model`` when the demo pipeline has run;
otherwise the demo architecture with random weights), routed with BH (variable k), each repetition
runs, in rotating order, the configurations the pipeline runs:

- ``no logging``: the router installed, no recorder;
- ``full log``: :class:`RoutingRecorder` writing every (token, layer) decision to Parquet, with every
  statistic of summary.json: the pipeline with ``evaluation.decision_sample_every: 0`` (no sampling,
  so no p-values are computed);
- ``full log + 1/100 detail``: the pipeline's default (``decision_sample_every: 100``): the recorder also
  takes the p-value moments of every 100th token, and :class:`DecisionSampler` writes those tokens'
  detail (both read the same p-values, computed once);
- ``full log + 1/100 p-value moments``: the recorder's part of the default alone (no detail file), to
  show how the sampling's cost splits.

Targets: full log <= 1.05 x no logging; the 1/100 detail on top (default / full log: everything the
sampling adds, p-values included) <= 1.02. Also prints the CPU time the Parquet writer threads spend
(which the interleaved forwards do not see: the benchmark's records fit in one row group, written at
the end) and the ratio with it added, the recorders' own work replayed on one batch's captured calls
without the model (a steadier figure than a difference of forward times on a noisy machine), and the
Parquet bytes per million (token, layer) records, from forwards of distinct random tokens (the timed
forwards repeat one batch, whose repeats zstd would compress away).

    python benchmarks/logging_overhead.py [--model results/demo/model] [--repeats 60] [--tokens 2048]
                                          [--threads N] [--sample-every 100] [--replays 300]
                                          [--size-forwards 40] [--shape olmoe4] [--decode STEPS]

``--shape olmoe4`` measures on routing_overhead.py's OLMoE-1B-7B-shaped stack (4 of 16 layers, hidden 2048,
64 experts of 1024, bfloat16, random weights) instead of the demo model. ``--decode STEPS`` times batch-1
decode instead of prefill: each timed unit is STEPS one-token forwards over the KV cache of a 64-token
prompt (a fresh copy each time), every step a recorded batch (``phase`` decode), where the recorders'
fixed cost per forward weighs most; the recording groups the unit's steps into one batch for the recorders
(``Recording.decode_group``), recorded inside the unit's timing; ``--decode-group 1`` records each step alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

from routelab.model.families import moe_shape
from routelab.model.patching import install_router
from routelab.record import DecisionSampler, Recording, RoutingRecorder
from routelab.routing import BHRouter, Selection
from routelab.routing.nulls import fit_kde_null

DEMO = dict(vocab_size=512, hidden_size=96, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, max_position_embeddings=256)


class Timed:
    """Wraps a recorder and adds up the wall time spent in its calls (``spent``, seconds)."""

    def __init__(self, recorder) -> None:
        self.recorder, self.spent = recorder, 0.0

    def _timed(self, name, *args):
        start = time.perf_counter()
        getattr(self.recorder, name)(*args)
        self.spent += time.perf_counter() - start

    def begin_batch(self, *args):
        self._timed("begin_batch", *args)

    def record(self, *args):
        self._timed("record", *args)

    def end_batch(self):
        self._timed("end_batch")

    def flush(self):
        self._timed("flush")

    def close(self):
        self.recorder.close()


def forward(model, inputs, router, recorder, decode=None) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads, the Parquet writer's included) of one recorded forward, or
    with ``decode`` (``(prompt cache, prompt length)``) of ``inputs.shape[1]`` one-token decode steps from a
    copy of the prompt's cache (copied outside the timing), each step a recorded batch."""
    ids = torch.arange(inputs.shape[0])
    if decode is None:
        steps, mask = [(inputs, None)], torch.ones_like(inputs)
    else:
        cache, prompt = copy.deepcopy(decode[0]), decode[1]
        steps = [(inputs[:, i:i + 1], prompt + i) for i in range(inputs.shape[1])]
        mask = torch.ones(1, 1, dtype=torch.long)
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), install_router(model, router, recorder):
        for tokens, position in steps:
            if recorder is not None:
                offsets = None if position is None else torch.tensor([position], dtype=torch.int32)
                recorder.begin_batch(mask, ids, ids, tokens, offsets, "prefill" if position is None else "decode")
            if position is None:
                model(input_ids=tokens, attention_mask=mask)
            else:
                model(input_ids=tokens, past_key_values=cache, use_cache=True)
            if recorder is not None:
                recorder.end_batch()
        if recorder is not None:  # the decode steps grouped by the recording are recorded inside the timing
            recorder.flush()
    return time.perf_counter() - start, time.process_time() - start_cpu


class Capture:
    """A recorder that keeps one forward's ``record`` calls, to replay them without the model."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def begin_batch(self, *args):
        self.calls = []

    def record(self, *args):
        self.calls.append(args)

    def end_batch(self):
        pass


def replay(recorder, calls, inputs, repeats: int) -> float:
    """Median seconds of one batch of ``recorder`` work (begin_batch, the captured record calls, end_batch)
    replayed ``repeats`` times without a forward pass: the recorder's own cost, steadier than the
    difference of two forward times. Each replay gets fresh Selections (their p-value memo is per batch)."""
    mask, ids = torch.ones_like(inputs), torch.arange(inputs.shape[0])
    spent = []
    with torch.inference_mode():
        for _ in range(repeats):
            batch = [(layer, logits, Selection(s.indices, s.weights, s.k, s._pvalues, s.probs, s.top_expert,
                                               s.top_probs)) for layer, logits, s in calls]
            start = time.perf_counter()
            recorder.begin_batch(mask, ids, ids, inputs)
            for call in batch:
                recorder.record(*call)
            recorder.end_batch()
            spent.append(time.perf_counter() - start)
    return statistics.median(spent[repeats // 10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--model", default="results/demo/model",
                        help="a saved MoE model (default: the demo's); random demo weights if it does not exist")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--replays", type=int, default=300,
                        help="replays of one batch's recorder work without the model (0: skip)")
    parser.add_argument("--size-forwards", type=int, default=40,
                        help="forwards of distinct random tokens whose logs measure the file sizes")
    parser.add_argument("--sample-every", type=int, default=100,
                        help="the detail's sampling (the pipeline's evaluation.decision_sample_every)")
    parser.add_argument("--shape", choices=["demo", "olmoe4"], default="demo",
                        help="olmoe4: routing_overhead.py's OLMoE-shaped bf16 stack instead of the demo model")
    parser.add_argument("--decode-group", type=int, default=64, metavar="STEPS",
                        help="decode steps the recording hands to the recorders as one batch (1: each alone)")
    parser.add_argument("--decode", type=int, default=0, metavar="STEPS",
                        help="time batch-1 decode of STEPS one-token steps per unit instead of prefill")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    if args.shape == "olmoe4":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from routing_overhead import MODELS, build

        model, source = build(MODELS["olmoe4"]), MODELS["olmoe4"].title
    elif os.path.isdir(args.model):
        from routelab.model.loading import load_model

        model, source = load_model(args.model, device="cpu"), args.model
    else:
        model, source = OlmoeForCausalLM(OlmoeConfig(**DEMO, norm_topk_prob=False)).eval(), "random demo weights"
    shape = moe_shape(model)
    num_layers, num_experts, k = shape.num_layers, shape.num_experts, shape.top_k
    seq = min(DEMO["max_position_embeddings"], model.config.max_position_embeddings)
    inputs = torch.randint(0, model.config.vocab_size, (max(1, args.tokens // seq), seq))
    with torch.inference_mode():
        logits = [layer.float() for layer in model(input_ids=inputs, output_router_logits=True).router_logits]
    decode = None
    if args.decode:
        prompt = torch.randint(0, model.config.vocab_size, (1, 64))
        with torch.inference_mode():
            decode = (model(input_ids=prompt, use_cache=True).past_key_values, prompt.shape[1])
        inputs = torch.randint(0, model.config.vocab_size, (1, args.decode))
    null = fit_kde_null([layer.numpy() for layer in logits], num_experts)
    router = BHRouter(num_experts, null, alpha=0.5, min_k=1, max_k=k)
    every = args.sample_every
    tmp = tempfile.mkdtemp(prefix="routelab-logging-")

    def recorder(name: str, pvalue_every: int) -> RoutingRecorder:
        return RoutingRecorder(num_layers, num_experts, 1, k, path=os.path.join(tmp, name), pvalue_every=pvalue_every)

    def sampler(name: str) -> DecisionSampler:
        return DecisionSampler(os.path.join(tmp, name), num_experts, every_n=every, alpha=0.5)

    full_label, default_label = "full log", f"full log + 1/{every} detail"
    moments_label = f"full log + 1/{every} p-value moments"
    group = args.decode_group
    variants = {"no logging": None, full_label: Timed(Recording(recorder("full.parquet", 0), decode_group=group)),
                default_label: Timed(Recording(recorder("default.parquet", every), sampler("decisions.parquet"),
                                               decode_group=group)),
                moments_label: Timed(Recording(recorder("moments.parquet", every), decode_group=group))}
    labels = list(variants)
    for label in labels:
        forward(model, inputs, router, variants[label], decode)
    times = {label: [] for label in labels}
    for timed in variants.values():
        if timed is not None:
            timed.spent = 0.0
    for rep in range(args.repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            times[label].append(forward(model, inputs, router, variants[label], decode))
    # Closing writes the last row group (real runs write one per ~1M records while the model runs). The
    # writer threads' CPU time is what the logs cost beyond the forwards measured above.
    encode_ms = {}
    for label, timed in variants.items():
        if timed is not None:
            timed.close()
            writers = getattr(timed.recorder, "recorders", (timed.recorder,))
            encode_ms[label] = 1000 * sum(w.encode_seconds for w in writers) / (args.repeats + 1)
    work = f"{args.decode} batch-1 decode steps per unit" if decode else f"{inputs.numel()} tokens/forward"
    print(f"{source} (CPU, {torch.get_num_threads()} threads, BH alpha 0.5): {num_layers} layers x {num_experts} "
          f"experts, {work}, {args.repeats} interleaved repeats")
    # Wall time is what a user waits; CPU time (process, all threads) is steadier on a shared machine.
    # Ratios are paired: each repetition's forward over the no-logging forward of the same repetition (run
    # next to it), then the median over repetitions; slow drifts of a shared machine cancel in each pair.
    def ratio(label: str, base: str, i: int) -> float:
        return statistics.median(t[i] / b[i] for t, b in zip(times[label], times[base]))

    print(f"  {'variant':36s} {'wall ms':>9s} {'ratio':>7s} {'CPU ms':>9s} {'ratio':>7s} {'in recorder ms':>15s}")
    median = {}
    for label in labels:
        median[label] = [statistics.median(t[i] for t in times[label]) for i in (0, 1)]
        spent = "" if variants[label] is None else f"{1000 * variants[label].spent / args.repeats:15.2f}"
        print(f"  {label:36s} {1000 * median[label][0]:9.2f} {ratio(label, 'no logging', 0):7.3f} "
              f"{1000 * median[label][1]:9.2f} {ratio(label, 'no logging', 1):7.3f} {spent}")

    def on_top(label: str, base: str) -> str:
        return f"wall {ratio(label, base, 0):.3f}, CPU {ratio(label, base, 1):.3f}"

    # The OLMoE shape's targets are tighter: its forwards are long against the recorders' fixed costs.
    full_target, detail_target = (1.03, 1.01) if args.shape == "olmoe4" else (1.05, 1.02)
    print(f"  full log (target <= {full_target}): wall {ratio(full_label, 'no logging', 0):.3f}")
    print(f"  1/{every} detail on top of the full log (target <= {detail_target}; p-values included): "
          f"{on_top(default_label, full_label)}")
    print(f"    of which the p-value moments: {on_top(moments_label, full_label)}; the detail file: "
          f"{on_top(default_label, moments_label)}")
    base_ms = 1000 * median["no logging"][0]
    print("  Parquet encoding on the writer threads (their CPU time, ms per forward) and the ratio with it added "
          "(where torch uses every core, as here, it competes with the forward):")
    for label, spent in encode_ms.items():
        print(f"    {label:36s} {spent:6.2f} ms -> wall {(1000 * median[label][0] + spent) / base_ms:.3f}")
    if args.replays and not decode:
        capture = Capture()
        forward(model, inputs, router, capture)
        replayed = {full_label: Recording(recorder("replay-full.parquet", 0)),
                    default_label: Recording(recorder("replay-default.parquet", every), sampler("replay-d.parquet"))}
        spent = {label: replay(rec, capture.calls, inputs, args.replays) for label, rec in replayed.items()}
        for rec in replayed.values():
            rec.close()
        print(f"  recorder work alone, one batch replayed {args.replays} times without the model (median): "
              + ", ".join(f"{label} {1000 * value:.2f} ms" for label, value in spent.items())
              + f" (the no-logging forward: {base_ms:.2f} ms)")
    if decode:
        return
    # File sizes on distinct inputs: the timed forwards repeat one batch, which zstd compresses away.
    sized = Recording(recorder("sized.parquet", every), sampler("sized-decisions.parquet"))
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.size_forwards):
        forward(model, torch.randint(0, model.config.vocab_size, inputs.shape, generator=generator), router, sized)
    sized.close()
    full, detail = sized.recorders
    records = args.size_forwards * inputs.numel() * num_layers
    print(f"  routing.parquet on {args.size_forwards} forwards of distinct random tokens: "
          f"{os.path.getsize(os.path.join(tmp, 'sized.parquet')) / records * 1e6 / 2**20:.2f} MiB per million "
          f"(token, layer) records (mean k {full.summary()['experts_mean']:.2f}); decisions.parquet "
          f"{os.path.getsize(os.path.join(tmp, 'sized-decisions.parquet')) / (records / every):.0f} bytes per sampled "
          f"(token, layer)")


if __name__ == "__main__":
    main()

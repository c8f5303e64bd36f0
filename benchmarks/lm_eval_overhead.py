#!/usr/bin/env python
"""Wall time of an lm-eval task run through routelab against plain lm-eval, in one interleaved run.

On one loaded model (``--model``, default the demo model ``results/demo/model``), each repetition runs, in
rotating order:

- ``plain lm-eval``: ``simple_evaluate`` with lm-eval's own ``HFLM`` on the unpatched model (both sides
  without lm-eval's ``add_env_info``, which routelab skips: its subprocesses are not evaluation);
- ``routelab, no log``: :func:`routelab.run.tasks.evaluate_task` with the model's own top-k installed
  and a :class:`ForwardLog` without recording (the rows of every forward named, nothing kept);
- ``routelab, full log``: the same with the pipeline's recorders: every (token, layer) decision to
  Parquet and every 100th token's detail.

Targets: no log <= 1.05 x plain lm-eval, full log <= 1.10 x. Both tasks of the demo are timed apart
(``demo_bracket_choice``: log-likelihood requests; ``demo_close_brackets``: generation). The ratios are
of medians; each repetition is a whole task evaluation, lm-eval's own request building included.

    python benchmarks/lm_eval_overhead.py [--model results/demo/model] [--repeats 7] [--limit 40]
                                          [--tasks demo_bracket_choice,demo_close_brackets] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from routelab.data.tasks import task_data, task_manager, task_spec
from routelab.model.families import moe_shape
from routelab.model.patching import install_router
from routelab.record import DecisionSampler, Recording, RoutingRecorder
from routelab.routing import build_router
from routelab.run.generation import ForwardLog
from routelab.run.tasks import _without_env_info, evaluate_task

TASKS = Path(__file__).resolve().parents[1] / "config" / "tasks"


def plain(model, tokenizer, spec, batch_size: int) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # without lm-eval's add_env_info, as routelab runs it (~0.7 s of pip and conda subprocesses a task,
    # which would hide the evaluation's own cost)
    with task_data(), _without_env_info():
        simple_evaluate(model=lm, tasks=[spec["task"]], task_manager=task_manager(spec), limit=spec["limit"],
                        log_samples=True, cache_requests=False, use_cache=None, random_seed=0,
                        numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=spec["fewshot_seed"])


def routed(model, tokenizer, spec, batch_size: int, log_dir: Path | None) -> None:
    shape = moe_shape(model)
    router = build_router({"method": "topk", "k": shape.top_k}, shape.num_experts, shape.top_k)
    recorders = [] if log_dir is None else [
        RoutingRecorder(shape.num_layers, shape.num_experts, router.min_k, router.max_k,
                        path=log_dir / "routing.parquet", pvalue_every=100),
        DecisionSampler(log_dir / "decisions.parquet", shape.num_experts, 100)]
    forwards = ForwardLog(Recording(*recorders) if recorders else None)
    with install_router(model, router, forwards.recording):
        evaluate_task(model, tokenizer, spec, forwards, batch_size)
    if forwards.recording is not None:
        forwards.recording.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/demo/model", help="a save_pretrained MoE with its tokenizer")
    parser.add_argument("--tasks", default="demo_bracket_choice,demo_close_brackets")
    parser.add_argument("--include-path", default=str(TASKS))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # lm-eval warns once per HFLM built around a model object
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.repeats} repeats, limit {args.limit}")
    for task in args.tasks.split(","):
        spec = task_spec({"source": "lm_eval", "task": task, "include_path": args.include_path, "limit": args.limit})
        with tempfile.TemporaryDirectory() as tmp:
            sides = {"plain lm-eval": partial(plain, model, tokenizer, spec, args.batch_size),
                     "routelab, no log": partial(routed, model, tokenizer, spec, args.batch_size, None),
                     "routelab, full log": partial(routed, model, tokenizer, spec, args.batch_size, Path(tmp))}
            for run in sides.values():  # warm-up: imports, task building, allocator
                run()
            times = {name: [] for name in sides}
            names = list(sides)
            for rep in range(args.repeats):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    start = time.perf_counter()
                    sides[name]()
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["plain lm-eval"])
        print(f"\n{task}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:20s} median {median:7.3f} s  (min {min(values):.3f}, max {max(values):.3f})"
                  f"  ratio {median / base:.3f}")
        print(f"  targets: no log <= 1.05, full log <= 1.10 (of plain lm-eval); noise: plain's max/min "
              f"{max(times['plain lm-eval']) / min(times['plain lm-eval']):.3f}")


if __name__ == "__main__":
    main()

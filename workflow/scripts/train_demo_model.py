#!/usr/bin/env python
"""Stage train_demo_model: train the demo's tiny OLMoE-architecture MoE and its tokenizer on CPU.

Writes a ``save_pretrained`` directory (config, weights, tokenizer) plus ``train_hparams.json``,
``train_metrics.jsonl`` and ``train_metrics.csv`` (per step: loss, lm_loss, aux_loss, lr,
grad_norm, tokens_per_s). The directory appears atomically when training has finished.

    python workflow/scripts/train_demo_model.py --out results/demo/model \
        --settings '{"layers": 4, "experts": 64, "top_k": 8, ...}'
"""

import argparse

import torch

from routelab.cli import json_arg, run
from routelab.config import section_defaults
from routelab.demo import model as demo_model
from routelab.io.files import atomic_path

DEFAULTS = section_defaults("demo_model")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # Multithreaded CPU backward otherwise sums in a varying order (weights differ by ~1e-7 between two
    # runs), and every later stage inherits the difference: same config, same model, bit for bit.
    torch.use_deterministic_algorithms(True)
    unknown = sorted(set(args.settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"--settings: unknown key {unknown[0]!r}; valid keys: {', '.join(DEFAULTS)}")
    settings = {**DEFAULTS, **args.settings}
    with atomic_path(args.out) as tmp:
        stats = demo_model.train(settings, tmp, seed=args.seed)
    print(f"demo model saved to {args.out} (final lm loss {stats['final_lm_loss']:.4f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    parser.add_argument("--settings", type=json_arg, default={},
                        help="JSON object overriding the demo_model config section (or @file.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    run(main, parser)

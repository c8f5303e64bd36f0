"""Train the demo model: a tiny OLMoE-architecture MoE and its BPE tokenizer, on CPU in minutes.

Saved with ``save_pretrained`` so every later stage loads it through ``AutoModelForCausalLM`` /
``AutoTokenizer``, exactly as it would a hub model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from routelab.demo import corpus as demo_corpus
from routelab.tracking import RunLogger

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|padding|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained with the ``tokenizers`` library, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=10**6)


def build_model(settings: dict, tokenizer, seed: int):
    """A freshly initialised ``OlmoeForCausalLM`` sized by the ``demo_model`` config section."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["expert_size"],
        num_hidden_layers=settings["layers"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings["heads"],
        num_experts=settings["experts"],
        num_experts_per_tok=settings["top_k"],
        max_position_embeddings=settings["max_positions"],
        router_aux_loss_coef=settings["router_aux_loss_coef"],
        norm_topk_prob=False,  # as OLMoE-1B-7B
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return OlmoeForCausalLM(config)


def token_stream(texts: list[str], tokenizer) -> np.ndarray:
    """All documents tokenized and joined with end-of-text separators."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(settings: dict, out_dir: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Train tokenizer and model, save both to ``out_dir`` with the training log; return final stats."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    texts = demo_corpus.training_corpus(settings["train_documents"], seed=seed)
    tokenizer = train_tokenizer(texts, settings["vocab_size"])
    stream = token_stream(texts, tokenizer)
    model = build_model(settings, tokenizer, seed)
    model.train()

    steps, batch, seq = settings["train_steps"], settings["batch_size"], settings["seq_len"]
    if len(stream) <= seq + 1:
        raise ValueError(f"demo_model.seq_len: {seq} is longer than the whole training corpus ({len(stream)} tokens)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], betas=(0.9, 0.95),
                                  weight_decay=0.1)
    warmup = max(1, steps // 20)
    rng = np.random.default_rng([seed, 7])
    hparams = {**settings, "seed": seed, "corpus_tokens": int(len(stream)), "warmup_steps": warmup,
               "parameters": sum(p.numel() for p in model.parameters()), "optimizer": "AdamW(0.9, 0.95, wd=0.1)",
               "schedule": "linear warm-up, cosine to 10%", "grad_clip": 1.0, "torch_threads": torch.get_num_threads()}
    log.info("demo model: %s", hparams)

    with RunLogger(out_dir, prefix="train_") as tracker:
        tracker.log_params(hparams)
        bar = tqdm(range(steps), desc="train demo model", disable=not progress, mininterval=2)
        for step in bar:
            start = time.perf_counter()
            offsets = rng.integers(0, len(stream) - seq - 1, size=batch)
            tokens = torch.from_numpy(np.stack([stream[o:o + seq] for o in offsets]))
            lr = lr_at(step, steps, settings["learning_rate"], warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(input_ids=tokens, labels=tokens, output_router_logits=True)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            elapsed = time.perf_counter() - start
            aux, loss = float(out.aux_loss.detach()), float(out.loss.detach())
            lm_loss = loss - settings["router_aux_loss_coef"] * aux
            tracker.log(step, loss=loss, lm_loss=lm_loss, aux_loss=aux, lr=lr,
                        grad_norm=float(grad_norm), tokens_per_s=batch * seq / elapsed)
            bar.set_postfix(loss=f"{lm_loss:.3f}", aux=f"{aux:.3f}", refresh=False)
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                _log_expert_load(tracker, out.router_logits, settings["top_k"], step)
                tracker.log_system(step)
                log.info("step %d/%d loss %.4f aux %.4f lr %.2e grad_norm %.3f tok/s %.0f", step + 1, steps,
                         lm_loss, aux, lr, float(grad_norm), batch * seq / elapsed)

        model.eval()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        tracker.log_final(lm_loss=lm_loss, aux_loss=aux, loss=loss)
    return {"final_lm_loss": lm_loss, "final_aux_loss": aux, **hparams}


def _log_expert_load(tracker: RunLogger, router_logits: tuple, top_k: int, step: int) -> None:
    """Per layer, a histogram over expert ids of the tokens that picked each expert in its top-k
    (the training batch at ``step``); ``router_logits`` holds one ``[tokens, E]`` tensor per layer."""
    for layer, logits in enumerate(router_logits):
        chosen = logits.detach().topk(top_k, dim=-1).indices.reshape(-1)
        tracker.log_histogram(f"expert_load/layer_{layer}", torch.bincount(chosen, minlength=logits.shape[-1]).numpy(),
                              step=step)

"""Token ids as display text: one string per token, so a document reads naturally when its pieces are
concatenated (byte-level BPE's ``Ġ`` shown as a space, a character split over several byte tokens shown
once)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 byte sequence


def token_pieces(ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> list[str]:
    """The text each token adds, ``[len(ids)]``: the difference between decoding the text up to the
    token and up to the previous one, over a short window of preceding tokens (so a sentencepiece
    token keeps its leading space). A token ending inside a multi-byte character gets ``""`` and the
    character goes to the token that completes it; ``"".join(pieces) == decode(ids)`` for clean text."""
    pieces, prefix_start, read_start = [], 0, 0
    for end in range(1, len(ids) + 1):
        prefix = decode(ids[prefix_start:read_start])
        text = decode(ids[prefix_start:end])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            pieces.append(text[len(prefix):])
            prefix_start, read_start = read_start, end
        else:
            pieces.append("")
    return pieces


def load_decoder(tokenizer_path: str | os.PathLike) -> Callable[[Sequence[int]], list[str]]:
    """The tokenizer at ``tokenizer_path`` (local files only) as ``decode(ids) -> [one display string per
    id]`` (:func:`token_pieces`); special tokens are kept as their text (``<|endoftext|>``)."""
    from transformers import AutoTokenizer  # here: its ~3 s import would fall on every aggregate worker process

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_path), local_files_only=True)

    def decode_text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode(ids: Sequence[int]) -> list[str]:
        return token_pieces([int(i) for i in ids], decode_text)

    return decode

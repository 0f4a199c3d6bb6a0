"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers` on the training split.

Byte-level means the base alphabet is the 256 bytes (GPT-2's scheme): every input encodes, with
no unknown token, and merges only ever shorten it. Pre-tokenization is GPT-2's regex (words,
numbers, punctuation runs, whitespace runs), so indentation becomes a few learned whitespace
tokens. Two special tokens come first: <|bos|> (id 0) starts every document and every prompt,
<|eos|> (id 1) ends a document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|bos|>", "<|eos|>"
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"  # what transformers' AutoTokenizer needs beside it


def write_hf_config(out: Path, max_length: int) -> None:
    """tokenizer_config.json, so tools built on transformers (guidellm, lm-eval) load the
    tokenizer with AutoTokenizer from the model directory. ecserve itself reads only
    tokenizer.json and config.json."""
    (out / HF_CONFIG_FILE).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": max_length}, indent=1) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Train on `texts` and write tokenizer.json to `out` (a directory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tok.save(str(path))
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_bytes(path: Path) -> list[int]:
    """UTF-8 bytes each id stands for (0 for the special tokens): for bits per byte. Each
    character of a byte-level token stands for one byte."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    out = [0] * tok.get_vocab_size(with_added_tokens=True)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        out[i] = 0 if token in (BOS, EOS) else len(token)
    return out

"""Tokenizers (built-in bytes, or a Hugging Face tokenizer.json) and streaming detokenization.

`IncrementalDetokenizer` turns generated ids into text deltas: the concatenation of its deltas
plus `flush()` equals `decode(ids)` (exactly for ByteTokenizer; for other tokenizers whenever
decoding is prefix-stable), and no delta ever ends in a half-decoded character.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from ecserve.errors import ConfigError
from ecserve.readable import check_readable

REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # ids are in [0, vocab_size)
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are skipped and invalid UTF-8 becomes U+FFFD."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256 is <bos> and 257 is <eos>."""

    BOS = 256
    EOS = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.bos_token_id: int | None = self.BOS
        self.eos_token_id: int | None = self.EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Ids outside 0..255 (the specials, or a model's padded vocabulary) produce no text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """A special token's own text (what a chat template writes for it)."""
        return {self.BOS: "<bos>", self.EOS: "<eos>"}.get(token_id, self.decode([token_id]))


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; bos/eos come from the model config."""

    def __init__(
        self,
        path: str | os.PathLike,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        # Imported lazily so the byte tokenizer works without the `tokenizers` package.
        from tokenizers import Tokenizer as _HFTokenizer

        self._tok = _HFTokenizer.from_file(str(path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """A special token's own text (what a chat template writes for it)."""
        return self._tok.id_to_token(token_id) or ""


def load_tokenizer(
    model_dir: str | os.PathLike,
    kind: str,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> Tokenizer:
    """The tokenizer that config.json's "tokenizer" key (`kind`) names for `model_dir`."""
    if kind == "byte":
        bad = [
            f"{name}={got} (the byte tokenizer's is {want})"
            for name, got, want in (
                ("bos_token_id", bos_token_id, ByteTokenizer.BOS),
                ("eos_token_id", eos_token_id, ByteTokenizer.EOS),
            )
            if got is not None and got != want
        ]
        if bad:
            raise ConfigError("tokenizer 'byte' does not match the config: " + ", ".join(bad),
                              field="tokenizer")
        return ByteTokenizer()
    if kind == "huggingface":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            # Not "config.json's tokenizer key": Hugging Face checkpoints have none.
            raise FileNotFoundError(
                f"{path} not found: this model's tokenizer is a Hugging Face tokenizer.json, "
                "which belongs in the model directory (a Hugging Face checkpoint: download it "
                "with the weights)"
            )
        check_readable(path)
        return HFTokenizer(path, bos_token_id, eos_token_id)
    raise ConfigError(f"unknown tokenizer kind {kind!r}: expected 'byte' or 'huggingface'",
                      field="tokenizer")


# Prompt ids kept as left context, so the first generated token decodes as it would mid-text
# (e.g. SentencePiece drops a leading space only at the start of a decode).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas for streaming."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._chunks: list[str] = []
        # ByteTokenizer: a stateful UTF-8 decoder is exact and O(1) per token.
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")(errors="replace")
            if isinstance(tokenizer, ByteTokenizer)
            else None
        )
        # Otherwise (as vLLM/TGI): `_ids` is a window starting at the prefix offset; ids before
        # `_read` are already emitted and give context, `_prefix_text` is their decoded text.
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if self._utf8 is None else []
        self._prefix_text = tokenizer.decode(self._ids) if self._ids else ""
        if self._prefix_text.endswith(REPLACEMENT_CHAR):
            # A prompt ending mid-character would merge with the first generated bytes, and the
            # stream would no longer match decode(generated ids): go without context.
            self._ids, self._prefix_text = [], ""
        self._read = len(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """The text made final by `token_id`; "" while a character or merge is incomplete."""
        if self._utf8 is not None:
            if not 0 <= token_id < 256:
                return ""  # special ids produce no text
            return self._emit(self._utf8.decode(bytes((token_id,))))
        self._ids.append(token_id)
        new_text = self._tokenizer.decode(self._ids)
        # A trailing U+FFFD is usually a character whose remaining bytes are still to come.
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        # Keep only the tokens just emitted as the next prefix, so the window stays small.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids)
        return self._emit(delta)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (incomplete bytes as U+FFFD)."""
        if self._utf8 is not None:
            return self._emit(self._utf8.decode(b"", final=True))
        if self._read == len(self._ids):
            return ""
        delta = self._tokenizer.decode(self._ids)[len(self._prefix_text) :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids)
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

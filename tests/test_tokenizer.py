"""Tokenizers and streaming detokenization (ecserve/tokenizer.py)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ecserve.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    load_tokenizer,
)

TEXTS = [
    "hello world",
    "héllo wörld, café crème",
    "naïve 😀 emoji 🎉 and 日本語のテキスト",
    "Ελληνικά и русский текст",
]


def stream(tok: Tokenizer, ids: Sequence[int], prompt_ids: Sequence[int] = ()) -> tuple[str, str]:
    """(the concatenated deltas + flush, the detokenizer's .text) for `ids`."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    return out, detok.text


# --- ByteTokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "plain ASCII text", "é ß ñ", "日本語", "😀🎉 x", *TEXTS])
def test_byte_roundtrip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_ids_and_specials() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (258, 256, 257)
    assert tok.decode([256, *tok.encode("hi"), 257]) == "hi"
    # A special token between the bytes of one character does not break it.
    euro = tok.encode("€")
    assert tok.decode([euro[0], 256, *euro[1:], 257]) == "€"


def test_byte_decode_invalid_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated 3-byte character
    assert tok.decode([0x80, 0x80]) == "\ufffd\ufffd"  # lone continuation bytes


def test_byte_detokenizer_streams_split_characters() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    deltas = [detok.add(t) for t in tok.encode("a😀")]
    assert deltas == ["a", "", "", "", "😀"]
    assert detok.add(0xE2) == ""
    assert detok.add(257) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == "a😀\ufffd"


def test_byte_detokenizer_invariant_random() -> None:
    tok = ByteTokenizer()
    rng = random.Random(1234)
    # Biased towards lead/continuation bytes so sequences split, truncate and corrupt characters.
    pool = [*range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF5), 0xC0, 0xFF, 256, 257]
    valid = [tok.encode(t) for t in TEXTS]
    for case in range(600):
        if case % 3 == 0:  # valid text, possibly cut mid-character
            ids = rng.choice(valid)
            ids = ids[: rng.randint(0, len(ids))]
        else:
            ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        out, text = stream(tok, ids, prompt_ids=[rng.randrange(258) for _ in range(3)])
        assert out == text == tok.decode(ids), ids


# --- HFTokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer.json (GPT-2 style), trained in memory."""
    raw = RawHFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(TEXTS * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    raw.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(hf_path: Path) -> HFTokenizer:
    return HFTokenizer(hf_path, bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("text", [*TEXTS, "unseen words: Zürich ☕ 🚀"])
def test_hf_roundtrip(hf: HFTokenizer, text: str) -> None:
    assert isinstance(hf, Tokenizer)
    ids = hf.encode(text)
    assert all(0 <= i < hf.vocab_size for i in ids)
    assert 0 not in ids and 1 not in ids  # no special tokens added
    assert hf.decode(ids) == text
    assert hf.decode([0, *ids, 1]) == text  # special tokens skipped


@pytest.mark.parametrize("text", [*TEXTS, "unseen words: Zürich ☕ 🚀"])
def test_hf_detokenizer_invariant(hf: HFTokenizer, text: str) -> None:
    ids = hf.encode(text)
    for prompt in ([], hf.encode("a prompt: "), [0]):
        out, streamed = stream(hf, [*ids, 1], prompt)
        assert out == streamed == text
    # Cut mid-character: the tail comes out of flush() as U+FFFD, as decode() gives it.
    for n in range(len(ids)):
        if hf.decode(ids[:n]).endswith("\ufffd"):
            assert stream(hf, ids[:n]) == (hf.decode(ids[:n]),) * 2


def test_hf_detokenizer_prompt_ending_mid_character(hf: HFTokenizer) -> None:
    ids = hf.encode("x 🚀 y")
    cut = next(n for n in range(len(ids)) if hf.decode(ids[:n]).endswith("\ufffd"))
    # The prompt's dangling bytes are not merged into the generated text.
    assert stream(hf, ids[cut:], ids[:cut])[0] == hf.decode(ids[cut:])


def test_hf_detokenizer_invariant_random(hf: HFTokenizer) -> None:
    # Byte-level BPE decoding is prefix-stable, so the invariant holds for arbitrary ids too.
    rng = random.Random(99)
    for _ in range(200):
        ids = [rng.randrange(hf.vocab_size) for _ in range(rng.randint(0, 30))]
        out, streamed = stream(hf, ids, [rng.randrange(hf.vocab_size) for _ in range(4)])
        assert out == streamed == hf.decode(ids), ids


def test_hf_detokenizer_window_stays_small(hf: HFTokenizer) -> None:
    ids = hf.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(hf, hf.encode("prompt " * 50))
    for t in ids:
        detok.add(t)
        assert len(detok._ids) <= 8  # O(1) work per token, not re-decoding the output
    detok.flush()
    assert detok.text == hf.decode(ids)


def test_hf_detokenizer_uses_prompt_context(tmp_path: Path) -> None:
    # SentencePiece-style decoding drops the leading space of the first token of a decode;
    # mid-text (after the prompt) the generated token keeps its space.
    raw = RawHFTokenizer(models.WordLevel({"[UNK]": 0, "▁Hello": 1, "▁world": 2}, "[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, "huggingface", None, None)
    assert tok.encode("Hello world") == [1, 2]
    assert stream(tok, [2], prompt_ids=[1])[0] == " world"
    assert stream(tok, [2])[0] == "world"


# --- load_tokenizer --------------------------------------------------------------------------


def test_load_byte(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path, "byte", None, None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path, "byte", 256, 257), ByteTokenizer)
    with pytest.raises(ValueError, match="bos_token_id=1"):
        load_tokenizer(tmp_path, "byte", 1, 257)
    with pytest.raises(ValueError, match="eos_token_id=0"):
        load_tokenizer(tmp_path, "byte", None, 0)


def test_load_huggingface(hf_path: Path) -> None:
    tok = load_tokenizer(hf_path.parent, "huggingface", 0, 1)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path, "huggingface", None, None)
    msg = str(err.value)
    assert str(tmp_path / "tokenizer.json") in msg
    assert "Hugging Face tokenizer.json" in msg and "download it with the weights" in msg
    assert '"tokenizer"' not in msg  # a key Hugging Face configs do not have
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer(tmp_path, "sentencepiece", None, None)

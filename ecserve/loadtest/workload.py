"""The requests a run sends and when: synthetic token-id prompts or a prompts file, and the
open loop's arrival times."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecserve.errors import ConfigError
from ecserve.loadtest.config import LoadTestConfig


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | tuple[int, ...]  # text, tokenized by the server, or token ids sent as given
    output_len: int  # max_new_tokens, with ignore_eos so exactly this many come back
    input_len: int | None  # known up front for token ids; text: the server's count


@dataclass(frozen=True)
class ModelLimits:
    """What synthetic prompts need from the server's ModelInfo."""

    vocab_size: int
    max_model_len: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None


def build_workload(cfg: LoadTestConfig, limits: ModelLimits, n: int) -> list[RequestSpec]:
    """`n` requests (warm-up ones first), reproducible from cfg.seed."""
    rng = np.random.default_rng(cfg.seed)
    outputs = _lengths(rng, cfg.output_len_range, cfg.lengths()[1], n)
    if cfg.prompts_file is not None:
        lines = read_prompts(cfg.prompts_file)
        specs = []
        for i in range(n):
            text, max_new = lines[i % len(lines)]
            specs.append(RequestSpec(text, max_new if max_new is not None else int(outputs[i]),
                                     None))
        return specs
    inputs = _lengths(rng, cfg.input_len_range, cfg.lengths()[0], n)
    longest = int(cfg.shared_prefix_len + inputs.max() + outputs.max())
    if longest > limits.max_model_len:
        raise ConfigError(f"input + output lengths reach {longest} tokens; the server's "
                         f"max_model_len is {limits.max_model_len}")
    special = {t for t in (limits.bos_token_id, limits.eos_token_id) if t is not None}
    vocab = np.array([t for t in range(limits.vocab_size) if t not in special], dtype=np.int64)
    if vocab.size == 0:
        raise ConfigError("the server's vocabulary has no ordinary tokens to build prompts from")
    # Drawn only when asked: runs without a prefix keep the prompts they always had.
    prefixes = ([rng.choice(vocab, size=cfg.shared_prefix_len).tolist()
                 for _ in range(cfg.num_prefixes)] if cfg.shared_prefix_len else [[]])
    specs = []
    for i, (length, out) in enumerate(zip(inputs, outputs, strict=True)):
        ids = prefixes[i % len(prefixes)] + rng.choice(vocab, size=int(length)).tolist()
        if limits.bos_token_id is not None:  # as the server's tokenizer would start a text
            ids[0] = limits.bos_token_id
        specs.append(RequestSpec(tuple(ids), int(out), len(ids)))
    return specs


def _lengths(rng: np.random.Generator, bounds: tuple[int, int] | None, fixed: int,
             n: int) -> np.ndarray:
    if bounds is None:
        return np.full(n, fixed, dtype=np.int64)
    return rng.integers(bounds[0], bounds[1], size=n, endpoint=True)


def read_prompts(path: str) -> list[tuple[str, int | None]]:
    """JSONL lines {"prompt": ..., "max_new_tokens": N} or plain text lines, one prompt each."""
    out: list[tuple[str, int | None]] = []
    text = Path(path).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            prompt, max_new = obj.get("prompt"), obj.get("max_new_tokens")
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f'{path}:{lineno}: "prompt" must be a non-empty string')
            if max_new is not None and (not isinstance(max_new, int) or max_new < 1):
                raise ConfigError(f'{path}:{lineno}: "max_new_tokens" must be an integer >= 1')
            out.append((prompt, max_new))
        else:
            out.append((line, None))
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


def arrival_offsets(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Seconds since the start at which successive requests are due: gamma-distributed gaps
    with shape `burstiness` and mean 1/rate (Poisson at burstiness 1), as vLLM; all 0 at inf."""
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = np.random.default_rng(seed + 1)  # not the workload's stream
    t = 0.0
    while True:
        yield t
        t += float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))

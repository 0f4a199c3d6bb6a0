"""Token streams and batches: each document as <|bos|> text <|eos|>, documents concatenated.

Training batches are windows of seq_len + 1 tokens (inputs and shifted targets) at the stride
seq_len, shuffled per epoch by a seeded permutation: batch i is a pure function of (seed, i), so
a run resumed from a checkpoint sees exactly the batches an uninterrupted run would. Validation
uses the first windows of the validation stream, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecserve.errors import ConfigError
from ecserve.train.corpus import Document


def encode_stream(docs: list[Document], tokenizer_path: Path, bos: int, eos: int) -> np.ndarray:
    """uint16 [tokens]: every document's ids between bos and eos, in document order."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    if tok.get_vocab_size(with_added_tokens=True) > 1 << 16:
        raise ConfigError("the token stream is uint16: the vocabulary must be <= 65,536")
    parts = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        parts.append(np.array([bos, *enc.ids, eos], dtype=np.uint16))
    return np.concatenate(parts)


@dataclass(frozen=True)
class Windows:
    """A token stream cut into windows of seq_len + 1 tokens at the stride seq_len."""

    stream: np.ndarray  # uint16 [tokens]
    seq_len: int

    @property
    def count(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def take(self, starts: np.ndarray) -> torch.Tensor:
        """int64 [len(starts), seq_len + 1]: the windows at these window indices."""
        offsets = starts[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(self.stream[offsets].astype(np.int64))


class TrainBatches:
    """Batch i of a seeded shuffled pass over the windows (epochs chained)."""

    def __init__(self, windows: Windows, batch_size: int, seed: int) -> None:
        if windows.count < batch_size:
            raise ConfigError(f"{windows.count} windows of {windows.seq_len} tokens is less "
                             f"than one batch of {batch_size}")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = windows.count // batch_size  # whole batches; the rest waits an epoch
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def epoch_of(self, step: int) -> float:
        return step / self.per_epoch

    def batch(self, step: int) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1]."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.windows.count)
        return self.windows.take(self._perm[i * self.batch_size:(i + 1) * self.batch_size])


def validation_batches(windows: Windows, batch_size: int, max_windows: int | None = None
                       ) -> list[torch.Tensor]:
    """The first windows of the validation stream, in order, as whole batches."""
    n = windows.count if max_windows is None else min(max_windows, windows.count)
    n -= n % batch_size
    if n == 0:
        raise ConfigError(f"the validation stream has fewer than {batch_size} windows of "
                         f"{windows.seq_len} tokens")
    return [windows.take(np.arange(i, i + batch_size)) for i in range(0, n, batch_size)]

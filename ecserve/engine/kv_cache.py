"""KV block bookkeeping: fixed-size blocks, per-sequence block tables, a free list. No tensors."""

from __future__ import annotations

import math
from collections import deque


class BlockManager:
    """Hands out KV cache blocks; the runner owns the tensors they index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for `num_tokens` tokens of a new sequence and return its block table."""
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id!r} already holds blocks")
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise MemoryError(f"{need} KV blocks needed, {len(self._free)} free")
        table = [self._free.popleft() for _ in range(need)]
        self._tables[seq_id] = table
        return table

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def free(self, seq_id: str) -> None:
        """Return a sequence's blocks (finished or aborted); a no-op if it holds none."""
        self._free.extend(self._tables.pop(seq_id, ()))

    def holders(self) -> list[str]:
        return list(self._tables)

"""KV block bookkeeping: fixed-size blocks, per-sequence block tables, reference counts and the
prefix cache (full blocks keyed by what they hold). No tensors.

A block is free (in no table, holds nothing worth keeping), used (in one table or more: its
reference count), or cached and unreferenced: it keeps the KV of a full block under its key
until its slot is needed, least recently used first (`evictable`). Allocation takes free blocks
first, then evicts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence


class BlockManager:
    """Hands out KV cache blocks; the runner owns the tensors they index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        """Blocks a new sequence can take: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks in some sequence's table."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached full block (referenced or not)."""
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first (nothing changes)."""
        out = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def num_allocatable(self, cached: Sequence[int] = ()) -> int:
        """New blocks a sequence reusing `cached` (from `match`) could still take: taking an
        unreferenced cached block takes it out of the evictable ones."""
        return self.num_free - sum(b in self._evictable for b in cached)

    def can_allocate(self, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether a sequence of num_tokens fits, reusing `cached` for its first blocks."""
        return self.blocks_for(num_tokens) - len(cached) <= self.num_allocatable(cached)

    def allocate(self, seq_id: str, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Reserve blocks for `num_tokens` tokens of a new sequence, its first blocks the cached
        ones given (shared, never written), and return its block table."""
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id!r} already holds blocks")
        if not self.can_allocate(num_tokens, cached):
            raise MemoryError(f"{self.blocks_for(num_tokens) - len(cached)} KV blocks needed, "
                              f"{self.num_free} free")
        for b in cached:
            self._evictable.pop(b, None)
            self._refs[b] += 1
        table = list(cached)
        for _ in range(self.blocks_for(num_tokens) - len(cached)):
            b = self._free.popleft() if self._free else self._evict()
            self._refs[b] = 1
            table.append(b)
        self._tables[seq_id] = table
        return table

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Extend a sequence's table to hold num_tokens tokens; False (nothing taken) when the
        blocks are not there."""
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(need):
            b = self._free.popleft() if self._free else self._evict()
            self._refs[b] = 1
            table.append(b)
        return True

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def register(self, block: int, key: bytes) -> bool:
        """Cache a block whose KV is complete under `key`; False where the key is cached
        already (another sequence computed the same block: this one stays private)."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def free(self, seq_id: str) -> None:
        """Drop a sequence's references (finished or aborted); a no-op if it holds none. Its
        cached blocks stay cached, the last block first in line for eviction."""
        for b in reversed(self._tables.pop(seq_id, ())):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if b in self._key_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def holders(self) -> list[str]:
        return list(self._tables)

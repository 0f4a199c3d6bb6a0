"""Which sequences may share cached KV blocks, and the keys their full blocks are cached under
(docs/routing.md §8, docs/kv-cache.md).

A block's KV is the same function of its tokens wherever it was computed only when its routing
groups can be formed again: under per-token policies any block can (every token routes alone);
under `ec`/`capped` in sequence scope, a prompt's groups are cut at multiples of group_size from
position 0, so whole groups of the prompt can; batch-scope `ec`/`capped` mixes sequences in its
groups, and its blocks are never shared. So a sequence's tokens are keyed in *units*: a block
under per-token policies, lcm(block_size, group_size) tokens of the prompt under sequence-scope
`ec`/`capped` (a block inside a group depends on the group's later tokens too). A unit's key
chains the key before it, so it stands for every token from position 0; the chain's root holds
what else changes the content (the model, the dtype, the routing policy and the scope class).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from ecserve.config import RoutingConfig
from ecserve.routing import policy_for


@dataclass(frozen=True)
class CacheRule:
    """How one sequence's KV may be cached: `unit` tokens per key (a multiple of the block
    size), and whether tokens past the prompt count (their groups: each decode token alone)."""

    unit: int
    generated: bool


def cache_rule(routing: RoutingConfig, scope: str, block_size: int) -> CacheRule | None:
    """None: this sequence's blocks are never shared (batch-scope group-mixing policies)."""
    if policy_for(routing.policy).per_token:
        return CacheRule(block_size, generated=True)
    if scope == "sequence":
        return CacheRule(math.lcm(block_size, routing.group_size), generated=False)
    return None


def root_key(identity: str, rule: CacheRule, scope: str, per_token: bool) -> bytes:
    """The chain's root: the engine's model, dtype and policy, and the scope class (per-token
    policies route alike in both scopes)."""
    scope_class = "any scope" if per_token else f"{scope} scope, unit {rule.unit}"
    return hashlib.blake2b(f"{identity}|{scope_class}".encode(), digest_size=16).digest()


def _hash(parent: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(parent + payload, digest_size=16).digest()


@dataclass
class PrefixChain:
    """One sequence's block keys, extended as its tokens' KV is computed."""

    rule: CacheRule
    block_size: int
    root: bytes
    keys: list[bytes] = field(default_factory=list)  # one per block of every full unit
    _last: bytes = b""  # the last full unit's key

    def extend(self, tokens: Sequence[int], upto: int) -> None:
        """Key every full unit within tokens[:upto] not keyed yet."""
        unit, per_unit = self.rule.unit, self.rule.unit // self.block_size
        done = len(self.keys) // per_unit
        for u in range(done, upto // unit):
            key = _hash(self._last or self.root, array("q", tokens[u * unit:(u + 1) * unit])
                        .tobytes())
            self._last = key
            self.keys += [key] if per_unit == 1 else [_hash(key, i.to_bytes(4, "little"))
                                                      for i in range(per_unit)]

    def reusable_blocks(self, matched: int) -> int:
        """Of `matched` leading cached blocks, how many a sequence may take: whole units."""
        per_unit = self.rule.unit // self.block_size
        return matched // per_unit * per_unit

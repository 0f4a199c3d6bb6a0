"""The batcher: admission by KV budget, this step's tokens, and their routing groups."""

from __future__ import annotations

import time
from collections import deque

from ecserve.config import EngineConfig, RoutingConfig
from ecserve.engine.grouping import batch_group_sizes, sequence_group_sizes
from ecserve.engine.kv_cache import BlockManager
from ecserve.engine.limits import QueueFullError, RequestLimits
from ecserve.engine.prefix_cache import PrefixChain, cache_rule, root_key
from ecserve.engine.sequence import SeqStatus, Sequence
from ecserve.routing import policy_for
from ecserve.types import ScheduledChunk, StepPlan

__all__ = ["Batcher", "QueueFullError"]


class Batcher:
    """Owns the waiting queue and the running set; decides each step's tokens and groups."""

    def __init__(
        self, cfg: EngineConfig, routing: RoutingConfig, num_experts: int, blocks: BlockManager,
        limits: RequestLimits, identity: str = "",
    ) -> None:
        """identity: what besides the tokens makes two engines' KV differ (model, dtype): the
        root of the prefix cache's keys."""
        self.cfg = cfg
        self.limits = limits
        self.routing = routing
        self.group_size = routing.group_size
        # token_choice and threshold route every token on its own: any cut fills every slot.
        self.per_token = policy_for(routing.policy).per_token
        self.unit = 1 if self.per_token else routing.group_unit(num_experts)
        self.identity = f"{identity}|{routing.policy}"
        # Prompt tokens looked up in the prefix cache and found there since stats last took them.
        self.prefix_queried = self.prefix_hits = 0
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.waiting_tokens = 0  # prompt tokens of the waiting requests
        self.running: list[Sequence] = []  # in arrival order
        self.preempted: deque[Sequence] = deque()  # to replay before new ones, arrival order
        self.preemptions = 0  # since stats last took them
        # Blocks admission leaves free while sequences run, so they can grow (1% as vLLM's).
        self.watermark = max(1, blocks.num_blocks // 100)
        self._output_lens: deque[int] = deque(maxlen=64)  # of the last finished requests
        self.admitted: list[str] = []  # ids admitted since the engine last took them

    def check_room(self, num_requests: int, num_tokens: int) -> None:
        """Raise QueueFullError unless the waiting queue takes this many more requests/tokens."""
        self.limits.check_room(len(self.waiting), self.waiting_tokens, num_requests, num_tokens)
        if self.waiting_tokens + num_tokens > self.cfg.max_waiting_tokens:
            raise QueueFullError(
                f"waiting queue full ({self.waiting_tokens} of {self.cfg.max_waiting_tokens} "
                f"prompt tokens queued, this request has {num_tokens}); retry later"
            )

    def add(self, seq: Sequence) -> None:
        self.check_room(1, seq.num_prompt)
        rule = cache_rule(self.routing, seq.scope, self.blocks.block_size)
        seq.replayable = rule is not None and self.cfg.kv_blocks_on_demand
        if self.cfg.prefix_caching and rule is not None:
            seq.prefix = PrefixChain(rule, self.blocks.block_size,
                                     root_key(self.identity, rule, seq.scope, self.per_token))
        self.waiting.append(seq)
        self.waiting_tokens += seq.num_prompt

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its KV blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.waiting_tokens -= seq.num_prompt
        self.blocks.free(seq.request_id)
        seq.status = SeqStatus.FINISHED
        if seq.num_generated:
            self._output_lens.append(seq.num_generated)

    def has_work(self) -> bool:
        return bool(self.waiting or self.preempted or self.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for admission: new ones and preempted ones."""
        return len(self.waiting) + len(self.preempted)

    def schedule(self) -> StepPlan | None:
        """This step's chunks (decode tokens first, then prefill chunks) and routing groups."""
        # The decoding sequences' blocks first: admitting first could take the block a running
        # sequence needs this step and preempt it at once.
        self._grow_decoding()
        self._admit()
        budget = self.cfg.max_num_batched_tokens
        # Every decode token fits: the engine requires max_num_batched_tokens >= max_num_seqs.
        entries = [(s, self._decode_chunk(s)) for s in self.running if not s.is_prefilling]
        budget -= len(entries)
        for seq in self.running:
            n = self._prefill_len(seq, budget) if seq.is_prefilling else 0
            if n > 0:
                entries.append((seq, self._prefill_chunk(seq, n)))
                budget -= n
        if not entries:
            return None
        # Batch scope: decode tokens by arrival, then prefill chunks, cut into balanced groups.
        # Sequence scope: each sequence's own groups at fixed positions, by arrival.
        batch = [e for e in entries if e[0].scope == "batch"]
        own = sorted((e for e in entries if e[0].scope == "sequence"), key=lambda e: e[0].arrival)
        groups = batch_group_sizes(sum(len(c.token_ids) for _, c in batch), self.group_size,
                                   self.unit)
        for seq, c in own:
            # The prompt's groups at fixed positions; past it (a replay after a preemption)
            # each token alone, as it was decoded.
            in_prompt = max(0, min(len(c.token_ids), seq.num_prompt - c.start_pos))
            groups += sequence_group_sizes(c.start_pos, in_prompt, self.group_size)
            groups += [1] * (len(c.token_ids) - in_prompt)
        for seq, c in batch + own:
            seq.num_computed = c.start_pos + len(c.token_ids)
        return StepPlan(chunks=tuple(c for _, c in batch + own), group_sizes=tuple(groups))

    def decode_groups(self, num_batch: int, num_sequence: int) -> tuple[int, ...]:
        """The routing groups schedule() gives a decode-only step of this many batch-scope and
        sequence-scope sequences (their decode graph's key)."""
        return tuple(batch_group_sizes(num_batch, self.group_size, self.unit)) + (
            1,) * num_sequence

    def _admit(self) -> None:
        # Preempted sequences first, then new ones, each in arrival order: a request that does
        # not fit yet blocks those behind it, so large requests are not starved. A replayable
        # sequence gets blocks for what it computes now and more as it decodes, leaving a
        # watermark free while others run so a step seldom preempts; any other holds its whole
        # request's blocks from here (a batch-scope expert-choice sequence is never preempted:
        # recomputed, it would be routed differently, docs/routing.md §8).
        while len(self.running) < self.cfg.max_num_seqs:
            queue = self.preempted or self.waiting
            if not queue:
                return
            seq = queue[0]
            cached = self._cached_prefix(seq)
            # A replay's blocks cover its newest token too: the next decode step writes its KV
            # there, and a fully cached replay decodes in the step that admits it.
            tokens = (len(seq.token_ids) if seq.num_generated else seq.num_prompt
                      ) if seq.replayable else seq.kv_tokens_needed
            # Room for what the running sequences and this one are expected to grow by too:
            # admitted on their prompts' blocks alone, requests admitted together grow together
            # and preempt each other (measured: about one preemption per request). Alone, a
            # request takes what it needs now (it can always grow into the rest).
            reserve = (self._growth(seq, tokens) + self.watermark
                       + sum(self._growth(r, len(r.block_table) * self.blocks.block_size)
                             for r in self.running if r.replayable)
                       ) if seq.replayable and self.running else 0
            room = self.blocks.num_allocatable(cached)
            if self.blocks.blocks_for(tokens) - len(cached) + reserve > room and not (
                    seq.replayable and self._fits_whole(seq, cached, room)):
                return
            queue.popleft()
            first = seq.admitted_time is None
            if first:
                self.waiting_tokens -= seq.num_prompt
                seq.admitted_time = time.monotonic()
                self.admitted.append(seq.request_id)
            seq.block_table = tuple(self.blocks.allocate(seq.request_id, tokens, cached))
            # Its prefill starts after the cached blocks (their groups formed as it would).
            seq.num_computed = len(cached) * self.blocks.block_size
            seq.num_registered = len(cached)
            if first and seq.prefix is not None and seq.prompt_logprobs is None:
                seq.num_cached = seq.num_computed
                self.prefix_queried += seq.num_prompt
                self.prefix_hits += seq.num_cached
            seq.status = SeqStatus.RUNNING
            _insert_by_arrival(self.running, seq)

    def _fits_whole(self, seq: Sequence, cached: list[int], room: int) -> bool:
        """Whether every running request and this one fit at their longest: then up-front
        reservation would admit it, and so does this (a cache sized for max_num_seqs whole
        requests never waits on the plan for growth)."""
        rest = sum(self.blocks.blocks_for(r.kv_tokens_needed) - len(r.block_table)
                   for r in self.running if r.replayable)
        return self.blocks.blocks_for(seq.kv_tokens_needed) - len(cached) + rest <= room

    @property
    def expected_output(self) -> int:
        """The output length to plan for: the median of the last finished requests' (a
        median, so a few long ones do not stop admission), one block before any finished."""
        lens = sorted(self._output_lens)
        return lens[len(lens) // 2] if lens else self.blocks.block_size

    def _growth(self, seq: Sequence, held_tokens: int) -> int:
        """Blocks a replayable sequence holding blocks for held_tokens is expected to need
        more: up to the expected output length (or past what it has), within its
        max_new_tokens. A sequence that outgrows it may be preempted; that is the price."""
        expect = min(seq.request.params.max_new_tokens,
                     max(seq.num_generated + 1, self.expected_output))
        return max(0, self.blocks.blocks_for(seq.num_prompt + expect - 1)
                   - self.blocks.blocks_for(held_tokens))

    def _grow_decoding(self) -> None:
        """Give each decoding sequence the block its next token's KV goes to, oldest first;
        where none is left, preempt the youngest replayable sequence (possibly itself): the
        one with the least done, and never one just replayed ahead of a younger one."""
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.is_prefilling:
                continue
            while not self.blocks.grow(seq.request_id, len(seq.token_ids)):
                victim = next(s for s in reversed(self.running) if s.replayable)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                table = self.blocks.table(seq.request_id)
                if len(table) != len(seq.block_table):  # a block added: most steps none
                    seq.block_table = tuple(table)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits to be replayed from position 0 (its
        cached blocks, if still cached, are taken back then)."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.block_table, seq.num_computed, seq.num_registered = (), 0, 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        _insert_by_arrival(self.preempted, seq)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence would start from: whole units of its prompt,
        leaving at least its last prompt token to compute (its logits sample the first token).
        None for a request that scores its prompt (every prompt row must run)."""
        if seq.prefix is None or seq.prompt_logprobs is not None:
            return []
        rule = seq.prefix.rule
        # A replay feeds its newest token in the next decode step: every token before it may
        # come from the cache (under per-token policies; else the prompt's whole groups).
        upto = (seq.num_prompt - 1 if seq.num_generated == 0
                else seq.num_to_prefill if rule.generated else seq.num_prompt)
        seq.prefix.extend(seq.token_ids, upto // rule.unit * rule.unit)
        cached = self.blocks.match(seq.prefix.keys)
        return cached[:seq.prefix.reusable_blocks(len(cached))]

    def cache_computed(self, plan: StepPlan) -> None:
        """After a step ran: offer the full units of KV it completed to the prefix cache."""
        bs = self.blocks.block_size
        running = {s.request_id: s for s in self.running}
        for c in plan.chunks:
            seq = running.get(c.request_id)
            if seq is None or seq.prefix is None:
                continue
            done = c.start_pos + len(c.token_ids)
            if not seq.prefix.rule.generated:
                done = min(done, seq.num_prompt)
            unit = seq.prefix.rule.unit
            seq.prefix.extend(seq.token_ids, done // unit * unit)
            keys = seq.prefix.keys
            for i in range(seq.num_registered, min(len(keys), done // bs)):
                self.blocks.register(seq.block_table[i], keys[i])
            seq.num_registered = max(seq.num_registered, min(len(keys), done // bs))

    def _prefill_len(self, seq: Sequence, budget: int) -> int:
        cap = self.cfg.max_prefill_chunk
        n = min(seq.num_to_prefill - seq.num_computed, budget, cap or budget)
        if seq.scope == "sequence" and seq.num_computed + n < seq.num_prompt:
            # Chunks end on group boundaries (or on multiples of a smaller chunk cap) so the
            # prompt's groups never depend on the load.
            unit = min(self.group_size, cap or self.group_size)
            end = (seq.num_computed + n) // unit * unit
            n = end - seq.num_computed
        return n

    def _decode_chunk(self, seq: Sequence) -> ScheduledChunk:
        pos = len(seq.token_ids) - 1
        # A table padded past its blocks would send this KV write to another sequence's block.
        assert pos < len(seq.block_table) * self.blocks.block_size, (seq.request_id, pos)
        return ScheduledChunk(seq.request_id, (seq.token_ids[-1],), pos,
                              seq.block_table, sample=True)

    def _prefill_chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed
        # A replay's last chunk ends before its newest token: nothing is sampled from it, and
        # its prompt's logprobs were given already.
        return ScheduledChunk(seq.request_id, tuple(seq.token_ids[start:start + n]), start,
                              seq.block_table, sample=start + n == len(seq.token_ids),
                              score_prompt=seq.prompt_logprobs is not None
                              and seq.num_generated == 0)


def _insert_by_arrival(seqs: list[Sequence] | deque[Sequence], seq: Sequence) -> None:
    at = next((i for i, s in enumerate(seqs) if s.arrival > seq.arrival), len(seqs))
    seqs.insert(at, seq)

"""ForwardBatch: the per-step tensors every layer reads, built once from the step plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecserve.config import ModelConfig
from ecserve.model.layers import relative_position_bucket, rope_cos_sin
from ecserve.types import StepPlan


@dataclass(frozen=True)
class AttentionRuns:
    """Sequences whose query runs are padded to one length and attended together.

    A step mixes 1-token decode runs with long prefill chunks; padding them all to the longest
    would multiply the attention work, so runs are bucketed by length (decode runs together,
    prefill chunks by power-of-two length).
    """

    tokens: torch.Tensor  # int64 [n]: the step tokens these queries are, in q_valid order
    q_index: torch.Tensor  # int64 [S, Q]: token of query j of run s (padding: 0)
    q_valid: torch.Tensor  # bool [S, Q]: real queries; runs are in token order, so [q_valid] unpads
    # The padded key layout of the torch path; None in a paged-only batch (a decode layout whose
    # shapes must not depend on context lengths: CUDA graphs), read by the paged kernel alone.
    kv_slots: torch.Tensor | None  # int64 [S, L]: KV slot of key position j (padding: slot of 0)
    attn_mask: torch.Tensor | None  # bool [S, 1, Q, L]: causal and within the sequence's length
    rel_buckets: torch.Tensor | None  # int64 [S, Q, L]: relative_bias buckets (None for rope)
    block_tables: torch.Tensor  # int64 [S, B]: each run's KV blocks (for the paged kernel)
    seq_lens: torch.Tensor  # int64 [S]: keys each run's last query sees
    block_size: int

    @property
    def is_decode(self) -> bool:
        return self.q_valid.shape[1] == 1


@dataclass(frozen=True)
class ForwardBatch:
    """The step's N tokens, laid out as S sequences' contiguous runs, in routing-group order."""

    input_ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]: position of each token in its sequence
    slot_mapping: torch.Tensor  # int64 [N]: flat KV cache slot each new token writes
    attention: tuple[AttentionRuns, ...]  # every run, in one bucket each
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [N, head_dim] (None: relative)
    group_bounds: tuple[int, ...]  # routing groups are tokens [b[i], b[i+1])
    # int64 [M]: tokens whose next-token logits are needed: each sampling run's last token, in
    # plan order, then the prompt tokens scored (ScheduledChunk.score_prompt), in plan order
    logits_index: torch.Tensor
    # No shape may follow the data (a CUDA graph holds the step): attention only through the
    # paged kernel, and token_choice's dropless layout at its widest (every group's n slots).
    static_shapes: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @staticmethod
    def from_plan(
        plan: StepPlan, cfg: ModelConfig, block_size: int, device: torch.device,
        table_width: int | None = None, static_shapes: bool = False,
        paged_decode: bool = False,
    ) -> ForwardBatch:
        """table_width: pad block tables to this many blocks (None: the longest table), so the
        paged kernel sees the same shapes whatever the contexts; static_shapes: see the field;
        paged_decode: decode runs are attended by the paged kernel. Runs attended that way get
        no padded key layout (AttentionRuns.kv_slots, attn_mask and rel_buckets are None)."""
        chunks = plan.chunks
        lens = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.long)  # [S]
        starts = torch.tensor([c.start_pos for c in chunks], dtype=torch.long)  # [S]
        q_offsets = torch.cumsum(lens, 0) - lens  # [S]: first token of each run
        n = int(lens.sum())
        positions = torch.empty(n, dtype=torch.long)  # [N]
        slot_mapping = torch.empty(n, dtype=torch.long)  # [N]
        buckets: dict[int, list[int]] = {}
        for s, length in enumerate(lens.tolist()):
            buckets.setdefault((length - 1).bit_length(), []).append(s)  # 1 | 2 | 3-4 | 5-8 ...
        runs = []
        for bucket, members in buckets.items():
            sel = torch.tensor(members, dtype=torch.long)
            tables = [chunks[s].block_table for s in members]
            paged = static_shapes or (paged_decode and bucket == 0)  # bucket 0: one-token runs
            run, tokens, pos, slots = _attention_runs(lens[sel], starts[sel], q_offsets[sel],
                                                      tables, cfg, block_size, device,
                                                      table_width, paged)
            positions[tokens] = pos
            slot_mapping[tokens] = slots
            runs.append(run)
        rope = None
        if cfg.position_encoding == "rope":
            assert cfg.head_dim is not None
            cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
            rope = (cos.to(device), sin.to(device))
        sample = [s for s, c in enumerate(chunks) if c.sample]
        logits_index = (q_offsets + lens - 1)[sample]  # each sampling run's last token
        scored = [torch.arange(int(q_offsets[s]), int(q_offsets[s]) + c.num_scored)
                  for s, c in enumerate(chunks) if c.num_scored]
        logits_index = torch.cat([logits_index, *scored])  # [M]
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        bounds = [0]
        for g in plan.group_sizes:
            bounds.append(bounds[-1] + g)
        assert bounds[-1] == ids.numel(), "routing groups must cover the step's tokens"
        return ForwardBatch(
            input_ids=ids.to(device),
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            attention=tuple(runs),
            rope=rope,
            group_bounds=tuple(bounds),
            logits_index=logits_index.to(device),
            static_shapes=static_shapes,
        )


def _attention_runs(
    lens: torch.Tensor,  # int64 [S]: tokens of each run
    starts: torch.Tensor,  # int64 [S]: position of each run's first token
    q_offsets: torch.Tensor,  # int64 [S]: each run's first token in the step
    block_tables: list[tuple[int, ...]],
    cfg: ModelConfig,
    block_size: int,
    device: torch.device,
    table_width: int | None = None,
    paged_only: bool = False,
) -> tuple[AttentionRuns, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bucket's padded attention layout; its tokens (on the CPU), their positions and KV
    slots."""
    ctx = starts + lens  # [S]: keys visible after this step
    q_max = int(lens.max())
    n_blocks = max(len(t) for t in block_tables)
    if table_width is not None:
        if table_width < n_blocks:
            raise ValueError(f"a block table has {n_blocks} blocks, more than {table_width}")
        n_blocks = table_width
    tables = torch.zeros(len(block_tables), n_blocks, dtype=torch.long)  # [S, B]
    for s, t in enumerate(block_tables):
        tables[s, : len(t)] = torch.tensor(t, dtype=torch.long)
    j_q = torch.arange(q_max)  # [Q]
    q_valid = j_q[None, :] < lens[:, None]  # [S, Q]
    q_pos = torch.where(q_valid, starts[:, None] + j_q[None, :], 0)  # [S, Q]
    q_index = torch.where(q_valid, q_offsets[:, None] + j_q[None, :], 0)  # [S, Q]
    new_slots = tables.gather(1, q_pos // block_size) * block_size + q_pos % block_size  # [S, Q]
    kv_slots = attn_mask = rel = None
    if not paged_only:
        j_k = torch.arange(int(ctx.max()))  # [L]
        k_valid = j_k[None, :] < ctx[:, None]  # [S, L]
        block_of = (j_k // block_size).clamp(max=n_blocks - 1).expand(len(block_tables), -1)
        slots = tables.gather(1, block_of) * block_size + (j_k % block_size)[None, :]  # [S, L]
        kv_slots = torch.where(k_valid, slots, slots[:, :1]).to(device)
        # Padded queries sit at position 0 and see key 0, so no softmax row is empty.
        attn_mask = (j_k[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [S, Q, L]
        attn_mask = attn_mask[:, None].to(device)
        if cfg.position_encoding == "relative_bias":
            rel = relative_position_bucket(
                q_pos[:, :, None] - j_k[None, None, :],
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            ).to(device)
    tokens = q_index[q_valid]  # [n]
    run = AttentionRuns(
        tokens=tokens.to(device),
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        kv_slots=kv_slots,
        attn_mask=attn_mask,
        rel_buckets=rel,
        block_tables=tables.to(device),
        seq_lens=ctx.to(device),
        block_size=block_size,
    )
    return run, tokens, q_pos[q_valid], new_slots[q_valid]

"""The engine: the step loop over batcher -> runner -> sampler -> output.

New requests join between steps (continuous batching); the server drives the same object.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ecserve.config import ConfigError, EngineConfig, ModelConfig, resolve_engine
from ecserve.engine.batcher import Batcher
from ecserve.engine.kv_cache import BlockManager
from ecserve.engine.limits import RequestError, RequestLimits
from ecserve.engine.output import append_token, end_without_token
from ecserve.engine.runner import (
    Lockstep,
    ModelRunner,
    RunnerLost,
    RunnerSetup,
    free_memory_bytes,
    kv_bytes_per_block,
    model_kernels,
)
from ecserve.engine.sampler import sample, token_logprobs
from ecserve.engine.sequence import Sequence
from ecserve.model.default import default_model_dir
from ecserve.model.transformer import Transformer
from ecserve.model.weights import TORCH_DTYPES, ExpertFilter, load_model, read_config
from ecserve.tokenizer import load_tokenizer
from ecserve.types import (
    FinishReason,
    MoEStats,
    Request,
    RequestStats,
    StepPlan,
    StepStats,
    TokenEvent,
)

log = logging.getLogger(__name__)
__all__ = ["Engine", "EngineObserver", "RequestError", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """Debug record of one step (EngineConfig.record_steps)."""

    stats: StepStats
    logits: dict[str, torch.Tensor]  # request id -> float32 [V] logits it sampled from

    def groups(self) -> list[list[tuple[str, int]]]:
        """Each routing group as (request id, position) pairs, in the order the model saw them."""
        tokens = [(c.request_id, c.start_pos + j)
                  for c in self.stats.plan.chunks for j in range(len(c.token_ids))]
        out, i = [], 0
        for size in self.stats.plan.group_sizes:
            out.append(tokens[i:i + size])
            i += size
        return out


class EngineObserver(Protocol):
    """Receives what the engine did (the metrics exporter is one). Called from the thread that
    runs the engine; implementations must be quick and thread-safe."""

    def step_done(self, stats: StepStats) -> None: ...

    def request_done(self, stats: RequestStats) -> None: ...


class Engine:
    def __init__(self, model_dir: str | Path | None = None, cfg: EngineConfig | None = None,
                 *, experts: ExpertFilter | None = None,
                 lockstep: Callable[[Transformer, RunnerSetup], Lockstep] | None = None):
        """experts (expert parallelism): load only these experts of each MoE layer
        (ecserve.model.weights.ExpertFilter). lockstep (expert parallelism): called with the
        loaded model and what the other ranks need, before the runner is made; returns the
        processes the runner steps with (ecserve.parallel.driver.ExpertParallel.attach).

        The engine steps token ids: its events carry no text and it never looks for stop
        sequences. Its caller runs the text stage (ecserve.engine.text): a server's front end,
        or `LLM`, whose add_request/step is the way to step an engine with text."""
        self.cfg = cfg = cfg or EngineConfig()
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.model_name = self.model_dir.name if model_dir is not None else "default"
        resolved = resolve_engine(read_config(self.model_dir), cfg)
        self.model_cfg: ModelConfig = resolved.model
        mc = self.model_cfg
        self.tokenizer = load_tokenizer(self.model_dir, mc.tokenizer, mc.bos_token_id,
                                        mc.eos_token_id)
        if self.tokenizer.vocab_size > mc.vocab_size:
            raise ConfigError(f"vocab_size={mc.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} ids", field="vocab_size")
        self.max_model_len = resolved.max_model_len
        device = torch.device(cfg.device if cfg.device != "auto"
                              else "cuda" if torch.cuda.is_available() else "cpu")
        self.device, self.dtype_name = device, resolved.dtype
        model = load_model(self.model_dir, mc, device, TORCH_DTYPES[self.dtype_name],
                           experts=experts,
                           kernels=model_kernels(cfg.kernels, device, cfg.expert_timing_every > 0))
        num_blocks = self._num_kv_blocks(model, device)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        peers = None if lockstep is None else lockstep(model, RunnerSetup(
            str(self.model_dir), self.dtype_name, str(device), num_blocks, cfg.block_size,
            cfg.kernels))
        self.runner = ModelRunner(model, num_blocks, cfg.block_size,
                                  table_width=-(-self.max_model_len // cfg.block_size),
                                  lockstep=peers)
        self.limits = RequestLimits(mc.vocab_size, self.max_model_len, cfg.max_waiting,
                                    cfg.max_waiting_tokens, cfg.block_size, num_blocks)
        self.batcher = Batcher(cfg, mc.routing, mc.num_experts, self.blocks, self.limits,
                               identity=f"{self.model_dir.resolve()}|{self.dtype_name}")
        # Expert-parallel steps run collectives with the other ranks: no graph holds them.
        parallel = experts is not None or lockstep is not None
        if cfg.cuda_graphs and device.type == "cuda" and not parallel:
            self._start_decode_graphs()
        if cfg.decode == "compiled" and device.type == "cpu":  # GPUs replay CUDA graphs
            blocker = ("expert parallelism exchanges rows between processes each step"
                       if parallel else self.runner.enable_compiled_decode(cfg.max_num_seqs))
            if blocker is not None:
                log.info("decode steps run eagerly: %s", blocker)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self.last_stats: StepStats | None = None
        self.records: list[StepRecord] = []
        self.observer: EngineObserver | None = None
        # Told which requests a step admitted as soon as it has scheduled them, before the
        # model runs: a front end counts its queue room from this (ecserve/engine/core.py).
        self.on_admitted: Callable[[tuple[str, ...]], None] | None = None
        self._steps = 0

    @property
    def lost(self) -> str | None:
        """Why no further step can run (an expert-parallel rank is gone); None while it can."""
        return self.runner.lost

    def _start_decode_graphs(self) -> None:
        """Capture the default routing scope's decode layouts (1 .. max batch sequences)."""
        max_batch = min(self.cfg.cuda_graph_max_batch or self.cfg.max_num_seqs,
                        self.cfg.max_num_seqs)
        blocker = self.runner.enable_decode_graphs(max_batch, self.cfg.cuda_graph_limit)
        if blocker is not None:
            log.info("decode steps run eagerly: %s", blocker)
            return
        scope = self.model_cfg.routing.scope
        layouts = [self.batcher.decode_groups(n if scope == "batch" else 0,
                                              n if scope == "sequence" else 0)
                   for n in range(max_batch, 0, -1)]  # largest first: smaller ones reuse memory
        t0 = time.perf_counter()
        held = self.runner.capture_decode_graphs(layouts)
        log.info("captured %d decode graphs (up to %d sequences) in %.1f s", held, max_batch,
                 time.perf_counter() - t0)

    def _num_kv_blocks(self, model: torch.nn.Module, device: torch.device) -> int:
        per_block = kv_bytes_per_block(model, self.cfg.block_size)
        budget = self.cfg.kv_cache_bytes
        if budget is None:
            budget = int(free_memory_bytes(device) * self.cfg.kv_cache_memory_fraction)
        # More than max_num_seqs full-length sequences can use would be memory wasted.
        useful = self.cfg.max_num_seqs * -(-self.max_model_len // self.cfg.block_size)
        blocks = min(budget // per_block, useful)
        if blocks < 1:
            raise ConfigError(f"KV cache budget of {budget} bytes holds no block "
                              f"({per_block} bytes per {self.cfg.block_size}-token block)",
                              field="kv_cache_bytes")
        return blocks

    # ---------------------------------------------------------------- requests

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> ids, with the model's BOS token first when it has one."""
        bos = self.model_cfg.bos_token_id
        return ([bos] if bos is not None else []) + self.tokenizer.encode(prompt)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises RequestError (bad input), QueueFullError (overload) or
        RunnerLost (the engine can run no step: see `lost`)."""
        if self.lost is not None:
            raise RunnerLost(self.lost)
        self.validate(request)
        p = request.params
        arrival = request.arrival_time if request.arrival_time is not None else time.monotonic()
        seed = p.seed
        if seed is None:
            seed = secrets.randbits(63)
        seq = Sequence(
            request=request,
            arrival=self._arrivals,
            scope=request.routing_scope or self.model_cfg.routing.scope,
            seed=seed,
            generator=torch.Generator().manual_seed(seed),
            arrival_time=arrival,
            deadline=None if p.time_limit is None else arrival + p.time_limit,
        )
        self.batcher.add(seq)
        self._arrivals += 1
        self.seqs[request.request_id] = seq

    def validate(self, r: Request) -> None:
        """Raise RequestError naming the field if the engine cannot serve `r` as given."""
        if r.request_id in self.seqs:
            raise RequestError("request_id", f" {r.request_id!r} is already in use")
        self.limits.validate(r)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORTED) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already done.
        `reason` is what the metrics count it as (STOP_SEQUENCE: a front end's text stage
        found one)."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        seq.finish_reason = reason
        self._remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.batcher.has_work()

    # ---------------------------------------------------------------- the step

    def step(self) -> list[TokenEvent]:
        """Run one forward step over everything scheduled; returns this step's events."""
        t0 = time.perf_counter()
        events = self._expire()
        plan = self.batcher.schedule()
        if plan is None:
            return events
        if self.on_admitted is not None and self.batcher.admitted:
            self.on_admitted(tuple(self.batcher.admitted))
        seqs = [self.seqs[c.request_id] for c in plan.chunks if c.sample]
        every = self.cfg.expert_timing_every
        self._steps += 1
        try:
            rows, moe_stats = self.runner.execute(plan, every > 0 and self._steps % every == 0)
            self.batcher.cache_computed(plan)
            logits = rows[:len(seqs)]  # the sampled rows; the prompt rows scored follow
            params = [s.request.params for s in seqs]
            tokens = sample(logits, params, [s.generator for s in seqs],
                            [s.num_generated for s in seqs], self.model_cfg.eos_token_id,
                            [s.token_ids for s in seqs])
            logprobs = token_logprobs(logits, tokens, [p.logprobs for p in params])
            self._score_prompts(plan, rows[len(seqs):])
        except RunnerLost as exc:  # no step can run again: end every request now
            log.error("the model runner is lost; ending all %d requests: %s", len(self.seqs), exc)
            self.runner.lost = str(exc)
            return events + self._fail(list(self.seqs.values()), str(exc))
        except Exception as exc:  # a failed step fails its own requests, not the engine
            log.exception("step failed; ending its %d requests", len(plan.chunks))
            return events + self._fail([self.seqs[c.request_id] for c in plan.chunks],
                                       f"{type(exc).__name__}: {exc}")
        eos = self.model_cfg.eos_token_id
        events += [append_token(s, t, eos, lp)
                   for s, t, lp in zip(seqs, tokens, logprobs, strict=True)]
        ttft, itl = self._token_times(seqs)
        for seq in seqs:
            if seq.finish_reason is not None:
                self._remove(seq)
        self.last_stats = self._step_stats(plan, moe_stats, time.perf_counter() - t0, ttft, itl)
        if self.observer is not None:
            self.observer.step_done(self.last_stats)
        if self.cfg.record_steps:
            sampled = dict(zip((s.request_id for s in seqs), logits, strict=True))
            self.records.append(StepRecord(self.last_stats, sampled))
        return events

    def _score_prompts(self, plan: StepPlan, rows: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens this step's scored rows predict."""
        i = 0
        for c in plan.chunks:
            if not c.num_scored:
                continue
            seq = self.seqs[c.request_id]
            assert seq.prompt_logprobs is not None
            start = c.start_pos + 1  # row j predicts prompt token start_pos + j + 1
            targets = seq.token_ids[start:start + c.num_scored]
            top = seq.request.params.prompt_logprobs
            seq.prompt_logprobs += token_logprobs(rows[i:i + c.num_scored], targets,
                                                  [top] * c.num_scored)
            i += c.num_scored

    def _expire(self) -> list[TokenEvent]:
        """End the requests whose time limit has passed, before they take a place in a step."""
        now = time.monotonic()
        late = [s for s in self.seqs.values() if s.deadline is not None and s.deadline <= now]
        return self._end(late, FinishReason.TIME_LIMIT)

    def _fail(self, failed: list[Sequence], error: str) -> list[TokenEvent]:
        return self._end(failed, FinishReason.ERROR, error)

    def _end(self, seqs: list[Sequence], reason: FinishReason, detail: str = ""
             ) -> list[TokenEvent]:
        """End `seqs` between tokens; the reason is set before the observer hears of them."""
        events = [end_without_token(s, reason, detail) for s in seqs]
        for seq in seqs:
            self._remove(seq)
        return events

    def _token_times(self, seqs: list[Sequence]
                     ) -> tuple[list[tuple[str, float]], list[float]]:
        """Stamp this step's tokens; ((source, time to first token), inter-token latency)
        samples."""
        now = time.monotonic()
        ttft: list[tuple[str, float]] = []
        itl: list[float] = []
        for seq in seqs:
            if seq.last_token_time is None:
                seq.first_token_time = now
                ttft.append((seq.request.source, now - seq.arrival_time))
            else:
                itl.append(now - seq.last_token_time)
            seq.last_token_time = now
        return ttft, itl

    def _step_stats(self, plan: StepPlan, moe: list[MoEStats], seconds: float,
                    ttft: list[tuple[str, float]], itl: list[float]) -> StepStats:
        graphs = self.runner.decode_graphs
        admitted, self.batcher.admitted = tuple(self.batcher.admitted), []
        b = self.batcher
        queried, hits, b.prefix_queried, b.prefix_hits = b.prefix_queried, b.prefix_hits, 0, 0
        preemptions, b.preemptions = b.preemptions, 0
        return StepStats(
            plan, tuple(moe), seconds, tuple(ttft), tuple(itl), num_tokens=plan.num_tokens,
            admitted=admitted,
            num_running=len(self.batcher.running), num_waiting=self.batcher.num_waiting,
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_cached=self.blocks.num_cached,
            kv_blocks_evictable=self.blocks.num_evictable,
            prefix_queried_tokens=queried, prefix_hit_tokens=hits, preemptions=preemptions,
            graphed=self.runner.last_step_graphed,
            decode_graphs=0 if graphs is None else len(graphs.graphs),
        )

    def _remove(self, seq: Sequence) -> None:
        self.batcher.remove(seq)
        del self.seqs[seq.request_id]
        if self.observer is not None:
            self.observer.request_done(request_stats(seq, time.monotonic(), self))


def request_stats(seq: Sequence, now: float, engine: Engine) -> RequestStats:
    """A finished sequence's timeline, and the engine's occupancy once it left."""
    first, last, admitted = seq.first_token_time, seq.last_token_time, seq.admitted_time
    return RequestStats(
        request_id=seq.request_id,
        finish_reason=seq.finish_reason or FinishReason.ABORTED,
        prompt_tokens=seq.num_prompt,
        generated_tokens=seq.num_generated,
        queue_time=(admitted if admitted is not None else now) - seq.arrival_time,
        prefill_time=None if first is None or admitted is None else first - admitted,
        decode_time=None if first is None or last is None else last - first,
        e2e_time=now - seq.arrival_time,
        num_running=len(engine.batcher.running),
        num_waiting=engine.batcher.num_waiting,
        kv_blocks_used=engine.blocks.num_used,
        kv_blocks_cached=engine.blocks.num_cached,
        kv_blocks_evictable=engine.blocks.num_evictable,
        cached_tokens=seq.num_cached,
        preemptions=seq.preemptions,
        source=seq.request.source,
    )

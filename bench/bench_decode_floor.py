"""A decode step against its floor: the bytes the step must read over the machine's read rate.

    python bench/bench_decode_floor.py [--json PATH] [--batches 1,8,32] [--dtypes float32,bfloat16]
        [--paths torch,cpu-ops,compiled]

For each model (the shipped default model, ecserve-code, and the tiny Mixtral of
bench_vs_transformers.py), dtype and batch B, B sequences (64-token prompts) decode in lock-step
through the engine; each pure-decode step (every sequence one token) is timed and its floor
computed from what that step had to read:

- the experts that held a token in it (from the step's routing statistics), each read once;
- every other weight (attention, norms, routers, dense FFNs, the output head) except the
  embedding, of which only the B looked-up rows count;
- the live KV cache: every cached position of every sequence, keys and values, all layers.

Read rate: the fastest of timed full reads (sum and matrix-vector) of a float32 buffer the size
of the model's weights plus its largest live KV, so the floor sees the cache level those bytes
live in between steps (measured in the same run, after each model's steps, with its threads).
Each configuration runs on each decode path, back to back: `torch` (plain PyTorch, operator by
operator: --kernels torch), `cpu-ops` (ecserve's C++ linear and fused MoE op: --kernels auto)
and `compiled` (those ops inside one torch.compile'd step: --decode compiled).
Prints step time / floor (median over steps), tokens/s and each path's speed-up over `torch`
in the same run; --json writes the rows and setup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ecserve serve` sets it
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_decode_policies import lockstep_budget, pure_decode_step_times
from bench_vs_transformers import SIZE
from hf_models import build  # tests/hf_models.py: tiny HF checkpoints
from provenance import cpu_name, openmp_env, stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir
from ecserve.model.transformer import Transformer

PROMPT = 64


# decode path -> (EngineConfig.kernels, EngineConfig.decode)
PATHS = {"torch": ("torch", "eager"), "cpu-ops": ("auto", "eager"),
         "compiled": ("auto", "compiled")}


@dataclass
class Row:
    model: str
    dtype: str
    batch: int
    path: str  # PATHS
    step_ms: float  # median pure-decode step
    floor_ms: float  # median of the same steps' floors
    ratio: float  # step / floor
    tokens_per_s: float
    active_experts: float  # mean experts holding a token, per MoE layer and step
    step_mb: float  # median bytes a step must read
    read_gb_s: float  # the read rate the floor uses
    speedup: float  # the `torch` path's step time / this path's, same configuration and run


def read_rate(nbytes: int, reps: int = 25) -> float:
    """Bytes/s of a full read of an nbytes float32 buffer: the fastest of `reps` sums and
    matrix-vector products. The best, not the median: a noisy neighbour must not lower the
    rate, which would raise the floor and flatter the ratio."""
    cols = 1024
    buf = torch.ones(max(cols, nbytes // 4 // cols * cols))
    ones = torch.ones(cols)
    best = 0.0
    for read in (buf.sum, lambda: torch.mv(buf.view(-1, cols), ones)):
        read()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            read()
            times.append(time.perf_counter() - t0)
        best = max(best, buf.numel() * 4 / min(times))
    return best


class StepBytes:
    """The bytes one decode step of `model` must read, from the step's plan and routing."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        cfg = model.cfg
        assert cfg.num_kv_heads is not None and cfg.head_dim is not None
        self.elem = model.embed.element_size()
        self.kv_per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.elem
        moes = [b.moe for b in model.layers if b.moe is not None]
        self.expert_bytes = [
            (m.w_gate[0].numel() + m.w_up[0].numel() + m.w_down[0].numel()) * self.elem
            for m in moes]
        all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        experts = sum(b * m.w_gate.shape[0] for b, m in zip(self.expert_bytes, moes, strict=True))
        self.embed_row = model.embed[0].numel() * self.elem
        head_is_embed = model.lm_head is None  # tied: the output head reads the whole table
        self.fixed = all_bytes - experts - (0 if head_is_embed else model.embed.numel() * self.elem)
        self.total = all_bytes

    def __call__(self, engine: Engine) -> tuple[int, int, int]:
        """(bytes, KV bytes, active experts over all MoE layers) of the engine's last step."""
        stats = engine.last_stats
        assert stats is not None
        active = [int((m.tokens_per_expert > 0).sum()) for m in stats.moe]
        experts = sum(a * b for a, b in zip(active, self.expert_bytes, strict=True))
        chunks = stats.plan.chunks
        kv = sum(c.start_pos + len(c.token_ids) for c in chunks) * self.kv_per_position
        rows = 0 if self.model.lm_head is None else len(chunks) * self.embed_row
        return self.fixed + experts + kv + rows, kv, sum(active)


def measure(model_dir: Path, label: str, dtype: str, batch: int, steps: int, path: str) -> Row:
    kernels, decode = PATHS[path]
    engine = Engine(model_dir, EngineConfig(
        device="cpu", dtype=dtype, max_num_seqs=batch, max_model_len=PROMPT + steps + 8,
        max_num_batched_tokens=lockstep_budget(batch, PROMPT), expert_timing_every=0,
        kernels=kernels, decode=decode))
    if decode == "compiled" and engine.runner.compiled is None:
        raise SystemExit(f"{label} {dtype} B={batch}: the compiled step is unavailable")
    counter = StepBytes(engine.runner.model)
    vocab = engine.model_cfg.vocab_size
    prompts = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    pure_decode_step_times(engine, prompts, batch, 4)  # warm-up
    seen = []  # (bytes, KV bytes, active experts) per timed step
    times = pure_decode_step_times(engine, prompts, batch, steps + 1,
                                   on_step=lambda: seen.append(counter(engine)))
    step_bytes = [b for b, _, _ in seen]
    # The bytes a step reads stay where all the weights and the KV fit between steps.
    rate = read_rate(counter.total + max(kv for _, kv, _ in seen))
    floors = [b / rate for b in step_bytes]
    moe_layers = len(counter.expert_bytes) or 1
    step = statistics.median(times)
    floor = statistics.median(floors)
    experts = statistics.mean(a for _, _, a in seen) / moe_layers
    return Row(label, dtype, batch, path, step * 1e3, floor * 1e3, step / floor, batch / step,
               experts, statistics.median(step_bytes) / 2**20, rate / 1e9, 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the rows and the setup here")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--models", default="default,tiny-mixtral")
    ap.add_argument("--paths", default=",".join(PATHS), help="decode paths; `torch` first "
                    "gives the others their speed-up")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"default": default_model_dir()}
        if "tiny-mixtral" in a.models:
            build("mixtral", Path(tmp), **SIZE)
            dirs["tiny-mixtral"] = Path(tmp)
        rows = []
        for m in a.models.split(","):
            for dt in a.dtypes.split(","):
                for b in map(int, a.batches.split(",")):
                    same = [measure(dirs[m], m, dt, b, a.steps, p) for p in a.paths.split(",")]
                    base = next((r.step_ms for r in same if r.path == "torch"), None)
                    for r in same:
                        r.speedup = base / r.step_ms if base else float("nan")
                    rows += same
    import ecserve_kernels.cpu

    setup = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "cpu_ops": ecserve_kernels.cpu.load() or "built",
             "python": platform.python_version(), "openmp": openmp_env(),
             "prompt_tokens": PROMPT, "steps": a.steps}
    print(f"{setup['cpu']}, {setup['threads']} threads ({setup['openmp'] or 'OpenMP defaults'}), "
          f"torch {setup['torch']}; "
          f"{PROMPT}-token prompts, median of {a.steps} lock-step decode steps")
    print(f"{'model':<14}{'dtype':<10}{'B':>4} {'path':<10}{'step ms':>9}{'floor ms':>10}"
          f"{'step/floor':>12}{'tok/s':>8}{'vs torch':>10}{'experts':>9}{'MB/step':>9}{'GB/s':>7}")
    for r in rows:
        print(f"{r.model:<14}{r.dtype:<10}{r.batch:>4} {r.path:<10}{r.step_ms:>9.2f}"
              f"{r.floor_ms:>10.2f}{r.ratio:>12.2f}{r.tokens_per_s:>8.0f}{r.speedup:>9.2f}x"
              f"{r.active_experts:>9.2f}{r.step_mb:>9.1f}{r.read_gb_s:>7.1f}")
    if a.json:
        a.json.write_text(json.dumps({**stamp(__file__, argv), "setup": setup,
                                      "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ecserve against Hugging Face transformers on the same Mixtral-type weights, one process tree.

    python bench/bench_vs_transformers.py [--json PATH] [--requests 64] [--hf-batch-size 16]

A random Mixtral-type checkpoint (width 512, 8 experts of width 1024, top-2, 4 layers) is saved
with transformers' save_pretrained and served in place. Workload: 64 greedy requests, prompts of
16-128 random byte tokens, 16-64 output tokens each (seeded), all submitted at once:

- ecserve offline: `LLM.generate` (continuous batching, paged KV cache);
- ecserve served: `ecserve serve --model DIR` as a subprocess, 64 concurrent gRPC calls;
- transformers: `generate` (greedy, KV cache) on left-padded batches of --hf-batch-size
  requests; a batch runs until its longest output, and only the requested tokens are counted.

Output tok/s = requested output tokens / wall time. Then expert choice against token choice at
the same active compute: the same weights with policy `ec`, c = 2 (2 experts per token on
average, groups of 64) against the model's own token_choice top-2, one 512-token prefill step
(4 prompts of 128) through the engine, interleaved, median of --reps. CPU, float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# As `ecserve serve` does: spinning OpenMP threads make steps take seconds on a loaded CPU.
# Set before torch loads, for ecserve offline and transformers alike (one process).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_models import build  # tests/hf_models.py: tiny HF checkpoints
from provenance import stamp

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.llm import LLM
from ecserve.types import Request, SamplingParams

SIZE = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512)
ENGINE = dict(device="cpu", max_num_seqs=64, max_num_batched_tokens=512,
              kv_cache_bytes=256 << 20)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(16, 129, (1,), generator=gen))
        new = int(torch.randint(16, 65, (1,), generator=gen))
        out.append((torch.randint(0, 256, (plen,), generator=gen).tolist(), new))
    return out


def offline_runner(model_dir: Path, work: list[tuple[list[int], int]]) -> Callable[[], float]:
    llm = LLM(model_dir, EngineConfig(**ENGINE, expert_timing_every=0))
    llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))  # warm-up
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in work]

    def run() -> float:
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in work], params)
        wall = time.perf_counter() - t0
        assert [len(o.token_ids) for o in outs] == [n for _, n in work]
        return wall

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_runner(model_dir: Path, work: list[tuple[list[int], int]]
                  ) -> Iterator[Callable[[], float]]:
    """`ecserve serve` in a subprocess; each run sends every request at once over gRPC."""
    from ecserve.client import Client

    port = _free_port()
    exe = Path(sys.executable).with_name("ecserve")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", str(model_dir), "--port", str(port), "--metrics-port",
         "0", "--device", "cpu", "--max-num-seqs", "64", "--max-num-batched-tokens", "512",
         "--kv-cache-bytes", str(ENGINE["kv_cache_bytes"]), "--expert-timing-every", "0",
         "--http-port", "0", "--log-level", "WARNING"])
    client = Client(f"127.0.0.1:{port}", timeout=600)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):  # not listening yet
                if client.health() == "SERVING":
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("ecserve serve did not become SERVING")
            time.sleep(0.2)

        def one(item: tuple[list[int], int]) -> int:
            r = client.generate(item[0], max_new_tokens=item[1], ignore_eos=True)
            return r.generated_token_count

        def run() -> float:
            with ThreadPoolExecutor(len(work)) as pool:
                t0 = time.perf_counter()
                counts = list(pool.map(one, work))
                wall = time.perf_counter() - t0
            assert counts == [n for _, n in work]
            return wall

        yield run
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)


@torch.inference_mode()
def run_transformers(hf, work: list[tuple[list[int], int]], batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(work), batch_size):
        batch = work[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], left-padded
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (p, _) in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        hf.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in batch),
                    do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def step_times(model_dir: Path, ec_dir: Path, reps: int) -> tuple[float, float]:
    """Median seconds of one 512-token prefill step: token choice, expert choice."""
    engines = [Engine(d, EngineConfig(**ENGINE, expert_timing_every=0))
               for d in (model_dir, ec_dir)]
    gen = torch.Generator().manual_seed(7)
    times: list[list[float]] = [[], []]
    for rep in range(reps + 1):
        for k, eng in enumerate(engines):
            for s in range(4):
                prompt = tuple(torch.randint(0, 256, (128,), generator=gen).tolist())
                eng.add_request(Request(f"s{rep}-{s}", prompt, SamplingParams(max_new_tokens=1)))
            t0 = time.perf_counter()
            eng.step()  # the 512 prompt tokens in one step; each request samples its one token
            if rep:  # the first is warm-up
                times[k].append(time.perf_counter() - t0)
            assert not eng.has_unfinished()
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (best is shown)")
    ap.add_argument("--reps", type=int, default=11, help="step-time repetitions (median)")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = workload(args.requests)
    tokens = sum(n for _, n in work)
    hf_name = f"transformers generate (batches of {args.hf_batch_size})"
    walls: dict[str, list[float]] = {"ecserve offline": [], "ecserve served (gRPC)": [],
                                     hf_name: []}
    with tempfile.TemporaryDirectory() as tmp:
        hf, model_dir = build("mixtral", Path(tmp) / "mixtral", **SIZE)
        ec_dir = Path(tmp) / "mixtral-ec"  # the same weights, served with expert choice
        shutil.copytree(model_dir, ec_dir)
        cfg = json.loads((ec_dir / "config.json").read_text())
        cfg["ecserve_routing"] = {"policy": "ec", "capacity_factor": 2.0, "group_size": 64}
        (ec_dir / "config.json").write_text(json.dumps(cfg))
        hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False,
                    pad_token_id=0)  # warm-up
        offline = offline_runner(model_dir, work)
        with served_runner(model_dir, work) as served:
            for _ in range(args.rounds):  # interleaved, so a slow spell hits all three
                walls["ecserve offline"].append(offline())
                walls["ecserve served (gRPC)"].append(served())
                walls[hf_name].append(run_transformers(hf, work, args.hf_batch_size))
        tc, ec = step_times(model_dir, ec_dir, args.reps)
    best = {k: min(v) for k, v in walls.items()}
    hf_wall = best[hf_name]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.requests} requests, {tokens} output tokens")
    print(f"best of {args.rounds} interleaved rounds (median in parentheses)")
    print("| engine | wall s | output tok/s | vs transformers |\n|---|---|---|---|")
    for name, wall in best.items():
        med = statistics.median(walls[name])
        print(f"| {name} | {wall:.2f} ({med:.2f}) | {tokens / wall:.1f} | "
              f"{hf_wall / wall:.2f}x |")
    print(f"\nprefill step, 512 tokens: token_choice top-2 {tc * 1e3:.1f} ms, ec c=2 "
          f"{ec * 1e3:.1f} ms, ec / token_choice = {ec / tc:.3f}")
    if args.json:
        result = {
            **stamp(__file__, packages=("transformers", "grpcio")),
            "baseline": hf_name,  # the engine the "vs transformers" ratios divide
            "ecserve_over_transformers": hf_wall / best["ecserve offline"],
            "served_over_transformers": hf_wall / best["ecserve served (gRPC)"],
            "ec_over_token_choice_step": ec / tc,
            "output_tokens_per_s": {k: tokens / w for k, w in best.items()},
            "wall_s_all_rounds": walls,
            "step_ms": {"token_choice": tc * 1e3, "ec": ec * 1e3},
            "config": {**SIZE, "requests": args.requests, "output_tokens": tokens,
                       "hf_batch_size": args.hf_batch_size, "rounds": args.rounds,
                       "reps": args.reps, "torch": torch.__version__},
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""ecserve against llama.cpp (llama-cpp-python) on the same tiny Mixtral weights, one process.

    pip install -e '.[peer]'    # llama-cpp-python (builds from source, ~7 min here) and gguf
    python bench/bench_vs_llama_cpp.py [--json PATH] [--rounds 5] [--new-tokens 128]
        [--decode eager,compiled] [--kernels auto|torch]

The tiny Mixtral of bench_vs_transformers.py (width 512, 4 layers, 8 experts of width 1024,
top-2) is saved once by transformers, served by ecserve from that directory, and written as
GGUF files (gguf_mixtral.py) for llama.cpp, in F32 and in F16. Both engines get the same token
ids and decode greedily, with the same threads:

- batch 1: one 32-token prompt, 128 new tokens;
- 16 parallel sequences: 16 different 32-token prompts, 128 new tokens each, decoded together
  (llama.cpp through its batch API, one llama_decode per step for all sequences).

Tok/s = new tokens / wall time of the whole generation (prefill included), median of --rounds
interleaved rounds. Precisions: the same function (ecserve float32; llama.cpp F32 GGUF, F32 KV
cache, flash attention off: the tokens are compared, sequence by sequence) and each engine at
its fastest (ecserve bfloat16 with a float32 router; llama.cpp's defaults, F16 GGUF, F16 KV, flash
attention on). Ratios are ecserve / llama.cpp, for each of ecserve's decode paths (--decode:
the eager step and the compiled one, both by default, timed in the same rounds).
"""

from __future__ import annotations

import argparse
import ctypes
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_vs_transformers import SIZE
from gguf_mixtral import write_gguf
from hf_models import build  # tests/hf_models.py: tiny HF checkpoints
from provenance import cpu_name, openmp_env, stamp

from ecserve.config import EngineConfig
from ecserve.engine.llm import LLM
from ecserve.types import SamplingParams

PROMPT = 32
WORKLOADS = {"batch 1": 1, "16 parallel": 16}


class LlamaCpp:
    """One llama.cpp context decoding up to `seqs` sequences together, greedily, by token id."""

    def __init__(self, gguf: Path, seqs: int, ctx_per_seq: int, threads: int, kv_f32: bool,
                 flash: bool) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # keep a reference
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        self.model = lc.llama_model_load_from_file(str(gguf).encode(),
                                                   lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        p = lc.llama_context_default_params()
        p.n_ctx = seqs * ctx_per_seq
        p.n_batch = p.n_ubatch = max(512, seqs * PROMPT)
        p.n_seq_max = seqs
        p.n_threads = p.n_threads_batch = threads
        p.type_k = p.type_v = lc.GGML_TYPE_F32 if kv_f32 else lc.GGML_TYPE_F16
        p.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                             else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = lc.llama_batch_init(p.n_batch, 0, seqs)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i),
                                       shape=(self.vocab,))
        return int(logits.argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in
                enumerate(p)]
        self._decode(rows)  # every prompt in one batch
        last = [i for i, r in enumerate(rows) if r[3]]
        out = [[self._argmax(i)] for i in last]
        for step in range(1, new_tokens):
            self._decode([(o[-1], len(p) + step - 1, s, True)
                          for s, (p, o) in enumerate(zip(prompts, out, strict=True))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


@dataclass
class Row:
    workload: str
    engine: str  # ecserve | llama.cpp
    precision: str
    tokens_per_s: float
    path: str | None = None  # ecserve's decode path (EngineConfig.decode); None for llama.cpp


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the rows, ratios and setup here")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode", default="eager,compiled",
                    help="ecserve's decode paths (EngineConfig.decode), comma-separated")
    ap.add_argument("--kernels", choices=("auto", "torch"), default="auto",
                    help="ecserve's operators (EngineConfig.kernels)")
    a = ap.parse_args(argv)
    paths = a.decode.split(",")
    if not paths or set(paths) - {"eager", "compiled"}:
        ap.error(f"--decode: {a.decode!r} is not a list of eager and compiled")
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    prompts = {w: [torch.randint(0, 256, (PROMPT,), generator=gen).tolist() for _ in range(n)]
               for w, n in WORKLOADS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "mixtral"
        build("mixtral", model_dir, **SIZE)
        ggufs = {ft: write_gguf(model_dir, Path(tmp) / f"mixtral-{ft}.gguf", ft)
                 for ft in ("F32", "F16")}
        ctx = PROMPT + a.new_tokens + 8
        n_max = max(WORKLOADS.values())
        ours = {(dt, path): LLM(model_dir, EngineConfig(
                    device="cpu", dtype=dt, max_num_seqs=n_max, max_model_len=ctx,
                    max_num_batched_tokens=max(512, n_max * PROMPT), expert_timing_every=0,
                    decode=path, kernels=a.kernels))
                for path in paths for dt in ("float32", "bfloat16")}
        for (dt, path), llm in ours.items():
            if path == "compiled" and llm.engine.runner.compiled is None:
                raise SystemExit(f"ecserve {dt}: the compiled decode step is unavailable "
                                 "(the log says why)")
        theirs = {"F32 (F32 KV, no flash attention)": LlamaCpp(ggufs["F32"], n_max, ctx, threads,
                                                                kv_f32=True, flash=False),
                  "F16 (F16 KV, flash attention)": LlamaCpp(ggufs["F16"], n_max, ctx, threads,
                                                             kv_f32=False, flash=True)}
        runners = {("ecserve", dt, path): (lambda p, n, llm=llm: [
                       o.token_ids for o in llm.generate(p, SamplingParams(
                           max_new_tokens=n, ignore_eos=True))])
                   for (dt, path), llm in ours.items()}
        runners |= {("llama.cpp", k, None): peer.generate for k, peer in theirs.items()}
        times: dict[tuple[str, str, str, str | None], list[float]] = {}
        agree: dict[str, dict[str, str]] = {}
        for r in range(a.rounds + 1):  # round 0 warms up and compares the tokens
            for w, ps in prompts.items():
                outs = {}
                for key, run in runners.items():
                    t0 = time.perf_counter()
                    outs[key] = run(ps, a.new_tokens)
                    if r:
                        times.setdefault((w, *key), []).append(time.perf_counter() - t0)
                if r == 0:
                    f32 = outs[("llama.cpp", "F32 (F32 KV, no flash attention)", None)]
                    agree[w] = {path: agreement(outs[("ecserve", "float32", path)], f32)
                                for path in paths}
        for peer in theirs.values():
            peer.close()
    rows = [Row(w, eng, prec, len(prompts[w]) * a.new_tokens / statistics.median(ts), path)
            for (w, eng, prec, path), ts in times.items()]
    speed = {(r.workload, r.engine, r.precision, r.path): r.tokens_per_s for r in rows}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for w in WORKLOADS:
        f32 = speed[(w, "llama.cpp", "F32 (F32 KV, no flash attention)", None)]
        best_theirs = max(v for (ww, e, _, _), v in speed.items()
                          if ww == w and e == "llama.cpp")
        ratios[w] = {path: {
            "same_precision": speed[(w, "ecserve", "float32", path)] / f32,
            "each_fastest": max(v for (ww, e, _, pp), v in speed.items()
                                if ww == w and e == "ecserve" and pp == path) / best_theirs}
            for path in paths}
    setup = {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__,
             "llama_cpp_python": llama_cpp_version(), "python": platform.python_version(),
             "openmp": openmp_env(), "decode": paths, "kernels": a.kernels,
             "prompt_tokens": PROMPT, "new_tokens": a.new_tokens, "rounds": a.rounds,
             "model": SIZE}
    print(f"{setup['cpu']}, {threads} threads ({setup['openmp'] or 'OpenMP defaults'}), "
          f"ecserve --kernels {a.kernels}, torch {setup['torch']}, "
          "llama-cpp-python "
          f"{setup['llama_cpp_python']}; {PROMPT}-token prompts, {a.new_tokens} new tokens, "
          f"greedy, median of {a.rounds} rounds")
    print(f"{'workload':<13}{'engine':<20}{'precision':<36}{'tok/s':>8}")
    for r in rows:
        engine = r.engine + (f" {r.path}" if r.path else "")
        print(f"{r.workload:<13}{engine:<20}{r.precision:<36}{r.tokens_per_s:>8.0f}")
    for w, by_path in ratios.items():
        for path, rr in by_path.items():
            print(f"{w}, ecserve {path}: ecserve / llama.cpp = {rr['same_precision']:.2f} at "
                  f"float32, {rr['each_fastest']:.2f} each at its fastest; tokens (float32 vs "
                  f"F32): {agree[w][path]}")
    if a.json:
        a.json.write_text(json.dumps({
            **stamp(__file__, argv, packages=("llama_cpp_python", "gguf")),
            "setup": setup, "rows": [asdict(r) for r in rows], "ratios": ratios,
            "agreement": agree}, indent=2) + "\n")
    return 0


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'16/16 sequences identical', or how many are and where the first one diverges."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    text = f"{same}/{len(ours)} sequences identical"
    firsts = [next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
              for a, b in zip(ours, theirs, strict=True) if a != b]
    return text + (f" (earliest divergence at token {min(firsts)})" if firsts else "")


if __name__ == "__main__":
    sys.exit(main())

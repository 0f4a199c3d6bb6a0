"""GPU first light: what ecserve's GPU code must show, in one call, within a time budget.

    python bench/gpu_first_light.py [--out DIR] [--budget-s 720] [--dry-run]

Parts, in order, each in a process of its own with its own time limit; each writes its result
under DIR (default bench/results/gpu_first_light/) and DIR/summary.json is rewritten after every
part, so a later failure loses nothing:

  device           the GPU (nvidia-smi), torch, CUDA, Triton and Python versions
  pytest_gpu       pytest -m gpu (Triton kernels against their torch twins, CUDA graphs)
  greedy           the engine's greedy tokens on the default model and a tiny Mixtral, float32:
                   the Triton path with CUDA graphs on and off against the torch path
  bench_kernels    bench/bench_kernels.py --json (the kernel ratios and the decode step)
  serving_graphs   bench/bench_serving.py at 1..64 streams, engine core in its own process
  serving_eager    the same with --no-cuda-graphs
  compiled_decode  the compiled decode step is CPU-only (GPUs replay CUDA graphs): recorded as
                   skipped with compile_blocker's reason

--dry-run rehearses every part on the CPU (Triton's interpreter, small shapes, a few tokens) in
about two minutes; tests/test_gpu_first_light.py runs it in CI so the script keeps working as
the code changes. summary.json holds each part's status (ok, failed, timeout, skipped), seconds,
command and the tail of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
# part -> seconds it may take on a GPU; a dry run gives each DRY_LIMIT_S
LIMITS_S = {"device": 30, "pytest_gpu": 240, "greedy": 150, "bench_kernels": 150,
            "serving_graphs": 150, "serving_eager": 150, "compiled_decode": 10}
DRY_LIMIT_S = 60
COMPILED_DECODE = ("the compiled decode step runs on CPUs only; on a GPU pure-decode steps "
                   "replay CUDA graphs (serving_graphs against serving_eager)")


def commands(out: Path, dry: bool) -> dict[str, list[str] | None]:
    """Each part's command (None: run in this process)."""
    py = sys.executable
    me = [py, str(SCRIPT), "--out", str(out), *(["--dry-run"] if dry else [])]
    kernels = [py, str(ROOT / "bench/bench_kernels.py"), "--json", str(out / "bench_kernels.json")]
    if dry:  # small shapes: the interpreter and the CPU twins
        kernels += ["--d", "64", "--f", "64", "--experts", "4", "--prefill-tokens", "64",
                    "--group-size", "32", "--decode-tokens", "4", "--decode-layers", "1",
                    "--decode-context", "32", "--reps", "1"]
    serving = [py, str(ROOT / "bench/bench_serving.py"), "--engine-core", "process"]
    serving += (["--levels", "1", "--output-len", "4", "--requests-per-level", "1"] if dry
                else ["--levels", "1,2,4,8,16,32,64"])
    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
              str(ROOT / "tests/kernels"), *(["--collect-only"] if dry else [])]
    return {
        "device": None,
        "pytest_gpu": pytest,
        "greedy": [*me, "--part", "greedy"],
        "bench_kernels": kernels,
        "serving_graphs": [*serving, "--json", str(out / "serving_graphs.json"),
                           "--serve-arg=--cuda-graphs"],
        "serving_eager": [*serving, "--json", str(out / "serving_eager.json"),
                          "--serve-arg=--no-cuda-graphs"],
        "compiled_decode": None,
    }


def device_info(dry: bool) -> dict[str, object]:
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "machine": platform.machine(),
                               "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to rehearse on the CPU")
    return info


def greedy(out: Path, dry: bool) -> dict[str, object]:
    """Greedy tokens per model and path; each Triton path's agreement with the torch path's."""
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_vs_transformers import SIZE
    from hf_models import build  # tests/hf_models.py: tiny HF checkpoints

    from ecserve.config import EngineConfig
    from ecserve.engine.llm import LLM
    from ecserve.types import SamplingParams

    device = "cpu" if dry else "cuda"
    new, seqs = (2, 2) if dry else (64, 8)
    size = dict(SIZE, hidden_size=64, intermediate_size=64, num_hidden_layers=1) if dry else SIZE
    prompts = [[(7 * i + 3 * j) % 250 + 2 for j in range(8 + 4 * i)] for i in range(seqs)]
    paths = {"torch": dict(kernels="torch", cuda_graphs=False),
             "triton, CUDA graphs": dict(kernels="triton", cuda_graphs=True),
             "triton, no CUDA graphs": dict(kernels="triton", cuda_graphs=False)}
    result: dict[str, object] = {"device": device, "new_tokens": new, "sequences": seqs}
    with tempfile.TemporaryDirectory() as tmp:
        mixtral = Path(tmp) / "mixtral"
        build("mixtral", mixtral, **size)
        for name, model in (("default", None), ("tiny Mixtral", str(mixtral))):
            tokens = {}
            for path, kw in paths.items():
                llm = LLM(model, EngineConfig(device=device, dtype="float32",
                                              max_num_seqs=seqs, **kw))
                outs = llm.generate(prompts, SamplingParams(max_new_tokens=new,
                                                            ignore_eos=True))
                tokens[path] = [o.token_ids for o in outs]
            want = tokens["torch"]
            same = {p: sum(a == b for a, b in zip(t, want, strict=True))
                    for p, t in tokens.items() if p != "torch"}
            result[name] = {"tokens": tokens, "agreement": {
                p: f"{n}/{len(want)} sequences identical" for p, n in same.items()}}
    (out / "greedy.json").write_text(json.dumps(result, indent=2) + "\n")
    return {name: result[name]["agreement"] for name in ("default", "tiny Mixtral")}


def run_part(name: str, cmd: list[str] | None, out: Path, dry: bool, limit: float
             ) -> dict[str, object]:
    t0 = time.monotonic()
    row: dict[str, object] = {"command": " ".join(cmd) if cmd else f"in-process: {name}"}
    if name == "compiled_decode":
        return {**row, "status": "skipped", "seconds": 0.0, "detail": COMPILED_DECODE}
    if cmd is None:
        try:
            info = device_info(dry)
            (out / "device.json").write_text(json.dumps(info, indent=2) + "\n")
            return {**row, "status": "ok", "seconds": time.monotonic() - t0,
                    "detail": {k: v for k, v in info.items() if k != "nvidia_smi"}}
        except (SystemExit, Exception) as e:
            return {**row, "status": "failed", "seconds": time.monotonic() - t0, "detail": str(e)}
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        status = "ok" if proc.returncode == 0 else "failed"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (e.stdout, e.stderr))
    (out / f"{name}.log").write_text(output)
    return {**row, "status": status, "seconds": round(time.monotonic() - t0, 1),
            "detail": output[-2000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_first_light")
    ap.add_argument("--budget-s", type=float, default=720.0,
                    help="all parts together; each gets min(its limit, what is left)")
    ap.add_argument("--dry-run", action="store_true",
                    help="rehearse every part on the CPU at small shapes")
    ap.add_argument("--part", choices=("greedy",), help=argparse.SUPPRESS)  # a child's part
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.part == "greedy":
        print(json.dumps(greedy(a.out, a.dry_run), indent=2))
        return 0
    start = time.monotonic()
    summary: dict[str, object] = {"dry_run": a.dry_run, "budget_s": a.budget_s, "parts": {}}
    parts: dict[str, dict[str, object]] = summary["parts"]  # type: ignore[assignment]
    for name, cmd in commands(a.out, a.dry_run).items():
        left = a.budget_s - (time.monotonic() - start)
        limit = min(DRY_LIMIT_S if a.dry_run else LIMITS_S[name], left)
        if limit < 5:
            parts[name] = {"status": "skipped", "seconds": 0.0,
                           "detail": "the budget was spent before this part"}
        else:
            parts[name] = run_part(name, cmd, a.out, a.dry_run, limit)
        print(f"{name}: {parts[name]['status']} ({parts[name]['seconds']:.0f} s)", flush=True)
        summary["seconds"] = round(time.monotonic() - start, 1)
        (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [n for n, p in parts.items() if p["status"] in ("failed", "timeout")]
    print(f"{len(parts) - len(failed)} of {len(parts)} parts ok or skipped; "
          f"{'failed: ' + ', '.join(failed) if failed else 'none failed'}; {a.out}/summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

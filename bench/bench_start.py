"""How long `ecserve serve` takes to reach SERVING, with the compiled decode step (the default)
on a cold and a warm compile cache, and with `--decode eager`.

    python bench/bench_start.py [--json PATH] [--rounds 2] [--model DIR] [--no-cold-ops]

Each round starts, in this order, one server per variant and stops it once health says SERVING:
- `nothing cached`: fresh TORCH_EXTENSIONS_DIR and TORCHINDUCTOR_CACHE_DIR (a new machine or a
  new container: the CPU ops are built, then the step compiled; --no-cold-ops leaves it out);
- `cold compile`: the CPU ops built already (this user's cache), a fresh inductor cache;
- `warm`: the inductor cache the cold start just filled (a restart);
- `eager`: `--decode eager` (the start without a compiled step).
Reported: the median seconds from spawning the process to SERVING, the compile time the server
logs, and warm - eager (the issue's goal: at most 15 s) and cold - eager. The engine core runs
in its own process (the default); the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import stamp

from ecserve.client import Client
from ecserve.parallel.group import free_port

VARIANTS = ("nothing cached", "cold compile", "warm", "eager")
COMPILED = re.compile(r"compiled the decode step \(1 \.\. \d+ sequences\) in ([\d.]+) s")


def start_to_serving(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float | None]:
    """Seconds from spawn to SERVING, and the compile seconds the server logged (None: none)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ecserve", "serve", "--port", str(port), "--metrics-port", "0",
           "--http-port", "0", *args]
    with open(log, "w") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        with Client(f"127.0.0.1:{port}", timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"no SERVING in 600 s: {log.read_text()[-2000:]}")
                try:
                    if client.health() == "SERVING":
                        break
                except Exception:
                    pass
                time.sleep(0.05)
        took = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    found = COMPILED.search(log.read_text())
    return took, None if found is None else float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="model directory (default: the shipped model)")
    ap.add_argument("--no-cold-ops", action="store_true",
                    help="leave out the start with nothing cached (the CPU ops' build)")
    args = ap.parse_args(argv)
    base_env = {k: v for k, v in os.environ.items() if k != "ECSERVE_COMPILED_DECODE"}
    base_env["PYTHONUNBUFFERED"] = "1"
    model = ["--model", args.model] if args.model else []
    variants = [v for v in VARIANTS if not (args.no_cold_ops and v == "nothing cached")]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    compile_s: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            inductor = Path(tmp, f"inductor{r}")
            for v in variants:
                env = dict(base_env)
                if v != "eager":
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(
                        Path(tmp, f"inductor-fresh{r}") if v == "nothing cached" else inductor)
                if v == "nothing cached":
                    env["TORCH_EXTENSIONS_DIR"] = str(Path(tmp, f"extensions{r}"))
                decode = ["--decode", "eager"] if v == "eager" else []
                took, compiled = start_to_serving([*model, *decode], env,
                                                  Path(tmp, f"{v}-{r}.log"))
                if v != "eager" and compiled is None:
                    raise SystemExit(f"{v}: the server did not compile its decode step")
                seconds[v].append(round(took, 2))
                if compiled is not None:
                    compile_s[v].append(compiled)
                print(f"round {r + 1}: {v}: SERVING after {took:.1f} s"
                      + (f" (compiled in {compiled:.1f} s)" if compiled is not None else ""),
                      flush=True)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    summary = {"median_s": median,
               "median_compile_s": {v: statistics.median(s) for v, s in compile_s.items() if s},
               "warm_minus_eager_s": round(median["warm"] - median["eager"], 2),
               "cold_minus_eager_s": round(median["cold compile"] - median["eager"], 2)}
    if "nothing cached" in median:
        summary["nothing_cached_minus_eager_s"] = round(
            median["nothing cached"] - median["eager"], 2)
    print(json.dumps(summary, indent=1))
    if args.json:
        out = {**stamp(__file__, argv),
               "config": {"rounds": args.rounds, "model": args.model or "default",
                          "variants": variants},
               "seconds": seconds, "compile_s": compile_s, "summary": summary,
               "goals": {"warm_minus_eager_s": "<= 15"}}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

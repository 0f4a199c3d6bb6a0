"""docs/benchmarks.md, rendered from bench/results/*.json.

    render(Path("bench/results")) -> the page's Markdown

One section per benchmark (files of one script that belong in one table share it), each with
what was measured, every file's command, date and machine, and its tables, figures formatted
as the docs write them. Each results JSON names its script under
"benchmark" (bench/provenance.py writes it); a file whose benchmark has no renderer here, or
without a command or date, is an error naming the file, so that a new result can never be left
off the page in silence. The output depends on the files alone (sorted), never on the clock.
Stdlib only: docs/generate.py runs it without torch.
"""

from __future__ import annotations

import json
import re
import statistics
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINK = "../bench/results"  # the results folder as docs/benchmarks.md links it
REQUIRED = ("benchmark", "command", "date")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

HEADER = """# Benchmarks

This page is generated from `bench/results/*.json` by `python docs/generate.py`: do not edit it
by hand. To add a result, run a script of `bench/` with `--json bench/results/NAME.json` (it
records the benchmark, the command, the date and the machine), commit the JSON with any plot it
names, and run `python docs/generate.py`. A benchmark that `bench/tables.py` has no renderer for
stops the generator with an error naming its file: write its renderer there."""


class ResultsError(ValueError):
    """A results file the page cannot be rendered from; the message names the file."""


@dataclass(frozen=True)
class Result:
    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Plot:
    file: str  # a name in bench/results
    caption: str
    named_by: Path | None = None  # the results file that names it: it must be there


@dataclass
class Section:
    title: str
    what: str  # what was measured, and how to read the tables
    results: list[Result]
    blocks: list[str]  # tables and notes, in order
    plots: list[Plot] = field(default_factory=list)


Renderer = Callable[[list[Result]], list[Section]]


# ---- formatting, as the docs write figures ------------------------------------------

def num(v: float, decimals: int = 0) -> str:
    """Thousands separators: 1,186 or 5,104.3."""
    return f"{v:,.{decimals}f}"


def times(v: float, decimals: int = 2) -> str:
    return f"{v:.{decimals}f}x"


# A line that Markdown would read as a list item, heading, quote, table row or rule.
BLOCK_START = re.compile(r"([-+*]|\d+[.)])( |$)|[#>|]|=+$|-+$")


def para(text: str) -> str:
    """Prose wrapped at 100 columns, as the project's Markdown is; left whole where a wrapped
    line would start a Markdown block."""
    lines = textwrap.wrap(text, 100, break_long_words=False, break_on_hyphens=False)
    return text if any(BLOCK_START.match(line) for line in lines[1:]) else "\n".join(lines)


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    head = list(header)
    return "\n".join([line(head), "|" + "---|" * len(head), *(line(r) for r in rows)])


def caption(result: Result, section: list[Result]) -> str:
    """A line naming the file a table comes from, where a section holds several."""
    return f"`{result.name}`:\n\n" if len(section) > 1 else ""


# ---- provenance: command, date, machine, settings ---------------------------------------------

# Keys of a script's "setup" that describe the machine (files older than provenance.py's
# machine block keep it there).
MACHINE_KEYS = {"platform", "cpu", "cpus", "threads", "torch_threads", "python", "torch",
                "openmp", "gpu", "cuda", "driver", "llama_cpp_python", "grpcio"}
NAMES = {"python": "Python", "llama_cpp_python": "llama-cpp-python", "cuda": "CUDA"}
NOT_VERSIONS = {"platform", "cpu", "cpus", "threads", "torch_threads", "openmp", "gpu",
                "driver"}


def machine_of(data: dict[str, Any]) -> dict[str, Any]:
    """The machine block; for older files what their setup or their runs recorded of it."""
    if isinstance(data.get("machine"), dict):
        return data["machine"]
    runs = [r.get("machine") for r in data.get("runs", {}).values()]
    if runs and all(m == runs[0] for m in runs) and isinstance(runs[0], dict):
        return runs[0]
    return {k: v for k, v in data.get("setup", {}).items() if k in MACHINE_KEYS}


def machine_text(info: dict[str, Any]) -> str:
    parts = []
    cpus = f"{info['cpus']} logical CPUs" if info.get("cpus") else ""
    parts.append(", ".join(p for p in (info.get("cpu", ""), cpus) if p))
    threads = info.get("torch_threads", info.get("threads"))
    if threads:
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    if info.get("gpu"):
        parts.append(f"{info['gpu']}" + (f" (driver {info['driver']})" if "driver" in info
                                         else ""))
    first = [k for k in ("python", "torch") if k in info]
    rest = sorted(k for k in info if k not in NOT_VERSIONS and k not in first)
    parts.append(", ".join(f"{NAMES.get(k, k)} {info[k]}" for k in first + rest))
    if info.get("openmp"):
        parts.append(f"`{info['openmp']}`")
    if info.get("platform"):
        parts.append(info["platform"])
    return "; ".join(p for p in parts if p) or "not recorded"


def settings_text(data: dict[str, Any]) -> str:
    """The run's settings (setup, config, workload), less the machine and the JSON path."""
    pairs = []
    for key in ("setup", "config", "workload"):
        for k, v in data.get(key, {}).items():
            if k in MACHINE_KEYS or k == "json" or v in (None, [], {}):
                continue
            shown = ", ".join(map(str, v)) if isinstance(v, list) else (
                json.dumps(v) if isinstance(v, dict) else str(v))
            pairs.append(f"{k}={shown}")
    return "; ".join(pairs)


def provenance(result: Result) -> str:
    d = result.data
    commands = d["command"] if isinstance(d["command"], list) else [d["command"]]
    settings = settings_text(d)
    text = (f"`bench/results/{result.name}`, dated {d['date']}. Machine: "
            f"{machine_text(machine_of(d))}." + (f" Settings: {settings}." if settings else ""))
    # The run that made the figures, shown, never rerun by the docs' example tests.
    return (para(text) + "\n\n```sh norun: the recorded run\n" + "\n".join(commands)
            + "\n```")


def openmp_label(result: Result) -> str:
    """', GOMP_SPINCOUNT=100000' for a run with OpenMP settings beyond the scripts' own."""
    env = machine_of(result.data).get("openmp", "")
    extra = [s for s in env.split() if s != "OMP_WAIT_POLICY=PASSIVE"]
    return ", `" + " ".join(extra) + "`" if extra else ""


# ---- one renderer per benchmark ---------------------------------------------------------------

MODELS = {"default": "default", "tiny-mixtral": "tiny Mixtral"}


def decode_floor(results: list[Result]) -> list[Section]:
    rows = [r for res in results for r in res.data["rows"]]
    batches = sorted({r["batch"] for r in rows})
    body = []
    for res in results:
        groups: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
        for r in res.data["rows"]:  # results from before the decode paths ran plain torch
            groups.setdefault((r["model"], r["dtype"], r.get("path", "torch")), {})[
                r["batch"]] = r
        for (model, dtype, path), by_b in groups.items():
            speed = [times(by_b[b]["speedup"], 2) for b in batches
                     if b in by_b and "speedup" in by_b[b]]
            body.append([f"{MODELS.get(model, model)}, {dtype}, {path}{openmp_label(res)}",
                         *(times(by_b[b]["ratio"], 1) if b in by_b else "" for b in batches),
                         " / ".join(num(by_b[b]["tokens_per_s"]) for b in batches if b in by_b),
                         " / ".join(speed)])
    rates = [r["read_gb_s"] for r in rows]
    what = (
        "B sequences decode in lock-step through the engine (the shipped default model, "
        "ecserve-code, and the tiny Mixtral of `bench_vs_transformers.py`), and each "
        "pure-decode step is set against the bytes it must read: the experts that held a token "
        "in it, every other weight, the embedding rows it looks up and the live KV cache, over "
        "the best read rate of a buffer the size of the model's weights and KV "
        f"({min(rates):.0f}-{max(rates):.0f} GB/s measured). Paths: `torch` (plain PyTorch, "
        "operator by operator), `cpu-ops` (ecserve's C++ linear and fused MoE op), `compiled` "
        "(those inside one torch.compile'd step). Cells: step time / floor (median over the "
        "timed steps); tok/s = B / median step; vs torch = the torch path's step time over "
        "this path's, same run.")
    header = ["model, dtype, path", *(f"B = {b}" for b in batches),
              "tok/s at " + " / ".join(map(str, batches)), "vs torch"]
    return [Section("Decode step against its floor (`bench_decode_floor.py`)", what, results,
                    [table(header, body)])]


def short_precision(engine: str, precision: str) -> str:
    return {"float32": "f32", "bfloat16": "bf16"}.get(precision, precision.split(" (")[0])


def peer_cell(speed: dict[tuple[str, str, str, str | None], float], workload: str, engine: str,
              precision: str, path: str | None) -> str:
    """One engine's tok/s in a row of ecserve's decode `path` (llama.cpp's rows have none)."""
    v = speed.get((workload, engine, precision, path if engine == "ecserve" else None))
    if v is None:  # a row from before rows carried their path
        v = speed.get((workload, engine, precision, None))
    return "" if v is None else num(v)


def vs_llama_cpp(results: list[Result]) -> list[Section]:
    columns = list(dict.fromkeys((r["engine"], r["precision"]) for res in results
                                 for r in res.data["rows"]))
    body = []
    for res in results:
        # ecserve's rows carry their decode path since runs timed both paths side by side
        speed = {(r["workload"], r["engine"], r["precision"], r.get("path")): r["tokens_per_s"]
                 for r in res.data["rows"]}
        setup = res.data.get("setup", {})
        for w in dict.fromkeys(r["workload"] for r in res.data["rows"]):
            ratios, agree = res.data["ratios"][w], res.data.get("agreement", {}).get(w, "")
            if "same_precision" in ratios:  # one path a run: the setup's (none: eager torch)
                ratios, agree = {setup.get("decode"): ratios}, {setup.get("decode"): agree}
            for path, ratio in ratios.items():
                label = (f", ecserve {path}" + (" (plain torch)" if setup.get("kernels")
                                                == "torch" else "") if path else "")
                body.append([f"{w}{label}{openmp_label(res)}",
                             *(peer_cell(speed, w, *c, path) for c in columns),
                             f"{ratio['same_precision']:.2f}", f"{ratio['each_fastest']:.2f}",
                             agree.get(path, "")])
    header = [*(f"{e} {short_precision(e, p)}" for e, p in columns), "ratio, f32",
              "ratio, each at its fastest", "tokens, f32 against F32"]
    what = (
        "The tiny Mixtral of `bench_vs_transformers.py` served by ecserve from its Hugging Face "
        "directory and by llama.cpp from GGUF files the benchmark writes "
        "(`bench/gguf_mixtral.py`, F32 with an F32 KV cache and no flash attention, F16 with "
        "flash attention); both get the same token ids and decode greedily. Tok/s = new tokens "
        "/ wall time, prefill included, median of interleaved rounds. Ratio, f32: ecserve "
        "float32 over llama.cpp F32; each at its fastest: each engine's fastest precision.")
    return [Section("Against llama.cpp (`bench_vs_llama_cpp.py`)", what, results,
                    [table(["workload", *header], body)])]


MODES = {"process": "engine-core process", "thread": "engine on a thread",
         "compiled": "compiled decode step", "eager": "eager decode step",
         "spin": "core's OpenMP threads spinning", "passive": "core's OpenMP threads passive"}
SERVING_RATIOS = {  # key: (row label, format, goal)
    "served_over_raw_at_32": ("served(32) / engine alone, same threads", "{:.2f}", ">= 0.9"),
    "served_over_raw_all_cores_at_32": ("served(32) / engine alone, every core, spinning",
                                        "{:.2f}", ">= 0.75"),
    "scaling_32_over_1": ("served(32) / served(1)", "{:.1f}x", ">= 12x"),
}
LOADTEST = ("an `ecserve bench` open-loop run on the seeded random model, the default model "
            "before 2026-11-27 (`--request-rate 8 "
            "--burstiness 0.5 --input-len-range 32 256 --output-len-range 32 256 "
            "--num-requests 80 --seed 0 --plot-dir DIR`), not a `bench_serving.py` run")
# Plots by file name, with what they show (for those no results file names, as docs/ shows them).
PLOTS = {
    "loadtest_throughput.png": f"Output tok/s in 1 s bins and requests in flight: {LOADTEST}",
    "loadtest_latency_cdf.png": f"TTFT, TPOT, ITL and E2EL distributions: {LOADTEST}",
    "training_curves.png": "Training curves of expert choice, a dense model of equal active "
                           "FLOPs and token-choice top-2 under one recipe and budget "
                           "(`bench_seed_claim.py --plot`)",
}


def serving_sweep(res: Result, section: list[Result]) -> list[str]:
    d = res.data
    levels = sorted({row["concurrency"] for rows in d["sweep"].values() for row in rows})
    body = []
    for mode, rows in d["sweep"].items():
        by_c = {row["concurrency"]: row for row in rows}
        body.append([f"{MODES.get(mode, mode)}: output tok/s",
                     *(num(by_c[c]["output_throughput"]) if c in by_c else "" for c in levels)])
        body.append(["median ITL (ms)",
                     *(f"{by_c[c]['median_itl_ms']:.1f}" if c in by_c else "" for c in levels)])
    ratios = [[label, *(fmt.format(d["ratios"][m][k]) if k in d["ratios"][m] else ""
                        for m in d["ratios"]), goal]
              for k, (label, fmt, goal) in SERVING_RATIOS.items()
              if any(k in r for r in d["ratios"].values())]
    raw = d.get("raw_decode_tok_s", {})
    threads = d.get("config", {}).get("torch_threads_server_and_raw")
    note = ("The engine alone: " + ", ".join(f"{num(v)} tok/s at batch {b}"
                                             for b, v in raw.items())
            + (f" ({threads} torch thread{'s' if threads != 1 else ''})" if threads else ""))
    if "raw_decode_tok_s_all_cores_spinning_32" in d:
        note += (f"; {num(d['raw_decode_tok_s_all_cores_spinning_32'])} at batch 32 with every "
                 "core and spinning OpenMP threads")
    if "process_over_thread_at_32" in d:  # results before --compare
        note += (f". The process serves {times(d['process_over_thread_at_32'])} the thread's "
                 "tokens at 32 streams")
    if "first_over_second_at_32" in d:
        o = d["first_over_second_at_32"]
        note += (f". At 32 streams the {MODES.get(o['first'], o['first'])} serves "
                 f"{times(o['ratio'])} the tokens of the {MODES.get(o['second'], o['second'])}")
    return [caption(res, section) + table(["concurrency", *map(str, levels)], body),
            table(["ratio", *(MODES.get(m, m) for m in d["ratios"]), "goal"], ratios),
            para(note + ".")]


def serving_placement(res: Result, section: list[Result]) -> list[str]:
    d = res.data
    levels = sorted({c for by_level in d["served_tok_s"].values() for c in by_level}, key=int)
    cells: dict[str, dict[int, str]] = {}  # config -> round -> "tok/s / tok/s"
    for key, by_level in d["served_tok_s"].items():
        m = re.fullmatch(r"(.+)_round(\d+)", key)
        if not m:
            raise ResultsError(f"{res.path}: served_tok_s key {key!r} is not CONFIG_roundN")
        cells.setdefault(m[1], {})[int(m[2])] = " / ".join(
            num(by_level[c]) if c in by_level else "-" for c in levels)
    rounds = sorted({r for by_round in cells.values() for r in by_round})
    body = [[d["configs"].get(name, name), *(by_round.get(r, "") for r in rounds)]
            for name, by_round in cells.items()]
    header = ["engine core", *(f"round {r}, tok/s at {' / '.join(levels)} streams"
                               for r in rounds)]
    return [caption(res, section) + table(header, body)]


def bench_serving(results: list[Result]) -> list[Section]:
    sweeps = [r for r in results if "sweep" in r.data]
    placements = [r for r in results if "runs" in r.data]
    for r in results:
        if r not in sweeps and r not in placements:
            raise ResultsError(f"{r.path}: a bench_serving result with neither 'sweep' nor 'runs'")
    sections = []
    if sweeps:
        sections.append(Section(
            "Served throughput against the engine alone (`bench_serving.py`)",
            "Two `ecserve serve` on the default model that differ in one setting (the engine "
            "core's place: its own process or a thread; its decode step: compiled or eager; its "
            "OpenMP threads: spinning or passive), loaded by `ecserve bench`'s closed loop at each "
            "concurrency, interleaved (each request 16 prompt tokens and `output_len` new ones, "
            "the client on the same machine); the engine alone steps a full batch with the same "
            "torch threads beside the levels of batch 1 and 32. Output tok/s is over each "
            "level's whole run, prefill and ramp included.",
            sweeps, [b for r in sweeps for b in serving_sweep(r, sweeps)],
            [Plot(name, PLOTS[name])  # where the docs show them, when they are there
             for name in ("loadtest_throughput.png", "loadtest_latency_cdf.png")]))
    if placements:
        what = "; ".join(dict.fromkeys(str(r.data.get("what", "")) for r in placements))
        sections.append(Section(
            "Where the engine core's threads go (`bench_serving.py`)",
            f"Served output tok/s with the engine core in its own process, per torch thread "
            f"count and pinning ({what}).",
            placements, [b for r in placements for b in serving_placement(r, placements)]))
    return sections


def http_api(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        s, parts = res.data["summary"], []
        if "http_over_grpc_tok_s_at_32" in s:
            parts.append(table(
                ["protocol", "output tok/s, 1 stream", "32 streams", "median TTFT, 1 stream",
                 "32 streams"],
                [[name, num(s[f"{p}_tok_s_at_1"]), num(s[f"{p}_tok_s_at_32"]),
                  f"{s[f'{p}_median_ttft_ms_at_1']:.1f} ms",
                  f"{s[f'{p}_median_ttft_ms_at_32']:.1f} ms"]
                 for p, name in (("grpc", "gRPC"), ("http", "HTTP API"))]))
            parts.append(para(
                f"HTTP / gRPC output tok/s at 32 streams: "
                f"{times(s['http_over_grpc_tok_s_at_32'], 3)} (goal >= 0.95); HTTP - gRPC "
                f"median TTFT at 1 stream: {s['http_minus_grpc_ttft_ms_at_1']:+.2f} ms (goal "
                "within 2 ms)."))
        if "guidellm_tok_s" in s:
            w = res.data["config"]["guidellm_workload"]
            parts.append(table(
                ["load generator", "output tok/s", "its tok/s / the server's view",
                 "server's mean request latency"],
                [[name, num(s[f"{key}_tok_s"]), times(s[f"{key}_over_server_view"], 3),
                  f"{s[f'server_mean_e2e_ms_under_{key}']:.0f} ms"]
                 for key, name in (("guidellm", "guidellm"),
                                   ("ecserve_bench_http", "`ecserve bench --protocol http`"))]))
            parts.append(para(
                f"The same workload ({w['concurrency']} streams, {w['requests']} requests, "
                f"{w['prompt_tokens']}-token prompts, {w['output_tokens']} tokens out): "
                f"guidellm / ecserve bench = {times(s['guidellm_over_ecserve_bench'], 3)} (goal "
                "within 10%). \"The server's view\" is streams x tokens / the server's own mean "
                "request latency over that run (its /metrics)."))
        blocks.append(caption(res, results) + "\n\n".join(parts))
    what = (
        "One `ecserve serve` (the engine core in its own process) loaded over gRPC and over the "
        "OpenAI-compatible HTTP API in turn by `ecserve bench`'s closed loop (16 prompt tokens, "
        "`output_len` new ones; the order alternating each round; medians over rounds), and "
        "guidellm against `ecserve bench --protocol http` on one workload (sampled at "
        "temperature 1, as guidellm's requests are), alternating, after one untimed run of "
        "each. The load generators run on the server's machine; with `--split-cpus` the "
        "server on one CPU and they on the others.")
    return [Section("The HTTP API against gRPC, and guidellm (`bench_http_api.py`)", what,
                    results, blocks)]


def start(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        d = res.data
        s = d["summary"]
        rows = [[v, f"{s['median_s'][v]:.1f} s",
                 ", ".join(f"{x:.1f}" for x in d["seconds"][v]),
                 f"{s['median_compile_s'][v]:.1f} s" if v in s["median_compile_s"] else ""]
                for v in d["config"]["variants"]]
        blocks.append(caption(res, results) + table(
            ["start", "median to SERVING", "each round (s)", "compiling the decode step"], rows)
            + "\n\n" + para(
                f"The compiled step's warm start over the eager one: "
                f"{s['warm_minus_eager_s']:+.1f} s (goal: at most +15 s); its cold start (the "
                f"CPU ops built, inductor's cache empty): {s['cold_minus_eager_s']:+.1f} s."))
    what = (
        "Seconds from spawning `ecserve serve` (the default model, the engine core in its own "
        "process) to health SERVING: with nothing cached (the CPU ops built and the decode "
        "step compiled, as a new machine or container), with inductor's cache empty, with it "
        "warm (a restart), and with `--decode eager`; one of each per round, in that order.")
    return [Section("Start-up time (`bench_start.py`)", what, results, blocks)]


def prefix_cache(results: list[Result]) -> list[Section]:
    rows = []
    for res in results:
        c, s = res.data["config"], res.data["summary"]
        rows.append([
            f"{c['concurrency']} streams", num(s["output_tok_s"]["cached"]),
            num(s["output_tok_s"]["uncached"]), times(s["tok_s_cached_over_uncached"]),
            f"{num(s['ttft_p50_ms']['cached'])} / {num(s['ttft_p50_ms']['uncached'])} ms",
            f"{s['ttft_p50_cached_over_uncached']:.2f}", f"{s['hit_rate_tokens']:.1%}"])
    c = results[0].data["config"]
    what = (
        f"One server with prefix caching (the default) and one with `--no-prefix-caching`, the "
        f"default model, loaded in turn by `ecserve bench`'s closed loop: {c['requests']} "
        f"requests, one shared prefix of {c['prefix_len']} tokens, then {c['suffix_len']} of "
        f"each request's own, {c['output_len']} tokens out, one warm-up request first; medians "
        "over rounds. Goals: TTFT p50 cached / uncached <= 0.3, output tok/s >= 2x. The hit "
        "rate (tokens, warm-up included) is the cached server's.")
    return [Section("Prefix caching (`bench_prefix_cache.py`)", what, results, [
        table(["load", "output tok/s, cached", "uncached", "cached / uncached",
               "TTFT p50, cached / uncached", "TTFT ratio", "hit rate"], rows)])]


def kv_on_demand(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        c, s = res.data["config"], res.data["summary"]
        m = s["median"]
        blocks.append(caption(res, results) + table(
            ["KV blocks", "output tok/s", "running per step: median / mean / max",
             "preemptions, each round"],
            [[name, num(m[name]["tok_s"]),
              f"{m[name]['median_running']:.0f} / {m[name]['mean_running']:.1f} / "
              f"{m[name]['max_running']:.0f}",
              ", ".join(str(r["preemptions"]) for r in res.data["runs"][name])]
             for name in ("on demand", "up front")])
            + "\n\n" + para(
                f"On demand / up front: {times(s['running_on_demand_over_up_front'], 1)} the "
                f"running sequences, median over steps (goal >= 4x; the mean: "
                f"{times(s['mean_running_on_demand_over_up_front'], 1)}), "
                f"{times(s['tok_s_on_demand_over_up_front'])} "
                f"the tokens (goal >= 2x); outputs {s['output_len']['min']}-"
                f"{s['output_len']['max']} tokens (median {s['output_len']['median']:.0f}) of "
                f"max_new_tokens up to {c['max_model_len']} - prompt, every one equal to an "
                "unconstrained engine's."))
    c = results[0].data["config"]
    what = (
        f"The default model (float32) with a KV cache of {c['blocks']} blocks of "
        f"{c['block_size']} tokens: {c['requests']} code prompts queued at once, each asking "
        f"for all the context leaves but stopping at the first space or newline after "
        f"{c['min_new_tokens']} tokens; one engine giving blocks on demand (the default), one "
        "reserving prompt + max_new_tokens at admission (`--no-kv-blocks-on-demand`), in turn, "
        "medians over rounds; the running sequences are averaged over steps.")
    return [Section("KV blocks on demand (`bench_kv_on_demand.py`)", what, results, blocks)]


SOAK_KINDS = {"complete": "read to the end", "cancel": "cancel after a few tokens",
              "deadline": "a deadline of 0.05-2 s", "slow": "read slowly"}
SOAK_PROCESSES = {"process_resident_memory_bytes": "front end",
                  "ecserve_engine_core_process_resident_memory_bytes": "engine core"}


def mib(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:,.0f} MiB"


def soak_blocks(res: Result, section: list[Result]) -> list[str]:
    d = res.data
    cfg = d.get("config", {})
    statuses = sorted(d["statuses"].items(), key=lambda kv: (-kv[1], kv[0]))
    memory = [[SOAK_PROCESSES.get(name, name), mib(v["at_a_tenth"]), mib(v["at_end"]),
               f"{v['at_end'] / v['at_a_tenth'] - 1:+.1%}"
               if v["at_a_tenth"] and v["at_end"] else ""] for name, v in d["rss"].items()]
    prefix, n = cfg.get("shared_prefix_len", 0), cfg.get("num_prefixes", 0)
    prompt = (f"one of {n} shared {prefix}-token prefixes + {cfg.get('prompt_len')} random"
              if prefix and n else f"{cfg.get('prompt_len')}")
    summary = (
        f"Capacity {d['capacity_req_s']:.1f} req/s ({prompt} prompt + "
        f"{cfg.get('output_len')} new tokens); {d['rate_req_s']:.1f} req/s sent for "
        f"{cfg.get('duration', 0):.0f} s, {num(sum(d['statuses'].values()))} calls; "
        f"{num(d['skipped_at_max_in_flight'])} arrivals skipped at the in-flight cap "
        f"({cfg.get('max_in_flight')}); every call settled {d['settle_seconds']:.1f} s after "
        f"the load stopped; the server's exit code after SIGTERM: {d['server_exit_code']}.")
    end = d["metrics_at_end"]
    if "ecserve_prefix_cache_queries_total" in end:
        hits, queries = end["ecserve_prefix_cache_hits_total"], end[
            "ecserve_prefix_cache_queries_total"]
        summary += (
            f" Prefix cache: {num(hits)} of {num(queries)} prompt tokens looked up were hits "
            f"({hits / queries:.1%}); at the end {num(end['ecserve_kv_cache_blocks_used'])} "
            f"KV blocks in use, {num(end['ecserve_kv_cache_blocks_cached'])} of "
            f"{num(end['ecserve_kv_cache_capacity_blocks'])} cached, "
            f"{num(end['ecserve_kv_cache_blocks_evictable'])} of them evictable; "
            f"{num(end['ecserve_preemptions_total'])} preemptions.")
    return [caption(res, section) + para(summary),
            table(["client behaviour", "calls sent"],
                  [[SOAK_KINDS.get(k, k), num(v)] for k, v in d["sent"].items()]),
            table(["status", "calls"], [[k, num(v)] for k, v in statuses]),
            table(["process", "resident memory a tenth in", "at the end", "change"], memory),
            table(["check", "result"],
                  [[k, "passed" if ok else "FAILED"] for k, ok in d["checks"].items()])]


def soak(results: list[Result]) -> list[Section]:
    what = (
        "`ecserve serve` measured for its capacity (a closed loop at 32 streams), then held at "
        "twice that rate (open loop) with clients that misbehave: 55% read to the end, 15% "
        "cancel after a few tokens, 15% carry a deadline of 0.05-2 s, 15% read slowly (50 ms "
        "between messages), at most `max_in_flight` calls in flight. After the load: the calls "
        "per status, the scraped KV blocks in use and requests running (both must be 0; "
        "prefix-cached blocks stay, evictable) and the prefix cache's hits, both "
        "processes' resident memory against a sample a tenth into the run, and SIGTERM.")
    return [Section("Soak (`soak.py`)", what, results,
                    [b for r in results for b in soak_blocks(r, results)])]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def moe_layer(results: list[Result]) -> list[Section]:
    header = ["group", "batched layer", "per-expert loop", "dense GEMM, same FLOPs",
              "read weights once", "layer / dense", "loop / batched"]
    blocks = []
    for res in results:
        body = [[f"{num(c['group_tokens'])} tokens, k = {c['capacity_k']}",
                 *(ms(c["median_s"][k]) for k in ("batched_ec_layer", "per_expert_loop",
                                                   "dense_gemm_equal_flops",
                                                   "stream_expert_weights")),
                 times(c["layer_over_dense_gemm"]), times(c["loop_over_batched"])]
                for c in res.data["cases"]]
        blocks.append(caption(res, results) + table(header, body))
    what = (
        "One MoE layer (policy `ec`) timed interleaved in one process, medians: the batched "
        "layer, a per-expert Python loop, a dense GLU GEMM of the same FLOPs (the machine's own "
        "limit) and a pass reading every expert weight once (the floor for small, memory-bound "
        "groups), at a prefill-sized group and a decode-sized one.")
    return [Section("The MoE layer (`bench_moe_layer.py`)", what, results, blocks)]


def expert_timing(results: list[Result]) -> list[Section]:
    blocks = [caption(res, results) + table(
        ["expert timing", "run time", "ratio to off"],
        [[name, f"{num(row['median_s'] * 1e3)} ms", times(row["ratio_to_off"], 3)]
         for name, row in res.data["rows"].items()]) for res in results]
    what = (
        "The cost of the sampled per-expert latency metric (`--expert-timing-every`): the "
        "engine's run time on one workload with expert timing off, every 64th step (the "
        "default) and every step, interleaved, medians.")
    return [Section("Per-expert timing (`bench_expert_timing.py`)", what, results, blocks)]


def vs_transformers(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        d = res.data
        walls = d["wall_s_all_rounds"]
        base = d.get("baseline") or next(k for k in walls if k.startswith("transformers"))
        body = [[name, f"{min(w):.2f} ({statistics.median(w):.2f})",
                 f"{d['output_tokens_per_s'][name]:,.1f}", times(min(walls[base]) / min(w))]
                for name, w in walls.items()]
        step = d["step_ms"]
        blocks += [caption(res, results) + table(
                       ["engine", "wall s", "output tok/s", "vs transformers"], body),
                   para(f"Expert choice against token choice at the same active compute (the "
                        f"same weights, `ec` with c = 2 against top-2, one 512-token prefill "
                        f"step): {step['ec']:.0f} ms against {step['token_choice']:.0f} ms, "
                        f"{times(d['ec_over_token_choice_step'])}.")]
    what = (
        "The same Mixtral-type weights served by ecserve offline, by ecserve over gRPC and by "
        "transformers' `generate` in fixed batches, one greedy workload of mixed prompt and "
        "output lengths; best of interleaved rounds, median in brackets.")
    return [Section("Against transformers (`bench_vs_transformers.py`)", what, results, blocks)]


def rows_per_step(v: float) -> str:
    return "0" if v == 0 else f"{v:.1f}"


def expert_parallel(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        rows = res.data["rows"]
        same = all(r["counted_tokens_per_step"] == r["predicted_tokens_per_step"] for r in rows)
        cross = ("cross-device rows/step (counted = predicted)" if same
                 else "cross-device rows/step, counted (predicted)")
        body = [[f"{r['ranks']}" + (" (oversubscribed)" if r.get("oversubscribed") else ""),
                 "one process" if r["placement"] == "single process" else r["placement"],
                 rows_per_step(r["counted_tokens_per_step"]) + (
                     "" if same else f" ({rows_per_step(r['predicted_tokens_per_step'])})"),
                 rows_per_step(r["predicted_dedup_tokens_per_step"]),
                 f"{r['median_step_ms']:.1f}", num(r["tokens_per_s"])] for r in rows]
        blocks.append(caption(res, results) + table(
            ["ranks", "placement", cross, "planner's dedup figure", "median step ms",
             "tokens/s"], body))
    what = (
        "One workload in one process and over local ranks (torch.distributed), the balanced "
        "placement against the affinity plan made from that workload's routing: the token rows "
        "each step "
        "sends across devices, counted by the executor and predicted by the planner (and what "
        "a sender that deduplicated a token per device would send), rank 0's median step time "
        "and generated tokens/s. On a CPU the step time measures the exchange's overhead.")
    return [Section("Expert parallelism (`bench_expert_parallel.py`)", what, results, blocks)]


BUCKETS = ("0", "1", "2", "3-4", "5+")


def policy_label(row: dict[str, Any]) -> str:
    if row["scope"] == "training":
        return "reference (training grouping)"
    head, _, rest = row["policy"].partition(" ")
    if head in ("ec", "capped", "threshold"):
        head = f"`{head}`"
    return " ".join(p for p in (head, re.sub(r"b=(\w+)", r"b = \1", rest)) if p)


def decode_policies(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        body = [[policy_label(r), "" if r["scope"] == "training" else r["scope"], str(r["live"]),
                 f"{r['nats_per_token']:.4f}",
                 "" if r["scope"] == "training" else f"{r['delta_pct']:+.2f}%",
                 " / ".join(f"{100 * r['experts_per_token'][b]:.1f}" for b in BUCKETS) + "%"
                 if r.get("experts_per_token") else "",
                 f"{r['mean_experts']:.2f}" if r.get("mean_experts") is not None else "",
                 num(r["decode_tok_s"]) if r.get("decode_tok_s") else ""]
                for r in res.data["rows"]]
        blocks.append(caption(res, results) + table(
            ["policy", "scope", "B", "nats/token", "vs reference",
             "experts per token: " + " / ".join(BUCKETS), "mean", "decode tok/s"], body))
    what = (
        "Held-out loss of a trained model (the first validation windows of its corpus) through "
        "the engine's own step path with `prompt_logprobs`, one token per sequence per step: "
        "with B live sequences in lock-step each step is the routing group a batch-scope decode "
        "step of B sequences forms. The reference is the training grouping, by a direct model "
        "call. Sequence scope routes each token as a group of one, whatever B. Decode tok/s: B "
        "sequences after a 16-token prompt, median step.")
    return [Section("What each decode policy costs (`bench_decode_policies.py`)", what, results,
                    blocks)]


def relative(v: float, ref: float, first: bool) -> str:
    return "" if first else f" ({100 * (v / ref - 1):+.1f}%)"


def seed_claim(results: list[Result]) -> list[Section]:
    blocks, plots = [], []
    for res in results:
        models = res.data["models"]
        ref = next(iter(models.values()))  # the differences in brackets are against it
        streams = list(ref["decode_tok_s"])
        live = res.data.get("config", {}).get("served_live", 32)
        body = []
        for i, (name, m) in enumerate(models.items()):
            p, h = m["parameters"], m["held_out"]
            body.append([
                f"{name} (`{m['policy']}` served)",
                f"{p['total'] / 1e6:.1f}M ({p['active_per_token'] / 1e6:.1f}M)",
                f"{h['nats_per_token']:.4f}"
                + relative(h["nats_per_token"], ref["held_out"]["nats_per_token"], i == 0),
                f"{h['bits_per_byte']:.4f}",
                f"{m['served_nll_32']:.4f}"
                + relative(m["served_nll_32"], ref["served_nll_32"], i == 0),
                num(m["train_tok_s_median_step"]),
                *(num(m["decode_tok_s"][s]) for s in streams)])
        blocks.append(caption(res, results) + table(
            ["model", "parameters (active)", "held-out nats/token", "bits/byte",
             f"served at {live} sequences", "training tok/s",
             *(f"decode tok/s, {s} stream{'s' if s != '1' else ''}" for s in streams)], body))
        plots += [Plot(Path(p).name, PLOTS.get(Path(p).name, f"A plot of `{res.name}`"),
                       res.path) for p in res.data.get("plots", [])]
    what = (
        "Models trained by the same recipe on the same token budget (`ecserve train --preset "
        "...`), then served by the offline engine: held-out loss under each model's training "
        "routing, the same scored at B live sequences with the model's own serving policy "
        "(in brackets: against the first model), training tok/s at the median step, and decode "
        "tok/s (16-token prompts, 64 new tokens, median pure-decode step over interleaved "
        "rounds).")
    return [Section("The seed paper's claim, at small scale (`bench_seed_claim.py`)", what,
                    results, blocks, plots)]


def kernel_shape(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def kernels(results: list[Result]) -> list[Section]:
    blocks = []
    for res in results:
        d = res.data
        ops = [r for r in d["results"] if r["op"] != "decode_step"]
        steps = [r for r in d["results"] if r["op"] == "decode_step"]
        note = d.get("note", "")
        blocks.append(caption(res, results) + para(note + ("." if note[-1:] not in ".!" else "")))
        blocks.append(table(["op", "implementation", "shape", "ms", "TFLOP/s", "GB/s"], [
            [r["op"], r["impl"], kernel_shape(r["shape"]), f"{r['ms']:.3f}",
             f"{r['tflops']:.3f}" if "tflops" in r else "",
             f"{r['gbps']:,.2f}" if "gbps" in r else ""] for r in ops]))
        if steps:
            blocks.append(table(
                ["decode step: sequences", "context", "eager ms", "graph ms", "floor ms",
                 "floor / eager", "floor / graph", "graph speedup"],
                [[str(r["sequences"]), str(r["context"]), f"{r['eager_ms']:.3f}",
                  f"{r['graph_ms']:.3f}", f"{r['floor_ms']:.3f}", f"{r['floor_over_eager']:.3f}",
                  f"{r['floor_over_graph']:.3f}", times(r["graph_speedup"])] for r in steps]))
        blocks.append(table(["ratio", "value", "goal"], [
            [name, "null (needs a GPU)" if v is None else f"{v:.3f}",
             d.get("goals", {}).get(name, "")] for name, v in d["ratios"].items()]))
    what = (
        "Each Triton kernel against its plain-torch twin (TFLOP/s or GB/s), and three ratios: "
        "the fused expert kernel over a cuBLAS bmm chain of equal FLOPs at prefill shapes, "
        "decode-step expert weight bandwidth over the device's copy bandwidth, and the "
        "expert-choice layer's step time over a top-2 token-choice layer; on a GPU also the "
        "whole decode step, eager and replayed from a CUDA graph, against the bandwidth floor. "
        "On a CPU only the twins are timed and the ratios are null.")
    return [Section("Kernels (`bench_kernels.py`)", what, results, blocks)]


# In the docs' order; each renders every file of its benchmark.
RENDERERS: dict[str, Renderer] = {
    "bench_decode_policies": decode_policies,
    "bench_seed_claim": seed_claim,
    "soak": soak,
    "bench_serving": bench_serving,
    "bench_http_api": http_api,
    "bench_start": start,
    "bench_prefix_cache": prefix_cache,
    "bench_kv_on_demand": kv_on_demand,
    "bench_expert_timing": expert_timing,
    "bench_expert_parallel": expert_parallel,
    "bench_vs_transformers": vs_transformers,
    "bench_decode_floor": decode_floor,
    "bench_vs_llama_cpp": vs_llama_cpp,
    "bench_moe_layer": moe_layer,
    "bench_kernels": kernels,
}

# ---- the page -----------------------------------------------------------------------------------

def load(path: Path) -> Result:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: not a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ResultsError(f"{path}: no {', '.join(missing)}; every results JSON needs "
                           f"{', '.join(REQUIRED)} (bench/provenance.py writes them)")
    if not isinstance(data["date"], str) or not DATE.fullmatch(data["date"]):
        raise ResultsError(f"{path}: date {data['date']!r} is not YYYY-MM-DD")
    if data["benchmark"] not in RENDERERS:
        raise ResultsError(f"{path}: no renderer for benchmark {data['benchmark']!r} in "
                           f"bench/tables.py (it has {', '.join(sorted(RENDERERS))})")
    return Result(path, data)


def render_section(s: Section) -> str:
    parts = [f"## {s.title}", para(s.what), *(provenance(r) for r in s.results), *s.blocks]
    return "\n\n".join(parts + [image(p.file, p.caption) for p in s.plots])


def image(file: str, caption: str) -> str:
    return f"![{Path(file).stem}]({LINK}/{file})\n\n{para(caption + '.')}"


def claim_plots(sections: list[Section], results_dir: Path) -> None:
    """Keep the plots that are there; a plot a results file names must be."""
    for s in sections:
        for p in s.plots:
            if p.named_by and not (results_dir / p.file).is_file():
                raise ResultsError(f"{p.named_by}: names the plot {p.file}, which is not in "
                                   f"{results_dir}")
        s.plots = [p for p in s.plots if (results_dir / p.file).is_file()]


def leftover_plots(sections: list[Section], results_dir: Path) -> str:
    claimed = {p.file for s in sections for p in s.plots}
    rest = [p.name for p in sorted(results_dir.glob("*.png")) if p.name not in claimed]
    if not rest:
        return ""
    return "\n\n".join(["## Plots without a results file",
                        "These plots are in `bench/results` but no results file there has them."]
                       + [image(n, PLOTS.get(n, n)) for n in rest])


def render(results_dir: Path) -> str:
    """The Markdown of docs/benchmarks.md from the JSON files (and plots) in results_dir."""
    results = [load(p) for p in sorted(results_dir.glob("*.json"))]
    sections = []
    for benchmark, renderer in RENDERERS.items():
        mine = [r for r in results if r.data["benchmark"] == benchmark]
        if mine:
            try:
                sections += renderer(mine)
            except ResultsError:
                raise
            except Exception as e:  # a file not shaped as the renderer expects
                names = ", ".join(str(r.path) for r in mine)
                raise ResultsError(f"{names}: cannot render {benchmark} ({e!r})") from e
    claim_plots(sections, results_dir)
    parts = [HEADER, *(render_section(s) for s in sections), leftover_plots(sections, results_dir)]
    return "\n\n".join(p for p in parts if p) + "\n"

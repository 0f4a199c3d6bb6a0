"""bench/tables.py: docs/benchmarks.md from bench/results/*.json, and bench/provenance.py's stamp.

The committed results render (twice identically), and so do the small runs of every bench
script in tests/data/bench_tables (two of them code-derived: see its README); every table has
one row per item of the data it renders; a file the page cannot render is an error naming it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import provenance
import tables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIXTURES = ROOT / "tests" / "data" / "bench_tables"

Data = dict[str, Any]
SERVING_RATIOS = {"served_over_raw_at_32", "served_over_raw_all_cores_at_32", "scaling_32_over_1"}


def sweep_rows(d: Data) -> list[int]:
    """Two rows per engine-core placement (tok/s, ITL); the goal ratios it has."""
    return [2 * len(d["sweep"]), len(SERVING_RATIOS & {k for r in d["ratios"].values() for k in r})]


def kernel_rows(d: Data) -> list[int]:
    steps = sum(r["op"] == "decode_step" for r in d["results"])
    return [len(d["results"]) - steps, *([steps] if steps else []), len(d["ratios"])]


# Section title fragment -> (benchmark, which of its files, the row count of each table there).
EXPECTED: dict[str, tuple[str, Callable[[Data], bool], Callable[[list[Data]], list[int]]]] = {
    "(`bench_decode_policies.py`)": (
        "bench_decode_policies", lambda d: True, lambda ds: [len(d["rows"]) for d in ds]),
    "(`bench_seed_claim.py`)": (
        "bench_seed_claim", lambda d: True, lambda ds: [len(d["models"]) for d in ds]),
    "(`soak.py`)": ("soak", lambda d: True, lambda ds: [
        n for d in ds for n in (len(d["sent"]), len(d["statuses"]), len(d["rss"]),
                                len(d["checks"]))]),
    "Served throughput": ("bench_serving", lambda d: "sweep" in d,
                          lambda ds: [n for d in ds for n in sweep_rows(d)]),
    "Where the engine core's threads go": ("bench_serving", lambda d: "runs" in d, lambda ds: [
        len({k.rsplit("_round", 1)[0] for k in d["served_tok_s"]}) for d in ds]),
    "(`bench_expert_timing.py`)": (
        "bench_expert_timing", lambda d: True, lambda ds: [len(d["rows"]) for d in ds]),
    "(`bench_expert_parallel.py`)": (
        "bench_expert_parallel", lambda d: True, lambda ds: [len(d["rows"]) for d in ds]),
    "(`bench_vs_transformers.py`)": (
        "bench_vs_transformers", lambda d: True,
        lambda ds: [len(d["wall_s_all_rounds"]) for d in ds]),
    "(`bench_decode_floor.py`)": ("bench_decode_floor", lambda d: True, lambda ds: [
        len({(i, r["model"], r["dtype"], r.get("path", "torch"))
             for i, d in enumerate(ds) for r in d["rows"]})]),
    "(`bench_vs_llama_cpp.py`)": ("bench_vs_llama_cpp", lambda d: True, lambda ds: [
        len({(i, r["workload"], r.get("path")) for i, d in enumerate(ds) for r in d["rows"]
             if r["engine"] == "ecserve"})]),
    "(`bench_moe_layer.py`)": (
        "bench_moe_layer", lambda d: True, lambda ds: [len(d["cases"]) for d in ds]),
    "(`bench_kernels.py`)": (
        "bench_kernels", lambda d: True, lambda ds: [n for d in ds for n in kernel_rows(d)]),
    "(`bench_kv_on_demand.py`)": ("bench_kv_on_demand", lambda d: True,
                                  lambda ds: [2 for _ in ds]),
    "(`bench_prefix_cache.py`)": ("bench_prefix_cache", lambda d: True, lambda ds: [len(ds)]),
    "(`bench_start.py`)": (
        "bench_start", lambda d: True, lambda ds: [len(d["config"]["variants"]) for d in ds]),
    "(`bench_http_api.py`)": ("bench_http_api", lambda d: True, lambda ds: [
        n for d in ds for n in ([2] if "http_tok_s_at_32" in d["summary"] else [])
        + ([2] if "guidellm_tok_s" in d["summary"] else [])]),
}


def sections(page: str) -> dict[str, str]:
    """Title -> body of each ## section."""
    parts = re.split(r"^## (.+)$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def tables_in(body: str) -> list[list[list[str]]]:
    """Each Markdown table of a section: its rows (header and separator left out), as cells."""
    out, current = [], None
    for line in body.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                out.append(current)
            current.append(re.split(r"(?<!\\)\|", line.strip())[1:-1])
        else:
            current = None
    for t in out:
        assert all(len(row) == len(t[0]) for row in t), t  # every row as wide as the header
        assert set("".join(t[1])) <= set("-"), t  # the separator
    return [t[2:] for t in out]


def check_row_counts(results_dir: Path) -> set[str]:
    """Every table of every section has one row per item of its data; the benchmarks seen."""
    page = tables.render(results_dir)
    datas = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    seen = set()
    for title, body in sections(page).items():
        if title == "Plots without a results file":
            continue
        (benchmark, which, counts), = [v for k, v in EXPECTED.items() if k in title]
        mine = [d for d in datas if d["benchmark"] == benchmark and which(d)]
        assert [len(t) for t in tables_in(body)] == counts(mine), title
        seen.add(benchmark)
    return seen


@pytest.fixture
def fixtures(tmp_path: Path) -> Path:
    """tests/data/bench_tables with the plot its seed-claim run names."""
    shutil.copytree(FIXTURES, tmp_path / "results")
    shutil.copy(RESULTS / "training_curves.png", tmp_path / "results")
    return tmp_path / "results"


def write(path: Path, data: Data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_the_committed_results_render_the_same_twice() -> None:
    page = tables.render(RESULTS)
    assert page == tables.render(RESULTS)
    assert page.startswith("# Benchmarks\n\n") and "python docs/generate.py" in page
    for path in RESULTS.glob("*.json"):
        data = json.loads(path.read_text())
        assert f"`bench/results/{path.name}`, dated {data['date']}" in page
        assert tables.machine_of(data), path  # something of the machine, where it was recorded
    for png in RESULTS.glob("*.png"):
        assert f"](../bench/results/{png.name})" in page


def test_the_committed_results_have_one_row_per_item() -> None:
    assert check_row_counts(RESULTS) == {json.loads(p.read_text())["benchmark"]
                                         for p in RESULTS.glob("*.json")}


def test_every_script_s_json_renders_with_one_row_per_item(fixtures: Path) -> None:
    assert check_row_counts(fixtures) == set(tables.RENDERERS)
    page = tables.render(fixtures)
    assert page == tables.render(fixtures)
    assert "![training_curves](../bench/results/training_curves.png)" in page
    assert "Plots without a results file" not in page  # the seed claim's run claims it


def test_the_committed_figures_as_the_readme_formats_them() -> None:
    page = tables.render(RESULTS)
    assert ("| default, float32, compiled | 4.9x | 7.5x | 8.8x | 350 / 875 / 1,983 | "
            "2.26x / 2.19x / 1.86x |") in page
    assert ("| 16 parallel | 541 | 609 | 796 | 669 | 0.68 | 0.76 | 16/16 sequences identical |"
            in page)
    assert ("| engine-core process: output tok/s | 92 | 178 | 354 | 539 | 730 | 1,186 | 1,548 |"
            in page)
    assert "| served(32) / served(1) | 12.9x | 9.3x | >= 12x |" in page
    assert "| front end | 273 MiB | 269 MiB | -1.5% |" in page
    assert "| OK | 22,871 |" in page
    assert "prompt tokens looked up were hits (74.9%)" in page
    assert "GOMP_SPINCOUNT=100000 python bench/bench_decode_floor.py" in page


def test_an_unknown_benchmark_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path / "new_thing.json", {"benchmark": "bench_new_thing", "command": "python x",
                                        "date": "2026-12-01"})
    with pytest.raises(tables.ResultsError, match=r"new_thing\.json.*'bench_new_thing'"):
        tables.render(tmp_path)


@pytest.mark.parametrize("key", ["date", "benchmark", "command"])
def test_a_file_without_its_provenance_is_an_error_naming_it(tmp_path: Path, key: str) -> None:
    data = json.loads((RESULTS / "soak.json").read_text())
    del data[key]
    write(tmp_path / "soak.json", data)
    with pytest.raises(tables.ResultsError, match=rf"soak\.json: no {key}"):
        tables.render(tmp_path)


def test_a_date_not_yyyy_mm_dd_is_an_error(tmp_path: Path) -> None:
    data = json.loads((RESULTS / "soak.json").read_text())
    write(tmp_path / "soak.json", {**data, "date": "27/11/2026"})
    with pytest.raises(tables.ResultsError, match=r"soak\.json: date '27/11/2026'"):
        tables.render(tmp_path)


def test_a_file_of_the_wrong_shape_is_an_error_naming_it(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "moe_layer.json").read_text())
    del data["cases"]
    write(tmp_path / "moe.json", data)
    with pytest.raises(tables.ResultsError, match=r"moe\.json: cannot render bench_moe_layer"):
        tables.render(tmp_path)


def test_plots(tmp_path: Path) -> None:
    """A plot a results file names must be there; one nobody names gets a section of its own."""
    shutil.copy(FIXTURES / "seed_claim.json", tmp_path)
    with pytest.raises(tables.ResultsError, match=r"seed_claim\.json: names the plot "
                                                  r"training_curves\.png"):
        tables.render(tmp_path)
    (tmp_path / "seed_claim.json").unlink()
    shutil.copy(RESULTS / "training_curves.png", tmp_path)
    page = tables.render(tmp_path)
    assert "## Plots without a results file" in page
    assert "![training_curves](../bench/results/training_curves.png)" in page


def test_stamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMP_SPINCOUNT", "100000")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the scripts' own: no prefix
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    s = provenance.stamp("/somewhere/bench/bench_x.py", ["--json", "a b.json"],
                         packages=("pytest", "not-installed-here"))
    assert s["benchmark"] == "bench_x"
    assert s["command"] == "GOMP_SPINCOUNT=100000 python bench/bench_x.py --json 'a b.json'"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(s["date"]))
    m = s["machine"]
    assert isinstance(m, dict)
    assert {"platform", "cpu", "cpus", "python", "torch", "pytest", "openmp"} <= set(m)
    assert "not_installed_here" not in m
    assert m["openmp"] == "OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=100000"

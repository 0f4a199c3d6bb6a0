"""bench/bench_kernels.py's decode-step section, run small: on a GPU with real graphs, on a CPU
over the static buffers under Triton's interpreter (no capture)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import importlib.util
import time
from pathlib import Path

import pytest

DEV = "cuda" if torch.cuda.is_available() else "cpu"

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"


def test_decode_step_rows():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(d=64, f=32, experts=4, capacity_factor=2.0, decode_layers=2,
                              decode_context=64, decode_tokens=3)
    calls = []

    def timer(fn):
        calls.append(fn)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = bench.bench_decode_step(timer, args, torch.float32, copy_bw=1e10, device=DEV,
                                   capture=DEV == "cuda")
    assert [r["sequences"] for r in rows] == [1, 3, 8] and len(calls) == 6
    for r in rows:
        assert r["floor_ms"] > 0 and r["eager_ms"] > 0 and r["graph_ms"] > 0
        assert r["graph_speedup"] == pytest.approx(r["eager_ms"] / r["graph_ms"])

"""bench/bench_decode_floor.py run small on the default model: its rows and its byte count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_decode_floor as floor


def test_rows_and_json(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    assert floor.main(["--models", "default", "--dtypes", "float32", "--batches", "2",
                       "--steps", "3", "--paths", "torch,cpu-ops", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    base, row = data["rows"]
    assert [r["path"] for r in (base, row)] == ["torch", "cpu-ops"]
    assert base["speedup"] == 1.0
    assert row["speedup"] == pytest.approx(base["step_ms"] / row["step_ms"])
    assert (row["model"], row["dtype"], row["batch"]) == ("default", "float32", 2)
    assert row["floor_ms"] > 0 and row["step_ms"] > 0 and row["read_gb_s"] > 0
    assert row["ratio"] == pytest.approx(row["step_ms"] / row["floor_ms"])
    assert 1 <= row["active_experts"] <= 8
    assert data["setup"]["threads"] >= 1


def test_step_bytes_counts_the_active_experts_and_the_kv() -> None:
    from ecserve.config import EngineConfig
    from ecserve.engine.engine import Engine
    from ecserve.model.default import default_model_dir
    from ecserve.types import Request, SamplingParams

    engine = Engine(default_model_dir(), EngineConfig(device="cpu", dtype="float32",
                                                      expert_timing_every=0))
    count = floor.StepBytes(engine.runner.model)
    model = engine.runner.model
    # Tied head: every weight is either fixed or one expert's.
    experts = sum(b * 8 for b in count.expert_bytes)
    assert model.lm_head is None and count.fixed + experts == count.total
    engine.add_request(Request("r", (1, 2, 3, 4, 5), SamplingParams(max_new_tokens=2)))
    engine.step()  # prefill: 5 positions cached
    step_bytes, kv, active = count(engine)
    stats = engine.last_stats
    assert stats is not None
    assert active == sum(int((m.tokens_per_expert > 0).sum()) for m in stats.moe)
    assert kv == 5 * count.kv_per_position
    assert step_bytes == count.fixed + kv + sum(
        int((m.tokens_per_expert > 0).sum()) * b
        for m, b in zip(stats.moe, count.expert_bytes, strict=True))

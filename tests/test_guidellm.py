"""guidellm (the vLLM project's serving benchmark, a recent release) against a local server's
OpenAI-compatible API, offline, with the model's own tokenizer directory: a short, bounded run
with no failed request and exactly the asked output lengths. In CI's test extra; elsewhere the
test skips without guidellm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving import ServerThread

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import default_model_dir

GUIDELLM = Path(sys.executable).with_name("guidellm")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not GUIDELLM.exists() and os.environ.get("CI") != "true",
    reason="needs guidellm (the test extra installs it)")]


def test_guidellm_runs_against_the_http_api_with_no_failure(tmp_path):
    out = tmp_path / "guidellm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with ServerThread(Engine(None, EngineConfig(device="cpu"))) as s:
        port = s.server.http_port
        run = subprocess.run(
            [str(GUIDELLM), "run",
             "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model=default,"
             "request_format=/v1/completions",
             "--profile", "kind=concurrent,streams=4",
             "--constraint", "kind=max_requests,count=16",
             "--constraint", "kind=max_duration,seconds=120",
             "--data", "kind=synthetic_text,prompt_tokens=48,output_tokens=24",
             "--tokenizer", f"kind=huggingface_auto,model={default_model_dir()}",
             "--output", f"kind=json,path={out}", "--disable-console"],
            env=env, capture_output=True, text=True, timeout=300)
        served = s.server.metrics.finished.labels("http", "length")._value.get()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bench = json.loads(out.read_text())["benchmarks"][0]
    totals = bench["metrics"]["request_totals"]
    assert totals["successful"] == 16 and totals["errored"] == 0, totals
    assert {r["output_tokens"] for r in bench["requests"]["successful"]} == {24}
    assert served == 16  # the server ran each to its length, as guidellm counted

"""`ecserve bench` / ecserve.loadtest against a real server (tiny model, loopback)."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from serving import ServerThread

from ecserve.cli import main
from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.loadtest import LoadTestConfig, LoadTestResult, run_load_test
from ecserve.model.default import write_model

VLLM_KEYS = ["completed", "failed", "duration", "total_input", "total_output",
             "request_throughput", "output_throughput", "total_token_throughput"] + [
    f"{s}_{n}_ms" for n in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90",
                                                                    "p99")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("loadtest") / "tiny",
                       ModelConfig.from_dict(tiny_config()), 0)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[ServerThread]:
    with ServerThread(Engine(model_dir, EngineConfig(device="cpu"))) as s:
        yield s


def cfg(server: ServerThread, **kw) -> LoadTestConfig:
    base = {"address": server.address, "input_len": 12, "output_len": 6, "num_requests": 12,
            "metrics_url": ""}
    return LoadTestConfig(**{**base, **kw})


def max_overlap(result: LoadTestResult) -> int:
    """Most requests in flight at once, from the records' own start and end times."""
    events = sorted([(r.start, 1) for r in result.requests] + [(r.end, -1) for r in
                                                               result.requests])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


def check_consistent(result: LoadTestResult) -> None:
    m = result.metrics
    assert result.sent == len(result.requests) == result.succeeded + result.failed
    assert m["completed"] == result.succeeded and m["failed"] == result.failed
    assert sum(result.errors.values()) == result.failed
    ok = [r for r in result.requests if r.success]
    samples = {"ttft": [r.ttft for r in ok], "e2el": [r.latency for r in ok],
               "itl": [g for r in ok for g in r.itl], "tpot": [r.tpot for r in ok if r.tpot]}
    for name, values in samples.items():
        if not values:
            continue
        ms = np.asarray(values) * 1000
        assert m[f"median_{name}_ms"] <= m[f"p90_{name}_ms"] <= m[f"p99_{name}_ms"]
        assert ms.min() - 1e-9 <= m[f"mean_{name}_ms"] <= ms.max() + 1e-9
        assert m[f"p99_{name}_ms"] <= ms.max() + 1e-9


def test_closed_loop(server):
    result = run_load_test(cfg(server, concurrency=3, warmup_requests=2), progress=False)
    check_consistent(result)
    m = result.metrics
    assert result.sent == 12 and m["completed"] == 12 and result.errors == {}
    assert m["total_input"] == 12 * 12 and m["total_output"] == 12 * 6  # exact lengths
    assert all(r.output_tokens == 6 and r.stop_reason == "STOP_REASON_MAX_TOKENS"
               for r in result.requests)
    assert result.max_in_flight == max_overlap(result) == 3  # the workers, never more
    assert m["output_throughput"] == pytest.approx(72 / m["duration"])
    assert 0 < m["mean_ttft_ms"] < m["mean_e2el_ms"]
    assert result.stopped_by == "num_requests" and set(VLLM_KEYS) <= set(m)
    assert result.model_info["vocab_size"] == 258


def http(server: ServerThread, **kw) -> LoadTestConfig:
    return cfg(server, protocol="http", address=f"127.0.0.1:{server.server.http_port}", **kw)


def test_the_same_workload_over_the_http_api(server):
    result = run_load_test(http(server, concurrency=3, warmup_requests=2), progress=False)
    check_consistent(result)
    m = result.metrics
    assert result.sent == 12 and m["completed"] == 12 and result.errors == {}
    assert m["total_input"] == 12 * 12 and m["total_output"] == 12 * 6  # counted by the usage
    assert all(r.output_tokens == 6 and r.stop_reason == "length" for r in result.requests)
    assert all(sum(r.chunk_tokens) == 6 for r in result.requests)
    assert result.max_in_flight == max_overlap(result) == 3
    assert 0 < m["mean_ttft_ms"] < m["mean_e2el_ms"]
    assert result.model_info["vocab_size"] == 258 and result.model_info["max_model_len"]


def test_http_cancels_after_the_drain_and_counts_refusals(server, model_dir):
    result = run_load_test(http(server, concurrency=2, num_requests=10_000, output_len=200,
                                duration=0.5, drain_timeout=0.0), progress=False)
    check_consistent(result)
    assert result.errors.get("CANCELLED", 0) >= 1
    server.wait_until(lambda: server.server.engine.num_live == 0, timeout=10)
    engine = Engine(model_dir, EngineConfig(device="cpu", max_num_seqs=1, max_waiting=1))
    with ServerThread(engine) as s:
        result = run_load_test(http(s, request_rate=math.inf, num_requests=20, output_len=20),
                               progress=False)
    check_consistent(result)
    assert set(result.errors) == {"HTTP_429"} and result.errors["HTTP_429"] >= 10


def test_open_loop_with_in_flight_cap(server):
    result = run_load_test(cfg(server, request_rate=math.inf, num_requests=16,
                               max_in_flight=4, input_len=None,
                               input_len_range=(4, 20)), progress=False)
    check_consistent(result)
    assert result.metrics["completed"] == 16
    assert result.max_in_flight == max_overlap(result) == 4  # the cap, reached and held
    assert result.metrics["total_input"] == sum(r.input_len for r in result.requests)
    assert {r.input_len for r in result.requests} <= set(range(4, 21))


def test_open_loop_poisson_stops_at_duration(server):
    t0 = time.monotonic()
    result = run_load_test(cfg(server, request_rate=20.0, num_requests=10_000, duration=1.0),
                           progress=False)
    check_consistent(result)
    assert result.stopped_by == "duration"
    assert 5 <= result.sent <= 60  # about 20 at 20 req/s for 1 s
    assert max(r.start for r in result.requests) < 1.2  # nothing sent after the deadline
    assert time.monotonic() - t0 < 10


def test_closed_loop_stops_at_duration_and_cancels_after_drain(server):
    result = run_load_test(cfg(server, concurrency=2, num_requests=10_000, output_len=200,
                               duration=0.5, drain_timeout=0.0), progress=False)
    check_consistent(result)
    assert result.stopped_by == "duration" and result.sent < 10_000
    assert result.errors.get("CANCELLED", 0) >= 1  # the ones still running at the deadline
    assert all(r.detail for r in result.requests if not r.success)


def test_full_queue_gives_resource_exhausted(model_dir):
    engine = Engine(model_dir, EngineConfig(device="cpu", max_num_seqs=1, max_waiting=1))
    with ServerThread(engine) as s:
        result = run_load_test(cfg(s, request_rate=math.inf, num_requests=20, output_len=20),
                               progress=False)
    check_consistent(result)
    assert result.errors.get("RESOURCE_EXHAUSTED", 0) >= 10
    assert set(result.errors) == {"RESOURCE_EXHAUSTED"}
    assert result.metrics["completed"] >= 1
    assert result.metrics["total_output"] == 20 * result.metrics["completed"]


def test_prompts_file_counts_the_servers_input_tokens(server, tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "hello", "max_new_tokens": 3}\nabc\n')
    result = run_load_test(cfg(server, input_len=None, prompts_file=str(p), num_requests=4,
                               output_len=5), progress=False)
    check_consistent(result)
    # byte tokenizer: one id per byte, plus BOS
    assert [r.input_len for r in result.requests] == [6, 4, 6, 4]
    assert [r.output_tokens for r in result.requests] == [3, 5, 3, 5]


# ---------------------------------------------------------------- the command


def bench(server: ServerThread, *args: str) -> list[str]:
    return ["bench", "--address", server.address, "--input-len", "8", "--output-len", "4",
            "--num-requests", "6", "--concurrency", "2", "--metrics-url", "", *args]


def test_cli_report_and_met_targets(server, capsys):
    code = main(bench(server, "--max-error-rate", "0", "--min-output-throughput", "1",
                      "--goodput", "ttft:60000", "e2el:60000", "--min-goodput", "0.01",
                      "--progress"))
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for label in ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
                  "Total input tokens:", "Total generated tokens:",
                  "Request throughput (req/s):", "Request goodput (req/s):",
                  "Output token throughput (tok/s):", "Total token throughput (tok/s):",
                  "Mean TTFT (ms):", "Median TPOT (ms):", "P90 ITL (ms):", "P99 E2EL (ms):",
                  "Max in-flight requests:"):
        assert label in out
    assert "Total input tokens:                      48" in out
    assert out.count("PASS") == 3 and "FAIL" not in out
    assert "bench: 100%" in err  # --progress draws the bar even though stderr is no terminal


def test_cli_missed_target_exits_3(server, capsys, tmp_path):
    t = tmp_path / "targets.json"
    t.write_text('{"min_output_throughput": 1e9, "max_error_rate": 0.5}')
    code = main(bench(server, "--targets", str(t)))
    out, _ = capsys.readouterr()
    assert code == 3
    assert "FAIL  min_output_throughput" in out and "PASS  max_error_rate" in out
    # a flag overrides the file's value
    assert main(bench(server, "--targets", str(t), "--min-output-throughput", "1")) == 0


def test_cli_usage_errors_exit_2(server, capsys, tmp_path):
    t = tmp_path / "targets.json"
    t.write_text('{"min_output_throughput": 1, "max_p99_latency_ms": 5}')
    assert main(bench(server, "--targets", str(t))) == 2
    assert "unknown target 'max_p99_latency_ms'" in capsys.readouterr().err
    assert main(bench(server, "--request-rate", "5")) == 2  # and --concurrency 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--address", server.address, "--input-len", "250",
                 "--output-len", "10", "--metrics-url", ""]) == 2
    assert "max_model_len is 256" in capsys.readouterr().err
    assert main(bench(server, "--min-goodput", "1")) == 2
    assert "needs --goodput" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot-dir"])
def test_cli_unwritable_output_fails_before_the_run(capsys, tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "out" / ("r.json" if flag == "--json" else "")
    with socket.socket() as sock:  # nobody listens: the run would fail (exit 1) if it started
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["bench", "--address", f"127.0.0.1:{port}", "--metrics-url", "", flag,
                 str(target)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{flag}: cannot write in {blocker / 'out'}" in err


def test_cli_down_server_fails_fast(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    code = main(["bench", "--address", f"127.0.0.1:{port}", "--metrics-url", ""])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith(f"ecserve: error: cannot reach server at 127.0.0.1:{port}: UNAVAILABLE")
    assert time.monotonic() - t0 < 6


def test_cli_json(server, capsys, tmp_path):
    out = tmp_path / "out" / "run.json"
    metrics_url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    code = main(bench(server, "--json", str(out), "--save-requests", "--metrics-url",
                      metrics_url, "--max-error-rate", "0"))
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"schema", "start_time", "config", "load", "metrics", "errors", "targets",
                        "passed", "server", "environment", "requests"}
    assert set(VLLM_KEYS) <= set(doc["metrics"]) and doc["metrics"]["completed"] == 6
    assert doc["load"]["sent"] == doc["load"]["succeeded"] + doc["load"]["failed"] == 6
    assert doc["config"]["concurrency"] == 2 and doc["config"]["input_len"] == 8
    assert doc["passed"] is True and doc["targets"][0]["name"] == "max_error_rate"
    assert doc["server"]["model_info"]["vocab_size"] == 258
    mem = doc["server"]["memory"]
    assert mem["reachable"] and mem["rss_bytes_end"] > 1e6
    assert mem["peak_rss_bytes"] >= mem["rss_bytes_end"] * 0.5
    env = doc["environment"]
    assert {"platform", "cpu_count", "cpu_model", "python", "grpcio", "ecserve"} <= set(env)
    assert len(doc["requests"]) == 6 and doc["requests"][0]["output_tokens"] == 4


def test_cli_json_without_metrics_endpoint(server, tmp_path):
    out = tmp_path / "run.json"
    unreachable = "http://127.0.0.1:9/metrics"
    assert main(bench(server, "--json", str(out), "--metrics-url", unreachable)) == 0
    doc = json.loads(out.read_text())
    assert doc["server"]["memory"]["reachable"] is False
    assert doc["server"]["memory"]["peak_rss_bytes"] is None
    assert "requests" not in doc


def test_cli_request_rate_inf_is_valid_json(server, tmp_path):
    out = tmp_path / "run.json"
    args = ["bench", "--address", server.address, "--input-len", "8", "--output-len", "4",
            "--num-requests", "5", "--request-rate", "inf", "--metrics-url", "",
            "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())  # strict JSON: inf written as a string
    assert doc["config"]["request_rate"] == "inf" and doc["load"]["mode"] == "open"


def test_cli_plots(server, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot_dir = tmp_path / "plots"
    assert main(bench(server, "--plot-dir", str(plot_dir))) == 0
    for name in ("latency_cdf.png", "throughput.png"):
        data = (plot_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000

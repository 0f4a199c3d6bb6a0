"""The /metrics endpoint as Prometheus sees it: promtool's lint of a real scrape, a real
Prometheus server scraping ecserve and answering docs/metrics.md's PromQL, and exact counters after
a known workload (checked against the engine's step records).

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it). Without
them these tests skip, except under CI (the CI variable set), where they fail.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerThread

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.parallel.group import free_port

PROMPTS = ("hi", "expert choice routing", "a somewhat longer prompt, so that prefill spans "
           "more than one routing group of the tiny model")


def need(binary: str) -> str:
    """The binary's path; skip without it, or fail under CI (which must install it)."""
    path = shutil.which(binary)
    if path is None:
        msg = f"{binary} not on PATH (Debian package `prometheus`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def scrape(s: ServerThread) -> str:
    assert s.server is not None
    url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, label set) -> value, for every sample of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            key = (smp.name, frozenset(smp.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = smp.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def run_requests(s: ServerThread, max_new_tokens: int = 6) -> list:
    """PROMPTS, concurrently (so steps batch several requests), each to max_new_tokens."""
    def one(prompt: str):
        with s.client() as c:
            return c.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


# ------------------------------------------------------------------------------ promtool


@pytest.mark.parametrize("mode", ["full", "aggregate"])
def test_promtool_check_metrics(make_model, mode):
    promtool = need("promtool")
    engine = Engine(make_model(), EngineConfig(device="cpu", expert_timing_every=1))
    with ServerThread(engine, expert_metrics=mode) as s:
        run_requests(s)
        text = scrape(s)
    assert "ecserve_expert_tokens_total" in text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


# ------------------------------------------------------------------------------ exact counters


def capacity(n: int, c: float, e: int) -> int:
    """k(n) = min(n, ceil(n*c/E)), computed here rather than by RoutingConfig."""
    return min(n, math.ceil(n * Fraction(repr(c)) / e))


# c = 0.5 gives each expert 1 slot per 8 tokens: at least half of every full group is dropped.
@pytest.mark.parametrize(("c", "mode"), [(2.0, "full"), (2.0, "aggregate"), (0.5, "full")])
def test_exact_counters_after_known_workload(make_model, c, mode):
    model = make_model(routing={"policy": "ec", "capacity_factor": c, "group_size": 8})
    engine = Engine(model, EngineConfig(device="cpu", record_steps=True))
    mc = engine.model_cfg
    layers, num_e = list(mc.moe_layers), mc.num_experts
    with ServerThread(engine, expert_metrics=mode) as s:
        # The warm-up ran before the metrics observer was attached: drop its records.
        assert any(ch.request_id == "warmup" for r in engine.records for ch in r.stats.plan.chunks)
        engine.records.clear()
        responses = run_requests(s)
        found = samples(scrape(s))
    records = engine.records
    assert records and not any(ch.request_id == "warmup"
                               for r in records for ch in r.stats.plan.chunks)

    # Serving counters.
    assert all(r.generated_token_count == 6 for r in responses)
    assert value(found, "ecserve_generation_tokens_total") == 6 * len(PROMPTS)
    assert value(found, "ecserve_requests_finished_total", protocol="grpc",
                 reason="length") == len(PROMPTS)
    assert sum(v for (name, _), v in found.items()
               if name == "ecserve_requests_finished_total") == len(PROMPTS)
    prompt_tokens = sum(len(engine.encode(p)) for p in PROMPTS)
    assert sum(r.input_token_count for r in responses) == prompt_tokens
    assert value(found, "ecserve_prompt_tokens_total", protocol="grpc") == prompt_tokens

    # Routing groups: the step's plan decides them; every MoE layer uses the same ones.
    sizes = [n for r in records for n in r.stats.plan.group_sizes]
    total = sum(sizes)
    assert total == sum(r.stats.plan.num_tokens for r in records)
    assert value(found, "ecserve_routing_group_size_tokens_count") == len(sizes)
    assert value(found, "ecserve_routing_group_size_tokens_sum") == total
    slots = sum(capacity(n, c, num_e) for n in sizes)  # per expert, per layer

    for layer in layers:
        ly = str(layer)
        stats = [m for r in records for m in r.stats.moe if m.layer == layer]
        assert len(stats) == len(records)
        assert all(m.group_sizes == r.stats.plan.group_sizes
                   for r in records for m in r.stats.moe)
        # ec fills every slot: each expert took exactly its capacity.
        if mode == "full":
            for e in range(num_e):
                assert value(found, "ecserve_expert_tokens_total", layer=ly, expert=str(e)) == slots
                assert value(found, "ecserve_expert_capacity_slots_total", layer=ly,
                             expert=str(e)) == slots
        else:
            assert value(found, "ecserve_expert_tokens_total", layer=ly) == slots * num_e
            assert value(found, "ecserve_expert_capacity_slots_total", layer=ly) == slots * num_e
        # Experts per token: a histogram over 0..E with cumulative buckets.
        cum = [value(found, "ecserve_moe_experts_per_token_bucket", layer=ly, le=str(k))
               for k in range(num_e + 1)]
        cum.append(value(found, "ecserve_moe_experts_per_token_bucket", layer=ly, le="+Inf"))
        assert cum == sorted(cum) and cum[-1] == cum[-2]
        hist = [cum[0]] + [cum[k] - cum[k - 1] for k in range(1, num_e + 1)]
        count = value(found, "ecserve_moe_experts_per_token_count", layer=ly)
        assert count == cum[-1] == total
        assert value(found, "ecserve_moe_routed_tokens_total", layer=ly) == total
        # Each filled slot is one (token, expert) pair.
        assert sum(k * h for k, h in enumerate(hist)) == slots * num_e
        assert value(found, "ecserve_moe_experts_per_token_sum", layer=ly) == slots * num_e
        dropped = sum(int(m.experts_per_token[0]) for m in stats)
        assert value(found, "ecserve_moe_dropped_tokens_total", layer=ly) == dropped == hist[0]
        assert dropped == total - sum(hist[1:])
        if c < 1:
            assert dropped >= total - slots * num_e > 0
        assert value(found, "ecserve_moe_layer_info", layer=ly, policy="ec") == 1


def test_expert_metrics_off(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu", expert_timing_every=1))
    with ServerThread(engine, expert_metrics="off") as s:
        run_requests(s)
        found = samples(scrape(s))
    names = {name for name, _ in found}
    assert not [n for n in names if n.startswith("ecserve_expert_")]
    for layer in engine.model_cfg.moe_layers:
        ly = str(layer)
        assert value(found, "ecserve_moe_routed_tokens_total", layer=ly) > 0
        assert value(found, "ecserve_moe_dropped_tokens_total", layer=ly) >= 0
        assert value(found, "ecserve_moe_experts_per_token_count", layer=ly) > 0
    layer_labels = {dict(lb)["layer"] for name, lb in found
                    if name == "ecserve_moe_routed_tokens_total"}
    assert layer_labels == {str(x) for x in engine.model_cfg.moe_layers}
    assert value(found, "ecserve_generation_tokens_total") == 6 * len(PROMPTS)


# ------------------------------------------------------------------------------ Prometheus


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def poll(base: str, query: str, until: float) -> list[dict]:
    """The query's instant vector once it is non-empty (Prometheus scrapes every second)."""
    while True:
        data = api(base, "/api/v1/query", query=query)
        assert data["resultType"] == "vector", data
        if data["result"]:
            return data["result"]
        if time.monotonic() > until:
            pytest.fail(f"no samples for {query!r} after waiting")
        time.sleep(0.25)


@pytest.mark.slow
def test_real_prometheus_scrapes_and_answers_promql(make_model, tmp_path: Path):
    prometheus = need("prometheus")
    engine = Engine(make_model(), EngineConfig(device="cpu", expert_timing_every=1))
    mc = engine.model_cfg
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with ServerThread(engine) as s:
        assert s.server is not None
        target = f"127.0.0.1:{s.server.metrics_port}"
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: ecserve\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            end = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > end:
                    log.flush()
                    pytest.fail("prometheus did not become ready:\n"
                                + (tmp_path / "prometheus.log").read_text())
                time.sleep(0.2)
            run_requests(s)
            until = time.monotonic() + 20

            util = poll(base, "ecserve_expert_tokens_total / ecserve_expert_capacity_slots_total",
                        until)
            want = {(str(layer), str(e)) for layer in mc.moe_layers
                    for e in range(mc.num_experts)}
            # Samples appear with the first scrape after the requests: wait for full ones.
            while True:
                got = {(r["metric"]["layer"], r["metric"]["expert"]): float(r["value"][1])
                       for r in util}
                if len(got) == len(util) and set(got) == want and all(got.values()):
                    break
                if time.monotonic() > until:
                    pytest.fail(f"utilisation series {got} are not one per (layer, expert) "
                                f"{sorted(want)}, each in (0, 1]")
                time.sleep(0.25)
                util = poll(base, "ecserve_expert_tokens_total / "
                            "ecserve_expert_capacity_slots_total", until)
            assert all(0 < v <= 1 for v in got.values()), got
            assert all(r["metric"]["job"] == "ecserve" and r["metric"]["instance"] == target
                       for r in util)

            dropped = poll(base, "ecserve_moe_dropped_tokens_total", until)
            assert {r["metric"]["layer"] for r in dropped} == {str(x) for x in mc.moe_layers}

            lat = poll(base, "histogram_quantile(0.5, sum by (le, layer, expert) "
                             "(ecserve_expert_compute_seconds_bucket))", until)
            assert {(r["metric"]["layer"], r["metric"]["expert"]) for r in lat} == want
            assert all(0 < float(r["value"][1]) < math.inf for r in lat), lat

            ttft = poll(base, "histogram_quantile(0.9, sum by (le) "
                              "(ecserve_time_to_first_token_seconds_bucket))", until)
            assert len(ttft) == 1 and 0 < float(ttft[0]["value"][1]) < math.inf, ttft

            targets = api(base, "/api/v1/targets")["activeTargets"]
            assert [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in targets] == [
                ("ecserve", f"http://{target}/metrics", "up")], targets
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            log.close()

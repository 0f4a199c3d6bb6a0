"""The Grafana dashboard shipped in the package: valid JSON, every panel queries something,
and every metric its PromQL names is one a running server exposes."""

from __future__ import annotations

import json
import re
import urllib.request
from importlib.resources import files

from prometheus_client.parser import text_string_to_metric_families
from serving import ServerThread

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine

NAME = re.compile(r"ecserve_[a-z0-9_]+")  # [a-z_]+ alone would cut e2e to "ecserve_e"
# Panels the dashboard must keep: one metric each stands for them.
REQUIRED = {
    "ecserve_expert_tokens_total", "ecserve_expert_capacity_slots_total",
    "ecserve_moe_dropped_tokens_total", "ecserve_moe_routed_tokens_total",
    "ecserve_moe_experts_per_token_bucket", "ecserve_expert_compute_seconds_bucket",
    "ecserve_time_to_first_token_seconds_bucket", "ecserve_inter_token_latency_seconds_bucket",
    "ecserve_e2e_request_latency_seconds_bucket", "ecserve_requests_running",
    "ecserve_requests_waiting", "ecserve_kv_cache_blocks_used",
    "ecserve_kv_cache_capacity_blocks", "ecserve_generation_tokens_total",
    "ecserve_requests_finished_total", "ecserve_requests_rejected_total",
    "ecserve_step_duration_seconds_bucket",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count", ""),
            "gauge": ("",)}


def dashboard() -> dict:
    path = files("ecserve") / "grafana" / "ecserve.json"
    assert path.is_file()
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.extend(panels(p) if p.get("type") == "row" and "panels" in p else [p])
    return out


def referenced(dash: dict) -> set[str]:
    return {n for p in panels(dash) for t in p["targets"] for n in NAME.findall(t["expr"])}


def test_dashboard_is_valid_and_complete():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    found = panels(dash)
    assert len(found) >= 12
    for p in found:
        assert p["targets"], p["title"]
        assert all(t.get("expr", "").strip() for t in p["targets"]), p["title"]
    ids = [p["id"] for p in found]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "label_values(ecserve_expert_tokens_total, layer)" in json.dumps(variables["layer"])
    assert referenced(dash) >= REQUIRED, REQUIRED - referenced(dash)
    quantiles = " ".join(t["expr"] for p in found for t in p["targets"])
    for metric in ("ecserve_time_to_first_token_seconds", "ecserve_inter_token_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert re.search(rf"histogram_quantile\({q}, [^;]*{metric}_bucket", quantiles), \
                (metric, q)


def test_every_referenced_metric_is_exposed(make_model):
    engine = Engine(make_model(routing={"policy": "ec"}), EngineConfig(device="cpu"))
    with ServerThread(engine) as s:
        with s.client() as c:
            for prompt in ("hello", "expert choice"):
                c.generate(prompt, max_new_tokens=8)
        assert s.server is not None
        url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed |= {smp.name for smp in family.samples}
        # A labelled family with no children yet (rejected, by code) has no samples.
        exposed |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    names = referenced(dashboard())
    assert names, "no metric names found in the dashboard"
    missing = {n for n in names if n not in exposed}
    assert not missing, f"dashboard queries metrics the server does not expose: {missing}"
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert all(b in text for b in bases)

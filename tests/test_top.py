"""`ecserve top`: the parser and renderer on handmade text, then against a real server."""

from __future__ import annotations

import io
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_config
from serving import ServerThread

from ecserve.cli import main
from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.model.default import write_model
from ecserve.top import Snapshot, parse, quantile, render, run, scrape

PROMPTS = ("hi", "expert choice routing", "a longer prompt, so that prefill spans groups")
NEW_TOKENS = 8
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)(?:\s+(\S+))?$")
AGG_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)(?:\s+(\S+))?$")


def raw(text: str, name: str, **labels: str) -> float:
    """One sample's value, read from the exposition text with a regex (not via top's parser)."""
    for m in re.finditer(rf"^{name}(?:\{{(.*?)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if found == labels:
            return float(m.group(2))
    raise KeyError((name, labels))


def url_of(s: ServerThread) -> str:
    assert s.server is not None
    return f"http://127.0.0.1:{s.server.metrics_port}/metrics"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = ModelConfig.from_dict(tiny_config())  # capped routing: some slots stay empty
    return write_model(tmp_path_factory.mktemp("top") / "model", cfg, 0)


def served(model_dir: Path, mode: str):
    engine = Engine(model_dir, EngineConfig(device="cpu", expert_timing_every=1))
    s = ServerThread(engine, expert_metrics=mode)
    s.__enter__()
    with s.client() as c:
        for p in PROMPTS:
            assert c.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) \
                .generated_token_count == NEW_TOKENS
    return s, engine


@pytest.fixture(scope="module")
def full(model_dir):
    s, engine = served(model_dir, "full")
    yield s, engine
    s.__exit__(None, None, None)


# ------------------------------------------------------------------------ pure functions


def test_quantile_interpolates_like_prometheus():
    b = [(0.1, 2.0), (0.2, 6.0), (0.4, 10.0), (float("inf"), 10.0)]
    assert quantile(0.5, b) == pytest.approx(0.1 + 0.1 * (5 - 2) / 4)
    assert quantile(0.1, b) == pytest.approx(0.1 * 1 / 2)
    assert quantile(1.0, b) == pytest.approx(0.4)
    assert quantile(0.99, [(1.0, 0.0), (float("inf"), 4.0)]) == 1.0  # +Inf: lower bound
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_render_of_handmade_exposition():
    text = "\n".join([
        "# TYPE ecserve_expert_tokens counter",
        'ecserve_expert_tokens_total{layer="3",expert="1"} 30',
        'ecserve_expert_tokens_total{layer="3",expert="0"} 10',
        "# TYPE ecserve_expert_capacity_slots counter",
        'ecserve_expert_capacity_slots_total{layer="3",expert="0"} 40',
        'ecserve_expert_capacity_slots_total{layer="3",expert="1"} 40',
        "# TYPE ecserve_expert_gate_weight counter",
        'ecserve_expert_gate_weight_total{layer="3",expert="0"} 5',
        'ecserve_expert_gate_weight_total{layer="3",expert="1"} 3',
        "# TYPE ecserve_generation_tokens counter",
        "ecserve_generation_tokens_total 123",
        "# TYPE ecserve_moe_dropped_tokens counter",
        'ecserve_moe_dropped_tokens_total{layer="3"} 4',
        "# TYPE ecserve_moe_routed_tokens counter",
        'ecserve_moe_routed_tokens_total{layer="3"} 16', ""])
    snap = parse(text, 10.0)
    out = render(snap)
    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert rows == [("3", "0", "10", "25.0", "0.500", "-", "-", None),
                    ("3", "1", "30", "75.0", "0.100", "-", "-", None)]
    assert "generated tokens 123" in out
    assert "layer 3: dropped 4/16 (25.0%)" in out
    before = parse(text.replace('expert="1"} 30', 'expert="1"} 20'), 8.0)
    rows = [m.groups() for m in map(ROW.match, render(snap, before, 2.0).splitlines()) if m]
    assert [r[-1] for r in rows] == ["0.0", "5.0"]
    assert "tok/s" in render(snap, before, 2.0) and "tok/s" not in out
    assert "no per-expert metrics" in render(Snapshot())


# ------------------------------------------------------------------------ a real server


def test_render_against_server(full):
    s, engine = full
    url = url_of(s)
    text = fetch(url)
    out = render(scrape(url))
    rows = {(int(m[1]), int(m[2])): m for m in map(ROW.match, out.splitlines()) if m}
    layers = list(engine.model_cfg.moe_layers)
    assert layers and sorted(rows) == [(lay, e) for lay in layers for e in range(4)]
    for (layer, e), m in rows.items():
        lab = {"layer": str(layer), "expert": str(e)}
        tokens = raw(text, "ecserve_expert_tokens_total", **lab)
        slots = raw(text, "ecserve_expert_capacity_slots_total", **lab)
        assert float(m[3]) == tokens
        assert 0 <= float(m[4]) <= 100
        assert float(m[4]) == pytest.approx(100 * tokens / slots, abs=0.05)
        count = raw(text, "ecserve_expert_compute_seconds_count", **lab)
        if count:  # sampled every step here: mean = sum / count, p50 within the buckets
            mean = raw(text, "ecserve_expert_compute_seconds_sum", **lab) / count * 1e3
            assert float(m[7]) == pytest.approx(mean, abs=1e-3)
            assert 0 < float(m[6]) <= 250
    assert any(raw(text, "ecserve_expert_compute_seconds_count", layer=str(layers[0]),
                       expert=str(e)) for e in range(4))
    generated = raw(text, "ecserve_generation_tokens_total")
    assert generated == NEW_TOKENS * len(PROMPTS)
    assert f"generated tokens {generated:.0f}" in out
    assert f"KV blocks {raw(text, 'ecserve_kv_cache_blocks_used'):.0f}/" \
           f"{raw(text, 'ecserve_kv_cache_capacity_blocks'):.0f}" in out
    ttft = (raw(text, "ecserve_time_to_first_token_seconds_sum", protocol="grpc")
            / raw(text, "ecserve_time_to_first_token_seconds_count", protocol="grpc"))
    assert f"TTFT mean {ttft * 1e3:.2f} ms" in out
    for layer in layers:
        d = raw(text, "ecserve_moe_dropped_tokens_total", layer=str(layer))
        r = raw(text, "ecserve_moe_routed_tokens_total", layer=str(layer))
        assert f"layer {layer}: dropped {d:.0f}/{r:.0f} ({100 * d / r:.1f}%)" in out


def test_run_loops_and_shows_rates(full):
    s, _ = full
    buf = io.StringIO()
    assert run(url_of(s), interval=0.05, iterations=2, out=buf) == 0
    frames = buf.getvalue().split("ecserve top")
    assert len(frames) == 3 and "\x1b[" not in buf.getvalue()  # not a TTY: no clearing
    assert "tok/s" not in frames[1] and "tok/s" in frames[2]


def test_cli_once(full, capsys):
    s, engine = full
    assert main(["top", "--url", url_of(s), "--once"]) == 0
    out = capsys.readouterr().out
    assert out.count("ecserve top") == 1
    rows = [m for m in map(ROW.match, out.splitlines()) if m]
    assert len(rows) == 4 * len(engine.model_cfg.moe_layers)


def test_cli_server_down(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    start = time.monotonic()
    assert main(["top", "--url", url, "--once"]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.startswith(f"ecserve: error: cannot scrape {url}: ")
    assert "Traceback" not in err and err.count("\n") == 1


def test_aggregate_mode_renders_layer_rows(model_dir):
    s, engine = served(model_dir, "aggregate")
    try:
        text = fetch(url_of(s))
        out = render(scrape(url_of(s)))
    finally:
        s.__exit__(None, None, None)
    assert not any(ROW.match(line) for line in out.splitlines())
    rows = {int(m[1]): m for m in map(AGG_ROW.match, out.splitlines()) if m}
    layers = list(engine.model_cfg.moe_layers)
    assert sorted(rows) == layers
    for layer, m in rows.items():
        tokens = raw(text, "ecserve_expert_tokens_total", layer=str(layer))
        slots = raw(text, "ecserve_expert_capacity_slots_total", layer=str(layer))
        assert float(m[2]) == tokens > 0
        assert float(m[3]) == pytest.approx(100 * tokens / slots, abs=0.05)
        assert 0 <= float(m[3]) <= 100

"""Expert placement (ecserve/placement/): balance, affinity, replicas, traffic, JSON, `plan`."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from conftest import tiny_config

from ecserve.cli import main
from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.model.weights import read_config
from ecserve.placement import (
    Device,
    ModelShape,
    Placement,
    PlanError,
    RoutingStats,
    affinity_placement,
    balanced_placement,
    balanced_shares,
    cross_device_tokens,
    load_plan,
    replicate_hot_experts,
    save_plan,
)
from ecserve.placement.affinity import cut_weight, refine
from ecserve.placement.memory import check_fits, device_bytes, parse_bytes
from ecserve.placement.routing_stats import record_routing, synthetic_prompts
from ecserve.placement.traffic import step_traffic

PAIRS = ((0, 5), (1, 4), (2, 7), (3, 6))


def shape(num_experts: int = 8, moe_layers: tuple[int, ...] = (1, 3)) -> ModelShape:
    return ModelShape(4, moe_layers, num_experts)


def devices(n: int, memory: int | None = None) -> tuple[Device, ...]:
    return tuple(Device(i, memory) for i in range(n))


def paired_workload(steps: int = 4, tokens: int = 16) -> RoutingStats:
    """Every token picks one of PAIRS: both of its experts, nothing else."""
    per_step = [[PAIRS[(t + s) % 4] for t in range(tokens)] for s in range(steps)]
    return RoutingStats.from_assignments(8, {1: per_step, 3: per_step})


def random_workload(num_experts: int, seed: int, steps: int = 5) -> RoutingStats:
    rng = random.Random(seed)
    layer = [[rng.sample(range(num_experts), rng.randint(0, 3)) for _ in range(rng.randint(1, 30))]
             for _ in range(steps)]
    return RoutingStats.from_assignments(num_experts, {1: layer, 3: layer[::-1]})


def naive_traffic(stats: RoutingStats, plan: Placement, layer: int, dedup: bool = True) -> float:
    """Without replicas: each token (home t * D // N) to every device owning one of its experts
    but home: once per device (dedup), or once per expert."""
    total = 0
    for a in stats.layers[layer]:
        n = a.shape[0]
        for t, row in enumerate(a.tolist()):
            devs = [plan.layers[layer][e][0] for e, chosen in enumerate(row) if chosen]
            remote = [d for d in devs if d != t * plan.num_devices // n]
            total += len(set(remote)) if dedup else len(remote)
    return total / len(stats.layers[layer])


# ------------------------------------------------------------------ balanced


@pytest.mark.parametrize(("num_experts", "num_devices"),
                         list(itertools.product((1, 4, 6, 8, 13, 64), (1, 2, 3, 4, 8))))
def test_balanced_places_every_expert_once_in_equal_shares(num_experts, num_devices):
    shares = balanced_shares(num_experts, num_devices)
    assert sum(shares) == num_experts and max(shares) - min(shares) <= 1
    if num_experts % num_devices == 0:
        assert len(set(shares)) == 1
    plan = balanced_placement(shape(num_experts), devices(num_devices))
    for layer in (1, 3):
        assert all(len(h) == 1 for h in plan.layers[layer])  # exactly once
        counts = [len(plan.experts_on(layer, d)) for d in range(num_devices)]
        assert counts == shares
        assert plan.owners(layer) == sorted(plan.owners(layer))  # contiguous runs


# ------------------------------------------------------------------ traffic


def test_traffic_counts_a_token_once_per_remote_device_and_never_home():
    plan = Placement(shape(4, (1,)), devices(2), "balanced", {1: ((0,), (1,), (1,), (0,))})
    stats = RoutingStats.from_assignments(4, {1: [[  # 6 tokens: homes 0, 0, 0, 1, 1, 1
        {1, 2},  # home 0: experts 1 and 2 both on device 1: sent once (twice without dedup)
        {0, 3},  # home 0: local
        set(),  # dropped: nothing
        {0, 3},  # home 1: both on device 0: sent once (twice)
        {0, 1, 2, 3},  # home 1: device 0 once (twice)
        {2},  # home 1: local
    ]]})
    assert cross_device_tokens(plan, stats) == {1: 3.0}
    assert cross_device_tokens(plan, stats, dedup=False) == {1: 6.0}


def test_traffic_with_replicas_prefers_home_then_a_device_already_reached():
    holders = ((0,), (1, 0), (2,), (1, 2))
    a = torch.zeros(4, 4, dtype=torch.bool)  # homes 0, 0, 1, 2
    a[0, [1]] = True  # home 0 holds a replica of 1: local
    a[1, [2, 1]] = True  # home 0: 1 local (replica), 2 on device 2: one send
    a[2, [1]] = True  # home 1 holds 1's primary: local
    a[3, [2, 3]] = True  # home 2: 2 is there, and a replica of 3: local
    assert step_traffic(a, holders, 3) == 1
    b = torch.zeros(1, 4, dtype=torch.bool)
    b[0, [2, 3]] = True  # home 0: 2 forces device 2, where 3 has a copy: one send, not two
    assert step_traffic(b, holders, 3) == 1
    assert step_traffic(b, holders, 3, dedup=False) == 2


@pytest.mark.parametrize("seed", range(5))
def test_traffic_matches_a_naive_count(seed):
    stats = random_workload(8, seed)
    rng = random.Random(seed)
    owners = [rng.randrange(3) for _ in range(8)]
    plan = Placement(shape(), devices(3), "balanced",
                     {layer: tuple((o,) for o in owners) for layer in (1, 3)})
    for dedup in (True, False):
        got = cross_device_tokens(plan, stats, dedup)
        assert got == {layer: pytest.approx(naive_traffic(stats, plan, layer, dedup))
                       for layer in (1, 3)}


# ------------------------------------------------------------------ affinity


def test_coselection_is_symmetric_with_token_counts_on_the_diagonal():
    stats = random_workload(8, 0)
    c = stats.coselection(1)
    assert torch.equal(c, c.T)
    assert torch.equal(c.diagonal(), stats.tokens_per_expert(1))


@pytest.mark.parametrize("num_devices", [2, 4])
def test_affinity_keeps_pairs_together_and_sends_fewer_tokens(num_devices):
    stats = paired_workload()
    base = balanced_placement(shape(), devices(num_devices))
    plan = affinity_placement(shape(), devices(num_devices), stats)
    for layer in (1, 3):
        owners = plan.owners(layer)
        assert all(owners[a] == owners[b] for a, b in PAIRS)
        assert sorted(len(plan.experts_on(layer, d)) for d in range(num_devices)) == \
            [8 // num_devices] * num_devices
        weights = stats.coselection(layer).fill_diagonal_(0)
        assert cut_weight(weights, owners) == 0
        assert cut_weight(weights, base.owners(layer)) > 0
    ours, theirs = cross_device_tokens(plan, stats), cross_device_tokens(base, stats)
    for layer in (1, 3):
        # Balanced splits every pair across devices: each token needs two devices (one remote).
        # Affinity: one device per token, remote unless it is the token's home.
        assert theirs[layer] == pytest.approx(16 * (2 - 2 / num_devices))
        assert ours[layer] == pytest.approx(16 * (1 - 1 / num_devices))
        assert ours[layer] < theirs[layer]


@pytest.mark.parametrize("seed", range(4))
def test_affinity_is_balanced_deterministic_and_never_worse_than_balanced(seed):
    stats = random_workload(12, seed)
    model = shape(12)
    for n in (2, 3, 5):
        plan = affinity_placement(model, devices(n), stats, seed=seed)
        assert plan == affinity_placement(model, devices(n), stats, seed=seed)
        ours = cross_device_tokens(plan, stats)
        theirs = cross_device_tokens(balanced_placement(model, devices(n)), stats)
        for layer in (1, 3):
            assert all(len(h) == 1 for h in plan.layers[layer])
            counts = [len(plan.experts_on(layer, d)) for d in range(n)]
            assert sorted(counts) == sorted(balanced_shares(12, n))
            assert ours[layer] <= theirs[layer]


def test_refine_swaps_keep_sizes_and_never_raise_the_cut():
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 10, (10, 10), generator=gen)
    w = (w + w.T).fill_diagonal_(0)
    start = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    out = refine(w, start, 3)
    assert sorted(out) == sorted(start)
    assert cut_weight(w, out) <= cut_weight(w, start)


# ------------------------------------------------------------------ replicas and memory


@pytest.mark.parametrize("spare_experts", [0, 1, 3, 7, 40])
def test_replicas_fit_memory_and_every_expert_stays_placed(spare_experts):
    stats = random_workload(8, 1)
    per_expert, dense = 100, 1000
    memory = dense + (2 * 4 + spare_experts) * per_expert  # 2 layers x 4 experts, + spares
    base = affinity_placement(shape(), devices(2, memory), stats)
    plan = replicate_hot_experts(base, stats, per_expert, dense)
    assert all(b <= memory for b in device_bytes(plan, per_expert, dense))
    check_fits(plan, per_expert, dense)
    for layer in (1, 3):
        assert all(len(h) >= 1 and len(set(h)) == len(h) for h in plan.layers[layer])
        assert plan.owners(layer) == base.owners(layer)  # primaries stay balanced
    copies = sum(plan.experts_per_device()) - 16
    assert copies == min(spare_experts * 2, 16)  # every spare slot used, up to all experts
    ours, theirs = cross_device_tokens(plan, stats), cross_device_tokens(base, stats)
    assert all(ours[layer] <= theirs[layer] for layer in (1, 3))
    if copies == 16:  # everything everywhere: nothing leaves home
        assert sum(ours.values()) == 0
    if copies:  # the hottest expert was copied first
        heat = max((int(n), -layer, -e) for layer in (1, 3)
                   for e, n in enumerate(stats.tokens_per_expert(layer).tolist()))
        assert len(plan.layers[-heat[1]][-heat[2]]) == 2


def test_replication_needs_memory_and_a_plan_that_fits():
    stats = random_workload(8, 0)
    with pytest.raises(PlanError, match="give --device-memory"):
        replicate_hot_experts(balanced_placement(shape(), devices(2)), stats, 100, 1000)
    too_small = balanced_placement(shape(), devices(2, 1500))
    with pytest.raises(PlanError, match=r"device 0 needs 1800 bytes .* 8 experts .* has 1500"):
        replicate_hot_experts(too_small, stats, 100, 1000)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512mib") == 512 * 2**20
    assert parse_bytes("1.5G") == parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("1e9") == 10**9
    for bad in ("lots", "5XB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


# ------------------------------------------------------------------ JSON


def test_json_round_trip(tmp_path):
    stats = random_workload(8, 2)
    plan = replicate_hot_experts(affinity_placement(shape(), devices(2, 3000), stats), stats,
                                 100, 1000)
    assert plan.replicated
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["strategy"] == "affinity" and data["replicated"]
    assert sorted(data["layers"]) == ["1", "3"] and len(data["layers"]["1"]) == 8


def _edited(plan: Placement, edit) -> dict:
    data = plan.to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["layers"]["1"].pop(), r"layers\.1: 7 experts placed, the model has 8"),
    (lambda d: d["layers"]["1"].__setitem__(2, []), r"layers\.1\[2\]: expert 2 is on no device"),
    (lambda d: d["layers"]["3"].__setitem__(0, [2]), r"layers\.3\[0\]: device id\(s\) \[2\] "
                                                     r"outside \[0, 2\)"),
    (lambda d: d["layers"]["3"].__setitem__(0, [1, 1]), "lists a device twice"),
    (lambda d: d["layers"].pop("3"), r"places layers \[1\], the model's MoE layers are \[1, 3\]"),
    (lambda d: d["layers"].__setitem__("x", []), "key 'x' is not a layer index"),
    (lambda d: d.__setitem__("version", 2), "version: 2 is not supported"),
    (lambda d: d.pop("devices"), "missing key"),
    (lambda d: d.__setitem__("strategy", "magic"), "strategy: 'magic'"),
    (lambda d: d["devices"].pop(), r"device id\(s\) \[1\] outside \[0, 1\)"),
    (lambda d: d.__setitem__("replicated", True), "replicated: says True"),
])
def test_load_rejects_bad_plans_naming_the_problem(tmp_path, edit, message):
    data = _edited(balanced_placement(shape(), devices(2)), edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def test_load_checks_the_model_shape(tmp_path):
    path = save_plan(balanced_placement(shape(), devices(2)), tmp_path / "p.json")
    cfg = ModelConfig.from_dict(tiny_config())  # 4 experts
    with pytest.raises(PlanError, match=r"8 experts; this model has .* 4 experts"):
        load_plan(path, cfg)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(PlanError, match="not JSON"):
        load_plan(tmp_path / "junk.json")


# ------------------------------------------------------------------ real routing, CLI


@pytest.mark.parametrize("routing", [{}, {"policy": "token_choice", "top_k": 2},
                                     {"policy": "ec", "capacity_factor": 1.0}])
def test_collected_coselection_matches_the_engines_moe_stats(make_model, routing):
    model_dir = make_model(routing=routing)
    engine = Engine(model_dir, EngineConfig(device="cpu", record_steps=True,
                                            kv_cache_bytes=1 << 20, expert_timing_every=0))
    prompts = synthetic_prompts(3, 256, seed=1)
    stats = record_routing(engine, prompts, max_new_tokens=4)
    assert len(engine.records) > 1
    for layer in engine.model_cfg.moe_layers:
        c = stats.coselection(layer)
        assert torch.equal(c, c.T)
        recorded = sum(m.tokens_per_expert for r in engine.records for m in r.stats.moe
                       if m.layer == layer)
        assert torch.equal(c.diagonal(), recorded)
        assert stats.num_steps(layer) == len(engine.records)
        assert stats.num_tokens(layer) == sum(r.stats.plan.num_tokens for r in engine.records)


def test_plan_command_prints_saves_and_loads(make_model, tmp_path, capsys):
    model_dir = make_model()
    path = tmp_path / "plan.json"
    small = ["--synthetic-requests", "2", "--max-new-tokens", "2"]
    assert main(["plan", "--model", str(model_dir), "--devices", "2", *small,
                 "--save", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer 1: device 0:" in out and "layer 3: device 0:" in out
    assert "cross-device tokens per step" in out and "balanced" in out
    plan = load_plan(path, read_config(model_dir))
    assert plan.strategy == "affinity" and plan.num_devices == 2
    assert main(["plan", "--model", str(model_dir), "--load", str(path), *small]) == 0
    assert "strategy: affinity" in capsys.readouterr().out
    assert main(["plan", "--model", str(model_dir), "--load", str(path), "--devices", "2"]) == 2
    assert "drop --devices" in capsys.readouterr().err
    assert main(["plan", "--model", str(model_dir), "--devices", "2",
                 "--device-memory", "1KiB"]) == 2
    assert "device 0 needs" in capsys.readouterr().err
    assert main(["plan", "--model", str(model_dir), "--devices", "2", "--device-memory", "1GiB",
                 "--replicate", "--strategy", "balanced", *small]) == 0
    assert "strategy: balanced + replicas" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Expert choice routing\n\nThe cat sat\n")
    assert main(["plan", "--model", str(model_dir), "--devices", "3", "--prompts",
                 str(prompts), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "routing statistics: 2 prompts" in out and "device 2:" in out

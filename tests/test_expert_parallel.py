"""Expert parallelism (issue 8): 2 processes on CPU with gloo give the single-process output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expert_parallel_driver import engine_config, serve
from prometheus_client.parser import text_string_to_metric_families

from ecserve.engine.engine import Engine
from ecserve.model.weights import load_model, read_config
from ecserve.parallel.moe_ep import default_placement, executable_placement, home_range
from ecserve.placement import (
    Placement,
    PlanError,
    affinity_placement,
    collect_routing_stats,
    save_plan,
)

DRIVER = Path(__file__).with_name("expert_parallel_driver.py")


def run_parallel(model_dir: Path, world: int, scope: str, out: Path, placement: str) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), str(model_dir), str(world), scope,
                           str(out), placement], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    result["log"] = proc.stdout + proc.stderr
    return result


def assert_same(got: dict, want: dict) -> None:
    assert got["groups"] == want["groups"]  # the same steps and routing groups
    assert got["tokens"] == want["tokens"]
    assert len(got["logits"]) == len(want["logits"])
    for g, w in zip(got["logits"], want["logits"], strict=True):
        assert g.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(g[k], w[k], atol=1e-5, rtol=0)


def assert_counted_traffic_is_predicted(got: dict) -> None:
    """The executor's counted cross-device rows equal the planner's traffic model (no dedup)
    on the same steps, and it ran once per step and MoE layer."""
    for layer, (counted, calls, predicted) in got["traffic"].items():
        assert calls == got["steps"][layer]
        assert counted == pytest.approx(predicted, abs=1e-6), layer


@pytest.mark.parametrize("policy,scope,world,placement", [
    ("capped", "sequence", 2, "contiguous"), ("ec", "sequence", 2, "contiguous"),
    ("capped", "batch", 2, "contiguous"), ("ec", "batch", 2, "contiguous"),
    ("ec", "batch", 3, "interleaved"),
])
def test_expert_parallel_equals_single_process(make_model, tmp_path, policy, scope, world,
                                               placement):
    torch.set_num_threads(1)
    # A shared expert too, so the replicated part of the MoE layer is covered.
    model = make_model(routing={"policy": policy, "group_size": 12},
                       shared_expert_ffn_hidden_size=32, num_experts=6)
    want = serve(Engine(model, engine_config()), scope)
    got = run_parallel(model, world, scope, tmp_path / "ep.pt", placement)
    assert_same(got, want)
    assert_counted_traffic_is_predicted(got)


def test_affinity_plan_per_layer_with_only_owned_experts_loaded(make_model, tmp_path):
    """A planner affinity plan that differs per MoE layer, from a JSON file, over 3 ranks: the
    same tokens and logits as one process; every rank holds [E_own, ...] expert weights."""
    torch.set_num_threads(1)
    model = make_model(routing={"policy": "ec", "group_size": 12}, num_experts=6,
                       moe_layers=[1, 2, 3], shared_expert_ffn_hidden_size=32)
    cfg = read_config(model)
    stats = collect_routing_stats(model, synthetic_requests=4, max_new_tokens=4)
    plan = affinity_placement(default_placement(cfg, 3).model,
                              default_placement(cfg, 3).devices, stats)
    owners = {layer: plan.owners(layer) for layer in plan.layers}
    assert len({tuple(o) for o in owners.values()}) > 1, owners  # differs per layer
    path = save_plan(plan, tmp_path / "plan.json")
    want = serve(Engine(model, engine_config()), "batch")
    got = run_parallel(model, 3, "batch", tmp_path / "ep.pt", str(path))
    assert_same(got, want)
    assert_counted_traffic_is_predicted(got)
    for layer, shape in got["shapes"].items():  # rank 0 loaded only its own experts
        assert shape == (owners[layer].count(0), 48, 64)
    for rank in (1, 2):
        shapes = {layer: [owners[layer].count(rank), 48, 64] for layer in owners}
        own = {layer: [e for e, r in enumerate(owners[layer]) if r == rank] for layer in owners}
        assert f"worker {rank} holds experts {own}; w_gate shapes {shapes}" in got["log"]


def test_expert_filter_reads_only_the_owned_rows(make_model):
    model = make_model(num_experts=6, routing={"group_size": 12})
    cfg = read_config(model)
    full = load_model(model, cfg)
    part = load_model(model, cfg, experts={1: [0, 2, 3], 3: []})
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(part.layers[1].moe, name),
                                   getattr(full.layers[1].moe, name)[[0, 2, 3]], atol=0, rtol=0)
        assert getattr(part.layers[3].moe, name).shape[0] == 0
    torch.testing.assert_close(part.layers[1].moe.router, full.layers[1].moe.router)
    torch.testing.assert_close(part.embed, full.embed)
    with pytest.raises(ValueError, match="not MoE layers"):
        load_model(model, cfg, experts={0: [1]})
    with pytest.raises(ValueError, match="ascending"):
        load_model(model, cfg, experts={1: [2, 1]})


def test_executable_placement_checks_model_world_and_replicas(make_model):
    cfg = read_config(make_model(num_experts=6, routing={"group_size": 12}))
    plan = default_placement(cfg, 2)
    assert executable_placement(plan, cfg, 2) is plan
    with pytest.raises(PlanError, match="2 devices, expert parallelism runs 3 ranks"):
        executable_placement(plan, cfg, 3)
    with pytest.raises(PlanError, match="the plan is for a model"):
        executable_placement(default_placement(read_config(make_model(num_experts=4)), 2),
                             cfg, 2)
    layers = {layer: ((0, 1), *hs[1:]) for layer, hs in plan.layers.items()}
    replicated = Placement(plan.model, plan.devices, plan.strategy, layers)
    assert replicated.replicated
    with pytest.raises(PlanError, match="replicas is not supported yet"):
        executable_placement(replicated, cfg, 2)


def test_default_placement_and_home_ranges(make_model):
    cfg = read_config(make_model(num_experts=6, routing={"group_size": 12}))
    assert default_placement(cfg, 2).owners(1) == [0, 0, 0, 1, 1, 1]
    assert default_placement(cfg, 4).owners(3) == [0, 0, 1, 1, 2, 3]
    for n in (1, 2, 5, 17):
        for world in (2, 3):
            spans = [home_range(r, world, n) for r in range(world)]
            covered = [t for lo, hi in spans for t in range(lo, hi)]
            assert covered == list(range(n))
            assert all(home_range(t * world // n, world, n)[0] <= t for t in range(n))


def start_serving(cmd: list[str], address: str, log_path: Path, env: dict[str, str]
                  ) -> subprocess.Popen[bytes]:
    """Start `ecserve serve ...` and wait until its health says SERVING."""
    import time

    from ecserve.client import Client

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    end = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < end, log_path.read_text()
        try:
            with Client(address, timeout=2) as c:
                if c.health() == "SERVING":
                    return proc
        except Exception:
            pass
        time.sleep(0.1)


def workers(pid: int) -> list[int]:
    """The expert-parallel worker processes under `pid` (from /proc: no procps needed): the
    engine-core process, rank 0, starts them."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue

    def under(p: int) -> bool:
        while p > 1:
            p = parents.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p, cmd in commands.items() if b"ecserve.parallel.worker" in cmd and under(p)]


@pytest.mark.parametrize("busy", [True, False])
def test_a_lost_worker_fails_fast_and_the_server_exits_1(make_model, tmp_path, busy):
    """A worker rank that dies: a live stream ends at once with the reason (no hang until the
    group timeout); an idle server notices within a second. Either way the server refuses new
    work, drains and exits 1, for the orchestrator to restart it."""
    import os
    import signal
    import time

    import grpc

    from ecserve.client import Client
    from ecserve.parallel.group import free_port

    model = make_model()
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ecserve", "serve", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--no-metrics", "--device", "cpu", "--dtype",
           "float32", "--kv-cache-bytes", str(1 << 22), "--torch-threads", "1",
           "--expert-parallel", "2", "--http-port", "0"]
    proc = start_serving(cmd, address, log_path, env)
    try:
        (worker,) = workers(proc.pid)
        t0 = time.monotonic()
        if busy:
            with Client(address, timeout=30) as c:
                stream = c.stream([5, 6, 7], max_new_tokens=200, ignore_eos=True)
                next(stream)  # generating
                os.kill(worker, signal.SIGKILL)
                with pytest.raises(grpc.RpcError) as err:
                    for _ in stream:
                        pass
            assert err.value.code() is grpc.StatusCode.INTERNAL, err.value
            assert "expert-parallel" in (err.value.details() or ""), err.value
        else:
            os.kill(worker, signal.SIGKILL)
        code = proc.wait(timeout=30)
        text = log_path.read_text()
        assert code == 1 and time.monotonic() - t0 < 10, text
        assert "stopping with exit code 1" in text and "drained; stopped" in text, text
        if not busy:
            assert "expert-parallel worker rank 1" in text and "exited with code -9" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_serve_expert_parallel_streams_the_single_process_tokens(make_model, tmp_path, launcher):
    """`ecserve serve --expert-parallel 2 --placement PLAN` (a plan that differs per layer), or
    the same across the processes `torchrun` starts (`--torchrun`): greedy tokens over gRPC
    (sequence scope, two concurrent streams) equal a single-process engine's, and SIGTERM
    drains every rank."""
    import os
    import signal
    import threading

    from ecserve.client import Client
    from ecserve.config import EngineConfig
    from ecserve.parallel.group import free_port
    from ecserve.types import Request, SamplingParams

    model = make_model(num_experts=6, routing={"group_size": 12})
    prompts = {"a": list(range(3, 40)), "b": list(range(100, 109))}
    engine = Engine(model, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 22))
    want: dict[str, list[int]] = {}
    for rid, ids in prompts.items():
        engine.add_request(Request(rid, tuple(ids), SamplingParams(max_new_tokens=12,
                                                                    ignore_eos=True),
                                   routing_scope="sequence"))
    while engine.has_unfinished():
        for ev in engine.step():
            want.setdefault(ev.request_id, []).append(ev.token_id)

    base = default_placement(read_config(model), 2)
    plan = save_plan(Placement(base.model, base.devices, "affinity", {
        1: tuple((e % 2,) for e in range(6)), 3: tuple((int(e < 3),) for e in range(6))}),
        tmp_path / "plan.json")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    metrics_port = free_port()
    serve_args = ["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                  "--metrics-port", str(metrics_port), "--device", "cpu", "--dtype", "float32",
                  "--kv-cache-bytes", str(1 << 22), "--torch-threads", "1",
                  "--placement", str(plan), "--http-port", "0"]
    if launcher == "spawn":
        cmd = [sys.executable, "-m", "ecserve", *serve_args, "--expert-parallel", "2"]
    else:  # one machine here; several machines take the same command with --nnodes etc.
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc-per-node", "2", "-m", "ecserve", *serve_args, "--torchrun"]
    proc = start_serving(cmd, address, log_path, env)
    try:
        got: dict[str, list[int]] = {}

        def read(rid: str) -> None:
            with Client(address, timeout=60) as c:
                got[rid] = [t.id for m in c.stream(prompts[rid], max_new_tokens=12,
                                                   ignore_eos=True, routing_scope="sequence",
                                                   token_ids=True)
                            for t in m.tokens]

        threads = [threading.Thread(target=read, args=(rid,)) for rid in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == want, log_path.read_text()
        # Rank 0's metrics: the experts it holds (3 per MoE layer under the plan) and rows that
        # crossed to rank 1 and back.
        import urllib.request

        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        samples = {(f.name, tuple(sorted(x.labels.items()))): x.value
                   for f in text_string_to_metric_families(scrape.decode()) for x in f.samples}
        assert samples[("ecserve_device_experts", (("device", "cpu"),))] == 6
        for layer in ("1", "3"):
            for src, dst in (("0", "1"), ("1", "0")):
                key = ("ecserve_expert_parallel_rows",  # the parser drops _total
                       (("dst", dst), ("layer", layer), ("src", src)))
                assert samples.get(key, 0) > 0, [k for k in samples if "parallel" in k[0]]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        text = log_path.read_text()
        assert "drained; stopped" in text, text
        if launcher == "spawn":
            assert code == 0, text
            assert "worker 1: " in text  # the worker followed the steps and stopped
        else:  # torchrun itself reports the SIGTERM it got with a non-zero exit
            assert "expert-parallel rank 1: " in text and "steps, stopping" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_placement_is_checked_before_anything_starts(make_model, tmp_path, capsys):
    """`ecserve serve --expert-parallel N --placement PLAN`: a plan for another N, another
    model, or without --expert-parallel exits 2 with the reason, before loading or serving."""
    from ecserve.cli import main

    model = make_model(num_experts=6, routing={"group_size": 12})
    plan = save_plan(default_placement(read_config(model), 2), tmp_path / "plan.json")
    other = save_plan(default_placement(read_config(make_model()), 2), tmp_path / "other.json")
    base = ["serve", "--model", str(model), "--device", "cpu", "--torch-threads", "2",
            "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    cases = [
        (["--placement", str(plan)], "--placement needs --expert-parallel"),
        (["--expert-parallel", "3", "--placement", str(plan)],
         "2 devices, expert parallelism runs 3 ranks"),
        (["--expert-parallel", "2", "--placement", str(other)], "the plan is for a model"),
        (["--expert-parallel", "2", "--placement", str(tmp_path / "none.json")], "none.json"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def test_local_workers_import_the_drivers_ecserve(tmp_path):
    """Started from a directory holding another `ecserve` (a source checkout), a worker still
    runs the driver's package: `python -m` would import the one in the current directory."""
    from ecserve.parallel.driver import worker_command

    decoy = tmp_path / "ecserve"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy ecserve was imported')\n")
    cmd = worker_command(1, 2, 1, "gloo", 5.0)
    res = subprocess.run([*cmd, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--rank" in res.stdout, res.stderr
    old = subprocess.run([sys.executable, "-m", "ecserve.parallel.worker", "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "decoy" in old.stderr  # what the test guards against


def test_a_signal_to_the_whole_process_group_drains_like_one_process(make_model, tmp_path):
    """Ctrl-C, `kill -- -PGID`, systemd: every process of `serve --expert-parallel 2` gets the
    signal. The worker leaves it to the driver, which drains (the live stream finishes), and
    everything exits 0 with no error logged."""
    import os
    import signal

    from serving import BackgroundStream, health, serve_process, wait_for

    from ecserve.parallel.group import free_port

    model = make_model(num_layers=8)
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    proc = serve_process(log_path, "--model", str(model), "--port", str(port), "--no-metrics",
                         "--device", "cpu", "--expert-parallel", "2", "--grace-period", "60",
                         new_session=True)
    try:
        wait_for(lambda: health(address) == "SERVING", 90, f"SERVING:\n{log_path.read_text()}")
        stream = BackgroundStream(address, "group", 200)
        assert stream.first.wait(60), log_path.read_text()
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd does
        assert proc.wait(timeout=90) == 0, log_path.read_text()
        stream.thread.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log_path.read_text()
    from ecserve.v1 import generation_pb2 as pb

    assert stream.messages[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS, text
    assert " ERROR " not in text and "CRITICAL" not in text and "Traceback" not in text, text


def test_the_workers_stop_when_rank_0s_engine_fails_to_build(make_model):
    """The group starts before rank 0's engine (the runner is made with it); an engine that
    fails to build stops the workers, which had no setup yet, cleanly."""
    script = f"""
from ecserve.config import ConfigError, EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.weights import read_config
from ecserve.parallel.driver import ExpertParallel

model = {str(make_model())!r}
ep = ExpertParallel(read_config(model), 2, timeout_s=60)
try:
    Engine(model, EngineConfig(device="cpu", kv_cache_bytes=1), lockstep=ep.attach)
except ConfigError as e:
    print("engine:", e)
ep.close()
print("workers:", [p.wait(30) for p in ep.workers])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "holds no block" in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("workers: [0]"), proc.stdout + proc.stderr[-2000:]

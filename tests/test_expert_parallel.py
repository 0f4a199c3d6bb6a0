"""Expert parallelism (issue 8): 2 processes on CPU with gloo give the single-process output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expert_parallel_driver import engine_config, serve

from ecserve.engine.engine import Engine
from ecserve.parallel.group import Placement
from ecserve.parallel.moe_ep import home_range

DRIVER = Path(__file__).with_name("expert_parallel_driver.py")


def run_parallel(model_dir: Path, world: int, scope: str, out: Path, placement: str) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), str(model_dir), str(world), scope,
                           str(out), placement], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


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
    assert got["groups"] == want["groups"]  # the same steps and routing groups
    assert got["tokens"] == want["tokens"]
    assert len(got["logits"]) == len(want["logits"])
    for g, w in zip(got["logits"], want["logits"], strict=True):
        assert g.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(g[k], w[k], atol=1e-5, rtol=0)


def test_contiguous_placement_and_home_ranges():
    assert Placement.contiguous(4, 2).owner == (0, 0, 1, 1)
    assert Placement.contiguous(6, 4).owner == (0, 0, 1, 2, 2, 3)
    assert Placement.contiguous(6, 4).owned(2) == [3, 4]
    with pytest.raises(ValueError, match="at least 3 experts"):
        Placement.contiguous(2, 3)
    for n in (1, 2, 5, 17):
        for world in (2, 3):
            spans = [home_range(r, world, n) for r in range(world)]
            covered = [t for lo, hi in spans for t in range(lo, hi)]
            assert covered == list(range(n))
            assert all(home_range(t * world // n, world, n)[0] <= t for t in range(n))


def test_serve_expert_parallel_streams_the_single_process_tokens(make_model, tmp_path):
    """`ecserve serve --expert-parallel 2`: greedy tokens over gRPC (sequence scope, two
    concurrent streams) equal a single-process engine's."""
    import os
    import signal
    import threading
    import time

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

    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "ECSERVE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecserve", "serve", "--model", str(model), "--host",
             "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--device", "cpu",
             "--dtype", "float32", "--kv-cache-bytes", str(1 << 22), "--torch-threads", "1",
             "--expert-parallel", "2"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < end, log_path.read_text()
            try:
                with Client(address, timeout=2) as c:
                    if c.health() == "SERVING":
                        break
            except Exception:
                pass
            time.sleep(0.1)
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "worker 1: " in log_path.read_text()  # the worker followed the steps and stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

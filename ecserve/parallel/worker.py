"""A worker rank (1..world-1): load the model with only its experts, then follow rank 0's steps.

python -m ecserve.parallel.worker --rank R --world W [--addr 127.0.0.1] --port P
"""

from __future__ import annotations

import argparse
import logging
import signal

import torch

from ecserve.engine.runner import ModelRunner, model_kernels
from ecserve.model.weights import TORCH_DTYPES, load_model, read_config
from ecserve.parallel.driver import broadcast
from ecserve.parallel.group import ParallelGroup, destroy_group, init_group
from ecserve.parallel.moe_ep import owned_experts, shard_experts

log = logging.getLogger(__name__)


def run_worker(group: ParallelGroup, local_rank: int | None = None) -> int:
    """Build this rank's model and KV cache from rank 0's setup, then run steps until 'stop'.

    The model directory must exist at the same path on every machine. On CUDA each rank uses
    the device of its local rank (torchrun's LOCAL_RANK; the rank on one machine)."""
    setup = broadcast(None)
    assert isinstance(setup, dict)
    if setup.get("stop"):  # rank 0's engine failed to build: nothing to load
        return 0
    torch.set_num_threads(setup["num_threads"])
    device = torch.device(setup["device"])
    if device.type == "cuda":
        device = torch.device("cuda", group.rank if local_rank is None else local_rank)
        torch.cuda.set_device(device)
    cfg = read_config(setup["model_dir"])
    # Only this rank's experts are read from the checkpoint (the loader's expert filter).
    model = load_model(setup["model_dir"], cfg, device,
                       TORCH_DTYPES[setup["dtype"]],
                       experts=owned_experts(setup["placement"], group.rank),
                       kernels=model_kernels(setup["kernels"], device))
    runner = ModelRunner(model, setup["num_blocks"], setup["block_size"])
    shard_experts(model, group, setup["placement"])
    log.info("expert-parallel worker %d holds experts %s; w_gate shapes %s", group.rank,
             owned_experts(setup["placement"], group.rank),
             {b.moe.layer: list(b.moe.w_gate.shape) for b in model.layers if b.moe is not None})
    steps = 0
    while True:
        kind, plan = broadcast(None)
        if kind == "stop":
            return steps
        runner.execute(plan, False)  # logits discarded: rank 0 samples
        steps += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ecserve.parallel.worker")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    # Ctrl-C in a terminal, `kill -- -PGID` and systemd signal the whole process group. The
    # driver drains (these ranks keep computing its steps meanwhile), then sends 'stop'; a
    # worker that died first would fail every live request. Signals are the driver's.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO)
    group = init_group(a.rank, a.world, a.addr, a.port, a.backend, a.timeout)
    try:
        steps = run_worker(group)
        log.info("expert-parallel worker %d: %d steps, stopping", a.rank, steps)
    finally:
        destroy_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

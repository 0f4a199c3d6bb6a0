"""Expert parallelism across processes on torch.distributed (issue 8, execution slice).

group.py: the process group; moe_ep.py: the expert-parallel MoE dispatch/combine, running the
planner's per-layer placement (ecserve.placement.Placement), with its traffic counter;
driver.py: rank 0's lockstep runner; worker.py: the other ranks' loop.
"""

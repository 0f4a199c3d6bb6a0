"""Expert parallelism across processes on torch.distributed (issue 8, execution slice).

group.py: the process group and the expert placement; moe_ep.py: the expert-parallel MoE
dispatch/combine; runner.py: rank 0's lockstep runner; worker.py: the other ranks' loop.
"""

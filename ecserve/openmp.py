"""One CPU-thread policy for every entry point (serve, generate, plan, train, LLM()).

OpenMP threads that spin between parallel regions fight everything else on the cores (gRPC,
the event loop, another job) and steps then take seconds (docs/serving.md, "CPU servers and
OpenMP"), so ecserve makes them passive. The policy is read when torch loads its OpenMP
runtime, so it holds where ecserve is imported first; an explicit setting in the environment
wins. The engine-core process, which owns its cores, spins for a bounded spell instead
(LaunchConfig.engine_openmp).
"""

from __future__ import annotations

import os

GIVEN = "OMP_WAIT_POLICY" in os.environ  # the user's own setting, before ecserve's


def passive_unless_given() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def engine_core_environment(policy: str) -> dict[str, str]:
    """The OpenMP variables the engine-core process starts with: none where the user gave a
    policy; PASSIVE; or "spin": ACTIVE with a bounded spin count (GNU OpenMP spins that long
    between parallel regions, then sleeps)."""
    if GIVEN:
        return {}
    if policy == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}

"""The default placement: each device the same number of experts per layer, in contiguous runs.

With E experts on D devices, device r holds experts [start_r, start_r + share_r) in every MoE
layer, share_r = E // D, plus one for the first E % D devices: shares are equal when D divides
E and differ by at most one otherwise (with D > E, some devices hold none).
"""

from __future__ import annotations

from ecserve.placement.plan import Device, ModelShape, Placement


def balanced_shares(num_experts: int, num_devices: int) -> list[int]:
    """Experts per device: equal, or differing by at most one (the first E % D get one more)."""
    if num_devices < 1:
        raise ValueError(f"devices must be >= 1, got {num_devices}")
    q, r = divmod(num_experts, num_devices)
    return [q + (i < r) for i in range(num_devices)]


def contiguous_owners(num_experts: int, num_devices: int) -> list[int]:
    """owner[e] for the contiguous balanced split."""
    return [dev for dev, n in enumerate(balanced_shares(num_experts, num_devices))
            for _ in range(n)]


def balanced_placement(model: ModelShape, devices: tuple[Device, ...]) -> Placement:
    owners = contiguous_owners(model.num_experts, len(devices))
    layers = {layer: tuple((o,) for o in owners) for layer in model.moe_layers}
    return Placement(model, tuple(devices), "balanced", layers)

"""`ecserve plan`: make (or load) a placement, print it and its predicted cross-device traffic."""

from __future__ import annotations

from pathlib import Path

from ecserve.config import ConfigError, EngineConfig, ModelConfig
from ecserve.placement.affinity import affinity_placement
from ecserve.placement.balanced import balanced_placement
from ecserve.placement.memory import (
    DTYPE_BYTES,
    bytes_per_expert,
    check_fits,
    dense_bytes,
    device_bytes,
    fmt_bytes,
    parse_bytes,
)
from ecserve.placement.options import PlanOptions
from ecserve.placement.plan import Device, ModelShape, Placement, load_plan, save_plan
from ecserve.placement.replicate import replicate_hot_experts
from ecserve.placement.routing_stats import RoutingStats, collect_routing_stats
from ecserve.placement.traffic import cross_device_tokens


def run(model: str | None, args: PlanOptions) -> int:
    """model: the directory to plan for (ModelSource.resolved()); None: the shipped model."""
    from ecserve.model.default import default_model_dir
    from ecserve.model.weights import read_config

    model_dir = Path(model) if model else default_model_dir()
    cfg = read_config(model_dir)
    shape = ModelShape.of(cfg)
    per_expert, dense = bytes_per_expert(cfg), dense_bytes(cfg)
    if args.load:
        given = [f for f, v in (("--devices", args.devices), ("--device-memory",
                                                              args.device_memory),
                                ("--replicate", args.replicate)) if v]
        if given:
            raise ConfigError(f"--load takes the devices and replicas from the file; drop "
                             f"{', '.join(given)}")
        loaded = load_plan(args.load, cfg)
        devices = loaded.devices
    else:
        if args.devices is None or args.devices < 1:
            raise ConfigError(f"--devices must be >= 1 (or --load a plan), got {args.devices}")
        memory = parse_bytes(args.device_memory) if args.device_memory else None
        devices = tuple(Device(i, memory) for i in range(args.devices))
    balanced = balanced_placement(shape, devices)
    check_fits(balanced, per_expert, dense)  # before the (slower) statistics run
    stats = _stats(model_dir, args)
    if args.load:
        plan = loaded
    else:
        plan = balanced if args.strategy == "balanced" else affinity_placement(
            shape, devices, stats, seed=args.seed)
        if args.replicate:
            plan = replicate_hot_experts(plan, stats, per_expert, dense)
    check_fits(plan, per_expert, dense)
    print(report(plan, balanced, stats, cfg, model_dir.name if model else "default"))
    if args.save:
        print(f"saved {save_plan(plan, args.save)}")
    return 0


def _stats(model_dir: Path, args: PlanOptions) -> RoutingStats:
    prompts = None
    if args.prompts:
        prompts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{args.prompts}: no prompts (one per line)")
    elif args.synthetic_requests < 1:
        raise ConfigError(f"--synthetic-requests must be >= 1, got {args.synthetic_requests}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return collect_routing_stats(model_dir, prompts, EngineConfig(
        device=args.device, expert_timing_every=0), synthetic_requests=args.synthetic_requests,
        max_new_tokens=args.max_new_tokens, seed=args.seed)


def report(plan: Placement, balanced: Placement, stats: RoutingStats, cfg: ModelConfig,
           name: str) -> str:
    per_expert, dense = bytes_per_expert(cfg), dense_bytes(cfg)
    mem = plan.devices[0].memory_bytes
    lines = [
        f"model: {name} ({cfg.num_layers} layers, MoE layers {list(plan.model.moe_layers)}, "
        f"{cfg.num_experts} experts of {fmt_bytes(per_expert)} in {cfg.dtype})",
        f"devices: {plan.num_devices} x {'unlimited' if mem is None else fmt_bytes(mem)}; "
        f"strategy: {plan.strategy}{' + replicas' if plan.replicated else ''}",
        "weights per device: " + ", ".join(
            f"{d}: {fmt_bytes(b)}" for d, b in enumerate(device_bytes(plan, per_expert, dense)))
        + f" ({fmt_bytes(dense)} of them non-expert)",
        f"routing statistics: {stats.source}",
        "",
        "experts per device (+N: a replica):",
    ]
    for layer in sorted(plan.layers):
        parts = []
        for dev in range(plan.num_devices):
            own = plan.experts_on(layer, dev, primary_only=True)
            extra = [e for e in plan.experts_on(layer, dev) if e not in own]
            parts.append(f"device {dev}: " + " ".join([*map(str, own),
                                                       *(f"+{e}" for e in extra)]))
        lines.append(f"  layer {layer}: " + " | ".join(parts))
    ours, base = cross_device_tokens(plan, stats), cross_device_tokens(balanced, stats)
    layer0 = min(plan.layers)
    tokens = stats.num_tokens(layer0) / max(stats.num_steps(layer0), 1)
    lines += ["", f"cross-device tokens per step (dispatch, one direction; mean over "
                  f"{stats.num_steps(layer0)} steps of {tokens:.1f} tokens):",
              f"  {'layer':<6} {'plan':>10} {'balanced':>10} {'ratio':>7}"]
    for layer in sorted(ours):
        lines.append(f"  {layer:<6} {ours[layer]:>10.2f} {base[layer]:>10.2f} "
                     f"{_ratio(ours[layer], base[layer]):>7}")
    total, total_base = sum(ours.values()), sum(base.values())
    lines.append(f"  {'all':<6} {total:>10.2f} {total_base:>10.2f} "
                 f"{_ratio(total, total_base):>7}")
    row = cfg.hidden_size * DTYPE_BYTES[cfg.dtype]
    lines.append(f"  = {fmt_bytes(int(total * row))} per step each way "
                 f"({fmt_bytes(int(total_base * row))} balanced) at {row} bytes per token row")
    slots, slots_base = (sum(cross_device_tokens(p, stats, dedup=False).values())
                         for p in (plan, balanced))
    lines.append(f"  ({slots:.2f} and {slots_base:.2f} token rows without dedup: one per "
                 "token and remote expert)")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"

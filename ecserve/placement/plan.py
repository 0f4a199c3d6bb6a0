"""The placement: for every MoE layer, the devices holding each expert; saved as JSON.

JSON (version 1):
    {"version": 1,
     "model": {"num_layers": 4, "moe_layers": [1, 3], "num_experts": 8},
     "devices": [{"id": 0, "memory_bytes": 8589934592}, {"id": 1, "memory_bytes": null}],
     "strategy": "affinity",            # balanced | affinity (+ "replicated": true)
     "replicated": false,
     "layers": {"1": [[0], [1], [1, 0], ...], "3": [...]}}   # per expert: device ids
An expert's first device is its primary (its owner); any further ones hold replicas.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecserve.config import ConfigError, ModelConfig

VERSION = 1
Strategy = Literal["balanced", "affinity"]
STRATEGIES: tuple[Strategy, ...] = typing.get_args(Strategy)


class PlanError(ConfigError):
    """A placement is malformed or does not fit the model or the devices; the message says how."""


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know of a model."""

    num_layers: int
    moe_layers: tuple[int, ...]  # block indices with an MoE layer, ascending
    num_experts: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelShape:
        return cls(cfg.num_layers, tuple(sorted(cfg.moe_layers or ())), cfg.num_experts)


@dataclass(frozen=True)
class Device:
    id: int  # rank, 0..count-1
    memory_bytes: int | None = None  # for weights; None: unlimited (no memory check)


@dataclass(frozen=True)
class Placement:
    model: ModelShape
    devices: tuple[Device, ...]
    strategy: Strategy
    # MoE layer -> per expert the device ids holding it, primary first.
    layers: dict[int, tuple[tuple[int, ...], ...]]

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def replicated(self) -> bool:
        return any(len(h) > 1 for hs in self.layers.values() for h in hs)

    def owners(self, layer: int) -> list[int]:
        """Each expert's primary device."""
        return [h[0] for h in self.layers[layer]]

    def experts_on(self, layer: int, device: int, primary_only: bool = False) -> list[int]:
        return [e for e, h in enumerate(self.layers[layer])
                if (h[0] == device if primary_only else device in h)]

    def experts_per_device(self) -> list[int]:
        """Expert copies each device holds, over all MoE layers (what its memory must hold)."""
        count = [0] * self.num_devices
        for holders in self.layers.values():
            for h in holders:
                for dev in h:
                    count[dev] += 1
        return count

    def validate(self) -> None:
        m, n = self.model, self.num_devices
        if n < 1:
            raise PlanError("devices: a placement needs at least one device")
        ids = [d.id for d in self.devices]
        if ids != list(range(n)):
            raise PlanError(f"devices: ids must be 0..{n - 1} in order, got {ids}")
        for d in self.devices:
            if d.memory_bytes is not None and (not isinstance(d.memory_bytes, int)
                                               or d.memory_bytes < 1):
                raise PlanError(f"devices[{d.id}].memory_bytes must be a positive int or null, "
                                f"got {d.memory_bytes!r}")
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if set(self.layers) != set(m.moe_layers):
            raise PlanError(f"layers: the plan places layers {sorted(self.layers)}, the model's "
                            f"MoE layers are {list(m.moe_layers)}")
        for layer, holders in self.layers.items():
            if len(holders) != m.num_experts:
                raise PlanError(f"layers.{layer}: {len(holders)} experts placed, the model has "
                                f"{m.num_experts}")
            for e, h in enumerate(holders):
                if not h:
                    raise PlanError(f"layers.{layer}[{e}]: expert {e} is on no device")
                bad = [dev for dev in h if not (isinstance(dev, int) and 0 <= dev < n)]
                if bad:
                    raise PlanError(f"layers.{layer}[{e}]: device id(s) {bad} outside "
                                    f"[0, {n}) (the plan has {n} devices)")
                if len(set(h)) != len(h):
                    raise PlanError(f"layers.{layer}[{e}]: expert {e} lists a device twice: "
                                    f"{list(h)}")

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise PlanError unless the plan was made for a model of cfg's shape."""
        if self.model != ModelShape.of(cfg):
            raise PlanError(f"the plan is for a model with {_shape(self.model)}; this model has "
                            f"{_shape(ModelShape.of(cfg))}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "model": {"num_layers": self.model.num_layers,
                      "moe_layers": list(self.model.moe_layers),
                      "num_experts": self.model.num_experts},
            "devices": [{"id": d.id, "memory_bytes": d.memory_bytes} for d in self.devices],
            "strategy": self.strategy,
            "replicated": self.replicated,
            "layers": {str(layer): [list(h) for h in self.layers[layer]]
                       for layer in sorted(self.layers)},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Placement:
        if not isinstance(data, dict):
            raise PlanError(f"a placement is a JSON object, got {type(data).__name__}")
        missing = [k for k in ("version", "model", "devices", "strategy", "layers")
                   if k not in data]
        if missing:
            raise PlanError(f"missing key(s): {', '.join(missing)}")
        if data["version"] != VERSION:
            raise PlanError(f"version: {data['version']!r} is not supported (this is {VERSION})")
        m = data["model"]
        try:
            shape = ModelShape(int(m["num_layers"]), tuple(sorted(int(i) for i in m["moe_layers"])),
                               int(m["num_experts"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError("model: expected {num_layers, moe_layers, num_experts} "
                            f"({type(e).__name__}: {e})") from e
        devs = data["devices"]
        if not isinstance(devs, list) or not all(isinstance(d, dict) and "id" in d
                                                 for d in devs):
            raise PlanError("devices: expected a list of {id, memory_bytes} objects")
        devices = tuple(Device(d["id"], d.get("memory_bytes")) for d in devs)
        raw = data["layers"]
        if not isinstance(raw, dict):
            raise PlanError("layers: expected an object mapping layer index to expert lists")
        layers: dict[int, tuple[tuple[int, ...], ...]] = {}
        for key, holders in raw.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise PlanError(f"layers: key {key!r} is not a layer index")
            if not isinstance(holders, list) or not all(isinstance(h, list) for h in holders):
                raise PlanError(f"layers.{key}: expected one list of device ids per expert")
            layers[int(key)] = tuple(tuple(h) for h in holders)
        plan = cls(shape, devices, data["strategy"], layers)
        if "replicated" in data and data["replicated"] != plan.replicated:
            raise PlanError(f"replicated: says {data['replicated']}, but the layers "
                            f"{'do' if plan.replicated else 'do not'} hold replicas")
        return plan


def _shape(m: ModelShape) -> str:
    return f"{m.num_layers} layers, MoE layers {list(m.moe_layers)}, {m.num_experts} experts"


def save_plan(plan: Placement, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(plan_json(plan))
    return path


def plan_json(plan: Placement) -> str:
    """The plan's JSON, one line per top-level key and per layer (diffs stay readable)."""
    data = plan.to_dict()
    layers = data.pop("layers")
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in data.items()]
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layers.items()]
    return "{\n" + "\n".join(lines) + '\n "layers": {\n' + ",\n".join(rows) + "\n }\n}\n"


def load_plan(path: str | Path, cfg: ModelConfig | None = None) -> Placement:
    """Read and validate a placement; with cfg, also check it is for that model's shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not JSON ({e})") from e
    try:
        plan = Placement.from_dict(data)
        if cfg is not None:
            plan.check_model(cfg)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from e
    return plan

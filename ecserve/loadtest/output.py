"""The --json file: metrics, errors, targets, the config, where it ran, the server's model."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ecserve.errors import ConfigError
from ecserve.loadtest.config import LoadTestConfig
from ecserve.loadtest.environment import hardware
from ecserve.loadtest.records import LoadTestResult
from ecserve.loadtest.targets import Verdict

SCHEMA = "ecserve.bench/v1"


def result_document(result: LoadTestResult, cfg: LoadTestConfig,
                    verdicts: list[Verdict] | None = None,
                    save_requests: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "start_time": result.start_time,
        "config": dataclasses.asdict(cfg),
        "load": {"mode": "open" if cfg.open_loop else "closed",
                 "stopped_by": result.stopped_by, "sent": result.sent,
                 "succeeded": result.succeeded, "failed": result.failed,
                 "max_in_flight": result.max_in_flight,
                 "warmup_requests": cfg.warmup_requests, "warmup_failed": result.warmup_failed},
        "metrics": result.metrics,
        "errors": result.errors,
        "targets": None if verdicts is None else [v.to_dict() for v in verdicts],
        "passed": None if verdicts is None else all(v.passed for v in verdicts),
        "server": {"address": cfg.target(), "protocol": cfg.protocol,
                   "model_info": result.model_info, "memory": result.server_memory},
        "environment": hardware(),
    }
    if save_requests:
        doc["requests"] = [r.to_dict() for r in result.requests]
    return _finite(doc)


def check_writable(flag: str, directory: Path) -> None:
    """Fail before the run, not after it: make `directory` and write a scratch file there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write in {directory}: {e.strerror or e}") from None


def write_json(path: str, doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _finite(x: Any) -> Any:
    """inf and nan as strings ("inf": --request-rate inf), so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x

"""`ecserve bench`: a gRPC load generator with vLLM's serving metrics.

    from ecserve.loadtest import LoadTestConfig, run_load_test
    result = run_load_test(LoadTestConfig(address="127.0.0.1:50051", concurrency=8,
                                          num_requests=64, input_len=128, output_len=128))
    print(result.metrics["output_throughput"], result.metrics["p99_itl_ms"], result.errors)
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so `ecserve`'s argument parser does not load grpc.aio and numpy.
_EXPORTS = {
    "LoadTestConfig": "ecserve.loadtest.config",
    "LoadTestResult": "ecserve.loadtest.records",
    "RequestRecord": "ecserve.loadtest.records",
    "ServerUnreachable": "ecserve.loadtest.transport",
    "run_load_test": "ecserve.loadtest.run",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecserve.loadtest' has no attribute {name!r}")

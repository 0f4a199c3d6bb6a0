"""The generated gRPC code matches protos/, and the client sees the API it describes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ecserve.v1 import generation_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_service_shape():
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse"),
        "GenerateStream": ("GenerateRequest", "GenerateResponse"),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse"),
        "ModelInfo": ("ModelInfoRequest", "ModelInfoResponse"),
    }
    reasons = set(pb.StopReason.keys())
    assert {"STOP_REASON_MAX_TOKENS", "STOP_REASON_EOS_TOKEN", "STOP_REASON_STOP_SEQUENCE",
            "STOP_REASON_CANCELLED", "STOP_REASON_TIME_LIMIT", "STOP_REASON_ERROR"} <= reasons

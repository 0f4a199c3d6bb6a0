"""docs/serving.md's grpcurl walkthrough: `ecserve serve` on the default model, then grpcurl through
reflection lists and describes the API, reads health, streams a generation, and gets
INVALID_ARGUMENT naming the field for a bad request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import serve_args

from ecserve.parallel.group import free_port

BIN = Path(sys.executable).parent
HEALTH = "grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def address():
    port = free_port()
    proc = subprocess.Popen([BIN / "ecserve", *serve_args("--port", str(port), "--metrics-port",
                                                          "0", "--http-port", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    addr = f"127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while '"SERVING"' not in grpcurl(addr, HEALTH, data="{}").stdout:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                pytest.fail(f"server did not come up:\n{proc.communicate()[0]}")
            time.sleep(0.2)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0


def grpcurl(address: str, *command: str, data: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    flags = ["-d", data] if data is not None else []
    return subprocess.run([BIN / "grpcurl", "-plaintext", *flags, address, *command],
                          capture_output=True, text=True, timeout=60)


def test_list_and_describe_through_reflection(address):
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"ecserve.v1.GenerationService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(address, "describe", "ecserve.v1.GenerationService.GenerateStream")
    assert described.returncode == 0, described.stderr
    assert "rpc GenerateStream ( .ecserve.v1.GenerateRequest ) returns ( stream" in (
        described.stdout)


def test_health_and_a_streamed_generation(address):
    health = grpcurl(address, HEALTH, data='{"service": ""}')
    assert json.loads(health.stdout) == {"status": "SERVING"}
    out = grpcurl(address, "ecserve.v1.GenerationService/GenerateStream",
                  data='{"prompt": "def main():", '
                       '"stopping": {"max_new_tokens": 4, "ignore_eos": true}}')
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    # One message per step with a token, or fewer where the reader fell behind (the tokens
    # that piled up go out together, docs/serving.md): the counts rise to 4.
    counts = [m["generated_token_count"] for m in messages]
    assert 1 <= len(messages) <= 4 and counts == sorted(set(counts)), counts
    assert messages[-1]["stop_reason"] == "STOP_REASON_MAX_TOKENS"
    assert messages[-1]["generated_token_count"] == 4


def test_a_bad_request_names_its_field(address):
    out = grpcurl(address, "ecserve.v1.GenerationService/Generate",
                  data='{"prompt": "Hello", "sampling": {"top_p": 1.5}}')
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr
    assert "Message: sampling.top_p" in out.stderr

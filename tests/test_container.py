"""The image, built and run (issue 16): deploy/build-image.sh (mmdebstrap base, podman build),
then the container on loopback: health (ecserve health and grpcurl), a streamed generation,
non-root, a read-only root filesystem, the CPU ops built and the decode step compiled, /metrics,
and SIGTERM draining a live stream to exit 0.

Slow (minutes) and needs podman, runc and mmdebstrap: `.ci/run` installs them where it can;
elsewhere the test skips. The image is built once per session and kept (reused next time when
the sources have not changed: podman's layer cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from serving import health, wait_for

from ecserve.client import Client
from ecserve.parallel.group import free_port

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/ecserve:test"
TOOLS = ("podman", "mmdebstrap", "runc")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS) or os.geteuid() != 0,
    reason="needs podman, mmdebstrap and runc, as root")
PODMAN = ["podman", "--runtime", "runc"]
# This host's defaults exceed what its runc may set for a container: lower, explicit limits.
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]


def build_env() -> dict[str, str]:
    env = dict(os.environ)
    wheels = Path(os.environ.get("ECSERVE_WHEEL_DIR", "/opt/wheels"))
    torch_wheels = sorted(wheels.glob("torch-*.whl")) if wheels.is_dir() else []
    if torch_wheels:  # PyTorch's index is out of reach here: the wheel on disk
        env["WHEEL_DIR"] = str(wheels)
        version = torch_wheels[-1].name.split("-")[1].split("+")[0]
        env["TORCH_SPEC"] = f"torch=={version}"
    bundle = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    if Path(bundle).is_file():
        env["CA_BUNDLE"] = bundle
    return env


@pytest.fixture(scope="session")
def image() -> str:
    t0 = time.monotonic()
    out = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), TAG], env=build_env(),
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    print(out.stderr.strip().splitlines()[-1], f"({time.monotonic() - t0:.0f} s)")
    return TAG


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def test_the_cpu_image_carries_no_cuda_and_no_triton(image):
    code = ("import importlib.util, torch; print(torch.version.cuda, "
            "importlib.util.find_spec('triton'))")
    out = podman("run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "python", image,
                 "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
    # Built in Docker format, so the Dockerfile's HEALTHCHECK is in the image.
    check = podman("image", "inspect", "--format", "{{.Config.Healthcheck.Test}}", image)
    assert "ecserve health --address 127.0.0.1:50051" in check.stdout


def test_the_container_serves_read_only_as_non_root_and_drains_on_sigterm(image):
    port, metrics, http_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    name = f"ecserve-test-{port}"
    run = podman("run", "-d", "--name", name, "--network", "host", "--read-only",
                 "--tmpfs", "/tmp", *LIMITS, image, "serve", "--host", "127.0.0.1", "--port",
                 str(port), "--metrics-port", str(metrics), "--http-port", str(http_port),
                 "--grace-period", "20")
    assert run.returncode == 0, run.stderr
    try:
        wait_for(lambda: health(address) == "SERVING" or "Exited" in podman(
            "ps", "-a", "--filter", f"name={name}", "--format", "{{.Status}}").stdout,
            300, "the container to serve")  # a cold cache: the CPU ops' build, the compile
        logs = podman("logs", name)
        assert health(address) == "SERVING", logs.stdout + logs.stderr
        # The CPU ops built and the decode step compiled in the container (its cache volume
        # is writable under a read-only root).
        assert "compiled the decode step" in logs.stdout + logs.stderr, logs.stderr
        assert "CPU ops unavailable" not in logs.stdout + logs.stderr, logs.stderr
        cli = subprocess.run([sys.executable, "-m", "ecserve", "health", "--address", address],
                             capture_output=True, text=True, timeout=60)
        assert cli.stdout.strip() == "SERVING"
        grpcurl = subprocess.run([str(Path(sys.executable).parent / "grpcurl"), "-plaintext",
                                  address, "grpc.health.v1.Health/Check"],
                                 capture_output=True, text=True, timeout=60)
        assert '"SERVING"' in grpcurl.stdout, grpcurl.stderr
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/opt/x").returncode != 0  # read-only root
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            assert b"ecserve_engine_core_process_resident_memory_bytes" in r.read()
        with Client(address, timeout=60) as c:
            assert len(list(c.stream("def main():", max_new_tokens=8))) >= 1
        # The OpenAI-compatible API on its port.
        body = json.dumps({"prompt": "def main():", "max_tokens": 8}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 8

        messages: list[object] = []
        started = threading.Event()

        def stream() -> None:
            with Client(address, timeout=60) as c:
                for m in c.stream("def long():", max_new_tokens=400, ignore_eos=True):
                    messages.append(m)
                    started.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(30)
        t0 = time.monotonic()
        assert podman("kill", "--signal", "TERM", name).returncode == 0
        code = podman("wait", name, timeout=60).stdout.strip()
        reader.join(10)
        assert code == "0", podman("logs", name).stdout
        assert time.monotonic() - t0 < 20
        assert messages and messages[-1].generated_token_count == 400
    finally:
        podman("rm", "-f", name)

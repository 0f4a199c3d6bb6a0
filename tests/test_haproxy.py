"""Two ecserve replicas behind HAProxy (deploy/haproxy/haproxy.cfg), checked on /readyz (gRPC)
and /health (the HTTP API): calls spread over both, and every call of a load, over either
protocol, succeeds while one replica is drained by SIGTERM. Loopback only."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from serving import wait_for
from test_envoy import Replica, bench, outcome

from ecserve.client import Client
from ecserve.parallel.group import free_port

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")


def test_haproxy_checks_readyz_and_rides_out_a_drain(make_model, tmp_path):
    model = make_model()
    replicas = [Replica(model, tmp_path, name) for name in ("a", "b")]
    proxy = None
    try:
        for r in replicas:
            r.wait_serving()
        port, http_port = free_port(), free_port()
        servers = "\n".join(f"    server {n} 127.0.0.1:{r.port} proto h2 check port "
                            f"{r.metrics_port} check-proto h1"
                            for n, r in zip("ab", replicas, strict=True))
        http_servers = "\n".join(f"    server {n} 127.0.0.1:{r.http_port} check"
                                 for n, r in zip("ab", replicas, strict=True))
        config = tmp_path / "haproxy.cfg"
        config.write_text(CONFIG.read_text().replace("@LISTEN_PORT@", str(port))
                          .replace("@HTTP_LISTEN_PORT@", str(http_port))
                          .replace("@SERVERS@", servers)
                          .replace("@HTTP_SERVERS@", http_servers))
        check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = tmp_path / "haproxy.log"
        with open(log, "w") as out:
            proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        address = f"127.0.0.1:{port}"

        def answers() -> bool:
            try:
                with Client(address, timeout=2) as c:
                    return c.model_info().vocab_size > 0
            except Exception:
                return False

        wait_for(answers, 30, "HAProxy to pass calls")
        run = bench(address, tmp_path, "steady", 40, 16)
        assert run.wait(timeout=300) == 0, log.read_text()
        assert outcome(tmp_path, "steady") == {"sent": 40, "succeeded": 40, "failed": 0}
        assert all(r.finished() > 0 for r in replicas)  # both took work

        http_address = f"127.0.0.1:{http_port}"
        run = bench(http_address, tmp_path, "http-steady", 20, 16, "http")
        assert run.wait(timeout=300) == 0, log.read_text()
        assert outcome(tmp_path, "http-steady") == {"sent": 20, "succeeded": 20, "failed": 0}
        assert sum(r.finished() for r in replicas) == 60

        # Both protocols at once through the drain.
        run = bench(address, tmp_path, "sigterm", 120, 32)
        http_run = bench(http_address, tmp_path, "http-sigterm", 60, 32, "http")
        time.sleep(2)
        replicas[0].proc.send_signal(signal.SIGTERM)
        assert replicas[0].proc.wait(timeout=60) == 0
        run.wait(timeout=300)
        http_run.wait(timeout=300)
        assert outcome(tmp_path, "sigterm") == {"sent": 120, "succeeded": 120, "failed": 0}, (
            log.read_text())
        assert outcome(tmp_path, "http-sigterm") == {"sent": 60, "succeeded": 60,
                                                     "failed": 0}, log.read_text()
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait(timeout=10)
        for r in replicas:
            r.stop()

"""deploy/k8s/: the manifests validate against Kubernetes' schemas (kubernetes-validate,
strict), and hold what a replica needs to be stopped and probed right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def docs() -> list[dict]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def test_every_manifest_validates_strictly():
    pytest.importorskip("kubernetes_validate")
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict",
                          *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == len(docs())


def test_everything_lives_in_the_ecserve_namespace():
    for d in docs():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "ecserve", d["metadata"]["name"]


def arg(args: list[str], flag: str) -> float:
    return float(next(a.split("=", 1)[1] for a in args if a.startswith(flag + "=")))


def test_the_deployment_stops_and_probes_a_replica_right():
    (deploy,) = [d for d in docs() if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # Deleting a pod: the preStop pause, then the drain's grace; the kill comes after both.
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + arg(c["args"], "--grace-period")
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    (service,) = [d for d in docs() if d["kind"] == "Service" and d["metadata"]["name"] ==
                  "ecserve"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "http", "metrics"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Non-root, read-only root filesystem, a writable /tmp for the engine core's sockets.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # The engine's torch threads leave the front end one core of the CPU request.
    assert arg(c["args"], "--torch-threads") == float(c["resources"]["requests"]["cpu"]) - 1


def test_the_scrape_config_keeps_the_annotated_ecserve_pods():
    # (Debian's promtool is built without Kubernetes discovery, so it cannot check this one.)
    (cm,) = [d for d in docs() if d["kind"] == "ConfigMap"]
    (job,) = yaml.safe_load(cm["data"]["prometheus.yml"])["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep == {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "ecserve",
                    "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true"}

"""TLS, mutual TLS and API keys (ecserve/server/auth.py, ecserve/security.py): through the
Python client, `ecserve health` and grpcurl, with certificates made here by openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from serving import ServerThread, serve_args

from ecserve.client import Client
from ecserve.config import ConfigError, EngineConfig, ServerConfig
from ecserve.engine.engine import Engine
from ecserve.security import ClientSecurity, SecurityError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
GRPCURL = Path(sys.executable).parent / "grpcurl"
KEY = "s3cret-key-with-some-length"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return cert, key


def issue(d: Path, ca: tuple[Path, Path], name: str, san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem",
                           d / f"{name}.ext")
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key),
            "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca(d, "ca"), make_ca(d, "rogue")
    server = issue(d, ca, "server", "DNS:localhost,IP:127.0.0.1")
    client = issue(d, ca, "client", "DNS:client")
    stranger = issue(d, rogue, "stranger", "DNS:stranger")
    keys = d / "keys"
    keys.write_text(f"# rotated keys\nold-key-still-valid\n{KEY}\n")
    return {"ca": ca[0], "server_cert": server[0], "server_key": server[1],
            "client_cert": client[0], "client_key": client[1], "stranger_cert": stranger[0],
            "stranger_key": stranger[1], "keys": keys}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    from conftest import tiny_config

    from ecserve.config import ModelConfig
    from ecserve.model.default import write_model

    path = write_model(tmp_path_factory.mktemp("m") / "model",
                       ModelConfig.from_dict(tiny_config()), 0)
    return Engine(path, EngineConfig(device="cpu"))


def grpcurl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GRPCURL), *args, address, "grpc.health.v1.Health/Check"],
                          capture_output=True, text=True, timeout=60)


def test_tls_serves_clients_that_trust_its_ca_only(engine, pki):
    with ServerThread(engine, tls_cert_file=str(pki["server_cert"]),
                      tls_key_file=str(pki["server_key"])) as s:
        with Client(s.address, timeout=10, security=ClientSecurity(ca_file=str(pki["ca"]))) as c:
            assert c.generate("hi", max_new_tokens=3).generated_token_count == 3
        with Client(s.address, timeout=5) as c, pytest.raises(grpc.RpcError) as plain:
            c.health()
        assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
        wrong = ClientSecurity(ca_file=str(pki["stranger_cert"]))  # not the server's CA
        with Client(s.address, timeout=5, security=wrong) as c, pytest.raises(grpc.RpcError):
            c.health()
        ok = grpcurl(s.address, "-cacert", str(pki["ca"]))
        assert ok.returncode == 0 and '"SERVING"' in ok.stdout, ok.stderr
        assert grpcurl(s.address, "-plaintext").returncode != 0


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(engine, pki):
    with ServerThread(engine, tls_cert_file=str(pki["server_cert"]),
                      tls_key_file=str(pki["server_key"]),
                      tls_client_ca_file=str(pki["ca"])) as s:
        good = ClientSecurity(ca_file=str(pki["ca"]), cert_file=str(pki["client_cert"]),
                              key_file=str(pki["client_key"]))
        with Client(s.address, timeout=10, security=good) as c:
            assert c.health() == "SERVING"
            assert c.generate("hi", max_new_tokens=2).generated_token_count == 2
        for bad in (ClientSecurity(ca_file=str(pki["ca"])),
                    ClientSecurity(ca_file=str(pki["ca"]), cert_file=str(pki["stranger_cert"]),
                                   key_file=str(pki["stranger_key"]))):
            with Client(s.address, timeout=5, security=bad) as c, \
                    pytest.raises(grpc.RpcError) as refused:
                c.health()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        ok = grpcurl(s.address, "-cacert", str(pki["ca"]), "-cert", str(pki["client_cert"]),
                     "-key", str(pki["client_key"]))
        assert ok.returncode == 0 and '"SERVING"' in ok.stdout, ok.stderr
        assert grpcurl(s.address, "-cacert", str(pki["ca"])).returncode != 0
        # The HTTP API on the same certificate and CA: a client certificate or no handshake.
        url = f"https://127.0.0.1:{s.server.http_port}/health"
        trusted = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((ssl.SSLError, OSError)):
            urllib.request.urlopen(url, timeout=10, context=trusted).read()
        trusted.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        with urllib.request.urlopen(url, timeout=10, context=trusted) as r:
            assert r.status == 200


def test_api_keys_unauthenticated_without_one_and_health_stays_open(engine, pki):
    with ServerThread(engine, api_key_file=str(pki["keys"])) as s:
        for key in (None, "wrong", KEY[:-1], KEY + "x"):
            with Client(s.address, timeout=10, security=ClientSecurity(api_key=key)) as c:
                assert c.health() == "SERVING"  # open by default, for balancers and probes
                for call in (lambda: c.generate("hi", max_new_tokens=2),
                             lambda: list(c.stream("hi", max_new_tokens=2)), c.model_info):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                    assert "authorization: Bearer" in refused.value.details()
        for key in (KEY, "old-key-still-valid"):
            with Client(s.address, timeout=10, security=ClientSecurity(api_key=key)) as c:
                assert len(list(c.stream("hi", max_new_tokens=3))) >= 1
                assert c.model_info().vocab_size > 0
        text = s.server.metrics.exposition().decode()
        assert ('ecserve_requests_rejected_total{code="UNAUTHENTICATED",protocol="grpc"} 12.0'
                in text)
        # grpcurl: reflection needs the key by default, health does not.
        listed = subprocess.run([str(GRPCURL), "-plaintext", s.address, "list"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode != 0 and "Unauthenticated" in listed.stderr
        listed = subprocess.run([str(GRPCURL), "-plaintext", "-H",
                                 f"authorization: Bearer {KEY}", s.address, "list"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "ecserve.v1.GenerationService" in listed.stdout
        # grpcurl finds even the health method through reflection, so it needs the key too.
        assert grpcurl(s.address, "-plaintext").returncode != 0
        assert '"SERVING"' in grpcurl(s.address, "-plaintext", "-H",
                                      f"authorization: Bearer {KEY}").stdout


def test_open_services_none_guards_health_too_and_the_cli_sends_the_key(engine, pki, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with ServerThread(engine, api_key_file=str(pki["keys"]), open_services=()) as s:
        with Client(s.address, timeout=10) as c, pytest.raises(grpc.RpcError) as refused:
            c.health()
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        health = [sys.executable, "-m", "ecserve", "health", "--address", s.address]
        assert subprocess.run(health, capture_output=True, timeout=60).returncode == 1
        out = subprocess.run([*health, "--api-key-file", str(key_file)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        bench = [sys.executable, "-m", "ecserve", "bench", "--address", s.address,
                 "--num-requests", "3", "--input-len", "8", "--output-len", "4"]
        out = subprocess.run([*bench, "--api-key-file", str(key_file)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert subprocess.run(bench, capture_output=True, timeout=120).returncode != 0


def test_bad_security_settings_are_refused_naming_them(pki, tmp_path):
    with pytest.raises(ConfigError, match="certificate and its key"):
        ServerConfig(tls_cert_file=str(pki["server_cert"]))
    with pytest.raises(ConfigError, match="needs TLS"):
        ServerConfig(tls_client_ca_file=str(pki["ca"]))
    with pytest.raises(ConfigError, match="open_services"):
        ServerConfig(open_services=("everything",))
    with pytest.raises(SecurityError, match="needs its key"):
        ClientSecurity(cert_file=str(pki["client_cert"]))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    out = subprocess.run([sys.executable, "-m", "ecserve",
                          *serve_args("--api-key-file", str(empty), "--port", "0")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no key in it" in out.stderr, out.stderr

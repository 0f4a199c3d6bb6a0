"""The `ecserve` command as a newcomer meets it, in real processes: Ctrl-C in client, generate,
bench and a loading serve is one line and exit 130 (bench still reports what it measured; a
server drains), prompts that are not UTF-8, several prompts, a prompt on standard input, and a
port in use said in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import ServerThread, serve_args

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.llm import LLM
from ecserve.request import SamplingParams

INTERRUPTED = "ecserve: interrupted\n"


def ecserve(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecserve", *args], input=stdin,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def start(*args: str) -> subprocess.Popen[bytes]:
    """`ecserve ARGS` in a process group of its own, as a terminal runs it (Ctrl-C signals
    the whole group); output unbuffered."""
    return subprocess.Popen([sys.executable, "-m", "ecserve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ctrl_c(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from ecserve.model.default import write_model

    return write_model(tmp_path_factory.mktemp("cli-process") / "model")


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(Engine(model, EngineConfig(device="cpu"))) as s:
        yield s


def test_generate_refuses_a_prompt_that_is_not_utf8(model):
    res = ecserve("generate", b"abc\xff", "--model", str(model))  # $'abc\xff' in a shell
    assert res.returncode == 2
    assert res.stderr == (b"ecserve: error: prompt: not valid UTF-8 (byte 0xff at offset 3)\n")


def test_generate_several_prompts_and_one_from_standard_input(model):
    llm = LLM(model, EngineConfig(device="cpu"))
    params = SamplingParams(max_new_tokens=4)
    want = [o.text for o in llm.generate(["ab", "cd"], params)]
    res = ecserve("generate", "ab", "-", "--model", str(model), "--max-new-tokens", "4",
                  stdin=b"cd")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == f"--- 1 ---\n{want[0]}\n--- 2 ---\n{want[1]}\n"
    lines = res.stderr.decode().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[prompt 1", "[prompt 2"]


def test_a_prompt_past_the_argument_limit_comes_on_standard_input(model):
    """A 180 KB prompt fails as an argument (`Argument list too long`); from standard input it
    reaches the engine, which answers that it exceeds the context."""
    res = ecserve("generate", "-", "--model", str(model), stdin=b"x" * 180_000)
    assert res.returncode == 2
    assert res.stderr.decode().startswith("ecserve: error: prompt (180001 tokens) + "
                                          "max_new_tokens (64)")


def test_ctrl_c_in_generate_is_one_line(model):
    proc = start("generate", "hello", "--model", str(model), "--max-new-tokens", "2000",
                 "--device", "cpu")
    assert proc.stdout is not None
    proc.stdout.read(1)  # generating
    code, _, err = ctrl_c(proc)
    assert (code, err) == (130, INTERRUPTED)


def test_ctrl_c_in_client_is_one_line(server):
    proc = start("client", "hello", "--address", server.address, "--max-new-tokens", "1500")
    assert proc.stdout is not None
    proc.stdout.read(1)  # streaming
    code, _, err = ctrl_c(proc)
    assert (code, err) == (130, INTERRUPTED)


def test_ctrl_c_in_bench_reports_what_it_measured(server, tmp_path):
    out = tmp_path / "run.json"
    proc = start("bench", "--address", server.address, "--metrics-url", "",
                 "--num-requests", "100000", "--concurrency", "2", "--input-len", "8",
                 "--output-len", "32", "--json", str(out))
    time.sleep(4)
    code, report, err = ctrl_c(proc)
    assert code == 130, err
    assert "Serving Benchmark Result" in report and "Traceback" not in err
    assert err.endswith(INTERRUPTED)
    doc = json.loads(out.read_text())
    assert doc["load"]["stopped_by"] == "interrupt"
    assert doc["metrics"]["completed"] >= 1


def test_ctrl_c_while_serve_loads_prints_no_traceback(model):
    """The engine-core process was spawned into the terminal's process group and died of the
    same Ctrl-C with a traceback while Python started; the server itself drains and exits."""
    for delay in (0.1, 0.8, 1.5):  # the core process's start-up takes a second or two
        proc = start(*serve_args("--model", str(model), "--port", "0", "--metrics-port", "0",
                                 "--http-port", "0"))
        assert proc.stderr is not None
        for line in proc.stderr:  # the core process is being started now
            if b"while the model loads" in line:
                break
        time.sleep(delay)
        code, _, err = ctrl_c(proc)
        assert code == 0, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_port_in_use_is_one_line(model):
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        res = ecserve(*serve_args("--model", str(model), "--port", str(port), "--no-metrics",
                                  "--no-http"))
    assert res.returncode == 2
    err = res.stderr.decode()
    assert err.count("\n") == 1 and err.startswith(f"ecserve: error: cannot listen on "
                                                   f"127.0.0.1:{port}"), err

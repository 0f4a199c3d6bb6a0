"""The engine core in its own process (ecserve/engine/core.py, server/core_process.py): the
same responses as the engine on a server thread, stop sequences found by the front end and
ended in the core, both processes in one scrape, the queue bound answered at once, and the
core's death (or the front end's) seen at once."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from serving import ServerThread, health, serve_process, wait_for

from ecserve.client import Client
from ecserve.config import EngineConfig
from ecserve.engine.core import CoreSpec, load_engine
from ecserve.engine.engine import Engine
from ecserve.engine.limits import QueueFullError, RequestError
from ecserve.parallel.group import free_port
from ecserve.server.core_process import ProcessTransport
from ecserve.server.core_transport import ThreadTransport
from ecserve.server.front_end import FrontEnd
from ecserve.types import Request, SamplingParams
from ecserve.v1 import generation_pb2 as pb


def core_process(model: Path, **engine: object) -> ProcessTransport:
    cfg = EngineConfig(device="cpu", **engine)  # type: ignore[arg-type]
    return ProcessTransport(functools.partial(load_engine, str(model), cfg),
                            CoreSpec(torch_threads=1), str(model))


def responses(address: str, stop: str) -> list[pb.GenerateResponse]:
    """One request at a time (batch-scope routing of a lone sequence is deterministic); the
    request ids and the seeds drawn for greedy requests cleared."""
    with Client(address) as c:
        out = [
            c.generate("the same", max_new_tokens=24, ignore_eos=True, token_ids=True,
                       logprobs=True, top_logprobs=2, prompt_logprobs=True),
            c.generate("the same", max_new_tokens=24, ignore_eos=True, token_ids=True,
                       stop_sequences=[stop]),
            c.generate("sampled", max_new_tokens=16, temperature=0.8, top_k=20, seed=7,
                       token_ids=True),
            joined(list(c.stream("streamed", max_new_tokens=20, ignore_eos=True,
                                 token_ids=True))),
        ]
    for i, m in enumerate(out):
        m.ClearField("request_id")
        if i != 2:
            m.ClearField("seed")
    return out


def joined(stream: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """A stream as one message (how tokens batch into messages depends on timing)."""
    out = pb.GenerateResponse()
    out.CopyFrom(stream[-1])
    out.text = "".join(m.text for m in stream)
    out.ClearField("tokens")
    out.tokens.extend(t for m in stream for t in m.tokens)
    return out


def split_logprobs(m: pb.GenerateResponse) -> tuple[pb.GenerateResponse, list[float]]:
    """(the message without logprobs, its logprobs in order)."""
    m, values = pb.GenerateResponse.FromString(m.SerializeToString()), []
    for token in [*m.prompt_tokens, *m.tokens]:
        for t in (token, *token.top_logprobs):
            values.append(t.logprob)
            t.ClearField("logprob")
    return m, values


def test_core_process_answers_as_the_engine_on_a_thread(make_model):
    model = make_model()
    with ServerThread(ThreadTransport(Engine(model, EngineConfig(device="cpu")))) as s:
        with Client(s.address) as c:
            text = c.generate("the same", max_new_tokens=24, ignore_eos=True).text
        stop = text[len(text) // 2:len(text) // 2 + 2]
        assert stop
        expected = responses(s.address, stop)
    with ServerThread(core_process(model)) as s:
        got = responses(s.address, stop)
        metrics = s.server.metrics.exposition().decode()
    # Token for token and byte for byte; logprobs to float32 rounding (two processes run the
    # same float32 kernels, but with their own buffers and threads: the last bits may differ).
    assert [split_logprobs(m)[0] for m in got] == [split_logprobs(m)[0] for m in expected]
    for m, e in zip(got, expected, strict=True):
        assert split_logprobs(m)[1] == pytest.approx(split_logprobs(e)[1], abs=1e-5)
    assert got[1].stop_reason == pb.STOP_REASON_STOP_SEQUENCE
    # The stop sequence was found in the front end and ended the request in the core: counted
    # under its reason, its KV blocks freed.
    assert 'ecserve_requests_finished_total{protocol="grpc",reason="stop_sequence"} 1.0' in metrics
    assert re.search(r"^ecserve_kv_cache_blocks_used 0\.0$", metrics, re.M)


def test_one_scrape_shows_both_processes(make_model):
    with ServerThread(core_process(make_model())) as s:
        with Client(s.address) as c:
            c.generate("scrape", max_new_tokens=8)
        text = s.server.metrics.exposition().decode()
        core = s.server.engine.core_pid
    assert core is not None and core != os.getpid()
    for name in ("ecserve_engine_core_process_resident_memory_bytes",
                 "ecserve_engine_core_process_cpu_seconds_total",
                 "ecserve_engine_core_peak_rss_bytes", "process_resident_memory_bytes"):
        value = re.search(rf"^{name} (\S+)$", text, re.M)
        assert value and float(value.group(1)) > 0, name
    # The core's step and routing figures arrive with its step frames.
    assert re.search(r'^ecserve_generation_tokens_total 8\.0$', text, re.M)
    tokens = [float(v) for v in re.findall(r"^ecserve_expert_tokens_total\{.*\} (\S+)$", text,
                                           re.M)]
    assert sum(tokens) > 0


@pytest.mark.parametrize("placement", ["process", "thread"])
def test_bad_requests_and_the_queue_bound_are_answered_in_the_front_end(make_model, placement):
    """One front end over either transport: the same answers, from the same count."""
    model = make_model()

    async def main() -> None:
        engine = {"max_waiting": 1, "max_num_seqs": 1}
        client = FrontEnd(core_process(model, **engine) if placement == "process" else
                          ThreadTransport(Engine(model, EngineConfig(device="cpu", **engine))))
        await client.start()
        try:
            params = SamplingParams(max_new_tokens=4)
            with pytest.raises(RequestError, match="outside the vocabulary"):
                client.submit(Request("bad", (1, 10**6), params))
            first = client.submit(Request("a", (1, 2, 3), params))
            # Not admitted yet (the core has not even seen it): the queue of one is full.
            with pytest.raises(QueueFullError, match="waiting queue full"):
                client.submit(Request("b", (1, 2, 3), params))
            while not (await first.get()).finished:
                pass
            second = client.submit(Request("b", (1, 2, 3), params))
            while not (await second.get()).finished:
                pass
            assert client.num_live == 0
        finally:
            await client.stop()

    asyncio.run(main())


def core_pid(log_path: Path) -> int:
    found = re.search(r"engine core running in process (\d+)", log_path.read_text())
    assert found, log_path.read_text()
    return int(found.group(1))


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def start_server(make_model, tmp_path: Path, *args: str, environ: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log_path = tmp_path / "serve.log"
    # 12 layers: a 240-token stream lasts long enough to kill something under it.
    proc = serve_process(log_path, "--model", str(make_model(num_layers=12)), "--port",
                         str(port), "--metrics-port", "0", "--device", "cpu",
                         "--engine-core", "process", *args, environ=environ)
    address = f"127.0.0.1:{port}"
    wait_for(lambda: health(address) == "SERVING" or proc.poll() is not None, 60, "SERVING")
    assert proc.poll() is None, log_path.read_text()
    return proc, address, log_path


def test_a_killed_core_ends_live_streams_naming_it_and_the_server_exits_1(make_model, tmp_path):
    proc, address, log_path = start_server(make_model, tmp_path)
    pid = core_pid(log_path)
    try:
        with Client(address, timeout=60) as c:
            call = c.stream("doomed", max_new_tokens=240, ignore_eos=True)
            next(call)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as error:
                for _ in call:
                    pass
        assert proc.wait(timeout=30) == 1, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details() == (f"generation failed: the engine core process (pid {pid}) "
                                     "was killed by SIGKILL")
    assert "stopping with exit code 1" in log_path.read_text()


def test_sigterm_stops_the_core_and_a_dead_front_end_takes_it_along(make_model, tmp_path):
    proc, _, log_path = start_server(make_model, tmp_path)
    pid = core_pid(log_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log_path.read_text()
    wait_for(lambda: gone(pid), 10, "the core to stop after the drain")

    proc, address, log_path = start_server(make_model, tmp_path)
    pid = core_pid(log_path)
    # Busy: the core has frames to send to a front end that is about to vanish.
    client = Client(address, timeout=60)
    stream = client.stream("orphan", max_new_tokens=240, ignore_eos=True)
    next(stream)
    proc.kill()  # no drain, no word to the core
    proc.wait(timeout=10)
    t0 = time.monotonic()
    wait_for(lambda: gone(pid), 15, "the orphaned core to notice and stop")
    assert time.monotonic() - t0 < 10
    client.close()


@pytest.mark.parametrize(("given", "args", "policy"), [
    (None, (), "ACTIVE"), (None, ("--engine-openmp", "passive"), "PASSIVE"),
    ("PASSIVE", (), "PASSIVE")])
def test_the_core_spins_its_openmp_threads_unless_told_not_to(make_model, tmp_path, given,
                                                               args, policy):
    """The core's threads busy-wait a bounded spell (GOMP_SPINCOUNT) between parallel regions;
    --engine-openmp passive or an OMP_WAIT_POLICY of the user's own keeps them passive."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if given:
        environ["OMP_WAIT_POLICY"] = given
    proc, _, log_path = start_server(make_model, tmp_path, *args, environ=environ)
    try:
        with open(f"/proc/{core_pid(log_path)}/environ") as f:
            core_env = dict(v.split("=", 1) for v in f.read().split("\0") if "=" in v)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    assert core_env["OMP_WAIT_POLICY"] == policy
    assert ("GOMP_SPINCOUNT" in core_env) == (policy == "ACTIVE")
    assert f"OMP_WAIT_POLICY={policy}" in log_path.read_text()

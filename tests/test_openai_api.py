"""The OpenAI-compatible HTTP API through the official `openai` client (sync and async), as the
tools our users own call it, and through raw HTTP for what a client library hides."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import time

import openai
import pytest
from serving import ServerThread, idle, serve_args

from ecserve.client import Client
from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(None, EngineConfig(device="cpu"))  # the shipped model: real text


@pytest.fixture
def own_engine() -> Engine:
    """For a server of a test's own: two servers on one Engine would share its observer."""
    return Engine(None, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, chat_template="plain") as s:
        yield s


@pytest.fixture(scope="module", params=["thread", "process"])
def placed(request):
    """A server on either placement of the engine core (the default model either way)."""
    import functools

    from ecserve.engine.core import CoreSpec, load_engine
    from ecserve.server.core_process import ProcessTransport
    from ecserve.server.core_transport import ThreadTransport

    # Transports, not an Engine: this placement whatever ECSERVE_TEST_ENGINE_CORE says.
    if request.param == "thread":  # an engine of its own: one core loop steps an engine
        with ServerThread(ThreadTransport(Engine(None, EngineConfig(device="cpu")))) as s:
            yield s
        return
    transport = ProcessTransport(functools.partial(load_engine, None, EngineConfig(
        device="cpu")), CoreSpec(torch_threads=1), None)
    with ServerThread(transport) as s:
        yield s


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def raw(server: ServerThread, method: str, path: str, body: bytes | dict | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def aborted(server: ServerThread) -> float:
    """HTTP requests the engine ended as cancelled."""
    return server.server.metrics.finished.labels("http", "aborted")._value.get()


def scrape(server: ServerThread) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, its labels) -> value, from the HTTP port's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = raw(server, "GET", "/metrics")[2].decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------- completions


def test_completion_equals_the_grpc_generation(server, api):
    r = api.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0)
    with Client(server.address) as c:
        g = c.generate(PROMPT, max_new_tokens=12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == g.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == g.input_token_count
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_stream_with_usage_equals_the_whole_response(api):
    whole = api.completions.create(model="default", prompt=PROMPT, max_tokens=16,
                                   temperature=0)
    chunks = list(api.completions.create(model="default", prompt=PROMPT, max_tokens=16,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completion_logprobs_and_echo(api):
    r = api.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0,
                               logprobs=3, echo=True)
    c = r.choices[0]
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert c.text.startswith(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == n_prompt + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    for tok, value, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:],
                               lp.top_logprobs[n_prompt:], strict=True):
        assert value <= 0 and top[tok] == value
        assert value == max(top.values())  # greedy: the sampled token is the most likely
        assert 3 <= len(top) <= 4
    assert lp.text_offset == sorted(lp.text_offset)


def test_prompt_as_token_ids_and_several_prompts(server, api):
    ids = server.server.engine.info.encode(PROMPT)
    r = api.completions.create(model="default", prompt=[ids, PROMPT, "class A:"],
                               max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == r.choices[1].text
    assert r.usage.prompt_tokens == 2 * len(ids) + len(server.server.engine.info.encode(
        "class A:"))
    assert r.usage.completion_tokens == 15


def test_n_choices_and_seeds_reproduce(api):
    def sample(seed):
        r = api.completions.create(model="default", prompt=PROMPT, max_tokens=12, n=3,
                                   temperature=1.0, seed=seed)
        return [c.text for c in r.choices]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # each choice samples on its own


def test_stop_strings_end_the_text(api):
    whole = api.completions.create(model="default", prompt=PROMPT, max_tokens=24,
                                   temperature=0).choices[0].text
    stop = whole[5:8]
    assert stop and whole.index(stop) == 5
    r = api.completions.create(model="default", prompt=PROMPT, max_tokens=24, temperature=0,
                               stop=[stop, "never seen"])
    assert r.choices[0].text == whole[:5]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop


def test_vllm_extras_and_explicit_nulls(api):
    r = api.completions.create(
        model="default", prompt=PROMPT, max_tokens=8, temperature=0, top_p=None, seed=None,
        extra_body={"top_k": -1, "min_tokens": 8, "ignore_eos": True, "prompt_logprobs": 1,
                    "some_future_field": {"x": 1}, "user": None})
    c = r.choices[0]
    assert r.usage.completion_tokens == 8
    prompt_lps = c.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == r.usage.prompt_tokens
    assert all(math.isfinite(v["logprob"]) for d in prompt_lps[1:] for v in d.values())


def test_penalties_change_the_text_and_equal_grpc(server, api):
    """The shipped model repeats itself greedily ("a file-like object, which is a file-like
    object"): each penalty changes the text, the same way over both protocols."""
    prompt = "def read_file(path):"
    plain = api.completions.create(model="default", prompt=prompt, max_tokens=40,
                                   temperature=0).choices[0].text
    for penalty in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.0},
                    {"repetition_penalty": 1.5}):
        r = api.completions.create(model="default", prompt=prompt, max_tokens=40,
                                   temperature=0, **({} if "repetition_penalty" in penalty
                                                     else penalty),
                                   extra_body=penalty if "repetition_penalty" in penalty
                                   else None)
        assert r.choices[0].text != plain, penalty
        with Client(server.address) as c:
            g = c.generate(prompt, max_new_tokens=40, **penalty)
        assert r.choices[0].text == g.text, penalty


# ---------------------------------------------------------------------- chat


def test_chat_with_the_template_and_its_logprobs(api):
    messages = [{"role": "system", "content": "Answer in Python."},
                {"role": "user", "content": [{"type": "text", "text": "Sort a list."}]}]
    r = api.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                    temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == c.message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode())
               for t in content)
    # The same prompt text through /v1/completions gives the same tokens.
    prompt = "System: Answer in Python.\nUser: Sort a list.\nAssistant:"
    same = api.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0)
    assert same.choices[0].text == c.message.content


def test_chat_stream(api):
    chunks = list(api.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].usage.completion_tokens == 6
    whole = api.chat.completions.create(model="default", messages=[
        {"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == \
        whole.choices[0].message.content


def test_chat_without_a_template_names_the_flag(own_engine):
    with ServerThread(own_engine) as s:  # the shipped model is a base model: no template
        status, _, body = raw(s, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "--chat-template" in error_of(body)["message"]


# ---------------------------------------------------------------------- async, cancel


def test_async_client_runs_streams_concurrently(server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="x",
                                    max_retries=0)

        async def one(i: int) -> str:
            stream = await client.completions.create(model="default", prompt=f"# {i}\n",
                                                     max_tokens=10, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        out = await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()
        return out

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)


def test_an_early_closed_stream_frees_its_request(server, api):
    stream = api.completions.create(model="default", prompt=PROMPT, max_tokens=400,
                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
    before = aborted(server)
    next(iter(stream))
    assert server.server.engine.num_live == 1
    stream.close()
    server.wait_until(lambda: idle(server), timeout=10)
    assert aborted(server) == before + 1  # cancelled, not run to its end


def test_a_client_that_leaves_a_whole_response_cancels_it(server, caplog):
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0,
                           timeout=0.3)
    before = aborted(server)
    caplog.set_level("INFO", logger="ecserve.requests")
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(model="default", prompt=PROMPT, max_tokens=480,
                                  temperature=0, extra_body={"ignore_eos": True})
    server.wait_until(lambda: idle(server), timeout=10)
    assert aborted(server) == before + 1
    # Its line in the log, as every finished request has one.
    assert any("generated, cancelled by the client" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "max_tokens": 1_000_000}, "prompt"),  # past the context
    ({"prompt": PROMPT, "stop": ["x"] * 10_000}, "stop"),
    ({"prompt": PROMPT, "logprobs": 1000}, "logprobs"),
    ({"prompt": PROMPT, "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": PROMPT, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
])
def test_bad_fields_are_400_naming_them(server, body, param):
    status, _, out = raw(server, "POST", "/v1/completions", body)
    err = error_of(out)
    assert status == 400 and err["param"] == param and err["code"] == 400, err
    assert err["type"] == "BadRequestError"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies_are_400(server, body):
    status, _, out = raw(server, "POST", "/v1/completions", body)
    assert status == 400 and error_of(out)["message"]


def test_unknown_model_route_and_method(server, api):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-9", prompt=PROMPT)
    assert raw(server, "GET", "/v2/nothing")[0] == 404
    status, headers, _ = raw(server, "GET", "/v1/completions")
    assert status == 405 and headers["allow"] == "POST"


def test_a_body_over_the_limit_is_413_before_it_is_read(own_engine):
    with ServerThread(own_engine, max_request_bytes=4096) as s:
        status, _, out = raw(s, "POST", "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "max_request_bytes=4096" in error_of(out)["message"]


def test_a_full_queue_is_429_with_retry_after(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu", max_num_seqs=1, max_waiting=1))
    with ServerThread(engine) as s:
        body = {"prompt": "a", "max_tokens": 50, "ignore_eos": True}
        status, headers, out = raw(s, "POST", "/v1/completions", {**body, "n": 5})
        assert status == 429 and headers["retry-after"] == "1"
        assert error_of(out)["type"] == "RateLimitError"
        s.wait_until(lambda: idle(s), timeout=10)
        time.sleep(0.3)
        # The choice taken before the refusal was cancelled: nothing was generated.
        assert s.server.metrics.generation_tokens._value.get() == 0


def test_api_keys(own_engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("secret-key\n")
    with ServerThread(own_engine, api_key_file=str(keys)) as s:
        url = s.http_url + "/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert raw(s, "POST", "/v1/completions", {"prompt": "a"})[0] == 401
        good = openai.OpenAI(base_url=url, api_key="secret-key", max_retries=0)
        assert good.models.list().data[0].id == "default"
        assert raw(s, "GET", "/health")[0] == 200  # probes need no key
        text = raw(s, "GET", "/metrics")[2].decode()
    assert 'ecserve_requests_rejected_total{code="401",protocol="http"} 2.0' in text


# ---------------------------------------------------------------------- the other routes


def test_models_tokenize_detokenize_version_metrics(server, api):
    model = api.models.list().data[0]
    assert model.id == "default" and model.model_extra["max_model_len"] == 512
    status, _, out = raw(server, "POST", "/tokenize", {"prompt": PROMPT,
                                                       "return_token_strs": True})
    tok = json.loads(out)
    assert status == 200 and tok["count"] == len(tok["tokens"]) == len(tok["token_strs"])
    status, _, out = raw(server, "POST", "/detokenize", {"tokens": tok["tokens"]})
    assert json.loads(out)["prompt"] == PROMPT
    assert raw(server, "POST", "/detokenize", {"tokens": [-1]})[0] == 400
    assert json.loads(raw(server, "GET", "/version")[2])["version"]
    metrics = raw(server, "GET", "/metrics")[2].decode()
    assert 'ecserve_requests_received_total{protocol="http"}' in metrics


def test_health_follows_the_drain_and_a_live_stream_finishes(own_engine):
    with ServerThread(own_engine, drain_delay=0.0) as s:
        assert raw(s, "GET", "/health")[0] == 200
        client = openai.OpenAI(base_url=s.http_url + "/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=60,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        first = next(it)
        drained = s.drain(grace=30)
        time.sleep(0.2)
        rest = list(it)  # the drain lets it finish
        drained.result(timeout=60)
    chunks = [first, *rest]
    assert chunks[-1].choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- both placements


def test_both_placements_answer_alike_and_free_what_clients_leave(placed):
    client = openai.OpenAI(base_url=placed.http_url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=12,
                                  temperature=0, logprobs=2, n=2, seed=1)
    with Client(placed.address) as c:
        g = c.generate(PROMPT, max_new_tokens=12)
    assert [ch.text for ch in r.choices] == [g.text, g.text]  # greedy: both choices alike
    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == g.text
    assert chunks[-1].usage.completion_tokens == 12
    before = aborted(placed)
    stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=400,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    placed.wait_until(lambda: idle(placed) and aborted(placed) == before + 1, timeout=10)
    leaving = openai.OpenAI(base_url=placed.http_url + "/v1", api_key="x", max_retries=0,
                            timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        leaving.completions.create(model="default", prompt=PROMPT, max_tokens=480,
                                   temperature=0, extra_body={"ignore_eos": True})
    placed.wait_until(lambda: idle(placed) and aborted(placed) == before + 2, timeout=10)


def test_per_request_series_carry_the_protocol(placed):
    """Each request counted once, under the protocol it came through, wherever the core runs
    (the label travels with the request to the core and back in its stats)."""
    client = openai.OpenAI(base_url=placed.http_url + "/v1", api_key="x", max_retries=0)
    before = scrape(placed)
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=5, n=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    with Client(placed.address) as c:
        g = c.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    after = scrape(placed)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before[key]

    assert len(r.choices) == 2
    for protocol, n in (("http", 2), ("grpc", 1)):
        assert delta("ecserve_requests_finished_total", protocol=protocol, reason="length") == n
        assert delta("ecserve_requests_received_total", protocol=protocol) == n
        for name in ("ecserve_time_to_first_token_seconds_count",
                     "ecserve_e2e_request_latency_seconds_count",
                     "ecserve_request_queue_time_seconds_count",
                     "ecserve_request_decode_time_seconds_count"):
            assert delta(name, protocol=protocol) == n, (name, protocol)
        assert delta("ecserve_prompt_tokens_total", protocol=protocol) == \
            n * g.input_token_count  # the same prompt each time
    assert delta("ecserve_generation_tokens_total") == 15  # per token: no protocol label


def test_a_chat_template_that_cannot_be_read_fails_the_start_in_one_line(tmp_path):
    """Before the model loads: a wrong path costs no model load."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ecserve", *serve_args(
        "--chat-template", str(tmp_path / "missing.jinja"), "--port", "0", "--metrics-port", "0",
        "--http-port", "0")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "missing.jinja" in res.stderr
    assert "shipped templates: plain" in res.stderr and "model loads" not in res.stderr

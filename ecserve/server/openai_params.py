"""OpenAI-compatible request bodies -> engine Requests. Every bad field becomes an ApiError
(HTTP 400) naming it, as vLLM does; unknown fields and explicit nulls are accepted, since the
clients and benchmarks users point at a server send them.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ecserve.config import ServerConfig
from ecserve.errors import RequestError
from ecserve.server.chat_template import ChatTemplate, ChatTemplateError
from ecserve.types import Request, SamplingParams

Kind = Literal["completion", "chat"]
MAX_CHOICES = 128  # prompts x n of one call: each is a request of its own in the engine
SEED_RANGE = 2**63


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An HTTP error in vLLM's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = tuple(headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


@dataclass(frozen=True)
class Call:
    """One API call as the engine will run it: a request per prompt and per choice."""

    kind: Kind
    id: str  # the response's id (cmpl-... / chatcmpl-...)
    model: str
    created: int
    requests: tuple[Request, ...]  # choice i is requests[i]; prompt i // n
    n: int
    prompt_texts: tuple[str | None, ...]  # per prompt, for echo (None: given as ids)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats: usage on each
    echo: bool  # completions: the prompt comes before the text
    logprobs: int | None  # alternatives per token, when log-probabilities were asked for
    prompt_logprobs: int | None  # vLLM's extra: each choice's prompt tokens' log-probabilities

    def prompt_of(self, choice: int) -> int:
        return choice // self.n


class Body:
    """Typed reads of a JSON object's fields; None (absent or null) gives the default."""

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ApiError(400, f"the body must be a JSON object, got {_kind(raw)}")
        self.raw = raw

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise bad(name, f"must be a boolean, got {_kind(value)}")
        return value

    def integer(self, name: str, default: Any = None, lo: int | None = None,
            hi: int | None = None) -> Any:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, f"must be an integer, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad(name, f"must be in [{lo if lo is not None else '-inf'}, "
                            f"{hi if hi is not None else 'inf'}], got {value}")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise bad(name, f"must be finite, got {value}")
        return float(value)

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is not None and not isinstance(value, str):
            raise bad(name, f"must be a string, got {_kind(value)}")
        return value

    def ints(self, name: str) -> tuple[int, ...]:
        value = self.get(name, [])
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise bad(name, "must be a list of integers")
        return tuple(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


# ---------------------------------------------------------------- prompts


def completion_prompts(body: Body, encode: Callable[[str], list[int]]
                       ) -> list[tuple[tuple[int, ...], str | None]]:
    """`prompt` as (ids, text) per prompt: a string, strings, token ids, or lists of ids."""
    raw = body.get("prompt")
    if raw is None:
        raise bad("prompt", "required")
    items: list[Any]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and _is_int(raw[0])):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a "
                            "list of lists of token ids, and not empty")
    if len(items) > MAX_CHOICES:
        raise bad("prompt", f"{len(items)} prompts, the server takes at most {MAX_CHOICES} "
                            "in one call")
    out = []
    for i, item in enumerate(items):
        name = "prompt" if len(items) == 1 and items[0] is raw else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise bad(name, "empty")
            out.append((tuple(encode(item)), item))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            out.append((tuple(item), None))
        else:
            raise bad(name, "must be a non-empty string or a non-empty list of token ids")
    return out


def chat_prompt(body: Body, template: ChatTemplate | None, encode: Callable[[str], list[int]]
                ) -> tuple[int, ...]:
    """`messages` rendered with the chat template, as ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    if body.get("tools"):
        raise bad("tools", "tool calls are not supported by this server")
    if template is None:
        raise ApiError(400, "this model has no chat template (it is a base model): start the "
                            "server with --chat-template FILE, or use /v1/completions",
                       "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]",
                              "only text parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            messages[i] = {**m, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"must be a string or a list of parts, got "
                                                f"{_kind(content)}")
    kwargs = body.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "must be an object")
    try:
        text = template.render(messages, add_generation_prompt=body.boolean(
            "add_generation_prompt", True), continue_final_message=body.boolean(
            "continue_final_message", False), **kwargs)
    except ChatTemplateError as e:
        raise bad("messages", str(e)) from None
    ids = encode(text)
    if not ids:
        raise bad("messages", "the chat template rendered them as no tokens")
    return tuple(ids)


# ---------------------------------------------------------------- sampling


def _stops(body: Body, cfg: ServerConfig) -> tuple[str, ...]:
    raw = body.get("stop", [])
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "must be a string or a list of strings")
    if len(stops) > cfg.max_stop_sequences:
        raise bad("stop", f"{len(stops)} given, the server takes at most "
                          f"{cfg.max_stop_sequences}")
    for s in stops:
        if not s:
            raise bad("stop", "an empty stop string would match anywhere")
        if len(s) > cfg.max_stop_sequence_length:
            raise bad("stop", f"a stop string of {len(s)} characters, the server takes at "
                              f"most {cfg.max_stop_sequence_length}")
    return tuple(stops)


def _refuse_unsupported(body: Body) -> None:
    """Fields that would change the output and that this engine does not do: refused, never
    silently ignored."""
    if body.get("logit_bias"):
        raise bad("logit_bias", "not supported by this server")
    if body.get("suffix"):
        raise bad("suffix", "not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format", "only {'type': 'text'} is supported")
    if body.get("guided_json") or body.get("guided_regex") or body.get("guided_choice"):
        raise bad("guided_json", "guided decoding is not supported by this server")


def sampling(body: Body, cfg: ServerConfig, kind: Kind, prompt_len: int, max_model_len: int,
             logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    """The fields every choice shares (the seed is set per choice)."""
    max_tokens = body.integer("max_completion_tokens", lo=1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = body.integer("max_tokens", lo=1)
    if max_tokens is None:  # chat answers run to their end, as OpenAI's and vLLM's do
        max_tokens = (max(1, max_model_len - prompt_len) if kind == "chat"
                      else cfg.default_max_new_tokens)
    top_k = body.integer("top_k", 0, lo=-1)
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=body.integer("min_tokens", 0, lo=0),
            temperature=body.number("temperature", 1.0),
            top_k=0 if top_k == -1 else top_k,
            top_p=body.number("top_p", 1.0),
            presence_penalty=body.number("presence_penalty", 0.0),
            frequency_penalty=body.number("frequency_penalty", 0.0),
            repetition_penalty=body.number("repetition_penalty", 1.0),
            stop_token_ids=body.ints("stop_token_ids"),
            stop_sequences=_stops(body, cfg),
            include_stop_sequence=body.boolean("include_stop_str_in_output"),
            ignore_eos=body.boolean("ignore_eos"),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except RequestError as e:
        raise bad(_PARAM_NAMES.get(e.field, e.field), e.rest.lstrip(": ")) from None


# The engine's names -> the API's, for errors the engine finds.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                "stop_sequences": "stop", "logprobs": "logprobs"}


def api_message(error: RequestError, kind: Kind) -> ApiError:
    """An error the engine's limits found, with the API's name for the field."""
    if error.field == "prompt":
        return ApiError(400, error.renamed("messages" if kind == "chat" else "prompt"),
                        "messages" if kind == "chat" else "prompt")
    name = _PARAM_NAMES.get(error.field, error.field)
    return ApiError(400, error.renamed(name), name)


def _logprobs(body: Body, kind: Kind, cfg: ServerConfig) -> tuple[int | None, int | None]:
    top = cfg.max_top_logprobs
    if kind == "chat":
        n = body.integer("top_logprobs", lo=0, hi=top)
        if not body.boolean("logprobs"):
            if n:
                raise bad("top_logprobs", "needs logprobs: true")
            n = None
        else:
            n = n or 0
    else:
        n = body.integer("logprobs", lo=0, hi=top)
    return n, body.integer("prompt_logprobs", lo=0, hi=top)


def parse_call(raw: Any, kind: Kind, cfg: ServerConfig, model: str, max_model_len: int,
               encode: Callable[[str], list[int]], template: ChatTemplate | None) -> Call:
    """A completions or chat body as the engine's requests; raises ApiError."""
    body = Body(raw)
    asked = body.string("model")
    if asked is not None and asked != model:
        raise ApiError(404, f"the model `{asked}` does not exist (this server serves "
                            f"`{model}`)", "model")
    _refuse_unsupported(body)
    n = body.integer("n", 1, lo=1, hi=MAX_CHOICES)
    best_of = body.integer("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", "only best_of = n is supported")
    stream = body.boolean("stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    include_usage = Body(options).boolean("include_usage")
    continuous_usage = Body(options).boolean("continuous_usage_stats")
    echo = kind == "completion" and body.boolean("echo")
    logprobs, prompt_logprobs = _logprobs(body, kind, cfg)
    if echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs  # the echoed prompt's tokens carry theirs
    prompts = (completion_prompts(body, encode) if kind == "completion"
               else [(chat_prompt(body, template, encode), None)])
    if len(prompts) * n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n={n} choices, the server takes at most "
                       f"{MAX_CHOICES} in one call")
    seed = body.integer("seed", lo=0, hi=SEED_RANGE - 1)
    scope = body.string("routing_scope")
    if scope not in (None, "batch", "sequence"):
        raise bad("routing_scope", f"must be batch or sequence, got {scope!r}")
    arrival, prefix = time.monotonic(), uuid.uuid4().hex[:16]
    requests = []
    for p, (ids, _) in enumerate(prompts):
        params = sampling(body, cfg, kind, len(ids), max_model_len, logprobs, prompt_logprobs)
        for i in range(n):
            # One seed per choice, so n > 1 samples differ and a seeded call reproduces.
            choice_seed = (seed + p * n + i) % SEED_RANGE if seed is not None else \
                secrets.randbits(63)
            requests.append(Request(
                f"{prefix}-{p * n + i}" if len(prompts) * n > 1 else prefix, ids,
                _with_seed(params, choice_seed), scope, arrival_time=arrival, source="http"))
    return Call(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + prefix, model,
                int(time.time()), tuple(requests), n, tuple(t for _, t in prompts), stream,
                include_usage, continuous_usage, echo, logprobs, prompt_logprobs)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)

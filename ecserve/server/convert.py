"""Proto messages <-> engine types. Every bad field becomes an InvalidArgument naming it."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence

from google.protobuf.message import DecodeError, Message

from ecserve.client import ROUTING_SCOPES
from ecserve.config import ServerConfig
from ecserve.errors import RequestError
from ecserve.server.wire import bad_utf8_field, largest_field
from ecserve.types import FinishReason, Request, SamplingParams, TokenEvent, TokenLogprobs
from ecserve.v1 import generation_pb2 as pb


class InvalidArgument(ValueError):
    """A request field the server cannot accept; the message starts with the field's name."""


SCOPES = {enum: name for name, enum in ROUTING_SCOPES.items()}  # proto -> engine
SCOPE_ENUMS = {name: enum for name, enum in ROUTING_SCOPES.items() if name is not None}
STOP_REASONS = {
    FinishReason.LENGTH: pb.STOP_REASON_MAX_TOKENS,
    FinishReason.EOS: pb.STOP_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.STOP_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.STOP_REASON_STOP_TOKEN,
    FinishReason.ABORTED: pb.STOP_REASON_CANCELLED,
    FinishReason.TIME_LIMIT: pb.STOP_REASON_TIME_LIMIT,
    FinishReason.ERROR: pb.STOP_REASON_ERROR,
}

# The engine names a bad field by its own name (RequestError.field); clients know the proto's.
_PROTO_NAMES = {
    "max_new_tokens": "stopping.max_new_tokens",
    "min_new_tokens": "stopping.min_new_tokens",
    "stop_token_ids": "stopping.stop_token_ids",
    "stop_sequences": "stopping.stop_sequences",
    "time_limit": "stopping.time_limit_ms",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "presence_penalty": "sampling.presence_penalty",
    "frequency_penalty": "sampling.frequency_penalty",
    "repetition_penalty": "sampling.repetition_penalty",
    "logprobs": "response.top_logprobs",
    "prompt_logprobs": "response.prompt_top_logprobs",
    "routing_scope": "routing_scope",
}


def proto_message(error: RequestError, prompt_as_ids: bool) -> str:
    """The engine's error with the proto's name for its field."""
    if error.field == "prompt":
        return error.renamed("prompt_token_ids" if prompt_as_ids else "prompt")
    return error.renamed(_PROTO_NAMES.get(error.field, error.field))


def parse(cls: type[Message], raw: bytes, max_bytes: int) -> Message:
    """Deserialize a request, naming the field that is too large or not UTF-8. The size is
    checked first, and every step is linear in len(raw)."""
    if len(raw) > max_bytes:
        raise InvalidArgument(f"{largest_field(raw, cls.DESCRIPTOR)}: the request is "
                              f"{len(raw)} bytes, over the server's max_request_bytes={max_bytes}")
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        field = bad_utf8_field(raw, cls.DESCRIPTOR)
        if field is not None:
            raise InvalidArgument(f"{field}: not valid UTF-8") from e
        raise InvalidArgument(f"request: not a valid {cls.DESCRIPTOR.full_name} ({e})") from e


def to_request(
    msg: pb.GenerateRequest,
    request_id: str,
    encode: Callable[[str], list[int]],
    cfg: ServerConfig,
) -> Request:
    """A GenerateRequest as the engine's Request; raises InvalidArgument naming the field."""
    if msg.prompt and msg.prompt_token_ids:
        raise InvalidArgument("prompt: give prompt or prompt_token_ids, not both")
    if not msg.prompt and not msg.prompt_token_ids:
        raise InvalidArgument("prompt: empty (give prompt text or prompt_token_ids)")
    st, sa, resp = msg.stopping, msg.sampling, msg.response
    if len(st.stop_sequences) > cfg.max_stop_sequences:
        raise InvalidArgument(f"stopping.stop_sequences: {len(st.stop_sequences)} given, the "
                              f"server takes at most {cfg.max_stop_sequences}")
    for i, s in enumerate(st.stop_sequences):
        if not s:
            raise InvalidArgument(f"stopping.stop_sequences[{i}]: empty (it would match anywhere)")
        if len(s) > cfg.max_stop_sequence_length:
            raise InvalidArgument(
                f"stopping.stop_sequences[{i}]: {len(s)} characters, the server takes at most "
                f"{cfg.max_stop_sequence_length}")
    for top, flag in (("top_logprobs", "logprobs"),
                      ("prompt_top_logprobs", "prompt_logprobs")):
        if getattr(resp, top) > cfg.max_top_logprobs:
            raise InvalidArgument(f"response.{top}: {getattr(resp, top)} asked, the server "
                                  f"gives at most {cfg.max_top_logprobs}")
        if getattr(resp, top) and not getattr(resp, flag):
            raise InvalidArgument(f"response.{top}: needs response.{flag}")
    if msg.routing_scope not in SCOPES:
        raise InvalidArgument(f"routing_scope: unknown value {msg.routing_scope}")
    for name in ("temperature", "presence_penalty", "frequency_penalty"):
        if not math.isfinite(v := getattr(sa, name)):  # SamplingParams names only its bounds
            raise InvalidArgument(f"sampling.{name}: must be finite, got {v}")
    try:
        params = SamplingParams(
            max_new_tokens=(st.max_new_tokens if st.HasField("max_new_tokens")
                            else cfg.default_max_new_tokens),
            min_new_tokens=st.min_new_tokens,
            temperature=sa.temperature,
            top_k=sa.top_k,
            top_p=sa.top_p if sa.HasField("top_p") else 1.0,
            presence_penalty=sa.presence_penalty,
            frequency_penalty=sa.frequency_penalty,
            repetition_penalty=(sa.repetition_penalty if sa.HasField("repetition_penalty")
                                else 1.0),
            # Drawn here rather than in the engine so the response can report it.
            seed=sa.seed if sa.HasField("seed") else secrets.randbits(63),
            stop_token_ids=tuple(st.stop_token_ids),
            stop_sequences=tuple(st.stop_sequences),
            include_stop_sequence=st.include_stop_sequence,
            ignore_eos=st.ignore_eos,
            time_limit=st.time_limit_ms / 1000 if st.time_limit_ms else None,
            logprobs=resp.top_logprobs if resp.logprobs else None,
            prompt_logprobs=resp.prompt_top_logprobs if resp.prompt_logprobs else None,
        )
    except RequestError as e:
        raise InvalidArgument(proto_message(e, False)) from e
    ids = tuple(msg.prompt_token_ids) if msg.prompt_token_ids else tuple(encode(msg.prompt))
    return Request(request_id, ids, params, SCOPES[msg.routing_scope],
                   arrival_time=time.monotonic(), source="grpc")


class ResponseBuilder:
    """Turns one request's events into GenerateResponse messages (streamed or all at once)."""

    def __init__(self, request: Request, options: pb.ResponseOptions,
                 decode: Callable[[Sequence[int]], str]) -> None:
        self.request = request
        self.with_tokens = options.token_ids or options.logprobs
        self.decode = decode
        self.generated = 0
        self.finish: FinishReason | None = None
        self.detail = ""  # the stop sequence or the error message of the last event

    def build(self, events: Sequence[TokenEvent]) -> pb.GenerateResponse:
        out = pb.GenerateResponse(
            text="".join(e.text for e in events),
            input_token_count=len(self.request.prompt_token_ids),
            seed=self.request.params.seed or 0,
            request_id=self.request.request_id,
        )
        for e in events:
            if e.prompt_logprobs:
                ids = self.request.prompt_token_ids
                out.prompt_tokens.extend(self._token(i, lp) for i, lp in
                                         zip(ids, e.prompt_logprobs, strict=True))
            if e.token_id is None:
                continue
            self.generated += 1
            if self.with_tokens:
                out.tokens.append(self._token(e.token_id, (e.logprob, e.top_logprobs)
                                              if e.logprob is not None else None))
        out.generated_token_count = self.generated
        last = events[-1] if events else None
        if last is not None and last.finish_reason is not None:
            self.finish, self.detail = last.finish_reason, last.detail
            out.stop_reason = STOP_REASONS[last.finish_reason]
            if last.finish_reason is FinishReason.STOP_SEQUENCE:
                out.stop_sequence = last.detail
        return out

    def _token(self, token_id: int, logprobs: TokenLogprobs | None) -> pb.Token:
        tok = pb.Token(id=token_id, text=self.decode([token_id]))
        if logprobs is not None:
            tok.logprob = logprobs[0]
            tok.top_logprobs.extend(pb.TopLogprob(id=i, text=self.decode([i]), logprob=lp)
                                    for i, lp in logprobs[1])
        return tok

"""A small Python client for an ecserve server (sync gRPC; no torch needed).

    from ecserve.client import Client
    with Client("127.0.0.1:50051") as client:
        for message in client.stream("Once upon a time", max_new_tokens=32):
            print(message.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecserve.security import DEFAULT_ADDRESS, ClientSecurity
from ecserve.v1 import generation_pb2 as pb
from ecserve.v1 import generation_pb2_grpc as pb_grpc

ROUTING_SCOPES = {None: pb.ROUTING_SCOPE_UNSPECIFIED, "batch": pb.ROUTING_SCOPE_BATCH,
                  "sequence": pb.ROUTING_SCOPE_SEQUENCE}


def build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    stop_sequences: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    include_stop_sequence: bool = False,
    time_limit_ms: int = 0,
    ignore_eos: bool = False,
    token_ids: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
    prompt_top_logprobs: int = 0,
    routing_scope: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; None and zero values leave the server's defaults in force."""
    req = pb.GenerateRequest(
        sampling=pb.SamplingParameters(temperature=temperature, top_k=top_k,
                                       presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty),
        stopping=pb.StoppingCriteria(
            min_new_tokens=min_new_tokens, stop_sequences=stop_sequences,
            stop_token_ids=stop_token_ids, include_stop_sequence=include_stop_sequence,
            time_limit_ms=time_limit_ms, ignore_eos=ignore_eos,
        ),
        response=pb.ResponseOptions(token_ids=token_ids, logprobs=logprobs,
                                    top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                                    prompt_top_logprobs=prompt_top_logprobs),
        routing_scope=ROUTING_SCOPES[routing_scope],
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    if max_new_tokens is not None:
        req.stopping.max_new_tokens = max_new_tokens
    if top_p is not None:
        req.sampling.top_p = top_p
    if seed is not None:
        req.sampling.seed = seed
    if repetition_penalty is not None:
        req.sampling.repetition_penalty = repetition_penalty
    return req


class Client:
    """Calls one server. `timeout` (seconds) is each call's deadline unless a call gives one."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = None,
                 security: ClientSecurity | None = None) -> None:
        """security: TLS, mutual TLS and the API key (default: plaintext, no key)."""
        security = security or ClientSecurity()
        self.channel = security.channel(address)
        self.metadata = security.metadata
        self.timeout = timeout
        self._stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: str | Sequence[int], timeout: float | None = None,
                 **options: Any) -> pb.GenerateResponse:
        """The whole generation; options are build_request's."""
        return self._stub.Generate(build_request(prompt, **options),
                                   timeout=timeout or self.timeout, metadata=self.metadata)

    def stream(self, prompt: str | Sequence[int], timeout: float | None = None,
               **options: Any) -> Iterator[pb.GenerateResponse]:
        """Messages as tokens are generated; leaving the loop early cancels the request."""
        call = self._stub.GenerateStream(build_request(prompt, **options),
                                         timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def tokenize(self, text: str) -> list[int]:
        return list(self._stub.Tokenize(pb.TokenizeRequest(text=text),
                                        timeout=self.timeout, metadata=self.metadata).token_ids)

    def model_info(self) -> pb.ModelInfoResponse:
        return self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout,
                                    metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as grpc.health.v1 reports for `service` ("": the server)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=self.timeout, metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

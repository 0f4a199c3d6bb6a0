"""The server log's request lines, the same for every protocol: one per finished request (its
outcome: a finish reason, 'cancelled by the client', 'deadline exceeded') and one per refusal."""

from __future__ import annotations

import logging

from ecserve.types import Request
from ecserve.wording import counted

log = logging.getLogger("ecserve.requests")


def log_finished(request: Request, generated: int, outcome: str) -> None:
    log.info("request %s: %s, %d generated, %s", request.request_id,
             counted(len(request.prompt_token_ids), "prompt token"), generated, outcome)


def log_rejected(code: str, peer: str, message: str) -> None:
    # One line per refusal, as per finished request: an operator sees who is turned away.
    log.info("rejected %s from %s: %s", code, peer, message[:300])

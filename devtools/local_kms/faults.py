"""Fault injection for tests: the next N calls to one service fail or stall (pure).

A plan is set through the admin endpoint and consumed one call of its ``service``
(``kms`` by default, or ``secretsmanager``, ``ssm``, ``s3``) at a time:
- ``internal``: the service's internal error (KMS: HTTP 500 ``KMSInternalException``);
- ``throttle``: the service's throttling error (KMS: HTTP 400 ``ThrottlingException``;
  botocore retries it);
- ``delay``: the call is answered normally after ``delay`` seconds.
Setting a plan replaces the previous one; ``count`` 0 clears it.

A rule, by contrast, holds until it is replaced: ``DocumentAgeRule`` refuses every
Recipient whose attestation document is older than ``max_age`` seconds (its
``timestamp`` against the stand-in's clock), answering HTTP 400 with ``answer``, one
of the two shapes real KMS might use for a document it will not take (AWS documents
neither). Tests of the agent's document reuse play a strict KMS with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclave_common.aws import STORE_SERVICES

KINDS = ("internal", "throttle", "delay")
SERVICES = ("kms", *STORE_SERVICES)  # the stores are served with --stores
# What each service answers when it fails inside or throttles (AWS's error codes).
ERRORS: dict[str, dict[str, tuple[int, str]]] = {
    "kms": {"internal": (500, "KMSInternalException"), "throttle": (400, "ThrottlingException")},
    "secretsmanager": {
        "internal": (500, "InternalServiceError"),
        "throttle": (400, "ThrottlingException"),
    },
    "ssm": {"internal": (500, "InternalServerError"), "throttle": (400, "ThrottlingException")},
    "s3": {"internal": (500, "InternalError"), "throttle": (503, "SlowDown")},
}
DOCUMENT_ANSWERS = ("ValidationException", "AccessDeniedException")
MAX_COUNT = 10_000
MAX_DELAY = 300.0


class FaultError(Exception):
    """The fault plan asked for is malformed."""


@dataclass(frozen=True)
class Fault:
    kind: str
    delay: float = 0.0
    service: str = "kms"

    def error(self) -> tuple[int, str, str] | None:
        """(HTTP status, AWS error type, message) to answer with, or None to answer normally."""
        if self.kind not in ERRORS[self.service]:
            return None
        status, error_type = ERRORS[self.service][self.kind]
        message = "Rate exceeded" if self.kind == "throttle" else "internal error"
        return status, error_type, f"{message} (injected fault)"


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    count: int
    delay: float = 0.0
    service: str = "kms"


def parse_plan(document: Any) -> FaultPlan:
    """Read ``{"kind": ..., "count": N, "delay": D, "service": S}`` (delay only for
    "delay"; service default "kms")."""
    if not isinstance(document, dict):
        raise FaultError("fault plan must be a JSON object")
    kind = document.get("kind")
    if kind not in KINDS:
        raise FaultError(f"kind must be one of {', '.join(KINDS)}")
    count = document.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
        raise FaultError(f"count must be an integer from 0 to {MAX_COUNT}")
    delay = document.get("delay", 0.0)
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise FaultError("delay must be a number of seconds")
    if kind == "delay" and not 0 < delay <= MAX_DELAY:
        raise FaultError(f"delay must be more than 0 and at most {MAX_DELAY} seconds")
    if kind != "delay" and delay:
        raise FaultError('delay applies only to kind "delay"')
    service = document.get("service", "kms")
    if service not in SERVICES:
        raise FaultError(f"service must be one of {', '.join(SERVICES)}")
    return FaultPlan(kind, count, float(delay), service)


class FaultInjector:
    def __init__(self) -> None:
        self._plan: FaultPlan | None = None
        self._left = 0

    def set(self, plan: FaultPlan) -> None:
        self._plan = plan if plan.count else None
        self._left = plan.count

    @property
    def pending(self) -> int:
        return self._left if self._plan else 0

    def next_call(self, service: str = "kms") -> Fault | None:
        """The fault for the call to ``service`` now arriving, if any (consumes one)."""
        if self._plan is None or self._left <= 0 or self._plan.service != service:
            return None
        self._left -= 1
        plan = self._plan
        if self._left == 0:
            self._plan = None
        return Fault(plan.kind, plan.delay, plan.service)


@dataclass(frozen=True)
class DocumentAgeRule:
    max_age: float  # seconds
    answer: str = "ValidationException"


def parse_document_age_rule(document: Any) -> DocumentAgeRule | None:
    """Read ``{"max_age": seconds, "answer": ...}``; ``max_age`` null clears the rule."""
    if not isinstance(document, dict):
        raise FaultError("document age rule must be a JSON object")
    max_age = document.get("max_age")
    if max_age is None:
        return None
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age < 0:
        raise FaultError("max_age must be a number of seconds, 0 or more (null: no rule)")
    answer = document.get("answer", "ValidationException")
    if answer not in DOCUMENT_ANSWERS:
        raise FaultError(f"answer must be one of {', '.join(DOCUMENT_ANSWERS)}")
    return DocumentAgeRule(float(max_age), answer)

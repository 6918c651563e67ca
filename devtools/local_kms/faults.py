"""Fault injection for tests: the next N KMS calls fail or stall (pure).

A plan is set through the admin endpoint and consumed one KMS call at a time:
- ``internal``: HTTP 500 ``KMSInternalException``;
- ``throttle``: HTTP 400 ``ThrottlingException`` (botocore retries it);
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

KINDS = ("internal", "throttle", "delay")
DOCUMENT_ANSWERS = ("ValidationException", "AccessDeniedException")
MAX_COUNT = 10_000
MAX_DELAY = 300.0


class FaultError(Exception):
    """The fault plan asked for is malformed."""


@dataclass(frozen=True)
class Fault:
    kind: str
    delay: float = 0.0

    def error(self) -> tuple[int, str, str] | None:
        """(HTTP status, AWS error type, message) to answer with, or None to answer normally."""
        if self.kind == "internal":
            return 500, "KMSInternalException", "injected fault: internal error"
        if self.kind == "throttle":
            return 400, "ThrottlingException", "Rate exceeded (injected fault)"
        return None


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    count: int
    delay: float = 0.0


def parse_plan(document: Any) -> FaultPlan:
    """Read ``{"kind": ..., "count": N, "delay": D}`` (delay only for "delay")."""
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
    return FaultPlan(kind, count, float(delay))


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

    def next_call(self) -> Fault | None:
        """The fault for the KMS call now arriving, if any (consumes one)."""
        if self._plan is None or self._left <= 0:
            return None
        self._left -= 1
        plan = self._plan
        if self._left == 0:
            self._plan = None
        return Fault(plan.kind, plan.delay)


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

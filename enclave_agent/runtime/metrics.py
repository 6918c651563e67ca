"""The agent's metrics: what each part of it counts, and the hooks they call.

Served as ``GET /metrics`` on the agent's socket and pushed to the proxy over the log
channel every ``[metrics] push_interval`` seconds (``enclave_common.metrics`` writes
the format). Every label a caller could choose is bounded: an operation the agent does
not serve counts as ``other``, as does a secret name past the first 256 or an error
type past the first 32.

The secret store calls ``secret_fetched(name)`` each time a secret's value is (re)
fetched and ``secret_refresh_failed(name)`` when a refresh fails; the age of each is
read at collection time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from enclave_agent.runtime.kms_operations import OPERATIONS as KMS_OPERATIONS
from enclave_common.logstream import STREAMS
from enclave_common.metrics import Family, Registry

# App requests: the KMS operations, and the agent's own routes.
ROUTES = ("secret", "attestation", "health", "metrics")
CALLERS = ("unix", "tcp")
_MAX_SECRETS = 256
_MAX_OUTCOMES = 32


class AgentMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fetched: dict[str, float] = {}
        r = self.registry = Registry()
        operations = (*KMS_OPERATIONS, *ROUTES)
        self.requests = r.counter(
            "enclave_agent_requests_total",
            "App requests by operation (a KMS operation or the agent's route) and outcome "
            "(ok, the error type answered, or client_gone: a long-poll its app left).",
            {"operation": operations, "outcome": _MAX_OUTCOMES},
        )
        self.request_seconds = r.histogram(
            "enclave_agent_request_seconds",
            "Seconds from an app request's head to its answer.",
            {"operation": operations},
        )
        self.kms_calls = r.counter(
            "enclave_agent_kms_calls_total",
            "KMS calls by operation and outcome (ok, or the error type).",
            {"operation": KMS_OPERATIONS, "outcome": _MAX_OUTCOMES},
        )
        self.kms_call_seconds = r.histogram(
            "enclave_agent_kms_call_seconds",
            "Seconds per KMS call, retries included.",
            {"operation": KMS_OPERATIONS},
        )
        self.kms_retries = r.counter(
            "enclave_agent_kms_retries_total",
            "KMS attempts beyond each call's first (throttling, 5xx, broken connections).",
            {"operation": KMS_OPERATIONS},
        )
        self.connections = r.counter(
            "enclave_agent_connections_total",
            "App connections by caller class (unix socket, tcp listener) and admission.",
            {"caller": CALLERS, "outcome": ("accepted", "refused")},
        )
        self.connections_open = r.gauge(
            "enclave_agent_connections_open",
            "App connections open now, by caller class.",
            {"caller": CALLERS},
        )
        self.secret_age = r.gauge(
            "enclave_agent_secret_age_seconds",
            "Seconds since each named secret's value was fetched.",
            {"secret": _MAX_SECRETS},
            read=self._ages,
        )
        self.secret_refresh_failures = r.counter(
            "enclave_agent_secret_refresh_failures_total",
            "Failed refreshes of each named secret (the last value is kept).",
            {"secret": _MAX_SECRETS},
        )
        self.log_lines_dropped = r.counter(
            "enclave_agent_log_lines_dropped_total",
            "Lines of each log stream dropped on the way to the proxy (buffer full, "
            "connection broken).",
            {"stream": STREAMS},
        )

    def collect(self) -> list[Family]:
        return self.registry.collect()

    # --- hooks ------------------------------------------------------------------------

    def request(self, operation: str | None, outcome: str, seconds: float) -> None:
        name = operation or "other"
        self.requests.inc(operation=name, outcome=outcome)
        self.request_seconds.observe(seconds, operation=name)

    def kms_call(self, operation: str, outcome: str, seconds: float, attempts: int) -> None:
        self.kms_calls.inc(operation=operation, outcome=outcome)
        self.kms_call_seconds.observe(seconds, operation=operation)
        if attempts > 1:
            self.kms_retries.inc(attempts - 1, operation=operation)

    def connection(self, caller: str, *, accepted: bool) -> None:
        self.connections.inc(caller=caller, outcome="accepted" if accepted else "refused")

    def secret_fetched(self, name: str) -> None:
        self._fetched[name] = self._clock()

    def secret_refresh_failed(self, name: str) -> None:
        self.secret_refresh_failures.inc(secret=name)

    def log_dropped(self, stream: str, count: int) -> None:
        self.log_lines_dropped.inc(count, stream=stream)

    def _ages(self) -> Iterable[tuple[Mapping[str, str], float]]:
        now = self._clock()
        return [({"secret": name}, now - at) for name, at in self._fetched.items()]

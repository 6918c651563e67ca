"""Each caller's share of the agent: connections, and KMS calls in flight.

Policy lives here (who a caller is, which limit applies, what a refusal says); the
counting is ``enclave_common.shares``. The rules:

- A caller is its uid (``callers``: SO_PEERCRED on the Unix socket, inet_diag on
  the TCP listener). Each uid may hold ``max_connections_per_uid`` connections on a
  listener, all uids together ``max_connections`` on it, and each uid may have
  ``max_kms_calls_per_uid`` KMS calls in flight, whichever listener they came by.
  The config keeps each share below its whole (``kms_pool_size`` for KMS calls), so
  one uid at its cap never stops another uid's request.
- The two listeners count connections apart: the TCP listener has its own
  ``max_connections`` budget, so TCP connections can never take the Unix socket's
  (apps that want no TCP are never crowded out by apps that use it). A uid may so
  hold its share on each listener.
- A TCP listener that cannot name its callers (``[listen] tcp_open``) counts them
  all as one caller, ``TCP_CALLERS``: one share of connections and one of KMS calls.
- A connection over its caller's share gets ``ThrottlingException`` (503) naming the
  limit and its config key at once, and the agent logs ``connection_refused``. A KMS
  call over its caller's share waits in that caller's own queue, for at most
  ``kms_call_timeout``; only then is it refused the same way (``kms_call_refused``).
  Everyone else is served as before.
- A refused connection gets its answer, then the agent reads what the client still
  sends for a moment (so a reset does not eat the answer), but only for
  ``_LINGERING_PER_CALLER`` refusals per caller and ``_LINGERING`` in all at once;
  others are closed right after the answer. A flood of refused connections thus
  holds a bounded number of descriptors, not one per connection for that moment.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial

from enclave_agent.runtime.app_protocol import AppProtocolError
from enclave_agent.runtime.config import Limits
from enclave_common.errors import ShownError
from enclave_common.http_server import Answer, admit_by_shares
from enclave_common.logs import get_logger
from enclave_common.shares import QueuedShares, ShareRefused, Shares

Caller = int | str  # a uid, or one of the names below
TCP_CALLERS: Caller = "tcp"
UNKNOWN_CALLER: Caller = "unknown"  # a peer the kernel could not name (refused)

_LINGERING_PER_CALLER = 16
_LINGERING = 64

log = get_logger()


def _logged(caller: Caller) -> str:
    return f"uid={caller}" if isinstance(caller, int) else caller


def _over_share(caller: Caller, holding: str, key: str) -> AppProtocolError:
    if caller == TCP_CALLERS:
        who = f"the TCP listener's callers have {holding}, their"
    else:
        who = f"uid {caller} has {holding}, its"
    return AppProtocolError("ThrottlingException", f"{who} whole share (limits.{key})", 503)


def _connection_refused(caller: Caller, refused: ShareRefused) -> AppProtocolError:
    key = "max_connections" if refused.whole else "max_connections_per_uid"
    log.warning("connection_refused", caller=_logged(caller), limit=f"limits.{key}")
    if refused.whole:
        return AppProtocolError(
            "ThrottlingException",
            f"the agent is serving too many connections ({refused.limit}, limits.{key})",
            503,
        )
    return _over_share(caller, f"{refused.limit} connections open", key)


def _kms_call_refused(
    caller: Caller, operation: str, patience: float, refused: ShareRefused
) -> AppProtocolError:
    key = "max_kms_calls_per_uid"
    log.warning(
        "kms_call_refused", caller=_logged(caller), operation=operation, limit=f"limits.{key}"
    )
    who = "the TCP listener's callers" if caller == TCP_CALLERS else f"uid {caller}"
    return AppProtocolError(
        "ThrottlingException",
        f"{who} kept {refused.limit} KMS calls in flight, the whole share "
        f"(limits.{key}), for the {patience:g} s this call waited: it was not started",
        503,
    )


class Admission:
    def __init__(self, limits: Limits, render: Callable[[ShownError], Answer]) -> None:
        self._render = render
        self._unix: Shares[Caller] = Shares(limits.max_connections_per_uid, limits.max_connections)
        self._tcp: Shares[Caller] = Shares(limits.max_connections_per_uid, limits.max_connections)
        self._kms_calls: QueuedShares[Caller] = QueuedShares(
            limits.max_kms_calls_per_uid, patience=limits.kms_call_timeout
        )
        self._lingering: Shares[Caller] = Shares(_LINGERING_PER_CALLER, _LINGERING)

    def admit(
        self, caller: Caller, *, tcp: bool, denied: Answer | None = None
    ) -> AbstractAsyncContextManager[Answer | None]:
        """The driver's ``admit``: ``denied`` (the access rules refuse the caller) at
        once, or one of ``caller``'s connections on its listener (``tcp`` or the Unix
        socket), or ThrottlingException at once."""
        shares = self._tcp if tcp else self._unix

        def refusal(refused: ShareRefused) -> Answer:
            return self._render(_connection_refused(caller, refused))

        return admit_by_shares(caller, shares, self._lingering, refusal, denied=denied)

    def kms_call(self, caller: Caller, operation: str) -> AbstractAsyncContextManager[None]:
        """Hold one of ``caller``'s KMS calls in flight, waiting in the caller's own
        queue; ``AppProtocolError`` (Throttling) when none came within the patience."""
        patience = self._kms_calls.patience
        return self._kms_calls.share(
            caller, refused=partial(_kms_call_refused, caller, operation, patience)
        )

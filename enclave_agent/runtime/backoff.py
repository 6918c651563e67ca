"""How long to wait before trying again: exponential backoff with full jitter (pure).

AWS's advice for its APIs ("Exponential Backoff And Jitter", the AWS Architecture
Blog): after the n-th failure in a row, wait a uniform random time between 0 and
``min(cap, base * 2 ** (n - 1))``, so that many clients failing together do not come
back together. The KMS gateway's retries and the secret store's refreshes use it.
"""

from __future__ import annotations

import random


def full_jitter(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` (1 or more) failures in a row."""
    ceiling = min(cap, base * 2 ** min(failures - 1, 64))
    return random.uniform(0, ceiling)  # noqa: S311 (jitter, not cryptography)

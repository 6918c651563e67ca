"""Who may use the agent: the allow rule over a caller's SO_PEERCRED.

Together with the socket file's mode this is the whole app-side boundary
(docs/architecture.md, "The trust boundary"); reading the credentials is
``enclave_common.peercred``.
"""

from __future__ import annotations

import os

from enclave_agent.runtime.config import AccessConfig
from enclave_common.peercred import PeerCred


def is_allowed(cred: PeerCred, access: AccessConfig, *, own_uid: int | None = None) -> bool:
    """With no rule configured, only the agent's own uid and root may ask; otherwise
    the caller's uid, primary gid or one of its supplementary groups must be listed
    (root is not implied)."""
    if not access.allowed_uids and not access.allowed_gids:
        return cred.uid in (0, os.getuid() if own_uid is None else own_uid)
    if cred.uid in access.allowed_uids or cred.gid in access.allowed_gids:
        return True
    return not access.allowed_gids.isdisjoint(cred.groups)

"""Who may use the agent: the allow rule over a caller's uid and groups.

Together with the socket file's mode this is the whole app-side boundary
(docs/architecture.md, "The trust boundary"). One rule for both listeners; what
differs is where the groups come from:

- Unix socket: SO_PEERCRED and SO_PEERGROUPS (``enclave_common.peercred``), the
  caller's primary and supplementary gids as of its connect().
- TCP listener: the kernel names only the uid owning the client's socket
  (``enclave_common.tcp_peercred``); its groups are that uid's in the group database
  now (``database_groups``: its passwd entry's gid and /etc/group's lists), not the
  process's own. A process that dropped or gained groups at run time is judged by the
  database, and a uid with no passwd entry has no groups: only a uid rule admits it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterable

from enclave_agent.runtime.config import AccessConfig
from enclave_common.peercred import PeerCred


def is_allowed(cred: PeerCred, access: AccessConfig, *, own_uid: int | None = None) -> bool:
    """A Unix socket caller: its uid, primary gid or a supplementary gid (SO_PEERGROUPS)."""
    return _allowed(cred.uid, lambda: (cred.gid, *cred.groups), access, own_uid)


def is_uid_allowed(uid: int, access: AccessConfig, *, own_uid: int | None = None) -> bool:
    """A TCP caller, known by uid only: its groups from the group database. Blocking
    (the group database may be NSS): call it off the event loop."""
    return _allowed(uid, lambda: database_groups(uid), access, own_uid)


def database_groups(uid: int) -> frozenset[int]:
    """``uid``'s primary gid (passwd) and supplementary gids (group); none if ``uid``
    has no passwd entry."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


def _allowed(
    uid: int, gids: Callable[[], Iterable[int]], access: AccessConfig, own_uid: int | None
) -> bool:
    """With no rule configured, only the agent's own uid and root may ask; otherwise
    the uid or one of its gids must be listed (root is not implied)."""
    if not access.allowed_uids and not access.allowed_gids:
        return uid in (0, os.getuid() if own_uid is None else own_uid)
    if uid in access.allowed_uids:
        return True
    return bool(access.allowed_gids) and not access.allowed_gids.isdisjoint(gids())

"""PID-1 duties for ``enclave-agent run``: loopback up, start the app, signals, reaping.

An enclave boots straight into its first process. There is no init system, so
this process must do what one does: bring ``lo`` up (the enclave kernel leaves it
down, and the optional TCP listener and many apps need it), start the app, pass
SIGTERM/SIGINT on to it, and exit with its status.

Why we reap children ourselves instead of using trio's process API: as PID 1 (or
a child subreaper, which ``run`` also makes us so it behaves the same outside an
enclave) we inherit every orphan in the enclave — a daemon the app double-forked,
a shell's background job. Nobody else will ever wait() for them, so each would
stay a zombie forever, and trio's ``Process`` only waits for the children it
spawned itself (by pidfd). We therefore spawn the app with ``posix_spawnp`` and
run one ``waitpid(-1)`` loop on SIGCHLD that collects everything: the app's
status when it is the app, a log line when it is an orphan. No other part of the
agent starts processes, so this loop cannot steal a status anyone else waits for.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from enclave_common.logs import get_logger

log = get_logger()

# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name[IFNAMSIZ], short ifr_flags, union padding
PR_SET_CHILD_SUBREAPER = 36
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
SUPERVISED_SIGNALS = (signal.SIGCHLD, *FORWARDED_SIGNALS)
CHILD_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class InitError(Exception):
    """A PID-1 duty failed (interface, spawn)."""


def interface_up(name: str = "lo") -> bool:
    """Set IFF_UP on ``name`` with SIOCGIFFLAGS/SIOCSIFFLAGS (no `ip` binary in the image).

    Returns True when the flag had to be set, False when it already was.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(name.encode(), 0)
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request)
            _, flags = _IFREQ.unpack(answer)
            if flags & IFF_UP:
                return False
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP))
        except OSError as exc:
            raise InitError(f"cannot bring {name} up: {exc.strerror}") from exc
    return True


def disable_core_dumps() -> bool:
    """No core file and no same-uid ptrace or /proc/PID/mem reads of this process.

    Why: the agent's memory holds the recipient private key and every secret in
    clear; a core dump (crash, SIGQUIT, gcore) would write them to disk. RLIMIT_CORE
    0 (soft and hard) stops the kernel writing one; PR_SET_DUMPABLE 0 also makes
    /proc/PID/{mem,environ,...} root-only and refuses ptrace by other processes of
    our uid. Returns True when the kernel reports the process as not dumpable.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Adopt orphaned descendants even when not PID 1 (PR_SET_CHILD_SUBREAPER)."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def exit_code(wait_status: int) -> int:
    """The shell's convention: the exit status, or 128 + the signal that killed it."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def reap(main_pid: int) -> int | None:
    """Collect every child that has exited; the main child's exit code if it was one."""
    result: int | None = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid == main_pid:
            result = exit_code(status)
        else:
            log.info("orphan_reaped", pid=pid, status=exit_code(status))
    return result


async def supervise(
    argv: Sequence[str],
    env: Mapping[str, str],
    signals: AsyncIterator[int] | None = None,
    *,
    output: tuple[int, int] | None = None,
) -> int:
    """Start ``argv``, forward signals to it, reap everything, return its exit code.

    ``signals``: a receiver for ``SUPERVISED_SIGNALS`` the caller opened earlier (so
    none is lost between start-up and here); by default one is opened now.
    ``output``: descriptors to give the command as stdout and stderr (else ours); they
    are closed here once it has them.
    """
    if not argv:
        raise InitError("no command to run")
    if signals is None:
        # Open the receiver before spawning, so the child's SIGCHLD cannot be missed.
        with trio.open_signal_receiver(*SUPERVISED_SIGNALS) as receiver:
            return await _supervise(argv, env, receiver, output)
    return await _supervise(argv, env, signals, output)


async def _supervise(
    argv: Sequence[str],
    env: Mapping[str, str],
    receiver: AsyncIterator[int],
    output: tuple[int, int] | None,
) -> int:
    actions = []
    if output is not None:
        actions = [(os.POSIX_SPAWN_DUP2, output[0], 1), (os.POSIX_SPAWN_DUP2, output[1], 2)]
    try:
        # posix_spawn is a vfork+exec: it returns as soon as the child exists.
        # Python ignores SIGPIPE and SIGXFSZ at start-up and exec keeps ignored
        # signals ignored: give CMD the defaults back, as subprocess does.
        pid = os.posix_spawnp(  # noqa: ASYNC221
            argv[0], list(argv), dict(env), setsigdef=CHILD_DEFAULT_SIGNALS, file_actions=actions
        )
    except OSError as exc:
        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        log.error("command_failed_to_start", command=argv[0], error=exc.strerror)
        return code
    finally:
        for fd in output or ():
            os.close(fd)  # the command's now; with ours gone, its readers see EOF at its end
    log.info("command_started", command=argv[0], pid=pid)
    status = reap(pid)
    if status is None:
        async for signum in receiver:
            if signum == signal.SIGCHLD:
                status = reap(pid)
                if status is not None:
                    break
            else:
                log.info("signal_forwarded", signal=signal.Signals(signum).name, pid=pid)
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
    log.info("command_exited", pid=pid, status=status)
    assert status is not None
    return status

"""``python -m devtools.local_kms --state-file FILE ...``: run the local KMS stand-in.

Assembles the stand-in in one place: TLS material (trustme, fresh each start), the
trusted attestation roots, the credentials, moto, the HTTPS server with one endpoint
per service (KMS; with ``--stores`` also Secrets Manager, SSM and S3, each on its own
port, as each AWS service has its own host). Once listening it writes the state file
(temp file + rename); SIGTERM or SIGINT stops it cleanly, and the state file and CA
file are removed on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import trio
import trustme
from cryptography import x509

from devtools.local_kms.backend import MotoKms, default_accounts
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import FaultInjector
from devtools.local_kms.server import Admin, Service, StandInServer
from devtools.local_kms.service import LocalKms
from enclave_common.address import is_loopback_host
from enclave_common.logs import LEVELS, configure_logging, get_logger

SIMULATED_ROOT_FILE = "root.pem"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.local_kms",
        description="Local AWS KMS stand-in that speaks Recipient (development only).",
    )
    parser.add_argument("--state-file", type=Path, required=True, help="JSON written when ready")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="ID",
        help="an AWS account (12 digits) to speak for, each with its own credentials, keys "
        "and aliases; repeatable, the first is the primary (default: 111122223333)",
    )
    parser.add_argument(
        "--simulated-nsm-ca",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="trust attestation documents of the simulated NSM whose CA is in DIR (DIR/root.pem)",
    )
    parser.add_argument(
        "--trust-root",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="trust attestation documents under this root certificate (PEM)",
    )
    parser.add_argument(
        "--stores",
        action="store_true",
        help="also serve Secrets Manager, SSM and S3 (each on a port of its own; the state "
        "file gains secretsmanager_endpoint, ssm_endpoint and s3_endpoint)",
    )
    parser.add_argument("--log-level", default="info", choices=LEVELS)
    return parser


def _check_loopback(host: str) -> None:
    # Development credentials and a fake KMS have no business on a real network.
    if not is_loopback_host(host):
        raise SystemExit(f"local-kms: --host must be a loopback address, got {host!r}")


def _roots(args: argparse.Namespace) -> list[bytes]:
    paths = [d / SIMULATED_ROOT_FILE for d in args.simulated_nsm_ca] + list(args.trust_root)
    roots = []
    for path in paths:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise SystemExit(f"local-kms: cannot read trust root {path}: {exc.strerror}") from exc
        try:
            x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise SystemExit(f"local-kms: trust root {path} is not a PEM certificate") from exc
        roots.append(pem)
    return roots


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def ca_path_for(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".ca.pem")


async def run(args: argparse.Namespace) -> int:
    log = get_logger()
    log.warning(
        "local_kms",
        message="this is a LOCAL KMS STAND-IN for development, not AWS KMS: "
        "its keys, credentials and answers protect nothing",
    )
    _check_loopback(args.host)
    if not args.state_file.parent.is_dir():
        raise SystemExit(f"local-kms: no directory for the state file {args.state_file}")
    roots = _roots(args)
    if not roots:
        log.warning("no_trust_roots", detail="every call with a Recipient will be refused")
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(ssl_context)

    try:
        moto = MotoKms(args.region, args.account or default_accounts())
    except ValueError as exc:
        raise SystemExit(f"local-kms: --account: {exc}") from exc
    credentials = CredentialStore(moto.accounts)
    services: list[Service] = [
        LocalKms(region=args.region, roots=roots, credentials=credentials, moto=moto)
    ]
    if args.stores:
        # Imported only here: moto's stores take seconds to import, KMS alone does not.
        from devtools.local_kms.stores import build_stores

        services += build_stores(region=args.region, credentials=credentials)
    admin = Admin(secrets.token_urlsafe(32), FaultInjector(), credentials)
    server = StandInServer(admin, ssl_context)

    listeners = {}
    for service in services:
        # KMS on --port, each store on a free port. "localhost" may resolve to two
        # addresses, each with its own port 0: keep one.
        port = args.port if service.name == "kms" else 0
        opened = await trio.open_tcp_listeners(port, host=args.host)
        for extra in opened[1:]:
            await extra.aclose()
        listeners[service.name] = opened[:1]
    ports = {name: opened[0].socket.getsockname()[1] for name, opened in listeners.items()}
    port = ports["kms"]
    state_file: Path = args.state_file.resolve()
    ca_file = ca_path_for(state_file)
    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    state = {
        "endpoint": f"https://{host_in_url}:{port}",
        **{
            f"{name}_endpoint": f"https://{host_in_url}:{number}"
            for name, number in ports.items()
            if name != "kms"
        },
        "host": args.host,
        "port": port,
        "ca_bundle": str(ca_file),
        "region": args.region,
        "account_id": moto.account_id,
        "aws_access_key_id": credentials.long_term.access_key_id,
        "aws_secret_access_key": credentials.long_term.secret_access_key,
        "accounts": [
            {
                "account_id": account,
                "aws_access_key_id": credentials.long_term_of(account).access_key_id,
                "aws_secret_access_key": credentials.long_term_of(account).secret_access_key,
            }
            for account in moto.accounts
        ],
        "admin_token": admin.token,
        "trust_roots": len(roots),
        "pid": os.getpid(),
    }
    # Signals are caught before the state file announces readiness, so a SIGTERM sent as
    # soon as it appears still stops the stand-in cleanly.
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            # Written here so that it is removed in every case it was written in.
            _write_atomically(ca_file, ca.cert_pem.bytes().decode())
            async with trio.open_nursery() as nursery:
                for service in services:
                    nursery.start_soon(server.serve, service, listeners[service.name])
                _write_atomically(state_file, json.dumps(state, indent=2) + "\n")
                log.info("listening", endpoint=state["endpoint"], state_file=str(state_file))
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    finally:
        for path in (state_file, ca_file):
            path.unlink(missing_ok=True)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, process="local-kms")
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())

"""GET /v1/credentials from botocore's real chain, and region discovery over IMDSv2.

Every test pins the chain to local sources: IMDS disabled (no traffic off loopback),
shared files pointed at the test's own directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from proxy.credentials import CredentialSource, CredentialsUnavailable
from proxy.region import RegionError, discover_region
from tests.support.proxy_harness import capture_logs, log_events, request, running_proxy

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY-SECRET-MARKER"


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    return tmp_path


async def test_credentials_from_environment(
    clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-from-env")
    logs = capture_logs()
    source = CredentialSource(region="eu-west-1")
    async with running_proxy((), credentials=source) as proxy:
        status, head, body = await request(
            proxy.port, b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == 200
    assert body == {
        "AccessKeyId": "AKIDEXAMPLE",
        "SecretAccessKey": SECRET,
        "Token": "token-from-env",
        "Expiration": None,
        "Region": "us-east-1",  # the proxy's region, not the source's
    }
    assert b"cache-control: no-store" in head.lower()
    assert SECRET not in logs.getvalue() and "token-from-env" not in logs.getvalue()
    (event,) = [e for e in log_events(logs) if e.get("target") == "/v1/credentials"]
    assert event["status"] == 200


async def test_credentials_503_when_chain_is_empty(clean_aws_env: Path) -> None:
    source = CredentialSource(region="us-east-1")
    async with running_proxy((), credentials=source) as proxy:
        status, _, body = await request(
            proxy.port, b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == 503
    assert "no AWS credentials found" in body["error"]


def _write_process_config(directory: Path, ttl: dt.timedelta) -> Path:
    counter = directory / "runs"
    script = directory / "cred_process.py"
    script.write_text(
        "import datetime as dt, json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        f"exp = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds={ttl.total_seconds()})\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': f'AKIDPROC{n}',\n"
        f"    'SecretAccessKey': {SECRET!r}, 'SessionToken': 'tok',\n"
        "    'Expiration': exp.strftime('%Y-%m-%dT%H:%M:%SZ')}))\n"
    )
    (directory / "config").write_text(
        f"[default]\ncredential_process = {sys.executable} {script}\n"
    )
    return counter


async def test_credential_process_short_lived_is_rerun(clean_aws_env: Path) -> None:
    """Credentials inside botocore's refresh window are fetched again on the next ask."""
    counter = _write_process_config(clean_aws_env, dt.timedelta(minutes=5))
    source = CredentialSource(region="us-east-1")
    first = await source.get()
    runs = int(counter.read_text())
    second = await source.get()
    assert first.access_key_id == f"AKIDPROC{runs}"
    assert second.access_key_id == f"AKIDPROC{runs + 1}"
    assert counter.read_text() == str(runs + 1)
    assert second.expiration is not None
    remaining = second.expiration - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=3) < remaining <= dt.timedelta(minutes=5)
    doc = second.to_json("us-east-1")
    assert doc["Expiration"].endswith("Z") and len(doc["Expiration"]) == 20


async def test_credential_process_long_lived_is_cached(clean_aws_env: Path) -> None:
    counter = _write_process_config(clean_aws_env, dt.timedelta(hours=2))
    source = CredentialSource(region="us-east-1")
    first = await source.get()
    second = await source.get()
    assert first.access_key_id == second.access_key_id == "AKIDPROC1"
    assert counter.read_text() == "1"
    assert SECRET not in repr(second)


async def test_credential_process_failure_is_503_reason(clean_aws_env: Path) -> None:
    (clean_aws_env / "config").write_text(
        f"[default]\ncredential_process = {sys.executable} -c 'raise SystemExit(3)'\n"
    )
    source = CredentialSource(region="us-east-1")
    with pytest.raises(CredentialsUnavailable, match="credential chain failed"):
        await source.get()


@contextlib.contextmanager
def _role_source_via_moto_sts(monkeypatch: pytest.MonkeyPatch) -> Iterator[CredentialSource]:
    """A CredentialSource assuming a narrow role through moto's STS on loopback, with
    base credentials from the environment; the STS server stops on leaving."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDBASE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield CredentialSource(
            region="us-east-1",
            assume_role_arn="arn:aws:iam::123456789012:role/enclave-narrow",
            sts_endpoint=f"http://{host}:{port}",
        )
    finally:
        server.stop()


async def test_assume_role_through_sts(
    clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _role_source_via_moto_sts(monkeypatch) as source:
        first = await source.get()
        second = await source.get()
    assert first.access_key_id != "AKIDBASE" and first.token
    assert first.expiration is not None and first.expiration > dt.datetime.now(dt.UTC)
    assert second == first  # cached until 15 minutes before expiry


async def test_assume_role_failure_is_unavailable(clean_aws_env: Path) -> None:
    source = CredentialSource(
        region="us-east-1", assume_role_arn="arn:aws:iam::123456789012:role/x"
    )
    with pytest.raises(CredentialsUnavailable, match="no AWS credentials found"):
        await source.get()


class _FakeImds(http.server.BaseHTTPRequestHandler):
    token = "imds-token-123"

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:
        assert self.path == "/latest/api/token"
        assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._answer(self.token)

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self.send_response(401)
            self.end_headers()
            return
        assert self.path == "/latest/meta-data/placement/region"
        self._answer("eu-central-2")

    def _answer(self, text: str) -> None:
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_imds() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


async def test_region_from_imdsv2(fake_imds: str) -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": fake_imds}
    assert await discover_region(environ=env) == "eu-central-2"


async def test_region_discovery_errors_are_clear() -> None:
    with pytest.raises(RegionError, match="IMDS is disabled"):
        await discover_region(environ={"AWS_EC2_METADATA_DISABLED": "true"})
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing answers there
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}"}
    with pytest.raises(RegionError, match="did not answer.*--region"):
        await discover_region(environ=env, imds_timeout=0.5)


def test_credentials_json_shape() -> None:
    from proxy.credentials import AwsCredentials

    expiry = dt.datetime(2026, 11, 29, 1, 0, tzinfo=dt.UTC)
    doc = AwsCredentials("A", "S", None, expiry).to_json("us-east-1")
    assert doc == json.loads(json.dumps(doc))
    assert doc["Expiration"] == "2026-11-29T01:00:00Z" and doc["Token"] is None


async def test_hung_credential_process_times_out(clean_aws_env: Path) -> None:
    (clean_aws_env / "config").write_text(
        f"[default]\ncredential_process = {sys.executable} -c 'import time; time.sleep(1.5)'\n"
    )
    source = CredentialSource(region="us-east-1", fetch_timeout=0.3)
    with pytest.raises(CredentialsUnavailable, match="did not finish within 0.3 s"):
        await source.get()


async def test_credentials_do_not_wait_for_threads_stuck_in_name_lookups(
    clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo runs in trio's default worker threads and, when DNS hangs, abandoned
    lookups hold them until glibc gives up. Credentials must not queue behind them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    source = CredentialSource(region="us-east-1", fetch_timeout=5)
    default = trio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(int(default.total_tokens))]
    for borrower in borrowers:
        default.acquire_on_behalf_of_nowait(borrower)
    try:
        credentials = await source.get()
    finally:
        for borrower in borrowers:
            default.release_on_behalf_of(borrower)
    assert credentials.access_key_id == "AKIDEXAMPLE"


async def test_assume_role_renewal_failure_keeps_still_valid_credentials(
    clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal starts 15 min before expiry; an STS hiccup then must not turn credentials
    that are still good for minutes into a 503. Only nearly expired ones are dropped."""
    from dataclasses import replace

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with _role_source_via_moto_sts(monkeypatch) as source:
        first = await source.get()
    now = dt.datetime.now(dt.UTC)
    source._role = replace(first, expiration=now + dt.timedelta(minutes=10))
    kept = await source.get()
    assert kept.access_key_id == first.access_key_id
    source._role = replace(first, expiration=now + dt.timedelta(seconds=60))
    with pytest.raises(CredentialsUnavailable, match="AssumeRole"):
        await source.get()


def test_region_lookup_follows_botocore_imds_ipv6_mode() -> None:
    """botocore fetches the credentials from IMDS over IPv6 when
    AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6 (IPv6-only instances); the region
    lookup must ask the same endpoint, not an IPv4 address that is not there."""
    from proxy.region import _imds_endpoint

    assert _imds_endpoint({}) == "http://169.254.169.254"
    assert _imds_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}) == (
        "http://[fd00:ec2::254]"
    )
    assert _imds_endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "ipv4"}) == (
        "http://169.254.169.254"
    )
    explicit = {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9/",
    }
    assert _imds_endpoint(explicit) == "http://127.0.0.1:9"

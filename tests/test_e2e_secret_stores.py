"""Secrets in Secrets Manager, SSM and S3, end to end with real processes.

One stack for the module (devtools.devstack): the simulated NSM CA, the local stand-in
(KMS and the three stores) speaking for two accounts, A (the image's: its key, its
stores) and B (one the parent owns), and the proxy serving A's credentials. The
operator (boto3 with A's credentials, and ``enclave-agent seal``) seals values under
A's key, whose policy admits only the enclave's image. For each store an agent reads
a 4096-byte secret that rotates every second and the largest value that store can
hold; the parent, who may write to the stores in these tests, swaps ciphertexts and
takes the store down. Every log of every process is searched for the values.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack import (
    REPO_ROOT,
    DevStackError,
    create_enclave_key,
    local_kms_client,
    local_operator_env,
    log_events,
    python_env,
    stop_process,
)
from devtools.local_kms.admin_client import account_credentials, set_faults
from enclave_agent.client import AgentClient, AgentError, SecretVersion
from enclave_agent.operator.seal import SECRETS_MANAGER_LIMIT, SSM_ADVANCED_LIMIT, seal
from enclave_agent.runtime.sealed import MAX_PLAIN_VALUE, MAX_SEALED_BYTES, MAX_VALUE
from tests.conftest import STORE_ACCOUNTS
from tests.support.stack import (
    FaultStack,
    connect,
    find_leaks,
    raw_exchange,
    read_until_closed,
    start_proxy,
    status_of,
)

A, B = STORE_ACCOUNTS
BUCKET = "enclave-secrets"
STORES = ("secretsmanager", "ssm", "s3")
WAIT = 30.0  # seconds any condition below may take; bounded polling


def value_of(size: int) -> bytes:
    """A value with a marker no log could hold by chance, ``size`` bytes long."""
    marker = f"value-{secrets.token_hex(12)}-".encode()
    return (marker + secrets.token_hex(size).encode())[:size]


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {WAIT:g} s: {what}")


@dataclass
class Stores:
    dev: FaultStack
    key: str  # the image's key (A), trusted
    operator_env: dict[str, str]
    values: list[bytes] = field(default_factory=list)  # every value sealed: none may leak

    def client(self, service: str, account: str = A) -> Any:
        return local_kms_client(self.dev.kms, service=service, account=account)

    def seal(self, name: str, value: bytes, *, bare: bool = False) -> bytes:
        """``value`` sealed as ``enclave-agent seal`` seals it (for ``name``), or with
        ``bare`` a KMS ciphertext made without the enclave-kms:secret context."""
        self.values.append(value)
        kms = self.client("kms")
        if bare:
            return bytes(kms.encrypt(KeyId=self.key, Plaintext=value)["CiphertextBlob"])
        return seal(kms, name, self.key, value)[0]

    def seal_cli(self, name: str, value: bytes, to: str, key: str = "") -> dict[str, Any]:
        """``enclave-agent seal`` as the operator runs it (under ``key``, default the
        image's); what it printed."""
        self.values.append(value)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "enclave_agent.cli",
                "seal",
                name,
                "--key-id",
                key or self.key,
                *("--to", to),
            ],
            input=value,
            env=self.operator_env,
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        written: dict[str, Any] = json.loads(result.stdout)
        return written

    def logs(self) -> dict[str, bytes]:
        return self.dev.all_logs()


@pytest.fixture(scope="module")
def stores() -> Iterator[Stores]:
    work = Path(tempfile.mkdtemp(prefix="e2e-stores-"))
    dev = FaultStack(work_dir=work, accounts=STORE_ACCOUNTS)
    try:
        dev.make_ca()
        dev.start_kms()
        dev.start_proxy()
        kms = local_kms_client(dev.kms)
        key_id = create_enclave_key(kms, A, dev.pcrs()["0"], "the image's key")
        key = str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])
        s3 = local_kms_client(dev.kms, service="s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        yield Stores(dev, key, local_operator_env(dev.kms, account=A))
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Place:
    """Where one secret lives in one store, and how the operator (or the parent)
    writes a new version there."""

    stores: Stores
    kind: str
    name: str  # the store's name for it
    source: str = ""  # the agent's `from`, known once the first version is written

    def first(self, secret: str, value: bytes) -> str:
        """Seal with the CLI; the version written."""
        to = {
            "secretsmanager": f"secretsmanager:{self.name}",
            "ssm": f"ssm:/{self.name}",
            "s3": f"s3://{BUCKET}/{self.name}",
        }[self.kind]
        written = self.stores.seal_cli(secret, value, to)
        self.source = written["from"]
        return str(written.get("version_id") or written.get("version"))

    def put(self, blob: bytes) -> str:
        """Write ``blob`` as the next version (as seal would, or as a parent with write
        access may); the version the store reports."""
        client = self.stores.client(self.kind)
        if self.kind == "secretsmanager":
            return str(client.put_secret_value(SecretId=self.arn, SecretBinary=blob)["VersionId"])
        if self.kind == "ssm":
            text = base64.b64encode(blob).decode()
            tier = {"Tier": "Advanced"} if len(text) > 4096 else {}  # never back to Standard
            answer = client.put_parameter(
                Name=f"/{self.name}", Value=text, Type="String", Overwrite=True, **tier
            )
            return str(answer["Version"])
        answer = client.put_object(Bucket=BUCKET, Key=self.name, Body=blob, ExpectedBucketOwner=A)
        return str(answer["VersionId"])

    @property
    def arn(self) -> str:
        return self.source.removeprefix(f"{self.kind}:")

    def toml(self, secret: str, extra: str = "") -> str:
        owner = f'bucket_owner = "{A}"\n' if self.kind == "s3" else ""
        return f'\n[secrets.{secret}]\nfrom = "{self.source}"\n{owner}{extra}'


def largest_value(stores: Stores, kind: str, name: str) -> int:
    """The largest value ``kind`` holds for the secret ``name``: a 64 KiB value in S3;
    in Secrets Manager 65536 sealed bytes, in SSM 8192 base64 characters (6144 bytes),
    less the envelope's overhead (which depends on the data key's blob)."""
    if kind == "s3":
        return MAX_VALUE
    probe = MAX_PLAIN_VALUE + 1
    overhead = len(stores.seal(name, value_of(probe))) - probe
    limit = SECRETS_MANAGER_LIMIT if kind == "secretsmanager" else SSM_ADVANCED_LIMIT // 4 * 3
    return limit - overhead


def start_agent(stores: Stores, name: str, secrets_toml: str) -> AgentClient:
    limits = "\n[limits]\nstore_read_timeout = 3\n"
    config = stores.dev.write_agent_config(name=name, secrets_toml=secrets_toml + limits)
    return AgentClient(stores.dev.start_agent(config, name=name), timeout=WAIT)


def events(stores: Stores, agent: str, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(stores.dev.log_path(agent)) if e.get("event") == name]


def refused_after(stores: Stores, agent: str, seen: int) -> dict[str, Any]:
    """The next secret_refresh_failed event of ``agent`` after the first ``seen``."""
    found = wait_until(
        lambda: events(stores, agent, "secret_refresh_failed")[seen:], "a failed refresh"
    )
    event: dict[str, Any] = found[0]
    return event


def refresh_failures(socket_path: str) -> dict[str, float]:
    """enclave_agent_secret_refresh_failures_total by secret, from the agent's /metrics."""
    answer = raw_exchange(socket_path, [b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert status_of(answer) == 200
    text = answer.partition(b"\r\n\r\n")[2].decode()
    return {
        sample.labels["secret"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "enclave_agent_secret_refresh_failures_total"
    }


def assert_no_leak(stores: Stores) -> None:
    needles: dict[str, bytes] = {}
    for index, value in enumerate(stores.values):
        needles[f"value {index}"] = value[:30]
        needles[f"value {index} (base64)"] = base64.b64encode(value[:30])
        needles[f"value {index} (hex)"] = value[:16].hex().encode()
    assert find_leaks(needles, stores.logs()) == []


@pytest.mark.parametrize("kind", STORES)
def test_a_secret_in_each_store_is_fetched_rotated_and_never_swapped(
    stores: Stores, kind: str, tmp_path: Path
) -> None:
    agent = f"agent-{kind}"
    db, big = Place(stores, kind, f"e2e/{kind}/db"), Place(stores, kind, f"e2e/{kind}/big")
    first = value_of(MAX_PLAIN_VALUE)  # the largest a plain KMS ciphertext holds
    version = db.first("db", first)
    largest = value_of(largest_value(stores, kind, "big"))
    big_version = big.first("big", largest)
    copy = tmp_path / "db"
    app = start_agent(
        stores,
        agent,
        db.toml("db", f'refresh = 1\nstale_after = 3\nfile = "{copy}"\n') + big.toml("big"),
    )
    with app:
        # Fetched: the value, the version the store reports, the file copy.
        assert app.secret_version("db") == SecretVersion(first, version)
        assert app.secret_version("big") == SecretVersion(largest, big_version)
        assert copy.read_bytes() == first
        assert [e["store"] for e in events(stores, agent, "store_read")][:2] == [kind, kind]

        # Rotated: seal again; a long-poll past the old version wakes with the new one.
        second = value_of(MAX_PLAIN_VALUE)
        polled: list[SecretVersion] = []
        poll = threading.Thread(
            target=lambda: polled.append(
                AgentClient(app.socket_path, timeout=WAIT).secret_version(
                    "db", after=version, wait=WAIT
                )
            )
        )
        poll.start()
        new_version = db.put(stores.seal("db", second))
        poll.join(WAIT + 5)
        assert polled == [SecretVersion(second, new_version)]
        assert copy.read_bytes() == second and copy.stat().st_mode & 0o777 == 0o400
        # No newer version within the wait: the old one, once the wait is over.
        assert app.secret_version("db", after=new_version, wait=1.5) == polled[0]

        # Swapped: another secret's ciphertext, then one made without the context, put
        # where db lives. Neither opens; the last good value stays, the log says why.
        for planted, why in [
            (stores.seal("big", value_of(64)), "InvalidCiphertextException"),
            (stores.seal("db", value_of(64), bare=True), "InvalidCiphertextException"),
        ]:
            seen = len(events(stores, agent, "secret_refresh_failed"))
            db.put(planted)
            failed = refused_after(stores, agent, seen)
            assert (failed["name"], failed["serving"]) == ("db", new_version)
            assert why in failed["reason"]
            assert "does not open for this secret's name" in failed["reason"]
            assert app.secret_version("db") == polled[0]
            assert copy.read_bytes() == second

        # Counted: the failed refreshes of db, by name, in the agent's metrics.
        assert refresh_failures(app.socket_path)["db"] >= 2

        # The operator seals a good value again: served.
        third = value_of(32)
        third_version = db.put(stores.seal("db", third))
        assert app.secret_version("db", after=new_version, wait=WAIT).value == third

        # The store down while refreshing: the value stays, /healthz says stale after 3 s.
        set_faults(Path(stores.dev.kms["state_file"]), "internal", count=10_000, service=kind)
        try:
            health = wait_until(
                lambda: (h := app.health())["status"] == "stale" and h, "db goes stale"
            )
            assert health["stale"] == ["db"]
            assert health["secrets"]["db"]["version"] == third_version
            assert health["secrets"]["db"]["refresh_failures"] >= 1
            assert "stale" not in health["secrets"]["big"]  # never refreshed, never stale
            assert app.secret_version("db") == SecretVersion(third, third_version)
        finally:
            set_faults(Path(stores.dev.kms["state_file"]), "internal", count=0, service=kind)
        wait_until(lambda: app.health()["status"] == "ok", "db fresh again")
    stores.dev.stop_process(agent)
    assert not copy.exists()  # the copy goes with the agent
    assert_no_leak(stores)


def test_another_accounts_stores_are_refused(stores: Stores, tmp_path: Path) -> None:
    """The parent serves account B's credentials, where stores of the same names hold
    old ciphertexts of ours (copied from A's). Secrets Manager and SSM are named by
    A's ARNs, which B's credentials cannot read as B's; S3 refuses a bucket B owns,
    the expected owner being A. Nothing is opened; the start fails naming each."""
    sm, ssm = Place(stores, "secretsmanager", "cross/db"), Place(stores, "ssm", "cross/db")
    old = value_of(40)
    sm.first("db", old)
    ssm.first("db", old)
    blob = stores.seal("db", old)
    stores.client("secretsmanager", B).create_secret(Name="cross/db", SecretBinary=blob)
    stores.client("ssm", B).put_parameter(
        Name="/cross/db", Value=base64.b64encode(blob).decode(), Type="String"
    )
    b_s3 = stores.client("s3", B)
    b_s3.create_bucket(Bucket="planted-in-b")
    b_s3.put_object(Bucket="planted-in-b", Key="db", Body=blob)

    key_id, secret = account_credentials(stores.dev.kms, B)
    env = {
        **python_env(),
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    allow = [arg for host in stores.dev.local_endpoints() for arg in ("--allow", host)]
    with start_proxy(
        tmp_path, "--listen", "tcp:127.0.0.1:0", "--region", "us-east-1", *allow, env=env
    ) as parents_proxy:
        port = wait_until(
            lambda: next(
                (e for e in parents_proxy.events() if e.get("event") == "listening"), None
            ),
            "the parent's proxy listening",
        )["address"]
        secrets_toml = (
            sm.toml("sm")
            + ssm.toml("ssm")
            + f'\n[secrets.s3]\nfrom = "s3://planted-in-b/db"\nbucket_owner = "{A}"\n'
        )
        config = stores.dev.write_agent_config(
            name="agent-cross", secrets_toml=secrets_toml + "\n[limits]\nstore_read_timeout = 3\n"
        )
        config.write_text(config.read_text().replace(stores.dev.proxy_address, str(port), 1))
        with pytest.raises(DevStackError):
            stores.dev.start_agent(config, name="agent-cross")
    [failed] = events(stores, "agent-cross", "startup_failed")
    reason = failed["reason"]
    assert reason.startswith("could not fetch secret(s): ")
    assert "s3 (S3 GetObject: AccessDenied: Access Denied)" in reason
    assert "sm (Secrets Manager GetSecretValue: AccessDeniedException: " in reason
    assert "ssm (SSM GetParameter: AccessDeniedException: " in reason
    assert not [e for e in events(stores, "agent-cross", "kms_call")]  # nothing was opened
    assert_no_leak(stores)


@pytest.mark.parametrize(
    ("kind", "failure"),
    [
        ("secretsmanager", "Secrets Manager GetSecretValue: InternalServiceError"),
        ("ssm", "SSM GetParameter: InternalServerError"),
        ("s3", "S3 GetObject: InternalError"),
    ],
)
def test_a_store_down_at_start_stops_the_start_naming_the_secret(
    stores: Stores, kind: str, failure: str
) -> None:
    place = Place(stores, kind, f"down/{kind}")
    place.first("db", value_of(40))
    agent = f"agent-down-{kind}"
    state_file = Path(stores.dev.kms["state_file"])
    set_faults(state_file, "internal", count=10_000, service=kind)
    try:
        config = stores.dev.write_agent_config(
            name=agent, secrets_toml=place.toml("db") + "\n[limits]\nstore_read_timeout = 2\n"
        )
        with pytest.raises(DevStackError):
            stores.dev.start_agent(config, name=agent)
    finally:
        set_faults(state_file, "internal", count=0, service=kind)
    [failed] = events(stores, agent, "startup_failed")
    assert failed["reason"] == (
        f"could not fetch secret(s): db ({failure}: internal error (injected fault))"
    )
    # Tried again (the store may have come back) before the start gave up.
    assert len(events(stores, agent, "store_read")) >= 2


def test_a_sealed_file_of_the_image_is_served(stores: Stores) -> None:
    """``seal --to file:`` then ``from = "file:..."``, as an image carries a secret: a
    4096-byte value (a plain KMS ciphertext) by the absolute path seal printed, and a
    64 KiB envelope by a path relative to the config's directory. Both are opened with
    the name's context through KMS with ``Recipient``; nothing is read from a store;
    the version is the sealed bytes' digest, as seal printed it."""
    image = stores.dev.work_dir / "image"
    image.mkdir()
    small, large = value_of(MAX_PLAIN_VALUE), value_of(MAX_VALUE)
    cert = stores.seal_cli("cert", small, f"file:{image / 'cert.sealed'}")
    chain = stores.seal_cli("chain", large, f"file:{image / 'chain.sealed'}")
    assert (cert["form"], chain["form"]) == ("kms", "envelope")
    assert cert["from"] == f"file:{image / 'cert.sealed'}"
    assert cert["version"].startswith("sha256:") and cert["version"] != chain["version"]
    secrets_toml = (
        f'\n[secrets.cert]\nfrom = "{cert["from"]}"\n'
        '\n[secrets.chain]\nfrom = "file:image/chain.sealed"\n'
    )
    with start_agent(stores, "agent-file", secrets_toml) as app:
        assert app.secret_version("cert") == SecretVersion(small, cert["version"])
        assert app.secret_version("chain") == SecretVersion(large, chain["version"])
        assert app.health()["secrets"]["chain"] == {"version": chain["version"]}
    assert not events(stores, "agent-file", "store_read")
    decrypts = [e for e in events(stores, "agent-file", "kms_call") if e["operation"] == "Decrypt"]
    assert len(decrypts) == 2  # the plain ciphertext, the envelope's data key
    loaded = {e["name"]: e["version"] for e in events(stores, "agent-file", "secret_loaded")}
    assert loaded == {"cert": cert["version"], "chain": chain["version"]}
    stores.dev.stop_process("agent-file")
    assert_no_leak(stores)


def connections_open(socket_path: str) -> float:
    """enclave_agent_connections_open for Unix-socket callers, from the agent's /metrics
    (the connection asking counts itself)."""
    answer = raw_exchange(socket_path, [b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"])
    text = answer.partition(b"\r\n\r\n")[2].decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "enclave_agent_connections_open" and sample.labels["caller"] == "unix"
    )


def test_sigterm_while_long_polls_are_held_stops_the_agent_cleanly(stores: Stores) -> None:
    """Long-polls (300 s) held when the agent is told to stop do not hold it up: each
    poll's connection is closed unanswered and the agent exits 0 on its SIGTERM (a
    SIGKILL after devstack's stop timeout would give -9)."""
    image = stores.dev.work_dir / "image-polls"
    image.mkdir()
    sealed = stores.seal_cli("held", value_of(64), f"file:{image / 'held.sealed'}")
    with start_agent(stores, "agent-polls", f'\n[secrets.held]\nfrom = "{sealed["from"]}"\n'):
        socket_path = stores.dev.agent_socket
        poll = (
            f"GET /v1/secrets/held?after={sealed['version']}&wait=300 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        polls = [connect(socket_path, timeout=WAIT) for _ in range(2)]
        try:
            for sock in polls:
                sock.sendall(poll.encode())
            wait_until(lambda: connections_open(socket_path) >= 3, "both polls held")
            popen = next(p.popen for p in stores.dev.processes if p.name == "agent-polls")
            assert stop_process(popen) == 0
            assert [read_until_closed(sock) for sock in polls] == [b"", b""]
        finally:
            for sock in polls:
                sock.close()
    logged = [e["event"] for e in log_events(stores.dev.log_path("agent-polls"))]
    stores.dev.stop_process("agent-polls")  # reaped already: only forgotten
    assert "stopping" in logged and "connection_failed" not in logged, logged


def test_a_sealed_file_for_another_name_or_under_an_untrusted_key_is_refused(
    stores: Stores,
) -> None:
    """A file sealed for another secret put in this secret's place, or sealed under a
    key the image does not trust (KMS answers: the key's policy admits the image),
    stops the start naming the secret and why; nothing of either value is logged."""
    image = stores.dev.work_dir / "image-refused"
    image.mkdir()
    api = stores.seal_cli("api", value_of(40), f"file:{image / 'api.sealed'}")
    kms = stores.client("kms")
    other_id = create_enclave_key(kms, A, stores.dev.pcrs()["0"], "a key the image does not pin")
    other = str(kms.describe_key(KeyId=other_id)["KeyMetadata"]["Arn"])
    untrusted = stores.seal_cli("db", value_of(40), f"file:{image / 'db.sealed'}", key=other)
    for agent, source, reasons in [
        ("agent-file-swapped", api["from"], ["InvalidCiphertextException", "does not open for"]),
        ("agent-file-untrusted", untrusted["from"], [other, "not in the agent's trusted_keys"]),
    ]:
        config = stores.dev.write_agent_config(
            name=agent,
            secrets_toml=f'\n[secrets.db]\nfrom = "{source}"\n',
            trusted_keys=[stores.key],  # the image's key only
        )
        with pytest.raises(DevStackError, match="exited with status 1"):
            stores.dev.start_agent(config, name=agent)
        [failed] = events(stores, agent, "startup_failed")
        assert failed["reason"].startswith("could not fetch secret(s): db (")
        assert all(reason in failed["reason"] for reason in reasons), failed["reason"]
    assert_no_leak(stores)


@pytest.mark.parametrize(
    ("case", "secret", "error"),
    [
        (
            "refresh",
            'from = "file:image-config/db.sealed"\nrefresh = 60',
            "secrets.db.refresh applies to a secret read from a store: the image's files do "
            "not change, a file is read once, at start",
        ),
        (
            "missing",
            'from = "file:image-config/absent"',
            "secrets.db.from: [Errno 2] No such file or directory: ",
        ),
        (
            "huge",
            'from = "file:image-config/huge"',
            f"image-config/huge is over {MAX_SEALED_BYTES} bytes, the most a sealed secret can be",
        ),
    ],
)
def test_a_sealed_file_config_error_stops_the_agent_with_one_line(
    stores: Stores, case: str, secret: str, error: str
) -> None:
    image = stores.dev.work_dir / "image-config"
    image.mkdir(exist_ok=True)
    (image / "db.sealed").write_bytes(b"\x01" * 100)
    (image / "huge").write_bytes(b"\xc5" * (MAX_SEALED_BYTES + 1))
    agent = f"agent-file-config-{case}"
    config = stores.dev.write_agent_config(name=agent, secrets_toml=f"\n[secrets.db]\n{secret}\n")
    with pytest.raises(DevStackError, match="exited with status 2"):
        stores.dev.start_agent(config, name=agent)
    [line] = stores.dev.log_path(agent).read_text().splitlines()
    assert line.startswith(f"enclave-agent serve: {config}: ") and error in line, line


def test_apps_cannot_use_the_secrets_context_key(stores: Stores) -> None:
    """An app asking for data keys under a secret's context (which, disclosed, would let
    the parent forge that secret's envelope), or to encrypt under it, is refused
    before any KMS call."""
    socket_path = stores.dev.start_agent(
        stores.dev.write_agent_config(name="agent-app"), name="agent-app"
    )
    with AgentClient(socket_path) as app:
        for call in (
            lambda: app.generate_data_key(
                stores.key, encryption_context={"enclave-kms:secret": "db"}
            ),
            lambda: app.decrypt(b"\x01" * 40, encryption_context={"enclave-kms:secret": "db"}),
            # Encrypt is served (a pass-through): an app must not seal values for a name.
            lambda: app.kms(
                "Encrypt",
                {
                    "KeyId": stores.key,
                    "Plaintext": base64.b64encode(b"planted").decode(),
                    "EncryptionContext": {"enclave-kms:secret": "db"},
                },
            ),
            lambda: app.kms(
                "ReEncrypt",
                {
                    "CiphertextBlob": base64.b64encode(b"\x01" * 40).decode(),
                    "DestinationKeyId": stores.key,
                    "DestinationEncryptionContext": {"enclave-kms:secret": "db"},
                },
            ),
        ):
            with pytest.raises(AgentError) as refused:
                call()
            assert refused.value.error_type == "ValidationException"
            assert "'enclave-kms:secret' is reserved" in refused.value.message
    assert not events(stores, "agent-app", "kms_call")
    stores.dev.stop_process("agent-app")

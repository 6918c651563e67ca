import base64
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from enclave_agent.runtime.config import SecretConfig
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.sealed import seal_envelope
from enclave_agent.runtime.secrets import (
    INLINE_VERSION,
    SecretError,
    SecretStore,
    Served,
    decrypt_request,
    filesystem_type,
    write_secret_file,
)
from enclave_agent.runtime.store_location import (
    FileLocation,
    StoreLocation,
    parse_location,
    require_pinned,
)
from enclave_agent.runtime.store_protocol import StoredSecret
from enclave_agent.runtime.stores import StoreError


class Gateway:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        assert operation == "Decrypt"
        self.requests.append(dict(request))
        blob = base64.b64decode(request["CiphertextBlob"])
        if blob == b"refused":
            raise KmsError("AccessDeniedException", "PCR0 mismatch", 400)
        if blob == b"odd":
            return {"KeyId": "k"}
        return {"Plaintext": base64.b64encode(b"value-of-" + blob).decode()}


async def test_secrets_are_decrypted_held_and_written(tmp_path: Path) -> None:
    target = tmp_path / "tmpfs" / "db"
    store = SecretStore(
        {
            "db": SecretConfig(
                "db", b"one", key_id="alias/a", encryption_context={"app": "x"}, file=target
            ),
            "api": SecretConfig("api", b"two"),
        },
        gateway := Gateway(),
    )
    await store.load()
    assert store.get("db") == Served(b"value-of-one", INLINE_VERSION)
    assert store.get("api") == Served(b"value-of-two", "config")
    assert store.get("other") is None
    assert len(store) == 2
    assert target.read_bytes() == b"value-of-one"
    assert target.stat().st_mode & 0o777 == 0o400
    assert {"CiphertextBlob": "b25l", "KeyId": "alias/a", "EncryptionContext": {"app": "x"}} in (
        gateway.requests
    )


async def test_a_refused_secret_stops_the_start_naming_it() -> None:
    store = SecretStore(
        {
            "good": SecretConfig("good", b"one"),
            "bad": SecretConfig("bad", b"refused"),
            "odd": SecretConfig("odd", b"odd"),
        },
        Gateway(),
    )
    with pytest.raises(SecretError) as info:
        await store.load()
    message = str(info.value)
    assert "bad (AccessDeniedException: PCR0 mismatch)" in message
    assert "odd (the Decrypt answer carried no usable Plaintext)" in message
    assert "good" not in message


async def test_file_copies_go_when_the_agent_stops_or_fails_to_start(tmp_path: Path) -> None:
    kept, replaced = tmp_path / "kept", tmp_path / "replaced"
    store = SecretStore(
        {"a": SecretConfig("a", b"one", file=kept), "b": SecretConfig("b", b"two", file=replaced)},
        Gateway(),
    )
    await store.load()
    assert kept.exists() and replaced.exists()
    other = tmp_path / "other"
    other.write_bytes(b"someone else's file")
    other.replace(replaced)  # not ours any more: left alone
    store.remove_files()
    assert not kept.exists() and replaced.read_bytes() == b"someone else's file"

    failing = SecretStore(
        {"good": SecretConfig("good", b"one", file=kept), "bad": SecretConfig("bad", b"refused")},
        Gateway(),
    )
    with pytest.raises(SecretError):
        await failing.load()
    assert not kept.exists()


def test_secret_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_secret_file(path, b"first")
    write_secret_file(path, b"second")  # over a 0400 file: a new file renamed over it
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_decrypt_request_shape() -> None:
    assert decrypt_request(SecretConfig("n", b"\x00")) == {"CiphertextBlob": "AA=="}


def test_filesystem_type_picks_the_innermost_latest_mount() -> None:
    mounts = (
        "overlay / overlay rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        "tmpfs /run/my\\040secrets tmpfs rw 0 0\n"
        "/dev/sda1 /run/disk ext4 rw 0 0\n"
        "proc /proc proc rw 0 0\n"
    )
    assert filesystem_type(Path("/run/secrets/a"), mounts) == "tmpfs"
    assert filesystem_type(Path("/run/my secrets/a"), mounts) == "tmpfs"
    assert filesystem_type(Path("/run/disk/a"), mounts) == "ext4"
    assert filesystem_type(Path("/runner/a"), mounts) == "overlay"
    assert filesystem_type(Path("/x"), "") is None


# --- secrets read from a store -------------------------------------------------------

SM_ARN = "arn:aws:secretsmanager:us-east-1:111122223333:secret:app/db-AbCdEf"
KEY = b"k" * 32  # the envelope's data key, as the fake KMS gives it


def sealed_for(name: str, value: bytes) -> bytes:
    """What seal makes, in the fake KMS's terms: a plain ciphertext naming its context."""
    return b"ct:" + name.encode() + b":" + value


def envelope_for(name: str, value: bytes, *, key_name: str | None = None) -> bytes:
    """An envelope whose data key opens under ``key_name``'s context (default: ``name``)."""
    blob = b"ct:" + (key_name or name).encode() + b":" + KEY
    return seal_envelope(name, value, KEY, blob, b"n" * 12)


class FakeKms:
    """Decrypt as KMS does it for sealed secrets: only under the context it was made with."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        blob = base64.b64decode(request["CiphertextBlob"])
        _, name, value = blob.split(b":", 2)
        if request.get("EncryptionContext") != {"enclave-kms:secret": name.decode()}:
            raise KmsError("InvalidCiphertextException", "", 400)
        return {"Plaintext": base64.b64encode(value).decode(), "KeyId": "k"}


class Store:
    """A store whose answers the test sets: sealed bytes and their version, or a failure."""

    def __init__(self, sealed: bytes, version: str = "v1") -> None:
        self.answer: StoredSecret | StoreError = StoredSecret(version, sealed)
        self.reads = 0

    async def read(
        self, name: str, location: StoreLocation, bucket_owner: str | None
    ) -> StoredSecret:
        self.reads += 1
        if isinstance(self.answer, StoreError):
            raise self.answer
        return self.answer


def from_store(name: str = "db", **settings: Any) -> SecretConfig:
    location = require_pinned(parse_location(f"secretsmanager:{SM_ARN}"))
    return SecretConfig(name, location=location, **settings)


async def loaded(
    store: Store, secret: SecretConfig, events: list[tuple[str, str]] | None = None
) -> SecretStore:
    class Events:
        def secret_fetched(self, name: str) -> None:
            (events if events is not None else []).append(("fetched", name))

        def secret_refresh_failed(self, name: str) -> None:
            (events if events is not None else []).append(("failed", name))

    secrets = SecretStore(
        {secret.name: secret}, FakeKms(), store, read_timeout=10.0, events=Events()
    )
    await secrets.load()
    return secrets


@pytest.mark.parametrize("seal", [sealed_for, envelope_for])
async def test_a_store_secret_is_opened_with_its_name_and_follows_rotation(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, seal: Any
) -> None:
    store = Store(seal("db", b"first value"))
    events: list[tuple[str, str]] = []
    secrets = await loaded(store, from_store(refresh=10), events)
    assert secrets.get("db") == Served(b"first value", "v1")
    nursery.start_soon(secrets.follow)

    # A long-poll past v1 is held until the new version is served.
    async def rotate() -> None:
        await trio.sleep(25)
        store.answer = StoredSecret("v2", seal("db", b"second value"))

    nursery.start_soon(rotate)
    started = trio.current_time()
    newer = await secrets.wait_for("db", "v1", 60)
    assert newer == Served(b"second value", "v2")
    assert 25 <= trio.current_time() - started <= 31  # the first refresh after the rotation
    # Nothing newer: held for the whole wait, then the same version.
    started = trio.current_time()
    assert await secrets.wait_for("db", "v2", 15) == newer
    assert trio.current_time() - started == 15
    # Asked past another version: at once.
    assert await secrets.wait_for("db", "v0", 15) == newer
    assert events[:2] == [("fetched", "db"), ("fetched", "db")]


async def test_the_file_copy_is_replaced_whole_as_the_secret_rotates(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    copy = tmp_path / "db"
    store = Store(sealed_for("db", b"first value"))
    secrets = await loaded(store, from_store(refresh=0.05, file=copy))
    assert copy.read_bytes() == b"first value" and copy.stat().st_mode & 0o777 == 0o400
    nursery.start_soon(secrets.follow)
    store.answer = StoredSecret("v2", sealed_for("db", b"second value"))
    assert await secrets.wait_for("db", "v1", 30) == Served(b"second value", "v2")
    # Replaced by a rename: the new file, whole, the same mode, no temporary left.
    assert copy.read_bytes() == b"second value" and copy.stat().st_mode & 0o777 == 0o400
    assert [p.name for p in tmp_path.iterdir()] == ["db"]
    # A copy that cannot be written is a failed refresh: the old value stays everywhere.
    copy.unlink()
    copy.mkdir()  # a rename onto a directory fails
    store.answer = StoredSecret("v3", sealed_for("db", b"third value"))
    with structlog.testing.capture_logs() as logged:
        while not any(e["event"] == "secret_refresh_failed" for e in logged):
            await trio.sleep(0.05)
    assert secrets.get("db") == Served(b"second value", "v2")
    assert any(f"cannot write {copy}" in str(e.get("reason")) for e in logged)
    copy.rmdir()
    secrets.remove_files()


@pytest.mark.parametrize(
    ("planted", "reason"),
    [
        # Another secret's ciphertext put where db lives (its context is "api").
        (sealed_for("api", b"the api key"), "InvalidCiphertextException"),
        (envelope_for("api", b"the api key"), "InvalidCiphertextException"),
        # A data key of db's with another name's GCM (the name is the associated data).
        (envelope_for("api", b"the api key", key_name="db"), "the envelope does not open"),
        (b"\xc5EKMSENV\x02", "not a sealed secret: begins like an envelope"),
    ],
)
async def test_a_swapped_ciphertext_never_opens_and_the_last_good_value_stays(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    planted: bytes,
    reason: str,
) -> None:
    store = Store(sealed_for("db", b"db password"))
    events: list[tuple[str, str]] = []
    secrets = await loaded(store, from_store(refresh=10), events)
    nursery.start_soon(secrets.follow)
    store.answer = StoredSecret("v2", planted)
    with structlog.testing.capture_logs() as logged:
        await trio.sleep(11)
    assert secrets.get("db") == Served(b"db password", "v1")
    [failed, *_] = [e for e in logged if e["event"] == "secret_refresh_failed"]
    assert (failed["name"], failed["serving"], failed["failures"]) == ("db", "v1", 1)
    assert reason in failed["reason"]
    if not reason.startswith("not a sealed secret"):
        assert "does not open for this secret's name" in failed["reason"]
    assert ("failed", "db") in events
    assert "api key" not in repr(logged)


async def test_a_failed_refresh_is_retried_sooner_and_the_secret_goes_stale(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = Store(sealed_for("db", b"db password"))
    secrets = await loaded(store, from_store(refresh=100, stale_after=250))
    nursery.start_soon(secrets.follow)
    assert secrets.health() == {
        "status": "ok",
        "secrets": {
            "db": {"version": "v1", "age_seconds": 0.0, "refresh_failures": 0, "stale": False}
        },
    }
    store.answer = StoreError(
        "Secrets Manager GetSecretValue: InternalServiceError", retryable=True
    )
    await trio.sleep(260)
    health = secrets.health()
    assert health["status"] == "stale" and health["stale"] == ["db"]
    entry = health["secrets"]["db"]
    assert entry["stale"] and entry["age_seconds"] >= 250 and entry["version"] == "v1"
    # Retried with a capped backoff (at most `refresh` apart), not once per refresh.
    assert entry["refresh_failures"] >= 3 and store.reads >= 4
    assert secrets.get("db") == Served(b"db password", "v1")
    store.answer = StoredSecret("v1", sealed_for("db", b"db password"))
    await trio.sleep(101)
    assert secrets.health()["status"] == "ok"
    assert secrets.health()["secrets"]["db"]["refresh_failures"] == 0


async def test_at_start_a_store_down_is_retried_then_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = Store(b"", "v1")
    store.answer = StoreError("proxy refused CONNECT x:443: 502 upstream refused", retryable=True)
    secrets = SecretStore({"db": from_store()}, FakeKms(), store, read_timeout=10.0)
    started = trio.current_time()
    with pytest.raises(SecretError) as info:
        await secrets.load()
    assert str(info.value) == (
        "could not fetch secret(s): db (proxy refused CONNECT x:443: 502 upstream refused)"
    )
    assert store.reads > 1 and trio.current_time() - started <= 10
    # What cannot pass is not retried.
    store.answer = StoreError("Secrets Manager GetSecretValue: AccessDenied", retryable=False)
    store.reads = 0
    with pytest.raises(SecretError, match="db \\(Secrets Manager GetSecretValue: AccessDenied\\)"):
        await SecretStore({"db": from_store()}, FakeKms(), store).load()
    assert store.reads == 1


@pytest.mark.parametrize("seal", [sealed_for, envelope_for])
async def test_a_sealed_file_of_the_image_is_opened_once_with_its_name(seal: Any) -> None:
    """``from = "file:..."``: the bytes load_config read, opened as a store's are (the
    name's context, plain or envelope), never re-read; the version is their digest."""
    sealed = seal("tls", b"the chain")
    image_file = SecretConfig("tls", sealed, location=FileLocation("/app/tls.sealed"))
    secrets = SecretStore({"tls": image_file}, kms := FakeKms())  # no store reader at all
    await secrets.load()
    version = "sha256:" + hashlib.sha256(sealed).hexdigest()[:16]  # sha256sum's first 16
    assert secrets.get("tls") == Served(b"the chain", version) and kms.calls == 1
    assert secrets.health() == {"status": "ok", "secrets": {"tls": {"version": version}}}

    # Sealed for another name: the start fails naming the secret, nothing is logged of it.
    planted = SecretConfig("tls", seal("api", b"the api key"), location=FileLocation("/x"))
    with structlog.testing.capture_logs() as logged, pytest.raises(SecretError) as info:
        await SecretStore({"tls": planted}, FakeKms()).load()
    assert str(info.value).startswith("could not fetch secret(s): tls (")
    assert "does not open for this secret's name" in str(info.value)
    assert [e["name"] for e in logged if e["event"] == "secret_failed"] == ["tls"]
    assert "the api key" not in repr(logged)

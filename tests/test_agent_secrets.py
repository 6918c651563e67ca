import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from enclave_agent.runtime.config import SecretConfig
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.secrets import (
    SecretError,
    SecretStore,
    decrypt_request,
    filesystem_type,
    write_secret_file,
)


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
        }
    )
    gateway = Gateway()
    await store.load(gateway)
    assert store.get("db") == b"value-of-one"
    assert store.get("api") == b"value-of-two"
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
        }
    )
    with pytest.raises(SecretError) as info:
        await store.load(Gateway())
    message = str(info.value)
    assert "bad (AccessDeniedException: PCR0 mismatch)" in message
    assert "odd (the Decrypt answer carried no usable Plaintext)" in message
    assert "good" not in message


async def test_file_copies_go_when_the_agent_stops_or_fails_to_start(tmp_path: Path) -> None:
    kept, replaced = tmp_path / "kept", tmp_path / "replaced"
    store = SecretStore(
        {"a": SecretConfig("a", b"one", file=kept), "b": SecretConfig("b", b"two", file=replaced)}
    )
    await store.load(Gateway())
    assert kept.exists() and replaced.exists()
    other = tmp_path / "other"
    other.write_bytes(b"someone else's file")
    other.replace(replaced)  # not ours any more: left alone
    store.remove_files()
    assert not kept.exists() and replaced.read_bytes() == b"someone else's file"

    failing = SecretStore(
        {"good": SecretConfig("good", b"one", file=kept), "bad": SecretConfig("bad", b"refused")}
    )
    with pytest.raises(SecretError):
        await failing.load(Gateway())
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

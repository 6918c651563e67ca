"""The parent chooses the key: trusted_keys end to end, with real processes.

One stack for the module (devtools.devstack): simulated NSM CA, the local KMS, the
proxy. The image's key A (policy: the enclave's PCR0 may use it) is behind
``alias/app``. Four agents differ only in ``trusted_keys``: A's exact ARN, the whole
local account, another account, none. The parent is played by boto3 with the very
credentials the proxy hands the agent (``direct_kms_client``): it creates keys of its
own, re-points aliases and encrypts values it chose.

Each attack is shown to be real (an agent trusting the parent's key hands the parent
what it wants) and to be refused under the pin, naming the key that answered.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.devstack import (
    DevStack,
    DevStackError,
    create_enclave_key,
    direct_kms_client,
    log_events,
)
from enclave_agent.client import AgentClient, AgentError
from tests.support.stack import find_leaks

PLANTED = b"planted-by-the-parent-" + secrets.token_hex(12).encode()
SECRET = b"named-secret-under-a-" + secrets.token_hex(12).encode()
OTHER_ACCOUNT = "arn:aws:kms:us-east-1:999988887777:key/*"
AGENTS = ("pinned", "account", "other-account", "default")


@dataclass
class Stack:
    dev: DevStack
    parent: Any  # boto3 KMS client with the role's credentials: what the parent holds
    key_a: str  # ARN of the image's key
    sockets: dict[str, str]
    learned: list[bytes] = field(default_factory=list)  # plaintexts the attacks exposed

    def client(self, agent: str) -> AgentClient:
        return AgentClient(self.sockets[agent])

    def parents_key(self, description: str) -> str:
        """A key the parent creates with its own credentials (default policy: its
        account may do everything with it, Decrypt without attestation included)."""
        return str(self.parent.create_key(Description=description)["KeyMetadata"]["Arn"])

    def kms_calls(self, agent: str, operation: str) -> list[dict[str, Any]]:
        events = log_events(self.dev.log_path(f"agent-{agent}"))
        return [e for e in events if e["event"] == "kms_call" and e["operation"] == operation]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    work = Path(tempfile.mkdtemp(prefix="e2e-trust-"))
    dev = DevStack(work_dir=work, credentials="static")
    try:
        dev.make_ca()
        dev.start_kms()
        dev.start_proxy()
        parent = direct_kms_client(dev.state())
        account = dev.kms["account_id"]
        key_a_id = create_enclave_key(parent, account, dev.pcrs()["0"], "the image's key A")
        key_a = str(parent.describe_key(KeyId=key_a_id)["KeyMetadata"]["Arn"])
        parent.create_alias(AliasName="alias/app", TargetKeyId=key_a_id)
        trusted: dict[str, list[str]] = {
            "pinned": [key_a],
            "account": [dev.local_account_entry()],
            "other-account": [OTHER_ACCOUNT],
            "default": [],
        }
        sockets = {}
        for agent in AGENTS:
            name = f"agent-{agent}"
            config = dev.write_agent_config(name=name, trusted_keys=trusted[agent])
            sockets[agent] = dev.start_agent(config, name=name)
        yield Stack(dev, parent, key_a, sockets)
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


def _refused(error: AgentError, key: str) -> None:
    assert (error.error_type, error.status) == ("AccessDeniedException", 400)
    assert key in error.message and "trusted_keys" in error.message


def test_a_trusted_key_answers_normally_under_an_exact_pin(stack: Stack) -> None:
    with stack.client("pinned") as app:
        data_key = app.generate_data_key("alias/app")
        assert data_key.key_id == stack.key_a and len(data_key.plaintext) == 32
        assert app.decrypt(data_key.ciphertext_blob) == data_key.plaintext
        assert app.generate_data_key(stack.key_a).key_id == stack.key_a
        pair = app.kms("GenerateDataKeyPair", {"KeyId": "alias/app", "KeyPairSpec": "RSA_2048"})
        assert pair["KeyId"] == stack.key_a and pair["PrivateKeyPlaintext"]


def test_the_same_account_update_alias_attack_is_refused(stack: Stack) -> None:
    """The parent re-points alias/app to key B of its own. Trusting the whole account,
    the app's data key comes from B and the parent decrypts it; pinned to A, the
    answer is refused and names B."""
    key_b = stack.parents_key("the parent's key B")
    stack.parent.update_alias(AliasName="alias/app", TargetKeyId=key_b)
    try:
        with stack.client("pinned") as app, pytest.raises(AgentError) as refused:
            app.generate_data_key("alias/app")
        _refused(refused.value, key_b)

        # The attack is real: where B is trusted, the parent reads the app's data key.
        with stack.client("account") as app:
            data_key = app.generate_data_key("alias/app")
        assert data_key.key_id == key_b
        stolen = stack.parent.decrypt(CiphertextBlob=data_key.ciphertext_blob)["Plaintext"]
        assert stolen == data_key.plaintext
        stack.learned.append(stolen)
    finally:
        stack.parent.update_alias(AliasName="alias/app", TargetKeyId=stack.key_a)
    (refusal,) = [e for e in stack.kms_calls("pinned", "GenerateDataKey") if e["outcome"] != "ok"]
    assert refusal["attempts"] == 1 and key_b in refusal["reason"]  # not retried


def test_a_planted_ciphertext_is_refused(stack: Stack) -> None:
    """The parent encrypts a value it chose under its own key and hands the app the
    ciphertext: pinned to A, Decrypt refuses it; trusting the account, the app would
    take the parent's value for its secret."""
    key_b = stack.parents_key("the parent's key for planting")
    blob = stack.parent.encrypt(KeyId=key_b, Plaintext=PLANTED)["CiphertextBlob"]
    with stack.client("pinned") as app, pytest.raises(AgentError) as refused:
        app.decrypt(blob)
    _refused(refused.value, key_b)
    assert PLANTED.decode() not in refused.value.message
    with stack.client("account") as app:
        assert app.decrypt(blob) == PLANTED  # the attack, where the parent's key is trusted


def test_an_untrusted_key_arn_is_refused_before_any_call(stack: Stack) -> None:
    key_b = stack.parents_key("named by the app")
    before = len(stack.kms_calls("pinned", "GenerateDataKey"))
    with stack.client("pinned") as app, pytest.raises(AgentError) as refused:
        app.generate_data_key(key_b)
    _refused(refused.value, key_b)
    assert "before any call" in refused.value.message
    (call,) = stack.kms_calls("pinned", "GenerateDataKey")[before:]
    assert call["attempts"] == 0  # no attestation, no credentials, no request to KMS


def test_an_account_pin_trusts_that_account_only(stack: Stack) -> None:
    with stack.client("account") as app:
        assert app.generate_data_key("alias/app").key_id == stack.key_a
    with stack.client("other-account") as app, pytest.raises(AgentError) as refused:
        app.generate_data_key("alias/app")
    _refused(refused.value, stack.key_a)
    assert OTHER_ACCOUNT in refused.value.message


def test_no_trusted_keys_refuses_key_operations_and_serves_the_rest(stack: Stack) -> None:
    with stack.client("default") as app:
        for call in (
            lambda: app.generate_data_key("alias/app"),
            lambda: app.decrypt(b"any ciphertext at all"),
        ):
            with pytest.raises(AgentError) as refused:
                call()
            assert refused.value.error_type == "AccessDeniedException"
            assert "key operations are off" in refused.value.message
            assert "trusted_keys" in refused.value.message
        assert len(app.generate_random(32)) == 32
        assert app.attestation(nonce=b"n" * 16)[:1] in (b"\x84", b"\xd2")  # COSE_Sign1
    events = log_events(stack.dev.log_path("agent-default"))
    (off,) = [e for e in events if e["event"] == "key_operations_off"]
    assert "trusted_keys" in off["reason"]
    ready = next(e for e in events if e["event"] == "ready")
    assert ready["trusted_keys"] == []


def _secret_agent(stack: Stack, name: str, alias: str, blob: bytes) -> str:
    """An agent pinned to A whose named secret is declared with ``alias``."""
    config = stack.dev.write_agent_config(
        name=name,
        trusted_keys=[stack.key_a],
        secrets_toml=(
            "\n[secrets.db]\n"
            f'ciphertext = "{base64.b64encode(blob).decode()}"\n'
            f'key_id = "{alias}"\n'
        ),
    )
    return stack.dev.start_agent(config, name=name)


def test_a_named_secret_declared_with_an_alias_resolves_only_to_a_trusted_key(
    stack: Stack,
) -> None:
    key_a_id = stack.key_a.rsplit("/", 1)[1]
    stack.parent.create_alias(AliasName="alias/db", TargetKeyId=key_a_id)
    blob = stack.parent.encrypt(KeyId="alias/db", Plaintext=SECRET)["CiphertextBlob"]
    with AgentClient(_secret_agent(stack, "agent-secret-a", "alias/db", blob)) as app:
        assert app.secret("db") == SECRET
    stack.dev.stop_process("agent-secret-a")

    # The parent re-points the alias and plants a secret under its own key.
    key_b = stack.parents_key("the parent's key for the named secret")
    stack.parent.update_alias(AliasName="alias/db", TargetKeyId=key_b)
    planted = stack.parent.encrypt(KeyId="alias/db", Plaintext=PLANTED)["CiphertextBlob"]
    with pytest.raises(DevStackError, match="exited with status 1"):
        _secret_agent(stack, "agent-secret-b", "alias/db", planted)
    events = log_events(stack.dev.log_path("agent-secret-b"))
    (failed,) = [e for e in events if e["event"] == "secret_failed"]
    assert failed["name"] == "db" and key_b in failed["reason"]
    assert "AccessDeniedException" in failed["reason"] and "trusted_keys" in failed["reason"]
    assert any(e["event"] == "startup_failed" for e in events)
    stack.dev.stop_process("agent-secret-b")


def test_zz_no_plaintext_reaches_a_log_on_the_refusal_paths(stack: Stack) -> None:
    """Runs last: every refusal above has been logged. The planted value, the named
    secret and the data keys the attacks exposed appear in no log of the run."""
    assert stack.learned, "the attack test should have exposed a data key"
    needles = {"planted": PLANTED, "planted b64": base64.b64encode(PLANTED)}
    needles.update({"secret": SECRET, "secret b64": base64.b64encode(SECRET)})
    for number, plaintext in enumerate(stack.learned):
        needles[f"data key {number}"] = plaintext
        needles[f"data key {number} b64"] = base64.b64encode(plaintext)
    logs = {p.name: p.read_bytes() for p in stack.dev.work_dir.glob("*.log")}
    assert {"kms.log", "proxy.log", "agent-pinned.log", "agent-secret-b.log"} <= set(logs)
    assert find_leaks(needles, logs) == []

"""The parent chooses the AWS account: the cross-account attack, end to end.

Real processes: the local KMS speaking for account A (the image's, the operator's) and
account B (the parent's own), enclave-proxy serving the agent B's credentials (the
parent holds the credentials and picks them), and two agents (simulated NSM) behind
that proxy: one whose image trusts only account A (``trusted_keys =
["arn:aws:kms:REGION:A:key/*"]``), and, as the control, one that trusts B.

In B the parent has made ``alias/app`` a key of its own and encrypted a value it
knows. KMS answers every call honestly, over TLS the parent cannot touch, but under
B's key: the agent trusting only A must refuse every such answer (naming the key and
``trusted_keys``) and return no plaintext; the control shows the attack is real (the
parent decrypts the app's data key with its own credentials, and its planted value
comes out as the app's "secret").
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devtools.devstack import DevStack, create_enclave_key, local_kms_client, log_events
from enclave_agent.client import AgentClient, AgentError
from tests.support.stack import find_leaks

A = "111122223333"  # the image's account: the local KMS's primary
B = "444455556666"  # the parent's own account
REGION = "us-east-1"
PLANTED = b"planted-by-the-parent-" + os.urandom(8).hex().encode()


@dataclass
class Attack:
    dev: DevStack
    parent: Any  # boto3 straight to KMS with B's credentials: what the parent holds
    key_a: dict[str, Any]  # the image's key, alias/app in A
    key_b: dict[str, Any]  # the parent's key, alias/app in B
    planted: bytes  # PLANTED encrypted by the parent under its own key
    trusts_a: str  # socket of the agent whose image trusts account A only
    trusts_b: str  # socket of the control agent, which trusts account B

    def kms_events(self) -> list[dict[str, Any]]:
        return [e for e in log_events(self.dev.log_path("kms")) if e.get("event") == "request"]


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    dev = DevStack(
        work_dir=tmp_path_factory.mktemp("hostile-accounts"),
        region=REGION,
        accounts=[A, B],
        proxy_account=B,  # the attack: the parent serves the agent B's credentials
    )
    try:
        dev.start(agent=False)
        assert dev.state()["proxy_account"] == B
        operator = local_kms_client(dev.kms, account=A)
        parent = local_kms_client(dev.kms, account=B)
        # The image's key in A, usable only from the enclave image, named alias/app.
        key_a = operator.describe_key(KeyId=create_enclave_key(operator, A, dev.pcrs()["0"]))
        operator.create_alias(AliasName="alias/app", TargetKeyId=key_a["KeyMetadata"]["KeyId"])
        # The parent's key in B (default policy: B may do everything), also alias/app.
        key_b = parent.create_key(Description="the parent's")["KeyMetadata"]
        parent.create_alias(AliasName="alias/app", TargetKeyId=key_b["KeyId"])
        planted = parent.encrypt(KeyId="alias/app", Plaintext=PLANTED)["CiphertextBlob"]

        trusts_a = dev.start_agent(dev.write_agent_config(name="trusts-a"), name="trusts-a")
        control = dev.write_agent_config(
            name="trusts-b", trusted_keys=[f"arn:aws:kms:{REGION}:{B}:key/*"]
        )
        trusts_b = dev.start_agent(control, name="trusts-b")
        yield Attack(dev, parent, key_a["KeyMetadata"], key_b, planted, trusts_a, trusts_b)
    finally:
        dev.stop()


def assert_refused(caught: pytest.ExceptionInfo[AgentError], key_arn: str) -> None:
    """Refused as KMS refuses a key, naming the key that answered and the config key."""
    error = caught.value
    assert (error.error_type, error.status) == ("AccessDeniedException", 400)
    assert key_arn in error.message and "trusted_keys" in error.message


def test_the_image_trusts_account_a_only(attack: Attack) -> None:
    config = (attack.dev.work_dir / "trusts-a.toml").read_text()
    assert f'trusted_keys = ["arn:aws:kms:{REGION}:{A}:key/*"]' in config


def test_generate_data_key_under_the_parents_alias_is_refused(attack: Attack) -> None:
    before = len(attack.kms_events())
    with AgentClient(attack.trusts_a) as app, pytest.raises(AgentError) as caught:
        app.generate_data_key("alias/app")
    assert_refused(caught, attack.key_b["Arn"])
    # KMS answered, honestly and under B's key: the refusal is the agent's check. (The
    # stand-in logs a request after its answer is out, so its event may trail ours.)
    deadline = time.monotonic() + 10
    while True:
        events = attack.kms_events()[before:]
        answered = [e for e in events if e.get("operation") == "GenerateDataKey"]
        if answered or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert answered and all(e["status"] == 200 for e in answered)


def test_generate_data_key_pair_under_the_parents_alias_is_refused(attack: Attack) -> None:
    with AgentClient(attack.trusts_a) as app, pytest.raises(AgentError) as caught:
        app.kms("GenerateDataKeyPair", {"KeyId": "alias/app", "KeyPairSpec": "ECC_NIST_P256"})
    assert_refused(caught, attack.key_b["Arn"])


def test_decrypt_of_a_ciphertext_the_parent_made_in_its_account_is_refused(
    attack: Attack,
) -> None:
    with AgentClient(attack.trusts_a) as app:
        for key_id in (None, "alias/app"):
            with pytest.raises(AgentError) as caught:
                app.decrypt(attack.planted, key_id=key_id)
            assert_refused(caught, attack.key_b["Arn"])


def test_the_images_key_id_does_not_exist_in_the_parents_account(attack: Attack) -> None:
    # A key id is KMS's to choose (a UUID), so the parent cannot make the image's key id
    # in B; a bare key id is looked up in the credentials' account, and is not found.
    with AgentClient(attack.trusts_a) as app, pytest.raises(AgentError) as caught:
        app.generate_data_key(attack.key_a["KeyId"])
    assert caught.value.error_type == "NotFoundException"
    assert f":{B}:key/{attack.key_a['KeyId']}" in caught.value.message


def test_control_trusting_the_parents_account_hands_it_the_data_key(attack: Attack) -> None:
    with AgentClient(attack.trusts_b) as app:
        data_key = app.generate_data_key("alias/app")
        secret = app.decrypt(attack.planted)
    assert data_key.key_id == attack.key_b["Arn"]
    # The parent reads the app's data key with its own credentials ...
    stolen = attack.parent.decrypt(CiphertextBlob=data_key.ciphertext_blob)["Plaintext"]
    assert stolen == data_key.plaintext
    # ... and chose what the app took for its secret.
    assert secret == PLANTED


def test_no_log_holds_a_plaintext(attack: Attack) -> None:
    with AgentClient(attack.trusts_b) as app:
        data_key = app.generate_data_key("alias/app")
    logs = {p.name: p.read_bytes() for p in sorted(attack.dev.work_dir.glob("*.log"))}
    needles = {
        "planted": PLANTED,
        "planted-b64": base64.b64encode(PLANTED),
        "data-key": data_key.plaintext,
        "data-key-b64": base64.b64encode(data_key.plaintext),
    }
    assert not find_leaks(needles, logs)
    # The refusals were logged, naming the key (not a secret), by the agent trusting A.
    refusals = json.dumps(log_events(attack.dev.log_path("trusts-a")))
    assert attack.key_b["Arn"] in refusals

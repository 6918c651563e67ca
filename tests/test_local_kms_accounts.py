"""The local KMS stand-in speaking for two accounts, driven by unmodified boto3.

Account A (the primary) and account B each have their own credentials, keys, aliases
and key ids. As on AWS: an alias name or bare key id means the caller's own account;
another account's key, named by ARN, serves only cross-account operations and only when
its key policy names the caller (its account or principal); alias operations touch the
caller's account only; key policies are decided by their ``Principal``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devtools.devstack import local_kms_client, minted_kms_client, running_local_kms
from devtools.local_kms.admin_client import AdminError, account_credentials, mint_credentials
from devtools.local_kms.backend import MotoKms
from devtools.local_kms.policy import default_policy

A = "111122223333"
B = "444455556666"
SECRET = b"cross-account-plaintext-5e1d"


@pytest.fixture(scope="module")
def kms_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("local-kms-accounts")
    with running_local_kms(
        work / "state.json", "--account", A, "--account", B, log_path=work / "kms.log"
    ) as kms:
        yield {**kms.state, "log": work / "kms.log"}


@pytest.fixture(scope="module")
def kms_a(kms_state: dict[str, Any]) -> Any:
    return local_kms_client(kms_state, account=A)


@pytest.fixture(scope="module")
def kms_b(kms_state: dict[str, Any]) -> Any:
    return local_kms_client(kms_state, account=B)


def refused(call: Any, code: str, **kwargs: Any) -> str:
    """Call, expect a KMS error ``code`` (HTTP 400); its message."""
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    error = caught.value.response
    assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == (code, 400)
    return str(error["Error"]["Message"])


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def admin_by(account: str) -> dict[str, Any]:
    """The owning account keeps administering its key (as the default policy does)."""
    return {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
        "Action": "kms:*",
    }


def test_state_file_lists_each_account_with_its_own_credentials(
    kms_state: dict[str, Any],
) -> None:
    assert kms_state["account_id"] == A  # the primary, as before
    accounts = {entry["account_id"]: entry for entry in kms_state["accounts"]}
    assert list(accounts) == [A, B]
    assert account_credentials(kms_state, A) == (
        kms_state["aws_access_key_id"],
        kms_state["aws_secret_access_key"],
    )
    assert account_credentials(kms_state, B)[0] != kms_state["aws_access_key_id"]


def test_keys_aliases_and_key_ids_are_per_account(kms_a: Any, kms_b: Any) -> None:
    key_a = kms_a.create_key(Description="A's")["KeyMetadata"]
    key_b = kms_b.create_key(Description="B's")["KeyMetadata"]
    assert (key_a["AWSAccountId"], key_b["AWSAccountId"]) == (A, B)
    assert f":{A}:key/" in key_a["Arn"] and f":{B}:key/" in key_b["Arn"]
    listed_a = {k["KeyId"] for k in kms_a.list_keys()["Keys"]}
    listed_b = {k["KeyId"] for k in kms_b.list_keys()["Keys"]}
    assert key_a["KeyId"] in listed_a - listed_b and key_b["KeyId"] in listed_b - listed_a

    # The same alias name in both accounts: each caller's name is its own key.
    kms_a.create_alias(AliasName="alias/per-account", TargetKeyId=key_a["KeyId"])
    kms_b.create_alias(AliasName="alias/per-account", TargetKeyId=key_b["KeyId"])
    for client, key in ((kms_a, key_a), (kms_b, key_b)):
        described = client.describe_key(KeyId="alias/per-account")["KeyMetadata"]
        assert described["Arn"] == key["Arn"]
        aliases = {a["AliasName"]: a for a in client.list_aliases()["Aliases"]}
        assert aliases["alias/per-account"]["TargetKeyId"] == key["KeyId"]

    # An alias only A has is not found for B, named in B's account.
    kms_a.create_alias(AliasName="alias/only-in-a", TargetKeyId=key_a["KeyId"])
    message = refused(kms_b.describe_key, "NotFoundException", KeyId="alias/only-in-a")
    assert f":{B}:alias/only-in-a" in message
    assert "alias/only-in-a" not in {a["AliasName"] for a in kms_b.list_aliases()["Aliases"]}
    # A bare key id is looked up in the caller's account only.
    refused(kms_b.describe_key, "NotFoundException", KeyId=key_a["KeyId"])
    refused(kms_b.encrypt, "NotFoundException", KeyId=key_a["KeyId"], Plaintext=SECRET)
    # An ARN of an account this stand-in does not speak for, or of another region,
    # names no key.
    for arn in (
        key_a["Arn"].replace(A, "999988887777"),
        key_a["Arn"].replace(":us-east-1:", ":eu-west-1:"),
    ):
        message = refused(kms_a.encrypt, "NotFoundException", KeyId=arn, Plaintext=SECRET)
        assert arn in message

    # Alias operations touch the caller's account only.
    kms_b.delete_alias(AliasName="alias/per-account")
    assert kms_a.describe_key(KeyId="alias/per-account")["KeyMetadata"]["Arn"] == key_a["Arn"]
    refused(kms_b.describe_key, "NotFoundException", KeyId="alias/per-account")


def test_another_accounts_key_by_arn_needs_its_policy_to_name_the_caller(
    kms_a: Any, kms_b: Any
) -> None:
    key = kms_a.create_key()["KeyMetadata"]  # default policy: account A only
    kms_a.create_alias(AliasName="alias/shared", TargetKeyId=key["KeyId"])
    alias_arn = key["Arn"].replace(f"key/{key['KeyId']}", "alias/shared")
    blob = kms_a.encrypt(KeyId=key["KeyId"], Plaintext=SECRET)["CiphertextBlob"]

    message = refused(kms_b.encrypt, "AccessDeniedException", KeyId=key["Arn"], Plaintext=SECRET)
    assert f"arn:aws:iam::{B}:" in message and key["Arn"] in message
    refused(kms_b.decrypt, "AccessDeniedException", CiphertextBlob=blob)
    refused(kms_b.generate_data_key, "AccessDeniedException", KeyId=key["Arn"], KeySpec="AES_256")
    refused(kms_b.describe_key, "AccessDeniedException", KeyId=alias_arn)

    # A grants account B what it may do with the key.
    kms_a.put_key_policy(
        KeyId=key["KeyId"],
        PolicyName="default",
        Policy=policy(
            admin_by(A),
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{B}:root"},
                "Action": [
                    "kms:Encrypt",
                    "kms:Decrypt",
                    "kms:GenerateDataKey",
                    "kms:DescribeKey",
                    "kms:ReEncryptFrom",
                    # Granted, but never usable from another account:
                    "kms:PutKeyPolicy",
                    "kms:GetKeyPolicy",
                    "kms:ScheduleKeyDeletion",
                    "kms:CreateAlias",
                ],
            },
        ),
    )
    assert kms_b.decrypt(CiphertextBlob=blob)["Plaintext"] == SECRET
    assert kms_b.decrypt(CiphertextBlob=blob)["KeyId"] == key["Arn"]
    made = kms_b.generate_data_key(KeyId=key["Arn"], KeySpec="AES_256")
    assert made["KeyId"] == key["Arn"]
    assert kms_a.decrypt(CiphertextBlob=made["CiphertextBlob"])["Plaintext"] == made["Plaintext"]
    # An alias ARN names the key in the account the ARN names, as on AWS.
    assert kms_b.describe_key(KeyId=alias_arn)["KeyMetadata"]["Arn"] == key["Arn"]
    # ... but a bare alias name stays B's own.
    refused(kms_b.describe_key, "NotFoundException", KeyId="alias/shared")
    # ReEncrypt from A's key to a key of B's own.
    own = kms_b.create_key()["KeyMetadata"]
    moved = kms_b.re_encrypt(CiphertextBlob=blob, DestinationKeyId=own["KeyId"])
    assert (moved["SourceKeyId"], moved["KeyId"]) == (key["Arn"], own["Arn"])
    assert kms_b.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == SECRET
    refused(kms_a.decrypt, "AccessDeniedException", CiphertextBlob=moved["CiphertextBlob"])

    # Administration is never cross-account, whatever the policy says.
    refused(
        kms_b.put_key_policy,
        "AccessDeniedException",
        KeyId=key["Arn"],
        PolicyName="default",
        Policy=default_policy(B),
    )
    refused(kms_b.get_key_policy, "AccessDeniedException", KeyId=key["Arn"], PolicyName="default")
    refused(
        kms_b.schedule_key_deletion,
        "AccessDeniedException",
        KeyId=key["Arn"],
        PendingWindowInDays=7,
    )
    # B cannot point an alias of its own at A's key.
    refused(
        kms_b.create_alias, "AccessDeniedException", AliasName="alias/b", TargetKeyId=key["Arn"]
    )
    assert kms_a.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"


def test_principal_decides_which_callers_a_statement_applies_to(
    kms_state: dict[str, Any], kms_a: Any, kms_b: Any
) -> None:
    app_role = f"arn:aws:iam::{A}:role/app"
    parent_role = f"arn:aws:iam::{B}:role/parent"
    key = kms_a.create_key(
        Policy=policy(
            {  # root of A: any principal of A (IAM would delegate), but not Decrypt
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{A}:root"},
                "Action": ["kms:Encrypt", "kms:GetKeyPolicy", "kms:PutKeyPolicy"],
            },
            {"Effect": "Allow", "Principal": {"AWS": [app_role]}, "Action": "kms:Decrypt"},
            {"Effect": "Allow", "Principal": {"AWS": parent_role}, "Action": "kms:Encrypt"},
            {"Effect": "Allow", "Principal": {"AWS": B}, "Action": "kms:DescribeKey"},
            {"Effect": "Allow", "Principal": "*", "Action": "kms:GenerateDataKey"},
        )
    )["KeyMetadata"]
    app = minted_kms_client(kms_state, account=A, principal=app_role)
    other = minted_kms_client(kms_state, account=A, principal=f"arn:aws:iam::{A}:role/other")
    parent = minted_kms_client(kms_state, account=B, principal=parent_role)
    stranger = minted_kms_client(kms_state, account=B, principal=f"arn:aws:iam::{B}:role/stranger")

    blob = other.encrypt(KeyId=key["KeyId"], Plaintext=SECRET)["CiphertextBlob"]  # A's root
    assert app.decrypt(CiphertextBlob=blob)["Plaintext"] == SECRET  # the named role
    message = refused(other.decrypt, "AccessDeniedException", CiphertextBlob=blob)
    assert f"arn:aws:iam::{A}:role/other" in message
    # B's named role, but not another principal of B.
    assert parent.encrypt(KeyId=key["Arn"], Plaintext=SECRET)["KeyId"] == key["Arn"]
    refused(stranger.encrypt, "AccessDeniedException", KeyId=key["Arn"], Plaintext=SECRET)
    refused(parent.decrypt, "AccessDeniedException", CiphertextBlob=blob)
    # B as a bare account id: every principal of B.
    for client in (parent, stranger, kms_b):
        assert client.describe_key(KeyId=key["Arn"])["KeyMetadata"]["KeyId"] == key["KeyId"]
    # "*": anyone, from either account.
    for client in (app, other, stranger, kms_b):
        client.generate_data_key(KeyId=key["Arn"], KeySpec="AES_256")
    # A's key administration is A's root's, not B's.
    refused(parent.get_key_policy, "AccessDeniedException", KeyId=key["Arn"], PolicyName="default")


def test_policies_with_principals_the_stand_in_cannot_decide_are_refused(kms_a: Any) -> None:
    for statement in (
        {"Effect": "Allow", "Action": "kms:*"},
        {"Effect": "Allow", "NotPrincipal": {"AWS": A}, "Action": "kms:*"},
        {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::*:root"}, "Action": "kms:*"},
    ):
        refused(kms_a.create_key, "MalformedPolicyDocumentException", Policy=policy(statement))


def test_credentials_for_an_unknown_account_or_foreign_principal_are_refused(
    kms_state: dict[str, Any],
) -> None:
    state_file = Path(kms_state["state_file"])
    with pytest.raises(AdminError, match="not one of this stand-in's"):
        mint_credentials(state_file, 60, account="999988887777")
    with pytest.raises(AdminError, match="not of account"):
        mint_credentials(state_file, 60, account=B, principal=f"arn:aws:iam::{A}:role/app")


def test_logs_name_accounts_but_hold_no_secret(kms_state: dict[str, Any], kms_b: Any) -> None:
    key = kms_b.create_key()["KeyMetadata"]
    kms_b.encrypt(KeyId=key["KeyId"], Plaintext=SECRET)
    minted = json.loads(mint_credentials(Path(kms_state["state_file"]), 60, account=B))
    log = Path(kms_state["log"]).read_bytes()
    assert b'"credentials_minted"' in log and B.encode() in log
    _, secret_b = account_credentials(kms_state, B)
    for secret in (
        SECRET,
        base64.b64encode(SECRET),
        secret_b.encode(),
        minted["SecretAccessKey"].encode(),
        minted["SessionToken"].encode(),
    ):
        assert secret not in log


def test_moto_account_id_pins_the_one_account(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto lets MOTO_ACCOUNT_ID override every call's account: the stand-in follows it
    # for its one default account and refuses to speak for others under it.
    monkeypatch.setenv("MOTO_ACCOUNT_ID", B)
    assert MotoKms("us-east-1").accounts == (B,)
    with pytest.raises(ValueError, match="MOTO_ACCOUNT_ID"):
        MotoKms("us-east-1", [A, B])

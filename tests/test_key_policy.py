"""Key policies from nitro-cli measurements: parser, policy shape, command."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.operator.key_policy import (
    ADMIN_ACTIONS,
    IMAGE_CONDITION_KEY,
    KeyPolicyError,
    Measurements,
    build_key_policy,
    enclave_statement,
    parse_measurements,
    with_extra_pcrs,
)
from tests.support.stack import run_module

DATA = Path(__file__).parent / "data"
ROLE = "arn:aws:iam::111122223333:role/enclave-parent"
# tests/data/README.md: the recorded values are SHA-384 digests of these labels.
PCR0 = hashlib.sha384(b"enclave-kms example image kernel+ramdisk (PCR0)").hexdigest()
PCR1 = hashlib.sha384(b"kernel+boot ramdisk (PCR1)").hexdigest()
PCR2 = hashlib.sha384(b"user ramdisk (PCR2)").hexdigest()
PCR8 = hashlib.sha384(b"signing certificate (PCR8)").hexdigest()
PLAINTEXT_ACTIONS = {
    "kms:Decrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:CreateGrant",
    "kms:DeriveSharedSecret",
}


def _wrap(members: str) -> str:
    return '{"Measurements": {' + members + "}}"


def test_recorded_build_output_with_progress_lines() -> None:
    measurements = parse_measurements((DATA / "nitro_cli_build_enclave.out").read_bytes())
    assert measurements.pcrs == {0: PCR0, 1: PCR1, 2: PCR2}
    assert measurements.hash_algorithm == "Sha384 { ... }"


def test_recorded_signed_build_output() -> None:
    measurements = parse_measurements((DATA / "nitro_cli_build_enclave_signed.json").read_text())
    assert measurements.pcrs == {0: PCR0, 1: PCR1, 2: PCR2, 8: PCR8}


def test_bare_map_and_describe_enclaves_list_and_upper_case() -> None:
    bare = {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR0.upper(), "PCR1": PCR1}
    assert parse_measurements(json.dumps(bare)).pcrs == {0: PCR0, 1: PCR1}
    described = [
        {"EnclaveID": "i-0abc-enc0123", "EnclaveCID": 16, "State": "RUNNING", "Measurements": bare}
    ]
    assert parse_measurements(json.dumps(described)).pcrs == {0: PCR0, 1: PCR1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ("Start building...\nno json here\n", "not JSON"),
        ("[]", "holds 0 entries"),
        ("[{}, {}]", "holds 2 entries"),
        ('"PCR0"', "must be an object"),
        ('{"EnclaveID": "x"}', "no measurements found"),
        ('{"Measurements": []}', "must be an object"),
        (_wrap(f'"PCR1": "{PCR1}"'), "no PCR0"),
        (_wrap(f'"PCR0": "{PCR0[:-2]}"'), "96 hex digits"),
        (_wrap(f'"PCR0": "{"g" * 96}"'), "non-hex"),
        (_wrap('"PCR0": 12'), "string of hex digits"),
        (_wrap(f'"PCR0": "{PCR0}", "PCR32": "{PCR0}"'), "unexpected key"),
        (_wrap(f'"PCR0": "{PCR0}", "PCR01": "{PCR0}"'), "unexpected key"),
        (_wrap(f'"PCR0": "{PCR0}", "Extra": 1'), "unexpected key"),
        (_wrap(f'"HashAlgorithm": "Sha256", "PCR0": "{PCR0}"'), "SHA-384"),
        (_wrap(f'"PCR0": "{PCR0}", "PCR0": "{PCR1}"'), "repeats the key"),
        ("[" * 100_000, "nested too deeply"),
        (_wrap('"PCR0": 1' + "0" * 5000), "not JSON"),
    ],
)
def test_bad_measurements_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(KeyPolicyError, match=message):
        parse_measurements(text)


def test_not_utf8_and_too_large() -> None:
    with pytest.raises(KeyPolicyError, match="UTF-8"):
        parse_measurements(b"\xff\xfe{}")
    with pytest.raises(KeyPolicyError, match="larger than"):
        parse_measurements(b" " * (2 << 20))


hex96 = st.text(alphabet="0123456789abcdefABCDEF", min_size=96, max_size=96)


@given(
    pcrs=st.dictionaries(st.integers(0, 31), hex96, min_size=0, max_size=8),
    pcr0=hex96,
    wrapped=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_valid_measurements_round_trip(pcrs: dict[int, str], pcr0: str, wrapped: bool) -> None:
    pcrs = {**pcrs, 0: pcr0}
    inner = {"HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": v for i, v in pcrs.items()}}
    document = {"Measurements": inner} if wrapped else inner
    parsed = parse_measurements(json.dumps(document).encode())
    assert parsed.pcrs == {i: v.lower() for i, v in pcrs.items()}


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_measurements_or_key_policy_error(data: bytes) -> None:
    try:
        parsed = parse_measurements(data)
    except KeyPolicyError:
        return
    assert 0 in parsed.pcrs


JSON_KEYS = ["Measurements", "PCRs", "HashAlgorithm", "PCR0", "PCR1", "PCR9", "x", "module_id"]
JSON_KEYS += ["pcrs", "digest", "0", "1", "2", "8"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=100)
    | hex96
    | st.sampled_from(["SHA384", "0" * 96]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(JSON_KEYS) | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_gives_measurements_or_key_policy_error(value: object) -> None:
    try:
        parsed = parse_measurements(json.dumps(value))
    except KeyPolicyError:
        return
    assert all(len(v) == 96 and v == v.lower() for v in parsed.pcrs.values())


def _measurements() -> Measurements:
    return parse_measurements((DATA / "nitro_cli_build_enclave_signed.json").read_bytes())


def test_policy_has_aws_example_statement_and_admin_without_decrypt() -> None:
    policy = build_key_policy(_measurements(), ROLE)
    assert policy["Version"] == "2012-10-17"
    admin, enclave = policy["Statement"]
    assert admin["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}
    assert admin["Effect"] == "Allow" and admin["Resource"] == "*"
    assert "kms:PutKeyPolicy" in admin["Action"] and "kms:ScheduleKeyDeletion" in admin["Action"]
    assert not PLAINTEXT_ACTIONS & set(admin["Action"]), "the account must not decrypt"
    # Nor encrypt: with Encrypt under a key the enclave trusts, any IAM principal of the
    # account (the parent's role among them) could make a ciphertext of any value.
    assert "kms:Encrypt" not in admin["Action"]
    assert not any("*" in action for action in ADMIN_ACTIONS)
    assert enclave == {
        "Sid": f"AllowEnclaveImage{PCR0[:16]}",
        "Effect": "Allow",
        "Principal": {"AWS": ROLE},
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {
            "StringEqualsIgnoreCase": {
                "kms:RecipientAttestation:ImageSha384": PCR0,
                "kms:RecipientAttestation:PCR1": PCR1,
                "kms:RecipientAttestation:PCR2": PCR2,
                "kms:RecipientAttestation:PCR8": PCR8,
            }
        },
    }


def test_operations_pcr_selection_account_and_partition() -> None:
    statement = enclave_statement(
        _measurements(),
        ROLE,
        operations=["decrypt", "kms:GenerateDataKey", "Decrypt", "GenerateRandom"],
        include_pcrs=[8],
    )
    assert statement["Action"] == ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"]
    assert statement["Condition"]["StringEqualsIgnoreCase"] == {
        IMAGE_CONDITION_KEY: PCR0,
        "kms:RecipientAttestation:PCR8": PCR8,
    }
    policy = build_key_policy(
        _measurements(), "arn:aws-cn:iam::444455556666:role/p/r", account_id="777788889999"
    )
    assert policy["Statement"][0]["Principal"] == {"AWS": "arn:aws-cn:iam::777788889999:root"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role_arn": "arn:aws:iam::123:role/x"}, "IAM role ARN"),
        ({"role_arn": "arn:aws:iam::111122223333:user/x"}, "IAM role ARN"),
        ({"role_arn": "arn:aws:sts::111122223333:assumed-role/r/i-0"}, "session ARN"),
        ({"operations": ["Encrypt"]}, "does not take an attestation document"),
        ({"operations": []}, "at least one operation"),
        ({"include_pcrs": [3]}, "PCR3 not in the measurements"),
        ({"account_id": "12345"}, "12 digits"),
    ],
)
def test_bad_policy_inputs(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"role_arn": ROLE, **kwargs}
    with pytest.raises(KeyPolicyError, match=message):
        build_key_policy(_measurements(), **arguments)  # type: ignore[arg-type]


def test_upgrade_policy_admits_old_and_new_image_in_separate_statements() -> None:
    old = _measurements()
    new = parse_measurements(json.dumps({"PCR0": "ab" * 48, "PCR1": PCR1, "PCR2": "cd" * 48}))
    policy = build_key_policy([old, new], ROLE)
    _admin, first, second = policy["Statement"]
    assert first["Condition"]["StringEqualsIgnoreCase"][IMAGE_CONDITION_KEY] == PCR0
    assert second["Condition"]["StringEqualsIgnoreCase"] == {
        IMAGE_CONDITION_KEY: "ab" * 48,
        "kms:RecipientAttestation:PCR1": PCR1,
        "kms:RecipientAttestation:PCR2": "cd" * 48,
    }
    assert first["Sid"] != second["Sid"]
    with pytest.raises(KeyPolicyError, match="same PCR0"):
        build_key_policy([old, old], ROLE)
    with pytest.raises(KeyPolicyError, match="at least one set"):
        build_key_policy([], ROLE)


def test_all_zero_pcrs_need_explicit_consent() -> None:
    debug = parse_measurements(json.dumps({"PCR0": "0" * 96, "PCR1": "0" * 96}))
    with pytest.raises(KeyPolicyError, match="debug-mode"):
        build_key_policy(debug, ROLE)
    policy = build_key_policy(debug, ROLE, allow_zero=True)
    assert policy["Statement"][1]["Condition"]["StringEqualsIgnoreCase"][IMAGE_CONDITION_KEY] == (
        "0" * 96
    )


def test_extra_pcrs() -> None:
    pcr3 = "ab" * 48
    merged = with_extra_pcrs(_measurements(), {3: pcr3.upper()})
    assert merged.pcrs[3] == pcr3
    with pytest.raises(KeyPolicyError, match="twice"):
        with_extra_pcrs(_measurements(), {0: pcr3})
    with pytest.raises(KeyPolicyError, match="96 hex digits"):
        with_extra_pcrs(_measurements(), {3: "ab"})


def _cli_process(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The command as a user runs it, in a process of its own."""
    return run_module("enclave_agent.cli", "key-policy", *args, stdin=stdin, timeout=60)


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The same command in this process (a fresh interpreter costs a second each)."""
    from enclave_agent.cli import main

    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin or b""))
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        mock.patch.object(sys, "stdin", fake_stdin),
    ):
        code = main(["key-policy", *args])
    return subprocess.CompletedProcess(
        list(args), code, out.getvalue().encode(), err.getvalue().encode()
    )


def test_command_prints_policy_and_fails_clearly() -> None:
    out = _cli_process(
        "--measurements",
        str(DATA / "nitro_cli_build_enclave.out"),
        "--role-arn",
        ROLE,
        "--region",
        "us-east-1",
        "--operation",
        "Decrypt",
        "GenerateDataKey",
        "--pcr",
        "3=" + "cd" * 48,
    )
    assert out.returncode == 0, out.stderr
    policy = json.loads(out.stdout)
    conditions = policy["Statement"][1]["Condition"]["StringEqualsIgnoreCase"]
    assert conditions["kms:RecipientAttestation:PCR3"] == "cd" * 48
    assert policy["Statement"][1]["Action"] == ["kms:Decrypt", "kms:GenerateDataKey"]

    piped = _cli(
        "--measurements", "-", "--role-arn", ROLE, "--region", "us-east-1", "--statement-only",
        "--include-pcr", "PCR8",
        stdin=(DATA / "nitro_cli_build_enclave_signed.json").read_bytes(),
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert set(json.loads(piped.stdout)["Condition"]["StringEqualsIgnoreCase"]) == {
        IMAGE_CONDITION_KEY,
        "kms:RecipientAttestation:PCR8",
    }

    both = _cli(
        "--measurements", str(DATA / "nitro_cli_build_enclave.out"),
        "--measurements", "-", "--role-arn", ROLE, "--region", "us-east-1",
        stdin=json.dumps({"PCR0": "ef" * 48}).encode(),
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert len(json.loads(both.stdout)["Statement"]) == 3

    missing = _cli(
        "--measurements", "/nonexistent/m.json", "--role-arn", ROLE, "--region", "us-east-1"
    )
    assert missing.returncode == 2 and b"cannot read /nonexistent/m.json" in missing.stderr
    assert missing.stdout == b""
    bad = _cli(
        "--measurements", "-", "--role-arn", ROLE, "--region", "us-east-1", stdin=b'{"PCR0": "00"}'
    )
    assert bad.returncode == 2 and b"96 hex digits" in bad.stderr


OPERATOR = "arn:aws:iam::111122223333:role/secrets-operator"


def test_encrypt_goes_to_the_named_operator_only() -> None:
    policy = build_key_policy(_measurements(), ROLE)
    granted = [s for s in policy["Statement"] if "kms:Encrypt" in str(s["Action"])]
    assert granted == [], "without --encrypt-principal nobody may Encrypt"
    policy = build_key_policy(_measurements(), ROLE, encrypt_principal=OPERATOR)
    assert policy["Statement"][-1] == {
        "Sid": "EncryptByTheOperator",
        "Effect": "Allow",
        "Principal": {"AWS": OPERATOR},
        "Action": ["kms:Encrypt", "kms:GenerateDataKey"],
        "Resource": "*",
    }
    granted = [s for s in policy["Statement"] if "kms:Encrypt" in str(s["Action"])]
    assert [s["Principal"] for s in granted] == [{"AWS": OPERATOR}]
    user = "arn:aws:iam::444455556666:user/alice"  # another account's operator is fine
    assert build_key_policy(_measurements(), ROLE, encrypt_principal=user)["Statement"][-1][
        "Principal"
    ] == {"AWS": user}


@pytest.mark.parametrize(
    ("principal", "message"),
    [
        (ROLE, "is the enclave's role"),
        ("arn:aws:iam::111122223333:root", "an account root would let every IAM principal"),
        ("111122223333", "IAM role or user ARN"),
        ("arn:aws:sts::111122223333:assumed-role/op/s", "IAM role or user ARN"),
        ("arn:aws-cn:iam::111122223333:role/op", "partition 'aws-cn'"),
    ],
)
def test_encrypt_principal_that_is_not_an_operator_is_refused(principal: str, message: str) -> None:
    with pytest.raises(KeyPolicyError, match=message):
        build_key_policy(_measurements(), ROLE, encrypt_principal=principal)


def _trusted_line(stderr: bytes) -> list[str]:
    """The trusted_keys entries in what the command printed on stderr (pasted as TOML)."""
    import tomllib

    from enclave_agent.runtime.trusted_keys import TrustedKeys

    entries = tomllib.loads(stderr.decode())["trusted_keys"]
    return [str(entry) for entry in TrustedKeys.parse(entries).entries]


def test_command_prints_the_trusted_keys_line_on_stderr_and_only_json_on_stdout() -> None:
    measurements = str(DATA / "nitro_cli_build_enclave.out")
    base = ["--measurements", measurements, "--role-arn", ROLE, "--region", "eu-west-1"]
    account = _cli(*base)
    assert account.returncode == 0, account.stderr
    assert json.loads(account.stdout) == build_key_policy(
        parse_measurements(Path(measurements).read_bytes()), ROLE
    )
    assert _trusted_line(account.stderr) == ["arn:aws:kms:eu-west-1:111122223333:key/*"]
    assert b"every key of account 111122223333 in eu-west-1" in account.stderr
    assert b"no principal may kms:Encrypt" in account.stderr

    key = "1234abcd-12ab-34cd-56ef-1234567890ab"
    exact = _cli(
        *base, "--key-id", key, "--account-id", "444455556666", "--encrypt-principal", OPERATOR
    )
    assert exact.returncode == 0, exact.stderr
    assert _trusted_line(exact.stderr) == [f"arn:aws:kms:eu-west-1:444455556666:key/{key}"]
    assert b"every key" not in exact.stderr and b"kms:Encrypt" not in exact.stderr
    assert json.loads(exact.stdout)["Statement"][-1]["Principal"] == {"AWS": OPERATOR}

    gov = _cli(
        "--measurements", measurements, "--region", "us-gov-west-1",
        "--role-arn", "arn:aws-us-gov:iam::111122223333:role/r",
    )  # fmt: skip
    assert _trusted_line(gov.stderr) == ["arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/*"]

    for args, message in [
        (["--region", "useast1"], b"'useast1' is not a region name"),
        (["--region", "us-east-1", "--key-id", "alias/app"], b"is not a KMS key id"),
        (["--region", "us-east-1", "--encrypt-principal", ROLE], b"is the enclave's role"),
    ]:
        refused = _cli("--measurements", measurements, "--role-arn", ROLE, *args)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert refused.stdout == b""
    with pytest.raises(SystemExit) as exit_info:
        _cli("--measurements", measurements, "--role-arn", ROLE)  # no --region
    assert exit_info.value.code == 2


def _verified_fields(path: Path) -> dict[str, object]:
    from enclave_agent.operator.attestation import parse_attestation, verify_attestation
    from enclave_agent.operator.verify_cmd import describe

    raw = path.read_bytes()
    at = parse_attestation(raw).timestamp
    return describe(verify_attestation(raw, at=at))


def test_real_production_document_via_verify_attestation(vectors_dir: Path) -> None:
    fields = _verified_fields(vectors_dir / "attestation" / "evervault_production_2022-10-13.cbor")
    pcrs = fields["pcrs"]
    assert isinstance(pcrs, dict)
    measurements = parse_measurements(json.dumps(fields))
    # The image's own measurements only, as nitro-cli build-enclave prints them.
    assert measurements.pcrs == {i: pcrs[str(i)] for i in (0, 1, 2, 8)}
    conditions = build_key_policy(measurements, ROLE)["Statement"][1]["Condition"]
    assert conditions["StringEqualsIgnoreCase"][IMAGE_CONDITION_KEY] == pcrs["0"]
    with_role = with_extra_pcrs(measurements, {3: pcrs["3"]})
    assert with_role.pcrs[3] == pcrs["3"]


def test_real_debug_document_is_refused_without_consent(vectors_dir: Path) -> None:
    fields = _verified_fields(vectors_dir / "attestation" / "nitrite_debug_2024-09-07.cbor")
    measurements = parse_measurements(json.dumps(fields))
    assert 8 not in measurements.pcrs and set(measurements.pcrs[0]) == {"0"}
    with pytest.raises(KeyPolicyError, match="debug-mode"):
        build_key_policy(measurements, ROLE)


def test_simulated_document_through_both_commands(tmp_path: Path) -> None:
    from enclave_agent.simulated.nsm import SimulatedNsm

    enclave = SimulatedNsm.create()
    enclave.save_ca(tmp_path)
    document = tmp_path / "document.b64"
    document.write_bytes(base64.b64encode(enclave.attestation(nonce=b"n" * 16)))
    verified = subprocess.run(
        [sys.executable, "-m", "enclave_agent.cli", "verify-attestation", str(document),
         "--root", str(tmp_path / "root.pem")],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    policy = _cli(
        "--measurements", "-", "--role-arn", ROLE, "--region", "us-east-1", stdin=verified.stdout
    )
    assert policy.returncode == 0, policy.stderr
    conditions = json.loads(policy.stdout)["Statement"][1]["Condition"]["StringEqualsIgnoreCase"]
    assert conditions == {
        IMAGE_CONDITION_KEY: enclave.pcrs[0].hex(),
        "kms:RecipientAttestation:PCR1": enclave.pcrs[1].hex(),
        "kms:RecipientAttestation:PCR2": enclave.pcrs[2].hex(),
    }


def test_verify_attestation_shape_errors() -> None:
    base = {"module_id": "i-0-enc0", "digest": "SHA384", "pcrs": {"0": PCR0, "1": PCR1}}
    with pytest.raises(KeyPolicyError, match="no PCR2"):
        parse_measurements(json.dumps(base))
    with pytest.raises(KeyPolicyError, match="SHA-384"):
        parse_measurements(json.dumps({**base, "digest": "SHA256"}))
    with pytest.raises(KeyPolicyError, match="must be an object"):
        parse_measurements(json.dumps({**base, "pcrs": []}))


# --- the operations come from the agent's operations table ---------------------------


def test_the_policy_operations_are_the_operation_tables() -> None:
    from enclave_agent.operator.key_policy import (
        NEVER_FOR_THE_ROLE,
        PASS_THROUGH_OPERATIONS,
        RECIPIENT_OPERATIONS,
    )
    from enclave_agent.runtime.kms_operations import OPERATION_TABLE

    assert set(RECIPIENT_OPERATIONS) == {n for n, op in OPERATION_TABLE.items() if op.recipient}
    grantable = {
        name
        for name, operation in OPERATION_TABLE.items()
        if not operation.recipient and operation.key_policy_actions
    }
    assert set(PASS_THROUGH_OPERATIONS) == grantable - set(NEVER_FOR_THE_ROLE)


def test_pass_through_operations_get_a_statement_of_their_own_without_attestation() -> None:
    """A call without Recipient has no attestation condition key: under the enclave
    statement's condition it would be denied, so the role gets these in a statement
    of their own, which the parent holding the role can use as well."""
    policy = build_key_policy(
        _measurements(), ROLE, pass_through=["Sign", "kms:verify", "GetPublicKey", "Sign"]
    )
    _admin, enclave, unattested = policy["Statement"]
    assert enclave == enclave_statement(_measurements(), ROLE)
    assert unattested == {
        "Sid": "PassThroughByTheRole",
        "Effect": "Allow",
        "Principal": {"AWS": ROLE},
        "Action": ["kms:Sign", "kms:Verify", "kms:GetPublicKey"],
        "Resource": "*",
    }
    assert "Condition" not in unattested
    assert len(build_key_policy(_measurements(), ROLE)["Statement"]) == 2  # none asked: none


@pytest.mark.parametrize(
    ("operations", "pass_through", "message"),
    [
        (["Decrypt"], ["Encrypt"], "both Encrypt .* and Decrypt under one key"),
        (["GenerateDataKey"], ["ReEncrypt"], "never granted to the enclave's role"),
        (["Decrypt"], ["ListKeys"], "the role's IAM policy grants it"),
        (["Decrypt"], ["ListAliases"], "the role's IAM policy grants it"),
        (["Decrypt"], ["Decrypt"], "not a pass-through operation"),
        (["Decrypt"], ["CreateKey"], "not a pass-through operation"),
    ],
)
def test_pass_through_grants_that_would_hand_the_parent_the_secrets_are_refused(
    operations: list[str], pass_through: list[str], message: str
) -> None:
    with pytest.raises(KeyPolicyError, match=message):
        build_key_policy(_measurements(), ROLE, operations=operations, pass_through=pass_through)


def test_encrypt_for_the_role_is_allowed_on_a_key_the_enclave_does_not_decrypt_with() -> None:
    policy = build_key_policy(
        _measurements(), ROLE, operations=["GenerateDataKey"], pass_through=["Encrypt"]
    )
    assert policy["Statement"][-1]["Action"] == "kms:Encrypt"


def test_command_grants_pass_through_and_says_the_parent_may_call_them() -> None:
    measurements = str(DATA / "nitro_cli_build_enclave.out")
    base = ["--measurements", measurements, "--role-arn", ROLE, "--region", "eu-west-1"]
    result = _cli(*base, "--operation", "GenerateDataKey", "--pass-through", "Encrypt", "Sign")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Statement"][-1]["Action"] == ["kms:Encrypt", "kms:Sign"]
    assert b"the role may call Encrypt, Sign without the enclave" in result.stderr
    assert b"# Sign: a signature by this key proves the role's credentials" in result.stderr
    assert b"no principal may kms:Encrypt" not in result.stderr
    refused = _cli(*base, "--statement-only", "--pass-through", "Verify")
    assert refused.returncode == 2 and b"--statement-only" in refused.stderr
    refused = _cli(*base, "--pass-through", "ReEncrypt")
    assert refused.returncode == 2 and b"ReEncryptFrom" in refused.stderr

"""Key policy parsing and evaluation of the local KMS stand-in (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.local_kms.policy import (
    Decision,
    PolicyError,
    default_policy,
    parse_policy,
    recipient_context,
)

PCR0 = bytes.fromhex("ab" * 48)
PCR3 = bytes.fromhex("cd" * 48)
RECIPIENT = recipient_context({0: PCR0, 3: PCR3, 1: bytes(48)})


def aws_example_policy(image: str = PCR0.hex().upper(), pcr3: str = PCR3.hex()) -> str:
    """The shape of AWS's documented example: Decrypt only from a measured enclave."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Enable enclave data processing",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:role/data-processing"},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {
                        "StringEqualsIgnoreCase": {
                            "kms:RecipientAttestation:ImageSha384": image,
                            "kms:RecipientAttestation:PCR3": pcr3,
                        }
                    },
                }
            ],
        }
    )


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def test_aws_example_allows_only_the_measured_enclave() -> None:
    example = parse_policy(aws_example_policy())
    assert example.evaluate("kms:Decrypt", RECIPIENT) is Decision.ALLOW
    # No Recipient: the recipient keys are absent, so the statement does not match.
    assert example.evaluate("kms:Decrypt", {}) is Decision.IMPLICIT_DENY
    other = recipient_context({0: PCR0, 3: bytes(48)})
    assert example.evaluate("kms:Decrypt", other) is Decision.IMPLICIT_DENY
    assert example.evaluate("kms:Encrypt", RECIPIENT) is Decision.IMPLICIT_DENY


def test_string_equals_is_case_sensitive_and_ignore_case_is_not() -> None:
    exact = parse_policy(
        policy(
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR0": PCR0.hex()}},
            }
        )
    )
    assert exact.evaluate("kms:Decrypt", RECIPIENT) is Decision.ALLOW
    upper = parse_policy(
        policy(
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Condition": {
                    "StringEquals": {"kms:RecipientAttestation:PCR0": PCR0.hex().upper()}
                },
            }
        )
    )
    assert upper.evaluate("kms:Decrypt", RECIPIENT) is Decision.IMPLICIT_DENY


def test_explicit_deny_wins_and_negated_operators_match_missing_keys() -> None:
    document = parse_policy(
        policy(
            {"Effect": "Allow", "Action": "kms:*", "Principal": "*", "Resource": "*"},
            {
                "Effect": "Deny",
                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                "Condition": {
                    "StringNotEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": PCR0.hex()
                    }
                },
            },
        )
    )
    assert document.evaluate("kms:Decrypt", RECIPIENT) is Decision.ALLOW
    assert document.evaluate("kms:Decrypt", {}) is Decision.EXPLICIT_DENY
    assert document.evaluate("kms:GenerateDataKeyPair", {}) is Decision.EXPLICIT_DENY
    assert document.evaluate("kms:Encrypt", {}) is Decision.ALLOW


def test_action_wildcards_not_action_and_value_lists() -> None:
    document = parse_policy(
        policy(
            {"Effect": "Allow", "Action": "KMS:generate?ataKey"},
            {"Effect": "Allow", "NotAction": ["kms:Decrypt", "kms:*Key"]},
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR1": ["00", "11"]}},
            },
        )
    )
    assert document.evaluate("kms:GenerateDataKey", {}) is Decision.ALLOW
    assert document.evaluate("kms:Encrypt", {}) is Decision.ALLOW
    assert document.evaluate("kms:DescribeKey", {}) is Decision.IMPLICIT_DENY
    assert document.evaluate("kms:Decrypt", {}) is Decision.IMPLICIT_DENY
    ctx = recipient_context({1: bytes.fromhex("11")})
    assert document.evaluate("kms:Decrypt", ctx) is Decision.ALLOW


def test_default_policy_allows_everything() -> None:
    document = parse_policy(default_policy("111122223333"))
    for action in ("kms:Decrypt", "kms:Encrypt", "kms:PutKeyPolicy", "kms:ScheduleKeyDeletion"):
        assert document.evaluate(action, {}) is Decision.ALLOW


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        ("{}", "needs a Statement"),
        (policy({"Effect": "Maybe", "Action": "kms:*"}), "Effect"),
        (policy({"Effect": "Allow"}), "exactly one of Action"),
        (policy({"Effect": "Allow", "Action": []}), "non-empty list"),
        (
            policy({"Effect": "Allow", "Action": "kms:*", "Condition": {"Bool": {"x": "true"}}}),
            "operator 'Bool' is not supported",
        ),
        (
            policy(
                {
                    "Effect": "Allow",
                    "Action": "kms:*",
                    "Condition": {"StringEquals": {"kms:EncryptionContext:app": "x"}},
                }
            ),
            "not supported by the local KMS",
        ),
        (
            policy(
                {
                    "Effect": "Allow",
                    "Action": "kms:*",
                    "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR32": "x"}},
                }
            ),
            "not supported",
        ),
    ],
)
def test_malformed_policies_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
def test_parser_raises_only_policy_error(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError:
        pass


actions = st.sampled_from(
    ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateRandom", "kms:DescribeKey"]
)
patterns = st.sampled_from(["kms:*", "*", "kms:Decrypt", "kms:Gen*", "kms:*crypt", "kms:?ncrypt"])
hexes = st.sampled_from([PCR0.hex(), PCR3.hex(), "00" * 48])
conditions = st.dictionaries(
    st.sampled_from(["StringEquals", "StringEqualsIgnoreCase", "StringNotEquals"]),
    st.dictionaries(
        st.sampled_from(["kms:RecipientAttestation:ImageSha384", "kms:RecipientAttestation:PCR3"]),
        hexes,
        min_size=1,
    ),
    max_size=2,
)
statements = st.builds(
    lambda effect, acts, cond: {"Effect": effect, "Action": acts, "Condition": cond},
    st.sampled_from(["Allow", "Deny"]),
    st.lists(patterns, min_size=1, max_size=3),
    conditions,
)


@settings(max_examples=300)
@given(st.lists(statements, min_size=1, max_size=5), actions, st.booleans())
def test_evaluation_properties(
    raw: list[dict[str, Any]], action: str, with_recipient: bool
) -> None:
    context = RECIPIENT if with_recipient else {}
    decision = parse_policy(policy(*raw)).evaluate(action, context)
    alone = [parse_policy(policy(s)).evaluate(action, context) for s in raw]
    # Deny wins over any Allow; otherwise one applicable Allow is enough; else implicit deny.
    if Decision.EXPLICIT_DENY in alone:
        assert decision is Decision.EXPLICIT_DENY
    elif Decision.ALLOW in alone:
        assert decision is Decision.ALLOW
    else:
        assert decision is Decision.IMPLICIT_DENY
    # A statement whose only conditions are positive ones on recipient keys never
    # applies to a call without Recipient.
    if not with_recipient:
        for statement, verdict in zip(raw, alone, strict=True):
            ops = statement["Condition"].keys()
            if ops and all(op.startswith("StringEquals") for op in ops):
                assert verdict is Decision.IMPLICIT_DENY

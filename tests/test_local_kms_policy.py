"""Key policy parsing and evaluation of the local KMS stand-in (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.local_kms.policy import (
    Caller,
    Decision,
    PolicyError,
    default_policy,
    parse_policy,
    recipient_context,
)

PCR0 = bytes.fromhex("ab" * 48)
PCR3 = bytes.fromhex("cd" * 48)
RECIPIENT = recipient_context({0: PCR0, 3: PCR3, 1: bytes(48)})
ACCOUNT = "111122223333"
CALLER = Caller(ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/data-processing")


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
    """A key policy of ``statements``; one without a Principal names the account."""
    named = [{"Principal": {"AWS": ACCOUNT}, **statement} for statement in statements]
    return json.dumps({"Version": "2012-10-17", "Statement": named})


def test_aws_example_allows_only_the_measured_enclave() -> None:
    example = parse_policy(aws_example_policy())
    assert example.evaluate("kms:Decrypt", CALLER, RECIPIENT) is Decision.ALLOW
    # No Recipient: the recipient keys are absent, so the statement does not match.
    assert example.evaluate("kms:Decrypt", CALLER, {}) is Decision.IMPLICIT_DENY
    other = recipient_context({0: PCR0, 3: bytes(48)})
    assert example.evaluate("kms:Decrypt", CALLER, other) is Decision.IMPLICIT_DENY
    assert example.evaluate("kms:Encrypt", CALLER, RECIPIENT) is Decision.IMPLICIT_DENY


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
    assert exact.evaluate("kms:Decrypt", CALLER, RECIPIENT) is Decision.ALLOW
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
    assert upper.evaluate("kms:Decrypt", CALLER, RECIPIENT) is Decision.IMPLICIT_DENY


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
    assert document.evaluate("kms:Decrypt", CALLER, RECIPIENT) is Decision.ALLOW
    assert document.evaluate("kms:Decrypt", CALLER, {}) is Decision.EXPLICIT_DENY
    assert document.evaluate("kms:GenerateDataKeyPair", CALLER, {}) is Decision.EXPLICIT_DENY
    assert document.evaluate("kms:Encrypt", CALLER, {}) is Decision.ALLOW


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
    assert document.evaluate("kms:GenerateDataKey", CALLER, {}) is Decision.ALLOW
    assert document.evaluate("kms:Encrypt", CALLER, {}) is Decision.ALLOW
    assert document.evaluate("kms:DescribeKey", CALLER, {}) is Decision.IMPLICIT_DENY
    assert document.evaluate("kms:Decrypt", CALLER, {}) is Decision.IMPLICIT_DENY
    ctx = recipient_context({1: bytes.fromhex("11")})
    assert document.evaluate("kms:Decrypt", CALLER, ctx) is Decision.ALLOW


def test_default_policy_allows_everything() -> None:
    document = parse_policy(default_policy("111122223333"))
    for action in ("kms:Decrypt", "kms:Encrypt", "kms:PutKeyPolicy", "kms:ScheduleKeyDeletion"):
        assert document.evaluate(action, CALLER, {}) is Decision.ALLOW


OTHER = "444455556666"
APP_ROLE = f"arn:aws:iam::{ACCOUNT}:role/app"


@pytest.mark.parametrize(
    ("principal", "callers"),
    [
        # Everyone, in either spelling.
        ("*", {"app", "other-role", "account", "other-account", "other-account-role"}),
        ({"AWS": "*"}, {"app", "other-role", "account", "other-account", "other-account-role"}),
        # The account, as root ARN or bare id: any principal of it, no one else.
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, {"app", "other-role", "account"}),
        ({"AWS": ACCOUNT}, {"app", "other-role", "account"}),
        # A role: that role, and the account's default credentials (any of its principals).
        ({"AWS": APP_ROLE}, {"app", "account"}),
        (
            {"AWS": [f"arn:aws:iam::{OTHER}:role/parent", APP_ROLE]},
            {"app", "account", "other-account"},
        ),
        ({"AWS": f"arn:aws:iam::{OTHER}:root"}, {"other-account", "other-account-role"}),
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:user/alice"}, {"account"}),
        # No service ever calls the stand-in.
        ({"Service": "ec2.amazonaws.com"}, set()),
    ],
)
def test_a_statement_applies_only_to_the_callers_its_principal_names(
    principal: Any, callers: set[str]
) -> None:
    every = {
        "app": Caller(ACCOUNT, APP_ROLE),
        "other-role": Caller(ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/other"),
        "account": Caller(ACCOUNT),
        "other-account": Caller(OTHER),
        "other-account-role": Caller(OTHER, f"arn:aws:iam::{OTHER}:role/other"),
    }
    document = parse_policy(
        policy({"Effect": "Allow", "Principal": principal, "Action": "kms:Decrypt"})
    )
    allowed = {
        name
        for name, caller in every.items()
        if document.evaluate("kms:Decrypt", caller, {}) is Decision.ALLOW
    }
    assert allowed == callers


def test_deny_applies_to_its_principals_only_and_caller_account_is_the_callers() -> None:
    document = parse_policy(
        policy(
            {"Effect": "Allow", "Principal": "*", "Action": "kms:*"},
            {"Effect": "Deny", "Principal": {"AWS": OTHER}, "Action": "kms:Decrypt"},
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:Encrypt",
                "Condition": {"StringNotEquals": {"kms:CallerAccount": ACCOUNT}},
            },
        )
    )
    assert document.evaluate("kms:Decrypt", Caller(ACCOUNT), {}) is Decision.ALLOW
    assert document.evaluate("kms:Decrypt", Caller(OTHER), {}) is Decision.EXPLICIT_DENY
    assert document.evaluate("kms:Encrypt", Caller(ACCOUNT), {}) is Decision.ALLOW
    assert document.evaluate("kms:Encrypt", Caller(OTHER), {}) is Decision.EXPLICIT_DENY
    # A caller cannot bring its own kms:CallerAccount.
    forged = {"kms:calleraccount": ACCOUNT}
    assert document.evaluate("kms:Encrypt", Caller(OTHER), forged) is Decision.EXPLICIT_DENY


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
        (
            json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:*"}]}),
            "needs a Principal",
        ),
        (
            json.dumps(
                {
                    "Statement": [
                        {"Effect": "Allow", "NotPrincipal": {"AWS": ACCOUNT}, "Action": "kms:*"}
                    ]
                }
            ),
            "NotPrincipal is not supported",
        ),
        (
            policy({"Effect": "Allow", "Principal": "someone", "Action": "kms:*"}),
            "Principal must be",
        ),
        (policy({"Effect": "Allow", "Principal": {}, "Action": "kms:*"}), "Principal must be"),
        (
            policy({"Effect": "Allow", "Principal": {"Federated": "x"}, "Action": "kms:*"}),
            "Principal must be",
        ),
        (
            policy(
                {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::*:root"}, "Action": "kms:*"}
            ),
            "principal 'arn:aws:iam::\\*:root' is not supported",
        ),
        (
            policy({"Effect": "Allow", "Principal": {"AWS": "12345"}, "Action": "kms:*"}),
            "is not supported",
        ),
        (
            policy({"Effect": "Allow", "Principal": {"AWS": []}, "Action": "kms:*"}),
            "non-empty list",
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


@settings(max_examples=300)
@given(json_values)
def test_principal_parser_raises_only_policy_error(principal: Any) -> None:
    statement = {"Effect": "Allow", "Principal": principal, "Action": "kms:*"}
    try:
        document = parse_policy(json.dumps({"Statement": [statement]}))
    except PolicyError:
        return
    document.evaluate("kms:Decrypt", CALLER, {})


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
    decision = parse_policy(policy(*raw)).evaluate(action, CALLER, context)
    alone = [parse_policy(policy(s)).evaluate(action, CALLER, context) for s in raw]
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

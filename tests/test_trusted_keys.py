"""The trusted-keys grammar and matcher (enclave_agent.runtime.trusted_keys)."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.trusted_keys import (
    KeyArn,
    KeyArnError,
    TrustedKeys,
    account_entry,
    parse_entry,
    parse_key_arn,
    toml_line,
)

KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"
MRK = "mrk-1234abcd12ab34cd56ef1234567890ab"
ARN = f"arn:aws:kms:us-east-1:111122223333:key/{KEY}"


@pytest.mark.parametrize(
    "text",
    [
        ARN,
        f"arn:aws:kms:us-east-2:111122223333:key/{MRK}",
        f"arn:aws-cn:kms:cn-north-1:111122223333:key/{KEY}",
        f"arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/{KEY}",
        f"arn:aws-iso:kms:us-iso-east-1:111122223333:key/{KEY}",
        f"arn:aws-iso-b:kms:us-isob-east-1:111122223333:key/{KEY}",
        f"arn:aws:kms:ap-southeast-3:000000000000:key/{KEY}",
    ],
)
def test_key_arns_of_every_partition_parse_and_print_back(text: str) -> None:
    assert str(parse_key_arn(text)) == text
    assert str(parse_entry(text)) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("alias/app", "is an alias"),
        ("arn:aws:kms:us-east-1:111122223333:alias/app", "is an alias"),
        (KEY, "is a bare key id"),
        (MRK, "is a bare key id"),
        ("", "is not an ARN"),
        ("arn:aws:kms:us-east-1:111122223333", "is not an ARN"),
        (f"arm:aws:kms:us-east-1:111122223333:key/{KEY}", "is not an ARN"),
        (f"arn:azure:kms:us-east-1:111122223333:key/{KEY}", "is not an AWS partition"),
        (f"arn:aws:iam:us-east-1:111122223333:key/{KEY}", "is not a KMS ARN"),
        (f"arn:aws:kms::111122223333:key/{KEY}", "is not a region name"),
        (f"arn:aws:kms:*:111122223333:key/{KEY}", "is not a region name"),
        (f"arn:aws:kms:US-EAST-1:111122223333:key/{KEY}", "is not a region name"),
        (f"arn:aws:kms:us-east-1:11112222333:key/{KEY}", "12 digits"),
        (f"arn:aws:kms:us-east-1:*:key/{KEY}", "12 digits"),
        (f"arn:aws:kms:us-east-1:111122223333:{KEY}", "is not a key ARN"),
        (f"arn:aws:kms:us-east-1:111122223333:grant/{KEY}", "is not a key ARN"),
        ("arn:aws:kms:us-east-1:111122223333:key/", "is not a KMS key id"),
        (f"arn:aws:kms:us-east-1:111122223333:key/{KEY.upper()}", "is not a KMS key id"),
        (f"arn:aws:kms:us-east-1:111122223333:key/{KEY}/x", "is not a KMS key id"),
        (f"arn:aws:kms:us-east-1:111122223333:key/{KEY}:x", "is not a KMS key id"),
        ("arn:aws:kms:us-east-1:111122223333:key/1234*", "key/* alone stands for"),
    ],
)
def test_entries_that_are_not_keys_or_accounts_say_why(text: str, why: str) -> None:
    with pytest.raises(KeyArnError) as info:
        parse_entry(text)
    assert why in str(info.value)


def test_a_whole_account_is_an_entry_but_never_an_answer() -> None:
    account = "arn:aws:kms:us-east-1:111122223333:key/*"
    assert parse_entry(account).is_account
    with pytest.raises(KeyArnError, match="is not a KMS key id"):
        parse_key_arn(account)
    assert account_entry("aws", "us-east-1", "111122223333") == parse_entry(account)


def test_non_strings_are_refused() -> None:
    for value in (None, 7, [ARN], {"KeyId": ARN}, b"arn"):
        with pytest.raises(KeyArnError, match="expected a key ARN"):
            parse_key_arn(value)


def test_exact_pin_matches_only_that_key() -> None:
    trusted = TrustedKeys.parse([ARN])
    assert trusted.allows(parse_key_arn(ARN))
    other_key = ARN.replace("1234abcd", "99999999")
    for other in (
        other_key,
        ARN.replace("111122223333", "999988887777"),
        ARN.replace("us-east-1", "us-east-2"),
        ARN.replace("arn:aws:", "arn:aws-cn:"),
    ):
        assert not trusted.allows(parse_key_arn(other)), other
    assert trusted.refusal_for_answer(ARN) is None
    assert f"key {other_key} answered" in str(trusted.refusal_for_answer(other_key))


def test_account_pin_matches_every_key_of_that_account_and_region_only() -> None:
    trusted = TrustedKeys.parse(["arn:aws:kms:us-east-1:111122223333:key/*"])
    assert trusted.allows(parse_key_arn(ARN))
    assert trusted.allows(parse_key_arn(f"arn:aws:kms:us-east-1:111122223333:key/{MRK}"))
    for other in (
        ARN.replace("111122223333", "999988887777"),
        ARN.replace("us-east-1", "eu-west-1"),
        ARN.replace("arn:aws:", "arn:aws-us-gov:"),
    ):
        assert not trusted.allows(parse_key_arn(other)), other
    # An account entry is never itself a key that could answer.
    assert not trusted.allows(parse_entry("arn:aws:kms:us-east-1:111122223333:key/*"))


def test_empty_trusts_nothing_and_says_key_operations_are_off() -> None:
    empty = TrustedKeys.parse([])
    assert not empty and empty == TrustedKeys()
    for reason in (empty.refusal_for_answer(ARN), empty.refusal_for_request("alias/app")):
        assert reason is not None
        assert "key operations are off" in reason and "trusted_keys" in reason


def test_requests_are_judged_only_where_the_key_is_known() -> None:
    trusted = TrustedKeys.parse([ARN])
    assert trusted.refusal_for_request(ARN) is None
    for sent_to_kms in ("alias/app", KEY, "arn:aws:kms:us-east-1:111122223333:alias/a", None):
        assert trusted.refusal_for_request(sent_to_kms) is None
    other = ARN.replace("111122223333", "999988887777")
    assert f"key {other} is not in the agent's trusted_keys" in str(
        trusted.refusal_for_request(other)
    )


def test_bad_entries_are_named_by_position_and_duplicates_fold() -> None:
    with pytest.raises(KeyArnError, match=r"trusted_keys\[1\]: 'alias/app' is an alias"):
        TrustedKeys.parse([ARN, "alias/app"])
    assert len(TrustedKeys.parse([ARN, ARN]).entries) == 1


def test_toml_line_reads_back() -> None:
    entries = [parse_entry(ARN), parse_entry("arn:aws:kms:us-east-1:111122223333:key/*")]
    line = toml_line(entries)
    assert line.startswith("trusted_keys = [")
    assert TrustedKeys.parse(tomllib.loads(line)["trusted_keys"]).entries == tuple(entries)


# --- KMS's answer KeyId is bytes from outside: the parser is property-tested ----------

key_ids = st.from_regex(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", fullmatch=True
)
arns = st.builds(
    KeyArn,
    st.sampled_from(["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b", "aws-iso-f"]),
    st.sampled_from(["us-east-1", "eu-central-2", "us-gov-west-1", "cn-northwest-1"]),
    st.from_regex(r"[0-9]{12}", fullmatch=True),
    key_ids | st.from_regex(r"mrk-[0-9a-f]{32}", fullmatch=True),
)


def _mutations(arn: KeyArn) -> st.SearchStrategy[str]:
    text = str(arn)
    return st.one_of(
        st.integers(0, len(text) - 1).map(lambda i: text[:i] + text[i + 1 :]),
        st.tuples(st.integers(0, len(text)), st.characters()).map(
            lambda p: text[: p[0]] + p[1] + text[p[0] :]
        ),
        st.integers(0, len(text) - 1).map(lambda i: text[:i] + text[i].upper() + text[i + 1 :]),
    )


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=120),
        st.builds(str, arns),
        arns.flatmap(_mutations),
        st.none() | st.integers() | st.lists(st.text(max_size=5), max_size=2),
    )
)
def test_answer_key_id_parser_accepts_only_exact_key_arns(value: Any) -> None:
    try:
        arn = parse_key_arn(value)
    except KeyArnError as exc:
        assert str(exc)
        assert len(str(exc)) < 700  # what it quotes of the value is bounded
        return
    assert str(arn) == value  # nothing dropped, nothing normalised
    assert not arn.is_account
    assert TrustedKeys.parse([value]).allows(arn)
    assert TrustedKeys.parse([f"arn:{arn.partition}:kms:{arn.region}:{arn.account}:key/*"]).allows(
        arn
    )


@settings(max_examples=300, deadline=None)
@given(arns, arns)
def test_a_key_is_allowed_exactly_when_an_entry_names_it_or_its_account(
    trusted_arn: KeyArn, answering: KeyArn
) -> None:
    exact = TrustedKeys.parse([str(trusted_arn)])
    assert exact.allows(answering) == (answering == trusted_arn)
    account = TrustedKeys.parse(
        [f"arn:{trusted_arn.partition}:kms:{trusted_arn.region}:{trusted_arn.account}:key/*"]
    )
    same_account = (answering.partition, answering.region, answering.account) == (
        trusted_arn.partition,
        trusted_arn.region,
        trusted_arn.account,
    )
    assert account.allows(answering) == same_account
    reason = exact.refusal_for_answer(json.loads(json.dumps(str(answering))))
    assert (reason is None) == (answering == trusted_arn)

"""Key policies: parse the JSON document and decide one call, as AWS KMS would.

Rules of this file (pure, no I/O):
- A policy is a JSON object with ``Statement`` (one object or a list). Each statement
  has ``Effect`` ("Allow" | "Deny"), ``Action`` or ``NotAction`` (string or list, with
  ``*`` and ``?`` wildcards, case-insensitive), and an optional ``Condition``.
- Evaluation: an applicable ``Deny`` wins; otherwise an applicable ``Allow`` allows;
  otherwise the call is implicitly denied.
- A condition block holds operators, each holding condition keys, each holding a value
  or a list of values. Operators and keys are AND-ed, the values of one key OR-ed.
  A key missing from the request makes a positive operator (``StringEquals``) false and
  a negated one (``StringNotEquals``) true, as in IAM. Recipient keys exist only when
  the call carries a ``Recipient``, so a statement conditioned on them does not match
  a call without one.
- Every statement needs a ``Principal``; a statement applies only to a caller it names
  (``Caller``): ``"*"`` or ``{"AWS": "*"}`` names everyone; ``{"AWS": "ACCOUNT"}`` and
  ``{"AWS": "arn:PARTITION:iam::ACCOUNT:root"}`` name the account, so any principal of it
  (the stand-in has no IAM policies: every principal of an account holds every IAM
  permission, which is what the account root delegates to); an IAM role or user ARN names
  that principal (and the default credentials of its account, which stand for every
  principal of the account); ``{"Service": ...}`` names no caller the stand-in has; a
  list names each of its entries. AWS's documents for this: "Key policies in AWS KMS"
  (https://docs.aws.amazon.com/kms/latest/developerguide/key-policies.html: no
  principal has any permission a key policy, IAM policy or grant does not give), "AWS
  JSON policy elements: Principal" (https://docs.aws.amazon.com/IAM/latest/UserGuide/
  reference_policies_elements_principal.html: the account ARN and the bare account id
  are the same principal, the account, not only its root user), and "Allowing users in
  other accounts to use a KMS key" (https://docs.aws.amazon.com/kms/latest/
  developerguide/key-policy-modifying-external-accounts.html: the owning account's key
  policy must name the other account or its principal).
- ``NotPrincipal`` is refused (its account-root semantics differ from ``Principal``'s);
  ``Resource`` is accepted and not evaluated: a key policy always concerns its own key.
- Anything else this evaluator does not know (operators, condition keys) makes the
  policy malformed, so that a policy never silently means something else here than on AWS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

from enclave_common.aws import ACCOUNT_PATTERN

RECIPIENT_KEY_PREFIX = "kms:recipientattestation:"
IMAGE_SHA384_KEY = RECIPIENT_KEY_PREFIX + "imagesha384"
MAX_PCR = 31

# Operator → (compare ignoring case, negated).
_OPERATORS: dict[str, tuple[bool, bool]] = {
    "StringEquals": (False, False),
    "StringEqualsIgnoreCase": (True, False),
    "StringNotEquals": (False, True),
    "StringNotEqualsIgnoreCase": (True, True),
}
CALLER_ACCOUNT_KEY = "kms:calleraccount"
_PLAIN_KEYS = frozenset({IMAGE_SHA384_KEY, CALLER_ACCOUNT_KEY})
_PCR_KEY = re.compile(r"kms:recipientattestation:pcr([0-9]{1,2})")
ACCOUNT_ID = re.compile(ACCOUNT_PATTERN)
# An IAM principal ARN: the account root, or a user or role (with its path).
_IAM_ARN = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):(root|(?:user|role)/[A-Za-z0-9+=,.@_/-]+)")


class PolicyError(Exception):
    """The key policy document is malformed or uses something this evaluator lacks."""


class Decision(Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit-deny"
    IMPLICIT_DENY = "implicit-deny"


@dataclass(frozen=True)
class Caller:
    """Who signed a call: an account and, for credentials minted for one, an IAM principal.

    ``principal`` None: the account's default credentials, which stand for every
    principal of the account (the stand-in has no IAM to tell them apart).
    """

    account: str
    principal: str | None = None

    @property
    def arn(self) -> str:
        """The caller as AWS names it in an AccessDeniedException."""
        return self.principal or f"arn:aws:iam::{self.account}:user/local-kms"


def principal_account(arn: str) -> str:
    """The account of an IAM user or role ARN; ValueError if ``arn`` is not one."""
    match = _IAM_ARN.fullmatch(arn)
    if match is None or match.group(2) == "root":
        raise ValueError(f"{arn!r} is not an IAM user or role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return match.group(1)


@dataclass(frozen=True)
class Principals:
    """The callers a statement's ``Principal`` names."""

    everyone: bool
    accounts: frozenset[str]
    arns: frozenset[str]  # IAM user and role ARNs

    def name(self, caller: Caller) -> bool:
        if self.everyone or caller.account in self.accounts:
            return True
        if caller.principal is None:
            return any(principal_account(arn) == caller.account for arn in self.arns)
        return caller.principal in self.arns


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str  # lower case
    values: tuple[str, ...]

    def holds(self, context: Mapping[str, str]) -> bool:
        ignore_case, negated = _OPERATORS[self.operator]
        actual = context.get(self.key)
        if actual is None:
            return negated
        if ignore_case:
            matched = any(actual.casefold() == v.casefold() for v in self.values)
        else:
            matched = actual in self.values
        return matched != negated


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[re.Pattern[str], ...]
    not_action: bool
    principals: Principals
    conditions: tuple[Condition, ...]

    def applies(self, action: str, caller: Caller, context: Mapping[str, str]) -> bool:
        named = any(p.fullmatch(action) for p in self.actions)
        if named == self.not_action or not self.principals.name(caller):
            return False
        return all(c.holds(context) for c in self.conditions)


@dataclass(frozen=True)
class KeyPolicy:
    statements: tuple[Statement, ...]

    def evaluate(self, action: str, caller: Caller, context: Mapping[str, str]) -> Decision:
        """Decide ``action`` (e.g. "kms:Decrypt") by ``caller`` for a call with these
        condition keys.

        ``context`` maps lower-case condition keys to values (see ``recipient_context``);
        ``kms:CallerAccount`` is the caller's account.
        """
        context = {**context, CALLER_ACCOUNT_KEY: caller.account}
        applicable = [s for s in self.statements if s.applies(action, caller, context)]
        if any(s.effect == "Deny" for s in applicable):
            return Decision.EXPLICIT_DENY
        if applicable:
            return Decision.ALLOW
        return Decision.IMPLICIT_DENY


def default_policy(account_id: str, partition: str = "aws") -> str:
    """AWS's default key policy: the account (and so every IAM-allowed caller) may do all."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )


def recipient_context(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    """Condition keys a call with a verified attestation document brings (lower-case hex)."""
    context = {f"{RECIPIENT_KEY_PREFIX}pcr{i}": value.hex() for i, value in pcrs.items()}
    if 0 in pcrs:
        context[IMAGE_SHA384_KEY] = pcrs[0].hex()
    return context


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{what} must be a string or a non-empty list of strings")


def _action_pattern(action: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in action)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _principals(raw: Any) -> Principals:
    if raw == "*":
        return Principals(True, frozenset(), frozenset())
    if not isinstance(raw, dict) or not raw or not set(raw) <= {"AWS", "Service"}:
        raise PolicyError(
            'Principal must be "*" or an object of "AWS" (and "Service") principals '
            "(supported by the local KMS)"
        )
    if "Service" in raw:
        _strings(raw["Service"], "Service")  # well-formed; no service calls the stand-in
    everyone, accounts, arns = False, set(), set()
    for value in _strings(raw["AWS"], "AWS") if "AWS" in raw else ():
        match = _IAM_ARN.fullmatch(value)
        if value == "*":
            everyone = True
        elif ACCOUNT_ID.fullmatch(value):
            accounts.add(value)
        elif match and match.group(2) == "root":
            accounts.add(match.group(1))
        elif match:
            arns.add(value)
        else:
            raise PolicyError(
                f'principal {value!r} is not supported by the local KMS (supported: "*", '
                "an account id, arn:aws:iam::ACCOUNT:root, IAM user and role ARNs)"
            )
    return Principals(everyone, frozenset(accounts), frozenset(arns))


def _condition_key(key: str) -> str:
    lowered = key.lower()
    if lowered in _PLAIN_KEYS:
        return lowered
    match = _PCR_KEY.fullmatch(lowered)
    if match and int(match.group(1)) <= MAX_PCR:
        return lowered
    raise PolicyError(
        f"condition key {key!r} is not supported by the local KMS (supported: "
        "kms:RecipientAttestation:ImageSha384, kms:RecipientAttestation:PCR0..PCR31, "
        "kms:CallerAccount)"
    )


def _conditions(block: Any) -> tuple[Condition, ...]:
    if not isinstance(block, dict):
        raise PolicyError("Condition must be an object")
    conditions = []
    for operator, keys in block.items():
        if operator not in _OPERATORS:
            raise PolicyError(
                f"condition operator {operator!r} is not supported by the local KMS "
                f"(supported: {', '.join(_OPERATORS)})"
            )
        if not isinstance(keys, dict) or not keys:
            raise PolicyError(f"condition {operator} must be a non-empty object")
        for key, values in keys.items():
            conditions.append(
                Condition(operator, _condition_key(key), _strings(values, f"condition {key}"))
            )
    return tuple(conditions)


def _statement(raw: Any) -> Statement:
    if not isinstance(raw, dict):
        raise PolicyError("every statement must be an object")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError('statement Effect must be "Allow" or "Deny"')
    if ("Action" in raw) == ("NotAction" in raw):
        raise PolicyError("statement needs exactly one of Action and NotAction")
    not_action = "NotAction" in raw
    actions = _strings(raw["NotAction" if not_action else "Action"], "Action")
    if "NotPrincipal" in raw:
        raise PolicyError("NotPrincipal is not supported by the local KMS")
    if "Principal" not in raw:
        raise PolicyError("every statement of a key policy needs a Principal")
    return Statement(
        effect=effect,
        actions=tuple(_action_pattern(a) for a in actions),
        not_action=not_action,
        principals=_principals(raw["Principal"]),
        conditions=_conditions(raw.get("Condition", {})),
    )


@lru_cache(maxsize=256)
def parse_policy(text: str) -> KeyPolicy:
    """Parse a key policy document, or raise PolicyError saying what is wrong."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PolicyError("key policy is not valid JSON") from exc
    if not isinstance(document, dict):
        raise PolicyError("key policy must be a JSON object")
    statements = document.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise PolicyError("key policy needs a Statement (an object or a non-empty list)")
    return KeyPolicy(tuple(_statement(s) for s in statements))

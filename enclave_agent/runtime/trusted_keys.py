"""Which KMS keys the image trusts: the key-ARN grammar and the matcher. Pure, no I/O.

Why this exists: the parent chooses the credentials, so it chooses the AWS account
every alias, bare key id and ciphertext resolves in, and it may re-point an alias
in its own account (``UpdateAlias alias/app → a key of its own``). KMS then answers
honestly, over TLS the parent cannot touch, under a key the parent controls: a data
key it can decrypt later, or a "secret" it planted. So the image names the keys it
trusts (``trusted_keys`` in the agent's config, measured with the image) and the
agent checks the key ARN in every key-bound answer against them before it opens
the envelope.

Rules of this file:
- An entry is a full key ARN, ``arn:PARTITION:kms:REGION:ACCOUNT:key/ID``, or a whole
  account in one region, ``arn:PARTITION:kms:REGION:ACCOUNT:key/*``. Nothing else:
  an alias (name or ARN) is whatever the credentials' account says it is, and a bare
  key id names a key in whatever account the credentials belong to.
- KMS's answer ``KeyId`` is untrusted input for this module's purpose: it must parse
  as a full key ARN (no wildcard) and then match an entry exactly, character for
  character, or match an account entry's partition, region and account.
- Key ids are what KMS issues: a lower-case UUID, or ``mrk-`` and 32 lower-case hex
  digits for a multi-Region key (AWS KMS API reference, "KeyId"). Partitions and
  regions are the names enclave_common.aws knows (every AWS partition's).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from enclave_common.aws import ACCOUNT_PATTERN, PARTITION_PATTERN, is_region

CONFIG_KEY = "trusted_keys"
ACCOUNT_WILDCARD = "*"
_PARTITION = re.compile(PARTITION_PATTERN)
_ACCOUNT = re.compile(ACCOUNT_PATTERN)
_KEY_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}"
)
_MAX_QUOTED = 200  # an answer's KeyId is quoted in messages, cut to this many characters
SHAPE = "arn:PARTITION:kms:REGION:ACCOUNT:key/ID"


class KeyArnError(ValueError):
    """Not a key ARN (or, for a trusted entry, not an account entry either); says why."""


@dataclass(frozen=True, order=True)
class KeyArn:
    partition: str
    region: str
    account: str
    key_id: str  # ACCOUNT_WILDCARD only in a trusted entry

    def __str__(self) -> str:
        return f"arn:{self.partition}:kms:{self.region}:{self.account}:key/{self.key_id}"

    @property
    def is_account(self) -> bool:
        return self.key_id == ACCOUNT_WILDCARD


def quoted(value: Any) -> str:
    """``value`` for a message: repr, cut short (it may come from an answer)."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _parse(text: Any, *, account_entry: bool) -> KeyArn:
    if not isinstance(text, str):
        raise KeyArnError(f"expected a key ARN ({SHAPE}), got {type(text).__name__}")
    if text.startswith("alias/") or (text.startswith("arn:") and ":alias/" in text):
        raise KeyArnError(
            f"{quoted(text)} is an alias: it names whatever key the credentials' account "
            f"maps it to, so it cannot be trusted; give the key's ARN ({SHAPE})"
        )
    if _KEY_ID.fullmatch(text):
        raise KeyArnError(
            f"{quoted(text)} is a bare key id: it names a key in whatever account the "
            f"credentials belong to; give the full key ARN ({SHAPE})"
        )
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        raise KeyArnError(f"{quoted(text)} is not an ARN; expected {SHAPE}")
    _, partition, service, region, account, resource = parts
    if not _PARTITION.fullmatch(partition):
        raise KeyArnError(f"{quoted(text)}: {quoted(partition)} is not an AWS partition")
    if service != "kms":
        raise KeyArnError(f"{quoted(text)} is not a KMS ARN (service {quoted(service)})")
    if not is_region(region):
        raise KeyArnError(f"{quoted(text)}: {quoted(region)} is not a region name")
    if not _ACCOUNT.fullmatch(account):
        raise KeyArnError(f"{quoted(text)}: the account must be 12 digits")
    kind, slash, key_id = resource.partition("/")
    if kind != "key" or not slash:
        raise KeyArnError(f"{quoted(text)} is not a key ARN (resource {quoted(resource)})")
    if account_entry and key_id == ACCOUNT_WILDCARD:
        return KeyArn(partition, region, account, key_id)
    if not _KEY_ID.fullmatch(key_id):
        wildcard = " (key/* alone stands for a whole account)" if "*" in key_id else ""
        raise KeyArnError(
            f"{quoted(text)}: {quoted(key_id)} is not a KMS key id (a lower-case UUID "
            f"or mrk- and 32 lower-case hex digits){wildcard if account_entry else ''}"
        )
    return KeyArn(partition, region, account, key_id)


def parse_key_arn(value: Any) -> KeyArn:
    """A full key ARN, as KMS answers it in ``KeyId``; ``KeyArnError`` for anything else."""
    return _parse(value, account_entry=False)


def alias_target(alias_arn: Any, target_key_id: Any) -> KeyArn:
    """The key an alias ARN points to, as ``ListAliases`` tells it (``AliasArn``,
    ``TargetKeyId``): an alias and its key share partition, region and account (KMS
    API reference, CreateAlias), so the key's ARN is the alias ARN's with
    ``key/TargetKeyId``. ``KeyArnError`` if either part is malformed."""
    if not isinstance(alias_arn, str):
        raise KeyArnError(f"expected an alias ARN, got {type(alias_arn).__name__}")
    parts = alias_arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or not parts[5].startswith("alias/"):
        raise KeyArnError(f"{quoted(alias_arn)} is not an alias ARN")
    _, partition, service, region, account, _resource = parts
    return parse_key_arn(f"arn:{partition}:{service}:{region}:{account}:key/{target_key_id}")


def parse_entry(value: Any) -> KeyArn:
    """One ``trusted_keys`` entry: a key ARN, or ``key/*`` for a whole account."""
    return _parse(value, account_entry=True)


@dataclass(frozen=True)
class TrustedKeys:
    """The parsed ``trusted_keys``; empty (the default) trusts no key at all."""

    entries: tuple[KeyArn, ...] = ()

    @classmethod
    def parse(cls, values: Iterable[Any]) -> TrustedKeys:
        """Parse every entry; ``KeyArnError`` names the first bad one by position."""
        entries: list[KeyArn] = []
        for index, value in enumerate(values):
            try:
                entry = parse_entry(value)
            except KeyArnError as exc:
                raise KeyArnError(f"{CONFIG_KEY}[{index}]: {exc}") from None
            if entry not in entries:
                entries.append(entry)
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __str__(self) -> str:
        return ", ".join(str(entry) for entry in self.entries)

    def allows(self, arn: KeyArn) -> bool:
        account = KeyArn(arn.partition, arn.region, arn.account, ACCOUNT_WILDCARD)
        return not arn.is_account and (arn in self.entries or account in self.entries)

    def refusal_for_request(self, key_id: Any) -> str | None:
        """Why a request naming ``key_id`` is refused before any call, or None to send it.

        Only what can be decided without KMS: no trusted key at all, or an exact key
        ARN that is not trusted. Aliases and bare key ids go to KMS, and its answer is
        checked (``refusal_for_answer``).
        """
        if not self.entries:
            return off_reason()
        try:
            arn = parse_key_arn(key_id)
        except KeyArnError:
            return None
        if self.allows(arn):
            return None
        return f"key {arn} is not in the agent's {CONFIG_KEY} ({self})"

    def refusal_for_answer(self, key_id: Any, *, member: str = "KeyId") -> str | None:
        """Why KMS's answer, from the key ``key_id`` it names in ``member``, must not be
        used, or None."""
        if not self.entries:
            return off_reason()
        if key_id is None:
            return f"the answer names no {member}, so it may not come from a key in {CONFIG_KEY}"
        try:
            arn = parse_key_arn(key_id)
        except KeyArnError:
            return (
                f"the answer's {member} {quoted(key_id)} is not a full key ARN ({SHAPE}), "
                f"so it cannot be matched against {CONFIG_KEY}"
            )
        if self.allows(arn):
            return None
        return f"key {arn} answered, and it is not in the agent's {CONFIG_KEY} ({self})"


def off_reason() -> str:
    """The one sentence for "no trusted_keys": key operations are off, and why."""
    return (
        f"key operations are off: the agent's config has no {CONFIG_KEY} (list the key "
        f"ARNs this image may use, {SHAPE}, or arn:PARTITION:kms:REGION:ACCOUNT:key/* "
        "for every key of one account in one region)"
    )


def account_entry(partition: str, region: str, account: str) -> KeyArn:
    """The entry trusting every key of ``account`` in ``region``; checked like any entry."""
    return parse_entry(str(KeyArn(partition, region, account, ACCOUNT_WILDCARD)))


def toml_line(entries: Iterable[KeyArn]) -> str:
    """``trusted_keys = ["…", …]`` for an agent config."""
    return f"{CONFIG_KEY} = {json.dumps([str(entry) for entry in entries])}"

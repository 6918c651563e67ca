"""The stand-in's credentials: per account, one long-term key pair plus minted short-lived
ones (pure).

Each account the stand-in speaks for gets a long-term pair at start (the primary
account's is published at the top of the state file, every account's in its
``accounts`` list). Short-lived credentials (access key id, secret, session token,
expiration) are minted on demand, as STS would, for a chosen account and optionally a
chosen IAM user or role of it (``Caller``: who the key policies see). A request signed
with one after its expiration gets ExpiredTokenException, one naming an unknown key or
carrying the wrong token gets UnrecognizedClientException.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from devtools.local_kms.policy import Caller, principal_account
from devtools.local_kms.sigv4 import Request, SignatureError, check_signature

MAX_TTL = timedelta(hours=12)
DEFAULT_TTL = 3600.0
_INVALID_TOKEN = "The security token included in the request is invalid."


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret_access_key: str
    caller: Caller
    session_token: str | None = None
    expiration: datetime | None = None

    def process_document(self) -> dict[str, Any]:
        """botocore ``credential_process`` JSON (Version 1) for minted credentials."""
        assert self.expiration is not None, "only minted credentials expire"
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _key_id(prefix: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(16))


def _secret() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode()


class CredentialStore:
    def __init__(self, accounts: Sequence[str]) -> None:
        """``accounts``: the stand-in's accounts, the primary first."""
        if not accounts:
            raise ValueError("at least one account")
        self.accounts = tuple(accounts)
        self._long_term = {
            account: Credential(_key_id("AKIA"), _secret(), Caller(account))
            for account in self.accounts
        }
        self._minted: dict[str, Credential] = {}

    @property
    def long_term(self) -> Credential:
        """The primary account's long-term credentials."""
        return self._long_term[self.accounts[0]]

    def long_term_of(self, account: str) -> Credential:
        return self._long_term[account]

    def mint(
        self,
        ttl: timedelta,
        now: datetime,
        *,
        account: str | None = None,
        principal: str | None = None,
    ) -> Credential:
        """Short-lived credentials of ``account`` (default: the primary), signing as
        ``principal`` (an IAM user or role ARN of that account) or, without one, as any
        principal of the account. ValueError says what is wrong with the request."""
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be more than 0 s and at most {MAX_TTL}")
        account = self.accounts[0] if account is None else account
        if account not in self.accounts:
            raise ValueError(
                f"account {account!r} is not one of this stand-in's ({', '.join(self.accounts)})"
            )
        if principal is not None and principal_account(principal) != account:
            raise ValueError(f"principal {principal!r} is not of account {account}")
        self._forget_expired(now)
        credential = Credential(
            _key_id("ASIA"),
            _secret(),
            Caller(account, principal),
            base64.b64encode(secrets.token_bytes(48)).decode(),
            (now + ttl).replace(microsecond=0),
        )
        self._minted[credential.access_key_id] = credential
        return credential

    def mint_requested(self, document: Any, now: datetime) -> Credential:
        """``mint`` for an admin request ``{"ttl": S, "account": ID, "principal": ARN}``
        (each optional); ValueError says what is wrong with it."""
        if not isinstance(document, dict):
            raise ValueError("the request must be a JSON object")
        ttl = document.get("ttl", DEFAULT_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise ValueError("ttl must be a number of seconds")
        account, principal = document.get("account"), document.get("principal")
        for name, value in (("account", account), ("principal", principal)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        try:
            lifetime = timedelta(seconds=ttl)
        except OverflowError as exc:
            raise ValueError(f"ttl must be more than 0 s and at most {MAX_TTL}") from exc
        return self.mint(lifetime, now, account=account, principal=principal)

    def _forget_expired(self, now: datetime) -> None:
        # Expired credentials are kept for a day so their use is reported as expired,
        # not as unknown, as AWS does.
        horizon = now - timedelta(days=1)
        for key_id, cred in list(self._minted.items()):
            if cred.expiration is not None and cred.expiration < horizon:
                del self._minted[key_id]

    def credential_for(
        self, access_key_id: str, session_token: str | None, now: datetime
    ) -> Credential:
        """The credential to check a signature with (its secret) and whose ``caller``
        the call is, or raise SignatureError as AWS would."""
        for long_term in self._long_term.values():
            if access_key_id == long_term.access_key_id:
                if session_token is not None:
                    raise _invalid_token()
                return long_term
        credential = self._minted.get(access_key_id)
        if (
            credential is None
            or session_token is None
            or credential.session_token is None
            or not hmac.compare_digest(credential.session_token, session_token)
        ):
            # S3 tells an unknown key id from a bad token; the JSON services do not.
            raise _invalid_token() if credential is not None else _unknown_key()
        if credential.expiration is not None and now >= credential.expiration:
            raise SignatureError(
                "ExpiredTokenException",
                "The security token included in the request is expired",
                (400, "ExpiredToken"),
            )
        return credential

    def authenticate(self, request: Request, *, service: str, region: str, now: datetime) -> Caller:
        """Who signed ``request`` (sent to ``service``'s endpoint in ``region``), or
        SignatureError as AWS would answer."""
        token = request.headers.get("x-amz-security-token")
        signer: list[Credential] = []

        def secret_for(key_id: str) -> str:
            signer.append(self.credential_for(key_id, token, now))
            return signer[-1].secret_access_key

        check_signature(request, service=service, region=region, secret_for=secret_for, now=now)
        return signer[-1].caller  # check_signature returns only after asking for a secret


def _invalid_token() -> SignatureError:
    return SignatureError("UnrecognizedClientException", _INVALID_TOKEN, (400, "InvalidToken"))


def _unknown_key() -> SignatureError:
    return SignatureError(
        "UnrecognizedClientException",
        _INVALID_TOKEN,
        (403, "InvalidAccessKeyId"),
    )

"""The stand-in's credentials: one long-term key pair plus minted short-lived ones (pure).

The long-term pair is created at start and published in the state file. Short-lived
credentials (access key id, secret, session token, expiration) are minted on demand, as
STS would; a request signed with one after its expiration gets ExpiredTokenException,
one naming an unknown key or carrying the wrong token gets UnrecognizedClientException.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from devtools.local_kms.sigv4 import SignatureError

MAX_TTL = timedelta(hours=12)
_INVALID_TOKEN = "The security token included in the request is invalid."


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expiration: datetime | None = None


def _key_id(prefix: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(16))


def _secret() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode()


class CredentialStore:
    def __init__(self) -> None:
        self.long_term = Credential(_key_id("AKIA"), _secret())
        self._minted: dict[str, Credential] = {}

    def mint(self, ttl: timedelta, now: datetime) -> Credential:
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be more than 0 s and at most {MAX_TTL}")
        self._forget_expired(now)
        credential = Credential(
            _key_id("ASIA"),
            _secret(),
            base64.b64encode(secrets.token_bytes(48)).decode(),
            (now + ttl).replace(microsecond=0),
        )
        self._minted[credential.access_key_id] = credential
        return credential

    def _forget_expired(self, now: datetime) -> None:
        # Expired credentials are kept for a day so their use is reported as expired,
        # not as unknown, as AWS does.
        horizon = now - timedelta(days=1)
        for key_id, cred in list(self._minted.items()):
            if cred.expiration is not None and cred.expiration < horizon:
                del self._minted[key_id]

    def secret_for(self, access_key_id: str, session_token: str | None, now: datetime) -> str:
        """The secret key to check a signature with, or raise SignatureError as AWS would."""
        if access_key_id == self.long_term.access_key_id:
            if session_token is not None:
                raise SignatureError("UnrecognizedClientException", _INVALID_TOKEN)
            return self.long_term.secret_access_key
        credential = self._minted.get(access_key_id)
        if (
            credential is None
            or session_token is None
            or credential.session_token is None
            or not hmac.compare_digest(credential.session_token, session_token)
        ):
            raise SignatureError("UnrecognizedClientException", _INVALID_TOKEN)
        if credential.expiration is not None and now >= credential.expiration:
            raise SignatureError(
                "ExpiredTokenException", "The security token included in the request is expired"
            )
        return credential.secret_access_key

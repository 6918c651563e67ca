"""Credentials from the proxy: parsing, refresh ahead of expiry, single flight."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.credentials import (
    Credentials,
    CredentialsError,
    CredentialsProvider,
    parse_credentials,
    proxy_fetcher,
)
from enclave_common.address import parse_address
from tests.support.fuzzing import parsed_or_refused
from tests.support.kms_fakes import Relay

T0 = datetime(2026, 11, 29, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def creds(expiration: datetime | None, key: str = "AKID") -> Credentials:
    return Credentials(key, "secret-" + key, "token-" + key, expiration, "us-east-1", T0)


def test_parse_contract_shape() -> None:
    parsed = parse_credentials(
        json.dumps(
            {
                "AccessKeyId": "AKID",
                "SecretAccessKey": "s3cr3t",
                "Token": "tok",
                "Expiration": "2026-11-29T01:00:00Z",
                "Region": "eu-west-1",
            }
        ).encode()
    )
    assert parsed.expiration == datetime(2026, 11, 29, 1, 0, tzinfo=UTC)
    assert (parsed.token, parsed.region) == ("tok", "eu-west-1")
    assert "s3cr3t" not in repr(parsed) and "tok" not in repr(parsed)
    plain = parse_credentials(
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Token":null,"Expiration":null}'
    )
    assert plain.token is None and plain.expiration is None


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b"[" * 50000,  # deeper than json's recursion limit
        b'{"AccessKeyId":"A"}',
        b'{"AccessKeyId":"A","SecretAccessKey":""}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Token":5}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Expiration":"tomorrow"}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Expiration":12}',
        # Past year 9999 or before year 1 once in UTC: out of datetime's range.
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Expiration":"9999-12-31T23:59:59-01:00"}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Expiration":"0001-01-01T00:00:00+00:01"}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Token":"t\\r\\nX-Injected: 1"}',
        b'{"AccessKeyId":"A","SecretAccessKey":"s\\u00e9cret"}',
        b'{"AccessKeyId":"A B","SecretAccessKey":"S"}',
        b'{"AccessKeyId":"' + b"A" * 129 + b'","SecretAccessKey":"S"}',
        b'{"AccessKeyId":"A","SecretAccessKey":"S","Token":"' + b"t" * 16385 + b'"}',
    ],
)
def test_parse_rejects(body: bytes) -> None:
    with pytest.raises(CredentialsError):
        parse_credentials(body)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=120)
    | st.dictionaries(
        st.sampled_from(["AccessKeyId", "SecretAccessKey", "Token", "Expiration", "Region"]),
        st.none() | st.text(max_size=30) | st.integers(),
    ).map(lambda d: json.dumps(d).encode())
)
def test_parse_fails_only_with_its_own_error(body: bytes) -> None:
    parsed_or_refused(parse_credentials, body, CredentialsError)


offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timedelta(minutes=m))
# Any instant, and often one within a day of datetime's limits, where an offset can
# carry it out of range once converted to UTC.
moments = (
    st.datetimes()
    | st.datetimes(min_value=datetime(9999, 12, 31))
    | st.datetimes(max_value=datetime(1, 1, 1, 23, 59))
)
expirations = st.one_of(
    st.builds(
        lambda moment, offset: moment.replace(tzinfo=timezone(offset)).isoformat(),
        moments,
        offsets,
    ),
    st.datetimes().map(lambda moment: moment.isoformat() + "Z"),
    st.datetimes().map(datetime.isoformat),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(expirations)
def test_any_expiration_is_a_time_or_a_credentials_error(expiration: str) -> None:
    """The proxy is untrusted: whatever Expiration it sends parses to an instant the
    provider can schedule a refresh at, or is a CredentialsError (never an overflow)."""
    body = json.dumps({"AccessKeyId": "A", "SecretAccessKey": "S", "Expiration": expiration})
    try:
        parsed = parse_credentials(body.encode())
    except CredentialsError as exc:
        assert "Expiration" in exc.message and exc.retryable
        return
    assert parsed.expiration is not None and parsed.expiration.tzinfo is UTC
    parsed.refresh_at()


def test_refresh_point() -> None:
    assert creds(T0 + timedelta(hours=1)).refresh_at() == T0 + timedelta(minutes=55)
    assert creds(T0 + timedelta(minutes=4)).refresh_at() == T0 + timedelta(minutes=2)
    assert creds(None).refresh_at() is None


async def test_cached_then_refreshed_ahead_of_expiry() -> None:
    clock = Clock()
    issued: list[Credentials] = []

    async def fetch() -> Credentials:
        issued.append(creds(clock.now + timedelta(minutes=60), key=f"K{len(issued)}"))
        return issued[-1]

    provider = CredentialsProvider(fetch, clock=clock)
    first = await provider.get()
    clock.now += timedelta(minutes=54)
    assert await provider.get() is first
    clock.now += timedelta(minutes=2)  # 4 minutes left: inside the 5-minute margin
    second = await provider.get()
    assert second.access_key_id == "K1" and provider.fetches == 2


async def test_failed_early_refresh_keeps_valid_credentials() -> None:
    clock = Clock()
    fail = False

    async def fetch() -> Credentials:
        if fail:
            raise CredentialsError("proxy down")
        return creds(clock.now + timedelta(minutes=10))

    provider = CredentialsProvider(fetch, clock=clock)
    first = await provider.get()
    fail = True
    clock.now += timedelta(minutes=8)
    assert await provider.get() is first  # still valid for 2 minutes
    clock.now += timedelta(minutes=3)
    with pytest.raises(CredentialsError, match="proxy down"):
        await provider.get()


async def test_single_flight() -> None:
    gate = trio.Event()

    async def fetch() -> Credentials:
        await gate.wait()
        return creds(None)

    provider = CredentialsProvider(fetch)
    got: list[Credentials] = []

    async def one() -> None:
        got.append(await provider.get())

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert provider.fetches == 1
    assert len(got) == 20 and all(c is got[0] for c in got)


async def test_single_flight_shares_failure() -> None:
    gate = trio.Event()

    async def fetch() -> Credentials:
        await gate.wait()
        raise CredentialsError("no credentials")

    provider = CredentialsProvider(fetch)
    errors: list[str] = []

    async def one() -> None:
        try:
            await provider.get()
        except CredentialsError as exc:
            errors.append(exc.message)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert errors == ["no credentials"] * 5 and provider.fetches == 1


async def test_refresh_after_expired_once_per_stale_credentials() -> None:
    n = 0

    async def fetch() -> Credentials:
        nonlocal n
        n += 1
        return creds(None, key=f"K{n}")

    provider = CredentialsProvider(fetch)
    stale = await provider.get()
    fresh = await provider.refresh_after_expired(stale)
    assert fresh.access_key_id == "K2"
    # a second caller holding the same stale credentials gets the new ones, no new fetch
    assert await provider.refresh_after_expired(stale) is fresh
    assert provider.fetches == 2


async def test_already_expired_credentials_are_refused() -> None:
    async def fetch() -> Credentials:
        return creds(T0 - timedelta(seconds=1))

    with pytest.raises(CredentialsError, match="expired already"):
        await CredentialsProvider(fetch, clock=Clock()).get()


async def test_fetch_from_proxy(nursery: trio.Nursery) -> None:
    relay = Relay()
    relay.credentials["Expiration"] = "2030-01-01T00:00:00Z"
    await relay.serve(nursery)
    fetched = await proxy_fetcher(parse_address(relay.address))()
    assert fetched.access_key_id == "AKIDFAKEFAKEFAKE"
    assert fetched.expiration == datetime(2030, 1, 1, tzinfo=UTC)
    relay.credentials_status = 503
    with pytest.raises(CredentialsError) as info:
        await proxy_fetcher(parse_address(relay.address))()
    assert info.value.message == "proxy has no credentials for us: 503 no credentials"
    assert info.value.retryable
    with pytest.raises(CredentialsError, match="cannot reach the proxy"):
        await proxy_fetcher(parse_address("tcp:127.0.0.1:1"))()


async def test_deeply_nested_proxy_error_body_is_a_credentials_error(
    nursery: trio.Nursery,
) -> None:
    relay = Relay()
    await relay.serve(nursery)
    relay.credentials_body = b"[" * 50000
    for status in (503, 200):
        relay.credentials_status = status
        with pytest.raises(CredentialsError, match="503|not JSON"):
            await proxy_fetcher(parse_address(relay.address))()

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_agent.runtime.app_protocol import (
    KMS_CONTENT_TYPE,
    UNKNOWN_PATH,
    AppProtocolError,
    AttestationCall,
    HealthCall,
    KmsCall,
    SecretCall,
    error_response,
    kms_response,
    route_request,
)

KMS_HEADERS = {"x-amz-target": "TrentService.Decrypt", "content-type": KMS_CONTENT_TYPE}


def test_kms_call() -> None:
    body = json.dumps({"CiphertextBlob": "AAAA"}).encode()
    route = route_request("POST", "/", KMS_HEADERS, body)
    assert route == KmsCall("Decrypt", {"CiphertextBlob": "AAAA"})


@pytest.mark.parametrize(
    "operation",
    ["Decrypt", "GenerateDataKey", "GenerateRandom", "GenerateDataKeyPair", "DeriveSharedSecret"],
)
def test_five_operations(operation: str) -> None:
    headers = {"x-amz-target": f"TrentService.{operation}"}
    route = route_request("POST", "/", headers, b"{}")
    assert isinstance(route, KmsCall)
    assert route.operation == operation


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "error_type", "status"),
    [
        ("POST", "/", {}, b"{}", "UnknownOperationException", 400),
        (
            "POST",
            "/",
            {"x-amz-target": "TrentService.CreateKey"},
            b"{}",
            "UnknownOperationException",
            400,
        ),
        ("POST", "/", {"x-amz-target": "Other.Decrypt"}, b"{}", "UnknownOperationException", 400),
        ("POST", "/", KMS_HEADERS, b"{not json", "SerializationException", 400),
        ("POST", "/", KMS_HEADERS, b"[1]", "SerializationException", 400),
        ("POST", "/", KMS_HEADERS, b"\xff\xfe", "SerializationException", 400),
        (
            "POST",
            "/",
            {**KMS_HEADERS, "content-type": "text/plain"},
            b"{}",
            "SerializationException",
            400,
        ),
        ("POST", "/", KMS_HEADERS, b'{"Recipient": {}}', "ValidationException", 400),
        ("GET", "/", KMS_HEADERS, b"", "MethodNotAllowedException", 405),
        ("POST", "/healthz", {}, b"", "MethodNotAllowedException", 405),
        ("GET", "/v1/secrets/../etc", {}, b"", "ValidationException", 400),
        ("GET", "/v1/secrets/", {}, b"", "ValidationException", 400),
        ("GET", "/nope", {}, b"", "NotFoundException", 404),
        ("POST", "/v1/attestation", {}, b'{"nonce": 3}', "ValidationException", 400),
        ("POST", "/v1/attestation", {}, b'{"nonce": "***"}', "ValidationException", 400),
        ("POST", "/v1/attestation", {}, b'{"extra": "AA=="}', "ValidationException", 400),
    ],
)
def test_refusals(
    method: str, target: str, headers: dict[str, str], body: bytes, error_type: str, status: int
) -> None:
    with pytest.raises(AppProtocolError) as info:
        route_request(method, target, headers, body)
    assert info.value.error_type == error_type
    assert info.value.status == status


def test_an_unknown_path_is_answered_with_the_routes_served() -> None:
    with pytest.raises(AppProtocolError) as info:
        route_request("GET", "/v1/secret/db", {}, b"")
    assert info.value.message == UNKNOWN_PATH
    for route in ("POST /", "/v1/attestation", "/v1/secrets/NAME", "/healthz", "/metrics"):
        assert route in info.value.message


def test_attestation_fields() -> None:
    body = json.dumps(
        {"nonce": base64.b64encode(b"n").decode(), "public_key": base64.b64encode(b"k").decode()}
    ).encode()
    assert route_request("POST", "/v1/attestation", {}, body) == AttestationCall(b"n", None, b"k")
    assert route_request("POST", "/v1/attestation", {}, b"") == AttestationCall(None, None, None)
    too_long = json.dumps({"user_data": base64.b64encode(b"x" * 1025).decode()}).encode()
    with pytest.raises(AppProtocolError):
        route_request("POST", "/v1/attestation", {}, too_long)


def test_secret_and_health() -> None:
    assert route_request("GET", "/v1/secrets/db.password", {}, b"") == SecretCall("db.password")
    assert route_request("GET", "/healthz?x=1", {}, b"") == HealthCall()


def test_a_secret_asked_after_a_version() -> None:
    def route(query: str) -> SecretCall:
        call = route_request("GET", f"/v1/secrets/db?{query}", {}, b"")
        assert isinstance(call, SecretCall)
        return call

    assert route("after=v1") == SecretCall("db", "v1", 0.0)
    assert route("after=v1&wait=30") == SecretCall("db", "v1", 30.0)
    assert route("wait=0.5&after=3%2FL4k%2Bq%3D") == SecretCall("db", "3/L4k+q=", 0.5)
    assert route("after=v1&wait=300") == SecretCall("db", "v1", 300.0)
    for query, reason in [
        ("wait=5", "wait needs after=VERSION"),
        ("after=v1&wait=301", "wait is a number of seconds from 0 to 300"),
        ("after=v1&wait=-1", "from 0 to 300"),
        ("after=v1&wait=nan", "from 0 to 300"),
        ("after=v1&wait=inf", "from 0 to 300"),
        ("after=v1&wait=soon", "from 0 to 300"),
        ("after=", "after is 1 to 1024 characters"),
        (f"after={'v' * 1025}", "after is 1 to 1024 characters"),
        ("after=v1&after=v2", "each at most once"),
        ("version=v1", "takes after=VERSION and wait=SECONDS"),
        ("after", "malformed query string"),
    ]:
        with pytest.raises(AppProtocolError) as info:
            route(query)
        assert info.value.error_type == "ValidationException", query
        assert reason in info.value.message, query


@pytest.mark.parametrize(
    "request_body",
    [
        {"CiphertextBlob": "AAAA", "EncryptionContext": {"enclave-kms:secret": "db"}},
        {"KeyId": "k", "KeySpec": "AES_256", "EncryptionContext": {"enclave-kms:secret": "db"}},
        {"DestinationEncryptionContext": {"app": "x", "enclave-kms:secret": "db"}},
        {"SourceEncryptionContext": {"enclave-kms:secret": ""}},
    ],
)
def test_the_secrets_context_key_is_the_agents_own(request_body: dict[str, object]) -> None:
    with pytest.raises(AppProtocolError) as info:
        route_request("POST", "/", KMS_HEADERS, json.dumps(request_body).encode())
    assert info.value.error_type == "ValidationException"
    assert "'enclave-kms:secret' is reserved for the agent's named secrets" in info.value.message
    # Other keys, and the name as a value, are the app's business.
    allowed = {"CiphertextBlob": "AAAA", "EncryptionContext": {"secret": "enclave-kms:secret"}}
    assert isinstance(
        route_request("POST", "/", KMS_HEADERS, json.dumps(allowed).encode()), KmsCall
    )


def test_error_shape_is_kms_json() -> None:
    response = error_response("AccessDeniedException", "no", 400)
    assert response.content_type == "application/x-amz-json-1.1"
    assert json.loads(response.body) == {"__type": "AccessDeniedException", "message": "no"}
    assert json.loads(kms_response({"Plaintext": "AA=="}).body) == {"Plaintext": "AA=="}


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "CONNECT"]),
    target=st.one_of(
        st.sampled_from(["/", "/healthz", "/v1/attestation", "/v1/secrets/a"]),
        st.text(max_size=60),
        st.text(max_size=60).map(lambda query: f"/v1/secrets/a?{query}"),
        st.text(max_size=30).map(lambda after: f"/v1/secrets/a?after={after}&wait=1"),
    ),
    headers=st.dictionaries(
        st.sampled_from(["x-amz-target", "content-type", "x-other"]),
        st.one_of(
            st.sampled_from(["TrentService.Decrypt", KMS_CONTENT_TYPE]), st.text(max_size=30)
        ),
    ),
    body=st.one_of(st.binary(max_size=200), st.just(b'{"CiphertextBlob": "AA=="}')),
)
def test_router_total(method: str, target: str, headers: dict[str, str], body: bytes) -> None:
    """Any input yields a route or AppProtocolError, never another exception."""
    try:
        route = route_request(method, target, headers, body)
    except AppProtocolError as exc:
        assert 400 <= exc.status < 500
    else:
        assert isinstance(route, KmsCall | AttestationCall | SecretCall | HealthCall)

"""Check a JSON request body against botocore's model of its service (KMS, Secrets
Manager, SSM), as AWS's front end does.

AWS refuses a member of the wrong JSON type with ``SerializationException`` and a
missing required member with ``ValidationException``; moto trusts its input, so without
this check a malformed body would crash moto instead of getting AWS's answer. Members the
model does not know, and null members, are dropped, as AWS's JSON protocol ignores them.
Pure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from functools import cache
from typing import Any

import botocore.session

from enclave_common.errors import ShownError

MAX_DEPTH = 20


class ShapeError(ShownError):
    """The body does not fit the operation's model, as KMS says so (400)."""


@cache
def _model(service: str) -> Any:
    return botocore.session.get_session().get_service_model(service)


def operation_names(service: str = "kms") -> frozenset[str]:
    return frozenset(_model(service).operation_names)


def check_request(operation: str, body: dict[str, Any], service: str = "kms") -> dict[str, Any]:
    """``body`` without null or unknown members; ShapeError unless it fits the model."""
    shape = _model(service).operation_model(operation).input_shape
    if shape is None:
        return {}
    _check(shape, body, operation, 0)
    return {
        name: value for name, value in body.items() if name in shape.members and value is not None
    }


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]


def _serialization(path: str, expected: str) -> ShapeError:
    return ShapeError("SerializationException", f"{path}: expected {expected}")


def _check(shape: Any, value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ShapeError("SerializationException", f"{path}: nested too deeply")
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            raise _serialization(path, "an object")
        for name in shape.required_members:
            if value.get(name) is None:
                raise ShapeError(
                    "ValidationException",
                    f"1 validation error detected: Value null at '{_lower_first(name)}' "
                    "failed to satisfy constraint: Member must not be null",
                )
        for name, member in shape.members.items():
            if value.get(name) is not None:
                _check(member, value[name], f"{path}.{name}", depth + 1)
    elif kind == "list":
        if not isinstance(value, list):
            raise _serialization(path, "a list")
        for index, item in enumerate(value):
            _check(shape.member, item, f"{path}[{index}]", depth + 1)
    elif kind == "map":
        if not isinstance(value, dict):
            raise _serialization(path, "an object")
        for key, item in value.items():
            _check(shape.value, item, f"{path}.{key}", depth + 1)
    elif kind == "string":
        if not isinstance(value, str):
            raise _serialization(path, "a string")
        _check_range(shape, len(value), path, "length")
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _serialization(path, "an integer")
        _check_range(shape, value, path, "value")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise _serialization(path, "a boolean")
    elif kind == "blob":
        if not isinstance(value, str):
            raise _serialization(path, "a base64 string")
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _serialization(path, "valid base64") from exc
        _check_range(shape, len(decoded), path, "length")
    elif kind == "timestamp" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _serialization(path, "a number of seconds")


def _check_range(shape: Any, measure: int, path: str, what: str) -> None:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    member = _lower_first(path.rpartition(".")[2])
    if low is not None and measure < low:
        raise ShapeError(
            "ValidationException",
            f"1 validation error detected: Value at '{member}' failed to satisfy constraint: "
            f"Member must have {what} greater than or equal to {low}",
        )
    if high is not None and measure > high:
        raise ShapeError(
            "ValidationException",
            f"1 validation error detected: Value at '{member}' failed to satisfy constraint: "
            f"Member must have {what} less than or equal to {high}",
        )

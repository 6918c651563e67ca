"""The operations table (enclave_agent/runtime/kms_operations.py) against its fact
source, botocore's KMS service model, for every served operation; the served list
in the docs; and botocore's absence from the agent's runtime."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from enclave_agent.runtime.kms_operations import (
    OPERATION_TABLE,
    OPERATIONS,
    PASS_THROUGH_OPERATIONS,
    RECIPIENT_OPERATIONS,
    SECRET_MEMBERS,
    Blob,
    Boolean,
    Integer,
    ListOf,
    MapOf,
    Operation,
    Shape,
    Struct,
    Text,
)
from tests.conftest import REPO_ROOT
from tests.support.kms_model import botocore_operation, service_model

DOCS_BEGIN = "<!-- served-operations: generated from kms_operations.OPERATION_TABLE"
DOCS_END = "<!-- /served-operations -->"
# Issue 13: the operations that never return a secret, passed through.
ISSUE_PASS_THROUGH = {
    "Encrypt",
    "ReEncrypt",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPairWithoutPlaintext",
    "DescribeKey",
    "GetPublicKey",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "ListAliases",
    "ListKeys",
}


_KINDS: dict[type, set[str]] = {
    Text: {"string"},
    Integer: {"integer", "long"},
    Boolean: {"boolean"},
    Blob: {"blob"},
    ListOf: {"list"},
    MapOf: {"map"},
    Struct: {"structure"},
}


def _differences(
    ours: Shape, theirs: Any, where: str, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Every way ``ours`` differs from botocore's shape ``theirs``."""
    kind = theirs.type_name
    if kind not in _KINDS[type(ours)]:
        return [f"{where}: ours {type(ours).__name__}, botocore {kind}"]
    found: list[str] = []
    if isinstance(ours, Text | Integer | Blob | ListOf):
        bounds = (theirs.metadata.get("min"), theirs.metadata.get("max"))
        if (ours.min, ours.max) != bounds:
            found.append(f"{where}: bounds ours {(ours.min, ours.max)}, botocore {bounds}")
    if isinstance(ours, Text) and list(ours.enum) != list(theirs.enum or []):
        found.append(f"{where}: enum ours {ours.enum}, botocore {theirs.enum}")
    if isinstance(ours, ListOf):
        found += _differences(ours.item, theirs.member, f"{where}[]")
    if isinstance(ours, MapOf):
        found += _differences(ours.key, theirs.key, f"{where} key")
        found += _differences(ours.value, theirs.value, f"{where} value")
    if isinstance(ours, Struct):
        members = [name for name in theirs.members if name not in skip]
        if list(ours.members) != members:
            found.append(f"{where}: members ours {list(ours.members)}, botocore {members}")
        required = [name for name in theirs.required_members if name not in skip]
        if list(ours.required) != required:
            found.append(f"{where}: required ours {list(ours.required)}, botocore {required}")
        for name, shape in ours.members.items():
            if name in theirs.members:
                found += _differences(shape, theirs.members[name], f"{where}.{name}")
    return found


@pytest.mark.parametrize("name", OPERATIONS)
def test_the_request_schema_is_botocores(name: str) -> None:
    """Members, required members, types, length and value bounds, enums, nested too;
    a Recipient operation's schema is the model's without Recipient (the agent's)."""
    operation = OPERATION_TABLE[name]
    model = botocore_operation(name)
    assert operation.recipient == ("Recipient" in model.input_shape.members)
    skip = frozenset({"Recipient"})
    assert _differences(operation.request, model.input_shape, name, skip) == []


@pytest.mark.parametrize("name", OPERATIONS)
def test_the_answer_members_are_botocores(name: str) -> None:
    operation = OPERATION_TABLE[name]
    output = botocore_operation(name).output_shape
    expected = [member for member in output.members if member != "CiphertextForRecipient"]
    assert list(operation.answer) == expected
    assert ("CiphertextForRecipient" in output.members) == operation.recipient
    if operation.recipient:
        assert operation.plaintext_member in output.members
    else:  # a pass-through answer carries nothing secret
        assert not SECRET_MEMBERS & set(output.members)


def _shape_at(shape: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        shape = shape.members[name]
    return shape


@pytest.mark.parametrize("name", OPERATIONS)
def test_every_member_naming_a_key_is_declared(name: str) -> None:
    """A member of the model's key-id type is a key the trusted-keys check must see:
    in the request (``key_members``) and in the answer (``answer_keys``); a listing's
    entries name their keys by ARN or by target key id."""
    operation = OPERATION_TABLE[name]
    model = botocore_operation(name)
    named = {n for n, s in model.input_shape.members.items() if s.name == "KeyIdType"}
    assert set(operation.key_members) == named
    answered = {(n,) for n, s in model.output_shape.members.items() if s.name == "KeyIdType"}
    assert answered <= set(operation.answer_keys)
    for path in operation.answer_keys:
        assert _shape_at(model.output_shape, path).name in ("KeyIdType", "ArnType"), path
    if operation.listing is not None:
        entry = model.output_shape.members[operation.listing].member
        assert {"KeyArn", "TargetKeyId"} & set(entry.members)
    assert operation.takes_key == bool(named or answered or operation.listing)


def test_served_operations_are_the_recipient_ones_and_the_issues_pass_through_list() -> None:
    assert set(PASS_THROUGH_OPERATIONS) == ISSUE_PASS_THROUGH
    assert set(RECIPIENT_OPERATIONS) == {
        name
        for name in service_model().operation_names
        if "Recipient" in botocore_operation(name).input_shape.members
    }


def test_key_policy_actions_are_the_operations_own() -> None:
    """Each operation is its own kms: action, but ReEncrypt (ReEncryptFrom on the
    source key, ReEncryptTo on the destination) and the listings, which only an IAM
    policy grants (KMS API reference, "Required permissions")."""
    for name, operation in OPERATION_TABLE.items():
        if name == "ReEncrypt":
            assert operation.key_policy_actions == ("kms:ReEncryptFrom", "kms:ReEncryptTo")
        elif operation.listing is not None:
            assert operation.key_policy_actions == ()
        else:
            assert operation.key_policy_actions == (f"kms:{name}",)


# --- the docs ----------------------------------------------------------------------


def _keys_checked(operation: Operation) -> str:
    parts = []
    if operation.key_members:
        names = ", ".join(f"`{name}`" for name in operation.key_members)
        parts.append(f"request {names} if a key ARN, before any call")
    if operation.answer_keys:
        names = ", ".join(f"`{'.'.join(path)}`" for path in operation.answer_keys)
        parts.append(f"answer {names}")
    if operation.listing is not None:
        parts.append(f"answer `{operation.listing}` filtered to trusted keys")
    return "; ".join(parts) or "none (no key)"


def served_operations_markdown() -> str:
    """The served-operations table the docs must carry, from OPERATION_TABLE."""
    lines = [
        f"{DOCS_BEGIN}; tests/test_kms_operations.py checks it -->",
        "| Operation | How the agent serves it | Keys checked against `trusted_keys` |",
        "|---|---|---|",
    ]
    for name, operation in OPERATION_TABLE.items():
        how = (
            f"adds `Recipient`, opens the envelope, answers `{operation.plaintext_member}`"
            if operation.recipient
            else "passes it through, signed by the agent (no secret in the answer)"
        )
        lines.append(f"| `{name}` | {how} | {_keys_checked(operation)} |")
    lines.append(DOCS_END)
    return "\n".join(lines)


def test_the_docs_list_exactly_the_served_operations() -> None:
    """One block in the docs, between the markers, is the table rendered above: an
    operation added to or removed from OPERATION_TABLE fails here until the docs say so."""
    blocks = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        start = text.find(DOCS_BEGIN)
        if start >= 0:
            end = text.index(DOCS_END, start) + len(DOCS_END)
            blocks.append((path.name, text[start:end]))
    assert len(blocks) == 1, f"expected one served-operations block, found {blocks}"
    expected = served_operations_markdown()
    assert blocks[0][1] == expected, f"paste this into {blocks[0][0]}:\n{expected}"


# --- no SDK in the enclave ---------------------------------------------------------


def test_the_agents_runtime_imports_no_botocore() -> None:
    """Every runtime module and the agent's CLI, imported in a fresh interpreter,
    leave botocore (and boto3) unloaded: the enclave image need not carry them."""
    script = (
        "import importlib, pkgutil, sys\n"
        "import enclave_agent.runtime, enclave_agent.cli, enclave_agent.client\n"
        "for info in pkgutil.iter_modules(enclave_agent.runtime.__path__):\n"
        "    importlib.import_module('enclave_agent.runtime.' + info.name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""Both config parsers over generated TOML documents: every key either process knows
(from the settings' own declarations), plausible and arbitrary values, unknown keys.

Whatever the document, only ConfigError escapes, it names the offending key, and
the parser opens no file (the agent's ``ciphertext_file`` is read by ``load_config``).
"""

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.config import AgentConfig, load_config, parse_config
from enclave_common.config import ConfigError, reference
from enclave_common.logs import LEVELS
from proxy.config import CliOptions, ProxyConfig, build_config, effective_allowlist
from proxy.config import parse_config_text as parse_proxy_config

KEY_ARN = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
REGIONS = ["us-east-1", "eu-west-2", "cn-north-1", "us-isob-east-1", "eusc-de-east-1", "moon"]
COUNTS = st.integers(-1, 300)

# Plausible values per key (the rest of the time: anything TOML can say).
AGENT_SAMPLES: dict[str, st.SearchStrategy[Any]] = {
    "region": st.sampled_from(REGIONS),
    "proxy": st.sampled_from(["vsock:3:8000", "tcp:127.0.0.1:8000", "unix:/x", "http://x"]),
    "kms_endpoint": st.sampled_from(["https://127.0.0.1:4443/", "https://kms", "http://kms"]),
    "ca_bundle": st.sampled_from(["ca.pem", "/etc/ca.pem"]),
    "nsm": st.sampled_from(["simulated", "/dev/nsm", "fake"]),
    "log_level": st.sampled_from(LEVELS),
    "trusted_keys": st.sampled_from(
        [[KEY_ARN], [], ["arn:aws:kms:eu-west-2:444455556666:key/*"], ["alias/app"]]
    ),
    "simulated_nsm.pcrs": st.sampled_from([{"0": "ab" * 48}, {"16": "00" * 48}, {"²": "0"}]),
    "listen.socket": st.sampled_from(["agent.sock", "unix:/run/a.sock"]),
    "listen.socket_mode": st.sampled_from(["0600", "0666", 0o640, "rw"]),
    "listen.socket_group": st.integers(-1, 2**32),
    "listen.tcp": st.sampled_from(["tcp:127.0.0.1:9000", "tcp:localhost:0", "tcp:0.0.0.0:1"]),
    "listen.tcp_open": st.sampled_from([True, False, "true", 1]),
    "run.sdk_env": st.sampled_from([True, False, "false", 0]),
    "access.allowed_uids": st.lists(st.integers(-1, 2**32), max_size=3),
    "secrets.<NAME>.ciphertext": st.sampled_from(["AQJjaXBoZXJ0ZXh0", "!!!"]),
    "secrets.<NAME>.ciphertext_file": st.sampled_from(["blob.bin", "/does/not/exist"]),
    "secrets.<NAME>.key_id": st.sampled_from([KEY_ARN, "alias/app"]),
    "secrets.<NAME>.encryption_context": st.sampled_from([{"app": "billing"}, {"a": 1}]),
    "secrets.<NAME>.file": st.sampled_from(["/run/s/a", "/run/s/b", "copy"]),
} | {row.key: COUNTS for row in reference(AgentConfig) if row.key.startswith("limits.")}
PROXY_SAMPLES: dict[str, st.SearchStrategy[Any]] = {
    "listen": st.sampled_from(["tcp:127.0.0.1:0", "vsock:ANY:8000", "tcp:10.0.0.1:1"]),
    "allow": st.sampled_from([["kms.*.amazonaws.com:443"], ["127.0.0.1:1"], ["*.com:443"]]),
    "region": st.sampled_from(REGIONS),
    "max_tunnels": st.integers(0, 2000),
    "max_tunnels_per_peer": st.integers(0, 2000),
    "allowed_cids": st.lists(st.integers(-1, 20), max_size=3),
    "assume_role_arn": st.sampled_from(["arn:aws-cn:iam::123456789012:role/r", "role"]),
    "sts_endpoint": st.sampled_from(["https://sts.local", "sts.local"]),
    "log_level": st.sampled_from(LEVELS),
}

_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.booleans(),
)
_anything = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def _put(document: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, key = dotted.split(".")
    for name in tables:
        inner = document.setdefault(name, {})
        if not isinstance(inner, dict):
            return  # a scalar already holds that name
        document = inner
    document[key] = value


@st.composite
def documents(
    draw: st.DrawFn, cls: type, samples: dict[str, st.SearchStrategy[Any]], required: str = ""
) -> str:
    """A TOML document of ``cls``'s keys (tables as inline tables), some unknown; the
    ``required`` key mostly present, with a plausible value."""
    keys = [row.key for row in reference(cls)]
    keys += sorted({key.split(".")[0] for key in keys} | {"other", "limits.other"})
    document: dict[str, Any] = {}
    if required and draw(st.integers(0, 9)):
        document[required] = draw(samples[required])
    for key in draw(st.lists(st.sampled_from(keys), max_size=8, unique=True)):
        name = draw(st.sampled_from(["db", "api-key", "../x"]))
        value = draw(samples[key] | _anything if key in samples else _anything)
        _put(document, key.replace("<NAME>", name), value)
    return "\n".join(f"{_toml(key)} = {_toml(value)}" for key, value in document.items())


_audited: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _audited is not None and event == "open":
        _audited.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks stay for the process; this one records only within:


@contextmanager
def files_opened() -> Iterator[list[str]]:
    """The files opened in the block (the interpreter's own "open" audit events)."""
    global _audited
    _audited = opened = []
    try:
        yield opened
    finally:
        _audited = None


def _parses_or_names_the_key(parse: Callable[[], Any]) -> Any:
    with files_opened() as opened:
        try:
            return parse()
        except ConfigError as exc:
            named = exc.key is None or exc.key in str(exc) or repr(exc.key) in str(exc)
            assert named, (exc.key, str(exc))
            return None
        finally:
            assert opened == []


@settings(max_examples=400, deadline=None)
@given(documents(AgentConfig, AGENT_SAMPLES, required="region"))
# A PCR index that str.isdigit() accepts and int() does not: a bare ValueError once.
@example('region = "us-east-1"\nnsm = "simulated"\nsimulated_nsm = { pcrs = { "²" = "0" } }')
def test_agent_documents_parse_or_name_the_key(text: str) -> None:
    config = _parses_or_names_the_key(lambda: parse_config(text, base_dir=Path("/etc/agent")))
    if config is None:
        return
    limits = config.limits
    assert limits.max_connections_per_uid < limits.max_connections
    assert limits.max_kms_calls_per_uid < limits.kms_pool_size
    assert config.listen.socket_mode & 0o007 == 0
    for secret in config.secrets.values():
        assert bool(secret.ciphertext) != (secret.ciphertext_file is not None)


@settings(max_examples=300, deadline=None)
@given(documents(ProxyConfig, PROXY_SAMPLES))
def test_proxy_documents_parse_or_name_the_key(text: str) -> None:
    config = _parses_or_names_the_key(lambda: build_config(parse_proxy_config(text), CliOptions()))
    if config is None:
        return
    assert config.max_tunnels_per_peer < config.max_tunnels
    effective_allowlist(config, "us-east-1")


def test_the_agent_parser_reads_no_file_and_load_config_reads_the_ciphertexts(
    tmp_path: Path,
) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00raw")
    (tmp_path / "empty.bin").write_bytes(b"")
    head = f'region = "eu-west-2"\ntrusted_keys = ["{KEY_ARN}"]\nca_bundle = "ca.pem"\n'
    secrets = '[secrets.a]\nciphertext_file = "blob.bin"\n'
    with files_opened() as opened:
        config = parse_config(head + secrets, base_dir=tmp_path)
    assert opened == []
    assert config.secrets["a"].ciphertext_file == tmp_path / "blob.bin"
    assert config.secrets["a"].ciphertext == b""  # not read yet

    path = tmp_path / "agent.toml"
    path.write_text(head + secrets)
    assert load_config(path).secrets["a"].ciphertext == b"\x00raw"
    for blob, message in [
        ("/does/not/exist", r"agent.toml: secrets.b.ciphertext_file: \[Errno 2\] No such file"),
        ("empty.bin", "agent.toml: secrets.b: the ciphertext is empty"),
    ]:
        path.write_text(f'{head}{secrets}[secrets.b]\nciphertext_file = "{blob}"\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path)

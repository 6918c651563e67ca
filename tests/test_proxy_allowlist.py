"""The allowlist matcher and the config loader: examples plus hypothesis on both parsers."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_common.address import TcpAddress, VsockAddress
from proxy.allowlist import Allowlist, AllowlistError, is_guarded, parse_entry, parse_target
from proxy.config import (
    CliOptions,
    ConfigError,
    build_config,
    default_allow_entries,
    effective_allowlist,
    parse_config_text,
)
from tests.support.fuzzing import parsed_or_refused


def allows(entries: list[str], target: str) -> bool:
    return Allowlist.from_strings(entries).permits_target(parse_target(target))


@pytest.mark.parametrize(
    ("entries", "target", "expected"),
    [
        (["kms.us-east-1.amazonaws.com:443"], "kms.us-east-1.amazonaws.com:443", True),
        (["kms.us-east-1.amazonaws.com:443"], "KMS.US-EAST-1.amazonaws.com.:443", True),
        (["kms.us-east-1.amazonaws.com:443"], "kms.us-east-1.amazonaws.com:444", False),
        (["kms.us-east-1.amazonaws.com:443"], "kms.us-east-2.amazonaws.com:443", False),
        (["kms.*.amazonaws.com:443"], "kms.eu-west-3.amazonaws.com:443", True),
        (["kms.*.amazonaws.com:443"], "kms.a.b.amazonaws.com:443", False),  # one label only
        (["kms.*.amazonaws.com:443"], "kms..amazonaws.com:443", None),
        (["kms.*.amazonaws.com:443"], "evil.com:443", False),
        (["kms.*.amazonaws.com:443"], "kms.x.amazonaws.com.evil.com:443", False),
        (["*.amazonaws.com:443"], "amazonaws.com:443", False),
        (["127.0.0.1:4443"], "127.0.0.1:4443", True),
        (["127.0.0.1:4443"], "127.0.0.2:4443", False),
        (["[::1]:4443"], "[0:0::1]:4443", True),
        (["*.0.0.1:443"], "127.0.0.1:443", None),  # numeric last label: never a name
        (["a.example.com:443"], "[::ffff:10.0.0.1]:443", False),
        (["10.0.0.1:443"], "[::ffff:10.0.0.1]:443", True),  # mapped form is the same address
    ],
)
def test_matching(entries: list[str], target: str, expected: bool | None) -> None:
    if expected is None:
        with pytest.raises(AllowlistError):
            allows(entries, target)
    else:
        assert allows(entries, target) is expected


@pytest.mark.parametrize(
    "text",
    [
        "127.1:443",
        "2130706433:443",
        "0x7f.1:443",
        "0x7f000001:443",
        "0X7F000001:443",
        "017700000001:443",
        "[fe80::1%eth0]:443",
        "[::1%lo]:443",
    ],
)
def test_address_forms_getaddrinfo_would_accept_are_never_names(text: str) -> None:
    """inet_aton reads 0x7f000001, 2130706433, 127.1 as 127.0.0.1: such a "name" must
    not be listed or requested as one. Zone ids pick an interface of the parent: refused."""
    with pytest.raises(AllowlistError):
        parse_target(text)
    with pytest.raises(AllowlistError):
        parse_entry(text)


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "host",
        "host:",
        ":443",
        "host:0",
        "host:65536",
        "host:-1",
        "h*st.example.com:443",
        "*.com:443",
        "*.*.com:443",
        "example.*:443",
        "bad_label-.com:443",
        "[::1:443",
        "::1:443",
        "exa mple.com:443",
        "ex\u00e4mple.com:443",
        "a..b:443",
        "host:44 3",
        "[nothex]:1",
        "a." * 130 + "com:443",
        "host:\u0661\u0662",
    ],
)
def test_bad_entries(entry: str) -> None:
    with pytest.raises(AllowlistError):
        parse_entry(entry)


@pytest.mark.parametrize(
    ("address", "guarded"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("169.254.169.254", True),
        ("169.254.1.1", True),
        ("0.0.0.0", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fd00:ec2::254", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("10.0.0.1", False),
        ("52.94.1.1", False),
        ("2600:1f18::1", False),
        ("fd00:ec2::253", True),  # Amazon DNS (IPv6), like 169.254.169.253
        ("fd00:ec2::123", True),  # Amazon Time Sync (IPv6), like 169.254.169.123
        ("fd00:ec2::1", False),
        ("224.0.0.1", True),
        ("239.255.255.250", True),
        ("255.255.255.255", True),
        ("ff02::1", True),
        ("::ffff:224.0.0.1", True),
    ],
)
def test_guarded_addresses(address: str, guarded: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert is_guarded(ip) is guarded
    allowlist = Allowlist.from_strings(["name.example.com:443"])
    assert allowlist.permits_address(ip, 443) is (not guarded)


def test_exactly_listed_guarded_address_is_permitted() -> None:
    allowlist = Allowlist.from_strings(["127.0.0.1:4443", "[fd00:ec2::254]:80"])
    assert allowlist.permits_address(ipaddress.ip_address("127.0.0.1"), 4443)
    assert not allowlist.permits_address(ipaddress.ip_address("127.0.0.1"), 4444)
    assert allowlist.permits_address(ipaddress.ip_address("fd00:ec2::254"), 80)
    assert not allowlist.permits_address(ipaddress.ip_address("169.254.169.254"), 80)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=2, max_size=5), st.integers(1, 65535), st.data())
def test_pattern_with_wildcards_matches_its_instances(
    labels: list[str], port: int, data: st.DataObject
) -> None:
    if re.fullmatch(r"[0-9]+|0x[0-9a-f]+", labels[-1]):  # numeric: an address, not a name
        labels[-1] = labels[-1] + "x"
    name = ".".join(labels)
    # Replace some non-final labels with '*' while keeping two literal ones.
    wild = [i for i in range(len(labels) - 1) if data.draw(st.booleans()) and len(labels) - i > 0]
    pattern = [("*" if i in wild else label) for i, label in enumerate(labels)]
    if len(pattern) - pattern.count("*") < 2:
        pattern = labels
    allowlist = Allowlist.from_strings([f"{'.'.join(pattern)}:{port}"])
    assert allowlist.permits_target(parse_target(f"{name}:{port}"))
    assert allowlist.permits_target(parse_target(f"{name.upper()}.:{port}"))
    assert not allowlist.permits_target(parse_target(f"{name}:{port % 65535 + 1}"))
    assert not allowlist.permits_target(parse_target(f"x{name}.evil.example:{port}"))


@given(st.text(max_size=80))
def test_parsers_never_raise_anything_but_their_error(text: str) -> None:
    for parse in (parse_entry, parse_target):
        try:
            target = parse(text)
        except AllowlistError:
            continue
        assert 1 <= target.port <= 65535
        # What was accepted round-trips through its printed form.
        assert parse(str(target)) == target


@given(st.ip_addresses(), st.integers(1, 65535))
def test_ip_literal_targets_need_an_exact_entry(ip: ipaddress._BaseAddress, port: int) -> None:
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    target = parse_target(text)
    assert Allowlist.from_strings([text]).permits_target(target)
    assert not Allowlist.from_strings(["name.example.com:443"]).permits_target(target)


# --- config ---------------------------------------------------------------------------


def test_full_config_and_cli_merge() -> None:
    settings = parse_config_text(
        """
listen = "tcp:127.0.0.1:8000"
allow = ["kms.*.amazonaws.com:443"]
region = "eu-west-1"
connect_timeout = 3
idle_timeout = 60.5
header_timeout = 5
drain_timeout = 10
max_tunnels = 64
max_tunnels_per_peer = 16
allowed_cids = [16, 17]
assume_role_arn = "arn:aws:iam::123456789012:role/enclave-kms"
sts_endpoint = "https://sts.eu-west-1.amazonaws.com"
log_level = "debug"
"""
    )
    config = build_config(
        settings, CliOptions(listen="vsock:ANY:9000", allow=["127.0.0.1:4443"], region="us-west-2")
    )
    assert config.listen == VsockAddress(0xFFFFFFFF, 9000)
    assert config.allow == ("kms.*.amazonaws.com:443", "127.0.0.1:4443")
    assert config.region == "us-west-2"
    assert config.connect_timeout == 3.0 and config.max_tunnels == 64
    assert config.max_tunnels_per_peer == 16
    assert config.allowed_cids == frozenset({16, 17})
    assert config.log_level == "debug"


def test_defaults() -> None:
    config = build_config({}, CliOptions())
    assert config.listen == VsockAddress(0xFFFFFFFF, 8000)
    assert config.max_tunnels == 1024 and config.allow == ()
    assert config.max_tunnels_per_peer == 256
    assert effective_allowlist(config, "us-east-1").describe() == list(
        default_allow_entries("us-east-1")
    )
    with pytest.raises(ConfigError, match="no region"):
        effective_allowlist(config, None)
    dev = build_config({}, CliOptions(listen="tcp:127.0.0.1:0", allow=["127.0.0.1:1"]))
    assert dev.listen == TcpAddress("127.0.0.1", 0)
    assert effective_allowlist(dev, None).describe() == ["127.0.0.1:1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow = [", "not valid TOML"),
        ("alow = []", "unknown setting 'alow'"),
        ('allow = "x:1"', "allow: expected a list"),
        ('allow = ["nope"]', r"allow\[0\]"),
        ("allow = [1]", r"allow\[0\]: expected a string"),
        ('region = "moon"', "region"),
        ("max_tunnels = 0", "max_tunnels"),
        ("max_tunnels = true", "max_tunnels: expected an integer"),
        ("max_tunnels_per_peer = 0", "max_tunnels_per_peer"),
        ('listen = "tcp:0.0.0.0:8000"', "tcp:0.0.0.0:8000 is not a loopback address"),
        ('listen = "tcp:[::]:8000"', r"tcp:\[::\]:8000 is not a loopback address"),
        ('listen = "tcp:[::ffff:10.0.0.1]:8000"', "not a loopback address"),
        ('listen = "tcp:10.0.0.1:8000"', "hands the role's AWS credentials to whoever connects"),
        ("connect_timeout = -1", "connect_timeout"),
        ("connect_timeout = nan", "connect_timeout"),
        ('idle_timeout = "5"', "idle_timeout: expected a number"),
        ('listen = "http://x"', "listen"),
        ("allowed_cids = [-1]", r"allowed_cids\[0\]"),
        ('assume_role_arn = "role"', "assume_role_arn"),
        ('sts_endpoint = "sts.local"', "sts_endpoint"),
        ('log_level = "loud"', "log_level"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config_text(text)


def test_a_share_per_peer_must_stay_below_the_whole() -> None:
    # As large as max_tunnels, one peer at its share would refuse every other peer.
    with pytest.raises(ConfigError, match=r"max_tunnels_per_peer \(256\) must be smaller"):
        build_config(
            parse_config_text("max_tunnels = 256\nmax_tunnels_per_peer = 256"), CliOptions()
        )
    config = build_config(
        parse_config_text("max_tunnels = 8\nmax_tunnels_per_peer = 7"), CliOptions()
    )
    assert (config.max_tunnels, config.max_tunnels_per_peer) == (8, 7)


@pytest.mark.parametrize(
    ("max_tunnels", "per_peer"), [(1024, 256), (100_000, 256), (512, 256), (256, 128), (3, 1)]
)
def test_an_unset_share_per_peer_is_derived_from_the_whole(max_tunnels: int, per_peer: int) -> None:
    # A config written before the share existed keeps starting: the share is the
    # default or half of max_tunnels, whichever is smaller.
    config = build_config(parse_config_text(f"max_tunnels = {max_tunnels}"), CliOptions())
    assert config.max_tunnels_per_peer == per_peer
    # A whole of one leaves no share smaller than it.
    with pytest.raises(ConfigError, match="max_tunnels must be an integer between 2 and"):
        parse_config_text("max_tunnels = 1")


def test_listen_addresses_on_loopback_vsock_and_unix_are_accepted() -> None:
    for listen in (
        "tcp:127.0.0.1:8000",
        "tcp:127.8.0.1:8000",
        "tcp:[::1]:8000",
        "tcp:[::ffff:127.0.0.1]:8000",
        "tcp:localhost:8000",  # a name: judged by what it resolves to once bound
        "vsock:ANY:8000",
        "unix:/run/enclave-proxy.sock",
    ):
        assert str(build_config({}, CliOptions(listen=listen)).listen) == listen


def test_cli_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match="--allow"):
        build_config({}, CliOptions(allow=["*.com:443"]))
    with pytest.raises(ConfigError, match="--region"):
        build_config({}, CliOptions(region="US-EAST-1"))
    with pytest.raises(ConfigError, match="--listen"):
        build_config({}, CliOptions(listen="tcp:1.2.3.4"))
    with pytest.raises(ConfigError, match="--listen: tcp:1.2.3.4:80 is not a loopback"):
        build_config({}, CliOptions(listen="tcp:1.2.3.4:80"))


@given(st.text(max_size=200))
def test_config_parser_only_raises_config_error(text: str) -> None:
    settings = parsed_or_refused(parse_config_text, text, ConfigError)
    if settings is not None:
        build_config(settings, CliOptions())


_toml_value = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=30).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.lists(st.text(max_size=20), max_size=3).map(
        lambda xs: (
            "["
            + ", ".join('"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"' for x in xs)
            + "]"
        )
    ),
)
_keys = st.sampled_from(
    [
        "listen",
        "allow",
        "region",
        "connect_timeout",
        "idle_timeout",
        "header_timeout",
        "drain_timeout",
        "max_tunnels",
        "max_tunnels_per_peer",
        "allowed_cids",
        "assume_role_arn",
        "sts_endpoint",
        "log_level",
        "other",
    ]
)


@given(st.dictionaries(_keys, _toml_value, max_size=5))
def test_structured_configs_only_raise_config_error(doc: dict[str, str]) -> None:
    text = "\n".join(f"{k} = {v}" for k, v in doc.items())
    try:
        settings = parse_config_text(text)
        config = build_config(settings, CliOptions())  # (a share as large as its whole)
    except ConfigError:
        return
    try:
        effective_allowlist(config, "us-east-1")
    except ConfigError:
        pytest.fail("a config that parsed must yield an allowlist")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('metrics_listen = "tcp:0.0.0.0:9464"', "metrics name the enclaves"),
        ('metrics_listen = "vsock:ANY:9464"', "must be a tcp: address on loopback"),
        ('metrics_listen = "unix:/run/metrics.sock"', "must be a tcp: address on loopback"),
    ],
)
def test_metrics_are_served_on_a_loopback_tcp_port_only(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_config_text(text)

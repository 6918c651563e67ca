import base64
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_agent.runtime.config import (
    DEFAULT_SOCKET,
    ConfigError,
    load_config,
    parse_config,
    store_endpoint,
)
from enclave_agent.runtime.sealed import MAX_SEALED_BYTES
from enclave_agent.runtime.store_location import FileLocation
from enclave_common.address import TcpAddress, VsockAddress
from tests.support.fuzzing import parsed_or_refused

BLOB = base64.b64encode(b"\x01\x02ciphertext").decode()
KEY_ARN = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_minimal_config_has_safe_defaults() -> None:
    config = parse_config('region = "us-east-1"')
    assert config.region == "us-east-1"
    assert config.proxy == VsockAddress(3, 8000)
    assert config.nsm == "/dev/nsm"
    assert config.listen.socket == DEFAULT_SOCKET
    assert config.listen.socket_mode == 0o660
    assert config.listen.tcp is None
    assert not config.listen.tcp_open  # no inet_diag: a set tcp does not start
    assert config.run.sdk_env
    assert config.kms_endpoint is None
    assert not config.secrets
    assert not config.trusted_keys  # secure by default: no key operation


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00raw")
    text = f"""
region = "eu-west-2"
proxy = "tcp:127.0.0.1:8000"
kms_endpoint = "https://127.0.0.1:4443/"
ca_bundle = "ca.pem"
nsm = "simulated"
log_level = "debug"
trusted_keys = ["{KEY_ARN}", "arn:aws:kms:eu-west-2:444455556666:key/*"]

[simulated_nsm]
ca_dir = "ca"
pcrs = {{ 0 = "{"ab" * 48}" }}
fail_with = "InternalError"

[listen]
socket = "agent.sock"
socket_mode = "0600"
socket_group = 1000
tcp = "tcp:127.0.0.1:9000"
tcp_open = true

[run]
sdk_env = false

[access]
allowed_uids = [0, 1000]
allowed_gids = [50]

[limits]
max_body_bytes = 1024
header_timeout = 2

[secrets.db]
ciphertext = "{BLOB}"
key_id = "alias/app"
encryption_context = {{ app = "billing" }}
file = "/run/secrets/db"

[secrets.api-key]
ciphertext_file = "blob.bin"
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.proxy == TcpAddress("127.0.0.1", 8000)
    assert config.kms_endpoint == "https://127.0.0.1:4443"
    assert config.ca_bundle == str(tmp_path / "ca.pem")
    assert config.simulated_nsm.ca_dir == tmp_path / "ca"
    assert config.simulated_nsm.pcrs == {0: b"\xab" * 48}
    assert config.simulated_nsm.fail_with == "InternalError"
    assert config.listen.socket == str(tmp_path / "agent.sock")
    assert config.listen.socket_mode == 0o600
    assert config.listen.socket_group == 1000
    assert config.listen.tcp == TcpAddress("127.0.0.1", 9000)
    assert config.listen.tcp_open and not config.run.sdk_env
    assert config.access.allowed_uids == {0, 1000}
    assert config.access.allowed_gids == {50}
    assert config.limits.max_body_bytes == 1024
    assert config.limits.header_timeout == 2.0
    assert config.secrets["db"].ciphertext == b"\x01\x02ciphertext"
    assert config.secrets["db"].encryption_context == {"app": "billing"}
    assert config.secrets["db"].file == Path("/run/secrets/db")
    assert config.secrets["api-key"].ciphertext == b"\x00raw"
    assert [str(entry) for entry in config.trusted_keys.entries] == [
        KEY_ARN,
        "arn:aws:kms:eu-west-2:444455556666:key/*",
    ]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('region = "us-east-1"\nregoin = "x"', ["regoin"]),
        ('region = "us-east-1"\n[access]\nalowed_uids = [1]\nextra = 2', ["alowed_uids", "extra"]),
        ('region = "us-east-1"\n[limits]\nmax_body = 3', ["max_body"]),
        ('region = "us-east-1"\n[run]\nsdk_envs = false', ["sdk_envs"]),
        (f'region = "us-east-1"\n[secrets.a]\nciphertext = "{BLOB}"\nkeyid = "k"', ["keyid"]),
    ],
)
def test_unknown_keys_are_named(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    for name in names:
        assert name in str(info.value)
    assert "unknown key" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "region = 3",
        'region = "nowhere"',
        'region = "us-east-1"\nproxy = "http://x"',
        'region = "us-east-1"\nkms_endpoint = "http://kms"',
        'region = "us-east-1"\nnsm = "fake"',
        'region = "us-east-1"\n[simulated_nsm]\nca_dir = "x"',
        'region = "us-east-1"\nnsm = "simulated"\n[simulated_nsm]\npcrs = { 0 = "ab" }',
        'region = "us-east-1"\nnsm = "simulated"\n[simulated_nsm]\npcrs = { 16 = "'
        + "00" * 48
        + '"}',
        'region = "us-east-1"\n[listen]\nsocket_mode = "0666"',
        'region = "us-east-1"\n[listen]\nsocket_mode = "rw"',
        'region = "us-east-1"\n[listen]\nsocket_group = "staff"',
        'region = "us-east-1"\n[listen]\nsocket_group = 4294967295',
        'region = "us-east-1"\n[listen]\ntcp = "tcp:0.0.0.0:9000"',
        'region = "us-east-1"\n[listen]\ntcp = "unix:/x"',
        'region = "us-east-1"\n[listen]\ntcp_open = "yes"',
        'region = "us-east-1"\n[listen]\ntcp_open = 1',
        'region = "us-east-1"\n[run]\nsdk_env = "false"',
        'region = "us-east-1"\n[access]\nallowed_uids = ["root"]',
        'region = "us-east-1"\n[limits]\nmax_body_bytes = 0',
        'region = "us-east-1"\n[limits]\nmax_body_bytes = true',
        'region = "us-east-1"\n[limits]\nheader_timeout = nan',
        'region = "us-east-1"\n[limits]\nidle_timeout = inf',
        f'region = "us-east-1"\n[secrets.a]\nciphertext = "{BLOB}"\nfile = "/run/s/x"\n'
        f'[secrets.b]\nciphertext = "{BLOB}"\nfile = "/run/s/x"',
        'region = "us-east-1"\n[secrets.a]\nkey_id = "k"',
        'region = "us-east-1"\n[secrets.a]\nciphertext = "!!!"',
        f'region = "us-east-1"\n[secrets."../x"]\nciphertext = "{BLOB}"',
        f'region = "us-east-1"\n[secrets.a]\nciphertext = "{BLOB}"\nciphertext_file = "f"',
        'region = "us-east-1"\n[secrets.a]\nciphertext_file = "/does/not/exist"',
        "region = [",
    ],
)
def test_bad_configs_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_per_uid_shares_default_and_must_stay_below_their_whole() -> None:
    limits = parse_config('region = "us-east-1"').limits
    assert (limits.max_connections_per_uid, limits.max_kms_calls_per_uid) == (64, 8)
    limits = parse_config(
        'region = "us-east-1"\n[limits]\nmax_connections = 10\nmax_connections_per_uid = 9\n'
        "kms_pool_size = 3\nmax_kms_calls_per_uid = 2"
    ).limits
    assert (limits.max_connections_per_uid, limits.max_kms_calls_per_uid) == (9, 2)
    # A share as large as its whole would let one uid take every connection or KMS call.
    for text, message in [
        (
            "max_connections = 16\nmax_connections_per_uid = 64",
            r"limits.max_connections_per_uid \(64\) must be smaller than "
            r"limits.max_connections \(16\)",
        ),
        (
            "kms_pool_size = 4\nmax_kms_calls_per_uid = 4",
            r"limits.max_kms_calls_per_uid \(4\) must be smaller than limits.kms_pool_size \(4\)",
        ),
        ("max_connections_per_uid = 0", "limits.max_connections_per_uid must be a positive"),
        ("max_kms_calls_per_uid = 1.5", "limits.max_kms_calls_per_uid must be a positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(f'region = "us-east-1"\n[limits]\n{text}')


@pytest.mark.parametrize(
    ("limits", "per_uid"),
    [
        ("max_connections = 32", (16, 8)),  # refused before the shares were derived
        ("max_connections = 100000", (64, 8)),
        ("max_connections = 2\nkms_pool_size = 3", (1, 1)),
        ("kms_pool_size = 4", (64, 2)),
        ("kms_pool_size = 64", (64, 8)),
    ],
)
def test_unset_per_uid_shares_are_derived_from_their_whole(
    limits: str, per_uid: tuple[int, int]
) -> None:
    # A config that sets only the whole keeps starting: each share is its default or
    # half the whole, whichever is smaller; one set explicitly is still checked.
    config = parse_config(f'region = "us-east-1"\n[limits]\n{limits}').limits
    assert (config.max_connections_per_uid, config.max_kms_calls_per_uid) == per_uid
    for whole in ("max_connections", "kms_pool_size"):
        with pytest.raises(ConfigError, match=f"limits.{whole} must be an integer of at least 2"):
            parse_config(f'region = "us-east-1"\n[limits]\n{whole} = 1')


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


@given(st.text(max_size=300))
def test_arbitrary_text_gives_config_or_config_error(text: str) -> None:
    parsed_or_refused(parse_config, text, ConfigError)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"' + KEY_ARN + '"', "trusted_keys must be a list of key ARNs"),
        ('["alias/app"]', "trusted_keys[0]: 'alias/app' is an alias"),
        (
            '["arn:aws:kms:eu-west-2:111122223333:alias/app"]',
            "trusted_keys[0]: 'arn:aws:kms:eu-west-2:111122223333:alias/app' is an alias",
        ),
        ('["1234abcd-12ab-34cd-56ef-1234567890ab"]', "is a bare key id"),
        (f'["{KEY_ARN}", "arn:aws:kms:eu-west-2:1111:key/*"]', "trusted_keys[1]: "),
        ("[3]", "trusted_keys[0]: expected a key ARN"),
        ('["arn:aws:kms:eu-west-2:111122223333:key/ab*"]', "key/* alone stands for"),
    ],
)
def test_trusted_keys_that_are_not_keys_or_accounts_are_config_errors(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'region = "eu-west-2"\ntrusted_keys = {value}\n')
    assert why in str(info.value)


def test_named_secrets_need_trusted_keys() -> None:
    secret = f'[secrets.db]\nciphertext = "{BLOB}"\nkey_id = "alias/app"\n'
    for trusted in ("", "trusted_keys = []\n"):
        with pytest.raises(ConfigError) as info:
            parse_config(f'region = "eu-west-2"\n{trusted}{secret}')
        assert "[secrets.db]" in str(info.value) and "need trusted_keys" in str(info.value)
    config = parse_config(f'region = "eu-west-2"\ntrusted_keys = ["{KEY_ARN}"]\n{secret}')
    assert config.secrets["db"].key_id == "alias/app"  # its answer's key is checked


def test_a_named_secret_under_an_untrusted_key_arn_is_a_config_error() -> None:
    other = KEY_ARN.replace("111122223333", "999988887777")
    with pytest.raises(ConfigError) as info:
        parse_config(
            f'region = "eu-west-2"\ntrusted_keys = ["{KEY_ARN}"]\n'
            f'[secrets.db]\nciphertext = "{BLOB}"\nkey_id = "{other}"\n'
        )
    assert f"secrets.db.key_id: key {other} is not in the agent's trusted_keys" in str(info.value)


def test_attestation_reuse_seconds() -> None:
    assert parse_config('region = "us-east-1"').limits.attestation_reuse_seconds == 300.0
    for value, expected in (("0", 0.0), ("60", 60.0), ("3600", 3600.0), ("12.5", 12.5)):
        limits = parse_config(
            f'region = "us-east-1"\n[limits]\nattestation_reuse_seconds = {value}'
        ).limits
        assert limits.attestation_reuse_seconds == expected
    for bad in ("-1", "3601", "nan", "inf", "true", '"300"'):
        with pytest.raises(ConfigError, match=r"limits\.attestation_reuse_seconds"):
            parse_config(f'region = "us-east-1"\n[limits]\nattestation_reuse_seconds = {bad}')


SM_ARN = "arn:aws:secretsmanager:us-east-1:111122223333:secret:app/db-AbCdEf"
SSM_ARN = "arn:aws:ssm:us-east-1:111122223333:parameter/app/db"
STORE_HEAD = 'region = "us-east-1"\ntrusted_keys = ["arn:aws:kms:us-east-1:111122223333:key/*"]\n'


def test_secrets_read_from_stores() -> None:
    config = parse_config(
        STORE_HEAD
        + 'secretsmanager_endpoint = "https://127.0.0.1:4443/"\n'
        + f'[secrets.db]\nfrom = "secretsmanager:{SM_ARN}"\nrefresh = 60\nfile = "/run/s/db"\n'
        + f'[secrets.api]\nfrom = "ssm:{SSM_ARN}"\nrefresh = 30\nstale_after = 45\n'
        + '[secrets.tls]\nfrom = "s3://bucket/prod/tls"\nbucket_owner = "444455556666"\n'
    )
    db, api, tls = (config.secrets[name] for name in ("db", "api", "tls"))
    assert db.location is not None and db.location.arn is not None
    assert str(db.location.arn) == SM_ARN and not db.ciphertext
    assert (db.refresh, db.stale_seconds) == (60.0, 180.0)  # stale after 3 times refresh
    assert api.location is not None and str(api.location.arn) == SSM_ARN
    assert (api.refresh, api.stale_seconds) == (30.0, 45.0)
    assert str(tls.location) == "s3://bucket/prod/tls" and tls.bucket_owner == "444455556666"
    assert (tls.refresh, tls.stale_seconds) == (None, None)  # read once: never stale
    assert store_endpoint(config, "secretsmanager") == "https://127.0.0.1:4443"
    assert store_endpoint(config, "ssm") == "https://ssm.us-east-1.amazonaws.com"
    assert store_endpoint(config, "s3") == "https://s3.us-east-1.amazonaws.com"
    china = parse_config('region = "cn-north-1"')
    assert store_endpoint(china, "s3") == "https://s3.cn-north-1.amazonaws.com.cn"


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (
            'from = "secretsmanager:app/db"',
            "secrets.db.from: 'app/db': name the secret by its full ARN (arn:…:secretsmanager:"
            "REGION:ACCOUNT:secret:NAME-XXXXXX) (the parent chooses the credentials, hence the "
            "account a bare name resolves in",
        ),
        (
            f'from = "secretsmanager:{SM_ARN[:-7]}"',
            "the ARN lacks Secrets Manager's 6-character suffix",
        ),
        ('from = "ssm:/app/db"', "name the parameter by its ARN"),
        (
            'from = "file:db.sealed"\nrefresh = 60',
            "secrets.db.refresh applies to a secret read from a store: the image's files do "
            "not change, a file is read once, at start",
        ),
        ('from = "file:db.sealed"\nstale_after = 60', "secrets.db.stale_after applies to a"),
        (
            'from = "file:db.sealed"\nbucket_owner = "111122223333"',
            "bucket_owner applies to from = s3://... only",
        ),
        (
            'from = "file:db.sealed"\nencryption_context = { a = "b" }',
            'always opened with {"enclave-kms:secret" = "db"}',
        ),
        ('from = "file:"', "'file:': expected file:PATH"),
        ('from = "s3://bucket/key"', "secrets.db.bucket_owner is required with from = s3://"),
        (
            'from = "s3://bucket/key"\nbucket_owner = "1234"',
            "secrets.db.bucket_owner must be a 12-digit account id",
        ),
        (
            f'from = "ssm:{SSM_ARN}"\nbucket_owner = "111122223333"',
            "bucket_owner applies to from = s3://... only",
        ),
        (
            f'from = "ssm:{SSM_ARN.replace("us-east-1", "eu-west-1")}"',
            "names a resource in eu-west-1, but the agent reads its stores in its own region",
        ),
        (
            f'from = "ssm:{SSM_ARN}"\nciphertext = "{BLOB}"',
            "secrets.db needs exactly one of from, ciphertext, ciphertext_file",
        ),
        ('key_id = "k"', "secrets.db needs exactly one of from, ciphertext, ciphertext_file"),
        (
            f'from = "ssm:{SSM_ARN}"\nencryption_context = {{ a = "b" }}',
            'always opened with {"enclave-kms:secret" = "db"}',
        ),
        (f'ciphertext = "{BLOB}"\nrefresh = 60', "refresh applies to a secret read from a store"),
        (f'from = "ssm:{SSM_ARN}"\nrefresh = 0.5', "refresh must be a number between 1 and"),
        (f'from = "ssm:{SSM_ARN}"\nstale_after = 60', "stale_after needs refresh"),
        (
            f'from = "ssm:{SSM_ARN}"\nrefresh = 60\nstale_after = 60',
            "stale_after (60) must be more than refresh (60)",
        ),
        ('form = "ssm:x"', "unknown setting 'secrets.db.form'"),
    ],
)
def test_bad_store_secrets_are_refused_saying_why(secret: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"{STORE_HEAD}[secrets.db]\n{secret}\n")
    assert message in str(info.value)


def test_a_sealed_file_of_the_image_is_read_at_start(tmp_path: Path) -> None:
    """``from = "file:..."``: relative to the config's directory, read by load_config
    (parse_config only resolves the path), at most a sealed secret's largest size."""
    (tmp_path / "sealed").mkdir()
    (tmp_path / "sealed" / "tls").write_bytes(b"\xc5" * MAX_SEALED_BYTES)
    (tmp_path / "db").write_bytes(b"\x01sealed")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'{STORE_HEAD}[secrets.tls]\nfrom = "file:sealed/tls"\n'
        f'[secrets.db]\nfrom = "file:{tmp_path / "db"}"\nkey_id = "alias/db"\n'
    )
    parsed = parse_config(path.read_text(), base_dir=tmp_path)
    assert parsed.secrets["tls"].location == FileLocation(str(tmp_path / "sealed" / "tls"))
    assert not parsed.secrets["tls"].ciphertext  # the file is read at the edge only
    tls, db = load_config(path).secrets.values()
    assert tls.location == FileLocation(str(tmp_path / "sealed" / "tls"))
    assert tls.ciphertext == b"\xc5" * MAX_SEALED_BYTES
    assert (db.ciphertext, db.key_id, db.refresh) == (b"\x01sealed", "alias/db", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "secrets.tls.from: [Errno 2] No such file or directory: "),
        (b"", "secrets.tls: the ciphertext is empty"),
        (
            b"\xc5" * (MAX_SEALED_BYTES + 1),
            f"is over {MAX_SEALED_BYTES} bytes, the most a sealed secret can be",
        ),
    ],
)
def test_a_sealed_file_missing_empty_or_too_large_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "tls.sealed").write_bytes(content)
    path = tmp_path / "agent.toml"
    path.write_text(f'{STORE_HEAD}[secrets.tls]\nfrom = "file:tls.sealed"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: secrets.tls")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "line"), [("from", 'from = "file:{}"'), ("ciphertext_file", 'ciphertext_file = "{}"')]
)
def test_a_sealed_file_that_is_a_fifo_or_a_device_is_a_config_error_not_a_hang(
    tmp_path: Path, key: str, line: str
) -> None:
    """A FIFO never written to would block the start for ever on open; a device gives
    bytes that are no file of the image: only a regular file (through a symlink too),
    for a sealed file and a ciphertext_file alike."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    (tmp_path / "real").write_bytes(b"\x01sealed")
    (tmp_path / "good-link").symlink_to(tmp_path / "real")
    for name, target in [("fifo", "fifo"), ("link", "link"), ("device", "/dev/null")]:
        path = tmp_path / f"{name}.toml"
        path.write_text(f"{STORE_HEAD}[secrets.tls]\n{line.format(target)}\n")
        outcome: list[BaseException | None] = []

        def load(config: Path = path, into: list[BaseException | None] = outcome) -> None:
            try:
                load_config(config)
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                into.append(exc)
            else:
                into.append(None)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        loader.join(timeout=10)
        if loader.is_alive():  # blocked on the FIFO: a writer's open and close frees it
            os.close(os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK))
            loader.join(timeout=20)
            pytest.fail(f"load_config blocked on {line.format(target)}")
        [error] = outcome
        assert isinstance(error, ConfigError), error
        shown = target if target.startswith("/") else tmp_path / target
        assert f"secrets.tls.{key}: {shown} is not a regular file" in str(error)
    path = tmp_path / "good.toml"
    path.write_text(f"{STORE_HEAD}[secrets.tls]\n{line.format('good-link')}\n")
    assert load_config(path).secrets["tls"].ciphertext == b"\x01sealed"


def test_store_endpoints_must_be_https_urls() -> None:
    for key in ("secretsmanager_endpoint", "ssm_endpoint", "s3_endpoint"):
        with pytest.raises(ConfigError, match=f"{key}: 'http://x' is not an https://HOST"):
            parse_config(f'region = "us-east-1"\n{key} = "http://x"')


def test_the_log_channel_is_on_the_apps_output_off_by_default() -> None:
    config = parse_config('region = "us-east-1"')
    assert (config.logs.ship, config.logs.app_output, config.logs.buffer_bytes) == (
        True,
        False,
        256 * 1024,
    )
    assert config.metrics.push_interval == 60
    config = parse_config(
        'region = "us-east-1"\n[logs]\napp_output = true\nbuffer_bytes = 8192\n'
        "[metrics]\npush_interval = 0\n"
    )
    assert (config.logs.app_output, config.logs.buffer_bytes) == (True, 8192)
    assert config.metrics.push_interval == 0
    assert not parse_config('region = "us-east-1"\n[logs]\nship = false').logs.ship


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[logs]\nship = 1", "logs.ship: expected true or false"),
        ("[logs]\nship = false\napp_output = true", "app_output = true needs logs.ship"),
        ("[logs]\nbuffer_bytes = 10", "logs.buffer_bytes must be an integer between 4096"),
        ("[logs]\nbuffer_bytes = true", "logs.buffer_bytes: expected an integer"),
        ("[logs]\nshipping = true", "unknown setting 'logs.shipping'"),
        ("[metrics]\npush_interval = 0.5", "push_interval must be 0 \\(never\\) or a number"),
        ("[metrics]\npush_interval = nan", "push_interval must be 0"),
        ("[metrics]\ninterval = 5", "unknown setting 'metrics.interval'"),
    ],
)
def test_bad_log_and_metrics_settings_are_refused(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_config(f'region = "us-east-1"\n{text}')

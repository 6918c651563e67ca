"""How both processes declare and read their settings: TOML in, frozen dataclasses out.

Mechanics only; which keys exist, their defaults and what a value may be are each
process's policy. A setting is declared once, on the dataclass field that holds it::

    max_tunnels: int = setting(integer(2, 1_000_000), "connections open at once", default=1024)

which gives its name, type, default, check and the line the configuration reference
shows for it (``reference``; scripts/config-reference writes the docs' tables).
``read_document`` reads a TOML document (``read_settings`` one table of it): a key no
field declares is refused with its name (a misspelt ``max_tunels`` must never fall
back to the default), each value is checked, and every problem is one ``ConfigError``
naming the offending key.
``build`` makes the dataclass: defaults for the rest, and a per-caller share
(``share_of``) derived from its whole when it is not set. Pure, no I/O.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from enclave_common.address import Address, AddressError, parse_address
from enclave_common.aws import is_region
from enclave_common.logs import LEVELS

T = TypeVar("T")
_QUOTED = 80  # a value quoted in a message is cut to this many characters
_SETTING = "enclave_common.config"  # the dataclass field metadata key


class ConfigError(ValueError):
    """A setting that cannot be used, with the reason; ``key`` names it (None: the
    document as a whole, e.g. not TOML)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def within(self, source: str) -> ConfigError:
        """The same error, said of the file or option ``source``."""
        return ConfigError(f"{source}: {self}", self.key)


@dataclass(frozen=True)
class At:
    """Where a value sits: its key as messages name it (``limits.max_connections``,
    ``allow[0]``, ``--region``) and the directory relative paths start from."""

    key: str = ""
    base_dir: Path = field(default_factory=Path)

    def child(self, name: str) -> At:
        return At(f"{self.key}.{name}" if self.key else name, self.base_dir)

    def item(self, index: int) -> At:
        return At(f"{self.key}[{index}]", self.base_dir)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(f"{self.key}: {reason}", self.key)

    def wrong_type(self, expected: str, value: Any) -> ConfigError:
        return self.error(f"expected {expected}, got {type(value).__name__}")

    def must_be(self, rule: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.key} must be {rule}, got {quoted(value)}", self.key)


def quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTED else text[:_QUOTED] + "..."


Check = Callable[[Any, At], T]


@dataclass(frozen=True)
class Share:
    """A per-caller share of the setting ``whole`` (a uid's, a peer's). Set, it must be
    smaller than the whole, so that one caller at its share never takes all of it;
    not set, it is the field's default or half the whole, whichever is smaller."""

    whole: str
    caller: str


@dataclass(frozen=True)
class Setting:
    check: Check[Any]
    doc: str
    shown: str | None  # the reference's default column, where the value alone misleads
    share: Share | None
    key: str | None  # the TOML key, where the field cannot be named so (``from``)


def setting(
    check: Check[Any],
    doc: str = "",
    *,
    default: Any = MISSING,
    factory: Callable[[], Any] | None = None,
    shown: str | None = None,
    share_of: Share | None = None,
    key: str | None = None,
) -> Any:
    """A dataclass field that is a setting (no default and no factory: required).
    ``key``: its TOML key when that is not the field's name (a Python keyword)."""
    metadata = {_SETTING: Setting(check, doc, shown, share_of, key)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _settings(cls: type) -> Iterator[tuple[Any, Setting]]:
    for item in fields(cls):
        if _SETTING in item.metadata:
            yield item, item.metadata[_SETTING]


def _key(item: Any, meta: Setting) -> str:
    """The setting's TOML key."""
    return meta.key or str(item.name)


# --- reading --------------------------------------------------------------------------


def read_document(cls: type, text: str, at: At) -> dict[str, Any]:
    """The settings a TOML document sets for ``cls``, checked (only those set)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    return read_settings(cls, document, at)


def read_text(path: Path) -> str:
    """The config file's text (the one read a process does for its config)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def read_settings(cls: type, value: Any, at: At) -> dict[str, Any]:
    """The settings the TOML table ``value`` sets for ``cls``, checked (only those set),
    by field name."""
    if not isinstance(value, dict):
        raise at.wrong_type("a table", value)
    declared = {_key(item, meta): (item.name, meta) for item, meta in _settings(cls)}
    unknown = [at.child(key).key for key in value if key not in declared]
    if unknown:
        many = "s" if len(unknown) > 1 else ""
        raise ConfigError(
            f"unknown setting{many} {', '.join(map(repr, unknown))} (unknown keys are refused, "
            f"so that a typo never falls back to a default; known: {', '.join(declared)})",
            unknown[0],
        )
    return {
        declared[key][0]: declared[key][1].check(item, at.child(key)) for key, item in value.items()
    }


def build(cls: type[T], settings: Mapping[str, Any], at: At) -> T:
    """``cls`` from ``settings``: defaults for the rest, shares derived or checked."""
    values = dict(settings)
    for item, meta in _settings(cls):
        if item.name not in values and item.default is MISSING and item.default_factory is MISSING:
            required = at.child(_key(item, meta)).key
            raise ConfigError(f"{required} is required", required)
        if meta.share is None:
            continue
        whole = values.get(meta.share.whole, _default(cls, meta.share.whole))
        if item.name not in values:
            values[item.name] = min(item.default, whole // 2)
        elif values[item.name] >= whole:
            share, of = at.child(item.name).key, at.child(meta.share.whole).key
            raise ConfigError(
                f"{share} ({values[item.name]}) must be smaller than {of} ({whole}), so that "
                f"one {meta.share.caller} at its share never takes all of them from the others",
                share,
            )
    return cls(**values)


def check_option(cls: type, name: str, value: Any) -> Any:
    """A command-line value for the setting ``name``, checked as the file's value is;
    messages name the option (``--log-level``)."""
    meta = next(meta for item, meta in _settings(cls) if _key(item, meta) == name)
    return meta.check(value, At(f"--{name.replace('_', '-')}"))


def _default(cls: type, name: str) -> Any:
    return next(item.default for item in fields(cls) if item.name == name)


# --- checks ---------------------------------------------------------------------------


def string(value: Any, at: At) -> str:
    if not isinstance(value, str):
        raise at.wrong_type("a string", value)
    if not value:
        raise at.must_be("a non-empty string", value)
    return value


def boolean(value: Any, at: At) -> bool:
    if not isinstance(value, bool):
        raise at.wrong_type("true or false", value)
    return value


def integer(minimum: int = 1, maximum: int | None = None) -> Check[int]:
    if maximum is not None:
        rule = f"an integer between {minimum} and {maximum}"
    else:
        rule = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"

    def check(value: Any, at: At) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise at.wrong_type("an integer", value)
        if (
            not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise at.must_be(rule, value)
        return value

    return check


def number(bounds: tuple[float, float] | None = None) -> Check[float]:
    """A finite number: positive, or within ``bounds``. (TOML has nan and inf: nan
    passes any comparison and inf would turn a timeout off.)"""
    rule = (
        f"a number between {bounds[0]:g} and {bounds[1]:g}"
        if bounds
        else "a positive, finite number"
    )

    def check(value: Any, at: At) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise at.wrong_type("a number", value)
        inside = value > 0 if bounds is None else bounds[0] <= value <= bounds[1]
        if not (math.isfinite(value) and inside):
            raise at.must_be(rule, value)
        return float(value)

    return check


def one_of(*choices: str) -> Check[str]:
    def check(value: Any, at: At) -> str:
        if string(value, at) not in choices:
            raise at.must_be(f"one of {', '.join(choices)}", value)
        return str(value)

    return check


def matching(pattern: str, what: str) -> Check[str]:
    """A string that fully matches ``pattern``; else "KEY: 'value' is not WHAT"."""
    compiled = re.compile(pattern)

    def check(value: Any, at: At) -> str:
        if not compiled.fullmatch(string(value, at)):
            raise at.error(f"{quoted(value)} is not {what}")
        return str(value)

    return check


def list_of(item: Check[T], noun: str) -> Check[tuple[T, ...]]:
    def check(value: Any, at: At) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise at.wrong_type(f"a list of {noun}", value)
        return tuple(item(entry, at.item(index)) for index, entry in enumerate(value))

    return check


def address(value: Any, at: At) -> Address:
    try:
        return parse_address(string(value, at))
    except AddressError as exc:
        raise at.error(str(exc)) from None


def path(value: Any, at: At) -> Path:
    """A file path; a relative one starts from the config file's directory."""
    return at.base_dir / string(value, at)


def region_name(value: Any, at: At) -> str:
    if not is_region(string(value, at)):
        raise at.error(f"{quoted(value)} is not an AWS region name such as us-east-1")
    return str(value)


log_level_name = one_of(*LEVELS)


class Table(Generic[T]):
    """A TOML table read into the dataclass ``cls`` (its own settings, checked)."""

    def __init__(self, cls: type[T]) -> None:
        self.cls = cls

    def __call__(self, value: Any, at: At) -> T:
        return build(self.cls, read_settings(self.cls, value, at), at)


class Tables(Generic[T]):
    """A table of named ``cls`` tables (``[secrets.NAME]``), ``{name: cls}``; the name
    goes into ``cls``'s ``name`` field and must fully match ``names`` (``rule`` says how)."""

    def __init__(self, cls: type[T], names: str, rule: str) -> None:
        self.cls, self.names, self.rule = cls, re.compile(names), rule

    def __call__(self, value: Any, at: At) -> dict[str, T]:
        if not isinstance(value, dict):
            raise at.wrong_type("a table", value)
        result: dict[str, T] = {}
        for name, entry in value.items():
            if not self.names.fullmatch(name):
                raise at.error(f"the name {quoted(name)} must be {self.rule}")
            settings = read_settings(self.cls, entry, at.child(name))
            result[name] = build(self.cls, {**settings, "name": name}, at.child(name))
        return result


# --- the reference --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    default: str
    doc: str


def reference(cls: type, prefix: str = "") -> list[Row]:
    """Every setting of ``cls`` (tables included) with its default, for the docs."""
    rows: list[Row] = []
    for item, meta in _settings(cls):
        key = f"{prefix}{_key(item, meta)}"
        if isinstance(meta.check, Table):
            rows += reference(meta.check.cls, f"{key}.")
        elif isinstance(meta.check, Tables):
            rows += reference(meta.check.cls, f"{key}.<NAME>.")
        else:
            rows.append(Row(key, meta.shown or _shown(item, meta, prefix), meta.doc))
    return rows


def _shown(item: Any, meta: Setting, prefix: str) -> str:
    if item.default is MISSING and item.default_factory is MISSING:
        return "required"
    value = item.default_factory() if item.default is MISSING else item.default
    if not value and not isinstance(value, int | float):
        return "none"  # None, an empty list or table: the doc says what that means
    text = f'`"{value}"`' if isinstance(value, str | Address) else f"`{value}`"
    if meta.share is not None:
        text += f", at most half of `{prefix}{meta.share.whole}`"
    return text

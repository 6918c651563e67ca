"""Metrics for both processes, in the Prometheus text exposition format (version 0.0.4).

The format, as https://prometheus.io/docs/instrumenting/exposition_formats/ ("Text
format details") defines it and as this module writes it:
- UTF-8, lines ending in ``\\n``, the last one too; served as ``CONTENT_TYPE``.
- Per metric family, one group: ``# HELP name text`` (backslash and line feed escaped
  as ``\\\\`` and ``\\n``), ``# TYPE name counter|gauge|histogram``, then its samples,
  ``name{label="value",...} value``. Label values escape backslash, double quote and
  line feed (``\\\\``, ``\\"``, ``\\n``). Names match ``[a-zA-Z_:][a-zA-Z0-9_:]*``,
  label names ``[a-zA-Z_][a-zA-Z0-9_]*`` (``__`` prefixes are reserved).
- Values are Go ``ParseFloat`` numbers: ``+Inf``, ``-Inf`` and ``NaN`` spelt so.
- A histogram ``x`` has cumulative ``x_bucket{le="..."}`` samples ending with
  ``le="+Inf"`` (equal to the count), then ``x_sum`` and ``x_count``.

Our own small registry rather than ``prometheus_client``: inside the enclave every
package is trusted code measured into the image and costs memory, and what we need
beyond the format (labels bounded against hostile callers, a snapshot another
process can relabel and re-expose) it does not do. The tests parse our output with
``prometheus_client``'s parser (a development dependency only).

Bounded labels: a label value that comes from outside (an operation name, a CID, a
peer) must not grow the series without end. Each label is declared with its allowed
values, or with a number of distinct values it may take (first come, first kept);
anything else is counted under ``OTHER``.

Snapshots: ``to_json`` turns collected families into JSON-ready data and
``from_json`` reads them back, checking every field and cap (the proxy reads the
agents' snapshots with it: input from another machine's process).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"

Kind = Literal["counter", "gauge", "histogram"]
KINDS: tuple[Kind, ...] = ("counter", "gauge", "histogram")
# Seconds: from a cached answer (milliseconds) to a KMS call at its deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SUFFIXES: dict[Kind, tuple[str, ...]] = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
MAX_LABEL_VALUE = 256
MAX_HELP = 1024
MAX_LABELS = 16

# A label's bound: the values it may take, or how many distinct values it may take.
Bound = Collection[str] | int
LabelValues = tuple[str, ...]


class MetricsError(ValueError):
    """A metric definition or a snapshot that cannot be used, with the reason."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: tuple[Sample, ...]


class _Labels:
    """A metric's label names and their bounds: values in, bounded values out."""

    def __init__(self, bounds: Mapping[str, Bound]) -> None:
        for name in bounds:
            if not _LABEL.fullmatch(name) or name.startswith("__") or name == "le":
                raise MetricsError(f"bad label name {name!r}")
        self.names = tuple(bounds)
        self._allowed = {
            name: frozenset(bound) for name, bound in bounds.items() if not isinstance(bound, int)
        }
        self._caps = {name: bound for name, bound in bounds.items() if isinstance(bound, int)}
        self._seen: dict[str, set[str]] = {name: set() for name in self._caps}

    def bounded(self, values: Mapping[str, str]) -> LabelValues:
        if set(values) != set(self.names):
            raise MetricsError(f"labels must be exactly {', '.join(self.names) or 'none'}")
        return tuple(self._one(name, str(values[name])) for name in self.names)

    def _one(self, name: str, value: str) -> str:
        allowed = self._allowed.get(name)
        if allowed is not None:
            return value if value in allowed else OTHER
        seen = self._seen[name]
        if value in seen:
            return value
        if len(seen) < self._caps[name] and len(value) <= MAX_LABEL_VALUE:
            seen.add(value)
            return value
        return OTHER

    def pairs(self, values: LabelValues) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.names, values, strict=True))


class _Metric:
    kind: Kind

    def __init__(self, name: str, help: str, labels: Mapping[str, Bound]) -> None:
        if not _NAME.fullmatch(name):
            raise MetricsError(f"bad metric name {name!r}")
        self.name = name
        self.help = help
        self.labels = _Labels(labels)

    def samples(self) -> Iterable[Sample]:
        raise NotImplementedError


class _Valued(_Metric):
    """One value per label set. Without labels, one series: 0 until it changes."""

    def __init__(self, name: str, help: str, labels: Mapping[str, Bound]) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def _add(self, amount: float, labels: Mapping[str, str]) -> None:
        key = self.labels.bounded(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def _current(self) -> dict[LabelValues, float]:
        return self._values

    def samples(self) -> Iterable[Sample]:
        for key, value in self._current().items():
            yield Sample(self.name, self.labels.pairs(key), value)


class Counter(_Valued):
    """Counts up; the name ends in ``_total``, as the format's convention wants."""

    kind: Kind = "counter"

    def __init__(self, name: str, help: str, labels: Mapping[str, Bound]) -> None:
        if not name.endswith("_total"):
            raise MetricsError(f"a counter's name ends in _total: {name!r}")
        super().__init__(name, help, labels)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise MetricsError("a counter only goes up")
        self._add(amount, labels)


class Gauge(_Valued):
    """A value that goes up and down, set as things happen or read at collection time
    (``read``: returns each label set's value then, e.g. an age; none: no sample)."""

    kind: Kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Mapping[str, Bound],
        read: Callable[[], Iterable[tuple[Mapping[str, str], float]]] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        self._read = read
        if read is not None:
            self._values = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self.labels.bounded(labels)] = value

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)

    def _current(self) -> dict[LabelValues, float]:
        values = dict(self._values)
        for labels, value in self._read() if self._read is not None else ():
            values[self.labels.bounded(labels)] = value
        return values


class Histogram(_Metric):
    """Observations counted into fixed buckets (upper bounds, ``+Inf`` added)."""

    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Mapping[str, Bound],
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)):
            raise MetricsError("histogram buckets must be increasing")
        self.bounds = (*bounds, math.inf)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        if math.isnan(value):
            return
        key = self.labels.bounded(labels)
        counts = self._counts.setdefault(key, [0] * len(self.bounds))
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                counts[index] += 1
                break
        self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterable[Sample]:
        for key, counts in self._counts.items():
            pairs = self.labels.pairs(key)
            running = 0
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                yield Sample(f"{self.name}_bucket", (*pairs, ("le", _number(bound))), running)
            yield Sample(f"{self.name}_sum", pairs, self._sums[key])
            yield Sample(f"{self.name}_count", pairs, running)


class Registry:
    """The metrics of one process, collected into families on demand."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise MetricsError(f"metric {metric.name!r} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Mapping[str, Bound] | None = None) -> Counter:
        metric: Counter = self._add(Counter(name, help, labels or {}))
        return metric

    def gauge(
        self,
        name: str,
        help: str,
        labels: Mapping[str, Bound] | None = None,
        read: Callable[[], Iterable[tuple[Mapping[str, str], float]]] | None = None,
    ) -> Gauge:
        metric: Gauge = self._add(Gauge(name, help, labels or {}, read))
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labels: Mapping[str, Bound] | None = None,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        metric: Histogram = self._add(Histogram(name, help, labels or {}, buckets))
        return metric

    def collect(self) -> list[Family]:
        return [Family(m.name, m.kind, m.help, tuple(m.samples())) for m in self._metrics.values()]


def relabel(families: Iterable[Family], extra: Mapping[str, str]) -> list[Family]:
    """The families with ``extra`` labels put first on every sample (replacing any
    of the same name), e.g. the proxy's ``enclave`` on an agent's snapshot."""
    added = tuple(extra.items())
    return [
        Family(
            family.name,
            family.kind,
            family.help,
            tuple(
                Sample(s.name, (*added, *((k, v) for k, v in s.labels if k not in extra)), s.value)
                for s in family.samples
            ),
        )
        for family in families
    ]


def render(families: Iterable[Family]) -> str:
    """The exposition text. Families of one name (from several sources) are written
    as one group, the first one's HELP and TYPE; one whose type differs is left out."""
    merged: dict[str, Family] = {}
    for family in families:
        first = merged.get(family.name)
        if first is None:
            merged[family.name] = family
        elif first.kind == family.kind:
            merged[family.name] = Family(
                first.name, first.kind, first.help, first.samples + family.samples
            )
    lines: list[str] = []
    for family in merged.values():
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            lines.append(f"{sample.name}{_labels(sample.labels)} {_number(sample.value)}")
    return "".join(line + "\n" for line in lines)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return f"{int(value)}.0"
    return repr(float(value))


# --- snapshots: JSON both ways ----------------------------------------------------

_JSON_NUMBERS = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}


def to_json(families: Iterable[Family]) -> list[Any]:
    """``[[name, kind, help, [[sample, {label: value}, value], ...]], ...]``; the
    non-finite values as the strings ``+Inf``, ``-Inf``, ``NaN``."""
    return [
        [
            f.name,
            f.kind,
            f.help,
            [[s.name, dict(s.labels), _json_number(s.value)] for s in f.samples],
        ]
        for f in families
    ]


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else _number(value)


def from_json(data: Any, *, prefix: str, max_samples: int) -> list[Family]:
    """Families read back from ``to_json``'s shape, every field checked: names start
    with ``prefix`` and fit the format, a sample's name belongs to its family's type,
    at most ``max_samples`` samples in all. ``MetricsError`` names the first fault."""
    if not isinstance(data, list):
        raise MetricsError("a snapshot is a list of families")
    families: list[Family] = []
    names: set[str] = set()
    total = 0
    for item in data:
        if not (isinstance(item, list) and len(item) == 4):
            raise MetricsError("a family is [name, kind, help, samples]")
        name, kind, help_text, samples = item
        if not (isinstance(name, str) and _NAME.fullmatch(name) and name.startswith(prefix)):
            raise MetricsError(f"family names are metric names starting with {prefix!r}")
        if name in names:
            raise MetricsError(f"family {name!r} appears twice")
        names.add(name)
        if kind not in KINDS:
            raise MetricsError(f"family {name!r}: unknown type")
        if not (isinstance(help_text, str) and len(help_text) <= MAX_HELP):
            raise MetricsError(f"family {name!r}: help is a string of at most {MAX_HELP}")
        if not isinstance(samples, list):
            raise MetricsError(f"family {name!r}: samples is a list")
        total += len(samples)
        if total > max_samples:
            raise MetricsError(f"more than {max_samples} samples")
        allowed = {name + suffix for suffix in _SUFFIXES[kind]}
        families.append(
            Family(name, kind, help_text, tuple(_sample(s, allowed, name) for s in samples))
        )
    return families


def _sample(item: Any, allowed: set[str], family: str) -> Sample:
    if not (isinstance(item, list) and len(item) == 3):
        raise MetricsError(f"family {family!r}: a sample is [name, labels, value]")
    name, labels, value = item
    if name not in allowed:
        raise MetricsError(f"family {family!r}: sample name not of this family")
    if not (isinstance(labels, dict) and len(labels) <= MAX_LABELS):
        raise MetricsError(f"family {family!r}: labels are an object of at most {MAX_LABELS}")
    pairs = []
    for key, text in labels.items():
        if not (_LABEL.fullmatch(key) and not key.startswith("__")):
            raise MetricsError(f"family {family!r}: bad label name")
        if not (isinstance(text, str) and len(text) <= MAX_LABEL_VALUE):
            raise MetricsError(
                f"family {family!r}: label values are strings of at most {MAX_LABEL_VALUE}"
            )
        pairs.append((key, text))
    if name == f"{family}_bucket" and "le" not in labels:
        raise MetricsError(f"family {family!r}: a bucket has an le label")
    if isinstance(value, str) and value in _JSON_NUMBERS:
        number = _JSON_NUMBERS[value]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            raise MetricsError(f"family {family!r}: a value is out of range") from None
    else:
        raise MetricsError(f"family {family!r}: a value is a number")
    return Sample(name, tuple(pairs), number)

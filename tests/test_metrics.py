"""enclave_common.metrics: our exposition read back by prometheus_client's parser (an
independent implementation of the format), bounded labels, snapshots both ways."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from enclave_common.metrics import (
    CONTENT_TYPE,
    OTHER,
    Family,
    MetricsError,
    Registry,
    Sample,
    from_json,
    relabel,
    render,
    to_json,
)


def parsed(text: str) -> dict[str, Any]:
    """Each family's type, help and samples as the reference parser reads them."""
    assert text.endswith("\n")
    return {
        family.name: (
            family.type,
            family.documentation,
            [(s.name, s.labels, s.value) for s in family.samples],
        )
        for family in text_string_to_metric_families(text)
    }


def test_counter_gauge_histogram_read_back_by_the_reference_parser() -> None:
    registry = Registry()
    calls = registry.counter(
        "enclave_agent_calls_total", "Calls by operation.", {"operation": ["Decrypt"]}
    )
    calls.inc(operation="Decrypt")
    calls.inc(2, operation="Decrypt")
    open_now = registry.gauge("enclave_agent_open", "Open connections.")
    open_now.inc()
    open_now.inc()
    open_now.dec()
    latency = registry.histogram(
        "enclave_agent_call_seconds", "Latency.", {"operation": ["Decrypt"]}, buckets=(0.1, 1.0)
    )
    for value in (0.05, 0.5, 0.7, 3.0):
        latency.observe(value, operation="Decrypt")

    families = parsed(render(registry.collect()))

    # The reference parser names a counter family without its _total suffix.
    assert families["enclave_agent_calls"] == (
        "counter",
        "Calls by operation.",
        [("enclave_agent_calls_total", {"operation": "Decrypt"}, 3.0)],
    )
    assert families["enclave_agent_open"] == (
        "gauge",
        "Open connections.",
        [("enclave_agent_open", {}, 1.0)],
    )
    kind, _, samples = families["enclave_agent_call_seconds"]
    assert kind == "histogram"
    assert samples == [
        ("enclave_agent_call_seconds_bucket", {"operation": "Decrypt", "le": "0.1"}, 1.0),
        ("enclave_agent_call_seconds_bucket", {"operation": "Decrypt", "le": "1.0"}, 3.0),
        ("enclave_agent_call_seconds_bucket", {"operation": "Decrypt", "le": "+Inf"}, 4.0),
        ("enclave_agent_call_seconds_sum", {"operation": "Decrypt"}, pytest.approx(4.25)),
        ("enclave_agent_call_seconds_count", {"operation": "Decrypt"}, 4.0),
    ]
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_a_counter_without_labels_shows_zero_before_anything_happens() -> None:
    registry = Registry()
    registry.counter("x_total", "Nothing yet.")
    assert parsed(render(registry.collect()))["x"][2] == [("x_total", {}, 0.0)]


def test_non_finite_values_are_spelt_as_the_format_wants() -> None:
    registry = Registry()
    gauge = registry.gauge("g", "A gauge.", {"which": ["a", "b", "c"]})
    gauge.set(math.inf, which="a")
    gauge.set(-math.inf, which="b")
    gauge.set(math.nan, which="c")
    text = render(registry.collect())
    assert 'g{which="a"} +Inf\n' in text
    assert 'g{which="b"} -Inf\n' in text
    assert 'g{which="c"} NaN\n' in text
    values = [s[2] for s in parsed(text)["g"][2]]
    assert values[:2] == [math.inf, -math.inf] and math.isnan(values[2])


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=200), help_text=st.text(max_size=200))
def test_any_label_value_and_help_text_survive_escaping(value: str, help_text: str) -> None:
    help_text = f"<{help_text}>"  # (the reference parser strips each line's ends)
    registry = Registry()
    registry.counter("c_total", help_text, {"peer": 10}).inc(peer=value)
    family = parsed(render(registry.collect()))["c"]
    assert family[1] == help_text
    assert family[2] == [("c_total", {"peer": value}, 1.0)]


def test_hostile_label_values_are_bounded() -> None:
    registry = Registry()
    by_operation = registry.counter(
        "calls_total", "Calls.", {"operation": ["Decrypt", "GenerateRandom"]}
    )
    by_peer = registry.counter("peers_total", "Peers.", {"peer": 3})
    for name in ("Decrypt", "Nonsense", "x" * 10_000, "GenerateRandom", "AnotherOne"):
        by_operation.inc(operation=name)
    for peer in [str(n) for n in range(1000)] + ["0", "1"]:
        by_peer.inc(peer=peer)
    by_peer.inc(peer="y" * 10_000)  # too long for a label, even with room left
    families = parsed(render(registry.collect()))
    assert {s[1]["operation"]: s[2] for s in families["calls"][2]} == {
        "Decrypt": 1.0,
        "GenerateRandom": 1.0,
        OTHER: 3.0,
    }
    assert {s[1]["peer"]: s[2] for s in families["peers"][2]} == {
        "0": 2.0,
        "1": 2.0,
        "2": 1.0,
        OTHER: 998.0,
    }


def test_definitions_that_break_the_format_are_refused() -> None:
    registry = Registry()
    with pytest.raises(MetricsError, match="name"):
        registry.gauge("bad-name", "x")
    with pytest.raises(MetricsError, match="_total"):
        registry.counter("calls", "x")
    with pytest.raises(MetricsError, match="label name"):
        registry.gauge("g", "x", {"le": 3})
    with pytest.raises(MetricsError, match="increasing"):
        registry.histogram("h", "x", buckets=(1.0, 0.5))
    gauge = registry.gauge("g", "x", {"a": 3})
    with pytest.raises(MetricsError, match="twice"):
        registry.gauge("g", "x")
    with pytest.raises(MetricsError, match="labels must be exactly a"):
        gauge.set(1, b="no")


def test_relabel_and_render_merge_sources_into_one_group_per_family() -> None:
    ours = Registry()
    ours.counter("enclave_proxy_tunnels_total", "Tunnels.").inc()
    theirs = Registry()
    theirs.counter("enclave_agent_calls_total", "Calls.", {"enclave": 2}).inc(enclave="forged")
    families = [
        *ours.collect(),
        *relabel(theirs.collect(), {"enclave": "cid:16"}),
        *relabel(theirs.collect(), {"enclave": "cid:17"}),
        # the same name with another type is left out rather than break the group
        Family("enclave_agent_calls_total", "gauge", "", (Sample("x", (), 1.0),)),
    ]
    text = render(families)
    assert text.count("# TYPE enclave_agent_calls_total counter") == 1
    assert parsed(text)["enclave_agent_calls"][2] == [
        ("enclave_agent_calls_total", {"enclave": "cid:16"}, 1.0),
        ("enclave_agent_calls_total", {"enclave": "cid:17"}, 1.0),
    ]


def test_snapshots_round_trip_through_json() -> None:
    registry = Registry()
    registry.counter("enclave_agent_a_total", "A.", {"x": 4}).inc(x='q"\\\n')
    registry.gauge("enclave_agent_b", "B.").set(math.inf)
    registry.histogram("enclave_agent_c_seconds", "C.", buckets=(1.0,)).observe(0.5)
    families = registry.collect()
    wire = json.dumps(to_json(families), allow_nan=False)
    again = from_json(json.loads(wire), prefix="enclave_agent_", max_samples=100)
    assert render(again) == render(families)


@pytest.mark.parametrize(
    ("snapshot", "reason"),
    [
        ({}, "a list of families"),
        ([["enclave_proxy_x", "gauge", "", []]], "starting with"),
        ([["enclave_agent_x", "summary", "", []]], "unknown type"),
        ([["enclave_agent_x", "gauge", "h" * 2000, []]], "help"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_y", {}, 1]]]], "not of this family"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_x", {"__a": "1"}, 1]]]], "label name"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_x", {"a": 1}, 1]]]], "label values"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_x", {}, True]]]], "a number"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_x", {}, 10**400]]]], "out of range"),
        ([["enclave_agent_x", "histogram", "", [["enclave_agent_x_bucket", {}, 1]]]], "le label"),
        ([["enclave_agent_x", "gauge", "", []], ["enclave_agent_x", "gauge", "", []]], "twice"),
        ([["enclave_agent_x", "gauge", "", [["enclave_agent_x", {}, 1]] * 11]], "more than 10"),
    ],
)
def test_a_bad_snapshot_is_refused_naming_the_fault(snapshot: Any, reason: str) -> None:
    with pytest.raises(MetricsError, match=reason):
        from_json(snapshot, prefix="enclave_agent_", max_samples=10)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
_name = st.sampled_from(["enclave_agent_a", "enclave_agent_a_total", "enclave_agent_a_bucket"])
_snapshot_like = st.lists(
    st.tuples(
        _name,
        st.sampled_from(["counter", "gauge", "histogram", "x"]),
        st.text(max_size=20),
        st.lists(
            st.tuples(
                _name | st.sampled_from(["enclave_agent_a_sum", "enclave_agent_a_count"]),
                st.dictionaries(st.sampled_from(["le", "a", "1b"]), st.text(max_size=5) | _json),
                st.floats() | st.integers() | st.sampled_from(["+Inf", "NaN", "x"]),
            ).map(list),
            max_size=4,
        ),
    ).map(list),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(data=_json | _snapshot_like)
def test_any_json_is_read_or_refused_and_what_is_read_renders_validly(data: Any) -> None:
    try:
        families = from_json(data, prefix="enclave_agent_", max_samples=50)
    except MetricsError:
        return
    parsed(render(relabel(families, {"enclave": "cid:16"})) or "# nothing\n")

"""enclave_common.logstream: the log channel's records, written and read back; the
reader against endless, huge, split and garbage input (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_common.logstream import (
    KEEPALIVE,
    LINE_MAX,
    Dropped,
    Line,
    RecordReader,
    Refused,
    Snapshot,
    encode_dropped,
    encode_lines,
    encode_snapshot,
)


def test_records_round_trip() -> None:
    text = 'quotes " back\\slash \x00 \x1b[31m ünïcödé \u2028 tab\t'
    wire = b"".join(
        [
            *encode_lines("stdout", text),
            KEEPALIVE,
            *encode_lines("agent", ""),
            encode_dropped({"stderr": 3, "agent": 0}),
            encode_snapshot([["enclave_agent_x", "gauge", "", []]]),
        ]
    )
    assert RecordReader().feed(wire) == [
        Line("stdout", text),
        Line("agent", ""),
        Dropped({"stderr": 3, "agent": 0}),
        Snapshot([["enclave_agent_x", "gauge", "", []]]),
    ]


def test_a_long_line_goes_in_pieces_of_line_max() -> None:
    text = "x" * (2 * LINE_MAX + 5)
    records = RecordReader().feed(b"".join(encode_lines("stderr", text)))
    assert [len(r.text) for r in records if isinstance(r, Line)] == [LINE_MAX, LINE_MAX, 5]
    assert "".join(r.text for r in records if isinstance(r, Line)) == text


def test_records_split_at_every_byte_read_the_same() -> None:
    wire = b"".join([*encode_lines("agent", '{"event": "ready"}'), encode_dropped({"stdout": 1})])
    reader = RecordReader()
    got = []
    for index in range(len(wire)):
        got += reader.feed(wire[index : index + 1])
    assert got == [Line("agent", '{"event": "ready"}'), Dropped({"stdout": 1})]


def test_an_endless_line_is_refused_once_and_costs_at_most_the_cap() -> None:
    reader = RecordReader(max_record=1000)
    refused = []
    for _ in range(1000):
        refused += reader.feed(b"A" * 4096)
        assert len(reader._partial) <= 1000
    assert refused == [Refused("record longer than 1000 bytes")]
    # The stream goes on after the next line feed.
    after = reader.feed(b"tail of the long one\n" + b"".join(encode_lines("stdout", "ok")))
    assert after == [Line("stdout", "ok")]


def test_a_huge_complete_line_is_refused() -> None:
    record = b"".join(encode_lines("stdout", "y" * LINE_MAX))
    reader = RecordReader(max_record=len(record) - 2)
    assert reader.feed(record + b"".join(encode_lines("stdout", "z"))) == [
        Refused(f"record longer than {len(record) - 2} bytes"),
        Line("stdout", "z"),
    ]


def test_garbage_and_wrong_shapes_are_refused_one_by_one() -> None:
    lines = [
        b"\xff\xfe not utf-8",
        b"not json",
        b"[1, 2]",
        b'{"stream": "kernel", "line": "x"}',
        b'{"stream": "stdout", "line": 5}',
        b'{"stream": "stdout", "line": "x", "extra": 1}',
        b'{"stream": "stdout"}',
        b'{"dropped": {"stdout": -1}}',
        b'{"dropped": {"stdout": true}}',
        b'{"dropped": {"other": 1}}',
        b'{"hello": 1}',
        b"[" * 100_000,
        b'{"stream": "stdout", "line": "' + b"x" * (LINE_MAX + 1) + b'"}',
    ]
    records = RecordReader().feed(b"\n".join(lines) + b"\n")
    assert len(records) == len(lines)
    assert all(isinstance(r, Refused) for r in records)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.binary(max_size=300)
        | st.sampled_from([b"\n", b'{"stream":"stdout","line":"a"}\n', b'{"dropped":{}}\n']),
        max_size=30,
    )
)
def test_any_bytes_in_any_pieces_never_break_the_reader(pieces: list[bytes]) -> None:
    reader = RecordReader(max_record=200)
    for piece in pieces:
        for record in reader.feed(piece):
            assert isinstance(record, Line | Dropped | Snapshot | Refused)
        assert len(reader._partial) <= 200

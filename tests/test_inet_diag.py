"""The inet_diag codec with crafted kernel answers: only DiagError escapes the reader,
and a uid is named only for the exact, established, owned socket (never guessed).

The answers come from tests/support/inet_diag_answers.py (the uapi layouts written
out again); the real kernel's answers are read in tests/test_tcp_peercred.py.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_common.inet_diag import (
    NLM_F_MULTI,
    TCP_ESTABLISHED,
    Answer,
    DiagError,
    DiagSocket,
    Endpoint,
    FourTuple,
    NotAttributed,
    owner_uid,
    request,
)
from tests.support.inet_diag_answers import (
    DONE,
    FIN_WAIT1,
    SEQ,
    TIME_WAIT,
    diag_msg,
    error,
    header,
    message,
    socket_answer,
)

FUZZ = settings(max_examples=200, deadline=5000)
CLIENT = Endpoint.of("127.0.0.1", 41104)
LISTENER = Endpoint.of("127.0.0.1", 9000)
CONNECTION = FourTuple(CLIENT, LISTENER)
CONNECTION6 = FourTuple(Endpoint.of("::1", 52166), Endpoint.of("::1", 9000))


def found(source: Endpoint = CLIENT, destination: Endpoint = LISTENER, **fields: int) -> bytes:
    """The exact lookup's answer for one socket (by default the client's)."""
    return socket_answer(source, destination, **fields)


def answered(*datagrams: bytes) -> Answer:
    answer = Answer(SEQ)
    for datagram in datagrams:
        answer.feed(datagram)
    return answer


def refusal(connection: FourTuple, *datagrams: bytes) -> str:
    with pytest.raises(NotAttributed) as caught:
        owner_uid(connection, answered(*datagrams))
    return caught.value.reason


# --- the question --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connection", "family", "src", "dst"),
    [
        (
            CONNECTION,
            socket.AF_INET,
            bytes([127, 0, 0, 1]) + bytes(12),
            bytes([127, 0, 0, 1]) + bytes(12),
        ),
        (CONNECTION6, socket.AF_INET6, bytes(15) + b"\1", bytes(15) + b"\1"),
    ],
)
def test_the_question_names_the_clients_socket_exactly(
    connection: FourTuple, family: int, src: bytes, dst: bytes
) -> None:
    raw = request(connection, 99)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", raw)
    # nlmsghdr + inet_diag_req_v2 (4 + 4 + 48 bytes); SOCK_DIAG_BY_FAMILY; NLM_F_REQUEST
    # only: an exact lookup, not a dump.
    assert (length, len(raw), kind, flags, seq, pid) == (72, 72, 20, 1, 99, 0)
    family_, protocol, ext, pad, states = struct.unpack_from("=BBBBI", raw, 16)
    assert (family_, protocol, ext, pad, states) == (family, 6, 0, 0, 1 << 1)
    sport, dport = struct.unpack_from(">HH", raw, 24)
    assert (sport, dport) == (connection.source.port, connection.destination.port)
    assert (raw[28:44], raw[44:60]) == (src, dst)
    # idiag_if 0, idiag_cookie INET_DIAG_NOCOOKIE twice
    assert struct.unpack_from("=III", raw, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)


def test_a_connection_mixing_families_is_no_question() -> None:
    with pytest.raises(ValueError):
        request(FourTuple(CLIENT, Endpoint.of("::1", 9000)), 1)


# --- answers naming the uid ------------------------------------------------------------


def test_the_exact_answer_names_its_owner() -> None:
    assert owner_uid(CONNECTION, answered(found(uid=1000))) == 1000
    assert owner_uid(CONNECTION6, answered(found(*_ends(CONNECTION6), uid=0))) == 0


def test_an_ipv6_client_of_an_ipv4_listener_is_reported_with_mapped_addresses() -> None:
    assert owner_uid(CONNECTION, answered(found(family=socket.AF_INET6, uid=7))) == 7


def test_a_multipart_answer_across_datagrams_ends_at_done() -> None:
    part = message(20, diag_msg(CLIENT, LISTENER, uid=5), flags=NLM_F_MULTI)
    answer = answered(part)
    assert not answer.done
    answer.feed(DONE)
    assert owner_uid(CONNECTION, answer) == 5
    # the same, in one datagram, with the same socket reported twice
    assert owner_uid(CONNECTION, answered(part + part + DONE)) == 5


# --- answers naming nobody -------------------------------------------------------------


def test_no_such_connection_is_refused() -> None:
    assert "no such connection" in refusal(CONNECTION, error(-errno.ENOENT))
    assert "EINVAL" in refusal(CONNECTION, error(-errno.EINVAL))
    assert "named no socket" in refusal(CONNECTION, DONE)


@pytest.mark.parametrize(
    "stray",
    [
        found(source=Endpoint.of("127.0.0.1", 41105)),  # another client port
        found(destination=Endpoint.of("127.0.0.1", 9001)),  # another listener
        found(source=Endpoint.of("127.0.0.2", 41104)),  # another address
        found(LISTENER, CLIENT),  # our own end, not the client's
    ],
)
def test_an_answer_about_another_socket_is_refused(stray: bytes) -> None:
    assert "another socket" in refusal(CONNECTION, stray)


def test_a_right_socket_beside_a_stray_one_is_refused() -> None:
    right = message(20, diag_msg(CLIENT, LISTENER), flags=NLM_F_MULTI)
    stray = message(20, diag_msg(LISTENER, CLIENT, uid=0), flags=NLM_F_MULTI)
    assert "another socket" in refusal(CONNECTION, right + stray + DONE)


def test_several_different_matches_are_refused_not_guessed() -> None:
    first = message(20, diag_msg(CLIENT, LISTENER, uid=1000), flags=NLM_F_MULTI)
    second = message(20, diag_msg(CLIENT, LISTENER, uid=0, inode=99), flags=NLM_F_MULTI)
    assert "2 different sockets" in refusal(CONNECTION, first + second + DONE)


@pytest.mark.parametrize(("state", "name"), [(FIN_WAIT1, "FIN_WAIT1"), (TIME_WAIT, "TIME_WAIT")])
def test_a_closing_clients_socket_names_nobody(state: int, name: str) -> None:
    # What the kernel really says once the client closed: uid 0 (as if root), inode 0.
    assert f"is {name}, not ESTABLISHED" in refusal(CONNECTION, found(state=state, uid=0, inode=0))


def test_an_established_socket_without_owner_names_nobody() -> None:
    assert "no owner" in refusal(CONNECTION, found(uid=0, inode=0))


def test_an_incomplete_answer_names_nobody() -> None:
    part = message(20, diag_msg(CLIENT, LISTENER), flags=NLM_F_MULTI)
    assert "incomplete" in refusal(CONNECTION, part)


# --- malformed answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "datagrams",
    [
        [found()[:15]],  # shorter than a header
        [header(200, 20) + bytes(72)],  # a length past the datagram
        [header(8, 20)],  # a length shorter than the header
        [found(), found()],  # a datagram after the single answer
        [found() + DONE],  # a message after the single answer
        [message(20, diag_msg(CLIENT, LISTENER), seq=SEQ + 1)],  # another question's answer
        [message(20, diag_msg(CLIENT, LISTENER)[:71])],  # a short inet_diag_msg
        [message(20, diag_msg(CLIENT, LISTENER, family=1))],  # AF_UNIX?
        [message(4, b"")],  # NLMSG_OVERRUN
        [message(2, b"")],  # NLMSG_ERROR without its code
        [message(2, struct.pack("=i", 5))],  # a positive "errno"
        [message(16, b"")],  # a type this question never gets
    ],
)
def test_malformed_answers_are_diag_errors(datagrams: list[bytes]) -> None:
    with pytest.raises(DiagError):
        answered(*datagrams)


def test_noop_messages_are_skipped() -> None:
    assert owner_uid(CONNECTION, answered(message(1, b"") + found(uid=3))) == 3


# --- hypothesis: untrusted bytes ------------------------------------------------------

ports = st.integers(min_value=0, max_value=0xFFFF)
ipv4 = st.sampled_from(["127.0.0.1", "127.0.0.2", "10.0.0.1"])
endpoints = st.builds(Endpoint.of, ipv4, ports) | st.builds(Endpoint.of, st.just("::1"), ports)
sockets = st.builds(
    DiagSocket,
    family=st.just(0),
    state=st.sampled_from([TCP_ESTABLISHED, FIN_WAIT1, TIME_WAIT, 8]),
    source=st.sampled_from([CLIENT, LISTENER]) | endpoints,
    destination=st.sampled_from([LISTENER, CLIENT]) | endpoints,
    uid=st.sampled_from([0, 1000, 65534]),
    inode=st.sampled_from([0, 4242, 99]),
)


def _ends(connection: FourTuple) -> tuple[Endpoint, Endpoint]:
    return connection.source, connection.destination


def _encoded(item: DiagSocket) -> bytes:
    body = diag_msg(item.source, item.destination, uid=item.uid, state=item.state, inode=item.inode)
    return message(20, body, flags=NLM_F_MULTI)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_at_most_a_diag_error(raw: bytes) -> None:
    answer = Answer(SEQ)
    try:
        answer.feed(raw)
    except DiagError:
        return
    try:
        owner_uid(CONNECTION, answer)
    except NotAttributed:
        pass


@FUZZ
@given(
    st.lists(
        sockets.filter(lambda s: s.source.address.version == s.destination.address.version),
        max_size=5,
    ),
    st.data(),
)
def test_a_uid_is_named_only_for_the_one_exact_established_owned_socket(
    items: list[DiagSocket], data: st.DataObject
) -> None:
    raw = b"".join(_encoded(item) for item in items) + DONE
    cuts = sorted(data.draw(st.lists(st.sampled_from(range(0, len(raw), 4)), max_size=3)))
    answer = Answer(SEQ)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            if end > start:
                answer.feed(raw[start:end])
    except DiagError:
        # A cut inside a message, and only that, makes the bytes malformed.
        assert not set(cuts) <= _boundaries(items)
        return
    assert set(cuts) <= _boundaries(items)
    assert [(s.source, s.destination, s.uid, s.state, s.inode) for s in answer.sockets] == [
        (s.source, s.destination, s.uid, s.state, s.inode) for s in items
    ]
    distinct = {(s.source, s.destination, s.uid, s.state, s.inode) for s in items}
    exact = len(distinct) == 1 and all(_ends_of(s) == _ends(CONNECTION) for s in items)
    owned = exact and items[0].state == TCP_ESTABLISHED and items[0].inode != 0
    try:
        uid = owner_uid(CONNECTION, answer)
    except NotAttributed:
        assert not owned
    else:
        assert owned and uid == items[0].uid


def _ends_of(item: DiagSocket) -> tuple[Endpoint, Endpoint]:
    return item.source, item.destination


def _boundaries(items: list[DiagSocket]) -> set[int]:
    offsets, at = {0}, 0
    for item in items:
        at += len(_encoded(item))
        offsets.add(at)
    return offsets


@FUZZ
@given(st.integers(min_value=0, max_value=87), st.integers(min_value=0, max_value=255))
def test_a_damaged_answer_never_names_another_socket(position: int, value: int) -> None:
    # Any single byte of a right answer changed: a DiagError, a refusal, or a uid for
    # a socket that still is exactly the client's, established and owned.
    raw = bytearray(found(uid=1000))
    raw[position] = value
    answer = Answer(SEQ)
    try:
        answer.feed(bytes(raw))
        uid = owner_uid(CONNECTION, answer)
    except (DiagError, NotAttributed):
        return
    [only] = set(answer.sockets)
    assert _ends_of(only) == _ends(CONNECTION)
    assert only.state == TCP_ESTABLISHED and only.inode != 0 and only.uid == uid

"""Hypothesis helpers for the parsers of untrusted bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")
R = TypeVar("R")


def parsed_or_refused(parse: Callable[[T], R], raw: T, refusal: type[Exception]) -> R | None:
    """``parse(raw)``, or None where ``parse`` refuses ``raw`` with ``refusal``: any other
    exception fails the test (a parser of untrusted input raises only its own error)."""
    try:
        return parse(raw)
    except refusal:
        return None


def mutate(
    data: st.DataObject,
    original: bytes,
    *,
    edits: int,
    byte: st.SearchStrategy[int],
    cut: int,
    insert: int,
) -> bytes:
    """``original`` after 1 to ``edits`` edits, each at a drawn position: a bit flipped,
    the byte set to one ``byte`` draws, up to ``cut`` bytes cut, or 1 to ``insert``
    drawn bytes inserted (it stops early if nothing is left)."""
    mutable = bytearray(original)
    for _ in range(data.draw(st.integers(1, edits))):
        position = data.draw(st.integers(0, len(mutable) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if action == "flip":
            mutable[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            mutable[position] = data.draw(byte)
        elif action == "cut":
            del mutable[position : position + data.draw(st.integers(1, cut))]
        else:
            mutable[position:position] = data.draw(st.binary(min_size=1, max_size=insert))
        if not mutable:
            break
    return bytes(mutable)

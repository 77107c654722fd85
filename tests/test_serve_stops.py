"""Stop strings: matched in time linear in the text (the scheduler is shared, so one request's stop strings
must not slow every other request), with the same cut and the same held-back text as a plain search."""

from __future__ import annotations

import random
import sys

import pytest

from pybitnet.generate import LENGTH, STOP_STRING, _advance, _Row


class _Pieces:
    """A stand-in for IncrementalDecoder: token i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def push(self, token: int) -> str:
        return self.pieces[token]

    def flush(self) -> str:
        return ""


def _run(pieces: list[str], stops: list[str]) -> tuple[str, list[str], str | None]:
    """Feed every piece through _advance: (final text, the pieces it released, finish reason)."""
    row = _Row(prompt=[1], budget=len(pieces), budget_reason=LENGTH, decoder=_Pieces(pieces))
    released = []
    for token in range(len(pieces)):
        released += list(_advance(row, token, set(), stops))
        if row.finish is not None:
            break
    return row.text, released, row.finish


def _expected(pieces: list[str], stops: list[str]) -> tuple[str, str]:
    """A plain search after each token: the output ends at the start of the earliest stop string in the
    text, once one is complete."""
    text = ""
    for piece in pieces:
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[: min(found)], STOP_STRING
    return text, LENGTH


def test_stops_cut_at_the_earliest_match_and_hold_back_only_possible_starts():
    rng = random.Random(0)
    for _ in range(3000):
        pieces = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 12))]
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text, released, finish = _run(pieces, stops)
        assert (text, finish) == _expected(pieces, stops), (pieces, stops)
        assert "".join(released) == text  # nothing released was part of the stop string (it cannot be taken back)


def test_the_first_stop_to_complete_ends_the_text_at_its_earliest_start():
    assert _run(["ab", "cd", "e"], ["c", "abcd"])[0] == ""  # both complete with "cd": the earlier start wins
    assert _run(["xabcd"], ["cd", "abc"])[0] == "x"
    assert _run(["ab", "c", "d"], ["c", "abcd"])[0] == "ab"  # "c" completes first: generation ends there


def _lines_run(stop_chars: int, tokens: int) -> int:
    """Python lines executed by _advance over `tokens` tokens of "aa" against 16 stop strings of `stop_chars`
    characters: half of them nearly match the end of the text all the time (so text is held back), half of
    them differ from it only in their first character."""
    filler = "a" * (stop_chars - 2)
    stops = [chr(ord("b") + i) + filler + "z" for i in range(8)] + ["a" + filler + chr(ord("B") + i) for i in range(8)]
    row = _Row(prompt=[1], budget=tokens, budget_reason=LENGTH, decoder=_Pieces(["aa"] * tokens))
    list(_advance(row, 0, set(), stops))  # the first token sets the matching up; count what follows
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_globals.get("__name__") != "pybitnet.generate":
            return None
        count += event == "line"
        return tracer

    sys.settrace(tracer)
    try:
        for token in range(1, tokens):
            for _ in _advance(row, token, set(), stops):
                pass
    finally:
        sys.settrace(None)
    assert row.finish == LENGTH and len(row.text) == 2 * tokens
    return count


def test_matching_work_per_token_does_not_grow_with_the_stop_strings_length():
    # Same output, same number of stop strings; only their length changes (8x). A search that re-reads the
    # held-back text for each candidate length does 8x the work per token; an incremental one the same.
    tokens = 200
    short, long = _lines_run(32, tokens), _lines_run(256, tokens)
    assert long < 1.5 * short, (short, long)


@pytest.mark.parametrize("stops", [["\n\n"], ["ab", "ba"], ["zzz"]])
def test_one_piece_may_hold_several_stops(stops):
    text, released, finish = _run(["xy\n", "\nab", "a"], stops)
    assert (text, finish) == _expected(["xy\n", "\nab", "a"], stops) and "".join(released) == text

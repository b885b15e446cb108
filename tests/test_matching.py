"""The open-answer matcher (`echo_agent.matching`) and its use by the verifier for items without choices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_agent.matching import OPEN_KINDS, infer_kind, normalise, open_match, parse_number, parse_times
from echo_agent.verifier import verify

# (gold, prediction, kind, expected). Golds are written as the suite writes them: "7", "flute", "12.5 s",
# "0.8 s", "3.0-5.0 s".
CASES = [
    # numbers in any format
    ("7", "7", "number", True),
    ("7", "7.0", "number", True),
    ("7", "seven", "number", True),
    ("7", "Seven times.", "number", True),
    ("7", "there are 7", "number", True),
    ("7", "7 beeps", "number", True),
    ("7", "7 (seven)", "number", True),
    ("21", "twenty-one", "number", True),
    ("2", "twice", "number", True),
    ("7", "8", "number", False),
    ("7", "77", "number", False),
    ("7", "7 or 8", "number", False),  # two different numbers: ambiguous
    ("7", "many", "number", False),
    ("7", "clip7", "number", False),  # a digit glued to a word is not a number
    # words: case, articles, plurals, the synonym table
    ("flute", "The flute.", "word", True),
    ("flute", "FLUTE", "word", True),
    ("flute", "flutes", "word", True),
    ("flute", "a flute", "word", True),
    ("flute", "it is the flute", "word", True),
    ("hi-hat", "hihat", "word", True),
    ("hi-hat", "Hi Hats", "word", True),
    ("hihat", "high-hat", "word", True),
    ("kick", "the kick drum", "word", True),
    ("snare", "snare drum", "word", True),
    ("crash", "crashes", "word", True),
    ("7", "seven", "word", True),  # a spoken digit named by its word
    ("flute", "violin", "word", False),
    ("flute", "flute and violin", "word", False),
    ("bell", "bells ringing", "word", False),
    ("yes", "Yes.", "word", True),
    ("yes", "Yes, the same speaker", "word", True),
    ("no", "No, a different voice", "word", True),
    ("yes", "no", "word", False),
    ("yes", "yes and no", "word", False),
    ("glass", "glass", "word", True),
    ("a", "the letter a", "word", True),  # a spoken letter is not an article
    ("a", "A.", "word", True),
    ("b", "the letter a", "word", False),
    # times: within 0.5 s, any unit or clock
    ("12 s", "0:12", "time", True),
    ("12 s", "00:12", "time", True),
    ("12 s", "12", "time", True),
    ("12 s", "at 12 seconds", "time", True),
    ("12 s", "12.4s", "time", True),
    ("12 s", "12 sec", "time", True),
    ("12 s", "twelve seconds", "time", True),
    ("12 s", "12000 ms", "time", True),
    ("62.5 s", "1:02.5", "time", True),
    ("62.5 s", "0:01:02", "time", True),
    ("12 s", "12.6 s", "time", False),
    ("12 s", "0:13", "time", False),
    ("12 s", "12-13 s", "time", False),  # a span is not a time
    ("12 s", "soon", "time", False),
    # durations: within max(0.15 s, 20 %)
    ("0.8 s", "800 ms", "duration", True),
    ("0.8 s", "0.8 seconds", "duration", True),
    ("0.8 s", "about 0.9 s", "duration", True),
    ("0.8 s", "0.95 s", "duration", True),
    ("0.8 s", "1.0 s", "duration", False),
    ("0.3 s", "0.44 s", "duration", True),  # the 0.15 s floor
    ("0.3 s", "0.5 s", "duration", False),
    ("5 s", "5.9 seconds", "duration", True),
    ("5 s", "6.2 s", "duration", False),
    # spans: both ends within max(0.5 s, 10 % of the gold's length)
    ("3.0-5.0 s", "3-5 s", "span", True),
    ("3.0-5.0 s", "3.0–5.0 s", "span", True),
    ("3.0-5.0 s", "from 0:03 to 0:05", "span", True),
    ("3.0-5.0 s", "between 3 and 5 seconds", "span", True),
    ("3.0-5.0 s", "3 s to 5 s", "span", True),
    ("3.0-5.0 s", "00:03-00:05", "span", True),
    ("3.0-5.0 s", "between 3000 and 5000 ms", "span", True),
    ("3.0-5.0 s", "3.4-5.4 s", "span", True),
    ("3.0-5.0 s", "3-6 s", "span", False),
    ("3.0-5.0 s", "5-3 s", "span", False),  # start after end
    ("3.0-5.0 s", "4 s", "span", False),
    ("20.0-30.0 s", "20.9-30.9 s", "span", True),  # 10 % of a 10 s span is 1 s
    ("20.0-30.0 s", "21.2-30 s", "span", False),
]


@pytest.mark.parametrize(("gold", "prediction", "kind", "expected"), CASES)
def test_open_match(gold: str, prediction: str, kind: str, expected: bool) -> None:
    assert open_match(gold, prediction, kind) is expected


@pytest.mark.parametrize(
    ("gold", "kind"),
    [("7", "number"), ("seven", "number"), ("7 times", "number"), ("flute", "word"), ("yes", "word"),
     ("12.5 s", "time"), ("0:12", "time"), ("0.8 s", "duration"), ("800 ms", "duration"), ("3.0-5.0 s", "span"),
     ("from 0:03 to 0:05", "span"), ("between 3 and 5 seconds", "span"), ("hi-hat", "word")],
)  # fmt: skip
def test_infer_kind(gold: str, kind: str) -> None:
    assert infer_kind(gold) == kind


def test_inferred_kind_is_used_without_one() -> None:
    assert open_match("3.0-5.0 s", "from 0:03 to 0:05") and not open_match("3.0-5.0 s", "3-7 s")
    assert open_match("7", "seven") and not open_match("7", "six")
    assert open_match("0.8 s", "800 ms") and not open_match("0.8 s", "1.2 s")  # a short time: a duration
    assert open_match("12 s", "12.4 s") and not open_match("12 s", "14 s")  # a long one: a time, 0.5 s
    assert open_match("flute", "Flutes") and open_match("flute", "flute", "bogus-kind")


def test_normalise_and_parsers() -> None:
    assert normalise("The Hi-Hats.") == "hihat"
    assert normalise("It is seven") == "7"
    assert normalise("7.0") == "7"
    assert normalise("  ") == ""
    assert parse_number("there are 7 (seven)") == 7.0 and parse_number("7 or 8") is None
    assert parse_number("no digits here") is None
    assert parse_times("from 0:03 to 5 s") == [3.0, 5.0]
    assert parse_times("between 3 and 5 seconds") == [3.0, 5.0]
    assert parse_times("800 ms, 1 min") == [0.8, 60.0]
    assert parse_times("clip2 at 1:02.5") == [62.5]


@settings(max_examples=400, deadline=None)
@given(
    gold=st.text(max_size=20) | st.sampled_from(["7", "flute", "12.5 s", "0.8 s", "3.0-5.0 s"]),
    prediction=st.text(max_size=40) | st.text(alphabet="0123456789.:-– smsecondtofrombetweenand", max_size=40),
    kind=st.sampled_from([*OPEN_KINDS, None, "choice", ""]),
)
def test_never_raises(gold: str, prediction: str, kind: str | None) -> None:
    assert isinstance(open_match(gold, prediction, kind), bool)
    assert isinstance(normalise(prediction), str)
    assert all(isinstance(t, float) for t in parse_times(prediction))
    assert infer_kind(gold) in OPEN_KINDS


def test_hostile_inputs_are_fast_and_wrong() -> None:
    huge = "9" * 100_000
    assert open_match("7", huge, "number") is False
    assert open_match("3.0-5.0 s", f"{huge} s - {huge} s", "span") is False
    assert open_match("7", "seven " * 50_000, "number") is True  # one value, said many times
    assert open_match("7", None, "number") is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "gold", "kind", "correct"),
    [("seven", "7", "number", True), ("8", "7", "number", False), ("the Flute", "flute", "word", True),
     ("800 ms", "0.8 s", "duration", True), ("from 0:03 to 0:05", "3.0-5.0 s", "span", True),
     ("3-5 s", "3.0-5.0 s", None, True), ("3-9 s", "3.0-5.0 s", None, False)],
)  # fmt: skip
def test_verify_judges_open_questions_with_the_matcher(answer: str, gold: str, kind: str | None, correct: bool) -> None:
    text = f"<think>I hear it <seg>1.0, 2.0</seg> there.</think><answer>{answer}</answer>"
    v = verify(text, [], gold, 1, answer_kind=kind)
    assert v.correct is correct and v.choice is None and v.format_ok
    assert v.terms.accuracy == (0.5 if correct else 0.0) and v.terms.segment == (0.5 if correct else 0.0)
    assert verify(text, [], None, 1, answer_kind=kind).correct is None  # no gold: no judgement
    assert verify("<think>x</think>", [], gold, 0, answer_kind=kind).correct is False  # no answer: wrong


def test_choices_still_use_the_mmau_matcher() -> None:
    # With choices the kind is ignored: "seven" has none of the choices' words, so it selects nothing.
    text = "<think>x</think><answer>seven</answer>"
    assert verify(text, ["6", "7", "8"], "7", 0, answer_kind="number").correct is False
    assert verify("<think>x</think><answer>7</answer>", ["6", "7", "8"], "7", 0, answer_kind="number").correct

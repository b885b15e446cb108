"""The open-answer matcher: judges a free answer (no choices) against a gold answer of a known kind.

Multiple-choice items keep MMAU's matcher (`echo_agent.verifier`); items with ``choices: []`` carry an
``answer_kind`` and are judged here by `open_match(gold, prediction, kind)`. Gold and prediction go through
the same parsing, so a gold written "12.5 s", "0:12.5" or "12.5" means the same.

Rules (documented in docs/design.md §5, "Open answers"):

- **Normalising** (`normalise`): case-folded; hyphens, underscores and punctuation become spaces (a
  decimal point or a clock colon inside a number is kept); articles (a, an, the) dropped before a word
  (a last "a" is the letter: "the letter a" -> "a"); leading filler
  dropped ("the answer is", "it is", "there are", "I hear", "the word", "about", "at", ...); number words
  written as digits ("seven" -> "7", "twenty-one" -> "21", "once"/"twice" -> "1"/"2"); plurals made
  singular ("flutes" -> "flute", "crashes" -> "crash"); a small synonym table for names written several
  ways ("hi-hat"/"hihat"/"hi hat"/"high hat"; "kick drum"/"bass drum" -> "kick"; "snare drum" -> "snare";
  "crash cymbal" -> "crash").
- **number**: every number in the prediction (digits or words: "7", "7.0", "seven", "seven times", "there
  are 7", "7 (seven)") must have one value, equal to the gold's. Two different numbers are ambiguous: wrong.
- **word**: exact equality after normalising ("The Flute." = "flute", "Hi-hats" = "hihat"). A yes/no gold
  also accepts an answer that starts with it and does not contain the other ("Yes, the same speaker").
- **time**: one time in the prediction, within 0.5 s of the gold. Times are "12", "12.5 s", "12s",
  "12 seconds", "12 sec", "800 ms", "1 min", "0:12", "00:12", "1:02.5", "0:00:12"; a bare number is
  seconds. Number words count only when the text has no digits ("seven seconds").
- **duration**: one time, within max(0.15 s, 20 % of the gold).
- **span**: exactly two times, start <= end, each end within max(0.5 s, 10 % of the gold's length) of the
  gold's ("3-5 s", "3.0–5.0 s", "3 to 5 s", "from 0:03 to 0:05", "between 3 and 5 seconds", "00:03-00:05").
  An end written without a unit takes the other end's ("3-5 s", "between 3000 and 5000 ms").
- Kind unknown (`kind=None`, `infer_kind`): two times joined by a range word or dash -> span; one time with
  a unit or clock -> duration below 2.5 s, time from 2.5 s on (the stricter tolerance of the two); a bare
  number -> number; anything else -> word.

Nothing here raises on any input (model-written text, hostile strings): an unparseable answer is wrong, an
unparseable gold matches only by word equality. Thousands separators and decimal commas are not read.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

__all__ = ["OPEN_KINDS", "OpenKind", "infer_kind", "normalise", "open_match", "parse_number", "parse_times"]

OpenKind = Literal["number", "word", "time", "duration", "span"]
OPEN_KINDS: tuple[str, ...] = get_args(OpenKind)

TIME_TOLERANCE_S = 0.5
DURATION_FLOOR_S, DURATION_SHARE = 0.15, 0.20
SPAN_FLOOR_S, SPAN_SHARE = 0.5, 0.10
_MAX_CHARS = 2000  # an answer longer than this is not a short open answer: judged on its head only

_UNITS = {"zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
          "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
          "once": 1, "twice": 2, "thrice": 3}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Leading phrases that carry no answer, longest first so "there are" wins over "there".
_FILLERS: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(p.split())
            for p in (
                "the answer is", "answer is", "answer", "final answer", "it is", "it s", "its", "it was",
                "that is", "this is", "that s", "there are", "there is", "there were", "there was", "i hear",
                "i heard", "i count", "i counted", "i think", "i think it is", "word", "digit", "number",
                "instrument", "sound", "letter", "approximately", "about", "around", "roughly", "nearly", "exactly",
                "only", "at", "at about", "at around", "it plays", "it starts at", "spoken word",
            )
        ),
        key=len,
        reverse=True,
    )
)  # fmt: skip
# Names written several ways -> one spelling (applied to word sequences after plurals are made singular).
_SYNONYMS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("hi", "hat"): ("hihat",),
    ("high", "hat"): ("hihat",),
    ("kick", "drum"): ("kick",),
    ("bass", "drum"): ("kick",),
    ("snare", "drum"): ("snare",),
    ("crash", "cymbal"): ("crash",),
}
_KEEP_S = ("ss", "us", "is", "ous")  # "glass", "bus", "this", "nervous" are not plurals

_WORD_RE = re.compile(r"\d+(?::\d+)*(?:\.\d+)?|[^\W\d_]+|\d+")
_NUMBER_RE = re.compile(r"(?<![^\W\d_])(\d+(?:\.\d+)?|\.\d+)(?![^\W\d_])")
_TIME_RE = re.compile(
    r"(?<![^\W\d_])(?:(?P<clock>\d{1,3}(?::\d{1,2}){1,2}(?:\.\d+)?)"
    r"|(?P<num>\d+(?:\.\d+)?|\.\d+)(?:\s*(?P<unit>milliseconds?|millisecs?|msecs?|ms|minutes?|mins?|min"
    r"|seconds?|secs?|s)(?![^\W\d_]))?)"
)
_SMALL = "one|two|three|four|five|six|seven|eight|nine"
_SPELLED_RE = re.compile(
    rf"\b(?:({'|'.join(_TENS)})(?:[\s-]+({_SMALL})\b)?|({'|'.join(sorted(_UNITS, key=len, reverse=True))}))\b"
)
_WHOLE_RE = re.compile(r"\d+\.0+")
_RANGE_RE = re.compile(r"\d\s*(?:-|–|—|to|and|until|till)\s*\d|\d\s*(?:s|sec|secs|seconds?|ms)?\s*(?:-|–|—)")


# ------------------------------------------------------------------------------------------- normalising


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.endswith("s") or word.endswith(_KEEP_S):
        return word
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    return word[:-1]


def _number_words(words: list[str]) -> list[str]:
    """Number words as digit strings: "twenty one" -> "21", "seven" -> "7"; other words unchanged."""
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _TENS:
            value = _TENS[w]
            if i + 1 < len(words) and words[i + 1] in _UNITS and 0 < _UNITS[words[i + 1]] < 10:
                value += _UNITS[words[i + 1]]
                i += 1
            out.append(str(value))
        elif w in _UNITS:
            out.append(str(_UNITS[w]))
        else:
            out.append(w)
        i += 1
    return out


def _strip_fillers(words: list[str]) -> list[str]:
    changed = True
    while changed and words:
        changed = False
        if words[0] in _ARTICLES and len(words) > 1:
            words = words[1:]
            changed = True
            continue
        for phrase in _FILLERS:
            if len(words) > len(phrase) and tuple(words[: len(phrase)]) == phrase:
                words = words[len(phrase) :]
                changed = True
                break
    return words


def _synonyms(words: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(words):
        pair = tuple(words[i : i + 2])
        if pair in _SYNONYMS:
            out.extend(_SYNONYMS[pair])
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(str(text)[:_MAX_CHARS].casefold())


def normalise(text: str) -> str:
    """The comparable form of a short answer: "The Hi-Hats." -> "hihat", "It is seven" -> "7" (see module doc)."""
    try:
        raw = _words(text)
        # An article is dropped before a word, not as the last word: the letter "a" is an answer too.
        words = [_singular(w) for i, w in enumerate(raw) if w not in _ARTICLES or i + 1 == len(raw)]
        words = _synonyms(_strip_fillers(_number_words(words)))
        return " ".join(w.split(".")[0] if _WHOLE_RE.fullmatch(w) else w for w in words)  # "7.0" -> "7"
    except Exception:  # model text must never raise; no known input reaches this
        return ""


# ---------------------------------------------------------------------------------------------- parsing


def _spell_digits(text: str) -> str:
    """`text` with its number words written as digits, separators kept ("twenty-one times" -> "21 times")."""

    def one(m: re.Match[str]) -> str:
        tens, unit = m.group(1), m.group(2)
        if tens is None:
            return str(_UNITS[m.group(3)])
        return str(_TENS[tens] + (_UNITS[unit] if unit else 0))

    return _SPELLED_RE.sub(one, text)


def _digits_for_words(text: str) -> str:
    """`text` with number words replaced by digits, only when it holds no digit at all."""
    return text if re.search(r"\d", text) else _spell_digits(text)


def parse_number(text: str) -> float | None:
    """The one number `text` states (digits or words), or None when it states none or two different ones."""
    try:
        t = _spell_digits(str(text)[:_MAX_CHARS].casefold())
        values = {float(m) for m in _NUMBER_RE.findall(t)}
        values = {v for v in values if math.isfinite(v)}
        return values.pop() if len(values) == 1 else None
    except Exception:
        return None


def _seconds(num: str, unit: str | None) -> float:
    value = float(num)
    if unit is None:
        return value
    if unit.startswith("m") and not unit.startswith("min"):
        return value / 1000.0  # ms, msec, millisecond
    if unit.startswith("min"):
        return value * 60.0
    return value


def _clock(text: str) -> float:
    total = 0.0
    for part in text.split(":"):
        total = total * 60.0 + float(part)
    return total


def parse_times(text: str) -> list[float]:
    """Every time `text` states, in seconds and in order ("from 0:03 to 5 s" -> [3.0, 5.0]).

    A number without a unit takes the unit of the next number that has one ("3-5 s", "between 3 and
    5 seconds"), else of the previous one, else seconds.
    """
    try:
        t = _digits_for_words(str(text)[:_MAX_CHARS].casefold())
        found: list[tuple[str, str | None]] = []  # (number or clock, unit); unit "clock" for clocks
        for m in _TIME_RE.finditer(t):
            if m.group("clock"):
                found.append((m.group("clock"), "clock"))
            else:
                found.append((m.group("num"), m.group("unit")))
        units: list[str | None] = [u for _, u in found]
        for i, u in enumerate(units):
            if u is None:
                later = next((x for x in units[i + 1 :] if x not in (None, "clock")), None)
                earlier = next((x for x in reversed(units[:i]) if x not in (None, "clock")), None)
                units[i] = later or earlier
        out = [_clock(v) if u == "clock" else _seconds(v, u) for (v, _), u in zip(found, units, strict=True)]
        return [v for v in out if math.isfinite(v)]
    except Exception:
        return []


def infer_kind(gold: str) -> OpenKind:
    """The kind a gold answer reads as, when the data does not say (see the module doc)."""
    try:
        text = str(gold)[:_MAX_CHARS].casefold()
        times = parse_times(text)
        timed = re.search(r"\d:\d|\d\s*(?:ms|s|sec|secs|seconds?|milliseconds?|min|minutes?)(?![^\W\d_])", text)
        if len(times) == 2 and _RANGE_RE.search(text):
            return "span"
        if len(times) == 1 and timed:
            return "time" if ":" in text or times[0] >= 2.5 else "duration"
        words = normalise(text).split()
        # "7", "seven", "7 times", "7 beeps": one number, at most one word after it
        if parse_number(text) is not None and words and _NUMBER_RE.fullmatch(words[0]) and len(words) <= 2:
            return "number"
        return "word"
    except Exception:
        return "word"


# ---------------------------------------------------------------------------------------------- matching


def _yes_no(gold: str, pred: str) -> bool:
    other = "no" if gold == "yes" else "yes"
    words = pred.split()
    return bool(words) and words[0] == gold and other not in words


def open_match(gold: str, prediction: str, kind: str | None = None) -> bool:
    """Does `prediction` state the open answer `gold`? `kind`: number | word | time | duration | span, or None
    to infer it from `gold` (`infer_kind`); any other value is treated as None. Never raises."""
    try:
        if not isinstance(gold, str) or not isinstance(prediction, str) or not prediction.strip():
            return False
        k: str = kind if kind in OPEN_KINDS else infer_kind(gold)
        if k == "word":
            g, p = normalise(gold), normalise(prediction)
            if not g or not p:
                return False
            return g == p or (g in ("yes", "no") and _yes_no(g, p))
        if k == "number":
            gv, pv = parse_number(gold), parse_number(prediction)
            if gv is None:  # a gold we cannot read as a number: fall back to word equality
                return bool(normalise(gold)) and normalise(gold) == normalise(prediction)
            return pv is not None and abs(gv - pv) < 1e-6
        gold_t, pred_t = parse_times(gold), parse_times(prediction)
        if k == "span":
            if len(gold_t) != 2 or len(pred_t) != 2 or pred_t[0] > pred_t[1]:
                return False
            (ga, gb), (pa, pb) = sorted(gold_t), pred_t
            tol = max(SPAN_FLOOR_S, SPAN_SHARE * (gb - ga))
            return abs(pa - ga) <= tol + 1e-9 and abs(pb - gb) <= tol + 1e-9
        if len(gold_t) != 1 or len(pred_t) != 1:
            return False
        g1, p1 = gold_t[0], pred_t[0]
        tol = TIME_TOLERANCE_S if k == "time" else max(DURATION_FLOOR_S, DURATION_SHARE * abs(g1))
        return abs(p1 - g1) <= tol + 1e-9
    except Exception:  # model text must never raise
        return False

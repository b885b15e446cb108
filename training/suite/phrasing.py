"""Language as people write it: question templates, and how times, spans, durations and choices are written.

Every category has a `Bank` of question templates (at least eight, `{slot}` placeholders filled with
`str.format`), split into **train** templates and **held-out** templates, plus follow-up templates for the
later turns of a thread ("And between 20 and 30 s?"). Times and choices are written through *formats*, also
split: the held-out-phrasing split uses only held-out templates and held-out choice formats, so it shares no
question template and no choice format with training (tests check this by construction).

Time and span formats inside question text are split too, but as a composition: every held-out time format
writes numbers the way some train format does, with a different unit word or clock layout, so a model can
reach them by generalising rather than by memorising.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from .core import PhrasingSplit

__all__ = [
    "CHOICE_FORMATS",
    "COUNT_WORDS",
    "SPAN_FORMATS",
    "TIME_FORMATS",
    "TRACE_LEADS",
    "Bank",
    "choice_strings",
    "int_words",
    "listen",
    "number_word",
    "pick_format",
    "say_span",
    "say_time",
]


def _num(x: float) -> str:
    """12 -> "12", 12.5 -> "12.5", 12.25 -> "12.25": integers without a decimal point, else as short as exact."""
    r = round(float(x), 2)
    return str(int(r)) if r == int(r) else f"{r:g}"


def _seconds(x: float) -> str:
    """1 -> "1 second", 0.8 -> "0.8 seconds"."""
    return f"{_num(x)} second" + ("" if _num(x) == "1" else "s")


def _clock(x: float, pad: bool = False) -> str:
    """12 -> "0:12", 72.5 -> "1:12.5" (m:ss, fractional seconds kept); `pad` gives "00:12"."""
    m, s = divmod(round(float(x), 2), 60)
    sec = _num(s)
    if float(s) < 10:
        sec = "0" + sec
    return f"{int(m):02d}:{sec}" if pad else f"{int(m)}:{sec}"


TimeFormat = Callable[[float], str]

TIME_FORMATS: dict[str, tuple[PhrasingSplit, TimeFormat]] = {
    "t_s": ("train", lambda t: f"{_num(t)} s"),
    "t_seconds": ("train", lambda t: f"{_num(t)} seconds"),
    "t_glued": ("train", lambda t: f"{_num(t)}s"),
    "t_clock": ("train", lambda t: _clock(t)),
    "t_decimal": ("train", lambda t: f"{float(t):.1f} s"),
    "t_sec": ("heldout", lambda t: f"{_num(t)} sec"),
    "t_clock_padded": ("heldout", lambda t: _clock(t, pad=True)),
}
"""Single instants in question text: id -> (split, writer)."""

SpanFormat = Callable[[float, float], str]

SPAN_FORMATS: dict[str, tuple[PhrasingSplit, SpanFormat]] = {
    "s_between": ("train", lambda a, b: f"between {_num(a)} and {_num(b)} seconds"),
    "s_from_to": ("train", lambda a, b: f"from {_num(a)} s to {_num(b)} s"),
    "s_dash": ("train", lambda a, b: f"{float(a):.1f}-{float(b):.1f} s"),
    "s_clock": ("train", lambda a, b: f"from {_clock(a)} to {_clock(b)}"),
    "s_and_s": ("train", lambda a, b: f"between {_num(a)} s and {_num(b)} s"),
    "s_to_sec": ("heldout", lambda a, b: f"from {_num(a)} to {_num(b)} sec"),
    "s_clock_dash": ("heldout", lambda a, b: f"{_clock(a, pad=True)}-{_clock(b, pad=True)}"),
}
"""Spans in question text. Templates say where the span goes ("How many ... {span}?")."""


def say_time(t: float, fmt: str) -> str:
    return TIME_FORMATS[fmt][1](t)


def say_span(a: float, b: float, fmt: str) -> str:
    return SPAN_FORMATS[fmt][1](a, b)


def pick_format(
    table: Mapping[str, tuple[PhrasingSplit, object]], rng: np.random.Generator, split: PhrasingSplit
) -> str:
    """A format id of `split` from `table` (`TIME_FORMATS`, `SPAN_FORMATS` or `CHOICE_FORMATS[kind]`)."""
    ids = [k for k, (s, _) in table.items() if s == split]
    return ids[int(rng.integers(len(ids)))]


# ---------------------------------------------------------------------------------------------- choices

COUNT_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)


def number_word(n: int) -> str:
    return COUNT_WORDS[n] if 0 <= n < len(COUNT_WORDS) else str(n)


_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")


def int_words(n: int) -> str:
    """0..999 in words as people read numbers out: 23 -> "twenty-three", 105 -> "one hundred five"."""
    if not 0 <= n < 1000:
        return str(n)
    if n < 10:
        return COUNT_WORDS[n]
    if n < 20:
        return _TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{COUNT_WORDS[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{COUNT_WORDS[hundreds]} hundred" + (f" {int_words(rest)}" if rest else "")


ChoiceFormat = Callable[[object], str]


def _span_choice(fmt: Callable[[float, float], str]) -> ChoiceFormat:
    def write(v: object) -> str:
        a, b = cast(tuple[float, float], v)
        return fmt(float(a), float(b))

    return write


def _f(fmt: Callable[[float], str]) -> ChoiceFormat:
    return lambda v: fmt(float(v))  # type: ignore[arg-type]


CHOICE_FORMATS: dict[str, dict[str, tuple[PhrasingSplit, ChoiceFormat]]] = {
    # (start, end) spans, e.g. "where is the chord?"
    "span": {
        "c_span_dash": ("train", _span_choice(lambda a, b: f"{a:.1f}-{b:.1f} s")),
        "c_span_between": ("train", _span_choice(lambda a, b: f"between {_num(a)} and {_num(b)} seconds")),
        "c_span_clock": ("heldout", _span_choice(lambda a, b: f"from {_clock(a)} to {_clock(b)}")),
        "c_span_to": ("heldout", _span_choice(lambda a, b: f"{_num(a)} to {_num(b)} sec")),
    },
    # durations in seconds, e.g. "how long does the chord last?"
    "duration": {
        "c_dur_s": ("train", _f(lambda d: f"{d:.1f} s")),
        "c_dur_about": ("train", _f(lambda d: f"about {_seconds(d)}")),
        "c_dur_ms": ("heldout", _f(lambda d: f"{round(d * 1000)} ms")),
        "c_dur_roughly": ("heldout", _f(lambda d: f"roughly {_num(d)} sec")),
    },
    # instants, e.g. "when does the flute enter?"
    "time": {
        "c_time_s": ("train", _f(lambda t: f"{t:.1f} s")),
        "c_time_at": ("train", _f(lambda t: f"at {_num(t)} seconds")),
        "c_time_clock": ("heldout", _f(lambda t: f"at {_clock(t, pad=True)}")),
    },
    # counts
    "count": {
        "c_count_digit": ("train", lambda v: str(int(v))),  # type: ignore[call-overload]
        "c_count_word": ("train", lambda v: number_word(int(v))),  # type: ignore[call-overload]
        "c_count_times": ("heldout", lambda v: f"{int(v)} time" + ("" if int(v) == 1 else "s")),  # type: ignore[call-overload]
    },
    # names of things: instruments, sound sources ("the flute" reads naturally)
    "word": {
        "c_word_plain": ("train", lambda v: str(v)),
        "c_word_title": ("train", lambda v: str(v).capitalize()),
        "c_word_the": ("heldout", lambda v: f"the {v}"),
    },
    # yes / no
    "yesno": {
        "c_yesno_plain": ("train", lambda v: str(v)),
        "c_yesno_title": ("train", lambda v: str(v).capitalize()),
        "c_yesno_upper": ("heldout", lambda v: str(v).upper()),
    },
    # numbers read out (23, 105)
    "number": {
        "c_number_digits": ("train", lambda v: str(int(v))),  # type: ignore[call-overload]
        "c_number_words": ("train", lambda v: int_words(int(v))),  # type: ignore[call-overload]
        "c_number_the": ("heldout", lambda v: f"the number {int(v)}"),  # type: ignore[call-overload]
    },
    # how many voices / speakers
    "voices": {
        "c_voices_digit": ("train", lambda v: str(int(v))),  # type: ignore[call-overload]
        "c_voices_word": ("train", lambda v: number_word(int(v))),  # type: ignore[call-overload]
        "c_voices_noun": ("heldout", lambda v: f"{int(v)} voice" + ("" if int(v) == 1 else "s")),  # type: ignore[call-overload]
    },
    # other one-word answers: digits, spoken words, yes/no, rising/falling, higher/lower
    "label": {
        "c_label_plain": ("train", lambda v: str(v)),
        "c_label_title": ("train", lambda v: str(v).capitalize()),
        "c_label_upper": ("heldout", lambda v: str(v).upper()),
        "c_label_quoted": ("heldout", lambda v: f'"{v}"'),
    },
}
"""Choice formats per value kind: kind -> id -> (split, writer)."""


def choice_strings(
    values: Sequence[object], kind: str, rng: np.random.Generator, split: PhrasingSplit, fmt: str | None = None
) -> tuple[list[str], str]:
    """`values` written in one choice format of `split` (or `fmt`): (choice strings, format id)."""
    table = CHOICE_FORMATS[kind]
    fid = fmt or pick_format(table, rng, split)
    writer = table[fid][1]
    return [writer(v) for v in values], fid


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Bank:
    """The question templates of one category. Slots are `str.format` fields the domain fills."""

    category: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    follow_up: tuple[str, ...] = ()  # later turns of a thread, referring back ("And {span}?"); train only

    def __post_init__(self) -> None:
        if len(self.train) + len(self.heldout) < 8 or not self.train or not self.heldout:
            raise ValueError(f"{self.category}: a bank needs >= 8 templates, some train and some held out")
        if set(self.train) & set(self.heldout) or set(self.follow_up) & set(self.heldout):
            raise ValueError(f"{self.category}: a template is both train and held out")

    def pick(self, rng: np.random.Generator, split: PhrasingSplit, follow_up: bool = False) -> tuple[str, str]:
        """(template id, template text). Follow-ups come from `follow_up` (if any) in either split."""
        if follow_up and self.follow_up:
            if split != "train":
                raise ValueError("follow-up templates are train phrasings; held-out-phrasing items are single turns")
            i = int(rng.integers(len(self.follow_up)))
            return f"{self.category}/follow/{i}", self.follow_up[i]
        pool = self.train if split == "train" else self.heldout
        i = int(rng.integers(len(pool)))
        return f"{self.category}/{split}/{i}", pool[i]


# ------------------------------------------------------------------------------------------------ traces

TRACE_LEADS: tuple[str, ...] = ("I listen to {span}:", "Let me re-listen to {span}:", "Listening again to {span}:")
"""How a gold trace introduces a listen; `{span}` is "A-B s". A few wordings, so no single sentence is learnt."""


def listen(a: float, b: float, rng: np.random.Generator) -> str:
    """One listen in a gold trace: ``I listen to 3.0-7.5 s: <seg>3.0, 7.5</seg>``."""
    lead = TRACE_LEADS[int(rng.integers(len(TRACE_LEADS)))]
    return f"{lead.format(span=f'{a:.1f}-{b:.1f} s')} <seg>{a:.1f}, {b:.1f}</seg>"

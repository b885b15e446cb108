"""The verifier: judges one finished assistant response; the RL reward is built from its verdict (design §5).

Input is the assistant's text with the audio placeholders already removed and the `<seg>` tags kept, e.g.
``<think>I hear a beep <seg>1.0, 2.0</seg> at 1.2 s ...</think><answer>two</answer>``.

Reward (Echo paper, research notes §3.1): ``R = R_format + R_acc + R_seg + R_consist`` with

- R_format = 0.5 for exactly one ``<think>…</think>`` and exactly one non-empty ``<answer>…</answer>``;
- R_acc = 0.5 when the answer selects the gold choice;
- R_seg = 0.5 when correct **and** at least one valid listen happened;
- R_consist = -0.1 per reasoning break right after ``</seg>``, never below -0.5.

Answer matching is MMAU's official token matcher (Sakshi113/MMAU ``evaluation.py``), re-implemented here,
with two additions: an answer equal to a choice (case-insensitive) selects that choice first, and a choice
is only selected when it is the unique match. Unlike the paper's inference script we never fall back to
``choices[0]``: an unparseable answer is wrong.

Open questions (no choices, a gold answer) are judged by the normalising matcher `echo_agent.matching.open_match`
with the item's `answer_kind` (number, word, time, duration, span; inferred from the gold when not given).

Everything here takes model-made text, so no function raises on any string input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, computed_field

from .matching import open_match

__all__ = [
    "RewardTerms",
    "RewardWeights",
    "Verdict",
    "count_consistency_breaks",
    "extract_answer",
    "select_choice",
    "string_match",
    "verify",
]

_WORD_RE = re.compile(r"\b\w+\b")
_SEG_CLOSE = "</seg>"


class RewardWeights(BaseModel):
    """Weights of the reward terms. Defaults are the paper's (binary `rl_3` variant of the released code)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: float = 0.5
    accuracy: float = 0.5
    segment: float = 0.5
    consistency_per_break: float = Field(default=-0.1, le=0.0, description="added once per break after </seg>")
    consistency_cap: float = Field(default=-0.5, le=0.0, description="most negative total consistency term")

    @classmethod
    def paper(cls) -> RewardWeights:
        """Echo's reward as the paper describes it: 0.5 format + 0.5 accuracy + 0.5 segment, -0.1/break."""
        return cls()

    @classmethod
    def deepeyes(cls) -> RewardWeights:
        """DeepEyes-style: 0.8 accuracy + 0.2 format + 1.2 when listened and correct; no consistency term."""
        return cls(format=0.2, accuracy=0.8, segment=1.2, consistency_per_break=0.0, consistency_cap=0.0)


class RewardTerms(BaseModel):
    """The reward's summands. `total` is their sum and is included in dumps (ignored when re-validated)."""

    model_config = ConfigDict(frozen=True)

    format: float
    accuracy: float
    segment: float
    consistency: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> float:
        return self.format + self.accuracy + self.segment + self.consistency


class Verdict(BaseModel):
    """The verifier's judgement of one response."""

    model_config = ConfigDict(frozen=True)

    format_ok: bool = Field(description="exactly one <think>…</think> and one non-empty <answer>…</answer>")
    answer: str | None = Field(description="stripped text of the first <answer>…</answer>; None if absent")
    choice: str | None = Field(description="the choice the answer selects; None if none or ambiguous")
    correct: bool | None = Field(description="None when no gold is known; an unparseable answer is False")
    listens: int = Field(description="number of valid listens (counted by the caller)")
    consistency_breaks: int
    terms: RewardTerms
    reward: float = Field(description="== terms.total")
    retry_reason: str | None = Field(
        description='"no_answer" (no <answer>…</answer>), "bad_format" (answer present, tags wrong or '
        "answer empty), None when fine"
    )


def _tokenize(text: str) -> set[str]:
    """MMAU's tokenizer: the set of lower-cased `\\b\\w+\\b` words."""
    return set(_WORD_RE.findall(text.lower()))


def _norm(text: str) -> str:
    """Key for exact matching: case-folded, whitespace collapsed, outer quotes and final period dropped."""
    quotes = " \"'`"
    return " ".join(text.split()).casefold().strip(quotes).rstrip(" .").strip(quotes)


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU's official matcher: does `prediction` select the choice `answer`?

    True when the prediction has at least one word, contains every word of `answer`, and contains no word
    that belongs to another choice but not to `answer`. Choices with exactly `answer`'s word set are ignored.
    """
    prediction_tokens = _tokenize(prediction)
    if not prediction_tokens:
        return False
    answer_tokens = _tokenize(answer)
    incorrect_tokens: set[str] = set()
    for choice in choices:
        choice_tokens = _tokenize(choice)
        if choice_tokens != answer_tokens:
            incorrect_tokens |= choice_tokens - answer_tokens
    return answer_tokens <= prediction_tokens and prediction_tokens.isdisjoint(incorrect_tokens)


def select_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The unique choice the prediction selects, or None (no match, several matches, or no choices).

    1. A prediction equal to a choice (case-insensitive, whitespace/quotes/final period ignored) selects it.
       This settles choices the token rule cannot tell apart: permutations such as
       "first: neutral, second: frustration" / "first: frustration, second: neutral", or time ranges
       "0.5-1.0 s" / "1.0-1.5 s" (both have the words {0, 5, 1, s}).
    2. Otherwise MMAU's `string_match` against every choice; exactly one distinct choice must match.
       Duplicate choices (common in MMAU) count once. There is no fallback to the first choice.
    """
    key = _norm(prediction)
    if not key:
        return None
    for choice in choices:
        if _norm(choice) == key:
            return choice
    matched: dict[str, str] = {}
    for choice in choices:
        if string_match(choice, prediction, choices):
            matched.setdefault(_norm(choice), choice)
    if len(matched) == 1:
        return next(iter(matched.values()))
    return None


def count_consistency_breaks(text: str) -> int:
    """Number of `</seg>` immediately followed by an uppercase letter or `<` (released code's rule).

    "</seg> The" is fine; "</seg>The" and "</seg><seg>" are breaks; a `</seg>` ending the text is not.
    The cap is applied in the reward, not here.
    """
    breaks = 0
    start = text.find(_SEG_CLOSE)
    while start != -1:
        after = start + len(_SEG_CLOSE)
        if after < len(text) and (text[after] == "<" or text[after].isupper()):
            breaks += 1
        start = text.find(_SEG_CLOSE, after)
    return breaks


def _tag_bodies(text: str, tag: str, limit: int | None = None) -> list[str]:
    """What `re.findall(r"<tag>(.*?)</tag>", text, re.DOTALL)` returns, in linear time.

    The regex is quadratic on text with many unclosed opening tags (a degenerate, looping model output).
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    bodies: list[str] = []
    pos = 0
    while limit is None or len(bodies) < limit:
        start = text.find(opening, pos)
        if start == -1:
            break
        end = text.find(closing, start + len(opening))
        if end == -1:  # no closing tag after this opening one, hence after none of the later ones either
            break
        bodies.append(text[start + len(opening) : end])
        pos = end + len(closing)
    return bodies


def extract_answer(text: str) -> str | None:
    """Stripped text of the first `<answer>…</answer>` (newlines allowed), or None if there is none."""
    bodies = _tag_bodies(text, "answer", limit=1)
    return bodies[0].strip() if bodies else None


def _is_correct(
    answer: str | None, choice: str | None, gold: str | None, choices: Sequence[str], answer_kind: str | None
) -> bool | None:
    if gold is None:
        return None
    if not choices:  # an open question: the answer itself is matched against the gold
        return answer is not None and open_match(gold, answer, answer_kind)
    if answer is None or choice is None:
        return False
    gold_key = _norm(gold)
    if any(_norm(c) == gold_key for c in choices):
        # Gold is one of the choices: the selected choice must be it. This is what MMAU's scoring means,
        # minus one MMAU quirk: it credits a *different* choice with the gold's exact word set.
        return _norm(choice) == gold_key
    return string_match(gold, answer, choices)


def verify(
    text: str,
    choices: Sequence[str],
    gold: str | None,
    valid_listens: int,
    weights: RewardWeights | None = None,
    answer_kind: str | None = None,
) -> Verdict:
    """Judge one finished assistant response and compute its reward.

    `valid_listens` is the number of listens that actually injected audio (counted by the rollout).
    With `gold=None` (inference) `correct` is None and accuracy/segment terms are 0. With no `choices` the
    question is open: `answer_kind` (number | word | time | duration | span; None or "choice": inferred from
    `gold`) says how `open_match` compares the answer with `gold`.
    """
    w = weights if weights is not None else RewardWeights.paper()
    answers = _tag_bodies(text, "answer", limit=2)
    answer = answers[0].strip() if answers else None
    n_think = len(_tag_bodies(text, "think", limit=2))
    format_ok = n_think == 1 and len(answers) == 1 and bool(answer)

    choice = select_choice(answer, choices) if answer else None
    correct = _is_correct(answer, choice, gold, choices, answer_kind)
    listens = max(0, valid_listens)
    breaks = count_consistency_breaks(text)

    # Following the released code (avqa.py), not the paper's text: a response with broken format earns no
    # format, accuracy or segment reward even if its answer is right. The consistency penalty always applies.
    earns = format_ok
    terms = RewardTerms(
        format=w.format if earns else 0.0,
        accuracy=w.accuracy if earns and correct else 0.0,
        segment=w.segment if earns and correct and listens >= 1 else 0.0,
        consistency=max(w.consistency_cap, w.consistency_per_break * breaks) if breaks else 0.0,
    )

    retry_reason: str | None = None
    if answer is None:
        retry_reason = "no_answer"
    elif not format_ok:
        retry_reason = "bad_format"

    return Verdict(
        format_ok=format_ok,
        answer=answer,
        choice=choice,
        correct=correct,
        listens=listens,
        consistency_breaks=breaks,
        terms=terms,
        reward=terms.total,
        retry_reason=retry_reason,
    )

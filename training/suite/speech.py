"""The speech domain: spoken digits, numbers, letters and words by 1-4 voices, over a noise bed.

A scene is a sequence of utterances (one digit, number, letter or word each) laid out left to right with
pauses, in *turns*: runs of utterances by one voice, the next turn by another voice (voices come back). The
voices come from distinct clusters of `voices.voices(sources)` (train: espeak-ng, festival, Asterisk's real
recordings; held out: every flite voice), so two voices are always clearly different, and "the same speaker"
is literally the same voice. Utterances never cross a multiple of 10 s (they stay 0.2 s inside), so traces
can scan the clip in 10 s windows from 0 and every utterance lies wholly in one window. The mix goes over
white, pink or brown noise at an SNR (speech power over the voiced samples / noise power) of 6-20 dB.

Events: ``{"kind": "speech", "onset", "offset", "label", "type", "text", "voice", "gender", "gain"}`` (+
``"value"`` for digits and numbers). `label` is how questions and choices name it ("seven", "twenty-three",
"b", "dog"); `text` what the voice was given; `type` digit | number | letter | word.

Every scene holds at least one digit, one number and two words said once, so every category can be asked
of any scene (threads ask several); the scene made for a category is arranged so that its balanced answers
exist: a `digit_at` scene says all ten digits, a `word_count` scene says four words 1, 2, 3 and 4 times, a
`same_speaker` scene has 2-4 voices speaking at least twice each, a `voice_count` scene four voices.

Categories, their balance (`core.balanced` over (value, position) combos) and gold traces:

- ``digit_at``: which digit is spoken at T (digit x 4 positions). One listen to T +- 0.5 s: " it is the
  digit seven."
- ``number_between``: what number is read out between A and B; the span holds one number and no digit
  (4 positions; the number is drawn among the scene's; the distractors are numbers like it, so the answer
  is never the odd one out: `number_family`). One listen to [A, B].
- ``word_count``: how many times a word is said in the clip or between A and B (count 1-4 x 4 positions;
  the choices are always 1-4).
  Listens to the span (cut at multiples of 10 s when longer than 10 s), or to the clip's 10 s windows from
  0, one count each, then the sum.
- ``word_order``: which of two words (each said once) comes first (first-named/second-named x 2 positions).
  Scan 10 s windows from 0 until one holds either word; when one window holds both, zoom in (its first 5 s,
  then halves), as the synthetic suite's ``order`` does.
- ``same_speaker``: is the speaker at T1 the same as at T2 (yes/no x 2 positions). Listens to T1 +- 0.5 s and
  T2 +- 0.5 s, each " a female voice says dog.", then the verdict.
- ``voice_count``: how many different voices speak in the clip or between A and B (1-4 x 4 positions; the
  span covers whole turns). One listen to the span (the whole clip: 0 s to its end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import phrasing
from .core import (
    SAMPLE_RATE,
    Domain,
    MissingSourceError,
    PhrasingSplit,
    Question,
    Scene,
    SourceSplit,
    Waveform,
    balanced,
    mix_at_snr,
    peak_normalise,
    place,
)
from .phrasing import number_word
from .voices import Voice, heldout_voice_ids, number_words, utterance, voice, voices

__all__ = [
    "BANKS",
    "CATEGORIES",
    "DIGITS",
    "HELDOUT_SOURCES",
    "LETTERS",
    "NUMBERS",
    "SUB_CATEGORIES",
    "WORDS",
    "ask",
    "isolate",
    "make_scene",
    "number_family",
    "number_label",
]

DOMAIN: Domain = "speech"
CATEGORIES: tuple[str, ...] = (
    "digit_at",
    "number_between",
    "word_count",
    "word_order",
    "same_speaker",
    "voice_count",
)
SUB_CATEGORIES: dict[str, str] = {
    "digit_at": "spoken digit recognition",
    "number_between": "spoken number recognition",
    "word_count": "word counting",
    "word_order": "word order",
    "same_speaker": "speaker verification",
    "voice_count": "speaker counting",
}

DIGITS: tuple[str, ...] = tuple(number_words(n) for n in range(10))
NUMBERS: tuple[int, ...] = (
    *range(10, 100),
    *(101, 105, 110, 112, 115, 120, 125, 130, 150, 175, 200, 205, 210, 250, 300),
    *(333, 350, 400, 405, 450, 500, 512, 600, 650, 700, 750, 800, 808, 900, 999),
)
"""Numbers read out (in words, "one hundred five"); a fixed set so every voice's renders stay cached."""
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")
WORDS: tuple[str, ...] = (
    *("red", "blue", "green", "yellow", "black", "white"),
    *("cat", "dog", "horse", "bird", "fish", "cow"),
    # Asterisk has single-word recordings of these, so scenes with its real voice still have words.
    *("hello", "goodbye", "number", "time", "minute", "extension", "calling", "location"),
)


def _heldout_sources() -> dict[str, tuple[str, ...]]:
    try:
        ids = heldout_voice_ids()
    except MissingSourceError:  # flite absent: the voices it ships (what `flite -lv` lists in Debian)
        ids = tuple(f"flite:{n}" for n in ("awb", "awb_time", "kal", "kal16", "rms", "slt"))
    return {"engines": ("flite",), "voices": ids}


HELDOUT_SOURCES: dict[str, tuple[str, ...]] = _heldout_sources()
"""`sources="heldout"` speaks only with these (every flite voice); `sources="train"` never touches them."""

_SR = SAMPLE_RATE
_WINDOW = 10.0  # traces scan the clip in windows of this many seconds from 0
_MARGIN = 0.2  # utterances stay this far inside one window
_MIN_DUR, _MAX_DUR = 10.0, 30.0
_HALF = 0.5  # listens around an instant: T +- this
_SNR = (6.0, 20.0)
_BEDS = ("white noise", "pink noise", "brown noise")
_MAX_LISTENS = 6

# ------------------------------------------------------------------------------------------------ banks

BANKS: dict[str, phrasing.Bank] = {
    "digit_at": phrasing.Bank(
        "digit_at",
        train=(
            "Which digit is spoken at {time}?",
            "What digit do you hear at {time}?",
            "At {time}, which digit is said?",
            "Which number from zero to nine is spoken at {time}?",
            "What digit is being said around {time}?",
            "Listen at {time}: which digit is it?",
        ),
        heldout=(
            "Tell me the digit that is spoken at {time}.",
            "Around {time} someone says a single digit. Which one?",
        ),
        follow_up=("What about at {time}?", "And the digit at {time}?", "And at {time}?"),
    ),
    "number_between": phrasing.Bank(
        "number_between",
        train=(
            "What number is read out {span}?",
            "Which number is spoken {span}?",
            "What number do you hear {span}?",
            "Someone reads out a number {span}. Which number is it?",
            "Which number is said {span}?",
            "What number does the speaker say {span}?",
        ),
        heldout=(
            "Tell me the number that is read out {span}.",
            "What is the number spoken {span}?",
        ),
        follow_up=("And {span}?", "What about {span}?", "And the number {span}?"),
    ),
    "word_count": phrasing.Bank(
        "word_count",
        train=(
            'How many times is "{word}" said {where}?',
            'How often do you hear the word "{word}" {where}?',
            'Count how many times "{word}" is spoken {where}.',
            'How many times does someone say "{word}" {where}?',
            'How many times can you hear "{word}" {where}?',
            'What is the number of times "{word}" is said {where}?',
        ),
        heldout=(
            'Tell me how often the word "{word}" comes up {where}.',
            'How many occurrences of "{word}" are there {where}?',
        ),
        follow_up=('And "{word}" {where}?', 'What about "{word}" {where}?'),
    ),
    "word_order": phrasing.Bank(
        "word_order",
        train=(
            'Which word comes first, "{a}" or "{b}"?',
            'Which is said first: "{a}" or "{b}"?',
            'Which do you hear earlier, "{a}" or "{b}"?',
            'Of "{a}" and "{b}", which one is spoken first?',
            'Which word is spoken before the other: "{a}" or "{b}"?',
            'Is "{a}" or "{b}" said first?',
        ),
        heldout=(
            'Tell me which comes earlier in the clip: "{a}" or "{b}".',
            'Out of "{a}" and "{b}", which one does the speaker say first?',
        ),
        follow_up=('And "{a}" or "{b}"?', 'What about "{a}" and "{b}"?'),
    ),
    "same_speaker": phrasing.Bank(
        "same_speaker",
        train=(
            "Is the speaker at {t1} the same as the speaker at {t2}?",
            "Are the voices at {t1} and {t2} the same person?",
            "Does the same voice speak at {t1} and at {t2}?",
            "Is it the same speaker at {t1} and {t2}?",
            "Is the word at {t2} said by the same speaker as the word at {t1}?",
            "Do {t1} and {t2} have the same speaker?",
        ),
        heldout=(
            "Would you say one person speaks at both {t1} and {t2}?",
            "Is the person talking at {t1} also the one talking at {t2}?",
        ),
        follow_up=("And at {t1} and {t2}?", "What about {t1} and {t2}?"),
    ),
    "voice_count": phrasing.Bank(
        "voice_count",
        train=(
            "How many different voices speak {where}?",
            "How many different speakers are there {where}?",
            "How many distinct voices do you hear {where}?",
            "Count the different voices {where}.",
            "How many people speak {where}?",
            "How many separate speakers can you hear {where}?",
        ),
        heldout=(
            "Tell me the number of different voices {where}.",
            "How many unique speakers talk {where}?",
        ),
        follow_up=("And {where}?", "What about {where}?", "And how many voices {where}?"),
    ),
}
_WHOLE = ("in the clip", "in this recording", "in the whole clip", "in total")
"""How questions about the whole clip say so (`{where}`)."""

# ------------------------------------------------------------------------------------------------ scenes

_Utt = dict[str, Any]  # label, type, text, value, droppable; voice added when assigned


def _utt(label: str, kind: str, droppable: bool = False) -> _Utt:
    if kind == "digit":
        return {"label": label, "type": kind, "text": label, "value": DIGITS.index(label), "droppable": droppable}
    if kind == "number":
        n = int(label)
        return {"label": number_label(n), "type": kind, "text": number_words(n), "value": n, "droppable": droppable}
    return {"label": label, "type": kind, "text": label, "droppable": droppable}


def number_label(n: int) -> str:
    """How questions and traces write a number read out: 23 -> "twenty-three", 123 -> "one hundred twenty-three"."""
    words = number_words(n).split()
    if len(words) >= 2 and words[-2] in {"twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"}:
        words[-2:] = [f"{words[-2]}-{words[-1]}"]
    return " ".join(words)


def _pick_voices(rng: np.random.Generator, sources: SourceSplit, n: int) -> list[Voice]:
    """`n` voices from distinct clusters (fewer if the split has fewer clusters), in random order."""
    pool = voices(sources)
    clusters = sorted({v.cluster for v in pool})
    chosen = [clusters[int(i)] for i in rng.permutation(len(clusters))[: min(n, len(clusters))]]
    out = []
    for c in chosen:
        members = [v for v in pool if v.cluster == c]
        out.append(members[int(rng.integers(len(members)))])
    return out


def _vocab(vs: Sequence[Voice]) -> list[str]:
    """The words of `WORDS` that every voice of the scene can say."""
    return [w for w in WORDS if all(v.can_say(w) for v in vs)]


def _draw(rng: np.random.Generator, pool: Sequence[str], k: int, avoid: set[str]) -> list[str]:
    cands = [w for w in pool if w not in avoid]
    return [cands[int(i)] for i in rng.choice(len(cands), size=min(k, len(cands)), replace=False)]


def _numbers(rng: np.random.Generator, k: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """`k` distinct numbers, about a third of them three-digit."""
    small = [n for n in NUMBERS if n < 100 and n not in avoid]
    big = [n for n in NUMBERS if n >= 100 and n not in avoid]
    out: list[int] = []
    while len(out) < k:
        pool = big if rng.random() < 0.35 else small
        n = pool[int(rng.integers(len(pool)))]
        if n not in out:
            out.append(n)
    return out


def _fillers(rng: np.random.Generator, vocab: Sequence[str], k: int, avoid: set[str]) -> list[_Utt]:
    """`k` droppable utterances: letters and words not in `avoid`, each at most once."""
    out: list[_Utt] = []
    words = _draw(rng, vocab, k, avoid)
    letters = _draw(rng, LETTERS, k, avoid)
    for _ in range(k):
        if rng.random() < 0.5 and words:
            out.append(_utt(words.pop(), "word", droppable=True))
        elif letters:
            out.append(_utt(letters.pop(), "letter", droppable=True))
    return out


def _content(rng: np.random.Generator, category: str, vocab: list[str]) -> list[_Utt]:
    """The utterances (in order) a scene made for `category` says."""
    utts: list[_Utt]
    if category == "digit_at":  # all ten digits, so any balanced digit is there
        utts = [_utt(DIGITS[int(i)], "digit") for i in rng.permutation(10)]
        utts += [_utt(str(n), "number") for n in _numbers(rng, 1)]
        utts += _fillers(rng, vocab, int(rng.integers(1, 4)), set())
    elif category == "number_between":
        utts = [_utt(str(n), "number") for n in _numbers(rng, int(rng.integers(4, 7)))]
        utts += [_utt(d, "digit") for d in _draw(rng, DIGITS, int(rng.integers(1, 3)), set())]
        utts += [_utt(w, "word") for w in _draw(rng, vocab, 2, set())]
        utts += _fillers(rng, vocab, int(rng.integers(0, 3)), set(_labels(utts)))
    elif category == "word_count":  # four words said 1, 2, 3 and 4 times: any balanced count is there
        targets = _draw(rng, [*DIGITS, *vocab], 4, set())
        utts = [_utt(w, "digit" if w in DIGITS else "word") for k, w in enumerate(targets) for _ in range(k + 1)]
        utts += [_utt(str(n), "number") for n in _numbers(rng, 1)]
        extra = _draw(rng, [*DIGITS, *vocab], 1, set(targets))
        utts += [_utt(w, "digit" if w in DIGITS else "word") for w in extra]
        utts += _fillers(rng, vocab, int(rng.integers(0, 3)), set(targets) | set(extra))
    elif category == "word_order":
        words = _draw(rng, vocab, int(rng.integers(3, 6)), set())
        utts = [_utt(w, "word") for w in words]
        utts += [_utt(d, "digit") for d in _draw(rng, DIGITS, int(rng.integers(1, 3)), set())]
        utts += [_utt(str(n), "number") for n in _numbers(rng, 1)]
        utts += [_utt(x, "letter", droppable=True) for x in _draw(rng, LETTERS, int(rng.integers(1, 3)), set())]
    elif category in ("same_speaker", "voice_count"):
        m = int(rng.integers(9, 14))
        n_digits, n_numbers = int(rng.integers(2, 5)), int(rng.integers(1, 3))
        words = _draw(rng, vocab, m - n_digits - n_numbers, set())
        utts = [_utt(d, "digit") for d in _draw(rng, DIGITS, n_digits, set())]
        utts += [_utt(str(n), "number") for n in _numbers(rng, n_numbers)]
        utts += [_utt(w, "word", droppable=i >= 2) for i, w in enumerate(words)]
        utts += _fillers(rng, vocab, m - len(utts), set(_labels(utts)))
    else:
        raise ValueError(f"unknown speech category {category!r}; expected one of {CATEGORIES}")
    return [utts[int(i)] for i in rng.permutation(len(utts))]


def _labels(utts: Sequence[_Utt]) -> list[str]:
    return [u["label"] for u in utts]


def _ensure_base(rng: np.random.Generator, utts: list[_Utt], vocab: list[str]) -> None:
    """At least one digit, one number and two words said once, so every category can be asked of the scene."""
    labels = _labels(utts)
    if not any(u["type"] == "digit" for u in utts):
        utts.insert(int(rng.integers(len(utts) + 1)), _utt(_draw(rng, DIGITS, 1, set(labels))[0], "digit"))
    if not any(u["type"] == "number" for u in utts):
        utts.insert(int(rng.integers(len(utts) + 1)), _utt(str(_numbers(rng, 1)[0]), "number"))
    labels = _labels(utts)
    once = [u for u in utts if _countable(u) and labels.count(u["label"]) == 1]
    for w in _draw(rng, [*DIGITS, *vocab], max(0, 2 - len(once)), set(labels)):
        utts.insert(int(rng.integers(len(utts) + 1)), _utt(w, "digit" if w in DIGITS else "word"))


def _turns(rng: np.random.Generator, m: int, n_voices: int, min_each: int) -> list[int]:
    """Voice index per utterance: turns of 1-4 utterances, consecutive turns by different voices, the first
    `n_voices` turns introducing every voice once (so `m >= n_voices` uses them all); each voice says at least
    `min_each` utterances where 50 draws manage it."""
    out: list[int] = []
    for _ in range(50):
        sizes: list[int] = []
        while sum(sizes) < m:
            sizes.append(int(rng.integers(1, 5)))
        sizes[-1] -= sum(sizes) - m
        while len(sizes) < min(n_voices, m):  # split the longest turn until every voice can have one
            i = int(np.argmax(sizes))
            sizes[i : i + 1] = [sizes[i] // 2, sizes[i] - sizes[i] // 2]
        turns = [int(v) for v in rng.permutation(n_voices)][: len(sizes)]
        while len(turns) < len(sizes):
            turns.append(int(rng.choice([v for v in range(n_voices) if v != turns[-1]])) if n_voices > 1 else 0)
        out = [v for v, k in zip(turns, sizes, strict=True) for _ in range(k)]
        if all(out.count(v) >= min_each for v in range(n_voices)):
            break
    return out


def _layout(
    rng: np.random.Generator, lengths: Sequence[float], voice_of: Sequence[int], squeeze: float
) -> tuple[list[float], float]:
    """Onsets (on the sample grid) and the clip length (on the 0.1 s grid, >= 10 s) for utterances of these
    lengths: pauses of 0.35-0.9 s inside a turn and 0.7-1.5 s between turns (times `squeeze`), never across a
    multiple of 10 s."""
    t = float(rng.uniform(0.3, 1.2))
    onsets: list[float] = []
    for i, length in enumerate(lengths):
        if i:
            same = voice_of[i] == voice_of[i - 1]
            t += squeeze * float(rng.uniform(0.35, 0.9) if same else rng.uniform(0.7, 1.5))
        k = math.floor(t / _WINDOW)
        t = max(t, k * _WINDOW + _MARGIN)
        if t + length > (k + 1) * _WINDOW - _MARGIN:
            t = (k + 1) * _WINDOW + _MARGIN + float(rng.uniform(0.0, 0.3))
        t = round(t * _SR) / _SR
        onsets.append(t)
        t += length
    end = t + float(rng.uniform(0.3, 1.2))
    return onsets, max(_MIN_DUR, math.ceil(end * 10) / 10)


def _bed(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white noise":
        return white
    spec = np.fft.rfft(white)
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f) if colour == "pink noise" else f
    spec[0] = 0.0
    return np.fft.irfft(spec, n)


def make_scene(rng: np.random.Generator, sources: SourceSplit, category: str) -> Scene:
    """One 10-30 s clip of speech by 1-4 voices of `sources`, arranged so `category` is well posed."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown speech category {category!r}; expected one of {CATEGORIES}")
    if category == "voice_count":
        n_voices = 4
    elif category == "same_speaker":
        n_voices = int(rng.choice([2, 3, 4], p=[0.5, 0.3, 0.2]))
    else:
        n_voices = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    vs = _pick_voices(rng, sources, n_voices)
    vocab = _vocab(vs)
    utts = _content(rng, category, vocab)
    _ensure_base(rng, utts, vocab)
    min_each = 2 if category == "same_speaker" else 1
    voice_of = _turns(rng, len(utts), len(vs), min_each)
    gains = [float(rng.uniform(0.7, 1.0)) for _ in vs]  # each voice's own loudness
    jitter = [float(rng.uniform(0.9, 1.1)) for _ in utts]

    squeeze = 1.0
    while True:
        wavs = [utterance(vs[v], u["text"]) for u, v in zip(utts, voice_of, strict=True)]
        onsets, duration = _layout(rng, [len(w) / _SR for w in wavs], voice_of, squeeze)
        if duration <= _MAX_DUR:
            break
        # Too long: drop a filler (never a target, nor a voice's last utterances), else shorten the pauses.
        drop = [i for i, u in enumerate(utts) if u["droppable"] and voice_of.count(voice_of[i]) > min_each]
        if drop:
            i = drop[int(rng.integers(len(drop)))]
            del utts[i], voice_of[i], jitter[i]
        else:
            squeeze *= 0.8

    n = round(duration * _SR)
    track = np.zeros(n, dtype=np.float64)
    active = np.zeros(n, dtype=bool)
    events: list[dict[str, Any]] = []
    for u, v, w, t, j in zip(utts, voice_of, wavs, onsets, jitter, strict=True):
        gain = round(gains[v] * j, 4)
        on, off = place(track, w, t, gain)
        active[round(on * _SR) : round(off * _SR)] = True
        ev: dict[str, Any] = {"kind": "speech", "onset": round(on, 6), "offset": round(off, 6), "label": u["label"],
                              "type": u["type"], "text": u["text"], "voice": vs[v].id, "gender": vs[v].gender,
                              "gain": gain}  # fmt: skip
        if "value" in u:
            ev["value"] = u["value"]
        events.append(ev)
    colour = _BEDS[int(rng.integers(len(_BEDS)))]
    snr = round(float(rng.uniform(*_SNR)), 2)
    audio = peak_normalise(mix_at_snr(track, _bed(rng, n, colour), snr, active))
    used = sorted({vs[v].id for v in voice_of}, key=[x.id for x in vs].index)
    meta = {
        "sources": sources,
        "voices": used,
        "clusters": [v.cluster for v in vs if v.id in used],
        "bed": colour,
        "snr_db": snr,
        "arranged_for": category,
    }
    return Scene(domain=DOMAIN, audio=audio, events=events, meta=meta)


def isolate(scene: Scene, events: list[dict[str, Any]]) -> Waveform:
    """Only `events` re-rendered (same voice, text and gain, at the same onsets), no bed: the scene's length."""
    track = np.zeros(len(scene.audio), dtype=np.float64)
    for e in events:
        place(track, utterance(voice(e["voice"]), e["text"]), e["onset"], e["gain"])
    return track.astype(np.float32)


# -------------------------------------------------------------------------------------------- questions


def _speech(scene: Scene) -> list[dict[str, Any]]:
    return [e for e in scene.events if e.get("kind") == "speech"]


def _pick(rng: np.random.Generator, key: str, seed: int, slot: int | None, combos: Sequence[Any]) -> Any:
    if slot is None:
        return combos[int(rng.integers(len(combos)))]
    return balanced((seed, DOMAIN, key), slot, combos)


def _arrange(rng: np.random.Generator, answer: Any, others: Sequence[Any], pos: int) -> list[Any]:
    rest = [others[int(i)] for i in rng.permutation(len(others))]
    pos = min(pos, len(rest))
    return [*rest[:pos], answer, *rest[pos:]]


def _t(x: float) -> str:
    return f"{x:.1f}"


def _clip(a: float, b: float, duration: float) -> tuple[float, float]:
    return max(0.0, round(a, 1)), min(duration, round(b, 1))


def _around(t: float, duration: float) -> tuple[float, float]:
    return _clip(t - _HALF, t + _HALF, duration)


def _instant(rng: np.random.Generator, e: dict[str, Any]) -> float:
    """A time on the 0.1 s grid in the middle 40% of utterance `e` (its centre if the grid misses that)."""
    on, off = float(e["onset"]), float(e["offset"])
    lo, hi = math.ceil((on + 0.3 * (off - on)) * 10 - 1e-9), math.floor((off - 0.3 * (off - on)) * 10 + 1e-9)
    if lo > hi:  # a very short utterance: its centre, on the 0.1 s grid when that stays inside
        mid = round((on + off) / 2, 1)
        return mid if on <= mid <= off else round((on + off) / 2, 2)
    return int(rng.integers(lo, hi + 1)) / 10


def _gap_time(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A span end inside the pause (lo, hi): on the 0.5 s grid if one fits 0.05 s inside, else on the 0.1 s grid."""
    for step in (0.5, 0.1):
        a, b = math.ceil((lo + 0.05) / step - 1e-9), math.floor((hi - 0.05) / step + 1e-9)
        if a <= b:
            return round(int(rng.integers(a, b + 1)) * step, 1)
    return round((lo + hi) / 2, 2)


def _pauses(scene: Scene) -> list[tuple[float, float]]:
    """The pauses between utterances (and before the first / after the last), as (start, end) seconds."""
    evs = _speech(scene)
    edges = [0.0, *[x for e in evs for x in (e["onset"], e["offset"])], scene.duration]
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


def _span_around(rng: np.random.Generator, scene: Scene, first: int, last: int) -> tuple[float, float]:
    """A span holding utterances first..last (indices into the speech events) and no other: its ends lie in the
    pauses just before and after them."""
    pauses = _pauses(scene)
    a = 0.0 if first == 0 and rng.random() < 0.3 else _gap_time(rng, *pauses[first])
    b_lo, b_hi = pauses[last + 1]
    b = scene.duration if last + 1 == len(pauses) - 1 and rng.random() < 0.3 else _gap_time(rng, b_lo, b_hi)
    return a, b


def _kind(*preferred: str) -> str:
    """The first of these choice kinds `phrasing.CHOICE_FORMATS` has. "yesno", "number" (numbers read out) and
    "voices" (counts of voices) fit better than "word" / "count", whose held-out formats write "the no" and
    "4 times"; they are used as soon as phrasing defines them."""
    return next(k for k in preferred if k in phrasing.CHOICE_FORMATS)


def _variant(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _trace(
    rng: np.random.Generator, lead: str, steps: Sequence[tuple[float, float, str]], answer: str, close: str = ""
) -> str:
    """``<think>LEAD I listen to A-B s: <seg>A, B</seg> OBS. ...CLOSE</think><answer>ANSWER</answer>``."""
    body = " ".join(f"{phrasing.listen(a, b, rng)}{obs}" for a, b, obs in steps)
    return f"<think>{lead} {body}{close}</think><answer>{answer}</answer>"


def _times(word: str, n: int, said: bool = False) -> str:
    """ " seven 2 times." / " seven is said twice."-style counts for one listen."""
    if n == 0:
        return f"{word} is not said" if said else f"no {word}"
    verb = " is said" if said else ""
    return f"{word}{verb} once" if n == 1 else f"{word}{verb} {n} times"


def _windows(duration: float) -> list[tuple[float, float]]:
    k = math.ceil(duration / _WINDOW - 1e-9)
    return [(i * _WINDOW, min(duration, (i + 1) * _WINDOW)) for i in range(k)]


def _mid(e: dict[str, Any]) -> float:
    return (float(e["onset"]) + float(e["offset"])) / 2


def _heard(e: dict[str, Any], a: float, b: float) -> bool:
    """The synthetic suite's rule: an utterance is heard in [a, b] when half of it, or 0.25 s of it, is inside."""
    on, off = float(e["onset"]), float(e["offset"])
    return max(0.0, min(b, off) - max(a, on)) >= min(0.5 * (off - on), 0.25)


def ask(
    rng: np.random.Generator,
    scene: Scene,
    category: str,
    *,
    phrasing: PhrasingSplit,
    open_question: bool,
    slot: int | None,
    seed: int,
    follow_up: bool = False,
) -> Question:
    """One phrased question about `scene` (see the module docstring for each category)."""
    if category not in _ASK:
        raise ValueError(f"unknown speech category {category!r}; expected one of {CATEGORIES}")
    tid, template = BANKS[category].pick(rng, phrasing, follow_up)
    return _ASK[category](_Ctx(rng, scene, category, phrasing, open_question, slot, seed, tid, template))


class _Ctx:
    """What every category's asker needs, and the shared last step (choices, open answer, Question)."""

    def __init__(self, rng: np.random.Generator, scene: Scene, category: str, split: PhrasingSplit,
                 open_question: bool, slot: int | None, seed: int, tid: str, template: str) -> None:  # fmt: skip
        self.rng, self.scene, self.category, self.split = rng, scene, category, split
        self.open, self.slot, self.seed, self.tid, self.template = open_question, slot, seed, tid, template
        self.events = _speech(scene)
        self.formats: list[str] = []

    def pick(self, combos: Sequence[Any]) -> Any:
        return _pick(self.rng, self.category, self.seed, self.slot, combos)

    def time(self, t: float) -> str:
        fmt = phrasing.pick_format(phrasing.TIME_FORMATS, self.rng, self.split)
        self.formats.append(fmt)
        return phrasing.say_time(t, fmt)

    def span(self, a: float, b: float) -> str:
        fmt = phrasing.pick_format(phrasing.SPAN_FORMATS, self.rng, self.split)
        self.formats.append(fmt)
        return phrasing.say_span(a, b, fmt)

    def finish(self, slots: dict[str, str], values: Sequence[Any], pos: int, kind: str, open_answer: str,
               answer_kind: str, evidence: list[list[float]], lead: str,
               steps: Sequence[tuple[float, float, str]], close: str = "") -> Question:  # fmt: skip
        """`values[0]` is the answer; the others are distractors placed around it at `pos`."""
        question = self.template.format(**slots)
        if self.open:
            choices: list[str] = []
            choice_format = None
            answer = open_answer
        else:
            ordered = _arrange(self.rng, values[0], values[1:], pos)
            choices, choice_format = phrasing.choice_strings(ordered, kind, self.rng, self.split)
            answer = choices[ordered.index(values[0])]
            answer_kind = "choice"
        trace = _trace(self.rng, lead, steps, answer, close)
        return Question(self.category, question, self.tid, choices, choice_format, answer, answer_kind,  # type: ignore[arg-type]
                        evidence, trace, self.formats)  # fmt: skip


# ------------------------------------------------------------------------------------------- categories


def _ask_digit_at(c: _Ctx) -> Question:
    digit, pos = c.pick([(d, p) for d in range(10) for p in range(4)])
    cands = [i for i, e in enumerate(c.events) if e["type"] == "digit"]
    chosen = [i for i in cands if c.events[i]["value"] == digit] or cands
    i = chosen[int(c.rng.integers(len(chosen)))]
    e = c.events[i]
    word = e["label"]
    t = _instant(c.rng, e)
    # Distractors: the digits said just before and after (a listener off by one utterance), then any.
    near = [c.events[j]["label"] for j in (i - 1, i + 1) if 0 <= j < len(c.events) and c.events[j]["type"] == "digit"]
    others = list(dict.fromkeys(w for w in near if w != word))[:2]
    others += _draw(c.rng, DIGITS, 3 - len(others), {word, *others})
    a, b = _around(t, c.scene.duration)
    lead = _variant(c.rng, (f"I check which digit is spoken at {_t(t)} s.", f"I listen around {_t(t)} s for the digit.",
                            f"The digit at {_t(t)} s is what matters."))  # fmt: skip
    obs = _variant(c.rng, (f" it is the digit {word}.", f" the voice says {word}.", f" that is {word}."))
    return c.finish({"time": c.time(t)}, [word, *others], pos, "label", str(e["value"]), "number", [[a, b]], lead,
                    [(a, b, obs)])  # fmt: skip


def number_family(rng: np.random.Generator, n: int) -> list[int]:
    """Three numbers a listener could take for `n`, drawn so that `n` is not the odd one out of the four: all
    share its tens ("twenty-three", "twenty-seven", ...), or its units ("twenty-three", "sixty-three", ...),
    or come in teen/-ty pairs ("fourteen", "forty", "sixteen", "sixty"); three-digit numbers among the
    suite's other three-digit numbers."""
    families: list[list[int]] = []
    if n >= 100:
        families.append([m for m in NUMBERS if m >= 100 and m != n])
    else:
        tens, units = divmod(n, 10)
        families.append([tens * 10 + u for u in range(10) if u != units])
        if tens >= 2:
            families.append([t * 10 + units for t in range(2, 10) if t != tens])
        teen_ty = {13 + i: 30 + 10 * i for i in range(7)}
        partner = teen_ty.get(n) or next((t for t, ty in teen_ty.items() if ty == n), None)
        if partner is not None:
            pairs = [p for p in teen_ty.items() if n not in p]
            a, b = pairs[int(rng.integers(len(pairs)))]
            families.append([partner, a, b] if rng.random() < 0.5 else [partner, b, a])
    family = families[int(rng.integers(len(families)))]
    if len(family) == 3:  # a teen/-ty pair family is exactly these three
        return family
    return [family[int(i)] for i in rng.choice(len(family), 3, replace=False)]


def _ask_number_between(c: _Ctx) -> Question:
    (pos,) = c.pick([(p,) for p in range(4)])
    evs = c.events
    cands = [i for i, e in enumerate(evs) if e["type"] == "number"]
    i = cands[int(c.rng.integers(len(cands)))]
    e = evs[i]
    first, last = i, i
    # Widen the span over neighbouring words/letters sometimes (never over a digit or a number).
    while first > 0 and evs[first - 1]["type"] in ("word", "letter") and c.rng.random() < 0.3:
        first -= 1
    while last + 1 < len(evs) and evs[last + 1]["type"] in ("word", "letter") and c.rng.random() < 0.3:
        last += 1
    a, b = _span_around(c.rng, c.scene, first, last)
    value = int(e["value"])
    others = number_family(c.rng, value)
    words = c.rng.random() < 0.3  # choices sometimes in words ("twenty-three"), mostly in digits
    kind = _kind("number", "word")
    show: list[Any] = [v if kind == "number" else number_label(v) if words else str(v) for v in [value, *others]]
    span = c.span(a, b)
    lead = _variant(
        c.rng,
        (
            f"I listen to the span from {_t(a)} s to {_t(b)} s for the number.",
            "I check which number is read out in the span.",
            "The number in the span is what matters.",
        ),
    )
    label = e["label"]
    obs = _variant(
        c.rng, (f" the number read out is {label}.", f" it sounds like {label}.", f" the voice says {label}.")
    )
    listened = _clip(a, b, c.scene.duration)
    return c.finish({"span": span}, show, pos, kind, str(value), "number", [list(listened)], lead,
                    [(*listened, obs)])  # fmt: skip


def _said(e: dict[str, Any]) -> str:
    """What a trace says an utterance is: its label, or "the letter b" (a bare "b" reads as a typo)."""
    return f"the letter {e['label']}" if e["type"] == "letter" else str(e["label"])


def _countable(e: dict[str, Any]) -> bool:
    return e["type"] in ("digit", "word")


def _ask_word_count(c: _Ctx) -> Question:
    k, pos = c.pick([(n, p) for n in range(1, 5) for p in range(4)])
    evs, dur = c.events, c.scene.duration
    labels = [e["label"] for e in evs]
    counts = {w: labels.count(w) for w in dict.fromkeys(e["label"] for e in evs if _countable(e))}
    exact = [w for w, n in counts.items() if n == k]
    more = [w for w, n in counts.items() if n > k]
    if not exact and not more:  # a scene made for another category: ask about what it has
        k = max(counts.values())
        exact = [w for w, n in counts.items() if n == k]
    whole = bool(exact) and (not more or c.rng.random() < 0.5)
    if whole:
        word = exact[int(c.rng.integers(len(exact)))]
        a, b = 0.0, dur
        where = _variant(c.rng, _WHOLE)
        pieces = _windows(dur)
        lead = _variant(
            c.rng, (f"I count {word} in 10-second windows.", f"I scan the clip for {word}, 10 seconds at a time.")
        )
    else:
        word = more[int(c.rng.integers(len(more)))]
        occ = [i for i, e in enumerate(evs) if e["label"] == word]
        start = int(c.rng.integers(len(occ) - k + 1))
        first, last = occ[start], occ[start + k - 1]
        # The span may take in other utterances, but no other occurrence of the word.
        lo = occ[start - 1] + 1 if start > 0 else 0
        hi = occ[start + k] - 1 if start + k < len(occ) else len(evs) - 1
        first = int(c.rng.integers(lo, first + 1)) if c.rng.random() < 0.5 else first
        last = int(c.rng.integers(last, hi + 1)) if c.rng.random() < 0.5 else last
        a, b = _span_around(c.rng, c.scene, first, last)
        where = c.span(a, b)
        cuts = [x * _WINDOW for x in range(1, 4) if a + 0.5 < x * _WINDOW < b - 0.5]
        edges = [a, *cuts, b] if b - a > _WINDOW else [a, b]
        pieces = [(edges[j], edges[j + 1]) for j in range(len(edges) - 1)]
        lead = _variant(c.rng, (f"I count {word} in the span.", f"I listen for {word} in the span and count."))
    pieces = [_clip(p, q, dur) for p, q in pieces]
    per = [sum(1 for e in evs if e["label"] == word and p <= _mid(e) < q) for p, q in pieces]
    assert sum(per) == k, (word, k, per)
    steps = [
        (p, q, _variant(c.rng, (f" {_times(word, n)}.", f" {_times(word, n, said=True)}.")))
        for (p, q), n in zip(pieces, per, strict=True)
    ]
    close = ""
    if len(pieces) > 1:
        close = _variant(c.rng, (f" In all {' + '.join(map(str, per))} = {k}.", f" That makes {k} in total."))
    others = [n for n in (1, 2, 3, 4, 5) if n != k][:3]  # always 1-4 (5 when k > 4): the set gives nothing away
    return c.finish({"word": word, "where": where}, [k, *others], pos, "count", str(k), "number",
                    [list(p) for p in pieces], lead, steps, close)  # fmt: skip


def _ask_word_order(c: _Ctx) -> Question:
    a_first, pos = c.pick([(f, p) for f in (True, False) for p in range(2)])
    evs, dur = c.events, c.scene.duration
    labels = [e["label"] for e in evs]
    once = [i for i, e in enumerate(evs) if _countable(e) and labels.count(e["label"]) == 1]
    i, j = sorted(int(x) for x in c.rng.choice(once, 2, replace=False))
    first, second = evs[i], evs[j]
    x, y = (first["label"], second["label"]) if a_first else (second["label"], first["label"])
    answer = first["label"]

    def check(a: float, b: float) -> tuple[bool, bool, str]:
        hx = _heard(first if x == answer else second, a, b)
        hy = _heard(second if x == answer else first, a, b)
        return hx, hy, f" {x}? {'yes' if hx else 'no'}. {y}? {'yes' if hy else 'no'}."

    steps: list[tuple[float, float, str]] = []
    for w0, w1 in _windows(dur):
        hx, hy, obs = check(w0, w1)
        if not (hx or hy):
            steps.append((w0, w1, obs))
            continue
        if hx != hy:
            steps.append((w0, w1, f"{obs} So {answer} comes first."))
            break
        steps.append((w0, w1, obs))  # both in one window: zoom in, as the synthetic suite's order does
        a, b = w0, w0 + _WINDOW / 2
        budget = min(2, _MAX_LISTENS - len(steps))
        for depth in range(budget):
            hx, hy, obs = check(a, min(b, dur))
            if hx != hy or depth == budget - 1:
                steps.append((a, min(b, dur), f"{obs} So {answer} comes first."))
                break
            steps.append((a, min(b, dur), obs))
            a, b = (a, a + (b - a) / 2) if (hx or hy) else (b, b + (b - a) / 2)
        else:
            last = steps[-1]
            steps[-1] = (last[0], last[1], f"{last[2]} So {answer} comes first.")
        break
    lead = _variant(c.rng, (f"I look for {x} and {y} in 10-second windows.", f"I scan the clip for {x} and {y}."))
    return c.finish({"a": x, "b": y}, [answer, second["label"]], pos, "label", answer, "word",
                    [[steps[-1][0], steps[-1][1]]], lead, steps)  # fmt: skip


def _ask_same_speaker(c: _Ctx) -> Question:
    same, pos = c.pick([(s, p) for s in (True, False) for p in range(2)])
    evs, dur = c.events, c.scene.duration
    pairs = [(i, j) for i in range(len(evs)) for j in range(i + 1, len(evs)) if _mid(evs[j]) - _mid(evs[i]) >= 1.5]
    if not pairs:
        pairs = [(i, j) for i in range(len(evs)) for j in range(i + 1, len(evs))]
    pool = [(i, j) for i, j in pairs if (evs[i]["voice"] == evs[j]["voice"]) == same]
    if not pool:  # one voice only (or no same-voice pair): the other answer
        same = not same
        pool = [(i, j) for i, j in pairs if (evs[i]["voice"] == evs[j]["voice"]) == same]
    if same:  # prefer utterances from different turns, so "same" is not just "near each other"
        apart = [(i, j) for i, j in pool if any(evs[m]["voice"] != evs[i]["voice"] for m in range(i, j))]
        pool = apart if apart and c.rng.random() < 0.7 else pool
    i, j = pool[int(c.rng.integers(len(pool)))]
    t1, t2 = _instant(c.rng, evs[i]), _instant(c.rng, evs[j])
    w1, w2 = _around(t1, dur), _around(t2, dur)
    answer = "yes" if same else "no"
    steps = [
        (*w, _variant(c.rng, (f" a {g} voice says {label}.", f" it is a {g} voice saying {label}.")))
        for w, g, label in ((w1, evs[i]["gender"], _said(evs[i])), (w2, evs[j]["gender"], _said(evs[j])))
    ]
    close = (
        _variant(c.rng, (" The same voice both times, so the answer is yes.", " It is one voice, so yes."))
        if same
        else _variant(c.rng, (" These are two different voices, so the answer is no.", " The voices differ, so no."))
    )
    lead = _variant(
        c.rng,
        (
            f"I compare the voices at {_t(t1)} s and {_t(t2)} s.",
            f"I listen to the speaker at {_t(t1)} s and at {_t(t2)} s.",
        ),
    )
    slots = {"t1": c.time(t1), "t2": c.time(t2)}
    values = [answer, "no" if same else "yes"]
    return c.finish(
        slots, values, pos, _kind("yesno", "word"), answer, "word", [list(w1), list(w2)], lead, steps, close
    )


def _ask_voice_count(c: _Ctx) -> Question:
    k, pos = c.pick([(n, p) for n in range(1, 5) for p in range(4)])
    evs, dur = c.events, c.scene.duration
    turns: list[tuple[int, int]] = []  # (first, last) speech-event index of each turn
    for i, e in enumerate(evs):
        if turns and evs[turns[-1][1]]["voice"] == e["voice"]:
            turns[-1] = (turns[-1][0], i)
        else:
            turns.append((i, i))
    ranges = [(p, q) for p in range(len(turns)) for q in range(p, len(turns))]
    distinct = {r: len({evs[m]["voice"] for m in range(turns[r[0]][0], turns[r[1]][1] + 1)}) for r in ranges}
    if not any(n == k for n in distinct.values()):
        k = int(c.rng.choice(sorted(set(distinct.values()))))
    fits = [r for r, n in distinct.items() if n == k]
    p, q = fits[int(c.rng.integers(len(fits)))]
    whole = p == 0 and q == len(turns) - 1 and c.rng.random() < 0.5
    if whole:
        a, b = 0.0, dur
        where = _variant(c.rng, _WHOLE)
        lead = _variant(
            c.rng, ("I listen to the whole clip and count the voices.", "I count the different voices in the clip.")
        )
    else:
        a, b = _span_around(c.rng, c.scene, turns[p][0], turns[q][1])
        where = c.span(a, b)
        lead = _variant(
            c.rng,
            (
                "I count the different voices in the span.",
                f"I listen from {_t(a)} s to {_t(b)} s and count the voices.",
            ),
        )
    inside = [evs[m] for m in range(turns[p][0], turns[q][1] + 1)]
    genders: dict[str, str] = {}
    for e in inside:
        genders.setdefault(e["voice"], e["gender"])
    males = sum(g == "male" for g in genders.values())
    if k == 1:
        obs = _variant(
            c.rng, (" only 1 voice speaks.", f" there is only 1 voice, a {next(iter(genders.values()))} one.")
        )
    else:
        detail = ", ".join(
            d for d in (f"{males} male" if males else "", f"{k - males} female" if k - males else "") if d
        )
        obs = _variant(
            c.rng, (f" {number_word(k)} different voices speak.", f" there are {k} different voices: {detail}.")
        )
    span = _clip(a, b, dur)
    others = [n for n in (1, 2, 3, 4) if n != k]
    return c.finish({"where": where}, [k, *others], pos, _kind("voices", "count"), str(k), "number", [list(span)], lead,
                    [(*span, obs)])  # fmt: skip


_ASK = {
    "digit_at": _ask_digit_at,
    "number_between": _ask_number_between,
    "word_count": _ask_word_count,
    "word_order": _ask_word_order,
    "same_speaker": _ask_same_speaker,
    "voice_count": _ask_voice_count,
}

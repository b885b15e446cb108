"""The music domain of the real-audio suite (`training/suite/music.py`, `instruments.py`): every category renders
well-formed items from real soundfont and drum-kit renders, determinism, train/held-out source separation,
balance, isolation, the missing-package errors, and the ground truth checked against the audio by independent
labellers (bench/truth_music.py: librosa onsets and pYIN on isolated parts).

Everything renders for real from the installed Debian packages (fluidsynth, fluid-soundfont-gm,
musescore-general-soundfont-small, hydrogen-drumkits); renders are cached (`core.cached_audio`)."""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from echo_agent.training.suite import instruments, music, phrasing
from echo_agent.training.suite.core import SAMPLE_RATE, MissingSourceError, Question, Scene

pytestmark = pytest.mark.skipif(
    os.environ.get("ECHO_SKIP_SUITE_RENDER") == "1", reason="the suite's Debian packages are not installed"
)

ROOT = Path(__file__).resolve().parents[1]
SEG = re.compile(r"<seg>(\d+\.\d), (\d+\.\d)</seg>")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([4242, *key]))


@pytest.fixture(scope="module")
def scenes() -> dict[tuple[str, str], Scene]:
    """One scene per (sources, category)."""
    return {
        (src, cat): music.make_scene(_rng(s, c), src, cat)
        for s, src in enumerate(("train", "heldout"))
        for c, cat in enumerate(music.CATEGORIES)
    }


def _split_of(table: dict[str, tuple[str, Any]], fid: str) -> str:
    return table[fid][0]


def _check_question(scene: Scene, q: Question, category: str, split: str, open_q: bool) -> None:
    assert q.category == category
    assert "{" not in q.question and "}" not in q.question and q.question[0].isupper()
    prefix = f"{category}/{split}/"
    assert q.template.startswith(prefix) or (split == "train" and q.template.startswith(f"{category}/follow/"))
    for fid in q.formats:
        table = phrasing.TIME_FORMATS if fid.startswith("t_") else phrasing.SPAN_FORMATS
        assert _split_of(table, fid) == split, fid
    if open_q:
        assert q.choices == [] and q.choice_format is None
        if q.answer_kind == "number":
            assert q.answer.isdigit() and 2 <= int(q.answer) <= 8
        else:
            assert q.answer_kind == "word" and q.answer == q.answer.lower()
    else:
        assert q.answer_kind == "choice" and q.answer in q.choices and len(set(q.choices)) == len(q.choices)
        assert 2 <= len(q.choices) <= 4
        kinds = [k for k, table in phrasing.CHOICE_FORMATS.items() if q.choice_format in table]
        assert kinds and phrasing.CHOICE_FORMATS[kinds[0]][q.choice_format][0] == split
    # The trace: seg-tag protocol, <= 6 listens inside the clip, each followed by " <lowercase word>".
    m = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", q.trace, re.DOTALL)
    assert m is not None
    think, answer = m.groups()
    assert answer == q.answer
    spans = [(float(a), float(b)) for a, b in SEG.findall(think)]
    assert 1 <= len(spans) <= 6
    for a, b in [*spans, *map(tuple, q.evidence)]:
        assert 0.0 <= a < b <= scene.duration + 1e-6, (a, b, scene.duration)
    for after in think.split("</seg>")[1:]:
        assert re.match(r" [a-z]", after), after
    assert q.evidence and all(list(e) in [[a, b] for a, b in spans] for e in q.evidence)


def test_every_category_split_and_form_is_well_formed(scenes: dict[tuple[str, str], Scene]) -> None:
    # the held-out templates' wording (their literal parts of 3+ words) never appears in a trace
    held_words = {
        lit.strip(" ,.?:")
        for b in music.BANKS.values()
        for t in b.heldout
        for lit, *_ in string.Formatter().parse(t)
        if len(lit.split()) >= 3
    }
    for (_src, made_for), scene in scenes.items():
        assert scene.domain == "music" and scene.audio.dtype == np.float32
        assert 12.0 <= scene.duration <= 28.0
        # the audio is what a 16-bit WAV holds, peak-normalised
        assert np.array_equal(np.round(scene.audio * 32768) / 32768, scene.audio)
        assert 0.85 < float(np.max(np.abs(scene.audio))) <= 0.9 + 1e-4
        onsets = [e["onset"] for e in scene.events]
        assert onsets == sorted(onsets)
        assert all(0.0 <= e["onset"] < e["offset"] <= scene.duration for e in scene.events)
        json.dumps(scene.events), json.dumps(scene.meta)
        assert {e["kind"] for e in scene.events} == {"note", "drum"}
        for i, category in enumerate(music.CATEGORIES):
            for split in ("train", "heldout"):
                for open_q in (False, True):
                    rng = _rng(99, i, open_q, split == "train", music.CATEGORIES.index(made_for))
                    q = music.ask(
                        rng,
                        scene,
                        category,
                        phrasing=split,
                        open_question=open_q,
                        slot=None,
                        seed=1,
                    )
                    _check_question(scene, q, category, split, open_q)
                    assert not any(w in q.trace for w in held_words), q.trace


def test_answers_match_the_events(scenes: dict[tuple[str, str], Scene]) -> None:
    """The answers follow from the timeline: counts are onsets inside the asked span, the instrument at T
    sounds at T, directions are the asked phrase's pitches, the first drum hits first."""
    for (_, cat), scene in scenes.items():
        rng = _rng(5, music.CATEGORIES.index(cat))
        q = music.ask(rng, scene, cat, phrasing="train", open_question=True, slot=3, seed=2)
        a, b = min(e[0] for e in q.evidence), max(e[1] for e in q.evidence)
        notes = [e for e in scene.events if e["kind"] == "note"]
        if cat == "note_count":
            (name,) = [x for x in scene.meta["instruments"] if re.search(rf"\b{x}\b", q.question)]
            assert sum(a <= e["onset"] <= b for e in notes if e["instrument"] == name) == int(q.answer)
        elif cat == "drum_count":
            (drum,) = [d for d in instruments.DRUMS if re.search(rf"(?<![\w-]){d}(?![\w-])", q.question.lower())]
            hits = [e for e in scene.events if e["kind"] == "drum" and e["drum"] == drum]
            assert sum(a <= e["onset"] <= b for e in hits) == int(q.answer)
        elif cat == "instrument_at":
            t = (a + b) / 2
            assert {e["instrument"] for e in notes if e["onset"] <= t <= e["offset"]} == {q.answer}
        elif cat == "melody_direction":
            pitches = [e["pitch"] for e in notes if a <= e["onset"] <= b]
            steps = np.diff(pitches)
            assert len(pitches) >= 3 and (all(steps > 0) if q.answer == "rising" else all(steps < 0))
        elif cat == "first_instrument":
            assert notes[0]["instrument"] == q.answer == scene.meta["instruments"][0]
        else:
            firsts: dict[str, float] = {}
            for e in scene.events:
                if e["kind"] == "drum":
                    firsts.setdefault(e["drum"], e["onset"])
            named = re.findall(r"the ([a-z-]+)", q.question)
            assert q.answer in named and firsts[q.answer] == min(firsts[x] for x in named)


def test_same_seed_same_scene_and_question() -> None:
    for cat in music.CATEGORIES:
        records = []
        for _ in range(2):
            rng = _rng(11, music.CATEGORIES.index(cat))
            scene = music.make_scene(rng, "heldout", cat)
            q = music.ask(rng, scene, cat, phrasing="train", open_question=False, slot=5, seed=9)
            records.append((scene.audio.tobytes(), json.dumps([scene.events, scene.meta, q.__dict__])))
        assert records[0] == records[1], cat
    a = music.make_scene(_rng(12), "train", "note_count")
    b = music.make_scene(_rng(13), "train", "note_count")
    assert a.audio.tobytes() != b.audio.tobytes()


def test_train_and_heldout_sources_never_mix() -> None:
    fonts = {s: {p.name for p in instruments.soundfonts(s)} for s in ("train", "heldout")}
    kits = {s: {k.name for k in instruments.kits(s)} for s in ("train", "heldout")}
    assert fonts["train"] and fonts["heldout"] and not fonts["train"] & fonts["heldout"]
    assert "FluidR3_GM.sf2" in fonts["train"]
    assert all(f.startswith("MuseScore_General") for f in fonts["heldout"])
    assert kits["heldout"] == set(music.HELDOUT_SOURCES["kit"]) and kits["train"]
    assert not kits["train"] & kits["heldout"]
    seen: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    for i in range(24):
        for src in ("train", "heldout"):
            scene = music.make_scene(_rng(20, i), src, music.CATEGORIES[i % 6])
            held_font = scene.meta["soundfont"].startswith(music.HELDOUT_SOURCES["soundfont"])
            held_kit = scene.meta["kit"] in music.HELDOUT_SOURCES["kit"]
            assert held_font == held_kit == (src == "heldout") == (scene.meta["sources"] == "heldout")
            seen[src].add((scene.meta["soundfont"], scene.meta["kit"]))
    assert len({k for _, k in seen["train"]}) >= 3 and len({k for _, k in seen["heldout"]}) >= 2


def _count(choice: str) -> int:
    """A count choice in any choice format ("5", "five", "5 times") as a number."""
    word = choice.split()[0].lower()
    return int(word) if word.isdigit() else phrasing.COUNT_WORDS.index(word)


def test_one_block_of_slots_is_balanced() -> None:
    """Over one block of slots, every (answer value, position) combination comes up exactly once."""
    blocks = {"note_count": 28, "drum_count": 28, "melody_direction": 4, "drum_order": 4, "first_instrument": 4}
    for cat, size in blocks.items():
        combos: collections.Counter[tuple[object, int]] = collections.Counter()
        for slot in range(size):
            rng = _rng(30, music.CATEGORIES.index(cat), slot)
            scene = music.make_scene(rng, "train", cat)
            q = music.ask(rng, scene, cat, phrasing="train", open_question=False, slot=slot, seed=17)
            pos = q.choices.index(q.answer)
            value: object = None
            if cat == "drum_order":  # is the answer the drum the question names first?
                value = re.findall(r"the ([a-z-]+)", q.question)[0] == q.answer.lower()
            elif cat in ("note_count", "drum_count"):
                value = _count(q.answer)
            elif cat == "melody_direction":
                value = q.answer.lower()
            combos[(value, pos)] += 1
        assert len(combos) == size and set(combos.values()) == {1}, (cat, combos)


def test_follow_ups_refer_back_and_keep_to_train_phrasing(scenes: dict[tuple[str, str], Scene]) -> None:
    scene = scenes[("train", "note_count")]
    for cat in music.CATEGORIES:
        q = music.ask(_rng(40), scene, cat, phrasing="train", open_question=False, slot=None, seed=1, follow_up=True)
        if music.BANKS[cat].follow_up:
            assert q.template.startswith(f"{cat}/follow/")
            assert q.question.startswith(("And", "What about"))
        else:
            assert q.template.startswith(f"{cat}/train/")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".+?")
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


def test_banks_keep_heldout_phrasings_apart(scenes: dict[tuple[str, str], Scene]) -> None:
    assert set(music.BANKS) == set(music.CATEGORIES) == set(music.SUB_CATEGORIES)
    for cat, bank in music.BANKS.items():
        assert len(bank.train) + len(bank.heldout) >= 8 and len(bank.heldout) >= 2
        patterns = [_template_regex(t) for t in (*bank.train, *bank.follow_up)]
        for k in range(12):
            q = music.ask(_rng(50, k), scenes[("heldout", cat)], cat, phrasing="heldout", open_question=k % 2 == 0,
                          slot=None, seed=1)  # fmt: skip
            assert not any(p.match(q.question) for p in patterns), q.question


def test_isolate_re_renders_exactly_the_asked_events(scenes: dict[tuple[str, str], Scene]) -> None:
    scene = scenes[("heldout", "drum_count")]
    notes = [e for e in scene.events if e["kind"] == "note"]
    drums = [e for e in scene.events if e["kind"] == "drum"]
    both = music.isolate(scene, scene.events)
    assert np.allclose(music.isolate(scene, notes) + music.isolate(scene, drums), both, atol=1e-5)
    # the clip is that foreground plus a bed at >= 10 dB SNR, peak-normalised: strongly correlated with it
    assert float(np.corrcoef(both, scene.audio)[0, 1]) > 0.9
    one = drums[len(drums) // 2]
    solo = music.isolate(scene, [one])
    start, end = round(one["onset"] * SAMPLE_RATE), round(one["offset"] * SAMPLE_RATE)
    assert np.abs(solo[start : start + 160]).max() > 0.05 and not solo[:start].any() and not solo[end:].any()


def test_every_instrument_renders_in_both_soundfonts() -> None:
    """Real notes: every instrument's lowest and highest pitch sounds, and its pitch is the note's (the
    first autocorrelation peak near the strongest, over the steady part, matches the MIDI pitch within a
    semitone, octaves apart allowed)."""
    for split in ("train", "heldout"):
        font = instruments.soundfonts(split)[0]
        for inst in instruments.INSTRUMENTS:
            for pitch in (inst.low, inst.high):
                x = instruments.note(font, inst.program, pitch, 2).astype(np.float64)
                assert len(x) == round((instruments.DURATIONS[2] + instruments.TAIL) * SAMPLE_RATE)
                body = x[round(0.1 * SAMPLE_RATE) : round(0.5 * SAMPLE_RATE)]
                assert np.sqrt(np.mean(body**2)) > 1e-3, (split, inst.name, pitch)
                ac = np.fft.irfft(np.abs(np.fft.rfft(body, 2 * len(body))) ** 2)[: len(body)]
                lo, hi = SAMPLE_RATE // 2200, SAMPLE_RATE // 60
                seg = ac[lo:hi]  # the first lag that nearly reaches the best: the period, not a multiple of it
                peaks = [k for k in range(1, len(seg) - 1) if seg[k - 1] <= seg[k] >= seg[k + 1]]
                lag = lo + next(k for k in peaks if seg[k] >= 0.85 * seg.max())
                got = 69 + 12 * np.log2(SAMPLE_RATE / lag / 440.0)
                err = abs(got - pitch) % 12
                assert min(err, 12 - err) < 1.0, (split, inst.name, pitch, got)


def test_kits_map_the_four_drums_and_skip_kits_without_them() -> None:
    for split in ("train", "heldout"):
        for kit in instruments.kits(split):
            assert set(kit.drums) == set(instruments.DRUMS)
            for drum, (_, layers) in kit.drums.items():
                for layer in layers:
                    x = instruments.hit(kit.name, drum, layer.file)
                    assert len(x) > 0.05 * SAMPLE_RATE and abs(float(np.max(np.abs(x))) - 1.0) < 0.05
                    assert float(np.max(np.abs(x[:64]))) > 0.05  # trimmed: the hit starts at its onset
    names = {k.name for s in ("train", "heldout") for k in instruments.kits(s)}
    assert "Gimme A Hand 1.0" not in names and "circAfrique v4" not in names  # hand percussion: no kit drums
    assert "rumpf_kit_z01_h2" not in names  # its crash sample holds several hits


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    font = instruments.soundfonts("train")[0]
    monkeypatch.setattr(instruments, "SOUNDFONT_DIRS", (tmp_path / "sf2", tmp_path / "sf3"))
    monkeypatch.setattr(instruments, "KIT_DIR", tmp_path / "drumkits")
    instruments._soundfonts.cache_clear()
    instruments._kits.cache_clear()
    try:
        with pytest.raises(MissingSourceError, match="apt-get install musescore-general-soundfont-small"):
            music.make_scene(_rng(60), "heldout", "drum_order")
        with pytest.raises(MissingSourceError, match="apt-get install hydrogen-drumkits"):
            instruments.kits("train")
    finally:
        instruments._soundfonts.cache_clear()
        instruments._kits.cache_clear()
    # an uncached note with fluidsynth off PATH names its package
    monkeypatch.setenv("ECHO_RENDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    instruments.note.cache_clear()
    try:
        with pytest.raises(MissingSourceError, match="apt-get install fluidsynth"):
            instruments.note(font, 0, 60, 0)
    finally:
        instruments.note.cache_clear()


def test_ground_truth_agrees_with_independent_labellers() -> None:
    """bench/truth_music.py on a small sample: librosa's onset detector on the isolated drum, and pYIN note runs
    and pitch slope on the isolated part, agree with the answers (measured 72/72 at --n 12, seed 1)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "truth_music.py"), "--n", "3", "--seed", "5"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    results = report["results"]
    checked = ("drum_count", "note_count", "melody_direction")
    assert set(results) == {f"{s}/{c}" for s in ("train", "heldout") for c in checked}
    for key, res in results.items():
        assert res["n"] == 3 and res["rate"] >= 2 / 3, (key, res)
    assert sum(r["agree"] for r in results.values()) >= 0.9 * 18

"""The synthetic audio-puzzle suite (design §8): format, answers, evidence, traces, balance, determinism, audio."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from echo_agent.training import synth as S
from echo_agent.verifier import extract_answer, select_choice, verify

SR = S.SAMPLE_RATE
MMAU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmau" / "mmau-test-mini.json"
N_SEGS = {"count": 1, "order": 2, "identify": 1, "pitch": 2, "locate": 1, "duration": 1}
N_CHOICES = {"count": 4, "order": 2, "identify": 4, "pitch": 2, "locate": 4, "duration": 4}
KIND_SECONDS = {"beep": (0.1, 0.5), "chirp": (0.3, 1.0), "noise burst": (0.2, 1.0), "chord": (0.5, 2.0)}
SEG_RE = re.compile(r"<seg>(\d+\.\d), (\d+\.\d)</seg>")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("suite")
    path = S.write_suite(out, 30, seed=3, progress=False)
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def planned() -> list[S.PuzzleItem]:
    return S.plan_suite(600, seed=11)


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\b\w+\b", text.lower()))


def _floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d", text)]


def _the(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (ev,) = [e for e in events if e["kind"] == kind]
    return ev


def _at(events: list[dict[str, Any]], t: float) -> dict[str, Any]:
    (ev,) = [e for e in events if e["onset"] <= t <= e["offset"]]
    return ev


def derive_answer(item: S.PuzzleItem) -> str:
    """Answer the question from the event list alone."""
    ev, q = item.events, item.question
    if item.category == "count":
        a, b = _floats(q)
        beeps = [e for e in ev if e["kind"] == "beep"]
        assert all(e["offset"] <= a or e["onset"] >= b or a <= e["onset"] <= e["offset"] <= b for e in beeps)
        return str(sum(a <= e["onset"] and e["offset"] <= b for e in beeps))
    if item.category == "order":
        m = re.fullmatch(r"Which is heard first, the (.+) or the (.+)\?", q)
        assert m
        x, y = _the(ev, m[1]), _the(ev, m[2])
        return str(min(x, y, key=lambda e: e["onset"])["kind"])
    if item.category == "identify":
        (t,) = _floats(q)
        return str(_at(ev, t)["kind"])
    if item.category == "pitch":
        t1, t2 = _floats(q)
        b1, b2 = _at(ev, t1), _at(ev, t2)
        assert b1["kind"] == b2["kind"] == "beep"
        return "higher" if b1["freq"] > b2["freq"] else "lower"
    if item.category == "locate":
        m = re.fullmatch(r"When is the (.+) heard\?", q)
        assert m
        x = _the(ev, m[1])
        (hit,) = [c for c in item.choices if _floats(c)[0] <= x["onset"] and x["offset"] <= _floats(c)[1]]
        return hit
    assert item.category == "duration"
    m = re.fullmatch(r"How long does the (.+) last\?", q)
    assert m
    x = _the(ev, m[1])
    return min(item.choices, key=lambda c: abs(_floats(c)[0] - (x["offset"] - x["onset"])))


# ------------------------------------------------------------------------------------------- format


def test_mmau_format_and_audio(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = suite
    assert isinstance(records, list) and len(records) == 30
    mmau_keys = {"id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category"}
    mmau_keys |= {"sub-category", "difficulty"}
    if MMAU.exists():  # the real test-mini records' keys are all present in ours
        mmau_keys |= set(json.loads(MMAU.read_text())[0])
    for rec in records:
        assert mmau_keys <= set(rec), mmau_keys - set(rec)
        assert "sub_category" not in rec
        assert rec["audio_id"] == f"./audio/{rec['id']}.wav"
        item = S.PuzzleItem.model_validate(rec)
        assert item.model_dump(mode="json", by_alias=True) == rec
        info = sf.info(str(path.parent / rec["audio_id"]))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "WAV")
        assert info.frames == round(rec["duration"] * SR)
        assert 10.0 <= rec["duration"] <= 60.0
        assert rec["dataset"] == "echo-synth" and rec["task"] == "sound" and rec["split"] == "test"
        assert rec["difficulty"] in ("easy", "medium", "hard")
    assert len({r["id"] for r in records}) == len(records)
    assert Counter(r["category"] for r in records) == dict.fromkeys(S.CATEGORIES, 5)


def test_plan_suite_is_what_write_suite_writes(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    _, records = suite
    assert [i.model_dump(mode="json", by_alias=True) for i in S.plan_suite(30, seed=3)] == records


def test_generate_item_matches_the_written_clip(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = suite
    for index in (0, 7):
        rec = records[index]
        cats = S.CATEGORIES
        item, wave = S.generate_item(S.item_rng(3, index), cats[index % 6], index, "test", 3, slot=index // 6)
        assert item.model_dump(mode="json", by_alias=True) == rec
        on_disk, sr = sf.read(str(path.parent / rec["audio_id"]), dtype="float32")
        assert sr == SR and wave.dtype == np.float32
        np.testing.assert_array_equal(wave, on_disk)
        assert 0.85 <= float(np.max(np.abs(wave))) <= 0.9 + 1e-4  # peak-normalised, never clipped


def test_unknown_category_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown category"):
        S.write_suite(tmp_path, 2, seed=0, categories=["count", "loudness"], progress=False)
    with pytest.raises(ValueError, match="unknown category"):
        S.generate_item(np.random.default_rng(0), "loudness", 0, "test", 0)


# ------------------------------------------------------------------------------------ answers, choices


def test_questions_use_the_design_templates(planned: list[S.PuzzleItem]) -> None:
    kinds = "|".join(S.KINDS)
    t = r"\d+\.\d"
    templates = {
        "count": rf"How many beeps are there between {t} and {t} seconds\?",
        "order": rf"Which is heard first, the ({kinds}) or the ({kinds})\?",
        "identify": rf"Which sound is heard at {t} seconds\?",
        "pitch": rf"Is the beep at {t} seconds higher or lower in pitch than the beep at {t} seconds\?",
        "locate": rf"When is the ({kinds}) heard\?",
        "duration": rf"How long does the ({kinds}) last\?",
    }
    for item in planned:
        assert re.fullmatch(templates[item.category], item.question), item.question
        assert item.sub_category == S.SUB_CATEGORIES[item.category]


def test_answer_is_derivable_from_the_events(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        assert derive_answer(item) == item.answer, item.id


def test_choices_are_unambiguous(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        assert len(item.choices) == N_CHOICES[item.category]
        assert item.choices.count(item.answer) == 1
        assert len({_tokens(c) for c in item.choices}) == len(item.choices), item.choices
        assert select_choice(item.answer, item.choices) == item.answer
        for c in item.choices:
            assert select_choice(c, item.choices) == c
        if item.category == "locate":
            spans = sorted(tuple(_floats(c)) for c in item.choices)
            assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
            assert all(re.fullmatch(r"\d+\.\d-\d+\.\d s", c) for c in item.choices)
        if item.category == "duration":
            values = sorted(_floats(" ".join(item.choices)))
            assert min(np.diff(values)) >= 0.4


def test_count_needs_the_window(planned: list[S.PuzzleItem]) -> None:
    for item in (i for i in planned if i.category == "count"):
        a, b = _floats(item.question)
        assert 4.0 <= b - a <= 8.0 and 1 <= int(item.answer) <= 5
        assert sum(e["kind"] == "beep" for e in item.events) > int(item.answer)  # counting the clip is wrong


def test_identify_window_holds_only_the_target(planned: list[S.PuzzleItem]) -> None:
    for item in (i for i in planned if i.category in ("identify", "pitch")):
        for a, b in item.evidence:
            assert len([e for e in item.events if e["offset"] > a and e["onset"] < b]) == 1, item.id


# -------------------------------------------------------------------------------- evidence and traces


def test_evidence_and_trace(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        assert item.evidence
        for a, b in item.evidence:
            assert 0.0 <= a < b <= item.duration
        trace = item.trace
        assert trace.startswith("<think>") and trace.endswith(f"</think><answer>{item.answer}</answer>")
        assert trace.count("<answer>") == 1 and extract_answer(trace) == item.answer
        segs = [(float(a), float(b)) for a, b in SEG_RE.findall(trace)]
        assert len(segs) == trace.count("<seg>") == N_SEGS[item.category]
        for a, b in segs:
            assert 0.0 <= a < b <= item.duration
        for a, b in item.evidence:  # every evidence span lies inside some listened span
            assert any(sa <= a + 1e-9 and b <= sb + 1e-9 for sa, sb in segs), (item.evidence, segs)
        for m in re.finditer("</seg>", trace):  # a grounded observation follows each listen
            assert re.match(r" [a-z]", trace[m.end() :]), trace
        verdict = verify(trace, item.choices, item.answer, valid_listens=len(segs))
        assert verdict.format_ok and verdict.correct and verdict.consistency_breaks == 0
        assert verdict.reward == pytest.approx(1.5)


def test_tight_listen_windows(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        segs = [(float(a), float(b)) for a, b in SEG_RE.findall(item.trace)]
        if item.category == "count":
            assert segs == [tuple(item.evidence[0])]
        elif item.category in ("identify", "pitch"):
            assert [round(b - a, 6) for a, b in segs] == [1.0] * len(segs)
            assert segs == [tuple(e) for e in item.evidence]
        elif item.category in ("order", "duration"):
            for (a, b), (ea, eb) in zip(segs, item.evidence, strict=True):
                assert ea - 0.41 <= a <= ea and eb <= b <= eb + 0.41


# ---------------------------------------------------------------------------------------------- events


def test_events_never_overlap(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        ev = item.events
        assert ev == sorted(ev, key=lambda e: e["onset"])
        assert ev[0]["onset"] >= 0.2 - 1e-9 and ev[-1]["offset"] <= item.duration - 0.2 + 1e-9
        for e1, e2 in itertools.pairwise(ev):
            assert e2["onset"] - e1["offset"] >= 0.3 - 1e-9


def test_event_parameters(planned: list[S.PuzzleItem]) -> None:
    seen = Counter()
    for item in planned:
        for e in item.events:
            kind, length = e["kind"], e["offset"] - e["onset"]
            seen[kind] += 1
            if kind in KIND_SECONDS:
                lo, hi = KIND_SECONDS[kind]
                assert lo - 1e-3 <= length <= hi + 1e-3, e
            if kind == "beep":
                assert S.pitch_word(e["freq"]) == e["pitch"]
                lo, hi = S.PITCH_BANDS[e["pitch"]]
                assert lo <= e["freq"] <= hi
            if kind == "click":
                assert len(e["clicks"]) == e["n_clicks"] and e["n_clicks"] in (1, 3, 4, 5, 6)
                assert e["clicks"][0] == e["onset"]
                gaps = np.diff(e["clicks"])
                assert all(0.08 - 1e-3 <= g <= 0.15 + 1e-3 for g in gaps)
                assert e["offset"] - e["clicks"][-1] < 0.02
    assert set(seen) == set(S.KINDS)


# ---------------------------------------------------------------------------------------------- balance


def test_balance(planned: list[S.PuzzleItem]) -> None:
    assert len(planned[:300]) == 300
    items = planned[:300]
    assert Counter(i.category for i in items) == dict.fromkeys(S.CATEGORIES, 50)
    chance = float(np.mean([1 / len(i.choices) for i in items]))
    for k in range(4):  # always picking the k-th choice (where there is one) scores chance
        picks = [i.choices[min(k, len(i.choices) - 1)] == i.answer for i in items]
        assert abs(float(np.mean(picks)) - chance) < 0.06, (k, np.mean(picks), chance)
    for cat in S.CATEGORIES:
        group = [i for i in items if i.category == cat]
        n_choices = N_CHOICES[cat]
        positions = Counter(i.choices.index(i.answer) for i in group)
        assert len(positions) == n_choices
        assert max(positions.values()) - min(positions.values()) <= 0.3 * len(group) / n_choices + 2, positions
        # always answering the same value (when offered) scores no better than chance
        offered = Counter(c for i in group for c in i.choices)
        correct = Counter(i.answer for i in group)
        for value, times in offered.items():
            if times >= 15:
                assert correct[value] / times <= 1 / n_choices + 0.2, (cat, value, correct[value], times)


def test_balanced_blocks_are_exact(planned: list[S.PuzzleItem]) -> None:
    count = [i for i in planned if i.category == "count"][:20]  # one block of all 5 values x 4 positions
    assert Counter((i.answer, i.choices.index(i.answer)) for i in count) == {
        (str(v), p): 1 for v in range(1, 6) for p in range(4)
    }
    pitch = [i for i in planned if i.category == "pitch"][:12]
    assert Counter(i.answer for i in pitch) == {"higher": 6, "lower": 6}


def test_snr_range_is_respected() -> None:
    items = S.plan_suite(60, seed=5, snr_range=(8.0, 9.0))
    assert all(8.0 <= i.snr_db <= 9.0 for i in items)
    assert {i.noise for i in items} == {"white", "pink"}
    items = S.plan_suite(300, seed=5)
    snrs = np.array([i.snr_db for i in items])
    assert snrs.min() >= 5.0 and snrs.max() <= 20.0 and snrs.max() - snrs.min() > 12.0


# ---------------------------------------------------------------------------------------------- audio


def _masks(item: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples where a (non-click) event sounds, and samples ≥ 50 ms from every event."""
    event = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    pad = int(0.05 * SR)
    for e in item["events"]:
        a, b = round(e["onset"] * SR), round(e["offset"] * SR)
        if e["kind"] != "click":
            event[a + 80 : b - 80] = True  # skip the 5 ms fades
        near[max(0, a - pad) : b + pad] = True
    return event, ~near


def test_measured_snr_matches_the_stored_one(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = suite
    errors = []
    for rec in records:
        x, _ = sf.read(str(path.parent / rec["audio_id"]), dtype="float64")
        event, quiet = _masks(rec, len(x))
        p_noise = float(np.mean(x[quiet] ** 2))
        p_event = float(np.mean(x[event] ** 2)) - p_noise
        errors.append(10 * np.log10(p_event / p_noise) - rec["snr_db"])
    assert abs(float(np.median(errors))) < 1.0, errors
    assert max(abs(e) for e in errors) < 3.0, errors


def test_beep_frequencies_match_their_pitch_words(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = suite
    checked = Counter()
    for rec in records:
        x, _ = sf.read(str(path.parent / rec["audio_id"]), dtype="float64")
        for e in rec["events"]:
            if e["kind"] != "beep":
                continue
            seg = x[round(e["onset"] * SR) : round(e["offset"] * SR)]
            spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 1 << 16))
            freqs = np.fft.rfftfreq(1 << 16, 1 / SR)
            band = freqs >= 150.0
            peak = float(freqs[band][np.argmax(spec[band])])
            assert S.pitch_word(peak) == e["pitch"], (rec["id"], e, peak)
            assert abs(peak - e["freq"]) < 15.0, (e, peak)
            checked[e["pitch"]] += 1
    assert set(checked) == set(S.PITCH_WORDS)


def test_quiet_gaps_are_background_noise_only(suite: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = suite
    rec = records[0]
    x, _ = sf.read(str(path.parent / rec["audio_id"]), dtype="float64")
    event, quiet = _masks(rec, len(x))
    assert np.mean(x[event] ** 2) > 2.0 * np.mean(x[quiet] ** 2)  # SNR ≥ 5 dB


# ------------------------------------------------------------------------------------------ determinism


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path) -> None:
    S.write_suite(tmp_path / "a", 7, seed=21, progress=False)
    S.write_suite(tmp_path / "b", 7, seed=21, progress=False, workers=2)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 8 and a == b


def test_different_seeds_differ(tmp_path: Path) -> None:
    S.write_suite(tmp_path / "a", 3, seed=1, progress=False)
    S.write_suite(tmp_path / "b", 3, seed=2, progress=False)
    wa = [p.read_bytes() for p in sorted((tmp_path / "a" / "audio").iterdir())]
    wb = [p.read_bytes() for p in sorted((tmp_path / "b" / "audio").iterdir())]
    assert len(wa) == len(wb) == 3
    assert not set(wa) & set(wb)
    qa = [i.question for i in S.plan_suite(60, seed=1)]
    qb = [i.question for i in S.plan_suite(60, seed=2)]
    assert qa != qb


def test_write_splits_share_no_clips(tmp_path: Path) -> None:
    paths = S.write_splits(tmp_path, 3, 2, 2, seed=4, progress=False)
    assert set(paths) == {"train", "val", "test"}
    splits = {name: json.loads(p.read_text()) for name, p in paths.items()}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    ids = [r["id"] for recs in splits.values() for r in recs]
    assert len(set(ids)) == len(ids) == len(list((tmp_path / "audio").iterdir()))
    audio = [(tmp_path / r["audio_id"]).read_bytes() for recs in splits.values() for r in recs]
    assert len(set(audio)) == len(audio)
    assert {r["split"] for r in splits["val"]} == {"val"}
    assert len({r["seed"] for recs in splits.values() for r in recs}) == 3


def test_synth_command(tmp_path: Path) -> None:
    path = S.synth_command(tmp_path, 2, seed=9, split="dev", workers=1)
    assert path == tmp_path / "dev.json"
    assert len(json.loads(path.read_text())) == 2

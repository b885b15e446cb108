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
MMAU = Path(__file__).resolve().parent / "data" / "mmau" / "mmau-test-mini.json"
N_SEGS = {"count": (1, 1), "order": (1, 7), "identify": (1, 1), "pitch": (2, 2), "locate": (1, 4), "duration": (1, 6)}
N_CHOICES = {"count": 4, "order": 2, "identify": 4, "pitch": 2, "locate": 4, "duration": 4}
KIND_SECONDS = {"beep": (0.1, 0.5), "chirp": (0.3, 1.0), "noise burst": (0.2, 1.0), "chord": (0.5, 2.0)}
SEG_RE = re.compile(r"<seg>(\d+\.\d), (\d+\.\d)</seg>")
LISTEN_RE = re.compile(r"I listen to (\d+\.\d)-(\d+\.\d) s: <seg>(\d+\.\d), (\d+\.\d)</seg>")
LEADS = {
    "count": r"I count the beeps in the window\.",
    "identify": r"I check the sound at (\d+\.\d) s\.",
    "pitch": r"I compare the beeps at (\d+\.\d) s and (\d+\.\d) s\.",
    "locate": r"I look for the [a-z ]+ in the time ranges, in the listed order\.",
    "order": r"I look for the [a-z ]+ and the [a-z ]+ in 10-second windows\.",
    "duration": r"I look for the chord in 10-second windows\.",
}


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


def _parse(item: S.PuzzleItem) -> tuple[list[tuple[float, float]], list[str], str]:
    """The trace's listened spans, the observation after each, and what follows the last observation.

    The trace must be ``<think>LEAD I listen to A-B s: <seg>A, B</seg>OBS I listen to ...OBS CLOSE</think>``:
    each observation runs from ``</seg>`` to the next rationale (or the end of the think part).
    """
    trace = item.trace
    assert trace.startswith("<think>") and trace.endswith(f"</think><answer>{item.answer}</answer>"), trace
    body = trace[len("<think>") : trace.index("</think>")]
    listens = list(LISTEN_RE.finditer(body))
    assert len(listens) == body.count("<seg>") == body.count("</seg>") >= 1, trace
    assert re.fullmatch(LEADS[item.category] + " ", body[: listens[0].start()]), trace
    spans: list[tuple[float, float]] = []
    observations: list[str] = []
    for k, m in enumerate(listens):
        assert m[1] == m[3] and m[2] == m[4], m[0]  # the rationale names the span it listens to
        spans.append((float(m[3]), float(m[4])))
        end = listens[k + 1].start() if k + 1 < len(listens) else len(body)
        text = body[m.end() : end]
        if k + 1 < len(listens):
            assert text.endswith(" "), trace
            text = text[:-1]
        observations.append(text)
    close = ""
    if item.category == "pitch":  # the one trace with a conclusion after its last observation
        obs, dot, close = observations[-1].partition(".")
        observations[-1] = obs + dot
    return spans, observations, close


def _inside(e: dict[str, Any], a: float, b: float) -> bool:
    return a <= e["onset"] and e["offset"] <= b


def _overlaps(e: dict[str, Any], a: float, b: float) -> bool:
    return e["offset"] > a and e["onset"] < b


def expected_observation(item: S.PuzzleItem, a: float, b: float) -> str:
    """What the slice [a, b] holds, from the event list alone, in the trace's words."""
    ev = item.events
    b = min(b, item.duration)  # the runtime clamps an end past the clip
    if item.category == "count":
        n = sum(_inside(e, a, b) for e in ev if e["kind"] == "beep")
        assert not any(_overlaps(e, a, b) and not _inside(e, a, b) for e in ev if e["kind"] == "beep")
        return " there is 1 beep." if n == 1 else f" there are {n} beeps."
    if item.category in ("identify", "pitch"):
        (e,) = [e for e in ev if _overlaps(e, a, b)]
        return f" it is a {e['kind']}." if item.category == "identify" else f" this beep is {e['pitch']}."
    if item.category in ("locate", "duration"):
        m = re.fullmatch(r"When is the (.+) heard\?|How long does the (.+) last\?", item.question)
        assert m
        kind = m[1] or m[2]
        x = _the(ev, kind)
        if not _overlaps(x, a, b):
            return f" {kind}? no."
        assert _inside(x, a, b), (item.id, x, a, b)  # the slice holds the whole event, never a piece
        return f" {kind}? yes." if item.category == "locate" else f" {kind}? yes; it lasts about {item.answer}."
    assert item.category == "order"
    clamped = {(sa, min(sb, item.duration)): obs for (sa, sb), obs in expected_order_steps(item)}
    return clamped[(a, b)]


def _heard(e: dict[str, Any], a: float, b: float) -> bool:
    """Half of the event, or 0.25 s of it, inside [a, b] (the suite's rule, restated here)."""
    inside = max(0.0, min(b, e["offset"]) - max(a, e["onset"]))
    return inside >= min(0.5 * (e["offset"] - e["onset"]), 0.25)


def expected_order_steps(item: S.PuzzleItem) -> list[tuple[tuple[float, float], str]]:
    """An order trace's listens and observations: 10 s windows until one holds a target; if it holds
    both, zoom (its first 5 s, then the first half of whichever part holds the first target) within
    the 7-listen budget, until exactly one target is heard."""
    m = re.fullmatch(r"Which is heard first, the (.+) or the (.+)\?", item.question)
    assert m
    ev = item.events
    x, y = _the(ev, m[1]), _the(ev, m[2])
    first = min(x, y, key=lambda e: e["onset"])
    done = f" The {first['kind']} comes first."
    steps: list[tuple[tuple[float, float], str]] = []
    for k in range(7):
        a, b = 10.0 * k, 10.0 * k + 10.0
        for e in (x, y):
            assert _inside(e, a, b) or not _overlaps(e, a, b), (item.id, e, a, b)
        hx, hy = _overlaps(x, a, b), _overlaps(y, a, b)
        checks = f" {x['kind']}? {'yes' if hx else 'no'}. {y['kind']}? {'yes' if hy else 'no'}."
        budget = min(2, 6 - k)
        if not (hx or hy):
            steps.append(((a, b), checks))
            continue
        if hx != hy or budget == 0:
            return [*steps, ((a, b), checks + done)]
        steps.append(((a, b), checks))
        b = a + 5.0
        for depth in range(budget):
            hx, hy = _heard(x, a, b), _heard(y, a, b)
            if hx != hy:  # exactly one heard is always the first one
                assert (x if hx else y) is first, (item.id, a, b)
            checks = f" {x['kind']}? {'yes' if hx else 'no'}. {y['kind']}? {'yes' if hy else 'no'}."
            if hx != hy or depth == budget - 1:
                return [*steps, ((a, b), checks + done)]
            steps.append(((a, b), checks))
            a, b = (a, a + (b - a) / 2) if hx else (b, b + (b - a) / 2)
    raise AssertionError(f"{item.id}: the scan found nothing in 7 windows")


def expected_spans(item: S.PuzzleItem) -> list[tuple[float, float]]:
    """The listens the rules prescribe, from the question and choices (and, for scans, where to stop)."""
    q = item.question
    if item.category == "count":
        a, b = _floats(q)
        return [(a, b)]
    if item.category in ("identify", "pitch"):
        return [(round(t - 0.5, 1), round(t + 0.5, 1)) for t in _floats(q)]
    if item.category == "locate":  # the choices in listed order, up to the answer
        return [(_floats(c)[0], _floats(c)[1]) for c in item.choices[: item.choices.index(item.answer) + 1]]
    if item.category == "order":
        return [span for span, _ in expected_order_steps(item)]
    spans = []  # duration: 10 s windows from 0 s up to the first whose slice is not "absent"
    for k in range(7):
        spans.append((10.0 * k, 10.0 * k + 10.0))
        if "yes" in expected_observation(item, *spans[-1]):
            return spans
    raise AssertionError(f"{item.id}: the scan found nothing in 7 windows")


def test_traces_follow_the_listening_rules(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        spans, observations, close = _parse(item)
        assert spans == expected_spans(item), (item.id, item.trace)
        lo, hi = N_SEGS[item.category]
        assert lo <= len(spans) <= hi
        for (a, b), obs in zip(spans, observations, strict=True):
            assert obs == expected_observation(item, a, b), (item.id, item.trace)
        if item.category == "pitch":
            w1, w2 = (o.removeprefix(" this beep is ").removesuffix(".") for o in observations)
            assert close == f" {w1.capitalize()} is {item.answer} than {w2}, so the answer is {item.answer}."
        else:
            assert close == ""


def test_observations_carry_no_event_times(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        _, observations, close = _parse(item)
        for k, obs in enumerate(observations):
            assert re.match(r" [a-z]", obs), obs  # short, templated, continues the sentence
            allowed = [item.answer] if item.category == "duration" and k == len(observations) - 1 else []
            assert re.findall(r"\d+\.\d s", obs) == allowed, (item.id, obs)
            assert len(re.findall(r"\d+\.\d", obs)) == len(allowed), (item.id, obs)
        assert not re.search(r"\d", close)


def test_phrasings_are_few(planned: list[S.PuzzleItem]) -> None:
    shapes: dict[str, set[str]] = {}
    for item in planned:
        _, observations, _ = _parse(item)
        for obs in observations:
            shape = re.sub(r"\d+(\.\d)?", "N", obs)
            shape = re.sub(rf"\b([Tt]he|no|a) ({'|'.join(S.KINDS)})\b", r"\1 X", shape)
            shape = re.sub(rf" ({'|'.join(S.KINDS)})\? (yes|no)", r" X? \2", shape)
            shape = re.sub(rf"\bis ({'|'.join(S.PITCH_WORDS)})\.", "is X.", shape)
            shapes.setdefault(item.category, set()).add(shape)
    assert shapes == {
        "count": {" there is N beep.", " there are N beeps."},
        "identify": {" it is a X."},
        "pitch": {" this beep is X."},
        "locate": {" X? no.", " X? yes."},
        "order": {
            " X? no. X? no.",
            " X? yes. X? no. The X comes first.",
            " X? no. X? yes. The X comes first.",
            " X? yes. X? yes. The X comes first.",
            " X? yes. X? yes.",  # a window holding both: zoom in
            " X? no. X? no. The X comes first.",  # the last zoom listen heard neither: named all the same
        },
        "duration": {" X? no.", " X? yes; it lasts about N s."},
    }


def test_scans_cover_the_clip(planned: list[S.PuzzleItem]) -> None:
    """Order/duration targets lie inside one 10 s window; scans reach past the first window; locate stops at
    every position."""
    listens: dict[str, Counter[int]] = {c: Counter() for c in ("order", "duration", "locate")}
    for item in planned:
        if item.category in listens:
            listens[item.category][len(_parse(item)[0])] += 1
        if item.category in ("order", "duration"):
            kinds = re.findall(r"the (.+?)(?: or|\?| last)", item.question)
            for kind in kinds:
                e = _the(item.events, kind)
                k = e["onset"] // 10.0
                assert 10.0 * k + 0.2 - 1e-9 <= e["onset"] and e["offset"] <= 10.0 * k + 9.8 + 1e-9, (item.id, e)
    assert set(listens["locate"]) == {1, 2, 3, 4}
    assert max(listens["order"]) >= 3 and max(listens["duration"]) >= 5, listens
    both = [i for i in planned if i.category == "order" and re.search(r"\? yes\. [a-z ]+\? yes\.", i.trace)]
    assert 0 < len(both) < 100


def test_long_clips_scan_at_most_seven_windows() -> None:
    for item in S.plan_suite(60, seed=2, categories=["order", "duration"], durations=(90.0, 120.0)):
        spans, _, _ = _parse(item)
        assert spans == expected_spans(item) and len(spans) <= 7
        assert verify(item.trace, item.choices, item.answer, valid_listens=len(spans)).reward == pytest.approx(1.5)


def test_evidence_and_trace(planned: list[S.PuzzleItem]) -> None:
    for item in planned:
        trace = item.trace
        assert trace.count("<think>") == trace.count("</think>") == 1
        assert trace.count("<answer>") == trace.count("</answer>") == 1 and extract_answer(trace) == item.answer
        segs = [(float(a), float(b)) for a, b in SEG_RE.findall(trace)]
        assert len(segs) == trace.count("<seg>")
        for a, b in segs:
            assert 0.0 <= a < b and a < item.duration - 0.2
            if item.category not in ("order", "duration"):  # scan windows may end past the clip
                assert b <= item.duration
        # evidence: the listened spans that decide the answer, clamped to the clip
        deciding = {"count": segs, "identify": segs, "pitch": segs}.get(item.category, segs[-1:])
        assert item.evidence == [[a, min(b, item.duration)] for a, b in deciding], (item.evidence, segs)
        for a, b in item.evidence:
            assert 0.0 <= a < b <= item.duration
        for m in re.finditer("</seg>", trace):  # an observation continues the sentence after each listen
            assert re.match(r" [a-z]", trace[m.end() :]), trace
        verdict = verify(trace, item.choices, item.answer, valid_listens=len(segs))
        assert verdict.format_ok and verdict.correct and verdict.consistency_breaks == 0
        assert verdict.reward == pytest.approx(1.5)


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

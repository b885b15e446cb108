"""Tests for the listen tool (design §2-§3): span validation, clamping, limits, clip table, real slices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echo_agent.audio import AudioRef, AudioStore
from echo_agent.config import ListenLimits
from echo_agent.messages import audio_part
from echo_agent.tools.listen import ListenOutcome, ListenRequest, ListenTool

SR = 16000


def _write(path: Path, seconds: float, seed: int) -> np.ndarray:
    # Float WAV so the samples read back bit-exactly and slices can be compared to the source.
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, round(SR * seconds)).astype(np.float32)
    sf.write(str(path), data, SR, subtype="FLOAT")
    return data


@pytest.fixture
def store() -> AudioStore:
    return AudioStore()


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    out = {}
    for name, seconds, seed in [("main", 10.0, 1), ("clip2", 3.0, 2), ("long", 45.0, 3)]:
        path = tmp_path / f"{name}.wav"
        out[name] = (path, _write(path, seconds, seed))
    return out


@pytest.fixture
def clips(store: AudioStore, sources: dict[str, tuple[Path, np.ndarray]]) -> dict[str, AudioRef]:
    return {name: store.load(path) for name, (path, _) in sources.items()}


def req(
    start: str | float | None,
    end: str | float | None,
    clip: str | None = None,
    protocol: str = "seg",
    error: str | None = None,
    call_id: str | None = None,
) -> ListenRequest:
    return ListenRequest(
        start=start, end=end, clip=clip, raw=f"<seg>{start}, {end}</seg>", protocol=protocol,  # type: ignore[arg-type]
        error=error, call_id=call_id,
    )  # fmt: skip


def assert_invalid(out: ListenOutcome, reason_part: str) -> None:
    assert not out.valid
    assert out.call.valid is False
    assert out.audio is None
    assert out.note is not None
    assert out.note.startswith("(cannot listen to ")
    assert out.note.endswith(")")
    assert out.call.reason is not None
    assert reason_part in out.call.reason, out.call.reason
    assert out.call.reason in out.note


# ---------------------------------------------------------------- valid spans and clamping


def test_clip_table_durations(clips: dict[str, AudioRef]) -> None:
    assert clips["main"].duration == pytest.approx(10.0)
    assert clips["clip2"].duration == pytest.approx(3.0)
    assert clips["long"].duration == pytest.approx(45.0)


def test_valid_span(clips: dict[str, AudioRef]) -> None:
    r = req("1.0", "2.5")
    out = ListenTool()(r, clips, audios_used=1)
    assert out.valid
    assert out.note is None
    assert out.call.start == 1.0 and out.call.end == 2.5
    assert out.call.clip == "main"
    assert out.call.reason is None
    assert out.call.raw == r.raw and out.call.protocol == "seg"
    assert out.audio == audio_part("main", 1.0, 2.5)


def test_valid_float_values_and_call_id_pass_through(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req(0.0, 9.5, protocol="function", call_id="c1"), clips, audios_used=1)
    assert out.valid
    assert (out.call.start, out.call.end) == (0.0, 9.5)
    assert out.call.protocol == "function" and out.call.call_id == "c1"


def test_whole_clip_is_valid(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("0", "10"), clips, audios_used=1)
    assert out.valid and out.call.reason is None
    assert out.audio == audio_part("main", 0.0, 10.0)


def test_end_past_clip_is_clamped(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("8.0", "12.0"), clips, audios_used=1)
    assert out.valid
    assert out.call.start == 8.0
    assert out.call.end == pytest.approx(10.0)
    assert out.call.reason is not None and "clamped" in out.call.reason and "end" in out.call.reason
    assert out.audio == audio_part("main", 8.0, out.call.end)


def test_negative_start_is_clamped_to_zero(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req(-1.5, 2.0, protocol="function"), clips, audios_used=1)
    assert out.valid
    assert out.call.start == 0.0 and out.call.end == 2.0
    assert out.call.reason is not None and "start clamped to 0" in out.call.reason
    assert out.audio == audio_part("main", 0.0, 2.0)


def test_both_ends_clamped_reason_lists_both(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req(-1.0, 11.0, protocol="function"), clips, audios_used=1)
    assert out.valid
    assert (out.call.start, out.call.end) == (0.0, pytest.approx(10.0))
    assert out.call.reason is not None
    assert "start clamped" in out.call.reason and "end clamped" in out.call.reason


# ---------------------------------------------------------------- invalid spans: each has its own reason


@pytest.mark.parametrize(("start", "end"), [("3.0", "3.0"), ("5.0", "2.0"), ("12.0", "9.0"), (-3.0, -1.0)])
def test_start_not_before_end(clips: dict[str, AudioRef], start: str | float, end: str | float) -> None:
    assert_invalid(ListenTool()(req(start, end), clips, audios_used=1), "start must be before end")


@pytest.mark.parametrize(("start", "end"), [("12", "15"), ("10", "11"), ("10.0", "10.5")])
def test_start_past_end_of_clip(clips: dict[str, AudioRef], start: str, end: str) -> None:
    out = ListenTool()(req(start, end), clips, audios_used=1)
    assert_invalid(out, "past the end of the clip")
    assert "10.00 s" in (out.call.reason or "")


@pytest.mark.parametrize(
    ("start", "end"), [("1.2.3", "4"), ("1", "."), ("", "2"), ("abc", "2"), (None, "2"), ("1", None)]
)
def test_malformed_number(clips: dict[str, AudioRef], start: str | None, end: str | None) -> None:
    out = ListenTool()(req(start, end), clips, audios_used=1)
    assert_invalid(out, "must be numbers")
    if start == "1.2.3":
        assert "1.2.3" in (out.note or "")  # the note shows what the model wrote


@pytest.mark.parametrize(
    ("start", "end"),
    [(math.nan, 2.0), (1.0, math.inf), (-math.inf, 2.0), ("nan", "2"), ("1", "inf"), ("1", "1e999")],
)
def test_non_finite(clips: dict[str, AudioRef], start: str | float, end: str | float) -> None:
    assert_invalid(ListenTool()(req(start, end, protocol="function"), clips, audios_used=1), "finite")


def test_over_long_slice_default_limit(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("0", "31", clip="long"), clips, audios_used=1)
    assert_invalid(out, "longer than 30 s")
    assert ListenTool()(req("0", "30", clip="long"), clips, audios_used=1).valid


def test_too_short_slice_default_limit(clips: dict[str, AudioRef]) -> None:
    assert_invalid(ListenTool()(req("1.0", "1.1"), clips, audios_used=1), "shorter than 0.2 s")
    # Clamping can make a slice too short: 9.9-20 s on a 10 s clip is 0.1 s.
    assert_invalid(ListenTool()(req("9.9", "20"), clips, audios_used=1), "shorter than 0.2 s")


@pytest.mark.parametrize(("start", "end", "clip"), [("1.1", "1.3", "main"), ("0.1", "0.3", "main")])
def test_exact_min_slice_despite_float_rounding(clips: dict[str, AudioRef], start: str, end: str, clip: str) -> None:
    # 1.3 - 1.1 == 0.19999999999999996 in floats; the model asked for exactly the shortest slice.
    assert float(end) - float(start) < 0.2
    out = ListenTool()(req(start, end, clip=clip), clips, audios_used=1)
    assert out.valid, out.note


def test_exact_max_slice_despite_float_rounding(clips: dict[str, AudioRef]) -> None:
    # 32.2 - 2.2 == 30.000000000000004 in floats; the model asked for exactly the longest slice.
    assert 32.2 - 2.2 > 30.0
    out = ListenTool()(req("2.2", "32.2", clip="long"), clips, audios_used=1)
    assert out.valid, out.note


def test_unknown_clip(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("1", "2", clip="nope"), clips, audios_used=1)
    assert_invalid(out, "unknown clip 'nope'")
    assert "clip2, long, main" in (out.call.reason or "")  # names what is loaded
    assert out.call.clip == "nope"


def test_unknown_clip_with_empty_table() -> None:
    assert_invalid(ListenTool()(req("1", "2"), {}, audios_used=1), "loaded: none")


@pytest.mark.parametrize("used", [8, 9, 100])
def test_exhausted_budget(clips: dict[str, AudioRef], used: int) -> None:
    out = ListenTool()(req("1", "2"), clips, audios_used=used)
    assert_invalid(out, "budget used up")
    assert "8 audio inputs" in (out.call.reason or "")


def test_budget_boundary(clips: dict[str, AudioRef]) -> None:
    # 8 audio inputs per question, the clip included: with 7 in context one more is allowed.
    assert ListenTool()(req("1", "2"), clips, audios_used=7).valid
    assert not ListenTool()(req("1", "2"), clips, audios_used=8).valid


def test_parse_error_becomes_invalid_with_that_reason(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req(None, None, error="could not read the span"), clips, audios_used=1)
    assert_invalid(out, "could not read the span")
    assert out.call.start is None and out.call.end is None


def test_invalid_call_keeps_requested_numbers(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("5", "2"), clips, audios_used=1)
    assert (out.call.start, out.call.end) == (5.0, 2.0)
    assert out.note == "(cannot listen to 5-2 s: start must be before end)"


def test_invalid_notes_are_distinct(clips: dict[str, AudioRef]) -> None:
    tool = ListenTool()
    cases = [
        tool(req("5", "2"), clips, 1),
        tool(req("12", "15"), clips, 1),
        tool(req("1.2.3", "4"), clips, 1),
        tool(req(math.nan, 2.0), clips, 1),
        tool(req("0", "31", clip="long"), clips, 1),
        tool(req("1.0", "1.1"), clips, 1),
        tool(req("1", "2", clip="nope"), clips, 1),
        tool(req("1", "2"), clips, 8),
    ]
    reasons = [o.call.reason for o in cases]
    assert all(not o.valid for o in cases)
    assert len(set(reasons)) == len(reasons)


# ---------------------------------------------------------------- custom limits


def test_custom_limits_are_honoured(clips: dict[str, AudioRef]) -> None:
    tool = ListenTool(ListenLimits(max_audios=2, min_slice=0.5, max_slice=3.0))
    assert tool(req("1", "2"), clips, audios_used=1).valid
    assert_invalid(tool(req("1", "2"), clips, audios_used=2), "budget used up (2 audio inputs")
    assert_invalid(tool(req("1.0", "1.4"), clips, audios_used=1), "shorter than 0.5 s")
    assert tool(req("1.0", "1.5"), clips, audios_used=1).valid
    assert_invalid(tool(req("1.0", "4.5"), clips, audios_used=1), "longer than 3 s")
    assert tool(req("1.0", "4.0"), clips, audios_used=1).valid
    # Defaults would allow these.
    assert ListenTool()(req("1.0", "1.4"), clips, audios_used=1).valid
    assert ListenTool()(req("1.0", "4.5"), clips, audios_used=5).valid


def test_custom_limits_clamp_before_length_check(clips: dict[str, AudioRef]) -> None:
    # 8-20 s is 12 s as written but 2 s after clamping to the 10 s clip, which fits max_slice=3.
    tool = ListenTool(ListenLimits(max_slice=3.0))
    out = tool(req("8", "20"), clips, audios_used=1)
    assert out.valid and out.call.end == pytest.approx(10.0)


# ---------------------------------------------------------------- several clips


def test_clip_id_selects_clip_and_its_duration(clips: dict[str, AudioRef]) -> None:
    tool = ListenTool()
    short = tool(req("1", "5", clip="clip2"), clips, audios_used=1)
    assert short.valid and short.call.clip == "clip2"
    assert short.call.end == pytest.approx(3.0)
    assert short.audio == audio_part("clip2", 1.0, short.call.end)
    main = tool(req("1", "5", clip="main"), clips, audios_used=1)
    assert main.valid and main.call.end == 5.0 and main.call.reason is None
    assert_invalid(tool(req("4", "5", clip="clip2"), clips, audios_used=1), "past the end of the clip (3.00 s)")


def test_default_clip_used_when_request_has_none(clips: dict[str, AudioRef]) -> None:
    # From the constructor...
    out = ListenTool(default_clip="clip2")(req("1", "5"), clips, audios_used=1)
    assert out.call.clip == "clip2" and out.call.end == pytest.approx(3.0)
    # ...overridden per call (the graph passes the active clip)...
    out = ListenTool(default_clip="clip2")(req("1", "5"), clips, audios_used=1, default_clip="main")
    assert out.call.clip == "main" and out.call.end == 5.0
    # ...and a clip named by the request wins over both.
    out = ListenTool(default_clip="clip2")(req("1", "5", clip="long"), clips, audios_used=1, default_clip="main")
    assert out.call.clip == "long" and out.call.end == 5.0
    # The built-in default is "main".
    assert ListenTool()(req("1", "2"), clips, audios_used=1).call.clip == "main"


def test_default_clip_missing_from_table(clips: dict[str, AudioRef]) -> None:
    out = ListenTool(default_clip="gone")(req("1", "2"), clips, audios_used=1)
    assert_invalid(out, "unknown clip 'gone'")


# ---------------------------------------------------------------- the slice the store cuts


@pytest.mark.parametrize(
    ("clip", "start", "end", "n"),
    [
        ("main", "1.0", "2.5", 24000),
        ("main", "0", "10", 160000),
        ("main", "8", "12", 32000),  # clamped to 8-10 s
        ("main", "0.25", "0.45", 3200),
        ("clip2", "2", "9", 16000),  # clamped to 2-3 s
        ("long", "10", "40", 480000),
    ],
)
def test_store_slice_of_outcome_span(
    store: AudioStore,
    clips: dict[str, AudioRef],
    sources: dict[str, tuple[Path, np.ndarray]],
    clip: str,
    start: str,
    end: str,
    n: int,
) -> None:
    out = ListenTool()(req(start, end, clip=clip), clips, audios_used=1)
    assert out.valid and out.audio is not None
    part = out.audio
    assert part["start"] is not None and part["end"] is not None
    wav = store.slice(clips[part["clip"]], part["start"], part["end"], SR)
    assert wav.shape == (n,)
    lo = round(part["start"] * SR)
    np.testing.assert_array_equal(wav, sources[clip][1][lo : lo + n])


def test_min_slice_outcome_is_not_empty(store: AudioStore, clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(req("1.1", "1.3"), clips, audios_used=1)
    assert out.valid and out.audio is not None
    wav = store.slice(clips["main"], out.audio["start"] or 0.0, out.audio["end"] or 0.0, SR)
    assert wav.shape == (3200,)


# ---------------------------------------------------------------- hostile sizes


def test_nothing_the_model_wrote_is_quoted_unbounded(clips: dict[str, AudioRef]) -> None:
    """Whatever a request holds (any protocol, or a caller's own), the note and the record stay short: a note
    goes into the conversation, and every later prompt and checkpoint would carry it again."""
    huge = "1.2." * 1_000_000
    tool = ListenTool()
    cases = [
        (ListenRequest(start=huge, end="2", raw="<seg>" + huge, protocol="seg"), "numbers of seconds"),
        (ListenRequest(start="1", end="2", clip="k" * 10**6, raw=huge, protocol="seg"), "unknown clip 'kkk"),
        (ListenRequest(start=None, end=None, raw=huge, protocol="function", error="bad " * 10**5), "bad bad"),
    ]
    for request, reason in cases:
        out = tool(request, clips, audios_used=1)
        assert_invalid(out, reason)
        assert out.note is not None and len(out.note) < 700
        assert len(out.call.raw) <= 200 and len(out.call.clip) <= 60 and len(out.call.reason or "") <= 300
    out = tool(ListenRequest(start="1", end="2", raw=huge, protocol="seg"), clips, audios_used=1)
    assert out.valid and len(out.call.raw) == 200

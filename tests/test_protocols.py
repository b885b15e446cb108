"""Tests for the listen protocols (design §2 seg tags, §3 function calls): parsing hostile model output,
absorbing generations into the conversation, and delivering listen outcomes back into it."""

from __future__ import annotations

import copy
import json
import math
import re
import time

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_agent.audio import AudioRef, AudioStore
from echo_agent.backends.base import Generation
from echo_agent.backends.transformers import parse_tool_calls
from echo_agent.config import ListenLimits
from echo_agent.messages import Message, ToolCall, audio_part, message_text, text_part
from echo_agent.protocols import (
    FunctionCallProtocol,
    SegTagProtocol,
    make_protocol,
    parse_closing_seg,
    parse_last_seg,
)
from echo_agent.tools.listen import LISTEN_TOOL_SCHEMA, ListenOutcome, ListenRequest, ListenTool

SR = 16000
EPS = 1e-9  # the listen tool's tolerance for float rounding at the slice-length limits


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, AudioRef]:
    """A real clip table: a 10 s main clip and a 3 s second clip, loaded through the audio store."""
    d = tmp_path_factory.mktemp("clips")
    store = AudioStore()
    out = {}
    for name, seconds in [("main", 10.0), ("clip2", 3.0)]:
        path = d / f"{name}.wav"
        sf.write(str(path), np.zeros(round(SR * seconds), dtype=np.float32), SR)
        out[name] = store.load(path)
    return out


def user_msg() -> Message:
    return {"role": "user", "content": [audio_part("main"), text_part("How many beeps?")]}


def gen(
    text: str, finish: str = "stop", stop: str | None = "</seg>", in_text: bool = False, **kw: object
) -> Generation:
    return Generation(
        text=text, token_ids=kw.pop("token_ids", [11, 12, 13]), logprobs=kw.pop("logprobs", [-0.1, -0.2, -0.3]),
        finish_reason=finish, stop_string=stop, stop_string_in_text=in_text, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def tcall(arguments: str, name: str = "listen", id: str = "call_1") -> ToolCall:
    return {"id": id, "name": name, "arguments": arguments}


# ---------------------------------------------------------------- parsing well-formed tags


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("<seg>3.0, 5.0</seg>", "3.0", "5.0"),
        ("<seg>3.0,5.0</seg>", "3.0", "5.0"),
        ("<seg>  3.0 ,\t5.0  </seg>", "3.0", "5.0"),
        ("<seg>\n3.0,\n5.0\n</seg>", "3.0", "5.0"),
        ("<seg>\u20033.0,\u00a05.0</seg>", "3.0", "5.0"),  # unicode whitespace is still whitespace
        ("<seg>3, 5</seg>", "3", "5"),
        ("<seg>.5, 1.</seg>", ".5", "1."),
        ("I hear something <seg>1.25, 2.75</seg>", "1.25", "2.75"),
    ],
)
def test_parse_well_formed(text: str, start: str, end: str) -> None:
    for r in (parse_last_seg(text), parse_closing_seg(text)):
        assert r is not None
        assert r.error is None
        assert (r.start, r.end, r.clip) == (start, end, None)
        assert r.protocol == "seg"
        assert r.raw.startswith("<seg>") and r.raw.endswith("</seg>")


def test_parse_clip_prefix() -> None:
    for r in (parse_last_seg("<seg>clip2: 1, 2</seg>"), parse_closing_seg("x <seg> clip2 :1,2</seg>")):
        assert r is not None and r.error is None
        assert (r.clip, r.start, r.end) == ("clip2", "1", "2")
    r = parse_closing_seg("<seg>my_clip-2.b: 0.5, 1.5</seg>")
    assert (r.clip, r.start, r.end) == ("my_clip-2.b", "0.5", "1.5")


def test_last_match_wins() -> None:
    text = "first <seg>1, 2</seg> then <seg>clip2: 3, 4</seg> and finally <seg>5.5, 6.5</seg>"
    for r in (parse_last_seg(text), parse_closing_seg(text)):
        assert r is not None
        assert (r.start, r.end, r.clip) == ("5.5", "6.5", None)
        assert r.raw == "<seg>5.5, 6.5</seg>"


def test_last_seg_skips_malformed_trailing_tag_but_closing_seg_does_not() -> None:
    text = "<seg>1, 2</seg> ... <seg>oops</seg>"
    last = parse_last_seg(text)
    assert last is not None and (last.start, last.end) == ("1", "2")
    # The tag that stopped generation is the malformed one: it must not be replaced by an earlier tag.
    closing = parse_closing_seg(text)
    assert closing.error is not None
    assert closing.start is None and closing.end is None
    assert closing.raw == "<seg>oops</seg>"


def test_last_seg_none_without_tag() -> None:
    assert parse_last_seg("") is None
    assert parse_last_seg("no tags here, 1.0, 2.0") is None


# ---------------------------------------------------------------- hostile tags


@pytest.mark.parametrize(
    "text",
    [
        "<seg>-1, 2</seg>",  # the grammar has no minus
        "<seg>1, -2</seg>",
        "<seg></seg>",
        "<seg>   </seg>",
        "<seg>1</seg>",
        "<seg>1,</seg>",
        "<seg>, 2</seg>",
        "<seg>1 2</seg>",
        "<seg>1e5, 2</seg>",
        "<seg>inf, nan</seg>",
        "<seg>١, ٢</seg>",  # Arabic-Indic digits are not in [0-9]
        "<seg>１, ２</seg>",  # fullwidth digits
        "<seg>1, 2, 3</seg>",
        "<seg>: 1, 2</seg>",
        "<seg>9clip: 1, 2</seg>",  # clip ids start with a letter or underscore
        "<seg>1, 2<seg></seg>",
    ],
)
def test_hostile_tag_body_is_an_error_request(text: str) -> None:
    r = parse_closing_seg(text)
    assert r.error is not None and r.error
    assert (r.start, r.end) == (None, None)
    assert r.protocol == "seg"
    assert parse_last_seg(text) is None


@pytest.mark.parametrize("text", ["</seg>", "1, 2</seg>", "", "plain text", "<seg>1, 2", "</seg><seg>1, 2"])
def test_no_opener_before_closer(text: str) -> None:
    r = parse_closing_seg(text)
    assert r.error is not None and "no <seg> tag" in r.error
    assert (r.start, r.end) == (None, None)


@pytest.mark.parametrize("text", ["<seg>1.2.3, 4</seg>", "<seg>1, ...</seg>", "<seg>., .</seg>"])
def test_digit_dot_soup_parses_then_validates_invalid(text: str, clips: dict[str, AudioRef]) -> None:
    r = parse_closing_seg(text)
    assert r.error is None  # the grammar's [0-9.]+ accepts it...
    out = ListenTool()(r, clips, audios_used=1)
    assert not out.valid  # ...and the tool refuses it
    assert out.call.reason == "start and end must be numbers of seconds"
    assert out.note is not None and out.note.startswith("(cannot listen to ")


def test_nested_open_tags_use_innermost() -> None:
    for r in (parse_last_seg("<seg><seg>1,2</seg>"), parse_closing_seg("<seg><seg>1,2</seg>")):
        assert r is not None and r.error is None
        assert (r.start, r.end) == ("1", "2")
    r = parse_closing_seg("<seg>7, <seg>2, 3</seg>")
    assert (r.start, r.end) == ("2", "3")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<seg>" + "9" * 400 + ", " + "9" * 401 + "</seg>", "finite"),  # parses to inf
        ("<seg>12345678901234567890, 99999999999999999999</seg>", "past the end"),
        ("<seg>0.0000000001, 0.0000000002</seg>", "shorter than"),
    ],
)
def test_huge_and_tiny_numbers(text: str, reason: str, clips: dict[str, AudioRef]) -> None:
    r = parse_closing_seg(text)
    assert r.error is None
    assert len(r.raw) <= 200  # hostile tags do not bloat state
    out = ListenTool()(r, clips, audios_used=1)
    assert not out.valid and reason in (out.call.reason or "")


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000,
        "<seg>" * 20_000,
        "</seg>" * 20_000,
        "<seg>" + "1" * 100_000 + "</seg>",
        "<seg>" + "1" * 100_000 + ", 2</seg>",
        "<seg>" + "1." * 50_000 + ", 2</seg>",
        "<seg>" + " " * 100_000 + "</seg>",
        "<seg>a" + "1" * 100_000 + "</seg>",
        "<seg>1," + " " * 100_000 + "x</seg>",
        "<seg>1, 2" * 15_000 + "</seg>",
        "<seg>" + "a" * 100_000 + ": 1, 2</seg>",
    ],
)
def test_long_inputs_are_fast_and_safe(text: str, clips: dict[str, AudioRef]) -> None:
    t0 = time.perf_counter()
    last = parse_last_seg(text)
    closing = parse_closing_seg(text)
    out = ListenTool()(closing, clips, audios_used=1)
    assert time.perf_counter() - t0 < 1.0
    check_outcome(out, clips, ListenLimits())
    assert len(closing.raw) <= 200
    if last is not None:
        assert len(last.raw) <= 200
    if not out.valid:
        assert out.note and out.note.startswith("(cannot listen to ")


def test_many_tags_last_wins_quickly() -> None:
    text = "".join(f"<seg>{i}, {i + 1}</seg> " for i in range(20_000)) + "<seg>4.5, 5.5</seg>"
    t0 = time.perf_counter()
    last, closing = parse_last_seg(text), parse_closing_seg(text)
    assert time.perf_counter() - t0 < 1.0
    assert last is not None and (last.start, last.end) == ("4.5", "5.5")
    assert (closing.start, closing.end) == ("4.5", "5.5")


# ---------------------------------------------------------------- property: never raises, always decides

FRAGMENTS = ["<seg>", "</seg>", "<seg", "seg>", "<", ">", "/", ",", ".", " ", "\n", "\t", ":", "-", "e"]
FRAGMENTS += [*"0123456789", "1.5", "10", "99999", "main:", "clip2:", "nope:", "a", "Z", "_", "١"]
seg_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.builds(
        lambda a, b, c, tail: f"{a}<seg>{b}, {c}{tail}</seg>",
        st.text(max_size=20),
        st.one_of(st.from_regex(r"[0-9.]{1,8}", fullmatch=True), st.text(max_size=5)),
        st.one_of(st.from_regex(r"[0-9.]{1,8}", fullmatch=True), st.text(max_size=5)),
        st.sampled_from(["", " ", "x"]),
    ),
)


def check_outcome(out: ListenOutcome, clips: dict[str, AudioRef], limits: ListenLimits) -> None:
    call = out.call
    if out.valid:
        assert out.note is None
        assert call.start is not None and call.end is not None
        duration = clips[call.clip].duration
        assert 0.0 <= call.start < call.end <= duration
        assert limits.min_slice - EPS <= call.end - call.start <= limits.max_slice + EPS
        assert out.audio == audio_part(call.clip, call.start, call.end)
    else:
        assert out.audio is None
        assert out.note and out.note.startswith("(cannot listen to ")
        assert call.reason


@settings(max_examples=400, deadline=None)
@given(text=seg_text, used=st.integers(0, 10))
def test_seg_pipeline_never_raises(text: str, used: int, clips: dict[str, AudioRef]) -> None:
    last = parse_last_seg(text)
    assert last is None or isinstance(last, ListenRequest)
    req = parse_closing_seg(text)
    assert req.error is not None or (req.start is not None and req.end is not None)
    limits = ListenLimits()
    out = ListenTool(limits)(req, clips, audios_used=used)
    check_outcome(out, clips, limits)
    if req.error is not None:
        assert not out.valid and out.call.reason == req.error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
json_args = st.one_of(
    st.text(max_size=60),
    st.fixed_dictionaries(
        {}, optional={"start": json_values, "end": json_values, "clip": st.sampled_from(["main", "clip2", "", "x"])}
    ).map(json.dumps),
    json_values.map(json.dumps),
)


@settings(max_examples=300, deadline=None)
@given(args=json_args, name=st.sampled_from(["listen", "listen", "play", ""]), used=st.integers(0, 10))
def test_function_pipeline_never_raises(args: str, name: str, used: int, clips: dict[str, AudioRef]) -> None:
    req = FunctionCallProtocol.parse_tool_call(tcall(args, name=name))
    assert req.protocol == "function" and req.call_id == "call_1"
    limits = ListenLimits(max_audios=5, min_slice=0.5, max_slice=4.0)
    out = ListenTool(limits)(req, clips, audios_used=used)
    check_outcome(out, clips, limits)
    msgs = FunctionCallProtocol().deliver([user_msg()], [out])
    assert msgs[1]["role"] == "tool"


# ---------------------------------------------------------------- SegTagProtocol.absorb


def test_seg_protocol_basics() -> None:
    p = SegTagProtocol()
    assert p.name == "seg" and p.stop == ["</seg>"] and p.tools is None
    assert p.continues_turn(True) and not p.continues_turn(False)
    assert isinstance(make_protocol("seg"), SegTagProtocol)
    assert isinstance(make_protocol("function"), FunctionCallProtocol)
    with pytest.raises(ValueError, match="unknown protocol"):
        make_protocol("xml")


def test_absorb_server_style_reappends_stop_string() -> None:
    before = [user_msg()]
    snapshot = copy.deepcopy(before)
    g = gen("I hear a beep <seg>1.0, 2.0", in_text=False)
    msgs, reqs = SegTagProtocol().absorb(before, g, open_turn=False)
    assert before == snapshot  # the input conversation is not mutated
    assert len(msgs) == 2 and msgs[-1]["role"] == "assistant"
    model, runtime = msgs[-1]["content"]
    assert model == {
        "type": "text", "text": "I hear a beep <seg>1.0, 2.0", "origin": "model",
        "token_ids": [11, 12, 13], "logprobs": [-0.1, -0.2, -0.3],
    }  # fmt: skip
    assert runtime["type"] == "text" and runtime["text"] == "</seg>" and runtime["origin"] == "runtime"
    assert "token_ids" not in runtime  # it was not sampled
    assert len(reqs) == 1
    assert (reqs[0].start, reqs[0].end, reqs[0].error) == ("1.0", "2.0", None)
    assert message_text(msgs[-1]) == "I hear a beep <seg>1.0, 2.0</seg>"


def test_absorb_stop_string_in_text_appends_nothing() -> None:
    g = gen("beep <seg>1.0, 2.0</seg>", in_text=True)
    msgs, reqs = SegTagProtocol().absorb([user_msg()], g, open_turn=False)
    assert len(msgs[-1]["content"]) == 1
    assert msgs[-1]["content"][0]["origin"] == "model"
    assert message_text(msgs[-1]) == "beep <seg>1.0, 2.0</seg>"
    assert [(r.start, r.end) for r in reqs] == [("1.0", "2.0")]


@pytest.mark.parametrize(("finish", "stop"), [("eos", None), ("length", None), ("stop", "<|im_end|>"), ("stop", None)])
def test_absorb_without_seg_stop_makes_no_request(finish: str, stop: str | None) -> None:
    # Even a complete tag in the text is not a request when generation did not stop on </seg>.
    g = gen("<think><seg>1, 2</seg></think><answer>two</answer>", finish=finish, stop=stop, in_text=False)
    msgs, reqs = SegTagProtocol().absorb([user_msg()], g, open_turn=False)
    assert reqs == []
    assert len(msgs) == 2
    assert [p["origin"] for p in msgs[-1]["content"] if p["type"] == "text"] == ["model"]


def test_absorb_malformed_closing_tag_is_an_error_request() -> None:
    _, reqs = SegTagProtocol().absorb([user_msg()], gen("<seg>1, 2</seg> then <seg>soon"), open_turn=False)
    assert len(reqs) == 1 and reqs[0].error is not None


def test_absorb_open_turn_extends_same_message(clips: dict[str, AudioRef]) -> None:
    p = SegTagProtocol()
    msgs, _ = p.absorb([user_msg()], gen("first <seg>1, 2"), open_turn=False)
    msgs = p.deliver(msgs, [ListenTool()(parse_closing_seg("<seg>1, 2</seg>"), clips, 1)])
    n_parts = len(msgs[-1]["content"])
    snapshot = copy.deepcopy(msgs)
    g2 = gen(" then <seg>3, 4", token_ids=[21, 22], logprobs=[-1.0, -2.0])
    msgs2, reqs = p.absorb(msgs, g2, open_turn=True)
    assert msgs == snapshot  # not mutated
    assert len(msgs2) == len(msgs) == 2  # no new message
    content = msgs2[-1]["content"]
    assert len(content) == n_parts + 2
    assert content[-2] == {
        "type": "text", "text": " then <seg>3, 4", "origin": "model", "token_ids": [21, 22], "logprobs": [-1.0, -2.0]
    }  # fmt: skip
    assert content[-1]["origin"] == "runtime"  # type: ignore[typeddict-item]
    # Only the current call's text is parsed: the request is the new tag.
    assert [(r.start, r.end) for r in reqs] == [("3", "4")]


def test_absorb_open_turn_without_assistant_message_starts_one() -> None:
    msgs, _ = SegTagProtocol().absorb([user_msg()], gen("hi", finish="eos", stop=None), open_turn=True)
    assert [m["role"] for m in msgs] == ["user", "assistant"]


def test_absorb_closed_turn_starts_new_message() -> None:
    prior: list[Message] = [user_msg(), {"role": "assistant", "content": [text_part("earlier", "model")]}]
    msgs, _ = SegTagProtocol().absorb(prior, gen("again", finish="eos", stop=None), open_turn=False)
    assert [m["role"] for m in msgs] == ["user", "assistant", "assistant"]
    assert message_text(msgs[1]) == "earlier"


# ---------------------------------------------------------------- SegTagProtocol.deliver


def test_seg_deliver_valid_inserts_audio_right_after_tag(clips: dict[str, AudioRef]) -> None:
    p = SegTagProtocol()
    msgs, reqs = p.absorb([user_msg()], gen("Listening again <seg>2.0, 3.5"), open_turn=False)
    outcomes = [ListenTool()(r, clips, audios_used=1) for r in reqs]
    assert outcomes[0].valid
    out_msgs = p.deliver(msgs, outcomes)
    assert len(out_msgs) == 2 and out_msgs[-1]["role"] == "assistant"
    content = out_msgs[-1]["content"]
    assert [part.get("origin", part["type"]) for part in content] == ["model", "runtime", "audio"]
    assert content[1]["text"] == "</seg>"  # type: ignore[typeddict-item]
    assert content[2] == audio_part("main", 2.0, 3.5)
    assert p.continues_turn(True)


def test_seg_deliver_invalid_inserts_note(clips: dict[str, AudioRef]) -> None:
    p = SegTagProtocol()
    msgs, reqs = p.absorb([user_msg()], gen("Listening again <seg>5.0, 2.0"), open_turn=False)
    outcomes = [ListenTool()(r, clips, audios_used=1) for r in reqs]
    out_msgs = p.deliver(msgs, outcomes)
    assert len(out_msgs) == 2
    content = out_msgs[-1]["content"]
    assert len(content) == 3
    note = content[-1]
    assert note["type"] == "text" and note["origin"] == "note"  # type: ignore[typeddict-item]
    assert "cannot listen" in note["text"]  # type: ignore[typeddict-item]
    assert "start must be before end" in note["text"]  # type: ignore[typeddict-item]
    assert not any(part["type"] == "audio" for part in content)


def test_seg_full_round_trip_two_listens(clips: dict[str, AudioRef]) -> None:
    p, tool = SegTagProtocol(), ListenTool()
    msgs: list[Message] = [user_msg()]
    used, open_turn = 1, False
    for text in ["a <seg>1, 2", " b <seg>clip2: 0.5, 9"]:
        msgs, reqs = p.absorb(msgs, gen(text), open_turn)
        outs = [tool(r, clips, used) for r in reqs]
        used += sum(o.valid for o in outs)
        msgs = p.deliver(msgs, outs)
        open_turn = True
    msgs, reqs = p.absorb(msgs, gen(" <answer>two</answer>", finish="eos", stop=None), open_turn)
    assert reqs == [] and used == 3
    assert len(msgs) == 2
    audio = [part for part in msgs[-1]["content"] if part["type"] == "audio"]
    assert audio == [audio_part("main", 1.0, 2.0), audio_part("clip2", 0.5, pytest.approx(3.0))]
    assert message_text(msgs[-1], "<A>") == "a <seg>1, 2</seg><A> b <seg>clip2: 0.5, 9</seg><A> <answer>two</answer>"


# ---------------------------------------------------------------- FunctionCallProtocol


def test_function_protocol_basics() -> None:
    p = FunctionCallProtocol()
    assert p.name == "function" and p.stop == [] and p.tools == [LISTEN_TOOL_SCHEMA]
    assert not p.continues_turn(True)


@pytest.mark.parametrize(
    ("args", "start", "end", "clip"),
    [
        ('{"start": 1.0, "end": 2.5}', 1.0, 2.5, None),
        ('{"start": 1, "end": 3, "clip": "clip2"}', 1.0, 3.0, "clip2"),
        ('{"start": "1.5", "end": "2"}', "1.5", "2", None),  # string numbers kept for the tool to read
        ('{"start": true, "end": false}', None, None, None),  # booleans are not numbers
        ('{"start": [1], "end": {"a": 2}}', None, None, None),
        ('{"start": null}', None, None, None),
        ('{"start": 1, "end": 2, "clip": ""}', 1.0, 2.0, None),
        ('{"start": 1, "end": 2, "clip": 7}', 1.0, 2.0, None),
        ("", None, None, None),
        ('{"start": NaN, "end": Infinity}', "nan", "inf", None),
    ],
)
def test_parse_tool_call_values(args: str, start: object, end: object, clip: str | None) -> None:
    r = FunctionCallProtocol.parse_tool_call(tcall(args))
    assert r.error is None
    assert r.call_id == "call_1" and r.protocol == "function"

    def norm(v: object) -> object:
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v

    assert (norm(r.start), norm(r.end), r.clip) == (start, end, clip)


@pytest.mark.parametrize(
    ("args", "name", "error_part"),
    [
        ('{"start": 1, "end":', "listen", "JSON object"),
        ("not json", "listen", "JSON object"),
        ("[1, 2]", "listen", "JSON object"),
        ("3.5", "listen", "JSON object"),
        ('"text"', "listen", "JSON object"),
        ("null", "listen", "JSON object"),
        ("[" * 100_000, "listen", "JSON object"),  # deep nesting
        ('{"start": 1' + "0" * 5000 + ', "end": 2}', "listen", "JSON object"),  # over the int digit limit
        ('{"start": 1, "end": 2}', "play", "unknown tool 'play'"),
        ('{"start": 1, "end": 2}', "", "unknown tool"),
    ],
)
def test_parse_tool_call_errors(args: str, name: str, error_part: str, clips: dict[str, AudioRef]) -> None:
    r = FunctionCallProtocol.parse_tool_call(tcall(args, name=name))
    assert r.error is not None and error_part in r.error
    assert r.call_id == "call_1"
    assert len(r.raw) <= 200
    out = ListenTool()(r, clips, audios_used=1)
    assert not out.valid and out.note and out.note.startswith("(cannot listen to ")


@pytest.mark.parametrize("digits", [400, 4000])
def test_parse_tool_call_huge_int_is_not_finite(digits: int, clips: dict[str, AudioRef]) -> None:
    # A JSON int too large for a float must not raise OverflowError.
    for sign in ("", "-"):
        r = FunctionCallProtocol.parse_tool_call(tcall('{"start": 1, "end": ' + sign + "9" * digits + "}"))
        assert r.error is None
        out = ListenTool()(r, clips, audios_used=1)
        assert not out.valid and "finite" in (out.call.reason or "")


def test_tool_call_string_and_negative_numbers_validate(clips: dict[str, AudioRef]) -> None:
    r = FunctionCallProtocol.parse_tool_call(tcall('{"start": "1.5", "end": "2"}'))
    out = ListenTool()(r, clips, audios_used=1)
    assert out.valid and (out.call.start, out.call.end) == (1.5, 2.0)
    r = FunctionCallProtocol.parse_tool_call(tcall('{"start": -2, "end": 1}'))
    out = ListenTool()(r, clips, audios_used=1)
    assert out.valid and out.call.start == 0.0 and "clamped" in (out.call.reason or "")
    r = FunctionCallProtocol.parse_tool_call(tcall('{"start": true, "end": 2}'))
    assert ListenTool()(r, clips, audios_used=1).call.reason == "start and end must be numbers of seconds"


def test_function_absorb_yields_requests() -> None:
    calls = [
        tcall('{"start": 1, "end": 2}', id="a"),
        tcall("{bad json", id="b"),
        tcall("[1, 2]", id="c"),
        tcall('{"start": 1, "end": 2}', name="search", id="d"),
        tcall('{"start": "3", "end": "4.5", "clip": "clip2"}', id="e"),
        tcall('{"start": false, "end": true}', id="f"),
    ]
    before = [user_msg()]
    msgs, reqs = FunctionCallProtocol().absorb(
        before, gen("Let me listen.", finish="tool_calls", tool_calls=calls), False
    )
    assert len(before) == 1
    assert len(msgs) == 2
    assert msgs[-1]["role"] == "assistant" and msgs[-1]["tool_calls"] == calls
    assert msgs[-1]["content"][0]["token_ids"] == [11, 12, 13]  # type: ignore[typeddict-item]
    assert msgs[-1]["content"][0]["logprobs"] == [-0.1, -0.2, -0.3]  # type: ignore[typeddict-item]
    assert [r.call_id for r in reqs] == ["a", "b", "c", "d", "e", "f"]
    assert [r.error is None for r in reqs] == [True, False, False, False, True, True]
    assert (reqs[0].start, reqs[0].end) == (1.0, 2.0)
    assert (reqs[4].start, reqs[4].end, reqs[4].clip) == ("3", "4.5", "clip2")
    assert (reqs[5].start, reqs[5].end) == (None, None)


def test_function_absorb_without_tool_calls() -> None:
    msgs, reqs = FunctionCallProtocol().absorb([user_msg()], gen("The answer is two.", finish="eos", stop=None), True)
    assert reqs == []
    assert len(msgs) == 2 and "tool_calls" not in msgs[-1]


def test_function_deliver_mixed(clips: dict[str, AudioRef]) -> None:
    p, tool = FunctionCallProtocol(), ListenTool()
    calls = [
        tcall('{"start": 1, "end": 2.5}', id="a"),
        tcall('{"start": 5, "end": 2}', id="b"),
        tcall('{"start": 0.5, "end": 9, "clip": "clip2"}', id="c"),
    ]
    msgs, reqs = p.absorb([user_msg()], gen("", finish="tool_calls", tool_calls=calls), False)
    outs = [tool(r, clips, 1) for r in reqs]
    assert [o.valid for o in outs] == [True, False, True]
    out_msgs = p.deliver(msgs, outs)
    assert [m["role"] for m in out_msgs] == ["user", "assistant", "tool", "tool", "tool", "user"]
    tools = out_msgs[2:5]
    assert [m["tool_call_id"] for m in tools] == ["a", "b", "c"]
    assert all(len(m["content"]) == 1 and m["content"][0]["type"] == "text" for m in tools)
    assert tools[0]["content"][0]["origin"] == "runtime"  # type: ignore[typeddict-item]
    assert tools[1]["content"][0]["origin"] == "note"  # type: ignore[typeddict-item]
    assert tools[1]["content"][0]["text"] == outs[1].note  # type: ignore[typeddict-item]
    assert "cannot listen" in tools[1]["content"][0]["text"]  # type: ignore[typeddict-item]
    audio_msg = out_msgs[-1]["content"]
    assert [part["type"] for part in audio_msg] == ["text", "audio", "text", "audio"]
    assert audio_msg[1] == audio_part("main", 1.0, 2.5)
    assert audio_msg[3] == audio_part("clip2", 0.5, pytest.approx(3.0))
    line0, line1 = audio_msg[0]["text"], audio_msg[2]["text"]  # type: ignore[typeddict-item]
    assert "'main'" in line0 and "1.00 s" in line0 and "2.50 s" in line0
    assert "'clip2'" in line1 and "0.50 s" in line1 and "3.00 s" in line1


def test_function_deliver_invalid_only_has_no_user_message(clips: dict[str, AudioRef]) -> None:
    p = FunctionCallProtocol()
    calls = [tcall("{bad", id="x"), tcall('{"start": 1, "end": 2, "clip": "nope"}', id="y")]
    msgs, reqs = p.absorb([user_msg()], gen("", finish="tool_calls", tool_calls=calls), False)
    outs = [ListenTool()(r, clips, 1) for r in reqs]
    out_msgs = p.deliver(msgs, outs)
    assert [m["role"] for m in out_msgs] == ["user", "assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in out_msgs[2:]] == ["x", "y"]
    for m, o in zip(out_msgs[2:], outs, strict=True):
        assert m["content"][0]["text"] == o.note  # type: ignore[typeddict-item]
        assert m["content"][0]["origin"] == "note"  # type: ignore[typeddict-item]
    assert not any(part["type"] == "audio" for m in out_msgs[2:] for part in m["content"])


# ---------------------------------------------------------------- both protocols, one ListenCall shape


@pytest.mark.parametrize(
    ("seg", "args"),
    [
        ("<seg>1.0, 2.5</seg>", '{"start": 1.0, "end": 2.5}'),
        ("<seg>clip2: 0.5, 9</seg>", '{"start": 0.5, "end": 9, "clip": "clip2"}'),
        ("<seg>5, 2</seg>", '{"start": 5, "end": 2}'),
        ("<seg>12, 15</seg>", '{"start": "12", "end": "15"}'),
        ("<seg>nope: 1, 2</seg>", '{"start": 1, "end": 2, "clip": "nope"}'),
    ],
)
def test_both_protocols_normalise_to_same_call(seg: str, args: str, clips: dict[str, AudioRef]) -> None:
    tool = ListenTool()
    a = tool(parse_closing_seg(seg), clips, 1)
    b = tool(FunctionCallProtocol.parse_tool_call(tcall(args)), clips, 1)
    same = ("clip", "start", "end", "valid", "reason")
    assert {k: getattr(a.call, k) for k in same} == {k: getattr(b.call, k) for k in same}
    assert a.audio == b.audio and a.note == b.note
    assert (a.call.protocol, b.call.protocol) == ("seg", "function")
    assert (a.call.call_id, b.call.call_id) == (None, "call_1")
    assert type(a.call) is type(b.call)
    assert set(a.call.model_dump()) == set(b.call.model_dump())


# ---------------------------------------------------------------- hostile sizes: nothing quoted unbounded

HUGE = 10_000_000  # characters: the 10 MB tag of issue 14


@pytest.mark.parametrize(
    "body",
    [
        "1.2." * (HUGE // 4) + ", 2",  # an unparseable number
        "1, " + "9." * (HUGE // 2),
        "x" * HUGE + ": 1, 2",  # a clip id
        "1" * HUGE + ", 2",  # a parseable one (inf)
    ],
    ids=["start", "end", "clip", "inf"],
)
def test_a_10mb_tag_costs_a_short_note(body: str, clips: dict[str, AudioRef]) -> None:
    """What a hostile tag leaves in state (the pending request, the record, the note that every later prompt
    carries) stays short: the model's own text is the only full copy."""
    text = f"<think>I hear <seg>{body}</seg>"
    p = SegTagProtocol()
    msgs, [request] = p.absorb([user_msg()], gen(text, in_text=True), open_turn=False)
    assert len(json.dumps(request.model_dump())) < 500  # the graph's `pending`
    out = ListenTool()(request, clips, audios_used=1)
    assert not out.valid and out.note is not None and len(out.note) < 400
    assert len(json.dumps(out.call.model_dump())) < 800  # the graph's `listens`
    delivered = p.deliver(msgs, [out])
    assert sum(len(message_text(m)) for m in delivered) < len(text) + 500
    assert out.note.startswith("(cannot listen to ")


def test_a_quoted_value_is_cut_with_an_ellipsis(clips: dict[str, AudioRef]) -> None:
    out = ListenTool()(parse_closing_seg("<seg>" + "1.2." * 100 + ", 3</seg>"), clips, audios_used=1)
    assert out.note == f"(cannot listen to {('1.2.' * 10)[:39]}…-3 s: start and end must be numbers of seconds)"
    out = ListenTool()(parse_closing_seg("<seg>" + "c" * 100 + ": 1, 2</seg>"), clips, audios_used=1)
    assert out.call.reason == f"unknown clip '{'c' * 59}…' (loaded: clip2, main)" and out.call.clip == "c" * 59 + "…"
    # Long numbers are parsed whole, not cut: 400 nines are not finite, and 60 digits of 1 are past the end.
    assert ListenTool()(parse_closing_seg("<seg>1, " + "9" * 400 + "</seg>"), clips, 1).call.reason == (
        "start and end must be finite")  # fmt: skip
    out = ListenTool()(parse_closing_seg("<seg>" + "1" * 60 + ", " + "2" * 60 + "</seg>"), clips, 1)
    assert "past the end" in (out.call.reason or "")


def test_a_huge_tool_call_costs_a_short_note(clips: dict[str, AudioRef]) -> None:
    args = json.dumps({"start": "1.2." * 1_000_000, "end": 2, "clip": "y" * 1_000_000})
    request = FunctionCallProtocol.parse_tool_call(tcall(args))
    assert len(json.dumps(request.model_dump())) < 500
    out = ListenTool()(request, clips, audios_used=1)
    assert not out.valid and out.note is not None and len(out.note) < 400
    assert out.call.reason == f"unknown clip '{'y' * 59}…' (loaded: clip2, main)"


# ---------------------------------------------------------------- the Hermes tool-call parser

_HERMES_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)  # the grammar, as a regex


def hermes_bodies(text: str) -> list[str]:
    """The block bodies by the (quadratic) regex: the reference for `parse_tool_calls`."""
    return [m.group(1) for m in _HERMES_RE.finditer(text)]


TOOL_FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_call", "{", "}", " ", "\n", "\u00a0", '"name"', ":",
                  '"listen"', ",", '"arguments"', '{"start": 1}', "x", "<", ">"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOOL_FRAGMENTS), max_size=30).map("".join))
def test_tool_call_blocks_are_the_hermes_grammar(text: str) -> None:
    """The linear parser finds exactly the blocks the regex finds, in order, with the same calls."""
    calls = parse_tool_calls(text, first_index=3)
    expected = hermes_bodies(text)
    assert [c["id"] for c in calls] == [f"call_{3 + i}" for i in range(len(expected))]
    for call, body in zip(calls, expected, strict=True):
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            assert (call["name"], call["arguments"]) == (obj["name"], json.dumps(obj.get("arguments", {})))
        else:
            assert (call["name"], call["arguments"]) == ("listen", body[:200])


def test_tool_call_blocks() -> None:
    text = (
        'a <tool_call> {"name": "listen", "arguments": {"start": 1, "end": 2}} </tool_call> b '
        "<tool_call>{not json}</tool_call> <tool_call>no brace</tool_call> "
        '<tool_call>{"name": "x"</tool_call> tail}\n</tool_call>'
    )
    assert parse_tool_calls(text) == [
        {"id": "call_0", "name": "listen", "arguments": '{"start": 1, "end": 2}'},
        {"id": "call_1", "name": "listen", "arguments": "{not json}"},
        # The body runs to the first closing tag after a `}`: across the one that follows `"x"`.
        {"id": "call_2", "name": "listen", "arguments": '{"name": "x"</tool_call> tail}'},
    ]
    assert parse_tool_calls("<tool_call>{" + "[" * 100_000 + "}</tool_call>")[0]["arguments"].startswith("{[[[")
    assert parse_tool_calls("") == [] and parse_tool_calls("</tool_call><tool_call>{}") == []


def test_tool_call_parsing_is_linear() -> None:
    """`"<tool_call>{" * n` made the regex rescan to the end for every block (quadratic: ~40 minutes at
    n = 200,000). Four times the input must take about four times as long, not sixteen."""

    def best_of_3(n: int) -> float:
        text = "<tool_call>{" * n + '<tool_call>{"name": "listen", "arguments": {}}</tool_call>'
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            calls = parse_tool_calls(text)
            times.append(time.perf_counter() - t0)
        # One block: the first opening tag's body runs to the only closing tag (it is no JSON, so it is kept raw).
        assert len(calls) == 1 and calls[0]["arguments"].startswith("{<tool_call>{<tool_call>{")
        return min(times)

    small, large = best_of_3(50_000), best_of_3(200_000)
    assert large / small < 8, (small, large)

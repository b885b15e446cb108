"""Fuzzing the HTTP request schema of `echo-agent serve` (issue 14, acceptance): valid requests of every kind,
mutated by hypothesis (fields replaced by any JSON, deleted, retyped; bodies cut or garbled), against a real server
on loopback with the real tiny model. Every answer is a 2xx or a clear 4xx JSON error, never a 5xx, and every stream
ends with `data: [DONE]`. Bounded: a fixed number of examples, each request capped by the server's own limits.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import json_paths, write_beeps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import SLOW, ThreadServer

from echo_agent.agent import load_backend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.serve import ServeConfig, create_app

RAW = "tiny-random-qwen2-audio"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadServer, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("fuzz")
    clip = write_beeps(root / "c.wav", 2.0, [(0.5, 0.2)])
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(),
                                                    "format": "wav"}}  # fmt: skip
    url = {"type": "audio_url", "audio_url": {"url": f"file://{clip}"}}
    text = {"type": "text", "text": "How many beeps? [1 | 2]"}
    call = {"id": "call_0", "type": "function", "function": {"name": "listen", "arguments": '{"start": 0, "end": 1}'}}
    templates: list[dict[str, Any]] = [
        {"model": RAW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        {"model": RAW, "messages": [{"role": "user", "content": [audio, text]}], "max_tokens": 2, "stream": True,
         "logprobs": True, "return_token_ids": True, "seed": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5},
        {"model": RAW, "messages": [{"role": "user", "content": [url, text]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "<think>a"}]}],
         "continue_final_message": True, "add_generation_prompt": False, "stop": ["</seg>"], "max_tokens": 2,
         "include_stop_str_in_output": True, "bad_words": ["<seg>"]},
        {"model": RAW, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": None, "tool_calls": [call]},
                                    {"role": "tool", "tool_call_id": "call_0", "content": "ok"}],
         "tools": [{"type": "function", "function": {"name": "listen", "parameters": {"type": "object"}}}],
         "max_tokens": 2},
        {"model": "echo-agent", "messages": [{"role": "user", "content": [audio, text]}], "max_tokens": 2,
         "echo": {"thread_id": "fuzz", "choices": ["1", "2"]}},
        {"model": "echo-agent", "messages": [{"role": "user", "content": [audio, text]}], "max_tokens": 2,
         "stream": True, "n": 1},
    ]  # fmt: skip
    cfg = ServeConfig(
        model_name=RAW, data_dir=root / "data", allow_file_dirs=[root], max_tokens=4, max_prompt_tokens=1024,
        max_request_seconds=60, agent=AgentConfig(sampling=SamplingParams(max_new_tokens=2), max_model_calls=3),
    )  # fmt: skip
    with ThreadServer(create_app(load_backend(RAW), cfg), cfg) as s:
        yield s, templates


def _set(doc: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40)
    | st.sampled_from(["<|AUDIO|>", "<|im_end|>", "file:///etc/passwd", "data:audio/wav;base64,AAAA", "\x00",
                       "echo-agent", RAW, "user", "assistant", "tool", "audio_url", "input_audio", "text", "x" * 5000])
)  # fmt: skip
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                              kids, max_size=4),
                           max_leaves=12)  # fmt: skip


def _check(resp: httpx.Response, streamed: bool) -> None:
    assert resp.status_code < 500, resp.text[:500]
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["code"] == resp.status_code
    elif resp.headers["content-type"].startswith("text/event-stream"):
        blocks = [b for b in resp.text.split("\n\n") if b]
        assert blocks[-1] == "data: [DONE]", resp.text[-300:]
        for block in blocks[:-1]:
            event = json.loads(block.removeprefix("data: "))
            if "error" in event:
                assert event["error"]["code"] < 500, event
    else:
        assert not streamed or resp.json()  # a request the mutation made non-streaming


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow], derandomize=True)  # fmt: skip
@given(data=st.data())
def test_mutated_requests_never_get_a_5xx(
    fuzzed: tuple[ThreadServer, list[dict[str, Any]]], data: st.DataObject
) -> None:
    server, templates = fuzzed
    doc = copy.deepcopy(data.draw(st.sampled_from(templates)))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = json_paths(doc)
        path = data.draw(st.sampled_from(paths))
        delete = bool(path) and data.draw(st.booleans())
        doc = _set(doc, path, None if delete else data.draw(json_values), delete)
        if not isinstance(doc, (dict, list)):
            break
    body = json.dumps(doc).encode()
    cut = data.draw(st.sampled_from([None, None, None, "truncate", "garble"]))
    if cut == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif cut == "garble":
        i = data.draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:i] + data.draw(st.binary(min_size=1, max_size=4)) + body[i + 1 :]
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=JSON, timeout=SLOW)
    _check(r, isinstance(doc, dict) and doc.get("stream") is True)


def test_the_fuzzed_server_still_answers(fuzzed: tuple[ThreadServer, list[dict[str, Any]]]) -> None:
    server, templates = fuzzed
    for body in templates:
        if "echo" in body:  # the fuzzed requests grew thread "fuzz" (maybe past --max-prompt-tokens): a new one
            body = {**body, "echo": {**body["echo"], "thread_id": "after-fuzz"}}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=SLOW)
        assert r.status_code == 200, r.text[:300]
        _check(r, body.get("stream") is True)

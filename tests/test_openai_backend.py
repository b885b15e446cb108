"""The OpenAI backend through the official `openai` client against a real `echo-agent serve` subprocess.

The server serves a tiny Qwen2-Audio that has memorised one Echo trace (conftest's `echo_model`);
the same weights are loaded here for the local `TransformersBackend`. With greedy decoding the graph
must give the same answer, listens and reasoning over HTTP as in process, and every generate call
must see the same prompt token ids and sample the same tokens: so the server rebuilt exactly the
prompt the local backend builds, the inserted slice and the continued assistant turn included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ECHO_CHOICES, ECHO_QUESTION
from served import CLI, SLOW, Recording, ServeProcess, serve_env

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.audio import AudioStore
from echo_agent.backends.base import AudioResolver, GenerationRequest
from echo_agent.backends.openai import OpenAIBackend, OpenAIOptions, parse_spec
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import ConfigError
from echo_agent.messages import Message, audio_part, text_part
from echo_agent.prompts import format_question
from echo_agent.tools.listen import LISTEN_TOOL_SCHEMA

GREEDY = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=120, seed=0))
TOKENS = OpenAIOptions(return_token_ids=True, logprobs=True)


@pytest.fixture(scope="module")
def server(echo_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    model_dir, _ = echo_model
    home = tmp_path_factory.mktemp("serve-home")
    proc = ServeProcess(["--model", str(model_dir), "--max-new-tokens", "120"], serve_env(home))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local(echo_model: tuple[Path, Path]) -> TransformersBackend:
    return TransformersBackend.from_pretrained(echo_model[0])


def remote(server: ServeProcess, echo_model: tuple[Path, Path], options: OpenAIOptions = TOKENS) -> OpenAIBackend:
    return OpenAIBackend(str(echo_model[0]), f"{server.url}/v1", options=options)


@pytest.mark.parametrize("audio_format", ["input_audio", "audio_url"])
async def test_graph_over_http_matches_the_local_backend(
    server: ServeProcess, local: TransformersBackend, echo_model: tuple[Path, Path], audio_format: str
) -> None:
    wav = echo_model[1]
    here, there = (
        Recording(local),
        Recording(remote(server, echo_model, TOKENS.model_copy(update={"audio_format": audio_format}))),
    )
    mine = await EchoAgent(here, AudioStore(), GREEDY).ask(wav, ECHO_QUESTION, ECHO_CHOICES, gold="4")
    theirs = await EchoAgent(there, AudioStore(), GREEDY).ask(wav, ECHO_QUESTION, ECHO_CHOICES, gold="4")

    # The memorised trace ran over HTTP: one real re-listen, then the right answer.
    assert [(c.start, c.end, c.valid) for c in theirs.listens] == [(2.0, 3.0, True)]
    assert theirs.answer == "4" and theirs.verdict is not None and theirs.verdict.reward == pytest.approx(1.5)
    assert theirs.model_dump() == mine.model_dump()

    # Call by call: same prompt ids, same sampled ids, same log-probs, and the stop was reported as </seg>.
    assert len(there.gens) == len(here.gens) == 2
    for r, lo in zip(there.gens, here.gens, strict=True):
        assert r.prompt_ids == lo.prompt_ids and r.token_ids == lo.token_ids and r.text == lo.text
        assert r.logprobs == pytest.approx(lo.logprobs, abs=1e-4)
    first = there.gens[0]
    assert (first.finish_reason, first.stop_string, first.stop_string_in_text) == ("stop", "</seg>", True)
    # The second call continued the assistant turn in place (vLLM's continue_final_message).
    assert there.requests[1].continue_final and there.gens[1].finish_reason == "eos"


async def test_streamed_deltas_add_up_to_the_reasoning(server: ServeProcess, echo_model: tuple[Path, Path]) -> None:
    agent = EchoAgent(remote(server, echo_model), AudioStore(), GREEDY)
    events = [e async for e in agent.astream(echo_model[1], ECHO_QUESTION, ECHO_CHOICES)]
    text = "".join(e["delta"] for e in events if e["type"] == "text")
    result = events[-1]["result"]
    assert result["answer"] == "4"
    assert text == result["text"] and "<seg>2.0, 3.0</seg>" in text
    kinds = [e["type"] for e in events]
    assert kinds.index("listen") < kinds.index("verdict")  # the listen event came mid-stream


async def test_function_call_and_text_mode_requests_reach_the_model_unchanged(
    server: ServeProcess, local: TransformersBackend, echo_model: tuple[Path, Path]
) -> None:
    """The function-call protocol's shape (assistant tool call, tool message, user message with the slice)
    and the text mode's suppression render to the same prompt, and sample the same tokens, remotely."""
    store = AudioStore()
    ref = store.load(echo_model[1])
    audio = AudioResolver(store, {"main": ref})
    question = format_question(ECHO_QUESTION, ECHO_CHOICES, {"main": ref.duration}, "main")
    call = {"id": "call_0", "name": "listen", "arguments": '{"start": 2.0, "end": 3.0}'}
    tool_turns: list[Message] = [
        {"role": "user", "content": [audio_part("main"), text_part(question)]},
        {"role": "assistant", "content": [text_part(f"<tool_call>{json.dumps(call)}</tool_call>", "model")],
         "tool_calls": [call]},  # type: ignore[list-item]
        {"role": "tool", "content": [text_part("ok: listening to clip 'main' from 2.00 s to 3.00 s", "runtime")],
         "tool_call_id": "call_0"},
        {"role": "user", "content": [text_part("Audio of clip 'main' from 2.00 s to 3.00 s:\n"),
                                     audio_part("main", 2.0, 3.0)]},
    ]  # fmt: skip
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    requests = [
        GenerationRequest(messages=tool_turns, tools=[LISTEN_TOOL_SCHEMA], sampling=sampling),
        GenerationRequest(messages=tool_turns[:1], suppress=["<seg>"], sampling=sampling),
    ]
    backend = remote(server, echo_model)
    for req in requests:
        here, there = await local.generate(req, audio), await backend.generate(req, audio)
        assert there.prompt_ids == here.prompt_ids and there.token_ids == here.token_ids
        assert there.text == here.text and there.finish_reason == here.finish_reason


def test_the_official_client_sees_an_openai_server(server: ServeProcess, echo_model: tuple[Path, Path]) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} == {str(echo_model[0]), "echo-agent"}
    clip = base64.b64encode(echo_model[1].read_bytes()).decode()
    question = format_question(ECHO_QUESTION, ECHO_CHOICES, {"main": 6.0}, "main")
    part = {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}
    messages: Any = [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
    raw = str(echo_model[0])
    # The raw model honours `stop` and reports which stop string ended it, as vLLM does.
    plain = client.chat.completions.create(model=raw, messages=messages, temperature=0, max_tokens=60, stop=["</seg>"])
    choice = plain.choices[0]
    assert choice.message.content == "<think>Two beeps sit close together near <seg>2.0, 3.0"
    assert (
        choice.finish_reason == "stop"
        and choice.model_extra is not None
        and choice.model_extra["stop_reason"] == "</seg>"
    )
    # Streaming gives the same text, with the stop string cut out of the deltas too.
    stream = client.chat.completions.create(
        model=raw, messages=messages, temperature=0, max_tokens=60, stop=["</seg>"], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The agent: the final answer as content, the rest in `echo`.
    answer = client.chat.completions.create(
        model="echo-agent", messages=[{"role": "user", "content": [part, {"type": "text", "text": ECHO_QUESTION}]}],
        temperature=0, extra_body={"echo": {"choices": ECHO_CHOICES}},
    )  # fmt: skip
    msg = answer.choices[0].message
    assert msg.content == "4"
    echo = (msg.model_extra or {})["echo"]
    assert [(c["start"], c["end"]) for c in echo["listens"]] == [(2.0, 3.0)] and echo["status"] == "answered"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_cli_ask_through_a_server(server: ServeProcess, echo_model: tuple[Path, Path], tmp_path: Path) -> None:
    spec = f"openai:{echo_model[0]}@{server.url}/v1"
    args = ["ask", str(echo_model[1]), ECHO_QUESTION, *[a for c in ECHO_CHOICES for a in ("--choice", c)]]
    out = subprocess.run(
        [*CLI, *args, "--model", spec, "--max-new-tokens", "120", "--json"],
        capture_output=True, text=True, env=serve_env(tmp_path), timeout=SLOW, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["answer"] == "4" and [c["start"] for c in result["listens"]] == [2.0]
    # A server that is not there: a one-line error, no traceback.
    bad = subprocess.run(
        [*CLI, *args, "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--max-new-tokens", "4"],
        capture_output=True, text=True, env=serve_env(tmp_path), timeout=SLOW, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: http://127.0.0.1:9/v1"), bad.stderr
    assert "connection failed" in bad.stderr and "Traceback" not in bad.stderr


def test_model_spec_and_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_spec("openai:Qwen/Qwen2-Audio-7B-Instruct@http://gpu:8000/v1/") == (
        "Qwen/Qwen2-Audio-7B-Instruct", "http://gpu:8000/v1")  # fmt: skip
    assert parse_spec("openai:a@b@https://h/v1") == ("a@b", "https://h/v1")
    assert parse_spec("m", "http://h:1/v1") == ("m", "http://h:1/v1")
    with pytest.raises(ConfigError, match="no server"):
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        parse_spec("openai:m")
    monkeypatch.setenv("MY_KEY", "sk-123")
    backend = load_backend("openai:m@http://127.0.0.1:9/v1", api_key_env="MY_KEY")
    assert isinstance(backend, OpenAIBackend) and backend.client.api_key == "sk-123"
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        load_backend("openai:m@http://127.0.0.1:9/v1", api_key_env="NOPE_KEY")
    monkeypatch.setenv("ECHO_API_KEY", "sk-echo")
    backend = load_backend("openai:m@http://127.0.0.1:9/v1")
    assert isinstance(backend, OpenAIBackend) and backend.client.api_key == "sk-echo"
    asyncio.run(backend.aclose())


@pytest.mark.parametrize("tail", [" ", None])
def test_a_continued_turn_ending_in_a_slice_keeps_it_under_transformers_templates(
    echo_model: tuple[Path, Path], tail: str | None
) -> None:
    """vLLM renders chat requests with transformers' `apply_chat_template`, whose `continue_final_message`
    cuts the prompt after the final message's last *text* block. Rendered with the real Qwen2-Audio
    template, the seg protocol's continued turn keeps its inserted slice only with the `audio_tail`."""
    store = AudioStore()
    ref = store.load(echo_model[1])
    backend = OpenAIBackend("m", "http://127.0.0.1:9/v1", options=OpenAIOptions(audio_tail=tail))
    messages: list[Message] = [
        {"role": "user", "content": [audio_part("main"), text_part("How many beeps?")]},
        {"role": "assistant", "content": [text_part("<think>near <seg>2.0, 3.0</seg>", "model"),
                                          audio_part("main", 2.0, 3.0)]},
    ]  # fmt: skip
    request = GenerationRequest(messages=messages, continue_final=True, stop=["</seg>"])
    wire = backend.build_kwargs(request, AudioResolver(store, {"main": ref}), stream=False)
    assert wire["extra_body"]["continue_final_message"] is True and wire["extra_body"]["add_generation_prompt"] is False
    # As vLLM hands OpenAI content parts to the template: each audio part becomes {"type": "audio"}.
    hf = [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "audio"} for p in m["content"]]}
          for m in wire["messages"]]  # fmt: skip
    processor = TransformersBackend.from_pretrained(echo_model[0]).processor
    rendered = processor.apply_chat_template(hf, tokenize=False, continue_final_message=True)
    assert rendered.count("<|AUDIO|>") == (2 if tail else 1)
    assert rendered.rstrip().endswith("<|audio_eos|>") == bool(tail)


def test_shipped_echo_tiny_over_http_matches_in_process(tmp_path: Path) -> None:
    """`echo-agent serve --model echo-tiny` (the shipped weights): the graph through the OpenAI backend
    answers the README's bundled example exactly as the local echo-tiny does, token for token."""
    root = Path(__file__).resolve().parents[1]
    item = json.loads((root / "examples" / "puzzles" / "example.json").read_text())[0]
    wav = root / "examples" / "puzzles" / item["audio_id"]
    proc = ServeProcess(["--model", "echo-tiny", "--max-new-tokens", "120"], serve_env(tmp_path / "home"))
    try:
        here = Recording(load_backend("echo-tiny"))
        there = Recording(OpenAIBackend("echo-tiny", f"{proc.url}/v1", options=TOKENS))

        async def both() -> tuple[Any, Any]:
            mine = await EchoAgent(here, AudioStore(), GREEDY).ask(wav, item["question"], item["choices"])
            theirs = await EchoAgent(there, AudioStore(), GREEDY).ask(wav, item["question"], item["choices"])
            return mine, theirs

        mine, theirs = asyncio.run(both())
    finally:
        proc.stop()
    assert theirs.choice == item["answer"] and any(c.valid for c in theirs.listens)
    assert theirs.model_dump() == mine.model_dump()
    assert [g.token_ids for g in there.gens] == [g.token_ids for g in here.gens]

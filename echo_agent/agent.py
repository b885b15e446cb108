"""The library entry point: an `EchoAgent` runs the Echo graph on clips and returns a `Result`.

    agent = EchoAgent(load_backend())
    result = await agent.ask("clip.wav", "How many beeps are there?", choices=["2", "3", "4"])

Streaming (`astream`) yields the graph's events as dicts: `{"type": "text", "delta"}`,
`{"type": "listen", "call"}`, `{"type": "retry", "reason"}`, `{"type": "verdict", "verdict"}`, and a
final `{"type": "result", "result"}`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from pydantic import BaseModel, Field

from .audio import AudioRef, AudioStore
from .backends.base import ModelBackend
from .config import AgentConfig, SamplingParams
from .errors import ConfigError
from .graphs import EchoInput, build_echo_graph, new_question
from .graphs.echo import EchoGraph
from .graphs.state import EchoContext
from .tools.listen import ListenCall
from .verifier import Verdict

if TYPE_CHECKING:  # imported lazily at run time: the OpenAI client is only needed for remote models
    from .backends.openai import OpenAIOptions
    from .backends.placement import DTypeName

AudioInput = str | os.PathLike[str] | AudioRef
DEFAULT_MODEL = "echo-tiny"
OPENAI_PREFIX = "openai:"
TINY_MODELS = ("tiny-random-qwen2-audio", "tiny-random-qwen2.5-omni")
# The shipped echo-tiny weights (package data), loadable by name.
ECHO_TINY_DIR = Path(__file__).parent / "assets" / "echo-tiny"


class Result(BaseModel):
    """One answered question. This is the documented `--json` schema of `echo-agent ask`."""

    answer: str | None = Field(description="text inside <answer>...</answer>, or null")
    choice: str | None = Field(description="the choice the answer selects (MMAU matcher), or null")
    listens: list[ListenCall] = Field(description="every listen call, valid or not, in order")
    verdict: Verdict | None = Field(description="the verifier's verdict with its reward terms")
    text: str = Field(description="the final attempt's reasoning text, audio removed")
    status: Literal["running", "retry", "answered", "no_answer"]
    generated_tokens: int = Field(0, description="tokens the model sampled for this question, retries included")

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Result:
        verdict = state.get("verdict")
        return cls(
            answer=state.get("answer"),
            choice=state.get("choice"),
            listens=[ListenCall.model_validate(c) for c in state.get("listens", [])],
            verdict=Verdict.model_validate(verdict) if verdict else None,
            text=state.get("reasoning", ""),
            status=state.get("status", "no_answer"),
            generated_tokens=state.get("generated_tokens", 0),
        )


def load_backend(
    model: str | None = None, *, base_url: str | None = None, api_key_env: str | None = None,
    openai_options: OpenAIOptions | None = None, device: str = "auto", dtype: DTypeName = "auto",
    attn_implementation: str | None = None,
) -> ModelBackend:  # fmt: skip
    """A backend by name (default `echo-tiny`, the shipped model): `echo-tiny`, a tiny random built-in model
    (`tiny-random-qwen2-audio`, `tiny-random-qwen2.5-omni`, for tests), a local transformers model directory, or a model
    behind an OpenAI-compatible server, written `openai:MODEL@http://HOST:PORT/v1` (or `openai:MODEL`
    with `base_url`). The server's API key comes from the variable `api_key_env` names, else
    $ECHO_API_KEY, else $OPENAI_API_KEY.

    A local model goes on `device` ("auto": the GPU when there is one, spread over all of them when there are
    several; "cpu"; "cuda"; "cuda:N") in `dtype` ("auto": bfloat16 on a GPU that supports it, else float16 there,
    float32 on the CPU); asking for CUDA where there is none is a `ConfigError`."""
    name = model or DEFAULT_MODEL
    if name.startswith(OPENAI_PREFIX) or base_url is not None:
        from .backends.openai import OpenAIBackend, api_key_from_env, parse_spec

        remote, url = parse_spec(name, base_url)
        return OpenAIBackend(remote, url, api_key=api_key_from_env(api_key_env), options=openai_options)
    path = ECHO_TINY_DIR if name == "echo-tiny" else Path(name)
    if name not in TINY_MODELS and not path.exists():  # fail before the slow transformers import
        raise ConfigError(f"unknown model {name!r}: not a directory, and not one of {', '.join(TINY_MODELS)}")

    from .backends.placement import placement
    from .backends.transformers import TransformersBackend

    where, torch_dtype, device_map = placement(device, dtype)
    if name in TINY_MODELS:
        from .tiny_models import build_tiny_qwen2_5_omni_thinker, build_tiny_qwen2_audio

        tiny: Any
        processor: Any
        if name == "tiny-random-qwen2-audio":
            tiny, processor = build_tiny_qwen2_audio(seed=0)
        else:
            tiny, processor = build_tiny_qwen2_5_omni_thinker(seed=0)
        return TransformersBackend(tiny.to(device=where, dtype=torch_dtype), processor, name=name)
    return TransformersBackend.from_pretrained(
        path, name=name if name == "echo-tiny" else None, device=where, dtype=torch_dtype,
        attn_implementation=attn_implementation, device_map=device_map,
    )  # fmt: skip


class EchoAgent:
    def __init__(
        self,
        backend: ModelBackend,
        store: AudioStore | None = None,
        config: AgentConfig | None = None,
        *,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
    ) -> None:
        self.backend = backend
        self.store = store or AudioStore()
        self.config = config or AgentConfig()
        self.graph: EchoGraph = build_echo_graph(backend, self.store, self.config, checkpointer=checkpointer)

    def load(self, audio: AudioInput) -> AudioRef:
        return audio if isinstance(audio, AudioRef) else self.store.load(audio)

    def _input(
        self, audio: AudioInput | Mapping[str, AudioInput] | None, question: str, choices: list[str] | None,
        gold: str | None,
    ) -> EchoInput:  # fmt: skip
        clips: dict[str, dict[str, Any]] = {}
        if isinstance(audio, Mapping):
            clips = {cid: self.load(a).model_dump() for cid, a in audio.items()}
        elif audio is not None:
            clips = {"main": self.load(audio).model_dump()}
        return new_question(question, clips, choices, gold)

    @staticmethod
    def _config(thread_id: str | None) -> RunnableConfig:
        return {"configurable": {"thread_id": thread_id}} if thread_id else {}

    @staticmethod
    def _context(sampling: SamplingParams | None) -> EchoContext:
        return EchoContext(sampling=sampling)

    async def ask(
        self,
        audio: AudioInput | Mapping[str, AudioInput] | None,
        question: str,
        choices: list[str] | None = None,
        *,
        gold: str | None = None,
        thread_id: str | None = None,
        sampling: SamplingParams | None = None,
    ) -> Result:
        """Answer one question. `sampling` overrides the config's for this run only (one graph serves all)."""
        state = await self.graph.ainvoke(
            self._input(audio, question, choices, gold), self._config(thread_id), context=self._context(sampling)
        )
        return Result.from_state(state)

    async def astream(
        self,
        audio: AudioInput | Mapping[str, AudioInput] | None,
        question: str,
        choices: list[str] | None = None,
        *,
        gold: str | None = None,
        thread_id: str | None = None,
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        final: dict[str, Any] = {}
        async for mode, chunk in self.graph.astream(
            self._input(audio, question, choices, gold),
            self._config(thread_id),
            context=self._context(sampling),
            stream_mode=["custom", "values"],
        ):
            if mode == "custom":
                yield cast(dict[str, Any], chunk)
            else:
                final = cast(dict[str, Any], chunk)
        yield {"type": "result", "result": Result.from_state(final).model_dump()}

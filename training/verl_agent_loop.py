"""The Echo graph as a verl agent loop: verl's Ray trainer rolls out through OUR graph (issue 17, docs/verl.md).

verl calls `await loop.run(sampling_params, **row)` once per sample, inside its agent-loop workers, with
`self.server_manager` (verl's `LLMServerClient` over its vLLM or SGLang replicas) as the rollout server. The loop
here builds a `TokenServerBackend` over that server, compiles `build_echo_graph` over it, runs the question of the
row, and returns verl's `AgentLoopOutput`:

- `prompt_ids`, `response_ids`, `response_mask`, `response_logprobs`: the backend's append-only token trajectory
  (expanded audio placeholders; mask 1 exactly on the ids the server sampled, 0 on inserted slices and notes);
- `multi_modal_data={"audios": [...]}`: every audio input in placeholder order (the clip, then each slice) as
  float32 waveforms at the processor's rate; verl's worker re-extracts their features for the training forward;
- `mm_processor_kwargs`: bounds that feature extraction (`feature_kwargs`), else the Qwen2.5-Omni processor pads
  every clip to 300 s (a (n, 128, 30000) tensor, ~15 MB a clip) on its way to the trainer;
- `reward_score`: the verdict of the graph's verifier node (design §5), so verl skips its own reward loop and puts
  the score on the last response token; `reward_extra_info` carries the terms (logged per step);
- `num_turns`: the question, every model call, every inserted slice or note and every retry nudge.

verl is imported lazily: this module imports without verl (for typing, docs and the verl-free tests of
`EchoRollout`), and `EchoAgentLoop` (the `AgentLoopBase` subclass that `configs/verl/echo_agent_loop.yaml` names)
is built on first access. The worker-side patches verl needs for these models are in `verl_patches.py`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..audio import AudioStore
from ..backends.base import AudioResolver
from ..backends.token_server import TokenServer, TokenServerBackend, TokenTrajectory
from ..backends.transformers import PromptEncoder
from ..config import AgentConfig, AudioMode, ListenLimits, RewardName, SamplingParams, reward_weights
from ..errors import DataError, EchoError
from ..graphs.echo import build_echo_graph
from ..graphs.runner import STATE_KEYS
from ..graphs.state import EchoContext, new_question
from ..verifier import Verdict

__all__ = [
    "AGENT_NAME",
    "EchoRollout",
    "LoopResult",
    "LoopSettings",
    "eos_token_ids",
    "feature_kwargs",
    "loop_sampling",
]

AGENT_NAME = "echo_agent"
"""The `agent_name` of our parquet rows and of the YAML entry that registers the loop."""
QWEN2_AUDIO_SECONDS = 30  # the Qwen2-Audio encoder takes exactly 30 s of mel frames


class LoopSettings(BaseModel):
    """The loop's settings: the keys of its entry in `configs/verl/echo_agent_loop.yaml` (defaults: the paper's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: AudioMode = "interleaved"
    max_model_calls: int = Field(8, ge=1, description="generate calls per question (Echo: 8 turns)")
    max_retries: int = Field(1, ge=0, description="verifier retries for a missing or malformed answer")
    max_audios: int = Field(8, ge=1, description="audio inputs per question, the clip included")
    max_new_tokens: int = Field(2048, ge=1, description="tokens per generate call (Echo: max_tokens 2048)")
    reward: RewardName = "paper"
    seed: int | None = Field(None, description="per-call sampling seeds (seed + call index); None: the engine's")

    def agent_config(self) -> AgentConfig:
        return AgentConfig(
            listen=ListenLimits(max_audios=self.max_audios),
            max_model_calls=self.max_model_calls,
            max_retries=self.max_retries,
            mode=self.mode,
            reward=reward_weights(self.reward),
            protocol="seg",
        )


def loop_sampling(sampling_params: Mapping[str, Any], settings: LoopSettings) -> SamplingParams:
    """verl's per-batch sampling (temperature, top_p, top_k; greedy for validation) as our per-run sampling."""
    top_k = int(sampling_params.get("top_k", -1) or -1)
    return SamplingParams(
        temperature=float(sampling_params.get("temperature", 1.0)),
        top_p=float(sampling_params.get("top_p", 1.0)),
        top_k=top_k if top_k > 0 else 0,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )


def eos_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end an assistant turn: the tokenizer's eos and the Qwen chat tokens `<|im_end|>` and
    `<|endoftext|>` (the hub generation configs of Qwen2-Audio-7B-Instruct and Qwen2.5-Omni-7B list both)."""
    ids = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return frozenset(ids)


def feature_kwargs(family: str, sample_rate: int, lengths: list[int], feature_extractor: Any) -> dict[str, Any]:
    """`mm_processor_kwargs` for verl's re-extraction of the audio features, so they equal the rollout's.

    Qwen2-Audio: the encoder takes exactly 30 s of frames, the processor's default padding; only the rate is set.
    Qwen2.5-Omni: the hub extractor pads every clip to 300 s. Padding to the longest clip plus one FFT window
    (rounded up to a hop) gives bit-identical features on the valid frames; padding to exactly the longest clip
    does not (the centred STFT reflects the clip's own tail, and a length that is not a multiple of the hop loses
    a frame)."""
    if family == "qwen2_audio" or not lengths:
        return {"sampling_rate": sample_rate}
    hop = int(getattr(feature_extractor, "hop_length", 160))
    n_fft = int(getattr(feature_extractor, "n_fft", 400))
    bound = -(-(max(lengths) + n_fft) // hop) * hop
    cap = int(getattr(feature_extractor, "n_samples", bound))
    return {"sampling_rate": sample_rate, "audio_kwargs": {"max_length": min(bound, cap)}}


@dataclass
class LoopResult:
    """One finished run: `AgentLoopOutput`'s fields, plus the run's state and trajectory for inspection."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float]
    audios: list[np.ndarray]
    mm_processor_kwargs: dict[str, Any]
    reward_score: float
    num_turns: int
    reward_extra_info: dict[str, float]
    state: dict[str, Any] = field(repr=False)
    trajectory: TokenTrajectory = field(repr=False)

    def output_fields(self) -> dict[str, Any]:
        """Keyword arguments for verl's `AgentLoopOutput` (all but `metrics`)."""
        return {
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "response_mask": self.response_mask,
            "response_logprobs": self.response_logprobs,
            "multi_modal_data": {"audios": self.audios},
            "mm_processor_kwargs": self.mm_processor_kwargs,
            "reward_score": self.reward_score,
            "num_turns": self.num_turns,
            "extra_fields": {"reward_extra_info": self.reward_extra_info},
        }


@functools.cache
def _shared_store() -> AudioStore:
    return AudioStore()  # one decode cache per worker process: the n samples of a question share the clip


_encoders: dict[int, PromptEncoder] = {}


def _encoder(processor: Any) -> PromptEncoder:
    # One per processor (verl keeps one per worker), so the n samples of a question share cached clip features.
    enc = _encoders.get(id(processor))
    if enc is None or enc.processor is not processor:
        enc = _encoders[id(processor)] = PromptEncoder(processor)
    return enc


class EchoRollout:
    """The loop without verl: one graph run for one parquet row, over any `TokenServer`."""

    def __init__(
        self,
        server: TokenServer,
        processor: Any,
        *,
        settings: LoopSettings | None = None,
        prompt_length: int,
        response_length: int,
        store: AudioStore | None = None,
        check_reencode: bool = False,
    ) -> None:
        self.server = server
        self.encoder = _encoder(processor)
        self.settings = settings or LoopSettings()
        self.config = self.settings.agent_config()
        self.prompt_length = prompt_length
        self.response_length = response_length
        self.store = store or _shared_store()
        self.eos = eos_token_ids(self.encoder.tokenizer)
        self.check_reencode = check_reencode

    async def run(
        self, row: Mapping[str, Any], sampling_params: Mapping[str, Any], request_id: str | None = None
    ) -> LoopResult:
        """`row` is the parquet row's `extra_info` (clip, question, choices, answer; see verl_data.py)."""
        try:
            clip, question = str(row["clip"]), str(row["question"])
        except KeyError as err:
            raise DataError(
                f"the row's extra_info has no {err}: export the data with echo_agent.training.verl_data"
            ) from None
        ref = await asyncio.to_thread(self.store.load, clip)
        if row.get("sha256") and ref.sha256 != row["sha256"]:
            raise DataError(f"{clip} changed since the data was exported (sha256 differs)")
        backend = TokenServerBackend(
            self.server, self.encoder, eos_token_ids=self.eos, name="verl", request_id=request_id or uuid.uuid4().hex,
            max_response_tokens=self.response_length, check_reencode=self.check_reencode,
        )  # fmt: skip
        graph = build_echo_graph(backend, self.store, self.config)
        inputs = new_question(question, {"main": ref.model_dump()}, list(row.get("choices") or []), row.get("answer"))
        context = EchoContext(sampling=loop_sampling(sampling_params, self.settings))
        state = dict(await graph.ainvoke(inputs, context=context, output_keys=STATE_KEYS))
        traj = backend.trajectory
        if traj is None:
            raise EchoError("the graph made no model call")
        if len(traj.prompt_ids) > self.prompt_length:
            # Audio placeholders cannot be cut (features and tokens must stay aligned), so this is a config error.
            raise DataError(
                f"the prompt of {clip} is {len(traj.prompt_ids)} tokens, over rollout.prompt_length="
                f"{self.prompt_length}: raise data.max_prompt_length or use shorter clips"
            )
        resolver = AudioResolver(self.store, {"main": ref})
        sr = self.encoder.sample_rate
        audios = [np.array(resolver.samples(p, sr), dtype=np.float32) for p in traj.audio]
        verdict = Verdict.model_validate(state["verdict"])
        terms = verdict.terms
        extra = {
            "acc": float(bool(verdict.correct)), "format": terms.format, "accuracy": terms.accuracy,
            "segment": terms.segment, "consistency": terms.consistency, "listens": float(verdict.listens),
            "truncated": float(traj.truncated),
        }  # fmt: skip
        return LoopResult(
            prompt_ids=traj.prompt_ids,
            response_ids=traj.response_ids,
            response_mask=traj.response_mask,
            response_logprobs=traj.response_logprobs,
            audios=audios,
            mm_processor_kwargs=feature_kwargs(
                self.encoder.family, sr, [len(a) for a in audios], self.encoder.processor.feature_extractor
            ),
            reward_score=float(verdict.reward),
            num_turns=1 + state["model_calls"] + len(state["listens"]) + state["retries"],
            reward_extra_info=extra,
            state=state,
            trajectory=traj,
        )


# ------------------------------------------------------------------------------- the verl subclass (lazy)


@functools.cache
def _agent_loop_class() -> type:
    verl_loop = importlib.import_module("verl.experimental.agent_loop.agent_loop")

    class EchoAgentLoop(verl_loop.AgentLoopBase):  # type: ignore[misc, name-defined]
        """verl's `AgentLoopBase` running the Echo graph; its YAML entry's extra keys are `LoopSettings`."""

        def __init__(self, trainer_config: Any, server_manager: Any, tokenizer: Any, processor: Any, **kwargs: Any):
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in LoopSettings.model_fields}
            kwargs.pop("name", None)  # the YAML entry's own name reaches the constructor too
            super().__init__(trainer_config, server_manager, tokenizer, processor, **kwargs)
            if processor is None:
                raise RuntimeError(
                    "verl built no processor for this model: start Ray with the worker setup hook "
                    "echo_agent.training.verl_patches.install (docs/verl.md)"
                )
            self.echo = EchoRollout(
                server_manager, processor, settings=LoopSettings.model_validate(own),
                prompt_length=int(self.rollout_config.prompt_length),
                response_length=int(self.rollout_config.response_length),
            )  # fmt: skip

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
            result = await self.echo.run(kwargs.get("extra_info") or {}, sampling_params)
            metrics = verl_loop.AgentLoopMetrics(generate_sequences=result.trajectory.server_seconds)
            return verl_loop.AgentLoopOutput(**result.output_fields(), metrics=metrics)

    EchoAgentLoop.__module__ = __name__
    EchoAgentLoop.__qualname__ = "EchoAgentLoop"
    return EchoAgentLoop


def __getattr__(name: str) -> Any:
    # `EchoAgentLoop` needs verl; build it on first use (Hydra's `_target_` lookup is an attribute access).
    if name == "EchoAgentLoop":
        return _agent_loop_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

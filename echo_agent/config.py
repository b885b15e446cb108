"""Explicit configuration objects. Every limit the runtime enforces lives here, with its default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .verifier import RewardWeights

AudioMode = Literal["interleaved", "grounded", "text"]
"""The paper's Table 3 settings, named alike in the graph, SFT, GRPO, eval and the CLI:
interleaved = re-listened audio is inserted; grounded = `<seg>` tags stay in the text but nothing is inserted
(generation runs on past them; SFT's stage-1 cold start); text = no `<seg>` tags (the backend suppresses them)."""
AUDIO_MODES: tuple[AudioMode, ...] = ("interleaved", "grounded", "text")
ProtocolName = Literal["seg", "function"]
RewardName = Literal["paper", "deepeyes"]


def reward_weights(name: RewardName) -> RewardWeights:
    """The named reward weighting: the paper's (Echo) or DeepEyes'."""
    return RewardWeights.deepeyes() if name == "deepeyes" else RewardWeights.paper()


class ListenLimits(BaseModel):
    """Limits on re-listening (design §2). Defaults follow the Echo paper's released code."""

    model_config = ConfigDict(frozen=True)

    max_audios: int = Field(default=8, ge=1, description="audio inputs per question: the clip plus 7 re-listens")
    min_slice: float = Field(default=0.2, gt=0, description="shortest slice in seconds")
    max_slice: float = Field(default=30.0, gt=0, description="longest slice in seconds (Qwen2-Audio encoder cap)")


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seeds are signed 64-bit: torch's generators and JSON APIs take no more


class SamplingParams(BaseModel):
    """Sampling settings for one generate call. temperature == 0 means greedy."""

    model_config = ConfigDict(frozen=True)

    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(default=512, ge=1, description="per generate call, as in the paper (per turn)")
    seed: int | None = Field(
        default=None, ge=SEED_MIN, le=SEED_MAX, description="a signed 64-bit integer (what torch and servers take)"
    )


class AgentConfig(BaseModel):
    """Caps of the agent graph. The graph enforces them itself: LangGraph's recursion limit is ~10k."""

    model_config = ConfigDict(frozen=True)

    listen: ListenLimits = ListenLimits()
    sampling: SamplingParams = SamplingParams()
    max_model_calls: int = Field(default=12, ge=1, description="generate calls per question, retries included")
    max_retries: int = Field(default=1, ge=0, description="verifier -> model retries for a missing/malformed answer")
    protocol: ProtocolName = Field(default="seg", description="seg tags or function calls")
    mode: AudioMode = Field(default="interleaved", description="see `AudioMode`")
    # The verifier node computes the reward once with these weights: the verdict in state, in `Result`, in
    # every `Trajectory` and in the GRPO loss is one number.
    reward: RewardWeights = Field(default_factory=RewardWeights.paper, description="reward weights (design §5)")

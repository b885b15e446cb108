"""The Echo graph's state schema. It holds audio *references* (content hash, path, rate, length),
never samples or base64, so checkpoints stay small whatever the clip length (design §4)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict

from ..config import SamplingParams
from ..messages import Message

Status = Literal["running", "retry", "answered", "no_answer"]


def merge_clips(
    old: dict[str, dict[str, Any]] | None, new: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Clips accumulate over a chat session: a new question may add a clip without resending the rest."""
    return {**(old or {}), **(new or {})}


class EchoInput(TypedDict):
    """What a caller (or a parent graph) provides for one question."""

    clips: Annotated[dict[str, dict[str, Any]], merge_clips]  # clip id -> AudioRef.model_dump()
    question: str
    choices: NotRequired[list[str]]
    gold: NotRequired[str | None]  # known answer, for scoring (eval, RL); never shown to the model
    # How an open answer (no choices) is matched to `gold` (`echo_agent.matching`): number | word | time |
    # duration | span; None: inferred from the gold. Never shown to the model.
    answer_kind: NotRequired[str | None]
    # Which clip plain <seg> tags refer to. None: the clip the question is about, the first clip unless the
    # question names another by its id (`steps.question_clip`).
    active_clip: NotRequired[str | None]


class EchoOutput(TypedDict):
    """What one question produces. Keys are distinct from a typical parent's `messages`."""

    answer: str | None
    choice: str | None
    verdict: dict[str, Any] | None  # Verdict.model_dump()
    listens: list[dict[str, Any]]  # ListenCall.model_dump() for every call, valid or not
    reasoning: str  # the final attempt's response text, audio removed
    status: Status
    generated_tokens: int  # tokens the model sampled for this question, retries included


class EchoState(EchoInput, EchoOutput):
    """Full internal state. `conversation` persists across questions of a chat thread."""

    conversation: list[Message]
    introduced: list[str]  # clip ids whose full audio is already in the conversation
    open_turn: bool  # the last assistant message is partial and will be continued in place
    pending: list[dict[str, Any]]  # ListenRequest.model_dump() awaiting the listen node
    audios_used: int  # audio inputs in this question's context, the clip included
    model_calls: int
    retries: int
    attempt_start: int  # index in `conversation` where the current attempt's output starts
    question_start: int  # index in `conversation` of this question's first response message


class EchoContext(BaseModel):
    """Run-time settings of one graph run, passed at invocation (`graph.ainvoke(inputs, context=EchoContext(...))`),
    so one compiled graph serves GRPO, collect, eval and the server. Not checkpointed."""

    model_config = ConfigDict(frozen=True)

    # None: the agent config's. Model call i of a question samples with `sampling.seed + i`, so a run seeded per
    # (item, sample) samples the same trajectory on every rerun.
    sampling: SamplingParams | None = None


def new_question(
    question: str,
    clips: dict[str, dict[str, Any]] | None = None,
    choices: list[str] | None = None,
    gold: str | None = None,
    active_clip: str | None = None,
    answer_kind: str | None = None,
) -> EchoInput:
    """Build a graph input. `clips` may be omitted in a chat thread that already has them."""
    # Every per-question key is always set: in a chat thread, absent keys would keep the last question's values.
    return {
        "clips": clips or {},
        "question": question,
        "choices": list(choices or []),
        "gold": gold,
        "active_clip": active_clip,
        "answer_kind": answer_kind,
    }

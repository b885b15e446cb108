"""The `Trajectory`: the one record between rollout and trainer (design §6), shaped like verl's `AgentLoopOutput`.

One record per finished run of the graph, written by `collect` and consumed by GRPO as it is:

- `prompt_ids`: the exact input of the first model call (the question turn up to `<|im_start|>assistant\\n`);
- `response_ids`: everything after it, as the final model call saw it plus what it sampled: sampled tokens
  (exactly the sampled ids, never re-tokenised), inserted audio placeholders, notes and runtime text;
- `response_mask`: 1 on sampled tokens, 0 on inserted audio, notes and runtime text;
- `response_logprobs`: the sampling policy's log-prob of each sampled token (0.0 where the mask is 0);
- `audio_spans`: every audio input in placeholder order (clip hash, path, start/end; None/None = whole clip);
- `reward` and `reward_terms`: the graph's verifier node's verdict, computed once with the agent config's weights.

`model_inputs` rebuilds the model's exact inputs (ids, masks, audio features) from records with the same
`PromptEncoder` the backend used, and `sequence_logprobs` recomputes log-probs (and entropy) on them: the
collection checks and the GRPO loss use these two functions.

With a verifier retry the response holds the first attempt as context with mask 0: the retry call saw that
attempt re-rendered by the chat template, not as its sampled ids, so those tokens carry no sampling log-prob
in this sequence. The tokens of the final attempt, the one the reward judges, are all exact and masked 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, GenerationRequest
from ..backends.transformers import EncodedAudio, PromptEncoder
from ..errors import EchoError
from ..graphs.runner import RunOutcome
from ..messages import Message, audio_part
from ..tools.listen import ListenCall
from ..verifier import RewardTerms, Verdict

__all__ = ["AudioSpan", "Trajectory", "model_inputs", "sequence_logprobs", "to_trajectory", "token_data"]


class AudioSpan(BaseModel):
    """One audio input of a trajectory, by reference: enough to cut and encode the same samples again."""

    model_config = ConfigDict(frozen=True)

    clip: str
    sha256: str = Field(description="content hash of the clip's file; a changed file is refused")
    path: str = Field(description="the clip's file (absolute, as loaded)")
    start: float | None = Field(description="seconds; None with end None = the whole clip")
    end: float | None


class Trajectory(BaseModel):
    """One finished run of the graph: the record between rollout and trainer (design §6)."""

    id: str = Field(description="'<item id>#<sample>'")
    item_id: str
    sample: int
    seed: int = Field(description="the run's sampling seed; model call i samples with seed + i")
    model: str
    backend: str
    mode: str
    temperature: float
    config_hash: str = Field(description="hash of everything that shapes a run: agent config, model, seed")
    data: str = Field(description="the data file")
    question: str
    choices: list[str]
    gold: str | None
    status: Literal["answered", "no_answer", "error"]
    error: str | None = None
    answer: str | None = None
    choice: str | None = None
    correct: bool | None = None
    reward: float = 0.0
    reward_terms: RewardTerms | None = None
    verdict: Verdict | None = None
    listens: list[ListenCall] = Field(default_factory=list)
    clips: dict[str, AudioRef] = Field(default_factory=dict)
    messages: list[Message] = Field(
        default_factory=list, description="the conversation; text parts without their token ids (see response_ids)"
    )
    prompt_ids: list[int] = Field(default_factory=list)
    response_ids: list[int] = Field(default_factory=list)
    response_mask: list[int] = Field(default_factory=list, description="1 on sampled tokens, else 0")
    response_logprobs: list[float] = Field(default_factory=list, description="0.0 where response_mask is 0")
    audio_spans: list[AudioSpan] = Field(default_factory=list, description="audio inputs in placeholder order")
    model_calls: int = 0
    retries: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0

    @property
    def valid_listens(self) -> int:
        return sum(1 for c in self.listens if c.valid)


# ------------------------------------------------------------------------------------- state -> record


def _spans(messages: Sequence[Message], clips: dict[str, AudioRef]) -> list[AudioSpan]:
    return [
        AudioSpan(
            clip=p["clip"], sha256=clips[p["clip"]].sha256, path=clips[p["clip"]].path, start=p["start"], end=p["end"]
        )
        for m in messages
        for p in m["content"]
        if p["type"] == "audio"
    ]


def token_data(
    encoder: PromptEncoder, conversation: list[Message], question_start: int, audio: AudioResolver
) -> dict[str, Any]:
    """prompt/response ids, mask and log-probs of a finished seg-protocol conversation (see the module doc)."""
    if not conversation or conversation[-1]["role"] != "assistant":
        raise EchoError("the conversation does not end with an assistant turn")
    first = encoder.encode(GenerationRequest(messages=conversation[:question_start]), audio).input_ids
    full = encoder.encode(GenerationRequest(messages=conversation, continue_final=True), audio)
    n = 0  # the prompt is the first call's input; a retry re-renders text after it, never before it
    while n < min(len(first), len(full.input_ids)) and first[n] == full.input_ids[n]:
        n += 1
    sampled = [
        lp
        for p in conversation[-1]["content"]
        if p["type"] == "text" and p["origin"] == "model"
        for lp in p.get("logprobs", [])
    ]
    mask = full.loss_mask[n:]
    if sum(full.loss_mask[:n]) or sum(mask) != len(sampled):
        raise EchoError(f"{sum(mask)} trainable tokens but {len(sampled)} sampled log-probs")
    it = iter(sampled)
    logprobs = [next(it) if m else 0.0 for m in mask]
    return {
        "prompt_ids": full.input_ids[:n],
        "response_ids": full.input_ids[n:],
        "response_mask": mask,
        "response_logprobs": logprobs,
    }


def _strip_tokens(messages: Sequence[Message]) -> list[Message]:
    """The messages without per-part token ids and log-probs (they live in the token fields once)."""
    out: list[Message] = []
    for m in messages:
        parts = [
            {k: v for k, v in p.items() if k not in ("token_ids", "logprobs")} if p["type"] == "text" else p
            for p in m["content"]
        ]
        out.append({**m, "content": parts})  # type: ignore[typeddict-item]
    return out


def to_trajectory(outcome: RunOutcome, encoder: PromptEncoder, store: AudioStore, head: dict[str, Any]) -> Trajectory:
    """The record of one finished run. `head` holds the run's identity (model, backend, mode, temperature,
    config hash, data file); the rest comes from the run's final state, the verdict as the graph computed it."""
    job = outcome.job
    fields: dict[str, Any] = {
        **head, "id": job.id, "item_id": job.item.id, "sample": job.sample, "seed": job.seed,
        "question": job.item.question, "choices": job.item.choices, "gold": job.item.answer,
    }  # fmt: skip
    state = outcome.state
    if state is None:
        return Trajectory(**fields, status="error", error=outcome.error, latency_s=outcome.latency_s)
    clips = {cid: AudioRef.model_validate(r) for cid, r in state["clips"].items()}
    conversation: list[Message] = state["conversation"]
    try:
        tokens = token_data(encoder, conversation, state["question_start"], AudioResolver(store, clips))
    except EchoError as err:
        return Trajectory(**fields, status="error", error=f"{type(err).__name__}: {err}", latency_s=outcome.latency_s)
    verdict = Verdict.model_validate(state["verdict"])
    return Trajectory(
        **fields,
        **tokens,
        status=state["status"],
        answer=verdict.answer,
        choice=verdict.choice,
        correct=verdict.correct,
        reward=verdict.reward,
        reward_terms=verdict.terms,
        verdict=verdict,
        listens=[ListenCall.model_validate(c) for c in state["listens"]],
        clips=clips,
        messages=_strip_tokens(conversation),
        audio_spans=_spans(conversation, clips),
        model_calls=state["model_calls"],
        retries=state["retries"],
        generated_tokens=state["generated_tokens"],
        latency_s=outcome.latency_s,
    )


# ------------------------------------------------------------------------------------ record -> inputs


def _audio_inputs(traj: Trajectory, encoder: PromptEncoder, store: AudioStore) -> list[EncodedAudio]:
    """Each span cut again and encoded; each clip's placeholder ids are checked against the record, so features
    and placeholders provably line up."""
    refs = {s.clip: traj.clips[s.clip] for s in traj.audio_spans}
    resolver = AudioResolver(store, refs)
    ids = traj.prompt_ids + traj.response_ids
    audios: list[EncodedAudio] = []
    pos = 0
    for span in traj.audio_spans:
        enc = encoder.encode_audio_part(audio_part(span.clip, span.start, span.end), resolver)
        bos = enc.input_ids[0]
        try:
            pos = ids.index(bos, pos)
        except ValueError:
            raise EchoError(f"trajectory {traj.id}: fewer audio placeholders than audio spans") from None
        if ids[pos : pos + len(enc.input_ids)] != enc.input_ids:
            raise EchoError(f"trajectory {traj.id}: the audio at {span.start}-{span.end} s encodes differently")
        pos += len(enc.input_ids)
        audios.append(enc)
    bos_id = int(encoder.tokenizer.convert_tokens_to_ids("<|audio_bos|>"))
    if ids.count(bos_id) != len(audios):
        raise EchoError(f"trajectory {traj.id}: {ids.count(bos_id)} audio placeholders, {len(audios)} spans")
    return audios


def model_inputs(
    trajs: Sequence[Trajectory],
    encoder: PromptEncoder,
    store: AudioStore | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The exact model inputs of trajectories, right-padded into one batch: `input_ids`, `attention_mask`, the audio
    features (`input_features`, `feature_attention_mask`, in placeholder order), plus `loss_mask` and
    `old_logprobs` over each whole sequence. Audio is cut again from `audio_spans` (the files must still hash the
    same) and encoded by the processor."""
    if not trajs:
        raise EchoError("no trajectories")
    for traj in trajs:
        if traj.status == "error":
            raise EchoError(f"trajectory {traj.id} has no token data ({traj.error})")
    store = store or AudioStore()
    width = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    n = len(trajs)
    pad = encoder.tokenizer.pad_token_id
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((n, width), pad if pad is not None else 0, dtype=torch.long),
        "attention_mask": torch.zeros((n, width), dtype=torch.long),
        "loss_mask": torch.zeros((n, width), dtype=torch.long),
        "old_logprobs": torch.zeros((n, width), dtype=torch.float32),
    }
    audios: list[EncodedAudio] = []
    for i, traj in enumerate(trajs):
        ids = traj.prompt_ids + traj.response_ids
        k, p = len(ids), len(traj.prompt_ids)
        out["input_ids"][i, :k] = torch.tensor(ids)
        out["attention_mask"][i, :k] = 1
        out["loss_mask"][i, p:k] = torch.tensor(traj.response_mask)
        out["old_logprobs"][i, p:k] = torch.tensor(traj.response_logprobs)
        audios += _audio_inputs(traj, encoder, store)
    if audios:
        out.update(encoder.collate(audios))
    return {k: v.to(device) for k, v in out.items()}


def sequence_logprobs(
    model: Any, inputs: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Under `model`, log p(ids[t] | ids[<t]) at every position t (0 at t = 0) and the entropy of the same
    distributions, both `(B, L)`. Pass the sampling temperature the backend scored with (0 = greedy: the logits
    as they are), so the log-probs compare with the trajectory's `response_logprobs`."""
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "input_features",
                                                       "feature_attention_mask")}  # fmt: skip
    if "input_features" in kwargs:
        # A DDP-wrapped model has no `dtype`; its parameters do.
        kwargs["input_features"] = kwargs["input_features"].to(next(model.parameters()).dtype)
    logits = model(**kwargs).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, inputs["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    first = torch.zeros_like(logp[:, :1])
    return torch.cat([first, logp], 1), torch.cat([first, entropy], 1)

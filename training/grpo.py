"""GRPO over full agent trajectories, in one file you can read top to bottom.

Each step takes `items_per_step` questions, rolls each out `group_size` times through the *same*
LangGraph agent users run (no second loop), and scores every trajectory with the verifier (design §5).
Advantages are group-normalised rewards. The policy loss is PPO's clipped surrogate on exactly the
token ids that were sampled, re-encoded with the very audio slices the rollout listened to (the
`PromptEncoder` the backend used), and masked to the model's own tokens: the prompt, inserted audio
placeholders and runtime notes carry no loss. A KL term to the frozen starting policy uses verl's
`low_var_kl` estimator with the paper's coefficient 0.04 (0 turns it off and skips the reference).

    echo-agent train grpo --train data/train.json --init runs/sft/final --out runs/grpo

Runs under `accelerate launch` (each rank rolls out its share of the step's questions). Checkpoints
to OUT/checkpoint and resumes from it; logs reward terms, accuracy, listens per answer, KL, entropy
and the clipped share per step to OUT/log.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, GenerationRequest, ModelBackend
from ..backends.batching import BatchingBackend
from ..backends.transformers import EncodedAudio, PromptEncoder, TransformersBackend
from ..config import AgentConfig, SamplingParams
from ..errors import ConfigError
from ..graphs.state import new_question
from ..messages import Message
from ..verifier import RewardTerms, RewardWeights, verify
from .sft import graph_accuracy, load_items, make_trainable


class GRPOConfig(BaseModel):
    """Everything a run depends on. Saved next to the checkpoints."""

    train: Path
    val: Path | None = None
    out: Path
    init: str = Field(description="the starting model directory (an SFT run's final/)")
    audio_mode: Literal["interleaved", "grounded"] = "interleaved"
    steps: int = 50
    items_per_step: int = 8
    group_size: int = 8
    updates_per_step: int = Field(
        2, description="optimizer steps per rollout batch (mini-batches); >1 makes the clip bite"
    )
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_ratio: float = 0.2
    kl_coef: float = Field(0.04, description="low_var_kl coefficient (the paper's 0.04); 0 disables the reference")
    temperature: float = 1.0
    max_batch: int = Field(32, description="rows decoded together across concurrent rollouts; 1 = one at a time")
    max_new_tokens: int = 160
    reward: Literal["paper", "deepeyes"] = "paper"
    categories: list[str] | None = Field(
        None, description="roll out only items of these categories (e.g. the multi-listen scans); None = all"
    )
    freeze_audio_encoder: bool = True
    log_every: int = 1
    eval_every: int = 25
    eval_items: int = 60
    save_every: int = 10
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def weights(self) -> RewardWeights:
        return RewardWeights.deepeyes() if self.reward == "deepeyes" else RewardWeights.paper()


# ---- rollouts: the agent graph, sampled --------------------------------------------------------


class Rollout(BaseModel):
    """One trajectory as the trainer needs it (the data contract between rollout and trainer)."""

    model_config = {"arbitrary_types_allowed": True}
    item_id: str
    input_ids: list[int]  # prompt + response, exactly as sampled
    loss_mask: list[int]  # 1 on the model's sampled tokens only
    old_logprobs: list[float]  # one per masked token, from the rollout
    audios: list[Any]  # EncodedAudio: the clip and every inserted slice, in order
    reward: float
    terms: RewardTerms
    correct: bool
    listens: int
    advantage: float = 0.0


def rollout_graph(backend: ModelBackend, store: AudioStore, cfg: GRPOConfig, seed: int) -> Any:
    """The users' agent graph, sampling, returning its full state (the trajectory)."""
    from ..graphs.echo import build_echo_graph

    sampling = SamplingParams(temperature=cfg.temperature, top_p=1.0, top_k=0, max_new_tokens=cfg.max_new_tokens,
                              seed=seed)  # fmt: skip
    # No verifier retries: a malformed answer is what the reward must punish, not something to fix up.
    config = AgentConfig(sampling=sampling, mode=cfg.audio_mode, max_retries=0)
    return build_echo_graph(backend, store, config, full_state=True)


def to_rollout(state: dict[str, Any], item: dict[str, Any], encoder: PromptEncoder, store: AudioStore,
               weights: RewardWeights) -> Rollout:  # fmt: skip
    """Re-encode a finished graph state into token ids, the loss mask and the rollout's log-probs."""
    conversation: list[Message] = state["conversation"]
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("a finished rollout ends with an assistant message")
    clips = {cid: AudioRef.model_validate(ref) for cid, ref in state["clips"].items()}
    enc = encoder.encode(GenerationRequest(messages=conversation, continue_final=True), AudioResolver(store, clips))
    old: list[float] = [
        lp
        for part in conversation[-1]["content"]
        if part["type"] == "text" and part["origin"] == "model"
        for lp in part.get("logprobs", [])
    ]
    if len(old) != sum(enc.loss_mask):
        raise ValueError(f"{len(old)} rollout log-probs for {sum(enc.loss_mask)} trainable tokens")
    listens = sum(1 for call in state["listens"] if call.get("valid"))
    from ..graphs.echo import response_text

    verdict = verify(response_text(conversation, state["question_start"]), item["choices"], item["answer"], listens,
                     weights)  # fmt: skip
    return Rollout(
        item_id=item["id"], input_ids=enc.input_ids, loss_mask=enc.loss_mask, old_logprobs=old,
        audios=list(enc.audios), reward=verdict.reward, terms=verdict.terms, correct=bool(verdict.correct),
        listens=listens,
    )  # fmt: skip


async def collect_groups(
    backend: TransformersBackend, items: Sequence[dict[str, Any]], cfg: GRPOConfig, seed: int
) -> list[list[Rollout]]:
    """`group_size` sampled trajectories per item, through the real graph. All of a step's rollouts run
    concurrently and share the model through continuous batching (`BatchingBackend`)."""
    store = AudioStore()
    encoder = backend.encoder
    shared: ModelBackend = BatchingBackend(backend, max_batch=cfg.max_batch) if cfg.max_batch > 1 else backend

    async def one(item: dict[str, Any], k: int) -> Rollout:
        graph = rollout_graph(shared, store, cfg, seed * 1_000_003 + k)
        ref = store.load(item["_audio"])
        question = new_question(item["question"], {"main": ref.model_dump()}, item["choices"], item["answer"])
        state = await graph.ainvoke(question)
        return to_rollout(state, item, encoder, store, cfg.weights())

    g = cfg.group_size
    flat = await asyncio.gather(*(one(item, i * g + k) for i, item in enumerate(items) for k in range(g)))
    return [list(flat[i * g : (i + 1) * g]) for i in range(len(items))]


def group_advantages(groups: list[list[Rollout]], eps: float = 1e-6) -> None:
    """GRPO: each reward minus its group's mean, over the group's std. A group that all scored the
    same teaches nothing and gets zero advantage."""
    for group in groups:
        rewards = [r.reward for r in group]
        mean = statistics.fmean(rewards)
        std = statistics.pstdev(rewards)
        for r in group:
            r.advantage = 0.0 if std < eps else (r.reward - mean) / (std + eps)


# ---- the loss ----------------------------------------------------------------------------------


def collate_rollouts(rollouts: Sequence[Rollout], encoder: PromptEncoder, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rollouts)
    n = len(rollouts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.float)
    old = torch.zeros((n, width))
    adv = torch.zeros(n)
    for i, r in enumerate(rollouts):
        k = len(r.input_ids)
        ids[i, :k] = torch.tensor(r.input_ids)
        attn[i, :k] = 1
        m = torch.tensor(r.loss_mask, dtype=torch.bool)
        mask[i, :k] = m.float()
        old[i, :k][m] = torch.tensor(r.old_logprobs)
        adv[i] = r.advantage
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "old_logprobs": old, "advantages": adv}
    audios: list[EncodedAudio] = [a for r in rollouts for a in r.audios]
    if audios:
        batch.update(encoder.collate(audios))
    return batch


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token given its prefix (position t holds log p(ids[t] | ids[<t])), and the
    entropy of the same distributions; the temperature is the rollout's, as the backend scored them."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "input_features",
                                                       "feature_attention_mask")}  # fmt: skip
    logits = model(**inputs).logits[:, :-1].float() / max(temperature, 1e-6)
    logp_all = torch.log_softmax(logits, dim=-1)
    ids = batch["input_ids"][:, 1:]
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros_like(logp[:, :1])
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl's k3 estimator of KL(pi || ref), clamped like verl's: exp(ref - logp) - (ref - logp) - 1."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def grpo_loss(
    logp: torch.Tensor, batch: dict[str, torch.Tensor], clip: float, kl_coef: float, ref_logp: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean clipped surrogate (+ KL) over the masked tokens of the batch."""
    mask = batch["loss_mask"]
    n = mask.sum().clamp(min=1)
    ratio = (logp - batch["old_logprobs"]).exp()
    adv = batch["advantages"].unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = -(surrogate * mask).sum() / n
    stats = {"clipped": float((((ratio - 1).abs() > clip).float() * mask).sum() / n)}
    if ref_logp is not None and kl_coef > 0:
        kl = (low_var_kl(logp, ref_logp) * mask).sum() / n
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    return loss, stats


# ---- the loop ----------------------------------------------------------------------------------


def _save(model: Any, processor: Any, optimizer: Any, state: dict[str, Any], where: Path, merge: bool = False) -> None:
    """Write to WHERE.tmp, then swap in two renames: a kill at any point leaves a whole checkpoint."""
    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (model.merge_and_unload() if merge else model).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "trainer_state.pt")
    old = where.with_name(where.name + ".old")
    if where.exists():
        shutil.rmtree(old, ignore_errors=True)
        where.rename(old)
    tmp.rename(where)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: GRPOConfig) -> Path:
    """Train; returns the directory of the final model (OUT/final)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    cfg.out.mkdir(parents=True, exist_ok=True)
    items = load_items(cfg.train)
    if cfg.categories is not None:
        items = [it for it in items if it.get("category") in cfg.categories]
    if not 0 < cfg.items_per_step <= len(items) or cfg.group_size < 2:
        raise ConfigError(f"items_per_step must be 1..{len(items)} (the training items) and group_size >= 2, "
                          f"got {cfg.items_per_step} and {cfg.group_size}")  # fmt: skip
    val_items = load_items(cfg.val)[: cfg.eval_items] if cfg.val else []
    ckpt = cfg.out / "checkpoint"
    old = ckpt.with_name("checkpoint.old")
    if not ckpt.exists() and (old / "trainer_state.pt").is_file():  # killed between the two renames
        old.rename(ckpt)
    resume = (ckpt / "trainer_state.pt").is_file()
    backend = TransformersBackend.from_pretrained(ckpt if resume and not cfg.lora else cfg.init)
    model, processor = backend.model, backend.processor
    reference = None
    if cfg.kl_coef > 0 and not cfg.lora:  # with LoRA the reference is the base with adapters disabled
        reference = TransformersBackend.from_pretrained(cfg.init).model.eval().requires_grad_(False)
    model = make_trainable(model, cfg, ckpt if resume else None)
    backend.model = model  # rollouts sample from the (possibly LoRA-wrapped) policy being trained
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    encoder = backend.encoder
    pad_id = processor.tokenizer.pad_token_id
    log = (cfg.out / "log.jsonl").open("a")
    rank, world = accelerator.process_index, accelerator.num_processes

    while step < cfg.steps:
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 100_003 + step)  # the step's questions: the same on every rank
        chosen = rng.sample(items, cfg.items_per_step)[rank::world]
        model.eval()
        groups = asyncio.run(collect_groups(backend, chosen, cfg, seed=cfg.seed * 100_003 + step * 1009 + rank))
        rollout_s = time.perf_counter() - t0
        group_advantages(groups)
        rollouts = [r for g in groups for r in g]
        learn = [r for r in rollouts if r.advantage != 0.0]
        model.train()
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clipped": [], "entropy": []}
        if learn:
            rng.shuffle(learn)
            size = math.ceil(len(learn) / cfg.updates_per_step)
            for start in range(0, len(learn), size):
                batch = collate_rollouts(learn[start : start + size], encoder, pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                logp, entropy = token_logprobs(model, batch, cfg.temperature)
                ref_logp = None
                if cfg.kl_coef > 0:
                    with torch.no_grad():
                        if reference is not None:
                            ref_logp, _ = token_logprobs(reference, batch, cfg.temperature)
                        else:
                            with accelerator.unwrap_model(model).disable_adapter():
                                ref_logp, _ = token_logprobs(model, batch, cfg.temperature)
                loss, s = grpo_loss(logp, batch, cfg.clip_ratio, cfg.kl_coef, ref_logp)
                accelerator.backward(loss)
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(float(loss.detach()))
                stats["entropy"].append(float((entropy.detach() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()))
                for k, v in s.items():
                    stats[k].append(v)
        step += 1
        record: dict[str, Any] = {
            "step": step,
            "reward": statistics.fmean(r.reward for r in rollouts),
            "accuracy": statistics.fmean(float(r.correct) for r in rollouts),
            "listens_per_answer": statistics.fmean(r.listens for r in rollouts),
            **{
                f"reward_{t}": statistics.fmean(getattr(r.terms, t) for r in rollouts)
                for t in ("format", "accuracy", "segment", "consistency")
            },
            **{k: statistics.fmean(v) for k, v in stats.items() if v},
            "learning_rollouts": len(learn),
            "rollout_s": round(rollout_s, 2),
            "step_s": round(time.perf_counter() - t0, 2),
        }
        if val_items and (step % cfg.eval_every == 0 or step == cfg.steps) and accelerator.is_main_process:
            model.eval()
            record["val_accuracy"] = graph_accuracy(backend, val_items, cfg.audio_mode)
        if accelerator.is_main_process and (step % cfg.log_every == 0 or "val_accuracy" in record):
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if accelerator.is_main_process and (step % cfg.save_every == 0 or step == cfg.steps):
            _save(accelerator.unwrap_model(model), processor, optimizer, {"step": step}, ckpt)
    final = cfg.out / "final"
    if accelerator.is_main_process:
        _save(accelerator.unwrap_model(model), processor, None, {}, final, merge=cfg.lora)
    log.close()
    return final

"""GRPO over full agent trajectories, in one file you can read top to bottom.

Each step takes `items_per_step` questions and rolls each out `group_size` times through the *same* LangGraph
agent users run, driven by the same runner as `collect` (`echo_agent.graphs.runner`). Every run becomes the
same `Trajectory` record `collect` writes, with the reward its graph's verifier node computed (the agent
config carries the reward weights, so the reward trained on is the one recorded). Advantages are
group-normalised rewards. The policy loss is PPO's clipped surrogate on exactly the token ids that were
sampled, rebuilt from each trajectory with the very audio slices it listened to (`model_inputs`), and masked
to the model's own tokens: the prompt, inserted audio placeholders and runtime notes carry no loss. A KL term
to the frozen starting policy uses verl's `low_var_kl` estimator with the paper's coefficient 0.04 (0 turns it
off and skips the reference).

    echo-agent train grpo --train data/train.json --init runs/sft/final --out runs/grpo

Threads (the suite's multi-turn conversations) are rolled out whole: a step draws `items_per_step` conversations
(a single item, or every turn of a thread), and each of the `group_size` samples of a thread runs its turns in
order in one graph thread, as `eval` runs them, so a follow-up turn is asked in the context of that sample's own
earlier answers. Each turn is a group of its own (the `group_size` samples of that turn), and its trajectory's
loss covers that turn's tokens only. Open questions are judged by the graph's verifier with the item's
`answer_kind`, as everywhere. echo-tiny 2's frozen Whisper frames are kept on disk (`feature_cache`).

Runs under `accelerate launch` (each rank rolls out its share of the step's questions). Checkpoints to
OUT/checkpoint and resumes from it; logs reward terms, accuracy, listens per answer, KL, entropy and the
clipped share per step to OUT/log.jsonl.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..agent import EchoAgent
from ..backends.transformers import PromptEncoder, TransformersBackend
from ..benchmarks import BenchItem
from ..config import AgentConfig, RewardName, SamplingParams, reward_weights
from ..errors import ConfigError
from ..graphs.runner import batched, jobs, run_all
from .common import (
    RankLog,
    RunFolder,
    TrainableSettings,
    checkpoint,
    conversation_units,
    finish,
    load_items,
    memory_checkpointer,
    prepare_training,
    validation_accuracy,
)
from .features import attach_feature_cache, feature_cache_dir
from .trajectory import Trajectory, model_inputs, sequence_logprobs, to_trajectory


class GRPOConfig(TrainableSettings):
    """Everything a run depends on. Saved next to the checkpoints."""

    train: Path
    val: Path | None = None
    out: Path
    init: str = Field(description="the starting model directory (an SFT run's final/)")
    audio_mode: Literal["interleaved", "grounded"] = "interleaved"
    steps: int = Field(50, ge=1)
    items_per_step: int = Field(8, ge=1, description="conversations per step: a single item, or a whole thread")
    group_size: int = Field(8, ge=2, description="rollouts per question; GRPO compares them, so at least 2")
    updates_per_step: int = Field(
        2, ge=1, description="optimizer steps per rollout batch (mini-batches); >1 makes the clip bite"
    )
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    clip_ratio: float = Field(0.2, gt=0, lt=1)
    kl_coef: float = Field(0.04, ge=0, description="low_var_kl coefficient (the paper's 0.04); 0: no reference")
    temperature: float = Field(1.0, gt=0)
    max_batch: int = Field(32, ge=1, description="rows decoded together across concurrent rollouts; 1: one by one")
    max_new_tokens: int = Field(160, ge=1)
    reward: RewardName = "paper"
    categories: list[str] | None = Field(
        None, description="roll out only items of these categories (e.g. the multi-listen scans); None = all"
    )
    freeze_audio_encoder: bool = True
    feature_cache: str = Field(
        "auto", description="frozen-encoder frames on disk: 'auto' ($ECHO_FEATURE_CACHE, else OUT/features), "
        "'off', or a folder",
    )  # fmt: skip
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(25, ge=1)
    eval_items: int = Field(60, ge=0)
    save_every: int = Field(10, ge=1)
    seed: int = 0

    def agent_config(self) -> AgentConfig:
        """The rollouts' agent. No verifier retries: a malformed answer is what the reward must punish."""
        sampling = SamplingParams(temperature=self.temperature, top_p=1.0, top_k=0, max_new_tokens=self.max_new_tokens)
        return AgentConfig(sampling=sampling, mode=self.audio_mode, max_retries=0, reward=reward_weights(self.reward))


# ---- rollouts: the agent graph, sampled --------------------------------------------------------


async def rollout_groups(
    agent: EchoAgent, encoder: PromptEncoder, items: Sequence[BenchItem], group_size: int, seed: int
) -> list[list[Trajectory]]:
    """`group_size` sampled trajectories per item, through the real graph. All of a step's rollouts run at once
    and share the model through continuous batching (the agent's backend). The turns of a thread (all of them,
    in order, in `items`) run in order in one graph thread per sample; the agent needs a checkpointer then."""
    todo = jobs(items, group_size, seed)
    outcomes = await run_all(agent, todo, concurrency=len(todo))
    head = {"model": agent.backend.name, "backend": type(agent.backend).__name__, "mode": agent.config.mode,
            "temperature": agent.config.sampling.temperature, "config_hash": "", "data": ""}  # fmt: skip
    trajs = [to_trajectory(o, encoder, agent.store, head) for o in outcomes]
    return [trajs[i * group_size : (i + 1) * group_size] for i in range(len(items))]


def group_advantages(groups: list[list[Trajectory]], eps: float = 1e-6) -> list[list[float]]:
    """GRPO: each reward minus its group's mean, over the group's std. A group that all scored the same
    teaches nothing and gets zero advantage."""
    out: list[list[float]] = []
    for group in groups:
        rewards = [t.reward for t in group]
        if not rewards:
            out.append([])
            continue
        mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
        out.append([0.0 if std < eps else (r - mean) / (std + eps) for r in rewards])
    return out


# ---- the loss ----------------------------------------------------------------------------------


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """verl's k3 estimator of KL(pi || ref), clamped like verl's: exp(ref - logp) - (ref - logp) - 1."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def grpo_loss(
    logp: torch.Tensor, batch: dict[str, torch.Tensor], clip: float, kl_coef: float, ref_logp: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean clipped surrogate (+ KL) over the masked tokens of the batch."""
    mask = batch["loss_mask"].float()
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


def policy_update(
    model: Any, reference: Any, optimizer: Any, accelerator: Any, params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor], cfg: GRPOConfig,
) -> dict[str, float]:  # fmt: skip
    """One optimizer step on a batch of trajectories (`model_inputs` plus their `advantages`). With LoRA and no
    separate `reference`, the reference is the model with its adapters disabled."""
    logp, entropy = sequence_logprobs(model, batch, cfg.temperature)
    ref_logp = None
    if cfg.kl_coef > 0:
        with torch.no_grad():
            if reference is not None:
                ref_logp, _ = sequence_logprobs(reference, batch, cfg.temperature)
            else:
                with accelerator.unwrap_model(model).disable_adapter():
                    ref_logp, _ = sequence_logprobs(model, batch, cfg.temperature)
    loss, stats = grpo_loss(logp, batch, cfg.clip_ratio, cfg.kl_coef, ref_logp)
    accelerator.backward(loss)
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mask = batch["loss_mask"].float()
    return {**stats, "loss": float(loss.detach()), "entropy": float((entropy.detach() * mask).sum() / mask.sum())}


# ---- the loop ----------------------------------------------------------------------------------

TERMS = ("format", "accuracy", "segment", "consistency")


def _max_min(accelerator: Any, most: int, least: int) -> tuple[int, int]:
    """(max over ranks of `most`, min over ranks of `least`), in one all-reduce."""
    t = torch.tensor([most, -least], device=accelerator.device)
    out = accelerator.reduce(t, "max")
    return int(out[0]), -int(out[1])


def train(cfg: GRPOConfig) -> Path:
    """Train; returns the directory of the final model (OUT/final)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    run = RunFolder(cfg.out)
    units = conversation_units(load_items(cfg.train))  # a thread is rolled out whole, turn after turn
    if cfg.categories is not None:
        units = [u for u in units if u[0].group in cfg.categories]
    if cfg.items_per_step > len(units):
        raise ConfigError(
            f"items_per_step must be 1..{len(units)} (the training items), got {cfg.items_per_step} "
            "(a thread counts as one item)"
        )
    val_items = load_items(cfg.val)[: cfg.eval_items] if cfg.val else []
    resume = run.resume()
    backend = TransformersBackend.from_pretrained(run.checkpoint if resume and not cfg.lora else cfg.init)
    model, processor = backend.model, backend.processor
    cache_dir = feature_cache_dir(cfg.feature_cache, cfg.out)
    attach_feature_cache(model, cache_dir)
    reference = None
    if cfg.kl_coef > 0 and not cfg.lora:  # with LoRA the reference is the base with adapters disabled
        reference = TransformersBackend.from_pretrained(cfg.init).model.eval().requires_grad_(False)
        attach_feature_cache(reference, cache_dir)
    model, optimizer, params = prepare_training(model, cfg, accelerator, run, resume, lr=cfg.lr,
                                                weight_decay=cfg.weight_decay, betas=(0.9, 0.99))  # fmt: skip
    backend.model = accelerator.unwrap_model(model)  # rollouts sample from the (possibly LoRA-wrapped) policy
    every = [it for u in units for it in u]
    # One graph for the whole run; threads keep their conversation in an in-memory checkpointer.
    agent = EchoAgent(
        batched(backend, cfg.max_batch), config=cfg.agent_config(), checkpointer=memory_checkpointer(every)
    )
    step = resume["step"] if resume else 0
    run.write_config(cfg)
    log = run.log()
    ranks = RankLog(run, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.items_per_step < world:
        raise ConfigError(f"items_per_step ({cfg.items_per_step}) must be at least the process count ({world})")

    def total(*values: float) -> list[float]:
        """Sums over all ranks (a collective: every rank calls it at the same point)."""
        t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
        return [float(v) for v in (accelerator.reduce(t, "sum") if world > 1 else t)]

    while step < cfg.steps:
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 100_003 + step)  # the step's questions: the same on every rank
        chosen = [it for unit in rng.sample(units, cfg.items_per_step)[rank::world] for it in unit]
        model.eval()
        groups = asyncio.run(rollout_groups(agent, backend.encoder, chosen, cfg.group_size, cfg.seed * 100_003 + step))
        rollout_s = time.perf_counter() - t0
        ran = [[t for t in g if t.status != "error"] for g in groups]  # a run with bad input has nothing to learn
        trajs = [t for g in ran for t in g]
        learn = [(t, a) for g, adv in zip(ran, group_advantages(ran), strict=True) for t, a in zip(g, adv, strict=True)
                 if a != 0.0]  # fmt: skip
        ranks.write({"step": step + 1, "items": [it.id for it in chosen]})
        rng.shuffle(learn)
        size = math.ceil(len(learn) / cfg.updates_per_step) if learn else 1
        chunks = [learn[k : k + size] for k in range(0, len(learn), size)]
        # Every rank takes the same number of optimizer steps (DDP all-reduces each backward): the most any rank
        # has, a rank with fewer padding with a zero-weight pass over one of its own rollouts. A step where some
        # rank has no rollout at all (every one errored) is skipped by all.
        updates, fewest = (len(chunks), len(trajs)) if world == 1 else _max_min(accelerator, len(chunks), len(trajs))
        model.train()
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clipped": [], "entropy": []}
        for u in range(updates if fewest > 0 else 0):
            chunk = chunks[u] if u < len(chunks) else [(trajs[0], 0.0)]
            batch = model_inputs([t for t, _ in chunk], backend.encoder, agent.store, accelerator.device)
            batch["advantages"] = torch.tensor([a for _, a in chunk], device=accelerator.device)
            if u >= len(chunks):
                batch["loss_mask"].zero_()  # padding: contributes nothing, KL included
            for k, v in policy_update(model, reference, optimizer, accelerator, params, batch, cfg).items():
                stats[k].append(v)
        step += 1
        terms = [t.reward_terms for t in trajs if t.reward_terms is not None]
        sums = total(
            len(trajs), sum(t.reward for t in trajs), sum(bool(t.correct) for t in trajs),
            sum(t.valid_listens for t in trajs), len(learn), sum(len(g) for g in groups) - len(trajs),
            *(sum(getattr(t, name) for t in terms) for name in TERMS),
        )  # fmt: skip
        n = max(sums[0], 1.0)
        record: dict[str, Any] = {
            "step": step,
            "reward": sums[1] / n,
            "accuracy": sums[2] / n,
            "listens_per_answer": sums[3] / n,
            **{f"reward_{name}": sums[6 + k] / n for k, name in enumerate(TERMS)},
            **{k: statistics.fmean(v) for k, v in stats.items() if v},  # rank 0's updates
            "learning_rollouts": int(sums[4]),
            "rollout_errors": int(sums[5]),
            "rollout_s": round(rollout_s, 2),
            "step_s": round(time.perf_counter() - t0, 2),
        }
        # Validation and checkpoints run on rank 0 while the others wait at a barrier.
        if val_items and (step % cfg.eval_every == 0 or step == cfg.steps):
            if accelerator.is_main_process:
                model.eval()
                record["val_accuracy"] = validation_accuracy(backend, val_items, cfg.audio_mode)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process and (step % cfg.log_every == 0 or "val_accuracy" in record):
            log.write(record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoint(accelerator, model, processor, run, {"optimizer": optimizer.state_dict(), "step": step})
    log.close()
    return finish(accelerator, model, processor, run, ranks, cfg.lora)

"""GRPO over full agent trajectories (training/grpo.py), on real tiny models.

echo-tiny is first taught the suite's traces by a short real SFT run (so it writes `<seg>` tags and
the graph really inserts audio), then sampled through the agent graph by the one runner. The tests check
the one contract between rollout and trainer, the `Trajectory`: the loss mask, the recomputed log-probs,
the reward computed once in the graph's verifier (under both weightings), a trajectory that `collect`
wrote training a GRPO step as it is, then real GRPO runs (echo-tiny and a tiny random Qwen2-Audio) with
resume.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from echo_agent.agent import EchoAgent
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import load_benchmark
from echo_agent.graphs.echo import response_text
from echo_agent.graphs.runner import batched, jobs, run_all
from echo_agent.tiny_models import build_tiny_qwen2_audio
from echo_agent.training.collect import collect, read_trajectories
from echo_agent.training.grpo import (
    GRPOConfig,
    group_advantages,
    grpo_loss,
    low_var_kl,
    policy_update,
    rollout_groups,
    train,
)
from echo_agent.training.sft import SFTConfig
from echo_agent.training.sft import train as sft_train
from echo_agent.training.synth import write_suite
from echo_agent.training.trajectory import Trajectory, model_inputs, sequence_logprobs, to_trajectory
from echo_agent.verifier import RewardTerms, RewardWeights, verify

TINY: dict[str, Any] = {"vocab_size": 400, "hidden_size": 64, "layers": 2, "intermediate_size": 128,
                        "audio_hidden_size": 64}  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two count and two identify items (one listen each), 10-12 s clips."""
    out = tmp_path_factory.mktemp("suite")
    return write_suite(out, 4, 3, "train", categories=("count", "identify"), progress=False, durations=(10.0, 12.0))


@pytest.fixture(scope="module")
def taught(suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny echo-tiny that has memorised the suite's traces (a real SFT run)."""
    out = tmp_path_factory.mktemp("sft")
    cfg = SFTConfig(train=suite, out=out, init="echo-tiny", steps=80, batch_size=4, lr=1e-2, warmup=5, log_every=80,
                    save_every=1000, freeze_audio_encoder=True, **TINY)  # fmt: skip
    return sft_train(cfg)


def _cfg(suite: Path, init: Path, out: Path, **kw: Any) -> GRPOConfig:
    base: dict[str, Any] = {"items_per_step": 2, "group_size": 3, "steps": 2, "max_new_tokens": 80, "lr": 1e-3,
                            "save_every": 1, "eval_every": 100}  # fmt: skip
    return GRPOConfig(train=suite, out=out, init=str(init), **{**base, **kw})


def _rollouts(backend: TransformersBackend, suite: Path, cfg: GRPOConfig, max_batch: int = 1) -> list[Trajectory]:
    """One rollout of every item, as GRPO's rollout step makes them (the rollout agent of `cfg`)."""
    agent = EchoAgent(batched(backend, max_batch), config=cfg.agent_config())
    groups = asyncio.run(rollout_groups(agent, backend.encoder, load_benchmark(suite), 1, seed=100))
    return [t for g in groups for t in g]


def test_rollout_contract_on_echo_tiny(suite: Path, taught: Path, tmp_path: Path) -> None:
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path)
    trajs = _rollouts(backend, suite, cfg)
    config = backend.model.config
    audio_ids = {config.audio_token_id, config.audio_bos_token_id, config.audio_eos_token_id}
    listened = 0
    for t in trajs:
        assert t.status != "error"
        ids = t.prompt_ids + t.response_ids
        mask = [0] * len(t.prompt_ids) + t.response_mask
        # The loss mask excludes every inserted-audio token; the audio count is the clip plus each listen.
        audio_positions = [i for i, tok in enumerate(ids) if tok in audio_ids]
        assert audio_positions and all(mask[i] == 0 for i in audio_positions)
        assert len(t.audio_spans) == 1 + t.valid_listens
        assert sum(tok == config.audio_token_id for tok in ids) == 16 * len(t.audio_spans)
        listened += t.valid_listens
        # Exactly the sampled ids sit under the mask (no retries in GRPO), each with its rollout log-prob.
        assert sum(t.response_mask) == t.generated_tokens and t.retries == 0
        assert all(lp < 0 or m == 0 for lp, m in zip(t.response_logprobs, t.response_mask, strict=True))
    assert listened >= 2, "the taught model re-listens, so audio is really inserted"
    # Recomputed log-probs of the sampled tokens match the rollout's (same weights), in one padded batch.
    batch = model_inputs(trajs, backend.encoder)
    with torch.no_grad():
        logp, entropy = sequence_logprobs(backend.model, batch, cfg.temperature)
    m = batch["loss_mask"].bool()
    torch.testing.assert_close(logp[m], batch["old_logprobs"][m], atol=2e-3, rtol=0)
    assert bool((entropy[m] >= 0).all())


@pytest.mark.parametrize("reward", ["paper", "deepeyes"])
def test_the_reward_is_the_graph_verdict_under_both_weightings(
    suite: Path, taught: Path, tmp_path: Path, reward: str
) -> None:
    """The verifier node computes the reward once: the verdict in the final state, in the `Trajectory` and in
    what GRPO trains on (the trajectory's `reward`) are one number, with the configured weights."""
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path, reward=reward)
    agent = EchoAgent(backend, config=cfg.agent_config())
    items = load_benchmark(suite)
    outcomes = asyncio.run(run_all(agent, jobs(items, 1, seed=3)))
    w = RewardWeights.deepeyes() if reward == "deepeyes" else RewardWeights.paper()
    head = {"model": "m", "backend": "b", "mode": "interleaved", "temperature": 1.0, "config_hash": "", "data": ""}
    for outcome in outcomes:
        assert outcome.state is not None
        traj = to_trajectory(outcome, backend.encoder, agent.store, head)
        verdict = outcome.state["verdict"]
        assert traj.reward == verdict["reward"] and traj.reward_terms == RewardTerms.model_validate(verdict["terms"])
        # ...and it is the verifier's with these weights (recomputed here from the record's own text).
        text = response_text(traj.messages, outcome.state["question_start"])
        assert traj.reward_terms == verify(text, traj.choices, traj.gold, traj.valid_listens, w).terms
    terms = [to_trajectory(o, backend.encoder, agent.store, head).reward_terms for o in outcomes]
    assert any(t is not None and t.format == w.format for t in terms), "the taught model answers in format"
    if reward == "deepeyes":  # 0.8 accuracy + 0.2 format + 1.2 [listened and correct], not the paper's 0.5s
        assert all(t is not None and t.format in (0.0, 0.2) and t.segment in (0.0, 1.2) for t in terms)


def test_a_collected_trajectory_trains_a_grpo_step_as_it_is(suite: Path, taught: Path, tmp_path: Path) -> None:
    """`collect` writes the same record GRPO trains on: read back from the file, it makes a policy update."""
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path, kl_coef=0.04)
    agent = EchoAgent(batched(backend), config=cfg.agent_config())
    out = tmp_path / "traj.jsonl"
    asyncio.run(collect(agent, load_benchmark(suite), samples=3, out=out, progress=False, limit=2))
    records, _ = read_trajectories(out)
    by_item: dict[str, list[Trajectory]] = {}
    for t in records.values():
        by_item.setdefault(t.item_id, []).append(t)
    groups = list(by_item.values())
    learn = [(t, a) for g, adv in zip(groups, group_advantages(groups), strict=True)
             for t, a in zip(g, adv, strict=True)]  # fmt: skip
    batch = model_inputs([t for t, _ in learn], backend.encoder)
    batch["advantages"] = torch.tensor([a if a else 1.0 for _, a in learn])  # some signal even for a tied group
    model = backend.model.train()
    reference = TransformersBackend.from_pretrained(taught).model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    stats = policy_update(model, reference, optimizer, Accelerator(cpu=True), params, batch, cfg)
    assert {"loss", "kl", "clipped", "entropy"} <= set(stats)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-4), "the policy starts equal to its reference"
    assert stats["clipped"] == 0.0, "the first update's ratio is 1: the rollout log-probs are the policy's"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "language_model" in k)


def _traj(reward: float) -> Trajectory:
    return Trajectory(id="x#0", item_id="x", sample=0, seed=0, model="m", backend="b", mode="interleaved",
                      temperature=1.0, config_hash="", data="", question="q", choices=[], gold=None,
                      status="answered", reward=reward)  # fmt: skip


def test_group_advantages_and_loss_pieces() -> None:
    adv = group_advantages([[_traj(1.5), _traj(0.5)], [_traj(1.0), _traj(1.0)], []])
    assert adv[0] == pytest.approx([1.0, -1.0], abs=1e-4)
    assert adv[1] == [0.0, 0.0] and adv[2] == []  # a tied group teaches nothing; an empty one is skipped
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    assert float(low_var_kl(logp, logp).abs().max()) == 0.0
    assert float(low_var_kl(logp, logp - 0.5).min()) > 0.0
    batch = {"loss_mask": torch.tensor([[0, 1, 1]]), "old_logprobs": torch.tensor([[0.0, -1.0, -2.0]]),
             "advantages": torch.tensor([1.0])}  # fmt: skip
    loss, stats = grpo_loss(logp, batch, 0.2, 0.0, None)
    assert float(loss) == pytest.approx(-1.0) and stats["clipped"] == 0.0  # ratio 1, advantage 1
    # A ratio past 1 + clip earns no more than the clipped surrogate.
    loss_hi, stats_hi = grpo_loss(logp + 1.0, batch, 0.2, 0.0, None)
    assert float(loss_hi) == pytest.approx(-1.2) and stats_hi["clipped"] == 1.0


def test_grpo_steps_on_echo_tiny_log_and_resume(suite: Path, taught: Path, tmp_path: Path) -> None:
    # Hot sampling, so some group mixes right and wrong answers (the taught model is nearly always right).
    cfg = _cfg(suite, taught, tmp_path / "run", val=suite, eval_every=2, eval_items=2, temperature=2.0)
    final = train(cfg)
    assert (final / "config.json").is_file()
    rows = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "accuracy", "listens_per_answer", "reward_format", "reward_segment", "step_s"):
        assert key in rows[0]
    assert rows[0]["rollout_errors"] == 0
    assert 0.0 <= rows[-1]["val_accuracy"] <= 1.0
    assert any("kl" in r and "entropy" in r for r in rows), "some group had distinct rewards and trained"
    # The weights moved where there was something to learn.
    before = TransformersBackend.from_pretrained(taught).model.state_dict()
    after = TransformersBackend.from_pretrained(final).model.state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    assert moved == any("loss" in r for r in rows)
    # Resume: two more steps continue from the checkpoint's step count.
    train(cfg.model_copy(update={"steps": 3}))
    rows = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_grpo_steps_on_tiny_qwen2_audio(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "data", 2, 4, "train", categories=("count",), progress=False, durations=(10.0, 10.0))
    model, processor = build_tiny_qwen2_audio()
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    cfg = _cfg(suite, tmp_path / "qwen", tmp_path / "run", group_size=2, steps=1, max_new_tokens=12,
               freeze_audio_encoder=True)  # fmt: skip
    final = train(cfg)
    row = json.loads((cfg.out / "log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and "reward" in row
    assert (final / "config.json").is_file()


def test_batched_rollouts_keep_the_contract(suite: Path, taught: Path, tmp_path: Path) -> None:
    """A step's rollouts decode together (continuous batching, left-padded); their log-probs still
    match a recomputation on the sampled ids, and every group has its own samples."""
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path, group_size=4, max_batch=8)
    agent = EchoAgent(batched(backend, cfg.max_batch), config=cfg.agent_config())
    groups = asyncio.run(rollout_groups(agent, backend.encoder, load_benchmark(suite)[:2], 4, seed=7))
    assert [len(g) for g in groups] == [4, 4]
    assert all(t.item_id == g[0].item_id for g in groups for t in g) and groups[0][0].item_id != groups[1][0].item_id
    assert len({t.seed for g in groups for t in g}) == 8, "every rollout samples with its own seed"
    trajs = [t for g in groups for t in g]
    batch = model_inputs(trajs, backend.encoder)
    with torch.no_grad():
        logp, _ = sequence_logprobs(backend.model, batch, cfg.temperature)
    m = batch["loss_mask"].bool()
    torch.testing.assert_close(logp[m], batch["old_logprobs"][m], atol=2e-3, rtol=0)


def test_too_few_items_or_a_group_of_one_is_a_clear_error(suite: Path, taught: Path, tmp_path: Path) -> None:
    from echo_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="items_per_step"):
        train(_cfg(suite, taught, tmp_path / "a", items_per_step=99))
    with pytest.raises(ValidationError, match="group_size"):  # refused before any work starts
        _cfg(suite, taught, tmp_path / "b", group_size=1)
    # `categories` filters the training items first: 2 of the 4 are count items, none is a pitch item.
    with pytest.raises(ConfigError, match=r"1\.\.2 \(the training items\)"):
        train(_cfg(suite, taught, tmp_path / "c", items_per_step=3, categories=["count"]))
    with pytest.raises(ConfigError, match=r"1\.\.0 \(the training items\)"):
        train(_cfg(suite, taught, tmp_path / "d", items_per_step=1, categories=["pitch"]))

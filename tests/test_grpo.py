"""GRPO over full agent trajectories (training/grpo.py), on real tiny models.

echo-tiny is first taught the suite's traces by a short real SFT run (so it writes `<seg>` tags and
the graph really inserts audio), then sampled through the agent graph. The tests check the data
contract between rollout and trainer: the loss mask, the recomputed log-probs, the reward terms,
then run real GRPO steps (echo-tiny and a tiny random Qwen2-Audio) with resume.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from echo_agent.audio import AudioStore
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.graphs.echo import response_text
from echo_agent.graphs.state import new_question
from echo_agent.tiny_models import build_tiny_qwen2_audio
from echo_agent.training.grpo import (
    GRPOConfig,
    Rollout,
    collate_rollouts,
    collect_groups,
    group_advantages,
    grpo_loss,
    low_var_kl,
    rollout_graph,
    to_rollout,
    token_logprobs,
    train,
)
from echo_agent.training.sft import SFTConfig, load_items
from echo_agent.training.sft import train as sft_train
from echo_agent.training.synth import write_suite
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


async def _rollouts(backend: TransformersBackend, items: list[dict[str, Any]], cfg: GRPOConfig) -> list[Any]:
    store = AudioStore()
    out = []
    for i, item in enumerate(items):
        graph = rollout_graph(backend, store, cfg, seed=100 + i)
        ref = store.load(item["_audio"])
        state = await graph.ainvoke(
            new_question(item["question"], {"main": ref.model_dump()}, item["choices"], item["answer"])
        )
        out.append((state, to_rollout(state, item, backend.encoder, store, cfg.weights())))
    return out


def test_rollout_contract_on_echo_tiny(suite: Path, taught: Path, tmp_path: Path) -> None:
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path)
    items = load_items(suite)
    pairs = asyncio.run(_rollouts(backend, items, cfg))
    audio_ids = {backend.model.config.audio_token_id, backend.model.config.audio_bos_token_id,
                 backend.model.config.audio_eos_token_id}  # fmt: skip
    listened = 0
    for state, r in pairs:
        # The loss mask excludes every inserted-audio token; the audio count is the clip plus each listen.
        audio_positions = [i for i, t in enumerate(r.input_ids) if t in audio_ids]
        assert audio_positions and all(r.loss_mask[i] == 0 for i in audio_positions)
        assert len(r.audios) == 1 + r.listens
        assert sum(t == backend.model.config.audio_token_id for t in r.input_ids) == 16 * len(r.audios)
        listened += r.listens
        # Exactly the sampled ids sit under the mask, and their log-probs came from the rollout.
        assert sum(r.loss_mask) == len(r.old_logprobs) == state["generated_tokens"]
        # The reward terms are the graph's own verifier's (paper weights in both).
        assert r.terms == RewardTerms.model_validate(state["verdict"]["terms"])
        assert r.reward == pytest.approx(state["verdict"]["reward"])
    assert listened >= 2, "the taught model re-listens, so audio is really inserted"
    # Recomputed log-probs of the sampled tokens match the rollout's (same weights), in one padded batch.
    rollouts = [r for _, r in pairs]
    batch = collate_rollouts(rollouts, backend.encoder, backend.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, entropy = token_logprobs(backend.model, batch, cfg.temperature)
    mask = batch["loss_mask"].bool()
    torch.testing.assert_close(logp[mask], batch["old_logprobs"][mask], atol=2e-3, rtol=0)
    assert bool((entropy[mask] >= 0).all())


def test_deepeyes_reward_is_a_config(suite: Path, taught: Path, tmp_path: Path) -> None:
    backend = TransformersBackend.from_pretrained(taught)
    cfg = _cfg(suite, taught, tmp_path, reward="deepeyes")
    item = load_items(suite)[0]
    (state, r), *_ = asyncio.run(_rollouts(backend, [item], cfg))
    text = response_text(state["conversation"], state["question_start"])
    w = RewardWeights.deepeyes()
    assert r.terms == verify(text, item["choices"], item["answer"], r.listens, w).terms
    # 0.8 accuracy + 0.2 format + 1.2 [listened and correct], as configured, not the paper's 0.5s.
    assert r.terms.format in (0.0, 0.2) and r.terms.accuracy in (0.0, 0.8) and r.terms.segment in (0.0, 1.2)
    assert r.terms.format == 0.2, "the taught model answers in format"


def _rollout(reward: float) -> Rollout:
    terms = RewardTerms(format=0, accuracy=0, segment=0, consistency=0)
    return Rollout(item_id="x", input_ids=[1], loss_mask=[1], old_logprobs=[0.0], audios=[], reward=reward,
                   terms=terms, correct=False, listens=0)  # fmt: skip


def test_group_advantages_and_loss_pieces() -> None:
    groups = [[_rollout(1.5), _rollout(0.5)], [_rollout(1.0), _rollout(1.0)]]
    group_advantages(groups)
    assert [r.advantage for r in groups[0]] == pytest.approx([1.0, -1.0], abs=1e-4)
    assert [r.advantage for r in groups[1]] == [0.0, 0.0]  # a tied group teaches nothing
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    assert float(low_var_kl(logp, logp).abs().max()) == 0.0
    assert float(low_var_kl(logp, logp - 0.5).min()) > 0.0
    batch = {"loss_mask": torch.tensor([[0.0, 1.0, 1.0]]), "old_logprobs": torch.tensor([[0.0, -1.0, -2.0]]),
             "advantages": torch.tensor([1.0])}  # fmt: skip
    loss, stats = grpo_loss(logp, batch, 0.2, 0.0, None)
    assert float(loss) == pytest.approx(-1.0) and stats["clipped"] == 0.0  # ratio 1, advantage 1
    # A ratio past 1 + clip earns no more than the clipped surrogate.
    loss_hi, stats_hi = grpo_loss(logp + 1.0, batch, 0.2, 0.0, None)
    assert float(loss_hi) == pytest.approx(-1.2) and stats_hi["clipped"] == 1.0


def test_grpo_steps_on_echo_tiny_log_and_resume(suite: Path, taught: Path, tmp_path: Path) -> None:
    cfg = _cfg(suite, taught, tmp_path / "run", val=suite, eval_every=2, eval_items=2)
    final = train(cfg)
    assert (final / "config.json").is_file()
    rows = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "accuracy", "listens_per_answer", "reward_format", "reward_segment", "step_s"):
        assert key in rows[0]
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
    groups = asyncio.run(collect_groups(backend, load_items(suite)[:2], cfg, seed=7))
    assert [len(g) for g in groups] == [4, 4]
    assert all(r.item_id == g[0].item_id for g in groups for r in g) and groups[0][0].item_id != groups[1][0].item_id
    rollouts = [r for g in groups for r in g]
    batch = collate_rollouts(rollouts, backend.encoder, backend.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs(backend.model, batch, cfg.temperature)
    mask = batch["loss_mask"].bool()
    torch.testing.assert_close(logp[mask], batch["old_logprobs"][mask], atol=2e-3, rtol=0)


def test_too_few_items_or_a_group_of_one_is_a_clear_error(suite: Path, taught: Path, tmp_path: Path) -> None:
    from echo_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="items_per_step"):
        train(_cfg(suite, taught, tmp_path / "a", items_per_step=99))
    with pytest.raises(ConfigError, match="group_size"):
        train(_cfg(suite, taught, tmp_path / "b", group_size=1))
    # `categories` filters the training items first: 2 of the 4 are count items, none is a pitch item.
    with pytest.raises(ConfigError, match=r"1\.\.2 \(the training items\)"):
        train(_cfg(suite, taught, tmp_path / "c", items_per_step=3, categories=["count"]))
    with pytest.raises(ConfigError, match=r"1\.\.0 \(the training items\)"):
        train(_cfg(suite, taught, tmp_path / "d", items_per_step=1, categories=["pitch"]))

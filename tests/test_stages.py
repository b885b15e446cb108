"""The recipe's stages on echo-tiny 2 (issue 16), as short REAL training runs on a tiny real suite.

The suite is rendered here from the installed Debian packages: three single items (one per domain), a three-turn
thread (its later turns on a second clip, as a `/load` would) and an open question. The model is echo-tiny 2 at
tiny decoder sizes: the real frozen Whisper tiny.en encoder, a small projector and decoder. Frozen-encoder frames
go through one disk cache shared by every stage of this module (`training/features.py`).

- the disk cache: a fresh model reads frames from disk instead of running the encoder, bit for bit the same;
- stage 0 (`base_lm`): questions about spans of clips at every layout, labels on the answers only, loss falls on
  its own batch, and a run logs validation and saves a loadable echo-tiny 2;
- stage 1 (`sft`): a thread turn's example is exactly the conversation the runtime's thread holds at that turn;
  interleaved and grounded runs (thread and open question included) lower the loss, and the saved model answers
  through the real graph, thread turns in one graph thread;
- stage 2 (`grpo`): two real GRPO steps on the same file (threads rolled out whole, open questions judged with
  their `answer_kind`) write a checkpoint.

`ReplayBackend` below is a TEST DOUBLE, labelled as such: it replays gold traces through the real agent graph.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from doubles import ScriptedBackend
from langgraph.checkpoint.memory import InMemorySaver

from echo_agent.agent import EchoAgent
from echo_agent.audio import AudioStore
from echo_agent.backends.base import Generation
from echo_agent.backends.transformers import PromptEncoder, TransformersBackend
from echo_agent.benchmarks import BenchItem
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.echo_tiny import EchoTinySizes, new_echo_tiny
from echo_agent.graphs import steps as graph_steps
from echo_agent.graphs.runner import batched, jobs, run_all
from echo_agent.protocols import SEG_CLOSE, SEG_RE
from echo_agent.training import base_lm, grpo, sft
from echo_agent.training.common import collate, conversation_units, load_items, thread_history, train_step
from echo_agent.training.features import DiskFrameCache, attach_feature_cache, feature_cache_dir
from echo_agent.training.suite.write import SplitSpec, write_split

# echo-tiny 2 with a decoder small enough for a test: the real Whisper encoder, a 64-wide projector and decoder.
TINY2: dict[str, Any] = {"vocab_size": 400, "hidden_size": 64, "layers": 2, "intermediate_size": 128,
                         "audio_hidden_size": 64, "audio_tokens": 8, "audio_time_tokens": 4}  # fmt: skip
WHISPER: Final = "whisper-tiny.en"


def log_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.json: one single item per domain, a three-turn thread and an open question, over real renders."""
    out = tmp_path_factory.mktemp("suite")
    parts = [
        ("single", {"categories": ("number_between", "instrument_at", "identify")}, 3),
        ("thread", {"thread_share": 1.0, "categories": ("count",)}, 1),
        ("open", {"open_share": 1.0, "categories": ("digit_at",)}, 1),
    ]
    records: list[dict[str, Any]] = []
    for name, kw, n in parts:
        spec = SplitSpec(name=name, sources="train", phrasing="train", **kw)
        records += json.loads(write_split(out, spec, n, seed=5, progress=False).read_text())
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def items(suite: Path) -> list[BenchItem]:
    got = load_items(suite)
    assert {it.record["task"] for it in got} == {"speech", "music", "sound"}
    assert any(it.thread is not None and it.turn == 2 for it in got) and any(not it.choices for it in got)
    return got


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frame cache for every stage of the module: what a recipe gets from `$ECHO_FEATURE_CACHE`."""
    return tmp_path_factory.mktemp("frames")


def sizes() -> EchoTinySizes:
    return EchoTinySizes(**TINY2)


# ---- the disk cache of frozen-encoder frames -----------------------------------------------------------


def test_a_fresh_model_reads_frames_from_disk_bit_for_bit(items: list[BenchItem], tmp_path: Path) -> None:
    corpus = [it.question for it in items]
    store = AudioStore()
    ref = store.load(items[0].audio)
    clip, part = store.waveform(ref, 16000), store.slice(ref, 2.0, 5.5, 16000)

    def encode(model: Any, processor: Any) -> torch.Tensor:
        feats = processor.feature_extractor([clip, part], sampling_rate=16000)
        with torch.no_grad():
            out: torch.Tensor = model.eval().audio_embeddings(feats["input_features"], feats["attention_mask"])
        return out

    model_a, processor = new_echo_tiny(sizes(), corpus, 0, audio_encoder=WHISPER)
    cache_a = attach_feature_cache(model_a, tmp_path)
    assert isinstance(cache_a, DiskFrameCache)
    out_a = encode(model_a, processor)
    assert (cache_a.misses, cache_a.disk_hits, cache_a.writes) == (2, 0, 2)
    files = sorted(cache_a.root.rglob("*.npy"))
    assert len(files) == 2 and cache_a.root.parent == tmp_path
    assert all(np.load(f).dtype == np.float16 for f in files)
    assert {np.load(f).shape for f in files} == {((len(x) // 160 + 1) // 2, 384) for x in (clip, part)}

    model_b, _ = new_echo_tiny(sizes(), corpus, 0, audio_encoder=WHISPER)  # same weights, an empty memory
    cache_b = attach_feature_cache(model_b, tmp_path)
    assert cache_b is not None
    out_b = encode(model_b, processor)
    assert (cache_b.misses, cache_b.disk_hits, cache_b.writes) == (0, 2, 0)  # the encoder never ran
    assert torch.equal(out_a, out_b)

    files[0].write_bytes(b"not a numpy file")  # a damaged entry is recomputed and rewritten, never trusted
    model_c, _ = new_echo_tiny(sizes(), corpus, 0, audio_encoder=WHISPER)
    cache_c = attach_feature_cache(model_c, tmp_path)
    assert cache_c is not None
    assert torch.equal(encode(model_c, processor), out_a)
    assert (cache_c.misses, cache_c.disk_hits, cache_c.writes) == (1, 1, 1)
    assert np.load(files[0]).dtype == np.float16

    conv, _ = new_echo_tiny(sizes(), corpus, 0)  # echo-tiny's encoder trains: nothing to cache
    assert attach_feature_cache(conv, tmp_path) is None


def test_where_the_frames_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHO_FEATURE_CACHE", raising=False)
    assert feature_cache_dir("auto", tmp_path) == tmp_path / "features"
    assert feature_cache_dir("off", tmp_path) is None
    assert feature_cache_dir(str(tmp_path / "mine"), tmp_path) == tmp_path / "mine"
    monkeypatch.setenv("ECHO_FEATURE_CACHE", str(tmp_path / "shared"))
    assert feature_cache_dir("auto", tmp_path) == tmp_path / "shared"


# ---- stage 0: a base audio LM ------------------------------------------------------------------------


def base_cfg(suite: Path, out: Path, frames: Path, **kw: Any) -> base_lm.BaseLMConfig:
    defaults: dict[str, Any] = {"batch_size": 6, "lr": 3e-3, "warmup": 2, "log_every": 1, "save_every": 100,
                                "eval_examples": 12, "feature_cache": str(frames)}  # fmt: skip
    return base_lm.BaseLMConfig(train=suite, out=out, init="new", audio_encoder=WHISPER, **{**TINY2, **defaults, **kw})


def test_stage0_questions_cover_every_layout_with_labels_on_the_answer_only(
    suite: Path, items: list[BenchItem], tmp_path: Path, frames: Path
) -> None:
    cfg = base_cfg(suite, tmp_path, frames)
    _model, processor = new_echo_tiny(sizes(), base_lm.corpus(items, cfg), 0, audio_encoder=WHISPER)
    encoder, store = PromptEncoder(processor), AudioStore()
    tok = processor.tokenizer
    rng = random.Random(3)
    tasks = [base_lm.make_task(rng.choice(items), rng, cfg, items) for _ in range(120)]
    seen_tasks = {t.name for t in tasks}
    assert {"events", "transcribe", "instruments", "count", "when"} <= seen_tasks
    layouts = set()
    for task in tasks[:40]:
        ex = base_lm.encode_task(task, encoder, store)
        answer_ids = [t for t in ex.labels if t != -100]
        assert tok.decode(answer_ids) == task.answer + "<|im_end|>"
        n_audio = sum(p["type"] == "audio" for m in task.messages for p in m["content"])
        assert len(ex.audios) == n_audio == ex.input_ids.count(tok.convert_tokens_to_ids("<|audio_bos|>"))
        roles = [m["role"] for m in task.messages]
        audio_roles = {m["role"] for m in task.messages if any(p["type"] == "audio" for p in m["content"])}
        layouts.add((tuple(roles), tuple(sorted(audio_roles)), n_audio))
    assert len(layouts) >= 4  # user-turn, system-turn, after an exchange, two recordings...
    again = random.Random(3)
    assert base_lm.make_task(again.choice(items), again, cfg, items) == tasks[0]  # reproducible from its seed
    # Spans come from each clip's fixed pool, which holds its trace's listens: frames are computed once per span.
    for it in items:
        pool = base_lm.span_pool(it, cfg)
        assert pool == base_lm.span_pool(it, cfg) and len(pool) <= cfg.span_pool + it.record["trace"].count("<seg>")
        assert all(0 <= a < b <= it.record["duration"] for a, b in pool)
    heard = [(p["start"], p["end"]) for t in tasks for p in t.messages[-2]["content"] if p["type"] == "audio"]
    pools = {span for it in items for span in base_lm.span_pool(it, cfg)}
    assert all(span in pools for span in heard if span != (None, None))
    gold = [(it, (float(a), float(b))) for it in items for _, a, b in SEG_RE.findall(it.record["trace"])]
    in_pool = [span in base_lm.span_pool(it, cfg) for it, span in gold]
    assert sum(in_pool) >= len(gold) // 2, gold  # the gold listens that cut no event near its middle


def test_stage0_answers_come_from_the_events(items: list[BenchItem], tmp_path: Path, frames: Path) -> None:
    """The ground truth of a whole-clip question, read straight from the record's events."""
    cfg = base_cfg(Path("x"), tmp_path, frames, whole_clip_share=1.0)
    speech = next(it for it in items if it.record["task"] == "speech" and it.thread is None)
    events = speech.record["events"]
    assert base_lm.heard_events(events, 0.0, speech.record["duration"]) == sorted(events, key=lambda e: e["onset"])
    rng = random.Random(0)
    for _ in range(60):
        task = base_lm.make_task(speech, rng, cfg)
        if task.name == "transcribe":
            assert task.answer == ", ".join(e["text"] for e in sorted(events, key=lambda e: e["onset"]))
        if task.name == "voices":
            assert task.answer == str(len({e["voice"] for e in events if e["kind"] == "speech"}))
        if task.name == "count":
            asked = " ".join(p["text"] for m in task.messages[:-1] for p in m["content"] if p["type"] == "text")
            word = asked.split('"')[1]
            assert task.answer == str(sum(e["text"] == word for e in events))


def test_stage0_loss_falls_on_its_own_batch(suite: Path, items: list[BenchItem], tmp_path: Path, frames: Path) -> None:
    cfg = base_cfg(suite, tmp_path, frames)
    model, processor = new_echo_tiny(sizes(), base_lm.corpus(items, cfg), 0, audio_encoder=WHISPER)
    attach_feature_cache(model, frames)
    encoder, store = PromptEncoder(processor), AudioStore()
    rng = random.Random(1)
    batch = collate([base_lm.encode_task(base_lm.make_task(it, rng, cfg, items), encoder, store) for it in items],
                    encoder, processor.tokenizer.pad_token_id)  # fmt: skip
    accelerator = Accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    losses = [train_step(model, optimizer, accelerator, params, batch, 3e-3, 1.0) for _ in range(40)]
    assert losses[-1] < 0.4 * losses[0], losses


@pytest.fixture(scope="module")
def base_run(suite: Path, tmp_path_factory: pytest.TempPathFactory, frames: Path) -> Path:
    out = tmp_path_factory.mktemp("base")
    return base_lm.train(base_cfg(suite, out, frames, steps=4, val=suite, eval_every=4))


def test_stage0_run_validates_and_saves_echo_tiny_2(base_run: Path) -> None:
    records = log_records(base_run.parent)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    assert 0 < last["val_loss"] < 20 and 0 <= last["val_exact"] <= 1 and last["val_n"] == 12
    assert last["examples_per_s"] > 0 and last["frames_encoded"] + last["frames_disk_hits"] > 0
    backend = TransformersBackend.from_pretrained(base_run)
    assert backend.model.config.audio_encoder == WHISPER
    assert backend.model.config.text_config.hidden_size == TINY2["hidden_size"]


# ---- stage 1: SFT on the suite -------------------------------------------------------------------------


class ReplayBackend(ScriptedBackend):
    """TEST DOUBLE: answers each model call with the next piece of the gold traces (cut at `</seg>`), so the real
    graph, its listen tool and the runner's threads build the conversation the runtime would hold."""

    def __init__(self, traces: list[str]) -> None:
        script: list[Generation] = []
        for trace in traces:
            *listens, end = trace.split(SEG_CLOSE)
            script += [Generation(text=p + SEG_CLOSE, finish_reason="stop", stop_string=SEG_CLOSE) for p in listens]
            script.append(Generation(text=end, finish_reason="eos"))
        super().__init__(script)


async def test_a_thread_turn_trains_on_exactly_the_runtimes_conversation(items: list[BenchItem]) -> None:
    thread = next(u for u in conversation_units(items) if len(u) == 3)
    backend = ReplayBackend([it.record["trace"] for it in thread])
    agent = EchoAgent(backend, checkpointer=InMemorySaver())
    outcomes = await run_all(agent, jobs(thread))
    history = thread_history(items)
    store = AudioStore()
    for item, outcome in zip(thread, outcomes, strict=True):
        assert outcome.state is not None and outcome.state["verdict"]["correct"]
        messages, _resolver = sft.trace_messages(item, store, "interleaved", history=history[item.id])
        assert messages == outcome.state["conversation"]
    # The last turn's example: every turn is context, the loss covers the last assistant turn only.
    processor = new_echo_tiny(sizes(), [it.record["trace"] for it in items], 0, audio_encoder=WHISPER)[1]
    last = thread[-1]
    ex = sft.encode_example(last, PromptEncoder(processor), store, "interleaved", history[last.id])
    assert processor.tokenizer.decode([t for t in ex.labels if t != -100]) == last.record["trace"] + "<|im_end|>"
    # clip 1 whole, its listen, clip 2 whole (loaded at turn 1), then one listen in each later turn
    assert len(ex.audios) == 5
    assert len({it.audio for it in thread}) == 2


def sft_cfg(suite: Path, out: Path, init: str, frames: Path, mode: str, **kw: Any) -> sft.SFTConfig:
    defaults: dict[str, Any] = {"batch_size": 7, "lr": 1e-2, "warmup": 3, "log_every": 1, "save_every": 1000,
                                "feature_cache": str(frames), "audio_encoder": WHISPER, **TINY2}  # fmt: skip
    return sft.SFTConfig(train=suite, out=out, init=init, audio_mode=mode, **{**defaults, **kw})


def test_stage0s_model_is_the_init_of_stage1(suite: Path, base_run: Path, tmp_path: Path, frames: Path) -> None:
    final = sft.train(sft_cfg(suite, tmp_path, str(base_run), frames, "interleaved", steps=3, lr=3e-3))
    assert all(np.isfinite(r["loss"]) for r in log_records(tmp_path))
    before, after = TransformersBackend.from_pretrained(base_run), TransformersBackend.from_pretrained(final)
    assert after.processor.tokenizer.get_vocab() == before.processor.tokenizer.get_vocab()
    assert after.model.config.audio_encoder == WHISPER
    assert not torch.equal(after.model.audio_encoder.in_proj.weight, before.model.audio_encoder.in_proj.weight)


SFT_STEPS = 100


@pytest.fixture(scope="module")
def sft_runs(suite: Path, tmp_path_factory: pytest.TempPathFactory, frames: Path) -> dict[str, Path]:
    """Interleaved and grounded SFT of a new echo-tiny 2, long enough to memorise the seven traces (a tiny decoder
    needs that from scratch: after a stage 0 this short a run learns them less well, see the report of issue 16).
    Sixty steps left the loss at 0.28 and still falling, and the interleaved model wrote no readable <seg> span."""
    return {mode: sft.train(sft_cfg(suite, tmp_path_factory.mktemp(mode), "new", frames, mode, steps=SFT_STEPS))
            for mode in ("interleaved", "grounded")}  # fmt: skip


@pytest.mark.parametrize("mode", ["interleaved", "grounded"])
def test_stage1_sft_learns_the_suite_and_answers_threads_through_the_graph(
    mode: str, sft_runs: dict[str, Path], items: list[BenchItem]
) -> None:
    final = sft_runs[mode]
    losses = [r["loss"] for r in log_records(final.parent)]
    assert len(losses) == SFT_STEPS and all(np.isfinite(losses))
    print("LOSSES", [round(x, 2) for x in losses])
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    backend = TransformersBackend.from_pretrained(final)
    assert backend.model.config.audio_encoder == WHISPER
    config = AgentConfig(sampling=SamplingParams(max_new_tokens=120), mode=mode)
    agent = EchoAgent(batched(backend), config=config, checkpointer=InMemorySaver())
    outcomes = asyncio.run(run_all(agent, jobs(items), concurrency=8))
    states = [o.state for o in outcomes]
    assert all(s is not None for s in states), [o.error for o in outcomes]
    answered = [s for s in states if s is not None and s["status"] == "answered"]
    # A hundred steps teach the format, not every answer: most runs end in a parsed <answer>, some correct.
    print(mode, "answered", len(answered), "correct", sum(bool(s["verdict"]["correct"]) for s in answered))
    assert len(answered) >= 2, [s["reasoning"] for s in states if s is not None]
    assert all(s["generated_tokens"] > 0 for s in states if s is not None)
    follow_ups = [s for o, s in zip(outcomes, states, strict=True) if o.job.item.turn > 0 and s is not None]
    assert len(follow_ups) == 2 and all(len(s["conversation"]) >= 4 for s in follow_ups)  # earlier turns in context
    if mode == "interleaved":
        listened = [c for s in states if s is not None for c in s["listens"] if c["valid"]]
        assert listened  # it re-listens, and the graph inserts the slice
        assert any(p["type"] == "audio" and p["start"] is not None for s in states if s is not None
                   for m in s["conversation"] if m["role"] == "assistant" for p in m["content"])  # fmt: skip


# ---- stage 2: GRPO on the suite ------------------------------------------------------------------------


def test_stage2_grpo_rolls_out_threads_judges_open_answers_and_checkpoints(
    suite: Path, sft_runs: dict[str, Path], items: list[BenchItem], tmp_path: Path, frames: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    kinds: list[tuple[str | None, str | None]] = []
    real_verify = graph_steps.verify

    def recording_verify(*args: Any, **kwargs: Any) -> Any:
        kinds.append((args[2], args[5] if len(args) > 5 else kwargs.get("answer_kind")))
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(graph_steps, "verify", recording_verify)
    cfg = grpo.GRPOConfig(train=suite, out=tmp_path / "grpo", init=str(sft_runs["interleaved"]), items_per_step=5,
                          group_size=2, steps=2, max_new_tokens=120, lr=1e-3, save_every=1, eval_every=100,
                          feature_cache=str(frames))  # fmt: skip
    final = grpo.train(cfg)
    records = log_records(cfg.out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout_errors"] == 0 for r in records)
    state = torch.load(cfg.out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and (final / "config.json").is_file()
    assert TransformersBackend.from_pretrained(final).model.config.audio_encoder == WHISPER
    # Every rollout of every turn was judged (7 items x 2 samples x 2 steps), the open one's with its answer kind.
    open_item = next(it for it in items if not it.choices)
    assert open_item.answer_kind == "number"
    assert Counter(kind for _, kind in kinds) == {None: 24, "number": 4}
    assert all(gold == open_item.answer for gold, kind in kinds if kind == "number")


def test_loss_mask_of_a_grpo_thread_turn_is_its_own_answer(sft_runs: dict[str, Path], items: list[BenchItem]) -> None:
    """A follow-up turn's trajectory: the earlier turns are prompt (no loss), the turn's sampled tokens are all
    trainable and their recomputed log-probs are the sampled ones."""
    from echo_agent.training.trajectory import model_inputs, sequence_logprobs

    backend = TransformersBackend.from_pretrained(sft_runs["interleaved"])
    cfg = grpo.GRPOConfig(train=Path("x"), out=Path("y"), init="z", max_new_tokens=120)
    thread = next(u for u in conversation_units(items) if len(u) == 3)
    agent = EchoAgent(batched(backend, 4), config=cfg.agent_config(), checkpointer=InMemorySaver())
    groups = asyncio.run(grpo.rollout_groups(agent, backend.encoder, thread, 2, seed=7))
    follow = [t for t in groups[2] if t.status != "error"]
    assert follow and all(sum(t.response_mask) == t.generated_tokens for t in follow)
    assert all(len(t.prompt_ids) > len(groups[0][0].prompt_ids) for t in follow)  # turns 0 and 1 in its prompt
    inputs = model_inputs(follow, backend.encoder, agent.store)
    logp, _ = sequence_logprobs(backend.model.eval(), inputs, cfg.temperature)
    mask = inputs["loss_mask"].bool()
    assert torch.allclose(logp[mask], inputs["old_logprobs"][mask], atol=2e-3)


def test_length_buckets_regroup_an_epoch_without_losing_or_repeating_an_item(items: list[BenchItem]) -> None:
    processor = new_echo_tiny(sizes(), [it.record["trace"] for it in items], 0, audio_encoder=WHISPER)[1]
    encoder, pad = PromptEncoder(processor), processor.tokenizer.pad_token_id
    plain = sft.batches(items, encoder, "grounded", 2, 0, pad)
    bucketed = sft.batches(items, encoder, "grounded", 2, 0, pad, length_buckets=3)
    epoch = [next(bucketed)[0]["input_ids"] for _ in range(3)]  # 7 items: three batches of two, one left over
    rows = [tuple(r[r != pad].tolist()) for b in epoch for r in b]
    assert len(set(rows)) == 6
    widths = [b.shape[1] for b in epoch]
    plain_widths = [next(plain)[0]["input_ids"].shape[1] for _ in range(3)]
    assert sum(widths) <= sum(plain_widths)  # sorted within the run of batches: less padding

"""Supervised fine-tuning on Echo tool-call traces, in one file you can read top to bottom.

Each example is a question about a clip and its gold reasoning trace in the seg-tag protocol. The trace is
teacher-forced through the graph's own steps (`echo_agent.graphs.steps`): the question turn is opened as the
graph opens it, the trace is absorbed piece by piece as if the model had written it, and in `interleaved` mode
each `</seg>` is answered by the same listen step the runtime runs (the same `ListenTool` decides the effective
span and inserts the slice or a note). In `grounded` mode (the paper's stage-1 cold start) the tags stay in the
text and no audio is inserted. In `text` mode (the paper's text-only baseline) every
"I listen to A-B s: <seg>A, B</seg>" is dropped from the trace: plain reasoning about the one hearing. The
`PromptEncoder` lays out the tokens as inference does, and the loss covers only the tokens the model writes:
the prompt, inserted audio placeholders and notes are masked (design §6).

Threads (the suite's multi-turn conversations): each turn is one example. Its earlier turns are replayed first,
through the same steps in the same graph state, with their gold traces as the assistant's answers, exactly as the
runtime's thread would hold them (the clip heard once, each turn's re-listens inserted in its own answer); the
loss covers the last turn only, the one being answered, so every example has the layout of a real model call and
every turn is trained once, in its own context. Open questions (no choices) train like any other item.

echo-tiny 2 (`audio_encoder="whisper-tiny.en"`) hears through a frozen Whisper encoder whose frames are kept on
disk (`training/features.py`, `feature_cache`), so later epochs do not run the encoder again.

    echo-agent train sft --train data/train.json --val data/val.json --out runs/sft

Runs unchanged under `accelerate launch` on several GPUs. Checkpoints to OUT/checkpoint and resumes from it;
logs loss, throughput and validation accuracy to OUT/log.jsonl.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, Generation, GenerationRequest
from ..backends.transformers import PromptEncoder
from ..benchmarks import BenchItem
from ..chat import next_clip_name
from ..config import AudioMode, ListenLimits
from ..echo_tiny import EchoTinySizes
from ..echo_tiny.configuration import AudioEncoderKind
from ..graphs import steps
from ..graphs.state import new_question
from ..messages import Message
from ..protocols import SEG_CLOSE, SegTagProtocol
from ..tools.listen import ListenTool
from .common import (
    Example,
    RankLog,
    RunFolder,
    TrainableSettings,
    checkpoint,
    collate,
    digest,
    finish,
    load_items,
    load_model,
    lr_at,
    prepare_training,
    thread_history,
    train_step,
    validation_accuracy,
)
from .features import attach_feature_cache, feature_cache_dir, feature_cache_stats

__all__ = [
    "Example",
    "SFTConfig",
    "batches",
    "collate",
    "encode_example",
    "text_only_trace",
    "trace_messages",
    "train",
    "train_step",
]

_LISTEN_PHRASE = re.compile(r"\s*I listen to [^:<]*:\s*<seg>[^<]*</seg>")


def text_only_trace(trace: str) -> str:
    """The trace with its listens removed (the `text` variant's target)."""
    return _LISTEN_PHRASE.sub("", trace)


class SFTConfig(EchoTinySizes, TrainableSettings):
    """Everything a run depends on. Saved next to the checkpoints. The sizes and `audio_encoder` apply when init is
    "new" (or "echo-tiny"): a fresh model."""

    train: list[Path] = Field(description="training suites (MMAU JSON with gold traces), concatenated", min_length=1)
    val: Path | None = None
    out: Path
    init: str = Field("echo-tiny", description="'new' (or 'echo-tiny') for a new model, or a model directory")
    audio_encoder: AudioEncoderKind = Field(
        "conv", description="a new model's audio side: 'conv' (echo-tiny) or 'whisper-tiny.en' (echo-tiny 2)"
    )
    feature_cache: str = Field(
        "auto", description="frozen-encoder frames on disk: 'auto' ($ECHO_FEATURE_CACHE, else OUT/features), "
        "'off', or a folder",
    )  # fmt: skip
    audio_mode: AudioMode = "interleaved"
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup: int = Field(100, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    log_every: int = Field(20, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_items: int = Field(120, ge=0)
    save_every: int = Field(250, ge=1)
    seed: int = 0
    max_examples: int | None = Field(None, ge=1)
    length_buckets: int = Field(
        1, ge=1, description="regroup each run of this many batches by length (less padding); 1: plain shuffle"
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v


# ---- data: gold traces -> token ids, loss mask and audio ---------------------------------------


def trace_messages(
    item: BenchItem,
    store: AudioStore,
    mode: AudioMode,
    limits: ListenLimits | None = None,
    history: Sequence[BenchItem] = (),
) -> tuple[list[Message], AudioResolver]:
    """The conversation up to the gold assistant turn of `item`, built by the graph's own steps with the traces as
    the output. `history`: the earlier turns of its thread, replayed first in the same state, as the runtime's
    thread holds them (clips named as the runner names them: the first distinct audio "main", then "clip2"...)."""
    protocol, tool = SegTagProtocol(), ListenTool(limits)
    state: dict[str, Any] = steps.initial_state({"clips": {}})
    names: dict[str, str] = {}  # audio sha256 -> clip id
    refs: dict[str, AudioRef] = {}
    for turn in [*history, item]:
        ref = store.load(turn.audio)
        clip = names.setdefault(ref.sha256, next_clip_name(names.values()))
        refs[clip] = ref
        active = clip if item.thread is not None else None  # the runner's rule for thread turns
        question = new_question(turn.question, {clip: ref.model_dump()}, turn.choices, active_clip=active)
        state.update({**question, "clips": {**state["clips"], **question["clips"]}})  # clips merge, as in the graph
        state.update(steps.open_question(state))
        _absorb_trace(state, turn.record["trace"], mode, protocol, tool)
    return state["conversation"], AudioResolver(store, refs)


def _absorb_trace(
    state: dict[str, Any], trace: str, mode: AudioMode, protocol: SegTagProtocol, tool: ListenTool
) -> None:
    """Teacher-force one gold trace into `state` as the model's output: cut at every `</seg>` and answered by the
    listen step in interleaved mode; whole (tags as text) in grounded mode; without its listens in text mode."""
    if mode == "text":
        trace = text_only_trace(trace)
    pieces = trace.split(SEG_CLOSE) if mode == "interleaved" else [trace]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if last and not piece:
            break
        gen = Generation(
            text=piece if last else piece + SEG_CLOSE,
            finish_reason="eos" if last else "stop",
            stop_string=None if last else SEG_CLOSE,
        )
        state.update(steps.absorb_generation(state, gen, protocol))
        if state["pending"]:
            update, _ = steps.apply_listens(state, tool, protocol)
            state.update(update)


def encode_example(
    item: BenchItem, encoder: PromptEncoder, store: AudioStore, mode: AudioMode, history: Sequence[BenchItem] = ()
) -> Example:
    """Token ids, labels (the last assistant turn's model-written tokens and the closing `<|im_end|>`) and audio of
    one item, after the earlier turns of its thread (`history`) when it has any."""
    messages, resolver = trace_messages(item, store, mode, history=history)
    enc = encoder.encode(GenerationRequest(messages=messages, continue_final=True), resolver)
    eos = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*enc.input_ids, eos]
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask, strict=True)] + [eos]
    return Example(input_ids=ids, labels=labels, audios=list(enc.audios))


def batches(
    items: list[BenchItem],
    encoder: PromptEncoder,
    mode: AudioMode,
    batch_size: int,
    seed: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
    length_buckets: int = 1,
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Endless shuffled batches (epoch after epoch); yields (batch, token count). Under several
    processes (`accelerate launch`) every rank shuffles alike and takes every `world`-th batch. A thread turn is
    one example with its earlier turns (from `items`) as context. `length_buckets` > 1: each run of that many
    batches of the shuffled order is regrouped by length (then the batches shuffled again), so a batch pads less."""
    if not 0 < batch_size * world <= len(items):  # else the loop below would spin forever without yielding
        raise ValueError(f"batch_size {batch_size} x {world} process(es) needs as many items; got {len(items)}")
    history = thread_history(items)
    store = AudioStore(max_cached=4 * batch_size)
    rng = random.Random(seed)
    # Text length (a thread turn's with its earlier turns) stands in for token length: known before encoding.
    size = [sum(len(t.question) + len(t.record.get("trace", "")) for t in [*history[it.id], it]) for it in items]
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        if length_buckets > 1:
            span = batch_size * length_buckets
            for k in range(0, len(order), span):
                chunk = sorted(order[k : k + span], key=lambda j: size[j])
                groups = [chunk[g : g + batch_size] for g in range(0, len(chunk), batch_size)]
                full = [g for g in groups if len(g) == batch_size]
                rng.shuffle(full)  # a short last group stays last: the epoch's leftover, as without buckets
                order[k : k + span] = [j for g in full + groups[len(full) :] for j in g]
        for start in range(rank * batch_size, len(order) - batch_size + 1, world * batch_size):
            exs = [encode_example(items[j], encoder, store, mode, history[items[j].id])
                   for j in order[start : start + batch_size]]  # fmt: skip
            yield collate(exs, encoder, pad_id), sum(len(e.input_ids) for e in exs)


# ---- the loop ----------------------------------------------------------------------------------


def train(cfg: SFTConfig, model: Any = None, processor: Any = None) -> Path:
    """Train; returns the directory of the final model (OUT/final)."""
    from accelerate import Accelerator

    from ..backends.transformers import TransformersBackend

    accelerator = Accelerator()
    run = RunFolder(cfg.out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = [it for path in cfg.train for it in load_items(path)][: cfg.max_examples]  # a prefix keeps whole turns
    val_items = load_items(cfg.val)[: cfg.eval_items] if cfg.val else []
    resume = run.resume()
    if resume and not cfg.lora:  # a LoRA checkpoint holds the adapter only: rebuild the base below
        backend = TransformersBackend.from_pretrained(run.checkpoint)
        model, processor = backend.model, backend.processor
    elif model is None:
        model, processor = load_model(cfg.init, cfg, items, cfg.seed, cfg.audio_encoder)
    attach_feature_cache(model, feature_cache_dir(cfg.feature_cache, cfg.out))
    model, optimizer, params = prepare_training(model.train(), cfg, accelerator, run, resume, lr=cfg.lr,
                                                weight_decay=cfg.weight_decay, betas=(0.9, 0.95))  # fmt: skip
    step = 0
    if resume:
        step = resume["step"]
        random.setstate(resume["python_rng"])
        torch.set_rng_state(resume["torch_rng"])
    run.write_config(cfg)
    encoder = PromptEncoder(processor)
    pad_id = processor.tokenizer.pad_token_id
    data = batches(
        items, encoder, cfg.audio_mode, cfg.batch_size, cfg.seed + step, pad_id,
        accelerator.process_index, accelerator.num_processes, cfg.length_buckets,
    )  # fmt: skip
    log, ranks = run.log(), RankLog(run, accelerator)
    tokens, examples, t0, losses = 0, 0, time.perf_counter(), []

    def lr(at: int) -> float:
        return lr_at(at, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)

    while step < cfg.steps:
        batch, n_tokens = next(data)
        losses.append(train_step(model, optimizer, accelerator, params, batch, lr(step), cfg.grad_clip))
        step += 1
        ranks.write({"step": step, "batch": digest(batch["input_ids"])})
        tokens += n_tokens
        examples += int(batch["input_ids"].shape[0])
        record: dict[str, Any] = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr(step), "tokens_per_s": tokens / elapsed,
                      "examples_per_s": examples / elapsed, **feature_cache_stats(model)}  # fmt: skip
            tokens, examples, t0, losses = 0, 0, time.perf_counter(), []
        # Validation and checkpoints run on rank 0 while the others wait at a barrier, so every rank takes the
        # same collective steps (the same optimizer steps, then the same barriers).
        if val_items and (step % cfg.eval_every == 0 or step == cfg.steps):
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model).eval()
                accuracy = validation_accuracy(TransformersBackend(unwrapped, processor), val_items, cfg.audio_mode)
                model.train()
                record = {"step": step, **record, "val_accuracy": accuracy, "val_n": float(len(val_items))}
            accelerator.wait_for_everyone()
        if record and accelerator.is_main_process:
            log.write(record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            state = {"optimizer": optimizer.state_dict(), "step": step, "python_rng": random.getstate(),
                     "torch_rng": torch.get_rng_state()}  # fmt: skip
            checkpoint(accelerator, model, processor, run, state)
    log.close()
    return finish(accelerator, model, processor, run, ranks, cfg.lora)

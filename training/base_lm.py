"""Stage 0: a base audio LM, in one file you can read top to bottom.

Before any Echo training, a pretrained audio LLM can already hear: asked about an audio input anywhere in its
context, it says what is in it. echo-tiny 2's Whisper encoder is pretrained but frozen, and its projector and
decoder start from scratch, so this stage teaches the decoder (and the projector) to read the audio tokens. It
needs no annotation beyond the suite's own: every clip comes with its `events` (exact ground truth on a known
timeline), so any span of it has exact answers.

Each example takes a training clip and a span of it (or the whole clip), and asks one question about that audio:

- ``events``: list the events with their times ("1.2-1.6 s: a woman says seven; 3.0-3.3 s: a snare hit");
- ``transcribe``: what is said, in order (speech);
- ``instruments``: which instruments play, in order of entry, and which drums (music);
- ``count``: how many times X is heard (a word, a drum, an instrument's notes, a sound), 0 included;
- ``when``: when X is first heard;
- ``voices``: how many different voices speak (speech);

each phrased several ways. The spans of a clip come from a fixed pool: the spans its gold trace listens to (the
very inputs stage 1 inserts) and a few random ones drawn once per clip, so the frozen encoder's frames of every
input are computed once and then read from the disk cache (`training/features.py`). Times are the audio input's
own (0 = its start), or the recording's when the prompt says where the excerpt starts. The audio goes at varying
places in the conversation: before or after the question in the user turn, between two pieces of text, in the
system turn, after an earlier exchange, or as one of two recordings. The conversation is laid out by the same
`PromptEncoder` as at inference, and the loss covers only the answer's tokens (and its closing `<|im_end|>`). An
event counts as heard in a span when at least half of it lies inside; no span cuts an event near its middle.

    echo-agent train base --train data/train.json --val data/dev.json --out runs/base --audio-encoder whisper-tiny.en

Validation scores a fixed set of dev examples: loss, token accuracy, and the share of answers that greedy decoding
reproduces exactly (every answer token the argmax under teacher forcing), by task. Checkpoints to OUT/checkpoint
and resumes from it; OUT/final is the `--init` of `train sft`. Runs under `accelerate launch` like SFT.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..audio import AudioRef, AudioStore
from ..backends.base import AudioResolver, GenerationRequest
from ..backends.transformers import PromptEncoder
from ..benchmarks import BenchItem
from ..echo_tiny import EchoTinySizes
from ..echo_tiny.configuration import AudioEncoderKind
from ..messages import Message, Part, audio_part, message, text_part
from ..protocols import SEG_RE
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
    train_step,
)
from .features import attach_feature_cache, feature_cache_dir, feature_cache_stats

__all__ = [
    "TASKS",
    "BaseLMConfig",
    "Task",
    "batches",
    "encode_task",
    "evaluate",
    "heard_events",
    "make_task",
    "span_pool",
    "train",
]

TaskName = Literal["events", "transcribe", "instruments", "count", "when", "voices"]
TASKS: tuple[TaskName, ...] = ("events", "transcribe", "instruments", "count", "when", "voices")


class BaseLMConfig(EchoTinySizes, TrainableSettings):
    """Everything a stage-0 run depends on. Saved next to the checkpoints. The sizes and `audio_encoder` apply when
    init is "new": a fresh model, its tokenizer trained on the training items and this stage's phrasings."""

    train: Path = Field(description="suite JSON whose records carry their `events`")
    val: Path | None = None
    out: Path
    init: str = Field("new", description="'new' for a new model, or a model directory to continue")
    audio_encoder: AudioEncoderKind = Field(
        "conv", description="a new model's audio side: 'conv' (echo-tiny) or 'whisper-tiny.en' (echo-tiny 2)"
    )
    feature_cache: str = Field(
        "auto", description="frozen-encoder frames on disk: 'auto' ($ECHO_FEATURE_CACHE, else OUT/features), "
        "'off', or a folder",
    )  # fmt: skip
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup: int = Field(100, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    whole_clip_share: float = Field(0.3, ge=0, le=1, description="share of examples that hear the whole clip")
    offset_share: float = Field(0.3, ge=0, le=1, description="share of span examples timed in the recording's time")
    max_span: float = Field(10.0, gt=0, description="longest span in seconds (shortest: 1 s)")
    max_listed: int = Field(8, ge=1, description="at most this many events in an `events` answer")
    span_pool: int = Field(
        8, ge=0, description="random spans drawn once per clip, beside its trace's listens (0: a new span each time)"
    )
    log_every: int = Field(20, ge=1)
    eval_every: int = Field(250, ge=1)
    eval_examples: int = Field(120, ge=0)
    save_every: int = Field(250, ge=1)
    seed: int = 0


# ---- what is heard in a span ------------------------------------------------------------------------


def _overlap(ev: dict[str, Any], start: float, end: float) -> float:
    """The share of an event's length that lies inside [start, end]."""
    onset, offset = float(ev["onset"]), float(ev["offset"])
    return max(0.0, min(end, offset) - max(start, onset)) / max(offset - onset, 1e-6)


def heard_events(events: Sequence[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The events at least half inside [start, end], in time order."""
    return sorted((ev for ev in events if _overlap(ev, start, end) >= 0.5), key=lambda ev: ev["onset"])


def _clean_cut(events: Sequence[dict[str, Any]], start: float, end: float) -> bool:
    """No event is cut near its middle (between 20% and 80% inside), where 'heard or not' would be a coin toss."""
    return all(not 0.2 < _overlap(ev, start, end) < 0.8 for ev in events)


NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DRUMS = {"kick": "a kick", "snare": "a snare hit", "hi-hat": "a hi-hat", "crash": "a crash"}


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def describe(ev: dict[str, Any]) -> str:
    """An event in a few words: "a woman says seven", "a flute note, A5", "a snare hit", "a low beep"."""
    kind = ev["kind"]
    if kind == "speech":
        who = {"female": "a woman", "male": "a man"}.get(ev.get("gender", ""), "a voice")
        return f"{who} says {ev['text']}"
    if kind == "note":
        pitch = int(ev["pitch"])
        return f"{_article(ev['instrument'])} note, {NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"
    if kind == "drum":
        return DRUMS.get(ev["drum"], _article(ev["drum"]))
    if kind == "beep" and ev.get("pitch"):
        return f"a {ev['pitch']} beep"
    if kind == "click" and ev.get("n_clicks"):
        return f"{ev['n_clicks']} clicks"
    return _article(kind)


def label(ev: dict[str, Any]) -> str:
    """What a count or when question names an event by: the word said, "snare hit", "flute note", "beep"."""
    kind = ev["kind"]
    if kind == "speech":
        return str(ev["text"])
    if kind == "note":
        return f"{ev['instrument']} note"
    if kind == "drum":
        return f"{ev['drum']} hit"
    return str(kind)


def _span_text(a: float, b: float) -> str:
    return f"{a:.1f}-{b:.1f} s"


# ---- one example: a question about a span of a clip -----------------------------------------------------

PHRASES: dict[TaskName, tuple[str, ...]] = {
    "events": (
        "List the sound events in this audio with their times.",
        "What happens in the recording, and when? Give each event's start and end.",
        "Write out every event you hear with its time span.",
        "Give a timeline of the audio.",
    ),
    "transcribe": (
        "Transcribe the speech.",
        "What words are spoken?",
        "Write down what is said, in order.",
        "What does the voice say?",
    ),
    "instruments": (
        "Which instruments play?",
        "What instruments can you hear, in order of entry?",
        "Name the instruments in this music.",
    ),
    "count": ("How many {xs} do you hear?", "Count the {xs}.", "How many {xs} are there?"),
    "when": (
        "When is the first {x} heard?",
        "At what time does the first {x} start and end?",
        "When do you hear {ax}?",
    ),
    "voices": ("How many different voices speak?", "How many speakers are there?", "Count the distinct voices."),
}
SPEECH_COUNT = ('How many times is "{x}" said?', 'Count how often you hear "{x}".', 'How often does someone say "{x}"?')
SPEECH_WHEN = ('When is "{x}" first said?', 'At what time do you hear "{x}"?')
OFFSET_NOTE = "This excerpt starts at {t:.1f} s of a longer recording; give times in the recording's time. "
SYSTEM_TEXTS = ("You are a helpful assistant that listens to audio.", "You can hear audio. Answer briefly.")
INTROS = ("Here is a recording.", "Listen to this.", "I have an audio clip for you.", "Please listen:")
SMALL_TALK = (
    ("Hi! Can you help me with some audio?", "Of course. Send it over."),
    ("I will play you something.", "Go ahead, I am listening."),
    ("Are you able to listen to sounds?", "Yes, I can hear audio you share."),
)
LAYOUTS = ("audio_first", "text_first", "middle", "system", "after_turn", "two_clips")


@dataclass
class Task:
    """One stage-0 question: the conversation (audio by clip id and span), the answer, and what task it is."""

    name: TaskName
    messages: list[Message]
    clips: dict[str, BenchItem]  # clip id -> the item whose audio it is
    answer: str


def _duration(item: BenchItem) -> float:
    return float(item.record["duration"])


def _random_span(item: BenchItem, rng: random.Random, cfg: BaseLMConfig) -> tuple[float, float] | None:
    """A span of the clip with at least one event if it can, cut cleanly. Tenth-second bounds, as seg tags have."""
    dur, events = _duration(item), item.record["events"]
    best: tuple[float, float] | None = None
    for _ in range(12):
        length = rng.uniform(1.0, min(cfg.max_span, dur))
        start = round(rng.uniform(0.0, dur - length), 1)
        end = round(min(dur, start + length), 1)
        if end - start < 0.5 or not _clean_cut(events, start, end):
            continue
        best = (start, end)
        if heard_events(events, start, end):
            break
    return best


def span_pool(item: BenchItem, cfg: BaseLMConfig) -> list[tuple[float, float]]:
    """The spans stage 0 hears of this clip: the ones its gold trace listens to (what stage 1 will insert), then
    `span_pool` random ones drawn once from (seed, item id). A fixed pool keeps the frozen encoder's work bounded:
    from the second epoch on, every input's frames come from the disk cache (and the trace's from stage 1's)."""
    dur, events = _duration(item), item.record["events"]
    spans = [(float(a), min(float(b), dur)) for _, a, b in SEG_RE.findall(item.record.get("trace", ""))]
    pool = [(a, b) for a, b in dict.fromkeys(spans) if b - a >= 0.5 and _clean_cut(events, a, b)]
    rng = random.Random(f"{cfg.seed}\x00{item.id}")
    for _ in range(cfg.span_pool):
        span = _random_span(item, rng, cfg)
        if span is not None and span not in pool:
            pool.append(span)
    return pool


def _draw_span(item: BenchItem, rng: random.Random, cfg: BaseLMConfig) -> tuple[float, float] | None:
    """A span of the clip (None: the whole clip): from its pool, or a fresh random one when `span_pool` is 0."""
    if rng.random() < cfg.whole_clip_share or _duration(item) <= 1.0:
        return None
    if cfg.span_pool == 0:
        return _random_span(item, rng, cfg)
    pool = span_pool(item, cfg)
    return rng.choice(pool) if pool else None


def _tasks_for(item: BenchItem, heard: Sequence[dict[str, Any]], cfg: BaseLMConfig) -> list[TaskName]:
    kinds = {ev["kind"] for ev in heard}
    names: list[TaskName] = ["count"] if item.record["events"] else []
    if len(heard) <= cfg.max_listed:
        names.append("events")
    if "speech" in kinds:
        names += ["transcribe", "voices"]
    if kinds & {"note", "drum"}:
        names.append("instruments")
    if heard:
        names.append("when")
    return names


def _answer(
    name: TaskName, item: BenchItem, heard: Sequence[dict[str, Any]], start: float, end: float, shift: float,
    rng: random.Random,
) -> tuple[str, str]:  # fmt: skip
    """(question, answer) of task `name` about the events `heard` in [start, end]; times are shifted by -`shift`."""
    speech = item.record.get("task") == "speech"

    def times(ev: dict[str, Any]) -> str:
        a, b = max(ev["onset"], start) - shift, min(ev["offset"], end) - shift
        return _span_text(a, b)

    if name == "events":
        text = "; ".join(f"{times(ev)}: {describe(ev)}" for ev in heard)
        return rng.choice(PHRASES["events"]), text or "nothing but the background"
    if name == "transcribe":
        return rng.choice(PHRASES["transcribe"]), ", ".join(ev["text"] for ev in heard if ev["kind"] == "speech")
    if name == "voices":
        return rng.choice(PHRASES["voices"]), str(len({ev.get("voice") for ev in heard if ev["kind"] == "speech"}))
    if name == "instruments":
        order = list(dict.fromkeys(ev["instrument"] for ev in heard if ev["kind"] == "note"))
        drums = list(dict.fromkeys(ev["drum"] for ev in heard if ev["kind"] == "drum"))
        parts = [", ".join(order)] if order else []
        if drums:
            parts.append(("drums: " if order else "drums only: ") + ", ".join(drums))
        return rng.choice(PHRASES["instruments"]), "; ".join(parts)
    # count and when name one label: mostly one heard here, sometimes one only heard elsewhere in the clip (0)
    here = list(dict.fromkeys(label(ev) for ev in heard))
    elsewhere = [x for x in dict.fromkeys(label(ev) for ev in item.record["events"]) if x not in here]
    x = rng.choice(elsewhere) if name == "count" and elsewhere and (not here or rng.random() < 0.2) else None
    x = x or rng.choice(here or elsewhere)
    if name == "count":
        template = rng.choice(SPEECH_COUNT if speech else PHRASES["count"])
        return template.format(x=x, xs=_plural(x)), str(sum(label(ev) == x for ev in heard))
    template = rng.choice(SPEECH_WHEN if speech else PHRASES["when"])
    first = next(ev for ev in heard if label(ev) == x)
    return template.format(x=x, ax=f"the {x}"), times(first)


def make_task(item: BenchItem, rng: random.Random, cfg: BaseLMConfig, others: Sequence[BenchItem] = ()) -> Task:
    """One random stage-0 question about `item`'s clip (a span of it, or the whole). `others`: clips a
    two-recording layout may take its second recording from (else another span of the same clip)."""
    span = _draw_span(item, rng, cfg)
    start, end = span if span is not None else (0.0, _duration(item))
    heard = heard_events(item.record["events"], start, end)
    name = rng.choice(_tasks_for(item, heard, cfg))
    offset = span is not None and name in ("events", "when") and rng.random() < cfg.offset_share
    shift = 0.0 if offset else start
    question, answer = _answer(name, item, heard, start, end, shift, rng)
    if offset:
        question = OFFSET_NOTE.format(t=start) + question
    target = audio_part("main", *(span or (None, None)))
    clips = {"main": item}
    layout = rng.choice(LAYOUTS)
    if layout == "two_clips":
        other = rng.choice(list(others)) if others else item
        clips["other"] = other
        distractor = audio_part("other", *(_draw_span(other, rng, cfg) or (None, None)))
        first = rng.random() < 0.5
        pair = [target, distractor] if first else [distractor, target]
        which = 1 if first else 2
        user: list[Part] = [text_part("Recording 1:"), pair[0], text_part(" Recording 2:"), pair[1],
                            text_part(f" About recording {which}: {question}")]  # fmt: skip
        messages = [message("user", *user)]
    elif layout == "audio_first":
        messages = [message("user", target, text_part(question))]
    elif layout == "text_first":
        messages = [message("user", text_part(question + " "), target)]
    elif layout == "middle":
        messages = [message("user", text_part(rng.choice(INTROS) + " "), target, text_part(" " + question))]
    elif layout == "system":
        messages = [message("system", text_part(rng.choice(SYSTEM_TEXTS) + " The recording: "), target),
                    message("user", text_part(question))]  # fmt: skip
    else:  # after_turn
        ask, reply = rng.choice(SMALL_TALK)
        messages = [message("user", text_part(ask)), message("assistant", text_part(reply, "model")),
                    message("user", target, text_part(question))]  # fmt: skip
    messages.append(message("assistant", text_part(answer, "model")))
    return Task(name=name, messages=messages, clips=clips, answer=answer)


def encode_task(task: Task, encoder: PromptEncoder, store: AudioStore) -> Example:
    """The task laid out by the inference `PromptEncoder`; labels on the answer's tokens and the closing
    `<|im_end|>` only (the earlier assistant text of an `after_turn` layout is context)."""
    refs: dict[str, AudioRef] = {cid: store.load(it.audio) for cid, it in task.clips.items()}
    enc = encoder.encode(GenerationRequest(messages=task.messages, continue_final=True), AudioResolver(store, refs))
    eos = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask, strict=True)] + [eos]
    return Example(input_ids=[*enc.input_ids, eos], labels=labels, audios=list(enc.audios))


def corpus(items: Sequence[BenchItem], cfg: BaseLMConfig, per_item: int = 2) -> list[str]:
    """Text for a new model's tokenizer: this stage's phrasings and answers over the items (no audio is read)."""
    rng = random.Random(cfg.seed)
    texts = [*SYSTEM_TEXTS, *INTROS, *(t for pair in SMALL_TALK for t in pair), OFFSET_NOTE]
    for it in items:
        for _ in range(per_item):
            task = make_task(it, rng, cfg)
            texts.append(" ".join(p["text"] for m in task.messages for p in m["content"] if p["type"] == "text"))
    return texts


def batches(
    items: list[BenchItem], encoder: PromptEncoder, cfg: BaseLMConfig, seed: int, pad_id: int,
    rank: int = 0, world: int = 1,
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:  # fmt: skip
    """Endless batches: epoch after epoch over the shuffled items, one fresh random task per item. Yields (batch,
    token count). Under several processes every rank shuffles alike and takes every `world`-th batch."""
    if not 0 < cfg.batch_size * world <= len(items):
        raise ValueError(f"batch_size {cfg.batch_size} x {world} process(es) needs as many items; got {len(items)}")
    store = AudioStore(max_cached=4 * cfg.batch_size)
    rng = random.Random(seed)
    size = cfg.batch_size
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            tasks = [make_task(items[j], rng, cfg, items) for j in order[start : start + size]]  # same on every rank
            if (start // size) % world != rank:
                continue
            exs = [encode_task(t, encoder, store) for t in tasks]
            yield collate(exs, encoder, pad_id), sum(len(e.input_ids) for e in exs)


# ---- validation ----------------------------------------------------------------------------------


def evaluate(model: Any, tasks: Sequence[Task], encoder: PromptEncoder, batch_size: int) -> dict[str, float]:
    """Teacher-forced loss and token accuracy over the answers, and `exact`: the share of answers whose every token
    is the argmax (what greedy decoding would write), overall and by task."""
    store = AudioStore(max_cached=64)
    pad_id = encoder.tokenizer.pad_token_id
    device = next(model.parameters()).device
    total_loss = total_tokens = total_right = 0.0
    exact: dict[str, list[bool]] = {}
    with torch.no_grad():
        for k in range(0, len(tasks), batch_size):
            chunk = tasks[k : k + batch_size]
            batch = collate([encode_task(t, encoder, store) for t in chunk], encoder, pad_id)
            batch = {n: v.to(device) for n, v in batch.items()}
            logits = model(**{n: v for n, v in batch.items() if n != "labels"}).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            right = (logits.argmax(-1) == labels) & mask
            total_loss += float((loss * mask).sum())
            total_tokens += float(mask.sum())
            total_right += float(right.sum())
            for i, task in enumerate(chunk):
                exact.setdefault(task.name, []).append(bool((right[i] | ~mask[i]).all()))
    flat = [e for v in exact.values() for e in v]
    out = {"val_loss": total_loss / max(total_tokens, 1), "val_token_accuracy": total_right / max(total_tokens, 1),
           "val_exact": sum(flat) / max(len(flat), 1), "val_n": float(len(flat))}  # fmt: skip
    out |= {f"val_exact_{name}": sum(v) / len(v) for name, v in sorted(exact.items())}
    return out


# ---- the loop ----------------------------------------------------------------------------------


def train(cfg: BaseLMConfig, model: Any = None, processor: Any = None) -> Path:
    """Train; returns the directory of the final model (OUT/final)."""
    from accelerate import Accelerator

    from ..backends.transformers import TransformersBackend

    accelerator = Accelerator()
    run = RunFolder(cfg.out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = [it for it in load_items(cfg.train) if it.record.get("events") is not None and "duration" in it.record]
    if not items:
        raise ValueError(f"{cfg.train}: no records with `events` and `duration` (a suite file: echo-agent data suite)")
    val_items = [it for it in load_items(cfg.val) if it.record.get("events") is not None] if cfg.val else []
    rng = random.Random(cfg.seed + 1)  # a fixed validation set
    val_tasks = [
        make_task(rng.choice(val_items), rng, cfg, val_items) for _ in range(cfg.eval_examples if val_items else 0)
    ]
    resume = run.resume()
    if resume and not cfg.lora:
        backend = TransformersBackend.from_pretrained(run.checkpoint)
        model, processor = backend.model, backend.processor
    elif model is None:
        model, processor = load_model(cfg.init, cfg, items, cfg.seed, cfg.audio_encoder, corpus(items, cfg))
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
    data = batches(items, encoder, cfg, cfg.seed + step, pad_id, accelerator.process_index, accelerator.num_processes)
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
        # Validation and checkpoints run on rank 0 while the others wait, so all take the same collective steps.
        if val_tasks and (step % cfg.eval_every == 0 or step == cfg.steps):
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model).eval()
                record = {"step": step, **record, **evaluate(unwrapped, val_tasks, encoder, cfg.batch_size)}
                model.train()
            accelerator.wait_for_everyone()
        if record and accelerator.is_main_process:
            log.write(record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            state = {"optimizer": optimizer.state_dict(), "step": step, "python_rng": random.getstate(),
                     "torch_rng": torch.get_rng_state()}  # fmt: skip
            checkpoint(accelerator, model, processor, run, state)
    log.close()
    return finish(accelerator, model, processor, run, ranks, cfg.lora)

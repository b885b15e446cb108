"""Supervised fine-tuning on Echo tool-call traces, in one file you can read top to bottom.

Each example is a question about a clip and its gold reasoning trace in the seg-tag protocol. The
trace is cut at every `</seg>`; in `interleaved` mode the listened slice is inserted right there as
one more audio input, exactly as the runtime does (the same `ListenTool` decides the effective
span, the same `PromptEncoder` lays out the tokens). In `cold_start` mode (the paper's stage 1) the
tags stay in the text and no audio is inserted. In `text` mode (the paper's text-only baseline) every
"I listen to A-B s: <seg>A, B</seg>" is dropped from the trace: plain reasoning about the one hearing.
The loss covers only the tokens the model writes: the prompt, inserted audio placeholders and notes
are masked (design §6).

    echo-agent train sft --train data/train.json --val data/val.json --out runs/sft

Runs unchanged under `accelerate launch` on several GPUs. Checkpoints to OUT/checkpoint and
resumes from it; logs loss, throughput and validation accuracy to OUT/log.jsonl.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from ..audio import AudioStore
from ..backends.base import AudioResolver, GenerationRequest
from ..backends.transformers import EncodedAudio, PromptEncoder
from ..config import ListenLimits
from ..messages import Message, Part, audio_part, text_part
from ..prompts import format_question
from ..protocols import SEG_CLOSE, parse_closing_seg
from ..tools.listen import ListenTool

AudioMode = Literal["interleaved", "cold_start", "text"]
_LISTEN_PHRASE = re.compile(r"\s*I listen to [^:<]*:\s*<seg>[^<]*</seg>")


# The graph mode that evaluates each training variant (the paper's Table 3 settings).
GRAPH_MODE: dict[str, str] = {"interleaved": "interleaved", "cold_start": "grounded", "text": "text"}


def text_only_trace(trace: str) -> str:
    """The trace with its listens removed (the `text` variant's target)."""
    return _LISTEN_PHRASE.sub("", trace)


class SFTConfig(BaseModel):
    """Everything a run depends on. Saved next to the checkpoints."""

    train: list[Path] = Field(description="training suites (MMAU JSON with gold traces), concatenated")
    val: Path | None = None
    out: Path
    init: str = Field("echo-tiny", description="'echo-tiny' for a new model, or a model directory")
    audio_mode: AudioMode = "interleaved"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 20
    eval_every: int = 500
    eval_items: int = 120
    save_every: int = 250
    seed: int = 0
    max_examples: int | None = None
    freeze_audio_encoder: bool = False
    # LoRA (peft) for large models; echo-tiny trains fully.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # echo-tiny's size when init == "echo-tiny".
    vocab_size: int = 512
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    audio_hidden_size: int = 128
    audio_layers: int = 2
    audio_tokens: int = 16
    audio_time_tokens: int = Field(0, description="how many of audio_tokens are time bins (see EchoTinyConfig)")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v


# ---- data: gold traces -> token ids, loss mask and audio ---------------------------------------


def load_items(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(path.read_text())
    for it in items:
        it["_audio"] = str((path.parent / it["audio_id"]).resolve())
    return items


def trace_messages(
    item: dict[str, Any], store: AudioStore, mode: AudioMode, limits: ListenLimits | None = None
) -> tuple[list[Message], AudioResolver]:
    """The user turn and the gold assistant turn, as the runtime would have built them."""
    ref = store.load(item["_audio"])
    clips = {"main": ref}
    question = format_question(item["question"], item.get("choices"), {"main": ref.duration}, "main")
    user: Message = {"role": "user", "content": [audio_part("main"), text_part(question)]}
    tool = ListenTool(limits)
    parts: list[Part] = []
    used = 1
    trace = text_only_trace(item["trace"]) if mode == "text" else item["trace"]
    pieces = trace.split(SEG_CLOSE)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        text = piece if last else piece + SEG_CLOSE
        if text:
            parts.append(text_part(text, "model"))
        if last or mode != "interleaved":
            continue
        outcome = tool(parse_closing_seg(text), clips, used)
        used += int(outcome.valid)
        parts.append(outcome.audio if outcome.audio is not None else text_part(f" {outcome.note} ", "note"))
    return [user, {"role": "assistant", "content": parts}], AudioResolver(store, clips)


class Example(BaseModel):
    model_config = {"arbitrary_types_allowed": True}
    input_ids: list[int]
    labels: list[int]
    audios: list[Any]  # EncodedAudio


def encode_example(item: dict[str, Any], encoder: PromptEncoder, store: AudioStore, mode: AudioMode) -> Example:
    messages, resolver = trace_messages(item, store, mode)
    enc = encoder.encode(GenerationRequest(messages=messages, continue_final=True), resolver)
    eos = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*enc.input_ids, eos]
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask, strict=True)] + [eos]
    return Example(input_ids=ids, labels=labels, audios=list(enc.audios))


def collate(examples: Sequence[Example], encoder: PromptEncoder, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    audios: list[EncodedAudio] = [a for e in examples for a in e.audios]
    if audios:
        batch.update(encoder.collate(audios))
    return batch


def batches(
    items: list[dict[str, Any]],
    encoder: PromptEncoder,
    mode: AudioMode,
    batch_size: int,
    seed: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Endless shuffled batches (epoch after epoch); yields (batch, token count). Under several
    processes (`accelerate launch`) every rank shuffles alike and takes every `world`-th batch."""
    if not 0 < batch_size * world <= len(items):  # else the loop below would spin forever without yielding
        raise ValueError(f"batch_size {batch_size} x {world} process(es) needs as many items; got {len(items)}")
    store = AudioStore(max_cached=4 * batch_size)
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(rank * batch_size, len(order) - batch_size + 1, world * batch_size):
            exs = [encode_example(items[j], encoder, store, mode) for j in order[start : start + batch_size]]
            yield collate(exs, encoder, pad_id), sum(len(e.input_ids) for e in exs)


# ---- model -------------------------------------------------------------------------------------


def new_echo_tiny(cfg: SFTConfig, corpus: Sequence[str]) -> tuple[Any, Any]:
    """A fresh echo-tiny: a tokenizer trained on the corpus, then the model and processor."""
    from ..echo_tiny import (
        EchoTinyConfig,
        EchoTinyFeatureExtractor,
        EchoTinyForConditionalGeneration,
        EchoTinyProcessor,
        train_tokenizer,
    )

    tok = train_tokenizer(corpus, cfg.vocab_size)
    names = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_end|>")
    ids: dict[str, int] = {t: tok.convert_tokens_to_ids(t) for t in names}  # type: ignore[misc]
    config = EchoTinyConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "num_key_value_heads": max(1, cfg.heads // 2), "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "eos_token_id": ids["<|im_end|>"], "pad_token_id": tok.pad_token_id,
        },
        audio_hidden_size=cfg.audio_hidden_size, audio_layers=cfg.audio_layers, audio_tokens=cfg.audio_tokens,
        audio_time_tokens=cfg.audio_time_tokens, audio_token_id=ids["<|AUDIO|>"],
        audio_bos_token_id=ids["<|audio_bos|>"], audio_eos_token_id=ids["<|audio_eos|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = EchoTinyForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = EchoTinyProcessor(EchoTinyFeatureExtractor(n_mels=config.n_mels), tok, audio_tokens=cfg.audio_tokens)
    return model, processor


def load_model(cfg: SFTConfig, items: list[dict[str, Any]]) -> tuple[Any, Any]:
    if cfg.init == "echo-tiny":
        corpus = [it["question"] + " " + " ".join(it["choices"]) + " " + it["trace"] for it in items]
        from ..prompts import INSTRUCTION, RETRY_NUDGE

        corpus += [INSTRUCTION, *RETRY_NUDGE.values()]
        return new_echo_tiny(cfg, corpus)
    from ..backends.transformers import TransformersBackend

    backend = TransformersBackend.from_pretrained(cfg.init)
    return backend.model, backend.processor


# ---- the loop ----------------------------------------------------------------------------------


def make_trainable(model: Any, cfg: Any, adapter_from: Path | None = None) -> Any:
    """Freeze the audio encoder if `cfg.freeze_audio_encoder`; wrap in LoRA adapters (peft) if `cfg.lora`,
    restoring them from checkpoint `adapter_from` when resuming. Shared by the SFT and GRPO trainers."""
    if cfg.freeze_audio_encoder:
        for name, p in model.named_parameters():
            if "audio" in name:
                p.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 target_modules=cfg.lora_targets))  # fmt: skip
        if adapter_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(adapter_from / "adapter_model.safetensors"))
    return model


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(
    model: Any, optimizer: Any, accelerator: Any, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor],
    lr: float, grad_clip: float,
) -> float:  # fmt: skip
    """One optimisation step on one batch; returns the loss."""
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(**batch).loss
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def graph_accuracy(backend: Any, items: Sequence[dict[str, Any]], graph_mode: str) -> float:
    """Accuracy of the real agent graph, greedy, on items with gold answers (the trainers' validation)."""
    import asyncio

    from ..agent import EchoAgent
    from ..config import AgentConfig, SamplingParams

    agent = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=160), mode=graph_mode))

    async def run() -> list[bool]:
        out = []
        for it in items:
            r = await agent.ask(it["_audio"], it["question"], it["choices"], gold=it["answer"])
            out.append(bool(r.verdict and r.verdict.correct))
        return out

    correct = asyncio.run(run())
    return sum(correct) / max(1, len(correct))


def validate(model: Any, processor: Any, items: list[dict[str, Any]], mode: AudioMode) -> dict[str, float]:
    """Validation accuracy of the model being trained, through the real agent graph."""
    from ..backends.transformers import TransformersBackend

    model.eval()
    accuracy = graph_accuracy(TransformersBackend(model, processor), items, GRAPH_MODE[mode])
    model.train()
    return {"val_accuracy": accuracy, "val_n": float(len(items))}


def train(cfg: SFTConfig, model: Any = None, processor: Any = None) -> Path:
    """Train; returns the directory of the final model (OUT/final)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    cfg.out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = [it for path in cfg.train for it in load_items(path)][: cfg.max_examples]
    val_items = load_items(cfg.val)[: cfg.eval_items] if cfg.val else []
    ckpt = cfg.out / "checkpoint"
    old = ckpt.with_name("checkpoint.old")
    if not ckpt.exists() and (old / "trainer_state.pt").is_file():  # killed between the two renames
        old.rename(ckpt)
    resume = (ckpt / "trainer_state.pt").is_file()
    if resume and not cfg.lora:  # a LoRA checkpoint holds the adapter only: rebuild the base below
        from ..backends.transformers import TransformersBackend

        backend = TransformersBackend.from_pretrained(ckpt)
        model, processor = backend.model, backend.processor
    elif model is None:
        model, processor = load_model(cfg, items)
    model = make_trainable(model, cfg, ckpt if resume else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    encoder = PromptEncoder(processor)
    pad_id = processor.tokenizer.pad_token_id
    data = batches(
        items, encoder, cfg.audio_mode, cfg.batch_size, cfg.seed + step, pad_id,
        accelerator.process_index, accelerator.num_processes,
    )  # fmt: skip
    log = (cfg.out / "log.jsonl").open("a")
    tokens, t0, losses = 0, time.perf_counter(), []

    def save(where: Path) -> None:
        if not accelerator.is_main_process:
            return
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a stale half-save from a crash must not leak into this one
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "python_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")  # fmt: skip
        # Swap in two renames; a kill at any point leaves a complete checkpoint at `where` or `where.old`.
        old = where.with_name(where.name + ".old")
        if where.exists():
            shutil.rmtree(old, ignore_errors=True)
            where.rename(old)
        tmp.rename(where)
        shutil.rmtree(old, ignore_errors=True)

    while step < cfg.steps:
        batch, n_tokens = next(data)
        losses.append(train_step(model, optimizer, accelerator, params, batch, lr_at(step, cfg), cfg.grad_clip))
        step += 1
        tokens += n_tokens
        record: dict[str, Any] = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr_at(step, cfg),
                      "tokens_per_s": tokens / elapsed}  # fmt: skip
            tokens, t0, losses = 0, time.perf_counter(), []
        if val_items and (step % cfg.eval_every == 0 or step == cfg.steps) and accelerator.is_main_process:
            record = {"step": step, **record, **validate(accelerator.unwrap_model(model), processor, val_items,
                                                         cfg.audio_mode)}  # fmt: skip
        if record and accelerator.is_main_process:
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save(ckpt)
    final = cfg.out / "final"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.lora:
            unwrapped = unwrapped.merge_and_unload()
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    log.close()
    return final

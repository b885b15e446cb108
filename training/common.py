"""What the trainers share, in one place: the run folder, atomic checkpoints and resume, freezing and LoRA,
the learning-rate schedule, the JSON log, the model a run starts from, token batches and one optimiser step, and
the conversations (threads) of a data file. The stage-0 trainers (`audio_pretrain.py`, `base_lm.py`), SFT
(`sft.py`) and GRPO (`grpo.py`) import these and not each other."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from pydantic import BaseModel, Field

from ..backends.transformers import EncodedAudio, PromptEncoder
from ..benchmarks import BenchItem, load_benchmark
from ..config import AudioMode
from ..echo_tiny import EchoTinySizes, new_echo_tiny
from ..echo_tiny.configuration import AudioEncoderKind
from ..errors import DataError

TRAINER_STATE = "trainer_state.pt"


class TrainableSettings(BaseModel):
    """Which weights a run trains. Trainer configs inherit these fields (flat, as in their JSON files)."""

    freeze_audio_encoder: bool = False
    lora: bool = Field(False, description="train LoRA adapters (peft) instead of all weights; for large models")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


def make_trainable(model: Any, cfg: TrainableSettings, adapter_from: Path | None = None) -> Any:
    """Freeze the audio encoder if asked; wrap in LoRA adapters (peft) if asked, restoring them from checkpoint
    `adapter_from` when resuming."""
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


def prepare_training(
    model: Any, cfg: TrainableSettings, accelerator: Any, run: RunFolder, resume: dict[str, Any] | None, *,
    lr: float, weight_decay: float, betas: tuple[float, float],
) -> tuple[Any, Any, list[torch.nn.Parameter]]:  # fmt: skip
    """Make the model trainable (freezing, LoRA restored from the checkpoint when resuming), build AdamW over what
    trains, hand both to `accelerator`, and restore the optimizer's state when resuming."""
    model = make_trainable(model, cfg, run.checkpoint if resume else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    return model, optimizer, params


def lr_at(step: int, lr: float, warmup: int, steps: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_items(path: Path) -> list[BenchItem]:
    """A training or validation file (MMAU format; the suite's records also carry `trace` and `events`)."""
    return load_benchmark(path)


def save_model(
    model: Any, processor: Any, where: Path, trainer_state: dict[str, Any] | None = None, merge_lora: bool = False
) -> None:
    """Save model, processor and (for a checkpoint) the trainer state to WHERE.tmp, then swap it in with two
    renames, so a kill at any point leaves a whole directory at WHERE or WHERE.old (`RunFolder.resume` finds it)."""
    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a stale half-save from a crash must not leak into this one
    (model.merge_and_unload() if merge_lora else model).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    old = where.with_name(where.name + ".old")
    if where.exists():
        shutil.rmtree(old, ignore_errors=True)
        where.rename(old)
    tmp.rename(where)
    shutil.rmtree(old, ignore_errors=True)


class RunFolder:
    """OUT/ of a training run: config.json, log.jsonl, checkpoint/ (resumed) and final/."""

    def __init__(self, out: Path, log_name: str = "log.jsonl") -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.out / "checkpoint"
        self.final = self.out / "final"
        self.log_path = self.out / log_name

    def resume(self) -> dict[str, Any] | None:
        """The checkpoint's trainer state when there is one to resume (recovering a kill between the two renames
        of `save_model`), else None."""
        old = self.checkpoint.with_name(self.checkpoint.name + ".old")
        if not self.checkpoint.exists() and (old / TRAINER_STATE).is_file():
            old.rename(self.checkpoint)
        path = self.checkpoint / TRAINER_STATE
        if not path.is_file():
            return None
        state: dict[str, Any] = torch.load(path, weights_only=False)
        return state

    def write_config(self, cfg: BaseModel, name: str = "config.json") -> None:
        (self.out / name).write_text(cfg.model_dump_json(indent=2))

    def log(self) -> JsonLog:
        return JsonLog(self.log_path)


class JsonLog:
    """One JSON object per line, flushed as written, and echoed to stdout (the run's progress)."""

    def __init__(self, path: Path) -> None:
        self._f: IO[str] = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        self._f.write(line + "\n")
        self._f.flush()
        print(line, flush=True)

    def close(self) -> None:
        self._f.close()


def validation_accuracy(backend: Any, items: Sequence[BenchItem], mode: AudioMode, max_new_tokens: int = 160) -> float:
    """Accuracy of the real agent graph, greedy, on items with gold answers: the trainers' validation. The runs
    go through the one runner, batched; a thread's turns run in order in one graph thread, as `eval` runs them
    (an in-memory checkpointer holds the conversation)."""
    import asyncio

    from ..agent import EchoAgent
    from ..config import AgentConfig, SamplingParams
    from ..graphs.runner import accuracy, batched, jobs, run_all

    config = AgentConfig(sampling=SamplingParams(max_new_tokens=max_new_tokens), mode=mode)
    agent = EchoAgent(batched(backend), config=config, checkpointer=memory_checkpointer(items))
    return accuracy(asyncio.run(run_all(agent, jobs(items), concurrency=16)))


def memory_checkpointer(items: Sequence[BenchItem]) -> Any:
    """An in-memory LangGraph checkpointer when some items are thread turns (their graph thread keeps the
    conversation between turns), else None."""
    from ..graphs.runner import has_threads

    if not has_threads(items):
        return None
    from langgraph.checkpoint.memory import InMemorySaver

    return InMemorySaver()


# ---- conversations: thread turns ---------------------------------------------------------------------


def conversation_units(items: Sequence[BenchItem]) -> list[list[BenchItem]]:
    """The items as conversations, in file order: a single item alone, or all turns of a thread in turn order.
    A thread must hold turns 0..n-1 (`load_benchmark` checks a file; this checks a concatenation too)."""
    units: list[list[BenchItem]] = []
    threads: dict[str, list[BenchItem]] = {}
    for it in items:
        if it.thread is None:
            units.append([it])
        elif it.thread in threads:
            threads[it.thread].append(it)
        else:
            threads[it.thread] = [it]
            units.append(threads[it.thread])
    for tid, turns in threads.items():
        turns.sort(key=lambda t: t.turn)
        if [t.turn for t in turns] != list(range(len(turns))):
            raise DataError(f"thread {tid}: turns {[t.turn for t in turns]}, expected 0..{len(turns) - 1}")
    return units


def thread_history(items: Sequence[BenchItem]) -> dict[str, list[BenchItem]]:
    """item id -> the earlier turns of its thread, in order ([] for a single item or a first turn)."""
    return {it.id: unit[: it.turn] for unit in conversation_units(items) for it in unit}


def tokenizer_corpus(items: Sequence[BenchItem]) -> list[str]:
    """What a new echo-tiny's tokenizer is trained on: the items' questions, choices and gold traces, and the
    runtime's own prompt text."""
    from ..prompts import INSTRUCTION, RETRY_NUDGE

    corpus = [it.question + " " + " ".join(it.choices) + " " + it.record.get("trace", "") for it in items]
    return [*corpus, INSTRUCTION, *RETRY_NUDGE.values()]


NEW_MODEL = ("new", "echo-tiny")
"""`init` values that mean a fresh model of the config's sizes and `audio_encoder` ("echo-tiny": the older name)."""


def load_model(
    init: str,
    sizes: EchoTinySizes,
    items: Sequence[BenchItem],
    seed: int,
    audio_encoder: AudioEncoderKind = "conv",
    extra_corpus: Sequence[str] = (),
) -> tuple[Any, Any]:
    """The model a run starts from: a new echo-tiny of `sizes` (init "new" or "echo-tiny"; `audio_encoder`
    "whisper-tiny.en" makes it echo-tiny 2, its tokenizer trained on the items and `extra_corpus`), or any saved
    model directory (echo-tiny, echo-tiny 2, Qwen2-Audio...), whose own config then decides sizes and encoder."""
    if init in NEW_MODEL:
        return new_echo_tiny(sizes, [*tokenizer_corpus(items), *extra_corpus], seed, audio_encoder=audio_encoder)
    from ..backends.transformers import TransformersBackend

    backend = TransformersBackend.from_pretrained(init)
    return backend.model, backend.processor


# ---- token batches and one optimisation step -----------------------------------------------------------


class Example(BaseModel):
    """One training sequence: token ids, labels (-100 where no loss) and its audio inputs in placeholder order."""

    model_config = {"arbitrary_types_allowed": True}
    input_ids: list[int]
    labels: list[int]
    audios: list[Any]  # EncodedAudio


def collate(examples: Sequence[Example], encoder: PromptEncoder, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels and attention mask, plus the audio features of every example in order."""
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


# ---- several processes (`accelerate launch`) --------------------------------------------------------------


def digest(tensor: torch.Tensor) -> str:
    """A short content hash of a tensor (which data a rank trained on)."""
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_digest(model: Any) -> str:
    """A hash of every weight in name order: equal on every rank of a correct data-parallel run."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RankLog:
    """OUT/ranks/rank{N}.jsonl under several processes: what each rank trained on, each step, and a hash of its
    final weights, so a multi-process run can be checked (different data per rank, identical weights)."""

    def __init__(self, run: RunFolder, accelerator: Any) -> None:
        self._f: IO[str] | None = None
        if accelerator.num_processes > 1:
            (run.out / "ranks").mkdir(exist_ok=True)
            self._f = (run.out / "ranks" / f"rank{accelerator.process_index}.jsonl").open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def checkpoint(accelerator: Any, model: Any, processor: Any, run: RunFolder, state: dict[str, Any]) -> None:
    """Rank 0 saves the checkpoint (model, processor, trainer `state`); every rank waits for it."""
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), processor, run.checkpoint, state)
    accelerator.wait_for_everyone()


def finish(accelerator: Any, model: Any, processor: Any, run: RunFolder, ranks: RankLog, merge_lora: bool) -> Path:
    """Record each rank's final weights (before a LoRA merge changes them), then rank 0 saves OUT/final (adapters
    merged) while the others wait. Returns OUT/final."""
    ranks.write({"final_weights": weights_digest(accelerator.unwrap_model(model))})
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), processor, run.final, merge_lora=merge_lora)
    accelerator.wait_for_everyone()
    ranks.close()
    return run.final

"""Stage 0: pretrain echo-tiny's audio encoder on the suite's event annotations.

A language-model loss alone is a weak teacher for a from-scratch audio encoder: the gradient that
reaches it through "there are 3 beeps" is one token's worth per trace, and in a CPU budget the
encoder never learns to tell events apart (a 1800-step SFT run from scratch stayed at chance).
Real audio LLMs start from a pretrained encoder (Whisper, BEATs); echo-tiny gets the same from the
suite itself. Every synthetic clip comes with its event list, so any slice of it has exact labels.

Each step draws random slices of training clips (half of them the very spans the gold traces
re-listen to, half random spans of the same shapes), runs them through the real processor and the
model's own audio encoder, and trains small linear heads on the encoder's output tokens: the tokens
the decoder will read. The heads ask what the traces need to say after a re-listen:

- ``count``: how many beeps lie in the slice (0-7);
- ``present``: which of the five event kinds occur in it;
- ``center``: which kind sounds at its midpoint (or none);
- ``pitch``: the pitch word of the beep at its midpoint;
- ``order``: for each pair of kinds present, which starts first;
- ``chord``: the duration of a chord heard whole, on the 0.5 s grid.

The result is a whole echo-tiny (fresh decoder, trained encoder) saved with `save_pretrained`, the
`init` of stage 1 (`training/sft.py`), which then teaches the decoder to read these tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..audio import AudioRef, AudioStore
from ..benchmarks import BenchItem
from ..echo_tiny import EchoTinySizes
from ..protocols import SEG_RE
from .common import RunFolder, load_items, load_model, lr_at, save_model
from .synth import DURATION_CHOICES, KINDS, PITCH_WORDS, kinds_heard

PAIRS: list[tuple[int, int]] = list(itertools.combinations(range(len(KINDS)), 2))
COUNT_CLASSES = 8
IGNORE = -100
# Stage 0 reads slices through the runtime's own store and cutter, so training sees the samples a listen delivers.
_STORE = AudioStore(max_cached=64)
_REFS: dict[str, AudioRef] = {}
SAMPLE_RATE = 16000


class AudioPretrainConfig(EchoTinySizes):
    """Everything a stage-0 run depends on. Saved next to the model. The decoder is created here, untrained, at
    these sizes (smaller than SFT's defaults), so stage 1 can load one directory."""

    train: Path
    val: Path | None = None
    out: Path
    init: Path | None = Field(
        None, description="a previous stage-0 run's folder to continue (model/, heads.pt); its sizes win over these"
    )
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(48, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(100, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    trace_span_share: float = Field(0.5, ge=0, le=1, description="share of slices taken from the gold traces' listens")
    category_weights: dict[str, float] = Field(
        default_factory=dict, description="relative sampling weight of each category's clips (unlisted: 1.0)"
    )
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_slices: int = Field(600, ge=50)
    seed: int = 0
    hidden_size: int = Field(128, ge=2)
    layers: int = Field(3, ge=1)
    intermediate_size: int = Field(384, ge=1)


# ---- labels of a slice --------------------------------------------------------------------------


def slice_labels(events: Sequence[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """The head targets for the slice [start, end] of a clip with these events (`IGNORE` = no target)."""

    # The same rule (`kinds_heard`) decides what counts as heard in a slice everywhere.
    heard = [ev for ev in events if kinds_heard([(ev["kind"], ev["onset"], ev["offset"])], start, end)]
    mid = 0.5 * (start + end)
    at_mid = [ev for ev in events if ev["onset"] - 0.02 <= mid <= ev["offset"] + 0.02]
    first: dict[int, float] = {}
    for ev in heard:
        k = KINDS.index(ev["kind"])
        first[k] = min(first.get(k, math.inf), ev["onset"])
    order = [IGNORE] * len(PAIRS)
    for p, (i, j) in enumerate(PAIRS):
        if i in first and j in first:
            order[p] = int(first[i] < first[j])
    chords = [ev for ev in events if ev["kind"] == "chord" and start <= ev["onset"] and ev["offset"] <= end]
    chord = IGNORE
    if len(chords) == 1:
        length = chords[0]["offset"] - chords[0]["onset"]
        chord = int(np.argmin([abs(length - v) for v in DURATION_CHOICES]))
    beep_mid = [ev for ev in at_mid if ev["kind"] == "beep"]
    return {
        "count": min(sum(ev["kind"] == "beep" for ev in heard), COUNT_CLASSES - 1),
        "present": [int(any(ev["kind"] == k for ev in heard)) for k in KINDS],
        "center": KINDS.index(at_mid[0]["kind"]) if at_mid else len(KINDS),
        "pitch": PITCH_WORDS.index(beep_mid[0]["pitch"]) if beep_mid else IGNORE,
        "order": order,
        "chord": chord,
    }


def trace_spans(trace: str) -> list[tuple[float, float]]:
    return [(float(m.group(2)), float(m.group(3))) for m in SEG_RE.finditer(trace)]


def random_span(rng: random.Random, item: BenchItem) -> tuple[float, float]:
    """A span of one of the shapes the traces listen to, anywhere in the clip."""
    dur = float(item.record["duration"])
    shape = rng.random()
    if shape < 0.35:  # ~1 s around an event or a random time (identify, pitch)
        events = item.record["events"]
        if events and rng.random() < 0.8:
            ev = rng.choice(events)
            t = rng.uniform(ev["onset"], ev["offset"])
        else:
            t = rng.uniform(0.0, dur)
        t = round(t, 1)
        return max(0.0, t - 0.5), min(dur, t + 0.5)
    if shape < 0.6:  # 4-8 s (count)
        length = rng.randint(8, 16) / 2
    elif shape < 0.8:  # 2-5 s (locate)
        length = rng.choice([2.0, 2.5, 3.0, 4.0, 5.0])
    else:  # a 10 s scan window (order, duration)
        k = rng.randrange(max(1, math.ceil(dur / 10.0)))
        return 10.0 * k, min(dur, 10.0 * k + 10.0)
    a = rng.randint(0, max(0, int((dur - length) * 2))) / 2
    return a, min(dur, a + length)


def read_slice(path: str, start: float, end: float) -> np.ndarray:
    """The slice exactly as a listen gets it: `AudioStore.slice` (mono float32 at 16 kHz, sample-rounded bounds)."""
    ref = _REFS.get(path)
    if ref is None:
        ref = _REFS[path] = _STORE.load(path)
    out: np.ndarray = _STORE.slice(ref, start, end, SAMPLE_RATE)
    return out


# ---- heads ---------------------------------------------------------------------------------------


class EventHeads(nn.Module):
    """Linear read-outs of the encoder's output tokens (what the decoder will see)."""

    def __init__(self, tokens: int, hidden: int) -> None:
        super().__init__()
        width = tokens * hidden
        self.norm = nn.LayerNorm(hidden)
        self.count = nn.Linear(width, COUNT_CLASSES)
        self.present = nn.Linear(width, len(KINDS))
        self.center = nn.Linear(width, len(KINDS) + 1)
        self.pitch = nn.Linear(width, len(PITCH_WORDS))
        self.order = nn.Linear(width, len(PAIRS))
        self.chord = nn.Linear(width, len(DURATION_CHOICES))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(tokens).flatten(1)
        return {name: getattr(self, name)(x) for name in ("count", "present", "center", "pitch", "order", "chord")}


def head_losses(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    losses = {name: F.cross_entropy(out[name], y[name], ignore_index=IGNORE) for name in ("count", "center")}
    for name in ("pitch", "chord"):
        valid = y[name] != IGNORE
        losses[name] = F.cross_entropy(out[name][valid], y[name][valid]) if valid.any() else out[name].sum() * 0
    losses["present"] = F.binary_cross_entropy_with_logits(out["present"], y["present"].float())
    valid = y["order"] != IGNORE
    losses["order"] = (
        F.binary_cross_entropy_with_logits(out["order"][valid], y["order"][valid].float())
        if valid.any()
        else out["order"].sum() * 0
    )
    return losses


def head_hits(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """(correct, total) per head; `present` and `order` are scored per label."""
    hits: dict[str, tuple[int, int]] = {}
    for name in ("count", "center", "pitch", "chord"):
        valid = y[name] != IGNORE
        hits[name] = (int((out[name].argmax(-1)[valid] == y[name][valid]).sum()), int(valid.sum()))
    for name in ("present", "order"):
        valid = y[name] != IGNORE
        pred = (out[name] > 0).long()
        hits[name] = (int((pred[valid] == y[name][valid]).sum()), int(valid.sum()))
    return hits


# ---- data ----------------------------------------------------------------------------------------


def sample_batch(
    rng: random.Random,
    items: Sequence[BenchItem],
    n: int,
    trace_share: float,
    weights: Sequence[float] | None = None,
) -> tuple[list[np.ndarray], dict[str, torch.Tensor]]:
    audios: list[np.ndarray] = []
    labels: list[dict[str, Any]] = []
    picked = rng.choices(items, weights=weights, k=n) if weights else [rng.choice(items) for _ in range(n)]
    for item in picked:
        spans = trace_spans(item.record.get("trace", ""))
        if spans and rng.random() < trace_share:
            a, b = rng.choice(spans)
            b = min(b, float(item.record["duration"]))
        else:
            a, b = random_span(rng, item)
        audios.append(read_slice(str(item.audio), a, b))
        labels.append(slice_labels(item.record["events"], a, b))
    y = {name: torch.tensor([lab[name] for lab in labels]) for name in labels[0]}
    return audios, y


def encode(model: Any, processor: Any, audios: list[np.ndarray], chunk: int = 16) -> torch.Tensor:
    """The encoder's output tokens for each slice. Slices are encoded in chunks of similar length,
    so 1 s slices are not padded to the 10 s ones (a 2-3x saving on this mix)."""
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    parts: list[torch.Tensor] = []
    for k in range(0, len(order), chunk):
        group = [audios[i] for i in order[k : k + chunk]]
        feats = processor.feature_extractor(group, sampling_rate=processor.feature_extractor.sampling_rate)
        parts.append(model.audio_embeddings(feats["input_features"], feats["attention_mask"]))
    out = torch.empty(len(audios), *parts[0].shape[1:], dtype=parts[0].dtype)
    out[torch.tensor(order)] = torch.cat(parts)
    return out


Batch = tuple[list[np.ndarray], dict[str, torch.Tensor]]


def window_batches(items: Sequence[BenchItem], category: str, size: int = 50) -> list[Batch]:
    """Every gold listen of one category's items, batched: the head scores on exactly the spans the
    traces re-listen to (the mixed validation slices are mostly easy 0-2 event spans)."""
    spans = [(it, a, min(b, float(it.record["duration"]))) for it in items if it.group == category
             for a, b in trace_spans(it.record.get("trace", ""))]  # fmt: skip
    batches = []
    for k in range(0, len(spans), size):
        chunk = spans[k : k + size]
        labels = [slice_labels(it.record["events"], a, b) for it, a, b in chunk]
        y = {name: torch.tensor([lab[name] for lab in labels]) for name in labels[0]}
        batches.append(([read_slice(str(it.audio), a, b) for it, a, b in chunk], y))
    return batches


def evaluate_heads(model: Any, processor: Any, heads: EventHeads, batches: list[Batch]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    with torch.no_grad():
        for audios, y in batches:
            for name, (c, t) in head_hits(heads(encode(model, processor, audios)), y).items():
                acc = totals.setdefault(name, [0, 0])
                acc[0] += c
                acc[1] += t
    return {name: c / t for name, (c, t) in totals.items() if t}


# ---- the loop ------------------------------------------------------------------------------------


def pretrain(cfg: AudioPretrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    items = load_items(cfg.train)
    init = str(cfg.init / "model") if cfg.init is not None else "echo-tiny"
    model, processor = load_model(init, cfg, items, cfg.seed)
    encoder = model.audio_encoder
    heads = EventHeads(model.config.audio_tokens, model.config.text_config.hidden_size)
    if cfg.init is not None:
        heads.load_state_dict(torch.load(cfg.init / "heads.pt"))
    weights = [cfg.category_weights.get(it.group, 1.0) for it in items] if cfg.category_weights else None
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    val_rng = random.Random(cfg.seed + 1)
    val_items = load_items(cfg.val) if cfg.val else items[:200]
    val_batches = [
        sample_batch(val_rng, val_items, 50, cfg.trace_span_share) for _ in range(max(1, cfg.eval_slices // 50))
    ]
    count_windows = window_batches(val_items, "count")
    run = RunFolder(cfg.out, log_name="pretrain_log.jsonl")
    run.write_config(cfg, "pretrain_config.json")
    log = run.log()
    model.train()
    t0 = time.time()
    running: dict[str, float] = {}
    for step in range(1, cfg.steps + 1):
        lr = lr_at(step - 1, cfg.lr, cfg.warmup, cfg.steps, 0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        audios, y = sample_batch(rng, items, cfg.batch_size, cfg.trace_span_share, weights)
        losses = head_losses(heads(encode(model, processor, audios)), y)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        if step % cfg.log_every == 0:
            row: dict[str, Any] = {"step": step, "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            row.update({f"loss_{k}": round(v / cfg.log_every, 4) for k, v in running.items()})
            running = {}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                model.eval()
                scores = evaluate_heads(model, processor, heads, val_batches)
                row.update({f"val_{k}": round(v, 4) for k, v in scores.items()})
                if count_windows:
                    row["val_count_windows"] = round(evaluate_heads(model, processor, heads, count_windows)["count"], 4)
                model.train()
            log.write(row)
    log.close()
    model.eval()
    save_model(model, processor, cfg.out / "model")
    torch.save(heads.state_dict(), cfg.out / "heads.pt")
    return cfg.out / "model"


# ---- scoring a finished run on the gold listens -----------------------------------------------


def score_windows(run: Path, data: Path, categories: Sequence[str]) -> dict[str, dict[str, float]]:
    """Head accuracy of a stage-0 run (`run`/model, `run`/heads.pt) on every gold listen of each
    category's items in `data`: how well the encoder's tokens carry what the traces must read there."""
    from ..backends.transformers import TransformersBackend

    backend = TransformersBackend.from_pretrained(run / "model")
    model, processor = backend.model.eval(), backend.processor
    heads = EventHeads(model.config.audio_tokens, model.config.text_config.hidden_size)
    heads.load_state_dict(torch.load(run / "heads.pt"))
    items = load_items(data)
    return {cat: evaluate_heads(model, processor, heads, window_batches(items, cat)) for cat in categories}


if __name__ == "__main__":  # python -m echo_agent.training.audio_pretrain RUN DATA.json [CATEGORY ...]
    import sys

    from .synth import CATEGORIES

    if len(sys.argv) < 3:
        sys.exit("usage: python -m echo_agent.training.audio_pretrain RUN DATA.json [CATEGORY ...]")
    run_dir, data_file, *cats = sys.argv[1:]
    for cat, scores in score_windows(Path(run_dir), Path(data_file), cats or CATEGORIES).items():
        print(cat, json.dumps({k: round(v, 3) for k, v in scores.items()}))

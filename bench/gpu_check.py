"""A prepared GPU check (issue 17, item 5): one script that exercises the whole stack on one accelerator.

    python bench/gpu_check.py --json                                   # the lent GPU: cuda, bfloat16, ~330 M params
    .venv/bin/python bench/gpu_check.py --device cpu --dtype float32 --tiny --json --budget-s 120   # CPU rehearsal

A randomly initialised Qwen2-Audio of realistic width (text decoder hidden 2048, 4 layers, MHA with head dim
128; audio encoder d_model 1280, 6 layers, as in Qwen2-Audio's Whisper encoder; about 330 M parameters) is
built from a config, offline, directly on `--device` in `--dtype`. Then five phases run, each timed and each
guarded (a phase that fails is reported with its error and the others still run):

1. environment: torch/transformers versions, the device, bf16 support, memory, the project's own
   `placement(device, dtype)`;
2. graph run: the random model never writes `<seg>`, so it first memorises one Echo trace with a re-listen
   (tests/memorize.py, teacher forcing, on the device), then `EchoAgent.ask` runs the LangGraph graph greedily:
   the phase is ok when the graph re-listened (a valid listen of the trace's span) and answered the gold choice;
3. rollouts per second: the same jobs and seeds (`echo_agent.graphs.runner.jobs`) through `run_all`,
   sequential (`batched(backend, 1)`, concurrency 1) and batched (`batched(backend, max_batch)`, every job in
   flight), temperature 1, over the memorised question and synthetic ones; both rates and their ratio;
4. training: a few GRPO steps (`rollout_groups` through the graph, `group_advantages`, `model_inputs`,
   `policy_update` with a KL reference) and a few SFT steps (`sft.batches` over a synthetic suite's gold traces,
   `sft.train_step`), on the device, with step times and tokens/s;
5. vLLM, only when `vllm` is importable there (nothing is installed): the model is saved, and a subprocess
   scores a prompt plus tokens our model sampled with `TokensPrompt` prompt log-probs; the max abs difference
   against ours (`sequence_logprobs`) is reported. Otherwise the phase is skipped and says why.

`--budget-s` bounds the run: a phase is not started when the time left is below what it needs. The report
(one JSON object with `--json`) is also written to `$OUT/gpu_check.json` when `$OUT` is set, else to a
temporary folder whose path is printed on stderr. The exit status is 1 when a phase failed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_beeps
from memorize import memorize

# The clip, question and memorised trace of bench/overhead.py (think, re-listen to 2-3 s, answer): shared, not copied.
from overhead import BEEPS, CHOICES, GOLD, QUESTION, SPAN, TRACE

from echo_agent.agent import EchoAgent, Result
from echo_agent.audio import AudioRef, AudioStore
from echo_agent.backends.base import AudioResolver, GenerationRequest
from echo_agent.backends.batching import BatchingBackend
from echo_agent.backends.placement import placement
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.graphs import steps
from echo_agent.graphs.runner import RunOutcome, batched, jobs, run_all
from echo_agent.graphs.state import new_question
from echo_agent.messages import Message, text_part
from echo_agent.tiny_models import QWEN_TOKEN_IDS, build_qwen2_audio_processor, tiny_qwen2_audio_config
from echo_agent.training.common import RunFolder, prepare_training
from echo_agent.training.grpo import GRPOConfig, group_advantages, policy_update, rollout_groups
from echo_agent.training.sft import SFTConfig, train_step
from echo_agent.training.sft import batches as sft_batches
from echo_agent.training.synth import write_suite
from echo_agent.training.trajectory import Trajectory, model_inputs, sequence_logprobs

PHASES = ("environment", "graph_run", "rollouts", "training", "vllm")
SR = 16000


@dataclass(frozen=True)
class Settings:
    """Sizes and workload. `--tiny` swaps in the small preset; any flag given overrides either preset."""

    hidden: int
    layers: int
    audio_hidden: int
    audio_layers: int
    memorize_steps: int
    memorize_lr: float
    max_new_tokens: int
    rollout_items: int
    rollout_samples: int
    max_batch: int
    grpo_steps: int
    grpo_items: int
    group_size: int
    sft_steps: int
    sft_batch: int
    vllm_tokens: int


PRESETS: dict[str, Settings] = {
    # Qwen2-Audio's layer shapes (Qwen2 MLP ratio 2.6875, MHA heads of 128; Whisper-large audio layers of 1280),
    # few layers: about 330 M parameters.
    "default": Settings(
        hidden=2048,
        layers=4,
        audio_hidden=1280,
        audio_layers=6,
        memorize_steps=300,
        memorize_lr=1e-3,
        max_new_tokens=128,
        rollout_items=8,
        rollout_samples=4,
        max_batch=64,
        grpo_steps=3,
        grpo_items=2,
        group_size=4,
        sft_steps=5,
        sft_batch=8,
        vllm_tokens=32,
    ),
}
# Small enough that the whole check runs in about a minute on 2 CPU cores.
PRESETS["tiny"] = replace(
    PRESETS["default"], hidden=64, layers=2, audio_hidden=32, audio_layers=2, memorize_lr=1e-2, max_new_tokens=96,
    rollout_items=4, rollout_samples=2, max_batch=16, grpo_steps=2, grpo_items=2, group_size=2, sft_steps=3,
    sft_batch=2, vllm_tokens=8,
)  # fmt: skip
# Rough seconds a phase needs at the default sizes on one GPU: it is not started with less time left.
RESERVE_S = {"graph_run": 45.0, "rollouts": 60.0, "training": 45.0, "vllm": 120.0}
RESERVE_S_TINY = {"graph_run": 15.0, "rollouts": 10.0, "training": 10.0, "vllm": 30.0}


class Skip(Exception):
    """A phase that cannot run here (not an error): reported as skipped, with the reason."""


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# ---- the device ------------------------------------------------------------------------------------------


@dataclass
class Device:
    name: str  # resolved: "cpu", "cuda", "cuda:N"
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.name)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.name)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.name) / 2**30, 3) if self.cuda else None


def environment(dev: Device, requested: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "requested": {"device": requested[0], "dtype": requested[1]},
        "placement": {"device": dev.name, "dtype": str(dev.dtype).removeprefix("torch.")},
        "vllm_installed": importlib.util.find_spec("vllm") is not None,
    }
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.name)
        free, total = torch.cuda.mem_get_info(dev.name)
        out.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            memory_total_gib=round(total / 2**30, 2),
            memory_free_gib=round(free / 2**30, 2),
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        )
        # One bf16 matrix product: the device really computes, and how fast at this size.
        a = torch.randn(4096, 4096, device=dev.name, dtype=torch.bfloat16)
        a @ a
        dev.sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        dev.sync()
        out["bf16_matmul_4096_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - t0) / 1e12, 1)
    else:
        out.update(device_name=platform.processor() or platform.machine(), bf16_supported=True)
    return out


# ---- the model -------------------------------------------------------------------------------------------


def _heads(width: int, head_dim: int) -> int:
    dim = head_dim if width >= 4 * head_dim else 16
    if width % dim:
        raise SystemExit(f"width {width} is not a multiple of the head size {dim}")
    return width // dim


def build_backend(s: Settings, dev: Device, seed: int) -> TransformersBackend:
    """A random Qwen2-Audio of the given sizes with the real processor (the tests' tiny tokenizer), built offline
    and directly on the device."""
    processor = build_qwen2_audio_processor()
    base: Any = tiny_qwen2_audio_config(len(processor.tokenizer))
    text = base.text_config.to_dict()
    text.pop("layer_types", None)  # one entry per layer: rebuilt from num_hidden_layers
    heads = _heads(s.hidden, 128)
    ffn = 64 * round(s.hidden * 2.6875 / 64) or 2 * s.hidden
    text.update(
        hidden_size=s.hidden,
        intermediate_size=ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    audio = base.audio_config.to_dict()
    audio.update(
        d_model=s.audio_hidden,
        encoder_ffn_dim=4 * s.audio_hidden,
        encoder_layers=s.audio_layers,
        encoder_attention_heads=_heads(s.audio_hidden, 64),
    )
    config = Qwen2AudioConfig(text_config=text, audio_config=audio, audio_token_index=base.audio_token_index)
    torch.manual_seed(seed)
    with torch.device(dev.name):
        model: Any = Qwen2AudioForConditionalGeneration(config)
    model = model.to(dtype=dev.dtype).eval()
    gen = model.generation_config  # as echo_agent.tiny_models does: chat-model eos/pad/bos
    gen.eos_token_id = [QWEN_TOKEN_IDS["<|im_end|>"], QWEN_TOKEN_IDS["<|endoftext|>"]]
    gen.pad_token_id = gen.bos_token_id = QWEN_TOKEN_IDS["<|endoftext|>"]
    return TransformersBackend(model, processor, name=f"random-qwen2-audio-h{s.hidden}-l{s.layers}")


def parameter_counts(model: Any) -> dict[str, int]:
    counts = {"total": 0, "text": 0, "audio_encoder": 0, "projector": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        key = "audio_encoder" if "audio_tower" in name else "projector" if "projector" in name else "text"
        counts[key] += p.numel()
    return counts


def _to_device_hook(dev: Device) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """A forward pre-hook that moves tensor inputs to the device (floats in the model's dtype): tests/memorize.py
    builds its inputs on the CPU in float32, as the tests need."""

    def hook(_module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        moved = {
            k: v.to(device=dev.name, dtype=dev.dtype if v.is_floating_point() else v.dtype)
            if isinstance(v, torch.Tensor)
            else v
            for k, v in kwargs.items()
        }
        return args, moved

    return hook


# ---- shared state between phases --------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    s: Settings
    dev: Device
    work: Path
    store: AudioStore = field(default_factory=AudioStore)
    backend: TransformersBackend | None = None
    wav: Path | None = None
    suite: Path | None = None
    build: dict[str, Any] = field(default_factory=dict)

    def model_backend(self) -> TransformersBackend:
        """The model, built on first use (so a later phase still runs when an earlier one failed before it)."""
        if self.backend is None:
            t0 = time.perf_counter()
            self.backend = build_backend(self.s, self.dev, self.args.seed)
            self.dev.sync()
            model = self.backend.model
            self.build = {
                "name": self.backend.name,
                "seconds": round(time.perf_counter() - t0, 2),
                "params": parameter_counts(model),
                "param_device": str(next(model.parameters()).device),
                "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "text": {
                    k: getattr(model.config.text_config, k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "vocab_size",
                    )
                },
                "audio": {
                    k: getattr(model.config.audio_config, k)
                    for k in ("d_model", "encoder_ffn_dim", "encoder_layers", "encoder_attention_heads")
                },
            }
            log(
                f"built {self.backend.name}: {self.build['params']['total'] / 1e6:.1f} M params "
                f"on {self.build['param_device']} in {self.build['param_dtype']} ({self.build['seconds']} s)"
            )
        return self.backend

    def beeps(self) -> Path:
        if self.wav is None:
            self.wav = write_beeps(self.work / "beeps.wav", 6.0, BEEPS)
        return self.wav

    def suite_items(self) -> list[BenchItem]:
        """A small synthetic suite (gold traces with re-listens, 10-20 s clips), written once."""
        if self.suite is None:
            n = max(self.s.rollout_items, self.s.sft_batch, self.s.grpo_items)
            self.suite = write_suite(
                self.work / "suite", n, seed=self.args.seed, split="check", progress=False, durations=(10.0, 20.0)
            )
        return load_benchmark(self.suite)

    def memorised_item(self) -> BenchItem:
        wav = self.beeps()
        return BenchItem(
            id="memorised-0",
            audio=wav,
            question=QUESTION,
            choices=CHOICES,
            answer=GOLD,
            group="count",
            format="mmau",
            source=wav,
            record={},
        )


def _user_message(ref: AudioRef) -> Message:
    """The user turn the graph's `prepare` step builds for one clip 'main'."""
    state = steps.initial_state(new_question(QUESTION, {"main": ref.model_dump()}, CHOICES))
    first: Message = steps.open_question(state)["conversation"][0]
    return first


# ---- phase 2: a full graph run with a re-listen -----------------------------------------------------------


def graph_run(ctx: Context) -> dict[str, Any]:
    backend, dev = ctx.model_backend(), ctx.dev
    wav = ctx.beeps()
    ref = ctx.store.load(wav)
    model = backend.model
    t0 = time.perf_counter()
    handle = model.register_forward_pre_hook(_to_device_hook(dev), with_kwargs=True)
    try:
        loss = memorize(
            backend,
            _user_message(ref),
            TRACE,
            AudioResolver(ctx.store, {"main": ref}),
            ctx.s.memorize_steps,
            lr=ctx.s.memorize_lr,
        )
    finally:
        handle.remove()
    dev.sync()
    memorise_s = time.perf_counter() - t0
    log(f"memorised the trace in {memorise_s:.1f} s (loss {loss:.4f})")
    agent = EchoAgent(backend, ctx.store, AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=160)))
    runs: list[tuple[float, Result]] = []
    for _ in range(2):  # the first run pays one-time costs (stop-string tables, kernels); the second is timed
        t0 = time.perf_counter()
        result = asyncio.run(agent.ask(wav, QUESTION, CHOICES, gold=GOLD))
        dev.sync()
        runs.append((time.perf_counter() - t0, result))
    seconds, result = runs[-1]
    listens = [c.model_dump() for c in result.listens]
    relistened = any(c.valid and (c.start, c.end) == SPAN for c in result.listens)
    answered = result.status == "answered" and result.choice == GOLD
    prompt = backend.last_prompt
    out: dict[str, Any] = {
        "model": ctx.build,
        "memorise": {
            "steps_max": ctx.s.memorize_steps,
            "lr": ctx.s.memorize_lr,
            "final_loss": round(loss, 5),
            "seconds": round(memorise_s, 2),
        },
        "relistened": relistened,
        "answered": answered,
        "answer": result.answer,
        "choice": result.choice,
        "result_status": result.status,
        "listens": listens,
        "reward": result.verdict.reward if result.verdict else None,
        "generated_tokens": result.generated_tokens,
        "audio_inputs_last_call": len(prompt.audios) if prompt else None,
        "prompt_tokens_last_call": len(prompt.input_ids) if prompt else None,
        "seconds_first_run": round(runs[0][0], 3),
        "question_s": round(seconds, 3),
        "generated_tokens_per_s": round(result.generated_tokens / seconds, 1),
        "same_result_both_runs": runs[0][1] == runs[1][1],
    }
    out["_ok"] = relistened and answered
    return out


# ---- phase 3: rollouts per second, batched vs sequential ---------------------------------------------------


def _side(agent: EchoAgent, todo: list[Any], concurrency: int, sampling: SamplingParams, dev: Device) -> dict[str, Any]:
    asyncio.run(run_all(agent, todo[:1], concurrency=1, sampling=sampling))  # warm-up: one-time costs
    dev.sync()
    t0 = time.perf_counter()
    outcomes = asyncio.run(run_all(agent, todo, concurrency=concurrency, sampling=sampling))
    dev.sync()
    wall = time.perf_counter() - t0
    done = [o for o in outcomes if o.state is not None]
    tokens = sum(o.state["generated_tokens"] for o in done if o.state)
    return {
        "concurrency": concurrency,
        "trajectories": len(done),
        "errors": [o.error for o in outcomes if o.error],
        "wall_s": round(wall, 3),
        "trajectories_per_s": round(len(done) / wall, 3),
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / wall, 1),
        "model_calls": sum(o.state["model_calls"] for o in done if o.state),
        "valid_listens": sum(sum(bool(c["valid"]) for c in o.state["listens"]) for o in done if o.state),
        "answered": sum(o.state["status"] == "answered" for o in done if o.state),
        "_outcomes": outcomes,
    }


def _signature(o: RunOutcome) -> Any:
    return None if o.state is None else (o.state["reasoning"], o.state["answer"], o.state["generated_tokens"])


def rollouts(ctx: Context) -> dict[str, Any]:
    backend, s = ctx.model_backend(), ctx.s
    # The memorised question (whose sampled runs re-listen) and synthetic ones (the model has not seen them).
    items = [ctx.memorised_item(), *ctx.suite_items()][: s.rollout_items]
    todo = jobs(items, s.rollout_samples, seed=ctx.args.seed)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=s.max_new_tokens)
    config = AgentConfig(sampling=sampling)
    sequential = _side(EchoAgent(batched(backend, 1), ctx.store, config), todo, 1, sampling, ctx.dev)
    log(f"sequential: {sequential['trajectories_per_s']} traj/s")
    batching = batched(backend, s.max_batch)
    par = _side(EchoAgent(batching, ctx.store, config), todo, len(todo), sampling, ctx.dev)
    log(f"batched: {par['trajectories_per_s']} traj/s")
    seq_out, par_out = sequential.pop("_outcomes"), par.pop("_outcomes")
    same = sum(_signature(a) == _signature(b) for a, b in zip(seq_out, par_out, strict=True))
    sizes = batching.batch_sizes if isinstance(batching, BatchingBackend) else []
    ok = (
        sequential["trajectories_per_s"] > 0
        and par["trajectories_per_s"] > 0
        and not (sequential["errors"] or par["errors"])
    )
    return {
        "jobs": len(todo),
        "items": len(items),
        "samples": s.rollout_samples,
        "temperature": 1.0,
        "max_new_tokens": s.max_new_tokens,
        "max_batch": s.max_batch,
        "sequential": sequential,
        "batched": par,
        "mean_batch": round(statistics.fmean(sizes), 2) if sizes else None,
        "decode_steps": len(sizes),
        # Same seeds, so the same trajectories in exact arithmetic; bf16 kernels on padded batches may differ.
        "identical_trajectories": f"{same}/{len(todo)}",
        "ratio_batched_over_sequential": round(par["trajectories_per_s"] / sequential["trajectories_per_s"], 2),
        "_ok": ok,
    }


# ---- phase 4: GRPO and SFT steps ----------------------------------------------------------------------------


def _accelerator(dev: Device) -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=not dev.cuda)


def _synthetic_advantages(groups: list[list[Trajectory]]) -> list[list[float]]:
    """+1/-1 alternating within each group: used only when every group scored alike (zero advantages), so that
    the update still does real work to time."""
    return [[1.0 if k % 2 == 0 else -1.0 for k in range(len(g))] for g in groups]


def grpo_steps(ctx: Context, accelerator: Any) -> dict[str, Any]:
    backend, s, dev = ctx.model_backend(), ctx.s, ctx.dev
    items = [ctx.memorised_item(), *ctx.suite_items()][: s.grpo_items]
    cfg = GRPOConfig(
        train=ctx.work / "unused.json",
        out=ctx.work / "grpo",
        init="(in memory)",
        steps=s.grpo_steps,
        items_per_step=len(items),
        group_size=s.group_size,
        updates_per_step=1,
        lr=1e-5,
        kl_coef=0.04,
        max_batch=s.max_batch,
        max_new_tokens=s.max_new_tokens,
    )
    reference = copy.deepcopy(backend.model).eval().requires_grad_(False)
    model, optimizer, params = prepare_training(
        backend.model,
        cfg,
        accelerator,
        RunFolder(cfg.out),
        None,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.99),
    )
    agent = EchoAgent(batched(backend, cfg.max_batch), ctx.store, cfg.agent_config())
    records: list[dict[str, Any]] = []
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            model.eval()
            groups = asyncio.run(rollout_groups(agent, backend.encoder, items, cfg.group_size, ctx.args.seed + step))
            rollout_s = time.perf_counter() - t0
            ran = [[t for t in g if t.status != "error"] for g in groups]
            advantages = group_advantages(ran)
            source = "rewards"
            if not any(a for adv in advantages for a in adv):
                advantages, source = _synthetic_advantages(ran), "synthetic (every group scored alike)"
            trajs = [t for g in ran for t in g]
            model.train()
            t1 = time.perf_counter()
            batch = model_inputs(trajs, backend.encoder, ctx.store, accelerator.device)
            batch["advantages"] = torch.tensor([a for adv in advantages for a in adv], device=accelerator.device)
            dev.sync()
            t2 = time.perf_counter()
            stats = policy_update(model, reference, optimizer, accelerator, params, batch, cfg)
            dev.sync()
            update_s = time.perf_counter() - t2
            tokens = int(batch["attention_mask"].sum())
            records.append(
                {
                    "step": step + 1,
                    "rollouts": len(trajs),
                    "rollout_s": round(rollout_s, 3),
                    "inputs_s": round(t2 - t1, 3),
                    "update_s": round(update_s, 3),
                    "tokens": tokens,
                    "update_tokens_per_s": round(tokens / update_s, 1),
                    "mean_reward": round(statistics.fmean(t.reward for t in trajs), 4),
                    "valid_listens": sum(t.valid_listens for t in trajs),
                    "advantages": source,
                    **{k: round(v, 5) for k, v in stats.items()},
                }
            )
            log(f"grpo step {step + 1}: rollouts {rollout_s:.2f} s, update {update_s:.3f} s ({tokens} tokens)")
    finally:
        model.eval()
        del reference, optimizer
    timed = records[1:] or records
    return {
        "items": len(items),
        "group_size": cfg.group_size,
        "kl_coef": cfg.kl_coef,
        "trainable_params": sum(p.numel() for p in params),
        "steps": records,
        "median_step_s": round(statistics.median(r["rollout_s"] + r["inputs_s"] + r["update_s"] for r in timed), 3),
        "median_update_tokens_per_s": round(statistics.median(r["update_tokens_per_s"] for r in timed), 1),
    }


def sft_steps(ctx: Context, accelerator: Any) -> dict[str, Any]:
    backend, s, dev = ctx.model_backend(), ctx.s, ctx.dev
    items = ctx.suite_items()
    assert ctx.suite is not None
    cfg = SFTConfig(
        train=ctx.suite, out=ctx.work / "sft", init="(in memory)", steps=s.sft_steps, batch_size=s.sft_batch, lr=1e-5
    )
    model, optimizer, params = prepare_training(
        backend.model.train(),
        cfg,
        accelerator,
        RunFolder(cfg.out),
        None,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    pad_id = backend.tokenizer.pad_token_id
    data = sft_batches(items, backend.encoder, cfg.audio_mode, cfg.batch_size, cfg.seed, pad_id)
    records: list[dict[str, Any]] = []
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            batch, n_tokens = next(data)
            t1 = time.perf_counter()
            loss = train_step(model, optimizer, accelerator, params, batch, cfg.lr, cfg.grad_clip)
            dev.sync()
            step_s = time.perf_counter() - t1
            records.append(
                {
                    "step": step + 1,
                    "loss": round(loss, 4),
                    "tokens": n_tokens,
                    "audio_inputs": int(batch["input_features"].shape[0]) if "input_features" in batch else 0,
                    "data_s": round(t1 - t0, 3),
                    "step_s": round(step_s, 3),
                    "tokens_per_s": round(n_tokens / step_s, 1),
                }
            )
            log(f"sft step {step + 1}: {step_s:.3f} s ({n_tokens} tokens, loss {loss:.3f})")
    finally:
        model.eval()
        del optimizer
    timed = records[1:] or records
    return {
        "batch_size": cfg.batch_size,
        "trainable_params": sum(p.numel() for p in params),
        "steps": records,
        "median_step_s": round(statistics.median(r["step_s"] for r in timed), 3),
        "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "median_tokens_per_s_with_data": round(
            statistics.median(r["tokens"] / (r["step_s"] + r["data_s"]) for r in timed), 1
        ),
    }


def training(ctx: Context) -> dict[str, Any]:
    accelerator = _accelerator(ctx.dev)
    out: dict[str, Any] = {"accelerator_device": str(accelerator.device)}
    # GRPO first: it rolls out the memorised question, whose sampled runs differ in reward.
    for name, fn in (("grpo", grpo_steps), ("sft", sft_steps)):
        try:
            out[name] = {"status": "ok", **fn(ctx, accelerator)}
        except Exception as err:
            out[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": _tail()}
        finally:
            if ctx.dev.cuda:
                torch.cuda.empty_cache()
    out["_ok"] = all(out[k]["status"] == "ok" for k in ("grpo", "sft"))
    return out


# ---- phase 5: vLLM log-probs against ours ------------------------------------------------------------------


def vllm_check(ctx: Context, time_left: float) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not installed here (nothing is installed by this check)")
    if not ctx.dev.cuda:
        raise Skip("vllm needs a GPU device")
    backend, dev = ctx.model_backend(), ctx.dev
    # A text-only prompt (audio would need vLLM's own multimodal processing of the tiny tokenizer's layout).
    user: Message = {"role": "user", "content": [text_part(f"{QUESTION} Choices: {CHOICES}.")]}
    resolver = AudioResolver(ctx.store, {})
    request = GenerationRequest(
        messages=[user], sampling=SamplingParams(temperature=1.0, max_new_tokens=ctx.s.vllm_tokens, seed=1)
    )
    gen = asyncio.run(backend.generate(request, resolver))
    prompt_ids = backend.encode(request, resolver).input_ids
    ids = [*prompt_ids, *gen.token_ids]
    with torch.inference_mode():
        t = torch.tensor([ids], device=dev.name)
        ours, _ = sequence_logprobs(backend.model, {"input_ids": t, "attention_mask": torch.ones_like(t)}, 1.0)
    ours_sampled = ours[0, len(prompt_ids) :].tolist()
    model_dir = ctx.work / "vllm-model"
    backend.model.save_pretrained(model_dir)
    backend.processor.save_pretrained(model_dir)
    spec = ctx.work / "vllm-spec.json"
    result_path = ctx.work / "vllm-result.json"
    dtype = str(dev.dtype).removeprefix("torch.")
    spec.write_text(json.dumps({"model": str(model_dir), "ids": ids, "dtype": dtype, "out": str(result_path)}))
    if dev.cuda:
        torch.cuda.empty_cache()
    timeout = max(30.0, time_left - 15.0)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--vllm-worker", str(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"the vLLM worker ran past {timeout:.0f} s") from err
    worker_s = time.perf_counter() - t0
    if not result_path.is_file():
        raise RuntimeError(f"the vLLM worker exited {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}")
    res = json.loads(result_path.read_text())
    if "skipped" in res:
        raise Skip(res["skipped"])
    theirs = res["prompt_logprobs"][len(prompt_ids) :]
    diffs = [abs(a - b) for a, b in zip(ours_sampled, theirs, strict=True)]
    sampled_diffs = [abs(a - b) for a, b in zip(ours_sampled, gen.logprobs, strict=True)]
    return {
        "vllm": res.get("version"),
        "prompt": "text only",
        "prompt_tokens": len(prompt_ids),
        "sampled_tokens": len(gen.token_ids),
        "max_abs_diff_vllm_vs_sequence_logprobs": round(max(diffs), 5),
        "mean_abs_diff_vllm_vs_sequence_logprobs": round(statistics.fmean(diffs), 5),
        "max_abs_diff_generate_vs_sequence_logprobs": round(max(sampled_diffs), 5),
        "worker_s": round(worker_s, 1),
        "vllm_load_s": res.get("load_s"),
    }


def vllm_worker(spec_path: Path) -> int:
    """Run in a subprocess (a hang or crash in vLLM cannot take the check down): prompt log-probs of `ids`."""
    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    try:
        vllm: Any = importlib.import_module("vllm")
        LLM, VSampling = vllm.LLM, vllm.SamplingParams
        TokensPrompt = getattr(importlib.import_module("vllm.inputs"), "TokensPrompt", None) or vllm.TokensPrompt
    except Exception as err:
        out.write_text(json.dumps({"skipped": f"vllm is installed but does not import: {type(err).__name__}: {err}"}))
        return 0
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=4096,
        seed=0,
        limit_mm_per_prompt={"audio": 1},
    )
    load_s = time.perf_counter() - t0
    ids: list[int] = spec["ids"]
    params = VSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    res = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
    logprobs = [0.0] + [float(entry[tok].logprob) for tok, entry in zip(ids[1:], res.prompt_logprobs[1:], strict=True)]
    out.write_text(json.dumps({"version": vllm.__version__, "load_s": round(load_s, 1), "prompt_logprobs": logprobs}))
    return 0


# ---- the driver ------------------------------------------------------------------------------------------


def _tail() -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-12:])


def run_phase(
    phases: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], start: float, budget: float, reserve: float
) -> None:
    elapsed = time.perf_counter() - start
    if elapsed + reserve > budget:
        phases[name] = {
            "status": "skipped",
            "reason": f"time budget: {elapsed:.0f} of {budget:.0f} s used, the phase needs about {reserve:.0f} s",
        }
        log(f"{name}: skipped (budget)")
        return
    log(f"{name}: start at {elapsed:.1f} s")
    t0 = time.perf_counter()
    try:
        details = fn()
        ok = details.pop("_ok", True)
        phases[name] = {"status": "ok" if ok else "failed", **details}
    except Skip as why:
        phases[name] = {"status": "skipped", "reason": str(why)}
    except Exception as err:
        phases[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": _tail()}
    phases[name]["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"{name}: {phases[name]['status']} in {phases[name]['seconds']} s")


def settings_from(args: argparse.Namespace) -> Settings:
    base = asdict(PRESETS["tiny" if args.tiny else "default"])
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return Settings(**base)


def summary_lines(report: dict[str, Any]) -> list[str]:
    ph = report["phases"]
    lines = [f"gpu_check on {report['device']} ({report['dtype']}), {report['total_s']} s of {report['budget_s']} s"]
    env = ph.get("environment", {})
    lines.append(
        f"  environment  {env.get('status')}: {env.get('device_name')}, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, bf16 {env.get('bf16_supported')}"
    )
    g = ph.get("graph_run", {})
    if "memorise" in g:
        lines.append(
            f"  graph_run    {g['status']}: {g['model']['params']['total'] / 1e6:.1f} M params, memorised in "
            f"{g['memorise']['seconds']} s (loss {g['memorise']['final_loss']}), re-listened "
            f"{g['relistened']}, answer {g['answer']!r}, {g['question_s']} s per question, "
            f"{g['generated_tokens_per_s']} tok/s"
        )
    r = ph.get("rollouts", {})
    if "sequential" in r:
        lines.append(
            f"  rollouts     {r['status']}: {r['jobs']} jobs, sequential {r['sequential']['trajectories_per_s']}"
            f" traj/s, batched {r['batched']['trajectories_per_s']} traj/s, ratio "
            f"{r['ratio_batched_over_sequential']}x, mean batch {r['mean_batch']}"
        )
    t = ph.get("training", {})
    for k in ("grpo", "sft"):
        if t.get(k, {}).get("status") == "ok":
            tok = t[k].get("median_update_tokens_per_s", t[k].get("median_tokens_per_s"))
            lines.append(f"  training     {k}: median step {t[k]['median_step_s']} s, {tok} tokens/s")
    for name in PHASES:
        p = ph.get(name, {})
        if p.get("status") != "ok":
            lines.append(f"  {name:<12} {p.get('status')}: {p.get('reason') or p.get('error')}")
    v = ph.get("vllm", {})
    if v.get("status") == "ok":
        lines.append(f"  vllm         ok: max |logp diff| {v['max_abs_diff_vllm_vs_sequence_logprobs']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or auto (default cuda)")
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="small sizes and workload (a CPU rehearsal in about a minute)")
    ap.add_argument("--hidden", type=int, help="text decoder width (default 2048; --tiny 64)")
    ap.add_argument("--layers", type=int, help="text decoder layers (default 4; --tiny 2)")
    ap.add_argument("--audio-hidden", type=int, help="audio encoder d_model (default 1280; --tiny 32)")
    ap.add_argument("--audio-layers", type=int, help="audio encoder layers (default 6; --tiny 2)")
    ap.add_argument("--memorize-steps", type=int, help="max teacher-forcing steps (default 300)")
    ap.add_argument("--memorize-lr", type=float, help="Adam lr for memorising (default 1e-3; --tiny 1e-2)")
    ap.add_argument("--max-new-tokens", type=int, help="per generate call in rollouts and GRPO (default 128)")
    ap.add_argument("--rollout-items", type=int, help="synthetic items rolled out (default 8)")
    ap.add_argument("--rollout-samples", type=int, help="samples per item (default 4)")
    ap.add_argument("--max-batch", type=int, help="rows decoded together when batched (default 64)")
    ap.add_argument("--grpo-steps", type=int, help="GRPO steps (default 3)")
    ap.add_argument("--group-size", type=int, help="GRPO rollouts per question (default 4)")
    ap.add_argument("--sft-steps", type=int, help="SFT steps (default 5)")
    ap.add_argument("--sft-batch", type=int, help="SFT batch size (default 8)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no phase starts past this (default 420 s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on --device cpu (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--vllm-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vllm_worker is not None:
        return vllm_worker(args.vllm_worker)

    start = time.perf_counter()
    s = settings_from(args)
    phases: dict[str, Any] = {}
    dev: Device | None = None
    try:
        name, dtype, _ = placement(args.device, args.dtype)
        dev = Device(name, dtype)
    except Exception as err:
        phases["environment"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    if dev is not None and not dev.cuda:
        torch.set_num_threads(args.threads)  # tiny models: thread hand-offs cost more than they save
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    reserve = RESERVE_S_TINY if args.tiny else RESERVE_S
    with tempfile.TemporaryDirectory(prefix="gpu_check-work-") as tmp:
        if dev is not None:
            ctx = Context(args, s, dev, Path(tmp))
            device = dev

            def timed(name: str, fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
                def run() -> dict[str, Any]:
                    device.reset_peak()
                    details = fn()
                    details["peak_memory_gib"] = device.peak_gib()
                    return details

                return run

            run_phase(
                phases, "environment", lambda: environment(device, (args.device, args.dtype)), start, args.budget_s, 0.0
            )
            run_phase(
                phases,
                "graph_run",
                timed("graph_run", lambda: graph_run(ctx)),
                start,
                args.budget_s,
                reserve["graph_run"],
            )
            run_phase(
                phases, "rollouts", timed("rollouts", lambda: rollouts(ctx)), start, args.budget_s, reserve["rollouts"]
            )
            run_phase(
                phases, "training", timed("training", lambda: training(ctx)), start, args.budget_s, reserve["training"]
            )
            run_phase(
                phases,
                "vllm",
                lambda: vllm_check(ctx, args.budget_s - (time.perf_counter() - start)),
                start,
                args.budget_s,
                reserve["vllm"],
            )
        for name in PHASES:
            phases.setdefault(name, {"status": "skipped", "reason": "no usable device"})
    report: dict[str, Any] = {
        "ok": all(phases[p]["status"] == "ok" for p in PHASES[:4]) and phases["vllm"]["status"] != "failed",
        "device": dev.name if dev else args.device,
        "dtype": str(dev.dtype).removeprefix("torch.") if dev else args.dtype,
        "tiny": args.tiny,
        "settings": asdict(s),
        "budget_s": args.budget_s,
        "total_s": round(time.perf_counter() - start, 1),
        "phases": {p: phases[p] for p in PHASES},
    }
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"report written to {path}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(summary_lines(report)))
    return 0 if not any(phases[p]["status"] == "failed" for p in PHASES) else 1


if __name__ == "__main__":
    sys.exit(main())

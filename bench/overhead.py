"""How much wall time the LangGraph state machine adds on top of the model calls it makes.

    .venv/bin/python bench/overhead.py [--reps 20] [--json] [--check] [--hidden 32 --layers 2]

One process, one model, one WAV. A tiny random Qwen2-Audio first memorises one Echo trace with a
re-listen (the approach of tests/memorize.py), so greedy decoding really stops on `</seg>`, the slice
is cut and fed back, and the model answers. Then the same question is answered, interleaved, by:

* graph: `EchoAgent(backend, store, config).ask(...)`, i.e. `graph.ainvoke` without a checkpointer;
* bare loop: a plain async loop over the very steps the graph's nodes wrap (`echo_agent.graphs.steps`:
  open_question, model_request, absorb_generation, apply_listens, judge), without LangGraph and without a
  streaming callback (`on_delta=None`);
* graph, no on_delta (diagnostic): the graph again, with the `on_delta` its model node always passes
  dropped before the backend; it splits the graph's overhead into LangGraph itself and the backend's
  per-token streamer, which `ainvoke` pays for although nothing is streamed.

Every run must give the same `Result` and send the same `GenerationRequest`s (log-probs aside), so
the comparison is like for like. The machine is shared and noisy, hence one process, interleaved
repetitions after warm-ups, and medians. The headline is median(graph) / median(bare loop) of wall
time; the per-round ratio, the CPU-time ratio (barely moved by other processes' load) and the time
spent outside model calls are printed alongside to judge it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_beeps
from memorize import Trace, memorize

from echo_agent.agent import EchoAgent, Result
from echo_agent.audio import AudioRef, AudioStore
from echo_agent.backends.base import AudioResolver, DeltaCallback, Generation, GenerationRequest
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.graphs import steps
from echo_agent.graphs.state import new_question
from echo_agent.messages import Message
from echo_agent.protocols import SegTagProtocol
from echo_agent.tiny_models import (
    QWEN_TOKEN_IDS,
    build_qwen2_audio_processor,
    build_tiny_qwen2_audio,
    tiny_qwen2_audio_config,
)
from echo_agent.tools.listen import ListenTool

TARGET = 1.05
SR = 16000
BEEPS = [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)]
QUESTION, CHOICES, GOLD = "How many beeps are there?", ["3", "4", "5"], "4"
# The trace the model memorises (as in tests/test_graph_e2e.py): think, re-listen to 2-3 s, answer.
SPAN = (2.0, 3.0)
TRACE = Trace(
    before="<think>Two beeps sit close together near <seg>2.0, 3.0</seg>",
    span=SPAN,
    after=" yes, two there, one at 1 s and one at 4.5 s.</think><answer>4</answer>",
)


# ---- setup: audio, model, memorised trace -----------------------------------------------------------


def build_backend(hidden: int, layers: int, seed: int = 0) -> TransformersBackend:
    """The tests' tiny Qwen2-Audio (hidden 32, 2 layers), or the same architecture scaled up."""
    if (hidden, layers) == (32, 2):
        model, processor = build_tiny_qwen2_audio(seed=seed)
        return TransformersBackend(model, processor, name="tiny-qwen2-audio-h32-l2")
    if hidden % 4:
        raise SystemExit(f"--hidden must be a multiple of 4 (4 attention heads), got {hidden}")
    processor = build_qwen2_audio_processor()
    base: Any = tiny_qwen2_audio_config(len(processor.tokenizer))
    text = base.text_config.to_dict()
    text.pop("layer_types", None)  # one entry per layer: rebuilt from num_hidden_layers
    text.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    audio = base.audio_config.to_dict()
    audio.update(d_model=hidden, encoder_ffn_dim=2 * hidden, encoder_layers=layers)
    config = Qwen2AudioConfig(text_config=text, audio_config=audio, audio_token_index=base.audio_token_index)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    gen = model.generation_config  # as tiny_models does: chat-model eos/pad/bos
    gen.eos_token_id = [QWEN_TOKEN_IDS["<|im_end|>"], QWEN_TOKEN_IDS["<|endoftext|>"]]
    gen.pad_token_id = gen.bos_token_id = QWEN_TOKEN_IDS["<|endoftext|>"]
    return TransformersBackend(model, processor, name=f"tiny-qwen2-audio-h{hidden}-l{layers}")


def user_message(ref: AudioRef) -> Message:
    """The user turn the graph's `prepare` step builds for one clip 'main'."""
    state = steps.initial_state(new_question(QUESTION, {"main": ref.model_dump()}, CHOICES))
    first: Message = steps.open_question(state)["conversation"][0]
    return first


# ---- a pass-through backend that records every model call ---------------------------------------------


@dataclass
class ModelCall:
    request: GenerationRequest
    streamed: bool
    seconds: float


@dataclass
class Recorder:
    """Wraps the real backend for both paths alike: records each request and how long the call took."""

    inner: TransformersBackend
    calls: list[ModelCall] = field(default_factory=list)
    mute: bool = False  # drop the caller's on_delta (diagnostic: the graph without its token streamer)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        delta = None if self.mute else on_delta
        t0 = time.perf_counter()
        gen = await self.inner.generate(request, audio, delta)
        self.calls.append(ModelCall(request, delta is not None, time.perf_counter() - t0))
        return gen


# ---- path B: the bare loop ------------------------------------------------------------------------------


async def bare_ask(
    backend: Recorder,
    store: AudioStore,
    cfg: AgentConfig,
    wav: Path,
    question: str,
    choices: list[str],
    gold: str | None,
) -> Result:
    """What the graph does for one question on one clip, as a plain loop over the graph's own steps
    (`echo_agent.graphs.steps`): same requests, same result, no LangGraph."""
    protocol, tool = SegTagProtocol(), ListenTool(cfg.listen)
    ref = store.load(wav)  # EchoAgent.ask loads (hashes) the file on every question too
    state = steps.initial_state(new_question(question, {"main": ref.model_dump()}, choices, gold))
    state.update(steps.open_question(state))
    resolver = AudioResolver(store, {"main": ref})
    while True:
        request = steps.model_request(state, cfg, protocol, cfg.sampling)
        gen = await backend.generate(request, resolver)  # no streaming callback: nobody listens
        state.update(steps.absorb_generation(state, gen, protocol))
        if state["pending"]:
            update, _ = steps.apply_listens(state, tool, protocol)
            state.update(update)
            if steps.may_continue(state, cfg):
                continue
        update, _ = steps.judge(state, cfg)
        state.update(update)
        if state["status"] != "retry":
            return Result.from_state(state)


# ---- measurement ----------------------------------------------------------------------------------------


def call_signature(call: ModelCall) -> Any:
    """A request as plain data, sampled log-probs left out (they are outputs, not part of the request)."""
    data = call.request.model_dump()
    for msg in data["messages"]:
        for part in msg["content"]:
            part.pop("logprobs", None)
    return data


@dataclass
class Arm:
    name: str
    run: Callable[[], Awaitable[Result]]
    totals: list[float] = field(default_factory=list)  # wall seconds per question
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per question (all threads)
    model: list[float] = field(default_factory=list)  # seconds inside backend.generate per question
    call_seconds: list[float] = field(default_factory=list)  # every model call
    mute: bool = False  # run with Recorder.mute
    streamed: bool = False


async def measure(paths: list[Arm], recorder: Recorder, reps: int, warmup: int) -> tuple[Result, list[Any]]:
    """Interleaved runs (A, B, C, then C, B, A, ...); returns the reference result and requests."""
    reference: tuple[Result, list[Any]] | None = None
    for i in range(warmup + reps):
        for path in paths if i % 2 == 0 else paths[::-1]:
            recorder.calls.clear()
            recorder.mute = path.mute
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            result = await path.run()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            requests = [call_signature(c) for c in recorder.calls]
            if reference is None:
                reference = (result, requests)
            elif (result, requests) != reference:
                raise SystemExit(f"{path.name}: run {i} differs from the first run (result or model requests)")
            path.streamed = all(c.streamed for c in recorder.calls)
            if i >= warmup:
                path.totals.append(elapsed)
                path.cpu.append(cpu)
                path.model.append(sum(c.seconds for c in recorder.calls))
                path.call_seconds += [c.seconds for c in recorder.calls]
    assert reference is not None
    return reference


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="measured runs per path (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured runs per path first (default 2)")
    ap.add_argument("--hidden", type=int, default=32, help="model width (default 32: the tests' tiny model)")
    ap.add_argument("--layers", type=int, default=2, help="decoder and audio-encoder layers (default 2)")
    ap.add_argument("--steps", type=int, default=300, help="max training steps to memorise the trace")
    ap.add_argument("--no-diagnostic", action="store_true", help="skip the graph-without-on_delta path")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--check", action="store_true", help=f"exit 1 when the ratio is above {TARGET}")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        ap.error("--reps and --warmup must be at least 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save
    with tempfile.TemporaryDirectory() as tmp:
        wav = write_beeps(Path(tmp) / "beeps.wav", 6.0, BEEPS)
        backend = build_backend(args.hidden, args.layers)
        store = AudioStore()
        ref = store.load(wav)
        t0 = time.perf_counter()
        loss = memorize(backend, user_message(ref), TRACE, AudioResolver(store, {"main": ref}), args.steps)
        train_s = time.perf_counter() - t0
        params = sum(p.numel() for p in backend.model.parameters())
        log(f"model {backend.name} ({params / 1e6:.2f} M params), torch threads {torch.get_num_threads()}")
        log(f"memorised the trace in {train_s:.1f} s (loss {loss:.4f})")
        if loss >= 0.05:
            raise SystemExit(f"the model did not memorise the trace (loss {loss:.3f}); try more --steps")

        cfg = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=120))
        recorder = Recorder(backend)
        agent = EchoAgent(recorder, store, cfg)

        paths = [
            Arm("graph", lambda: agent.ask(wav, QUESTION, CHOICES, gold=GOLD)),
            Arm("bare loop", lambda: bare_ask(recorder, store, cfg, wav, QUESTION, CHOICES, GOLD)),
        ]
        if not args.no_diagnostic:
            paths.append(Arm("graph, no on_delta", lambda: agent.ask(wav, QUESTION, CHOICES, gold=GOLD), mute=True))
        load_before = os.getloadavg()[0]
        result, requests = asyncio.run(measure(paths, recorder, args.reps, args.warmup))
        load_after = os.getloadavg()[0]

    if result.answer != GOLD or [(c.start, c.end, c.valid) for c in result.listens] != [(*SPAN, True)]:
        raise SystemExit(f"unexpected run: answer {result.answer!r}, listens {result.listens}")
    graph, bare = paths[0], paths[1]
    med = {p.name: statistics.median(p.totals) for p in paths}
    outside = {p.name: statistics.median(t - m for t, m in zip(p.totals, p.model, strict=True)) for p in paths}
    ratio = med[graph.name] / med[bare.name]
    # Runs of one round are adjacent in time, so their ratio cancels slow drifts of the machine's load.
    paired = statistics.median(g / b for g, b in zip(graph.totals, bare.totals, strict=True))
    # CPU time of this process barely moves with other processes' load: a steadier view of the same work.
    cpu_ratio = statistics.median(graph.cpu) / statistics.median(bare.cpu)
    mean_call = statistics.fmean(bare.call_seconds)
    report: dict[str, Any] = {
        "model": backend.name,
        "params": params,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "reps": args.reps,
        "warmup": args.warmup,
        "answer": result.answer,
        "listens": [c.model_dump() for c in result.listens],
        "model_calls_per_question": len(requests),
        "paths": {
            p.name: {
                "median_ms": ms(med[p.name]),
                "min_ms": ms(min(p.totals)),
                "median_outside_model_ms": ms(outside[p.name]),
                "median_cpu_ms": ms(statistics.median(p.cpu)),
                "mean_model_call_ms": ms(statistics.fmean(p.call_seconds)),
                "streamed": p.streamed,
                "runs_ms": [ms(t) for t in p.totals],
            }
            for p in paths
        },
        "graph_overhead_ms": ms(med[graph.name] - med[bare.name]),
        "graph_overhead_outside_model_ms": ms(outside[graph.name] - outside[bare.name]),
        "model_share_of_bare": round(statistics.median(bare.model) / med[bare.name], 4),
        "ratio": round(ratio, 4),
        "paired_ratio_median": round(paired, 4),
        "cpu_ratio": round(cpu_ratio, 4),
        "target": TARGET,
        "ok": ratio <= TARGET,
    }
    if not args.no_diagnostic:
        report["ratio_graph_without_on_delta"] = round(med[paths[2].name] / med[bare.name], 4)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"per question: {len(requests)} model calls, listens "
            f"{[f'{c.start:g}-{c.end:g} s' for c in result.listens]}, answer {result.answer!r} "
            "(identical on every run of every path)"
        )
        print(
            f"{args.reps} measured runs per path after {args.warmup} warm-ups, interleaved; "
            f"1-min load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs"
        )
        print(f"{'path':<18}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}{'outside model ms':>18}{'mean call ms':>14}")
        for p in paths:
            r = report["paths"][p.name]
            print(
                f"{p.name:<18}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['median_cpu_ms']:>9.1f}"
                f"{r['median_outside_model_ms']:>18.2f}{r['mean_model_call_ms']:>14.1f}"
            )
        print(
            f"mean model call: {ms(mean_call):.1f} ms; model calls are "
            f"{100 * report['model_share_of_bare']:.1f} % of the bare loop's time"
        )
        print(
            f"graph overhead per question: {report['graph_overhead_ms']:.2f} ms (difference of medians), "
            f"{report['graph_overhead_outside_model_ms']:.2f} ms outside the model calls"
        )
        print(f"median of per-round ratios (graph / bare loop, adjacent runs): {paired:.3f}")
        print(f"CPU-time ratio (graph / bare loop, medians; steadier under other load): {cpu_ratio:.3f}")
        if not args.no_diagnostic:
            muted = paths[2]
            print(
                f"diagnostic, graph with its on_delta dropped: ratio {med[muted.name] / med[bare.name]:.3f} "
                f"(CPU {statistics.median(muted.cpu) / statistics.median(bare.cpu):.3f}); the token streamer "
                f"costs the graph {ms(med[graph.name] - med[muted.name]):.2f} ms "
                f"({ms(statistics.median(graph.cpu) - statistics.median(muted.cpu)):.2f} ms CPU) per question"
            )
        print(f"overhead ratio (graph / bare loop): {ratio:.3f}  target <= {TARGET}")
    return 1 if args.check and ratio > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())

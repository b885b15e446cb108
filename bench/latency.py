"""Latency of one interleaved answer on the CPU: a long clip, re-listens, from a cold start.

    .venv/bin/python bench/latency.py --model DIR --suite SUITE.json [--answers 24] [--min-seconds 28]
                                      [--threads 2] [--json]

Issue 16's target for echo-tiny 2: a full interleaved answer to a question about a 30 s clip with two re-listens
in under 1.5 s on 2 CPU cores. The script loads the model once, takes the suite's items whose clip is at least
`--min-seconds` long (the longest ones if too few are), and answers each with `EchoAgent.ask`, greedy, in
interleaved mode. Every answer starts cold: the audio caches (prompt features, Whisper frames, audio tokens) are
emptied first, so each answer pays for hearing its whole clip and every slice, as a new user's first question does.

Per answer it records the wall time, how many valid re-listens the model made, and the time spent inside the frozen
Whisper encoder (a timing wrapper around its forward: the encoder's share of the answer). It prints the medians
over the answers with exactly two re-listens (the target's case), and over all answers. Which answers have two
re-listens is the model's own doing: the script never forces a listen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from echo_agent.agent import EchoAgent
from echo_agent.audio import AudioStore
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.whisper_encoder import WhisperAudioEncoder


class EncoderClock:
    """Seconds spent in `WhisperAudioEncoder.forward` (a timing wrapper, installed for the run)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._forward = WhisperAudioEncoder.forward

    def __enter__(self) -> EncoderClock:
        clock, forward = self, self._forward

        def timed(module: WhisperAudioEncoder, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return forward(module, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t0

        WhisperAudioEncoder.forward = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        WhisperAudioEncoder.forward = self._forward  # type: ignore[method-assign]


def cold(backend: TransformersBackend) -> None:
    """Empty every audio cache between answers: prompt features, audio tokens, Whisper frames."""
    backend.encoder._features.clear()
    backend.encoder._cached_bytes = 0
    model = backend.model
    model.__dict__.pop("audio_cache", None)
    frames = getattr(getattr(model, "audio_encoder", None), "frame_cache", None)
    if frames is not None:
        frames.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (echo-tiny 2)")
    p.add_argument("--suite", type=Path, required=True, help="suite JSON (a dev split)")
    p.add_argument("--answers", type=int, default=24)
    p.add_argument("--min-seconds", type=float, default=28.0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--json", action="store_true", help="print the result object only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    items = [i for i in load_benchmark(args.suite) if i.thread is None]
    seconds = {i.id: float(i.record.get("duration") or 0.0) for i in items}
    items.sort(key=lambda i: -seconds[i.id])
    chosen = [i for i in items if seconds[i.id] >= args.min_seconds][: args.answers] or items[: args.answers]
    backend = TransformersBackend.from_pretrained(args.model)
    config = AgentConfig(
        mode="interleaved", sampling=SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    )
    agent = EchoAgent(backend, config=config)
    store = AudioStore()

    # Warm-up (first-call allocations, stop-string tables, the encoder's load): not timed.
    asyncio.run(agent.ask(store.load(chosen[0].audio), chosen[0].question, chosen[0].choices))
    rows: list[dict[str, Any]] = []
    for item in chosen:
        cold(backend)
        ref = store.load(item.audio)
        with EncoderClock() as clock:
            t0 = time.perf_counter()
            result = asyncio.run(agent.ask(ref, item.question, item.choices))
            wall = time.perf_counter() - t0
        rows.append({
            "id": item.id, "seconds": seconds[item.id], "wall_s": round(wall, 4), "encoder_s": round(clock.seconds, 4),
            "listens": sum(c.valid for c in result.listens), "tokens": result.generated_tokens,
        })  # fmt: skip

    def summary(group: list[dict[str, Any]]) -> dict[str, Any]:
        if not group:
            return {"answers": 0}
        wall = statistics.median(r["wall_s"] for r in group)
        enc = statistics.median(r["encoder_s"] for r in group)
        share = statistics.median(r["encoder_s"] / r["wall_s"] for r in group)
        tokens = statistics.median(r["tokens"] for r in group)
        return {"answers": len(group), "median_wall_s": round(wall, 3), "median_encoder_s": round(enc, 3),
                "median_encoder_share": round(share, 3), "median_tokens": tokens}  # fmt: skip

    report = {
        "model": args.model, "threads": args.threads, "clip_seconds": [min(r["seconds"] for r in rows),
        max(r["seconds"] for r in rows)], "two_listens": summary([r for r in rows if r["listens"] == 2]),
        "all": summary(rows), "listens": {str(k): sum(r["listens"] == k for r in rows) for k in range(6)},
        "rows": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    low, high = report["clip_seconds"]
    print(f"{args.model}: {len(rows)} cold answers on {args.threads} thread(s), clips {low:.1f}-{high:.1f} s; "
          f"listens per answer {report['listens']}")  # fmt: skip
    for name in ("two_listens", "all"):
        s = report[name]
        if s["answers"]:
            share = 100 * s["median_encoder_share"]
            print(f"  {name:<12} n={s['answers']:<3} median {s['median_wall_s']:.3f} s, encoder "
                  f"{s['median_encoder_s']:.3f} s ({share:.0f}%), {s['median_tokens']} tokens")  # fmt: skip
        else:
            print(f"  {name:<12} no answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

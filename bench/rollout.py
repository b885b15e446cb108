"""Rollout throughput: batched, concurrent trajectory collection against sequential one-at-a-time rollouts.

    .venv/bin/python bench/rollout.py [--items 16] [--samples 8] [--concurrency 64] [--max-new-tokens 120]
                                      [--model DIR] [--threads 1] [--json]

Both sides run `echo_agent.training.collect.collect` (the real graph, record building and fsynced writes
included) over the same synthetic suite with the same model, sampling settings and per-(item, sample) seeds:

* sequential: a plain `TransformersBackend` and one rollout at a time, each model call its own
  `model.generate`, the way the official Echo code rolls out;
* batched: `BatchingBackend` in front of the same backend and `--concurrency` graph runs in flight, so model
  calls that meet are decoded together.

The model is echo-tiny at the size of `training.sft.SFTConfig(hidden_size=128, layers=3, intermediate_size=384)`,
freshly initialised (random weights: throughput only), or the model directory given with `--model`. Generation
is capped at `--max-new-tokens` per call so lengths are realistic. Because seeds are per (item, sample), both
sides sample the same trajectories (compared and printed): the ratio is like for like. The headline is
trajectories per second, batched / sequential; CPU time per trajectory is printed too, since the machine may
be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from echo_agent.agent import EchoAgent
from echo_agent.backends.base import ModelBackend
from echo_agent.backends.batching import BatchingBackend
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.training.collect import collect, read_trajectories
from echo_agent.training.common import load_items, load_model
from echo_agent.training.sft import SFTConfig
from echo_agent.training.synth import write_suite


def _backend(model_dir: str | None, data: Path) -> TransformersBackend:
    if model_dir is not None:
        return TransformersBackend.from_pretrained(model_dir)
    cfg = SFTConfig(train=data, out=data.parent / "unused", hidden_size=128, layers=3, intermediate_size=384)
    model, processor = load_model(cfg.init, cfg, load_items(data), cfg.seed)
    return TransformersBackend(model, processor, name="echo-tiny (random)")


def _run(agent: EchoAgent, items: list[BenchItem], samples: int, out: Path, concurrency: int) -> dict[str, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = asyncio.run(collect(agent, items, samples=samples, out=out, concurrency=concurrency, progress=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    records = read_trajectories(out)[0]
    tokens = sum(t.generated_tokens for t in records.values())
    return {
        "trajectories": summary.written,
        "wall_s": round(wall, 3),
        "trajectories_per_s": round(summary.written / wall, 3),
        "cpu_s_per_trajectory": round(cpu / summary.written, 4),
        "generated_tokens_per_s": round(tokens / wall, 1),
        "model_calls": sum(t.model_calls for t in records.values()),
        "valid_listens": sum(sum(c.valid for c in t.listens) for t in records.values()),
        "_records": records,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="trajectories per item")
    p.add_argument("--concurrency", type=int, default=64, help="graph runs in flight on the batched side")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--model", default=None, help="a model directory (default: a random echo-tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    p.add_argument("--json", action="store_true", help="print the result object only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_suite(root / "suite", args.items, seed=0, split="bench", progress=False, durations=(10.0, 20.0))
        items = load_benchmark(data)
        backend = _backend(args.model, data)
        config = AgentConfig(sampling=SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens))
        sides: dict[str, tuple[ModelBackend, int]] = {
            "sequential": (backend, 1),
            "batched": (BatchingBackend(backend, max_batch=args.max_batch), args.concurrency),
        }
        results: dict[str, dict[str, Any]] = {}
        for name, (model_backend, concurrency) in sides.items():
            agent = EchoAgent(model_backend, config=config)
            # Warm-up (one-time costs: stop-string tables, mel filter banks, first-call allocations).
            _run(agent, items[:1], 1, root / f"warm-{name}.jsonl", 1)
            results[name] = _run(agent, items, args.samples, root / f"{name}.jsonl", concurrency)
    seq, bat = results["sequential"], results["batched"]
    same = sum(
        bat["_records"][k].response_ids == t.response_ids for k, t in seq["_records"].items() if k in bat["_records"]
    )
    for r in results.values():
        r.pop("_records")
    report = {
        "model": backend.name,
        "device": str(backend.model.device),
        "threads": args.threads,
        "items": args.items,
        "samples": args.samples,
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "sequential": seq,
        "batched": bat,
        "mean_batch": round(sum(sides["batched"][0].batch_sizes) / max(1, len(sides["batched"][0].batch_sizes)), 2),  # type: ignore[union-attr]
        "identical_trajectories": f"{same}/{seq['trajectories']}",
        "prefix_hits": getattr(sides["batched"][0].prefixes, "hits", 0),  # type: ignore[union-attr]
        "prefix_tokens_reused": getattr(sides["batched"][0].prefixes, "reused_tokens", 0),  # type: ignore[union-attr]
        "ratio": round(bat["trajectories_per_s"] / seq["trajectories_per_s"], 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} on {report['device']} ({args.threads} thread(s)); "
          f"{args.items} items x {args.samples} samples, max_new_tokens {args.max_new_tokens}")  # fmt: skip
    for name, r in (("sequential", seq), ("batched", bat)):
        print(f"  {name:<10} {r['trajectories_per_s']:>7.2f} traj/s  {r['generated_tokens_per_s']:>8.1f} tok/s  "
              f"{r['cpu_s_per_trajectory']:.3f} CPU s/traj  {r['model_calls']} model calls")  # fmt: skip
    print(f"  mean batch {report['mean_batch']}, identical trajectories {report['identical_trajectories']}")
    print(f"ratio (batched / sequential trajectories per second): {report['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fairness of `echo-agent serve`: the latency of a victim's small requests while another client sends maximal ones.

    .venv/bin/python bench/serve_fairness.py [--victim 30] [--attackers 2] [--model echo-tiny] [--json]

One `echo-agent serve` subprocess on loopback, with its default limits (`--max-prompt-tokens 4096`, `--max-tokens
4096`, `--max-batch 16`). The victim asks the agent small questions about a 6 s clip, one after another: first
alone (unloaded), then while `--attackers` clients each send, back to back, the largest requests the limits admit:
a raw-model prompt just under `--max-prompt-tokens` that asks for `--max-tokens` new tokens, and an agent question
of the same size with the same `max_tokens`. The script prints the victim's p50 and p95 latency unloaded and
loaded, and the ratio of the p95s (the target is at most 2). It also counts the attackers' answers by status: a
maximal agent question whose conversation grows past the prompt limit gets a 400, as it should.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_beeps  # the tests' shared fixtures, not copies of them
from served import ServeProcess, serve_env


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[18] if len(xs) > 1 else xs[0]


def maximal_text(model: str, limit: int) -> str:
    """Text whose prompt is just under the limit, sized with the served model's own tokenizer."""
    from echo_agent.agent import load_backend

    encoder = getattr(load_backend(model), "encoder", None)
    words = "the quick brown fox jumps over the lazy dog again and "
    if encoder is None:
        return words * (limit // len(words) - 10)
    n = len(encoder.encode_text(words))
    target = limit - 300  # room for the chat template, the instruction and the clip's audio tokens
    return words * (target // n)


async def victim_round(http: httpx.AsyncClient, clip: str, n: int) -> list[float]:
    latencies = []
    for i in range(n):
        body = {"model": "echo-agent", "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
            {"type": "text", "text": f"How many beeps are there? ({i % 3}) [3 | 4 | 5]"}]}]}  # fmt: skip
        t0 = time.perf_counter()
        r = await http.post("/v1/chat/completions", json=body)
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise SystemExit(f"the victim's request failed: {r.status_code} {r.text[:300]}")
    return latencies


async def attacker(
    http: httpx.AsyncClient, clip: str, model: str, text: str, max_tokens: int, stop: asyncio.Event,
    seen: Counter[str],
) -> None:  # fmt: skip
    raw = {
        "model": model,
        "temperature": 1.0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    parts = [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}, {"type": "text", "text": text}]
    agent = {
        "model": "echo-agent", "temperature": 1.0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": parts}],
    }  # fmt: skip
    i = 0
    while not stop.is_set():
        body = raw if i % 2 == 0 else agent
        i += 1
        try:
            r = await http.post("/v1/chat/completions", json=body)
            seen[f"{body['model']} {r.status_code}"] += 1
        except httpx.HTTPError as err:
            seen[f"{body['model']} {type(err).__name__}"] += 1


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="echo-bench-fair-"))
    wav = write_beeps(tmp / "clip.wav", 6.0, [(onset, 0.2) for onset in (1.0, 2.3, 2.7, 4.5)])
    clip = base64.b64encode(wav.read_bytes()).decode()
    text = maximal_text(args.model, args.max_prompt_tokens)
    flags = ["--max-prompt-tokens", str(args.max_prompt_tokens), "--max-tokens", str(args.max_tokens)]
    server = ServeProcess(["--model", args.model, *flags], serve_env(tmp / "home"))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=900) as http:
            await victim_round(http, clip, 3)  # warm-up
            alone = await victim_round(http, clip, args.victim)
            stop, seen = asyncio.Event(), Counter[str]()
            attackers = [asyncio.create_task(attacker(http, clip, args.model, text, args.max_tokens, stop, seen))
                         for _ in range(args.attackers)]  # fmt: skip
            await asyncio.sleep(2.0)  # let the maximal requests fill the batch first
            loaded = await victim_round(http, clip, args.victim)
            stop.set()
            await asyncio.gather(*attackers)
    finally:
        server.stop()
    return {
        "model": args.model, "victim_requests": args.victim, "attackers": args.attackers,
        "max_prompt_tokens": args.max_prompt_tokens, "max_tokens": args.max_tokens,
        "unloaded_p50_s": round(statistics.median(alone), 3), "unloaded_p95_s": round(p95(alone), 3),
        "loaded_p50_s": round(statistics.median(loaded), 3), "loaded_p95_s": round(p95(loaded), 3),
        "p95_ratio": round(p95(loaded) / p95(alone), 2), "attacker_answers": dict(seen),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=int, default=30, help="victim requests per phase")
    parser.add_argument("--attackers", type=int, default=1, help="clients sending maximal requests")
    parser.add_argument("--model", default="echo-tiny")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="serve's flag (default: its default)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="serve's flag (default: its default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(out))
        return
    print(f"model {out['model']}: victim p50 {out['unloaded_p50_s']} s -> {out['loaded_p50_s']} s, "
          f"p95 {out['unloaded_p95_s']} s -> {out['loaded_p95_s']} s under {out['attackers']} maximal clients "
          f"(ratio {out['p95_ratio']}; target <= 2)")  # fmt: skip
    print("attackers' answers:", out["attacker_answers"])


if __name__ == "__main__":
    main()

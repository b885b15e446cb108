"""Throughput of the Echo agent over HTTP (`echo-agent serve`) against in-process calls, side by side.

    .venv/bin/python bench/serve.py [--questions 16] [--reps 3] [--clients 1 4 16] [--max-new-tokens 16] [--json]

One model in both arms: the built-in tiny random Qwen2-Audio (deterministic from its seed), greedy.
* in-process: `EchoAgent(load_backend(...)).ask(...)` in this process, N questions in flight at once;
* HTTP: the same questions to `echo-agent serve` (a subprocess on loopback) as `model="echo-agent"`
  chat completions, the clip sent as base64 `input_audio` each time, N clients at once.

At every concurrency level the two arms alternate for `--reps` rounds of `--questions` questions and
the medians are compared, because the machine is shared and noisy. Both arms must return the same
answers and reasoning, or the script stops. The local backend runs one generate call at a time (it
holds a lock), so concurrency overlaps only the work around the model: request parsing, audio
decoding, SSE/JSON, the graph.
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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_beeps  # the tests' shared fixtures, not copies of them
from served import ServeProcess, serve_env

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.audio import AudioStore
from echo_agent.config import AgentConfig, SamplingParams

MODEL = "tiny-random-qwen2-audio"
QUESTIONS = ["How many beeps are there?", "Which is heard first, the beep or the chirp?"]


async def run_round(
    ask: Callable[[int], Awaitable[dict[str, Any]]], questions: int, clients: int
) -> tuple[float, list[Any]]:
    """Answer `questions` questions with `clients` in flight at once; returns (seconds, answers in order)."""
    queue = list(range(questions))
    out: dict[int, Any] = {}

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            out[i] = await ask(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start, [out[i] for i in range(questions)]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="echo-bench-serve-"))
    wav = write_beeps(tmp / "clip.wav", 6.0, [(onset, 0.2) for onset in (1.0, 2.3, 2.7, 4.5)])
    clip = base64.b64encode(wav.read_bytes()).decode()
    cfg = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens))
    agent = EchoAgent(load_backend(MODEL), AudioStore(), cfg)
    ref = agent.load(wav)
    server = ServeProcess(["--model", MODEL, "--max-new-tokens", str(args.max_new_tokens)], serve_env(tmp / "home"))
    url = server.url
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as http:

            async def local(i: int) -> dict[str, Any]:
                r = await agent.ask(ref, QUESTIONS[i % len(QUESTIONS)])
                return {"answer": r.answer, "reasoning": r.text}

            async def remote(i: int) -> dict[str, Any]:
                content = [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
                           {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]  # fmt: skip
                body = {"model": "echo-agent", "temperature": 0, "messages": [{"role": "user", "content": content}]}
                resp = await http.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                echo = resp.json()["choices"][0]["message"]["echo"]
                return {"answer": echo["answer"], "reasoning": echo["reasoning"]}

            await run_round(local, 2, 1)  # warm-ups: caches, first-call costs
            await run_round(remote, 2, 1)
            rows = []
            for clients in args.clients:
                times: dict[str, list[float]] = {"in-process": [], "http": []}
                for _ in range(args.reps):
                    t_local, a_local = await run_round(local, args.questions, clients)
                    t_http, a_http = await run_round(remote, args.questions, clients)
                    if a_local != a_http:
                        raise SystemExit("the HTTP answers differ from the in-process answers")
                    times["in-process"].append(t_local)
                    times["http"].append(t_http)
                q_local = args.questions / statistics.median(times["in-process"])
                q_http = args.questions / statistics.median(times["http"])
                rows.append({"clients": clients, "in_process_qps": q_local, "http_qps": q_http,
                             "ratio_http_over_in_process": q_http / q_local})  # fmt: skip
    finally:
        server.stop()
    return {"model": MODEL, "max_new_tokens": args.max_new_tokens, "questions_per_round": args.questions,
            "reps": args.reps, "rows": rows}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=16, help="questions per round (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="rounds per arm and level (default 3)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="per generate call (default 16)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    report = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}, greedy, max_new_tokens={args.max_new_tokens}, {args.questions} questions/round, "
          f"median of {args.reps} rounds")  # fmt: skip
    print(f"{'clients':>7}  {'in-process q/s':>14}  {'HTTP q/s':>9}  {'HTTP / in-process':>17}")
    for r in report["rows"]:
        ratio = r["ratio_http_over_in_process"]
        print(f"{r['clients']:>7}  {r['in_process_qps']:>14.2f}  {r['http_qps']:>9.2f}  {ratio:>17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

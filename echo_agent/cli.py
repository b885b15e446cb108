"""The `echo-agent` command line. Bad input (audio, arguments, model paths) ends with a one-line
`error: ...` and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from .chat import next_clip_name, split_choices
from .config import AUDIO_MODES, AgentConfig, SamplingParams, reward_weights
from .errors import ConfigError, EchoError

EXIT_USAGE = 2
NO_AUDIO = "no audio: give an audio file, or --thread ID of a session that has one"


def _home() -> Path:
    return Path(os.environ.get("ECHO_AGENT_HOME", Path.home() / ".echo-agent"))


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    try:
        sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        return AgentConfig(
            sampling=sampling, protocol=args.protocol, mode=getattr(args, "mode", "interleaved"),
            reward=reward_weights(getattr(args, "reward", None) or "paper"),
        )  # fmt: skip
    except ValidationError as err:
        problems = "; ".join(f"--{str(e['loc'][-1]).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise ConfigError(problems) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model directory, built-in name (echo-tiny, tiny-random-qwen2-audio, tiny-random-qwen2.5-omni), or "
        "openai:MODEL@http://HOST:PORT/v1 for a model behind an OpenAI-compatible server such as vLLM "
        "(default: echo-tiny, the shipped model)",
    )
    p.add_argument(
        "--base-url", default=None, help="OpenAI-compatible server for --model MODEL (same as openai:MODEL@URL)"
    )
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding that server's API key (default: ECHO_API_KEY, then OPENAI_API_KEY)",
    )
    p.add_argument(
        "--audio-format",
        choices=["input_audio", "audio_url"],
        default="input_audio",
        help="how audio is sent to an OpenAI-compatible server: input_audio parts, or vLLM's audio_url data: URLs",
    )
    p.add_argument(
        "--request-timeout", type=float, default=300.0, metavar="SECONDS",
        help="per attempt of each call to an OpenAI-compatible server (failed attempts are retried)",
    )  # fmt: skip
    p.add_argument("--protocol", choices=["seg", "function"], default="seg", help="how the model asks to re-listen")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per generate call")
    p.add_argument("--seed", type=int, default=0)


def _backend(args: argparse.Namespace) -> Any:
    from .agent import load_backend

    options = None
    if args.base_url is not None or (args.model or "").startswith("openai:"):
        from .backends.openai import OpenAIOptions

        if args.request_timeout <= 0:
            raise ConfigError(f"--request-timeout must be > 0, got {args.request_timeout}")
        options = OpenAIOptions(audio_format=args.audio_format, timeout=args.request_timeout)
    return load_backend(args.model, base_url=args.base_url, api_key_env=args.api_key_env, openai_options=options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echo-agent", description="Audio-interleaved reasoning: ask about a clip.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer one question about a clip, streaming the reasoning")
    ask.add_argument("audio", help="audio file (wav, flac, ogg, mp3)")
    ask.add_argument("question")
    ask.add_argument("--choice", action="append", default=[], help="a multiple-choice option (repeat)")
    ask.add_argument("--json", action="store_true", help="print only the result object as JSON")
    _add_model_args(ask)

    chat = sub.add_parser("chat", help="interactive session about one or more clips, persisted in SQLite")
    chat.add_argument("audio", nargs="?", help="audio file (optional when resuming a thread)")
    chat.add_argument("--thread", default=None, help="thread id to resume (default: a new thread)")
    chat.add_argument("--db", default=None, help="SQLite file (default: $ECHO_AGENT_HOME/chat.sqlite)")
    _add_model_args(chat)

    ev = sub.add_parser("eval", help="accuracy report on an MMAU (.json) or MMAR (.jsonl) benchmark file")
    ev.add_argument("data", help="benchmark file; audio paths are relative to it")
    ev.add_argument(
        "--mode",
        "--audio-mode",
        dest="mode",
        choices=AUDIO_MODES,
        default="interleaved",
        help="interleaved: re-listened audio is inserted; grounded: <seg> tags without audio; text: no tags",
    )
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ev.add_argument("--out", default=None, help="report JSON; predictions and resumable partial results beside it")
    ev.add_argument("--concurrency", type=int, default=1, help="questions in flight at once (default: %(default)s)")
    _add_model_args(ev)

    col = sub.add_parser("collect", help="record K trajectories per item for RL (resumable JSON lines)")
    col.add_argument("data", help="MMAU (.json) or MMAR (.jsonl) data file; audio paths are relative to it")
    col.add_argument("--samples", type=int, required=True, help="trajectories per item (K)")
    col.add_argument("--out", required=True, help="trajectories file (JSON lines); a rerun resumes it")
    col.add_argument("--mode", "--audio-mode", dest="mode", choices=AUDIO_MODES, default="interleaved")
    col.add_argument("--reward", choices=["paper", "deepeyes"], default="paper",
                     help="reward weights of the verifier (default: paper)")  # fmt: skip
    col.add_argument("--limit", type=int, default=None, help="only the first N items")
    col.add_argument("--concurrency", type=int, default=16, help="graph runs in flight (default: %(default)s)")
    col.add_argument("--max-batch", type=int, default=32, help="generate requests decoded together (default: 32)")
    col.add_argument("--parquet", default=None, help="also export the whole file to this Parquet file")
    _add_model_args(col)
    col.set_defaults(temperature=1.0)  # RL samples; 0 would make the K samples identical

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic audio-puzzle suite (MMAU format)")
    synth.add_argument("--out", required=True, help="output folder: <split>.json and audio/")
    synth.add_argument("--n", type=int, required=True, help="number of items")
    synth.add_argument("--seed", type=int, required=True)
    synth.add_argument("--split", default="test", help="split name, used in the file name and ids")
    synth.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    synth.add_argument("--max-duration", type=float, default=60.0, help="longest clip in seconds (clips run 10 s up)")
    synth.add_argument("--snr", type=float, nargs=2, default=[5.0, 20.0], metavar=("MIN", "MAX"),
                       help="background-noise SNR range in dB (default: 5 20)")  # fmt: skip
    from .training.synth import CATEGORIES  # numpy only; the parser needs the names for --categories

    synth.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY", choices=CATEGORIES,
                       help="item i gets categories[i %% len]; repeat one to weight it (default: all six)")  # fmt: skip

    train = sub.add_parser("train", help="train the model")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    audio = train_sub.add_parser("audio", help="pretrain echo-tiny's audio encoder on event labels (stage 0)")
    audio.add_argument("--train", required=True, help="synthetic suite JSON (items carry their `events`)")
    audio.add_argument("--val", default=None, help="held-out suite JSON for the head accuracies")
    audio.add_argument("--out", required=True, help="run folder: model/ (the init of `train sft`), logs")
    audio.add_argument("--config", default=None, help="JSON file of further AudioPretrainConfig fields")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("seed", int)):
        audio.add_argument(f"--{name}", type=kind, default=None)

    sft = train_sub.add_parser("sft", help="supervised fine-tuning on seg-tag traces (stage 1)")
    sft.add_argument("--train", required=True, nargs="+", help="training data (MMAU JSON with gold `trace`s); "
                     "several files are concatenated")  # fmt: skip
    sft.add_argument("--val", default=None, help="validation data, scored by the real agent graph")
    sft.add_argument("--out", required=True, help="run folder: checkpoint/ (resumed), final/, log.jsonl")
    sft.add_argument("--init", default="echo-tiny", help="'echo-tiny' (a new model) or a model directory")
    sft.add_argument(
        "--audio-mode",
        "--mode",
        dest="audio_mode",
        choices=AUDIO_MODES,
        default="interleaved",
        help="interleaved: listened audio inserted; grounded (the paper's cold start): <seg> tags, no audio; "
        "text: no listens",
    )
    sft.add_argument("--config", default=None, help="JSON file of further SFTConfig fields")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("eval-every", int), ("seed", int)):
        sft.add_argument(f"--{name}", type=kind, default=None)
    sft.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")

    grpo = train_sub.add_parser("grpo", help="GRPO over full agent trajectories (stage 2)")
    grpo.add_argument("--train", required=True, help="training data (MMAU JSON with gold answers)")
    grpo.add_argument("--val", default=None, help="validation data, scored greedily by the real agent graph")
    grpo.add_argument("--out", required=True, help="run folder: checkpoint/ (resumed), final/, log.jsonl")
    grpo.add_argument("--init", required=True, help="the starting model directory (an SFT run's final/)")
    grpo.add_argument("--audio-mode", "--mode", dest="audio_mode", choices=AUDIO_MODES[:2], default=None,
                      help="interleaved (default) or grounded")  # fmt: skip
    grpo.add_argument("--reward", choices=["paper", "deepeyes"], default=None, help="reward weights (default: paper)")
    grpo.add_argument("--config", default=None, help="JSON file of further GRPOConfig fields")
    for name, kind in (("steps", int), ("group-size", int), ("items-per-step", int), ("lr", float),
                       ("kl-coef", float), ("eval-every", int), ("seed", int)):  # fmt: skip
        grpo.add_argument(f"--{name}", type=kind, default=None)
    grpo.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server for the model and the agent, with a web chat page"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default: %(default)s)")
    serve.add_argument(
        "--db", default=None, help="SQLite chat threads, shared with `chat` (default: $ECHO_AGENT_HOME/chat.sqlite)"
    )
    serve.add_argument("--data-dir", default=None, help="uploaded clips (default: $ECHO_AGENT_HOME/serve)")
    serve.add_argument(
        "--allow-file-dir", action="append", default=[], metavar="DIR",
        help="allow file:// audio URLs below DIR (repeat); none by default",
    )  # fmt: skip
    serve.add_argument("--auth-token-env", default=None, metavar="VAR",
                       help="require `Authorization: Bearer $VAR` (default: no auth)")  # fmt: skip
    serve.add_argument("--max-request-mb", type=float, default=32.0, help="larger request bodies get 413")
    serve.add_argument("--max-audio-seconds", type=float, default=600.0, help="longer clips get 400")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    _add_model_args(serve)
    return parser


class _Printer:
    """Renders graph events for a terminal: reasoning as it streams, each re-listen on its own line."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "text":
            self.console.print(escape(event["delta"]), end="", highlight=False, soft_wrap=True)
        elif kind == "listen":
            call = event["call"]
            if call["valid"]:
                extra = f" ({call['reason']})" if call.get("reason") else ""
                span = f"{call['start']:.2f}-{call['end']:.2f} s"
                self.console.print(f"\n[bold cyan]⟲ listen {call['clip']} {span}{escape(extra)}[/]")
            else:
                self.console.print(f"\n[bold red]✗ listen {escape(call['raw'])}: {escape(call['reason'] or '')}[/]")
        elif kind == "retry":
            self.console.print(f"\n[yellow]↻ verifier: {event['reason']}, asking again[/]")


def _summary(console: Console, result: dict[str, Any]) -> None:
    console.print()
    valid = sum(1 for c in result["listens"] if c["valid"])
    console.print(f"[dim]listens: {valid} valid / {len(result['listens'])} total[/]")
    if result["answer"] is None:
        console.print("[bold red]No answer[/] (the model did not produce <answer>...</answer>)")
        return
    console.print(f"[bold]Answer:[/] {escape(result['answer'])}")
    if result.get("choice") is not None:
        console.print(f"[bold]Choice:[/] {escape(result['choice'])}")


async def _ask(args: argparse.Namespace) -> int:
    from .audio import AudioStore

    # Validate the arguments and the audio before loading anything heavy (the model).
    config = _agent_config(args)
    store = AudioStore()
    ref = store.load(args.audio)

    from .agent import EchoAgent

    console = Console(highlight=False)
    agent = EchoAgent(_backend(args), store, config=config)
    printer = _Printer(console)
    result: dict[str, Any] = {}
    async for event in agent.astream(ref, args.question, args.choice or None):
        if event["type"] == "result":
            result = event["result"]
        elif not args.json:
            printer(event)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _summary(console, result)
    return 0


async def _chat(args: argparse.Namespace) -> int:
    from .audio import AudioRef, AudioStore

    # Validate the arguments and the audio before loading anything heavy (the model).
    agent_config = _agent_config(args)
    store = AudioStore()
    if args.audio:
        store.load(args.audio)

    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from .agent import EchoAgent
    from .messages import message_text

    console = Console(highlight=False)
    db = Path(args.db) if args.db else _home() / "chat.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    thread = args.thread or uuid.uuid4().hex[:12]
    config: Any = {"configurable": {"thread_id": thread}}
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        if not args.audio and await saver.aget_tuple(config) is None:  # fail before loading the model
            raise EchoError(NO_AUDIO)
        agent = EchoAgent(_backend(args), store, config=agent_config, checkpointer=saver)
        snapshot = await agent.graph.aget_state(config)
        state: dict[str, Any] = dict(snapshot.values) if snapshot and snapshot.values else {}
        clips: dict[str, dict[str, Any]] = dict(state.get("clips", {}))
        if args.thread and not state:
            console.print(f"[yellow]thread {thread} has no history in {db}; starting it[/]")
        for msg in state.get("conversation", []):
            who = "you" if msg["role"] == "user" else msg["role"]
            console.print(f"[dim]{who}: {escape(message_text(msg, '[audio]'))}[/]")
        pending: dict[str, AudioRef] = {}

        def add_clip(path: str, clip_id: str | None = None) -> None:
            ref = agent.load(path)
            known = {**{c: r["sha256"] for c, r in clips.items()}, **{c: r.sha256 for c, r in pending.items()}}
            for cid, sha in known.items():
                if sha == ref.sha256:
                    console.print(f"[dim]{path} is already loaded as '{cid}'[/]")
                    return
            cid = clip_id or next_clip_name([*clips, *pending])
            pending[cid] = ref
            console.print(f"[dim]loaded {path} as '{cid}' ({ref.duration:.1f} s)[/]")

        if args.audio:
            add_clip(args.audio)
        if not clips and not pending:
            raise EchoError(NO_AUDIO)
        console.print(
            f"[bold]thread {thread}[/] (resume with --thread {thread}). Ask a question; end it with "
            "[2 | 3 | 4] for choices. /load PATH adds a clip, /quit leaves."
        )
        printer = _Printer(console)
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line.startswith("/load "):
                try:
                    add_clip(line[6:].strip())
                except EchoError as err:
                    console.print(f"[red]error: {escape(str(err))}[/]")
                continue
            question, choices = split_choices(line)
            result: dict[str, Any] = {}
            async for event in agent.astream(pending or None, question, choices or None, thread_id=thread):
                if event["type"] == "result":
                    result = event["result"]
                else:
                    printer(event)
            clips.update({c: r.model_dump() for c, r in pending.items()})
            pending = {}
            _summary(console, result)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from .agent import DEFAULT_MODEL as default_model
    from .serve import ServeConfig

    config = _agent_config(args)
    token = None
    if args.auth_token_env is not None:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise ConfigError(f"--auth-token-env {args.auth_token_env}: the environment variable is not set")
    for d in args.allow_file_dir:
        if not Path(d).is_dir():
            raise ConfigError(f"--allow-file-dir {d}: not a directory")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    try:
        serve_config = ServeConfig(
            model_name=(args.model or default_model).removeprefix("openai:").split("@http")[0],
            api_token=SecretStr(token) if token else None,
            allow_file_dirs=[Path(d) for d in args.allow_file_dir],
            max_request_bytes=int(args.max_request_mb * 1024 * 1024),
            max_audio_seconds=args.max_audio_seconds,
            data_dir=Path(args.data_dir) if args.data_dir else _home() / "serve",
            db=Path(args.db) if args.db else _home() / "chat.sqlite",
            agent=config,
        )
    except ValidationError as err:
        raise ConfigError("; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in err.errors())) from None

    from .serve.run import run

    run(_backend(args), serve_config, args.host, args.port, args.log_level)
    return 0


async def _eval(args: argparse.Namespace) -> int:
    from .benchmarks import load_benchmark
    from .evaluation import check_out, evaluate

    # Validate the arguments and the data before loading anything heavy (the model).
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    config = _agent_config(args)
    items = load_benchmark(args.data)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out, items)

    from .agent import EchoAgent
    from .graphs.runner import batched

    # Concurrent questions share the model's decode steps (a local model; a server batches itself).
    agent = EchoAgent(batched(_backend(args)) if args.concurrency > 1 else _backend(args), config=config)
    report = await evaluate(agent, items, out=out, limit=args.limit, concurrency=args.concurrency, progress=True)

    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"{escape(report.data)} · {report.mode} · {escape(report.model)}")
    table.add_column("category")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for name, score in report.per_category.items():
        table.add_row(escape(name), str(score.n), f"{100 * score.accuracy:.1f}%")
    table.add_section()
    table.add_row("[bold]micro[/]", str(report.n), f"[bold]{100 * report.micro_accuracy:.1f}%[/]")
    table.add_row("[bold]macro[/]", str(len(report.per_category)), f"[bold]{100 * report.macro_accuracy:.1f}%[/]")
    console.print(table)
    console.print(
        f"errors {report.errors} · no answer {100 * report.no_answer_share:.1f}% · "
        f"re-listened {100 * report.relisten_share:.1f}% of answered · listens/item {report.mean_listens:.2f} · "
        f"tokens/item {report.mean_generated_tokens:.1f} · latency {report.mean_latency_s:.2f} s/item"
    )
    for failure in report.failed[:5]:
        console.print(f"[red]error[/] {escape(failure['id'])}: {escape(failure['error'])}")
    if len(report.failed) > 5:
        console.print(f"[red]... and {len(report.failed) - 5} more errors (see the report)[/]")
    if out is not None:
        console.print(f"report: {escape(str(out))}\npredictions: {escape(str(report.predictions))}")
    return 0


async def _collect(args: argparse.Namespace) -> int:
    from .benchmarks import load_benchmark
    from .training.collect import collect, export_parquet

    # Validate the arguments and the data before loading anything heavy (the model).
    for name in ("samples", "concurrency", "max_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.protocol != "seg":
        raise ConfigError("collect records the seg-tag protocol; drop --protocol function")
    config = _agent_config(args)
    items = load_benchmark(args.data)
    out = Path(args.out)
    if out.resolve() == Path(args.data).resolve():
        raise ConfigError(f"--out {out} would overwrite the data file")
    if args.parquet is not None:
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise ConfigError("--parquet needs pyarrow: pip install 'echo-agent[export]'")

    from .agent import EchoAgent, load_backend
    from .backends.transformers import TransformersBackend
    from .graphs.runner import batched

    backend = load_backend(args.model)
    if not isinstance(backend, TransformersBackend):
        raise ConfigError("collect needs a local transformers model")
    agent = EchoAgent(batched(backend, args.max_batch), config=config)
    summary = await collect(
        agent, items, samples=args.samples, out=out, seed=args.seed, limit=args.limit,
        concurrency=args.concurrency, progress=True,
    )  # fmt: skip
    console = Console(highlight=False, stderr=True)
    console.print(
        f"{summary.written} trajectories written ({summary.done_before} already there, {summary.errors} errors) · "
        f"mean reward {summary.mean_reward:.3f} · re-listened {100 * summary.relisten_share:.1f}% · "
        f"{summary.trajectories_per_s:.2f} trajectories/s"
    )
    if args.parquet is not None:
        rows = export_parquet(out, Path(args.parquet))
        console.print(f"parquet: {escape(args.parquet)} ({rows} rows)")
    print(summary.model_dump_json(indent=2))
    return 0


_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _data_synth(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not 10.0 <= args.max_duration <= 3600.0:
        raise ConfigError(f"--max-duration must be between 10 and 3600 seconds, got {args.max_duration}")
    if not _SPLIT_RE.match(args.split):
        raise ConfigError(f"--split must be letters, digits, '_' or '-', got {args.split!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")

    from .training.synth import CATEGORIES, synth_command

    # The progress bar goes to stderr, so stdout holds only the JSON path.
    with contextlib.redirect_stdout(sys.stderr):
        path = synth_command(
            out, args.n, args.seed, args.split, args.workers, durations=(10.0, args.max_duration),
            snr_range=(min(args.snr), max(args.snr)), categories=args.categories or CATEGORIES,
        )  # fmt: skip
    print(path)
    return 0


def _trainer_config(cls: type[Any], args: argparse.Namespace, required: dict[str, Any], flags: Sequence[str]) -> Any:
    """The trainers' one config merge: a --config JSON file, then the required arguments, then each flag given.
    A bad value is a clear error before any work starts."""
    try:
        fields: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--config {args.config}: {err}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--config {args.config}: expected a JSON object of config fields")
    fields.update(required)
    given = {name: getattr(args, name, None) for name in flags}
    fields.update({name: v for name, v in given.items() if v is not None and v is not False})  # unset flags
    try:
        cfg = cls.model_validate(fields)
    except ValidationError as err:
        raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
    train = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    for path in (*train, cfg.val):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such data file: {path}")
    return cfg


def _train_audio(args: argparse.Namespace) -> int:
    from .training.audio_pretrain import AudioPretrainConfig, pretrain

    cfg = _trainer_config(AudioPretrainConfig, args, {"train": args.train, "out": args.out},
                          ("steps", "batch_size", "lr", "seed", "val"))  # fmt: skip
    if cfg.init is not None and not ((cfg.init / "model").is_dir() and (cfg.init / "heads.pt").is_file()):
        raise ConfigError(f"init {cfg.init} is not a stage-0 run folder (model/ and heads.pt)")
    print(pretrain(cfg))
    return 0


def _train_grpo(args: argparse.Namespace) -> int:
    from .training.grpo import GRPOConfig, train

    flags = ("audio_mode", "reward", "steps", "group_size", "items_per_step", "lr", "kl_coef", "eval_every", "seed",
             "val", "lora")  # fmt: skip
    cfg = _trainer_config(GRPOConfig, args, {"train": args.train, "out": args.out, "init": args.init}, flags)
    if not (Path(cfg.init) / "config.json").is_file():
        raise ConfigError(f"--init {cfg.init} is not a model directory")
    print(train(cfg))
    return 0


def _train_sft(args: argparse.Namespace) -> int:
    from .training.sft import SFTConfig, train

    required = {"train": args.train, "out": args.out, "init": args.init, "audio_mode": args.audio_mode}
    cfg = _trainer_config(SFTConfig, args, required, ("steps", "batch_size", "lr", "eval_every", "seed", "val", "lora"))
    print(train(cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ask":
            return asyncio.run(_ask(args))
        if args.command == "chat":
            return asyncio.run(_chat(args))
        if args.command == "eval":
            return asyncio.run(_eval(args))
        if args.command == "collect":
            return asyncio.run(_collect(args))
        if args.command == "data" and args.data_command == "synth":
            return _data_synth(args)
        if args.command == "train" and args.train_command == "audio":
            return _train_audio(args)
        if args.command == "train" and args.train_command == "grpo":
            return _train_grpo(args)
        if args.command == "train" and args.train_command == "sft":
            return _train_sft(args)
        if args.command == "serve":
            return _serve(args)
    except EchoError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

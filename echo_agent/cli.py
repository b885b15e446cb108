"""The `echo-agent` command line. Bad input (audio, arguments, model paths) ends with a one-line
`error: ...` and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
from .config import AUDIO_MODES, SEED_MAX, AgentConfig, SamplingParams, reward_weights
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


def _add_audio_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="longer clips are refused (default: 600, as `serve`; longer ones cost more memory)",
    )


def _store(args: argparse.Namespace) -> Any:
    """The audio store of `ask` and `chat`, bounded like `serve`'s so peak memory stays bounded too."""
    from .audio import AudioLimits, AudioStore

    if not args.max_audio_seconds > 0:
        raise ConfigError(f"--max-audio-seconds must be > 0, got {args.max_audio_seconds}")
    return AudioStore(AudioLimits(max_duration=args.max_audio_seconds))


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
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where a local model runs: auto (a GPU when there is one, all of them for a model that "
                   "needs several), cpu, cuda, cuda:N (default: auto)")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="a local model's dtype; auto: bfloat16 on a GPU that supports it, float32 on the CPU",
    )
    p.add_argument(
        "--attn-implementation",
        default=None,
        metavar="IMPL",
        help="transformers attention for a local model: eager, sdpa, flash_attention_2 (default: its own)",
    )


def _backend(args: argparse.Namespace) -> Any:
    from .agent import load_backend

    options = None
    if args.base_url is not None or (args.model or "").startswith("openai:"):
        from .backends.openai import OpenAIOptions

        if args.request_timeout <= 0:
            raise ConfigError(f"--request-timeout must be > 0, got {args.request_timeout}")
        options = OpenAIOptions(audio_format=args.audio_format, timeout=args.request_timeout)
    return load_backend(
        args.model, base_url=args.base_url, api_key_env=args.api_key_env, openai_options=options,
        device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
    )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error shape: one `error: ...` line and exit 2, without the usage block (which
    buried the message); the line says where the usage is. Subparsers are made with the same class."""

    def error(self, message: str) -> Any:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_encoder_args(p: argparse.ArgumentParser, new_model: bool = True) -> None:
    """A trainer's audio-encoder flags: which encoder a new model gets, and where frozen-encoder frames are kept."""
    if new_model:
        encoder_help = "a new model's audio side: conv (echo-tiny, the default) or whisper-tiny.en (echo-tiny 2)"
        p.add_argument("--audio-encoder", choices=("conv", "whisper-tiny.en"), default=None, help=encoder_help)
    cache_help = "frozen-encoder frames on disk (default auto: $ECHO_FEATURE_CACHE, else OUT/features)"
    p.add_argument("--feature-cache", default=None, metavar="auto|off|DIR", help=cache_help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="echo-agent", description="Audio-interleaved reasoning: ask about a clip.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer one question about a clip, streaming the reasoning")
    ask.add_argument("audio", help="audio file (wav, flac, ogg, mp3)")
    ask.add_argument("question")
    ask.add_argument("--choice", action="append", default=[], help="a multiple-choice option (repeat)")
    ask.add_argument("--json", action="store_true", help="print only the result object as JSON")
    _add_audio_limit(ask)
    _add_model_args(ask)

    chat = sub.add_parser("chat", help="interactive session about one or more clips, persisted in SQLite")
    chat.add_argument("audio", nargs="?", help="audio file (optional when resuming a thread)")
    chat.add_argument("--thread", default=None, help="thread id to resume (default: a new thread)")
    chat.add_argument("--db", default=None, help="SQLite file (default: $ECHO_AGENT_HOME/chat.sqlite)")
    _add_audio_limit(chat)
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
    ev.add_argument("--mmar-predictions", default=None, metavar="P.jsonl",
                    help="also write MMAR-format predictions (answer_prediction) for MMAR's scorer; open questions "
                    "are left out")  # fmt: skip
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

    suite = data_sub.add_parser("suite", help="write the real-audio suite: speech, music and sound (MMAU format)")
    suite.add_argument("--out", required=True, help="output folder: <split>.json, <split>.manifest.json and audio/")
    suite.add_argument("--seed", type=int, required=True)
    suite.add_argument("--splits", nargs="+", default=None, metavar="NAME=N",
                       help="preset splits and their unit counts, e.g. train=30000 dev=600 test=1800 "
                       "(presets: train dev test test_seen test_phrasing test_open test_threads)")  # fmt: skip
    suite.add_argument("--split", default=None, help="one split: a preset name, or a new name with the options below")
    suite.add_argument("--n", type=int, default=None, help="units of --split (a unit is one item or one thread)")
    suite.add_argument("--sources", choices=("train", "heldout"), default=None,
                       help="--split's sources (default: the preset's, else heldout)")  # fmt: skip
    suite.add_argument("--phrasing", choices=("train", "heldout"), default=None, help="--split's phrasings")
    suite.add_argument("--open-share", type=float, default=None, help="share of --split's units that are open")
    suite.add_argument("--thread-share", type=float, default=None, help="share of --split's units that are threads")
    suite.add_argument("--domains", nargs="+", default=None, choices=("speech", "music", "sound"))
    suite.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY", help="a subset of categories")
    suite.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    suite.add_argument("--audio-format", choices=("wav", "flac"), default="wav",
                       help="16-bit PCM either way; FLAC is lossless at ~60%% of the size (default: wav)")  # fmt: skip

    mmar = data_sub.add_parser("mmar", help="a suite (or any MMAU/MMAR) file as MMAR JSON lines (MCQ items only)")
    mmar.add_argument("data", help="MMAU (.json) or MMAR (.jsonl) data file; audio paths are relative to it")
    mmar.add_argument("--out", required=True, help="the MMAR .jsonl to write; its audio paths are relative to it")

    verl = data_sub.add_parser("verl", help="a benchmark file as verl's parquet rows (GRPO on verl, docs/verl.md)")
    verl.add_argument("data", help="MMAU (.json) or MMAR (.jsonl) data file; audio paths are relative to it")
    verl.add_argument("--out", required=True, help="the parquet file to write")

    train = sub.add_parser("train", help="train the model")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    audio = train_sub.add_parser("audio", help="pretrain echo-tiny's audio encoder on event labels (stage 0)")
    audio.add_argument("--train", required=True, help="synthetic suite JSON (items carry their `events`)")
    audio.add_argument("--val", default=None, help="held-out suite JSON for the head accuracies")
    audio.add_argument("--out", required=True, help="run folder: model/ (the init of `train sft`), logs")
    audio.add_argument("--config", default=None, help="JSON file of further AudioPretrainConfig fields")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("seed", int)):
        audio.add_argument(f"--{name}", type=kind, default=None)

    base = train_sub.add_parser("base", help="a base audio LM: hear any audio input in context (stage 0)")
    base.add_argument("--train", required=True, help="suite JSON (records carry their `events`)")
    base.add_argument("--val", default=None, help="dev suite JSON: loss and exact answers on a fixed set of questions")
    base.add_argument(
        "--out", required=True, help="run folder: checkpoint/ (resumed), final/ (the init of `train sft`)"
    )
    base.add_argument("--init", default="new", help="'new' (a new model) or a model directory")
    _add_encoder_args(base)
    base.add_argument("--config", default=None, help="JSON file of further BaseLMConfig fields")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("eval-every", int), ("seed", int)):
        base.add_argument(f"--{name}", type=kind, default=None)
    base.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")

    sft = train_sub.add_parser("sft", help="supervised fine-tuning on seg-tag traces (stage 1)")
    sft.add_argument("--train", required=True, nargs="+", help="training data (MMAU JSON with gold `trace`s); "
                     "several files are concatenated")  # fmt: skip
    sft.add_argument("--val", default=None, help="validation data, scored by the real agent graph")
    sft.add_argument("--out", required=True, help="run folder: checkpoint/ (resumed), final/, log.jsonl")
    sft.add_argument("--init", default="echo-tiny", help="'new' or 'echo-tiny' (a new model) or a model directory")
    sft.add_argument(
        "--audio-mode",
        "--mode",
        dest="audio_mode",
        choices=AUDIO_MODES,
        default="interleaved",
        help="interleaved: listened audio inserted; grounded (the paper's cold start): <seg> tags, no audio; "
        "text: no listens",
    )
    _add_encoder_args(sft)
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
    _add_encoder_args(grpo, new_model=False)
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
        "--db", default=None,
        help="SQLite threads (default: DATA_DIR/threads.sqlite, not shared with `chat`; pass chat's file to share)",
    )  # fmt: skip
    serve.add_argument("--data-dir", default=None, help="uploads and threads (default: $ECHO_AGENT_HOME/serve)")
    serve.add_argument(
        "--allow-file-dir", action="append", default=[], metavar="DIR",
        help="allow file:// audio URLs below DIR (repeat); none by default",
    )  # fmt: skip
    serve.add_argument("--auth-token-env", default=None, metavar="VAR",
                       help="require `Authorization: Bearer $VAR` (default: no auth)")  # fmt: skip
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also answer to this Host name (repeat; '*': any); localhost, IPs always")  # fmt: skip
    serve.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                       help="let pages from this origin (scheme://host:port) call the API (repeat)")  # fmt: skip
    serve.add_argument("--max-request-mb", type=float, default=None,
                       help="larger request bodies get 413 (default: fits --max-audio-seconds of 48 kHz stereo "
                            "16-bit WAV, base64)")  # fmt: skip
    serve.add_argument("--max-audio-seconds", type=float, default=600.0, help="longer clips get 400")
    serve.add_argument("--max-audio-parts", type=int, default=8, help="audio parts per request (default: 8)")
    serve.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096,
                       help="text tokens of each model call's prompt, audio aside (default: 4096)")  # fmt: skip
    serve.add_argument("--max-request-seconds", type=float, default=300.0,
                       help="wall clock per request; past it the request is cancelled (default: 300)")  # fmt: skip
    serve.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="for a request's headers and each chunk of its body (default: 30)")  # fmt: skip
    serve.add_argument("--max-concurrent-uploads", type=int, default=2,
                       help="request bodies over 1 MiB read at once; more get 429 (default: 2)")  # fmt: skip
    serve.add_argument("--max-connections", type=int, default=512, help="past this, requests get 503")
    serve.add_argument("--max-storage-mb", type=float, default=4096.0,
                       help="uploads plus the thread database; past it, new uploads and questions get 507 "
                            "(0: no quota; default: 4096)")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=16,
                       help="a local model's continuous batch; 1 runs one call at a time (default: 16)")  # fmt: skip
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


def _quiet_model_loading() -> None:
    """No progress bars while the model loads (transformers' "Loading weights"): `ask --json` is read by programs,
    and its stderr should hold only errors."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


async def _ask(args: argparse.Namespace) -> int:
    # Validate the arguments and the audio before loading anything heavy (the model).
    config = _agent_config(args)
    store = _store(args)
    ref = store.load(args.audio)

    from .agent import EchoAgent

    if args.json:
        _quiet_model_loading()
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
    # Validate the arguments and the audio before loading anything heavy (the model).
    agent_config = _agent_config(args)
    store = _store(args)
    if args.audio:
        store.load(args.audio)

    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from .agent import EchoAgent
    from .chat import save_clips
    from .messages import message_text

    console = Console(highlight=False)
    db = Path(args.db) if args.db else _home() / "chat.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    thread = args.thread or uuid.uuid4().hex[:12]
    config: Any = {"configurable": {"thread_id": thread}}
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        if not args.audio and await saver.aget_tuple(config) is None:  # fail before loading the model
            raise EchoError(f"no such thread: {thread} in {db}" if args.thread else NO_AUDIO)
        agent = EchoAgent(_backend(args), store, config=agent_config, checkpointer=saver)
        snapshot = await agent.graph.aget_state(config)
        state: dict[str, Any] = dict(snapshot.values) if snapshot and snapshot.values else {}
        clips: dict[str, dict[str, Any]] = dict(state.get("clips", {}))
        if args.thread and not state:
            console.print(f"[yellow]thread {thread} has no history in {db}; starting it[/]")
        for msg in state.get("conversation", []):
            who = "you" if msg["role"] == "user" else msg["role"]
            console.print(f"[dim]{who}: {escape(message_text(msg, '[audio]'))}[/]")
        # Clips not heard yet are saved again: a thread left by a chat killed during its first question may hold
        # them only in that question's pending input, which the next question would discard.
        await save_clips(agent.graph, config, {c: r for c, r in clips.items() if c not in state.get("introduced", [])})

        async def add_clip(path: str) -> None:
            if "\x00" in path:
                raise ConfigError(f"{path!r}: a file path cannot contain a NUL byte")
            ref = agent.load(path)
            for cid, known in clips.items():
                if known["sha256"] == ref.sha256:
                    console.print(f"[dim]{escape(path)} is already loaded as '{cid}'[/]")
                    return
            cid = next_clip_name(clips)
            await save_clips(agent.graph, config, {cid: ref.model_dump()})  # durable before any question runs
            clips[cid] = ref.model_dump()
            console.print(f"[dim]loaded {escape(path)} as '{cid}' ({ref.duration:.1f} s)[/]")

        if args.audio:
            await add_clip(args.audio)
        if not clips:
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
                    await add_clip(line[6:].strip())
                except EchoError as err:
                    console.print(f"[red]error: {escape(str(err))}[/]")
                continue
            question, choices = split_choices(line)
            result: dict[str, Any] = {}
            # The clips are in the thread already; a plain <seg> tag means the clip the question is about.
            async for event in agent.astream(None, question, choices or None, thread_id=thread):
                if event["type"] == "result":
                    result = event["result"]
                else:
                    printer(event)
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
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.max_request_mb is not None and not args.max_request_mb > 0:
        raise ConfigError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if not args.max_storage_mb >= 0:
        raise ConfigError(f"--max-storage-mb must be >= 0, got {args.max_storage_mb}")
    flags = {
        "max_request_bytes": "--max-request-mb", "max_audio_seconds": "--max-audio-seconds",
        "max_audio_parts": "--max-audio-parts", "max_tokens": "--max-tokens",
        "max_prompt_tokens": "--max-prompt-tokens", "max_request_seconds": "--max-request-seconds",
        "read_timeout": "--read-timeout", "max_concurrent_uploads": "--max-concurrent-uploads",
        "max_storage_bytes": "--max-storage-mb", "max_batch": "--max-batch",
    }  # fmt: skip
    mib = 1024 * 1024
    try:
        serve_config = ServeConfig(
            model_name=(args.model or default_model).removeprefix("openai:").split("@http")[0],
            api_token=SecretStr(token) if token else None,
            allow_file_dirs=[Path(d) for d in args.allow_file_dir],
            allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin,
            max_request_bytes=None if args.max_request_mb is None else int(args.max_request_mb * mib),
            max_audio_seconds=args.max_audio_seconds, max_audio_parts=args.max_audio_parts,
            max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
            max_request_seconds=args.max_request_seconds, read_timeout=args.read_timeout,
            max_concurrent_uploads=args.max_concurrent_uploads,
            max_storage_bytes=int(args.max_storage_mb * mib) or None, max_batch=args.max_batch,
            data_dir=Path(args.data_dir) if args.data_dir else _home() / "serve",
            db=Path(args.db) if args.db else None,  # its own database: `chat`'s history is not served
            agent=config,
        )  # fmt: skip
    except ValidationError as err:
        problems = [f"{flags.get(str(e['loc'][-1]), e['loc'][-1])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("; ".join(problems)) from None

    from .serve.run import run

    run(_backend(args), serve_config, args.host, args.port, args.log_level, args.max_connections)
    return 0


async def _stop_background(timeout: float = 300.0) -> None:
    """After a batch run failed or was interrupted: cancel the runs still in flight, then wait for the batching
    decoder thread to finish its rows and stop. A daemon thread still inside torch at interpreter exit aborts the
    process ("terminate called without an active exception", SIGABRT) instead of letting it exit with its error."""
    import threading

    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    for thread in threading.enumerate():
        if thread.name == "echo-batcher" and thread.is_alive():
            await asyncio.to_thread(thread.join, timeout)


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
    mmar_out = Path(args.mmar_predictions) if args.mmar_predictions else None
    if mmar_out is not None and mmar_out.resolve() == Path(args.data).resolve():
        raise ConfigError(f"--mmar-predictions {mmar_out} would overwrite the data file")

    from .agent import EchoAgent
    from .graphs.runner import batched

    # Concurrent questions share the model's decode steps (a local model; a server batches itself). Threads
    # keep their conversation in graph checkpoints, in memory for this run only.
    backend = batched(_backend(args)) if args.concurrency > 1 else _backend(args)
    agent = EchoAgent(backend, config=config, checkpointer=_thread_saver(items))
    try:
        report = await evaluate(
            agent, items, out=out, limit=args.limit, concurrency=args.concurrency, progress=True, mmar_out=mmar_out
        )
    except BaseException:  # a full disk, Ctrl-C: stop the decoder before exiting
        await _stop_background()
        raise

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
    if report.by_turn:
        turns = " · ".join(f"turn {t} {100 * sc.accuracy:.1f}% (n {sc.n})" for t, sc in report.by_turn.items())
        console.print(f"threads: {turns}")
    if report.by_domain:
        domains = report.by_domain.items()
        console.print(" · ".join(f"{escape(d)} {100 * sc.accuracy:.1f}% (n {sc.n})" for d, sc in domains))
    if out is not None:
        console.print(f"report: {escape(str(out))}\npredictions: {escape(str(report.predictions))}")
    if report.mmar_predictions is not None:
        from .mmar import exportable

        _, n_open, n_after = exportable(items[: args.limit] if args.limit else items)
        left_out = f" ({n_open} open questions and {n_after} later thread turns left out)" if n_open or n_after else ""
        console.print(f"MMAR predictions: {escape(report.mmar_predictions)}{left_out}")
    return 0


def _thread_saver(items: Sequence[Any]) -> Any:
    """An in-memory checkpointer when the data has threads (their turns share a graph thread), else None."""
    from .graphs.runner import has_threads

    if not has_threads(items):
        return None
    from langgraph.checkpoint.memory import InMemorySaver

    return InMemorySaver()


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

    backend = load_backend(
        args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation
    )
    if not isinstance(backend, TransformersBackend):
        raise ConfigError("collect needs a local transformers model")
    agent = EchoAgent(batched(backend, args.max_batch), config=config, checkpointer=_thread_saver(items))
    try:
        summary = await collect(
            agent, items, samples=args.samples, out=out, seed=args.seed, limit=args.limit,
            concurrency=args.concurrency, progress=True,
        )  # fmt: skip
    except BaseException:  # a full disk, Ctrl-C: stop the decoder before exiting
        await _stop_background()
        raise
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


def _check_seed(seed: int | None, where: str = "--seed") -> None:
    """A data or training seed: non-negative (numpy's generators refuse negative ones) and within 64 bits."""
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{where} must be between 0 and {SEED_MAX} (64 bits), got {seed}")


def _data_synth(args: argparse.Namespace) -> int:
    _check_seed(args.seed)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not 10.0 <= args.max_duration <= 3600.0:
        raise ConfigError(f"--max-duration must be between 10 and 3600 seconds, got {args.max_duration}")
    if not _SPLIT_RE.match(args.split):
        raise ConfigError(f"--split must be letters, digits, '_' or '-', got {args.split!r}")
    low, high = args.snr
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"--snr MIN MAX: two finite numbers of dB with MIN <= MAX, got {low:g} {high:g}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")

    from .training.synth import CATEGORIES, synth_command

    # The progress bar goes to stderr, so stdout holds only the JSON path.
    with contextlib.redirect_stdout(sys.stderr):
        path = synth_command(
            out, args.n, args.seed, args.split, args.workers, durations=(10.0, args.max_duration),
            snr_range=(low, high), categories=args.categories or CATEGORIES,
        )  # fmt: skip
    print(path)
    return 0


def _data_suite(args: argparse.Namespace) -> int:
    _check_seed(args.seed)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    from pydantic import ValidationError

    from .training.suite.write import PRESETS, SPLIT_SEED_OFFSET, SplitSpec, write_split

    todo: list[tuple[SplitSpec, int, int]] = []
    if args.splits:
        if args.split or args.n is not None:
            raise ConfigError("give either --splits NAME=N ... or --split NAME --n N, not both")
        for entry in args.splits:
            name, _, count = entry.partition("=")
            if name not in PRESETS or not count.isdigit() or int(count) < 1:
                raise ConfigError(f"--splits: expected NAME=N with NAME one of {', '.join(PRESETS)}, got {entry!r}")
            todo.append((PRESETS[name], int(count), args.seed * 1000 + SPLIT_SEED_OFFSET[name]))
    else:
        if not args.split or args.n is None:
            raise ConfigError("give --splits NAME=N ... or --split NAME --n N")
        if args.n < 1:
            raise ConfigError(f"--n must be >= 1, got {args.n}")
        base = PRESETS.get(args.split) or SplitSpec(name="custom")
        overrides = {
            k: v for k, v in {
                "name": args.split, "sources": args.sources, "phrasing": args.phrasing, "open_share": args.open_share,
                "thread_share": args.thread_share, "domains": tuple(args.domains) if args.domains else None,
                "categories": tuple(args.categories) if args.categories else None,
            }.items() if v is not None
        }  # fmt: skip
        try:
            spec = SplitSpec.model_validate({**base.model_dump(), **overrides})
        except ValidationError as err:
            raise ConfigError(f"--split {args.split}: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}") from None
        seed = args.seed * 1000 + SPLIT_SEED_OFFSET.get(args.split, 0) if args.split in PRESETS else args.seed
        todo.append((spec, args.n, seed))
    with contextlib.redirect_stdout(sys.stderr):  # the progress bars go to stderr; stdout holds the JSON paths
        paths = []
        for spec, n, seed in todo:
            try:
                paths.append(write_split(out, spec, n, seed, workers=args.workers, audio_format=args.audio_format))
            except ValueError as err:
                raise ConfigError(str(err)) from None
    for path in paths:
        print(path)
    return 0


def _data_mmar(args: argparse.Namespace) -> int:
    from .benchmarks import load_benchmark
    from .mmar import write_mmar

    items = load_benchmark(args.data)
    out = Path(args.out)
    if out.resolve() == Path(args.data).resolve():
        raise ConfigError(f"--out {out} would overwrite the data file")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'mmar.jsonl'}")
    done = write_mmar(items, out)
    print(
        f"{done.written} MMAR records: {out} (left out: {done.skipped_open} open questions, "
        f"{done.skipped_after_open} later turns of threads with an open turn)",
        file=sys.stderr,
    )
    print(out)
    return 0


def _data_verl(args: argparse.Namespace) -> int:
    import importlib.util

    from .benchmarks import load_benchmark

    items = load_benchmark(args.data)
    if importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("data verl needs pyarrow: pip install 'echo-agent[export]'")
    from .training.verl_data import export_verl_parquet

    print(f"{export_verl_parquet(items, Path(args.out))} rows: {args.out}")
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
    _check_seed(getattr(cfg, "seed", None), "seed")
    train = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    for path in (*train, cfg.val):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such data file: {path}")
    return cfg


def _print_final(path: Path) -> None:
    """The run's final model directory, printed once: by rank 0 under `accelerate launch`."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(path)


def _train_audio(args: argparse.Namespace) -> int:
    from .training.audio_pretrain import AudioPretrainConfig, pretrain

    cfg = _trainer_config(AudioPretrainConfig, args, {"train": args.train, "out": args.out},
                          ("steps", "batch_size", "lr", "seed", "val"))  # fmt: skip
    if cfg.init is not None and not ((cfg.init / "model").is_dir() and (cfg.init / "heads.pt").is_file()):
        raise ConfigError(f"init {cfg.init} is not a stage-0 run folder (model/ and heads.pt)")
    _print_final(pretrain(cfg))
    return 0


def _train_base(args: argparse.Namespace) -> int:
    from .training.base_lm import BaseLMConfig, train

    flags = ("audio_encoder", "feature_cache", "steps", "batch_size", "lr", "eval_every", "seed", "val", "lora")
    cfg = _trainer_config(BaseLMConfig, args, {"train": args.train, "out": args.out, "init": args.init}, flags)
    _print_final(train(cfg))
    return 0


def _train_grpo(args: argparse.Namespace) -> int:
    from .training.grpo import GRPOConfig, train

    flags = ("audio_mode", "reward", "steps", "group_size", "items_per_step", "lr", "kl_coef", "eval_every", "seed",
             "val", "lora", "feature_cache")  # fmt: skip
    cfg = _trainer_config(GRPOConfig, args, {"train": args.train, "out": args.out, "init": args.init}, flags)
    if not (Path(cfg.init) / "config.json").is_file():
        raise ConfigError(f"--init {cfg.init} is not a model directory")
    _print_final(train(cfg))
    return 0


def _train_sft(args: argparse.Namespace) -> int:
    from .training.sft import SFTConfig, train

    required = {"train": args.train, "out": args.out, "init": args.init, "audio_mode": args.audio_mode}
    flags = ("steps", "batch_size", "lr", "eval_every", "seed", "val", "lora", "audio_encoder", "feature_cache")
    cfg = _trainer_config(SFTConfig, args, required, flags)
    _print_final(train(cfg))
    return 0


def _nul_argument(args: argparse.Namespace) -> str | None:
    """The first argument that holds a NUL byte (no file path can; `main` may be called with any strings)."""
    for name, value in vars(args).items():
        if any(isinstance(v, str) and "\x00" in v for v in (value if isinstance(value, list) else [value])):
            return name
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (bad := _nul_argument(args)) is not None:
        shown = bad if bad in ("audio", "question", "data") else f"--{bad.replace('_', '-')}"
        print(f"error: {shown}: contains a NUL byte", file=sys.stderr)
        return EXIT_USAGE
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
        if args.command == "data" and args.data_command == "suite":
            return _data_suite(args)
        if args.command == "data" and args.data_command == "mmar":
            return _data_mmar(args)
        if args.command == "data" and args.data_command == "verl":
            return _data_verl(args)
        if args.command == "train" and args.train_command == "audio":
            return _train_audio(args)
        if args.command == "train" and args.train_command == "base":
            return _train_base(args)
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

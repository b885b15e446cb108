"""The SFT trainer (training/sft.py) on the synthetic suite: what the loss sees, what audio is inserted,
and real optimisation steps on tiny random models (Qwen2-Audio and echo-tiny), resume and LoRA.

`ScriptedBackend` below is a TEST DOUBLE, labelled as such: it replays a gold trace through the real
agent graph, so the runtime's own listen path (protocol, `ListenTool`, delivery) decides what audio
it inserts; the trainer's inserted audio is compared against that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from doubles import ScriptedBackend

from echo_agent.agent import EchoAgent
from echo_agent.audio import AudioStore
from echo_agent.backends.base import AudioResolver, Generation, GenerationRequest
from echo_agent.backends.transformers import PromptEncoder, TransformersBackend, encode_audio_placeholder
from echo_agent.benchmarks import BenchItem
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.echo_tiny import new_echo_tiny
from echo_agent.messages import Message, audio_part
from echo_agent.protocols import SEG_CLOSE, parse_closing_seg
from echo_agent.tiny_models import build_qwen2_audio_processor, build_tiny_qwen2_audio
from echo_agent.tools.listen import ListenTool
from echo_agent.training.common import load_items
from echo_agent.training.sft import (
    SFTConfig,
    batches,
    encode_example,
    text_only_trace,
    trace_messages,
    train,
)
from echo_agent.training.synth import write_suite

AUDIO_SPECIALS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
# Sizes that keep echo-tiny fast on a CPU.
TINY: dict[str, Any] = {"vocab_size": 400, "hidden_size": 64, "layers": 2, "intermediate_size": 128,
                        "audio_hidden_size": 64}  # fmt: skip


# ---- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One item of every category (10-14 s clips)."""
    return write_suite(tmp_path_factory.mktemp("suite"), 6, 0, "train", progress=False, durations=(10.0, 14.0))


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four one-listen items (2 audio inputs each): cheap for Qwen2-Audio's 30 s encoder."""
    out = tmp_path_factory.mktemp("small")
    return write_suite(out, 4, 1, "train", categories=("count", "identify"), progress=False, durations=(10.0, 14.0))


def with_trace(item: BenchItem, trace: str) -> BenchItem:
    return item.model_copy(update={"record": {**item.record, "trace": trace}})


# A span past the clip's end (clamped), one starting past it (invalid: a note, no audio), one normal.
ODD_TRACE = (
    "<think>I listen to 8.0-20.0 s: <seg>8.0, 20.0</seg> ok. Then <seg>40.0, 45.0</seg> hm. "
    "And <seg>1.0, 2.5</seg> fine.</think><answer>1</answer>"
)


def tiny_echo_processor(items: list[BenchItem]) -> Any:
    corpus = [it.question + " " + " ".join(it.choices) + " " + it.record["trace"] for it in items]
    return new_echo_tiny(SFTConfig(train=Path("x"), out=Path("y"), **TINY), corpus)[1]


def processors(items: list[BenchItem]) -> dict[str, Any]:
    return {"qwen2-audio": build_qwen2_audio_processor(), "echo-tiny": tiny_echo_processor(items)}


def prompt_ids(item: BenchItem, encoder: PromptEncoder, store: AudioStore) -> list[int]:
    """The ids of the prompt alone (user turn + assistant header), as the runtime encodes it."""
    messages, resolver = trace_messages(item, store, "interleaved")
    return encoder.encode(GenerationRequest(messages=messages[:1]), resolver).input_ids


def labelled(labels: list[int]) -> list[int]:
    return [t for t in labels if t != -100]


# ---- 1. the loss mask (design §6) ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2-audio", "echo-tiny"])
def test_loss_mask_covers_only_the_trace(suite: Path, family: str) -> None:
    items = load_items(suite)
    processor = processors(items)[family]
    encoder, store, tok = PromptEncoder(processor), AudioStore(), processor.tokenizer
    audio_ids = {tok.convert_tokens_to_ids(t) for t in AUDIO_SPECIALS}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    odd = with_trace(items[0], ODD_TRACE)
    for item in [*items, odd]:
        ex = encode_example(item, encoder, store, "interleaved")
        ids, labels = ex.input_ids, ex.labels
        assert len(ids) == len(labels)
        assert ids[-1] == eos and labels[-1] == eos
        # Every label is either masked or the input token itself.
        assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))
        # Audio placeholders (the clip's and every inserted slice's) are never trained on.
        assert all(lab == -100 for t, lab in zip(ids, labels, strict=True) if t in audio_ids)
        # The prompt is masked, and the trace starts right after it.
        prompt = prompt_ids(item, encoder, store)
        assert ids[: len(prompt)] == prompt
        assert all(lab == -100 for lab in labels[: len(prompt)])
        assert labels[len(prompt)] != -100
        # The labelled tokens are exactly the gold trace (nothing inserted) plus the eos.
        assert tok.decode(labelled(labels)) == item.record["trace"] + "<|im_end|>"
        # One audio input for the clip and one per valid seg tag, each with its placeholder block.
        n_valid = item.record["trace"].count(SEG_CLOSE) - (1 if item is odd else 0)
        assert len(ex.audios) == 1 + n_valid
        assert ids.count(tok.convert_tokens_to_ids("<|audio_bos|>")) == len(ex.audios)
        audio_tok = tok.convert_tokens_to_ids("<|AUDIO|>")
        assert ids.count(audio_tok) == sum(a.num_audio_tokens for a in ex.audios)
        if family == "echo-tiny":
            assert all(a.num_audio_tokens == 16 for a in ex.audios)

        grounded = encode_example(item, encoder, store, "grounded")
        assert len(grounded.audios) == 1  # the clip only
        assert tok.decode(labelled(grounded.labels)) == item.record["trace"] + "<|im_end|>"
        # Nothing but the prompt and the trace: no audio, no notes.
        assert grounded.input_ids == [*prompt, *labelled(grounded.labels)]
    # The invalid span became a masked note, not audio.
    note = encode_example(odd, encoder, store, "interleaved")
    unlabelled = tok.decode([t for t, lab in zip(note.input_ids, note.labels, strict=True) if lab == -100])
    assert "(cannot listen to 40-45 s" in unlabelled


# ---- 2. inserted audio == what the runtime's ListenTool produces ------------------------------------


class TraceReplay(ScriptedBackend):
    """TEST DOUBLE: replays a gold trace piece by piece, stopping after each `</seg>` as a real backend
    would (stop string kept in the text, as `TransformersBackend` does); records each request."""

    def __init__(self, trace: str) -> None:
        pieces = trace.split(SEG_CLOSE)
        super().__init__(
            [
                Generation(text=p + SEG_CLOSE, finish_reason="stop", stop_string=SEG_CLOSE, stop_string_in_text=True)
                for p in pieces[:-1]
            ]
            + [Generation(text=pieces[-1], finish_reason="eos")]
        )


def spans(message: Message) -> list[tuple[str, float | None, float | None]]:
    return [(p["clip"], p["start"], p["end"]) for p in message["content"] if p["type"] == "audio"]


def shape(message: Message) -> list[tuple[str, str]]:
    """Each part as (kind, text or span): what the model is shown, in order."""
    out = []
    for p in message["content"]:
        if p["type"] == "audio":
            out.append(("audio", f"{p['clip']}@{p['start']}-{p['end']}"))
        else:
            out.append((p["origin"] if p["origin"] == "note" else "text", p["text"]))
    return out


async def test_inserted_audio_is_the_runtime_listen_slice(suite: Path) -> None:
    items = load_items(suite)
    store = AudioStore()
    tool = ListenTool()
    processor = build_qwen2_audio_processor()
    encoder = PromptEncoder(processor)
    for item in [*items, with_trace(items[0], ODD_TRACE)]:
        messages, resolver = trace_messages(item, store, "interleaved")
        ref = resolver.clips["main"]
        assistant = messages[1]

        # What ListenTool decides for each tag, one call after another as the runtime makes them.
        expected = []
        used = 1
        text = ""
        for piece in item.record["trace"].split(SEG_CLOSE)[:-1]:
            text += piece + SEG_CLOSE
            outcome = tool(parse_closing_seg(text), {"main": ref}, used)
            used += int(outcome.valid)
            if outcome.audio is not None:
                expected.append((outcome.audio["clip"], outcome.audio["start"], outcome.audio["end"]))
        assert spans(assistant) == expected

        # The same slices reach a model through the real graph replaying the trace.
        backend = TraceReplay(item.record["trace"])
        agent = EchoAgent(backend, store, AgentConfig())
        await agent.ask(item.audio, item.question, item.choices)
        runtime = backend.requests[-1].messages
        assert shape(runtime[0]) == shape(messages[0])  # the same user turn
        last_text = item.record["trace"].split(SEG_CLOSE)[-1]
        assert [*shape(runtime[-1]), ("text", last_text)] == shape(assistant)

        # ... and the features the trainer feeds are the processor's features of exactly that slice.
        ex = encode_example(item, encoder, store, "interleaved")
        for (_, start, end), enc in zip(expected, ex.audios[1:], strict=True):
            slice_ = store.slice(ref, start, end, 16000)
            want = encode_audio_placeholder(processor, slice_)
            assert torch.equal(enc.features, want.features)
            assert enc.input_ids == want.input_ids

    # An end past the clip is clamped to the clip's duration, exactly as ListenTool does.
    messages, resolver = trace_messages(with_trace(items[0], ODD_TRACE), store, "interleaved")
    duration = resolver.clips["main"].duration
    assert duration < 20.0
    first = spans(messages[1])[0]
    assert first == ("main", 8.0, duration)
    samples = resolver.samples(audio_part("main", 8.0, duration), 16000)
    assert abs(len(samples) - (duration - 8.0) * 16000) <= 1


# ---- 3. real SFT steps on a tiny random Qwen2-Audio -------------------------------------------------


def log_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def user_message(item: BenchItem, store: AudioStore) -> tuple[Message, AudioResolver]:
    messages, resolver = trace_messages(item, store, "interleaved")
    return messages[0], resolver


async def test_sft_steps_lower_the_loss_on_qwen2_audio(small_suite: Path, tmp_path: Path) -> None:
    model, processor = build_tiny_qwen2_audio(0)
    cfg = SFTConfig(train=small_suite, out=tmp_path / "run", steps=16, batch_size=2, lr=1e-2, warmup=1,
                    log_every=1, save_every=100)  # fmt: skip
    final = train(cfg, model=model, processor=processor)
    losses = [r["loss"] for r in log_records(cfg.out)]
    assert [r["step"] for r in log_records(cfg.out)] == list(range(1, 17))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, losses

    backend = TransformersBackend.from_pretrained(final)
    assert backend.family == "qwen2_audio"
    store = AudioStore()
    item = load_items(small_suite)[0]
    user, resolver = user_message(item, store)
    gen = await backend.generate(
        GenerationRequest(messages=[user], sampling=SamplingParams(max_new_tokens=8)), resolver
    )
    assert 1 <= len(gen.token_ids) <= 8


# ---- 4. echo-tiny from scratch -----------------------------------------------------------------------


def echo_tiny_cfg(train_json: Path, out: Path, **kw: Any) -> SFTConfig:
    defaults: dict[str, Any] = {"batch_size": 2, "lr": 3e-3, "warmup": 1, "log_every": 1, "save_every": 100}
    return SFTConfig(train=train_json, out=out, init="echo-tiny", **{**TINY, **defaults, **kw})


async def test_echo_tiny_from_scratch_loads_and_answers(suite: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoProcessor

    import echo_agent.echo_tiny
    from echo_agent.echo_tiny import EchoTinyForConditionalGeneration, EchoTinyProcessor

    cfg = echo_tiny_cfg(suite, tmp_path / "run", steps=3)
    final = train(cfg)
    assert final == cfg.out / "final" and (final / "config.json").is_file()
    assert echo_agent.echo_tiny.EchoTinyConfig.model_type == "echo_tiny"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    processor = AutoProcessor.from_pretrained(final, local_files_only=True)
    assert isinstance(model, EchoTinyForConditionalGeneration)
    assert isinstance(processor, EchoTinyProcessor)
    assert model.config.text_config.hidden_size == 64 and model.config.text_config.num_hidden_layers == 2

    agent = EchoAgent(
        TransformersBackend.from_pretrained(final),
        config=AgentConfig(sampling=SamplingParams(max_new_tokens=24), max_model_calls=4),
    )
    item = load_items(suite)[0]
    result = await agent.ask(item.audio, item.question, item.choices, gold=item.answer)
    assert result.status in ("answered", "no_answer")
    assert result.generated_tokens > 0


# ---- 5. resume ---------------------------------------------------------------------------------------


def test_resume_continues_from_the_checkpoint(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(echo_tiny_cfg(suite, out, steps=4, save_every=2))
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4
    # A crash in the middle of the next save: a half-written checkpoint.tmp full of garbage.
    tmp = out / "checkpoint.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp / "junk.bin").write_bytes(b"junk")

    train(echo_tiny_cfg(suite, out, steps=6, save_every=2))
    steps = [r["step"] for r in log_records(out)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4: nothing repeated, nothing skipped
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 6
    assert not tmp.exists()
    assert not (out / "checkpoint" / "junk.bin").exists()  # the stale half-save is not promoted
    TransformersBackend.from_pretrained(out / "checkpoint")
    TransformersBackend.from_pretrained(out / "final")

    # Nothing left to do: a rerun with the same step count trains no further.
    train(echo_tiny_cfg(suite, out, steps=6, save_every=2))
    assert [r["step"] for r in log_records(out)] == steps


def test_several_training_files_are_concatenated(suite: Path, tmp_path: Path) -> None:
    """`--train A.json B.json`: the run trains on both suites' items (a weighted extra suite from
    `data synth --categories` is how the shipped model got more count/order/locate practice)."""
    from echo_agent.cli import main

    extra_dir = tmp_path / "extra"
    assert main(["data", "synth", "--out", str(extra_dir), "--n", "3", "--seed", "9", "--split", "extra",
                 "--max-duration", "12", "--categories", "count", "count", "locate"]) == 0  # fmt: skip
    extra = extra_dir / "extra.json"
    with pytest.raises(SystemExit) as bad:  # an unknown name is a usage error (exit 2), not a traceback
        main(["data", "synth", "--out", str(tmp_path / "bad"), "--n", "1", "--seed", "1", "--categories", "bark"])
    assert bad.value.code == 2
    assert [it["category"] for it in json.loads(extra.read_text())] == ["count", "count", "locate"]
    cfg = SFTConfig.model_validate({**echo_tiny_cfg(suite, tmp_path / "run").model_dump(), "train": [suite, extra]})
    assert cfg.train == [suite, extra] and echo_tiny_cfg(suite, tmp_path).train == [suite]
    # One batch of all 9 items can only be formed from both files together (6 + 3).
    train(cfg.model_copy(update={"steps": 1, "batch_size": 9}))
    with pytest.raises(ValueError, match="batch"):
        train(echo_tiny_cfg(suite, tmp_path / "run6", steps=1, batch_size=9))


def test_too_few_items_for_a_batch_is_an_error(suite: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch"):
        train(echo_tiny_cfg(suite, tmp_path / "run", steps=1, batch_size=8))


# ---- 6. LoRA -----------------------------------------------------------------------------------------


def test_lora_trains_adapters_only_and_saves_a_merged_model(small_suite: Path, tmp_path: Path) -> None:
    model, processor = build_tiny_qwen2_audio(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SFTConfig(train=small_suite, out=tmp_path / "run", steps=2, batch_size=2, lr=1e-2, warmup=1,
                    log_every=1, lora=True, lora_r=2, lora_alpha=4)  # fmt: skip
    final = train(cfg, model=model, processor=processor)
    assert not (final / "adapter_config.json").exists()
    backend = TransformersBackend.from_pretrained(final)
    assert type(backend.model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert not any("lora" in name for name, _ in backend.model.named_modules())
    after = backend.model.state_dict()
    assert set(after) == set(before)
    targets = tuple(f"{t}.weight" for t in cfg.lora_targets)
    changed = 0
    for name, w in before.items():
        if name.endswith(targets):
            delta = (after[name] - w).double()
            # A merged adapter: a low-rank update of at most rank r.
            assert int(torch.linalg.matrix_rank(delta, atol=1e-6)) <= cfg.lora_r, name
            changed += int(bool(delta.abs().max() > 0))
        else:
            assert torch.equal(after[name], w), f"base weight {name} changed"
    assert changed > 0  # the adapters did learn something and were merged

    # Resume the LoRA run (the checkpoint holds the adapter and its optimizer state).
    cfg2 = cfg.model_copy(update={"steps": 3})
    model2, processor2 = build_tiny_qwen2_audio(0)
    final = train(cfg2, model=model2, processor=processor2)
    assert [r["step"] for r in log_records(cfg.out)] == [1, 2, 3]
    assert not any("lora" in n for n, _ in TransformersBackend.from_pretrained(final).model.named_modules())


# ---- 7. grounded (the paper's stage-1 cold start) -------------------------------------------------------


def test_grounded_trains_without_inserted_audio(suite: Path, tmp_path: Path) -> None:
    items = load_items(suite)
    corpus = [it.question + " " + " ".join(it.choices) + " " + it.record["trace"] for it in items]
    cfg = echo_tiny_cfg(suite, tmp_path / "run", steps=3, audio_mode="grounded")
    model, processor = new_echo_tiny(cfg, corpus, cfg.seed)
    bos = processor.tokenizer.convert_tokens_to_ids("<|audio_bos|>")
    seen: list[tuple[int, list[int]]] = []

    def record(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]
        seen.append((int(kwargs["input_features"].shape[0]), [int((row == bos).sum()) for row in ids]))

    model.register_forward_pre_hook(record, with_kwargs=True)
    train(cfg, model=model, processor=processor)
    assert len(seen) == 3
    for n_audio, per_row in seen:
        assert per_row == [1, 1] and n_audio == 2  # the clip of each example, nothing inserted
    assert all(r["loss"] > 0 for r in log_records(cfg.out))

    # The same items in interleaved mode do insert audio.
    data = batches(items, PromptEncoder(processor), "interleaved", 2, 0, processor.tokenizer.pad_token_id)
    batch, _ = next(data)
    assert batch["input_features"].shape[0] > 2


def test_stale_final_tmp_is_not_promoted(suite: Path, tmp_path: Path) -> None:
    """A stale final.tmp (a crash while writing final/) does not end up inside the next final/."""
    out = tmp_path / "run"
    (out / "final.tmp").mkdir(parents=True)
    (out / "final.tmp" / "junk.bin").write_bytes(b"junk")
    final = train(echo_tiny_cfg(suite, out, steps=1))
    assert not (final / "junk.bin").exists()
    TransformersBackend.from_pretrained(final)


def test_text_variant_drops_every_listen(suite: Path) -> None:
    """The text-only baseline's targets: the reasoning without a single `<seg>`, and no inserted audio."""
    store = AudioStore()
    for item in load_items(suite):
        messages, _ = trace_messages(item, store, "text")
        parts = messages[1]["content"]
        assert all(p["type"] == "text" for p in parts)
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        assert "<seg>" not in text and "I listen to" not in text
        assert text.endswith(f"<answer>{item.answer}</answer>") and text.startswith("<think>")
        # Every observation of the gold trace survives, only the listening is gone.
        assert text_only_trace(item.record["trace"]) == text
        assert len(text) < len(item.record["trace"])

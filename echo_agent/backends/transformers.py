"""Local audio LLMs through transformers: Qwen2-Audio, the Qwen2.5-Omni thinker, and any model whose
processor expands `<|audio_bos|><|AUDIO|><|audio_eos|>` into audio tokens the same way.

Token-in/token-out: the prompt is built piece by piece. Conversation history goes through the
processor's own chat template; inside the assistant turn being continued, text the model sampled is
spliced back as its *exact* token ids (never re-tokenised), and each re-listened slice is encoded by
the real processor as one more audio input right where it was inserted. So the trainer later sees
exactly the tokens that were sampled, and audio features line up with their placeholders.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import Qwen2_5OmniProcessor, Qwen2AudioProcessor

from ..errors import BackendError
from ..messages import AudioPart, Message, ToolCall
from .base import AudioResolver, DeltaCallback, FinishReason, Generation, GenerationRequest

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AudioFamily = Literal["qwen2_audio", "qwen2_5_omni", "echo_tiny"]
QwenFamily = AudioFamily  # kept for callers that name the Qwen families
SAMPLING_RATE = 16000
QWEN2_AUDIO_MEL_FRAMES = 3000  # the Qwen2-Audio encoder accepts exactly 30 s of mel frames
_STOP_OVERHANG = 16
# Tags only: the bodies are found by position (`parse_tool_calls`), in one linear pass. A lazy `.*?` body
# regex rescans to the end of the text for every unclosed block: quadratic on "<tool_call>{" * n.
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*|</tool_call>")  # an opening tag with the whitespace after it


@dataclass
class EncodedAudio:
    """One clip as the real processor encodes it, ready to be spliced into a longer sequence."""

    input_ids: list[int]
    """`<|audio_bos|>`, N x `<|AUDIO|>` (N from the clip's length), `<|audio_eos|>`."""
    features: torch.Tensor
    """Mel features `(128, T)`: T = 3000 for Qwen2-Audio, the valid frames only for the Omni thinker."""
    feature_mask: torch.Tensor
    """Feature attention mask `(T,)`: 1 on valid frames."""

    @property
    def num_audio_tokens(self) -> int:
        """How many `<|AUDIO|>` tokens this clip costs."""
        return len(self.input_ids) - 2


def processor_family(processor: Any) -> AudioFamily:
    """Which family a processor belongs to: the `audio_family` its class declares (our own processors, e.g.
    echo-tiny's), else transformers' Qwen audio processors by class."""
    declared = getattr(type(processor), "audio_family", None)
    families: tuple[AudioFamily, ...] = ("qwen2_audio", "qwen2_5_omni", "echo_tiny")
    for family in families:
        if declared == family:
            return family
    if isinstance(processor, Qwen2_5OmniProcessor):
        return "qwen2_5_omni"
    if isinstance(processor, Qwen2AudioProcessor):
        return "qwen2_audio"
    raise TypeError(f"unsupported processor {type(processor).__name__}")


def encode_audio_placeholder(
    processor: Any,
    waveform: np.ndarray,
    sampling_rate: int = SAMPLING_RATE,
) -> EncodedAudio:
    """Run the real processor on `AUDIO_PLACEHOLDER` with one mono clip; return its ids and features.

    Concatenating the ids of several clips (with text between) and collating their features with
    `collate_audio_features` gives the same model inputs as one processor call on the whole text.
    """
    family = processor_family(processor)
    clip = np.asarray(waveform, dtype=np.float32)
    if clip.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {clip.shape}")
    if clip.size == 0:
        raise ValueError("cannot encode an empty waveform")
    out = processor(text=AUDIO_PLACEHOLDER, audio=[clip], sampling_rate=sampling_rate, return_tensors="pt")
    input_ids = [int(i) for i in out["input_ids"][0].tolist()]
    features = out["input_features"][0]
    mask = out["feature_attention_mask"][0]
    if family != "qwen2_audio":  # only Qwen2-Audio's encoder needs the fixed 30 s of frames
        valid = int(mask.sum())
        features = features[:, :valid].clone()
        mask = mask[:valid].clone()
    return EncodedAudio(input_ids=input_ids, features=features, feature_mask=mask)


def collate_audio_features(family: str, clips: Sequence[EncodedAudio]) -> dict[str, torch.Tensor]:
    """Model kwargs `input_features` `(N, 128, T)` and `feature_attention_mask` `(N, T)` for the clips in
    the order their placeholders appear in `input_ids`.

    Qwen2-Audio: T = 3000 (the encoder's fixed length). Omni thinker: T = the longest clip; the thinker
    ignores padded frames.
    """
    if family not in ("qwen2_audio", "qwen2_5_omni", "echo_tiny"):
        raise ValueError(f"unsupported family {family!r}")
    fam = family
    if not clips:
        raise ValueError("no clips to collate")
    lengths = [int(c.features.shape[-1]) for c in clips]
    if fam == "qwen2_audio":
        if max(lengths) > QWEN2_AUDIO_MEL_FRAMES:
            raise ValueError(f"Qwen2-Audio clips have at most {QWEN2_AUDIO_MEL_FRAMES} mel frames, got {max(lengths)}")
        target = QWEN2_AUDIO_MEL_FRAMES
    else:
        target = max(lengths)
    features = torch.stack([torch.nn.functional.pad(c.features, (0, target - c.features.shape[-1])) for c in clips])
    masks = torch.stack(
        [torch.nn.functional.pad(c.feature_mask, (0, target - c.feature_mask.shape[-1])) for c in clips]
    )
    return {"input_features": features, "feature_attention_mask": masks}


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    audios: list[EncodedAudio]
    # 1 on tokens of model-written text in the continued assistant turn, 0 elsewhere (prompt, inserted
    # audio placeholders, runtime text, notes): the SFT/GRPO loss mask of design §6.
    loss_mask: list[int]


def _hf_content(msg: Message) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in msg["content"]:
        if part["type"] == "audio":
            out.append({"type": "audio", "audio": f"{part['clip']}@{part['start']}-{part['end']}"})
        else:
            out.append({"type": "text", "text": part["text"]})
    return out


def _hf_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Our messages in the transformers chat format. Tool results become user turns in Hermes style,
    since audio-LLM templates (Qwen2-Audio's among them) have no tool role."""
    conv: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "tool":
            text = "".join(p["text"] for p in msg["content"] if p["type"] == "text")
            conv.append(
                {
                    "role": "user",
                    "content": [{"type": "text", "text": f"<tool_response>\n{text}\n</tool_response>"}],
                }
            )
        else:
            conv.append({"role": msg["role"], "content": _hf_content(msg)})
    return conv


def _tools_system_text(tools: list[dict[str, object]]) -> str:
    return (
        "You may call functions to help you. Function signatures are within <tools></tools>:\n<tools>\n"
        + "\n".join(json.dumps(t) for t in tools)
        + '\n</tools>\nTo call one, write <tool_call>{"name": <name>, "arguments": <json object>}</tool_call>.'
    )


def parse_tool_calls(text: str, first_index: int = 0) -> list[ToolCall]:
    """Hermes-style `<tool_call>{...}</tool_call>` blocks. Unparseable JSON is kept raw so the protocol
    can answer with a note (it never raises).

    The blocks are those of `<tool_call>\\s*(\\{.*?\\})\\s*</tool_call>` (DOTALL) found left to right, in
    linear time: a block's body runs from the `{` after its opening tag to the first closing tag that has
    only whitespace after a `}`. Such closing tags are taken in order, so no part of the text is scanned twice."""
    calls: list[ToolCall] = []
    tags = [(m.start(), m.end(), m.group().startswith("<tool_call>")) for m in _TOOL_CALL_RE.finditer(text)]
    closes = [at for at, _, is_open in tags if not is_open]
    ci, resume = 0, 0  # next closing tag to consider; where the previous block ended
    for at, brace, is_open in tags:
        if not is_open or at < resume:
            continue
        if brace == len(text) or text[brace] != "{":
            continue
        body_end = -1
        while ci < len(closes) and body_end < 0:
            close = closes[ci]
            ci += 1
            if close <= brace:
                continue
            q = close - 1
            while text[q].isspace():  # stops at the `{` at the latest
                q -= 1
            if text[q] == "}":
                body_end, resume = q + 1, close + len("</tool_call>")
        if body_end < 0:
            break  # no closing tag fits this block, so none fits a later one either
        body = text[brace:body_end]
        try:
            obj = json.loads(body)
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = json.dumps(obj.get("arguments", {}))
                calls.append({"id": f"call_{first_index + len(calls)}", "name": obj["name"], "arguments": args})
                continue
        except (ValueError, RecursionError):  # bad JSON, ints over Python's digit limit, nesting too deep
            pass
        calls.append({"id": f"call_{first_index + len(calls)}", "name": "listen", "arguments": body[:200]})
    return calls


class PromptEncoder:
    """Builds model inputs from a conversation, piece by piece, with the model's real processor.

    Shared by the backend (generation) and the trainers (SFT, GRPO), so training sees exactly the
    token layout that inference produces. Audio features are cached per (clip hash, span)."""

    def __init__(self, processor: Any, feature_cache_size: int = 256, feature_cache_bytes: int = 64 << 20) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family: AudioFamily = processor_family(processor)
        self.sample_rate = int(processor.feature_extractor.sampling_rate)
        self._features: OrderedDict[tuple[str, float | None, float | None], EncodedAudio] = OrderedDict()
        self._cache_size = feature_cache_size
        # Bounded by bytes too: a Qwen2-Audio entry is 128 x 3000 floats (1.5 MB) whatever the slice, so 256
        # entries after a few long clips held ~400 MB of a server's memory.
        self._cache_bytes = feature_cache_bytes
        self._cached_bytes = 0

    @staticmethod
    def _nbytes(enc: EncodedAudio) -> int:
        return enc.features.nbytes + enc.feature_mask.nbytes

    def encode_audio_part(self, part: AudioPart, audio: AudioResolver) -> EncodedAudio:
        key = (audio.ref(part).sha256, part["start"], part["end"])
        hit = self._features.get(key)
        if hit is not None:
            self._features.move_to_end(key)
            return hit
        enc = encode_audio_placeholder(self.processor, audio.samples(part, self.sample_rate), self.sample_rate)
        self._features[key] = enc
        self._cached_bytes += self._nbytes(enc)
        while len(self._features) > 1 and (
            len(self._features) > self._cache_size or self._cached_bytes > self._cache_bytes
        ):
            _, old = self._features.popitem(last=False)
            self._cached_bytes -= self._nbytes(old)
        return enc

    def encode_text(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def encode(self, request: GenerationRequest, audio: AudioResolver) -> EncodedPrompt:
        messages = list(request.messages)
        partial: Message | None = None
        if request.continue_final:
            if not messages or messages[-1]["role"] != "assistant":
                raise BackendError("continue_final needs a final assistant message")
            partial = messages.pop()
        hf = _hf_messages(messages)
        if request.tools:
            hf.insert(
                0,
                {"role": "system", "content": [{"type": "text", "text": _tools_system_text(request.tools)}]},
            )
        rendered = self.processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=False)
        if isinstance(rendered, list):
            rendered = rendered[0]
        history_audio = [p for m in messages for p in m["content"] if p["type"] == "audio"]
        pieces = rendered.split(AUDIO_PLACEHOLDER)
        if len(pieces) - 1 != len(history_audio):
            raise BackendError(
                f"chat template rendered {len(pieces) - 1} audio placeholders for {len(history_audio)} audio parts"
            )
        ids: list[int] = []
        mask: list[int] = []
        audios: list[EncodedAudio] = []

        def add(new: list[int], trainable: bool = False) -> None:
            ids.extend(new)
            mask.extend([int(trainable)] * len(new))

        for i, piece in enumerate(pieces):
            add(self.encode_text(piece))
            if i < len(history_audio):
                enc = self.encode_audio_part(history_audio[i], audio)
                add(enc.input_ids)
                audios.append(enc)
        if partial is not None:
            for part in partial["content"]:
                if part["type"] == "audio":
                    enc = self.encode_audio_part(part, audio)
                    add(enc.input_ids)
                    audios.append(enc)
                elif part["origin"] == "model":
                    # Exactly what was sampled when known (token-in/token-out), else the text's tokens.
                    add(part["token_ids"] if "token_ids" in part else self.encode_text(part["text"]), trainable=True)
                else:
                    add(self.encode_text(part["text"]))
        return EncodedPrompt(input_ids=ids, audios=audios, loss_mask=mask)

    def collate(self, audios: Sequence[EncodedAudio]) -> dict[str, torch.Tensor]:
        return collate_audio_features(self.family, audios)


class _DeltaStreamer:
    """A transformers streamer that forwards decoded text to the event loop in small batches.

    Posting every token across threads cost ~10% of a tiny model's generate time, so text is
    flushed at most every `interval` seconds (and at the end): still live for a reader."""

    def __init__(
        self, tokenizer: Any, loop: asyncio.AbstractEventLoop, callback: DeltaCallback, interval: float = 0.05
    ) -> None:
        self.tokenizer, self.loop, self.callback, self.interval = tokenizer, loop, callback, interval
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.last_flush = time.monotonic()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        if time.monotonic() - self.last_flush >= self.interval:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        self.last_flush = time.monotonic()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # maybe an incomplete multi-byte character: wait
            return
        delta, self.sent = text[self.sent :], len(text)
        if delta:
            self.loop.call_soon_threadsafe(self.callback, delta)

    def end(self) -> None:
        self._flush(final=True)


class TransformersBackend:
    """Runs one transformers audio LLM, one request at a time (calls are serialised on a lock).

    For many concurrent runs sharing the model, wrap it in `echo_agent.backends.batching.BatchingBackend`."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str | None = None,
        feature_cache_size: int = 256,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.encoder = PromptEncoder(processor, feature_cache_size)
        self.family: AudioFamily = self.encoder.family
        self._name = name or str(getattr(model.config, "name_or_path", "") or model.config.model_type)
        self._lock = threading.Lock()
        self.last_prompt: EncodedPrompt | None = None  # the most recent prompt, for inspection and tests
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos: set[int] = set(eos if isinstance(eos, list) else [eos])
        # Audio placeholder tokens are never sampled: the model cannot write audio, and a sampled <|AUDIO|> would
        # be read as an audio slot on the next call (a random or weak model does sample them).
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")]
        self.never_ids: list[int] = [i for i in ids if isinstance(i, int) and i != self.tokenizer.unk_token_id]

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        name: str | None = None,
        attn_implementation: str | None = None,
        device_map: str | None = None,
    ) -> TransformersBackend:
        """Load a local model directory (nothing is downloaded) onto `device` in `dtype` (None: as saved), or spread
        over every GPU with `device_map="auto"`. `attn_implementation` is transformers' ("eager", "sdpa",
        "flash_attention_2")."""
        from transformers import AutoConfig, AutoProcessor

        from .. import families

        path = Path(path)
        if not (path / "config.json").is_file():
            raise BackendError(f"{path} is not a model directory (no config.json)")
        from .. import echo_tiny  # noqa: F401  (registers echo-tiny with the Auto classes)

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls = families.model_class(config)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = model_cls.from_pretrained(path, **kwargs)
        if device_map is None:
            model = model.to(device)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, name=name or path.name)

    # ---- prompt construction -----------------------------------------------------------------

    def encode(self, request: GenerationRequest, audio: AudioResolver) -> EncodedPrompt:
        return self.encoder.encode(request, audio)

    def _encode_text(self, text: str) -> list[int]:
        return self.encoder.encode_text(text)

    # ---- generation -------------------------------------------------------------------------

    def _generate_sync(self, request: GenerationRequest, prompt: EncodedPrompt, streamer: Any) -> Generation:
        s = request.sampling
        device = self.model.device
        input_ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if prompt.audios:
            feats = collate_audio_features(self.family, prompt.audios)
            kwargs["input_features"] = feats["input_features"].to(device=device, dtype=self.model.dtype)
            kwargs["feature_attention_mask"] = feats["feature_attention_mask"].to(device)
        greedy = s.temperature == 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "do_sample": not greedy,
            "return_dict_in_generate": True,
            "output_logits": True,
            "eos_token_id": sorted(self._eos),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if not greedy:
            gen_kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        if request.stop:
            gen_kwargs.update(stop_strings=list(request.stop), tokenizer=self.tokenizer)
        bad = [self._encode_text(w) for w in request.suppress] + [[i] for i in self.never_ids]
        if bad:
            gen_kwargs["bad_words_ids"] = bad
        if streamer is not None:
            gen_kwargs["streamer"] = streamer
        with self._lock, torch.inference_mode():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            out = self.model.generate(**kwargs, **gen_kwargs)
        new_ids: list[int] = out.sequences[0, len(prompt.input_ids) :].tolist()
        # Log-probs of the sampled tokens under the distribution they were sampled from
        # (temperature applied, before top-p/top-k truncation), as the trainer will recompute them.
        logits = torch.stack([step[0] for step in out.logits]).float()
        if not greedy:
            logits = logits / s.temperature
        sampled = torch.tensor(new_ids, device=logits.device).unsqueeze(-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sampled).squeeze(-1)
        return self.to_generation(request, prompt, new_ids, logprobs.tolist())

    def to_generation(
        self, request: GenerationRequest, prompt: EncodedPrompt, new_ids: list[int], logprobs: list[float]
    ) -> Generation:
        """The `Generation` for sampled ids: decoded text, finish reason, tool calls. Shared with the batcher
        (`echo_agent.backends.batching`) so batched and single calls report alike."""
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish: FinishReason = "length"
        stop_string: str | None = None
        if new_ids and new_ids[-1] in self._eos:
            finish = "eos"
        else:
            # A stop string can end inside the last token (multi-character tokens), so allow overhang.
            for stop in request.stop:
                idx = text.rfind(stop)
                if idx >= 0 and len(text) - idx - len(stop) <= _STOP_OVERHANG:
                    finish, stop_string = "stop", stop
                    break
        tool_calls = parse_tool_calls(text) if request.tools else []
        if tool_calls:
            finish = "tool_calls"
        return Generation(
            text=text, token_ids=new_ids, logprobs=logprobs, finish_reason=finish,
            stop_string=stop_string, stop_string_in_text=True, tool_calls=tool_calls, prompt_ids=list(prompt.input_ids),
        )  # fmt: skip

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        prompt = self.encode(request, audio)
        self.last_prompt = prompt
        streamer = None
        if on_delta is not None:
            streamer = _DeltaStreamer(self.tokenizer, asyncio.get_running_loop(), on_delta)
        return await asyncio.to_thread(self._generate_sync, request, prompt, streamer)

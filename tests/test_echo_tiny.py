"""echo-tiny: a fixed audio-token budget per input, Auto-class loading, and the shared backend path."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_beeps
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError
from transformers import (
    AutoFeatureExtractor,
    AutoProcessor,
    FeatureExtractionMixin,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

import echo_agent.echo_tiny  # noqa: F401  (registers the Auto classes)
from echo_agent.agent import ECHO_TINY_DIR, EchoAgent
from echo_agent.backends.transformers import (
    PromptEncoder,
    TransformersBackend,
    encode_audio_placeholder,
    processor_family,
)
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.echo_tiny import (
    EchoTinyConfig,
    EchoTinyFeatureExtractor,
    EchoTinyForConditionalGeneration,
    EchoTinyProcessor,
    EchoTinySizes,
    new_echo_tiny,
    train_tokenizer,
)

CORPUS = ["<think>I listen to 1.0-2.0 s: <seg>1.0, 2.0</seg> there are 2 beeps.</think><answer>2</answer>"] * 20


def tiny(audio_tokens: int = 16, time_tokens: int = 0) -> tuple[EchoTinyForConditionalGeneration, EchoTinyProcessor]:
    tok = train_tokenizer([*CORPUS, "How many beeps are there between 1.0 and 2.0 seconds?"], 320)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_end|>")}
    cfg = EchoTinyConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True},
        audio_hidden_size=32, audio_layers=1, audio_heads=2, audio_tokens=audio_tokens,
        audio_time_tokens=time_tokens,
        audio_token_id=ids["<|AUDIO|>"], audio_bos_token_id=ids["<|audio_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EchoTinyForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, EchoTinyProcessor(EchoTinyFeatureExtractor(), tok, audio_tokens=audio_tokens)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 10.0, 60.0, 300.0])
def test_every_audio_input_costs_the_same_tokens(seconds: float) -> None:
    model, processor = tiny()
    wave = np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    enc = encode_audio_placeholder(processor, wave)
    assert enc.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")) == 16
    emb = model.audio_embeddings(enc.features.unsqueeze(0), enc.feature_mask.unsqueeze(0))
    assert emb.shape == (1, 16, model.config.text_config.hidden_size)


def test_fine_and_coarse_views_differ_and_padding_is_ignored() -> None:
    model, processor = tiny()
    rng = np.random.default_rng(1)
    short = rng.standard_normal(16000).astype(np.float32) * 0.1
    long = rng.standard_normal(16000 * 40).astype(np.float32) * 0.1
    both = processor.feature_extractor([short, long])
    alone = processor.feature_extractor([short])
    a = model.audio_embeddings(both["input_features"], both["attention_mask"])[0]
    b = model.audio_embeddings(alone["input_features"], alone["attention_mask"])[0]
    assert torch.allclose(a, b, atol=1e-5)  # batching with a longer clip changes nothing


def test_save_and_load_through_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, processor = tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    p2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(m2, EchoTinyForConditionalGeneration) and isinstance(p2, EchoTinyProcessor)
    wave = np.zeros(16000, dtype=np.float32)
    x1 = processor(text="hi <|audio_bos|><|AUDIO|><|audio_eos|>", audio=[wave])
    x2 = p2(text="hi <|audio_bos|><|AUDIO|><|audio_eos|>", audio=[wave])
    assert torch.equal(x1["input_ids"], x2["input_ids"])
    assert torch.allclose(model(**x1).logits, m2(**x2).logits, atol=1e-6)


async def test_runs_through_the_transformers_backend_and_graph(tmp_path: Path) -> None:
    model, processor = tiny()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    backend = TransformersBackend.from_pretrained(tmp_path / "m")
    assert backend.family == "echo_tiny"
    wav = write_beeps(tmp_path / "c.wav", 12.0, [(1.0, 0.2)])
    agent = EchoAgent(backend, config=AgentConfig(sampling=SamplingParams(max_new_tokens=6), max_retries=0))
    result = await agent.ask(wav, "How many beeps are there between 1.0 and 2.0 seconds?", ["1", "2"])
    assert result.status in ("answered", "no_answer")
    assert backend.last_prompt is not None and len(backend.last_prompt.audios) == 1


def test_placeholder_count_mismatch_is_an_error() -> None:
    _, processor = tiny()
    with pytest.raises(ValueError, match="placeholders"):
        processor(text="<|AUDIO|> <|AUDIO|>", audio=[np.zeros(1600, dtype=np.float32)])


def test_time_bin_tokens_fill_part_of_the_budget_and_survive_save_load(tmp_path: Path) -> None:
    """`audio_time_tokens` of the budget are time bins; the total per input stays `audio_tokens`, padding a
    row next to a longer one changes nothing, and the bins' parameters round-trip through save/load."""
    model, processor = tiny(audio_tokens=24, time_tokens=8)
    assert model.audio_encoder.queries.shape[0] == 16 and model.audio_encoder.bin_embed.shape[0] == 8
    rng = np.random.default_rng(3)
    short = rng.standard_normal(8000).astype(np.float32) * 0.1  # 0.5 s: 13 encoder frames over 8 bins
    tiny_clip = rng.standard_normal(800).astype(np.float32) * 0.1  # 50 ms: 2 encoder frames for 8 bins
    long = rng.standard_normal(16000 * 12).astype(np.float32) * 0.1
    both = processor.feature_extractor([short, tiny_clip, long])
    emb = model.audio_embeddings(both["input_features"], both["attention_mask"])
    assert emb.shape == (3, 24, model.config.text_config.hidden_size) and torch.isfinite(emb).all()
    for i, clip in enumerate((short, tiny_clip)):
        alone = processor.feature_extractor([clip])
        torch.testing.assert_close(emb[i], model.audio_embeddings(alone["input_features"], alone["attention_mask"])[0])
    # The bins are not copies of one another: a long clip's first and last bins hear different audio.
    assert not torch.allclose(emb[2, 16], emb[2, 23], atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = EchoTinyForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.audio_time_tokens == 8
    torch.testing.assert_close(reloaded.audio_embeddings(both["input_features"], both["attention_mask"]), emb)


def test_time_tokens_must_leave_room_for_queries() -> None:
    with pytest.raises(ValueError, match="audio_time_tokens"):
        EchoTinyConfig(audio_tokens=8, audio_time_tokens=8)


# ---- a transformers processor, loading what the earlier EchoTinyProcessor wrote ----------------------------

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_WAV = ROOT / "examples" / "puzzles" / "audio" / "synth-example-777-000000.wav"
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": [{"type": "text", "text": "You are echo. 1.0-2.5 s"}]},
    {"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text":
        "How many beeps are there between 2.5 and 9.0 seconds? <seg>1.0, 2.0</seg> \u00e9 \u6f22"}]},
    {"role": "assistant", "content": "<think>ok</think><answer>1</answer>"},
]  # fmt: skip
# Recorded with the pre-ProcessorMixin EchoTinyProcessor on the shipped files: CONVERSATION rendered with the
# generation prompt, then the processor's ids with EXAMPLE_WAV as the audio input.
OLD_RENDERED = (
    "<|im_start|>system\nYou are echo. 1.0-2.5 s<|im_end|>\n<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>"
    "How many beeps are there between 2.5 and 9.0 seconds? <seg>1.0, 2.0</seg> \u00e9 \u6f22<|im_end|>\n"
    "<|im_start|>assistant\n<think>ok</think><answer>1</answer><|im_end|>\n<|im_start|>assistant\n"
)
OLD_IDS = [int(i) for i in (
    "1 88 94 88 287 82 204 468 373 226 74 374 84 19 226 22 19 21 18 23 19 26 263 2 204 1 90 264 87 204 3 "
    + "4 " * 32 + "5 365 399 333 373 358 404 226 23 19 26 340 226 30 19 21 328 36 226 512 22 19 21 17 226 23 19 21 "
    "513 226 133 108 226 168 126 101 2 204 1 471 88 268 89 273 89 204 514 350 515 516 22 517 2 204 1 471 88 268 89 "
    "273 89 204"
).split()]  # fmt: skip
OLD_FEATURE_SUM = 67783.45882989191  # float64 sum of the (1, 64, 1461) input_features


def old_render(template: str, conversation: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The earlier EchoTinyProcessor.apply_chat_template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=False)
    return str(env.from_string(template).render(messages=conversation, add_generation_prompt=add_generation_prompt))


def old_call(model_dir: Path, texts: list[str], audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The earlier EchoTinyProcessor.__call__ (and its from_pretrained and feature extractor), inlined."""
    import torchaudio

    config = json.loads((model_dir / "processor_config.json").read_text())
    fe = config["feature_extractor"]
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    expanded = [t.replace("<|AUDIO|>", "<|AUDIO|>" * config["audio_tokens"]) for t in texts]
    enc = tok(expanded, add_special_tokens=False, padding=True, return_tensors="pt")
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=fe["sampling_rate"], n_fft=fe["n_fft"], hop_length=fe["hop_length"], n_mels=fe["n_mels"]
    )
    mean, std = -0.1, 0.75
    mels = [(torch.log10(mel(torch.from_numpy(np.array(a, dtype=np.float32))).clamp(min=1e-8)) - mean) / std
            for a in audios]  # fmt: skip
    width = max(m.shape[-1] for m in mels)
    feats = torch.zeros(len(mels), fe["n_mels"], width)
    mask = torch.zeros(len(mels), width, dtype=torch.long)
    for i, m in enumerate(mels):
        feats[i, :, : m.shape[-1]] = m
        mask[i, : m.shape[-1]] = 1
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "input_features": feats,
            "feature_attention_mask": mask}  # fmt: skip


def assert_same_outputs(new: Any, old: dict[str, torch.Tensor]) -> None:
    assert sorted(new.keys()) == sorted(old)
    for key, value in old.items():
        assert new[key].dtype == value.dtype and torch.equal(new[key], value), key


def write_legacy_dir(path: Path) -> Path:
    """A model directory as the earlier EchoTinyProcessor.save_pretrained wrote it (next to the model's config.json):
    the template under `template`, the feature extractor's four settings without `feature_extractor_type`."""
    path.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ECHO_TINY_DIR / name, path / name)
    shipped = json.loads((ECHO_TINY_DIR / "processor_config.json").read_text())
    legacy = {"processor_class": "EchoTinyProcessor", "audio_tokens": shipped["audio_tokens"],
              "feature_extractor": {k: shipped["feature_extractor"][k]
                                    for k in ("sampling_rate", "n_mels", "n_fft", "hop_length")},
              "template": shipped.get("template", shipped.get("chat_template"))}  # fmt: skip
    if legacy["template"] is None:
        legacy["template"] = (ECHO_TINY_DIR / "chat_template.jinja").read_text()
    (path / "processor_config.json").write_text(json.dumps(legacy, indent=2))
    return path


def test_shipped_processor_loads_with_the_same_ids_and_features_as_before() -> None:
    processor = AutoProcessor.from_pretrained(ECHO_TINY_DIR, local_files_only=True)
    assert isinstance(processor, EchoTinyProcessor) and isinstance(processor, ProcessorMixin)
    assert isinstance(processor.feature_extractor, EchoTinyFeatureExtractor)
    assert processor.audio_tokens == 32 and processor.feature_extractor.sampling_rate == 16000
    rendered = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == OLD_RENDERED
    wave, sr = sf.read(EXAMPLE_WAV, dtype="float32")
    out = processor(text=rendered, audio=[wave], sampling_rate=sr, return_tensors="pt")
    assert out["input_ids"][0].tolist() == OLD_IDS and out["attention_mask"].eq(1).all()
    assert out["input_features"].shape == (1, 64, 1461) and out["feature_attention_mask"].eq(1).all()
    # A tolerance for other FFT builds; the bit-for-bit check against the earlier code follows.
    assert float(out["input_features"].double().sum()) == pytest.approx(OLD_FEATURE_SUM, rel=1e-6)
    # Bit for bit what the earlier code computes, also for a padded batch of two texts and two clips.
    assert_same_outputs(out, old_call(ECHO_TINY_DIR, [rendered], [wave]))
    texts = ["hi <|audio_bos|><|AUDIO|><|audio_eos|>", "a longer text <|audio_bos|><|AUDIO|><|audio_eos|> and 12"]
    batch = processor(text=texts, audio=[wave[:8000], wave], sampling_rate=sr)
    assert_same_outputs(batch, old_call(ECHO_TINY_DIR, texts, [wave[:8000], wave]))


def test_a_legacy_processor_dir_loads_and_resaves_in_the_transformers_format(tmp_path: Path) -> None:
    legacy = write_legacy_dir(tmp_path / "legacy")
    processor = AutoProcessor.from_pretrained(legacy, local_files_only=True)
    assert isinstance(processor, EchoTinyProcessor)
    template = json.loads((legacy / "processor_config.json").read_text())["template"]
    assert processor.chat_template == template
    wave = sf.read(EXAMPLE_WAV, dtype="float32")[0][: 16000 * 3]
    rendered = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert_same_outputs(processor(text=rendered, audio=[wave]), old_call(legacy, [rendered], [wave]))

    # Saved again: transformers' own layout, which loads without a model config.json next to it.
    resaved = tmp_path / "resaved"
    processor.save_pretrained(resaved)
    saved = json.loads((resaved / "processor_config.json").read_text())
    assert saved["processor_class"] == "EchoTinyProcessor" and "template" not in saved
    assert saved["feature_extractor"]["feature_extractor_type"] == "EchoTinyFeatureExtractor"
    assert (resaved / "chat_template.jinja").read_text() == template
    assert not (resaved / "config.json").exists()
    again = AutoProcessor.from_pretrained(resaved, local_files_only=True)
    assert isinstance(again, EchoTinyProcessor) and again.audio_tokens == processor.audio_tokens
    assert again.chat_template == template
    assert isinstance(AutoFeatureExtractor.from_pretrained(resaved), EchoTinyFeatureExtractor)
    assert_same_outputs(again(text=rendered, audio=[wave]), old_call(legacy, [rendered], [wave]))


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_before(add_generation_prompt: bool) -> None:
    """transformers' apply_chat_template on the same template renders what the earlier jinja call rendered."""
    _, processor = tiny()
    conversations: list[list[dict[str, Any]]] = [
        CONVERSATION,
        [{"role": "user", "content": "plain text"}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}, {"type": "audio"},
                                      {"type": "text", "text": "b\n"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<think> </think>"}, {"type": "audio"}]},
         {"role": "tool", "content": [{"type": "text", "text": "{\"ok\": true}"}]}],
    ]  # fmt: skip
    for conv in conversations:
        rendered = processor.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert rendered == old_render(processor.chat_template, conv, add_generation_prompt)


def test_processor_is_generic_to_transformers_and_the_backend() -> None:
    _, processor = tiny()
    assert isinstance(processor, ProcessorMixin) and isinstance(processor.feature_extractor, FeatureExtractionMixin)
    assert processor_family(processor) == "echo_tiny" == EchoTinyProcessor.audio_family
    # The family comes from the class's declaration, not from an isinstance check on EchoTinyProcessor.
    assert "EchoTinyProcessor" not in inspect.getsource(processor_family)
    encoder = PromptEncoder(processor)
    assert encoder.family == "echo_tiny" and encoder.sample_rate == 16000
    with pytest.raises(TypeError, match="unsupported processor"):
        processor_family(object())
    # Sub-processors are checked like any transformers processor's.
    with pytest.raises(TypeError):
        EchoTinyProcessor(object(), processor.tokenizer)  # type: ignore[arg-type]
    assert processor.model_input_names == ["input_ids", "attention_mask", "input_features", "feature_attention_mask"]
    # transformers' apply_chat_template tokenizes through the processor's own call.
    wave = np.random.default_rng(5).standard_normal(16000).astype(np.float32) * 0.1
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "2 beeps?"}]}]
    out = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    rendered = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert_same_outputs(out, dict(processor(text=rendered, audio=[wave])))


def test_feature_extractor_round_trips_through_its_own_dict() -> None:
    fe = EchoTinyFeatureExtractor(n_mels=32, hop_length=320)
    wave = np.random.default_rng(4).standard_normal(16000).astype(np.float32) * 0.1
    fe([wave])  # builds the mel transform; nothing of it lands in the saved settings
    saved = fe.to_dict()
    json.dumps(saved)
    again = EchoTinyFeatureExtractor(**saved)
    assert again.to_dict() == saved and again.feature_size == 32 and again.frames(16000) == 51
    torch.testing.assert_close(again([wave])["input_features"], fe([wave])["input_features"], rtol=0, atol=0)


# ---- the factory -------------------------------------------------------------------------------------------

FACTORY_CORPUS = [
    "<think>I listen to 1.0-2.0 s: <seg>1.0, 2.0</seg> there are 2 beeps.</think><answer>2</answer>",
    "How many beeps are there between 2.5 and 9.0 seconds? 4 3 5 1",
    "Which sound is louder, the first or the second?",
] * 5
SMALL: dict[str, int] = {
    "vocab_size": 300, "hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 96,
    "audio_hidden_size": 32, "audio_layers": 1, "audio_tokens": 12, "audio_time_tokens": 4,
}  # fmt: skip


# Fingerprints of the old training/sft.py new_echo_tiny(SFTConfig(seed=seed, **sizes), FACTORY_CORPUS), recorded
# before it moved here (and checked tensor for tensor against it then): vocabulary sha256, tokenizer length,
# state-dict tensors and elements, and float64 sums of |w| and w over the state dict.
OLD_FACTORY = [
    (SMALL, 7, "d517fe8f53014eb396d601ef3fc34e724efb8282d5ddc34b7f9ddd3b4b709111", 306, 54, 129953,
     3033.4173501936825, 418.0920231529334),
    ({}, 0, "4e3cde2cfaa30539605dd24795e496a064f6acb2b809bb6959fd6674dd63aad3", 339, 89, 2319105,
     44857.38283819208, 2395.0556097395256),
]  # fmt: skip


@pytest.mark.parametrize(("sizes", "seed", "vocab_sha", "n_tokens", "n_tensors", "n_values", "abs_sum", "total"),
                         OLD_FACTORY, ids=["small", "default"])  # fmt: skip
def test_new_echo_tiny_builds_what_the_old_sft_factory_built(
    sizes: dict[str, int], seed: int, vocab_sha: str, n_tokens: int, n_tensors: int, n_values: int,
    abs_sum: float, total: float,
) -> None:  # fmt: skip
    import hashlib

    model, processor = new_echo_tiny(EchoTinySizes(**sizes), FACTORY_CORPUS, seed=seed)
    vocab = json.dumps(sorted(processor.tokenizer.get_vocab().items()))
    assert hashlib.sha256(vocab.encode()).hexdigest() == vocab_sha and len(processor.tokenizer) == n_tokens
    state = model.state_dict()
    assert len(state) == n_tensors and sum(v.numel() for v in state.values()) == n_values
    assert sum(float(v.double().abs().sum()) for v in state.values()) == pytest.approx(abs_sum, rel=1e-9)
    assert sum(float(v.double().sum()) for v in state.values()) == pytest.approx(total, rel=1e-9)
    sized = EchoTinySizes(**sizes)
    assert processor.audio_tokens == sized.audio_tokens == model.config.audio_tokens
    assert model.config.audio_time_tokens == sized.audio_time_tokens
    assert model.generation_config.eos_token_id == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert processor_family(processor) == "echo_tiny"


def test_new_echo_tiny_is_a_function_of_sizes_corpus_and_seed() -> None:
    model, _ = new_echo_tiny(EchoTinySizes(**SMALL), FACTORY_CORPUS, seed=7)
    again, _ = new_echo_tiny(EchoTinySizes(**SMALL), FACTORY_CORPUS, seed=7)
    other, _ = new_echo_tiny(EchoTinySizes(**SMALL), FACTORY_CORPUS, seed=8)
    state = model.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    assert not torch.equal(state["audio_encoder.queries"], other.state_dict()["audio_encoder.queries"])


def test_sizes_defaults_and_bounds() -> None:
    assert EchoTinySizes().model_dump() == {
        "vocab_size": 512, "hidden_size": 192, "layers": 4, "heads": 4, "intermediate_size": 512,
        "audio_hidden_size": 128, "audio_layers": 2, "audio_tokens": 16, "audio_time_tokens": 0,
    }  # fmt: skip
    assert EchoTinySizes.model_fields["audio_time_tokens"].description == (
        "how many of audio_tokens are time bins (see EchoTinyConfig)"
    )
    good: list[dict[str, int]] = [
        {"heads": 1, "hidden_size": 64}, {"heads": 3, "hidden_size": 96}, {"heads": 6, "hidden_size": 96},
        {"audio_tokens": 1}, {"audio_tokens": 9, "audio_time_tokens": 8}, {"vocab_size": 300},
    ]  # fmt: skip
    for kwargs in good:
        EchoTinySizes(**kwargs)
    bad: list[dict[str, int]] = [
        {"layers": 0}, {"heads": 0}, {"audio_tokens": 0}, {"audio_time_tokens": -1}, {"vocab_size": 100},
        {"audio_tokens": 8, "audio_time_tokens": 8},  # no room left for the learned queries
        {"hidden_size": 190},  # not divisible by 4 heads
        {"hidden_size": 60},  # head size 15: rotary embeddings need an even one
        {"hidden_size": 100, "heads": 5},  # 5 heads cannot share 2 key/value heads evenly
        {"audio_hidden_size": 30},  # not divisible by the encoder's 4 heads
    ]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ValidationError):
            EchoTinySizes(**kwargs)

    class Run(EchoTinySizes):  # trainer configs subclass it and add their own fields
        steps: int = 3

    assert Run(steps=5, layers=2).model_dump()["layers"] == 2
    with pytest.raises(ValidationError):
        Run(heads=5, hidden_size=100)


def test_inference_caches_audio_encodings_and_a_weight_update_invalidates_them() -> None:
    """At inference each input is encoded once (the encoder dominated batched decoding); the cache never serves a
    stale encoding after the encoder's weights change, and training never uses it."""
    model, _ = new_echo_tiny(EchoTinySizes(**SMALL), FACTORY_CORPUS, seed=7)
    model.eval()
    torch.manual_seed(0)
    feats = torch.randn(3, model.config.n_mels, 420)
    mask = torch.ones(3, 420, dtype=torch.long)
    mask[1, 300:] = 0  # a shorter row, padded
    calls: list[int] = []
    encode = model.audio_embeddings

    def counting(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        calls.append(int(f.shape[0]))
        return encode(f, m)

    model.audio_embeddings = counting  # type: ignore[method-assign]
    with torch.no_grad():
        first = model._inference_audio(feats, mask)
        again = model._inference_audio(feats[[2, 0]], mask[[2, 0]])  # same inputs, another batch
    assert calls == [3], "the second call is served from the cache"
    torch.testing.assert_close(again, first[[2, 0]])
    torch.testing.assert_close(first, encode(feats, mask), atol=1e-5, rtol=0)  # what the encoder gives
    with torch.no_grad():
        model.audio_encoder.proj.bias.add_(1.0)  # an in-place update, as an optimizer step makes
        after = model._inference_audio(feats, mask)
    assert calls == [3, 3] and not torch.allclose(after, first)
    torch.testing.assert_close(after, encode(feats, mask), atol=1e-5, rtol=0)

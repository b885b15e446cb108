"""The token-server path and the verl agent loop (issue 17, items 3 and 4). CPU only, and labelled as such:

- **Runs in the main suite (no verl needed):** rollouts through `TokenServerBackend` over `LocalTokenServer` equal
  the `TransformersBackend` rollouts token for token, greedy and seeded, on a real tiny Qwen2-Audio and a real tiny
  Qwen2.5-Omni thinker that memorised one Echo trace (tests/memorize.py), so the graph really re-listens; the
  append-only and compact<->expanded invariants; the response budget; the parquet exporter; the loop's YAML.
- **Runs when verl is installed (`.ci/verl`; skipped otherwise):** the worker patches on verl's own loaders; the
  agent loop instantiated from the YAML as verl's worker does and run directly on rows read by verl's own
  `RLHFDataset` (as verl's `*_on_cpu` tests run loops, with a real tiny model behind `LocalTokenServer` in place of
  a vLLM replica); its output post-processed by verl's own `AgentLoopWorker` code into training inputs, whose
  forward pass (the padded batch of verl's `use_remove_padding=False` path) matches our recomputed log-probs.
- **Not run anywhere here (needs GPUs):** vLLM rollout replicas, weight sync between the FSDP actor and vLLM, a
  full PPO step. docs/verl.md lists them as untested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ECHO_CHOICES, ECHO_QUESTION, write_beeps
from hypothesis import given
from hypothesis import strategies as st
from memorize import Trace, teach

from echo_agent.audio import AudioRef, AudioStore
from echo_agent.backends.base import AudioResolver, Generation, GenerationRequest
from echo_agent.backends.token_server import (
    NEVER_SAMPLED,
    AudioTokens,
    LocalTokenServer,
    TokenServerBackend,
    compact_ids,
    expand_ids,
    finish_of,
    server_sampling_params,
)
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import BackendError, DataError
from echo_agent.graphs.echo import build_echo_graph
from echo_agent.graphs.runner import STATE_KEYS
from echo_agent.graphs.state import EchoContext, new_question
from echo_agent.messages import audio_part
from echo_agent.prompts import RETRY_NUDGE, format_question
from echo_agent.tiny_models import build_tiny_qwen2_5_omni_thinker, build_tiny_qwen2_audio
from echo_agent.training.trajectory import Trajectory, model_inputs, sequence_logprobs, token_data
from echo_agent.training.verl_agent_loop import EchoRollout, LoopSettings, eos_token_ids, feature_kwargs
from echo_agent.training.verl_data import export_verl_parquet, read_verl_parquet

ROOT = Path(__file__).resolve().parents[1]
LOOP_YAML = ROOT / "configs" / "verl" / "echo_agent_loop.yaml"
TRACE = Trace(
    before="<think>Two beeps sit close together near <seg>2.0, 3.0</seg>",
    span=(2.0, 3.0),
    after=" yes, two there, one at 1 s and one at 4.5 s.</think><answer>4</answer>",
)
GREEDY = SamplingParams(max_new_tokens=120)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def listeners(echo_model: tuple[Path, Path]) -> dict[str, tuple[TransformersBackend, Path]]:
    """Per family, a real tiny model that answers the beeps question by re-listening to 2.0-3.0 s, and its clip.
    Qwen2-Audio is conftest's `echo_model`; the Qwen2.5-Omni thinker memorises the same trace here."""
    model_dir, wav = echo_model
    qwen2 = TransformersBackend.from_pretrained(model_dir)
    omni = TransformersBackend(*build_tiny_qwen2_5_omni_thinker(seed=0))
    teach(omni, wav, ECHO_QUESTION, ECHO_CHOICES, TRACE)
    return {"qwen2_audio": (qwen2, wav), "qwen2_5_omni": (omni, wav)}


class Recording:
    """A `ModelBackend` that delegates to a `TransformersBackend` and keeps each call's exact prompt ids."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.prompts: list[list[int]] = []
        self.name, self.sample_rate = backend.name, backend.sample_rate

    async def generate(self, request: GenerationRequest, audio: AudioResolver, on_delta: Any = None) -> Generation:
        gen = await self.backend.generate(request, audio, on_delta)
        assert self.backend.last_prompt is not None
        self.prompts.append(list(self.backend.last_prompt.input_ids))
        return gen


def _token_backend(backend: TransformersBackend, **kw: Any) -> tuple[TokenServerBackend, LocalTokenServer]:
    server = LocalTokenServer(backend)
    tsb = TokenServerBackend(server, backend.encoder, eos_token_ids=server.eos_token_ids, check_reencode=True, **kw)
    return tsb, server


async def _run(backend: Any, store: AudioStore, ref: AudioRef, config: AgentConfig, sampling: SamplingParams) -> Any:
    graph = build_echo_graph(backend, store, config)
    inputs = new_question(ECHO_QUESTION, {"main": ref.model_dump()}, ECHO_CHOICES, "4")
    return await graph.ainvoke(inputs, context=EchoContext(sampling=sampling), output_keys=STATE_KEYS)


async def _both(
    backend: TransformersBackend, wav: Path, config: AgentConfig, sampling: SamplingParams
) -> tuple[Any, Any, Recording, TokenServerBackend, LocalTokenServer]:
    store = AudioStore()
    ref = store.load(wav)
    rec = Recording(backend)
    direct = await _run(rec, store, ref, config, sampling)
    tsb, server = _token_backend(backend)
    served = await _run(tsb, store, ref, config, sampling)
    return direct, served, rec, tsb, server


# ------------------------------------------------------------------------- token for token, greedy and seeded


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
async def test_greedy_rollout_through_the_token_server_equals_the_transformers_backend(
    listeners: dict[str, tuple[TransformersBackend, Path]], family: str
) -> None:
    backend, wav = listeners[family]
    direct, served, rec, tsb, server = await _both(backend, wav, AgentConfig(), GREEDY)
    # The graph really re-listened: one valid listen to 2.0-3.0 s, answered 4 (reward 1.5).
    assert [(c["start"], c["end"], c["valid"]) for c in direct["listens"]] == [(2.0, 3.0, True)]
    assert direct["verdict"]["reward"] == 1.5
    # Token for token: the same conversation (text, sampled ids, log-probs) and the same verdict.
    assert served["conversation"] == direct["conversation"]
    assert served["verdict"] == direct["verdict"]
    # Each call ran on exactly the ids the transformers backend built, sent compact (one <|AUDIO|> per clip).
    audio_id = AudioTokens.of(backend.tokenizer).audio
    assert [r["ids"] for r in server.requests] == rec.prompts
    assert [r["compact_ids"].count(audio_id) for r in server.requests] == [1, 2]
    assert all(len(r["compact_ids"]) < len(r["ids"]) for r in server.requests)
    # The append-only trajectory is the Trajectory record's token data (the trainer's path).
    traj = tsb.trajectory
    assert traj is not None and traj.calls == 2 and not traj.truncated
    store = AudioStore()
    ref = store.load(wav)
    record = token_data(
        backend.encoder, direct["conversation"], direct["question_start"], AudioResolver(store, {"main": ref})
    )
    assert traj.prompt_ids == record["prompt_ids"]
    assert traj.response_ids == record["response_ids"]
    assert traj.response_mask == record["response_mask"]
    assert traj.response_logprobs == record["response_logprobs"]
    assert traj.audio == [audio_part("main"), audio_part("main", 2.0, 3.0)]


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
async def test_seeded_sampling_through_the_token_server_equals_the_transformers_backend(
    listeners: dict[str, tuple[TransformersBackend, Path]], family: str
) -> None:
    backend, wav = listeners[family]
    # No verifier retry: across a retry the two backends condition differently by design (see the module doc of
    # token_server.py); test_a_retry_keeps_the_first_attempt_as_sampled covers that path.
    config = AgentConfig(max_retries=0)
    listened = 0
    for seed in range(4):
        sampling = SamplingParams(temperature=1.0, max_new_tokens=80, seed=seed)
        direct, served, rec, _, server = await _both(backend, wav, config, sampling)
        assert served["conversation"] == direct["conversation"], f"seed {seed}"
        assert [r["ids"] for r in server.requests] == rec.prompts
        listened += any(c["valid"] for c in direct["listens"])
        assert [r["sampling_params"]["seed"] for r in server.requests] == [seed + i for i in range(len(rec.prompts))]
    assert listened >= 1, "no seeded run re-listened: the comparison never crossed an inserted slice"


async def test_a_retry_keeps_the_first_attempt_as_sampled_and_the_trajectory_append_only(tmp_path: Path) -> None:
    """A random tiny model never answers, so the verifier nudges once: the trajectory keeps attempt 1's sampled ids
    (mask 1), then exactly the chat template's text between the turns (mask 0), then attempt 2."""
    wav = write_beeps(tmp_path / "b.wav", 3.0, [(1.0, 0.3)])
    store = AudioStore()
    ref = store.load(wav)
    backend = TransformersBackend(*build_tiny_qwen2_audio(seed=0))
    tsb, server = _token_backend(backend)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    state = await _run(tsb, store, ref, AgentConfig(max_retries=1), sampling)
    assert state["retries"] == 1
    assert [m["role"] for m in state["conversation"]] == ["user", "assistant", "user", "assistant"]
    gens = [p for m in state["conversation"] if m["role"] == "assistant" for p in m["content"]]
    assert all(p["type"] == "text" and p["origin"] == "model" for p in gens)
    first, second = gens[0]["token_ids"], gens[1]["token_ids"]  # type: ignore[typeddict-item]
    tok, enc = backend.tokenizer, backend.encoder
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    close = [] if first[-1:] == [im_end] else [im_end]
    between = enc.encode_text(f"\n<|im_start|>user\n{RETRY_NUDGE['no_answer']}<|im_end|>\n<|im_start|>assistant\n")
    traj = tsb.trajectory
    assert traj is not None
    assert traj.ids == traj.prompt_ids + first + close + between + second
    assert traj.response_mask == [1] * len(first) + [0] * (len(close) + len(between)) + [1] * len(second)
    logprobs = gens[0]["logprobs"] + gens[1]["logprobs"]  # type: ignore[typeddict-item]
    assert [lp for lp, m in zip(traj.response_logprobs, traj.response_mask, strict=True) if m] == logprobs
    # Append-only: the second call's ids extend the first call's prompt and output, compact and expanded alike.
    r1, r2 = server.requests
    assert r2["ids"][: len(r1["ids"]) + len(first)] == r1["ids"] + first
    assert r2["compact_ids"][: len(r1["compact_ids"]) + len(first)] == r1["compact_ids"] + first


async def test_the_response_budget_never_cuts_an_audio_block(listeners: dict[str, Any]) -> None:
    backend, wav = listeners["qwen2_audio"]
    store = AudioStore()
    ref = store.load(wav)
    probe, _ = _token_backend(backend)
    await _run(probe, store, ref, AgentConfig(), GREEDY)
    full = probe.trajectory
    assert full is not None
    first_call = full.response_mask.index(0)  # the sampled ids up to </seg>, then the inserted slice (mask 0)
    # Room for the first call and a little more, not for the 1 s slice (27 ids): the slice is not appended.
    tsb, server = _token_backend(backend, max_response_tokens=first_call + 10)
    state = await _run(tsb, store, ref, AgentConfig(), GREEDY)
    traj = tsb.trajectory
    assert traj is not None and traj.truncated
    assert traj.response_ids == full.response_ids[:first_call] and sum(traj.response_mask) == first_call
    assert compact_ids(traj.ids, tsb.tokens)[1] == traj.audio_tokens == full.audio_tokens[:1]
    assert len(server.requests) == 1 and state["verdict"] is not None  # the graph still judged what it had


async def test_one_backend_serves_one_run(listeners: dict[str, Any]) -> None:
    backend, wav = listeners["qwen2_5_omni"]
    store = AudioStore()
    ref = store.load(wav)
    tsb, _ = _token_backend(backend)
    await _run(tsb, store, ref, AgentConfig(), GREEDY)
    with pytest.raises(BackendError, match="one TokenServerBackend per graph run"):
        await _run(tsb, store, ref, AgentConfig(), GREEDY)
    tsb.reset()
    again = await _run(tsb, store, ref, AgentConfig(), GREEDY)
    assert again["verdict"]["reward"] == 1.5


# ------------------------------------------------------------------------------------ compact <-> expanded

TOKENS = AudioTokens(audio=7, bos=8, eos=9)


def test_compact_and_expanded_audio_ids_map_both_ways() -> None:
    expanded = [1, 2, 8, 7, 7, 7, 9, 3, 8, 7, 9, 8, 7, 7, 9]
    compact, counts = compact_ids(expanded, TOKENS)
    assert compact == [1, 2, 8, 7, 9, 3, 8, 7, 9, 8, 7, 9] and counts == [3, 1, 2]
    assert expand_ids(compact, counts, TOKENS) == expanded
    for bad in ([1, 7, 2], [8, 9], [8, 7, 7], [8, 7, 3, 9], [9]):
        with pytest.raises(ValueError):
            compact_ids(bad, TOKENS)
    with pytest.raises(ValueError, match="counts"):
        expand_ids(compact, [3, 1], TOKENS)
    with pytest.raises(ValueError, match="not a compact"):
        expand_ids([1, 7, 9], [1], TOKENS)


@given(st.lists(st.one_of(st.integers(0, 6), st.integers(1, 40).map(lambda n: -n)), max_size=30))
def test_compact_expand_round_trip(layout: list[int]) -> None:
    """Any text ids with audio blocks of any lengths (a negative entry -n is a block of n <|AUDIO|>)."""
    expanded = [t for x in layout for t in ([x] if x >= 0 else [8, *[7] * -x, 9])]
    compact, counts = compact_ids(expanded, TOKENS)
    assert counts == [-x for x in layout if x < 0]
    assert compact.count(7) == len(counts) and expand_ids(compact, counts, TOKENS) == expanded


async def test_the_local_server_expands_compact_ids_with_the_real_processor(tmp_path: Path) -> None:
    backend = TransformersBackend(*build_tiny_qwen2_5_omni_thinker(seed=0))
    server = LocalTokenServer(backend)
    wave = np.random.default_rng(0).standard_normal(16000 + 37).astype(np.float32) * 0.1
    t = server.tokens
    prompt = server.expand([1, t.bos, t.audio, t.eos, 2], [(wave, 16000)])
    n = prompt.audios[0].num_audio_tokens
    assert (
        n == 25 and prompt.input_ids
    )  # 101 mel frames -> ((101 - 1) // 2 + 1 - 2) // 2 + 1 = 25 == [1, t.bos, *[t.audio] * n, t.eos, 2]
    with pytest.raises(BackendError, match=r"1 <\|AUDIO\|> placeholders but 2"):
        server.expand([t.bos, t.audio, t.eos], [wave, wave])
    with pytest.raises(BackendError, match="Hz"):
        server.expand([t.bos, t.audio, t.eos], [(wave, 8000)])


# ---------------------------------------------------------------------------------- the call's parameters


def test_sampling_params_take_vllm_names_and_ban_audio_tokens() -> None:
    greedy = server_sampling_params(SamplingParams(), max_tokens=9, stop=["</seg>"], bad_words=list(NEVER_SAMPLED))
    assert greedy == {
        "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 9, "logprobs": True, "stop": ["</seg>"],
        "include_stop_str_in_output": True, "bad_words": list(NEVER_SAMPLED),
    }  # fmt: skip
    seeded = server_sampling_params(
        SamplingParams(temperature=0.7, top_k=5, seed=3), max_tokens=4, stop=[], bad_words=[]
    )
    assert (seeded["top_k"], seeded["seed"], "stop" in seeded) == (5, 3, False)


def test_finish_reasons_are_read_from_the_ids_and_text() -> None:
    eos = [5]
    assert finish_of("a</seg>", [1, 2], ["</seg>"], eos) == ("stop", "</seg>")
    assert finish_of("a</seg> and more text after it", [1, 2], ["</seg>"], eos) == ("length", None)
    assert finish_of("a</seg>", [1, 5], ["</seg>"], eos) == ("eos", None)
    assert finish_of("abc", [1], ["</seg>"], eos) == ("length", None)


async def test_the_local_server_refuses_what_it_cannot_honour() -> None:
    server = LocalTokenServer(TransformersBackend(*build_tiny_qwen2_audio(seed=0)))
    with pytest.raises(BackendError, match="repetition_penalty"):
        await server.generate("r", prompt_ids=[1, 2], sampling_params={"repetition_penalty": 1.1, "max_tokens": 2})


# ------------------------------------------------------------------------------------ data and settings


def _items(folder: Path, wav: Path) -> list[BenchItem]:
    """A two-item MMAU-format data file about `wav` (copied into `folder`)."""
    if wav.parent != folder:
        (folder / wav.name).write_bytes(wav.read_bytes())
    record = {"id": "q1", "audio_id": wav.name, "question": ECHO_QUESTION, "choices": ECHO_CHOICES, "answer": "4",
              "task": "sound", "category": "count"}  # fmt: skip
    data = folder / "data.json"
    data.write_text(json.dumps([record, {**record, "id": "q2"}]))
    return load_benchmark(data)


def test_the_exporter_writes_verl_rows(tmp_path: Path) -> None:
    wav = write_beeps(tmp_path / "beeps.wav", 6.0, [(1.0, 0.2)])
    items = _items(tmp_path, wav)
    out = tmp_path / "train.parquet"
    assert export_verl_parquet(items, out) == 2
    rows = read_verl_parquet(out)
    ref = AudioStore().load(wav)
    assert [r["extra_info"]["index"] for r in rows] == [0, 1]
    row = rows[0]
    assert (row["agent_name"], row["data_source"]) == ("echo_agent", "echo_agent")
    assert row["prompt"] == [
        {"role": "user", "content": format_question(ECHO_QUESTION, ECHO_CHOICES, {"main": 6.0}, "main")}
    ]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "4"}
    assert row["extra_info"] == {
        "index": 0, "id": "q1", "clip": ref.path, "sha256": ref.sha256, "duration": 6.0,
        "question": ECHO_QUESTION, "choices": ECHO_CHOICES, "answer": "4",
    }  # fmt: skip
    assert "<audio>" not in row["prompt"][0]["content"]


def test_the_loop_yaml_holds_valid_settings() -> None:
    yaml = pytest.importorskip("yaml")
    entries = yaml.safe_load(LOOP_YAML.read_text())
    assert [e["name"] for e in entries] == ["echo_agent"]
    entry = dict(entries[0])
    assert entry.pop("name") == "echo_agent"
    assert entry.pop("_target_") == "echo_agent.training.verl_agent_loop.EchoAgentLoop"
    settings = LoopSettings.model_validate(entry)
    assert settings == LoopSettings()  # the file states the defaults (the paper's) explicitly
    config = settings.agent_config()
    assert (config.max_model_calls, config.listen.max_audios, config.mode) == (8, 8, "interleaved")


def test_feature_bound_reproduces_the_rollout_features() -> None:
    """Qwen2.5-Omni: verl re-extracts the features with our bound and gets exactly what the rollout encoded."""
    from echo_agent.backends.transformers import encode_audio_placeholder
    from echo_agent.tiny_models import build_qwen2_5_omni_processor

    processor = build_qwen2_5_omni_processor()
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (96000, 16037, 3211)]
    kwargs = feature_kwargs("qwen2_5_omni", 16000, [len(c) for c in clips], processor.feature_extractor)
    assert kwargs == {"sampling_rate": 16000, "audio_kwargs": {"max_length": 96480}}
    text = "<|audio_bos|><|AUDIO|><|audio_eos|>" * len(clips)
    batch = processor(text=text, audio=clips, return_tensors="pt", **kwargs)
    assert batch["input_features"].shape == (3, 128, 603)  # not 30000 frames (300 s) a clip
    for i, clip in enumerate(clips):
        ours = encode_audio_placeholder(processor, clip)
        valid = int(batch["feature_attention_mask"][i].sum())
        assert valid == ours.features.shape[-1]
        assert torch.equal(batch["input_features"][i, :, :valid], ours.features)
    assert feature_kwargs("qwen2_audio", 16000, [96000], processor.feature_extractor) == {"sampling_rate": 16000}


async def test_the_rollout_core_runs_without_verl(listeners: dict[str, Any], tmp_path: Path) -> None:
    backend, wav = listeners["qwen2_5_omni"]
    row = _first_row(tmp_path, wav)
    server = LocalTokenServer(backend)
    rollout = EchoRollout(server, backend.processor, prompt_length=512, response_length=256, check_reencode=True)
    result = await rollout.run(row, {"temperature": 0, "top_p": 1.0, "top_k": -1})
    assert result.reward_score == 1.5 and result.num_turns == 1 + 2 + 1  # question, 2 calls, 1 slice
    assert result.reward_extra_info["acc"] == 1.0 and result.reward_extra_info["listens"] == 1.0
    assert [len(a) for a in result.audios] == [96000, 16000]
    assert result.mm_processor_kwargs["audio_kwargs"] == {"max_length": 96480}
    assert eos_token_ids(backend.tokenizer) == server.eos_token_ids
    with pytest.raises(DataError, match="prompt_length"):
        await EchoRollout(server, backend.processor, prompt_length=16, response_length=256).run(row, {"temperature": 0})
    with pytest.raises(DataError, match="changed"):
        await rollout.run({**row, "sha256": "0" * 64}, {"temperature": 0})


def _first_row(tmp_path: Path, wav: Path) -> dict[str, Any]:
    out = tmp_path / "rows.parquet"
    export_verl_parquet(_items(tmp_path, wav)[:1], out)
    extra: dict[str, Any] = read_verl_parquet(out)[0]["extra_info"]
    return extra


def test_the_loop_module_imports_without_verl() -> None:
    import echo_agent.training.verl_agent_loop as loop_module

    assert hasattr(loop_module, "EchoRollout")
    try:
        import verl  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="verl"):
            _ = loop_module.EchoAgentLoop
    else:
        assert loop_module.EchoAgentLoop.__name__ == "EchoAgentLoop"


# ============================================================================ with verl installed (.ci/verl)


@pytest.fixture(scope="module")
def verl_installed() -> Any:
    if os.environ.get("ECHO_REQUIRE_VERL"):  # .ci/verl: a missing verl is a failure, not a skip
        import verl
    else:
        verl = pytest.importorskip("verl", reason="verl is not installed (.ci/verl installs it)")
    from echo_agent.training import verl_patches

    verl_patches.install()
    return verl


@pytest.fixture(scope="module")
def saved(
    listeners: dict[str, tuple[TransformersBackend, Path]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each family's model saved as a model directory, as verl loads models."""
    out: dict[str, Path] = {}
    for family, (backend, _) in listeners.items():
        folder = tmp_path_factory.mktemp(family)
        backend.model.save_pretrained(folder)
        backend.processor.save_pretrained(folder)
        out[family] = folder
    return out


def test_the_patches_make_verl_load_the_audio_processors_and_models(
    verl_installed: Any, saved: dict[str, Path], tmp_path: Path
) -> None:
    import transformers
    from verl.utils import hf_processor
    from verl.utils.model import get_hf_auto_model_class
    from verl.workers.config.model import HFModelConfig

    from echo_agent.training import verl_patches

    original_processor = verl_patches._state["hf_processor"][0]
    original_class = verl_patches._state["get_hf_auto_model_class"][0]
    for family, cls in (("qwen2_audio", "Qwen2AudioProcessor"), ("qwen2_5_omni", "Qwen2_5OmniProcessor")):
        with pytest.warns(UserWarning, match="Failed to create processor"):
            assert original_processor(str(saved[family])) is None  # verl 0.9.1 as shipped: no processor at all
        processor = hf_processor(str(saved[family]))
        assert type(processor).__name__ == cls
        assert processor.validate_inputs(text=["no audio tokens"], audio=[np.zeros(16000)]) is None
        # verl's own model config (what its workers build) now carries the processor.
        config = HFModelConfig(path=str(saved[family]))
        assert type(config.processor).__name__ == cls
    qwen2_config = transformers.AutoConfig.from_pretrained(saved["qwen2_audio"])
    assert original_class(qwen2_config) is transformers.AutoModel  # head-less Qwen2AudioModel: nothing to train
    assert get_hf_auto_model_class(qwen2_config) is transformers.Qwen2AudioForConditionalGeneration
    omni_config = transformers.AutoConfig.from_pretrained(saved["qwen2_5_omni"])
    assert get_hf_auto_model_class(omni_config) is transformers.Qwen2_5OmniThinkerForConditionalGeneration
    full_config = transformers.Qwen2_5OmniConfig(thinker_config=omni_config.to_dict())
    assert get_hf_auto_model_class(full_config) is verl_patches.OmniThinkerActor


def test_the_omni_loader_builds_the_thinker_only_and_forwards_through_it(
    verl_installed: Any, listeners: dict[str, Any], tmp_path: Path
) -> None:
    import transformers

    from echo_agent.training.verl_patches import OmniThinkerActor

    thinker = listeners["qwen2_5_omni"][0].model
    full_config = transformers.Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    full = transformers.Qwen2_5OmniForConditionalGeneration(full_config)
    full.thinker.load_state_dict(thinker.state_dict())
    full.config.enable_audio_output = True  # as the hub's Qwen2.5-Omni-7B config says: the loader turns it off
    full.save_pretrained(tmp_path / "omni")
    actor = OmniThinkerActor.from_pretrained(tmp_path / "omni")
    assert not hasattr(actor, "talker") and not hasattr(actor, "token2wav")
    names = [n for n, _ in actor.named_parameters()]
    assert names and all(n.startswith("thinker.") for n in names)  # checkpoint names, as vLLM's loader maps them
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(actor(input_ids=ids).logits, thinker(input_ids=ids).logits, atol=1e-6)


def _verl_config(model_dir: Path, prompt_length: int, response_length: int) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {
                    "prompt_length": prompt_length,
                    "response_length": response_length,
                    "agent": {"agent_loop_config_path": str(LOOP_YAML)},
                },
                "model": {"path": str(model_dir)},
            },
            "data": {
                "prompt_key": "prompt",
                "max_prompt_length": prompt_length,
                "filter_overlong_prompts": True,
                "filter_overlong_prompts_workers": 1,
            },
        }
    )


def _as_trajectory(out: Any, ref: AudioRef, data: str) -> Trajectory:
    """Our training record of an `AgentLoopOutput`, so our own `model_inputs` / `sequence_logprobs` can recompute it."""
    from echo_agent.training.trajectory import AudioSpan

    spans = [(None, None), (2.0, 3.0)]
    return Trajectory(
        id="q1#0", item_id="q1", sample=0, seed=0, model="tiny", backend="verl", mode="interleaved", temperature=0.0,
        config_hash="-", data=data, question=ECHO_QUESTION, choices=ECHO_CHOICES, gold="4", status="answered",
        clips={"main": ref}, prompt_ids=out.prompt_ids, response_ids=out.response_ids, response_mask=out.response_mask,
        response_logprobs=out.response_logprobs,
        audio_spans=[AudioSpan(clip="main", sha256=ref.sha256, path=ref.path, start=s, end=e) for s, e in spans],
    )  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
async def test_the_agent_loop_output_becomes_verl_training_inputs_that_match_our_logprobs(
    verl_installed: Any, listeners: dict[str, Any], saved: dict[str, Path], tmp_path: Path, family: str
) -> None:
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, DictConfigWrap
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.utils.model import extract_multi_modal_inputs

    backend, wav = listeners[family]
    items = _items(tmp_path, wav)
    export_verl_parquet(items, tmp_path / "train.parquet")
    processor, tokenizer = hf_processor(str(saved[family])), hf_tokenizer(str(saved[family]))
    config = _verl_config(saved[family], prompt_length=512, response_length=256)
    # verl's dataset reads our rows (length filter included) and collates them as its trainer does.
    dataset = RLHFDataset(data_files=[str(tmp_path / "train.parquet")], tokenizer=tokenizer, processor=processor,
                          config=config.data)  # fmt: skip
    assert len(dataset) == 2
    batch = collate_fn([dataset[0]])
    row = {k: v[0] for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    assert row.pop("agent_name") == "echo_agent"
    # The loop, instantiated from the YAML entry as verl's AgentLoopWorker does, over the local token server.
    entry = OmegaConf.load(LOOP_YAML)[0]
    loop = hydra.utils.instantiate(
        config=entry, trainer_config=DictConfigWrap(config), server_manager=LocalTokenServer(backend),
        tokenizer=tokenizer, processor=processor, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
        hf_model_type=family,
    )  # fmt: skip
    assert type(loop).__name__ == "EchoAgentLoop"
    greedy = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}
    out = await loop.run(greedy, **row)
    assert out.reward_score == 1.5 and out.num_turns == 4
    audios = out.multi_modal_data["audios"]
    assert [len(a) for a in audios] == [96000, 16000]
    # verl's own post-processing: padding, masks, positions, and the audio features re-extracted for training.
    worker = AgentLoopWorker.__new__(AgentLoopWorker)
    worker.config, worker.rollout_config = config, config.actor_rollout_ref.rollout
    worker.tokenizer, worker.processor = tokenizer, processor
    worker.mm_processor_kwargs, worker.reward_loop_worker_handles, worker.distillation_enabled = {}, None, False
    internal = await worker._agent_loop_postprocess(out, False, **row)
    proto = worker._postprocess([internal])
    data = proto.batch
    prompt_width = data["prompts"].shape[1]
    mask = data["response_mask"][0]
    assert mask.sum().item() == sum(out.response_mask)
    assert data["rm_scores"][0].nonzero().flatten().tolist() == [len(out.response_ids) - 1]  # reward on the last token
    mm = extract_multi_modal_inputs(list(proto.non_tensor_batch["multi_modal_inputs"]))
    frames = 3000 if family == "qwen2_audio" else 96480 // 160 + 1
    assert mm["input_features"].shape[0] == 2 and mm["input_features"].shape[-1] in (frames, frames - 1)
    # The training forward on verl's batch (use_remove_padding=False: the padded batch with verl's positions).
    model = backend.model
    with torch.no_grad():
        logits = model(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"], position_ids=data["position_ids"],
            input_features=mm["input_features"].to(model.dtype), feature_attention_mask=mm["feature_attention_mask"],
        ).logits.float()  # fmt: skip
    logp = torch.log_softmax(logits[0, prompt_width - 1 : -1], -1)
    verl_logp = logp.gather(-1, data["responses"][0].unsqueeze(-1)).squeeze(-1)
    # Ours: the Trajectory path (audio cut again from the clip and encoded by our PromptEncoder).
    traj = _as_trajectory(out, AudioStore().load(wav), str(tmp_path / "train.parquet"))
    inputs = model_inputs([traj], backend.encoder)
    ours, _ = sequence_logprobs(model, inputs, temperature=0)
    p, n = len(out.prompt_ids), len(out.response_ids)
    ours_resp = ours[0, p : p + n]
    sampled = mask[:n].bool()
    assert torch.allclose(verl_logp[:n][sampled], ours_resp[sampled], atol=1e-5), (
        (verl_logp[:n][sampled] - ours_resp[sampled]).abs().max()
    )
    rollout = torch.tensor(out.response_logprobs)[sampled]
    assert torch.allclose(ours_resp[sampled], rollout, atol=1e-4)  # the rollout scored with a KV cache


def test_the_documented_main_ppo_command_composes_with_verls_own_config(verl_installed: Any) -> None:
    """docs/verl.md's one-node command, parsed and composed with verl's own trainer config (Hydra), as main_ppo
    would: a mistyped key or a missing `+` fails here. Composing is all it checks; running it needs GPUs."""
    import shlex

    from hydra import compose, initialize_config_dir

    text = (ROOT / "docs" / "verl.md").read_text()
    block = text.split("```bash\nMODEL=", 1)[1].split("```", 1)[0]
    args = shlex.split(block.split("\n", 1)[1].replace("\\\n", " "))
    assert args[:3] == ["python", "-m", "verl.trainer.main_ppo"]
    overrides = [a.replace("$MODEL", "/models/echo-sft") for a in args[3:]]
    with initialize_config_dir(
        config_dir=str(Path(verl_installed.__file__).parent / "trainer" / "config"), version_base=None
    ):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    assert cfg.algorithm.adv_estimator == "grpo" and (rollout.n, cfg.data.train_batch_size) == (8, 64)
    assert (actor.optim.lr, actor.kl_loss_coef, actor.kl_loss_type, actor.ppo_mini_batch_size) == (
        1e-6,
        0.04,
        "low_var_kl",
        32,
    )
    assert (rollout.prompt_length, rollout.response_length, rollout.val_kwargs.temperature) == (2048, 2048, 0)
    assert (ROOT / rollout.agent.agent_loop_config_path).resolve() == LOOP_YAML
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "echo_agent.training.verl_patches.install"
    assert rollout.engine_kwargs.vllm.limit_mm_per_prompt.audio >= LoopSettings().max_audios


def test_data_verl_writes_the_rows_from_the_command_line(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import subprocess
    import sys

    from echo_agent.training.verl_data import read_verl_parquet

    data = Path(__file__).resolve().parents[1] / "examples" / "puzzles" / "example.json"
    out = tmp_path / "rows.parquet"
    cmd = [sys.executable, "-m", "echo_agent.cli", "data", "verl", str(data), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = read_verl_parquet(out)
    assert len(rows) == 6 and proc.stdout.startswith("6 rows")
    assert {r["agent_name"] for r in rows} == {rows[0]["agent_name"]}

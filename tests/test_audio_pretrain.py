"""Stage 0 (training/audio_pretrain.py): slice labels agree with the suite's own answers, and a few real
optimisation steps on echo-tiny's audio encoder lower the head losses and save a loadable model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem
from echo_agent.training import audio_pretrain
from echo_agent.training.audio_pretrain import (
    IGNORE,
    PAIRS,
    AudioPretrainConfig,
    EventHeads,
    encode,
    head_losses,
    pretrain,
    random_span,
    read_slice,
    sample_batch,
    score_windows,
    slice_labels,
    trace_spans,
)
from echo_agent.training.common import load_items
from echo_agent.training.synth import DURATION_CHOICES, KINDS, PITCH_WORDS, write_suite

TINY = {"vocab_size": 400, "hidden_size": 64, "layers": 1, "intermediate_size": 128, "audio_hidden_size": 64}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four items of every category (10-20 s clips)."""
    return write_suite(tmp_path_factory.mktemp("suite"), 24, 5, "train", progress=False, durations=(10.0, 20.0))


def _items(suite: Path, category: str) -> list[BenchItem]:
    return [it for it in load_items(suite) if it.group == category]


def test_labels_of_the_gold_listens_match_the_answers(suite: Path) -> None:
    """The label of the span each trace listens to is exactly what the trace says after it."""
    for it in _items(suite, "count"):
        (span,) = trace_spans(it.record["trace"])
        assert slice_labels(it.record["events"], *span)["count"] == int(it.answer)
    for it in _items(suite, "identify"):
        (span,) = trace_spans(it.record["trace"])
        assert KINDS[slice_labels(it.record["events"], *span)["center"]] == it.answer
    for it in _items(suite, "pitch"):
        spans = trace_spans(it.record["trace"])
        words = [PITCH_WORDS[slice_labels(it.record["events"], *s)["pitch"]] for s in spans]
        assert [f"this beep is {w}." in it.record["trace"] for w in words] == [True, True]
    for it in _items(suite, "duration"):
        last = trace_spans(it.record["trace"])[-1]
        value = DURATION_CHOICES[slice_labels(it.record["events"], *last)["chord"]]
        assert f"{value:.1f} s" == it.answer
    for it in _items(suite, "locate"):
        kind = KINDS.index(it.question.split("the ")[1].split(" heard")[0])
        spans = trace_spans(it.record["trace"])
        present = [slice_labels(it.record["events"], *s)["present"][kind] for s in spans]
        assert present == [0] * (len(spans) - 1) + [1]


def test_order_labels_compare_first_onsets() -> None:
    events = [
        {"kind": "chord", "onset": 1.0, "offset": 2.0},
        {"kind": "beep", "onset": 3.0, "offset": 3.2, "pitch": "low"},
        {"kind": "chord", "onset": 5.0, "offset": 6.0},
    ]
    y = slice_labels(events, 0.0, 10.0)
    pair = PAIRS.index((KINDS.index("beep"), KINDS.index("chord")))
    assert y["order"][pair] == 0  # the chord starts first
    assert sum(v != IGNORE for v in y["order"]) == 1  # only one pair of kinds is present
    assert y["chord"] == IGNORE  # two chords: no single duration
    assert y["count"] == 1 and y["center"] == KINDS.index("chord")  # the second chord sounds at 5.0 s
    assert slice_labels(events, 3.5, 4.5)["center"] == len(KINDS)  # nothing sounds at 4.0 s


def test_random_spans_stay_inside_the_clip(suite: Path) -> None:
    rng = random.Random(0)
    for it in load_items(suite):
        for _ in range(50):
            a, b = random_span(rng, it)
            assert 0.0 <= a < b <= float(it.record["duration"]) + 1e-9
    it = load_items(suite)[0]
    assert len(read_slice(str(it.audio), 1.0, 2.5)) == 24000


def test_pretraining_steps_lower_the_losses_and_save_a_model(suite: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = AudioPretrainConfig(train=suite, val=suite, out=tmp_path / "run", steps=40, batch_size=12, lr=3e-3,
                              warmup=5, log_every=20, eval_every=40, eval_slices=50, **TINY)  # fmt: skip
    model_dir = pretrain(cfg)
    rows = [json.loads(line) for line in (cfg.out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40]
    assert "val_count" in rows[-1] and 0.0 <= rows[-1]["val_count"] <= 1.0
    # The saved encoder is the trained one: on fixed slices its heads' loss is below a fresh encoder's.
    backend = TransformersBackend.from_pretrained(model_dir)
    heads = EventHeads(16, backend.model.config.text_config.hidden_size)
    heads.load_state_dict(torch.load(cfg.out / "heads.pt"))
    audios, y = sample_batch(random.Random(1), load_items(suite), 48, 0.5)
    with torch.no_grad():
        trained = sum(head_losses(heads(encode(backend.model, backend.processor, audios)), y).values())
        fresh = type(backend.model)(backend.model.config).eval()
        untrained = sum(head_losses(heads(encode(fresh, backend.processor, audios)), y).values())
    assert float(trained) < float(untrained)


def test_chunked_encoding_matches_one_batch(suite: Path, tmp_path: Path) -> None:
    """Sorting slices into length chunks is a speed-up only: same tokens, same order."""
    from echo_agent.training.common import load_model
    from echo_agent.training.sft import SFTConfig

    cfg = SFTConfig(train=suite, out=tmp_path, **TINY)
    model, processor = load_model(cfg.init, cfg, load_items(suite), cfg.seed)
    model.eval()
    audios, _ = sample_batch(random.Random(2), load_items(suite), 10, 0.5)
    with torch.no_grad():
        chunked = encode(model, processor, audios, chunk=3)
        singles = torch.cat([encode(model, processor, [a]) for a in audios])
    torch.testing.assert_close(chunked, singles, atol=1e-4, rtol=1e-4)


def test_category_weights_steer_which_clips_are_sliced(suite: Path) -> None:
    """A zero weight removes a category from the batches: with only `count` weighted and every slice
    taken from the gold listens, each slice's labels are a count window's labels."""
    items = load_items(suite)
    weights = [1.0 if it.group == "count" else 0.0 for it in items]
    counts = [it for it in items if it.group == "count"]
    windows = [slice_labels(it.record["events"], *trace_spans(it.record["trace"])[0]) for it in counts]
    _, y = sample_batch(random.Random(0), items, 30, 1.0, weights)
    assert all(c in {w["count"] for w in windows} for c in y["count"].tolist())
    assert min(y["count"].tolist()) >= 1  # a count window always holds a beep; other spans often hold none


def test_continuing_from_a_previous_run_starts_from_its_weights(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = AudioPretrainConfig(train=suite, val=suite, out=tmp_path / "a", steps=4, batch_size=6, lr=3e-3,
                                warmup=1, log_every=4, eval_every=4, eval_slices=50, **TINY)  # fmt: skip
    pretrain(first)
    cont = AudioPretrainConfig.model_validate({**first.model_dump(), "out": tmp_path / "b", "init": tmp_path / "a",
                                               "steps": 2, "log_every": 2, "eval_every": 2,
                                               "category_weights": {"count": 3.0}})  # fmt: skip
    # A config refuses lr 0 (lr > 0), so the run's schedule is held at 0 instead: the continued run must save
    # exactly the weights it loaded (a fresh init would differ).
    with pytest.raises(ValidationError, match="lr"):
        AudioPretrainConfig.model_validate({**cont.model_dump(), "lr": 0.0})

    def no_lr(*_: object) -> float:
        return 0.0

    monkeypatch.setattr(audio_pretrain, "lr_at", no_lr)
    pretrain(cont)
    a = TransformersBackend.from_pretrained(tmp_path / "a" / "model").model.audio_encoder.state_dict()
    b = TransformersBackend.from_pretrained(tmp_path / "b" / "model").model.audio_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    heads_a, heads_b = (torch.load(tmp_path / run / "heads.pt") for run in ("a", "b"))
    assert torch.equal(heads_a["count.weight"], heads_b["count.weight"])
    row = json.loads((tmp_path / "b" / "pretrain_log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["val_count_windows"] <= 1.0  # head accuracy on the count items' own windows
    # Scoring the finished run on the gold listens agrees with what training logged on the same data.
    scores = score_windows(tmp_path / "b", suite, ["count", "order"])
    assert scores["count"]["count"] == pytest.approx(row["val_count_windows"], abs=1e-4)
    assert 0.0 <= scores["order"]["present"] <= 1.0

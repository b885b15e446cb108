"""The shipped run configs (`configs/*.json`, named in the README's commands) are valid for the trainer
they are passed to: a renamed or mistyped field would otherwise surface only an hour into a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from echo_agent.training.audio_pretrain import AudioPretrainConfig
from echo_agent.training.grpo import GRPOConfig
from echo_agent.training.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER: dict[str, type[BaseModel]] = {"audio": AudioPretrainConfig, "sft": SFTConfig, "grpo": GRPOConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_config_validates_for_its_trainer(path: Path) -> None:
    kind = next(k for k in TRAINER if f"-{k}" in path.stem)
    fields = json.loads(path.read_text())
    cls = TRAINER[kind]
    unknown = set(fields) - set(cls.model_fields)
    assert not unknown, f"{path.name}: fields {cls.__name__} does not have: {sorted(unknown)}"
    cls.model_validate({"train": "t.json", "out": "runs/x", "init": "echo-tiny", **fields})


# ---- every config validates its bounds: a bad value is a clear error before any work starts ----------------


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (GRPOConfig, "group_size", 1),
        (GRPOConfig, "steps", 0),
        (GRPOConfig, "clip_ratio", 1.5),
        (GRPOConfig, "reward", "other"),
        (GRPOConfig, "audio_mode", "text"),
        (SFTConfig, "audio_mode", "cold_start"),  # the old name: the one vocabulary is interleaved|grounded|text
        (SFTConfig, "batch_size", 0),
        (SFTConfig, "lr", 0.0),
        (SFTConfig, "hidden_size", 65),  # not a multiple of the heads
        (AudioPretrainConfig, "trace_span_share", 1.5),
        (AudioPretrainConfig, "audio_time_tokens", 16),  # as many as audio_tokens: no learned queries left
    ],
)
def test_out_of_bounds_values_are_refused(cls: type[BaseModel], field: str, value: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field if field != "hidden_size" else "divisible"):
        cls.model_validate({"train": "t.json", "out": "runs/x", "init": "echo-tiny", field: value})


def test_agent_config_takes_only_known_modes_protocols_and_weights() -> None:
    from pydantic import ValidationError

    from echo_agent.config import AUDIO_MODES, AgentConfig, reward_weights

    assert AUDIO_MODES == ("interleaved", "grounded", "text")
    for bad in ({"mode": "cold_start"}, {"protocol": "xml"}, {"reward": {"format": 0.5, "bonus": 1.0}}):
        with pytest.raises(ValidationError):
            AgentConfig.model_validate(bad)
    assert AgentConfig(reward=reward_weights("deepeyes")).reward.segment == 1.2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "grpo", "--train", "T", "--out", "O", "--init", "I", "--steps", "0"], "steps"),
        (["train", "sft", "--train", "T", "--out", "O", "--batch-size", "0"], "batch_size"),
        (["train", "audio", "--train", "T", "--out", "O", "--lr", "-1"], "lr"),
    ],
)
def test_the_cli_refuses_a_bad_trainer_value_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from echo_agent.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err

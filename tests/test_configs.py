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

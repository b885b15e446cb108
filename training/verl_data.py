"""Benchmark items as verl's RL parquet rows, for `python -m verl.trainer.main_ppo data.train_files=...`.

One row per item, the columns verl's `RLHFDataset` reads:

- `agent_name`: `"echo_agent"`, the loop registered by `configs/verl/echo_agent_loop.yaml`;
- `data_source`: `"echo_agent"` (verl groups validation metrics by it);
- `prompt`: the chat verl filters by length and logs: one user turn with the question text exactly as the graph
  words it (choices and the paper's instruction). It carries no `<audio>` placeholder on purpose: verl would then
  feed the path to its processor to measure the prompt (and drop every row as too long). The loop builds the real
  prompt, with the clip's audio, itself;
- `reward_model`: `{"style": "rule", "ground_truth": answer}`, verl's usual column (the loop's verdict is the
  reward, so verl's reward functions never read it);
- `extra_info`: `index`, `id`, `clip` (absolute path), `sha256` (the loop refuses a clip that changed), `duration`,
  `question`, `choices`, `answer`: what the loop reads.

Every clip is decoded once here (`AudioStore.load`), so bad audio fails at export, not mid-training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..audio import AudioStore
from ..benchmarks import BenchItem
from ..errors import ConfigError, OutputError
from ..prompts import format_question
from .verl_agent_loop import AGENT_NAME

__all__ = ["DATA_SOURCE", "export_verl_parquet", "read_verl_parquet", "verl_rows"]

DATA_SOURCE = "echo_agent"


def verl_rows(
    items: Sequence[BenchItem],
    *,
    store: AudioStore | None = None,
    agent_name: str = AGENT_NAME,
    data_source: str = DATA_SOURCE,
) -> list[dict[str, Any]]:
    """verl's parquet rows for `items` (module doc), in order."""
    store = store or AudioStore()
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        ref = store.load(item.audio)
        text = format_question(item.question, item.choices, {"main": ref.duration}, "main")
        rows.append(
            {
                "data_source": data_source,
                "agent_name": agent_name,
                "prompt": [{"role": "user", "content": text}],
                "reward_model": {"style": "rule", "ground_truth": item.answer},
                "extra_info": {
                    "index": index,
                    "id": item.id,
                    "clip": ref.path,
                    "sha256": ref.sha256,
                    "duration": ref.duration,
                    "question": item.question,
                    "choices": list(item.choices),
                    "answer": item.answer,
                },
            }
        )
    return rows


def export_verl_parquet(
    items: Sequence[BenchItem],
    out: str | os.PathLike[str],
    *,
    store: AudioStore | None = None,
    agent_name: str = AGENT_NAME,
    data_source: str = DATA_SOURCE,
) -> int:
    """Write `verl_rows(items)` to the parquet file `out` (atomically); returns the row count.

    Needs pyarrow (`pip install 'echo-agent[export]'`, or the `verl` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("verl's parquet export needs pyarrow: pip install 'echo-agent[verl]'") from None
    path = Path(out)
    table = pa.Table.from_pylist(verl_rows(items, store=store, agent_name=agent_name, data_source=data_source))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {path}: {err.strerror or err}") from None
    return int(table.num_rows)


def read_verl_parquet(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of an `export_verl_parquet` file, as Python objects."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows

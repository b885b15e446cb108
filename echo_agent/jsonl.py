"""Resumable, crash-safe JSON-lines files of pydantic records: eval's partial results and collect's trajectories.

Each record is appended, flushed and fsynced as it finishes. Reopening drops a torn last line (a crash
mid-write) and returns the records already there by key, so a `kill -9` at any moment followed by a rerun
leaves every key exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import DataError

R = TypeVar("R", bound=BaseModel)


def read_records(path: Path, model: type[R], key: Callable[[R], str], what: str) -> tuple[dict[str, R], int]:
    """The records of a JSON-lines file by key (first wins), and the byte length of its valid part.

    A torn last line is ignored; any other bad line raises `DataError` ("line N: not a WHAT: ...").
    """
    lines = path.read_bytes().split(b"\n")
    records: dict[str, R] = {}
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    valid_end = pos = 0
    for i, raw in enumerate(lines):
        pos += len(raw) + (1 if i < len(lines) - 1 else 0)
        if raw.strip():
            try:
                record = model.model_validate_json(raw)
            except ValidationError as err:
                if i == last:
                    break
                raise DataError(f"{path}: line {i + 1}: not a {what}: {err.errors()[0]['msg']}") from None
            records.setdefault(key(record), record)
        valid_end = pos
    return records, valid_end


class RecordLog(Generic[R]):
    """An append-only JSON-lines file of `model` records, opened for resuming (a context manager).

    `check` sees every record already in the file and raises (a `ConfigError`) when it belongs to another run.
    """

    def __init__(
        self, path: Path, model: type[R], key: Callable[[R], str], what: str, check: Callable[[R], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.done: dict[str, R] = {}
        if self.path.exists():
            self.done, valid_end = read_records(self.path, model, key, what)
            for record in self.done.values():
                if check is not None:
                    check(record)
            if valid_end < self.path.stat().st_size:
                os.truncate(self.path, valid_end)  # drop the torn last line
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":  # a complete last record whose newline was not written
                    self._f.write(b"\n")

    def append(self, record: R) -> None:
        self._f.write(record.model_dump_json().encode() + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordLog[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

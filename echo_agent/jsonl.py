"""Resumable, crash-safe JSON-lines files of pydantic records: eval's partial results and collect's trajectories.

Each record is appended, flushed and fsynced as it finishes. Reopening drops a torn last line (a crash
mid-write) and returns the records already there by key, so a `kill -9` at any moment followed by a rerun
leaves every key exactly once. A write that fails (a full disk, a quota, an I/O error) is cut back to the last
whole record and raises `OutputError`, so the file stays valid and a rerun resumes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import DataError, OutputError

R = TypeVar("R", bound=BaseModel)


def os_reason(err: OSError) -> str:
    """An OSError as the tail of a one-line message: `[Errno 28] No space left on device` -> `no space left on
    device` (the path is named by the caller, once)."""
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def read_records(path: Path, model: type[R], key: Callable[[R], str], what: str) -> tuple[dict[str, R], int]:
    """The records of a JSON-lines file by key (first wins), and the byte length of its valid part.

    A torn last line is ignored; any other bad line raises `DataError` ("line N: not a WHAT: ..."), and so does a
    file that cannot be read.
    """
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {os_reason(err)}") from None
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
    Writes go straight to the file descriptor (no user-space buffer that a failed write would leave half-full
    and a later close would try again), so after an `OutputError` the file ends with a whole record.
    """

    def __init__(
        self, path: Path, model: type[R], key: Callable[[R], str], what: str, check: Callable[[R], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.done: dict[str, R] = {}
        self.written = 0  # records appended by this process
        self._fd = -1
        valid_end: int | None = None
        if self.path.exists():
            self.done, valid_end = read_records(self.path, model, key, what)
            for record in self.done.values():
                if check is not None:
                    check(record)
        try:
            if valid_end is not None and valid_end < self.path.stat().st_size:
                os.truncate(self.path, valid_end)  # drop the torn last line
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            self._size = os.fstat(self._fd).st_size  # the end of the last whole record
            if self._size > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":  # a complete last record whose newline was not written
                        self._write(b"\n")
        except OSError as err:
            self.close()
            raise OutputError(f"cannot write to {self.path}: {os_reason(err)}") from None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a write may be partial (a disk filling up): the rest raises or goes on
            view = view[os.write(self._fd, view) :]
        self._size += len(data)

    def append(self, record: R) -> None:
        data = record.model_dump_json().encode() + b"\n"
        start = self._size
        try:
            self._write(data)
            os.fsync(self._fd)
        except OSError as err:
            self._cut_back(start)
            raise OutputError(
                f"cannot write to {self.path}: {os_reason(err)}; it keeps its {len(self.done) + self.written} "
                "whole records: make room and rerun the same command to resume"
            ) from None
        self.written += 1

    def _cut_back(self, size: int) -> None:
        """Drop the part of a record that did reach the file (best effort: a torn last line is dropped on resume)."""
        self._size = size
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, size)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> RecordLog[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file so that a reader sees the old or the new content, never a part. A write that fails
    (a full disk) leaves the old content and no temporary file, and raises `OutputError`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {path}: {os_reason(err)}") from None

"""A persistent on-disk cache of the frozen Whisper encoder's frames (echo-tiny 2), so that epochs, stages and
runs encode each audio input once.

echo-tiny 2 hears through the frozen Whisper tiny.en encoder: its frames for one input's log-mel features never
change. The model already keeps them in memory (`EchoTinyWhisperAudio.frame_cache`, an LRU bounded by bytes and
keyed by a digest of the input's features and the encoder's dtype and device). `attach_feature_cache` swaps that
LRU for a `DiskFrameCache`: the same LRU in front of a folder of `.npy` files. A miss in memory is looked up on
disk before the encoder runs, and every frame the encoder computes is written there. The fill is lazy: the first
epoch (or the first stage) computes and writes, later ones read, and a killed run loses nothing (each file is
written whole, then renamed). Nothing in `echo_agent.echo_tiny` changes: the cache is the model's own attribute.

The key is the model's own frame key, a digest of the input's exact log-mel, so it stands for (clip sha256,
start, end) and the feature extractor together, and it covers every input the same way: a whole clip, a
re-listened slice, a stage-0 span. Layout: ``ROOT/<encoder sha256[:16]>/<key[:2]>/<key>.npy``; the encoder
asset's hash is part of the path, so a reconverted encoder never reads old frames.

Frames are stored as float16 (a 30 s clip is 1.1 MB). A fresh frame is rounded to float16 precision in place
when it is stored, so a run gives the same numbers whether its frames came from the encoder or from the disk.

    $ECHO_FEATURE_CACHE          the folder every trainer uses when set (share it across stages and runs);
    else RUN/features            per run (`feature_cache: "auto"`, the default; "off" disables it).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..echo_tiny.audio import WHISPER_FRAME_CACHE_BYTES, EchoTinyWhisperAudio, TensorCache, encoder_asset_sha256

__all__ = ["DiskFrameCache", "attach_feature_cache", "feature_cache_dir", "feature_cache_stats"]

ENV = "ECHO_FEATURE_CACHE"


def feature_cache_dir(setting: str, out: Path) -> Path | None:
    """Where a run keeps its frames: `setting` "auto" = `$ECHO_FEATURE_CACHE` if set, else OUT/features; "off" =
    nowhere (memory only, as without this module); anything else is the folder itself."""
    if setting == "off":
        return None
    if setting == "auto":
        env = os.environ.get(ENV)
        return Path(env) if env else Path(out) / "features"
    return Path(setting)


class DiskFrameCache(TensorCache):
    """`TensorCache` (memory, bounded) in front of a folder of float16 `.npy` files (unbounded; delete to clear).

    `hits` counts memory hits, `disk_hits` frames read from disk, `misses` frames the encoder had to compute,
    `writes` frames written."""

    def __init__(self, root: Path, owner: EchoTinyWhisperAudio, max_bytes: int = WHISPER_FRAME_CACHE_BYTES) -> None:
        super().__init__(1 << 16, max_bytes)
        self.root = Path(root) / encoder_asset_sha256(owner.encoder_path)[:16]
        # The frames' dtype and device are the owner's (its encoder follows its projector): read at load time,
        # through a weak reference so the cache never keeps a dropped model alive.
        self._owner = weakref.ref(owner)
        self.disk_hits = self.writes = 0

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}.npy"

    def __contains__(self, key: bytes) -> bool:
        return super().__contains__(key) or self._path(key).is_file()

    def get(self, key: bytes) -> torch.Tensor | None:
        value = super().get(key)
        if value is not None:
            return value
        self.misses -= 1  # counted below, once we know the disk has none either
        path = self._path(key)
        try:
            array = np.load(path)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError):  # unreadable (files are renamed in whole, so: damaged): recompute, rewrite
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        owner = self._owner()
        ref = owner.in_proj.weight if owner is not None else None
        dtype = (owner.encoder_dtype or ref.dtype) if owner is not None and ref is not None else torch.float32
        frames = torch.from_numpy(array).to(device=ref.device if ref is not None else "cpu", dtype=dtype)
        self.disk_hits += 1
        super().put(key, frames)
        return frames

    def put(self, key: bytes, value: torch.Tensor) -> None:
        # Round in place, so the caller's frames (this very tensor) equal what a later read returns.
        with torch.no_grad():
            value.copy_(value.to(torch.float16))
        super().put(key, value)
        path = self._path(key)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")  # unique per process: ranks may race
        np.save(tmp, value.detach().to("cpu", torch.float16).numpy())
        tmp.replace(path)
        self.writes += 1

    def clear(self) -> None:
        """Memory only: the files stay valid (their keys name the dtype and device they were computed in)."""
        super().clear()


def _whisper_audio(model: Any) -> list[EchoTinyWhisperAudio]:
    """The Whisper front ends inside `model` (wrapped by DDP or peft or not); none for echo-tiny or Qwen2-Audio."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    return [m for m in modules if isinstance(m, EchoTinyWhisperAudio)]


def attach_feature_cache(model: Any, root: Path | None) -> DiskFrameCache | None:
    """Give `model`'s frozen Whisper encoder a disk cache under `root`. Returns it, or None (no `root`, or a model
    without a frozen Whisper front end: its audio side trains, so there is nothing to keep)."""
    front = _whisper_audio(model)
    if root is None or not front:
        return None
    audio = front[0]
    cache = audio.frame_cache if isinstance(audio.frame_cache, DiskFrameCache) else None
    if cache is None or cache.root.parent != Path(root):
        cache = DiskFrameCache(root, audio, audio.frame_cache.max_bytes)
        audio.frame_cache = cache
    return cache


def feature_cache_stats(model: Any) -> dict[str, int]:
    """Counters of `model`'s frame cache for a training log: memory and disk hits, encoder calls, writes."""
    front = _whisper_audio(model)
    if not front:
        return {}
    c = front[0].frame_cache
    stats = {"frames_memory_hits": c.hits, "frames_encoded": c.misses}
    if isinstance(c, DiskFrameCache):
        stats |= {"frames_disk_hits": c.disk_hits, "frames_written": c.writes}
    return stats

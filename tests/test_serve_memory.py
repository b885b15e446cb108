"""Peak memory of `echo-agent serve` (issue 14, acceptance): a real server process (the default model, echo-tiny)
takes the largest uploads its documented limits admit, and its peak RSS (the kernel's VmHWM) stays under 1.5 GB.

    pytest tests/test_serve_memory.py -s    # prints the figures
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from served import SLOW, ServeProcess, serve_env

GB = 1e9

if not sys.platform.startswith("linux"):
    pytest.skip("reads the peak RSS from /proc", allow_module_level=True)


def write_noise(path: Path, seconds: float, rate: int, channels: int) -> Path:
    rng = np.random.default_rng(0)
    frames = int(seconds * rate)
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as f:
        for start in range(0, frames, rate * 10):
            n = min(rate * 10, frames - start)
            f.write((0.1 * rng.standard_normal((n, channels))).astype(np.float32))
    return path


def rss_parts(pid: int) -> str:
    """The current resident set, anonymous and file-backed (shared libraries), for the report."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ", ".join(f"{k} {int(fields[k].split()[0]) / 1e6:.2f} GB" for k in ("RssAnon", "RssFile") if k in fields)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    ("case", "seconds", "rate", "channels"),
    [
        ("resampling: 10 min at 44,101 Hz", 600.0, 44101, 1),  # a rate with no small ratio to 16 kHz
        ("channels: 30 s of 32 at 48 kHz", 30.0, 48000, 32),  # the most channels, near the decoded-size limit
        ("the largest body: 10 min of 48 kHz stereo", 600.0, 48000, 2),  # 154 MB of base64, the default limit
    ],
)
def test_peak_rss_of_serve_stays_under_1_5_gb(
    case: str, seconds: float, rate: int, channels: int, tmp_path: Path
) -> None:
    clip = write_noise(tmp_path / "clip.wav", seconds, rate, channels)
    body = json.dumps({"model": "echo-tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode()}},
        {"type": "text", "text": "What is this?"}]}]}).encode()  # fmt: skip
    clip.unlink()
    proc = ServeProcess([], serve_env(tmp_path / "home"))
    try:
        idle = peak_rss(proc.proc.pid)
        idle_parts = rss_parts(proc.proc.pid)
        r = httpx.post(f"{proc.url}/v1/chat/completions", content=body, timeout=SLOW,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 200, r.text[:300]
        peak = peak_rss(proc.proc.pid)
    finally:
        proc.stop()
    print(f"\n{case}: body {len(body) / 1e6:.1f} MB, serve idle {idle / GB:.2f} GB ({idle_parts}), "
          f"peak RSS {peak / GB:.2f} GB")  # fmt: skip
    assert peak < 1.5 * GB
